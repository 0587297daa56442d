"""Unshuffled, correlated batches: keras-io's weather forecasting program, offline.

keras-io's `timeseries_weather_forecasting` trains `LSTM(32) -> Dense(1)` (mean
squared error, Adam(1e-3), batch 256) on windows from
`keras.utils.timeseries_dataset_from_array`, which does not shuffle: each batch is
256 consecutive windows, so consecutive batches come from the same stretch of
weather. This tool builds that program on a synthetic 7-feature series of the same
layout (10-minute rows; a daily cycle, a seasonal cycle of `--period` rows, a slow
AR(1) "weather" process shared by the features, noise; the target is the
temperature 72 rows ahead of a 720-row window sampled every 6 rows) and trains the
same initial weights with Adam and `TKFAC()` variants, unshuffled and shuffled
(the same windows in a shuffled order), reporting the training and validation
losses per epoch and the output layer's weights at the end.

    python tools/correlated_batches.py [--epochs=3] [--period=5000] [--rows=40000]
"""

import json
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np
import tensorflow as tf
import keras

import keras_tkfac

_EPOCHS = flags.DEFINE_integer("epochs", 3, "Epochs per run.")
_PERIOD = flags.DEFINE_float("period", 5000.0, "Rows per seasonal cycle.")
_ROWS = flags.DEFINE_integer("rows", 40000, "Rows of the series (train: the first 71.5%).")
_RUNS = flags.DEFINE_string(
    "runs", json.dumps({"Adam(1e-3)": None, "TKFAC()": {},
                        'TKFAC(step_control="graft")': {"step_control": "graft"}}),
    "JSON {label: TKFAC keyword arguments, or null for Adam(1e-3)}.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the series and the weights.")

PAST, FUTURE, STEP, BATCH = 720, 72, 6, 256


def series(rows, period, seed):
    """`[rows, 7]` standardized features (by the training part's statistics) and the
    number of training rows."""
    rng = np.random.default_rng(seed)
    t = np.arange(rows)
    day, season = np.sin(2 * np.pi * t / 144), np.sin(2 * np.pi * t / period)
    shocks = rng.normal(size=rows)
    weather = np.zeros(rows)
    for i in range(1, rows):
        weather[i] = 0.995 * weather[i - 1] + 0.1 * shocks[i]
    temperature = 8 * season + 4 * day + 3 * weather + 0.3 * rng.normal(size=rows)
    pressure = -2 * weather + 0.5 * season + 0.3 * rng.normal(size=rows)
    humidity = (-0.5 * temperature + 2 * np.cos(2 * np.pi * t / 144)
                + rng.normal(size=rows))
    wind = np.abs(weather + rng.normal(size=rows))
    features = np.stack([pressure, temperature, np.exp(temperature / 20),
                         humidity - temperature, humidity, pressure - temperature,
                         wind], 1)
    train_rows = int(0.715 * rows)
    mean, std = features[:train_rows].mean(0), features[:train_rows].std(0)
    return ((features - mean) / std).astype("float32"), train_rows


def datasets(features, train_rows, shuffle, seed):
    """keras-io's windows: `(train, validation)` datasets of `BATCH` windows."""
    start = PAST + FUTURE

    def windows(x, first_target_row, shuffled):
        end = len(x) - PAST - FUTURE
        return keras.utils.timeseries_dataset_from_array(
            x[:end], features[first_target_row:first_target_row + end, 1:2],
            sequence_length=PAST // STEP, sampling_rate=STEP, batch_size=BATCH,
            shuffle=shuffled, seed=seed)

    return (windows(features[:train_rows], start, shuffle),
            windows(features[train_rows:], train_rows + start, False))


def model(seed):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((PAST // STEP, 7))
    outputs = keras.layers.Dense(1, name="head")(keras.layers.LSTM(32)(inputs))
    return keras.Model(inputs, outputs)


def run(label, config, shuffle, features, train_rows, weights, seed):
    net = model(seed)
    net.set_weights(weights)
    if config is None:
        optimizer = keras.optimizers.Adam(1e-3)
    else:
        net = keras_tkfac.wrap(net)
        optimizer = keras_tkfac.TKFAC(**{"seed": seed, **config})
    net.compile(optimizer=optimizer, loss="mse")
    train, val = datasets(features, train_rows, shuffle, seed)
    start = time.perf_counter()
    history = net.fit(train, epochs=_EPOCHS.value, validation_data=val, verbose=0)
    seconds = time.perf_counter() - start
    head = getattr(net, "model", net).get_layer("head")
    kernel, bias = head.get_weights()
    return (f"| {label} | {'yes' if shuffle else 'no'} | "
            + " / ".join(f"{v:.3f}" for v in history.history["loss"]) + " | "
            + " / ".join(f"{v:.3f}" for v in history.history["val_loss"])
            + f" | {np.linalg.norm(kernel):.2f} | {float(bias[0]):+.3f} | "
            f"{seconds:.0f} |")


def main(argv):
    del argv
    tf.get_logger().setLevel("ERROR")
    logging.set_verbosity(logging.ERROR)
    seed = _SEED.value
    features, train_rows = series(_ROWS.value, _PERIOD.value, seed)
    if _ROWS.value - train_rows < 2 * PAST + FUTURE:
        raise ValueError("--rows must leave the validation part (the last 28.5%) at "
                         f"least {2 * PAST + FUTURE} rows for one window. Received: "
                         f"--rows={_ROWS.value}")
    weights = model(seed).get_weights()
    lines = [
        f"`python tools/correlated_batches.py --epochs={_EPOCHS.value} "
        f"--period={_PERIOD.value:g} --rows={_ROWS.value} --seed={seed}`", "",
        f"keras-io weather forecasting shaped: LSTM(32) -> Dense(1), MSE, batch "
        f"{BATCH}, {train_rows} training rows ({_PERIOD.value:g} rows a season), "
        "the same initial weights in every run; losses per epoch (training: Keras's "
        "running mean; validation: the later 28.5% of the series).", "",
        "| optimizer | shuffled | training loss | validation loss | head kernel norm "
        "| head bias | seconds |",
        "|---|---|---|---|---:|---:|---:|"]
    for shuffle in (False, True):
        for label, config in json.loads(_RUNS.value).items():
            lines.append(run(label, config, shuffle, features, train_rows, weights,
                             seed))
            print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
