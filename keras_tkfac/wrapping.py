"""`keras_tkfac.wrap`: a model whose training step feeds curvature to the optimizer."""

from absl import logging
import tensorflow as tf
import keras

from keras_tkfac import blocks as blocks_lib
from keras_tkfac import capture
from keras_tkfac import distributed
from keras_tkfac import keras_compat


def _curvature_optimizer(optimizer):
    """The optimizer itself, or the one inside a mixed-precision LossScaleOptimizer."""
    return getattr(optimizer, "inner_optimizer", optimizer)


def _find_blocks(model, exclude):
    excluded_names = {e for e in exclude if isinstance(e, str)}
    excluded_types = tuple(e for e in exclude if isinstance(e, type))
    found = []
    seen = set()
    for layer in model._flatten_layers(include_self=False, recursive=True):
        # Frozen layers get blocks too: they may be unfrozen later, and the
        # optimizer's `build` only preconditions trainable variables.
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        if layer.name in excluded_names or (
            excluded_types and isinstance(layer, excluded_types)
        ):
            continue
        block = blocks_lib.block_for(layer)
        if block is not None:
            found.append(block)
    return found


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
        exclude: layer names or classes that are not preconditioned (they take the
            momentum-SGD fallback). Defaults to `()`.
        **kwargs: base `keras.Model` arguments such as `name`.
    """

    def __init__(self, model, exclude=(), **kwargs):
        super().__init__(**kwargs)
        if not isinstance(model, keras.Model):
            raise ValueError(
                f"wrap expects a keras.Model. Received: model={model!r}"
            )
        for item in exclude:
            if not isinstance(item, (str, type)):
                raise ValueError(
                    "exclude must hold layer names or layer classes. "
                    f"Received: exclude={exclude!r}"
                )
        self.model = model
        self._exclude = tuple(exclude)
        self.blocks = _find_blocks(model, self._exclude)
        for block in self.blocks:
            capture.install(block)
        if model.built:
            self.built = True

    def call(self, inputs, training=None):
        return self.model(inputs, training=training)

    def build(self, input_shape):
        if not self.model.built:
            self.model.build(input_shape)
        self.built = True

    def compile(self, optimizer="rmsprop", **kwargs):
        super().compile(optimizer=optimizer, **kwargs)
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
        attach = getattr(_curvature_optimizer(self.optimizer), "attach", None)
        if attach is not None:
            attach(self.blocks, jit_compile=inner_jit)

    def compile_from_config(self, config):
        # Keras skips compiling models whose `compile` is overridden; ours only adds
        # attaching the blocks, so restore the compiled state as Keras would.
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def train_step(self, data):
        optimizer = self.optimizer
        curvature = _curvature_optimizer(optimizer)
        if not hasattr(curvature, "update_curvature"):
            return keras_compat.multi_worker_logs(super().train_step(data))
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape(persistent=True) as tape:
            with capture.record(self) as recording:
                y_pred = self(x, training=True)
            loss = self.compute_loss(
                x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
            )
            self._loss_tracker.update_state(
                distributed.unscale_loss(loss),
                sample_weight=tf.shape(tf.nest.flatten(x)[0])[0],
            )
            scaled_loss = optimizer.scale_loss(loss)
        variables = self.trainable_variables
        grads = tape.gradient(scaled_loss, variables)
        curvature.update_curvature(
            recording, tape, y_pred, y_true=y, loss=self.loss,
            sample_weight=sample_weight, loss_value=loss,
            loss_scale=optimizer.scale_loss(tf.constant(1.0)),
        )
        optimizer.apply_gradients(zip(grads, variables))
        del tape
        logs = self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        return keras_compat.multi_worker_logs(logs)

    def test_step(self, data):
        return keras_compat.multi_worker_logs(super().test_step(data))

    def get_config(self):
        exclude = [
            e if isinstance(e, str)
            else {"layer_class": keras.saving.get_registered_name(e)}
            for e in self._exclude
        ]
        return {
            "name": self.name,
            "model": keras.saving.serialize_keras_object(self.model),
            "exclude": exclude,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        model = keras.saving.deserialize_keras_object(
            config.pop("model"), custom_objects=custom_objects
        )
        config["exclude"] = [
            e if isinstance(e, str) else _layer_class(e["layer_class"], custom_objects)
            for e in config.get("exclude", [])
        ]
        return cls(model, **config)


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
    `Conv1D`, `Conv2D`); every other trainable variable takes the momentum-SGD fallback.
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
        exclude: layer names or layer classes to leave to the first-order fallback.

    Returns:
        A `CurvatureModel`.
    """
    return CurvatureModel(model, exclude=exclude)
