"""The curvature-block interface (`CurvatureBlock`), shared by every kind of block.

The blocks themselves: `blocks` (dense, einsum-dense and embedding layers, and the
registry), `conv_blocks` (convolutions), `norm_blocks` (normalisation scales and
offsets), `recurrent` (recurrent layers), `lora_blocks` (LoRA adapters).
"""

import tensorflow as tf

from keras_tkfac import ops


class UnsupportedLayer(ValueError):
    """A block cannot precondition this configuration of its layer; the layer then
    takes the first-order fallback (`block_for`)."""


class CurvatureBlock:
    """Base class of the per-layer-kind helpers.

    Subclasses implement `preactivation`, `rows`, `kernel_rows` and `is_conv`, and
    may override `record` (what one call records) and `accepts` (which
    configurations of the layer they cover).
    `input_kind` is `"dense"`, or `"diagonal"` for layers whose inputs are one-hot
    (their rows' `a` are then integer ids and the input factor is a vector).
    `groups > 1` splits the layer into independent blocks (grouped and depthwise
    convolutions): rows are then `[rows, groups, d]` and the gradient matrix
    `[groups, d_in', d_out]`.

    Args:
        layer: the built Keras layer this block describes.
    """

    is_conv = False
    input_kind = "dense"
    groups = 1
    # Whether the gradient of the kernel and bias is exactly `rows`' `a^T g` summed
    # over the recorded calls (which `keras_tkfac.factored` relies on).
    exact_rows = False
    # Whether `rows` builds its input rows (a convolution's im2col patches, taps
    # times its input) rather than reshaping what the layer read: such a block takes
    # the factored form only where that is decided when traced (`factored.may_factor`).
    builds_rows = False
    # The layer's attributes whose regularizers add to the gradient of `variables`
    # beyond `rows`' `a^T g` (`keras_tkfac.factored` then uses the full form).
    regularizers = ("kernel_regularizer", "bias_regularizer")
    # Whether the grafted step controls give each of the layer's variables its own
    # RMSProp length (`step_size.graft_updates`), rather than the layer as a whole.
    graft_per_variable = False
    # Whether the block describes the layer's LoRA factors (`lora_blocks`); other
    # blocks decline a layer with LoRA enabled.
    covers_lora = False

    def __init__(self, layer):
        self.layer = layer
        if getattr(layer, "lora_enabled", False) and not self.covers_lora:
            raise UnsupportedLayer(
                f"Layer {layer.name!r} has LoRA enabled, which keras_tkfac does not "
                "precondition. Received: lora_enabled=True"
            )
        if getattr(layer, "quantization_mode", None):
            raise UnsupportedLayer(
                f"Layer {layer.name!r} is quantized, which keras_tkfac does not "
                "precondition. Received: "
                f"quantization_mode={layer.quantization_mode!r}"
            )

    @property
    def name(self):
        return self.layer.name

    @property
    def kernel(self):
        return self.layer.kernel

    @property
    def bias(self):
        return self.layer.bias if getattr(self.layer, "use_bias", True) else None

    @property
    def variables(self):
        return [v for v in (self.kernel, self.bias) if v is not None]

    @property
    def d_out(self):
        return int(self.kernel.shape[-1])

    @property
    def d_in(self):
        """Rows of the gradient matrix: kernel fan-in, plus one for the bias."""
        return self.kernel_rows() + (1 if self.bias is not None else 0)

    @classmethod
    def accepts(cls, layer):
        """Whether this block covers `layer`'s configuration (else: the fallback)."""
        return True

    def kernel_rows(self):
        raise NotImplementedError

    def record(self, call, inputs, *args, **kwargs):
        """One recorded call: `(a, s)`, what `rows` gets as its `inputs`, and `s`.

        `call` is the layer's own `call` and `args`, `kwargs` its arguments; `s` is
        the output whose gradient the statistics need, and `activate(s)` the
        layer's output. The default records the input and computes the
        pre-activation output itself.
        """
        return inputs, self.preactivation(inputs)

    def preactivation(self, inputs):
        """The layer's output before its fused activation."""
        raise NotImplementedError

    def record_call(self, call, inputs, *args, **kwargs):
        """One recorded call: `(a, s, outputs)`, `outputs` being the layer's output.

        The default is `record` followed by `activate`; blocks whose output is not
        a function of `s` alone (recurrent layers) override it.
        """
        a, s = self.record(call, inputs, *args, **kwargs)
        return a, s, self.activate(s)

    def rows(self, inputs, output_grads):
        """Turns one call's `(a, g)` into `([rows, d_in'], [rows, d_out])`."""
        raise NotImplementedError

    def row_norms(self, inputs):
        """Optional: `|a_r|^2` of the input rows `rows` gives for this call's
        `inputs` (`[rows]`, `[rows, groups]` for groups), where the block has a way
        to find them cheaper than squaring the rows (convolutions: without the
        patches); `None` (the default): the statistics square the rows."""
        return None

    def activate(self, s):
        activation = getattr(self.layer, "activation", None)
        return s if activation is None else activation(s)

    def grad_matrix(self, kernel_grad, bias_grad=None):
        """Stacks the gradients of `variables` (in that order) into `[d_in', d_out]`
        (`[groups, d_in', d_out]` when `groups > 1`)."""
        kernel_grad = tf.convert_to_tensor(kernel_grad)  # IndexedSlices -> dense
        if self.groups > 1:
            # Keras's grouped kernels end in `[..., groups * d_out]` with each
            # group's outputs contiguous; the bias has the same layout.
            k = tf.reshape(kernel_grad, [self.kernel_rows(), self.groups, self.d_out])
            matrix = tf.transpose(k, [1, 0, 2])
            if bias_grad is not None:
                bias = tf.reshape(bias_grad, [self.groups, 1, self.d_out])
                matrix = tf.concat([matrix, bias], axis=1)
            return matrix
        matrix = tf.reshape(kernel_grad, [self.kernel_rows(), self.d_out])
        if bias_grad is not None:
            matrix = tf.concat([matrix, tf.reshape(bias_grad, [1, self.d_out])], 0)
        return matrix

    def split_matrix(self, matrix):
        """Inverse of `grad_matrix`: one update per variable, `None` for a variable
        the layer lacks (here `(kernel_update, bias_update or None)`)."""
        n = self.kernel_rows()
        if self.groups > 1:
            # `[groups, rows, d_out]` back to Keras's `[rows, groups * d_out]`.
            matrix = tf.transpose(matrix, [1, 0, 2])
        if self.bias is None:
            return tf.reshape(matrix, self.kernel.shape), None
        # One `Split`, not two slices: fewer graph nodes to trace (issue 9's first step).
        kernel_update, bias_update = tf.split(matrix, [n, 1], axis=0)
        return (tf.reshape(kernel_update, self.kernel.shape),
                tf.reshape(bias_update, self.bias.shape))

    def _with_bias(self, a):
        return ops.append_homogeneous(a) if self.bias is not None else a

    def _add_bias(self, s):
        return _add_channel_bias(s, self.bias, self._data_format)

    @property
    def _data_format(self):
        return getattr(self.layer, "data_format", "channels_last")


def _taps(kernel_size):
    n = 1
    for k in kernel_size:
        n *= int(k)
    return n


def _add_channel_bias(s, bias, data_format):
    """`s + bias` along the channel axis of `data_format`, as Keras's layers add it."""
    if bias is None:
        return s
    if data_format == "channels_first":
        bias = tf.reshape(bias, [-1] + [1] * (len(s.shape) - 2))
    return s + bias
