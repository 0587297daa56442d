"""Levenberg-Marquardt adaptation of the damping (`adaptive_damping=True`)."""

import numpy as np
import pytest
import tensorflow as tf
import keras

import keras_tkfac
from keras_tkfac import damping
from keras_tkfac import step_ops
from keras_tkfac import progress
from keras_tkfac import step_size
from tests import test_quadratic as quadratic_tests

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("ratio, expected", [
    (0.9, 0.5 * 0.8), (0.5, 0.5), (0.1, 0.5 / 0.8), (-3.0, 0.5 / 0.8),
    (np.nan, 0.5 / 0.8), (np.inf, 0.5 / 0.8)])
def test_levenberg_marquardt_rule(ratio, expected):
    # Martens & Grosse: shrink above 3/4, grow below 1/4 (and on a non-finite ratio).
    np.testing.assert_allclose(
        step_ops.levenberg_marquardt(0.5, ratio, 0.8, 1e-4, 1e4), expected, rtol=1e-6)


def test_levenberg_marquardt_rule_is_bounded():
    assert float(step_ops.levenberg_marquardt(1e-4, 1.0, 0.5, 1e-4, 1e4)) == pytest.approx(
        1e-4)
    assert float(step_ops.levenberg_marquardt(1e4, 0.0, 0.5, 1e-4, 1e4)) == pytest.approx(
        1e4)


@pytest.mark.parametrize("loss, peak, onset, expected", [
    (0.5, 1.0, 1.0, 0.5), (2.0, 1.0, 1.0, 1.0), (1e-6, 1.0, 1.0, 1e-3),
    (0.3, 0.0, 1.0, 1.0), (0.0, 1.0, 1.0, 1e-3), (0.005, 1.0, 0.01, 0.5),
    (0.05, 1.0, 0.01, 1.0)])
def test_loss_relative_factor(loss, peak, onset, expected):
    np.testing.assert_allclose(
        step_ops.loss_relative_factor(loss, peak, 1e-3, onset), expected, rtol=1e-6)


def _built_optimizer(**kwargs):
    optimizer = keras_tkfac.TKFAC(**kwargs)
    optimizer.attach([])  # no curvature blocks: only the damping's state
    optimizer.build([keras.Variable(np.ones((2, 2), "float32"))])
    return optimizer


def test_model_factor_follows_the_highest_loss_seen(monkeypatch):
    monkeypatch.setattr(damping, "LOSS_RELATIVE_FLOOR", 1e-3)
    monkeypatch.setattr(damping, "LOSS_RELATIVE_ONSET", 0.5)
    optimizer = _built_optimizer()
    # (loss, nonnegative) -> factor, peak after: the peak rises with the loss; a
    # loss that may be negative, or is not finite, gives 1 and leaves the peak.
    for loss, nonnegative, factor, peak in [
            (1.0, True, 1.0, 1.0), (2.0, True, 1.0, 2.0), (0.5, True, 0.5, 2.0),
            (np.nan, True, 1.0, 2.0), (0.1, False, 1.0, 2.0), (5.0, False, 1.0, 2.0),
            (0.1, True, 0.1, 2.0), (1e-9, True, 1e-3, 2.0)]:
        found, highest = damping.model_factor(optimizer, tf.constant(loss),
                                              tf.constant(nonnegative))
        damping.keep_peak(optimizer, highest)
        np.testing.assert_allclose(float(found), factor, rtol=1e-6)
        np.testing.assert_allclose(float(optimizer.loss_peak.numpy()), peak, rtol=1e-6)


@pytest.mark.parametrize("options", [{"step_control": "graft"},
                                     {"step_control": "kl_clip"}])
def test_model_factor_needs_a_quadratic_control(options):
    optimizer = _built_optimizer(**options)
    assert optimizer.loss_peak is None
    factor, peak = damping.model_factor(optimizer, tf.constant(0.1), True)
    assert float(factor) == 1.0 and float(peak) == 0.0


def test_model_value_is_the_explicit_quadratic():
    basis = RNG.normal(size=(2, 6))
    c = RNG.normal(size=(6, 6))
    curvature, norms = basis @ (c @ c.T) @ basis.T, basis @ basis.T
    slopes, coefficients = RNG.normal(size=2), RNG.normal(size=2)
    step, grad = coefficients @ basis, np.linalg.lstsq(basis, slopes, rcond=None)[0]
    explicit = -step @ grad + 0.5 * step @ (c @ c.T + 0.3 * np.eye(6)) @ step
    np.testing.assert_allclose(
        step_ops.quadratic_model_value(curvature, norms, slopes, 0.3, coefficients),
        explicit, rtol=1e-5)
    # At the model's minimiser it is `quadratic_model_step`'s value.
    a, b, value = step_ops.quadratic_model_step(curvature, norms, slopes, 0.3)
    np.testing.assert_allclose(
        step_ops.quadratic_model_value(curvature, norms, slopes, 0.3, [a, b]), value,
        rtol=1e-5)


def _adapting_run(steps, fraction, step_control="graft_quadratic", given=0.1):
    """`(weights after each step, damping_scale after each step)` on one batch,
    each step `fraction` of the model's."""
    scales = []
    weights = quadratic_tests._fit_steps(
        steps, fraction, damping=given, step_control=step_control,
        adaptive_damping=True, scales=scales)
    return weights, scales


# Each branch of the rule: the model step with damping 0.1 predicts well (ratio
# ~0.96: shrink), with damping 0.01 less so (~0.57: keep); with damping 1e-5 the
# model trusts the Gauss-Newton matrix too far (~0.15, and -0.35 grafted: grow).
@pytest.mark.parametrize("step_control", ["quadratic", "graft_quadratic"])
@pytest.mark.parametrize("given, fraction, change", [
    (0.1, 1.0, "shrink"), (0.01, 1.0, "keep"), (1e-5, 1.0, "grow")])
def test_damping_follows_the_explicit_reduction_ratio(step_control, given,
                                                      fraction, change, monkeypatch):
    # (The first steps' ceiling would cap the model's step; `tests/test_progress.py`.)
    monkeypatch.setattr(progress, "INITIAL", None)
    weights, scales = _adapting_run(2, fraction, step_control, given)
    step = quadratic_tests._flat(weights[0]) - quadratic_tests._flat(weights[1])
    grad, curvature = quadratic_tests._gradient_and_curvature(weights[0])
    # Dense layers' damping is the given one for every weight.
    predicted = -step @ grad + 0.5 * step @ (
        curvature + given * np.eye(len(grad))) @ step
    losses = [quadratic_tests._loss(w) for w in weights[:2]]
    ratio = (losses[1] - losses[0]) / predicted
    assert predicted < 0 and min(abs(ratio - 0.25), abs(ratio - 0.75)) > 0.02
    expected = float(step_ops.levenberg_marquardt(1.0, ratio, damping.DECAY,
                                             *damping.SCALE_BOUNDS))
    np.testing.assert_allclose(scales[0], expected, rtol=1e-5)
    assert {"shrink": expected < 1.0, "keep": expected == 1.0,
            "grow": expected > 1.0}[change]
    # Step 1 is not an adaptation step: the factor is kept.
    assert scales[1] == scales[0]


def test_adapted_damping_enters_the_next_model(monkeypatch):
    # The second step minimises the model damped by 0.1 * damping_scale times the
    # loss-relative factor (`damping.model_factor`): the batch's loss over the
    # highest seen, from the explicit losses. (With the momentum coefficient free:
    # at this damping the model's `b` is below `MOMENTUM_RANGE`, and a step on the
    # range's edge is not stationary along the previous step.)
    monkeypatch.setattr(step_size, "MOMENTUM_RANGE", None)
    monkeypatch.setattr(damping, "LOSS_RELATIVE_ONSET", 1.0)  # (the loss falls by a third)
    weights, scales = _adapting_run(2, 1.0, "quadratic")
    first = quadratic_tests._flat(weights[0]) - quadratic_tests._flat(weights[1])
    second = quadratic_tests._flat(weights[1]) - quadratic_tests._flat(weights[2])
    grad, curvature = quadratic_tests._gradient_and_curvature(weights[1])
    assert scales[0] < 0.9
    losses = [quadratic_tests._loss(w) for w in weights[:2]]
    factor = float(step_ops.loss_relative_factor(losses[1], max(losses),
                                            damping.LOSS_RELATIVE_FLOOR, 1.0))
    assert factor < 0.9
    for scale, tolerance_holds in ((scales[0] * factor, True), (scales[0], False),
                                   (1.0, False)):
        residual = grad - (curvature + 0.1 * scale * np.eye(len(grad))) @ second
        holds = all(abs(d @ residual) < 2e-3 * np.linalg.norm(d) * np.linalg.norm(grad)
                    for d in (first, second))
        assert holds == tolerance_holds


def test_a_learning_rate_above_the_model_step_takes_the_model_step():
    # Beyond twice the model's minimiser the model predicts a rise and the ratio
    # cannot adapt the damping: learning rates above 1e-3 take the whole step.
    for control in ("quadratic", "graft_quadratic"):
        whole = _adapting_run(1, 1.0, control)[0][1]
        for got, want in zip(_adapting_run(1, 2.5, control)[0][1], whole):
            np.testing.assert_array_equal(got, want)


class _Batch:
    syncs = False

    def __init__(self, after):
        self.after = after

    def loss(self):
        return tf.constant(self.after)


@pytest.mark.parametrize("predicted, expected", [(0.5, 1.0), (0.0, 1.0),
                                                 (-0.5, damping.DECAY)])
def test_no_adaptation_on_a_step_predicted_not_to_decrease_the_loss(predicted,
                                                                     expected):
    optimizer = _built_optimizer(step_control="graft_quadratic")
    # Loss 1 -> 0.5: ratio 1 (shrink) where the model predicted -0.5.
    damping.hand_over(optimizer, tf.constant(predicted), tf.constant(1.0))
    damping.adapt(optimizer, _Batch(0.5), None)
    np.testing.assert_allclose(float(optimizer.damping_scale.numpy()), expected,
                               rtol=1e-6)


def test_damping_state_is_saved_with_the_model(tmp_path):
    x, y = quadratic_tests._data()
    model = keras_tkfac.wrap(quadratic_tests._classifier(0))
    model.compile(optimizer=keras_tkfac.TKFAC(step_control="graft_quadratic",
                                              adaptive_damping=True, seed=0),
                  loss="sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=4, epochs=2, verbose=0)
    scale = float(model.optimizer.damping_scale.numpy())
    peak = float(model.optimizer.loss_peak.numpy())
    assert scale != 1.0 and peak > 0.0
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    assert loaded.optimizer.adaptive_damping is True
    assert float(loaded.optimizer.damping_scale.numpy()) == scale
    assert float(loaded.optimizer.loss_peak.numpy()) == peak


def _custom_loop(adaptive_damping, labels, steps=6):
    # (Damping 10 as given, which the ratio shrinks: no trace cap.)
    optimizer = keras_tkfac.TKFAC(step_control="graft_quadratic", damping=10.0,
                                  adaptive_damping=adaptive_damping,
                                  trace_damping_cap=None, seed=0)
    weights = quadratic_tests._custom_loop_weights(optimizer, steps, forward=True,
                                                   labels=labels)
    return optimizer, weights


def test_custom_loop_without_labels_keeps_the_damping():
    # The ratio needs the batch's loss, which needs `y_true`: without it the damping
    # stays as given (a warning says why) and the steps are the fixed-damping ones.
    adapted, _ = _custom_loop(None, labels=True)
    assert float(adapted.damping_scale.numpy()) != 1.0
    kept, found = _custom_loop(None, labels=False)
    assert float(kept.damping_scale.numpy()) == 1.0
    _, expected = _custom_loop(False, labels=False)
    for got, want in zip(found, expected):
        np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("options, match", [
    ({"adaptive_damping": True, "step_control": "graft"}, "step_control='graft'"),
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
