"""Recomputing `BatchNormalization`'s moving statistics from training batches.

In training, `BatchNormalization` normalises with the batch's moments; in inference
(`evaluate`, `predict`, `fit`'s validation) with moving averages that each training
step moves by `1 - momentum` (0.01 at Keras's default) towards the batch's moments.
After a few dozen steps the averages still hold mostly what the layers' inputs were
under the weights of the first steps; the faster the weights move, the further they
are from the current ones. Measured on `tools/program_sweep.py`'s programs with
batch normalisation (`python tools/batch_norm_lag.py`, 2026-12-04: 48 steps of 32,
the last quarter of the examples held out), last validation loss with the moving
averages, and after `recalibrate_batch_norm` on the first 512 training examples (16
batches):

| program | Adam (best of 1e-3, 3e-3, 1e-2) | `TKFAC()` |
|---|---|---|
| `mixed_precision_convnet` | 0.094 -> 0.033 | 0.186 -> 0.023 |
| `conv_lstm` | 0.551 -> 0.160 | 0.582 -> 0.133 |
| `unet_segmentation` | 0.221 -> 0.189 | 0.197 -> 0.138 |
| `squeeze_excitation` | 0.775 -> 0.461 | 0.013 -> 0.004 |
| `nested_augmented` | 0.961 -> 0.729 | 1.044 -> 0.745 |
| `efficientnet_b0` (Adam 1e-3) | 2.485 -> 0.206 | 1.469 -> 0.347 |

so early validation losses of such models say more about the averages than about
the weights, under any optimizer. `recalibrate_batch_norm` sets the averages to the
mean of the batch moments over given training batches (as Keras would reach with
`momentum` ramped as `(k - 1) / k`), without changing any weight;
`BatchNormRecalibration` does it before each evaluation during `fit`. It is not
part of the optimizer's step and not on by default: it changes what Keras's
moving averages hold.
"""

import keras
import numpy as np
import tensorflow as tf

from keras_tkfac import capture


def _layers(model):
    """The trainable `BatchNormalization` layers that update moving averages the
    standard way (`renorm` layers, frozen ones and synchronized ones are left)."""
    inner = getattr(capture.wrapper_of(model), "model", model)
    return [layer for layer in inner._flatten_layers(include_self=False)  # pylint: disable=protected-access
            if isinstance(layer, keras.layers.BatchNormalization)
            and layer.trainable and not getattr(layer, "renorm", False)
            and not getattr(layer, "synchronized", False)], inner


def _inputs_of(batch):
    """`x` of a batch `x` or `(x, y[, sample_weight])`."""
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    return batch


def _batches(data, batch_size):
    if isinstance(data, (tf.data.Dataset, keras.utils.PyDataset)) or (
            hasattr(data, "__iter__") and not isinstance(
                data, (np.ndarray, tf.Tensor, dict, tuple, list))):
        for batch in data:
            yield _inputs_of(batch)
        return
    rows = len(tf.nest.flatten(data)[0])
    for start in range(0, rows, batch_size):
        yield tf.nest.map_structure(lambda a, s=start: a[s:s + batch_size], data)


def _check(**values):
    """`ValueError` unless each value is `None` or a positive integer."""
    for name, value in values.items():
        if value is not None and (isinstance(value, bool) or not isinstance(
                value, (int, np.integer)) or value < 1):
            raise ValueError(f"`{name}` must be a positive integer. "
                             f"Received: {name}={value!r}")


def recalibrate_batch_norm(model, data, steps=None, batch_size=32):
    """Sets each `BatchNormalization` layer's moving mean and variance to the mean of
    its batch moments over training batches.

    The model runs in training mode on each batch (eagerly; dropout and other
    training-mode layers act as in a step) with each layer's `momentum` at
    `(k - 1) / k` for the `k`-th batch, so that after `K` batches the averages are the
    means of the `K` batches' moments; `momentum` is restored after. No weight
    changes. Layers that are frozen (`trainable=False`, which Keras runs in inference
    mode), use `renorm`, or are `synchronized` across replicas are left as they are.

    Args:
        model: a Keras model, or one returned by `keras_tkfac.wrap`.
        data: model inputs (an array, or a dict or tuple of arrays, batched by
            `batch_size`), or a `tf.data.Dataset`, `keras.utils.PyDataset` or other
            iterable of batches `x` or `(x, y[, sample_weight])`.
        steps: use at most this many batches (default: all of `data`).
        batch_size: rows per batch when `data` are arrays.

    Returns:
        The number of batches used.

    Raises:
        ValueError: `steps` or `batch_size` is not a positive integer.
    """
    _check(steps=steps, batch_size=batch_size)
    layers, inner = _layers(model)
    if not layers:
        return 0
    momentums = [layer.momentum for layer in layers]
    count = 0
    try:
        for x in _batches(data, batch_size):
            if steps is not None and count >= steps:
                break
            count += 1
            for layer in layers:
                layer.momentum = (count - 1.0) / count
            inner(x, training=True)
    finally:
        for layer, momentum in zip(layers, momentums):
            layer.momentum = momentum
    return count


class BatchNormRecalibration(keras.callbacks.Callback):
    """Recomputes the moving statistics (`recalibrate_batch_norm`) before each
    evaluation: `fit`'s validation at the end of an epoch, and `evaluate`.

    Args:
        data: training inputs or batches, as `recalibrate_batch_norm` takes them.
        steps: batches used each time (default 8).
        batch_size: rows per batch when `data` are arrays.
    """

    def __init__(self, data, steps=8, batch_size=32):
        super().__init__()
        _check(steps=steps, batch_size=batch_size)
        if steps is None:
            raise ValueError("`steps` must be a positive integer. Received: "
                             "steps=None")
        self.data, self.steps, self.batch_size = data, steps, batch_size

    def on_test_begin(self, logs=None):
        recalibrate_batch_norm(self.model, self.data, self.steps, self.batch_size)
