"""The torch adapter's step plan: a param group's step laid out once and kept while it holds,
torch.optim's per-param state made and read, and the executor contract.

A step of :class:`~agnostic_optim.adapters._torch_optimizer.TorchOptimizer` goes

    front (``_torch_optimizer``: groups, options, hyperparameter tensors)
      -> plan (here: which params share a step count, their state and buffers)
      -> executor (``_torch_eager`` by default, ``_torch_compiled`` with ``compile=True``)
      -> engine (``prepare_step``, ``update_leaves``: the rule's maths)

An :class:`Executor` lays out each :class:`Subset` once (:meth:`Executor.lay_out`) and runs its
steps (:meth:`Executor.step`); the plan keeps the layout while :meth:`Plan.matches`.

torch.optim keeps one ``step`` counter per param (a 0-d float tensor); ours are the elements of
one 1-D tensor per group (:func:`shared_counters`), each still its own tensor to torch, so a
step increments and checks a group's counters in one call each.
"""

from __future__ import annotations

import itertools
import operator
import os
import sys
from collections.abc import Sequence
from typing import Any, Protocol

import array_api_compat.torch
import torch

import agnostic_optim as ao
from agnostic_optim import engine
from agnostic_optim.adapters._torch_private import dict_version

XP = array_api_compat.torch  # the core's namespace for torch tensors
PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)  # (not DTensor: it has no data pointer)


class Layout(Protocol):
    """What an executor keeps for a subset between steps (see :meth:`Executor.lay_out`)."""

    viewed: list[torch.Tensor]  # tensors the layout holds views of (their memory must not move)


class Executor(Protocol):
    """Runs a rule's steps over a subset of a group's params, in place (see the module doc)."""

    def lay_out(
        self, rule: engine.Rule, params: list[torch.Tensor], buffers: dict[str, list], flags: list | None
    ) -> Layout:
        """What the executor keeps for these params from step to step (made with the plan)."""
        ...

    def step(
        self,
        rule: engine.Rule,
        subset: Subset,
        hparams: dict[str, Any],
        scheduled: dict[str, Any],
        grads: list[torch.Tensor],
        leaf_inputs: dict[str, list[torch.Tensor]],
        keeps_step: bool,
    ) -> bool:
        """One step of ``rule`` for ``subset``: params, buffers and running scalars written in
        place. Returns whether it also advanced the subset's step counters."""
        ...


class NothingKept:
    """The layout of an executor that keeps nothing between steps (each step reads the tensors
    as they are): the differentiable and sparse executors'."""

    viewed: tuple[torch.Tensor, ...] = ()

    @classmethod
    def lay_out(
        cls, rule: engine.Rule, params: list, buffers: dict[str, list], flags: list | None
    ) -> NothingKept:
        return cls()


class Subset:
    """Params of one group that share a step count, with what their step reuses."""

    def __init__(
        self,
        params: list[torch.Tensor],
        states: list[dict[str, Any]],
        buffers: dict[str, list[torch.Tensor]],
        count: int,
        flags: list[bool] | None,
    ):
        # the params as the rule sees them: a complex param as its ``view_as_real``, as torch.optim
        # steps it (``sources``: the params themselves, which hold the gradients)
        self.sources = params
        self.complex = any(p.is_complex() for p in params)
        self.params = [real_view(p) for p in params] if self.complex else params
        self.states, self.buffers, self.count = states, buffers, count
        self.flags = flags  # the rule's mask, one bool per param (None: no mask)
        self.layout: Any = None  # the executor's (see Executor.lay_out)
        self.hparams: tuple[dict[str, Any], dict[str, Any]] = ({}, {})  # (see the front's _step_subset)
        self.hparams_version: int | None = None  # the group version they were read at
        steps = [s["step"] for s in states if "step" in s]
        plain = len(steps) == len(states) and all(isinstance(t, torch.Tensor) for t in steps)
        # the step counters when they are torch.optim's float tensors (incremented in one call;
        # none for torch.optim.SGD's state), else None
        self.steps: list[torch.Tensor] | None = (
            steps if plain and all(t.is_floating_point() for t in steps) else None
        )
        # the 1-D tensor whose elements these counters are, in order (see shared_counters):
        # one add increments them all, one comparison reads them all
        self.counters = counters_base(self.steps) if self.steps else None

    def real_grads(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """The step's gradients as the rule sees them (complex ones as their real views)."""
        return [real_view(g) for g in grads] if self.complex else grads

    def advance_steps(self) -> None:
        """``step += 1`` for every param (one call for counters that share a tensor)."""
        if self.steps is None:
            increment_steps(self.states)
        elif self.counters is not None:
            self.counters.add_(1)
        elif self.steps:
            torch._foreach_add_(self.steps, 1)


class Plan:
    """A param group's step laid out once and reused while nothing it was built from changes.

    :meth:`matches` checks that, in a few O(params) passes each step: the same params have
    gradients and the same executor runs them; each has the same state dict holding the same
    values (buffers, ``step``, running scalars) in the same order (read from the dicts' version
    tags, which every change of a dict moves, where this Python has them); the version counters
    of the step counters and running scalars show that only this optimizer changed them, and
    (one batched host read per subset) the step counters still hold the count the plan keeps.
    The step counters and the params keep their data pointers (the counters are incremented
    through their shared base; a param rebound through ``.data``, as ``model.float()`` does,
    may need other buffers and dtypes), and so do the tensors an executor's layout holds views
    of (the eager executor's chunked buffers: ``x.data = ...`` would leave the views on the old
    storage), with their strides. A buffer left whole is the state's tensor itself, so the step
    reads whatever it is rebound to (rebound to another dtype, it is then stepped in that dtype,
    where torch.optim raises). The compiled graphs read each tensor's memory as they run and
    check every input's layout themselves (see ``_torch_compiled``).
    """

    def __init__(
        self,
        group: dict[str, Any],
        rule: engine.Rule,
        params: list[torch.Tensor],
        state_map: dict,
        subsets: list[Subset],
        executor: Executor,
    ):
        self.group, self.rule, self.params, self.subsets = group, rule, params, subsets
        self.state_map, self.executor = state_map, executor
        self.states = [state_map[p] for p in params]
        # what ``state_map`` holds for each param: its state, or None once it has none (see
        # drop_steps: torch.optim.SGD without momentum keeps no entry)
        self.registered: list[dict | None] = list(self.states)
        self.cacheable = all(type(p) in PLAIN_TENSORS for p in params)
        if self.cacheable:
            self.viewed = [t for subset in subsets for t in subset.layout.viewed]
            self.strides = [t.stride() for t in self.viewed]
            self.pointers = self.data_pointers()
        self.record_history()

    def data_pointers(self) -> list[int]:
        """The params', the viewed tensors' and the shared step counters' data pointers (the
        counters read and incremented through their shared base must still be its elements)."""
        counters = [subset.steps for subset in self.subsets if subset.counters is not None]
        return list(map(torch.Tensor.data_ptr, itertools.chain(self.params, self.viewed, *counters)))

    def drop_steps(self) -> None:
        """Forget the ``step`` counters (torch.optim.SGD keeps none: see the front's _keeps_step)."""
        for i, (p, s) in enumerate(zip(self.params, self.states)):
            s.pop("step", None)
            if not s and self.state_map.get(p) is s:  # no state left: no entry, as in torch.optim
                del self.state_map[p]
                self.registered[i] = None
        for subset in self.subsets:
            subset.steps, subset.counters = [], None
        if self.cacheable:
            self.pointers = self.data_pointers()

    def record_history(self, group_version: int | None = None, dicts: bool = True) -> None:
        """Remember the group's version tag, the state dicts' version tags (their values where
        this Python has none; ``dicts=False``: a step that changed no state dict), and the
        versions of the step counters and running scalars, as this step left them."""
        self.group_version = group_version
        if not dicts:
            self.versions = versions(self.versioned)
            return
        if dict_version is not None:
            self.map_version = dict_version(self.state_map)
            self.marks = list(map(dict_version, self.states))
        else:
            self.marks = [v for s in self.states for v in s.values()]
        versioned: list[Any] = []
        for subset in self.subsets:
            if subset.counters is not None:  # its elements share its version counter: one read
                versioned.append(subset.counters)
            elif subset.steps != []:  # ([]: no ``step``, as in torch.optim.SGD's state)
                versioned += [s.get("step") for s in subset.states]
        versioned += [s.get(key) for key in self.rule.scalars for s in self.states]
        self.versioned, self.versions = versioned, versions(versioned)

    def matches(
        self,
        group: dict[str, Any],
        rule: engine.Rule,
        params: list[torch.Tensor],
        state_map: dict,
        executor: Executor,
    ) -> bool:
        if self.group is not group or self.rule is not rule or len(params) != len(self.params):
            return False
        if state_map is not self.state_map or executor is not self.executor:  # (a new state: reset)
            return False
        if not all(map(operator.is_, params, self.params)):
            return False
        if dict_version is not None:  # the same dicts, changed by no one (a tag per dict)
            version = dict_version(self.state_map)
            if version != self.map_version:  # (another group's params may have been added)
                states = [self.state_map.get(p) for p in params]
                if not all(map(operator.is_, states, self.registered)):
                    return False
                self.map_version = version
            if list(map(dict_version, self.states)) != self.marks:
                return False
        else:
            states = [self.state_map.get(p) for p in params]
            if not all(map(operator.is_, states, self.registered)):
                return False
            values = [v for s in self.states for v in s.values()]
            if len(values) != len(self.marks) or not all(map(operator.is_, values, self.marks)):
                return False
        if self.data_pointers() != self.pointers or [t.stride() for t in self.viewed] != self.strides:
            return False
        if versions(self.versioned) != self.versions:
            return False
        for subset in self.subsets:  # an edit through ``.data`` leaves the version counter alone
            steps = subset.steps  # (CPU tensors in torch.optim's format: read without a sync)
            if not steps or steps[0].device.type != "cpu":
                continue
            values = subset.counters if subset.counters is not None else torch.stack(steps)
            if not bool((values == subset.count).all()):
                return False
        return True


def build_plan(
    group: dict[str, Any],
    rule: engine.Rule,
    params: list[torch.Tensor],
    state_map: dict,
    executor: Executor,
) -> Plan:
    """Initialise missing state (torch.optim's per-param dicts) and lay the group's step out."""
    states = [state_map[p] for p in params]
    fresh = [(p, s) for p, s in zip(params, states) if not s]
    whole = getattr(executor, "whole_state", False)  # (state made from a DTensor's whole tensor)
    for (p, s), step in zip(fresh, shared_counters([0.0] * len(fresh))):
        s.update(initial_param_state(rule, p.full_tensor() if whole else p, step))
    names = engine.buffer_names(rule)
    flag_of = mask_flags(rule, group["params"])
    subsets = []
    for members in by_history(params, state_map, rule):
        member_states = [state_map[p] for p in members]
        buffers = {}
        for name in names:
            buffers[name] = [storage(rule, p, name, s[name]) for p, s in zip(members, member_states)]
            for s, buffer in zip(member_states, buffers[name]):
                s[name] = buffer  # a converted checkpoint buffer replaces the loaded one
        flags = None if flag_of is None else [flag_of[id(p)] for p in members]
        if any(p.is_complex() for p in members):
            buffers = {name: [real_view(b) for b in values] for name, values in buffers.items()}
        subset = Subset(members, member_states, buffers, step_count(member_states[0]), flags)
        subset.layout = executor.lay_out(rule, subset.params, buffers, flags)
        subsets.append(subset)
    return Plan(group, rule, params, state_map, subsets, executor)


def prepare_scalars(
    rule: engine.Rule,
    subset: Subset,
    hparams: dict[str, Any],
    scheduled: dict[str, Any],
    grads: list[torch.Tensor],
    params: list[torch.Tensor],
    buffers: dict[str, list[torch.Tensor]],
    leaf_inputs: dict[str, list[torch.Tensor]],
) -> engine.StepScalars:
    """The scalar half of a subset's step (:func:`engine.prepare_step`), from torch.optim's
    per-param state: the subset's count, and its running scalars as the first param's state
    holds them (copied: an executor may write the state while autograd still reads them)."""
    first = params[0]
    count = torch.tensor(subset.count, dtype=torch.int32, device=first.device)
    dtype = engine.scalar_dtype(XP, first)
    running = {k: subset.states[0][k].to(device=first.device, dtype=dtype, copy=True) for k in rule.scalars}
    core_state = engine.OptimizerState(count, hparams, scheduled, buffers, running)
    return engine.prepare_step(rule, core_state, XP, grads, params, leaf_inputs)


def store_running(states: list[dict[str, Any]], step: engine.StepScalars) -> None:
    """The step's running scalars into every param's state, each its own tensor in its own dtype
    (torch.optim updates loaded state in place). No pass over the states for rules without any."""
    for k, v in step.running.items():
        for s in states:
            s[k] = v.to(device=s[k].device, dtype=s[k].dtype, copy=True)


def mask_flags(rule: engine.Rule, group_params: list[torch.Tensor]) -> dict[int, bool] | None:
    """The rule's ``mask`` resolved over the group's params as the functional API resolves it
    over a sequence of leaves (a list or tuple of bools, or ``mask(path, param)`` with the
    param's index as its path, ``(i,)``): id(param) -> flag, or None without a mask."""
    if rule.mask is None:
        return None
    like = tuple(group_params) if isinstance(rule.mask, tuple) else list(group_params)
    return dict(zip(map(id, group_params), engine.resolve_mask(rule.mask, like)))


def subset_inputs(
    rule: engine.Rule, params: list[torch.Tensor], inputs: dict[str, dict[int, torch.Tensor]]
) -> dict[str, list[torch.Tensor]]:
    """The rule's per-leaf inputs for ``params``: a list per input that every param has (an input
    none of them has is left out: the core takes that as None, "no new estimate this step")."""
    out = {}
    for name in rule.leaf_inputs:
        values = inputs.get(name, {})
        found = [values.get(id(p)) for p in params]
        if all(v is None for v in found):
            continue
        if any(v is None for v in found):
            raise RuntimeError(f"{rule.name}: {name} is missing for some params of a param group")
        out[name] = found
    return out


def refuse_sparse(name: str, grads: list[torch.Tensor]) -> None:
    """Raise, before anything is written, for a sparse gradient (``name``: the optimizer's)."""
    if any(g.is_sparse for g in grads):
        raise RuntimeError(
            f"{name} does not support sparse gradients; use torch.optim.SparseAdam or densify the gradient"
        )


def real_view(t: torch.Tensor) -> torch.Tensor:
    """A complex tensor as the real tensor torch.optim steps (``view_as_real``), else itself."""
    return torch.view_as_real(t) if t.is_complex() else t


def refuse_complex(rule: engine.Rule) -> None:
    """Complex params step as their real views (torch.optim's way) where every element of the
    update depends on its own element and whole-leaf sums: not for Shampoo's matrices, nor
    with mixed precision."""
    if not rule.batchable:
        raise TypeError(f"{rule.name} does not support complex parameters (its update is not elementwise)")
    if rule.precision.state_dtype is not None or rule.precision.compensation is not None:
        raise TypeError("state_dtype / compensation do not support complex parameters")


def initial_param_state(rule: engine.Rule, p: torch.Tensor, step: torch.Tensor) -> dict[str, Any]:
    """torch-style per-parameter state: ``step`` (from :func:`shared_counters`) + buffers (a
    complex param's as complex tensors, as torch.optim keeps them)."""
    state = engine.init_rule_state(rule, [real_view(p.detach())])
    per_param = {"step": step}
    for name, leaves in state.buffers.items():
        per_param[name] = torch.view_as_complex(leaves[0]) if p.is_complex() else leaves[0]
    # running scalars (NAdam's mu_product) in torch.optim's dtype, so that a state dict saved
    # and loaded (which casts them to the param's dtype) steps as before; the step reads them
    # into float64
    per_param.update({name: value.to(step_dtype()) for name, value in state.scalars.items()})
    return per_param


def storage(rule: engine.Rule, p: torch.Tensor, name: str, buffer: torch.Tensor) -> torch.Tensor:
    """State buffer ``name`` in the dtype the rule keeps it in (a checkpoint written by torch.optim
    may hold it in another): the Kahan compensation in the param's dtype, master weights in the
    compute dtype, every other buffer in the state dtype."""
    precision = rule.precision
    if precision.state_dtype is None and precision.compensation is None:  # the common case
        return buffer if buffer.dtype == p.dtype else buffer.to(p.dtype)
    if name == precision.extra_buffer and precision.compensation == "kahan":
        want = p.dtype
    elif name == precision.extra_buffer:
        want = precision.compute_dtype(XP, p)
    else:
        want = precision.storage_dtype(XP, p)
    return buffer if buffer.dtype == want else buffer.to(want)


def versions(values: Sequence[Any]) -> list[int | None]:
    """Each value's version counter; None for a number (old checkpoints' ``step``) and for an
    inference tensor, which has none."""
    return [v._version if isinstance(v, torch.Tensor) and not v.is_inference() else None for v in values]


# ---------------------------------------------------------------- step counters


def step_dtype() -> torch.dtype:
    """torch.optim's ``_get_scalar_dtype()``: float64 under a float64 default dtype, else float32."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def shared_counters(
    values: list[float], dtype: torch.dtype | None = None, device: torch.device | None = None
) -> list[torch.Tensor]:
    """Step counters as torch.optim keeps them (0-d float tensors, one per param) that are the
    elements of one 1-D tensor, so a step increments and checks a group's in one call each
    instead of one kernel per param. Each is still its own tensor to torch (``torch.save``,
    torch.optim loading it); writes to one never reach another. Fresh ones follow the default
    device, as torch.optim's do."""
    if not values:
        return []
    return list(torch.tensor(values, dtype=dtype or step_dtype(), device=device).unbind())


def is_host_counter(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.ndim == 0 and t.device.type == "cpu" and t.is_floating_point()


def counters_base(steps: list[torch.Tensor]) -> torch.Tensor | None:
    """The 1-D tensor whose elements ``steps`` are, in order (from :func:`shared_counters`)."""
    base = steps[0]._base
    if (
        base is None
        or base.ndim != 1
        or base.shape[0] != len(steps)
        or base.stride(0) != 1
        or not all(is_host_counter(t) and t._base is base for t in steps)
    ):
        return None
    size, pointer = base.element_size(), base.data_ptr()
    if [t.data_ptr() for t in steps] != [pointer + i * size for i in range(len(steps))]:
        return None
    return base


def increment_steps(states: list[dict[str, Any]]) -> None:
    """``step += 1`` in every state, in place as torch.optim does (one batched add)."""
    states = [s for s in states if "step" in s]  # torch.optim.SGD's state has none
    steps = [s["step"] for s in states]
    if all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in steps):
        if steps:
            torch._foreach_add_(steps, 1)
        return
    for s in states:  # an older checkpoint's step: a number or an integer tensor
        s["step"] = torch.tensor(step_count(s) + 1.0, dtype=step_dtype())


def step_count(state: dict[str, Any]) -> int:
    """A param's completed steps; a state without ``step`` is torch.optim.SGD's (see _keeps_step)."""
    return int(state["step"]) if "step" in state else 1


def by_history(params: list[torch.Tensor], state: dict, rule: engine.Rule) -> list[list[torch.Tensor]]:
    """Params grouped by step count (and running scalars): torch keeps one ``step`` per param.

    The per-param values are read in one batched host transfer where they are CPU tensors."""
    states = [state[p] for p in params]
    columns = [_history_column(states, "step")] + [_history_column(states, k) for k in rule.scalars]
    groups: dict[tuple, list[torch.Tensor]] = {}
    for p, key in zip(params, zip(*columns)):
        groups.setdefault(key, []).append(p)
    return list(groups.values())


def _history_column(states: list[dict[str, Any]], key: str) -> list[float]:
    """``float(state[key])`` for every state (a missing ``step``: see :func:`step_count`)."""
    values = [s.get(key) for s in states]
    if all(isinstance(v, torch.Tensor) and v.ndim == 0 and v.device.type == "cpu" for v in values):
        return torch.stack(values).tolist() if values else []  # stack promotes mixed dtypes
    return [float(step_count(s)) if key == "step" else float(s[key]) for s in states]


# ---------------------------------------------------------------- warnings

_INTERNAL_DIRS = tuple(
    os.path.dirname(module.__file__) + os.sep for module in (torch, ao, sys.modules[__name__])
)


def outside_frames() -> int:
    """The ``stacklevel`` of the first caller outside torch and agnostic_optim (the user's
    ``opt.step()``, whatever wraps it: a scheduler, GradScaler, SAM)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
        frame, level = frame.f_back, level + 1
    return level
