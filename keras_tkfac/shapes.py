"""Shapes of a curvature block's factors, inverses and gradient matrix, and the
optimizer's per-block state made from them (`build_slots`)."""

import collections

from absl import logging
import tensorflow as tf

from keras_tkfac import blocks as blocks_lib
from keras_tkfac import low_rank
from keras_tkfac import precision

# A preconditioned block's state: its variables' keys, factors and inverses.
Slot = collections.namedtuple("Slot", ["block", "keys", "factors", "inverses"])


def identity(shape, dtype=None):
    """Initial inverses: identity matrices, or ones for a diagonal."""
    if len(shape) == 1:
        return tf.ones(shape, dtype=dtype)
    return tf.eye(shape[-1], batch_shape=shape[:-2], dtype=dtype)


def inverse_spec(shape, rank):
    """`(shape, initializer)` of the inverse of a factor of `shape`: the factor's,
    from the identity; with `rank` (`inverse_rank`, for layers other than
    convolutions) and a matrix factor of more than `2 rank` dimensions,
    `low_rank.low_rank_inverse`'s packed form of the identity."""
    if rank is not None and len(shape) >= 2 and shape[-1] > 2 * rank:
        return low_rank.low_rank_shape(shape, rank), low_rank.low_rank_identity
    return shape, identity


def group_shape(block):
    return (block.groups,) if block.groups > 1 else ()


def input_factor_shape(block):
    if block.input_kind == "diagonal":
        return (block.d_in,)
    return group_shape(block) + (block.d_in, block.d_in)


def output_factor_shape(block):
    return group_shape(block) + (block.d_out, block.d_out)


def grad_matrix_shape(block):
    """The shape of `block.grad_matrix`: the block's variables' gradients stacked."""
    zeros = [tf.zeros(v.shape) for v in block.variables]
    return tuple(block.grad_matrix(*zeros).shape)


def matmul_widths(block):
    """`(d_in, d_out)` of a dense (or einsum-dense) layer, whose preconditioning is
    a matmul of those widths (`precision.choose` gates bfloat16 on them); `None`
    for other blocks (convolutions, embeddings, normalisation, recurrent)."""
    if (isinstance(block, blocks_lib.DenseBlock) and block.input_kind == "dense"
            and block.groups == 1):
        return block.d_in, block.d_out
    return None


def precondition_dtypes(setting, blocks):
    """The dtype of each block's preconditioning products under `precondition_dtype`
    `setting` (`precision.policy`; `"auto"` gates on `matmul_widths`)."""
    rule = precision.policy(setting)
    return [precision.choose(rule, matmul_widths(block)) for block in blocks]


def matrix_factor_dims(block):
    """The dimensions of `block`'s factors that are kept as dense matrices.

    A diagonal input factor (an `Embedding`'s `[vocab]` vector) costs `d` floats and
    `d` flops to invert, so its dimension does not count against `max_factor_dim`.
    """
    dims = [block.d_out]
    if block.input_kind != "diagonal":
        dims.append(block.d_in)
    return dims


def factor_trace(factor):
    """The trace; of a diagonal vector, its sum; of a `[G, d, d]` batch, the total."""
    if factor.shape.rank == 1:
        return tf.reduce_sum(factor)
    return tf.reduce_sum(tf.linalg.trace(factor))


def preconditionable(blocks, var_key, keys, max_factor_dim):
    """`(block, its variables' keys)` for the `blocks` whose variables are all in
    `keys` (those being trained) and whose factors are at most `max_factor_dim`
    wide; the others are logged and left to the first-order fallback.

    A block whose layer was never built has no variables (a sub-layer that its
    parent calls only for some input shapes, as keras-io's gated residual network's
    projection): nothing of it is trained, so it is left out.
    """
    found = []
    for block in blocks:
        if not getattr(block.layer, "built", True):
            continue
        block_keys = [var_key(v) for v in block.variables]
        if block_keys[0] not in keys:
            continue
        if max(matrix_factor_dims(block)) > max_factor_dim:
            logging.warning(
                "keras_tkfac: layer %r has factors of dimension %d x %d, more "
                "than max_factor_dim=%d; it takes the first-order fallback.",
                block.name, block.d_in, block.d_out, max_factor_dim)
        elif any(key not in keys for key in block_keys[1:]):
            logging.warning(
                "keras_tkfac: layer %r has a non-trainable bias or recurrent "
                "kernel; it is not preconditioned.", block.name)
        else:
            found.append((block, block_keys))
    return found


def build_slots(optimizer, keys):
    """`(slots, covered keys)`: a `Slot` per block of `optimizer` that
    `preconditionable` keeps, its factors (zeros, `optimizer._factor_specs`) and
    inverses (identity) made as the optimizer's variables."""
    slots, covered = [], set()
    for block, block_keys in preconditionable(
            optimizer._blocks, optimizer._var_key, keys, optimizer.max_factor_dim):
        covered.update(block_keys)
        factors = [
            optimizer.add_variable(
                shape, initializer="zeros", name=f"{block.name}_{factor_name}",
                dtype="float32", aggregation="only_first_replica")
            for factor_name, shape in optimizer._factor_specs(block)]
        # Convolutions' trace-relative damping leaves their factors' spectra spread
        # (`tools/spectra.py`): their inverses stay exact.
        rank = None if block.is_conv else optimizer.inverse_rank
        inverses = [
            optimizer.add_variable(
                *inverse_spec(shape, rank), dtype="float32",
                name=f"{block.name}_{side}_inv", aggregation="only_first_replica")
            for side, shape in (("left", input_factor_shape(block)),
                                ("right", output_factor_shape(block)))]
        slots.append(Slot(block, tuple(block_keys), factors, inverses))
    return slots, covered
