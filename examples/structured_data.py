"""Classifies tabular data (keras-io's "structured data classification" shape) with TKFAC.

A dict of named feature columns: numeric ones standardised by a `Normalization` layer,
categorical ones one-hot encoded by `CategoryEncoding`, then `Dense(32, relu)`,
`Dropout(0.5)` and a sigmoid, trained at Keras's default batch of 32. TKFAC fits a
table of a thousand rows in a few epochs, and then overfits while Adam is still
descending (`tools/small_data.py`; README, "Limitations"): so this example stops
early on the validation loss and restores the best weights, as such a program should
whatever its optimizer, and decays the learning rate to 0 over the epochs
(`CosineDecay`). Before 2026-12-07, at a constant rate and run for 30 epochs without
stopping, `TKFAC()`'s steps kept fitting the batches' noise on the synthetic table
until every ReLU of the hidden layer had died (validation loss 0.577-0.619 at three
seeds); the step's ceiling that follows the training loss (`keras_tkfac.progress`)
now stops that (0.40-0.49).

`--dataset=titanic` loads the Titanic passenger list (1,309 rows; survival from
class, sex, port, age, fare and family counts) with `tensorflow_datasets`, which
needs a download; `--dataset=synthetic` (the default, offline) makes a table with the
same columns and survival drawn from a logistic model of them.

    python examples/structured_data.py [--dataset=titanic] [--optimizer=adam]
        [--epochs=50] [--patience=5] [--schedule=constant]
"""

import sys

from absl import app
from absl import flags
import numpy as np
import keras

import keras_tkfac

_DATASET = flags.DEFINE_enum("dataset", "synthetic", ["synthetic", "titanic"], "Data set.")
_OPTIMIZER = flags.DEFINE_enum("optimizer", "tkfac", ["tkfac", "adam"], "Optimizer.")
_EPOCHS = flags.DEFINE_integer("epochs", 50, "Most epochs (keras-io's count).")
_PATIENCE = flags.DEFINE_integer(
    "patience", 5, "Epochs without a lower validation loss before stopping; 0: no "
    "early stopping.")
_SCHEDULE = flags.DEFINE_enum(
    "schedule", "cosine", ["cosine", "constant"],
    "Learning rate 1e-3 decayed to 0 over the epochs, or 1e-3 throughout.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the split, weights and batches.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Two epochs on the synthetic table.")

NUMERIC = ["age", "fare", "sibsp", "parch"]
CATEGORICAL = {"pclass": 3, "sex": 2, "embarked": 4}


def synthetic(rows=1309, seed=0):
    """A passenger table with Titanic's columns; survival from a logistic model."""
    rng = np.random.default_rng(seed)
    table = {
        "pclass": rng.choice(3, rows, p=[0.25, 0.21, 0.54]),
        "sex": rng.choice(2, rows, p=[0.36, 0.64]),
        "embarked": rng.choice(4, rows, p=[0.2, 0.1, 0.69, 0.01]),
        "age": np.clip(rng.normal(30, 14, rows), 0.2, 80),
        "sibsp": rng.poisson(0.5, rows),
        "parch": rng.poisson(0.4, rows),
    }
    table["fare"] = rng.lognormal(np.log([60.0, 20.0, 9.0])[table["pclass"]], 0.6)
    logit = (1.2 - 1.0 * table["pclass"] - 2.4 * table["sex"]
             - 0.02 * (table["age"] - 30) - 0.3 * np.maximum(table["sibsp"] - 1, 0)
             + 0.3 * (table["embarked"] == 0))
    survived = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype("float32")
    return {k: np.asarray(v, "float32" if k in NUMERIC else "int64")
            for k, v in table.items()}, survived


def titanic():
    """The passengers' numeric and categorical columns, and whether they survived."""
    try:
        import tensorflow_datasets as tfds

        features, survived = tfds.as_numpy(tfds.load(
            "titanic", split="train", as_supervised=True, batch_size=-1))
    except Exception as error:  # ImportError, or any download failure.
        reason = f"{type(error).__name__}: {error}".splitlines()[0][:100]
        sys.exit(f"Cannot load 'titanic' with tensorflow_datasets ({reason}); "
                 "use --dataset=synthetic (offline).")
    table = {k: np.asarray(features[k], "float32") for k in NUMERIC}
    table.update({k: np.asarray(features[k], "int64") for k in CATEGORICAL})
    return table, np.asarray(survived, "float32")


def build_model(train):
    """keras-io's structured-data classifier for the columns of `train`."""
    inputs, encoded = {}, []
    for name in NUMERIC:
        inputs[name] = keras.Input((1,), name=name)
        norm = keras.layers.Normalization()
        norm.adapt(train[name][:, None])
        encoded.append(norm(inputs[name]))
    for name, classes in CATEGORICAL.items():
        inputs[name] = keras.Input((1,), name=name, dtype="int64")
        encoded.append(keras.layers.CategoryEncoding(classes, output_mode="one_hot")(
            inputs[name]))
    h = keras.layers.Dense(32, activation="relu")(keras.layers.Concatenate()(encoded))
    h = keras.layers.Dropout(0.5)(h)
    return keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(h))


def main(argv):
    del argv
    if _EPOCHS.value < 1:
        raise ValueError(f"--epochs must be at least 1. Received: {_EPOCHS.value}")
    if _PATIENCE.value < 0:
        raise ValueError(f"--patience must be at least 0. Received: {_PATIENCE.value}")
    smoke = _SMOKE.value
    table, survived = titanic() if _DATASET.value == "titanic" and not smoke else (
        synthetic(seed=_SEED.value))
    order = np.random.default_rng(_SEED.value).permutation(len(survived))
    cut = int(0.8 * len(order))
    train = {k: v[order[:cut]] for k, v in table.items()}
    val = {k: v[order[cut:]] for k, v in table.items()}
    y_train, y_val = survived[order[:cut]], survived[order[cut:]]

    keras.utils.set_random_seed(_SEED.value)
    model = keras_tkfac.wrap(build_model(train))
    epochs = 2 if smoke else _EPOCHS.value
    learning_rate = 1e-3
    if _SCHEDULE.value == "cosine":
        learning_rate = keras.optimizers.schedules.CosineDecay(
            1e-3, epochs * -(-cut // 32))
    optimizer = (keras_tkfac.TKFAC(learning_rate, seed=_SEED.value)
                 if _OPTIMIZER.value == "tkfac" else keras.optimizers.Adam(learning_rate))
    model.compile(optimizer=optimizer, loss="binary_crossentropy", metrics=["accuracy"])
    callbacks = []
    if _PATIENCE.value:
        callbacks.append(keras.callbacks.EarlyStopping(
            patience=_PATIENCE.value, restore_best_weights=True))
    history = model.fit(
        {k: v[:, None] for k, v in train.items()}, y_train[:, None], batch_size=32,
        epochs=epochs, validation_data=({k: v[:, None] for k, v in val.items()},
                                        y_val[:, None]),
        callbacks=callbacks, verbose=2)
    loss, accuracy = model.evaluate({k: v[:, None] for k, v in val.items()},
                                    y_val[:, None], verbose=0)
    print(f"{_OPTIMIZER.value}: {len(history.history['loss'])} epochs, validation loss "
          f"{loss:.4f}, validation accuracy {accuracy:.4f}")


if __name__ == "__main__":
    app.run(main)
