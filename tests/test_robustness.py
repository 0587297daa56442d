"""Non-finite batches, degenerate curvature, huge layers, fuzzed hyperparameters."""

import logging

import hypothesis
from hypothesis import strategies as st
import numpy as np
import pytest
import tensorflow as tf
import keras

import keras_tkfac
from tests import helpers

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _compiled(**optimizer_args):
    model = keras_tkfac.wrap(helpers.tiny_mlp())
    optimizer = keras_tkfac.TKFAC(seed=0, **optimizer_args)
    model.compile(optimizer=optimizer, loss=LOSS)
    return model, optimizer


def _skipped(optimizer):
    return {id(v) for v in (optimizer.iterations, optimizer.skipped_steps,
                            optimizer.skipped_statistics, optimizer._last_update)}


def _state(model):
    optimizer = model.optimizer
    return [v.numpy().copy() for v in model.weights + optimizer.variables
            if id(v) not in _skipped(optimizer)]


@pytest.mark.parametrize("step_control", ["graft_quadratic", "graft"])
def test_non_finite_batch_is_skipped_and_counted(step_control):
    x, y = helpers.classification_data(n=16)
    model, optimizer = _compiled(factor_update_freq=1, inverse_update_freq=1,
                                 step_control=step_control)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    before = _state(model)
    bad = x.copy()
    bad[3, 1] = np.nan
    model.fit(bad, y, batch_size=16, epochs=1, verbose=0)
    assert int(optimizer.skipped_steps.numpy()) == 1
    assert int(optimizer.skipped_statistics.numpy()) == 1
    # The inverses, recomputed at every step here, take the damping adapted at the
    # step before (graft_quadratic); the factors, the damping factor, the weights
    # and every other slot are kept.
    inverses = [v for slot in optimizer._slots for v in slot.inverses]
    adapted = step_control == "graft_quadratic"
    if adapted:
        assert float(optimizer.damping_scale.numpy()) != 1.0
    kept = [not (adapted and any(v is w for w in inverses))
            for v in model.weights + optimizer.variables
            if id(v) not in _skipped(optimizer)]
    for old, new, check in zip(before, _state(model), kept):
        if check:
            np.testing.assert_array_equal(new, old)
    model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    assert int(optimizer.skipped_steps.numpy()) == 1
    assert all(np.all(np.isfinite(s)) for s in _state(model))
    assert not np.array_equal(_state(model)[0], before[0])


def test_non_finite_statistics_are_not_folded_in():
    x, y = helpers.classification_data(n=16)
    model, optimizer = _compiled(factor_update_freq=1)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    factors = [v.numpy() for v in optimizer._slots[0].factors]
    with tf.GradientTape(persistent=True) as tape:
        with keras_tkfac.record(model) as recording:
            y_pred = model(x, training=True)
    optimizer.update_curvature(recording, tape, y_pred, y_true=y, loss=LOSS,
                               loss_value=tf.constant(np.inf))
    assert int(optimizer.skipped_statistics.numpy()) == 1
    for old, variable in zip(factors, optimizer._slots[0].factors):
        np.testing.assert_array_equal(variable.numpy(), old)


@pytest.mark.parametrize("case", ["dead_relu", "rank_deficient", "huge_inputs",
                                  "tiny_inputs"])
def test_degenerate_curvature_stays_finite_and_bounded(case):
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    n = 2 if case == "rank_deficient" else 64
    x = rng.normal(size=(n, 32)).astype("float32")
    x *= {"huge_inputs": 1e4, "tiny_inputs": 1e-4}.get(case, 1.0)
    y = rng.integers(0, 3, size=(n,))
    bias = "zeros" if case != "dead_relu" else keras.initializers.Constant(-1e3)
    model = keras_tkfac.wrap(keras.Sequential([
        keras.Input((32,)),
        keras.layers.Dense(48, activation="relu", bias_initializer=bias),
        keras.layers.Dense(3),
    ]))
    model.compile(optimizer=keras_tkfac.TKFAC(seed=0, inverse_update_freq=5), loss=LOSS)
    before = [w.numpy() for w in model.weights]
    history = model.fit(x, y, batch_size=n, epochs=20, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    for old, new in zip(before, model.weights):
        new = new.numpy()
        assert np.all(np.isfinite(new))
        # The KL bound bounds each step in the Fisher norm, and where the softmax
        # saturates (huge inputs: curvature ~0) the loss bound does
        # (`quadratic.LOSS_BOUND_FACTOR`; without it the weights reached 1e13);
        # in parameters the whole run moves by far less than the problem's scale.
        assert np.abs(new - old).max() < 1e3
    assert int(model.optimizer.inverse_failures.numpy()) == 0
    assert history.history["loss"][-1] <= history.history["loss"][0] * 1.01


def test_layer_above_max_factor_dim_takes_the_fallback(caplog):
    keras.utils.set_random_seed(0)
    model = keras_tkfac.wrap(keras.Sequential([
        keras.Input((20000,)), keras.layers.Dense(8), keras.layers.Dense(3)]))
    model.compile(optimizer=keras_tkfac.TKFAC(seed=0), loss=LOSS)
    x = np.random.default_rng(0).normal(size=(8, 20000)).astype("float32")
    y = np.arange(8) % 3
    with caplog.at_level(logging.WARNING, logger="absl"):
        model.fit(x, y, epochs=2, verbose=0)
    assert "max_factor_dim" in caplog.text
    sizes = [int(np.prod(v.shape)) for v in model.optimizer.variables]
    assert max(sizes) < 20000 * 20  # no 20001 x 20001 factor was created
    assert [s.block.name for s in model.optimizer._slots] == [model.blocks[1].name]
    assert all(np.all(np.isfinite(w.numpy())) for w in model.weights)


VALID = st.fixed_dictionaries({
    "learning_rate": st.floats(1e-4, 1.0),
    "damping": st.floats(1e-4, 1.0),
    "momentum": st.floats(0.0, 0.95),
    "factor_decay": st.floats(0.0, 0.99),
    "factor_update_freq": st.integers(1, 5),
    "inverse_update_freq": st.integers(1, 7),
    "kl_clip": st.one_of(st.none(), st.floats(1e-5, 1e-1)),
    "fisher": st.sampled_from(["true", "empirical"]),
    "inverse_dtype": st.sampled_from(["float32", "float64"]),
})


def _train_fuzzed(config, kfac):
    x, y = helpers.classification_data(n=32)
    model = keras_tkfac.wrap(helpers.tiny_mlp())
    cls = keras_tkfac.KFAC if kfac else keras_tkfac.TKFAC
    model.compile(optimizer=cls(seed=0, **config), loss=LOSS)
    history = model.fit(x, y, batch_size=16, epochs=3, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert all(np.all(np.isfinite(w.numpy())) for w in model.weights)


@hypothesis.settings(max_examples=6, deadline=None, derandomize=True)
@hypothesis.given(config=VALID, kfac=st.booleans())
def test_fuzzed_valid_configurations_train_without_nan(config, kfac):
    _train_fuzzed(config, kfac)


@pytest.mark.slow
@hypothesis.settings(max_examples=150, deadline=None, derandomize=True)
@hypothesis.given(config=VALID, kfac=st.booleans())
def test_many_fuzzed_valid_configurations_train_without_nan(config, kfac):
    """`make test-all` only: 25 times the configurations of the test above."""
    _train_fuzzed(config, kfac)


INVALID = st.one_of(
    st.tuples(st.just("learning_rate"), st.floats(max_value=-1e-9)),
    st.tuples(st.just("damping"), st.floats(max_value=0.0)),
    st.tuples(st.just("momentum"), st.floats(min_value=1.0, allow_infinity=False)),
    st.tuples(st.just("factor_decay"), st.floats(max_value=-1e-9)),
    st.tuples(st.just("factor_update_freq"), st.integers(max_value=0)),
    st.tuples(st.just("inverse_update_freq"), st.integers(max_value=0)),
    st.tuples(st.just("kl_clip"), st.floats(max_value=0.0)),
    st.tuples(st.just("fisher"), st.text(max_size=8).filter(
        lambda t: t not in ("true", "empirical"))),
    st.tuples(st.just("max_factor_dim"), st.integers(max_value=0)),
)


@hypothesis.settings(max_examples=40, deadline=None, derandomize=True)
@hypothesis.given(bad=INVALID)
def test_fuzzed_invalid_arguments_raise_value_error_naming_them(bad):
    name, value = bad
    with pytest.raises(ValueError) as error:
        keras_tkfac.TKFAC(**{name: value})
    assert f"{name}=" in str(error.value)


def test_layer_not_called_in_the_forward_pass():
    class WithUnusedHead(keras.Model):
        def __init__(self):
            super().__init__()
            self.body = keras.layers.Dense(4, activation="tanh")
            self.head = keras.layers.Dense(3)
            self.unused = keras.layers.Dense(2)

        def call(self, x):
            return self.head(self.body(x))

    keras.utils.set_random_seed(0)
    inner = WithUnusedHead()
    x, y = helpers.classification_data(n=16)
    inner(x[:1])
    inner.unused.build((None, 4))
    model = keras_tkfac.wrap(inner)
    model.compile(optimizer=keras_tkfac.TKFAC(seed=0), loss=LOSS)
    history = model.fit(x, y, batch_size=8, epochs=3, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    report = model.optimizer.curvature_report()
    assert report[inner.unused.name]["update_ratio"] == 0.0
    assert report[inner.head.name]["update_ratio"] > 0.0
    # The unused layer's moving averages were never updated, nor decayed.
    slots = {s.block.name: i for i, s in enumerate(model.optimizer._slots)}
    weights = model.optimizer._factor_weight.numpy()
    assert weights[slots[inner.unused.name]] == 0.0 and weights[slots[inner.head.name]] > 0


def test_sample_weights_weight_the_fisher():
    x, y = helpers.classification_data(n=8)
    weights = np.array([1, 1, 1, 1, 0, 0, 0, 0], dtype="float32")

    def delta(x, y, sample_weight):
        model = keras_tkfac.wrap(helpers.tiny_mlp())
        optimizer = keras_tkfac.TKFAC(fisher="empirical", seed=0)
        with tf.GradientTape(persistent=True) as tape:
            with keras_tkfac.record(model) as recording:
                y_pred = model(x, training=True)
        optimizer.update_curvature(recording, tape, y_pred, y_true=y, loss=LOSS,
                                   sample_weight=sample_weight)
        return optimizer._slots[0].factors[0].numpy() / 0.05  # undo the first EMA

    # Zero-weight examples add nothing; Keras's mean still counts them in M.
    np.testing.assert_allclose(delta(x, y, weights), delta(x[:4], y[:4], None) / 2,
                               rtol=1e-5)


def test_layers_frozen_at_wrap_time_are_preconditioned_once_unfrozen():
    x, y = helpers.classification_data(n=16)
    base = helpers.tiny_mlp()
    base.layers[0].trainable = False
    model = keras_tkfac.wrap(base)
    model.compile(optimizer=keras_tkfac.TKFAC(seed=0), loss=LOSS)
    model.fit(x, y, epochs=1, verbose=0)
    assert len(model.optimizer._slots) == 1
    base.layers[0].trainable = True
    model.compile(optimizer=keras_tkfac.TKFAC(seed=0), loss=LOSS)
    model.fit(x, y, epochs=1, verbose=0)
    assert len(model.optimizer._slots) == 2


def test_single_output_in_a_dict_trains():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,))
    outputs = {"out": keras.layers.Dense(3)(keras.layers.Dense(4)(inputs))}
    model = keras_tkfac.wrap(keras.Model(inputs, outputs))
    model.compile(optimizer=keras_tkfac.TKFAC(seed=0), loss={"out": LOSS})
    x, y = helpers.classification_data(n=16)
    history = model.fit(x, {"out": y}, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))


def test_empty_replica_batch_gives_no_nan(mirrored):
    x, y = helpers.classification_data(n=3)
    with mirrored.scope():
        model = keras_tkfac.wrap(helpers.tiny_mlp())
        model.compile(optimizer=keras_tkfac.TKFAC(seed=0, factor_update_freq=1), loss=LOSS)
    # Batches of 2 then 1: with 2 replicas the last step leaves one replica empty.
    model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(2), epochs=2,
              shuffle=False, verbose=0)
    assert int(model.optimizer.skipped_statistics.numpy()) == 0
    for variable in model.weights + model.optimizer.variables:
        assert np.all(np.isfinite(variable.numpy())), variable.path


def test_empty_batch_keeps_the_factors_finite():
    """A batch with no examples (a custom loop slicing past the end of its data) folds
    nothing into the moving averages instead of 0/0."""
    x, y = helpers.classification_data(n=8)
    model = keras_tkfac.wrap(helpers.tiny_mlp())
    optimizer = keras_tkfac.TKFAC(seed=0, factor_update_freq=1, inverse_update_freq=1)
    model.compile(optimizer=optimizer, loss=LOSS)
    model.train_on_batch(x, y)
    before = [v.numpy() for v in optimizer._slots[0].factors]
    model.train_on_batch(x[8:], y[8:])
    for variable in optimizer.variables + model.weights:
        assert np.all(np.isfinite(variable.numpy())), variable.path
    for a, b in zip(before, optimizer._slots[0].factors):
        np.testing.assert_array_equal(a, b.numpy())
    assert int(optimizer.skipped_statistics.numpy()) == 1


def test_non_finite_embedding_gradient_is_skipped_without_densifying_it():
    """An embedding's gradient (`tf.IndexedSlices`) with a NaN among its values:
    the step is skipped and counted, no weight and no optimizer state moves (the
    graft's second moment of the embedding's rows, `row_sparse.rms_step`, included),
    eagerly and traced; the finiteness test reads the slices' values
    (`ops.all_finite`), not a dense `[vocab, dim]` gradient made from them."""
    vocab, dim = 500, 4
    model = keras.Sequential([
        keras.Input((6,), dtype="int32"), keras.layers.Embedding(vocab, dim),
        keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(3)])
    model = keras_tkfac.wrap(model)
    optimizer = keras_tkfac.TKFAC(seed=0)
    model.compile(optimizer=optimizer, loss=LOSS)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, vocab, (8, 6)), rng.integers(0, 3, 8)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    with tf.GradientTape() as tape:
        loss = LOSS(y, model(x, training=True))
    grads = tape.gradient(loss, model.trainable_variables)
    assert isinstance(grads[0], tf.IndexedSlices)
    values = grads[0].values.numpy()
    values[2, 1] = np.nan
    grads[0] = tf.IndexedSlices(tf.constant(values), grads[0].indices,
                                grads[0].dense_shape)
    before = _state(model)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    assert int(optimizer.skipped_steps.numpy()) == 1
    for old, new in zip(before, _state(model)):
        np.testing.assert_array_equal(new, old)

    @tf.function
    def step(values):
        sliced = tf.IndexedSlices(values, grads[0].indices, grads[0].dense_shape)
        optimizer.apply_gradients(zip([sliced] + grads[1:], model.trainable_variables))

    graph = step.get_concrete_function(tf.constant(values)).graph
    tested = [op.inputs[0] for op in graph.get_operations() if op.type == "IsFinite"]
    assert tested and all(t.shape.rank != 2 or t.shape[0] != vocab for t in tested)
    step(tf.constant(values))
    assert int(optimizer.skipped_steps.numpy()) == 2
    for old, new in zip(before, _state(model)):
        np.testing.assert_array_equal(new, old)
