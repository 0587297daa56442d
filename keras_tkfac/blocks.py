"""Curvature blocks: what keras_tkfac knows about each kind of layer.

A block knows one layer's shapes and nothing about optimisation: which variables it
owns, what one call of the layer records (its input and pre-activation output), how a
batch of recorded inputs `a` and output gradients `g` becomes rows of the Fisher
expansion, and how the kernel and bias gradients map to the `[d_in', d_out]` matrix
that is preconditioned.

`BLOCKS` maps a layer class to its block class. The lookup is by exact class, so a
subclass with its own `call` is never silently treated as its parent; users add their
own layers with `register_block`. A block may decline a configuration of its layer
(`accepts`); such a layer takes the first-order fallback.
"""

import inspect
import weakref

from absl import logging
import tensorflow as tf
import keras

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
    # The layer's attributes whose regularizers add to the gradient of `variables`
    # beyond `rows`' `a^T g` (`keras_tkfac.factored` then uses the full form).
    regularizers = ("kernel_regularizer", "bias_regularizer")

    def __init__(self, layer):
        self.layer = layer
        if getattr(layer, "lora_enabled", False):
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
        kernel_update = tf.reshape(matrix[:n], self.kernel.shape)
        if self.bias is None:
            return kernel_update, None
        return kernel_update, tf.reshape(matrix[n], self.bias.shape)

    def _with_bias(self, a):
        return ops.append_homogeneous(a) if self.bias is not None else a

    def _add_bias(self, s):
        return _add_channel_bias(s, self.bias, self._data_format)

    @property
    def _data_format(self):
        return getattr(self.layer, "data_format", "channels_last")


def _add_channel_bias(s, bias, data_format):
    """`s + bias` along the channel axis of `data_format`, as Keras's layers add it."""
    if bias is None:
        return s
    if data_format == "channels_first":
        bias = tf.reshape(bias, [-1] + [1] * (len(s.shape) - 2))
    return s + bias


def _channels_last(x, data_format):
    """`x` with its channel axis last (recorded rows have one canonical layout)."""
    if data_format == "channels_last":
        return x
    rank = len(x.shape)
    return tf.transpose(x, [0, *range(2, rank), 1])


def _patches(x, kernel_size, strides, rates, padding):
    """im2col of a channels_last `x` with 1, 2 or 3 spatial axes.

    Returns `[batch, *locations, prod(kernel_size) * channels]`, each patch in the
    `(*kernel_size, channels)` order of Keras kernels. Volumes need `rates` of 1
    (TensorFlow's volume-patch extraction has no dilation).
    """
    kernel_size, strides, rates = list(kernel_size), list(strides), list(rates)
    if len(kernel_size) == 3:
        return tf.extract_volume_patches(
            x, ksizes=[1, *kernel_size, 1], strides=[1, *strides, 1],
            padding=padding.upper(),
        )
    if len(kernel_size) == 1:
        x = x[:, None]
        kernel_size, strides, rates = [1] + kernel_size, [1] + strides, [1] + rates
    return tf.image.extract_patches(
        x, sizes=[1, *kernel_size, 1], strides=[1, *strides, 1],
        rates=[1, *rates, 1], padding=padding.upper(),
    )


def _group_rows(patches, taps, groups, with_bias):
    """`[..., taps * channels]` patches as `[rows, groups, taps * channels / groups]`.

    Input channel `c` belongs to group `c // (channels / groups)`, as in Keras's
    grouped and depthwise convolutions; a column of ones is appended per group when
    the layer has a bias.
    """
    a = tf.reshape(patches, [-1, taps, groups, patches.shape[-1] // (taps * groups)])
    a = tf.reshape(tf.transpose(a, [0, 2, 1, 3]), [-1, groups, a.shape[1] * a.shape[3]])
    if with_bias:
        a = tf.concat([a, tf.ones_like(a[..., :1])], axis=-1)
    return a


def _depthwise_conv(layer, kernel, inputs, data_format):
    """`layer`'s depthwise convolution of `inputs` with `kernel` (no bias), as Keras's
    depthwise and separable layers compute it."""
    return keras.ops.depthwise_conv(
        inputs, kernel, strides=layer.strides, padding=layer.padding,
        dilation_rate=layer.dilation_rate, data_format=data_format)


def _taps(kernel_size):
    n = 1
    for k in kernel_size:
        n *= int(k)
    return n


class DenseBlock(CurvatureBlock):
    """`keras.layers.Dense`; inputs of rank > 2 contribute one row per position."""

    exact_rows = True

    def kernel_rows(self):
        return int(self.kernel.shape[0])

    def _product(self, inputs):
        return keras.ops.matmul(inputs, self.layer.kernel)

    def preactivation(self, inputs):
        return self._add_bias(self._product(inputs))

    def rows(self, inputs, output_grads):
        a = tf.reshape(inputs, [-1, self.kernel_rows()])
        g = tf.reshape(output_grads, [-1, self.d_out])
        return self._with_bias(a), g


class ConvBlock(CurvatureBlock):
    """`keras.layers.Conv1D`, `Conv2D` and `Conv3D`.

    Rows are (example, output location) pairs; the input rows are image patches
    (im2col) in the `(kh, kw, c_in)` order of the Keras kernel. A grouped convolution
    (`groups > 1`) is one block per group: group `j`'s filters see only its input
    channels' patches and produce only its outputs, so its Fisher block is
    approximated on its own (`[groups, d, d]` factors) and cross-group curvature is
    dropped, as K-FAC drops cross-layer curvature. `channels_first` layers compute as
    Keras does; only their recorded rows are moved to channels_last. `Conv3D` needs
    `dilation_rate=1` (TensorFlow's volume-patch extraction has no dilation).
    """

    is_conv = True

    def __init__(self, layer):
        super().__init__(layer)
        if layer.rank == 3 and tuple(layer.dilation_rate) != (1, 1, 1):
            raise UnsupportedLayer(
                f"Layer {layer.name!r}: Conv3D is supported without dilation only. "
                f"Received: dilation_rate={layer.dilation_rate}"
            )

    @property
    def groups(self):
        return int(self.layer.groups)

    @property
    def d_out(self):
        return int(self.kernel.shape[-1]) // self.groups

    def kernel_rows(self):
        return _taps(self.kernel.shape[:-1])

    def _causal_padding(self, inputs, data_format):
        """`(inputs, padding)`, with Conv1D's causal padding applied."""
        padding = self.layer.padding
        if padding == "causal":
            left = self.layer.dilation_rate[0] * (self.layer.kernel_size[0] - 1)
            pads = [[0, 0], [0, 0], [0, 0]]
            pads[1 if data_format == "channels_last" else 2] = [left, 0]
            inputs = tf.pad(inputs, pads)
            padding = "valid"
        return inputs, padding

    def preactivation(self, inputs):
        inputs, padding = self._causal_padding(inputs, self._data_format)
        s = keras.ops.conv(
            inputs,
            self.layer.kernel,
            strides=list(self.layer.strides),
            padding=padding,
            dilation_rate=self.layer.dilation_rate,
            data_format=self._data_format,
        )
        return self._add_bias(s)

    def rows(self, inputs, output_grads):
        inputs = _channels_last(inputs, self._data_format)
        inputs, padding = self._causal_padding(inputs, "channels_last")
        patches = _patches(inputs, self.layer.kernel_size, self.layer.strides,
                           self.layer.dilation_rate, padding)
        output_grads = _channels_last(output_grads, self._data_format)
        if self.groups > 1:
            a = _group_rows(patches, _taps(self.layer.kernel_size), self.groups,
                            self.bias is not None)
            return a, tf.reshape(output_grads, [-1, self.groups, self.d_out])
        a = tf.reshape(patches, [-1, self.kernel_rows()])
        g = tf.reshape(output_grads, [-1, self.d_out])
        return self._with_bias(a), g


    def sampled_rows(self, inputs, output_grads, stride, phase=0):
        """`rows` at every `stride`-th output location along each spatial axis.

        For cheaper statistics (`conv_location_stride`): patches are extracted only
        on grids of output locations, every `stride`-th along each spatial axis
        (every location of an axis shorter than `stride`). A grid's offsets are
        the digits of its phase in the mixed radix of the axes' steps, and the
        `cycle` phases visit every location once. Example `n` of the batch takes
        phase `phase + n`, so that every batch covers all phases: one fixed grid
        would be biased (behind a stride-2 consumer the gradients at even and odd
        locations differ systematically), and moving one grid at each statistics
        step would leave each step's estimate biased. The input rows are scaled by
        `sqrt(locations / sampled locations)`, so that sums over rows that are
        quadratic in `a` (TKFAC's `delta`, `n_phi`, `n_psi`, K-FAC's `A`) estimate
        the sums over all locations. Grid points past the edge (when an output size
        is not a multiple of `stride`) are rows of zeros, which add nothing to those
        sums but count in K-FAC's mean `G`.

        Args:
            inputs: the layer's input, as `rows` takes it.
            output_grads: the gradients with respect to its pre-activation output.
            stride: int >= 1, the grid's step along each spatial axis.
            phase: integer or integer scalar tensor, the phase of example 0.

        Returns:
            `(a, g)` rows as `rows` returns them, grouped by phase.
        """
        if stride == 1:
            return self.rows(inputs, output_grads)
        inputs = _channels_last(inputs, self._data_format)
        inputs, padding = self._causal_padding(inputs, "channels_last")
        output_grads = _channels_last(output_grads, self._data_format)
        steps = [min(stride, out) for out in output_grads.shape[1:-1]]
        cycle = 1
        for step in steps:
            cycle *= step
        phase = tf.cast(phase, tf.int32)
        parts = [self._grid_rows(inputs[p::cycle], output_grads[p::cycle], steps,
                                 padding, phase + p) for p in range(cycle)]
        return tuple(tf.concat(rows, 0) for rows in zip(*parts))

    def _grid_rows(self, inputs, output_grads, steps, padding, phase):
        """The rows of one grid of `sampled_rows` (channels_last tensors)."""
        pads, g_pads, begins, g_begins, sizes, g_sizes, masks = [], [], [], [], [], [], []
        total, radix = 1, 1
        for out, size, k, s, r, step in zip(
            output_grads.shape[1:-1], inputs.shape[1:-1], self.layer.kernel_size,
            self.layer.strides, self.layer.dilation_rate, steps,
        ):
            extent = (k - 1) * r + 1
            count = -(-out // step)
            # The padding of the layer's own convolution (TensorFlow's "same"), and
            # room for the grid of `count` points at the largest offset.
            pad = max((out - 1) * s + extent - size, 0) if padding == "same" else 0
            needed = (step - 1) * s + (count - 1) * step * s + extent
            pads.append([pad // 2, max(needed - size - pad // 2, pad - pad // 2)])
            g_pads.append([0, max((step - 1) + (count - 1) * step + 1 - out, 0)])
            offset = (phase // radix) % step
            radix *= step
            begins.append(offset * s)
            sizes.append((count - 1) * step * s + extent)
            g_begins.append(offset)
            g_sizes.append((count - 1) * step + 1)
            masks.append(tf.range(count) * step + offset < out)
            total *= out
        x = tf.pad(inputs, [[0, 0], *pads, [0, 0]])
        x = tf.slice(x, [0, *begins, 0], [-1, *sizes, -1])
        patches = _patches(x, self.layer.kernel_size,
                           [s * step for s, step in zip(self.layer.strides, steps)],
                           self.layer.dilation_rate, "valid")
        g = tf.pad(output_grads, [[0, 0], *g_pads, [0, 0]])
        g = tf.slice(g, [0, *g_begins, 0], [-1, *g_sizes, -1])
        g = g[(slice(None), *[slice(None, None, step) for step in steps])]
        valid = masks[0]
        for mask in masks[1:]:
            valid = tf.logical_and(valid[..., None], mask)
        scale = tf.sqrt(total / tf.reduce_sum(tf.cast(valid, tf.float32)))
        valid = tf.cast(valid, patches.dtype)[..., None]
        # One weight per row: 0 past the edge, the rescaling elsewhere.
        weight = tf.ones_like(patches[..., :1]) * valid * tf.cast(scale, patches.dtype)
        g = g * tf.cast(valid, g.dtype)
        if self.groups > 1:
            a = _group_rows(patches, _taps(self.layer.kernel_size), self.groups,
                            self.bias is not None)
            return (a * tf.reshape(weight, [-1, 1, 1]),
                    tf.reshape(g, [-1, self.groups, self.d_out]))
        a = self._with_bias(tf.reshape(patches, [-1, self.kernel_rows()]))
        return a * tf.reshape(weight, [-1, 1]), tf.reshape(g, [-1, self.d_out])


class ConvTransposeBlock(CurvatureBlock):
    """`keras.layers.Conv1DTranspose`, `Conv2DTranspose` and `Conv3DTranspose`.

    A transposed convolution `y = C(W)^T x` is the adjoint of the convolution `C(W)`
    (same kernel, strides, padding and dilation) that maps the output space back to
    the input space, so its kernel gradient is that convolution's filter gradient
    with the roles swapped: `dW = sum_t x_t ⊗ P_t(g)`, where `t` runs over *input*
    locations and `P_t(g)` is the patch of output gradients (im2col of `g` with the
    layer's strides and padding) that input location `t` writes to. Rows are
    therefore (example, input location) pairs with `a = x_t` (`c_in`) and
    `g = P_t(g)` (`kh * kw * c_out`, in the Keras kernel's `(kh, kw, c_out)` order);
    the gradient matrix is the kernel `(kh, kw, c_out, c_in)` as `[c_in, kh*kw*c_out]`.
    `output_padding` only changes the output size, which the patches follow.

    The bias is added per *output* location, which these rows do not enumerate, so
    only the kernel is preconditioned: the bias takes the first-order fallback.
    `Conv3DTranspose` needs `dilation_rate=1`.
    """

    is_conv = True

    def __init__(self, layer):
        super().__init__(layer)
        if layer.rank == 3 and tuple(layer.dilation_rate) != (1, 1, 1):
            raise UnsupportedLayer(
                f"Layer {layer.name!r}: Conv3DTranspose is supported without "
                f"dilation only. Received: dilation_rate={layer.dilation_rate}"
            )

    @property
    def bias(self):
        return None

    @property
    def d_out(self):
        return _taps(self.kernel.shape[:-1])

    def kernel_rows(self):
        return int(self.kernel.shape[-1])

    def preactivation(self, inputs):
        s = keras.ops.conv_transpose(
            inputs,
            self.layer.kernel,
            strides=list(self.layer.strides),
            padding=self.layer.padding,
            output_padding=self.layer.output_padding,
            dilation_rate=self.layer.dilation_rate,
            data_format=self._data_format,
        )
        bias = self.layer.bias if self.layer.use_bias else None
        return _add_channel_bias(s, bias, self._data_format)

    def rows(self, inputs, output_grads):
        a = _channels_last(inputs, self._data_format)
        a = tf.reshape(a, [-1, self.kernel_rows()])
        patches = _patches(_channels_last(output_grads, self._data_format),
                           self.layer.kernel_size, self.layer.strides,
                           self.layer.dilation_rate, self.layer.padding)
        return a, tf.reshape(patches, [-1, self.d_out])

    def grad_matrix(self, kernel_grad, bias_grad=None):
        kernel_grad = tf.reshape(tf.convert_to_tensor(kernel_grad),
                                 [self.d_out, self.kernel_rows()])
        return tf.transpose(kernel_grad)

    def split_matrix(self, matrix):
        return tf.reshape(tf.transpose(matrix), self.kernel.shape), None


class EinsumDenseBlock(DenseBlock):
    """`keras.layers.EinsumDense` whose equation is a dense map on trailing axes.

    Supported equations contract the input's trailing axes with the kernel's leading
    axes and append the kernel's remaining axes to the output, optionally after a
    leading `...`: `abc,cd->abd`, `abc,cde->abde` (the query/key/value projections of
    `MultiHeadAttention`) and `abcd,cde->abe` (its output projection). The kernel is
    then a `[d_in, d_out]` matrix and the leading axes are extra rows, as for `Dense`
    on sequences. A bias must cover all the kernel's output axes. Layers with other
    equations take the first-order fallback (logged at `wrap`).
    """

    def __init__(self, layer):
        super().__init__(layer)
        equation = layer.equation.replace(" ", "")
        inputs, rest = equation.split(",")
        kernel, output = rest.split("->")
        if inputs.startswith("...") and output.startswith("..."):
            inputs, output = inputs[3:], output[3:]
        contracted = "".join(c for c in kernel if c in inputs and c not in output)
        new = "".join(c for c in kernel if c not in inputs)
        batch = inputs[: len(inputs) - len(contracted)]
        bias_axes = getattr(layer, "bias_axes", None) or ""
        if (
            "." in inputs + kernel + output
            or not contracted
            or not new
            or kernel != contracted + new
            or inputs != batch + contracted
            or output != batch + new
            or (bias_axes and sorted(bias_axes) != sorted(new))
        ):
            raise UnsupportedLayer(
                f"Layer {layer.name!r}: keras_tkfac supports EinsumDense equations "
                "that map trailing input axes to trailing output axes (such as "
                "'abc,cde->abde'), with a bias on all output axes or none. "
                f"Received: equation={layer.equation!r}, "
                f"bias_axes={layer.bias_axes!r}"
            )
        self._contracted = len(contracted)

    @property
    def bias(self):
        return self.layer.bias

    @property
    def d_out(self):
        n = 1
        for dim in self.kernel.shape[self._contracted:]:
            n *= int(dim)
        return n

    def kernel_rows(self):
        n = 1
        for dim in self.kernel.shape[: self._contracted]:
            n *= int(dim)
        return n

    def _product(self, inputs):
        return keras.ops.einsum(self.layer.equation, inputs, self.layer.kernel)


class DepthwiseConvBlock(CurvatureBlock):
    """`keras.layers.DepthwiseConv2D` and `DepthwiseConv1D`: one block per input
    channel.

    Channel `c`'s filters see only channel `c`'s patches, so its Fisher block is
    approximated on its own: input factor over the `kh * kw` (or `k`) patch (plus
    bias), output factor over its `depth_multiplier` outputs. Cross-channel
    curvature is dropped, as K-FAC drops cross-layer curvature. `channels_first`
    rows are moved to channels_last.
    """

    is_conv = True

    @property
    def groups(self):
        return int(self.kernel.shape[-2])

    @property
    def d_out(self):
        return int(self.kernel.shape[-1])

    def kernel_rows(self):
        return _taps(self.kernel.shape[:-2])

    def preactivation(self, inputs):
        return self._add_bias(_depthwise_conv(self.layer, self.layer.kernel, inputs,
                                              self._data_format))

    def rows(self, inputs, output_grads):
        patches = _patches(_channels_last(inputs, self._data_format),
                           self.layer.kernel_size, self.layer.strides,
                           self.layer.dilation_rate, self.layer.padding)
        a = _group_rows(patches, self.kernel_rows(), self.groups, self.bias is not None)
        g = tf.reshape(_channels_last(output_grads, self._data_format),
                       [-1, self.groups, self.d_out])
        if self.groups == 1:
            # One input channel: one block, ungrouped rows (as `groups` promises).
            return a[:, 0], g[:, 0]
        return a, g


class SeparableConvBlock(CurvatureBlock):
    """`keras.layers.SeparableConv1D` and `SeparableConv2D`: the pointwise kernel and
    the bias; the depthwise kernel takes the first-order fallback.

    A separable convolution is a depthwise convolution `z = D(x)` followed by a 1x1
    convolution `s = z W + b` (Keras's `ops.separable_conv`), so the pointwise kernel
    and bias are a convolution block with one tap: rows are (example, output
    location) pairs, the input row is `[z_r, 1]` and the output row the gradient
    with respect to `s`, and `[z; 1]^T g` is their gradient exactly (as for `Dense`).
    The block records `z`, computed from the layer's input and depthwise kernel as
    Keras computes it. The pointwise kernel holds most of the layer's weights
    (`channels * multiplier * filters` against `taps * channels * multiplier`).
    The depthwise kernel would be a second block in the same layer (its rows need
    `g W^T`), which the one-block-per-layer engine does not have: it is left to the
    fallback, as a transposed convolution's bias is. `is_conv` as `Conv2D` with a
    1x1 kernel (TKFAC's trace-relative damping).
    """

    is_conv = True
    exact_rows = True
    regularizers = ("pointwise_regularizer", "bias_regularizer")

    @property
    def kernel(self):
        return self.layer.pointwise_kernel

    def kernel_rows(self):
        return int(self.kernel.shape[-2])

    def depthwise(self, inputs):
        """`z`, the depthwise convolution's output (the pointwise block's input)."""
        return _depthwise_conv(self.layer, self.layer.depthwise_kernel, inputs,
                               self._data_format)

    def _pointwise(self, z):
        # A 1x1 convolution is a product over the channel axis; written as one, it
        # also runs `channels_first` on CPU, where TensorFlow's Conv2D does not.
        kernel = tf.reshape(self.kernel, [self.kernel_rows(), self.d_out])
        if self._data_format == "channels_first":
            s = keras.ops.einsum("bc...,cf->bf...", z, kernel)
        else:
            s = keras.ops.matmul(z, kernel)
        return self._add_bias(s)

    def record(self, call, inputs, *args, **kwargs):
        z = self.depthwise(inputs)
        return z, self._pointwise(z)

    def preactivation(self, inputs):
        return self.record(None, inputs)[1]

    def rows(self, inputs, output_grads):
        a = tf.reshape(_channels_last(inputs, self._data_format), [-1, self.kernel_rows()])
        g = tf.reshape(_channels_last(output_grads, self._data_format), [-1, self.d_out])
        return self._with_bias(a), g


class EmbeddingBlock(CurvatureBlock):
    """`keras.layers.Embedding`: one-hot inputs, so the input factor is diagonal.

    A row is one looked-up position; its `a` is the id (the one-hot vector is never
    built), and the input factor is kept as a `[vocab]` vector, never as a
    `vocab x vocab` matrix.
    """

    input_kind = "diagonal"

    @property
    def kernel(self):
        return self.layer.embeddings

    @property
    def bias(self):
        return None

    def kernel_rows(self):
        return int(self.kernel.shape[0])

    def preactivation(self, inputs):
        return tf.gather(self.layer.embeddings, tf.cast(inputs, tf.int32))

    def rows(self, inputs, output_grads):
        ids = tf.reshape(tf.cast(inputs, tf.int32), [-1])
        return ids, tf.reshape(output_grads, [-1, self.d_out])


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
        return bool(layer.scale or layer.center) and not layer.renorm and not batch_axis

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


BLOCKS = {
    keras.layers.Dense: DenseBlock,
    keras.layers.EinsumDense: EinsumDenseBlock,
    keras.layers.Conv1D: ConvBlock,
    keras.layers.Conv2D: ConvBlock,
    keras.layers.Conv3D: ConvBlock,
    keras.layers.Conv1DTranspose: ConvTransposeBlock,
    keras.layers.Conv2DTranspose: ConvTransposeBlock,
    keras.layers.Conv3DTranspose: ConvTransposeBlock,
    keras.layers.Embedding: EmbeddingBlock,
    keras.layers.DepthwiseConv1D: DepthwiseConvBlock,
    keras.layers.DepthwiseConv2D: DepthwiseConvBlock,
    keras.layers.SeparableConv1D: SeparableConvBlock,
    keras.layers.SeparableConv2D: SeparableConvBlock,
}

# Not registered by default: on the workload suite (two seeds) covering the norms did
# not shorten TKFAC's steps to target anywhere and lengthened them twice, and their
# statistics made the statistics steps dearer (README, "Normalisation layers").
# `register_normalization_blocks()` registers them.
NORMALIZATION_BLOCKS = {
    keras.layers.LayerNormalization: LayerNormalizationBlock,
    keras.layers.BatchNormalization: BatchNormalizationBlock,
}


def register_block(layer_class, block_class):
    """Registers `block_class` (a `CurvatureBlock` subclass) for `layer_class`.

    Example:

    ```python
    keras_tkfac.register_block(MyDense, keras_tkfac.blocks.DenseBlock)
    ```
    """
    if not (isinstance(block_class, type) and issubclass(block_class, CurvatureBlock)):
        raise ValueError(
            "block_class must be a subclass of keras_tkfac.blocks.CurvatureBlock. "
            f"Received: block_class={block_class!r}"
        )
    BLOCKS[layer_class] = block_class


def register_normalization_blocks():
    """Registers the scale-and-shift blocks of `LayerNormalization` and
    `BatchNormalization` (off by default), for models wrapped from then on.

    Example:

    ```python
    keras_tkfac.register_normalization_blocks()
    model = keras_tkfac.wrap(build_model())
    ```
    """
    for layer_class, block_class in NORMALIZATION_BLOCKS.items():
        register_block(layer_class, block_class)


def block_for(layer):
    """The block for `layer`, or `None` when its class is not registered or its
    block declines the layer's configuration (`accepts`, or `UnsupportedLayer`
    from the block, logged once per layer: the layer takes the first-order
    fallback)."""
    block_class = BLOCKS.get(type(layer))
    if block_class is None or not block_class.accepts(layer):
        return None
    try:
        return block_class(layer)
    except UnsupportedLayer as error:
        if layer not in _DECLINED:
            _DECLINED.add(layer)
            logging.warning("keras_tkfac: %s It takes the first-order fallback.",
                            error)
        return None


# The layers whose fallback was logged: each layer once, by identity (by name, a
# second model in a notebook with the same layer names fell back silently).
_DECLINED = weakref.WeakSet()
