"""keras_tkfac: trace-restricted Kronecker-factored natural gradient for Keras 3.

Public API:

- `wrap(model)`: a model whose training step feeds curvature to the optimizer.
- `TKFAC`, `KFAC`: `keras.optimizers.Optimizer` subclasses.
- `record(model)`: context manager for custom training loops.
- `ModelForward(model, x)`: a custom loop's `forward=` for the curvature products
  of the quadratic step controls.
- `register_block(layer_class, block_class)`: precondition a custom layer kind.
- `register_normalization_blocks()`: precondition `LayerNormalization` and
  `BatchNormalization` too (off by default).
- `register_recurrent_blocks()`: precondition `SimpleRNN`, `LSTM` and `GRU` too
  (off by default).
- `CurvatureMonitor`: a callback logging per-layer curvature diagnostics.
- `recalibrate_batch_norm(model, data)`, `BatchNormRecalibration(data)`: recompute
  `BatchNormalization`'s moving statistics from training batches (before an
  evaluation early in training).
"""

from keras_tkfac import versions as _versions

_versions.check()  # Keras's TensorFlow backend, or ImportError; old versions logged.

from keras_tkfac.batch_norm import BatchNormRecalibration, recalibrate_batch_norm  # pylint: disable=wrong-import-position
from keras_tkfac.blocks import register_block
from keras_tkfac.blocks import register_normalization_blocks
from keras_tkfac.capture import record
from keras_tkfac.monitor import CurvatureMonitor
from keras_tkfac.products import ModelForward
from keras_tkfac.approximations import KFAC, TKFAC
from keras_tkfac.recurrent import register_recurrent_blocks
from keras_tkfac.wrapping import CurvatureModel, wrap

__version__ = "0.1.0"

__all__ = [
    "BatchNormRecalibration",
    "CurvatureModel",
    "CurvatureMonitor",
    "KFAC",
    "ModelForward",
    "TKFAC",
    "recalibrate_batch_norm",
    "record",
    "register_block",
    "register_normalization_blocks",
    "register_recurrent_blocks",
    "wrap",
]
