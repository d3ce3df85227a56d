"""Shampoo (seed deck section 6, curvature-aware): one Kronecker factor of preconditioning per axis.

Gupta, Koren and Singer (2018), "Shampoo: Preconditioned Stochastic Tensor Optimization",
Algorithm 2 (order-k tensors). Each axis ``i`` of a leaf keeps the statistics of the mode-i
unfolding of its gradients, and the step multiplies the gradient along every axis by the
``-1/(2k)`` power of its statistics.
"""

from __future__ import annotations

import math
from typing import Any

from agnostic_optim import _backend, blocks, engine
from agnostic_optim.hparams import HParam, check_range, is_nonzero
from agnostic_optim.registry import register

Array = Any
Layout = list[tuple[int, int] | None]  # per axis: (offset, size) of its matrix, or None (identity)


def _layout(shape: tuple[int, ...], max_dim: int) -> tuple[Layout, int]:
    """Where each axis's ``d × d`` matrix lies in a leaf's flat buffer, and the buffer's length.

    Axes longer than ``max_dim`` have no matrix (they are not preconditioned).
    """
    layout: Layout = []
    offset = 0
    for d in shape:
        if d <= max_dim:
            layout.append((offset, d))
            offset += d * d
        else:
            layout.append(None)
    return layout, offset


def _matrices(xp: Any, flat: Array, layout: Layout) -> list[Array | None]:
    return [None if a is None else xp.reshape(flat[a[0] : a[0] + a[1] * a[1]], (a[1], a[1])) for a in layout]


def _flatten(xp: Any, matrices: list[Array | None]) -> Array:
    return xp.concat([xp.reshape(m, (-1,)) for m in matrices if m is not None])


def _unfolding_gram(xp: Any, g: Array, axis: int) -> Array:
    """``G⁽ⁱ⁾ G⁽ⁱ⁾ᵀ`` of the mode-``axis`` unfolding ``G⁽ⁱ⁾`` (``d_i × ∏_{j≠i} d_j``)."""
    shape = tuple(g.shape)
    others = math.prod(shape[:axis] + shape[axis + 1 :])
    unfolded = xp.reshape(xp.moveaxis(g, axis, 0), (shape[axis], others))
    return unfolded @ xp.matrix_transpose(unfolded)


def _precondition(xp: Any, g: Array, roots: list[Array | None]) -> Array:
    """``G ×_1 M_1 ×_2 ... ×_k M_k`` (identity where ``M_i`` is None), for symmetric ``M_i``.

    Each round moves the leading axis last and multiplies it by its matrix, so after ``k``
    rounds every axis is back in place.
    """
    for root in roots:
        g = xp.moveaxis(g, 0, -1)
        if root is not None:
            g = g @ root
    return g


def _inverse_roots(xp: Any, stats: list[Array | None], order: int, eps: Array) -> Array:
    """The flat buffer of ``(S + ε I)^(-1/(2·order))`` for each matrix ``S`` of ``stats``, computed
    in the scalar dtype (float64 where the namespace has it) and returned in ``eps``'s dtype."""
    wide = _backend.scalar_dtype(xp, eps)
    shift = xp.astype(eps, wide)
    roots = [
        None if m is None else blocks.psd_matrix_power(xp, xp.astype(m, wide), -1 / (2 * order), shift)
        for m in stats
    ]
    return _backend.astype(xp, _flatten(xp, roots), eps.dtype)


@register("curvature-aware")
def shampoo(
    lr: HParam = 1e-1,
    momentum: HParam = 0.0,
    weight_decay: HParam = 0.0,
    eps: HParam = 1e-4,
    precondition_frequency: int = 1,
    max_preconditioner_dim: int = 1024,
    maximize: bool = False,
) -> engine.Optimizer:
    """Shampoo (Gupta, Koren, Singer 2018, Algorithm 2): per-axis Kronecker-factored preconditioning.

    For a leaf of order ``k`` with gradient ``G`` (negated if ``maximize``), ``G⁽ⁱ⁾`` its mode-i
    unfolding (``d_i × ∏_{j≠i} d_j``), ``λ`` the weight decay and ``μ`` the momentum::

        G    <- G + λ θ
        H^i_t = ε I + Σ_{s≤t} G_s⁽ⁱ⁾ G_s⁽ⁱ⁾ᵀ                    (every axis with d_i ≤ max_preconditioner_dim)
        P^i   = (H^i_τ)^(-1/(2k))      τ = the latest step with (τ - 1) % precondition_frequency == 0
        D     = G ×_1 P^1 ×_2 ... ×_k P^k                       (P^i = I on axes longer than the max)
        b_t   = μ b_{t-1} + D  (b_0 = 0);  D <- b_t              (only when μ != 0)
        θ    <- θ - lr D

    For a matrix this is ``L += G Gᵀ, R += Gᵀ G, θ -= lr L^{-1/4} G R^{-1/4}``; for a vector it is
    full-matrix AdaGrad. There is no torch.optim or optax core Shampoo; the reference is the paper.

    Conventions (where the paper is silent):

    * The state keeps ``S^i = Σ G⁽ⁱ⁾ G⁽ⁱ⁾ᵀ`` and adds ``ε I`` when a root is taken, so ``eps`` stays a
      hyperparameter (``set_hparams`` applies to the next root). Roots are computed with
      ``xp.linalg.eigh`` in float64 where the namespace has it (the result is cast to the leaf's
      compute dtype); eigenvalues of ``S^i`` are clamped at 0 before ``ε`` is added, so rounding can
      never produce a negative or zero eigenvalue (``eps`` must be > 0).
    * Roots are recomputed on step 1 and every ``precondition_frequency`` steps after it, and the
      stored ones are used in between; the statistics grow every step. Under ``jax.jit`` with
      ``precondition_frequency > 1`` the roots are computed on every step and selected with
      ``where`` (the count is traced), so the numbers match the eager run.
    * ``max_preconditioner_dim`` caps the matrices' size: a longer axis is left unpreconditioned
      (identity) and the exponent keeps the leaf's order, ``-1/(2k)``.
    * A 0-d leaf is a tensor of order 0: the product of its (no) preconditioners is empty, so it
      takes a plain SGD step ``θ -= lr D`` with ``D = g`` (plus momentum and weight decay).
    * ``momentum`` is heavy-ball momentum on the preconditioned direction (torch.optim.SGD's
      buffer with zero dampening); ``weight_decay`` is coupled (added to ``G`` before the
      statistics). ``precondition_frequency`` and ``max_preconditioner_dim`` are structural (Python
      ints), like ``history_size``.

    State per leaf: ``preconditioners`` holds ``S^i`` and ``inverse_roots`` holds ``P^i`` of every
    preconditioned axis, each ``d_i × d_i`` matrix flattened row-major and concatenated in axis order
    into one 1-D buffer of length ``Σ d_i²`` (empty for 0-d leaves); plus ``momentum_buffer`` (like
    the param) when ``μ != 0``. The buffers are stored in the param's dtype like every rule's state;
    for 16-bit params keep them in float32 (``ao.mixed_precision(opt, state_dtype="float32")``):
    sums of squared gradients overflow float16 (above 65504) and lose most digits in bfloat16.
    """
    check_range("learning rate", lr)
    check_range("momentum value", momentum)
    check_range("weight_decay value", weight_decay)
    check_range("epsilon value", eps, low_open=True)
    for name, value in (
        ("precondition_frequency", precondition_frequency),
        ("max_preconditioner_dim", max_preconditioner_dim),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"Invalid {name}: {value!r} (must be a positive integer)")
    use_momentum = is_nonzero(momentum)
    use_decay = is_nonzero(weight_decay)
    stale_roots = precondition_frequency > 1

    hparams: dict[str, HParam] = {"lr": lr, "eps": eps}
    if use_momentum:
        hparams["momentum"] = momentum
    if use_decay:
        hparams["weight_decay"] = weight_decay

    def prepare(ctx: engine.StepContext) -> dict[str, Any]:
        """``recompute``: a Python bool when the count is concrete (a host branch), else a 0-d
        array for ``where`` (under tracing)."""
        due = (ctx.t - 1) % precondition_frequency == 0
        return {"recompute": due if _backend.is_lazy(due) else bool(due)}

    def update(xp, g, p, bufs, s):
        if use_decay:
            g = blocks.coupled_weight_decay(g, p, s.weight_decay)
        new = {}
        layout, size = _layout(tuple(p.shape), max_preconditioner_dim)
        if size:
            stats = [
                None if m is None else m + _unfolding_gram(xp, g, axis)
                for axis, m in enumerate(_matrices(xp, bufs["preconditioners"], layout))
            ]
            new["preconditioners"] = _flatten(xp, stats)
            recompute = s.recompute if stale_roots else True
            if recompute is True:
                new["inverse_roots"] = _inverse_roots(xp, stats, g.ndim, s.eps)
            elif recompute is False:
                new["inverse_roots"] = bufs["inverse_roots"]
            else:
                fresh = _inverse_roots(xp, stats, g.ndim, s.eps)
                new["inverse_roots"] = xp.where(recompute != 0, fresh, bufs["inverse_roots"])
            g = _precondition(xp, g, _matrices(xp, new["inverse_roots"], layout))
        else:
            new["preconditioners"], new["inverse_roots"] = bufs["preconditioners"], bufs["inverse_roots"]
        if use_momentum:
            new["momentum_buffer"] = g = bufs["momentum_buffer"] * s.momentum + g
        return new, p - g * s.lr

    def init_buffer(xp: Any, name: str, p: Array) -> Array:
        if name == "momentum_buffer":
            return xp.zeros_like(p)
        _, size = _layout(tuple(p.shape), max_preconditioner_dim)
        return xp.zeros((size,), dtype=p.dtype, device=_backend.device_of(p))

    return engine.build(
        engine.Rule(
            name="shampoo",
            hparams=hparams,
            update=update,
            prepare=prepare if stale_roots else None,
            buffers=("preconditioners", "inverse_roots") + (("momentum_buffer",) if use_momentum else ()),
            init_buffer=init_buffer,
            buffer_shape=lambda name, shape: (
                shape if name == "momentum_buffer" else (_layout(shape, max_preconditioner_dim)[1],)
            ),
            maximize=maximize,
            elementwise=False,
            batchable=False,  # matrix products on each leaf's own array
        )
    )
