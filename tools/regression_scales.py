"""Mean-squared-error regression on targets of growing scale: Adam against TKFAC().

Keras users often fit raw targets (fuel efficiency in miles per gallon, prices),
as TensorFlow's "basic regression" tutorial does, rather than standardised ones.
Keras's mean squared error is a Gaussian's negative log-likelihood of variance 1/2,
so a KL bound in nats is a bound in the targets' units; since 2026-12-01 the
quadratic model's KL bound is taken, for each mean-squared-error output, in the
units of the batch's residuals (`keras_tkfac.quadratic.kl_curvature`). This tool
trains the same MLPs from the same weights on the same batches, at each target
scale, with Adam (`--adam` learning rates), `TKFAC()`, and `TKFAC()` with the
previous bound (`kl_clip` nats whatever the scale: `quadratic.kl_curvature`
switched off), and prints the best validation MSE of each, over the targets'
variance (a model that predicts the mean scores 1).

With `--heads=2` each MLP has a second, 4-class softmax head (sparse categorical
cross-entropy on logits, labels the argmax of the first four features plus noise)
beside the regression head, the shape of a model that predicts a quantity and a
class from shared features; each cell then also gives the class head's best
validation cross-entropy (chance: log 4 = 1.386).

Data: 400 examples of 9 standard-normal features; the target
`scale * (tanh(x w / 3) + 0.3 sin(2 x_0) + 0.1 noise) + 2 scale` (mean `2 scale`);
320 train, 80 validation; batch 32; `--epochs` epochs.

    python tools/regression_scales.py [--scales=1,25,2000] [--models=64-64:relu]
        [--epochs=30] [--seed=0] [--cap=inf] [--heads=2] [--adam=1e-3,3e-3]
        [--smoke]
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
_HEADS = flags.DEFINE_enum(
    "heads", "1", ["1", "2"], "1: a regression head; 2: and a 4-class head.")
_ADAM = flags.DEFINE_list("adam", ["1e-3"], "Adam's learning rates.")

PREVIOUS = "TKFAC(), previous bound"


def data(seed, n=400, d=9):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype("float32")
    signal = (np.tanh(x @ rng.normal(size=d) / 3) + 0.3 * np.sin(2 * x[:, 0])
              + 0.1 * rng.normal(size=n))
    classes = np.argmax(x[:, :4] + 0.3 * rng.normal(size=(n, 4)), -1).astype("int32")
    return x, signal, classes


def mlp(spec, d, seed, heads=1):
    widths, activation = spec.split(":")
    keras.utils.set_random_seed(seed)
    inputs = hidden = keras.Input((d,))
    for width in widths.split("-"):
        hidden = keras.layers.Dense(int(width), activation=activation)(hidden)
    if heads == 1:
        return keras.Model(inputs, keras.layers.Dense(1)(hidden))
    return keras.Model(inputs, {"value": keras.layers.Dense(1)(hidden),
                                "class": keras.layers.Dense(4)(hidden)})


def run(label, spec, x, targets, weights, epochs, seed, heads):
    """Best validation MSE, last epoch's training MSE and (two heads) best
    validation cross-entropy of one run."""
    model = mlp(spec, x.shape[1], seed, heads)
    model.set_weights(weights)
    cap, scaled = quadratic.MSE_KL_SCALE_CAP, quadratic.kl_curvature
    if label.startswith("Adam"):
        optimizer = keras.optimizers.Adam(float(label[5:-1]))
    else:
        model = keras_tkfac.wrap(model)
        optimizer = keras_tkfac.TKFAC(seed=seed)
        if label == PREVIOUS:
            quadratic.kl_curvature = lambda *args: None
        elif _CAP.value is not None:
            quadratic.MSE_KL_SCALE_CAP = _CAP.value
    loss = "mse" if heads == 1 else {
        "value": "mse",
        "class": keras.losses.SparseCategoricalCrossentropy(from_logits=True)}
    train = {k: v[:320] for k, v in targets.items()}
    val = {k: v[320:] for k, v in targets.items()}
    if heads == 1:
        train, val = train["value"], val["value"]
    try:
        model.compile(optimizer=optimizer, loss=loss)
        history = model.fit(x[:320], train, validation_data=(x[320:], val),
                            batch_size=32, epochs=epochs, shuffle=False, verbose=0)
    finally:
        quadratic.MSE_KL_SCALE_CAP, quadratic.kl_curvature = cap, scaled
    history = history.history
    key = "" if heads == 1 else "value_"

    def best(name):
        values = np.array(history["val_" + name])
        return float(np.min(values)) if np.all(np.isfinite(values)) else math.nan

    return (best(key + "loss"), float(history[key + "loss"][-1]),
            best("class_loss") if heads == 2 else None)


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
    for rate in _ADAM.value:
        if not float(rate) > 0:
            raise ValueError(f"--adam must be positive. Received: {rate}")
    seed, heads = _SEED.value, int(_HEADS.value)
    runs = [f"Adam({rate})" for rate in _ADAM.value] + ["TKFAC()", PREVIOUS]
    x, signal, classes = data(seed)
    start = time.perf_counter()
    lines = [
        f"`python tools/regression_scales.py --scales={','.join(f'{s:g}' for s in scales)}"
        f" --models={','.join(models)} --epochs={epochs} --seed={seed}"
        + (f" --cap={_CAP.value:g}" if _CAP.value is not None else "")
        + (f" --heads=2 --adam={','.join(_ADAM.value)}" if heads == 2 else "") + "`",
        "",
        "Best validation MSE over the validation targets' variance (lower is better; "
        "predicting the mean scores 1), and in brackets the last epoch's training "
        "loss over the same variance"
        + ("; after the slash the class head's best validation cross-entropy "
           "(chance 1.386)" if heads == 2 else "")
        + ". Same weights and batches in every run.", "",
        "| model | scale | " + " | ".join(runs) + " |",
        "|---|---:|" + "---:|" * len(runs)]
    for spec in models:
        weights = mlp(spec, x.shape[1], seed, heads).get_weights()
        for scale in scales:
            targets = {"value": (scale * signal + 2 * scale).astype("float32"),
                       "class": classes}
            variance = float(np.var(targets["value"][320:]))
            cells = []
            for label in runs:
                best, last, entropy = run(label, spec, x, targets, weights, epochs,
                                          seed, heads)
                cells.append(f"{best / variance:.3g} ({last / variance:.3g})"
                             + (f" / {entropy:.3g}" if heads == 2 else ""))
            lines.append(f"| {spec} | {scale:g} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    lines += ["", f"{(time.perf_counter() - start) / 60:.1f} minutes in all."]
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
