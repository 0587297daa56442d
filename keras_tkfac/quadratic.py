"""Exact curvature products for the quadratic-model step (`step_control="quadratic"`).

The step `s = a U + b M` (`U` the preconditioned gradient, `M` the previous step) has
its coefficients chosen by minimising the quadratic model of the loss along the two
directions (Martens & Grosse, 2015, §7; `ops.quadratic_model_step`). The model's
curvature is the exact generalised Gauss-Newton matrix `C = J^T H J` of this step's
batch, not the Kronecker-factored approximation: `J` is the Jacobian of the model
output (the logits behind a softmax or sigmoid, where Keras's loss reads them) with
respect to the weights, and `H` the Fisher of the model's predictive distribution
in that output, which for the cross-entropies on logits and for mean squared error
is the Hessian of the loss (the Gauss-Newton matrix) and does not depend on the
labels:

- categorical (sparse or one-hot) cross-entropy: `diag(p) - p p^T` on logits,
  `diag(1 / p)` on probabilities (a softmax output whose logits are not visible);
- binary cross-entropy: `p (1 - p)` on logits, `1 / (p (1 - p))` on probabilities,
  divided by the `D` units Keras averages over;
- mean squared error: `2 / D`;
- any other loss (no sampling rule: its output takes the empirical Fisher): the
  empirical Fisher of its loss terms at the real labels, `g_m g_m^T` with `g_m`
  term `m`'s gradient with respect to the output, as in the preconditioner's
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

Where every output's loss has a formula above (all of them nonnegative), twice
the batch's loss, from the products' forward pass, bounds the model's predicted
decrease (`ops.quadratic_model_step`'s `max_decrease`; `LOSS_BOUND_FACTOR`): a
safeguard for saturated outputs, whose Gauss-Newton curvature vanishes while the
gradient does not; for other losses, which may be negative (cosine similarity),
there is no bound. Where the minimiser predicts more than `UNTRUSTED_DECREASE`
times the loss, the model is not trusted at all and the step is `FALLBACK`'s.

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
`FALLBACK`'s (`steps`).
"""

from absl import logging
import tensorflow as tf

from keras_tkfac import damping as damping_lib
from keras_tkfac import distributed
from keras_tkfac import fisher as fisher_lib
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


def _weighted_mean(losses, weight, mask=None):
    """Keras's `sum_over_batch_size` of `losses` under `weight` (per example or
    per term: `fisher.term_weights`) and the output's mask (`fisher.loss_mask`:
    the mean over the unmasked terms)."""
    losses = tf.cast(losses, tf.float32)
    if weight is not None:
        losses = losses * fisher_lib.term_weights(weight, losses)
    if mask is not None:
        return tf.math.divide_no_nan(tf.reduce_sum(losses * mask), tf.reduce_sum(mask))
    return tf.math.divide_no_nan(tf.reduce_sum(losses),
                                 tf.cast(tf.size(losses), tf.float32))


_EPSILON = 1e-7


def _bilinear(spec, logits, y_pred, x, y):
    """Per loss term, `x^T H y` for the Fisher `H` of `spec`'s distribution in the
    output it is differentiated through (`logits`: the logits behind `y_pred`)."""
    x, y = tf.cast(x, tf.float32), tf.cast(y, tf.float32)
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
    return 2.0 * tf.reduce_mean(x * y, -1)  # mean_squared_error


def _gradient_projections(output, label, source, y_pred, jvps):
    """Per loss term `m`, `<g_m, (J x)_m>` for each `J x` in `jvps`, `g_m` the
    gradient of term `m` of the loss at the real labels with respect to `source`
    (losses the Fisher has no formula for): the empirical Fisher's `x^T F y` is the
    weighted mean of their products."""
    with tf.GradientTape() as tape:
        tape.watch(source)
        terms = output.spec.fn(label, y_pred)
        total = tf.reduce_sum(tf.cast(terms, tf.float32))
    grad = tf.cast(tape.gradient(
        total, source, unconnected_gradients=tf.UnconnectedGradients.ZERO), tf.float32)
    rank = terms.shape.rank
    return [tf.reduce_sum(grad * jvp, axis=list(range(rank, jvp.shape.rank)))
            for jvp in jvps]


def _sources(outputs, y_pred):
    flat = tf.nest.flatten(y_pred)
    return [fisher_lib._logits_source(o.spec, flat[o.index]) for o in outputs], flat


def _forward_mode(forward, outputs, primals, directions):
    """`(J x for x in directions, sources, flat y_pred)` by forward-mode passes."""
    jvps, first = [], None
    for direction in directions:
        tangents = [tf.cast(d, p.dtype) for d, p in zip(direction, primals)]
        start = tangents_lib.operation_count() if first is None else None
        with tf.autodiff.ForwardAccumulator(primals, tangents) as accumulator:
            found, flat = _sources(outputs, forward())
        lost = tangents_lib.dropped(accumulator, start, found)
        if lost:
            raise tangents_lib.DroppedTangents(lost)
        hidden = tangents_lib.hidden_reads(primals, start, found)
        if hidden:
            raise tangents_lib.HiddenReads(hidden)
        jvps.append([
            tf.cast(accumulator.jvp(s, tf.UnconnectedGradients.ZERO), tf.float32)
            for s in found
        ])
        first = first or (found, flat)
    return jvps, *first


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
        outputs: the `fisher.OutputLoss`es of the training loss.
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
# batch. Measured (README, "Workload suite"): a quarter cut the MNIST-5k MLP's step
# by ~20% and kept the suite's 7 of 8, but over 300 steps of that MLP its loss,
# 0.05 by step 65, then jumped between 0.02 and 1.5 (the whole batch: a smooth fall
# to 1e-5). A sub-batch's curvature along the step is an unbiased but noisy estimate,
# and the model's step divides by it: late in training, when a few examples carry
# the curvature, a sub-batch without them overshoots.
PRODUCT_FRACTION = 1.0
PRODUCT_MIN_EXAMPLES = 32


class ModelForward:
    """`model(x, training=True)` on this step's batch, or on its first rows.

    `wrap`'s training step passes one as `update_curvature`'s `forward`, so that the
    curvature products can run on a sub-batch; a plain `lambda: model(x,
    training=True)` also works, and its products then cover the whole batch.
    """

    def __init__(self, model, x):
        self.model, self.x = model, x

    def __call__(self):
        return self.model(self.x, training=True)

    def examples(self):
        """The number of examples in the batch (a scalar int32 tensor)."""
        return tf.shape(tf.nest.flatten(self.x)[0])[0]

    def head(self, rows):
        """The forward pass on the batch's first `rows` examples."""
        return self.model(tf.nest.map_structure(lambda t: t[:rows], self.x),
                          training=True)


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
    random key).
    """

    def __init__(self, forward, outputs, y_true, sample_weight, state=(),
                 syncs=False):
        self.forward, self.outputs, self.state = forward, outputs, tuple(state)
        self.y_true, self.sample_weight = y_true, sample_weight
        # A forward pass that all-reduces (synchronized BatchNormalization under a
        # strategy) cannot run inside a `tf.cond`: the losses are then taken every
        # step and used where due.
        self.syncs = syncs
        # The flat outputs of the products' forward pass, when it saw the whole batch.
        self.predictions = None

    def _restoring(self, run):
        saved = [tf.identity(v) for v in self.state]
        try:
            return run()
        finally:  # also when `run` fails while tracing: its ops may still run
            for variable, value in zip(self.state, saved):
                variable.assign(value)

    def _per_output(self, count):
        return (fisher_lib._per_output_values(self.y_true, self.outputs, count,
                                              "y_true"),
                fisher_lib._per_output_values(self.sample_weight, self.outputs,
                                              count, "sample_weight"))

    def gram(self, variables, directions):
        """`curvature_gram`'s Gram of `directions` (on the sub-batch, if any)."""
        primals = [getattr(v, "value", v) for v in variables]
        forward, rows = self.forward, None
        if hasattr(forward, "head") and PRODUCT_FRACTION < 1:
            rows = _product_rows(forward.examples())
            forward = lambda: self.forward.head(rows)  # pylint: disable=unnecessary-lambda-assignment

        def run():
            try:
                return _forward_mode(forward, self.outputs, primals, directions)
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
        jvps, sources, flat = self._restoring(run)
        self.predictions = flat if rows is None else None
        labels, weights = self._per_output(len(flat))
        if rows is not None:
            labels, weights = _head(labels, rows), _head(weights, rows)
        count = len(directions)
        gram = [[0.0] * count for _ in range(count)]
        for k, (output, label, weight) in enumerate(zip(self.outputs, labels, weights)):
            source, y_pred = sources[k], flat[output.index]
            output_weight = tf.maximum(tf.cast(output.weight, tf.float32), 0.0)
            along = [jvp[k] for jvp in jvps]
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
                    value = _weighted_mean(terms, weight,
                                           fisher_lib.loss_mask(y_pred, terms))
                    gram[i][j] = gram[i][j] + output_weight * value
        gram = tf.stack([tf.stack([gram[min(i, j)][max(i, j)] for j in range(count)])
                         for i in range(count)])
        return distributed.all_reduce("mean", [gram])[0]

    def loss(self, predictions=None):
        """The data loss `sum_k w_k L_k` of the batch at `predictions` (flat outputs),
        or after a new forward pass at the current weights; the mean over replicas.
        """
        if predictions is None:
            predictions = self._restoring(
                lambda: tf.nest.flatten(self.forward()))
        labels, weights = self._per_output(len(predictions))

        def mean(output, label, weight):
            y_pred = predictions[output.index]
            terms = output.spec.fn(label, y_pred)
            return _weighted_mean(terms, weight, fisher_lib.loss_mask(y_pred, terms))

        total = tf.add_n([
            tf.maximum(tf.cast(output.weight, tf.float32), 0.0)
            * mean(output, label, weight)
            for output, label, weight in zip(self.outputs, labels, weights)])
        return distributed.all_reduce("mean", [total])[0]


    def loss_before(self, due):
        """The batch's loss at the current weights where `due` holds (else 0): from
        the products' pass when it saw the whole batch, else by a new pass."""
        if self.predictions is not None:
            return self.loss(self.predictions)
        if self.syncs:
            return self.loss()
        return tf.cond(due, self.loss, lambda: tf.constant(0.0))


def hand_over(optimizer, forward, outputs, y_true, sample_weight, owner):
    """This step's `Batch`, or `None` when the optimizer's step control needs no
    products or no `forward` was given."""
    if forward is None or not step_size.uses_products(optimizer.step_control):
        return None
    state = owner.non_trainable_variables if owner is not None else ()
    return Batch(forward, outputs, y_true, sample_weight, state,
                 distributed.syncs_in_backward(owner))


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

    def products(directions):
        return batch.gram(covered, [
            [p for (slot, *_), d in zip(used, direction)
             for p in slot.block.split_matrix(d) if p is not None]
            for direction in directions])

    damping = damping_lib.current(optimizer)
    dampings = []
    for slot, *_ in used:
        weight = optimizer._factor_weight[optimizer._slots.index(slot)]
        factors = [tf.math.divide_no_nan(f, weight) for f in slot.factors]
        dampings.append(tf.reduce_mean(
            optimizer._layer_damping(slot.block, factors, damping)))
    before = {}

    def bounds():
        # Where the loss is known to be nonnegative and the products' pass gave
        # it for free (`LOSS_BOUND_FACTOR`); the loss needs the labels.
        if (batch.predictions is None or batch.y_true is None
                or any(o.spec.kind is None for o in batch.outputs)):
            return optimizer.kl_clip, None
        before["loss"] = batch.loss(batch.predictions)
        return optimizer.kl_clip, LOSS_BOUND_FACTOR * before["loss"]

    hidden = tangents_lib.eager_hidden_reads([slot.block for slot, *_ in used])
    if hidden:
        return _without_hidden(optimizer, used, variables, learning_rate,
                               tangents_lib.HiddenReads(hidden))
    try:
        found, predicted, minimum = step_size.quadratic_updates(
            products, dampings, [u for *_, u in used],
            [g for *_, g, _ in used], previous, bounds)
    except tangents_lib.HiddenReads as error:
        return _without_hidden(optimizer, used, variables, learning_rate, error)
    except Exception as error:  # pylint: disable=broad-except
        # Neither forward nor reverse mode passes the model: no products.
        return _without_products(optimizer, used, variables, learning_rate,
                                 "%s: %s" % (type(error).__name__, error))
    if "loss" in before:
        # A model that predicts far more than the loss can fall is not trusted
        # (`UNTRUSTED_DECREASE`): that step is the sibling's, and its prediction
        # does not adapt the damping.
        trusted = -minimum <= UNTRUSTED_DECREASE * before["loss"]
        sibling, _ = _sibling_steps(optimizer, used, variables, learning_rate)
        found = [tf.where(trusted, s, other) for s, (*_, other) in zip(found, sibling)]
        predicted = _trusted_only(predicted, trusted)
    # `update_step` moves the weights by this fraction of the returned step.
    fraction = step_size.step_learning_rate(optimizer.step_control, learning_rate)
    if optimizer.adaptive_damping and batch.y_true is None:
        _warn_once(optimizer, "keras_tkfac: adaptive_damping compares the batch's "
                   "loss before and after the step, which needs `y_true` in "
                   "`update_curvature`; none was given, so the damping is not "
                   "adapted.")
    elif optimizer.adaptive_damping:
        loss_before = (before["loss"] if "loss" in before
                       else batch.loss_before(damping_lib.due(optimizer)))
        damping_lib.hand_over(optimizer, predicted(fraction), loss_before)
    return [(*rest, s) for (*rest, _), s in zip(used, found)], tf.constant(1.0)


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
                                  variables, learning_rate)[0])
    return [next(sibling) if read else next(modelled) for read in reads], tf.constant(1.0)


def _trusted_only(predicted, trusted):
    """`predicted` where the model is `trusted`, else 0 (no damping adaptation)."""
    def change(learning_rate):
        return tf.where(trusted, predicted(learning_rate), 0.0)
    return change


# The step control taken on a step without curvature products, and the factor that
# maps the quadratic control's learning rate onto its scale (the ratio of defaults).
FALLBACK = {"graft_quadratic": "graft", "quadratic": "trust_region"}


def _warn_once(optimizer, message):
    """Logs `message` once per optimizer (not once per process: a notebook or a
    sweep builds many)."""
    warned = optimizer.__dict__.setdefault("_keras_tkfac_warned", set())
    if message not in warned:
        warned.add(message)
        logging.warning(message)


def _without_products(optimizer, used, variables, learning_rate, failure=None):
    """`steps` when no `forward` was given (a custom loop or a model's own
    `train_step` that does not pass it) or the products failed (`failure`, the
    reason): the non-quadratic sibling of the step control (`FALLBACK`) at the
    learning rate scaled by the ratio of their defaults, so that the default
    learning rate gives the sibling's default step. The momentum slot still holds
    the previous step, so the two kinds of step can alternate."""
    control = optimizer.step_control
    if failure is None:
        _warn_once(optimizer, 'keras_tkfac: step_control="%s" needs curvature '
                   "products, which need `forward=` in `update_curvature` "
                   "(keras_tkfac.wrap's training step passes it); without them "
                   'the step is a "%s" step.' % (control, FALLBACK[control]))
    else:
        _warn_once(optimizer, 'keras_tkfac: the curvature products failed (%s), so '
                   'the step is a "%s" step.' % (failure, FALLBACK[control]))
    return _sibling_steps(optimizer, used, variables, learning_rate)


def _sibling_steps(optimizer, used, variables, learning_rate):
    """The steps of the step control's sibling (`FALLBACK`), in `steps`'s form."""
    control = optimizer.step_control
    sibling = FALLBACK[control]
    ratio = (step_size.DEFAULT_LEARNING_RATE[sibling]
             / step_size.DEFAULT_LEARNING_RATE[control])
    # `update_step` moves by `step_size.step_learning_rate`: `learning_rate / 3e-3`.
    factor = ratio * step_size.MODEL_STEP_LEARNING_RATE
    scale = step_size.update_scale(sibling, [u for *_, u in used],
                                   [g for *_, g, _ in used], learning_rate * ratio,
                                   optimizer.kl_clip)
    momentums = [optimizer._momentums[optimizer._get_variable_index(v)]
                 for v in variables]
    found = []
    for slot, indices, grad, update in used:
        update = factor * scale * update
        if optimizer.momentum > 0:
            previous = slot.block.grad_matrix(
                *[tf.cast(momentums[i], tf.float32) for i in indices])
            update = step_size.momentum_step(sibling, optimizer.momentum, previous,
                                             update)
        found.append((slot, indices, grad, update))
    return found, tf.constant(1.0)
