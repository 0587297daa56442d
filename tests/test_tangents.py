"""Ops whose forward-mode derivative TensorFlow drops: found, and the quadratic step
then takes its sibling's step instead of products that miss layers."""

from absl import logging
import numpy as np
import pytest
import tensorflow as tf
import keras

import keras_tkfac
from keras_tkfac import tangents

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _model(middle, before=()):
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((6, 6, 2)), *before,
                             keras.layers.Conv2D(3, 3, padding="same"), middle,
                             keras.layers.Flatten(), keras.layers.Dense(3)])


MIDDLES = {
    "bilinear": lambda: keras.layers.UpSampling2D(interpolation="bilinear"),
    "resizing": lambda: keras.layers.Resizing(9, 9),
    "nearest": lambda: keras.layers.UpSampling2D(),
    "floor": lambda: keras.layers.Lambda(lambda h: h + tf.floor(h)),
    "stop_gradient": lambda: keras.layers.Lambda(lambda h: h + tf.stop_gradient(h)),
    "max_pool": lambda: keras.layers.MaxPooling2D(),
    # A `tf.custom_gradient` body: its ops carry no tangent, its result does.
    "swish": lambda: keras.layers.Activation("swish"),
}


@pytest.mark.parametrize("middle", sorted(MIDDLES))
def test_dropped_finds_exactly_the_ops_whose_forward_mode_is_wrong(middle):
    # Oracle: <w, J d> by forward mode against <J^T w, d> by reverse mode.
    model = _model(MIDDLES[middle]())
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(2, 6, 6, 2)).astype("float32"))
    variables = [v.value for v in model.trainable_variables]
    directions = [tf.constant(rng.normal(size=v.shape).astype("float32"))
                  for v in variables]

    @tf.function
    def forward_mode():
        start = tangents.operation_count()
        with tf.autodiff.ForwardAccumulator(variables, directions) as accumulator:
            y = model(x)
        jvp = accumulator.jvp(y, tf.UnconnectedGradients.ZERO)
        return y, jvp, tangents.dropped(accumulator, start, [y])

    y, jvp, found = forward_mode()
    w = tf.constant(rng.normal(size=y.shape).astype("float32"))
    with tf.GradientTape() as tape:
        out = model(x)
    grads = tape.gradient(out, variables, output_gradients=w)
    forward = float(tf.reduce_sum(w * jvp))
    reverse = float(sum(tf.reduce_sum(g * d) for g, d in zip(grads, directions)))
    wrong = abs(forward - reverse) > 1e-4 * (abs(forward) + abs(reverse))
    assert bool(found) == wrong
    assert wrong == (middle in ("bilinear", "resizing"))
    if wrong:
        assert found == ["ResizeBilinear"]


def test_a_resize_before_any_trainable_layer_is_not_a_dropped_tangent():
    # No tangent reaches a preprocessing resize, so there is none to drop.
    model = _model(keras.layers.ReLU(), before=[keras.layers.Resizing(6, 6)])
    variables = [v.value for v in model.trainable_variables]
    x = tf.ones((2, 6, 6, 2))

    @tf.function
    def found():
        start = tangents.operation_count()
        with tf.autodiff.ForwardAccumulator(
                variables, [tf.ones_like(v) for v in variables]) as accumulator:
            y = model(x)
        return tangents.dropped(accumulator, start, [y])

    assert found() == []
    assert tangents.operation_count() is None  # Eagerly: nothing traced to look at.


@pytest.mark.parametrize("cls", [keras_tkfac.TKFAC, keras_tkfac.KFAC])
def test_products_through_a_bilinear_resize_give_way_to_the_sibling_step(cls, caplog):
    # The products would miss the convolution: the step is "graft"'s, logged.
    rng = np.random.default_rng(1)
    x = rng.normal(size=(32, 6, 6, 2)).astype("float32")
    y = rng.integers(0, 3, size=(32,))

    def weights(**options):
        model = keras_tkfac.wrap(_model(MIDDLES["bilinear"]()))
        model.compile(optimizer=cls(seed=0, **options), loss=LOSS)
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        return [v.numpy() for v in model.trainable_variables]

    logging.set_verbosity(logging.WARNING)
    found = weights()
    if cls is keras_tkfac.TKFAC:  # Logged once per process.
        assert any("ResizeBilinear" in r.getMessage() for r in caplog.records)
    for got, want in zip(found, weights(step_control="graft")):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
