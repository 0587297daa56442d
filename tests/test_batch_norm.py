"""`recalibrate_batch_norm` and `BatchNormRecalibration` against numpy: the moving
statistics become the mean of the batches' moments; nothing else changes."""

import numpy as np
import pytest
import tensorflow as tf
import keras

import keras_tkfac

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _model(frozen=False):
    keras.utils.set_random_seed(0)
    frozen_norm = keras.layers.BatchNormalization(name="frozen")
    frozen_norm.trainable = not frozen
    return keras.Sequential([
        keras.Input((5,)), keras.layers.Dense(4, name="first"),
        keras.layers.BatchNormalization(momentum=0.9, name="norm"),
        keras.layers.Dense(3, name="second"), frozen_norm,
        keras.layers.Dense(2, name="out")])


def _data(rows=48):
    x = np.random.default_rng(0).normal(2.0, 3.0, size=(rows, 5)).astype("float32")
    return x, np.random.default_rng(1).integers(0, 2, rows)


def _moments(model, x, batch_size):
    """numpy: the mean over batches of the batch mean and (biased) variance of
    the input of the layer `norm`."""
    first = model.get_layer("first")
    h = x @ first.kernel.numpy() + first.bias.numpy()
    batches = [h[s:s + batch_size] for s in range(0, len(h), batch_size)]
    return (np.mean([b.mean(0) for b in batches], 0),
            np.mean([b.var(0) for b in batches], 0))


@pytest.mark.parametrize("wrapped", [False, True])
def test_moving_statistics_become_the_mean_of_the_batch_moments(wrapped):
    model = _model(frozen=True)
    x, _ = _data()
    weights = [w.numpy().copy() for w in model.trainable_weights]
    frozen = [w.numpy().copy() for w in model.get_layer("frozen").weights]
    target = keras_tkfac.wrap(model) if wrapped else model
    used = keras_tkfac.recalibrate_batch_norm(target, x, batch_size=16)
    assert used == 3
    mean, variance = _moments(model, x, 16)
    norm = model.get_layer("norm")
    np.testing.assert_allclose(norm.moving_mean.numpy(), mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(norm.moving_variance.numpy(), variance, rtol=1e-5)
    assert norm.momentum == 0.9  # restored
    for got, want in zip(model.trainable_weights, weights):
        np.testing.assert_array_equal(got.numpy(), want)
    for got, want in zip(model.get_layer("frozen").weights, frozen):  # left as it was
        np.testing.assert_array_equal(got.numpy(), want)


def test_a_dataset_of_labelled_batches_and_steps():
    model = _model()
    x, y = _data()
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    assert keras_tkfac.recalibrate_batch_norm(model, dataset, steps=2) == 2
    mean, variance = _moments(model, x[:16], 8)
    norm = model.get_layer("norm")
    np.testing.assert_allclose(norm.moving_mean.numpy(), mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(norm.moving_variance.numpy(), variance, rtol=1e-5)


def test_the_callback_recalibrates_before_fits_validation():
    x, y = _data(64)
    model = _model()
    wrapped = keras_tkfac.wrap(model)
    wrapped.compile(optimizer=keras_tkfac.TKFAC(seed=0), loss=LOSS)
    history = wrapped.fit(
        x[:48], y[:48], batch_size=16, epochs=2, shuffle=False, verbose=0,
        validation_data=(x[48:], y[48:]),
        callbacks=[keras_tkfac.BatchNormRecalibration(x[:48], steps=3, batch_size=16)])
    # After the last epoch's validation, the statistics are those of the weights
    # then, and validation saw them.
    mean, _ = _moments(model, x[:48], 16)
    np.testing.assert_allclose(model.get_layer("norm").moving_mean.numpy(), mean,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(history.history["val_loss"][-1],
                               wrapped.evaluate(x[48:], y[48:], verbose=0), rtol=1e-5)


@pytest.mark.parametrize("kwargs", [{"steps": 0}, {"steps": 1.5}, {"batch_size": -1},
                                    {"batch_size": True}])
def test_invalid_arguments_raise(kwargs):
    name, value = next(iter(kwargs.items()))
    with pytest.raises(ValueError, match=f"{name}={value!r}"):
        keras_tkfac.recalibrate_batch_norm(_model(), _data()[0], **kwargs)
    with pytest.raises(ValueError, match=name):
        keras_tkfac.BatchNormRecalibration(_data()[0], **kwargs)


def test_the_lag_tool_recalibrates_a_sweep_program():
    # `tools/batch_norm_lag.py` on one program, 8 steps: both optimizers' held-out
    # losses with the moving averages and recalibrated are finite, and for the
    # convnet with batch normalisation the recalibrated ones are lower.
    import math  # pylint: disable=import-outside-toplevel
    import sys  # pylint: disable=import-outside-toplevel
    from tests.test_examples import _ROOT  # pylint: disable=import-outside-toplevel
    sys.path.insert(0, str(_ROOT / "tools"))
    import batch_norm_lag  # pylint: disable=import-outside-toplevel

    results = batch_norm_lag.run("mixed_precision_convnet", 1e-2, steps=8)
    for moving, recalibrated, train in results.values():
        assert all(math.isfinite(v) for v in (moving, recalibrated, train))
        assert recalibrated < moving
    assert keras.mixed_precision.global_policy().name == "float32"
