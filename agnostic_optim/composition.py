"""Composition: chain transforms into optimizers, clip, mask, skip bad steps, accumulate.

``chain(clip_by_global_norm(1.0), adamw(...))`` is an ``Optimizer``; ``masked`` restricts an
optimizer to a subset of leaves (with an optional second optimizer for the rest, e.g. no
weight decay on biases and norm layers); ``skip_nonfinite`` and ``accumulate`` wrap any
optimizer. Where a wrapper must choose between two outcomes it branches on the host for
concrete arrays and selects with ``where`` under tracing (``jax.jit``), so both work.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from agnostic_optim import _backend, blocks, engine, trees
from agnostic_optim.hparams import Convention, HParam, check_convention, check_range

PyTree = Any
Mask = Any  # a pytree of bools shaped like params, or a callable (path, leaf) -> bool


# ----------------------------------------------------------------------------- chain


def chain(*parts: engine.Transform | engine.Optimizer) -> engine.Optimizer | engine.Transform:
    """Apply gradient transforms in order, then (optionally) an optimizer.

    ``chain(t1, ..., tk, opt)`` is an ``Optimizer``: each ``t_i`` rewrites the gradients, then
    ``opt`` steps with them. Without a final optimizer the result is a ``Transform``. The state
    is a tuple of the parts' states; step inputs (``grad_fn=``, ...) go to the optimizer.
    """
    if not parts:
        raise ValueError("chain needs at least one transform or optimizer")
    *transforms, last = parts
    for part in transforms:
        if not isinstance(part, engine.Transform):
            raise TypeError(f"only the last part of chain may be an optimizer; got {part!r} earlier")
    if not isinstance(last, (engine.Transform, engine.Optimizer)):
        raise TypeError(f"chain parts must be Transforms or an Optimizer, got {last!r}")
    name = "chain(" + ", ".join(p.name for p in parts) + ")"

    def init(params: PyTree) -> tuple:
        return tuple(part.init(params) for part in parts)

    def run_transforms(state: tuple, grads: PyTree, params: PyTree) -> tuple[list, PyTree]:
        new_states = []
        for part, part_state in zip(transforms, state):
            part_state, grads = part.update(part_state, grads, params)
            new_states.append(part_state)
        return new_states, grads

    if isinstance(last, engine.Optimizer):

        def step(state: tuple, grads: PyTree, params: PyTree, **inputs: Any):
            new_states, grads = run_transforms(state, grads, params)
            last_state, params = last.step(state[-1], grads, params, **inputs)
            return (*new_states, last_state), params

        return engine.Optimizer(init=init, step=step, name=name, inputs=last.inputs, traceable=last.traceable)

    def update(state: tuple, grads: PyTree, params: PyTree):
        new_states, grads = run_transforms(state, grads, params)
        last_state, grads = last.update(state[-1], grads, params)
        return (*new_states, last_state), grads

    return engine.Transform(init=init, update=update, name=name)


# ----------------------------------------------------------------------------- clipping


def clip_by_global_norm(max_norm: HParam, convention: Convention = "torch") -> engine.Transform:
    """Scale all gradients together so that their global L2 norm is at most ``max_norm``.

    torch form (``torch.nn.utils.clip_grad_norm_``)::

        g <- g · min(1, max_norm / (‖g‖ + 1e-6))

    ``convention="optax"`` (``optax.clip_by_global_norm``)::

        g <- g                        if ‖g‖ < max_norm
        g <- g · max_norm / ‖g‖       otherwise
    """
    check_convention(convention)
    check_range("max_norm", max_norm)

    def prepare(ctx: engine.StepContext) -> dict[str, Any]:
        xp = ctx.xp
        norm = blocks.global_norm(xp, ctx.grads, ctx.t.dtype)
        max_norm = ctx.h.max_norm
        if convention == "optax":
            scale = xp.where(norm < max_norm, xp.ones_like(norm), max_norm / norm)
        else:
            ratio = max_norm / (norm + 1e-6)
            scale = xp.where(ratio < 1, ratio, xp.ones_like(ratio))
        return {"scale": scale}

    def update(xp, g, p, bufs, s):
        return bufs, g * s.scale

    return engine.build_transform(
        engine.Rule(
            name="clip_by_global_norm",
            hparams={"max_norm": max_norm},
            update=update,
            prepare=prepare,
            elementwise=False,
        )
    )


# ----------------------------------------------------------------------------- masks


def select_leaves(tree: PyTree, flags: list[bool]) -> PyTree:
    """``tree`` with the leaves whose flag is False replaced by ``None`` (an empty subtree)."""
    leaves, treedef = trees.flatten(tree)
    return trees.unflatten(treedef, [leaf if flag else None for leaf, flag in zip(leaves, flags)])


class MaskedState(NamedTuple):
    """State of ``masked``: the inner optimizer's (on selected leaves) and ``otherwise``'s."""

    selected: PyTree
    unselected: PyTree  # None when the unselected leaves are frozen


def masked(opt: engine.Optimizer, mask: Mask, otherwise: engine.Optimizer | None = None) -> engine.Optimizer:
    """Run ``opt`` on the leaves where ``mask`` is True and ``otherwise`` on the rest.

    Without ``otherwise`` the unselected leaves are left unchanged (frozen). ``mask`` is a
    pytree of Python bools shaped like params, or a callable ``(path, leaf) -> bool`` where
    ``path`` is the leaf's key path (e.g. ``("layer1", "bias")``). The common use -- no weight
    decay on biases and normalisation parameters::

        decay = lambda path, leaf: leaf.ndim > 1
        opt = masked(adamw(1e-3, weight_decay=0.1), decay, otherwise=adamw(1e-3, weight_decay=0))

    The inner states hold ``None`` at the leaves they do not own, so they mirror params.
    """

    def parts(params: PyTree) -> tuple[list[bool], list[bool]]:
        flags = engine.resolve_mask(mask, params)
        return flags, [not f for f in flags]

    def init(params: PyTree) -> MaskedState:
        chosen, rest = parts(params)
        selected = opt.init(select_leaves(params, chosen)) if any(chosen) else None
        other = None
        if otherwise is not None and any(rest):
            other = otherwise.init(select_leaves(params, rest))
        return MaskedState(selected, other)

    def step(state: MaskedState, grads: PyTree, params: PyTree, **inputs: Any):
        chosen, rest = parts(params)
        leaves, treedef = trees.flatten(params)
        new_leaves = list(leaves)
        new_states = []
        for inner, flags, inner_state in ((opt, chosen, state.selected), (otherwise, rest, state.unselected)):
            if inner is None or not any(flags):
                new_states.append(inner_state)
                continue
            inner_inputs = {
                k: select_leaves(v, flags) if _is_tree_like(v, treedef) else v for k, v in inputs.items()
            }
            inner_state, sub_params = inner.step(
                inner_state, select_leaves(grads, flags), select_leaves(params, flags), **inner_inputs
            )
            updated = iter(trees.flatten(sub_params)[0])
            new_leaves = [next(updated) if f else old for f, old in zip(flags, new_leaves)]
            new_states.append(inner_state)
        return MaskedState(*new_states), trees.unflatten(treedef, new_leaves)

    inputs = tuple(dict.fromkeys(opt.inputs + (otherwise.inputs if otherwise else ())))
    traceable = opt.traceable and (otherwise is None or otherwise.traceable)
    name = f"masked({opt.name})"
    return engine.Optimizer(init=init, step=step, name=name, inputs=inputs, traceable=traceable)


def _is_tree_like(value: Any, treedef: Any) -> bool:
    """True when ``value`` is a pytree with params' structure (a per-leaf step input)."""
    if value is None or callable(value):
        return False
    return trees.flatten(value)[1] == treedef


# ----------------------------------------------------------------------------- skipping


def _check_inputs(opt: engine.Optimizer, inputs: dict[str, Any]) -> None:
    """Refuse step inputs the wrapped optimizer does not take, on every step (not only on the
    steps that reach it)."""
    unknown = set(inputs) - set(opt.inputs)
    if unknown:
        raise TypeError(f"{opt.name}.step got unexpected inputs {sorted(unknown)}")


def _tree_select(xp: Any, condition: Any, if_true: PyTree, if_false: PyTree) -> PyTree:
    return trees.tree_map(lambda a, b: xp.where(condition, a, b), if_true, if_false)


def _all_finite(xp: Any, leaves: list[Any]) -> Any:
    ok = xp.asarray(True, device=_backend.device_of(leaves[0]))
    for leaf in leaves:
        ok = ok & xp.all(xp.isfinite(leaf))
    return ok


class SkipNonfiniteState(NamedTuple):
    """State of ``skip_nonfinite``: the inner state and the number of skipped steps (0-d int32)."""

    inner: PyTree
    skipped: Any


def skip_nonfinite(opt: engine.Optimizer) -> engine.Optimizer:
    """Skip steps whose gradients hold a NaN or Inf: params and the inner state stay as they
    were, and ``state.skipped`` counts the skips (the behaviour of ``torch.amp.GradScaler``)."""

    def init(params: PyTree) -> SkipNonfiniteState:
        leaves, _ = trees.flatten(params)
        xp = _backend.namespace_of(*leaves)
        return SkipNonfiniteState(
            opt.init(params), xp.asarray(0, dtype=xp.int32, device=_backend.device_of(leaves[0]))
        )

    def step(state: SkipNonfiniteState, grads: PyTree, params: PyTree, **inputs: Any):
        _check_inputs(opt, inputs)
        xp, grad_leaves, _, _ = engine.flatten_step_inputs(grads, params)
        ok = _all_finite(xp, grad_leaves)
        skipped = xp.asarray(state.skipped + xp.astype(~ok, xp.int32))
        if not _backend.is_lazy(ok):
            if not bool(ok):
                return SkipNonfiniteState(state.inner, skipped), params
            inner, new_params = opt.step(state.inner, grads, params, **inputs)
            return SkipNonfiniteState(inner, skipped), new_params
        inner, new_params = opt.step(state.inner, grads, params, **inputs)
        inner = _tree_select(xp, ok, inner, state.inner)
        return SkipNonfiniteState(inner, skipped), _tree_select(xp, ok, new_params, params)

    return engine.Optimizer(
        init=init, step=step, name=f"skip_nonfinite({opt.name})", inputs=opt.inputs, traceable=opt.traceable
    )


# ----------------------------------------------------------------------------- accumulation


class AccumulateState(NamedTuple):
    """State of ``accumulate``: inner state, summed gradients, micro-steps since the last update."""

    inner: PyTree
    grad_sum: PyTree
    micro_step: Any  # 0-d int32


def accumulate(opt: engine.Optimizer, every: int) -> engine.Optimizer:
    """Gradient accumulation: sum ``every`` micro-batch gradients, then step ``opt`` once with
    their mean; params are unchanged on the micro-steps in between (``optax.MultiSteps``)."""
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a positive integer, got {every!r}")

    def init(params: PyTree) -> AccumulateState:
        leaves, _ = trees.flatten(params)
        xp = _backend.namespace_of(*leaves)
        zero = xp.asarray(0, dtype=xp.int32, device=_backend.device_of(leaves[0]))
        return AccumulateState(opt.init(params), trees.tree_map(xp.zeros_like, params), zero)

    def step(state: AccumulateState, grads: PyTree, params: PyTree, **inputs: Any):
        _check_inputs(opt, inputs)
        xp, _, _, _ = engine.flatten_step_inputs(grads, params)
        grad_sum = trees.tree_map(lambda a, g: a + g, state.grad_sum, grads)
        micro_step = xp.asarray(state.micro_step + 1)
        ready = micro_step == every

        def apply() -> tuple[PyTree, PyTree]:
            mean = trees.tree_map(lambda a: a / every, grad_sum)
            return opt.step(state.inner, mean, params, **inputs)

        if not _backend.is_lazy(ready):
            if not bool(ready):
                return AccumulateState(state.inner, grad_sum, micro_step), params
            inner, new_params = apply()
            zeros = trees.tree_map(xp.zeros_like, grad_sum)
            return AccumulateState(inner, zeros, xp.zeros_like(micro_step)), new_params
        inner, new_params = apply()
        inner = _tree_select(xp, ready, inner, state.inner)
        grad_sum = trees.tree_map(lambda a: xp.where(ready, xp.zeros_like(a), a), grad_sum)
        micro_step = xp.where(ready, xp.zeros_like(micro_step), micro_step)
        return AccumulateState(inner, grad_sum, micro_step), _tree_select(xp, ready, new_params, params)

    name = f"accumulate({opt.name}, {every})"
    return engine.Optimizer(init=init, step=step, name=name, inputs=opt.inputs, traceable=opt.traceable)
