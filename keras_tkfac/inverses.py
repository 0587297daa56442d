"""The damped factors' inverses: batched by shape, split across replicas.

All factors of one shape are inverted in one batched call (`ops.symmetric_inverse`, in
`inverse_dtype`); under a strategy with `split=True` each replica inverts its
share of the factors, balanced by the `d^3` cost model, and one SUM all-reduce
gives every replica all of them. An inverse that fails (a non-finite or
non-positive-definite factor) keeps the previous value and counts as a failure.
"""

import collections

import numpy as np
import tensorflow as tf

from keras_tkfac import distributed
from keras_tkfac import low_rank
from keras_tkfac import ops

INVERSE_DTYPES = ("float32", "float64")


def _inverse(matrices, dtype):
    inverses, ok = ops.symmetric_inverse(tf.cast(matrices, dtype))
    return tf.cast(inverses, tf.float32), ok


_jit_inverse = tf.function(_inverse, jit_compile=True, reduce_retracing=True)


def _low_rank(matrices, previous, dtype):
    """`low_rank.low_rank_inverse` in `dtype` (`inverse_rank`), float32 results."""
    packed, ok = low_rank.low_rank_inverse(tf.cast(matrices, dtype),
                                           tf.cast(previous, dtype))
    return tf.cast(packed, tf.float32), ok


def inverse_for_device():
    """XLA-compiled inversion on accelerators, TensorFlow's kernels on CPU.

    Measured on 2 CPU cores (TF 2.21), Cholesky inverses under XLA are 3-10x slower
    than TensorFlow's CPU kernels (785x785: 64 ms vs 18 ms) and cost 1-2 s of
    compilation per shape, so XLA is used only where a GPU or TPU is present.
    """
    accelerators = tf.config.list_logical_devices("GPU")
    accelerators += tf.config.list_logical_devices("TPU")
    return _jit_inverse if accelerators else _inverse


def inverse_cost(matrix):
    """Flops model of inverting `matrix` (`d^3` per group; a diagonal costs `d`;
    a rank-`k` inverse, about `2 low_rank.LOW_RANK_ITERATIONS d^2 k`, counts as `d^3`:
    the split balances the replicas' shares only roughly then)."""
    d = int(matrix.shape[-1])
    if matrix.shape.rank == 1:
        return d
    groups = int(np.prod(matrix.shape[:-2]))
    return groups * d**3


def invert_all(matrices, previous, dtype, split):
    """Inverses of the damped factors `matrices` (vectors stand for diagonals).

    Args:
        matrices: the damped factors, `[d, d]`, `[groups, d, d]` or `[d]`.
        previous: the current inverses, kept where an inversion fails.
        dtype: `"float32"` or `"float64"`, the precision of the inversion.
        split: whether each replica inverts only its share (under a strategy).

    Returns:
        `(inverses, failures)`: one inverse per matrix (float32) and the number of
        factors whose inversion failed (a float scalar; one per factor, whatever
        its number of groups).
    """
    replicas = distributed.num_replicas() if split else 1
    owner = distributed.split_work([inverse_cost(m) for m in matrices], replicas)
    mine = distributed.replica_index() if split else 0
    by_shape = collections.defaultdict(list)
    for i, matrix in enumerate(matrices):
        if owner[i] == mine:
            by_shape[(tuple(matrix.shape), tuple(previous[i].shape))].append(i)
    # The others' entries stay zero, so that one SUM all-reduce gives all.
    new_values = [tf.zeros_like(p) for p in previous]
    failures = tf.constant(0.0)
    invert = inverse_for_device()
    for (shape, target), indices in by_shape.items():
        stacked = tf.stack([matrices[i] for i in indices])
        if len(shape) == 1:
            inverses, ok = ops.diagonal_inverse(stacked)
        elif target != shape:
            inverses, ok = _low_rank(stacked, tf.stack([previous[i] for i in indices]),
                                     dtype)
        else:
            inverses, ok = invert(stacked, dtype)
        ok = tf.reshape(ok, [len(indices), -1])
        for i, inverse, fine in zip(indices, tf.unstack(inverses), tf.unstack(ok)):
            new_values[i] = tf.where(tf.reduce_all(fine), inverse, previous[i])
        failures += tf.reduce_sum(
            tf.cast(tf.logical_not(tf.reduce_all(ok, axis=1)), tf.float32)
        )
    if split:
        *new_values, failures = distributed.all_reduce("sum", new_values + [failures])
    return new_values, failures
