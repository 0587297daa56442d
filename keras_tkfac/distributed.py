"""Everything that knows about `tf.distribute` replicas lives here.

Under a strategy each replica computes the statistics of its local batch; one batched
MEAN all-reduce makes them identical on every replica, so that factors, inverses and
therefore preconditioned gradients agree everywhere. Keras divides the loss by the
number of replicas; `unscale_loss` undoes it for reporting.
"""

import tensorflow as tf


def num_replicas():
    return tf.distribute.get_strategy().num_replicas_in_sync


def unscale_loss(loss):
    """Undoes Keras's division of the loss by the number of replicas."""
    replicas = num_replicas()
    return loss if replicas == 1 else loss * tf.cast(replicas, loss.dtype)


def _replica_context():
    if not tf.distribute.has_strategy():
        return None
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return None
    return context


def mean_all_reduce(tensors):
    """MEAN all-reduce of a list of tensors across replicas (identity on one)."""
    context = _replica_context()
    if context is None:
        return tensors
    return context.all_reduce(tf.distribute.ReduceOp.MEAN, tensors)


def sum_all_reduce(tensor):
    """SUM all-reduce of one tensor across replicas (identity on one)."""
    context = _replica_context()
    if context is None:
        return tensor
    return context.all_reduce(tf.distribute.ReduceOp.SUM, tensor)


def replica_id():
    """This replica's index as an int32 tensor (0 without a strategy)."""
    context = tf.distribute.get_replica_context()
    if context is None:
        return tf.constant(0, tf.int32)
    return tf.cast(context.replica_id_in_sync_group, tf.int32)


def cond_assign(pred, variables, compute):
    """Assigns `compute()` to `variables` when `pred` holds.

    Without a strategy the assignment happens inside the `tf.cond` branch, so no copy
    is made on steps where `pred` is false. Under a strategy, assigning mirrored
    variables inside a `tf.cond` branch is not allowed (`merge_call`), so the branch
    only computes and the assignment happens outside.
    """
    if not tf.distribute.has_strategy():

        def assign():
            for variable, value in zip(variables, compute()):
                variable.assign(tf.cast(value, variable.dtype))
            return tf.constant(True)

        tf.cond(pred, assign, lambda: tf.constant(False))
        return
    values = tf.cond(pred, compute, lambda: [v.value for v in variables])
    for variable, value in zip(variables, values):
        variable.assign(tf.cast(value, variable.dtype))
