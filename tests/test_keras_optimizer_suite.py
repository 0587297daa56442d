"""Keras's own optimizer tests (keras/src/optimizers/optimizer_test.py) for TKFAC/KFAC.

Ported are the tests that apply to any optimizer. Without curvature blocks
(`attach([])`), with the momentum-SGD partner at the curvature learning rate
(`fallback="sgd", fallback_lr_ratio=1`) and `momentum=0`, every variable takes plain
SGD: Keras's expected values for `SGD` hold unchanged.
"""

import pickle
import re

import numpy as np
import pytest
import tensorflow as tf
import keras

import keras_tkfac
from tests import helpers

CLASSES = [keras_tkfac.TKFAC, keras_tkfac.KFAC]


def _sgd_like(cls, **kwargs):
    """`cls` behaving as SGD: no blocks, no momentum."""
    kwargs.setdefault("learning_rate", 1.0)
    optimizer = cls(momentum=0.0, fallback="sgd", fallback_lr_ratio=1.0, seed=0,
                    **kwargs)
    optimizer.attach([])
    return optimizer


def _variable(value=((1.0, 2.0), (3.0, 4.0))):
    return keras.Variable(np.array(value, "float32"))


def _ones():
    return tf.ones((2, 2))


@pytest.mark.parametrize("cls", CLASSES)
def test_iterations_counter(cls):
    v = _variable()
    optimizer = _sgd_like(cls)
    assert int(optimizer.iterations.numpy()) == 0
    optimizer.apply_gradients([(_ones(), v)])
    optimizer.apply_gradients([(_ones(), v)])
    assert int(optimizer.iterations.numpy()) == 2


@pytest.mark.parametrize("cls", CLASSES)
def test_empty_gradients(cls):
    v = _variable([[3.0, 4.0], [5.0, 6.0]])
    with pytest.raises(ValueError, match="No gradients provided for any variable."):
        _sgd_like(cls).apply_gradients([(None, v)])
    v2 = _variable([[3.0, 4.0], [5.0, 6.0]])
    optimizer = _sgd_like(cls)
    with pytest.warns(Warning):
        optimizer.apply_gradients([(None, v), (_ones(), v2)])
    np.testing.assert_allclose(v.numpy(), [[3.0, 4.0], [5.0, 6.0]])
    np.testing.assert_allclose(v2.numpy(), [[2.0, 3.0], [4.0, 5.0]])


@pytest.mark.parametrize("cls", CLASSES)
def test_clip_args(cls):
    assert cls(clipnorm=0.1).clipnorm == 0.1
    assert cls(clipvalue=0.1).clipvalue == 0.1
    assert cls(global_clipnorm=0.1).global_clipnorm == 0.1
    with pytest.raises(ValueError, match="Only one of `clipnorm`, `clipvalue` and"):
        cls(clipnorm=0.1, clipvalue=0.1)
    with pytest.raises(ValueError, match="Only one of `clipnorm`, `clipvalue` and"):
        cls(clipnorm=0.1, global_clipnorm=0.1)


@pytest.mark.parametrize("cls", CLASSES)
def test_clip_norm_value_and_global_norm(cls):
    grad = tf.constant([100.0, 100.0])
    np.testing.assert_allclose(cls(clipnorm=1)._clip_gradients([grad])[0],
                               [2**0.5 / 2, 2**0.5 / 2], rtol=1e-6)
    np.testing.assert_allclose(cls(clipvalue=1)._clip_gradients([grad])[0], [1.0, 1.0])
    grad = np.array([50.0, 100.0], "float32")
    np.testing.assert_allclose(
        cls(global_clipnorm=1)._clip_gradients([tf.constant(grad)])[0],
        grad / np.linalg.norm(grad), rtol=1e-6)


@pytest.mark.parametrize("cls", CLASSES)
def test_ema(cls):
    v = _variable([[3.0, 4.0], [5.0, 6.0]])
    optimizer = _sgd_like(cls, use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=3)
    optimizer.apply_gradients([(_ones(), v)])
    np.testing.assert_allclose(v.numpy(), [[2.0, 3.0], [4.0, 5.0]])
    np.testing.assert_allclose(optimizer._model_variables_moving_average[0].numpy(),
                               [[2.0, 3.0], [4.0, 5.0]])
    optimizer.apply_gradients([(_ones(), v)])
    np.testing.assert_allclose(v.numpy(), [[1.0, 2.0], [3.0, 4.0]])
    np.testing.assert_allclose(optimizer._model_variables_moving_average[0].numpy(),
                               [[1.9, 2.9], [3.9, 4.9]], rtol=1e-6)
    optimizer.apply_gradients([(_ones(), v)])
    np.testing.assert_allclose(v.numpy(), [[1.71, 2.71], [3.71, 4.71]], rtol=1e-6)


@pytest.mark.parametrize("cls", CLASSES)
def test_constraints_are_applied(cls):
    v = keras.Variable(np.random.default_rng(0).random((2, 2)) - 1.0)
    v.constraint = keras.constraints.NonNeg()
    _sgd_like(cls, learning_rate=1e-4).apply_gradients([(tf.zeros((2, 2)), v)])
    assert np.min(v.numpy()) == 0.0


@pytest.mark.parametrize("cls", CLASSES)
def test_get_method(cls):
    name = cls.__name__
    assert isinstance(keras.optimizers.get({"class_name": f"keras_tkfac>{name}",
                                            "config": {}}), cls)


@pytest.mark.parametrize("cls", CLASSES)
def test_static_loss_scaling(cls):
    v = _variable()
    grads = tf.constant([[1.0, 2.0], [3.0, 4.0]]) * 1024.0
    optimizer = _sgd_like(cls, loss_scale_factor=1024.0)
    optimizer.apply_gradients([(grads, v)])
    assert float(optimizer.scale_loss(1.0)) == 1024.0
    np.testing.assert_allclose(v.numpy(), np.zeros((2, 2)))


@pytest.mark.parametrize("cls", CLASSES)
def test_set_weights(cls):
    x = _variable()
    first = cls(seed=0)
    first.attach([])
    first.apply_gradients([(tf.constant([[1.0, 2.0], [3.0, 4.0]]), x)])
    second = cls(seed=0)
    second.attach([])
    with pytest.raises(ValueError, match="You are calling"):
        second.set_weights(first.variables)
    second.build([x])
    second.set_weights(first.variables)
    for a, b in zip(first.variables, second.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize("cls", CLASSES)
def test_gradient_accumulation(cls):
    v = _variable()
    optimizer = _sgd_like(cls, gradient_accumulation_steps=3)
    assert optimizer.gradient_accumulation_steps == 3
    expected = [[[1.0, 2.0], [3.0, 4.0]]] * 2 + [[[0.0, 1.0], [2.0, 3.0]]] * 2
    accumulated = [1.0, 2.0, 0.0, 1.0]
    for step in range(4):
        optimizer.apply_gradients([(_ones(), v)])
        np.testing.assert_allclose(v.numpy(), expected[step])
        np.testing.assert_allclose(optimizer._accumulated_gradients[0].numpy(),
                                   np.full((2, 2), accumulated[step]))
        assert int(optimizer._iterations.numpy()) == step + 1
        assert int(optimizer.iterations.numpy()) == (step + 1) // 3


@pytest.mark.parametrize("cls", CLASSES)
def test_tf_checkpointing(cls, tmp_path):
    model = keras_tkfac.wrap(keras.Sequential([keras.layers.Dense(2)]))
    optimizer = cls(seed=0)
    x = np.random.default_rng(0).random((1, 2)).astype("float32")
    y = np.random.default_rng(1).random((1, 2)).astype("float32")
    model.compile(optimizer, "mse")
    model.train_on_batch(x, y)
    reference = model.predict(x, verbose=0)
    checkpoint = tf.train.Checkpoint(model, optimizer=optimizer)
    save_path = checkpoint.save(str(tmp_path / "tf_ckpt"))
    model.train_on_batch(x, y)
    assert not np.allclose(model.predict(x, verbose=0), reference, atol=1e-3)
    checkpoint.restore(save_path)
    np.testing.assert_allclose(model.predict(x, verbose=0), reference, atol=1e-5)


@pytest.mark.parametrize("cls", CLASSES)
def test_callable_learning_rate(cls):
    v = _variable()
    optimizer = _sgd_like(cls, learning_rate=lambda: 0.1)
    optimizer.apply_gradients([(_ones(), v)])
    np.testing.assert_allclose(v.numpy(), [[0.9, 1.9], [2.9, 3.9]], rtol=1e-6)
    assert int(optimizer.iterations.numpy()) == 1


@pytest.mark.parametrize("cls", CLASSES)
def test_overwrite_with_gradient(cls):
    v = _variable()
    v.overwrite_with_gradient = True
    v2 = _variable()
    _sgd_like(cls).apply_gradients([(_ones(), v), (_ones(), v2)])
    np.testing.assert_allclose(v.numpy(), np.ones((2, 2)))
    np.testing.assert_allclose(v2.numpy(), [[0.0, 1.0], [2.0, 3.0]])


@pytest.mark.parametrize("cls", CLASSES)
def test_gradient_accumulation_with_weight_decay(cls):
    one = _sgd_like(cls, learning_rate=0.1, weight_decay=0.05)
    three = _sgd_like(cls, learning_rate=0.1, weight_decay=0.05,
                      gradient_accumulation_steps=3)
    v1, v3 = _variable([[0.9], [0.5]]), _variable([[0.9], [0.5]])
    rng = np.random.default_rng(0)
    for _ in range(8):
        grads = rng.random([3, 2, 1]).astype("float32")
        one.apply_gradients([(tf.constant(grads.mean(axis=0)), v1)])
        for batch in range(3):
            three.apply_gradients([(tf.constant(grads[batch]), v3)])
    np.testing.assert_allclose(v1.numpy(), v3.numpy(), rtol=1e-5)


@pytest.mark.parametrize("cls", CLASSES)
def test_setting_lr_to_callable_untracks_lr_var(cls):
    optimizer = cls(learning_rate=0.001)
    assert len(optimizer.variables) == 2
    optimizer.learning_rate = keras.optimizers.schedules.PolynomialDecay(0.001, 4)
    assert len(optimizer.variables) == 1


@pytest.mark.parametrize("cls", CLASSES)
def test_pickleable(cls):
    optimizer = cls(seed=3)
    assert pickle.loads(pickle.dumps(optimizer)).get_config() == optimizer.get_config()


@pytest.mark.parametrize("cls", CLASSES)
def test_mixed_with_tf_variables(cls):
    v = _variable()
    tf_v = tf.Variable([[1.0, 2.0], [3.0, 4.0]])
    optimizer = _sgd_like(cls)
    optimizer.apply_gradients([(_ones(), v), (_ones(), tf_v)])
    assert int(optimizer.iterations.numpy()) == 1
    np.testing.assert_allclose(tf_v.numpy(), [[0.0, 1.0], [2.0, 3.0]])
    with pytest.warns(UserWarning, match="Gradients do not exist for variables"):
        optimizer.apply_gradients([(_ones(), v), (None, tf_v)])
    assert int(optimizer.iterations.numpy()) == 2


@pytest.mark.parametrize("cls", CLASSES)
def test_optimizer_auto_naming(cls):
    prefix = cls.__name__.lower()
    first, second = cls(), cls()
    numbers = [int(re.fullmatch(rf"{prefix}(?:_(\d+))?", o.name).group(1) or 0)
               for o in (first, second)]
    assert numbers[1] == numbers[0] + 1
    assert cls(name="mine").name == "mine"
    for optimizer in (second, cls(name="mine")):
        reloaded = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
        assert reloaded.name == optimizer.name


@pytest.mark.parametrize("cls", CLASSES)
def test_fit_smoke_with_a_wrapped_model(cls):
    x, y = helpers.classification_data(n=16)
    model = keras_tkfac.wrap(helpers.tiny_mlp())
    model.compile(cls(seed=0), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    assert history.history["loss"][1] < history.history["loss"][0]
