"""Workarounds for Keras's `fit` under MultiWorkerMirroredStrategy, in one place.

Keras 3.15's `fit` fails under `tf.distribute.MultiWorkerMirroredStrategy` for every
optimizer, in two ways:

1. Before the first step it builds the model from the first batch, averaging the
   per-replica batch with an eager `strategy.reduce`, which a multi-worker strategy
   cannot do ("Attempt to convert a value (PerReplica...)").
   `MultiWorkerFitMixin._maybe_symbolic_build` lets Keras try and, only on that error,
   builds from the first local replica's batch (only shapes and dtypes matter).
2. After each step it reduces every logged value with `strategy.reduce("MEAN", v,
   axis=0)`, which fails for the scalar loss and metrics ("Invalid reduction dimension
   0 for input with 0 dimensions"). `multi_worker_logs` gives scalars a leading axis of
   one under a multi-worker strategy only; Keras's reduction over that axis is then the
   mean over replicas, a scalar, as on one worker.

Without a multi-worker strategy, or when Keras succeeds, this module changes nothing.
`CurvatureModel` mixes in `MultiWorkerFitMixin` and passes its logs through
`multi_worker_logs`.
"""

import tensorflow as tf


def _first_local_value(value):
    if isinstance(value, tf.distribute.DistributedValues):
        return tf.distribute.get_strategy().experimental_local_results(value)[0]
    return value


def is_multi_worker(strategy):
    """True for a `MultiWorkerMirroredStrategy` that spans several workers."""
    extended = strategy.extended
    in_multi_worker_mode = getattr(extended, "_in_multi_worker_mode", None)
    return (
        isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
        and in_multi_worker_mode is not None
        and in_multi_worker_mode()
    )


def multi_worker_logs(logs):
    """Gives scalar logs a leading axis of one under a multi-worker strategy."""
    if not is_multi_worker(tf.distribute.get_strategy()):
        return logs
    return tf.nest.map_structure(
        lambda v: tf.reshape(v, [1]) if v.shape.rank == 0 else v, logs
    )


def first_batch(iterator):
    """The first batch of Keras's TensorFlow epoch iterator, which yields `(begin,
    end, iterator)` (Keras 3.15), `(step, iterator)` (3.10), or the latter only
    through `enumerate_epoch()` (3.5); until 2026-12-07 only the first was read, and
    multi-worker `fit` raised `ValueError` on Keras 3.10."""
    epoch = iterator if hasattr(iterator, "__iter__") else iterator.enumerate_epoch()
    for item in epoch:
        return next(item[-1])
    raise ValueError("keras_tkfac: the training data gave no batch to build the "
                     "model from.")


class MultiWorkerFitMixin:
    """Overrides of `keras.Model` internals that fail under multi-worker training."""

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras builds the model from the first batch and, under a strategy, first
        # averages the per-replica batch with an eager `strategy.reduce`, which
        # MultiWorkerMirroredStrategy cannot do (it needs collectives inside a
        # function). Only the batch's shapes and dtypes matter: use the first local
        # replica's batch.
        try:
            return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)
        except ValueError as error:
            if iterator is None or "PerReplica" not in str(error):
                raise
        data_batch = first_batch(iterator)
        strategy = self.distribute_strategy
        with strategy.scope():
            data_batch = tf.nest.map_structure(_first_local_value, data_batch)
            return self._symbolic_build(data_batch=data_batch)


def state_variables(model):
    """The variables a forward pass of `model` may change, which the extra passes
    of a step (the statistics' own pass, the products' and loss passes) restore:
    its non-trainable variables, then the `states` of its stateful recurrent
    layers, which Keras creates untracked (`RNN._create_state_variables`), so
    they are not among the former. Until 2026-12-07 those extra passes advanced a
    stateful LSTM's state once more on the steps they ran (a probe: wrong state on
    steps 0, 5 and 10 of 12)."""
    found = list(model.non_trainable_variables)
    known = {id(v) for v in found}
    for layer in model._flatten_layers():  # pylint: disable=protected-access
        states = getattr(layer, "states", None)
        if not getattr(layer, "stateful", False) or states is None:
            continue
        for variable in tf.nest.flatten(states):
            if hasattr(variable, "assign") and id(variable) not in known:
                known.add(id(variable))
                found.append(variable)
    return found
