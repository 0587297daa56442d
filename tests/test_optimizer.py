"""Full optimizer steps against a float64 numpy implementation of the algorithm."""

from absl import logging
import numpy as np
import pytest
import keras
import tensorflow as tf

import keras_tkfac
from keras_tkfac import fisher, loss_specs
from tests import helpers

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _value(schedule_or_number, step):
    if callable(schedule_or_number):
        return float(schedule_or_number(step))
    return schedule_or_number


def _per_example_rows(params, x, y):
    """Rows `(a, g)` of both layers of `tiny_mlp` (tanh hidden layer), in numpy."""
    w1, b1, w2, b2 = params
    s1 = x @ w1 + b1
    h = np.tanh(s1)
    s2 = h @ w2 + b2
    p = np.exp(s2 - s2.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    g2 = p - np.eye(s2.shape[1])[y]
    g1 = (g2 @ w2.T) * (1.0 - h**2)
    ones = np.ones((len(x), 1))
    return [(np.hstack([x, ones]), g1), (np.hstack([h, ones]), g2)]


def _transform_parameters(grads, transform):
    """Applies `transform` to the list of per-variable gradients [k1, b1, k2, b2]."""
    flat = transform([part for g in grads for part in (g[:-1], g[-1])])
    return [np.vstack([flat[2 * l], flat[2 * l + 1][None]]) for l in range(len(grads))]


def reference_training(params, x, y, steps, *, approximation, learning_rate, damping,
                       momentum, factor_decay, factor_update_freq,
                       inverse_update_freq, kl_clip, step_control="trust_region",
                       inverse_warmup=True,
                       weight_decay=None, grad_transform=None, decay_bias=True):
    """The algorithm of TKFAC_MATH.md, empirical Fisher, float64.

    `grad_transform` maps the list of raw per-variable gradients (Keras's gradient
    clipping acts there); `decay_bias=False` excludes biases from decay.
    """
    params = [p.astype(np.float64) for p in params]
    m = len(x)
    layers = 2
    ema = [None] * layers
    weight = 0.0
    inverses = [None] * layers
    velocity = [np.zeros((params[2 * l].shape[0] + 1, params[2 * l].shape[1]))
                for l in range(layers)]
    moments = [np.zeros_like(v) for v in velocity]
    nus = []
    for step in range(steps):
        lr = _value(learning_rate, step)
        rows = _per_example_rows(params, x, y)
        grads = [a.T @ g / m for a, g in rows]
        if grad_transform is not None:
            grads = _transform_parameters(grads, grad_transform)
        if step % factor_update_freq == 0:
            for l, (a, g) in enumerate(rows):
                if approximation == "tkfac":
                    stats = helpers.tkfac_numpy(a, g, m)
                else:
                    stats = (a.T @ a / m, g.T @ g / m)
                if ema[l] is None:
                    ema[l] = [np.zeros_like(s) for s in stats]
                ema[l] = [factor_decay * e + (1 - factor_decay) * s
                          for e, s in zip(ema[l], stats)]
            weight = factor_decay * weight + (1 - factor_decay)
        k = step // factor_update_freq
        warmup_step = (inverse_warmup and step < inverse_update_freq
                       and step % factor_update_freq == 0 and k > 0
                       and (k & (k - 1)) == 0)
        if step % inverse_update_freq == 0 or warmup_step:
            lam = _value(damping, step)
            for l in range(layers):
                corrected = [e / weight for e in ema[l]]
                if approximation == "tkfac":
                    left, right = helpers.tkfac_damped_numpy(*corrected, lam)
                else:
                    left, right = helpers.kfac_damped_numpy(*corrected, lam)
                inverses[l] = (np.linalg.inv(left), np.linalg.inv(right))
        updates = [inv[0] @ grad @ inv[1] for inv, grad in zip(inverses, grads)]
        nu = 1.0
        if step_control == "graft":
            # RMSProp's step length, TKFAC's direction; momentum is an average.
            for l, grad in enumerate(grads):
                moments[l] = 0.999 * moments[l] + 0.001 * grad**2
                rms = grad / (np.sqrt(moments[l] / (1 - 0.999 ** (step + 1))) + 1e-7)
                updates[l] *= np.linalg.norm(rms) / np.linalg.norm(updates[l])
        elif kl_clip is not None:
            inner = sum(np.sum(u * grad) for u, grad in zip(updates, grads))
            eta = lr if step_control == "kl_clip" else 1.0
            nu = min(1.0, np.sqrt(kl_clip / (eta**2 * inner)))
        nus.append(nu)
        for l in range(layers):
            if weight_decay:
                params[2 * l] -= lr * weight_decay * params[2 * l]
                if decay_bias:
                    params[2 * l + 1] -= lr * weight_decay * params[2 * l + 1]
            if step_control == "graft":
                velocity[l] = momentum * velocity[l] + (1 - momentum) * updates[l]
            else:
                velocity[l] = momentum * velocity[l] + nu * updates[l]
            params[2 * l] -= lr * velocity[l][:-1]
            params[2 * l + 1] -= lr * velocity[l][-1]
    return params, nus


CONFIGS = {
    "tkfac_one_step": dict(
        step_control="trust_region",
        approximation="tkfac", steps=1, learning_rate=0.5, damping=1e-2, momentum=0.0,
        factor_decay=0.95, factor_update_freq=1, inverse_update_freq=1, kl_clip=None),
    "kfac_one_step_clipped": dict(
        approximation="kfac", steps=1, learning_rate=0.5, damping=1e-2, momentum=0.0,
        factor_decay=0.95, factor_update_freq=1, inverse_update_freq=1, kl_clip=1e-4,
        step_control="kl_clip"),
    "tkfac_one_step_trust_region": dict(
        step_control="trust_region",
        approximation="tkfac", steps=1, learning_rate=0.5, damping=1e-2, momentum=0.0,
        factor_decay=0.95, factor_update_freq=1, inverse_update_freq=1, kl_clip=1e-3),
    "tkfac_six_steps": dict(
        approximation="tkfac", steps=6, learning_rate=0.2, damping=1e-1, momentum=0.9,
        factor_decay=0.5, factor_update_freq=2, inverse_update_freq=3, kl_clip=1e-2,
        step_control="kl_clip", weight_decay=0.05),
    "kfac_six_steps": dict(
        step_control="trust_region",
        approximation="kfac", steps=6, learning_rate=0.2, damping=1e-1, momentum=0.9,
        factor_decay=0.5, factor_update_freq=2, inverse_update_freq=3, kl_clip=1e-2,
        weight_decay=0.05),
    "tkfac_schedules": dict(
        step_control="trust_region",
        approximation="tkfac", steps=5, momentum=0.5, factor_decay=0.8,
        factor_update_freq=1, inverse_update_freq=2, kl_clip=None,
        learning_rate=keras.optimizers.schedules.ExponentialDecay(0.3, 1, 0.7),
        damping=keras.optimizers.schedules.ExponentialDecay(0.5, 1, 0.5)),
    "tkfac_schedule_trust_region": dict(
        step_control="trust_region",
        approximation="tkfac", steps=5, momentum=0.5, factor_decay=0.8, damping=0.1,
        factor_update_freq=1, inverse_update_freq=2, kl_clip=1e-3,
        learning_rate=keras.optimizers.schedules.ExponentialDecay(0.3, 1, 0.7)),
    "tkfac_graft": dict(
        approximation="tkfac", steps=6, learning_rate=0.05, damping=1e-2,
        momentum=0.9, factor_decay=0.5, factor_update_freq=2, inverse_update_freq=3,
        kl_clip=1e-3, step_control="graft", weight_decay=0.05),
    "kfac_graft_schedule": dict(
        approximation="kfac", steps=5, momentum=0.5, factor_decay=0.8, damping=0.1,
        factor_update_freq=1, inverse_update_freq=2, kl_clip=None,
        step_control="graft",
        learning_rate=keras.optimizers.schedules.ExponentialDecay(0.03, 1, 0.7)),
}


def _trained_and_reference(name, examples):
    """`CONFIGS[name]` trained by `fit` on one batch of `examples` every step, and the
    numpy reference: `(model, reference weights, reference nus, config)`."""
    config = dict(CONFIGS[name])
    approximation = config.pop("approximation")
    steps = config.pop("steps")
    x, y = helpers.classification_data(n=examples)
    base = helpers.tiny_mlp()
    initial = [v.numpy() for v in base.weights]
    model = keras_tkfac.wrap(base)
    cls = keras_tkfac.TKFAC if approximation == "tkfac" else keras_tkfac.KFAC
    model.compile(optimizer=cls(fisher="empirical", **config), loss=LOSS)
    model.fit(x, y, batch_size=len(x), epochs=steps, shuffle=False, verbose=0)
    expected, nus = reference_training(
        initial, x.astype(np.float64), y, steps, approximation=approximation, **config
    )
    return model, expected, nus, config


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_training_matches_numpy_reference(name):
    model, expected, nus, config = _trained_and_reference(name, 16)
    if config["kl_clip"] is not None and config.get("step_control") != "graft":
        assert min(nus) < 1.0, "the configuration must exercise KL clipping"
    for got, want in zip(model.weights, expected):
        # float32 against float64 over a few steps: relative error ~1e-5.
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-5)



@pytest.mark.parametrize("name", ["tkfac_six_steps", "kfac_six_steps", "tkfac_graft"])
def test_a_batch_of_one_example_matches_numpy_reference(name):
    # `batch_size=1`: rank-one statistics every step (TKFAC's trace weights and
    # KFAC's factors from one row), still the reference's arithmetic.
    model, expected, _, _ = _trained_and_reference(name, 1)
    for got, want in zip(model.weights, expected):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-5)

def test_first_step_uses_first_batch_curvature():
    x, y = helpers.classification_data(n=16)
    model = keras_tkfac.wrap(helpers.tiny_mlp())
    optimizer = keras_tkfac.TKFAC(fisher="empirical")
    model.compile(optimizer=optimizer, loss=LOSS)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    left_inverse = optimizer._slots[0].inverses[0].numpy()
    assert not np.allclose(left_inverse, np.eye(len(left_inverse)))
    assert int(optimizer.inverse_failures.numpy()) == 0


def test_statistics_only_on_due_steps():
    x, y = helpers.classification_data(n=16)
    model = keras_tkfac.wrap(helpers.tiny_mlp())
    optimizer = keras_tkfac.KFAC(factor_update_freq=3, inverse_update_freq=3)
    model.compile(optimizer=optimizer, loss=LOSS)
    history = []
    for _ in range(4):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0)
        history.append(optimizer._factor_weight.numpy()[0])
    # Updates at steps 0 and 3 only: weight 0.05, 0.05, 0.05, 1 - 0.95^2.
    np.testing.assert_allclose(history, [0.05, 0.05, 0.05, 1 - 0.95**2], rtol=1e-6)


def test_non_finite_inverse_keeps_previous_and_is_counted():
    x, y = helpers.classification_data(n=16)
    model = keras_tkfac.wrap(helpers.tiny_mlp())
    optimizer = keras_tkfac.TKFAC(fisher="empirical", inverse_update_freq=1)
    model.compile(optimizer=optimizer, loss=LOSS)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    before = [v.numpy() for v in optimizer._slots[0].inverses]
    # A negative-definite factor cannot be inverted by Cholesky.
    for factor in optimizer._slots[0].factors[1:]:
        factor.assign(-10.0 * np.eye(factor.shape[0]))
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, steps_per_epoch=1)
    assert int(optimizer.inverse_failures.numpy()) >= 1
    for variable in model.weights:
        assert np.all(np.isfinite(variable.numpy()))
    after = [v.numpy() for v in optimizer._slots[0].inverses]
    for old, new in zip(before, after):
        np.testing.assert_array_equal(new, old)


def test_unwrapped_model_is_rejected():
    model = helpers.tiny_mlp()
    model.compile(optimizer=keras_tkfac.TKFAC(), loss=LOSS)
    x, y = helpers.classification_data(n=8)
    with pytest.raises(ValueError, match="keras_tkfac.wrap"):
        model.fit(x, y, verbose=0)


@pytest.mark.parametrize("make", [tf.Variable, keras.Variable], ids=["tf", "keras"])
def test_variables_outside_any_layer_take_the_partners_step(make, caplog):
    """keras-io's style transfer optimises an image, not a model: with no layer's
    weights there is no curvature, so the step is the partner's (Adam at the
    learning rate), logged, rather than the unwrapped model's `ValueError`."""
    start = np.random.default_rng(0).normal(size=(2, 3)).astype("float32")
    target = tf.constant(np.random.default_rng(1).normal(size=(2, 3)), tf.float32)
    results = []
    for optimizer in (keras.optimizers.Adam(3e-3),
                      keras_tkfac.TKFAC(learning_rate=3e-3)):
        image = make(start)

        @tf.function
        def step():
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum((image - target) ** 4)
            optimizer.apply_gradients([(tape.gradient(loss, image), image)])

        with caplog.at_level("WARNING"):
            for _ in range(5):
                step()
        results.append(np.array(image.numpy()))
    assert np.abs(results[0] - start).max() > 1e-3
    np.testing.assert_allclose(results[1], results[0], rtol=1e-5, atol=1e-7)
    assert any("no Keras layer's weights" in r.getMessage() for r in caplog.records)


BAD_ARGUMENTS = [
    ("learning_rate", -1.0),
    ("learning_rate", "fast"),
    ("damping", 0.0),
    ("damping", "big"),
    ("momentum", 1.0),
    ("momentum", -0.1),
    ("factor_decay", 1.5),
    ("factor_update_freq", 0),
    ("factor_update_freq", 2.5),
    ("inverse_update_freq", True),
    ("kl_clip", 0.0),
    ("fisher", "exact"),
    ("inverse_dtype", "float16"),
    ("precondition_dtype", "float16"),
    ("products_dtype", "float16"),
    ("conv_location_stride", 0),
    ("seed", -3),
]


@pytest.mark.parametrize("cls", [keras_tkfac.TKFAC, keras_tkfac.KFAC])
@pytest.mark.parametrize("argument,value", BAD_ARGUMENTS)
def test_invalid_arguments_raise_value_error_naming_them(cls, argument, value):
    with pytest.raises(ValueError, match=f"{argument}={value!r}".replace("(", r"\(")):
        cls(**{argument: value})


def test_a_damping_schedule_must_stay_positive(caplog):
    # Read at a few steps at construction: negative (or 0 at the start) raises; one
    # that decays to 0 later is logged (the inverses would fail from there on).
    schedules = keras.optimizers.schedules
    for bad in (schedules.PolynomialDecay(0.1, 20, end_learning_rate=-0.1),
                schedules.PolynomialDecay(0.0, 20, end_learning_rate=0.1)):
        with pytest.raises(ValueError, match="`damping` must stay positive"):
            keras_tkfac.TKFAC(damping=bad)
    logging.set_verbosity(logging.WARNING)
    caplog.clear()
    keras_tkfac.TKFAC(damping=schedules.PolynomialDecay(0.1, 20, end_learning_rate=1e-3))
    assert not any("damping schedule" in r.getMessage() for r in caplog.records)
    keras_tkfac.KFAC(damping=schedules.PolynomialDecay(0.1, 20, end_learning_rate=0.0))
    assert [r for r in caplog.records
            if "damping schedule reaches 0 by step 100" in r.getMessage()]


@pytest.mark.parametrize("argument,value", [("conv_damping", "none"),
                                            ("trace_damping_floor", -1.0),
                                            ("sequence_statistics", "rows")])
def test_invalid_tkfac_arguments(argument, value):
    with pytest.raises(ValueError, match=f"{argument}={value!r}"):
        keras_tkfac.TKFAC(**{argument: value})


@pytest.mark.parametrize("step_control,scale", [("graft_quadratic", 1.0),
                                                ("quadratic", 1.0), ("graft", 1.0),
                                                ("trust_region", 100.0),
                                                ("kl_clip", 100.0)])
def test_trace_damping_scale_default_follows_the_step_control(step_control, scale):
    """`trace_damping_scale=None`: 1 where the quadratic model or the grafting sets
    each layer's step length, 100 where only the whole step's KL is bounded; kept
    through the config, and a given value wins."""
    optimizer = keras_tkfac.TKFAC(step_control=step_control)
    assert optimizer.trace_damping_scale == scale
    config = optimizer.get_config()
    assert config["trace_damping_scale"] == scale
    assert keras_tkfac.TKFAC.from_config(config).trace_damping_scale == scale
    assert keras_tkfac.TKFAC(step_control=step_control,
                             trace_damping_scale=3.0).trace_damping_scale == 3.0


@pytest.mark.parametrize("cls", [keras_tkfac.TKFAC, keras_tkfac.KFAC])
def test_get_config_round_trip(cls):
    optimizer = cls(
        learning_rate=keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.9),
        damping=keras.optimizers.schedules.ExponentialDecay(1e-2, 10, 0.5),
        momentum=0.5, factor_decay=0.9, factor_update_freq=2, inverse_update_freq=4,
        kl_clip=None, fisher="empirical", inverse_dtype="float64",
        precondition_dtype="bfloat16", conv_location_stride=2, seed=11,
        weight_decay=1e-4,
    )
    config = optimizer.get_config()
    restored = cls.from_config(config)
    assert restored.get_config() == config
    serialized = keras.optimizers.serialize(optimizer)
    again = keras.optimizers.deserialize(serialized)
    assert type(again) is cls and again.get_config() == config


def test_custom_training_loop_matches_fit():
    x, y = helpers.classification_data(n=16)
    config = dict(fisher="empirical", factor_update_freq=2, inverse_update_freq=3, seed=0)

    fitted = keras_tkfac.wrap(helpers.tiny_mlp())
    fitted.compile(optimizer=keras_tkfac.TKFAC(**config), loss=LOSS)
    fitted.fit(x, y, batch_size=16, epochs=4, shuffle=False, verbose=0)

    model = keras_tkfac.wrap(helpers.tiny_mlp())
    optimizer = keras_tkfac.TKFAC(**config)

    train_step = tf.function(helpers.custom_train_step(model, optimizer, LOSS))
    for _ in range(4):
        train_step(x, y)
    for a, b in zip(fitted.weights, model.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("step_control", ["graft_quadratic", "graft"])
def test_zero_learning_rate_leaves_weights_where_they_are(step_control):
    """As with Keras's optimizers, `learning_rate=0.0` is accepted and moves no
    weight (curvature-covered or on the partner); the statistics still accumulate
    and the optimizer's state stays finite (the damping's adaptation sees a
    predicted change of 0)."""
    x, y = helpers.classification_data(n=32)
    base = helpers.tiny_mlp()
    start = [w.numpy().copy() for w in base.trainable_weights]
    model = keras_tkfac.wrap(base)
    optimizer = keras_tkfac.TKFAC(learning_rate=0.0, step_control=step_control, seed=3)
    model.compile(optimizer=optimizer, loss=LOSS)
    model.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0)
    for before, after in zip(start, base.trainable_weights):
        np.testing.assert_array_equal(after.numpy(), before)
    assert all(np.isfinite(v.numpy()).all() for v in optimizer.variables
               if "float" in str(v.dtype))
    assert any(np.abs(f.numpy()).max() > 0 for s in optimizer._slots for f in s.factors)


def test_record_requires_a_wrapped_model():
    with pytest.raises(ValueError, match="keras_tkfac.wrap"):
        keras_tkfac.record(helpers.tiny_mlp())


def _weights_after(steps=5, **kwargs):
    x, y = helpers.classification_data(n=32)
    base = helpers.tiny_mlp()
    model = keras_tkfac.wrap(base)
    model.compile(optimizer=keras_tkfac.TKFAC(seed=3, **kwargs), loss=LOSS)
    model.fit(x, y, batch_size=32, epochs=steps, shuffle=False, verbose=0)
    return np.concatenate([w.numpy().ravel() for w in base.weights]), model.optimizer


@pytest.mark.parametrize("step_control, kl_clip, lr", [
    ("trust_region", 0.1, 0.1), ("trust_region", 1e-3, 0.1), ("graft", 0.1, 3e-3)])
def test_learning_rate_changes_the_trajectory(step_control, kl_clip, lr):
    """Under the trust-region control the learning rate scales every step, also where
    the KL bound is active (`kl_clip=1e-3` here), and under grafting (the default);
    under Ba et al.'s clip a binding bound makes learning rates above it give
    identical weights."""
    start = np.concatenate([w.numpy().ravel() for w in helpers.tiny_mlp().weights])
    kwargs = dict(kl_clip=kl_clip, step_control=step_control)
    base, optimizer = _weights_after(learning_rate=lr, **kwargs)
    if kl_clip < 0.1:
        assert optimizer.curvature_report()["kl_clip_scale"] < 1.0, "must bind"
    half, _ = _weights_after(learning_rate=lr / 2, **kwargs)
    assert np.linalg.norm(half - start) < 0.75 * np.linalg.norm(base - start)
    warmup = keras.optimizers.schedules.PolynomialDecay(lr / 10, 5, lr, power=1.0)
    scheduled, _ = _weights_after(learning_rate=warmup, **kwargs)
    assert not np.allclose(scheduled, base)
    clipped = [_weights_after(learning_rate=lr, kl_clip=1e-6, step_control="kl_clip")[0]
               for lr in (0.1, 1.0)]
    np.testing.assert_allclose(clipped[0], clipped[1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("sequence_statistics", ["exact", "expand"])
def test_a_layer_on_sequences_keeps_its_sequences_statistics(sequence_statistics):
    # TKFAC's default (`"exact"`): the trace and partial traces of the block of
    # each example's gradient `W_n` of a Dense on sequences; `"expand"`: every
    # position a row (the specification's expansion). Against per-example Keras
    # gradients at the initial weights (empirical Fisher, one statistics step).
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 3))
    hidden = keras.layers.Dense(5, activation="tanh")
    outputs = keras.layers.Dense(3)(keras.layers.Flatten()(hidden(inputs)))
    model = keras_tkfac.wrap(keras.Model(inputs, outputs))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 4, 3)).astype("float32")
    y = rng.integers(0, 3, size=(6,))
    block = next(b for b in model.blocks if b.layer is hidden)
    examples = []
    for n in range(len(x)):
        with tf.GradientTape() as tape:
            loss_n = LOSS(y[n:n + 1], model(x[n:n + 1], training=True))
        examples.append(block.grad_matrix(*tape.gradient(
            loss_n, block.variables)).numpy().astype(np.float64))
    with tf.GradientTape(persistent=True) as tape:
        with keras_tkfac.record(model) as recording:
            y_pred = model(x, training=True)
    source, cotangent, _ = fisher.output_cotangent(
        loss_specs.resolve_loss(LOSS, "empirical"), "empirical", y, y_pred, tf.constant([0, 0]))
    grads = tape.gradient(source, recording.outputs(), output_gradients=cotangent)
    a, g = (t.numpy().astype(np.float64)
            for t in recording.rows(grads)[model.blocks.index(block)])
    optimizer = keras_tkfac.TKFAC(fisher="empirical",
                                  sequence_statistics=sequence_statistics)
    model.compile(optimizer=optimizer, loss=LOSS)
    model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0)
    index = [s.block.layer for s in optimizer._slots].index(hidden)
    weight = optimizer._factor_weight.numpy()[index]
    delta, n_phi, n_psi = (f.numpy() / weight for f in optimizer._slots[index].factors)
    m = len(x)
    if sequence_statistics == "exact":
        expected = (sum(np.sum(w * w) for w in examples) / m,
                    sum(w @ w.T for w in examples) / m, sum(w.T @ w for w in examples) / m)
    else:
        expected = helpers.tkfac_numpy(a, g, m)
    for got, want in zip((delta, n_phi, n_psi), expected):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
    if sequence_statistics == "expand":
        # The expansion drops the positions' cross terms.
        exact = sum(np.sum(w * w) for w in examples) / m
        assert not np.isclose(delta, exact, rtol=1e-2)
