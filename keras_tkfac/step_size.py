"""Step-size control: how far a preconditioned update `U = F^-1 G` moves the weights.

Three controls, chosen with `step_control`:

- `"graft"` (the default): each layer moves in TKFAC's (or KFAC's) direction `U_l` by
  the distance RMSProp would move it, `|R_l|` with
  `R_l = G_l / (sqrt(v_l / (1 - beta_2^t)) + eps)` and `v_l` the moving average of
  `G_l^2` (Adam's step without its first moment; Agarwal et al., 2020, "grafting";
  Anil et al., 2020, use it for Shampoo). Momentum is then Adam's first moment,
  `m <- momentum * m + (1 - momentum) * u`, so `learning_rate` has Adam's scale: at the
  same learning rate each layer moves as far as with Adam, in the curvature's
  direction. The curvature then decides how a layer's step is spread over its
  weights, not how long it is; RMSProp's norm is layer-wise scale-free, which a fixed
  damping is not (see below). `kl_clip` is not used.
- `"trust_region"`: `nu = min(1, sqrt(kl_clip / <U, G>))` for all layers together,
  the step `learning_rate * nu * U`, heavy-ball momentum `m <- momentum * m + u`.
  With the damped curvature `F` of the preconditioned layers, `<U, G> = G^T F^-1 G`
  is twice the KL divergence that the model's predictive distribution moves by under
  the unit step (to second order, in the Kronecker-factored approximation).
- `"kl_clip"` (Ba et al., 2017): `nu = min(1, sqrt(kl_clip / (learning_rate^2 <U, G>)))`.
  The step `learning_rate * nu` is then `min(learning_rate, sqrt(kl_clip / <U, G>))`:
  when the clip binds, which at a small `kl_clip` it does on every step, the
  learning rate has no effect at all.

At `learning_rate=0.1`, `"trust_region"` with `kl_clip=0.1` and `"kl_clip"` with
`kl_clip=1e-3` take the same steps; they part when the learning rate changes.

Why grafting is the default (measured 2026-11-29 with `tools/suite.py`, figures in the
README): under a fixed damping `lambda`, a layer whose curvature is far below
`lambda` gets `U = G / lambda`, momentum SGD. On the transformer text classifier
every layer is in that regime (Fisher traces 1e-8 to 4 against damping 0.1 on
blocks of hundreds of dimensions) and the KL bound never binds, so TKFAC stayed at
chance as momentum SGD does; lowering the damping, or making it relative to each
layer's trace, made the steps of the attention queries and keys 1e4-2e5 times their
gradient and training unstable. Grafting keeps TKFAC's direction and takes the length
from the gradient's own statistics. The quadratic-model step of Martens & Grosse
(2015, §7), which needs exact Fisher-vector products, is not implemented.
"""

import tensorflow as tf

from keras_tkfac import ops

STEP_CONTROLS = ("graft", "trust_region", "kl_clip")

# The defaults that depend on the step control: `learning_rate` and the first-order
# partner's `fallback_lr_ratio`.
DEFAULT_LEARNING_RATE = {"graft": 3e-3, "trust_region": 0.1, "kl_clip": 0.1}
DEFAULT_FALLBACK_LR_RATIO = {"graft": 1.0, "trust_region": 0.01, "kl_clip": 0.01}

# RMSProp's second moment in `"graft"`: Adam's (and Keras's) defaults.
GRAFT_BETA_2 = 0.999
GRAFT_EPSILON = 1e-7


def uses_moments(control):
    """Whether `control` keeps a second moment per preconditioned layer."""
    return control == "graft"


def averages_momentum(control):
    """Whether momentum is an average (`(1 - momentum) u`) rather than a sum."""
    return control == "graft"


def graft_updates(updates, grads, moments, step):
    """The grafted updates `U_l |R_l| / |U_l|` and the new second moments.

    Args:
        updates: list of preconditioned gradients `U_l`.
        grads: list of the raw (global) gradients `G_l`, same shapes.
        moments: list of the second moments `v_l`, same shapes.
        step: `t >= 1`, the step count of the bias correction.

    Returns:
        `(new_updates, new_moments)`.
    """
    new_updates, new_moments = [], []
    for update, grad, moment in zip(updates, grads, moments):
        norm, moment = ops.rms_step_norm(grad, moment, step, GRAFT_BETA_2, GRAFT_EPSILON)
        new_updates.append(ops.graft(update, norm))
        new_moments.append(moment)
    return new_updates, new_moments


def update_scale(control, updates, grads, learning_rate, kl_clip):
    """The factor `nu` by which every (grafted) update `U_l` is scaled.

    Args:
        control: one of `STEP_CONTROLS`.
        updates: list of preconditioned gradients `U_l`.
        grads: list of the raw (global) gradients `G_l`, same shapes.
        learning_rate: the current learning rate `eta`.
        kl_clip: the bound `kappa`, or `None` for no bound (`nu = 1`).

    Returns:
        A scalar float32 tensor in `(0, 1]`.
    """
    if kl_clip is None or control == "graft":
        return tf.constant(1.0)
    if control == "kl_clip":
        return ops.kl_clip_factor(updates, grads, learning_rate, kl_clip)
    return ops.kl_clip_factor(updates, grads, 1.0, kl_clip)
