"""Levenberg-Marquardt adaptation of the damping (`adaptive_damping=True`)."""

import numpy as np
import pytest
import tensorflow as tf
import keras

import keras_tkfac
from keras_tkfac import damping
from keras_tkfac import ops
from tests import test_quadratic as quadratic_tests

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("ratio, expected", [
    (0.9, 0.5 * 0.8), (0.5, 0.5), (0.1, 0.5 / 0.8), (-3.0, 0.5 / 0.8),
    (np.nan, 0.5 / 0.8), (np.inf, 0.5 / 0.8)])
def test_levenberg_marquardt_rule(ratio, expected):
    # Martens & Grosse: shrink above 3/4, grow below 1/4 (and on a non-finite ratio).
    np.testing.assert_allclose(
        ops.levenberg_marquardt(0.5, ratio, 0.8, 1e-4, 1e4), expected, rtol=1e-6)


def test_levenberg_marquardt_rule_is_bounded():
    assert float(ops.levenberg_marquardt(1e-4, 1.0, 0.5, 1e-4, 1e4)) == pytest.approx(
        1e-4)
    assert float(ops.levenberg_marquardt(1e4, 0.0, 0.5, 1e-4, 1e4)) == pytest.approx(
        1e4)


def test_model_value_is_the_explicit_quadratic():
    basis = RNG.normal(size=(2, 6))
    c = RNG.normal(size=(6, 6))
    curvature, norms = basis @ (c @ c.T) @ basis.T, basis @ basis.T
    slopes, coefficients = RNG.normal(size=2), RNG.normal(size=2)
    step, grad = coefficients @ basis, np.linalg.lstsq(basis, slopes, rcond=None)[0]
    explicit = -step @ grad + 0.5 * step @ (c @ c.T + 0.3 * np.eye(6)) @ step
    np.testing.assert_allclose(
        ops.quadratic_model_value(curvature, norms, slopes, 0.3, coefficients),
        explicit, rtol=1e-5)
    # At the model's minimiser it is `quadratic_model_step`'s value.
    a, b, value = ops.quadratic_model_step(curvature, norms, slopes, 0.3)
    np.testing.assert_allclose(
        ops.quadratic_model_value(curvature, norms, slopes, 0.3, [a, b]), value,
        rtol=1e-5)


def _adapting_run(steps, learning_rate, step_control="graft_quadratic", given=0.1):
    """`(weights after each step, damping_scale after each step)` on one batch."""
    scales = []
    weights = quadratic_tests._fit_steps(
        steps, learning_rate, damping=given, step_control=step_control,
        adaptive_damping=True, scales=scales)
    return weights, scales


def _loss(weights):
    x, y = quadratic_tests._data()
    model = quadratic_tests._classifier(0)
    model.set_weights([w.astype("float32") for w in weights])
    return float(keras.losses.SparseCategoricalCrossentropy()(y, model(x)))


# Each branch of the rule: the model step with damping 0.1 predicts well (ratio
# ~0.96: shrink), with damping 0.01 less so (~0.57: keep); 1.9 times that step
# raises the loss where the model predicted a fall (~-1: grow).
@pytest.mark.parametrize("step_control", ["quadratic", "graft_quadratic"])
@pytest.mark.parametrize("given, learning_rate, change", [
    (0.1, 1.0, "shrink"), (0.01, 1.0, "keep"), (0.01, 1.9, "grow")])
def test_damping_follows_the_explicit_reduction_ratio(step_control, given,
                                                      learning_rate, change):
    weights, scales = _adapting_run(2, learning_rate, step_control, given)
    step = quadratic_tests._flat(weights[0]) - quadratic_tests._flat(weights[1])
    grad, curvature = quadratic_tests._gradient_and_curvature(weights[0])
    # Dense layers' damping is the given one for every weight.
    predicted = -step @ grad + 0.5 * step @ (
        curvature + given * np.eye(len(grad))) @ step
    ratio = (_loss(weights[1]) - _loss(weights[0])) / predicted
    assert predicted < 0 and min(abs(ratio - 0.25), abs(ratio - 0.75)) > 0.02
    expected = float(ops.levenberg_marquardt(1.0, ratio, damping.DECAY,
                                             *damping.SCALE_BOUNDS))
    np.testing.assert_allclose(scales[0], expected, rtol=1e-5)
    assert {"shrink": expected < 1.0, "keep": expected == 1.0,
            "grow": expected > 1.0}[change]
    # Step 1 is not an adaptation step: the factor is kept.
    assert scales[1] == scales[0]


def test_adapted_damping_enters_the_next_model():
    # The second step minimises the model damped by 0.1 * damping_scale.
    weights, scales = _adapting_run(2, 1.0, "quadratic")
    first = quadratic_tests._flat(weights[0]) - quadratic_tests._flat(weights[1])
    second = quadratic_tests._flat(weights[1]) - quadratic_tests._flat(weights[2])
    grad, curvature = quadratic_tests._gradient_and_curvature(weights[1])
    assert scales[0] < 0.9
    for scale, tolerance_holds in ((scales[0], True), (1.0, False)):
        residual = grad - (curvature + 0.1 * scale * np.eye(len(grad))) @ second
        holds = all(abs(d @ residual) < 2e-3 * np.linalg.norm(d) * np.linalg.norm(grad)
                    for d in (first, second))
        assert holds == tolerance_holds


def test_no_adaptation_on_a_step_predicted_to_increase_the_loss():
    # At 2.5 times the model's minimiser q(2.5 s) > 0: no ratio to read.
    _, scales = _adapting_run(1, 2.5, "quadratic")
    assert scales == [1.0]


def test_damping_scale_is_saved_with_the_model(tmp_path):
    x, y = quadratic_tests._data()
    model = keras_tkfac.wrap(quadratic_tests._classifier(0))
    model.compile(optimizer=keras_tkfac.TKFAC(step_control="graft_quadratic",
                                              adaptive_damping=True, seed=0),
                  loss="sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=4, epochs=2, verbose=0)
    scale = float(model.optimizer.damping_scale.numpy())
    assert scale != 1.0
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    assert loaded.optimizer.adaptive_damping is True
    assert float(loaded.optimizer.damping_scale.numpy()) == scale


def test_custom_loop_without_labels_says_what_to_pass():
    x, y = quadratic_tests._data()
    model = keras_tkfac.wrap(quadratic_tests._classifier(0))
    optimizer = keras_tkfac.TKFAC(step_control="graft_quadratic", seed=0)
    with tf.GradientTape(persistent=True) as tape:
        with keras_tkfac.record(model) as recording:
            y_pred = model(x, training=True)
        loss = keras.losses.sparse_categorical_crossentropy(y, y_pred)
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.update_curvature(recording, tape, y_pred,
                               loss="sparse_categorical_crossentropy",
                               forward=lambda: model(x, training=True))
    with pytest.raises(ValueError, match="y_true=None"):
        optimizer.apply_gradients(zip(grads, model.trainable_variables))


@pytest.mark.parametrize("options, match", [
    ({"adaptive_damping": True}, "step_control='graft'"),
    ({"adaptive_damping": True, "step_control": "trust_region"}, "trust_region"),
    ({"adaptive_damping": "yes", "step_control": "quadratic"}, "adaptive_damping"),
])
def test_adaptive_damping_arguments_are_checked(options, match):
    with pytest.raises(ValueError, match=match):
        keras_tkfac.TKFAC(**options)


@pytest.mark.parametrize("step_control, adaptive", [
    ("graft", False), ("trust_region", False), ("kl_clip", False),
    ("quadratic", True), ("graft_quadratic", True)])
def test_adaptive_damping_defaults_to_the_step_controls_with_a_model(step_control,
                                                                     adaptive):
    optimizer = keras_tkfac.TKFAC(step_control=step_control)
    assert optimizer.adaptive_damping is adaptive
    assert optimizer.get_config()["adaptive_damping"] is adaptive


def test_without_adaptation_the_damping_is_the_given_one():
    optimizer = keras_tkfac.KFAC(step_control="quadratic", damping=0.3,
                                 adaptive_damping=False)
    assert optimizer.adaptive_damping is False
    assert float(damping.current(optimizer)) == pytest.approx(0.3)
    assert float(damping.scale(optimizer)) == 1.0
