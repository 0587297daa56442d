"""Held-out losses of the sweep's programs with batch normalisation, with Keras's
moving averages and after `keras_tkfac.recalibrate_batch_norm`.

Each program of `tools/sweep_programs.py` trains as `tools/program_sweep.py
--validation_split=0.25 --steps=48` trains it (the last quarter of the examples held
out; 48 steps of 32 on the rest), once with `Adam` at the given rate and once with
`wrap` + `TKFAC()`, from the same initial weights. Printed per optimizer: the last
epoch's validation loss with the moving averages, the same after recomputing them
from the first 512 training examples in batches of 32, and the last training loss.

    python tools/batch_norm_lag.py [--programs=conv_lstm,unet_segmentation]
        [--adam_rates=1e-2,1e-2]
"""

import math
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_tkfac  # noqa: E402
import sweep_programs  # noqa: E402  (tools/, the script's folder)

# The programs with trainable batch normalisation, and the best Adam rate of each
# in `docs/program_sweep_validation_ceiling3/`.
PROGRAMS = {"mixed_precision_convnet": 1e-2, "conv_lstm": 1e-2,
            "unet_segmentation": 1e-2, "squeeze_excitation": 1e-2,
            "nested_augmented": 1e-2, "efficientnet_b0": 1e-3}

FLAGS = flags.FLAGS


def _define_flags():
    flags.DEFINE_list("programs", list(PROGRAMS), "Programs of sweep_programs.py.")
    flags.DEFINE_list("adam_rates", None, "Adam's learning rate per program "
                      "(default: the best rate of the held-out sweep).")


def run(name, adam_rate, steps=48, split=0.25):
    """`{optimizer: (validation loss, recalibrated validation loss, training loss)}`
    of the last epoch."""
    results = {}
    for label in ("Adam", "TKFAC"):
        keras.utils.set_random_seed(0)
        model, x, y, compile_kwargs, fit_kwargs = sweep_programs.PROGRAMS[name]()
        try:
            if label == "TKFAC":
                model, optimizer = keras_tkfac.wrap(model), keras_tkfac.TKFAC()
            else:
                optimizer = keras.optimizers.Adam(adam_rate)
            model.compile(optimizer=optimizer, **compile_kwargs)
            rows = len(tf.nest.flatten(x)[0])
            train = rows - int(rows * split)
            part = lambda data, s: tf.nest.map_structure(lambda a: a[s], data)  # noqa: E731
            x_train, y_train = part(x, slice(0, train)), part(y, slice(0, train))
            held = (part(x, slice(train, None)), part(y, slice(train, None)))
            epochs = max(1, math.ceil(steps / math.ceil(train / sweep_programs.BATCH)))
            history = model.fit(x_train, y_train, batch_size=sweep_programs.BATCH,
                                epochs=epochs, verbose=0, shuffle=False,
                                validation_data=held, **fit_kwargs)
            keras_tkfac.recalibrate_batch_norm(
                model, part(x_train, slice(0, 512)), batch_size=sweep_programs.BATCH)
            recalibrated = model.evaluate(*held, batch_size=sweep_programs.BATCH,
                                          verbose=0, return_dict=True)["loss"]
            results[label] = (history.history["val_loss"][-1], recalibrated,
                              history.history["loss"][-1])
        finally:
            keras.mixed_precision.set_global_policy("float32")
    return results


def main(argv):
    del argv
    rates = FLAGS.adam_rates or [PROGRAMS.get(n, 1e-3) for n in FLAGS.programs]
    if len(rates) != len(FLAGS.programs):
        raise ValueError("--adam_rates needs one rate per program. Received: "
                         f"{FLAGS.adam_rates!r} for {FLAGS.programs!r}")
    print("| program | Adam: moving → recalibrated (train) | TKFAC(): moving → "
          "recalibrated (train) |\n|---|---|---|")
    for name, rate in zip(FLAGS.programs, rates):
        got = run(name, float(rate))
        cells = [f"{m:.4g} → {r:.4g} ({t:.4g})" for m, r, t in (got["Adam"],
                                                                 got["TKFAC"])]
        print(f"| {name} (Adam {float(rate):g}) | {cells[0]} | {cells[1]} |", flush=True)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
