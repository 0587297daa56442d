"""Oracle tests of the rank-k inverses (`inverse_rank`, `keras_tkfac.low_rank`):
exact where a damped factor has rank at most k, the top eigenpairs otherwise, and
the optimizer's steps equal to the exact inverses' where they should be."""

import numpy as np
import pytest
import tensorflow as tf
import keras

import keras_tkfac
from keras_tkfac import low_rank

RNG = np.random.default_rng(0)


def _damped_low_rank(d, values, damping, batch=()):
    """`U diag(values) U^T + damping I` (random orthonormal `U`), `batch` of them."""
    out = []
    for _ in range(int(np.prod(batch)) if batch else 1):
        basis = np.linalg.qr(RNG.normal(size=(d, len(values))))[0]
        out.append(basis @ np.diag(values) @ basis.T + damping * np.eye(d))
    return np.reshape(np.stack(out), tuple(batch) + (d, d))


def _identity(d, k, batch=()):
    shape = tuple(batch) + low_rank.low_rank_shape((d, d), k)
    return tf.cast(low_rank.low_rank_identity(shape), tf.float64)


def test_the_packed_identity_is_the_identity():
    packed = low_rank.low_rank_identity(low_rank.low_rank_shape((6, 6), 2))
    x = RNG.normal(size=(6, 3)).astype("float32")
    np.testing.assert_array_equal(low_rank.multiply_left(packed, x), x)
    np.testing.assert_array_equal(low_rank.multiply_right(x.T, packed), x.T)


def test_exact_for_a_damped_factor_of_rank_at_most_k():
    """Rank 3 plus damping, k = 5, a batch of two: both multiplications equal the
    inverse's; a second inverse step from the first's basis stays exact."""
    matrices = _damped_low_rank(30, [4.0, 2.0, 1.0], 0.3, batch=(2,))
    packed, ok = low_rank.low_rank_inverse(tf.constant(matrices), _identity(30, 5, (2,)),
                                      iterations=30)
    assert np.all(ok)
    x = RNG.normal(size=(2, 30, 4))
    expected = np.linalg.solve(matrices, x)
    np.testing.assert_allclose(low_rank.multiply_left(packed, x), expected, atol=1e-9)
    np.testing.assert_allclose(
        low_rank.multiply_right(np.swapaxes(x, 1, 2), packed),
        np.swapaxes(x, 1, 2) @ np.linalg.inv(matrices), atol=1e-9)
    again, ok = low_rank.low_rank_inverse(tf.constant(matrices), packed, iterations=1)
    assert np.all(ok)
    np.testing.assert_allclose(low_rank.multiply_left(again, x), expected, atol=1e-9)


def test_keeps_the_top_eigenpairs_and_the_others_mean():
    """A spread spectrum: the packed inverse is `V diag(1/theta) V^T + (I - V V^T)
    / t` with the top k eigenpairs of numpy's `eigh` and `t` the others' mean."""
    d, k = 24, 4
    values = np.concatenate([[50.0, 20.0, 10.0, 5.0], np.linspace(0.5, 1.0, d - k)])
    basis = np.linalg.qr(RNG.normal(size=(d, d)))[0]
    matrix = basis @ np.diag(values) @ basis.T
    packed, ok = low_rank.low_rank_inverse(tf.constant(matrix), _identity(d, k), iterations=60)
    assert bool(ok)
    top = basis[:, :k]
    tail = values[k:].mean()
    expected = top @ np.diag(1.0 / values[:k]) @ top.T + (np.eye(d) - top @ top.T) / tail
    np.testing.assert_allclose(low_rank.multiply_left(packed, np.eye(d)), expected, atol=1e-8)


def test_a_factor_that_is_not_positive_definite_is_flagged():
    matrix = _damped_low_rank(12, [3.0], -0.5)
    _, ok = low_rank.low_rank_inverse(tf.constant(matrix), _identity(12, 2), iterations=10)
    assert not bool(ok)


def _model():
    inputs = keras.Input((1,), dtype="int32")
    h = keras.layers.Flatten()(keras.layers.Embedding(10, 9)(inputs))
    h = keras.layers.Dense(18, activation="tanh")(h)
    return keras.Model(inputs, keras.layers.Dense(3)(h))


def _one_step(name, monkeypatch, **kwargs):
    """Weights after one step from the same start (statistics and inverses at step
    0), and the inverses' shapes."""
    monkeypatch.setattr(low_rank, "LOW_RANK_ITERATIONS", 300)
    keras.utils.set_random_seed(0)
    model = _model()
    wrapped = keras_tkfac.wrap(model)
    # (A small damping keeps the factors' few eigenvalues apart from it: subspace
    # iteration converges at the ratio of the damping to the next eigenvalue.)
    optimizer = getattr(keras_tkfac, name)(seed=1, inverse_dtype="float64",
                                           damping=1e-3, **kwargs)
    wrapped.compile(optimizer=optimizer,
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.array([[3], [7]], dtype="int32")
    y = np.array([0, 2])
    wrapped.train_on_batch(x, y)
    shapes = [tuple(v.shape) for slot in optimizer._slots for v in slot.inverses]
    return [v.numpy() for v in model.weights], shapes


@pytest.mark.parametrize("name", ["TKFAC", "KFAC"])
def test_one_step_equals_the_exact_inverses_where_factors_have_rank_at_most_k(
        name, monkeypatch):
    """Two examples: every factor is damping plus a matrix of rank at most 2, so
    with `inverse_rank=3` the step equals the exact one's (the embedding's output
    factor, 9 dimensions, and the dense layers' 10, 18 and 19 are packed; the
    3-dimensional output factor and the embedding's diagonal keep theirs)."""
    exact, exact_shapes = _one_step(name, monkeypatch)
    low, low_shapes = _one_step(name, monkeypatch, inverse_rank=3)
    assert exact_shapes == [(10,), (9, 9), (10, 10), (18, 18), (19, 19), (3, 3)]
    assert low_shapes == [(10,), (10, 4), (11, 4), (19, 4), (20, 4), (3, 3)]
    for a, b in zip(exact, low):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_trains_saves_and_reports_its_rank(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((20,)), keras.layers.Dense(32, activation="relu"),
                              keras.layers.Dense(4)])
    wrapped = keras_tkfac.wrap(model)
    optimizer = keras_tkfac.TKFAC(inverse_rank=4, seed=0)
    wrapped.compile(optimizer=optimizer,
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = RNG.normal(size=(256, 20)).astype("float32")
    y = (x[:, :4].argmax(axis=1)).astype("int32")
    history = wrapped.fit(x, y, batch_size=32, epochs=3, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert int(optimizer.inverse_failures.numpy()) == 0
    assert keras_tkfac.TKFAC.from_config(optimizer.get_config()).inverse_rank == 4
    path = str(tmp_path / "model.keras")
    wrapped.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.optimizer.inverse_rank == 4
    np.testing.assert_allclose(loaded.predict(x[:8], verbose=0),
                               wrapped.predict(x[:8], verbose=0), rtol=1e-6)


@pytest.mark.parametrize("value", [0, 2.5, True, "64"])
def test_bad_rank_is_refused(value):
    with pytest.raises(ValueError, match="inverse_rank"):
        keras_tkfac.TKFAC(inverse_rank=value)


def test_two_replicas_match_one_device(mirrored):
    """Under `MirroredStrategy` (the inverses split between the replicas), the
    rank-k inverses train as one device does, identical on both replicas."""
    from tests import test_distributed as distributed_tests

    x, y = distributed_tests._data((8,), n=256)

    def optimizer():
        return keras_tkfac.TKFAC(fisher="empirical", factor_update_freq=2,
                                 inverse_update_freq=3, inverse_rank=4, seed=0)

    single = distributed_tests._train(tf.distribute.get_strategy(),
                                      distributed_tests._mlp, x, y, optimizer)
    replicated = distributed_tests._train(mirrored, distributed_tests._mlp, x, y,
                                          optimizer)
    distributed_tests._assert_identical_on_replicas(replicated)
    assert any(low_rank.is_low_rank(v) for v in replicated.optimizer.variables)
    # (The tolerance of `test_distributed.test_two_replicas_match_one_device`.)
    for a, b in zip(single.weights, replicated.weights):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-4, atol=1e-5)


def test_convolutions_keep_exact_inverses():
    """A convolution's factors (trace-relative damping, spread spectra) keep dense
    inverses under `inverse_rank`; the dense layer after it is packed."""
    model = keras.Sequential([
        keras.Input((6, 6, 2)), keras.layers.Conv2D(12, 3, activation="relu"),
        keras.layers.Flatten(), keras.layers.Dense(3)])
    wrapped = keras_tkfac.wrap(model)
    optimizer = keras_tkfac.TKFAC(inverse_rank=4, seed=0)
    wrapped.compile(optimizer=optimizer,
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = RNG.normal(size=(8, 6, 6, 2)).astype("float32")
    wrapped.train_on_batch(x, np.arange(8) % 3)
    shapes = {slot.block.layer.name: [tuple(v.shape) for v in slot.inverses]
              for slot in optimizer._slots}
    conv, dense = (shapes[layer.name] for layer in model.layers if layer.weights)
    assert conv == [(19, 19), (12, 12)]
    assert dense == [(194, 5), (3, 3)]


def test_every_preconditioning_form_takes_packed_inverses():
    """`ops.precondition`, the factored form and `precondition_factored_or_full`
    with packed inverses equal the dense inverses' products."""
    from keras_tkfac import ops

    left = _damped_low_rank(12, [3.0, 1.0], 0.2)
    right = _damped_low_rank(10, [2.0], 0.5)
    packed = [low_rank.low_rank_inverse(tf.constant(m), _identity(len(m), 3),
                                        iterations=60)[0] for m in (left, right)]
    dense = [np.linalg.inv(m) for m in (left, right)]
    a, g = RNG.normal(size=(5, 12)), RNG.normal(size=(5, 10))
    expected = dense[0] @ a.T @ g @ dense[1]
    np.testing.assert_allclose(
        ops.precondition(packed[0], tf.constant(a.T @ g), packed[1]), expected,
        atol=1e-9)
    np.testing.assert_allclose(
        ops.precondition_factored(packed[0], tf.constant(a), tf.constant(g), packed[1]),
        expected, atol=1e-9)
    factored = ops.FactoredGradient(tf.constant(a), tf.constant(g), tf.constant(a.T @ g))
    np.testing.assert_allclose(
        ops.precondition_factored_or_full(packed[0], factored, packed[1],
                                          dtype=tf.float64), expected, atol=1e-9)
