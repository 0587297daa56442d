"""The curvature optimizers' Keras configs: what `get_config` records and how
`from_config` turns it back into constructor arguments (a damping schedule and the
first-order partner are Keras objects of their own)."""

import keras

from keras_tkfac import partner as partner_lib
from keras_tkfac import validation

# The constructor arguments that `CurvatureOptimizer.get_config` records as they are
# (the subclasses add their own).
ARGUMENTS = ("momentum", "factor_decay", "factor_update_freq", "inverse_update_freq",
             "inverse_warmup", "kl_clip", "step_control", "adaptive_damping",
             "model_update_freq", "fisher", "inverse_dtype", "inverse_rank",
             "precondition_dtype", "products_dtype", "precondition_form", "conv_location_stride",
             "split_inverses", "max_factor_dim", "fallback_lr_ratio",
             "fallback_lr_ceiling", "seed")


def config_of(optimizer, config):
    """`config` (Keras's base optimizer config) with `optimizer`'s arguments: the
    damping (a schedule serialised) and the partner's config as `fallback`."""
    damping = optimizer.damping
    if validation.is_schedule(damping):
        damping = keras.saving.serialize_keras_object(damping)
    config.update({name: getattr(optimizer, name) for name in ARGUMENTS})
    config.update(damping=damping, fallback=optimizer._partner.get_config())
    return config


def arguments_of(config, custom_objects=None):
    """A copy of `config` with the damping schedule and the partner deserialised."""
    config = dict(config)
    if isinstance(config.get("damping"), dict):
        config["damping"] = keras.saving.deserialize_keras_object(
            config["damping"], custom_objects=custom_objects)
    if "fallback" in config:
        config["fallback"] = partner_lib.from_config(config["fallback"], custom_objects)
    return config
