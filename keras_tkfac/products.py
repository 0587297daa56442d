"""Exact curvature products of a batch for the quadratic-model step (`quadratic`).

The quadratic step (`quadratic.steps`) minimises a model of the loss along two
directions (Martens & Grosse, 2015, §7). The model's curvature is the exact
generalised Gauss-Newton matrix `C = J^T H J` of this step's batch, not the
Kronecker-factored approximation: `J` is the Jacobian of the model output (the
logits behind a softmax or sigmoid, where Keras's loss reads them) with respect to
the weights, and `H` the Fisher of the model's predictive distribution
in that output, which for the cross-entropies on logits and for mean squared error
is the Hessian of the loss (the Gauss-Newton matrix) and does not depend on the
labels:

- categorical (sparse or one-hot) cross-entropy: `diag(p) - p p^T` on logits,
  `diag(1 / p)` on probabilities (a softmax output whose logits are not visible);
- binary cross-entropy: `p (1 - p)` on logits, `1 / (p (1 - p))` on probabilities,
  divided by the `D` units Keras averages over;
- mean squared error: `2 / D`;
- Poisson: `f / (f + eps)^2 / D` in the rate `f` (about `1 / (D f)`, the
  expectation of its Hessian `y / (D f^2)`; `fisher.sample_targets`);
- mean squared logarithmic error: `2 / ((1 + f)^2 D)`, zero where Keras clips `f`
  (`fisher.msle_cotangent`);
- any other loss (no predictive distribution: its statistics take the empirical
  Fisher, or for Huber, log-cosh and the squared hinge samples of their Hessian,
  `fisher.hessian_cotangent`): where
  its terms `l_m` on the batch are all nonnegative, the Gauss-Newton matrix of the
  loss written as a square, `l_m = r_m^2`: `g_m g_m^T / (2 l_m)` with `g_m` term
  `m`'s gradient with respect to the output (`_gradient_projections`). Unlike the
  empirical Fisher `g_m g_m^T` (whose model predicts a decrease of up to 1/2 in
  any loss's units, whatever its scale: the step does not scale with the loss),
  its model's minimiser drives each term towards 0, as Gauss-Newton does for a
  squared error. Measured (`tools/program_sweep.py`, 24 steps, last epoch's mean
  loss, `TKFAC()`; empirical Fisher -> this): keras-io-shaped programs with CTC
  25.8 -> 7.8 (Adam(1e-3) 19.9), `Dice()` 1.0 (collapsed to all-zero
  predictions) -> 0.106 (Adam 0.55), `other_keras_losses` 86.8 -> 31.5 (Adam 90.8),
  Huber (`custom_layers_add_loss`) 0.248 -> 0.210, `mixed_precision_convnet`
  0.040 -> 0.036 (Adam 0.097), focal 2.9e-5 -> 3.7e-5 (Adam
  7e-3), `regression_losses` (log-cosh and MAE) 0.31 -> 0.39 (Adam 2.36); `KFAC()`
  alike. Where a term is negative (cosine similarity; Poisson before it had a
  formula, 2026-12-08) the loss is no
  square: the empirical Fisher of its terms, as in the preconditioner's
  statistics. Positive semi-definite for every loss; the Hessian at the labels
  (used until 2026-11-30) is indefinite for a loss not convex in the output and
  zero for a piecewise-linear one (MAE, hinge), where the model has no minimum:
  measured on `tools/program_sweep.py`'s `other_keras_losses` (Poisson, KL
  divergence, cosine similarity, squared hinge, MAPE), `KFAC()`'s first step took
  the loss from 95 to 4e4 with the Hessian; with the empirical Fisher its third
  epoch's mean loss was 87 (Adam(1e-3): 91). `TKFAC()`'s was 23-27 there with the
  Hessian and 87 with the empirical Fisher; on the sweep's five other programs
  with such losses neither was better on all (the empirical Fisher better on
  `regression_losses`, 0.31 against 0.50, worse on `mixed_precision_convnet`,
  0.041 against 0.032).
  Since 2026-12-01 (later) the exact Gauss-Newton products, through the loss's
  Hessian in the output (`_loss_hessian_gram`: forward-over-reverse on the loss
  alone), are taken instead where they are the larger curvature
  (`_larger_curvature`: the Hessian's Gram positive semi-definite, its trace at
  least the square's), decided after the replicas' all-reduce. The square's has one
  rank-one term per loss term; for a cross-entropy written as a Python function
  (keras-io's masked translation loss, one value per batch) its trace was about a
  tenth of the Hessian's, and the model's steps too long: on a probe's two-input
  translation transformer (6 epochs) non-padding token accuracy 0.255 -> 0.527
  (loss 2.90 -> 1.93; Adam(1e-3) 0.284, `ignore_class=0` 0.734), per-token masked
  terms 0.489 -> 0.681. The sweep's programs with such losses moved by little
  (`regression_losses` 0.340 -> 0.340, focal 0.045 -> 0.050, `other_keras_losses`
  41.8 -> 43.6, Huber 0.209 -> 0.205, `mixed_precision_convnet` 0.036 -> 0.030,
  `KFAC()` alike). The indefinite or zero Hessians above keep the square's.

`curvature_gram` computes `[<x, C y>]` for `x, y` among the directions with one
forward-mode pass per direction (`tf.autodiff.ForwardAccumulator`: `J x`). It is a
mean over the batch's loss terms, weighted as Keras's loss is (`loss_weights`,
sample weights).

The forward passes run in training mode (dropout, batch statistics) like the step's
own; the model's non-trainable variables (BatchNormalization's moving statistics,
Keras's seed generators) are restored after them, so they move once per step as
without this control. A `ModelForward` (what `wrap`'s training step passes) can
run the products on the batch's first rows (`PRODUCT_FRACTION`, off by default;
`Batch`); without a `forward`, or where no products can be traced, a step is
`quadratic.FALLBACK`'s (`quadratic.steps`).
"""

import contextlib

from absl import logging
import tensorflow as tf
import keras

from keras_tkfac import distributed
from keras_tkfac import jvp_rules
from keras_tkfac import linearized as linearized_lib
from keras_tkfac import loss_specs
from keras_tkfac import reuse as reuse_lib
from keras_tkfac import rnn_tangents
from keras_tkfac import tangents as tangents_lib


def _weighted_mean(losses, weight, mask=None, sums=False):
    """Keras's `sum_over_batch_size` of `losses` under `weight` (per example or
    per term: `loss_specs.term_weights`) and the output's mask (`loss_specs.loss_mask`:
    the mean over the unmasked terms); with `sums`, their sum (`reduction="sum"`).
    """
    losses = tf.cast(losses, tf.float32)
    if weight is not None:
        losses = losses * loss_specs.term_weights(weight, losses)
    if sums:
        return tf.reduce_sum(losses if mask is None else losses * mask)
    if mask is not None:
        return tf.math.divide_no_nan(tf.reduce_sum(losses * mask), tf.reduce_sum(mask))
    return tf.math.divide_no_nan(tf.reduce_sum(losses),
                                 tf.cast(tf.size(losses), tf.float32))


_EPSILON = 1e-7


# Losses whose Fisher is the Hessian in the logits of a softmax or sigmoid
# cross-entropy (`keras_tkfac.linearized` checks their loss along the step).
_CROSS_ENTROPIES = ("sparse_categorical_crossentropy", "categorical_crossentropy",
                    "binary_crossentropy")


def _bilinear(spec, logits, y_pred, x, y):
    """Per loss term, `x^T H y` for the Fisher `H` of `spec`'s distribution in the
    output it is differentiated through (`logits`: the logits behind `y_pred`)."""
    x, y = tf.cast(x, tf.float32), tf.cast(y, tf.float32)
    x, y, y_pred = (loss_specs.class_last(spec, t) for t in (x, y, y_pred))
    if y_pred.shape.rank == 1 and spec.kind in ("binary_crossentropy",
                                                "mean_squared_error", "poisson",
                                                "mean_squared_logarithmic_error"):
        # A `[B]` output: each example is a term of one unit (`loss_specs.resolve_loss`).
        x, y, y_pred = x[:, None], y[:, None], y_pred[:, None]
    if spec.kind in ("sparse_categorical_crossentropy", "categorical_crossentropy"):
        if logits:
            probs = tf.nn.softmax(tf.cast(y_pred, tf.float32), axis=-1)
            return (tf.reduce_sum(probs * x * y, -1)
                    - tf.reduce_sum(probs * x, -1) * tf.reduce_sum(probs * y, -1))
        probs = tf.maximum(tf.cast(y_pred, tf.float32), _EPSILON)
        return tf.reduce_sum(x * y / probs, -1)
    if spec.kind == "binary_crossentropy":
        if logits:
            probs = tf.sigmoid(tf.cast(y_pred, tf.float32))
            return tf.reduce_mean(probs * (1.0 - probs) * x * y, -1)
        probs = tf.clip_by_value(tf.cast(y_pred, tf.float32), _EPSILON, 1.0 - _EPSILON)
        return tf.reduce_mean(x * y / (probs * (1.0 - probs)), -1)
    if spec.kind == "poisson":
        rate = tf.maximum(tf.cast(y_pred, tf.float32), 0.0)
        fisher = rate / tf.square(rate + keras.backend.epsilon())
        return tf.reduce_mean(fisher * x * y, -1)
    if spec.kind == "mean_squared_logarithmic_error":
        f = tf.cast(y_pred, tf.float32)
        slope = tf.where(f > keras.backend.epsilon(), 1.0 / (1.0 + f), 0.0)
        return 2.0 * tf.reduce_mean(slope * slope * x * y, -1)
    return 2.0 * tf.reduce_mean(x * y, -1)  # mean_squared_error


def _gradient_projections(output, label, source, y_pred, jvps):
    """Per loss term `m`, `<g_m, (J x)_m> / sqrt(2 l_m)` for each `J x` in `jvps`,
    `g_m` the gradient of term `m`, `l_m`, of the loss at the real labels with respect
    to `source` (losses the Fisher has no formula for): the Gauss-Newton matrix of
    the loss written as `l_m = r_m^2`, `grad r_m = g_m / (2 sqrt(l_m))`, is the
    weighted mean of their products. Where a term on this batch is negative (cosine
    similarity) the loss is no square: the projections are not divided (the
    empirical Fisher `g_m g_m^T`)."""
    with tf.GradientTape() as tape:
        tape.watch(source)
        terms = output.spec.fn(label, loss_specs.loss_input(output.spec, source,
                                                            y_pred))
        total = tf.reduce_sum(tf.cast(terms, tf.float32))
    grad = tf.cast(tape.gradient(
        total, source, unconnected_gradients=tf.UnconnectedGradients.ZERO), tf.float32)
    rank = terms.shape.rank
    projections = [tf.reduce_sum(grad * jvp, axis=list(range(rank, jvp.shape.rank)))
                   for jvp in jvps]
    terms = tf.cast(terms, tf.float32)
    scale = tf.where(tf.reduce_all(terms >= 0.0),
                     tf.math.rsqrt(2.0 * tf.maximum(terms, 1e-12)), tf.ones_like(terms))
    return [p * scale for p in projections]


def _loss_hessian_gram(output, label, weight, source, y_pred, jvps):
    """`[<J x_i, H J x_j>]` for the `J x` in `jvps`, `H` the Hessian with respect to
    `source` of the output's loss as Keras reduces it (at the real labels): the
    exact Gauss-Newton products of a loss without a Fisher formula, by
    forward-over-reverse differentiation of the loss alone (one pass per
    direction through the loss, not the model)."""
    source = tf.convert_to_tensor(source)
    products = []
    for jvp in jvps:
        with tf.autodiff.ForwardAccumulator(source, tf.cast(jvp, source.dtype)) as acc:
            with tf.GradientTape() as tape:
                tape.watch(source)
                terms = output.spec.fn(label, loss_specs.loss_input(output.spec, source,
                                                                    y_pred))
                total = _weighted_mean(
                    terms, weight, loss_specs.term_mask(output.spec, label, y_pred,
                                                        terms), output.spec.sums)
            grad = tape.gradient(total, source,
                                 unconnected_gradients=tf.UnconnectedGradients.ZERO)
        products.append(tf.cast(acc.jvp(grad, tf.UnconnectedGradients.ZERO),
                                tf.float32))
    return [[tf.reduce_sum(tf.cast(x, tf.float32) * hy) for hy in products]
            for x in jvps]


def _symmetric(rows):
    """The symmetric matrix of the upper triangle of a list of lists."""
    count = len(rows)
    return tf.stack([tf.stack([tf.convert_to_tensor(rows[min(i, j)][max(i, j)],
                                                    tf.float32)
                               for j in range(count)]) for i in range(count)])


# How far below zero the smaller eigenvalue of a Hessian's Gram may lie, relative
# to its trace, for `_larger_curvature` to count it positive semi-definite: the
# float32 sums over thousands of loss terms that make the Gram are exact to no
# more. At 1e-6 Keras's `Dice()` over a whole batch (one ratio of sums; a small
# segmentation net, batch 20) had its Gram rejected on a fourth step for an
# eigenvalue of -5.1e-5 against 27.7 (-1.8e-6 of the trace): the square's, 20
# times smaller along the step, gave a 20 times longer step and the all-ones
# prediction. Over 14 seeds of that program it fell into that prediction in 6 at
# 1e-6, 2 at 1e-4 and 3 at 1e-3 (best validation Dice loss above 0.3;
# docs/RESULTS.md, "Loss weights, Dice and MAE"). Measured, not from a paper.
HESSIAN_ROUNDING = 1e-4


def _laplace_gram(output, label, weight, source, y_pred, jvps):
    """`[[<J x, J y> / D]]` over the directions' tangents of `y_pred`, the weighted
    mean over the loss terms: the Fisher of a Laplace distribution of scale 1 in its
    location, of which Keras's mean absolute error (a mean over the `D` units of the
    last axis) is the negative log-likelihood up to a constant, along the directions
    (`quadratic.kl_curvature` measures such an output's KL with it). `jvps` are the
    tangents of `source`: the logits behind a sigmoid or softmax `y_pred`
    (`loss_specs._logits_source`), carried through the activation here."""
    count = len(jvps)
    rows = [[0.0] * count for _ in range(count)]
    along = [tf.cast(j, tf.float32) for j in jvps]
    if source is not y_pred:
        _, activation = loss_specs._activation_input(y_pred)
        probs = tf.cast(y_pred, tf.float32)
        if activation is tf.sigmoid:
            along = [probs * (1.0 - probs) * a for a in along]
        elif activation is tf.nn.softmax:
            along = [probs * (a - tf.reduce_sum(probs * a, -1, keepdims=True))
                     for a in along]
    if y_pred.shape.rank == 1:  # a `[B]` output: each example a term of one unit
        along = [a[:, None] for a in along]
    for i in range(count):
        for j in range(i, count):
            terms = tf.reduce_mean(along[i] * along[j], -1)
            rows[i][j] = rows[j][i] = _weighted_mean(
                terms, weight, loss_specs.term_mask(output.spec, label, y_pred, terms),
                output.spec.sums)
    return rows


def _larger_curvature(hessian, square):
    """`hessian` (the exact Gauss-Newton Gram of a loss without a Fisher formula)
    where it is positive semi-definite (to `HESSIAN_ROUNDING`) and its trace at
    least `square`'s (the Gram of the loss written as a square,
    `_gradient_projections`), else `square`.

    The square's Gauss-Newton matrix has one rank-one term per loss term: for a
    cross-entropy written as a Python function (keras-io's masked translation
    loss), whose Hessian has one term per class and token, its trace was about a
    tenth of the Hessian's, and the model's steps too long (README, Limitations).
    For a loss that is not convex in the output the Hessian is indefinite, for a
    piecewise-linear one (MAE, hinge) zero: there the square's stays (module
    docstring)."""
    trace = tf.linalg.trace(hessian)
    if hessian.shape[0] == 1:
        lowest = hessian[0, 0]
    elif hessian.shape[0] == 2:  # the smaller eigenvalue of a symmetric 2 x 2
        half = 0.5 * (hessian[0, 0] - hessian[1, 1])
        lowest = 0.5 * trace - tf.sqrt(half * half + hessian[0, 1] * hessian[0, 1])
    else:
        lowest = tf.reduce_min(tf.linalg.eigvalsh(hessian))
    use = tf.logical_and(lowest >= -HESSIAN_ROUNDING * tf.abs(trace),
                         trace >= tf.linalg.trace(square))
    return tf.where(use, hessian, square)


def _sources(outputs, y_pred):
    """The tensors the losses are differentiated through in `forward`'s output
    `y_pred`, and its flat list; a `ValueError` (the products then fail, logged,
    and the step is `quadratic.FALLBACK`'s) where an output's shape past the batch
    axis cannot be the step's (`OutputLoss.shape`; the batch may differ, a
    `PRODUCT_FRACTION` of it): `forward` must compute what `update_curvature`'s
    `y_pred` is."""
    flat = tf.nest.flatten(y_pred)
    for output in outputs:
        found = flat[output.index] if output.index < len(flat) else None
        expected = tf.TensorShape(output.shape)
        if found is None or (expected.rank is not None and not (
                expected.rank == found.shape.rank and (
                    expected.rank == 0
                    or expected[1:].is_compatible_with(found.shape[1:])))):
            raise ValueError(
                f"`forward` gave {'no output' if found is None else found.shape} "
                f"where update_curvature's y_pred (output {output.name!r}) has shape "
                f"{output.shape}: it must compute y_pred itself. For a loss on a "
                "function of the model's output (a Q-network's chosen action's "
                "value), pass that function: forward=lambda: f(model(x, "
                "training=True))")
    return [loss_specs._logits_source(loss_specs.as_read(o.spec, flat[o.index]),
                                      flat[o.index]) for o in outputs], flat


# Whether a traced pass carries every direction's tangent at once (nested
# accumulators: one primal pass for all directions) rather than one forward-mode
# pass per direction. Through TensorFlow's dispatch the outer accumulator also
# records the inner one's tangent computations (second-order terms); nothing reads
# them, and the traced function prunes them (`jvp_rules` leaves them out of the
# trace for the ops it covers), so the nested pass costs one primal pass less per
# extra direction.
# Measured (`tools/step_costs.py`, docs/RESULTS.md, "Cost of a step", 2026-12-01): the mean
# step 3.17-3.28x -> 2.79-2.83x Adam's on the MLP, 3.13-3.19x -> 2.77-2.78x on the
# ResNet-8 (two alternated runs each, quiet machine).
# Only for a `ModelForward` whose model does not compile its step with XLA
# (`Batch.gram`): under `jit_compile=True` the nested pass left every read of the
# weights after the update in the same step (Keras's constraints, `use_ema`) with
# the weights from before it (a `MaxNorm` kernel constraint that never binds kept
# the kernel from training; cause not found), where one pass per direction is
# right (`tests/test_quadratic.py`). A custom loop's plain `forward` may be compiled
# with XLA without the optimizer knowing: one pass per direction.
NESTED = True

# Whether the traced products' pass writes the tangents of common ops inline
# (`jvp_rules`: no per-op traced function, no second-order terms) rather than
# through TensorFlow's per-op dispatch. Measured (docs/RESULTS.md, "Inline tangents"): the
# first step of MobileNetV2 84.9 -> 50.2 s, of EfficientNetB0 204.9 -> 90.8 s.
INLINE_JVPS = True


def _forward_mode(forward, outputs, primals, directions, nested=False, model=None,
                  recording=None):
    """`(J x for x in directions, sources, flat y_pred)` by forward-mode passes:
    with `nested`, all directions in one traced pass (`NESTED`), else one pass per
    direction (and always in eager execution, where the second-order terms would
    run). Where the nested pass cannot be traced (an op whose tangent computation
    has no derivative of its own), one pass per direction."""
    tangents = [[tf.cast(d, p.dtype) for d, p in zip(direction, primals)]
                for direction in directions]
    if nested and len(tangents) > 1 and not tf.executing_eagerly():
        try:
            return _passes(forward, outputs, primals, [tangents], model, recording)
        except tangents_lib.DroppedTangents:
            raise  # (also `HiddenReads`): one pass per direction finds them too.
        except Exception as error:  # pylint: disable=broad-except
            logging.log_first_n(
                logging.INFO, "keras_tkfac: nested forward-mode products failed "
                "(%s); one pass per direction.", 1, type(error).__name__)
    return _passes(forward, outputs, primals, [[t] for t in tangents], model,
                   recording)


def _passes(forward, outputs, primals, groups, model=None, recording=None):
    """`_forward_mode`'s result, one forward pass per group of tangents (each group
    a list of tangent lists aligned with `primals`, carried by nested
    accumulators). `model`'s recurrent layers carry the tangents through their
    loops (`rnn_tangents`); the layers that `recording` (the step's own pass)
    computed on the same inputs without reading `primals` give its outputs
    (`reuse`)."""
    jvps, first = [], None
    for group in groups:
        start = tangents_lib.operation_count() if first is None else None
        with contextlib.ExitStack() as stack:
            if INLINE_JVPS:
                stack.enter_context(jvp_rules.inline())
            accumulators = [stack.enter_context(
                tf.autodiff.ForwardAccumulator(primals, t)) for t in group]
            with rnn_tangents.carrying(model, accumulators), \
                    reuse_lib.reusing(recording, primals, _trainable(model),
                                      accumulators) as reused:
                found, flat = _sources(outputs, forward())
        # The tangents of reused calls were computed off the results' path.
        checked = found + reused.sources
        for accumulator in accumulators:
            lost = tangents_lib.dropped(accumulator, start, checked)
            if lost:
                raise tangents_lib.DroppedTangents(lost)
        hidden = tangents_lib.hidden_reads(primals, start, checked, accumulators)
        if hidden:
            raise tangents_lib.HiddenReads(hidden)
        if found and all(accumulator.jvp(s) is None
                         for accumulator in accumulators for s in found):
            # No loss input carries a tangent: the products would be zero, the
            # model's curvature its damping alone. Raised so that the products
            # come from reverse mode instead (`Batch.gram`).
            raise ValueError("no tangent reached the losses' inputs")
        jvps.extend([
            tf.cast(accumulator.jvp(s, tf.UnconnectedGradients.ZERO), tf.float32)
            for s in found
        ] for accumulator in accumulators)
        first = first or (found, flat)
    return jvps, *first


def _trainable(model):
    return model.trainable_variables if model is not None else ()


def _reverse_mode(forward, outputs, primals, directions):
    """`_forward_mode`'s result as `d/du <J^T u, x>` (one forward pass)."""
    start = tangents_lib.operation_count()
    with tf.GradientTape(persistent=True) as outer:
        with tf.GradientTape() as inner:
            inner.watch(primals)
            found, flat = _sources(outputs, forward())
    hidden = tangents_lib.hidden_reads(primals, start, found)
    if hidden:
        raise tangents_lib.HiddenReads(hidden)
    with outer:
        dummies = [tf.zeros_like(s) for s in found]
        outer.watch(dummies)
        transposed = inner.gradient(
            found, primals, output_gradients=dummies,
            unconnected_gradients=tf.UnconnectedGradients.ZERO)
        dots = [tf.add_n([tf.reduce_sum(t * tf.cast(d, t.dtype))
                          for t, d in zip(transposed, direction)])
                for direction in directions]
    jvps = [[tf.cast(j, tf.float32) for j in outer.gradient(
        dot, dummies, unconnected_gradients=tf.UnconnectedGradients.ZERO)]
        for dot in dots]
    return jvps, found, flat


def curvature_gram(forward, outputs, y_true, sample_weight, variables, directions,
                   state=()):
    """`[<x, C y>]` over `x, y` in `directions`, `C` the batch's Gauss-Newton matrix.

    Args:
        forward: `() -> y_pred`, the model's forward pass on this step's batch in
            training mode.
        outputs: the `loss_specs.OutputLoss`es of the training loss.
        y_true: the real labels, structured as for `fisher.output_cotangents` (only
            losses without a Fisher formula read them).
        sample_weight: optional per-example weights.
        variables: the variables the directions move (Keras or TF variables).
        directions: a list of lists of tensors, each aligned with `variables`.
        state: variables to restore after the forward passes.

    Returns:
        A symmetric `[len(directions), len(directions)]` float32 tensor, the mean
        over the replicas' batches under a strategy.
    """
    return Batch(forward, outputs, y_true, sample_weight, state).gram(
        variables, directions)


# The Gram's sub-batch: this fraction of the (per-replica) batch's examples, at
# least `PRODUCT_MIN_EXAMPLES` (all of a smaller batch); 1 (the default): the whole
# batch. Measured (docs/RESULTS.md, "Workload suite"): a quarter cut the MNIST-5k MLP's step
# by ~20% and kept the suite's 7 of 8, but over 300 steps of that MLP its loss,
# 0.05 by step 65, then jumped between 0.02 and 1.5 (the whole batch: a smooth fall
# to 1e-5). A sub-batch's curvature along the step is an unbiased but noisy estimate,
# and the model's step divides by it: late in training, when a few examples carry
# the curvature, a sub-batch without them overshoots.
PRODUCT_FRACTION = 1.0
PRODUCT_MIN_EXAMPLES = 32

# Whether `wrap`'s training step has the products' and the damping's passes replay
# the dropout masks that the gradient saw (`ModelForward`'s `state`). Off: they draw
# masks of their own (all the same within a step), so the reduction ratio compares a
# gradient of one mask with the losses of another, which under strong dropout keeps
# it low and the damping rises, up to its ceiling. Measured (2026-12-01), on:
# a Dropout(0.5) MLP on digits, 20 epochs of 38 steps, best validation loss 0.065
# off, 0.042 on (Adam(1e-3) 0.062; the damping factor 100 off, 0.3 on; a 60-epoch
# probe 0.038 off, 0.021 on); but `tools/suite.py` (100-150 steps) 12 of 16 on
# against 14 of 16 off: the keras-io convnet (Dropout(0.5)) 0.152 -> 0.169 and
# 0.146 -> 0.172 at seeds 0 and 1 (Adam 0.150, 0.153), the transformer (Dropout(0.1))
# 0.039 -> 0.030 and 0.027 -> 0.046 (Adam 0.072, 0.041); over 4 times the steps at
# seed 0 the convnet 0.098 -> 0.104 (Adam 0.098) and the transformer 0.0098 ->
# 0.0168 (Adam 0.027). The suite decides the default; docs/RESULTS.md, "Dropout masks".
REPLAY_MASKS = False


class ModelForward:
    """`model(x, training=True)` on this step's batch, or on its first rows.

    `wrap`'s training step passes one as `update_curvature`'s `forward`, so that the
    curvature products can run on a sub-batch; a plain `lambda: model(x,
    training=True)` also works, and its products then cover the whole batch.
    """

    def __init__(self, model, x, state=None, before=None):
        self.model, self.x = model, x
        # The model's non-trainable variables as they were before the step's own
        # forward pass (`wrap`'s training step takes them): the products' passes
        # and the damping's losses start from them, so they draw the dropout masks
        # that the gradient saw (`Batch`).
        self.state = state
        # The same, for the statistics' own forward pass only
        # (`statistics.takes_own_pass`).
        self.before = before

    def __call__(self):
        with without_cudnn(self.model):
            return self.model(self.x, training=True)

    def examples(self):
        """The number of examples in the batch (a scalar int32 tensor)."""
        return tf.shape(tf.nest.flatten(self.x)[0])[0]

    def head(self, rows):
        """The forward pass on the batch's first `rows` examples."""
        with without_cudnn(self.model):
            return self.model(tf.nest.map_structure(lambda t: t[:rows], self.x),
                              training=True)


@contextlib.contextmanager
def without_cudnn(model):
    """`model`'s `LSTM` and `GRU` layers run Keras's generic loop, not cuDNN, while
    the block is traced (they read `use_cudnn` when called).

    TensorFlow has no derivative of cuDNN's backward op (`CudnnRNNBackpropV3`), so
    neither forward-mode nor reverse-over-reverse products pass a cuDNN recurrence
    (checked by tracing both on CPU: `LookupError: gradient registry has no entry
    for: CudnnRNNBackpropV3`), and on a GPU every step would then fall back to
    `quadratic.FALLBACK`'s (with a warning). The generic loop computes the same
    function; the step's own forward and backward passes keep cuDNN. Not yet
    measured on a GPU (none was lent): what this costs there is the generic loop's
    time for the products' pass alone.
    """
    flipped = [(layer, layer.use_cudnn)
               for layer in model._flatten_layers(include_self=False)  # pylint: disable=protected-access
               if getattr(layer, "use_cudnn", False) in ("auto", True)]
    for layer, _ in flipped:
        layer.use_cudnn = False
    try:
        yield
    finally:
        for layer, setting in flipped:
            layer.use_cudnn = setting


def _product_rows(examples):
    """The Gram's sub-batch size for a batch of `examples`."""
    wanted = tf.cast(tf.math.ceil(PRODUCT_FRACTION * tf.cast(examples, tf.float32)),
                     tf.int32)
    return tf.minimum(examples, tf.maximum(wanted, PRODUCT_MIN_EXAMPLES))


def _head(values, rows):
    """Each per-example tensor of `values` (a list, entries may be `None`)
    restricted to its first `rows` examples."""
    def cut(value):
        if value is None or not hasattr(value, "shape") or len(value.shape) == 0:
            return value
        return value[:rows]
    return [tf.nest.map_structure(cut, v) if v is not None else None for v in values]


class Batch:
    """One step's batch as the quadratic model sees it: the exact curvature
    products along directions, and the data loss before and after the step.

    With a `ModelForward` and `PRODUCT_FRACTION < 1`, the products run on a
    sub-batch (`PRODUCT_FRACTION` of the examples, at least
    `PRODUCT_MIN_EXAMPLES`): the model's curvature is then
    the Gauss-Newton matrix of those examples, its gradient still the whole batch's
    (Martens, 2010, computes the curvature-vector products of Hessian-free
    optimisation on a smaller batch than the gradient for the same reason). The
    losses before and after the step are the whole batch's.

    Every pass restores the model's non-trainable variables, which hold Keras's
    seed generators as well as BatchNormalization's moving statistics: the passes
    of one step all draw the same dropout masks, so the losses before and after
    the step differ only by the step (as kfac-jax's, which reuse the batch's
    random key). With `initial` (the variables' values before the step's own
    forward pass, which `wrap`'s training step hands over through `ModelForward`
    where `REPLAY_MASKS` is on), every pass starts from them, so those masks are
    the ones the gradient saw; otherwise the quadratic model's slope (the
    gradient's masks) and its curvature and losses (other masks) differ by the
    dropout noise, which keeps the reduction ratio low under strong dropout and
    raises the damping (`REPLAY_MASKS` says what that does to training).
    """

    def __init__(self, forward, outputs, y_true, sample_weight, state=(),
                 syncs=False, initial=None, recording=None):
        self.forward, self.outputs, self.state = forward, outputs, tuple(state)
        # The step's own forward pass, whose outputs a `ModelForward`'s pass on the
        # whole batch reuses where it can (`reuse`).
        self.recording = recording if isinstance(forward, ModelForward) else None
        self.initial = (tuple(initial) if initial is not None
                        and len(initial) == len(self.state) else None)
        self.y_true, self.sample_weight = y_true, sample_weight
        # A forward pass that all-reduces (synchronized BatchNormalization under a
        # strategy) cannot run inside a `tf.cond`: the losses are then taken every
        # step and used where due.
        self.syncs = syncs
        # The flat outputs of the products' forward pass, when it saw the whole batch.
        self.predictions = None
        self.nonnegative = None  # set by `loss`
        # `[(C_k, W_k, rule, F_k)]` for each output `k` of `outputs`: its Gram (its
        # weight included), its mean weight `W_k` (its `loss_weights` entry times
        # its sample weights' mean, times its terms under `reduction="sum"`), the
        # units its KL is measured in (`"squared"`: a mean squared error's,
        # `"laplace"`: a mean absolute error's, with `F_k` its Laplace Fisher's
        # Gram, `_laplace_gram`; `None`: its Gram's) (set by `gram`); and every output's
        # weighted loss `w_k L_k` (set by `loss`; the means over the replicas).
        self.output_grams, self.output_losses = [], None
        # The classifiers' outputs along the directions of the last `gram`
        # (`keras_tkfac.linearized`), or `None`.
        self.linearized = None

    def _restoring(self, run):
        saved = [tf.identity(v) for v in self.state]
        if self.initial is not None:
            for variable, value in zip(self.state, self.initial):
                variable.assign(value)
        try:
            return run()
        finally:  # also when `run` fails while tracing: its ops may still run
            for variable, value in zip(self.state, saved):
                variable.assign(value)

    def _per_output(self, count):
        return (loss_specs._per_output_values(self.y_true, self.outputs, count,
                                              "y_true"),
                loss_specs._per_output_values(self.sample_weight, self.outputs,
                                              count, "sample_weight"))

    def gram(self, variables, directions):
        """`curvature_gram`'s Gram of `directions` (on the sub-batch, if any)."""
        primals = [getattr(v, "value", v) for v in variables]
        forward, rows = self.forward, None
        if hasattr(forward, "head") and PRODUCT_FRACTION < 1:
            rows = _product_rows(forward.examples())
            forward = lambda: self.forward.head(rows)  # pylint: disable=unnecessary-lambda-assignment

        def run():
            if self.syncs:
                # Forward mode gives no tangent through a cross-replica all-reduce
                # (measured: zero), which a synchronized BatchNormalization's
                # moments go through; reverse mode differentiates it.
                return _reverse_mode(forward, self.outputs, primals, directions)
            try:
                return _forward_mode(forward, self.outputs, primals, directions,
                                     self.nests(), getattr(self.forward, "model", None),
                                     self.recording if rows is None else None)
            except tangents_lib.DroppedTangents:
                raise  # Reverse-over-reverse products drop them too.
            except Exception as error:  # pylint: disable=broad-except
                # Forward mode cannot pass some layers (Keras's LSTM loop): `J x`
                # as the gradient of `J^T u` with respect to `u` instead.
                logging.log_first_n(
                    logging.INFO, "keras_tkfac: forward-mode products failed (%s); "
                    "using reverse-over-reverse products.", 1, type(error).__name__)
                return _reverse_mode(forward, self.outputs, primals, directions)

        tangents_lib.install_jvps()
        with tangents_lib.plain_recompute():
            jvps, sources, flat = self._restoring(run)
        self.predictions = flat if rows is None else None
        labels, weights = self._per_output(len(flat))
        if rows is not None:
            labels, weights = _head(labels, rows), _head(weights, rows)
        count = len(directions)
        gram = [[0.0] * count for _ in range(count)]
        # Losses without a Fisher formula: both candidate curvatures, chosen from
        # after the all-reduce (`_larger_curvature`), weighted by the output's weight.
        candidates = []
        # Every output's own Gram (its weight included; for a loss without a
        # Fisher formula chosen after the all-reduce) and its mean weight, for the
        # KL bound per unit of weight and in a squared error's residuals' units
        # (`output_grams`); they are also in `gram`.
        owns, kl_weights, laplace = [], [], []
        classifiers = []  # (`linearized.Outputs`)
        for k, (output, label, weight) in enumerate(zip(self.outputs, labels, weights)):
            source, y_pred = sources[k], flat[output.index]
            output_weight = tf.maximum(tf.cast(output.weight, tf.float32), 0.0)
            along = [jvp[k] for jvp in jvps]
            own = [[0.0] * count for _ in range(count)]
            if output.spec.kind is None:
                projections = _gradient_projections(output, label, source, y_pred,
                                                    along)
            for i in range(count):
                for j in range(i, count):
                    if output.spec.kind is None:
                        terms = projections[i] * projections[j]
                    else:
                        terms = _bilinear(
                            output.spec, source is not y_pred or output.spec.from_logits,
                            source, along[i], along[j])
                    value = _weighted_mean(
                        terms, weight,
                        loss_specs.term_mask(output.spec, label, y_pred, terms),
                        output.spec.sums)
                    own[i][j] = own[j][i] = value
                    if output.spec.kind is not None:
                        gram[i][j] = gram[i][j] + output_weight * value
            if weight is None and not output.spec.sums:
                # (A mean of ones. No op on the terms: one here changed the
                # weights of the sweep's unweighted `mlp_mixer` by rounding after
                # 12 steps, through the traced graph; not traced further.)
                kl_weights.append(output_weight)
            else:
                kl_weights.append(output_weight * _weighted_mean(
                    tf.ones_like(terms), weight,
                    loss_specs.term_mask(output.spec, label, y_pred, terms),
                    output.spec.sums))
            if output.spec.kind is not None and len(self.outputs) > 1:
                # (One output's Gram is the model's: not computed again.)
                owns.append(output_weight * _symmetric(own))
            if output.spec.laplace:
                laplace.append(output_weight * _symmetric(_laplace_gram(
                    output, label, weight, source, y_pred, along)))
            if (output.spec.kind in _CROSS_ENTROPIES and label is not None
                    and (source is not y_pred or output.spec.from_logits)):
                classifiers.append((output.spec, label, weight, source, y_pred, along,
                                    output_weight))
            if output.spec.kind is None:
                try:
                    hessian = _symmetric(_loss_hessian_gram(
                        output, label, weight, source, y_pred, along))
                except Exception:  # pylint: disable=broad-except
                    # (A loss TensorFlow cannot differentiate twice: the
                    # square's.)
                    hessian = tf.fill([count, count], -1.0)
                candidates += [output_weight * hessian,
                               output_weight * _symmetric(own)]
        gram = _symmetric(gram)
        self.linearized = (linearized_lib.Outputs(classifiers, _weighted_mean)
                           if classifiers else None)
        gram, *rest = distributed.all_reduce(
            "mean", [gram] + kl_weights + laplace + owns + candidates)
        kl_weights, rest = rest[:len(kl_weights)], rest[len(kl_weights):]
        laplace, rest = rest[:len(laplace)], rest[len(laplace):]
        owns, candidates = rest[:len(owns)], rest[len(owns):]
        chosen = [_larger_curvature(hessian, square)
                  for hessian, square in zip(candidates[::2], candidates[1::2])]
        self.output_grams = []
        for output, kl_weight in zip(self.outputs, kl_weights):
            if output.spec.kind is None:
                own = chosen.pop(0)
            else:
                own = owns.pop(0) if owns else gram
            if output.spec.kind == "mean_squared_error":
                rule = ("squared", None)
            elif output.spec.laplace:
                rule = ("laplace", laplace.pop(0))
            else:
                rule = (None, None)
            self.output_grams.append((own, kl_weight) + rule)
            if output.spec.kind is None:
                gram = gram + own
        return gram

    def nests(self):
        """Whether the products may take one nested forward-mode pass (`NESTED`):
        a `ModelForward` whose model does not compile its step with XLA."""
        return (NESTED and isinstance(self.forward, ModelForward)
                and getattr(self.forward.model, "jit_compile", None) is False)

    def loss(self, predictions=None):
        """The data loss `sum_k w_k L_k` of the batch at `predictions` (flat outputs),
        or after a new forward pass at the current weights; the mean over replicas.
        """
        if predictions is None:
            trainable = _trainable(getattr(self.forward, "model", None))
            with reuse_lib.reusing(self.recording, trainable, trainable):
                predictions = self._restoring(
                    lambda: tf.nest.flatten(self.forward()))
        labels, weights = self._per_output(len(predictions))
        losses, known = [], tf.constant(True)
        for output, label, weight in zip(self.outputs, labels, weights):
            y_pred = predictions[output.index]
            terms = loss_specs.loss_values(output.spec, label, y_pred)
            losses.append(tf.maximum(tf.cast(output.weight, tf.float32), 0.0) * (
                _weighted_mean(terms, weight,
                               loss_specs.term_mask(output.spec, label, y_pred, terms),
                               output.spec.sums)))
            if output.spec.kind in (None, "poisson"):
                known = tf.logical_and(known, tf.reduce_all(terms >= 0.0))
        known, *losses = distributed.all_reduce(
            "mean", [tf.cast(known, tf.float32)] + losses)
        self.output_losses = losses
        total = tf.add_n(losses) if losses else tf.constant(0.0)
        # Whether the loss is known not to fall below zero: every output's loss has
        # a formula (nonnegative; Poisson's is not, `y log f` can exceed `f`), or the
        # others' terms are all >= 0 on this batch (`Dice`, a squared error of one's
        # own; not cosine similarity).
        self.nonnegative = known >= 1.0
        return total


    def loss_before(self, due):
        """The batch's loss at the current weights where `due` holds (else 0): from
        the products' pass when it saw the whole batch, else by a new pass."""
        if self.predictions is not None:
            return self.loss(self.predictions)
        if self.syncs:
            return self.loss()
        return tf.cond(due, self.loss, lambda: tf.constant(0.0))
