"""Kernel-level check of the README's GPU cost model ("What to expect on a GPU").

TensorFlow could not be installed on the GPU machine lent to this project (no registry
there, and the TensorFlow wheel with its CUDA libraries is far over what can be carried),
so this tool does not run keras_tkfac. It runs *the same computations* that a TKFAC step
adds to a training step -- preconditioning `Phi^-1 G Psi^-1`, the factored form, the
statistics Grams, Cholesky and eigendecomposition inverses, convolution patches -- as
plain XLA programs through JAX (XLA is the compiler TensorFlow's `jit_compile` uses),
next to the training step they are added to, and prints their times and ratios:

    python tools/gpu_floor.py --out=DIR            # needs jax (GPU build on a GPU)
    python tools/gpu_floor.py --combine=A.json,B.json   # a side-by-side table

What it measures is the hardware and compiler floor of each piece on that device, not
TensorFlow's overhead. Float32 matmuls use TF32 tensor cores, TensorFlow's default on
Ampere and later GPUs (`--precision=highest` for true float32). Each figure is the
median of `--repeats` timed calls after warm-up, synchronised with
`block_until_ready`; ratios are taken within one run.
"""

import functools
import json
import os
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import cho_solve

jax.config.update("jax_enable_x64", True)


def median_ms(fn, *args, repeats=30):
    out = fn(*args)
    jax.block_until_ready(out)
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(1e3 * (time.perf_counter() - started))
    return statistics.median(times)


# MLP 784-512-512-10, batch 256 (tools/benchmark.py --problem=mlp) -----------------

def mlp_shapes(widths=(784, 512, 512, 10)):
    return [(d_in + 1, d_out) for d_in, d_out in zip(widths[:-1], widths[1:])]


def _with_ones(a):
    return jnp.concatenate([a, jnp.ones((a.shape[0], 1), a.dtype)], axis=1)


def mlp_forward_backward(weights, x, labels):
    """Manual forward and backward pass: the gradients, each layer's input rows `a`
    (with the bias column) and output gradients `g`, as the statistics step needs."""
    inputs, h = [], x
    for i, w in enumerate(weights):
        a = _with_ones(h)
        inputs.append(a)
        h = a @ w
        if i < len(weights) - 1:
            h = jax.nn.relu(h)
    probs = jax.nn.softmax(h)
    g = (probs - jax.nn.one_hot(labels, h.shape[1], dtype=h.dtype)) / x.shape[0]
    grads, outs = [None] * len(weights), [None] * len(weights)
    for i in reversed(range(len(weights))):
        outs[i] = g
        grads[i] = inputs[i].T @ g
        if i > 0:
            g = (g @ weights[i][:-1].T) * (inputs[i][:, :-1] > 0)
    return grads, inputs, outs


def adam_step(weights, m, v, x, labels, lr=1e-3):
    grads, _, _ = mlp_forward_backward(weights, x, labels)
    new_w, new_m, new_v = [], [], []
    for w, mi, vi, g in zip(weights, m, v, grads):
        mi = 0.9 * mi + 0.1 * g
        vi = 0.999 * vi + 0.001 * g * g
        new_w.append(w - lr * mi / (jnp.sqrt(vi) + 1e-7))
        new_m.append(mi)
        new_v.append(vi)
    return new_w, new_m, new_v


def tkfac_plain_step(weights, m, phi_inv, psi_inv, x, labels, lr=1e-3):
    """Full form: each layer's gradient preconditioned as `Phi^-1 G Psi^-1`."""
    grads, _, _ = mlp_forward_backward(weights, x, labels)
    new_w, new_m = [], []
    for w, mi, p, q, g in zip(weights, m, phi_inv, psi_inv, grads):
        mi = 0.9 * mi + (p @ g) @ q
        new_w.append(w - lr * mi)
        new_m.append(mi)
    return new_w, new_m


def tkfac_factored_step(weights, m, phi_inv, psi_inv, x, labels, lr=1e-3):
    """Factored form: `(Phi^-1 A^T)(G_out Psi^-1)` from the rows of the batch."""
    _, inputs, outs = mlp_forward_backward(weights, x, labels)
    new_w, new_m = [], []
    for w, mi, p, q, a, g in zip(weights, m, phi_inv, psi_inv, inputs, outs):
        mi = 0.9 * mi + (p @ a.T) @ (g @ q)
        new_w.append(w - lr * mi)
        new_m.append(mi)
    return new_w, new_m


def _logits(weights, x):
    h = x
    for i, w in enumerate(weights):
        h = _with_ones(h) @ w
        if i < len(weights) - 1:
            h = jax.nn.relu(h)
    return h


def _fisher_quadratic(probs, u, v):
    """`u^T F v` for softmax cross-entropy outputs, averaged over the batch."""
    pu, pv = jnp.sum(probs * u, 1), jnp.sum(probs * v, 1)
    return jnp.mean(jnp.sum(probs * u * v, 1) - pu * pv)


def _quadratic_update(weights, m, grads, deltas, probs, ju, jv, lr):
    """The quadratic model's 2x2 solve for the step and the momentum's coefficients
    (Martens & Grosse 2015, section 7), then the update."""
    def dot(a, b):
        return sum(jnp.sum(p * q) for p, q in zip(a, b))
    matrix = jnp.array([[_fisher_quadratic(probs, ju, ju), _fisher_quadratic(probs, ju, jv)],
                        [_fisher_quadratic(probs, ju, jv), _fisher_quadratic(probs, jv, jv)]])
    rhs = -jnp.array([dot(grads, deltas), dot(grads, m)])
    alpha, mu = jnp.linalg.solve(matrix + 1e-3 * jnp.eye(2), rhs)
    new_m = [alpha * d + mu * mi for d, mi in zip(deltas, m)]
    return [w + (lr / 1e-3) * s for w, s in zip(weights, new_m)], new_m


def quadratic_step(weights, m, phi_inv, psi_inv, x, labels, lr=1e-3, one_pass=False):
    """The default step's shape: the factored-form plain step, then the products of
    the curvature with the step and with the momentum through forward mode -- two
    `jvp`s (a primal pass each), or one primal pass carrying both tangents."""
    _, inputs, outs = mlp_forward_backward(weights, x, labels)
    grads = [a.T @ g for a, g in zip(inputs, outs)]
    deltas = [-(p @ a.T) @ (g @ q) for p, q, a, g in zip(phi_inv, psi_inv, inputs, outs)]
    f = functools.partial(_logits, x=x)
    if one_pass:
        logits, (ju, jv) = jax.vmap(lambda t: jax.jvp(f, (weights,), (t,)),
                                    out_axes=(None, 0))([jnp.stack([d, mi]) for d, mi
                                                          in zip(deltas, m)])
    else:
        logits, ju = jax.jvp(f, (weights,), (deltas,))
        _, jv = jax.jvp(f, (weights,), (m,))
    probs = jax.nn.softmax(logits)
    return _quadratic_update(weights, m, grads, deltas, probs, ju, jv, lr)


def statistics_step(weights, phi, psi, x, labels, decay=0.95):
    """The Grams of the rows and their squared norms (TKFAC's trace weights)."""
    grads, inputs, outs = mlp_forward_backward(weights, x, labels)
    new_phi, new_psi = [], []
    for a, g, p, q in zip(inputs, outs, phi, psi):
        an = jnp.sum(a * a, axis=1, keepdims=True)
        gn = jnp.sum(g * g, axis=1, keepdims=True)
        new_phi.append(decay * p + (1 - decay) * (a * gn).T @ a / jnp.sum(gn))
        new_psi.append(decay * q + (1 - decay) * (g * an).T @ g / jnp.sum(an))
    return grads, new_phi, new_psi


def cholesky_inverse(matrix, damping):
    eye = jnp.eye(matrix.shape[-1], dtype=matrix.dtype)
    factor = jnp.linalg.cholesky(matrix + damping * eye)
    return cho_solve((factor, True), jnp.broadcast_to(eye, matrix.shape))


def eigh_inverse(matrix, damping):
    values, vectors = jnp.linalg.eigh(matrix)
    return (vectors / (values + damping)[..., None, :]) @ jnp.swapaxes(vectors, -1, -2)


# ResNet-8 convolutions at batch 128 on 28x28x1 (tools/benchmark.py --problem=resnet)

RESNET_CONVS = [  # (input height, input channels, kernel, stride, filters)
    (28, 1, 3, 1, 16), (28, 16, 3, 1, 16), (28, 16, 3, 1, 16),
    (28, 16, 3, 2, 32), (14, 32, 3, 1, 32), (28, 16, 1, 2, 32),
    (14, 32, 3, 2, 64), (7, 64, 3, 1, 64), (14, 32, 1, 2, 64)]


def conv_patch_grams(images):
    """Each conv layer's patch rows (im2col) and their Gram, as the statistics need."""
    grams = []
    for (size, channels, kernel, stride, _), x in zip(RESNET_CONVS, images):
        patches = jax.lax.conv_general_dilated_patches(
            x, (kernel, kernel), (stride, stride), "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        rows = patches.reshape(-1, patches.shape[-1])
        grams.append(rows.T @ rows / rows.shape[0])
    return grams


def conv_forward_backward(images, kernels):
    """Forward and backward of the same convolutions (each on its own input), the
    plain step's share of them."""
    def loss(ks):
        total = 0.0
        for x, k, (_, _, _, stride, _) in zip(images, ks, RESNET_CONVS):
            y = jax.lax.conv_general_dilated(
                x, k, (stride, stride), "SAME",
                dimension_numbers=("NHWC", "HWIO", "NHWC"))
            total = total + jnp.sum(jax.nn.relu(y) ** 2)
        return total
    return jax.grad(loss)(kernels)


def combine(paths):
    """A markdown table of several runs' JSON files, one column per precision."""
    runs = []
    for path in paths:
        with open(path) as f:
            runs.append((os.path.basename(path)[len("gpu_floor_"):-len(".json")],
                         json.load(f)))
    print(f"Device: {runs[0][1]['device']}, jax {runs[0][1]['jax']}; median of timed "
          "calls after warm-up, in ms; one run per column.\n")
    print("| what | " + " | ".join(name for name, _ in runs) + " |")
    print("|---|" + "---:|" * len(runs))
    for i, row in enumerate(runs[0][1]["rows"]):
        cells = []
        for _, run in runs:
            other = run["rows"][i]
            cell = f"{other['ms']:g}" if other["ms"] else ""
            cells.append(f"{cell} ({other['note']})" if other["note"] else cell)
        print(f"| {row['what']} | " + " | ".join(cells) + " |")


_OUT = flags.DEFINE_string("out", "", "write the results as JSON into this folder")
_REPEATS = flags.DEFINE_integer("repeats", 30, "timed calls per figure (the median)")
_MATMUL_SIZE = flags.DEFINE_integer("matmul_size", 8192, "size of the peak-rate matmul")
_PRECISION = flags.DEFINE_enum("precision", "tensorfloat32",
                               ["tensorfloat32", "highest", "bfloat16"],
                               "XLA's precision for float32 matmuls")
_MLP_ONLY = flags.DEFINE_bool("mlp_only", False, "time the MLP's rows only")
_COMBINE = flags.DEFINE_list("combine", [], "JSON files to print side by side")


def main(argv):
    del argv
    if _COMBINE.value:
        combine(_COMBINE.value)
        return
    out, repeats = _OUT.value, _REPEATS.value
    rng = np.random.default_rng(0)
    rows = []

    def record(name, ms, note=""):
        rows.append({"what": name, "ms": round(ms, 4), "note": note})
        print(f"{name:58s} {ms:10.4f} ms  {note}", flush=True)

    print("device:", jax.devices()[0].device_kind, "| jax", jax.__version__,
          "| precision", _PRECISION.value, flush=True)
    with jax.default_matmul_precision(_PRECISION.value):
        n = _MATMUL_SIZE.value
        a = jnp.asarray(rng.standard_normal((n, n)), jnp.float32)
        ms = median_ms(jax.jit(lambda p, q: p @ q), a, a, repeats=10)
        record(f"matmul {n}^3 float32", ms, f"{2 * n**3 / ms / 1e9:.0f} TFLOP/s")
        big = jnp.asarray(rng.standard_normal(2**28), jnp.float32)
        ms = median_ms(jax.jit(lambda t: t * 1.0001), big, repeats=10)
        record("copy 1 GiB (read + write)", ms, f"{2 * 4 * 2**28 / ms / 1e6:.0f} GB/s")
        del a, big

        shapes = mlp_shapes()
        batch = 256
        x = jnp.asarray(rng.random((batch, 784)), jnp.float32)
        labels = jnp.asarray(rng.integers(0, 10, batch))
        weights = [jnp.asarray(rng.standard_normal(s) * 0.05, jnp.float32) for s in shapes]
        zeros = [jnp.zeros_like(w) for w in weights]
        phi = [jnp.asarray(np.cov(rng.standard_normal((i, 4 * i))) + np.eye(i), jnp.float32)
               for i, _ in shapes]
        psi = [jnp.asarray(np.cov(rng.standard_normal((o, 4 * o))) + np.eye(o), jnp.float32)
               for _, o in shapes]
        with jax.default_matmul_precision("highest"):  # the two forms agree
            full = jax.jit(tkfac_plain_step)(weights, zeros, phi, psi, x, labels)[0]
            fact = jax.jit(tkfac_factored_step)(weights, zeros, phi, psi, x, labels)[0]
            error = max(float(jnp.linalg.norm(f - g) / jnp.linalg.norm(f - w))
                        for f, g, w in zip(full, fact, weights))
        record("check: factored vs full form, relative", 0.0, f"{error:.1e}")
        adam = median_ms(jax.jit(adam_step), weights, zeros, zeros, x, labels,
                         repeats=repeats)
        record("MLP Adam step (batch 256)", adam)
        plain = median_ms(jax.jit(tkfac_plain_step), weights, zeros, phi, psi, x, labels,
                          repeats=repeats)
        record("MLP TKFAC plain step, full form", plain, f"{plain / adam:.2f}x Adam")
        factored = median_ms(jax.jit(tkfac_factored_step), weights, zeros, phi, psi, x,
                             labels, repeats=repeats)
        record("MLP TKFAC plain step, factored form", factored,
               f"{factored / adam:.2f}x Adam")
        grads = jax.jit(mlp_forward_backward)(weights, x, labels)[0]
        assert all(g.dtype == jnp.float32 for g in grads), [g.dtype for g in grads]
        momentum = [0.01 * w for w in weights]
        quad = median_ms(jax.jit(quadratic_step), weights, momentum, phi, psi, x, labels,
                         repeats=repeats)
        record("MLP default step: factored + two jvp products", quad,
               f"{quad / adam:.2f}x Adam")
        one = median_ms(jax.jit(functools.partial(quadratic_step, one_pass=True)),
                        weights, momentum, phi, psi, x, labels, repeats=repeats)
        record("MLP default step: factored + one primal, two tangents", one,
               f"{one / adam:.2f}x Adam")
        stats = median_ms(jax.jit(statistics_step), weights, phi, psi, x, labels,
                          repeats=repeats)
        record("MLP gradients + statistics Grams", stats, f"{stats / adam:.2f}x Adam")

        if _MLP_ONLY.value:
            dtypes, out = (), ""
        else:
            dtypes = (jnp.float32, jnp.float64)
        for dtype in dtypes:
            for size, count in ((785, 1), (513, 2), (512, 2)):
                m = jnp.asarray(np.stack([np.cov(rng.standard_normal((size, 2 * size)))
                                          for _ in range(count)]), dtype)
                for name, fn in (("cholesky", cholesky_inverse), ("eigh", eigh_inverse)):
                    ms = median_ms(jax.jit(fn), m, jnp.asarray(1e-3, dtype),
                                   repeats=max(5, repeats // 3))
                    record(f"{name} inverse {count}x{size}^2 {jnp.dtype(dtype).name}", ms)

        if _MLP_ONLY.value:
            return
        conv_batch = 128
        images = [jnp.asarray(rng.standard_normal((conv_batch, s, s, c)), jnp.float32)
                  for s, c, _, _, _ in RESNET_CONVS]
        kernels = [jnp.asarray(rng.standard_normal((k, k, c, f)) * 0.1, jnp.float32)
                   for _, c, k, _, f in RESNET_CONVS]
        fb = median_ms(jax.jit(conv_forward_backward), images, kernels,
                       repeats=repeats)
        record("ResNet-8 convs forward + backward (batch 128)", fb)
        grams = median_ms(jax.jit(conv_patch_grams), images, repeats=repeats)
        record("ResNet-8 conv patches + Grams", grams, f"{grams / fb:.2f}x fwd+bwd")

    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, f"gpu_floor_{_PRECISION.value}.json"), "w") as f:
            json.dump({"device": jax.devices()[0].device_kind,
                       "jax": jax.__version__, "rows": rows}, f, indent=1)
    print("\n| what | ms | note |\n|---|---:|---|")
    for row in rows:
        print(f"| {row['what']} | {row['ms']} | {row['note']} |")


if __name__ == "__main__":
    app.run(main)
