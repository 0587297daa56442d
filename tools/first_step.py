"""Seconds of `fit`'s first step (the trace) on the suite's workloads, two ways.

Since 2026-12-01 `keras_tkfac.wrap`'s `fit` builds the model, metrics and optimizer
from the batches' shapes before the first step (`CurvatureModel._build_from_shapes`),
so `tf.function` traces the curvature step once. Keras's own path without a strategy
builds them inside the first trace, which makes `tf.function` trace a second time.
This tool times one `fit` call of one step (a fresh model each time) both ways,
"shapes" and "keras" (the latter by disabling the shape build), and Adam for scale,
alternating them round by round on the same weights and batches; medians over rounds.
It also counts the graph operations created while tracing (`ops`: Keras's and the
optimizer's; a measure of the trace's size that does not depend on the machine's load).

`--applications` adds `keras.applications` models (`weights=None`, `--size` inputs,
5 classes, `--batch` examples a step, synthetic images; `--workloads=` alone runs
only them): the first step of a large model, where tracing and TensorFlow's graph
optimisation take longest. Under `--smoke` each is a small convnet instead.

    python tools/first_step.py [--workloads=mlp,lstm] [--rounds=3] [--smoke]
    python tools/first_step.py --workloads= --applications=ResNet50V2 --size=32 \
        --batch=8 --rounds=1 --modes=Adam,shapes
"""

import contextlib
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
_MODES = flags.DEFINE_list(
    "modes", ["Adam", "keras", "shapes"],
    "Which first steps to time: `Adam`, `keras` (TKFAC built inside the trace) and "
    "`shapes` (TKFAC built from the shapes first: what `fit` does).")
_APPLICATIONS = flags.DEFINE_list(
    "applications", [], "keras.applications models to time as well, e.g. ResNet50V2.")
_SIZE = flags.DEFINE_integer("size", 32, "The applications' input height and width.")
_BATCH = flags.DEFINE_integer("batch", 8, "The applications' batch size.")
_ORIGINAL_SPEC = wrapping._element_spec  # pylint: disable=protected-access


def _application(name, size, batch, smoke, seed):
    """A `suite.Workload` of `keras.applications.<name>` on synthetic images (a
    small convnet under `smoke`); only `build`, `loss`, `train` and `batch_size`
    are used here."""
    def build():
        if smoke:
            inputs = keras.Input((size, size, 3))
            h = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(inputs)
            h = keras.layers.BatchNormalization()(h)
            h = keras.layers.GlobalAveragePooling2D()(h)
            return keras.Model(inputs, keras.layers.Dense(5)(h))
        return getattr(keras.applications, name)(
            weights=None, input_shape=(size, size, 3), classes=5,
            classifier_activation=None)

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2 * batch, size, size, 3)).astype("float32")
    y = rng.integers(0, 5, size=2 * batch)
    return suite.Workload(
        build, keras.losses.SparseCategoricalCrossentropy(from_logits=True), (x, y),
        None, 1, batch, 1, None, f"keras.applications.{name}")


@contextlib.contextmanager
def _counting_ops():
    """Counts the graph operations created inside the block (`count[0]`)."""
    from tensorflow.python.framework import ops as tf_ops  # pylint: disable=import-outside-toplevel
    original = tf_ops.Graph._create_op_internal  # pylint: disable=protected-access
    count = [0]

    def counted(graph, *args, **kwargs):
        count[0] += 1
        return original(graph, *args, **kwargs)

    tf_ops.Graph._create_op_internal = counted  # pylint: disable=protected-access
    try:
        yield count
    finally:
        tf_ops.Graph._create_op_internal = original  # pylint: disable=protected-access


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
        with _counting_ops() as created:
            start = time.perf_counter()
            wrapped.fit(data, epochs=1, steps_per_epoch=1, verbose=0)
            took = time.perf_counter() - start
        return took, getattr(optimizer, "curvature_updates", 0), created[0]
    finally:
        wrapping._element_spec = _ORIGINAL_SPEC  # pylint: disable=protected-access


def main(argv):
    del argv
    tf.get_logger().setLevel("ERROR")
    logging.set_verbosity(logging.ERROR)  # (the fallback's notice, once a model)
    smoke, seed = suite._SMOKE.value, suite._SEED.value  # pylint: disable=protected-access
    names = suite._WORKLOADS.value  # pylint: disable=protected-access
    applications = _APPLICATIONS.value
    for name in applications:
        if not smoke and not hasattr(keras.applications, name):
            raise ValueError(f"--applications takes keras.applications models; "
                             f"received {name!r}")
    modes = _MODES.value
    if set(modes) - {"Adam", "keras", "shapes"} or "shapes" not in modes:
        raise ValueError(f"--modes must include `shapes`, among Adam, keras, shapes; "
                         f"received {modes}")
    lines = [
        "`python tools/first_step.py " + " ".join(
            f"--{k}={v}" for k, v in (("workloads", ",".join(names)),
                                      ("rounds", _ROUNDS.value),
                                      ("modes", ",".join(modes))))
        + (f" --applications={','.join(applications)} --size={_SIZE.value} "
           f"--batch={_BATCH.value}" if applications else "")
        + (" --smoke" if smoke else "") + "`", "",
        f"Seed {seed}; {_ROUNDS.value} alternated rounds; {os.cpu_count()} CPU cores, "
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}, keras_tkfac "
        f"{benchlib.source_version()}; seconds of a one-step `fit` (mostly tracing), median "
        "over rounds; `keras`: built inside the first trace (two traces), `shapes`: "
        "built from the batch's shapes first (one trace); `traces`: `update_curvature` "
        "calls; `ops`: graph operations created during the one-step `fit`.", "",
        "| workload | Adam (s) | ops | TKFAC, keras's build (s) | traces | TKFAC, from "
        "shapes (s) | traces | ops | shapes / keras | shapes / Adam |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ratios = {"keras": [], "Adam": []}
    chosen = [(name, None) for name in names] + [
        (name, _application(name, _SIZE.value, _BATCH.value, smoke, seed))
        for name in applications]
    for name, workload in chosen:
        if workload is None:
            workload = getattr(suite, name)(smoke, seed)
            if smoke:
                workload = workload._replace(batch_size=32)
        keras.utils.set_random_seed(seed)
        weights = workload.build().get_weights()
        seconds = {m: [] for m in modes}
        traces, created = {}, {}
        for _ in range(_ROUNDS.value):
            for mode in modes:
                took, traces[mode], created[mode] = _first_step(
                    workload, weights, mode, seed)
                seconds[mode].append(took)
        median = {m: float(np.median(v)) for m, v in seconds.items()}

        def cell(mode, value, spec):
            return format(value, spec) if mode in modes else "–"

        ratio = {m: median["shapes"] / median[m] for m in ("keras", "Adam") if m in modes}
        for m, r in ratio.items():
            ratios[m].append(r)
        lines.append(
            f"| {name} | {cell('Adam', median.get('Adam'), '.1f')} | "
            f"{cell('Adam', created.get('Adam'), 'd')} | "
            f"{cell('keras', median.get('keras'), '.1f')} | "
            f"{cell('keras', traces.get('keras'), 'd')} | {median['shapes']:.1f} | "
            f"{traces['shapes']} | {created['shapes']} | "
            f"{cell('keras', ratio.get('keras'), '.2f')} | "
            f"{cell('Adam', ratio.get('Adam'), '.2f')} |")
    lines.append("")
    for m, values in ratios.items():
        if values:
            lines.append(f"Geometric mean of shapes / {m}: "
                         f"{float(np.exp(np.mean(np.log(values)))):.2f}.")
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
