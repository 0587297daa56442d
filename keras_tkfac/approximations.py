"""The two approximations of the Fisher on the curvature engine: `TKFAC` and `KFAC`."""

import tensorflow as tf
import keras

from keras_tkfac import damping as damping_lib
from keras_tkfac import ops
from keras_tkfac import validation
from keras_tkfac.optimizer import CurvatureOptimizer
from keras_tkfac.shapes import factor_trace
from keras_tkfac.shapes import group_shape
from keras_tkfac.shapes import input_factor_shape
from keras_tkfac.shapes import output_factor_shape

_COMMON_ARGS = """
    Args:
        learning_rate: float or `keras.optimizers.schedules.LearningRateSchedule`,
            the step size `eta`, or `None` for the step control's default: `1e-3`
            (Keras's and Adam's default) under `"graft_quadratic"` and
            `"quadratic"` (the weights move by `min(eta, 1e-3) / 1e-3` times the
            quadratic model's step: the default takes it whole, `3e-4` 0.3 of
            it); `3e-3` under `"graft"` (each layer moves as far as RMSProp would
            at this learning rate); `0.1` under `"trust_region"` and `"kl_clip"`.
            Defaults to `None`.
        damping: float or schedule, the Tikhonov damping `lambda` added to the
            Fisher block. Defaults to `0.1`.
        momentum: float in `[0, 1)`, `tau`; `0` disables momentum. Under `"graft"`
            it is an average, `m <- tau m + (1 - tau) u` (Adam's `beta_1`), else a
            sum, `m <- tau m + u`; unused by `"graft_quadratic"` and
            `"quadratic"`, which choose the previous step's coefficient
            themselves. Defaults to `0.9`.
        factor_decay: float in `[0, 1)`, the decay `epsilon` of the factor moving
            averages (bias-corrected). Defaults to `0.95`.
        factor_update_freq: int, statistics are refreshed every this many steps
            (the sampled-label backward pass runs only then). Defaults to `10`.
        inverse_update_freq: int, damped inverses are recomputed every this many
            steps. Defaults to `100`.
        inverse_warmup: bool; also recompute the inverses at the statistics steps
            `factor_update_freq * 2^j` before `inverse_update_freq` (see
            `keras_tkfac.cadence`). Defaults to `True`.
        kl_clip: float or `None`, the bound `kappa` on the (approximate) KL
            divergence of a step under `"trust_region"` and `"kl_clip"`, and on the
            predicted KL `(1/2) s^T C s` of the exact curvature under `"quadratic"`
            and `"graft_quadratic"`, where each mean-squared-error output's part
            of `C` is divided by `min(max(1, 2 L), 1e4)`, `L` that output's
            weighted batch loss (its KL under the residuals' own variance:
            `keras_tkfac.quadratic.kl_curvature`; unused by `"graft"`); `None`
            disables it. Defaults to `0.1`.
        step_control: `"graft_quadratic"`: each layer's update `U_l` is first
            rescaled to the norm of RMSProp's step `G_l / sqrt(v_l)` (Adam without
            its first moment), then the step `a u + b M` (`M` the previous step)
            minimises the quadratic model of the loss built on the exact
            Gauss-Newton matrix of the batch (one extra forward-mode pass per
            direction, `keras_tkfac.quadratic`; without `forward=` in a custom
            loop, the `"graft"` step), with `a` at least 1e-3 where positive
            (`step_size.GRAFT_QUADRATIC_FLOOR`), scaled by the
            learning rate; `"quadratic"`: the same without grafting; `"graft"`:
            the grafted `u` with Adam's momentum, so the curvature gives each
            layer's direction and the gradient's statistics the length;
            `"trust_region"`: `kl_clip` bounds the unit step
            `nu = min(1, sqrt(kappa / <U, G>))` and the learning rate scales every
            step; `"kl_clip"`: Ba et al.'s `nu = min(1, sqrt(kappa / (eta^2 <U, G>)))`,
            under which a binding clip makes the learning rate irrelevant. See
            `keras_tkfac.step_size` for how the default was chosen. Defaults to
            `"graft_quadratic"`.
        adaptive_damping: bool or `None`; under `"quadratic"` and
            `"graft_quadratic"`, adapt the damping of every layer (model and
            preconditioner) every 5 steps from the ratio of the batch's actual
            loss change to the model's prediction (Levenberg-Marquardt, Martens &
            Grosse 2015, §6.5; one more forward pass then; `keras_tkfac.damping`).
            `None`: on under those two controls (measured on the suite: docs/RESULTS.md,
            "Levenberg-Marquardt damping"), off under the others, which have no
            model to compare with. Defaults to `None`. (Separately, under those two
            controls the model's damping falls with the batch's loss once it is
            below a tenth of the highest seen: `keras_tkfac.damping.model_factor`.)
        model_update_freq: int >= 1; under `"quadratic"` and
            `"graft_quadratic"`, the quadratic model (its curvature products, the
            extra forward-mode pass) is built every this many steps; the steps in
            between reuse its coefficients `(a, b)` on their own directions, and
            the damping adapts on the model's steps only (every least common
            multiple of 5 and this). On the workload suite `5` halved the median
            step but was at least as good as the best Adam on 12 of 16 runs
            against 15 of 16, and a probe's PointNet diverged with it (docs/RESULTS.md,
            "The model every few steps"; README, Limitations). Defaults to `1`.
        fisher: `"true"` (labels sampled from the model; Huber, log-cosh and
            squared-hinge outputs sample their output gradients from their
            Hessian at the real labels; an output whose loss has no sampling
            rule, e.g. MAE, takes its real labels, logged once) or `"empirical"`
            (real labels for every output). Defaults to `"true"`.
        inverse_dtype: `"float32"` or `"float64"`, the precision of the inversion.
            Defaults to `"float32"`.
        inverse_rank: `None` or an int `k >= 1`. With `k`, each damped factor of
            more than `2k` dimensions of a layer other than a convolution (dense,
            embedding, attention projections) is inverted as a scaled identity plus a
            rank-`k` correction (`low_rank.low_rank_inverse`: a subspace iteration from
            the previous inverse step's basis, the other eigenvalues at their mean),
            stored as `[d + 1, k + 1]` instead of `[d, d]` and applied in
            `8 k d_in d_out` flops instead of `2 d_in d_out (d_in + d_out)`. At the
            defaults a dense layer's damped factors are the damping's multiple of
            the identity but for a few directions; with `k = 64` the suite
            stayed at 8 of 8 at two seeds, its results moving both ways (by up
            to 14%) where it acts, its mean step on the MLP 2.95 -> 2.70x Adam's.
            A convolution's factors have spread spectra (its damping is relative
            to its trace), and so approximated the suite's convolutional
            autoencoder did not train: convolutions keep exact inverses (`tools/spectra.py`; docs/RESULTS.md, "How far the damped
            factors are from the identity"). Opt-in. Defaults to `None` (exact
            inverses).
        precondition_dtype: `"float32"`, `"bfloat16"` or `"auto"`, the precision of
            the preconditioning products `Phi^^-1 G Psi^^-1` (inverses, gradients and
            the intermediate product rounded to bfloat16; float32 updates). Meant for
            hardware with bfloat16 matmul units (on a CPU without them it was not
            faster); the update's relative error was 1e-2 to 3e-2 (docs/RESULTS.md, "Cost
            of a step"). `"auto"`: bfloat16 where the device has such units
            (`keras_tkfac.precision`: GPUs of compute capability 8.0 and later, CPUs
            with AMX or AVX512-BF16), else float32. Defaults to `"auto"` (since
            2026-12-06; float32 before): on the suite, at seeds 0 and 1, steps to
            the targets and best validation losses moved within the spread that
            float32 rounding alone gives (`tools/rounding_spread.py`), and on a CPU
            with AMX the step took about 0.75x as long (docs/RESULTS.md, "bfloat16
            curvature matmuls where the hardware has them").
        products_dtype: `"float32"`, `"bfloat16"` or `"auto"`, the precision of the
            tangent matmuls and convolutions of the quadratic model's curvature
            products (`step_control="graft_quadratic"` and `"quadratic"`): their
            inputs rounded to bfloat16, float32 results, which the model sums into a
            2x2 Gram over the batch. `"auto"` as for `precondition_dtype`. Defaults
            to `"auto"` (since 2026-12-06).
        precondition_form: `"auto"` or `"full"`. Under `"auto"`, a `Dense` or
            `EinsumDense` layer whose batch has fewer rows than about its widths
            is preconditioned as `(Phi^^-1 A^T)(G_out Psi^^-1)` from its inputs `A`
            and output gradients `G_out` (fewer flops; the same update up to
            rounding), when `wrap`'s training step provides them and the layer's
            gradient is exactly `A^T G_out` (see `keras_tkfac.factored`): one
            replica, no regularizer on the layer, no gradient clipping or
            accumulation, and a run-time check along a random direction (tied
            weights, an `add_loss` on a kernel: the full form for that step).
            `"full"` always multiplies the gradient matrix. Defaults to `"auto"`.
        conv_location_stride: int >= 1; convolution layers' statistics use the
            output locations on a grid of this stride along each spatial axis (the
            im2col rows of a statistics step shrink by about `stride^2` for a 2-D
            convolution), rescaled to estimate the sums over all locations; the
            grid's offsets differ between the examples of a batch and move at
            every statistics step. `1` uses every location, and so does a layer
            whose spatial sizes are unknown when traced. Its effect on the
            approximation error: docs/RESULTS.md, "Cost of a step". Defaults to
            `2` for `TKFAC` (since 2026-12-06, when the rows came to be gathered
            at each example's grid by one `tf.gather`: the suite's convolutional
            programs' steps 0.89-0.93 as long (a first ResNet run 1.05, not
            repeated), their best validation losses at two seeds all still below
            the best Adam's; docs/RESULTS.md, "Convolution statistics at every
            second location") and `1` for `KFAC` (the baseline as published).
        split_inverses: bool; under a `tf.distribute` strategy, each replica
            inverts about `1/R` of the factors (balanced by `d^3`) and the results
            are shared with one all-reduce. Defaults to `True`.
        max_factor_dim: int; a layer whose input (plus bias) or output dimension
            exceeds it is not preconditioned but takes the first-order fallback,
            logged at build: a factor of dimension `d` costs `8 d^2` bytes (factor
            and inverse, float32) and `d^3` flops to invert. An `Embedding`'s
            vocabulary does not count (its input factor is a `[vocab]` vector).
            Defaults to `4096` (128 MiB for the largest factor).
        fallback: the first-order partner of the variables that no curvature block
            covers (see `keras_tkfac.partner`): `"adam"`, `"sgd"` (momentum SGD),
            or a `keras.optimizers.Adam`, `AdamW` or `SGD` instance whose
            hyperparameters and learning rate are used. Defaults to `"adam"`.
        fallback_lr_ratio: float > 0, the partner's learning rate relative to
            `learning_rate` when `fallback` is a name, or `None` for the step
            control's default: `1` under `"graft"` (the partner is Adam at the same
            learning rate), also under `"graft_quadratic"` and `"quadratic"` (Adam
            at `1e-3` for the default learning rate), `0.01` otherwise. Defaults
            to `None`.
        fallback_lr_ceiling: float >= 1, or `None` for the step control's
            default. Under `"graft_quadratic"` the quadratic model's coefficient
            `a` of the grafted direction is the learning rate at which RMSProp
            would take the preconditioned weights' step; on a step whose model is
            trusted, a named partner's learning rate is multiplied by
            `min(max(a / 1e-3, 1), fallback_lr_ceiling)`, so that the weights the
            curvature does not cover move as far as the model found it pays to
            move the others. `1` turns it off (the partner at
            `fallback_lr_ratio * learning_rate`, as before 2026-12-04); ignored by
            the other step controls and by a `fallback` instance (its own learning
            rate). Defaults to `None`.
        seed: int or `None`, seed of the label sampler; `None` draws one (it is then
            part of the config). Defaults to `None`.
        name: string or `None`; `None` names optimizers `"{name}"`, `"{name}_1"`,
            ... as Keras does. Defaults to `None`.
"""


# The default multiple of a convolution block's mean eigenvalue used as its damping,
# by step control: 1 where the quadratic model or grafting sets each layer's step
# length, 100 where only a bound on the whole step's KL does (measured:
# docs/RESULTS.md, "The convolution layers' damping constant" and "Damping of
# convolution layers").
TRACE_DAMPING_SCALE = {"graft_quadratic": 1.0, "quadratic": 1.0, "graft": 1.0,
                       "trust_region": 100.0, "kl_clip": 100.0}

# The default `trace_damping_cap` (`"auto"`) by step control: the multiple of a
# dense block's Fisher trace that its damping may not exceed, where the quadratic
# model sets the step (docs/RESULTS.md, "A damping at most a multiple of the
# layer's trace"); not measured under the other controls, so off there.
TRACE_DAMPING_CAP = {"graft_quadratic": 3e-3, "quadratic": 3e-3}

# How the convolution layers' trace-relative damping is split over the two factors
# when `conv_damping_split=None`: "balanced" (each factor damped by the same multiple
# of its mean eigenvalue) under the two quadratic-model controls, where it lowered
# the suite's convolutional losses; "even" (the specification's split) under the
# others, where it was mixed (docs/RESULTS.md, "The split of the convolution
# layers' damping").
CONV_DAMPING_SPLIT = {"graft_quadratic": "balanced", "quadratic": "balanced"}
CONV_DAMPING_SPLITS = ("balanced", "even")
SEQUENCE_STATISTICS = ("exact", "expand")


@keras.saving.register_keras_serializable(package="keras_tkfac")
class TKFAC(CurvatureOptimizer):
    """Trace-restricted Kronecker-factored natural gradient (TKFAC).

    Each covered layer's Fisher block `F = E[(a a^T) ⊗ (g g^T)]` is approximated by
    `delta * (Phi ⊗ Psi)` with

    ```
    delta = E[|a|^2 |g|^2]            (= tr F, exactly)
    Phi   = E[|g|^2 a a^T] / delta     (tr Phi = 1)
    Psi   = E[|a|^2 g g^T] / delta     (tr Psi = 1)
    ```

    kept as bias-corrected moving averages of `delta`, `delta Phi`, `delta Psi`. With
    damped factors `Phi^ = sqrt(delta) Phi + sqrt(lambda) I`,
    `Psi^ = sqrt(delta) Psi + sqrt(lambda) I`, each step computes, for the stacked
    kernel-and-bias gradient `G` of a layer,

    ```
    U  = Phi^^-1 G Psi^^-1
    v  = 0.999 v + 0.001 G^2,  R = G / (sqrt(v / (1 - 0.999^t)) + 1e-7)
    u  = U |R| / |U|
    (a, b) = argmin q(a u + b s_prev),  q(s) = -<s, G> + (1/2) s^T (C + lambda I) s
    s  = a u + b s_prev
    theta = theta - (min(learning_rate, 1e-3) / 1e-3) * s
    ```

    with `C` the exact Gauss-Newton matrix of the batch (forward-mode
    products) and `lambda` adapted every 5 steps from the model's reduction ratio
    (`step_control="graft_quadratic"`, the default; `keras_tkfac.step_size`,
    `keras_tkfac.quadratic`, `keras_tkfac.damping`). The curvature chooses each
    layer's direction, RMSProp the layers' relative step lengths, the quadratic
    model the overall length and the momentum; the learning rate has Adam's scale
    (default `1e-3`, Adam's default, the model's whole step). `step_control="graft"` drops the
    model (`m = momentum * m + (1 - momentum) u`, `theta -= learning_rate * m`: one
    forward pass less per step); `"trust_region"` and `"kl_clip"` bound the
    approximate KL divergence of the step instead (default learning rate `0.1`).

    Convolution layers use the trace-relative damping
    `lambda_l = trace_damping_scale * max(delta_l, trace_damping_floor) / dim_l`
    (`conv_damping="trace"`, `dim_l = d_in' * d_out`): a multiple of the block's mean
    eigenvalue, times the Levenberg-Marquardt factor. The paper states that the
    damping of convolution layers is proportional to the trace over the dimension;
    its constant could not be read here. The default constant, 1 (the block's mean
    eigenvalue itself), was chosen on the workload suite under the default step
    control (2026-12-01): against 100, the previous default, it lowered the best
    validation loss of all four convolutional programs at two seeds but one
    (Conv1D series, seed 1: 0.631 against 0.626), by 4-38% (the ResNet by
    35-38%); 10 lay between; 0.3 was 2.5% better on their geometric mean and is
    farther from the paper's rule; a fixed damping (`conv_damping="fixed"`) was
    worse than 1 on all eight. The paper's split of the damping over the two factors
    could not be read here either; the even split damps a 3x3 convolution's input
    factor by about 3 times its mean eigenvalue and its output factor by about a
    third of it, so under `"graft_quadratic"` the split is balanced by default
    (`conv_damping_split`): on the suite's four convolutional programs at five
    seeds it lowered the best validation loss on 15 of 20 runs (geometric mean of
    the ratios 0.96; docs/RESULTS.md, "The split of the convolution layers'
    damping"). 100 had been chosen under the earlier step controls, where
    the conv layers' updates at a constant of 1 were many times the
    gradient's norm and training diverged; the quadratic model now sets every
    step's length (docs/RESULTS.md, "Damping of convolution layers"). Under `"graft"` 1 was
    also better than 100 on the four programs (seed 0); under `"trust_region"` and
    `"kl_clip"` 100 stays the default (not re-measured).
    The other layers' damping is the given one, at most `trace_damping_cap` (3e-3
    under the quadratic controls) times the block's trace:
    `lambda_l = min(lambda, trace_damping_cap * max(delta_l, trace_damping_floor))`,
    times the Levenberg-Marquardt factor. Ours, not the paper's: an absolute damping
    presumes a Fisher block of a scale near one, and a layer whose trace is far
    below it (a deep autoencoder's inner layers, a recurrent model's head) gets a
    nearly unpreconditioned direction and a quadratic model whose damping term
    outweighs its curvature. Measured on the workload suite and the held-out sweep
    (2026-12-07, docs/RESULTS.md, "A damping at most a multiple of the layer's
    trace"): the deep autoencoder's best validation loss 0.173 -> 0.139 (seed 0) and
    0.171 -> 0.135 (seed 1), the BiLSTM's 0.035 -> 0.032 and 0.025 -> 0.013, the
    transformer's 0.034 -> 0.043 and 0.042 -> 0.027; 8 of 8 programs at least as good
    as the best Adam at both seeds; the held-out sweep at most Adam's on 65 of 82
    programs against 64. Embeddings keep the given damping (with the cap, small
    sequence classifiers memorised their noise tokens), and so do LoRA factors (one
    LoRA attention model's first epochs rose to a validation loss of 4).
    Variables without a curvature block take the first-order partner (`fallback`,
    Adam by default). The model must be wrapped with `keras_tkfac.wrap`.
{args}        conv_damping: `"trace"` or `"fixed"` (the damping for convolution
            layers). Defaults to `"trace"`.
        trace_damping_floor: float >= 0, the floor `nu` on `delta` in the
            trace-relative damping. Defaults to `1e-3`.
        trace_damping_scale: float > 0, the multiple of the block's mean eigenvalue
            used as the damping of convolution layers, or `None`: `1` under
            `"graft_quadratic"`, `"quadratic"` and `"graft"` (the model or the
            grafting sets each layer's step length), `100` under `"trust_region"`
            and `"kl_clip"`, where only the whole step's KL is bounded
            (`TRACE_DAMPING_SCALE`). Defaults to `None`.
        trace_damping_cap: float > 0, `None` or `"auto"`: the damping of a layer
            that is neither a convolution, an embedding nor a LoRA layer's factors
            is at most this multiple
            of its Fisher trace, `lambda_l = min(lambda, trace_damping_cap *
            max(delta_l, trace_damping_floor))` (times the Levenberg-Marquardt
            factor), in its preconditioner and in the quadratic model; `None`: the
            given damping alone. `"auto"`: `3e-3` under `"graft_quadratic"` and
            `"quadratic"`, `None` under the others (not measured there;
            `TRACE_DAMPING_CAP`). Our rule, not the paper's: see above. Defaults to
            `"auto"`.
        conv_damping_split: how a convolution layer's trace-relative damping
            `lambda_l` is split over its two factors: `"balanced"`
            (`Phi^ = sqrt(delta) Phi + pi sqrt(lambda_l) I`,
            `Psi^ = sqrt(delta) Psi + (sqrt(lambda_l) / pi) I`, `pi = sqrt(d_out /
            d_in')`: each factor damped by the same multiple of its mean
            eigenvalue), `"even"` (`sqrt(lambda_l)` on each, the specification's
            split), or `None`: `"balanced"` under `"graft_quadratic"` and
            `"quadratic"`, `"even"` under `"graft"`, `"trust_region"` and
            `"kl_clip"`, as measured (`CONV_DAMPING_SPLIT`). Dense layers' damping
            is split evenly either way. Defaults to `None`.
        sequence_statistics: how a layer applied at every position of a sequence
            (`Dense` and `EinsumDense` on inputs of rank > 2, such as attention's
            projections; recurrent layers where their blocks are registered)
            gives its statistics. `"exact"`: `delta`, `delta Phi`, `delta Psi` are
            the trace and partial traces of the block of each sequence's gradient
            `W_n = sum_t a_t g_t^T` (`ops.tkfac_statistics_sequences`), as for a
            layer applied once. `"expand"`: every position is a row of its own
            (the specification's expansion, exact only when positions are
            uncorrelated). Convolutions always expand. The specification
            prescribes the expansion for `Dense` on sequences; `"exact"` keeps
            TKFAC's defining property (the factors are the block's partial
            traces) for the whole block and was chosen by measurement
            (docs/RESULTS.md, "Exact statistics of layers on sequences"). Defaults
            to `"exact"`.
{kwargs}
    Example:

    ```python
    model = keras_tkfac.wrap(model)
    model.compile(optimizer=keras_tkfac.TKFAC(), loss="sparse_categorical_crossentropy")
    ```

    References:
        - [Gao et al., 2021](https://arxiv.org/abs/2011.10741)
        - [Martens & Grosse, 2015](https://arxiv.org/abs/1503.05671)
        - [Grosse & Martens, 2016](https://arxiv.org/abs/1602.01407)
        - [Ba et al., 2017](https://openreview.net/forum?id=SkkTMpjex)
        - [Agarwal et al., 2020](https://arxiv.org/abs/2002.11803) (grafting)
    """

    def __init__(
        self,
        learning_rate=None,
        *,
        damping=0.1,
        momentum=0.9,
        factor_decay=0.95,
        factor_update_freq=10,
        inverse_update_freq=100,
        inverse_warmup=True,
        kl_clip=0.1,
        step_control="graft_quadratic",
        adaptive_damping=None,
        model_update_freq=1,
        fisher="true",
        conv_damping="trace",
        trace_damping_floor=1e-3,
        trace_damping_scale=None,
        trace_damping_cap="auto",
        conv_damping_split=None,
        sequence_statistics="exact",
        inverse_dtype="float32",
        inverse_rank=None,
        precondition_dtype="auto",
        products_dtype="auto",
        precondition_form="auto",
        conv_location_stride=2,
        split_inverses=True,
        max_factor_dim=4096,
        fallback="adam",
        fallback_lr_ratio=None,
        fallback_lr_ceiling=None,
        seed=None,
        name=None,
        **kwargs,
    ):
        validation.check_choice("conv_damping", conv_damping, ("trace", "fixed"))
        validation.check_real("trace_damping_floor", trace_damping_floor, low=0.0)
        if trace_damping_scale is None:
            trace_damping_scale = TRACE_DAMPING_SCALE.get(step_control, 1.0)
        validation.check_real("trace_damping_scale", trace_damping_scale, low=0.0,
                              low_open=True)
        if isinstance(trace_damping_cap, str) and trace_damping_cap == "auto":
            trace_damping_cap = TRACE_DAMPING_CAP.get(step_control)
        if trace_damping_cap is not None:
            validation.check_real("trace_damping_cap", trace_damping_cap, low=0.0,
                                  low_open=True)
        if conv_damping_split is None:
            conv_damping_split = CONV_DAMPING_SPLIT.get(step_control, "even")
        validation.check_choice("conv_damping_split", conv_damping_split,
                                CONV_DAMPING_SPLITS)
        validation.check_choice("sequence_statistics", sequence_statistics,
                                SEQUENCE_STATISTICS)
        super().__init__(
            learning_rate,
            damping=damping,
            momentum=momentum,
            factor_decay=factor_decay,
            factor_update_freq=factor_update_freq,
            inverse_update_freq=inverse_update_freq,
            inverse_warmup=inverse_warmup,
            kl_clip=kl_clip,
            step_control=step_control,
            adaptive_damping=adaptive_damping,
            model_update_freq=model_update_freq,
            fisher=fisher,
            inverse_dtype=inverse_dtype,
            inverse_rank=inverse_rank,
            precondition_dtype=precondition_dtype,
            products_dtype=products_dtype,
            precondition_form=precondition_form,
            conv_location_stride=conv_location_stride,
            split_inverses=split_inverses,
            max_factor_dim=max_factor_dim,
            fallback=fallback,
            fallback_lr_ratio=fallback_lr_ratio,
            fallback_lr_ceiling=fallback_lr_ceiling,
            seed=seed,
            name=name,
            **kwargs,
        )
        self.conv_damping = conv_damping
        self.trace_damping_floor = float(trace_damping_floor)
        self.trace_damping_scale = float(trace_damping_scale)
        self.trace_damping_cap = (None if trace_damping_cap is None
                                  else float(trace_damping_cap))
        self.conv_damping_split = conv_damping_split
        self.sequence_statistics = sequence_statistics

    def _factor_specs(self, block):
        return [
            ("delta", group_shape(block)),
            ("n_phi", input_factor_shape(block)),
            ("n_psi", output_factor_shape(block)),
        ]

    @property
    def _sequence_statistics(self):
        return self.sequence_statistics == "exact"

    # The statistics take the rows' `|a_r|^2` from blocks that find them without
    # squaring the rows (`CurvatureBlock.row_norms`; `statistics.update`).
    _uses_row_norms = True

    def _statistics(self, block, a, g, num_examples, a_norms=None):
        if block.input_kind == "diagonal":
            return self._math(ops.tkfac_statistics_diagonal)(a, g, num_examples,
                                                             block.d_in)
        if a.shape.rank == (4 if block.groups > 1 else 3):
            return self._math(ops.tkfac_statistics_sequences)(a, g, num_examples)
        if block.groups > 1:
            return self._math(ops.tkfac_statistics_grouped)(a, g, num_examples, a_norms)
        return self._math(ops.tkfac_statistics)(a, g, num_examples, a_norms)

    def _layer_damping(self, block, factors, damping):
        if block.is_conv and self.conv_damping == "trace":
            return ops.trace_relative_damping(
                factors[0], block.d_in * block.d_out, self.trace_damping_floor,
                self.trace_damping_scale,
            ) * damping_lib.scale(self)
        if (self.trace_damping_cap is not None and not block.is_conv
                and block.input_kind != "diagonal" and not block.covers_lora):
            # (`damping` carries the Levenberg-Marquardt factor; the cap too.)
            return ops.trace_capped_damping(
                damping, factors[0], self.trace_damping_cap * damping_lib.scale(self),
                self.trace_damping_floor)
        return damping

    def _trace(self, factors):
        return tf.reduce_sum(factors[0])

    def _damped_factors(self, block, factors, damping):
        damping = self._layer_damping(block, factors, damping)
        balance = None
        if (block.is_conv and self.conv_damping == "trace"
                and self.conv_damping_split == "balanced"):
            balance = ops.balanced_split(block.d_in, block.d_out)
        return ops.tkfac_damped_factors(*factors, damping, balance)

    def get_config(self):
        config = super().get_config()
        config["conv_damping"] = self.conv_damping
        config["trace_damping_floor"] = self.trace_damping_floor
        config["trace_damping_scale"] = self.trace_damping_scale
        config["trace_damping_cap"] = self.trace_damping_cap
        config["conv_damping_split"] = self.conv_damping_split
        config["sequence_statistics"] = self.sequence_statistics
        return config


@keras.saving.register_keras_serializable(package="keras_tkfac")
class KFAC(CurvatureOptimizer):
    """Kronecker-factored approximate curvature (K-FAC), the baseline of `TKFAC`.

    Each covered layer's Fisher block is approximated by `A ⊗ G` with
    `A = E[a a^T]`, `G = E[g g^T]` (for convolutions and sequences, KFC: `A` sums
    over locations, `G` averages over them), damped with the pi-correction
    `A + pi sqrt(lambda) I`, `G + sqrt(lambda) / pi I`,
    `pi = sqrt((tr A / dim A) / (tr G / dim G))`. The update, KL clipping and
    momentum, the step-size control and the first-order partner are those of
    `TKFAC`.
{args}{kwargs}
    References:
        - [Martens & Grosse, 2015](https://arxiv.org/abs/1503.05671)
        - [Grosse & Martens, 2016](https://arxiv.org/abs/1602.01407)
        - [Ba et al., 2017](https://openreview.net/forum?id=SkkTMpjex)
    """

    def __init__(
        self,
        learning_rate=None,
        *,
        damping=0.1,
        momentum=0.9,
        factor_decay=0.95,
        factor_update_freq=10,
        inverse_update_freq=100,
        inverse_warmup=True,
        kl_clip=0.1,
        step_control="graft_quadratic",
        adaptive_damping=None,
        model_update_freq=1,
        fisher="true",
        inverse_dtype="float32",
        inverse_rank=None,
        precondition_dtype="auto",
        products_dtype="auto",
        precondition_form="auto",
        conv_location_stride=1,
        split_inverses=True,
        max_factor_dim=4096,
        fallback="adam",
        fallback_lr_ratio=None,
        fallback_lr_ceiling=None,
        seed=None,
        name=None,
        **kwargs,
    ):
        super().__init__(
            learning_rate,
            damping=damping,
            momentum=momentum,
            factor_decay=factor_decay,
            factor_update_freq=factor_update_freq,
            inverse_update_freq=inverse_update_freq,
            inverse_warmup=inverse_warmup,
            kl_clip=kl_clip,
            step_control=step_control,
            adaptive_damping=adaptive_damping,
            model_update_freq=model_update_freq,
            fisher=fisher,
            inverse_dtype=inverse_dtype,
            inverse_rank=inverse_rank,
            precondition_dtype=precondition_dtype,
            products_dtype=products_dtype,
            precondition_form=precondition_form,
            conv_location_stride=conv_location_stride,
            split_inverses=split_inverses,
            max_factor_dim=max_factor_dim,
            fallback=fallback,
            fallback_lr_ratio=fallback_lr_ratio,
            fallback_lr_ceiling=fallback_lr_ceiling,
            seed=seed,
            name=name,
            **kwargs,
        )

    def _factor_specs(self, block):
        return [("a", input_factor_shape(block)), ("g", output_factor_shape(block))]

    def _statistics(self, block, a, g, num_examples, a_norms=None):
        # (K-FAC's factors do not use the rows' norms: `a_norms` is always `None`.)
        if block.input_kind == "diagonal":
            return self._math(ops.kfac_statistics_diagonal)(a, g, num_examples,
                                                            block.d_in)
        if block.groups > 1:
            return self._math(ops.kfac_statistics_grouped)(a, g, num_examples)
        return self._math(ops.kfac_statistics)(a, g, num_examples)

    def _trace(self, factors):
        return factor_trace(factors[0]) * factor_trace(factors[1])

    def _damped_factors(self, block, factors, damping):
        return ops.kfac_damped_factors(factors[0], factors[1], damping)


_KWARGS_ARG = """        **kwargs: the base Keras optimizer arguments (`weight_decay`, `clipnorm`,
            `clipvalue`, `global_clipnorm`, `use_ema`, ...).
"""

TKFAC.__doc__ = TKFAC.__doc__.format(
    args=_COMMON_ARGS.format(name="tkfac"), kwargs=_KWARGS_ARG)
KFAC.__doc__ = KFAC.__doc__.format(
    args=_COMMON_ARGS.format(name="kfac"), kwargs=_KWARGS_ARG)

# `compile(optimizer="tkfac")`, as Keras resolves `"adam"` (at the defaults).
for _name, _cls in (("tkfac", TKFAC), ("kfac", KFAC)):
    keras.saving.get_custom_objects().setdefault(_name, _cls)
