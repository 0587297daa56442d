"""The problem shared by the multi-worker workers and their single-process reference."""

import numpy as np
import tensorflow as tf
import keras

import keras_tkfac

EPOCHS = 3
GLOBAL_BATCH = 32


def dataset():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 8)).astype("float32")
    y = rng.integers(0, 3, size=(128,)).astype("int32")
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)


def model():
    keras.utils.set_random_seed(0)
    wrapped = keras_tkfac.wrap(keras.Sequential([
        keras.Input((8,)),
        keras.layers.Dense(16, activation="tanh"),
        keras.layers.Dense(3),
    ]))
    wrapped.compile(
        optimizer=keras_tkfac.TKFAC(fisher="empirical", factor_update_freq=2,
                                    inverse_update_freq=3, seed=0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return wrapped
