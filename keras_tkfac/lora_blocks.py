"""Curvature blocks of LoRA adapters (`layer.enable_lora(rank)` on `Dense`,
`EinsumDense`, `Embedding` and the convolutions `Conv1D`/`Conv2D`/`Conv3D`).

With LoRA enabled, Keras freezes the layer's kernel `W_0` and trains two factors:
the layer computes with `W = W_0 + s A B`, `A` of shape `kernel.shape[:-1] + (r,)`,
`B` of shape `(r, kernel.shape[-1])`, `s = lora_alpha / r` (Keras's `kernel`
property). An example's gradient of `B` is `sum_rows z_r g_r^T` with
`z = s (a A)`, the layer's input projected by `A` (for `EinsumDense`, contracted as
the kernel's input axes are), and `g` the output gradient; the bias's is
`sum_rows g_r`. So `B` and the bias are exactly a dense layer with input rows
`[z, 1]` and output gradients `g`: the block is the dense layer's, on the projected
rows, with factors of `(r + 1)` and `d_out` dimensions. `A` keeps the first-order
partner (Adam by default).

Why `B` and not `A`: the engine gives a layer one Kronecker block, and `A`'s
gradient `s a (g B^T)` is Kronecker-structured as well (factors of `d_in` and `r`
dimensions). `python tools/lora_fine_tuning.py` (a pretrained MLP, rank-4 adapters,
5 epochs, best validation loss; docs/lora_fine_tuning.md) measured `B`'s block at
0.087 and `A`'s at 0.095 on digits classification, 0.42 and 1.11 on a regression
(the best of Adam at 1e-3 ... 3e-2: 0.265 and 0.51; every adapter weight on the
partner, as before this block: 1.80 and 3.1, exactly `Adam(1e-3)`). `B` also covers
the bias and starts at zero, so its gradient is the one that is not zero on the
first steps.

An `EinsumDense` whose kernel has more than one output axis (`MultiHeadAttention`'s
query, key and value projections, `abc,cde->abde`) applies `B` at each head: its
rows are then (position, head) pairs, and its bias (`[heads, head_dim]`, not
shared across heads as `B` is) is left to the partner.
"""

import tensorflow as tf
import keras

from keras_tkfac.block_base import UnsupportedLayer, _add_channel_bias
from keras_tkfac.blocks import DenseBlock, EinsumDenseBlock, EmbeddingBlock
from keras_tkfac.conv_blocks import ConvBlock, _channels_last


class _LoRA:
    """The LoRA part shared by the LoRA blocks (mixed in before the layer's own
    block class)."""

    covers_lora = True
    _factors = ("lora_kernel_a", "lora_kernel_b")  # the layer's `A`, `B`

    @property
    def kernel(self):
        return getattr(self.layer, self._factors[1])

    @property
    def d_out(self):
        return int(self.kernel.shape[-1])

    def kernel_rows(self):
        return int(self.kernel.shape[0])

    def _projected(self, inputs):
        """`s (a A)`: the inputs of `B`, `[..., r]` (float32, as `A` is)."""
        # (Older Keras, 3.5 among them, has no `lora_alpha`: its adapters add `A B`
        # unscaled.)
        rank = self.layer.lora_rank
        scale = getattr(self.layer, "lora_alpha", rank) / rank
        kernel_a = getattr(self.layer, self._factors[0])
        return scale * self._project(inputs, kernel_a)

    def rows(self, inputs, output_grads):
        return super().rows(self._projected(inputs), output_grads)


class _LoRASequences(_LoRA):
    """A dense-family layer's calls on sequences (`DenseBlock.sequence_rows`)."""

    def sequence_rows(self, inputs, output_grads):
        return super().sequence_rows(self._projected(inputs), output_grads)


class LoRADenseBlock(_LoRASequences, DenseBlock):
    """`keras.layers.Dense` with LoRA enabled: `B` and the bias (module docstring)."""

    def _project(self, inputs, kernel_a):
        return keras.ops.matmul(tf.cast(inputs, kernel_a.dtype), kernel_a)


class LoRAEinsumDenseBlock(_LoRA, EinsumDenseBlock):
    """`keras.layers.EinsumDense` with LoRA enabled: `B`, and the bias where the
    kernel has one output axis (module docstring)."""

    def __init__(self, layer):
        super().__init__(layer)
        if not self.canonical:
            raise UnsupportedLayer(
                f"Layer {layer.name!r}: keras_tkfac covers a LoRA-enabled EinsumDense "
                "whose input, kernel and output axes are in `batch + contracted`, "
                "`contracted + new` and `batch + new` order (such as 'abc,cde->abde'). "
                f"Received: equation={layer.equation!r}")
        batch, contracted, new = self._axes
        # `A`'s axes: the contracted ones, the output axes but the last, and `r`
        # (a letter the equation does not use).
        rank = next(c for c in "zyxwvutsrqponmlkjihgfedcba"
                    if c not in batch + contracted + new)
        ellipsis = "..." if self._ellipsis else ""
        self._projection = (f"{ellipsis}{batch}{contracted},{contracted}{new[:-1]}{rank}"
                            f"->{ellipsis}{batch}{new[:-1]}{rank}")
        self._contracted = 1  # (the rows' trailing axis is `r`)
        self._heads = len(new) - 1

    @property
    def bias(self):
        return self.layer.bias if self._heads == 0 else None

    def preactivation(self, inputs):
        # The layer's bias is added also where the partner trains it.
        return _add_channel_bias(self._product(inputs), self.layer.bias, "channels_last")

    def _project(self, inputs, kernel_a):
        return keras.ops.einsum(self._projection, tf.cast(inputs, kernel_a.dtype),
                                kernel_a)

    def rows(self, inputs, output_grads):
        a = tf.reshape(self._projected(inputs), [-1, self.kernel_rows()])
        g = tf.reshape(output_grads, [-1, self.d_out])
        return self._with_bias(a), g

    def sequence_rows(self, inputs, output_grads):
        # (Heads are positions: `_projected` keeps them before `r`, the output
        # gradient before its last axis.)
        projected = self._projected(inputs)
        rank = projected.shape.rank
        between = None if rank is None else projected.shape[1:rank - 1]
        if between is None or len(between) == 0:
            return None
        batch = tf.shape(projected)[0]
        a = tf.reshape(projected, [batch, -1, self.kernel_rows()])
        g = tf.reshape(output_grads, [batch, -1, self.d_out])
        return self._with_bias(a), g


class LoRAEmbeddingBlock(_LoRASequences, DenseBlock):
    """`keras.layers.Embedding` with LoRA enabled: `B` (`[r, dim]`), whose input
    rows are the looked-up rows of `A` (`s A[id]`); an embedding has no bias. On
    sequences of ids, a position is a row, or with `sequence_statistics="exact"`
    each sequence's gradient counts whole, as for a `Dense` on sequences."""

    _factors = ("lora_embeddings_a", "lora_embeddings_b")
    regularizers = ("embeddings_regularizer",)

    @property
    def bias(self):
        return None

    def preactivation(self, inputs):
        return tf.gather(self.layer.embeddings, tf.cast(inputs, tf.int32))

    def _project(self, inputs, kernel_a):
        return tf.gather(kernel_a, tf.cast(inputs, tf.int32))


class LoRAConvBlock(_LoRA, ConvBlock):
    """`Conv1D`/`Conv2D`/`Conv3D` with LoRA enabled: `B` (`[r, filters]`) and the
    bias, whose input rows are the convolution of the layer's input with `A`
    (`[*kernel_size, c_in, r]`, the layer's strides, padding and dilation) at each
    output location: `s` times the patches times `A`, without the patches. Every
    location is a row (`conv_location_stride` does not apply). Grouped
    convolutions with LoRA take the partner."""

    def __init__(self, layer):
        super().__init__(layer)
        if self.groups > 1:
            raise UnsupportedLayer(
                f"Layer {layer.name!r} has LoRA enabled on a grouped convolution, "
                f"which keras_tkfac does not precondition. Received: "
                f"groups={layer.groups}")

    def _project(self, inputs, kernel_a):
        inputs, padding = self._causal_padding(inputs, self._data_format)
        projected = keras.ops.conv(
            tf.cast(inputs, kernel_a.dtype), kernel_a,
            strides=list(self.layer.strides), padding=padding,
            dilation_rate=self.layer.dilation_rate, data_format=self._data_format)
        return _channels_last(projected, self._data_format)

    def rows(self, inputs, output_grads):
        a = tf.reshape(self._projected(inputs), [-1, self.kernel_rows()])
        g = tf.reshape(_channels_last(output_grads, self._data_format),
                       [-1, self.d_out])
        return self._with_bias(a), g

    def row_norms(self, inputs):
        return None  # (the statistics square the projected rows)

    def sampled_rows(self, inputs, output_grads, stride, phase=0):
        del stride, phase
        return self.rows(inputs, output_grads)


# The LoRA block of each block class that has one (`blocks.block_for`).
LORA_BLOCKS = {
    DenseBlock: LoRADenseBlock,
    EinsumDenseBlock: LoRAEinsumDenseBlock,
    EmbeddingBlock: LoRAEmbeddingBlock,
    ConvBlock: LoRAConvBlock,
}
