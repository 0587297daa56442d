"""A wrapped model through the rest of a Keras program's life: wrapped twice, weights
exchanged with the unwrapped model, TFLite conversion, optimizers named by string."""

import numpy as np
import pytest
import tensorflow as tf
import keras

import keras_tkfac
from tests import helpers

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _functional(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((5,))
    h = keras.layers.Dense(8, activation="tanh", name="hidden")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(h))


def test_wrapping_a_wrapped_model_returns_it_and_it_trains():
    x, y = helpers.classification_data(n=16)
    wrapped = keras_tkfac.wrap(_functional(), exclude=["hidden"])
    assert keras_tkfac.wrap(wrapped) is wrapped
    assert keras_tkfac.wrap(wrapped, exclude=["hidden"]) is wrapped
    with pytest.raises(ValueError, match=r"already wrapped.*exclude=\['head'\]"):
        keras_tkfac.wrap(wrapped, exclude=["head"])
    wrapped.compile(optimizer=keras_tkfac.TKFAC(seed=0), loss=LOSS)
    history = wrapped.fit(x, y, batch_size=8, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert [slot.block.name for slot in wrapped.optimizer._slots] == ["head"]


def test_weights_saved_unwrapped_load_into_the_wrapped_model(tmp_path):
    """`save_weights` before `wrap` (pretraining with Adam), `load_weights` after:
    the wrapped layout differs (the model is a sublayer), so the file goes to the
    wrapped model; `wrapped.model.save_weights` writes one the plain model loads."""
    x, y = helpers.classification_data(n=16)
    plain = _functional(seed=1)
    plain.compile(optimizer="adam", loss=LOSS)
    plain.fit(x, y, epochs=1, verbose=0)
    plain.save_weights(tmp_path / "plain.weights.h5")

    wrapped = keras_tkfac.wrap(_functional(seed=2))
    wrapped.compile(optimizer=keras_tkfac.TKFAC(seed=0), loss=LOSS)
    wrapped.load_weights(tmp_path / "plain.weights.h5")
    for a, b in zip(wrapped.get_weights(), plain.get_weights()):
        np.testing.assert_array_equal(a, b)
    wrapped.fit(x, y, epochs=1, verbose=0)
    wrapped.save_weights(tmp_path / "wrapped.weights.h5")  # its own layout
    wrapped.model.save_weights(tmp_path / "export.weights.h5")
    again = keras_tkfac.wrap(_functional(seed=3))
    again.compile(optimizer=keras_tkfac.TKFAC(seed=0), loss=LOSS)
    again.load_weights(tmp_path / "wrapped.weights.h5")
    serving = _functional(seed=4)
    serving.load_weights(tmp_path / "export.weights.h5")
    for a, b, c in zip(again.get_weights(), serving.get_weights(),
                       wrapped.get_weights()):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, c)


def test_a_weights_file_of_another_model_still_raises(tmp_path):
    other = keras.Sequential([keras.Input((5,)), keras.layers.Dense(5)])
    other.save_weights(tmp_path / "other.weights.h5")
    wrapped = keras_tkfac.wrap(_functional())
    with pytest.raises(ValueError):
        wrapped.load_weights(tmp_path / "other.weights.h5")


def test_tflite_converts_a_wrapped_model_to_its_predictions():
    x, y = helpers.classification_data(n=16)
    wrapped = keras_tkfac.wrap(_functional())
    wrapped.compile(optimizer=keras_tkfac.TKFAC(seed=0), loss=LOSS)
    wrapped.fit(x, y, epochs=1, verbose=0)
    converted = tf.lite.TFLiteConverter.from_keras_model(wrapped).convert()
    interpreter = tf.lite.Interpreter(model_content=converted)
    interpreter.allocate_tensors()
    given, = interpreter.get_input_details()
    taken, = interpreter.get_output_details()
    for row in x[:3]:
        interpreter.set_tensor(given["index"], row[None].astype("float32"))
        interpreter.invoke()
        np.testing.assert_allclose(interpreter.get_tensor(taken["index"]),
                                   wrapped.predict(row[None], verbose=0),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,cls", [("tkfac", keras_tkfac.TKFAC),
                                      ("kfac", keras_tkfac.KFAC)])
def test_compile_takes_the_optimizer_by_name_at_its_defaults(name, cls):
    x, y = helpers.classification_data(n=16)
    wrapped = keras_tkfac.wrap(_functional())
    wrapped.compile(optimizer=name, loss=LOSS)
    assert type(wrapped.optimizer) is cls
    drawn = ("name", "seed")  # a new name and, without one given, a drawn seed
    assert ({k: v for k, v in wrapped.optimizer.get_config().items() if k not in drawn}
            == {k: v for k, v in cls().get_config().items() if k not in drawn})
    history = wrapped.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))


class _Subclassed(keras.Model):
    """Unbuilt until called: its layers are built by the first batch."""

    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(8, activation="tanh")
        self.head = keras.layers.Dense(3)

    def call(self, x):
        return self.head(self.hidden(x))


def _dict_model(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = {"a": keras.Input((3,), name="a"), "b": keras.Input((2,), name="b")}
    h = keras.layers.Dense(8, activation="tanh")(
        keras.layers.Concatenate()([inputs["a"], inputs["b"]]))
    return keras.Model(inputs, keras.layers.Dense(3)(h))


def _fit(build, data, monkeypatch, from_shapes):
    """The weights after two epochs of `fit` and how often the step was traced
    (`update_curvature` runs once per trace); `from_shapes=False` takes Keras's
    own path (the optimizer built while the first step is traced)."""
    from keras_tkfac import wrapping  # pylint: disable=import-outside-toplevel

    if not from_shapes:
        monkeypatch.setattr(wrapping, "_element_spec", lambda iterator: None)
    model = keras_tkfac.wrap(build())
    optimizer = keras_tkfac.TKFAC(seed=0)
    model.compile(optimizer=optimizer, loss=LOSS, metrics=["accuracy"])
    model.fit(data, epochs=2, verbose=0)
    monkeypatch.undo()
    return [w.numpy() for w in model.weights], optimizer.curvature_updates


@pytest.mark.parametrize("kind", ["functional", "dict_inputs", "subclassed"])
def test_fit_traces_the_curvature_step_once(kind, monkeypatch):
    """`fit` builds the model, metrics and optimizer from the batches' shapes before
    the first step, so `tf.function` traces the costly step once rather than twice;
    the weights are those of Keras's own path (built inside the first trace)."""
    x, y = helpers.classification_data(n=64)
    if kind == "dict_inputs":
        build = _dict_model
        inputs = {"a": x[:, :3], "b": x[:, 3:]}
    else:
        build = _functional if kind == "functional" else (
            lambda: (keras.utils.set_random_seed(0), _Subclassed())[1])
        inputs = x
    data = tf.data.Dataset.from_tensor_slices((inputs, y)).batch(16)
    weights, traces = _fit(build, data, monkeypatch, from_shapes=True)
    lazy_weights, lazy_traces = _fit(build, data, monkeypatch, from_shapes=False)
    assert lazy_traces == 2
    assert traces == 1
    assert len(weights) == len(lazy_weights)
    for w, lazy in zip(weights, lazy_weights):
        np.testing.assert_allclose(w, lazy, rtol=1e-5, atol=1e-6)


def test_train_on_batch_traces_the_curvature_step_once():
    """`train_on_batch` (Keras builds from the batch itself) takes the same path."""
    x, y = helpers.classification_data(n=16)
    keras.utils.set_random_seed(0)
    model = keras_tkfac.wrap(_Subclassed())
    optimizer = keras_tkfac.TKFAC(seed=0)
    model.compile(optimizer=optimizer, loss=LOSS)
    losses = [model.train_on_batch(x, y) for _ in range(3)]
    assert optimizer.curvature_updates == 1
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_a_custom_loop_with_the_optimizer_built_first_traces_once():
    """README's custom loop: `optimizer.build(model.trainable_variables)` before the
    loop makes `tf.function` trace the step once (built inside the first
    `update_curvature`, it traces twice), with the same weights."""
    x, y = helpers.classification_data(n=48)
    results = {}
    for built_first in (False, True):
        model = keras_tkfac.wrap(_functional())
        optimizer = keras_tkfac.TKFAC(seed=0)
        if built_first:
            optimizer.build(model.trainable_variables)
        traces = []
        train_step = tf.function(
            helpers.custom_train_step(model, optimizer, LOSS, traces))
        for start in range(0, 48, 16):
            train_step(x[start:start + 16], y[start:start + 16])
        results[built_first] = (len(traces), [w.numpy() for w in model.weights])
    assert results[False][0] == 2 and results[True][0] == 1
    for lazy, built in zip(results[False][1], results[True][1]):
        np.testing.assert_allclose(built, lazy, rtol=1e-5, atol=1e-6)


def _convnet_with_norm():
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((6, 6, 2)),
        keras.layers.Conv2D(4, 3, activation="relu"),
        keras.layers.BatchNormalization(),
        keras.layers.Flatten(),
        keras.layers.Dense(3),
    ])


@pytest.mark.parametrize("loop", ["fit", "custom"])
def test_a_dropped_model_and_its_optimizer_are_freed(loop):
    """A hyperparameter search builds, trains and drops many models in one process:
    once the program holds no reference, the wrapped model, the model it wraps and
    the optimizer (its factors, inverses and partner state) are garbage, as with
    Keras's own optimizers. The registry that lets `record(inner)` find the wrapper
    held the wrapper strongly under a weak key the wrapper itself keeps alive, so
    every wrapped model of a process stayed in memory."""
    import gc
    import weakref

    def train_and_drop():
        x = np.random.default_rng(0).normal(size=(16, 6, 6, 2)).astype("float32")
        y = np.arange(16, dtype="int32") % 3
        inner = _convnet_with_norm()
        model = keras_tkfac.wrap(inner)
        optimizer = keras_tkfac.TKFAC(seed=0)
        if loop == "fit":
            model.compile(optimizer=optimizer, loss=LOSS)
            model.fit(x, y, batch_size=8, epochs=1, verbose=0)
        else:
            step = tf.function(helpers.custom_train_step(inner, optimizer, LOSS))
            step(x, y)
        assert optimizer.curvature_updates >= 1
        return weakref.ref(model), weakref.ref(inner), weakref.ref(optimizer)

    refs = train_and_drop()
    gc.collect()
    assert [ref() is None for ref in refs] == [True, True, True]
