"""The first-order partner of uncovered variables, against Keras's own optimizers."""

import numpy as np
import pytest
import keras
import tensorflow as tf

import keras_tkfac
from keras_tkfac import step_size
from tests import helpers

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _model():
    """A Dense layer (covered) between two LayerNormalizations (uncovered)."""
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((5,)),
        keras.layers.LayerNormalization(),
        keras.layers.Dense(4, activation="tanh"),
        keras.layers.LayerNormalization(),
        keras.layers.Dense(3),
    ])


def _uncovered(model):
    return [v for v in model.trainable_variables if "layer_normalization" in v.path]


def _train(optimizer, steps=4, weight_decay_exclusions=()):
    x, y = helpers.classification_data(n=16)
    base = _model()
    model = keras_tkfac.wrap(base)
    model.compile(optimizer=optimizer, loss=LOSS)
    model.fit(x, y, batch_size=16, epochs=steps, shuffle=False, verbose=0)
    return base


def _reference(keras_optimizer, steps=4):
    """The same model trained by a Keras optimizer: the weights it gives the
    uncovered variables when the covered ones follow TKFAC's trajectory are not
    comparable, so the covered layers are frozen in both runs."""
    x, y = helpers.classification_data(n=16)
    base = _model()
    for layer in base.layers:
        if isinstance(layer, keras.layers.Dense):
            layer.trainable = False
    base.compile(optimizer=keras_optimizer, loss=LOSS)
    base.fit(x, y, batch_size=16, epochs=steps, shuffle=False, verbose=0)
    return base


def _frozen_dense_train(optimizer, steps=4):
    x, y = helpers.classification_data(n=16)
    base = _model()
    for layer in base.layers:
        if isinstance(layer, keras.layers.Dense):
            layer.trainable = False
    model = keras_tkfac.wrap(base)
    model.compile(optimizer=optimizer, loss=LOSS)
    model.fit(x, y, batch_size=16, epochs=steps, shuffle=False, verbose=0)
    return base


def _excluding_gamma(optimizer):
    optimizer.exclude_from_weight_decay(var_names=["gamma"])
    return optimizer


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (dict(learning_rate=0.2, fallback="adam", fallback_lr_ratio=0.05),
         lambda: keras.optimizers.Adam(0.01)),
        (dict(learning_rate=0.2, fallback="adam", fallback_lr_ratio=0.05,
              weight_decay=0.1),
         lambda: keras.optimizers.AdamW(0.01, weight_decay=0.1)),
        (dict(fallback=keras.optimizers.Adam(0.02, beta_1=0.8, beta_2=0.99,
                                             epsilon=1e-5)),
         lambda: keras.optimizers.Adam(0.02, beta_1=0.8, beta_2=0.99, epsilon=1e-5)),
        (dict(learning_rate=0.1, momentum=0.9, fallback="sgd", fallback_lr_ratio=1.0),
         lambda: keras.optimizers.SGD(0.1, momentum=0.9)),
        (dict(fallback=keras.optimizers.SGD(0.05, momentum=0.5)),
         lambda: keras.optimizers.SGD(0.05, momentum=0.5)),
        # The instance's weight decay (and its exclusions) replace the curvature
        # optimizer's on the partner's variables.
        (dict(fallback=keras.optimizers.AdamW(0.02, weight_decay=0.3),
              weight_decay=0.05),
         lambda: keras.optimizers.AdamW(0.02, weight_decay=0.3)),
        (dict(fallback=keras.optimizers.SGD(0.05, momentum=0.5, weight_decay=0.2)),
         lambda: keras.optimizers.SGD(0.05, momentum=0.5, weight_decay=0.2)),
        (dict(fallback=_excluding_gamma(keras.optimizers.AdamW(0.02, weight_decay=0.3))),
         lambda: _excluding_gamma(keras.optimizers.AdamW(0.02, weight_decay=0.3))),
    ],
)
def test_partner_matches_keras_optimizer(ours, theirs):
    for cls in (keras_tkfac.TKFAC, keras_tkfac.KFAC):
        trained = _frozen_dense_train(cls(fisher="empirical", **ours))
        expected = _reference(theirs())
        for a, b in zip(_uncovered(trained), _uncovered(expected)):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=2e-5, atol=2e-6)


def test_partner_state_only_for_uncovered_variables():
    optimizer = keras_tkfac.TKFAC(fisher="empirical")
    _train(optimizer, steps=1)
    names = [v.name for v in optimizer.variables]
    assert sum("partner_m" in n for n in names) == 4  # 2 LayerNorms x (gamma, beta)
    assert sum("partner_v" in n for n in names) == 4
    assert sum("momentum" in n for n in names) == 4  # 2 Dense x (kernel, bias)


def test_the_fallback_warning_names_a_bounded_number_of_variables(monkeypatch):
    """A model leaving many variables to the partner gets a warning naming the
    first `LOGGED_PATHS` and the count of the rest; the full list is at DEBUG."""
    from keras_tkfac import partner
    monkeypatch.setattr(partner, "LOGGED_PATHS", 3)
    records = []
    monkeypatch.setattr(partner.logging, "warning",
                        lambda *args: records.append(("warning", args[0] % args[1:])))
    monkeypatch.setattr(partner.logging, "debug",
                        lambda *args: records.append(("debug", args[0] % args[1:])))
    paths = [v.path for v in _uncovered(_train(keras_tkfac.TKFAC(fisher="empirical"),
                                               steps=1))]
    assert len(paths) == 4
    (level, warning), (debug_level, debug) = records
    assert (level, debug_level) == ("warning", "debug")
    assert "4 of 8 variable(s)" in warning
    assert warning.endswith(", ".join(paths[:3]) + ", ... and 1 more "
                            "(all of them at logging level DEBUG)")
    assert debug.endswith(", ".join(paths))
    records.clear()
    monkeypatch.setattr(partner, "LOGGED_PATHS", 4)
    paths = [v.path for v in _uncovered(_train(keras_tkfac.TKFAC(fisher="empirical"),
                                               steps=1))]
    ((level, warning),) = records
    assert warning.endswith(", ".join(paths))


def test_learning_rate_schedule_drives_the_partner():
    schedule = keras.optimizers.schedules.ExponentialDecay(0.5, 1, 0.5)
    trained = _frozen_dense_train(keras_tkfac.TKFAC(
        learning_rate=schedule, fisher="empirical", fallback_lr_ratio=0.02))
    expected = _reference(keras.optimizers.Adam(
        keras.optimizers.schedules.ExponentialDecay(0.01, 1, 0.5)))
    for a, b in zip(_uncovered(trained), _uncovered(expected)):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize(
    "fallback", ["adam", keras.optimizers.AdamW(3e-3, weight_decay=0.01)]
)
def test_partner_config_and_state_survive_saving(fallback, tmp_path):
    x, y = helpers.classification_data(n=16)
    model = keras_tkfac.wrap(_model())
    model.compile(optimizer=keras_tkfac.TKFAC(fallback=fallback, seed=1), loss=LOSS)
    model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    for m in (model, loaded):
        m.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize(
    "fallback", ["adamw", keras.optimizers.RMSprop(), keras.optimizers.Adam(amsgrad=True), 3]
)
def test_invalid_fallback_raises(fallback):
    with pytest.raises(ValueError, match="fallback"):
        keras_tkfac.TKFAC(fallback=fallback)


def test_invalid_fallback_lr_ratio_raises():
    with pytest.raises(ValueError, match="fallback_lr_ratio"):
        keras_tkfac.TKFAC(fallback_lr_ratio=0.0)


def test_adam_partner_trains_rare_embedding_rows():
    """Tokens seen once in 64 examples still move under the Adam partner, as under
    Adam, while momentum SGD at the curvature step size barely moves them."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2000, size=(64, 6)).astype("int32")
    y = (x % 2).sum(1) % 2

    def moved(fallback):
        keras.utils.set_random_seed(0)
        base = keras.Sequential([
            keras.Input((6,), dtype="int32"),
            keras.layers.Embedding(2000, 8),
            keras.layers.LayerNormalization(),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(2),
        ])
        model = keras_tkfac.wrap(base, exclude=[keras.layers.Embedding])
        before = base.layers[0].embeddings.numpy().copy()
        model.compile(optimizer=keras_tkfac.TKFAC(fallback=fallback), loss=LOSS)
        model.fit(x, y, batch_size=64, epochs=3, verbose=0)
        rows = np.unique(x)
        return np.abs(base.layers[0].embeddings.numpy()[rows] - before[rows]).mean()

    adam, sgd = moved("adam"), moved("sgd")
    assert np.isfinite(adam) and adam > 10 * sgd


def _first_step_lengths(**kwargs):
    """One `fit` step of `_model()` (two preconditioned Dense layers, two
    LayerNormalizations on the partner) on one batch: each Dense layer's `a` (its
    step's length over that of RMSProp's first step at learning rate 1, which the
    grafted direction has) and the partner's learning rate (its step's length over
    that of Keras's Adam's first step at learning rate 1)."""
    x, y = helpers.classification_data(n=16)
    base = _model()
    with tf.GradientTape() as tape:
        loss = LOSS(y, base(x))
    grads = {v.path: g.numpy() for v, g in zip(
        base.trainable_variables, tape.gradient(loss, base.trainable_variables))}
    before = {v.path: v.numpy().copy() for v in base.trainable_variables}
    model = keras_tkfac.wrap(base)
    model.compile(optimizer=keras_tkfac.TKFAC(seed=0, **kwargs), loss=LOSS)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)

    def length(paths, rate_one, epsilon):
        moved = [before[p] - v.numpy() for v in base.trainable_variables
                 for p in paths if v.path == p]
        unit = [g / (np.abs(g) + epsilon) for p in paths for g in [grads[p]]]
        return (np.sqrt(sum((m ** 2).sum() for m in moved))
                / (rate_one * np.sqrt(sum((u ** 2).sum() for u in unit))))

    dense = [[v.path for v in layer.trainable_variables] for layer in base.layers
             if isinstance(layer, keras.layers.Dense)]
    partner = [v.path for v in _uncovered(base)]
    # (Keras's Adam adds epsilon before the bias correction: at step 1 it acts as
    # epsilon / sqrt(1 - beta_2).)
    return ([length(paths, 1.0, 1e-7) for paths in dense],
            length(partner, 1e-3, 1e-7 / np.sqrt(1e-3)) * 1e-3)


def test_the_partner_moves_as_far_as_the_quadratic_model_moves_the_rest():
    # On the first step (no previous step) the preconditioned layers move by
    # a * u_l, |u_l| = |G_l / (|G_l| + eps)|: both give the same a.
    (a, a_second), partner_rate = _first_step_lengths()
    np.testing.assert_allclose(a, a_second, rtol=1e-4)
    assert a > 2e-3  # the model moved them further than RMSProp at 1e-3 would
    ceiling = step_size.DEFAULT_FALLBACK_LR_CEILING["graft_quadratic"]
    np.testing.assert_allclose(partner_rate, 1e-3 * min(max(a / 1e-3, 1.0), ceiling),
                               rtol=1e-4)
    _, high_rate = _first_step_lengths(fallback_lr_ceiling=1e3)
    np.testing.assert_allclose(high_rate, a, rtol=1e-4)
    # A ceiling below a / 1e-3 binds; 1 keeps Adam's learning rate.
    (a_capped, _), capped_rate = _first_step_lengths(fallback_lr_ceiling=1.5)
    np.testing.assert_allclose(a_capped, a, rtol=1e-5)
    np.testing.assert_allclose(capped_rate, 1.5e-3, rtol=1e-4)
    _, plain_rate = _first_step_lengths(fallback_lr_ceiling=1.0)
    np.testing.assert_allclose(plain_rate, 1e-3, rtol=1e-4)
    # An instance's learning rate is its own.
    _, own_rate = _first_step_lengths(fallback=keras.optimizers.Adam(2e-3))
    np.testing.assert_allclose(own_rate, 2e-3, rtol=1e-4)


@pytest.mark.parametrize("ceiling", [0.5, float("nan"), "10"])
def test_invalid_fallback_lr_ceiling_raises(ceiling):
    with pytest.raises(ValueError, match="fallback_lr_ceiling"):
        keras_tkfac.TKFAC(fallback_lr_ceiling=ceiling)


def test_adam_partner_matches_keras_adam_on_variables_of_two_dtypes():
    """The partner's bias correction, traced once per dtype in a step, is each
    variable's own: float32 and float64 normalisation weights both follow Keras's
    Adam over several steps."""

    def model():
        keras.utils.set_random_seed(0)
        return keras.Sequential([
            keras.Input((5,)),
            keras.layers.LayerNormalization(dtype="float64"),
            keras.layers.Dense(4, activation="tanh", trainable=False),
            keras.layers.LayerNormalization(),
            keras.layers.Dense(3, trainable=False),
        ])

    x, y = helpers.classification_data(n=16)
    ours = model()
    wrapped = keras_tkfac.wrap(ours)
    wrapped.compile(optimizer=keras_tkfac.TKFAC(
        fallback=keras.optimizers.Adam(0.01), seed=0), loss=LOSS)
    wrapped.fit(x, y, batch_size=16, epochs=4, shuffle=False, verbose=0)
    theirs = model()
    theirs.compile(optimizer=keras.optimizers.Adam(0.01), loss=LOSS)
    theirs.fit(x, y, batch_size=16, epochs=4, shuffle=False, verbose=0)
    assert {v.dtype for v in ours.trainable_variables} == {"float32", "float64"}
    for a, b in zip(ours.trainable_variables, theirs.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6,
                                   err_msg=a.path)
