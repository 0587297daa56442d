"""TKFAC with `model.fit` on one device, several devices or several workers.

The model and data are the same in every mode; only the strategy changes:

    # one device
    python examples/distributed_fit.py
    # MirroredStrategy over 2 devices (GPUs, or the CPU split into logical devices)
    python examples/distributed_fit.py --devices=2
    # MultiWorkerMirroredStrategy: start one process per worker, same --workers list
    python examples/distributed_fit.py --workers=127.0.0.1:23456,127.0.0.1:23457 \
        --worker_index=0 &
    python examples/distributed_fit.py --workers=127.0.0.1:23456,127.0.0.1:23457 \
        --worker_index=1

`--batch_size` is the global batch, split over all replicas. With `--backup_dir` a
`keras.callbacks.BackupAndRestore` makes training resumable: restart every worker with
the same flags after a failure and training continues from the last epoch, factors,
inverses and momentum included. The data are scikit-learn's digits (offline).
"""

import json
import os
import time

from absl import app
from absl import flags
import numpy as np
from sklearn import datasets as sklearn_datasets

_DEVICES = flags.DEFINE_integer("devices", 1, "Replicas on this machine.", lower_bound=1)
_WORKERS = flags.DEFINE_list("workers", [], "host:port of every worker (multi-worker).")
_WORKER_INDEX = flags.DEFINE_integer("worker_index", 0, "This worker's index.")
_OPTIMIZER = flags.DEFINE_enum("optimizer", "tkfac", ["tkfac", "kfac"], "Optimizer.")
_EPOCHS = flags.DEFINE_integer("epochs", 10, "Epochs.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Global batch size.")
_BACKUP_DIR = flags.DEFINE_string("backup_dir", None, "BackupAndRestore directory.")
_JIT_COMPILE = flags.DEFINE_bool(
    "jit_compile", False,
    "XLA: the whole step on one device, the curvature math under a strategy.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Two epochs on 256 examples.")


def _strategy(tf):
    if _WORKERS.value:
        os.environ["TF_CONFIG"] = json.dumps({
            "cluster": {"worker": _WORKERS.value},
            "task": {"type": "worker", "index": _WORKER_INDEX.value},
        })
        return tf.distribute.MultiWorkerMirroredStrategy()
    if _DEVICES.value == 1:
        return tf.distribute.get_strategy()
    gpus = tf.config.list_physical_devices("GPU")
    if len(gpus) >= _DEVICES.value:
        return tf.distribute.MirroredStrategy(
            [f"/gpu:{i}" for i in range(_DEVICES.value)])
    # No GPUs: split the CPU into logical devices (before TensorFlow initialises).
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * _DEVICES.value)
    return tf.distribute.MirroredStrategy(
        [f"/cpu:{i}" for i in range(_DEVICES.value)])


def main(argv):
    del argv
    import tensorflow as tf
    import keras

    import keras_tkfac

    strategy = _strategy(tf)
    x, y = sklearn_datasets.load_digits(return_X_y=True)
    x, y = (x / 16.0).astype("float32"), y.astype("int32")
    epochs = _EPOCHS.value
    if _SMOKE.value:
        x, y, epochs = x[:256], y[:256], 2
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(_BATCH_SIZE.value)
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras_tkfac.wrap(keras.Sequential([
            keras.Input((64,)),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(10),
        ]))
        optimizer = {"tkfac": keras_tkfac.TKFAC, "kfac": keras_tkfac.KFAC}[
            _OPTIMIZER.value](seed=0)
        model.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
            jit_compile=_JIT_COMPILE.value,
        )
    callbacks = []
    if _BACKUP_DIR.value:
        # Keras's BackupAndRestore writes one file from every worker; the workers'
        # states are identical, so each keeps its own copy.
        callbacks.append(keras.callbacks.BackupAndRestore(
            os.path.join(_BACKUP_DIR.value, f"worker{_WORKER_INDEX.value}")))
    start = time.perf_counter()
    history = model.fit(dataset, epochs=epochs, verbose=0, callbacks=callbacks)
    seconds = time.perf_counter() - start
    print(
        f"replicas={strategy.num_replicas_in_sync} optimizer={_OPTIMIZER.value} "
        f"epochs={epochs} loss={history.history['loss'][-1]:.4f} "
        f"accuracy={history.history['accuracy'][-1]:.3f} seconds={seconds:.1f} "
        f"weights_checksum={sum(float(np.abs(w.numpy()).sum()) for w in model.weights):.6f}"
    )


if __name__ == "__main__":
    app.run(main)
