"""The quadratic-model step (`step_control="quadratic"` and `"graft_quadratic"`).

The step `s = a U + b M` (`U` the preconditioned gradient, `M` the previous step) has
its coefficients chosen by minimising the quadratic model of the loss along the two
directions (Martens & Grosse, 2015, §7; `step_ops.quadratic_model_step`), with the exact
curvature products of the step's batch (`products`: the generalised Gauss-Newton
matrix of each output's loss).

Where every output's loss has a formula (`products`; all of them nonnegative), or
the other outputs' loss terms are all nonnegative on the batch, twice the batch's
loss, from the products' forward pass, bounds the model's predicted decrease
(`step_ops.quadratic_model_step`'s `max_decrease`; `LOSS_BOUND_FACTOR`): a safeguard
for saturated outputs, whose Gauss-Newton curvature vanishes while the gradient
does not; for a loss with negative terms (cosine similarity) there is no bound.
Where the minimiser predicts more than `UNTRUSTED_DECREASE` times the loss, the
model is not trusted at all and the step is `FALLBACK`'s. The bound on the step's
predicted KL is `kl_clip`, with a mean-squared-error output's KL in the units of the
batch's residuals (`kl_curvature`).

Without a `forward`, or where no products can be traced, a step is `FALLBACK`'s
(`steps`).
"""

import tensorflow as tf

from keras_tkfac import damping as damping_lib
from keras_tkfac import distributed
from keras_tkfac import jvp_rules
from keras_tkfac import keras_compat
from keras_tkfac import loss_specs
from keras_tkfac import precision
from keras_tkfac import products as products_lib
from keras_tkfac import progress as progress_lib
from keras_tkfac import row_sparse
from keras_tkfac import step_size
from keras_tkfac import tangents as tangents_lib


# The model's predicted decrease of a nonnegative loss is bounded by this multiple
# of the batch's loss. Measured (`tools/suite.py`, seed 0, and the saturated
# classifier of `tests/test_robustness.py`, inputs of scale 1e4): at 1 the bound
# was binding on most of the convnet's steps (its softmax model predicts 1.5-6 times
# the batch loss: confidently wrong examples under dropout) and its best
# validation loss rose from 0.1535 to 0.1709, the LSTM's from 0.053 to 0.063; at 2
# the suite's losses were those without the bound (0.1536 on the convnet); at 10
# the saturated classifier diverged (loss 3e11 after 20 steps), at 2 and 5 its
# loss reached 0 within 10 steps, at 1 it fell from 5772 to 411 in 20.
LOSS_BOUND_FACTOR = 2.0

# Where the model's minimiser predicts a decrease of more than this multiple of the
# batch's (nonnegative) loss, the model is not trusted: the step is its sibling's
# (`FALLBACK`: `"graft"` for the default control), as without products, rather than
# the model's step shortened to `LOSS_BOUND_FACTOR` times the loss, and its
# prediction does not adapt the damping. Measured (2026-11-30): on `tools/suite.py`
# (seed 0) the ratio's largest value per workload was 0.13-1.41 on five of the eight
# and 2.1-6.0 on the convnet, the transformer and the BiLSTM; at 2 the convnet's best
# validation loss rose from 0.1536 to 0.274, at 10 no suite workload changed (seeds
# 0 and 1). Of `tools/program_sweep.py`'s 36 programs two reach it:
# `efficientnet_b0` (softmax saturated at the start; the model predicts decreases
# of 27-250 on losses of 4-8), whose last epoch's loss went from 4.31 to 2.23
# (`KFAC()`: 4.45 to 2.33; Adam(1e-3): 1.57), and `unnormalised_mlp` (0.91 to 0.93;
# `KFAC()` 73.9, diverging, to 1.25; Adam 0). Raising the damping on untrusted
# steps instead (as a reduction ratio of 0 would) gave 2.39 and 0.013 (`KFAC()`
# 2.27 and 1.10), and on raw 0-255 MNIST-5k (6 epochs) a training loss of 9.2
# against 5.0 (`KFAC()` 17 against 15): mixed, so the simpler rule was kept.
UNTRUSTED_DECREASE = 10.0

# Nor is a model built from fewer loss terms than this (examples times the positions
# a sequence or image output has, over all replicas; `_loss_terms`): its minimiser
# fits that one term, which says little about the others. Found by a probe
# (2026-12-07): 1025 examples at batch 64 end each epoch on a batch of one, and
# behind a `BatchNormalization` (whose batch statistics of one example make the
# network's output independent of its input) that step moved the output layer's bias
# by about 0.8: validation loss 0.86, 0.81, 0.84, 0.89, 0.95, 0.99 over six epochs,
# against 0.62 at 1024 or 1026 examples and `Adam(1e-2)`'s 0.60; with this rule
# 0.62. At `batch_size=1` throughout (a 16-32-4 MLP, 3 epochs) every step is then
# the sibling's: best validation loss 0.94 -> 0.69 (`Adam(1e-2)` 0.71).
MIN_TRUSTED_TERMS = 2


def _loss_terms(predictions):
    """The number of loss terms of a batch's first output: its examples times its
    positions (all axes but the last, or the examples of a rank-1 output)."""
    first = tf.nest.flatten(predictions)[0]
    size = tf.size(first)
    if first.shape.rank is not None and first.shape.rank >= 2:
        return size // tf.maximum(tf.shape(first)[-1], 1)
    return size


# The KL bound of a mean-squared-error output is taken in the units of the batch's
# residuals (`kl_curvature`), with at most this multiple.
# Keras's MSE is the negative log-likelihood of a Gaussian of variance 1/2 (up to a
# constant), so `kl_clip` nats let a step move the outputs by about
# `sqrt(kl_clip)`, whatever the targets' scale: on targets of scale 100 (a
# 9-64-64-1 ReLU MLP, 300 steps of 32, `tools/regression_scales.py`) `TKFAC()` ended
# at 11 times Adam(1e-3)'s validation MSE. Under the Gaussian whose variance is the
# batch's mean squared residual `L` (its maximum-likelihood variance), the same KL
# is the quadratic model's `(1/2) s^T C s` divided by `2 L`; the bound is therefore
# `kl_clip * max(1, 2 L)`: unchanged where the residuals are below ~0.7 (targets
# standardised, as keras-io's examples do). Without a ceiling, the same network
# diverged on targets of scale 2000 (validation MSE 8.7e3 times the targets'
# variance: steps that move the outputs by thousands leave the region where the
# model holds) and trailed Adam at 300; with 1e3 and 1e4 neither happened, and 1e4
# gave the lower validation MSE at scales 100, 300 and 2000, 1e3 at 25 (README,
# "Losses"). Measured, not from a paper.
MSE_KL_SCALE_CAP = 1e4

# The KL bound is per unit of an output's weight: its Gram (which carries the
# output's `loss_weights` entry, its sample weights and, under `reduction="sum"`,
# its number of terms) is divided by its mean weight where that is above 1. The KL
# of a step is that of the model's predictive distribution, which a constant factor
# on the loss does not change; without the division a loss weighted 100 or 1000
# had its steps bounded 10 or 32 times shorter (README, Limitations, until
# 2026-12-07). Weights of at most 1 keep the bound as it was, so that a
# down-weighted auxiliary output does not lengthen the step. Measured on a digits
# classifier weighted 1-1000 (README, "Losses": "Weighted losses";
# `tools/weighted_losses.py`).
KL_PER_UNIT_WEIGHT = True

# A mean-absolute-error output's KL is that of a Laplace distribution in its
# location: Keras's MAE is the negative log-likelihood of a Laplace distribution of
# scale 1 (up to a constant), whose Fisher is `1 / D` per unit (`products`'
# `_laplace_gram`), and in the units of the batch's residuals, under the scale
# `b = L` (the batch's mean absolute residual, its maximum-likelihood scale), the KL
# of a shift is the Fisher's over `b^2`: the bound is on `(1/2) s^T F s / b^2`, with
# `b^2` clipped to `[LAPLACE_SCALE_FLOOR, MSE_KL_SCALE_CAP]`. Without it, MAE's KL
# was its quadratic model's own curvature's, the Gauss-Newton matrix of the loss
# written as a square (`g g^T / (2 |r|)`), whose scale is no KL's. Unlike a squared
# error's, the scale may tighten the bound (residuals below 1), down to the floor.
# Measured (2026-12-07; validation MAE, mean of seeds; before -> floor 1e-4 / 1e-2 /
# 0.1; Adam(1e-2)): `tools/weighted_losses.py --parts=mae` 0.155 -> 0.088 / 0.089 /
# 0.111 (0.145); one-off programs: the same with sample weights 100, 0.093 -> 0.057 /
# 0.053 / 0.067 (0.134); targets 1000 +- 300, 101 -> 12.2 (93); a squeezed `[B]`
# output 0.031 -> 0.037 / 0.033 / 0.028 (0.023); a pixel-sum target 0.118 -> 0.121 /
# 0.121 / 0.123 (0.133); the held-out sweep's `regression_losses` (MAE and log-cosh
# heads) 0.153 -> 0.168 / 0.168 / 0.154 (0.43). 0.1 is kept: every program within 4%
# of before or better. Not from a paper.
LAPLACE_KL = True
LAPLACE_SCALE_FLOOR = 0.1


def laplace_scale(loss):
    """The factor `min(max(L^2, LAPLACE_SCALE_FLOOR), MSE_KL_SCALE_CAP)` by which a
    mean-absolute-error output of loss `L` (its mean absolute residual) has its
    Laplace Fisher divided."""
    loss = tf.cast(loss, tf.float32)
    return tf.clip_by_value(loss * loss, LAPLACE_SCALE_FLOOR, MSE_KL_SCALE_CAP)


def kl_scale(loss):
    """The factor `min(max(1, 2 L), MSE_KL_SCALE_CAP)` by which a mean-squared-error
    output of (weighted) loss `L` has its KL measured in its residuals' units."""
    return tf.clip_by_value(2.0 * tf.cast(loss, tf.float32), 1.0, MSE_KL_SCALE_CAP)


def kl_curvature(curvature, output_grams, output_losses):
    """The Gram the step's KL bound `kl_clip` holds `(1/2) s^T K s` to: `curvature`
    with each output's part `C_k` divided by `S_k = max(1, W_k)`, its mean weight
    `W_k` where above 1 (`KL_PER_UNIT_WEIGHT`); for a mean squared error also by
    `kl_scale` of its loss per unit weight `L_k / S_k` (`MSE_KL_SCALE_CAP`); for a
    mean absolute error replaced by its Laplace Fisher's Gram `F_k` over
    `S_k * laplace_scale(L_k / S_k)` (`LAPLACE_KL`). An output of weight at most 1
    and neither loss keeps its part. `None` (the curvature itself) where there is
    no loss.

    Args:
        curvature: `[2, 2]`, the model's Gram `sum_k C_k` over the outputs.
        output_grams: `[(C_k, W_k, rule, F_k)]` of every output
            (`products.Batch.output_grams`).
        output_losses: every output's weighted loss (`products.Batch.output_losses`),
            or `None`.
    """
    if not output_grams or output_losses is None:
        return None
    kl = tf.cast(curvature, tf.float64)
    for (gram, weight, rule, fisher), loss in zip(output_grams, output_losses):
        scale = tf.maximum(tf.cast(weight, tf.float32), 1.0)
        if not KL_PER_UNIT_WEIGHT:
            scale = tf.ones_like(scale)
        if rule == "laplace" and LAPLACE_KL:
            scale = scale * laplace_scale(tf.cast(loss, tf.float32) / scale)
            kl = kl - tf.cast(gram, tf.float64) + tf.cast(fisher, tf.float64) / tf.cast(
                scale, tf.float64)
            continue
        if rule == "squared":
            scale = scale * kl_scale(tf.cast(loss, tf.float32) / scale)
        shrink = 1.0 - 1.0 / tf.cast(scale, tf.float64)
        kl = kl - shrink * tf.cast(gram, tf.float64)
    return kl


def hand_over(optimizer, forward, outputs, y_true, sample_weight, owner,
              recording=None):
    """This step's `Batch`, or `None` when the optimizer's step control needs no
    products or no `forward` was given. `recording`, the step's own forward pass,
    lends the products' pass the outputs it can reuse (`reuse`)."""
    if forward is None or not step_size.uses_products(optimizer.step_control):
        return None
    state = keras_compat.state_variables(owner) if owner is not None else ()
    return products_lib.Batch(forward, outputs, y_true, sample_weight, state,
                              distributed.syncs_in_backward(owner),
                              getattr(forward, "state", None), recording)


def steps(optimizer, used, variables, learning_rate):
    """The optimizer's `step_control="quadratic"` steps.

    Args:
        optimizer: the `CurvatureOptimizer`.
        used: its `(slot, indices, G_l, U_l)` of the preconditioned layers.
        variables: the variables being updated, which `indices` index.
        learning_rate: this step's learning rate (the weights move by it times the
            step), for the predicted change that `adaptive_damping` compares.

    Returns:
        `(used with a U_l + b M_l in place of U_l, 1)`; `M_l` is the momentum slot,
        which holds the previous step (the weights moved by
        `step_size.step_learning_rate` times it).
    """
    batch = optimizer._products.get(distributed.replica_index())
    if batch is None:
        return _without_products(optimizer, used, variables, learning_rate)
    covered = [variables[i] for _, indices, *_ in used for i in indices]
    momentums = [optimizer._momentums[optimizer._get_variable_index(v)]
                 for v in variables]
    previous = [slot.block.grad_matrix(*[tf.cast(momentums[i], tf.float32)
                                         for i in indices])
                for slot, indices, *_ in used]

    before = {}

    def products(directions):
        # (Tangent matmuls in `products_dtype`: `keras_tkfac.precision`.)
        with jvp_rules.precision(precision.policy(optimizer.products_dtype)):
            before["curvature"] = batch.gram(covered, [
                [p for (slot, *_), d in zip(used, direction)
                 for p in slot.block.split_matrix(row_sparse.dense(d)) if p is not None]
                for direction in directions])
        return before["curvature"]

    damping = damping_lib.current(optimizer)
    dampings = []
    for slot, *_ in used:
        weight = optimizer._factor_weight[optimizer._slots.index(slot)]
        factors = [tf.math.divide_no_nan(f, weight) for f in slot.factors]
        dampings.append(tf.reduce_mean(
            optimizer._layer_damping(slot.block, factors, damping)))

    def bounds():
        # Where the loss is known to be nonnegative (`Batch.loss`) and the
        # products' pass gave it for free (`LOSS_BOUND_FACTOR`); the loss needs the
        # labels. A negative bound is none (`step_ops.quadratic_model_step`).
        if batch.predictions is None or batch.y_true is None:
            return optimizer.kl_clip, None, None
        before["loss"] = batch.loss(batch.predictions)
        before["nonnegative"] = batch.nonnegative  # (a later `loss` resets it)
        return optimizer.kl_clip, tf.where(
            before["nonnegative"], LOSS_BOUND_FACTOR * before["loss"], -1.0), (
                kl_curvature(before["curvature"], batch.output_grams,
                             batch.output_losses))

    def damping_factor():
        # The loss the bounds read (`damping.model_factor`).
        if "loss" not in before:
            return None
        factor, before["peak"] = damping_lib.model_factor(
            optimizer, before["loss"], before["nonnegative"])
        return factor

    hidden = tangents_lib.eager_hidden_reads([slot.block for slot, *_ in used])
    if hidden:
        return _without_hidden(optimizer, used, variables, learning_rate,
                               tangents_lib.HiddenReads(hidden))
    # `update_step` moves the weights by this fraction of the returned step.
    fraction = step_size.step_learning_rate(optimizer.step_control, learning_rate)
    updates = [u for *_, u in used]

    def model():
        """This batch's `(a, b)`, whether the model is trusted, its predicted
        change for the step taken and the loss before it (for the damping)."""
        coefficients, predicted, minimum = step_size.quadratic_updates(
            products, dampings, updates, [g for *_, g, _ in used], previous, bounds,
            step_size.GRAFT_QUADRATIC_FLOOR
            if optimizer.step_control == "graft_quadratic" else None, damping_factor,
            progress_lib.ceiling(optimizer), lambda: batch.linearized)
        trusted = tf.constant(True)
        if "loss" in before:
            # A model that predicts far more than the loss can fall is not
            # trusted (`UNTRUSTED_DECREASE`): that step is the sibling's, and its
            # prediction does not adapt the damping.
            trusted = tf.logical_or(tf.logical_not(before["nonnegative"]),
                                    -minimum <= UNTRUSTED_DECREASE * before["loss"])
            # (Over all replicas, as the loss: a batch split unevenly, say 2 and
            # 1, must be trusted or not on every replica alike.)
            terms, = distributed.all_reduce(
                "sum", [tf.cast(_loss_terms(batch.predictions), tf.float32)])
            trusted = tf.logical_and(trusted, terms >= MIN_TRUSTED_TERMS)
        change, loss_before = tf.constant(0.0), tf.constant(0.0)
        if optimizer.adaptive_damping and batch.y_true is not None:
            change = tf.where(trusted, predicted(fraction), 0.0)
            loss_before = (before["loss"] if "loss" in before
                           else batch.loss_before(damping_lib.due(optimizer)))
        progress = progress_lib.state(optimizer)
        if progress is None:
            progress = tf.zeros([5])  # (a `tf.cond` output must be a tensor)
        elif "loss" in before:
            usable = tf.logical_and(tf.cast(before["nonnegative"], tf.bool),
                                    tf.math.is_finite(before["loss"]))
            progress = progress_lib.advance(progress, before["loss"], usable,
                                            coefficients[0])
        return (*coefficients, trusted, change, loss_before,
                before.get("peak", damping_lib.peak(optimizer)), progress)

    try:
        a, b, trusted, change, loss_before, peak, progress = _every_few_steps(
            optimizer, batch, model)
    except tangents_lib.HiddenReads as error:
        return _without_hidden(optimizer, used, variables, learning_rate, error)
    except Exception as error:  # pylint: disable=broad-except
        # Neither forward nor reverse mode passes the model: no products.
        return _without_products(optimizer, used, variables, learning_rate,
                                 "%s: %s" % (type(error).__name__, error))
    damping_lib.keep_peak(optimizer, peak)
    if optimizer.progress is not None:
        optimizer.progress.assign(progress)
    if optimizer.step_control == "graft_quadratic" and optimizer.fallback_lr_ceiling > 1:
        optimizer._partner.scale = step_size.partner_scale(
            a, trusted, optimizer.fallback_lr_ceiling)
    # (A step that reuses a model's coefficients, `model_update_freq > 1`, also
    # reuses whether it was trusted; eagerly, only the reusing branch ran.) An
    # untrusted model's step is the sibling's, `c U_l + d M_l`: chosen as scalars.
    if "loss" in before or optimizer.model_coefficients is not None:
        a, b = _trusted_or_sibling(
            trusted, (a, b), _sibling_coefficients(optimizer, used, learning_rate))
    found = step_size.combine((a, b), updates, previous)
    if optimizer.adaptive_damping and batch.y_true is None:
        _warn_once(optimizer, "keras_tkfac: adaptive_damping compares the batch's "
                   "loss before and after the step, which needs `y_true` in "
                   "`update_curvature`; none was given, so the damping is not "
                   "adapted.")
    elif optimizer.adaptive_damping:
        damping_lib.hand_over(optimizer, change, loss_before)
    return [(*rest, s) for (*rest, _), s in zip(used, found)], tf.constant(1.0)


# With `model_update_freq > 1`, the model is still built on every one of the first
# this many steps, where the loss and its curvature change fastest. Measured
# (2026-12-01, `tools/suite.py --tkfac='{"model_update_freq": 2}'`, seed 0): without
# it the conv autoencoder's second step, reusing the first step's coefficient on a
# new direction, took the batch's loss from 0.43 to 4.4 (saturated sigmoid outputs)
# and training never recovered at `model_update_freq=2` (best validation loss 0.689
# against 0.099 with the model every step).
MODEL_WARMUP = 20


def build(optimizer):
    """Adds `model_coefficients`, the last model's `(a, b, trusted)`, where the
    model is recomputed every `model_update_freq > 1` steps, and the step's ceiling
    (`keras_tkfac.progress`)."""
    progress_lib.build(optimizer)
    optimizer.model_coefficients = None
    if (step_size.uses_products(optimizer.step_control)
            and optimizer.model_update_freq > 1):
        optimizer.model_coefficients = optimizer.add_variable(
            (3,), initializer="zeros", name="model_coefficients", dtype="float32",
            aggregation="only_first_replica")


def _every_few_steps(optimizer, batch, model):
    """`model()`'s `(a, b, trusted, change, loss_before, peak, progress)` on the
    steps where the model is due (every `model_update_freq` steps, and every step of
    the first `MODEL_WARMUP`), else the last model's
    coefficients with no predicted change (so the damping is not adapted), the
    loss's peak as it was (`damping.model_factor`) and the progress state as it was
    (`keras_tkfac.progress`; zeros without it).

    A products' pass that all-reduces (`Batch.syncs`) cannot run inside a
    `tf.cond` branch: the model is then built every step.
    """
    state = optimizer.model_coefficients
    if state is None or batch.syncs:
        return model()

    progress = progress_lib.state(optimizer)

    def stale():
        last = state.value
        return (last[0], last[1], last[2] > 0.5, tf.constant(0.0), tf.constant(0.0),
                damping_lib.peak(optimizer),
                progress if progress is not None else tf.zeros([5]))

    due = tf.logical_or(
        tf.equal(optimizer.iterations % optimizer.model_update_freq, 0),
        optimizer.iterations < MODEL_WARMUP)
    a, b, trusted, change, loss_before, peak, progress = tf.cond(due, model, stale)
    state.assign(tf.stack([a, b, tf.cast(trusted, tf.float32)]))
    return a, b, trusted, change, loss_before, peak, progress


def _without_hidden(optimizer, used, variables, learning_rate, error):
    """`steps` where forward mode cannot follow `error.variables` (`HiddenReads`):
    their layers take the sibling's step, the quadratic model covers the others."""
    hidden = {id(v) for v in error.variables}
    reads = [any(id(getattr(variables[i], "value", variables[i])) in hidden
                 for i in indices) for _, indices, *_ in used]
    _warn_once(optimizer, 'keras_tkfac: %s; those layers take "%s" steps.'
               % (error, FALLBACK[optimizer.step_control]))
    kept = [entry for entry, read in zip(used, reads) if not read]
    modelled = iter(steps(optimizer, kept, variables, learning_rate)[0] if kept else [])
    sibling = iter(_sibling_steps(optimizer, [e for e, r in zip(used, reads) if r],
                                  variables, learning_rate, capped=False)[0])
    return [next(sibling) if read else next(modelled) for read in reads], tf.constant(1.0)


# The step control taken on a step without curvature products, and the factor that
# maps the quadratic control's learning rate onto its scale (the ratio of defaults).
FALLBACK = {"graft_quadratic": "graft", "quadratic": "trust_region"}


def _warn_once(optimizer, message):
    """Logs `message` once per optimizer (`loss_specs.warned_of`)."""
    loss_specs.warn_once(loss_specs.warned_of(optimizer), message)


def _without_products(optimizer, used, variables, learning_rate, failure=None):
    """`steps` when no `forward` was given (a custom loop or a model's own
    `train_step` that does not pass it) or the products failed (`failure`, the
    reason): the non-quadratic sibling of the step control (`FALLBACK`) at the
    learning rate scaled by the ratio of their defaults, so that the default
    learning rate gives the sibling's default step. The momentum slot still holds
    the previous step, so the two kinds of step can alternate. The learning rate
    acts in full here: the cap of the model's steps (`step_size.step_learning_rate`)
    is undone (`_sibling_steps(capped=False)`)."""
    control = optimizer.step_control
    if failure is not None:
        _warn_once(optimizer, 'keras_tkfac: the curvature products failed (%s), so '
                   'the step is a "%s" step.' % (failure, FALLBACK[control]))
    elif optimizer.curvature_updates:
        # (Where `update_curvature` is never called, the warning about that, which
        # says what to do, is the one that matters.)
        _warn_once(optimizer, 'keras_tkfac: step_control="%s" needs curvature '
                   "products, which need `forward=` in `update_curvature` "
                   "(keras_tkfac.wrap's training step passes it); without them "
                   'the step is a "%s" step.' % (control, FALLBACK[control]))
    return _sibling_steps(optimizer, used, variables, learning_rate, capped=False)


def _sibling_steps(optimizer, used, variables, learning_rate, capped=True):
    """The steps of the step control's sibling (`FALLBACK`), in `steps`'s form.

    `update_step` moves the weights by `step_size.step_learning_rate`, which caps
    the learning rate at `MODEL_STEP_LEARNING_RATE` (the model's whole step). With
    `capped`, the sibling's learning rate is `ratio` times the capped one: an
    untrusted model's step stands in for the model's, which the cap bounds. Without,
    it is `ratio` times the learning rate itself, so that where no model is built
    (a custom loop or `train_step` without `forward`, failed products, layers the
    products cannot follow) a larger learning rate takes a larger step. Found by a
    probe (2026-12-04): under a model's own `train_step` that does not feed
    curvature, `TKFAC(learning_rate=3.3e-3)` trained a digits MLP to the same
    weights as the default (validation loss 0.454 after 44 steps; Adam(1e-2)
    0.149)."""
    coefficients = _sibling_coefficients(optimizer, used, learning_rate, capped)
    momentums = [optimizer._momentums[optimizer._get_variable_index(v)]
                 for v in variables]
    found = []
    for slot, indices, grad, update in used:
        if optimizer.momentum > 0:
            previous = slot.block.grad_matrix(
                *[tf.cast(momentums[i], tf.float32) for i in indices])
            update = step_size.combine(coefficients, [update], [previous])[0]
        else:
            update = row_sparse.scale(update, coefficients[0])
        found.append((slot, indices, grad, update))
    return found, tf.constant(1.0)


def _trusted_or_sibling(trusted, coefficients, sibling):
    """The model's `(a, b)` where `trusted`, else the sibling's `(c, d)`."""
    return tuple(tf.where(trusted, x, y) for x, y in zip(coefficients, sibling))


def _sibling_coefficients(optimizer, used, learning_rate, capped=True):
    """`(c, d)`: the sibling's steps (`_sibling_steps`) are `c U_l + d M_l`.

    Every step control's momentum step is linear in the update and the momentum,
    and the sibling's scale is one scalar for all layers, so a step that chooses
    between the model's `a U_l + b M_l` and the sibling's chooses between scalars.
    """
    control = optimizer.step_control
    sibling = FALLBACK[control]
    ratio = (step_size.DEFAULT_LEARNING_RATE[sibling]
             / step_size.DEFAULT_LEARNING_RATE[control])
    # The weights move by `step_learning_rate(learning_rate)` times `factor`.
    factor = ratio * step_size.MODEL_STEP_LEARNING_RATE
    if not capped:
        factor = ratio * tf.maximum(tf.cast(learning_rate, tf.float32),
                                    step_size.MODEL_STEP_LEARNING_RATE)
    scale = step_size.update_scale(sibling, [u for *_, u in used],
                                   [g for *_, g, _ in used], learning_rate * ratio,
                                   optimizer.kl_clip)
    if optimizer.momentum <= 0:
        return factor * scale, tf.constant(0.0)
    # `momentum_step(sibling, mu, M, s U)`, read off at (M, U) = (0, 1) and (1, 0).
    return (factor * scale * step_size.momentum_step(sibling, optimizer.momentum,
                                                     0.0, 1.0),
            tf.constant(step_size.momentum_step(sibling, optimizer.momentum, 1.0, 0.0),
                        tf.float32))
