"""Oracle tests of the pure math in keras_tkfac.ops against numpy."""

import numpy as np
import pytest
import tensorflow as tf

from keras_tkfac import ops, step_ops
from tests import helpers


def _rows(num_examples=6, locations=1, d_in=4, d_out=3, seed=0):
    rng = np.random.default_rng(seed)
    rows = num_examples * locations
    a = rng.normal(size=(rows, d_in))
    g = rng.normal(size=(rows, d_out))
    return a, g, np.repeat(np.arange(num_examples), locations)


@pytest.mark.parametrize("locations", [1, 5])
def test_tkfac_statistics_match_numpy_and_trace_of_fisher(locations):
    a, g, example = _rows(locations=locations)
    m = 6
    delta, n_phi, n_psi = (
        t.numpy() for t in ops.tkfac_statistics(tf.constant(a), tf.constant(g), m)
    )
    ref = helpers.tkfac_numpy(a, g, m)
    np.testing.assert_allclose(delta, ref[0], rtol=1e-10)
    np.testing.assert_allclose(n_phi, ref[1], rtol=1e-10)
    np.testing.assert_allclose(n_psi, ref[2], rtol=1e-10)
    fisher = helpers.exact_fisher(a, g, example, m)
    approx = np.kron(n_phi / delta, n_psi / delta) * delta
    # Property 1: the trace of delta * Phi ⊗ Psi is the Fisher's trace, exactly.
    np.testing.assert_allclose(np.trace(approx), np.trace(fisher), rtol=1e-10)
    np.testing.assert_allclose(np.trace(n_phi / delta), 1.0, rtol=1e-12)
    np.testing.assert_allclose(np.trace(n_psi / delta), 1.0, rtol=1e-12)
    # Property 4: delta Phi ⊗ Psi = PTr(F) ⊗ BTr(F) / tr(F).
    ptr, btr = helpers.partial_traces(fisher, a.shape[1], g.shape[1])
    np.testing.assert_allclose(approx, np.kron(ptr, btr) / np.trace(fisher), atol=1e-10)


def test_tkfac_is_exact_for_one_example():
    a, g, example = _rows(num_examples=1)
    delta, n_phi, n_psi = (
        t.numpy() for t in ops.tkfac_statistics(tf.constant(a), tf.constant(g), 1)
    )
    fisher = helpers.exact_fisher(a, g, example, 1)
    np.testing.assert_allclose(np.kron(n_phi, n_psi) / delta, fisher, atol=1e-12)


def test_tkfac_recovers_an_exact_kronecker_product():
    # Rows a_r = alpha_r * u, g_r = beta_r * v make every per-row block proportional
    # to (u u^T) ⊗ (v v^T); so is the Fisher, which TKFAC must then reproduce.
    rng = np.random.default_rng(1)
    u, v = rng.normal(size=4), rng.normal(size=3)
    alpha, beta = rng.normal(size=(8, 1)), rng.normal(size=(8, 1))
    a, g = alpha * u, beta * v
    delta, n_phi, n_psi = (
        t.numpy() for t in ops.tkfac_statistics(tf.constant(a), tf.constant(g), 8)
    )
    fisher = helpers.exact_fisher(a, g, np.arange(8), 8)
    np.testing.assert_allclose(np.kron(n_phi, n_psi) / delta, fisher, atol=1e-10)


def test_kfac_statistics_match_numpy():
    a, g, _ = _rows(locations=5)
    a_factor, g_factor = (
        t.numpy() for t in ops.kfac_statistics(tf.constant(a), tf.constant(g), 6)
    )
    np.testing.assert_allclose(a_factor, a.T @ a / 6, rtol=1e-10)
    np.testing.assert_allclose(g_factor, g.T @ g / 30, rtol=1e-10)


def test_kfac_is_exact_when_a_and_g_are_independent_of_each_other_per_row():
    # With one example and one location, A ⊗ G is the exact block.
    a, g, example = _rows(num_examples=1)
    a_factor, g_factor = (
        t.numpy() for t in ops.kfac_statistics(tf.constant(a), tf.constant(g), 1)
    )
    fisher = helpers.exact_fisher(a, g, example, 1)
    np.testing.assert_allclose(np.kron(a_factor, g_factor), fisher, atol=1e-12)


@pytest.mark.parametrize("damping", [1e-3, 0.5])
def test_tkfac_preconditioning_equals_kronecker_solve(damping):
    a, g, _ = _rows(num_examples=10, d_in=5, d_out=4)
    grad = np.random.default_rng(3).normal(size=(5, 4))
    delta, n_phi, n_psi = ops.tkfac_statistics(tf.constant(a), tf.constant(g), 10)
    phi_hat, psi_hat = ops.tkfac_damped_factors(delta, n_phi, n_psi, damping)
    left_inv, ok_left = ops.symmetric_inverse(phi_hat)
    right_inv, ok_right = ops.symmetric_inverse(psi_hat)
    assert bool(ok_left) and bool(ok_right)
    update = ops.precondition(left_inv, tf.constant(grad), right_inv).numpy()
    ref_left, ref_right = helpers.tkfac_damped_numpy(
        *helpers.tkfac_numpy(a, g, 10), damping
    )
    expected = helpers.kron_solve(ref_left, ref_right, grad)
    # float64 throughout; the damped system has condition number ~1e5, so agreement
    # is to ~1e-7 of the largest entry (cond * machine epsilon, with margin).
    np.testing.assert_allclose(update, expected, atol=1e-7 * np.abs(expected).max())
    # The damped Kronecker product is delta Phi ⊗ Psi + lambda I + cross terms:
    # its smallest eigenvalue is at least lambda.
    assert np.linalg.eigvalsh(np.kron(ref_left, ref_right)).min() >= damping * 0.999


def _damped_problem(d_in, d_out, damping, seed):
    """float32 inverses of a TKFAC block, its numpy oracle and a gradient."""
    a, g, _ = _rows(num_examples=40, d_in=d_in, d_out=d_out, seed=seed)
    grad = np.random.default_rng(seed + 1).normal(size=(d_in, d_out))
    delta, n_phi, n_psi = ops.tkfac_statistics(
        tf.constant(a, tf.float32), tf.constant(g, tf.float32), 40)
    phi_hat, psi_hat = ops.tkfac_damped_factors(delta, n_phi, n_psi, damping)
    left_inv, _ = ops.symmetric_inverse(phi_hat)
    right_inv, _ = ops.symmetric_inverse(psi_hat)
    ref_left, ref_right = helpers.tkfac_damped_numpy(
        *helpers.tkfac_numpy(a, g, 40), damping)
    expected = helpers.kron_solve(ref_left, ref_right, grad)
    return left_inv, tf.constant(grad, tf.float32), right_inv, expected


def test_precondition_many_batches_equal_shapes_and_keeps_order():
    # Two layers of one shape (one batched product), one of another, one diagonal.
    problems = [_damped_problem(6, 4, 0.1, seed) for seed in (0, 1)]
    problems.append(_damped_problem(3, 5, 0.1, 2))
    lefts, grads, rights, expected = (list(x) for x in zip(*problems))
    lefts.append(tf.constant([2.0, 4.0, 8.0]))  # the diagonal of L^-1
    grads.append(tf.ones([3, 2]))
    rights.append(tf.eye(2) * 0.5)
    expected.append(np.array([[1.0, 1.0], [2.0, 2.0], [4.0, 4.0]]))
    updates = ops.precondition_many(lefts, grads, rights)
    for i, (update, want) in enumerate(zip(updates, expected)):
        single = ops.precondition(lefts[i], grads[i], rights[i])
        np.testing.assert_allclose(update.numpy(), single.numpy(), rtol=1e-6, atol=0)
        np.testing.assert_allclose(update.numpy(), want,
                                   atol=1e-4 * np.abs(want).max())


def test_precondition_rows_equals_dense_product_with_repeated_ids():
    rng = np.random.default_rng(7)
    vocab, d_out = 9, 4
    left = tf.constant(rng.uniform(0.5, 2.0, size=vocab))
    right = tf.constant(rng.normal(size=(d_out, d_out)))
    ids = tf.constant([3, 0, 3, 8, 3])
    values = tf.constant(rng.normal(size=(5, d_out)))
    slices = tf.IndexedSlices(values, ids, tf.constant([vocab, d_out]))
    dense = np.zeros((vocab, d_out))
    np.add.at(dense, ids.numpy(), values.numpy())
    expected = np.diag(left.numpy()) @ dense @ right.numpy()
    np.testing.assert_allclose(ops.precondition_rows(left, slices, right,
                                                     tf.float64).numpy(),
                               expected, rtol=1e-12, atol=1e-15)
    (batched,) = ops.precondition_many([left], [slices], [right], tf.float64)
    np.testing.assert_allclose(batched.numpy(), expected, rtol=1e-12, atol=1e-15)


def test_bfloat16_preconditioning_is_close_to_kronecker_solve():
    # bfloat16 keeps 8 significant bits (relative rounding 2^-9 = 2e-3 per operand);
    # the product sums over d_in and d_out terms, so the update's relative error
    # (Frobenius) stays within a few times that: 1e-2 is the stated tolerance.
    for d_in, d_out, seed in ((30, 20, 0), (65, 10, 3)):
        left, grad, right, expected = _damped_problem(d_in, d_out, 1e-2, seed)
        (update,) = ops.precondition_many([left], [grad], [right], tf.bfloat16)
        assert update.dtype == tf.float32
        error = np.linalg.norm(update.numpy() - expected) / np.linalg.norm(expected)
        assert error < 1e-2, error
        (exact,) = ops.precondition_many([left], [grad], [right])
        exact_error = np.linalg.norm(exact.numpy() - expected) / np.linalg.norm(expected)
        assert exact_error < 1e-4 < error


def test_trace_relative_damping_preconditioning_equals_kronecker_solve():
    a, g, _ = _rows(num_examples=4, locations=9, d_in=6, d_out=3)
    grad = np.random.default_rng(4).normal(size=(6, 3))
    delta, n_phi, n_psi = ops.tkfac_statistics(tf.constant(a), tf.constant(g), 4)
    damping = ops.trace_relative_damping(delta, 18, 1e-3)
    np.testing.assert_allclose(damping.numpy(), max(delta.numpy(), 1e-3) / 18)
    phi_hat, psi_hat = ops.tkfac_damped_factors(delta, n_phi, n_psi, damping)
    update = ops.precondition(
        ops.symmetric_inverse(phi_hat)[0], tf.constant(grad),
        ops.symmetric_inverse(psi_hat)[0],
    ).numpy()
    ref_delta, ref_phi, ref_psi = helpers.tkfac_numpy(a, g, 4)
    ref_left, ref_right = helpers.tkfac_damped_numpy(
        ref_delta, ref_phi, ref_psi, max(ref_delta, 1e-3) / 18
    )
    np.testing.assert_allclose(
        update, helpers.kron_solve(ref_left, ref_right, grad), rtol=1e-8
    )


def test_trace_relative_damping_floor():
    value = ops.trace_relative_damping(tf.constant(1e-6), 100, 1e-2)
    np.testing.assert_allclose(value.numpy(), 1e-4)


def test_trace_relative_damping_scale():
    """`scale` times the block's mean eigenvalue `delta / dim` (floored)."""
    value = ops.trace_relative_damping(tf.constant([0.5, 1e-6]), 100, 1e-2, 100.0)
    np.testing.assert_allclose(value.numpy(), [0.5, 1e-2], rtol=1e-6)


@pytest.mark.parametrize("damping", [1e-3, 0.5])
def test_kfac_preconditioning_equals_kronecker_solve(damping):
    a, g, _ = _rows(num_examples=10, locations=3, d_in=5, d_out=4)
    grad = np.random.default_rng(5).normal(size=(5, 4))
    a_factor, g_factor = ops.kfac_statistics(tf.constant(a), tf.constant(g), 10)
    left, right = ops.kfac_damped_factors(a_factor, g_factor, damping)
    update = ops.precondition(
        ops.symmetric_inverse(left)[0], tf.constant(grad),
        ops.symmetric_inverse(right)[0],
    ).numpy()
    ref_left, ref_right = helpers.kfac_damped_numpy(
        a.T @ a / 10, g.T @ g / 30, damping
    )
    np.testing.assert_allclose(
        update, helpers.kron_solve(ref_left, ref_right, grad), rtol=1e-8
    )


def test_damped_factors_of_zero_statistics_are_finite():
    zeros_in, zeros_out = tf.zeros([4, 4]), tf.zeros([3, 3])
    phi_hat, psi_hat = ops.tkfac_damped_factors(
        tf.constant(0.0), zeros_in, zeros_out, 1e-2
    )
    np.testing.assert_allclose(phi_hat.numpy(), 0.1 * np.eye(4), rtol=1e-6)
    left, right = ops.kfac_damped_factors(zeros_in, zeros_out, 1e-2)
    assert np.all(np.isfinite(left.numpy())) and np.all(np.isfinite(right.numpy()))


def test_symmetric_inverse_flags_non_positive_definite_matrices():
    good = np.array([[2.0, 0.5], [0.5, 1.0]])
    bad = np.array([[1.0, 2.0], [2.0, 1.0]])
    inverses, ok = ops.symmetric_inverse(tf.constant(np.stack([good, bad])))
    assert ok.numpy().tolist() == [True, False]
    np.testing.assert_allclose(inverses[0].numpy(), np.linalg.inv(good), rtol=1e-10)


def _spd(rng, d, damping):
    x = rng.normal(size=(2 * d, d)) * np.sqrt(np.linspace(1e-3, 1, d))
    return x.T @ x / (2 * d) + damping * np.eye(d)


@pytest.mark.parametrize("d", [ops.CHOLESKY_MAX_DIM + 1, 2 * ops.CHOLESKY_MAX_DIM + 3])
def test_symmetric_inverse_by_halving_matches_numpy(d):
    # Sizes above CHOLESKY_MAX_DIM are halved into Schur complements (one and two
    # levels here, odd splits included), batched.
    rng = np.random.default_rng(d)
    matrices = np.stack([_spd(rng, d, 1e-3), _spd(rng, d, 1e-1)])
    inverses, ok = ops.symmetric_inverse(tf.constant(matrices))
    assert ok.numpy().tolist() == [True, True]
    for inverse, matrix in zip(inverses.numpy(), matrices):
        np.testing.assert_allclose(inverse, np.linalg.inv(matrix), rtol=1e-9,
                                   atol=1e-9 * np.abs(np.linalg.inv(matrix)).max())


def test_symmetric_inverse_by_halving_compiles_with_xla():
    # The accelerators' path (`inverses.inverse_for_device`) compiles the halving.
    rng = np.random.default_rng(2)
    d = ops.CHOLESKY_MAX_DIM + 7
    matrix = _spd(rng, d, 1e-2)
    compiled = tf.function(ops.symmetric_inverse, jit_compile=True)
    inverse, ok = compiled(tf.constant(matrix[None]))
    assert ok.numpy().tolist() == [True]
    np.testing.assert_allclose(inverse[0].numpy(), np.linalg.inv(matrix), rtol=1e-9,
                               atol=1e-9 * np.abs(np.linalg.inv(matrix)).max())


def test_symmetric_inverse_by_halving_in_float32_is_as_accurate_as_cholesky():
    rng = np.random.default_rng(0)
    d = 2 * ops.CHOLESKY_MAX_DIM + 1
    matrix = _spd(rng, d, 1e-4)
    reference = np.linalg.inv(matrix)
    halving = ops.symmetric_inverse(tf.constant(matrix, tf.float32))[0].numpy()
    chol = tf.linalg.cholesky(tf.constant(matrix, tf.float32))
    cholesky = tf.linalg.cholesky_solve(chol, tf.eye(d)).numpy()
    error = np.linalg.norm(halving - reference) / np.linalg.norm(reference)
    cholesky_error = np.linalg.norm(cholesky - reference) / np.linalg.norm(reference)
    assert error < 2 * cholesky_error + 1e-6, (error, cholesky_error)


def test_symmetric_inverse_by_halving_flags_indefinite_matrices():
    # Positive definite leading block, indefinite whole: the Schur complement is not
    # positive definite, and only that matrix of the batch is flagged.
    rng = np.random.default_rng(1)
    d = 2 * ops.CHOLESKY_MAX_DIM + 3
    good = _spd(rng, d, 1e-2)
    v = np.zeros(d)
    v[-5:] = 1.0
    bad = good - 10.0 * np.outer(v, v)
    assert np.all(np.linalg.eigvalsh(bad[:d // 2, :d // 2]) > 0)
    inverses, ok = ops.symmetric_inverse(tf.constant(np.stack([good, bad])))
    assert ok.numpy().tolist() == [True, False]
    np.testing.assert_allclose(inverses[0].numpy(), np.linalg.inv(good), rtol=1e-8,
                               atol=1e-9 * np.abs(np.linalg.inv(good)).max())


def test_kl_clip_factor():
    u = [tf.constant([[2.0, 0.0]]), tf.constant([1.0])]
    g = [tf.constant([[1.0, 5.0]]), tf.constant([2.0])]
    # <U, G> = 2 + 2 = 4; nu = sqrt(kappa / (eta^2 * 4)).
    nu = step_ops.kl_clip_factor(u, g, learning_rate=0.1, kl_clip=1e-3).numpy()
    np.testing.assert_allclose(nu, np.sqrt(1e-3 / (0.01 * 4)), rtol=1e-6)
    assert step_ops.kl_clip_factor(u, g, learning_rate=0.1, kl_clip=10.0).numpy() == 1.0
    negative = [tf.constant([[-1.0, 0.0]]), tf.constant([0.0])]
    assert step_ops.kl_clip_factor(negative, g, 0.1, 1e-3).numpy() == 1.0


def test_rms_step_norm_is_adams_step_without_first_moment():
    rng = np.random.default_rng(0)
    grads = [rng.normal(size=(4, 3)) for _ in range(3)]
    moment = np.zeros((4, 3))
    keras_adam_v = np.zeros((4, 3))
    for t, grad in enumerate(grads, start=1):
        norm, new = step_ops.rms_step_norm(tf.constant(grad), tf.constant(moment), t, 0.9, 1e-7)
        keras_adam_v = 0.9 * keras_adam_v + 0.1 * grad**2
        step = grad / (np.sqrt(keras_adam_v / (1 - 0.9**t)) + 1e-7)
        np.testing.assert_allclose(new.numpy(), keras_adam_v, rtol=1e-12)
        np.testing.assert_allclose(norm.numpy(), np.linalg.norm(step), rtol=1e-12)
        moment = new.numpy()
    # First step: v_hat = G^2, so every nonzero entry moves by ~1 (float32: 1 - 0.999
    # is rounded to ~5e-5 relative).
    norm, _ = step_ops.rms_step_norm(tf.constant([[3.0, 0.0, -0.5]]), tf.zeros([1, 3]), 1,
                                0.999, 1e-7)
    np.testing.assert_allclose(norm.numpy(), np.sqrt(2.0), rtol=1e-4)


def test_graft_rescales_to_the_norm_and_keeps_zero():
    update = tf.constant([[3.0, 4.0]])
    np.testing.assert_allclose(step_ops.graft(update, 10.0).numpy(), [[6.0, 8.0]])
    np.testing.assert_array_equal(step_ops.graft(tf.zeros([2, 2]), 1.0).numpy(), 0.0)


def test_balanced_split_of_the_damping_equals_the_numpy_factors():
    """`balance = pi`: `pi sqrt(lambda)` on `Phi^`, `sqrt(lambda) / pi` on `Psi^`,
    per group; `balanced_split` is `sqrt(d_out / d_in)`; `None` is the even split."""
    rng = np.random.default_rng(5)
    a = rng.normal(size=(10, 2, 6))
    g = rng.normal(size=(10, 2, 3))
    delta, n_phi, n_psi = ops.tkfac_statistics_grouped(tf.constant(a), tf.constant(g), 5)
    damping = ops.trace_relative_damping(delta, 18, 1e-3)
    pi = ops.balanced_split(6, 3)
    assert pi == np.sqrt(0.5)
    phi_hat, psi_hat = ops.tkfac_damped_factors(delta, n_phi, n_psi, damping, pi)
    even = ops.tkfac_damped_factors(delta, n_phi, n_psi, damping)
    for c in range(2):
        d, lam = delta[c].numpy(), damping[c].numpy()
        root_delta = np.sqrt(d)
        np.testing.assert_allclose(
            phi_hat[c].numpy(),
            n_phi[c].numpy() / root_delta + pi * np.sqrt(lam) * np.eye(6), rtol=1e-12)
        np.testing.assert_allclose(
            psi_hat[c].numpy(),
            n_psi[c].numpy() / root_delta + np.sqrt(lam) / pi * np.eye(3), rtol=1e-12)
        ref_left, ref_right = helpers.tkfac_damped_numpy(
            d, n_phi[c].numpy(), n_psi[c].numpy(), lam)
        np.testing.assert_allclose(even[0][c].numpy(), ref_left, rtol=1e-12)
        np.testing.assert_allclose(even[1][c].numpy(), ref_right, rtol=1e-12)


def test_sequence_statistics_of_one_position_are_tkfac_statistics_and_any_length_traces():
    rng = np.random.default_rng(7)
    a = rng.normal(size=(6, 1, 4))
    g = rng.normal(size=(6, 1, 3))
    for got, want in zip(ops.tkfac_statistics_sequences(tf.constant(a), tf.constant(g), 6),
                         ops.tkfac_statistics(tf.constant(a[:, 0]), tf.constant(g[:, 0]), 6)):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-12)
    # Lengths unknown when traced: the route is chosen at run time, same values.
    statistics = tf.function(ops.tkfac_statistics_sequences, input_signature=[
        tf.TensorSpec([None, None, 4], tf.float64), tf.TensorSpec([None, None, 3], tf.float64),
        tf.TensorSpec([], tf.int32)])
    for length in (2, 40):
        a = rng.normal(size=(5, length, 4))
        g = rng.normal(size=(5, length, 3))
        w = np.einsum("nti,nto->nio", a, g)
        got = statistics(tf.constant(a), tf.constant(g), tf.constant(5))
        want = (np.sum(w * w) / 5, np.einsum("nio,njo->ij", w, w) / 5,
                np.einsum("nio,nip->op", w, w) / 5)
        for x, y in zip(got, want):
            np.testing.assert_allclose(x.numpy(), y, rtol=1e-10)


def test_all_finite_reads_dense_tensors_and_slices_values():
    """`all_finite`: dense tensors elementwise, `tf.IndexedSlices` by their values."""
    finite = tf.constant([[1.0, -2.0], [3e38, 0.0]])
    slices = tf.IndexedSlices(tf.constant([[1.0, 2.0], [3.0, 4.0]]),
                              tf.constant([0, 7]), tf.constant([10, 2]))
    assert bool(ops.all_finite([finite, slices]))
    for bad in (np.nan, np.inf, -np.inf):
        dense = finite.numpy()
        dense[1, 1] = bad
        assert not bool(ops.all_finite([tf.constant(dense), slices]))
        values = slices.values.numpy()
        values[1, 0] = bad
        assert not bool(ops.all_finite(
            [finite, tf.IndexedSlices(tf.constant(values), slices.indices,
                                      slices.dense_shape)]))
