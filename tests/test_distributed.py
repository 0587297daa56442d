"""MirroredStrategy on two logical CPU devices against single-device runs."""

import numpy as np
import pytest
import tensorflow as tf
import keras

import keras_tkfac
from keras_tkfac import damping
from keras_tkfac import linearized
from keras_tkfac import quadratic
from keras_tkfac import row_sparse
from keras_tkfac import step_size
from tests import helpers

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _mlp():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="tanh"),
                             keras.layers.Dense(3)])


def _convnet():
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((6, 6, 2)),
        keras.layers.Conv2D(4, 3, padding="same", activation="relu"),
        keras.layers.Conv2D(4, 3, strides=2, activation="tanh"),
        keras.layers.Flatten(),
        keras.layers.Dense(3),
    ])


def _data(shape, n=128):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, *shape)).astype("float32")
    return x, rng.integers(0, 3, size=(n,)).astype("int32")


def _replica_values(variable):
    value = variable.value
    return [v.numpy() for v in getattr(value, "values", (value,))]


def _train(strategy, build, x, y, optimizer_fn, epochs=3, batch_size=32):
    with strategy.scope():
        model = keras_tkfac.wrap(build())
        model.compile(optimizer=optimizer_fn(), loss=LOSS)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)
    model.fit(dataset, epochs=epochs, shuffle=False, verbose=0)
    return model


def _assert_identical_on_replicas(model):
    for variable in list(model.weights) + list(model.optimizer.variables):
        values = _replica_values(variable)
        for other in values[1:]:
            np.testing.assert_array_equal(other, values[0], err_msg=variable.path)


def _assert_matches_one_device(single, replicated):
    """The replicated run's weights and optimizer state are the same on every
    replica and equal the single-device run's (up to float32 summation order)."""
    _assert_identical_on_replicas(replicated)
    for a, b in zip(single.weights, replicated.weights):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-4, atol=1e-5)
    for a, b in zip(single.optimizer.variables, replicated.optimizer.variables):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-4, atol=1e-5,
                                   err_msg=a.path)


def _replica_cases():
    """Every step control x optimizer x model; `make test` runs the default step
    control's TKFAC on both models and KFAC on the convnet (its convolution damping
    is KFAC's own), the rest (the same all-reduces) in `make test-all`."""
    fast = {("graft_quadratic", "TKFAC", "mlp"), ("graft_quadratic", "TKFAC", "convnet"),
            ("graft_quadratic", "KFAC", "convnet")}
    for step_control in ["graft_quadratic", "graft"]:
        for cls in [keras_tkfac.TKFAC, keras_tkfac.KFAC]:
            for name, build, shape in [("mlp", _mlp, (8,)), ("convnet", _convnet, (6, 6, 2))]:
                key = (step_control, cls.__name__, name)
                yield pytest.param(build, shape, cls, step_control, id="-".join(key),
                                   marks=() if key in fast else pytest.mark.slow)


@pytest.mark.parametrize("build,shape,cls,step_control", list(_replica_cases()))
def test_two_replicas_match_one_device(mirrored, build, shape, cls, step_control):
    x, y = _data(shape, n=256)

    def optimizer():
        return cls(fisher="empirical", step_control=step_control, factor_update_freq=2,
                   inverse_update_freq=3, seed=0)

    single = _train(tf.distribute.get_strategy(), build, x, y, optimizer)
    replicated = _train(mirrored, build, x, y, optimizer)
    assert replicated.distribute_strategy.num_replicas_in_sync == 2
    # 24 steps; the two runs differ only in float32 summation order (per-replica
    # partial sums), ~1e-7 relative per reduction, amplified by training.
    _assert_matches_one_device(single, replicated)


def test_sampled_conv_locations_under_mirrored_strategy_match_one_device(mirrored):
    # TKFAC's default `conv_location_stride=2`: example n of the global batch takes
    # grid phase `phase + n` on one device; on a replica its local index is offset
    # by the examples of the replicas before it, so the rows are the same. Batches
    # of 30 (15 a replica, not a multiple of the 4 phases of a 2-D grid).
    x, y = _data((6, 6, 2), n=240)

    def optimizer():
        return keras_tkfac.TKFAC(fisher="empirical", factor_update_freq=2,
                                 inverse_update_freq=3, seed=0)

    single = _train(tf.distribute.get_strategy(), _convnet, x, y, optimizer,
                    batch_size=30)
    replicated = _train(mirrored, _convnet, x, y, optimizer, batch_size=30)
    assert single.optimizer.conv_location_stride == 2
    _assert_matches_one_device(single, replicated)


def _normed():
    """A LayerNormalization between Dense layers: its scale and offset take the Adam
    partner."""
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="tanh"),
                             keras.layers.LayerNormalization(), keras.layers.Dense(3)])


def test_partner_under_mirrored_strategy_matches_one_device(mirrored):
    x, y = _data((8,), n=256)

    def optimizer():
        return keras_tkfac.TKFAC(fisher="empirical", factor_update_freq=2,
                                 inverse_update_freq=3, seed=0)

    single = _train(tf.distribute.get_strategy(), _normed, x, y, optimizer)
    replicated = _train(mirrored, _normed, x, y, optimizer)
    assert any("partner_v" in v.path for v in replicated.optimizer.variables)
    _assert_matches_one_device(single, replicated)


def _embedded():
    """An embedding (its gradient `tf.IndexedSlices`, its step on the batch's rows,
    `row_sparse`) under a Dense head."""
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((6,), dtype="int32"),
                             keras.layers.Embedding(50, 4),
                             keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(3)])


@pytest.mark.parametrize("step_control", ["graft_quadratic", "graft"])
def test_embedding_rows_under_mirrored_strategy_match_one_device(
        mirrored, step_control, monkeypatch):
    made = []
    real = row_sparse.from_slices
    monkeypatch.setattr(row_sparse, "from_slices",
                        lambda *args: made.append(args) or real(*args))
    rng = np.random.default_rng(0)
    x = rng.integers(0, 50, size=(256, 6)).astype("int32")
    y = rng.integers(0, 3, size=(256,)).astype("int32")

    def optimizer():
        return keras_tkfac.TKFAC(fisher="empirical", step_control=step_control,
                                 factor_update_freq=2, inverse_update_freq=3, seed=0)

    single = _train(tf.distribute.get_strategy(), _embedded, x, y, optimizer)
    traced = len(made)
    replicated = _train(mirrored, _embedded, x, y, optimizer)
    assert traced and len(made) > traced  # the rows' path, traced in both runs
    _assert_identical_on_replicas(replicated)
    for a, b in zip(single.weights + single.optimizer.variables,
                    replicated.weights + replicated.optimizer.variables):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-4, atol=1e-5,
                                   err_msg=a.path)


def test_true_fisher_under_mirrored_strategy_keeps_replicas_identical(mirrored):
    x, y = _data((8,), n=256)
    model = _train(mirrored, _mlp, x, y,
                   lambda: keras_tkfac.TKFAC(seed=0, step_control="trust_region"),
                   epochs=4)
    _assert_identical_on_replicas(model)
    assert model.evaluate(x, y, verbose=0) < 1.0


def test_split_inverses_equal_unsplit(mirrored, monkeypatch):
    from keras_tkfac import inverses as inverses_lib

    inverted = []
    real = inverses_lib.inverse_for_device

    def counting():
        invert = real()

        def wrapper(matrices, dtype):
            inverted.append(int(matrices.shape[0]))
            return invert(matrices, dtype)

        return wrapper

    monkeypatch.setattr(inverses_lib, "inverse_for_device", counting)
    x, y = _data((6, 6, 2))
    factors = 2 * 3  # three layers, two factors each
    models = []
    for split in (True, False):
        inverted.clear()
        models.append(
            _train(mirrored, _convnet, x, y,
                   lambda split=split: keras_tkfac.TKFAC(
                       fisher="empirical", split_inverses=split,
                       inverse_update_freq=2, seed=0)))
        # Traced once per replica: split, the replicas share the factors between
        # them; unsplit, each inverts all of them.
        assert sum(inverted) == (factors if split else 2 * factors)
    for a, b in zip(models[0].optimizer.variables, models[1].optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


def test_split_work_balances_cost():
    from keras_tkfac import distributed

    owner = distributed.split_work([8, 1, 1, 1, 1, 8, 4, 4], 2)
    loads = [sum(c for c, o in zip([8, 1, 1, 1, 1, 8, 4, 4], owner) if o == r)
             for r in range(2)]
    assert loads == [14, 14]
    assert distributed.split_work([5, 3], 1) == [0, 0]


def test_checkpoints_move_between_strategy_and_one_device(mirrored, tmp_path):
    x, y = _data((8,))
    replicated = _train(mirrored, _mlp, x, y, lambda: keras_tkfac.TKFAC(seed=0))
    path = str(tmp_path / "mirrored.keras")
    replicated.save(path)
    single = keras.models.load_model(path)
    for a, b in zip(replicated.weights + replicated.optimizer.variables,
                    single.weights + single.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    single.fit(x, y, batch_size=32, epochs=1, verbose=0)
    path = str(tmp_path / "single.keras")
    single.save(path)
    with mirrored.scope():
        restored = keras.models.load_model(path)
    for a, b in zip(single.weights + single.optimizer.variables,
                    restored.weights + restored.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    restored.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(32), epochs=1,
                 shuffle=False, verbose=0)
    _assert_identical_on_replicas(restored)


def test_multi_worker_workarounds_do_nothing_elsewhere(mirrored):
    from keras_tkfac import keras_compat

    logs = {"loss": tf.constant(1.5)}
    assert keras_compat.multi_worker_logs(logs) is logs
    assert not keras_compat.is_multi_worker(mirrored)
    assert not keras_compat.is_multi_worker(tf.distribute.get_strategy())


@pytest.mark.parametrize("step_control, adaptive, model_update_freq", [
    ("quadratic", False, 1),
    # The adaptive damping's case below covers this one's all-reduces.
    pytest.param("graft_quadratic", False, 1, marks=pytest.mark.slow),
    ("graft_quadratic", True, 1), ("graft_quadratic", True, 2)])
def test_quadratic_step_under_mirrored_strategy_matches_one_device(
        mirrored, step_control, adaptive, model_update_freq, monkeypatch):
    # The exact curvature products are per replica's batch, then averaged; so are
    # the losses that adapt the damping. With `model_update_freq=2` (no warm-up
    # here) the model, all-reduce included, runs inside a `tf.cond` on every
    # other step. The loss-relative damping acts from the start (its peak is of
    # the all-reduced loss).
    monkeypatch.setattr(quadratic, "MODEL_WARMUP", 0)
    monkeypatch.setattr(damping, "LOSS_RELATIVE_ONSET", 1.0)
    x, y = _data((8,), n=128)

    def optimizer():
        return keras_tkfac.TKFAC(fisher="empirical", step_control=step_control,
                                 adaptive_damping=adaptive, factor_update_freq=2,
                                 inverse_update_freq=3,
                                 model_update_freq=model_update_freq, seed=0)

    single = _train(tf.distribute.get_strategy(), _mlp, x, y, optimizer, epochs=2)
    replicated = _train(mirrored, _mlp, x, y, optimizer, epochs=2)
    _assert_identical_on_replicas(replicated)
    moved = [np.abs(w.numpy() - v).max()
             for w, v in zip(single.weights, _mlp().get_weights())]
    assert max(moved) > 1e-3
    for a, b in zip(single.weights, replicated.weights):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-4, atol=1e-5)
    if adaptive:
        scale = float(single.optimizer.damping_scale.numpy())
        assert scale != 1.0
        np.testing.assert_allclose(_replica_values(
            replicated.optimizer.damping_scale)[0], scale, rtol=1e-5)
    peak = float(single.optimizer.loss_peak.numpy())
    assert peak > 0.0
    for value in _replica_values(replicated.optimizer.loss_peak):
        np.testing.assert_allclose(value, peak, rtol=1e-5)


def test_a_batch_split_unevenly_keeps_replicas_identical(mirrored):
    # 129 examples at batch 32 end on a batch of one example, which two replicas
    # split as one and none; 131 end on three, split two and one. Whether the model
    # of a batch is trusted (`quadratic.MIN_TRUSTED_TERMS`) is decided on the
    # replicas' terms together, so every replica takes the same step.
    for n in (129, 131):
        x, y = _data((8,), n=n)
        model = _train(mirrored, _mlp, x, y,
                       lambda: keras_tkfac.TKFAC(fisher="empirical", seed=0), epochs=2)
        _assert_identical_on_replicas(model)
        assert all(np.all(np.isfinite(w.numpy())) for w in model.weights)


def test_the_linearized_check_under_mirrored_strategy_matches_one_device(
        mirrored, monkeypatch):
    # The classifiers' loss along the step (`keras_tkfac.linearized`) is the mean
    # over the replicas' batches, so every replica shortens its step alike. A floor
    # of 1 on the model's coefficient makes steps that raise the loss.
    monkeypatch.setattr(step_size, "GRAFT_QUADRATIC_FLOOR", 1.0)
    x, y = _data((8,), n=128)

    def optimizer():
        return keras_tkfac.TKFAC(fisher="empirical", factor_update_freq=2,
                                 inverse_update_freq=3, seed=0)

    single = _train(tf.distribute.get_strategy(), _mlp, x, y, optimizer, epochs=2)
    replicated = _train(mirrored, _mlp, x, y, optimizer, epochs=2)
    _assert_identical_on_replicas(replicated)
    for a, b in zip(single.weights, replicated.weights):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-4, atol=1e-5)
    monkeypatch.setattr(linearized, "RISE_FRACTION", None)
    unchecked = _train(tf.distribute.get_strategy(), _mlp, x, y, optimizer, epochs=2)
    assert all(np.isfinite(w.numpy()).all() for w in unchecked.weights)
    assert max(np.abs(a.numpy() - b.numpy()).max()
               for a, b in zip(single.weights, unchecked.weights)) > 1e-3


@pytest.mark.parametrize("cls", helpers.TKFAC_THEN_KFAC)
def test_one_replica_mirrored_strategy_trains_as_no_strategy(cls):
    # keras-io's `MirroredStrategy()` on a machine with one GPU or none has one
    # replica; Keras's updates still go through `merge_call` there, which a
    # `tf.cond` cannot hold (it raised on the first step).
    x, y = _data((8,), n=96)

    def optimizer():
        return cls(factor_update_freq=2, inverse_update_freq=3, seed=0)

    single = _train(tf.distribute.get_strategy(), _mlp, x, y, optimizer, epochs=2)
    one = tf.distribute.MirroredStrategy(["/cpu:0"])
    assert one.num_replicas_in_sync == 1
    mirrored_one = _train(one, _mlp, x, y, optimizer, epochs=2)
    moved = [np.abs(w.numpy() - v).max()
             for w, v in zip(single.weights, _mlp().get_weights())]
    assert max(moved) > 1e-3
    for a, b in zip(single.weights, mirrored_one.weights):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-4, atol=1e-5)
