"""Curvature-aware optimizers with a diagonal Hessian estimate (seed deck section 7): AdaHessian, Sophia.

Both precondition the step with a running estimate of ``diag(H)``. The core draws no random
numbers, so the estimate is a step input: ``step(state, grads, params, hessian_diag=...)`` takes
a pytree like params (a Hutchinson product ``z ⊙ Hz`` with Rademacher ``z``, or Sophia's
Gauss-Newton-Bartlett ``ĝ ⊙ ĝ``), or None on steps without a new estimate. Adapters compute it
(``agnostic_optim.adapters.jax.hutchinson_diagonal``; the torch classes use autograd).
"""

from __future__ import annotations

from typing import Any

from agnostic_optim import blocks, engine
from agnostic_optim.adaptive import adam_moments_prepare
from agnostic_optim.hparams import HParam, check_betas, check_range, is_nonzero
from agnostic_optim.registry import register

Array = Any

# ----------------------------------------------------------------------------- AdaHessian


def hutchinson_magnitude(xp: Any, estimate: Array, spatial_averaging: bool) -> Array:
    """AdaHessian's ``D``: ``|z ⊙ Hz|``, averaged over the kernel of a 4-D (conv) leaf when
    ``spatial_averaging`` (shape ``(out, in, 1, 1)``, broadcasting over the kernel)."""
    magnitude = xp.abs(estimate)
    if spatial_averaging and magnitude.ndim == 4:
        return xp.mean(magnitude, axis=(2, 3), keepdims=True)
    return magnitude


@register(
    "curvature-aware",
    inputs={
        "hessian_diag": "Hutchinson products z ⊙ Hz (Rademacher z), a pytree like params; "
        "None on steps without a new estimate"
    },
)
def adahessian(
    lr: HParam = 0.15,
    betas: tuple[HParam, HParam] = (0.9, 0.999),
    eps: HParam = 1e-4,
    weight_decay: HParam = 0.0,
    hessian_power: HParam = 1.0,
    spatial_averaging: bool = True,
    maximize: bool = False,
) -> engine.Optimizer:
    """AdaHessian (Yao et al. 2020): Adam with the squared Hessian diagonal as second moment.

    Reproduces the official ``Adahessian`` (amirgholami/adahessian,
    ``image_classification/optim_adahessian.py``), with ``hessian_diag`` the raw Hutchinson
    product ``z ⊙ Hz`` of each leaf::

        D   = |z ⊙ Hz|                      (4-D leaves with spatial_averaging:
                                             mean of |z ⊙ Hz| over dims 2, 3, broadcast)
        m_t = β1 m_{t-1} + (1 - β1) g
        v_n = β2 v_{n-1} + (1 - β2) D²      (n: the number of estimates received)
        d   = √v_n^k / √(1 - β2^n)^k + ε    (k = hessian_power)
        θ  <- θ - lr (m_t / (1 - β1^t) / d + λ θ)

    The official code estimates every step (``n = t``). A step given ``hessian_diag=None`` keeps
    ``v`` and its bias correction ``1 - β2^n`` as they are and still updates ``m``; until the
    first estimate arrives (``n = 0``) the curvature is unknown and the params do not move.
    ``maximize`` negates the gradient (``D`` is a magnitude). State: ``exp_avg``,
    ``exp_hessian_diag_sq`` per leaf, and the estimate count ``hessian_step``.
    """
    check_range("learning rate", lr)
    check_range("epsilon value", eps)
    check_betas(betas, 2)
    check_range("weight_decay value", weight_decay)
    check_range("Hessian power value", hessian_power, 0.0, 1.0)
    use_decay = is_nonzero(weight_decay)

    hparams: dict[str, HParam] = {
        "lr": lr,
        "betas": tuple(betas),
        "eps": eps,
        "hessian_power": hessian_power,
    }
    if use_decay:
        hparams["weight_decay"] = weight_decay

    def prepare(ctx: engine.StepContext) -> dict[str, Any]:
        xp = ctx.xp
        scalars = adam_moments_prepare(ctx)
        estimates = ctx.scalars["hessian_step"]
        if ctx.inputs.get("hessian_diag") is not None:
            estimates = estimates + 1
        seen = estimates > 0
        correction2 = xp.where(
            seen, blocks.bias_correction(scalars["beta2"], estimates), xp.ones_like(estimates)
        )
        correction2_sqrt = xp.sqrt(correction2)
        step_lr = xp.where(seen, ctx.h.lr, xp.zeros_like(ctx.h.lr))
        scalars.update(  # bias_correction2* replace adam_moments_prepare's (counted by step, not estimate)
            hessian_step=estimates,
            bias_correction2=correction2,
            bias_correction2_sqrt=correction2_sqrt,
            hessian_scale=correction2_sqrt**ctx.h.hessian_power,
            step_size=step_lr / scalars["bias_correction1"],
        )
        if use_decay:
            scalars["lr_weight_decay"] = step_lr * ctx.h.weight_decay
        return scalars

    def update(xp, g, p, bufs, s, hessian_diag=None):
        new = {
            "exp_avg": blocks.ema(bufs["exp_avg"], g, s.beta1, s.one_minus_beta1),
            "exp_hessian_diag_sq": bufs["exp_hessian_diag_sq"],
        }
        if hessian_diag is not None:
            d = hutchinson_magnitude(xp, hessian_diag, spatial_averaging)
            new["exp_hessian_diag_sq"] = blocks.ema(
                new["exp_hessian_diag_sq"], d * d, s.beta2, s.one_minus_beta2
            )
        denom = xp.sqrt(new["exp_hessian_diag_sq"]) ** s.hessian_power / s.hessian_scale + s.eps
        if use_decay:
            p = blocks.decoupled_weight_decay(p, s.lr_weight_decay)
        return new, p - (new["exp_avg"] / denom) * s.step_size

    return engine.build(
        engine.Rule(
            name="adahessian",
            hparams=hparams,
            update=update,
            prepare=prepare,
            buffers=("exp_avg", "exp_hessian_diag_sq"),
            scalars={"hessian_step": 0.0},
            # also a step-level input: ``prepare`` counts the steps that bring an estimate
            inputs=("hessian_diag",),
            leaf_inputs=("hessian_diag",),
            maximize=maximize,
            elementwise=not spatial_averaging,
            batchable=not spatial_averaging,  # the spatial mean needs each 4-D leaf's own array
        )
    )


# ----------------------------------------------------------------------------- Sophia


def sophia_hessian_update(hessian: Array, estimate: Array, beta2: Array, one_minus_beta2: Array) -> Array:
    """Sophia's curvature EMA, ``h <- β2 h + (1 - β2) estimate`` (SophiaG's ``update_hessian``)."""
    return blocks.ema(hessian, estimate, beta2, one_minus_beta2)


@register(
    "curvature-aware",
    inputs={
        "hessian_diag": "diagonal Hessian estimate (Gauss-Newton-Bartlett ĝ ⊙ ĝ or Hutchinson "
        "z ⊙ Hz), a pytree like params; None on steps without a new estimate"
    },
)
def sophia(
    lr: HParam = 1e-4,
    betas: tuple[HParam, HParam] = (0.965, 0.99),
    rho: HParam = 0.04,
    weight_decay: HParam = 0.1,
    bs: HParam = 5120,
    eps: HParam = 1e-15,
    maximize: bool = False,
) -> engine.Optimizer:
    """Sophia (Liu et al. 2023): sign momentum clipped by a diagonal-Hessian Newton step.

    Reproduces the official ``SophiaG`` (Liuhong99/Sophia, ``sophia.py``: ``update_hessian``
    then ``_single_tensor_sophiag``)::

        h_t = β2 h_{t-1} + (1 - β2) hessian_diag        (only on steps given an estimate)
        θ  <- θ (1 - lr λ)
        m_t = β1 m_{t-1} + (1 - β1) g
        θ  <- θ - lr sign(m_t) min(|m_t| / (ρ · bs · h_t + ε), 1)

    The official loop calls ``step()`` and, every k steps, ``update_hessian()`` with the estimate
    taken at the new params; here a step given ``hessian_diag`` folds it in first, which is the
    same sequence. SophiaG's estimate is ``ĝ ⊙ ĝ`` with ``ĝ`` the mean-loss gradient for labels
    sampled from the model (``bs`` the batch size that rescales it); a Hutchinson estimate
    gives Sophia-H's curvature with SophiaG's update (keep it non-negative: as in the official
    code, ``h`` is not clipped). ``maximize`` negates the gradient only. State: ``exp_avg``,
    ``hessian`` per leaf.
    """
    check_range("learning rate", lr)
    check_betas(betas, 2)
    check_range("rho parameter", rho)
    check_range("weight_decay value", weight_decay)
    check_range("bs", bs, low_open=True)
    check_range("epsilon value", eps)
    use_decay = is_nonzero(weight_decay)

    hparams: dict[str, HParam] = {"lr": lr, "betas": tuple(betas), "rho": rho, "bs": bs, "eps": eps}
    if use_decay:
        hparams["weight_decay"] = weight_decay

    def prepare(ctx: engine.StepContext) -> dict[str, Any]:
        beta1, beta2 = ctx.h.betas
        scalars = {"beta1": beta1, "beta2": beta2, "one_minus_beta1": 1 - beta1, "one_minus_beta2": 1 - beta2}
        scalars["rho_bs"] = ctx.h.rho * ctx.h.bs
        if use_decay:
            scalars["lr_weight_decay"] = ctx.h.lr * ctx.h.weight_decay
        return scalars

    def update(xp, g, p, bufs, s, hessian_diag=None):
        hessian = bufs["hessian"]
        if hessian_diag is not None:
            hessian = sophia_hessian_update(hessian, hessian_diag, s.beta2, s.one_minus_beta2)
        if use_decay:
            p = blocks.decoupled_weight_decay(p, s.lr_weight_decay)
        exp_avg = blocks.ema(bufs["exp_avg"], g, s.beta1, s.one_minus_beta1)
        ratio = blocks.clip_above_one(xp, xp.abs(exp_avg) / (hessian * s.rho_bs + s.eps))
        return {"exp_avg": exp_avg, "hessian": hessian}, p - xp.sign(exp_avg) * ratio * s.lr

    return engine.build(
        engine.Rule(
            name="sophia",
            hparams=hparams,
            update=update,
            prepare=prepare,
            buffers=("exp_avg", "hessian"),
            leaf_inputs=("hessian_diag",),
            maximize=maximize,
        )
    )
