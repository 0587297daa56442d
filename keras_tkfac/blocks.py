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

This module holds the dense-family blocks (`Dense`, `EinsumDense`, `Embedding`) and
the registry; the interface is in `block_base`, the convolutions' blocks in
`conv_blocks`, the normalisation layers' in `norm_blocks` (every registered block is
importable from here).
"""

import weakref

from absl import logging
import tensorflow as tf
import keras

from keras_tkfac.block_base import CurvatureBlock, UnsupportedLayer  # noqa: F401
from keras_tkfac.conv_blocks import (  # noqa: F401
    ConvBlock, ConvTransposeBlock, DepthwiseConvBlock, SeparableConvBlock)
from keras_tkfac.norm_blocks import (  # noqa: F401
    BatchNormalizationBlock, LayerNormalizationBlock)


class DenseBlock(CurvatureBlock):
    """`keras.layers.Dense`; inputs of rank > 2 contribute one row per position."""

    exact_rows = True
    _contracted = 1  # trailing input axes the kernel contracts

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

    def sequence_rows(self, inputs, output_grads):
        """A call on sequences (inputs with axes between the batch and the
        contracted ones) as `([batch, positions, d_in'], [batch, positions,
        d_out])`, for exact per-example statistics
        (`ops.tkfac_statistics_sequences`); `None` for one position per example."""
        rank = inputs.shape.rank
        between = None if rank is None else inputs.shape[1:rank - self._contracted]
        if between is None or len(between) == 0:
            return None
        positions = -1
        if None not in between:
            positions = 1
            for dim in between:
                positions *= int(dim)
        batch = tf.shape(inputs)[0]
        a = tf.reshape(inputs, [batch, positions, self.kernel_rows()])
        g = tf.reshape(output_grads, [batch, positions, self.d_out])
        return self._with_bias(a), g


class EinsumDenseBlock(DenseBlock):
    """`keras.layers.EinsumDense` whose equation is a dense map.

    Supported equations have three kinds of axes, each in exactly two operands:
    the input's axes that the kernel contracts (`C`), the kernel's axes that the
    output gains (`N`), and the axes the input passes to the output (`B`: the batch
    axis first, or a leading `...`, and any others). In any order within each
    operand: `abc,cd->abd`, `abc,cde->abde` (the query/key/value projections of
    `MultiHeadAttention`), `abcd,cde->abe` (its output projection), `abc,cbd->ad`
    (contracted axes in another order in the kernel) and `abc,bd->adc` (a dense map
    over a middle axis, as MLP-Mixer's token mixing). The kernel is then a
    `[d_in, d_out]` matrix over `C` and `N` (in the kernel's order) and every
    combination of the `B` axes is an extra row, as for `Dense` on sequences; the
    rows and the gradients are transposed to that layout where the equation's order
    differs (`_canonical`, `grad_matrix`, `split_matrix`). A bias must cover all of
    `N`. Layers with other equations (an axis in all three operands, as per-head
    weights; an input axis summed away; a bias on part of `N`) take the first-order
    fallback (logged at `wrap`).
    """

    def __init__(self, layer):
        super().__init__(layer)
        equation = layer.equation.replace(" ", "")
        inputs, rest = equation.split(",")
        kernel, output = rest.split("->")
        self._ellipsis = inputs.startswith("...") and output.startswith("...")
        if self._ellipsis:
            inputs, output = inputs[3:], output[3:]
        contracted = "".join(c for c in kernel if c in inputs and c not in output)
        new = "".join(c for c in kernel if c in output and c not in inputs)
        batch = "".join(c for c in inputs if c in output and c not in kernel)
        bias_axes = getattr(layer, "bias_axes", None) or ""
        operands = (inputs, kernel, output)
        if (
            "." in "".join(operands)
            or any(len(set(o)) != len(o) for o in operands)
            or not contracted
            or not new
            or sorted(kernel) != sorted(contracted + new)
            or sorted(inputs) != sorted(batch + contracted)
            or sorted(output) != sorted(batch + new)
            # Without `...` the batch axis leads the input and the output.
            or not self._ellipsis and not (batch and inputs[0] == output[0] == batch[0])
            or (bias_axes and sorted(bias_axes) != sorted(new))
        ):
            raise UnsupportedLayer(
                f"Layer {layer.name!r}: keras_tkfac supports EinsumDense equations "
                "that are a dense map: each axis in exactly two of the input, kernel "
                "and output (such as 'abc,cde->abde' or 'abc,bd->adc'), the batch "
                "axis (or '...') leading the input and the output, and a bias on "
                "all of the kernel's output axes or none. "
                f"Received: equation={layer.equation!r}, "
                f"bias_axes={layer.bias_axes!r}"
            )
        self._contracted = len(contracted)
        self._axes = (batch, contracted, new)
        # (The layer's own kernel: a LoRA block's `kernel` is its `B`.)
        full = layer._kernel if hasattr(layer, "_kernel") else layer.kernel
        dims = dict(zip(kernel, (int(d) for d in full.shape)))
        self._kernel_rows = _product_of(dims[c] for c in contracted)
        self._d_out = _product_of(dims[c] for c in new)
        self._matrix_shape = [dims[c] for c in contracted + new]
        # Permutations to the canonical layout (`None`: already in it).
        self._input_order = _order(inputs, batch + contracted)
        self._output_order = _order(output, batch + new)
        self._kernel_order = _order(kernel, contracted + new)
        self._bias_order = None
        if bias_axes:
            # Keras's bias spans the output's axes from the first bias axis on, with
            # 1 for those without a bias.
            spec = output[min(output.index(c) for c in bias_axes):]
            bias_new = "".join(c for c in spec if c in bias_axes)
            self._bias_dims = [dims[c] for c in bias_new]
            self._bias_order = _order(bias_new, new)

    @property
    def canonical(self):
        """Whether the equation's operands are already in `[rows, d_in]`,
        `[d_in, d_out]` and `[rows, d_out]` order (no transposes)."""
        return all(order is None for order in (
            self._input_order, self._output_order, self._kernel_order,
            self._bias_order))

    @property
    def bias(self):
        return self.layer.bias

    @property
    def d_out(self):
        return self._d_out

    def kernel_rows(self):
        return self._kernel_rows

    def _product(self, inputs):
        return keras.ops.einsum(self.layer.equation, inputs, self.layer.kernel)

    def _canonical(self, inputs, output_grads):
        """`(inputs, output_grads)` transposed to `B + C` and `B + N` order."""
        return (_transpose(inputs, self._input_order),
                _transpose(output_grads, self._output_order))

    def rows(self, inputs, output_grads):
        return super().rows(*self._canonical(inputs, output_grads))

    def sequence_rows(self, inputs, output_grads):
        return super().sequence_rows(*self._canonical(inputs, output_grads))

    def grad_matrix(self, kernel_grad, bias_grad=None):
        if self._kernel_order is not None:
            kernel_grad = tf.transpose(tf.convert_to_tensor(kernel_grad),
                                       self._kernel_order)
        if bias_grad is not None and self._bias_order is not None:
            bias_grad = tf.transpose(tf.reshape(bias_grad, self._bias_dims),
                                     self._bias_order)
        return super().grad_matrix(kernel_grad, bias_grad)

    def split_matrix(self, matrix):
        if self.canonical:
            return super().split_matrix(matrix)
        kernel_update, bias_update = matrix, None
        if self.bias is not None:
            kernel_update, bias_update = tf.split(matrix, [self.kernel_rows(), 1], 0)
        kernel_update = tf.reshape(kernel_update, self._matrix_shape)
        if self._kernel_order is not None:
            kernel_update = tf.transpose(kernel_update, _inverse(self._kernel_order))
        kernel_update = tf.reshape(kernel_update, self.kernel.shape)
        if bias_update is not None:
            if self._bias_order is not None:
                bias_update = tf.transpose(
                    tf.reshape(bias_update, [self._bias_dims[i] for i in self._bias_order]),
                    _inverse(self._bias_order))
            bias_update = tf.reshape(bias_update, self.bias.shape)
        return kernel_update, bias_update


def _product_of(values):
    n = 1
    for value in values:
        n *= int(value)
    return n


def _order(axes, target):
    """The permutation that takes the axes `axes` (a string) to `target`'s order;
    `None` where they are in it."""
    order = [axes.index(c) for c in target]
    return None if order == list(range(len(order))) else order


def _inverse(order):
    inverse = [0] * len(order)
    for i, j in enumerate(order):
        inverse[j] = i
    return inverse


def _transpose(x, order):
    """`x` with its trailing `len(order)` axes permuted (leading `...` axes stay)."""
    if order is None:
        return x
    lead = x.shape.rank - len(order)
    return tf.transpose(x, list(range(lead)) + [lead + i for i in order])


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
# statistics made the statistics steps dearer (docs/RESULTS.md, "Normalisation layers").
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
    `BatchNormalization` (off by default), for models wrapped from then on and for
    wrapped models whose optimizer is not built yet (a built one keeps its blocks;
    logged).

    Example:

    ```python
    keras_tkfac.register_normalization_blocks()
    model = keras_tkfac.wrap(build_model())
    ```
    """
    for layer_class, block_class in NORMALIZATION_BLOCKS.items():
        register_block(layer_class, block_class)


def block_for(layer):
    """The block for `layer` (a layer with LoRA enabled: its `lora_blocks`
    block), or `None` when its class is not registered or its
    block declines the layer's configuration (`accepts`, or `UnsupportedLayer`
    from the block, logged once per layer: the layer takes the first-order
    fallback)."""
    block_class = BLOCKS.get(type(layer))
    if getattr(layer, "lora_enabled", False):
        from keras_tkfac import lora_blocks  # pylint: disable=import-outside-toplevel
        block_class = lora_blocks.LORA_BLOCKS.get(block_class, block_class)
    if block_class is None or not block_class.accepts(layer):
        return None
    try:
        return block_class(layer)
    except UnsupportedLayer as error:
        if layer not in _DECLINED:
            _DECLINED.add(layer)
            reason = str(error).rstrip()
            logging.warning("keras_tkfac: %s%s It takes the first-order fallback.",
                            reason, "" if reason.endswith(".") else ".")
        return None


# The layers whose fallback was logged: each layer once, by identity (by name, a
# second model in a notebook with the same layer names fell back silently).
_DECLINED = weakref.WeakSet()
