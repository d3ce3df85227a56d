"""Large-batch / layer-wise scaling (seed deck section 5): LARS and LAMB trust ratios.

Each layer (leaf) gets its own step size from the ratio of its weight norm to its update norm,
so large batches with large learning rates stay stable. Both accept ``mask=`` (a bool pytree or
a ``(path, leaf) -> bool`` callable): leaves where it is False (biases, normalisation
parameters) get neither weight decay nor a trust ratio.
"""

from __future__ import annotations

from typing import Any

from agnostic_optim import blocks, engine
from agnostic_optim.adaptive import (
    adam_denominator,
    adam_hparams,
    adam_moments,
    adam_moments_prepare,
    check_adam_hparams,
)
from agnostic_optim.first_order import heavy_ball, momentum_prepare
from agnostic_optim.hparams import (
    Convention,
    HParam,
    check_convention,
    check_range,
    convention_defaults,
    is_nonzero,
)
from agnostic_optim.registry import register

Mask = Any


@register("large-batch / layer-wise")
@convention_defaults(momentum=(0.0, 0.9), eps=(1e-8, 0.0))
def lars(
    lr: HParam = 1.0,
    momentum: HParam | None = None,
    dampening: HParam = 0.0,
    weight_decay: HParam = 0.0,
    nesterov: bool = False,
    trust_coefficient: HParam = 0.001,
    eps: HParam | None = None,
    trust_clip: bool = False,
    always_adapt: bool = False,
    maximize: bool = False,
    mask: Mask = None,
    convention: Convention = "torch",
) -> engine.Optimizer:
    """LARS (You et al. 2017): SGD whose per-layer step is scaled by a trust ratio.

    Default, as ``timm.optim.Lars`` (with LARC's ``trust_clip``, NVIDIA apex)::

        r   = η ‖θ‖ / (‖g‖ + λ ‖θ‖ + ε)          (1 if ‖θ‖ = 0 or ‖g‖ = 0; η = trust_coefficient)
        r   = min(r / lr, 1)                     (trust_clip)
        g  <- (g + λ θ) · r                      (only when λ != 0 or always_adapt)
        b_t = μ b_{t-1} + (1 - τ) g  (b_1 = g);   d = g + μ b_t if nesterov else b_t
        θ  <- θ - lr d

    ``convention="optax"`` reproduces ``optax.lars``, whose defaults ``momentum=0.9, eps=0``
    it takes for arguments left ``None`` (timm's are 0 and 1e-8): the ratio is always applied,
    uses the norm of the decayed gradient, and momentum accumulates steps that already include
    the learning rate::

        u = g + λ θ;   u <- u · η ‖θ‖ / (‖u‖ + ε);   b_t = μ b_{t-1} + lr u;   θ <- θ - b_t
        (nesterov: θ <- θ - (lr u + μ b_t))
    """
    check_convention(convention)
    for name, value in (
        ("learning rate", lr),
        ("momentum value", momentum),
        ("weight_decay value", weight_decay),
    ):
        check_range(name, value)
    check_range("trust_coefficient", trust_coefficient)
    check_range("epsilon value", eps)
    if nesterov and (not is_nonzero(momentum) or is_nonzero(dampening)):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")
    optax_form = convention == "optax"
    use_decay = is_nonzero(weight_decay)
    use_momentum = is_nonzero(momentum)
    adapt = use_decay or always_adapt or optax_form

    hparams: dict[str, HParam] = {"lr": lr, "trust_coefficient": trust_coefficient, "eps": eps}
    if use_momentum:
        hparams.update(momentum=momentum, dampening=dampening)
    if use_decay:
        hparams["weight_decay"] = weight_decay

    def update(xp, g, p, bufs, s, selected=True):
        if adapt and selected:
            decayed = blocks.coupled_weight_decay(g, p, s.weight_decay) if use_decay else g
            param_norm = blocks.l2_norm(xp, p)
            if optax_form:
                update_norm = blocks.l2_norm(xp, decayed)
                denominator = update_norm + s.eps
            else:
                update_norm = blocks.l2_norm(xp, g)
                denominator = (
                    update_norm + param_norm * s.weight_decay + s.eps if use_decay else update_norm + s.eps
                )
            ratio = blocks.trust_ratio(
                xp, param_norm * s.trust_coefficient, denominator, param_norm, update_norm
            )
            if trust_clip:
                ratio = blocks.clip_above_one(xp, ratio / s.lr)
            g = decayed * ratio
        if optax_form:
            g = g * s.lr
        if use_momentum:
            buf, g = heavy_ball(bufs["momentum_buffer"], g, s, nesterov)
            bufs = {"momentum_buffer": buf}
        return bufs, (p - g if optax_form else p - g * s.lr)

    return engine.build(
        engine.Rule(
            name="lars",
            hparams=hparams,
            update=update,
            prepare=momentum_prepare if use_momentum else None,
            buffers=("momentum_buffer",) if use_momentum else (),
            maximize=maximize,
            mask=mask,
            elementwise=False,
        )
    )


@register("large-batch / layer-wise")
def lamb(
    lr: HParam = 1e-3,
    betas: tuple[HParam, HParam] = (0.9, 0.999),
    eps: HParam = 1e-6,
    weight_decay: HParam = 0.0,
    max_grad_norm: HParam | None = None,
    trust_clip: bool = False,
    always_adapt: bool = True,
    grad_averaging: bool = True,
    maximize: bool = False,
    eps_root: HParam = 0.0,
    mask: Mask = None,
) -> engine.Optimizer:
    """LAMB (You et al. 2019): Adam's direction scaled per layer by ‖θ‖ / ‖update‖.

    ::

        g   <- g / max(1, ‖g‖_global / max_grad_norm)       (only if max_grad_norm is set)
        m_t  = β1 m_{t-1} + (1 - β1) g   (grad_averaging=False: m_t = β1 m_{t-1} + g)
        v_t  = β2 v_{t-1} + (1 - β2) g²
        u    = m_t / (1 - β1^t) / (√v_t / √(1 - β2^t) + ε) + λ θ
        r    = ‖θ‖ / ‖u‖   (1 if either norm is 0; min(r, 1) with trust_clip)
        θ   <- θ - lr · r · u          (r only when λ != 0 or always_adapt)

    The defaults reproduce ``optax.lamb``; ``max_grad_norm=1.0, always_adapt=False,
    weight_decay=0.01`` reproduce ``timm.optim.Lamb``'s defaults (NVIDIA's FusedLAMB). With
    ``mask=`` (or inside ``ao.masked``) the global norm of ``max_grad_norm`` is taken over the
    selected leaves only. ``eps_root`` adds ε_root inside the
    root, ``√(v_t / (1 - β2^t) + ε_root)``, as optax's ``eps_root``.
    """
    check_adam_hparams(lr, betas, eps, weight_decay, eps_root)
    if max_grad_norm is not None:
        check_range("max_grad_norm", max_grad_norm, 0.0, low_open=True)
    use_decay = is_nonzero(weight_decay)
    use_eps_root = is_nonzero(eps_root)
    adapt = use_decay or always_adapt
    hparams = adam_hparams(lr, betas, eps, weight_decay, eps_root)
    if max_grad_norm is not None:
        hparams["max_grad_norm"] = max_grad_norm

    def prepare(ctx: engine.StepContext) -> dict[str, Any]:
        xp = ctx.xp
        scalars = adam_moments_prepare(ctx)
        if not grad_averaging:
            scalars["one_minus_beta1"] = xp.ones_like(scalars["beta1"])
        if max_grad_norm is not None:
            ratio = blocks.global_norm(xp, ctx.grads, ctx.t.dtype) / ctx.h.max_grad_norm
            scalars["clip_divisor"] = xp.where(ratio > 1, ratio, xp.ones_like(ratio))
        return scalars

    def update(xp, g, p, bufs, s, selected=True):
        if max_grad_norm is not None:
            g = g / s.clip_divisor
        new = adam_moments(g, bufs, s)
        denom = adam_denominator(xp, new["exp_avg_sq"], s, corrected=False, eps_root=use_eps_root)
        direction = (new["exp_avg"] / s.bias_correction1) / denom
        if use_decay and selected:
            direction = blocks.coupled_weight_decay(direction, p, s.weight_decay)
        if adapt and selected:
            param_norm, update_norm = blocks.l2_norm(xp, p), blocks.l2_norm(xp, direction)
            ratio = blocks.trust_ratio(xp, param_norm, update_norm, param_norm, update_norm)
            if trust_clip:
                ratio = blocks.clip_above_one(xp, ratio)
            direction = direction * ratio
        return new, p - direction * s.lr

    return engine.build(
        engine.Rule(
            name="lamb",
            hparams=hparams,
            update=update,
            prepare=prepare,
            buffers=("exp_avg", "exp_avg_sq"),
            maximize=maximize,
            mask=mask,
            elementwise=False,
        )
    )
