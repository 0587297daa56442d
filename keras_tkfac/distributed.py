"""Everything that knows about `tf.distribute` replicas lives here.

Under a strategy each replica computes the statistics of its local batch; one batched
all-reduce makes them identical on every replica, so factors, inverses and therefore
preconditioned gradients agree everywhere. Gradients are SUM-all-reduced once, before
preconditioning (Keras divides each replica's loss by the number of replicas, so the
sum is the global mean gradient), and the KL-clipping inner product is then global.
Inverses can be split across replicas: each inverts its share and one all-reduce
shares the results.

Statistics and inverses are only computed on some steps, inside a `tf.cond`.
`ReplicaContext.all_reduce` uses `merge_call`, which is not allowed inside a `tf.cond`
branch; TensorFlow's collective all-reduce (`CollectiveAllReduce`, the implementation
behind MultiWorkerMirroredStrategy and MirroredStrategy under XLA) launches collective
ops from each replica without `merge_call` and works inside `tf.cond`, since every
replica takes the same branch. We use the strategy's own instance (so its collective
keys stay in one sequence with Keras's gradient all-reduce); this is the one place that
touches TensorFlow internals.

TensorFlow caches collective instances by key for the life of the process and every
`MirroredStrategy` starts its keys at the same value, so a second MirroredStrategy on
CPUs in one process fails even with stock Keras optimizers ("Shape mismatch in the
collective instance"): create one strategy per process.
"""

import tensorflow as tf
import keras


def num_replicas():
    return tf.distribute.get_strategy().num_replicas_in_sync


def unscale_loss(loss):
    """Undoes Keras's division of the loss by the number of replicas."""
    replicas = num_replicas()
    return loss if replicas == 1 else loss * tf.cast(replicas, loss.dtype)


def _replica_context():
    """The replica context when more than one replica is in sync, else `None`."""
    if not tf.distribute.has_strategy():
        return None
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return None
    return context


def is_distributed():
    """True in the replica context of a strategy with several replicas."""
    return _replica_context() is not None


def merges_updates():
    """True under any strategy but the default one, one replica included: Keras's
    variable updates then go through `merge_call`, which a `tf.cond` branch cannot
    hold (a one-device `MirroredStrategy()`, as keras-io's examples build on a
    machine with one GPU or none)."""
    return tf.distribute.has_strategy()


def _collective_ops(strategy):
    """The strategy's `CollectiveAllReduce` instance, or `None`."""
    extended = strategy.extended
    for name in ("_collective_ops", "_cross_device_ops"):
        ops = getattr(extended, name, None)
        if type(ops).__name__ == "CollectiveAllReduce":
            return ops
    return None


def all_reduce(reduce_op, tensors):
    """All-reduces a list of tensors across replicas, safely inside `tf.cond`.

    Args:
        reduce_op: `"sum"` or `"mean"`.
        tensors: a list of tensors.

    Returns:
        The reduced list (the input itself with one replica).
    """
    context = _replica_context()
    if context is None:
        return list(tensors)
    op = {"sum": tf.distribute.ReduceOp.SUM, "mean": tf.distribute.ReduceOp.MEAN}[
        reduce_op
    ]
    collective = _collective_ops(tf.distribute.get_strategy())
    if collective is None:
        return list(context.all_reduce(op, list(tensors)))
    return list(
        collective._all_reduce(
            op,
            list(tensors),
            context._replica_id,
            tf.distribute.experimental.CommunicationOptions(),
        )
    )


def replica_id():
    """This replica's index as an int32 tensor (0 without a strategy)."""
    context = tf.distribute.get_replica_context()
    if context is None:
        return tf.constant(0, tf.int32)
    return tf.cast(context.replica_id_in_sync_group, tf.int32)


def replica_index():
    """This replica's index as a Python int (0 without a strategy)."""
    context = _replica_context()
    if context is None:
        return 0
    return int(tf.get_static_value(context.replica_id_in_sync_group))


def split_work(costs, replicas):
    """Assigns items to replicas, greedily balancing the summed cost.

    Args:
        costs: a list of non-negative costs, one per item.
        replicas: the number of replicas.

    Returns:
        A list with the replica index of each item. Deterministic, so every replica
        computes the same assignment.
    """
    loads = [0.0] * replicas
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        target = min(range(replicas), key=lambda r: (loads[r], r))
        owner[i] = target
        loads[target] += costs[i]
    return owner


def syncs_in_backward(model):
    """Whether `model`'s backward pass all-reduces across replicas: a
    `BatchNormalization(synchronized=True)` under a strategy. Such a pass cannot run
    inside a `tf.cond` branch (`merge_call`)."""
    if model is None or not is_distributed():
        return False
    return any(
        isinstance(layer, keras.layers.BatchNormalization)
        and getattr(layer, "synchronized", False)
        for layer in model._flatten_layers(include_self=False, recursive=True)
    )


def cond_assign(pred, variables, compute):
    """Assigns `compute()` to `variables` when `pred` holds.

    Without a strategy the assignment happens inside the `tf.cond` branch, so no copy
    is made on steps where `pred` is false. Under a strategy, assigning mirrored
    variables inside a `tf.cond` branch is not allowed (`merge_call`), so the branch
    only computes and the assignment happens outside.
    """
    if not merges_updates():

        def assign():
            for variable, value in zip(variables, compute()):
                variable.assign(tf.cast(value, variable.dtype))
            return tf.constant(True)

        tf.cond(pred, assign, lambda: tf.constant(False))
        return
    values = tf.cond(pred, compute, lambda: [tf.identity(v.value) for v in variables])
    for variable, value in zip(variables, values):
        variable.assign(tf.cast(value, variable.dtype))
