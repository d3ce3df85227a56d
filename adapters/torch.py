"""PyTorch adapter: ``torch.optim.Optimizer`` classes backed by the array-API core.

Drop-in replacements for torch.optim (same class names, constructor arguments, param groups,
``state_dict`` keys and numbers) plus classes for optimizers torch lacks::

    from agnostic_optim.adapters.torch import AdamW, Lion, TorchOptimizer
    opt = AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    opt = TorchOptimizer(model.parameters(), ao.adan, lr=1e-3)          # any factory

The adapter translates, the core computes: each step it gathers a group's parameters that have
gradients, assembles the core state from torch's per-parameter ``self.state[p]`` (``step``,
``exp_avg``, ...), runs the core's update rule and writes the results back in place.
Hyperparameters are read from ``group[...]`` every step, so ``torch.optim.lr_scheduler`` (and
OneCycleLR cycling ``betas``/``momentum``) and manual edits just work.

Two execution paths run the same rule:

* eager (default): leaves of one dtype and device are packed into lists and the rule runs once
  per block of about a million elements on ``torch._foreach_*`` kernels (see ``_tensor_list``:
  lazily, so products become multiply-adds and results are computed straight into the state
  and the params) -- no compilation, no host syncs, instant start. The layout of a group's step
  (chunk views, leaf groups, step counts) is kept while nothing it was built from changes;
* ``compile=True``: the whole step over all parameters is compiled by ``torch.compile`` as two
  graphs: the float64 scalar arithmetic (bias corrections, schedules, running scalars, step
  counters), then the update, which Inductor fuses into a few loops writing params and state
  in place. Hyperparameters are tensors, so changing lr never recompiles. The first step pays
  the compilation (~20 s to minutes on CPU), so it is opt-in: worth it for long runs. From a
  layout's second step on, the graphs are called directly, without Dynamo's Python guards over
  every tensor: one C++ check of the graphs' inputs stands in for them (see
  ``_torch_compiled``).

Mixed precision: pass ``state_dtype=`` and ``compensation=`` (see
:func:`agnostic_optim.mixed_precision`). LARS/LAMB's ``mask=`` applies per param of a group,
resolved as the functional API resolves it over the list of the group's params: a list of
bools, or ``mask(path, param)`` with ``path == (index,)`` (param groups do the same job).
"""

from __future__ import annotations

import inspect
import itertools
import operator
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import array_api_compat.torch
import torch

import agnostic_optim as ao
from agnostic_optim import _backend, blocks, chunking, engine
from agnostic_optim.adapters._tensor_list import NAMESPACE, TensorList, store
from agnostic_optim.adapters._torch_compiled import CompiledStep, GraphCall, versions
from agnostic_optim.adapters._torch_kfac import KFAC
from agnostic_optim.adapters._torch_lbfgs import LBFGS
from agnostic_optim.adapters._torch_wrappers import SAM, Lookahead
from agnostic_optim.hparams import is_scheduled

XP = array_api_compat.torch  # the core's namespace for torch tensors
# Eager path: leaves are cut into flat chunks of at most CHUNK_ELEMENTS and processed in blocks
# of about BLOCK_ELEMENTS. With the step evaluated in place (a single temporary at most), chunks
# of 1 << 20 were fastest on a 2-core CPU in benchmarks/torch_step.py (ResNet-18 SGD-momentum
# 7.2 ms vs 8.9 ms with 1 << 18). Blocks of 1 << 21 against 1 << 20: the same on ResNet-18
# (SGD-momentum, AdamW), and on the 600-small-tensor set a little slower while the machine's
# memory ran fast (RMSprop 9.95 vs 9.71 ms, AdamW 15.6 vs 14.8) but much faster while it ran
# slow (RMSprop 13.9 vs 15.6 ms, Adagrad 13.6 vs 15.2; torch foreach 15.3 and 17.5).
CHUNK_ELEMENTS = 1 << 20
BLOCK_ELEMENTS = 1 << 21

__all__ = [
    "KFAC",
    "LAMB",
    "LARS",
    "LBFGS",
    "SAM",
    "SGD",
    "AMSGrad",
    "AdaHessian",
    "Adagrad",
    "Adam",
    "AdamW",
    "Adan",
    "Lion",
    "Lookahead",
    "NAdam",
    "RAdam",
    "RMSprop",
    "Shampoo",
    "Sophia",
    "TorchOptimizer",
]

# torch.optim constructor flags that change how torch runs, not what it computes.
_TORCH_EXECUTION_FLAGS = ("foreach", "fused", "capturable")
_PRECISION_OPTIONS = ("state_dtype", "compensation")
_GRAD, _IS_SPARSE = operator.attrgetter("grad"), operator.attrgetter("is_sparse")


class _ForeachBatching:
    """Packs same-dtype, same-device leaves into a TensorList (see :func:`engine.apply_rule`)."""

    xp = NAMESPACE

    @property
    def block_elements(self) -> int:
        return BLOCK_ELEMENTS

    @staticmethod
    def pack(arrays: list[torch.Tensor]) -> TensorList:
        return TensorList(arrays)

    @staticmethod
    def unpack(packed: TensorList) -> list[torch.Tensor]:
        return packed.tensors

    @staticmethod
    def store(pairs: list[tuple[list[torch.Tensor], TensorList]]) -> None:
        store(pairs)


_BATCHING = _ForeachBatching()


def _batching(rule: engine.Rule) -> _ForeachBatching | None:
    """The eager path packs a rule's leaves into ``_foreach`` lists unless it needs each leaf's
    own array (Shampoo's matrices), in which case it runs leaf by leaf."""
    return _BATCHING if rule.batchable else None


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


class _Subset:
    """Params of one group that share a step count, with what their step reuses."""

    def __init__(
        self,
        params: list[torch.Tensor],
        states: list[dict[str, Any]],
        buffers: dict[str, list[torch.Tensor]],
        count: int,
        layout: chunking.ChunkLayout | None,
        groups: list[Sequence[int]] | None,
        flags: list[bool] | None,
    ):
        self.params, self.states, self.buffers, self.count = params, states, buffers, count
        self.layout, self.groups = layout, groups  # the eager path's chunks and leaf groups
        self.flags = flags  # the rule's mask, one bool per param (None: no mask)
        self.graph: GraphCall | None = None  # the compiled path's graph for this layout
        self.count_tensor: torch.Tensor | None = None  # the compiled path's step count
        self.compute_dtypes: tuple[torch.dtype, ...] = ()  # the compiled path's, in params' order
        self.hparams: tuple[dict[str, Any], dict[str, Any]] = ({}, {})  # (see _step_subset)
        self.hparams_version: int | None = None  # the group version they were read at
        steps = [s["step"] for s in states if "step" in s]
        plain = len(steps) == len(states) and all(isinstance(t, torch.Tensor) for t in steps)
        # the step counters when they are torch.optim's float tensors (incremented in one call;
        # none for torch.optim.SGD's state), else None
        self.steps: list[torch.Tensor] | None = (
            steps if plain and all(t.is_floating_point() for t in steps) else None
        )
        # the 1-D tensor whose elements these counters are, in order (see _shared_counters):
        # one add increments them all, one comparison reads them all
        self.counters = _counters_base(self.steps) if self.steps else None


class _Plan:
    """A param group's step laid out once and reused while nothing it was built from changes.

    :meth:`matches` checks that, in a few O(params) passes each step: the same params have
    gradients; each has the same state dict holding the same values (buffers, ``step``, running
    scalars) in the same order (read from the dicts' version tags, which every change of a dict
    moves, where this Python has them); the version counters of the step counters and running
    scalars show that only this optimizer changed them, and (one batched host read per subset)
    the step counters still hold the count the plan keeps. The step counters and the params
    keep their data pointers (the counters are incremented through their shared base; a param
    rebound through ``.data``, as ``model.float()`` does, may need other buffers and dtypes). On
    the eager path, so do the buffers cut into chunks (``x.data = ...`` would leave the chunk
    views on the old storage), and chunked tensors their strides; a buffer left whole is the
    state's tensor itself, so the step reads whatever it is rebound to (rebound to another dtype,
    it is then stepped in that dtype, where torch.optim raises). The compiled graphs read
    each tensor's memory as they run and check every input's layout themselves (see
    ``_torch_compiled``).
    """

    def __init__(
        self,
        group: dict[str, Any],
        rule: engine.Rule,
        params: list[torch.Tensor],
        state_map: dict,
        subsets: list[_Subset],
        compiled: bool,
    ):
        self.group, self.rule, self.params, self.subsets = group, rule, params, subsets
        self.state_map = state_map
        self.states = [state_map[p] for p in params]
        self.cacheable = all(type(p) in _PLAIN_TENSORS for p in params)  # DTensor: no data pointer
        self.compiled = compiled
        if self.cacheable:
            self.chunked = [
                t
                for subset in subsets
                if subset.layout is not None
                for i, spans in enumerate(subset.layout.spans)
                if spans is not None
                for t in (subset.params[i], *(buffers[i] for buffers in subset.buffers.values()))
            ]
            self.strides = [t.stride() for t in self.chunked]
            self.pointers = self._pointers()
        self.record_history()

    def _pointers(self) -> list[int]:
        # counters read and incremented through their shared base must still be its elements
        counters = [subset.steps for subset in self.subsets if subset.counters is not None]
        # the params' pointers move when ``.data`` rebinds them (``model.float()``: the plan's
        # dtypes and buffers must follow); on the eager path the chunked tensors' too (the views)
        owned = (self.params,) if self.compiled else (self.params, self.chunked)
        return list(map(torch.Tensor.data_ptr, itertools.chain(*owned, *counters)))

    def record_history(self, group_version: int | None = None, dicts: bool = True) -> None:
        """Remember the group's version tag, the state dicts' version tags (their values where
        this Python has none; ``dicts=False``: a step that changed no state dict), and the
        versions of the step counters and running scalars, as this step left them."""
        self.group_version = group_version
        if not dicts:
            self.versions = versions(self.versioned)
            return
        if _dict_version is not None:
            self.map_version = _dict_version(self.state_map)
            self.marks = list(map(_dict_version, self.states))
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
        self, group: dict[str, Any], rule: engine.Rule, params: list[torch.Tensor], state_map: dict
    ) -> bool:
        if self.group is not group or self.rule is not rule or len(params) != len(self.params):
            return False
        if state_map is not self.state_map:  # ``opt.state = defaultdict(dict)``: a reset
            return False
        if not all(map(operator.is_, params, self.params)):
            return False
        if _dict_version is not None:  # the same dicts, changed by no one (a tag per dict)
            version = _dict_version(self.state_map)
            if version != self.map_version:  # (another group's params may have been added)
                states = [self.state_map.get(p) for p in params]
                if not all(map(operator.is_, states, self.states)):
                    return False
                self.map_version = version
            if list(map(_dict_version, self.states)) != self.marks:
                return False
        else:
            states = [self.state_map.get(p) for p in params]
            if not all(map(operator.is_, states, self.states)):
                return False
            values = [v for s in states for v in s.values()]
            if len(values) != len(self.marks) or not all(map(operator.is_, values, self.marks)):
                return False
        if self._pointers() != self.pointers or [t.stride() for t in self.chunked] != self.strides:
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


def _probe_dict_version() -> Callable[[dict], int] | None:
    """CPython's per-dict version tag (moved by every insertion, deletion or replacement of a
    value), as Dynamo reads it for its guards; None where it is missing or does not move."""
    try:
        from torch._C._dynamo.guards import dict_version
    except ImportError:  # pragma: no cover - depends on the torch build
        return None
    probe: dict[str, object] = {}
    tags = [dict_version(probe)]
    for change in (lambda: probe.setdefault("a", 0), lambda: probe.update(a=1), lambda: probe.pop("a")):
        change()
        tags.append(dict_version(probe))
    return dict_version if len(set(tags)) == len(tags) else None


_dict_version = _probe_dict_version()


def _resolve_factory(factory: Callable[..., ao.Optimizer] | str) -> Callable[..., ao.Optimizer]:
    if isinstance(factory, str):
        entries = ao.registry()
        if factory not in entries:
            raise ValueError(f"unknown optimizer {factory!r}; registered: {sorted(entries)}")
        return entries[factory].factory
    if not callable(factory):
        raise TypeError(f"factory must be an agnostic_optim factory or its name, got {factory!r}")
    return factory


def _factory_defaults(factory: Callable[..., Any]) -> dict[str, Any]:
    parameters = inspect.signature(factory).parameters.items()
    return {name: p.default for name, p in parameters if p.default is not inspect.Parameter.empty}


def _structure_key(options: dict[str, Any]) -> tuple:
    """What decides a rule's structure: non-numeric options, and which numbers are zero."""

    def shape(value: Any) -> Any:
        if isinstance(value, (tuple, list)):
            return tuple(shape(v) for v in value)
        if isinstance(value, bool) or value is None or isinstance(value, str):
            return value
        if isinstance(value, (int, float)):
            return "zero" if value == 0 else "number"
        if isinstance(value, torch.Tensor):
            return "tensor"
        return ("object", id(value))

    return tuple((name, shape(value)) for name, value in sorted(options.items()))


class TorchOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` running any agnostic_optim factory.

    Args:
      params: an iterable of tensors or of param-group dicts, as for torch.optim.
      factory: an ``agnostic_optim`` factory (``ao.adamw``) or its registry name (``"adamw"``).
      compile: run the step through ``torch.compile`` (see the module docstring).
      state_dtype, compensation: mixed precision, see :func:`agnostic_optim.mixed_precision`.
      **hparams: the factory's hyperparameters and options; they become the defaults of every
        param group. torch.optim's ``foreach``/``fused``/``capturable`` are accepted and ignored
        (they choose torch's execution, not its numbers).
    """

    _step_supports_amp_scaling = False
    _implicit_step = False  # see _keeps_step
    _own_inputs: tuple[str, ...] = ()  # the rule's step inputs the class makes (AdaHessian, Sophia)

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        factory: Callable[..., ao.Optimizer] | str,
        *,
        compile: bool = False,
        **hparams: Any,
    ):
        self._factory = _resolve_factory(factory)
        wrapper = next((e for e in ao.registry().values() if e.factory is self._factory and e.wraps), None)
        if wrapper is not None:
            raise TypeError(
                f"TorchOptimizer cannot run {wrapper.name}: it wraps a base optimizer; use "
                f"agnostic_optim.adapters.torch.{CLASS_FOR_FACTORY[wrapper.name].__name__}"
            )
        defaults = _factory_defaults(self._factory)
        self._factory_options = tuple(defaults.items())  # (read every step: kept, not re-inspected)
        for flag in _TORCH_EXECUTION_FLAGS:
            hparams.pop(flag, None)
        if hparams.pop("differentiable", False):
            raise NotImplementedError("differentiable=True (autograd through the step) is not supported")
        unknown = set(hparams) - set(defaults) - set(_PRECISION_OPTIONS)
        if unknown:
            raise TypeError(f"{self._factory.__name__} got unexpected hyperparameters {sorted(unknown)}")
        defaults.update(state_dtype=None, compensation=None)
        defaults.update(hparams)
        # Arguments whose default depends on the convention get their value now, so that every
        # group holds numbers (as torch.optim's groups do).
        optax_form = defaults.get("convention") == "optax"
        for name, (torch_default, optax_default) in getattr(self._factory, "convention_defaults", {}).items():
            if defaults[name] is None:
                defaults[name] = optax_default if optax_form else torch_default
        self._compile = compile
        self._rules: dict[tuple, ao.Optimizer] = {}
        self._compiled: dict[int, Callable[..., Any]] = {}
        self._hparam_tensors: dict[tuple, dict[str, Any]] = {}
        self._plans: dict[int, _Plan] = {}
        super().__init__(params, defaults)
        for group in self.param_groups:
            self._optimizer_for(group)  # validate every group's hyperparameters now

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_factory": self._factory, "_compile": self._compile}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """A copy (``copy.deepcopy``, pickle) rebuilds its caches: rules, compiled steps, plans.
        ``load_state_dict`` also comes through here: it keeps the rules and compiled steps, so a
        resumed run does not compile again."""
        super().__setstate__(state)
        self._factory_options = tuple(_factory_defaults(self._factory).items())
        if not hasattr(self, "_rules"):  # a copy being made
            self._rules, self._compiled = {}, {}
        self._hparam_tensors, self._plans = {}, {}

    # ---------------------------------------------------------------- building the core rule

    def _options(self, group: dict[str, Any]) -> dict[str, Any]:
        return {name: group.get(name, default) for name, default in self._factory_options}

    def _optimizer_for(self, group: dict[str, Any]) -> ao.Optimizer:
        options = self._options(group)
        precision = {k: group.get(k) for k in _PRECISION_OPTIONS}
        key = (_structure_key(options), tuple(precision.items()))
        if key not in self._rules:
            opt = self._factory(**{k: _plain(v) for k, v in options.items()})
            if opt.rule is None or set(opt.inputs) - set(self._own_inputs):
                name = getattr(self._factory, "__name__", repr(self._factory))
                special = CLASS_FOR_FACTORY.get(name)
                use = f": use agnostic_optim.adapters.torch.{special.__name__}" if special else ""
                what = f"takes step inputs {list(opt.inputs)}" if opt.inputs else "is not an update rule"
                raise TypeError(f"TorchOptimizer cannot run {name}: it {what}{use}")
            if any(v is not None for v in precision.values()):
                opt = ao.mixed_precision(opt, **precision)
            self._rules[key] = opt
        return self._rules[key]

    def _hparams(
        self, group: dict[str, Any], rule: engine.Rule, like: torch.Tensor
    ) -> tuple[dict[str, Any], dict[str, Any], bool]:
        """(constant, scheduled) hyperparameters as 0-d float64 tensors on ``like``'s device, and
        whether they are all this optimizer's (no tensor given in the group).

        The tensors are cached per group and refilled in place when a value changes, so CUDA
        sees no host copies. Scheduled entries only carry dtype and device: the core evaluates
        the schedule on the step count.
        """
        dtype = _backend.scalar_dtype(XP, like)
        cache = self._hparam_tensors.setdefault((id(group), like.device), {})
        values, scheduled = {}, {}
        for name, spec in rule.hparams.items():
            if is_scheduled(spec):
                scheduled[name] = _placeholder(spec, dtype, like.device)
                continue
            value = group[name]
            if isinstance(value, (tuple, list)):
                values[name] = tuple(
                    _scalar_tensor(cache, f"{name}[{i}]", v, dtype, like) for i, v in enumerate(value)
                )
            else:
                values[name] = _scalar_tensor(cache, name, value, dtype, like)
        # numbers (and tuples of them) only: a tensor or a list can change with no dict change
        own = all(
            _is_number(v) or (isinstance(v, tuple) and all(map(_is_number, v)))
            for v in map(group.get, values)
        )
        return values, scheduled, own

    # ---------------------------------------------------------------- the step

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; returns ``closure()``'s loss when a closure is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # grad mode off, as ``@torch.no_grad()`` would set it, without the decorator's objects
        # (~15 us a step once the step's kernels have streamed the caches out, measured)
        grad_enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            self._step_groups(self._step_inputs())
        finally:
            torch._C._set_grad_enabled(grad_enabled)
        return loss

    def _step_groups(self, inputs: dict[str, dict[int, torch.Tensor]]) -> None:
        """Step every param group (grad mode off), with the rule's step inputs this step."""
        for group in self.param_groups:
            params: list[torch.Tensor] = group["params"]
            grads = list(map(_GRAD, params))
            present = list(map(operator.is_not, grads, itertools.repeat(None)))
            if not all(present):
                params = list(itertools.compress(params, present))
                grads = list(itertools.compress(grads, present))
            if not params:
                continue
            if not self._compile:  # (the compiled step checks where its graph does not take them)
                self._refuse_sparse(grads)
            plan = self._plans.get(id(group))
            # a group as the plan last saw it (its dict's version tag) keeps its options: its rule
            version = _dict_version(group) if _dict_version is not None else None
            reuse = plan is not None and version is not None and plan.group_version == version
            rule = plan.rule if reuse else self._optimizer_for(group).rule
            rebuilt = plan is None or not plan.matches(group, rule, params, self.state)
            if rebuilt:
                if self._compile:  # (before the new plan creates any state)
                    self._refuse_sparse(grads)
                plan = self._plan(group, rule, params)
            for subset in plan.subsets:
                subset_grads = grads if len(plan.subsets) == 1 else list(map(_GRAD, subset.params))
                self._step_subset(group, version, rule, subset, inputs, subset_grads)
            if rebuilt and not self._keeps_step(rule):  # (a matching plan saw no ``step`` left)
                for s in plan.states:
                    s.pop("step", None)
                for subset in plan.subsets:
                    subset.steps, subset.counters = [], None
                if plan.cacheable:
                    plan.pointers = plan._pointers()  # without the dropped counters
            # (the compiled step leaves the state dicts as they were)
            # (a list among the options, a mask or betas, can change in place with no dict change;
            # a reused rule was recorded with the group's version: its options were all fixed)
            fixed = reuse or not any(
                isinstance(group.get(name), (list, dict, set)) for name, _ in self._factory_options
            )
            plan.record_history(version if fixed else None, dicts=rebuilt or not self._compile)

    def _refuse_sparse(self, grads: list[torch.Tensor]) -> None:
        if any(map(_IS_SPARSE, grads)):
            raise RuntimeError(
                f"{type(self).__name__} does not support sparse gradients; "
                "use torch.optim.SparseAdam or densify the gradient"
            )

    def _step_inputs(self) -> dict[str, dict[int, torch.Tensor]]:
        """The rule's per-param step inputs this step (``hessian_diag``...): name -> id(param) ->
        tensor. Plain optimizers take none; AdaHessian makes its Hessian estimates from autograd."""
        return {}

    def _plan(self, group: dict[str, Any], rule: engine.Rule, params: list[torch.Tensor]) -> _Plan:
        """Initialise missing state and lay the group's step out (kept while it matches)."""
        states = [self.state[p] for p in params]
        fresh = [(p, s) for p, s in zip(params, states) if not s]
        for (p, s), step in zip(fresh, _shared_counters([0.0] * len(fresh))):
            s.update(_initial_param_state(rule, p, step))
        names = engine.buffer_names(rule)
        flag_of = _mask_flags(rule, group["params"])
        subsets = []
        for members in _by_history(params, self.state, rule):
            member_states = [self.state[p] for p in members]
            buffers = {}
            for name in names:
                buffers[name] = [_storage(rule, p, name, s[name]) for p, s in zip(members, member_states)]
                for s, buffer in zip(member_states, buffers[name]):
                    s[name] = buffer  # a converted checkpoint buffer replaces the loaded one
            layout = groups = None
            flags = None if flag_of is None else [flag_of[id(p)] for p in members]
            if not self._compile:
                size = CHUNK_ELEMENTS if rule.elementwise and rule.mask is None else 0
                layout = chunking.chunk_layout(XP, members, buffers, size)
                groups = engine.leaf_groups(layout.params, layout.buffers, flags, _batching(rule))
            count = _step_count(member_states[0])
            subsets.append(_Subset(members, member_states, buffers, count, layout, groups, flags))
        plan = _Plan(group, rule, params, self.state, subsets, self._compile)
        if plan.cacheable:
            self._plans[id(group)] = plan
        return plan

    def _keeps_step(self, rule: engine.Rule) -> bool:
        """Whether per-param state holds ``step``. torch.optim.SGD keeps none (a momentum buffer
        is present from the second step on); ours does the same unless a schedule needs the count."""
        return not self._implicit_step or bool(rule.scalars) or any(map(is_scheduled, rule.hparams.values()))

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's ``state_dict``, with each ``step`` counter its own tensor: the state's are
        elements of one shared tensor, which ``pickle`` would copy whole for every param
        (``torch.distributed``'s object collectives pickle). Other tensors are the live state,
        as in torch.optim."""
        packed = super().state_dict()
        for index, entries in packed["state"].items():
            step = entries.get("step")
            if isinstance(step, torch.Tensor) and step._base is not None:
                packed["state"][index] = {**entries, "step": step.clone()}
        return packed

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch.optim's ``load_state_dict``; in groups with a ``state_dtype`` or compensation the
        floating state keeps its saved dtype (torch would cast it to the param's, e.g. bf16).

        The ``step`` counters' values are copied into the group's shared counter tensor (see
        :func:`_shared_counters`): unlike torch.optim, the optimizer does not keep the given
        dict's counter tensors, so a dict loaded in memory and still stepped elsewhere does not
        advance this optimizer's counts. Every other tensor is taken as torch.optim takes it."""
        super().load_state_dict(state_dict)
        self._plans.clear()
        for group in self.param_groups:  # the loaded counters' values move into one shared tensor
            states = [self.state[p] for p in group["params"] if "step" in self.state.get(p, {})]
            steps = [s["step"] for s in states]
            if steps and all(_is_host_counter(t) and t.dtype == steps[0].dtype for t in steps):
                values = torch.stack(steps).tolist()
                for s, step in zip(states, _shared_counters(values, steps[0].dtype, steps[0].device)):
                    s["step"] = step
        saved = state_dict["state"]
        for group, saved_group in zip(self.param_groups, state_dict["param_groups"]):
            if group.get("state_dtype") is None and group.get("compensation") is None:
                continue
            for p, index in zip(group["params"], saved_group["params"]):
                for key, value in saved.get(index, {}).items():
                    if key != "step" and isinstance(value, torch.Tensor) and value.is_floating_point():
                        self.state[p][key] = value.to(device=p.device, copy=True)

    def _step_subset(
        self,
        group: dict[str, Any],
        version: int | None,
        rule: engine.Rule,
        subset: _Subset,
        inputs: dict[str, dict[int, torch.Tensor]],
        grads: list[torch.Tensor],
    ) -> None:
        """One core step for params that share a step count. ``version``: the group dict's
        version tag (None: unknown)."""
        params, states = subset.params, subset.states
        leaf_inputs = _subset_inputs(rule, params, inputs)
        if version is not None and subset.hparams_version == version:
            hparams, scheduled = subset.hparams  # the cached tensors still hold the group's values
        else:
            hparams, scheduled, cacheable = self._hparams(group, rule, params[0])
            subset.hparams, subset.hparams_version = (hparams, scheduled), version if cacheable else None
        # torch.optim's per-param step counters are incremented by the compiled step too, through
        # their shared base (not torch.optim.SGD's, which are dropped after the first step: see
        # _keeps_step)
        steps_done = self._compile and subset.counters is not None and self._keeps_step(rule)
        if self._compile:
            self._compiled_subset_step(rule, subset, hparams, scheduled, grads, leaf_inputs, steps_done)
        else:
            self._eager_subset_step(rule, subset, hparams, scheduled, grads, leaf_inputs)
        if subset.steps is not None:
            if subset.counters is not None and not steps_done:
                subset.counters.add_(1)
            elif subset.steps and not steps_done:
                torch._foreach_add_(subset.steps, 1)
        else:
            _increment_steps(states)
        subset.count += 1

    def _eager_subset_step(
        self,
        rule: engine.Rule,
        subset: _Subset,
        hparams: dict[str, Any],
        scheduled: dict[str, Any],
        grads: list[torch.Tensor],
        leaf_inputs: dict[str, list[torch.Tensor]],
    ) -> None:
        """The scalars eagerly, the arrays on ``_foreach`` kernels over the plan's chunks."""
        params, states, layout = subset.params, subset.states, subset.layout
        first = params[0]
        count = torch.tensor(subset.count, dtype=torch.int32, device=first.device)
        dtype = _backend.scalar_dtype(XP, first)  # (the hyperparameters' dtype, as _hparams makes them)
        running = {k: states[0][k].to(device=first.device, dtype=dtype) for k in rule.scalars}
        core_state = engine.OptimizerState(count, hparams, scheduled, subset.buffers, running)
        step = engine.prepare_step(rule, core_state, XP, grads, params, leaf_inputs)
        engine.update_leaves(
            rule,
            XP,
            engine.ScalarCaster(XP, step.values).for_leaf,
            layout.cut_grads(XP, grads),
            layout.params,
            layout.buffers,
            {name: layout.cut_grads(XP, values) for name, values in leaf_inputs.items()},
            flags=subset.flags,
            batching=_batching(rule),
            in_place=True,
            groups=subset.groups,
        )
        for k, v in step.running.items():  # (no pass over the states for rules without any)
            for s in states:
                # each param its own tensor: torch.optim updates loaded state in place
                s[k] = v.to(device=s[k].device, dtype=s[k].dtype, copy=True)

    def _compiled_subset_step(
        self,
        rule: engine.Rule,
        subset: _Subset,
        hparams: dict[str, Any],
        scheduled: dict[str, Any],
        grads: list[torch.Tensor],
        leaf_inputs: dict[str, list[torch.Tensor]],
        steps_done: bool,
    ) -> None:
        """The whole step, scalars included, as compiled graphs (see :meth:`_compiled_step`)."""
        params, states, buffers = subset.params, subset.states, subset.buffers
        if subset.count_tensor is None:
            subset.count_tensor = torch.tensor(subset.count, dtype=torch.int32, device=params[0].device)
            subset.compute_dtypes = tuple(dict.fromkeys(rule.precision.compute_dtype(XP, p) for p in params))
        counters = [subset.counters] if steps_done else []
        # Inductor passes a 0-d float64 CPU input to its kernels by value (torch 2.13): a write
        # to one is lost. The running scalars are read and written through 1-element views.
        running = {k: [s[k].view(1) for s in states] for k in rule.scalars}
        written = [
            subset.count_tensor,
            *params,
            *itertools.chain(*buffers.values()),
            *counters,
            *itertools.chain(*running.values()),
        ]
        flat = _step_inputs_flat(hparams, scheduled, grads, leaf_inputs, written)
        if subset.graph is not None and subset.graph.accepts(flat):
            # (a gradient in its param's memory too: graphs compiled on separate memory read each
            # element before they write it, as torch.optim's step does; tested with SGD, AdamW,
            # LAMB and Adan)
            subset.graph(flat)
            return
        self._refuse_sparse(grads)
        if _grad_in_param_memory(params, grads):  # compiled on copies (see there)
            grads = [g.clone() for g in grads]
            flat = _step_inputs_flat(hparams, scheduled, grads, leaf_inputs, written)
        scalar_args = (
            subset.count_tensor,
            hparams,
            scheduled,
            running,
            params,
            grads,
            leaf_inputs,
            counters,
            subset.compute_dtypes,
        )
        update_args = (subset.compute_dtypes, params, grads, buffers, subset.flags, leaf_inputs)
        subset.graph = self._compiled_step(rule).run(scalar_args, update_args, flat, written)

    def _compiled_step(self, rule: engine.Rule) -> CompiledStep:
        """A step of ``rule`` as two functions for ``torch.compile``: the float64 scalar
        arithmetic (with the running scalars and step counters it writes in place), returning the
        scalars cast to each compute dtype and stacked into one tensor per dtype; then
        ``update_leaves`` reading them, writing params and buffers in place."""
        if id(rule) not in self._compiled:

            def scalars(
                count: torch.Tensor,
                hparams: dict,
                scheduled: dict,
                running: dict,
                params: list,
                grads: list,
                leaf_inputs: dict,
                counters: list,
                dtypes: tuple,
            ) -> tuple[tuple[torch.Tensor, ...], dict]:
                scalar_dtype, device = _backend.scalar_dtype(XP, params[0]), params[0].device
                before = {
                    k: views[0][0].to(device=device, dtype=scalar_dtype) for k, views in running.items()
                }
                core_state = engine.OptimizerState(count, hparams, scheduled, {}, before)
                prepared = engine.prepare_step(rule, core_state, XP, grads, params, leaf_inputs)
                for name, views in running.items():
                    for view in views:
                        view.copy_(prepared.running[name])
                count.add_(1)
                for counter in counters:
                    counter.add_(1)
                tensors = [v for v in _leaves(prepared.values) if isinstance(v, torch.Tensor)]
                vectors = (
                    tuple(torch.stack([t.to(dtype) for t in tensors]) for dtype in dtypes) if tensors else ()
                )
                return vectors, _scalar_layout(prepared.values)

            def update(
                vectors: tuple,
                layout: dict,
                dtypes: tuple,
                params: list,
                grads: list,
                buffers: dict,
                flags: list | None,
                leaf_inputs: dict,
            ) -> None:
                cast = {
                    dtype: _read_scalars(layout, vectors[i] if vectors else None)
                    for i, dtype in enumerate(dtypes)
                }
                outputs, new_buffers = engine.update_leaves(
                    rule, XP, lambda leaf, dtype: cast[dtype], grads, params, buffers, leaf_inputs, flags
                )
                for p, new in zip(params, outputs):
                    p.copy_(new)
                for name, values in new_buffers.items():
                    for buffer, new in zip(buffers[name], values):
                        buffer.copy_(new)

            def fall_back(reason: str) -> None:
                warnings.warn(
                    f"torch.compile failed on {rule.name}'s step ({reason}); it runs eagerly, leaf by leaf",
                    UserWarning,
                    stacklevel=_outside_frames(),
                )

            self._compiled[id(rule)] = CompiledStep(self, scalars, update, fall_back)
        return self._compiled[id(rule)]


def _mask_flags(rule: engine.Rule, group_params: list[torch.Tensor]) -> dict[int, bool] | None:
    """The rule's ``mask`` resolved over the group's params as the functional API resolves it
    over a sequence of leaves (a list or tuple of bools, or ``mask(path, param)`` with the
    param's index as its path, ``(i,)``): id(param) -> flag, or None without a mask."""
    if rule.mask is None:
        return None
    like = tuple(group_params) if isinstance(rule.mask, tuple) else list(group_params)
    return dict(zip(map(id, group_params), engine.resolve_mask(rule.mask, like)))


def _grad_in_param_memory(params: list[torch.Tensor], grads: list[torch.Tensor]) -> bool:
    """Whether a gradient starts where a param does (``p.grad = p.detach()``). AOT autograd
    compiles such inputs as views of one base, and Dynamo's guards (torch 2.13) do not tell
    them from separate memory: a graph compiled on them would run later steps on separate
    memory wrongly (also read back from Inductor's cache). A step that goes through Dynamo
    with such a gradient runs on copies of the gradients instead."""
    if not all(type(t) in _PLAIN_TENSORS for t in itertools.chain(params, grads)):
        return False  # (DTensor: no data pointer)
    starts = set(map(torch.Tensor.data_ptr, params)) - {0}  # (0: empty tensors)
    return not starts.isdisjoint(map(torch.Tensor.data_ptr, grads))


def _step_inputs_flat(
    hparams: dict[str, Any],
    scheduled: dict[str, Any],
    grads: list[torch.Tensor],
    leaf_inputs: dict[str, list[torch.Tensor]],
    written: list[torch.Tensor],
) -> list[Any]:
    """Every tensor and Python value a compiled step takes, in one list (see ``GraphCall``)."""
    return [*_leaves(hparams, scheduled), *grads, *itertools.chain(*leaf_inputs.values()), *written]


def _subset_inputs(
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


def _leaves(*mappings: dict[str, Any]) -> list[Any]:
    """The values of ``mappings``, in order, tuples flattened."""
    return [leaf for mapping in mappings for value in mapping.values() for leaf in _flat_value(value)]


def _flat_value(value: Any) -> list[Any]:
    return [leaf for v in value for leaf in _flat_value(v)] if isinstance(value, tuple) else [value]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float))


def _scalar_layout(values: dict[str, Any]) -> dict[str, Any]:
    """Where each of ``values``' tensors sits among its :func:`_leaves` (``("at", index)``), and
    the Python values it holds (``("value", value)``), nested as ``values`` is."""
    tensors = 0

    def place(value: Any) -> Any:
        nonlocal tensors
        if isinstance(value, tuple):
            return tuple(map(place, value))
        if not isinstance(value, torch.Tensor):
            return ("value", value)
        tensors += 1
        return ("at", tensors - 1)

    return {k: place(v) for k, v in values.items()}


def _read_scalars(layout: dict[str, Any], vector: torch.Tensor | None) -> engine.Scalars:
    """The step's scalars from their stacked ``vector`` (see :func:`_scalar_layout`)."""

    def read(entry: Any) -> Any:
        if not entry or isinstance(entry[0], tuple):  # a tuple of scalars
            return tuple(map(read, entry))
        kind, value = entry
        return vector[value] if kind == "at" else value

    return engine.Scalars({k: read(v) for k, v in layout.items()})


_INTERNAL_DIRS = tuple(
    os.path.dirname(module.__file__) + os.sep for module in (torch, ao, sys.modules[__name__])
)


def _outside_frames() -> int:
    """The ``stacklevel`` of the first caller outside torch and agnostic_optim (the user's
    ``opt.step()``, whatever wraps it: a scheduler, GradScaler, SAM)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
        frame, level = frame.f_back, level + 1
    return level


def _placeholder(spec: Any, dtype: torch.dtype, device: torch.device) -> Any:
    """Zeros shaped like a scheduled hyperparameter (a scalar or a tuple of scalars)."""
    if isinstance(spec, (tuple, list)):
        return tuple(_placeholder(v, dtype, device) for v in spec)
    return torch.zeros((), dtype=dtype, device=device)


def _plain(value: Any) -> Any:
    """A Python number for 0-d tensors (factories validate numbers), else the value."""
    if isinstance(value, torch.Tensor) and value.ndim == 0:
        return value.item()
    if isinstance(value, (tuple, list)):
        return tuple(_plain(v) for v in value)
    return value


def _scalar_tensor(cache: dict[str, Any], key: str, value: Any, dtype: torch.dtype, like: torch.Tensor):
    if isinstance(value, torch.Tensor):
        return value.detach().to(dtype=dtype, device=like.device)
    entry = cache.get(key)
    if entry is None:
        entry = cache[key] = [torch.tensor(float(value), dtype=dtype, device=like.device), float(value)]
    elif entry[1] != value:
        entry[0].fill_(float(value))
        entry[1] = float(value)
    return entry[0]


def _initial_param_state(rule: engine.Rule, p: torch.Tensor, step: torch.Tensor) -> dict[str, Any]:
    """torch-style per-parameter state: ``step`` (from :func:`_shared_counters`) + buffers."""
    state = engine.init_rule_state(rule, [p.detach()])
    # running scalars (NAdam's mu_product) keep the core's float64, which is more precise than
    # torch's default-dtype copy and loads either way
    per_param = {"step": step}
    for name, leaves in state.buffers.items():
        per_param[name] = leaves[0]
    per_param.update(state.scalars)
    return per_param


def _storage(rule: engine.Rule, p: torch.Tensor, name: str, buffer: torch.Tensor) -> torch.Tensor:
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


def _step_dtype() -> torch.dtype:
    """torch.optim's ``_get_scalar_dtype()``: float64 under a float64 default dtype, else float32."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _shared_counters(
    values: list[float], dtype: torch.dtype | None = None, device: torch.device | None = None
) -> list[torch.Tensor]:
    """Step counters as torch.optim keeps them (0-d float tensors, one per param) that are the
    elements of one 1-D tensor, so a step increments and checks a group's in one call each
    instead of one kernel per param. Each is still its own tensor to torch (``torch.save``,
    torch.optim loading it); writes to one never reach another. Fresh ones follow the default
    device, as torch.optim's do."""
    if not values:
        return []
    return list(torch.tensor(values, dtype=dtype or _step_dtype(), device=device).unbind())


def _is_host_counter(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.ndim == 0 and t.device.type == "cpu" and t.is_floating_point()


def _counters_base(steps: list[torch.Tensor]) -> torch.Tensor | None:
    """The 1-D tensor whose elements ``steps`` are, in order (from :func:`_shared_counters`)."""
    base = steps[0]._base
    if (
        base is None
        or base.ndim != 1
        or base.shape[0] != len(steps)
        or base.stride(0) != 1
        or not all(_is_host_counter(t) and t._base is base for t in steps)
    ):
        return None
    size, pointer = base.element_size(), base.data_ptr()
    if [t.data_ptr() for t in steps] != [pointer + i * size for i in range(len(steps))]:
        return None
    return base


def _increment_steps(states: list[dict[str, Any]]) -> None:
    """``step += 1`` in every state, in place as torch.optim does (one batched add)."""
    states = [s for s in states if "step" in s]  # torch.optim.SGD's state has none
    steps = [s["step"] for s in states]
    if all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in steps):
        if steps:
            torch._foreach_add_(steps, 1)
        return
    for s in states:  # an older checkpoint's step: a number or an integer tensor
        s["step"] = torch.tensor(_step_count(s) + 1.0, dtype=_step_dtype())


def _step_count(state: dict[str, Any]) -> int:
    """A param's completed steps; a state without ``step`` is torch.optim.SGD's (see _keeps_step)."""
    return int(state["step"]) if "step" in state else 1


def _by_history(params: list[torch.Tensor], state: dict, rule: engine.Rule) -> list[list[torch.Tensor]]:
    """Params grouped by step count (and running scalars): torch keeps one ``step`` per param.

    The per-param values are read in one batched host transfer where they are CPU tensors."""
    states = [state[p] for p in params]
    columns = [_history_column(states, "step")] + [_history_column(states, k) for k in rule.scalars]
    groups: dict[tuple, list[torch.Tensor]] = {}
    for p, key in zip(params, zip(*columns)):
        groups.setdefault(key, []).append(p)
    return list(groups.values())


def _history_column(states: list[dict[str, Any]], key: str) -> list[float]:
    """``float(state[key])`` for every state (a missing ``step``: see :func:`_step_count`)."""
    values = [s.get(key) for s in states]
    if all(isinstance(v, torch.Tensor) and v.ndim == 0 and v.device.type == "cpu" for v in values):
        return torch.stack(values).tolist() if values else []  # stack promotes mixed dtypes
    return [float(_step_count(s)) if key == "step" else float(s[key]) for s in states]


# ---------------------------------------------------------------- named classes


def _named_class(
    name: str,
    factory: Callable[..., ao.Optimizer],
    positional: tuple[str, ...] | None = None,
    implicit_step: bool = False,
) -> type[TorchOptimizer]:
    """A TorchOptimizer subclass for one factory, taking its hyperparameters positionally in
    ``positional`` order (torch's order for torch's classes) and by keyword."""
    order = positional or tuple(_factory_defaults(factory))

    def __init__(self, params, *args: Any, compile: bool = False, **hparams: Any) -> None:
        if len(args) > len(order):
            raise TypeError(f"{name} takes at most {len(order)} positional hyperparameters")
        for key, value in zip(order, args):
            if key in hparams:
                raise TypeError(f"{name} got multiple values for argument {key!r}")
            hparams[key] = value
        TorchOptimizer.__init__(self, params, factory, compile=compile, **hparams)

    doc = (
        f"``torch.optim.Optimizer`` running ``agnostic_optim.{factory.__name__}`` "
        f"(positional hyperparameters: {', '.join(order)}).\n\n{inspect.getdoc(factory)}"
    )
    namespace = {
        "__init__": __init__,
        "__doc__": doc,
        "__module__": __name__,
        "_implicit_step": implicit_step,
    }
    return type(name, (TorchOptimizer,), namespace)


def _torch_order(cls: type[torch.optim.Optimizer]) -> tuple[str, ...]:
    """torch.optim's positional hyperparameters for ``cls`` (execution flags such as ``foreach``
    included: they are accepted and ignored like their keyword forms)."""
    parameters = list(inspect.signature(cls).parameters.values())[1:]  # after ``params``
    return tuple(p.name for p in parameters if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD)


SGD = _named_class("SGD", ao.sgd, _torch_order(torch.optim.SGD), implicit_step=True)
Adagrad = _named_class("Adagrad", ao.adagrad, _torch_order(torch.optim.Adagrad))
RMSprop = _named_class("RMSprop", ao.rmsprop, _torch_order(torch.optim.RMSprop))
Adam = _named_class("Adam", ao.adam, _torch_order(torch.optim.Adam))
AdamW = _named_class("AdamW", ao.adamw, _torch_order(torch.optim.AdamW))
AMSGrad = _named_class("AMSGrad", ao.amsgrad)
RAdam = _named_class("RAdam", ao.radam, _torch_order(torch.optim.RAdam))
NAdam = _named_class("NAdam", ao.nadam, _torch_order(torch.optim.NAdam))
Adan = _named_class("Adan", ao.adan)
Lion = _named_class("Lion", ao.lion)
LARS = _named_class("LARS", ao.lars)
LAMB = _named_class("LAMB", ao.lamb)
Shampoo = _named_class("Shampoo", ao.shampoo)


class AdaHessian(_named_class("AdaHessian", ao.adahessian)):
    __doc__ = (
        "``torch.optim.Optimizer`` running ``agnostic_optim.adahessian``; each step draws a "
        "Hutchinson probe and passes ``z ⊙ Hz`` as ``hessian_diag``, as the official AdaHessian "
        "does. The gradients must carry their graph: call ``loss.backward(create_graph=True)`` "
        "before ``step()``. Probes come from torch's global generator (``torch.manual_seed``).\n\n"
        + inspect.getdoc(ao.adahessian)
    )

    _own_inputs = ("hessian_diag",)

    def _step_inputs(self) -> dict[str, dict[int, torch.Tensor]]:
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        curved = [p for p in params if p.grad.grad_fn is not None]
        if params and not curved:
            raise RuntimeError(
                "AdaHessian needs Hessian-vector products of the loss: compute the gradients with "
                "loss.backward(create_graph=True) before step()"
            )
        if not curved:
            return {}
        probes = [torch.randint_like(p, 2).mul_(2).sub_(1) for p in curved]  # Rademacher ±1
        with torch.enable_grad():
            products = torch.autograd.grad(
                [p.grad for p in curved], curved, grad_outputs=probes, allow_unused=True
            )
        diag = {id(p): torch.zeros_like(p) for p in params}  # a gradient without a graph: H = 0
        for p, z, hz in zip(curved, probes, products):
            if hz is not None:
                diag[id(p)] = z.mul_(hz)
        return {"hessian_diag": diag}


class Sophia(_named_class("Sophia", ao.sophia)):
    __doc__ = (
        "``torch.optim.Optimizer`` running ``agnostic_optim.sophia``. As with the official "
        "SophiaG, call ``update_hessian()`` every k steps right after back-propagating a loss on "
        "labels sampled from the model (the Gauss-Newton-Bartlett estimator): it folds the "
        "gradients' squares ``ĝ ⊙ ĝ`` into the ``hessian`` EMA of every param with a gradient, "
        "there and then (so a checkpoint taken before the next step holds it).\n\n"
        + inspect.getdoc(ao.sophia)
    )

    _own_inputs = ("hessian_diag",)  # (folded in by update_hessian)

    @torch.no_grad()
    def update_hessian(self) -> None:
        """``h <- β2 h + (1 - β2) ĝ ⊙ ĝ`` for every param with a gradient (SophiaG's
        ``update_hessian``; a param without state gets it, as there)."""
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            rule = self._optimizer_for(group).rule
            for p in params:
                state = self.state[p]
                if not state:
                    state.update(_initial_param_state(rule, p, _shared_counters([0.0])[0]))
                beta2 = group["betas"][1]
                if is_scheduled(beta2):  # its value at the steps taken, as the next step's fold-in
                    beta2 = beta2(torch.tensor(_step_count(state), dtype=torch.int32))
                beta2 = torch.as_tensor(beta2, dtype=torch.float64)
                dtype = rule.precision.compute_dtype(XP, p)
                g = p.grad.to(dtype)
                hessian = state["hessian"]
                decay, weight = (x.to(device=p.device, dtype=dtype) for x in (beta2, 1 - beta2))
                hessian.copy_(blocks.ema(hessian.to(dtype), g * g, decay, weight))


# The class of every registered factory (tests check that none is missing).
CLASS_FOR_FACTORY: dict[str, type[TorchOptimizer]] = {
    "sgd": SGD,
    "adagrad": Adagrad,
    "rmsprop": RMSprop,
    "adam": Adam,
    "adamw": AdamW,
    "amsgrad": AMSGrad,
    "radam": RAdam,
    "nadam": NAdam,
    "adan": Adan,
    "lion": Lion,
    "lars": LARS,
    "lamb": LAMB,
    "adahessian": AdaHessian,
    "sophia": Sophia,
    "shampoo": Shampoo,
    "sam": SAM,
    "lookahead": Lookahead,
    "kfac": KFAC,
    "lbfgs": LBFGS,
}
