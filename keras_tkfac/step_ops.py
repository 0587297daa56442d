"""Pure tensor math of the step controls (`keras_tkfac.step_size`,
`keras_tkfac.quadratic`, `keras_tkfac.damping`, `keras_tkfac.linearized`,
`keras_tkfac.progress`).

Functions of tensors only, as `keras_tkfac.ops`: the KL-clipping factor (Ba et al.),
RMSProp's step and the graft to its length, the quadratic model's step along the
preconditioned gradient and the previous step and its value (Martens & Grosse, 2015,
§7), the Levenberg-Marquardt rule of its damping (ibid., §6.5), and the scales that
the classifiers' loss along the step and the loss's progress set. Split out of
`ops.py` on 2026-12-07 (the same code).

References:
    - [Martens & Grosse, 2015](https://arxiv.org/abs/1503.05671) (K-FAC).
    - [Ba et al., 2017](https://openreview.net/forum?id=SkkTMpjex) (KL clipping).
"""

import tensorflow as tf


def kl_clip_factor(updates, grads, learning_rate, kl_clip):
    """KL-clipping scale `nu = min(1, sqrt(kappa / (eta^2 sum_l <U_l, G_l>)))`.

    Args:
        updates: list of preconditioned gradients `U_l`.
        grads: list of raw gradients `G_l`, same shapes.
        learning_rate: `eta`.
        kl_clip: `kappa`.

    Returns:
        The scalar `nu` in `(0, 1]`; `1` when the inner product is not positive.
    """
    inner = tf.add_n([tf.reduce_sum(u * g) for u, g in zip(updates, grads)])
    return kl_clip_factor_from_inner(inner, learning_rate, kl_clip)


def kl_clip_factor_from_inner(inner, learning_rate, kl_clip):
    """`kl_clip_factor` given the (possibly all-reduced) `sum_l <U_l, G_l>`."""
    eta = tf.cast(learning_rate, inner.dtype)
    kappa = tf.cast(kl_clip, inner.dtype)
    denom = tf.square(eta) * inner
    nu = tf.sqrt(tf.math.divide_no_nan(kappa, denom))
    return tf.where(denom > 0.0, tf.minimum(nu, 1.0), tf.ones_like(nu))


def rms_step(grad, second_moment, step, beta_2, epsilon):
    """RMSProp's bias-corrected step, and its new second moment.

    `v' = beta_2 v + (1 - beta_2) G^2` and `R = G / (sqrt(v' / (1 - beta_2^t)) + eps)`:
    Adam's step without its first moment (`|R|` is the norm Adam would move the
    layer by at learning rate 1, before momentum).

    Args:
        grad: the layer's gradient `G` (any shape).
        second_moment: `v`, same shape.
        step: `t >= 1`, the step count of the bias correction.
        beta_2: the decay of the second moment.
        epsilon: added to the root of the second moment.

    Returns:
        `(R, v')`.
    """
    new = beta_2 * second_moment + (1.0 - beta_2) * tf.square(grad)
    correction = 1.0 - tf.pow(tf.constant(beta_2, grad.dtype), tf.cast(step, grad.dtype))
    return grad / (tf.sqrt(new / correction) + epsilon), new


def rms_step_norm(grad, second_moment, step, beta_2, epsilon):
    """`(|R|, v')` of `rms_step`: the norm of RMSProp's step, and the new moment."""
    rms, new = rms_step(grad, second_moment, step, beta_2, epsilon)
    return tf.norm(rms), new


def graft(update, norm):
    """`update` rescaled to the norm `norm` (zero stays zero)."""
    return update * tf.math.divide_no_nan(norm, tf.norm(update))


def quadratic_model_step(curvature, norms, slopes, damping, max_kl=None,
                         max_decrease=None, momentum_range=None, kl_curvature=None):
    """Coefficients `(a, b)` of the step `s = a U + b M` that minimises the model
    `q(s) = -<s, G> + (1/2) s^T (C + lambda I) s` (Martens & Grosse, 2015, §7).

    `U` is the preconditioned gradient, `M` the previous step, `G` the gradient and
    `C` the exact curvature (generalised Gauss-Newton) of the loss; the weights move by
    `-s`. With `K = [<x, C y>]` and `N = [<x, y>]` over `x, y in (U, M)` and
    `r = [<U, G>, <M, G>]`, the minimiser is `(a, b) = (K + lambda N)^{-1} r`. Where
    that 2 x 2 system is singular (the first step, `M = 0`, or `M` parallel to `U`)
    the step is `a = <U, G> / (<U, C U> + lambda |U|^2)`, `b = 0`. A non-finite or
    non-positive curvature gives `(0, 0)`: no step rather than a wrong one. With
    `max_kl`, a step whose predicted KL divergence `(1/2) s^T C s` exceeds it is
    shortened to it (a safeguard; the model's minimiser is not changed otherwise);
    with `kl_curvature`, the KL is `(1/2) s^T K_kl s` instead (outputs whose KL is
    measured in other units than their loss: `quadratic.kl_curvature`).
    With `max_decrease` (a multiple of the loss, for a loss that cannot fall
    below zero), a step whose predicted decrease `-q` exceeds it is shortened to
    where the model predicts that decrease: along the minimiser `s*`,
    `q(t s*) = q(s*) (2t - t^2)`, so `t = 1 - sqrt(1 - max_decrease / -q(s*))`.
    Where the model's curvature vanishes (a saturated softmax, whose Gauss-Newton
    matrix is ~0 while the cross-entropy's gradient is not) only the damping bounds
    `s*`, and the model extrapolates the loss far below zero; a KL bound cannot
    help there, since the predicted KL is ~0 too. (With the loss itself as the
    bound this is Polyak's step length for a loss whose minimum is 0.)
    With `momentum_range = (low, high)`, `b` is within it: where the minimiser's
    `b` is outside, the step is the model's minimiser on the nearer boundary, `b`
    clipped and `a` the best for it (the minimiser over the strip, the model being
    convex);
    the bounds above then shorten it along its own ray exactly (it is not the
    ray's minimiser there, so `q(t s)` is computed rather than `q(s*) (2t - t^2)`).

    Args:
        curvature: `[2, 2]`, `K`.
        norms: `[2, 2]`, `N`.
        slopes: `[2]`, `r`.
        damping: `lambda`, a scalar.
        max_kl: optional bound on `(1/2) s^T C s`.
        max_decrease: optional bound `L >= 0` on the predicted decrease `-q(s)`
            (ignored where not positive and finite).
        momentum_range: optional `(low, high)` bounds on `b`.
        kl_curvature: optional `[2, 2]`, `K_kl`, the Gram the KL is measured with
            (default `curvature`).

    Returns:
        `(a, b, q)`: scalars, with `q <= 0` the model's value at the (unshortened)
        step.
    """
    matrix = tf.cast(curvature, tf.float64) + tf.cast(damping, tf.float64) * tf.cast(
        norms, tf.float64)
    # Entries unpacked once (each `matrix[i, j]` would be a slice of its own).
    m00, m01, m10, m11 = tf.unstack(tf.reshape(matrix, [4]))
    r0, r1 = tf.unstack(tf.cast(slopes, tf.float64))
    a_only = tf.math.divide_no_nan(r0, m00)
    det = m00 * m11 - m01 * m10
    solvable = tf.logical_and(m11 > 0.0, det > 1e-6 * tf.abs(m00 * m11))
    safe_det = tf.where(solvable, det, tf.ones_like(det))
    a_pair = (m11 * r0 - m01 * r1) / safe_det
    b_pair = (m00 * r1 - m10 * r0) / safe_det
    a = tf.where(solvable, a_pair, a_only)
    b = tf.where(solvable, b_pair, tf.zeros_like(b_pair))
    value = -0.5 * (a * r0 + b * r1)
    clipped = tf.constant(False)
    if momentum_range is not None:
        low, high = (tf.cast(x, tf.float64) for x in momentum_range)
        clipped = tf.logical_or(b < low, b > high)
        b = tf.clip_by_value(b, low, high)
        a = tf.where(clipped, tf.math.divide_no_nan(r0 - b * m01, m00), a)
        # Along the ray of `s`: `q(t s) = -t p + t^2 c / 2`.
        p = a * r0 + b * r1
        c = a * a * m00 + 2.0 * a * b * m01 + b * b * m11
        value = tf.where(clipped, -p + 0.5 * c, value)
    ok = tf.logical_and(m00 > 0.0, tf.math.is_finite(value))
    ok = tf.logical_and(ok, value <= 0.0)
    shorten = tf.ones_like(a)
    if max_kl is not None:
        max_kl = tf.cast(max_kl, tf.float64)
        coefficients = tf.stack([a, b])
        kl = 0.5 * tf.reduce_sum(coefficients * tf.linalg.matvec(
            tf.cast(curvature if kl_curvature is None else kl_curvature, tf.float64),
            coefficients))
        shorten = tf.where(kl > max_kl, tf.sqrt(tf.math.divide_no_nan(max_kl, kl)),
                           shorten)
    if max_decrease is not None:
        ratio = tf.math.divide_no_nan(tf.cast(max_decrease, tf.float64), -value)
        binds = tf.logical_and(tf.logical_and(ratio > 0.0, ratio < 1.0),
                               tf.math.is_finite(ratio))
        ratio = tf.where(binds, ratio, tf.zeros_like(ratio))
        # `1 - sqrt(1 - ratio)`, written to keep its digits at small ratios.
        along = ratio / (1.0 + tf.sqrt(1.0 - ratio))
        if momentum_range is not None:
            # The smaller root of `t^2 c / 2 - t p + L = 0`, in the same form.
            limit = tf.cast(max_decrease, tf.float64)
            root = tf.sqrt(tf.maximum(p * p - 2.0 * c * limit, 0.0))
            along = tf.where(clipped, tf.math.divide_no_nan(2.0 * limit, p + root),
                             along)
        shorten = tf.where(binds, tf.minimum(shorten, along), shorten)
    a, b = a * shorten, b * shorten
    zero = tf.zeros_like(a)
    return tuple(tf.cast(tf.where(ok, x, zero), tf.float32) for x in (a, b, value))


def quadratic_model_value(curvature, norms, slopes, damping, coefficients):
    """The quadratic model `q(s) = -<s, G> + (1/2) s^T (C + lambda I) s` at the step
    `s = c_0 U + c_1 M`, from the same `K`, `N`, `r` as `quadratic_model_step`."""
    c = tf.cast(coefficients, tf.float64)
    matrix = tf.cast(curvature, tf.float64) + tf.cast(damping, tf.float64) * tf.cast(
        norms, tf.float64)
    value = -tf.reduce_sum(c * tf.cast(slopes, tf.float64)) + 0.5 * tf.reduce_sum(
        c * tf.linalg.matvec(matrix, c))
    return tf.cast(value, tf.float32)


def levenberg_marquardt(scale, ratio, decay, low, high):
    """Martens & Grosse's (2015, §6.5) damping rule: `scale * decay` when the
    reduction ratio `ratio > 3/4`, `scale / decay` when `ratio < 1/4` or it is not
    finite, else `scale`; clipped to `[low, high]`."""
    ratio = tf.cast(ratio, tf.float32)
    poor = tf.logical_or(tf.logical_not(tf.math.is_finite(ratio)), ratio < 0.25)
    new = tf.where(ratio > 0.75, scale * decay, scale)
    new = tf.where(poor, scale / decay, new)
    return tf.clip_by_value(new, low, high)


def cap_coefficient(coefficient, ceiling, floor):
    """`coefficient` limited to `ceiling` where it is above `floor` and a ceiling is
    set (`ceiling > 0`), and never below `floor` there (`keras_tkfac.progress`)."""
    coefficient = tf.convert_to_tensor(coefficient, tf.float32)
    ceiling = tf.cast(ceiling, tf.float32)
    capped = tf.maximum(tf.minimum(coefficient, ceiling), floor)
    return tf.where(tf.logical_and(coefficient > floor, ceiling > 0.0), capped,
                    coefficient)


def linearized_rises(start, whole, rise_fraction):
    """Whether a step whose loss goes from `start` to `whole` is to be shortened
    (`keras_tkfac.linearized`): `whole` rises by more than
    `rise_fraction * |start|` or is not finite, and `start` is finite."""
    start, whole = tf.cast(start, tf.float32), tf.cast(whole, tf.float32)
    rises = tf.logical_or(tf.logical_not(tf.math.is_finite(whole)),
                          whole - start > rise_fraction * tf.abs(start))
    return tf.logical_and(rises, tf.math.is_finite(start))


def linearized_scale(losses, scales, rise_fraction):
    """The fraction of a step to take from its loss along the step
    (`keras_tkfac.linearized`).

    Args:
        losses: `[1 + n]`, the loss before the step and at each of `scales` of it.
        scales: `[n]`, the fractions tried, the whole step (`1`) first.
        rise_fraction: how far, as a fraction of `|losses[0]|`, the whole step may
            raise the loss before it is shortened.

    Returns:
        `scales[0]` where the whole step's loss rises by at most
        `rise_fraction * |losses[0]|` (or the loss before it is not finite), else
        the scale of the lowest finite loss (a non-finite one counts as the
        highest; all non-finite: the smallest scale).
    """
    losses = tf.cast(losses, tf.float32)
    scales = tf.cast(scales, tf.float32)
    start, along = losses[0], losses[1:]
    finite = tf.math.is_finite(along)
    ranked = tf.where(finite, along, tf.fill(tf.shape(along), float("inf")))
    best = tf.where(tf.reduce_any(finite), tf.argmin(ranked),
                    tf.cast(tf.size(along) - 1, tf.int64))
    rises = linearized_rises(start, along[0], rise_fraction)
    return tf.where(rises, tf.gather(scales, best), scales[0])


def loss_relative_factor(loss, peak, floor, onset=1.0):
    """`(loss / peak) / onset` clipped to `[floor, 1]`: 1 until a nonnegative loss
    has fallen to `onset` of its highest value, then the fraction it has fallen to
    beyond that; 1 where `peak <= 0` (nothing seen yet)."""
    loss, peak = tf.cast(loss, tf.float32), tf.cast(peak, tf.float32)
    factor = tf.clip_by_value(tf.math.divide_no_nan(loss, peak) / onset, floor, 1.0)
    return tf.where(peak > 0.0, factor, 1.0)
