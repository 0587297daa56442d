"""DepthwiseConv2D and DepthwiseConv1D: one Fisher block per channel, oracles as for
the other blocks."""

import numpy as np
import pytest
import tensorflow as tf
import keras

import keras_tkfac
from keras_tkfac import ops
from tests import helpers

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _model(channels=3, rank=2, **conv_args):
    keras.utils.set_random_seed(0)
    layer = (keras.layers.DepthwiseConv2D if rank == 2 else keras.layers.DepthwiseConv1D)
    return keras_tkfac.wrap(keras.Sequential([
        keras.Input((6, 7, channels)[2 - rank:]),
        layer(3, depth_multiplier=2, activation="tanh", **conv_args),
        keras.layers.Flatten(),
        keras.layers.Dense(3),
    ]))


def _rows(model, x, y):
    block, a, g, m, expected = helpers.recorded_rows(model, x, y)
    return block, a.astype(np.float64), g.astype(np.float64), m, expected


@pytest.mark.parametrize("rank", [2, 1])
@pytest.mark.parametrize("conv_args", [
    dict(padding="valid"), dict(padding="same", strides=2),
    dict(padding="same", dilation_rate=2, use_bias=False)])
def test_rows_reproduce_keras_gradient_per_channel(conv_args, rank):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 6, 7, 3)[:2 + rank] if rank == 2 else (4, 7, 3)).astype(
        "float32")
    y = rng.integers(0, 3, size=(4,))
    block, a, g, m, expected = _rows(_model(rank=rank, **conv_args), x, y)
    assert a.shape[1] == 3 and g.shape[1:] == (3, 2)
    np.testing.assert_allclose(np.einsum("rgi,rgo->gio", a, g) / m, expected,
                               rtol=1e-4, atol=1e-6)
    kernel, bias = block.split_matrix(tf.constant(expected))
    np.testing.assert_allclose(block.grad_matrix(kernel, bias).numpy(), expected)


def test_grouped_statistics_are_the_per_channel_statistics():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 6, 7, 3)).astype("float32")
    y = rng.integers(0, 3, size=(4,))
    _, a, g, m, _ = _rows(_model(), x, y)
    delta, n_phi, n_psi = ops.tkfac_statistics_grouped(tf.constant(a), tf.constant(g), m)
    a_factor, g_factor = ops.kfac_statistics_grouped(tf.constant(a), tf.constant(g), m)
    for c in range(3):
        ref = helpers.tkfac_numpy(a[:, c], g[:, c], m)
        np.testing.assert_allclose(delta[c].numpy(), ref[0], rtol=1e-10)
        np.testing.assert_allclose(n_phi[c].numpy(), ref[1], rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(n_psi[c].numpy(), ref[2], rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(a_factor[c].numpy(), a[:, c].T @ a[:, c] / m)
        np.testing.assert_allclose(g_factor[c].numpy(), g[:, c].T @ g[:, c] / len(g))
    # Damping and preconditioning per channel equal the ungrouped math channel by
    # channel (trace-relative damping per channel, as for any conv block).
    damping = ops.trace_relative_damping(delta, 10 * 2, 1e-3)
    left, right = ops.tkfac_damped_factors(delta, n_phi, n_psi, damping)
    grad = rng.normal(size=(3, 10, 2))
    update = ops.precondition(ops.symmetric_inverse(left)[0], tf.constant(grad),
                              ops.symmetric_inverse(right)[0]).numpy()
    for c in range(3):
        ref_left, ref_right = helpers.tkfac_damped_numpy(
            delta[c].numpy(), n_phi[c].numpy(), n_psi[c].numpy(),
            max(delta[c].numpy(), 1e-3) / 20)
        np.testing.assert_allclose(
            update[c], helpers.kron_solve(ref_left, ref_right, grad[c]), rtol=1e-7,
            atol=1e-9)


@pytest.mark.parametrize("rank", [2, 1])
@pytest.mark.parametrize("cls", helpers.TKFAC_THEN_KFAC)
def test_depthwise_model_trains(cls, rank):
    x, y = helpers.channel_sign_task(rank)
    model = _model(rank=rank)
    # The 1-D case (7 positions, added later) at the default step control; under
    # `"trust_region"` it reached 0.88 (TKFAC) and 0.98 (KFAC) in these 10 epochs
    # (Adam(1e-2) 0.85).
    control = {"step_control": "trust_region"} if rank == 2 else {}
    model.compile(optimizer=cls(seed=0, **control), loss=LOSS, metrics=["accuracy"])
    history = model.fit(x, y, batch_size=32, epochs=10, verbose=0)
    assert history.history["accuracy"][-1] > 0.9
    taps = 9 if rank == 2 else 3
    assert model.optimizer._slots[0].inverses[0].shape == (3, taps + 1, taps + 1)
    report = model.optimizer.curvature_report()
    assert np.isfinite(report[model.blocks[0].name]["cond_left"])


@pytest.mark.parametrize("cls", [keras_tkfac.TKFAC, keras_tkfac.KFAC])
def test_one_input_channel_is_one_ungrouped_block(cls):
    # One channel is one block: 2-D rows, as for an ordinary convolution.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 6, 7, 1)).astype("float32")
    y = (x.mean(axis=(1, 2, 3)) > 0).astype("int32")
    block, a, g, m, expected = _rows(_model(channels=1), x[:4], y[:4])
    assert a.shape[1:] == (10,) and g.shape[1:] == (2,)
    np.testing.assert_allclose(a.T @ g / m, expected, rtol=1e-4, atol=1e-6)
    model = _model(channels=1)
    model.compile(optimizer=cls(seed=0, factor_update_freq=1, inverse_update_freq=2),
                  loss=LOSS)
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert model.optimizer._slots[0].inverses[0].shape == (10, 10)
