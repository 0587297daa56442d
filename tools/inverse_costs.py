"""Cost and accuracy of the ways to invert the damped factors, methods interleaved.

On symmetric positive-definite matrices of the MLP's and the deep autoencoder's factor
sizes (`benchmark.py`'s problems: 1001, 1000, 785, 784, 513, 512, 501, 500, 251, 250,
31, 30, 11, 10) and the suite convnet's dense head (1601), damped by 1e-3 (condition
numbers up to ~3e3), times the inversion of all of them, round after round with the
methods interleaved (medians reported), and the largest relative Frobenius error
against float64 numpy:

- the package's method (`ops.symmetric_inverse`): matrices above
  `ops.CHOLESKY_MAX_DIM` halved into Schur complements, Cholesky below,
- Cholesky and `cholesky_solve` with the identity (the package's method until
  2026-12-05),
- Cholesky, a triangular inverse and one product `L^-T L^-1`,
- LU (`tf.linalg.inv`),
- a symmetric eigendecomposition (`V diag(1/w) V^T`),

each in float32 and float64, and the package's method with equal shapes batched into
one call against one call per matrix. A second table gives the package's method and
Cholesky per size (float32).

    python tools/inverse_costs.py [--rounds=7]
"""

import time

from absl import app
from absl import flags
import numpy as np
import tensorflow as tf

from keras_tkfac import ops

_ROUNDS = flags.DEFINE_integer("rounds", 7, "Timed rounds.")

SIZES = [1601, 1001, 1000, 785, 784, 513, 512, 512, 501, 500, 251, 250, 31, 30, 11, 10]


def _cholesky(m, dtype):
    chol = tf.linalg.cholesky(m)
    return tf.linalg.cholesky_solve(chol, tf.eye(m.shape[-1], batch_shape=m.shape[:-2],
                                                 dtype=dtype))


def _triangular(m, dtype):
    chol = tf.linalg.cholesky(m)
    eye = tf.eye(m.shape[-1], batch_shape=m.shape[:-2], dtype=dtype)
    inverse = tf.linalg.triangular_solve(chol, eye, lower=True)
    return tf.matmul(inverse, inverse, transpose_a=True)


def _lu(m, dtype):
    del dtype
    return tf.linalg.inv(m)


def _eigh(m, dtype):
    del dtype
    w, v = tf.linalg.eigh(m)
    return tf.matmul(v / w[..., None, :], v, transpose_b=True)


def _package(m, dtype):
    del dtype
    return ops.symmetric_inverse(m)[0]


METHODS = {"halving, Cholesky below 385 (the package's)": _package,
           "Cholesky + cholesky_solve": _cholesky,
           "Cholesky + triangular inverse": _triangular,
           "LU (tf.linalg.inv)": _lu, "eigh": _eigh}


def _matrices():
    rng = np.random.default_rng(0)
    result = []
    for d in SIZES:
        x = rng.normal(size=(2 * d, d))
        scale = np.sqrt(np.linspace(1e-3, 1, d))
        result.append(scale[:, None] * (x.T @ x / (2 * d)) * scale + 1e-3 * np.eye(d))
    return result


def main(argv):
    del argv
    matrices = _matrices()
    reference = [np.linalg.inv(m) for m in matrices]
    by_shape = {}
    for i, m in enumerate(matrices):
        by_shape.setdefault(m.shape, []).append(i)

    def batched(method, dtype):
        tensors = [tf.constant(m, dtype) for m in matrices]

        @tf.function
        def run():
            out = [None] * len(tensors)
            for indices in by_shape.values():
                inverses = method(tf.stack([tensors[i] for i in indices]), dtype)
                for j, i in enumerate(indices):
                    out[i] = tf.cast(inverses[j], tf.float32)
            return out
        return run

    def one_by_one(dtype):
        tensors = [tf.constant(m, dtype) for m in matrices]
        return tf.function(lambda: [_package(t, dtype) for t in tensors])

    def one_size(method, d):
        tensor = tf.constant(matrices[SIZES.index(d)], tf.float32)
        return tf.function(lambda: [method(tensor, tf.float32)])

    runs = {(name, dtype.name): batched(method, dtype) for name, method in
            METHODS.items() for dtype in (tf.float32, tf.float64)}
    runs["the package's, one call per matrix", "float32"] = one_by_one(tf.float32)
    package = "halving, Cholesky below 385 (the package's)"
    sizes = sorted({d for d in SIZES if d > 100}, reverse=True)
    for d in sizes:
        runs[package, d] = one_size(_package, d)
        runs["Cholesky + cholesky_solve", d] = one_size(_cholesky, d)
    errors, times = {}, {key: [] for key in runs}
    for key, run in runs.items():
        if isinstance(key[1], int):
            continue
        out = [t.numpy().astype(np.float64) for t in run()]
        errors[key] = max(np.linalg.norm(o - r) / np.linalg.norm(r)
                          for o, r in zip(out, reference))
    for _ in range(_ROUNDS.value):
        for key, run in runs.items():
            start = time.perf_counter()
            [t.numpy() for t in run()]
            times[key].append(1e3 * (time.perf_counter() - start))
    base = np.median(times[package, "float32"])
    print(f"`python tools/inverse_costs.py --rounds={_ROUNDS.value}`\n")
    print("| method | dtype | ms, all factors | × package's | max relative error |")
    print("|---|---|---:|---:|---:|")
    for (name, dtype), values in times.items():
        if isinstance(dtype, str):
            print(f"| {name} | {dtype} | {np.median(values):.0f} | "
                  f"{np.median(values) / base:.2f} | {errors[name, dtype]:.1e} |")
    print("\n| size | package's, ms | Cholesky + cholesky_solve, ms | ratio |")
    print("|---:|---:|---:|---:|")
    for d in sizes:
        ours = np.median(times[package, d])
        theirs = np.median(times["Cholesky + cholesky_solve", d])
        print(f"| {d} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f} |")


if __name__ == "__main__":
    app.run(main)
