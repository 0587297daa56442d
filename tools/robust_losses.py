"""Programs trained with Huber, log-cosh, squared-hinge, Poisson and squared
logarithmic losses: Adam against TKFAC().

Keras's robust regression losses (Huber: keras-io's deep Q-learning; log-cosh) and
the squared hinge have no predictive distribution to sample labels from. Until
2026-12-07 their outputs took the empirical Fisher (the gradients at the real labels);
since then the true Fisher samples their output gradients from their diagonal Hessian
at the real labels (`keras_tkfac.fisher.hessian_cotangent`: the Gauss-Newton matrix,
as for cross-entropies and squared errors). This tool trains each program from the
same weights on the same batches with Adam at `--adam` learning rates, `TKFAC()` and
`TKFAC(fisher="empirical")` (for these one-loss programs, what `TKFAC()` computed
before the change) and prints each run's best validation loss.

Programs (offline data the tool makes; 320 training and 80 validation examples of
batch 32 unless said; `--epochs` epochs):
- `huber_mlp`: a 64-64 ReLU MLP, one standardised target (`tools/regression_scales.py`'s
  signal), Huber (delta 1);
- `huber_outliers`: the same targets with 10% of the training targets moved by
  +-8 (the case Huber is for); validation targets clean;
- `huber_multi`: four targets (a Q-network's shape: one value per action), Huber;
- `huber_conv1d`: a Conv1D forecaster on windows of a noisy two-tone series, Huber;
- `huber_onehot_cnn`: a small convnet on 8x8 digits-like blobs, Huber on one-hot
  targets (`tools/sweep_programs.py`'s `mixed_precision_convnet` without the policy);
- `logcosh_mlp`: the MLP of `huber_mlp`, log-cosh;
- `squared_hinge`: a 64-64 tanh MLP classifying the sign of the signal, labels +-1,
  squared hinge;
- `poisson_exponential`, `poisson_softplus`: counts `y ~ Poisson(exp(0.4 x.w +
  0.3 sin 3 x_0))`, the MLP of `huber_mlp` with an `exponential` or `softplus`
  output, Keras's `poisson` loss (a count regression as users write one);
- `poisson_counts`: three count targets of that form, a `softplus` output of 3 units;
- `msle_mlp`: positive, skewed targets `10 exp(0.5 x.w + 0.3 sin 3 x_0 + 0.3 e)`, the
  MLP with a `softplus` output, Keras's `msle` (mean squared logarithmic error);
- `msle_multi`: three such targets, a `softplus` output of 3 units.

Poisson has a predictive distribution: since 2026-12-08 `TKFAC()` samples its output
gradients from its Fisher in the rate (`keras_tkfac.fisher.sample_targets`), until
then it took the empirical Fisher (`fisher="empirical"` still does). Its loss
`f - y log f` falls below zero, so the table shows a Poisson program's validation loss
less that of the perfect prediction `f = y` (half the mean Poisson deviance, which is
nonnegative) and the ratios are of those. The squared logarithmic error has its
Gauss-Newton matrix since 2026-12-08 (`keras_tkfac.fisher.msle_cotangent`); before,
the empirical Fisher.

    python tools/robust_losses.py [--programs=huber_mlp,...] [--seeds=0,1,2]
        [--epochs=30] [--adam=1e-3,3e-3,1e-2] [--output=robust_losses.md] [--smoke]
"""

import time

from absl import app
from absl import flags
from absl import logging
import numpy as np
import tensorflow as tf
import keras
from keras import layers

import benchlib
import keras_tkfac

_PROGRAMS = flags.DEFINE_list("programs", None, "Programs (default: all).")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of the data and weights.")
_EPOCHS = flags.DEFINE_integer("epochs", 30, "Epochs of 10 steps of 32.")
_ADAM = flags.DEFINE_list("adam", ["1e-3", "3e-3", "1e-2"], "Adam's learning rates.")
_OUTPUT = flags.DEFINE_string("output", None, "Write the table (markdown) here.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Two programs, one seed, one epoch.")

EMPIRICAL = 'TKFAC(fisher="empirical")'


def _signal(rng, x):
    w = rng.normal(size=x.shape[1])
    return (np.tanh(x @ w / 3) + 0.3 * np.sin(2 * x[:, 0])
            + 0.1 * rng.normal(size=len(x))).astype("float32")


def _standardised(y):
    return ((y - y[:320].mean(0)) / y[:320].std(0)).astype("float32")


def _mlp(d, outputs, activation="relu", output_activation=None):
    return keras.Sequential([keras.Input((d,)), layers.Dense(64, activation=activation),
                             layers.Dense(64, activation=activation),
                             layers.Dense(outputs, activation=output_activation)])


def huber_mlp(rng):
    x = rng.normal(size=(400, 9)).astype("float32")
    return _mlp(9, 1), x, _standardised(_signal(rng, x))[:, None], keras.losses.Huber()


def huber_outliers(rng):
    model, x, y, loss = huber_mlp(rng)
    moved = rng.random(320) < 0.1
    y = y.copy()
    y[:320][moved, 0] += 8.0 * rng.choice([-1.0, 1.0], size=int(moved.sum()))
    return model, x, y, loss


def huber_multi(rng):
    x = rng.normal(size=(400, 9)).astype("float32")
    y = np.stack([_signal(rng, x) for _ in range(4)], -1)
    return _mlp(9, 4), x, _standardised(y), keras.losses.Huber()


def huber_conv1d(rng):
    t = np.arange(400 + 32)
    series = (np.sin(0.21 * t) + 0.5 * np.sin(0.037 * t + 1.0)
              + 0.2 * rng.normal(size=t.shape)).astype("float32")
    order = rng.permutation(400)
    x = np.stack([series[i:i + 24] for i in order])[..., None]
    y = np.stack([series[i + 24:i + 32] for i in order])
    model = keras.Sequential([
        keras.Input((24, 1)), layers.Conv1D(16, 5, activation="relu"),
        layers.Conv1D(16, 5, activation="relu"), layers.Flatten(), layers.Dense(8)])
    return model, x, y, keras.losses.Huber()


def huber_onehot_cnn(rng):
    classes = rng.integers(0, 4, 400)
    grid = np.stack(np.meshgrid(np.arange(8), np.arange(8), indexing="ij"), -1)
    centres = np.array([[2, 2], [2, 5], [5, 2], [5, 5]])[classes]
    centres = centres + rng.normal(scale=0.7, size=centres.shape)
    distance = ((grid[None] - centres[:, None, None]) ** 2).sum(-1)
    x = (np.exp(-distance / 3.0) + 0.3 * rng.normal(size=distance.shape))[..., None]
    model = keras.Sequential([
        keras.Input((8, 8, 1)), layers.Conv2D(8, 3, activation="relu"),
        layers.Conv2D(8, 3, activation="relu"), layers.GlobalAveragePooling2D(),
        layers.Dense(4)])
    return (model, x.astype("float32"), np.eye(4, dtype="float32")[classes],
            keras.losses.Huber())


def logcosh_mlp(rng):
    model, x, y, _ = huber_mlp(rng)
    return model, x, y, keras.losses.LogCosh()


def squared_hinge(rng):
    x = rng.normal(size=(400, 9)).astype("float32")
    y = np.where(_signal(rng, x) > 0, 1.0, -1.0).astype("float32")[:, None]
    return _mlp(9, 1, "tanh"), x, y, keras.losses.SquaredHinge()


def _counts(rng, x, targets):
    rates = [np.exp(0.4 * x @ rng.normal(size=x.shape[1]) + 0.3 * np.sin(3 * x[:, 0]))
             for _ in range(targets)]
    return rng.poisson(np.stack(rates, -1)).astype("float32")


def _skewed(rng, x, targets):
    values = [10.0 * np.exp(0.5 * x @ rng.normal(size=x.shape[1])
                            + 0.3 * np.sin(3 * x[:, 0]) + 0.3 * rng.normal(size=len(x)))
              for _ in range(targets)]
    return np.stack(values, -1).astype("float32")


def _positive_mlp(rng, make_targets, units, activation, loss):
    """The MLP of `huber_mlp` with a positive output of `units` units."""
    x = rng.normal(size=(400, 9)).astype("float32")
    return (_mlp(9, units, output_activation=activation), x,
            make_targets(rng, x, units), loss)


def poisson_exponential(rng):
    return _positive_mlp(rng, _counts, 1, "exponential", "poisson")


def poisson_softplus(rng):
    return _positive_mlp(rng, _counts, 1, "softplus", "poisson")


def poisson_counts(rng):
    return _positive_mlp(rng, _counts, 3, "softplus", "poisson")


def msle_mlp(rng):
    return _positive_mlp(rng, _skewed, 1, "softplus", "msle")


def msle_multi(rng):
    return _positive_mlp(rng, _skewed, 3, "softplus", "msle")


PROGRAMS = {f.__name__: f for f in (huber_mlp, huber_outliers, huber_multi, huber_conv1d,
                                    huber_onehot_cnn, logcosh_mlp, squared_hinge,
                                    poisson_exponential, poisson_softplus,
                                    poisson_counts, msle_mlp, msle_multi)}


def saturated_loss(loss, y):
    """The loss of the perfect prediction `f = y` on labels `y`: 0, or for Poisson
    the mean of `y - y log y` (`0 log 0 = 0`), which Keras's `f - y log f` exceeds
    by half the Poisson deviance."""
    if loss != "poisson":
        return 0.0
    return float(np.mean(y - y * np.log(np.where(y > 0, y, 1.0))))


def run(label, name, seed, epochs):
    """Best validation loss (or NaN where it was not finite) of one run, less the
    perfect prediction's (`saturated_loss`)."""
    keras.utils.set_random_seed(seed)
    model, x, y, loss = PROGRAMS[name](np.random.default_rng(seed))
    if label.startswith("Adam"):
        optimizer = keras.optimizers.Adam(float(label[5:-1]))
    else:
        model = keras_tkfac.wrap(model)
        optimizer = keras_tkfac.TKFAC(
            seed=seed, fisher="empirical" if label == EMPIRICAL else "true")
    model.compile(optimizer=optimizer, loss=loss)
    history = model.fit(x[:320], y[:320], validation_data=(x[320:], y[320:]),
                        batch_size=32, epochs=epochs, shuffle=False, verbose=0)
    values = np.array(history.history["val_loss"]) - saturated_loss(loss, y[320:])
    return float(values.min()) if np.all(np.isfinite(values)) else float("nan")


def main(argv):
    del argv
    tf.get_logger().setLevel("ERROR")
    logging.set_verbosity(logging.ERROR)
    names = benchlib.program_arguments(_PROGRAMS.value, PROGRAMS, _ADAM.value)
    seeds, epochs = [int(s) for s in _SEEDS.value], _EPOCHS.value
    if _SMOKE.value:
        names, seeds, epochs = names[:2], seeds[:1], 1
    runs = [f"Adam({rate})" for rate in _ADAM.value] + ["TKFAC()", EMPIRICAL]
    start = time.perf_counter()
    lines = [
        f"`python tools/robust_losses.py --programs={','.join(names)} "
        f"--seeds={','.join(map(str, seeds))} --epochs={epochs} "
        f"--adam={','.join(_ADAM.value)}`", "",
        "Best validation loss of each run (the program's own loss, for Poisson less "
        "the perfect prediction's: half the mean deviance; lower is better). "
        "Same weights and batches in every run of a row. `TKFAC()` samples these "
        "losses' output gradients from their Hessian (Poisson: from its Fisher; the "
        "squared logarithmic error: from its Gauss-Newton matrix); "
        "`fisher=\"empirical\"` takes the gradients at the real labels.", "",
        "| program | seed | " + " | ".join(runs) + " | TKFAC() / best Adam | "
        "TKFAC() / empirical |",
        "|---|---:|" + "---:|" * (len(runs) + 2)]
    ratios = {"adam": [], "empirical": []}
    for name in names:
        for seed in seeds:
            found = [run(label, name, seed, epochs) for label in runs]
            adam = min(found[:len(_ADAM.value)])
            tkfac, empirical = found[-2], found[-1]
            ratios["adam"].append(tkfac / adam)
            ratios["empirical"].append(tkfac / empirical)
            lines.append(f"| {name} | {seed} | " + " | ".join(f"{v:.4g}" for v in found)
                         + f" | {tkfac / adam:.3f} | {tkfac / empirical:.3f} |")
            print(lines[-1], flush=True)

    def geomean(values):
        return float(np.exp(np.mean(np.log(values))))

    benchlib.finish_table(
        lines, f"`TKFAC()` at most the best Adam's on "
        f"{sum(r <= 1 for r in ratios['adam'])} of {len(ratios['adam'])} runs, at most "
        f"`fisher=\"empirical\"`'s on {sum(r <= 1 for r in ratios['empirical'])}; "
        f"geometric means of the ratios {geomean(ratios['adam']):.3f} and "
        f"{geomean(ratios['empirical']):.3f}.", start, _OUTPUT.value)


if __name__ == "__main__":
    app.run(main)
