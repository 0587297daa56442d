"""How far are the damped Kronecker factors from a multiple of the identity?

Trains each workload of `tools/suite.py` with `TKFAC()` at its defaults for
`--steps` steps (the suite's weights and batches), then, for every preconditioned
layer whose factors are matrices, reads the damped factors `L` and `R` that the
preconditioner inverts (the current damping; `statistics.new_inverses`'s) and
reports:

- `d_in`, `d_out` and each factor's smallest eigenvalue (at least the damping's
  share) and how many of its eigenvalues exceed 2 and 10 times the smallest: the
  directions in which the preconditioner is not a multiple of the identity;
- the relative error `|U_k - U| / |U|` of the preconditioned gradient of the next
  batch, `U = L^-1 G R^-1`, when each inverse keeps only its top `k` eigenpairs and
  treats the rest as the smallest eigenvalue (`L^-1 ~ I / l + V (D^-1 - I / l) V^T`,
  `V` the top `k` eigenvectors): a rank-`k` correction of a scaled identity;
- for layers other than convolutions whose input's shape is known, the flops of
  the layer's preconditioning in the form the optimizer takes now (the fewer of
  `ops.full_precondition_flops` and `ops.factored_precondition_flops` at the
  workload's batch) and in that rank-`k` form applied to the gradient,
  `8 k d_in d_out` (two thin products per side), at the smallest `k` of `--ranks`
  whose error is at most `--tolerance`, against the layer's forward matmul,
  `2 B T d_in d_out` (`T` rows per example: a sequence's positions).

A measurement of what the defaults compute, for the design of a cheaper
preconditioner (docs/RESULTS.md, "How far the damped factors are from the
identity"); nothing in the package uses the rank-`k` form.

    python tools/spectra.py [--workloads=mlp,autoencoder] [--steps=60] [--smoke]
"""

import os

from absl import app
from absl import flags
from absl import logging
import numpy as np
import tensorflow as tf
import keras

import benchlib
import keras_tkfac
from keras_tkfac import damping as damping_lib
from keras_tkfac import ops
import suite

_STEPS = flags.DEFINE_integer("steps", 60, "TKFAC steps before the factors are read.")
_RANKS = flags.DEFINE_list("ranks", ["8", "16", "32", "64", "128"],
                           "Ranks k of the corrected identity.")
_TOLERANCE = flags.DEFINE_float(
    "tolerance", 0.02, "Largest relative error of the update for the flop column.")


def _top_k_inverse(matrix, k):
    """The inverse of symmetric positive definite `matrix` from its top `k`
    eigenpairs, the others taken as its smallest eigenvalue (exact for `k >= d`)."""
    values, vectors = np.linalg.eigh(matrix)
    if k >= len(values):
        return np.linalg.inv(matrix)
    smallest = values[0]
    top, basis = values[-k:], vectors[:, -k:]
    return (np.eye(len(values)) / smallest
            + basis @ np.diag(1.0 / top - 1.0 / smallest) @ basis.T)


def _gradients(model, batch):
    """Each trainable variable's gradient of the compiled loss on `batch`, by id."""
    x, y = batch
    with tf.GradientTape() as tape:
        loss = model.compute_loss(x, y, model(x, training=True))
    variables = model.trainable_variables
    return {id(v): g for v, g in zip(variables, tape.gradient(loss, variables))}


def _rows_per_example(layer):
    """The rows each example gives a dense layer (its input's positions: a
    sequence's length), or `None` where the input's shape is not known."""
    try:
        shape = layer.input.shape
    except (AttributeError, ValueError):
        return None
    inner = shape[1:-1]
    if any(d is None for d in inner):
        return None
    return int(np.prod(inner)) if inner else 1


def layer_rows(optimizer, grads, ranks, batch_size):
    """One row of figures per preconditioned layer with matrix factors (grouped,
    depthwise and diagonal factors are left out)."""
    damping = damping_lib.current(optimizer)
    rows = []
    for i, slot in enumerate(optimizer._slots):  # pylint: disable=protected-access
        weight = optimizer._factor_weight[i]  # pylint: disable=protected-access
        factors = [tf.math.divide_no_nan(f, weight) for f in slot.factors]
        left, right = [np.asarray(m, np.float64) for m in optimizer._damped_factors(  # pylint: disable=protected-access
            slot.block, factors, damping)]
        if left.ndim != 2 or right.ndim != 2:
            continue  # (grouped, depthwise or diagonal factors)
        block = slot.block
        parts = [grads[id(v)] for v in (block.kernel, block.bias) if v is not None]
        grad = np.asarray(block.grad_matrix(*parts), np.float64)
        exact = np.linalg.solve(left, grad) @ np.linalg.inv(right)
        norm = np.linalg.norm(exact)
        errors = [float(np.linalg.norm(
            _top_k_inverse(left, k) @ grad @ _top_k_inverse(right, k) - exact)
            / norm) if norm > 0 else 0.0 for k in ranks]
        eigen = [np.linalg.eigvalsh(m) for m in (left, right)]
        rows.append({
            "layer": block.layer.name, "d_in": left.shape[0], "d_out": right.shape[0],
            "smallest": [float(e[0]) for e in eigen],
            "above_2": [int(np.sum(e > 2 * e[0])) for e in eigen],
            "above_10": [int(np.sum(e > 10 * e[0])) for e in eigen],
            "errors": errors,
        })
        rows_per_example = None if block.is_conv else _rows_per_example(block.layer)
        batch_rows = None if rows_per_example is None else batch_size * rows_per_example
        rows[-1].update(
            flops_now=None if batch_rows is None else min(
                ops.full_precondition_flops(left.shape[0], right.shape[0]),
                ops.factored_precondition_flops(batch_rows, left.shape[0],
                                                right.shape[0])),
            forward=None if batch_rows is None
            else 2 * batch_rows * left.shape[0] * right.shape[0])
    return rows


def _rank_flops(row, ranks, tolerance):
    """`(k, flops)` of the rank-k form at the smallest rank within `tolerance`
    (the current form's flops where none is, or where it has fewer)."""
    for k, error in zip(ranks, row["errors"]):
        if error <= tolerance:
            flops = 8 * k * row["d_in"] * row["d_out"]
            return (k, flops) if flops < row["flops_now"] else (None, row["flops_now"])
    return None, row["flops_now"]


def report(name, rows, ranks, tolerance):
    """Markdown lines of one workload's table and totals."""
    lines = [f"#### {name}", "",
             "| layer | d_in × d_out | smallest eigenvalue (L, R) | > 2× (L, R) | "
             "> 10× (L, R) | " + " | ".join(f"error k={k}" for k in ranks)
             + " | flops now / forward | rank-k flops / forward |",
             "|---|---|---|---|---|" + "---:|" * len(ranks) + "---:|---:|"]
    now = forward = lowered = 0.0
    for row in rows:
        if row["flops_now"] is None:
            lines.append(
                f"| {row['layer']} | {row['d_in']} × {row['d_out']} | "
                f"{row['smallest'][0]:.3g}, {row['smallest'][1]:.3g} | "
                f"{row['above_2'][0]}, {row['above_2'][1]} | "
                f"{row['above_10'][0]}, {row['above_10'][1]} | "
                + " | ".join(f"{e:.3f}" for e in row["errors"]) + " | – | – |")
            continue
        k, flops = _rank_flops(row, ranks, tolerance)
        now += row["flops_now"]
        forward += row["forward"]
        lowered += flops
        lines.append(
            f"| {row['layer']} | {row['d_in']} × {row['d_out']} | "
            f"{row['smallest'][0]:.3g}, {row['smallest'][1]:.3g} | "
            f"{row['above_2'][0]}, {row['above_2'][1]} | "
            f"{row['above_10'][0]}, {row['above_10'][1]} | "
            + " | ".join(f"{e:.3f}" for e in row["errors"])
            + f" | {row['flops_now'] / row['forward']:.2f} | "
            + (f"{flops / row['forward']:.2f} (k={k})" if k else "–") + " |")
    lines.append("")
    if forward:
        lines += [f"Dense layers' preconditioning flops over their forward matmuls: "
                  f"{now / forward:.2f} now, {lowered / forward:.2f} with the "
                  f"smallest rank within {tolerance:g} per layer.", ""]
    else:
        lines += ["(No dense layer with matrix factors and a known input shape.)", ""]
    return lines


def main(argv):
    del argv
    tf.get_logger().setLevel("ERROR")
    logging.set_verbosity(logging.ERROR)
    smoke, seed = suite._SMOKE.value, suite._SEED.value  # pylint: disable=protected-access
    steps = 3 if smoke else _STEPS.value
    ranks = [int(k) for k in _RANKS.value]
    lines = [
        "`python tools/spectra.py --workloads=" + ",".join(suite._WORKLOADS.value)  # pylint: disable=protected-access
        + f" --steps={steps} --ranks={','.join(map(str, ranks))} "
        f"--tolerance={_TOLERANCE.value:g}" + (" --smoke" if smoke else "") + "`", "",
        f"Seed {seed}; `TKFAC()` at its defaults after {steps} steps; {os.cpu_count()} "
        f"CPU cores, TensorFlow {tf.__version__}, Keras {keras.__version__}, "
        f"keras_tkfac {benchlib.source_version()}.", ""]
    for name in suite._WORKLOADS.value:  # pylint: disable=protected-access
        workload = getattr(suite, name)(smoke, seed)
        keras.utils.set_random_seed(seed)
        model = keras_tkfac.wrap(workload.build())
        optimizer = keras_tkfac.TKFAC(seed=seed)
        model.compile(optimizer=optimizer, loss=workload.loss)
        data = benchlib.batches(workload.train, workload.batch_size, seed)
        model.fit(data, epochs=1, steps_per_epoch=steps, verbose=0)
        grads = _gradients(model, next(iter(data.skip(steps))))
        lines += report(name, layer_rows(optimizer, grads, ranks, workload.batch_size),
                        ranks, _TOLERANCE.value)
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
