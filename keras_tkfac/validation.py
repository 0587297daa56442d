"""Argument checks shared by the optimizers: a `ValueError` that names the argument
and the value received, as Keras's own optimizers do."""

import math
import numbers
import random

from absl import logging
import keras

from keras_tkfac import factored
from keras_tkfac import inverses as inverses_lib
from keras_tkfac import loss_specs
from keras_tkfac import precision
from keras_tkfac import step_size


def is_schedule(value):
    return isinstance(value, keras.optimizers.schedules.LearningRateSchedule)


def check_real(name, value, low=None, high=None, low_open=False, high_open=True):
    """Raises a `ValueError` naming `name` unless `value` is a real number in range."""
    ok = (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(value)
    )
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        bounds = f"{left}{low if low is not None else '-inf'}, "
        bounds += f"{high if high is not None else 'inf'}{right}"
        raise ValueError(
            f"`{name}` must be a finite number in {bounds}. "
            f"Received: {name}={value!r}"
        )


def check_int(name, value, low=1):
    if not (isinstance(value, numbers.Integral) and not isinstance(value, bool)) or (
        value < low
    ):
        raise ValueError(
            f"`{name}` must be an integer >= {low}. Received: {name}={value!r}"
        )


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(
            f"`{name}` must be one of {choices}. Received: {name}={value!r}"
        )


def check_curvature_arguments(*, learning_rate, damping, momentum, factor_decay,
                              factor_update_freq, inverse_update_freq, inverse_warmup,
                              kl_clip, conv_location_stride, split_inverses,
                              max_factor_dim, fallback_lr_ratio, seed,
                              fallback_lr_ceiling=1.0):
    """The numeric and boolean arguments of `TKFAC`/`KFAC` (learning rate and damping
    may also be schedules; the learning rate also a callable)."""
    if not (is_schedule(learning_rate) or callable(learning_rate)):
        # 0 is allowed, as Keras's optimizers allow it (a frozen run; a
        # warm-up from 0 reaches it through a schedule anyway).
        check_real("learning_rate", learning_rate, low=0.0)
    if not is_schedule(damping):
        check_real("damping", damping, low=0.0, low_open=True)
    else:
        check_damping_schedule(damping)
    check_real("momentum", momentum, low=0.0, high=1.0)
    check_real("factor_decay", factor_decay, low=0.0, high=1.0)
    check_int("factor_update_freq", factor_update_freq)
    check_int("inverse_update_freq", inverse_update_freq)
    check_choice("inverse_warmup", inverse_warmup, (True, False))
    if kl_clip is not None:
        check_real("kl_clip", kl_clip, low=0.0, low_open=True)
    check_int("conv_location_stride", conv_location_stride)
    check_choice("split_inverses", split_inverses, (True, False))
    check_int("max_factor_dim", max_factor_dim)
    check_real("fallback_lr_ratio", fallback_lr_ratio, low=0.0, low_open=True)
    check_real("fallback_lr_ceiling", fallback_lr_ceiling, low=1.0)
    check_int("seed", seed, low=0)


def check_damping_schedule(schedule):
    """A damping schedule is read at the steps of `step_size.schedule_values`
    (where it can be evaluated eagerly): a negative or NaN value, or 0 at step 0,
    raises; a schedule that decays to 0 later (a `PolynomialDecay` to 0, an
    exponential decay underflowing) is logged, since from that step on a factor's
    inverse fails and the last inverse is kept (counted in `inverse_failures`),
    which a run shorter than that never meets. Found by a probe (2026-12-04): a
    `PolynomialDecay` to 0 was accepted silently and its inverses failed from its
    last step on."""
    values = step_size.schedule_values(schedule) or ()
    for step, value in values:
        if value < 0.0 or value != value or (step == 0 and value == 0.0):
            raise ValueError(
                f"`damping` must stay positive; the schedule gives {value} at step "
                f"{step}. Received: damping={schedule!r}")
    zero = [step for step, value in values if value == 0.0]
    if zero:
        logging.warning(
            "keras_tkfac: the damping schedule reaches 0 by step %d; from there on "
            "the factors' inverses fail and the last inverses are kept "
            "(`inverse_failures` counts them). Give it a positive floor (e.g. "
            "`end_learning_rate` of a PolynomialDecay).", zero[0])


def check_adaptive_damping(value, step_control, has_model):
    """`adaptive_damping` is a bool, and needs a step control with a quadratic
    model (`has_model`) to compare the loss's change with."""
    check_choice("adaptive_damping", value, (True, False))
    if value and not has_model:
        raise ValueError(
            "`adaptive_damping=True` adapts the damping from the quadratic model's "
            'predicted change: use step_control="quadratic" or '
            f'"graft_quadratic". Received: adaptive_damping=True with '
            f"step_control={step_control!r}")


def resolve_curvature_arguments(*, learning_rate, damping, momentum, factor_decay,
                                factor_update_freq, inverse_update_freq,
                                inverse_warmup, kl_clip, step_control,
                                adaptive_damping, model_update_freq, fisher,
                                inverse_dtype, inverse_rank,
                                precondition_dtype, products_dtype,
                                precondition_form,
                                conv_location_stride, split_inverses, max_factor_dim,
                                fallback_lr_ratio, fallback_lr_ceiling, seed):
    """Checks `CurvatureOptimizer`'s arguments (a `ValueError` naming the argument
    and the value received) and fills in the defaults that depend on the step
    control. Returns `(learning_rate, fallback_lr_ratio, fallback_lr_ceiling,
    adaptive_damping, seed)`."""
    check_choice("step_control", step_control, step_size.STEP_CONTROLS)
    if learning_rate is None:
        learning_rate = step_size.DEFAULT_LEARNING_RATE[step_control]
    if fallback_lr_ratio is None:
        fallback_lr_ratio = step_size.DEFAULT_FALLBACK_LR_RATIO[step_control]
    if fallback_lr_ceiling is None:
        fallback_lr_ceiling = step_size.DEFAULT_FALLBACK_LR_CEILING.get(step_control, 1.0)
    if seed is None:
        seed = random.randrange(2**31 - 1)
    check_curvature_arguments(
        learning_rate=learning_rate, damping=damping, momentum=momentum,
        factor_decay=factor_decay, factor_update_freq=factor_update_freq,
        inverse_update_freq=inverse_update_freq, inverse_warmup=inverse_warmup,
        kl_clip=kl_clip, conv_location_stride=conv_location_stride,
        split_inverses=split_inverses, max_factor_dim=max_factor_dim,
        fallback_lr_ratio=fallback_lr_ratio, seed=seed,
        fallback_lr_ceiling=fallback_lr_ceiling,
    )
    # (After the checks: an invalid learning rate raises without this warning.)
    step_size.warn_if_capped(step_control, learning_rate)
    check_choice("fisher", fisher, loss_specs.FISHER_TYPES)
    if adaptive_damping is None:
        adaptive_damping = step_size.uses_products(step_control)
    check_adaptive_damping(adaptive_damping, step_control,
                           step_size.uses_products(step_control))
    check_int("model_update_freq", model_update_freq)
    check_choice("inverse_dtype", inverse_dtype, inverses_lib.INVERSE_DTYPES)
    if inverse_rank is not None:
        check_int("inverse_rank", inverse_rank)
    precision.check("precondition_dtype", precondition_dtype)
    precision.check("products_dtype", products_dtype)
    check_choice("precondition_form", precondition_form, factored.FORMS)
    return learning_rate, fallback_lr_ratio, fallback_lr_ceiling, adaptive_damping, seed


def built_from_the_recording(error):
    """Keras's "Unknown variable" `error`, for an optimizer that a custom loop's
    first `update_curvature` built from the recorded model's variables (Keras's
    message does not say why, nor what to do)."""
    return ValueError(
        f"{error} The first `update_curvature` call built this optimizer from the "
        "recorded model's trainable variables. To train others too (a variable "
        "outside the model), build it with all of them before the first step: "
        "`optimizer.build(model.trainable_variables + [...])`.")
