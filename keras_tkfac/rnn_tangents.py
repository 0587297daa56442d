"""Forward-mode tangents through Keras's recurrent loops (`LSTM`, `GRU`, `SimpleRNN`,
`RNN`), for the curvature products (`products._passes`).

TensorFlow's forward mode has no rule of its own for a `While` loop: an accumulator
computes a loop's Jacobian-vector product by transposing its gradient, and for a
Keras recurrent layer that fails (`TensorListFromTensor`'s variant-typed output, a
loop variable that is a variable's handle without handle data). The products then
took reverse-over-reverse products for the whole model, which on the suite's BiLSTM
classifier cost 109 ms against 39 ms for the step's gradient (batch 32, 40 steps).

`carrying(model, accumulators)` computes each recurrent layer's tangents by running
its own loop once with the tangents as extra loop values: every step of Keras's loop
(`keras.src.backend.rnn`: masks, `go_backwards`, zeroed outputs as Keras applies
them, to the tangents alike) calls the cell inside fresh accumulators, one per
direction, that carry the input's, the states' and the cell weights' tangents to
the output and the new states. The loop itself sees no tangent (its inputs and the
cell's weights enter it through `tf.stop_gradient`, the weights by Keras's
`StatelessScope`), and the layer's outputs are handed to the pass's accumulators
with their tangents (`ForwardAccumulator._watch`). One loop of primal and tangents
replaces the transposed gradient: the same products, equal to reverse mode's
(`tests/test_quadratic.py`). A layer built with `unroll=True` gets the same step in
`_unrolled`, Keras's unrolled loop written out (Keras's own cannot carry a step's
several outputs).
"""

import contextlib

import keras
import tensorflow as tf
from keras.src import tree  # pylint: disable=no-name-in-module

_ZERO = tf.UnconnectedGradients.ZERO


def _tangent(accumulator, tensor):
    """`accumulator`'s tangent of `tensor` (zeros where it has none), cut from
    every accumulator: nested accumulators (`products.NESTED`) hold tangents of
    each other's tangents, which would send the loop to their transposed gradient
    (second-order terms that nothing reads)."""
    found = accumulator.jvp(tensor)
    return tf.zeros_like(tensor) if found is None else tf.stop_gradient(found)


def _inner_loop(layer, accumulators):
    """`layer.inner_loop` (Keras's `RNN.inner_loop`) with the tangents of
    `accumulators` carried through the loop."""

    def inner_loop(sequences, initial_state, mask, training=False):
        if tree.is_nested(mask):  # as `LSTM.inner_loop` and `GRU.inner_loop`
            mask = mask[0]
        cell = layer.cell
        cell_kwargs = ({"training": training} if isinstance(cell, keras.layers.Layer)
                       and cell._call_has_training_arg else {})  # pylint: disable=protected-access
        structure = initial_state if tree.is_nested(initial_state) else [initial_state]
        states, inputs = tree.flatten(structure), tree.flatten(sequences)
        weights = list(cell.weights)
        with keras.src.backend.AutocastScope(None):  # the variables themselves
            variables = [w.value for w in weights]
        count, width, size = len(accumulators), len(states), len(inputs)
        values = [tf.stop_gradient(v) for v in variables]
        weight_tangents = [[None if t is None else tf.stop_gradient(t)
                            for t in (a.jvp(v) for v in variables)]
                           for a in accumulators]

        def step(carried_inputs, carried):
            x, primal = list(carried_inputs[:size]), list(carried[:width])
            inside = [tf.identity(v) for v in values]  # the loop's own copies
            with contextlib.ExitStack() as stack:
                inner = []
                for k in range(count):
                    watched = list(zip(x, carried_inputs[size * (k + 1):size * (k + 2)]))
                    watched += zip(primal, carried[width * (k + 1):width * (k + 2)])
                    watched += [(v, t) for v, t in zip(inside, weight_tangents[k])
                                if t is not None]
                    inner.append(stack.enter_context(tf.autodiff.ForwardAccumulator(
                        [p for p, _ in watched], [t for _, t in watched])))
                with keras.StatelessScope(state_mapping=list(zip(weights, inside))):
                    output, new_states = cell(
                        tree.pack_sequence_as(sequences, x),
                        tree.pack_sequence_as(structure, primal), **cell_kwargs)
            new_states = tree.flatten(new_states)
            outputs = [output] + [a.jvp(output, _ZERO) for a in inner]
            return tuple(outputs), new_states + [
                a.jvp(s, _ZERO) for a in inner for s in new_states]

        sequences_in = tuple([tf.stop_gradient(t) for t in inputs]
                             + [_tangent(a, t) for a in accumulators for t in inputs])
        states_in = ([tf.stop_gradient(s) for s in states]
                     + [_tangent(a, s) for a in accumulators for s in states])
        if layer.unroll:
            last, outputs, final = _unrolled(step, sequences_in, states_in, layer, mask)
        else:
            last, outputs, final = keras.src.backend.rnn(
                step, sequences_in, states_in, go_backwards=layer.go_backwards,
                mask=mask, unroll=False, input_length=inputs[0].shape[1],
                zero_output_for_mask=layer.zero_output_for_mask,
                return_all_outputs=layer.return_sequences)
        final = tree.flatten(final)
        # The accumulators watch copies: an unrolled loop's last output and final
        # states are also read by its own ops (the last step's `tanh(c)`), which
        # would then read a tangent they do not pass on (`tangents.dropped`).
        primal = [tf.identity(t) for t in [last[0], outputs[0]] + final[:width]]
        for k, accumulator in enumerate(accumulators):
            accumulator._watch(  # pylint: disable=protected-access
                primal,
                [last[k + 1], outputs[k + 1]] + final[width * (k + 1):width * (k + 2)])
        return primal[0], primal[1], tree.pack_sequence_as(structure, primal[2:])

    return inner_loop


def _unrolled(step, sequences, states, layer, mask):
    """The loop of a layer built with `unroll=True`, as `keras.src.backend.rnn`
    unrolls it (`go_backwards`; a masked step holds the states and repeats the
    previous output, zeros before the first; with `zero_output_for_mask` the
    masked steps' outputs, and the last output where its step is masked, are zeros
    afterwards), for a `step` with several outputs (the primal and each direction's
    tangent): Keras's own unrolled loop stacks such outputs into one time-major
    tensor and cannot mask them. `sequences` are batch-major."""
    inputs = [tf.unstack(t, axis=1) for t in sequences]
    masks = None
    if mask is not None:
        mask = tf.cast(mask, tf.bool)
        masks = tf.unstack(tf.reshape(mask, tf.shape(mask)[:2]), axis=1)

    def held(step_mask, x):  # the batch's mask broadcast to `x`
        return tf.reshape(step_mask, [-1] + [1] * (x.shape.rank - 1))

    order = range(len(inputs[0]))
    order = reversed(order) if layer.go_backwards else order
    states, outputs, kept = list(states), [], []
    for t in order:
        output, new_states = step(tuple(x[t] for x in inputs), tuple(states))
        output, new_states = list(output), tree.flatten(new_states)
        if masks is not None:
            previous = outputs[-1] if outputs else [tf.zeros_like(o) for o in output]
            output = [tf.where(held(masks[t], o), o, p) for o, p in zip(output, previous)]
            new_states = [tf.where(held(masks[t], n), n, s)
                          for n, s in zip(new_states, states)]
            kept.append(masks[t])
        states = new_states
        outputs = outputs + [output] if layer.return_sequences else [output]
    last = outputs[-1]
    if masks is not None and layer.zero_output_for_mask:
        last = [tf.where(held(kept[-1], o), o, tf.zeros_like(o)) for o in last]
        # (Keras zeroes the `i`-th output computed by the mask of time step `i`,
        # also where `go_backwards` computed them in reverse.)
        outputs = ([[tf.where(held(m, o), o, tf.zeros_like(o)) for o in step_outputs]
                    for m, step_outputs in zip(masks, outputs)]
                   if layer.return_sequences else [last])
    return (tuple(last), tuple(tf.stack(o, axis=1) for o in zip(*outputs)), states)


def _recurrent(model):
    return [layer for layer in model._flatten_layers(include_self=False)  # pylint: disable=protected-access
            if isinstance(layer, keras.layers.RNN)
            and not getattr(layer, "stateful", False)]


@contextlib.contextmanager
def carrying(model, accumulators):
    """While active, `model`'s recurrent layers carry `accumulators`' tangents
    through their loops (their `inner_loop`, which Keras's `LSTM` and `GRU` reach
    when cuDNN is off: `products.without_cudnn`). `model=None`: nothing changes."""
    layers = _recurrent(model) if model is not None and accumulators else []
    for layer in layers:
        layer.inner_loop = _inner_loop(layer, accumulators)
    try:
        yield
    finally:
        for layer in layers:
            del layer.inner_loop
