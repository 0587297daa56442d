"""LoRA adapters (`layer.enable_lora`) trained through their blocks
(`keras_tkfac.lora_blocks`). The rows' oracles (Keras's gradients, per example and
summed; the recording call against Keras's own `call`) are in `test_capture.py`."""

import logging as std_logging

from absl import logging
import numpy as np
import pytest
import keras

import keras_tkfac
from keras_tkfac import lora_blocks


def _fine_tuning_model():
    """A dense layer and an attention layer, LoRA on the dense layer and on the
    attention's query and value projections (one `B` per head, their biases on
    the partner), the rest frozen but a new head."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 6))
    dense = keras.layers.Dense(8, activation="relu", name="adapted")
    attention = keras.layers.MultiHeadAttention(2, 4, name="attention")
    h = dense(inputs)
    h = attention(h, h)
    outputs = keras.layers.Dense(3, name="head")(keras.layers.Flatten()(h))
    model = keras.Model(inputs, outputs)
    dense.enable_lora(2)
    for projection in (attention._query_dense, attention._value_dense):
        projection.enable_lora(2)
    for projection in (attention._key_dense, attention._output_dense):
        projection.trainable = False
    rng = np.random.default_rng(0)
    for layer in (dense, attention._query_dense, attention._value_dense):
        layer.bias.assign(rng.normal(size=layer.bias.shape) * 0.3)
    return model, dense, attention


@pytest.mark.parametrize("name", ["TKFAC", "KFAC"])
def test_lora_adapters_train_through_their_blocks_in_forward_mode(name, caplog):
    model, dense, attention = _fine_tuning_model()
    frozen = [v.numpy() for v in model.non_trainable_variables]
    before = {v.path: v.numpy() for v in model.trainable_variables}
    wrapped = keras_tkfac.wrap(model)
    kinds = {b.name: type(b) for b in wrapped.blocks}
    assert kinds["adapted"] is lora_blocks.LoRADenseBlock
    assert kinds["query"] is kinds["value"] is lora_blocks.LoRAEinsumDenseBlock
    # `B` and the dense layer's bias in blocks; the heads' biases on the partner.
    assert wrapped.blocks[[b.name for b in wrapped.blocks].index("query")].variables == [
        attention._query_dense.lora_kernel_b]
    optimizer = getattr(keras_tkfac, name)()
    wrapped.compile(optimizer=optimizer,
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.random.default_rng(1).normal(size=(64, 4, 6)).astype("float32")
    y = (x[:, 0, 0] > 0).astype("int32")
    logging.get_absl_logger().propagate = True
    with caplog.at_level(std_logging.INFO):
        losses = wrapped.fit(x, y, batch_size=16, epochs=3, verbose=0).history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    # Forward mode passes Keras's merged kernel `W_0 + s A B`.
    assert not [r for r in caplog.records if "products failed" in r.getMessage()]
    # Every trainable variable moved (a block that left its layer's bias to the
    # partner once dropped it from the output, so it got no gradient), the
    # frozen ones did not.
    for variable in model.trainable_variables:
        assert np.any(variable.numpy() != before[variable.path]), variable.path
    for variable, value in zip(model.non_trainable_variables, frozen):
        np.testing.assert_array_equal(variable.numpy(), value)
    for variable in (dense.lora_kernel_a, attention._query_dense.lora_kernel_a,
                     attention._query_dense.bias):
        assert optimizer._partner_slots[optimizer._get_variable_index(variable)]


def test_lora_fine_tuning_tool_runs_each_configuration():
    """`tools/lora_fine_tuning.py`'s runs, on its smoke data: with no LoRA block
    every adapter weight is on the partner, which is then `Adam(1e-3)` exactly
    (the weights, batches and shuffling are the same); the two blocks' runs are
    finite and the LoRA blocks are restored afterwards."""
    import sys  # pylint: disable=import-outside-toplevel
    from tests.test_examples import _ROOT  # pylint: disable=import-outside-toplevel
    sys.path.insert(0, str(_ROOT / "tools"))
    import lora_fine_tuning  # pylint: disable=import-outside-toplevel
    before = dict(lora_blocks.LORA_BLOCKS)
    results = lora_fine_tuning.run("digits", 2, smoke=True)
    assert set(results) == set(lora_fine_tuning.RUNS)
    assert all(np.all(np.isfinite(v)) for v in results.values())
    np.testing.assert_allclose(results["TKFAC, partner only"], results["Adam 1e-3"],
                               rtol=1e-5)
    assert results["TKFAC, block on B"] != results["Adam 1e-3"]
    assert lora_blocks.LORA_BLOCKS == before


def _embedding_model():
    keras.utils.set_random_seed(0)
    embedding = keras.layers.Embedding(50, 8, name="tokens")
    inputs = keras.Input((5,), dtype="int32")
    h = keras.layers.GlobalAveragePooling1D()(embedding(inputs))
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(h))
    embedding.enable_lora(2)
    embedding.lora_embeddings_b.assign(
        np.random.default_rng(3).normal(size=(2, 8)).astype("float32"))
    return model, embedding


def test_an_embeddings_lora_rows_give_keras_gradient_of_b():
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    model, embedding = _embedding_model()
    wrapped = keras_tkfac.wrap(model)
    block = wrapped.blocks[[b.name for b in wrapped.blocks].index("tokens")]
    assert type(block) is lora_blocks.LoRAEmbeddingBlock
    assert block.variables == [embedding.lora_embeddings_b]
    rng = np.random.default_rng(1)
    ids = tf.constant(rng.integers(0, 50, size=(6, 5)), tf.int32)
    y = rng.integers(0, 3, size=(6,))
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with tf.GradientTape(persistent=True) as tape:
        with keras_tkfac.record(wrapped) as recording:
            recorded = embedding(ids)
            loss = loss_fn(y, wrapped(ids, training=True))
    # The recording call computes Keras's own lookup of the merged embeddings.
    np.testing.assert_allclose(recorded.numpy(),
                               type(embedding).call(embedding, ids).numpy(),
                               rtol=1e-6, atol=1e-7)
    index = [b.layer for b in recording.blocks].index(embedding)
    output_grads = tape.gradient(loss, recording.outputs())
    a, g = recording.rows(output_grads)[index]
    # (The direct call is off the loss's path: its rows add nothing.)
    expected = tape.gradient(loss, embedding.lora_embeddings_b).numpy()
    np.testing.assert_allclose(a.numpy().T @ g.numpy(), expected, rtol=1e-4, atol=1e-7)
    a_seq, g_seq = recording.rows(output_grads, sequences=True)[index]
    assert a_seq.shape[-1] == 2 and g_seq.shape[-1] == 8


def test_an_embeddings_lora_trains_with_its_block():
    model, embedding = _embedding_model()
    frozen = embedding._embeddings.numpy()
    before = [v.numpy() for v in (embedding.lora_embeddings_a,
                                  embedding.lora_embeddings_b)]
    wrapped = keras_tkfac.wrap(model)
    wrapped.compile(optimizer=keras_tkfac.TKFAC(),
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 50, size=(64, 5)).astype("int32")
    y = (ids[:, 0] % 3).astype("int32")
    losses = wrapped.fit(ids, y, batch_size=16, epochs=3, verbose=0).history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    np.testing.assert_array_equal(embedding._embeddings.numpy(), frozen)
    for variable, value in zip((embedding.lora_embeddings_a,
                                embedding.lora_embeddings_b), before):
        assert np.any(variable.numpy() != value)


@pytest.mark.parametrize("kwargs", [{}, {"conv_location_stride": 2}])
def test_a_convolutions_lora_trains_with_its_block(kwargs):
    # (Its rows against Keras's gradients: `tests/test_capture.py`'s conv LoRA
    # cases; here the statistics, which square the projected rows, and a `fit`.)
    keras.utils.set_random_seed(0)
    conv = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")
    inputs = keras.Input((8, 8, 2))
    h = keras.layers.GlobalAveragePooling2D()(conv(inputs))
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(h))
    conv.enable_lora(2)
    frozen = conv._kernel.numpy()
    before = {v.path: v.numpy() for v in model.trainable_variables}
    wrapped = keras_tkfac.wrap(model)
    assert type(wrapped.blocks[0]) is lora_blocks.LoRAConvBlock
    optimizer = keras_tkfac.TKFAC(**kwargs)
    wrapped.compile(optimizer=optimizer,
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.random.default_rng(2).normal(size=(64, 8, 8, 2)).astype("float32")
    y = (x[:, :4, :, 0].mean(axis=(1, 2)) > 0).astype("int32")
    losses = wrapped.fit(x, y, batch_size=16, epochs=3, verbose=0).history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    np.testing.assert_array_equal(conv._kernel.numpy(), frozen)
    for variable in model.trainable_variables:
        assert np.any(variable.numpy() != before[variable.path]), variable.path
    factors = [v.numpy() for v in optimizer.variables if "conv" in v.path
               and "phi" in v.path]
    assert factors and all(np.all(np.isfinite(f)) and np.any(f) for f in factors)


def test_a_lora_layer_saved_before_its_block_keeps_the_partner_on_load(
        tmp_path, monkeypatch, caplog):
    """A `.keras` file written while LoRA layers were declined (before 2026-12-06:
    emulated by emptying `LORA_BLOCKS`) loads with the layer on the partner, the
    optimizer's state restored, and a warning that says how to precondition it."""
    # (Dense layers only: Keras rebuilds attention's projections from the
    # attention layer's config, without their LoRA.)
    keras.utils.set_random_seed(0)
    dense = keras.layers.Dense(8, activation="relu", name="adapted")
    model = keras.Sequential([keras.Input((4, 6)), dense, keras.layers.Flatten(),
                              keras.layers.Dense(3, name="head")])
    dense.enable_lora(2)
    monkeypatch.setattr(lora_blocks, "LORA_BLOCKS", {})
    wrapped = keras_tkfac.wrap(model)
    wrapped.compile(optimizer=keras_tkfac.TKFAC(),
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.random.default_rng(1).normal(size=(32, 4, 6)).astype("float32")
    wrapped.fit(x, (x[:, 0, 0] > 0).astype("int32"), batch_size=16, verbose=0)
    path = str(tmp_path / "model.keras")
    wrapped.save(path)
    monkeypatch.undo()
    assert lora_blocks.LORA_BLOCKS
    with caplog.at_level("WARNING"):
        loaded = keras.saving.load_model(path)
    assert "have a curvature block now but had none" in caplog.text
    assert [b.name for b in loaded.blocks] == [b.name for b in wrapped.blocks]
    assert not any(isinstance(b, lora_blocks.LoRADenseBlock) for b in loaded.blocks)
    for saved, restored in zip(wrapped.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(saved.numpy(), restored.numpy())
