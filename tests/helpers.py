"""Shared test oracles: exact numpy Fisher blocks, numpy K-FAC/TKFAC, tiny models."""

import numpy as np
import tensorflow as tf
import keras

import keras_tkfac
from keras_tkfac import fisher

RNG = np.random.default_rng(0)


def tkfac_numpy(a, g, num_examples):
    """`(delta, n_phi, n_psi)` computed with plain numpy loops over rows."""
    delta = 0.0
    n_phi = np.zeros((a.shape[1], a.shape[1]))
    n_psi = np.zeros((g.shape[1], g.shape[1]))
    for a_r, g_r in zip(a.astype(np.float64), g.astype(np.float64)):
        delta += (a_r @ a_r) * (g_r @ g_r)
        n_phi += (g_r @ g_r) * np.outer(a_r, a_r)
        n_psi += (a_r @ a_r) * np.outer(g_r, g_r)
    return delta / num_examples, n_phi / num_examples, n_psi / num_examples


def exact_fisher(a, g, example_of_row, num_examples, cross_locations=False):
    """The Fisher block `E_n[...]` over examples, in the `vec(g a^T)` ordering.

    With `cross_locations=False` this is the location-uncorrelated block
    `E_n[sum_t (a a^T) ⊗ (g g^T)]`; with `True` the exact block
    `E_n[(sum_t a ⊗ g)(sum_t a ⊗ g)^T]`.
    """
    a = a.astype(np.float64)
    g = g.astype(np.float64)
    dim = a.shape[1] * g.shape[1]
    fisher = np.zeros((dim, dim))
    if cross_locations:
        for n in range(num_examples):
            rows = example_of_row == n
            v = sum(np.kron(a_r, g_r) for a_r, g_r in zip(a[rows], g[rows]))
            fisher += np.outer(v, v)
    else:
        for a_r, g_r in zip(a, g):
            fisher += np.kron(np.outer(a_r, a_r), np.outer(g_r, g_r))
    return fisher / num_examples


def partial_traces(fisher, d_in, d_out):
    """`(tr_out F, tr_in F)`: the `[d_in, d_in]` and `[d_out, d_out]` partial traces."""
    blocks = fisher.reshape(d_in, d_out, d_in, d_out)
    return np.einsum("ijkj->ik", blocks), np.einsum("ijik->jk", blocks)


def tkfac_damped_numpy(delta, n_phi, n_psi, damping):
    phi = n_phi / delta
    psi = n_psi / delta
    root = np.sqrt(damping)
    return (
        np.sqrt(delta) * phi + root * np.eye(len(phi)),
        np.sqrt(delta) * psi + root * np.eye(len(psi)),
    )


def kfac_damped_numpy(a_factor, g_factor, damping):
    pi = np.sqrt(
        (np.trace(a_factor) / len(a_factor)) / (np.trace(g_factor) / len(g_factor))
    )
    root = np.sqrt(damping)
    return (
        a_factor + pi * root * np.eye(len(a_factor)),
        g_factor + root / pi * np.eye(len(g_factor)),
    )


def kron_solve(left, right, grad_matrix):
    """`(left ⊗ right)^{-1} vec(G^T)`, returned as a `[d_in, d_out]` matrix.

    `vec` stacks the columns of the `[d_out, d_in]` matrix `G^T`, matching the Fisher
    ordering `vec(g a^T) = a ⊗ g`.
    """
    d_in, d_out = grad_matrix.shape
    v = grad_matrix.T.reshape(-1, order="F")
    u = np.linalg.solve(np.kron(left, right), v)
    return u.reshape(d_out, d_in, order="F").T


def tiny_mlp(d_in=5, hidden=4, d_out=3, activation="tanh", seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((d_in,)),
            keras.layers.Dense(hidden, activation=activation),
            keras.layers.Dense(d_out),
        ]
    )


def classification_data(n=32, d_in=5, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d_in)).astype("float32")
    y = rng.integers(0, classes, size=(n,)).astype("int32")
    return x, y


def recorded_rows(model, x, y, block_index=0):
    """Empirical-Fisher rows of one block and Keras's own gradient matrix for it.

    Returns:
        `(block, a, g, num_examples, keras_grad_matrix)`, the rows as numpy arrays.
    """
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with tf.GradientTape(persistent=True) as tape:
        with keras_tkfac.record(model) as recording:
            y_pred = model(x, training=True)
        loss = loss_fn(y, y_pred)
    spec = fisher.resolve_loss(loss_fn, "empirical")
    source, cotangent, m = fisher.output_cotangent(spec, "empirical", y, y_pred, None)
    grads = tape.gradient(source, recording.outputs(), output_gradients=cotangent)
    a, g = recording.rows(grads)[block_index]
    block = model.blocks[block_index]
    keras_grads = tape.gradient(loss, block.variables)
    expected = block.grad_matrix(
        keras_grads[0], keras_grads[1] if len(keras_grads) > 1 else None
    )
    return block, a.numpy(), g.numpy(), int(m), expected.numpy()
