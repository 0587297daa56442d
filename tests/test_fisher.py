"""The true-Fisher sampler converges to the analytic Fisher; loss resolution errors."""

import numpy as np
import pytest
import tensorflow as tf
import keras

import keras_tkfac
from keras_tkfac import fisher, loss_specs
from tests import helpers

SAMPLES = 20000


def _sampled_rows(model, x, loss):
    """Rows of the output layer for SAMPLES label draws per example."""
    tiled = np.repeat(x, SAMPLES, axis=0)
    with tf.GradientTape(persistent=True) as tape:
        with keras_tkfac.record(model) as recording:
            y_pred = model(tiled, training=True)
    spec = loss_specs.resolve_loss(loss, "true")
    source, cotangent, num_examples = fisher.output_cotangent(
        spec, "true", None, y_pred, tf.constant([7, 3])
    )
    grads = tape.gradient(source, recording.outputs(), output_gradients=cotangent)
    a, g = recording.rows(grads)[-1]
    return a.numpy().astype(np.float64), g.numpy().astype(np.float64), int(num_examples)


def _output_model(activation, units=4):
    keras.utils.set_random_seed(3)
    return keras_tkfac.wrap(
        keras.Sequential([keras.Input((3,)), keras.layers.Dense(units, activation=activation)])
    )


def _per_example_second_moment(g, num_examples):
    g = g.reshape(num_examples, SAMPLES, -1)
    return np.einsum("nsi,nsj->nij", g, g) / SAMPLES


# Standard error of a mean of SAMPLES products bounded by 1 is <= 1/sqrt(SAMPLES)
# = 0.007; 0.03 is four standard errors.
TOLERANCE = 0.03


@pytest.mark.parametrize(
    "activation,loss",
    [
        (None, keras.losses.SparseCategoricalCrossentropy(from_logits=True)),
        ("softmax", "sparse_categorical_crossentropy"),
        ("softmax", keras.losses.CategoricalCrossentropy()),
        (None, keras.losses.CategoricalCrossentropy(from_logits=True)),
    ],
)
def test_softmax_sampler_approaches_analytic_fisher(activation, loss):
    model = _output_model(activation)
    x = np.random.default_rng(0).normal(size=(3, 3)).astype("float32")
    a, g, m = _sampled_rows(model, x, loss)
    logits = model.blocks[-1].preactivation(x).numpy().astype(np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    analytic = np.stack([np.diag(q) - np.outer(q, q) for q in p])
    np.testing.assert_allclose(
        _per_example_second_moment(g, 3), analytic, atol=TOLERANCE
    )
    # On the weights: F = E_n[(a a^T) ⊗ (diag p - p p^T)] = J^T (diag p - pp^T) J.
    a_bar = a.reshape(3, SAMPLES, -1)[:, 0]
    fisher_analytic = sum(np.kron(np.outer(v, v), h) for v, h in zip(a_bar, analytic)) / 3
    fisher_sampled = helpers.exact_fisher(a, g, None, m)
    assert m == 3 * SAMPLES  # the mean over all rows is the mean over examples
    error = np.linalg.norm(fisher_sampled - fisher_analytic) / np.linalg.norm(
        fisher_analytic
    )
    assert error < 0.05


def test_bernoulli_sampler_approaches_analytic_fisher():
    model = _output_model(None, units=2)
    x = np.random.default_rng(1).normal(size=(2, 3)).astype("float32")
    loss = keras.losses.BinaryCrossentropy(from_logits=True)
    _, g, _ = _sampled_rows(model, x, loss)
    p = 1.0 / (1.0 + np.exp(-model.blocks[-1].preactivation(x).numpy()))
    # binary_crossentropy averages over the last axis (D = 2 units): its Hessian
    # w.r.t. the logits is diag(p (1 - p)) / D, which E[g g^T] must equal.
    analytic = np.stack([np.diag(q * (1 - q)) / 2 for q in p])
    np.testing.assert_allclose(_per_example_second_moment(g, 2), analytic, atol=TOLERANCE / 2)


def test_gaussian_sampler_matches_mse_hessian():
    model = _output_model(None, units=3)
    x = np.random.default_rng(2).normal(size=(2, 3)).astype("float32")
    _, g, _ = _sampled_rows(model, x, "mse")
    # Keras MSE = |y - f|^2 / D: its Hessian w.r.t. f is (2 / D) I.
    expected = np.broadcast_to(2.0 / 3.0 * np.eye(3), (2, 3, 3))
    np.testing.assert_allclose(_per_example_second_moment(g, 2), expected, atol=TOLERANCE)


# An output activation's values and slopes in its pre-activation `z`.
_POSITIVE_OUTPUTS = {
    "softplus": (lambda z: np.log1p(np.exp(z)), lambda z: 1.0 / (1.0 + np.exp(-z))),
    "exponential": (np.exp, np.exp),
    None: (lambda z: z, np.ones_like),
}


def _poisson_fisher(f):
    """The Poisson distribution's Fisher in its rate, `E[y] / (f + eps)^2` over
    `y ~ Poisson(f)` (the expectation of the Hessian `y / (f + eps)^2`), per unit."""
    return f / (f + keras.backend.epsilon()) ** 2


def _msle_gauss_newton(f):
    """The mean squared logarithmic error's Gauss-Newton matrix, `2 / (1 + f)^2` per
    unit, zero where Keras clips `f` at its epsilon."""
    return np.where(f > keras.backend.epsilon(), 2.0 / (1.0 + f) ** 2, 0.0)


@pytest.mark.parametrize("loss,kind,curvature,activation,units,seed", [
    ("poisson", "poisson", _poisson_fisher, "softplus", 3, 4),
    ("poisson", "poisson", _poisson_fisher, "exponential", 1, 4),
    ("msle", "mean_squared_logarithmic_error", _msle_gauss_newton, "softplus", 3, 6),
    ("msle", "mean_squared_logarithmic_error", _msle_gauss_newton, None, 2, 6),
])
def test_poisson_and_msle_draws_match_their_curvature(loss, kind, curvature, activation,
                                                      units, seed):
    """Keras's Poisson loss (`f - y log(f + eps)`) and mean squared logarithmic error
    (`|log(1 + f) - log(1 + y)|^2`, `f` clipped below at epsilon), each averaged
    over the `D` units: the sampled rows' second moment is `diag(h(f)) / D`, with
    `h` the Poisson distribution's Fisher in its rate or MSLE's Gauss-Newton matrix
    (numpy), on the output layer's pre-activation through the activation's slope
    `f'`: `diag(f'^2 h(f)) / D`. A unit MSLE clips (a linear output's negative
    units) gets no noise at all."""
    model = _output_model(activation, units=units)
    x = np.random.default_rng(seed).normal(size=(2, 3)).astype("float32")
    spec = loss_specs.resolve_loss(loss, "true")
    assert spec.kind == kind and loss_specs.output_fisher(spec, "true") == "true"
    _, g, m = _sampled_rows(model, x, loss)
    assert m == 2 * SAMPLES
    z = model.blocks[-1].preactivation(x).numpy().astype(np.float64)
    value, slope = _POSITIVE_OUTPUTS[activation]
    f = value(z)
    if activation is None:
        assert (f <= 0).any() and (f > 0).any()  # both kinds of unit are checked
    analytic = np.stack([np.diag(d) for d in slope(z) ** 2 * curvature(f) / units])
    moment = _per_example_second_moment(g, 2)
    np.testing.assert_allclose(moment, analytic, atol=TOLERANCE * analytic.max())
    np.testing.assert_array_equal(np.diagonal(moment, axis1=1, axis2=2) == 0.0,
                                  analytic.diagonal(axis1=1, axis2=2) == 0.0)


def test_loss_without_sampling_rule_takes_the_empirical_fisher():
    """MAE has no predictive distribution and a zero Hessian: under the true Fisher
    its cotangent is the gradient of the summed loss at the real labels (numpy
    oracle). Huber does under `fisher="empirical"`."""
    y_pred = np.array([[0.3, -2.0], [1.5, 0.1]], np.float32)
    y_true = np.array([[0.0, 0.5], [0.2, 0.05]], np.float32)
    residual = y_pred - y_true
    spec = loss_specs.resolve_loss("mae", "true")
    assert spec.kind is None and not spec.hessian
    assert loss_specs.output_fisher(spec, "true") == "empirical"
    # Keras's MAE is the mean over the last axis of |r|: its gradient is sign(r) / D.
    for mode in ("true", "empirical"):
        _, cotangent, m = fisher.output_cotangent(
            spec, mode, tf.constant(y_true), tf.constant(y_pred), tf.constant([1, 2]))
        np.testing.assert_allclose(cotangent.numpy(), np.sign(residual) / 2.0,
                                   rtol=1e-6)
        assert int(m) == 2
    # Keras's Huber is the mean over the last axis of 0.5 r^2 (|r| <= delta) or
    # delta (|r| - 0.5 delta): its gradient is clip(r, -delta, delta) / D.
    huber = loss_specs.resolve_loss(keras.losses.Huber(delta=1.0), "empirical")
    _, cotangent, _ = fisher.output_cotangent(
        huber, "empirical", tf.constant(y_true), tf.constant(y_pred), None)
    np.testing.assert_allclose(cotangent.numpy(), np.clip(residual, -1.0, 1.0) / 2.0,
                               rtol=1e-6)
    with pytest.raises(ValueError, match="y_true=None"):
        fisher.output_cotangent(spec, "true", None, tf.constant(y_pred),
                                tf.constant([1, 2]))
    with pytest.raises(ValueError, match="loss=None"):
        loss_specs.resolve_loss(None, "true")
    with pytest.raises(ValueError, match="single-output"):
        loss_specs.resolve_loss(["mse", "mse"], "true")


def _huber_hessian(y_true, y_pred):
    return (np.abs(y_pred - y_true) <= 1.0).astype(np.float64)


def _log_cosh_hessian(y_true, y_pred):
    return 1.0 / np.cosh(y_pred - y_true) ** 2


def _squared_hinge_hessian(y_true, y_pred):
    # Keras maps labels that are all 0 or 1 to -1 and 1; the loss is
    # max(1 - y f, 0)^2.
    y = 2.0 * y_true - 1.0
    return 2.0 * y ** 2 * (1.0 - y * y_pred > 0)


_REGRESSION_LABELS = np.array([[0.0, 0.5, 1.0], [-1.0, 1.0, 0.2]], np.float32)
_BINARY_LABELS = np.array([[0.0, 1.0, 1.0], [1.0, 0.0, 1.0]], np.float32)


@pytest.mark.parametrize("loss,hessian,y_true", [
    (keras.losses.Huber(delta=1.0), _huber_hessian, _REGRESSION_LABELS),
    ("log_cosh", _log_cosh_hessian, _REGRESSION_LABELS),
    (keras.losses.SquaredHinge(), _squared_hinge_hessian, _BINARY_LABELS),
])
def test_elementwise_losses_sample_their_cotangents_from_their_hessian(
        loss, hessian, y_true):
    """Huber, log-cosh and the squared hinge: under the true Fisher the cotangent's
    second moment over samples is the loss's Hessian in the output at the real
    labels, `diag(h) / D` (numpy, by hand: Huber's quadratic zone, sech^2, the
    hinge's active margin), zero off the diagonal, each example its own."""
    y_pred = np.array([[0.3, -2.0, 0.9], [1.5, 0.1, -0.4]], np.float32)
    spec = loss_specs.resolve_loss(loss, "true")
    assert spec.kind is None and spec.hessian
    assert loss_specs.output_fisher(spec, "true") == "true"
    source, cotangent, m = fisher.output_cotangent(
        spec, "true", tf.constant(np.repeat(y_true, SAMPLES, axis=0)),
        tf.constant(np.repeat(y_pred, SAMPLES, axis=0)), tf.constant([5, 9]))
    assert source.shape == (2 * SAMPLES, 3) and int(m) == 2 * SAMPLES
    moment = _per_example_second_moment(cotangent.numpy().astype(np.float64), 2)
    for n in range(2):
        h = hessian(y_true[n], y_pred[n]) / 3.0
        assert np.count_nonzero(h) >= 1
        # Entries are means of SAMPLES products of Gaussians scaled by at most
        # max(h): four standard errors are below TOLERANCE * max(h).
        np.testing.assert_allclose(moment[n], np.diag(h), atol=TOLERANCE * np.max(h))
        # A unit whose Hessian is zero gets no noise at all.
        np.testing.assert_array_equal(np.diag(moment[n]) == 0.0, h == 0.0)
    # The real labels are needed.
    with pytest.raises(ValueError, match="y_true=None"):
        fisher.output_cotangents(loss_specs.resolve_losses(loss, "true", tf.constant(y_pred)),
                                 "true", None, tf.constant(y_pred), tf.constant([1, 2]))


def test_outputs_mix_sampled_and_empirical_fisher():
    """One output with a sampling rule, one without: each gets its own cotangent,
    as if it were alone (the second with its own sampler seed)."""
    y_pred = [tf.constant([[0.5, -1.0, 2.0]]), tf.constant([[0.4]])]
    y_true = [tf.constant([2]), tf.constant([[1.0]])]
    losses = [keras.losses.SparseCategoricalCrossentropy(from_logits=True), "mae"]
    outputs = loss_specs.resolve_losses(losses, "true", y_pred)
    seed = tf.constant([3, 4])
    _, cotangents, _ = fisher.output_cotangents(outputs, "true", y_true, y_pred, seed)
    _, sampled, _ = fisher.output_cotangent(outputs[0].spec, "true", None, y_pred[0],
                                            seed)
    np.testing.assert_allclose(cotangents[0].numpy(), sampled.numpy())
    # MAE at the real label: sign(f - y) = -1.
    np.testing.assert_allclose(cotangents[1].numpy(), [[-1.0]])


def test_labels_of_lower_rank_are_matched_as_keras_does():
    """Labels `[B]` against an output `[B, 1]`: the per-example loss is Keras's."""
    logits = tf.constant([[0.3], [-1.2], [2.0]])
    labels = tf.constant([1, 0, 1])  # integer and of lower rank, as users pass them
    keras_loss = keras.losses.BinaryCrossentropy(from_logits=True, reduction=None)
    spec = loss_specs.resolve_loss(keras_loss, "empirical")
    np.testing.assert_allclose(spec.fn(labels, logits).numpy(),
                               keras_loss(labels, logits).numpy(), rtol=1e-6)
    _, cotangent, _ = fisher.output_cotangent(spec, "empirical", labels, logits, None)
    expected = tf.sigmoid(logits).numpy() - labels.numpy()[:, None]
    np.testing.assert_allclose(cotangent.numpy(), expected, rtol=1e-5)


def test_empirical_fisher_uses_the_real_labels():
    y_pred = tf.constant([[2.0, 0.0, -1.0]])
    spec = loss_specs.resolve_loss(
        keras.losses.SparseCategoricalCrossentropy(from_logits=True), "empirical"
    )
    _, cotangent, m = fisher.output_cotangent(spec, "empirical", tf.constant([1]), y_pred, None)
    p = tf.nn.softmax(y_pred).numpy()
    np.testing.assert_allclose(cotangent.numpy(), p - np.array([[0, 1, 0]]), rtol=1e-5)
    assert int(m) == 1


def test_masked_sequence_output_leaves_padding_out_as_keras_loss_does():
    """`mask_zero=True` puts Keras's mask on the sequence output; Keras's loss then
    averages over the unmasked terms. The Fisher's cotangents (summed terms) are
    that loss's gradient times the count of unmasked terms, padding rows are zero,
    and the quadratic model's batch loss is Keras's."""
    from keras_tkfac import products  # pylint: disable=import-outside-toplevel
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((5,), dtype="int32"),
        keras.layers.Embedding(7, 4, mask_zero=True),
        keras.layers.Dense(3, activation="softmax"),
    ])
    x = np.array([[1, 2, 3, 0, 0], [4, 5, 0, 0, 0], [6, 1, 2, 3, 4]])
    y = tf.constant(np.random.default_rng(0).integers(0, 3, size=(3, 5)))
    mask = (x != 0).astype("float32")
    y_pred = model(x)
    loss = keras.losses.SparseCategoricalCrossentropy()
    spec = loss_specs.resolve_loss(loss, "empirical")
    source, cotangent, count = fisher.output_cotangent(spec, "empirical", y, y_pred,
                                                       None)
    assert float(count) == mask.sum()
    with tf.GradientTape() as tape:
        tape.watch(source)
        keras_value = loss(y, y_pred)  # reads the logits behind the softmax
    expected = tape.gradient(keras_value, source).numpy() * mask.sum()
    np.testing.assert_allclose(cotangent.numpy(), expected, rtol=1e-5, atol=1e-7)
    assert np.all(cotangent.numpy()[mask == 0] == 0.0)
    # The quadratic model's loss of the batch (its reduction ratio and loss bound).
    outputs = loss_specs.resolve_losses(loss, "true", y_pred)
    batch = products.Batch(lambda: model(x), outputs, y, None)
    np.testing.assert_allclose(batch.loss([y_pred]).numpy(), keras_value.numpy(),
                               rtol=1e-6)
    np.testing.assert_allclose(batch.loss().numpy(), keras_value.numpy(), rtol=1e-6)
    # Per-term sample weights (`[B, T]`, Keras's temporal weights) with the mask.
    weights = tf.constant(np.random.default_rng(1).random((3, 5)), tf.float32)
    _, weighted, count = fisher.output_cotangent(spec, "empirical", y, y_pred, None,
                                                 weights)
    assert float(count) == mask.sum()
    np.testing.assert_allclose(weighted.numpy(),
                               cotangent.numpy() * np.sqrt(weights.numpy())[..., None],
                               rtol=1e-5, atol=1e-7)
    batch = products.Batch(lambda: model(x), outputs, y, weights)
    np.testing.assert_allclose(batch.loss([y_pred]).numpy(),
                               loss(y, y_pred, sample_weight=weights).numpy(), rtol=1e-6)


def _explicit_gram(model, x, directions, valid):
    """`sum over the valid terms of (J x)^T H (J y) / count` for a sequence of
    logits, `H = diag(p) - p p^T`, from `tape.jacobian` (numpy)."""
    with tf.GradientTape() as tape:
        logits = model(x)
    jacobians = tape.jacobian(logits, model.trainable_variables)
    moves = [sum(np.tensordot(j.numpy(), np.asarray(d), axes=len(np.shape(d)))
                 for j, d in zip(jacobians, direction)) for direction in directions]
    p = tf.nn.softmax(logits).numpy()
    expected = np.zeros((len(directions), len(directions)))
    for n, t in zip(*np.nonzero(valid)):
        h = np.diag(p[n, t]) - np.outer(p[n, t], p[n, t])
        for i in range(len(directions)):
            for j in range(len(directions)):
                expected[i, j] += moves[i][n, t] @ h @ moves[j][n, t]
    return expected / valid.sum()


def test_quadratic_gram_of_a_masked_sequence_output_leaves_padding_out():
    """The quadratic model's Gram `[<x, C y>]` of a masked sequence output against
    an explicit `sum over unmasked terms of (J x)^T H (J y) / count` from
    `tape.jacobian`, `H = diag(p) - p p^T` on the logits."""
    from keras_tkfac import products  # pylint: disable=import-outside-toplevel
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((4,), dtype="int32"),
        keras.layers.Embedding(6, 3, mask_zero=True),
        keras.layers.Dense(3),
    ])
    x = np.array([[1, 2, 0, 0], [3, 4, 5, 0]])
    y = tf.constant([[0, 1, 2, 0], [2, 2, 1, 1]])
    valid = (x != 0)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    outputs = loss_specs.resolve_losses(loss, "true", model(x))
    variables = model.trainable_variables
    rng = np.random.default_rng(2)
    directions = [[tf.constant(rng.normal(size=v.shape), tf.float32) for v in variables]
                  for _ in range(2)]
    gram = products.Batch(lambda: model(x), outputs, y, None).gram(variables,
                                                                     directions)
    np.testing.assert_allclose(gram.numpy(),
                               _explicit_gram(model, x, directions, valid),
                               rtol=1e-4, atol=1e-6)


def test_ignore_class_leaves_its_terms_out_as_keras_loss_does():
    """`SparseCategoricalCrossentropy(ignore_class=-1)`: Keras's loss averages over
    the terms whose label is not -1. The empirical Fisher's cotangents are that
    loss's gradient times the count of those terms (zero at the others), the
    quadratic model's loss is Keras's and its Gram is the explicit
    `sum over kept terms of (J x)^T H (J y) / count` (`H = diag(p) - p p^T` on the
    logits). On a softmax output (the probabilities, which Keras masks before the
    loss: this used to raise) the Gram is the same."""
    from keras_tkfac import products  # pylint: disable=import-outside-toplevel
    x = np.random.default_rng(0).normal(size=(3, 4, 2)).astype("float32")
    y = tf.constant([[0, -1, 2, 1], [-1, -1, 1, 0], [2, 0, 1, -1]])
    valid = y.numpy() != -1

    def model_and_gram(from_logits):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([
            keras.Input((4, 2)), keras.layers.Dense(5, activation="tanh"),
            keras.layers.Dense(3, activation=None if from_logits else "softmax")])
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits,
                                                          ignore_class=-1)
        y_pred = model(x)
        outputs = loss_specs.resolve_losses(loss, "true", y_pred)
        batch = products.Batch(lambda: model(x), outputs, y, None)
        rng = np.random.default_rng(2)
        directions = [[tf.constant(rng.normal(size=v.shape), tf.float32)
                       for v in model.trainable_variables] for _ in range(2)]
        np.testing.assert_allclose(batch.loss().numpy(), loss(y, y_pred).numpy(),
                                   rtol=1e-6)
        spec = loss_specs.resolve_loss(loss, "empirical")
        source, cotangent, count = fisher.output_cotangent(spec, "empirical", y,
                                                           y_pred, None)
        assert float(count) == valid.sum()
        with tf.GradientTape() as tape:
            tape.watch(source)
            keras_value = loss(y, y_pred)
        expected = tape.gradient(keras_value, source).numpy() * valid.sum()
        np.testing.assert_allclose(cotangent.numpy(), expected, rtol=1e-5, atol=1e-7)
        assert np.all(cotangent.numpy()[~valid] == 0.0)
        return model, directions, batch.gram(model.trainable_variables, directions)

    model, directions, gram = model_and_gram(True)
    np.testing.assert_allclose(gram.numpy(),
                               _explicit_gram(model, x, directions, valid),
                               rtol=1e-4, atol=1e-6)
    _, _, probability_gram = model_and_gram(False)
    np.testing.assert_allclose(probability_gram.numpy(), gram.numpy(), rtol=1e-3,
                               atol=1e-6)


@pytest.mark.parametrize("cls", helpers.TKFAC_THEN_KFAC)
@pytest.mark.parametrize("loss", ["categorical", "binary"])
def test_a_class_axis_other_than_the_last_trains_as_its_transposed_twin(cls, loss):
    """`CategoricalCrossentropy(axis=1)` (class axis first, as in a channels-first
    segmentation head) and `BinaryCrossentropy(axis=1)`: the true Fisher's samples,
    the quadratic model's curvature and so the weights after three steps equal
    those of the same model with the axis moved last (`axis=-1`). The sampler and
    the Gram used to take the last axis as the class axis."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 6)).astype("float32")
    y = (rng.random((24, 4, 3)) < 0.4).astype("float32")  # [B, 4 positions, 3 classes]
    if loss == "categorical":
        y = np.eye(3, dtype="float32")[rng.integers(0, 3, (24, 4))]

    def train(last):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((6,))
        h = keras.layers.Dense(8, activation="tanh")(inputs)
        outputs = keras.layers.Reshape((4, 3))(keras.layers.Dense(12)(h))
        if not last:
            outputs = keras.layers.Permute((2, 1))(outputs)  # [B, 3 classes, 4]
        model = keras_tkfac.wrap(keras.Model(inputs, outputs))
        make = (keras.losses.CategoricalCrossentropy if loss == "categorical"
                else keras.losses.BinaryCrossentropy)
        model.compile(optimizer=cls(seed=0), loss=make(from_logits=True,
                                                       axis=-1 if last else 1))
        labels = y if last else np.transpose(y, (0, 2, 1))
        history = model.fit(x, labels, batch_size=8, epochs=1, shuffle=False,
                            verbose=0).history
        return [w.numpy() for w in model.trainable_weights], history["loss"]

    (last_weights, last_loss), (first_weights, first_loss) = train(True), train(False)
    np.testing.assert_allclose(first_loss, last_loss, rtol=1e-5)
    for a, b in zip(first_weights, last_weights):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("activation,keras_loss,labels", [
    ("sigmoid", keras.losses.binary_crossentropy, "binary"),
    ("softmax", keras.losses.sparse_categorical_crossentropy, "sparse")])
def test_a_loss_function_calling_keras_cross_entropy_is_differentiated_through_logits(
        activation, keras_loss, labels):
    """A user's loss without a formula that calls Keras's cross-entropy (which reads
    the logits behind a softmax/sigmoid output, `_keras_logits`) gets the
    cotangent of its loss with respect to those logits (it raised "does not depend
    on the model output"); a loss reading the probabilities gets the same through
    the re-applied activation."""
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(6, 4)).astype("float32"))
    dense = keras.layers.Dense(3, activation=activation)
    y = (rng.integers(0, 2, size=(6, 3)).astype("float32") if labels == "binary"
         else rng.integers(0, 3, size=(6,)))

    def wrapped(t, p):
        return 2.0 * keras_loss(t, p)

    def by_hand(t, p):
        p = tf.clip_by_value(p, 1e-7, 1 - 1e-7)
        if labels == "binary":
            return -2.0 * tf.reduce_mean(t * tf.math.log(p)
                                         + (1 - t) * tf.math.log(1 - p), -1)
        return -2.0 * tf.math.log(tf.gather(p, tf.cast(t, tf.int32), batch_dims=1))

    @tf.function
    def cotangents():
        y_pred = dense(x)
        logits = y_pred.op.inputs[0]
        found = []
        for fn in (wrapped, by_hand):
            spec = loss_specs.resolve_loss(fn, "empirical", y_pred)
            assert spec.kind is None
            found.append(fisher.output_cotangent(spec, "empirical", y, y_pred, 0)[:2])
        with tf.GradientTape() as tape:  # the reference: through the logits
            tape.watch(logits)
            total = tf.reduce_sum(wrapped(y, getattr(tf.nn, activation)(logits)))
        return found, logits, tape.gradient(total, logits)

    (first, second), logits, want = cotangents()
    for source, cotangent in (first, second):
        np.testing.assert_allclose(source, logits)
        np.testing.assert_allclose(cotangent, want, rtol=1e-4, atol=1e-6)
    assert np.abs(want).max() > 0.1


@pytest.mark.parametrize("logits_shape, labels_shape", [
    ((6, 1100), (6,)), ((6, 1100), (6, 1)), ((3, 4, 1030), (3, 4)),
    ((3, 4, 1030), (3, 4, 1))])
@pytest.mark.parametrize("float_labels", [False, True])
@pytest.mark.parametrize("softmax", [False, True])
def test_loss_values_of_wide_sparse_cross_entropy_equal_keras(
        logits_shape, labels_shape, float_labels, softmax):
    rng = np.random.default_rng(0)
    logits = tf.constant(3.0 * rng.normal(size=logits_shape), tf.float32)
    labels = rng.integers(0, logits_shape[-1], size=labels_shape)
    labels = tf.constant(labels, tf.float32 if float_labels else tf.int32)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=not softmax,
                                                      reduction=None)
    # A Keras softmax output carries its logits, which Keras's loss reads.
    y_pred = keras.layers.Activation("softmax")(logits) if softmax else logits
    spec = loss_specs.resolve_loss(loss, "true")
    got = loss_specs.loss_values(spec, labels, y_pred)
    np.testing.assert_allclose(got.numpy(), loss(labels, y_pred).numpy(), rtol=1e-5,
                               atol=1e-6)
    assert got.shape == spec.fn(labels, y_pred).shape


def _keras_own(loss, classes, softmax=True):
    rng = np.random.default_rng(1)
    logits = tf.constant(rng.normal(size=(6, classes)), tf.float32)
    y_pred = keras.layers.Activation("softmax")(logits) if softmax else logits
    labels = (tf.one_hot(rng.integers(0, classes, size=6), classes)
              if not isinstance(loss, keras.losses.SparseCategoricalCrossentropy)
              else tf.constant(rng.integers(0, classes, size=6)))
    spec = loss_specs.resolve_loss(loss, "true")
    np.testing.assert_array_equal(loss_specs.loss_values(spec, labels, y_pred).numpy(),
                                  spec.fn(labels, y_pred).numpy())


@pytest.mark.parametrize("loss", [
    keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=0),
    keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1),
    "mse"])
def test_loss_values_of_other_losses_are_keras_own(loss):
    _keras_own(loss, 1100)


def test_loss_values_of_a_narrow_or_raw_softmax_output_are_keras_own():
    _keras_own(keras.losses.SparseCategoricalCrossentropy(from_logits=True), 10,
               softmax=False)
    _keras_own(keras.losses.SparseCategoricalCrossentropy(), 1100, softmax=False)


@pytest.mark.parametrize("policy, classes", [("mixed_bfloat16", 600),
                                             ("mixed_float16", 3000)])
def test_class_ids_of_a_half_precision_output_are_not_rounded(policy, classes):
    """A probe (2026-12-07): the per-example loss cast sparse labels to the output's
    dtype, which holds integers exactly only up to 256 (bfloat16) or 2048 (float16):
    label 599 of 600 classes became 600 and the step raised; so did the true
    Fisher's sampled label 2999 of 3000 (Keras's loss casts labels to float32)."""
    keras.mixed_precision.set_global_policy(policy)
    try:
        keras.utils.set_random_seed(0)
        inputs = keras.Input((8,))
        bias = np.zeros(classes, "float32")
        bias[-1] = 30.0  # the model predicts (and samples) the last class
        outputs = keras.layers.Dense(classes, bias_initializer=keras.initializers.Constant(
            bias))(keras.layers.Dense(16, activation="relu")(inputs))
        model = keras_tkfac.wrap(keras.Model(inputs, outputs))
        model.compile(optimizer=keras_tkfac.TKFAC(seed=0),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        x = np.random.default_rng(0).normal(size=(64, 8)).astype("float32")
        y = np.full((64,), classes - 1, "int32")
        history = model.fit(x, y, epochs=2, batch_size=32, verbose=0)
        assert np.all(np.isfinite(history.history["loss"]))
        spec = loss_specs.resolve_loss(model.loss, "true")
        labels = tf.constant([classes - 1])
        logits = tf.cast(tf.one_hot(labels, classes) * 5.0, keras.mixed_precision.
                         global_policy().compute_dtype)
        np.testing.assert_allclose(spec.fn(labels, logits).numpy(),
                                   model.loss(labels, logits).numpy(), rtol=1e-2)
    finally:
        keras.mixed_precision.set_global_policy("float32")
