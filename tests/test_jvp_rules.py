"""Oracle tests of `keras_tkfac.jvp_rules`: every inline rule against TensorFlow's
own forward mode (its per-op dispatch), one and two directions at once."""

import numpy as np
import pytest
import tensorflow as tf

from keras_tkfac import jvp_rules
from keras_tkfac import tangents

# Nested accumulators need TensorFlow's forward mode to give the comparisons in
# `tf.where`'s conditions a tangent (as the products' pass installs).
tangents.install_jvps()

RNG = np.random.default_rng(0)

_IMAGE = (2, 5, 5, 3)
_VOLUME = (1, 4, 4, 4, 2)

# (op type, function of the primals, the primals' shapes). Each function's
# result depends on the op under test (and possibly others).
CASES = [
    ("Identity", lambda x: tf.identity(x), [(2, 3)]),
    ("Neg", lambda x: -x, [(2, 3)]),
    ("AddV2", lambda x, b: x + b, [(2, 3), (3,)]),
    ("Add", lambda x, b: tf.raw_ops.Add(x=x, y=b), [(2, 3), (2, 1)]),
    ("Sub", lambda x, b: b - x, [(2, 3), (3,)]),
    ("AddN", lambda x, y: tf.add_n([x, y, x]), [(2, 3), (2, 3)]),
    ("BiasAdd", lambda x, b: tf.nn.bias_add(x, b), [_IMAGE, (3,)]),
    ("Reshape", lambda x: tf.reshape(x, [3, 2]), [(2, 3)]),
    ("Transpose", lambda x: tf.transpose(x, [1, 0]), [(2, 3)]),
    ("ExpandDims", lambda x: tf.expand_dims(x, 1), [(2, 3)]),
    ("Squeeze", lambda x: tf.squeeze(x, [1]), [(2, 1, 3)]),
    ("StridedSlice", lambda x: x[:, 1:, ::2], [(2, 3, 4)]),
    ("Slice", lambda x: tf.slice(x, [0, 1], [2, 2]), [(2, 3)]),
    ("ConcatV2", lambda x, y: tf.concat([x, y], 1), [(2, 3), (2, 2)]),
    ("Pack", lambda x, y: tf.stack([x, y], 1), [(2, 3), (2, 3)]),
    ("Unpack", lambda x: tf.unstack(x, axis=1)[1], [(2, 3)]),
    ("Split", lambda x: tf.split(x, 2, axis=1)[1], [(2, 4)]),
    ("SplitV", lambda x: tf.split(x, [1, 3], axis=1)[1], [(2, 4)]),
    ("Tile", lambda x: tf.tile(x, [2, 3]), [(2, 3)]),
    ("BroadcastTo", lambda x: tf.broadcast_to(x, [4, 3]), [(1, 3)]),
    ("Pad", lambda x: tf.pad(x, [[1, 0], [0, 2]]), [(2, 3)]),
    ("PadV2", lambda x: tf.pad(x, [[1, 0], [0, 2]], constant_values=1.5), [(2, 3)]),
    ("MirrorPad", lambda x: tf.pad(x, [[1, 1], [0, 2]], "REFLECT"), [(3, 4)]),
    ("GatherV2", lambda x: tf.gather(x, [2, 0, 2], axis=1), [(2, 3)]),
    ("Mean", lambda x: tf.reduce_mean(x, [0, 2], keepdims=True), [(2, 3, 4)]),
    ("Sum", lambda x: tf.reduce_sum(x, 1), [(2, 3)]),
    ("AvgPool", lambda x: tf.nn.avg_pool2d(x, 2, 1, "SAME"), [_IMAGE]),
    ("AvgPool3D", lambda x: tf.nn.avg_pool3d(x, 2, 2, "VALID"), [_VOLUME]),
    ("Select", lambda x, y: tf.raw_ops.Select(
        condition=tf.constant([True, False]), x=x, y=y), [(2, 3), (2, 3)]),
    ("SelectV2", lambda x, y: tf.where(x > 0, x, y), [(2, 3), (3,)]),
    ("DepthToSpace", lambda x: tf.nn.depth_to_space(x, 2), [(1, 2, 2, 4)]),
    ("SpaceToDepth", lambda x: tf.nn.space_to_depth(x, 2), [(1, 4, 4, 1)]),
    ("Cumsum", lambda x: tf.cumsum(x, 1, exclusive=True, reverse=True), [(2, 3)]),
    ("Mul", lambda x, y: x * y, [(2, 3), (3,)]),
    ("MatMul", lambda x, w: tf.matmul(x, w, transpose_b=True), [(2, 3), (4, 3)]),
    ("BatchMatMulV2", lambda x, w: tf.matmul(x, w, adjoint_a=True),
     [(2, 3, 4), (3, 5)]),
    ("BatchMatMulV3", lambda x, w: tf.raw_ops.BatchMatMulV3(
        x=x, y=w, Tout=tf.float32), [(2, 3, 4), (2, 4, 2)]),
    ("Einsum", lambda x, w, v: tf.einsum("bij,jk,bk->bi", x, w, v),
     [(2, 3, 4), (4, 5), (2, 5)]),
    ("Conv2D", lambda x, w: tf.nn.conv2d(x, w, [1, 2, 2, 1], "SAME",
                                         dilations=1), [_IMAGE, (3, 3, 3, 4)]),
    ("Conv3D", lambda x, w: tf.nn.conv3d(x, w, [1, 1, 1, 1, 1], "SAME"),
     [_VOLUME, (2, 2, 2, 2, 3)]),
    ("DepthwiseConv2dNative", lambda x, w: tf.nn.depthwise_conv2d(
        x, w, [1, 1, 1, 1], "VALID", dilations=[2, 2]), [_IMAGE, (2, 2, 3, 2)]),
    ("Conv2DBackpropInput", lambda x, w: tf.nn.conv2d_transpose(
        x, w, [2, 10, 10, 4], 2, "SAME"), [_IMAGE, (3, 3, 4, 3)]),
    ("Conv3DBackpropInputV2", lambda x, w: tf.nn.conv3d_transpose(
        x, w, [1, 8, 8, 8, 3], 2, "SAME"), [_VOLUME, (2, 2, 2, 3, 2)]),
    ("Relu", tf.nn.relu, [(2, 3)]),
    ("Relu6", lambda x: tf.nn.relu6(4.0 * x), [(2, 3)]),
    ("Elu", tf.nn.elu, [(2, 3)]),
    ("Selu", tf.nn.selu, [(2, 3)]),
    ("Sigmoid", tf.sigmoid, [(2, 3)]),
    ("Tanh", tf.tanh, [(2, 3)]),
    ("Sqrt", lambda x: tf.sqrt(tf.square(x) + 1.0), [(2, 3)]),
    ("Rsqrt", lambda x: tf.math.rsqrt(tf.square(x) + 1.0), [(2, 3)]),
    ("Reciprocal", lambda x: tf.math.reciprocal(tf.square(x) + 1.0), [(2, 3)]),
    ("Exp", tf.exp, [(2, 3)]),
    ("Log", lambda x: tf.math.log(tf.square(x) + 1.0), [(2, 3)]),
    ("Square", tf.square, [(2, 3)]),
    ("Softplus", tf.nn.softplus, [(2, 3)]),
    ("Erf", tf.math.erf, [(2, 3)]),
    ("Erfc", tf.math.erfc, [(2, 3)]),
    ("MaxPool", lambda x: tf.nn.max_pool2d(x, 2, 2, "SAME"), [_IMAGE]),
    ("MaxPool3D", lambda x: tf.nn.max_pool3d(x, 2, 1, "VALID"), [_VOLUME]),
    ("LeakyRelu", lambda x: tf.nn.leaky_relu(x, 0.3), [(2, 3)]),
    ("RealDiv", lambda x, y: x / (tf.square(y) + 1.0), [(2, 3), (3,)]),
    ("SquaredDifference", tf.math.squared_difference, [(2, 3), (3,)]),
    ("Maximum", tf.maximum, [(2, 3), (3,)]),
    ("Minimum", tf.minimum, [(2, 3), (3,)]),
    ("Softmax", tf.nn.softmax, [(2, 3)]),
    ("LogSoftmax", tf.nn.log_softmax, [(2, 3)]),
]


def _normal(shape):
    return tf.constant(RNG.normal(size=shape).astype("float32"))


def _jvps(fn, primals, directions, inline, rule=None):
    """The tangents of `fn(*primals)` along each direction (nested accumulators,
    traced), and the op types whose tangents an inline rule computed; with `rule`,
    within `jvp_rules.precision(rule)`, also the types of the traced ops with
    bfloat16 outputs."""
    used = set()
    original = jvp_rules.rule

    def recording(op_type):
        found = original(op_type)
        if found is None:
            return None

        def rule(op, tangents, attr_tuple):
            used.add(op_type)
            return found(op, tangents, attr_tuple)
        return rule

    @tf.function
    def run():
        with jvp_rules.inline() if inline else _nothing(), _patched(recording), (
                jvp_rules.precision(rule) if rule else _nothing()):
            accumulators = []
            for direction in directions:
                accumulators.append(tf.autodiff.ForwardAccumulator(primals, direction))
                accumulators[-1].__enter__()
            try:
                result = fn(*primals)
            finally:
                for accumulator in reversed(accumulators):
                    accumulator.__exit__(None, None, None)
        return [accumulator.jvp(result) for accumulator in accumulators]

    values = run()
    if rule is None:
        return [v.numpy() for v in values], used
    low = {op.type for op in run.get_concrete_function().graph.get_operations()
           if any(t.dtype == tf.bfloat16 for t in op.outputs)}
    return [v.numpy() for v in values], low


class _patched:
    def __init__(self, rule):
        self.rule, self.original = rule, jvp_rules.rule

    def __enter__(self):
        jvp_rules.rule = self.rule

    def __exit__(self, *args):
        jvp_rules.rule = self.original
        return False


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


@pytest.mark.parametrize("op_type,fn,shapes", CASES, ids=[c[0] for c in CASES])
def test_inline_rule_equals_tensorflows_forward_mode(op_type, fn, shapes):
    """Each rule's tangent equals TensorFlow's dispatch, for two directions carried
    at once; the rule computed them."""
    assert jvp_rules.rule(op_type) is not None
    primals = [_normal(s) for s in shapes]
    directions = [[_normal(s) for s in shapes] for _ in range(2)]
    expected, _ = _jvps(fn, primals, directions, inline=False)
    found, used = _jvps(fn, primals, directions, inline=True)
    assert op_type in used
    for a, b in zip(found, expected):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


# Max pooling whose windows tile the input (`jvp_rules._tiled_max_pool`), with
# primals of many tied maxima (integers) where `ties` is set.
_TILED = [
    ("valid", lambda x: tf.nn.max_pool2d(x, 2, 2, "VALID"), (2, 6, 7, 3), False),
    ("ties", lambda x: tf.nn.max_pool2d(x, 2, 2, "VALID"), (2, 6, 6, 3), True),
    ("same_divisible", lambda x: tf.nn.max_pool2d(x, 2, 2, "SAME"), (2, 6, 4, 3), True),
    ("window_3", lambda x: tf.nn.max_pool2d(x, 3, 3, "VALID"), (2, 6, 8, 2), False),
    ("one_dimensional", lambda x: tf.nn.max_pool1d(x, 2, 2, "VALID"), (2, 8, 3), True),
]
# Windows that overlap, or padding that pads: `MaxPoolGradGrad` as before.
_UNTILED = [
    ("overlapping", lambda x: tf.nn.max_pool2d(x, 3, 2, "VALID"), (2, 7, 7, 3)),
    ("same_padded", lambda x: tf.nn.max_pool2d(x, 2, 2, "SAME"), _IMAGE),
]


def _pooling_ops(fn, primal, direction):
    @tf.function
    def run():
        with jvp_rules.inline(), tf.autodiff.ForwardAccumulator(
                [primal], [direction]) as accumulator:
            result = fn(primal)
        return accumulator.jvp(result)
    return {op.type for op in run.get_concrete_function().graph.get_operations()}


@pytest.mark.parametrize("name,fn,shape,ties", _TILED, ids=[c[0] for c in _TILED])
def test_tiled_max_pooling_takes_its_tangent_from_the_routing(name, fn, shape, ties):
    """Where the windows tile the input, the tangent comes from `MaxPoolGrad`'s
    routing and an average pooling, not `MaxPoolGradGrad`, and equals TensorFlow's
    forward mode, tied maxima included."""
    del name
    primal = _normal(shape)
    if ties:
        primal = tf.round(primal)  # about a third of each window's entries tie
    directions = [[_normal(shape)] for _ in range(2)]
    expected, _ = _jvps(fn, [primal], directions, inline=False)
    found, used = _jvps(fn, [primal], directions, inline=True)
    assert "MaxPool" in used
    for a, b in zip(found, expected):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    types = _pooling_ops(fn, primal, directions[0][0])
    assert "MaxPoolGrad" in types and "MaxPoolGradGrad" not in types


@pytest.mark.parametrize("name,fn,shape", _UNTILED, ids=[c[0] for c in _UNTILED])
def test_max_pooling_that_does_not_tile_keeps_the_gradients_gradient(name, fn, shape):
    del name
    primal, direction = _normal(shape), _normal(shape)
    assert "MaxPoolGradGrad" in _pooling_ops(fn, primal, direction)
    jvp_rules.TILED_MAX_POOL = False
    try:
        assert "MaxPoolGradGrad" in _pooling_ops(
            lambda x: tf.nn.max_pool2d(x, 2, 2, "VALID"), _normal((1, 4, 4, 1)),
            _normal((1, 4, 4, 1)))
    finally:
        jvp_rules.TILED_MAX_POOL = True


def test_every_rule_has_a_case():
    """No rule without its oracle above."""
    rules = jvp_rules.LINEAR | jvp_rules.MULTILINEAR | set(jvp_rules.ELEMENTWISE)
    assert rules == {case[0] for case in CASES}


def test_tensorflows_special_cases_run_inline():
    """TensorFlow's special cases (a variable's read, `tangents.JVPS`: `Cast`, the
    bilinear resize) take the same tangents inline."""
    variable = tf.Variable(RNG.normal(size=_IMAGE).astype("float32"))
    directions = [[_normal(_IMAGE)] for _ in range(2)]

    def fn(v):
        resized = tf.image.resize(v, [7, 7], "bilinear")
        return tf.cast(tf.cast(resized, tf.float64) * 2.0, tf.float32)

    expected, _ = _jvps(fn, [variable], directions, inline=False)
    found, used = _jvps(fn, [variable], directions, inline=True)
    assert {"ReadVariableOp", "ResizeBilinear", "Cast"} <= used
    for a, b in zip(found, expected):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_a_rule_that_fails_leaves_the_op_to_tensorflow(monkeypatch):
    """A rule that raises (an attribute or type it does not take) does not fail
    the pass: TensorFlow's dispatch computes that op's tangent."""
    original = jvp_rules.rule

    def failing(op_type):
        if op_type == "Conv2D":
            def rule(op, tangents, attr_tuple):
                raise TypeError("not this one")
            return rule
        return original(op_type)

    monkeypatch.setattr(jvp_rules, "rule", failing)
    op_type, fn, shapes = [case for case in CASES if case[0] == "Conv2D"][0]
    primals = [_normal(s) for s in shapes]
    directions = [[_normal(s) for s in shapes] for _ in range(2)]
    found, _ = _jvps(fn, primals, directions, inline=True)
    monkeypatch.setattr(jvp_rules, "rule", original)
    expected, _ = _jvps(fn, primals, directions, inline=False)
    for a, b in zip(found, expected):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_second_order_terms_are_left_out_only_inside_the_context():
    """Nested accumulators compute second derivatives (the outer one differentiates
    the inner one's tangent); inside `inline` the tangent computations are hidden
    from the outer accumulator (none: nothing in the products' pass reads them);
    outside it TensorFlow's forward mode is unchanged."""
    x = _normal((3,))
    u, v = _normal((3,)), _normal((3,))

    def second(inline):
        @tf.function
        def run():
            with jvp_rules.inline() if inline else _nothing():
                with tf.autodiff.ForwardAccumulator(x, u) as outer:
                    with tf.autodiff.ForwardAccumulator(x, v) as inner:
                        y = tf.exp(x)
                    inner_tangent = inner.jvp(y)
            return outer.jvp(inner_tangent, tf.UnconnectedGradients.ZERO)
        return run().numpy()

    np.testing.assert_allclose(second(False), np.exp(x) * u * v, rtol=1e-5)
    np.testing.assert_array_equal(second(True), np.zeros(3))


def test_eager_forward_mode_is_untouched():
    """Eagerly, inside `inline`, the tangents are TensorFlow's (computed with its
    dispatch: there are no graph ops to write rules for)."""
    x, u = _normal((2, 3)), _normal((2, 3))
    with jvp_rules.inline():
        with tf.autodiff.ForwardAccumulator(x, u) as accumulator:
            y = tf.tanh(x) * x
    np.testing.assert_allclose(
        accumulator.jvp(y), (1 - np.tanh(x) ** 2) * x * u + np.tanh(x) * u, rtol=1e-5)


_WITHOUT_INPUT_TANGENT = ("Mul", "MatMul", "Conv2D", "Conv2DBackpropInput")


@pytest.mark.parametrize("static", [True, False], ids=["static", "unknown_batch"])
@pytest.mark.parametrize("op_type", _WITHOUT_INPUT_TANGENT)
def test_multilinear_rules_leave_out_an_input_without_tangent(op_type, static,
                                                              monkeypatch):
    """The network's input has no tangent: TensorFlow's forward mode passes a zero
    filler for it (a constant where its shape is static, `zeros_like` otherwise), and
    the rule computes the op on the weight's tangent only (one op per direction,
    not two), with TensorFlow's dispatch's tangents."""
    _, fn, shapes = [case for case in CASES if case[0] == op_type][0]
    x, w = _normal(shapes[0]), _normal(shapes[1])
    directions = [_normal(shapes[1]) for _ in range(2)]
    spec = tf.TensorSpec(x.shape if static else [None, *x.shape[1:]], x.dtype)

    def traced(inline):
        @tf.function(input_signature=[spec])
        def run(data):
            with jvp_rules.inline() if inline else _nothing():
                accumulators = [tf.autodiff.ForwardAccumulator(w, d)
                                for d in directions]
                for accumulator in accumulators:
                    accumulator.__enter__()
                try:
                    result = fn(data, w)
                finally:
                    for accumulator in reversed(accumulators):
                        accumulator.__exit__(None, None, None)
            return [accumulator.jvp(result) for accumulator in accumulators]

        graph = run.get_concrete_function().graph
        terms = [op for op in graph.get_operations()
                 if op.type == op_type and jvp_rules.created_here(op)]
        return [v.numpy() for v in run(x)], len(terms)

    expected, _ = traced(inline=False)
    found, terms = traced(inline=True)
    assert terms == len(directions)
    for a, b in zip(found, expected):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # (Without leaving them out, the rule also computes the op on the zeros.)
    monkeypatch.setattr(jvp_rules, "LEAVE_OUT_ZEROS", False)
    found, terms = traced(inline=True)
    assert terms == 2 * len(directions)
    for a, b in zip(found, expected):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_known_zero_is_only_the_zero_filler():
    """`known_zero`: `zeros_like`, a constant zero (`tf.zeros`: a `Const` when small,
    a `Fill` when large); not a constant or `Fill` of another value, nor a zero
    computed otherwise."""
    found = []

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32)])
    def check(x):
        found.extend(jvp_rules.known_zero(c) for c in [
            tf.zeros_like(x), tf.zeros([2, 3]), tf.zeros([40, 50]),
            tf.ones([2, 3]), tf.fill([40, 50], 1.5), x * 0.0,
            tf.fill(tf.shape(x), tf.constant(0.0))])
        return x

    check.get_concrete_function()
    assert found == [True, True, True, False, False, False, True]


def test_multilinear_rule_with_every_tangent_zero_gives_zeros():
    """The multilinear rule given only zero fillers as tangents (every term left
    out) returns a zero tangent of each output's shape and type; with one nonzero
    tangent, that input's term alone."""
    a, b = _normal((2, 3)), _normal((3,))
    t = _normal((3,))

    @tf.function
    def run():
        y = a * b
        zeros = jvp_rules._multilinear(y.op, [tf.zeros_like(a), tf.zeros([3])])
        one = jvp_rules._multilinear(y.op, [tf.zeros_like(a), t])
        return zeros[0], one[0]

    zeros, one = run()
    assert zeros.shape == (2, 3) and zeros.dtype == tf.float32
    np.testing.assert_array_equal(zeros.numpy(), np.zeros((2, 3)))
    np.testing.assert_allclose(one.numpy(), a.numpy() * t.numpy(), rtol=1e-6)


_LOW = [case for case in CASES if case[0] in jvp_rules.LOW_PRECISION_OPS]


@pytest.mark.parametrize("op_type,fn,shapes", _LOW, ids=[c[0] for c in _LOW])
def test_low_precision_rule_is_tensorflows_forward_mode_rounded(op_type, fn, shapes):
    """Within `precision("bfloat16")` each matmul and convolution computes its
    tangent terms in bfloat16 (the traced op runs on bfloat16 tensors) with float32
    results, equal to TensorFlow's float32 forward mode up to bfloat16's rounding.
    Each term `op(..., t_i, ...)` rounds its operands, any intermediate (the
    three-operand einsum's) and its output to 8 significant bits (relative 2^-9
    each, at most five roundings): each entry is within 2^-6 of the same term of
    the operands' absolute values, `op(|x_1|, ..., |t_i|, ...)`, summed over the
    terms (which bounds the sum of the entry's products' magnitudes)."""
    assert jvp_rules.LOW_PRECISION_OPS <= jvp_rules.MULTILINEAR
    primals = [_normal(s) for s in shapes]
    directions = [[_normal(s) for s in shapes] for _ in range(2)]
    expected, _ = _jvps(fn, primals, directions, inline=False)
    found, low = _jvps(fn, primals, directions, inline=True, rule="bfloat16")
    assert op_type in low
    for a, b, direction in zip(found, expected, directions):
        magnitude = sum(
            fn(*[tf.abs(d) if j == i else tf.abs(p)
                 for j, (p, d) in enumerate(zip(primals, direction))]).numpy()
            for i in range(len(primals)))
        assert a.dtype == np.float32
        assert np.all(np.abs(a - b) <= 2.0**-6 * magnitude), np.max(
            np.abs(a - b) / magnitude)


def test_low_precision_leaves_other_ops_in_float32():
    """Only `LOW_PRECISION_OPS` change precision: an elementwise product's and an
    activation's tangents stay float32 and exact."""
    shapes = [(2, 3), (3,)]
    primals = [_normal(s) for s in shapes]
    directions = [[_normal(s) for s in shapes] for _ in range(2)]
    fn = lambda x, y: tf.tanh(x * y)  # noqa: E731
    expected, _ = _jvps(fn, primals, directions, inline=False)
    found, low = _jvps(fn, primals, directions, inline=True, rule="bfloat16")
    assert not low
    for a, b in zip(found, expected):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shapes,low", [
    ([(4, 256), (256, 128)], True),
    ([(4, 256), (256, 64)], False),   # output width below 128
    ([(4, 100), (100, 512)], False),  # contracted width below 128
])
def test_auto_precision_takes_bfloat16_for_wide_matmuls_only(shapes, low):
    """Under `precision(("bfloat16", 128))` (`"auto"` on bfloat16 hardware) a matmul
    takes bfloat16 where both its contracted and output widths are at least 128,
    and a convolution never does."""
    primals = [_normal(s) for s in shapes]
    directions = [[_normal(s) for s in shapes] for _ in range(2)]

    @tf.function
    def run(rule):
        with jvp_rules.inline(), jvp_rules.precision(rule):
            with tf.autodiff.ForwardAccumulator(primals, directions[0]) as acc:
                result = tf.matmul(*primals)
        return acc.jvp(result)

    graph = run.get_concrete_function(("bfloat16", 128)).graph
    found = {op.type for op in graph.get_operations()
             if any(t.dtype == tf.bfloat16 for t in op.outputs)}
    assert ("MatMul" in found) == low
    image, kernel = _normal((2, 8, 8, 128)), _normal((3, 3, 128, 128))

    @tf.function
    def conv():
        with jvp_rules.inline(), jvp_rules.precision(("bfloat16", 128)):
            with tf.autodiff.ForwardAccumulator(
                    [image, kernel], [_normal(image.shape), _normal(kernel.shape)]) as acc:
                result = tf.nn.conv2d(image, kernel, 1, "SAME")
        return acc.jvp(result)

    assert not any(t.dtype == tf.bfloat16 for op in
                   conv.get_concrete_function().graph.get_operations()
                   for t in op.outputs)


def test_auto_precision_leaves_matmuls_in_loops_in_float32():
    """A wide matmul inside a `tf.while_loop` (a recurrent layer's step) stays float32
    under `"auto"`'s rule; the same matmul outside the loop takes bfloat16."""
    x, w = _normal((4, 256)), _normal((256, 256))
    direction = [_normal((4, 256)), _normal((256, 256))]

    @tf.function
    def run(in_loop):
        with jvp_rules.inline(), jvp_rules.precision(("bfloat16", 128)):
            with tf.autodiff.ForwardAccumulator([x, w], direction) as acc:
                if in_loop:
                    _, result = tf.while_loop(
                        lambda i, h: i < 2, lambda i, h: (i + 1, tf.matmul(h, w)),
                        [0, x])
                else:
                    result = tf.matmul(x, w)
        return acc.jvp(result)

    def low(in_loop):
        graphs = [run.get_concrete_function(in_loop).graph]
        graphs += [f.graph for f in getattr(graphs[0], "_functions", {}).values()
                   if hasattr(f, "graph")]
        return any(t.dtype == tf.bfloat16 for g in graphs
                   for op in g.get_operations() for t in op.outputs)

    assert low(False)
    assert not low(True)
