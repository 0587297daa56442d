"""`TKFAC(trace_damping_cap=...)`: a dense layer's damping is at most a multiple of
its Fisher trace, in its preconditioner and in the quadratic model."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_tkfac
from keras_tkfac import ops
from keras_tkfac import progress
from keras_tkfac import step_size

from tests import helpers
from tests import test_quadratic as quadratic_tests


def test_the_cap_is_the_least_of_the_damping_and_the_floored_trace():
    # (damping, delta, cap, floor) -> expected, by hand
    cases = [(0.1, 100.0, 3e-3, 1e-3, 0.1),          # a large trace: the damping
             (0.1, 2.0, 3e-3, 1e-3, 6e-3),            # a small one: the cap
             (0.1, 1e-6, 3e-3, 1e-3, 3e-6),           # below the floor: cap * floor
             (1e-4, 2.0, 3e-3, 1e-3, 1e-4)]           # a damping below the cap
    for damping, delta, cap, floor, expected in cases:
        value = ops.trace_capped_damping(damping, tf.constant(delta), cap, floor)
        np.testing.assert_allclose(value.numpy(), expected, rtol=1e-6)
    # One damping per group.
    value = ops.trace_capped_damping(0.1, tf.constant([100.0, 2.0, 1e-6]), 3e-3, 1e-3)
    np.testing.assert_allclose(value.numpy(), [0.1, 6e-3, 3e-6], rtol=1e-6)


def _mixed_model():
    keras.utils.set_random_seed(0)
    ids = keras.Input((5,), dtype="int32")
    image = keras.Input((6, 6, 2))
    h = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(20, 4)(ids))
    c = keras.layers.Flatten()(keras.layers.Conv2D(3, 3)(image))
    out = keras.layers.Dense(3)(keras.layers.Concatenate()([h, c]))
    return keras_tkfac.wrap(keras.Model([ids, image], out))


def _factors(optimizer, block, delta):
    """Factors of `block` with the given trace (random positive semidefinite)."""
    rng = np.random.default_rng(block.d_in)
    shapes = [s for _, s in optimizer._factor_specs(block)]
    factors = [tf.constant(delta, tf.float32)]
    for shape in shapes[1:]:
        if len(shape) == 1:
            factors.append(tf.constant(rng.uniform(size=shape) * delta / shape[0],
                                       tf.float32))
        else:
            m = rng.normal(size=(shape[0], shape[0]))
            m = m @ m.T
            factors.append(tf.constant(m * delta / np.trace(m), tf.float32))
    return factors


@pytest.mark.parametrize("delta", [1e-4, 0.5, 1e3])
def test_only_dense_layers_take_the_cap(delta):
    """The Dense block's damping is `min(lambda, cap * max(delta, floor))` times the
    Levenberg-Marquardt factor; the convolution's is its trace-relative damping and
    the embedding's the given one, as without the cap."""
    model = _mixed_model()
    model.build([(None, 5), (None, 6, 6, 2)])
    capped = keras_tkfac.TKFAC(seed=0)
    free = keras_tkfac.TKFAC(trace_damping_cap=None, seed=0)
    assert capped.trace_damping_cap == 3e-3 and free.trace_damping_cap is None
    for optimizer in (capped, free):
        optimizer.build(model.trainable_variables)
        optimizer.damping_scale.assign(2.0)
    kinds = set()
    for block in model.blocks:
        factors = _factors(capped, block, delta)
        lam = float(np.mean(capped._layer_damping(block, factors, 0.2)))
        given = float(np.mean(free._layer_damping(block, factors, 0.2)))
        if block.is_conv:
            kind, expected = "conv", given
            np.testing.assert_allclose(given, 2.0 * max(delta, 1e-3) / (
                block.d_in * block.d_out), rtol=1e-5)
        elif block.input_kind == "diagonal":
            kind, expected = "embedding", 0.2
        else:
            kind, expected = "dense", min(0.2, 2.0 * 3e-3 * max(delta, 1e-3))
            assert given == pytest.approx(0.2)
        kinds.add(kind)
        np.testing.assert_allclose(lam, expected, rtol=1e-5)
    assert kinds == {"conv", "embedding", "dense"}


def test_capped_preconditioning_equals_the_kronecker_solve():
    """The damped factors of a Dense block whose trace is small solve the explicit
    system `(delta (Phi ⊗ Psi) + lambda_l I) vec(U) = vec(G)` with
    `lambda_l = cap * delta`, from the layer's rows (numpy)."""
    rng = np.random.default_rng(5)
    a = rng.normal(size=(8, 6))
    g = 0.05 * rng.normal(size=(8, 3))
    model = keras_tkfac.wrap(keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)]))
    model.build((None, 5))
    optimizer = keras_tkfac.TKFAC(seed=0)
    (block,) = model.blocks
    factors = ops.tkfac_statistics(tf.constant(a, tf.float32), tf.constant(g, tf.float32), 8)
    ref_delta, ref_phi, ref_psi = helpers.tkfac_numpy(a, g, 8)
    lam = 3e-3 * max(ref_delta, 1e-3)
    assert lam < 0.1  # the cap binds
    np.testing.assert_allclose(optimizer._layer_damping(block, factors, 0.1), lam,
                               rtol=1e-5)
    phi_hat, psi_hat = optimizer._damped_factors(block, factors, 0.1)
    grad = rng.normal(size=(6, 3))
    update = ops.precondition(ops.symmetric_inverse(phi_hat)[0], tf.constant(grad, tf.float32),
                              ops.symmetric_inverse(psi_hat)[0]).numpy()
    left, right = helpers.tkfac_damped_numpy(ref_delta, ref_phi, ref_psi, lam)
    np.testing.assert_allclose(update, helpers.kron_solve(left, right, grad), rtol=2e-3)


@pytest.mark.parametrize("step_control", ["quadratic", "graft_quadratic"])
def test_the_models_step_minimises_the_model_with_the_capped_damping(step_control,
                                                                     monkeypatch):
    """One step of the quadratic model on the explicit Gauss-Newton matrix (numpy):
    each layer's weights are damped by `min(lambda, cap * delta_l)` with `delta_l`
    its block's trace, and the step minimises that model along its direction."""
    monkeypatch.setattr(progress, "INITIAL", None)
    x, y = quadratic_tests._data()
    model = keras_tkfac.wrap(quadratic_tests._classifier(0))
    damping, cap = 0.1, 0.02
    optimizer = keras_tkfac.TKFAC(
        learning_rate=step_size.MODEL_STEP_LEARNING_RATE, step_control=step_control,
        damping=damping, trace_damping_cap=cap, kl_clip=None, factor_update_freq=1,
        inverse_update_freq=1, seed=0)
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    before = [v.numpy().astype(np.float64) for v in model.trainable_variables]
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    after = [v.numpy().astype(np.float64) for v in model.trainable_variables]
    per_weight = []
    capped = 0
    for index, slot in enumerate(optimizer._slots):
        delta = float(slot.factors[0].numpy() / optimizer._factor_weight[index].numpy())
        lam = min(damping, cap * max(delta, 1e-3))
        capped += lam < damping
        size = (slot.block.d_in) * slot.block.d_out  # kernel and bias rows
        per_weight.append(np.full(size, lam))
    assert capped >= 1
    # (Variables in the model's order: kernel, bias of each layer; the block's
    # stacked rows are the kernel's then the bias's, the same weights.)
    damping_diagonal = np.concatenate(per_weight)
    step = quadratic_tests._flat(before) - quadratic_tests._flat(after)
    grad, curvature = quadratic_tests._gradient_and_curvature(before)
    assert len(damping_diagonal) == len(grad)
    damped = curvature + np.diag(damping_diagonal)
    np.testing.assert_allclose(step @ grad, step @ damped @ step, rtol=2e-3)
    # With the given damping instead, the same equation does not hold.
    plain = curvature + damping * np.eye(len(grad))
    assert abs(step @ grad - step @ plain @ step) > 1e-2 * abs(step @ grad)


def test_the_cap_is_checked_and_saved():
    for bad in (0.0, -1.0, float("nan"), "x"):
        with pytest.raises(ValueError, match="trace_damping_cap"):
            keras_tkfac.TKFAC(trace_damping_cap=bad)
    optimizer = keras_tkfac.TKFAC(trace_damping_cap=0.01)
    assert keras_tkfac.TKFAC.from_config(optimizer.get_config()).trace_damping_cap == 0.01
    for control in ("graft", "trust_region", "kl_clip"):
        assert keras_tkfac.TKFAC(step_control=control).trace_damping_cap is None
    assert keras_tkfac.TKFAC(step_control="quadratic").trace_damping_cap == 3e-3
    assert keras_tkfac.TKFAC.from_config(
        keras_tkfac.TKFAC(trace_damping_cap=None).get_config()).trace_damping_cap is None


def test_lora_factors_keep_the_given_damping():
    """A LoRA layer's block (whose trace starts at zero, `B = 0`) keeps the given
    damping; the plain Dense beside it takes the cap."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,))
    adapted = keras.layers.Dense(4)
    h = adapted(inputs)
    adapted.enable_lora(2)
    model = keras_tkfac.wrap(keras.Model(inputs, keras.layers.Dense(3)(h)))
    optimizer = keras_tkfac.TKFAC(seed=0)
    lora = [block for block in model.blocks if block.covers_lora]
    plain = [block for block in model.blocks if not block.covers_lora]
    assert len(lora) == 1 and len(plain) == 1
    for block, expected in ((lora[0], 0.1), (plain[0], 3e-3 * 0.5)):
        lam = optimizer._layer_damping(block, _factors(optimizer, block, 0.5), 0.1)
        np.testing.assert_allclose(float(np.mean(lam)), expected, rtol=1e-5)
