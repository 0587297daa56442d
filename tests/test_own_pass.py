"""The statistics' own forward pass (`statistics.takes_own_pass`): a recurrent
model's training step takes a non-persistent tape, and its statistics steps
backpropagate the sampled labels through a forward pass of their own. Oracle: the
same steps with the persistent tape (the statistics from the step's own pass)."""

import numpy as np
import pytest
import tensorflow as tf
import keras

import keras_tkfac
from keras_tkfac import statistics

L = keras.layers


def _recurrent_model(seed=0):
    """Embedding, LSTM (on the partner), dropout, batch normalisation, Dense: the
    dropout masks and the normalisation's moving statistics must come out as in
    the step's own pass."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((7,), dtype="int32")
    h = L.Embedding(20, 6)(inputs)
    h = L.Bidirectional(L.LSTM(5, return_sequences=True))(h)
    h = L.Dense(8, activation="tanh")(h)
    h = L.Dropout(0.3)(h)
    h = L.GlobalAveragePooling1D()(h)
    h = L.BatchNormalization()(h)
    return keras.Model(inputs, L.Dense(3)(h))


def _data(n=48, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 20, size=(n, 7)).astype("int32"),
            rng.integers(0, 3, size=(n,)).astype("int32"))


def test_a_recurrent_model_takes_its_own_pass_and_others_do_not():
    recurrent = keras_tkfac.wrap(_recurrent_model())
    keras.utils.set_random_seed(0)
    dense = keras_tkfac.wrap(keras.Sequential([keras.Input((4,)), L.Dense(3)]))
    seen = {}

    @tf.function
    def trace():
        seen["recurrent"] = statistics.takes_own_pass(recurrent)
        seen["dense"] = statistics.takes_own_pass(dense)
        return tf.constant(0)

    trace()
    assert seen == {"recurrent": True, "dense": False}
    assert not statistics.takes_own_pass(recurrent)  # eager: no while-loop graph
    recurrent.jit_compile = True
    assert not tf.function(lambda: tf.constant(
        statistics.takes_own_pass(recurrent)))().numpy()


def _train(own_pass, monkeypatch, steps, **config):
    if not own_pass:
        monkeypatch.setattr(statistics, "takes_own_pass", lambda model: False)
    x, y = _data()
    model = keras_tkfac.wrap(_recurrent_model())
    optimizer = keras_tkfac.TKFAC(seed=0, factor_update_freq=2, inverse_update_freq=2,
                                  **config)
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(x, y, batch_size=16, epochs=1, steps_per_epoch=steps,
                        shuffle=False, verbose=0)
    monkeypatch.undo()
    factors = [f.numpy() for slot in optimizer._slots for f in slot.factors]
    return (history.history["loss"], factors,
            [v.numpy() for v in model.variables])


@pytest.mark.parametrize("config", [{}, {"step_control": "graft"}],
                         ids=["default", "graft"])
def test_own_pass_gives_the_statistics_and_steps_of_the_persistent_tape(
        monkeypatch, config):
    loss, factors, weights = _train(False, monkeypatch, 3, **config)
    loss_own, factors_own, weights_own = _train(True, monkeypatch, 3, **config)
    assert len(factors) == len(factors_own) > 0
    assert any(np.abs(f).max() > 0 for f in factors)
    for a, b in zip(factors, factors_own):
        np.testing.assert_allclose(b, a, rtol=2e-4, atol=1e-7)
    # Weights, batch normalisation's moving statistics and the seed generators'
    # states: the own pass leaves the model's state as the step left it.
    assert len(weights) == len(weights_own)
    for a, b in zip(weights, weights_own):
        np.testing.assert_allclose(b, a, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(loss_own, loss, rtol=1e-5)


def test_own_pass_under_mirrored_strategy_matches_the_persistent_tape(
        mirrored, monkeypatch):
    """Two replicas, dropout and batch normalisation: the own pass runs inside the
    statistics' `tf.cond` in each replica and gives the persistent tape's steps."""
    x, y = _data(64)

    def fit(own_pass):
        if not own_pass:
            monkeypatch.setattr(statistics, "takes_own_pass", lambda model: False)
        with mirrored.scope():
            model = keras_tkfac.wrap(_recurrent_model())
            optimizer = keras_tkfac.TKFAC(seed=0, factor_update_freq=2,
                                          inverse_update_freq=2, step_control="graft")
            model.compile(
                optimizer=optimizer,
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
        history = model.fit(dataset, epochs=2, shuffle=False, verbose=0)
        monkeypatch.undo()
        return history.history["loss"], [v.numpy() for v in model.variables]

    loss, weights = fit(False)
    loss_own, weights_own = fit(True)
    np.testing.assert_allclose(loss_own, loss, rtol=1e-5)
    for a, b in zip(weights, weights_own):
        np.testing.assert_allclose(b, a, rtol=2e-4, atol=1e-6)


def test_statistics_without_a_tape_need_the_models_state():
    with pytest.raises(ValueError, match="tape=None"):
        statistics.update(None, None, None, [], None, None, None, None, 1.0,
                          forward=None)
