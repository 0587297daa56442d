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
        self._axes = (batch, contracted, new)
        self._ellipsis = equation.split(",")[0].startswith("...")

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
