"""The classifiers' exact loss along the step, on the linearised network.

The quadratic model (`keras_tkfac.quadratic`) takes the loss to second order in the
outputs: its Gauss-Newton curvature is the cross-entropy's Hessian at the current
logits. Where an example is fitted confidently (`p` near one-hot) that Hessian,
`diag(p) - p p^T`, vanishes, while the loss of a step that moves the example's
logits by `Δ` against its label grows like `e^Δ`: the model is blind to what such a
step costs. The products' pass already has, for every covered direction `x`, the
change `J x` of the outputs; the loss at the linearised outputs `z - t (a J U + b J
M)` (the weights move by `-s`) is then the exact cross-entropy along the step with
only the network linearised, for the cost of a few loss evaluations on the outputs.

The rule (ours, not Martens & Grosse's; chosen by measurement, 2026-12-07): where
the whole step `t = 1` would raise the classifiers' loss on the batch by more than
`RISE_FRACTION` of it, the step is shortened to the scale among `1` and `SCALES`
with the lowest such loss; otherwise it is kept. Seen on
`tools/sweep_programs.lora_attention` (a LoRA-adapted attention block,
`SparseCategoricalCrossentropy(from_logits=True)`, 32 examples a batch): when all
but one batch had been fitted to losses of 1e-3, the model's step on the remaining
batch (loss 0.17-0.24) predicted a decrease of 0.16-0.32, the linearised loss rose
by 2.3-4.8, and the batch's loss after the step was 0.87-1.70 (validation 1.2-2.4,
against 0.09-0.13 before); the root-mean-square change of the logits was 4-6 against
0.5-1 on the other steps. Shortened to a quarter, those steps took the batch's loss
to 0.08-0.10. A bound on the logits' change itself (2 nats RMS) also fixed it but
bound half of the suite's convnet steps (70 -> 90 steps to its target); the best
scale on every step (a line search on the batch) cost the convnet, the transformer
and the autoencoder their steps to the target; a rise of any size as the trigger
shortened the transformer's first steps at chance (rises of 4-17% of the loss) and
cost it 15 steps to its target. The threshold at half the loss leaves every such
step alone (docs/RESULTS.md, "The classifiers' loss along the step").

Only outputs whose loss is a softmax or sigmoid cross-entropy with known logits
take part (`Batch.linearized`); the check compares their part of the loss. Without
such an output there is no check.
"""

import tensorflow as tf

from keras_tkfac import distributed
from keras_tkfac import loss_specs
from keras_tkfac import step_ops

# The shorter steps tried, as fractions of the model's; and the rise of the
# classifiers' loss, as a fraction of it, beyond which the whole step is not taken
# (`None`: no check).
SCALES = (0.5, 0.25, 0.125)
RISE_FRACTION = 0.5


class Outputs:
    """The classifier outputs of one products' pass, for `losses`.

    Args:
        entries: per output, `(spec, label, weight, logits, y_pred, jvps,
            output_weight)`: its `loss_specs.LossSpec`, labels, sample weights, the logits
            behind `y_pred` (or `y_pred` itself for a loss `from_logits`), the
            logits' changes `J x` along each direction, and Keras's loss weight.
        weighted_mean: `(terms, weight, mask, sums) -> scalar`, Keras's reduction
            of an output's loss terms.
    """

    def __init__(self, entries, weighted_mean):
        self.entries = entries
        self.weighted_mean = weighted_mean

    def losses(self, coefficients, before=False):
        """`[n]`: the weighted classifiers' loss at the logits
        `z + sum_i c_i J x_i` for each row `c` of `coefficients` (`[n, k]`), the
        mean over replicas; with `before`, `[1 + n]`, the loss at `z` itself
        first (no `J x` added)."""
        rows = [None] if before else []
        rows += tf.unstack(tf.cast(coefficients, tf.float32))
        values = []
        for row in rows:
            total = tf.constant(0.0)
            for spec, label, weight, logits, y_pred, jvps, output_weight in self.entries:
                z = tf.cast(logits, tf.float32)
                for i, jvp in enumerate(jvps if row is not None else []):
                    z = z + row[i] * tf.cast(jvp, tf.float32)
                terms = loss_specs.loss_values(
                    spec, label, _prediction(spec, logits, y_pred, z))
                total = total + output_weight * self.weighted_mean(
                    terms, weight, loss_specs.term_mask(spec, label, y_pred, terms),
                    spec.sums)
            values.append(total)
        return distributed.all_reduce("mean", [tf.stack(values)])[0]


def _prediction(spec, logits, y_pred, z):
    """What the loss reads at the logits `z`: `z` for a loss `from_logits`, else the
    activation of `z` (a softmax over the loss's class axis, or a sigmoid), carrying
    `z` as Keras's `_keras_logits` (so Keras's cross-entropies read the logits, as
    they do for the model's own output)."""
    if logits is y_pred:
        return z
    if spec.kind == "binary_crossentropy":
        prediction = tf.sigmoid(z)
    else:
        prediction = tf.nn.softmax(z, axis=spec.axis)
    try:
        prediction._keras_logits = z  # pylint: disable=protected-access
    except AttributeError:
        pass
    return prediction


def shorten(outputs, a, b):
    """`(a, b)` of the quadratic model's step `s = a U + b M`, scaled down where the
    classifiers' loss on the linearised network rises too far along it (module
    docstring); unchanged without `outputs` or with `RISE_FRACTION = None`.

    The losses at the shorter `SCALES` are computed only where the whole step's
    rises too far: each evaluation is a pass over the outputs (a language model's
    `[batch, length, vocabulary]` logits: several times an Adam step's whole cost
    when all five were computed on every step, 2026-12-07)."""
    if outputs is None or RISE_FRACTION is None:
        return a, b
    step = tf.stack([a, b])
    # The weights move by `-s`: the logits by `-t (a J U + b J M)`.
    first = outputs.losses(-step[None], before=True)

    def shorter():
        scales = tf.constant(SCALES, tf.float32)
        rest = outputs.losses(-scales[:, None] * step)
        return step_ops.linearized_scale(tf.concat([first, rest], 0),
                                    (1.0,) + tuple(SCALES), RISE_FRACTION)

    scale = tf.cond(step_ops.linearized_rises(first[0], first[1], RISE_FRACTION),
                    shorter, lambda: tf.constant(1.0))
    return a * scale, b * scale
