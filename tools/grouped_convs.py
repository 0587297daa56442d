"""Grouped convolutions: Keras's nested XLA function against TensorFlow's own ops.

Keras's TensorFlow backend runs a grouped convolution (`groups > 1`) in a nested
function compiled with XLA; since 2026-12-06 `keras_tkfac.wrap` computes such
layers with TensorFlow's own ops (`keras_tkfac.native_convs`). This tool measures
both, side by side in one process:

1. One forward convolution (and its gradients) of several shapes: Keras's
   `ops.conv` against `native_convs.convolution`; medians of `--rounds` rounds of
   `--steps` calls, taken in turn.
2. Training steps of two small programs with grouped convolutions (`convnext`:
   ConvNeXt's 7x7 convolutions with one channel a group, LayerNorm, a Dense
   bottleneck; `resnext`: 3x3 convolutions in 8 groups between 1x1 ones), and of
   `--applications` (`keras.applications` models, `weights=None`, 32x32 inputs,
   batch 8): `Adam(1e-3)` on the model as Keras computes it, and `TKFAC()` at its
   defaults with `native_convs` off ("XLA") and on ("native"), each traced once;
   then, round after round, `--steps` steps of each in turn (the order alternating),
   so that the machine's load slows all alike. Medians in ms and × Adam's, with the
   last losses.

    python tools/grouped_convs.py [--programs=convnext,resnext]
        [--applications=ConvNeXtTiny] [--rounds=8] [--steps=10] [--smoke]
"""

import sys

from absl import app
from absl import flags
import numpy as np
import keras
from keras import layers
import tensorflow as tf

import keras_tkfac
from keras_tkfac import native_convs

import benchlib

_PROGRAMS = flags.DEFINE_list("programs", ["convnext"], "Small programs: convnext, resnext.")
_APPLICATIONS = flags.DEFINE_list("applications", [],
                                  "keras.applications models, e.g. ConvNeXtTiny.")
_ROUNDS = flags.DEFINE_integer("rounds", 8, "Timed rounds.")
_STEPS = flags.DEFINE_integer("steps", 10, "Steps (or calls) per timed round.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Two rounds of two steps, small shapes.")

# (batch, size, channels, filters, groups, kernel)
SHAPES = [(32, 8, 64, 64, 64, 7), (32, 16, 64, 128, 64, 3), (32, 16, 64, 64, 8, 3),
          (32, 16, 128, 128, 32, 3), (32, 32, 32, 32, 32, 7)]


def _convnext(width, size):
    inputs = keras.Input((size, size, 3))
    h = layers.Conv2D(width, 2, strides=2)(inputs)
    for _ in range(4):
        r = layers.Conv2D(width, 7, padding="same", groups=width)(h)
        r = layers.LayerNormalization(epsilon=1e-6)(r)
        r = layers.Dense(4 * width, activation="gelu")(r)
        h = h + layers.Dense(width)(r)
    return keras.Model(inputs, layers.Dense(5)(layers.GlobalAveragePooling2D()(h)))


def _resnext(width, size):
    inputs = keras.Input((size, size, 3))
    h = layers.Conv2D(width, 3, padding="same", activation="relu")(inputs)
    for _ in range(3):
        r = layers.Conv2D(width, 1, activation="relu")(h)
        r = layers.Conv2D(width, 3, padding="same", groups=8, activation="relu")(r)
        h = h + layers.Conv2D(width, 1)(r)
    return keras.Model(inputs, layers.Dense(5)(layers.GlobalAveragePooling2D()(h)))


def _program(name, smoke):
    """`(build, x, y, batch)` of a small program or an application."""
    rng = np.random.default_rng(0)
    if name in ("convnext", "resnext"):
        width, size, batch = (16, 8, 8) if smoke else (64, 16, 32)
        build = {"convnext": _convnext, "resnext": _resnext}[name]
        x = rng.normal(size=(batch * 8, size, size, 3)).astype("float32")
        # A learnable label: the sign pattern of the images' channel means.
        y = (x.mean(axis=(1, 2)) > 0).astype("int32") @ np.array([1, 2, 1]) % 5
        return (lambda: build(width, size)), x, y, batch
    application = getattr(keras.applications, name)
    x = rng.normal(size=(64, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 5, size=(64,))
    return (lambda: application(weights=None, input_shape=(32, 32, 3), classes=5,
                                classifier_activation=None)), x, y, 8


def _convolutions(rounds, steps, smoke):
    print("| shape (batch, size, channels, filters, groups, kernel) | Keras (XLA), ms |"
          " native, ms | × | max abs. difference |")
    print("|---|---:|---:|---:|---:|")
    for batch, size, channels, filters, groups, k in SHAPES[:1] if smoke else SHAPES:
        rng = np.random.default_rng(0)
        x = tf.constant(rng.normal(size=(batch, size, size, channels)), tf.float32)
        kernel = tf.Variable(rng.normal(size=(k, k, channels // groups, filters)),
                             dtype=tf.float32)

        def step(conv):
            def run():
                with tf.GradientTape() as tape:
                    out = conv(x, kernel)
                    loss = tf.reduce_sum(tf.square(out))
                return out, tape.gradient(loss, kernel)
            return tf.function(run)

        keras_step = step(lambda a, w: keras.ops.conv(a, w, padding="same"))
        native_step = step(lambda a, w: native_convs.convolution(
            a, w, 1, "same", 1, "channels_last"))
        difference = float(tf.reduce_max(tf.abs(keras_step()[0] - native_step()[0])))
        found = benchlib.medians_in_turn({"keras": lambda: keras_step()[1],
                                          "native": lambda: native_step()[1]},
                                         rounds, steps)
        print(f"| {batch}, {size}, {channels}, {filters}, {groups}, {k} | "
              f"{found['keras']:.2f} | {found['native']:.2f} | "
              f"{found['native'] / found['keras']:.3f} | {difference:.1e} |")


def _keeping_the_loss(step, label, last):
    """`step`, keeping its last loss in `last[label]`."""
    def run():
        last[label] = step()
        return last[label]
    return run


def _steps(name, rounds, steps, smoke):
    build, x, y, batch = _program(name, smoke)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    steps_of, last = {}, {}
    for label in ("Adam", "TKFAC XLA", "TKFAC native"):
        native_convs.ENABLED = label != "TKFAC XLA"  # (read when wrapped and traced)
        keras.utils.set_random_seed(0)
        model = build()
        if label == "Adam":
            optimizer = keras.optimizers.Adam(1e-3)
        else:
            model, optimizer = keras_tkfac.wrap(model), keras_tkfac.TKFAC(seed=0)
        model.compile(optimizer=optimizer, loss=loss)
        steps_of[label] = _keeping_the_loss(
            benchlib.warmed_step(model, x, y, batch), label, last)
    native_convs.ENABLED = True
    found = benchlib.medians_in_turn(steps_of, rounds, steps)
    adam = found["Adam"]
    cells = [f"{found[label]:.1f} ({found[label] / adam:.2f})" for label in steps_of]
    losses = [f"{float(last[label]):.4g}" for label in steps_of]
    print(f"| {name} | {' | '.join(cells)} | {' / '.join(losses)} |")


def main(argv):
    del argv
    smoke = _SMOKE.value
    rounds, steps = (2, 2) if smoke else (_ROUNDS.value, _STEPS.value)
    print(f"`python {' '.join(sys.argv)}` ({rounds} rounds of {steps}; TensorFlow "
          f"{tf.__version__}, Keras {keras.__version__})\n")
    _convolutions(rounds, steps, smoke)
    print("\n| program | Adam, ms (× Adam) | TKFAC XLA | TKFAC native | last losses "
          "Adam / XLA / native |")
    print("|---|---:|---:|---:|---|")
    for name in _PROGRAMS.value + _APPLICATIONS.value:
        _steps(name, rounds, steps, smoke)


if __name__ == "__main__":
    app.run(main)
