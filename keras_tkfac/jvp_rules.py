"""Jacobian-vector products written inline for the curvature products' pass.

TensorFlow's forward mode computes each op's Jacobian-vector product by tracing a
function per op type and input signature that takes the gradient of the op's
gradient (`forwardprop._jvp_helper`), and calls it from the traced step. Where
the products carry two directions in one pass (nested accumulators,
`products.NESTED`), the outer accumulator also records the inner one's tangent
computations: second-order terms that nothing reads, traced and then pruned.
Tracing dominates the first step of a large convolutional network: measured on
`tools/sweep_programs.py`'s MobileNetV2 (cProfile of `TKFAC()`'s first step), the
products' pass took about 30 of the trace's 60 s, in 1982 calls of TensorFlow's
per-op dispatch; with these rules its first step took 0.59x as long, and
EfficientNetB0's 0.44x, the later steps unchanged (docs/RESULTS.md, "Inline tangents").

`inline` (a context) replaces that dispatch, for the ops `rule` knows, by the
tangent written as ops of the step itself, computed with recording stopped, so
that no accumulator (and no tape) records the tangent computations: each
accumulator gets the first-order tangent of its own direction, and the
second-order terms are never built. Other ops, and every use of forward mode
outside the context (a user's nested accumulators, whose second-order terms are
the point), take TensorFlow's dispatch unchanged. Only while tracing; eager
forward mode is untouched.

The rules are the ops' derivatives:
- `LINEAR` ops are linear in their floating inputs taken together (the tangent is
  the op applied to the inputs' tangents, the integer inputs as they were);
- `MULTILINEAR` ops are linear in each floating input separately (the sum over
  the inputs of the op with that input replaced by its tangent; an input whose
  tangent is TensorFlow's zero filler, `known_zero`, adds no term: the first
  layer's `conv(0, W)` or `0 · W` on the network's input is not computed);
- `ELEMENTWISE` rules are written out (TensorFlow's own `*Grad` kernels where the
  derivative of an activation is one);
- TensorFlow's own special cases (variable reads, `tangents.JVPS`) run inline.
A rule that raises leaves its op to TensorFlow's dispatch. Each rule is checked against TensorFlow's dispatch (`tests/test_jvp_rules.py`).

Within `precision("bfloat16")` the multilinear rules of matmuls and convolutions
(`LOW_PRECISION_OPS`) compute their terms in bfloat16 with float32 results; within
`precision(("bfloat16", w))` only matmuls of widths of at least `w` do
(`products_dtype`, `keras_tkfac.precision`).
"""

import contextlib
import functools
import re
import threading

import tensorflow as tf
from tensorflow.core.framework import attr_value_pb2
from tensorflow.python import pywrap_tfe  # pylint: disable=no-name-in-module
from tensorflow.python.eager import record  # pylint: disable=no-name-in-module

from keras_tkfac import precision as precision_lib

# Linear in all floating inputs together.
LINEAR = frozenset({
    "Identity", "Neg", "AddV2", "Add", "Sub", "AddN", "BiasAdd", "Reshape",
    "Transpose", "ExpandDims", "Squeeze", "StridedSlice", "Slice", "ConcatV2",
    "Pack", "Unpack", "Split", "SplitV", "Tile", "BroadcastTo", "Pad", "PadV2",
    "MirrorPad", "GatherV2", "Mean", "Sum", "AvgPool", "AvgPool3D", "Select",
    "SelectV2", "DepthToSpace", "SpaceToDepth", "Cumsum",
})

# Linear in each floating input separately.
MULTILINEAR = frozenset({
    "Mul", "MatMul", "BatchMatMulV2", "BatchMatMulV3", "Einsum", "Conv2D",
    "Conv3D", "DepthwiseConv2dNative", "Conv2DBackpropInput",
    "Conv3DBackpropInputV2",
})


def _unary(derivative):
    def rule(op, tangents):
        return [derivative(op, tangents[0])]
    return rule


def _real_div(op, tangents):
    y = op.inputs[1]
    dx, dy = tangents
    return [(dx - op.outputs[0] * dy) / y]


def _squared_difference(op, tangents):
    x, y = op.inputs
    dx, dy = tangents
    return [2.0 * (x - y) * (dx - dy)]


def _maximum(op, tangents):
    x, y = op.inputs
    return [tf.where(x >= y, tangents[0], tangents[1])]


def _minimum(op, tangents):
    x, y = op.inputs
    return [tf.where(x <= y, tangents[0], tangents[1])]


def _softmax(op, tangents):
    y, dx = op.outputs[0], tangents[0]
    return [y * (dx - tf.reduce_sum(y * dx, axis=-1, keepdims=True))]


def _log_softmax(op, tangents):
    dx = tangents[0]
    probs = tf.exp(op.outputs[0])
    return [dx - tf.reduce_sum(probs * dx, axis=-1, keepdims=True)]


# Whether a max-pooling op whose windows tile its input takes its tangent through
# the pooling gradient's routing (`_tiled_max_pool`) instead of `MaxPoolGradGrad`;
# a switch for measurements and tests (the tangents are the same).
TILED_MAX_POOL = True


@functools.lru_cache(maxsize=None)
def _on_cpu():
    """Whether the step runs on the CPU: no GPU is visible. Measured on CPUs only;
    where a GPU runs the step, `MaxPoolGradGrad` is a parallel kernel there, and
    cuDNN's pooling gradient, which would give the mask, has not been checked
    against it at tied maxima."""
    return not tf.config.list_logical_devices("GPU")


def _tiles(op):
    """Whether a `MaxPool` op's windows tile its float32 NHWC input, on a CPU:
    strides equal to the window, and no padding (`VALID`, or `SAME` where the
    spatial sizes are known multiples of the strides, which pads nothing)."""
    if (op.type != "MaxPool" or op.inputs[0].dtype != tf.float32
            or op.get_attr("data_format") != b"NHWC" or not _on_cpu()):
        return False
    ksize, strides = list(op.get_attr("ksize")), list(op.get_attr("strides"))
    padding = op.get_attr("padding")
    if ksize != strides or padding not in (b"VALID", b"SAME"):
        return False
    return padding == b"VALID" or all(
        s == 1 or (d is not None and d % s == 0)
        for d, s in zip(op.inputs[0].shape.as_list(), strides))


def _tiled_max_pool(op, tangent):
    """The max-pooling tangent where the windows tile the input: each window's
    tangent at its maximum is the window's sum of `tangent` times the routing mask
    that the pooling gradient (`MaxPoolGrad`, TensorFlow's own choice among tied
    maxima) gives a window of ones. The mask is the same for every direction (one
    op for all, after common-subexpression elimination), and each direction takes
    one product and one average pooling, where `MaxPoolGradGrad` runs a scalar loop
    per direction: on the suite convnet's first pooling (128x26x26x32), two
    directions took 3.3 against 11.9 ms."""
    ksize, strides = op.get_attr("ksize"), op.get_attr("strides")
    x, y = op.inputs[0], op.outputs[0]
    window = 1
    for k in ksize:
        window *= k
    # The average of the window times its size: exact where the size is a power of
    # two (the mask's one nonzero entry is `window`).
    routes = tf.raw_ops.MaxPoolGrad(
        orig_input=x, orig_output=y, grad=tf.fill(tf.shape(y), tf.cast(window, x.dtype)),
        ksize=ksize, strides=strides, padding=op.get_attr("padding").decode(),
        data_format="NHWC")
    return tf.nn.avg_pool(tangent * routes, ksize, strides, "VALID", "NHWC")


def _max_pool(op, tangents):
    """The input's tangent at each window's maximum (what TensorFlow's gradient of
    the max-pooling gradient computes)."""
    if TILED_MAX_POOL and _tiles(op):
        return [_tiled_max_pool(op, tangents[0])]
    grad_grad = {"MaxPool": tf.raw_ops.MaxPoolGradGrad,
                 "MaxPool3D": tf.raw_ops.MaxPool3DGradGrad}[op.type]
    return [grad_grad(
        orig_input=op.inputs[0], orig_output=op.outputs[0], grad=tangents[0],
        ksize=op.get_attr("ksize"), strides=op.get_attr("strides"),
        padding=op.get_attr("padding"),
        data_format=op.get_attr("data_format").decode())]


def _leaky_relu(op, tangents):
    alpha = op.get_attr("alpha")
    return [tf.raw_ops.LeakyReluGrad(gradients=tangents[0], features=op.inputs[0],
                                     alpha=alpha)]


ELEMENTWISE = {
    "Relu": _unary(lambda op, d: tf.raw_ops.ReluGrad(gradients=d,
                                                     features=op.outputs[0])),
    "Relu6": _unary(lambda op, d: tf.raw_ops.Relu6Grad(gradients=d,
                                                       features=op.inputs[0])),
    "Elu": _unary(lambda op, d: tf.raw_ops.EluGrad(gradients=d,
                                                   outputs=op.outputs[0])),
    "Selu": _unary(lambda op, d: tf.raw_ops.SeluGrad(gradients=d,
                                                     outputs=op.outputs[0])),
    "Sigmoid": _unary(lambda op, d: tf.raw_ops.SigmoidGrad(y=op.outputs[0], dy=d)),
    "Tanh": _unary(lambda op, d: tf.raw_ops.TanhGrad(y=op.outputs[0], dy=d)),
    "Sqrt": _unary(lambda op, d: tf.raw_ops.SqrtGrad(y=op.outputs[0], dy=d)),
    "Rsqrt": _unary(lambda op, d: tf.raw_ops.RsqrtGrad(y=op.outputs[0], dy=d)),
    "Reciprocal": _unary(lambda op, d: tf.raw_ops.ReciprocalGrad(y=op.outputs[0],
                                                                 dy=d)),
    "Exp": _unary(lambda op, d: op.outputs[0] * d),
    "Log": _unary(lambda op, d: d / op.inputs[0]),
    "Square": _unary(lambda op, d: 2.0 * op.inputs[0] * d),
    "Softplus": _unary(lambda op, d: tf.sigmoid(op.inputs[0]) * d),
    "Erf": _unary(lambda op, d: (2.0 / 3.141592653589793**0.5) * tf.exp(
        -tf.square(op.inputs[0])) * d),
    "Erfc": _unary(lambda op, d: (-2.0 / 3.141592653589793**0.5) * tf.exp(
        -tf.square(op.inputs[0])) * d),
    "MaxPool": _max_pool,
    "MaxPool3D": _max_pool,
    "LeakyRelu": _leaky_relu,
    "RealDiv": _real_div,
    "SquaredDifference": _squared_difference,
    "Maximum": _maximum,
    "Minimum": _minimum,
    "Softmax": _softmax,
    "LogSoftmax": _log_softmax,
}


def _floating(tensor):
    return tensor.dtype.is_floating or tensor.dtype.is_complex


def _same_op(op, inputs):
    """`op`'s type and attributes on other `inputs`: its outputs."""
    created = op.graph._create_op_internal(  # pylint: disable=protected-access
        op.type, inputs, [t.dtype for t in op.outputs],
        attrs={name: op.node_def.attr[name] for name in op.node_def.attr
               if not name.startswith("_")})
    return list(created.outputs)


# The multilinear ops whose tangent terms `precision("bfloat16")` computes in
# bfloat16 (each checked to run in bfloat16 on CPU, `tests/test_jvp_rules.py`),
# and the attributes that carry their dtype.
LOW_PRECISION_OPS = frozenset({
    "MatMul", "BatchMatMulV2", "BatchMatMulV3", "Einsum", "Conv2D", "Conv3D",
    "DepthwiseConv2dNative", "Conv2DBackpropInput", "Conv3DBackpropInputV2",
})
_DTYPE_ATTRS = ("T", "Ta", "Tb", "Tout")


def _in_loop(graph):
    """Whether `graph` is (inside) a `tf.while_loop`'s body."""
    while graph is not None:
        if type(graph).__name__ == "WhileBodyFuncGraph":
            return True
        graph = getattr(graph, "outer_graph", None)
    return False


def _widths(op):
    """A matmul's contracted and output widths (`None` where not known when traced),
    or `None` for other ops and for a matmul in a loop's body (`precision.choose`:
    `"auto"` leaves them in float32; a recurrent layer's step multiplies the batch's
    rows only, and on the suite's BiLSTM the casts cost more than bfloat16 saved)."""
    flag = {"MatMul": "transpose_a", "BatchMatMulV2": "adj_x",
            "BatchMatMulV3": "adj_x"}.get(op.type)
    shape = op.inputs[0].shape
    if (flag is None or shape.rank is None or shape.rank < 2
            or _in_loop(op.graph)):
        return None
    return (shape[-2] if op.get_attr(flag) else shape[-1]), op.outputs[0].shape[-1]


def _same_op_in(op, inputs, rule):
    """`_same_op` with its float32 inputs and outputs in bfloat16 inside (results
    in float32) where `rule` (`precision.policy`'s pair, or `None`) chooses
    bfloat16 for this op of `LOW_PRECISION_OPS`; `_same_op` otherwise."""
    if (rule is None or op.type not in LOW_PRECISION_OPS
            or any(t.dtype != tf.float32 for t in op.outputs)
            or precision_lib.choose(rule, _widths(op)) != "bfloat16"):
        return _same_op(op, inputs)
    attrs = {name: op.node_def.attr[name] for name in op.node_def.attr
             if not name.startswith("_")}
    low = tf.bfloat16.as_datatype_enum
    for name in _DTYPE_ATTRS:
        if name in attrs and attrs[name].type == tf.float32.as_datatype_enum:
            attrs[name] = attr_value_pb2.AttrValue(type=low)
    created = op.graph._create_op_internal(  # pylint: disable=protected-access
        op.type, [tf.cast(x, tf.bfloat16) if x.dtype == tf.float32 else x
                  for x in inputs], [tf.bfloat16] * len(op.outputs), attrs=attrs)
    return [tf.cast(y, tf.float32) for y in created.outputs]


def _linear(op, tangents):
    return _same_op(op, [t if _floating(x) else x
                         for x, t in zip(op.inputs, tangents)])


# Whether `_multilinear` leaves out the terms of inputs whose tangent is
# `known_zero` (`tools/step_variants.py --variant=zero_tangents` traces a model each way).
LEAVE_OUT_ZEROS = True


def known_zero(tangent):
    """Whether `tangent` is the zero TensorFlow's forward mode passes for an input
    without one: `zeros_like` (unknown shapes), or a constant zero (`tf.zeros` of a
    static shape: a `Const` up to 1000 elements, a `Fill` of a constant zero
    above). Grappler does not remove a matmul or convolution of it (a profile of
    the suite's MLP step: `0 · W` of the first layer ran, 1.6 ms)."""
    op = getattr(tangent, "op", None)  # (none on an eager tensor)
    if op is None or op.type not in ("ZerosLike", "Fill", "Const"):
        return False
    if op.type == "ZerosLike":
        return True
    value = tf.get_static_value(op.inputs[1] if op.type == "Fill" else tangent)
    return value is not None and not value.any()


def _multilinear(op, tangents):
    total = None
    for i, (x, t) in enumerate(zip(op.inputs, tangents)):
        if not _floating(x) or t is None or (LEAVE_OUT_ZEROS and known_zero(t)):
            continue
        inputs = list(op.inputs)
        inputs[i] = t
        term = _same_op_in(op, inputs, getattr(_STATE, "precision", None))
        total = term if total is None else [a + b for a, b in zip(total, term)]
    if total is None:  # (every input's tangent zero)
        return [tf.zeros_like(y) for y in op.outputs]
    return total


def _structural(function):
    def run(op, tangents, attr_tuple):
        del attr_tuple
        return function(op, tangents)
    return run


def rule(op_type):
    """The inline rule for `op_type` (`(op, tangents, attr_tuple) -> output
    tangents`), or `None` where TensorFlow's dispatch keeps it. TensorFlow's own
    special cases (`Identity`, `ReadVariableOp`, `tangents.JVPS`) run inline too:
    they are written as ops already, but its dispatch traces a function for each."""
    if op_type in LINEAR:
        return _structural(_linear)
    if op_type in MULTILINEAR:
        return _structural(_multilinear)
    if op_type in ELEMENTWISE:
        return _structural(ELEMENTWISE[op_type])
    special = special_cases().get(op_type)
    if special is None:
        return None

    def run(op, tangents, attr_tuple):
        return special(attr_tuple, list(op.inputs), list(op.outputs), tangents)
    return run


# The name scope of the ops the rules create (`tangents.dropped` skips them:
# they are tangent computations, which carry no tangent of their own).
SCOPE = "inline_tangent"
_SCOPE_NAME = re.compile(SCOPE + r"(_[0-9]+)?")


def created_here(op):
    """Whether `op` is a tangent computation of an inline rule."""
    return any(_SCOPE_NAME.fullmatch(part) for part in op.name.split("/")[:-1])


_STATE = threading.local()
_INSTALLED = []


def special_cases():
    """TensorFlow's table of special-cased Jacobian-vector products (`Identity`,
    `ReadVariableOp`, and what `tangents.install_jvps` adds), or a new `{}` where
    TensorFlow's forward mode has another layout."""
    try:
        from tensorflow.python.eager import forwardprop  # pylint: disable=import-outside-toplevel,no-name-in-module
        special = forwardprop._SPECIAL_CASES  # pylint: disable=protected-access
    except (ImportError, AttributeError):
        return {}
    return special if isinstance(special, dict) else {}


def _dispatch(op_name, attr_tuple, inputs, outputs, tangents, use_batch=False):
    """TensorFlow's forward-mode dispatch, with `rule`'s tangents inline within
    `inline`."""
    original = _INSTALLED[0]
    if (getattr(_STATE, "depth", 0) and not use_batch and outputs
            and not tf.executing_eagerly()):
        found = rule(op_name)
        op = getattr(outputs[0], "op", None)
        if (found is not None and op is not None and op.type == op_name
                and all(t is not None for x, t in zip(inputs, tangents)
                        if _floating(x))):
            try:
                with record.stop_recording(), tf.name_scope(SCOPE):
                    return found(op, list(tangents), attr_tuple)
            except Exception:  # pylint: disable=broad-except
                # (A rule that cannot take this op's attributes or types: the
                # ops it created are pruned; TensorFlow's dispatch decides.)
                pass
    return original(op_name, attr_tuple, inputs, outputs, tangents, use_batch)


def _install():
    """Puts `_dispatch` in front of TensorFlow's forward-mode dispatch (once)."""
    if _INSTALLED:
        return True
    try:
        from tensorflow.python.eager import forwardprop  # pylint: disable=import-outside-toplevel,no-name-in-module
        original = forwardprop._jvp_dispatch  # pylint: disable=protected-access
    except (ImportError, AttributeError):
        return False
    _INSTALLED.append(original)
    pywrap_tfe.TFE_Py_RegisterJVPFunction(_dispatch)
    return True


@contextlib.contextmanager
def inline():
    """Within this context (on this thread), traced forward mode takes `rule`'s
    inline tangents without second-order terms (module docstring)."""
    if not _install():
        yield
        return
    _STATE.depth = getattr(_STATE, "depth", 0) + 1
    try:
        yield
    finally:
        _STATE.depth -= 1


@contextlib.contextmanager
def precision(rule):
    """Within this context (on this thread), `inline`'s tangent terms of
    `LOW_PRECISION_OPS` take the dtype that `rule` chooses for them: a dtype name
    (`"float32"`, or `"bfloat16"` for every one of them) or `precision.policy`'s
    `(dtype, min_width)` (bfloat16 for matmuls of at least that width only),
    with float32 results."""
    previous = getattr(_STATE, "precision", None)
    _STATE.precision = (rule, 0) if isinstance(rule, str) else tuple(rule)
    try:
        yield
    finally:
        _STATE.precision = previous
