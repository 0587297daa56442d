"""`row_sparse`: an embedding's step on its batch's rows, against dense numpy."""

import numpy as np
import pytest
import tensorflow as tf

from keras_tkfac import ops, step_ops
from keras_tkfac import row_sparse
from keras_tkfac import step_size

SHAPE = (9, 3)


def _slices(rng, ids=(4, 1, 4, 7, 1, 4)):
    values = rng.normal(size=(len(ids), SHAPE[1])).astype("float32")
    dense = np.zeros(SHAPE, "float32")
    np.add.at(dense, list(ids), values)
    return tf.IndexedSlices(tf.constant(values), tf.constant(ids, tf.int32),
                            tf.constant(SHAPE)), dense


def _rows(rng, ids=(4, 1, 4, 7, 1, 4)):
    slices, dense = _slices(rng, ids)
    return row_sparse.from_slices(slices, SHAPE), dense


def test_from_slices_sums_repeated_ids_into_distinct_rows():
    rows, dense = _rows(np.random.default_rng(0))
    indices = rows.indices.numpy()
    assert sorted(indices) == [1, 4, 7]
    np.testing.assert_allclose(rows.values.numpy(), dense[indices], rtol=1e-6)
    np.testing.assert_allclose(row_sparse.dense(rows).numpy(), dense, rtol=1e-6)
    assert row_sparse.dense(rows).shape == SHAPE


def test_scale_norm_and_dense_of_rows_and_of_dense_tensors():
    rows, dense = _rows(np.random.default_rng(1))
    np.testing.assert_allclose(row_sparse.dense(row_sparse.scale(rows, -2.5)).numpy(),
                               -2.5 * dense, rtol=1e-6)
    np.testing.assert_allclose(row_sparse.scale(tf.constant(dense), 3.0).numpy(),
                               3.0 * dense, rtol=1e-6)
    np.testing.assert_allclose(row_sparse.norm(rows).numpy(), np.linalg.norm(dense),
                               rtol=1e-6)
    np.testing.assert_allclose(row_sparse.norm(tf.constant(dense)).numpy(),
                               np.linalg.norm(dense), rtol=1e-6)
    tensor = tf.constant(dense)
    assert row_sparse.dense(tensor) is tensor


def test_inner_products_of_every_pairing():
    rng = np.random.default_rng(2)
    x, x_dense = _rows(rng)
    y = x.with_values(tf.constant(rng.normal(size=x.values.shape), tf.float32))
    y_dense = row_sparse.dense(y).numpy()
    other, other_dense = _rows(rng, ids=(0, 4, 8))
    m = rng.normal(size=SHAPE).astype("float32")
    cases = [
        ((x, y), np.sum(x_dense * y_dense)),            # the same rows
        ((x, tf.constant(m)), np.sum(x_dense * m)),      # rows and dense
        ((tf.constant(m), x), np.sum(x_dense * m)),      # dense and rows
        ((x, other), np.sum(x_dense * other_dense)),     # different rows
        ((tf.constant(m), tf.constant(m)), np.sum(m * m)),
    ]
    for (a, b), expected in cases:
        np.testing.assert_allclose(row_sparse.inner(a, b).numpy(), expected,
                                   rtol=1e-5, atol=1e-6)


def test_combine_adds_the_rows_into_the_scaled_dense_step():
    rng = np.random.default_rng(3)
    u, u_dense = _rows(rng)
    m = rng.normal(size=SHAPE).astype("float32")
    for a, b in [(0.3, 0.9), (-1.5, 0.0), (0.0, 1.0)]:
        expected = a * u_dense + b * m
        np.testing.assert_allclose(
            row_sparse.combine(tf.constant(a), u, tf.constant(b), tf.constant(m)).numpy(),
            expected, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(
            row_sparse.combine(a, tf.constant(u_dense), b, tf.constant(m)).numpy(),
            expected, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(
            step_size.combine((a, b), [u], [tf.constant(m)])[0].numpy(), expected,
            rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("finite", [None, True, False])
def test_rms_step_of_rows_equals_the_dense_step(finite):
    """RMSProp's step on the rows equals `step_ops.rms_step` of the dense gradient (zero
    outside the rows); every row's second moment decays; a step that is not finite
    keeps the moment as it was."""
    rng = np.random.default_rng(4)
    grad, grad_dense = _rows(rng)
    moment = np.abs(rng.normal(size=SHAPE)).astype("float32")
    flag = None if finite is None else tf.constant(finite)
    rms, new = row_sparse.rms_step(grad, tf.constant(moment), 3, 0.999, 1e-7, flag)
    expected_rms, expected_new = step_ops.rms_step(tf.constant(grad_dense),
                                              tf.constant(moment), 3, 0.999, 1e-7)
    if finite is False:
        np.testing.assert_array_equal(new.numpy(), moment)
        return
    np.testing.assert_allclose(new.numpy(), expected_new.numpy(), rtol=1e-6)
    np.testing.assert_allclose(row_sparse.dense(rms).numpy(), expected_rms.numpy(),
                               rtol=1e-6)
    assert rms.indices is grad.indices


def test_graft_updates_of_rows_equal_the_dense_ones():
    rng = np.random.default_rng(5)
    grad, grad_dense = _rows(rng)
    update = grad.with_values(tf.constant(rng.normal(size=grad.values.shape), tf.float32))
    moment = tf.constant(np.abs(rng.normal(size=SHAPE)).astype("float32"))
    (rows,), (new,) = step_size.graft_updates([update], [grad], [moment], 2)
    (dense,), (dense_new,) = step_size.graft_updates(
        [row_sparse.dense(update)], [tf.constant(grad_dense)], [moment], 2)
    assert isinstance(rows, row_sparse.RowSparse)
    np.testing.assert_allclose(row_sparse.dense(rows).numpy(), dense.numpy(), rtol=1e-5)
    np.testing.assert_allclose(new.numpy(), dense_new.numpy(), rtol=1e-6)
    # A step that is not finite keeps the moments, dense or rows.
    for g in (grad, tf.constant(grad_dense)):
        _, (kept,) = step_size.graft_updates([update], [g], [moment], 2,
                                             finite=tf.constant(False))
        np.testing.assert_array_equal(kept.numpy(), moment.numpy())


def test_precondition_rows_keeps_the_rows():
    """`diag(L^{-1}) G R^{-1}` of a `RowSparse` is a `RowSparse` on the same rows,
    equal to the dense product."""
    rng = np.random.default_rng(6)
    grad, grad_dense = _rows(rng)
    left = rng.uniform(0.5, 2.0, size=SHAPE[0]).astype("float32")
    right = rng.normal(size=(SHAPE[1], SHAPE[1])).astype("float32")
    (update,) = ops.precondition_many([tf.constant(left)], [grad], [tf.constant(right)])
    assert isinstance(update, row_sparse.RowSparse) and update.indices is grad.indices
    np.testing.assert_allclose(row_sparse.dense(update).numpy(),
                               np.diag(left) @ grad_dense @ right, rtol=1e-5, atol=1e-6)


def test_dense_scaled_leaves_out_a_known_unit_factor():
    x = tf.constant([[1.0, -2.0]])
    assert row_sparse.dense_scaled(x, tf.constant(1.0)) is x
    assert row_sparse.dense_scaled(x, 1.0) is x
    np.testing.assert_allclose(row_sparse.dense_scaled(x, tf.constant(0.5)).numpy(),
                               [[0.5, -1.0]])

    @tf.function
    def traced(factor):
        return row_sparse.dense_scaled(x, factor)

    np.testing.assert_allclose(traced(tf.constant(3.0)).numpy(), [[3.0, -6.0]])
