"""Generalization-oriented wrappers (seed deck section 6): SAM / ASAM and Lookahead.

Both take a base ``Optimizer`` and return one. Their own hyperparameters (``rho``, ``alpha``) live
in an :class:`~agnostic_optim.engine.OptimizerState` beside the base's state, so
``ao.get_hparams``/``ao.set_hparams`` and schedules reach them as they reach the base's. The maths
is exposed as small functions (:func:`sam_grad_norm`, :func:`sam_perturbation`,
:func:`lookahead_sync`) that the torch adapter's ``SAM``/``Lookahead`` classes call too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from agnostic_optim import _backend, blocks, engine, trees
from agnostic_optim import hparams as hp
from agnostic_optim.composition import _check_inputs
from agnostic_optim.precision import Precision
from agnostic_optim.registry import register

PyTree = Any
Array = Any


# ----------------------------------------------------------------------------- shared maths


def _leaf_scalar(xp: Any, value: Any, like: Array) -> Any:
    """A hyperparameter for arithmetic with ``like``: 0-d arrays cast to its dtype and device,
    Python numbers as they are (they take the array's dtype)."""
    if not hasattr(value, "dtype"):
        return value
    return _backend.to_device_of(xp, _backend.astype(xp, value, like.dtype), like)


def sam_grad_norm(
    xp: Any, grads: Sequence[Array], params: Sequence[Array], adaptive: bool | Sequence[bool]
) -> Array:
    """``‖ stack_i ‖(|θ_i| if adaptive else 1) ⊙ g_i‖₂ ‖₂`` in the scalar dtype (float64 where the
    namespace has it). ``adaptive`` is one flag or one per leaf (torch param groups may differ)."""
    flags = [adaptive] * len(grads) if isinstance(adaptive, bool) else list(adaptive)
    terms = []
    for g, p, flag in zip(grads, params, flags):
        dtype = _backend.compute_dtype(xp, g.dtype)
        g = _backend.astype(xp, g, dtype)
        terms.append(xp.abs(_backend.astype(xp, p, dtype)) * g if flag else g)
    return blocks.global_norm(xp, terms, _backend.scalar_dtype(xp, params[0]))


def sam_perturbation(
    xp: Any, grads: Sequence[Array], params: Sequence[Array], rho: Any, adaptive: bool, grad_norm: Array
) -> list[Array]:
    """SAM's ascent step per leaf, in the leaf's dtype (davda54/sam ``SAM.first_step``)::

        e_i = (θ_i² if adaptive else 1) ⊙ g_i · rho / (grad_norm + 1e-12)

    ``grad_norm`` comes from :func:`sam_grad_norm`; ``rho`` is a 0-d array or a number.
    """
    scale = rho / (grad_norm + 1e-12)
    out = []
    for g, p in zip(grads, params):
        dtype = _backend.compute_dtype(xp, p.dtype)
        e = _backend.astype(xp, g, dtype) * _backend.to_device_of(xp, _backend.astype(xp, scale, dtype), p)
        if adaptive:
            working = _backend.astype(xp, p, dtype)
            e = working * working * e
        out.append(_backend.astype(xp, e, p.dtype))
    return out


def lookahead_sync(xp: Any, slow: Sequence[Array], fast: Sequence[Array], alpha: Any) -> list[Array]:
    """Lookahead's synchronisation per leaf: the new slow weights ``φ + α (θ − φ)``, which the fast
    weights ``θ`` are then reset to. ``alpha`` is a 0-d array or a number."""
    return [s + _leaf_scalar(xp, alpha, s) * (f - s) for s, f in zip(slow, fast)]


# ----------------------------------------------------------------------------- wrapper state


def _check_base(base: Any, name: str) -> None:
    if not isinstance(base, engine.Optimizer):
        raise TypeError(f"{name} wraps an agnostic_optim Optimizer (e.g. ao.sgd(...)), got {base!r}")


def _own_state(
    values: Mapping[str, Any], params: PyTree, buffers: dict[str, PyTree] | None = None
) -> engine.OptimizerState:
    """A wrapper's own state: a step count and its hyperparameters as 0-d arrays."""
    leaves, _ = trees.flatten(params)
    xp = _backend.namespace_of(*leaves)
    device = _backend.device_of(leaves[0])
    constants, scheduled = hp.to_state(xp, values, _backend.scalar_dtype(xp, leaves[0]), device)
    count = xp.asarray(0, dtype=xp.int32, device=device)
    return engine.OptimizerState(count, constants, scheduled, buffers or {}, {})


def _advance(
    xp: Any, values: Mapping[str, Any], own: engine.OptimizerState
) -> tuple[engine.OptimizerState, dict[str, Any]]:
    """(the own state after this step, this step's hyperparameter values)."""
    schedules = {k: v for k, v in values.items() if hp.is_scheduled(v)}
    scheduled = hp.evaluate_schedules(xp, schedules, own.count, own.scheduled)
    new = own._replace(count=xp.asarray(own.count + 1), scheduled=scheduled)
    return new, {**own.hparams, **scheduled}


def _check_state(state: Any, kind: type, name: str) -> None:
    if not isinstance(state, kind):
        raise TypeError(f"{name}: expected the state made by its init, got {type(state).__name__}")


# ----------------------------------------------------------------------------- SAM


class SAMState(NamedTuple):
    """State of ``sam``: its own (step count, ``rho``) and the base optimizer's."""

    sam: engine.OptimizerState
    base: PyTree


@register(
    "generalization wrappers",
    wraps=True,
    inputs={"grad_fn": "params -> grads at those params (the ascent step's second gradient)"},
)
def sam(base: engine.Optimizer, rho: hp.HParam = 0.05, adaptive: bool = False) -> engine.Optimizer:
    """Sharpness-Aware Minimization (Foret et al. 2021); ASAM (Kwon et al. 2021) with ``adaptive``.

    Reproduces the official code, davda54/sam ``sam.py`` (``first_step`` then ``second_step``)::

        ‖·‖   = ‖ stack_i ‖(|θ_i| if adaptive else 1) ⊙ g_i‖₂ ‖₂          (global over leaves)
        e_i   = (θ_i² if adaptive else 1) ⊙ g_i · rho / (‖·‖ + 1e-12)
        g_sam = grad_fn(θ + e)
        θ     = base.step(g_sam, θ)            (the base state advances once per SAM step)

    ``step(state, grads, params, grad_fn=...)``: ``grads`` are the gradients at ``params`` and
    ``grad_fn`` maps params to the gradients there (a Python callable; under ``jax.jit`` close
    over it). Other step inputs go to the base.
    """
    _check_base(base, "sam")
    hp.check_range("rho", rho)
    if not isinstance(adaptive, bool):
        raise TypeError(f"adaptive must be a bool, got {adaptive!r}")
    values = {"rho": rho}
    name = f"sam({base.name})"

    def init(params: PyTree) -> SAMState:
        base_state = base.init(params)
        return SAMState(_own_state(values, params), base_state)

    def step(state: SAMState, grads: PyTree, params: PyTree, grad_fn: Callable | None = None, **inputs: Any):
        _check_state(state, SAMState, name)
        _check_inputs(base, inputs)
        if not callable(grad_fn):
            raise TypeError(
                f"{name}.step needs grad_fn=: a callable params -> gradients at those params "
                f"(got {grad_fn!r}); the torch adapter's SAM and the JAX helpers fill it"
            )
        xp, grad_leaves, param_leaves, treedef = engine.flatten_step_inputs(grads, params)
        own, h = _advance(xp, values, state.sam)
        norm = sam_grad_norm(xp, grad_leaves, param_leaves, adaptive)
        e = sam_perturbation(xp, grad_leaves, param_leaves, h["rho"], adaptive, norm)
        sam_grads = grad_fn(trees.unflatten(treedef, [p + d for p, d in zip(param_leaves, e)]))
        if "grad_fn" in base.inputs:
            inputs["grad_fn"] = grad_fn
        base_state, params = base.step(state.base, sam_grads, params, **inputs)
        return SAMState(own, base_state), params

    inputs = tuple(dict.fromkeys(("grad_fn", *base.inputs)))
    return engine.Optimizer(init=init, step=step, name=name, inputs=inputs, traceable=base.traceable)


# ----------------------------------------------------------------------------- Lookahead


class LookaheadState(NamedTuple):
    """State of ``lookahead``: its own (count = base steps taken, ``alpha``, the slow weights in
    ``buffers["slow"]``) and the base optimizer's."""

    lookahead: engine.OptimizerState
    base: PyTree


@register("generalization wrappers", wraps=True)
def lookahead(base: engine.Optimizer, k: int = 5, alpha: hp.HParam = 0.5) -> engine.Optimizer:
    """Lookahead (Zhang et al. 2019, "k steps forward, 1 step back"), as ``optax.lookahead``.

    The base optimizer updates the fast weights θ (the params); the slow weights φ start as the
    initial params, and after every k-th base step::

        φ = φ + α (θ − φ)
        θ = φ

    The returned params are the fast weights; ``state.lookahead.buffers["slow"]`` the slow ones.
    The slow weights are stored in the base's state dtype (``mixed_precision``'s ``state_dtype``)
    and, for a base with compensated params (Kahan, master weights), the sync acts on the
    compensated value. On concrete arrays the sync is a host branch; under ``jax.jit`` a select.
    """
    _check_base(base, "lookahead")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"Invalid k: {k!r} (must be an integer >= 1)")
    hp.check_range("alpha", alpha, 0.0, 1.0)
    values = {"alpha": alpha}
    name = f"lookahead({base.name}, k={k})"
    precision = base.rule.precision if base.rule is not None else Precision()

    def init(params: PyTree) -> LookaheadState:
        base_state = base.init(params)
        leaves, treedef = trees.flatten(params)
        xp = _backend.namespace_of(*leaves)
        slow = [_backend.astype(xp, xp.asarray(p, copy=True), precision.storage_dtype(xp, p)) for p in leaves]
        return LookaheadState(
            _own_state(values, params, {"slow": trees.unflatten(treedef, slow)}), base_state
        )

    def step(state: LookaheadState, grads: PyTree, params: PyTree, **inputs: Any):
        _check_state(state, LookaheadState, name)
        base_state, fast = base.step(state.base, grads, params, **inputs)
        fast_leaves, treedef = trees.flatten(fast)
        xp = _backend.namespace_of(*fast_leaves)
        own, h = _advance(xp, values, state.lookahead)
        sync = own.count % k == 0
        if not _backend.is_lazy(sync) and not bool(sync):
            return LookaheadState(own, base_state), fast

        slow_leaves = trees.flatten_like(treedef, own.buffers["slow"], "state slow weights")
        extra_name = precision.extra_buffer
        extras = (
            trees.flatten_like(treedef, base_state.buffers[extra_name], extra_name)
            if extra_name
            else [None] * len(fast_leaves)
        )
        dtypes = [precision.compute_dtype(xp, p) for p in fast_leaves]
        working = [precision.working_param(xp, p, c, d) for p, c, d in zip(fast_leaves, extras, dtypes)]
        slow_compute = [_backend.astype(xp, s, d) for s, d in zip(slow_leaves, dtypes)]
        synced = lookahead_sync(xp, slow_compute, working, h["alpha"])
        new_slow = [_backend.astype(xp, s, old.dtype) for s, old in zip(synced, slow_leaves)]
        committed = [
            precision.commit_param(xp, s, p.dtype, c) for s, p, c in zip(synced, fast_leaves, extras)
        ]
        new_fast = [stored for stored, _ in committed]
        new_extras = [extra for _, extra in committed]
        if _backend.is_lazy(sync):
            new_slow = [xp.where(sync, a, b) for a, b in zip(new_slow, slow_leaves)]
            new_fast = [xp.where(sync, a, b) for a, b in zip(new_fast, fast_leaves)]
            if extra_name:
                new_extras = [xp.where(sync, a, b) for a, b in zip(new_extras, extras)]
        own = own._replace(buffers={"slow": trees.unflatten(treedef, new_slow)})
        if extra_name:
            buffers = {**base_state.buffers, extra_name: trees.unflatten(treedef, new_extras)}
            base_state = base_state._replace(buffers=buffers)
        return LookaheadState(own, base_state), trees.unflatten(treedef, new_fast)

    return engine.Optimizer(init=init, step=step, name=name, inputs=base.inputs, traceable=base.traceable)
