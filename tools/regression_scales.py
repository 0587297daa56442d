"""Mean-squared-error regression on targets of growing scale: Adam against TKFAC().

Keras users often fit raw targets (fuel efficiency in miles per gallon, prices),
as TensorFlow's "basic regression" tutorial does, rather than standardised ones.
Keras's mean squared error is a Gaussian's negative log-likelihood of variance 1/2,
so a KL bound in nats is a bound in the targets' units; since 2026-12-01 the
quadratic model's KL bound is taken in the units of the batch's residuals
(`keras_tkfac.quadratic.kl_bound`). This tool trains the same MLPs from the same
weights on the same batches, at each target scale, with Adam(1e-3), `TKFAC()`, and
`TKFAC()` with the previous bound (`quadratic.MSE_KL_SCALE_CAP = 1`, `kl_clip`
nats whatever the scale), and prints the best validation MSE of each, over the
targets' variance (a model that predicts the mean scores 1).

Data: 400 examples of 9 standard-normal features; the target
`scale * (tanh(x w / 3) + 0.3 sin(2 x_0) + 0.1 noise) + 2 scale` (mean `2 scale`);
320 train, 80 validation; batch 32; `--epochs` epochs.

    python tools/regression_scales.py [--scales=1,25,2000] [--models=64-64:relu]
        [--epochs=30] [--seed=0] [--cap=inf] [--smoke]
"""

import math
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np
import tensorflow as tf
import keras

import keras_tkfac
from keras_tkfac import quadratic

_SCALES = flags.DEFINE_list("scales", ["1", "3", "10", "25", "100", "300", "2000",
                                       "100000"], "Target scales.")
_MODELS = flags.DEFINE_list(
    "models", ["64-64:relu", "256-256-256-256:relu", "256-256-256-256:tanh"],
    "MLPs: hidden widths and activation, 'width-width-...:activation'.")
_EPOCHS = flags.DEFINE_integer("epochs", 30, "Epochs of 10 steps.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the data and the weights.")
_SMOKE = flags.DEFINE_bool("smoke", False, "One model, two scales, one epoch.")
_CAP = flags.DEFINE_float(
    "cap", None, "The TKFAC() column's ceiling on the KL bound's multiple "
    "(`quadratic.MSE_KL_SCALE_CAP`; `inf`: none); default: the library's.")

RUNS = ("Adam(1e-3)", "TKFAC()", "TKFAC(), previous bound")


def data(seed, n=400, d=9):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype("float32")
    signal = (np.tanh(x @ rng.normal(size=d) / 3) + 0.3 * np.sin(2 * x[:, 0])
              + 0.1 * rng.normal(size=n))
    return x, signal


def mlp(spec, d, seed):
    widths, activation = spec.split(":")
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((d,))]
        + [keras.layers.Dense(int(w), activation=activation) for w in widths.split("-")]
        + [keras.layers.Dense(1)])


def run(label, spec, x, y, weights, epochs, seed):
    """Best validation MSE and last epoch's training loss of one run."""
    model = mlp(spec, x.shape[1], seed)
    model.set_weights(weights)
    cap = quadratic.MSE_KL_SCALE_CAP
    if label == "Adam(1e-3)":
        optimizer = keras.optimizers.Adam(1e-3)
    else:
        model = keras_tkfac.wrap(model)
        optimizer = keras_tkfac.TKFAC(seed=seed)
        if label.endswith("previous bound"):
            quadratic.MSE_KL_SCALE_CAP = 1.0
        elif _CAP.value is not None:
            quadratic.MSE_KL_SCALE_CAP = _CAP.value
    try:
        model.compile(optimizer=optimizer, loss="mse")
        history = model.fit(x[:320], y[:320], validation_data=(x[320:], y[320:]),
                            batch_size=32, epochs=epochs, shuffle=False, verbose=0)
    finally:
        quadratic.MSE_KL_SCALE_CAP = cap
    val = np.array(history.history["val_loss"])
    best = float(np.min(val)) if np.all(np.isfinite(val)) else math.nan
    return best, float(history.history["loss"][-1])


def main(argv):
    del argv
    tf.get_logger().setLevel("ERROR")
    logging.set_verbosity(logging.ERROR)
    scales = [float(s) for s in _SCALES.value]
    models, epochs = _MODELS.value, _EPOCHS.value
    if _SMOKE.value:
        scales, models, epochs = [1.0, 25.0], models[:1], 1
    for scale in scales:
        if not scale > 0:
            raise ValueError(f"--scales must be positive. Received: {scale}")
    if _CAP.value is not None and not _CAP.value >= 1:
        raise ValueError(f"--cap must be at least 1. Received: {_CAP.value}")
    seed = _SEED.value
    x, signal = data(seed)
    start = time.perf_counter()
    lines = [
        f"`python tools/regression_scales.py --scales={','.join(f'{s:g}' for s in scales)}"
        f" --models={','.join(models)} --epochs={epochs} --seed={seed}"
        + (f" --cap={_CAP.value:g}" if _CAP.value is not None else "") + "`", "",
        "Best validation MSE over the validation targets' variance (lower is better; "
        "predicting the mean scores 1), and in brackets the last epoch's training "
        "loss over the same variance. Same weights and batches in every run.", "",
        "| model | scale | " + " | ".join(RUNS) + " |",
        "|---|---:|" + "---:|" * len(RUNS)]
    for spec in models:
        weights = mlp(spec, x.shape[1], seed).get_weights()
        for scale in scales:
            y = (scale * signal + 2 * scale).astype("float32")
            variance = float(np.var(y[320:]))
            cells = []
            for label in RUNS:
                best, last = run(label, spec, x, y, weights, epochs, seed)
                cells.append(f"{best / variance:.3g} ({last / variance:.3g})")
            lines.append(f"| {spec} | {scale:g} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    lines += ["", f"{(time.perf_counter() - start) / 60:.1f} minutes in all."]
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
