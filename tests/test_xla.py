"""`jit_compile=True`: works on one device and under MirroredStrategy, no retracing."""

import numpy as np
import pytest
import tensorflow as tf
import keras

import keras_tkfac
from keras_tkfac import fisher as fisher_lib
from keras_tkfac import loss_specs
from keras_tkfac import ops
from keras_tkfac import wrapping
from tests import helpers

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _fit(strategy, jit_compile, epochs=2, fisher="empirical", step_control="graft"):
    x, y = helpers.classification_data(n=64)
    with strategy.scope():
        model = keras_tkfac.wrap(helpers.tiny_mlp())
        model.compile(
            optimizer=keras_tkfac.TKFAC(fisher=fisher, factor_update_freq=2,
                                        inverse_update_freq=3,
                                        step_control=step_control, seed=0),
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


# graft_quadratic: forward-mode products, the loss after the step and the damping's
# adaptation inside the compiled step.
@pytest.mark.parametrize("step_control", ["graft", "graft_quadratic"])
def test_jit_compile_on_one_device_matches_eager_kernels(step_control):
    compiled = _fit(tf.distribute.get_strategy(), True, step_control=step_control)
    assert compiled.jit_compile is True
    plain = _fit(tf.distribute.get_strategy(), False, step_control=step_control)
    # XLA fuses and reorders float32 arithmetic; 8 steps stay within 1e-4.
    for a, b in zip(plain.weights, compiled.weights):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-4, atol=1e-5)


def _constrained_fit(jit_compile, optimizer):
    x, y = helpers.classification_data(n=48)
    keras.utils.set_random_seed(0)
    model = keras_tkfac.wrap(keras.Sequential([
        keras.Input((x.shape[1],)),
        keras.layers.Dense(8, activation="tanh",
                           kernel_constraint=keras.constraints.MaxNorm(100.0)),
        keras.layers.Dense(int(y.max()) + 1)]))
    model.compile(optimizer=optimizer, loss=LOSS, jit_compile=jit_compile)
    start = [w.numpy() for w in model.trainable_weights]
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    return start, model


@pytest.mark.parametrize("control", ["graft_quadratic", "quadratic"])
def test_reads_after_the_update_see_it_under_jit_compile(control):
    """Keras applies constraints and `use_ema`'s average after the update, in the
    same compiled step: both must read the updated weights (with one nested
    forward-mode pass for the products they read the old ones under XLA: the
    kernel under a `MaxNorm` that never binds did not move)."""
    results = {}
    for jit_compile in (False, True):
        optimizer = keras_tkfac.TKFAC(step_control=control, use_ema=True,
                                      ema_momentum=0.5, seed=0)
        start, model = _constrained_fit(jit_compile, optimizer)
        results[jit_compile] = (
            [w.numpy() for w in model.trainable_weights],
            [v.numpy() for v in optimizer._model_variables_moving_average])
    kernel_moved = np.abs(results[True][0][0] - start[0]).max()
    assert kernel_moved > 1e-3
    for eager, compiled in zip(results[False], results[True]):
        for a, b in zip(eager, compiled):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_jit_compile_under_mirrored_strategy_compiles_inner_math(mirrored):
    # A model of the same shapes trained before in the same process (as in a
    # hyper-parameter search) must not change the next one's result: the compiled
    # math is shared by both (see `test_compiled_math_reads_the_variables_of_each_call`).
    _fit(mirrored, True, epochs=1, fisher="true", step_control="graft_quadratic")
    model = _fit(mirrored, True)
    assert model.jit_compile is False and model.optimizer._jit_math
    reference = _fit(tf.distribute.get_strategy(), False)
    for a, b in zip(reference.weights, model.weights):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-4, atol=1e-5)


def test_compiled_math_reads_the_variables_of_each_call(mirrored):
    """`ops.compiled`'s functions are shared by every model of the process. Under a
    `MirroredStrategy` a Keras variable's `.value` is a `MirroredVariable`; passed
    as it is, the second model's call reused the first one's trace, which had
    captured the first model's variable (this returned `1 * G` twice)."""
    grad = tf.constant(np.arange(6.0).reshape(2, 3), tf.float32)
    results = []
    for scale in (1.0, 2.0):
        with mirrored.scope():
            left = keras.Variable(scale * np.eye(2), dtype="float32")
            right = keras.Variable(np.eye(3), dtype="float32")

        @tf.function
        def step():
            return ops.compiled(ops.precondition_many)(
                [left.value], [grad], [right.value], tf.float32)[0]

        per_replica = mirrored.experimental_local_results(mirrored.run(step))
        results.append([r.numpy() for r in per_replica])
    for scale, per_replica in zip((1.0, 2.0), results):
        for result in per_replica:
            np.testing.assert_allclose(result, scale * grad.numpy())


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
                  for fn, f in ops._compiled.items()}
    model.fit(x, y, batch_size=16, epochs=3, verbose=0)
    assert len(trace_counter) == traces
    for fn, f in ops._compiled.items():
        assert f.experimental_get_tracing_count() == jit_traces.get(fn, 0), fn


@pytest.mark.parametrize("loss", ["sparse_categorical_crossentropy",
                                  "categorical_crossentropy", "binary_crossentropy",
                                  "mean_squared_error"])
def test_sampled_labels_are_the_same_with_and_without_xla(loss):
    spec = loss_specs.resolve_loss(loss, "true")
    logits = tf.random.stateless_normal([256, 5], [1, 2])
    y_pred = logits if loss == "mean_squared_error" else tf.nn.softmax(logits)
    if loss == "binary_crossentropy":
        y_pred = tf.nn.sigmoid(logits)
    seed = tf.constant([7, 3], tf.int32)

    def sample(y_pred, seed):
        return fisher_lib.sample_targets(spec, y_pred, seed)

    plain = tf.function(sample)(y_pred, seed).numpy()
    compiled = tf.function(sample, jit_compile=True)(y_pred, seed).numpy()
    if loss == "mean_squared_error":
        np.testing.assert_allclose(compiled, plain, rtol=1e-5, atol=1e-6)
    else:
        np.testing.assert_array_equal(compiled, plain)
    other_seed = tf.function(sample)(y_pred, tf.constant([7, 4], tf.int32)).numpy()
    assert np.any(other_seed != plain)


def test_jit_compile_with_the_true_fisher_trains_like_without():
    compiled = _fit(tf.distribute.get_strategy(), True, fisher="true")
    plain = _fit(tf.distribute.get_strategy(), False, fisher="true")
    for a, b in zip(plain.weights, compiled.weights):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-4, atol=1e-5)


# 73 s on the 2-core CI machine; both options are opt-in (`make test-all` runs it).
@pytest.mark.slow
def test_jit_compile_with_sampled_conv_locations_and_bfloat16_matches_eager():
    # The grid's phase moves the slices at every statistics step: shapes stay
    # static, so XLA compiles one step for every phase.
    x = np.random.default_rng(0).normal(size=(32, 6, 7, 2)).astype("float32")
    y = np.random.default_rng(1).integers(0, 3, size=(32,)).astype("int32")
    weights = []
    for jit_compile in (False, True):
        keras.utils.set_random_seed(0)
        model = keras_tkfac.wrap(keras.Sequential([
            keras.Input((6, 7, 2)), keras.layers.Conv2D(4, 3, padding="same"),
            keras.layers.Flatten(), keras.layers.Dense(3)]))
        model.compile(optimizer=keras_tkfac.TKFAC(
            conv_location_stride=2, precondition_dtype="bfloat16",
            factor_update_freq=1, inverse_update_freq=2, seed=0),
            loss=LOSS, jit_compile=jit_compile)
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        weights.append([w.numpy() for w in model.weights])
    for a, b in zip(*weights):
        assert np.all(np.isfinite(b))
        # bfloat16 products may round differently once XLA fuses them.
        np.testing.assert_allclose(b, a, rtol=2e-2, atol=2e-3)


# `steps_per_execution` puts several training steps in one `tf.function` call (a
# loop inside the traced function): the cadence (statistics every 2 steps, inverses
# every 3) must count steps, not calls, and the defaults' step control (products, the
# loss after the step, the damping's adaptation) must run inside the loop.
@pytest.mark.parametrize("jit_compile", [False, True], ids=["eager_kernels", "xla"])
def test_steps_per_execution_trains_as_one_step_per_call(jit_compile):
    x, y = helpers.classification_data(n=64)
    results = []
    for steps_per_execution in (1, 3):
        keras.utils.set_random_seed(0)
        model = keras_tkfac.wrap(helpers.tiny_mlp())
        model.compile(optimizer=keras_tkfac.TKFAC(factor_update_freq=2,
                                                  inverse_update_freq=3, seed=0),
                      loss=LOSS, jit_compile=jit_compile,
                      steps_per_execution=steps_per_execution)
        history = model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        assert int(model.optimizer.iterations.numpy()) == 8
        results.append((history.history["loss"], [w.numpy() for w in model.weights]))
    (losses, weights), (losses_3, weights_3) = results
    np.testing.assert_allclose(losses_3, losses, rtol=1e-5)
    for a, b in zip(weights, weights_3):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
