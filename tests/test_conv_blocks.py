"""Transposed, grouped and channels_first convolutions against Keras's own gradients.

TensorFlow's CPU kernels run neither `channels_first` convolutions nor dilated
transposed ones, so Keras cannot either; those cases run inside an XLA-compiled
function (`xla=True`), where they compile on CPU.
"""

import numpy as np
import pytest
import tensorflow as tf
import keras

import keras_tkfac
from keras_tkfac import blocks, conv_blocks, ops
from tests import helpers

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
L = keras.layers

# name: (input shape without batch, layer factory, needs XLA on CPU)
CASES = {
    "transpose2d_stride2_same": (
        (4, 5, 3), lambda: L.Conv2DTranspose(2, 3, strides=2, padding="same",
                                             activation="tanh"), False),
    "transpose2d_stride1_valid_no_bias": (
        (4, 5, 3), lambda: L.Conv2DTranspose(2, (3, 2), use_bias=False), False),
    "transpose2d_stride2_valid_output_padding": (
        (4, 4, 3), lambda: L.Conv2DTranspose(2, 3, strides=2, output_padding=1), False),
    "transpose2d_stride2_same_output_padding": (
        (3, 4, 2), lambda: L.Conv2DTranspose(2, 3, strides=2, padding="same",
                                             output_padding=(0, 1)), False),
    "transpose2d_kernel_below_stride": (
        (3, 3, 2), lambda: L.Conv2DTranspose(2, 2, strides=3), False),
    "transpose1d_stride2_same": (
        (5, 3), lambda: L.Conv1DTranspose(2, 3, strides=2, padding="same"), False),
    "transpose3d_stride2_valid": (
        (3, 3, 2, 2), lambda: L.Conv3DTranspose(2, 2, strides=(2, 1, 2)), False),
    "transpose2d_dilation2": (
        (4, 5, 2), lambda: L.Conv2DTranspose(2, 3, dilation_rate=2, padding="same"),
        True),
    "transpose2d_channels_first": (
        (3, 4, 5), lambda: L.Conv2DTranspose(2, 3, strides=2, padding="same",
                                             data_format="channels_first"), True),
    "grouped2d_same": (
        (5, 6, 4), lambda: L.Conv2D(6, 3, groups=2, padding="same", activation="relu"),
        False),
    "grouped2d_stride2_valid_no_bias": (
        (7, 7, 6), lambda: L.Conv2D(3, 3, strides=2, groups=3, use_bias=False), False),
    "grouped1d_causal": (
        (8, 4), lambda: L.Conv1D(4, 3, groups=2, padding="causal", dilation_rate=2),
        False),
    "grouped3d": ((4, 4, 3, 4), lambda: L.Conv3D(4, 2, groups=2), False),
    "grouped2d_channels_first": (
        (4, 5, 6), lambda: L.Conv2D(4, 3, groups=2, data_format="channels_first"),
        False),
    "conv1d_channels_first_causal": (
        (3, 8), lambda: L.Conv1D(4, 3, padding="causal",
                                 data_format="channels_first"), True),
    "conv2d_channels_first_stride2": (
        (2, 7, 6), lambda: L.Conv2D(3, 3, strides=2, padding="same",
                                    data_format="channels_first"), True),
    "conv3d_channels_first": (
        (2, 4, 4, 3), lambda: L.Conv3D(3, 2, data_format="channels_first",
                                       activation="tanh"), False),
    "depthwise_channels_first": (
        (3, 6, 5), lambda: L.DepthwiseConv2D(3, depth_multiplier=2,
                                             data_format="channels_first"), False),
}


def _model(case, seed=1):
    shape, make_layer, xla = CASES[case]
    keras.utils.set_random_seed(seed)
    try:
        layer = make_layer()
    except ValueError as error:
        if "output_padding" not in str(error):
            raise
        # Keras 3.10 requires every `output_padding` entry to be positive.
        pytest.skip(f"Keras {keras.__version__} rejects this layer: {error}")
    inputs = keras.Input(shape)
    outputs = L.Dense(3)(L.Flatten()(layer(inputs)))
    return keras_tkfac.wrap(keras.Model(inputs, outputs)), layer, xla


def _data(case, n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *CASES[case][0])).astype("float32")
    return x, rng.integers(0, 3, size=(n,)).astype("int32")


def _record(model, layer, x, y, xla):
    """`(block, a, g, num_examples, keras_grads, y_pred, plain_y_pred)` of `layer`."""
    block = next(b for b in model.blocks if b.layer is layer)
    return (block, *helpers.empirical_rows(model, block, x, y, LOSS,
                                           layer.trainable_weights, xla))


def _sum_of_outer_products(a, g):
    return np.einsum("rgi,rgo->gio", a, g) if a.ndim == 3 else a.T @ g


@pytest.mark.parametrize("case", sorted(CASES))
def test_rows_reproduce_keras_gradient(case):
    model, layer, xla = _model(case)
    x, y = _data(case, 4)
    block, a, g, m, keras_grads, y_pred, plain = _record(model, layer, x, y, xla)
    # Recording does not change the forward pass.
    np.testing.assert_allclose(y_pred, plain, rtol=1e-5, atol=1e-6)
    assert m == 4
    # Sum over rows of a g^T is the gradient of the summed loss; Keras's is the mean.
    matrix = _sum_of_outer_products(a, g) / m
    kernel, bias = block.split_matrix(tf.constant(matrix, tf.float32))
    np.testing.assert_allclose(kernel.numpy(), keras_grads[0], rtol=1e-4, atol=1e-6)
    if block.bias is not None:
        np.testing.assert_allclose(bias.numpy(), keras_grads[1], rtol=1e-4, atol=1e-6)
    else:
        assert bias is None
    np.testing.assert_allclose(
        block.grad_matrix(kernel, bias).numpy(), matrix.astype(np.float32))


@pytest.mark.parametrize("case", ["transpose2d_stride2_same", "grouped2d_same"])
def test_rows_are_per_example_gradients(case):
    model, layer, _ = _model(case)
    x, y = _data(case, 3, seed=2)
    block, a, g, m, _, _, _ = _record(model, layer, x, y, False)
    per_example = len(a) // m
    for n in range(m):
        with tf.GradientTape() as tape:
            loss_n = LOSS(y[n:n + 1], model(x[n:n + 1], training=True))
        grads = tape.gradient(loss_n, block.variables)
        expected = block.grad_matrix(grads[0], grads[1] if len(grads) > 1 else None)
        part = slice(n * per_example, (n + 1) * per_example)
        np.testing.assert_allclose(_sum_of_outer_products(a[part], g[part]),
                                   expected.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("case", ["transpose2d_stride2_valid_output_padding",
                                  "grouped2d_stride2_valid_no_bias"])
def test_tkfac_statistics_against_location_uncorrelated_fisher(case):
    model, layer, _ = _model(case)
    x, y = _data(case, 3, seed=3)
    block, a, g, m, _, _, _ = _record(model, layer, x, y, False)
    a_groups = a[:, None] if a.ndim == 2 else a
    g_groups = g[:, None] if g.ndim == 2 else g
    grouped = ops.tkfac_statistics_grouped(
        tf.constant(a_groups), tf.constant(g_groups), m)
    a_factor, g_factor = ops.kfac_statistics_grouped(
        tf.constant(a_groups), tf.constant(g_groups), m)
    if block.groups == 1:
        # The ungrouped ops the optimizer uses for this block give the same numbers.
        for single, batched in zip(
                ops.tkfac_statistics(tf.constant(a), tf.constant(g), m), grouped):
            np.testing.assert_allclose(single.numpy(), batched.numpy()[0], rtol=1e-10)
    delta, n_phi, n_psi = (t.numpy() for t in grouped)
    for j in range(block.groups):
        # delta is the trace of the location-uncorrelated block, and delta Phi, delta
        # Psi its partial traces, so tr(delta Phi ⊗ Psi) = tr(F).
        exact = helpers.assert_tkfac_is_uncorrelated_fisher(
            (delta[j], n_phi[j], n_psi[j]), a_groups[:, j], g_groups[:, j], m)
        np.testing.assert_allclose(np.trace(np.kron(n_phi[j], n_psi[j])) / delta[j],
                                   np.trace(exact), rtol=1e-10)
        np.testing.assert_allclose(a_factor[j].numpy(),
                                   a_groups[:, j].T @ a_groups[:, j] / m, rtol=1e-10)
        np.testing.assert_allclose(g_factor[j].numpy(),
                                   g_groups[:, j].T @ g_groups[:, j] / len(a),
                                   rtol=1e-10)


SAMPLED = {
    "conv2d_same": ((7, 6, 2), lambda: L.Conv2D(3, 3, padding="same")),
    "conv2d_same_stride2_even": ((8, 8, 2), lambda: L.Conv2D(3, 3, strides=2,
                                                             padding="same")),
    "conv2d_same_stride2_odd_1x1": ((7, 9, 2), lambda: L.Conv2D(3, 1, strides=2,
                                                                padding="same")),
    "conv2d_valid_dilated": ((9, 8, 2), lambda: L.Conv2D(2, 3, dilation_rate=2)),
    "conv2d_same_dilated_stride1": ((6, 7, 2), lambda: L.Conv2D(
        2, 3, dilation_rate=(2, 1), padding="same", use_bias=False)),
    "conv1d_same_stride2": ((9, 3), lambda: L.Conv1D(2, 3, strides=2, padding="same")),
    **{case: CASES[case][:2] for case in CASES
       if not case.startswith(("transpose", "depthwise"))},
}


@pytest.mark.parametrize("stride", [2, 3])
@pytest.mark.parametrize("case", sorted(SAMPLED))
def test_sampled_rows_are_the_rows_at_sampled_locations(case, stride):
    shape, make_layer = SAMPLED[case]
    keras.utils.set_random_seed(0)
    layer = make_layer()
    model = keras_tkfac.wrap(keras.Sequential([keras.Input(shape), layer]))
    block = model.blocks[0]
    rng = np.random.default_rng(5)
    batch = 5
    x = tf.constant(rng.normal(size=(batch, *shape)), tf.float32)
    grads = tf.constant(rng.normal(size=(batch, *layer.output.shape[1:])), tf.float32)
    a, g = (t.numpy() for t in block.rows(x, grads))
    spatial = layer.output.shape[1:-1]
    if block.layer.data_format == "channels_first":
        spatial = layer.output.shape[2:]
    a = a.reshape(batch, *spatial, *a.shape[1:])
    g = g.reshape(batch, *spatial, *g.shape[1:])
    steps = [min(stride, n) for n in spatial]
    counts = [-(-n // step) for n, step in zip(spatial, steps)]
    cycle = int(np.prod(steps))
    seen = np.zeros((batch, *spatial))
    for phase in range(cycle):
        sampled_a, sampled_g = (t.numpy() for t in block.sampled_rows(
            x, grads, stride, tf.constant(phase)))
        # Rows come in example order; example n takes phase + n.
        order = range(batch)
        sampled_a = sampled_a.reshape(batch, *counts, *a.shape[1 + len(spatial):])
        sampled_g = sampled_g.reshape(batch, *counts, *g.shape[1 + len(spatial):])
        for row, n in enumerate(order):
            own = (phase + n) % cycle
            offsets = [(own // int(np.prod(steps[:i]))) % steps[i]
                       for i in range(len(spatial))]
            picks = tuple(slice(o, None, step) for o, step in zip(offsets, steps))
            sizes = [len(range(o, m, step))
                     for o, m, step in zip(offsets, spatial, steps)]
            inside = tuple(slice(0, size) for size in sizes)
            scale = np.sqrt(np.prod(spatial) / np.prod(sizes))
            np.testing.assert_allclose(sampled_g[row][inside], g[n][picks])
            np.testing.assert_allclose(sampled_a[row][inside], scale * a[n][picks],
                                       rtol=1e-6)
            # Points past the edge are rows of zeros.
            edge_a, edge_g = sampled_a[row].copy(), sampled_g[row].copy()
            edge_a[inside] = 0
            edge_g[inside] = 0
            assert not edge_a.any() and not edge_g.any()
            seen[n][picks] += 1
    # Over a cycle of phases every location of every example is visited once.
    np.testing.assert_array_equal(seen, 1)


SINGLE_ROW = {
    # One input location: the transposed convolution has one row per example.
    "transpose": ((1, 1, 2), lambda: L.Conv2DTranspose(2, 3, strides=2,
                                                       activation="tanh")),
    # One output location per group.
    "grouped": ((3, 3, 4), lambda: L.Conv2D(4, 3, groups=2, activation="tanh")),
}


@pytest.mark.parametrize("case", sorted(SINGLE_ROW))
def test_tkfac_is_exact_for_one_example_with_one_row(case):
    """`delta Phi ⊗ Psi = F` for `M = 1` and one row; `F` from Keras's gradient."""
    shape, make_layer = SINGLE_ROW[case]
    keras.utils.set_random_seed(0)
    layer = make_layer()
    inputs = keras.Input(shape)
    outputs = L.Dense(3)(L.Flatten()(layer(inputs)))
    model = keras_tkfac.wrap(keras.Model(inputs, outputs))
    rng = np.random.default_rng(4)
    x = rng.normal(size=(1, *shape)).astype("float32")
    y = np.array([1], dtype="int32")
    block, a, g, m, keras_grads, _, _ = _record(model, layer, x, y, False)
    assert len(a) == 1
    bias_grad = None if block.bias is None else keras_grads[1]
    matrix = block.grad_matrix(keras_grads[0], bias_grad).numpy().astype(np.float64)
    matrix = matrix.reshape(block.groups, block.d_in, block.d_out)
    a_groups = a[:, None] if a.ndim == 2 else a
    g_groups = g[:, None] if g.ndim == 2 else g
    delta, n_phi, n_psi = (t.numpy() for t in ops.tkfac_statistics_grouped(
        tf.constant(a_groups), tf.constant(g_groups), 1))
    for j in range(block.groups):
        v = matrix[j].reshape(-1)  # row-major [d_in, d_out] is the a ⊗ g ordering
        np.testing.assert_allclose(np.kron(n_phi[j], n_psi[j]) / delta[j],
                                   np.outer(v, v), rtol=1e-4, atol=1e-10)


def test_unsupported_configurations_take_the_fallback():
    layer = L.Conv3DTranspose(2, 2, dilation_rate=2)
    model = keras_tkfac.wrap(keras.Sequential([keras.Input((3, 3, 3, 1)), layer]))
    assert model.blocks == []


def _conv_model():
    """A grouped channels_first convolution, then a transposed convolution."""
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((4, 6, 6)),
        L.Conv2D(4, 3, groups=2, padding="same", activation="relu",
                 data_format="channels_first", name="grouped"),
        L.Permute((2, 3, 1)),
        L.Conv2DTranspose(2, 3, strides=2, padding="same", activation="tanh",
                          name="transpose"),
        L.Flatten(),
        L.Dense(3, name="classifier"),
    ])


def _conv_data(n=128):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, 4, 6, 6)).astype("float32")
    y = (x[:, 0].mean(axis=(1, 2)) > 0).astype("int32") + (
        x[:, 3].mean(axis=(1, 2)) > 0.1).astype("int32")
    return x, y


@pytest.mark.parametrize("cls", [keras_tkfac.TKFAC, keras_tkfac.KFAC])
def test_sampled_locations_give_factors_of_the_same_scale_and_train(cls):
    x, y = _conv_data()
    traces = []
    for stride in (1, 2):
        keras.utils.set_random_seed(0)
        model = keras_tkfac.wrap(_conv_model())
        model.compile(optimizer=cls(seed=0, conv_location_stride=stride,
                                         step_control="trust_region"), loss=LOSS)
        losses = model.fit(x, y, batch_size=32, epochs=4, verbose=0).history["loss"]
        assert losses[-1] < 0.8 * losses[0]
        slot = model.optimizer._slots[0]  # the grouped Conv2D
        traces.append(float(model.optimizer._trace(
            [f.value / model.optimizer._factor_weight[0] for f in slot.factors])))
    # The sampled sums estimate the sums over all locations: same order of magnitude.
    assert 0.5 < traces[1] / traces[0] < 2.0, traces


def test_sampled_locations_of_unknown_spatial_sizes_take_every_location():
    # Batches of images of two sizes (a dataset whose spatial sizes are unknown
    # when traced): the grid cannot be laid out, so the statistics take every
    # location's rows, and the weights equal those of `conv_location_stride=1`.
    rng = np.random.default_rng(3)
    batches = [(rng.normal(size=(8, size, size, 2)).astype("float32"),
                rng.integers(0, 3, size=8)) for size in (6, 8, 6, 8)]
    spec = (tf.TensorSpec((None, None, None, 2)), tf.TensorSpec((None,), tf.int64))
    weights = []
    for stride in (1, 2):
        keras.utils.set_random_seed(0)
        model = keras_tkfac.wrap(keras.Sequential([
            keras.Input((None, None, 2)), L.Conv2D(3, 3, activation="tanh"),
            L.GlobalAveragePooling2D(), L.Dense(3)]))
        model.compile(optimizer=keras_tkfac.TKFAC(seed=0, conv_location_stride=stride),
                      loss=LOSS)
        data = tf.data.Dataset.from_generator(lambda: iter(batches),
                                              output_signature=spec)
        model.fit(data, epochs=3, verbose=0)
        assert model.optimizer._factor_weight.numpy()[0] > 0  # statistics were taken
        weights.append(model.get_weights())
    for first, second in zip(*weights):
        np.testing.assert_array_equal(first, second)
    block = conv_blocks.ConvBlock(model.layers[0])
    traced = tf.function(lambda x, g: block.sampled_rows(x, g, 2, 0)).get_concrete_function(
        tf.TensorSpec((None, None, None, 2)), tf.TensorSpec((None, None, None, 3)))
    assert traced.structured_outputs is None


@pytest.mark.parametrize("cls", [keras_tkfac.TKFAC, keras_tkfac.KFAC])
def test_model_with_new_blocks_trains(cls):
    x, y = _conv_data()
    model = keras_tkfac.wrap(_conv_model())
    assert [b.name for b in model.blocks] == ["grouped", "transpose", "classifier"]
    model.compile(optimizer=cls(seed=0, step_control="trust_region"), loss=LOSS)
    losses = model.fit(x, y, batch_size=32, epochs=4, verbose=0).history["loss"]
    assert losses[-1] < 0.8 * losses[0]
    optimizer = model.optimizer
    report = optimizer.curvature_report()
    for block in model.blocks:
        assert np.isfinite(report[block.name]["cond_left"]), block.name
        assert report[block.name]["update_ratio"] > 0, block.name
    inverses = {s.block.name: [v.shape for v in s.inverses] for s in optimizer._slots}
    # Two groups of (3 * 3 * 2 + 1) x (2 outputs); the transposed kernel as
    # [c_in = 4, 3 * 3 * c_out = 18], its bias on the fallback.
    assert inverses["grouped"] == [(2, 19, 19), (2, 2, 2)]
    assert inverses["transpose"] == [(4, 4), (18, 18)]
    covered = {key for s in optimizer._slots for key in s.keys}
    transpose = model.model.get_layer("transpose")
    assert optimizer._var_key(transpose.bias) not in covered


def test_keras_file_round_trip_keeps_curvature_state(tmp_path):
    x, y = _conv_data(n=48)
    loaded = helpers.keras_round_trip(_conv_model(), x, y, LOSS,
                                      str(tmp_path / "model.keras"))
    assert blocks.ConvTransposeBlock in [type(b) for b in loaded.blocks]
    assert loaded.blocks[0].groups == 2


def _fit_on(strategy, cls, x, y):
    with strategy.scope():
        model = keras_tkfac.wrap(_conv_model())
        model.compile(optimizer=cls(fisher="empirical", factor_update_freq=2,
                                    inverse_update_freq=3, seed=0), loss=LOSS)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
    model.fit(dataset, epochs=2, shuffle=False, verbose=0)
    return model


def test_two_replicas_match_one_device(mirrored):
    x, y = _conv_data()
    single = _fit_on(tf.distribute.get_strategy(), keras_tkfac.TKFAC, x, y)
    replicated = _fit_on(mirrored, keras_tkfac.TKFAC, x, y)
    helpers.assert_replicas_match_one_device(single, replicated)


def _random_factors(optimizer, block, seed):
    """The optimizer's statistics of random rows of `block`'s shape."""
    rng = np.random.default_rng(seed)
    shape = (12, block.groups) if block.groups > 1 else (12,)
    a = tf.constant(rng.normal(size=(*shape, block.d_in)), tf.float32)
    g = tf.constant(rng.normal(size=(*shape, block.d_out)), tf.float32)
    return optimizer._statistics(block, a, g, 4)


def _diagonal_increment(damped, factor, delta):
    """`damped - sqrt(delta) * Phi` (`factor = delta * Phi`) and the mean
    eigenvalue of `sqrt(delta) * Phi`, per group, in float64."""
    damped, factor = damped.numpy().astype(np.float64), factor.numpy().astype(np.float64)
    delta = np.reshape(delta.numpy().astype(np.float64), (-1, 1, 1))
    damped = damped.reshape(-1, *damped.shape[-2:])
    factor = factor.reshape(-1, *factor.shape[-2:]) / np.sqrt(delta)
    increment = damped - factor
    d = increment.shape[-1]
    for matrix, whole in zip(increment, damped):
        # float32 rounding of the damped factor's entries
        np.testing.assert_allclose(matrix, matrix[0, 0] * np.eye(d),
                                   atol=1e-6 * np.abs(whole).max())
    mean = np.trace(factor, axis1=1, axis2=2) / d
    return increment[:, 0, 0], mean


def test_balanced_split_damps_each_factor_by_the_same_multiple_of_its_mean():
    """`conv_damping_split="balanced"` (the default): the increments on `Phi^` and
    `Psi^` are the same multiple of their factors' mean eigenvalues, their product
    is the layer's trace-relative damping `lambda_l` (so the Kronecker product's
    `lambda_l I` term is unchanged), and the preconditioned gradient solves the
    explicit Kronecker system; `"even"` puts `sqrt(lambda_l)` on each factor; the
    Dense layer's split is even either way."""
    model = keras_tkfac.wrap(_conv_model())
    model.build((None, 4, 6, 6))
    # (The Dense layer's damping is the given one: no trace cap.)
    balanced = keras_tkfac.TKFAC(trace_damping_cap=None, seed=0)
    even = keras_tkfac.TKFAC(conv_damping_split="even", trace_damping_cap=None, seed=0)
    assert balanced.conv_damping_split == "balanced"
    rng = np.random.default_rng(3)
    for index, block in enumerate(model.blocks):
        factors = _random_factors(balanced, block, index)
        lam = np.asarray(balanced._layer_damping(block, factors, 0.1))
        np.testing.assert_allclose(lam, even._layer_damping(block, factors, 0.1))
        assert block.is_conv or lam == 0.1
        lam = np.reshape(lam, (-1,)).astype(np.float64)
        for optimizer in (balanced, even):
            left, right = optimizer._damped_factors(block, factors, 0.1)
            left_add, left_mean = _diagonal_increment(left, factors[1], factors[0])
            right_add, right_mean = _diagonal_increment(right, factors[2], factors[0])
            np.testing.assert_allclose(left_add * right_add, lam, rtol=1e-5)
            if optimizer is balanced and block.is_conv:
                np.testing.assert_allclose(left_add / left_mean, right_add / right_mean,
                                           rtol=1e-5)
                assert block.d_in != block.d_out  # the two splits differ here
            else:
                np.testing.assert_allclose(left_add, np.sqrt(lam), rtol=1e-5)
                np.testing.assert_allclose(right_add, np.sqrt(lam), rtol=1e-5)
        left, right = balanced._damped_factors(block, factors, 0.1)
        groups = max(block.groups, 1)
        grad = rng.normal(size=(groups, block.d_in, block.d_out))
        grad_in = tf.constant(grad if block.groups > 1 else grad[0], tf.float32)
        update = ops.precondition(ops.symmetric_inverse(left)[0], grad_in,
                                  ops.symmetric_inverse(right)[0]).numpy()
        update = update.reshape(groups, block.d_in, block.d_out)
        left = left.numpy().astype(np.float64).reshape(groups, block.d_in, block.d_in)
        right = right.numpy().astype(np.float64).reshape(groups, block.d_out, block.d_out)
        for j in range(groups):
            np.testing.assert_allclose(
                update[j], helpers.kron_solve(left[j], right[j], grad[j]),
                rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("step_control,split", [
    ("graft_quadratic", "balanced"), ("quadratic", "balanced"), ("graft", "even"),
    ("trust_region", "even"), ("kl_clip", "even")])
def test_conv_damping_split_default_follows_the_step_control(step_control, split):
    """`conv_damping_split=None`: balanced under the quadratic-model controls, even
    under the others (as measured); kept through the config; a given value wins; a bad
    one raises a `ValueError` naming it."""
    optimizer = keras_tkfac.TKFAC(step_control=step_control)
    assert optimizer.conv_damping_split == split
    config = optimizer.get_config()
    assert config["conv_damping_split"] == split
    assert keras_tkfac.TKFAC.from_config(config).conv_damping_split == split
    other = "even" if split == "balanced" else "balanced"
    assert keras_tkfac.TKFAC(step_control=step_control,
                             conv_damping_split=other).conv_damping_split == other
    with pytest.raises(ValueError, match="conv_damping_split='pi'"):
        keras_tkfac.TKFAC(step_control=step_control, conv_damping_split="pi")


# Convolutions whose rows come from patches: (input shape without batch, layer).
NORM_CASES = {
    "conv2d_same": ((6, 7, 3), lambda: L.Conv2D(4, 3, padding="same")),
    "conv2d_stride2_valid_no_bias": (
        (7, 8, 3), lambda: L.Conv2D(4, (3, 2), strides=2, use_bias=False)),
    "conv2d_stride2_same_even": ((8, 8, 2), lambda: L.Conv2D(3, 4, strides=2,
                                                             padding="same")),
    "conv2d_dilated_same": ((9, 9, 2), lambda: L.Conv2D(3, 3, dilation_rate=2,
                                                        padding="same")),
    "conv1d_causal_dilated": ((10, 3), lambda: L.Conv1D(4, 3, padding="causal",
                                                        dilation_rate=2)),
    "conv1d_stride3": ((11, 2), lambda: L.Conv1D(2, 2, strides=3)),
    "conv3d_same": ((4, 5, 4, 2), lambda: L.Conv3D(2, 3, padding="same")),
    "grouped2d_same": ((5, 6, 4), lambda: L.Conv2D(6, 3, groups=2, padding="same")),
    "grouped2d_stride2_no_bias": ((7, 7, 6), lambda: L.Conv2D(3, 3, strides=2, groups=3,
                                                              use_bias=False)),
    "grouped1d_causal": ((8, 4), lambda: L.Conv1D(4, 3, groups=2, padding="causal",
                                                  dilation_rate=2)),
    "grouped3d": ((4, 4, 3, 4), lambda: L.Conv3D(4, 2, groups=2)),
    "conv2d_channels_first": ((2, 7, 6), lambda: L.Conv2D(
        3, 3, strides=2, padding="same", data_format="channels_first")),
    "depthwise2d_same": ((6, 7, 3), lambda: L.DepthwiseConv2D(3, padding="same",
                                                              depth_multiplier=2)),
    "depthwise2d_one_channel_stride2": ((7, 7, 1), lambda: L.DepthwiseConv2D(
        3, strides=2, use_bias=False)),
    "depthwise1d_dilated": ((10, 4), lambda: L.DepthwiseConv1D(3, dilation_rate=2)),
    "depthwise2d_channels_first": ((3, 6, 5), lambda: L.DepthwiseConv2D(
        2, data_format="channels_first")),
}


@pytest.mark.parametrize("case", sorted(NORM_CASES))
def test_row_norms_are_the_squared_norms_of_the_rows(case):
    shape, make_layer = NORM_CASES[case]
    layer = make_layer()
    layer.build((None, *shape))
    block = blocks.block_for(layer)
    x = tf.constant(np.random.default_rng(3).normal(size=(3, *shape)), tf.float32)
    # The rows' `a` do not depend on the output gradients.
    grads = tf.zeros(layer.compute_output_shape((3, *shape)))
    a, _ = block.rows(x, grads)
    norms = block.row_norms(x)
    assert norms.dtype == tf.float32
    np.testing.assert_allclose(norms.numpy(), np.sum(np.square(a.numpy()), axis=-1),
                               rtol=1e-5, atol=1e-5)
    # The statistics take them in place of squaring the rows.
    g = tf.constant(np.random.default_rng(4).normal(size=(*a.shape[:-1], block.d_out)),
                    tf.float32)
    fn = ops.tkfac_statistics_grouped if block.groups > 1 else ops.tkfac_statistics
    for given, found in zip(fn(a, g, 3, norms), fn(a, g, 3)):
        # (float32 sums in another order: within 1e-6 of each statistic's scale.)
        np.testing.assert_allclose(given.numpy(), found.numpy(), rtol=1e-5,
                                   atol=1e-6 * np.abs(found.numpy()).max())


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("padding", ["same", "valid"])
def test_gathered_patches_are_tensorflows_patches(rank, padding):
    rng = np.random.default_rng(5)
    cases = [((3, 3, 2), (1, 1, 1), (1, 1, 1)), ((2, 5, 3), (1, 1, 1), (2, 3, 1)),
             ((3, 2, 2), (2, 3, 1), (1, 1, 1)), ((1, 1, 1), (1, 1, 1), (1, 1, 1)),
             ((4, 3, 3), (3, 2, 2), (1, 1, 1)), ((3, 3, 1), (1, 1, 1), (2, 2, 1))]
    for kernel, strides, rates in cases:
        kernel, strides, rates = (list(v[:rank]) for v in (kernel, strides, rates))
        if rank == 3 and max(rates) > 1:
            continue  # (TensorFlow's volume patches have no dilation.)
        x = tf.constant(rng.normal(size=(2, *[16, 15, 7][:rank], 3)), tf.float32)
        if rank == 3:
            expected = tf.extract_volume_patches(x, [1, *kernel, 1], [1, *strides, 1],
                                                 padding.upper())
        else:
            lead = [1] if rank == 1 else []
            expected = tf.image.extract_patches(
                x[:, None] if rank == 1 else x, [1, *lead, *kernel, 1],
                [1, *lead, *strides, 1], [1, *lead, *rates, 1], padding.upper())
            expected = expected[:, 0] if rank == 1 else expected
        found = conv_blocks._patches(x, kernel, strides, rates, padding)
        np.testing.assert_array_equal(found.numpy(), expected.numpy())
        # Spatial sizes unknown when traced: TensorFlow's extraction.
        traced = tf.function(
            lambda t, k=kernel, s=strides, r=rates: conv_blocks._patches(t, k, s, r, padding),
            input_signature=[tf.TensorSpec([None, *[None] * rank, 3])])
        np.testing.assert_array_equal(
            np.reshape(traced(x).numpy(), expected.shape), expected.numpy())


def test_statistics_take_the_row_norms_and_equal_those_from_squared_rows(monkeypatch):
    """The optimizer's statistics step asks the grouped convolution for its rows'
    norms, and its factors equal those from squaring the rows (`row_norms` off)."""
    x, y = _conv_data(n=32)
    asked = []
    norms = conv_blocks.ConvBlock.row_norms

    def spy(block, inputs):
        asked.append(block.name)
        return norms(block, inputs)

    factors = []
    for row_norms in (spy, lambda block, inputs: None):
        monkeypatch.setattr(conv_blocks.ConvBlock, "row_norms", row_norms)
        model = keras_tkfac.wrap(_conv_model())
        # Every location: rows at sampled locations (`conv_location_stride=2`,
        # TKFAC's default) have no norms of their own; the statistics square them.
        model.compile(optimizer=keras_tkfac.TKFAC(seed=0, conv_location_stride=1),
                      loss=LOSS)
        model.fit(x, y, batch_size=32, epochs=1, verbose=0)  # a statistics step
        slot = model.optimizer._slots[0]
        assert slot.block.name == "grouped"
        factors.append([f.numpy() for f in slot.factors])
    assert asked == ["grouped"]
    # K-FAC's factors do not use them: not asked for.
    monkeypatch.setattr(conv_blocks.ConvBlock, "row_norms", spy)
    model = keras_tkfac.wrap(_conv_model())
    model.compile(optimizer=keras_tkfac.KFAC(seed=0), loss=LOSS)
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    assert asked == ["grouped"]
    for given, squared in zip(*factors):
        assert np.abs(squared).max() > 0
        np.testing.assert_allclose(given, squared, rtol=1e-5,
                                   atol=1e-6 * np.abs(squared).max())
