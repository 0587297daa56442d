"""SimpleRNN, LSTM and GRU blocks (and Bidirectional, TimeDistributed) against Keras.

The oracles: the recorded forward pass equals the layer's own; the rows' sum of
`a g^T` is Keras's gradient of the kernel, recurrent kernel and bias, for the batch
and for each example; the statistics equal the exact time-uncorrelated Fisher's
trace and partial traces (and the exact Fisher for one example of one time step);
the GRU's zero padding does not change the Kronecker solve.
"""

import numpy as np
import pytest
import tensorflow as tf
import keras

import keras_tkfac
from keras_tkfac import blocks, ops, recurrent, step_size
from tests import helpers

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
L = keras.layers
STEPS, FEATURES = 5, 3
REGISTERED = {**recurrent.RECURRENT_BLOCKS, L.RNN: recurrent.GenericRNNBlock}


@pytest.fixture(autouse=True)
def recurrent_blocks(monkeypatch):
    """The blocks are off by default; register them for this module only."""
    for layer_class, block_class in REGISTERED.items():
        monkeypatch.setitem(blocks.BLOCKS, layer_class, block_class)


def test_off_by_default_and_registered_on_request(monkeypatch):
    for layer_class in REGISTERED:
        monkeypatch.delitem(blocks.BLOCKS, layer_class)
    layers = [L.SimpleRNN(2), L.LSTM(2), L.GRU(2), L.RNN(L.LSTMCell(2))]
    for layer in layers:
        layer.build((None, STEPS, FEATURES))
        assert blocks.block_for(layer) is None
    keras_tkfac.register_recurrent_blocks()
    assert [type(blocks.block_for(layer)) for layer in layers] == [
        recurrent.SimpleRNNBlock, recurrent.LSTMBlock, recurrent.GRUBlock,
        recurrent.LSTMBlock]

# name: (layer factory, uses a mask, training-mode dropout). The first layer with a
# block in the model is the one checked (for Bidirectional: its forward layer).
CASES = {
    "simple_rnn": (lambda: L.SimpleRNN(4), False, False),
    "simple_rnn_sequences_backwards": (
        lambda: L.SimpleRNN(4, return_sequences=True, go_backwards=True,
                            activation="relu"), False, False),
    "simple_rnn_dropout": (
        lambda: L.SimpleRNN(4, dropout=0.3, recurrent_dropout=0.3), False, True),
    "lstm": (lambda: L.LSTM(3), False, False),
    "lstm_sequences_no_bias": (
        lambda: L.LSTM(3, return_sequences=True, use_bias=False), False, False),
    "lstm_masked_backwards": (lambda: L.LSTM(3, go_backwards=True), True, False),
    "lstm_dropout": (lambda: L.LSTM(3, dropout=0.4), False, True),
    "lstm_generic_rnn": (lambda: L.RNN(L.LSTMCell(3), return_sequences=True),
                         False, False),
    "gru": (lambda: L.GRU(4), False, False),
    "gru_sequences_masked": (lambda: L.GRU(2, return_sequences=True), True, False),
    "gru_no_bias_backwards": (lambda: L.GRU(4, use_bias=False, go_backwards=True),
                              False, False),
    "bidirectional_lstm": (
        lambda: L.Bidirectional(L.LSTM(3, return_sequences=True)), True, False),
    "bidirectional_gru_concat_sum": (
        lambda: L.Bidirectional(L.GRU(3), merge_mode="sum"), False, False),
}


def _mask_of(n, seed=0):
    """Right-padded sequences of random lengths 1..STEPS (Keras masks as Embedding's
    `mask_zero` would)."""
    lengths = np.random.default_rng(seed).integers(1, STEPS + 1, size=n)
    return np.arange(STEPS)[None] < lengths[:, None]


class _Masked(L.Layer):
    """Passes its input on with the mask given as a second input."""

    def call(self, inputs):
        return inputs[0]

    def compute_mask(self, inputs, previous_mask=None):
        return keras.ops.cast(inputs[1], "bool")


def _model(case, seed=1):
    make_layer, masked, _ = CASES[case]
    keras.utils.set_random_seed(seed)
    layer = make_layer()
    x_in = keras.Input((STEPS, FEATURES))
    inputs = [x_in]
    h = x_in
    if masked:
        mask_in = keras.Input((STEPS,), dtype="bool")
        inputs.append(mask_in)
        h = _Masked()([x_in, mask_in])
    h = layer(h)
    if len(h.shape) == 3:
        h = L.Flatten()(h)
    model = keras_tkfac.wrap(keras.Model(inputs, L.Dense(3)(h)))
    return model, layer


def _data(case, n, seed=0):
    rng = np.random.default_rng(seed)
    x = [rng.normal(size=(n, STEPS, FEATURES)).astype("float32")]
    if CASES[case][1]:
        x.append(_mask_of(n, seed))
    return x, rng.integers(0, 3, size=(n,)).astype("int32")


def _block(model, layer):
    inner = getattr(layer, "forward_layer", layer)
    return next(b for b in model.blocks if b.layer is inner)


def _record(model, block, x, y, xla=False):
    return helpers.empirical_rows(model, block, x, y, LOSS, xla=xla)


def _sum_of_outer_products(a, g):
    return np.einsum("rgi,rgo->gio", a, g) if a.ndim == 3 else a.T @ g


@pytest.mark.parametrize("case", sorted(CASES))
def test_rows_reproduce_keras_gradient(case):
    model, layer = _model(case)
    block = _block(model, layer)
    x, y = _data(case, 4)
    a, g, m, keras_grads, y_pred, plain = _record(model, block, x, y)
    if not CASES[case][2]:
        # The recorded forward pass is the layer's own.
        np.testing.assert_allclose(y_pred, plain, rtol=1e-5, atol=1e-6)
    assert m == 4 and len(a) == 4 * STEPS
    # Sum over rows of a g^T is the gradient of the summed loss; Keras's is the mean.
    matrix = _sum_of_outer_products(a, g) / m
    updates = [u for u in block.split_matrix(tf.constant(matrix, tf.float32))
               if u is not None]
    assert len(updates) == len(keras_grads) == len(block.variables)
    for update, expected in zip(updates, keras_grads):
        np.testing.assert_allclose(update.numpy(), expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
        block.grad_matrix(*keras_grads).numpy(), matrix, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("case", ["lstm_masked_backwards", "gru_sequences_masked"])
def test_masked_time_steps_give_zero_rows(case):
    model, layer = _model(case)
    block = _block(model, layer)
    x, y = _data(case, 4)
    a, g, _, _, _, _ = _record(model, block, x, y)
    masked = ~x[1].reshape(-1)
    assert masked.any() and not masked.all()
    np.testing.assert_array_equal(a[masked], 0.0)
    np.testing.assert_array_equal(g[masked], 0.0)
    assert np.all(np.abs(a[~masked]).reshape(int((~masked).sum()), -1).max(1) > 0)


@pytest.mark.parametrize("case", ["lstm", "gru_sequences_masked"])
def test_rows_reproduce_keras_gradient_under_xla(case):
    model, layer = _model(case)
    block = _block(model, layer)
    x, y = _data(case, 3)
    a, g, m, keras_grads, y_pred, plain = _record(model, block, x, y, xla=True)
    np.testing.assert_allclose(y_pred, plain, rtol=1e-5, atol=1e-6)
    matrix = _sum_of_outer_products(a, g) / m
    np.testing.assert_allclose(block.grad_matrix(*keras_grads).numpy(), matrix,
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("case", ["simple_rnn_sequences_backwards", "lstm",
                                  "gru_sequences_masked"])
def test_rows_are_per_example_gradients(case):
    model, layer = _model(case)
    block = _block(model, layer)
    x, y = _data(case, 3, seed=2)
    a, g, m, _, _, _ = _record(model, block, x, y)
    for n in range(m):
        part = slice(n * STEPS, (n + 1) * STEPS)
        np.testing.assert_allclose(_sum_of_outer_products(a[part], g[part]),
                                   _example_gradient(model, block, x, y, n),
                                   rtol=1e-4, atol=1e-6)


def _example_gradient(model, block, x, y, n):
    """Keras's gradient of example `n`'s loss as `block`'s gradient matrix."""
    with tf.GradientTape() as tape:
        loss_n = LOSS(y[n:n + 1], model([v[n:n + 1] for v in x], training=True))
    return block.grad_matrix(*tape.gradient(loss_n, block.variables)).numpy()


@pytest.mark.parametrize("case", ["lstm", "gru"])
def test_statistics_against_time_uncorrelated_fisher(case):
    model, layer = _model(case)
    block = _block(model, layer)
    x, y = _data(case, 3, seed=3)
    a, g, m, _, _, _ = _record(model, block, x, y)
    a_groups = a[:, None] if a.ndim == 2 else a
    g_groups = g[:, None] if g.ndim == 2 else g
    delta, n_phi, n_psi = (t.numpy() for t in ops.tkfac_statistics_grouped(
        tf.constant(a_groups), tf.constant(g_groups), m))
    for j in range(block.groups):
        helpers.assert_tkfac_is_uncorrelated_fisher(
            (delta[j], n_phi[j], n_psi[j]), a_groups[:, j], g_groups[:, j], m)


@pytest.mark.parametrize("case", ["simple_rnn_sequences_backwards", "lstm_masked_backwards",
                                  "gru_sequences_masked"])
def test_sequence_statistics_are_the_exact_blocks_trace_and_partial_traces(case):
    # TKFAC's default `sequence_statistics="exact"`: each sequence's rows `a_n`,
    # `g_n` (`[example, time, (group,) d]`) give example n's gradient `a_n^T g_n`
    # (Keras's), and `ops.tkfac_statistics_sequences` the trace and partial traces
    # of the exact block, time steps' cross terms included.
    model, layer = _model(case)
    block = _block(model, layer)
    x, y = _data(case, 3, seed=5)
    a, g, m, _, _, _ = helpers.empirical_rows(model, block, x, y, LOSS, sequences=True)
    assert a.shape[:2] == g.shape[:2] == (3, STEPS)
    a_groups = a[:, :, None] if a.ndim == 3 else a
    g_groups = g[:, :, None] if g.ndim == 3 else g
    for n in range(m):
        got = np.einsum("tgi,tgo->gio", a_groups[n], g_groups[n])
        np.testing.assert_allclose(got if a.ndim == 4 else got[0],
                                   _example_gradient(model, block, x, y, n),
                                   rtol=1e-4, atol=1e-6)
    delta, n_phi, n_psi = (t.numpy() for t in ops.tkfac_statistics_sequences(
        tf.constant(a_groups), tf.constant(g_groups), m))
    example = np.repeat(np.arange(m), STEPS)
    for j in range(block.groups):
        rows_a = a_groups[:, :, j].reshape(m * STEPS, -1)
        rows_g = g_groups[:, :, j].reshape(m * STEPS, -1)
        exact = helpers.exact_fisher(rows_a, rows_g, example, m, cross_locations=True)
        tr_out, tr_in = helpers.partial_traces(exact, rows_a.shape[1], rows_g.shape[1])
        np.testing.assert_allclose(delta[j], np.trace(exact), rtol=1e-10)
        np.testing.assert_allclose(n_phi[j], tr_out, rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(n_psi[j], tr_in, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("layer_class", [L.SimpleRNN, L.LSTM, L.GRU])
def test_tkfac_is_exact_for_one_example_of_one_time_step(layer_class):
    keras.utils.set_random_seed(0)
    layer = layer_class(2)
    x_in = keras.Input((1, FEATURES))
    model = keras_tkfac.wrap(keras.Model(x_in, L.Dense(3)(layer(x_in))))
    block = model.blocks[0]
    x = np.random.default_rng(4).normal(size=(1, 1, FEATURES)).astype("float32")
    a, g, m, _, _, _ = _record(model, block, [x], np.array([1], "int32"))
    for j in range(block.groups):
        a_j = a[:, j] if a.ndim == 3 else a
        g_j = g[:, j] if g.ndim == 3 else g
        delta, n_phi, n_psi = (t.numpy() for t in ops.tkfac_statistics(
            tf.constant(a_j), tf.constant(g_j), m))
        exact = helpers.exact_fisher(a_j, g_j, np.zeros(1, int), 1,
                                     cross_locations=True)
        np.testing.assert_allclose(np.kron(n_phi, n_psi) / delta, exact,
                                   rtol=1e-8, atol=1e-12)


def test_gru_padding_does_not_change_the_kronecker_solve():
    # Group 0 (input part) has 3 + 1 rows and is padded to the recurrent part's
    # 5 + 1: the padded factor and gradient give the unpadded solve, zeros elsewhere.
    rng = np.random.default_rng(5)
    rows, d, width, d_out, damping = 40, 3, 5, 6, 0.1
    a = rng.normal(size=(rows, d + 1))
    g = rng.normal(size=(rows, d_out))
    grad = rng.normal(size=(d + 1, d_out))
    left = a.T @ a / rows + damping * np.eye(d + 1)
    right = g.T @ g / rows + damping * np.eye(d_out)
    expected = helpers.kron_solve(left, right, grad)

    padded_a = np.concatenate([a[:, :d], np.zeros((rows, width - d)), a[:, d:]], 1)
    padded_grad = np.concatenate([grad[:d], np.zeros((width - d, d_out)), grad[d:]])
    padded_left = padded_a.T @ padded_a / rows + damping * np.eye(width + 1)
    update = ops.precondition(
        tf.constant(np.linalg.inv(padded_left), tf.float64),
        tf.constant(padded_grad, tf.float64),
        tf.constant(np.linalg.inv(right), tf.float64)).numpy()
    np.testing.assert_allclose(update[:d], expected[:d], rtol=1e-10)
    np.testing.assert_allclose(update[-1], expected[-1], rtol=1e-10)
    np.testing.assert_array_equal(update[d:width], 0.0)


def _rms(grad):
    """RMSProp's first bias-corrected step from a zero moment, in numpy."""
    beta = step_size.GRAFT_BETA_2
    return grad / (np.sqrt((1 - beta) * grad ** 2 / (1 - beta)) + step_size.GRAFT_EPSILON)


@pytest.mark.parametrize("case", ["lstm", "gru", "simple_rnn", "lstm_sequences_no_bias"])
def test_grafting_gives_each_recurrent_variable_its_own_rmsprop_length(case):
    """Each variable's part of the grafted update has its own RMSProp step's norm
    and the curvature's direction within it; a dense block is grafted whole."""
    model, layer = _model(case)
    block = _block(model, layer)
    head = next(b for b in model.blocks if b.layer is not block.layer)
    rng = np.random.default_rng(0)
    for this, per_variable in ((block, True), (head, False)):
        assert this.graft_per_variable is per_variable
        shapes = [v.shape for v in this.variables]
        draw = lambda: this.grad_matrix(*[  # noqa: E731
            tf.constant(rng.normal(size=s).astype("float32")) for s in shapes])
        update, grad = draw(), draw()
        (new,), _ = step_size.graft_updates([update], [grad], [tf.zeros_like(grad)],
                                            1, [this])
        if not per_variable:
            r = _rms(grad.numpy())
            np.testing.assert_allclose(
                new.numpy(), update.numpy() * np.linalg.norm(r) / np.linalg.norm(
                    update.numpy()), rtol=1e-5)
            continue
        parts = zip(*[[p for p in this.split_matrix(m) if p is not None]
                      for m in (new, update, grad)])
        count = 0
        for n, u, g in parts:
            r = _rms(g.numpy())
            np.testing.assert_allclose(
                n.numpy(), u.numpy() * np.linalg.norm(r) / np.linalg.norm(u.numpy()),
                rtol=1e-5)
            count += 1
        assert count == len(this.variables)


def test_recurrent_variables_move_by_their_own_rmsprop_lengths_in_training():
    """One `"graft"` step: each LSTM variable moves by the same multiple of its own
    RMSProp step's norm (the whole layer's would give the bias ~10x Adam's step)."""
    model, layer = _model("lstm")
    x, y = _data("lstm", 16)
    with tf.GradientTape() as tape:
        loss = LOSS(y, model(x, training=True))
    grads = dict(zip([v.path for v in layer.trainable_variables],
                     tape.gradient(loss, layer.trainable_variables)))
    before = {v.path: v.numpy() for v in layer.trainable_variables}
    model.compile(optimizer=keras_tkfac.TKFAC(step_control="graft", seed=0), loss=LOSS)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    ratios = [np.linalg.norm(v.numpy() - before[v.path])
              / np.linalg.norm(_rms(grads[v.path].numpy()))
              for v in layer.trainable_variables]
    assert len(ratios) == 3 and ratios[0] > 0
    np.testing.assert_allclose(ratios, ratios[0], rtol=1e-4)


@pytest.mark.parametrize("layer", [
    L.LSTM(3, stateful=True), L.LSTM(3, recurrent_dropout=0.2),
    L.GRU(3, reset_after=False), L.GRU(3, implementation=1, dropout=0.1),
    L.RNN(L.StackedRNNCells([L.LSTMCell(3), L.LSTMCell(3)])),
], ids=["stateful", "lstm_recurrent_dropout", "gru_reset_before",
        "gru_per_gate_dropout", "stacked_cells"])
def test_declined_configurations_take_the_fallback(layer):
    batch = (2,) if layer.stateful else ()
    inputs = keras.Input((STEPS, FEATURES), batch_size=batch[0] if batch else None)
    layer(inputs)
    assert blocks.block_for(layer) is None


def test_time_distributed_dense_records_every_time_step():
    keras.utils.set_random_seed(0)
    dense = L.Dense(4, activation="tanh")
    x_in = keras.Input((STEPS, FEATURES))
    h = L.Flatten()(L.TimeDistributed(dense)(x_in))
    model = keras_tkfac.wrap(keras.Model(x_in, L.Dense(3)(h)))
    block = next(b for b in model.blocks if b.layer is dense)
    x, y = _data("lstm", 4)
    a, g, m, keras_grads, y_pred, plain = _record(model, block, x, y)
    np.testing.assert_allclose(y_pred, plain, rtol=1e-5, atol=1e-6)
    assert len(a) == 4 * STEPS
    np.testing.assert_allclose(block.grad_matrix(*keras_grads).numpy(),
                               a.T @ g / m, rtol=1e-4, atol=1e-6)


# Training, saving and replicas --------------------------------------------------


def _sequence_model():
    """A keras-io-shaped text classifier: Embedding (masked), BiLSTM, GRU, head."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((None,), dtype="int32")
    h = L.Embedding(30, 8, mask_zero=True)(inputs)
    h = L.Bidirectional(L.LSTM(6, return_sequences=True), name="bilstm")(h)
    h = L.GRU(6, name="gru")(h)
    return keras.Model(inputs, L.Dense(2, name="head")(h))


def _sequence_data(n=128, seed=0):
    """Whether token 1 occurs among the first half of a right-padded sequence."""
    rng = np.random.default_rng(seed)
    x = rng.integers(2, 30, size=(n, 8))
    lengths = rng.integers(4, 9, size=n)
    y = rng.integers(0, 2, size=n)
    for i in range(n):
        if y[i]:
            x[i, rng.integers(0, lengths[i] // 2)] = 1
        x[i, lengths[i]:] = 0
    return x.astype("int32"), y.astype("int32")


# KFAC's run (~30 s) is in `make test-all`; the recurrent blocks are the same.
@pytest.mark.parametrize("cls", [keras_tkfac.TKFAC,
                                 pytest.param(keras_tkfac.KFAC, marks=pytest.mark.slow)])
def test_recurrent_model_trains_with_its_layers_preconditioned(cls):
    x, y = _sequence_data()
    model = keras_tkfac.wrap(_sequence_model())
    model.compile(optimizer=cls(learning_rate=1e-2, seed=0), loss=LOSS,
                  metrics=["accuracy"])
    history = model.fit(x, y, batch_size=32, epochs=12, verbose=0).history
    assert np.all(np.isfinite(history["loss"]))
    assert history["loss"][-1] < 0.7 * history["loss"][0], history["loss"]
    bilstm = model.model.get_layer("bilstm")
    recurrent_names = [bilstm.forward_layer.name, bilstm.backward_layer.name, "gru"]
    names = {slot.block.name for slot in model.optimizer._slots}
    assert {*recurrent_names, "head"} <= names
    report = model.optimizer.curvature_report()
    for name in recurrent_names:
        assert report[name]["trace"] > 0 and np.isfinite(report[name]["cond_left"])
        assert report[name]["update_ratio"] > 0, name


def test_keras_file_round_trip_keeps_recurrent_curvature_state(tmp_path):
    x, y = _sequence_data(n=48)
    # The "graft" step: see `_fit_on`.
    loaded = helpers.keras_round_trip(_sequence_model(), x, y, LOSS,
                                      str(tmp_path / "model.keras"),
                                      step_control="graft")
    assert recurrent.GRUBlock in [type(b) for b in loaded.blocks]


def test_loading_without_the_recurrent_blocks_names_their_registration(
        tmp_path, monkeypatch):
    model = keras_tkfac.wrap(_small_sequence_model())
    model.compile(optimizer=keras_tkfac.TKFAC(seed=0), loss=LOSS)
    path = str(tmp_path / "model.keras")
    model.save(path)
    for layer_class in REGISTERED:
        monkeypatch.delitem(blocks.BLOCKS, layer_class)
    with pytest.raises(ValueError, match=r"register_recurrent_blocks\(\)"):
        keras.models.load_model(path)


def _small_sequence_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((None,), dtype="int32")
    h = L.Embedding(30, 8, mask_zero=True, name="embedding")(inputs)
    h = L.LSTM(6, name="lstm")(h)
    return keras.Model(inputs, L.Dense(2, name="head")(h))


def _fit_on(strategy, x, y):
    # The recurrent blocks' statistics are the subject: the "graft" step saves the
    # products, which pass Keras's LSTM loop only in reverse-over-reverse mode
    # (~40 s more here; `tests/test_quadratic.py` covers them).
    with strategy.scope():
        model = keras_tkfac.wrap(_small_sequence_model())
        model.compile(optimizer=keras_tkfac.TKFAC(
            fisher="empirical", factor_update_freq=2, inverse_update_freq=3, seed=0,
            step_control="graft"), loss=LOSS)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
    model.fit(dataset, epochs=2, shuffle=False, verbose=0)
    return model


def test_two_replicas_match_one_device(mirrored):
    x, y = _sequence_data(n=64)
    single = _fit_on(tf.distribute.get_strategy(), x, y)
    replicated = _fit_on(mirrored, x, y)
    assert {slot.block.name for slot in replicated.optimizer._slots} == {
        "embedding", "lstm", "head"}
    helpers.assert_replicas_match_one_device(single, replicated)
