"""Finding the ops whose forward-mode derivative TensorFlow silently drops.

`tf.autodiff.ForwardAccumulator` computes an op's Jacobian-vector product from its
registered gradient (the gradient of the gradient, where no special rule exists).
Where that second gradient is registered as not differentiable, the accumulator
does not raise: the op's output simply has no tangent, and everything downstream
treats it as zero. The curvature products of the layers before such an op are then
silently missing. Measured on TensorFlow 2.21 (`tests/test_tangents.py`):
`tf.image.resize(..., "bilinear")` (Keras's `UpSampling2D(interpolation=
"bilinear")`, `Resizing`, DeepLabV3+'s decoder) gives no tangent, because TensorFlow
registers the gradient of `ResizeBilinearGrad` as not differentiable; its reverse-
over-reverse product is zero as well. With its products missing, a model with
trainable layers before a bilinear resize diverged under the quadratic step (loss
2e3 to 1e4 in 24 steps where Adam trained). `fake_quant_with_min_max_args` drops
its tangent the same way. Other resize methods, and the other ops checked, raise
(the products then take reverse mode or none) or are exact.

`install_jvps` gives TensorFlow's forward mode the rule it lacks for the bilinear
resize (linear in the images: the tangent's resize is the output's tangent), so the
products pass through it; `dropped` remains the safeguard for the others. It also
gives zero tangents to ops with integer or boolean outputs (`INTEGER_OUTPUTS`,
`Cast` to an integer), which nested accumulators need.

`dropped` finds such ops in a traced forward pass: an op that the pass's results
are computed from (not one of the accumulator's tangent computations, nor one
that `jvp_rules` created for them: recurrent loops carry tangents as loop values,
so the path back from the results reaches them) that has a
floating input with a tangent, floating outputs without any, and a gradient in
reverse mode, unless its derivative is zero wherever it exists (`ZERO_DERIVATIVE`:
`floor`, `round`, `sign`, ...) or it belongs to a `tf.custom_gradient` body (whose
ops run unrecorded; the body's result carries its tangent). In eager execution
nothing is traced and nothing is found.
"""

import contextlib
import threading

import keras
import tensorflow as tf
from tensorflow.python.framework import ops as tf_ops  # pylint: disable=no-name-in-module

from keras_tkfac import jvp_rules
from keras_tkfac import native_convs

# Ops whose derivative is zero wherever it exists: no tangent is the right one.
ZERO_DERIVATIVE = frozenset({
    "Floor", "Ceil", "Round", "Rint", "Sign", "FloorDiv", "FloorMod", "TruncateDiv",
    "TruncateMod", "StopGradient", "PreventGradient", "ZerosLike", "OnesLike",
})
_CALLS = frozenset({"PartitionedCall", "StatefulPartitionedCall"})


def operation_count():
    """The number of ops in the graph being traced (`None` when executing eagerly):
    `dropped` looks at the ops created after this count."""
    if tf.executing_eagerly():
        return None
    return len(tf.compat.v1.get_default_graph().get_operations())


class DroppedTangents(ValueError):
    """Forward mode dropped the tangent at ops of these types (`dropped`)."""

    def __init__(self, op_types):
        super().__init__(
            "TensorFlow's forward mode gives no derivative through %s (its reverse "
            "mode does), so the curvature products would miss the layers before it"
            % ", ".join(op_types))
        self.op_types = list(op_types)


def _differentiable(op_type):
    """Whether reverse mode has a gradient for `op_type`."""
    try:
        return tf_ops._gradient_registry.lookup(op_type) is not None  # pylint: disable=protected-access
    except LookupError:
        return False


def _floating(tensors):
    return [t for t in tensors if t.dtype.is_floating or t.dtype.is_complex]


def _custom_gradient_bodies(operations, carries):
    """The ops of `tf.custom_gradient` bodies (Keras's `swish`, `gelu`, ...) among
    `operations`: they run with recording stopped, so their outputs carry no
    tangent; the `IdentityN` that ends each body carries the body's tangent from
    its custom gradient. Found by walking back from those `IdentityN`s through ops
    whose outputs carry none."""
    created = set(operations)
    stack = [t.op for op in operations
             if op.type == "IdentityN" and "_gradient_op_type" in op.node_def.attr
             for t in op.inputs]
    body = set()
    while stack:
        op = stack.pop()
        if op in body or op not in created or any(
                carries(t) for t in _floating(op.outputs)):
            continue
        body.add(op)
        stack.extend(t.op for t in op.inputs)
    return body


def _ancestors(tensors, created, skipped=frozenset()):
    """The ops among `created` that `tensors` are computed from, not following the
    inputs whose names are in `skipped`."""
    stack, found = [t.op for t in tensors], set()
    while stack:
        op = stack.pop()
        if op in found or op not in created:
            continue
        found.add(op)
        stack.extend(t.op for t in op.inputs if t.name not in skipped)
    return found


class HiddenReads(DroppedTangents):
    """Variables whose tangents forward mode cannot follow: they are read inside
    a function the forward pass calls (Keras runs grouped and channels-first 3-D
    convolutions on CPU in a nested XLA function that reads the kernel). Measured:
    reverse-over-reverse products through such a call are wrong too (`J d` off
    against `tape.jacobian`), so the layers of these variables take the sibling
    step and the quadratic model covers the others (`quadratic.steps`)."""

    def __init__(self, variables):
        names = [v.name for v in variables]
        ValueError.__init__(  # pylint: disable=non-parent-init-called
            self, "forward mode cannot follow %s into the function that reads it"
            % ", ".join(names))
        self.op_types = names
        self.variables = list(variables)


def hidden_reads(variables, start, results, accumulators=()):
    """Those of `variables` whose handles enter a function call that `results`
    are computed from (created since `start`); `[]` when eager.

    With `accumulators` (the pass's), only the primal computation counts: the path
    from `results` does not follow their tangents. A function call in the forward
    pass (Keras's nested XLA convolution) takes the tangents of its inputs, which
    come from the accumulators' own calls (the tangent of each variable read is a
    call that takes the variable's handle); without this, every variable before
    such a call was taken for hidden (measured: a plain `Conv2D` before a grouped
    one, whose products forward mode follows, to 3e-5 of finite differences)."""
    if start is None:
        return []
    graph = tf.compat.v1.get_default_graph()
    created = graph.get_operations()[start:]
    tangents = set()
    for accumulator in accumulators:
        for op in created:
            for output in _floating(op.outputs):
                tangent = accumulator.jvp(output)
                if tangent is not None:
                    tangents.add(tangent.name)
    internal = {id(external): placeholder for external, placeholder in graph.captures}
    handles = {}
    for variable in variables:
        handle = internal.get(id(getattr(variable, "handle", None)))
        if handle is not None:
            handles[id(handle)] = variable
    found = {}
    for op in _ancestors(results, set(created), tangents):
        if op.type in _CALLS:
            found.update((id(t), handles[id(t)]) for t in op.inputs if id(t) in handles)
    return sorted(found.values(), key=lambda v: v.name)


def nested_xla_convolution(block):
    """Whether Keras runs `block`'s convolution in its nested XLA function (grouped
    convolutions and `channels_first` 3-D ones, on any device) and `wrap` did not
    give the layer TensorFlow's own ops for it (`native_convs`): what
    `hidden_reads` finds in a traced pass, known here from the layer for eager
    passes, where there is no graph to inspect (measured: eager forward-mode
    products through it are wrong too)."""
    layer = block.layer
    if (type(layer) not in (keras.layers.Conv1D, keras.layers.Conv2D,
                            keras.layers.Conv3D) or native_convs.installed(layer)):
        return False
    return getattr(layer, "groups", 1) > 1 or (
        layer.rank == 3 and layer.data_format == "channels_first")


def eager_hidden_reads(blocks):
    """`hidden_reads`'s answer for an eager pass (no graph to inspect): the
    variables of those `blocks` that run as `nested_xla_convolution`s."""
    if not tf.executing_eagerly():
        return []
    return [getattr(v, "value", v) for block in blocks
            if nested_xla_convolution(block) for v in block.variables]


def dropped(accumulator, start, results):
    """The types of the ops that `results` (tensors) were computed from, created
    since `start` (`operation_count()`), whose outputs lost the tangent
    `accumulator` carried into them; `[]` when eager. Only the ops `results` are
    computed from count: the accumulator's own tangent computations (its function
    calls, and the gradient functions of custom gradients it traces inline) are not
    among them."""
    if start is None:
        return []
    created = tf.compat.v1.get_default_graph().get_operations()[start:]
    primal = _ancestors(results, set(created))
    operations = [op for op in created if op in primal]

    def carries(tensor):
        return accumulator.jvp(tensor) is not None

    bodies = _custom_gradient_bodies(operations, carries)
    found = []
    for op in operations:
        if (op.type in _CALLS or op.type in ZERO_DERIVATIVE or op in bodies
                or jvp_rules.created_here(op)):
            continue
        outputs = _floating(op.outputs)
        if not outputs or any(carries(t) for t in outputs):
            continue
        if not any(carries(t) for t in _floating(op.inputs)):
            continue
        if _differentiable(op.type) and op.type not in found:
            found.append(op.type)
    return found


def _resize_bilinear_jvp(attr_tuple, inputs, outputs, tangents):
    """Forward mode through `ResizeBilinear(images, size)`: linear in `images`, so
    the tangent is the resize of the images' tangent."""
    del outputs
    attributes = dict(zip(attr_tuple[::2], attr_tuple[1::2]))
    images = tangents[0]
    if images is None:
        return [None]
    return [tf.raw_ops.ResizeBilinear(
        images=images, size=inputs[1], align_corners=attributes["align_corners"],
        half_pixel_centers=attributes["half_pixel_centers"])]


def _zero_jvp(attr_tuple, inputs, outputs, tangents):
    """Forward mode through an op whose outputs are integers or booleans (a shape,
    a comparison, an index): zero tangents of the outputs' own types."""
    del attr_tuple, inputs, tangents
    return [tf.zeros_like(output) for output in outputs]


def _cast_jvp(attr_tuple, inputs, outputs, tangents):
    """Forward mode through `Cast`: the tangent cast to the output's type between
    floating (or complex) types, as TensorFlow's own rule gives; zero where the
    output or the input is an integer or a boolean."""
    del attr_tuple, inputs
    output, tangent = outputs[0], tangents[0]
    if (tangent is not None and (output.dtype.is_floating or output.dtype.is_complex)
            and (tangent.dtype.is_floating or tangent.dtype.is_complex)):
        return [tf.cast(tangent, output.dtype)]
    return [tf.zeros_like(output)]


# Ops with only integer or boolean outputs. Where TensorFlow's forward mode gives
# them no tangent, its Jacobian-vector product is a traced function without
# outputs, and a second accumulator around the first (the nested products,
# `products.NESTED`) fails on that function call (`IndexError` in TensorFlow's
# `concrete_function`; measured on TensorFlow 2.21, `tests/test_tangents.py`).
# Keras's `Dropout` on a batch of unknown size (`tf.data`, a dataset whose size
# is not a multiple of the batch) takes `tf.shape` of its input, `Masking`
# compares it, so their models fell back to one pass per direction. Their
# derivative is zero; a zero tangent keeps the function's output.
INTEGER_OUTPUTS = ("Shape", "ShapeN", "Size", "Rank", "Equal", "NotEqual", "Greater",
                   "GreaterEqual", "Less", "LessEqual", "ArgMax", "ArgMin",
                   "IsFinite", "IsNan", "IsInf")

# Forward-mode rules for ops whose derivative TensorFlow's forward mode drops, or
# whose missing tangent breaks nested accumulators.
JVPS = {"ResizeBilinear": _resize_bilinear_jvp, "Cast": _cast_jvp,
        **{name: _zero_jvp for name in INTEGER_OUTPUTS}}


def install_jvps():
    """Adds `JVPS` to TensorFlow's forward mode (its table of special-cased
    Jacobian-vector products, `forwardprop._SPECIAL_CASES`) where it has no rule of
    its own. This only gives forward mode a derivative it would otherwise drop
    without an error; reverse mode is unchanged. Where TensorFlow's forward mode
    has another layout, nothing is added (and `dropped` still finds the ops that
    lose their tangent). Idempotent."""
    special = jvp_rules.special_cases()
    for name, rule in JVPS.items():
        special.setdefault(name, rule)


# `tf.recompute_grad` as TensorFlow defines it, restored after `plain_recompute`.
_RECOMPUTE_GRAD = tf.recompute_grad
_recompute_lock = threading.Lock()
_recompute_depth = [0]


def _plain(f):
    return f


@contextlib.contextmanager
def plain_recompute():
    """`tf.recompute_grad` returns the function unchanged within this context.

    Gradient checkpointing (`tf.recompute_grad`, and Keras's `keras.RematScope` and
    `keras.remat`, which call it on TensorFlow) recomputes a function's forward pass
    in the backward pass instead of keeping its activations. TensorFlow's forward
    mode cannot pass such a function (its Jacobian-vector product would transpose a
    gradient that raises "Consider not using recompute_grad in forward mode
    autodiff", measured on TensorFlow 2.21), nor can reverse-over-reverse mode, so
    every step of such a model lost its curvature products. The products' passes
    only compute forward values and their tangents, where recomputation saves
    nothing; within them the function runs as it is, with the same values.

    Functions wrapped while the context is open are plain; ones wrapped before it
    (`keras.remat` applied in a layer's `__init__`) keep their recomputation and
    still fail there. Thread-safe (replicas trace in threads of their own): the
    original is restored when the last context closes.
    """
    with _recompute_lock:
        if _recompute_depth[0] == 0:
            tf.recompute_grad = _plain
        _recompute_depth[0] += 1
    try:
        yield
    finally:
        with _recompute_lock:
            _recompute_depth[0] -= 1
            if _recompute_depth[0] == 0:
                tf.recompute_grad = _RECOMPUTE_GRAD
