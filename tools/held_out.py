"""Validation loss of long runs of the sweep's token classifiers: does a step that
fits each training batch also generalise?

`tools/program_sweep.py` reports training losses of short runs. This tool trains a
token classifier of `tools/sweep_programs.py` (`gru_classifier`, `masked_lstm`: 256
training sequences) for `--epochs` epochs of 8 steps with `Adam(1e-3)` and with
`wrap` + `TKFAC()` (plus `--tkfac` keyword arguments), on the same initial weights and
batches, and evaluates each epoch on 512 other sequences of the same generator (seed
1). It prints, per optimizer, the best validation loss, the epoch it came at, the last
validation loss and the last training loss.

    python tools/held_out.py [--programs=gru_classifier] [--epochs=38]
        [--tkfac='{"adaptive_damping": false}'] [--recurrent_blocks]
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402
import numpy as np  # noqa: E402
import keras  # noqa: E402

import keras_tkfac  # noqa: E402
import sweep_programs  # noqa: E402  (tools/, the script's folder)

PROGRAMS = ("gru_classifier", "masked_lstm")

FLAGS = flags.FLAGS


def _define_flags():
    """Defined when run as a script only: importing the module (its test, next to
    `tools/suite.py`'s in one process) must not define absl flags twice."""
    flags.DEFINE_list("programs", list(PROGRAMS), "Token classifiers to run.")
    flags.DEFINE_integer("epochs", 38, "Epochs of 8 steps of 32.")
    flags.DEFINE_string("tkfac", "{}", "TKFAC keyword arguments as JSON.")
    flags.DEFINE_bool("recurrent_blocks", False,
                      "Register the recurrent layers' blocks "
                      "(`keras_tkfac.register_recurrent_blocks()`) before wrapping.")


def run(name, epochs, tkfac_kwargs=None):
    """`{optimizer: (best val loss, its epoch, last val loss, last train loss)}`."""
    if name not in PROGRAMS:
        raise ValueError(f"--programs takes {PROGRAMS}. Received: {name!r}")
    x_val, y_val = sweep_programs._tokens(512, seed=1)  # pylint: disable=protected-access
    results = {}
    for label in ("Adam", "TKFAC"):
        keras.utils.set_random_seed(0)
        model, x, y, compile_kwargs, fit_kwargs = getattr(sweep_programs, name)()
        if label == "Adam":
            optimizer = keras.optimizers.Adam(1e-3)
        else:
            model = keras_tkfac.wrap(model)
            optimizer = keras_tkfac.TKFAC(seed=0, **(tkfac_kwargs or {}))
        model.compile(**dict(compile_kwargs, optimizer=optimizer))
        history = model.fit(
            x, y, batch_size=sweep_programs.BATCH, epochs=epochs, shuffle=False,
            validation_data=(x_val, y_val.astype(y.dtype)), verbose=0,
            **fit_kwargs).history
        val = history["val_loss"]
        results[label] = (float(min(val)), int(np.argmin(val)) + 1, float(val[-1]),
                          float(history["loss"][-1]))
    return results


def main(argv):
    del argv
    if FLAGS.recurrent_blocks:
        keras_tkfac.register_recurrent_blocks()
    print(f"`python tools/held_out.py {' '.join(sys.argv[1:])}`\n")
    print("| program | optimizer | best val loss | at epoch | last val loss | "
          "last train loss |")
    print("|---|---|---:|---:|---:|---:|")
    for name in FLAGS.programs:
        for label, (best, epoch, last, train) in run(
                name, FLAGS.epochs, json.loads(FLAGS.tkfac)).items():
            print(f"| {name} | {label} | {best:.4g} | {epoch} | {last:.4g} | "
                  f"{train:.4g} |")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
