"""Curvature blocks of convolution layers: `Conv1D`/`2D`/`3D`, their transposes,
depthwise and separable convolutions (rows from im2col patches)."""

import numpy as np
import tensorflow as tf
import keras

from keras_tkfac import native_convs
from keras_tkfac.block_base import (
    CurvatureBlock, UnsupportedLayer, _add_channel_bias, _taps)


def _channels_last(x, data_format):
    """`x` with its channel axis last (recorded rows have one canonical layout)."""
    if data_format == "channels_last":
        return x
    rank = len(x.shape)
    return tf.transpose(x, [0, *range(2, rank), 1])


def _patches(x, kernel_size, strides, rates, padding):
    """im2col of a channels_last `x` with 1, 2 or 3 spatial axes.

    Returns `[batch, *locations, prod(kernel_size) * channels]`, each patch in the
    `(*kernel_size, channels)` order of Keras kernels. Where the spatial sizes are
    known when traced, one gather of the channel vectors (`_gathered_patches`);
    else TensorFlow's patch extraction, where volumes need `rates` of 1 (its
    volume-patch extraction has no dilation).
    """
    kernel_size, strides, rates = list(kernel_size), list(strides), list(rates)
    if None not in x.shape[1:-1]:
        patches = _gathered_patches(x, kernel_size, strides, rates, padding)
    elif len(kernel_size) == 3:
        patches = tf.extract_volume_patches(
            x, ksizes=[1, *kernel_size, 1], strides=[1, *strides, 1],
            padding=padding.upper(),
        )
    else:
        if len(kernel_size) == 1:
            x = x[:, None]
            kernel_size, strides, rates = [1] + kernel_size, [1] + strides, [1] + rates
        patches = tf.image.extract_patches(
            x, sizes=[1, *kernel_size, 1], strides=[1, *strides, 1],
            rates=[1, *rates, 1], padding=padding.upper(),
        )
    return patches


def _gathered_patches(x, kernel_size, strides, rates, padding):
    """`_patches` of an `x` whose spatial sizes are static, as one `tf.gather` of
    its channel vectors at the patches' locations (`_patch_locations`). The same
    values as TensorFlow's patch extraction, in about a third of its time on this
    CPU (a one-off timing at `tools/step_costs.py`'s ResNet shapes, 2026-12-05:
    128x28x28x16, 3x3 kernel, 15.7 against 5.2 ms; at stride 2 4.0 against 2.4 ms).
    """
    pads, outs, index = _patch_locations(x.shape[1:-1], kernel_size, strides, rates,
                                         padding)
    channels = x.shape[-1]
    flat = tf.reshape(_pad(x, pads), [-1, _padded_size(x.shape[1:-1], pads), channels])
    found = tf.gather(flat, index, axis=1)
    return tf.reshape(found, [-1, *outs, _taps(kernel_size) * channels])


def _padded_size(sizes, pads):
    """The number of locations of static spatial `sizes` padded by `pads` (as
    `_patch_locations` returns them: batch and channels first and last)."""
    return _taps([size + sum(pad) for size, pad in zip(sizes, pads[1:-1])])


def _pad(x, pads):
    """`x` padded with zeros (no copy where `pads` are all zero)."""
    return tf.pad(x, pads) if any(any(p) for p in pads) else x


def _patch_locations(sizes, kernel_size, strides, rates, padding):
    """Where the patches of an input of static spatial `sizes` read it.

    Returns:
        `(pads, outs, index)`: the input's padding (TensorFlow's `"same"` or
        `"valid"`, for `tf.pad` of a `[batch, *sizes, channels]` tensor), the output
        locations per axis, and the flat index into the padded spatial axes of
        every (location, tap) pair, locations then taps, each row-major.
    """
    pads, outs, padded = [[0, 0]], [], []
    for size, k, s, r in zip(sizes, kernel_size, strides, rates):
        extent = (k - 1) * r + 1
        if padding.lower() == "same":
            out = -(-size // s)
            total = max((out - 1) * s + extent - size, 0)
            pads.append([total // 2, total - total // 2])
        else:
            out = (size - extent) // s + 1
            pads.append([0, 0])
        outs.append(out)
        padded.append(size + sum(pads[-1]))
    rank = len(outs)
    index = np.zeros([1] * (2 * rank), np.int64)
    for axis, (out, k, s, r) in enumerate(zip(outs, kernel_size, strides, rates)):
        shape = [1] * (2 * rank)
        shape[axis], shape[rank + axis] = out, k
        position = np.reshape(np.arange(out)[:, None] * s + np.arange(k)[None, :] * r,
                              shape)
        index = index + position * _taps(padded[axis + 1:])
    return pads + [[0, 0]], outs, tf.constant(np.reshape(index, [-1]), tf.int32)


def _row_norms(layer, x, padding, groups, with_bias):
    """`|a_r|^2` of a convolution block's input rows (`[rows]`, `[rows, groups]` for
    `groups > 1`; `CurvatureBlock.row_norms`) without the patches: the channels_last
    input `x`'s squares summed over each group's channels, gathered at the patches'
    locations (`_patch_locations`) and summed over the taps, `rows x taps` values
    where the patches hold `rows x taps x channels` (`ops.tkfac_statistics`'
    `a_sq`). In float32. `None` where the spatial sizes are unknown when traced or
    the padding is neither `"same"` nor `"valid"` (the statistics then square the
    rows).
    """
    if None in x.shape[1:-1] or padding.lower() not in ("same", "valid"):
        return None
    squares = tf.square(tf.cast(x, tf.float32))
    squares = tf.reduce_sum(tf.reshape(
        squares, [-1, *x.shape[1:-1], groups, squares.shape[-1] // groups]), -1)
    pads, _, index = _patch_locations(x.shape[1:-1], layer.kernel_size, layer.strides,
                                      layer.dilation_rate, padding)
    flat = tf.reshape(_pad(squares, pads),
                      [-1, _padded_size(x.shape[1:-1], pads), groups])
    norms = tf.reduce_sum(tf.reshape(tf.gather(flat, index, axis=1),
                                     [-1, _taps(layer.kernel_size), groups]), axis=1)
    norms = norms if groups > 1 else norms[:, 0]
    return norms + 1.0 if with_bias else norms


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


def _undilated_volumes(layer):
    """Raises `UnsupportedLayer` for a dilated 3-D convolution or transpose: their
    rows need TensorFlow's volume-patch extraction, which has no dilation."""
    if layer.rank == 3 and tuple(layer.dilation_rate) != (1, 1, 1):
        raise UnsupportedLayer(
            f"Layer {layer.name!r}: {type(layer).__name__} is supported without "
            f"dilation only. Received: dilation_rate={layer.dilation_rate}")


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
    exact_rows = True  # the kernel's gradient is `a^T g` over every location's patch
    builds_rows = True

    def __init__(self, layer):
        super().__init__(layer)
        _undilated_volumes(layer)

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
        s = native_convs.convolution(
            inputs, self.layer.kernel, self.layer.strides, padding,
            self.layer.dilation_rate, self._data_format)
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

    def row_norms(self, inputs):
        x = _channels_last(inputs, self._data_format)
        x, padding = self._causal_padding(x, "channels_last")
        return _row_norms(self.layer, x, padding, self.groups, self.bias is not None)

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
            `(a, g)` rows as `rows` returns them, examples in order, each
            example's grid points row-major; `None` where a spatial size is
            unknown when traced (`capture` then takes `rows`).
        """
        if stride == 1:
            return self.rows(inputs, output_grads)
        inputs = _channels_last(inputs, self._data_format)
        inputs, padding = self._causal_padding(inputs, "channels_last")
        output_grads = _channels_last(output_grads, self._data_format)
        if None in inputs.shape[1:] or None in output_grads.shape[1:]:
            return None  # (`capture` then takes every location's rows)
        grid = _SampledGrid(inputs.shape[1:-1], output_grads.shape[1:-1], self.layer,
                            padding, stride)
        batch = tf.shape(inputs)[0]
        # Each example's phase within the cycle indexes the grid's static tables.
        own = tf.math.floormod(tf.cast(phase, tf.int32) + tf.range(batch), grid.cycle)
        patches = _gather_rows(_pad(inputs, grid.pads), grid.patch_index,
                               tf.gather(grid.patch_shift, own))
        patches = tf.reshape(patches, [batch, grid.points,
                                       _taps(self.layer.kernel_size) * inputs.shape[-1]])
        g = _gather_rows(_pad(output_grads, grid.grad_pads), grid.grad_index,
                         tf.gather(grid.grad_shift, own))
        # One weight per row: 0 past the edge, the rescaling elsewhere.
        weight = tf.cast(tf.reshape(tf.gather(grid.weight, own), [-1, 1]), patches.dtype)
        valid = tf.cast(tf.gather(grid.valid, own), g.dtype)  # [batch, points]
        g = tf.reshape(g * tf.expand_dims(valid, -1), [-1, g.shape[-1]])
        if self.groups > 1:
            a = _group_rows(patches, _taps(self.layer.kernel_size), self.groups,
                            self.bias is not None)
            return (a * weight[:, :, None],
                    tf.reshape(g, [-1, self.groups, self.d_out]))
        a = self._with_bias(tf.reshape(patches, [-1, self.kernel_rows()]))
        return a * weight, g


def _gather_rows(x, index, shift):
    """`x`'s channel vectors (`[batch, *spatial, channels]`) at the flat spatial
    `index` (`[points]`) moved by each example's `shift` (`[batch]`, in units of the
    flat index): `[batch, points, channels]`, one gather."""
    flat = tf.reshape(x, [-1, _taps(x.shape[1:-1]), x.shape[-1]])
    return tf.gather(flat, tf.expand_dims(index, 0) + tf.expand_dims(shift, 1),
                     batch_dims=1)


class _SampledGrid:
    """The static geometry of `ConvBlock.sampled_rows` on inputs of spatial `sizes`
    and outputs of spatial `outs`: along each axis every `step`-th output location
    (`step = min(stride, out)`), `count` of them, from an offset below `step` that
    each example takes from its phase. Holds the paddings of the input (the layer's
    own, and room for the grid at its largest offset) and of the output gradients
    (to `count * step`), and the flat indices at offset zero of each grid point's
    patch taps (`patch_index`, points then taps, row-major as `_patch_locations`)
    and of each grid point (`grad_index`).

    A grid's offsets are the digits of its phase in the mixed radix of the axes'
    steps, so they repeat every `cycle` (the steps' product) phases; what depends on
    them is tabulated here, per phase modulo `cycle`, so that the traced step only
    gathers from constants: the flat indices' shifts (`patch_shift`, `grad_shift`,
    `[cycle]`), which grid points lie inside the output (`valid`, `[cycle, points]`,
    1 or 0) and each row's weight (`weight`: `valid` times `sqrt(locations /
    valid points)`, in float32 as the rows' rescaling computes it)."""

    def __init__(self, sizes, outs, layer, padding, stride):
        self.steps = [min(stride, out) for out in outs]
        counts = [-(-out // step) for out, step in zip(outs, self.steps)]
        self.locations = float(np.prod(outs))
        self.points = int(np.prod(counts))
        self.pads, self.grad_pads, self.padded, self.grad_padded = (
            [[0, 0]], [[0, 0]], [], [])
        for size, out, k, s, r, step, count in zip(
                sizes, outs, layer.kernel_size, layer.strides, layer.dilation_rate,
                self.steps, counts):
            extent = (k - 1) * r + 1
            total = max((out - 1) * s + extent - size, 0) if padding == "same" else 0
            before = total // 2
            length = max(size + total, (count * step - 1) * s + extent)
            self.pads.append([before, length - size - before])
            self.padded.append(length)
            self.grad_pads.append([0, count * step - out])
            self.grad_padded.append(count * step)
        self.pads.append([0, 0])
        self.grad_pads.append([0, 0])
        rank = len(outs)
        patch, grad = 0, 0
        in_strides = self.strides(self.padded)
        grad_strides = self.strides(self.grad_padded)
        for axis, (k, s, r, step, count) in enumerate(zip(
                layer.kernel_size, layer.strides, layer.dilation_rate, self.steps,
                counts)):
            shape = [1] * (2 * rank)
            shape[axis], shape[rank + axis] = count, k
            position = (np.arange(count)[:, None] * step * s
                        + np.arange(k)[None, :] * r).reshape(shape)
            patch = patch + position * in_strides[axis]
            grad_shape = [1] * rank
            grad_shape[axis] = count
            grad = grad + (np.arange(count) * step).reshape(grad_shape) * grad_strides[axis]
        self.patch_index = tf.constant(np.reshape(patch, [-1]), tf.int32)
        self.grad_index = tf.constant(np.reshape(grad, [-1]), tf.int32)
        self.cycle = int(np.prod(self.steps))
        radix = np.cumprod([1] + self.steps[:-1])
        offsets = np.stack([(np.arange(self.cycle) // int(r)) % step
                            for r, step in zip(radix, self.steps)], axis=1)
        self.patch_shift = tf.constant(
            offsets @ np.array(self.strides(self.padded, layer.strides)), tf.int32)
        self.grad_shift = tf.constant(
            offsets @ np.array(self.strides(self.grad_padded)), tf.int32)
        valid = np.ones([self.cycle] + [1] * rank, bool)
        for axis, (out, step, count) in enumerate(zip(outs, self.steps, counts)):
            shape = [self.cycle] + [1] * rank
            shape[1 + axis] = count
            inside = np.arange(count)[None, :] * step + offsets[:, axis:axis + 1] < out
            valid = valid & inside.reshape(shape)
        valid = valid.reshape(self.cycle, self.points).astype(np.float32)
        scale = np.sqrt(np.float32(self.locations) / valid.sum(axis=1, keepdims=True))
        self.valid = tf.constant(valid)
        self.weight = tf.constant(valid * scale.astype(np.float32))

    @staticmethod
    def strides(padded, scale=None):
        """The flat index's step per unit along each axis of a `padded` array
        (times `scale[axis]`, the layer's strides, for the input)."""
        steps = [int(np.prod(padded[axis + 1:])) for axis in range(len(padded))]
        return steps if scale is None else [a * b for a, b in zip(steps, scale)]


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
        _undilated_volumes(layer)

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

    def row_norms(self, inputs):
        return _row_norms(self.layer, _channels_last(inputs, self._data_format),
                          self.layer.padding, self.groups, self.bias is not None)


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
