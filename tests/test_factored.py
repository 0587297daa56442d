"""The factored preconditioning form `(L^-1 a^T)(g R^-1)` (`keras_tkfac.factored`)."""

import numpy as np
import pytest
import tensorflow as tf
import keras

import keras_tkfac
from keras_tkfac import blocks
from keras_tkfac import factored
from keras_tkfac import ops
from tests import helpers


def _tkfac_inverses(d_in, d_out, damping, seed):
    """float64 TKFAC inverses of a damped block, and the numpy damped factors."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(30, d_in))
    g = rng.normal(size=(30, d_out))
    delta, n_phi, n_psi = ops.tkfac_statistics(tf.constant(a), tf.constant(g), 30)
    phi_hat, psi_hat = ops.tkfac_damped_factors(delta, n_phi, n_psi, damping)
    left_inv, _ = ops.symmetric_inverse(phi_hat)
    right_inv, _ = ops.symmetric_inverse(psi_hat)
    refs = helpers.tkfac_damped_numpy(*helpers.tkfac_numpy(a, g, 30), damping)
    return left_inv, right_inv, refs


def test_factored_form_equals_the_kronecker_solve_of_the_row_sum():
    left_inv, right_inv, (ref_left, ref_right) = _tkfac_inverses(6, 4, 0.1, 0)
    rng = np.random.default_rng(1)
    a, g = rng.normal(size=(3, 6)), rng.normal(size=(3, 4))
    update = ops.precondition_factored(left_inv, tf.constant(a), tf.constant(g),
                                       right_inv).numpy()
    expected = helpers.kron_solve(ref_left, ref_right, a.T @ g)
    np.testing.assert_allclose(update, expected, atol=1e-8 * np.abs(expected).max())


def test_flop_model_counts_the_products():
    # Full: [d_in,d_in][d_in,d_out] and [d_in,d_out][d_out,d_out]; factored:
    # [d_in,d_in][d_in,n], [n,d_out][d_out,d_out] and [d_in,n][n,d_out].
    assert ops.full_precondition_flops(785, 512) == 2 * (785**2 * 512 + 785 * 512**2)
    assert ops.factored_precondition_flops(256, 785, 512) == 2 * (
        785**2 * 256 + 256 * 512**2 + 785 * 256 * 512)
    # The first layer of the benchmark's MLP: 37% fewer flops at batch 256.
    ratio = (ops.factored_precondition_flops(256, 785, 512)
             / ops.full_precondition_flops(785, 512))
    assert 0.62 < ratio < 0.64


@pytest.fixture
def factored_calls(monkeypatch):
    """The `(rows, d_in)` of every factored product built while tracing."""
    calls = []
    original = ops.precondition_factored

    def spy(left_inverse, a, g, right_inverse):
        calls.append((a.shape[0], a.shape[1]))
        return original(left_inverse, a, g, right_inverse)

    monkeypatch.setattr(ops, "precondition_factored", spy)
    return calls


@pytest.mark.parametrize("rows", [2, 50])
def test_precondition_many_takes_the_cheaper_form(rows, factored_calls):
    # d_in=6, d_out=4: full 480 flops, factored 152 per row: factored below 3.2 rows.
    left_inv, right_inv, (ref_left, ref_right) = _tkfac_inverses(6, 4, 0.1, 2)
    rng = np.random.default_rng(3)
    a, g = rng.normal(size=(rows, 6)), rng.normal(size=(rows, 4))
    item = ops.FactoredGradient(tf.constant(a), tf.constant(g), tf.constant(a.T @ g))
    (update,) = ops.precondition_many([left_inv], [item], [right_inv], tf.float64)
    expected = helpers.kron_solve(ref_left, ref_right, a.T @ g)
    np.testing.assert_allclose(update.numpy(), expected,
                               atol=1e-8 * np.abs(expected).max())
    assert len(factored_calls) == (1 if rows == 2 else 0)


def test_unknown_number_of_rows_chooses_at_run_time():
    left_inv, right_inv, (ref_left, ref_right) = _tkfac_inverses(6, 4, 0.1, 4)

    @tf.function(input_signature=[tf.TensorSpec([None, 6], tf.float64),
                                  tf.TensorSpec([None, 4], tf.float64)])
    def update(a, g):
        item = ops.FactoredGradient(a, g, tf.matmul(a, g, transpose_a=True))
        return ops.precondition_factored_or_full(left_inv, item, right_inv, tf.float64)

    rng = np.random.default_rng(5)
    for rows in (2, 50):  # the factored branch, then the full one
        a, g = rng.normal(size=(rows, 6)), rng.normal(size=(rows, 4))
        expected = helpers.kron_solve(ref_left, ref_right, a.T @ g)
        np.testing.assert_allclose(update(a, g).numpy(), expected,
                                   atol=1e-8 * np.abs(expected).max())


def test_rows_give_gradient_catches_a_term_the_rows_do_not_carry():
    rng = np.random.default_rng(6)
    a, g = rng.normal(size=(8, 30)), rng.normal(size=(8, 20))
    matrix = a.T @ g
    check = lambda m: bool(ops.rows_give_gradient(  # noqa: E731
        ops.FactoredGradient(tf.constant(a, tf.float32), tf.constant(g, tf.float32),
                             tf.constant(m, tf.float32))))
    assert check(matrix)
    assert not check(np.zeros_like(matrix))  # rows without their gradient
    # A tied decoder's gradient, 10% of the rows' term, and a clipped gradient.
    assert not check(matrix + 0.1 * rng.normal(size=matrix.shape) * np.abs(matrix).mean())
    assert not check(0.5 * matrix)
    zeros = ops.FactoredGradient(tf.zeros([8, 30]), tf.zeros([8, 20]), tf.zeros([30, 20]))
    assert bool(ops.rows_give_gradient(zeros))


def test_which_layers_may_use_rows():
    x = keras.Input((40,))
    dense = keras.layers.Dense(30)
    regularized = keras.layers.Dense(30, kernel_regularizer="l2")
    conv = keras.layers.Conv1D(4, 3)
    keras.Model(x, [dense(x), regularized(x), conv(keras.layers.Reshape((40, 1))(x))])
    block = blocks.DenseBlock(dense)
    assert factored.may_factor(block, 8)
    assert factored.may_factor(block, None)  # decided at run time
    # 41 x 30: full 2*41*30*71 flops, factored 2*(41^2 + 30^2 + 41*30) per row.
    assert not factored.may_factor(block, 60)
    assert not factored.may_factor(blocks.DenseBlock(regularized), 8)


def test_which_convolutions_may_use_rows():
    x = keras.Input((40, 8))
    conv = keras.layers.Conv1D(16, 3, strides=2)
    grouped = keras.layers.Conv1D(16, 3, groups=2)
    regularized = keras.layers.Conv1D(16, 3, kernel_regularizer="l2")
    transpose = keras.layers.Conv1DTranspose(16, 3)
    depthwise = keras.layers.DepthwiseConv1D(3)
    separable = keras.layers.SeparableConv1D(16, 3)
    outputs = [conv(x), grouped(x), regularized(x), transpose(x), depthwise(x),
               separable(x)]
    keras.Model(x, outputs)
    block = blocks.ConvBlock(conv)
    # 25 x 16 (3 taps x 8 channels and the bias): full 2*25*16*41 flops, factored
    # 2*(25^2 + 16^2 + 25*16) per row: factored below 12.8 rows.
    assert (block.d_in, block.d_out) == (25, 16)
    assert factored.may_factor(block, 12)
    assert not factored.may_factor(block, 13)
    # An unknown number of rows: not decided at run time (the patches would be
    # built every step for every convolution). A separable convolution's pointwise
    # rows are its depthwise output, which the layer computes anyway: decided then.
    assert not factored.may_factor(block, None)
    assert factored.may_factor(blocks.SeparableConvBlock(separable), None)
    assert not factored.may_factor(blocks.ConvBlock(grouped), 1)
    assert not factored.may_factor(blocks.ConvBlock(regularized), 1)
    assert not factored.may_factor(blocks.ConvTransposeBlock(transpose), 1)
    assert not factored.may_factor(blocks.DepthwiseConvBlock(depthwise), 1)


def test_a_convolutions_rows_are_counted_at_its_output_locations():
    # Conv1D(strides=2) on 40 steps: 19 output locations; a Dense on sequences of
    # 3 positions: 3 rows per example; both for 2 calls of batch 4 and 5.
    conv = keras.layers.Conv1D(16, 3, strides=2)
    dense = keras.layers.Dense(6)
    calls = [(tf.zeros([n, 40, 8]), conv(tf.zeros([n, 40, 8]))) for n in (4, 5)]
    assert factored._static_rows(blocks.ConvBlock(conv), calls) == 9 * 19
    calls = [(tf.zeros([n, 3, 8]), dense(tf.zeros([n, 3, 8]))) for n in (4, 5)]
    assert factored._static_rows(blocks.DenseBlock(dense), calls) == 9 * 3


def _model():
    """Dense on vectors and on sequences, EinsumDense, and a regularized Dense."""
    keras.utils.set_random_seed(1)
    x = keras.Input((12,))
    h = keras.layers.Dense(48, activation="tanh", name="wide")(x)
    s = keras.layers.Reshape((2, 24))(h)
    s = keras.layers.Dense(64, activation="relu", name="per_position")(s)
    s = keras.layers.EinsumDense("abc,cd->abd", output_shape=(2, 64),
                                 bias_axes="d", name="einsum")(s)
    h = keras.layers.Flatten()(s)
    h = keras.layers.Dense(48, activation="relu", kernel_regularizer="l2",
                           name="regularized")(h)
    return keras.Model(x, keras.layers.Dense(5, name="logits")(h))


def _fit(form, loss_scale, step_control):
    model = keras_tkfac.wrap(_model())
    # Without a KL bound, `"trust_region"` steps by `learning_rate * U`: a wrong
    # scale of the rows would show (grafting would hide it in the length).
    optimizer = keras_tkfac.TKFAC(
        seed=0, precondition_form=form, factor_update_freq=2, inverse_update_freq=4,
        step_control=step_control,
        **({} if step_control == "graft" else {"kl_clip": None, "learning_rate": 0.01}))
    if loss_scale:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    # Not XLA-compiled: compiling costs more than these 16 steps.
    model.compile(optimizer=optimizer, jit_compile=False,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.random.default_rng(7).normal(size=(64, 12)).astype("float32")
    y = np.arange(64) % 5
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    return model.get_weights()


@pytest.mark.parametrize("loss_scale,step_control",
                         [(False, "graft"), (True, "trust_region")])
def test_fit_with_the_factored_form_takes_the_same_steps(loss_scale, step_control,
                                                         factored_calls):
    auto = _fit("auto", loss_scale, step_control)
    used = sorted(set(factored_calls))
    factored_calls.clear()
    full = _fit("full", loss_scale, step_control)
    assert not factored_calls
    # Batch 8: the 13 x 48 layer (8 rows), the per-position Dense (16 rows of 25)
    # and the EinsumDense (16 rows of 65) take the factored form; the regularized
    # layer (its gradient is not a^T g) and the 49 x 5 logits layer (the full form
    # has fewer flops) do not.
    assert used == [(8, 13), (16, 25), (16, 65)]
    for w_auto, w_full in zip(auto, full):
        np.testing.assert_allclose(w_auto, w_full, rtol=1e-4, atol=1e-5)


def _conv_model():
    """Convolutions whose late outputs are small: at batch 4 the second Conv2D
    (2x2 outputs: 16 rows of 73) and the causal dilated Conv1D (16 rows of 65)
    have fewer flops in factored form, the first Conv2D (64 rows) does not."""
    keras.utils.set_random_seed(3)
    x = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu",
                            name="wide")(x)
    h = keras.layers.Conv2D(32, 3, activation="tanh", name="late")(h)
    h = keras.layers.Reshape((4, 32))(h)
    h = keras.layers.Conv1D(24, 2, padding="causal", dilation_rate=2,
                            activation="relu", name="causal")(h)
    return keras.Model(x, keras.layers.Dense(5, name="logits")(keras.layers.Flatten()(h)))


def _conv_fit(form, dataset_batch=None):
    """8 steps of `fit` on `_conv_model`: on arrays at batch 4 (a batch size known
    when traced), or on a dataset batched by `dataset_batch` without
    `drop_remainder` (a batch dimension of `None`)."""
    model = keras_tkfac.wrap(_conv_model())
    model.compile(optimizer=keras_tkfac.TKFAC(
        seed=0, precondition_form=form, factor_update_freq=2, inverse_update_freq=4,
        step_control="trust_region", kl_clip=None, learning_rate=0.01),
        jit_compile=False,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.random.default_rng(9).normal(size=(16, 8, 8, 3)).astype("float32")
    y = np.arange(16) % 5
    if dataset_batch is None:
        model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0)
    else:
        data = tf.data.Dataset.from_tensor_slices((x, y)).batch(dataset_batch)
        model.fit(data, epochs=2 * dataset_batch // 4, shuffle=False, verbose=0)
    return model.get_weights()


def test_convolutions_with_few_rows_take_the_factored_form(factored_calls, monkeypatch):
    # The run-time check (`rows_give_gradient`) is made to pass always, so that a
    # wrong row would change the weights instead of sending the step to the full
    # form: the factored form of the convolutions is then checked by the full one.
    monkeypatch.setattr(ops, "rows_give_gradient", lambda grad: tf.constant(True))
    auto = _conv_fit("auto")
    assert sorted(set(factored_calls)) == [(4, 97), (16, 65), (16, 73)]
    factored_calls.clear()
    full = _conv_fit("full")
    assert not factored_calls
    for w_auto, w_full in zip(auto, full):
        np.testing.assert_allclose(w_auto, w_full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("batch,factored_steps", [(4, 8), (16, 0)])
def test_convolutions_with_an_unknown_batch_size_choose_at_run_time(
        batch, factored_steps, monkeypatch):
    # A dataset batched without `drop_remainder`: the convolutions' number of rows
    # is unknown when traced, so their patches are built in a run-time branch,
    # taken at batch 4 (16 rows of 73 and of 65: fewer flops) on every step, not at
    # batch 16 (64 rows). Counted when the factored products run; the run-time
    # check is forced to pass, as above, so that a wrong row would show.
    monkeypatch.setattr(ops, "rows_give_gradient", lambda grad: tf.constant(True))
    runs = tf.Variable(0)
    traced = []
    original = ops.precondition_factored

    def counting(left_inverse, a, g, right_inverse):
        traced.append((a.shape[0], a.shape[1]))
        with tf.control_dependencies([runs.assign_add(1)]):
            return tf.identity(original(left_inverse, a, g, right_inverse))

    monkeypatch.setattr(ops, "precondition_factored", counting)
    auto = _conv_fit("auto", dataset_batch=batch)
    # The strided Conv2D gets no branch: one example has 16 rows of 28, more than
    # the 7.5 below which its factored form has fewer flops. The two late
    # convolutions and the Dense (whose rows are unknown too) take theirs at batch 4.
    assert sorted(set(traced), key=str) == [(None, 65), (None, 73), (None, 97)]
    assert int(runs.numpy()) == (3 if factored_steps else 0) * factored_steps
    full = _conv_fit("full", dataset_batch=batch)
    for w_auto, w_full in zip(auto, full):
        np.testing.assert_allclose(w_auto, w_full, rtol=1e-4, atol=1e-5)


# 28 s (a fit and a custom loop); `make test-all` runs it.
@pytest.mark.slow
def test_custom_loop_with_loss_output_gradients_matches_fit(factored_calls):
    fitted = _fit("auto", False, "graft")
    assert factored_calls
    factored_calls.clear()
    model = keras_tkfac.wrap(_model())
    optimizer = keras_tkfac.TKFAC(seed=0, factor_update_freq=2, inverse_update_freq=4)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def train_step(x, y):
        with tf.GradientTape(persistent=True) as tape:
            with keras_tkfac.record(model) as recording:
                y_pred = model(x, training=True)
            loss = loss_fn(y, y_pred) + tf.add_n(model.losses)
        grads, output_grads = tape.gradient(
            loss, (model.trainable_variables, recording.outputs()))
        optimizer.update_curvature(recording, tape, y_pred, y_true=y, loss=loss_fn,
                                   loss_output_gradients=output_grads)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))

    x = np.random.default_rng(7).normal(size=(64, 12)).astype("float32")
    y = np.arange(64) % 5
    for _ in range(2):
        for start in range(0, 64, 8):
            train_step(x[start:start + 8], y[start:start + 8])
    assert sorted(set(factored_calls)) == [(8, 13), (16, 25), (16, 65)]
    for w_loop, w_fit in zip(model.get_weights(), fitted):
        np.testing.assert_allclose(w_loop, w_fit, rtol=1e-4, atol=1e-5)


class _TiedDecoder(keras.layers.Layer):
    """Decodes with the transpose of an encoder `Dense`'s kernel (tied weights)."""

    def __init__(self, encoder, **kwargs):
        super().__init__(**kwargs)
        self.encoder = encoder

    def call(self, h):
        return keras.ops.matmul(h, keras.ops.transpose(self.encoder.kernel))


def _tied_fit(form):
    keras.utils.set_random_seed(2)
    x = keras.Input((40,))
    encoder = keras.layers.Dense(48, activation="tanh", name="encoder")
    h = encoder(x)
    model = keras_tkfac.wrap(keras.Model(x, _TiedDecoder(encoder)(h)))
    model.compile(optimizer=keras_tkfac.TKFAC(
        seed=0, precondition_form=form, factor_update_freq=2, inverse_update_freq=4,
        step_control="trust_region", kl_clip=None, learning_rate=0.01), loss="mse",
        jit_compile=False)
    data = np.random.default_rng(8).normal(size=(32, 40)).astype("float32")
    model.fit(data, data, batch_size=8, epochs=2, shuffle=False, verbose=0)
    return model.get_weights()


def test_tied_weights_take_the_full_form(factored_calls):
    # The encoder's kernel also gets the decoder's gradient, which its rows do not
    # carry: the run-time check must send it to the full form.
    auto = _tied_fit("auto")
    assert factored_calls == [(8, 41)] * len(factored_calls) and factored_calls
    full = _tied_fit("full")
    for w_auto, w_full in zip(auto, full):
        np.testing.assert_allclose(w_auto, w_full, rtol=1e-4, atol=1e-5)


def test_flop_model_of_the_curvature_products():
    # tools/benchlib.step_flops: under the quadratic step controls each of the two
    # directions costs a forward-mode pass, the forward `x W` and the tangent
    # `x dW + dx W` (no `dx` into the first layer): as many FLOPs as the forward
    # and backward passes; nested (`products.NESTED`), one forward pass for both;
    # the damping's check adds a forward pass every 5 steps.
    import sys  # pylint: disable=import-outside-toplevel
    from tests.test_examples import _ROOT  # pylint: disable=import-outside-toplevel
    sys.path.insert(0, str(_ROOT / "tools"))
    import benchlib  # pylint: disable=import-outside-toplevel

    shapes = [benchlib.LayerShape(785, 512, 1, True, True),
              benchlib.LayerShape(513, 10, 1, False, True)]
    plain = benchlib.step_flops(shapes, 256, factor_update_freq=10,
                                inverse_update_freq=100)
    forward = 2 * 256 * (785 * 512 + 513 * 10)
    tangents = 2 * 256 * (785 * 512 + 2 * 513 * 10)
    for nested, passes in ((False, 2), (True, 1)):
        flops = benchlib.step_flops(shapes, 256, factor_update_freq=10,
                                    inverse_update_freq=100, product_directions=2,
                                    loss_check_freq=5, nested_products=nested)
        assert flops["curvature_products"] == (passes * forward + 2 * tangents
                                               + forward / 5)
        assert flops["forward_backward"] == forward + tangents
        assert {k: v for k, v in flops.items() if k != "curvature_products"} == plain
    for control, expected in [("graft_quadratic", 2), ("graft", 0)]:
        arguments = benchlib.product_arguments(
            keras_tkfac.TKFAC(step_control=control))
        assert arguments.get("product_directions", 0) == expected
