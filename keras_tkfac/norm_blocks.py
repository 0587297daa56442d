"""Curvature blocks of normalisation layers' per-channel scales and offsets
(`LayerNormalization`, `BatchNormalization`; off by default,
`blocks.register_normalization_blocks`)."""

import inspect

import tensorflow as tf

from keras_tkfac.block_base import CurvatureBlock, _taps


class ScaleAndShiftBlock(CurvatureBlock):
    """Base of normalisation layers: per channel `c`, `y = gamma_c * xhat + beta_c`.

    `xhat` is the layer's normalised input. An example's gradient of
    `(gamma_c, beta_c)` is `sum_r g_rc [xhat_rc, 1]` over its positions `r`, so
    channel `c` is a dense layer with input row `[xhat_rc, 1]` and one output: the
    block is grouped with one group per channel, a `[C, 2, 2]` input factor and a
    `[C, 1, 1]` output factor (`[C, 1, 1]` both when only `gamma` or only `beta`
    exists), as kfac-jax's scale-and-shift blocks. Cross-channel curvature is
    dropped, as K-FAC drops cross-layer curvature.

    The recorded `s` is the layer's own output (its `call` runs unchanged, moving
    statistics included) and the recorded `a` the call's input, `training` and
    `mask`, from which `rows` computes `xhat` (no gradient flows through it) on
    statistics steps only. Subclasses give `normalized` (the layer's `xhat`, from
    its own moments and `epsilon`) and `norm_axes`. Rows are (example, position)
    pairs, with the channel axes last.
    """

    @property
    def _gamma(self):
        return getattr(self.layer, "gamma", None)

    @property
    def _beta(self):
        return getattr(self.layer, "beta", None)

    @property
    def kernel(self):
        return self._gamma if self._gamma is not None else self._beta

    @property
    def bias(self):
        return self._beta if self._gamma is not None else None

    @property
    def groups(self):
        return _taps(self.kernel.shape)

    @property
    def d_out(self):
        return 1

    def kernel_rows(self):
        return 1

    def norm_axes(self, rank):
        """The channel axes of an input of rank `rank` (those `gamma` spans)."""
        raise NotImplementedError

    def normalized(self, inputs, training=None, mask=None):
        raise NotImplementedError

    def preactivation(self, inputs):
        # Inference-mode output; `record` runs the layer's own call instead.
        xhat = self.normalized(inputs)
        rank = len(inputs.shape)
        shape = [1] * rank
        for axis in self.norm_axes(rank):
            shape[axis] = inputs.shape[axis]
        s = xhat
        if self._gamma is not None:
            s = s * tf.reshape(tf.cast(self._gamma, xhat.dtype), shape)
        if self._beta is not None:
            s = s + tf.reshape(tf.cast(self._beta, xhat.dtype), shape)
        return s

    def record(self, call, inputs, *args, **kwargs):
        # `xhat` is computed by `rows`, on statistics steps only (as im2col is for
        # convolutions), from what the call saw.
        arguments = inspect.signature(call).bind(inputs, *args, **kwargs).arguments
        outputs = call(inputs, *args, **kwargs)
        return (inputs, arguments.get("training"), arguments.get("mask")), outputs

    def _channel_rows(self, x):
        """`x` as `[rows, C]`: example and position axes first, channel axes last."""
        rank = len(x.shape)
        channels = self.norm_axes(rank)
        if 0 in channels:
            raise ValueError(
                f"Layer {self.layer.name!r} normalises over the batch axis, which "
                "keras_tkfac does not precondition; exclude the layer. Received: "
                f"axis={self.layer.axis}"
            )
        order = [i for i in range(rank) if i not in channels] + channels
        if order != list(range(rank)):
            x = tf.transpose(x, order)
        return tf.reshape(x, [-1, self.groups])

    def rows(self, inputs, output_grads):
        """`inputs` is what `record` recorded: `(layer input, training, mask)`, or
        `(xhat,)` when `record` computed it."""
        xhat = inputs[0] if len(inputs) == 1 else self.normalized(*inputs)
        xhat = self._channel_rows(tf.stop_gradient(xhat))
        columns = [xhat] if self._gamma is not None else []
        if self._beta is not None:
            columns.append(tf.ones_like(xhat))
        a = tf.stack(columns, axis=-1)
        g = self._channel_rows(output_grads)[..., None]
        if self.groups == 1:
            return a[:, 0], g[:, 0]
        return a, g


class LayerNormalizationBlock(ScaleAndShiftBlock):
    """`keras.layers.LayerNormalization`, any `axis` without the batch axis.

    `xhat = (x - mean) / sqrt(var + epsilon)` with the moments over `axis`
    (`x / sqrt(var + epsilon)` with the deprecated `rms_scaling`, which has no
    `beta`). A layer with neither `scale` nor `center` has nothing to precondition,
    and one with `0` in `axis` mixes examples: both take the fallback.
    """

    @classmethod
    def accepts(cls, layer):
        axes = layer.axis if isinstance(layer.axis, list) else [layer.axis]
        return bool(layer.scale or layer.rms_scaling or layer.center) and 0 not in axes

    def norm_axes(self, rank):
        axes = self.layer.axis if isinstance(self.layer.axis, list) else [
            self.layer.axis]
        return sorted(axis % rank for axis in axes)

    def normalized(self, inputs, training=None, mask=None):
        x = tf.cast(inputs, tf.float32) if inputs.dtype != tf.float64 else inputs
        axes = self.norm_axes(len(x.shape))
        mean, variance = tf.nn.moments(x, axes=axes, keepdims=True)
        if not self.layer.rms_scaling:
            x = x - mean
        return x * tf.math.rsqrt(variance + self.layer.epsilon)


class BatchNormalizationBlock(ScaleAndShiftBlock):
    """`keras.layers.BatchNormalization`, any channel `axis` but the batch axis.

    In training mode (and when trainable) `xhat` uses the batch's moments, masked
    as the layer masks them; it then depends on the whole batch, and is treated as
    given, as kfac-jax does. Otherwise `xhat` uses the moving mean and variance,
    which stay non-trainable and untouched. Batch renormalization (`renorm=True`)
    composes extra per-batch corrections into `gamma` and `beta`; such layers take
    the fallback, as do layers with neither `scale` nor `center` and layers that
    normalise along the batch axis.
    """

    @classmethod
    def accepts(cls, layer):
        rank = getattr(layer.input_spec, "ndim", None)
        batch_axis = layer.axis == 0 or (rank is not None and layer.axis % rank == 0)
        # (Older Keras, 3.5 among them, has no `renorm`.)
        return (bool(layer.scale or layer.center) and not getattr(layer, "renorm", False)
                and not batch_axis)

    def norm_axes(self, rank):
        return [self.layer.axis % rank]

    def record(self, call, inputs, *args, **kwargs):
        recorded, outputs = super().record(call, inputs, *args, **kwargs)
        if getattr(self.layer, "synchronized", False) and tf.distribute.has_strategy():
            # Synchronized moments all-reduce, which cannot happen inside the
            # statistics' `tf.cond`: `xhat` is computed with the forward pass.
            recorded = (tf.stop_gradient(self.normalized(*recorded)),)
        return recorded, outputs

    def normalized(self, inputs, training=None, mask=None):
        x = tf.cast(inputs, tf.float32) if inputs.dtype != tf.float64 else inputs
        if training and self.layer.trainable:
            mean, variance = self.layer._moments(x, mask)
        else:
            mean, variance = self.layer.moving_mean, self.layer.moving_variance
        shape = [1] * len(x.shape)
        shape[self.norm_axes(len(x.shape))[0]] = -1
        mean = tf.reshape(tf.cast(mean, x.dtype), shape)
        variance = tf.reshape(tf.cast(variance, x.dtype), shape)
        return (x - mean) * tf.math.rsqrt(variance + self.layer.epsilon)
