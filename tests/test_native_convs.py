"""Convolutions Keras runs through XLA, computed with TensorFlow's own ops
(`keras_tkfac.native_convs`): the same values and gradients as Keras's, and the
curvature products follow their kernels."""

from absl import logging
import numpy as np
import pytest
import tensorflow as tf
import keras

import keras_tkfac
from keras_tkfac import loss_specs
from keras_tkfac import native_convs
from keras_tkfac import products
from keras_tkfac import tangents
from tests import helpers

tangents.install_jvps()  # As the products do before their first pass.

# (input shape without the batch, kernel shape, strides, dilation, padding, format)
CASES = {
    # One input channel a group: a depthwise convolution.
    "depthwise_2d": ((6, 6, 4), (3, 3, 1, 4), 1, 1, "same", "channels_last"),
    "depthwise_2d_multiplier": ((7, 6, 3), (3, 3, 1, 6), 1, 1, "valid", "channels_last"),
    "depthwise_2d_stride": ((7, 7, 4), (3, 3, 1, 8), 2, 1, "same", "channels_last"),
    "depthwise_2d_dilated": ((8, 8, 2), (3, 3, 1, 2), 1, 2, "same", "channels_last"),
    "depthwise_1d": ((9, 3), (3, 1, 6), 1, 1, "same", "channels_last"),
    "depthwise_1d_stride": ((9, 4), (2, 1, 4), 2, 1, "valid", "channels_last"),
    # One convolution per group.
    "groups_2d": ((6, 6, 4), (3, 3, 2, 6), 1, 1, "same", "channels_last"),
    "groups_2d_dilated": ((9, 9, 4), (3, 3, 2, 4), 1, 2, "valid", "channels_last"),
    "groups_2d_unequal_strides": ((8, 7, 6), (3, 3, 2, 6), (2, 1), 1, "same",
                                  "channels_last"),
    "groups_1d": ((9, 6), (3, 2, 9), 1, 2, "same", "channels_last"),
    "groups_3d": ((4, 4, 3, 4), (2, 2, 2, 2, 4), 1, 1, "valid", "channels_last"),
    "groups_2d_channels_first": ((4, 6, 5), (3, 3, 2, 4), 1, 1, "same",
                                 "channels_first"),
    "depthwise_2d_channels_first": ((4, 6, 5), (3, 3, 1, 4), 2, 1, "same",
                                    "channels_first"),
    "conv3d_channels_first": ((2, 4, 5, 5), (3, 2, 3, 2, 3), 1, 1, "same",
                              "channels_first"),
    "groups_3d_channels_first": ((4, 4, 4, 3), (2, 2, 2, 2, 4), (1, 2, 1), 1, "same",
                                 "channels_first"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_convolution_and_its_gradients_equal_keras(case):
    # Oracle: Keras's own `ops.conv` (its nested XLA function) and its gradients.
    shape, kernel_shape, strides, dilation, padding, data_format = CASES[case]
    rank = len(kernel_shape) - 2
    assert native_convs.needs_xla((2, *shape), kernel_shape, data_format)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(2, *shape)).astype("float32"))
    kernel = tf.constant(rng.normal(size=kernel_shape).astype("float32"))
    strides = strides if isinstance(strides, tuple) else (strides,) * rank
    dilation = (dilation,) * rank

    def both(fn):
        with tf.GradientTape() as tape:
            tape.watch([x, kernel])
            out = fn()
            weights = tf.constant(rng.normal(size=out.shape).astype("float32"))
            loss = tf.reduce_sum(out * weights)
        return [out, *tape.gradient(loss, [x, kernel])]

    rng_state = rng.bit_generator.state
    found = both(lambda: native_convs.convolution(x, kernel, strides, padding,
                                                  dilation, data_format))
    rng.bit_generator.state = rng_state
    want = both(lambda: keras.ops.conv(x, kernel, strides=list(strides),
                                       padding=padding, dilation_rate=dilation,
                                       data_format=data_format))
    for got, expected in zip(found, want):
        assert got.shape == expected.shape
        np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-5,
                                   atol=1e-5)


def test_convolutions_keras_runs_natively_are_left_to_keras():
    x = tf.ones((1, 5, 5, 3))
    kernel = tf.ones((3, 3, 3, 2))
    assert not native_convs.needs_xla(x.shape, kernel.shape, "channels_last")
    np.testing.assert_array_equal(
        native_convs.convolution(x, kernel, 1, "same", 1, "channels_last"),
        keras.ops.conv(x, kernel, padding="same"))


class _OwnCall(keras.layers.Conv2D):
    def call(self, inputs):
        return super().call(inputs) * 2.0


def _grouped_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 6))
    h = keras.layers.Conv1D(6, 3, groups=3, padding="causal", activation="tanh",
                            name="causal")(inputs)
    h = keras.layers.Reshape((4, 2, 6))(h)
    h = keras.layers.Conv2D(12, 3, groups=6, padding="same", activation="relu",
                            name="depthwise")(h)
    h = _OwnCall(12, 1, groups=2, name="own_call")(h)
    h = keras.layers.Reshape((2, 4, 2, 6))(h)
    h = keras.layers.Conv3D(2, 2, data_format="channels_first", name="first_3d")(h)
    outputs = keras.layers.Dense(3, name="head")(keras.layers.Flatten()(h))
    return keras.Model(inputs, outputs)


def test_wrapped_layers_compute_as_keras_with_native_ops():
    model = _grouped_model()
    x = np.random.default_rng(1).normal(size=(4, 8, 6)).astype("float32")
    want = model(x).numpy()
    wrapped = keras_tkfac.wrap(_grouped_model())  # (finds the blocks)
    installed = {name: native_convs.installed(wrapped.get_layer(name))
                 for name in ("causal", "depthwise", "own_call", "first_3d", "head")}
    # A subclass with its own `call` keeps it (and Keras's convolution).
    assert installed == {"causal": True, "depthwise": True, "own_call": False,
                         "first_3d": True, "head": False}
    np.testing.assert_allclose(wrapped(x).numpy(), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(wrapped.predict(x, verbose=0), want, rtol=1e-5,
                               atol=1e-6)


def test_products_follow_grouped_kernels():
    # Oracle: (1 / B) sum_n J_n^T (2 / D) J_n for Keras's mean squared error, J_n by
    # reverse mode through Keras's own computation (an unwrapped twin, same
    # weights), against the wrapped model's products.
    rng = np.random.default_rng(2)
    x = tf.constant(rng.normal(size=(3, 8, 6)).astype("float32"))
    y = rng.normal(size=(3, 3)).astype("float32")
    twin = _grouped_model()
    model = keras_tkfac.wrap(_grouped_model())
    variables = [v for v in model.trainable_variables
                 if "own_call" not in v.path]  # (its kernel is read in XLA)
    directions = [[rng.normal(size=v.shape).astype("float32") for v in variables]
                  for _ in range(2)]
    outputs = loss_specs.resolve_losses("mse", "true", model(x))
    gram = tf.function(lambda: products.curvature_gram(
        lambda: model(x, training=True), outputs, y, None, variables, directions))()
    twin_variables = [v for v in twin.trainable_variables if "own_call" not in v.path]
    with tf.GradientTape(persistent=True) as tape:
        out = twin(x, training=True)
    jacobians = tape.jacobian(out, twin_variables, experimental_use_pfor=False)
    np.testing.assert_allclose(
        gram, helpers.mse_gauss_newton_gram(jacobians, directions), rtol=1e-4)


@pytest.mark.parametrize("eager", [False, True])
def test_the_quadratic_model_steps_grouped_layers(eager, caplog):
    """No layer of a wrapped grouped model takes the sibling step: the weights
    differ from those of `"graft"` steps throughout (one step, the same
    gradients), where Keras's nested XLA convolution made them equal (the sibling
    test in tests/test_tangents.py)."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 6, 6, 4)).astype("float32")
    y = rng.integers(0, 3, size=(8,))

    def weights(**options):
        keras.utils.set_random_seed(0)
        model = keras_tkfac.wrap(keras.Sequential([
            keras.Input((6, 6, 4)), keras.layers.Conv2D(4, 3, groups=2),
            keras.layers.Conv2D(4, 3, groups=4, activation="tanh"),
            keras.layers.Flatten(), keras.layers.Dense(3)]))
        model.compile(optimizer=keras_tkfac.TKFAC(seed=0, **options),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      run_eagerly=eager)
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        return [v.numpy() for v in model.trainable_variables]

    logging.set_verbosity(logging.WARNING)
    found = weights()
    assert not any("cannot follow" in r.getMessage() for r in caplog.records)
    default = keras_tkfac.TKFAC()
    graft = weights(step_control="graft",
                    trace_damping_scale=default.trace_damping_scale,
                    conv_damping_split=default.conv_damping_split)
    for got, want in zip(found, graft):
        assert np.all(np.isfinite(got))
        assert not np.allclose(got, want, rtol=1e-5, atol=1e-7)
