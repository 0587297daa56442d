"""`model.fit` end to end: real data shipped by scikit-learn, every supported loss."""

import logging

import numpy as np
import pytest
from sklearn.datasets import load_digits
import keras

import keras_tkfac

STEPS = 60
BATCH = 128


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    return (x / 16.0).astype("float32"), y.astype("int32")


def _mlp():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10),
        ]
    )


def _convnet():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(10),
        ]
    )


def _train_loss(build, optimizer, x, y, steps=STEPS):
    model = keras_tkfac.wrap(build())
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    epochs = -(-steps * BATCH // len(x))
    model.fit(x, y, batch_size=BATCH, epochs=epochs, steps_per_epoch=None, verbose=0)
    return model.evaluate(x, y, batch_size=len(x), verbose=0)


def _assert_defaults_beat(build, x, y, baselines):
    """TKFAC and KFAC at their defaults end below every baseline's loss, at equal
    steps on the same data; `baselines` maps names to first-order optimizers."""
    optimizers = {"tkfac": keras_tkfac.TKFAC(seed=0), "kfac": keras_tkfac.KFAC(seed=0),
                  **baselines}
    losses = {name: _train_loss(build, optimizer, x, y)
              for name, optimizer in optimizers.items()}
    assert all(np.isfinite(v) for v in losses.values()), losses
    first_order = min(losses[name] for name in baselines)
    assert losses["tkfac"] < first_order, losses
    assert losses["kfac"] < first_order, losses


@pytest.mark.parametrize("build,reshape", [(_mlp, (64,)), (_convnet, (8, 8, 1))],
                         ids=["mlp", "convnet"])
def test_defaults_beat_adam_and_sgd_at_equal_steps(digits, build, reshape):
    x, y = digits
    x = x.reshape(-1, *reshape)
    _assert_defaults_beat(build, x, y, {"adam": keras.optimizers.Adam(),
                                        "sgd": keras.optimizers.SGD(momentum=0.9)})


@pytest.mark.parametrize(
    "activation,loss,make_y",
    [
        ("sigmoid", "binary_crossentropy", lambda y: (y % 2).astype("float32")[:, None]),
        (None, keras.losses.BinaryCrossentropy(from_logits=True),
         lambda y: (y % 2).astype("float32")[:, None]),
        (None, "mse", lambda y: np.eye(10, dtype="float32")[y]),
        ("sigmoid", "mse", lambda y: np.eye(10, dtype="float32")[y]),
        ("softmax", "categorical_crossentropy", lambda y: np.eye(10, dtype="float32")[y]),
    ],
)
def test_true_fisher_trains_every_supported_loss(digits, activation, loss, make_y):
    x, y = digits
    targets = make_y(y)
    keras.utils.set_random_seed(0)
    model = keras_tkfac.wrap(
        keras.Sequential(
            [
                keras.Input((64,)),
                keras.layers.Dense(32, activation="tanh"),
                keras.layers.Dense(targets.shape[1], activation=activation),
            ]
        )
    )
    model.compile(optimizer=keras_tkfac.TKFAC(), loss=loss)
    before = model.evaluate(x, targets, verbose=0)
    model.fit(x, targets, batch_size=BATCH, epochs=3, verbose=0)
    after = model.evaluate(x, targets, verbose=0)
    assert np.isfinite(after) and after < 0.7 * before


def _cubed_error(y_true, y_pred):
    """A user's loss: no sampling rule."""
    return keras.ops.mean(keras.ops.abs(y_true - y_pred) ** 3, axis=-1)


def _fit_both_fishers(digits, make_optimizer, loss):
    """`{fisher: (epoch losses, model, optimizer)}` of the MLP on one-hot digits
    trained with `make_optimizer(fisher)` for both Fisher types."""
    x, y = digits
    targets = np.eye(10, dtype="float32")[y]
    found = {}
    for fisher_type in ("true", "empirical"):
        keras.utils.set_random_seed(0)
        model = keras_tkfac.wrap(_mlp())
        optimizer = make_optimizer(fisher_type)
        model.compile(optimizer=optimizer, loss=loss)
        history = model.fit(x, targets, batch_size=BATCH, epochs=3, verbose=0,
                            shuffle=False)
        found[fisher_type] = (history.history["loss"], model, optimizer)
    return found


def test_empirical_fisher_with_a_loss_that_cannot_be_sampled(digits):
    """A user's loss has no sampling rule: at the default `fisher="true"` its
    output takes the empirical Fisher, so training equals `fisher="empirical"`'s
    exactly."""
    found = _fit_both_fishers(
        digits, lambda fisher_type: keras_tkfac.KFAC(fisher=fisher_type), _cubed_error)
    for losses, _, _ in found.values():
        assert losses[-1] < losses[0]
    for a, b in zip(found["true"][1].weights, found["empirical"][1].weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_huber_samples_its_hessian_and_trains(digits):
    """Huber's output gradients under the true Fisher come from its Hessian at the
    real labels: the factors' statistics differ from the empirical Fisher's, and
    training lowers the loss without NaN either way."""
    found = _fit_both_fishers(
        digits, lambda fisher_type: keras_tkfac.TKFAC(fisher=fisher_type, seed=0),
        keras.losses.Huber(delta=0.5))
    statistics = {}
    for fisher_type, (losses, _, optimizer) in found.items():
        assert np.all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0]
        statistics[fisher_type] = [
            v.numpy() for v in optimizer.variables
            if v.name.endswith(("_n_phi", "_n_psi", "_delta"))]
    assert statistics["true"]
    assert len(statistics["true"]) == len(statistics["empirical"])
    assert any(not np.allclose(a, b) for a, b in zip(statistics["true"],
                                                     statistics["empirical"]))


def test_sequence_dense_conv1d_and_fallback_layers_train(caplog):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 12, 3)).astype("float32")
    y = (x[:, :, 0].sum(1) > 0).astype("int32")
    keras.utils.set_random_seed(0)
    model = keras_tkfac.wrap(
        keras.Sequential(
            [
                keras.Input((12, 3)),
                keras.layers.Conv1D(8, 3, padding="causal", activation="relu"),
                keras.layers.LayerNormalization(),
                keras.layers.Dense(8, activation="tanh"),
                keras.layers.GlobalAveragePooling1D(),
                keras.layers.Dense(2),
            ]
        )
    )
    assert len(model.blocks) == 3
    model.compile(
        optimizer=keras_tkfac.TKFAC(),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    with caplog.at_level(logging.INFO, logger="absl"):
        history = model.fit(x, y, batch_size=64, epochs=8, verbose=0)
    assert "layer_normalization" in caplog.text and "fallback" in caplog.text
    assert history.history["accuracy"][-1] > 0.8
    assert all(np.all(np.isfinite(w.numpy())) for w in model.weights)


def test_wrap_keeps_predict_evaluate_and_plain_optimizers_working(digits):
    x, y = digits
    base = _mlp()
    expected = base.predict(x[:5], verbose=0)
    model = keras_tkfac.wrap(base)
    np.testing.assert_allclose(model.predict(x[:5], verbose=0), expected, rtol=1e-6)
    assert model.trainable_variables == base.trainable_variables
    model.compile(optimizer="adam",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=1, verbose=0)
    # Training the wrapper trains the wrapped model's own weights.
    np.testing.assert_allclose(model.predict(x[:5], verbose=0),
                               base.predict(x[:5], verbose=0), rtol=1e-6)
    assert not np.allclose(base.predict(x[:5], verbose=0), expected)


def _image_blocks(grouped=True):
    """Every convolution block kind on 8x8 digits: grouped, depthwise, transposed."""
    keras.utils.set_random_seed(0)
    # A grouped convolution runs through XLA on CPU (Keras's workaround), which
    # forward mode follows slowly: ~70 s of this test's ~85 s on the 2-core machine.
    grouped = [keras.layers.Conv2D(8, 3, groups=2, padding="same", activation="relu")
               ] if grouped else []
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
            *grouped,
            keras.layers.DepthwiseConv2D(3, strides=2, padding="same",
                                         activation="relu"),
            keras.layers.Conv2DTranspose(4, 3, strides=2, padding="same",
                                         activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(10),
        ]
    )


@pytest.mark.parametrize("grouped", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["depthwise_transposed", "grouped_depthwise_transposed"])
def test_defaults_train_every_convolution_block_kind_like_adam(digits, grouped):
    """At their defaults TKFAC and KFAC train a model with (grouped,) depthwise and
    transposed convolutions at least as well as Adam at its defaults, at equal
    steps; the grouped model in `make test-all`."""
    x, y = digits
    x = x.reshape(-1, 8, 8, 1)
    _assert_defaults_beat(lambda: _image_blocks(grouped), x, y,
                          {"adam": keras.optimizers.Adam()})


def _attention_classifier():
    """Embedding, self-attention (EinsumDense projections) and a dense head."""
    keras.utils.set_random_seed(0)
    tokens = keras.Input((12,), dtype="int32")
    h = keras.layers.Embedding(64, 16)(tokens)
    h = h + keras.layers.MultiHeadAttention(num_heads=2, key_dim=8)(h, h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    h = keras.layers.Dense(16, activation="relu")(h)
    return keras.Model(tokens, keras.layers.Dense(2)(h))


def test_defaults_train_embedding_and_attention_blocks_like_adam():
    """Whether token 1 occurs in a sequence of 12 tokens from 64: TKFAC and KFAC at
    their defaults against Adam at its defaults, at equal steps."""
    rng = np.random.default_rng(0)
    x = rng.integers(2, 64, size=(1024, 12))
    y = rng.integers(0, 2, size=1024)
    x[y == 1, rng.integers(0, 12, size=int(y.sum()))] = 1
    x, y = x.astype("int32"), y.astype("int32")
    _assert_defaults_beat(_attention_classifier, x, y,
                          {"adam": keras.optimizers.Adam()})
