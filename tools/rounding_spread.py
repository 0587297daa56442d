"""How far a suite workload's TKFAC result moves under rounding-sized perturbations.

`tools/suite.py` runs each optimizer once from one set of initial weights. A change
that only reorders float sums (the same math) can still move TKFAC's steps to the
target: training amplifies a relative difference of 1e-7 to percents within tens of
steps on some programs. This tool trains `TKFAC()` at its defaults on a workload
from the suite's initial weights multiplied by `1 + k * 1e-7`, `k = 0 ..
--perturbations - 1` (the same batches), and prints each run's steps to the target
(`--target`, or the suite's: 1.02 times the best-of-grid Adam's best validation
loss, which this tool then computes first) and its best validation loss, with the
median and the range of the steps.

    python tools/rounding_spread.py --workloads=transformer [--perturbations=4]
        [--target=0.0731] [--seed=0] [--smoke]
"""

from absl import app
from absl import flags
import numpy as np
import keras

import suite

_PERTURBATIONS = flags.DEFINE_integer("perturbations", 4, "Runs per workload.")
_TARGET = flags.DEFINE_float("target", None, "Validation loss target; default: the "
                             "suite's (Adam's grid is run first).")


def _target(name, workload, weights, steps, seed):
    runs = [suite._train(name, workload, weights, "Adam", {"learning_rate": lr},  # pylint: disable=protected-access
                         steps, seed) for lr in suite.GRIDS["Adam"]["learning_rate"]]
    return suite.MARGIN * min(suite.best_val(run) for run in runs)


def main(argv):
    del argv
    seed, smoke = flags.FLAGS.seed, flags.FLAGS.smoke
    print("| workload | target | perturbation | TKFAC steps to target | best validation loss |")
    print("|---|---:|---:|---:|---:|")
    for name in flags.FLAGS.workloads:
        workload = getattr(suite, name)(smoke, seed)
        steps = workload.steps
        keras.utils.set_random_seed(seed)
        weights = workload.build().get_weights()
        target = (_TARGET.value if _TARGET.value is not None
                  else _target(name, workload, weights, steps, seed))
        reached = []
        for k in range(_PERTURBATIONS.value):
            run = suite._train(name, workload, [w * (1 + k * 1e-7) for w in weights],  # pylint: disable=protected-access
                               "TKFAC", {}, steps, seed)
            hit, _ = suite.reached(run, target)
            reached.append(np.nan if hit is None else hit)
            print("| %s | %.4g | %de-7 | %s | %.4g |" % (
                name, target, k, "not reached" if hit is None else hit,
                suite.best_val(run)), flush=True)
        print("\n%s: steps to target median %s, range %s-%s of %d runs\n" % (
            name, np.nanmedian(reached), np.nanmin(reached), np.nanmax(reached),
            len(reached)))


if __name__ == "__main__":
    app.run(main)
