"""Multi-output models: the statistics are those of the Fisher (GGN) of Keras's total
loss `sum_k w_k L_k`, checked against per-example Jacobians and output Hessians in
numpy; loss matching; a multi-input, multi-output program from the keras-io guide."""

from absl import logging
import numpy as np
import pytest
import tensorflow as tf
import keras

import keras_tkfac
from keras_tkfac import fisher, loss_specs
from tests import helpers

CLASSES, TARGETS = 4, 3  # 2 / TARGETS != 1, so Keras's mean over units matters
LOSSES = {"cls": "sparse_categorical_crossentropy", "reg": "mse"}
WEIGHTS = {"cls": 1.0, "reg": 0.5}
SAMPLES = 20000


def _two_head(structure, seed=0):
    """A tanh trunk shared by a softmax classification head and an MSE head."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(5, activation="tanh", name="trunk")(inputs)
    heads = {
        "cls": keras.layers.Dense(CLASSES, activation="softmax", name="cls")(hidden),
        "reg": keras.layers.Dense(TARGETS, name="reg")(hidden),
    }
    return keras.Model(inputs, _as(structure, heads))


def _as(structure, value):
    """`value` (a dict by output name) as a dict or as a list in output order."""
    return dict(value) if structure == "dict" else [value["cls"], value["reg"]]


def _data(n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype("float32")
    y = {
        "cls": rng.integers(0, CLASSES, size=(n,)).astype("int32"),
        "reg": rng.normal(size=(n, TARGETS)).astype("float32"),
    }
    return x, y


def _forward(model, x):
    """Per example, in float64: each layer's input rows `a` (with the bias
    coordinate), the Jacobians `J[layer][head]` of each head's pre-activation output
    with respect to the layer's, the class probabilities and the regression output."""
    model = getattr(model, "model", model)  # the wrapped model
    params = {name: [w.numpy().astype(np.float64)
                     for w in model.get_layer(name).weights]
              for name in ("trunk", "cls", "reg")}
    (w1, b1), (wc, bc), (wr, br) = params["trunk"], params["cls"], params["reg"]
    x = x.astype(np.float64)
    n = len(x)
    h = np.tanh(x @ w1 + b1)
    logits = h @ wc + bc
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    r = h @ wr + br
    ones = np.ones((n, 1))
    rows = {"trunk": np.hstack([x, ones]), "cls": np.hstack([h, ones]),
            "reg": np.hstack([h, ones])}
    dh = 1.0 - h**2
    eye = lambda d: np.broadcast_to(np.eye(d), (n, d, d))
    jacobians = {
        "trunk": {"cls": np.einsum("jo,nj->noj", wc, dh),
                  "reg": np.einsum("jo,nj->noj", wr, dh)},
        "cls": {"cls": eye(CLASSES), "reg": np.zeros((n, TARGETS, CLASSES))},
        "reg": {"cls": np.zeros((n, CLASSES, TARGETS)), "reg": eye(TARGETS)},
    }
    return rows, jacobians, logits, p, r


def _output_hessians(p, weights):
    """Hessians of Keras's total loss w.r.t. each example's head outputs: the
    cross-entropy's `diag(p) - p p^T` and MSE's `2 / D` per unit, each divided by the
    batch (Keras's mean) and times the output's loss weight."""
    n = len(p)
    return {
        "cls": weights["cls"] / n * np.stack([np.diag(q) - np.outer(q, q) for q in p]),
        "reg": weights["reg"] / n * np.broadcast_to(
            2.0 / TARGETS * np.eye(TARGETS), (n, TARGETS, TARGETS)),
    }


def _exact_ggn(model, x, weights):
    """Per layer, the exact GGN block `sum_n (a a^T) ⊗ sum_k J_k^T H_k J_k` of the
    total loss, in the `vec(g a^T)` ordering, and the per-example `Gamma_n` times the
    batch size (the per-example loss scale of the statistics)."""
    rows, jacobians, _, p, _ = _forward(model, x)
    hessians = _output_hessians(p, weights)
    blocks, gammas = {}, {}
    for layer, a in rows.items():
        gamma = sum(np.einsum("nol,nop,npm->nlm", jacobians[layer][k], hessians[k],
                              jacobians[layer][k]) for k in hessians)
        blocks[layer] = sum(np.kron(np.outer(a_n, a_n), g_n)
                            for a_n, g_n in zip(a, gamma))
        gammas[layer] = gamma * len(x)
    return rows, blocks, gammas


def _statistics(optimizer):
    """Per layer name, the bias-corrected moving averages of the statistics."""
    return {
        slot.block.name: [
            f.numpy().astype(np.float64) / optimizer._factor_weight[i].numpy()
            for f in slot.factors]
        for i, slot in enumerate(optimizer._slots)
    }


def _relative_error(got, want):
    return np.linalg.norm(np.asarray(got) - want) / np.linalg.norm(want)


def _expected_statistics(cls, a, gamma, block, num_examples):
    """The statistics whose expectation the true Fisher estimates: TKFAC's are the
    trace and partial traces of the exact block, K-FAC's `E[a a^T]`, `E[Gamma]`."""
    if cls is keras_tkfac.TKFAC:
        n_phi, n_psi = helpers.partial_traces(block, a.shape[1], gamma.shape[1])
        return [np.trace(block), n_phi, n_psi]
    return [a.T @ a / num_examples, gamma.sum(0) / num_examples]


def test_output_hessians_are_those_of_the_keras_total_loss():
    """The oracle's normalisation is Keras's: autodiff of the compiled total loss."""
    x, y = _data(3)
    model = _two_head("dict")
    model.compile(loss=LOSSES, loss_weights=WEIGHTS)
    _, _, logits, p, r = _forward(model, x)
    z, r = tf.constant(logits, tf.float32), tf.constant(r, tf.float32)
    with tf.GradientTape(persistent=True) as outer:
        outer.watch([z, r])
        with tf.GradientTape() as inner:
            inner.watch([z, r])
            y_pred = {"cls": keras.activations.softmax(z), "reg": r}
            loss = model.compute_loss(x=x, y=y, y_pred=y_pred)
        grads = inner.gradient(loss, [z, r])
    expected = _output_hessians(p, WEIGHTS)
    for k, grad in enumerate(grads):
        for j, other in enumerate([z, r]):
            hessian = outer.jacobian(
                grad, other, unconnected_gradients=tf.UnconnectedGradients.ZERO).numpy()
            if j != k:
                np.testing.assert_allclose(hessian, 0.0, atol=1e-7)
                continue
            name = ("cls", "reg")[k]
            full = np.zeros(hessian.shape)
            for n in range(len(x)):
                full[n, :, n, :] = expected[name][n]
            np.testing.assert_allclose(hessian, full, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("cls", helpers.TKFAC_THEN_KFAC)
@pytest.mark.parametrize("structure", ["list", "dict"])
def test_true_fisher_statistics_are_the_ggn_of_the_weighted_total_loss(cls, structure):
    """`fit` on SAMPLES copies of each of 3 examples: the sampled statistics of the
    shared trunk and of both heads converge to the GGN of `L_cls + 0.5 L_reg`."""
    x, y = _data(3)
    model = keras_tkfac.wrap(_two_head(structure))
    optimizer = cls(factor_update_freq=1, inverse_update_freq=1, seed=0)
    model.compile(optimizer=optimizer, loss=_as(structure, LOSSES),
                  loss_weights=_as(structure, WEIGHTS))
    rows, blocks, gammas = _exact_ggn(model, x, WEIGHTS)
    tiled = {k: np.repeat(v, SAMPLES, axis=0) for k, v in y.items()}
    model.fit(np.repeat(x, SAMPLES, axis=0), _as(structure, tiled),
              batch_size=3 * SAMPLES, epochs=1, verbose=0)
    statistics = _statistics(optimizer)
    for layer in ("trunk", "cls", "reg"):
        want = _expected_statistics(cls, rows[layer], gammas[layer], blocks[layer], 3)
        for got, expected in zip(statistics[layer], want):
            # Monte-Carlo error of 60000 draws: ~1%; a wrong weight or count is >25%.
            assert _relative_error(got, expected) < 0.05, layer


def test_outputs_sample_independently():
    """The cotangents' second moment is block-diagonal over outputs, each block the
    output's per-example loss Hessian times `w_k M / M_k`: a softmax head, two MSE
    heads of the same shape (which a shared seed would make identical), and an MSE head
    with a time axis of 2 (twice the loss terms: `M / M_k = 1/2`)."""
    rng = np.random.default_rng(4)
    logits = np.repeat(rng.normal(size=(2, 3)), SAMPLES, axis=0).astype("float32")
    means = [np.repeat(rng.normal(size=(2,) + shape), SAMPLES, axis=0).astype("float32")
             for shape in [(2,), (2,), (2, 2)]]
    y_pred = {"a": tf.constant(logits), "b": tf.constant(means[0]),
              "c": tf.constant(means[1]), "d": tf.constant(means[2])}
    losses = {"a": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
              "b": "mse", "c": "mse", "d": "mse"}
    weights = {"a": 0.7, "b": 1.0, "c": 0.5, "d": 0.3}
    outputs = loss_specs.resolve_losses(losses, "true", y_pred, loss_weights=weights)
    _, cotangents, count = fisher.output_cotangents(
        outputs, "true", None, y_pred, tf.constant([5, 1]))
    assert int(count) == 2 * SAMPLES
    c = np.concatenate([np.reshape(t.numpy(), (2 * SAMPLES, -1)) for t in cotangents],
                       axis=1).reshape(2, SAMPLES, 11)
    moment = np.einsum("nsi,nsj->nij", c, c) / SAMPLES
    p = np.exp(logits[::SAMPLES]) / np.exp(logits[::SAMPLES]).sum(1, keepdims=True)
    for n in range(2):
        expected = np.zeros((11, 11))
        expected[:3, :3] = weights["a"] * (np.diag(p[n]) - np.outer(p[n], p[n]))
        expected[3:5, 3:5] = weights["b"] * np.eye(2)  # MSE over D = 2: 2 / D
        expected[5:7, 5:7] = weights["c"] * np.eye(2)
        expected[7:, 7:] = weights["d"] / 2 * np.eye(4)  # two steps: M_d = 2 M
        # Standard error of SAMPLES products of unit scale: 0.007.
        np.testing.assert_allclose(moment[n], expected, atol=0.03)


def _empirical_rows(model, x, y, weights, sample_weight):
    """Rows `g` of the empirical Fisher: per output the real-label gradient of the
    per-example loss, times `sqrt(w_k)` and `sqrt(sample weight)`, through each head."""
    rows, jacobians, _, p, r = _forward(model, x)
    grads = {"cls": p - np.eye(CLASSES)[y["cls"]],
             "reg": 2.0 / TARGETS * (r - y["reg"])}
    g = {}
    for layer in rows:
        g[layer] = 0.0
        for k in ("cls", "reg"):
            scale = np.sqrt(weights[k]) * np.ones(len(x))
            if sample_weight is not None:
                scale = scale * np.sqrt(sample_weight[k])
            g[layer] = g[layer] + scale[:, None] * np.einsum(
                "nol,no->nl", jacobians[layer][k], grads[k])
    return rows, g


@pytest.mark.parametrize("cls", helpers.TKFAC_THEN_KFAC)
@pytest.mark.parametrize("route,structure,weighting", [
    ("fit", "list", None),
    ("fit", "dict", "shared"),
    ("loop", "dict", "per_output"),
    ("loop", "list", "shared"),
])
def test_empirical_fisher_uses_each_outputs_labels(cls, route, structure, weighting):
    """Exact: the empirical statistics of every layer from each output's real labels,
    loss weights and sample weights (one for all outputs, or one per output)."""
    x, y = _data(6)
    rng = np.random.default_rng(1)
    sample_weight, weight_arg = None, None
    if weighting == "shared":
        shared = rng.uniform(0.5, 2.0, size=6).astype("float32")
        sample_weight, weight_arg = {"cls": shared, "reg": shared}, shared
    elif weighting == "per_output":
        sample_weight = {k: rng.uniform(0.5, 2.0, size=6).astype("float32")
                         for k in ("cls", "reg")}
        weight_arg = _as(structure, sample_weight)
    model = keras_tkfac.wrap(_two_head(structure))
    optimizer = cls(fisher="empirical", factor_update_freq=1, seed=0)
    rows, g = _empirical_rows(model, x, y, WEIGHTS, sample_weight)
    if route == "fit":
        model.compile(optimizer=optimizer, loss=_as(structure, LOSSES),
                      loss_weights=_as(structure, WEIGHTS))
        model.fit(x, _as(structure, y), sample_weight=weight_arg, batch_size=6,
                  epochs=1, shuffle=False, verbose=0)
    else:
        with tf.GradientTape(persistent=True) as tape:
            with keras_tkfac.record(model) as recording:
                y_pred = model(x, training=True)
        # Labels as a dict for a list output too: matched by output name.
        optimizer.update_curvature(
            recording, tape, y_pred, y_true=y, loss=_as(structure, LOSSES),
            loss_weights=WEIGHTS, sample_weight=weight_arg)
    statistics = _statistics(optimizer)
    for layer in ("trunk", "cls", "reg"):
        a = rows[layer]
        if cls is keras_tkfac.TKFAC:
            want = helpers.tkfac_numpy(a, g[layer], 6)
        else:
            want = (a.T @ a / 6, g[layer].T @ g[layer] / 6)
        for got, expected in zip(statistics[layer], want):
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("structure,loss", [
    ("dict", {"reg": "mse"}),
    ("list", [None, "mse"]),
])
def test_output_without_loss_adds_no_curvature(structure, loss):
    """A loss on the regression head only gives the statistics of the loss weights
    `{cls: 0, reg: 1}` on both heads (exact, with the real labels), and trains."""
    x, y = _data(32)
    reg_labels = {"reg": y["reg"]} if structure == "dict" else [y["reg"]]

    def model_and_optimizer(loss, loss_weights, fisher_type):
        model = keras_tkfac.wrap(_two_head(structure))
        optimizer = keras_tkfac.TKFAC(fisher=fisher_type, factor_update_freq=1, seed=0)
        model.compile(optimizer=optimizer, loss=loss, loss_weights=loss_weights)
        return model, optimizer

    model, one = model_and_optimizer(loss, None, "empirical")
    model.fit(x, reg_labels, batch_size=32, epochs=1, verbose=0)
    model, both = model_and_optimizer(
        _as(structure, LOSSES), _as(structure, {"cls": 0.0, "reg": 1.0}), "empirical")
    model.fit(x, _as(structure, y), batch_size=32, epochs=1, verbose=0)
    one, both = _statistics(one), _statistics(both)
    for layer in ("trunk", "cls", "reg"):
        for a, b in zip(one[layer], both[layer]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
    assert np.all(one["cls"][0] == 0.0) and np.all(one["trunk"][0] > 0.0)
    model, _ = model_and_optimizer(loss, None, "true")
    history = model.fit(x, reg_labels, batch_size=16, epochs=3, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_true_fisher_names_the_output_whose_loss_it_cannot_sample(caplog):
    """The output without a sampling rule takes the empirical Fisher (logged,
    naming it); the other keeps sampling; training goes on either way."""
    x, y = _data(16)
    losses = {"cls": "sparse_categorical_crossentropy",
              "reg": keras.losses.MeanAbsoluteError()}
    logging.get_absl_logger().propagate = True
    loss_specs._WARNED.clear()  # logged once per loss and process
    for fisher_type in ("true", "empirical"):
        model = keras_tkfac.wrap(_two_head("dict"))
        model.compile(optimizer=keras_tkfac.TKFAC(fisher=fisher_type, seed=0),
                      loss=losses)
        with caplog.at_level("WARNING"):
            history = model.fit(x, y, epochs=2, verbose=0)
        assert np.all(np.isfinite(history.history["loss"]))
    warned = [r.getMessage() for r in caplog.records
              if "takes the empirical Fisher" in r.getMessage()]
    assert len(warned) == 1 and "output 'reg'" in warned[0]


def _fit_two_head(strategy, jit_compile, fisher_type):
    x, y = _data(64)
    with strategy.scope():
        model = keras_tkfac.wrap(_two_head("dict"))
        model.compile(
            optimizer=keras_tkfac.TKFAC(fisher=fisher_type, factor_update_freq=2,
                                        inverse_update_freq=3, seed=0),
            loss=LOSSES, loss_weights=WEIGHTS, jit_compile=jit_compile)
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    return model


def test_jit_compile_samples_every_output_as_without():
    """The per-output seeds give the same labels under XLA: the same trajectory."""
    plain = _fit_two_head(tf.distribute.get_strategy(), False, "true")
    compiled = _fit_two_head(tf.distribute.get_strategy(), True, "true")
    # XLA fuses and reorders float32 arithmetic; 8 steps stay within 1e-4.
    for a, b in zip(plain.weights, compiled.weights):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-4, atol=1e-5)


def test_mirrored_strategy_matches_one_device(mirrored):
    """The combined count `M` is all-reduced like a single output's."""
    reference = _fit_two_head(tf.distribute.get_strategy(), False, "empirical")
    model = _fit_two_head(mirrored, False, "empirical")
    for a, b in zip(reference.weights, model.weights):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-4, atol=1e-5)


Y_PRED_LIST = [tf.zeros((2, 3)), tf.zeros((2, 2))]
Y_PRED_DICT = {"reg": tf.zeros((2, 2)), "cls": tf.zeros((2, 3))}  # flattened: cls, reg


@pytest.mark.parametrize("loss,y_pred,loss_weights,expected", [
    # One loss for every output, as Keras applies it.
    ("mse", Y_PRED_LIST, None, [(0, "cls", 1.0), (1, "reg", 1.0)]),
    ("mse", Y_PRED_LIST, 0.5, [(0, "cls", 0.5), (1, "reg", 0.5)]),
    (["mse", None], Y_PRED_LIST, [2.0, 3.0], [(0, "cls", 2.0)]),
    ({"reg": "mse", "cls": "mse"}, Y_PRED_LIST, {"reg": 0.5},
     [(0, "cls", 1.0), (1, "reg", 0.5)]),
    ({"reg": "mse"}, Y_PRED_DICT, None, [(1, "reg", 1.0)]),
    # A list matches the flattened outputs (a dict's sorted keys), as in Keras.
    (["mse", "binary_crossentropy"], Y_PRED_DICT, [1.0, 0.2],
     [(0, "cls", 1.0), (1, "reg", 0.2)]),
    ({"out": "mse"}, tf.zeros((2, 2)), {"out": 0.3}, [(0, "output", 0.3)]),
])
def test_losses_are_matched_to_outputs_as_keras_does(loss, y_pred, loss_weights,
                                                     expected):
    outputs = loss_specs.resolve_losses(loss, "true", y_pred, loss_weights=loss_weights,
                                    output_names=["cls", "reg"])
    assert [(o.index, o.name, o.weight) for o in outputs] == expected


@pytest.mark.parametrize("loss,loss_weights,message", [
    ({"nope": "mse"}, None, r"output\(s\) \['nope'\]"),
    (["mse", "mse", "mse"], None, "3 entries for 2 model outputs"),
    ("mse", [1.0], "1 entries for 2 model outputs"),
    ([None, None], None, "at least one output"),
    (None, None, "loss=None"),
])
def test_mismatched_losses_raise(loss, loss_weights, message):
    with pytest.raises(ValueError, match=message):
        loss_specs.resolve_losses(loss, "true", Y_PRED_LIST, loss_weights=loss_weights,
                              output_names=["cls", "reg"])


NUM_TAGS, NUM_WORDS, NUM_DEPARTMENTS = 12, 1000, 4


def _ticket_model():
    """The keras-io functional API guide's ticket classifier (smaller vocabulary):
    title, body and tags inputs; priority (binary) and department outputs."""
    keras.utils.set_random_seed(0)
    title_input = keras.Input(shape=(None,), name="title")
    body_input = keras.Input(shape=(None,), name="body")
    tags_input = keras.Input(shape=(NUM_TAGS,), name="tags")
    title_features = keras.layers.Embedding(NUM_WORDS, 64)(title_input)
    body_features = keras.layers.Embedding(NUM_WORDS, 64)(body_input)
    title_features = keras.layers.LSTM(128)(title_features)
    body_features = keras.layers.LSTM(32)(body_features)
    x = keras.layers.concatenate([title_features, body_features, tags_input])
    priority_pred = keras.layers.Dense(1, name="priority")(x)
    department_pred = keras.layers.Dense(NUM_DEPARTMENTS, name="department")(x)
    return keras.Model(
        inputs=[title_input, body_input, tags_input],
        outputs={"priority": priority_pred, "department": department_pred},
    )


def _ticket_data(n=256):
    rng = np.random.default_rng(0)
    inputs = {
        "title": rng.integers(NUM_WORDS, size=(n, 10)),
        "body": rng.integers(NUM_WORDS, size=(n, 20)),
        "tags": rng.integers(2, size=(n, NUM_TAGS)).astype("float32"),
    }
    targets = {
        "priority": rng.random(size=(n, 1)).astype("float32"),
        "department": rng.integers(2, size=(n, NUM_DEPARTMENTS)).astype("float32"),
    }
    return inputs, targets


# KFAC's run (~35 s) is in `make test-all`; the engine's multi-output path is the same.
@pytest.mark.parametrize("cls", [keras_tkfac.TKFAC,
                                 pytest.param(keras_tkfac.KFAC, marks=pytest.mark.slow)])
def test_keras_io_multi_input_multi_output_model(cls, tmp_path):
    inputs, targets = _ticket_data()
    model = keras_tkfac.wrap(_ticket_model())
    model.compile(
        optimizer=cls(seed=0, step_control="trust_region"),
        loss={
            "priority": keras.losses.BinaryCrossentropy(from_logits=True),
            "department": keras.losses.CategoricalCrossentropy(from_logits=True),
        },
        loss_weights={"priority": 1.0, "department": 0.2},
    )
    history = model.fit(inputs, targets, epochs=3, batch_size=32, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    report = model.optimizer.curvature_report()
    for name in ("priority", "department"):
        assert name in report and report[name]["trace"] > 0.0
    path = str(tmp_path / "ticket.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, keras_tkfac.CurvatureModel)
    for a, b in zip(model.weights + model.optimizer.variables,
                    loaded.weights + loaded.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    batch = {k: v[:8] for k, v in inputs.items()}
    for k, v in model.predict(batch, verbose=0).items():
        np.testing.assert_array_equal(v, loaded.predict(batch, verbose=0)[k])
    for m in (model, loaded):
        m.fit(inputs, targets, epochs=1, batch_size=32, steps_per_epoch=2,
              shuffle=False, verbose=0)
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-6)
