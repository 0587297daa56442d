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
from keras_tkfac import ops
from keras_tkfac import validation

# Martens & Grosse's T1 and omega_1 = (19/20)^T1; the bounds of the factor.
INTERVAL = 5
DECAY = (19.0 / 20.0) ** INTERVAL
SCALE_BOUNDS = (0.3, 1e2)


def build(optimizer):
    """Adds the optimizer's `damping_scale` variable when it adapts its damping."""
    optimizer.damping_scale = None
    if optimizer.adaptive_damping:
        optimizer.damping_scale = optimizer.add_variable(
            (), initializer="ones", name="damping_scale", dtype="float32",
            aggregation="only_first_replica")


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
        return [ops.levenberg_marquardt(optimizer.damping_scale.value, ratio, decay,
                                        *SCALE_BOUNDS)]

    distributed.cond_assign(tf.logical_and(due(optimizer), ok),
                            [optimizer.damping_scale], new_scale)
