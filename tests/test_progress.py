"""The quadratic model's step ceiling that follows the training loss
(`keras_tkfac.progress`): the rule by hand, the capped model, and its effect on a
run whose batches are noise."""

import numpy as np
import pytest
import tensorflow as tf
import keras

import keras_tkfac
from keras_tkfac import step_ops
from keras_tkfac import progress
from keras_tkfac import step_size

FLOOR = step_size.GRAFT_QUADRATIC_FLOOR


def _run_rule(losses, coefficients, window=3, usable=None):
    state = tf.zeros([5])
    states = []
    for i, (loss, a) in enumerate(zip(losses, coefficients)):
        ok = True if usable is None else usable[i]
        state = progress.advance(state, loss, tf.constant(ok), a, window=window)
        states.append(state.numpy())
    return states


def test_the_ceiling_by_hand():
    # Windows of 3: the first sets none; the second's mean (2.0) did not fall below
    # the first's (2.0) by 1%: the ceiling is half the lesser of none and the
    # window's largest `a` (0.4 -> 0.2); the third fell (1.0): 0.2 * 1.25; the
    # fourth stalled again: half of min(0.25, its largest a 0.1) -> 0.05.
    losses = [2.0, 2.0, 2.0] + [2.5, 1.5, 2.0] + [1.0, 1.0, 1.0] + [1.0, 1.2, 0.8]
    coefficients = [0.3, 0.1, 0.2] + [0.4, 0.1, 0.05] + [0.2, 0.2, 0.2] + [0.1, 0.05, 0.1]
    states = _run_rule(losses, coefficients)
    ceilings = [s[progress.CEILING] for s in states]
    np.testing.assert_allclose(ceilings, [0] * 3 + [0, 0, 0.2] + [0.2, 0.2, 0.25]
                               + [0.25, 0.25, 0.05], rtol=1e-6)
    # After a full window: its mean kept, the sums and count reset.
    np.testing.assert_allclose(states[2], [0.0, 0.0, 2.0, 0.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(states[4], [0.0, 4.0, 2.0, 0.4, 2.0], rtol=1e-6)


def test_the_ceiling_never_falls_below_the_floor_and_skips_unusable_steps():
    states = _run_rule([1.0] * 6, [FLOOR] * 6)
    assert states[-1][progress.CEILING] == pytest.approx(FLOOR)
    usable = [True, False, True, True]
    states = _run_rule([1.0, np.nan, 1.0, 1.0], [0.1] * 4, window=2, usable=usable)
    np.testing.assert_array_equal(states[1], states[0])  # the NaN step left it
    assert states[3][progress.PREVIOUS] == pytest.approx(1.0)


@pytest.mark.parametrize("a, ceiling, expected", [
    (0.5, 0.0, 0.5),          # no ceiling
    (0.5, 0.1, 0.1),          # capped
    (0.05, 0.1, 0.05),        # below it
    (FLOOR, 0.1, FLOOR),      # at the floor
    (-0.2, 0.1, -0.2),        # a negative coefficient is the model's
    (0.5, FLOOR / 2, FLOOR),  # never below the floor
])
def test_cap_coefficient(a, ceiling, expected):
    assert float(step_ops.cap_coefficient(a, ceiling, FLOOR)) == pytest.approx(expected)


def test_the_capped_models_prediction_is_the_capped_steps():
    rng = np.random.default_rng(0)
    g, m = (tf.constant(rng.normal(size=(3, 2)), tf.float32) for _ in range(2))
    u = g + 0.1 * m
    c = rng.normal(size=(6, 6))
    c = tf.constant(c @ c.T / 50.0, tf.float32)

    def gram(directions):
        flat = [tf.reshape(d[0], [-1]) for d in directions]
        return tf.stack([tf.stack([tf.tensordot(x, tf.linalg.matvec(c, y), 1)
                                   for y in flat]) for x in flat])

    (a, b), predicted, _ = step_size.quadratic_updates(
        gram, [0.1], [u], [g], [m], min_coefficient=FLOOR)
    assert float(a) > 0.02  # the uncapped model's step is above the ceiling below
    (a2, b2), predicted2, _ = step_size.quadratic_updates(
        gram, [0.1], [u], [g], [m], min_coefficient=FLOOR, max_coefficient=0.01)
    assert float(a2) == pytest.approx(0.01)
    s = tf.reshape(a2 * u + b2 * m, [-1])
    value = (-tf.tensordot(s, tf.reshape(g, [-1]), 1)
             + 0.5 * tf.tensordot(s, tf.linalg.matvec(c, s), 1)
             + 0.5 * 0.1 * tf.tensordot(s, s, 1))
    np.testing.assert_allclose(float(predicted2(1.0)), float(value), rtol=1e-5)


def _noise_run(window):
    """A wrapped MLP on labels that carry no signal and that it is too small to
    memorise: 3 epochs of 64 steps of 32, the windows' rule alone (no `INITIAL`
    ceiling). Returns the model and its epochs' losses."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2048, 12)).astype("float32")
    y = rng.integers(0, 2, 2048)
    keras.utils.set_random_seed(0)
    model = keras_tkfac.wrap(keras.Sequential([
        keras.Input((12,)), keras.layers.Dense(8, activation="relu"),
        keras.layers.Dense(2)]))
    model.compile(optimizer=keras_tkfac.TKFAC(seed=0),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    old = progress.WINDOW, progress.INITIAL
    progress.WINDOW, progress.INITIAL = window, None
    try:
        history = model.fit(x, y, batch_size=32, epochs=3, shuffle=False, verbose=0)
    finally:
        progress.WINDOW, progress.INITIAL = old
    return model, history.history["loss"]


def test_on_noise_the_ceiling_caps_the_models_steps():
    # Random labels: the windows' losses stop falling, the ceiling is set below
    # the model's steps of the same run without the rule (a window longer than the
    # run; its largest `a` in the last window 0.52), and the last epoch's training
    # loss is lower (0.702 against 0.718).
    model, losses = _noise_run(progress.WINDOW)
    state = model.optimizer.progress.numpy()
    off, losses_off = _noise_run(10 ** 6)
    state_off = off.optimizer.progress.numpy()
    assert state_off[progress.CEILING] == 0.0 and state_off[progress.COUNT] == 192
    assert FLOOR < state[progress.CEILING] < 0.1 * state_off[progress.HIGHEST]
    assert state[progress.HIGHEST] <= state[progress.CEILING] + 1e-7
    assert losses[-1] < losses_off[-1]


@pytest.mark.parametrize("step_control, window, has", [
    ("graft_quadratic", progress.WINDOW, True), ("graft_quadratic", None, False),
    ("graft", progress.WINDOW, False), ("quadratic", progress.WINDOW, False)])
def test_the_ceiling_is_built_under_graft_quadratic_unless_turned_off(
        step_control, window, has, monkeypatch):
    monkeypatch.setattr(progress, "WINDOW", window)
    model = keras_tkfac.wrap(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]))
    optimizer = keras_tkfac.TKFAC(step_control=step_control)
    model.compile(optimizer=optimizer, loss="mse")
    history = model.fit(np.ones((4, 3)), np.ones((4, 2)), verbose=0)
    assert (optimizer.progress is not None) == has
    assert np.isfinite(history.history["loss"][0])


def test_the_first_steps_take_the_initial_ceiling(monkeypatch):
    """Over the first `INITIAL_STEPS` iterations the ceiling is `INITIAL`, whatever
    the state; after them the rule's (here none, then a set one)."""
    monkeypatch.setattr(progress, "INITIAL", 0.01)
    monkeypatch.setattr(progress, "INITIAL_STEPS", 5)
    optimizer = keras_tkfac.TKFAC()
    optimizer.build([keras.Variable(np.ones((2, 2), "float32"))])
    for iterations, state_ceiling, expected in ((0, 0.0, 0.01), (4, 0.5, 0.01),
                                                (5, 0.0, 0.0), (21, 0.3, 0.3)):
        optimizer.iterations.assign(iterations)
        optimizer.progress.assign([state_ceiling, 0.0, 0.0, 0.0, 0.0])
        np.testing.assert_allclose(float(progress.ceiling(optimizer)), expected,
                                   rtol=1e-6)
    monkeypatch.setattr(progress, "INITIAL", None)
    optimizer.iterations.assign(0)
    optimizer.progress.assign([0.3, 0.0, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(float(progress.ceiling(optimizer)), 0.3, rtol=1e-6)


def _denoising_autoencoder(seed):
    """keras-io's convolutional autoencoder for image denoising, 8 filters, on
    digits upsampled to 16 x 16 with N(0, 0.4) noise (256 images)."""
    from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
    images = load_digits().images.astype("float32") / 16.0
    clean = np.kron(images, np.ones((1, 2, 2), "float32"))[:256, ..., None]
    rng = np.random.default_rng(seed)
    noisy = np.clip(clean + 0.4 * rng.standard_normal(clean.shape), 0, 1)
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((16, 16, 1))
    h = inputs
    for _ in range(2):
        h = keras.layers.Conv2D(8, 3, activation="relu", padding="same")(h)
        h = keras.layers.MaxPooling2D(2, padding="same")(h)
    for _ in range(2):
        h = keras.layers.Conv2DTranspose(8, 3, strides=2, activation="relu",
                                         padding="same")(h)
    outputs = keras.layers.Conv2D(1, 3, activation="sigmoid", padding="same")(h)
    return keras.Model(inputs, outputs), noisy.astype("float32"), clean


def test_the_denoising_conv_autoencoder_trains_at_the_defaults():
    """keras-io's denoising autoencoder at seed 0: the first step's `a` (0.1,
    kernels moved by several times their norms) took the loss from 0.69 to over
    1e3 in the first epoch and 6e4 in the third without `INITIAL`; with it the
    loss falls every epoch."""
    model, noisy, clean = _denoising_autoencoder(0)
    model = keras_tkfac.wrap(model)
    model.compile(optimizer=keras_tkfac.TKFAC(seed=0), loss="binary_crossentropy")
    losses = model.fit(noisy, clean, batch_size=32, epochs=3, shuffle=False,
                       verbose=0).history["loss"]
    assert np.all(np.diff(losses) < 0) and losses[-1] < 0.4, losses
