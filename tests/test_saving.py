"""Saving and restoring the wrapping and every optimizer variable."""

import random

import numpy as np
import pytest
import tensorflow as tf
import keras

import keras_tkfac
from tests import helpers

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _trained(cls=keras_tkfac.TKFAC, steps=3):
    x, y = helpers.classification_data(n=48)
    model = keras_tkfac.wrap(helpers.tiny_mlp())
    model.compile(
        optimizer=cls(factor_update_freq=2, inverse_update_freq=2, seed=5), loss=LOSS
    )
    model.fit(x, y, batch_size=16, epochs=1, steps_per_epoch=steps, shuffle=False,
              verbose=0)
    return model, x, y


def _assert_same_state(model, other):
    for a, b in zip(model.weights, other.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert len(model.optimizer.variables) == len(other.optimizer.variables)
    for a, b in zip(model.optimizer.variables, other.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize("cls", [keras_tkfac.TKFAC, keras_tkfac.KFAC])
def test_keras_file_round_trip_and_continued_training(cls, tmp_path):
    model, x, y = _trained(cls)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, keras_tkfac.CurvatureModel)
    assert [b.name for b in loaded.blocks] == [b.name for b in model.blocks]
    assert type(loaded.optimizer) is cls
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    _assert_same_state(model, loaded)
    factors_before = [v.numpy() for v in loaded.optimizer._slots[0].factors]
    for m in (model, loaded):
        m.fit(x, y, batch_size=16, epochs=1, steps_per_epoch=3, shuffle=False, verbose=0)
    # Curvature keeps being updated after loading, exactly as without the round trip.
    assert not np.allclose(loaded.optimizer._slots[0].factors[1].numpy(), factors_before[1])
    _assert_same_state(model, loaded)


def test_keras_file_loads_in_safe_mode(tmp_path):
    model, _, _ = _trained()
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    _assert_same_state(model, loaded)


def test_tf_train_checkpoint_round_trip(tmp_path):
    model, x, y = _trained()
    checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
    path = checkpoint.save(str(tmp_path / "ckpt"))
    fresh = keras_tkfac.wrap(helpers.tiny_mlp(seed=9))
    fresh.compile(optimizer=keras_tkfac.TKFAC(factor_update_freq=2, inverse_update_freq=2,
                                              seed=5), loss=LOSS)
    fresh.optimizer.build(fresh.trainable_variables)
    tf.train.Checkpoint(model=fresh, optimizer=fresh.optimizer).restore(path).assert_consumed()
    _assert_same_state(model, fresh)


class _StopAt(keras.callbacks.Callback):
    """Simulates a crash at the start of a given epoch."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise RuntimeError("injected failure")


@pytest.mark.parametrize("seed", [5, None])
def test_backup_and_restore_resumes_with_curvature_state(seed, tmp_path):
    # With `seed=None` each optimizer draws its sampler's seed; the resumed one
    # takes the interrupted one's from the backup (`sampler_seed`), so it ends as
    # an uninterrupted run with that seed.
    x, y = helpers.classification_data(n=32)

    def fresh_model(seed, process=0):
        model = keras_tkfac.wrap(helpers.tiny_mlp())
        random.seed(process)  # (as another process draws another seed)
        model.compile(optimizer=keras_tkfac.TKFAC(factor_update_freq=3,
                                                  inverse_update_freq=5, seed=seed),
                      loss=LOSS)
        return model

    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    interrupted = fresh_model(seed, process=1)
    with pytest.raises(RuntimeError, match="injected"):
        interrupted.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0,
                        callbacks=[backup, _StopAt(2)])
    reference = fresh_model(interrupted.optimizer.seed)
    reference.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0)
    resumed = fresh_model(seed, process=2)
    if seed is None:
        assert resumed.optimizer.seed != interrupted.optimizer.seed
    resumed.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0, callbacks=[backup])
    assert int(resumed.optimizer.iterations.numpy()) == 12
    for a, b in zip(reference.optimizer.variables, resumed.optimizer.variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7)
    for a, b in zip(reference.weights, resumed.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7)


def test_excluded_layer_names_and_classes_survive_saving(tmp_path):
    x, y = helpers.classification_data(n=16)
    base = keras.Sequential([
        keras.Input((5,)), keras.layers.Dense(4, name="first"),
        keras.layers.LayerNormalization(),
        keras.layers.Reshape((4, 1)),
        keras.layers.Conv1D(2, 2), keras.layers.Flatten(),
        keras.layers.Dense(3, name="last")])
    model = keras_tkfac.wrap(base, exclude=["first", keras.layers.Conv1D])
    assert [b.name for b in model.blocks] == ["last"]
    model.compile(optimizer=keras_tkfac.TKFAC(seed=0), loss=LOSS)
    model.fit(x, y, epochs=1, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert [b.name for b in loaded.blocks] == ["last"]
    _assert_same_state(model, loaded)


@keras.saving.register_keras_serializable(package="keras_tkfac_tests")
class RegisteredDense(keras.layers.Dense):
    pass


def test_layer_kind_registered_with_register_block_survives_saving(tmp_path):
    x, y = helpers.classification_data(n=16)
    keras.utils.set_random_seed(0)
    base = keras.Sequential([keras.Input((5,)), RegisteredDense(4, name="custom"),
                             keras.layers.Dense(3)])
    keras_tkfac.register_block(RegisteredDense, keras_tkfac.blocks.DenseBlock)
    try:
        model = keras_tkfac.wrap(base)
        model.compile(optimizer=keras_tkfac.TKFAC(seed=0), loss=LOSS)
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)
        assert len(model.optimizer._slots) == 2
        path = str(tmp_path / "model.keras")
        model.save(path)
    finally:
        del keras_tkfac.blocks.BLOCKS[RegisteredDense]
    # Without the registration the optimizer's state cannot be restored: say so.
    with pytest.raises(ValueError, match=r"register_block\(.*DenseBlock") as error:
        keras.models.load_model(path)
    assert "custom" in str(error.value)
    keras_tkfac.register_block(RegisteredDense, keras_tkfac.blocks.DenseBlock)
    try:
        loaded = keras.models.load_model(path)
    finally:
        del keras_tkfac.blocks.BLOCKS[RegisteredDense]
    assert int(loaded.optimizer.iterations.numpy()) == 2
    _assert_same_state(model, loaded)


def _two_heads():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,), name="features")
    h = keras.layers.Dense(4, activation="tanh")(inputs)
    return keras.Model(inputs, {"cls": keras.layers.Dense(3, name="cls")(h),
                                "reg": keras.layers.Dense(1, name="reg")(h)})


def test_dict_outputs_resume_from_a_keras_file_as_if_uninterrupted(tmp_path):
    # Named inputs, a dict of outputs with a dict of losses and loss weights: a
    # model saved after one epoch, loaded and trained another equals the model
    # trained two epochs without the round trip, weights and optimizer variables.
    x, y = helpers.classification_data(n=48)
    inputs = {"features": x}
    targets = {"cls": y, "reg": x[:, :1] * 2.0}

    def compiled():
        model = keras_tkfac.wrap(_two_heads())
        model.compile(optimizer=keras_tkfac.TKFAC(factor_update_freq=2,
                                                  inverse_update_freq=2, seed=5),
                      loss={"cls": LOSS, "reg": "mse"},
                      loss_weights={"cls": 1.0, "reg": 0.5})
        return model

    def epoch(model):
        model.fit(inputs, targets, batch_size=16, epochs=1, shuffle=False, verbose=0)

    uninterrupted = compiled()
    epoch(uninterrupted)
    epoch(uninterrupted)
    first = compiled()
    epoch(first)
    path = str(tmp_path / "heads.keras")
    first.save(path)
    resumed = keras.models.load_model(path)
    epoch(resumed)
    assert int(resumed.optimizer.iterations.numpy()) == 6
    _assert_same_state(uninterrupted, resumed)


@keras.saving.register_keras_serializable(package="keras_tkfac_tests")
class _SubclassedMLP(keras.Model):
    """Its layers take Keras's automatic names, which depend on how many layers the
    process created before it."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(4, activation="tanh")
        self.out = keras.layers.Dense(3)

    def call(self, inputs):
        return self.out(self.hidden(inputs))


def test_a_subclassed_model_loads_where_its_layers_get_other_names(tmp_path):
    """Saved after other layers were made (so its `Dense` layers were `dense_k`,
    `dense_k+1`) and loaded where the name counters start afresh (another process;
    here `clear_session`), the model gets other layer names. Loading matched the
    saved blocks to the new layers by name and raised a `ValueError` that blamed a
    missing `register_block`; Adam's model loads. The blocks now match by layer
    class, and the optimizer's state is restored."""
    x, y = helpers.classification_data(n=48)
    helpers.tiny_mlp(), helpers.tiny_mlp()  # earlier layers: the names move on
    keras.utils.set_random_seed(0)
    model = keras_tkfac.wrap(_SubclassedMLP())
    model.compile(optimizer=keras_tkfac.TKFAC(factor_update_freq=2, seed=5), loss=LOSS)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    saved_names = [block.layer.name for block in model.blocks]
    path = str(tmp_path / "model.keras")
    model.save(path)
    keras.backend.clear_session()
    loaded = keras.models.load_model(path)
    assert [block.layer.name for block in loaded.blocks] != saved_names
    assert [type(block) for block in loaded.blocks] == [type(b) for b in model.blocks]
    _assert_same_state(model, loaded)


def test_an_excluded_layer_is_found_again_where_its_name_differs(tmp_path):
    """`exclude=[model.hidden.name]` names a layer by its automatic name; the file
    keeps the layer's position among the model's layers and its class, so loading
    where the names differ (`clear_session`) excludes the same layer instead of
    raising that no layer has the saved name."""
    x, y = helpers.classification_data(n=48)
    helpers.tiny_mlp()  # earlier layers: the names move on
    keras.utils.set_random_seed(0)
    inner = _SubclassedMLP()
    inner(x[:1])
    model = keras_tkfac.wrap(inner, exclude=[inner.hidden.name])
    model.compile(optimizer=keras_tkfac.TKFAC(factor_update_freq=2, seed=5), loss=LOSS)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    keras.backend.clear_session()
    loaded = keras.models.load_model(path)
    assert loaded.model.hidden.name != inner.hidden.name
    assert [block.layer for block in loaded.blocks] == [loaded.model.out]
    _assert_same_state(model, loaded)


def test_a_block_registered_after_saving_leaves_its_layer_to_the_partner_on_load(
        tmp_path, monkeypatch, caplog):
    """Saved with its LayerNormalization on the partner, loaded where
    `register_normalization_blocks()` was called: the LayerNormalization would get
    a block, the optimizer more variables than the file holds, and Keras would skip
    loading all of them (training restarting from step 0, with only Keras's
    warning). It keeps the partner, with a warning, and the state is restored."""
    x, y = helpers.classification_data(n=48)
    keras.utils.set_random_seed(0)
    base = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4),
                             keras.layers.LayerNormalization(name="norm"),
                             keras.layers.Dense(3)])
    model = keras_tkfac.wrap(base)
    model.compile(optimizer=keras_tkfac.TKFAC(factor_update_freq=2, seed=5), loss=LOSS)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    for layer_class, block_class in keras_tkfac.blocks.NORMALIZATION_BLOCKS.items():
        monkeypatch.setitem(keras_tkfac.blocks.BLOCKS, layer_class, block_class)
    with caplog.at_level("WARNING"):
        loaded = keras.models.load_model(path)
    assert "norm have a curvature block now but had none" in caplog.text
    assert [b.layer.name for b in loaded.blocks] == [b.layer.name for b in model.blocks]
    assert int(loaded.optimizer.iterations.numpy()) == 3
    _assert_same_state(model, loaded)
    # Wrapped anew with a new optimizer, the layer is preconditioned.
    again = keras_tkfac.wrap(loaded.model)
    assert "norm" in [b.layer.name for b in again.blocks]


def test_files_without_block_positions_match_blocks_by_name(monkeypatch):
    """Files written before the blocks' positions were saved: layers covered now
    but not in the file are found by name while the names match, and nothing is
    left out where they do not (there is nothing to match them by)."""
    keras.utils.set_random_seed(0)
    base = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, name="first"),
                             keras.layers.LayerNormalization(name="norm"),
                             keras.layers.Dense(3, name="last")])
    saved = [{"layer": "first"}, {"layer": "last"}]
    for layer_class, block_class in keras_tkfac.blocks.NORMALIZATION_BLOCKS.items():
        monkeypatch.setitem(keras_tkfac.blocks.BLOCKS, layer_class, block_class)
    assert keras_tkfac.finding.unsaved_layers(base, (), saved) == ["norm"]
    renamed = [{"layer": "dense_7"}, {"layer": "dense_8"}]
    assert keras_tkfac.finding.unsaved_layers(base, (), renamed) == []
    positions = keras_tkfac.finding.layer_positions(base)
    with_positions = [{"layer": "dense_7", "position": positions[id(base.layers[0])]},
                      {"layer": "dense_8", "position": positions[id(base.layers[2])]}]
    assert keras_tkfac.finding.unsaved_layers(base, (), with_positions) == ["norm"]
