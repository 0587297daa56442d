"""The step's own forward pass, reused by the curvature products' pass.

The quadratic step controls' products (`products`) run the model again under
forward-mode accumulators. A layer whose inputs are the very tensors of the step's
own forward pass, and whose computation reads none of the preconditioned
variables (the directions' weights), computes there what it computed in the step's
pass, with no tangent: a frozen base of transfer learning, a recurrent layer on the
raw inputs left to the first-order partner, preprocessing and augmentation layers.
Its outputs are then taken from the step's pass instead of being computed again,
and the layers after it see the step's tensors in turn.

`install(layer)` gives a layer a `call` that, while a `capture.Recording` is active
in the current thread and graph, remembers each call's flat tensor inputs, its
outputs and what its ops did (`_Effects`); inside `reusing(recording, blocked,
trainable)` (the products' pass), a call whose flat tensor inputs are the remembered
call's (the same tensor objects, or casts of them: `_same`), and whose remembered
reads hold none of `blocked`'s handles, returns that call's outputs. Identity of
inputs makes the substitution exact without knowing what the layer computes: the
same inputs and the same weights give the same outputs; what changes is only a
random layer's draw (its dropout mask or augmentation is the step's own rather
than a new one). Eager execution, loops (a cell's calls inside a recurrent layer's loop)
and a products' pass on part of the batch (`products.PRODUCT_FRACTION`) remember
or reuse nothing. A layer that a curvature block covers gets this call around
`capture`'s recording call.

A call that reads preconditioned weights carries tangents in the products' pass, so
its outputs alone cannot stand in. Where the layer's block computes its output as
`activate(s)` from a pre-activation `s` linear in the weights (dense, convolution,
embedding and normalisation blocks: every block but the recurrent ones) and the
call's inputs recur, the pass still takes the step's `s` and output (`_Reuse.carry`):
it computes only the tangents, `s`'s from the block's own computation under the
pass's accumulators (whose primal value nothing reads, so the traced function prunes
it: a dense layer's products cost its two tangent matmuls, not a third for its
output) and the activation's from the step's `s`, and hands them to the accumulators
with the step's tensors (`ForwardAccumulator._watch`). The layers after it then see
the step's tensors in turn, so a chain of such layers costs no primal pass at all.
"""

import functools
import threading

import keras
import tensorflow as tf

from keras_tkfac import block_base
from keras_tkfac import capture

_STATE = threading.local()

# Whether the products' pass reuses the step's outputs (a switch for measurements
# and tests; the results are the same either way up to stochastic layers' draws).
ENABLED = True

# Whether the products' pass also reuses the step's outputs of calls that read the
# preconditioned weights, computing only their tangents (`_Reuse.carry`); a switch
# for measurements and tests (the products are the same either way).
CARRY = True


def _tensors(args, kwargs):
    """The tensors among a call's arguments, flattened."""
    return [t for t in tf.nest.flatten((args, kwargs)) if isinstance(t, tf.Tensor)]


def _arguments(args, kwargs):
    """A call's arguments other than its tensors (`training`, flags, masks' absence),
    as text: a call recurs only with the same ones (a layer called on one input
    with `training=False` and again with `True` computes two things)."""
    return repr(tf.nest.map_structure(_argument_text, (args, kwargs)))


def _argument_text(value):
    """A call argument as `_arguments` compares it: tensors as `None`, variables
    by identity (Keras 3.10 hands a stateful LSTM cell its state variables, whose
    `repr` reads their value: an error in a graph), the rest as themselves."""
    if isinstance(value, tf.Tensor):
        return None
    if isinstance(value, (tf.Variable, keras.Variable)):
        return f"<variable {id(value)}>"
    return value


# Ops that give equal outputs for identical inputs and attributes, through which an
# input counts as recurring: Keras casts a model's inputs to its dtype in every call
# (a float64 array given to `train_on_batch` or a custom loop), so each pass has a
# `Cast` of its own of the same tensor.
_PURE = ("Cast", "Identity")


def _same(a, b, depth=3, outer=lambda t: t):
    """Whether tensors `a` and `b` are one tensor, or `_PURE` ops of recurring
    inputs (up to `depth` ops deep) with the same attributes. `outer` maps a
    tensor of `b`'s graph to the one it captures (`_Reuse.outer`)."""
    b = outer(b)
    if a is b:
        return True
    if depth == 0 or not hasattr(a, "op") or not hasattr(b, "op"):
        return False
    op_a, op_b = a.op, b.op
    if (op_a.type != op_b.type or op_a.type not in _PURE or a.dtype != b.dtype
            or a.value_index != b.value_index
            or len(op_a.inputs) != len(op_b.inputs)):
        return False
    return all(_same(x, y, depth - 1, outer) for x, y in zip(op_a.inputs, op_b.inputs))


def _is_random(op_type):
    return "Random" in op_type or "Rng" in op_type or "Multinomial" in op_type


class _Effects:
    """What the ops of one remembered call (created between two counts of its
    graph's operations) do, found on first use: `reads`, the `id`s of the outer
    handles they take as inputs (the variables they read, through the graph's
    captures), and `random`, whether any of them draws random numbers. Lazy, as
    most remembered calls are never candidates for reuse (a nested layer of a
    reused one, a layer after a preconditioned one)."""

    def __init__(self, graph, start, end, arguments=None):
        self._graph, self._start, self._end = graph, start, end
        self._found = None
        self.arguments = arguments  # (`_arguments` of the call)

    def _find(self):
        if self._found is None:
            outer = {id(placeholder): external
                     for external, placeholder in self._graph.captures}
            reads, random = set(), False
            for op in self._graph.get_operations()[self._start:self._end]:
                random = random or _is_random(op.type)
                for tensor in op.inputs:
                    external = outer.get(id(tensor))
                    if external is not None:
                        reads.add(id(external))
            self._found = reads, random
        return self._found

    @property
    def reads(self):
        return self._find()[0]

    @property
    def random(self):
        return self._find()[1]


def _handles(variables):
    """`id`s of the resource handles of `variables` (Keras's or TensorFlow's)."""
    return {id(h) for h in (getattr(v, "handle", None) for v in variables)
            if h is not None}


class _Reuse:
    """One pass's reuse of the step's remembered calls.

    A call is reused where its flat tensor inputs are the remembered call's and the
    remembered call read none of `blocked`. A call that draws random numbers is
    reused only where it reads no trainable variable and its inputs are *settled*
    (tensors no remembered call produced, or outputs of reused calls that read no
    trainable variable): then the pass after the step, which reuses such calls too,
    sees the same draws as the products' pass, and the losses before and after the
    step differ by the step alone (`products.Batch`).

    With `accumulators` (the products' pass), a call that reads `blocked` is reused
    with its tangents where its block allows (`carry`); `sources` then holds the
    pre-activations whose tangents were computed, for the pass's checks of dropped
    tangents and hidden reads (`products._passes`).
    """

    def __init__(self, recording, blocked, trainable, accumulators=()):
        self.recording = recording
        self.graph = tf.compat.v1.get_default_graph()
        self.blocked, self.trainable = _handles(blocked), _handles(trainable)
        self.accumulators = list(accumulators)
        self.sources = []
        self.produced = {id(t) for entries in recording.all_remembered()
                         for _, outputs, _ in entries
                         for t in tf.nest.flatten(outputs)}
        self.settled = set()
        self.reused = 0

    def outer(self, tensor):
        """The step's tensor that `tensor` captures, where the pass runs in a
        function graph nested in the step's (a `tf.cond` branch: Keras's
        `LossScaleOptimizer` applies the step under one, and `mixed_float16`
        programs take the products there), else `tensor`: an input of the
        branch's own ops is that graph's placeholder for the step's tensor."""
        seen = 0
        while (getattr(tensor, "graph", None) is not None
               and tensor.graph is not self.recording.graph and seen < 8):
            captures = getattr(tensor.graph, "captures", None)
            if not captures:
                break
            found = next((external for external, internal in captures
                          if internal is tensor), None)
            if found is None:
                break
            tensor, seen = found, seen + 1
        return tensor

    def _local(self, tensor):
        """The step's `tensor` as an input of this pass's graph: in a nested
        function graph, its capture, which the pass's ops read and on which its
        tangents must be watched (`outer`'s inverse); a softmax or sigmoid output
        keeps its logits (`_logits`), captured too."""
        graph = tf.compat.v1.get_default_graph()
        if (not isinstance(tensor, tf.Tensor) or tensor.graph is graph
                or not hasattr(graph, "capture")):
            return tensor
        logits = _logits(tensor)
        local = graph.capture(tensor)
        if logits is not None:
            local._keras_logits = self._local(logits)  # pylint: disable=protected-access
        return local

    def lookup(self, layer, call, args, kwargs):
        """The remembered outputs for this call of `layer` (`call`, the layer's
        call beneath the reusing one), or `None`."""
        if tf.compat.v1.get_default_graph() is not self.graph:
            return None
        inputs = _tensors(args, kwargs)
        if not inputs:
            return None
        arguments = None
        for remembered, outputs, effects in self.recording.remembered(layer):
            if (len(remembered) != len(inputs)
                    or not all(_same(a, b, outer=self.outer)
                               for a, b in zip(remembered, inputs))):
                continue
            if arguments is None:
                arguments = _arguments(args, kwargs)
            if effects.arguments is not None and effects.arguments != arguments:
                continue
            if effects.reads & self.blocked or self._carries(inputs):
                # (The step's outputs alone would drop the tangents.)
                carried = (None if effects.random else
                           self.carry(layer, call, outputs, args, kwargs))
                if carried is None:
                    continue
                self.reused += 1
                return carried
            settled = not effects.reads & self.trainable and all(
                id(t) in self.settled or id(t) not in self.produced for t in remembered)
            if effects.random and not settled:
                return None
            if settled:
                self.settled.update(id(t) for t in tf.nest.flatten(outputs))
            self.reused += 1
            return outputs
        return None

    def _carries(self, inputs):
        """Whether any of `inputs` has a tangent in the pass's accumulators (an
        output of a call reused with its tangents, `carry`)."""
        return any(accumulator.jvp(t) is not None for accumulator in self.accumulators
                   for t in inputs if t.dtype.is_floating)

    def carry(self, layer, call, outputs, args, kwargs):
        """The step's `outputs` of a call whose tangents are not zero (it reads
        preconditioned weights, or its inputs carry tangents), with the tangents
        computed here handed to the pass's accumulators; `None` without
        accumulators; this call's own outputs where their structure differs from
        the step's.

        A block whose output is `activate(s)` computes `s`'s tangents by its own
        `record` and the activation's from the step's `s`, so that no primal value
        of this call is read and the traced function prunes its matmul or
        convolution; any other layer runs its `call`, whose primal values its
        tangents may read (a normalisation's moments), and only its outputs are
        the step's."""
        if not self.accumulators:
            return None
        block = getattr(layer, "_keras_tkfac_block", None)
        s = self.recording.preactivation(outputs)
        outputs = tf.nest.map_structure(self._local, outputs)
        s = self._local(s) if s is not None else None
        if (block is not None and s is not None and args
                and type(block).record_call is block_base.CurvatureBlock.record_call):
            _, computed = block.record(call, *args, **kwargs)
            if isinstance(computed, tf.Tensor) and computed.shape == s.shape:
                self._hand_over([s], [computed])
                if outputs is not s:
                    # The activation's tangents, from the step's `s` (its primal
                    # value is what they read: a ReLU's mask, a softmax's output).
                    activated = block.activate(s)
                    self._hand_over([outputs], [activated])
                    self._hand_over(*_logits_pairs([outputs], [activated]))
                return outputs
        computed = call(*args, **kwargs)
        try:
            tf.nest.assert_same_structure(outputs, computed)
        except (TypeError, ValueError):
            return computed  # (this pass's own outputs, with their tangents)
        flat, found = tf.nest.flatten(outputs), tf.nest.flatten(computed)
        if not all(isinstance(t, tf.Tensor) and isinstance(c, tf.Tensor)
                   and t.dtype == c.dtype for t, c in zip(flat, found)):
            return computed
        self._hand_over(flat, found)
        self._hand_over(*_logits_pairs(flat, found))
        return outputs

    def _hand_over(self, steps, computed):
        """Gives each of the step's tensors `steps` the tangents of `computed`.
        A step's tensor that already has a tangent (the call returned its input,
        as `linear` does) keeps it: watching adds to a tangent."""
        self.sources.extend(c for c in computed if c.dtype.is_floating)
        for accumulator in self.accumulators:
            for step, value in zip(steps, computed):
                if not value.dtype.is_floating or accumulator.jvp(step) is not None:
                    continue
                tangent = accumulator.jvp(value)
                if tangent is not None:
                    accumulator._watch(step, tf.cast(tangent, step.dtype))  # pylint: disable=protected-access


def _logits(tensor):
    """The logits a cross-entropy differentiates through behind a softmax or
    sigmoid output `tensor` (`loss_specs._logits_source`'s rule: Keras's
    `_keras_logits`, else a graph `Softmax`/`Sigmoid` op's input), or `None`."""
    logits = getattr(tensor, "_keras_logits", None)
    if logits is None and getattr(getattr(tensor, "op", None), "type", None) in (
            "Softmax", "Sigmoid") and len(tensor.op.inputs) == 1:
        logits = tensor.op.inputs[0]
    return logits


def _logits_pairs(steps, computed):
    """`(the step's logits, this pass's logits)` behind each pair of outputs that
    both have them (`_logits`), for `_Reuse._hand_over`.

    The loss's products read a softmax or sigmoid output's logits, not the output
    (`products._sources`). Where the logits are a tensor of their own in the
    step's pass (a float32 `Activation("softmax")` after a `mixed_bfloat16` layer
    casts its input: the step's logits are that pass's cast), the tangents handed
    to the step's outputs and to the layer before would not reach them: the
    curvature along the step came out zero (2026-12-07, a `mixed_bfloat16` MLP
    whose loss then rose from 1.2 to 47 in 24 steps)."""
    pairs = [(_logits(t), _logits(c)) for t, c in zip(steps, computed)]
    pairs = [(t, c) for t, c in pairs if t is not None and c is not None
             and t.dtype == c.dtype and t.shape == c.shape]
    return [t for t, _ in pairs], [c for _, c in pairs]


def install(layer):
    """Gives `layer` the remembering and reusing `call`. Idempotent."""
    if getattr(layer.call, "_keras_tkfac_reuse", False):
        return
    original = layer.call

    @functools.wraps(original)
    def reusing_call(*args, **kwargs):
        reuse = getattr(_STATE, "reuse", None)
        if reuse is not None:
            outputs = reuse.lookup(layer, original, args, kwargs)
            return original(*args, **kwargs) if outputs is None else outputs
        recording = capture.active()
        if recording is None or tf.executing_eagerly():
            return original(*args, **kwargs)
        graph = tf.compat.v1.get_default_graph()
        if graph is not recording.graph:
            return original(*args, **kwargs)
        start = len(graph.get_operations())
        outputs = original(*args, **kwargs)
        recording.remember(layer, _tensors(args, kwargs), outputs,
                           _Effects(graph, start, len(graph.get_operations()),
                                    _arguments(args, kwargs)))
        return outputs

    reusing_call._keras_tkfac_reuse = True
    object.__setattr__(layer, "call", reusing_call)


class reusing:  # pylint: disable=invalid-name
    """While active in this thread, `recording`'s remembered calls are reused where
    their inputs recur (`_Reuse`): in the products' pass, `blocked` is the
    directions' variables, whose tangents the pass carries; in a pass after the
    step, every trainable variable. `recording=None`, or eager execution: nothing
    is reused. `reused` counts the calls reused. `accumulators`, the products'
    pass's, let calls that read `blocked` be reused with their tangents
    (`_Reuse.carry`) unless `CARRY` is off; `sources` are the tensors whose
    tangents that computed."""

    def __init__(self, recording, blocked, trainable, accumulators=()):
        self._reuse = None
        if ENABLED and recording is not None and not tf.executing_eagerly():
            self._reuse = _Reuse(recording, blocked, trainable,
                                 accumulators if CARRY else ())

    @property
    def reused(self):
        return 0 if self._reuse is None else self._reuse.reused

    @property
    def sources(self):
        return [] if self._reuse is None else list(self._reuse.sources)

    def __enter__(self):
        self._previous = getattr(_STATE, "reuse", None)
        _STATE.reuse = self._reuse
        return self

    def __exit__(self, *exc_info):
        _STATE.reuse = self._previous
        return False
