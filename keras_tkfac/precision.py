"""The precision of the curvature matmuls: float32, bfloat16, or whichever the
hardware multiplies faster (`"auto"`).

Two kinds of matmul can run in bfloat16 with float32 results:
- the preconditioning products `Phi^-1 G Psi^-1` (`precondition_dtype`,
  `ops.precondition_many`): the inverses, the gradient and the intermediate product
  rounded to bfloat16;
- the tangent matmuls and convolutions of the quadratic model's products
  (`products_dtype`, `jvp_rules.precision`): `x dW` and `t W` of each layer in the
  forward-mode pass, their inputs rounded to bfloat16 and their outputs back to
  float32. The model reduces them to a 2x2 Gram summed over the batch, so the
  rounding of single entries (8 significant bits) averages out.

Neither changes the gradient, the statistics, the inverses or what the weights are
updated with beyond that rounding. `"auto"` is bfloat16 for the matmuls of widths
of at least `MIN_WIDTH` (dense layers' preconditioning and tangents; not
convolutions, einsums or embeddings) where the device has bfloat16 matmul units,
else float32 (`has_bfloat16_units`): a GPU of compute
capability 8.0 or later (A100, H100: bfloat16 tensor cores at twice TF32's rate), a
CPU with AMX or AVX512-BF16 (Intel Sapphire Rapids and later, AMD Zen 4; on the
suite's MLP the steps took 0.84x float32's time on both kinds of CPU, measured on
2 cores each, docs/RESULTS.md, "bfloat16 curvature matmuls"). Where there are none, bfloat16 matmuls are emulated and were not faster (measured on an
AVX2-only CPU: 1.08x float32's time, docs/RESULTS.md, "Cost of a step"). The
environment variable `KERAS_TKFAC_AUTO_PRECISION` (`float32` or `bfloat16`) fixes
what `"auto"` means, for a reproducible run across machines; the tests set it to
`float32` so that their float32 oracles hold on any machine.
"""

import functools
import os

import tensorflow as tf

DTYPES = ("auto", "float32", "bfloat16")

# Under `"auto"` with bfloat16 units, only matmuls whose two widths (the contracted
# one and the output's) are at least this take bfloat16: there the rounding pays for
# the casts. Measured on a 2-core CPU with AMX (`tools/step_variants.py
# --variant=bfloat16`, every matmul and convolution in bfloat16, 2026-12-06): the
# suite's MLP (widths 512-784) step 0.84-0.86x float32's, the autoencoder's 0.93x,
# but the transformer's (widths 32-64, many small einsums) 1.10x and the BiLSTM's
# 1.14x, the convolutional programs' (16-64 channels) 0.95-1.01x. Convolutions, and
# einsums, stay float32 under `"auto"`. 128 itself was not tuned: on the suite the
# layers it puts in bfloat16 are at least 250 wide, and the widest it leaves in
# float32 is the autoencoder's 250 -> 125 layer.
MIN_WIDTH = 128
ENVIRONMENT = "KERAS_TKFAC_AUTO_PRECISION"
_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def check(name, value):
    """A `ValueError` naming the argument unless `value` is one of `DTYPES`."""
    if value not in DTYPES:
        raise ValueError(f"`{name}` must be one of {DTYPES}. Received: "
                         f"{name}={value!r}")


def _cpu_flags():
    """The CPU's feature flags (Linux's `/proc/cpuinfo`; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _gpu_capabilities():
    """The compute capability `(major, minor)` of each visible GPU."""
    found = []
    for device in tf.config.list_physical_devices("GPU"):
        try:
            details = tf.config.experimental.get_device_details(device)
        except (ValueError, RuntimeError):
            details = {}
        found.append(tuple(details.get("compute_capability") or (0, 0)))
    return found


@functools.lru_cache(maxsize=None)
def has_bfloat16_units():
    """Whether the device the step runs on multiplies bfloat16 natively: every
    visible GPU of compute capability >= 8.0 where there is one (the step runs
    there), else a CPU with AMX-BF16 or AVX512-BF16."""
    capabilities = _gpu_capabilities()
    if capabilities:
        return all(c >= (8, 0) for c in capabilities)
    return any(flag in _cpu_flags() for flag in _CPU_FLAGS)


def policy(value):
    """`(dtype, min_width)` for one of `DTYPES`: `"bfloat16"` puts every eligible
    product in bfloat16 (`min_width` 0); `"auto"` resolves to float32 or to
    bfloat16 for matmuls of widths of at least `MIN_WIDTH` only."""
    dtype = resolve(value)
    return dtype, (MIN_WIDTH if value == "auto" and dtype == "bfloat16" else 0)


def choose(rule, widths):
    """The dtype under `rule` (`policy`'s pair) of a product of `widths` (its
    contracted width and its output's; `None` where not known, or not a matmul,
    which `"auto"` leaves in float32)."""
    dtype, min_width = rule
    if dtype == "float32" or not min_width:
        return dtype
    if widths is None or any(w is None or w < min_width for w in widths):
        return "float32"
    return dtype


def resolve(value):
    """`"float32"` or `"bfloat16"` for one of `DTYPES` (`"auto"` as the module
    docstring says)."""
    if value != "auto":
        return value
    forced = os.environ.get(ENVIRONMENT, "").strip().lower()
    if forced in ("float32", "bfloat16"):
        return forced
    if forced:
        raise ValueError(f"The environment variable {ENVIRONMENT} must be `float32` "
                         f"or `bfloat16`. Received: {ENVIRONMENT}={forced!r}")
    return "bfloat16" if has_bfloat16_units() else "float32"
