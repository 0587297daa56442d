"""LayerNormalization and BatchNormalization: per-channel scale-and-shift blocks.

The blocks are off by default (`keras_tkfac.register_normalization_blocks()`); every
test here registers them.

Per channel `c` the layer computes `y = gamma_c * xhat + beta_c`, so each channel is a
dense layer with input row `[xhat, 1]` and one output. The oracles are Keras's own
gradients (summed and per example), the exact per-channel Fisher built from them, and
an explicit `np.linalg.solve` on the Kronecker product.
"""

import inspect

import numpy as np
import pytest
import tensorflow as tf
import keras

import keras_tkfac
from keras_tkfac import blocks, fisher, loss_specs, ops
from tests import helpers

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
L = keras.layers


@pytest.fixture(autouse=True)
def normalization_blocks(monkeypatch):
    """The blocks are off by default; register them for this module only."""
    for layer_class, block_class in blocks.NORMALIZATION_BLOCKS.items():
        monkeypatch.setitem(blocks.BLOCKS, layer_class, block_class)


def test_off_by_default_and_registered_on_request(monkeypatch):
    for layer_class in blocks.NORMALIZATION_BLOCKS:
        monkeypatch.delitem(blocks.BLOCKS, layer_class)
    assert blocks.block_for(L.LayerNormalization()) is None
    assert blocks.block_for(L.BatchNormalization()) is None
    keras_tkfac.register_normalization_blocks()
    assert isinstance(blocks.block_for(L.LayerNormalization()),
                      blocks.LayerNormalizationBlock)
    assert isinstance(blocks.block_for(L.BatchNormalization()),
                      blocks.BatchNormalizationBlock)

# name: (input shape without batch, normalisation layer factory)
CASES = {
    "layer_norm_2d": ((5,), lambda: L.LayerNormalization()),
    "layer_norm_sequence": ((4, 5), lambda: L.LayerNormalization(epsilon=1e-5)),
    "layer_norm_two_axes_no_center": (
        (3, 4, 2), lambda: L.LayerNormalization(axis=[1, 2], center=False)),
    "layer_norm_middle_axis": ((3, 4, 2), lambda: L.LayerNormalization(axis=-2)),
    "layer_norm_no_scale": ((4, 5), lambda: L.LayerNormalization(scale=False)),
    "layer_norm_rms_scaling": ((4, 5), lambda: L.LayerNormalization(rms_scaling=True)),
    "batch_norm_2d": ((5,), lambda: L.BatchNormalization()),
    "batch_norm_3d": ((4, 5), lambda: L.BatchNormalization(epsilon=1e-2)),
    "batch_norm_4d_no_center": ((3, 4, 5), lambda: L.BatchNormalization(center=False)),
    "batch_norm_4d_no_scale": ((3, 4, 5), lambda: L.BatchNormalization(scale=False)),
    "batch_norm_channels_first": ((5, 3, 4), lambda: L.BatchNormalization(axis=1)),
}


def _model(case, seed=1):
    """A Dense layer (so that `xhat` is not the raw data), the norm, a classifier."""
    shape, make_layer = CASES[case]
    keras.utils.set_random_seed(seed)
    layer = make_layer()
    inputs = keras.Input(shape)
    hidden = L.Dense(shape[-1], name="pre")(inputs)
    outputs = L.Dense(3)(L.Flatten()(L.Activation("tanh")(layer(hidden))))
    return keras_tkfac.wrap(keras.Model(inputs, outputs)), layer


def _data(case, n, seed=0):
    rng = np.random.default_rng(seed)
    x = (2.0 * rng.normal(size=(n, *CASES[case][0])) + 0.5).astype("float32")
    return x, rng.integers(0, 3, size=(n,)).astype("int32")


def _record(model, layer, x, y):
    """Empirical-Fisher rows of `layer`'s block and Keras's gradients of its weights.

    Returns:
        `(block, a, g, num_examples, keras_grads, y_pred)`, numpy.
    """
    block = next(b for b in model.blocks if b.layer is layer)
    with tf.GradientTape(persistent=True) as tape:
        with keras_tkfac.record(model) as recording:
            y_pred = model(x, training=True)
        loss = LOSS(y, y_pred)
    spec = loss_specs.resolve_loss(LOSS, "empirical")
    source, cotangent, m = fisher.output_cotangent(spec, "empirical", y, y_pred, None)
    grads = tape.gradient(source, recording.outputs(), output_gradients=cotangent)
    a, g = recording.rows(grads)[model.blocks.index(block)]
    keras_grads = tape.gradient(loss, block.variables)
    return (block, a.numpy().astype(np.float64), g.numpy().astype(np.float64), int(m),
            [k.numpy() for k in keras_grads], y_pred.numpy())


def _grouped(rows):
    return rows[:, None] if rows.ndim == 2 else rows


def _per_example_grads(model, block, x, y):
    """Keras's `[M, C, d_in]` per-example gradients of `(gamma, beta)`.

    The whole batch runs forward (BatchNormalization's `xhat` is the batch's), and
    only example `n`'s loss is differentiated.
    """
    vectors = []
    for n in range(len(x)):
        with tf.GradientTape() as tape:
            y_pred = model(x, training=True)
            loss_n = LOSS(y[n:n + 1], y_pred[n:n + 1])
        grads = tape.gradient(loss_n, block.variables)
        matrix = block.grad_matrix(grads[0], grads[1] if len(grads) > 1 else None)
        vectors.append(np.reshape(matrix.numpy(), (block.groups, block.d_in)))
    return np.array(vectors, dtype=np.float64)


@pytest.mark.parametrize("case", sorted(CASES))
def test_rows_reproduce_keras_gradient(case):
    model, layer = _model(case)
    x, y = _data(case, 4)
    plain = model(x, training=True).numpy()
    block, a, g, m, keras_grads, y_pred = _record(model, layer, x, y)
    # Recording runs the layer's own call: the forward pass is unchanged.
    np.testing.assert_allclose(y_pred, plain, rtol=1e-6, atol=1e-6)
    assert m == 4
    channels = int(np.prod(block.kernel.shape))
    assert block.groups == channels and block.d_out == 1
    assert block.d_in == len(block.variables)
    assert _grouped(a).shape[1:] == (channels, block.d_in)
    # Sum over rows of a g^T is the gradient of the summed loss; Keras's is the mean.
    matrix = np.einsum("rgi,rgo->gio", _grouped(a), _grouped(g)) / m
    if channels == 1:
        matrix = matrix[0]
    kernel, bias = block.split_matrix(tf.constant(matrix, tf.float32))
    np.testing.assert_allclose(kernel.numpy(), keras_grads[0], rtol=1e-4, atol=1e-6)
    if block.bias is not None:
        np.testing.assert_allclose(bias.numpy(), keras_grads[1], rtol=1e-4, atol=1e-6)
    else:
        assert bias is None
    np.testing.assert_allclose(
        block.grad_matrix(kernel, bias).numpy(), matrix.astype(np.float32))


@pytest.mark.parametrize("case", ["layer_norm_sequence", "layer_norm_two_axes_no_center",
                                  "batch_norm_3d", "batch_norm_channels_first"])
def test_rows_are_per_example_gradients(case):
    model, layer = _model(case)
    x, y = _data(case, 3, seed=2)
    block, a, g, m, _, _ = _record(model, layer, x, y)
    expected = _per_example_grads(model, block, x, y)
    a, g = _grouped(a), _grouped(g)
    per_example = len(a) // m
    for n in range(m):
        part = slice(n * per_example, (n + 1) * per_example)
        got = np.einsum("rgi,rg->gi", a[part], g[part, :, 0])
        np.testing.assert_allclose(got, expected[n], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("case", ["layer_norm_2d", "batch_norm_2d"])
def test_one_row_per_example_tkfac_is_the_exact_channel_fisher(case):
    """One position per example: TKFAC's channel block is the exact 2x2 Fisher block.

    With one output per channel `Psi = 1`, so `delta Phi ⊗ Psi = E_n[g^2 a a^T]`,
    which is the exact per-channel block when each example has one row. K-FAC's
    `A ⊗ G = E[a a^T] E[g^2]` is that block when `g^2` and `a a^T` are uncorrelated.
    """
    model, layer = _model(case)
    x, y = _data(case, 6, seed=3)
    block, a, g, m, _, _ = _record(model, layer, x, y)
    per_example = _per_example_grads(model, block, x, y)
    exact = np.einsum("nci,ncj->cij", per_example, per_example) / m
    delta, n_phi, n_psi = (t.numpy() for t in ops.tkfac_statistics_grouped(
        tf.constant(a), tf.constant(g), m))
    a_factor, g_factor = (t.numpy() for t in ops.kfac_statistics_grouped(
        tf.constant(a), tf.constant(g), m))
    for c in range(block.groups):
        np.testing.assert_allclose(np.kron(n_phi[c], n_psi[c]) / delta[c], exact[c],
                                   rtol=1e-4, atol=1e-10)
        np.testing.assert_allclose(delta[c], np.trace(exact[c]), rtol=1e-4)
        g_sq = g[:, c, 0] ** 2
        a_outer = np.einsum("ri,rj->rij", a[:, c], a[:, c])
        np.testing.assert_allclose(np.kron(a_factor[c], g_factor[c]),
                                   a_outer.mean(0) * g_sq.mean(), rtol=1e-10)


@pytest.mark.parametrize("case", ["layer_norm_sequence", "batch_norm_4d_no_scale",
                                  "layer_norm_two_axes_no_center"])
def test_statistics_against_position_uncorrelated_fisher(case):
    model, layer = _model(case)
    x, y = _data(case, 3, seed=4)
    block, a, g, m, _, _ = _record(model, layer, x, y)
    a, g = _grouped(a), _grouped(g)
    delta, n_phi, n_psi = (t.numpy() for t in ops.tkfac_statistics_grouped(
        tf.constant(a), tf.constant(g), m))
    a_factor, g_factor = ops.kfac_statistics_grouped(tf.constant(a), tf.constant(g), m)
    for c in range(block.groups):
        helpers.assert_tkfac_is_uncorrelated_fisher(
            (delta[c], n_phi[c], n_psi[c]), a[:, c], g[:, c], m)
        np.testing.assert_allclose(a_factor[c].numpy(), a[:, c].T @ a[:, c] / m,
                                   rtol=1e-10)
        np.testing.assert_allclose(g_factor[c].numpy(), g[:, c].T @ g[:, c] / len(a),
                                   rtol=1e-10)


@pytest.mark.parametrize("cls", [keras_tkfac.TKFAC, keras_tkfac.KFAC])
def test_preconditioning_solves_the_kronecker_system(cls):
    model, layer = _model("layer_norm_sequence")
    x, y = _data("layer_norm_sequence", 4, seed=5)
    block, a, g, m, keras_grads, _ = _record(model, layer, x, y)
    optimizer = cls(damping=0.03, seed=0)
    factors = optimizer._statistics(block, tf.constant(a, tf.float32),
                                    tf.constant(g, tf.float32), m)
    left, right = optimizer._damped_factors(block, factors, 0.03)
    grad = block.grad_matrix(*keras_grads)
    update = ops.precondition(ops.symmetric_inverse(left)[0], grad,
                              ops.symmetric_inverse(right)[0]).numpy()
    factors = [f.numpy().astype(np.float64) for f in factors]
    grad = grad.numpy().astype(np.float64)
    for c in range(block.groups):
        if cls is keras_tkfac.TKFAC:
            # Each group's damping at most `trace_damping_cap` times its trace.
            lam = min(0.03, optimizer.trace_damping_cap * max(factors[0][c], 1e-3))
            ref_left, ref_right = helpers.tkfac_damped_numpy(
                factors[0][c], factors[1][c], factors[2][c], lam)
        else:
            ref_left, ref_right = helpers.kfac_damped_numpy(
                factors[0][c], factors[1][c], 0.03)
        np.testing.assert_allclose(update[c],
                                   helpers.kron_solve(ref_left, ref_right, grad[c]),
                                   rtol=1e-4, atol=1e-7)


def test_optimizer_factors_are_the_batch_statistics():
    """One statistics step of `fit` stores the exact per-channel Fisher blocks."""
    case = "batch_norm_2d"
    model, layer = _model(case)
    x, y = _data(case, 16, seed=6)
    block, _, _, m, _, _ = _record(model, layer, x, y)
    per_example = _per_example_grads(model, block, x, y)
    exact = np.einsum("nci,ncj->cij", per_example, per_example) / m
    model.compile(optimizer=keras_tkfac.TKFAC(fisher="empirical", seed=0), loss=LOSS)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    optimizer = model.optimizer
    index = [s.block.layer for s in optimizer._slots].index(layer)
    weight = optimizer._factor_weight.numpy()[index]
    delta, n_phi, n_psi = (f.numpy() / weight for f in optimizer._slots[index].factors)
    for c in range(block.groups):
        np.testing.assert_allclose(np.kron(n_phi[c], n_psi[c]) / delta[c], exact[c],
                                   rtol=1e-4, atol=1e-10)


def test_recording_keeps_batch_norm_moving_statistics():
    case = "batch_norm_3d"
    x, y = _data(case, 8)
    means = []
    for recorded in (False, True):
        model, layer = _model(case)
        if recorded:
            _record(model, layer, x, y)
        else:
            model(x, training=True)
        means.append([layer.moving_mean.numpy(), layer.moving_variance.numpy()])
        assert not layer.moving_mean.trainable
    np.testing.assert_array_equal(means[0][0], means[1][0])
    np.testing.assert_array_equal(means[0][1], means[1][1])
    assert np.abs(means[0][0]).max() > 0


@pytest.mark.skipif(
    "renorm" not in inspect.signature(L.BatchNormalization.__init__).parameters,
    reason="this Keras's BatchNormalization has no `renorm` (Keras 3.10, 3.12)")
def test_unsupported_configurations_take_the_fallback():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((4, 6)),
        L.Dense(6),
        L.BatchNormalization(renorm=True, name="renorm"),
        L.LayerNormalization(center=False, scale=False, name="bare"),
        L.GroupNormalization(groups=2, name="group"),
        L.Flatten(),
        L.Dense(3),
    ])
    wrapped = keras_tkfac.wrap(model)
    assert {type(b) for b in wrapped.blocks} == {blocks.DenseBlock}
    wrapped.compile(optimizer=keras_tkfac.TKFAC(seed=0), loss=LOSS)
    x, y = _data("layer_norm_sequence", 32)
    x = np.concatenate([x, x[..., :1]], axis=-1)
    history = wrapped.fit(x, y, batch_size=16, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    partner = [p for p in wrapped.optimizer._partner_slots if p is not None]
    assert len(partner) == 2 + 2  # renorm's gamma and beta, group's gamma and beta
    excluded = keras_tkfac.wrap(_model("layer_norm_2d")[0].model,
                                exclude=(L.LayerNormalization,))
    assert {type(b) for b in excluded.blocks} == {blocks.DenseBlock}


def _norm_model(norm):
    """Conv1D-norm-Dense-norm: the keras-io shapes with both kinds of position."""
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((8, 3)),
        L.Conv1D(6, 3, padding="same", name="conv"),
        norm(name="norm_seq"),
        L.Activation("relu"),
        L.GlobalAveragePooling1D(),
        L.Dense(8, name="hidden"),
        norm(name="norm_vec"),
        L.Activation("tanh"),
        L.Dense(3, name="classifier"),
    ])


def _norm_data(n=128):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, 8, 3)).astype("float32")
    y = (x[:, :, 0].mean(axis=1) > 0).astype("int32") + (
        x[:, :, 2].mean(axis=1) > 0.2).astype("int32")
    return x, y


@pytest.mark.parametrize("norm", [L.LayerNormalization, L.BatchNormalization])
@pytest.mark.parametrize("cls", helpers.TKFAC_THEN_KFAC)
def test_model_with_norms_trains(norm, cls):
    x, y = _norm_data()
    model = keras_tkfac.wrap(_norm_model(norm))
    names = [b.name for b in model.blocks]
    assert names == ["conv", "norm_seq", "hidden", "norm_vec", "classifier"]
    model.compile(optimizer=cls(seed=0, step_control="trust_region"), loss=LOSS)
    losses = model.fit(x, y, batch_size=32, epochs=4, verbose=0).history["loss"]
    assert losses[-1] < 0.8 * losses[0]
    optimizer = model.optimizer
    report = optimizer.curvature_report()
    for name in names:
        assert np.isfinite(report[name]["cond_left"]), name
        assert report[name]["update_ratio"] > 0, name
    inverses = {s.block.name: [v.shape for v in s.inverses] for s in optimizer._slots}
    assert inverses["norm_seq"] == [(6, 2, 2), (6, 1, 1)]
    assert inverses["norm_vec"] == [(8, 2, 2), (8, 1, 1)]
    # Every trainable variable is preconditioned: nothing takes the partner.
    assert all(p is None for p in optimizer._partner_slots)
    if norm is L.BatchNormalization:
        layer = model.model.get_layer("norm_seq")
        assert np.abs(layer.moving_mean.numpy()).max() > 0


def _mixed_model(synchronized=False):
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((8, 3)),
        L.Conv1D(6, 3, padding="same", name="conv"),
        L.BatchNormalization(name="batch_norm", synchronized=synchronized),
        L.Activation("relu"),
        L.Dense(5, name="hidden"),
        L.LayerNormalization(name="layer_norm"),
        L.Flatten(),
        L.Dense(3, name="classifier"),
    ])


def test_keras_file_round_trip_keeps_curvature_state(tmp_path):
    x, y = _norm_data(n=48)
    loaded = helpers.keras_round_trip(_mixed_model(), x, y, LOSS,
                                      str(tmp_path / "model.keras"))
    assert blocks.BatchNormalizationBlock in [type(b) for b in loaded.blocks]
    assert blocks.LayerNormalizationBlock in [type(b) for b in loaded.blocks]


def _fit_on(strategy, build, cls, x, y, **kwargs):
    with strategy.scope():
        model = keras_tkfac.wrap(build())
        model.compile(optimizer=cls(fisher="empirical", factor_update_freq=2,
                                    inverse_update_freq=3, seed=0, **kwargs),
                      loss=LOSS)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
    model.fit(dataset, epochs=2, shuffle=False, verbose=0)
    return model


@pytest.mark.parametrize("cls", helpers.TKFAC_THEN_KFAC)
def test_two_replicas_match_one_device(mirrored, cls):
    x, y = _norm_data()

    def build():
        return _norm_model(L.LayerNormalization)

    single = _fit_on(tf.distribute.get_strategy(), build, cls, x, y)
    replicated = _fit_on(mirrored, build, cls, x, y)
    assert len(replicated.optimizer._slots) == 5
    helpers.assert_replicas_match_one_device(single, replicated)


def test_batch_norm_under_mirrored_strategy_keeps_replicas_identical(mirrored):
    """Each replica normalises with its own batch's moments (Keras's behaviour), so
    the run differs from one device; the statistics are all-reduced, so weights and
    optimizer state stay identical on the replicas."""
    x, y = _norm_data()
    model = _fit_on(mirrored, _mixed_model, keras_tkfac.TKFAC, x, y)
    assert len(model.optimizer._slots) == 5
    helpers.assert_identical_on_replicas(
        model.trainable_weights + model.optimizer.variables)
    assert np.isfinite(model.optimizer.curvature_report()["batch_norm"]["cond_left"])


def _max_difference(model, other):
    return max(float(np.max(np.abs(a.numpy() - b.numpy())))
               for a, b in zip(model.weights, other.weights))


def _adam_on(strategy, x, y):
    with strategy.scope():
        model = _mixed_model(synchronized=True)
        model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=LOSS)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
    model.fit(dataset, epochs=2, shuffle=False, verbose=0)
    return model


# Unregistered (the layer on the partner; ~30 s) in `make test-all`.
@pytest.mark.parametrize("registered", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_synchronized_batch_norm_under_mirrored_strategy(mirrored, registered,
                                                         monkeypatch):
    """Its backward pass all-reduces, which cannot happen inside the statistics'
    `tf.cond` (it raised before): the sampled-label backward pass then runs every
    step, and a covered layer's `xhat` is computed with the forward pass.

    Keras's synchronized moments are the global batch's, but its two-replica runs
    are not one device's to float32 rounding (Adam: ~2e-3 apart after 8 steps), so
    the oracle is Keras's own: replicas stay identical, and TKFAC's run is no
    further from one device than Adam's. That holds for `"graft"` steps; the
    default's replicas stay identical and finite (its products through the
    synchronized moments: `test_products_through_synchronized_batch_norm_...`;
    its run is ~3 times Adam's distance from one device, README)."""
    if not registered:
        for layer_class in blocks.NORMALIZATION_BLOCKS:
            monkeypatch.delitem(blocks.BLOCKS, layer_class)
    x, y = _norm_data()

    def build():
        return _mixed_model(synchronized=True)

    default = _fit_on(mirrored, build, keras_tkfac.TKFAC, x, y)
    helpers.assert_identical_on_replicas(default.weights + default.optimizer.variables)
    assert all(np.all(np.isfinite(w.numpy())) for w in default.weights)
    single = _fit_on(tf.distribute.get_strategy(), build, keras_tkfac.TKFAC, x, y,
                     step_control="graft")
    replicated = _fit_on(mirrored, build, keras_tkfac.TKFAC, x, y,
                         step_control="graft")
    assert len(replicated.optimizer._slots) == (5 if registered else 3)
    helpers.assert_identical_on_replicas(
        replicated.weights + replicated.optimizer.variables)
    assert all(np.all(np.isfinite(w.numpy())) for w in replicated.weights)
    adam = _max_difference(_adam_on(tf.distribute.get_strategy(), x, y),
                           _adam_on(mirrored, x, y))
    assert _max_difference(single, replicated) <= adam


def test_products_through_synchronized_batch_norm_on_replicas_are_one_devices(
        mirrored):
    """Forward mode gives no tangent through a cross-replica all-reduce (zero), so
    the products' pass takes reverse mode where a synchronized BatchNormalization
    all-reduces its moments: the Gram of two directions on two replicas (each its
    half of the batch, the replicas' Grams averaged) equals one device's on the
    whole batch. With forward mode it was 5% off."""
    from keras_tkfac import products, distributed  # pylint: disable=import-outside-toplevel
    x, y = _norm_data(n=32)
    with mirrored.scope():
        model = _mixed_model(synchronized=True)
        model.build((None, 8, 3))
    variables = model.trainable_variables
    rng = np.random.default_rng(2)
    directions = [[rng.normal(size=v.shape).astype("float32") for v in variables]
                  for _ in range(2)]
    outputs = loss_specs.resolve_losses(LOSS, "true", model(x[:2]))

    def gram(inputs, labels, syncs):
        batch = products.Batch(lambda: model(inputs, training=True), outputs, labels,
                               None, syncs=syncs)
        return batch.gram(variables, [[tf.constant(d) for d in direction]
                                      for direction in directions])

    single = gram(tf.constant(x), tf.constant(y), False).numpy()

    @tf.function
    def replicated():
        def step():
            index = tf.distribute.get_replica_context().replica_id_in_sync_group
            rows = tf.range(16) + 16 * index
            return gram(tf.gather(x, rows), tf.gather(y, rows),
                        distributed.syncs_in_backward(model))
        return mirrored.run(step)

    on_replicas = mirrored.experimental_local_results(replicated())
    for value in on_replicas:
        np.testing.assert_allclose(value.numpy(), single, rtol=1e-4, atol=1e-6)
