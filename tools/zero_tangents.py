"""Steps of the suite's programs with and without the products' zero tangents left out.

TensorFlow's forward mode passes a zero tangent for every input of an op that has
none (the network's input into the first layer, a constant), and the products'
inline rule of a multilinear op (`keras_tkfac.jvp_rules`: matmuls, convolutions,
products) computed the op on it: `0 · W`, `conv(0, W)`. With
`jvp_rules.LEAVE_OUT_ZEROS` (the default) those terms are not built. This tool
builds each workload of `tools/suite.py` twice in one process from the same
initial weights, one traced each way, and then, round after round, times `--steps`
training steps of each in turn (alternating which goes first), so that the
machine's load slows both alike. It prints each workload's median time of
`--steps` steps, the ratio (left out / computed) and the last losses, which agree
up to rounding (the terms are zeros).

    python tools/zero_tangents.py [--workloads=convnet,mlp] [--rounds=10] [--steps=10]
        [--smoke]
"""

import sys
import time

from absl import app
from absl import flags
import numpy as np
import keras

import benchlib
import keras_tkfac
import suite
from keras_tkfac import jvp_rules

_ROUNDS = flags.DEFINE_integer("rounds", 10, "Timed rounds per configuration.")
_STEPS = flags.DEFINE_integer("steps", 10, "Training steps per timed round.")
# `--smoke` and `--workloads` are suite.py's flags (smoke: its tiny workloads; here
# two rounds of two steps).
_SMOKE = suite._SMOKE  # pylint: disable=protected-access


def _steps(model, iterator, count):
    logs = None
    for _ in range(count):
        logs = model.train_function(iterator)
    return float(logs["loss"])  # (waits for the steps)


def _build(workload, leave_out, warmup):
    keras.utils.set_random_seed(0)
    model = keras_tkfac.wrap(workload.build())
    model.compile(optimizer=keras_tkfac.TKFAC(seed=0), loss=workload.loss)
    jvp_rules.LEAVE_OUT_ZEROS = leave_out  # read while the step is traced
    try:
        model.make_train_function()
        iterator = iter(benchlib.batches(workload.train, workload.batch_size, 0))
        _steps(model, iterator, warmup)
    finally:
        jvp_rules.LEAVE_OUT_ZEROS = True
    return model, iterator


def main(argv):
    del argv
    rows = []
    rounds, steps = (2, 2) if _SMOKE.value else (_ROUNDS.value, _STEPS.value)
    for name in flags.FLAGS.workloads:
        workload = getattr(suite, name)(_SMOKE.value, 0)
        built = {flag: _build(workload, flag, steps) for flag in (False, True)}
        seconds = {False: [], True: []}
        losses = {}
        for r in range(rounds):
            for flag in (False, True) if r % 2 == 0 else (True, False):
                start = time.perf_counter()
                losses[flag] = _steps(*built[flag], steps)
                seconds[flag].append(time.perf_counter() - start)
        computed, left_out = (1e3 * np.median(seconds[f]) for f in (False, True))
        rows.append((name, computed, left_out, left_out / computed, losses[False],
                     losses[True]))
        print("%s: %.1f -> %.1f ms" % (name, computed, left_out), file=sys.stderr)
    print("| workload | %d steps, zeros computed (ms) | left out (ms) | ratio | "
          "last loss, computed | left out |" % steps)
    print("|---|---:|---:|---:|---:|---:|")
    for name, computed, left_out, ratio, a, b in rows:
        print("| %s | %.1f | %.1f | %.3f | %.6g | %.6g |" % (
            name, computed, left_out, ratio, a, b))
    print("geometric mean ratio %.3f" % np.exp(np.mean([np.log(r[3]) for r in rows])))


if __name__ == "__main__":
    app.run(main)
