"""Keras optimizer features, mixed precision, callbacks and the CurvatureMonitor."""

import os

import numpy as np
import pytest
from sklearn.datasets import load_digits
import keras
import tensorflow as tf

import keras_tkfac
from keras_tkfac import step_size
from tests import helpers
from tests.test_optimizer import reference_training

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
ONE_STEP = dict(learning_rate=0.5, damping=1e-2, momentum=0.0, factor_decay=0.95,
                factor_update_freq=1, inverse_update_freq=1, kl_clip=None)


def _fit(steps=1, batch=16, **optimizer_args):
    x, y = helpers.classification_data(n=16)
    model = keras_tkfac.wrap(helpers.tiny_mlp())
    optimizer = keras_tkfac.TKFAC(fisher="empirical", seed=0, step_control="trust_region",
                                  **optimizer_args)
    model.compile(optimizer=optimizer, loss=LOSS)
    model.fit(x, y, batch_size=batch, epochs=steps, shuffle=False, verbose=0)
    return model, x, y


def _reference(x, y, grad_transform=None, decay_bias=True, **config):
    return reference_training(
        [w.numpy() for w in helpers.tiny_mlp().weights], x.astype(np.float64), y,
        1, approximation="tkfac", grad_transform=grad_transform,
        decay_bias=decay_bias, **config)[0]


def _assert_weights(model, expected):
    for got, want in zip(model.weights, expected):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-5)


def test_clipvalue_clips_the_raw_gradient_before_preconditioning():
    model, x, y = _fit(clipvalue=0.01, **ONE_STEP)
    _assert_weights(model, _reference(
        x, y, grad_transform=lambda gs: [np.clip(g, -0.01, 0.01) for g in gs], **ONE_STEP))


def test_global_clipnorm_clips_the_raw_gradient_before_preconditioning():
    def clip(grads):
        norm = np.sqrt(sum(np.sum(g**2) for g in grads))
        return [g * min(1.0, 0.05 / norm) for g in grads]

    model, x, y = _fit(global_clipnorm=0.05, **ONE_STEP)
    _assert_weights(model, _reference(x, y, grad_transform=clip, **ONE_STEP))


def test_clipnorm_trains():
    model, _, _ = _fit(steps=3, clipnorm=0.1)
    assert all(np.all(np.isfinite(w.numpy())) for w in model.weights)


def test_weight_decay_respects_exclude_from_weight_decay():
    x, y = helpers.classification_data(n=16)
    model = keras_tkfac.wrap(helpers.tiny_mlp())
    optimizer = keras_tkfac.TKFAC(fisher="empirical", seed=0, weight_decay=0.3,
                                  step_control="trust_region", **ONE_STEP)
    optimizer.exclude_from_weight_decay(var_names=["bias"])
    model.compile(optimizer=optimizer, loss=LOSS)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    _assert_weights(model, _reference(x, y, weight_decay=0.3, decay_bias=False,
                                      **ONE_STEP))


@pytest.mark.parametrize("options", [{}, {"step_control": "graft"},
                                     {"learning_rate": 3e-4}, {"learning_rate": 1e-2}],
                         ids=["default", "graft", "lr_3e-4", "lr_1e-2"])
def test_weight_decay_is_decoupled_at_the_learning_rate(options):
    # AdamW's rule: the decay moves each weight by `lr * weight_decay * w` on top of
    # the same step, whatever fraction of the model's step `lr` takes (it took the
    # fraction, 1 at the default, until 2026-11-30: 333 times too strong).
    x, y = helpers.classification_data(n=16)

    def one_step(weight_decay):
        model = keras_tkfac.wrap(helpers.tiny_mlp())
        model.compile(optimizer=keras_tkfac.TKFAC(seed=0, weight_decay=weight_decay,
                                                  **options), loss=LOSS)
        before = [w.numpy() for w in model.trainable_weights]
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
        return before, [w.numpy() for w in model.trainable_weights]

    before, plain = one_step(None)
    _, decayed = one_step(0.5)
    rate = options.get("learning_rate", step_size.DEFAULT_LEARNING_RATE[
        options.get("step_control", "graft_quadratic")])
    for w0, a, b in zip(before, plain, decayed):
        # `a - b` is a difference of float32 weights: it cannot resolve less than
        # their spacing (one rounding in `a`, two in `b`, `w - d w - lr s`): an
        # absolute tolerance of 1e-8, below the 6e-8 spacing at |w| = 0.5, failed
        # on one machine by 4.6e-8 on one of 20 elements.
        resolution = 2 * np.spacing(np.abs(np.asarray(a, np.float32))).max()
        np.testing.assert_allclose(a - b, rate * 0.5 * w0, rtol=1e-4, atol=resolution)


def test_loss_scale_factor_gives_the_same_training():
    plain, _, _ = _fit(steps=4)
    scaled, _, _ = _fit(steps=4, loss_scale_factor=1024.0)
    for a, b in zip(plain.weights, scaled.weights):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_updates_every_k_steps():
    x, y = helpers.classification_data(n=16)
    model = keras_tkfac.wrap(helpers.tiny_mlp())
    model.compile(optimizer=keras_tkfac.TKFAC(seed=0, gradient_accumulation_steps=2),
                  loss=LOSS)
    initial = [w.numpy() for w in model.weights]
    model.fit(x, y, batch_size=8, epochs=1, steps_per_epoch=1, verbose=0)
    for old, new in zip(initial, model.weights):
        np.testing.assert_array_equal(new.numpy(), old)
    model.fit(x[8:], y[8:], batch_size=8, epochs=1, steps_per_epoch=1, verbose=0)
    assert not np.allclose(model.weights[0].numpy(), initial[0])


@pytest.fixture
def floatx_float64():
    # Keras caches its global dtype policy from `floatx` when first read, so both
    # are set (and reset).
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    yield
    keras.config.set_floatx("float32")
    keras.config.set_dtype_policy("float32")


def test_a_float64_model_trains_as_the_float64_reference(floatx_float64):
    # `keras.config.set_floatx("float64")`: the weights, gradients and updates are
    # float64, the curvature float32 (as under mixed precision).
    x, y = helpers.classification_data(n=16)
    model = keras_tkfac.wrap(helpers.tiny_mlp())
    initial = [w.numpy() for w in model.weights]
    optimizer = keras_tkfac.TKFAC(fisher="empirical", seed=0, step_control="trust_region",
                                  **ONE_STEP)
    model.compile(optimizer=optimizer, loss=LOSS)
    model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
    assert all(w.dtype == "float64" for w in model.weights)
    expected = reference_training(initial, x.astype(np.float64), y, 3,
                                  approximation="tkfac", **ONE_STEP)[0]
    _assert_weights(model, expected)


def test_a_float64_model_trains_at_the_defaults_as_in_float32(floatx_float64):
    x, y = helpers.classification_data(n=32)
    initial = [w.numpy() for w in helpers.tiny_mlp().weights]
    losses = {}
    for floatx in ("float64", "float32"):
        keras.config.set_floatx(floatx)
        keras.config.set_dtype_policy(floatx)
        model = keras_tkfac.wrap(helpers.tiny_mlp())
        model.set_weights([w.astype(floatx) for w in initial])
        model.compile(optimizer=keras_tkfac.TKFAC(seed=0), loss=LOSS)
        losses[floatx] = model.fit(x, y, batch_size=16, epochs=3, shuffle=False,
                                   verbose=0).history["loss"]
        assert [w.dtype for w in model.weights] == [floatx] * 4
    assert np.all(np.isfinite(losses["float64"]))
    np.testing.assert_allclose(losses["float64"], losses["float32"], rtol=1e-4)


def test_a_float64_model_with_a_partner_trains_as_in_float32(floatx_float64):
    """The partner's learning rate follows the quadratic model (a float32 scale)
    while the learning rate is in `floatx`: until 2026-12-04 a float64 model with
    a partner variable (a LayerNormalization's) failed at its first step."""
    x, y = helpers.classification_data(n=32)

    def build():
        return keras.Sequential([
            keras.Input((x.shape[1],)), keras.layers.Dense(8, activation="tanh"),
            keras.layers.LayerNormalization(), keras.layers.Dense(3)])

    keras.config.set_floatx("float32")
    keras.config.set_dtype_policy("float32")
    keras.utils.set_random_seed(0)
    initial = [w.numpy() for w in build().weights]
    losses = {}
    for floatx in ("float64", "float32"):
        keras.config.set_floatx(floatx)
        keras.config.set_dtype_policy(floatx)
        model = keras_tkfac.wrap(build())
        model.set_weights([w.astype(floatx) for w in initial])
        model.compile(optimizer=keras_tkfac.TKFAC(seed=0), loss=LOSS)
        losses[floatx] = model.fit(x, y, batch_size=16, epochs=3, shuffle=False,
                                   verbose=0).history["loss"]
        assert any("partner_m" in v.path for v in model.optimizer.variables)
    assert np.all(np.isfinite(losses["float64"]))
    np.testing.assert_allclose(losses["float64"], losses["float32"], rtol=1e-4)

def test_use_ema_keeps_a_moving_average_of_the_weights():
    model, _, _ = _fit(steps=3, use_ema=True, ema_momentum=0.5)
    averages = model.optimizer._model_variables_moving_average
    assert len(averages) == len(model.trainable_variables)
    # `fit` ends by writing the averages into the model (Keras's behaviour).
    for average, weight in zip(averages, model.trainable_variables):
        np.testing.assert_allclose(weight.numpy(), average.numpy(), rtol=1e-6)


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    return (x / 16.0).astype("float32"), y.astype("int32")


# The quadratic-model step (its products, losses and adapted damping) under a
# LossScaleOptimizer too; and under a MirroredStrategy (the float32 reference on one
# device; two replicas differ from it by their summation order as well).
@pytest.mark.parametrize("policy, step_control, replicas", [
    ("mixed_float16", "graft", 1), ("mixed_bfloat16", "graft", 1),
    ("mixed_float16", "graft_quadratic", 1), ("mixed_float16", "graft_quadratic", 2)])
def test_mixed_precision_keeps_curvature_in_float32(request, digits, policy,
                                                   step_control, replicas):
    x, y = digits
    strategy = (request.getfixturevalue("mirrored") if replicas == 2
                else tf.distribute.get_strategy())

    def train(strategy):
        with strategy.scope():
            keras.utils.set_random_seed(0)
            model = keras_tkfac.wrap(keras.Sequential([
                keras.Input((64,)),
                keras.layers.Dense(64, activation="relu"),
                keras.layers.Dense(10),
                keras.layers.Activation("linear", dtype="float32"),
            ]))
            model.compile(optimizer=keras_tkfac.TKFAC(
                fisher="empirical", step_control=step_control, seed=0), loss=LOSS)
        model.fit(x, y, batch_size=128, epochs=2, shuffle=False, verbose=0)
        return model

    reference = train(tf.distribute.get_strategy())
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = train(strategy)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert model.distribute_strategy.num_replicas_in_sync == replicas
    if replicas > 1:
        helpers.assert_identical_on_replicas(model.weights + model.optimizer.variables)
    optimizer = getattr(model.optimizer, "inner_optimizer", model.optimizer)
    assert isinstance(optimizer, keras_tkfac.TKFAC)
    for slot in optimizer._slots:
        for variable in slot.factors + slot.inverses:
            assert variable.dtype == "float32"
    assert int(optimizer.skipped_statistics.numpy()) == 0
    if step_control == "graft_quadratic":
        assert float(optimizer.damping_scale.numpy()) != 1.0
    # 28 steps in 16-bit activations: bfloat16 keeps 8 mantissa bits (~0.4%),
    # float16 11; the training losses agree within 5% of the float32 run's.
    expected = reference.evaluate(x, y, verbose=0)
    got = model.evaluate(x, y, verbose=0)
    assert abs(got - expected) < 0.05 * expected + 1e-3, (got, expected)


def test_keras_callbacks_work_unchanged(digits, tmp_path):
    x, y = digits
    model = keras_tkfac.wrap(keras.Sequential([
        keras.Input((64,)), keras.layers.Dense(32, activation="relu"),
        keras.layers.Dense(10)]))
    model.compile(optimizer=keras_tkfac.TKFAC(seed=0), loss=LOSS)
    callbacks = [
        keras.callbacks.ModelCheckpoint(str(tmp_path / "best.keras")),
        keras.callbacks.LearningRateScheduler(lambda epoch, lr: 0.05 / (epoch + 1)),
        keras.callbacks.ReduceLROnPlateau(monitor="loss", patience=0, factor=0.5),
        keras.callbacks.EarlyStopping(monitor="loss", patience=10),
        keras.callbacks.TensorBoard(log_dir=str(tmp_path / "tb")),
    ]
    history = model.fit(x, y, batch_size=256, epochs=3, verbose=0, callbacks=callbacks)
    assert len(history.history["loss"]) == 3
    assert float(model.optimizer.learning_rate.numpy()) <= 0.05 / 3 + 1e-9
    restored = keras.models.load_model(str(tmp_path / "best.keras"))
    assert isinstance(restored, keras_tkfac.CurvatureModel)
    assert os.listdir(tmp_path / "tb")


def test_curvature_monitor_logs_to_history_and_tensorboard(digits, tmp_path):
    x, y = digits
    model = keras_tkfac.wrap(keras.Sequential([
        keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, activation="relu"),
        keras.layers.Flatten(), keras.layers.Dense(10)]))
    model.compile(optimizer=keras_tkfac.TKFAC(seed=0), loss=LOSS)
    monitor = keras_tkfac.CurvatureMonitor(freq=3, log_dir=str(tmp_path / "tb"))
    history = model.fit(x.reshape(-1, 8, 8, 1), y, batch_size=256, epochs=2,
                        verbose=0, callbacks=[monitor])
    conv = model.blocks[0].name
    for key in ("trace", "damping", "cond_left", "cond_right", "update_ratio"):
        values = history.history[f"curvature/{conv}/{key}"]
        assert len(values) == 2 and np.all(np.isfinite(values))
    assert 0 < history.history["curvature/kl_clip_scale"][-1] <= 1
    assert history.history["curvature/skipped_steps"][-1] == 0
    report = model.optimizer.curvature_report()
    # Trace-relative damping of the convolution: scale * max(delta, floor) / dim,
    # times the adapted factor (Levenberg-Marquardt, on under the default).
    dim = model.blocks[0].d_in * model.blocks[0].d_out
    adapted = float(model.optimizer.damping_scale.numpy())
    assert adapted != 1.0
    np.testing.assert_allclose(report[conv]["damping"],
                               adapted * model.optimizer.trace_damping_scale
                               * max(report[conv]["trace"], 1e-3) / dim,
                               rtol=1e-5)
    assert report[conv]["cond_left"] >= 1
    assert os.listdir(tmp_path / "tb")
    with pytest.raises(ValueError, match="freq"):
        keras_tkfac.CurvatureMonitor(freq=0)


def test_curvature_monitor_reports_layers_of_nested_models_that_share_a_name():
    """Two encoders with a layer named "proj": each gets its own entry, keyed by its
    path (one was reported under the other's key, its figures lost)."""
    x, y = helpers.classification_data(n=32)
    keras.utils.set_random_seed(0)

    def encoder(name):
        return keras.Sequential([keras.Input((5,)), keras.layers.Dense(
            4, activation="tanh", name="proj")], name=name)

    inputs = keras.Input((5,))
    joined = keras.layers.Concatenate()([encoder("a")(inputs), encoder("b")(inputs)])
    model = keras_tkfac.wrap(keras.Model(inputs, keras.layers.Dense(3, name="head")(joined)))
    model.compile(optimizer=keras_tkfac.TKFAC(seed=0), loss=LOSS)
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0,
                        callbacks=[keras_tkfac.CurvatureMonitor(freq=1)])
    report = model.optimizer.curvature_report()
    assert set(report) == {"kl_clip_scale", "a/proj", "b/proj", "head"}
    assert report["a/proj"]["trace"] != report["b/proj"]["trace"]
    for key in ("a/proj", "b/proj", "head"):
        assert np.isfinite(history.history[f"curvature/{key}/trace"][-1])
