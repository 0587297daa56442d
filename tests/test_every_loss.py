"""Every loss Keras ships trains a wrapped model under `TKFAC()` at its defaults.

Each of `keras.losses`' classes on a small MLP with the output and labels it is
made for (2026-12-07; a probe found none failing, and TKFAC's last-epoch loss below
Adam(3e-3)'s on all but `Circle`, README "Losses"): the loss falls, nothing is NaN,
and the loss's Fisher is the one documented (labels sampled, the Hessian sampled,
or the empirical Fisher, logged). A loss the installed Keras does not ship (older
releases) is skipped; a Keras release with a loss not listed here skips
`test_every_keras_loss_is_covered`, naming it, until it is added.
"""

from absl import logging
import numpy as np
import pytest
import tensorflow as tf
import keras
from keras import layers

import keras_tkfac
from keras_tkfac import loss_specs

_RNG = np.random.default_rng(0)
_X = _RNG.normal(size=(64, 6)).astype("float32")
_CLASSES = ((_X[:, 0] > 0).astype("int32") + (_X[:, 1] > 0).astype("int32"))
_ONEHOT = np.eye(3, dtype="float32")[_CLASSES]
_REGRESSION = np.stack([_X[:, 0] - _X[:, 1], _X[:, 2] * _X[:, 3]], -1).astype("float32")
_POSITIVE = np.abs(_REGRESSION) + 0.1
_BINARY = (_X[:, :2] > 0).astype("float32")

# name: (output units, its activation, labels, the loss's constructor, its Fisher)
CASES = {
    "BinaryCrossentropy": (
        2, "sigmoid", _BINARY, lambda: keras.losses.BinaryCrossentropy(), "sampled"),
    "BinaryFocalCrossentropy": (
        2, None, _BINARY,
        lambda: keras.losses.BinaryFocalCrossentropy(from_logits=True), "empirical"),
    "CTC": None,  # sequences of labels: tests/test_program_sweep.py (ocr_ctc)
    "CategoricalCrossentropy": (
        3, "softmax", _ONEHOT,
        lambda: keras.losses.CategoricalCrossentropy(label_smoothing=0.1), "sampled"),
    "CategoricalFocalCrossentropy": (
        3, "softmax", _ONEHOT, lambda: keras.losses.CategoricalFocalCrossentropy(),
        "empirical"),
    "CategoricalGeneralizedCrossEntropy": (
        3, "softmax", _CLASSES,
        lambda: keras.losses.CategoricalGeneralizedCrossEntropy(), "empirical"),
    "CategoricalHinge": (
        3, None, _ONEHOT, lambda: keras.losses.CategoricalHinge(), "empirical"),
    "Circle": (4, None, _CLASSES, lambda: keras.losses.Circle(), "empirical"),
    "CosineSimilarity": (
        2, None, _REGRESSION, lambda: keras.losses.CosineSimilarity(), "empirical"),
    "Dice": (2, "sigmoid", _BINARY, lambda: keras.losses.Dice(), "empirical"),
    "Hinge": (2, "tanh", _BINARY, lambda: keras.losses.Hinge(), "empirical"),
    "Huber": (2, None, _REGRESSION, lambda: keras.losses.Huber(), "hessian"),
    "KLDivergence": (
        3, "softmax", _ONEHOT * 0.8 + 0.2 / 3, lambda: keras.losses.KLDivergence(),
        "empirical"),
    "LogCosh": (2, None, _REGRESSION, lambda: keras.losses.LogCosh(), "hessian"),
    "MeanAbsoluteError": (
        2, None, _REGRESSION, lambda: keras.losses.MeanAbsoluteError(), "empirical"),
    "MeanAbsolutePercentageError": (
        2, "softplus", _POSITIVE, lambda: keras.losses.MeanAbsolutePercentageError(),
        "empirical"),
    "MeanSquaredError": (
        2, None, _REGRESSION, lambda: keras.losses.MeanSquaredError(), "sampled"),
    "MeanSquaredLogarithmicError": (
        2, "softplus", _POSITIVE, lambda: keras.losses.MeanSquaredLogarithmicError(),
        "sampled"),
    "Poisson": (2, "softplus", _POSITIVE, lambda: keras.losses.Poisson(), "sampled"),
    "SparseCategoricalCrossentropy": (
        3, None, _CLASSES,
        lambda: keras.losses.SparseCategoricalCrossentropy(from_logits=True), "sampled"),
    "SquaredHinge": (2, None, _BINARY, lambda: keras.losses.SquaredHinge(), "hessian"),
    "Tversky": (2, "sigmoid", _BINARY, lambda: keras.losses.Tversky(), "empirical"),
}


def test_every_keras_loss_is_covered():
    shipped = {name for name in dir(keras.losses)
               if name[0].isupper() and name != "Loss"
               and isinstance(getattr(keras.losses, name), type)
               and issubclass(getattr(keras.losses, name), keras.losses.Loss)}
    assert "MeanSquaredError" in shipped and "Huber" in shipped
    if not shipped <= set(CASES):
        pytest.skip(f"Keras {keras.__version__} ships losses this test does not "
                    f"list yet: {sorted(shipped - set(CASES))}")


@pytest.mark.parametrize("name", sorted(n for n, case in CASES.items() if case))
def test_every_keras_loss_trains(name, caplog):
    if not hasattr(keras.losses, name):
        pytest.skip(f"Keras {keras.__version__} has no keras.losses.{name}")
    units, activation, labels, make_loss, kind = CASES[name]
    loss = make_loss()
    spec = loss_specs.resolve_loss(loss, "true")
    assert (spec.kind is not None, spec.hessian) == {
        "sampled": (True, False), "hessian": (False, True),
        "empirical": (False, False)}[kind]
    keras.utils.set_random_seed(0)
    model = keras_tkfac.wrap(keras.Sequential([
        keras.Input((6,)), layers.Dense(16, activation="tanh"),
        layers.Dense(units, activation=activation)]))
    model.compile(optimizer=keras_tkfac.TKFAC(seed=0), loss=loss)
    logging.get_absl_logger().propagate = True
    loss_specs._WARNED.clear()  # pylint: disable=protected-access
    with caplog.at_level("WARNING"):
        history = model.fit(_X, labels, batch_size=16, epochs=3, shuffle=False,
                            verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    assert all(np.all(np.isfinite(w.numpy())) for w in model.weights)
    logged = any("takes the empirical Fisher" in r.getMessage() for r in caplog.records)
    assert logged == (kind == "empirical")
    # The statistics were fed.
    weight = model.optimizer._factor_weight  # pylint: disable=protected-access
    assert float(weight.numpy()[0]) > 0


def _fit_classifier(activation, units, labels, loss, sigmoid_op=False):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    h = layers.Dense(units)(layers.Dense(16, activation="tanh")(inputs))
    # A raw `tf.sigmoid` (a graph op, no `_keras_logits`), or Keras's activation.
    outputs = (layers.Lambda(tf.sigmoid)(h)
               if sigmoid_op else layers.Activation(activation)(h))
    model = keras_tkfac.wrap(keras.Model(inputs, outputs))
    model.compile(optimizer=keras_tkfac.TKFAC(seed=0), loss=loss)
    history = model.fit(_X, labels, batch_size=16, epochs=3, shuffle=False, verbose=0)
    return history.history["loss"], [w.numpy() for w in model.weights]


@pytest.mark.parametrize("loss,activation,units,labels,sigmoid_op", [
    ("SparseCategoricalCrossentropy", "softmax", 3, _CLASSES, False),
    ("CategoricalCrossentropy", "softmax", 3, _ONEHOT, False),
    ("BinaryCrossentropy", "sigmoid", 2, _BINARY, False),
    ("BinaryCrossentropy", "sigmoid", 2, _BINARY, True),
], ids=["sparse_softmax", "categorical_softmax", "binary_sigmoid", "binary_tf_sigmoid"])
def test_from_logits_on_an_activated_output_trains_as_keras_reads_it(
        loss, activation, units, labels, sigmoid_op):
    """A common slip: `from_logits=True` on a softmax or sigmoid output. Keras
    warns and reads the logits behind the output, so the loss is the one without
    `from_logits`; so is TKFAC's training (`loss_specs.as_read`). Before, the
    statistics differentiated the loss with respect to the output, which it does
    not read, and `fit` raised."""
    cls = getattr(keras.losses, loss)
    slipped = _fit_classifier(activation, units, labels, cls(from_logits=True),
                              sigmoid_op)
    meant = _fit_classifier(activation, units, labels, cls(), sigmoid_op)
    np.testing.assert_allclose(slipped[0], meant[0], rtol=1e-6)
    for a, b in zip(slipped[1], meant[1]):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert slipped[0][-1] < slipped[0][0]


class _OwnCall(keras.losses.Loss):
    """A `Loss` subclass that overrides `__call__`, not `call` (keras-io's supervised
    contrastive loss is written so); Keras's own `call` raises."""

    def __call__(self, y_true, y_pred, sample_weight=None):
        return keras.ops.mean(keras.ops.square(y_true - y_pred)) * 2.0


def test_a_loss_that_overrides_dunder_call_trains_as_the_same_function():
    # Found by a probe (2026-12-07): `NotImplementedError` from `Loss.call` on the
    # first step. Its value is one per batch, so both forms take each example's
    # loss alone for the curvature and train to the same weights.
    def fit(loss):
        keras.utils.set_random_seed(0)
        model = keras_tkfac.wrap(keras.Sequential([
            keras.Input((6,)), layers.Dense(16, activation="tanh"), layers.Dense(2)]))
        model.compile(optimizer=keras_tkfac.TKFAC(seed=0), loss=loss)
        history = model.fit(_X, _REGRESSION, batch_size=16, epochs=3, shuffle=False,
                            verbose=0)
        return history.history["loss"], [w.numpy() for w in model.weights]

    losses, weights = fit(_OwnCall())
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    expected_losses, expected = fit(
        lambda y, p: keras.ops.mean(keras.ops.square(y - p)) * 2.0)
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)
    for got, want in zip(weights, expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
