"""`jit_compile=True`: works on one device and under MirroredStrategy, no retracing."""

import numpy as np
import pytest
import tensorflow as tf
import keras

import keras_tkfac
from keras_tkfac import optimizer as optimizer_lib
from keras_tkfac import wrapping
from tests import helpers

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _fit(strategy, jit_compile, epochs=2):
    x, y = helpers.classification_data(n=64)
    with strategy.scope():
        model = keras_tkfac.wrap(helpers.tiny_mlp())
        model.compile(
            optimizer=keras_tkfac.TKFAC(fisher="empirical", factor_update_freq=2,
                                        inverse_update_freq=3, seed=0),
            loss=LOSS, jit_compile=jit_compile,
        )
    model.fit(x, y, batch_size=16, epochs=epochs, shuffle=False, verbose=0)
    return model


@pytest.fixture
def trace_counter(monkeypatch):
    """Counts Python executions of the training step, i.e. its traces."""
    counts = []
    original = wrapping.CurvatureModel.train_step

    def counting(self, data):
        counts.append(1)
        return original(self, data)

    monkeypatch.setattr(wrapping.CurvatureModel, "train_step", counting)
    return counts


def test_jit_compile_on_one_device_matches_eager_kernels():
    compiled = _fit(tf.distribute.get_strategy(), True)
    assert compiled.jit_compile is True
    plain = _fit(tf.distribute.get_strategy(), False)
    # XLA fuses and reorders float32 arithmetic; 8 steps stay within 1e-4.
    for a, b in zip(plain.weights, compiled.weights):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-4, atol=1e-5)


def test_jit_compile_under_mirrored_strategy_compiles_inner_math(mirrored):
    model = _fit(mirrored, True)
    assert model.jit_compile is False and model.optimizer._jit_math
    reference = _fit(tf.distribute.get_strategy(), False)
    for a, b in zip(reference.weights, model.weights):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("distributed", [False, True], ids=["one_device", "mirrored"])
def test_no_retracing_after_the_second_step(request, trace_counter, distributed):
    strategy = request.getfixturevalue("mirrored") if distributed else (
        tf.distribute.get_strategy())
    x, y = helpers.classification_data(n=64)
    with strategy.scope():
        model = keras_tkfac.wrap(helpers.tiny_mlp())
        model.compile(optimizer=keras_tkfac.TKFAC(factor_update_freq=2,
                                                  inverse_update_freq=3),
                      loss=LOSS, jit_compile=distributed)
    model.fit(x, y, batch_size=16, epochs=1, steps_per_epoch=2, verbose=0)
    traces = len(trace_counter)
    jit_traces = {fn: f.experimental_get_tracing_count()
                  for fn, f in optimizer_lib._jit_cache.items()}
    model.fit(x, y, batch_size=16, epochs=3, verbose=0)
    assert len(trace_counter) == traces
    for fn, f in optimizer_lib._jit_cache.items():
        assert f.experimental_get_tracing_count() == jit_traces.get(fn, 0), fn
