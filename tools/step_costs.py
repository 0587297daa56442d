"""Milliseconds of each kind of training step, configurations interleaved step by step.

`benchmark.py` times whole training runs one after another, so a change in the load
of a shared machine between two runs changes their ratio. This tool builds one model
per configuration (the problems of `benchmark.py`: same models, data and batch sizes),
and then, round after round, times one step of every kind of every configuration in
turn: a plain step, a statistics step and an inverse step of TKFAC/KFAC (chosen by
setting the optimizer's step counter), one step of Adam. Other load then slows all
configurations alike within a round; the medians over rounds are reported, with each
kind's ratio to Adam's step and the mean step at the configuration's update periods
in the steady state (after the inverse warm-up):

    mean = plain + (statistics - plain) / factor_update_freq
                 + (inverse - statistics) / inverse_update_freq

For every configuration with `precondition_dtype="bfloat16"` the relative error of
its update against float32 is measured on the same state and gradients.

    python tools/step_costs.py --problem=resnet [--rounds=30] [--smoke]
        [--configs='{"TKFAC": {}, "TKFAC bf16": {"precondition_dtype": "bfloat16"}}']
"""

import json
import os
import sys
import time

from absl import app
from absl import flags
import numpy as np
import tensorflow as tf
import keras

import benchlib
import benchmark
import keras_tkfac
from keras_tkfac import ops
from keras_tkfac import precision

_ROUNDS = flags.DEFINE_integer("rounds", 30, "Timed rounds (one step of each kind).")
_CONFIGS = flags.DEFINE_string(
    "configs", None, "JSON {label: TKFAC keyword arguments}; a label starting with "
    "'KFAC' uses KFAC. Default: TKFAC at its defaults, and with bfloat16 products.",
)
_OUT = flags.DEFINE_string("out", None, "Also write the table to this file.")
# `--problem` and `--smoke` (here: digits, tiny models, batch 32, 2 rounds) are
# benchmark.py's flags.
_SMOKE = benchmark._SMOKE

DEFAULT_CONFIGS = {"TKFAC": {}, "TKFAC bf16": {"precondition_dtype": "bfloat16"}}


def _model(problem, data, seed, smoke):
    keras.utils.set_random_seed(seed)
    dim = int(np.prod(data.x_train.shape[1:]))
    classes = int(data.y_train.max()) + 1
    if problem == "mlp":
        return benchlib.mlp(dim, (32,) if smoke else (512, 512), classes)
    if problem == "autoencoder":
        return benchlib.autoencoder(dim, (32, 16, 4) if smoke else (1000, 500, 250, 30))
    return benchlib.resnet8(data.x_train.shape[1:], classes, 4 if smoke else 16)


def _batch_size(problem):
    return 32 if _SMOKE.value else benchmark.PROBLEMS[problem].batch_size


def _setup(name, config, initial, train, problem):
    model = keras.models.clone_model(initial)
    model.set_weights(initial.get_weights())
    wrapped = keras_tkfac.wrap(model)
    if name == "Adam":
        optimizer = keras.optimizers.Adam(1e-3)
    else:
        cls = keras_tkfac.KFAC if name.startswith("KFAC") else keras_tkfac.TKFAC
        optimizer = cls(seed=0, **config)
    loss = (keras.losses.BinaryCrossentropy(from_logits=True) if problem == "autoencoder"
            else keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    wrapped.compile(optimizer=optimizer, loss=loss)
    data = benchlib.batches(train, _batch_size(problem), 0)
    # Builds the optimizer and traces the step (with inverses and statistics).
    wrapped.fit(data, epochs=1, steps_per_epoch=3, verbose=0)
    return wrapped, iter(data)


def _kinds(optimizer):
    """Step counter values of a plain, a statistics and an inverse step."""
    if not isinstance(optimizer, keras_tkfac.TKFAC | keras_tkfac.KFAC):
        return {"plain": None}
    t_cov, t_inv = optimizer.factor_update_freq, optimizer.inverse_update_freq
    step = 10 * t_inv  # past the warm-up
    return {"plain": step + 1 if t_cov > 1 else None, "statistics": step + t_cov,
            "inverse": step}


def _time_step(wrapped, iterator, counter):
    if counter is not None:
        wrapped.optimizer.iterations.assign(counter)
    start = time.perf_counter()
    logs = wrapped.train_function(iterator)
    float(logs["loss"])
    return 1e3 * (time.perf_counter() - start)


def report(lines):
    """Prints the table `lines` and writes it to `--out` when given."""
    text = "\n".join(lines)
    print(text)
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            f.write(text + "\n")


def interleaved_medians(runs, rounds):
    """`{(name, kind): median ms}`: one step of every kind of every run of `runs`
    (`{name: (wrapped model, batch iterator)}`) timed in turn, `rounds` times."""
    times = {(name, kind): [] for name, (wrapped, _) in runs.items()
             for kind in _kinds(wrapped.optimizer)}
    for _ in range(rounds):
        for name, (wrapped, iterator) in runs.items():
            for kind, counter in _kinds(wrapped.optimizer).items():
                times[name, kind].append(_time_step(wrapped, iterator, counter))
    return {key: float(np.median(v)) for key, v in times.items()}


def _bf16_error(wrapped, train, problem):
    """Relative Frobenius error of bfloat16 updates against float32, per layer."""
    optimizer = wrapped.optimizer
    n = _batch_size(problem)
    x, y = train[0][:n], train[1][:n]
    with tf.GradientTape() as tape:
        loss = wrapped.compute_loss(x=x, y=y, y_pred=wrapped(x, training=True))
    variables = wrapped.trainable_variables
    grads = dict(zip([optimizer._var_key(v) for v in variables],
                     tape.gradient(loss, variables)))
    errors = []
    for slot in optimizer._slots:
        grad = slot.block.grad_matrix(*[grads[key] for key in slot.keys])
        args = ([slot.inverses[0]], [grad], [slot.inverses[1]])
        (exact,) = ops.precondition_many(*args)
        (low,) = ops.precondition_many(*args, tf.bfloat16)
        errors.append(float(tf.norm(low - exact) / tf.norm(exact)))
    return errors


def main(argv):
    del argv
    problem = benchmark._PROBLEM.value
    smoke = _SMOKE.value
    data = benchlib.load_data("digits" if smoke else "mnist5k", 0)
    initial = _model(problem, data, 0, smoke)
    rounds = 2 if smoke else _ROUNDS.value
    x = data.x_train
    if problem != "resnet":
        x = x.reshape(len(x), -1)
    train = (x, x) if problem == "autoencoder" else (x, data.y_train)
    configs = {"Adam": {}, **(json.loads(_CONFIGS.value) if _CONFIGS.value
                              else DEFAULT_CONFIGS)}
    runs = {name: _setup(name, config, initial, train, problem)
            for name, config in configs.items()}
    med = interleaved_medians(runs, rounds)
    adam = med["Adam", "plain"]
    lines = [
        f"`python tools/step_costs.py {' '.join(sys.argv[1:])}`", "",
        f"{problem}, batch {_batch_size(problem)}, "
        f"{rounds} interleaved rounds, {os.cpu_count()} CPU cores, TensorFlow "
        f"{tf.__version__}, keras_tkfac {benchlib.source_version()}; medians in ms "
        "(× Adam's step).", "",
        "| configuration | plain | statistics | inverse | statistics / plain | "
        "mean at its periods | bf16 update error (max over layers) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, (wrapped, _) in runs.items():
        optimizer = wrapped.optimizer
        if name == "Adam":
            lines.append(f"| Adam | {adam:.1f} (1.00) | | | | {adam:.1f} (1.00) | |")
            continue
        kinds = _kinds(optimizer)
        plain = med[name, "plain"] if kinds["plain"] is not None else med[
            name, "statistics"]
        stats, inverse = med[name, "statistics"], med[name, "inverse"]
        mean = (plain + (stats - plain) / optimizer.factor_update_freq
                + (inverse - stats) / optimizer.inverse_update_freq)
        error = ""
        if precision.resolve(optimizer.precondition_dtype) == "bfloat16":
            error = f"{max(_bf16_error(wrapped, train, problem)):.1e}"
        lines.append(
            f"| {name} | {plain:.1f} ({plain / adam:.2f}) | {stats:.1f} "
            f"({stats / adam:.2f}) | {inverse:.1f} ({inverse / adam:.2f}) | "
            f"{stats / plain:.2f} | {mean:.1f} ({mean / adam:.2f}) | {error} |")
    report(lines)


if __name__ == "__main__":
    app.run(main)
