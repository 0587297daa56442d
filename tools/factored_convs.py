"""Convolutions preconditioned in factored form: flops and step times.

Since 2026-12-06 a convolution whose rows (example, output location pairs) are
few against its widths is preconditioned as `(L^{-1} a^T)(g R^{-1})` from its
im2col rows instead of `L^{-1} G R^{-1}` (`keras_tkfac.factored`): the late
stages of an ImageNet architecture on small images. For each `--applications`
model (`keras.applications`, `weights=None`, `--size` inputs, `--batch`), this
tool prints

1. the matmul flops of one step's preconditioning with every layer in full form
   and with the cheaper form per layer (`precondition_form="auto"`, what the
   optimizer picks when the batch size is known when traced), next to the forward
   and backward passes' (`6 rows d_in d_out` per covered layer);
2. step times, side by side in one process: `Adam(1e-3)`,
   `TKFAC(precondition_form="full")` and `TKFAC()`, same initial weights and
   batches, each traced once and run 3 steps (statistics and inverses included),
   then round after round `--steps` steps of each in turn (the order alternating),
   so that the machine's load slows all alike; medians in ms and × Adam's, with
   the largest difference between the two TKFAC runs' weights after their first
   step (relative to the largest weight: float rounding; later steps amplify it
   as they amplify any perturbation of the weights).

    python tools/factored_convs.py [--applications=ResNet50,VGG16] [--size=32]
        [--batch=64] [--rounds=4] [--steps=4] [--smoke]
"""

import sys

from absl import app
from absl import flags
import numpy as np
import keras
import tensorflow as tf

import keras_tkfac
from keras_tkfac import factored
from keras_tkfac import ops

import benchlib

_APPLICATIONS = flags.DEFINE_list("applications", ["ResNet50", "VGG16"],
                                  "keras.applications models.")
_SIZE = flags.DEFINE_integer("size", 32, "Input height and width.")
_BATCH = flags.DEFINE_integer("batch", 64, "Batch size.")
_ROUNDS = flags.DEFINE_integer("rounds", 4, "Timed rounds.")
_STEPS = flags.DEFINE_integer("steps", 4, "Steps of each configuration per round.")
_SMOKE = flags.DEFINE_bool("smoke", False, "A small convnet, two rounds of one step.")

_LABELS = ("Adam", "TKFAC full", "TKFAC auto")


def _smoke_model(input_shape, classes):
    inputs = keras.Input(input_shape)
    h = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(inputs)
    h = keras.layers.Conv2D(32, 3, activation="relu")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(inputs, keras.layers.Dense(classes)(h))


def _build(name, size, smoke):
    if smoke:
        return _smoke_model((size, size, 3), 5)
    return getattr(keras.applications, name)(
        weights=None, input_shape=(size, size, 3), classes=5,
        classifier_activation=None)


def _flops(optimizer, batch):
    """Gflops of the preconditioning in full form and in the cheaper form per
    layer, and of the preconditioned layers' forward and backward passes."""
    full = auto = passes = 0
    for block in (slot.block for slot in optimizer._slots):
        if block.groups > 1:
            continue
        locations = int(np.prod(block.layer.output.shape[1:-1], dtype=np.int64))
        rows = batch * locations
        layer_full = ops.full_precondition_flops(block.d_in, block.d_out)
        full += layer_full
        auto += (min(layer_full, ops.factored_precondition_flops(
            rows, block.d_in, block.d_out)) if factored.exact(block) else layer_full)
        passes += 6 * rows * block.d_in * block.d_out
    return full / 1e9, auto / 1e9, passes / 1e9


def _application(name, size, batch, rounds, steps, smoke):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch * 4, size, size, 3)).astype("float32")
    y = rng.integers(0, 5, size=(batch * 4,))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    steps_of, first = {}, {}
    for label in _LABELS:
        keras.utils.set_random_seed(0)
        model = _build(name, size, smoke)
        if label == "Adam":
            optimizer = keras.optimizers.Adam(1e-3)
        else:
            model = keras_tkfac.wrap(model)
            optimizer = keras_tkfac.TKFAC(
                seed=0, precondition_form="full" if label == "TKFAC full" else "auto")
        model.compile(optimizer=optimizer, loss=loss)
        steps_of[label] = benchlib.warmed_step(
            model, x, y, batch, after_first=lambda model, label=label: first.update(
                {label: (model, np.concatenate([w.ravel()
                                                for w in model.get_weights()]))}))
    full_flops, auto_flops, passes = _flops(first["TKFAC auto"][0].optimizer, batch)
    full_weights, auto_weights = first["TKFAC full"][1], first["TKFAC auto"][1]
    difference = np.abs(full_weights - auto_weights).max() / np.abs(full_weights).max()
    found = benchlib.medians_in_turn(steps_of, rounds, steps)
    adam = found["Adam"]
    cells = [f"{found[label]:.0f} ({found[label] / adam:.2f})" for label in _LABELS]
    print(f"| {'smoke convnet' if smoke else name} | {full_flops:.3g} | "
          f"{auto_flops:.3g} | {passes:.3g} | {' | '.join(cells)} | "
          f"{difference:.1e} |", flush=True)


def main(argv):
    del argv
    smoke = _SMOKE.value
    rounds, steps = (2, 1) if smoke else (_ROUNDS.value, _STEPS.value)
    size, batch = (12, 4) if smoke else (_SIZE.value, _BATCH.value)
    print(f"`python {' '.join(sys.argv)}` ({size}x{size} inputs, batch {batch}; "
          f"{rounds} rounds of {steps} steps; TensorFlow {tf.__version__}, Keras "
          f"{keras.__version__})\n")
    print("| model | preconditioning Gflops, full | auto | forward and backward "
          "Gflops | Adam, ms (× Adam) | TKFAC full | TKFAC auto | first step's "
          "weights, full vs auto |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in (["smoke"] if smoke else _APPLICATIONS.value):
        _application(name, size, batch, rounds, steps, smoke)


if __name__ == "__main__":
    app.run(main)
