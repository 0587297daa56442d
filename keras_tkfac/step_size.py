"""Step-size control: how far a preconditioned update `U = F^-1 G` moves the weights.

Five controls, chosen with `step_control`:

- `"graft"`: each layer moves in TKFAC's (or KFAC's) direction `U_l` by
  the distance RMSProp would move it (a recurrent block: each of its variables by
  its own, `CurvatureBlock.graft_per_variable`), `|R_l|` with
  `R_l = G_l / (sqrt(v_l / (1 - beta_2^t)) + eps)` and `v_l` the moving average of
  `G_l^2` (Adam's step without its first moment; Agarwal et al., 2020, "grafting";
  Anil et al., 2020, use it for Shampoo). Momentum is then Adam's first moment,
  `m <- momentum * m + (1 - momentum) * u`, so `learning_rate` has Adam's scale: at the
  same learning rate each layer moves as far as with Adam, in the curvature's
  direction. The curvature then decides how a layer's step is spread over its
  weights, not how long it is; RMSProp's norm is layer-wise scale-free, which a fixed
  damping is not (see below). `kl_clip` is not used.
- `"trust_region"`: `nu = min(1, sqrt(kl_clip / <U, G>))` for all layers together,
  the step `learning_rate * nu * U`, heavy-ball momentum `m <- momentum * m + u`.
  With the damped curvature `F` of the preconditioned layers, `<U, G> = G^T F^-1 G`
  is twice the KL divergence that the model's predictive distribution moves by under
  the unit step (to second order, in the Kronecker-factored approximation).
- `"kl_clip"` (Ba et al., 2017): `nu = min(1, sqrt(kl_clip / (learning_rate^2 <U, G>)))`.
  The step `learning_rate * nu` is then `min(learning_rate, sqrt(kl_clip / <U, G>))`:
  when the clip binds, which at a small `kl_clip` it does on every step, the
  learning rate has no effect at all.

- `"quadratic"` (Martens & Grosse, 2015, §7; kfac-jax's adaptive learning rate and
  momentum): the step `s = a U + b M`, `M` the previous step, whose coefficients
  minimise the quadratic model `-<s, G> + (1/2) s^T (C + lambda_l I) s` with `C` the
  exact generalised Gauss-Newton matrix of the batch (`keras_tkfac.quadratic`: one
  forward-mode pass per direction) and `lambda_l` each layer's damping; the weights
  move by `(min(learning_rate, 1e-3) / 1e-3) * s` (`MODEL_STEP_LEARNING_RATE`):
  the default learning rate, `1e-3` (Keras's default for its optimizers), takes the
  model's whole step, a learning rate or schedule written for Adam keeps its meaning
  below it (`3e-4`: 0.3 of the step; a decay to zero anneals the step to zero), and
  a larger one takes the whole step (`step_learning_rate`). `kl_clip` bounds the predicted KL, `(1/2) s^T C s`, as a
  safeguard (in the residuals' units for mean squared errors,
  `quadratic.kl_curvature`); twice the loss bounds the predicted decrease, for losses that
  cannot fall below zero (`quadratic.LOSS_BOUND_FACTOR`).
  `adaptive_damping=True` adapts the damping of the model and the
  preconditioner from the model's reduction ratio (Levenberg-Marquardt;
  `keras_tkfac.damping`); once the batch's loss has fallen below a tenth of the
  highest seen, the model's damping (not the preconditioner's) falls with it
  (`damping.model_factor`).
- `"graft_quadratic"` (the default): `"quadratic"` over grafted directions: each
  layer's `U_l` is first rescaled to RMSProp's step length `|R_l|` (as under
  `"graft"`), then `s = a u + b M` with `(a, b)` from the same model. The curvature
  gives each layer's direction, RMSProp the layers' relative step lengths, the exact
  quadratic model the overall length and the momentum coefficient; `a` is at least
  `GRAFT_QUADRATIC_FLOOR` (1e-3: RMSProp's step at Keras's default learning rate, a
  third of `"graft"`'s) where the model moves forward.

The quadratic controls need `forward=` in `update_curvature` (`wrap`'s training step
passes a `products.ModelForward`).
Without it, or where the products cannot be traced, a step is their sibling's
(`quadratic.FALLBACK`: `"graft"` and `"trust_region"`) at the learning rate scaled
by the ratio of the two defaults, with a warning logged once.

At `learning_rate=0.1`, `"trust_region"` with `kl_clip=0.1` and `"kl_clip"` with
`kl_clip=1e-3` take the same steps; they part when the learning rate changes.

How the default was chosen (`tools/suite.py`, figures in docs/RESULTS.md): `"graft"` was
the default from 2026-11-29. Under a fixed damping `lambda`, a layer whose curvature
is far below `lambda` gets `U = G / lambda`, momentum SGD: on the transformer text
classifier every layer is in that regime (Fisher traces 1e-8 to 4 against damping
0.1 on blocks of hundreds of dimensions) and the KL bound never binds, so the trust
region stayed at chance as momentum SGD does; lowering the damping, or making it
relative to each layer's trace, made the steps of the attention queries and keys
1e4-2e5 times their gradient and training unstable. Grafting keeps TKFAC's direction
and takes the length from the gradient's own statistics; it matched or beat the
best-of-grid Adam on 3 of the suite's 8 programs. `"graft_quadratic"` with the
Levenberg-Marquardt damping (`keras_tkfac.damping`) did on 7 of 8 at two seeds, in
fewer steps, at 2-3.6x Adam's step time on this CPU, so it became the default on
2026-11-30 (products on a sub-batch were cheaper but unstable late in training:
`products.PRODUCT_FRACTION`). `"graft"` remains the choice where a step's seconds
matter more than the number of steps.
"""

import numbers

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from keras_tkfac import linearized as linearized_lib
from keras_tkfac import row_sparse
from keras_tkfac import step_ops

STEP_CONTROLS = ("graft", "trust_region", "kl_clip", "quadratic", "graft_quadratic")

# The defaults that depend on the step control: `learning_rate` and the first-order
# partner's `fallback_lr_ratio`.
DEFAULT_LEARNING_RATE = {"graft": 3e-3, "trust_region": 0.1, "kl_clip": 0.1,
                         "quadratic": 1e-3, "graft_quadratic": 1e-3}
DEFAULT_FALLBACK_LR_RATIO = {"graft": 1.0, "trust_region": 0.01, "kl_clip": 0.01,
                             "quadratic": 1.0, "graft_quadratic": 1.0}

# The most a named partner's learning rate is multiplied by the quadratic model's
# step length (`partner_scale`), per step control; 1: not at all. 5 since
# 2026-12-06 (3 before): with the model's damping following the loss near zero,
# the held-out program sweep went from 55 to 60 of 80 at most the best Adam's, the
# suite kept 8 of 8 at seeds 0 and 1, and `tools/held_out.py`'s long runs stayed
# where 3 had them on `gru_classifier` (10 overfitted it: docs/RESULTS.md, "The
# partner's ceiling, again").
DEFAULT_FALLBACK_LR_CEILING = {"graft_quadratic": 5.0}

# The learning rate at which the quadratic controls move the weights by the model's
# whole step: `learning_rate / MODEL_STEP_LEARNING_RATE` is the fraction taken. It
# is Keras's default learning rate (Adam's, AdamW's, Muon's), so that a learning
# rate copied from an Adam program takes the model's step, and a smaller one or a
# schedule written for one behaves as there. Until 2026-12-02 it was 3e-3 (the
# default learning rate then, with the partner at a third of it): a learning rate
# copied from Adam, 1e-3, took a third of the step, which on `tools/suite.py`'s
# transformer (seed 0) left the best validation loss at 0.349 where the whole step
# reached 0.048 (`docs/suite_lr1e-3_seed0`; docs/RESULTS.md, "A learning rate
# copied from Adam"). At the defaults nothing changed: the whole step, the partner at 1e-3.
MODEL_STEP_LEARNING_RATE = 1e-3

# Under `"graft_quadratic"`, the model's coefficient of the grafted direction is at
# least this: every preconditioned layer moves at least as far as RMSProp's step at
# Keras's default learning rate (`MODEL_STEP_LEARNING_RATE`; Adam(1e-3)'s length
# without its momentum), a third of `"graft"`'s 3e-3. Why a floor: the exact model of
# the batch gives one coefficient to all layers, and where the layers' output changes
# `J_l u_l` are nearly aligned (every gradient-like direction reduces the same
# residual) the curvature along the whole step is ~N times the sum of the layers'
# own, so the coefficient is ~1/N of what each layer's own model asks for: on
# `tools/sweep_programs.mobilenet_v2` (54 layers) the per-layer optimum had median
# ~4e-3 (5e-4 to 4e-2) where the batch model gave 3e-5 (a one-off diagnostic,
# 2026-12-02). The paper is silent (it has no step-size control of this kind); the
# value was chosen by measurement. `tools/suite.py` (Adam and TKFAC, best
# validation loss; `docs/suite_floor*`), seed 0, floor 1e-4 / 3e-4 / 1e-3 / 3e-3:
# autoencoder 0.179 / 0.181 / 0.172 / 0.198, transformer 0.048 / 0.041 / 0.036 /
# 0.038, BiLSTM 0.053 / 0.034 / 0.026 / 0.020, the five convolutional or MLP
# workloads within rounding at 3e-4 and 1e-3 (the floor binds rarely there); at
# 1e-3, 8 of 8 workloads at least the best-of-grid Adam's at seeds 0, 1 and 2 (7, 8,
# 7 at 1e-4), geometric mean of seconds to target 1.55x / 1.62x / 1.64x Adam's
# (1.73x / 1.91x / 1.64x, earlier runs). `tools/program_sweep.py --steps=96` (last
# epoch's training loss, 1e-4 -> 1e-3): `mobilenet_v2` 0.069 -> 0.025 (Adam(1e-3)
# 0.013), `efficientnet_b0` 0.334 -> 0.344 (Adam 0.225). Until
# 2026-12-03 it was 1e-4 (from 2026-11-30; before that no floor: `mobilenet_v2` at 96
# steps 0.160, 1e-4 took it to 0.052 then). docs/RESULTS.md, "The grafted step's floor".
GRAFT_QUADRATIC_FLOOR = 1e-3

# The quadratic controls' momentum coefficient `b` is within `[0, 1]`
# (`step_ops.quadratic_model_step`'s `momentum_range`). `b > 1` grows the previous step,
# which a stable heavy ball never does; `b < 0` takes part of it back. The batch's
# exact model asks for both where its curvature and gradient along the previous
# step change from batch to batch more than the weights do: a negative `b` then
# undoes what earlier batches taught to fit this one. With heavy `class_weight` (5%
# positives weighing 7.5, batch 32) the model's `b` had median ~0 and was negative on
# half the steps, from -1.8 to 1.9. Measured (`tools/suite.py`, best validation loss
# at least the best-of-grid Adam's): without a bound 7 + 7 of 8 workloads (seeds 0 +
# 1), within `[-1, 1]` 6 + 8, within `[0, 1]` 6 + 8 (2026-12-01): the transformer
# 0.094 -> 0.039 and 0.038 -> 0.027 (Adam 0.072, 0.041), the BiLSTM 0.044 -> 0.053 and
# 0.026 -> 0.044 (Adam 0.049, 0.061); the probe's training loss 0.448 -> 0.151
# (Adam 0.180). `docs/suite_range_seed0|1`; docs/RESULTS.md, "The momentum
# coefficient's range".
MOMENTUM_RANGE = (0.0, 1.0)

# RMSProp's second moment in `"graft"`: Adam's (and Keras's) defaults.
GRAFT_BETA_2 = 0.999
GRAFT_EPSILON = 1e-7


def uses_moments(control):
    """Whether `control` keeps a second moment per preconditioned layer."""
    return control in ("graft", "graft_quadratic")


def uses_products(control):
    """Whether `control` needs exact curvature products (a second forward pass)."""
    return control in ("quadratic", "graft_quadratic")


def step_learning_rate(control, learning_rate):
    """The factor by which a preconditioned variable's step moves it: the learning
    rate; under the quadratic controls, whose steps are the model's, the fraction
    `min(learning_rate, MODEL_STEP_LEARNING_RATE) / MODEL_STEP_LEARNING_RATE`.

    The cap: the model's step minimises the model along its directions, and
    beyond twice that step the model predicts the loss to rise, so the reduction
    ratio cannot adapt the damping (measured: `learning_rate=1e-2`, 3.3 model
    steps, left a recurrent classifier at chance, loss 0.70 after 48 steps, where
    the default reached 0.001; with the scale 3e-3 of that time). A learning rate
    above `1e-3` takes the whole step.
    """
    if uses_products(control):
        return tf.minimum(tf.cast(learning_rate, tf.float32),
                          MODEL_STEP_LEARNING_RATE) / MODEL_STEP_LEARNING_RATE
    return learning_rate


def warn_if_capped(control, learning_rate):
    """Logs that a constant `learning_rate` above `MODEL_STEP_LEARNING_RATE`, or a
    schedule that reaches above it (`_schedule_peak`), moves the preconditioned
    weights no further than it (`step_learning_rate`) under the quadratic controls:
    a learning rate copied from an SGD program must not look as if it acted.
    Called with the constructor's argument and with each value set later
    (`optimizer.learning_rate = ...`, as Keras's `LearningRateScheduler` and
    `ReduceLROnPlateau` do); a number, a NumPy or eager scalar, or a schedule.
    Returns whether it logged.

    The partner's learning rate, `fallback_lr_ratio * learning_rate`, is not capped:
    a learning rate tuned for Adam acts on the weights Adam trains. Measured
    (2026-12-02, `python tools/suite.py --optimizers=TKFAC
    --workloads=transformer,resnet,timeseries,lstm --tkfac='{"learning_rate": 0.01}'
    --seed=0`; capped, the partner's learning rate would be the default's 1e-3 and
    every result the default's): best validation loss, the transformer 0.033 (default
    0.048), the ResNet 0.156 (0.201), the Conv1D series 0.639 (0.663), the BiLSTM,
    whose LSTM weights are the partner's, 0.104 (0.053; Adam(1e-2) alone: 0.151).
    """
    if not uses_products(control):
        return False
    if isinstance(learning_rate, keras.optimizers.schedules.LearningRateSchedule):
        peak = _schedule_peak(learning_rate)
        if peak is not None and peak > MODEL_STEP_LEARNING_RATE * (1 + 1e-6):
            logging.warning(
                'keras_tkfac: under step_control="%s" the preconditioned weights '
                "move by at most the quadratic model's whole step: while this "
                "learning-rate schedule is above %g (it reaches %g) they move as at "
                "%g, and the schedule acts on them only below it; the first-order "
                "partner's weights (`fallback`), and steps without the model (no "
                "`forward`), follow the whole schedule "
                '(docs/RESULTS.md, "Quadratic-model step").', control,
                MODEL_STEP_LEARNING_RATE, peak, MODEL_STEP_LEARNING_RATE)
            return True
        return False
    learning_rate = _scalar(learning_rate)
    if (learning_rate is not None
            # float32's rounding of a saved 1e-3 is not above it.
            and learning_rate > MODEL_STEP_LEARNING_RATE * (1 + 1e-6)):
        logging.warning(
            'keras_tkfac: under step_control="%s" the preconditioned weights move '
            "by at most the quadratic model's whole step, which learning_rate=%g "
            "takes as %g would: a larger learning rate does not lengthen it; the "
            "first-order partner's weights (`fallback`), and steps without the model "
            "(no `forward`), do move at it "
            '(docs/RESULTS.md, "Quadratic-model step").', control, learning_rate,
            MODEL_STEP_LEARNING_RATE)
        return True
    return False


def set_learning_rate(optimizer, learning_rate):
    """`CurvatureOptimizer.learning_rate`'s setter: Keras's, and a value set after
    construction (`LearningRateScheduler`, `ReduceLROnPlateau`, by hand) is judged
    by `warn_if_capped` like the constructor's, once per optimizer. Found by a
    probe (2026-12-04): a `LearningRateScheduler` returning 1e-2 gave the default's
    losses, and nothing was logged."""
    keras.optimizers.Optimizer.learning_rate.fset(optimizer, learning_rate)
    if not getattr(optimizer, "_warned_capped", False):
        optimizer._warned_capped = warn_if_capped(
            getattr(optimizer, "step_control", None), learning_rate)


def _scalar(value):
    """`value` as a Python float where it is a real number (a Python, NumPy or eager
    scalar), else `None` (a callable, a symbolic tensor: not judged)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if tf.executing_eagerly() and hasattr(value, "numpy"):
        try:
            array = np.asarray(value.numpy())
        except Exception:  # pylint: disable=broad-except  (not a concrete value)
            return None
        if array.size == 1 and np.issubdtype(array.dtype, np.floating):
            return float(array.reshape(()))
    return None


# The steps at which `warn_if_capped` reads a schedule (it cannot know the run's
# length): its start, a warm-up's usual ends, and later.
_SCHEDULE_PROBES = (0, 1, 10, 100, 1000, 10000, 100000)


def schedule_values(schedule):
    """`[(step, value)]` of `schedule` at `_SCHEDULE_PROBES`, or `None` where it
    cannot be evaluated eagerly (it is then not judged)."""
    if not tf.executing_eagerly():
        return None
    try:
        return [(step, float(schedule(step))) for step in _SCHEDULE_PROBES]
    except Exception:  # pylint: disable=broad-except  (a user's schedule, any error)
        return None


def _schedule_peak(schedule):
    """The largest of `schedule`'s values at `_SCHEDULE_PROBES`, or `None`
    (`schedule_values`)."""
    values = schedule_values(schedule)
    return None if values is None else max(value for _, value in values)


def momentum_step(control, momentum, velocity, update):
    """The step of a preconditioned variable, which is also its new momentum.

    `"graft"`: Adam's average `momentum * m + (1 - momentum) * u`; `"quadratic"`:
    `u` itself (it already holds `b M`); otherwise heavy ball, `momentum * m + u`.
    `velocity` is `None` without momentum.
    """
    if velocity is None or uses_products(control):
        return update
    if control == "graft":
        return momentum * velocity + (1.0 - momentum) * update
    return momentum * velocity + update


def graft_updates(updates, grads, moments, step, blocks=None, finite=None):
    """The grafted updates `U_l |R_l| / |U_l|` and the new second moments.

    A block with `graft_per_variable` (the recurrent blocks) has each of its
    variables' parts of `U_l` grafted to that variable's part of `R_l`
    (`graft_variables`). An embedding's `G_l` and `U_l` may be
    `row_sparse.RowSparse` (`factored.step_gradient`): its `R_l` and grafted update
    are then too.

    Args:
        updates: list of preconditioned gradients `U_l`.
        grads: list of the raw (global) gradients `G_l`, same shapes.
        moments: list of the second moments `v_l`, same shapes.
        step: `t >= 1`, the step count of the bias correction.
        blocks: optional list of the layers' `CurvatureBlock`s.
        finite: optional scalar bool; where false, the moments are returned as
            they were.

    Returns:
        `(new_updates, new_moments)`.
    """
    new_updates, new_moments = [], []
    blocks = blocks or [None] * len(updates)
    for update, grad, moment, block in zip(updates, grads, moments, blocks):
        if isinstance(grad, row_sparse.RowSparse):
            rms, new = row_sparse.rms_step(grad, moment, step, GRAFT_BETA_2,
                                           GRAFT_EPSILON, finite)
        else:
            rms, new = step_ops.rms_step(grad, moment, step, GRAFT_BETA_2, GRAFT_EPSILON)
            if finite is not None:
                new = tf.where(finite, new, moment)
        if getattr(block, "graft_per_variable", False):
            new_updates.append(graft_variables(block, update, rms))
        elif isinstance(update, row_sparse.RowSparse):
            new_updates.append(update.with_values(
                step_ops.graft(update.values, row_sparse.norm(rms))))
        else:
            new_updates.append(step_ops.graft(update, row_sparse.norm(rms)))
        new_moments.append(new)
    return new_updates, new_moments


def graft_variables(block, update, rms):
    """`update` (a block's stacked matrix) with each variable's part rescaled to the
    norm of the same part of `rms`, through the block's own `split_matrix` and
    `grad_matrix`: the direction within each variable is the curvature's, the
    length RMSProp's for that variable."""
    parts = [(u, r) for u, r in zip(block.split_matrix(update), block.split_matrix(rms))
             if u is not None]
    return block.grad_matrix(*[step_ops.graft(u, tf.norm(r)) for u, r in parts])


def graft_step(optimizer, used):
    """The optimizer's `"graft"` updates: `used` with each `U_l` grafted, and
    the second moments updated (kept on a step that is not finite)."""
    moments = [optimizer._graft_moments[optimizer._slots.index(slot)]
               for slot, *_ in used]
    updates, new_moments = graft_updates(
        [u for *_, u in used], [g for *_, g, _ in used],
        [m.value for m in moments], optimizer.iterations + 1,
        [slot.block for slot, *_ in used], optimizer._step_is_finite)
    for moment, new in zip(moments, new_moments):
        moment.assign(new)
    return [(*rest, u) for (*rest, _), u in zip(used, updates)]


def update_scale(control, updates, grads, learning_rate, kl_clip):
    """The factor `nu` by which every (grafted) update `U_l` is scaled.

    Args:
        control: one of `STEP_CONTROLS`.
        updates: list of preconditioned gradients `U_l`.
        grads: list of the raw (global) gradients `G_l`, same shapes.
        learning_rate: the current learning rate `eta`.
        kl_clip: the bound `kappa`, or `None` for no bound (`nu = 1`).

    Returns:
        A scalar float32 tensor in `(0, 1]`.
    """
    if kl_clip is None or control != "trust_region" and control != "kl_clip":
        return tf.constant(1.0)
    if control == "kl_clip":
        return step_ops.kl_clip_factor(updates, grads, learning_rate, kl_clip)
    return step_ops.kl_clip_factor(updates, grads, 1.0, kl_clip)


def quadratic_updates(products, dampings, updates, grads, previous, bounds=None,
                      min_coefficient=None, damping_factor=None, max_coefficient=None,
                      linearized=None):
    """The quadratic-model steps `a U_l + b M_l` of every preconditioned layer.

    The model's curvature is the exact one plus each layer's damping, `C + λ_l I` on
    layer `l`'s weights: the damping its preconditioner was built with.

    Args:
        products: `(directions) -> [2, 2]` Gram `[<x, C y>]` of the exact curvature
            over the two directions, each a list aligned with `updates`.
        dampings: list of each layer's damping `λ_l` (scalars).
        updates: list of preconditioned gradients `U_l` (an embedding's may be a
            `row_sparse.RowSparse`, as its `G_l`).
        grads: list of the gradients `G_l`, same shapes.
        previous: list of the previous steps `M_l`, same shapes (dense).
        bounds: optional `() -> (max_kl, max_decrease, kl_curvature)`, called
            after `products`: bounds (or `None`) on the step's predicted KL,
            `(1/2) s^T C s` (with `kl_curvature`'s Gram in place of `C`'s where it
            is not `None`), and on its predicted decrease of the loss
            (`step_ops.quadratic_model_step`).
        min_coefficient: optional floor on a positive coefficient `a` of `U`
            (`GRAFT_QUADRATIC_FLOOR` under `"graft_quadratic"`).
        damping_factor: optional `() -> factor` (or `None`), called after `bounds`:
            every `λ_l` of the model is multiplied by it (`damping.model_factor`).
        max_coefficient: optional ceiling on a coefficient `a` above
            `min_coefficient` (0: none; `keras_tkfac.progress`); the predicted
            change is the capped step's.
        linearized: optional `() -> linearized.Outputs` (or `None`), called after
            `products`: the classifiers' outputs along the directions, whose loss
            along the step may shorten it (`linearized.shorten`); the predicted
            change is the shortened step's.

    Returns:
        `((a, b), predicted, minimum)`: the coefficients of the steps
        `a U_l + b M_l` (`combine`), `eta -> q(eta s)`, the
        model's predicted change of the loss for the step `eta s`, and `q(s*)`, its
        value at its minimiser before the bounds shortened it (`<= 0`).
    """
    def inner(xs, ys, weights=None):
        weights = weights or [1.0] * len(xs)
        return tf.add_n([w * row_sparse.inner(x, y) for x, y, w in zip(xs, ys, weights)])

    curvature = products([updates, previous])
    max_kl, max_decrease, kl_curvature = bounds() if bounds else (None, None, None)
    factor = damping_factor() if damping_factor else None
    if factor is not None:
        dampings = [d * factor for d in dampings]
    cross = inner(updates, previous, dampings)
    norms = tf.stack([tf.stack([inner(updates, updates, dampings), cross]),
                      tf.stack([cross, inner(previous, previous, dampings)])])
    slopes = tf.stack([inner(updates, grads), inner(previous, grads)])
    a, b, minimum = step_ops.quadratic_model_step(curvature, norms, slopes, 1.0, max_kl,
                                             max_decrease, MOMENTUM_RANGE,
                                             kl_curvature)
    if min_coefficient is not None:
        a = tf.where(a > 0.0, tf.maximum(a, min_coefficient), a)
    if max_coefficient is not None:
        a = step_ops.cap_coefficient(a, max_coefficient, min_coefficient or 0.0)
    if linearized is not None:
        a, b = linearized_lib.shorten(linearized(), a, b)

    def predicted(learning_rate):
        coefficients = tf.cast(learning_rate, tf.float32) * tf.stack([a, b])
        return step_ops.quadratic_model_value(curvature, norms, slopes, 1.0, coefficients)

    return (a, b), predicted, minimum


def combine(coefficients, updates, previous):
    """The steps `a U_l + b M_l` of `quadratic_updates`'s `(a, b)` (dense)."""
    a, b = coefficients
    return [row_sparse.combine(a, u, b, m) for u, m in zip(updates, previous)]


def partner_scale(coefficient, trusted, ceiling):
    """The multiple of a named partner's learning rate on this step.

    Under `"graft_quadratic"` the model's coefficient `a` of the grafted direction
    (`quadratic_updates`) is the learning rate at which RMSProp would take the
    preconditioned weights' step (`graft_step`: each layer's update has the length
    of RMSProp's step at learning rate 1). The partner, Adam at
    `fallback_lr_ratio * learning_rate`, then moves the weights no curvature block
    covers as far, relative to its rate at the floor `GRAFT_QUADRATIC_FLOOR`:
    `min(max(a / GRAFT_QUADRATIC_FLOOR, 1), ceiling)`. A step whose model is not
    trusted takes the sibling step at the floor, and the partner its own rate (1).
    """
    scale = tf.clip_by_value(coefficient / GRAFT_QUADRATIC_FLOOR, 1.0, ceiling)
    return tf.where(trusted, scale, 1.0)
