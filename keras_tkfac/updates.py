"""From a step's gradients to its variables' new values (`CurvatureOptimizer`).

- `build`: the update state of each trainable variable: the momentum of a
  preconditioned one (with `momentum > 0` or a quadratic step control, whose
  previous step is the model's second direction), the first-order partner's slots
  (`keras_tkfac.partner`) of one without a curvature block.
- `precondition`: the preconditioned step of every layer with a block
  (`ops.precondition_many`, batched across layers; the factored form where
  `keras_tkfac.factored` handed over the rows), scaled by the step control
  (`keras_tkfac.step_size`, `keras_tkfac.quadratic`) and split back into the
  layer's variables; the other variables' gradients pass unchanged.
- `update_variable`: one variable's update (what Keras's `update_step` does): weight
  decay, the momentum step at the step control's learning rate or the partner's
  step, each guarded by the step's finiteness where it is traced per variable.

The optimizer keeps the state (`_momentums`, `_partner_slots`, indexed like Keras's
variables); these functions read and assign it.
"""

import tensorflow as tf

from keras_tkfac import factored
from keras_tkfac import monitor
from keras_tkfac import ops
from keras_tkfac import quadratic
from keras_tkfac import row_sparse
from keras_tkfac import shapes
from keras_tkfac import step_size


def build(optimizer, var_list, covered):
    """Momentum of the preconditioned variables (keys `covered`), partner state of
    the others; logs the variables left to the partner."""
    optimizer._momentums = [None] * len(var_list)
    optimizer._partner_slots = [None] * len(var_list)
    fallback = []
    for variable in var_list:
        index = optimizer._get_variable_index(variable)
        if optimizer._var_key(variable) in covered:
            if optimizer.momentum > 0 or step_size.uses_products(optimizer.step_control):
                optimizer._momentums[index] = optimizer.add_variable_from_reference(
                    variable, "momentum")
            continue
        fallback.append(getattr(variable, "path", variable.name))
        optimizer._partner_slots[index] = [
            optimizer.add_variable_from_reference(variable, slot_name)
            for slot_name in optimizer._partner.slot_names()
        ]
    optimizer._partner.log_uncovered(fallback, len(var_list))


def precondition(optimizer, grads, variables, learning_rate):
    """`grads` with each covered layer's gradients replaced by its scaled
    preconditioned step (`variables` in the order of `grads`)."""
    position = {optimizer._var_key(v): i for i, v in enumerate(variables)}
    moments = step_size.uses_moments(optimizer.step_control)
    found = []
    for slot in optimizer._slots:
        indices = [position.get(key) for key in slot.keys]
        if None in indices:
            continue
        grad = factored.step_gradient(
            slot.block, [grads[i] for i in indices], slot.block.grad_matrix(
                *[tf.cast(grads[i], tf.float32) for i in indices]), moments)
        found.append((slot, indices, grad))
    if not found:
        return grads
    updates = optimizer._math(ops.precondition_many)(
        [slot.inverses[0].value for slot, *_ in found],
        [factored.gradient(
            optimizer._loss_rows.get(id(slot.block.layer)),
            factored.sparse_rows(slot.block, [grads[i] for i in indices], grad))
         for slot, indices, grad in found],
        [slot.inverses[1].value for slot, *_ in found],
        shapes.precondition_dtypes(optimizer.precondition_dtype,
                                   [slot.block for slot, *_ in found]))
    used = [(*item, update) for item, update in zip(found, updates)]
    if moments:
        used = step_size.graft_step(optimizer, used)
    if step_size.uses_products(optimizer.step_control):
        used, scale = quadratic.steps(optimizer, used, variables, learning_rate)
    else:
        scale = step_size.update_scale(
            optimizer.step_control, [u for *_, u in used], [g for *_, g, _ in used],
            learning_rate, optimizer.kl_clip)
    monitor.record_update(optimizer, used, scale)
    grads = list(grads)
    for slot, indices, _, update in used:
        parts = [p for p in slot.block.split_matrix(
            row_sparse.dense_scaled(update, scale)) if p is not None]
        for i, part in zip(indices, parts):
            grads[i] = tf.cast(part, grads[i].dtype)
    return grads


def update_variable(optimizer, gradient, variable, learning_rate):
    """Preconditioned variables: weight decay, `m` by `step_size.momentum_step`,
    `theta -= step_size.step_learning_rate(lr) * m`; others: the partner's step.
    Where `optimizer._step_is_finite` is a tensor (a strategy that merges updates),
    a non-finite step leaves the variable and its slots as they were."""
    ok = optimizer._step_is_finite  # `None`: the step is known to be finite
    gradient = tf.cast(gradient, variable.dtype)
    if ok is not None:
        gradient = tf.where(ok, gradient, 0.0)
    index = optimizer._get_variable_index(variable)
    partner_slots = optimizer._partner_slots[index]
    if partner_slots is None:
        momentum = optimizer._momentums[index]
        slots = [] if momentum is None else [momentum]
        step = step_size.momentum_step(optimizer.step_control, optimizer.momentum,
                                       momentum, gradient)
        new_slots = [step] if momentum is not None else []
        decay_rate = learning_rate  # AdamW's, not the model step's fraction
        learning_rate = step_size.step_learning_rate(optimizer.step_control,
                                                     learning_rate)
        coefficient = (optimizer.weight_decay if optimizer.weight_decay
                       and optimizer._use_weight_decay(variable) else 0.0)
    else:
        slots = partner_slots
        learning_rate, step, new_slots, coefficient = optimizer._partner.update(
            optimizer, variable, gradient, slots, learning_rate)
        decay_rate = learning_rate
    learning_rate = tf.cast(learning_rate, variable.dtype)
    decay = None
    if coefficient:
        decay = tf.cast(decay_rate * coefficient, variable.dtype)
    if ok is None:
        for slot, new in zip(slots, new_slots):
            optimizer.assign(slot, new)
        if decay is not None:
            optimizer.assign_sub(variable, decay * variable)
        optimizer.assign_sub(variable, learning_rate * step)
        return
    value = tf.convert_to_tensor(variable)
    if decay is not None:
        value = value - decay * value
    for slot, new in zip(slots, new_slots):
        optimizer.assign(slot, tf.where(ok, new, slot))
    optimizer.assign(variable, tf.where(ok, value - learning_rate * step, variable))
