"""Plain first-order and momentum methods (seed deck sections 2-3): SGD, Polyak, Nesterov."""

from __future__ import annotations

from typing import Any

from agnostic_optim import blocks, engine
from agnostic_optim.hparams import HParam, check_range, is_nonzero
from agnostic_optim.registry import register


def momentum_prepare(ctx: engine.StepContext) -> dict[str, Any]:
    """Scalars so that ``buf * keep + g * take`` is torch's heavy-ball update, first step included.

    torch seeds the buffer with the first gradient (``b_1 = g``) and afterwards computes
    ``b_t = μ b_{t-1} + (1 - τ) g``; ``keep``/``take`` encode both without a branch.
    """
    h, first = ctx.h, ctx.first
    return {"keep": h.momentum * (1 - first), "take": first + (1 - first) * (1 - h.dampening)}


def heavy_ball(buf: Any, g: Any, s: engine.Scalars, nesterov: bool) -> tuple[Any, Any]:
    """(new momentum buffer, update direction) of SGD momentum; see :func:`momentum_prepare`."""
    buf = buf * s.keep + g * s.take
    return buf, (g + buf * s.momentum if nesterov else buf)


@register("plain first-order / momentum")
def sgd(
    lr: HParam = 1e-3,
    momentum: HParam = 0.0,
    dampening: HParam = 0.0,
    nesterov: bool = False,
    weight_decay: HParam = 0.0,
    maximize: bool = False,
) -> engine.Optimizer:
    """Stochastic gradient descent with optional heavy-ball or Nesterov momentum (torch.optim.SGD).

    With ``g`` the gradient (negated if ``maximize``), ``λ`` the weight decay, ``μ`` the
    momentum and ``τ`` the dampening::

        g   <- g + λ θ
        b_1 =  g;   b_t = μ b_{t-1} + (1 - τ) g          (only when μ != 0)
        d   =  g + μ b_t  if nesterov  else  b_t
        θ   <- θ - lr d

    The seed deck's Polyak EMA form ``v_t = β v_{t-1} + (1 - β) g_t`` is
    ``sgd(momentum=β, dampening=β)`` from the second step on (torch seeds ``b_1 = g``).
    ``momentum=0`` and ``weight_decay=0`` are structural: the term (and the momentum buffer) is
    left out, as torch does, and cannot be switched on later with ``set_hparams``.
    """
    check_range("learning rate", lr)
    check_range("momentum value", momentum)
    check_range("weight_decay value", weight_decay)
    if nesterov and (not is_nonzero(momentum) or is_nonzero(dampening)):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")
    use_momentum = is_nonzero(momentum)
    use_decay = is_nonzero(weight_decay)

    hparams: dict[str, HParam] = {"lr": lr}
    if use_momentum:
        hparams.update(momentum=momentum, dampening=dampening)
    if use_decay:
        hparams["weight_decay"] = weight_decay

    def update(xp, g, p, bufs, s):
        if use_decay:
            g = blocks.coupled_weight_decay(g, p, s.weight_decay)
        if use_momentum:
            buf, g = heavy_ball(bufs["momentum_buffer"], g, s, nesterov)
            bufs = {"momentum_buffer": buf}
        return bufs, p - g * s.lr

    return engine.build(
        engine.Rule(
            name="sgd",
            hparams=hparams,
            update=update,
            prepare=momentum_prepare if use_momentum else None,
            buffers=("momentum_buffer",) if use_momentum else (),
            maximize=maximize,
            sparse_support=not use_momentum and not is_nonzero(weight_decay),
        )
    )
