"""Shared test oracles: exact numpy Fisher blocks, numpy K-FAC/TKFAC, tiny models."""

import numpy as np
import pytest
import tensorflow as tf
import keras

import keras_tkfac
from keras_tkfac import fisher, loss_specs

RNG = np.random.default_rng(0)

# For tests of plumbing that KFAC shares with TKFAC (losses, outputs, inputs,
# strategies, forward mode, a block's recording): KFAC differs only in its factors'
# scaling and damping (`keras_tkfac.approximations`), whose oracles run on every
# `make test`, so its run of these tests is in `make test-all` only (`make test` had
# grown to ~24 minutes on the 2-core machine; the guide asks for about 15).
TKFAC_THEN_KFAC = [keras_tkfac.TKFAC,
                   pytest.param(keras_tkfac.KFAC, marks=pytest.mark.slow)]


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
    spec = loss_specs.resolve_loss(loss_fn, "empirical")
    source, cotangent, m = fisher.output_cotangent(spec, "empirical", y, y_pred, None)
    grads = tape.gradient(source, recording.outputs(), output_gradients=cotangent)
    a, g = recording.rows(grads)[block_index]
    block = model.blocks[block_index]
    keras_grads = tape.gradient(loss, block.variables)
    expected = block.grad_matrix(
        keras_grads[0], keras_grads[1] if len(keras_grads) > 1 else None
    )
    return block, a.numpy(), g.numpy(), int(m), expected.numpy()


def assert_same_state(model, other):
    """`model` and `other` have equal weights and optimizer variables, bit for bit."""
    for a, b in zip(model.weights + model.optimizer.variables,
                    other.weights + other.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


def assert_identical_on_replicas(variables):
    """Every replica holds the same value of each (mirrored) variable."""
    for variable in variables:
        value = variable.value
        values = [v.numpy() for v in getattr(value, "values", (value,))]
        for other in values[1:]:
            np.testing.assert_array_equal(other, values[0], err_msg=variable.path)


def assert_replicas_match_one_device(single, replicated):
    """A two-replica run equals the one-device run up to float32 summation order."""
    assert replicated.distribute_strategy.num_replicas_in_sync == 2
    assert_identical_on_replicas(replicated.weights + replicated.optimizer.variables)
    # Float32 summation order differs (per-replica partial sums).
    for a, b in zip(single.weights + single.optimizer.variables,
                    replicated.weights + replicated.optimizer.variables):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-4, atol=1e-5,
                                   err_msg=a.path)


def empirical_rows(model, block, x, y, loss, variables=None, xla=False,
                   sequences=False):
    """One recorded training-mode pass: `block`'s empirical-Fisher rows (with
    `sequences`, `[sequences, positions, ...]` where the block keeps them) and
    Keras's gradients of `variables` (default: the block's) for the mean `loss`.

    Returns:
        `(a, g, num_examples, keras_grads, y_pred, plain_y_pred)` as numpy (`a`, `g`
        in float64), `plain_y_pred` from the model called in inference mode without
        recording.
    """
    variables = block.variables if variables is None else variables

    def run(x, y):
        with tf.GradientTape(persistent=True) as tape:
            with keras_tkfac.record(model) as recording:
                y_pred = model(x, training=True)
            loss_value = loss(y, y_pred)
        spec = loss_specs.resolve_loss(loss, "empirical")
        source, cotangent, m = fisher.output_cotangent(spec, "empirical", y, y_pred,
                                                       None)
        grads = tape.gradient(source, recording.outputs(), output_gradients=cotangent)
        a, g = recording.rows(grads, sequences=sequences)[model.blocks.index(block)]
        keras_grads = tape.gradient(loss_value, variables)
        return a, g, m, keras_grads, y_pred, model(x)

    if xla:
        run = tf.function(run, jit_compile=True)
    x = [tf.constant(v) for v in x] if isinstance(x, list) else tf.constant(x)
    a, g, m, keras_grads, y_pred, plain = run(x, tf.constant(y))
    return (a.numpy().astype(np.float64), g.numpy().astype(np.float64), int(m),
            [k.numpy() for k in keras_grads], y_pred.numpy(), plain.numpy())


def keras_round_trip(inner, x, y, loss, path, **optimizer_args):
    """Wraps `inner`, fits one epoch with TKFAC (statistics and inverses every two
    steps; `optimizer_args` added), saves to `path` and loads; checks that the
    loaded model has the same state and takes the same next epoch. Returns the
    loaded model."""
    model = keras_tkfac.wrap(inner)
    model.compile(optimizer=keras_tkfac.TKFAC(factor_update_freq=2,
                                              inverse_update_freq=2, seed=3,
                                              **optimizer_args),
                  loss=loss)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    model.save(path)
    loaded = keras.models.load_model(path)
    assert [type(b) for b in loaded.blocks] == [type(b) for b in model.blocks]
    assert_same_state(model, loaded)
    for m in (model, loaded):
        m.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    assert_same_state(model, loaded)
    return loaded


def assert_tkfac_is_uncorrelated_fisher(statistics, a, g, num_examples):
    """`statistics = (delta, n_phi, n_psi)` of one group against the exact
    location-uncorrelated Fisher of the rows `a`, `g` (equal rows per example):
    delta is its trace and delta Phi, delta Psi its partial traces."""
    delta, n_phi, n_psi = statistics
    example = np.repeat(np.arange(num_examples), len(a) // num_examples)
    exact = exact_fisher(a, g, example, num_examples)
    tr_out, tr_in = partial_traces(exact, a.shape[1], g.shape[1])
    np.testing.assert_allclose(delta, np.trace(exact), rtol=1e-10)
    np.testing.assert_allclose(n_phi, tr_out, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(n_psi, tr_in, rtol=1e-10, atol=1e-14)
    return exact


def custom_train_step(model, optimizer, loss_fn, traces=None,
                      make_forward=keras_tkfac.ModelForward):
    """README's custom training step (to wrap in `tf.function`); appends to
    `traces`, when given, each time it is traced. `make_forward(model, x)` gives
    `update_curvature`'s `forward`."""
    def train_step(x, y):
        if traces is not None:
            traces.append(1)
        with tf.GradientTape(persistent=True) as tape:
            with keras_tkfac.record(model) as recording:
                y_pred = model(x, training=True)
            loss = loss_fn(y, y_pred)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.update_curvature(recording, tape, y_pred, y_true=y, loss=loss_fn,
                                   forward=make_forward(model, x))
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss
    return train_step


def channel_sign_task(rank, n=128, seed=1):
    """`[n, 6, 7, 3]` (rank 2) or `[n, 7, 3]` (rank 1) normal inputs, labelled by the
    sign of channel 0's mean: the toy task of the depthwise and separable tests."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6, 7, 3) if rank == 2 else (n, 7, 3)).astype("float32")
    return x, (x[..., 0].reshape(n, -1).mean(axis=1) > 0).astype("int32")


def mse_gauss_newton_gram(jacobians, directions):
    """`D G D^T` for Keras's mean squared error, `G = (1 / B) sum_n J_n^T (2 / K)
    J_n`, from the Jacobians of the `[B, K]` outputs with respect to each variable
    (`tape.jacobian`) and `directions` (lists of arrays shaped like the variables):
    the oracle of the curvature products' Gram, in float64."""
    batch, outputs = jacobians[0].shape[:2]
    flat_j = np.concatenate([np.reshape(np.asarray(j), (batch, outputs, -1))
                             for j in jacobians], axis=-1).astype(np.float64)
    curvature = np.einsum("bdi,bdj->ij", flat_j, flat_j) * 2.0 / (batch * outputs)
    flat_d = np.array([np.concatenate([np.ravel(d) for d in direction])
                       for direction in directions], dtype=np.float64)
    return flat_d @ curvature @ flat_d.T


_MUON_WORKS = []


def keras_muon_works():
    """Whether this Keras's `Muon` trains a tiny model with `fit` on TensorFlow: the
    tools compare against it where it does. Keras 3.8 has none; Keras 3.10's raises
    "'ResourceVariable' object has no attribute 'path'" in `fit`, with or without
    `wrap` (measured 2026-12-07)."""
    if not _MUON_WORKS:
        works = hasattr(keras.optimizers, "Muon")
        if works:
            model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
            model.compile(optimizer=keras.optimizers.Muon(), loss="mse")
            try:
                model.fit(np.ones((4, 3)), np.ones((4, 2)), verbose=0)
            except AttributeError:
                works = False
        _MUON_WORKS.append(works)
    return _MUON_WORKS[0]


def without_muon_where_it_fails(names):
    """`names` without `"Muon"` where this Keras's Muon does not train."""
    return [n for n in names if n != "Muon" or keras_muon_works()]
