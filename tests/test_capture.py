"""Recorded rows against Keras's own gradients, per example, for every block kind."""

import numpy as np
import pytest
import tensorflow as tf
import keras

import keras_tkfac
from keras_tkfac import fisher, lora_blocks, loss_specs, ops
from tests import helpers

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _lora(layer, shape, rank=2):
    """`layer` built for inputs of `shape` with LoRA enabled, `B` and the bias made
    non-zero (Keras starts them at zero) so that each acts on the outputs."""
    layer.build((None, *shape))
    layer.enable_lora(rank)
    rng = np.random.default_rng(7)
    for variable in (v for v in (layer.lora_kernel_b, layer.bias) if v is not None):
        variable.assign(rng.normal(size=variable.shape) * 0.5)
    return layer


CASES = {
    "dense": ((5,), lambda: keras.layers.Dense(4, activation="tanh")),
    "dense_no_bias": ((5,), lambda: keras.layers.Dense(4, use_bias=False)),
    "dense_sequence": ((3, 5), lambda: keras.layers.Dense(4, activation="relu")),
    "conv2d_stride2_valid": (
        (7, 7, 2),
        lambda: keras.layers.Conv2D(3, 3, strides=2, padding="valid", activation="tanh"),
    ),
    "conv2d_stride1_same": (
        (5, 6, 2), lambda: keras.layers.Conv2D(3, (3, 2), padding="same")
    ),
    "conv2d_dilation2": (
        (7, 7, 2),
        lambda: keras.layers.Conv2D(3, 3, dilation_rate=2, padding="same", use_bias=False),
    ),
    "conv1d_causal": (
        (8, 2), lambda: keras.layers.Conv1D(3, 3, padding="causal", dilation_rate=2)
    ),
    "conv1d_stride2": ((9, 2), lambda: keras.layers.Conv1D(3, 2, strides=2)),
    "conv3d_stride2_same": (
        (5, 6, 5, 2),
        lambda: keras.layers.Conv3D(3, (3, 2, 3), strides=(2, 1, 2), padding="same",
                                    activation="tanh"),
    ),
    "conv3d_valid": ((4, 4, 4, 2), lambda: keras.layers.Conv3D(2, 2, use_bias=False)),
    "einsum_heads": (
        (3, 5),
        lambda: keras.layers.EinsumDense("abc,cde->abde", output_shape=(3, 2, 3),
                                         bias_axes="de", activation="relu"),
    ),
    "einsum_output_projection": (
        (3, 2, 4),
        lambda: keras.layers.EinsumDense("abcd,cde->abe", output_shape=(3, 5),
                                         bias_axes="e"),
    ),
    "einsum_ellipsis": (
        (5,), lambda: keras.layers.EinsumDense("...b,bc->...c", output_shape=4)
    ),
    # Equations whose operands are not in `batch + contracted`, `contracted + new`
    # and `batch + new` order (`EinsumDenseBlock._canonical`).
    "einsum_kernel_order": (
        (3, 4), lambda: keras.layers.EinsumDense("abc,cbd->ad", output_shape=5,
                                                 bias_axes="d", activation="tanh"),
    ),
    "einsum_middle_axis": (
        (3, 4), lambda: keras.layers.EinsumDense("abc,bd->adc", output_shape=(5, 4),
                                                 bias_axes="d"),
    ),
    "einsum_new_axes_order": (
        (3, 5), lambda: keras.layers.EinsumDense("abc,cde->abed", output_shape=(3, 4, 2),
                                                 bias_axes="de"),
    ),
    # LoRA enabled: the block covers `B` and the bias (`keras_tkfac.lora_blocks`).
    "dense_lora": ((5,), lambda: _lora(keras.layers.Dense(4, activation="tanh"), (5,))),
    "dense_sequence_lora": (
        (3, 5), lambda: _lora(keras.layers.Dense(4, activation="relu"), (3, 5), 3)),
    "einsum_heads_lora": (
        (3, 5),
        lambda: _lora(keras.layers.EinsumDense("abc,cde->abde", output_shape=(3, 2, 3),
                                               bias_axes="de", activation="relu"),
                      (3, 5)),
    ),
    "einsum_output_projection_lora": (
        (3, 2, 4),
        lambda: _lora(keras.layers.EinsumDense("abcd,cde->abe", output_shape=(3, 5),
                                               bias_axes="e"), (3, 2, 4)),
    ),
    "conv2d_stride2_lora": (
        (7, 7, 2),
        lambda: _lora(keras.layers.Conv2D(3, 3, strides=2, padding="valid",
                                          activation="tanh"), (7, 7, 2)),
    ),
    "conv1d_causal_lora": (
        (8, 2), lambda: _lora(keras.layers.Conv1D(3, 3, padding="causal",
                                                  dilation_rate=2), (8, 2))),
    "einsum_ellipsis_lora": (
        (5,), lambda: _lora(keras.layers.EinsumDense("...b,bc->...c", output_shape=4),
                            (5,)),
    ),
}


def _model(case):
    shape, make_layer = CASES[case]
    keras.utils.set_random_seed(1)
    layer = make_layer()
    inputs = keras.Input(shape)
    outputs = keras.layers.Dense(3)(keras.layers.Flatten()(layer(inputs)))
    return keras_tkfac.wrap(keras.Model(inputs, outputs)), layer, shape


def _record(model, x, y):
    with tf.GradientTape(persistent=True) as tape:
        with keras_tkfac.record(model) as recording:
            y_pred = model(x, training=True)
        loss = LOSS(y, y_pred)
    return tape, recording, y_pred, loss


def _block_rows(model, layer, tape, recording, y, y_pred, sequences=False):
    spec = loss_specs.resolve_loss(LOSS, "empirical")
    source, cotangent, num_examples = fisher.output_cotangent(
        spec, "empirical", y, y_pred, tf.constant([0, 0])
    )
    grads = tape.gradient(source, recording.outputs(), output_gradients=cotangent)
    index = [b.layer for b in recording.blocks].index(layer)
    a, g = recording.rows(grads, sequences=sequences)[index]
    return recording.blocks[index], a.numpy(), g.numpy(), int(num_examples)


def _recorded(case, seed, n=3):
    """`case`'s model, layer, input shape, data of `n` examples and one recorded pass."""
    model, layer, shape = _model(case)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *shape)).astype("float32")
    y = rng.integers(0, 3, size=(n,))
    return (model, layer, shape, x, y) + _record(model, x, y)


def _example_gradient(model, block, x, y, n):
    """Keras's gradient of example `n`'s loss as `block`'s gradient matrix."""
    with tf.GradientTape() as single:
        loss_n = LOSS(y[n : n + 1], model(x[n : n + 1], training=True))
    return block.grad_matrix(*single.gradient(loss_n, block.variables)).numpy()


@pytest.mark.parametrize("case", sorted(CASES))
def test_rows_reproduce_keras_gradient(case):
    model, layer, shape = _model(case)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, *shape)).astype("float32")
    y = rng.integers(0, 3, size=(4,))
    tape, recording, y_pred, loss = _record(model, x, y)
    # Recording does not change the forward pass.
    np.testing.assert_allclose(y_pred.numpy(), model(x).numpy(), rtol=1e-5, atol=1e-6)
    block, a, g, m = _block_rows(model, layer, tape, recording, y, y_pred)
    assert m == 4
    keras_grads = tape.gradient(loss, block.variables)
    expected = block.grad_matrix(
        keras_grads[0], keras_grads[1] if len(keras_grads) > 1 else None
    ).numpy()
    # Sum over rows of a g^T is the gradient of the summed loss; Keras's is the mean.
    np.testing.assert_allclose(a.T @ g / m, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_recording_call_computes_the_layers_own_output(case):
    # The recording call (`capture.install`) computes the output from the block's
    # pre-activation; Keras's own `call` of the layer's class is the oracle (a
    # LoRA block whose bias the partner trains once left the bias out).
    model, layer, shape = _model(case)
    x = tf.constant(np.random.default_rng(4).normal(size=(2, *shape)), tf.float32)
    with tf.GradientTape(), keras_tkfac.record(model) as recording:
        recorded = layer(x)
    index = [b.layer for b in recording.blocks].index(layer)
    assert len(recording.calls(recording.blocks[index])) == 1  # (recorded)
    np.testing.assert_allclose(recorded.numpy(), type(layer).call(layer, x).numpy(),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["dense", "dense_sequence", "conv2d_stride2_valid",
                                  "dense_lora", "einsum_heads_lora",
                                  "conv2d_stride2_lora"])
def test_rows_are_per_example_gradients(case):
    model, layer, _, x, y, tape, recording, y_pred, _ = _recorded(case, 2)
    block, a, g, m = _block_rows(model, layer, tape, recording, y, y_pred)
    rows_per_example = len(a) // m
    for n in range(m):
        part = slice(n * rows_per_example, (n + 1) * rows_per_example)
        np.testing.assert_allclose(a[part].T @ g[part],
                                   _example_gradient(model, block, x, y, n),
                                   rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("case", ["dense", "conv2d_stride2_valid", "conv1d_causal",
                                  "dense_lora", "conv1d_causal_lora"])
def test_tkfac_trace_equals_exact_fisher_trace_on_recorded_rows(case):
    model, layer, shape = _model(case)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3, *shape)).astype("float32")
    y = rng.integers(0, 3, size=(3,))
    tape, recording, y_pred, _ = _record(model, x, y)
    _, a, g, m = _block_rows(model, layer, tape, recording, y, y_pred)
    example = np.repeat(np.arange(m), len(a) // m)
    exact = helpers.exact_fisher(a, g, example, m)
    delta, n_phi, n_psi = (
        t.numpy().astype(np.float64)
        for t in ops.tkfac_statistics(tf.constant(a), tf.constant(g), m)
    )
    np.testing.assert_allclose(delta, np.trace(exact), rtol=1e-4)
    np.testing.assert_allclose(np.trace(np.kron(n_phi, n_psi) / delta), delta, rtol=1e-4)
    a_factor, g_factor = (
        t.numpy() for t in ops.kfac_statistics(tf.constant(a), tf.constant(g), m)
    )
    np.testing.assert_allclose(a_factor, a.T @ a / m, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(g_factor, g.T @ g / len(g), rtol=1e-4, atol=1e-7)


def test_shared_layer_records_every_call():
    keras.utils.set_random_seed(0)
    shared = keras.layers.Dense(4, activation="tanh")
    inputs = keras.Input((5,))
    outputs = keras.layers.Dense(3)(shared(inputs) + shared(inputs * 2.0))
    model = keras_tkfac.wrap(keras.Model(inputs, outputs))
    x = np.random.default_rng(0).normal(size=(4, 5)).astype("float32")
    y = np.array([0, 1, 2, 0])
    tape, recording, y_pred, loss = _record(model, x, y)
    block, a, g, m = _block_rows(model, shared, tape, recording, y, y_pred)
    assert len(recording.calls(block)) == 2
    assert a.shape == (8, 6)
    keras_grads = tape.gradient(loss, block.variables)
    expected = block.grad_matrix(*keras_grads).numpy()
    np.testing.assert_allclose(a.T @ g / m, expected, rtol=1e-4, atol=1e-6)


def test_attention_projections_are_preconditioned():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 6))
    attention = keras.layers.MultiHeadAttention(num_heads=2, key_dim=3)
    outputs = keras.layers.Dense(3)(keras.layers.Flatten()(attention(inputs, inputs)))
    model = keras_tkfac.wrap(keras.Model(inputs, outputs))
    assert len(model.blocks) == 5  # query, key, value, output, classifier
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 4, 6)).astype("float32")
    y = rng.integers(0, 3, size=(3,))
    tape, recording, y_pred, loss = _record(model, x, y)
    for block in model.blocks:
        _, a, g, m = _block_rows(model, block.layer, tape, recording, y, y_pred)
        keras_grads = tape.gradient(loss, block.variables)
        expected = block.grad_matrix(*keras_grads).numpy()
        np.testing.assert_allclose(a.T @ g / m, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("layer, shape, reason", [
    (lambda: keras.layers.EinsumDense("abc,bcd->abd", output_shape=(3, 5)), (3, 4),
     "equation"),
    (lambda: keras.layers.EinsumDense("abc,cde->abde", output_shape=(3, 2, 4),
                                      bias_axes="e"), (3, 4), "bias_axes"),
    (lambda: keras.layers.Conv3D(2, 2, dilation_rate=2), (5, 5, 5, 1), "dilation"),
])
def test_unsupported_configurations_take_the_fallback(layer, shape, reason, caplog):
    # A Keras program that trains with Adam trains: the layer the blocks cannot
    # precondition goes to the first-order partner, with the reason logged.
    keras.utils.set_random_seed(0)
    unsupported = layer()
    model = keras_tkfac.wrap(keras.Sequential([
        keras.Input(shape), unsupported, keras.layers.Flatten(),
        keras.layers.Dense(3)]))
    assert [b.layer for b in model.blocks] == [model.model.layers[-1]]
    assert any(unsupported.name in r.getMessage() and reason in r.getMessage()
               and "first-order fallback" in r.getMessage() for r in caplog.records)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16,) + shape).astype("float32")
    y = rng.integers(0, 3, size=(16,))
    model.compile(optimizer=keras_tkfac.TKFAC(seed=0),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = [v.numpy() for v in unsupported.trainable_variables]
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert all(not np.allclose(b, v.numpy())
               for b, v in zip(before, unsupported.trainable_variables))


def test_layers_inside_nested_models_are_found_and_recorded():
    keras.utils.set_random_seed(0)
    inner = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="tanh")])
    inputs = keras.Input((5,))
    outputs = keras.layers.Dense(3)(inner(inputs))
    model = keras_tkfac.wrap(keras.Model(inputs, outputs))
    assert [b.layer for b in model.blocks][0] is inner.layers[0]
    x = np.random.default_rng(0).normal(size=(4, 5)).astype("float32")
    y = np.array([0, 1, 2, 0])
    tape, recording, y_pred, loss = _record(model, x, y)
    block, a, g, m = _block_rows(model, inner.layers[0], tape, recording, y, y_pred)
    expected = block.grad_matrix(*tape.gradient(loss, block.variables)).numpy()
    np.testing.assert_allclose(a.T @ g / m, expected, rtol=1e-4, atol=1e-6)


def test_excluded_and_unregistered_layers_are_not_blocks():
    model = keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(4, name="first"),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(3, name="second"),
        ]
    )
    wrapped = keras_tkfac.wrap(model, exclude=["first"])
    assert [b.name for b in wrapped.blocks] == ["second"]
    with pytest.raises(ValueError, match="exclude"):
        keras_tkfac.wrap(model, exclude=[3])


def test_excluding_a_layer_excludes_the_layers_nested_in_it():
    def build():
        inputs = keras.Input((6, 8))
        h = keras.layers.MultiHeadAttention(2, 4, name="attention")(inputs, inputs)
        return keras.Model(inputs, keras.layers.Dense(3, name="head")(h))

    covered = keras_tkfac.wrap(build())
    assert sorted(b.name for b in covered.blocks) == [
        "attention_output", "head", "key", "query", "value"]
    for exclude in (["attention"], [keras.layers.MultiHeadAttention]):
        wrapped = keras_tkfac.wrap(build(), exclude=exclude)
        assert [b.name for b in wrapped.blocks] == ["head"]
        optimizer = keras_tkfac.TKFAC()
        wrapped.compile(optimizer=optimizer, loss="mse")
        wrapped.fit(np.zeros((4, 6, 8), "float32"), np.zeros((4, 6, 3), "float32"),
                    verbose=0)
        attention = wrapped.get_layer("attention")
        for variable in attention.trainable_variables:  # the partner's state
            index = optimizer._get_variable_index(variable)
            assert optimizer._partner_slots[index] is not None, variable.path


def test_an_excluded_name_that_no_layer_has_is_an_error():
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3, name="head")])
    with pytest.raises(ValueError, match=r"exclude names no layer.*'haed'.*'head'"):
        keras_tkfac.wrap(model, exclude=["haed"])
    # One name or class alone is a list of one (not the string's characters).
    assert keras_tkfac.wrap(model, exclude="head").blocks == []
    assert keras_tkfac.wrap(model, exclude=keras.layers.Dense).blocks == []
    with pytest.raises(ValueError, match="exclude must hold"):
        keras_tkfac.wrap(model, exclude=3)

    class Lazy(keras.Model):  # creates its layer in `build`: checked once built
        def build(self, input_shape):
            self.inner = keras.layers.Dense(3, name="inner")

        def call(self, x):
            return self.inner(x)

    assert keras_tkfac.wrap(Lazy(), exclude=["inner"]) is not None
    unbuilt = keras_tkfac.wrap(Lazy(), exclude=["other"])
    unbuilt.compile(optimizer=keras_tkfac.TKFAC(), loss="mse")
    with pytest.raises(ValueError, match=r"exclude names no layer.*'other'"):
        unbuilt.fit(np.zeros((4, 5), "float32"), np.zeros((4, 3), "float32"), verbose=0)


def test_register_block_for_a_custom_layer():
    class MyDense(keras.layers.Dense):
        pass

    model = keras.Sequential([keras.Input((5,)), MyDense(3)])
    assert keras_tkfac.wrap(model).blocks == []
    keras_tkfac.register_block(MyDense, keras_tkfac.blocks.DenseBlock)
    try:
        assert len(keras_tkfac.wrap(model).blocks) == 1
    finally:
        del keras_tkfac.blocks.BLOCKS[MyDense]
    with pytest.raises(ValueError, match="block_class"):
        keras_tkfac.register_block(MyDense, object)


def test_a_block_registered_after_wrap_counts_until_the_optimizer_is_built(
        monkeypatch, caplog):
    class MyDense(keras.layers.Dense):
        pass

    class OtherDense(keras.layers.Dense):
        pass

    inputs = keras.Input((5,))
    hidden = MyDense(4, name="mine")(inputs)
    model = keras_tkfac.wrap(keras.Model(inputs, OtherDense(3, name="other")(hidden)))
    assert model.blocks == []
    monkeypatch.setitem(keras_tkfac.blocks.BLOCKS, MyDense, keras_tkfac.blocks.DenseBlock)
    assert [b.name for b in model.blocks] == ["mine"]
    optimizer = keras_tkfac.TKFAC()
    model.compile(optimizer=optimizer, loss="mse")
    x, y = np.zeros((8, 5), "float32"), np.zeros((8, 3), "float32")
    model.fit(x, y, verbose=0)
    assert [b.name for b in optimizer._blocks] == ["mine"]
    # Too late for the built optimizer: the model keeps its blocks, and says so.
    monkeypatch.setitem(keras_tkfac.blocks.BLOCKS, OtherDense,
                        keras_tkfac.blocks.DenseBlock)
    with caplog.at_level("WARNING"):
        model.fit(x, y, verbose=0)
    assert [b.name for b in model.blocks] == ["mine"]
    assert "registered after the optimizer" in caplog.text


class _Checkpointed(keras.layers.Layer):
    """A Dense called inside `tf.recompute_grad` (gradient checkpointing)."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(units, activation="relu", name="inside")

    def call(self, x):
        return tf.recompute_grad(self.dense)(x)


def test_a_layer_inside_recompute_grad_says_its_curvature_is_not_recorded(caplog):
    # Its forward pass runs where no tape records: its output gradients would be
    # zeros. It is not recorded (its factors stay as they were) and says so; the
    # model still trains.
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,)), _Checkpointed(4), keras.layers.Dense(3)])
    wrapped = keras_tkfac.wrap(model)
    optimizer = keras_tkfac.TKFAC(seed=0, factor_update_freq=1)
    wrapped.compile(optimizer=optimizer,
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.random.default_rng(0).normal(size=(64, 5)).astype("float32")
    y = np.random.default_rng(1).integers(0, 3, 64)
    history = wrapped.fit(x, y, batch_size=32, epochs=3, shuffle=False, verbose=0)
    assert any("'inside' is called where no gradient tape records" in r.getMessage()
               for r in caplog.records)
    factors = {v.path.split("/")[-1]: v.numpy() for v in optimizer.variables}
    assert not np.any(factors["inside_n_phi"]) and not np.any(factors["inside_n_psi"])
    others = [v for k, v in factors.items() if k.endswith("_n_phi") and "inside" not in k]
    assert others and all(np.any(v) for v in others)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


def _lora_model():
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(8, activation="relu", name="base")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(hidden))


def test_lora_enabled_after_wrap_gets_its_lora_block_and_trains():
    keras.utils.set_random_seed(0)
    model = _lora_model()
    wrapped = keras_tkfac.wrap(model)
    assert [type(b) for b in wrapped.blocks] == [keras_tkfac.blocks.DenseBlock] * 2
    base = model.get_layer("base")
    base.enable_lora(2)
    frozen = base._kernel.numpy()
    optimizer = keras_tkfac.TKFAC()
    wrapped.compile(optimizer=optimizer,
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.random.default_rng(0).normal(size=(64, 6)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    losses = wrapped.fit(x, y, batch_size=16, epochs=3, verbose=0).history["loss"]
    # `B` and the bias in the LoRA block, `A` on the partner, `W_0` frozen.
    assert [type(b) for b in wrapped.blocks] == [
        lora_blocks.LoRADenseBlock, keras_tkfac.blocks.DenseBlock]
    assert wrapped.blocks[0].variables == [base.lora_kernel_b, base.bias]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert optimizer._partner_slots[optimizer._get_variable_index(base.lora_kernel_a)]
    for variable in (base.lora_kernel_b, base.bias):
        assert not optimizer._partner_slots[optimizer._get_variable_index(variable)]
    np.testing.assert_array_equal(base._kernel.numpy(), frozen)
    assert np.any(base.lora_kernel_b.numpy() != 0.0)
    # Enabled after the optimizer was built for the layer's kernel, then compiled
    # again with it (as Keras asks after changing what trains): an error that says
    # what to do, not a step misaligned with the optimizer's state.
    again = _lora_model()
    wrapped = keras_tkfac.wrap(again)
    built = keras_tkfac.TKFAC()
    wrapped.compile(optimizer=built, loss="mse")
    wrapped.fit(x, np.zeros((64, 3), "float32"), verbose=0)
    again.get_layer("base").enable_lora(2)
    with pytest.raises(ValueError, match=r"\['base'\] had LoRA enabled.*new optimizer"):
        wrapped.compile(optimizer=built, loss="mse")
    wrapped.compile(optimizer=keras_tkfac.TKFAC(), loss="mse")
    wrapped.fit(x, np.zeros((64, 3), "float32"), verbose=0)


def test_a_block_class_registered_again_records_with_the_new_block(monkeypatch):
    calls = []

    class CountingDense(keras_tkfac.blocks.DenseBlock):
        def record_call(self, call, inputs, *args, **kwargs):
            calls.append(self.name)
            return super().record_call(call, inputs, *args, **kwargs)

    model = keras_tkfac.wrap(_lora_model())
    assert [type(b) for b in model.blocks] == [keras_tkfac.blocks.DenseBlock] * 2
    monkeypatch.setitem(keras_tkfac.blocks.BLOCKS, keras.layers.Dense, CountingDense)
    model.compile(optimizer=keras_tkfac.TKFAC(), loss="mse")
    model.fit(np.zeros((8, 6), "float32"), np.zeros((8, 3), "float32"), verbose=0)
    assert [type(b) for b in model.blocks] == [CountingDense] * 2
    assert set(calls) == {"base", "head"}


def test_a_build_that_fails_part_way_leaves_nothing_half_made(monkeypatch):
    from keras_tkfac import shapes
    model = keras_tkfac.wrap(_lora_model())
    optimizer = keras_tkfac.TKFAC()
    optimizer.attach(model.blocks, owner=model)
    before = len(optimizer.variables)
    original = shapes.preconditionable

    def failing(*args, **kwargs):
        yield from list(original(*args, **kwargs))[:1]
        raise RuntimeError("a layer's weights are not variables")

    monkeypatch.setattr(shapes, "preconditionable", failing)
    with pytest.raises(RuntimeError, match="not variables"):
        optimizer.build(model.trainable_variables)
    assert not optimizer.built and len(optimizer.variables) == before
    monkeypatch.setattr(shapes, "preconditionable", original)
    optimizer.build(model.trainable_variables)
    fresh = keras_tkfac.TKFAC()
    fresh.attach(model.blocks, owner=None)
    fresh.build(model.trainable_variables)
    def names(o):
        return [v.path.split("/", 1)[1] for v in o.variables]
    assert names(optimizer) == names(fresh)


@pytest.mark.parametrize("case", ["dense_sequence", "einsum_heads",
                                  "einsum_output_projection", "dense_sequence_lora",
                                  "einsum_output_projection_lora"])
def test_sequence_rows_give_each_sequences_gradient(case):
    # `sequences=True` keeps the positions of a call on sequences as an axis:
    # `a_n^T g_n` is example n's gradient of the layer's weights (Keras's).
    model, layer, shape, x, y, tape, recording, y_pred, _ = _recorded(case, 2)
    block, a, g, m = _block_rows(model, layer, tape, recording, y, y_pred, sequences=True)
    assert a.ndim == 3 and a.shape[:2] == (3, shape[0]) and a.shape[2] == block.d_in
    assert g.shape == (3, shape[0], block.d_out)
    for n in range(m):
        np.testing.assert_allclose(a[n].T @ g[n], _example_gradient(model, block, x, y, n),
                                   rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("case", ["dense", "einsum_ellipsis", "conv2d_stride2_valid"])
def test_sequence_rows_of_one_position_per_example_are_rows(case):
    model, layer, _, x, y, tape, recording, y_pred, _ = _recorded(case, 2)
    _, a, g, _ = _block_rows(model, layer, tape, recording, y, y_pred, sequences=True)
    _, a_rows, g_rows, _ = _block_rows(model, layer, tape, recording, y, y_pred)
    np.testing.assert_array_equal(a, a_rows)
    np.testing.assert_array_equal(g, g_rows)


@pytest.mark.parametrize("case", ["dense_sequence", "einsum_output_projection"])
def test_sequence_statistics_are_the_exact_blocks_trace_and_partial_traces(case):
    # The specification's property 4 for the whole block of a layer on sequences,
    # positions' cross terms included (helpers.exact_fisher with cross_locations),
    # by both routes; the row expansion gives the location-uncorrelated block.
    model, layer, _, x, y, tape, recording, y_pred, _ = _recorded(case, 3)
    _, a, g, m = _block_rows(model, layer, tape, recording, y, y_pred, sequences=True)
    rows_a, rows_g = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
    example = np.repeat(np.arange(m), a.shape[1])
    exact = helpers.exact_fisher(rows_a, rows_g, example, m, cross_locations=True)
    tr_out, tr_in = helpers.partial_traces(exact, a.shape[-1], g.shape[-1])
    a64, g64 = tf.constant(a, tf.float64), tf.constant(g, tf.float64)
    for route in (None, "gradients", "grams"):
        delta, n_phi, n_psi = (t.numpy() for t in ops.tkfac_statistics_sequences(
            a64, g64, m, route=route))
        np.testing.assert_allclose(delta, np.trace(exact), rtol=1e-10)
        np.testing.assert_allclose(n_phi, tr_out, rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(n_psi, tr_in, rtol=1e-10, atol=1e-14)
    expanded = ops.tkfac_statistics(tf.constant(rows_a), tf.constant(rows_g), m)
    assert not np.isclose(expanded[0].numpy(), np.trace(exact), rtol=1e-3)


def test_calls_on_sequences_of_one_length_stay_sequences_others_become_rows():
    keras.utils.set_random_seed(0)
    shared = keras.layers.Dense(4, activation="tanh")
    for second_shape, expected in (((3, 5), (4, 3, 6)), ((2, 5), (10, 6)),
                                   ((5,), (8, 6))):
        first = keras.Input((3, 5))
        second = keras.Input(second_shape)
        pooled = [keras.layers.Flatten()(shared(first)),
                  keras.layers.Flatten()(shared(second))]
        outputs = keras.layers.Dense(3)(keras.layers.Concatenate()(pooled))
        model = keras_tkfac.wrap(keras.Model([first, second], outputs))
        rng = np.random.default_rng(0)
        x = [rng.normal(size=(2, 3, 5)).astype("float32"),
             rng.normal(size=(2, *second_shape)).astype("float32")]
        y = np.array([0, 1])
        tape, recording, y_pred, loss = _record(model, x, y)
        block, a, g, m = _block_rows(model, shared, tape, recording, y, y_pred,
                                     sequences=True)
        assert a.shape == expected
        # Either way the rows' sum of a g^T is Keras's gradient.
        keras_grads = tape.gradient(loss, block.variables)
        matrix = block.grad_matrix(*keras_grads).numpy()
        rows_a, rows_g = a.reshape(-1, 6), g.reshape(-1, 4)
        np.testing.assert_allclose(rows_a.T @ rows_g / m, matrix, rtol=1e-4, atol=1e-6)
