"""Seconds of the first step and milliseconds of later steps on a sweep program.

For each configuration in turn (Adam(1e-3), or `keras_tkfac.wrap` with `TKFAC` or
`KFAC` and keyword arguments), builds `tools/sweep_programs.py`'s program from the
same seed, times its first `train_on_batch` (the trace) and then `--steps` more on
the program's batches of 32, and prints the first step's seconds and the median of
the others. Configurations run one after another, not interleaved: compare ratios
from one run on a quiet machine only.

    python tools/program_steps.py --program=efficientnet_b0 --steps=20 \
        --configs='{"Adam": {}, "TKFAC": {}, "TKFAC graft": {"step_control": "graft"}}'
"""

import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_tkfac  # noqa: E402
from sweep_programs import BATCH, PROGRAMS  # noqa: E402  (tools/, the script's folder)

_PROGRAM = flags.DEFINE_string("program", "efficientnet_b0", "a sweep program's name")
_STEPS = flags.DEFINE_integer("steps", 20, "timed steps after the first")
_CONFIGS = flags.DEFINE_string(
    "configs", '{"Adam": {}, "TKFAC": {}}',
    "JSON: name -> keyword arguments; a name starting with Adam is Adam(1e-3), "
    "otherwise its first word names the keras_tkfac optimizer")


def time_steps(program, name, kwargs, steps):
    """`(first step's seconds, median later step's seconds)` of one configuration."""
    keras.utils.set_random_seed(0)
    model, x, y, compile_args, _ = PROGRAMS[program]()
    if name.startswith("Adam"):
        optimizer = keras.optimizers.Adam(1e-3)
    else:
        model = keras_tkfac.wrap(model)
        optimizer = getattr(keras_tkfac, name.split()[0])(**kwargs)
    model.compile(optimizer=optimizer, **compile_args)
    batches = max(1, len(x) // BATCH)
    started = time.time()
    model.train_on_batch(x[:BATCH], y[:BATCH])
    first = time.time() - started
    times = []
    for i in range(steps):
        start = BATCH * (i % batches)
        started = time.time()
        model.train_on_batch(x[start:start + BATCH], y[start:start + BATCH])
        times.append(time.time() - started)
    return first, float(np.median(times))


def main(argv):
    del argv
    for name, kwargs in json.loads(_CONFIGS.value).items():
        first, median = time_steps(_PROGRAM.value, name, kwargs, _STEPS.value)
        print(f"{name}: first step {first:.1f} s, median step {1e3 * median:.1f} ms",
              flush=True)


if __name__ == "__main__":
    app.run(main)
