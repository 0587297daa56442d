"""Which TensorFlow and Keras keras_tkfac runs on, and what differs between them.

The package was run on Keras 3.5, 3.8, 3.10 and 3.15 (`keras_tkfac.versions`); these
tests pin down the checks and the differences found there, on the installed version.
"""

import logging

import numpy as np
import pytest
import tensorflow as tf
import keras

import keras_tkfac
from keras_tkfac import blocks, keras_compat, reuse, versions


@pytest.mark.parametrize("text, expected", [
    ("2.19.1", (2, 19)), ("3.10.0", (3, 10)), ("3.11.0.dev0", (3, 11)),
    ("2.20.0rc1", (2, 20)), ("3", (3, 0)), ("3.9", (3, 9)),
])
def test_major_minor(text, expected):
    assert versions._major_minor(text) == expected  # pylint: disable=protected-access


def test_another_backend_raises_naming_it():
    with pytest.raises(ImportError, match=r"KERAS_BACKEND=tensorflow.*backend='jax'"):
        versions.check(backend="jax")


def test_older_versions_are_logged_and_newer_ones_not(caplog):
    with caplog.at_level(logging.WARNING):
        old = versions.check(versions={"tensorflow": "2.16.2", "keras": "3.5.0"})
    assert old == ["tensorflow", "keras"]
    assert "tensorflow 2.16.2, keras 3.5.0" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert versions.check(versions={"tensorflow": "2.19.0", "keras": "3.11.1"}) == []
        assert versions.check(versions={"tensorflow": "2.18.1", "keras": "3.15.1"}) == [
            "tensorflow"]
    assert "keras 3" not in caplog.text


def test_the_installed_versions_are_supported():
    # What `make test` runs on is at least `MINIMUM` (setup.cfg requires it).
    assert versions.check() == []


class _Iterable:
    """An epoch iterator of Keras 3.10 (`(step, iterator)`) or 3.15 (`(begin, end,
    iterator)`)."""

    def __init__(self, width):
        self.width = width

    def __iter__(self):
        batches = iter([("x0", "y0"), ("x1", "y1")])
        while True:
            yield (0,) * (self.width - 1) + (batches,)


class _Enumerated:
    """An epoch iterator of Keras 3.5: `enumerate_epoch()` only."""

    def enumerate_epoch(self):
        yield 0, iter([("x0", "y0")])


@pytest.mark.parametrize("iterator", [_Iterable(3), _Iterable(2), _Enumerated()],
                         ids=["keras_3_15", "keras_3_10", "keras_3_5"])
def test_first_batch_reads_every_kind_of_epoch_iterator(iterator):
    assert keras_compat.first_batch(iterator) == ("x0", "y0")


def test_call_arguments_compare_variables_by_identity_in_a_graph():
    # Keras 3.10 hands a stateful LSTM cell its state variables; their `repr` in a
    # graph reads their value, which raised `NotImplementedError` in `fit`.
    first, second = keras.Variable(np.zeros(3, "float32")), keras.Variable(np.ones(3))
    texts = []
    text = reuse._arguments  # pylint: disable=protected-access

    @tf.function
    def in_a_graph():
        texts.append((text((tf.zeros(2), first), {"training": True}),
                      text((tf.zeros(2), first), {"training": True}),
                      text((tf.zeros(2), second), {"training": True}),
                      text((tf.zeros(2), first), {"training": False})))
        return tf.constant(0)

    in_a_graph()
    same, again, other, flag = texts[0]
    assert same == again and same != other and same != flag


class _Scaled(keras.layers.Dense):
    """A custom layer whose registered block reads an attribute it lacks."""


class _NeedsRenorm(blocks.DenseBlock):
    @classmethod
    def accepts(cls, layer):
        return not layer.renorm


def test_a_blocks_missing_attribute_is_reported_as_itself(monkeypatch):
    # An `AttributeError` inside the wrapper's `blocks` property made Python fall
    # back to `__getattr__`, which reported that the wrapped model had no attribute
    # `blocks` (on Keras 3.5, whose `BatchNormalization` has no `renorm`).
    monkeypatch.setitem(blocks.BLOCKS, _Scaled, _NeedsRenorm)
    model = keras.Sequential([keras.Input((3,)), _Scaled(2)])
    with pytest.raises(AttributeError, match="renorm"):
        keras_tkfac.wrap(model)


def test_keras_properties_that_raise_still_reach_the_wrapped_model():
    # Keras's `input`/`output` raise `AttributeError` on the wrapper, which is never
    # called as a layer; the wrapped functional model's are the answer (the
    # property's error above must not change that).
    inputs = keras.Input((3,))
    outputs = keras.layers.Dense(2)(keras.layers.Dense(4)(inputs))
    model = keras.Model(inputs, outputs)
    wrapped = keras_tkfac.wrap(model)
    assert wrapped.input is model.input and wrapped.output is model.output
