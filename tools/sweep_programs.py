"""Small Keras programs shaped like the keras-io examples and the Keras guides, for
`tools/program_sweep.py`, on data they make (no downloads).

Each program is a function `() -> (model, x, y, compile_kwargs, fit_kwargs)`; `x`
may be a `tf.data.Dataset` or a `keras.utils.PyDataset` of `(x, y)` batches (then `y`
is `None`). `PROGRAMS` maps their names to them.
"""

import numpy as np
import keras
from keras import layers
from keras import ops
import tensorflow as tf

BATCH = 32

def _rng(seed=0):
    return np.random.default_rng(seed)


def _images(n, size=16, channels=1, classes=4, seed=0):
    """Images whose class is which quadrant holds a bright blob."""
    rng = _rng(seed)
    y = rng.integers(0, classes, n)
    x = rng.normal(0, 0.3, (n, size, size, channels)).astype("float32")
    half = size // 2
    for i, c in enumerate(y):
        r, k = divmod(int(c) % 4, 2)
        x[i, r * half:(r + 1) * half, k * half:(k + 1) * half] += 1.0
    return x, y.astype("int32")


def _series(n, steps=64, channels=1, classes=3, seed=0):
    """Sinusoids whose class is the frequency band."""
    rng = _rng(seed)
    y = rng.integers(0, classes, n)
    t = np.arange(steps)[None, :, None]
    freq = (0.05 + 0.1 * y[:, None, None] + 0.02 * rng.random((n, 1, 1)))
    x = np.sin(2 * np.pi * freq * t + rng.random((n, 1, channels)) * 6.28)
    x = x + rng.normal(0, 0.2, (n, steps, channels))
    return x.astype("float32"), y.astype("int32")


def _tokens(n, length=24, vocab=500, classes=2, seed=0, pad=True):
    """Token sequences whose class decides which indicative tokens appear;
    with `pad`, sequences are zero-padded to `length` (token 0 is padding)."""
    rng = _rng(seed)
    y = rng.integers(0, classes, n)
    x = rng.integers(3, vocab, (n, length))
    for i, c in enumerate(y):
        positions = rng.choice(length, 4, replace=False)
        x[i, positions] = 1 + int(c)
        if pad:
            x[i, rng.integers(length // 2, length):] = 0
    return x.astype("int32"), y.astype("int32")


def _logits_loss():
    """The compile arguments of a classifier with logit outputs and integer labels."""
    return {"loss": keras.losses.SparseCategoricalCrossentropy(from_logits=True)}


# Each program: () -> (model, x, y, compile keyword arguments, fit keyword arguments).

def gru_classifier():
    x, y = _tokens(BATCH * 8)
    model = keras.Sequential([
        layers.Embedding(500, 16), layers.GRU(16), layers.Dense(2)])
    return model, x, y, {"loss": keras.losses.SparseCategoricalCrossentropy(
        from_logits=True)}, {}


def masked_lstm():
    x, y = _tokens(BATCH * 8)
    inputs = keras.Input((None,), dtype="int32")
    h = layers.Embedding(500, 16, mask_zero=True)(inputs)
    h = layers.LSTM(16)(h)
    outputs = layers.Dense(1, activation="sigmoid")(h)
    return keras.Model(inputs, outputs), x, y.astype("float32"), {
        "loss": "binary_crossentropy", "metrics": ["accuracy"]}, {}


def simple_rnn_tagger():
    x, y = _tokens(BATCH * 8, pad=False)
    tags = (x % 3).astype("int32")
    model = keras.Sequential([
        keras.Input((None,), dtype="int32"), layers.Embedding(500, 16),
        layers.SimpleRNN(16, return_sequences=True),
        layers.TimeDistributed(layers.Dense(3))])
    return model, x, tags, {"loss": keras.losses.SparseCategoricalCrossentropy(
        from_logits=True)}, {}


def causal_transformer():
    """A next-token model: token + position embeddings, causal self-attention."""
    x, _ = _tokens(BATCH * 8, length=16, vocab=64, pad=False)
    x = np.cumsum(x % 5, axis=1) % 64
    inputs = keras.Input((15,), dtype="int32")
    tok = layers.Embedding(64, 32)(inputs)
    pos = layers.Embedding(15, 32)(keras.ops.arange(15))
    h = tok + pos
    att = layers.MultiHeadAttention(2, 16)(h, h, use_causal_mask=True)
    h = layers.LayerNormalization()(h + att)
    f = layers.Dense(64, activation="gelu")(h)
    h = layers.LayerNormalization()(h + layers.Dense(32)(f))
    outputs = layers.Dense(64)(h)
    return keras.Model(inputs, outputs), x[:, :-1], x[:, 1:], _logits_loss(), {}


def separable_grouped_dilated():
    x, y = _images(BATCH * 8, channels=4)
    model = keras.Sequential([
        keras.Input((16, 16, 4)),
        layers.SeparableConv2D(8, 3, padding="same", activation="relu"),
        layers.Conv2D(8, 3, groups=2, padding="same", activation="relu"),
        layers.Conv2D(8, 3, dilation_rate=2, padding="same"),
        layers.GroupNormalization(groups=4), layers.PReLU(),
        layers.DepthwiseConv2D(3, padding="same"),
        layers.GlobalAveragePooling2D(), layers.Dense(4)])
    return model, x, y, {"loss": keras.losses.SparseCategoricalCrossentropy(
        from_logits=True)}, {}


def wavenet_causal():
    x, y = _series(BATCH * 8)
    inputs = keras.Input((64, 1))
    h = inputs
    for rate in (1, 2, 4):
        h = layers.Conv1D(8, 2, padding="causal", dilation_rate=rate,
                          activation="relu")(h)
    h = layers.GlobalMaxPooling1D()(h)
    outputs = layers.Dense(3, activation="softmax")(h)
    return keras.Model(inputs, outputs), x, y, {
        "loss": "sparse_categorical_crossentropy"}, {}


def conv3d_video():
    rng = _rng(1)
    y = rng.integers(0, 2, BATCH * 8)
    x = rng.normal(0, 0.3, (BATCH * 8, 4, 8, 8, 1)).astype("float32")
    x[y == 1, :, :4] += 0.8
    model = keras.Sequential([
        keras.Input((4, 8, 8, 1)), layers.Conv3D(4, 3, padding="same", activation="relu"),
        layers.MaxPooling3D(2), layers.Flatten(), layers.Dense(1)])
    return model, x, y.astype("float32"), {
        "loss": keras.losses.BinaryCrossentropy(from_logits=True)}, {}


def conv1d_transpose_autoencoder():
    x, _ = _series(BATCH * 8)
    model = keras.Sequential([
        keras.Input((64, 1)),
        layers.Conv1D(8, 3, strides=2, padding="same", activation="relu"),
        layers.Conv1DTranspose(8, 3, strides=2, padding="same", activation="relu"),
        layers.Conv1D(1, 3, padding="same")])
    return model, x, x, {"loss": "mse"}, {}


def siamese_shared():
    """One encoder applied to two inputs (shared layers), distance to a sigmoid."""
    rng = _rng(2)
    a = rng.normal(size=(BATCH * 8, 10)).astype("float32")
    same = rng.integers(0, 2, BATCH * 8)
    b = np.where(same[:, None] == 1, a + rng.normal(0, 0.1, a.shape),
                 rng.normal(size=a.shape)).astype("float32")
    encoder = keras.Sequential([layers.Dense(16, activation="relu"), layers.Dense(8)])
    ia, ib = keras.Input((10,)), keras.Input((10,))
    distance = layers.Lambda(
        lambda t: keras.ops.sum(keras.ops.square(t[0] - t[1]), axis=1, keepdims=True)
    )([encoder(ia), encoder(ib)])
    outputs = layers.Dense(1, activation="sigmoid")(distance)
    return keras.Model([ia, ib], outputs), [a, b], same.astype("float32"), {
        "loss": "binary_crossentropy"}, {}


def nested_augmented():
    """Augmentation layers and a nested Sequential backbone inside a functional model."""
    x, y = _images(BATCH * 8, channels=3)
    backbone = keras.Sequential([
        layers.Conv2D(8, 3, activation="relu"), layers.BatchNormalization(),
        layers.MaxPooling2D(), layers.Conv2D(8, 3, activation="relu")], name="backbone")
    inputs = keras.Input((16, 16, 3))
    h = layers.RandomFlip("horizontal")(inputs)
    h = layers.RandomTranslation(0.1, 0.1)(h)
    h = layers.Rescaling(0.5)(h)
    h = backbone(h)
    h = layers.GlobalAveragePooling2D()(h)
    h = layers.Dropout(0.2)(h)
    outputs = layers.Dense(4)(h)
    return keras.Model(inputs, outputs), x, y, {
        "loss": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        "metrics": ["accuracy"]}, {}


class Scale(layers.Layer):
    """A custom layer with its own weight."""

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(input_shape[-1],), initializer="ones")

    def call(self, x):
        return x * self.scale


class ActivityPenalty(layers.Layer):
    def call(self, x):
        self.add_loss(1e-3 * keras.ops.mean(keras.ops.square(x)))
        return x


def custom_layers_add_loss():
    rng = _rng(3)
    x = rng.normal(size=(BATCH * 8, 12)).astype("float32")
    y = (x[:, :3] @ rng.normal(size=(3, 2))).astype("float32")
    model = keras.Sequential([
        keras.Input((12,)), layers.Dense(32, activation="swish"), Scale(),
        ActivityPenalty(), layers.UnitNormalization(), layers.Dense(2)])
    return model, x, y, {"loss": keras.losses.Huber()}, {}


def regression_losses():
    rng = _rng(4)
    x = rng.normal(size=(BATCH * 8, 8)).astype("float32")
    y = (np.abs(x[:, :2]).sum(1, keepdims=True) + 0.1 * rng.normal(size=(BATCH * 8, 1)))
    inputs = keras.Input((8,))
    h = layers.Dense(32, activation="relu",
                     kernel_constraint=keras.constraints.MaxNorm(2.0),
                     kernel_regularizer=keras.regularizers.L2(1e-4))(inputs)
    mae = layers.Dense(1, name="mae")(h)
    logcosh = layers.Dense(1, name="logcosh")(h)
    return keras.Model(inputs, {"mae": mae, "logcosh": logcosh}), x, {
        "mae": y.astype("float32"), "logcosh": y.astype("float32")}, {
        "loss": {"mae": "mae", "logcosh": keras.losses.LogCosh()}}, {}


def multilabel_class_weight():
    rng = _rng(5)
    x = rng.normal(size=(BATCH * 8, 20)).astype("float32")
    y = (x[:, :5] > 0.3).astype("float32")
    model = keras.Sequential([
        keras.Input((20,)), layers.Dense(32, activation="relu"), layers.Dense(5)])
    return model, x, y, {"loss": keras.losses.BinaryFocalCrossentropy(from_logits=True),
                         "metrics": [keras.metrics.AUC(multi_label=True)]}, {}


def smoothing_and_class_weight():
    x, y = _images(BATCH * 8)
    x = x.reshape(len(x), -1)
    model = keras.Sequential([
        keras.Input((256,)), layers.Dense(32, activation="relu"), layers.Dense(4)])
    onehot = np.eye(4, dtype="float32")[y]
    return model, x, onehot, {"loss": keras.losses.CategoricalCrossentropy(
        from_logits=True, label_smoothing=0.1)}, {
        "class_weight": {0: 1.0, 1: 2.0, 2: 1.0, 3: 0.5}}


def ignore_class_tagger():
    x, _ = _tokens(BATCH * 8, pad=True)
    tags = np.where(x == 0, -1, x % 4).astype("int32")
    model = keras.Sequential([
        keras.Input((24,), dtype="int32"), layers.Embedding(500, 16),
        layers.Conv1D(16, 3, padding="same", activation="relu"), layers.Dense(4)])
    return model, x, tags, {"loss": keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, ignore_class=-1)}, {}


def python_loss_function():
    x, y = _images(BATCH * 8)
    x = x.reshape(len(x), -1)

    def loss(y_true, y_pred):
        return keras.ops.mean(keras.ops.square(
            keras.ops.one_hot(keras.ops.cast(y_true, "int32"), 4) - y_pred), axis=-1)

    model = keras.Sequential([
        keras.Input((256,)), layers.Dense(32, activation="tanh"),
        layers.Dense(4, activation="softmax")])
    return model, x, y, {"loss": loss}, {}


class OwnTrainStep(keras.Model):
    """A model whose own `train_step` computes its loss and applies gradients
    (the shape of keras-io's VAE and "customizing what happens in fit" examples)."""

    def __init__(self):
        super().__init__()
        self.hidden = layers.Dense(32, activation="relu")
        self.out = layers.Dense(4)
        self.tracker = keras.metrics.Mean(name="loss")

    def call(self, x):
        return self.out(self.hidden(x))

    def _loss(self, x, y, training):
        logits = self(x, training=training)
        return keras.ops.mean(keras.losses.sparse_categorical_crossentropy(
            y, logits, from_logits=True))

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = self._loss(x, y, True)
        grads = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
        self.tracker.update_state(loss)
        return {"loss": self.tracker.result()}

    def test_step(self, data):
        # (As keras-io's examples do where they validate: Keras's own `test_step`
        # needs a compiled loss, which this model has none of.)
        x, y = data
        self.tracker.update_state(self._loss(x, y, False))
        return {"loss": self.tracker.result()}

    @property
    def metrics(self):
        return [self.tracker]


def own_train_step():
    x, y = _images(BATCH * 8)
    return OwnTrainStep(), x.reshape(len(x), -1), y, {}, {}


class ReconstructionLoss(layers.Layer):
    """Adds the reconstruction error of its two inputs as the model's loss."""

    def call(self, inputs):
        target, reconstruction = inputs
        self.add_loss(keras.ops.mean(keras.ops.square(reconstruction - target)))
        return reconstruction


def add_loss_only():
    """A denoising objective given by `add_loss` alone (`compile` without a loss)."""
    rng = _rng(6)
    x = rng.normal(size=(BATCH * 8, 16)).astype("float32")
    inputs = keras.Input((16,))
    code = layers.Dense(4, activation="relu")(inputs)
    recon = ReconstructionLoss()([inputs, layers.Dense(16)(code)])
    return keras.Model(inputs, recon), x, None, {}, {}


class Sampling(layers.Layer):
    """The keras-io VAE's reparameterisation, with its KL term as an added loss."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seed_generator = keras.random.SeedGenerator(1337)

    def call(self, inputs):
        mean, log_var = inputs
        self.add_loss(-0.5e-3 * keras.ops.mean(
            1 + log_var - keras.ops.square(mean) - keras.ops.exp(log_var)))
        noise = keras.random.normal(keras.ops.shape(mean), seed=self.seed_generator)
        return mean + keras.ops.exp(0.5 * log_var) * noise


def vae_added_kl():
    x, _ = _images(BATCH * 8)
    x = (x > 0.5).astype("float32").reshape(len(x), -1)
    inputs = keras.Input((256,))
    h = layers.Dense(64, activation="relu")(inputs)
    z = Sampling()([layers.Dense(4)(h), layers.Dense(4)(h)])
    h = layers.Dense(64, activation="relu")(z)
    outputs = layers.Dense(256, activation="sigmoid")(h)
    return keras.Model(inputs, outputs), x, x, {"loss": "binary_crossentropy"}, {}


class RecommenderNet(keras.Model):
    """keras-io collaborative filtering: user and movie embeddings, their dot
    product and biases, a sigmoid rating."""

    def __init__(self, users, movies, size):
        super().__init__()
        self.user_embedding = layers.Embedding(
            users, size, embeddings_regularizer=keras.regularizers.l2(1e-6))
        self.user_bias = layers.Embedding(users, 1)
        self.movie_embedding = layers.Embedding(
            movies, size, embeddings_regularizer=keras.regularizers.l2(1e-6))
        self.movie_bias = layers.Embedding(movies, 1)

    def call(self, inputs):
        user = self.user_embedding(inputs[:, 0])
        movie = self.movie_embedding(inputs[:, 1])
        dot = keras.ops.sum(user * movie, axis=1, keepdims=True)
        return keras.ops.sigmoid(dot + self.user_bias(inputs[:, 0])
                                 + self.movie_bias(inputs[:, 1]))


def collaborative_filtering():
    rng = _rng(7)
    users, movies = 50, 80
    pairs = np.stack([rng.integers(0, users, BATCH * 8),
                      rng.integers(0, movies, BATCH * 8)], 1).astype("int64")
    taste = rng.normal(size=(users, 3)) @ rng.normal(size=(3, movies))
    ratings = 1 / (1 + np.exp(-taste[pairs[:, 0], pairs[:, 1]]))
    return RecommenderNet(users, movies, 8), pairs, ratings.astype("float32"), {
        "loss": keras.losses.BinaryCrossentropy()}, {}


def string_features():
    """keras-io structured data: a string feature through StringLookup and
    CategoryEncoding, a numeric feature through an adapted Normalization."""
    rng = _rng(8)
    n = BATCH * 8
    colors = np.array(["red", "green", "blue", "teal"])[rng.integers(0, 4, n)]
    age = rng.normal(50, 10, (n, 1)).astype("float32")
    y = ((colors == "red") | (age[:, 0] > 55)).astype("float32")
    lookup = layers.StringLookup(vocabulary=["red", "green", "blue"],
                                 output_mode="one_hot")
    norm = layers.Normalization()
    norm.adapt(age)
    color_in = keras.Input((1,), dtype="string", name="color")
    age_in = keras.Input((1,), name="age")
    h = layers.concatenate([layers.Reshape((4,))(lookup(color_in)), norm(age_in)])
    h = layers.Dense(16, activation="relu")(h)
    outputs = layers.Dense(1, activation="sigmoid")(h)
    data = tf.data.Dataset.from_tensor_slices(
        ({"color": colors[:, None], "age": age}, y)).batch(BATCH)
    return keras.Model({"color": color_in, "age": age_in}, outputs), data, None, {
        "loss": "binary_crossentropy", "metrics": ["accuracy"]}, {}


def text_vectorization():
    rng = _rng(9)
    words = np.array([f"w{i}" for i in range(60)])
    n = BATCH * 8
    y = rng.integers(0, 2, n)
    texts = [" ".join(list(words[rng.integers(2, 60, 10)]) + [words[int(c)]] * 2)
             for c in y]
    vectorize = layers.TextVectorization(max_tokens=80, output_sequence_length=12)
    vectorize.adapt(texts)
    inputs = keras.Input((1,), dtype="string")
    h = layers.Embedding(80, 16)(vectorize(inputs))
    h = layers.GlobalAveragePooling1D()(h)
    outputs = layers.Dense(1)(h)
    data = tf.data.Dataset.from_tensor_slices(
        (np.array(texts)[:, None], y.astype("float32"))).batch(BATCH)
    return keras.Model(inputs, outputs), data, None, {
        "loss": keras.losses.BinaryCrossentropy(from_logits=True)}, {}


def unet_segmentation():
    """Per-pixel classes, labels `[B, H, W, 1]` as keras-io's oxford_pets loads them."""
    x, _ = _images(BATCH * 8, size=16, channels=3)
    y = (x[..., :1] > 0.5).astype("int32")
    inputs = keras.Input((16, 16, 3))
    c1 = layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    p1 = layers.MaxPooling2D()(c1)
    c2 = layers.SeparableConv2D(16, 3, padding="same", activation="relu")(p1)
    c2 = layers.BatchNormalization()(c2)
    u1 = layers.Conv2DTranspose(8, 3, strides=2, padding="same")(c2)
    u1 = layers.concatenate([u1, c1])
    u1 = layers.UpSampling2D()(layers.MaxPooling2D()(u1))
    outputs = layers.Conv2D(2, 1, activation="softmax")(u1)
    return keras.Model(inputs, outputs), x, y, {
        "loss": "sparse_categorical_crossentropy"}, {}


def masked_attention():
    """Padding mask from `Embedding(mask_zero=True)` into self-attention."""
    x, y = _tokens(BATCH * 8, vocab=200)
    inputs = keras.Input((24,), dtype="int32")
    h = layers.Embedding(200, 16, mask_zero=True)(inputs)
    h = layers.MultiHeadAttention(2, 8)(h, h)
    h = layers.GlobalAveragePooling1D()(h)
    outputs = layers.Dense(2)(h)
    return keras.Model(inputs, outputs), x, y, _logits_loss(), {}


def squeeze_excitation():
    x, y = _images(BATCH * 8, channels=3)
    inputs = keras.Input((16, 16, 3))
    h = layers.Conv2D(16, 3, padding="same", use_bias=False)(inputs)
    h = layers.BatchNormalization()(h)
    h = layers.Activation("swish")(h)
    se = layers.GlobalAveragePooling2D(keepdims=True)(h)
    se = layers.Conv2D(4, 1, activation="relu")(se)
    se = layers.Conv2D(16, 1, activation="sigmoid")(se)
    h = layers.multiply([h, se])
    h = layers.DepthwiseConv2D(3, padding="same")(h)
    h = layers.GlobalAveragePooling2D()(h)
    outputs = layers.Dense(4, activation="softmax")(h)
    return keras.Model(inputs, outputs), x, y, {
        "loss": "sparse_categorical_crossentropy"}, {}


def conv_lstm():
    """keras-io next-frame prediction: ConvLSTM2D, per-pixel binary cross-entropy."""
    rng = _rng(10)
    frames = (rng.random((BATCH * 8, 5, 8, 8, 1)) > 0.8).astype("float32")
    model = keras.Sequential([
        keras.Input((None, 8, 8, 1)),
        layers.ConvLSTM2D(4, 3, padding="same", return_sequences=True),
        layers.BatchNormalization(),
        layers.Conv3D(1, 3, padding="same", activation="sigmoid")])
    return model, frames[:, :-1], frames[:, 1:], {"loss": "binary_crossentropy"}, {}


def other_keras_losses():
    """Losses with no sampling rule: Poisson, KL divergence, cosine similarity,
    squared hinge, MAPE, on four outputs."""
    rng = _rng(11)
    x = rng.normal(size=(BATCH * 8, 6)).astype("float32")
    counts = rng.poisson(np.exp(0.3 * x[:, :1])).astype("float32")
    dist = np.abs(x[:, :3]) / np.abs(x[:, :3]).sum(1, keepdims=True)
    sign = np.where(x[:, :1] > 0, 1.0, -1.0).astype("float32")
    inputs = keras.Input((6,))
    h = layers.Dense(16, activation="relu")(inputs)
    outputs = {
        "poisson": layers.Dense(1, activation="softplus", name="poisson")(h),
        "kl": layers.Dense(3, activation="softmax", name="kl")(h),
        "cosine": layers.Dense(3, name="cosine")(h),
        "hinge": layers.Dense(1, name="hinge")(h),
        "mape": layers.Dense(1, name="mape")(h)}
    y = {"poisson": counts, "kl": dist.astype("float32"), "cosine": x[:, :3],
         "hinge": sign, "mape": 5 + x[:, :1]}
    return keras.Model(inputs, outputs), x, y, {"loss": {
        "poisson": "poisson", "kl": "kl_divergence", "cosine": "cosine_similarity",
        "hinge": "squared_hinge", "mape": "mape"}}, {}


def callbacks_and_schedules():
    """ReduceLROnPlateau and EarlyStopping on validation data, sample weights,
    `steps_per_execution`, `jit_compile=True`."""
    x, y = _images(BATCH * 8)
    x = x.reshape(len(x), -1)
    weights = np.where(y == 0, 2.0, 1.0).astype("float32")
    model = keras.Sequential([
        keras.Input((256,)), layers.Dense(32, activation="relu"),
        layers.Dropout(0.1), layers.Dense(4)])
    return model, x, y, {
        "loss": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        "steps_per_execution": 4, "jit_compile": True}, {
        "sample_weight": weights, "validation_split": 0.25,
        "callbacks": [keras.callbacks.ReduceLROnPlateau(patience=1, factor=0.5),
                      keras.callbacks.EarlyStopping(patience=5)]}


def partial_losses_bias_free():
    """Two outputs, a loss on one only; layers without biases; a `training`
    branch in a custom layer."""

    class NoisyInTraining(layers.Layer):
        def call(self, x, training=None):
            if training:
                return x + keras.random.normal(keras.ops.shape(x), stddev=0.05)
            return x

    x, y = _images(BATCH * 8)
    x = x.reshape(len(x), -1)
    inputs = keras.Input((256,))
    h = NoisyInTraining()(inputs)
    h = layers.Dense(32, activation="relu", use_bias=False)(h)
    cls = layers.Dense(4, name="cls", use_bias=False)(h)
    aux = layers.Dense(2, name="aux")(h)
    return keras.Model(inputs, {"cls": cls, "aux": aux}), x, {"cls": y}, {
        "loss": {"cls": keras.losses.SparseCategoricalCrossentropy(
            from_logits=True)}}, {}


def unnormalised_mlp():
    """keras-io's MNIST MLP (two `Dense(512)`) without its `/ 255`: pixel values up
    to ~300, so the softmax starts saturated (4 classes: the blob's quadrant)."""
    x, y = _images(BATCH * 8, size=28, classes=4)
    model = keras.Sequential([
        keras.Input((28, 28, 1)), layers.Flatten(),
        layers.Dense(512, activation="relu"), layers.Dense(512, activation="relu"),
        layers.Dense(4, activation="softmax")])
    return model, 255.0 * x, y, {"loss": "sparse_categorical_crossentropy"}, {}


def mobilenet_v2():
    """`keras.applications.MobileNetV2` (random weights, alpha 0.35) at 32 x 32:
    inverted residuals, ReLU6, depthwise convolutions, batch normalisation."""
    x, y = _images(BATCH * 8, size=32, channels=3, classes=4)
    model = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=4)
    return model, x, y, {"loss": "sparse_categorical_crossentropy"}, {}


def efficientnet_b0():
    """`keras.applications.EfficientNetB0` (random weights) at 32 x 32: squeeze-and-
    excitation, swish, stochastic depth, its built-in rescaling and normalisation."""
    x, y = _images(BATCH * 8, size=32, channels=3, classes=4)
    model = keras.applications.EfficientNetB0(
        input_shape=(32, 32, 3), weights=None, classes=4)
    return model, 127.0 * (x + 1.0), y, {"loss": "sparse_categorical_crossentropy"}, {}


def frozen_base_fine_tuning():
    """keras-io transfer learning: a frozen convolutional base (here trained for
    nothing: random filters, batch normalisation in inference mode), a new head."""
    x, y = _images(BATCH * 8, channels=3)
    base = keras.Sequential([
        keras.Input((16, 16, 3)), layers.Conv2D(16, 3, activation="relu"),
        layers.BatchNormalization(), layers.MaxPooling2D(),
        layers.Conv2D(16, 3, activation="relu")], name="base")
    base.trainable = False
    inputs = keras.Input((16, 16, 3))
    h = base(inputs, training=False)
    h = layers.GlobalAveragePooling2D()(h)
    h = layers.Dropout(0.2)(h)
    outputs = layers.Dense(4)(h)
    return keras.Model(inputs, outputs), x, y, _logits_loss(), {}


def transfer_learning():
    """keras-io's "Transfer learning & fine-tuning" at its first stage: a random
    flip and rescaling in the model, a frozen `keras.applications` base
    (MobileNetV2 at 64 x 64, random weights here) called with `training=False`,
    global pooling, dropout and a one-logit head under binary cross-entropy. As a
    pretrained base's features carry the classes, the labels are a linear
    function of the base's pooled features (of mirror-symmetric images, which the
    flip keeps; a random rotation, as in keras-io's, changed them to chance)."""
    rng = _rng()
    x = rng.normal(0, 1.0, (BATCH * 8, 64, 64, 3)).astype("float32")
    # Mirror images: the flip keeps the labels.
    x = ((x + x[:, :, ::-1]) / np.sqrt(2.0)).astype("float32")
    base = keras.applications.MobileNetV2(input_shape=(64, 64, 3), include_top=False,
                                          weights=None)
    # As a pretrained base's, its normalisation statistics fit the data (with
    # random weights and the initial statistics its features vanish, ~1e-13).
    norms = [layer for layer in base.layers
             if isinstance(layer, layers.BatchNormalization)]
    for layer in norms:
        layer.momentum = 0.0
    base(x[:BATCH] / 2.0, training=True)
    for layer in norms:
        layer.momentum = 0.99
    base.trainable = False
    features = ops.convert_to_numpy(
        ops.mean(base(x / 2.0, training=False), axis=(1, 2)))
    score = (features - features.mean(0)) @ rng.normal(size=features.shape[1])
    y = (score > np.median(score)).astype("float32")
    inputs = keras.Input((64, 64, 3))
    h = layers.RandomFlip("horizontal")(inputs)
    h = layers.Rescaling(1.0 / 2.0)(h)
    h = base(h, training=False)
    h = layers.GlobalAveragePooling2D()(h)
    h = layers.Dropout(0.2)(h)
    outputs = layers.Dense(1)(h)
    return keras.Model(inputs, outputs), x, y, {
        "loss": keras.losses.BinaryCrossentropy(from_logits=True)}, {}


class Patches(layers.Layer):
    """keras-io ViT: non-overlapping patches, flattened."""

    def __init__(self, size, **kwargs):
        super().__init__(**kwargs)
        self.size = size

    def call(self, images):
        patches = keras.ops.image.extract_patches(images, self.size)
        shape = keras.ops.shape(patches)
        return keras.ops.reshape(patches, (shape[0], -1, shape[-1]))


class PatchEncoder(layers.Layer):
    """A projection and a learned position embedding of its own (`add_weight`)."""

    def __init__(self, patches, width, **kwargs):
        super().__init__(**kwargs)
        self.projection = layers.Dense(width)
        self.position = self.add_weight(shape=(patches, width),
                                        initializer="random_normal")

    def call(self, patch):
        return self.projection(patch) + self.position


def vision_transformer():
    x, y = _images(BATCH * 8, size=16, channels=3)
    inputs = keras.Input((16, 16, 3))
    h = PatchEncoder(16, 32)(Patches(4)(inputs))
    for _ in range(2):
        n = layers.LayerNormalization(epsilon=1e-6)(h)
        h = h + layers.MultiHeadAttention(4, 8, dropout=0.1)(n, n)
        n = layers.LayerNormalization(epsilon=1e-6)(h)
        h = h + layers.Dense(32)(layers.Dropout(0.1)(
            layers.Dense(64, activation="gelu")(n)))
    h = layers.Flatten()(layers.LayerNormalization(epsilon=1e-6)(h))
    outputs = layers.Dense(4)(h)
    return keras.Model(inputs, outputs), x, y, _logits_loss(), {}


class Distiller(keras.Model):
    """keras-io knowledge distillation: a student trained by its own `train_step`
    against a teacher's softened predictions."""

    def __init__(self, student, teacher):
        super().__init__()
        self.student, self.teacher = student, teacher
        self.tracker = keras.metrics.Mean(name="loss")

    def call(self, x):
        return self.student(x)

    def _loss(self, x, y, training):
        soft = keras.ops.softmax(self.teacher(x, training=False) / 3.0)
        logits = self.student(x, training=training)
        return 0.5 * keras.ops.mean(keras.losses.sparse_categorical_crossentropy(
            y, logits, from_logits=True)) + 0.5 * keras.ops.mean(
            keras.losses.kl_divergence(soft, keras.ops.softmax(logits / 3.0)))

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = self._loss(x, y, True)
        grads = tape.gradient(loss, self.student.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.student.trainable_variables))
        self.tracker.update_state(loss)
        return {"loss": self.tracker.result()}

    def test_step(self, data):
        x, y = data
        self.tracker.update_state(self._loss(x, y, False))
        return {"loss": self.tracker.result()}

    @property
    def metrics(self):
        return [self.tracker]


def distiller():
    x, y = _images(BATCH * 8)
    x = x.reshape(len(x), -1)
    teacher = keras.Sequential([keras.Input((256,)), layers.Dense(64, activation="relu"),
                                layers.Dense(4)])
    student = keras.Sequential([keras.Input((256,)), layers.Dense(16, activation="relu"),
                                layers.Dense(4)])
    return Distiller(student, teacher), x, y, {}, {}


def mixed_precision_convnet():
    """The global `mixed_float16` policy (reset to float32 after the run), a Huber
    loss on a float32 output."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    x, y = _images(BATCH * 8)
    model = keras.Sequential([
        keras.Input((16, 16, 1)), layers.Conv2D(8, 3, activation="relu"),
        layers.BatchNormalization(), layers.GlobalAveragePooling2D(),
        layers.Dense(4), layers.Activation("linear", dtype="float32")])
    onehot = np.eye(4, dtype="float32")[y]
    return model, x, onehot, {"loss": keras.losses.Huber()}, {}


def deeplab_bilinear_decoder():
    """keras-io DeepLabV3+ shape: a strided, dilated encoder, bilinear
    `UpSampling2D` of the deep features concatenated with low-level ones, bilinear
    upsampling to the input size, per-pixel sparse softmax cross-entropy. Forward
    mode drops the bilinear resize's derivative unless `keras_tkfac.tangents` gives
    it one; without it `TKFAC()` diverged here (first epoch 727, third 4212)."""
    x, _ = _images(BATCH * 8, size=16, channels=3)
    y = (x[..., :1] > 0.5).astype("int32")
    inputs = keras.Input((16, 16, 3))
    low = layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(inputs)
    deep = layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(low)
    deep = layers.Conv2D(16, 3, dilation_rate=2, padding="same", activation="relu")(deep)
    up = layers.UpSampling2D(2, interpolation="bilinear")(deep)
    h = layers.concatenate([up, layers.Conv2D(4, 1, activation="relu")(low)])
    h = layers.Conv2D(16, 3, padding="same", activation="relu")(h)
    h = layers.UpSampling2D(2, interpolation="bilinear")(h)
    outputs = layers.Conv2D(2, 1)(h)
    return keras.Model(inputs, outputs), x, y, _logits_loss(), {}


# Six more shapes (2026-12-02): keras-io's video classification (CNN-RNN), text
# generation with a miniature GPT, an English-to-Spanish-shaped encoder-decoder
# transformer, handwriting OCR with a CTC loss, weather-style LSTM regression and a
# dual encoder trained with an in-batch contrastive loss.

def video_cnn_rnn():
    """`TimeDistributed` convolutions over frames, then a GRU: which way a blob moves."""
    rng = _rng()
    n = BATCH * 8
    y = rng.integers(0, 2, n)
    x = rng.normal(0, 0.3, (n, 6, 12, 12, 1)).astype("float32")
    for i, c in enumerate(y):
        for t in range(6):
            col = t if c == 0 else 5 - t
            x[i, t, 4:8, 2 * col:2 * col + 2] += 1.0
    inputs = keras.Input((6, 12, 12, 1))
    h = layers.TimeDistributed(layers.Conv2D(8, 3, activation="relu"))(inputs)
    h = layers.TimeDistributed(layers.GlobalAveragePooling2D())(h)
    h = layers.GRU(16)(h)
    return keras.Model(inputs, layers.Dense(2)(h)), x, y.astype("int32"), _logits_loss(), {}


class TokenAndPositionEmbedding(layers.Layer):
    """keras-io's miniature-GPT embedding: token plus learned position."""

    def __init__(self, maxlen, vocab, dim, **kwargs):
        super().__init__(**kwargs)
        self.token = layers.Embedding(vocab, dim)
        self.position = layers.Embedding(maxlen, dim)

    def call(self, x):
        return self.token(x) + self.position(keras.ops.arange(keras.ops.shape(x)[-1]))


def mini_gpt():
    """Next-token prediction (each token is the previous one plus 1), causal attention,
    a logit per position."""
    rng = _rng()
    n, length, vocab = BATCH * 8, 16, 50
    sequences = (rng.integers(1, vocab, (n, 1)) + np.arange(length + 1)[None]) % vocab
    x, y = sequences[:, :-1].astype("int32"), sequences[:, 1:].astype("int32")
    inputs = keras.Input((length,), dtype="int32")
    h = TokenAndPositionEmbedding(length, vocab, 16)(inputs)
    h = layers.LayerNormalization(epsilon=1e-6)(
        h + layers.MultiHeadAttention(2, 8)(h, h, use_causal_mask=True))
    f = layers.Dense(16)(layers.Dense(32, activation="relu")(h))
    h = layers.LayerNormalization(epsilon=1e-6)(h + f)
    return keras.Model(inputs, layers.Dense(vocab)(h)), x, y, _logits_loss(), {}


def seq2seq_transformer():
    """Encoder-decoder (two inputs, padding masks, causal self-attention and
    cross-attention) that reverses a token sequence."""
    rng = _rng()
    n, length, vocab = BATCH * 8, 10, 40
    source = rng.integers(3, vocab, (n, length))
    target = source[:, ::-1]
    decoder_input = np.concatenate([np.ones((n, 1), int), target[:, :-1]], 1)
    encoder_tokens = keras.Input((length,), dtype="int32", name="encoder_inputs")
    decoder_tokens = keras.Input((length,), dtype="int32", name="decoder_inputs")
    e = layers.Embedding(vocab, 16, mask_zero=True)(encoder_tokens)
    e = layers.LayerNormalization()(e + layers.MultiHeadAttention(2, 8)(e, e))
    d = layers.Embedding(vocab, 16, mask_zero=True)(decoder_tokens)
    d = layers.LayerNormalization()(
        d + layers.MultiHeadAttention(2, 8)(d, d, use_causal_mask=True))
    d = layers.LayerNormalization()(d + layers.MultiHeadAttention(2, 8)(d, e))
    d = layers.Dropout(0.1)(layers.Dense(32, activation="relu")(d))
    model = keras.Model([encoder_tokens, decoder_tokens], layers.Dense(vocab)(d))
    return model, [source.astype("int32"), decoder_input.astype("int32")], \
        target.astype("int32"), _logits_loss(), {}


def ocr_ctc():
    """Convolutions, a reshape to time steps, a BiLSTM and softmax frames under
    `keras.losses.CTC`: reads four stripes' intensities as labels."""
    rng = _rng()
    n, width, height, classes = BATCH * 8, 32, 8, 6
    labels = rng.integers(1, classes, (n, 4))
    x = rng.normal(0, 0.2, (n, width, height, 1)).astype("float32")
    for i in range(n):
        for k, c in enumerate(labels[i]):
            x[i, 8 * k + 2:8 * k + 6, :, 0] += c / classes
    inputs = keras.Input((width, height, 1))
    h = layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    h = layers.MaxPooling2D((2, 2))(h)
    h = layers.Reshape((width // 2, (height // 2) * 8))(h)
    h = layers.Dense(16, activation="relu")(h)
    h = layers.Bidirectional(layers.LSTM(16, return_sequences=True))(h)
    outputs = layers.Dense(classes + 1, activation="softmax")(h)
    return keras.Model(inputs, outputs), x, labels.astype("int32"), {
        "loss": keras.losses.CTC()}, {}


def lstm_regression():
    """The next value of a noisy sinusoid from 40 past values (squared error)."""
    rng = _rng()
    n, t = BATCH * 8, np.arange(48)
    series = (np.sin(0.3 * t[None] + rng.random((n, 1)) * 6.28)
              + rng.normal(0, 0.1, (n, 48)))
    x, y = series[:, :40, None].astype("float32"), series[:, 40:41].astype("float32")
    inputs = keras.Input((40, 1))
    return keras.Model(inputs, layers.Dense(1)(layers.LSTM(16)(inputs))), x, y, {
        "loss": "mse"}, {}


def contrastive_dual_encoder():
    """Two towers with unit-normalised embeddings; a user's loss scores each pair
    against the rest of the batch (in-batch negatives; the labels are unused)."""
    rng = _rng()
    n = BATCH * 8
    z = rng.normal(size=(n, 8))
    a = (z @ rng.normal(size=(8, 12)) + 0.1 * rng.normal(size=(n, 12))).astype("float32")
    b = (z @ rng.normal(size=(8, 10)) + 0.1 * rng.normal(size=(n, 10))).astype("float32")
    towers = []
    for dim in (12, 10):
        inputs = keras.Input((dim,))
        h = layers.Dense(8)(layers.Dense(16, activation="relu")(inputs))
        towers.append((inputs, layers.UnitNormalization()(h)))
    logits = layers.Lambda(
        lambda t: 10.0 * keras.ops.matmul(t[0], keras.ops.transpose(t[1])))(
            [towers[0][1], towers[1][1]])

    def in_batch_loss(y_true, y_pred):
        del y_true
        labels = keras.ops.arange(keras.ops.shape(y_pred)[0])
        return keras.losses.sparse_categorical_crossentropy(labels, y_pred,
                                                            from_logits=True)

    model = keras.Model([towers[0][0], towers[1][0]], logits)
    return model, [a, b], np.zeros((n,), "float32"), {"loss": in_batch_loss}, {}


class PixelConvLayer(layers.Layer):
    """keras-io PixelCNN: a Conv2D whose kernel is masked (assigned) in `call`."""

    def __init__(self, mask_type, **kwargs):
        super().__init__()
        self.mask_type = mask_type
        self.conv = layers.Conv2D(**kwargs)

    def build(self, input_shape):
        self.conv.build(input_shape)
        kernel_shape = ops.shape(self.conv.kernel)
        self.mask = np.zeros(shape=kernel_shape)
        self.mask[: kernel_shape[0] // 2, ...] = 1.0
        self.mask[kernel_shape[0] // 2, : kernel_shape[1] // 2, ...] = 1.0
        if self.mask_type == "B":
            self.mask[kernel_shape[0] // 2, kernel_shape[1] // 2, ...] = 1.0

    def call(self, inputs):
        self.conv.kernel.assign(self.conv.kernel * self.mask)
        return self.conv(inputs)


def pixelcnn():
    x, _ = _images(BATCH * 8, size=8)
    x = (x > 0.5).astype("float32")
    inputs = keras.Input((8, 8, 1))
    h = PixelConvLayer("A", filters=16, kernel_size=5, activation="relu", padding="same")(inputs)
    h = PixelConvLayer("B", filters=16, kernel_size=3, activation="relu", padding="same")(h)
    out = layers.Conv2D(1, 1, activation="sigmoid")(h)
    return keras.Model(inputs, out), x, x, {"loss": "binary_crossentropy"}, {}


class DepthToSpace(layers.Layer):
    def __init__(self, block, **kwargs):
        super().__init__(**kwargs)
        self.block = block

    def call(self, x):
        return tf.nn.depth_to_space(x, self.block)


def espcn_super_resolution():
    """keras-io ESPCN: convolutions then depth_to_space upscaling, MSE."""
    x, _ = _images(BATCH * 8, size=16)
    hi = (x - x.min()) / (x.max() - x.min())
    lo = hi[:, ::2, ::2]
    inputs = keras.Input((8, 8, 1))
    h = layers.Conv2D(16, 5, padding="same", activation="relu")(inputs)
    h = layers.Conv2D(8, 3, padding="same", activation="relu")(h)
    h = layers.Conv2D(4, 3, padding="same")(h)
    out = DepthToSpace(2)(h)
    return keras.Model(inputs, out), lo, hi, {"loss": "mse"}, {}


class OrthogonalRegularizer(keras.regularizers.Regularizer):
    def __init__(self, num_features, l2reg=0.001):
        self.num_features = num_features
        self.l2reg = l2reg
        self.eye = ops.eye(num_features)

    def __call__(self, x):
        x = ops.reshape(x, (-1, self.num_features, self.num_features))
        xxt = ops.tensordot(x, x, axes=(2, 2))
        xxt = ops.reshape(xxt, (-1, self.num_features, self.num_features))
        return ops.sum(self.l2reg * ops.square(xxt - self.eye))


def pointnet():
    """keras-io PointNet: Conv1D(k=1)+BN, a T-net whose Dense has an identity bias
    and an orthogonality activity regulariser, a matrix product, max pooling."""
    rng = _rng()
    n, points, classes = BATCH * 8, 32, 3
    y = rng.integers(0, classes, n)
    radius = 1.0 + y[:, None]
    angles = rng.uniform(0, 2 * np.pi, (n, points))
    z = rng.normal(0, 0.3, (n, points))
    x = np.stack([radius * np.cos(angles), radius * np.sin(angles), z], -1).astype("float32")

    def conv_bn(h, f):
        h = layers.Conv1D(f, 1, padding="valid")(h)
        return layers.Activation("relu")(layers.BatchNormalization(momentum=0.0)(h))

    def dense_bn(h, f):
        h = layers.Dense(f)(h)
        return layers.Activation("relu")(layers.BatchNormalization(momentum=0.0)(h))

    def tnet(inputs, k):
        bias = keras.initializers.Constant(np.eye(k).flatten())
        h = conv_bn(inputs, 16)
        h = layers.GlobalMaxPooling1D()(h)
        h = dense_bn(h, 16)
        h = layers.Dense(k * k, kernel_initializer="zeros", bias_initializer=bias,
                         activity_regularizer=OrthogonalRegularizer(k))(h)
        feat_t = layers.Reshape((k, k))(h)
        return layers.Dot(axes=(2, 1))([inputs, feat_t])

    inputs = keras.Input((points, 3))
    h = tnet(inputs, 3)
    h = conv_bn(h, 16)
    h = tnet(h, 16)
    h = conv_bn(h, 32)
    h = layers.GlobalMaxPooling1D()(h)
    h = layers.Dropout(0.3)(dense_bn(h, 32))
    out = layers.Dense(classes, activation="softmax")(h)
    return keras.Model(inputs, out), x, y.astype("int32"), {
        "loss": "sparse_categorical_crossentropy"}, {}


class GraphAttention(layers.Layer):
    """keras-io GAT's shape: own kernels, gathers over edges, segment sums."""

    def __init__(self, units, edges, nodes, **kwargs):
        super().__init__(**kwargs)
        self.units, self.edges, self.nodes = units, edges, nodes

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], self.units),
                                      initializer="glorot_uniform", name="kernel")
        self.kernel_attention = self.add_weight(shape=(self.units * 2, 1),
                                                initializer="glorot_uniform",
                                                name="kernel_attention")

    def call(self, node_states):
        transformed = tf.matmul(node_states, self.kernel)  # [nodes, units]
        src, dst = self.edges[:, 0], self.edges[:, 1]
        pair = tf.concat([tf.gather(transformed, src), tf.gather(transformed, dst)], -1)
        scores = tf.nn.leaky_relu(tf.squeeze(tf.matmul(pair, self.kernel_attention), -1))
        scores = tf.exp(tf.clip_by_value(scores, -2, 2))
        norm = tf.math.unsorted_segment_sum(scores, src, self.nodes)
        scores = scores / tf.gather(norm, src)
        neigh = tf.gather(transformed, dst) * scores[:, None]
        return tf.math.unsorted_segment_sum(neigh, src, self.nodes)


class GATModel(keras.Model):
    """Subclassed: node features are a constant of the model; inputs are node ids."""

    def __init__(self, features, edges, classes):
        super().__init__()
        self.features = tf.constant(features)
        self.preprocess = layers.Dense(16, activation="relu")
        self.attention = GraphAttention(16, tf.constant(edges), features.shape[0])
        self.out = layers.Dense(classes)

    def call(self, ids):
        h = self.preprocess(self.features)
        h = tf.nn.relu(self.attention(h)) + h
        return self.out(tf.gather(h, tf.reshape(ids, [-1])))


def graph_attention():
    rng = _rng()
    nodes, classes = 300, 3
    labels = rng.integers(0, classes, nodes)
    features = (np.eye(classes)[labels] @ rng.normal(size=(classes, 20)) * 0.5
                + rng.normal(size=(nodes, 20))).astype("float32")
    edges = []
    for i in range(nodes):
        same = np.flatnonzero(labels == labels[i])
        for j in rng.choice(same, 4):
            edges.append((i, j))
        edges.append((i, i))
    edges = np.array(edges, "int32")
    ids = rng.integers(0, nodes, BATCH * 8).astype("int32")
    return GATModel(features, edges, classes), ids, labels[ids].astype("int32"), _logits_loss(), {}


class NeuralDecisionTree(keras.Model):
    """keras-io neural decision forest: a Dense of routing probabilities, a
    used-feature mask, leaf distributions as an own weight."""

    def __init__(self, depth, num_features, used_features_rate, num_classes):
        super().__init__()
        self.depth, self.num_leaves, self.num_classes = depth, 2 ** depth, num_classes
        num_used = int(num_features * used_features_rate)
        one_hot = np.eye(num_features)
        sampled = np.random.default_rng(0).choice(num_features, num_used, replace=False)
        self.used_features_mask = ops.convert_to_tensor(one_hot[sampled], dtype="float32")
        self.pi = self.add_weight(initializer="random_normal",
                                  shape=[self.num_leaves, self.num_classes],
                                  dtype="float32", trainable=True)
        self.decision_fn = layers.Dense(units=self.num_leaves, activation="sigmoid")

    def call(self, features):
        batch_size = ops.shape(features)[0]
        features = ops.matmul(features, ops.transpose(self.used_features_mask))
        decisions = ops.expand_dims(self.decision_fn(features), axis=2)
        decisions = layers.concatenate([decisions, 1 - decisions], axis=2)
        mu = ops.ones([batch_size, 1, 1])
        begin_idx, end_idx = 1, 2
        for level in range(self.depth):
            mu = ops.reshape(mu, [batch_size, -1, 1])
            mu = ops.tile(mu, (1, 1, 2))
            level_decisions = decisions[:, begin_idx:end_idx, :]
            mu = mu * level_decisions
            begin_idx = end_idx
            end_idx = begin_idx + 2 ** (level + 1)
        mu = ops.reshape(mu, [batch_size, self.num_leaves])
        probabilities = keras.activations.softmax(self.pi)
        return ops.matmul(mu, probabilities)


def neural_decision_forest():
    rng = _rng()
    n, d, classes = BATCH * 8, 12, 2
    x = rng.normal(size=(n, d)).astype("float32")
    y = ((x[:, 0] + x[:, 1] * x[:, 2]) > 0).astype("int32")
    inputs = keras.Input((d,))
    h = layers.BatchNormalization()(inputs)
    trees = [NeuralDecisionTree(3, d, 0.7, classes) for _ in range(3)]
    out = layers.Average()([t(h) for t in trees])
    return keras.Model(inputs, out), x, y, {"loss": "sparse_categorical_crossentropy"}, {}


class GatedLinearUnit(layers.Layer):
    def __init__(self, units):
        super().__init__()
        self.linear = layers.Dense(units)
        self.sigmoid = layers.Dense(units, activation="sigmoid")

    def call(self, inputs):
        return self.linear(inputs) * self.sigmoid(inputs)


class GatedResidualNetwork(layers.Layer):
    def __init__(self, units, dropout_rate):
        super().__init__()
        self.units = units
        self.elu_dense = layers.Dense(units, activation="elu")
        self.linear_dense = layers.Dense(units)
        self.dropout = layers.Dropout(dropout_rate)
        self.gated_linear_unit = GatedLinearUnit(units)
        self.layer_norm = layers.LayerNormalization()
        self.project = layers.Dense(units)

    def call(self, inputs):
        x = self.elu_dense(inputs)
        x = self.linear_dense(x)
        x = self.dropout(x)
        if inputs.shape[-1] != self.units:
            inputs = self.project(inputs)
        x = inputs + self.gated_linear_unit(x)
        return self.layer_norm(x)


def gated_residual_network():
    """keras-io GRN / variable selection (classification with gated residual
    networks): custom layers holding Dense layers, sigmoid gates, LayerNorm."""
    rng = _rng()
    n, d = BATCH * 8, 10
    x = rng.normal(size=(n, d)).astype("float32")
    y = ((x[:, :3].sum(1) * x[:, 3]) > 0).astype("float32")[:, None]
    inputs = keras.Input((d,))
    h = GatedResidualNetwork(16, 0.1)(inputs)
    h = GatedResidualNetwork(16, 0.1)(h)
    out = layers.Dense(1, activation="sigmoid")(h)
    return keras.Model(inputs, out), x, y, {"loss": "binary_crossentropy"}, {}


class TiedLogits(layers.Layer):
    """Logits from the token embedding's transpose (weight tying, as keras-hub's
    ReversibleEmbedding)."""

    def __init__(self, embedding, **kwargs):
        super().__init__(**kwargs)
        self.embedding = embedding

    def call(self, h):
        return ops.matmul(h, ops.transpose(self.embedding.embeddings))


def tied_embedding_lm():
    vocab, length = 64, 12
    rng = _rng()
    x = rng.integers(1, vocab - 1, (BATCH * 8, length)).astype("int32")
    y = (x + 1) % vocab
    inputs = keras.Input((length,), dtype="int32")
    embedding = layers.Embedding(vocab, 16)
    h = embedding(inputs)
    h = layers.Dense(16, activation="relu")(h)
    logits = TiedLogits(embedding)(h)
    return keras.Model(inputs, logits), x, y, _logits_loss(), {}


class TiedDecoder(layers.Layer):
    def __init__(self, encoder, **kwargs):
        super().__init__(**kwargs)
        self.encoder = encoder

    def build(self, input_shape):
        self.bias = self.add_weight(shape=(self.encoder.kernel.shape[0],), initializer="zeros")

    def call(self, h):
        return ops.sigmoid(ops.matmul(h, ops.transpose(self.encoder.kernel)) + self.bias)


def tied_autoencoder():
    x, _ = _images(BATCH * 8, size=8)
    x = ((x - x.min()) / (x.max() - x.min())).reshape(len(x), 64).astype("float32")
    inputs = keras.Input((64,))
    encoder = layers.Dense(16, activation="relu")
    h = encoder(inputs)
    out = TiedDecoder(encoder)(h)
    return keras.Model(inputs, out), x, x, {"loss": "binary_crossentropy"}, {}


def luong_attention():
    """Query-value attention with `layers.Attention` and `AdditiveAttention`."""
    x, y = _tokens(BATCH * 8, vocab=200)
    inputs = keras.Input((24,), dtype="int32")
    e = layers.Embedding(200, 16)(inputs)
    q = layers.Conv1D(16, 3, padding="same")(e)
    v = layers.Conv1D(16, 3, padding="same")(e)
    a = layers.Attention()([q, v])
    b = layers.AdditiveAttention()([q, v])
    h = layers.Concatenate()([layers.GlobalAveragePooling1D()(q), layers.GlobalAveragePooling1D()(a),
                              layers.GlobalAveragePooling1D()(b)])
    out = layers.Dense(2)(h)
    return keras.Model(inputs, out), x, y, _logits_loss(), {}


def attention_2d():
    """MultiHeadAttention over both spatial axes of a feature map, Dense on 4-D."""
    x, y = _images(BATCH * 8, size=8)
    grid = np.stack(np.meshgrid(np.linspace(-1, 1, 8), np.linspace(-1, 1, 8), indexing="ij"), -1)
    x = np.concatenate([x, np.broadcast_to(grid, (len(x), 8, 8, 2))], -1).astype("float32")
    inputs = keras.Input((8, 8, 3))  # the pixel and its coordinates (no other position signal)
    h = layers.Dense(8)(inputs)  # a Dense on a 4-D tensor
    h = h + layers.MultiHeadAttention(2, 4, attention_axes=(1, 2))(h, h)
    h = layers.GlobalAveragePooling2D()(h)
    out = layers.Dense(4)(h)
    return keras.Model(inputs, out), x, y, _logits_loss(), {}


def lstm_seq2seq_states():
    """keras-io character-level translation: an encoder LSTM's states start the
    decoder LSTM (teacher forcing), one-hot inputs, softmax per step."""
    rng = _rng()
    n, length, chars = BATCH * 8, 10, 12
    src = rng.integers(0, chars, (n, length))
    tgt = src[:, ::-1]
    enc_in = np.eye(chars, dtype="float32")[src]
    dec_tokens = np.concatenate([np.zeros((n, 1), int), tgt[:, :-1]], 1)
    dec_in = np.eye(chars, dtype="float32")[dec_tokens]
    encoder_inputs = keras.Input((None, chars))
    _, state_h, state_c = layers.LSTM(32, return_state=True)(encoder_inputs)
    decoder_inputs = keras.Input((None, chars))
    out = layers.LSTM(32, return_sequences=True)(decoder_inputs, initial_state=[state_h, state_c])
    out = layers.Dense(chars, activation="softmax")(out)
    return keras.Model([encoder_inputs, decoder_inputs], out), [enc_in, dec_in], tgt.astype("int32"), {
        "loss": "sparse_categorical_crossentropy"}, {}


def mixture_of_experts():
    """A softmax gate mixing Dense experts (einsum of the stacked outputs)."""
    rng = _rng()
    n, d = BATCH * 8, 10
    x = rng.normal(size=(n, d)).astype("float32")
    y = np.where(x[:, 0] > 0, x[:, 1] ** 2, np.sin(3 * x[:, 2]))[:, None].astype("float32")
    inputs = keras.Input((d,))
    experts = [layers.Dense(1)(layers.Dense(16, activation="relu")(inputs)) for _ in range(3)]
    stacked = layers.Concatenate()(experts)
    gate = layers.Dense(3, activation="softmax")(inputs)
    out = layers.Dot(axes=1)([stacked, gate])
    return keras.Model(inputs, out), x, y, {"loss": "mse"}, {}


class LayerScale(layers.Layer):
    def __init__(self, init, dim, **kwargs):
        super().__init__(**kwargs)
        self.init, self.dim = init, dim

    def build(self, _):
        self.gamma = self.add_weight(shape=(self.dim,), initializer=keras.initializers.Constant(self.init))

    def call(self, x):
        return x * self.gamma


def convnext_block():
    """keras-io/keras.applications ConvNeXt: 7x7 depthwise, LayerNorm, Dense on 4-D
    (inverted bottleneck, GELU), layer scale, residual."""
    x, y = _images(BATCH * 8, size=16, channels=3)
    inputs = keras.Input((16, 16, 3))
    h = layers.Conv2D(16, 4, strides=4)(inputs)
    h = layers.LayerNormalization(epsilon=1e-6)(h)
    for _ in range(2):
        r = layers.DepthwiseConv2D(7, padding="same")(h)
        r = layers.LayerNormalization(epsilon=1e-6)(r)
        r = layers.Dense(64, activation="gelu")(r)
        r = layers.Dense(16)(r)
        h = h + LayerScale(1e-6, 16)(r)
    h = layers.LayerNormalization(epsilon=1e-6)(layers.GlobalAveragePooling2D()(h))
    out = layers.Dense(4)(h)
    return keras.Model(inputs, out), x, y, _logits_loss(), {}


def mlp_mixer():
    """keras-io MLP-Mixer: patches, token mixing (Dense over the patch axis after a
    Permute), channel mixing, LayerNorm."""
    x, y = _images(BATCH * 8, size=16)
    inputs = keras.Input((16, 16, 1))
    h = layers.Conv2D(16, 4, strides=4)(inputs)  # 4x4 patches -> 16 patches
    h = layers.Reshape((16, 16))(h)
    for _ in range(2):
        t = layers.LayerNormalization(epsilon=1e-6)(h)
        t = layers.Permute((2, 1))(t)
        t = layers.Dense(16, activation="gelu")(t)
        t = layers.Dense(16)(t)
        h = h + layers.Permute((2, 1))(t)
        c = layers.LayerNormalization(epsilon=1e-6)(h)
        c = layers.Dense(32, activation="gelu")(c)
        h = h + layers.Dense(16)(c)
    out = layers.Dense(4)(layers.GlobalAveragePooling1D()(h))
    return keras.Model(inputs, out), x, y, _logits_loss(), {}


class FNetEncoder(layers.Layer):
    """keras-io FNet: Fourier mixing of the tokens (real part of a 2-D FFT)."""

    def __init__(self, dim, **kwargs):
        super().__init__(**kwargs)
        self.ffn = keras.Sequential([layers.Dense(dim, activation="relu"), layers.Dense(dim)])
        self.norm1 = layers.LayerNormalization()
        self.norm2 = layers.LayerNormalization()

    def call(self, x):
        mixed = ops.real(tf.signal.fft2d(tf.cast(x, tf.complex64)))
        x = self.norm1(x + mixed)
        return self.norm2(x + self.ffn(x))


def fnet_fft():
    x, y = _tokens(BATCH * 8, vocab=300)
    inputs = keras.Input((24,), dtype="int32")
    h = layers.Embedding(300, 16)(inputs)
    h = FNetEncoder(16)(h)
    h = layers.GlobalAveragePooling1D()(h)
    out = layers.Dense(2)(layers.Dropout(0.1)(h))
    return keras.Model(inputs, out), x, y, _logits_loss(), {}


class RandomPatchMask(layers.Layer):
    """keras-io masked image modeling's older code: masks from `tf.random.uniform`
    (a stateful, unseeded op) and `tf.argsort`, only in training."""

    def __init__(self, rate, **kwargs):
        super().__init__(**kwargs)
        self.rate = rate

    def call(self, patches, training=None):
        if not training:
            return patches
        n = tf.shape(patches)[1]
        noise = tf.random.uniform(tf.shape(patches)[:2])
        order = tf.argsort(noise, axis=-1)
        keep = tf.cast(tf.argsort(order, axis=-1) >= tf.cast(tf.cast(n, tf.float32) * self.rate, tf.int32),
                       patches.dtype)
        return patches * keep[..., None]


def random_patch_masking():
    x, _ = _images(BATCH * 8, size=8)
    flat = x.reshape(len(x), 16, 4).astype("float32")  # 16 patches of 4 pixels (rows)
    inputs = keras.Input((16, 4))
    h = RandomPatchMask(0.5)(inputs)
    h = layers.Dense(16, activation="relu")(h)
    h = layers.Dense(4)(h)
    return keras.Model(inputs, h), flat, flat, {"loss": "mse"}, {}


class Batches(keras.utils.PyDataset):
    def __init__(self, x, y, batch_size, **kwargs):
        super().__init__(**kwargs)
        self.x, self.y, self.batch_size = x, y, batch_size

    def __len__(self):
        return int(np.ceil(len(self.x) / self.batch_size))

    def __getitem__(self, idx):
        s = slice(idx * self.batch_size, (idx + 1) * self.batch_size)
        return self.x[s], self.y[s]


def pydataset_input():
    """A `keras.utils.PyDataset` feeding `fit` (the last batch shorter)."""
    x, y = _images(BATCH * 8 + 7, size=8)
    model = keras.Sequential([keras.Input((8, 8, 1)), layers.Conv2D(8, 3, activation="relu"),
                              layers.Flatten(), layers.Dense(4)])
    return model, Batches(x, y, BATCH), None, _logits_loss(), {}


def gru_reset_before_stacked_rnn():
    """`GRU(reset_after=False)` (no cuDNN path) under two stacked `SimpleRNN`s."""
    x, y = _series(BATCH * 8, steps=24)
    model = keras.Sequential([keras.Input((24, 1)), layers.SimpleRNN(8, return_sequences=True),
                              layers.SimpleRNN(8, return_sequences=True),
                              layers.GRU(8, reset_after=False), layers.Dense(3)])
    return model, x, y, _logits_loss(), {}


def stop_gradient_target():
    """A BYOL-like regression onto a stop-gradient target branch: the target's
    layers get no gradient, the online branch predicts it."""
    rng = _rng()
    n = BATCH * 8
    x = rng.normal(size=(n, 12)).astype("float32")
    inputs = keras.Input((12,))
    target = layers.Dense(8, activation="tanh")(inputs)
    target = layers.Lambda(lambda t: ops.stop_gradient(t))(target)
    online = layers.Dense(8)(layers.Dense(16, activation="relu")(inputs))
    diff = layers.Subtract()([online, target])
    return keras.Model(inputs, diff), x, np.zeros((n, 8), "float32"), {"loss": "mse"}, {}


class Recomputed(layers.Layer):
    """A block whose forward pass is recomputed in the backward pass
    (`tf.recompute_grad`, gradient checkpointing)."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.dense = layers.Dense(units, activation="relu")

    def call(self, x):
        return tf.recompute_grad(self.dense)(x)


def recompute_grad_layer():
    x, y = _images(BATCH * 8, size=8)
    inputs = keras.Input((8, 8, 1))
    h = layers.Flatten()(inputs)
    h = Recomputed(32)(h)
    out = layers.Dense(4)(h)
    return keras.Model(inputs, out), x, y, _logits_loss(), {}


class Iterated(layers.Layer):
    """A Dense applied three times in `ops.fori_loop` (iterative refinement)."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.dense = layers.Dense(units, activation="tanh")

    def build(self, input_shape):
        self.dense.build(input_shape)

    def call(self, x):
        return ops.fori_loop(0, 3, lambda i, h: h + 0.5 * self.dense(h), x)


def fori_loop_dense():
    rng = _rng()
    n = BATCH * 8
    x = rng.normal(size=(n, 8)).astype("float32")
    y = (np.sin(x[:, :1]) * x[:, 1:2]).astype("float32")
    inputs = keras.Input((8,))
    h = Iterated(8)(inputs)
    return keras.Model(inputs, layers.Dense(1)(h)), x, y, {"loss": "mse"}, {}


def sort_pooling():
    """Top-k pooling by `ops.sort` over the time axis of a convolution's features."""
    x, y = _series(BATCH * 8, steps=32)
    inputs = keras.Input((32, 1))
    h = layers.Conv1D(8, 5, activation="relu")(inputs)
    h = layers.Lambda(lambda t: ops.sort(t, axis=1)[:, -4:, :])(h)
    out = layers.Dense(3)(layers.Flatten()(h))
    return keras.Model(inputs, out), x, y, _logits_loss(), {}


def quantile_regression():
    """Three quantiles from one head, a pinball loss written as a function."""
    rng = _rng()
    n = BATCH * 8
    x = rng.normal(size=(n, 4)).astype("float32")
    y = (x[:, :1] + (0.5 + np.abs(x[:, 1:2])) * rng.normal(size=(n, 1))).astype("float32")

    def pinball(y_true, y_pred):
        q = ops.convert_to_tensor([0.1, 0.5, 0.9])
        e = y_true - y_pred
        return ops.mean(ops.maximum(q * e, (q - 1.0) * e), axis=-1)

    inputs = keras.Input((4,))
    h = layers.Dense(32, activation="relu")(inputs)
    return keras.Model(inputs, layers.Dense(3)(h)), x, y, {"loss": pinball}, {}


def embedding_bag_mean():
    """Variable-length bags of ids: a masked mean of embeddings (mask_zero) into a
    Dense, binary cross-entropy on probabilities."""
    x, y = _tokens(BATCH * 8, vocab=1000)
    inputs = keras.Input((24,), dtype="int32")
    e = layers.Embedding(1000, 16, mask_zero=True)(inputs)
    h = layers.GlobalAveragePooling1D()(e)
    out = layers.Dense(1, activation="sigmoid")(layers.Dense(16, activation="relu")(h))
    return keras.Model(inputs, out), x, y.astype("float32")[:, None], {
        "loss": "binary_crossentropy"}, {}


def per_layer_mixed_policy():
    """One layer under the `mixed_float16` policy in a float32 model (no global
    policy, so no loss scaling)."""
    x, y = _images(BATCH * 8, size=8)
    model = keras.Sequential([keras.Input((8, 8, 1)), layers.Conv2D(8, 3, activation="relu"),
                              layers.Flatten(), layers.Dense(32, activation="relu", dtype="mixed_float16"),
                              layers.Dense(4, dtype="float32")])
    return model, x, y, _logits_loss(), {}


def stateful_lstm():
    """A stateful LSTM on consecutive windows of one long series (fixed batch size,
    no shuffling), states reset each epoch by Keras."""
    rng = _rng()
    t = np.arange(BATCH * 8 * 10 + 1)
    series = np.sin(0.2 * t) + 0.1 * rng.normal(size=t.shape)
    windows = series[:-1].reshape(BATCH * 8, 10, 1).astype("float32")
    y = series[10::10][:BATCH * 8, None].astype("float32")
    model = keras.Sequential([keras.Input(batch_shape=(BATCH, 10, 1)), layers.LSTM(16, stateful=True),
                              layers.Dense(1)])
    return model, windows, y, {"loss": "mse"}, {}


def char_lstm_generation():
    """keras-io LSTM text generation: one-hot character windows, an LSTM, a softmax
    over the next character."""
    rng = _rng()
    chars, maxlen, n = 20, 12, BATCH * 8
    text = np.tile(np.arange(chars), 200) + rng.integers(0, 2, chars * 200)
    text = text % chars
    starts = rng.integers(0, len(text) - maxlen - 1, n)
    x = np.eye(chars, dtype="float32")[np.stack([text[s:s + maxlen] for s in starts])]
    y = np.eye(chars, dtype="float32")[text[starts + maxlen]]
    model = keras.Sequential([keras.Input((maxlen, chars)), layers.LSTM(32),
                              layers.Dense(chars, activation="softmax")])
    return model, x, y, {"loss": "categorical_crossentropy"}, {}


def binding_constraints():
    """Constraints that bind: `NonNeg` and `UnitNorm` kernels (Keras projects the
    weights after each update)."""
    rng = _rng()
    n = BATCH * 8
    x = np.abs(rng.normal(size=(n, 10))).astype("float32")
    y = (x @ np.abs(rng.normal(size=(10, 1))) + 0.1 * rng.normal(size=(n, 1))).astype("float32")
    inputs = keras.Input((10,))
    h = layers.Dense(16, activation="relu", kernel_constraint=keras.constraints.UnitNorm(axis=0))(inputs)
    out = layers.Dense(1, kernel_constraint=keras.constraints.NonNeg())(h)
    return keras.Model(inputs, out), x, y, {"loss": "mse"}, {}


class LazyModel(keras.Model):
    """Layers created in `build`, not `__init__` (sizes from the input shape)."""

    def build(self, input_shape):
        self.hidden = layers.Dense(input_shape[-1] * 2, activation="relu")
        self.out = layers.Dense(3)

    def call(self, x):
        return self.out(self.hidden(x))


def layers_created_in_build():
    rng = _rng()
    n = BATCH * 8
    x = rng.normal(size=(n, 6)).astype("float32")
    y = (np.argmax(x[:, :3], 1)).astype("int32")
    return LazyModel(), x, y, _logits_loss(), {}


def float64_mlp():
    """A model in float64 (`keras.config.set_floatx("float64")`; the sweep resets it):
    float64 weights, float32 curvature."""
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")  # Keras caches it from floatx
    rng = _rng()
    x = rng.normal(size=(BATCH * 8, 8))
    y = (x[:, 0] * x[:, 1] > 0).astype("int32")
    model = keras.Sequential([keras.Input((8,)), layers.Dense(32, activation="relu"),
                              layers.Dense(2)])
    return model, x, y, _logits_loss(), {}


class MinimalRNNCell(layers.Layer):
    """The Keras RNN guide's cell: its own kernels, `keras.layers.RNN` runs it."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.state_size = units

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], self.units),
                                      initializer="uniform", name="kernel")
        self.recurrent_kernel = self.add_weight(shape=(self.units, self.units),
                                                initializer="uniform",
                                                name="recurrent_kernel")

    def call(self, inputs, states):
        output = ops.tanh(ops.matmul(inputs, self.kernel)
                          + ops.matmul(states[0], self.recurrent_kernel))
        return output, [output]


def custom_rnn_cell():
    rng = _rng()
    x = rng.normal(size=(BATCH * 8, 12, 4)).astype("float32")
    y = (x[:, :, 0].sum(1) > 0).astype("int32")
    model = keras.Sequential([keras.Input((12, 4)), layers.RNN(MinimalRNNCell(16)),
                              layers.Dense(2)])
    return model, x, y, _logits_loss(), {}


def bidirectional_gru_states():
    """`Bidirectional(GRU(return_state=True))`: the output and both final states."""
    rng = _rng()
    x = rng.normal(size=(BATCH * 8, 10, 3)).astype("float32")
    y = (x[:, -3:, 1].sum(1) > 0).astype("int32")
    inputs = keras.Input((10, 3))
    output, forward_h, backward_h = layers.Bidirectional(
        layers.GRU(8, return_state=True))(inputs)
    h = layers.Concatenate()([output, forward_h, backward_h])
    return keras.Model(inputs, layers.Dense(2)(h)), x, y, _logits_loss(), {}


def dict_outputs_loss_weights():
    """Named inputs and a dict of outputs, with dicts of losses, loss weights and
    metrics."""
    rng = _rng()
    n = BATCH * 8
    x = rng.normal(size=(n, 6)).astype("float32")
    y = {"cls": (x[:, 0] > 0).astype("int32"),
         "reg": x[:, 1:3].sum(1, keepdims=True).astype("float32")}
    inputs = keras.Input((6,), name="features")
    h = layers.Dense(16, activation="relu")(inputs)
    model = keras.Model(inputs, {"cls": layers.Dense(2, name="cls")(h),
                                 "reg": layers.Dense(1, name="reg")(h)})
    compile_args = {
        "loss": {"cls": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                 "reg": "mse"},
        "loss_weights": {"cls": 1.0, "reg": 0.5},
        "metrics": {"cls": ["accuracy"], "reg": ["mae"]}}
    return model, {"features": x}, y, compile_args, {}


def padding_cropping_upsampling():
    """`ZeroPadding2D`, a strided convolution, bilinear `UpSampling2D`, a stride-1
    `Conv2DTranspose` and `Cropping2D` (a denoising-autoencoder shape)."""
    x = _rng().random(size=(BATCH * 8, 14, 14, 1)).astype("float32")
    inputs = keras.Input((14, 14, 1))
    h = layers.ZeroPadding2D(1)(inputs)
    h = layers.Conv2D(8, 3, strides=2, activation="relu")(h)
    h = layers.UpSampling2D(2, interpolation="bilinear")(h)
    h = layers.Conv2DTranspose(4, 3, padding="same")(h)
    h = layers.Cropping2D(((0, 0), (0, 0)))(h)
    h = layers.Conv2D(1, 3, padding="same", activation="sigmoid")(h)
    return keras.Model(inputs, h), x, x, {"loss": "binary_crossentropy"}, {}


def hashing_discretization():
    """keras-io structured data's other preprocessing layers inside the model:
    `Hashing` of an integer id, `Discretization` then `CategoryEncoding` of a value."""
    rng = _rng()
    n = BATCH * 8
    ids = rng.integers(0, 1000, size=(n, 1))
    values = rng.normal(size=(n, 1)).astype("float32")
    y = ((ids[:, 0] % 3 == 0) ^ (values[:, 0] > 0)).astype("int32")
    id_input = keras.Input((1,), dtype="int64", name="ids")
    value_input = keras.Input((1,), name="values")
    hashed = layers.Hashing(num_bins=64, output_mode="one_hot")(id_input)
    bins = layers.Discretization(bin_boundaries=[-1.0, 0.0, 1.0])(value_input)
    encoded = layers.CategoryEncoding(num_tokens=4, output_mode="one_hot")(bins)
    h = layers.Dense(16, activation="relu")(layers.Concatenate()([hashed, encoded]))
    model = keras.Model([id_input, value_input], layers.Dense(2)(h))
    return model, {"ids": ids, "values": values}, y, _logits_loss(), {}


def embedding_regularized_maxpool():
    """An `Embedding` with a regulariser and a `MaxNorm` constraint,
    `SpatialDropout1D`, `Conv1D` and global max pooling (keras-io's text CNN)."""
    rng = _rng()
    x = rng.integers(1, 200, size=(BATCH * 8, 20))
    y = np.isin(x, np.arange(1, 20)).any(1).astype("int32")
    model = keras.Sequential([
        keras.Input((20,), dtype="int32"),
        layers.Embedding(200, 16, embeddings_regularizer=keras.regularizers.L2(1e-4),
                         embeddings_constraint=keras.constraints.MaxNorm(2.0)),
        layers.SpatialDropout1D(0.2), layers.Conv1D(16, 3, activation="relu"),
        layers.GlobalMaxPooling1D(), layers.Dense(2)])
    return model, x, y, _logits_loss(), {}


def softmax_layer_noise_layers():
    """A separate `Activation("softmax")` under categorical cross-entropy on
    probabilities, after `GaussianNoise`, `LeakyReLU`, `AlphaDropout` and
    `ActivityRegularization`."""
    rng = _rng()
    x = rng.normal(size=(BATCH * 8, 10)).astype("float32")
    y = np.eye(3, dtype="float32")[np.argmax(x[:, :3], 1)]
    model = keras.Sequential([
        keras.Input((10,)), layers.GaussianNoise(0.1), layers.Dense(32),
        layers.LeakyReLU(0.1), layers.AlphaDropout(0.1),
        layers.ActivityRegularization(l2=1e-4), layers.Dense(3),
        layers.Activation("softmax")])
    return model, x, y, {"loss": "categorical_crossentropy", "metrics": ["accuracy"]}, {}


class NoisyWhenTraining(keras.Model):
    """Subclassed, with Python control flow on `training`."""

    def __init__(self):
        super().__init__()
        self.hidden = layers.Dense(16, activation="relu")
        self.out = layers.Dense(2)

    def call(self, x, training=None):
        if training:
            x = x + 0.05 * keras.random.normal(ops.shape(x))
        return self.out(self.hidden(x))


def subclassed_training_branch():
    x = _rng().normal(size=(BATCH * 8, 5)).astype("float32")
    y = (x.sum(1) > 0).astype("int32")
    return NoisyWhenTraining(), x, y, _logits_loss(), {}


def multimodal_inputs():
    """Image, tabular and token inputs, each through its own branch, concatenated."""
    rng = _rng()
    n = BATCH * 8
    images = rng.random(size=(n, 12, 12, 1)).astype("float32")
    table = rng.normal(size=(n, 4)).astype("float32")
    tokens = rng.integers(0, 50, size=(n, 8))
    y = ((images.mean((1, 2, 3)) > 0.5) ^ (table[:, 0] > 0)
         ^ (tokens[:, 0] > 25)).astype("int32")
    image_input, table_input = keras.Input((12, 12, 1)), keras.Input((4,))
    token_input = keras.Input((8,), dtype="int32")
    h = layers.Concatenate()([
        layers.GlobalAveragePooling2D()(layers.Conv2D(8, 3, activation="relu")(image_input)),
        layers.Dense(8, activation="relu")(table_input),
        layers.GlobalAveragePooling1D()(layers.Embedding(50, 8)(token_input))])
    h = layers.Dense(16, activation="relu")(h)
    model = keras.Model([image_input, table_input, token_input], layers.Dense(2)(h))
    return model, [images, table, tokens], y, _logits_loss(), {}


def depth_multiplier():
    """`DepthwiseConv2D` and `SeparableConv2D` with `depth_multiplier=2`."""
    x = _rng().random(size=(BATCH * 8, 12, 12, 3)).astype("float32")
    y = (x[:, :6, :, 0].mean((1, 2)) > x[:, 6:, :, 0].mean((1, 2))).astype("int32")
    model = keras.Sequential([
        keras.Input((12, 12, 3)),
        layers.DepthwiseConv2D(3, depth_multiplier=2, activation="relu"),
        layers.SeparableConv2D(8, 3, depth_multiplier=2), layers.GlobalAveragePooling2D(),
        layers.Dense(2)])
    return model, x, y, _logits_loss(), {}


def conv_lstm1d():
    """`ConvLSTM1D` over sequences of 1-D signals."""
    x = _rng().normal(size=(BATCH * 8, 6, 10, 2)).astype("float32")
    y = (x[:, -1, :, 0].mean(1) > 0).astype("int32")
    model = keras.Sequential([keras.Input((6, 10, 2)), layers.ConvLSTM1D(4, 3),
                              layers.Flatten(), layers.Dense(2)])
    return model, x, y, _logits_loss(), {}


def _pretrained(model, x, y):
    """`model` trained briefly (two epochs of Adam) on `x`, `y`: the "pretrained"
    weights a LoRA fine-tuning starts from."""
    model.compile(optimizer=keras.optimizers.Adam(1e-2), **_logits_loss())
    model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0)
    return model


def lora_fine_tuning():
    """Keras's LoRA (`layer.enable_lora(rank)`, as in the KerasHub fine-tuning
    guides) on a pretrained MLP: its kernels frozen, rank-4 adapters trained on a
    new labelling of the same images (the pretraining's classes, shifted by one)."""
    x, y = _images(BATCH * 8, classes=4)
    x = x.reshape(len(x), -1)
    dense = [layers.Dense(64, activation="relu"), layers.Dense(64, activation="relu"),
             layers.Dense(4)]
    model = _pretrained(keras.Sequential([keras.Input(x.shape[1:]), *dense]),
                        x[::-1], y[::-1])
    for layer in dense:
        layer.enable_lora(4)
    return model, x, (y + 1) % 4, _logits_loss(), {}


def lora_attention():
    """LoRA on a pretrained transformer block's attention, as KerasHub's
    `backbone.enable_lora(rank)` does: the query and value projections
    (`EinsumDense`, one `B` per head) get rank-4 adapters, everything else is
    frozen but the classification head; the task is a new labelling."""
    x, y = _tokens(BATCH * 8, length=16, vocab=200, classes=2, pad=False)
    inputs = keras.Input((16,), dtype="int32")
    h = layers.Embedding(200, 32)(inputs)
    attention = layers.MultiHeadAttention(4, 8)
    h = layers.LayerNormalization()(h + attention(h, h))
    h = layers.GlobalAveragePooling1D()(h)
    model = _pretrained(keras.Model(inputs, layers.Dense(2)(h)), x, y)
    for layer in model.layers[:-1]:
        layer.trainable = False
    attention.trainable = True
    for projection in (attention._query_dense, attention._value_dense):
        projection.enable_lora(4)
    for projection in (attention._key_dense, attention._output_dense):
        projection.trainable = False
    # The new task: the class is whether token 1 or 2 appears in the first half.
    first_half = (x[:, :8] == 1).any(axis=1) | (x[:, :8] == 2).any(axis=1)
    return model, x, first_half.astype("int32"), _logits_loss(), {}


PROGRAMS = {f.__name__: f for f in (
    gru_classifier, masked_lstm, simple_rnn_tagger, causal_transformer,
    separable_grouped_dilated, wavenet_causal, conv3d_video,
    conv1d_transpose_autoencoder, siamese_shared, nested_augmented,
    custom_layers_add_loss, regression_losses, multilabel_class_weight,
    smoothing_and_class_weight, ignore_class_tagger, python_loss_function,
    own_train_step, add_loss_only, vae_added_kl, collaborative_filtering,
    string_features, text_vectorization, unet_segmentation, masked_attention,
    squeeze_excitation, conv_lstm, other_keras_losses, callbacks_and_schedules,
    partial_losses_bias_free, unnormalised_mlp, mobilenet_v2, efficientnet_b0,
    frozen_base_fine_tuning, vision_transformer, distiller, mixed_precision_convnet,
    deeplab_bilinear_decoder, video_cnn_rnn, mini_gpt, seq2seq_transformer, ocr_ctc,
    lstm_regression, contrastive_dual_encoder, pixelcnn, espcn_super_resolution,
    pointnet, graph_attention, neural_decision_forest, gated_residual_network,
    tied_embedding_lm, tied_autoencoder, luong_attention, attention_2d,
    lstm_seq2seq_states, mixture_of_experts, convnext_block, mlp_mixer, fnet_fft,
    random_patch_masking, pydataset_input, gru_reset_before_stacked_rnn,
    stop_gradient_target, recompute_grad_layer, fori_loop_dense, sort_pooling,
    quantile_regression, embedding_bag_mean, per_layer_mixed_policy, stateful_lstm,
    char_lstm_generation, binding_constraints, layers_created_in_build, float64_mlp,
    custom_rnn_cell, bidirectional_gru_states, dict_outputs_loss_weights,
    padding_cropping_upsampling, hashing_discretization, embedding_regularized_maxpool,
    softmax_layer_noise_layers, subclassed_training_branch, multimodal_inputs,
    depth_multiplier, conv_lstm1d, transfer_learning, lora_fine_tuning,
    lora_attention)}
