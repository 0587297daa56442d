"""Argument checks shared by the optimizers: a `ValueError` that names the argument
and the value received, as Keras's own optimizers do."""

import math
import numbers

import keras


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
