"""An embedding's step as the rows of its batch: `RowSparse`.

An `Embedding`'s gradient `G` is non-zero only in the rows of the batch's ids, and
its block's diagonal input factor keeps the preconditioned gradient `U`
(`ops.precondition_rows`), RMSProp's step `R` and the grafted update `u = U |R| / |U|`
on those rows too. Under the grafting step controls (`"graft"`, `"graft_quadratic"`)
these are carried as `RowSparse` (the distinct ids and their rows), so that the
elementwise work on them, RMSProp's step, the graft's norms and the quadratic model's
inner products, is done on the rows alone. What is dense stays dense: the decay of
the second moment `v`, the previous step `M` (momentum carries every row), and the
step `a u + b M`.

The results are the dense computation's up to float rounding (sums in another
order). On `tools/suite.py`'s BiLSTM (a `20000 x 128` embedding, 1,280 ids a batch)
the dense form took about 45 full-size elementwise operations a step on the
embedding, this one about 12 (measured: docs/RESULTS.md, "Embedding steps on their
batch's rows").
"""

import tensorflow as tf

# Whether the grafting controls carry an embedding's step as its rows (the
# alternative, dense `[vocab, width]` tensors throughout, is kept for comparison:
# `tools/step_variants.py --variant=embedding_rows`).
ENABLED = True


class RowSparse:
    """A `[rows, width]` matrix that is zero outside the rows `indices` (distinct):
    `values[k]` is row `indices[k]`.

    Args:
        indices: int `[k]`, distinct row indices.
        values: `[k, width]`.
        shape: the dense shape `(rows, width)`, static.
    """

    __slots__ = ("indices", "values", "shape")

    def __init__(self, indices, values, shape):
        self.indices = indices
        self.values = values
        self.shape = tf.TensorShape(shape)

    def with_values(self, values):
        """The same rows with other values."""
        return RowSparse(self.indices, values, self.shape)


def from_slices(slices, shape):
    """The `RowSparse` of a gradient `tf.IndexedSlices` whose dense form has
    `shape` (ids may repeat: their rows are summed, as in the dense gradient)."""
    indices, position = tf.unique(slices.indices)
    values = tf.math.unsorted_segment_sum(
        tf.reshape(tf.cast(slices.values, tf.float32), [-1, shape[-1]]), position,
        tf.size(indices))
    return RowSparse(indices, values, shape)


def dense(x):
    """`x` as a dense tensor (a dense tensor as it is)."""
    if not isinstance(x, RowSparse):
        return x
    return tf.scatter_nd(x.indices[:, None], x.values, x.shape)


def scale(x, factor):
    """`factor * x` for a scalar `factor`."""
    if isinstance(x, RowSparse):
        return x.with_values(factor * x.values)
    return factor * x


def inner(x, y):
    """`<x, y>`, the sum of the elementwise product, where either may be a
    `RowSparse` (only its rows are multiplied)."""
    if isinstance(y, RowSparse) and not isinstance(x, RowSparse):
        x, y = y, x
    if not isinstance(x, RowSparse):
        return tf.reduce_sum(x * y)
    if isinstance(y, RowSparse):
        if y.indices is not x.indices:
            return tf.reduce_sum(x.values * tf.gather(dense(y), x.indices))
        return tf.reduce_sum(x.values * y.values)
    return tf.reduce_sum(x.values * tf.gather(y, x.indices))


def norm(x):
    """The Frobenius norm of `x`."""
    return tf.norm(x.values if isinstance(x, RowSparse) else x)


def combine(a, u, b, m):
    """`a u + b m` (dense), for scalars `a`, `b`, a dense `m` and a `u` that may be a
    `RowSparse` (then added into `b m` at its rows)."""
    if not isinstance(u, RowSparse):
        return a * u + b * m
    return tf.tensor_scatter_nd_add(b * m, u.indices[:, None], a * u.values)


def rms_step(grad, second_moment, step, beta_2, epsilon, finite=None):
    """`step_ops.rms_step` of a `RowSparse` gradient: `(R, v')` with `R` on `grad`'s rows.

    `v' = beta_2 v + (1 - beta_2) G^2` is dense (every row decays) but adds squares
    at `grad`'s rows only. Where `finite` (a scalar bool) is false, `v' = v`: the
    moment of a skipped step is kept without a dense select.
    """
    squares = (1.0 - beta_2) * tf.square(grad.values)
    decay = tf.constant(beta_2, second_moment.dtype)
    if finite is not None:
        decay = tf.where(finite, decay, 1.0)
        squares = tf.where(finite, squares, 0.0)
    new = tf.tensor_scatter_nd_add(decay * second_moment, grad.indices[:, None],
                                   squares)
    correction = 1.0 - tf.pow(tf.constant(beta_2, grad.values.dtype),
                              tf.cast(step, grad.values.dtype))
    rows = tf.gather(new, grad.indices)
    return grad.with_values(grad.values / (tf.sqrt(rows / correction) + epsilon)), new


def dense_scaled(x, factor):
    """`factor * x` as a dense tensor; where `factor` is known to be 1 when traced
    (every step control but the KL-clipping ones), `x` itself: a full-size multiply
    per layer less."""
    x = dense(x)
    return x if tf.get_static_value(factor) == 1 else factor * x
