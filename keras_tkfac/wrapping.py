"""`keras_tkfac.wrap`: a model whose training step feeds curvature to the optimizer."""

import collections
import inspect
import threading
import warnings

from absl import logging
import tensorflow as tf
import keras

from keras_tkfac import capture
from keras_tkfac import distributed
from keras_tkfac import finding
from keras_tkfac import keras_compat
from keras_tkfac import products
from keras_tkfac import statistics
from keras_tkfac import step_size


def _curvature_optimizer(optimizer):
    """The optimizer itself, or the one inside a mixed-precision LossScaleOptimizer."""
    return getattr(optimizer, "inner_optimizer", optimizer)


def _element_spec(iterator):
    """Symbolic tensors of the shapes and dtypes of the batches `iterator` (Keras's
    `TFEpochIterator`) yields, without reading any; `None` where it has no dataset
    or its elements are not all dense tensors."""
    dataset = getattr(iterator, "_distributed_dataset", None)
    spec = getattr(dataset, "element_spec", None)
    if spec is None:
        return None
    leaves = tf.nest.flatten(spec)
    if not leaves or not all(type(leaf) is tf.TensorSpec for leaf in leaves):
        return None
    return tf.nest.map_structure(
        lambda leaf: keras.KerasTensor(leaf.shape, leaf.dtype.name), spec)


def _loss_weights(model):
    """The `loss_weights` `model` was compiled with (Keras keeps them on its
    `CompileLoss`)."""
    compile_loss = getattr(model, "_compile_loss", None)
    return getattr(compile_loss, "_user_loss_weights", None)


def _overrides(model, method):
    """Whether `model`'s class overrides `keras.Model.<method>`."""
    return getattr(type(model), method) is not getattr(keras.Model, method)


_COMPILE_SIGNATURE = inspect.signature(keras.Model.compile)

# While a wrapped model's own `train_step` runs (`_delegated_train_step`):
# `(the wrapped model, its recorded step)`, for `_super_train_step`.
_DELEGATING = threading.local()
_KERAS_TRAIN_STEP = keras.Model.train_step


def _super_train_step(model, data):
    """Keras's `train_step`, installed in its place on `keras.Model`'s base: the
    recorded step where `model` is a wrapped model whose own `train_step`, run by
    its wrapper, called it through `super()`; Keras's otherwise."""
    delegating = getattr(_DELEGATING, "step", None)
    if delegating is not None and delegating[0] is model:
        return delegating[1](data)
    return _KERAS_TRAIN_STEP(model, data)


def _install_super_train_step(model):
    """Puts `_super_train_step` in place of Keras's `train_step` on the class of
    `model`'s bases that defines it (Keras's backend trainer), once."""
    for cls in type(model).__mro__:
        if cls.__dict__.get("train_step") is _KERAS_TRAIN_STEP:
            setattr(cls, "train_step", _super_train_step)
            return


def _own_compile(model):
    """Whether `model`'s class has a `compile` of its own arguments (keras-io's GAN:
    `compile(d_optimizer, g_optimizer, loss_fn)`), which Keras's `compile` would
    misread even where they bind to it positionally: no `optimizer` parameter and
    no `**kwargs`."""
    if not _overrides(model, "compile"):
        return False
    try:
        parameters = inspect.signature(type(model).compile).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False
    return "optimizer" not in parameters and not any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


@keras.saving.register_keras_serializable(package="keras_tkfac")
class CurvatureModel(keras_compat.MultiWorkerFitMixin, keras.Model):
    """A Keras model wrapping another one so that TKFAC/KFAC see its curvature.

    Use `keras_tkfac.wrap(model)` rather than this class directly. The wrapper owns no
    weights: it trains the wrapped model's variables. With a `TKFAC` or `KFAC`
    optimizer its `train_step` records each covered layer's input and pre-activation
    output, computes the parameter gradients and (on statistics steps) the output
    gradients of the sampled-label loss with one persistent tape, and hands both to
    the optimizer. With any other optimizer it trains exactly like Keras.

    Args:
        model: the Keras model to wrap (Sequential, functional or subclassed).
        exclude: layer names or classes that are not preconditioned, nor are the
            layers nested in them (they take the first-order fallback). Defaults
            to `()`.
        **kwargs: base `keras.Model` arguments such as `name`.
    """

    _keras_tkfac_wrapper = True

    def __init__(self, model, exclude=(), **kwargs):
        super().__init__(**kwargs)
        if not isinstance(model, keras.Model):
            raise ValueError(
                f"wrap expects a keras.Model. Received: model={model!r}"
            )
        exclude = finding.as_sequence(exclude)
        # Blocks are found again whenever the wrapped model's layers change (layers
        # added after `wrap`, an unbuilt model), until the optimizer is built.
        finder = finding.BlockFinder(model, exclude)  # (checks `exclude`)
        self.model = model
        self._exclude = exclude
        object.__setattr__(self, "_finder", finder)
        object.__setattr__(self, "_inner_jit", False)
        object.__setattr__(self, "_warned_unfed", False)
        capture.register_wrapper(model, self)
        self.blocks  # Finds the blocks now, so unsupported layers raise at `wrap`.
        if model.built:
            self.built = True
            # What Keras's `build` records, and TFLite's converter reads (a
            # functional model's own says `None`).
            inputs = [tuple(t.shape) for t in getattr(model, "inputs", None) or []]
            shapes = getattr(model, "_build_shapes_dict", None)
            if inputs:
                shapes = {"input_shape": inputs[0] if len(inputs) == 1 else inputs}
            if shapes and all(v is not None for v in shapes.values()):
                self._build_shapes_dict = shapes

    def __getattr__(self, name):
        # Only reached when normal lookup fails: the wrapped model's own public
        # attributes and methods (sub-networks, helpers) are reachable through
        # the wrapper. Private names stay the wrapper's (Keras probes them).
        model = self.__dict__.get("model")
        prop = next((vars(c)[name] for c in type(self).__mro__
                     if c.__module__.startswith("keras_tkfac") and name in vars(c)), None)
        if isinstance(prop, property):
            # One of keras_tkfac's own properties raised `AttributeError` (Python
            # then calls `__getattr__`): raise that error, not "the wrapped model
            # has no attribute `blocks`", which hid a layer's missing attribute.
            # (Keras's properties that raise, such as `output` before the wrapper
            # is called, still fall through to the wrapped model's.)
            return prop.fget(self)
        if model is None or name.startswith("_"):
            raise AttributeError(
                f"{type(self).__name__!r} object has no attribute {name!r}"
            )
        return getattr(model, name)

    @property
    def layers(self):
        """The wrapped model's layers, as Keras lists them for it: code written for
        the model (`for layer in model.layers[:-2]: layer.trainable = False`)
        acts on its layers, not on the wrapper's one sublayer, the model."""
        return self.model.layers

    def get_layer(self, name=None, index=None):
        """The wrapped model's `get_layer` (Grad-CAM's and feature extraction's
        `model.get_layer(name).output`)."""
        return self.model.get_layer(name=name, index=index)

    @property
    def blocks(self):
        """The curvature blocks of the wrapped model's current layers."""
        return self._finder.blocks(self._optimizer_built())

    def load_weights(self, filepath, *args, **kwargs):
        """Keras's `load_weights`; a weights file of the model it wraps, saved
        unwrapped (`model.save_weights` before `wrap`), loads into that model.
        `wrapped.model.save_weights(...)` saves one for the unwrapped model."""
        try:
            return super().load_weights(filepath, *args, **kwargs)
        except ValueError as error:
            try:
                return self.model.load_weights(filepath, *args, **kwargs)
            except Exception:  # pylint: disable=broad-except
                raise error from None

    @property
    def delegates_steps(self):
        """Whether the wrapped model has its own `train_step` (it then runs it)."""
        return _overrides(self.model, "train_step")

    @property
    def delegates_loss(self):
        """Whether the wrapped model has its own `compute_loss` (the wrapper's
        steps then compute the loss with it)."""
        return _overrides(self.model, "compute_loss")

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None,
                     training=True):
        """Keras's `compute_loss`, or the wrapped model's own where it has one."""
        if self.delegates_loss:
            return self.model._compute_loss(  # pylint: disable=protected-access
                x=x, y=y, y_pred=y_pred, sample_weight=sample_weight,
                training=training)
        return super().compute_loss(x=x, y=y, y_pred=y_pred,
                                    sample_weight=sample_weight, training=training)

    def call(self, inputs, training=None):
        return self.model(inputs, training=training)

    def build(self, input_shape):
        # A model without its own `build` (a subclassed one) builds on its first
        # call; Keras warns when such a model is built from a shape.
        if not self.model.built and not getattr(type(self.model).build, "_is_default",
                                                False):
            self.model.build(input_shape)
        self.built = True

    def compile(self, *args, **kwargs):
        if _own_compile(self.model):
            self._compile_own(args, kwargs)
            return
        try:
            arguments = _COMPILE_SIGNATURE.bind(self, *args, **kwargs).arguments
        except TypeError:
            if not _overrides(self.model, "compile"):
                raise
            self._compile_own(args, kwargs)
            return
        arguments.pop("self")
        super().compile(**arguments)
        inner_jit = False
        if self.jit_compile is True and self._distribute_strategy is not None:
            # Keras cannot XLA-compile a replica's step that touches mirrored
            # variables (it fails even for SGD); compile our own math instead.
            logging.warning(
                "keras_tkfac: under tf.distribute, jit_compile=True compiles the "
                "curvature statistics and preconditioning with XLA, not the whole step."
            )
            self.jit_compile = False
            inner_jit = True
        object.__setattr__(self, "_inner_jit", inner_jit)
        if self.delegates_steps or (self.delegates_loss
                                    and not _overrides(self.model, "compile")):
            # The wrapped model's own `train_step` (or `compute_loss`) runs; it
            # reads the optimizer, loss and metrics from the wrapped model, so
            # compile it alike.
            arguments["optimizer"] = self.optimizer
            self.model.compile(**arguments)
        self._attach()

    def _compile_own(self, args, kwargs):
        """`compile` of a model whose own `compile` takes other arguments (keras-io's
        GAN: `compile(d_optimizer, g_optimizer, loss_fn)`): they go to it unchanged,
        and the wrapper compiles with Keras's defaults. Its own `train_step` then
        runs with its own optimizers; curvature optimizers among them are fed only
        where that step calls `update_curvature` (README, "Keras programs that
        work")."""
        object.__setattr__(self, "_inner_jit", False)
        logging.info("keras_tkfac: %s has its own `compile`; its arguments go to it "
                     "unchanged.", type(self.model).__name__)
        self.model.compile(*args, **kwargs)
        config = getattr(self.model, "_compile_config", None)
        if self.delegates_steps or config is None:
            # The model's own `train_step` steps the optimizer its own `compile`
            # gave Keras (the older keras-io Distiller's `super().compile(optimizer=
            # optimizer, metrics=metrics)`); the wrapper, which `fit` runs, holds
            # the same one, so that callbacks changing the learning rate
            # (`LearningRateScheduler`, `ReduceLROnPlateau`) and `save` reach the
            # optimizer that steps. Until 2026-12-07 the wrapper compiled with
            # Keras's default RMSprop: schedules changed that one only, the file
            # held it, and a curvature optimizer was never fed or warned about.
            optimizer = getattr(self.model, "optimizer", None)
            super().compile(**({} if optimizer is None else {"optimizer": optimizer}))
            self._attach()
            return
        # Keras's own `train_step` runs on the wrapper (keras-io's Distiller:
        # only `compute_loss` is the model's): with the optimizer and metrics the
        # model's `compile` gave Keras, and its `compute_loss`.
        super().compile(**config.config)
        self._attach()

    def _optimizer_built(self):
        curvature = _curvature_optimizer(getattr(self, "optimizer", None))
        return bool(getattr(curvature, "built", False))

    def _attach(self):
        """Hands the current blocks to a curvature optimizer not yet built."""
        curvature = _curvature_optimizer(self.optimizer)
        attach = getattr(curvature, "attach", None)
        if attach is not None:
            attach(self.blocks, jit_compile=self._inner_jit, owner=self)

    @property
    def metrics(self):
        if self.compiled and self.delegates_steps:
            return self.model.metrics
        # Keras leaves out the metrics of a nested model (a `Trainer`): the wrapped
        # model's own trackers (a `keras.metrics.Mean` its `compute_loss` or `call`
        # updates) would vanish from the logs. Its compiled metrics stay out: the
        # wrapper's `compile` gave its own.
        metrics = list(super().metrics)
        known = {id(m) for m in metrics}
        for metric in self.model._metrics:  # pylint: disable=protected-access
            if id(metric) not in known:
                known.add(id(metric))
                metrics.append(metric)
        return metrics

    def _symbolic_build(self, iterator=None, data_batch=None):
        # Under a strategy Keras builds the compiled metrics it will report before
        # the first step; with the wrapped model's own `train_step` those are the
        # wrapped model's (`metrics`), which its own build creates.
        if (self.delegates_steps and getattr(self.model, "compiled", False)
                and data_batch is not None):
            self.model._symbolic_build(data_batch=data_batch)  # pylint: disable=protected-access
        return super()._symbolic_build(iterator=iterator, data_batch=data_batch)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Without a strategy Keras builds nothing before the first step: the
        # optimizer's (and metrics') variables are created while `train_step` is
        # first traced, so `tf.function` traces it a second time. A curvature
        # step is costly to trace (seconds: its statistics, inverse and products
        # branches), so build first, from the batch's shapes alone (the data is not
        # read), as Keras does under a strategy; where that fails, the first step
        # builds, as before.
        curvature = _curvature_optimizer(self.optimizer)
        if (self._distribute_strategy is None
                and hasattr(curvature, "update_curvature") and not curvature.built):
            specs = data_batch
            if specs is None:
                specs = _element_spec(iterator)
            if specs is not None:
                try:
                    self._build_from_shapes(specs)
                except Exception as error:  # pylint: disable=broad-except
                    logging.info("keras_tkfac: the model and optimizer are built in "
                                 "the first step (building from shapes failed: %s: "
                                 "%s).", type(error).__name__, error)
            return None
        return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def _build_from_shapes(self, specs):
        """Keras's `_symbolic_build` from `specs` (the batch's shapes), where the
        model's call builds every layer: a layer first called in the loss (keras-io's
        Distiller calls its teacher in `compute_loss`) would add variables after the
        optimizer is built, so then nothing is built here."""
        def unbuilt():
            return not all(layer.built for layer in self._flatten_layers())

        if unbuilt():
            x, _, _ = keras.utils.unpack_x_y_sample_weight(
                tf.nest.map_structure(
                    lambda v: None if v is None else keras.KerasTensor(
                        v.shape, keras.backend.standardize_dtype(v.dtype)), specs))
            keras.src.backend.compute_output_spec(self, x, training=False)
            if unbuilt():
                return
        self._attach()
        self._symbolic_build(data_batch=specs)

    def compile_from_config(self, config):
        # Keras skips compiling models whose `compile` is overridden; ours only adds
        # attaching the blocks, so restore the compiled state as Keras would.
        config = keras.saving.deserialize_keras_object(config)
        if not self._compiles_from(config):
            return
        self.compile(**config)
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def _compiles_from(self, config):
        """Whether the saved compile `config` (Keras's arguments) compiles the
        wrapped model too. A model whose own `compile` needs arguments of its own
        (keras-io's Distiller: `student_loss_fn`, ...) cannot be compiled from it;
        Keras then leaves the model uncompiled with a warning, and so does the
        wrapper (loading raised a `TypeError` before, 2026-12-07)."""
        if not _overrides(self.model, "compile"):
            return True
        try:
            arguments = config
            if not _own_compile(self.model):  # (`compile` passes Keras's all)
                arguments = _COMPILE_SIGNATURE.bind(self, **config).arguments
                arguments.pop("self")
            inspect.signature(type(self.model).compile).bind(self.model, **arguments)
        except TypeError as error:
            warnings.warn(
                f"`compile()` was not called as part of loading the wrapped "
                f"{type(self.model).__name__}: its own `compile()` takes arguments "
                f"the file does not hold ({error}). Call `compile()` after loading.",
                stacklevel=2)
            return False
        return True

    def train_step(self, data):
        optimizer = self.optimizer
        curvature = _curvature_optimizer(optimizer)
        if not hasattr(curvature, "update_curvature"):
            if self.delegates_steps:
                return keras_compat.multi_worker_logs(self.model.train_step(data))
            return keras_compat.multi_worker_logs(super().train_step(data))
        if not curvature.built:
            self._attach()
        # A step that feeds no curvature is logged by `_warn_unfed` here, not by
        # the custom loops' `capture.warn_if_unfed`.
        curvature._unfed_logged = True  # pylint: disable=protected-access
        if self.delegates_steps:
            return keras_compat.multi_worker_logs(
                self._delegated_train_step(curvature, data)
            )
        return self._recorded_train_step(curvature, data, self)

    def _recorded_train_step(self, curvature, data, host):
        """The training step that feeds `curvature`: the wrapper's own, or
        (`host`, the wrapped model) Keras's `train_step` called by the wrapped
        model's own one through `super()`, with the wrapped model's loss tracker
        and metrics (`_delegated_train_step`)."""
        optimizer = self.optimizer
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        # The products' passes may replay this step's dropout masks
        # (`products.REPLAY_MASKS`, `ModelForward`).
        initial = ([tf.identity(v) for v in keras_compat.state_variables(self)]
                   if products.REPLAY_MASKS
                   and step_size.uses_products(curvature.step_control) else None)
        # A recurrent model's statistics take a forward pass of their own, so that
        # the step's tape need not be persistent (`statistics.takes_own_pass`).
        own_pass = statistics.takes_own_pass(self)
        before = None
        if own_pass:
            before = initial or [tf.identity(v)
                                 for v in keras_compat.state_variables(self)]
        with tf.GradientTape(persistent=not own_pass) as tape:
            with capture.record(self) as recording:
                y_pred = host(x, training=True)
            loss = host.compute_loss(
                x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
            )
            host._loss_tracker.update_state(
                distributed.unscale_loss(loss),
                sample_weight=tf.shape(tf.nest.flatten(x)[0])[0],
            )
            scaled_loss = optimizer.scale_loss(loss)
        variables = self.trainable_variables
        if not variables:
            # As Keras's own training step: nothing to update (a frozen model).
            warnings.warn("The model does not have any trainable weights.")
            del tape
            return keras_compat.multi_worker_logs(
                host.compute_metrics(x, y, y_pred, sample_weight=sample_weight))
        # One backward pass: the gradients, and the loss's gradients with respect to
        # the recorded outputs (the factored preconditioning's rows).
        grads, output_grads = tape.gradient(
            scaled_loss, (variables, recording.outputs()))
        if self.loss is None:
            # The loss comes from `add_loss` or the model's own `compute_loss`
            # alone: no output distribution, no Fisher.
            self._warn_unfed(curvature, "is compiled without a `loss` (its loss comes "
                             "from %s alone; no Fisher to estimate)" % (
                                 "its own `compute_loss`" if self.delegates_loss
                                 else "`add_loss`"))
            optimizer.apply_gradients(zip(grads, variables))
            return keras_compat.multi_worker_logs(
                host.compute_metrics(x, y, y_pred, sample_weight=sample_weight))
        curvature.update_curvature(
            recording, None if own_pass else tape, y_pred, y_true=y, loss=self.loss,
            loss_weights=_loss_weights(self), sample_weight=sample_weight,
            loss_value=loss,
            loss_scale=optimizer.scale_loss(tf.constant(1.0)),
            loss_output_gradients=output_grads,
            forward=products.ModelForward(self, x, initial, before),
        )
        optimizer.apply_gradients(zip(grads, variables))
        del tape
        logs = host.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        return keras_compat.multi_worker_logs(logs)

    def _delegated_train_step(self, curvature, data):
        """The wrapped model's own `train_step`. Where it calls Keras's through
        `super().train_step(data)` (keras-io's pattern for a step that changes
        the batch first), that call is the recorded step, which feeds curvature
        (`_super_train_step`)."""
        before = curvature.curvature_updates
        _install_super_train_step(self.model)
        previous = getattr(_DELEGATING, "step", None)
        _DELEGATING.step = (self.model, lambda inner_data: self._recorded_train_step(
            curvature, inner_data, self.model))
        try:
            logs = self.model.train_step(data)
        finally:
            _DELEGATING.step = previous
        if curvature.curvature_updates == before:
            self._warn_unfed(
                curvature, f"has its own `train_step`, which keras_tkfac runs, but it "
                f"does not feed curvature to {type(curvature).__name__}")
        return logs

    def _warn_unfed(self, curvature, why):
        """Logs once that no layer is preconditioned, and how to change that.

        Training goes on: the factors never update, so every covered layer's step
        is the step control's fallback with the initial (identity) preconditioner.
        """
        if self._warned_unfed:
            return
        object.__setattr__(self, "_warned_unfed", True)
        logging.warning(
            f"keras_tkfac: {type(self.model).__name__} {why}, so no layer is "
            f"preconditioned by {type(curvature).__name__}: every covered layer takes "
            "a first-order step (its step control's, with the identity as "
            "preconditioner) and the other weights the partner's step. To "
            "precondition, compile with the loss of the model's output and, in a "
            "model's own `train_step`, record the forward pass and call "
            "`update_curvature` before `apply_gradients`:\n"
            "    with tf.GradientTape(persistent=True) as tape:\n"
            "        with keras_tkfac.record(self) as recording:\n"
            "            y_pred = self(x, training=True)\n"
            "        loss = self.compute_loss(x=x, y=y, y_pred=y_pred)\n"
            "    grads = tape.gradient(loss, self.trainable_variables)\n"
            "    self.optimizer.update_curvature(recording, tape, y_pred, "
            "y_true=y, loss=self.loss,\n"
            "        forward=keras_tkfac.ModelForward(self, x))\n"
            "    self.optimizer.apply_gradients(zip(grads, self.trainable_variables))"
        )

    def test_step(self, data):
        if self.delegates_steps:
            return keras_compat.multi_worker_logs(self.model.test_step(data))
        return keras_compat.multi_worker_logs(super().test_step(data))

    def export(self, filepath, *args, **kwargs):
        """Exports the wrapped model (the wrapper adds no inference computation)."""
        return self.model.export(filepath, *args, **kwargs)

    def get_config(self):
        exclude = finding.exclusions_to_config(self.model, self._exclude)
        # The block class of each covered layer, so that loading can tell which
        # `register_block` calls the file needs (without them the optimizer's
        # state would not match and Keras would skip loading it).
        positions = finding.layer_positions(self.model)
        blocks = [
            {
                "layer": block.layer.name,
                "position": positions[id(block.layer)],
                "layer_class": keras.saving.get_registered_name(type(block.layer)),
                "block_class": f"{type(block).__module__}.{type(block).__qualname__}",
            }
            for block in self.blocks
        ]
        return {
            "name": self.name,
            "model": keras.saving.serialize_keras_object(self.model),
            "exclude": exclude,
            "blocks": blocks,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        model = keras.saving.deserialize_keras_object(
            config.pop("model"), custom_objects=custom_objects
        )
        config["exclude"] = finding.exclusions_from_config(
            model, config.get("exclude", []),
            lambda name: _layer_class(name, custom_objects))
        saved_blocks = config.pop("blocks", None)
        unsaved = [] if saved_blocks is None else finding.unsaved_layers(
            model, finding.as_sequence(config["exclude"]), saved_blocks)
        if unsaved:
            logging.warning(
                "keras_tkfac: layer(s) %s have a curvature block now but had none in "
                "the saved model (a block class registered since it was saved); they "
                "keep the first-order partner, so that the saved optimizer state is "
                "restored. To precondition them, wrap the loaded model's `.model` "
                "anew and compile it with a new optimizer.", ", ".join(unsaved))
            config["exclude"] = list(config["exclude"]) + unsaved
        saved_blocks = saved_blocks or []
        wrapper = cls(model, **config)
        # Matched by layer class, not name: a subclassed model's layers take Keras's
        # automatic names, which differ where the model is loaded (another process,
        # other layers made first), while its structure and the order of its
        # layers, and so of its optimizer's variables, do not.
        missing = collections.Counter(saved["layer_class"] for saved in saved_blocks)
        missing.subtract(keras.saving.get_registered_name(type(block.layer))
                         for block in wrapper.blocks)
        for saved in saved_blocks:
            if missing[saved["layer_class"]] > 0:
                raise ValueError(
                    f"The saved model preconditions layer {saved['layer']!r} (class "
                    f"{saved['layer_class']!r}) with block {saved['block_class']!r}, "
                    "which is not registered now, so the optimizer's state cannot "
                    f"be restored. Call {_registration_advice(saved['block_class'])} "
                    f"before loading. Received: layer_class={saved['layer_class']!r}"
                )
        return wrapper


def _registration_advice(block_class):
    """The call that registers `block_class` (a saved `module.qualname`) again."""
    module, _, name = block_class.rpartition(".")
    if module == "keras_tkfac.recurrent":
        return "`keras_tkfac.register_recurrent_blocks()`"
    if module == "keras_tkfac.blocks" and name in ("LayerNormalizationBlock",
                                                   "BatchNormalizationBlock"):
        return "`keras_tkfac.register_normalization_blocks()`"
    return f"`keras_tkfac.register_block(<layer class>, {block_class})`"


def _layer_class(name, custom_objects):
    """A layer class from its registered name (Keras's own or a custom one)."""
    layer_class = (custom_objects or {}).get(name)
    layer_class = layer_class or keras.saving.get_registered_object(name)
    layer_class = layer_class or getattr(keras.layers, name, None)
    if layer_class is None:
        raise ValueError(
            f"Cannot find the excluded layer class {name!r}; pass it in "
            f"`custom_objects`. Received: layer_class={name!r}"
        )
    return layer_class


def wrap(model, *, exclude=()):
    """Wraps a Keras model so that `TKFAC` and `KFAC` can precondition it.

    The returned model trains the same weights as `model`; `compile`, `fit`,
    `evaluate`, `predict` and `save` work as usual, and `keras.models.load_model`
    restores the wrapping (import `keras_tkfac` first).

    Supported layers are those registered in `keras_tkfac.blocks.BLOCKS` (`Dense`,
    `EinsumDense`, convolutions and transposed convolutions, `DepthwiseConv1D`
    and `DepthwiseConv2D`, the pointwise kernels of `SeparableConv1D` and
    `SeparableConv2D`, `Embedding`; `LayerNormalization` and `BatchNormalization`
    after `keras_tkfac.register_normalization_blocks()`); every other trainable
    variable takes the optimizer's first-order partner (`fallback`, Adam by
    default).
    A subclassed model works like any other as long as its layers are Keras layers
    tracked as attributes; to save and load it, give it a `get_config` as Keras asks.

    Example:

    ```python
    model = keras_tkfac.wrap(build_model())
    model.compile(optimizer=keras_tkfac.TKFAC(), loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=3)
    ```

    Args:
        model: a `keras.Model`.
        exclude: layer names or layer classes to leave to the first-order fallback,
            with every layer nested in them (excluding a `MultiHeadAttention`
            excludes its projections).

    Returns:
        A `CurvatureModel`; `model` itself when it already is one (wrapping twice
        would record every layer twice).

    Raises:
        ValueError: when `model` is already wrapped and `exclude` differs from its
            wrapping's; when `exclude` names a layer the model does not have (checked
            once the model is built: at `wrap` for a built model, else at its first
            step).
    """
    if isinstance(model, CurvatureModel):
        if finding.as_sequence(exclude) not in ((), model._exclude):
            raise ValueError(
                "The model is already wrapped by keras_tkfac.wrap; to exclude other "
                "layers, wrap the model it wraps: keras_tkfac.wrap(wrapped.model, "
                f"exclude=...). Received: exclude={exclude!r}")
        return model
    return CurvatureModel(model, exclude=exclude)


# Legacy `.h5` files name classes without their package: register that name too.
keras.saving.get_custom_objects().setdefault("CurvatureModel", CurvatureModel)
