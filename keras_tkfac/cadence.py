"""When the curvature is refreshed: statistics and inverse steps.

Statistics are folded into the moving averages every `factor_update_freq` steps and
the damped inverses recomputed every `inverse_update_freq` steps. Early in training
the factors change fastest, and the inverses of step 0 come from the very first batch
alone; with `inverse_warmup`, the inverses are also recomputed at the statistics steps
`factor_update_freq * 2^j` below `inverse_update_freq` (steps 10, 20, 40, 80 at the
defaults 10 and 100): `log2(inverse_update_freq / factor_update_freq)` extra inversions
in all, none after the first `inverse_update_freq` steps.
"""

import tensorflow as tf


def statistics_due(step, factor_update_freq):
    """Whether step `step` (0-based) folds new statistics into the averages."""
    return tf.equal(step % factor_update_freq, 0)


def inverse_due(step, factor_update_freq, inverse_update_freq, warmup):
    """Whether step `step` recomputes the damped inverses.

    Args:
        step: the optimizer's step counter (an integer tensor), 0 on the first step.
        factor_update_freq: statistics every this many steps.
        inverse_update_freq: inverses every this many steps.
        warmup: bool, also at statistics steps `factor_update_freq * 2^j` that come
            before `inverse_update_freq`.

    Returns:
        A boolean scalar tensor.
    """
    regular = tf.equal(step % inverse_update_freq, 0)
    if not warmup:
        return regular
    k = step // factor_update_freq
    power_of_two = tf.logical_and(k > 0, tf.equal(tf.bitwise.bitwise_and(k, k - 1), 0))
    early = tf.logical_and(step < inverse_update_freq,
                           statistics_due(step, factor_update_freq))
    return tf.logical_or(regular, tf.logical_and(early, power_of_two))
