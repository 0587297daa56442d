"""The quadratic-model step (`step_control="quadratic"`, `keras_tkfac.quadratic`)."""

import contextlib

from absl import logging
from unittest import mock

import numpy as np
import pytest
import tensorflow as tf
import keras

import keras_tkfac
from keras_tkfac import damping
from keras_tkfac import loss_specs
from keras_tkfac import jvp_rules
from keras_tkfac import step_ops
from keras_tkfac import products
from keras_tkfac import progress
from keras_tkfac import quadratic
from keras_tkfac import step_size

RNG = np.random.default_rng(0)


def test_model_step_solves_the_two_by_two_system():
    basis = RNG.normal(size=(2, 5))
    c = RNG.normal(size=(5, 5))
    curvature = basis @ (c @ c.T) @ basis.T
    norms = basis @ basis.T
    slopes = RNG.normal(size=2)
    a, b, value = step_ops.quadratic_model_step(curvature, norms, slopes, 0.3)
    expected = np.linalg.solve(curvature + 0.3 * norms, slopes)
    np.testing.assert_allclose([a, b], expected, rtol=1e-5)
    np.testing.assert_allclose(value, -0.5 * slopes @ expected, rtol=1e-5)
    assert value < 0


def test_model_step_without_a_previous_step_is_one_dimensional():
    curvature = np.array([[2.0, 0.0], [0.0, 0.0]])
    norms = np.array([[3.0, 0.0], [0.0, 0.0]])
    a, b, value = step_ops.quadratic_model_step(curvature, norms, [1.5, 0.0], 0.5)
    np.testing.assert_allclose([a, b, value], [1.5 / 3.5, 0.0, -0.5 * 1.5**2 / 3.5],
                               rtol=1e-6)


def test_model_step_predicting_a_decrease_beyond_the_loss_is_shortened_to_it():
    # A saturated softmax: the Gauss-Newton curvature along the step is ~0, so only
    # the damping bounds the model's minimiser, whose predicted decrease (~1e3)
    # exceeds the loss (2.0) of a loss that cannot fall below zero.
    basis = RNG.normal(size=(2, 5))
    curvature = 1e-9 * basis @ basis.T
    norms = basis @ basis.T
    slopes = 30.0 * RNG.normal(size=2)
    free = np.linalg.solve(curvature + 0.3 * norms, slopes)
    assert 0.5 * slopes @ free > 2.0
    a, b, value = step_ops.quadratic_model_step(curvature, norms, slopes, 0.3,
                                           max_decrease=2.0)
    # Same direction as the minimiser, and the model predicts exactly the loss.
    np.testing.assert_allclose(np.array([a, b]) / np.linalg.norm([a, b]),
                               free / np.linalg.norm(free), rtol=1e-5)
    model = curvature + 0.3 * norms
    step = np.array([a, b], np.float64)
    np.testing.assert_allclose(-slopes @ step + 0.5 * step @ model @ step, -2.0,
                               rtol=1e-5)
    np.testing.assert_allclose(value, -0.5 * slopes @ free, rtol=1e-5)
    # A bound the minimiser's decrease is within changes nothing; nor do a
    # non-positive or non-finite one.
    for bound in (1e9, 0.0, -1.0, np.nan):
        np.testing.assert_allclose(
            step_ops.quadratic_model_step(curvature, norms, slopes, 0.3,
                                     max_decrease=bound)[:2], free, rtol=1e-5)
    # With a KL bound as well, the shorter of the two steps.
    kl_free = 0.5 * free @ curvature @ free
    a_kl, b_kl, _ = step_ops.quadratic_model_step(curvature, norms, slopes, 0.3,
                                             max_kl=kl_free / 4.0, max_decrease=2.0)
    np.testing.assert_allclose([a_kl, b_kl], [a, b], rtol=1e-5)
    a_kl, b_kl, _ = step_ops.quadratic_model_step(curvature, norms, slopes, 0.3,
                                             max_kl=kl_free * 1e-12,
                                             max_decrease=2.0)
    np.testing.assert_allclose([a_kl, b_kl], free * 1e-6, rtol=1e-4)


@pytest.mark.parametrize("sign,low", [(1.0, -1.0), (-1.0, -1.0), (-1.0, 0.0),
                                      (1.0, 0.0)])
def test_model_step_with_a_momentum_range_minimises_the_model_on_the_strip(sign, low):
    """Where the minimiser's `b` is outside `[low, 1]`, the step is the model's
    minimiser over that strip (a dense grid of it finds nothing lower), and the loss
    bound shortens it along its ray to exactly that decrease."""
    model = np.array([[2.0, 0.5], [0.5, 0.4]])
    slopes = np.array([0.3, sign * 2.0])
    free = np.linalg.solve(model, slopes)
    assert free[1] > 1.0 if sign > 0 else free[1] < low
    a, b, value = step_ops.quadratic_model_step(model, np.zeros((2, 2)), slopes, 0.0,
                                           momentum_range=(low, 1.0))

    def q(a, b):
        return -a * slopes[0] - b * slopes[1] + 0.5 * (
            a * a * model[0, 0] + 2 * a * b * model[0, 1] + b * b * model[1, 1])

    assert b == (1.0 if sign > 0 else low)
    grid_a, grid_b = np.meshgrid(np.linspace(-5, 5, 2001), np.linspace(low, 1, 401))
    assert q(a, b) <= q(grid_a, grid_b).min() + 1e-7
    np.testing.assert_allclose(value, q(a, b), rtol=1e-6)
    # Within the range, nothing changes.
    inside = step_ops.quadratic_model_step(model, np.zeros((2, 2)), slopes, 0.0,
                                      momentum_range=(-10.0, 10.0))
    np.testing.assert_allclose(inside, step_ops.quadratic_model_step(
        model, np.zeros((2, 2)), slopes, 0.0), rtol=0)
    # The loss bound: the shortened step predicts exactly that decrease.
    limit = -0.5 * q(a, b)
    short_a, short_b, _ = step_ops.quadratic_model_step(
        model, np.zeros((2, 2)), slopes, 0.0, max_decrease=limit,
        momentum_range=(low, 1.0))
    np.testing.assert_allclose(short_b / short_a, b / a, rtol=1e-6)
    np.testing.assert_allclose(-q(short_a, short_b), limit, rtol=1e-5)


@pytest.mark.parametrize("curvature", [[[0.0, 0.0], [0.0, 0.0]],
                                       [[np.nan, 0.0], [0.0, 1.0]]])
def test_model_step_without_positive_curvature_is_no_step(curvature):
    a, b, _ = step_ops.quadratic_model_step(curvature, np.zeros((2, 2)), [1.0, 0.0], 0.0)
    assert float(a) == 0.0 and float(b) == 0.0


def _two_head_model():
    inputs = keras.Input((3,))
    hidden = keras.layers.Dense(4, activation="tanh", name="hidden")(inputs)
    classes = keras.layers.Dense(3, activation="softmax", name="classes")(hidden)
    values = keras.layers.Dense(2, name="values")(hidden)
    return keras.Model(inputs, {"classes": classes, "values": values})


def _explicit_gauss_newton(model, x, weights, loss_weights):
    """`sum_k w_k / B sum_n s_n J_nk^T H_nk J_nk` with `J` by `tape.jacobian`."""
    variables = model.trainable_variables
    hidden, classes, values = (model.get_layer(n) for n in ("hidden", "classes",
                                                             "values"))
    with tf.GradientTape(persistent=True) as tape:
        h = tf.tanh(x @ hidden.kernel.value + hidden.bias.value)
        logits = h @ classes.kernel.value + classes.bias.value
        outputs = h @ values.kernel.value + values.bias.value
    np.testing.assert_allclose(tf.nn.softmax(logits), model(x)["classes"], atol=1e-6)

    def jacobian(target):
        parts = [tape.jacobian(target, v.value, unconnected_gradients=tf.UnconnectedGradients.ZERO)
                 for v in variables]
        return np.concatenate(
            [np.reshape(p, (*target.shape, -1)) for p in parts], axis=-1
        ).astype(np.float64)

    j_classes, j_values = jacobian(logits), jacobian(outputs)
    probs = tf.nn.softmax(logits).numpy().astype(np.float64)
    size = j_classes.shape[-1]
    gauss_newton = np.zeros((size, size))
    for n in range(len(x)):
        h_classes = np.diag(probs[n]) - np.outer(probs[n], probs[n])
        h_values = 2.0 / 2 * np.eye(2)  # Keras's MSE averages over the 2 units.
        gauss_newton += weights[n] * (
            loss_weights["classes"] * j_classes[n].T @ h_classes @ j_classes[n]
            + loss_weights["values"] * j_values[n].T @ h_values @ j_values[n]
        ) / len(x)
    return gauss_newton


def _two_head_problem(n=6, rng=RNG):
    """`(model, x, y, sample weights, variables, two random directions)`, the data
    drawn from `rng`."""
    keras.utils.set_random_seed(1)
    model = _two_head_model()
    x = rng.normal(size=(n, 3)).astype("float32")
    y = {"classes": rng.integers(0, 3, size=n), "values": rng.normal(size=(n, 2))}
    weights = rng.uniform(0.2, 2.0, size=n).astype("float32")
    variables = model.trainable_variables
    directions = [[rng.normal(size=v.shape).astype("float32") for v in variables]
                  for _ in range(2)]
    return model, x, y, weights, variables, directions


def test_curvature_gram_is_the_explicit_gauss_newton_of_the_weighted_loss():
    model, x, y, weights, variables, directions = _two_head_problem()
    loss = {"classes": "sparse_categorical_crossentropy", "values": "mse"}
    loss_weights = {"classes": 0.3, "values": 2.0}
    outputs = loss_specs.resolve_losses(loss, "true", model(x), loss_weights=loss_weights,
                                    output_names=["classes", "values"])
    gram = products.curvature_gram(lambda: model(x, training=True), outputs, y,
                                    weights, variables, directions)
    flat = np.array([np.concatenate([np.ravel(d) for d in direction])
                     for direction in directions], dtype=np.float64)
    expected = flat @ _explicit_gauss_newton(model, x, weights, loss_weights) @ flat.T
    np.testing.assert_allclose(gram, expected, rtol=1e-4)


def _values_jacobian(model, x, variables):
    with tf.GradientTape() as tape:
        values = model(x, training=True)["values"]
    parts = tape.jacobian(values, [v.value for v in variables],
                          unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return values.numpy().astype(np.float64), np.concatenate(
        [np.reshape(p, (*values.shape, -1)) for p in parts], axis=-1).astype(np.float64)


def _explicit_choice(hessian, square):
    """`products._larger_curvature`'s rule on explicit Grams."""
    chosen = (np.linalg.eigvalsh(hessian).min()
              >= -products.HESSIAN_ROUNDING * abs(np.trace(hessian))
              and np.trace(hessian) >= np.trace(square))
    return hessian if chosen else square, chosen


def test_the_hessians_gram_is_taken_where_positive_semi_definite_to_rounding():
    """`products._larger_curvature` on hand-made Grams: eigenvalues `(27.7, -5.1e-5)`
    (`Dice()`'s, -1.8e-6 of the trace) count as positive semi-definite, `(27.7,
    -0.03)` (-1.1e-3) do not; a smaller trace than the square's does not either;
    1 x 1 and 3 x 3 Grams alike."""
    rotation = np.array([[0.8, -0.6], [0.6, 0.8]])
    square = np.diag([3.0, 1.0]).astype(np.float32)

    def gram(*eigenvalues):
        return (rotation @ np.diag(eigenvalues) @ rotation.T).astype(np.float32)

    for hessian, taken in [(gram(27.7, -5.1e-5), True), (gram(27.7, -0.03), False),
                           (gram(27.7, 0.0), True), (gram(3.0, 0.5), False)]:
        got = products._larger_curvature(tf.constant(hessian), tf.constant(square))
        np.testing.assert_array_equal(got, hessian if taken else square)
    for hessian, taken in [([[-1e-4]], False), ([[5.0]], True)]:
        got = products._larger_curvature(tf.constant(hessian), tf.constant([[4.0]]))
        np.testing.assert_array_equal(got, hessian if taken else [[4.0]])
    three = np.diag([10.0, 2.0, -5e-4]).astype(np.float32)
    np.testing.assert_array_equal(
        products._larger_curvature(tf.constant(three), tf.eye(3)), three)
    np.testing.assert_array_equal(
        products._larger_curvature(
            tf.constant(three - np.diag([0.0, 0.0, 0.1]).astype(np.float32)),
            tf.eye(3)), np.eye(3))


@pytest.mark.parametrize("loss", ["huber", "mae"])
def test_a_loss_without_a_fisher_formula_takes_its_larger_gauss_newton(loss):
    """Huber and MAE have no sampling rule. Two explicit Grams, in numpy: the
    Gauss-Newton matrix of the terms written as squares,
    `(1 / B) sum_n s_n (J_n^T g_n)(J_n^T g_n)^T / (2 l_n)`, with `l_n` Keras's loss
    of example `n` (the mean over the 2 units) and `g_n` its gradient, and the exact
    one, `(1 / B) sum_n s_n J_n^T H_n J_n` with `H_n` the loss's Hessian in the
    outputs (Huber: `1/2` per unit inside the quadratic zone, MAE: 0). The products
    take the Hessian's where it is positive semi-definite with the larger trace
    (here Huber's), else the square's (MAE's, whose Hessian is zero)."""
    model, x, y, weights, variables, directions = _two_head_problem()
    fn = keras.losses.Huber() if loss == "huber" else keras.losses.MeanAbsoluteError()
    outputs = loss_specs.resolve_losses({"classes": None, "values": fn},
                                    "true", model(x), output_names=["classes", "values"])
    assert outputs[0].spec.kind is None
    gram = products.curvature_gram(lambda: model(x, training=True), outputs, y,
                                    weights, variables, directions)
    values, jacobian = _values_jacobian(model, x, variables)
    residual = values - y["values"]
    if loss == "huber":
        terms = np.where(np.abs(residual) <= 1.0, 0.5 * residual**2,
                         np.abs(residual) - 0.5).mean(axis=1)
        grad = np.clip(residual, -1.0, 1.0) / 2.0
        curvature = (np.abs(residual) <= 1.0) / 2.0
    else:
        terms, grad = np.abs(residual).mean(axis=1), np.sign(residual) / 2.0
        curvature = np.zeros_like(residual)
    scores = np.einsum("nd,ndp->np", grad, jacobian)
    square = np.einsum("n,np,nq->pq", weights / (2.0 * terms), scores, scores) / len(x)
    exact = np.einsum("n,nd,ndp,ndq->pq", weights, curvature, jacobian,
                      jacobian) / len(x)
    flat = np.array([np.concatenate([np.ravel(d) for d in direction])
                     for direction in directions], dtype=np.float64)
    expected, chosen = _explicit_choice(flat @ exact @ flat.T, flat @ square @ flat.T)
    assert chosen == (loss == "huber")
    np.testing.assert_allclose(gram, expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("loss", ["poisson", "msle"])
@pytest.mark.parametrize("squeezed", [False, True])
def test_a_poisson_or_msle_outputs_gram_is_its_gauss_newton(loss, squeezed):
    """Keras's Poisson loss and mean squared logarithmic error have formulas: the
    Gram is the explicit Gauss-Newton `(1 / B) sum_n s_n J_n^T H_n J_n` with
    `H_n = diag(f / (f + eps)^2) / D`, the Poisson distribution's Fisher in the rate
    `f`, or `diag(2 / (1 + f)^2) / D`, MSLE's (a softplus output of `D = 2` units; a
    squeezed `[B]` output counts each example as a term of one unit), in numpy,
    with no term of the labels (which the Hessians `y / f^2` and MSLE's residual
    term would have)."""
    keras.utils.set_random_seed(2)
    rng = np.random.default_rng(5)
    units = 1 if squeezed else 2
    layers = [keras.Input((3,)), keras.layers.Dense(4, activation="tanh"),
              keras.layers.Dense(units, activation="softplus")]
    if squeezed:
        layers.append(keras.layers.Reshape(()))
    model = keras.Sequential(layers)
    x = rng.normal(size=(6, 3)).astype("float32")
    counts = rng.poisson(2.0, size=(6,) if squeezed else (6, units)).astype("float32")
    weights = rng.uniform(0.2, 2.0, size=6).astype("float32")
    variables = model.trainable_variables
    directions = [[rng.normal(size=v.shape).astype("float32") for v in variables]
                  for _ in range(2)]
    outputs = loss_specs.resolve_losses(loss, "true", model(x))
    assert outputs[0].spec.kind == {
        "poisson": "poisson", "msle": "mean_squared_logarithmic_error"}[loss]
    gram = products.curvature_gram(lambda: model(x, training=True), outputs, counts,
                                   weights, variables, directions)
    with tf.GradientTape() as tape:
        rates = tf.reshape(model(x, training=True), (6, units))
    parts = tape.jacobian(rates, [v.value for v in variables])
    jacobian = np.concatenate([np.reshape(p, (6, units, -1)) for p in parts],
                              axis=-1).astype(np.float64)
    rates = rates.numpy().astype(np.float64)
    if loss == "poisson":
        fisher = rates / (rates + keras.backend.epsilon()) ** 2 / units
    else:
        fisher = 2.0 / (1.0 + rates) ** 2 / units
    exact = np.einsum("n,nd,ndp,ndq->pq", weights, fisher, jacobian, jacobian) / 6
    flat = np.array([np.concatenate([np.ravel(d) for d in direction])
                     for direction in directions], dtype=np.float64)
    np.testing.assert_allclose(gram, flat @ exact @ flat.T, rtol=1e-4)


@pytest.mark.parametrize("batch_scalar", [False, True])
def test_a_cross_entropy_written_as_a_function_has_the_cross_entropys_curvature(
        batch_scalar):
    """A Python loss computing the cross-entropy (per example, or keras-io's
    translation style, one masked mean for the whole batch) has no Fisher formula;
    its exact Gauss-Newton products (the loss's Hessian) are those of Keras's
    cross-entropy, whose `diag(p) - p p^T` the products know. The Hessian's trace
    exceeds the squares' here, so it is the one taken."""
    model, x, y, weights, variables, directions = _two_head_problem()
    # The two-unit "values" head as the logits of two classes.
    labels = {**y, "values": (y["values"][:, 0] > 0).astype("int32")}

    def masked(y_true, y_pred):
        terms = keras.losses.sparse_categorical_crossentropy(y_true, y_pred,
                                                             from_logits=True)
        if not batch_scalar:
            return terms
        mask = keras.ops.cast(keras.ops.not_equal(y_true, -1), terms.dtype)
        return keras.ops.sum(terms * mask) / keras.ops.sum(mask)

    def gram(loss, traced=True):
        outputs = loss_specs.resolve_losses({"classes": None, "values": loss}, "true",
                                        model(x), output_names=["classes", "values"])
        run = lambda: products.curvature_gram(  # noqa: E731
            lambda: model(x, training=True), outputs, labels, None, variables,
            directions)
        return (tf.function(run) if traced else run)(), outputs

    if batch_scalar:
        # Eagerly TensorFlow cannot differentiate its per-example `vectorized_map`
        # twice: the squares' curvature, no error.
        eager, _ = gram(masked, traced=False)
        assert np.isfinite(eager).all() and eager[0, 0] > 0.0
    found, outputs = gram(masked)
    assert outputs[0].spec.kind is None
    expected, known = gram(keras.losses.SparseCategoricalCrossentropy(
        from_logits=True))
    assert known[0].spec.kind == "sparse_categorical_crossentropy"
    assert np.abs(expected).max() > 1e-2
    np.testing.assert_allclose(found, expected, rtol=1e-4)


@pytest.mark.parametrize("seed, hessian", [(0, False), (1, True)])
def test_a_loss_with_negative_terms_takes_its_larger_curvature(seed, hessian):
    """Cosine similarity's terms are negative: no square root. Two explicit Grams, in
    numpy: the empirical Fisher `(1 / B) sum_n s_n (J_n^T g_n)(J_n^T g_n)^T` of its
    terms `l_n = -<u_n, v_n / |v_n|>` (`u_n` the unit label) and the exact
    Gauss-Newton `(1 / B) sum_n s_n J_n^T H_n J_n`, with
    `H_n = (w p^T + c P + p w^T) / |v_n|^2`, `w = v_n / |v_n|`, `c = <u_n, w>`,
    `P = I - w w^T`, `p = P u_n`. The products take the Hessian's where it is
    positive semi-definite with the larger trace, else the empirical Fisher's: the
    two data draws take one each (the draw is the test's own, so the order tests
    run in does not choose the path)."""
    model, x, y, weights, variables, directions = _two_head_problem(
        rng=np.random.default_rng(seed))
    y = {**y, "values": np.abs(y["values"])}
    outputs = loss_specs.resolve_losses(
        {"classes": None, "values": keras.losses.CosineSimilarity()}, "true",
        model(x), output_names=["classes", "values"])
    gram = products.curvature_gram(lambda: model(x, training=True), outputs, y,
                                    weights, variables, directions)
    values, jacobian = _values_jacobian(model, x, variables)
    unit_y = y["values"] / np.linalg.norm(y["values"], axis=1, keepdims=True)
    norm = np.linalg.norm(values, axis=1, keepdims=True)
    unit_v = values / norm
    cosine = np.sum(unit_y * unit_v, axis=1, keepdims=True)
    assert np.any(-cosine < 0)
    along = unit_y - cosine * unit_v
    grad = -along / norm
    scores = np.einsum("nd,ndp->np", grad, jacobian)
    empirical = np.einsum("n,np,nq->pq", weights, scores, scores) / len(x)
    eye = np.eye(values.shape[1])
    hessians = (np.einsum("nd,ne->nde", unit_v, along)
                + np.einsum("nd,ne->nde", along, unit_v)
                + cosine[:, :, None] * (eye - np.einsum("nd,ne->nde", unit_v, unit_v))
                ) / norm[:, :, None] ** 2
    exact = np.einsum("n,nde,ndp,neq->pq", weights, hessians, jacobian,
                      jacobian) / len(x)
    flat = np.array([np.concatenate([np.ravel(d) for d in direction])
                     for direction in directions], dtype=np.float64)
    expected, chosen = _explicit_choice(flat @ exact @ flat.T,
                                        flat @ empirical @ flat.T)
    assert chosen == hessian
    np.testing.assert_allclose(gram, expected, rtol=1e-4)


def _classifier(seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((5,)),
        keras.layers.Dense(6, activation="tanh"),
        keras.layers.Dense(3, activation="softmax"),
    ])


def _data():
    rng = np.random.default_rng(3)
    return rng.normal(size=(16, 5)).astype("float32"), rng.integers(0, 3, size=16)


def _fit_steps(steps, fraction=1.0, damping=0.1, kl_clip=None,
               step_control="quadratic", adaptive_damping=False, scales=None):
    """The weights after each of `steps` quadratic-model steps on one batch, each
    `fraction` of the model's step.

    The damping is fixed unless `adaptive_damping` (the oracles here use the given
    one, so no trace cap: `tests/test_trace_damping_cap.py` checks the cap;
    `tests/test_damping.py` checks the adaptation, appending `damping_scale`
    after each step to the list `scales`).
    """
    x, y = _data()
    model = keras_tkfac.wrap(_classifier(0))
    optimizer = keras_tkfac.TKFAC(
        learning_rate=fraction * step_size.MODEL_STEP_LEARNING_RATE,
        step_control=step_control, damping=damping,
        kl_clip=kl_clip, adaptive_damping=adaptive_damping, factor_update_freq=1,
        inverse_update_freq=1, trace_damping_cap=None, seed=0)
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    trajectory = [[v.numpy().astype(np.float64) for v in model.trainable_variables]]
    for _ in range(steps):
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
        trajectory.append(
            [v.numpy().astype(np.float64) for v in model.trainable_variables])
        if scales is not None:
            scales.append(float(optimizer.damping_scale.numpy()))
    return trajectory


def _gradient_and_curvature(weights, example_weights=None):
    """The batch gradient and explicit Gauss-Newton matrix at `weights` (the
    latter's examples weighted by `example_weights`, if given)."""
    x, y = _data()
    model = _classifier(0)
    model.set_weights([w.astype("float32") for w in weights])
    loss = keras.losses.SparseCategoricalCrossentropy()
    variables = model.trainable_variables
    kernel_1, bias_1, kernel_2, bias_2 = (v.value for v in variables)
    with tf.GradientTape(persistent=True) as tape:
        hidden = tf.tanh(x @ kernel_1 + bias_1)
        logits = hidden @ kernel_2 + bias_2
        value = loss(y, tf.nn.softmax(logits))
    grad = np.concatenate([np.ravel(g) for g in tape.gradient(
        value, [v.value for v in variables])])
    jac = np.concatenate([np.reshape(tape.jacobian(logits, v.value), (16, 3, -1))
                          for v in variables], axis=-1).astype(np.float64)
    probs = tf.nn.softmax(logits).numpy().astype(np.float64)
    if example_weights is None:
        example_weights = np.ones(16)
    curvature = sum(w * j.T @ (np.diag(p) - np.outer(p, p)) @ j
                    for j, p, w in zip(jac, probs, example_weights)) / 16
    return grad.astype(np.float64), curvature


def _flat(weights):
    return np.concatenate([np.ravel(w) for w in weights])


def _loss(weights):
    """The batch's loss at `weights`."""
    x, y = _data()
    model = _classifier(0)
    model.set_weights([w.astype("float32") for w in weights])
    return float(keras.losses.SparseCategoricalCrossentropy()(y, model(x)))


def _model_damping(trajectory, step, damping):
    """The damping of step `step`'s model (from 0): `damping` times the
    loss-relative factor (`keras_tkfac.damping.model_factor`) of the explicit
    losses along `trajectory`."""
    losses = [_loss(w) for w in trajectory[:step + 1]]
    return damping * float(step_ops.loss_relative_factor(
        losses[-1], max(losses), keras_tkfac.damping.LOSS_RELATIVE_FLOOR,
        keras_tkfac.damping.LOSS_RELATIVE_ONSET))


@pytest.mark.parametrize("step_control", ["quadratic", "graft_quadratic"])
def test_steps_minimise_the_damped_model_along_their_directions(step_control,
                                                                 monkeypatch):
    # (The first steps' ceiling would cap the model's step; `tests/test_progress.py`.)
    monkeypatch.setattr(progress, "INITIAL", None)
    # (With the momentum coefficient free: a step on `MOMENTUM_RANGE`'s edge is not
    # stationary along the previous step; with the loss-relative damping from the
    # start, as the loss here falls by a third.)
    monkeypatch.setattr(step_size, "MOMENTUM_RANGE", None)
    monkeypatch.setattr(keras_tkfac.damping, "LOSS_RELATIVE_ONSET", 1.0)
    damping = 0.1
    trajectory = _fit_steps(2, damping=damping, step_control=step_control)
    first = _flat(trajectory[0]) - _flat(trajectory[1])
    second = _flat(trajectory[1]) - _flat(trajectory[2])
    grad, curvature = _gradient_and_curvature(trajectory[0])
    damped = curvature + damping * np.eye(len(grad))
    # First step: s = a U minimises q along U, so q'(s) is orthogonal to s.
    np.testing.assert_allclose(first @ grad, first @ damped @ first, rtol=2e-3)
    # Second step: s = a U + b M with M the first step; q'(s) is orthogonal to both.
    # Its damping has fallen with the loss.
    grad, curvature = _gradient_and_curvature(trajectory[1])
    assert _model_damping(trajectory, 1, damping) < 0.9 * damping
    damped = curvature + _model_damping(trajectory, 1, damping) * np.eye(len(grad))
    residual = grad - damped @ second
    for direction in (first, second):
        assert abs(direction @ residual) < 2e-3 * np.linalg.norm(
            direction) * np.linalg.norm(grad)
    assert np.all(np.isfinite(second)) and np.abs(second).max() > 0


def test_graft_quadratic_spreads_the_step_over_layers_as_rmsprop():
    # The step's per-layer lengths are in the ratio of RMSProp's first step,
    # R_l = G_l / (|G_l| + eps) elementwise; the quadratic model sets the total.
    trajectory = _fit_steps(1, step_control="graft_quadratic")
    step = _flat(trajectory[0]) - _flat(trajectory[1])
    grad, _ = _gradient_and_curvature(trajectory[0])
    first = 5 * 6 + 6  # Dense(6) kernel and bias; then Dense(3)'s
    rms = grad / (np.abs(grad) + 1e-7)
    np.testing.assert_allclose(
        np.linalg.norm(step[:first]) / np.linalg.norm(step[first:]),
        np.linalg.norm(rms[:first]) / np.linalg.norm(rms[first:]), rtol=1e-4)


@pytest.mark.parametrize("step_control", ["quadratic", "graft_quadratic"])
def test_kl_bound_shortens_a_long_step(step_control, monkeypatch):
    # (The first steps' ceiling would cap the model's step; `tests/test_progress.py`.)
    monkeypatch.setattr(progress, "INITIAL", None)
    free = _fit_steps(1, step_control=step_control)
    bounded = _fit_steps(1, kl_clip=1e-3, step_control=step_control)
    step = _flat(bounded[0]) - _flat(bounded[1])
    _, curvature = _gradient_and_curvature(bounded[0])
    np.testing.assert_allclose(0.5 * step @ curvature @ step, 1e-3, rtol=2e-3)
    # The same direction, shortened.
    unbounded = _flat(free[0]) - _flat(free[1])
    assert 0.5 * unbounded @ curvature @ unbounded > 1e-3
    np.testing.assert_allclose(
        step / np.linalg.norm(step), unbounded / np.linalg.norm(unbounded), atol=1e-5)


def test_the_kl_bound_of_squared_errors_is_in_the_units_of_their_residuals():
    """`kl_curvature`: a mean-squared-error output's Gram divided by
    `S = max(1, W) min(max(1, 2 L / max(1, W)), MSE_KL_SCALE_CAP)` of its weighted
    loss `L` and mean weight `W`, another output's by `max(1, W)` (hand-computed);
    none without outputs or losses."""
    squared = np.array([[2.0, 0.5], [0.5, 1.0]])
    other = np.array([[0.3, -0.1], [-0.1, 0.2]])
    cap = quadratic.MSE_KL_SCALE_CAP
    for loss, weight, factor in [(0.2, 1.0, 1.0), (3.0, 1.0, 6.0), (1e9, 1.0, cap),
                                 (0.2, 0.5, 1.0), (30.0, 5.0, 60.0),
                                 (1e9, 5.0, 5.0 * cap)]:
        for other_weight, other_factor in [(0.7, 1.0), (1.0, 1.0), (4.0, 4.0)]:
            got = quadratic.kl_curvature(
                tf.constant(squared + other, tf.float32),
                [(tf.constant(other, tf.float32), tf.constant(other_weight), None,
                  None),
                 (tf.constant(squared, tf.float32), tf.constant(weight), "squared",
                  None)],
                [tf.constant(0.7), tf.constant(loss)])
            np.testing.assert_allclose(
                got, squared / factor + other / other_factor, rtol=1e-6)
    np.testing.assert_allclose(quadratic.kl_scale(3.0), 6.0, rtol=1e-6)
    assert quadratic.kl_curvature(tf.constant(other), [], [tf.constant(3.0)]) is None
    assert quadratic.kl_curvature(
        tf.constant(squared), [(tf.constant(squared), tf.constant(1.0), "squared",
                                None)], None) is None


def test_the_kl_bound_of_an_absolute_error_is_its_laplace_fisher_in_residual_units():
    """`kl_curvature`: a mean-absolute-error output's Gram `C` replaced by its
    Laplace Fisher's `F` over `S = max(1, W) min(max((L / max(1, W))^2,
    LAPLACE_SCALE_FLOOR), MSE_KL_SCALE_CAP)` (hand-computed; below, above and beyond
    the clipped range), another output's kept."""
    square = np.array([[0.4, 0.1], [0.1, 0.3]])  # the quadratic model's, replaced
    laplace = np.array([[2.0, 0.5], [0.5, 1.0]])
    other = np.array([[0.3, -0.1], [-0.1, 0.2]])
    floor, cap = quadratic.LAPLACE_SCALE_FLOOR, quadratic.MSE_KL_SCALE_CAP
    for loss, weight, factor in [(0.5, 1.0, 0.25), (1e-5, 1.0, floor),
                                 (4.0, 1.0, 16.0), (1e9, 1.0, cap), (20.0, 5.0, 16.0),
                                 (0.5, 0.5, 0.25)]:
        got = quadratic.kl_curvature(
            tf.constant(square + other, tf.float32),
            [(tf.constant(other, tf.float32), tf.constant(1.0), None, None),
             (tf.constant(square, tf.float32), tf.constant(weight), "laplace",
              tf.constant(laplace, tf.float32))],
            [tf.constant(0.7), tf.constant(loss)])
        np.testing.assert_allclose(
            got, laplace / (max(1.0, weight) * factor) + other, rtol=1e-5)


@pytest.mark.parametrize("weighting, scale", [("sample_weight", None),
                                              ("loss_weights", 100.0),
                                              ("sum", 16.0),
                                              ("loss_weights", 0.5)])
def test_the_kl_bound_is_per_unit_of_the_losss_weight(weighting, scale, monkeypatch):
    """A step bounded by `kl_clip` has the predicted KL `(1/2) s^T C s` of the
    explicit Gauss-Newton matrix per unit of the loss's weight, `C = sum_n w_n
    J_n^T H_n J_n / (B max(1, mean w))`: sample weights (drawn in [20, 80]),
    `loss_weights=100`, `reduction="sum"` (16 terms), and `loss_weights=0.5`, which
    keeps the weighted `C` (`quadratic.KL_PER_UNIT_WEIGHT`)."""
    monkeypatch.setattr(progress, "INITIAL", None)
    x, y = _data()
    weights = (np.random.default_rng(7).uniform(20.0, 80.0, size=16)
               if weighting == "sample_weight" else np.full(16, scale))
    model = keras_tkfac.wrap(_classifier(0))
    model.compile(
        optimizer=keras_tkfac.TKFAC(
            learning_rate=step_size.MODEL_STEP_LEARNING_RATE, damping=0.1,
            kl_clip=1e-3, adaptive_damping=False, factor_update_freq=1,
            inverse_update_freq=1, trace_damping_cap=None, seed=0),
        loss=keras.losses.SparseCategoricalCrossentropy(
            reduction="sum" if weighting == "sum" else "sum_over_batch_size"),
        loss_weights=scale if weighting == "loss_weights" else None)
    before = [v.numpy().astype(np.float64) for v in model.trainable_variables]
    model.fit(x, y, sample_weight=(weights.astype("float32")
                                   if weighting == "sample_weight" else None),
              batch_size=16, epochs=1, shuffle=False, verbose=0)
    step = _flat(before) - _flat(
        [v.numpy().astype(np.float64) for v in model.trainable_variables])
    _, curvature = _gradient_and_curvature(before, weights)
    curvature = curvature / max(1.0, float(np.mean(weights)))
    np.testing.assert_allclose(0.5 * step @ curvature @ step, 1e-3, rtol=2e-3)


def _two_heads(seed):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((5,))
    hidden = keras.layers.Dense(6, activation="tanh")(inputs)
    return keras.Model(inputs, {"reg": keras.layers.Dense(1)(hidden),
                                "cls": keras.layers.Dense(3)(hidden)})


@pytest.mark.parametrize("offset", [0.0, 3.0])
def test_a_squared_error_heads_kl_is_in_its_residuals_units_beside_a_classifier(
        offset):
    """A model with a mean-squared-error head and a cross-entropy head: the step's
    KL `(1/2) s^T (C_reg / min(max(1, 2 L_reg), cap) + C_cls) s`, with the two heads'
    explicit Gauss-Newton matrices (Jacobians by `tape.jacobian`, loss weights
    included) and `L_reg` the regression head's weighted MSE in numpy before the
    step, equals `kl_clip`: the classifier's KL in nats, the squared error's in its
    residuals' units. At offset 0 (`2 L_reg < 1`) that is the plain KL."""
    x, labels = _data()
    targets = (offset + 0.1 * np.random.default_rng(5).normal(size=(16, 1))).astype(
        "float32")
    weights = {"reg": 0.5, "cls": 1.0}
    model = _two_heads(0)
    variables = [v.value for v in model.trainable_variables]
    with tf.GradientTape(persistent=True) as tape:
        outputs = model(x)
    jacobians = {name: np.concatenate(
        [np.reshape(tape.jacobian(outputs[name], v,
                                  unconnected_gradients=tf.UnconnectedGradients.ZERO),
                    (16, outputs[name].shape[-1], -1))
         for v in variables], axis=-1).astype(np.float64) for name in outputs}
    probs = tf.nn.softmax(outputs["cls"]).numpy().astype(np.float64)
    regression = weights["reg"] * 2.0 * np.einsum(
        "noi,noj->ij", jacobians["reg"], jacobians["reg"]) / 16
    classes = weights["cls"] * sum(
        j.T @ (np.diag(p) - np.outer(p, p)) @ j
        for j, p in zip(jacobians["cls"], probs)) / 16
    loss = weights["reg"] * float(np.mean((targets - outputs["reg"].numpy()) ** 2))
    factor = min(max(1.0, 2.0 * loss), quadratic.MSE_KL_SCALE_CAP)
    assert (factor > 5.0) if offset else (factor == 1.0)

    wrapped = keras_tkfac.wrap(_two_heads(0))
    kl_clip = 1e-3
    wrapped.compile(optimizer=keras_tkfac.TKFAC(
        learning_rate=step_size.MODEL_STEP_LEARNING_RATE, step_control="quadratic",
        kl_clip=kl_clip, adaptive_damping=False, factor_update_freq=1,
        inverse_update_freq=1, seed=0), loss={
            "reg": "mse",
            "cls": keras.losses.SparseCategoricalCrossentropy(from_logits=True)},
        loss_weights=weights)
    before = _flat([v.numpy().astype(np.float64) for v in wrapped.trainable_variables])
    wrapped.fit(x, {"reg": targets, "cls": labels}, batch_size=16, epochs=1,
                shuffle=False, verbose=0)
    step = _flat([v.numpy().astype(np.float64)
                  for v in wrapped.trainable_variables]) - before
    np.testing.assert_allclose(
        0.5 * step @ (regression / factor + classes) @ step, kl_clip, rtol=2e-3)
    if offset:
        assert 0.5 * step @ (regression + classes) @ step > 2.0 * kl_clip


def _regressor(seed, activation=None):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((5,)), keras.layers.Dense(6, activation="tanh"),
                             keras.layers.Dense(1, activation=activation)])


def _regression_jacobian(offset, spread, activation=None):
    """Targets `offset + spread * noise` for `_data()`'s 16 inputs, `_regressor`'s
    outputs on them and its `[16, weights]` Jacobian (`tape.jacobian`, float64)."""
    x, _ = _data()
    y = (offset + spread * np.random.default_rng(5).normal(size=(16, 1))).astype(
        "float32")
    model = _regressor(0, activation)
    variables = [v.value for v in model.trainable_variables]
    with tf.GradientTape(persistent=True) as tape:
        outputs = model(x)
    jacobian = np.concatenate(
        [np.reshape(tape.jacobian(outputs, v), (16, -1)) for v in variables],
        axis=-1).astype(np.float64)
    return y, outputs.numpy(), jacobian


def _regression_step(y, kl_clip, loss="mse", activation=None):
    """The weights before and after one quadratic-model step (the whole step) of
    `_regressor` under `loss` (MSE) on `_data()`'s inputs and the targets `y`."""
    x, _ = _data()
    model = keras_tkfac.wrap(_regressor(0, activation))
    optimizer = keras_tkfac.TKFAC(
        learning_rate=step_size.MODEL_STEP_LEARNING_RATE, step_control="quadratic",
        kl_clip=kl_clip, adaptive_damping=False, factor_update_freq=1,
        inverse_update_freq=1, seed=0)
    model.compile(optimizer=optimizer, loss=loss)
    before = _flat([v.numpy().astype(np.float64) for v in model.trainable_variables])
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    after = _flat([v.numpy().astype(np.float64) for v in model.trainable_variables])
    return before, after


@pytest.mark.parametrize("offset, spread, branch", [(0.0, 0.1, "small"),
                                                    (3.0, 1.0, "residual_units"),
                                                    (300.0, 1.0, "ceiling")])
def test_a_squared_error_step_is_bounded_in_the_units_of_its_residuals(offset, spread,
                                                                       branch):
    """The step's predicted KL `(1/2) s^T C s`, with `C = (2 / B) sum_n J_n^T J_n`
    the explicit Gauss-Newton matrix of the MSE (Jacobians by `tape.jacobian`), equals
    `kl_clip * min(max(1, 2 L), MSE_KL_SCALE_CAP)` (`quadratic.kl_curvature`), `L` the batch's MSE in numpy
    before the step; the same step without a bound is longer. The three target
    draws take the three branches: `2 L < 1`, in between, and beyond the ceiling."""
    y, outputs, jacobian = _regression_jacobian(offset, spread)
    curvature = 2.0 * jacobian.T @ jacobian / 16
    loss = float(np.mean((y - outputs) ** 2))
    factor = min(max(1.0, 2.0 * loss), quadratic.MSE_KL_SCALE_CAP)
    cap = quadratic.MSE_KL_SCALE_CAP
    assert {"small": 2 * loss < 1, "residual_units": 1 < 2 * loss < cap,
            "ceiling": 2 * loss > cap}[branch]
    kl_clip = 1e-3
    before, after = _regression_step(y, kl_clip)
    step = after - before
    np.testing.assert_allclose(0.5 * step @ curvature @ step, kl_clip * factor,
                               rtol=2e-3)
    before, free = _regression_step(y, None)
    unbounded = free - before
    assert 0.5 * unbounded @ curvature @ unbounded > kl_clip * factor


@pytest.mark.parametrize("activation", [None, "sigmoid", "softmax"])
def test_the_laplace_gram_is_taken_in_the_outputs_tangents(activation):
    """`products._laplace_gram`: `[[mean_n mean_d (J x)_nd (J y)_nd]]` with `J` the
    output's Jacobian, also when the products' tangents are those of the logits
    behind a sigmoid or softmax output (carried through the activation; against
    `tf.GradientTape.batch_jacobian` of the activation in numpy)."""
    rng = np.random.default_rng(2)
    logits = tf.constant(rng.normal(size=(5, 3)), tf.float32)
    tangents = [tf.constant(rng.normal(size=(5, 3)), tf.float32) for _ in range(2)]
    act = {None: tf.identity, "sigmoid": tf.sigmoid, "softmax": tf.nn.softmax}[
        activation]

    @tf.function
    def gram():
        y_pred = act(logits)
        spec = loss_specs.resolve_loss("mae", "true", y_pred=y_pred)
        assert spec.laplace
        output = loss_specs.OutputLoss(0, "out", spec, 1.0)
        source = loss_specs._logits_source(spec, y_pred)
        assert (source is y_pred) == (activation is None)
        return tf.stack([tf.stack(row) for row in products._laplace_gram(
            output, None, None, source, y_pred, tangents)])

    with tf.GradientTape() as tape:
        tape.watch(logits)
        outputs = act(logits)
    jacobian = tape.batch_jacobian(outputs, logits).numpy().astype(np.float64)
    moved = [np.einsum("nij,nj->ni", jacobian, t.numpy()) for t in tangents]
    expected = np.array([[np.mean(u * v) for v in moved] for u in moved])
    np.testing.assert_allclose(gram(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("offset, activation", [(0.8, None), (30.0, None),
                                                (1.5, "sigmoid")])
def test_an_absolute_error_step_is_bounded_by_its_laplace_kl(offset, activation):
    """The step's predicted KL under MAE is the Laplace Fisher's in the residuals'
    units: `(1/2) s^T F s / b^2 = kl_clip`, `F = (1 / B) sum_n J_n^T J_n` (Jacobians
    of the output, by `tape.jacobian`; one output unit) and `b` the batch's mean
    absolute residual in numpy before the step (below 1 and about 30: a tighter and
    a looser bound than `F`'s own; and a sigmoid output, whose products run through
    its logits); the same step without a bound is longer."""
    y, outputs, jacobian = _regression_jacobian(offset, 0.2, activation)
    fisher = jacobian.T @ jacobian / 16
    scale = float(np.mean(np.abs(y - outputs))) ** 2
    assert quadratic.LAPLACE_SCALE_FLOOR < scale < quadratic.MSE_KL_SCALE_CAP
    kl_clip = 1e-4
    before, after = _regression_step(y, kl_clip, loss="mae", activation=activation)
    step = after - before
    np.testing.assert_allclose(0.5 * step @ fisher @ step / scale, kl_clip, rtol=2e-3)
    before, free = _regression_step(y, None, loss="mae", activation=activation)
    unbounded = free - before
    assert 0.5 * unbounded @ fisher @ unbounded / scale > kl_clip


@pytest.mark.parametrize("step_control", ["quadratic", "graft_quadratic"])
def test_learning_rate_scales_the_model_step(step_control):
    full = _fit_steps(1, fraction=1.0, step_control=step_control)
    half = _fit_steps(1, fraction=0.5, step_control=step_control)
    np.testing.assert_allclose(
        _flat(half[0]) - _flat(half[1]),
        0.5 * (_flat(full[0]) - _flat(full[1])), rtol=1e-4, atol=1e-7)


def test_a_learning_rate_above_the_cap_takes_the_whole_step_and_says_so(caplog):
    # Above 1e-3 the weights move by the model's whole step, as at 1e-3: logged at
    # construction, so that the learning rate never looks as if it acted.
    logging.set_verbosity(logging.WARNING)
    capped = _fit_steps(1, fraction=10.0, step_control="graft_quadratic")
    assert any("learning_rate=0.01" in r.getMessage() for r in caplog.records)
    whole = _fit_steps(1, fraction=1.0, step_control="graft_quadratic")
    for got, want in zip(capped[-1], whole[-1]):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    caplog.clear()
    keras_tkfac.TKFAC(learning_rate=3e-4)
    keras_tkfac.TKFAC(learning_rate=float(np.float32(1e-3)))  # as a reload reads it
    keras_tkfac.TKFAC(step_control="graft", learning_rate=0.03)
    keras_tkfac.TKFAC(learning_rate=keras.optimizers.schedules.CosineDecay(
        0.0, 1000, warmup_target=1e-3, warmup_steps=100))
    assert not any("keras_tkfac: under" in r.getMessage() for r in caplog.records)
    # A schedule that starts above the cap, or whose warm-up ends above it: the
    # steps while it is above it are the whole model step.
    for schedule in (keras.optimizers.schedules.ExponentialDecay(0.03, 100, 0.9),
                     keras.optimizers.schedules.CosineDecay(
                         0.0, 1000, warmup_target=1e-2, warmup_steps=100)):
        caplog.clear()
        keras_tkfac.TKFAC(learning_rate=schedule)
        assert [r for r in caplog.records if "schedule" in r.getMessage()
                and "reaches 0.0" in r.getMessage()]


def test_a_learning_rate_set_later_above_the_cap_says_so_once(caplog):
    # `LearningRateScheduler` and `ReduceLROnPlateau` set `optimizer.learning_rate`:
    # a value above the cap set so is logged as the constructor's is, once; an
    # invalid learning rate raises without the warning.
    logging.set_verbosity(logging.WARNING)

    def warnings():
        return [r for r in caplog.records if "keras_tkfac: under" in r.getMessage()]

    caplog.clear()
    optimizer = keras_tkfac.TKFAC()
    optimizer.learning_rate = 5e-4
    assert not warnings()
    x, y = _data()
    model = keras_tkfac.wrap(_classifier(0))
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[
        keras.callbacks.LearningRateScheduler(lambda epoch: [1e-3, 1e-2][epoch])])
    assert np.isclose(float(optimizer.learning_rate.numpy()), 1e-2)
    assert len(warnings()) == 1 and "learning_rate=0.01" in warnings()[0].getMessage()
    optimizer.learning_rate = np.float32(0.05)
    assert len(warnings()) == 1
    other = keras_tkfac.TKFAC()
    other.learning_rate = tf.constant(0.02)
    assert len(warnings()) == 2
    caplog.clear()
    with pytest.raises(ValueError, match="learning_rate"):
        keras_tkfac.TKFAC(learning_rate=float("inf"))
    assert not warnings()


def test_a_learning_rate_copied_from_adam_is_the_default():
    # Keras's optimizers default to 1e-3, the scale of the model's step: a learning
    # rate copied from an Adam program takes the whole step, and the partner (here a
    # LayerNormalization's scale and offset) moves at it, as at TKFAC's defaults.
    assert keras.optimizers.Adam().learning_rate.numpy() == np.float32(
        step_size.MODEL_STEP_LEARNING_RATE)
    x, y = _data()

    def trained(**options):
        keras.utils.set_random_seed(0)
        base = keras.Sequential([
            keras.Input((5,)), keras.layers.Dense(6, activation="tanh"),
            keras.layers.LayerNormalization(),
            keras.layers.Dense(3, activation="softmax")])
        model = keras_tkfac.wrap(base)
        optimizer = keras_tkfac.TKFAC(seed=0, **options)
        model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
        start = [w.numpy().copy() for w in base.trainable_weights]
        model.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0)
        assert optimizer._partner_slots.count(None) < len(optimizer._partner_slots)
        return start, [w.numpy() for w in base.trainable_weights]

    start, default = trained()
    for got, want in zip(trained(learning_rate=1e-3)[1], default):
        np.testing.assert_array_equal(got, want)
    # (and it moved every weight, the partner's too)
    for before, after in zip(start, default):
        assert not np.allclose(before, after)


def test_batch_statistics_move_once_per_step():
    x, y = _data()

    def moving_mean(step_control):
        keras.utils.set_random_seed(0)
        model = keras_tkfac.wrap(keras.Sequential([
            keras.Input((5,)), keras.layers.Dense(4),
            keras.layers.BatchNormalization(), keras.layers.Dense(3,
                                                                  activation="softmax"),
        ]))
        model.compile(optimizer=keras_tkfac.TKFAC(step_control=step_control, seed=0),
                      loss="sparse_categorical_crossentropy")
        model.fit(x, y, batch_size=16, epochs=1, verbose=0)
        return model.model.layers[1].moving_mean.numpy()

    np.testing.assert_allclose(moving_mean("quadratic"), moving_mean("graft"),
                               rtol=1e-6)


def _custom_loop_weights(optimizer, steps, forward, labels=True, losses=None,
                         examples=None):
    """The weights after `steps` custom-loop steps, passing `forward` on the steps
    where `forward` (a bool, or `step -> bool`) holds and `y_true` if `labels`;
    each step's mean loss is appended to the list `losses`. `examples`: the batch's
    first that many examples (all 16 by default)."""
    x, y = _data()
    x, y = x[:examples], y[:examples]
    model = keras_tkfac.wrap(_classifier(0))
    for step in range(steps):
        with tf.GradientTape(persistent=True) as tape:
            with keras_tkfac.record(model) as recording:
                y_pred = model(x, training=True)
            loss = keras.losses.sparse_categorical_crossentropy(y, y_pred)
        grads = tape.gradient(loss, model.trainable_variables)
        passes = forward(step) if callable(forward) else forward
        optimizer.update_curvature(
            recording, tape, y_pred, y_true=y if labels else None,
            loss="sparse_categorical_crossentropy",
            forward=(lambda: model(x, training=True)) if passes else None)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        if losses is not None:
            losses.append(float(tf.reduce_mean(loss)))
    return [v.numpy() for v in model.trainable_variables]


@pytest.mark.parametrize("control, sibling", [("graft_quadratic", "graft"),
                                              ("quadratic", "trust_region")])
@pytest.mark.parametrize("forward", [False, True], ids=["no_forward", "failing"])
@pytest.mark.parametrize("learning_rate", [1e-3, 3e-4, 1e-2])
def test_without_products_the_step_is_the_sibling_step(control, sibling, forward,
                                                        learning_rate, monkeypatch):
    # Without `forward`, or with a model neither forward nor reverse mode passes,
    # there are no products: the step is the sibling control's at the learning rate
    # scaled by the ratio of their defaults (3e-3 / 1e-3 for graft, 0.1 / 1e-3 for
    # trust_region). The cap of the model's steps at 1e-3 does not apply to it: at
    # 1e-2 the sibling's learning rate is 3e-2 (1.0), not 3e-3 (0.1).
    if forward:
        def fail(*args):
            raise NotImplementedError("no products here")
        monkeypatch.setattr(products, "_forward_mode", fail)
        monkeypatch.setattr(products, "_reverse_mode", fail)
    ratio = (step_size.DEFAULT_LEARNING_RATE[sibling]
             / step_size.DEFAULT_LEARNING_RATE[control])
    options = dict(factor_update_freq=1, inverse_update_freq=2, seed=0)
    found = _custom_loop_weights(
        keras_tkfac.TKFAC(step_control=control, learning_rate=learning_rate,
                          **options), 3, forward=forward)
    # (The sibling step is the same optimizer's: its dense layers' damping keeps
    # the quadratic control's trace cap.)
    cap = keras_tkfac.TKFAC(step_control=control).trace_damping_cap
    expected = _custom_loop_weights(
        keras_tkfac.TKFAC(step_control=sibling, learning_rate=learning_rate * ratio,
                          trace_damping_cap=cap, **options), 3, forward=False)
    for got, want in zip(found, expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("threshold", ["default", "infinite"])
def test_an_untrusted_model_takes_the_sibling_step(threshold, monkeypatch):
    # On this tiny classifier (16 random examples, random labels) the minimiser of
    # the quadratic model predicts a decrease of ~100 on a loss of ~1.3: beyond
    # `UNTRUSTED_DECREASE` times the loss, so every step is the sibling's, exactly
    # as without products, and the damping is not adapted from the model's
    # prediction. Without the threshold the steps are the model's.
    default = quadratic.UNTRUSTED_DECREASE
    if threshold == "infinite":
        monkeypatch.setattr(quadratic, "UNTRUSTED_DECREASE", np.inf)
    ratios = []
    updates = step_size.quadratic_updates

    def spy(products, dampings, us, grads, previous, bounds, min_coefficient=None,
            damping_factor=None, max_coefficient=None, linearized=None):
        limits = []

        def recorded():
            limits.append(bounds())
            return limits[-1]

        found, predicted, minimum = updates(products, dampings, us, grads, previous,
                                            recorded, min_coefficient, damping_factor,
                                            max_coefficient, linearized)
        ratios.append(-minimum / (limits[0][1] / quadratic.LOSS_BOUND_FACTOR))
        return found, predicted, minimum

    monkeypatch.setattr(step_size, "quadratic_updates", spy)
    options = dict(factor_update_freq=1, inverse_update_freq=2, seed=0)
    optimizer = keras_tkfac.TKFAC(step_control="graft_quadratic", learning_rate=1e-3,
                                  **options)
    found = _custom_loop_weights(optimizer, 3, forward=True)
    assert len(ratios) == 3
    assert all(float(r) > default for r in ratios)
    # The sibling's step at the learning rate scaled by the ratio of the defaults.
    ratio = (step_size.DEFAULT_LEARNING_RATE["graft"]
             / step_size.DEFAULT_LEARNING_RATE["graft_quadratic"])
    expected = _custom_loop_weights(
        keras_tkfac.TKFAC(step_control="graft", learning_rate=1e-3 * ratio,
                          trace_damping_cap=optimizer.trace_damping_cap, **options),
        3, forward=False)
    same = [np.allclose(got, want, rtol=1e-5, atol=1e-7)
            for got, want in zip(found, expected)]
    if threshold == "default":
        assert all(same)
        assert float(optimizer.damping_scale.numpy()) == 1.0
    else:
        assert not any(same)
        assert float(optimizer.damping_scale.numpy()) != 1.0


@pytest.mark.parametrize("examples", [1, 2])
def test_a_model_of_one_loss_term_takes_the_sibling_step(examples, monkeypatch):
    # A batch of one example: the model's minimiser fits that one term
    # (`MIN_TRUSTED_TERMS`), so the step is the sibling's, exactly as without
    # products, and the damping is not adapted. Two examples: the model's own steps.
    # (The decrease rule, which these random labels would trip, is off.)
    monkeypatch.setattr(quadratic, "UNTRUSTED_DECREASE", np.inf)
    options = dict(factor_update_freq=1, inverse_update_freq=2, seed=0)
    optimizer = keras_tkfac.TKFAC(**options)
    found = _custom_loop_weights(optimizer, 3, forward=True, examples=examples)
    ratio = (step_size.DEFAULT_LEARNING_RATE["graft"]
             / step_size.DEFAULT_LEARNING_RATE["graft_quadratic"])
    expected = _custom_loop_weights(
        keras_tkfac.TKFAC(step_control="graft", learning_rate=1e-3 * ratio,
                          trace_damping_cap=optimizer.trace_damping_cap, **options),
        3, forward=False, examples=examples)
    same = [np.allclose(got, want, rtol=1e-5, atol=1e-7)
            for got, want in zip(found, expected)]
    if examples == 1:
        assert all(same)
        assert float(optimizer.damping_scale.numpy()) == 1.0
    else:
        assert not any(same)


@pytest.mark.parametrize("shape, terms", [((1, 4), 1), ((3, 4), 3), ((6,), 6),
                                          ((2, 5, 7), 10), ((1, 8, 8, 2), 64)])
def test_loss_terms_are_examples_times_positions(shape, terms):
    # (Of a model's outputs, the first counts.)
    assert int(quadratic._loss_terms(tf.zeros(shape))) == terms
    assert int(quadratic._loss_terms([tf.zeros(shape), tf.zeros((9, 9))])) == terms


def test_without_labels_the_steps_are_the_models_without_the_loss_rules(monkeypatch):
    # `y_true` gives the batch's loss: without it the products still make the step
    # (not the sibling's), only the rules that need the loss are off: the loss bound,
    # the untrusted-model rule and the damping's adaptation. So the steps equal a
    # labelled run with those three switched off.
    options = dict(factor_update_freq=1, inverse_update_freq=2, seed=0)
    found = _custom_loop_weights(keras_tkfac.TKFAC(**options), 3, forward=True,
                                 labels=False)
    sibling = _custom_loop_weights(keras_tkfac.TKFAC(step_control="graft", **options),
                                   3, forward=False)
    monkeypatch.setattr(quadratic, "LOSS_BOUND_FACTOR", np.inf)
    monkeypatch.setattr(quadratic, "UNTRUSTED_DECREASE", np.inf)
    expected = _custom_loop_weights(
        keras_tkfac.TKFAC(adaptive_damping=False, **options), 3, forward=True)
    for got, want, other in zip(found, expected, sibling):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
        assert not np.allclose(got, other, rtol=1e-5, atol=1e-7)


def test_steps_with_and_without_forward_can_alternate():
    losses = []
    _custom_loop_weights(keras_tkfac.TKFAC(step_control="graft_quadratic", seed=0), 8,
                         forward=lambda step: step % 2 == 1, losses=losses)
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


@pytest.mark.parametrize("examples, rows", [(16, 16), (40, 32), (129, 33), (256, 64)])
def test_product_sub_batch_size(examples, rows, monkeypatch):
    monkeypatch.setattr(products, "PRODUCT_FRACTION", 0.25)
    assert int(products._product_rows(tf.constant(examples))) == rows


def test_a_model_forward_takes_the_products_on_its_first_rows(monkeypatch):
    monkeypatch.setattr(products, "PRODUCT_FRACTION", 0.25)
    model, x, y, weights, variables, directions = _two_head_problem(n=40)
    loss = {"classes": "sparse_categorical_crossentropy", "values": "mse"}
    loss_weights = {"classes": 0.3, "values": 2.0}
    outputs = loss_specs.resolve_losses(loss, "true", model(x), loss_weights=loss_weights,
                                    output_names=["classes", "values"])
    batch = products.Batch(products.ModelForward(model, x), outputs, y, weights)
    gram = batch.gram(variables, directions)
    flat = np.array([np.concatenate([np.ravel(d) for d in direction])
                     for direction in directions], dtype=np.float64)
    rows = 32  # max(40 / 4, PRODUCT_MIN_EXAMPLES)
    whole_batch = products.Batch(products.ModelForward(model, x), outputs, y,
                                  weights)
    monkeypatch.setattr(products, "PRODUCT_FRACTION", 1.0)  # the default
    np.testing.assert_allclose(
        whole_batch.gram(variables, directions),
        flat @ _explicit_gauss_newton(model, x, weights, loss_weights) @ flat.T,
        rtol=1e-4)
    monkeypatch.setattr(products, "PRODUCT_FRACTION", 0.25)
    expected = flat @ _explicit_gauss_newton(model, x[:rows], weights[:rows],
                                             loss_weights) @ flat.T
    np.testing.assert_allclose(gram, expected, rtol=1e-4)
    # The loss before the step is the whole batch's, by a pass of its own.
    whole = products.Batch(products.ModelForward(model, x), outputs, y, weights)
    whole.gram(variables, directions)
    full = products.Batch(lambda: model(x, training=True), outputs, y, weights)
    full.gram(variables, directions)
    assert whole.predictions is None and full.predictions is not None
    np.testing.assert_allclose(whole.loss_before(tf.constant(True)),
                               full.loss_before(tf.constant(True)), rtol=1e-6)
    assert float(whole.loss_before(tf.constant(False))) == 0.0


def _dropout_classifier(x):
    """A dropout classifier and its resolved loss."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dropout(0.5),
                              keras.layers.Dense(3, activation="softmax")])
    return model, loss_specs.resolve_losses("sparse_categorical_crossentropy", "true",
                                        model(x))


def test_the_passes_of_a_step_draw_the_same_dropout_masks():
    # Restoring the seed generators makes the losses before and after a step differ
    # by the step alone (an unchanged model gives the same loss twice).
    x, y = _data()
    model, outputs = _dropout_classifier(x)
    batch = products.Batch(products.ModelForward(model, x), outputs, y, None,
                            model.non_trainable_variables)
    first, second = float(batch.loss()), float(batch.loss())
    assert first == second
    unrestored = products.Batch(products.ModelForward(model, x), outputs, y, None)
    assert float(unrestored.loss()) != float(unrestored.loss())


def test_the_passes_of_a_step_replay_the_masks_of_its_own_forward_pass():
    # Given the state from before the step's own forward pass (`wrap`'s training
    # step hands it over), the products' and the damping's passes draw the masks
    # that the gradient saw, and leave the state as that pass left it.
    x, y = _data()
    model, outputs = _dropout_classifier(x)
    before = [tf.identity(v) for v in model.non_trainable_variables]
    own = model(x, training=True)
    after = [v.numpy() for v in model.non_trainable_variables]
    batch = products.Batch(products.ModelForward(model, x, before), outputs, y, None,
                           model.non_trainable_variables, initial=before)
    np.testing.assert_allclose(float(batch.loss()), float(batch.loss([own])),
                               rtol=1e-6)
    for variable, value in zip(model.non_trainable_variables, after):
        np.testing.assert_array_equal(variable.numpy(), value)
    # Without it (a custom loop's `forward=`), other masks than the step's own.
    other = products.Batch(products.ModelForward(model, x), outputs, y, None,
                           model.non_trainable_variables)
    assert float(other.loss()) != float(batch.loss([own]))


@pytest.mark.parametrize("replay", [False, True])
def test_wrap_hands_the_pre_forward_state_over_where_masks_are_replayed(
        replay, monkeypatch):
    seen = []

    class Spy(products.Batch):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.append(self.initial)

    monkeypatch.setattr(products, "Batch", Spy)
    monkeypatch.setattr(products, "REPLAY_MASKS", replay)
    x, y = _data()
    keras.utils.set_random_seed(0)
    model = keras_tkfac.wrap(keras.Sequential([
        keras.Input((5,)), keras.layers.Dropout(0.5),
        keras.layers.Dense(3, activation="softmax")]))
    model.compile(optimizer=keras_tkfac.TKFAC(seed=0),
                  loss="sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=len(x), epochs=1, verbose=0)
    assert seen and all((initial is not None) == replay for initial in seen)


def test_custom_loop_with_forward_trains():
    x, y = _data()
    model = keras_tkfac.wrap(_classifier(0))
    optimizer = keras_tkfac.TKFAC(step_control="quadratic", seed=0)
    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    losses = []
    for _ in range(5):
        with tf.GradientTape(persistent=True) as tape:
            with keras_tkfac.record(model) as recording:
                y_pred = model(x, training=True)
            loss = loss_fn(y, y_pred)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.update_curvature(recording, tape, y_pred, y_true=y, loss=loss_fn,
                                   forward=lambda: model(x, training=True))
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        losses.append(float(loss))
    assert losses[-1] < losses[0]


def test_reverse_mode_products_equal_forward_mode():
    keras.utils.set_random_seed(2)
    model = _two_head_model()
    x = RNG.normal(size=(5, 3)).astype("float32")
    outputs = loss_specs.resolve_losses(
        {"classes": "sparse_categorical_crossentropy", "values": "mse"}, "true",
        model(x), output_names=["classes", "values"])
    primals = [v.value for v in model.trainable_variables]
    directions = [[RNG.normal(size=p.shape).astype("float32") for p in primals]
                  for _ in range(2)]
    forward = lambda: model(x, training=True)  # noqa: E731
    expected, _, _ = products._forward_mode(forward, outputs, primals, directions)
    found, _, _ = products._reverse_mode(forward, outputs, primals, directions)
    for want, got in zip(expected, found):
        for w, g in zip(want, got):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def _layered_model():
    """Conv, BatchNorm, max-pool, gelu (a custom gradient), LayerNorm, attention."""
    inputs = keras.Input((6, 6, 2))
    h = keras.layers.Conv2D(3, 3, padding="same")(inputs)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.Activation("gelu")(h)
    h = keras.layers.MaxPooling2D(2)(h)
    h = keras.layers.Reshape((9, 3))(h)
    h = keras.layers.MultiHeadAttention(2, 2)(h, h)
    h = keras.layers.LayerNormalization()(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    return keras.Model(inputs, keras.layers.Dense(4, activation="softmax")(h))


@pytest.mark.parametrize("inline", [True, False])
def test_nested_forward_mode_products_equal_one_pass_per_direction(monkeypatch,
                                                                   inline):
    """`products.NESTED`: in a traced pass, nested accumulators carry the two
    directions' tangents through one primal pass; each `J x` equals the one from a
    pass of its own, and reverse mode's; with the inline tangents
    (`products.INLINE_JVPS`, `jvp_rules`) and with TensorFlow's dispatch."""
    monkeypatch.setattr(products, "INLINE_JVPS", inline)
    used, rule = set(), jvp_rules.rule

    def recording(op_type):
        found = rule(op_type)
        if found is not None:
            used.add(op_type)
        return found

    monkeypatch.setattr(jvp_rules, "rule", recording)
    keras.utils.set_random_seed(3)
    model = _layered_model()
    x = tf.constant(RNG.normal(size=(5, 6, 6, 2)).astype("float32"))
    outputs = loss_specs.resolve_losses("sparse_categorical_crossentropy", "true",
                                    model(x))
    primals = [v.value for v in model.trainable_variables]
    directions = [[tf.constant(RNG.normal(size=p.shape).astype("float32"))
                   for p in primals] for _ in range(2)]
    forward = lambda: model(x, training=True)  # noqa: E731
    passes, original = [], products._passes

    def recorded(forward, outputs, primals, groups, model=None, recording=None):
        passes.append([len(group) for group in groups])
        return original(forward, outputs, primals, groups, model, recording)

    monkeypatch.setattr(products, "_passes", recorded)
    results = {}
    for nested in (True, False):
        results[nested] = tf.function(lambda: products._forward_mode(
            forward, outputs, primals, directions, nested)[0])()
    assert passes == [[2], [1, 1]]  # one pass carrying both; then one each
    # Inline: the layers' ops took the rules (gelu's custom gradient does not).
    assert used >= ({"Conv2D", "Rsqrt", "MaxPool", "Einsum", "Softmax"} if inline
                    else set())
    reverse, _, _ = tf.function(lambda: products._reverse_mode(
        forward, outputs, primals, directions))()
    for got, want, other in zip(results[True], results[False], reverse):
        for g, w, o in zip(got, want, other):
            assert np.abs(w).max() > 1e-3
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(g, o, rtol=1e-4, atol=1e-5)


def test_fit_on_batches_of_unknown_size_nests_through_dropout_and_masking(monkeypatch):
    """A `tf.data` pipeline whose last batch is partial traces the step with an
    unknown batch size: `Dropout` then takes `tf.shape` of its input and `Masking`
    compares it (integer and boolean outputs: `tangents.INTEGER_OUTPUTS`). The
    products still take one nested pass carrying both directions (before, each
    step fell back to one pass per direction)."""
    passes, original = [], products._passes

    def recorded(forward, outputs, primals, groups, model=None, recording=None):
        passes.append([len(group) for group in groups])
        return original(forward, outputs, primals, groups, model, recording)

    monkeypatch.setattr(products, "_passes", recorded)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 6)).astype("float32")
    y = (x[:, 0] > 0).astype("float32")
    keras.utils.set_random_seed(0)
    model = keras_tkfac.wrap(keras.Sequential([
        keras.Input((6,)), keras.layers.Dense(8, activation="relu"),
        keras.layers.Masking(0.0), keras.layers.Dropout(0.3),
        keras.layers.Dense(1, activation="sigmoid")]))
    model.compile(optimizer=keras_tkfac.TKFAC(seed=0), loss="binary_crossentropy")
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    assert data.element_spec[0].shape[0] is None
    history = model.fit(data, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert passes and all(groups == [2] for groups in passes), passes


def test_fit_through_a_recurrent_layer():
    # Forward mode cannot pass Keras's LSTM loop; the products take reverse mode.
    rng = np.random.default_rng(4)
    x = rng.normal(size=(16, 6, 3)).astype("float32")
    y = rng.integers(0, 2, size=16)
    keras.utils.set_random_seed(0)
    model = keras_tkfac.wrap(keras.Sequential([
        keras.Input((6, 3)), keras.layers.LSTM(4),
        keras.layers.Dense(2, activation="softmax")]))
    model.compile(optimizer=keras_tkfac.TKFAC(step_control="quadratic", seed=0),
                  loss="sparse_categorical_crossentropy")
    history = model.fit(x, y, batch_size=8, epochs=3, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_the_loss_bound_holds_where_the_terms_are_nonnegative():
    """`Batch.loss` says whether the loss cannot fall below zero: every output's loss
    has a formula, or the others' terms are all >= 0 on the batch (Huber), not where
    one is negative (cosine similarity)."""
    model, x, y, weights, _, _ = _two_head_problem()
    y = {**y, "values": np.abs(y["values"])}
    for loss, nonnegative in (("mse", True), (keras.losses.Huber(), True),
                              (keras.losses.CosineSimilarity(), False)):
        outputs = loss_specs.resolve_losses(
            {"classes": "sparse_categorical_crossentropy", "values": loss}, "true",
            model(x), output_names=["classes", "values"])
        batch = products.Batch(products.ModelForward(model, x), outputs, y, weights)
        batch.loss()
        assert bool(batch.nonnegative) is nonnegative


def test_the_grafted_directions_coefficient_has_a_floor():
    """`min_coefficient` (`GRAFT_QUADRATIC_FLOOR` under `"graft_quadratic"`) floors a
    positive coefficient the model chose, here `<U, G> / (<U, C U> + |U|^2)` =
    4 / (1e6 + 4), and leaves a negative one and the model without it alone."""
    updates, previous = [tf.ones((2, 2))], [tf.zeros((2, 2))]

    def products(directions):
        return tf.constant([[1e6, 0.0], [0.0, 0.0]])

    def step(grad, floor):
        found, _, _ = step_size.quadratic_updates(
            products, [1.0], updates, [grad * tf.ones((2, 2))], previous, None, floor)
        return step_size.combine(found, updates, previous)[0].numpy()

    model, floor = 4.0 / (1e6 + 4.0), step_size.GRAFT_QUADRATIC_FLOOR
    assert floor == 1e-3  # README's API table and "The grafted step's floor"
    np.testing.assert_allclose(step(1.0, None), model * np.ones((2, 2)), rtol=1e-5)
    np.testing.assert_allclose(step(1.0, floor), floor * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_allclose(step(-1.0, floor), -model * np.ones((2, 2)), rtol=1e-5)
    # Above the floor, the model's own coefficient stands.
    np.testing.assert_allclose(step(1.0, model / 2), model * np.ones((2, 2)), rtol=1e-5)


def test_products_passes_run_recurrent_layers_without_cudnn(monkeypatch):
    """`products.without_cudnn`: TensorFlow has no derivative of cuDNN's backward
    op, so the products' passes trace Keras's generic loop of every `LSTM` and
    `GRU` (inside `Bidirectional` too); the step's own passes keep the layers'
    setting (`"auto"` or `True`), which is restored after, also when the pass
    fails."""
    seen = []
    for cls in (keras.layers.LSTM, keras.layers.GRU):
        original = cls.inner_loop

        def recording(self, *args, original=original, **kwargs):
            seen.append(self.use_cudnn)
            return original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "inner_loop", recording)
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 3))
    h = keras.layers.Bidirectional(keras.layers.LSTM(4, return_sequences=True))(inputs)
    h = keras.layers.GRU(4)(h)
    model = keras_tkfac.wrap(keras.Model(inputs, keras.layers.Dense(2)(h)))
    recurrent = [layer for layer in model._flatten_layers(include_self=False)
                 if hasattr(layer, "use_cudnn")]
    assert len(recurrent) == 3  # the two directions' copies and the GRU
    model.compile(optimizer=keras_tkfac.TKFAC(), loss=keras.losses.
                  SparseCategoricalCrossentropy(from_logits=True))
    seen.clear()
    x = RNG.normal(size=(16, 6, 3)).astype("float32")
    y = RNG.integers(0, 2, size=16)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert False in seen and "auto" in seen
    assert [layer.use_cudnn for layer in recurrent] == ["auto"] * 3
    recurrent[2].use_cudnn = True  # (which raises on this CPU where called)
    with pytest.raises(RuntimeError):
        with products.without_cudnn(model):
            assert [layer.use_cudnn for layer in recurrent] == [False] * 3
            raise RuntimeError
    assert [layer.use_cudnn for layer in recurrent] == ["auto", "auto", True]


def _recurrent_model(kind):
    keras.utils.set_random_seed(5)
    L = keras.layers
    if kind == "bilstm":
        inputs = keras.Input((6,), dtype="int32")
        h = L.Embedding(30, 4, mask_zero=True)(inputs)
        h = L.Bidirectional(L.LSTM(3))(h)
    elif kind == "stacked_bilstm":  # as the suite's: a loop's outputs enter one
        inputs = keras.Input((6,), dtype="int32")
        h = L.Embedding(30, 4)(inputs)
        h = L.Bidirectional(L.LSTM(3, return_sequences=True))(h)
        h = L.Bidirectional(L.LSTM(2))(h)
    elif kind == "gru":
        inputs = keras.Input((6, 2))
        h = L.Dense(3, name="before_the_loop")(inputs)  # its tangent enters the loop
        h = L.GRU(3, go_backwards=True, return_sequences=True, dropout=0.2)(h)
        h = L.Flatten()(L.SimpleRNN(3, return_sequences=True)(h))
    elif kind in ("unrolled_by_keras", "unrolled_unmasked"):  # `unroll=True`
        inputs = keras.Input((6,), dtype="int32")
        h = L.Embedding(30, 4, mask_zero=kind == "unrolled_by_keras")(inputs)
        h = L.Bidirectional(L.LSTM(3, return_sequences=True, unroll=True))(h)
        h = L.LSTM(3, return_sequences=True, unroll=True, zero_output_for_mask=True)(h)
        h = L.GRU(2, unroll=True, go_backwards=True)(h)
    else:  # stacked cells, returned states
        inputs = keras.Input((6, 2))
        h, *_ = L.RNN(L.StackedRNNCells([L.LSTMCell(3), L.GRUCell(2)]),
                      return_state=True)(inputs)
    return keras.Model(inputs, L.Dense(3)(h))


# `make test` carries masks and `go_backwards` (bilstm), one pass per direction
# (gru, stacked) and stacked cells; the nested GRU and the stacked BiLSTM (the same
# loops, ~45 s together) run in `make test-all`.
@pytest.mark.parametrize("kind,nested", [
    ("bilstm", True), pytest.param("gru", True, marks=pytest.mark.slow),
    ("gru", False), ("stacked", False),
    pytest.param("stacked_bilstm", True, marks=pytest.mark.slow)])
def test_forward_mode_products_pass_recurrent_loops(kind, nested):
    """`rnn_tangents.carrying`: forward mode carries the tangents through Keras's
    recurrent loops (masks, `go_backwards`, input dropout, stacked cells), for the
    embedding and dense layers around them and for the recurrent weights; each
    `J x` equals reverse-over-reverse `d/du <J^T u, x>` through the same loops."""
    _check_recurrent_products(kind, nested, cells_carry=True)


# A layer's own `unroll=True` (`rnn_tangents._unrolled`: Keras's unrolled loop,
# masked steps included), with the cells' weights among the directions or not.
@pytest.mark.parametrize("kind,cells_carry", [
    ("unrolled_by_keras", False), ("unrolled_by_keras", True),
    ("unrolled_unmasked", False)])
def test_forward_mode_products_pass_unrolled_loops(kind, cells_carry):
    """Each `J x` through loops that Keras unrolls equals reverse-over-reverse
    through the same loops: masks held and zeroed as Keras's unrolled loop does
    (`go_backwards` in the bidirectional layer), without masks, the cells'
    weights carrying tangents or not."""
    _check_recurrent_products(kind, True, cells_carry=cells_carry)


def test_fit_through_unrolled_loops_in_forward_mode():
    """`fit` with layers that Keras unrolls (masked, bidirectional): the products
    take forward mode (reverse-over-reverse is never called) and give the weights
    that reverse-over-reverse products give. Before `_unrolled`, forward mode failed
    there (Keras's unrolled loop cannot carry the tangents as extra outputs), and
    the accumulators' watched outputs, read by the unrolled loop's own last ops,
    looked like a dropped tangent."""
    data = RNG.integers(0, 30, size=(32, 7))
    data[:8, -2:] = 0
    labels = (data[:, :1] > 15).astype("float32")
    found = []
    for reverse in (False, True):
        keras.utils.set_random_seed(3)
        L = keras.layers
        inputs = keras.Input((7,), dtype="int32")
        h = L.Embedding(30, 4, mask_zero=True)(inputs)
        h = L.Bidirectional(L.LSTM(3, return_sequences=True, unroll=True))(h)
        h = L.LSTM(2, unroll=True)(h)
        model = keras_tkfac.wrap(keras.Model(inputs, L.Dense(1, activation="sigmoid")(h)))
        model.compile(optimizer=keras_tkfac.TKFAC(seed=0), loss="binary_crossentropy")
        with mock.patch.object(products, "_reverse_mode",
                               wraps=products._reverse_mode) as reverse_mode:
            with mock.patch.object(products, "_forward_mode", side_effect=RuntimeError)\
                    if reverse else contextlib.nullcontext():
                model.fit(data, labels, batch_size=8, epochs=1, shuffle=False, verbose=0)
        assert reverse_mode.called == reverse
        found.append(model.get_weights())
    for forward, reverse in zip(*found):
        np.testing.assert_allclose(forward, reverse, rtol=1e-4, atol=1e-6)


def _check_recurrent_products(kind, nested, cells_carry):
    model = _recurrent_model(kind)
    x = (RNG.integers(0, 30, size=(4, 6)) if "bilstm" in kind or "unrolled" in kind
         else RNG.normal(size=(4, 6, 2)).astype("float32"))
    if kind == "bilstm":
        x[:, -2:] = 0  # masked time steps
    if kind == "unrolled_by_keras":
        x[:, 2] = x[1:, -1] = 0  # inside the sequences and at their ends
    outputs = loss_specs.resolve_losses(
        keras.losses.SparseCategoricalCrossentropy(from_logits=True), "true", model(x))
    cells = {id(v) for layer in model._flatten_layers()
             if isinstance(layer, keras.layers.RNN) for v in layer.cell.weights}
    primals = [v.value for v in model.trainable_variables
               if cells_carry or id(v) not in cells]
    directions = [[tf.constant(RNG.normal(size=p.shape).astype("float32"))
                   for p in primals] for _ in range(2)]
    state = [v.value for v in model.non_trainable_variables]
    seeds = [tf.identity(v) for v in state]

    def forward():
        for variable, seed in zip(state, seeds):  # the same dropout masks
            variable.assign(seed)
        return model(x, training=True)

    groups = []
    passes = products._passes

    def recorded(forward, outputs, primals, group, model=None, recording=None):
        groups.append([len(g) for g in group])
        return passes(forward, outputs, primals, group, model, recording)

    with mock.patch.object(products, "_passes", recorded):
        got = tf.function(lambda: products._forward_mode(
            forward, outputs, primals, directions, nested, model)[0])()
    # Nested: one pass carries both directions (no fallback to a pass each).
    assert groups == ([[2]] if nested else [[1, 1]])

    @tf.function
    def reverse():
        found = []
        for direction in directions:
            with tf.GradientTape() as outer:
                dummy = tf.zeros((4, 3))
                outer.watch(dummy)
                with tf.GradientTape() as inner:
                    inner.watch(primals)
                    y = forward()
                transposed = inner.gradient(
                    y, primals, output_gradients=dummy,
                    unconnected_gradients=tf.UnconnectedGradients.ZERO)
                dot = tf.add_n([tf.reduce_sum(t * d)
                                for t, d in zip(transposed, direction)])
            found.append(outer.gradient(dot, dummy))
        return found

    for jvps, want in zip(got, reverse()):
        assert np.abs(want).max() > 1e-2
        np.testing.assert_allclose(jvps[0], want, rtol=1e-5, atol=1e-6)
    assert not any("inner_loop" in vars(layer)  # the layers' own loops are back
                   for layer in model._flatten_layers())


def test_a_recurrent_model_fits_with_forward_mode_products(monkeypatch):
    """`wrap` + `TKFAC()` on a GRU/SimpleRNN classifier: the products take forward
    mode (before `rnn_tangents`, Keras's loop sent them to reverse-over-reverse)."""
    reverse = []
    monkeypatch.setattr(products, "_reverse_mode",
                        lambda *args: reverse.append(1) or (_ for _ in ()).throw(
                            AssertionError("reverse mode")))
    model = keras_tkfac.wrap(_recurrent_model("gru"))
    model.compile(optimizer=keras_tkfac.TKFAC(seed=0), loss=keras.losses.
                  SparseCategoricalCrossentropy(from_logits=True))
    # (Its own data and batch order: with the module's generator and `fit`'s
    # shuffling the run depended on the tests before it.)
    x = np.random.default_rng(0).normal(size=(32, 6, 2)).astype("float32")
    y = np.digitize(x[:, 0, 0], [-0.5, 0.5]).astype("int32")
    history = model.fit(x, y, batch_size=16, epochs=4, verbose=0, shuffle=False)
    assert not reverse
    assert np.isfinite(history.history["loss"]).all()
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_the_model_every_few_steps_reuses_its_coefficients(monkeypatch):
    """`model_update_freq=3`, with the model built on every one of the first two
    steps (`MODEL_WARMUP`): the quadratic model (its curvature products) is built
    on steps 0, 1, 3 and 6 only; the steps in between take `a U + b M` on their
    own directions with the last model's `(a, b)`. A model step is the one
    `model_update_freq=1` takes from the same state."""
    # (The first steps' ceiling would cap the model's step; `tests/test_progress.py`.)
    monkeypatch.setattr(progress, "INITIAL", None)
    built, used, passes = [], [], []
    updates, choose, gram = (step_size.quadratic_updates, quadratic._trusted_or_sibling,
                             products.Batch.gram)

    def spy_updates(*args):
        found = updates(*args)
        built.append([float(c) for c in found[0]])
        return found

    def spy_choose(trusted, coefficients, *args):
        # The model's coefficients, before an untrusted model's are replaced.
        used.append([float(c) for c in coefficients])
        return choose(trusted, coefficients, *args)

    def spy_gram(self, *args):
        passes.append(1)
        return gram(self, *args)

    monkeypatch.setattr(step_size, "quadratic_updates", spy_updates)
    monkeypatch.setattr(quadratic, "_trusted_or_sibling", spy_choose)
    monkeypatch.setattr(products.Batch, "gram", spy_gram)
    monkeypatch.setattr(quadratic, "MODEL_WARMUP", 2)
    options = dict(factor_update_freq=1, inverse_update_freq=2, seed=0)
    every_third = _custom_loop_weights(
        keras_tkfac.TKFAC(model_update_freq=3, **options), 7, forward=True)
    assert len(built) == len(passes) == 4
    assert used == [built[0], built[1], built[1]] + [built[2]] * 3 + [built[3]]
    assert built[1] != built[2] and built[1][0] > 0.0
    # The first two steps are model steps: as with a model every step. The third
    # reuses the second's coefficients, which differ from those a model of its
    # own batch chooses.
    found = _custom_loop_weights(
        keras_tkfac.TKFAC(model_update_freq=3, **options), 2, forward=True)
    reused = used[2]
    built.clear()
    expected = _custom_loop_weights(keras_tkfac.TKFAC(**options), 2, forward=True)
    for got, want in zip(found, expected):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)
    _custom_loop_weights(keras_tkfac.TKFAC(**options), 3, forward=True)
    assert reused == built[1] and built[4] != reused  # (built[2:]: the 3-step run)
    assert all(np.isfinite(w).all() for w in every_third)


def test_fit_builds_the_model_on_its_steps_only(monkeypatch):
    """Under `fit` (a traced step, the model inside a `tf.cond`), the products run on
    the model's steps only, the coefficients are kept in an optimizer variable,
    and the damping adapts every least common multiple of 5 and
    `model_update_freq` steps."""
    counter = tf.Variable(0)
    gram = products.Batch.gram

    def counted(self, *args):
        counter.assign_add(1)
        return gram(self, *args)

    monkeypatch.setattr(products.Batch, "gram", counted)
    monkeypatch.setattr(quadratic, "MODEL_WARMUP", 0)
    x, y = _data()
    model = keras_tkfac.wrap(_classifier(0))
    optimizer = keras_tkfac.TKFAC(model_update_freq=3, factor_update_freq=1,
                                  inverse_update_freq=2, seed=0)
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0)
    assert int(optimizer.iterations) == 8 and int(counter.numpy()) == 3
    a, b, trusted = optimizer.model_coefficients.numpy()
    assert a > 0.0 and trusted == 1.0
    assert [damping.interval(keras_tkfac.TKFAC(model_update_freq=f))
            for f in (1, 2, 3, 5, 10)] == [5, 10, 15, 5, 10]
    assert keras_tkfac.TKFAC(model_update_freq=3).get_config()["model_update_freq"] == 3
    with pytest.raises(ValueError, match="model_update_freq=0"):
        keras_tkfac.TKFAC(model_update_freq=0)
