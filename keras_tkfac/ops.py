"""Pure tensor math of TKFAC and K-FAC.

Every function here is a function of tensors only: no Keras layers, no optimizer
state. Rows are the units of the Fisher expansion: one row per example for a dense
layer, one per (example, location) pair for a convolution or a dense layer applied to
a sequence. `a` rows are layer inputs (with the homogeneous coordinate already
appended when the layer has a bias), `g` rows are gradients of the per-example loss
with respect to the layer's pre-activation output.

References:
    - [Gao et al., 2021](https://arxiv.org/abs/2011.10741) (TKFAC).
    - [Martens & Grosse, 2015](https://arxiv.org/abs/1503.05671) (K-FAC).
    - [Grosse & Martens, 2016](https://arxiv.org/abs/1602.01407) (KFC).

The step controls' math (KL clipping, the quadratic model, RMSProp's graft) is in
`keras_tkfac.step_ops`.
"""

import collections
import math

import numpy as np
import tensorflow as tf

from keras_tkfac import low_rank
from keras_tkfac import row_sparse


def append_homogeneous(a):
    """Appends a column of ones to the rows `a` (`[..., d]` -> `[..., d + 1]`)."""
    ones = tf.ones_like(a[..., :1])
    return tf.concat([a, ones], axis=-1)


def _mean(total, count):
    """`total / count`, and 0 for an empty batch (a replica may get no examples)."""
    return tf.math.divide_no_nan(total, count)


def tkfac_statistics(a, g, num_examples, a_sq=None):
    """Un-normalised TKFAC statistics of one batch.

    With `M = num_examples` and the sums over rows:

    ```
    delta = sum_r |a_r|^2 |g_r|^2 / M
    n_phi = sum_r |g_r|^2 a_r a_r^T / M       (= delta * Phi)
    n_psi = sum_r |a_r|^2 g_r g_r^T / M       (= delta * Psi)
    ```

    Args:
        a: `[rows, d_in]` input rows.
        g: `[rows, d_out]` output-gradient rows (per-example loss scale).
        num_examples: the number of examples `M` the rows come from.
        a_sq: optional `[rows]`, the rows' `|a_r|^2` where the caller has them
            cheaper than squaring `a` (`CurvatureBlock.row_norms`).

    Returns:
        `(delta, n_phi, n_psi)`: a scalar, `[d_in, d_in]` and `[d_out, d_out]`.
    """
    m = tf.cast(num_examples, a.dtype)
    if a_sq is None:
        a_sq = tf.reduce_sum(tf.square(a), axis=1)
    g_sq = tf.reduce_sum(tf.square(g), axis=1)
    delta = _mean(tf.reduce_sum(a_sq * g_sq), m)
    n_phi = _mean(tf.matmul(a * g_sq[:, None], a, transpose_a=True), m)
    n_psi = _mean(tf.matmul(g * a_sq[:, None], g, transpose_a=True), m)
    return delta, n_phi, n_psi


def tkfac_statistics_sequences(a, g, num_examples, route=None):
    """TKFAC statistics of a layer applied at every position of a sequence, kept exact.

    A sequence's gradient of the layer's weights is `W_n = sum_t a_{n,t} g_{n,t}^T`
    (`a_n^T g_n`), so its Fisher block is `E[vec(W_n) vec(W_n)^T]` and the block's
    trace and partial traces, which TKFAC's `delta`, `delta Phi`, `delta Psi` are
    (the specification's property 4), are

    ```
    delta = sum_n |W_n|_F^2 / M,  n_phi = sum_n W_n W_n^T / M,  n_psi = sum_n W_n^T W_n / M
    ```

    For one position (`T = 1`) these are `tkfac_statistics`; the row expansion
    (`tkfac_statistics` on the `N T` rows) keeps only the `t = t'` terms
    (`(a_t . a_t') (g_t . g_t')` and the like), which is exact only when positions
    are uncorrelated. Two routes give the same values: through the sequences'
    gradients `W_n` (`2 N T d_in d_out + 2 N d_in d_out (d_in + d_out)` FLOPs), or
    through the positions' Gram matrices `a_n a_n^T`, `g_n g_n^T`
    (`4 N T^2 (d_in + d_out) + 2 N T (d_in^2 + d_out^2)`); the one with fewer
    FLOPs is taken (decided on the traced shapes, at run time where they are not
    known).

    Args:
        a: `[N, T, d_in]` input rows of `N` sequences of `T` positions, or
            `[N, T, G, d_in]` for `G` independent groups.
        g: `[N, T, d_out]` (or `[N, T, G, d_out]`) output-gradient rows.
        num_examples: the number of examples `M`.
        route: `None` (the cheaper), `"gradients"` or `"grams"`.

    Returns:
        `(delta, n_phi, n_psi)` as `tkfac_statistics` returns them, or with a
        leading `[G]` axis for groups (as `tkfac_statistics_grouped`).
    """
    grouped = a.shape.rank == 4
    if not grouped:
        a, g = a[:, :, None], g[:, :, None]
    m = tf.cast(num_examples, a.dtype)

    def through_gradients():
        w = tf.einsum("ntgi,ntgo->gnio", a, g)
        return (tf.reduce_sum(tf.square(w), axis=[1, 2, 3]),
                tf.einsum("gnio,gnjo->gij", w, w), tf.einsum("gnio,gnip->gop", w, w))

    def through_grams():
        a_gram = tf.einsum("ntgi,nsgi->gnts", a, a)
        g_gram = tf.einsum("ntgo,nsgo->gnts", g, g)
        return (tf.reduce_sum(a_gram * g_gram, axis=[1, 2, 3]),
                tf.einsum("ntgi,gntj->gij", a, tf.einsum("gnts,nsgj->gntj", g_gram, a)),
                tf.einsum("ntgo,gntp->gop", g, tf.einsum("gnts,nsgp->gntp", a_gram, g)))

    if route is None:
        t, d_in, d_out = (x.shape[axis] if x.shape[axis] is not None
                          else tf.cast(tf.shape(x)[axis], tf.int64)
                          for x, axis in ((a, 1), (a, -1), (g, -1)))
        gradients = d_in * d_out * (t + d_in + d_out)
        grams = 2 * t * t * (d_in + d_out) + t * (d_in * d_in + d_out * d_out)
        if isinstance(gradients, int) and isinstance(grams, int):
            route = "gradients" if gradients <= grams else "grams"
        else:
            found = tf.cond(gradients <= grams, through_gradients, through_grams)
    if route is not None:
        found = through_gradients() if route == "gradients" else through_grams()
    found = [_mean(f, m) for f in found]
    return tuple(found) if grouped else tuple(f[0] for f in found)


def kfac_statistics(a, g, num_examples):
    """K-FAC (KFC for convolutions) factors of one batch.

    `A = sum_r a_r a_r^T / M` and `G = sum_r g_r g_r^T / (M T)` with `T = rows / M`
    the number of locations per example, so that `A ⊗ G` approximates the sum over
    locations of the per-location blocks (Grosse & Martens, 2016).

    Args:
        a: `[rows, d_in]` input rows.
        g: `[rows, d_out]` output-gradient rows (per-example loss scale).
        num_examples: the number of examples `M` the rows come from.

    Returns:
        `(A, G)`: `[d_in, d_in]` and `[d_out, d_out]`.
    """
    m = tf.cast(num_examples, a.dtype)
    rows = tf.cast(tf.shape(a)[0], a.dtype)
    a_factor = _mean(tf.matmul(a, a, transpose_a=True), m)
    g_factor = _mean(tf.matmul(g, g, transpose_a=True), rows)
    return a_factor, g_factor


def tkfac_statistics_diagonal(ids, g, num_examples, vocab):
    """TKFAC statistics of a layer whose inputs are one-hot (an embedding).

    With `a_r = e_{ids_r}`, `|a_r|^2 = 1` and `a_r a_r^T` is diagonal, so `n_phi` is
    kept as its diagonal, a `[vocab]` vector; no `vocab x vocab` matrix is built.

    Args:
        ids: `[rows]` integer indices of the one-hot inputs.
        g: `[rows, d_out]` output-gradient rows.
        num_examples: the number of examples `M`.
        vocab: the input dimension (number of possible ids).

    Returns:
        `(delta, n_phi_diagonal, n_psi)`.
    """
    m = tf.cast(num_examples, g.dtype)
    g_sq = tf.reduce_sum(tf.square(g), axis=1)
    delta = _mean(tf.reduce_sum(g_sq), m)
    n_phi = _mean(tf.math.unsorted_segment_sum(g_sq, ids, vocab), m)
    n_psi = _mean(tf.matmul(g, g, transpose_a=True), m)
    return delta, n_phi, n_psi


def kfac_statistics_diagonal(ids, g, num_examples, vocab):
    """K-FAC factors of an embedding: `A` is diagonal (id frequencies), a vector."""
    m = tf.cast(num_examples, g.dtype)
    rows = tf.cast(tf.shape(g)[0], g.dtype)
    counts = tf.math.unsorted_segment_sum(tf.ones_like(g[:, 0]), ids, vocab)
    return _mean(counts, m), _mean(tf.matmul(g, g, transpose_a=True), rows)


def tkfac_statistics_grouped(a, g, num_examples, a_sq=None):
    """`tkfac_statistics` for `G` independent groups (depthwise convolutions).

    Args:
        a: `[rows, G, d_in]`; g: `[rows, G, d_out]`; a_sq: optional `[rows, G]`,
            as `tkfac_statistics`' `a_sq`.

    Returns:
        `(delta [G], n_phi [G, d_in, d_in], n_psi [G, d_out, d_out])`.
    """
    m = tf.cast(num_examples, a.dtype)
    if a_sq is None:
        a_sq = tf.reduce_sum(tf.square(a), axis=-1)
    g_sq = tf.reduce_sum(tf.square(g), axis=-1)
    delta = _mean(tf.reduce_sum(a_sq * g_sq, axis=0), m)
    a_t, g_t = _group_major(a), _group_major(g)
    n_phi = _mean(tf.matmul(a_t * tf.transpose(g_sq)[..., None], a_t, transpose_a=True), m)
    n_psi = _mean(tf.matmul(g_t * tf.transpose(a_sq)[..., None], g_t, transpose_a=True), m)
    return delta, n_phi, n_psi


def kfac_statistics_grouped(a, g, num_examples):
    """`kfac_statistics` for `G` independent groups: `[G, d, d]` factors."""
    m = tf.cast(num_examples, a.dtype)
    rows = tf.cast(tf.shape(a)[0], a.dtype)
    a_t, g_t = _group_major(a), _group_major(g)
    a_factor = _mean(tf.matmul(a_t, a_t, transpose_a=True), m)
    g_factor = _mean(tf.matmul(g_t, g_t, transpose_a=True), rows)
    return a_factor, g_factor


def _group_major(x):
    """`[rows, G, d]` as `[G, rows, d]`, for one batched matmul over groups.

    On 2 CPU cores, for 16,000 rows of 64 groups of 2 (a BatchNormalization on a
    sequence), TensorFlow's three-operand einsum took 4x longer (980 vs 250 ms).
    """
    return tf.transpose(x, [1, 0, 2])


def _per_matrix(value, matrix):
    """Reshapes a per-group `[G]` value to broadcast against `[G, d, d]` matrices."""
    value = tf.cast(value, matrix.dtype)
    if value.shape.rank and matrix.shape.rank == value.shape.rank + 2:
        value = value[..., None, None]
    return value


def add_to_diagonal(matrix, value):
    """Returns `matrix + value * I`; a vector stands for a diagonal matrix.

    `value` may hold one value per group for a `[G, d, d]` batch of matrices.
    """
    if matrix.shape.rank == 1:
        return matrix + _per_matrix(value, matrix)
    diagonal = tf.linalg.diag_part(matrix)
    value = tf.cast(value, matrix.dtype)
    if value.shape.rank and diagonal.shape.rank == value.shape.rank + 1:
        value = value[..., None]
    # `set_diag`, not `matrix + value * I`: the same values (the off-diagonal
    # entries are not touched) in three graph nodes instead of `tf.eye`'s dozen.
    return tf.linalg.set_diag(matrix, diagonal + value)


def _mean_eigenvalue(factor, floor):
    """`tr(F) / dim(F)`, the trace floored at `floor`; a vector is a diagonal.

    A `[G, d, d]` batch gives one value per group.
    """
    trace = tf.reduce_sum(factor) if factor.shape.rank == 1 else tf.linalg.trace(factor)
    return tf.maximum(trace, floor) / tf.cast(tf.shape(factor)[-1], factor.dtype)


def tkfac_damped_factors(delta, n_phi, n_psi, damping, balance=None):
    """TKFAC's damped factors `Phi^ = sqrt(delta) Phi + sqrt(lambda) I` and `Psi^`.

    `sqrt(delta) Phi = n_phi / sqrt(delta)`. By default the damping is split evenly
    over the two factors (the specification's rule: the trace normalisation balances
    the factors' traces). With `balance = pi` the split is
    `Phi^ = sqrt(delta) Phi + pi sqrt(lambda) I`, `Psi^ = sqrt(delta) Psi +
    (sqrt(lambda) / pi) I`: the Kronecker product's `lambda I` term is the same, and
    `pi = sqrt(d_out / d_in)` (`balanced_split`) gives each factor the same damping
    relative to its mean eigenvalue (`1 / d_in` and `1 / d_out`), as K-FAC's
    pi-correction does. A zero `delta` (no curvature seen) gives the damping alone.

    Args:
        delta: scalar (or `[G]`), the (bias-corrected) Fisher trace.
        n_phi: `[d_in, d_in]`, the un-normalised input factor `delta * Phi`.
        n_psi: `[d_out, d_out]`, the un-normalised output factor `delta * Psi`.
        damping: scalar `lambda > 0`.
        balance: `None` (even split) or a positive scalar `pi`.

    Returns:
        `(phi_hat, psi_hat)`.
    """
    root_delta = tf.sqrt(tf.maximum(delta, 0.0))
    inv_root_delta = tf.math.divide_no_nan(tf.ones_like(root_delta), root_delta)
    root_damping = tf.sqrt(tf.cast(damping, n_phi.dtype))
    left_damping = right_damping = root_damping
    if balance is not None:
        balance = (tf.cast(balance, n_phi.dtype) if tf.is_tensor(balance)
                   else tf.constant(balance, n_phi.dtype))  # a Python float exactly
        left_damping, right_damping = root_damping * balance, root_damping / balance
    phi_hat = add_to_diagonal(n_phi * _per_matrix(inv_root_delta, n_phi), left_damping)
    psi_hat = add_to_diagonal(n_psi * _per_matrix(inv_root_delta, n_psi), right_damping)
    return phi_hat, psi_hat


def balanced_split(d_in, d_out):
    """`pi = sqrt(d_out / d_in)`: the split of `tkfac_damped_factors` that damps
    `Phi^` (`d_in x d_in`, trace `sqrt(delta)`) and `Psi^` (`d_out x d_out`, the same
    trace) by the same multiple of their mean eigenvalues."""
    return math.sqrt(float(d_out) / float(d_in))


def trace_relative_damping(delta, dim, floor, scale=1.0):
    """The TKFAC trace-relative damping `lambda = scale * max(delta, floor) / dim`.

    `delta / dim` is the mean eigenvalue of the Fisher block of a layer with `dim`
    parameters. Used for convolution layers (`conv_damping="trace"`).
    """
    dtype = delta.dtype
    return tf.cast(scale, dtype) * tf.maximum(delta, tf.cast(floor, dtype)) / tf.cast(
        dim, dtype)


def trace_capped_damping(damping, delta, cap, floor):
    """`min(damping, cap * max(delta, floor))`: a damping at most `cap` times the
    block's Fisher trace `delta` (`TKFAC`'s `trace_damping_cap`; a `[G]` `delta`
    gives one damping per group)."""
    delta = tf.convert_to_tensor(delta)
    dtype = delta.dtype
    return tf.minimum(tf.cast(damping, dtype),
                      tf.cast(cap, dtype) * tf.maximum(delta, tf.cast(floor, dtype)))


def kfac_damped_factors(a_factor, g_factor, damping, min_trace=1e-12):
    """K-FAC factored Tikhonov damping with the pi-correction.

    `A + pi sqrt(lambda) I`, `G + sqrt(lambda) / pi I` with
    `pi = sqrt((tr A / dim A) / (tr G / dim G))` (Martens & Grosse, 2015, §6.3).
    Traces are floored at `min_trace` so that an all-zero factor gives a finite pi.
    """
    pi = tf.sqrt(_mean_eigenvalue(a_factor, min_trace) / _mean_eigenvalue(g_factor, min_trace))
    root_damping = tf.sqrt(tf.cast(damping, a_factor.dtype))
    return (
        add_to_diagonal(a_factor, pi * root_damping),
        add_to_diagonal(g_factor, root_damping / pi),
    )


# Matrices up to this size are inverted by Cholesky and `cholesky_solve`; larger ones
# by `_block_inverse`'s halving into Schur complements, down to blocks of this size.
CHOLESKY_MAX_DIM = 384


def symmetric_inverse(matrices):
    """Inverses of a batch of symmetric positive-definite matrices, with a finite check.

    Up to `CHOLESKY_MAX_DIM` rows (or a size unknown when traced), a Cholesky
    factorisation and `cholesky_solve` with the identity. Larger matrices are halved
    into Schur complements (`_block_inverse`) so that most of the work is matrix
    products: on 2 CPU cores TensorFlow's triangular solves run at a fifth of its
    matmul rate, and the halving inverts a 1601x1601 factor in 46 ms against 181 ms
    (785: 11 against 23 ms) with the same error against float64
    (`tools/inverse_costs.py`). Cholesky of a matrix that is not positive definite
    silently yields NaN, and so does the halving (a symmetric matrix is positive
    definite exactly when its leading block and that block's Schur complement are,
    down to the Cholesky blocks), so the result comes with a per-matrix flag.

    Args:
        matrices: `[..., d, d]` symmetric matrices.

    Returns:
        `(inverses, ok)`: the inverses and a boolean `[...]` tensor, `False` where the
        inverse is not finite (the caller must not use it).
    """
    symmetric = 0.5 * (matrices + tf.linalg.matrix_transpose(matrices))
    inverses = _block_inverse(symmetric)
    ok = tf.reduce_all(tf.math.is_finite(inverses), axis=[-2, -1])
    return inverses, ok


def _block_inverse(matrices):
    """Inverse of symmetric positive-definite `[..., d, d]` matrices by halving.

    With `A = [[P, Q], [Q^T, R]]`, `T = P^-1 Q` and the Schur complement
    `S = R - Q^T T`, `A^-1 = [[P^-1 + T S^-1 T^T, -T S^-1], [-S^-1 T^T, S^-1]]`;
    `P` and `S` are inverted the same way. About `4/3 d^3` flops of products against
    Cholesky and `cholesky_solve`'s `7/3 d^3`, most of them in triangular solves.
    """
    d = matrices.shape[-1]
    if d is None or d <= CHOLESKY_MAX_DIM:
        chol = tf.linalg.cholesky(matrices)
        return tf.linalg.cholesky_solve(chol, _identity_like(matrices))
    k = d // 2
    top = _block_inverse(matrices[..., :k, :k])
    coupling = matrices[..., :k, k:]
    solved = tf.matmul(top, coupling)
    schur = matrices[..., k:, k:] - tf.matmul(coupling, solved, transpose_a=True)
    bottom = _block_inverse(0.5 * (schur + tf.linalg.matrix_transpose(schur)))
    corner = -tf.matmul(solved, bottom)
    top = top - tf.matmul(corner, solved, transpose_b=True)
    top = 0.5 * (top + tf.linalg.matrix_transpose(top))
    return tf.concat([tf.concat([top, corner], -1),
                      tf.concat([tf.linalg.matrix_transpose(corner), bottom], -1)], -2)


def _identity_like(matrices):
    """Identity matrices of `matrices`' shape, from its static shape where known
    (fewer graph nodes than from `tf.shape`)."""
    shape = matrices.shape
    if shape.is_fully_defined():
        return tf.eye(shape[-1], batch_shape=shape[:-2], dtype=matrices.dtype)
    return tf.eye(tf.shape(matrices)[-1], batch_shape=tf.shape(matrices)[:-2],
                  dtype=matrices.dtype)


def diagonal_inverse(diagonals):
    """Inverses of a batch of positive diagonals, with the same flag as above."""
    inverses = 1.0 / diagonals
    ok = tf.reduce_all(
        tf.logical_and(tf.math.is_finite(inverses), diagonals > 0), axis=-1
    )
    return inverses, ok


def precondition(left_inverse, grad_matrix, right_inverse):
    """`U = L^{-1} G R^{-1}` for a `[d_in, d_out]` gradient matrix `G`.

    A `left_inverse` of one rank less than `grad_matrix` is the diagonal of a
    diagonal `L^{-1}`; `[G, ...]` batches (grouped layers, or layers of equal shape
    stacked) multiply matrix by matrix.
    """
    right = low_rank.multiply_right(grad_matrix, right_inverse)
    if left_inverse.shape.rank == grad_matrix.shape.rank - 1:
        return left_inverse[..., None] * right
    return low_rank.multiply_left(left_inverse, right)


FactoredGradient = collections.namedtuple("FactoredGradient", ["a", "g", "matrix"])
FactoredGradient.__doc__ = """A layer's gradient matrix with the rows it is the sum of.

`matrix = a^T g`: `a` `[rows, d_in]` are the layer's inputs (with the bias column)
and `g` `[rows, d_out]` the loss's gradients with respect to its outputs, one row
per example (per position, for a dense layer applied to sequences).
"""

LazyFactoredGradient = collections.namedtuple("LazyFactoredGradient",
                                              ["rows", "build", "matrix"])
LazyFactoredGradient.__doc__ = """A `FactoredGradient` whose rows are built on demand.

`rows` is their number (an integer scalar tensor) and `build()` returns `(a, g)`;
`precondition_factored_or_full` calls it only inside the branch that takes the
factored form (a convolution's im2col patches, worth building only there).
"""


def full_precondition_flops(d_in, d_out):
    """Multiply-adds x 2 of `L^{-1} G R^{-1}` for a `[d_in, d_out]` `G`."""
    return 2 * d_in * d_out * (d_in + d_out)


def factored_precondition_flops(rows, d_in, d_out):
    """Multiply-adds x 2 of `(L^{-1} a^T)(g R^{-1})` for `rows` rows."""
    return 2 * rows * (d_in * d_in + d_out * d_out + d_in * d_out)


def precondition_factored(left_inverse, a, g, right_inverse):
    """`U = L^{-1} (a^T g) R^{-1}`, computed as `(L^{-1} a^T)(g R^{-1})`.

    Fewer flops than forming `G = a^T g` first when the rows are fewer than about
    `d_in d_out (d_in + d_out) / (d_in^2 + d_out^2 + d_in d_out)` (see
    `factored_precondition_flops`); the same `U` up to float rounding.
    """
    if low_rank.is_low_rank(left_inverse):
        left = low_rank.multiply_left(left_inverse, tf.transpose(a))
    else:
        left = tf.matmul(left_inverse, a, transpose_b=True)
    return tf.matmul(left, low_rank.multiply_right(g, right_inverse))


def rows_give_gradient(grad, rtol=1e-2):
    """Whether `grad.a^T grad.g` is `grad.matrix`, checked along one direction.

    Freivalds' test with a fixed pseudo-random sign vector `r`: `G r` against
    `a^T (g r)`, `2 (d_in d_out + rows (d_in + d_out))` flops. A term of the gradient
    that the rows do not carry (a weight shared with another layer, an `add_loss` on
    the kernel, a clipped or accumulated gradient) shows as a difference; float
    rounding (float16 backward passes included) stays far below `rtol`.

    Returns:
        A scalar boolean tensor.
    """
    d_out = int(grad.matrix.shape[-1])
    signs = np.random.default_rng(d_out).choice([-1.0, 1.0], size=d_out)
    probe = tf.constant(signs, grad.matrix.dtype)
    direct = tf.linalg.matvec(grad.matrix, probe)
    via_rows = tf.linalg.matvec(grad.a, tf.linalg.matvec(grad.g, probe),
                                transpose_a=True)
    return tf.norm(direct - via_rows) <= rtol * tf.norm(direct)


def precondition_factored_or_full(left_inverse, grad, right_inverse, dtype=tf.float32):
    """`L^{-1} G R^{-1}` for a `FactoredGradient`, in the form with fewer flops.

    The factored form is taken when it has fewer flops (decided when tracing for a
    static number of rows, else at run time) and the rows give the gradient
    (`rows_give_gradient`); otherwise the full form. Both branches are a `tf.cond`.
    A `LazyFactoredGradient`'s rows are built inside the branch that may take the
    factored form.
    """
    d_in, d_out = (int(d) for d in grad.matrix.shape)
    full_flops = full_precondition_flops(d_in, d_out)
    left, right = tf.cast(left_inverse, dtype), tf.cast(right_inverse, dtype)

    def factored(item=grad):
        return precondition_factored(left, tf.cast(item.a, dtype),
                                     tf.cast(item.g, dtype), right)

    def full():
        return precondition(left, tf.cast(grad.matrix, dtype), right)

    if low_rank.is_low_rank(left) or low_rank.is_low_rank(right):
        # (A low-rank inverse is cheaper on the gradient matrix than on the rows.)
        return tf.cast(full(), grad.matrix.dtype)
    if isinstance(grad, LazyFactoredGradient):

        def built_and_checked():
            item = FactoredGradient(*grad.build(), grad.matrix)
            return tf.cond(rows_give_gradient(item), lambda: factored(item), full)

        fewer = factored_precondition_flops(
            tf.cast(grad.rows, tf.float64), d_in, d_out) < full_flops
        return tf.cast(tf.cond(fewer, built_and_checked, full), grad.matrix.dtype)
    rows = grad.a.shape[0]
    if rows is not None:
        if factored_precondition_flops(rows, d_in, d_out) >= full_flops:
            return tf.cast(full(), grad.matrix.dtype)
        use_rows = rows_give_gradient(grad)
    else:
        rows = tf.cast(tf.shape(grad.a)[0], tf.float64)
        use_rows = tf.logical_and(
            factored_precondition_flops(rows, d_in, d_out) < full_flops,
            rows_give_gradient(grad))
    return tf.cast(tf.cond(use_rows, factored, full), grad.matrix.dtype)


def precondition_many(left_inverses, grad_matrices, right_inverses, dtype=tf.float32):
    """`precondition` of many layers: one batched product per group of equal shapes.

    Layers whose `(L^{-1}, G, R^{-1})` have the same shapes are stacked and
    multiplied by one batched matmul. The products run in `dtype` (`bfloat16`
    halves the bytes moved and uses the low-precision matmul units where there
    are some; every operand and the intermediate product `G R^{-1}` are rounded
    to 8 significant bits) and the updates are returned in the gradients' dtype.

    Args:
        left_inverses: list of `L^{-1}`, one per layer.
        grad_matrices: list of gradient matrices `G`, same order; a
            `tf.IndexedSlices` or `row_sparse.RowSparse` (an embedding's gradient,
            with a diagonal `L^{-1}`) is preconditioned by `precondition_rows`, a
            `FactoredGradient` or `LazyFactoredGradient` by
            `precondition_factored_or_full`.
        right_inverses: list of `R^{-1}`, same order.
        dtype: the dtype of the products, or a list of one per layer. Defaults to
            `float32`.

    Returns:
        The list of updates `U`, in the order of the inputs.
    """
    groups = collections.defaultdict(list)
    updates = [None] * len(grad_matrices)
    dtypes = (list(dtype) if isinstance(dtype, (list, tuple))
              else [dtype] * len(grad_matrices))
    for i, triple in enumerate(zip(left_inverses, grad_matrices, right_inverses)):
        if isinstance(triple[1], (tf.IndexedSlices, row_sparse.RowSparse)):
            updates[i] = precondition_rows(*triple, dtypes[i])
            continue
        if isinstance(triple[1], (FactoredGradient, LazyFactoredGradient)):
            updates[i] = precondition_factored_or_full(*triple, dtypes[i])
            continue
        groups[(tf.as_dtype(dtypes[i]),)
               + tuple(tuple(m.shape) for m in triple)].append(i)
    for key, indices in groups.items():
        operands = [
            [tf.cast(matrices[i], key[0]) for i in indices]
            for matrices in (left_inverses, grad_matrices, right_inverses)
        ]
        if len(indices) == 1:
            (i,) = indices
            update = precondition(*(o[0] for o in operands))
            updates[i] = tf.cast(update, grad_matrices[i].dtype)
            continue
        stacked = precondition(*(tf.stack(o) for o in operands))
        for i, update in zip(indices, tf.unstack(stacked)):
            updates[i] = tf.cast(update, grad_matrices[i].dtype)
    return updates


def precondition_rows(left_diagonal, grad_rows, right_inverse, dtype=tf.float32):
    """`diag(L^{-1}) G R^{-1}` for a `G` whose only non-zero rows are `grad_rows`.

    An embedding's gradient is non-zero only in the rows of the batch's ids, and a
    diagonal left factor keeps the other rows zero, so only those rows are
    multiplied: `k d_out^2` flops for `k` looked-up ids instead of
    `vocab d_out^2`. Repeated ids are summed, as in the dense gradient.

    Args:
        left_diagonal: `[vocab]`, the diagonal of `L^{-1}`.
        grad_rows: `tf.IndexedSlices` of `G`: `values [k, d_out]`, `indices [k]`;
            or a `row_sparse.RowSparse` (distinct rows).
        right_inverse: `[d_out, d_out]`.
        dtype: the dtype of the product. Defaults to `float32`.

    Returns:
        The dense `[vocab, d_out]` update, in the gradient's dtype; for a
        `RowSparse`, the `RowSparse` of the update on the same rows.
    """
    width = (right_inverse.shape[-2] - 1 if low_rank.is_low_rank(right_inverse)
             else right_inverse.shape[-1])
    values = tf.reshape(grad_rows.values, [-1, width])
    rows = tf.gather(left_diagonal, grad_rows.indices)[:, None] * tf.cast(
        values, left_diagonal.dtype)
    product = low_rank.multiply_right(tf.cast(rows, dtype),
                                      tf.cast(right_inverse, dtype))
    if isinstance(grad_rows, row_sparse.RowSparse):
        return grad_rows.with_values(tf.cast(product, values.dtype))
    return tf.math.unsorted_segment_sum(
        tf.cast(product, values.dtype), grad_rows.indices, left_diagonal.shape[0])


def all_finite(tensors):
    """Whether every element of every tensor in `tensors` is finite (a scalar bool).

    A `tf.IndexedSlices` (an embedding's gradient) is checked by its values, not
    made dense first (on the suite's transformer that was a `[20000, 32]` scatter
    and its test every step: 3.4 of 149 ms of op time, no wall-clock difference
    resolved; docs/RESULTS.md). Its rows at repeated indices are summed when it is
    applied; a sum of finite values that overflows float32 is not caught here.
    """
    return tf.reduce_all([
        tf.reduce_all(tf.math.is_finite(
            t.values if isinstance(t, tf.IndexedSlices) else t)) for t in tensors])


_compiled = {}


def _read(value):
    """A variable's value as a tensor; anything else as it is."""
    if isinstance(value, tf.Variable) or (
            hasattr(value, "__tf_tensor__") and not isinstance(value, tf.Tensor)):
        return tf.convert_to_tensor(value)
    return value


def compiled(fn):
    """`fn` (one of these pure functions) compiled with XLA, one `tf.function` each.

    The `tf.function` is shared by every model of the process, so its arguments are
    read into tensors first: a variable passed as an argument is part of the
    signature, and a `MirroredVariable` (what a Keras variable's `.value` is under a
    `MirroredStrategy`) made the next model with the same shapes reuse the first
    model's trace, which had captured the first model's variables: its layers were
    preconditioned with the first model's inverses.
    """
    if fn not in _compiled:
        _compiled[fn] = tf.function(fn, jit_compile=True, reduce_retracing=True)
    function = _compiled[fn]

    def call(*args):
        return function(*tf.nest.map_structure(_read, args))

    return call
