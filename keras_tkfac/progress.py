"""A ceiling on the quadratic model's step that follows the training loss's progress.

Under `step_control="graft_quadratic"` the model's coefficient `a` of the grafted
direction (`step_size.quadratic_updates`) is the step length that minimises the
batch's own quadratic model, in units of RMSProp's step at learning rate 1; the
floor `GRAFT_QUADRATIC_FLOOR` (1e-3) is Adam's default step. Where the batches'
gradients are mostly noise (few examples with labels a network cannot fit, a task
whose signal it learns slowly, a small table after its first epochs), the model
still finds a long step along each batch's direction, the Levenberg-Marquardt ratio
(measured on the same batch) still says the model predicts well, and the weights
random-walk: on keras-io's structured-data classifier (`examples/structured_data.py`,
batch 32 at a constant learning rate) the hidden layer's largest weight grew to 5 in
20 epochs (Adam's to 0.6), 19 of its 32 ReLUs died, and by epoch 30 the network
predicted one constant at three seeds of three (2026-12-07). Nothing a single batch shows tells this apart from
the long steps that win elsewhere (docs/RESULTS.md, "Small data sets at batch 32":
the coefficient itself, the next batch's ratio, and the noise's share of the slope
were measured and did not); the training loss over many batches does.

So the model's `a` is capped by a ceiling that follows the loss: every `WINDOW` steps
on which the model was built, the mean of those steps' batch losses (before each
step, as the quadratic model saw them) is compared with the previous window's. A
window whose mean did not fall by `TOLERANCE` of the previous one halves the ceiling
from the lesser of itself and the largest `a` taken in the window (never below the
floor); a window whose mean fell raises the ceiling by `GROWTH`; the first window
sets none. Over the first `INITIAL_STEPS` (5) steps of training (the optimizer's
iterations) the ceiling is `INITIAL` (0.01: ten times Adam's default step; see its
comment). A step whose `a` is above the floor takes `min(a, ceiling)`; steps at
the floor, and the partner's rate that follows `a` (`step_size.partner_scale`),
follow the capped value. Our rule, not the paper's nor Martens & Grosse's (whose
learning rate comes from the model alone): it acts like Keras's
`ReduceLROnPlateau` on the training loss, on the part of the step above Adam's.

Measured (2026-12-07; docs/RESULTS.md, "The step's ceiling from the loss's
progress"): on the workload suite seven of eight programs gave the same losses to
the last digit (the ceiling never bound: their windows' losses kept falling) and the
series' best validation loss moved 0.6376 -> 0.6384; 14 of 15 sweep programs run for
160 steps gave the same best validation loss (`frozen_base_fine_tuning` 0.281 ->
0.287); on `tools/small_data.py`'s weak-signal convnet the validation losses no longer
rose above the labels' entropy and the convex regression's training loss fell
further (0.60-0.64 against 0.66-0.67); the structured-data example no longer
collapsed (0.40-0.49 after 30 epochs). The constants are first choices, not tuned:
20 steps is about an epoch of a small table at batch 32; halving and 1.25 make the
ceiling drift down when windows compare by chance.

The state is one optimizer variable (`progress`: ceiling, the window's loss sum, the
previous window's mean, the window's largest `a`, its step count), so checkpoints and
`.keras` files keep it. Only where the loss is known to be nonnegative and finite
(`damping.model_factor`'s condition) does a step count; a custom loop that passes no
`y_true` leaves the ceiling unset.
"""

import tensorflow as tf

from keras_tkfac import step_size

# `WINDOW = None` before an optimizer is built turns the rule off for it.
WINDOW = 20
TOLERANCE = 0.01
GROWTH = 1.25
SHRINK = 0.5

# The state's entries (`state[i]`); a ceiling of 0 is none.
CEILING, TOTAL, PREVIOUS, HIGHEST, COUNT = range(5)


def build(optimizer):
    """Adds `progress` under `step_control="graft_quadratic"` (else `None`)."""
    optimizer.progress = None
    if WINDOW is not None and optimizer.step_control == "graft_quadratic":
        optimizer.progress = optimizer.add_variable(
            (5,), initializer="zeros", name="progress", dtype="float32",
            aggregation="only_first_replica")


def state(optimizer):
    """The current state (`None` without the rule)."""
    variable = getattr(optimizer, "progress", None)
    return None if variable is None else variable.value


# The ceiling on `a` over the first `INITIAL_STEPS` steps of training (`None`:
# none). Why (2026-12-07, ours): the model's first steps come from one batch's
# statistics, and its curvature is the linearised network's, which cannot see many
# layers moving at once. On keras-io's denoising convolutional autoencoder
# (Conv2D + MaxPooling2D twice, two strided Conv2DTranspose, a sigmoid, binary
# cross-entropy) the first step took `a` = 0.10-0.19 (the KL bound's length;
# RMSProp's step at that learning rate, so each kernel moved by two to five times
# its own norm) where the loss along it was lowest near a tenth of that: the loss
# went 0.69 -> 5-116 at once and then to 1e4-1e6 (three seeds of four at 16 or 32
# filters; under MSE the sigmoid saturated). The workload suite's first steps take
# `a` of 4e-4 to 0.02, but its conv autoencoder's 0.095 (it survived). Measured
# (docs/RESULTS.md, "A third round of probes, and the first steps' ceiling"): a cap
# on the first step alone let the second diverge; over 5 steps every reproduction
# trained; over 20 (a window) the held-out sweep's 48-step runs were slower on 41
# of 82 programs, and a 16-step regression test no longer halved its loss. At 0.03
# one probe's loss still rose on its fourth step; 0.01 is ten times Adam's default.
INITIAL = 0.01
INITIAL_STEPS = 5


def ceiling(optimizer):
    """The ceiling on `a` this step (0: none), or `None` without the rule:
    `INITIAL` over the first `INITIAL_STEPS` steps, then the rule's."""
    current = state(optimizer)
    if current is None:
        return None
    if INITIAL is None:
        return current[CEILING]
    return tf.where(optimizer.iterations < INITIAL_STEPS,
                    tf.constant(INITIAL, tf.float32), current[CEILING])


def advance(current, loss, usable, coefficient, floor=step_size.GRAFT_QUADRATIC_FLOOR,
            window=None):
    """The state after one model step (module docstring).

    Args:
        current: `[5]` float32 state.
        loss: the batch's loss before the step.
        usable: whether the loss counts (nonnegative and finite).
        coefficient: the `a` this step took (after `step_ops.cap_coefficient`).
        floor: the least ceiling (the grafted step's floor).
        window: steps per window (`WINDOW` when `None`).

    Returns:
        The new `[5]` state; `current` where `usable` is false.
    """
    window = WINDOW if window is None else window
    ceiling, total, previous, highest, count = tf.unstack(current)
    loss = tf.cast(loss, tf.float32)
    count = count + 1.0
    total = total + tf.where(usable, loss, 0.0)
    highest = tf.maximum(highest, tf.cast(coefficient, tf.float32))
    full = count >= window
    mean = total / count
    seen = previous > 0.0
    stalled = tf.logical_and(seen, mean >= previous * (1.0 - TOLERANCE))
    limit = tf.where(ceiling > 0.0, tf.minimum(ceiling, highest), highest)
    shrunk = tf.maximum(limit * SHRINK, floor)
    grown = ceiling * GROWTH  # no ceiling (0) stays none
    ceiling = tf.where(full, tf.where(stalled, shrunk, tf.where(seen, grown, ceiling)),
                       ceiling)
    new = tf.stack([
        ceiling, tf.where(full, 0.0, total), tf.where(full, mean, previous),
        tf.where(full, 0.0, highest), tf.where(full, 0.0, count)])
    return tf.where(usable, new, current)
