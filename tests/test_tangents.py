"""Ops whose forward-mode derivative TensorFlow drops: the bilinear resize gets a
rule (`tangents.install_jvps`); others are found, and the quadratic step then takes
its sibling's step instead of products that miss layers."""

from absl import logging
import numpy as np
import pytest
import tensorflow as tf
import keras

import keras_tkfac
from keras_tkfac import loss_specs
from keras_tkfac import native_convs
from keras_tkfac import products
from keras_tkfac import tangents
from tests import helpers

tangents.install_jvps()  # As the products do before their first pass.
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
    # Its gradient's gradient is registered as not differentiable: no rule yet.
    "fake_quant": lambda: keras.layers.Lambda(
        lambda h: tf.quantization.fake_quant_with_min_max_args(h, -1.0, 1.0)),
    "floor": lambda: keras.layers.Lambda(lambda h: h + tf.floor(h)),
    "stop_gradient": lambda: keras.layers.Lambda(lambda h: h + tf.stop_gradient(h)),
    "max_pool": lambda: keras.layers.MaxPooling2D(),
    # A `tf.custom_gradient` body: its ops carry no tangent, its result does.
    "swish": lambda: keras.layers.Activation("swish"),
}


def _grouped():
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((6, 6, 4)), keras.layers.Conv2D(4, 3, groups=2),
        keras.layers.Conv2D(4, 3, groups=2, activation="tanh"), keras.layers.Flatten(),
        keras.layers.Dense(3)])


def _conv3d_channels_first():
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((2, 4, 6, 6)), keras.layers.Reshape((2, 4, 6, 6)),
        keras.layers.Conv3D(2, 3, data_format="channels_first", activation="tanh"),
        keras.layers.Flatten(), keras.layers.Dense(3)])


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
    assert wrong == (middle == "fake_quant")
    if wrong:
        assert found == ["FakeQuantWithMinMaxArgs"]


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


SIBLING_MODELS = {
    # The products would miss the convolution before the op: every layer's step
    # is "graft"'s.
    "fake_quant": (lambda: _model(MIDDLES["fake_quant"]()), "FakeQuantWithMinMaxArgs",
                   None),
    # Keras runs these in a nested XLA function that reads the kernel, which
    # forward mode cannot follow (nor, measured, reverse-over-reverse products):
    # with `native_convs` off (`wrap` computes them with TensorFlow's own ops
    # otherwise), those layers take "graft"'s step, the model covers the dense head.
    "grouped_conv": (_grouped, "kernel", [0, 1, 2, 3]),
    "conv3d_channels_first": (_conv3d_channels_first, "kernel", [0, 1]),
}


@pytest.mark.parametrize("cls", helpers.TKFAC_THEN_KFAC)
@pytest.mark.parametrize("name", sorted(SIBLING_MODELS) + ["grouped_conv_eager"])
def test_products_that_would_miss_layers_give_way_to_the_sibling_step(name, cls,
                                                                      caplog,
                                                                      monkeypatch):
    monkeypatch.setattr(native_convs, "ENABLED", False)
    # Eagerly there is no graph to inspect: the layer tells (measured: eager
    # forward-mode products through Keras's nested XLA convolution are wrong too).
    eager = name.endswith("_eager")
    name = name.removesuffix("_eager")
    build, reason, hidden = SIBLING_MODELS[name]
    rng = np.random.default_rng(1)
    x = rng.normal(size=(16,) + INPUT_SHAPES.get(name, (3, 6, 6, 2))[1:]).astype(
        "float32")
    y = rng.integers(0, 3, size=(16,))
    steps = 2 if hidden is None else 1  # One step: the same gradients in both runs.

    def weights(**options):
        model = keras_tkfac.wrap(build())
        model.compile(optimizer=cls(seed=0, **options), loss=LOSS,
                      run_eagerly=eager)
        model.fit(x[:8 * steps], y[:8 * steps], batch_size=8, epochs=1,
                  shuffle=False, verbose=0)
        return [v.numpy() for v in model.trainable_variables]

    logging.set_verbosity(logging.WARNING)
    found = weights()
    assert any(reason in r.getMessage() for r in caplog.records)
    # The same optimizer with "graft" steps throughout (TKFAC's convolution damping
    # constant and split and the dense layers' trace cap are the default's, which
    # depend on the step control).
    default = keras_tkfac.TKFAC()
    same = ({"trace_damping_scale": default.trace_damping_scale,
             "conv_damping_split": default.conv_damping_split,
             "trace_damping_cap": default.trace_damping_cap}
            if cls is keras_tkfac.TKFAC else {})
    graft = weights(step_control="graft", **same)
    for index, (got, want) in enumerate(zip(found, graft)):
        if hidden is None or index in hidden:
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
        else:
            assert not np.allclose(got, want, rtol=1e-5, atol=1e-7)


GRAM_MODELS = {
    "bilinear": lambda: _model(MIDDLES["bilinear"]()),
    "resizing": lambda: _model(MIDDLES["resizing"]()),
}
INPUT_SHAPES = {"conv3d_channels_first": (3, 2, 4, 6, 6), "grouped_conv": (3, 6, 6, 4)}


@pytest.mark.parametrize("name", sorted(GRAM_MODELS))
def test_products_are_the_explicit_gauss_newton(name):
    # Oracle: (1 / B) sum_n J_n^T (2 / D) J_n for Keras's mean squared error, J_n by
    # reverse mode (`tf.GradientTape.jacobian`), against the products' Gram.
    model = GRAM_MODELS[name]()
    rng = np.random.default_rng(2)
    x = tf.constant(rng.normal(size=INPUT_SHAPES.get(name, (3, 6, 6, 2)))
                    .astype("float32"))
    y = rng.normal(size=(3, 3)).astype("float32")
    variables = model.trainable_variables
    directions = [[rng.normal(size=v.shape).astype("float32") for v in variables]
                  for _ in range(2)]
    outputs = loss_specs.resolve_losses("mse", "true", model(x))
    gram = tf.function(lambda: products.curvature_gram(
        lambda: model(x, training=True), outputs, y, None, variables, directions))()
    with tf.GradientTape() as tape:
        out = model(x, training=True)
    jacobians = tape.jacobian(out, variables)
    np.testing.assert_allclose(
        gram, helpers.mse_gauss_newton_gram(jacobians, directions), rtol=1e-4)


@pytest.mark.parametrize("nested", [False, True])
def test_only_the_grouped_kernel_is_hidden_not_the_layers_before_it(nested):
    """Keras runs a grouped convolution in a nested function that reads its kernel;
    forward mode passes the tangents of the layers before it through that call, so
    only the grouped kernel is hidden (`hidden_reads` follows the primal pass, not
    the accumulators' tangent calls, which take every variable's handle)."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 4))
    h = keras.layers.Conv2D(4, 3, padding="same", name="plain")(inputs)
    h = keras.layers.Conv2D(4, 3, padding="same", groups=2, name="grouped")(h)
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(
        keras.layers.Flatten()(h)))
    x = tf.constant(np.random.default_rng(0).normal(size=(2, 6, 6, 4)), tf.float32)
    outputs = loss_specs.resolve_losses("mse", "true", model(x))
    primals = [v.value for v in model.trainable_variables]
    plain = model.get_layer("plain").kernel
    directions = [[tf.ones_like(p) if p is plain.value else tf.zeros_like(p)
                   for p in primals]] * 2

    @tf.function(autograph=False)
    def products_of_plain():
        return products._forward_mode(lambda: model(x), outputs, primals, directions,
                                      nested)[0]

    with pytest.raises(tangents.HiddenReads) as caught:
        products_of_plain()
    assert [v.name for v in caught.value.variables] == [
        model.get_layer("grouped").kernel.value.name]
    # The plain layer's tangent through the grouped call is right: the model is
    # linear in its kernel, so a central difference is exact up to rounding.
    found = []

    @tf.function(autograph=False)
    def tangent_of_plain():
        start = tangents.operation_count()
        with tf.autodiff.ForwardAccumulator(plain.value,
                                            tf.ones_like(plain.value)) as acc:
            out = model(x)
        found.extend(tangents.hidden_reads(primals, start, [out], [acc]))
        return acc.jvp(out)

    tangent = tangent_of_plain().numpy()
    assert [v.name for v in found] == [model.get_layer("grouped").kernel.value.name]
    kernel = plain.numpy()
    plain.assign(kernel + 0.5)
    up = model(x).numpy()
    plain.assign(kernel - 0.5)
    down = model(x).numpy()
    plain.assign(kernel)
    assert np.abs(tangent).max() > 1e-2
    np.testing.assert_allclose(tangent, up - down, rtol=1e-4, atol=1e-4)


INTEGER_PATHS = {
    "shape_slice": lambda h: tf.cast(tf.shape(h)[0], tf.float32) * h,
    "random_of_shape": lambda h: h * tf.random.stateless_uniform(tf.shape(h), [1, 2]),
    "reshape_by_shape": lambda h: tf.reshape(
        tf.reshape(h, [tf.shape(h)[0], 2, 2]), tf.shape(h)),
    "comparison": lambda h: h * tf.cast(tf.not_equal(h, 0.0), tf.float32),
    "select": lambda h: tf.where(h > 0.5, h, 2.0 * h),
    "argmax": lambda h: h * tf.cast(tf.argmax(h, -1)[:, None], tf.float32),
    "cast_to_int": lambda h: h * tf.cast(tf.cast(3.0 * h, tf.int32), tf.float32),
    "size": lambda h: h * tf.cast(tf.size(h), tf.float32),
    "gather_by_index": lambda h: tf.gather(h, tf.argmax(h, 0), axis=0),
}


@pytest.mark.parametrize("path", sorted(INTEGER_PATHS))
def test_nested_accumulators_pass_ops_with_integer_outputs(path):
    """`tangents.INTEGER_OUTPUTS` and `Cast`: with a batch of unknown size, two
    nested accumulators pass a shape, a comparison, an index or a cast to integers
    (TensorFlow alone fails there: an `IndexError` on the inner accumulator's
    output-less tangent function), and each carries its own direction's tangent:
    the inner one's equals twice the outer one's (directions `2 v` and `v`), and the
    outer one's equals a single accumulator's."""
    fn = INTEGER_PATHS[path]
    kernel = tf.Variable(np.random.default_rng(0).normal(size=(3, 4)).astype("float32"))
    direction = tf.constant(np.random.default_rng(1).normal(size=(3, 4)), tf.float32)
    spec = [tf.TensorSpec([None, 3], tf.float32)]

    @tf.function(input_signature=spec)
    def nested(x):
        with tf.autodiff.ForwardAccumulator(kernel, direction) as outer:
            with tf.autodiff.ForwardAccumulator(kernel, 2.0 * direction) as inner:
                y = fn(x @ kernel)
        return inner.jvp(y), outer.jvp(y)

    @tf.function(input_signature=spec)
    def single(x):
        with tf.autodiff.ForwardAccumulator(kernel, direction) as accumulator:
            y = fn(x @ kernel)
        return accumulator.jvp(y)

    x = tf.constant(np.random.default_rng(2).normal(size=(5, 3)), tf.float32)
    inner, outer = nested(x)
    alone = single(x)
    assert np.abs(alone.numpy()).max() > 1e-3
    np.testing.assert_allclose(inner, 2.0 * outer.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(outer, alone, rtol=1e-6, atol=1e-6)


class _RecomputedActivation(keras.layers.Layer):
    """A Dense whose activation is checkpointed at call time (`tf.recompute_grad`)."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(units)

    def call(self, x):
        return tf.recompute_grad(tf.nn.gelu)(self.dense(x))


def _remat_model(kind):
    keras.utils.set_random_seed(0)
    middle = {"plain": lambda: keras.layers.Dense(6, activation="gelu"),
              "scope": lambda: keras.layers.Dense(6, activation="gelu"),
              "call": lambda: _RecomputedActivation(6)}[kind]
    if kind == "scope":  # Keras's RematScope wraps each activation at call time.
        with keras.RematScope(mode="activations"):
            return keras.Sequential([keras.Input((5,)), middle(),
                                     keras.layers.Dense(3)])
    return keras.Sequential([keras.Input((5,)), middle(), keras.layers.Dense(3)])


@pytest.mark.parametrize("kind", ["scope", "call"])
def test_checkpointed_models_take_the_products_of_the_plain_model(kind, caplog):
    # TensorFlow's forward mode (and reverse-over-reverse) cannot pass
    # `tf.recompute_grad`; within the products' passes it is the plain function,
    # so the checkpointed model's steps are the plain model's.
    x = np.random.default_rng(0).normal(size=(32, 5)).astype("float32")
    y = np.random.default_rng(1).integers(0, 3, 32)
    weights = {}
    for name in ("plain", kind):
        model = _remat_model(name)
        wrapped = keras_tkfac.wrap(model)
        wrapped.compile(optimizer=keras_tkfac.TKFAC(seed=0), loss=LOSS)
        wrapped.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        weights[name] = model.get_weights()
    assert not [r for r in caplog.records if "products failed" in r.getMessage()]
    for got, want in zip(weights[kind], weights["plain"]):
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert tf.recompute_grad is tangents._RECOMPUTE_GRAD  # restored after the passes


def test_plain_recompute_restores_the_original_after_nested_contexts():
    original = tf.recompute_grad
    f = lambda x: x + 1.0  # pylint: disable=unnecessary-lambda-assignment
    with tangents.plain_recompute():
        with tangents.plain_recompute():
            assert tf.recompute_grad(f) is f
        assert tf.recompute_grad(f) is f
    assert tf.recompute_grad is original
    assert tf.recompute_grad(f) is not f
