"""The Embedding block: one-hot inputs, a diagonal input factor, never vocab x vocab."""

import numpy as np
import pytest
import tensorflow as tf
import keras

import keras_tkfac
from keras_tkfac import ops
from keras_tkfac import row_sparse
from tests import helpers

VOCAB = 11
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _model():
    keras.utils.set_random_seed(0)
    return keras_tkfac.wrap(keras.Sequential([
        keras.Input((5,), dtype="int32"),
        keras.layers.Embedding(VOCAB, 4),
        keras.layers.GlobalAveragePooling1D(),
        keras.layers.Dense(3),
    ]))


def _rows(model, x, y):
    _, ids, g, m, expected = helpers.recorded_rows(model, x, y)
    return ids, g, m, expected


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    return rng.integers(0, VOCAB, size=(6, 5)), rng.integers(0, 3, size=(6,))


def test_rows_reproduce_keras_gradient(batch):
    ids, g, m, expected = _rows(_model(), *batch)
    one_hot = np.eye(VOCAB)[ids]
    np.testing.assert_allclose(one_hot.T @ g / m, expected, rtol=1e-4, atol=1e-6)


def test_diagonal_statistics_equal_dense_statistics_of_one_hot_rows(batch):
    ids, g, m, _ = _rows(_model(), *batch)
    g = g.astype(np.float64)
    one_hot = np.eye(VOCAB)[ids]
    delta, n_phi, n_psi = ops.tkfac_statistics_diagonal(
        tf.constant(ids), tf.constant(g, tf.float64), m, VOCAB)
    ref = helpers.tkfac_numpy(one_hot, g, m)
    np.testing.assert_allclose(delta.numpy(), ref[0], rtol=1e-10)
    assert np.allclose(ref[1], np.diag(np.diag(ref[1])))  # truly diagonal
    np.testing.assert_allclose(n_phi.numpy(), np.diag(ref[1]), rtol=1e-10)
    np.testing.assert_allclose(n_psi.numpy(), ref[2], rtol=1e-10)
    exact = helpers.exact_fisher(one_hot, g, None, m)
    np.testing.assert_allclose(delta.numpy(), np.trace(exact), rtol=1e-10)
    a_diag, g_factor = ops.kfac_statistics_diagonal(
        tf.constant(ids), tf.constant(g, tf.float64), m, VOCAB)
    np.testing.assert_allclose(a_diag.numpy(), np.diag(one_hot.T @ one_hot) / m)
    np.testing.assert_allclose(g_factor.numpy(), g.T @ g / len(g), rtol=1e-10)


@pytest.mark.parametrize("approximation", ["tkfac", "kfac"])
def test_diagonal_preconditioning_equals_kronecker_solve(batch, approximation):
    ids, g, m, grad = _rows(_model(), *batch)
    g = g.astype(np.float64)
    if approximation == "tkfac":
        stats = ops.tkfac_statistics_diagonal(tf.constant(ids), tf.constant(g), m, VOCAB)
        left, right = ops.tkfac_damped_factors(*stats, 0.1)
    else:
        stats = ops.kfac_statistics_diagonal(tf.constant(ids), tf.constant(g), m, VOCAB)
        left, right = ops.kfac_damped_factors(*stats, 0.1)
    assert left.shape == (VOCAB,)
    left_inv, ok = ops.diagonal_inverse(left)
    assert bool(ok)
    right_inv, _ = ops.symmetric_inverse(right)
    update = ops.precondition(left_inv, tf.constant(grad, tf.float64), right_inv).numpy()
    expected = helpers.kron_solve(np.diag(left.numpy()), right.numpy(), grad)
    np.testing.assert_allclose(update, expected, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("cls", helpers.TKFAC_THEN_KFAC)
def test_embedding_model_trains_without_a_vocab_squared_factor(cls):
    rng = np.random.default_rng(1)
    x = rng.integers(0, VOCAB, size=(256, 5))
    # How many of the 5 tokens are among the first 3 ids (0, 1, 2+): a bag of words.
    y = np.minimum((x < 3).sum(axis=1), 2).astype("int32")
    model = _model()
    model.compile(optimizer=cls(seed=0, step_control="trust_region"), loss=LOSS,
                  metrics=["accuracy"])
    history = model.fit(x, y, batch_size=64, epochs=15, verbose=0)
    shapes = [tuple(v.shape) for v in model.optimizer.variables]
    assert (VOCAB, VOCAB) not in shapes and (VOCAB,) in shapes
    assert history.history["accuracy"][-1] > 0.9


@pytest.mark.parametrize("max_factor_dim, covered", [(8, True), (3, False)])
def test_vocabulary_does_not_count_against_max_factor_dim(max_factor_dim, covered):
    # VOCAB = 11 > 8: the [vocab] input factor is a vector, only d_out = 4 counts.
    rng = np.random.default_rng(2)
    x, y = rng.integers(0, VOCAB, size=(16, 5)), rng.integers(0, 3, size=(16,))
    model = _model()
    embedding = model.model.layers[0]
    model.compile(optimizer=keras_tkfac.TKFAC(max_factor_dim=max_factor_dim, seed=0),
                  loss=LOSS)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    report = model.optimizer.curvature_report()
    assert (embedding.name in report) == covered


@pytest.mark.parametrize("step_control", ["graft_quadratic", "graft", "kl_clip"])
def test_fit_preconditions_only_the_looked_up_rows(monkeypatch, step_control):
    """In `fit` an embedding's gradient arrives as `tf.IndexedSlices` and only its
    rows are preconditioned (under the grafting controls as a
    `row_sparse.RowSparse`, which their steps keep); the weights and the optimizer's
    state equal those of the dense computation throughout."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 300, size=(128, 10)).astype("int32")
    y = rng.integers(0, 2, size=128).astype("int32")

    def fit():
        keras.utils.set_random_seed(0)
        model = keras_tkfac.wrap(keras.Sequential([
            keras.Input((10,), dtype="int32"), keras.layers.Embedding(300, 8),
            keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(2)]))
        model.compile(optimizer=keras_tkfac.TKFAC(seed=0, factor_update_freq=2,
                                                  inverse_update_freq=2,
                                                  step_control=step_control),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
        return model

    sparse_calls = []
    real = ops.precondition_rows

    def counting(*args):
        sparse_calls.append(args[1])
        return real(*args)

    monkeypatch.setattr(ops, "precondition_rows", counting)
    sparse = fit()
    kind = (row_sparse.RowSparse if step_control.startswith("graft")
            else tf.IndexedSlices)
    assert sparse_calls and all(isinstance(g, kind) for g in sparse_calls)
    monkeypatch.setattr(row_sparse, "ENABLED", False)
    monkeypatch.setattr(ops, "precondition_rows", lambda left, rows, right, dtype: (
        ops.precondition(left, tf.convert_to_tensor(rows), right)))
    dense = fit()
    for a, b in zip(sparse.weights + sparse.optimizer.variables,
                    dense.weights + dense.optimizer.variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7,
                                   err_msg=a.path)


def _memory_model(flat_memory):
    """Queries `[B, 3]` and a key-value memory `[B, 4, 2]` looked up in one shared
    `Embedding` (keras-io's memory and retrieval shapes); with `flat_memory` the
    memory's ids are first reshaped to `[B, 8]` (the same rows, in order)."""
    keras.utils.set_random_seed(0)
    queries = keras.Input((3,), dtype="int32")
    memory = keras.Input((4, 2), dtype="int32")
    embedding = keras.layers.Embedding(12, 6)
    looked_up = (keras.layers.Reshape((4, 2, 6))(embedding(keras.layers.Reshape((8,))(
        memory))) if flat_memory else embedding(memory))
    kv = keras.layers.Dense(6, activation="tanh")(
        keras.layers.Reshape((4, 12))(looked_up))
    attended = keras.layers.MultiHeadAttention(1, 6)(embedding(queries), kv)
    pooled = keras.layers.GlobalAveragePooling1D()(attended)
    return keras.Model([queries, memory], keras.layers.Dense(3)(pooled))


def test_an_embedding_shared_by_inputs_of_different_ranks_trains_as_one_rank():
    """One `Embedding` called on ids of rank 2 and rank 3 gathers its rows from both
    calls (it raised an `IndexError`): training equals the model that reshapes the
    rank-3 ids to rank 2 first."""
    rng = np.random.default_rng(0)
    x = [rng.integers(0, 12, (32, 3)).astype("int32"),
         rng.integers(0, 12, (32, 4, 2)).astype("int32")]
    y = (x[0][:, 0] % 3).astype("int32")
    runs = []
    for flat in (False, True):
        model = keras_tkfac.wrap(_memory_model(flat))
        model.compile(optimizer=keras_tkfac.TKFAC(seed=0), loss=keras.losses.
                      SparseCategoricalCrossentropy(from_logits=True))
        # (Four epochs: over two the loss of this small random problem may rise
        # before it falls, as it does at the third epoch without the trace cap.)
        history = model.fit(x, y, batch_size=8, epochs=4, shuffle=False, verbose=0)
        runs.append((history.history["loss"], model.get_weights()))
    np.testing.assert_allclose(runs[0][0], runs[1][0], rtol=1e-6)
    for a, b in zip(runs[0][1], runs[1][1]):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert runs[0][0][-1] < runs[0][0][0]
