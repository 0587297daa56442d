"""Seconds of `fit`'s first step (the trace) on the suite's workloads, two ways.

Since 2026-12-01 `keras_tkfac.wrap`'s `fit` builds the model, metrics and optimizer
from the batches' shapes before the first step (`CurvatureModel._build_from_shapes`),
so `tf.function` traces the curvature step once. Keras's own path without a strategy
builds them inside the first trace, which makes `tf.function` trace a second time.
This tool times one `fit` call of one step (a fresh model each time) both ways,
"shapes" and "keras" (the latter by disabling the shape build), and Adam for scale,
alternating them round by round on the same weights and batches; medians over rounds.

    python tools/first_step.py [--workloads=mlp,lstm] [--rounds=3] [--smoke]
"""

import os
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np
import tensorflow as tf
import keras

import benchlib
import keras_tkfac
from keras_tkfac import wrapping
import suite

_ROUNDS = flags.DEFINE_integer("rounds", 3, "Alternated rounds.")
_ORIGINAL_SPEC = wrapping._element_spec  # pylint: disable=protected-access


def _first_step(workload, weights, mode, seed):
    """Seconds of a one-step `fit` of a fresh wrapped model; the number of traces."""
    wrapping._element_spec = (  # pylint: disable=protected-access
        _ORIGINAL_SPEC if mode == "shapes" else (lambda iterator: None))
    try:
        keras.utils.set_random_seed(seed)
        model = workload.build()
        model.set_weights(weights)
        wrapped = keras_tkfac.wrap(model)
        optimizer = (keras.optimizers.Adam(1e-3) if mode == "Adam"
                     else keras_tkfac.TKFAC(seed=seed))
        wrapped.compile(optimizer=optimizer, loss=workload.loss)
        data = benchlib.batches(workload.train, workload.batch_size, seed)
        start = time.perf_counter()
        wrapped.fit(data, epochs=1, steps_per_epoch=1, verbose=0)
        return time.perf_counter() - start, getattr(optimizer, "curvature_updates", 0)
    finally:
        wrapping._element_spec = _ORIGINAL_SPEC  # pylint: disable=protected-access


def main(argv):
    del argv
    tf.get_logger().setLevel("ERROR")
    logging.set_verbosity(logging.ERROR)  # (the fallback's notice, once a model)
    smoke, seed = suite._SMOKE.value, suite._SEED.value  # pylint: disable=protected-access
    names = suite._WORKLOADS.value  # pylint: disable=protected-access
    modes = ["Adam", "keras", "shapes"]
    lines = [
        "`python tools/first_step.py " + " ".join(
            f"--{k}={v}" for k, v in (("workloads", ",".join(names)),
                                      ("rounds", _ROUNDS.value)))
        + (" --smoke" if smoke else "") + "`", "",
        f"Seed {seed}; {_ROUNDS.value} alternated rounds; {os.cpu_count()} CPU cores, "
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}, keras_tkfac "
        f"{benchlib.source_version()}; seconds of a one-step `fit` (mostly tracing), median "
        "over rounds; `keras`: built inside the first trace (two traces), `shapes`: "
        "built from the batch's shapes first (one trace); `traces`: `update_curvature` "
        "calls.", "",
        "| workload | Adam (s) | TKFAC, keras's build (s) | traces | TKFAC, from "
        "shapes (s) | traces | shapes / keras |",
        "|---|---:|---:|---:|---:|---:|---:|"]
    ratios = []
    for name in names:
        workload = getattr(suite, name)(smoke, seed)
        if smoke:
            workload = workload._replace(batch_size=32)
        keras.utils.set_random_seed(seed)
        weights = workload.build().get_weights()
        seconds = {m: [] for m in modes}
        traces = {}
        for _ in range(_ROUNDS.value):
            for mode in modes:
                took, count = _first_step(workload, weights, mode, seed)
                seconds[mode].append(took)
                traces[mode] = count
        median = {m: float(np.median(v)) for m, v in seconds.items()}
        ratios.append(median["shapes"] / median["keras"])
        lines.append(f"| {name} | {median['Adam']:.1f} | {median['keras']:.1f} | "
                     f"{traces['keras']} | {median['shapes']:.1f} | {traces['shapes']} "
                     f"| {ratios[-1]:.2f} |")
    lines += ["", f"Geometric mean of shapes / keras: "
              f"{float(np.exp(np.mean(np.log(ratios)))):.2f}."]
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
