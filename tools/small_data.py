"""Small data sets at Keras's default batch of 32: when `TKFAC()` fits, and when it overfits.

keras-io's structured-data and small-image examples train a few hundred examples for
tens of epochs at batch 32. `TKFAC()` fits the training examples in far fewer epochs
than Adam, so on such a data set its validation loss is lowest early and then rises
while Adam's is still falling; and where the labels carry little signal, its steps
fit each batch's noise. This tool trains each program from the same weights on the
same batches with Adam at `--adam` learning rates and `TKFAC()`, and `TKFAC()` once
more with its learning rate decayed from the default 1e-3 to 0 over the run
(`keras.optimizers.schedules.CosineDecay`: the quadratic model's step times a factor
falling to 0) and once with `keras.callbacks.EarlyStopping(patience=5,
restore_best_weights=True)`, and prints per run the best validation loss with its epoch (1-based), the last
epoch's validation loss, and the last training loss on all training examples
(inference mode).

Programs (offline data the tool makes):
- `structured`: keras-io's "structured data classification" shape: 303 rows (242
  trained, 61 held out) of six numeric features (a `Normalization` layer) and three
  categorical ones (`CategoryEncoding`, multi-hot), `Dense(32, relu)`, `Dropout(0.5)`,
  a sigmoid output, binary cross-entropy; labels drawn from a logistic model of the
  features (so the best validation loss is far from zero);
- `hashed_logistic`: a logistic regression (one `Dense(2)`) on hashed and discretised
  integer features, multi-hot; the label, the parity of the first integer, is lost by
  the hashing, so the model can only memorise its 256 training rows (64 held out);
- `weak_image`: 16x16 random images, the label whether the left half is brighter,
  `Conv2D` -> `SeparableConv2D` -> `GlobalAveragePooling2D` -> `Dense(2)` (256
  trained, 64 held out): a signal that a network of this shape learns slowly.

    python tools/small_data.py [--programs=structured,...] [--seeds=0,1,2]
        [--epochs=50] [--adam=1e-3,1e-2] [--output=small_data.md] [--smoke]
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
_EPOCHS = flags.DEFINE_integer("epochs", 50, "Epochs of batch 32 (keras-io's count).")
_ADAM = flags.DEFINE_list("adam", ["1e-3", "1e-2"], "Adam's learning rates.")
_OUTPUT = flags.DEFINE_string("output", None, "Write the table (markdown) here.")
_SMOKE = flags.DEFINE_bool("smoke", False, "One program, one seed, two epochs.")

STOPPED = "TKFAC() + EarlyStopping"
COSINE = "TKFAC(CosineDecay)"


def structured(rng):
    n = 303
    numeric = (rng.normal(size=(n, 6)) * rng.uniform(1, 50, 6)
               + rng.uniform(0, 100, 6)).astype("float32")
    categorical = rng.integers(0, 4, (n, 3))
    standard = (numeric - numeric.mean(0)) / numeric.std(0)
    logit = (0.8 * standard @ rng.normal(size=6)
             + np.array([0.5, -0.5, 1.0, -1.0])[categorical[:, 0]]
             + 0.6 * (categorical[:, 1] == 2))
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype("float32")[:, None]
    order = rng.permutation(n)
    numeric, categorical, y = numeric[order], categorical[order], y[order]
    norm = layers.Normalization()
    norm.adapt(numeric[:242])
    a, c = keras.Input((6,)), keras.Input((3,), dtype="int64")
    h = layers.Concatenate()([
        norm(a), layers.CategoryEncoding(12, output_mode="multi_hot")(
            c + np.array([0, 4, 8]))])
    h = layers.Dropout(0.5)(layers.Dense(32, activation="relu")(h))
    model = keras.Model([a, c], layers.Dense(1, activation="sigmoid")(h))
    return model, [numeric, categorical], y, "binary_crossentropy", 242


def hashed_logistic(rng):
    x = rng.integers(0, 1000, (320, 3))
    y = (x[:, 0] % 2).astype("int32")
    inputs = keras.Input((3,), dtype="int64")
    hashed = layers.CategoryEncoding(32, output_mode="multi_hot")(layers.Hashing(32)(inputs))
    binned = layers.CategoryEncoding(4, output_mode="multi_hot")(
        layers.Discretization(bin_boundaries=[250, 500, 750])(inputs))
    model = keras.Model(inputs, layers.Dense(2)(layers.Concatenate()([hashed, binned])))
    return model, x, y, keras.losses.SparseCategoricalCrossentropy(from_logits=True), 256


def weak_image(rng):
    x = rng.random((320, 16, 16, 3)).astype("float32")
    y = (x[:, :, :8].mean((1, 2, 3)) > x[:, :, 8:].mean((1, 2, 3))).astype("int32")
    model = keras.Sequential([
        keras.Input((16, 16, 3)), layers.Conv2D(8, 3, activation="relu"),
        layers.SeparableConv2D(8, 3), layers.GlobalAveragePooling2D(), layers.Dense(2)])
    return model, x, y, keras.losses.SparseCategoricalCrossentropy(from_logits=True), 256


PROGRAMS = {f.__name__: f for f in (structured, hashed_logistic, weak_image)}


def _split(x, rows):
    if isinstance(x, list):
        return [v[:rows] for v in x], [v[rows:] for v in x]
    return x[:rows], x[rows:]


def run(label, name, seed, epochs):
    """`(best validation loss, its epoch, last validation loss, last training loss,
    epochs run)`."""
    keras.utils.set_random_seed(seed)
    model, x, y, loss, rows = PROGRAMS[name](np.random.default_rng(seed))
    callbacks = []
    if label.startswith("Adam"):
        optimizer = keras.optimizers.Adam(float(label[5:-1]))
    else:
        model = keras_tkfac.wrap(model)
        learning_rate = None
        if label == COSINE:  # from the default 1e-3 to 0 over the run
            steps = epochs * -(-rows // 32)
            learning_rate = keras.optimizers.schedules.CosineDecay(1e-3, steps)
        optimizer = keras_tkfac.TKFAC(learning_rate, seed=seed)
        if label == STOPPED:
            callbacks = [keras.callbacks.EarlyStopping(patience=5,
                                                       restore_best_weights=True)]
    model.compile(optimizer=optimizer, loss=loss)
    (x_train, x_val), (y_train, y_val) = _split(x, rows), _split(y, rows)
    history = model.fit(x_train, y_train, validation_data=(x_val, y_val), batch_size=32,
                        epochs=epochs, shuffle=False, verbose=0, callbacks=callbacks)
    values = np.array(history.history["val_loss"])
    if not np.all(np.isfinite(values)):
        return (float("nan"),) * 4 + (len(values),)
    last = float(model.evaluate(x_val, y_val, verbose=0))  # the restored weights'
    train = float(model.evaluate(x_train, y_train, verbose=0))
    return float(values.min()), int(values.argmin()) + 1, last, train, len(values)


def main(argv):
    del argv
    tf.get_logger().setLevel("ERROR")
    logging.set_verbosity(logging.ERROR)
    names = benchlib.program_arguments(_PROGRAMS.value, PROGRAMS, _ADAM.value)
    if _EPOCHS.value < 1:
        raise ValueError(f"--epochs must be at least 1. Received: {_EPOCHS.value}")
    seeds, epochs = [int(s) for s in _SEEDS.value], _EPOCHS.value
    if _SMOKE.value:
        names, seeds, epochs = names[:1], seeds[:1], 2
    runs = [f"Adam({rate})" for rate in _ADAM.value] + ["TKFAC()", COSINE, STOPPED]
    start = time.perf_counter()
    lines = [
        f"`python tools/small_data.py --programs={','.join(names)} "
        f"--seeds={','.join(map(str, seeds))} --epochs={epochs} "
        f"--adam={','.join(_ADAM.value)}`", "",
        "Each cell: best validation loss (its epoch) / the validation loss at the end "
        "(with early stopping: of the restored weights, and the epochs run) / the "
        "training loss at the end. Same weights and batches in every run of a row.", "",
        "| program | seed | " + " | ".join(runs) + " |",
        "|---|---:|" + "---|" * len(runs)]
    counts = {"best": 0, "last": 0, "cosine": 0, "stopped": 0, "rows": 0}
    for name in names:
        for seed in seeds:
            found = [run(label, name, seed, epochs) for label in runs]
            cells = []
            for label, (best, epoch, last, train, ran) in zip(runs, found):
                suffix = f", {ran} epochs" if label == STOPPED else ""
                cells.append(f"{best:.4g} ({epoch}) / {last:.4g}{suffix} / {train:.4g}")
            adam_best = min(r[0] for r in found[:len(_ADAM.value)])
            adam_last = min(r[2] for r in found[:len(_ADAM.value)])
            counts["rows"] += 1
            counts["best"] += found[-3][0] <= adam_best
            counts["last"] += found[-3][2] <= adam_last
            counts["cosine"] += found[-2][2] <= adam_last
            counts["stopped"] += found[-1][2] <= adam_last
            lines.append(f"| {name} | {seed} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    benchlib.finish_table(
        lines, f"Of {counts['rows']} runs, `TKFAC()`'s best validation loss was at "
        f"most the best Adam's on {counts['best']}; its last epoch's at most the best "
        f"Adam's last on {counts['last']}; with the cosine decay on {counts['cosine']}; "
        f"with early stopping on {counts['stopped']}.", start, _OUTPUT.value)


if __name__ == "__main__":
    app.run(main)
