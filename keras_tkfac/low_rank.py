"""Rank-k inverses of damped factors: a scaled identity plus a low-rank correction
(`inverse_rank`; pure math, as `ops`).

At the defaults a dense layer's damped Kronecker factors are a multiple of the
identity (the damping's share) but for a few directions (`tools/spectra.py`), so
their inverses are `V diag(1/theta) V^T + (I - V V^T) / t` to within a few
percent at `k = 64`: stored as `[d + 1, k + 1]` instead of `[d, d]`, applied in
`O(k d)` flops per column instead of `O(d^2)`, recomputed by a few warm-started
subspace iterations instead of a Cholesky factorisation (docs/RESULTS.md, "How far
the damped factors are from the identity").
"""

import numpy as np
import tensorflow as tf

# Subspace iterations of `low_rank_inverse` per inverse step (each starts from the
# previous basis, so the iterations add up over the inverse steps).
LOW_RANK_ITERATIONS = 4


def is_low_rank(inverse):
    """Whether `inverse` is `low_rank_inverse`'s packed `[..., d + 1, k + 1]` form
    (a dense inverse is square, a diagonal one a vector)."""
    shape = inverse.shape
    return shape.rank >= 2 and shape[-1] != shape[-2]


def low_rank_shape(shape, rank):
    """The packed shape of a `[..., d, d]` factor's rank-`rank` inverse."""
    return tuple(shape[:-2]) + (shape[-1] + 1, rank + 1)


def low_rank_identity(shape, dtype=None):
    """The packed form of the identity (scale 1, no correction)."""
    d, k = shape[-2] - 1, shape[-1] - 1
    last = tf.one_hot(d * (k + 1) + k, (d + 1) * (k + 1), dtype=dtype or tf.float32)
    return tf.broadcast_to(tf.reshape(last, [d + 1, k + 1]), shape)


def _low_rank_parts(packed):
    """`(basis V [.., d, k], coefficients c [.., k], scale s [..])` of a packed
    inverse `s I + V diag(c) V^T`."""
    d, k = packed.shape[-2] - 1, packed.shape[-1] - 1
    return packed[..., :d, :k], packed[..., d, :k], packed[..., d, k]


def low_rank_inverse(matrices, previous, iterations=None):
    """The inverse of symmetric positive-definite `matrices` as a scaled identity
    plus a rank-`k` correction, packed.

    `M^{-1} ~ V diag(1 / theta) V^T + (I - V V^T) / t`: `theta`, `V` the Ritz
    values and vectors of `M` on the `k`-dimensional subspace that `iterations`
    steps of subspace iteration (`Q <- orth(M Q)`) reach from the previous basis,
    and `t` the mean of `M`'s other eigenvalues (its trace less the Ritz values',
    over `d - k`: the approximation keeps the trace of `M`). Exact where `M`'s
    eigenvalues outside the subspace are equal (a damped factor of rank at most
    `k`, once the subspace holds its range); close to it where they nearly are (the
    damped factors of dense layers at the defaults: `tools/spectra.py`). Packed as
    `[..., d + 1, k + 1]`: `V` in the first `d` rows and `k` columns, the
    coefficients `1 / theta - 1 / t` in row `d`, the scale `1 / t` at `[d, k]`.

    Args:
        matrices: `[..., d, d]` symmetric positive-definite matrices.
        previous: the packed inverses of the previous inverse step, `[..., d + 1,
            k + 1]`; a basis of zeros (the identity's packing) starts from a fixed
            pseudo-random one.
        iterations: subspace iterations; `None`: `LOW_RANK_ITERATIONS`.

    Returns:
        `(packed, ok)`: the packed inverses and a boolean `[...]` tensor, `False`
        where the result is not finite or not positive definite.
    """
    d, k = matrices.shape[-1], previous.shape[-1] - 1
    symmetric = 0.5 * (matrices + tf.linalg.matrix_transpose(matrices))
    basis = tf.cast(_low_rank_parts(previous)[0], matrices.dtype)
    start = tf.constant(np.random.default_rng(d).normal(size=(d, k)), matrices.dtype)
    empty = tf.reduce_all(tf.equal(basis, 0.0), axis=[-2, -1])[..., None, None]
    basis = tf.where(empty, start, basis)
    for _ in range(iterations or LOW_RANK_ITERATIONS):
        basis, _ = tf.linalg.qr(tf.matmul(symmetric, basis))
    ritz = tf.matmul(basis, tf.matmul(symmetric, basis), transpose_a=True)
    values, vectors = tf.linalg.eigh(0.5 * (ritz + tf.linalg.matrix_transpose(ritz)))
    basis = tf.matmul(basis, vectors)
    tail = (tf.linalg.trace(symmetric) - tf.reduce_sum(values, axis=-1)) / (d - k)
    coefficients = 1.0 / values - 1.0 / tail[..., None]
    top = tf.concat([basis, tf.zeros_like(basis[..., :1])], axis=-1)
    bottom = tf.concat([coefficients, 1.0 / tail[..., None]], axis=-1)[..., None, :]
    packed = tf.concat([top, bottom], axis=-2)
    ok = tf.logical_and(
        tf.reduce_all(tf.math.is_finite(packed), axis=[-2, -1]),
        tf.logical_and(tf.reduce_min(values, axis=-1) > 0.0, tail > 0.0))
    return packed, ok


def multiply_left(inverse, x):
    """`inverse @ x` for a dense or packed (`low_rank_inverse`) inverse."""
    if not is_low_rank(inverse):
        return tf.matmul(inverse, x)
    basis, coefficients, scale = _low_rank_parts(inverse)
    inner = coefficients[..., :, None] * tf.matmul(basis, x, transpose_a=True)
    return scale[..., None, None] * x + tf.matmul(basis, inner)


def multiply_right(x, inverse):
    """`x @ inverse` for a dense or packed (`low_rank_inverse`) inverse."""
    if not is_low_rank(inverse):
        return tf.matmul(x, inverse)
    basis, coefficients, scale = _low_rank_parts(inverse)
    inner = tf.matmul(x, basis) * coefficients[..., None, :]
    return scale[..., None, None] * x + tf.matmul(inner, basis, transpose_b=True)
