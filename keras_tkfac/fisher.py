"""Which loss gives the Fisher's output gradients, and how labels are sampled.

The true Fisher uses labels sampled from the model's own predictive distribution
(one Monte-Carlo sample per example); the empirical Fisher uses the real labels. For
every supported loss the sampling is chosen so that `E[g g^T]` over the samples equals
the Hessian of the loss with respect to the model output (the generalised
Gauss-Newton matrix):

- sparse / categorical cross-entropy: a class drawn from the predicted distribution;
- binary cross-entropy: a Bernoulli draw per output unit, the cotangent scaled by
  `sqrt(D)` because Keras averages the loss over the `D` units of the last axis;
- mean squared error: `y = f(x) + sqrt(D / 2) * eps`, `eps ~ N(0, I)`, with `D` the
  size of the last axis. Keras's MSE is `|y - f|^2 / D`; for the `|y - f|^2 / 2`
  normalisation this is the unit-variance Gaussian of the specification.
"""

import collections

import numpy as np
import tensorflow as tf
import keras

_KINDS = {
    keras.losses.sparse_categorical_crossentropy: "sparse_categorical_crossentropy",
    keras.losses.categorical_crossentropy: "categorical_crossentropy",
    keras.losses.binary_crossentropy: "binary_crossentropy",
    keras.losses.mean_squared_error: "mean_squared_error",
}

FISHER_TYPES = ("true", "empirical")

LossSpec = collections.namedtuple("LossSpec", ["kind", "from_logits", "fn"])
"""A resolved loss: its kind (`None` if it cannot be sampled), whether it takes
logits, and the per-example loss function `fn(y_true, y_pred)`."""


def resolve_loss(loss, fisher):
    """Resolves a `compile`-style loss into a `LossSpec`.

    Args:
        loss: a loss name, a loss function or a `keras.losses.Loss` instance.
        fisher: `"true"` or `"empirical"`.

    Returns:
        A `LossSpec`.

    Raises:
        ValueError: for a missing or multi-output loss, or a loss that the true
            Fisher cannot sample from.
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
            "keras_tkfac supports single-output models with one loss. "
            f"Received: loss={loss!r}"
        )
    fn_kwargs = {}
    if isinstance(loss, str):
        fn = keras.losses.get(loss)
    elif isinstance(loss, keras.losses.Loss) and hasattr(loss, "fn"):
        # A Keras built-in loss object: a per-example function and its kwargs.
        fn, fn_kwargs = loss.fn, dict(getattr(loss, "_fn_kwargs", {}))
    elif isinstance(loss, keras.losses.Loss):
        fn = loss.call
    else:
        fn = loss
    kind = _KINDS.get(fn)
    from_logits = bool(fn_kwargs.get("from_logits", False))
    if fisher == "true" and kind is None:
        raise ValueError(
            "The true Fisher can only sample labels for sparse/categorical "
            "cross-entropy, binary cross-entropy and mean squared error. For this "
            "loss pass `fisher=\"empirical\"` to the optimizer (real labels). "
            f"Received: loss={loss!r}"
        )

    def per_example(y_true, y_pred):
        return fn(y_true, y_pred, **fn_kwargs)

    return LossSpec(kind, from_logits, per_example)


def _mix(x):
    """A 32-bit integer hash (`lowbias32`), bit-exact in TensorFlow and XLA."""
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16))
    x = x * tf.constant(0x7FEB352D, tf.uint32)
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 15))
    x = x * tf.constant(0x846CA68B, tf.uint32)
    return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16))


def _uniform(shape, seed, stream=0):
    """Uniform samples in `(0, 1)` from a counter-based hash of `seed` (`[2]` int32).

    TensorFlow's stateless random ops draw different numbers with and without XLA
    for the same seed (measured on TF 2.21), so `jit_compile=True` would sample
    other labels; integer hashing gives the same bits on every device and compiler.
    """
    seed = tf.cast(seed, tf.uint32)
    key = _mix(seed[0] ^ _mix(seed[1] + tf.constant(0x9E3779B9 + stream, tf.uint32)))
    counter = tf.cast(tf.range(tf.reduce_prod(shape)), tf.uint32)
    bits = tf.bitwise.right_shift(_mix(counter ^ key), 8)
    uniform = (tf.cast(bits, tf.float32) + 0.5) * (1.0 / 2**24)
    return tf.reshape(uniform, shape)


def sample_targets(spec, y_pred, seed):
    """Labels drawn from the model's predictive distribution (no gradient).

    The draws depend only on `seed` and are the same with and without XLA.
    """
    y_pred = tf.stop_gradient(y_pred)
    if spec.kind in ("sparse_categorical_crossentropy", "categorical_crossentropy"):
        num_classes = tf.shape(y_pred)[-1]
        logits = tf.cast(tf.reshape(y_pred, [-1, num_classes]), tf.float32)
        if not spec.from_logits:
            logits = tf.math.log(tf.maximum(logits, 1e-12))
        # Gumbel-max: argmax(logits + Gumbel noise) is a draw from softmax(logits).
        gumbel = -tf.math.log(-tf.math.log(_uniform(tf.shape(logits), seed)))
        labels = tf.argmax(logits + gumbel, axis=-1, output_type=tf.int32)
        labels = tf.minimum(labels, num_classes - 1)
        labels = tf.reshape(labels, tf.shape(y_pred)[:-1])
        if spec.kind == "categorical_crossentropy":
            return tf.one_hot(labels, num_classes, dtype=y_pred.dtype)
        return labels
    if spec.kind == "binary_crossentropy":
        probs = tf.sigmoid(y_pred) if spec.from_logits else y_pred
        noise = tf.cast(_uniform(tf.shape(y_pred), seed), y_pred.dtype)
        return tf.cast(noise < probs, y_pred.dtype)
    if spec.kind == "mean_squared_error":
        width = tf.cast(tf.shape(y_pred)[-1], y_pred.dtype)
        # Box-Muller from two independent uniform streams.
        radius = tf.sqrt(-2.0 * tf.math.log(_uniform(tf.shape(y_pred), seed, 0)))
        angle = 2.0 * np.pi * _uniform(tf.shape(y_pred), seed, 1)
        noise = tf.cast(radius * tf.cos(angle), y_pred.dtype)
        return y_pred + tf.sqrt(width / 2.0) * noise
    raise ValueError(f"Cannot sample targets for loss kind {spec.kind!r}")


# The TensorFlow op whose output Keras's cross-entropies read the logits behind.
_LOGIT_OPS = {
    "sparse_categorical_crossentropy": "Softmax",
    "categorical_crossentropy": "Softmax",
    "binary_crossentropy": "Sigmoid",
}


def _logits_source(spec, y_pred):
    """The tensor Keras's loss differentiates through: `y_pred` or its logits.

    Keras's rule (`keras/src/backend/tensorflow/nn.py`, `_get_logits`): the logits
    kept by a Keras softmax/sigmoid activation (`_keras_logits`), else the input of
    a graph `Softmax`/`Sigmoid` op (a raw `tf.nn.softmax`/`tf.nn.sigmoid` output).
    """
    op_type = _LOGIT_OPS.get(spec.kind)
    if op_type is None or spec.from_logits:
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


def output_cotangent(spec, fisher, y_true, y_pred, seed, sample_weight=None):
    """Gradient of the summed per-example loss with respect to the model output.

    Backpropagating it from the output to a layer's pre-activation output gives that
    layer's per-example `g`. When `y_pred` is the output of a softmax or sigmoid (a
    Keras activation or a raw `tf.nn.softmax`/`tf.nn.sigmoid`), Keras's
    cross-entropies read the logits behind it; the cotangent is then taken with
    respect to those logits, which is exact and avoids differentiating through
    clipped probabilities.

    Args:
        spec: a `LossSpec`.
        fisher: `"true"` (sampled labels) or `"empirical"` (`y_true`).
        y_true: the real labels.
        y_pred: the model output.
        seed: `[2]` int32 seed of the sampler.
        sample_weight: optional per-example weights `w_n`; example `n` then
            contributes `w_n g_n g_n^T` (its cotangent is scaled by `sqrt(w_n)`).
            A negative weight counts as zero: it would make the Fisher indefinite.

    Returns:
        `(source, cotangent, num_examples)`: the tensor to backpropagate from
        (`y_pred` or its logits), `d(sum_n l_n)/d source`, and the number of loss
        terms `M` that the Keras mean loss averages over.
    """
    if fisher == "true":
        targets = sample_targets(spec, y_pred, seed)
    else:
        targets = y_true
    source = _logits_source(spec, y_pred)
    with tf.GradientTape() as tape:
        tape.watch(source)
        losses = spec.fn(targets, y_pred)
        total = tf.reduce_sum(losses)
    cotangent = tape.gradient(total, source)
    if cotangent is None:
        raise ValueError(
            "The loss does not depend on the model output, so it gives no curvature. "
            f"Received: loss={spec.fn!r}"
        )
    if spec.kind == "binary_crossentropy" and fisher == "true":
        # E[g g^T] must equal the Hessian diag(p(1-p)) / D of Keras's mean over D.
        cotangent *= tf.sqrt(tf.cast(tf.shape(y_pred)[-1], cotangent.dtype))
    if sample_weight is not None:
        weight = tf.cast(tf.reshape(sample_weight, [-1]), cotangent.dtype)
        shape = tf.concat([tf.shape(weight), tf.ones([tf.rank(cotangent) - 1], tf.int32)], 0)
        cotangent *= tf.reshape(tf.sqrt(tf.maximum(weight, 0.0)), shape)
    return source, cotangent, tf.size(losses)
