"""Weighted losses, a batch-level ratio loss and the mean absolute error: Adam against
TKFAC(), with and without the quadratic model's rules for them.

Three measurements behind README figures ("Losses"):

- `scales`: a loss multiplied by a constant, through `sample_weight` or
  `loss_weights`. Adam's steps do not change; the quadratic model's KL bound is per
  unit of an output's mean weight since 2026-12-07
  (`keras_tkfac.quadratic.KL_PER_UNIT_WEIGHT`). A digits classifier (64-64-32-10,
  sparse cross-entropy on logits; 512 training and 256 validation examples; 3
  epochs of 16 steps of 32) at each `--scales` value: Adam(1e-2), `TKFAC()`,
  `TKFAC()` with the bound in the weighted loss's units (the rule switched off) and
  `TKFAC(kl_clip=None)`; each cell is the unweighted validation cross-entropy after
  the last epoch.
- `dice`: Keras's `Dice()` at its default `axis=None` (one ratio of sums over the
  whole batch) on a small sigmoid segmentation net (two 3x3 Conv2D(8) and a 1x1
  Conv2D(1); 16x16 random images whose mask is their 3x3 mean above 0.5; 200
  training and 40 validation images; 6 epochs of 10 steps of 20), for `--seeds`
  seeds of the data and the weights: `TKFAC()`, `TKFAC()` with the Hessian's Gram
  counted positive semi-definite only to 1e-6 of its trace (the rule before
  2026-12-07; `keras_tkfac.products.HESSIAN_ROUNDING`), `TKFAC()` on the per-example
  `Dice(axis=(1, 2, 3))` and Adam(1e-2). Each cell is the best validation Dice loss;
  a run above 0.3 has fallen into the all-ones prediction (`collapsed` counts them).
- `mae`: Keras's mean absolute error on a 64-64 tanh network (digits features, four
  smooth targets `2 tanh(0.3 x w) + 0.5`; 1200 training and 597 validation examples;
  6 epochs of 19 steps of 64), for `--mae_seeds` seeds: `TKFAC()`, `TKFAC()` with the
  KL bound on the quadratic model's own curvature (before 2026-12-07;
  `keras_tkfac.quadratic.LAPLACE_KL` off), the same at `kl_clip=0.01`, Adam(1e-2) and
  Adam(1e-3); each cell the validation MAE after the last epoch, and their mean.

    python tools/weighted_losses.py [--parts=scales,dice,mae] [--scales=1,10,100,1000]
        [--seeds=14] [--mae_seeds=3] [--smoke]
"""

import time

from absl import app
from absl import flags
from absl import logging
import numpy as np
import tensorflow as tf
import keras

import keras_tkfac
from keras_tkfac import products
from keras_tkfac import quadratic

_PARTS = flags.DEFINE_list("parts", ["scales", "dice", "mae"], "Which measurements: "
                           "scales, dice, mae.")
_SCALES = flags.DEFINE_list("scales", ["1", "10", "100", "1000"],
                            "Constant weights of the classifier's loss.")
_SEEDS = flags.DEFINE_integer("seeds", 14, "Seeds of the Dice program.")
_MAE_SEEDS = flags.DEFINE_integer("mae_seeds", 3, "Seeds of the MAE program.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Two scales, two seeds, one epoch each.")

COLLAPSED = 0.3  # A best validation Dice loss above this: the all-ones prediction.


def _digits():
    from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
    digits = load_digits()
    x, y = (digits.data / 16).astype("float32"), digits.target.astype("int32")
    return x[:512], y[:512], x[512:768], y[512:768]


def scale_run(label, scale, how, epochs):
    """The unweighted validation cross-entropy after `epochs` of one run."""
    x, y, x_val, y_val = _digits()
    cross_entropy = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((64,)),
                              keras.layers.Dense(64, activation="relu"),
                              keras.layers.Dense(32, activation="relu"),
                              keras.layers.Dense(10)])
    if label.startswith("Adam"):
        optimizer = keras.optimizers.Adam(1e-2)
    else:
        model = keras_tkfac.wrap(model)
        optimizer = keras_tkfac.TKFAC(
            seed=0, **({"kl_clip": None} if "kl_clip" in label else {}))
    rule = quadratic.KL_PER_UNIT_WEIGHT
    quadratic.KL_PER_UNIT_WEIGHT = "weighted units" not in label
    try:
        model.compile(optimizer=optimizer, loss=cross_entropy,
                      loss_weights=scale if how == "loss_weights" else None)
        model.fit(x, y, epochs=epochs, batch_size=32, shuffle=False, verbose=0,
                  sample_weight=(np.full(len(x), scale, "float32")
                                 if how == "sample_weight" else None))
    finally:
        quadratic.KL_PER_UNIT_WEIGHT = rule
    return float(cross_entropy(y_val, model.predict(x_val, verbose=0)))


def _segmentation(seed):
    rng = np.random.RandomState(7 + seed)
    images = rng.rand(240, 16, 16, 1).astype("float32")
    masks = (tf.nn.avg_pool2d(images, 3, 1, "SAME").numpy() > 0.5).astype("float32")
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((16, 16, 1))
    hidden = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    hidden = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(hidden)
    outputs = keras.layers.Conv2D(1, 1, activation="sigmoid")(hidden)
    return keras.Model(inputs, outputs), images, masks


def dice_run(label, seed, epochs):
    """The best validation `Dice()` loss (over the whole batch) of one run."""
    model, images, masks = _segmentation(seed)
    loss = keras.losses.Dice(axis=(1, 2, 3) if "per example" in label else None)
    if label.startswith("Adam"):
        optimizer = keras.optimizers.Adam(1e-2)
    else:
        model = keras_tkfac.wrap(model)
        optimizer = keras_tkfac.TKFAC()
    rounding = products.HESSIAN_ROUNDING
    if "1e-6" in label:
        products.HESSIAN_ROUNDING = 1e-6
    try:
        model.compile(optimizer=optimizer, loss=loss, metrics=[keras.losses.Dice()])
        history = model.fit(images[:200], masks[:200],
                            validation_data=(images[200:], masks[200:]),
                            epochs=epochs, batch_size=20, shuffle=False, verbose=0)
    finally:
        products.HESSIAN_ROUNDING = rounding
    return float(np.nanmin(history.history["val_dice"]))


def mae_run(label, seed, epochs):
    """The validation MAE after `epochs` of one run of the MAE program."""
    from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
    x = (load_digits().data / 16).astype("float32")
    w = np.random.RandomState(1).randn(64, 4).astype("float32")
    y = np.tanh(x @ w * 0.3) * 2 + 0.5
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((64,)),
                              keras.layers.Dense(64, activation="tanh"),
                              keras.layers.Dense(4)])
    if label.startswith("Adam"):
        optimizer = keras.optimizers.Adam(float(label[5:-1]))
    else:
        model = keras_tkfac.wrap(model)
        optimizer = keras_tkfac.TKFAC(
            seed=seed, **({"kl_clip": 0.01} if "0.01" in label else {}))
    rule = quadratic.LAPLACE_KL
    quadratic.LAPLACE_KL = "own curvature" not in label
    try:
        model.compile(optimizer=optimizer, loss="mae")
        model.fit(x[:1200], y[:1200], epochs=epochs, batch_size=64, verbose=0)
    finally:
        quadratic.LAPLACE_KL = rule
    return float(np.mean(np.abs(model.predict(x[1200:], verbose=0) - y[1200:])))


def _seed_table(title, runs, seeds, run, summary, summarise, cell):
    """The lines of a table with a row per run of `runs` and a column per seed
    (`run(label, seed)`, formatted by `cell`), and a last column `summary` of
    `summarise(values)`; each row is printed as it is measured."""
    lines = ["", title, "",
             "| run | " + " | ".join(f"seed {s}" for s in range(seeds))
             + f" | {summary} |", "|---|" + "---:|" * (seeds + 1)]
    for label in runs:
        values = [run(label, seed) for seed in range(seeds)]
        lines.append(f"| {label} | " + " | ".join(cell.format(v) for v in values)
                     + f" | {summarise(values)} |")
        print(lines[-1], flush=True)
    return lines


def main(argv):
    del argv
    tf.get_logger().setLevel("ERROR")
    logging.set_verbosity(logging.ERROR)
    for part in _PARTS.value:
        if part not in ("scales", "dice", "mae"):
            raise ValueError(f"--parts takes scales, dice and mae. Received: {part!r}")
    scales = [float(s) for s in _SCALES.value]
    for scale in scales:
        if not scale > 0:
            raise ValueError(f"--scales must be positive. Received: {scale}")
    if _SEEDS.value < 1:
        raise ValueError(f"--seeds must be at least 1. Received: {_SEEDS.value}")
    if _MAE_SEEDS.value < 1:
        raise ValueError(f"--mae_seeds must be at least 1. Received: {_MAE_SEEDS.value}")
    seeds, scale_epochs, dice_epochs = _SEEDS.value, 3, 6
    mae_seeds, mae_epochs = _MAE_SEEDS.value, 6
    if _SMOKE.value:
        scales, seeds, scale_epochs, dice_epochs = scales[:2], min(seeds, 2), 1, 1
        mae_seeds, mae_epochs = 1, 1
    start = time.perf_counter()
    lines = []
    if "scales" in _PARTS.value:
        runs = ["Adam(1e-2)", "TKFAC()", "TKFAC(), bound in weighted units",
                "TKFAC(kl_clip=None)"]
        lines += ["", f"Digits classifier, {scale_epochs} epochs of 16 steps: "
                  "unweighted validation cross-entropy (lower is better).", "",
                  "| scale | weighted by | " + " | ".join(runs) + " |",
                  "|---:|---|" + "---:|" * len(runs)]
        for scale in scales:
            for how in ("sample_weight", "loss_weights"):
                cells = [f"{scale_run(label, scale, how, scale_epochs):.3f}"
                         for label in runs]
                lines.append(f"| {scale:g} | {how} | " + " | ".join(cells) + " |")
                print(lines[-1], flush=True)
    if "dice" in _PARTS.value:
        runs = ["TKFAC()", "TKFAC(), rounding 1e-6", "TKFAC(), per example Dice",
                "Adam(1e-2)"]
        lines += _seed_table(
            f"Dice() segmentation, {dice_epochs} epochs of 10 steps: best validation "
            f"Dice loss per seed; collapsed: above {COLLAPSED}.", runs, seeds,
            lambda label, seed: dice_run(label, seed, dice_epochs), "collapsed",
            lambda values: f"{sum(v > COLLAPSED for v in values)}", "{:.3f}")
    if "mae" in _PARTS.value:
        runs = ["TKFAC()", "TKFAC(), KL of its own curvature",
                "TKFAC(kl_clip=0.01), KL of its own curvature", "Adam(1e-2)",
                "Adam(1e-3)"]
        lines += _seed_table(
            f"Mean absolute error, {mae_epochs} epochs of 19 steps: validation MAE "
            "per seed (lower is better).", runs, mae_seeds,
            lambda label, seed: mae_run(label, seed, mae_epochs), "mean",
            lambda values: f"{np.mean(values):.4f}", "{:.4f}")
    lines += ["", f"{(time.perf_counter() - start) / 60:.1f} minutes in all."]
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
