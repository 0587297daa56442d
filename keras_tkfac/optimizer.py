"""The engine of the curvature optimizers: `CurvatureOptimizer`.

`keras_tkfac.approximations` defines `TKFAC` and `KFAC` on it; the statistics and
inverse steps (`statistics`), the preconditioned update and its application to each
variable (`updates`), the step-size control, the first-order partner, the update
cadence and the distribution code live in their own modules.
"""

import weakref

import tensorflow as tf
import keras

from keras_tkfac import capture
from keras_tkfac import damping as damping_lib
from keras_tkfac import distributed
from keras_tkfac import factored
from keras_tkfac import loss_specs
from keras_tkfac import monitor
from keras_tkfac import ops
from keras_tkfac import partner as partner_lib
from keras_tkfac import quadratic
from keras_tkfac import serialization
from keras_tkfac import shapes
from keras_tkfac import statistics
from keras_tkfac import step_size
from keras_tkfac import updates
from keras_tkfac import validation


class CurvatureOptimizer(keras.optimizers.Optimizer):
    """Shared engine of `TKFAC` and `KFAC`; subclasses choose the approximation.

    A subclass implements `_factor_specs(block)` (names and shapes of the factor
    statistics), `_statistics(block, a, g, num_examples)` (one batch's statistics),
    `_damped_factors(block, factors, damping)` (the two matrices to invert; a vector
    stands for a diagonal matrix), `_trace(factors)` and optionally
    `_layer_damping`.
    """

    # Python-side count of `update_curvature` calls (traced or eager), so that a
    # model's own `train_step` that never feeds curvature is caught.
    curvature_updates = 0

    def __init__(
        self,
        learning_rate,
        *,
        damping,
        momentum,
        factor_decay,
        factor_update_freq,
        inverse_update_freq,
        inverse_warmup,
        kl_clip,
        step_control,
        adaptive_damping,
        model_update_freq,
        fisher,
        inverse_dtype,
        inverse_rank,
        precondition_dtype,
        products_dtype,
        precondition_form,
        conv_location_stride,
        split_inverses,
        max_factor_dim,
        fallback,
        fallback_lr_ratio,
        fallback_lr_ceiling,
        seed,
        name,
        **kwargs,
    ):
        (learning_rate, fallback_lr_ratio, fallback_lr_ceiling, adaptive_damping,
         seed) = (
            validation.resolve_curvature_arguments(
                learning_rate=learning_rate, damping=damping, momentum=momentum,
                factor_decay=factor_decay, factor_update_freq=factor_update_freq,
                inverse_update_freq=inverse_update_freq,
                inverse_warmup=inverse_warmup, kl_clip=kl_clip,
                step_control=step_control, adaptive_damping=adaptive_damping,
                model_update_freq=model_update_freq,
                fisher=fisher, inverse_dtype=inverse_dtype, inverse_rank=inverse_rank,
                precondition_dtype=precondition_dtype,
                products_dtype=products_dtype, precondition_form=precondition_form,
                conv_location_stride=conv_location_stride,
                split_inverses=split_inverses, max_factor_dim=max_factor_dim,
                fallback_lr_ratio=fallback_lr_ratio,
                fallback_lr_ceiling=fallback_lr_ceiling, seed=seed))
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.damping = damping
        self.momentum = float(momentum)
        self.factor_decay = float(factor_decay)
        self.factor_update_freq = int(factor_update_freq)
        self.inverse_update_freq = int(inverse_update_freq)
        self.inverse_warmup = bool(inverse_warmup)
        self.kl_clip = None if kl_clip is None else float(kl_clip)
        self.step_control = step_control
        self.adaptive_damping = adaptive_damping
        self.model_update_freq = int(model_update_freq)
        self.fisher, self.inverse_dtype = fisher, inverse_dtype
        self.inverse_rank = None if inverse_rank is None else int(inverse_rank)
        self.precondition_dtype, self.products_dtype = precondition_dtype, products_dtype
        self.precondition_form = precondition_form
        self.conv_location_stride = int(conv_location_stride)
        self.split_inverses = bool(split_inverses)
        self.max_factor_dim = int(max_factor_dim)
        self._partner = partner_lib.Partner(fallback, fallback_lr_ratio, momentum)
        self.fallback = fallback
        self.fallback_lr_ratio = float(fallback_lr_ratio)
        self.fallback_lr_ceiling = float(fallback_lr_ceiling)
        self.seed = int(seed)
        self._blocks = None
        self._owner = None
        self._slots = []
        self._jit_math = False
        self._step_is_finite = None
        # Trace-time hand-overs from `update_curvature` to `apply_gradients`: rows
        # of the factored form (`factored`), the `quadratic` step's batch and its
        # predicted change (per replica: replicas trace their steps concurrently).
        self._loss_rows, self._products, self._model_change = {}, {}, {}

    learning_rate = property(keras.optimizers.Optimizer.learning_rate.fget,
                             step_size.set_learning_rate)

    # Set-up -------------------------------------------------------------------

    def attach(self, blocks, *, jit_compile=False, owner=None):
        """Tells the optimizer which layers it preconditions.

        `keras_tkfac.wrap` models call this from `compile` and before their first
        step, and `update_curvature` calls it on first use; users do not need to.
        Until the optimizer is built, attaching again replaces the blocks (layers
        added to the model after `compile`).

        Args:
            blocks: the model's `CurvatureBlock`s.
            jit_compile: whether to XLA-compile the statistics and preconditioning
                (set by the model when whole-step XLA is not possible).
            owner: optional, the model the blocks belong to; attaching blocks of
                another model raises.
        """
        blocks = list(blocks)
        previous = self._owner() if self._owner is not None else None
        if owner is not None and previous is not None and previous is not owner:
            raise ValueError(
                f"Optimizer {self.name!r} is already used by model "
                f"{previous.name!r}; create one optimizer per model. "
                f"Received: model={owner.name!r}"
            )
        if self.built and self._blocks is not None:
            old = [id(b.layer) for b in self._blocks]
            if old != [id(b.layer) for b in blocks]:
                raise ValueError(
                    f"Optimizer {self.name!r} is already built for other layers "
                    "(another model, or layers added since it was built); create "
                    "one optimizer per model, and a new one after changing the "
                    "model's layers."
                )
            return
        self._jit_math = bool(jit_compile)
        if owner is not None:
            self._owner = weakref.ref(owner)
        self._blocks = blocks

    def build(self, var_list):
        if self.built:
            return
        created = len(self._variables)
        try:
            self._build_state(var_list)
        except Exception:
            # Nothing half-made: the next build starts afresh (and raises the same
            # error where it comes from, not a missing attribute in a later step).
            del self._variables[created:]
            self.built = False
            raise

    def _build_state(self, var_list):
        owner = self._owner() if self._owner is not None else None
        if not var_list and owner is not None:
            # Keras's legacy `.h5` loader builds the optimizer with the wrapper's
            # own variables (none); the wrapped model's are meant.
            var_list = owner.trainable_variables
        if self._blocks is None:
            wrapper = capture.unattached_wrapper(type(self).__name__, var_list)
            self.attach([] if wrapper is None else wrapper.blocks, owner=wrapper)
        super().build(var_list)
        self._slots, covered = shapes.build_slots(
            self, {self._var_key(v) for v in var_list})
        statistics.build(self)
        self.skipped_steps = self.add_variable(
            (), initializer="zeros", dtype="int32", name="skipped_steps",
            aggregation="only_first_replica")
        # The last step's KL-clip scale, then per slot |nu U| / |G|.
        self._last_update = self.add_variable(
            (len(self._slots) + 1,), initializer="ones", name="last_update",
            dtype="float32", aggregation="only_first_replica",
        )
        # `step_control="graft"`: RMSProp's second moment of each layer's gradient.
        self._graft_moments = []
        if step_size.uses_moments(self.step_control):
            self._graft_moments = [
                self.add_variable(
                    shapes.grad_matrix_shape(slot.block), initializer="zeros",
                    name=f"{slot.block.name}_graft_moment", dtype="float32",
                    aggregation="only_first_replica",
                )
                for slot in self._slots
            ]
        damping_lib.build(self)
        quadratic.build(self)
        updates.build(self, var_list, covered)

    # Curvature ----------------------------------------------------------------

    def _math(self, fn):
        return ops.compiled(fn) if self._jit_math else fn

    def update_curvature(self, recording, tape, y_pred, *, y_true=None, loss,
                         loss_weights=None, sample_weight=None, loss_value=None,
                         loss_scale=None, loss_output_gradients=None, forward=None):
        """Updates the factor statistics and inverses when they are due.

        Call it after the forward pass and before `apply_gradients`, in the same
        step. On steps where `iterations % factor_update_freq == 0` it draws labels
        from the model's predictive distribution (or takes `y_true` with
        `fisher="empirical"`), backpropagates that loss to every recorded layer output
        and folds the batch statistics into the moving averages; on steps where
        `iterations % inverse_update_freq == 0` it recomputes the damped inverses.

        A model with several outputs gives the Fisher of Keras's total loss
        `sum_k w_k L_k`: each output samples from its own predictive distribution
        and all outputs share one backward pass (`keras_tkfac.fisher`).

        Args:
            recording: the `Recording` of this step (`keras_tkfac.record(model)`).
            tape: the step's persistent `tf.GradientTape` (`statistics.update`).
            y_pred: the model output: a tensor, or a flat list or dict of tensors.
            y_true: the real labels (used by `fisher="empirical"`), structured like
                `y_pred` (or a list with one entry per output with a loss).
            loss: the training loss, as in `compile`: a name, function or
                `keras.losses.Loss`, applied to every output, or a list or dict of
                them (keyed by output name); an output whose loss is `None` adds no
                curvature.
            loss_weights: optional, the weights of the outputs' losses, as in
                `compile` (a number, list or dict). Defaults to `None` (all 1).
            sample_weight: optional per-example weights, applied to the Fisher as
                to the loss: one tensor for every output, or a list or dict of them.
            loss_value: optional, this step's loss; statistics are not updated
                when it is not finite.
            loss_scale: optional, the loss-scaling factor of mixed precision; the
                sampled-label backward pass is scaled by it (so float16 gradients do
                not underflow) and the statistics are unscaled.
            loss_output_gradients: optional, the gradients of the (scaled) training
                loss with respect to `recording.outputs()`, computed by the same
                `tape.gradient` call as the gradients then passed, unchanged, to
                `apply_gradients`. With them dense layers may be preconditioned in
                the factored form (`keras_tkfac.factored`), fewer flops when the
                batch is smaller than the layers' widths. `wrap`'s training step
                passes them.
            forward: optional, `keras_tkfac.ModelForward(model, x)` (or `lambda:
                model(x, training=True)`, products on the whole batch): the quadratic
                step controls' exact curvature products (`keras_tkfac.quadratic`);
                without it their step is `quadratic.FALLBACK`'s. `wrap` passes it.

        Statistics that are not finite (on any replica) are not folded into the
        moving averages; `skipped_statistics` counts such updates.
        """
        outputs = loss_specs.resolve_losses(
            loss, self.fisher, y_pred, loss_weights=loss_weights,
            output_names=getattr(recording.owner, "output_names", None),
            warned=loss_specs.warned_of(self))
        self.curvature_updates += 1
        self._loss_rows = {}
        self._products[distributed.replica_index()] = quadratic.hand_over(
            self, forward, outputs, y_true, sample_weight, recording.owner, recording)
        if self._blocks is None:
            self.attach(recording.blocks, owner=recording.owner)
        if not self.built:
            self.build(recording.variables)
        if not self._slots:
            return
        scale = tf.constant(1.0) if loss_scale is None else tf.cast(loss_scale, tf.float32)
        self._loss_rows = factored.loss_rows(
            self, [slot.block for slot in self._slots], recording,
            loss_output_gradients, scale)
        statistics.update(self, recording, tape, outputs, y_true, y_pred,
                          sample_weight, loss_value, scale, forward)
        statistics.update_inverses(self)

    def apply(self, grads, trainable_variables=None):
        applied = super().apply(grads, trainable_variables)
        capture.warn_if_unfed(self)
        return applied

    def _check_variables_are_known(self, variables):
        try:
            super()._check_variables_are_known(variables)
        except ValueError as error:
            if not self.curvature_updates:
                raise
            raise validation.built_from_the_recording(error) from None

    # Update -------------------------------------------------------------------

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        # Sum the replicas' gradients first, so that preconditioning and the KL-clip
        # inner product see the global gradient; Keras's own all-reduce is skipped.
        grads = [g for g, _ in super()._all_reduce_sum_gradients(
            list(zip(grads, trainable_variables)))]
        # A step whose (global) gradient is not finite changes nothing but the
        # counters: `update_step` keeps every weight and momentum as they are.
        self._step_is_finite = ops.all_finite(grads)
        self.skipped_steps.assign_add(
            tf.cast(tf.logical_not(self._step_is_finite), tf.int32)
        )
        grads = updates.precondition(self, grads, list(trainable_variables),
                                     learning_rate)
        update = super()._backend_update_step
        finite = self._step_is_finite
        if distributed.merges_updates():
            # A `tf.cond` in a replica's context cannot hold Keras's `merge_call`:
            # `update_step` guards each update with `tf.where` instead.
            update(grads, trainable_variables, learning_rate)
        else:
            # One `tf.cond` skips every update of a non-finite step; `update_step`
            # then updates in place without per-element guards.
            self._step_is_finite = None
            tf.cond(finite,
                    lambda: update(grads, trainable_variables, learning_rate),
                    lambda: None)
        # Trace-time hand-overs to this step only; not kept between steps.
        self._step_is_finite = None
        self._partner.end_step()
        self._loss_rows = {}
        damping_lib.adapt(self, self._products.pop(distributed.replica_index(), None),
                          finite)

    def _all_reduce_sum_gradients(self, grads_and_vars):
        return grads_and_vars

    def _apply_weight_decay(self, variables):
        # Applied in `update_step`, so that a skipped step does not decay either.
        pass

    def update_step(self, gradient, variable, learning_rate):
        updates.update_variable(self, gradient, variable, learning_rate)

    # Serialisation ------------------------------------------------------------

    def get_config(self):
        return serialization.config_of(self, super().get_config())

    @classmethod
    def from_config(cls, config, custom_objects=None):
        return super().from_config(serialization.arguments_of(config, custom_objects),
                                   custom_objects=custom_objects)

    # Diagnostics --------------------------------------------------------------

    def curvature_report(self):
        """Per-layer curvature diagnostics, computed eagerly from the current state.

        Returns:
            `kl_clip_scale` (the last step's KL-clipping factor) and, for each
            preconditioned layer (by name; by path where nested models' layers share
            a name), `trace` (of the block's approximate Fisher), `damping` (the
            effective one), `cond_left`, `cond_right` (condition numbers of the
            damped factors) and `update_ratio` (`|nu U| / |G|` of the last step).
        """
        return monitor.curvature_report(self)

    # Approximation-specific ---------------------------------------------------

    def _factor_specs(self, block):
        raise NotImplementedError

    def _layer_damping(self, block, factors, damping):
        return damping

    def _trace(self, factors):
        raise NotImplementedError

    def _statistics(self, block, a, g, num_examples, a_norms=None):
        raise NotImplementedError

    def _damped_factors(self, block, factors, damping):
        raise NotImplementedError
