"""`keras_tkfac.reuse`: the products' pass takes the step's own outputs for layers
that compute the same thing there, and training is what it is without that."""

import numpy as np
import pytest
import tensorflow as tf
import keras
from keras import layers

import keras_tkfac
from keras_tkfac import products
from keras_tkfac import reuse
from keras_tkfac import tangents as tangents_lib
from tests import helpers

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


@pytest.fixture
def reused(monkeypatch):
    """Counts the calls reused while tracing."""
    counts = []
    original = reuse._Reuse.lookup

    def counting(self, layer, call, args, kwargs):
        outputs = original(self, layer, call, args, kwargs)
        if outputs is not None:
            counts.append(layer.name)
        return outputs

    monkeypatch.setattr(reuse._Reuse, "lookup", counting)
    return counts


def _data(shape, n=64, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n,) + shape).astype("float32")
    y = (x.reshape(n, -1)[:, 0] > 0).astype("int32") + (
        x.reshape(n, -1)[:, 1] > 0.5).astype("int32")
    return x, y % classes


def _fit(build, x, y, enabled, monkeypatch, epochs=2, carry=True, loss=LOSS,
         **optimizer_args):
    monkeypatch.setattr(reuse, "ENABLED", enabled)
    monkeypatch.setattr(reuse, "CARRY", carry)
    keras.utils.set_random_seed(0)
    model = keras_tkfac.wrap(build())
    model.compile(optimizer=keras_tkfac.TKFAC(seed=0, **optimizer_args), loss=loss)
    history = model.fit(x, y, batch_size=16, epochs=epochs, shuffle=False, verbose=0)
    return history.history["loss"], [w.numpy() for w in model.weights]


def _assert_same(first, second):
    (losses, weights), (losses_2, weights_2) = first, second
    np.testing.assert_allclose(losses_2, losses, rtol=1e-6)
    for a, b in zip(weights, weights_2):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)


def _frozen_base():
    base = keras.Sequential([
        keras.Input((8, 8, 2)), layers.Conv2D(4, 3, activation="relu"),
        layers.BatchNormalization(), layers.Conv2D(4, 3)], name="base")
    base.trainable = False
    inputs = keras.Input((8, 8, 2))
    h = layers.GlobalAveragePooling2D()(base(inputs, training=False))
    return keras.Model(inputs, layers.Dense(3)(layers.Dense(8, activation="tanh")(h)))


def _partner_lstm():
    # The LSTM takes the partner's step; its input is the raw series.
    return keras.Sequential([keras.Input((6, 3)), layers.LSTM(5, name="lstm"),
                             layers.Dense(3)])


@pytest.mark.parametrize("build,shape", [(_frozen_base, (8, 8, 2)),
                                         (_partner_lstm, (6, 3))],
                         ids=["frozen_base", "partner_lstm"])
def test_reusing_the_steps_outputs_trains_as_recomputing_them(build, shape, reused,
                                                              monkeypatch):
    x, y = _data(shape)
    with_reuse = _fit(build, x, y, True, monkeypatch)
    assert "base" in reused or "lstm" in reused
    _assert_same(_fit(build, x, y, False, monkeypatch), with_reuse)


class _ReadsKernel(layers.Layer):
    """Adds a covered `Dense`'s kernel (which it does not own) to its input: a
    hidden read of a direction's variable before that layer."""

    def __init__(self, dense, **kwargs):
        super().__init__(**kwargs)
        self.dense = dense

    def call(self, inputs):
        return inputs + 0.1 * tf.reduce_sum(self.dense.kernel, axis=1)


def test_a_layer_that_reads_a_directions_variable_is_reused_only_with_its_tangents(
        reused, carried, monkeypatch):
    """Without `CARRY` such a layer is computed again; with it, the step's output
    is reused with the tangents of the layer's call in the pass (`_Reuse.carry`)."""
    def build():
        dense = layers.Dense(3)
        dense.build((None, 4))
        inputs = keras.Input((4,))
        h = layers.Activation("tanh", name="plain")(inputs)
        h = _ReadsKernel(dense, name="reads")(h)
        return keras.Model(inputs, dense(h))

    x, y = _data((4,))
    without_carry = _fit(build, x, y, True, monkeypatch, carry=False)
    assert "plain" in reused and "reads" not in reused and not carried
    _assert_same(_fit(build, x, y, False, monkeypatch), without_carry)
    del reused[:]
    _assert_same(_fit(build, x, y, True, monkeypatch), without_carry)
    assert "reads" in carried and "reads" in reused


def test_a_shared_layer_reuses_each_of_its_calls(reused, monkeypatch):
    def build():
        frozen = layers.Dense(6, activation="tanh", name="shared")
        frozen.trainable = False
        left, right = keras.Input((4,)), keras.Input((4,))
        h = layers.Concatenate()([frozen(left), frozen(right)])
        return keras.Model([left, right], layers.Dense(3)(h))

    x, y = _data((8,))
    inputs = [x[:, :4], x[:, 4:]]
    with_reuse = _fit(build, inputs, y, True, monkeypatch)
    # Both calls, in each pass that reuses: the products' and the loss after the
    # step (one trace).
    assert reused.count("shared") == 4
    _assert_same(_fit(build, inputs, y, False, monkeypatch), with_reuse)


def _noisy_trunk():
    # Noise and dropout before any preconditioned layer: settled, reused.
    inputs = keras.Input((5,))
    h = layers.GaussianNoise(0.3, name="noise")(inputs)
    h = layers.Dropout(0.3, name="drop")(h)
    return keras.Model(inputs, layers.Dense(3)(layers.Dense(6, activation="tanh")(h)))


def test_random_layers_in_a_settled_trunk_give_the_products_the_steps_draws(
        reused, monkeypatch):
    """Reused, the trunk's draws in the products' pass and in the loss after the
    step are the step's own: what replaying the step's random state
    (`products.REPLAY_MASKS`) gives without reuse."""
    x, y = _data((5,))
    with_reuse = _fit(_noisy_trunk, x, y, True, monkeypatch)
    assert "noise" in reused and "drop" in reused
    monkeypatch.setattr(products, "REPLAY_MASKS", True)
    _assert_same(_fit(_noisy_trunk, x, y, False, monkeypatch), with_reuse)


def test_random_layers_after_a_trained_layer_draw_as_without_reuse(reused,
                                                                   monkeypatch):
    """Dropout after the partner's LSTM: the pass after the step recomputes the
    LSTM (its weights moved) and so draws anew; the products' pass draws anew too,
    so the losses before and after the step see the same masks."""
    def build():
        return keras.Sequential([keras.Input((6, 3)), layers.LSTM(5, name="lstm"),
                                 layers.Dropout(0.3, name="drop"), layers.Dense(3)])

    x, y = _data((6, 3))
    with_reuse = _fit(build, x, y, True, monkeypatch)
    assert "lstm" in reused and "drop" not in reused
    _assert_same(_fit(build, x, y, False, monkeypatch), with_reuse)


def test_custom_loops_reuse_with_a_model_forward_in_a_traced_step(reused):
    """README's custom loop (`ModelForward`, in `tf.function`) reuses; a plain
    `lambda` forward and an eager step reuse nothing."""
    x, y = _data((8, 8, 2), n=16)

    def run(make_forward, traced):
        keras.utils.set_random_seed(0)
        model = keras_tkfac.wrap(_frozen_base())
        optimizer = keras_tkfac.TKFAC(seed=0)
        optimizer.build(model.trainable_variables)
        step = helpers.custom_train_step(model, optimizer, LOSS,
                                         make_forward=make_forward)
        del reused[:]
        assert np.isfinite(float((tf.function(step) if traced else step)(x, y)))
        return list(reused)

    assert "base" in run(keras_tkfac.ModelForward, True)
    assert not run(lambda model, x: lambda: model(x, training=True), True)
    assert not run(keras_tkfac.ModelForward, False)


def test_inputs_that_keras_casts_in_each_pass_still_recur(reused):
    """Keras casts a float64 input to the model's dtype in every call, so each pass
    has a `Cast` of its own of the same tensor (`reuse._same`)."""
    x, y = _data((8, 8, 2), n=16)
    keras.utils.set_random_seed(0)
    model = keras_tkfac.wrap(_frozen_base())
    model.compile(optimizer=keras_tkfac.TKFAC(seed=0), loss=LOSS)
    model.train_on_batch(x.astype("float64"), y)
    assert "base" in reused


def test_under_mirrored_strategy_each_replica_reuses_and_matches_one_device(
        mirrored, reused):
    """Each replica's products' pass reuses its own step's outputs (recordings are
    per replica thread); two replicas train as one device."""
    x, y = _data((8, 8, 2), n=64)

    def train(strategy):
        keras.utils.set_random_seed(0)
        with strategy.scope():
            model = keras_tkfac.wrap(_frozen_base())
            model.compile(optimizer=keras_tkfac.TKFAC(seed=0, fisher="empirical"),
                          loss=LOSS)
        dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
        model.fit(dataset, epochs=2, shuffle=False, verbose=0)
        return [w.numpy() for w in model.weights]

    single = train(tf.distribute.get_strategy())
    del reused[:]
    replicated = train(mirrored)
    assert reused.count("base") >= 2  # (each replica's products' pass)
    for a, b in zip(single, replicated):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


@pytest.fixture
def carried(monkeypatch):
    """Names the calls reused with their tangents (`_Reuse.carry`) while tracing."""
    names = []
    original = reuse._Reuse.carry

    def counting(self, layer, call, outputs, args, kwargs):
        found = original(self, layer, call, outputs, args, kwargs)
        if found is not None:
            names.append(layer.name)
        return found

    monkeypatch.setattr(reuse._Reuse, "carry", counting)
    return names


def _dense_chain():
    # Every layer preconditioned; a softmax output, whose logits the products read.
    return keras.Sequential([
        keras.Input((6,)), layers.Dense(8, activation="relu", name="d1"),
        layers.Dense(8, activation="gelu", name="d2"),
        layers.Dense(3, activation="softmax", name="out")])


def _conv_with_partner_layers():
    # BatchNormalization and LayerNormalization take the partner's step: their
    # inputs carry tangents, so they are run for them, and the step's outputs
    # still reach the layers after them.
    inputs = keras.Input((8, 8, 2))
    h = layers.Conv2D(4, 3, padding="same", name="c1")(inputs)
    h = layers.BatchNormalization(name="bn")(h)
    h = layers.Activation("relu", name="act")(h)
    h = layers.Conv2D(4, 3, name="c2")(h)
    h = layers.GlobalAveragePooling2D(name="pool")(h)
    h = layers.LayerNormalization(name="ln")(layers.Dense(6, name="d1")(h))
    # A layer that returns its input: its output already has its tangent.
    return keras.Model(inputs, layers.Activation("linear", name="same")(
        layers.Dense(3, name="out")(h)))


def _tokens_and_dropout():
    # An embedding, and dropout between dense layers: a random call after a
    # trained layer is computed anew (its draw is the pass's own), after which
    # the inputs no longer recur.
    inputs = keras.Input((5,), dtype="int32")
    h = layers.Embedding(11, 4, name="embed")(inputs)
    h = layers.Flatten(name="flat")(h)
    h = layers.Dense(8, activation="tanh", name="d1")(h)
    h = layers.Dropout(0.2, name="drop")(h)
    return keras.Model(inputs, layers.Dense(3, name="out")(h))


def _tokens(shape):
    x, y = _data(shape)
    return (np.abs(x * 4).astype("int32") % 11), y


@pytest.mark.parametrize("build,shape,expected,computed", [
    (_dense_chain, (6,), ["d1", "d2", "out"], []),
    (_conv_with_partner_layers, (8, 8, 2),
     ["c1", "bn", "act", "c2", "pool", "d1", "ln", "out", "same"], []),
    (_tokens_and_dropout, (5,), ["embed", "flat", "d1"], ["out"]),
], ids=["dense_chain", "conv_partner_layers", "tokens_dropout"])
def test_the_steps_outputs_carry_the_pass_tangents_and_train_as_recomputing_them(
        build, shape, expected, computed, carried, monkeypatch):
    """`_Reuse.carry`: calls with tangents reuse the step's outputs, their
    tangents computed in the pass; training (the quadratic model's products, the
    damping's loss before the step) equals recomputing every call, and equals
    reusing only the calls without tangents, to rounding."""
    x, y = _tokens(shape) if build is _tokens_and_dropout else _data(shape)
    loss = ("sparse_categorical_crossentropy" if build is _dense_chain else LOSS)

    def fit(enabled, carry):
        monkeypatch.setattr(reuse, "ENABLED", enabled)
        monkeypatch.setattr(reuse, "CARRY", carry)
        keras.utils.set_random_seed(0)
        model = keras_tkfac.wrap(build())
        model.compile(optimizer=keras_tkfac.TKFAC(seed=0), loss=loss)
        history = model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        return history.history["loss"], [w.numpy() for w in model.weights]

    with_carry = fit(True, True)
    # (One trace: the products' pass carries each of these once.)
    assert sorted(carried) == sorted(expected)
    assert not set(carried) & set(computed)
    del carried[:]
    _assert_same(fit(False, False), with_carry)
    _assert_same(fit(True, False), with_carry)
    assert not carried


def test_a_carried_dense_chain_computes_no_primal_matmul_in_the_products_pass(
        monkeypatch):
    """The products' pass of a dense chain whose calls are all carried computes
    the model's outputs from no matmul of its own (their primal values are the
    step's; the tangents' matmuls are off that path), where recomputing each call
    takes one per layer."""
    passes = []
    enter, sources = reuse.reusing.__enter__, products._sources

    def entering(self):
        graph = tf.compat.v1.get_default_graph()
        passes.append((graph, len(graph.get_operations()), None))
        return enter(self)

    def finding(outputs, y_pred):
        found, flat = sources(outputs, y_pred)
        graph, start, _ = passes[-1]
        passes[-1] = (graph, start, [t for t in flat if isinstance(t, tf.Tensor)])
        return found, flat

    monkeypatch.setattr(reuse.reusing, "__enter__", entering)
    monkeypatch.setattr(products, "_sources", finding)
    x, y = _data((6,))

    def primal_matmuls(carry):
        monkeypatch.setattr(reuse, "CARRY", carry)
        del passes[:]
        keras.utils.set_random_seed(0)
        model = keras_tkfac.wrap(_dense_chain())
        model.compile(optimizer=keras_tkfac.TKFAC(seed=0),
                      loss="sparse_categorical_crossentropy")
        model.train_on_batch(x[:16], y[:16])
        graph, start, results = [p for p in passes if p[2] is not None][-1]
        created = set(graph.get_operations()[start:])
        return sum(op.type == "MatMul"
                   for op in tangents_lib._ancestors(results, created))

    assert primal_matmuls(False) == 3
    assert primal_matmuls(True) == 0


def test_a_call_recurs_only_with_the_same_arguments(reused, carried, monkeypatch):
    """One layer called twice on one tensor with different arguments computes two
    things: each call of the products' pass takes its own call's outputs
    (`reuse._arguments`), and training equals recomputing them."""
    class Signed(layers.Layer):
        def call(self, inputs, negate=False):
            return -tf.tanh(inputs) if negate else tf.tanh(inputs)

    class TwoCalls(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = layers.Dense(6, name="dense")
            self.signed = Signed(name="signed")
            self.out = layers.Dense(3, name="out")

        def call(self, inputs):
            h = self.dense(inputs)
            return self.out(layers.concatenate([self.signed(h, negate=False),
                                                2.0 * self.signed(h, negate=True)]))

    x, y = _data((4,))
    carrying = _fit(TwoCalls, x, y, True, monkeypatch)
    assert carried.count("signed") == 2
    _assert_same(_fit(TwoCalls, x, y, False, monkeypatch), carrying)


def _bfloat16_mlp():
    # keras-io's mixed-precision recipe: layers compute in bfloat16, the output
    # softmax in float32 (it casts its input: the step's logits are that cast).
    return keras.Sequential([
        keras.Input((6,)), layers.Dense(16, activation="relu", name="d1"),
        layers.Dense(3, name="logits"),
        layers.Activation("softmax", dtype="float32", name="probs")])


@pytest.fixture
def bfloat16_policy():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    yield
    keras.mixed_precision.set_global_policy("float32")


def _fit_bfloat16(x, y, enabled, carry, monkeypatch, epochs=3):
    monkeypatch.setattr(reuse, "ENABLED", enabled)
    monkeypatch.setattr(reuse, "CARRY", carry)
    keras.utils.set_random_seed(0)
    model = keras_tkfac.wrap(_bfloat16_mlp())
    model.compile(optimizer=keras_tkfac.TKFAC(seed=0),
                  loss="sparse_categorical_crossentropy")
    history = model.fit(x, y, batch_size=16, epochs=epochs, shuffle=False, verbose=0)
    return history.history["loss"], [w.numpy() for w in model.weights]


def test_a_float32_softmax_after_bfloat16_layers_gives_the_products_its_logits(
        bfloat16_policy, carried, monkeypatch):
    """The products read the softmax's logits, which under `mixed_bfloat16` are
    the step pass's float32 cast of the last layer's output: carried calls hand
    their tangents to those logits too (`reuse._logits_pairs`). Before, the
    curvature along the step was zero and the loss rose (1.2 to 47 in 24 steps
    on a probe MLP); now training equals recomputing every call."""
    x, y = _data((6,))
    with_carry = _fit_bfloat16(x, y, True, True, monkeypatch)
    assert "probs" in carried
    _assert_same(_fit_bfloat16(x, y, False, False, monkeypatch), with_carry)
    losses = with_carry[0]
    assert losses[-1] < losses[0]


def test_products_whose_tangents_reach_no_loss_input_come_from_reverse_mode(
        bfloat16_policy, monkeypatch):
    """Where no loss input carries a tangent (here the logits' hand-over undone),
    the forward-mode products would be zero; the pass raises and the products
    come from reverse mode, and training still lowers the loss."""
    calls = []
    original = products._reverse_mode

    def spying(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(products, "_reverse_mode", spying)
    monkeypatch.setattr(reuse, "_logits_pairs", lambda steps, computed: ([], []))
    x, y = _data((6,))
    losses, weights = _fit_bfloat16(x, y, True, True, monkeypatch)
    assert calls
    assert losses[-1] < losses[0]
    assert all(np.all(np.isfinite(w)) for w in weights)


@pytest.fixture
def float16_policy():
    keras.mixed_precision.set_global_policy("mixed_float16")
    yield
    keras.mixed_precision.set_global_policy("float32")


def _float16_convnet():
    return keras.Sequential([
        keras.Input((6, 6, 2)), layers.Conv2D(4, 3, activation="relu", name="conv"),
        layers.Flatten(name="flatten"), layers.Dense(8, activation="tanh", name="d1"),
        layers.Dense(3, name="logits"),
        layers.Activation("softmax", dtype="float32", name="probs")])


def test_under_mixed_float16_the_pass_in_the_loss_scales_cond_reuses_the_step(
        float16_policy, carried, monkeypatch):
    """Keras's `LossScaleOptimizer` applies the step inside a `tf.cond`, where
    the products' pass sees the step's tensors as the branch graph's captures
    (`_Reuse.outer`); before, nothing was reused there and the pass recomputed
    the whole forward pass. A step equals recomputing every call.

    Compared after one step, with Grappler's remapper off: on a CPU with float16
    arithmetic (an Intel Xeon with AVX512-FP16, 2026-12-07) the remapper fuses the
    float16 convolution, bias and activation differently in the two traced steps,
    so even the first batch's loss differed (1.28078 against 1.28084) and three
    epochs amplified that rounding to weights 0.02 apart; without the fusion the
    first steps are equal to the last bit there (on an AMD EPYC, without float16
    units, three epochs were equal to 1e-6 with it)."""
    x, y = _data((6, 6, 2))
    loss = "sparse_categorical_crossentropy"
    options = tf.config.optimizer.get_experimental_options()
    tf.config.optimizer.set_experimental_options({"remapping": False})
    try:
        with_carry = _fit(_float16_convnet, x[:16], y[:16], True, monkeypatch,
                          epochs=1, loss=loss)
        assert {"conv", "flatten", "d1", "logits", "probs"} <= set(carried)
        _assert_same(_fit(_float16_convnet, x[:16], y[:16], False, monkeypatch,
                          epochs=1, loss=loss), with_carry)
    finally:
        tf.config.optimizer.set_experimental_options(
            {"remapping": options.get("remapping", True)})
    losses = _fit(_float16_convnet, x, y, True, monkeypatch, epochs=3, loss=loss)[0]
    assert losses[-1] < losses[0]