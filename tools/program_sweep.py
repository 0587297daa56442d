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


class _Messages(py_logging.Handler):
    def __init__(self):
        super().__init__(py_logging.WARNING)
        self.messages = []

    def emit(self, record):
        message = record.getMessage()
        if "keras_tkfac" in message:
            self.messages.append(message.splitlines()[0][:160])


def _train(name, optimizer_name, steps, kwargs=None):
    keras.utils.set_random_seed(0)
    model, x, y, compile_args, fit_args = PROGRAMS[name]()
    if optimizer_name in ("TKFAC", "KFAC"):
        model = keras_tkfac.wrap(model)
        optimizer = getattr(keras_tkfac, optimizer_name)(**(kwargs or {}))
    else:
        optimizer = keras.optimizers.Adam(1e-3)
    model.compile(optimizer=optimizer, **compile_args)
    epochs = max(1, steps // 8)
    if isinstance(x, (tf.data.Dataset, keras.utils.PyDataset)):
        history = model.fit(x, epochs=epochs, verbose=0, **fit_args)
    else:
        history = model.fit(x, y, batch_size=BATCH, epochs=epochs, verbose=0,
                            shuffle=False, **fit_args)
    return history.history["loss"]


def run(name, steps, optimizers=("TKFAC",), tkfac=None):
    """Trains program `name` with Adam and each of `optimizers` (`TKFAC` with the
    keyword arguments `tkfac`, if given); returns a dict with each run's status,
    first and last epoch's loss, seconds and logged messages."""
    result = {"program": name}
    for optimizer_name in ("Adam", *optimizers):
        handler = _Messages()
        py_logging.getLogger().addHandler(handler)
        started = time.time()
        try:
            losses = _train(name, optimizer_name, steps,
                            tkfac if optimizer_name == "TKFAC" else None)
            finite = all(math.isfinite(v) for v in losses)
            result[optimizer_name] = {
                "status": "ok" if finite else "non-finite loss",
                "first": losses[0], "last": losses[-1]}
        except Exception as error:  # pylint: disable=broad-except
            result[optimizer_name] = {
                "status": f"error: {type(error).__name__}: {str(error)[:300]}",
                "trace": traceback.format_exc()[-1500:]}
        finally:
            py_logging.getLogger().removeHandler(handler)
            keras.mixed_precision.set_global_policy("float32")
            keras.config.set_floatx("float32")
        result[optimizer_name]["seconds"] = round(time.time() - started, 1)
        result[optimizer_name]["messages"] = sorted(set(handler.messages))
    return result


def _cell(entry):
    if entry["status"] != "ok":
        return entry["status"][:80]
    return f"{entry['first']:.4g} → {entry['last']:.4g}"


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    names = FLAGS.programs.split(",") if FLAGS.programs else list(PROGRAMS)
    optimizers = list(FLAGS.optimizers)
    epochs = max(1, FLAGS.steps // 8)
    tkfac = json.loads(FLAGS.tkfac)
    settings = f" TKFAC's arguments: {tkfac}." if tkfac else ""
    lines = [
        f"`python tools/program_sweep.py` ({len(names)} programs, {epochs} epochs of 8 "
        f"steps of {BATCH}; keras_tkfac {_commit()}). Training loss of the first → "
        "last epoch (training mode, mean over the epoch); TKFAC and KFAC at their "
        "defaults on the wrapped model, Adam(1e-3) on the same initial weights and "
        f"batches.{settings} \"Messages\" are what keras_tkfac logged (fallbacks), "
        "shortened.",
        "",
        "| program | Adam(1e-3) | " + " | ".join(f"{o}()" for o in optimizers)
        + " | messages |",
        "|---|---|" + "---|" * len(optimizers) + "---|"]
    for line in lines:
        print(line, flush=True)
    results = []
    for name in names:
        result = run(name, FLAGS.steps, optimizers, tkfac)
        results.append(result)
        messages = sorted({_short(m) for o in optimizers for m in result[o]["messages"]})
        line = (f"| {name} | {_cell(result['Adam'])} | "
                + " | ".join(_cell(result[o]) for o in optimizers)
                + f" | {'; '.join(messages) or 'none'} |")
        lines.append(line)
        print(line, flush=True)
        for o in optimizers:
            if "trace" in result[o]:
                print(result[o]["trace"], file=sys.stderr)
    summary = []
    for o in optimizers:
        failed = [r["program"] for r in results if r[o]["status"] != "ok"]
        better = sum(r[o]["status"] == "ok" and r["Adam"]["status"] == "ok"
                     and r[o]["last"] <= r["Adam"]["last"] for r in results)
        summary.append(
            f"{o}() trained {len(results) - len(failed)} of {len(results)} programs"
            + (f" (failed: {', '.join(failed)})" if failed else "")
            + f"; its last epoch's loss was at most Adam(1e-3)'s on {better}.")
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
