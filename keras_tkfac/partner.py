"""The first-order partner: how variables without a curvature block are updated.

Embeddings that are too large for a block, normalisation scales and offsets (unless
`register_normalization_blocks()` gave `LayerNormalization` and `BatchNormalization`
blocks), recurrent weights and custom layers have no Kronecker-factored curvature. The curvature optimizer routes them, once, at
`build`, to a first-order partner, as Keras's `Muon` routes non-matrix weights to
AdamW. The partner's state lives in the curvature
optimizer's own variables, so `.keras` files, checkpoints, strategies and mixed
precision treat it like the rest of the optimizer's state.

Partners:

- `"adam"` (the default): Adam with decoupled weight decay (AdamW when the optimizer
  has `weight_decay`). Per-coordinate scaling lets rare embedding rows and small
  normalisation parameters learn; momentum SGD at the curvature step size was
  measured to leave a transformer's embeddings and LayerNorms, and a bidirectional
  LSTM, at chance.
- `"sgd"`: heavy-ball momentum SGD, `m <- momentum * m + g`, the update of the
  preconditioned weights applied to the raw gradient (this package's behaviour before
  the partner existed, with `fallback_lr_ratio=1`).
- a `keras.optimizers.Adam`, `AdamW` or `SGD` instance: its hyperparameters, learning
  rate (a number or a schedule) and weight decay included, are copied into the
  partner; the instance itself is not used to train. Where the instance sets a
  `weight_decay` (AdamW's default is 0.004), the partner's variables decay by it
  (decoupled, at the partner's learning rate, as Keras's AdamW; the instance's
  `exclude_from_weight_decay` is respected) instead of by the curvature
  optimizer's `weight_decay`; where it sets none (Adam's and SGD's default), by the
  curvature optimizer's.

For a name, the partner's learning rate is `fallback_lr_ratio * learning_rate`, so a
learning-rate schedule of the curvature optimizer also drives the partner; under
`step_control="graft_quadratic"` it is also multiplied, step by step, by how far the
quadratic model moved the preconditioned weights (`fallback_lr_ceiling`,
`keras_tkfac.step_size.partner_scale`).
"""

from absl import logging
import tensorflow as tf
import keras

NAMES = ("adam", "sgd")
# How many of the variables left to the partner its build-time warning names.
LOGGED_PATHS = 12
_INSTANCE_KINDS = {"Adam": "adam", "AdamW": "adam", "SGD": "sgd"}


class Partner:
    """The first-order update of the variables no curvature block covers.

    Args:
        fallback: `"adam"`, `"sgd"`, or a `keras.optimizers.Adam`, `AdamW` or `SGD`
            instance.
        lr_ratio: the partner's learning rate relative to the curvature optimizer's
            (names only).
        momentum: the curvature optimizer's momentum, used by `"sgd"`.
    """

    def __init__(self, fallback, lr_ratio, momentum):
        self.fallback = fallback
        self.lr_ratio = float(lr_ratio)
        # This step's multiple of a named partner's learning rate
        # (`step_size.partner_scale`), handed over by `quadratic.steps`; `None`
        # between steps.
        self.scale = None
        # Adam's bias correction of this step, once per dtype and step counter (in
        # the graph being traced) rather than once per variable: fewer operations
        # to trace; emptied by `end_step`.
        self._corrections = {}
        self.learning_rate = None
        # The instance's own weight decay (`None`: the curvature optimizer's).
        self.weight_decay = None
        self.beta_1, self.beta_2, self.epsilon = 0.9, 0.999, 1e-7
        self.momentum = float(momentum)
        if isinstance(fallback, str):
            if fallback not in NAMES:
                raise ValueError(
                    f"`fallback` must be one of {NAMES} or a keras.optimizers.Adam, "
                    f"AdamW or SGD instance. Received: fallback={fallback!r}"
                )
            self.kind = self.label = fallback
            return
        kind = _INSTANCE_KINDS.get(type(fallback).__name__)
        if kind is None or not isinstance(fallback, keras.optimizers.Optimizer):
            raise ValueError(
                f"`fallback` must be one of {NAMES} or a keras.optimizers.Adam, AdamW "
                f"or SGD instance. Received: fallback={fallback!r}"
            )
        if getattr(fallback, "amsgrad", False) or getattr(fallback, "nesterov", False):
            raise ValueError(
                "`fallback` optimizers with amsgrad or nesterov are not supported. "
                f"Received: fallback={fallback!r}"
            )
        # `kind`: the update's arithmetic (AdamW's is Adam's with weight decay);
        # `label`: what the logs call it.
        self.kind, self.label = kind, type(fallback).__name__
        self.learning_rate = fallback._learning_rate
        if getattr(fallback, "weight_decay", None) is not None:
            self.weight_decay = float(fallback.weight_decay)
        if kind == "adam":
            self.beta_1 = float(fallback.beta_1)
            self.beta_2 = float(fallback.beta_2)
            self.epsilon = float(fallback.epsilon)
        else:
            self.momentum = float(fallback.momentum)

    def update(self, optimizer, variable, gradient, slots, learning_rate):
        """One step of a partner `variable`: `(learning rate, direction d, new slot
        values, weight-decay coefficient)`; the variable moves by
        `-learning_rate * d` (and decays by `learning_rate * coefficient`).
        `learning_rate` is `optimizer`'s, `slots` the variable's partner state."""
        learning_rate = self.current_learning_rate(learning_rate, optimizer.iterations)
        step, new_slots = self.step(gradient, [s.value for s in slots],
                                    optimizer.iterations)
        return (learning_rate, step, new_slots,
                self.weight_decay_of(optimizer, variable))

    def log_uncovered(self, paths, total):
        """Logs, once at build, the variables (`paths`, of `total`) the partner
        trains: a warning naming the first `LOGGED_PATHS` (a large model leaves
        hundreds, e.g. every `BatchNormalization`'s `beta`), every path at DEBUG."""
        if not paths:
            return
        shown = ", ".join(paths[:LOGGED_PATHS])
        if len(paths) > LOGGED_PATHS:
            shown += (", ... and %d more (all of them at logging level DEBUG)"
                      % (len(paths) - LOGGED_PATHS))
        logging.warning(
            "keras_tkfac: %d of %d variable(s) have no curvature block and take "
            "the first-order fallback (%s): %s", len(paths), total, self.label, shown)
        if len(paths) > LOGGED_PATHS:
            logging.debug("keras_tkfac: every variable on the first-order fallback: "
                          "%s", ", ".join(paths))

    def weight_decay_of(self, optimizer, variable):
        """The weight-decay coefficient of a partner `variable` (0: none): the
        instance's, under its exclusions, where it sets one; else `optimizer`'s."""
        if self.weight_decay is None:
            owner, coefficient = optimizer, optimizer.weight_decay
        else:
            owner, coefficient = self.fallback, self.weight_decay
        if coefficient and owner._use_weight_decay(variable):
            return coefficient
        return 0.0

    def slot_names(self):
        """Names of the per-variable state the partner keeps."""
        if self.kind == "adam":
            return ("partner_m", "partner_v")
        return ("partner_momentum",) if self.momentum > 0 else ()

    def current_learning_rate(self, learning_rate, iterations):
        """The partner's learning rate, given the curvature optimizer's."""
        if self.learning_rate is None:
            if self.scale is not None:
                # (`scale` is float32; the learning rate is in `floatx`, float64
                # under `keras.config.set_floatx("float64")`.)
                dtype = getattr(learning_rate, "dtype", None)
                scale = self.scale if dtype is None else tf.cast(self.scale, dtype)
                return learning_rate * self.lr_ratio * scale
            return learning_rate * self.lr_ratio
        if isinstance(self.learning_rate, keras.optimizers.schedules.LearningRateSchedule):
            return self.learning_rate(iterations)
        if callable(self.learning_rate):
            return self.learning_rate()
        return self.learning_rate

    def step(self, gradient, slots, iterations):
        """The direction `d` (the variable moves by `-learning_rate * d`).

        Args:
            gradient: the raw gradient, in the variable's dtype.
            slots: the partner's state of this variable (`slot_names()` order).
            iterations: the optimizer's step counter before this step.

        Returns:
            `(direction, new_slot_values)`.
        """
        if self.kind == "adam":
            m, v = slots
            dtype = gradient.dtype
            m = m + (gradient - m) * (1.0 - self.beta_1)
            v = v + (tf.square(gradient) - v) * (1.0 - self.beta_2)
            correction = self._correction(iterations, dtype)
            return correction * m / (tf.sqrt(v) + self.epsilon), [m, v]
        if not slots:
            return gradient, []
        m = self.momentum * slots[0] + gradient
        return m, [m]

    def _correction(self, iterations, dtype):
        """`sqrt(1 - beta_2^t) / (1 - beta_1^t)` at `t = iterations + 1`."""
        graph = None if tf.executing_eagerly() else tf.compat.v1.get_default_graph()
        key = (dtype, id(iterations))
        cached = self._corrections.get(key)
        if graph is not None and cached is not None and cached.graph is graph:
            return cached
        t = tf.cast(iterations + 1, dtype)
        correction = tf.sqrt(1.0 - tf.pow(tf.cast(self.beta_2, dtype), t)) / (
            1.0 - tf.pow(tf.cast(self.beta_1, dtype), t))
        if graph is not None:
            self._corrections[key] = correction
        return correction

    def end_step(self):
        """Forgets this step's hand-overs (`scale`) and traced values."""
        self.scale = None
        self._corrections = {}

    def get_config(self):
        """The `fallback` argument, serialisable."""
        if isinstance(self.fallback, str):
            return self.fallback
        return keras.saving.serialize_keras_object(self.fallback)


def from_config(value, custom_objects=None):
    """The `fallback` argument from `Partner.get_config()`."""
    if isinstance(value, dict):
        return keras.saving.deserialize_keras_object(value, custom_objects=custom_objects)
    return value
