"""`keras_tkfac.precision`: what `"auto"` resolves to, and the optimizers' bfloat16
curvature matmuls (`products_dtype`, `precondition_dtype`) against float32."""

import numpy as np
import pytest
import keras

import keras_tkfac
from keras_tkfac import jvp_rules
from keras_tkfac import precision


@pytest.fixture
def hardware(monkeypatch):
    """Sets what `has_bfloat16_units` finds: `(cpu_flags, gpu_capabilities)`."""
    def set_to(flags, gpus=()):
        monkeypatch.setattr(precision, "_cpu_flags", lambda: frozenset(flags))
        monkeypatch.setattr(precision, "_gpu_capabilities", lambda: list(gpus))
        precision.has_bfloat16_units.cache_clear()
    monkeypatch.delenv(precision.ENVIRONMENT, raising=False)
    yield set_to
    precision.has_bfloat16_units.cache_clear()


@pytest.mark.parametrize("flags,gpus,expected", [
    ({"avx2", "fma"}, (), "float32"),
    ({"avx2", "avx512_bf16"}, (), "bfloat16"),
    ({"amx_bf16"}, (), "bfloat16"),
    ({"amx_bf16"}, [(7, 0)], "float32"),  # the step runs on the V100
    ({"avx2"}, [(8, 0), (9, 0)], "bfloat16"),
    ({"avx2"}, [(9, 0), (7, 5)], "float32"),
])
def test_auto_is_bfloat16_where_the_device_has_bfloat16_units(hardware, flags, gpus,
                                                              expected):
    hardware(flags, gpus)
    assert precision.resolve("auto") == expected
    assert precision.resolve("float32") == "float32"
    assert precision.resolve("bfloat16") == "bfloat16"


def test_the_environment_fixes_auto(hardware, monkeypatch):
    hardware({"amx_bf16"})
    monkeypatch.setenv(precision.ENVIRONMENT, "float32")
    assert precision.resolve("auto") == "float32"
    hardware({"avx2"})
    monkeypatch.setenv(precision.ENVIRONMENT, "BFloat16")
    assert precision.resolve("auto") == "bfloat16"
    monkeypatch.setenv(precision.ENVIRONMENT, "float16")
    with pytest.raises(ValueError, match="KERAS_TKFAC_AUTO_PRECISION='float16'"):
        precision.resolve("auto")


def _mlp():
    keras.utils.set_random_seed(3)
    return keras.Sequential([keras.Input((12,)), keras.layers.Dense(16, activation="tanh"),
                             keras.layers.Dense(4)])


def _train(steps=6, **kwargs):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 12)).astype("float32")
    y = rng.integers(0, 4, size=64)
    model = keras_tkfac.wrap(_mlp())
    model.compile(optimizer=keras_tkfac.TKFAC(seed=1, **kwargs),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(x, y, batch_size=16, epochs=steps // 4 or 1, shuffle=False,
                        verbose=0)
    return history.history["loss"], model.get_weights()


def test_bfloat16_products_train_as_float32_up_to_rounding(monkeypatch):
    """`products_dtype="bfloat16"`: the products' tangent matmuls are traced in
    bfloat16 (the rule saw the dtype), and training follows the float32 run to
    bfloat16's rounding of the model's 2x2 Gram (relative 1e-2 on the weights
    after 8 steps)."""
    seen = []
    original = jvp_rules._same_op_in

    def spy(op, inputs, rule):
        seen.append((op.type, rule and rule[0]))
        return original(op, inputs, rule)

    monkeypatch.setattr(jvp_rules, "_same_op_in", spy)
    losses, weights = _train(8)  # ("auto": float32 in the tests, `conftest.py`)
    assert seen and {dtype for _, dtype in seen} == {"float32"}
    seen.clear()
    low_losses, low_weights = _train(8, products_dtype="bfloat16")
    assert ("MatMul", "bfloat16") in set(seen)
    np.testing.assert_allclose(low_losses, losses, rtol=1e-2)
    for a, b in zip(low_weights, weights):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-2 * np.abs(b).max())


def test_bfloat16_preconditioning_trains_as_float32_up_to_rounding():
    losses, weights = _train(8)
    low_losses, low_weights = _train(8, precondition_dtype="bfloat16")
    np.testing.assert_allclose(low_losses, losses, rtol=2e-2)
    for a, b in zip(low_weights, weights):
        np.testing.assert_allclose(a, b, rtol=0, atol=3e-2 * np.abs(b).max())


@pytest.mark.parametrize("cls", [keras_tkfac.TKFAC, keras_tkfac.KFAC])
def test_auto_is_the_default_kept_in_the_config(cls):
    """A saved optimizer says `"auto"`, not what one machine resolved it to; a
    config saved before `products_dtype` existed takes the default; float32 stays
    float32."""
    optimizer = cls()
    assert (optimizer.products_dtype, optimizer.precondition_dtype) == ("auto", "auto")
    config = optimizer.get_config()
    assert config["products_dtype"] == config["precondition_dtype"] == "auto"
    del config["products_dtype"]
    assert cls.from_config(config).products_dtype == "auto"
    config = cls(products_dtype="float32", precondition_dtype="float32").get_config()
    restored = cls.from_config(config)
    assert (restored.products_dtype, restored.precondition_dtype) == ("float32",
                                                                      "float32")


def test_choose_gates_auto_on_both_widths():
    auto = ("bfloat16", precision.MIN_WIDTH)
    assert precision.choose(auto, (128, 512)) == "bfloat16"
    assert precision.choose(auto, (785, 10)) == "float32"
    assert precision.choose(auto, (None, 512)) == "float32"
    assert precision.choose(auto, None) == "float32"  # not a matmul
    assert precision.choose(("bfloat16", 0), None) == "bfloat16"
    assert precision.choose(("float32", 0), (512, 512)) == "float32"


def test_auto_policy(hardware):
    hardware({"avx2"})
    assert precision.policy("auto") == ("float32", 0)
    assert precision.policy("bfloat16") == ("bfloat16", 0)
    hardware({"amx_bf16"})
    assert precision.policy("auto") == ("bfloat16", precision.MIN_WIDTH)
    assert precision.policy("float32") == ("float32", 0)


def test_precondition_many_takes_a_dtype_per_layer():
    """Per-layer dtypes: the float32 layers' updates are exactly the float32 ones
    (two layers of one shape in different dtypes are not stacked together), the
    bfloat16 layer's equal them to bfloat16's rounding (8 significant bits per
    operand: within 2^-6 of the largest entry)."""
    import tensorflow as tf
    from keras_tkfac import ops
    rng = np.random.default_rng(4)

    def spd(d):
        m = rng.normal(size=(d, d)).astype("float32")
        return tf.constant(m @ m.T / d + np.eye(d, dtype="float32"))

    shapes = [(9, 5), (9, 5), (7, 3)]
    left = [spd(a) for a, _ in shapes]
    right = [spd(b) for _, b in shapes]
    grads = [tf.constant(rng.normal(size=s).astype("float32")) for s in shapes]
    exact = ops.precondition_many(left, grads, right)
    mixed = ops.precondition_many(left, grads, right,
                                  ["float32", "bfloat16", "float32"])
    for i in (0, 2):
        np.testing.assert_array_equal(mixed[i].numpy(), exact[i].numpy())
    assert mixed[1].dtype == tf.float32
    assert not np.array_equal(mixed[1].numpy(), exact[1].numpy())
    np.testing.assert_allclose(mixed[1].numpy(), exact[1].numpy(), rtol=0,
                               atol=2.0**-6 * np.abs(exact[1].numpy()).max())


def test_bfloat16_paths_compile_with_xla():
    """Under `jit_compile=True` (Keras's default on GPUs) the bfloat16 products and
    preconditioning compile and train as uncompiled."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 12)).astype("float32")
    y = rng.integers(0, 4, size=64)
    losses = []
    for jit in (False, True):
        model = keras_tkfac.wrap(_mlp())
        model.compile(optimizer=keras_tkfac.TKFAC(
            seed=1, products_dtype="bfloat16", precondition_dtype="bfloat16"),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=jit)
        losses.append(model.fit(x, y, batch_size=16, epochs=2, shuffle=False,
                                verbose=0).history["loss"])
    assert np.all(np.isfinite(losses))
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-2)
