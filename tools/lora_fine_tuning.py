"""LoRA fine-tuning of a pretrained MLP: which of the adapters' factors should have
the curvature block?

A three-layer MLP (64-128-128-k) is trained for two epochs with `Adam(1e-2)` on one
task ("pretraining"), then its three `Dense` layers get rank-4 adapters
(`layer.enable_lora(4)`: kernels frozen) and train on a related task for `--epochs`
epochs of 32, the last quarter held out, from the same weights and batches with:

- `TKFAC()` as it is: `B` and the bias in `keras_tkfac.lora_blocks`' block, `A` on
  the partner ("TKFAC, block on B");
- `TKFAC()` with a block on `A` instead (its gradient `s a (g B^T)`: inputs `a`,
  output gradients `s g B^T`; `B` and the bias on the partner), a block defined
  here for the comparison ("TKFAC, block on A");
- `TKFAC()` with no LoRA block (every adapter weight on the partner, as before
  2026-12-06; "TKFAC, partner only");
- `Adam` at 1e-3, 3e-3, 1e-2, 3e-2.

Tasks: `digits` (scikit-learn's 8 x 8 digits: pretrained on the labels shifted by
three, fine-tuned on the labels) and `regression` (1024 synthetic examples of 64
features, targets a random two-layer tanh network's, pretrained on a mixture of
the targets). It prints each run's validation loss per epoch and the best.

    python tools/lora_fine_tuning.py [--tasks=digits,regression] [--epochs=5]
        [--smoke]
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402
import numpy as np  # noqa: E402
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_tkfac  # noqa: E402
from keras_tkfac import lora_blocks  # noqa: E402
from keras_tkfac.blocks import DenseBlock  # noqa: E402

FLAGS = flags.FLAGS
RUNS = ("TKFAC, block on B", "TKFAC, block on A", "TKFAC, partner only",
        "Adam 1e-3", "Adam 3e-3", "Adam 1e-2", "Adam 3e-2")


class BlockOnA(DenseBlock):
    """The alternative: `A`'s block (inputs `a`, output gradients `s g B^T`)."""

    covers_lora = True
    exact_rows = False

    @property
    def kernel(self):
        return self.layer.lora_kernel_a

    @property
    def bias(self):
        return None

    @property
    def d_out(self):
        return int(self.layer.lora_kernel_a.shape[-1])

    def preactivation(self, inputs):
        # (The layer's bias, on the partner here, is still added.)
        outputs = self._product(inputs)
        return outputs if self.layer.bias is None else outputs + self.layer.bias

    def _outputs(self, output_grads):
        rank = self.layer.lora_rank  # (Keras without `lora_alpha` adds `A B` unscaled.)
        scale = getattr(self.layer, "lora_alpha", rank) / rank
        kernel_b = self.layer.lora_kernel_b
        return scale * tf.matmul(tf.cast(output_grads, kernel_b.dtype), kernel_b,
                                 transpose_b=True)

    def rows(self, inputs, output_grads):
        return super().rows(inputs, self._outputs(output_grads))

    def sequence_rows(self, inputs, output_grads):
        return super().sequence_rows(inputs, self._outputs(output_grads))


def _data(task, smoke):
    rng = np.random.default_rng(0)
    if task == "digits":
        from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
        digits = load_digits()
        x = (digits.data / 16.0).astype("float32")
        y = digits.target.astype("int32")
        order = rng.permutation(len(x))
        x, y = x[order], y[order]
        if smoke:
            x, y = x[:128], y[:128]
        return x, y, (y + 3) % 10, 10
    n = 128 if smoke else 1024
    x = rng.normal(size=(n, 64)).astype("float32")
    hidden = np.tanh(x @ (rng.normal(size=(64, 8)) / 8.0))
    y = (hidden @ rng.normal(size=(8, 4))).astype("float32")
    return x, y, -y + 0.5 * np.roll(y, 1, axis=1), 4


def _loss(task):
    if task == "digits":
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    return "mse"


def _pretrained(task, x, y_pretrain, outputs):
    keras.utils.set_random_seed(0)
    dense = [keras.layers.Dense(128, activation="relu"),
             keras.layers.Dense(128, activation="relu"), keras.layers.Dense(outputs)]
    model = keras.Sequential([keras.Input(x.shape[1:]), *dense])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=_loss(task))
    model.fit(x, y_pretrain, batch_size=64, epochs=2, verbose=0)
    for layer in dense:
        layer.enable_lora(4)
    return model


def run(task, epochs, smoke=False, runs=RUNS):
    """`{run: validation losses per epoch}` of `task`."""
    x, y, y_pretrain, outputs = _data(task, smoke)
    results = {}
    for label in runs:
        model = _pretrained(task, x, y_pretrain, outputs)
        saved = dict(lora_blocks.LORA_BLOCKS)
        try:
            if label.startswith("TKFAC"):
                if "on A" in label:
                    lora_blocks.LORA_BLOCKS[DenseBlock] = BlockOnA
                elif "partner" in label:
                    lora_blocks.LORA_BLOCKS.clear()
                model = keras_tkfac.wrap(model)
                optimizer = keras_tkfac.TKFAC(seed=0)
            else:
                optimizer = keras.optimizers.Adam(float(label.split()[1]))
            model.compile(optimizer=optimizer, loss=_loss(task))
            keras.utils.set_random_seed(1)
            history = model.fit(x, y, batch_size=32, epochs=epochs, verbose=0,
                                validation_split=0.25)
        finally:
            lora_blocks.LORA_BLOCKS.clear()
            lora_blocks.LORA_BLOCKS.update(saved)
        results[label] = history.history["val_loss"]
    return results


def main(argv):
    del argv
    epochs = 1 if FLAGS.smoke else FLAGS.epochs
    for task in FLAGS.tasks:
        results = run(task, epochs, FLAGS.smoke)
        print(f"\n{task}: validation loss per epoch (best)\n")
        print("| run | " + " | ".join(str(e + 1) for e in range(epochs)) + " | best |")
        print("|---|" + "---:|" * (epochs + 1))
        for label, losses in results.items():
            print(f"| {label} | " + " | ".join("%.4g" % v for v in losses)
                  + " | %.4g |" % min(losses))


if __name__ == "__main__":
    flags.DEFINE_list("tasks", ["digits", "regression"], "digits, regression.")
    flags.DEFINE_integer("epochs", 5, "Fine-tuning epochs of batches of 32.")
    flags.DEFINE_bool("smoke", False, "Tiny data, one epoch (the tool's test).")
    app.run(main)
