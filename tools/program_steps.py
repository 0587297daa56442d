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

With `--interleave`, every configuration is built in one process and their steps
are timed interleaved, one step each in turn: for a switch read while tracing,
the fairest comparison of later steps on a machine whose speed drifts (a second
trace in one process reuses TensorFlow's caches, so the first steps are not
comparable there):

    python tools/program_steps.py --program=mobilenet_v2 --steps=40 --interleave \
        --configs='{"TKFAC dispatch": {"inline_jvps": false}, "TKFAC": {}, "Adam": {}}'
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
_INTERLEAVE = flags.DEFINE_bool(
    "interleave", False, "build every configuration in this process and time "
    "their steps interleaved (for switches read while tracing: steps of one "
    "process compared side by side, without the spread between processes)")
_ROUNDS = flags.DEFINE_integer(
    "rounds", 0, "with N > 0, N alternated rounds, each configuration in a fresh "
    "process")


def _switches(kwargs):
    """Sets the module switches a configuration names (read while its step is
    traced) and returns its optimizer's keyword arguments without them."""
    kwargs = dict(kwargs)
    products.INLINE_JVPS = bool(kwargs.pop("inline_jvps", True))
    reuse.ENABLED = bool(kwargs.pop("reuse", True))
    return kwargs


def build(program, name, kwargs):
    """`(model, x, y, first step's seconds)`: one configuration's model, compiled
    and trained on its first batch (the trace, under its switches)."""
    kwargs = _switches(kwargs)
    keras.utils.set_random_seed(0)
    model, x, y, compile_args, _ = PROGRAMS[program]()
    if name.startswith("Adam"):
        optimizer = keras.optimizers.Adam(1e-3)
    else:
        model = keras_tkfac.wrap(model)
        optimizer = getattr(keras_tkfac, name.split()[0])(**kwargs)
    model.compile(optimizer=optimizer, **compile_args)
    started = time.time()
    model.train_on_batch(x[:BATCH], y[:BATCH])
    first = time.time() - started
    _switches({})
    return model, x, y, first


def _step(model, x, y, i):
    """Seconds and loss of `model`'s `i`-th step after the first."""
    batches = max(1, len(x) // BATCH)
    start = BATCH * (i % batches)
    started = time.time()
    loss = model.train_on_batch(x[start:start + BATCH], y[start:start + BATCH])
    return time.time() - started, float(np.ravel(loss)[0])


def time_steps(program, name, kwargs, steps):
    """`(first step's seconds, median later step's seconds)` of one configuration."""
    model, x, y, first = build(program, name, kwargs)
    times = [_step(model, x, y, i)[0] for i in range(steps)]
    return first, float(np.median(times))


def interleaved(program, configs, steps):
    """Every configuration built in this process, then their steps interleaved
    (one step each in turn, the order rotating): the median step and its ratio to
    the first configuration's, and the last loss (equal where a switch changes
    only how a step is computed)."""
    built = {name: build(program, name, kwargs) for name, kwargs in configs.items()}
    names = list(built)
    times = {name: [] for name in names}
    losses = {}
    for i in range(steps):
        for k in range(len(names)):
            name = names[(i + k) % len(names)]
            model, x, y, _ = built[name]
            took, losses[name] = _step(model, x, y, i)
            times[name].append(took)
    base = float(np.median(times[names[0]]))
    for name in names:
        median = float(np.median(times[name]))
        print(f"{name}: first step {built[name][3]:.1f} s, median step "
              f"{1e3 * median:.1f} ms, {median / base:.3f} x {names[0]}, "
              f"last loss {losses[name]:.7g}", flush=True)


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
    if _INTERLEAVE.value:
        interleaved(_PROGRAM.value, json.loads(_CONFIGS.value), _STEPS.value)
        return
    for name, kwargs in json.loads(_CONFIGS.value).items():
        first, median = time_steps(_PROGRAM.value, name, kwargs, _STEPS.value)
        print(f"{name}: first step {first:.1f} s, median step {1e3 * median:.1f} ms",
              flush=True)


if __name__ == "__main__":
    app.run(main)
