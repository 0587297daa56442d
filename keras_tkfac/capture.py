"""Recording of each covered layer's input `a` and pre-activation output `s`.

`install(block)` gives the block's layer a `call` that, while a `Recording` is active
in the current thread, lets the block compute the layer's output and record `(a, s)`
(`block.record_call`: for most blocks the layer's input and its pre-activation
output, computed by the block, followed by the layer's fused activation; for a
recurrent layer its inputs and its gates' input projections, computed outside its
loop). Outside a recording the layer's own
`call` runs unchanged. Recordings are thread-local because `tf.distribute` traces each
replica's step in its own thread.

A layer called several times in one forward pass (a shared layer) records every call;
its rows are concatenated, so the statistics sum over calls.
"""

import functools
import threading
import weakref

from absl import logging
import tensorflow as tf

from keras_tkfac import native_convs

_STATE = threading.local()

# Inner model -> a weak reference to its `keras_tkfac.wrap` model, so that
# `record(self)` works inside the inner model's own `train_step`. The wrapper holds
# its inner model, so a strong value would keep the key, and with it both models,
# their optimizer and its traced functions, alive for the whole process.
_WRAPPERS = weakref.WeakKeyDictionary()

# Layers already reported as not recordable (called inside a loop or nested function).
_WARNED = weakref.WeakSet()


def register_wrapper(model, wrapper):
    """Lets `record(model)` find the curvature blocks of `wrapper`, which wraps it."""
    _WRAPPERS[model] = weakref.ref(wrapper)


def _live_wrappers():
    return [w for w in (ref() for ref in list(_WRAPPERS.values())) if w is not None]


def warn_if_unfed(optimizer):
    """Logs once per optimizer where its `apply_gradients` ran before any
    `update_curvature` while it preconditions some layer (a custom loop that
    never records: its factors are never fed, identity preconditioners), unless
    the caller warns itself (`_unfed_logged`, set by the wrapper running a
    model's own `train_step`). Checked when `apply` is traced, not when the
    optimizer is built: a loop may build it explicitly first (that went unlogged
    until 2026-12-07)."""
    if (optimizer.curvature_updates or not getattr(optimizer, "_slots", None)
            or getattr(optimizer, "_unfed_logged", False)):
        return
    optimizer._unfed_logged = True  # pylint: disable=protected-access
    logging.warning(
        "keras_tkfac: %s.apply_gradients was called before any update_curvature, "
        "so no layer is preconditioned until it is: record the forward pass with "
        "keras_tkfac.record(model) and call optimizer.update_curvature(...) before "
        "apply_gradients (README, \"Custom training loops\").",
        type(optimizer).__name__)


def unattached_wrapper(optimizer_name, variables):
    """The `keras_tkfac.wrap` model that trains most of `variables`, for an
    optimizer built before any `compile` or `update_curvature` attached it: by a
    custom loop's `apply_gradients` (its factors are then never fed: identity
    preconditioners) or by an explicit `optimizer.build(...)`, whose list may also
    hold variables outside the model (they take the partner's steps).

    Returns `None` where no variable is a Keras layer's weight (plain `tf.Variable`s
    or `keras.Variable`s made outside any layer, as keras-io's style transfer
    optimises an image): there is no model whose curvature could precondition them,
    so every variable takes the partner's step (logged once).

    Raises:
        ValueError: when `variables` is empty (an unbuilt model's), or no wrapped
            model trains any of them while some are a layer's weights (the model
            was not wrapped).
    """
    if not variables:
        raise ValueError(
            f"{optimizer_name}.build received no variables: build it with the model's "
            "`trainable_variables` once the model is built (called on a batch, or "
            "made with an `Input`), or let the first `update_curvature` build it. "
            f"Received: var_list={list(variables)!r}")
    keys = {id(v) for v in variables}
    found, shared = None, 0
    for wrapper in _live_wrappers():
        common = len(keys & {id(v) for v in wrapper.trainable_variables})
        if common > shared:
            found, shared = wrapper, common
    if found is not None:
        return found
    if not any(_is_layer_weight(v) for v in variables):
        logging.warning(
            "keras_tkfac: %s received no Keras layer's weights (%s), so it has no "
            "model curvature to precondition them with: every variable takes the "
            "first-order partner's step (`fallback`). To precondition a model's "
            "layers, wrap it with `keras_tkfac.wrap(model)`.", optimizer_name,
            ", ".join(_variable_name(v) for v in variables))
        return None
    raise ValueError(
        f"{optimizer_name} needs the model's curvature: wrap the model with `model = "
        "keras_tkfac.wrap(model)` before `compile`/`fit` (custom loops: "
        "`keras_tkfac.record(model)` and `optimizer.update_curvature(...)`).")


def _variable_name(variable):
    return getattr(variable, "path", None) or variable.name


def _is_layer_weight(variable):
    """Whether `variable` was made by a Keras layer (`add_weight`): its path is
    `layer/name`, where a variable made on its own has a bare name (a plain
    `tf.Variable` has no path)."""
    return "/" in (getattr(variable, "path", None) or "")


def wrapper_of(model):
    """The model returned by `keras_tkfac.wrap` for `model` (itself if it is one)."""
    if getattr(type(model), "_keras_tkfac_wrapper", False):
        return model
    ref = _WRAPPERS.get(model)
    return None if ref is None else ref()


class Recording:
    """The `(a, s)` pairs recorded for a set of blocks during one forward pass.

    Args:
        blocks: the `CurvatureBlock`s to record.
        variables: the trainable variables of the recorded model, or a callable
            returning them (read after the forward pass, which may create them).
        owner: optional, the wrapped model the blocks belong to.
    """

    def __init__(self, blocks, variables, owner=None):
        self.blocks = list(blocks)
        self._variables = variables
        self.owner = owner
        self.graph = tf.compat.v1.get_default_graph()
        self._calls = {id(block.layer): [] for block in self.blocks}
        self._remembered = {}
        self._preactivations = {}

    @property
    def variables(self):
        if callable(self._variables):
            return list(self._variables())
        return list(self._variables)

    def wants(self, layer):
        return id(layer) in self._calls

    def remember(self, layer, inputs, outputs, effects):
        """Keeps a layer's call for the products' pass (`reuse`): its flat tensor
        inputs, its outputs and what its ops did (`reuse._Effects`)."""
        self._remembered.setdefault(id(layer), []).append((inputs, outputs, effects))

    def remembered(self, layer):
        """`remember`'s entries of `layer`, in call order."""
        return self._remembered.get(id(layer), ())

    def all_remembered(self):
        """Every layer's `remembered` entries."""
        return list(self._remembered.values())

    def add(self, layer, inputs, outputs, layer_outputs=None):
        """Records one call's `(a, s)`; `layer_outputs`, the call's output,
        `activate(s)`, is remembered as computed from `s` (`preactivation`)."""
        self._calls[id(layer)].append((inputs, outputs))
        if layer_outputs is not None:
            self._preactivations[id(layer_outputs)] = (layer_outputs, outputs)

    def preactivation(self, layer_outputs):
        """The recorded `s` of the call whose output is `layer_outputs`, or
        `None` (not a recorded call's output)."""
        found = self._preactivations.get(id(layer_outputs))
        return found[1] if found is not None and found[0] is layer_outputs else None

    def calls(self, block):
        """The list of `(a, s)` recorded for `block`, one pair per call."""
        return self._calls[id(block.layer)]

    def outputs(self):
        """Every recorded `s`, flattened in block order."""
        return [s for block in self.blocks for _, s in self.calls(block)]

    def rows(self, output_grads, layers=None, location_stride=1, location_phase=0,
             sequences=False, norms=False, location_replica=0):
        """Per block, the `(a, g)` rows of all its calls.

        Args:
            output_grads: gradients with respect to `outputs()`, same order; `None`
                entries (a call that does not reach the loss) count as zeros.
            layers: optional set of `id(layer)`; other blocks get `None` (their
                rows, e.g. im2col patches, are not built).
            location_stride: blocks with a `sampled_rows` method (convolutions)
                give the rows of every `location_stride`-th output location along
                each spatial axis. Defaults to `1` (all locations).
            location_phase: the grid's offsets (`ConvBlock.sampled_rows`); an
                integer or an integer scalar tensor. Defaults to `0`.
            location_replica: this replica's index (an integer or an integer
                scalar tensor): example `n` of a call's batch of `B` takes the
                phase `location_phase + location_replica * B + n`, that of its
                place in the global batch on one device where every replica has
                `B` examples (replicas then sample as one device does). Defaults
                to `0`.
            sequences: blocks with a `sequence_rows` method (`Dense` and
                `EinsumDense` on sequences, recurrent layers) keep their calls'
                positions as an axis, `[sequences, positions, ...]`, where every
                call on sequences has the same static number of positions (the
                calls' sequences one after another); otherwise, and for other
                blocks, rows. Defaults to `False`.
            norms: also give each block's `|a_r|^2` where every call's rows are
                `rows`' and the block finds them without squaring the rows
                (`CurvatureBlock.row_norms`), else `None`. Defaults to `False`.

        Returns:
            A list of `(a_rows, g_rows)` (with `norms`, `(a_rows, g_rows,
            a_norms or None)`), one per block, or `None` for a block that was not
            called or not asked for.
        """
        result = []
        position = 0
        for block in self.blocks:
            a_parts, g_parts, n_parts = [], [], []
            calls = self.calls(block)
            if layers is not None and id(block.layer) not in layers:
                position += len(calls)
                result.append(None)
                continue
            if sequences and hasattr(block, "sequence_rows") and _steps_of_one_sequence(
                    [inputs for inputs, _ in calls]):
                # `TimeDistributed`'s calls, one per step of one sequence: that
                # sequence, as `Dense` on it would record it.
                grads = [tf.zeros_like(s) if g is None else g for (_, s), g in zip(
                    calls, output_grads[position:position + len(calls)])]
                position += len(calls)
                found = block.sequence_rows(tf.stack([i for i, _ in calls], 1),
                                            tf.stack(grads, 1))
                result.append(found + (None,) if norms else found)
                continue
            for inputs, s in calls:
                grad = output_grads[position]
                position += 1
                if grad is None:
                    grad = tf.zeros_like(s)
                found = None
                if sequences and hasattr(block, "sequence_rows"):
                    found = block.sequence_rows(inputs, grad)
                if found is None and location_stride > 1 and hasattr(
                        block, "sampled_rows"):
                    first = location_phase + location_replica * tf.shape(
                        tf.nest.flatten(inputs)[0])[0]
                    found = block.sampled_rows(inputs, grad, location_stride, first)
                if found is None:
                    found = block.rows(inputs, grad)
                    n_parts.append(block.row_norms(inputs) if norms else None)
                else:
                    n_parts.append(None)
                a_parts.append(found[0])
                g_parts.append(found[1])
            if not a_parts:
                result.append(None)
                continue
            a_norms = None
            if all(n is not None for n in n_parts):
                a_norms = n_parts[0] if len(n_parts) == 1 else tf.concat(n_parts, 0)
            if len(a_parts) > 1 and not _one_shape_of_sequences(a_parts, block):
                # Calls on vectors and sequences, or on sequences of different
                # lengths: every call's positions as rows.
                rank = 3 if block.groups > 1 else 2
                a_parts = [_as_rows(a, rank) for a in a_parts]
                g_parts = [_as_rows(g, rank) for g in g_parts]
            if len(a_parts) == 1:
                found = (a_parts[0], g_parts[0])
            else:
                found = (tf.concat(a_parts, 0), tf.concat(g_parts, 0))
            result.append(found + (a_norms,) if norms else found)
        return result


def _one_shape_of_sequences(parts, block):
    """Whether every part is `[sequences, T, ...]` with one static `T`, or every
    part is rows (an embedding's rows are ids, `[rows]`: a layer shared by inputs
    of different ranks, such as a key-value memory `[B, M, 2]` and queries
    `[B, Q]`, raised an `IndexError` here until 2026-12-07)."""
    rank = 3 if block.groups > 1 else 2
    ranks = {p.shape.rank for p in parts}
    if ranks == {rank} or ranks == {1}:
        return True
    lengths = {p.shape[1] for p in parts}
    return ranks == {rank + 1} and len(lengths) == 1 and None not in lengths


def _steps_of_one_sequence(inputs):
    """Whether several calls' inputs are the steps `x[t]` (an index, not a range)
    of one traced rank-3 tensor, all of one static shape `[batch, d]`: Keras 3's
    `TimeDistributed` calls its layer once per step of its (time-major) input, so
    the calls share the examples. (Slices of the batch, `x[:16]`, keep their rank
    and are not steps.)"""
    if len(inputs) < 2:
        return False
    sources = set()
    for x in inputs:
        op = getattr(x, "op", None)
        if (isinstance(x, tf.__internal__.EagerTensor) or op is None
                or op.type != "StridedSlice" or x.shape.rank != 2
                or x.shape != inputs[0].shape or op.inputs[0].shape.rank != 3
                or not op.get_attr("shrink_axis_mask")):
            return False
        sources.add(op.inputs[0].ref())
    return len(sources) == 1


def _as_rows(x, rank):
    """`[sequences, T, ...]` as rows `[sequences * T, ...]`; rows unchanged."""
    if x.shape.rank == rank:
        return x
    return tf.reshape(x, [-1] + x.shape[2:].as_list())


class record:
    """Context manager that records the covered layers' `(a, s)` in this thread.

    Example:

    ```python
    with tf.GradientTape(persistent=True) as tape:
        with keras_tkfac.record(model) as recording:
            y_pred = model(x, training=True)
        loss = loss_fn(y, y_pred)
    ```

    Args:
        model: a model returned by `keras_tkfac.wrap`, or the model it wraps (for
            use inside that model's own `train_step`).
    """

    def __init__(self, model):
        wrapper = wrapper_of(model)
        if wrapper is None:
            raise ValueError(
                "keras_tkfac.record needs a model returned by keras_tkfac.wrap(model). "
                f"Received: model={model!r}"
            )
        self._recording = Recording(
            wrapper.blocks, lambda: model.trainable_variables, owner=wrapper
        )

    def __enter__(self):
        self._previous = getattr(_STATE, "recording", None)
        _STATE.recording = self._recording
        return self._recording

    def __exit__(self, *exc_info):
        _STATE.recording = self._previous
        return False


def _tape_records():
    """Whether a gradient tape records the ops created now (`False` inside a
    tape's `stop_recording`, which `tf.recompute_grad` uses for its forward
    pass). Where TensorFlow's private API differs, assumed `True`."""
    try:
        from tensorflow.python.eager import record as tape_record  # pylint: disable=import-outside-toplevel
    except ImportError:  # pragma: no cover
        return True
    could = getattr(tape_record, "could_possibly_record", None)
    return True if could is None else bool(could())


def active():
    """The `Recording` active in this thread, or `None`."""
    return getattr(_STATE, "recording", None)


def install(block):
    """Replaces `block.layer.call` by a recording call. Idempotent."""
    layer = block.layer
    # The block the recording call records with: the latest installed (a block
    # class registered after `wrap` replaces an earlier block of the layer).
    object.__setattr__(layer, "_keras_tkfac_block", block)
    if getattr(layer.call, "_keras_tkfac_recording", False):
        return
    # A convolution Keras runs through XLA computes with TensorFlow's own ops
    # (`native_convs`), before the recording call wraps it.
    native_convs.install(layer)
    original = layer.call

    @functools.wraps(original)
    def recording_call(inputs, *args, **kwargs):
        recording = getattr(_STATE, "recording", None)
        if recording is None or not recording.wants(layer):
            return original(inputs, *args, **kwargs)
        graph = tf.compat.v1.get_default_graph()
        if graph is not recording.graph:
            # Called inside a `tf.while_loop` (an RNN cell) or a nested function:
            # its tensors cannot leave that graph, so the layer is not recorded.
            # Keras's shape inference (building an unbuilt model inside the step:
            # `compute_output_spec`'s scratch graph) is not a training call.
            if str(getattr(graph, "name", "")).startswith("scratch_graph"):
                return original(inputs, *args, **kwargs)
            if layer not in _WARNED:
                _WARNED.add(layer)
                logging.warning(
                    "keras_tkfac: layer %r is called inside a loop or nested "
                    "function and cannot be recorded; its curvature is not "
                    "updated. Exclude it: keras_tkfac.wrap(model, exclude=[%r]).",
                    layer.name, layer.name,
                )
            return original(inputs, *args, **kwargs)
        if not _tape_records():
            # Inside `tf.recompute_grad` (`keras.remat`) or a tape's
            # `stop_recording`: no gradient reaches the recorded output, and its
            # statistics would be zeros.
            if layer not in _WARNED:
                _WARNED.add(layer)
                logging.warning(
                    "keras_tkfac: layer %r is called where no gradient tape records "
                    "(inside tf.recompute_grad, keras.remat or stop_recording): its "
                    "output gradients cannot be recorded and its curvature is not "
                    "updated. Exclude it to train it with the first-order partner: "
                    "keras_tkfac.wrap(model, exclude=[%r]).", layer.name, layer.name,
                )
            return original(inputs, *args, **kwargs)
        if isinstance(inputs, tf.SparseTensor):  # `Hashing(sparse=True)` -> Dense
            inputs = tf.sparse.to_dense(inputs)
        current = getattr(layer, "_keras_tkfac_block", block)
        a, s, outputs = current.record_call(original, inputs, *args, **kwargs)
        recording.add(layer, a, s, outputs)
        return outputs

    recording_call._keras_tkfac_recording = True
    object.__setattr__(layer, "call", recording_call)
