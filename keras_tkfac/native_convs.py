"""Convolutions that Keras runs through XLA on every device, with TensorFlow's own ops.

Keras's TensorFlow backend computes a grouped convolution (input channels differ
from the kernel's) and a `channels_first` 3-D one in a nested function compiled
with XLA (`keras.src.backend.tensorflow.nn.conv`: "broken on CPU without XLA"), on
every device. On a CPU that function is slow, and for the curvature products it is
opaque: forward mode cannot follow the kernel read inside it (`tangents.HiddenReads`,
so the layer took the sibling step), and the tangents of the layers before it pass
through the call by TensorFlow's function-call rule, several forward passes' worth.
Measured on 2 CPU cores (TF 2.21, `tools/grouped_convs.py`: a convolution and its
kernel gradient, batch 32; docs/RESULTS.md, "Grouped convolutions without XLA"):
7x7 with one channel a group (ConvNeXt's), 8x8x64: XLA 45.5 ms, one depthwise
convolution 1.65 ms; 3x3, 16x16x128 in 32 groups: XLA 2434 ms, one convolution per
group 13.6 ms. ConvNeXtTiny's default `TKFAC()` step (32x32 inputs, batch 8) took
3.3 s against Adam's 0.46 s, most of it in those calls; now 0.50 s.

`convolution` computes the same convolution with TensorFlow's native ops:
- one input channel a group (`groups == channels`; 1-D and 2-D, `channels_last`,
  equal strides, not both strided and dilated): `tf.nn.depthwise_conv2d`, the
  kernel `[k..., 1, filters]` read as `[k..., channels, filters / channels]`
  (output `c * m + j` is channel `c`'s `j`-th filter in both);
- otherwise one `tf.nn.convolution` per group on its channels, concatenated (group
  `j` takes input channels `j * c/G ...` and filters `j * f/G ...`, as Keras's);
- `channels_first` 3-D: the same on the input moved to `channels_last`.
The results equal Keras's up to float rounding (`tests/test_native_convs.py`).

`install(layer)` makes a wrapped Keras convolution layer compute this way in every
call (training, the products' pass, `predict`) where Keras would take the XLA
function and the layer's class keeps Keras's `call`; `ConvBlock.preactivation`
(what the training step computes) calls `convolution` directly.
"""

import keras
import tensorflow as tf

# Whether `install` and `convolution` take TensorFlow's own ops (a switch for
# measurements and tests: off, wrapped layers compute as Keras does).
ENABLED = True


def needs_xla(inputs_shape, kernel_shape, data_format):
    """Whether Keras's TensorFlow backend runs this convolution in its nested XLA
    function: grouped (the input's channels differ from the kernel's), or a
    `channels_first` 3-D one."""
    rank = len(kernel_shape) - 2
    channels = inputs_shape[-1] if data_format == "channels_last" else inputs_shape[1]
    return ((data_format == "channels_first" and rank == 3)
            or channels != kernel_shape[-2])


def _channels_last(x, rank):
    return tf.transpose(x, [0, *range(2, rank + 2), 1])


def _channels_first(x, rank):
    return tf.transpose(x, [0, rank + 1, *range(1, rank + 1)])


def _depthwise(inputs, kernel, strides, padding, dilation_rate):
    """One input channel a group, `channels_last`, 1-D or 2-D."""
    rank = len(kernel.shape) - 2
    channels = inputs.shape[-1]
    kernel = tf.reshape(kernel, [*kernel.shape[:-2], channels,
                                 kernel.shape[-1] // channels])
    if rank == 1:
        inputs, kernel = inputs[:, None], kernel[None]
        strides, dilation_rate = (1, *strides), (1, *dilation_rate)
    outputs = tf.nn.depthwise_conv2d(
        inputs, kernel, [1, *strides, 1], padding.upper(), dilations=dilation_rate)
    return outputs[:, 0] if rank == 1 else outputs


def _per_group(inputs, kernel, groups, strides, padding, dilation_rate):
    """One convolution per group, `channels_last`."""
    parts = zip(tf.split(inputs, groups, axis=-1), tf.split(kernel, groups, axis=-1))
    # (The layout named: eagerly, TensorFlow's `Conv3D` gradient reads it.)
    layout = {1: "NWC", 2: "NHWC", 3: "NDHWC"}[len(kernel.shape) - 2]
    return tf.concat([
        tf.nn.convolution(x, k, strides=strides, padding=padding.upper(),
                          dilations=dilation_rate, data_format=layout)
        for x, k in parts], axis=-1)


def _depthwise_fits(rank, groups, channels, strides, dilation_rate):
    return (groups == channels and rank in (1, 2) and len(set(strides)) == 1
            and (strides[0] == 1 or set(dilation_rate) == {1}))


def convolution(inputs, kernel, strides, padding, dilation_rate, data_format):
    """`keras.ops.conv(inputs, kernel, ...)` (`padding` `"same"` or `"valid"`) with
    TensorFlow's native ops (module docstring); for a convolution Keras does not
    run through XLA, `keras.ops.conv` itself."""
    rank = len(kernel.shape) - 2
    strides, dilation_rate = _tuple(strides, rank), _tuple(dilation_rate, rank)
    if not ENABLED or not needs_xla(inputs.shape, kernel.shape, data_format):
        return keras.ops.conv(inputs, kernel, strides=list(strides), padding=padding,
                              dilation_rate=dilation_rate, data_format=data_format)
    first = data_format == "channels_first"
    x = _channels_last(inputs, rank) if first else inputs
    groups = x.shape[-1] // kernel.shape[-2]
    if _depthwise_fits(rank, groups, x.shape[-1], strides, dilation_rate):
        outputs = _depthwise(x, kernel, strides, padding, dilation_rate)
    else:
        outputs = _per_group(x, kernel, groups, strides, padding, dilation_rate)
    return _channels_first(outputs, rank) if first else outputs


def _tuple(value, rank):
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * rank


_BASE = keras.layers.Conv2D.__mro__[1]  # Keras's BaseConv
_KERAS_CALLS = (_BASE.call, keras.layers.Conv1D.call)


def install(layer):
    """Gives `layer`, a Keras `Conv1D`/`Conv2D`/`Conv3D` that Keras would run
    through XLA, a `call` that computes as Keras's does but with `convolution`.
    Not where the layer's class has its own `call` or `convolution_op`, or the
    layer already has a `call` of its own (installed by someone else: it is not
    replaced). Returns whether the layer computes natively. Idempotent."""
    if installed(layer):
        return True
    if (not ENABLED or not isinstance(layer, _BASE) or "call" in vars(layer)
            or type(layer).call not in _KERAS_CALLS
            or type(layer).convolution_op is not _BASE.convolution_op
            or not (getattr(layer, "groups", 1) > 1
                    or (layer.rank == 3 and layer.data_format == "channels_first"))):
        return False

    def call(inputs):
        # Keras's `BaseConv.call` and `Conv1D.call` (causal padding), with
        # `convolution` for `ops.conv`.
        padding = layer.padding
        if padding == "causal":
            inputs = keras.ops.pad(inputs, layer._compute_causal_padding())  # pylint: disable=protected-access
            padding = "valid"
        outputs = convolution(inputs, layer.kernel, layer.strides, padding,
                              layer.dilation_rate, layer.data_format)
        if layer.use_bias:
            if layer.data_format == "channels_last":
                shape = (1,) * (layer.rank + 1) + (layer.filters,)
            else:
                shape = (1, layer.filters) + (1,) * layer.rank
            outputs = keras.ops.add(outputs, keras.ops.reshape(layer.bias, shape))
        return outputs if layer.activation is None else layer.activation(outputs)

    object.__setattr__(layer, "call", call)
    object.__setattr__(layer, "_keras_tkfac_native_conv", True)
    return True


def installed(layer):
    """Whether `install` gave `layer` the native `call`."""
    return bool(getattr(layer, "_keras_tkfac_native_conv", False))
