"""Which loss each output of a model has, as the curvature reads it.

`resolve_losses` turns a `compile`'s `loss` and `loss_weights` (one loss, a list in
output order or a dict by output name) into one `OutputLoss` per output with a loss:
its position in the flattened output, its `LossSpec` (Keras's cross-entropies, squared
error and the losses with a diagonal Hessian by kind; any other loss by its function,
with no kind), its weight and its shape. Around it: how a loss's terms are counted and
masked (`loss_values`, `term_weights`, `loss_mask`, `term_mask`: Keras's reductions,
masks, `ignore_class` and sample weights, as Keras's loss takes them) and where a
cross-entropy's logits are read (`as_read`, `loss_input`: the logits behind a softmax
or sigmoid output). `keras_tkfac.fisher` samples the Fisher's output gradients from
these; the curvature products (`keras_tkfac.products`) and the optimizer's loss
checks read them too. Split out of `fisher.py` on 2026-12-07 (the same code).
"""

import collections

from absl import logging
import tensorflow as tf
import keras

_KINDS = {
    keras.losses.sparse_categorical_crossentropy: "sparse_categorical_crossentropy",
    keras.losses.categorical_crossentropy: "categorical_crossentropy",
    keras.losses.binary_crossentropy: "binary_crossentropy",
    keras.losses.mean_squared_error: "mean_squared_error",
    keras.losses.poisson: "poisson",
    keras.losses.mean_squared_logarithmic_error: "mean_squared_logarithmic_error",
}


# Keras's losses that are a mean over the output's last axis of a function of each
# output unit and its label alone, convex in the unit: their Hessian in the output is
# diagonal and positive semi-definite, the true Fisher samples from it
# (`fisher.hessian_cotangent`). (MAE's, MAPE's and the hinge's are zero; KL
# divergence's `y / f^2` is unbounded near `f = 0`: those keep the empirical Fisher.
# Poisson's has a predictive distribution, the kind `"poisson"`, whose Fisher is the
# expectation `1 / f` of its Hessian `y / f^2`: `fisher.sample_targets`.)
_HESSIAN_LOSSES = (keras.losses.huber, keras.losses.log_cosh, keras.losses.squared_hinge)


# Keras's losses that are a mean over the last axis of one term per unit: on a `[B]`
# output their single value is the mean of the examples' terms (`resolve_loss`).
_UNIT_MEANS = _HESSIAN_LOSSES + (
    keras.losses.mean_squared_error, keras.losses.mean_absolute_error,
    keras.losses.mean_absolute_percentage_error,
    keras.losses.mean_squared_logarithmic_error, keras.losses.hinge,
    keras.losses.poisson, keras.losses.binary_crossentropy,
    keras.losses.binary_focal_crossentropy)


FISHER_TYPES = ("true", "empirical")


LossSpec = collections.namedtuple(
    "LossSpec", ["kind", "from_logits", "fn", "sums", "axis", "ignore_class", "hessian",
                 "laplace"],
    defaults=(False, -1, None, False, False))
"""A resolved loss: its kind (`None` if it has no predictive distribution to sample
labels from), whether it takes logits, the per-example loss function
`fn(y_true, y_pred)`, whether Keras sums its terms (`reduction="sum"`) rather than
averaging them, the class axis of a cross-entropy (`axis`, Keras's argument), the
label whose terms it leaves out (`ignore_class`, sparse categorical cross-entropy)
and whether, without a kind, the true Fisher samples its cotangent from its
diagonal Hessian at the real labels (`hessian`: Huber, log-cosh, squared hinge), and
whether it is Keras's mean absolute error (`laplace`: the negative log-likelihood of a
Laplace distribution, whose Fisher the quadratic model's KL bound measures its steps
with, `keras_tkfac.quadratic.kl_curvature`)."""


# Keras's reductions the curvature follows: the mean over the loss terms (Keras's
# default, `"sum_over_batch_size"`) and their sum.
_SUMS = ("sum", None, "none")


# Keras's `"mean"` divides by the terms' count as `"sum_over_batch_size"` does.
_REDUCTIONS = ("sum_over_batch_size", "mean") + _SUMS


OutputLoss = collections.namedtuple("OutputLoss", ["index", "name", "spec", "weight",
                                                 "shape"], defaults=(None,))
"""One output's part of the training loss: its position in the flattened model output
(`tf.nest.flatten(y_pred)`), its name, its `LossSpec`, its loss weight and the static
shape of the step's output (`None` where unknown), which the curvature products'
`forward` must reproduce (`products._sources`)."""


def resolve_loss(loss, fisher, output=None, warned=None, y_pred=None):
    """Resolves one output's `compile`-style loss into a `LossSpec`.

    Args:
        loss: a loss name, a loss function or a `keras.losses.Loss` instance (or a
            list or dict holding one of them).
        fisher: `"true"` or `"empirical"`.
        output: optional, the name of the output the loss belongs to, for errors.
        warned: optional set of the messages already logged (the optimizer's, so
            that each optimizer says each thing once); defaults to this module's.
        y_pred: optional, the output (or its shape's carrier): an output of shape
            `[B]` under a loss that averages over the last axis (`_UNIT_MEANS`)
            has the mean of its examples' terms for its loss whatever the
            reduction (Keras's single value, summed or not), so `sums` is off.

    Returns:
        A `LossSpec`.

    A loss the true Fisher cannot sample from resolves to `kind=None`; its output
    then takes the empirical Fisher (`output_fisher`), logged once per loss. A loss
    that returns one value for the whole batch gives every example that value for
    its term (logged; `per_example` below).

    Raises:
        ValueError: for a missing loss or several losses (use `resolve_losses`).
    """
    if loss is None:
        raise ValueError(
            "keras_tkfac needs the training loss to estimate the Fisher: compile the "
            "model with `loss=...` (or pass `loss=` to `update_curvature`). "
            "Received: loss=None"
        )
    if isinstance(loss, dict) and len(loss) == 1:
        loss = next(iter(loss.values()))
    if isinstance(loss, (list, tuple)) and len(loss) == 1:
        loss = loss[0]
    if isinstance(loss, (list, tuple, dict)):
        raise ValueError(
            "resolve_loss resolves a single-output loss; `resolve_losses` matches "
            f"several losses to a model's outputs. Received: loss={loss!r}"
        )
    fn_kwargs = {}
    if isinstance(loss, str):
        fn = keras.losses.get(loss)
    elif isinstance(loss, keras.losses.Loss) and hasattr(loss, "fn"):
        # A Keras built-in loss object: a per-example function and its kwargs.
        fn, fn_kwargs = loss.fn, dict(getattr(loss, "_fn_kwargs", {}))
    elif (isinstance(loss, keras.losses.Loss)
          and type(loss).__call__ is keras.losses.Loss.__call__):
        fn = loss.call
    elif isinstance(loss, keras.losses.Loss):
        # A subclass that overrides `__call__` rather than `call` (keras-io's
        # supervised contrastive loss): its `call` is Keras's, which raises; the loss
        # is what its `__call__` returns (found by a probe, 2026-12-07: a
        # `NotImplementedError` on the first step).
        fn = loss
    else:
        fn = loss
    kind = _KINDS.get(fn)
    from_logits = bool(fn_kwargs.get("from_logits", False))
    name = loss if isinstance(loss, str) else (
        getattr(loss, "name", None) or getattr(loss, "__name__", None) or repr(loss))
    where = "" if output is None else f" on output {output!r}"
    warned = _WARNED if warned is None else warned
    # A string or a function: Keras wraps it with the default reduction. A Keras
    # loss with `reduction=None` or `"none"` gives per-example values, whose
    # gradient `fit` takes as that of their sum.
    reduction = getattr(loss, "reduction", "sum_over_batch_size") if isinstance(
        loss, keras.losses.Loss) else "sum_over_batch_size"
    if reduction not in _REDUCTIONS:
        warn_once(warned, (
            f"keras_tkfac: the loss {name!r}{where} has reduction={reduction!r}; "
            "its curvature is that of the mean over its terms "
            "(reduction=\"sum_over_batch_size\", Keras's default)."))
    hessian = kind is None and fn in _HESSIAN_LOSSES
    if fisher == "true" and kind is None and not hessian:
        warn_once(warned, (
            f"keras_tkfac: the loss {name!r}{where} takes the empirical Fisher (its "
            "real labels): the true Fisher samples labels for sparse/categorical "
            "cross-entropy, binary cross-entropy, mean squared (logarithmic) error "
            "and Poisson, "
            "and output gradients from the Hessian of Huber, log-cosh and squared "
            "hinge, only "
            "(pass fisher=\"empirical\" to use the empirical Fisher for every "
            "output)."))

    def per_example(y_true, y_pred):
        # As Keras's `Loss.__call__`: labels in the predictions' float dtype, same rank
        # (class ids of a sparse cross-entropy as they are: float16 and bfloat16
        # hold integers exactly only up to 2048 and 256, so a bfloat16 output of 600
        # classes read label 599 as 600 and raised, found by a probe, 2026-12-07;
        # Keras's own loss casts labels to its float32 dtype).
        y_true, y_pred = tf.convert_to_tensor(y_true), tf.convert_to_tensor(y_pred)
        if y_pred.dtype.is_floating and not (
                kind == "sparse_categorical_crossentropy"
                and y_pred.dtype in (tf.float16, tf.bfloat16)):
            y_true = tf.cast(y_true, y_pred.dtype)
        y_true, y_pred = same_rank(y_true, y_pred)
        losses = fn(y_true, y_pred, **fn_kwargs)
        if losses.shape.rank != 0 or not y_pred.shape.rank:
            return losses
        if y_pred.shape.rank == 1 and fn in _UNIT_MEANS:
            # A `[B]` output (a squeezed regression or sigmoid output, a Q-network's
            # chosen action's value): Keras's mean over the last axis is the mean
            # over the batch, so each example is a term of one unit, exactly.
            return fn(y_true[:, None], y_pred[:, None], **fn_kwargs)
        # One value for the whole batch (`Dice()`'s default `axis=None`, a Python
        # loss ending in a mean, a loss over pairs of examples): every example's
        # term is the batch's loss, so the terms' mean is the loss, the gradient
        # of their sum gives each example's output the batch's count times the
        # loss's gradient there (for a mean over examples, exactly each example's
        # own loss's gradient), and the quadratic model's curvature is the loss's
        # own Gauss-Newton products. Until 2026-12-07 each example's loss alone
        # stood in for its term: a loss over pairs of examples (SimCLR's and
        # Barlow Twins' halves of the batch) then raised on a batch of one, or
        # gave zero curvature and steps that grew without bound to NaN (a probe).
        warn_once(warned, (
            f"keras_tkfac: the loss {name!r}{where} returns one value per batch, "
            "not one per example; each example's curvature is taken from the "
            "batch loss's gradient in its outputs (a per-example loss, such as "
            "Dice(axis=(1, 2, 3)), gives each example its own loss's curvature; a "
            "masked mean over tokens trains better as "
            "SparseCategoricalCrossentropy(ignore_class=...) or with per-token "
            "sample_weight: README, Limitations)."))
        return tf.broadcast_to(losses, tf.shape(y_pred)[:1])

    axis = fn_kwargs.get("axis", -1) if kind in _AXIS_KINDS else -1
    sums = reduction in _SUMS and not (
        fn in _UNIT_MEANS and len(getattr(y_pred, "shape", (0, 0))) == 1)
    return LossSpec(kind, from_logits, per_example, sums,
                    -1 if axis is None else int(axis), fn_kwargs.get("ignore_class"),
                    hessian, fn is keras.losses.mean_absolute_error)


# The losses whose `axis` argument names the class (or averaged) axis.
_AXIS_KINDS = ("categorical_crossentropy", "binary_crossentropy")


def class_last(spec, tensor, inverse=False):
    """`tensor` with the loss's class axis (`spec.axis`) moved last, where the
    distribution's formulas take it; `inverse` moves it back."""
    rank = tensor.shape.rank
    if spec.axis == -1 or rank is None or spec.axis % rank == rank - 1:
        return tensor
    axis = spec.axis % rank
    perm = [i for i in range(rank) if i != axis] + [axis]
    if inverse:
        perm = [perm.index(i) for i in range(rank)]
    return tf.transpose(tensor, perm)


_WARNED = set()


def warned_of(owner):
    """The set of messages `owner` (an optimizer) has logged: once per optimizer,
    not once per process (a notebook or a sweep builds many)."""
    return owner.__dict__.setdefault("_keras_tkfac_warned", set())


def warn_once(warned, message):
    """Logs `message` once per `warned` set (the optimizer's, or this module's)."""
    if message not in warned:
        warned.add(message)
        logging.warning(message)


def output_fisher(spec, fisher):
    """The Fisher an output takes: `fisher`, or `"empirical"` where its loss has no
    sampling rule (no `spec.kind` to sample labels from, no `spec.hessian`)."""
    return "empirical" if spec.kind is None and not spec.hessian else fisher


# From this many classes on, `loss_values` computes a sparse cross-entropy by its
# formula (below it the fused op's cost is small against the model's step).
WIDE_CLASSES = 1024


def loss_values(spec, y_true, y_pred):
    """`spec.fn(y_true, y_pred)`, the loss terms, where no gradient is taken of
    them: a sparse categorical cross-entropy over at least `WIDE_CLASSES` classes on
    its last axis (without `ignore_class`), on the logits Keras reads (`y_pred`
    under `from_logits`, or the logits behind a Keras softmax, `_keras_logits`), by
    `logsumexp(z) - z[label]` in float32; else `spec.fn` itself. TensorFlow's fused
    op behind Keras's also computes the gradient: on a language model's
    `[2048, 6000]` logits it took 2.6x the time of the formula (57 against 21 ms,
    2026-12-07), and the optimizer evaluates the loss several times a step
    (`keras_tkfac.linearized`, `products.Batch.loss`). Equal to Keras's loss up to
    float rounding."""
    logits = getattr(y_pred, "_keras_logits", None)
    if logits is None and spec.from_logits:
        logits = y_pred
    if (spec.kind == "sparse_categorical_crossentropy" and logits is not None
            and spec.axis == -1 and spec.ignore_class is None):
        logits, y_true = tf.convert_to_tensor(logits), tf.convert_to_tensor(y_true)
        pred_rank, true_rank = logits.shape.rank, y_true.shape.rank
        if (pred_rank is not None and true_rank is not None and pred_rank >= 2
                and (logits.shape[-1] or 0) >= WIDE_CLASSES
                and (true_rank == pred_rank - 1
                     or (true_rank == pred_rank and y_true.shape[-1] == 1))):
            if true_rank == pred_rank:
                y_true = tf.squeeze(y_true, -1)
            logits = tf.cast(logits, tf.float32)
            return (tf.reduce_logsumexp(logits, -1)
                    - tf.gather(logits, tf.cast(y_true, tf.int32),
                                batch_dims=pred_rank - 1))
    return spec.fn(y_true, y_pred)


def same_rank(y_true, y_pred):
    """Labels and predictions brought to the same rank as Keras's losses do
    (`squeeze_or_expand_to_same_rank`): labels `[B]` against predictions `[B, 1]`
    gain a last axis; a trailing axis of size 1 is squeezed otherwise."""
    true_rank, pred_rank = len(y_true.shape), len(y_pred.shape)
    if true_rank == pred_rank + 1 and y_true.shape[-1] == 1:
        if pred_rank == 1:
            y_pred = tf.expand_dims(y_pred, -1)
        else:
            y_true = tf.squeeze(y_true, -1)
    elif pred_rank == true_rank + 1 and y_pred.shape[-1] == 1:
        if true_rank == 1:
            y_true = tf.expand_dims(y_true, -1)
        else:
            y_pred = tf.squeeze(y_pred, -1)
    return y_true, y_pred


def _is_structure(value):
    return isinstance(value, (list, tuple, dict))


def _output_names(y_pred, output_names=None):
    """Names of the flattened model outputs, in `tf.nest.flatten(y_pred)` order.

    A dict output is named by its keys; a list, tuple or single output by
    `output_names` (the model's `output_names`) when they match, else by position.
    """
    if isinstance(y_pred, dict):
        names = sorted(y_pred)
        values = [y_pred[name] for name in names]
    elif isinstance(y_pred, (list, tuple)):
        names, values = None, list(y_pred)
    else:
        names, values = None, [y_pred]
    if any(_is_structure(value) for value in values):
        raise ValueError(
            "keras_tkfac supports a single output or a flat list or dict of outputs. "
            f"Received: y_pred={tf.nest.map_structure(lambda _: '*', y_pred)}"
        )
    if names is None:
        if output_names is not None and len(output_names) == len(values):
            names = list(output_names)
        elif len(values) == 1:
            names = ["output"]
        else:
            names = [f"output_{i}" for i in range(len(values))]
    return [str(name) for name in names]


def _per_output(value, names, argument, default):
    """One entry of `value` (a single value, a list or a dict) per named output."""
    if not _is_structure(value):
        return [value] * len(names)
    if isinstance(value, dict):
        if len(names) == 1 and len(value) == 1:
            return list(value.values())
        unknown = sorted(str(key) for key in value if str(key) not in names)
        if unknown:
            raise ValueError(
                f"`{argument}` names output(s) {unknown} that the model does not have "
                f"(its outputs: {names}). Received: {argument}={value!r}"
            )
        by_name = {str(key): entry for key, entry in value.items()}
        return [by_name.get(name, default) for name in names]
    if len(value) != len(names):
        raise ValueError(
            f"`{argument}` has {len(value)} entries for {len(names)} model outputs "
            f"{names}. Received: {argument}={value!r}"
        )
    return list(value)


def resolve_losses(loss, fisher, y_pred, *, loss_weights=None, output_names=None,
                   warned=None):
    """Matches `compile`-style losses and loss weights to a model's outputs.

    As in Keras, `loss` is one loss applied to every output, a list in the order of
    the outputs, or a dict keyed by output name; an output whose loss is `None` (or
    missing from the dict) has no loss and gives no curvature. `loss_weights` is a
    number, a list in the order of the outputs, or a dict keyed by output name
    (missing names weigh 1).

    Args:
        loss: the loss or losses.
        fisher: `"true"` or `"empirical"`.
        y_pred: the model output: a tensor, or a flat list or dict of tensors.
        loss_weights: optional loss weights `w_k`. Defaults to `None` (all 1).
        output_names: optional, the model's `output_names`, naming the outputs of a
            list `y_pred` (needed to match a dict `loss` to it).
        warned: optional set of the messages already logged (`resolve_loss`).

    Returns:
        A list of `OutputLoss`, one per output with a loss, in output order.

    Raises:
        ValueError: when the losses or weights do not match the outputs, or no output
            has a loss.
    """
    if loss is None:
        resolve_loss(None, fisher)
    names = _output_names(y_pred, output_names)
    losses = _per_output(loss, names, "loss", None)
    weights = _per_output(
        1.0 if loss_weights is None else loss_weights, names, "loss_weights", 1.0
    )
    flat = tf.nest.flatten(y_pred)
    found = [flat[index] if index < len(flat) else None for index in range(len(names))]
    outputs = [
        OutputLoss(index, name, resolve_loss(entry, fisher, name, warned, found[index]),
                   weight, getattr(found[index], "shape", None))
        for index, (name, entry, weight) in enumerate(zip(names, losses, weights))
        if entry is not None
    ]
    if not outputs:
        raise ValueError(
            "keras_tkfac needs a loss on at least one output to estimate the Fisher. "
            f"Received: loss={loss!r}"
        )
    return outputs


# The TensorFlow op whose output Keras's cross-entropies read the logits behind.
_LOGIT_OPS = {
    "sparse_categorical_crossentropy": "Softmax",
    "categorical_crossentropy": "Softmax",
    "binary_crossentropy": "Sigmoid",
}


def as_read(spec, y_pred):
    """`spec` as Keras's loss reads `y_pred`: a cross-entropy `from_logits` on the
    output of a softmax or sigmoid (Keras's `_keras_logits`, or a graph
    `Softmax`/`Sigmoid` op) reads the logits behind it, as if `from_logits` were
    off (Keras warns and does so: `_get_logits`), unless `ignore_class` masks
    `y_pred` first. Before (2026-12-07), the statistics differentiated the loss
    with respect to `y_pred`, which it does not read, and training raised."""
    op_type = _LOGIT_OPS.get(spec.kind)
    if not spec.from_logits or op_type is None or spec.ignore_class is not None:
        return spec
    behind = hasattr(y_pred, "_keras_logits") or (
        hasattr(y_pred, "op")
        and not isinstance(y_pred, (tf.__internal__.EagerTensor, tf.Variable))
        and y_pred.op.type == op_type and len(y_pred.op.inputs) == 1)
    return spec._replace(from_logits=False) if behind else spec


def _logits_source(spec, y_pred):
    """The tensor Keras's loss differentiates through: `y_pred` or its logits.

    Keras's rule (`keras/src/backend/tensorflow/nn.py`, `_get_logits`): the logits
    kept by a Keras softmax/sigmoid activation (`_keras_logits`), else the input of
    a graph `Softmax`/`Sigmoid` op (a raw `tf.nn.softmax`/`tf.nn.sigmoid` output).
    """
    if spec.kind is None:
        # A loss without a formula may itself call Keras's cross-entropy (a user's
        # `lambda t, p: binary_crossentropy(t, p) * w`), which reads the logits
        # behind `y_pred`: it is differentiated through the logits of a softmax or
        # sigmoid output, evaluated on the activation re-applied to them
        # (`loss_input`), so that a loss reading `y_pred` itself is differentiated too.
        return _activation_input(y_pred)[0]
    op_type = _LOGIT_OPS.get(spec.kind)
    if op_type is None or spec.from_logits:
        return y_pred
    if spec.ignore_class is not None:
        # Keras masks the probabilities first (`y_pred * valid`), which drops the
        # logits: the loss then reads the probabilities themselves.
        return y_pred
    if hasattr(y_pred, "_keras_logits"):
        return y_pred._keras_logits
    if (
        hasattr(y_pred, "op")
        and not isinstance(y_pred, (tf.__internal__.EagerTensor, tf.Variable))
        and y_pred.op.type == op_type
        and len(y_pred.op.inputs) == 1
    ):
        return y_pred.op.inputs[0]
    return y_pred


_ACTIVATIONS = {"Softmax": tf.nn.softmax, "Sigmoid": tf.sigmoid}


def _activation_input(y_pred):
    """`(logits, activation)` where `y_pred` is the output of a traced `Softmax` or
    `Sigmoid` op (Keras's activations on the last axis), else `(y_pred, None)`."""
    if (
        hasattr(y_pred, "op")
        and not isinstance(y_pred, (tf.__internal__.EagerTensor, tf.Variable))
        and y_pred.op.type in _ACTIVATIONS
        and len(y_pred.op.inputs) == 1
    ):
        return y_pred.op.inputs[0], _ACTIVATIONS[y_pred.op.type]
    return y_pred, None


def loss_input(spec, source, y_pred):
    """What the loss reads when it is differentiated with respect to `source`
    (`_logits_source`): `y_pred`, or, for a loss without a formula on a softmax or
    sigmoid output, that activation re-applied to the logits `source` (equal to
    `y_pred`, and keeping Keras's `_keras_logits` where `y_pred` has them)."""
    if spec.kind is not None or source is y_pred:
        return y_pred
    logits, activation = _activation_input(y_pred)
    if activation is None or logits is not source:
        return y_pred
    reapplied = activation(source)
    if hasattr(y_pred, "_keras_logits"):
        try:
            reapplied._keras_logits = source  # pylint: disable=protected-access
        except AttributeError:
            pass
    return reapplied


def term_weights(sample_weight, losses):
    """`sample_weight` as float weights of `losses`' rank: per term where it has
    their rank (`[B, T]` for a sequence output), else per example, `[B, 1, ...]`.
    """
    weight = tf.cast(sample_weight, tf.float32)
    if weight.shape.rank == losses.shape.rank and weight.shape.rank > 1:
        return weight
    weight = tf.reshape(weight, [-1])
    return tf.reshape(weight, tf.concat(
        [tf.shape(weight), tf.ones([tf.rank(losses) - 1], tf.int32)], 0))


def loss_mask(y_pred, losses):
    """Keras's mask on `y_pred` (a sequence output behind `mask_zero=True` or a
    `Masking` layer) as floats of `losses`' shape, or `None`.

    Keras's losses weight the terms by it and average over the unmasked ones
    (`Loss.__call__`); a mask whose rank is not the loss terms' is not applied.
    """
    mask = getattr(y_pred, "_keras_mask", None)
    if mask is None or mask.shape.rank != losses.shape.rank:
        return None
    return tf.cast(mask, tf.float32)


def term_mask(spec, y_true, y_pred, losses):
    """Which loss terms Keras's loss averages over, as floats of `losses`' shape,
    or `None` for all: not masked on `y_pred` (`loss_mask`) and, under
    `ignore_class`, whose real label is not the ignored class (Keras's loss masks
    those terms and averages over the others)."""
    mask = loss_mask(y_pred, losses)
    if spec.ignore_class is None or y_true is None:
        return mask
    labels = tf.cast(tf.convert_to_tensor(y_true), tf.float32)
    valid = tf.cast(tf.not_equal(tf.reshape(labels, tf.shape(losses)),
                                 float(spec.ignore_class)), tf.float32)
    return valid if mask is None else mask * valid


def _per_output_values(values, outputs, num_outputs, argument):
    """`values` (labels or sample weights) split over `outputs`.

    A single value goes to every output; a dict is read by output name; a list or
    tuple has one entry per model output, or one per output with a loss (Keras
    accepts both for labels).
    """
    if values is None or not _is_structure(values):
        return [values] * len(outputs)
    if isinstance(values, dict):
        if len(values) == 1 and len(outputs) == 1:
            return list(values.values())
        by_name = {str(key): value for key, value in values.items()}
        return [by_name.get(output.name) for output in outputs]
    values = list(values)
    if len(values) == num_outputs:
        return [values[output.index] for output in outputs]
    if len(values) == len(outputs):
        return values
    raise ValueError(
        f"`{argument}` has {len(values)} entries for {num_outputs} model outputs, "
        f"{len(outputs)} of them with a loss ({[o.name for o in outputs]}). "
        f"Received: {argument} with {len(values)} entries"
    )
