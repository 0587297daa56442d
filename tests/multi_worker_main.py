"""One worker of the MultiWorkerMirroredStrategy tests (run as a subprocess).

Usage: TF_CONFIG=... python multi_worker_main.py OUT.npz BACKUP_DIR [FAIL_AT_STEP]

Trains the shared tiny problem for three epochs with TKFAC under
MultiWorkerMirroredStrategy and `BackupAndRestore`, then writes the weights and the
optimizer variables to OUT.workerI.npz and the number of steps this run took to
OUT.workerI.steps. With FAIL_AT_STEP, worker 1 kills its own process abruptly after
that many steps of the run (fault injection).
"""

import json
import os
import sys

import numpy as np
import tensorflow as tf
import keras

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests import multi_worker_problem as problem  # noqa: E402


class _Steps(keras.callbacks.Callback):
    """Counts the steps of this run; with `crash_at`, exits abruptly there."""

    def __init__(self, crash_at=None):
        super().__init__()
        self.crash_at = crash_at
        self.seen = 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.crash_at:
            os._exit(17)


def main(out, backup_dir, fail_at=None):
    index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():
        model = problem.model()
    steps = _Steps(fail_at if index == 1 else None)
    callbacks = [
        # Keras's BackupAndRestore writes the same file from every worker: give
        # each worker its own directory (their states are identical).
        keras.callbacks.BackupAndRestore(os.path.join(backup_dir, f"worker{index}")),
        steps,
    ]
    model.fit(problem.dataset(), epochs=problem.EPOCHS, verbose=0, callbacks=callbacks)
    arrays = [v.numpy() for v in model.weights + model.optimizer.variables]
    np.savez(f"{out}.worker{index}.npz", *arrays)
    with open(f"{out}.worker{index}.steps", "w") as f:
        f.write(str(steps.seen))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else None)
