"""Which loss gives the Fisher's output gradients, and how labels are sampled.

The true Fisher uses labels sampled from the model's own predictive distribution
(one Monte-Carlo sample per example); the empirical Fisher uses the real labels. For
every supported loss the sampling is chosen so that `E[g g^T]` over the samples equals
the Hessian of the loss with respect to the model output (the generalised
Gauss-Newton matrix):

- sparse / categorical cross-entropy: a class drawn from the predicted distribution;
- binary cross-entropy: a Bernoulli draw per output unit, the cotangent scaled by
  `sqrt(D)` because Keras averages the loss over the `D` units of the last axis;
- mean squared error: `y = f(x) + sqrt(D / 2) * eps`, `eps ~ N(0, I)`, with `D` the
  size of the last axis. Keras's MSE is `|y - f|^2 / D`; for the `|y - f|^2 / 2`
  normalisation this is the unit-variance Gaussian of the specification.
- Poisson (Keras's `f - y log(f + eps)`, a mean over the `D` units, `f` the rate):
  `y = f + eps + sqrt(D f) * n`, `n ~ N(0, I)`, whose loss gradient
  `-sqrt(f) n / (sqrt(D) (f + eps))` has `E[g g^T] = diag(f / (f + eps)^2) / D`:
  the Poisson distribution's Fisher in its rate, the expectation `1 / (D f)` of the
  Hessian `y / (D f^2)` (bounded as `f -> 0`, where the Hessian at a real count is
  not). Gaussian draws with the Poisson's mean and variance rather than counts:
  the Fisher needs only their second moments. Not in the specification; chosen by
  measurement over the empirical Fisher Poisson took until 2026-12-08
  (`tools/robust_losses.py`, README "Losses").
- mean squared logarithmic error (Keras's `|log(1 + f) - log(1 + y)|^2 / D`, `f` and
  `y` clipped below at Keras's epsilon): a squared error in `log(1 + f)`, whose
  Gauss-Newton matrix in `f` is `diag(2 / (1 + f)^2) / D` (zero where `f` is clipped).
  Labels drawn in log space would be clipped too where the draw falls below
  `log(1 + eps)`, so the cotangent is drawn directly, `sqrt(2 / D) n / (1 + f)`
  (`msle_cotangent`). Measured over the empirical Fisher it took until 2026-12-08
  (README "Losses").

- Keras's elementwise losses with a positive semi-definite Hessian in the output
  (Huber, log-cosh, squared hinge; `loss_specs._HESSIAN_LOSSES`): no predictive
  distribution, but their Hessian at the real labels is diagonal, `H = diag(h)` (Huber:
  `1{|y - f| <= delta} / D`; log-cosh: `sech^2(y - f) / D`; squared hinge:
  `2 y^2 1{y f < 1} / D`), so the cotangent `sqrt(h) * eps`, `eps ~ N(0, I)`, has
  `E[c c^T] = H`: the generalised Gauss-Newton matrix, as for the losses above
  (where the Hessian is zero, on Huber's linear part, the term adds no curvature,
  as in the Gauss-Newton matrix). This is not in the specification, which defines
  the Fisher for cross-entropies and squared errors only; chosen by measurement
  over the empirical Fisher these losses took until 2026-12-07 (README, "Losses").

Any other loss (MAE, MAPE, focal cross-entropy, KL divergence, a user's function)
has no sampling rule here: with `fisher="true"` its output takes the empirical Fisher
(its real labels) instead, logged once per loss, so that any loss Keras trains with
trains here too.

Models with several outputs: Keras's loss is `L = sum_k w_k L_k`, each output's loss
`L_k` a mean over its `M_k` loss terms and `w_k` its `loss_weights` entry. Each output
samples from its own predictive distribution with its own stream of random numbers, so
that the samples of different outputs are independent; the Fisher of `L` is then the
weighted sum of the outputs' Fishers (the cross terms vanish in expectation), and one
backward pass of the cotangents `sqrt(w_k M / M_k) * c_k` (with `M` the count of the
first output with a loss, by which the statistics are divided) gives it exactly:
`(1 / M) E[g g^T] = sum_k (w_k / M_k) J_k^T H_k J_k`. The empirical Fisher uses the
same cotangents with each output's real labels.

Which loss each output has, and how its terms are counted, masked and weighted, is
`keras_tkfac.loss_specs` (`resolve_losses`, `LossSpec`, `OutputLoss`).
"""

import numpy as np
import tensorflow as tf
import keras

from keras_tkfac import loss_specs


def _mix(x):
    """A 32-bit integer hash (`lowbias32`), bit-exact in TensorFlow and XLA."""
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16))
    x = x * tf.constant(0x7FEB352D, tf.uint32)
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 15))
    x = x * tf.constant(0x846CA68B, tf.uint32)
    return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16))


def _uniform(shape, seed, stream=0):
    """Uniform samples in `(0, 1)` from a counter-based hash of `seed` (`[2]` int32).

    TensorFlow's stateless random ops draw different numbers with and without XLA
    for the same seed (measured on TF 2.21), so `jit_compile=True` would sample
    other labels; integer hashing gives the same bits on every device and compiler.
    """
    seed = tf.cast(seed, tf.uint32)
    key = _mix(seed[0] ^ _mix(seed[1] + tf.constant(0x9E3779B9 + stream, tf.uint32)))
    counter = tf.cast(tf.range(tf.reduce_prod(shape)), tf.uint32)
    bits = tf.bitwise.right_shift(_mix(counter ^ key), 8)
    uniform = (tf.cast(bits, tf.float32) + 0.5) * (1.0 / 2**24)
    return tf.reshape(uniform, shape)


def sample_targets(spec, y_pred, seed):
    """Labels drawn from the model's predictive distribution (no gradient).

    The draws depend only on `seed` and are the same with and without XLA.
    """
    y_pred = tf.stop_gradient(y_pred)
    if (spec.kind in loss_specs._AXIS_KINDS
            and loss_specs.class_last(spec, y_pred) is not y_pred):
        last = spec._replace(axis=-1)
        return loss_specs.class_last(
            spec, sample_targets(last, loss_specs.class_last(spec, y_pred), seed),
            inverse=True)
    if spec.kind in ("sparse_categorical_crossentropy", "categorical_crossentropy"):
        num_classes = tf.shape(y_pred)[-1]
        logits = tf.cast(tf.reshape(y_pred, [-1, num_classes]), tf.float32)
        if not spec.from_logits:
            logits = tf.math.log(tf.maximum(logits, 1e-12))
        # Gumbel-max: argmax(logits + Gumbel noise) is a draw from softmax(logits).
        gumbel = -tf.math.log(-tf.math.log(_uniform(tf.shape(logits), seed)))
        labels = tf.argmax(logits + gumbel, axis=-1, output_type=tf.int32)
        labels = tf.minimum(labels, num_classes - 1)
        labels = tf.reshape(labels, tf.shape(y_pred)[:-1])
        if spec.kind == "categorical_crossentropy":
            return tf.one_hot(labels, num_classes, dtype=y_pred.dtype)
        return labels
    if spec.kind == "binary_crossentropy":
        probs = tf.sigmoid(y_pred) if spec.from_logits else y_pred
        noise = tf.cast(_uniform(tf.shape(y_pred), seed), y_pred.dtype)
        return tf.cast(noise < probs, y_pred.dtype)
    if spec.kind == "mean_squared_error":
        width = tf.cast(units(y_pred), y_pred.dtype)
        return y_pred + tf.sqrt(width / 2.0) * _normal(y_pred, seed)
    if spec.kind == "poisson":
        width = tf.cast(units(y_pred), y_pred.dtype)
        rate = tf.maximum(y_pred, tf.zeros_like(y_pred))
        epsilon = tf.constant(keras.backend.epsilon(), y_pred.dtype)
        return rate + epsilon + tf.sqrt(width * rate) * _normal(y_pred, seed)
    raise ValueError(f"Cannot sample targets for loss kind {spec.kind!r}")


def units(y_pred):
    """`D`, the units a loss term averages over: the last axis, or 1 for a `[B]`
    output (each example a term of one unit, `loss_specs.resolve_loss`)."""
    return 1 if y_pred.shape.rank == 1 else tf.shape(y_pred)[-1]


def _normal(like, seed):
    """Standard normal samples of `like`'s shape and dtype, by Box-Muller from two
    independent uniform streams (the same with and without XLA)."""
    radius = tf.sqrt(-2.0 * tf.math.log(_uniform(tf.shape(like), seed, 0)))
    angle = 2.0 * np.pi * _uniform(tf.shape(like), seed, 1)
    return tf.cast(radius * tf.cos(angle), like.dtype)


def hessian_cotangent(spec, y_true, y_pred, seed):
    """`(losses, cotangent)` for a loss of `loss_specs._HESSIAN_LOSSES` under the
    true Fisher: its per-example losses at the real labels, and `sqrt(h) * eps` with
    `h` the diagonal of its Hessian in `y_pred` there and `eps ~ N(0, I)`, so that
    `E[c c^T]` is that Hessian (the loss's Gauss-Newton matrix in its output).

    The loss is a mean over the last axis of a function of each unit and its label,
    so its Hessian is diagonal, and its diagonal is the gradient of the summed
    gradient: `h_j = d/df_j sum_k dL/df_k`. Clipped at zero (rounding).
    """
    if y_true is None:
        raise ValueError(
            "The true Fisher of a Huber, log-cosh or squared-hinge loss samples from "
            "its Hessian at the real labels: pass `y_true` to `update_curvature`. "
            f"Received: y_true=None, loss={spec.fn!r}")
    y_pred = tf.stop_gradient(y_pred)
    with tf.GradientTape() as outer:
        outer.watch(y_pred)
        with tf.GradientTape() as inner:
            inner.watch(y_pred)
            losses = spec.fn(y_true, y_pred)
            total = tf.reduce_sum(losses)
        gradient = inner.gradient(total, y_pred)
        summed = tf.reduce_sum(gradient)
    diagonal = outer.gradient(summed, y_pred)
    if diagonal is None:  # piecewise linear everywhere on this batch
        diagonal = tf.zeros_like(y_pred)
    return losses, tf.sqrt(tf.maximum(diagonal, 0.0)) * _normal(y_pred, seed)


def msle_cotangent(spec, y_pred, seed):
    """`(losses, cotangent)` of a mean squared logarithmic error under the true
    Fisher: zero losses of the terms' shape (the loss at `y = f`) and
    `sqrt(2 / D) n / (1 + f)`, `n ~ N(0, I)`, zero where Keras clips `f` at its
    epsilon, so that `E[c c^T]` is the loss's Gauss-Newton matrix
    `diag(2 / (1 + f)^2) / D` in `f`."""
    y_pred = tf.stop_gradient(y_pred)
    losses = spec.fn(y_pred, y_pred)
    width = tf.cast(units(y_pred), y_pred.dtype)
    slope = tf.where(y_pred > keras.backend.epsilon(), 1.0 / (1.0 + y_pred),
                     tf.zeros_like(y_pred))
    return losses, tf.sqrt(2.0 / width) * slope * _normal(y_pred, seed)


def output_cotangent(spec, fisher, y_true, y_pred, seed, sample_weight=None):
    """Gradient of the summed per-example loss with respect to the model output.

    Backpropagating it from the output to a layer's pre-activation output gives that
    layer's per-example `g`. When `y_pred` is the output of a softmax or sigmoid (a
    Keras activation or a raw `tf.nn.softmax`/`tf.nn.sigmoid`), Keras's
    cross-entropies read the logits behind it; the cotangent is then taken with
    respect to those logits, which is exact and avoids differentiating through
    clipped probabilities.

    Args:
        spec: a `LossSpec`.
        fisher: `"true"` (sampled labels) or `"empirical"` (`y_true`).
        y_true: the real labels.
        y_pred: the model output.
        seed: `[2]` int32 seed of the sampler.
        sample_weight: optional per-example weights `w_n` (or per loss term, of
            the terms' shape: `[B, T]` for a sequence output); example `n` then
            contributes `w_n g_n g_n^T` (its cotangent is scaled by `sqrt(w_n)`).
            A negative weight counts as zero: it would make the Fisher indefinite.

    Where `y_pred` carries Keras's mask (`loss_mask`), or a term's real label is
    the loss's `ignore_class` (`term_mask`), that term contributes nothing (its
    cotangent is zero) and `M` counts the others, as Keras's loss does: padding
    does not enter the statistics.

    Returns:
        `(source, cotangent, num_examples)`: the tensor to backpropagate from
        (`y_pred` or its logits), `d(sum_n l_n)/d source`, and the number of loss
        terms `M` that the Keras mean loss averages over.
    """
    spec = loss_specs.as_read(spec, y_pred)
    if spec.hessian and loss_specs.output_fisher(spec, fisher) == "true":
        losses, cotangent = hessian_cotangent(spec, y_true, y_pred, seed)
        return (y_pred,) + _weighted(spec, y_true, y_pred, losses, cotangent,
                                     sample_weight)
    if (spec.kind == "mean_squared_logarithmic_error"
            and loss_specs.output_fisher(spec, fisher) == "true"):
        losses, cotangent = msle_cotangent(spec, y_pred, seed)
        return (y_pred,) + _weighted(spec, y_true, y_pred, losses, cotangent,
                                     sample_weight)
    if loss_specs.output_fisher(spec, fisher) == "true":
        targets = sample_targets(spec, y_pred, seed)
    else:
        if y_true is None:
            raise ValueError(
                "The empirical Fisher (fisher=\"empirical\", or a loss the true "
                "Fisher cannot sample from) needs the real labels: pass `y_true` to "
                f"`update_curvature`. Received: y_true=None, loss={spec.fn!r}"
            )
        targets = y_true
    source = loss_specs._logits_source(spec, y_pred)
    with tf.GradientTape() as tape:
        tape.watch(source)
        losses = spec.fn(targets, loss_specs.loss_input(spec, source, y_pred))
        total = tf.reduce_sum(losses)
    cotangent = tape.gradient(total, source)
    if cotangent is None:
        raise ValueError(
            "The loss does not depend on the model output, so it gives no curvature. "
            f"Received: loss={spec.fn!r}"
        )
    if (spec.kind == "binary_crossentropy"
            and loss_specs.output_fisher(spec, fisher) == "true"):
        # E[g g^T] must equal the Hessian diag(p(1-p)) / D of Keras's mean over D.
        cotangent *= tf.sqrt(tf.cast(units(loss_specs.class_last(spec, y_pred)),
                                     cotangent.dtype))
    return (source,) + _weighted(spec, y_true, y_pred, losses, cotangent,
                                 sample_weight)


def _weighted(spec, y_true, y_pred, losses, cotangent, sample_weight):
    """`(cotangent, count)`: `output_cotangent`'s cotangent with the terms' sample
    weights and masks applied, and the count of the terms the loss averages over."""

    def expand(weight):  # weights of the loss terms, onto the cotangent's rank
        weight = tf.cast(weight, cotangent.dtype)
        return tf.reshape(weight, tf.concat(
            [tf.shape(weight),
             tf.ones([tf.rank(cotangent) - tf.rank(weight)], tf.int32)], 0))

    if sample_weight is not None:
        cotangent *= expand(tf.sqrt(tf.maximum(
            loss_specs.term_weights(sample_weight, losses), 0.0)))
    mask = loss_specs.term_mask(spec, y_true, y_pred, losses)
    if mask is None:
        return cotangent, tf.size(losses)
    return cotangent * expand(mask), tf.reduce_sum(mask)


def _output_seed(seed, index):
    """The sampler seed of output `index`: `seed` itself for the first output, an
    integer hash of `(seed, index)` for the others, so that the outputs' samples are
    independent (two outputs of the same kind and shape would otherwise draw the same
    numbers)."""
    if index == 0:
        return seed
    seed = tf.cast(seed, tf.uint32)
    mixed = _mix(seed[0] ^ _mix(tf.constant(index, tf.uint32)))
    return tf.bitcast(tf.stack([mixed, seed[1]]), tf.int32)


def output_cotangents(outputs, fisher, y_true, y_pred, seed, sample_weight=None):
    """Cotangents of every output with a loss, weighted to give the Fisher of the
    total loss in one backward pass.

    Keras's loss is `L = sum_k w_k L_k` with `L_k` the mean of output `k`'s `M_k` loss
    terms. Output `k`'s cotangent `c_k` (`output_cotangent`, its own labels and
    sampler seed) is scaled by `sqrt(w_k M / M_k)`, with `M` the count of the first
    output. Backpropagating all of them at once gives rows `g` whose statistics,
    divided by `M`, are in expectation (true Fisher)

    ```
    E[g g^T] / M = sum_k (w_k / M_k) J_k^T H_k J_k
    ```

    the generalised Gauss-Newton matrix of `L`: the outputs' samples are independent,
    so their cross terms vanish. For one output with weight 1 this is exactly
    `output_cotangent`. A negative loss weight counts as zero.

    Args:
        outputs: the `OutputLoss`es of `loss_specs.resolve_losses`.
        fisher: `"true"` (sampled labels) or `"empirical"` (`y_true`).
        y_true: the real labels: one tensor (a model with one loss), or a list or
            dict matching the outputs (see `loss_specs.resolve_losses`).
        y_pred: the model output, a tensor or a flat list or dict of tensors.
        seed: `[2]` int32 seed of the sampler.
        sample_weight: optional per-example weights: one tensor for every output,
            or a list or dict with one per output.

    Returns:
        `(sources, cotangents, num_examples)`: lists of the tensors to backpropagate
        from and their cotangents, and the count `M` to divide the statistics by.
    """
    flat = tf.nest.flatten(y_pred)
    labels = [None] * len(outputs)
    # The empirical Fisher, and the true Fisher of a loss sampled from its
    # Hessian at the real labels, need the labels.
    empirical = [loss_specs.output_fisher(o.spec, fisher) == "empirical"
                 or o.spec.hessian for o in outputs]
    if any(empirical):
        if y_true is None:
            raise ValueError(
                "The empirical Fisher (fisher=\"empirical\", or a loss the true "
                "Fisher cannot sample labels for) needs the real labels: pass "
                "`y_true` to `update_curvature`. Received: y_true=None"
            )
        labels = loss_specs._per_output_values(y_true, outputs, len(flat),
                                               "y_true")
        for output, label, needed in zip(outputs, labels, empirical):
            if needed and label is None:
                raise ValueError(
                    f"fisher=\"empirical\" needs the labels of output {output.name!r}. "
                    f"Received: y_true={tf.nest.map_structure(lambda _: '*', y_true)}"
                )
    weights = loss_specs._per_output_values(sample_weight, outputs, len(flat),
                                            "sample_weight")
    sources, cotangents, counts = [], [], []
    for k, (output, label, weight) in enumerate(zip(outputs, labels, weights)):
        source, cotangent, count = output_cotangent(
            output.spec, fisher, label, flat[output.index], _output_seed(seed, k),
            weight,
        )
        sources.append(source)
        cotangents.append(cotangent)
        counts.append(count)
    reference = tf.cast(counts[0], tf.float32)
    for k, (output, count) in enumerate(zip(outputs, counts)):
        # 1 exactly for one output of weight 1: `output_cotangent`'s, bit for bit.
        ratio = tf.math.divide_no_nan(reference, tf.cast(count, tf.float32))
        weight = tf.maximum(tf.cast(output.weight, tf.float32), 0.0)
        if output.spec.sums:  # the sum of the `count` terms: `count` times their mean
            weight *= tf.cast(count, tf.float32)
        cotangents[k] *= tf.cast(tf.sqrt(weight * ratio), cotangents[k].dtype)
    return sources, cotangents, counts[0]
