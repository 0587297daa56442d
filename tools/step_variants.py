"""Steps of the suite's programs traced with and without one change to the step.

Each `--variant` is a change that leaves what the optimizer computes the same (up to
rounding) and is meant to make its step cheaper; the tool traces the step once as it
was before the change ("before") and once as it is ("now"):

- `zero_tangents`: TensorFlow's forward mode passes a zero tangent for every input of
  an op that has none (the network's input into the first layer, a constant), and the
  products' inline rule of a multilinear op (`keras_tkfac.jvp_rules`: matmuls,
  convolutions, products) computed the op on it, `0 · W`, `conv(0, W)`; now those
  terms are left out (`jvp_rules.LEAVE_OUT_ZEROS`).
- `sliced_finiteness`: the test whether a step's gradients are finite converted an
  embedding's gradient (`tf.IndexedSlices`) to a dense `[vocab, dim]` tensor; now it
  reads the slices' values (`ops.all_finite`).
- `embedding_rows`: an embedding's gradient, preconditioned gradient, RMSProp step
  and grafted update were dense `[vocab, dim]` tensors; now they are its batch's
  rows (`keras_tkfac.row_sparse`, `ENABLED`).
- `unit_scale`: every layer's step was multiplied by the step's scale, also where
  that is the constant 1 (every control but the KL-clipping ones); now it is not
  (`row_sparse.dense_scaled`).
- `bfloat16`: the curvature matmuls in float32 ("before",
  `products_dtype="float32", precondition_dtype="float32"`) and in bfloat16 ("now":
  the quadratic model's tangent matmuls and the preconditioning products,
  `keras_tkfac.precision`); here the losses agree to bfloat16's rounding of those
  products, not to float32's. On hardware without bfloat16 units it measures the
  emulation's cost.
- `tiled_max_pool`: the products' tangent of a max pooling whose windows tile its
  input was TensorFlow's `MaxPoolGradGrad` for each direction; now it is the
  window's sum of the tangent times `MaxPoolGrad`'s routing mask, one mask for all
  directions (`jvp_rules.TILED_MAX_POOL`); the same tangents.
- `unrolled_forward_mode`: on the BiLSTM built with `unroll=True` (`--workloads=
  lstm`), the products through Keras's unrolled loops took reverse-over-reverse mode
  (forward mode failed there); now forward mode runs them
  (`keras_tkfac.rnn_tangents._unrolled`).
- `auto_precision`: the same, "now" being `"auto"` (the default since 2026-12-06:
  bfloat16 for dense layers' matmuls of widths of at least 128 where the machine has
  bfloat16 units, float32 elsewhere; the same as "before" on a machine without).
- `location_stride`: convolutions' statistics from every location ("before",
  `conv_location_stride=1`, the default) and from every second one per spatial axis
  ("now", `conv_location_stride=2`, its rows gathered at each example's grid with
  one `tf.gather` since 2026-12-06); statistics differ, so the losses do too.

Bounds, not changes (2026-12-06): "now" leaves a piece of the step's work out, so
its steps are not the optimizer's and their losses differ; only the time counts, as
the most that making the piece cheaper could save:

- `bound_elementwise`: the monitor's per-layer norms (`monitor.record_update`) and
  the graft's rescaling (`step_ops.graft`) left out.
- `bound_one_direction`: the quadratic model's products along the preconditioned
  direction only (`products.Batch.gram` of one direction; the previous step's
  entries copied from it): one tangent per op instead of two.
- `bound_split_directions`: the two directions in two forward-mode passes of one
  direction each instead of one nested pass (the previous step's pass depends on
  no gradient of the step, so it may run beside the backward pass; the cross term
  is copied, not computed).

It builds each workload of `tools/suite.py` twice in one process from the same
initial weights, one traced each way, and then, round after round, times `--steps`
training steps of each in turn (alternating which goes first), so that the
machine's load slows both alike. It prints each workload's median time of
`--steps` steps, the ratio (now / before) and the last losses, which agree up to
rounding.

    python tools/step_variants.py --variant=zero_tangents [--workloads=convnet,mlp]
        [--rounds=10] [--steps=10] [--smoke]
"""

import sys
import time

from absl import app
from absl import flags
import numpy as np
import keras
import tensorflow as tf

import benchlib
import keras_tkfac
import suite
from keras_tkfac import jvp_rules
from keras_tkfac import monitor
from keras_tkfac import ops, step_ops
from keras_tkfac import products
from keras_tkfac import row_sparse

_VARIANT = flags.DEFINE_enum("variant", "zero_tangents",
                             ["zero_tangents", "sliced_finiteness", "embedding_rows",
                              "unit_scale", "bfloat16", "auto_precision",
                              "location_stride",
                              "tiled_max_pool", "unrolled_forward_mode",
                              "bound_elementwise", "bound_one_direction",
                              "bound_split_directions"],
                             "The change measured (module docstring).")
_ROUNDS = flags.DEFINE_integer("rounds", 10, "Timed rounds per configuration.")
_STEPS = flags.DEFINE_integer("steps", 10, "Training steps per timed round.")
# `--smoke` and `--workloads` are suite.py's flags (smoke: its tiny workloads; here
# two rounds of two steps).
_SMOKE = suite._SMOKE  # pylint: disable=protected-access


def _steps(model, iterator, count):
    logs = None
    for _ in range(count):
        logs = model.train_function(iterator)
    return float(logs["loss"])  # (waits for the steps)


def _dense_all_finite(tensors):
    """`ops.all_finite` as it was: every gradient converted to a dense tensor."""
    return tf.reduce_all([tf.reduce_all(tf.math.is_finite(tf.convert_to_tensor(t)))
                          for t in tensors])


def _set(variant, now):
    """Puts the code read while the step is traced as it is (`now`) or was (for a
    bound: with its piece left out (`now`) or as it is)."""
    if variant in ("bfloat16", "auto_precision"):
        return  # (an optimizer argument: `_arguments`)
    if variant.startswith("bound_"):
        monitor.record_update, step_ops.graft, products.Batch.gram = (
            _BOUNDS[variant] if now else _AS_IT_IS)
        return
    if variant == "zero_tangents":
        jvp_rules.LEAVE_OUT_ZEROS = now
    elif variant == "sliced_finiteness":
        ops.all_finite = _ALL_FINITE if now else _dense_all_finite
    elif variant == "embedding_rows":
        row_sparse.ENABLED = now
    elif variant == "tiled_max_pool":
        jvp_rules.TILED_MAX_POOL = now
    elif variant == "unrolled_forward_mode":
        products._forward_mode = _FORWARD_MODE if now else _failing_forward_mode
    else:
        row_sparse.dense_scaled = _DENSE_SCALED if now else (
            lambda x, factor: factor * row_sparse.dense(x))


_ALL_FINITE = ops.all_finite
_FORWARD_MODE = products._forward_mode  # pylint: disable=protected-access
_AS_IT_IS = (monitor.record_update, step_ops.graft, products.Batch.gram)


def _gram_2x2(along_update, along_previous):
    """A positive definite 2 x 2 Gram from one entry per direction (the bounds')."""
    return tf.stack([tf.stack([along_update, 0.1 * along_previous]),
                     tf.stack([0.1 * along_previous, along_previous])])


def _one_direction(batch, variables, directions):
    along = _AS_IT_IS[2](batch, variables, directions[:1])[0, 0]
    return _gram_2x2(along, along)


def _split_directions(batch, variables, directions):
    previous = _AS_IT_IS[2](batch, variables, directions[1:])[0, 0]
    return _gram_2x2(_AS_IT_IS[2](batch, variables, directions[:1])[0, 0], previous)


_BOUNDS = {
    "bound_elementwise": (lambda *args, **kwargs: None, lambda update, norm: update,
                          _AS_IT_IS[2]),
    "bound_one_direction": (*_AS_IT_IS[:2], _one_direction),
    "bound_split_directions": (*_AS_IT_IS[:2], _split_directions),
}


def _failing_forward_mode(*args, **kwargs):
    """Forward mode as it failed through Keras's unrolled loops (the products then
    take reverse-over-reverse mode)."""
    del args, kwargs
    raise ValueError("forward mode through an unrolled loop (before 2026-12-06)")
_DENSE_SCALED = row_sparse.dense_scaled


def _arguments(variant, now):
    """`TKFAC`'s arguments for `variant` as it is (`now`) or was."""
    if variant == "location_stride":
        return {"conv_location_stride": 2 if now else 1}
    if variant not in ("bfloat16", "auto_precision"):
        return {}
    dtype = ("bfloat16" if variant == "bfloat16" else "auto") if now else "float32"
    return {"products_dtype": dtype, "precondition_dtype": dtype}


def _build(workload, variant, now, warmup):
    keras.utils.set_random_seed(0)
    model = keras_tkfac.wrap(workload.build())
    model.compile(optimizer=keras_tkfac.TKFAC(seed=0, **_arguments(variant, now)),
                  loss=workload.loss)
    _set(variant, now)
    try:
        model.make_train_function()
        iterator = iter(benchlib.batches(workload.train, workload.batch_size, 0))
        _steps(model, iterator, warmup)  # (traced here)
    finally:
        _set(variant, not variant.startswith("bound_"))  # (the code as it is)
    return model, iterator


def main(argv):
    del argv
    rows = []
    rounds, steps = (2, 2) if _SMOKE.value else (_ROUNDS.value, _STEPS.value)
    for name in flags.FLAGS.workloads:
        unrolled = _VARIANT.value == "unrolled_forward_mode" and name == "lstm"
        workload = getattr(suite, name)(_SMOKE.value, 0,
                                        **({"unroll": True} if unrolled else {}))
        built = {flag: _build(workload, _VARIANT.value, flag, steps)
                 for flag in (False, True)}
        seconds = {False: [], True: []}
        losses = {}
        for r in range(rounds):
            for flag in (False, True) if r % 2 == 0 else (True, False):
                start = time.perf_counter()
                losses[flag] = _steps(*built[flag], steps)
                seconds[flag].append(time.perf_counter() - start)
        before, now = (1e3 * np.median(seconds[f]) for f in (False, True))
        rows.append((name, before, now, now / before, losses[False], losses[True]))
        print("%s: %.1f -> %.1f ms" % (name, before, now), file=sys.stderr)
    print("`%s`, %d rounds:\n" % (_VARIANT.value, rounds))
    print("| workload | %d steps before (ms) | now (ms) | ratio | last loss before | "
          "now |" % steps)
    print("|---|---:|---:|---:|---:|---:|")
    for name, before, now, ratio, a, b in rows:
        print("| %s | %.1f | %.1f | %.3f | %.6g | %.6g |" % (
            name, before, now, ratio, a, b))
    print("geometric mean ratio %.3f" % np.exp(np.mean([np.log(r[3]) for r in rows])))


if __name__ == "__main__":
    app.run(main)
