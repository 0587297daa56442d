"""Step time of a keras-io-shaped convnet fed by `tf.data` with a partial last batch.

A `tf.data` pipeline whose size is not a multiple of the batch (keras-io's
examples batch without `drop_remainder`) traces the training step with an unknown
batch size. `Dropout` then takes `tf.shape` of its input, and under the nested
forward-mode accumulators of the curvature products (`products.NESTED`) TensorFlow
failed on that op's output-less tangent function, so every step fell back to one
forward-mode pass per direction. Since 2026-12-01 such ops get zero tangents
(`keras_tkfac.tangents.INTEGER_OUTPUTS`) and the products take one nested pass.

This tool times `fit` on keras-io's MNIST convnet (Conv 32, pool, Conv 64, pool,
Flatten, Dropout(0.5), softmax; batch 32; `TKFAC()` at its defaults; synthetic
images, 20 batches and 7 examples) "before" (the new forward-mode rules removed,
in a process of its own, since TensorFlow caches its tangent functions) and
"after", alternated round by round: the first `fit` call of one step (the trace),
then `--epochs` epochs of 20 steps each; it prints the median over the rounds'
epochs (the first excluded) of the mean step, per configuration.

    python tools/unknown_batch.py [--rounds=3] [--epochs=10] [--smoke]
"""

import json
import os
import subprocess
import sys
import time

from absl import app
from absl import flags
import numpy as np

_ROUNDS = flags.DEFINE_integer("rounds", 3, "Alternated rounds.")
_EPOCHS = flags.DEFINE_integer("epochs", 10, "Timed epochs of 20 steps per round.")
_SMOKE = flags.DEFINE_bool("smoke", False, "One round of 2 epochs of 3 steps.")
_CHILD = flags.DEFINE_enum("child", None, ["before", "after"],
                           "(internal) run one configuration and print its times.")

CONFIGS = ("before", "after")


def _child(config, epochs, steps):
    """One configuration's first-step seconds and epochs' mean step (ms)."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    import keras  # pylint: disable=import-outside-toplevel

    import keras_tkfac  # pylint: disable=import-outside-toplevel
    from keras_tkfac import products  # pylint: disable=import-outside-toplevel
    from keras_tkfac import tangents  # pylint: disable=import-outside-toplevel

    if config == "before":
        for name in tangents.INTEGER_OUTPUTS + ("Cast",):
            tangents.JVPS.pop(name, None)
    passes, original = [], products._passes  # pylint: disable=protected-access

    def recorded(forward, outputs, primals, groups, *args, **kwargs):
        passes.append(len(groups))
        return original(forward, outputs, primals, groups, *args, **kwargs)

    products._passes = recorded  # pylint: disable=protected-access
    rng = np.random.default_rng(0)
    n = 32 * steps + 7
    x = rng.normal(size=(n, 28, 28, 1)).astype("float32")
    y = rng.integers(0, 10, size=n)
    keras.utils.set_random_seed(0)
    model = keras_tkfac.wrap(keras.Sequential([
        keras.Input((28, 28, 1)), keras.layers.Conv2D(32, 3, activation="relu"),
        keras.layers.MaxPooling2D(2), keras.layers.Conv2D(64, 3, activation="relu"),
        keras.layers.MaxPooling2D(2), keras.layers.Flatten(),
        keras.layers.Dropout(0.5), keras.layers.Dense(10, activation="softmax")]))
    model.compile(optimizer=keras_tkfac.TKFAC(), loss="sparse_categorical_crossentropy")
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
    start = time.perf_counter()
    model.fit(data.take(1), epochs=1, verbose=0)
    first = time.perf_counter() - start
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        model.fit(data.take(steps), epochs=1, verbose=0)
        times.append((time.perf_counter() - start) / steps * 1e3)
    return {"first_s": first, "step_ms": times,
            "nested": bool(passes) and passes[-1] == 1}


def main(argv):
    del argv
    epochs, steps, rounds = _EPOCHS.value, 20, _ROUNDS.value
    if _SMOKE.value:
        epochs, steps, rounds = 2, 3, 1
    if _CHILD.value:
        print("RESULT " + json.dumps(_child(_CHILD.value, epochs, steps)))
        return
    if rounds < 1 or epochs < 2:
        raise ValueError(f"--rounds must be >= 1 and --epochs >= 2. Received: "
                         f"{rounds}, {epochs}")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    results = {config: [] for config in CONFIGS}
    for _ in range(rounds):
        for config in CONFIGS:
            run = subprocess.run(
                [sys.executable, os.path.abspath(__file__), f"--child={config}",
                 f"--epochs={epochs}"] + (["--smoke"] if _SMOKE.value else []),
                env=env, capture_output=True, text=True, check=True)
            line = next(l for l in run.stdout.splitlines() if l.startswith("RESULT "))
            results[config].append(json.loads(line[len("RESULT "):]))
    lines = [f"`python tools/unknown_batch.py --rounds={rounds} --epochs={epochs}`"
             + (" (smoke)" if _SMOKE.value else ""), "",
             "| configuration | products | first step (s) | mean step (ms) |",
             "|---|---|---:|---:|"]
    medians = {}
    for config in CONFIGS:
        runs = results[config]
        medians[config] = float(np.median([t for r in runs for t in r["step_ms"][1:]]))
        nested = "one nested pass" if all(r["nested"] for r in runs) else (
            "one pass per direction")
        first = float(np.median([r["first_s"] for r in runs]))
        lines.append(f"| {config} | {nested} | {first:.1f} | {medians[config]:.1f} |")
    lines += ["", f"after / before, mean step: "
              f"{medians['after'] / medians['before']:.2f}"]
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
