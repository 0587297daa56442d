"""Measures TKFAC under MirroredStrategy: step time, all-reduce bytes, inverse split.

Runs in one process with the CPU split into two logical devices (or on two GPUs when
present), on the same model, data and global batch:

1. median ms/step of TKFAC (default update frequencies) on 1 device and on 2 replicas,
   and of Adam on both, which shows the cost of replication itself;
2. bytes all-reduced per factor update (the statistics of every layer, one batched
   all-reduce) and per inverse update (the split's sharing of inverses);
3. the inversion cost per replica, with and without the split: the d^3 work model per
   replica, and the measured extra ms of a step that recomputes every inverse
   (`inverse_update_freq=1` against a run that never does after the first step).

On a CPU split into logical devices both replicas share the same cores, so (1) and (3)
show the overheads of replication, not a speed-up; on several GPUs the same command
measures the real thing.

    python tools/distributed_benchmark.py [--layers=8] [--width=512] [--steps=60]
"""

import time

from absl import app
from absl import flags
import numpy as np

_LAYERS = flags.DEFINE_integer("layers", 8, "Hidden Dense layers.")
_WIDTH = flags.DEFINE_integer("width", 512, "Widest hidden layer.")
_STEPS = flags.DEFINE_integer("steps", 60, "Timed steps per run.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 256, "Global batch size.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny model, few steps.")
_WARMUP = 5


def _devices(tf):
    gpus = tf.config.list_physical_devices("GPU")
    if len(gpus) >= 2:
        return ["/gpu:0", "/gpu:1"]
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    return ["/cpu:0", "/cpu:1"]


def main(argv):
    del argv
    import tensorflow as tf

    devices = _devices(tf)
    import keras

    import keras_tkfac

    layers, width, steps = _LAYERS.value, _WIDTH.value, _STEPS.value
    if _SMOKE.value:
        layers, width, steps = 3, 32, 12
    # Widths shrink with depth so the factors have many different sizes.
    widths = [max(16, width >> (i // 2)) for i in range(layers)]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(_BATCH_SIZE.value * 4, 784)).astype("float32")
    y = rng.integers(0, 10, size=(len(x),)).astype("int32")

    def run(strategy, optimizer="tkfac", **optimizer_args):
        with strategy.scope():
            keras.utils.set_random_seed(0)
            model = keras_tkfac.wrap(keras.Sequential(
                [keras.Input((784,))]
                + [keras.layers.Dense(w, activation="relu") for w in widths]
                + [keras.layers.Dense(10)]))
            if optimizer == "tkfac":
                optimizer = keras_tkfac.TKFAC(seed=0, **optimizer_args)
            model.compile(optimizer=optimizer,
                          loss=keras.losses.SparseCategoricalCrossentropy(
                              from_logits=True))
        data = tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(
            _BATCH_SIZE.value)
        times = []

        class Timer(keras.callbacks.Callback):
            def on_train_batch_begin(self, batch, logs=None):
                self.start = time.perf_counter()

            def on_train_batch_end(self, batch, logs=None):
                times.append(time.perf_counter() - self.start)

        model.fit(data, epochs=1, steps_per_epoch=steps + _WARMUP, verbose=0,
                  callbacks=[Timer()])
        return 1e3 * float(np.median(times[_WARMUP:])), model

    single = tf.distribute.get_strategy()
    mirrored = tf.distribute.MirroredStrategy(devices)
    step_1, model = run(single)
    step_2, _ = run(mirrored)
    adam_1, _ = run(single, "adam")
    adam_2, _ = run(mirrored, "adam")
    slots = model.optimizer._slots
    factor_bytes = sum(4 * int(np.prod(v.shape)) for s in slots for v in s.factors)
    inverse_bytes = sum(4 * int(np.prod(v.shape)) for s in slots for v in s.inverses)
    dims = [int(v.shape[0]) for s in slots for v in s.inverses]
    owner = keras_tkfac.distributed.split_work([d**3 for d in dims], 2)
    split_work = [sum(d**3 for d, o in zip(dims, owner) if o == r) for r in range(2)]

    never, _ = run(mirrored, inverse_update_freq=10**9)
    every_split, _ = run(mirrored, inverse_update_freq=1)
    every_unsplit, _ = run(mirrored, inverse_update_freq=1, split_inverses=False)
    total = sum(d**3 for d in dims)
    print("\n".join([
        f"TKFAC, MLP 784-{'-'.join(map(str, widths))}-10, global batch "
        f"{_BATCH_SIZE.value}, devices {', '.join(devices)}; median of {steps} steps.",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| ms/step, 1 device (defaults: factors every 10, inverses every 100) "
        f"| {step_1:.1f} |",
        f"| ms/step, 2 replicas (same global batch) | {step_2:.1f} |",
        f"| Adam ms/step, 1 device / 2 replicas (replication overhead alone) "
        f"| {adam_1:.1f} / {adam_2:.1f} |",
        f"| bytes all-reduced per factor update | {factor_bytes:,} |",
        f"| bytes all-reduced per inverse update (split) | {inverse_bytes:,} |",
        f"| inversion work per replica, unsplit (sum of d^3) | {total:,} |",
        f"| inversion work per replica, split (max over replicas) "
        f"| {max(split_work):,} ({max(split_work) / total:.0%}) |",
        f"| extra ms of a step inverting every factor, unsplit "
        f"| {every_unsplit - never:.1f} |",
        f"| extra ms of a step inverting every factor, split "
        f"| {every_split - never:.1f} |",
    ]))


if __name__ == "__main__":
    app.run(main)
