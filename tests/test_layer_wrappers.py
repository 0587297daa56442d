"""Random augmentation layers, `SpectralNormalization`, `ConvLSTM2D` and
`class_weight` in `fit`: program shapes of the keras-io examples, against Adam's
training of the same program or an equivalent one."""

import numpy as np
import keras

import keras_tkfac

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _images(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, 8, 8, 3)).astype("float32")
    y = (x[:, :, :4].mean((1, 2, 3)) > x[:, :, 4:].mean((1, 2, 3))).astype("int32")
    return x, y


def _fit(model, optimizer, x, y, epochs=2, **kwargs):
    model.compile(optimizer=optimizer, loss=LOSS)
    return model.fit(x, y, batch_size=16, epochs=epochs, shuffle=False, verbose=0,
                     **kwargs)


def _covered(model):
    return sorted(type(slot.block.layer).__name__ for slot in model.optimizer._slots)


def _augmented():
    keras.utils.set_random_seed(0)
    layers = keras.layers
    return keras.Sequential([
        keras.Input((8, 8, 3)), layers.RandomFlip("horizontal", seed=1),
        layers.RandomRotation(0.2, seed=2), layers.RandomZoom(0.1, seed=3),
        layers.Dropout(0.2, seed=4), layers.Conv2D(4, 3, activation="relu"),
        layers.Flatten(), layers.Dense(2)])


def test_random_layers_draw_the_same_sequence_as_under_adam():
    # The products' and the damping's extra passes restore the seed generators, so
    # the augmentations (and dropout masks) a program sees are those Adam's
    # training sees: each random layer's state advanced once per step.
    x, y = _images()
    adam_model = _augmented()
    _fit(adam_model, keras.optimizers.Adam(1e-3), x, y)
    model = keras_tkfac.wrap(_augmented())
    history = _fit(model, keras_tkfac.TKFAC(seed=0), x, y)
    states = [v.numpy() for v in adam_model.non_trainable_variables]
    assert len(states) == 4
    for state, variable in zip(states, model.non_trainable_variables):
        np.testing.assert_array_equal(variable.numpy(), state)
    assert _covered(model) == ["Conv2D", "Dense"]
    assert np.all(np.isfinite(history.history["loss"]))


def test_spectral_normalization_preconditions_the_wrapped_layers():
    # Keras's `SpectralNormalization` assigns the normalised kernel to the wrapped
    # layer's kernel in the training pass and differentiates through the layer
    # alone: the wrapped `Conv2D` and `Dense` take their blocks, and the kernels
    # keep a spectral norm of one up to the last step's update, as under Adam.
    x, y = _images()
    layers = keras.layers

    def build():
        keras.utils.set_random_seed(0)
        return keras.Sequential([
            keras.Input((8, 8, 3)), layers.SpectralNormalization(layers.Conv2D(4, 3)),
            layers.Flatten(), layers.SpectralNormalization(layers.Dense(2))])

    model = keras_tkfac.wrap(build())
    history = _fit(model, keras_tkfac.TKFAC(seed=0), x, y, epochs=4)
    assert _covered(model) == ["Conv2D", "Dense"]
    losses = history.history["loss"]
    adam = _fit(build(), keras.optimizers.Adam(1e-3), x, y, epochs=4).history["loss"]
    assert losses[-1] < losses[0] and losses[-1] < adam[-1]
    for layer in (model.layers[0], model.layers[2]):
        kernel = layer.layer.kernel.numpy()
        norm = np.linalg.norm(kernel.reshape(-1, kernel.shape[-1]), 2)
        assert abs(norm - 1.0) < 0.05, (layer.name, norm)


def test_conv_lstm_takes_the_partner_and_trains(caplog):
    x, y = _images()
    layers = keras.layers

    def build():
        keras.utils.set_random_seed(0)
        return keras.Sequential([
            keras.Input((8, 8, 3)), layers.Reshape((4, 4, 4, 3)),
            layers.ConvLSTM2D(4, 3, padding="same"), layers.Flatten(),
            layers.Dense(2)])

    model = keras_tkfac.wrap(build())
    history = _fit(model, keras_tkfac.TKFAC(seed=0), x, y, epochs=4)
    assert _covered(model) == ["Dense"]
    assert "conv_lstm2d" in caplog.text and "first-order fallback" in caplog.text
    losses = history.history["loss"]
    adam = _fit(build(), keras.optimizers.Adam(1e-3), x, y, epochs=4).history["loss"]
    assert losses[-1] < losses[0] and losses[-1] < adam[-1]


def test_class_weight_trains_as_the_sample_weights_it_stands_for():
    # Keras turns `class_weight` into each example's sample weight; the Fisher,
    # the quadratic model and the damping's losses see those weights.
    x, y = _images()
    class_weight = {0: 1.0, 1: 3.0}

    def run(**kwargs):
        keras.utils.set_random_seed(0)
        model = keras_tkfac.wrap(keras.Sequential([
            keras.Input((8, 8, 3)), keras.layers.Flatten(),
            keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(2)]))
        _fit(model, keras_tkfac.TKFAC(seed=0), x, y, **kwargs)
        return [w.numpy() for w in model.weights]

    weighted = run(class_weight=class_weight)
    explicit = run(sample_weight=np.vectorize(class_weight.get)(y).astype("float32"))
    unweighted = run()
    for a, b in zip(weighted, explicit):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert max(np.abs(a - b).max() for a, b in zip(weighted, unweighted)) > 1e-3
