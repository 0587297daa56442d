"""A workload suite: TKFAC and KFAC against Adam, AdamW, Muon and SGD on programs
shaped like the keras-io examples that users copy, all on offline data.

Workloads (`--workloads`), each a fresh Keras model and its data:

- `mlp`: MLP 784-512-512-10 (relu, softmax) on MNIST-5k, sparse cross-entropy.
- `autoencoder`: the deep autoencoder 784-1000-500-250-30 (`benchlib.autoencoder`) on
  MNIST-5k, sigmoid cross-entropy.
- `conv_autoencoder`: keras-io "Convolutional autoencoder for image denoising"
  (Conv2D/MaxPool x2, Conv2DTranspose x2, sigmoid Conv2D), noisy MNIST-5k input,
  clean target, binary cross-entropy.
- `convnet`: keras-io `mnist_convnet` (two Conv2D + MaxPool, Dropout 0.5, softmax).
- `resnet`: ResNet-8 (`benchlib.resnet8`) on MNIST-5k.
- `timeseries`: keras-io `timeseries_classification_from_scratch` (3x Conv1D-BN-ReLU,
  global average pooling, softmax) on synthetic 3-class series of 500 steps: a
  sinusoid of random frequency, phase, amplitude, offset and trend, whose class is
  its shape (pure, with a second harmonic, or amplitude-modulated), plus noise.
- `transformer`: keras-io `text_classification_with_transformer` (token and position
  embeddings, vocabulary 20k, width 32, one block with 2 heads) on synthetic token
  sequences of 100-200 tokens.
- `lstm`: keras-io `bidirectional_lstm_imdb` (Embedding 20k x 128, two bidirectional
  LSTM(64), sigmoid) on synthetic sequences of 50-80 tokens.

Not in the default eight (issue 8's targets count those), run by name:

- `language_model`: keras-io `text_generation_with_miniature_gpt` (token and position
  embeddings, one causal transformer block, a `Dense(vocabulary)` of logits, sparse
  cross-entropy from logits) at vocabulary 8000, width 64 and 32 tokens, on synthetic
  text: each token has four successors (Zipf-distributed ids) and is followed by one
  of them, or by a Zipf draw one time in ten. Its output layer (64 x 8000) is wider
  than `max_factor_dim` and takes the partner; its logits dominate the step's cost.

The token data: Zipf-distributed tokens over the 20k vocabulary; each class owns 20
indicative tokens, half of them frequent (ranks 50-500) and half rare (ranks
2,000-20,000, which the Zipf background almost never draws), and 5-12% of each
sequence's positions get its class's tokens (fewer the other class's); the label is the
class whose indicative tokens occur more often (ties go to the class that was inserted
more). So the embedding's rare rows must learn.

Optimizers (`--optimizers`): `TKFAC` and `KFAC` at their defaults (`--tkfac` and
`--kfac` take constructor keyword arguments as JSON), Adam and AdamW (Keras defaults)
and Keras's Muon (its defaults) with small learning-rate grids, SGD with momentum 0.9;
`--grid` replaces grids (the AdamW default grid is the best Adam learning rate). Every
model is wrapped with `keras_tkfac.wrap` (it trains exactly like Keras with a
first-order optimizer); every run of a workload starts from the same initial weights
(built once, restored before each run), sees the same batches (a fresh seeded
pipeline per run) and the same dropout seeds, one run after another in this process.

Measured per run: the validation loss (and accuracy for classifiers) at step 0 and
every `eval_every` steps, in inference mode, outside the clock; the best validation
loss; the final training loss (training-mode mean over the last tenth of the steps);
the median step time, step 1 (tracing) excluded; steps and seconds to the target.
Seconds count training steps only: step 1 and evaluations are excluded. The best
configuration of each optimizer's grid is the one with the lowest best validation
loss (runs that diverged or failed count only if no run succeeded).

Target rule: per workload, `target = 1.02 x` the lowest validation loss that the
best-of-grid Adam run reaches. A run reaches it at the first evaluation whose
validation loss is <= target (so steps are multiples of `eval_every`). Ratios to
Adam compare with the best Adam run's steps and seconds to the same target; a run
that does not reach it counts as its whole length (marked `>`), with the run length
of a run that stopped early (divergence) taken as all its steps at its median step
time. A run that raises is recorded as `error: <message>`, a non-finite training
loss as `diverged`; the suite goes on.

Writes `<output_dir>/suite.md` (also printed), `suite.json` (every run's curves and
numbers) and `suite.png` (validation loss of each optimizer's best configuration
against steps and seconds, one pair of panels per workload).

    python tools/suite.py [--workloads=mlp,lstm] [--optimizers=TKFAC,Adam]
        [--steps_scale=0.5] [--tkfac='{"learning_rate": 0.03}'] [--smoke]
        [--normalization_blocks] [--recurrent_blocks]
        [--exclude=LayerNormalization,BatchNormalization]
"""

import collections
import functools
import itertools
import json
import math
import os
import sys
import time

from absl import app
from absl import flags
from matplotlib.figure import Figure
import numpy as np
import tensorflow as tf
import keras
from keras import layers

import benchlib
import keras_tkfac

MARGIN = 1.02
GRIDS = {
    "TKFAC": {},
    "KFAC": {},
    "Adam": {"learning_rate": [1e-3, 3e-3, 1e-2]},
    # "adam": the learning rate of the best Adam run (1e-3 if Adam is not run).
    "AdamW": {"learning_rate": ["adam"]},
    "Muon": {"learning_rate": [1e-3, 1e-2]},
    "SGD": {"learning_rate": [0.01, 0.1]},
}
# Adam first: AdamW's default grid and the target depend on it.
ORDER = ["Adam", "TKFAC", "KFAC", "AdamW", "Muon", "SGD"]
WORKLOADS = ["mlp", "autoencoder", "conv_autoencoder", "convnet", "resnet",
             "timeseries", "transformer", "lstm"]

# Run only when named (`--workloads`).
OPTIONAL_WORKLOADS = ["language_model"]

_WORKLOADS = flags.DEFINE_list("workloads", WORKLOADS, "Workloads to run.")
_OPTIMIZERS = flags.DEFINE_list(
    "optimizers", ["TKFAC", "KFAC", "Adam", "AdamW", "Muon", "SGD"],
    "Optimizers to run (the target needs Adam).",
)
_STEPS_SCALE = flags.DEFINE_float("steps_scale", 1.0, "Multiplies every step count.")
_SMOKE = flags.DEFINE_bool(
    "smoke", False, "Tiny data and models, 3 steps, one configuration each (tests)."
)
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "results", "Output directory.")
_TKFAC = flags.DEFINE_string(
    "tkfac", "{}", 'TKFAC keyword arguments as JSON, e.g. \'{"learning_rate": 0.03}\'.'
)
_KFAC = flags.DEFINE_string("kfac", "{}", "KFAC keyword arguments as JSON.")
_GRID = flags.DEFINE_string(
    "grid", None, 'JSON replacing grids, e.g. \'{"Adam": {"learning_rate": [3e-3]}, '
    '"TKFAC": {"damping": [0.01, 0.1]}}\' (on top of --tkfac/--kfac).',
)
_EXCLUDE = flags.DEFINE_list(
    "exclude", [], "Layer classes (names in keras.layers) or layer names that "
    "keras_tkfac.wrap leaves to the first-order fallback, e.g. "
    "LayerNormalization,BatchNormalization.",
)
_NORMALIZATION_BLOCKS = flags.DEFINE_bool(
    "normalization_blocks", False, "Precondition LayerNormalization and "
    "BatchNormalization (keras_tkfac.register_normalization_blocks()).",
)
_RECURRENT_BLOCKS = flags.DEFINE_bool(
    "recurrent_blocks", False, "Precondition SimpleRNN, LSTM and GRU "
    "(keras_tkfac.register_recurrent_blocks()).",
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of data, weights, batches, samplers.")
_RUN_EAGERLY = flags.DEFINE_bool(
    "run_eagerly", False, "Train and evaluate without tf.function (no tracing: "
    "faster for --smoke tests; timings are then meaningless).",
)

Workload = collections.namedtuple(
    "Workload",
    "build loss train val steps batch_size eval_every accuracy description".split(),
)
Workload.__doc__ = """A model builder (`build()` makes a fresh model), its loss, the
train and validation arrays `(x, y)`, the run's shape, and `accuracy`: `"sparse"`
(argmax of class probabilities), `"binary"` (sigmoid probability > 0.5) or `None`."""

Run = collections.namedtuple(
    "Run", "workload optimizer config status evals step_losses step_seconds".split()
)


# Data ------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _mnist(seed):
    return benchlib.load_data("mnist5k", seed)


def _images(smoke, seed, n_val=1000):
    """MNIST-5k `(x_train, y_train), (x_val, y_val)`: 4,000 training images and
    `n_val` of the other 1,000; 128/64 in smoke mode."""
    data = _mnist(seed)
    n_train, n_val = (128, 64) if smoke else (len(data.x_train), n_val)
    return ((data.x_train[:n_train], data.y_train[:n_train]),
            (data.x_test[:n_val], data.y_test[:n_val]))


def synthetic_series(n, length, seed):
    """`n` z-normalised series `[n, length, 1]` and labels in {0, 1, 2}.

    A sinusoid with 10-40 cycles per series, random phase, amplitude, offset and
    linear trend; class 0 is the pure sinusoid, class 1 adds a second harmonic of
    relative amplitude 0.3-0.7, class 2 modulates the amplitude by 30-70% at 0.5-2
    cycles per series. Gaussian noise of 0.3-1.0 times the amplitude hides much of
    the shape.
    """
    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 1.0, length)[None, :]

    def uniform(low, high):
        return rng.uniform(low, high, (n, 1))

    y = rng.integers(0, 3, n)
    angle = 2 * np.pi * uniform(10, 40) * t + uniform(0, 2 * np.pi)
    wave = np.sin(angle)
    harmonic = uniform(0.3, 0.7) * np.sin(2 * angle + uniform(0, 2 * np.pi))
    modulation = 1 + uniform(0.3, 0.7) * np.sin(
        2 * np.pi * uniform(0.5, 2) * t + uniform(0, 2 * np.pi))
    wave = np.where(y[:, None] == 1, wave + harmonic, wave)
    wave = np.where(y[:, None] == 2, wave * modulation, wave)
    amplitude = uniform(0.5, 2.0)
    x = amplitude * wave + uniform(-1, 1) + uniform(-1, 1) * t
    x += uniform(0.3, 1.0) * amplitude * rng.standard_normal((n, length))
    x = (x - x.mean(1, keepdims=True)) / x.std(1, keepdims=True)
    return x[..., None].astype("float32"), y.astype("int32")


def synthetic_tokens(n, lengths, vocab, seed, indicative=20):
    """`n` pre-padded token sequences `[n, lengths[1]]` (0 pads) and labels in {0, 1}.

    Background tokens follow a Zipf-Mandelbrot law over ids `1..vocab-1` (id = rank).
    Each class owns `indicative` tokens, half frequent (ranks 50-500), half rare (ranks
    2,000 and up). A sequence of its drawn class gets 5-12% of its positions replaced
    by its class's tokens (at least 2) and fewer by the other class's at random
    positions; the label is the class whose
    tokens occur more often in the final sequence (background draws included), the
    drawn class on a tie.
    """
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, vocab)
    p = 1.0 / (ranks + 2.7)
    frequent = rng.permutation(np.arange(50, 500))[:indicative]
    rare = rng.permutation(np.arange(2000, vocab))[:indicative]
    half = indicative // 2
    owned = [np.concatenate([frequent[:half], rare[:half]]),
             np.concatenate([frequent[half:], rare[half:]])]
    maxlen = lengths[1]
    x = np.zeros((n, maxlen), "int32")
    background = rng.choice(ranks, size=(n, maxlen), p=p / p.sum())
    drawn = rng.integers(0, 2, n)
    y = np.empty(n, "int32")
    for i in range(n):
        length = rng.integers(lengths[0], lengths[1] + 1)
        seq = background[i, :length]
        major = max(2, round(length * rng.uniform(0.05, 0.12)))
        minor = rng.integers(0, major - 1)
        where = rng.choice(length, major + minor, replace=False)
        seq[where[:major]] = rng.choice(owned[drawn[i]], major)
        seq[where[major:]] = rng.choice(owned[1 - drawn[i]], minor)
        counts = [np.isin(seq, tokens).sum() for tokens in owned]
        y[i] = drawn[i] if counts[0] == counts[1] else int(counts[1] > counts[0])
        x[i, maxlen - length:] = seq
    return x, y


def _split(x, y, n_val):
    return (x[n_val:], y[n_val:]), (x[:n_val], y[:n_val])


# Workloads -------------------------------------------------------------------


def mlp(smoke, seed):
    (x, y), (xv, yv) = _images(smoke, seed)
    width = 32 if smoke else 512

    def build():
        return keras.Sequential([
            keras.Input((784,)),
            layers.Dense(width, activation="relu"),
            layers.Dense(width, activation="relu"),
            layers.Dense(10, activation="softmax"),
        ], name="mlp")

    flat = lambda images: images.reshape(len(images), -1)
    return Workload(build, keras.losses.SparseCategoricalCrossentropy(),
                    (flat(x), y), (flat(xv), yv), 120, 256, 10, "sparse",
                    f"MLP 784-{width}-{width}-10, MNIST-5k")


def autoencoder(smoke, seed):
    (x, _), (xv, _) = _images(smoke, seed)
    widths = (32, 16, 4) if smoke else (500, 250, 125, 30)
    x, xv = x.reshape(len(x), -1), xv.reshape(len(xv), -1)
    return Workload(lambda: benchlib.autoencoder(784, widths),
                    keras.losses.BinaryCrossentropy(from_logits=True), (x, x),
                    (xv, xv), 150, 128, 15, None,
                    f"autoencoder 784-{'-'.join(map(str, widths))}, MNIST-5k")


def conv_autoencoder(smoke, seed):
    (x, _), (xv, _) = _images(smoke, seed, n_val=500)
    rng = np.random.default_rng(seed)

    def noisy(images):
        noise = 0.4 * rng.standard_normal(images.shape).astype("float32")
        return np.clip(images + noise, 0.0, 1.0)

    filters = 4 if smoke else 16

    def build():
        inputs = keras.Input((28, 28, 1))
        h = layers.Conv2D(filters, 3, activation="relu", padding="same")(inputs)
        h = layers.MaxPooling2D(2, padding="same")(h)
        h = layers.Conv2D(filters, 3, activation="relu", padding="same")(h)
        h = layers.MaxPooling2D(2, padding="same")(h)
        h = layers.Conv2DTranspose(
            filters, 3, strides=2, activation="relu", padding="same")(h)
        h = layers.Conv2DTranspose(
            filters, 3, strides=2, activation="relu", padding="same")(h)
        outputs = layers.Conv2D(1, 3, activation="sigmoid", padding="same")(h)
        return keras.Model(inputs, outputs, name="conv_autoencoder")

    return Workload(build, keras.losses.BinaryCrossentropy(), (noisy(x), x),
                    (noisy(xv), xv), 100, 32, 10, None,
                    f"denoising conv autoencoder, {filters} filters, MNIST-5k + "
                    "N(0, 0.4) noise")


def convnet(smoke, seed):
    train, val = _images(smoke, seed)
    filters = (4, 8) if smoke else (32, 64)

    def build():
        return keras.Sequential([
            keras.Input((28, 28, 1)),
            layers.Conv2D(filters[0], 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Conv2D(filters[1], 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Flatten(),
            layers.Dropout(0.5),
            layers.Dense(10, activation="softmax"),
        ], name="convnet")

    return Workload(build, keras.losses.SparseCategoricalCrossentropy(), train, val,
                    100, 64, 10, "sparse",
                    f"mnist_convnet {filters[0]}-{filters[1]} filters, MNIST-5k")


def resnet(smoke, seed):
    train, val = _images(smoke, seed, n_val=500)
    width = 4 if smoke else 8
    return Workload(lambda: benchlib.resnet8((28, 28, 1), 10, width),
                    keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                    train, val, 100, 64, 20, "sparse",
                    f"ResNet-8 width {width}, MNIST-5k")


def timeseries(smoke, seed):
    n, n_val, length = (128, 64, 32) if smoke else (2000, 500, 256)
    train, val = _split(*synthetic_series(n + n_val, length, seed), n_val)
    filters = 8 if smoke else 64

    def build():
        inputs = keras.Input((length, 1))
        h = inputs
        for _ in range(3):
            h = layers.Conv1D(filters, 3, padding="same")(h)
            # keras-io uses the default momentum 0.99; over a few hundred steps the
            # moving statistics would lag and make inference-mode losses meaningless.
            h = layers.BatchNormalization(momentum=0.9)(h)
            h = layers.ReLU()(h)
        h = layers.GlobalAveragePooling1D()(h)
        outputs = layers.Dense(3, activation="softmax")(h)
        return keras.Model(inputs, outputs, name="timeseries")

    return Workload(build, keras.losses.SparseCategoricalCrossentropy(), train, val,
                    120, 32, 15, "sparse",
                    f"Conv1D x3 ({filters} filters), {n} synthetic series of {length}, "
                    "3 classes")


class TokenAndPositionEmbedding(layers.Layer):
    """keras-io's token embedding plus a learned position embedding."""

    def __init__(self, maxlen, vocab_size, embed_dim, **kwargs):
        super().__init__(**kwargs)
        self.token_emb = layers.Embedding(input_dim=vocab_size, output_dim=embed_dim)
        self.pos_emb = layers.Embedding(input_dim=maxlen, output_dim=embed_dim)

    def call(self, x):
        positions = self.pos_emb(keras.ops.arange(0, keras.ops.shape(x)[-1]))
        return self.token_emb(x) + positions


class TransformerBlock(layers.Layer):
    """keras-io's post-norm transformer block."""

    def __init__(self, embed_dim, num_heads, ff_dim, rate=0.1, **kwargs):
        super().__init__(**kwargs)
        self.att = layers.MultiHeadAttention(num_heads=num_heads, key_dim=embed_dim)
        self.ffn = keras.Sequential(
            [layers.Dense(ff_dim, activation="relu"), layers.Dense(embed_dim)])
        self.layernorm1 = layers.LayerNormalization(epsilon=1e-6)
        self.layernorm2 = layers.LayerNormalization(epsilon=1e-6)
        self.dropout1 = layers.Dropout(rate)
        self.dropout2 = layers.Dropout(rate)

    def call(self, inputs):
        attn_output = self.dropout1(self.att(inputs, inputs))
        out1 = self.layernorm1(inputs + attn_output)
        ffn_output = self.dropout2(self.ffn(out1))
        return self.layernorm2(out1 + ffn_output)


def transformer(smoke, seed):
    vocab, lengths = 20000, ((8, 16) if smoke else (64, 128))
    n, n_val = (128, 64) if smoke else (3000, 500)
    train, val = _split(*synthetic_tokens(n + n_val, lengths, vocab, seed), n_val)
    maxlen, embed_dim = lengths[1], 8 if smoke else 32

    def build():
        inputs = keras.Input((maxlen,), dtype="int32")
        h = TokenAndPositionEmbedding(maxlen, vocab, embed_dim)(inputs)
        h = TransformerBlock(embed_dim, 2, embed_dim)(h)
        h = layers.GlobalAveragePooling1D()(h)
        h = layers.Dropout(0.1)(h)
        h = layers.Dense(20, activation="relu")(h)
        h = layers.Dropout(0.1)(h)
        outputs = layers.Dense(2, activation="softmax")(h)
        return keras.Model(inputs, outputs, name="transformer")

    return Workload(build, keras.losses.SparseCategoricalCrossentropy(), train, val,
                    150, 32, 15, "sparse",
                    f"transformer, vocabulary {vocab}, width {embed_dim}, {n} "
                    f"synthetic sequences of {lengths[0]}-{lengths[1]} tokens")


def lstm(smoke, seed, unroll=False):
    vocab, lengths = 20000, ((10, 12) if smoke else (24, 40))
    n, n_val = (128, 64) if smoke else (2000, 500)
    (x, y), (xv, yv) = _split(*synthetic_tokens(n + n_val, lengths, vocab, seed), n_val)
    embed_dim, units = (8, 4) if smoke else (128, 64)

    def build():
        inputs = keras.Input((lengths[1],), dtype="int32")
        h = layers.Embedding(vocab, embed_dim)(inputs)
        # (`unroll`: `tools/step_variants.py --variant=unrolled_forward_mode`)
        h = layers.Bidirectional(layers.LSTM(units, return_sequences=True,
                                             unroll=unroll))(h)
        h = layers.Bidirectional(layers.LSTM(units, unroll=unroll))(h)
        outputs = layers.Dense(1, activation="sigmoid")(h)
        return keras.Model(inputs, outputs, name="lstm")

    column = lambda labels: labels[:, None].astype("float32")
    return Workload(build, keras.losses.BinaryCrossentropy(), (x, column(y)),
                    (xv, column(yv)), 80, 32, 10, "binary",
                    f"BiLSTM({units}) x2, Embedding {vocab}x{embed_dim}, {n} "
                    f"synthetic sequences of {lengths[0]}-{lengths[1]} tokens")


def synthetic_text(n, length, vocab, seed):
    """`n` token sequences `[n, length + 1]` of a Markov chain over ids `0..vocab-1`:
    every token has four successors drawn from a Zipf law over the ids, the next
    token is one of them (uniformly) with probability 0.9, else a Zipf draw."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, vocab + 1)
    p /= p.sum()
    successors = rng.choice(vocab, size=(vocab, 4), p=p)
    x = np.zeros((n, length + 1), "int32")
    x[:, 0] = rng.choice(vocab, size=n, p=p)
    for t in range(1, length + 1):
        follow = successors[x[:, t - 1], rng.integers(0, 4, size=n)]
        x[:, t] = np.where(rng.random(n) < 0.1, rng.choice(vocab, size=n, p=p), follow)
    return x


class CausalTransformerBlock(TransformerBlock):
    """keras-io miniature GPT's block: the post-norm block with a causal mask."""

    def call(self, inputs):
        attn_output = self.dropout1(self.att(inputs, inputs, use_causal_mask=True))
        out1 = self.layernorm1(inputs + attn_output)
        ffn_output = self.dropout2(self.ffn(out1))
        return self.layernorm2(out1 + ffn_output)


def language_model(smoke, seed):
    vocab, length = (300, 8) if smoke else (8000, 32)
    n, n_val = (128, 64) if smoke else (3000, 500)
    text = synthetic_text(n + n_val, length, vocab, seed)
    train, val = _split(text[:, :-1], text[:, 1:], n_val)
    embed_dim = 8 if smoke else 64

    def build():
        inputs = keras.Input((length,), dtype="int32")
        h = TokenAndPositionEmbedding(length, vocab, embed_dim)(inputs)
        h = CausalTransformerBlock(embed_dim, 2, embed_dim)(h)
        outputs = layers.Dense(vocab)(h)
        return keras.Model(inputs, outputs, name="language_model")

    return Workload(build, keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                    train, val, 150, 64, 15, None,
                    f"miniature GPT, vocabulary {vocab}, width {embed_dim}, {n} "
                    f"synthetic sequences of {length} tokens")


# Training --------------------------------------------------------------------


def _evaluator(model, workload):
    """`() -> (validation loss, validation accuracy or nan)`, in inference mode."""
    def forward(x):
        return model(x, training=False)

    if not _RUN_EAGERLY.value:
        forward = tf.function(forward, reduce_retracing=True)
    x, y = workload.val

    def evaluate():
        loss = correct = 0.0
        for i in range(0, len(x), 500):
            chunk = slice(i, i + 500)
            out = forward(x[chunk])
            loss += float(workload.loss(y[chunk], out)) * len(x[chunk])
            out = out.numpy()
            if workload.accuracy == "sparse":
                correct += np.sum(np.argmax(out, -1) == y[chunk])
            elif workload.accuracy == "binary":
                correct += np.sum((out > 0.5) == (y[chunk] > 0.5))
        return loss / len(x), (correct / len(x) if workload.accuracy else np.nan)

    return evaluate


def _make_optimizer(name, config, seed):
    if name in ("TKFAC", "KFAC"):
        return getattr(keras_tkfac, name)(**{"seed": seed, **config})
    if name == "SGD":
        return keras.optimizers.SGD(**{"momentum": 0.9, **config})
    return getattr(keras.optimizers, name)(**config)


def _excluded():
    """`--exclude` as `wrap`'s argument: `keras.layers` classes, else layer names."""
    return tuple(getattr(layers, e, e) for e in _EXCLUDE.value)


def _train(workload_name, workload, weights, name, config, steps, seed):
    keras.utils.set_random_seed(seed)  # The same dropout seeds in every run.
    model = workload.build()
    model.set_weights(weights)
    wrapped = keras_tkfac.wrap(model, exclude=_excluded())
    recorder = benchlib.Recorder(
        _evaluator(wrapped, workload), workload.eval_every, stop_on_nonfinite=True)
    status = "ok"
    try:
        wrapped.compile(optimizer=_make_optimizer(name, config, seed),
                        loss=workload.loss, run_eagerly=_RUN_EAGERLY.value)
        wrapped.fit(benchlib.batches(workload.train, workload.batch_size, seed),
                    epochs=1, steps_per_epoch=steps, shuffle=False, verbose=0,
                    callbacks=[recorder])
    except Exception as error:  # Any failure is a result to report, not a crash.
        message = " ".join(f"{type(error).__name__}: {error}".split())
        status = "error: " + (message[:200] + "..." if len(message) > 200 else message)
    evals = np.array(getattr(recorder, "evals", []), dtype=float).reshape(-1, 3)
    if status == "ok" and (recorder.diverged or not np.all(np.isfinite(evals[:, 1]))):
        status = "diverged"
    seconds = np.array(getattr(recorder, "seconds", []))
    losses = recorder.step_losses() if hasattr(recorder, "means") else np.zeros(0)
    return Run(workload_name, name, config, status, evals, losses, seconds)


# Measurements ----------------------------------------------------------------


def best_val(run):
    finite = run.evals[np.isfinite(run.evals[:, 1]), 1] if len(run.evals) else []
    return float(np.min(finite)) if len(finite) else math.inf


def best_accuracy(run):
    """Validation accuracy at the evaluation of the best validation loss."""
    if not len(run.evals) or not np.isfinite(best_val(run)):
        return math.nan
    return float(run.evals[np.nanargmin(run.evals[:, 1]), 2])


def final_train_loss(run):
    if not len(run.step_losses):
        return math.nan
    return float(np.mean(run.step_losses[-max(1, len(run.step_losses) // 10):]))


def median_ms(run):
    return 1e3 * float(np.median(run.step_seconds[1:])) if len(
        run.step_seconds) > 1 else math.nan


def reached(run, target):
    """`(steps, seconds)` at the first evaluation at or below `target`, else `None`s.

    Seconds are the training steps' own, step 1 (tracing) excluded.
    """
    if not len(run.evals):
        return None, None
    hits = np.flatnonzero(run.evals[:, 1] <= target)
    if not hits.size:
        return None, None
    step = int(run.evals[hits[0], 0])
    return step, float(np.sum(run.step_seconds[1:step]))


def run_length(run, steps):
    """`(steps, seconds)` of the whole run; a run stopped early is extended to `steps`
    at its median step time."""
    if len(run.step_seconds) >= steps:
        return steps, float(np.sum(run.step_seconds[1:steps]))
    return steps, 1e-3 * median_ms(run) * (steps - 1)


def _select(runs):
    """The best configuration: lowest best validation loss, successful runs first."""
    return min(runs, key=lambda r: (r.status != "ok", best_val(r)))


def _config_text(config):
    short = {"learning_rate": "lr"}
    parts = [f"{short.get(k, k)}={v:g}" if isinstance(v, (int, float))
             and not isinstance(v, bool) else f"{short.get(k, k)}={v}"
             for k, v in config.items()]
    return ", ".join(parts) or "defaults"


def _fmt(value, spec=".3g"):
    return "n/a" if value is None or not np.isfinite(value) else format(value, spec)


def _cell(run):
    """A best validation loss, or what went wrong."""
    if run is None:
        return "n/a"
    if run.status != "ok":
        status = run.status.replace("|", "/")
        return status if len(status) <= 80 else status[:77] + "..."
    return f"{best_val(run):.4g}"


def _ratio(run, adam, target, steps, index):
    """TKFAC/KFAC over Adam for steps (`index` 0) or seconds (1) to the target; text
    with `>` when the run does not reach it, and the number (`None` if undefined)."""
    if run is None or adam is None or run.status.startswith("error"):
        return "n/a", None
    mine, base = reached(run, target), reached(adam, target)
    if base[index] is None or not base[index] > 0:
        return "n/a", None
    if mine[index] is None:
        value = run_length(run, steps)[index] / base[index]
        return (f">{value:.2f}" if np.isfinite(value) else "n/a"), value
    value = mine[index] / base[index]
    return f"{value:.2f}", value


def summarize(results, steps_of):
    """Markdown lines: the summary table, its final line and one table per workload."""
    head = ["| workload | target | TKFAC | KFAC | Adam | AdamW | Muon | SGD | "
            "TKFAC steps to target (Adam) | × | TKFAC s to target (Adam) | × |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    better = faster = compared = 0
    logs, not_reached, problems = [], 0, []
    for workload, (target, best, runs) in results.items():
        adam, tkfac = best.get("Adam"), best.get("TKFAC")
        steps = steps_of[workload]
        row = [workload, _fmt(target, ".4g")] + [
            _cell(best.get(n)) for n in ORDER_SUMMARY]
        step_text, _ = _ratio(tkfac, adam, target, steps, 0)
        seconds_text, seconds_ratio = _ratio(tkfac, adam, target, steps, 1)
        mine = reached(tkfac, target) if tkfac else (None, None)
        base = reached(adam, target) if adam else (None, None)
        row += [f"{mine[0] or 'not reached'} ({base[0] or 'n/a'})", step_text,
                f"{_fmt(mine[1], '.1f') if mine[1] is not None else 'not reached'} "
                f"({_fmt(base[1], '.1f')})", seconds_text]
        head.append("| " + " | ".join(str(c) for c in row) + " |")
        if tkfac is not None and adam is not None:
            if tkfac.status == "ok" and best_val(tkfac) <= best_val(adam):
                better += 1
            if seconds_ratio is not None:
                compared += 1
                logs.append(math.log(seconds_ratio))
                not_reached += mine[1] is None
                faster += mine[1] is not None and seconds_ratio < 1
        problems += [f"{workload}/{r.optimizer} ({_config_text(r.config)}): "
                     f"{r.status.replace('|', '/')}" for r in runs if r.status != "ok"]
    n = sum(1 for _, best, _ in results.values() if "TKFAC" in best and "Adam" in best)
    geomean = f"{math.exp(np.mean(logs)):.2f}" if logs else "n/a"
    final = (
        f"**TKFAC best validation loss <= best Adam's: {better}/{n} workloads. "
        f"TKFAC wall-clock to target < Adam's: {faster}/{n}. Geometric mean of "
        f"TKFAC/Adam seconds to target: {geomean} over {compared} workloads "
        f"({not_reached} not reached, counted as the run length). "
        f"Divergences/NaN/errors: {'; '.join(problems) if problems else 'none'}.**")
    return head + ["", final]


ORDER_SUMMARY = ["TKFAC", "KFAC", "Adam", "AdamW", "Muon", "SGD"]


def workload_table(target, best, runs):
    lines = ["| optimizer | best of grid | status | best val loss | val accuracy | "
             "steps to target | s to target | final train loss | median ms/step | "
             "step 1 (s) |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, run in best.items():
        steps, seconds = reached(run, target)
        first = run.step_seconds[0] if len(run.step_seconds) else math.nan
        lines.append(
            f"| {name} | {_config_text(run.config)} | {run.status.replace('|', '/')} | "
            f"{_fmt(best_val(run), '.4g')} | {_fmt(best_accuracy(run))} | "
            f"{steps or 'not reached'} | "
            f"{_fmt(seconds, '.1f') if seconds is not None else 'not reached'} | "
            f"{_fmt(final_train_loss(run), '.4g')} | {_fmt(median_ms(run), '.1f')} | "
            f"{_fmt(first, '.1f')} |")
    grid = [f"{r.optimizer} {_config_text(r.config)}: "
            f"{_fmt(best_val(r), '.4g') if r.status == 'ok' else r.status}"
            for r in runs]
    return lines + ["", "Grid (best validation loss): " + "; ".join(grid) + "."]


def _plot(results, path):
    names = list(results)
    columns = 4 if len(names) > 1 else 2
    rows = math.ceil(2 * len(names) / columns)
    figure = Figure(figsize=(4 * columns, 3 * rows), layout="constrained")
    axes = np.array(figure.subplots(rows, columns, squeeze=False))
    colors = {n: f"C{i}" for i, n in enumerate(ORDER_SUMMARY)}
    for i, workload in enumerate(names):
        target, best, _ = results[workload]
        by_step, by_time = axes.flat[2 * i], axes.flat[2 * i + 1]
        for name, run in best.items():
            if not len(run.evals):
                continue
            steps = run.evals[:, 0].astype(int)
            clock = np.concatenate([[0.0], np.cumsum(run.step_seconds[1:])])
            clock = clock[np.minimum(np.maximum(steps - 1, 0), len(clock) - 1)]
            style = dict(color=colors.get(name), label=name)
            by_step.plot(steps, run.evals[:, 1], **style)
            by_time.plot(clock, run.evals[:, 1], **style)
        for a in (by_step, by_time):
            if np.isfinite(target):
                a.axhline(target, color="gray", linestyle=":")
            a.set(yscale="log")
            a.grid(True, which="both", alpha=0.3)
        by_step.set(title=workload, xlabel="step", ylabel="validation loss")
        by_time.set(title=f"{workload}: target {_fmt(target, '.3g')} (dotted)",
                    xlabel="seconds after step 1 (evaluations excluded)")
        by_step.legend(fontsize="small")
    for a in axes.flat[2 * len(names):]:
        a.set_visible(False)
    figure.savefig(path, dpi=90)


def _to_json(run, target):
    steps, seconds = reached(run, target)
    return {
        "workload": run.workload, "optimizer": run.optimizer, "config": run.config,
        "status": run.status, "best_val_loss": best_val(run),
        "best_val_accuracy": best_accuracy(run),
        "final_train_loss": final_train_loss(run), "median_ms": median_ms(run),
        "steps_to_target": steps, "seconds_to_target": seconds,
        "evals": run.evals.tolist(), "step_losses": run.step_losses.tolist(),
        "step_seconds": run.step_seconds.tolist(),
    }


def _plain(value):
    """`value` for strict JSON: numpy scalars as Python numbers, nan/inf as None."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def main(argv):
    del argv
    started = time.perf_counter()
    if _NORMALIZATION_BLOCKS.value:
        keras_tkfac.register_normalization_blocks()
    if _RECURRENT_BLOCKS.value:
        keras_tkfac.register_recurrent_blocks()
    # Every run traces new functions; TensorFlow's retracing warnings are expected.
    tf.get_logger().setLevel("ERROR")
    smoke, seed = _SMOKE.value, _SEED.value
    unknown = set(_WORKLOADS.value) - set(WORKLOADS + OPTIONAL_WORKLOADS)
    if unknown:
        sys.exit(f"Unknown workloads {sorted(unknown)}; choose from "
                 f"{WORKLOADS + OPTIONAL_WORKLOADS}.")
    grids = {**GRIDS, **json.loads(_GRID.value or "{}")}
    base = {"TKFAC": json.loads(_TKFAC.value), "KFAC": json.loads(_KFAC.value)}
    names = [n for n in ORDER if n in _OPTIMIZERS.value]
    unknown = set(_OPTIMIZERS.value) - set(ORDER)
    if unknown:
        sys.exit(f"Unknown optimizers {sorted(unknown)}; choose from {ORDER}.")
    if "Muon" in names and not hasattr(keras.optimizers, "Muon"):
        print(f"Muon skipped: Keras {keras.__version__} has no keras.optimizers.Muon.")
        names.remove("Muon")
    configs = {}
    for name in names:
        axes = grids.get(name, {})
        every = [{**base.get(name, {}), **dict(zip(axes, v))}
                 for v in itertools.product(*axes.values())]
        configs[name] = every[:1] if smoke else every
    results, steps_of, descriptions, all_runs = {}, {}, {}, []
    for workload_name in _WORKLOADS.value:
        workload = globals()[workload_name](smoke, seed)
        steps = 3 if smoke else max(2, round(workload.steps * _STEPS_SCALE.value))
        if smoke:
            workload = workload._replace(batch_size=32, eval_every=3)
        keras.utils.set_random_seed(seed)
        initial = workload.build()
        weights = initial.get_weights()
        descriptions[workload_name] = (
            f"{workload.description}; {initial.count_params():,} parameters, "
            f"{len(workload.train[0])} train / {len(workload.val[0])} validation, "
            f"{steps} steps of {workload.batch_size}, evaluation every "
            f"{workload.eval_every}")
        runs = []
        for name in names:
            for config in configs[name]:
                if config.get("learning_rate") == "adam":
                    adam = [r for r in runs if r.optimizer == "Adam"]
                    lr = _select(adam).config["learning_rate"] if adam else 1e-3
                    config = {**config, "learning_rate": lr}
                start = time.perf_counter()
                run = _train(workload_name, workload, weights, name, config, steps,
                             seed)
                runs.append(run)
                print(f"{workload_name} {name} {_config_text(config)}: {run.status}, "
                      f"best val loss {best_val(run):.4g}, "
                      f"{_fmt(median_ms(run), '.1f')} ms/step, "
                      f"{time.perf_counter() - start:.1f} s in all", flush=True)
        best = {}
        for name in names:
            mine = [r for r in runs if r.optimizer == name]
            if mine:
                best[name] = _select(mine)
        target = MARGIN * best_val(best["Adam"]) if "Adam" in best else math.nan
        results[workload_name] = (target, best, runs)
        steps_of[workload_name] = steps
        all_runs += [_to_json(r, target) for r in runs]
        keras.backend.clear_session()
    minutes = (time.perf_counter() - started) / 60
    command = " ".join(["python tools/suite.py", *sys.argv[1:]])
    report = [
        f"`{command}`", "",
        f"Seed {seed}; {benchlib.machine()}, TensorFlow {tf.__version__}, Keras "
        f"{keras.__version__}, keras_tkfac {benchlib.source_version()}; "
        f"{minutes:.1f} minutes in all. Target rule: per workload, "
        f"target = {MARGIN} × the lowest validation loss of the best-of-grid Adam run "
        f"(the Adam learning rate with the lowest best validation loss); a run reaches "
        f"it at its first evaluation with validation loss <= target. Seconds count "
        f"training steps only (step 1, which traces, and evaluations excluded); "
        f"ratios are TKFAC over best Adam, `>` where TKFAC does not reach the target "
        f"(its whole run length then). Every optimizer trains the same initial "
        f"weights on the same batches, one run after another in one process; the "
        f"best configuration of each grid has the lowest best validation loss. "
        f"Optimizer columns: best validation loss of the best configuration. "
        f"Wall-clock numbers come from a machine that may be shared.", "",
        *summarize(results, steps_of),
    ]
    for workload_name, (target, best, runs) in results.items():
        report += ["", f"## {workload_name}", "", descriptions[workload_name] +
                   f"; target {_fmt(target, '.4g')}.", "",
                   *workload_table(target, best, runs)]
    report = "\n".join(report)
    os.makedirs(_OUTPUT_DIR.value, exist_ok=True)
    stem = os.path.join(_OUTPUT_DIR.value, "suite")
    with open(stem + ".md", "w") as f:
        f.write(report + "\n")
    with open(stem + ".json", "w") as f:
        json.dump(_plain({
            "command": command, "seed": seed, "margin": MARGIN,
            "workloads": {
                w: {"description": descriptions[w], "steps": steps_of[w],
                    "target": t, "best": {n: _config_text(r.config)
                                          for n, r in best.items()},
                    "results": {n: {"status": r.status, "best_val_loss": best_val(r),
                                    "config": r.config} for n, r in best.items()}}
                for w, (t, best, _) in results.items()},
            "runs": all_runs,
        }), f, allow_nan=False)
    _plot(results, stem + ".png")
    print(report)


if __name__ == "__main__":
    app.run(main)
