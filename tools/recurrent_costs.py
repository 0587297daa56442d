"""What preconditioning recurrent layers costs: step times of a BiLSTM classifier.

The suite's text classifier (Embedding, two bidirectional LSTMs, a dense head) on
synthetic token sequences, trained by Adam, by TKFAC with the LSTMs on its Adam
partner (the default) and by TKFAC with the recurrent blocks registered
(`keras_tkfac.register_recurrent_blocks()`). As `step_costs.py` does, one step of
every kind (plain, statistics, inverse) of every configuration is timed in turn,
round after round, and medians are reported with their ratio to Adam's step; a
statistics step of the recurrent blocks runs the layers' recurrence as a `tf.scan`
outside Keras's loop (`keras_tkfac.recurrent`). Each TKFAC configuration also runs
as traced before 2026-12-05 ("persistent tape": one persistent tape, the statistics
from the step's own forward pass; `keras_tkfac.statistics.takes_own_pass`), in the
same rounds.

    python tools/recurrent_costs.py [--rounds=30] [--smoke] [--out=FILE]
"""

import contextlib
import os
import sys

from absl import app
import numpy as np
import tensorflow as tf
import keras

import benchlib
import step_costs
import keras_tkfac
from keras_tkfac import statistics

# `--rounds`, `--out` and `--smoke` (tiny model and data, 2 rounds) are the flags
# of step_costs.py; its other flags are ignored.
_ROUNDS, _SMOKE = step_costs._ROUNDS, step_costs._SMOKE


def _model(vocab, embed_dim, units, steps):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((steps,), dtype="int32")
    h = keras.layers.Embedding(vocab, embed_dim)(inputs)
    h = keras.layers.Bidirectional(keras.layers.LSTM(units, return_sequences=True))(h)
    h = keras.layers.Bidirectional(keras.layers.LSTM(units))(h)
    return keras.Model(inputs, keras.layers.Dense(1)(h))


@contextlib.contextmanager
def _traced_as(name):
    """Traces a "persistent tape" configuration's step as before 2026-12-05."""
    own = statistics.takes_own_pass
    if name.endswith("persistent tape"):
        statistics.takes_own_pass = lambda model: False
    try:
        yield
    finally:
        statistics.takes_own_pass = own


CONFIGS = ("Adam", "TKFAC", "TKFAC, persistent tape", "TKFAC recurrent",
           "TKFAC recurrent, persistent tape")


def _setup(name, initial, data, batch_size):
    model = keras.models.clone_model(initial)
    model.set_weights(initial.get_weights())
    exclude = [] if name == "Adam" or "recurrent" in name else [keras.layers.LSTM]
    wrapped = keras_tkfac.wrap(model, exclude=exclude)
    optimizer = (keras.optimizers.Adam(1e-3) if name == "Adam"
                 else keras_tkfac.TKFAC(seed=0))
    wrapped.compile(optimizer=optimizer,
                    loss=keras.losses.BinaryCrossentropy(from_logits=True))
    batches = benchlib.batches(data, batch_size, 0)
    # Builds the optimizer and traces the step (with inverses and statistics).
    with _traced_as(name):
        wrapped.fit(batches, epochs=1, steps_per_epoch=3, verbose=0)
    return wrapped, iter(batches)


def main(argv):
    del argv
    smoke = _SMOKE.value
    vocab, embed_dim, units, steps, batch_size = ((50, 8, 4, 6, 8) if smoke
                                                  else (20000, 128, 64, 40, 32))
    rng = np.random.default_rng(0)
    x = rng.integers(1, vocab, size=(512, steps)).astype("int32")
    y = rng.integers(0, 2, size=(512, 1)).astype("float32")
    keras_tkfac.register_recurrent_blocks()
    initial = _model(vocab, embed_dim, units, steps)
    runs = {name: _setup(name, initial, (x, y), batch_size) for name in CONFIGS}
    rounds = 2 if smoke else _ROUNDS.value
    med = step_costs.interleaved_medians(runs, rounds)
    adam = med["Adam", "plain"]
    lines = [
        f"`python tools/recurrent_costs.py {' '.join(sys.argv[1:])}`", "",
        f"BiLSTM({units}) x2, Embedding {vocab}x{embed_dim}, {steps} time steps, "
        f"batch {batch_size}; {rounds} interleaved rounds, {os.cpu_count()} CPU "
        f"cores, TensorFlow {tf.__version__}, keras_tkfac "
        f"{benchlib.source_version()}; medians in ms (× Adam's step).", "",
        "| configuration | preconditioned layers | plain | statistics | inverse | "
        "statistics / plain | mean at its periods |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| Adam | | {adam:.1f} (1.00) | | | | {adam:.1f} (1.00) |",
    ]
    for name in CONFIGS[1:]:
        optimizer = runs[name][0].optimizer
        plain, stats = med[name, "plain"], med[name, "statistics"]
        inverse = med[name, "inverse"]
        mean = (plain + (stats - plain) / optimizer.factor_update_freq
                + (inverse - stats) / optimizer.inverse_update_freq)
        lines.append(
            f"| {name} | {len(optimizer._slots)} | {plain:.1f} ({plain / adam:.2f}) | "
            f"{stats:.1f} ({stats / adam:.2f}) | {inverse:.1f} ({inverse / adam:.2f}) "
            f"| {stats / plain:.2f} | {mean:.1f} ({mean / adam:.2f}) |")
    step_costs.report(lines)


if __name__ == "__main__":
    app.run(main)
