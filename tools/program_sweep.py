"""Does every Keras program that trains with Adam train with `wrap` + `TKFAC()`?

A sweep over small programs shaped like the keras-io examples and the Keras guides,
each built twice from the same seed and trained for `--steps` steps with `model.fit`:
once with `keras.optimizers.Adam(1e-3)` and once wrapped with `keras_tkfac.wrap` and
`TKFAC()` at its defaults, on the same synthetic data (no downloads). For each program
it prints whether TKFAC raised, produced a non-finite loss, or trained, the first and
last epoch's training loss of both, and what `keras_tkfac` logged (fallbacks).

It is a robustness check, not a benchmark: the programs are tiny and the step counts
short. Programs cover layers and features that the workload suite (`tools/suite.py`)
does not: GRU and SimpleRNN, masking, attention masks, separable, grouped, dilated,
causal, 3-D and transposed 1-D convolutions, group and unit normalisation, PReLU,
shared layers, nested models, augmentation layers, custom layers with their own
weights, `add_loss`, losses that are not cross-entropies or mean squared error,
`class_weight`, multi-label outputs, label smoothing, `ignore_class`, weight
constraints, and a model with its own `train_step` that does not feed curvature.

    python tools/program_sweep.py [--programs=a,b] [--steps=24]
        [--optimizers=TKFAC,KFAC] [--output=docs/program_sweep.md]
        [--validation_split=0.25] [--adam_rates=1e-3,3e-3,1e-2]
        [--recurrent_blocks]

With `--validation_split` the last fraction of each program's examples is held out
(Keras's `validation_split`; the same number of steps on the rest) and the table
gives each optimizer's best (and last) epoch's validation loss: does a step that
fits each batch faster also generalise? With several `--adam_rates` each program
compares with the best of Adam's rates on that program.
"""

import json
import logging as py_logging
import math
import os
import sys
import time
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_tkfac  # noqa: E402
from sweep_programs import BATCH, PROGRAMS  # noqa: E402  (tools/, the script's folder)

FLAGS = flags.FLAGS


def _define_flags():
    """Defined when run as a script only: importing the module (its test, next to
    `tools/suite.py`'s in one process) must not define absl flags twice."""
    flags.DEFINE_string("programs", "", "comma-separated program names (default: all)")
    flags.DEFINE_integer("steps", 24, "training steps per run (batch 32)")
    flags.DEFINE_list("optimizers", ["TKFAC", "KFAC"],
                      "curvature optimizers to check, each at its defaults, against Adam")
    flags.DEFINE_string("output", "", "write the table (markdown) to this file, and the "
                        "results as JSON next to it")
    flags.DEFINE_string("tkfac", "{}", "TKFAC keyword arguments as JSON (default: "
                        "its defaults)")
    flags.DEFINE_list("adam_rates", ["1e-3"], "Adam's learning rates; each program "
                      "compares with the best of them (lowest best validation loss, or "
                      "last epoch's training loss without a split)")
    flags.DEFINE_bool("recurrent_blocks", False, "precondition SimpleRNN, LSTM and GRU "
                      "(keras_tkfac.register_recurrent_blocks(), off by default)")
    flags.DEFINE_float("validation_split", 0.0, "hold out this last fraction of each "
                       "program's examples (Keras's `validation_split`) and report the "
                       "best and last epoch's validation loss instead of the training "
                       "loss; programs that feed a dataset are left out of the "
                       "comparison")


class _Messages(py_logging.Handler):
    def __init__(self):
        super().__init__(py_logging.WARNING)
        self.messages = []

    def emit(self, record):
        message = record.getMessage()
        if "keras_tkfac" in message:
            self.messages.append(message.splitlines()[0][:160])


def _train(name, optimizer_name, steps, kwargs=None, validation_split=0.0):
    """Training losses per epoch, and validation losses per epoch (None without a
    split, or for a program that feeds a dataset)."""
    keras.utils.set_random_seed(0)
    model, x, y, compile_args, fit_args = PROGRAMS[name]()
    if optimizer_name in ("TKFAC", "KFAC"):
        model = keras_tkfac.wrap(model)
        optimizer = getattr(keras_tkfac, optimizer_name)(**(kwargs or {}))
    else:
        optimizer = keras.optimizers.Adam(**(kwargs or {"learning_rate": 1e-3}))
    model.compile(optimizer=optimizer, **compile_args)
    epochs = max(1, steps // 8)
    if isinstance(x, (tf.data.Dataset, keras.utils.PyDataset)):
        history = model.fit(x, epochs=epochs, verbose=0, **fit_args)
    else:
        if validation_split:
            # As many steps as without a split: epochs of fewer batches.
            rows = len(tf.nest.flatten(x)[0])
            per_epoch = math.ceil(rows * (1.0 - validation_split) / BATCH)
            epochs = max(1, math.ceil(steps / per_epoch))
            fit_args = dict(fit_args, validation_split=validation_split)
        history = model.fit(x, y, batch_size=BATCH, epochs=epochs, verbose=0,
                            shuffle=False, **fit_args)
    return history.history["loss"], history.history.get("val_loss")


def run(name, steps, optimizers=("TKFAC",), tkfac=None, validation_split=0.0,
        adam_rates=(1e-3,)):
    """Trains program `name` with Adam at each of `adam_rates` and each of
    `optimizers` (`TKFAC` with the keyword arguments `tkfac`, if given); returns a
    dict with each run's status, first and last epoch's loss, seconds and logged
    messages (and, with a `validation_split`, the best and last epoch's validation
    loss). `"Adam"` is the best of the rates (lowest best validation loss, or
    last epoch's training loss without a split), with its `learning_rate`."""
    result = {"program": name}
    runs = [("Adam", {"learning_rate": rate}) for rate in adam_rates]
    runs += [(o, tkfac if o == "TKFAC" else None) for o in optimizers]
    for optimizer_name, kwargs in runs:
        entry = _run_one(name, optimizer_name, steps, kwargs, validation_split)
        if optimizer_name == "Adam":
            entry["learning_rate"] = kwargs["learning_rate"]
            if "Adam" in result and not _better(entry, result["Adam"]):
                continue
        result[optimizer_name] = entry
    return result


def _better(entry, other):
    """Whether run `entry` beats run `other` (a finite run beats a failed one)."""
    if entry["status"] != "ok" or other["status"] != "ok":
        return entry["status"] == "ok"
    key = "best_validation" if "best_validation" in entry else "last"
    return entry[key] < other[key]


def _run_one(name, optimizer_name, steps, kwargs, validation_split):
    """One training run: a dict of its status, losses, seconds and messages."""
    handler = _Messages()
    py_logging.getLogger().addHandler(handler)
    started = time.time()
    try:
        losses, validation = _train(name, optimizer_name, steps, kwargs, validation_split)
        finite = all(math.isfinite(v) for v in losses + (validation or []))
        entry = {"status": "ok" if finite else "non-finite loss",
                 "first": losses[0], "last": losses[-1]}
        if validation:
            entry.update(best_validation=min(validation), last_validation=validation[-1])
    except Exception as error:  # pylint: disable=broad-except
        entry = {"status": f"error: {type(error).__name__}: {str(error)[:300]}",
                 # (Paths relative to the working directory: no machine paths
                 # in the recorded results.)
                 "trace": traceback.format_exc().replace(
                     os.getcwd() + os.sep, "")[-1500:]}
    finally:
        py_logging.getLogger().removeHandler(handler)
        keras.mixed_precision.set_global_policy("float32")
        keras.config.set_floatx("float32")
    entry["seconds"] = round(time.time() - started, 1)
    entry["messages"] = sorted(set(handler.messages))
    return entry


def _cell(entry, validation=False):
    if entry["status"] != "ok":
        return entry["status"][:80]
    if validation:
        if "best_validation" not in entry:
            return "n/a (dataset)"
        return f"{entry['best_validation']:.4g} ({entry['last_validation']:.4g})"
    return f"{entry['first']:.4g} → {entry['last']:.4g}"


def _at_most_adams(results, optimizer, validation):
    """How many programs `optimizer`'s last training loss (or best validation loss)
    was at most Adam's on, and on how many both were compared."""
    key = "best_validation" if validation else "last"
    both = [r for r in results if key in r[optimizer] and key in r["Adam"]
            and r[optimizer]["status"] == "ok" and r["Adam"]["status"] == "ok"]
    return sum(r[optimizer][key] <= r["Adam"][key] for r in both), len(both)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    names = FLAGS.programs.split(",") if FLAGS.programs else list(PROGRAMS)
    optimizers = list(FLAGS.optimizers)
    epochs = max(1, FLAGS.steps // 8)
    tkfac = json.loads(FLAGS.tkfac)
    split = FLAGS.validation_split
    rates = [float(r) for r in FLAGS.adam_rates]
    adam = (f"Adam({rates[0]:g})" if len(rates) == 1 else
            f"Adam (best of learning rates {', '.join(f'{r:g}' for r in rates)}; "
            "its rate in brackets)")
    settings = f" TKFAC's arguments: {tkfac}." if tkfac else ""
    if FLAGS.recurrent_blocks:
        keras_tkfac.register_recurrent_blocks()
        settings += " Recurrent blocks registered (`--recurrent_blocks`)."
    if split:
        what = (f"The last {split:g} of each program's examples held out (Keras's "
                f"`validation_split`), {FLAGS.steps} steps of {BATCH} on the rest; "
                "best (last) epoch's validation loss; programs that feed a dataset "
                "have no split (n/a)")
    else:
        what = (f"{epochs} epochs of 8 steps of {BATCH}. Training loss of the first → "
                "last epoch (training mode, mean over the epoch)")
    lines = [
        f"`python tools/program_sweep.py` ({len(names)} programs; keras_tkfac "
        f"{_commit()}). {what}; TKFAC and KFAC at their "
        f"defaults on the wrapped model, {adam} on the same initial weights and "
        f"batches.{settings} \"Messages\" are what keras_tkfac logged (fallbacks), "
        "shortened.",
        "",
        f"| program | {'Adam' if len(rates) > 1 else adam} | " + " | ".join(f"{o}()" for o in optimizers)
        + " | messages |",
        "|---|---|" + "---|" * len(optimizers) + "---|"]
    for line in lines:
        print(line, flush=True)
    results = []
    for name in names:
        result = run(name, FLAGS.steps, optimizers, tkfac, split, rates)
        results.append(result)
        messages = sorted({_short(m) for o in optimizers for m in result[o]["messages"]})
        rate = (f" [{result['Adam']['learning_rate']:g}]" if len(rates) > 1
                and result["Adam"]["status"] == "ok" else "")
        line = (f"| {name} | {_cell(result['Adam'], split)}{rate} | "
                + " | ".join(_cell(result[o], split) for o in optimizers)
                + f" | {'; '.join(messages) or 'none'} |")
        lines.append(line)
        print(line, flush=True)
        for o in optimizers:
            if "trace" in result[o]:
                print(result[o]["trace"], file=sys.stderr)
    summary = []
    for o in optimizers:
        failed = [r["program"] for r in results
                  if r[o]["status"] != "ok" and r["Adam"]["status"] == "ok"]
        # A program Adam cannot run either (its own `train_step` without a
        # `test_step`, under a validation split) says nothing about `o`.
        neither = [r["program"] for r in results
                   if r[o]["status"] != "ok" and r["Adam"]["status"] != "ok"]
        better, compared = _at_most_adams(results, o, split)
        measure = ("best validation loss" if split else "last epoch's loss")
        summary.append(
            f"{o}() trained {len(results) - len(failed) - len(neither)} of "
            f"{len(results) - len(neither)} programs that Adam trained"
            + (f" (failed: {', '.join(failed)})" if failed else "")
            + (f"; Adam failed too on {', '.join(neither)}" if neither else "")
            + f"; its {measure} was at most {'Adam' if len(rates) > 1 else adam}'s "
            f"on {better} of {compared}.")
    lines += [""] + summary
    print("\n" + "\n".join(summary))
    if FLAGS.output:
        with open(FLAGS.output, "w") as f:
            f.write("\n".join(lines) + "\n")
        with open(os.path.splitext(FLAGS.output)[0] + ".json", "w") as f:
            json.dump(results, f, indent=1)


def _short(message):
    """A logged message without its variable lists and recipe."""
    message = message.replace("keras_tkfac: ", "")
    for cut in (": ", " ("):
        head = message.split(cut)[0]
        if len(head) > 30:
            message = head
            break
    return message[:110]


def _commit():
    try:
        import subprocess
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=os.path.dirname(__file__)).stdout.strip()
    except OSError:
        return "unknown"


if __name__ == "__main__":
    _define_flags()
    app.run(main)
