"""Trains keras-io's IMDB text classifiers with TKFAC: a transformer or a BiLSTM.

The two models are those of keras-io's "Text classification with Transformer" (token
and position embeddings, one post-norm self-attention block, pooling, a small head)
and "Bidirectional LSTM on IMDB" (an embedding and two bidirectional LSTMs), with
their vocabulary (20,000), sequence length (200) and batch size (32). The only
changes from those programs are `keras_tkfac.wrap(model)` and the optimizer; the
embeddings, LayerNormalizations and LSTMs that have no curvature block take the
first-order partner (Adam), which `wrap` logs once.

`imdb_reviews` comes from `tensorflow_datasets` (a download of ~80 MB; the reviews
are tokenised by a `TextVectorization` layer adapted on the training texts). Without
a network, or without `tensorflow_datasets`, the run stops with one line naming the
problem; `--dataset=synthetic` then trains the same model on token sequences made
here (a Zipf background with a few tokens that decide the label), offline.

    python examples/text_classifier.py [--model=bilstm] [--optimizer=adam]
        [--dataset=synthetic] [--epochs=2]
"""

import sys

from absl import app
from absl import flags
import numpy as np
import keras
from keras import layers

import keras_tkfac

_MODEL = flags.DEFINE_enum("model", "transformer", ["transformer", "bilstm"], "Model.")
_OPTIMIZER = flags.DEFINE_enum(
    "optimizer", "tkfac", ["tkfac", "kfac", "adam"], "Optimizer.")
_DATASET = flags.DEFINE_enum(
    "dataset", "imdb_reviews", ["imdb_reviews", "synthetic"],
    "Data set: IMDB reviews (tensorflow_datasets, needs a download) or offline "
    "synthetic token sequences.")
_EPOCHS = flags.DEFINE_integer("epochs", 2, "Epochs (keras-io's programs train 2).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Examples per step.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of weights, batch order and sampler.")
_SMOKE = flags.DEFINE_bool(
    "smoke", False, "A small model on 256 short sequences, one epoch.")

VOCAB, MAXLEN = 20000, 200


def load_imdb(vocab, maxlen):
    """`(x, y), (x_test, y_test)`: token ids `[n, maxlen]` and labels in {0, 1}."""
    try:
        import tensorflow_datasets as tfds

        splits = tfds.as_numpy(tfds.load(
            "imdb_reviews", split=["train", "test"], as_supervised=True,
            batch_size=-1))
    except Exception as error:  # ImportError, or any download failure.
        reason = f"{type(error).__name__}: {error}".splitlines()[0][:100]
        sys.exit(f"Cannot load 'imdb_reviews' with tensorflow_datasets ({reason}); "
                 "use --dataset=synthetic (offline).")
    vectorize = layers.TextVectorization(
        max_tokens=vocab, output_sequence_length=maxlen)
    vectorize.adapt(splits[0][0], batch_size=1024)
    return [(np.asarray(vectorize(text)), labels.astype("float32"))
            for text, labels in splits]


def synthetic(n, vocab, maxlen, seed):
    """`n` token sequences of random lengths (zero-padded at the end) and labels in
    {0, 1}: Zipf-distributed background tokens, and 4-10% of positions set to
    tokens of the label's own set of 30 (half of them rare ids)."""
    rng = np.random.default_rng(seed)
    ids = np.arange(1, vocab)
    background = 1.0 / (ids + 2.0)
    sets = rng.choice(np.r_[np.arange(40, 400), np.arange(3000, vocab)], (2, 30),
                      replace=False)
    y = rng.integers(0, 2, n)
    x = np.zeros((n, maxlen), "int32")
    for i in range(n):
        length = rng.integers(maxlen // 2, maxlen + 1)
        x[i, :length] = rng.choice(ids, length, p=background / background.sum())
        marked = rng.choice(length, max(2, int(length * rng.uniform(0.04, 0.1))),
                            replace=False)
        x[i, marked] = rng.choice(sets[y[i]], len(marked))
    return x, y.astype("float32")


class AddPositions(layers.Layer):
    """Adds a learned embedding of each position (keras-io's position embedding)."""

    def __init__(self, maxlen, embed_dim, **kwargs):
        super().__init__(**kwargs)
        self.positions = layers.Embedding(maxlen, embed_dim)

    def call(self, x):
        return x + self.positions(keras.ops.arange(keras.ops.shape(x)[1]))


def transformer(vocab, maxlen, embed_dim=32, num_heads=2, ff_dim=32):
    """keras-io's transformer classifier, its block written with the functional API."""
    inputs = keras.Input((maxlen,), dtype="int32")
    h = AddPositions(maxlen, embed_dim)(layers.Embedding(vocab, embed_dim)(inputs))
    attention = layers.MultiHeadAttention(num_heads, key_dim=embed_dim)(h, h)
    h = layers.LayerNormalization(epsilon=1e-6)(h + layers.Dropout(0.1)(attention))
    ffn = layers.Dense(embed_dim)(layers.Dense(ff_dim, activation="relu")(h))
    h = layers.LayerNormalization(epsilon=1e-6)(h + layers.Dropout(0.1)(ffn))
    h = layers.Dropout(0.1)(layers.GlobalAveragePooling1D()(h))
    h = layers.Dropout(0.1)(layers.Dense(20, activation="relu")(h))
    return keras.Model(inputs, layers.Dense(1, activation="sigmoid")(h))


def bilstm(vocab, maxlen, embed_dim=128, units=64):
    """keras-io's bidirectional LSTM classifier."""
    inputs = keras.Input((maxlen,), dtype="int32")
    h = layers.Embedding(vocab, embed_dim)(inputs)
    h = layers.Bidirectional(layers.LSTM(units, return_sequences=True))(h)
    h = layers.Bidirectional(layers.LSTM(units))(h)
    return keras.Model(inputs, layers.Dense(1, activation="sigmoid")(h))


def main(argv):
    del argv
    vocab, maxlen = (2000, 24) if _SMOKE.value else (VOCAB, MAXLEN)
    if _DATASET.value == "synthetic":
        # One draw, split: the test sequences share the training set's label tokens.
        n, n_test = (256, 128) if _SMOKE.value else (25000, 25000)
        x, y = synthetic(n + n_test, vocab, maxlen, _SEED.value)
        (x, y), (x_test, y_test) = (x[:n], y[:n]), (x[n:], y[n:])
    else:
        (x, y), (x_test, y_test) = load_imdb(vocab, maxlen)
    keras.utils.set_random_seed(_SEED.value)
    if _MODEL.value == "transformer":
        model = transformer(vocab, maxlen, *((8, 2, 8) if _SMOKE.value else ()))
    else:
        model = bilstm(vocab, maxlen, *((8, 4) if _SMOKE.value else ()))
    model = keras_tkfac.wrap(model)
    optimizer = {
        "tkfac": lambda: keras_tkfac.TKFAC(seed=_SEED.value),
        "kfac": lambda: keras_tkfac.KFAC(seed=_SEED.value),
        "adam": lambda: keras.optimizers.Adam(1e-3),  # keras-io's "adam"
    }[_OPTIMIZER.value]()
    model.compile(optimizer=optimizer, loss="binary_crossentropy",
                  metrics=["accuracy"])
    model.fit(x, y, batch_size=_BATCH_SIZE.value,
              epochs=1 if _SMOKE.value else _EPOCHS.value,
              validation_data=(x_test, y_test), verbose=2)
    loss, accuracy = model.evaluate(x_test, y_test, batch_size=500, verbose=0)
    print(f"{_MODEL.value}, {_OPTIMIZER.value}: test loss {loss:.4f}, "
          f"test accuracy {accuracy:.4f}")


if __name__ == "__main__":
    app.run(main)
