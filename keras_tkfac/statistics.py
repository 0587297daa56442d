"""The curvature optimizers' statistics step and inverse step.

On a statistics step (`cadence.statistics_due`) `update` draws labels from the
model's predictive distribution (`fisher.output_cotangents`; the real labels with
`fisher="empirical"`), backpropagates that loss to every recorded layer output
(the tape of the step's own forward pass), forms each covered layer's batch
statistics (the subclass's `_statistics`: TKFAC's trace-normalised factors and
trace, KFAC's factors; an optimizer whose `_sequence_statistics` is true, TKFAC at
`sequence_statistics="exact"`, gets a call on sequences as `[sequences, positions,
...]`, `capture.Recording.rows`), sums them over the replicas with one all-reduce, and folds
their mean over all examples into the moving averages (`factor_decay`). A batch
whose statistics or loss are not finite on any replica is not folded in
(`skipped_statistics` counts it). On an inverse step (`cadence.inverse_due`)
`update_inverses` recomputes the damped factors' inverses (`inverses.invert_all`).
Both assign the optimizer's variables through `distributed.cond_assign`, so a step
where they are not due copies nothing.
"""

import keras
import tensorflow as tf

from keras_tkfac import cadence
from keras_tkfac import capture
from keras_tkfac import damping as damping_lib
from keras_tkfac import distributed
from keras_tkfac import fisher as fisher_lib
from keras_tkfac import inverses as inverses_lib
from keras_tkfac import keras_compat


def build(optimizer):
    """Adds the statistics' and inverses' state to the optimizer (after its
    `_slots`): `_factor_weight`, per layer the weight of the moving averages (bias
    correction; a layer not called on a statistics step keeps its averages and
    weight), the counters `inverse_failures` and `skipped_statistics`, and
    `sampler_seed`, the label sampler's seed (`seed`, drawn in the constructor when
    `None`) as a variable: a resumed run (`BackupAndRestore`, a weights file, a
    checkpoint) samples the labels the uninterrupted one would, where a seed drawn
    anew in the new process did not (found by a probe, 2026-12-04: final weights up
    to 0.13 apart)."""
    optimizer._factor_weight = optimizer.add_variable(
        (len(optimizer._slots),), initializer="zeros", name="factor_weight",
        dtype="float32", aggregation="only_first_replica")
    for name in ("inverse_failures", "skipped_statistics"):
        setattr(optimizer, name, optimizer.add_variable(
            (), initializer="zeros", dtype="int32", name=name,
            aggregation="only_first_replica"))
    optimizer.sampler_seed = optimizer.add_variable(
        (), initializer=tf.constant_initializer(optimizer.seed), dtype="int32",
        name="sampler_seed", aggregation="only_first_replica")


def takes_own_pass(model):
    """Whether `wrap`'s training step of `model`, being traced now, takes a
    non-persistent tape and gives the statistics a forward pass of their own
    (`update` with `tape=None`), on statistics steps only.

    A persistent tape lets TensorFlow expect gradients of gradients, so it wraps
    every `tf.while_loop` it records in a function call whose backward pass keeps
    more intermediates: an `LSTM(64)` over 40 steps, batch 32, took 6.6 ms a
    forward-and-backward pass under a persistent tape against 4.9 ms under a plain
    one, and the suite's BiLSTM's step with every weight on the partner 47 ms
    against 36 ms (Adam 33 ms; docs/RESULTS.md, "The step's tape"). Keras runs a
    recurrent layer's loop as a `tf.while_loop` on a CPU, so a model with one
    (`keras.layers.RNN`, inside `Bidirectional` too) takes the plain tape when
    traced without XLA and without cross-replica batch normalisation (whose
    forward pass cannot run inside the statistics' `tf.cond`); the extra forward
    pass costs one in `factor_update_freq` steps.
    """
    if (tf.executing_eagerly() or getattr(model, "jit_compile", False) is True
            or distributed.syncs_in_backward(model)):
        return False
    return any(isinstance(layer, keras.layers.RNN)
               for layer in model._flatten_layers(include_self=False, recursive=True))  # pylint: disable=protected-access


def _own_pass(forward, outputs, fisher, y_true, sample_weight, seed, scale):
    """The sampled-label backward pass from a forward pass of its own, on the step's
    weights and batch, from the model's non-trainable state before the step's
    forward pass (`forward.before`: the same dropout masks, batch normalisation's
    statistics of this batch), which is restored afterwards.

    Returns:
        `(grads, num_examples, recording)`: the gradients with respect to the new
        pass's recorded outputs, the example count and its `capture.Recording`.
    """
    model = forward.model
    state = keras_compat.state_variables(model)
    after = [tf.identity(v) for v in state]
    for variable, value in zip(state, forward.before):
        variable.assign(value)
    with tf.GradientTape() as tape:
        with capture.record(model) as recording:
            y_pred = forward()
        sources, cotangents, num_examples = fisher_lib.output_cotangents(
            outputs, fisher, y_true, y_pred, seed, sample_weight)
    for variable, value in zip(state, after):
        variable.assign(value)
    grads = tape.gradient(sources, recording.outputs(),
                          output_gradients=[c * tf.cast(scale, c.dtype)
                                            for c in cotangents])
    return grads, num_examples, recording


def update(optimizer, recording, tape, outputs, y_true, y_pred, sample_weight,
           loss_value, scale, forward=None):
    """Folds this batch's statistics into the moving averages when they are due.

    Args:
        optimizer: the `CurvatureOptimizer` (built, with slots).
        recording: the step's `capture.Recording`.
        tape: the persistent tape of the step's forward pass, or `None`: the
            sampled-label backward pass then takes a forward pass of its own
            (`takes_own_pass`), through `forward`.
        outputs: the `loss_specs.OutputLoss`es of the training loss.
        y_true, y_pred, sample_weight: as in `update_curvature`.
        loss_value: optional, the step's loss; no statistics where not finite.
        scale: the loss-scaling factor (1 without mixed precision): the sampled
            backward pass is scaled by it and the statistics unscaled.
        forward: a `products.ModelForward` with `before` set; needed where `tape`
            is `None`.
    """
    if tape is None and getattr(forward, "before", None) is None:
        raise ValueError(
            "update_curvature needs the persistent tape of the step's forward pass "
            "(or wrap's own ModelForward with the model's state before it). "
            f"Received: tape={tape!r}, forward={forward!r}")
    slots = optimizer._slots
    factor_vars = [v for slot in slots for v in slot.factors]
    factor_vars += [optimizer._factor_weight, optimizer.skipped_statistics]
    loss_ok = tf.constant(True) if loss_value is None else tf.reduce_all(
        tf.math.is_finite(loss_value))

    def sampled_grads():
        step = tf.cast(optimizer.iterations, tf.int32)
        seed = tf.stack([optimizer.sampler_seed.value + distributed.replica_id(),
                         step])
        if tape is None:
            return _own_pass(forward, outputs, optimizer.fisher, y_true,
                             sample_weight, seed, scale)
        sources, cotangents, num_examples = fisher_lib.output_cotangents(
            outputs, optimizer.fisher, y_true, y_pred, seed, sample_weight
        )
        grads = tape.gradient(
            sources, recording.outputs(),
            output_gradients=[c * tf.cast(scale, c.dtype) for c in cotangents],
        )
        return grads, num_examples, recording

    # A backward pass that all-reduces (synchronized BatchNormalization under a
    # strategy) cannot run inside the statistics' `tf.cond`: it runs every step.
    ahead = (sampled_grads() if distributed.syncs_in_backward(recording.owner)
             else None)

    def new_factors():
        step = tf.cast(optimizer.iterations, tf.int32)
        grads, num_examples, recorded = (
            ahead if ahead is not None else sampled_grads())
        wanted = {id(slot.block.layer) for slot in slots}
        # Sampled conv locations: the grid moves on at each statistics step.
        phase = step // optimizer.factor_update_freq
        rows = dict(zip([id(b.layer) for b in recorded.blocks],
                        recorded.rows(grads, wanted, optimizer.conv_location_stride,
                                      phase, getattr(optimizer, "_sequence_statistics",
                                                     False),
                                      norms=getattr(optimizer, "_uses_row_norms", False),
                                      location_replica=distributed.replica_id())))
        # Sums over this replica's examples; one SUM all-reduce and a division
        # by the global count give the mean over all examples of all replicas.
        count = tf.cast(num_examples, tf.float32)
        batch, called = [], []
        for slot in slots:
            pair = rows.get(id(slot.block.layer))
            called.append(pair is not None)
            if pair is None:
                batch.extend(tf.zeros_like(v) for v in slot.factors)
                continue
            a, g = pair[:2]
            a_norms = pair[2] if len(pair) > 2 else None  # (TKFAC's `_uses_row_norms`)
            if a.dtype.is_floating or slot.block.input_kind != "diagonal":
                a = tf.cast(a, tf.float32)  # integer ids of an Embedding stay
            g = tf.cast(g, tf.float32) / scale
            found = optimizer._statistics(slot.block, a, g, num_examples, a_norms)
            batch.extend(s * count for s in found)
        bad = tf.cast(tf.logical_not(loss_ok), tf.float32)
        *batch, count, bad = distributed.all_reduce("sum", batch + [count, bad])
        # An empty global batch (count 0) has no statistics to fold in.
        finite = tf.logical_and(
            tf.logical_and(tf.equal(bad, 0.0), count > 0.0),
            tf.reduce_all([tf.reduce_all(tf.math.is_finite(b)) for b in batch]),
        )
        decay = optimizer.factor_decay
        old = [v.value for v in factor_vars]
        new = [decay * v + (1.0 - decay) * stat / count
               for v, stat in zip(old, batch)]
        position = 0
        for slot, was_called in zip(slots, called):
            if not was_called:
                new[position:position + len(slot.factors)] = old[
                    position:position + len(slot.factors)]
            position += len(slot.factors)
        weight = old[-2]
        new.append(tf.where(called, decay * weight + (1.0 - decay), weight))
        kept = [tf.where(finite, n, o) for n, o in zip(new, old)]
        return kept + [old[-1] + tf.cast(tf.logical_not(finite), tf.int32)]

    distributed.cond_assign(
        cadence.statistics_due(optimizer.iterations, optimizer.factor_update_freq),
        factor_vars, new_factors,
    )


def update_inverses(optimizer):
    """Recomputes the damped factors' inverses when they are due."""
    inverse_vars = [v for slot in optimizer._slots for v in slot.inverses]
    inverse_vars.append(optimizer.inverse_failures)
    distributed.cond_assign(
        cadence.inverse_due(optimizer.iterations, optimizer.factor_update_freq,
                            optimizer.inverse_update_freq, optimizer.inverse_warmup),
        inverse_vars, lambda: new_inverses(optimizer),
    )


def new_inverses(optimizer):
    """The inverses of every slot's damped factors at the current damping, and the
    failure count (an inverse that fails keeps its previous value)."""
    damping = damping_lib.current(optimizer)
    targets, matrices = [], []
    for i, slot in enumerate(optimizer._slots):
        weight = optimizer._factor_weight[i]
        factors = [tf.math.divide_no_nan(f, weight) for f in slot.factors]
        left, right = optimizer._damped_factors(slot.block, factors, damping)
        targets.extend(slot.inverses)
        matrices.extend((left, right))
    split = optimizer.split_inverses and distributed.is_distributed()
    new_values, failures = inverses_lib.invert_all(
        matrices, [t.value for t in targets], optimizer.inverse_dtype, split)
    return new_values + [optimizer.inverse_failures + tf.cast(failures, tf.int32)]
