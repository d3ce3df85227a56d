"""Adaptive first-order methods (seed deck section 4): Adagrad, RMSProp, Adam, AdamW, AMSGrad.

Per-coordinate step sizes from running second moments of the gradient. Defaults reproduce
torch.optim at the pinned version; ``convention="optax"`` and ``eps_root`` reproduce optax where
its equations differ. RAdam, NAdam, Adan and Lion live in :mod:`agnostic_optim.adaptive_variants`.
"""

from __future__ import annotations

from typing import Any

from agnostic_optim import blocks, engine
from agnostic_optim.hparams import (
    Convention,
    HParam,
    check_betas,
    check_convention,
    check_range,
    convention_defaults,
    is_nonzero,
)
from agnostic_optim.registry import register

# ----------------------------------------------------------------------------- Adagrad


@register("adaptive")
@convention_defaults(initial_accumulator_value=(0.0, 0.1), eps=(1e-10, 1e-7))
def adagrad(
    lr: HParam = 1e-2,
    lr_decay: HParam = 0.0,
    weight_decay: HParam = 0.0,
    initial_accumulator_value: float | None = None,
    eps: HParam | None = None,
    maximize: bool = False,
    convention: Convention = "torch",
) -> engine.Optimizer:
    """Adagrad: steps scaled by the root of the running sum of squared gradients.

    torch.optim.Adagrad (default)::

        g <- g + λ θ
        s_t = s_{t-1} + g²                       (s_0 = initial_accumulator_value)
        θ  <- θ - lr / (1 + (t - 1) lr_decay) · g / (√s_t + ε)

    ``convention="optax"`` puts ε inside the root and zeroes coordinates whose sum is 0, as
    ``optax.adagrad`` does: ``θ <- θ - lr · where(s_t > 0, g / √(s_t + ε), 0)``.

    Defaults left ``None`` follow the convention: ``initial_accumulator_value`` 0 (torch) or
    0.1 (optax), ``eps`` 1e-10 (torch) or 1e-7 (optax).
    """
    check_convention(convention)
    check_range("learning rate", lr)
    check_range("lr_decay value", lr_decay)
    check_range("weight_decay value", weight_decay)
    check_range("initial_accumulator_value value", initial_accumulator_value)
    check_range("epsilon value", eps)
    use_decay = is_nonzero(weight_decay)
    optax_form = convention == "optax"

    hparams: dict[str, HParam] = {"lr": lr, "lr_decay": lr_decay, "eps": eps}
    if use_decay:
        hparams["weight_decay"] = weight_decay

    def prepare(ctx: engine.StepContext) -> dict[str, Any]:
        return {"clr": ctx.h.lr / (1 + (ctx.t - 1) * ctx.h.lr_decay)}

    def update(xp, g, p, bufs, s):
        if use_decay:
            g = blocks.coupled_weight_decay(g, p, s.weight_decay)
        total = bufs["sum"] + g * g
        if optax_form:
            direction = xp.where(total > 0, g / xp.sqrt(total + s.eps), xp.zeros_like(g))
        else:
            direction = g / (xp.sqrt(total) + s.eps)
        return {"sum": total}, p - direction * s.clr

    def init_sum(xp, name, p):
        return xp.full_like(p, initial_accumulator_value)

    return engine.build(
        engine.Rule(
            name="adagrad",
            hparams=hparams,
            update=update,
            prepare=prepare,
            buffers=("sum",),
            init_buffer=init_sum,
            maximize=maximize,
            sparse_support=not use_decay,  # (a zero gradient adds 0 and moves nothing)
        )
    )


# ----------------------------------------------------------------------------- RMSProp


@register("adaptive")
@convention_defaults(alpha=(0.99, 0.9))
def rmsprop(
    lr: HParam = 1e-2,
    alpha: HParam | None = None,
    eps: HParam = 1e-8,
    weight_decay: HParam = 0.0,
    momentum: HParam = 0.0,
    centered: bool = False,
    maximize: bool = False,
    convention: Convention = "torch",
) -> engine.Optimizer:
    """RMSProp: steps scaled by the root of an EMA of squared gradients.

    torch.optim.RMSprop (default), with ``α`` the smoothing constant and ``μ`` the momentum::

        g   <- g + λ θ
        v_t =  α v_{t-1} + (1 - α) g²
        m_t =  α m_{t-1} + (1 - α) g              (only if centered)
        r   =  √(v_t - m_t²) + ε   if centered  else  √v_t + ε
        b_t =  μ b_{t-1} + g / r;  θ <- θ - lr b_t     (μ > 0)
        θ  <-  θ - lr g / r                            (μ = 0)

    ``convention="optax"`` follows ``optax.rmsprop``: ε inside the root, ``r = √(v_t + ε)``
    (centered: ``√(v_t - m_t² + ε)``), and with momentum the learning rate is applied before the
    trace, ``b_t = μ b_{t-1} + lr g / r;  θ <- θ - b_t`` (the same as torch's form while lr is
    constant, different once it changes).

    ``alpha`` left ``None`` follows the convention: 0.99 (torch) or 0.9 (optax's ``decay``).
    """
    check_convention(convention)
    check_range("learning rate", lr)
    check_range("epsilon value", eps)
    check_range("momentum value", momentum)
    check_range("weight_decay value", weight_decay)
    check_range("alpha value", alpha)
    use_decay = is_nonzero(weight_decay)
    use_momentum = is_nonzero(momentum)
    optax_form = convention == "optax"

    hparams: dict[str, HParam] = {"lr": lr, "alpha": alpha, "eps": eps}
    if use_decay:
        hparams["weight_decay"] = weight_decay
    if use_momentum:
        hparams["momentum"] = momentum
    buffers = ("square_avg",) + (("momentum_buffer",) if use_momentum else ())
    buffers += ("grad_avg",) if centered else ()

    def prepare(ctx: engine.StepContext) -> dict[str, Any]:
        return {"one_minus_alpha": 1 - ctx.h.alpha}

    def update(xp, g, p, bufs, s):
        if use_decay:
            g = blocks.coupled_weight_decay(g, p, s.weight_decay)
        new = {"square_avg": blocks.ema(bufs["square_avg"], g * g, s.alpha, s.one_minus_alpha)}
        second = new["square_avg"]
        if centered:
            new["grad_avg"] = blocks.ema(bufs["grad_avg"], g, s.alpha, s.one_minus_alpha)
            second = second - new["grad_avg"] * new["grad_avg"]
        rms = xp.sqrt(second + s.eps) if optax_form else xp.sqrt(second) + s.eps
        if use_momentum and optax_form:
            new["momentum_buffer"] = bufs["momentum_buffer"] * s.momentum + (g / rms) * s.lr
            return new, p - new["momentum_buffer"]
        if use_momentum:
            new["momentum_buffer"] = bufs["momentum_buffer"] * s.momentum + g / rms
            return new, p - new["momentum_buffer"] * s.lr
        return new, p - (g / rms) * s.lr

    return engine.build(
        engine.Rule(
            name="rmsprop",
            hparams=hparams,
            update=update,
            prepare=prepare,
            buffers=buffers,
            maximize=maximize,
        )
    )


# ----------------------------------------------------------------------------- Adam family


def adam_moments_prepare(ctx: engine.StepContext) -> dict[str, Any]:
    """Float64 scalars of one Adam-family step: EMA weights and bias corrections."""
    beta1, beta2 = ctx.h.betas
    correction1 = blocks.bias_correction(beta1, ctx.t)
    correction2 = blocks.bias_correction(beta2, ctx.t)
    return {
        "beta1": beta1,
        "beta2": beta2,
        "one_minus_beta1": 1 - beta1,
        "one_minus_beta2": 1 - beta2,
        "bias_correction1": correction1,
        "bias_correction2": correction2,
        "bias_correction2_sqrt": ctx.xp.sqrt(correction2),
    }


def adam_moments(g, bufs, s) -> dict[str, Any]:
    """Updated first and second moments ``m_t = β1 m + (1-β1) g``, ``v_t = β2 v + (1-β2) g²``."""
    return {
        "exp_avg": blocks.ema(bufs["exp_avg"], g, s.beta1, s.one_minus_beta1),
        "exp_avg_sq": blocks.ema(bufs["exp_avg_sq"], g * g, s.beta2, s.one_minus_beta2),
    }


def adam_denominator(xp, second_moment, s, *, corrected: bool, eps_root: bool):
    """``√v̂ + ε`` in the requested form.

    torch form (default): ``√v / √(1 - β2^t) + ε``. With ``eps_root``: ``√(v̂ + ε_root) + ε``.
    ``corrected`` says ``second_moment`` is already bias-corrected (optax's AMSGrad max).
    """
    if corrected:
        return xp.sqrt(second_moment + s.eps_root) + s.eps if eps_root else xp.sqrt(second_moment) + s.eps
    if eps_root:
        return xp.sqrt(second_moment / s.bias_correction2 + s.eps_root) + s.eps
    return xp.sqrt(second_moment) / s.bias_correction2_sqrt + s.eps


def check_adam_hparams(lr, betas, eps, weight_decay, eps_root) -> None:
    check_range("learning rate", lr)
    check_range("epsilon value", eps)
    check_betas(betas, 2)
    check_range("weight_decay value", weight_decay)
    check_range("eps_root", eps_root)


def adam_hparams(lr, betas, eps, weight_decay, eps_root) -> dict[str, HParam]:
    hparams: dict[str, HParam] = {"lr": lr, "betas": tuple(betas), "eps": eps}
    if is_nonzero(weight_decay):
        hparams["weight_decay"] = weight_decay
    if is_nonzero(eps_root):
        hparams["eps_root"] = eps_root
    return hparams


def apply_weight_decay(g, p, s, *, decoupled: bool, use_decay: bool):
    """(g, p) after coupled (L2 in the gradient) or decoupled (AdamW) weight decay."""
    if not use_decay:
        return g, p
    if decoupled:
        return g, blocks.decoupled_weight_decay(p, s.lr * s.weight_decay)
    return blocks.coupled_weight_decay(g, p, s.weight_decay), p


@register("adaptive")
def adam(
    lr: HParam = 1e-3,
    betas: tuple[HParam, HParam] = (0.9, 0.999),
    eps: HParam = 1e-8,
    weight_decay: HParam = 0.0,
    amsgrad: bool = False,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
    eps_root: HParam = 0.0,
    convention: Convention = "torch",
) -> engine.Optimizer:
    """Adam: bias-corrected first and second moments (torch.optim.Adam).

    ::

        g    <- g + λ θ                   (coupled; decoupled_weight_decay: θ <- θ (1 - lr λ))
        m_t  =  β1 m_{t-1} + (1 - β1) g,   v_t = β2 v_{t-1} + (1 - β2) g²
        v'_t =  max(v'_{t-1}, v_t)        (amsgrad; else v'_t = v_t)
        θ   <-  θ - lr / (1 - β1^t) · m_t / (√v'_t / √(1 - β2^t) + ε)

    ``eps_root`` (optax's name) adds ε_root inside the root: ``√(v'_t / (1 - β2^t) + ε_root) + ε``.
    ``convention="optax"`` only changes AMSGrad: optax takes the running max of the
    bias-corrected ``v̂_t`` (``optax.amsgrad``), torch of the raw ``v_t``. Without AMSGrad both
    libraries share Adam's equations, and ``optax.adam(lr, b1, b2, eps, eps_root)`` equals
    ``adam(lr, (b1, b2), eps, eps_root=eps_root)``.
    """
    check_convention(convention)
    check_adam_hparams(lr, betas, eps, weight_decay, eps_root)
    use_decay = is_nonzero(weight_decay)
    use_eps_root = is_nonzero(eps_root)
    max_of_corrected = amsgrad and convention == "optax"
    buffers = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())

    def prepare(ctx: engine.StepContext) -> dict[str, Any]:
        scalars = adam_moments_prepare(ctx)
        scalars["step_size"] = ctx.h.lr / scalars["bias_correction1"]
        return scalars

    def update(xp, g, p, bufs, s):
        g, p = apply_weight_decay(g, p, s, decoupled=decoupled_weight_decay, use_decay=use_decay)
        new = adam_moments(g, bufs, s)
        second = new["exp_avg_sq"]
        if amsgrad:
            candidate = second / s.bias_correction2 if max_of_corrected else second
            second = new["max_exp_avg_sq"] = xp.maximum(bufs["max_exp_avg_sq"], candidate)
        denom = adam_denominator(xp, second, s, corrected=max_of_corrected, eps_root=use_eps_root)
        return new, p - (new["exp_avg"] / denom) * s.step_size

    name = "adamw" if decoupled_weight_decay else ("amsgrad" if amsgrad else "adam")
    return engine.build(
        engine.Rule(
            name=name,
            hparams=adam_hparams(lr, betas, eps, weight_decay, eps_root),
            update=update,
            prepare=prepare,
            buffers=buffers,
            maximize=maximize,
        )
    )


@register("adaptive")
def sparse_adam(
    lr: HParam = 1e-3,
    betas: tuple[HParam, HParam] = (0.9, 0.999),
    eps: HParam = 1e-8,
    maximize: bool = False,
) -> engine.Optimizer:
    """SparseAdam: Adam's moments kept lazily, for sparse gradients (torch.optim.SparseAdam).

    Defined on the elements a (sparse) gradient holds, which are the only ones it changes;
    ``ε`` is added to the uncorrected root, and the step size carries both corrections::

        m_t = β1 m_{t-1} + (1 - β1) g,   v_t = β2 v_{t-1} + (1 - β2) g²
        θ  <- θ - lr √(1 - β2^t) / (1 - β1^t) · m_t / (√v_t + ε)

    (torch writes the moments as ``m += (1 - β1)(g - m)``: the same up to rounding.) The torch
    class ``SparseAdam`` takes sparse gradients only, as torch's does, and steps only the rows
    they hold, with one step count per param; on a dense gradient (the functional API, other
    adapters) every element is in the support. Reference: ``torch.optim.SparseAdam``.
    """
    check_range("learning rate", lr)
    check_range("epsilon value", eps)
    check_betas(betas, 2)

    def prepare(ctx: engine.StepContext) -> dict[str, Any]:
        scalars = adam_moments_prepare(ctx)
        scalars["step_size"] = ctx.h.lr * scalars["bias_correction2_sqrt"] / scalars["bias_correction1"]
        return scalars

    def update(xp, g, p, bufs, s):
        new = adam_moments(g, bufs, s)
        return new, p - (new["exp_avg"] / (xp.sqrt(new["exp_avg_sq"]) + s.eps)) * s.step_size

    return engine.build(
        engine.Rule(
            name="sparse_adam",
            hparams={"lr": lr, "betas": tuple(betas), "eps": eps},
            update=update,
            prepare=prepare,
            buffers=("exp_avg", "exp_avg_sq"),
            maximize=maximize,
            sparse_support=True,
        )
    )


@register("adaptive")
def adamw(
    lr: HParam = 1e-3,
    betas: tuple[HParam, HParam] = (0.9, 0.999),
    eps: HParam = 1e-8,
    weight_decay: HParam = 1e-2,
    amsgrad: bool = False,
    maximize: bool = False,
    eps_root: HParam = 0.0,
    convention: Convention = "torch",
) -> engine.Optimizer:
    """AdamW: Adam with decoupled weight decay (torch.optim.AdamW).

    ::

        θ <- θ (1 - lr λ)
        θ <- θ - lr / (1 - β1^t) · m_t / (√v_t / √(1 - β2^t) + ε)     (moments as in ``adam``)

    optax.adamw adds ``λ θ`` to the Adam direction before scaling by lr -- the same update;
    note its default ``weight_decay=1e-4`` against torch's ``1e-2``.
    """
    return adam(
        lr, betas, eps, weight_decay, amsgrad, maximize,
        decoupled_weight_decay=True, eps_root=eps_root, convention=convention,
    )  # fmt: skip


@register("adaptive")
def amsgrad(
    lr: HParam = 1e-3,
    betas: tuple[HParam, HParam] = (0.9, 0.999),
    eps: HParam = 1e-8,
    weight_decay: HParam = 0.0,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
    eps_root: HParam = 0.0,
    convention: Convention = "torch",
) -> engine.Optimizer:
    """AMSGrad: Adam with a non-decreasing second moment (``torch.optim.Adam(amsgrad=True)``).

    ::

        v'_t = max(v'_{t-1}, v_t)
        θ   <- θ - lr / (1 - β1^t) · m_t / (√v'_t / √(1 - β2^t) + ε)

    ``convention="optax"`` reproduces ``optax.amsgrad``: ``v̂'_t = max(v̂'_{t-1}, v_t / (1 - β2^t))``
    and ``θ <- θ - lr m̂_t / (√(v̂'_t + ε_root) + ε)``.
    """
    return adam(
        lr, betas, eps, weight_decay, amsgrad=True, maximize=maximize,
        decoupled_weight_decay=decoupled_weight_decay, eps_root=eps_root, convention=convention,
    )  # fmt: skip
