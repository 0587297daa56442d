"""The damping `lambda` of a step, and its Levenberg-Marquardt adaptation.

`adaptive_damping=True` (with `step_control="quadratic"` or `"graft_quadratic"`, which
build the quadratic model `q(s) = -<s, G> + (1/2) s^T (C + lambda_l I) s` of the
loss) adapts the damping as Martens & Grosse (2015, §6.5) do: every
`INTERVAL` steps the loss of the step's batch is evaluated again after the update,
and the reduction ratio

    rho = (L(theta + eta s) - L(theta)) / q(eta s)

(actual change over the change the model predicted for the step taken) scales the
damping of every layer: `lambda <- omega lambda` when `rho > 3/4` (the model
predicts well: trust it further), `lambda <- lambda / omega` when `rho < 1/4`, with
`omega = (19/20)^INTERVAL` (their constants). A ratio that is not finite counts as
a poor prediction. The factor multiplies the damping the user gave (or its
schedule) and, for TKFAC's convolution layers, the trace-relative damping; it
acts at once on the quadratic model and on the preconditioner at its next inversion
(the inverses are recomputed on their own cadence, as in M&G and kfac-jax). It is
kept within `[0.3, 1e2]` of the given damping; it lives in an optimizer variable
(`damping_scale`), so checkpoints and `.keras` files keep it. The floor is measured,
not M&G's. First, stability: with `1e-4` the factor reached it on the MNIST-5k MLP
(`tools/benchmark.py --problem=mlp`) after ~150 steps, and the training loss, at
1e-3 by then, spiked to 0.2-0.6 four times in the next 150 steps (preconditioners
inverted at a damping of 1e-5); with `1e-3` one small bump remained, with `1e-2`
none. Then, generalisation (2026-12-01): the ratio is measured on the step's own
batch, where the model is exact, so it stays above 3/4 and the factor falls at the
rule's fastest rate whenever the model fits the batch, also when the step fits the
batch's noise; nothing in the rule sees a validation loss. On small-batch recurrent
and attention models the damping then fell to the floor and the validation loss
rose: `tools/sweep_programs.py`'s `gru_classifier` trained 304 steps (best
validation loss on other sequences; Adam(1e-3) 0.036) reached 0.141 at the floor
`1e-2`, 0.106 at `0.1`, 0.050 at `0.3`, 0.045 at `1` (no fall at all).
`tools/suite.py` (best validation loss at least the best-of-grid Adam's; seeds 0 /
1): `1e-2` 6 / 6 of 8, `0.1` 6 / 7, `0.3` 7 / 7, `1` left the deep autoencoder on
its plateau (0.217 against Adam's 0.209 at seed 0: that model needs the damping to
fall). At `0.3` the BiLSTM went from 0.046 / 0.086 to 0.049 / 0.044 (Adam 0.049 /
0.061), the transformer from 0.047 / 0.045 to 0.056 / 0.064 (Adam 0.072 / 0.041),
the deep autoencoder from 0.141 / 0.139 to 0.179 / 0.180 (Adam 0.209 / 0.221), the
ResNet from 0.313 / 0.218 to 0.292 / 0.268 (Adam 0.363 / 0.348).

**The model's damping follows the loss near zero** (2026-12-05; ours, not M&G's).
Where a cross-entropy loss falls towards zero its Gauss-Newton matrix falls with it
(the softmax's `diag(p) - p p^T` vanishes as `p` becomes one-hot), while the damping
stays: the model's damping term outweighs its curvature (on
`tools/sweep_programs.luong_attention` at step 45 `λ |u|²` was 15 times
`u^T C u` along the grafted direction), its coefficient `a` stays at its small
value, and the step shrinks with the gradient: the held-out validation losses stalled
at 1e-5 to 1e-3 where Adam's reached 1e-8 to 1e-6, and the damping's own adaptation
(a factor 0.77 per 5 steps, floor 0.3) cannot follow a loss that falls by orders of
magnitude in a few dozen steps. So each layer's damping in the quadratic model (not
in the preconditioner) is multiplied by `(L / L_max) / LOSS_RELATIVE_ONSET` within
`[LOSS_RELATIVE_FLOOR, 1]`, `L` the batch's loss before the step and `L_max` the
highest such loss seen (the optimizer variable `loss_peak`; losses not known to be
nonnegative, and non-finite ones, leave the factor at 1). The model then moves as far
as its curvature allows once the loss has fallen to a tenth of its peak; the
Levenberg-Marquardt ratio, the KL bound and twice the loss as a bound on the predicted
decrease still apply. Chosen by measurement (`tools/program_sweep.py
--validation_split=0.25 --steps=48`, the best of Adam at 1e-3, 3e-3, 1e-2 as the
reference; `tools/suite.py`; docs/RESULTS.md, "The model's damping near zero loss"):
the same rule on the exact curvature's Rayleigh quotient along `u` instead of the
loss fell as fast on small-batch sequence classifiers, which then fitted their batches'
noise (`gru_classifier` 0.018 -> 0.43); following the loss from its peak (onset 1) cost
the suite's BiLSTM and transformer their validation loss (the BiLSTM no longer reached
Adam's target); onset 0.01 acted on few programs; onset 0.1 kept the suite at 8 of 8
(seeds 0 and 1) and took the held-out programs at most the best Adam's from 49 to 55 of
80, none worse than Adam where it had been better.

`L` is the data loss of the batch as the quadratic model sees it (Keras's weighted
losses of the outputs; regularization terms are not in the model and not in `L`),
before the step (from the products' forward-mode pass when it saw the whole batch,
else by a forward pass of its own) and after it (one more forward pass), all in
training mode with the model's non-trainable variables restored after each pass:
BatchNormalization's moving statistics move once per step, and Keras's seed
generators give every pass the same dropout masks, so the ratio compares the step
alone (`products.Batch`). The extra passes cost up to two thirds of a plain step
every `INTERVAL` steps.

On by default under the quadratic controls (`adaptive_damping=None`), chosen on the
workload suite (2026-11-30, docs/RESULTS.md, "Levenberg-Marquardt damping"): with it
`"graft_quadratic"` matched or beat the best-of-grid Adam on 7 of 8 programs at two
seeds, against 5 of 8 with the fixed damping; the factor fell to its floor on the
deep autoencoder (the given damping, 0.1, was far too large there), which is what
took it off its plateau. The rule's constants are Martens & Grosse's; the bounds
are ours.
"""

import math

import tensorflow as tf

from keras_tkfac import distributed
from keras_tkfac import step_ops
from keras_tkfac import validation

# Martens & Grosse's T1 and omega_1 = (19/20)^T1; the bounds of the factor.
INTERVAL = 5
DECAY = (19.0 / 20.0) ** INTERVAL
SCALE_BOUNDS = (0.3, 1e2)

# The loss-relative damping of the quadratic model (`model_factor`, module
# docstring): the least factor (`None`: the rule is off), and the fraction of its
# highest value that the batch's loss falls to before the factor falls below 1.
LOSS_RELATIVE_FLOOR = 1e-3
LOSS_RELATIVE_ONSET = 0.1


def build(optimizer):
    """Adds the optimizer's `damping_scale` variable when it adapts its damping, and
    `loss_peak` (`model_factor`) under the quadratic controls."""
    optimizer.damping_scale = None
    if optimizer.adaptive_damping:
        optimizer.damping_scale = optimizer.add_variable(
            (), initializer="ones", name="damping_scale", dtype="float32",
            aggregation="only_first_replica")
    optimizer.loss_peak = None
    if (LOSS_RELATIVE_FLOOR is not None
            and optimizer.step_control in ("quadratic", "graft_quadratic")):
        optimizer.loss_peak = optimizer.add_variable(
            (), initializer="zeros", name="loss_peak", dtype="float32",
            aggregation="only_first_replica")


def model_factor(optimizer, loss, nonnegative):
    """The factor of the quadratic model's damping on this step, and the highest
    batch loss seen so far with `loss` (for `keep_peak`, after the model's
    `tf.cond`: a replica's assignment cannot be inside it).

    Args:
        optimizer: the `CurvatureOptimizer`.
        loss: the batch's data loss before the step (the mean over the replicas).
        nonnegative: whether the loss is known not to fall below zero.

    Returns:
        `(factor, peak)`: `(loss / peak) / LOSS_RELATIVE_ONSET` within
        `[LOSS_RELATIVE_FLOOR, 1]` (`step_ops.loss_relative_factor`), 1 without
        `loss_peak`, for a loss that may be negative or one that is not finite
        (whose step is skipped; the peak is kept).
    """
    if getattr(optimizer, "loss_peak", None) is None:
        return tf.constant(1.0), peak(optimizer)
    loss = tf.cast(loss, tf.float32)
    usable = tf.logical_and(tf.cast(nonnegative, tf.bool), tf.math.is_finite(loss))
    highest = tf.where(usable, tf.maximum(peak(optimizer), loss), peak(optimizer))
    return tf.where(usable, step_ops.loss_relative_factor(
        loss, highest, LOSS_RELATIVE_FLOOR, LOSS_RELATIVE_ONSET), 1.0), highest


def peak(optimizer):
    """The highest batch loss the quadratic model has seen (0 without `loss_peak`)."""
    variable = getattr(optimizer, "loss_peak", None)
    return tf.constant(0.0) if variable is None else variable.value


def keep_peak(optimizer, value):
    """Stores `model_factor`'s peak in `loss_peak`, where there is one."""
    if getattr(optimizer, "loss_peak", None) is not None:
        optimizer.loss_peak.assign(value)


def scale(optimizer):
    """The adapted factor of every layer's damping (1 without adaptation)."""
    variable = getattr(optimizer, "damping_scale", None)
    return tf.constant(1.0) if variable is None else variable.value


def current(optimizer):
    """The damping of this step: the given value or schedule, times the factor."""
    if validation.is_schedule(optimizer.damping):
        damping = tf.cast(optimizer.damping(optimizer.iterations), tf.float32)
    else:
        damping = tf.constant(optimizer.damping, tf.float32)
    return damping * scale(optimizer)


def interval(optimizer):
    """The steps between two adaptations: `INTERVAL`, or its least common multiple
    with `model_update_freq` (the model's prediction exists on its steps only)."""
    freq = getattr(optimizer, "model_update_freq", 1)
    return INTERVAL * freq // math.gcd(INTERVAL, freq)


def due(optimizer):
    """Whether this step re-evaluates its batch's loss to adapt the damping."""
    return tf.equal(optimizer.iterations % interval(optimizer), 0)


def hand_over(optimizer, predicted, loss_before):
    """Records, at trace time, the model's predicted change of the step taken and
    the batch's loss before it, for `adapt` after the update."""
    if optimizer.adaptive_damping:
        optimizer._model_change[distributed.replica_index()] = (predicted, loss_before)


def adapt(optimizer, batch, finite):
    """After the update: adapts `damping_scale` from this step's reduction ratio.

    Args:
        optimizer: the `CurvatureOptimizer`.
        batch: this step's `products.Batch` (its loss after the update).
        finite: whether the step was applied (`None`: known to be).
    """
    change = optimizer._model_change.pop(distributed.replica_index(), None)
    if change is None or batch is None:
        return
    predicted, loss_before = change
    ok = predicted < 0.0
    if finite is not None:
        ok = tf.logical_and(ok, finite)

    after = batch.loss() if batch.syncs else None  # see `products.Batch.syncs`

    def new_scale():
        ratio = ((batch.loss() if after is None else after) - loss_before) / predicted
        # Martens & Grosse's omega for the steps since the last adaptation.
        decay = DECAY ** (interval(optimizer) / INTERVAL)
        return [step_ops.levenberg_marquardt(optimizer.damping_scale.value, ratio, decay,
                                        *SCALE_BOUNDS)]

    distributed.cond_assign(tf.logical_and(due(optimizer), ok),
                            [optimizer.damping_scale], new_scale)
