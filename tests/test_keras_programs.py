"""Keras programs that train with Adam train with TKFAC/KFAC (issue 10)."""

import re

from absl import logging
import numpy as np
import pytest
import tensorflow as tf
import keras

import keras_tkfac
from keras_tkfac import fisher, loss_specs
from tests import helpers

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _fit(model, x, y, optimizer=None, **kwargs):
    model.compile(optimizer=optimizer or keras_tkfac.TKFAC(seed=0), loss=LOSS)
    return model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, **kwargs)


class TwoDense(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.body = keras.layers.Dense(4, activation="tanh")
        self.head = keras.layers.Dense(3)

    def call(self, x):
        return self.head(self.body(x))

    def describe(self):
        return "two dense layers"


def _preconditioned(model):
    return sorted(slot.block.name for slot in model.optimizer._slots)


# Item 1: blocks are found when the model is built -------------------------------


@pytest.mark.parametrize("cls", [keras_tkfac.TKFAC, keras_tkfac.KFAC])
def test_sequential_without_input_trains_with_every_layer_preconditioned(cls):
    keras.utils.set_random_seed(0)
    inner = keras.Sequential([keras.layers.Dense(4, activation="tanh"),
                              keras.layers.Dense(3)])
    model = keras_tkfac.wrap(inner)
    x, y = helpers.classification_data(n=16)
    history = _fit(model, x, y, optimizer=cls(seed=0))
    assert np.all(np.isfinite(history.history["loss"]))
    assert _preconditioned(model) == sorted(layer.name for layer in inner.layers)
    assert np.any(model.optimizer._slots[0].factors[0].numpy() != 0)


def test_subclassed_model_never_called_trains(caplog):
    keras.utils.set_random_seed(0)
    inner = TwoDense()
    model = keras_tkfac.wrap(inner)
    x, y = helpers.classification_data(n=16)
    before = None
    logging.get_absl_logger().propagate = True
    with caplog.at_level("WARNING"):
        _fit(model, x, y)
    assert _preconditioned(model) == sorted([inner.body.name, inner.head.name])
    # Keras builds the model inside the first step (shape inference in a scratch
    # graph): that call is not a training call, and no layer is said to be lost.
    assert not [r for r in caplog.records if "cannot be recorded" in r.getMessage()]
    assert model.optimizer._factor_weight.numpy().min() > 0
    before = [w.numpy() for w in inner.weights]
    _fit(model, x, y)
    assert any(np.any(a != b.numpy()) for a, b in zip(before, inner.weights))


def test_layers_added_after_wrap_are_preconditioned():
    keras.utils.set_random_seed(0)
    inner = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4)])
    model = keras_tkfac.wrap(inner)
    inner.add(keras.layers.Dense(3, name="added"))
    x, y = helpers.classification_data(n=16)
    _fit(model, x, y)
    assert "added" in _preconditioned(model)
    assert len(model.optimizer._slots) == 2


class _Residual(keras.layers.Layer):
    """keras-io's gated residual network's shape: a projection called only when the
    input's width differs from `units`, so in a 4 -> 4 block it is never built."""

    def __init__(self, units, projection=True, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.dense = keras.layers.Dense(units, activation="tanh")
        self.project = keras.layers.Dense(units) if projection else None

    def call(self, x):
        skip = self.project(x) if x.shape[-1] != self.units else x
        return skip + self.dense(x)


@pytest.mark.parametrize("cls", helpers.TKFAC_THEN_KFAC)
def test_a_sub_layer_that_is_never_called_changes_nothing(cls):
    """It raised `AttributeError` ("You must build the layer before accessing
    `kernel`") when the optimizer was built; it has no weights, so training must
    equal that of the same model without the sub-layer."""
    x, y = helpers.classification_data(n=32)
    keras.utils.set_random_seed(0)
    models = [keras.Sequential([keras.Input((5,)), keras.layers.Dense(4),
                                _Residual(4, projection), keras.layers.Dense(3)])
              for projection in (True, False)]
    model, reference = models
    reference.set_weights(model.get_weights())
    assert not model.layers[1].project.built
    assert len(model.weights) == len(reference.weights) == 6
    start = model.get_weights()
    for each in models:
        wrapped = keras_tkfac.wrap(each)
        _fit(wrapped, x, y, optimizer=cls(seed=0))
        assert len(wrapped.optimizer._slots) == 3
    assert all(np.abs(w.numpy() - s).max() > 1e-4 for w, s in zip(model.weights, start))
    for a, b in zip(reference.weights, model.weights):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-6, atol=1e-7)


def test_readme_custom_loop_runs_on_an_unbuilt_model():
    with open("README.md") as f:
        readme = f.read()
    section = readme[readme.index("### Custom training loops"):]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    keras.utils.set_random_seed(0)

    def build_model():
        return keras.Sequential([keras.layers.Dense(4, activation="tanh"),
                                 keras.layers.Dense(3)])

    namespace = {"build_model": build_model}
    exec(snippet, namespace)  # The snippet imports what it uses.
    x, y = helpers.classification_data(n=16)
    losses = [float(namespace["train_step"](x, y)) for _ in range(3)]
    assert np.all(np.isfinite(losses))
    assert len(namespace["optimizer"]._slots) == 2


def test_building_the_optimizer_with_an_unbuilt_models_variables_says_so():
    """README's custom loop builds the optimizer first only for a built model; an
    unbuilt model has no variables, and the error says what to do."""
    model = keras_tkfac.wrap(keras.Sequential([keras.layers.Dense(3)]))
    optimizer = keras_tkfac.TKFAC()
    with pytest.raises(ValueError, match=r"received no variables.*var_list=\[\]"):
        optimizer.build(model.trainable_variables)


# Item 3: one optimizer per model, in every order ---------------------------------


def test_one_optimizer_compiled_into_two_models_raises_before_fit():
    optimizer = keras_tkfac.TKFAC(seed=0)
    first = keras_tkfac.wrap(helpers.tiny_mlp())
    second = keras_tkfac.wrap(helpers.tiny_mlp())
    first.compile(optimizer=optimizer, loss=LOSS)
    with pytest.raises(ValueError, match="create one optimizer per model"):
        second.compile(optimizer=optimizer, loss=LOSS)


def test_one_optimizer_compiled_into_two_models_raises_after_fit():
    optimizer = keras_tkfac.KFAC(seed=0)
    first = keras_tkfac.wrap(helpers.tiny_mlp())
    second = keras_tkfac.wrap(helpers.tiny_mlp())
    x, y = helpers.classification_data(n=16)
    _fit(first, x, y, optimizer=optimizer)
    with pytest.raises(ValueError, match="create one optimizer per model"):
        second.compile(optimizer=optimizer, loss=LOSS)


# Item 4: the wrapped model's own train_step and attributes ----------------------


class OwnStep(TwoDense):
    """The README recipe: a train_step that feeds curvature itself."""

    def __init__(self, feed_curvature=True, forward=True, **kwargs):
        super().__init__(**kwargs)
        self.feed_curvature, self.forward = feed_curvature, forward
        self.steps_run = keras.metrics.Sum(name="steps_run")

    def train_step(self, data):
        x, y = data
        with tf.GradientTape(persistent=True) as tape:
            with keras_tkfac.record(self) as recording:
                y_pred = self(x, training=True)
            loss = self.compute_loss(x=x, y=y, y_pred=y_pred)
        grads = tape.gradient(loss, self.trainable_variables)
        if self.feed_curvature:
            self.optimizer.update_curvature(
                recording, tape, y_pred, y_true=y, loss=self.loss,
                forward=keras_tkfac.ModelForward(self, x) if self.forward else None)
        self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
        self.steps_run.update_state(1.0)
        return {"loss": loss, "steps_run": self.steps_run.result()}


@pytest.mark.parametrize("forward", [True, False])
def test_model_train_step_runs_with_the_record_recipe(forward):
    keras.utils.set_random_seed(0)
    inner = OwnStep(forward=forward)
    model = keras_tkfac.wrap(inner)
    x, y = helpers.classification_data(n=16)
    history = _fit(model, x, y, optimizer=keras_tkfac.TKFAC(factor_update_freq=1, seed=0))
    assert history.history["steps_run"] == [2.0]
    assert _preconditioned(model) == sorted([inner.body.name, inner.head.name])
    assert int(model.optimizer.iterations.numpy()) == 2
    # Curvature was fed: the moving averages hold two steps' statistics.
    np.testing.assert_allclose(model.optimizer._factor_weight.numpy(),
                               1 - 0.95**2, rtol=1e-6)
    # With `forward` the default step control took the quadratic model's steps and
    # adapted its damping at step 0; without, "graft" steps (no products).
    assert (float(model.optimizer.damping_scale.numpy()) != 1.0) == forward


def test_model_train_step_with_compiled_metrics_fits_under_a_strategy(mirrored):
    """Under a strategy Keras builds the compiled metrics before the first step;
    with the wrapped model's own `train_step` they are the wrapped model's (it
    raised "Cannot get result() since the metric has not yet been built")."""
    x, y = helpers.classification_data(n=32)
    with mirrored.scope():
        keras.utils.set_random_seed(0)
        model = keras_tkfac.wrap(OwnStep())
        model.compile(optimizer=keras_tkfac.TKFAC(seed=0), loss=LOSS,
                      metrics=["accuracy"])
    history = model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    assert history.history["steps_run"] == [4.0, 4.0]  # reset every epoch
    assert np.isfinite(history.history["loss"]).all()


class TrackedPenalty(TwoDense):
    """A model that tracks a term of its own `compute_loss` in a metric of its own
    (keras-io's VAE tracks its KL term so)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.penalty = keras.metrics.Mean(name="penalty")

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None,
                     training=True):
        loss = super().compute_loss(x=x, y=y, y_pred=y_pred,
                                    sample_weight=sample_weight, training=training)
        penalty = 0.1 * keras.ops.mean(keras.ops.square(y_pred))
        self.penalty.update_state(penalty)
        return loss + penalty


def test_the_wrapped_models_own_metrics_are_logged():
    """Keras leaves a nested model's metrics out of the logs; the wrapper puts the
    wrapped model's own trackers back (`History`, `evaluate`), as without `wrap`."""
    x, y = helpers.classification_data(n=32)
    logs = {}
    for name in ("keras", "wrapped"):
        keras.utils.set_random_seed(0)
        model = TrackedPenalty()
        if name == "wrapped":
            model = keras_tkfac.wrap(model)
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=LOSS)
        history = model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        logs[name] = (history.history,
                      model.evaluate(x, y, verbose=0, return_dict=True))
    assert sorted(logs["wrapped"][0]) == sorted(logs["keras"][0]) == ["loss", "penalty"]
    np.testing.assert_allclose(logs["wrapped"][0]["penalty"],
                               logs["keras"][0]["penalty"], rtol=1e-5)
    np.testing.assert_allclose(logs["wrapped"][1]["penalty"],
                               logs["keras"][1]["penalty"], rtol=1e-5)


class SuperStep(TwoDense):
    """keras-io's pattern for a step that changes the batch first: its own
    `train_step` ends in `super().train_step(...)` (here scaling the inputs by
    `scale`, and logging a metric of its own)."""

    def __init__(self, scale=1.0, **kwargs):
        super().__init__(**kwargs)
        self.scale = scale
        self.steps_run = keras.metrics.Sum(name="steps_run")

    def train_step(self, data):
        x, y = data
        self.steps_run.update_state(1.0)
        logs = super().train_step((x * self.scale, y))
        logs["steps_run"] = self.steps_run.result()
        return logs


@pytest.mark.parametrize("run_eagerly", [False, True])
def test_a_train_step_that_calls_super_train_step_feeds_curvature(run_eagerly,
                                                                    caplog):
    """The wrapper runs the model's own `train_step`; its `super().train_step`
    is the wrapper's recorded step (`wrapping._super_train_step`), so curvature
    is fed with the model's batch. Oracle: with the batch unchanged, training
    equals the same model without a `train_step` of its own; with it changed,
    equals that model trained on the changed batches."""
    x, _ = helpers.classification_data(n=32)
    y = np.argmax(x[:, :3], axis=1)
    logging.get_absl_logger().propagate = True

    def fit(model, inputs):
        keras.utils.set_random_seed(0)
        wrapped = keras_tkfac.wrap(model)
        wrapped.compile(optimizer=keras_tkfac.TKFAC(factor_update_freq=1, seed=0),
                        loss=LOSS, metrics=["accuracy"], run_eagerly=run_eagerly)
        with caplog.at_level("WARNING"):
            history = wrapped.fit(inputs, y, batch_size=8, epochs=2, shuffle=False,
                                  verbose=0)
        return wrapped, history.history

    for scale in (1.0, 0.5):
        keras.utils.set_random_seed(0)
        own, own_logs = fit(SuperStep(scale=scale), x)
        keras.utils.set_random_seed(0)
        plain, plain_logs = fit(TwoDense(), x * scale)
        assert own_logs["steps_run"] == [4.0, 4.0]
        np.testing.assert_allclose(own_logs["loss"], plain_logs["loss"], rtol=1e-6)
        np.testing.assert_allclose(own_logs["accuracy"], plain_logs["accuracy"])
        for a, b in zip(own.weights, plain.weights):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(own.optimizer._factor_weight.numpy(),
                                   1 - 0.95**8, rtol=1e-6)
    assert not _unfed_warnings(caplog)


def test_keras_train_step_elsewhere_is_keras_own_after_a_super_step():
    """Once installed, `_super_train_step` is Keras's step for every model but the
    wrapped one inside its own `train_step`: an unwrapped model trains as before."""
    x, _ = helpers.classification_data(n=32)
    y = np.argmax(x[:, :3], axis=1)
    keras.utils.set_random_seed(0)
    wrapped = keras_tkfac.wrap(SuperStep())
    _fit(wrapped, x, y)
    results = []
    for build in (SuperStep, TwoDense):
        keras.utils.set_random_seed(0)
        model = build()
        model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=LOSS)
        history = model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        results.append((history.history["loss"], [w.numpy() for w in model.weights]))
    assert results[0][0][-1] < results[0][0][0]
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def _unfed_warnings(caplog):
    return [r.getMessage() for r in caplog.records
            if "no layer is preconditioned" in r.getMessage()]


def test_model_train_step_that_does_not_feed_curvature_trains_and_logs_the_recipe(
        caplog):
    x, _ = helpers.classification_data(n=64)
    y = np.argmax(x[:, :3], axis=1)  # learnable labels
    logging.get_absl_logger().propagate = True
    changes = {}
    for name in ("adam", "tkfac"):
        keras.utils.set_random_seed(0)
        model = keras_tkfac.wrap(OwnStep(feed_curvature=False))
        optimizer = (keras_tkfac.TKFAC(seed=0) if name == "tkfac"
                     else keras.optimizers.Adam(1e-3))
        model.compile(optimizer=optimizer, loss=LOSS)
        before = model.evaluate(x, y, verbose=0, return_dict=True)["loss"]
        with caplog.at_level("WARNING"):
            model.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0)
        after = model.evaluate(x, y, verbose=0, return_dict=True)["loss"]
        assert np.isfinite(after)
        changes[name] = after - before
    # It trains, as fast as Adam(1e-3) (the partner at the default learning rate).
    assert changes["tkfac"] < min(changes["adam"], 0.0)
    warnings = _unfed_warnings(caplog)
    assert len(warnings) == 1  # once, not every step
    assert "keras_tkfac.record(self)" in warnings[0]
    assert "update_curvature" in warnings[0]
    # Not also the products' warning, which assumes `update_curvature` is called.
    assert not any("needs curvature products" in r.getMessage()
                   or "products failed" in r.getMessage() for r in caplog.records)
    # Nothing was fed: the factors hold no statistics, the inverses stay the identity.
    np.testing.assert_array_equal(optimizer._factor_weight.numpy(), 0.0)
    assert int(optimizer.iterations.numpy()) == 24


@pytest.mark.parametrize("build_first", [False, True], ids=["built_by_apply", "built"])
def test_custom_loop_with_apply_gradients_alone_trains_and_logs(caplog, build_first):
    """A custom loop over a wrapped model that never records or feeds curvature
    (keras-io's GAN and RL loops call `apply_gradients` alone) trains like Adam,
    and logs once that nothing is preconditioned, also where the loop builds the
    optimizer first (`optimizer.build(model.trainable_variables)`: nothing was
    logged until 2026-12-07)."""
    x, _ = helpers.classification_data(n=64)
    y = np.argmax(x[:, :3], axis=1)
    logging.get_absl_logger().propagate = True
    changes = {}
    for name in ("adam", "tkfac"):
        keras.utils.set_random_seed(0)
        model = keras_tkfac.wrap(TwoDense())
        optimizer = (keras_tkfac.TKFAC(seed=0) if name == "tkfac"
                     else keras.optimizers.Adam(1e-3))
        if build_first:
            model(x[:1])
            optimizer.build(model.trainable_variables)

        @tf.function
        def step(x, y, model=model, optimizer=optimizer):
            with tf.GradientTape() as tape:
                loss = keras.ops.mean(LOSS(y, model(x, training=True)))
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss

        with caplog.at_level("WARNING"):
            losses = [float(step(x[i:i + 8], y[i:i + 8]))
                      for _ in range(3) for i in range(0, 64, 8)]
        assert np.all(np.isfinite(losses))
        changes[name] = np.mean(losses[-8:]) - np.mean(losses[:8])
    assert changes["tkfac"] < min(changes["adam"], 0.0)
    warned = [r.getMessage() for r in caplog.records
              if "before any update_curvature" in r.getMessage()]
    assert len(warned) == 1 and "keras_tkfac.record(model)" in warned[0]


def _q_learning_losses(forward_kind, caplog):
    """A deep-Q-learning loop (keras-io's shape): the Huber loss on the chosen
    action's value `q_action = sum(q * one_hot(a))`, of shape `[B]`, recorded and
    fed with `update_curvature(..., forward=...)`; the losses of 48 steps."""
    rng = np.random.default_rng(0)
    states = rng.normal(size=(256, 6)).astype("float32")
    actions = rng.integers(0, 3, 256)
    targets = (states[:, 0] * (actions - 1) + 0.5 * states[:, 1]).astype("float32")
    keras.utils.set_random_seed(0)
    model = keras_tkfac.wrap(keras.Sequential([
        keras.Input((6,)), keras.layers.Dense(32, activation="relu"),
        keras.layers.Dense(3)]))
    optimizer = keras_tkfac.TKFAC(seed=0)
    optimizer.build(model.trainable_variables)
    huber = keras.losses.Huber()

    @tf.function
    def step(s, a, target):
        with tf.GradientTape(persistent=True) as tape:
            with keras_tkfac.record(model) as recording:
                q = model(s, training=True)
            q_action = tf.reduce_sum(q * tf.one_hot(a, 3), 1)
            loss = huber(target, q_action)
        grads = tape.gradient(loss, model.trainable_variables)
        forward = {
            "model": keras_tkfac.ModelForward(model, s),
            "chosen": lambda: tf.reduce_sum(
                model(s, training=True) * tf.one_hot(a, 3), 1)}[forward_kind]
        optimizer.update_curvature(recording, tape, q_action, y_true=target,
                                   loss=huber, forward=forward)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    logging.get_absl_logger().propagate = True
    with caplog.at_level("WARNING"):
        return [float(step(states[i:i + 32], actions[i:i + 32], targets[i:i + 32]))
                for _ in range(6) for i in range(0, 256, 32)]


def test_a_q_learning_loops_forward_must_compute_the_chosen_actions_value(caplog):
    """`forward=ModelForward(model, x)` gives `q` (`[B, 3]`) where the loss is on
    `q_action` (`[B]`): the products fail with a message saying what to pass, and
    the step is `"graft"`'s (it trains). `forward=lambda: f(model(x))` computing
    `q_action` gives the products: no failure, and lower losses than the
    `"graft"` steps (when written: the last 8 steps' mean 0.0022 against 0.17)."""
    wrong = _q_learning_losses("model", caplog)
    failed = [r.getMessage() for r in caplog.records
              if "curvature products failed" in r.getMessage()]
    assert len(failed) == 1 and "must compute y_pred itself" in failed[0]
    assert "forward=lambda: f(model(x, training=True))" in failed[0]
    caplog.clear()
    right = _q_learning_losses("chosen", caplog)
    assert not any("curvature products failed" in r.getMessage()
                   for r in caplog.records)
    assert np.all(np.isfinite(wrong)) and np.all(np.isfinite(right))
    assert np.mean(wrong[-8:]) < 0.5 * np.mean(wrong[:8])
    assert np.mean(right[-8:]) < 0.5 * np.mean(wrong[-8:])


class AddedLoss(keras.layers.Layer):
    """Makes the reconstruction error of its two inputs the model's loss."""

    def call(self, inputs):
        target, reconstruction = inputs
        self.add_loss(keras.ops.mean(keras.ops.square(reconstruction - target)))
        return reconstruction


def test_model_compiled_without_a_loss_trains_on_its_added_loss(caplog):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    code = keras.layers.Dense(3, activation="tanh")(inputs)
    outputs = AddedLoss()([inputs, keras.layers.Dense(6)(code)])
    model = keras_tkfac.wrap(keras.Model(inputs, outputs))
    model.compile(optimizer=keras_tkfac.TKFAC(seed=0))
    x = np.random.default_rng(0).normal(size=(64, 6)).astype("float32")
    logging.get_absl_logger().propagate = True
    with caplog.at_level("WARNING"):
        history = model.fit(x, batch_size=16, epochs=4, shuffle=False, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert len(_unfed_warnings(caplog)) == 1
    assert "without a `loss`" in _unfed_warnings(caplog)[0]


@pytest.mark.parametrize("cls", helpers.TKFAC_THEN_KFAC)
def test_a_loss_returning_one_value_per_batch_has_its_per_example_forms_statistics(
        cls, caplog):
    """A Python loss ending in a mean over everything (one value per batch, like
    `Dice()`'s default): every example's term is the batch's loss, so the
    statistics' rows are the batch count times the loss's gradient in each
    example's outputs, exactly each example's own loss's gradient: the same factors
    as its per-example form after a step (before 2026-12-07, each example's loss
    alone gave the same; before that, one term gave `1/B` of them). Both train."""
    x, y = helpers.classification_data(n=16)
    targets = np.eye(3, dtype="float32")[y]

    def per_batch(y_true, y_pred):
        return tf.reduce_mean(tf.square(y_true - y_pred))

    def per_example(y_true, y_pred):
        return tf.reduce_mean(tf.square(y_true - y_pred), axis=-1)

    def train(loss):
        keras.utils.set_random_seed(0)
        model = keras_tkfac.wrap(helpers.tiny_mlp())
        model.compile(optimizer=cls(seed=0), loss=loss)
        model.train_on_batch(x[:8], targets[:8])
        factors = [f.numpy() for slot in model.optimizer._slots for f in slot.factors]
        history = model.fit(x, targets, batch_size=8, epochs=4, shuffle=False,
                            verbose=0)
        return factors, history.history["loss"]

    logging.get_absl_logger().propagate = True
    with caplog.at_level("WARNING"):
        batch_factors, batch_losses = train(per_batch)
    assert any("returns one value per batch" in r.getMessage() for r in caplog.records)
    example_factors, example_losses = train(per_example)
    assert any(np.abs(f).max() > 0 for f in batch_factors)
    for a, b in zip(batch_factors, example_factors):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    for losses in (batch_losses, example_losses):
        assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses


def test_the_cotangent_of_a_batch_loss_is_its_gradient_times_the_batch():
    # The oracle of the rows above, on a loss over pairs of examples (each first-half
    # example against its second-half partner): nothing per example about it.
    rng = np.random.default_rng(0)
    y_pred = tf.constant(rng.normal(size=(6, 3)), tf.float32)
    y_true = tf.zeros((6, 1))

    def halves(_, z):
        half = tf.shape(z)[0] // 2
        return tf.reduce_mean(tf.reduce_sum(tf.square(z[:half] - z[half:]), -1))

    spec = loss_specs.resolve_loss(halves, "empirical")
    source, cotangent, count = fisher.output_cotangent(spec, "empirical", y_true,
                                                       y_pred, tf.constant([0, 0]))
    with tf.GradientTape() as tape:
        tape.watch(y_pred)
        loss = halves(y_true, y_pred)
    expected = 6.0 * tape.gradient(loss, y_pred)
    assert source is y_pred and int(count) == 6
    np.testing.assert_allclose(cotangent.numpy(), expected.numpy(), rtol=1e-6)
    assert np.abs(expected.numpy()).min() > 0  # (each example a pair's member)


def _halves_contrastive(y_true, z):
    """Pairs the batch's first half with its second: squared distance for similar
    pairs (`y_true` 1), a hinge on the distance for the others."""
    half = tf.shape(z)[0] // 2
    distance = tf.reduce_sum(tf.square(z[:half] - z[half:]), axis=1)
    similar = y_true[:half, 0]
    return tf.reduce_mean(similar * distance + (1.0 - similar) * tf.square(
        tf.nn.relu(1.0 - tf.sqrt(distance + 1e-9))))


def _simclr(_, z):
    """NT-Xent over the batch's two halves (two views of each example)."""
    z = z / (tf.norm(z, axis=1, keepdims=True) + 1e-9)
    half = tf.shape(z)[0] // 2
    logits = tf.matmul(z, z, transpose_b=True) / 0.2 - 1e9 * tf.eye(2 * half)
    labels = tf.concat([tf.range(half) + half, tf.range(half)], 0)
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))


def _barlow(_, z):
    """Barlow Twins' redundancy reduction between `tf.split`'s two halves."""
    first, second = tf.split(z, 2, axis=0)
    first = (first - tf.reduce_mean(first, 0)) / (tf.math.reduce_std(first, 0) + 1e-5)
    second = (second - tf.reduce_mean(second, 0)) / (
        tf.math.reduce_std(second, 0) + 1e-5)
    c = tf.matmul(first, second, transpose_a=True) / tf.cast(tf.shape(first)[0],
                                                             tf.float32)
    on = tf.reduce_sum(tf.square(tf.linalg.diag_part(c) - 1.0))
    return on + 5e-3 * (tf.reduce_sum(tf.square(c)) - tf.reduce_sum(
        tf.square(tf.linalg.diag_part(c))))


@pytest.mark.parametrize("loss", [_halves_contrastive, _simclr, _barlow])
def test_a_loss_over_pairs_of_examples_trains(loss):
    """Losses over the batch's halves (a probe, 2026-12-07): with each example's loss
    alone standing in for its term, SimCLR's raised on the first step (empty
    halves), Barlow Twins' could not be traced (`tf.split` of one example), and the
    contrastive loss's zero curvature let the steps grow to NaN by the seventh."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=(32, 16)).astype("float32")
    views = np.concatenate([base + 0.1 * rng.normal(size=base.shape),
                            base + 0.1 * rng.normal(size=base.shape)])
    similar = np.concatenate([np.arange(32) % 2 == 0] * 2).astype("float32")[:, None]
    batches = [(np.concatenate([views[i:i + 8], views[32 + i:40 + i]]),
                np.concatenate([similar[i:i + 8], similar[32 + i:40 + i]]))
               for i in range(0, 32, 8)]
    keras.utils.set_random_seed(0)
    model = keras_tkfac.wrap(keras.Sequential([
        keras.Input((16,)), keras.layers.Dense(32, activation="relu"),
        keras.layers.Dense(8)]))
    model.compile(optimizer=keras_tkfac.TKFAC(seed=0), loss=loss)
    first = [float(loss(tf.constant(yb), model(xb))) for xb, yb in batches]
    for _ in range(6):
        for xb, yb in batches:
            model.train_on_batch(xb, yb)
    last = [float(loss(tf.constant(yb), model(xb))) for xb, yb in batches]
    assert all(np.isfinite(w).all() for w in model.get_weights())
    assert np.mean(last) < np.mean(first), (first, last)


@pytest.mark.parametrize("loss", ["mse", "binary_crossentropy", "huber", "mae"])
def test_a_squeezed_output_trains_as_its_twin_with_a_last_axis(loss, caplog):
    """An output of shape `[B]` (a `Dense(1)` squeezed by `Reshape(())`): Keras's
    loss, a mean over the last axis, is the mean over the batch, so each example is
    a term of one unit. It trains exactly as the same model with the `[B, 1]` output
    (statistics, products, steps), without the "one value per batch" notice. (Until
    2026-12-07 the squared error's and the binary cross-entropy's samples took the
    batch for the units: statistics `B` times too large. Not with sample weights:
    Keras's own loss then weights the batch's single value, not each example's, and
    differs between the two shapes under Adam too.)"""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 5)).astype("float32")
    y = (x[:, 0] - x[:, 1] ** 2).astype("float32")
    if loss == "binary_crossentropy":
        y = (y > 0).astype("float32")
    logging.get_absl_logger().propagate = True
    found = {}
    for squeezed in (False, True):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((5,))
        hidden = keras.layers.Dense(8, activation="tanh")(inputs)
        outputs = keras.layers.Dense(
            1, activation="sigmoid" if loss == "binary_crossentropy" else None)(hidden)
        if squeezed:
            outputs = keras.layers.Reshape(())(outputs)
        model = keras_tkfac.wrap(keras.Model(inputs, outputs))
        optimizer = keras_tkfac.TKFAC(seed=0, factor_update_freq=1)
        model.compile(optimizer=optimizer, loss=loss)
        loss_specs._WARNED.clear()
        with caplog.at_level("WARNING"):
            history = model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
        found[squeezed] = (history.history["loss"],
                           [v.numpy() for v in optimizer.variables
                            if v.name.endswith(("_delta", "_n_phi", "_n_psi"))],
                           [w.numpy() for w in model.weights])
    assert not any("one value per batch" in r.getMessage() for r in caplog.records)
    np.testing.assert_allclose(found[True][0], found[False][0], rtol=1e-5)
    for a, b in zip(found[True][1] + found[True][2], found[False][1] + found[False][2]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("reduction", ["sum", None])
def test_a_squeezed_outputs_summed_loss_trains_as_its_mean(reduction):
    """On a `[B]` output Keras's mean squared error is one value, the batch's mean,
    whatever the reduction (`"sum"` of one value is that value; Adam's trajectories
    are the same): `TKFAC()` trains as with the default reduction. (Until 2026-12-07
    it took `"sum"` and `None` for the sum of the examples' terms: curvature `B`
    times too large.)"""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 5)).astype("float32")
    y = (x[:, 0] - x[:, 1] ** 2).astype("float32")
    found = []
    for loss in (keras.losses.MeanSquaredError(),
                 keras.losses.MeanSquaredError(reduction=reduction)):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((5,))
        hidden = keras.layers.Dense(8, activation="tanh")(inputs)
        outputs = keras.layers.Reshape(())(keras.layers.Dense(1)(hidden))
        model = keras_tkfac.wrap(keras.Model(inputs, outputs))
        model.compile(optimizer=keras_tkfac.TKFAC(seed=0), loss=loss)
        history = model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
        found.append((history.history["loss"], [w.numpy() for w in model.weights]))
    np.testing.assert_allclose(found[1][0], found[0][0], rtol=1e-6)
    for a, b in zip(found[1][1], found[0][1]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("output", ["pooled", "per_step"])
def test_time_distributed_dense_trains_as_dense_on_the_sequence(output):
    """`TimeDistributed(Dense)` computes what `Dense` on `[B, T, d]` does; Keras 3
    calls the inner layer once per step, and those calls, steps of one sequence,
    take the sequence's exact per-example statistics as `Dense` does
    (`sequence_statistics="exact"`): the same statistics, steps and weights, with a
    pooled output and with a per-step one. (Until 2026-12-07 each step's call was
    rows of its own: first-epoch losses 1.1445 against 1.1454.)"""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 7, 5)).astype("float32")
    y = rng.integers(0, 3, (64,) if output == "pooled" else (64, 7))
    found = []
    for wrapped in (False, True):
        keras.utils.set_random_seed(0)
        dense = keras.layers.Dense(8, activation="tanh")
        layers = [keras.Input((7, 5)),
                  keras.layers.TimeDistributed(dense) if wrapped else dense]
        if output == "pooled":
            layers += [keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(3)]
        else:
            head = keras.layers.Dense(3)
            layers.append(keras.layers.TimeDistributed(head) if wrapped else head)
        model = keras_tkfac.wrap(keras.Sequential(layers))
        optimizer = keras_tkfac.TKFAC(seed=0, factor_update_freq=1)
        model.compile(optimizer=optimizer,
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        history = model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
        found.append((history.history["loss"],
                      [v.numpy() for v in optimizer.variables
                       if v.name.endswith(("_delta", "_n_phi", "_n_psi"))],
                      [w.numpy() for w in model.weights]))
    np.testing.assert_allclose(found[1][0], found[0][0], rtol=1e-5)
    assert len(found[1][1]) == len(found[0][1]) > 0
    for a, b in zip(found[1][1] + found[1][2], found[0][1] + found[0][2]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_losses_without_a_sampling_rule_and_lower_rank_labels_train(caplog):
    """MAE and a user's function take the empirical Fisher (logged once per loss),
    Huber and log-cosh sample from their Hessian at the real labels (not logged);
    labels `[B]` against outputs `[B, 1]` are matched as Keras does."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 5)).astype("float32")
    y = (x[:, 0] - 2 * x[:, 1]).astype("float32")  # [B], the outputs are [B, 1]

    def squared(y_true, y_pred):
        return keras.ops.mean(keras.ops.square(y_true - y_pred), axis=-1)

    inputs = keras.Input((5,))
    hidden = keras.layers.Dense(8, activation="tanh")(inputs)
    outputs = {name: keras.layers.Dense(1, name=name)(hidden)
               for name in ("huber", "log_cosh", "mae", "own")}
    model = keras_tkfac.wrap(keras.Model(inputs, outputs))
    model.compile(optimizer=keras_tkfac.TKFAC(seed=0),
                  loss={"huber": keras.losses.Huber(), "log_cosh": "log_cosh",
                        "mae": "mae", "own": squared})
    logging.get_absl_logger().propagate = True
    loss_specs._WARNED.clear()  # logged once per loss and process
    with caplog.at_level("WARNING"):
        history = model.fit(x, {k: y for k in outputs}, batch_size=16, epochs=4,
                            shuffle=False, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.5 * losses[0]
    warned = [r.getMessage() for r in caplog.records
              if "takes the empirical Fisher" in r.getMessage()]
    assert len(warned) == 2
    assert any("'mae'" in m for m in warned) and any("'own'" in m for m in warned)
    # The statistics were updated (from the real labels).
    assert float(model.optimizer._factor_weight.numpy()[0]) > 0


def test_model_train_step_runs_with_a_first_order_optimizer():
    class LossInStep(TwoDense):
        def train_step(self, data):
            x, y = data
            with tf.GradientTape() as tape:
                loss = keras.ops.mean(LOSS(y, self(x, training=True)))
            grads = tape.gradient(loss, self.trainable_variables)
            self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
            return {"own_loss": loss}

    keras.utils.set_random_seed(0)
    model = keras_tkfac.wrap(LossInStep())
    model.compile(optimizer="adam")  # No loss: it lives in the model's train_step.
    x, y = helpers.classification_data(n=16)
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    assert set(history.history) == {"own_loss"}
    assert history.history["own_loss"][1] < history.history["own_loss"][0]


class GAN(keras.Model):
    """keras-io's GAN shape: its own `compile(d_optimizer, g_optimizer, loss_fn)`
    and a `train_step` that steps both optimizers."""

    def __init__(self):
        super().__init__()
        self.discriminator = keras.Sequential([
            keras.Input((2,)), keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(1, activation="sigmoid")])
        self.generator = keras.Sequential([
            keras.Input((3,)), keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(2)])
        self.seed_generator = keras.random.SeedGenerator(7)

    def compile(self, d_optimizer, g_optimizer, loss_fn):
        super().compile()
        self.d_optimizer, self.g_optimizer = d_optimizer, g_optimizer
        self.loss_fn = loss_fn

    def train_step(self, real):
        batch = keras.ops.shape(real)[0]
        noise = keras.random.normal((batch, 3), seed=self.seed_generator)
        both = keras.ops.concatenate([self.generator(noise), real], axis=0)
        labels = keras.ops.concatenate([keras.ops.ones((batch, 1)),
                                        keras.ops.zeros((batch, 1))], axis=0)
        with tf.GradientTape() as tape:
            d_loss = self.loss_fn(labels, self.discriminator(both))
        d_vars = self.discriminator.trainable_variables
        self.d_optimizer.apply_gradients(zip(tape.gradient(d_loss, d_vars), d_vars))
        noise = keras.random.normal((batch, 3), seed=self.seed_generator)
        with tf.GradientTape() as tape:
            g_loss = self.loss_fn(keras.ops.zeros((batch, 1)),
                                  self.discriminator(self.generator(noise)))
        g_vars = self.generator.trainable_variables
        self.g_optimizer.apply_gradients(zip(tape.gradient(g_loss, g_vars), g_vars))
        return {"d_loss": d_loss, "g_loss": g_loss}


def _gan_history(model, d_optimizer, positional=False):
    arguments = (d_optimizer, keras.optimizers.Adam(1e-3),
                 keras.losses.BinaryCrossentropy())
    if positional:  # these bind to Keras's `compile(optimizer, loss, loss_weights)`
        model.compile(*arguments)
    else:
        model.compile(**dict(zip(("d_optimizer", "g_optimizer", "loss_fn"), arguments)))
    real = np.random.default_rng(0).normal(1.0, 0.2, size=(64, 2)).astype("float32")
    return model.fit(real, batch_size=16, epochs=3, shuffle=False, verbose=0).history


def test_a_model_with_its_own_compile_arguments_gets_them():
    # keras-io's GAN compiles with its own arguments: the wrapper hands them over.
    # With first-order optimizers it trains exactly as unwrapped; with TKFAC (its
    # step does not feed curvature) it trains on the fallback step.
    keras.utils.set_random_seed(0)
    plain = _gan_history(GAN(), keras.optimizers.Adam(1e-3))
    keras.utils.set_random_seed(0)
    wrapped = _gan_history(keras_tkfac.wrap(GAN()), keras.optimizers.Adam(1e-3))
    keras.utils.set_random_seed(0)
    positional = _gan_history(keras_tkfac.wrap(GAN()), keras.optimizers.Adam(1e-3),
                              positional=True)
    for key in ("d_loss", "g_loss"):
        np.testing.assert_allclose(wrapped[key], plain[key], rtol=1e-6)
        np.testing.assert_allclose(positional[key], plain[key], rtol=1e-6)
    keras.utils.set_random_seed(0)
    curvature = _gan_history(keras_tkfac.wrap(GAN()), keras_tkfac.TKFAC(seed=0),
                             positional=True)
    assert np.all(np.isfinite(curvature["d_loss"] + curvature["g_loss"]))
    assert not np.allclose(curvature["d_loss"], plain["d_loss"])
    # A model with Keras's own `compile` still rejects arguments Keras rejects.
    with pytest.raises(TypeError):
        keras_tkfac.wrap(TwoDense()).compile(d_optimizer="adam")


class OwnCompileAndStep(keras.Model):
    """The older keras-io Distiller's shape: its own `compile(optimizer, ...)`
    with an argument Keras's does not take, and its own `train_step` stepping
    `self.optimizer`."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.d1 = keras.layers.Dense(16, activation="relu")
        self.d2 = keras.layers.Dense(1)

    def call(self, x):
        return self.d2(self.d1(x))

    def compile(self, optimizer, my_loss, **kwargs):
        super().compile(optimizer=optimizer, **kwargs)
        self.my_loss = my_loss

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = self.my_loss(y, self(x, training=True))
        grads = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
        return {"loss": loss}


def _own_compile_and_step(wrapped, optimizer):
    x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    y = x.sum(1, keepdims=True)
    keras.utils.set_random_seed(0)
    model = OwnCompileAndStep()
    model(x[:1])
    model = keras_tkfac.wrap(model) if wrapped else model
    model.compile(optimizer=optimizer, my_loss=keras.losses.MeanSquaredError())
    history = model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0,
                        callbacks=[keras.callbacks.LearningRateScheduler(
                            lambda epoch, lr: 1e-2 * 0.1**epoch)])
    return model, history.history


def test_own_compile_and_train_step_keep_the_optimizer_that_steps(tmp_path, caplog):
    """Where a model's own `compile` takes arguments of its own and its own
    `train_step` steps `self.optimizer`, the wrapper holds that optimizer: a
    learning-rate schedule reaches it and training equals the unwrapped model's
    (the wrapper held Keras's default RMSprop, which the schedule changed
    instead); under TKFAC the unfed curvature is logged; the saved file loads,
    uncompiled with a warning as Keras leaves such a model (loading raised)."""
    optimizer = keras.optimizers.Adam(1e-2)
    _, plain = _own_compile_and_step(False, keras.optimizers.Adam(1e-2))
    model, wrapped = _own_compile_and_step(True, optimizer)
    assert model.optimizer is optimizer
    np.testing.assert_allclose(float(optimizer.learning_rate), 1e-4, rtol=1e-6)
    np.testing.assert_allclose(wrapped["loss"], plain["loss"], rtol=1e-6)
    path = str(tmp_path / "own.keras")
    model.save(path)
    with pytest.warns(UserWarning, match="its own `compile\(\)` takes arguments"):
        loaded = keras.models.load_model(
            path, custom_objects={"OwnCompileAndStep": OwnCompileAndStep})
    for a, b in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
    curvature = keras_tkfac.TKFAC(seed=0)
    logging.get_absl_logger().propagate = True
    with caplog.at_level("WARNING"):
        model, history = _own_compile_and_step(True, curvature)
    assert model.optimizer is curvature and int(curvature.iterations) == 12
    np.testing.assert_allclose(float(curvature.learning_rate), 1e-4, rtol=1e-6)
    assert any("does not feed curvature" in r.getMessage() for r in caplog.records)
    assert np.all(np.isfinite(history["loss"]))


def test_a_wrapped_gan_saves_and_loads(tmp_path):
    """keras-io's GAN (`compile(d_optimizer, g_optimizer, loss_fn)`): the file
    loads, uncompiled with Keras's kind of warning (it raised a `TypeError`)."""
    class LoadableGAN(GAN):
        def __init__(self, **kwargs):  # (Keras passes `trainable` and `dtype`)
            super().__init__()

    keras.utils.set_random_seed(0)
    model = keras_tkfac.wrap(LoadableGAN())
    _gan_history(model, keras.optimizers.Adam(1e-3))
    path = str(tmp_path / "gan.keras")
    model.save(path)
    with pytest.warns(UserWarning, match="its own `compile\\(\\)` takes arguments"):
        loaded = keras.models.load_model(path,
                                         custom_objects={"LoadableGAN": LoadableGAN})
    assert len(loaded.get_weights()) == len(model.get_weights()) > 0
    for a, b in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_wrapped_model_attributes_are_reachable_through_the_wrapper():
    inner = TwoDense()
    model = keras_tkfac.wrap(inner)
    assert model.body is inner.body
    assert model.describe() == "two dense layers"
    with pytest.raises(AttributeError, match="no_such_thing"):
        model.no_such_thing
    with pytest.raises(AttributeError):
        model._private_of_the_inner_model


def test_layers_and_get_layer_are_the_wrapped_models():
    """keras-io's fine-tuning idiom freezes `model.layers[:-2]` and Grad-CAM reads
    `model.get_layer(name)`: on a wrapped model they act on the model's layers (they
    listed only the wrapper's one sublayer, so the freeze silently did nothing)."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(5, activation="relu", name="hidden")(inputs)
    middle = keras.layers.Dense(5, activation="relu", name="middle")(hidden)
    outputs = keras.layers.Dense(3, name="head")(middle)
    inner = keras.Model(inputs, outputs)
    model = keras_tkfac.wrap(inner)
    assert model.layers == inner.layers
    assert model.get_layer("middle") is inner.get_layer("middle")
    assert model.get_layer(index=-1) is inner.get_layer("head")
    for layer in model.layers[:-2]:
        layer.trainable = False
    assert [w.path for w in model.trainable_weights] == [
        "middle/kernel", "middle/bias", "head/kernel", "head/bias"]
    x, y = helpers.classification_data(n=16, d_in=6)
    model.compile(optimizer=keras_tkfac.TKFAC(seed=0), loss=LOSS)
    frozen = inner.get_layer("hidden").get_weights()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    for before, after in zip(frozen, inner.get_layer("hidden").get_weights()):
        np.testing.assert_array_equal(after, before)


# Item 5: layers inside a recurrent loop ------------------------------------------


class DenseCell(keras.layers.Layer):
    def __init__(self, units=4, **kwargs):
        super().__init__(**kwargs)
        self.state_size = units
        self.dense = keras.layers.Dense(units, activation="tanh")

    def build(self, input_shape):
        self.dense.build((None, input_shape[-1] + self.state_size))

    def call(self, inputs, states):
        h = self.dense(tf.concat([inputs, states[0]], -1))
        return h, [h]


@pytest.mark.parametrize("recurrent", ["cell_with_dense", "lstm"])
def test_recurrent_models_train_and_leave_their_cells_to_the_fallback(recurrent, caplog):
    keras.utils.set_random_seed(0)
    layer = (keras.layers.RNN(DenseCell()) if recurrent == "cell_with_dense"
             else keras.layers.LSTM(4))
    inner = keras.Sequential([keras.Input((6, 5)), layer,
                              keras.layers.Dense(3, name="head")])
    logging.get_absl_logger().propagate = True
    with caplog.at_level("WARNING"):
        model = keras_tkfac.wrap(inner)
    x = np.random.default_rng(0).normal(size=(16, 6, 5)).astype("float32")
    y = np.arange(16) % 3
    history = _fit(model, x, y)
    assert np.all(np.isfinite(history.history["loss"]))
    # Recurrent blocks are off by default; a Dense in a custom cell runs in its loop.
    assert _preconditioned(model) == ["head"]
    if recurrent == "cell_with_dense":
        assert [r for r in caplog.records if "recurrent layer's loop" in r.getMessage()]


def test_layer_called_in_a_custom_loop_is_not_recorded_and_training_works(caplog):
    class Looped(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.dense = keras.layers.Dense(5, activation="tanh", name="looped_dense")

        def call(self, x):
            _, h = tf.while_loop(lambda i, h: i < 2,
                                 lambda i, h: (i + 1, self.dense(h)), (0, x))
            return h

    keras.utils.set_random_seed(0)
    inner = keras.Sequential([keras.Input((5,)), Looped(), keras.layers.Dense(3)])
    model = keras_tkfac.wrap(inner)
    logging.get_absl_logger().propagate = True
    x, y = helpers.classification_data(n=16)
    with caplog.at_level("WARNING"):
        history = _fit(model, x, y)
    assert np.all(np.isfinite(history.history["loss"]))
    assert [r for r in caplog.records if "cannot be recorded" in r.getMessage()]


# Items 6, 7, 11 ----------------------------------------------------------------


@pytest.mark.parametrize("cls", [keras_tkfac.TKFAC, keras_tkfac.KFAC])
@pytest.mark.parametrize("name", ["learning_rate", "damping", "kl_clip"])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_hyperparameters_raise(cls, name, value):
    with pytest.raises(ValueError, match=f"{name}="):
        cls(**{name: value})


def test_non_finite_trace_damping_floor_raises():
    with pytest.raises(ValueError, match="trace_damping_floor="):
        keras_tkfac.TKFAC(trace_damping_floor=float("inf"))


def test_compile_takes_positional_arguments():
    model = keras_tkfac.wrap(helpers.tiny_mlp())
    optimizer = keras_tkfac.TKFAC(seed=0)
    model.compile(optimizer, LOSS, metrics=["accuracy"])
    assert model.optimizer is optimizer and model.loss is LOSS
    x, y = helpers.classification_data(n=16)
    history = model.fit(x, y, batch_size=8, verbose=0)
    assert "accuracy" in history.history
    assert len(optimizer._slots) == 2


@pytest.mark.parametrize("cls", [keras_tkfac.TKFAC, keras_tkfac.KFAC])
def test_optimizers_get_distinct_names(cls):
    first, second = cls(), cls()
    prefix = cls.__name__.lower()
    assert re.fullmatch(rf"{prefix}(_\d+)?", first.name)
    assert first.name != second.name
    assert cls(name="mine").name == "mine"
    reloaded = keras.optimizers.deserialize(keras.optimizers.serialize(second))
    assert reloaded.name == second.name


def _step_with_an_extra_variable(optimizer, prepare=None):
    """One custom-loop step (README's recipe) on `tiny_mlp` whose loss also sums a
    variable outside the model; `prepare(model, variables)` runs first. Returns the
    extra variable."""
    model = keras_tkfac.wrap(helpers.tiny_mlp())
    extra = tf.Variable(np.ones(3, "float32"))
    x, y = helpers.classification_data(n=8)
    variables = model.trainable_variables + [extra]
    if prepare is not None:
        prepare(model, variables)
    with tf.GradientTape(persistent=True) as tape:
        with keras_tkfac.record(model) as recording:
            y_pred = model(x, training=True)
        loss = keras.ops.mean(LOSS(y, y_pred)) + tf.reduce_sum(extra)
    grads = tape.gradient(loss, variables)
    optimizer.update_curvature(recording, tape, y_pred, y_true=y, loss=LOSS)
    optimizer.apply_gradients(zip(grads, variables))
    return extra


def test_raw_tf_variable_in_apply_gradients():
    optimizer = keras_tkfac.TKFAC(momentum=0.0, learning_rate=0.5, kl_clip=None, seed=0,
                                  fallback_lr_ratio=0.01)

    def attach_and_build(model, variables):
        optimizer.attach(model.blocks)
        optimizer.build(variables)

    extra = _step_with_an_extra_variable(optimizer, attach_and_build)
    # The raw variable has no block: the Adam partner's first step moves it by
    # lr * fallback_lr_ratio * g / (|g| + eps) = 0.5 * 0.01 (gradient 1).
    np.testing.assert_allclose(extra.numpy(), [0.995, 0.995, 0.995], rtol=1e-6)
    assert len(optimizer._slots) == 2


def test_a_variable_outside_the_recording_names_the_build_it_needs():
    """A custom loop whose first `update_curvature` built the optimizer from the
    model's variables cannot then train another one: the error says to build the
    optimizer with all of them first (`test_building_with_a_variable_outside_...`)."""
    with pytest.raises(ValueError, match=r"optimizer\.build\(model\.trainable_variables"):
        _step_with_an_extra_variable(keras_tkfac.TKFAC(seed=0))


def test_building_with_a_variable_outside_the_model_trains_it(caplog):
    """The recipe of the error above: `optimizer.build(model.trainable_variables +
    [extra])` before the loop, without `attach`; the extra variable takes the
    partner's step, the model's layers are preconditioned, and no "before any
    update_curvature" warning is logged for a build that is not an
    `apply_gradients`."""
    optimizer = keras_tkfac.TKFAC(seed=0, fallback_lr_ratio=0.01, learning_rate=0.5,
                                  step_control="graft")
    logging.get_absl_logger().propagate = True
    with caplog.at_level("WARNING"):
        extra = _step_with_an_extra_variable(
            optimizer, lambda model, variables: optimizer.build(variables))
    assert not [r for r in caplog.records
                if "before any update_curvature" in r.getMessage()]
    # Adam's first step: lr * fallback_lr_ratio * g / (|g| + eps), gradient 1.
    np.testing.assert_allclose(extra.numpy(), [0.995] * 3, rtol=1e-6)
    assert len(optimizer._slots) == 2
    assert np.abs(optimizer._slots[0].factors[0].numpy()).max() > 0


@pytest.mark.parametrize("freeze", ["wrapped", "base"])
def test_a_model_without_trainable_weights_fits_as_with_adam(freeze):
    """As Keras's own training step, a frozen model's `fit` warns and runs (its
    loss reported, no weight moved) instead of failing in `apply_gradients`."""
    base = helpers.tiny_mlp()
    start = [w.numpy().copy() for w in base.weights]
    if freeze == "base":
        base.trainable = False
    model = keras_tkfac.wrap(base)
    if freeze == "wrapped":
        model.trainable = False
    model.compile(optimizer=keras_tkfac.TKFAC(), loss=LOSS)
    x, y = helpers.classification_data(n=16)
    with pytest.warns(UserWarning, match="does not have any trainable weights"):
        history = model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    for before, after in zip(start, base.weights):
        np.testing.assert_array_equal(after.numpy(), before)


# Items 8, 9 ----------------------------------------------------------------------


def test_negative_sample_weights_count_as_zero_in_the_fisher():
    x, y = helpers.classification_data(n=8)

    def factors(sample_weight):
        model = keras_tkfac.wrap(helpers.tiny_mlp())
        optimizer = keras_tkfac.TKFAC(fisher="empirical", seed=0)
        with tf.GradientTape(persistent=True) as tape:
            with keras_tkfac.record(model) as recording:
                y_pred = model(x, training=True)
        optimizer.update_curvature(recording, tape, y_pred, y_true=y, loss=LOSS,
                                   sample_weight=sample_weight)
        assert int(optimizer.skipped_statistics.numpy()) == 0
        return [f.numpy() for slot in optimizer._slots for f in slot.factors]

    weights = np.array([1, 2, 1, 1, 0.5, 1, 1, 1], dtype="float32")
    negative = weights.copy()
    negative[[1, 5]] = [-1.0, -3.0]
    zero = weights.copy()
    zero[[1, 5]] = 0.0
    for a, b in zip(factors(negative), factors(zero)):
        assert np.any(a != 0)
        np.testing.assert_allclose(a, b, rtol=1e-6)


class RawActivation(keras.Model):
    def __init__(self, units, activation, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(units)
        self.activation = activation

    def call(self, x):
        s = self.dense(x)
        return tf.nn.sigmoid(s) if self.activation == "sigmoid" else tf.nn.softmax(s)


@pytest.mark.parametrize("activation,loss,units", [
    ("sigmoid", "binary_crossentropy", 1),
    ("softmax", "sparse_categorical_crossentropy", 3),
])
def test_raw_tf_activation_output_gives_the_keras_activation_statistics(
        activation, loss, units):
    x, y = helpers.classification_data(n=16)
    if units == 1:
        y = (y > 0).astype("float32")[:, None]

    def factors(inner):
        keras.utils.set_random_seed(0)
        model = keras_tkfac.wrap(inner)
        model.compile(optimizer=keras_tkfac.TKFAC(factor_update_freq=1, seed=0),
                      loss=loss)
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
        return [f.numpy() for f in model.optimizer._slots[0].factors]

    keras.utils.set_random_seed(0)
    raw = factors(RawActivation(units, activation))
    keras.utils.set_random_seed(0)
    fused = factors(keras.Sequential([keras.layers.Dense(units, activation=activation)]))
    for a, b in zip(raw, fused):
        assert np.any(a != 0)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


# Item 10: export and legacy .h5 ------------------------------------------------


def test_export_of_a_wrapped_model_serves_its_predictions(tmp_path):
    model = keras_tkfac.wrap(helpers.tiny_mlp())
    x, y = helpers.classification_data(n=16)
    _fit(model, x, y)
    path = str(tmp_path / "exported")
    model.export(path)
    reloaded = tf.saved_model.load(path)
    served = reloaded.serve(x)
    np.testing.assert_allclose(served.numpy(), model.predict(x, verbose=0), rtol=1e-5)


@pytest.mark.parametrize("cls", [keras_tkfac.TKFAC, keras_tkfac.KFAC])
def test_legacy_h5_round_trip_restores_the_optimizer_state(cls, tmp_path):
    model = keras_tkfac.wrap(helpers.tiny_mlp())
    x, y = helpers.classification_data(n=16)
    _fit(model, x, y, optimizer=cls(factor_update_freq=1, inverse_update_freq=1, seed=0))
    path = str(tmp_path / "model.h5")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, keras_tkfac.CurvatureModel)
    assert type(loaded.optimizer) is cls
    assert len(loaded.optimizer.variables) == len(model.optimizer.variables)
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


# Item 13 ------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [keras_tkfac.TKFAC, keras_tkfac.KFAC])
def test_docstring_lists_kwargs_after_every_named_argument(cls):
    doc = cls.__doc__
    args = doc[doc.index("    Args:"):]
    names = re.findall(r"^        (\*\*kwargs|\w+):", args, re.M)
    assert names[-1] == "**kwargs"
    assert "name" in names and "seed" in names
    if cls is keras_tkfac.TKFAC:
        assert names.index("trace_damping_floor") < names.index("**kwargs")


@pytest.mark.parametrize("cls", helpers.TKFAC_THEN_KFAC)
def test_a_dense_layer_fed_a_sparse_tensor_trains_as_on_its_dense_value(cls):
    """`Hashing(sparse=True)` feeds `Dense` a `tf.SparseTensor` (keras-io structured
    data): the statistics take its dense value (the statistics step used to raise),
    so factors and weights equal those of the same model fed the dense one-hot."""
    ids = np.random.default_rng(0).integers(0, 1000, (32, 1)).astype("int64")
    y = (ids[:, 0] % 3).astype("int32")

    def train(sparse):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((1,), dtype="int64")
        h = keras.layers.Hashing(16, output_mode="one_hot", sparse=sparse)(inputs)
        h = keras.layers.Dense(8, activation="tanh")(h)
        model = keras_tkfac.wrap(keras.Model(inputs, keras.layers.Dense(3)(h)))
        model.compile(optimizer=cls(seed=0), loss=LOSS)
        model.fit(ids, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        factors = [f.numpy() for slot in model.optimizer._slots for f in slot.factors]
        return factors, [w.numpy() for w in model.trainable_weights]

    (sparse_factors, sparse_weights), (dense_factors, dense_weights) = (
        train(True), train(False))
    assert len(sparse_factors) == len(dense_factors) > 0
    assert np.any(sparse_factors[0] != 0)
    for a, b in zip(sparse_factors + sparse_weights, dense_factors + dense_weights):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("cls", helpers.TKFAC_THEN_KFAC)
@pytest.mark.parametrize("dtype", ["int32", "bool"])
def test_a_dense_layer_fed_integers_trains_as_on_their_float_values(cls, dtype):
    """`Dense` takes an integer or boolean `keras.Input` directly (Keras casts it);
    the statistics step used to raise a `TypeError`. Factors and weights equal
    those of the same model fed the same values as floats."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2 if dtype == "bool" else 5, (32, 6)).astype(dtype)
    y = (x.astype("int32").sum(1) % 3).astype("int32")

    def train(input_dtype):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((6,), dtype=input_dtype)
        h = keras.layers.Dense(8, activation="tanh")(inputs)
        model = keras_tkfac.wrap(keras.Model(inputs, keras.layers.Dense(3)(h)))
        model.compile(optimizer=cls(seed=0), loss=LOSS)
        model.fit(x.astype(input_dtype), y, batch_size=8, epochs=1, shuffle=False,
                  verbose=0)
        factors = [f.numpy() for slot in model.optimizer._slots for f in slot.factors]
        return factors, [w.numpy() for w in model.trainable_weights]

    (int_factors, int_weights), (float_factors, float_weights) = (
        train(dtype), train("float32"))
    assert len(int_factors) == len(float_factors) > 0
    assert np.any(int_factors[0] != 0)
    for a, b in zip(int_factors + int_weights, float_factors + float_weights):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("cls", helpers.TKFAC_THEN_KFAC)
def test_a_float64_model_trains_as_its_float32_twin(cls):
    """Under `keras.config.set_floatx("float64")` the curvature state stays float32
    (the first statistics step used to raise a `TypeError`); the float64 model's
    weights after three steps equal its float32 twin's to float32 rounding."""
    x, y = helpers.classification_data(n=24)
    initial = []

    def train(floatx):
        previous = keras.config.floatx(), keras.config.dtype_policy()
        keras.config.set_floatx(floatx)
        keras.config.set_dtype_policy(floatx)  # (a test may have fixed the policy)
        try:
            model = keras_tkfac.wrap(keras.Sequential([
                keras.Input((x.shape[1],)), keras.layers.Dense(6, activation="tanh"),
                keras.layers.Dense(3)]))
            # Both start from the same weights (the initialisers draw per dtype).
            if not initial:
                initial.extend(w.numpy() for w in model.weights)
            model.set_weights([w.astype(floatx) for w in initial])
            model.compile(optimizer=cls(seed=0, factor_update_freq=1,
                                        inverse_update_freq=1), loss=LOSS)
            history = model.fit(x.astype(floatx), y, batch_size=8, epochs=1,
                                shuffle=False, verbose=0).history
            return [w.numpy() for w in model.trainable_weights], history["loss"]
        finally:
            keras.config.set_floatx(previous[0])
            keras.config.set_dtype_policy(previous[1])

    (weights64, loss64), (weights32, _) = train("float64"), train("float32")
    assert all(w.dtype == np.float64 for w in weights64)
    assert np.isfinite(loss64[-1])
    for a, b in zip(weights64, weights32):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cls", helpers.TKFAC_THEN_KFAC)
def test_a_summed_loss_trains_as_the_mean_weighted_by_the_batch(cls, caplog):
    """`reduction="sum"` is the mean over the batch's terms times their number:
    statistics, curvature products and the losses of the quadratic model follow it
    (they used to take the mean, so every default step was untrusted and fell back
    to a `"graft"` step), so the run equals the mean loss with `loss_weights` the
    batch size. A reduction the curvature does not follow is logged."""
    x, y = helpers.classification_data(n=32)

    def train(loss, **compile_kwargs):
        keras.utils.set_random_seed(0)
        model = keras_tkfac.wrap(keras.Sequential([
            keras.Input((x.shape[1],)), keras.layers.Dense(6, activation="tanh"),
            keras.layers.Dense(3)]))
        model.compile(optimizer=cls(seed=0), loss=loss, **compile_kwargs)
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        return [w.numpy() for w in model.trainable_weights], model.optimizer

    summed, optimizer = train(keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction="sum"))
    weighted, _ = train(LOSS, loss_weights=[8.0])
    mean, _ = train(LOSS)
    for a, b in zip(summed, weighted):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # `reduction=None` / `"none"`: per-example values, whose gradient `fit` takes
    # as that of their sum (Keras logs their mean); the curvature follows the sum.
    for reduction in (None, "none"):
        unreduced, _ = train(keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction=reduction))
        for a, b in zip(unreduced, summed):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    if cls is keras_tkfac.TKFAC:
        # A constant factor on the loss (the batch size here) reaches TKFAC's
        # step only through damping terms, and the KL bound is per unit of weight
        # (`quadratic.KL_PER_UNIT_WEIGHT`, since 2026-12-07; before, it held the
        # summed loss's steps sqrt(8) times shorter and this was `not allclose`):
        # the sum trains as the mean (here to about 1e-6 relative).
        np.testing.assert_allclose(summed[0], mean[0], rtol=1e-3, atol=1e-5)
    else:
        # KFAC's factors are damped by an absolute amount, which the factor 8 on
        # their statistics makes relatively smaller: another preconditioner.
        assert not np.allclose(summed[0], mean[0], rtol=1e-3)
    assert float(optimizer.damping_scale.numpy()) != 1.0  # the model was trusted
    logging.get_absl_logger().propagate = True
    loss_specs._WARNED.clear()
    with caplog.at_level("WARNING"):
        loss_specs.resolve_loss(keras.losses.MeanSquaredError(
            reduction="mean_with_sample_weight"), "true")
    assert any("reduction='mean_with_sample_weight'" in r.getMessage()
               for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING"):  # Keras's "mean" is its default's mean
        spec = loss_specs.resolve_loss(keras.losses.MeanSquaredError(reduction="mean"),
                                   "true")
    assert not spec.sums and not any("reduction=" in r.getMessage()
                                     for r in caplog.records)


class Distiller(keras.Model):
    """keras-io's knowledge distillation (Keras 3): its own `compile` arguments and
    `compute_loss`, Keras's `train_step`."""

    def __init__(self, student, teacher):
        super().__init__()
        self.student, self.teacher = student, teacher

    def compile(self, optimizer, metrics, student_loss_fn, distillation_loss_fn,
                alpha=0.1, temperature=3):
        super().compile(optimizer=optimizer, metrics=metrics)
        self.student_loss_fn = student_loss_fn
        self.distillation_loss_fn = distillation_loss_fn
        self.alpha, self.temperature = alpha, temperature

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None,
                     allow_empty=False):
        teacher = self.teacher(x, training=False)
        distillation = self.distillation_loss_fn(
            keras.ops.softmax(teacher / self.temperature, axis=1),
            keras.ops.softmax(y_pred / self.temperature, axis=1))
        return (self.alpha * self.student_loss_fn(y, y_pred)
                + (1 - self.alpha) * distillation * self.temperature**2)

    def call(self, x):
        return self.student(x)


class Penalised(TwoDense):
    """Keras's `compile`, its own `compute_loss` (the compiled loss plus a penalty)."""

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None,
                     training=True):
        base = super().compute_loss(x=x, y=y, y_pred=y_pred,
                                    sample_weight=sample_weight, training=training)
        return base + 10.0 * keras.ops.mean(keras.ops.square(y_pred))


def test_a_models_own_compute_loss_is_the_wrapped_models_loss():
    """A model's own `compute_loss` is what the wrapper trains and evaluates (it
    was silently replaced by Keras's); keras-io's Distiller, whose own `compile`
    takes other arguments, trains with the optimizer and metrics it was given (it
    raised "No loss to compute")."""
    x, y = helpers.classification_data(n=32)

    def penalised(wrapped, optimizer):
        keras.utils.set_random_seed(0)
        model = keras_tkfac.wrap(Penalised()) if wrapped else Penalised()
        model.compile(optimizer=optimizer, loss=LOSS)
        return model, model.fit(x, y, batch_size=8, epochs=2, shuffle=False,
                                verbose=0).history["loss"]

    _, plain = penalised(False, keras.optimizers.Adam(1e-3))
    _, wrapped = penalised(True, keras.optimizers.Adam(1e-3))
    np.testing.assert_allclose(wrapped, plain, rtol=1e-6)
    model, _ = penalised(True, keras_tkfac.TKFAC(seed=0))
    logits = model.predict(x, verbose=0)
    expected = float(LOSS(y, logits)) + 10.0 * float(np.mean(logits**2))
    np.testing.assert_allclose(model.evaluate(x, y, verbose=0), expected, rtol=1e-5)

    def distill(wrapped, optimizer):
        keras.utils.set_random_seed(0)
        model = Distiller(TwoDense(), TwoDense())
        model = keras_tkfac.wrap(model) if wrapped else model
        model.compile(optimizer=optimizer, metrics=["accuracy"],
                      student_loss_fn=LOSS,
                      distillation_loss_fn=keras.losses.KLDivergence())
        return model, model.fit(x, y, batch_size=8, epochs=3, shuffle=False,
                                verbose=0).history

    _, plain = distill(False, keras.optimizers.Adam(1e-2))
    _, wrapped = distill(True, keras.optimizers.Adam(1e-2))
    for key in ("loss", "accuracy"):
        np.testing.assert_allclose(wrapped[key], plain[key], rtol=1e-6)
    optimizer = keras_tkfac.TKFAC(seed=0)
    model, history = distill(True, optimizer)
    assert model.optimizer is optimizer
    assert np.all(np.isfinite(history["loss"])) and "accuracy" in history


def test_a_declined_layer_is_logged_for_every_model_even_with_a_reused_name(caplog):
    """Each declined layer's fallback is logged once per layer: a second model in a
    notebook whose layer has the same name (given explicitly, or Keras's own after
    `keras.backend.clear_session()`) is logged too (it was not)."""
    logging.get_absl_logger().propagate = True

    def model():
        # (A grouped convolution with LoRA: other layers have LoRA blocks.)
        conv = keras.layers.Conv1D(4, 2, groups=2, name="low_rank")
        model = keras.Sequential([keras.Input((5, 4)), conv])
        conv.enable_lora(2)
        return model

    messages = []
    for _ in range(2):
        caplog.clear()
        with caplog.at_level("WARNING"):
            keras_tkfac.wrap(model())
        messages.append([r.getMessage() for r in caplog.records
                         if "'low_rank' has LoRA" in r.getMessage()])
    assert [len(m) for m in messages] == [1, 1]


@pytest.mark.parametrize("step_control", ["quadratic", "graft"])
def test_a_stateful_rnns_state_advances_once_a_step(step_control):
    """A stateful LSTM's carried state after each step is that of one forward pass
    from the weights before it, on every step: the statistics' own pass and the
    step control's loss and products passes restore it (`keras_compat.
    state_variables`; Keras creates it untracked, so they advanced it a second
    time, on steps 0, 5 and 10 of 12 under the default control)."""
    batch, steps = 4, 7
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, 5, 2)).astype("float32")
    y = rng.normal(size=(batch, 5, 1)).astype("float32")

    def build():
        keras.utils.set_random_seed(0)
        return keras.Sequential([
            keras.Input((5, 2), batch_size=batch),
            keras.layers.LSTM(3, stateful=True, return_sequences=True),
            keras.layers.Dense(1)])

    model = keras_tkfac.wrap(build())
    model.compile(optimizer=keras_tkfac.TKFAC(seed=0, step_control=step_control),
                  loss="mse")
    lstm = model.model.layers[0]
    check = build()
    for _ in range(steps):
        check.set_weights(model.get_weights())
        for mine, theirs in zip(check.layers[0].states, lstm.states):
            mine.assign(theirs.numpy())
        check(x)  # (one pass from the step's weights and carried state)
        model.train_on_batch(x, y)
        for mine, theirs in zip(check.layers[0].states, lstm.states):
            np.testing.assert_allclose(theirs.numpy(), mine.numpy(), rtol=1e-5,
                                       atol=1e-6)
    assert int(model.optimizer.iterations) == steps
