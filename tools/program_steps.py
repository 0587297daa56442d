"""Seconds of the first step and milliseconds of later steps on a sweep program.

For each configuration in turn (Adam(1e-3), or `keras_tkfac.wrap` with `TKFAC` or
`KFAC` and keyword arguments), builds `tools/sweep_programs.py`'s program from the
same seed, times its first `train_on_batch` (the trace) and then `--steps` more on
the program's batches of 32, and prints the first step's seconds and the median of
the others. Configurations run one after another, not interleaved: compare ratios
from one run on a quiet machine only.

    python tools/program_steps.py --program=efficientnet_b0 --steps=20 \
        --configs='{"Adam": {}, "TKFAC": {}, "TKFAC graft": {"step_control": "graft"}}'

With `--rounds=N`, each configuration runs in a fresh process of its own (TensorFlow
caches the functions of its forward mode per process, so a second trace in one
process is cheaper than a user's first), configurations alternated round by round;
it prints every round and the medians. The key `"inline_jvps"` in a configuration's
arguments sets `keras_tkfac.products.INLINE_JVPS` (the products' inline tangents,
`keras_tkfac.jvp_rules`) instead of passing an argument, and `"reuse"` sets
`keras_tkfac.reuse.ENABLED` (the products' pass taking the step's own outputs):

    python tools/program_steps.py --program=mobilenet_v2 --steps=10 --rounds=2 \
        --configs='{"Adam": {}, "TKFAC": {}, "TKFAC dispatch": {"inline_jvps": false}}'
"""

import json
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_tkfac  # noqa: E402
from keras_tkfac import products  # noqa: E402
from keras_tkfac import reuse  # noqa: E402
from sweep_programs import BATCH, PROGRAMS  # noqa: E402  (tools/, the script's folder)

_PROGRAM = flags.DEFINE_string("program", "efficientnet_b0", "a sweep program's name")
_STEPS = flags.DEFINE_integer("steps", 20, "timed steps after the first")
_CONFIGS = flags.DEFINE_string(
    "configs", '{"Adam": {}, "TKFAC": {}}',
    "JSON: name -> keyword arguments; a name starting with Adam is Adam(1e-3), "
    "otherwise its first word names the keras_tkfac optimizer")
_ROUNDS = flags.DEFINE_integer(
    "rounds", 0, "with N > 0, N alternated rounds, each configuration in a fresh "
    "process")


def time_steps(program, name, kwargs, steps):
    """`(first step's seconds, median later step's seconds)` of one configuration."""
    kwargs = dict(kwargs)
    products.INLINE_JVPS = bool(kwargs.pop("inline_jvps", True))
    reuse.ENABLED = bool(kwargs.pop("reuse", True))
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


def fresh_processes(configs, rounds):
    """Every configuration in a process of its own, `rounds` times, alternated."""
    results = {name: [] for name in configs}
    for round_ in range(rounds):
        for name, kwargs in configs.items():
            output = subprocess.run(
                [sys.executable, __file__, f"--program={_PROGRAM.value}",
                 f"--steps={_STEPS.value}", "--configs=" + json.dumps({name: kwargs})],
                check=True, capture_output=True, text=True).stdout
            line = [l for l in output.splitlines() if l.startswith(name + ":")][-1]
            first = float(line.split("first step ")[1].split(" s")[0])
            median = float(line.split("median step ")[1].split(" ms")[0])
            results[name].append((first, median))
            print(f"round {round_ + 1}: {line}", flush=True)
    for name, values in results.items():
        first, median = np.median(np.array(values), axis=0)
        print(f"median of {rounds}, {name}: first step {first:.1f} s, "
              f"median step {median:.1f} ms", flush=True)


def main(argv):
    del argv
    if _ROUNDS.value > 0:
        fresh_processes(json.loads(_CONFIGS.value), _ROUNDS.value)
        return
    for name, kwargs in json.loads(_CONFIGS.value).items():
        first, median = time_steps(_PROGRAM.value, name, kwargs, _STEPS.value)
        print(f"{name}: first step {first:.1f} s, median step {1e3 * median:.1f} ms",
              flush=True)


if __name__ == "__main__":
    app.run(main)
