"""Adaptive first-order variants (seed deck section 4): RAdam, NAdam, Adan, Lion.

RAdam and NAdam follow torch.optim (``convention="optax"`` gives optax's forms); Adan follows
the official sail-sg/Adan code and Lion the official google/automl code. They reuse Adam's
moments and bias corrections from :mod:`agnostic_optim.adaptive`.
"""

from __future__ import annotations

from typing import Any

from agnostic_optim import blocks, engine
from agnostic_optim.adaptive import (
    adam_denominator,
    adam_hparams,
    adam_moments,
    adam_moments_prepare,
    apply_weight_decay,
    check_adam_hparams,
)
from agnostic_optim.hparams import (
    Convention,
    HParam,
    check_betas,
    check_convention,
    check_range,
    is_nonzero,
)
from agnostic_optim.registry import register

# ----------------------------------------------------------------------------- RAdam


@register("adaptive")
def radam(
    lr: HParam = 1e-3,
    betas: tuple[HParam, HParam] = (0.9, 0.999),
    eps: HParam = 1e-8,
    weight_decay: HParam = 0.0,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
    eps_root: HParam = 0.0,
    convention: Convention = "torch",
) -> engine.Optimizer:
    """RAdam: Adam whose adaptive step is switched on once its variance is tractable.

    torch.optim.RAdam (default), moments as in ``adam``::

        ρ_∞ = 2 / (1 - β2) - 1,     ρ_t = ρ_∞ - 2 t β2^t / (1 - β2^t)
        r_t = √((ρ_t - 4)(ρ_t - 2) ρ_∞ / ((ρ_∞ - 4)(ρ_∞ - 2) ρ_t))
        θ  <- θ - lr m_t / (1 - β1^t) · r_t √(1 - β2^t) / (√v_t + ε)     if ρ_t > 5
        θ  <- θ - lr m_t / (1 - β1^t)                                   otherwise

    ``convention="optax"`` reproduces ``optax.radam``: the test is ``ρ_t >= 5`` and the
    adaptive step is ``r_t m̂_t / (√(v̂_t + ε_root) + ε)`` (ε after bias correction).
    ``eps_root`` is only part of the optax form.
    """
    check_convention(convention)
    check_adam_hparams(lr, betas, eps, weight_decay, eps_root)
    optax_form = convention == "optax"
    if is_nonzero(eps_root) and not optax_form:
        raise ValueError("eps_root belongs to optax's RAdam form: pass convention='optax'")
    use_decay = is_nonzero(weight_decay)
    use_eps_root = is_nonzero(eps_root)

    def prepare(ctx: engine.StepContext) -> dict[str, Any]:
        xp, t = ctx.xp, ctx.t
        scalars = adam_moments_prepare(ctx)
        beta2, correction2 = scalars["beta2"], scalars["bias_correction2"]
        rho_inf = 2 / (1 - beta2) - 1
        rho_t = rho_inf - 2 * t * beta2**t / correction2
        ratio = (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
        rectified = rho_t >= 5 if optax_form else rho_t > 5
        scalars["rectified"] = xp.astype(rectified, t.dtype)
        scalars["rectification"] = xp.sqrt(xp.where(rectified, ratio, xp.ones_like(ratio)))
        return scalars

    def update(xp, g, p, bufs, s):
        g, p = apply_weight_decay(g, p, s, decoupled=decoupled_weight_decay, use_decay=use_decay)
        new = adam_moments(g, bufs, s)
        corrected_avg = new["exp_avg"] / s.bias_correction1
        if optax_form:
            v_hat = new["exp_avg_sq"] / s.bias_correction2
            adaptive = 1 / adam_denominator(xp, v_hat, s, corrected=True, eps_root=use_eps_root)
        else:
            adaptive = s.bias_correction2_sqrt / (xp.sqrt(new["exp_avg_sq"]) + s.eps)
        scale = xp.where(s.rectified > 0, adaptive * s.rectification, xp.ones_like(adaptive))
        return new, p - corrected_avg * s.lr * scale

    return engine.build(
        engine.Rule(
            name="radam",
            hparams=adam_hparams(lr, betas, eps, weight_decay, eps_root),
            update=update,
            prepare=prepare,
            buffers=("exp_avg", "exp_avg_sq"),
            maximize=maximize,
        )
    )


# ----------------------------------------------------------------------------- NAdam


@register("adaptive")
def nadam(
    lr: HParam = 2e-3,
    betas: tuple[HParam, HParam] = (0.9, 0.999),
    eps: HParam = 1e-8,
    weight_decay: HParam = 0.0,
    momentum_decay: HParam = 4e-3,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
    eps_root: HParam = 0.0,
    convention: Convention = "torch",
) -> engine.Optimizer:
    """NAdam: Adam with Nesterov momentum (torch.optim.NAdam, Dozat 2016).

    torch form (default), with ψ the momentum decay and moments as in ``adam``::

        μ_t = β1 (1 - ½ · 0.96^(t ψ)),    Π_t = ∏_{i<=t} μ_i
        d   = √(v_t / (1 - β2^t)) + ε
        θ  <- θ - lr (1 - μ_t) / (1 - Π_t) · g / d - lr μ_{t+1} / (1 - Π_t μ_{t+1}) · m_t / d

    ``convention="optax"`` reproduces ``optax.nadam`` (no momentum-decay schedule; ψ unused)::

        m̂ = β1 m_t / (1 - β1^(t+1)) + (1 - β1) g / (1 - β1^t)
        θ <- θ - lr m̂ / (√(v_t / (1 - β2^t) + ε_root) + ε)

    ``eps_root`` adds ε_root inside the root in either form.
    """
    check_convention(convention)
    check_adam_hparams(lr, betas, eps, weight_decay, eps_root)
    check_range("momentum_decay value", momentum_decay)
    optax_form = convention == "optax"
    use_decay = is_nonzero(weight_decay)
    use_eps_root = is_nonzero(eps_root)

    def prepare(ctx: engine.StepContext) -> dict[str, Any]:
        t, h = ctx.t, ctx.h
        scalars = adam_moments_prepare(ctx)
        beta1 = scalars["beta1"]
        if optax_form:
            scalars["momentum_coef"] = beta1 / blocks.bias_correction(beta1, t + 1)
            scalars["grad_coef"] = (1 - beta1) / scalars["bias_correction1"]
            return scalars
        mu = beta1 * (1 - 0.5 * 0.96 ** (t * h.momentum_decay))
        mu_next = beta1 * (1 - 0.5 * 0.96 ** ((t + 1) * h.momentum_decay))
        mu_product = ctx.scalars["mu_product"] * mu
        scalars["mu_product"] = mu_product
        scalars["grad_step"] = h.lr * (1 - mu) / (1 - mu_product)
        scalars["momentum_step"] = h.lr * mu_next / (1 - mu_product * mu_next)
        return scalars

    def update(xp, g, p, bufs, s):
        g, p = apply_weight_decay(g, p, s, decoupled=decoupled_weight_decay, use_decay=use_decay)
        new = adam_moments(g, bufs, s)
        v_hat = new["exp_avg_sq"] / s.bias_correction2
        denom = adam_denominator(xp, v_hat, s, corrected=True, eps_root=use_eps_root)
        if optax_form:
            nesterov_avg = new["exp_avg"] * s.momentum_coef + g * s.grad_coef
            return new, p - (nesterov_avg / denom) * s.lr
        p = p - (g / denom) * s.grad_step
        return new, p - (new["exp_avg"] / denom) * s.momentum_step

    hparams = adam_hparams(lr, betas, eps, weight_decay, eps_root)
    if not optax_form:
        hparams["momentum_decay"] = momentum_decay
    return engine.build(
        engine.Rule(
            name="nadam",
            hparams=hparams,
            update=update,
            prepare=prepare,
            buffers=("exp_avg", "exp_avg_sq"),
            scalars={} if optax_form else {"mu_product": 1.0},
            maximize=maximize,
        )
    )


# ----------------------------------------------------------------------------- Adan


@register("adaptive")
def adan(
    lr: HParam = 1e-3,
    betas: tuple[HParam, HParam, HParam] = (0.98, 0.92, 0.99),
    eps: HParam = 1e-8,
    weight_decay: HParam = 0.0,
    no_prox: bool = False,
    max_grad_norm: HParam = 0.0,
    maximize: bool = False,
) -> engine.Optimizer:
    """Adan: adaptive Nesterov momentum (Xie et al. 2022), as the official sail-sg/Adan code.

    With ``β1, β2, β3 = betas`` (EMA decays, as in the official code; the paper writes 1 - β)::

        g   <- g · min(1, max_grad_norm / (‖g‖_global + ε))     (only if max_grad_norm > 0)
        Δ_t =  g_t - g_{t-1}                                   (Δ_1 = 0)
        m_t =  β1 m_{t-1} + (1 - β1) g_t
        d_t =  β2 d_{t-1} + (1 - β2) Δ_t
        n_t =  β3 n_{t-1} + (1 - β3) (g_t + β2 Δ_t)²
        D   =  √n_t / √(1 - β3^t) + ε
        θ  <-  θ - lr / (1 - β1^t) · m_t / D - lr β2 / (1 - β2^t) · d_t / D
        θ  <-  θ / (1 + lr λ)          (proximal decay, default)
        (no_prox: θ <- θ (1 - lr λ) before the update)
    """
    check_range("learning rate", lr)
    check_range("epsilon value", eps)
    check_betas(betas, 3)
    check_range("weight_decay value", weight_decay)
    check_range("Max grad norm", max_grad_norm)
    use_decay = is_nonzero(weight_decay)
    clip = is_nonzero(max_grad_norm)
    hparams: dict[str, HParam] = {"lr": lr, "betas": tuple(betas), "eps": eps}
    if use_decay:
        hparams["weight_decay"] = weight_decay
    if clip:
        hparams["max_grad_norm"] = max_grad_norm

    def prepare(ctx: engine.StepContext) -> dict[str, Any]:
        xp, t, h = ctx.xp, ctx.t, ctx.h
        beta1, beta2, beta3 = h.betas
        scalars = {
            "beta1": beta1,
            "beta2": beta2,
            "beta3": beta3,
            "one_minus_beta1": 1 - beta1,
            "one_minus_beta2": 1 - beta2,
            "one_minus_beta3": 1 - beta3,
            "not_first": 1 - ctx.first,
            "step_size": h.lr / blocks.bias_correction(beta1, t),
            "step_size_diff": h.lr * beta2 / blocks.bias_correction(beta2, t),
            "bias_correction3_sqrt": xp.sqrt(blocks.bias_correction(beta3, t)),
        }
        if clip:
            norm = blocks.global_norm(xp, ctx.grads, t.dtype)
            ratio = h.max_grad_norm / (norm + h.eps)
            scalars["clip_scale"] = xp.where(ratio < 1, ratio, xp.ones_like(ratio))
        return scalars

    def update(xp, g, p, bufs, s):
        if clip:
            g = g * s.clip_scale
        diff = (g - bufs["pre_grad"]) * s.not_first
        new = {
            "exp_avg": blocks.ema(bufs["exp_avg"], g, s.beta1, s.one_minus_beta1),
            "exp_avg_diff": blocks.ema(bufs["exp_avg_diff"], diff, s.beta2, s.one_minus_beta2),
            "pre_grad": g,
        }
        nesterov_grad = diff * s.beta2 + g
        new["exp_avg_sq"] = blocks.ema(
            bufs["exp_avg_sq"], nesterov_grad * nesterov_grad, s.beta3, s.one_minus_beta3
        )
        denom = xp.sqrt(new["exp_avg_sq"]) / s.bias_correction3_sqrt + s.eps
        if use_decay and no_prox:
            p = blocks.decoupled_weight_decay(p, s.lr * s.weight_decay)
        p = p - (new["exp_avg"] / denom) * s.step_size
        p = p - (new["exp_avg_diff"] / denom) * s.step_size_diff
        if use_decay and not no_prox:
            p = p / (1 + s.lr * s.weight_decay)
        return new, p

    return engine.build(
        engine.Rule(
            name="adan",
            hparams=hparams,
            update=update,
            prepare=prepare,
            buffers=("exp_avg", "exp_avg_sq", "exp_avg_diff", "pre_grad"),
            maximize=maximize,
            elementwise=not clip,
        )
    )


# ----------------------------------------------------------------------------- Lion


@register("adaptive")
def lion(
    lr: HParam = 1e-4,
    betas: tuple[HParam, HParam] = (0.9, 0.99),
    weight_decay: HParam = 0.0,
    maximize: bool = False,
) -> engine.Optimizer:
    """Lion: sign of an interpolated momentum (Chen et al. 2023), as google/automl's code.

    ::

        θ   <- θ (1 - lr λ)                          (decoupled decay first)
        c_t =  β1 m_{t-1} + (1 - β1) g
        θ   <- θ - lr · sign(c_t)
        m_t =  β2 m_{t-1} + (1 - β2) g

    No ε; a zero coordinate of ``c_t`` gives no step. Memory: one buffer per parameter.
    """
    check_range("learning rate", lr)
    check_betas(betas, 2)
    check_range("weight_decay value", weight_decay)
    use_decay = is_nonzero(weight_decay)
    hparams: dict[str, HParam] = {"lr": lr, "betas": tuple(betas)}
    if use_decay:
        hparams["weight_decay"] = weight_decay

    def prepare(ctx: engine.StepContext) -> dict[str, Any]:
        beta1, beta2 = ctx.h.betas
        return {"beta1": beta1, "beta2": beta2, "one_minus_beta1": 1 - beta1, "one_minus_beta2": 1 - beta2}

    def update(xp, g, p, bufs, s):
        if use_decay:
            p = blocks.decoupled_weight_decay(p, s.lr * s.weight_decay)
        interpolated = blocks.ema(bufs["exp_avg"], g, s.beta1, s.one_minus_beta1)
        p = p - xp.sign(interpolated) * s.lr
        return {"exp_avg": blocks.ema(bufs["exp_avg"], g, s.beta2, s.one_minus_beta2)}, p

    return engine.build(
        engine.Rule(
            name="lion",
            hparams=hparams,
            update=update,
            prepare=prepare,
            buffers=("exp_avg",),
            maximize=maximize,
        )
    )
