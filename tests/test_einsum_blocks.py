"""`EinsumDense` equations whose operands are not in the block's matrix order.

`EinsumDenseBlock` covers any equation that is a dense map (each axis in exactly two
of the input, kernel and output) by transposing the rows and the gradients to
`[rows, d_in]`, `[d_in, d_out]` and `[rows, d_out]`. The oracles: the same function
written in the canonical order (a kernel transposed, or `Permute` around a `Dense`)
trains to the same weights, and the layout maps are each other's inverses.
(`tests/test_capture.py` checks the rows against Keras's gradients for these cases.)
"""

import numpy as np
import pytest
import tensorflow as tf
import keras

import keras_tkfac
from keras_tkfac import blocks

from tests import test_capture


def _head(x):
    return keras.layers.Dense(3)(keras.layers.Flatten()(x))


def _fit(model, x, y, steps=3):
    model = keras_tkfac.wrap(model)
    model.compile(optimizer=keras_tkfac.TKFAC(seed=0),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=8, epochs=steps, shuffle=False, verbose=0)
    return model


def _trained_twins(model_a, model_b, x, y, weights):
    """Checks that the two models compute the same function, trains both, and
    returns their weights after training (`weights`: `model_a`'s before)."""
    np.testing.assert_allclose(model_a(x).numpy(), model_b(x).numpy(), rtol=1e-5,
                               atol=1e-6)
    _fit(model_a, x, y)
    _fit(model_b, x, y)
    after_a, after_b = model_a.get_weights(), model_b.get_weights()
    assert not np.allclose(after_a[0], weights[0])
    return after_a, after_b


def _data(shape, n=8, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, *shape)).astype("float32"),
            rng.integers(0, 3, size=(n,)))


@pytest.mark.parametrize("case", ["einsum_heads", "einsum_output_projection",
                                  "einsum_kernel_order", "einsum_middle_axis",
                                  "einsum_new_axes_order"])
def test_split_matrix_inverts_grad_matrix(case):
    shape, make_layer = test_capture.CASES[case]
    layer = make_layer()
    layer.build((None, *shape))
    block = blocks.EinsumDenseBlock(layer)
    rng = np.random.default_rng(0)
    kernel = tf.constant(rng.normal(size=layer.kernel.shape), tf.float32)
    bias = tf.constant(rng.normal(size=layer.bias.shape), tf.float32)
    matrix = block.grad_matrix(kernel, bias)
    assert matrix.shape == (block.d_in, block.d_out)
    kernel_back, bias_back = block.split_matrix(matrix)
    np.testing.assert_array_equal(kernel_back.numpy(), kernel.numpy())
    np.testing.assert_array_equal(bias_back.numpy(), bias.numpy())


def test_permuted_equations_are_covered():
    # keras_tkfac's probes: `bkh,hkc->bc` once took the first-order fallback.
    for equation, output_shape, bias_axes in (("bkh,hkc->bc", 5, "c"),
                                              ("bth,tk->bkh", (5, 4), "k")):
        layer = keras.layers.EinsumDense(equation, output_shape=output_shape,
                                         bias_axes=bias_axes)
        model = keras_tkfac.wrap(keras.Sequential([keras.Input((3, 4)), layer,
                                                   keras.layers.Flatten(),
                                                   keras.layers.Dense(2)]))
        assert layer in [b.layer for b in model.blocks]
        assert not blocks.EinsumDenseBlock(layer).canonical


def test_contracted_axes_in_another_order_train_as_the_transposed_kernel():
    # `abc,cbd->ad` with kernel K is `abc,bcd->ad` with K transposed to `bcd`: the
    # same function, and the same TKFAC steps (the latter is in canonical order).
    x, y = _data((3, 4))
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3, 4))
    permuted = keras.layers.EinsumDense("abc,cbd->ad", output_shape=5, bias_axes="d",
                                        activation="tanh")
    model_a = keras.Model(inputs, _head(permuted(inputs)))
    inputs = keras.Input((3, 4))
    canonical = keras.layers.EinsumDense("abc,bcd->ad", output_shape=5, bias_axes="d",
                                         activation="tanh")
    model_b = keras.Model(inputs, _head(canonical(inputs)))
    weights = model_a.get_weights()
    model_b.set_weights([np.transpose(weights[0], (1, 0, 2))] + weights[1:])
    assert blocks.EinsumDenseBlock(canonical).canonical
    after_a, after_b = _trained_twins(model_a, model_b, x, y, weights)
    np.testing.assert_allclose(np.transpose(after_a[0], (1, 0, 2)), after_b[0],
                               rtol=1e-4, atol=1e-6)
    for a, b in zip(after_a[1:], after_b[1:]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_a_dense_map_over_a_middle_axis_trains_as_permute_dense_permute():
    # MLP-Mixer's token mixing: `abc,bd->adc` is `Permute`, `Dense` over the last
    # axis, `Permute` back; its rows are the (example, channel) pairs.
    x, y = _data((3, 4))
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3, 4))
    mixing = keras.layers.EinsumDense("abc,bd->adc", output_shape=(5, 4), bias_axes="d")
    model_a = keras.Model(inputs, _head(mixing(inputs)))
    inputs = keras.Input((3, 4))
    dense = keras.layers.Dense(5)
    h = keras.layers.Permute((2, 1))(dense(keras.layers.Permute((2, 1))(inputs)))
    model_b = keras.Model(inputs, _head(h))
    weights = model_a.get_weights()
    assert weights[1].shape == (5, 1)  # Keras's bias spans `dc`, 1 along `c`
    model_b.set_weights([weights[0], weights[1].reshape(5)] + weights[2:])
    after_a, after_b = _trained_twins(model_a, model_b, x, y, weights)
    np.testing.assert_allclose(after_a[0], after_b[0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(after_a[1].reshape(5), after_b[1], rtol=1e-4, atol=1e-6)
    for a, b in zip(after_a[2:], after_b[2:]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("case", ["einsum_middle_axis", "einsum_new_axes_order"])
def test_sequence_rows_of_permuted_equations_give_each_examples_gradient(case):
    # With `B` axes besides the batch, each example's rows `a_n^T g_n` are its
    # gradient of the layer's weights (Keras's), as for `Dense` on sequences.
    model, layer, _, x, y, tape, recording, y_pred, _ = test_capture._recorded(case, 2)
    block, a, g, m = test_capture._block_rows(model, layer, tape, recording, y, y_pred,
                                              sequences=True)
    assert a.ndim == 3 and a.shape[0] == m and a.shape[2] == block.d_in
    for n in range(m):
        np.testing.assert_allclose(
            a[n].T @ g[n], test_capture._example_gradient(model, block, x, y, n),
            rtol=1e-4, atol=1e-6)


def test_a_lora_enabled_permuted_equation_takes_the_fallback(caplog):
    layer = keras.layers.EinsumDense("abc,cbd->ad", output_shape=5, bias_axes="d")
    model = keras.Sequential([keras.Input((3, 4)), layer, keras.layers.Dense(2)])
    layer.enable_lora(2)
    wrapped = keras_tkfac.wrap(model)
    assert layer not in [b.layer for b in wrapped.blocks]
    assert any(layer.name in r.getMessage() and "LoRA" in r.getMessage()
               for r in caplog.records)
