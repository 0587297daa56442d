"""SeparableConv1D and SeparableConv2D: the pointwise kernel and bias are a 1x1
convolution block over the recorded depthwise output; the depthwise kernel takes the
first-order fallback."""

import numpy as np
import pytest
import tensorflow as tf
import keras

import keras_tkfac
from keras_tkfac import factored
from tests import helpers

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _model(rank=2, channels=3, **conv_args):
    keras.utils.set_random_seed(0)
    conv_args.setdefault("depth_multiplier", 2)
    layer = (keras.layers.SeparableConv2D if rank == 2
             else keras.layers.SeparableConv1D)
    spatial = (6, 7)[2 - rank:]
    shape = ((channels, *spatial) if conv_args.get("data_format") == "channels_first"
             else (*spatial, channels))
    return keras_tkfac.wrap(keras.Sequential([
        keras.Input(shape),
        layer(4, 3, activation="tanh", **conv_args),
        keras.layers.Flatten(),
        keras.layers.Dense(3),
    ]))


def _data(rank, n=4, seed=0, channels_first=False):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6, 7, 3) if rank == 2 else (n, 7, 3)).astype("float32")
    if channels_first:
        x = np.moveaxis(x, -1, 1)
    return x, rng.integers(0, 3, size=(n,))


@pytest.mark.parametrize("rank", [2, 1])
@pytest.mark.parametrize("conv_args", [
    dict(padding="valid"), dict(padding="same", strides=2),
    dict(padding="same", dilation_rate=2, use_bias=False),
    dict(padding="same", data_format="channels_first")])
def test_rows_reproduce_keras_pointwise_gradient(conv_args, rank):
    x, y = _data(rank, channels_first=conv_args.get("data_format") == "channels_first")
    model = _model(rank=rank, **conv_args)
    block, a, g, m, expected = helpers.recorded_rows(model, x, y)
    layer = model.layers[0]
    assert block.variables == [v for v in (layer.pointwise_kernel, layer.bias)
                               if v is not None]
    assert a.shape[1] == 3 * 2 + conv_args.get("use_bias", True) and g.shape[1] == 4
    np.testing.assert_allclose(a.astype(np.float64).T @ g / m, expected, rtol=1e-4,
                               atol=1e-6)
    kernel, bias = block.split_matrix(tf.constant(expected))
    np.testing.assert_allclose(block.grad_matrix(kernel, bias).numpy(), expected)
    assert factored.exact(block)


@pytest.mark.parametrize("rank", [2, 1])
@pytest.mark.parametrize("conv_args", [
    dict(padding="same", strides=2), dict(dilation_rate=2, depth_multiplier=1),
    dict(data_format="channels_first")])
def test_recorded_call_is_the_layers_output_and_gradient(conv_args, rank):
    # The block recomputes the layer (depthwise, then pointwise): the same output,
    # and the same gradient for all three variables, the depthwise kernel included.
    x, _ = _data(rank, n=8,
                 channels_first=conv_args.get("data_format") == "channels_first")
    model = _model(rank=rank, **conv_args)
    layer = model.layers[0]
    with tf.GradientTape(persistent=True) as tape:
        expected = layer(x)
        with keras_tkfac.record(model):
            recorded = layer(x)
        loss_expected = tf.reduce_sum(tf.sin(expected))
        loss_recorded = tf.reduce_sum(tf.sin(recorded))
    np.testing.assert_allclose(recorded.numpy(), expected.numpy(), rtol=1e-5,
                               atol=1e-6)
    for v in layer.trainable_variables:
        np.testing.assert_allclose(tape.gradient(loss_recorded, v).numpy(),
                                   tape.gradient(loss_expected, v).numpy(),
                                   rtol=1e-4, atol=1e-6, err_msg=v.path)


def test_a_pointwise_regularizer_turns_the_factored_form_off():
    keras.utils.set_random_seed(0)
    model = keras_tkfac.wrap(keras.Sequential([
        keras.Input((6, 7, 3)),
        keras.layers.SeparableConv2D(4, 3, pointwise_regularizer="l2"),
        keras.layers.Flatten(), keras.layers.Dense(3)]))
    assert not factored.exact(model.blocks[0])
    assert factored.exact(model.blocks[1])


@pytest.mark.parametrize("rank", [2, 1])
@pytest.mark.parametrize("cls", helpers.TKFAC_THEN_KFAC)
def test_separable_model_trains_with_its_depthwise_kernel_on_the_fallback(cls, rank):
    x, y = helpers.channel_sign_task(rank)
    model = _model(rank=rank)
    model.compile(optimizer=cls(seed=0), loss=LOSS, metrics=["accuracy"])
    depthwise = model.layers[0].depthwise_kernel
    before = depthwise.numpy()
    history = model.fit(x, y, batch_size=32, epochs=10, verbose=0)
    # Measured (last epoch's accuracy, 2-D / 1-D): TKFAC 0.96 / 0.85, KFAC 0.98 /
    # 0.88; TKFAC with the separable layer on the fallback 0.93 / 0.67; Adam(1e-2)
    # 0.91 / 0.71, Adam(1e-3) 0.44 / 0.36.
    assert history.history["accuracy"][-1] > (0.9 if rank == 2 else 0.8)
    optimizer = model.optimizer
    assert optimizer._slots[0].inverses[0].shape[-1] in (4, 7)
    index = optimizer._get_variable_index(depthwise)
    assert optimizer._partner_slots[index] is not None
    assert not np.allclose(depthwise.numpy(), before)
