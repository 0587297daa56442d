"""Memory a process keeps for each model it trains and drops (a hyperparameter search).

Builds, trains for one epoch and drops `--models` small models one after another in
one process, for each optimizer in a fresh process of its own (Adam(1e-3), or
`keras_tkfac.wrap` + `TKFAC()`), and prints the resident memory after every fifth
model, the growth per model after the first five (a least-squares slope), and how
many models of the program are still alive at the end (weak references; with
nothing holding them, 0). TensorFlow itself keeps each traced training graph through
the gradient functions of `tf.custom_gradient` ops (its gradient registry is never
cleared), so even Adam's slope is not zero; a larger training graph keeps more.

    python tools/model_churn.py [--models=25] [--optimizers=Adam,TKFAC]
"""

import gc
import json
import os
import subprocess
import sys
import weakref

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402
import numpy as np  # noqa: E402

_MODELS = flags.DEFINE_integer("models", 25, "Models built, trained and dropped.")
_OPTIMIZERS = flags.DEFINE_list("optimizers", ["Adam", "TKFAC"], "Optimizers.")
_CHILD = flags.DEFINE_string("child", None, "Internal: run one optimizer here.")


def _rss_mb():
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) / 1024


def _train_and_drop(optimizer_name, x, y):
    import keras
    import keras_tkfac
    layers = keras.layers
    inner = keras.Sequential([
        keras.Input((x.shape[1],)), layers.Dense(64, activation="relu"),
        layers.Dense(64, activation="relu"), layers.Dense(4)])
    if optimizer_name == "Adam":
        model, optimizer = inner, keras.optimizers.Adam(1e-3)
    else:
        model, optimizer = keras_tkfac.wrap(inner), keras_tkfac.TKFAC(seed=0)
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    return weakref.ref(inner)


def child(optimizer_name, models):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 32)).astype("float32")
    y = x[:, :4].argmax(axis=1).astype("int32")
    refs, points = [], []
    for i in range(1, models + 1):
        refs.append(_train_and_drop(optimizer_name, x, y))
        gc.collect()
        if i % 5 == 0:
            points.append((i, _rss_mb()))
    later = [(i, mb) for i, mb in points if i > 5]
    slope = float(np.polyfit(*zip(*later), 1)[0]) if len(later) > 1 else float("nan")
    return {"points": points, "slope": slope,
            "alive": sum(ref() is not None for ref in refs)}


def main(argv):
    del argv
    if _CHILD.value:
        print(json.dumps(child(_CHILD.value, _MODELS.value)))
        return
    print(f"`python tools/model_churn.py {' '.join(sys.argv[1:])}`\n")
    print("| optimizer | resident MB after models 5, 10, ... | MB per model after the "
          "fifth | models still alive |")
    print("|---|---|---:|---:|")
    for name in _OPTIMIZERS.value:
        out = subprocess.run(
            [sys.executable, __file__, f"--child={name}", f"--models={_MODELS.value}"],
            check=True, capture_output=True, text=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
        points = ", ".join(f"{mb:.0f}" for _, mb in result["points"])
        print(f"| {name} | {points} | {result['slope']:.1f} | "
              f"{result['alive']} of {_MODELS.value} |")


if __name__ == "__main__":
    app.run(main)
