"""`CurvatureMonitor`: per-layer curvature diagnostics for History and TensorBoard."""

import numpy as np
import tensorflow as tf
import keras

from keras_tkfac import damping as damping_lib
from keras_tkfac import row_sparse


def _condition_number(matrix):
    """The condition number; of a `[G, d, d]` batch, the worst group's."""
    matrix = matrix.astype(np.float64)
    if matrix.ndim == 1:
        return float(np.max(np.abs(matrix)) / np.min(np.abs(matrix)))
    return float(np.max(np.linalg.cond(matrix)))


def _report_keys(blocks):
    """Each block's key in the report: its layer's name, or its layer's path where
    layers of nested models share a name (two encoders with a layer `"proj"`),
    which would otherwise report one of them under the other's key."""
    names = [block.name for block in blocks]
    keys = [getattr(block.layer, "path", None) or block.name
            if names.count(block.name) > 1 else block.name for block in blocks]
    return [key if keys.count(key) == 1 else f"{key}_{i}" for i, key in enumerate(keys)]


def record_update(optimizer, used, scale):
    """Keeps this step's scale and each layer's applied-to-raw norm ratio in
    `optimizer._last_update` (`curvature_report`'s `kl_clip_scale` and
    `update_ratio`); a step that is not finite keeps the previous values.

    Args:
        optimizer: the `CurvatureOptimizer`.
        used: its `(slot, indices, G_l, U_l)` of the preconditioned layers.
        scale: the factor every `U_l` is applied with.
    """
    ratios = [tf.constant(0.0)] * len(optimizer._slots)
    for slot, _, grad, update in used:
        ratio = tf.math.divide_no_nan(row_sparse.norm(update), row_sparse.norm(grad))
        ratios[optimizer._slots.index(slot)] = scale * ratio
    last = tf.stack([scale] + ratios)
    if optimizer._step_is_finite is not None:
        last = tf.where(optimizer._step_is_finite, last, optimizer._last_update)
    optimizer._last_update.assign(last)


def curvature_report(optimizer):
    """`optimizer.curvature_report()`: per-layer diagnostics of a built
    `CurvatureOptimizer`, computed eagerly from its current state."""
    if not optimizer.built:
        return {}
    keys = _report_keys([slot.block for slot in optimizer._slots])
    damping = damping_lib.current(optimizer)
    last = optimizer._last_update.numpy()
    report = {"kl_clip_scale": float(last[0])}
    for i, slot in enumerate(optimizer._slots):
        weight = optimizer._factor_weight[i]
        factors = [tf.math.divide_no_nan(f.value, weight) for f in slot.factors]
        left, right = optimizer._damped_factors(slot.block, factors, damping)
        conds = [_condition_number(m.numpy()) for m in (left, right)]
        report[keys[i]] = {
            "trace": float(optimizer._trace(factors)),
            "damping": float(tf.reduce_mean(
                optimizer._layer_damping(slot.block, factors, damping))),
            "cond_left": float(conds[0]),
            "cond_right": float(conds[1]),
            "update_ratio": float(last[i + 1]),
        }
    return report


class CurvatureMonitor(keras.callbacks.Callback):
    """Logs the curvature state of a `TKFAC`/`KFAC` optimizer every `freq` steps.

    For each preconditioned layer: the trace of its Fisher approximation (`delta` for
    TKFAC), the effective damping, the condition numbers of the two damped factors and
    the norm ratio of the applied (preconditioned, clipped) to the raw gradient; plus
    the KL-clipping factor and the counts of skipped steps, skipped statistics and
    failed inverses. Values go to the History (`history.history["curvature/..."]`,
    one entry per epoch: the last measurement) and, with `log_dir`, to TensorBoard
    (one point per measurement). A measurement costs one eigen-solve per factor on
    the host, so keep `freq` in the tens or hundreds for large layers.

    Args:
        freq: measure every this many training steps. Defaults to `100`.
        log_dir: TensorBoard directory, or `None`; writing it needs the
            `tensorboard` package (not part of `tensorflow-cpu`). Defaults to `None`.
    """

    def __init__(self, freq=100, log_dir=None):
        super().__init__()
        if isinstance(freq, bool) or not isinstance(freq, int) or freq < 1:
            raise ValueError(f"`freq` must be an integer >= 1. Received: freq={freq!r}")
        self.freq = freq
        self.log_dir = log_dir
        self._writer = None
        self._latest = {}

    def _optimizer(self):
        optimizer = self.model.optimizer
        optimizer = getattr(optimizer, "inner_optimizer", optimizer)
        if not hasattr(optimizer, "curvature_report"):
            raise ValueError(
                "CurvatureMonitor needs a keras_tkfac TKFAC or KFAC optimizer. "
                f"Received: optimizer={optimizer!r}"
            )
        return optimizer

    def on_train_begin(self, logs=None):
        self._optimizer()
        if self.log_dir and self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)

    def on_train_batch_end(self, batch, logs=None):
        optimizer = self._optimizer()
        step = int(optimizer.iterations.numpy())
        if (step - 1) % self.freq:
            return
        values = {
            "curvature/skipped_steps": float(optimizer.skipped_steps.numpy()),
            "curvature/skipped_statistics": float(optimizer.skipped_statistics.numpy()),
            "curvature/inverse_failures": float(optimizer.inverse_failures.numpy()),
        }
        for name, entry in optimizer.curvature_report().items():
            if isinstance(entry, dict):
                values.update({f"curvature/{name}/{k}": v for k, v in entry.items()})
            else:
                values[f"curvature/{name}"] = entry
        self._latest = values
        if self._writer is not None:
            with self._writer.as_default(step=step):
                for key, value in values.items():
                    tf.summary.scalar(key, value)
            self._writer.flush()

    def on_epoch_end(self, epoch, logs=None):
        # Keras's History runs after user callbacks and records this same dict.
        if logs is not None:
            logs.update(self._latest)

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None
