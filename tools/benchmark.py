"""TKFAC against KFAC, Adam, SGD and Muon, side by side, in one process.

Every optimizer and every configuration of its grid trains a copy of the same initial
model on the same batches (a fresh, seeded `tf.data` pipeline per run), one run after
another, on this machine. The best configuration of each optimizer (lowest final
training loss) is compared; the whole grid is printed too.

Measured per run: the loss of every step; every `--eval_every` steps the training loss
(inference mode, over at most `--eval_examples` training examples) and the test metric,
both outside the clock; the time of every step (the first one traces and compiles and
is reported apart; medians and means exclude the first `--warmup_steps`); optimizer
state and peak resident memory. Runs go round robin over the optimizers, and step
times come from each optimizer's least disturbed run (lowest median) among those that
do its best configuration's work, so that other load on a shared machine distorts
the ratios less. The FLOP model
(`benchlib.step_flops`, with the curvature products of the quadratic step controls:
a forward-mode pass per direction) gives the step-time ratio to Adam that matmul
arithmetic alone predicts, and a bound: Adam's measured step plus the extra FLOPs at this machine's
best matmul rate.

Writes `<output_dir>/benchmark_<problem>.md` (the tables, also printed), `.png` (loss
and test metric against steps and seconds) and `.json` (all curves).

    python tools/benchmark.py --problem=mlp [--dataset=digits] [--steps=300] [--smoke]
"""

import collections
import itertools
import json
import os
import sys

from absl import app
from absl import flags
from matplotlib.figure import Figure
import numpy as np
import tensorflow as tf
import keras

import benchlib
import keras_tkfac

Problem = collections.namedtuple(
    "Problem",
    "dataset steps batch_size eval_every eval_examples target metric".split(),
)
PROBLEMS = {
    "mlp": Problem("mnist5k", 300, 256, 5, 4000, "0.05", "accuracy"),
    "autoencoder": Problem("mnist5k", 400, 256, 20, 4000, "adam", "loss"),
    "resnet": Problem("mnist5k", 200, 128, 20, 2000, "0.1", "accuracy"),
}
# SGD uses momentum 0.9; Muon its Keras defaults (AdamW on the output layer and on
# variables that are not 2-D); TKFAC/KFAC their defaults for everything not listed.
# TKFAC/KFAC's learning rate under the default step control is the fraction
# `min(lr, 1e-3) / 1e-3` of the quadratic model's step: above 1e-3 every value is 1e-3.
GRIDS = {
    "TKFAC": {"learning_rate": [3e-4, 1e-3], "damping": [0.01, 0.1]},
    "KFAC": {"learning_rate": [3e-4, 1e-3], "damping": [0.01, 0.1]},
    "Adam": {"learning_rate": [3e-4, 1e-3, 3e-3, 1e-2]},
    "SGD": {"learning_rate": [0.01, 0.03, 0.1, 0.3]},
    "Muon": {"learning_rate": [1e-3, 3e-3, 1e-2]},
}

_PROBLEM = flags.DEFINE_enum("problem", "mlp", list(PROBLEMS), "Model and data.")
_DATASET = flags.DEFINE_enum(
    "dataset", None, [*benchlib.OFFLINE_DATASETS, *benchlib.TFDS_DATASETS],
    "Data set (default: the problem's). tfds names need a download.",
)
_STEPS = flags.DEFINE_integer("steps", None, "Steps per run (default: the problem's).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Examples per step.")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", None, "Steps between evaluations.")
_TARGET = flags.DEFINE_string(
    "target", None, "Training loss to reach: a number, or 'adam' for the final "
    "training loss of the best Adam run (default: the problem's).",
)
_OPTIMIZERS = flags.DEFINE_list("optimizers", list(GRIDS), "Optimizers to run.")
_GRID = flags.DEFINE_string(
    "grid", None, 'JSON replacing grids, e.g. \'{"TKFAC": {"damping": [0.1]}}\'.'
)
_EVAL_EXAMPLES = flags.DEFINE_integer(
    "eval_examples", None, "Training examples of the training loss (default: the "
    "problem's).",
)
_WARMUP_STEPS = flags.DEFINE_integer("warmup_steps", 10, "Steps left out of timings.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of weights, batch order and samplers.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "results", "Output directory.")
_SMOKE = flags.DEFINE_bool(
    "smoke", False, "digits, tiny models, 12 steps, one configuration each."
)

Run = collections.namedtuple(
    "Run", ["optimizer", "config", "step_losses", "step_seconds", "evals",
            "state_bytes", "curvature_bytes", "peak_rss", "flops", "periods"],
)


def _evaluator(model, loss_fn, metric, data, n):
    forward = tf.function(lambda x: model(x, training=False), reduce_retracing=True)

    def mean(fn, x, y):
        total = 0.0
        for i in range(0, len(x), 1000):
            chunk = slice(i, i + 1000)
            total += float(fn(y[chunk], forward(x[chunk]))) * len(x[chunk])
        return total / len(x)

    def accuracy(y, logits):
        return np.mean(np.argmax(logits, axis=-1) == y)

    test_metric = accuracy if metric == "accuracy" else loss_fn
    return lambda: (
        mean(loss_fn, data[0][:n], data[1][:n]), mean(test_metric, data[2], data[3])
    )


def _make_optimizer(name, config):
    if name in ("TKFAC", "KFAC"):
        return getattr(keras_tkfac, name)(seed=_SEED.value, **config)
    if name == "SGD":
        return keras.optimizers.SGD(momentum=0.9, **config)
    if name == "Muon":
        return keras.optimizers.Muon(
            exclude_layers=["logits", "reconstruction"], **config)
    return keras.optimizers.Adam(**config)


def _loss():
    if _PROBLEM.value == "autoencoder":
        return keras.losses.BinaryCrossentropy(from_logits=True)
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _train(name, config, initial, train, test, problem, steps, batch_size, eval_every):
    model = keras.models.clone_model(initial)
    model.set_weights(initial.get_weights())
    wrapped = keras_tkfac.wrap(model)
    optimizer = _make_optimizer(name, config)
    loss_fn = _loss()
    wrapped.compile(optimizer=optimizer, loss=loss_fn)
    evaluate = _evaluator(wrapped, loss_fn, problem.metric, (*train, *test),
                          _EVAL_EXAMPLES.value or problem.eval_examples)
    recorder = benchlib.Recorder(evaluate, eval_every)
    benchlib.reset_peak_rss()
    wrapped.fit(benchlib.batches(train, batch_size, _SEED.value), epochs=1,
                steps_per_epoch=steps, shuffle=False, verbose=0, callbacks=[recorder])
    shapes = benchlib.layer_shapes(wrapped)
    periods = None
    if name in ("TKFAC", "KFAC"):
        periods = (optimizer.factor_update_freq, optimizer.inverse_update_freq)
        flops = benchlib.step_flops(
            shapes, batch_size, factor_update_freq=periods[0],
            inverse_update_freq=periods[1],
            factored_form=optimizer.precondition_form == "auto",
            **benchlib.product_arguments(optimizer))
    else:
        flops = benchlib.step_flops(shapes, batch_size)
        if name == "Muon":
            flops["newton_schulz"] = benchlib.muon_flops(
                model.trainable_variables, optimizer.exclude_layers, optimizer.ns_steps)
    return Run(name, config, recorder.step_losses(), np.array(recorder.seconds), np.array(recorder.evals),
               *benchlib.optimizer_bytes(optimizer, model.trainable_variables),
               benchlib.peak_rss_bytes(), dict(flops), periods)


def _final(run):
    loss = run.evals[-1, 1]
    return loss if np.isfinite(loss) else np.inf


def _reached(run, target):
    """`(steps, seconds after step 1)` at the first evaluation at or below `target`."""
    hits = np.flatnonzero(run.evals[:, 1] <= target)
    if not hits.size:
        return None, None
    step = int(run.evals[hits[0], 0])
    return step, float(np.sum(run.step_seconds[1:step]))


def _config_text(config):
    """`lr=0.003, step_control=graft`: numbers in `g` format, other values as
    they are (a grid may hold strings, such as step controls)."""
    short = {"learning_rate": "lr"}
    return ", ".join(
        f"{short.get(k, k)}={v:g}" if isinstance(v, (int, float))
        and not isinstance(v, bool) else f"{short.get(k, k)}={v}"
        for k, v in config.items())


def _fmt(value, spec=".3g"):
    return "n/a" if value is None else format(value, spec)


# Grid keys that do not change what a step computes (only its numbers).
_SAME_WORK = ("learning_rate", "damping")


def _timing_runs(runs, warmup, best):
    """Per optimizer, its grid run with the lowest median step time among the runs
    that do the best configuration's work.

    Configurations that differ only in `_SAME_WORK` keys do the same work a step, and
    other load on the machine only adds time, so the least disturbed of them measures
    the cost best. A grid over other keys (a step control) changes the work: those
    runs are not timed for the best one.
    """
    def work(config):
        return {k: v for k, v in config.items() if k not in _SAME_WORK}

    timing = {}
    for run in runs:
        if work(run.config) != work(best[run.optimizer].config):
            continue
        ms = 1e3 * run.step_seconds[warmup:]
        fastest = timing.get(run.optimizer)
        if fastest is None or np.median(ms) < np.median(fastest):
            timing[run.optimizer] = ms
    return timing


def _tables(best, runs, target, metric, rate, warmup):
    step_ms = _timing_runs(runs, warmup, best)
    pooled = {n: 1e3 * np.concatenate([r.step_seconds[warmup:] for r in runs
                                       if r.optimizer == n]) for n in best}
    adam = best.get("Adam")
    rows = ["| optimizer | best of grid | final train loss | test " + metric +
            f" | steps to loss <= {target:.3g} | seconds to it |", "|---|---|" +
            "---:|" * 4]
    cost = ["| optimizer | step 1 (s) | median ms/step | × Adam | mean ms/step | "
            "× Adam | FLOP model × Adam | bound × Adam | median ms/step, all runs | "
            "optimizer state (MB) | factors + inverses (MB) | peak RSS (MB) |",
            "|---|" + "---:|" * 11]
    kinds = ["| optimizer | plain steps | statistics steps | inverse steps | all steps "
             "(mean) |", "|---|---:|---:|---:|---:|"]
    for name, run in best.items():
        steps, seconds = _reached(run, target)
        rows.append(f"| {name} | {_config_text(run.config)} | {_final(run):.3g} | "
                    f"{run.evals[-1, 2]:.3g} | {steps or 'not reached'} | "
                    f"{_fmt(seconds, '.1f')} |")
        ms = step_ms[name]
        ratios = [None] * 4
        if adam is not None:
            adam_ms, adam_flops = step_ms["Adam"], sum(adam.flops.values())
            extra = sum(run.flops.values()) - adam_flops
            ratios = [np.median(ms) / np.median(adam_ms),
                      np.mean(ms) / np.mean(adam_ms),
                      sum(run.flops.values()) / adam_flops,
                      1 + extra / rate / (1e-3 * np.median(adam_ms))]
        cost.append(
            f"| {name} | {run.step_seconds[0]:.1f} | {np.median(ms):.1f} | "
            f"{_fmt(ratios[0], '.2f')} | {np.mean(ms):.1f} | "
            f"{_fmt(ratios[1], '.2f')} | {_fmt(ratios[2], '.2f')} | "
            f"{_fmt(ratios[3], '.2f')} | "
            f"{np.median(pooled[name]):.1f} | {run.state_bytes / 2**20:.2f} | "
            f"{run.curvature_bytes / 2**20:.2f} | {run.peak_rss / 2**20:.0f} |")
        if run.periods is not None:
            kinds.append(f"| {name} | " + " | ".join(
                f"{value:.1f}" if np.isfinite(value) else "n/a"
                for value in _by_kind(ms, run.periods, warmup)) + " |")
    grid = ["| optimizer | configuration | final train loss | test " + metric +
            " | steps to target | median ms/step |", "|---|---|---:|---:|---:|---:|"]
    for run in runs:
        grid.append(f"| {run.optimizer} | {_config_text(run.config)} | "
                    f"{_final(run):.3g} | {run.evals[-1, 2]:.3g} | "
                    f"{_reached(run, target)[0] or 'not reached'} | "
                    f"{1e3 * np.median(run.step_seconds[warmup:]):.1f} |")
    return rows, cost, kinds, grid


def _by_kind(ms, periods, warmup):
    """Median ms of plain, statistics and inverse steps, and the mean of all steps.

    A step updates the statistics when the optimizer's `iterations` (0 at the first
    step) is a multiple of `factor_update_freq`, the inverses (too) when it is a
    multiple of `inverse_update_freq`.
    """
    factor_period, inverse_period = periods
    iterations = np.arange(warmup, warmup + len(ms))
    inverse = iterations % inverse_period == 0
    statistics = (iterations % factor_period == 0) & ~inverse
    plain = ~(inverse | statistics)
    return [np.median(ms[k]) if k.any() else np.nan
            for k in (plain, statistics, inverse)] + [np.mean(ms)]


def _plot(best, target, metric, path):
    figure = Figure(figsize=(11, 7), layout="constrained")
    axes = figure.subplots(2, 2, sharex="col", sharey="row")
    for name, run in best.items():
        steps = run.evals[:, 0].astype(int)
        clock = np.concatenate([[0.0], np.cumsum(run.step_seconds[1:])])[
            np.maximum(steps - 1, 0)]
        for row, column in ((0, 1), (1, 2)):
            axes[row, 0].plot(steps, run.evals[:, column], label=name)
            axes[row, 1].plot(clock, run.evals[:, column], label=name)
    for a in axes[0]:
        a.axhline(target, color="gray", linestyle=":", label="target")
        a.set(yscale="log")
    axes[0, 0].set(ylabel="training loss")
    axes[1, 0].set(xlabel="step", ylabel=f"test {metric}")
    axes[1, 1].set(xlabel="seconds after step 1 (evaluations excluded)")
    for a in axes.flat:
        a.grid(True, which="both", alpha=0.3)
    axes[0, 0].legend()
    figure.savefig(path, dpi=110)


def main(argv):
    del argv
    problem = PROBLEMS[_PROBLEM.value]
    smoke = _SMOKE.value
    dataset = _DATASET.value or ("digits" if smoke else problem.dataset)
    steps = 12 if smoke else (_STEPS.value or problem.steps)
    batch_size = 32 if smoke else (_BATCH_SIZE.value or problem.batch_size)
    eval_every = 4 if smoke else (_EVAL_EVERY.value or problem.eval_every)
    warmup = 2 if smoke else _WARMUP_STEPS.value
    grids = {**GRIDS, **json.loads(_GRID.value or "{}")}
    names = [n for n in _OPTIMIZERS.value if n in grids]
    if "Muon" in names and not hasattr(keras.optimizers, "Muon"):
        print(f"Muon skipped: Keras {keras.__version__} has no keras.optimizers.Muon.")
        names.remove("Muon")
    try:
        data = benchlib.load_data(dataset, _SEED.value)
    except benchlib.DataUnavailable as error:
        sys.exit(str(error))
    keras.utils.set_random_seed(_SEED.value)
    dim, classes = int(np.prod(data.x_train.shape[1:])), int(data.y_train.max()) + 1
    initial = {
        "mlp": lambda: benchlib.mlp(dim, (32,) if smoke else (512, 512), classes),
        "autoencoder": lambda: benchlib.autoencoder(
            dim, (32, 16, 4) if smoke else (1000, 500, 250, 30)),
        "resnet": lambda: benchlib.resnet8(
            data.x_train.shape[1:], classes, 4 if smoke else 16),
    }[_PROBLEM.value]()
    x, x_test = data.x_train, data.x_test
    if _PROBLEM.value != "resnet":
        x, x_test = x.reshape(len(x), -1), x_test.reshape(len(x_test), -1)
    if _PROBLEM.value == "autoencoder":
        train, test = (x, x), (x_test, x_test)
    else:
        train, test = (x, data.y_train), (x_test, data.y_test)
    configs = {}
    for name in names:
        axes = grids[name]
        every = [dict(zip(axes, v)) for v in itertools.product(*axes.values())]
        configs[name] = every[:1] if smoke else every
    # Round robin over the optimizers, so that a change in the machine's load during
    # the benchmark affects all of them alike.
    rate = 0.0
    runs = []
    for round_ in itertools.zip_longest(*configs.values()):
        for name, config in zip(configs, round_):
            if config is None:
                continue
            # The best of measurements spread over the benchmark: other load only
            # makes a measurement slower.
            rate = max(rate, benchlib.matmul_rate())
            run = _train(name, config, initial, train, test, problem, steps,
                         batch_size, eval_every)
            runs.append(run)
            print(f"{name} {_config_text(config)}: final train loss {_final(run):.4g}, "
                  f"median {1e3 * np.median(run.step_seconds[warmup:]):.1f} ms/step",
                  flush=True)
    runs.sort(key=lambda run: names.index(run.optimizer))
    best = {}
    for run in runs:
        if run.optimizer not in best or _final(run) < _final(best[run.optimizer]):
            best[run.optimizer] = run
    target_text = _TARGET.value or problem.target
    if target_text == "adam":
        target = _final(best["Adam"]) if "Adam" in best else np.nan
    else:
        target = float(target_text)
    rate = max(rate, benchlib.matmul_rate())
    rows, cost, kinds, grid = _tables(best, runs, target, problem.metric, rate, warmup)
    layers = "-".join(str(s.d_out) for s in benchlib.layer_shapes(keras_tkfac.wrap(
        keras.models.clone_model(initial))))
    command = " ".join(["python tools/benchmark.py", *sys.argv[1:]])
    report = "\n".join([
        f"`{command}`", "",
        f"{_PROBLEM.value} ({initial.name}, covered layers' widths {layers}, "
        f"{initial.count_params():,} parameters) on {dataset} "
        f"({len(data.x_train)} train / {len(data.x_test)} test), {steps} steps of "
        f"{batch_size}, seed {_SEED.value}; {benchlib.machine()}, TensorFlow "
        f"{tf.__version__}, Keras {keras.__version__}, keras_tkfac "
        f"{benchlib.source_version()}. Training loss: inference mode over "
        f"{min(_EVAL_EXAMPLES.value or problem.eval_examples, len(data.x_train))} "
        f"training examples, every "
        f"{eval_every} steps; target {target:.3g}"
        f"{' (final loss of the best Adam run)' if target_text == 'adam' else ''}. "
        f"Seconds exclude step 1 (tracing) and evaluations. Step times leave out the "
        f"first {warmup} steps and come from the grid run of each optimizer with the "
        f"lowest median among those that differ from its best configuration only in "
        f"learning rate or damping (they do the same work a step; other load only adds "
        f"time); the medians of all runs are shown too. FLOP model: matmul "
        f"FLOPs of a step (with the quadratic step controls' curvature products) "
        f"relative to Adam's; bound: Adam's measured median plus the "
        f"extra FLOPs at this machine's best matmul rate ({rate / 1e9:.0f} GFLOP/s).",
        "", *rows, "", *cost, "", "Milliseconds per kind of step (the same runs):", "",
        *kinds, "", "Grid (the best configuration of each optimizer has the lowest "
        "final training loss):", "", *grid,
    ])
    os.makedirs(_OUTPUT_DIR.value, exist_ok=True)
    stem = os.path.join(_OUTPUT_DIR.value, f"benchmark_{_PROBLEM.value}")
    with open(stem + ".md", "w") as f:
        f.write(report + "\n")
    with open(stem + ".json", "w") as f:
        json.dump([{**r._asdict(), **{k: np.asarray(v).tolist() for k, v in r._asdict(
        ).items() if isinstance(v, np.ndarray)}} for r in runs], f)
    _plot(best, target, problem.metric, stem + ".png")
    print(report)


if __name__ == "__main__":
    app.run(main)
