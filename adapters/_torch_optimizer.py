"""The torch adapter's front: :class:`TorchOptimizer`, a ``torch.optim.Optimizer`` over any rule.

The front does what torch.optim's base class and constructors do -- param groups, options and
their validation, the hyperparameters of each group as 0-d tensors, ``state_dict`` and
``load_state_dict`` in torch.optim's format -- and hands each group's step to an executor
through the step plan (``_torch_plan``). :meth:`TorchOptimizer._executor` is the one dispatch
point, as torch's ``adam()`` picks its for-loop, foreach or fused implementation:

* the eager executor (``_torch_eager``, the default): ``_foreach`` kernels, no compilation;
* the compiled executor (``_torch_compiled``, ``compile=True``): the whole step as two graphs
  compiled by ``torch.compile``; where the running torch lacks a private API it needs
  (``_torch_private``), the eager executor runs instead, after one warning.

Hyperparameters are read from ``group[...]`` every step, so ``torch.optim.lr_scheduler`` (and
OneCycleLR cycling ``betas``/``momentum``) and manual edits just work.
"""

from __future__ import annotations

import inspect
import itertools
import math
import operator
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

import agnostic_optim as ao
from agnostic_optim import checkpoint, engine
from agnostic_optim.adapters._torch_compiled import CompiledExecutor
from agnostic_optim.adapters._torch_differentiable import DifferentiableExecutor
from agnostic_optim.adapters._torch_distributed import GatheredExecutor, is_sharded
from agnostic_optim.adapters._torch_eager import EagerExecutor
from agnostic_optim.adapters._torch_plan import (
    XP,
    Executor,
    Plan,
    Subset,
    build_plan,
    initial_param_state,
    is_host_counter,
    outside_frames,
    refuse_complex,
    refuse_sparse,
    shared_counters,
    step_count,
    step_dtype,
    subset_inputs,
)
from agnostic_optim.adapters._torch_private import COMPILED_UNAVAILABLE, dict_version, set_grad_enabled
from agnostic_optim.adapters._torch_sparse import SparseExecutor
from agnostic_optim.hparams import check_value, is_scheduled

# The torch class of every registered factory, by name (``adapters.torch`` defines them; tests
# check that none is missing): torch's names where torch has the optimizer.
CLASS_NAMES = {
    "sgd": "SGD",
    "adagrad": "Adagrad",
    "rmsprop": "RMSprop",
    "adam": "Adam",
    "adamw": "AdamW",
    "amsgrad": "AMSGrad",
    "sparse_adam": "SparseAdam",
    "radam": "RAdam",
    "nadam": "NAdam",
    "adan": "Adan",
    "lion": "Lion",
    "lars": "LARS",
    "lamb": "LAMB",
    "adahessian": "AdaHessian",
    "sophia": "Sophia",
    "shampoo": "Shampoo",
    "sam": "SAM",
    "lookahead": "Lookahead",
    "kfac": "KFAC",
    "lbfgs": "LBFGS",
}

# torch.optim constructor flags that change how torch runs, not what it computes.
TORCH_EXECUTION_FLAGS = ("foreach", "fused", "capturable")
PRECISION_OPTIONS = ("state_dtype", "compensation")
_GRAD, _IS_SPARSE = operator.attrgetter("grad"), operator.attrgetter("is_sparse")
_EXECUTORS: dict[str, Callable[[str], Executor]] = {
    "eager": lambda name: EagerExecutor(),
    "compiled": CompiledExecutor,
    "differentiable": lambda name: DifferentiableExecutor(),
    "sparse": lambda name: SparseExecutor(),
    "gathered": lambda name: GatheredExecutor(),
}
_P = inspect.Parameter


def resolve_factory(factory: Callable[..., ao.Optimizer] | str) -> Callable[..., ao.Optimizer]:
    """A factory, or the factory registered under a name."""
    if isinstance(factory, str):
        entries = ao.registry()
        if factory not in entries:
            raise ValueError(f"unknown optimizer {factory!r}; registered: {sorted(entries)}")
        return entries[factory].factory
    if not callable(factory):
        raise TypeError(f"factory must be an agnostic_optim factory or its name, got {factory!r}")
    return factory


def factory_defaults(factory: Callable[..., Any]) -> dict[str, Any]:
    """A factory's keyword arguments and their defaults (the one place defaults come from)."""
    parameters = inspect.signature(factory).parameters.items()
    return {name: p.default for name, p in parameters if p.default is not inspect.Parameter.empty}


def class_signature(
    factory: Callable[..., Any],
    torch_class: type | None = None,
    *,
    first: str = "params",
    exclude: tuple[str, ...] = (),
    extra: dict[str, Any] | None = None,
) -> inspect.Signature:
    """``(self, <first>, <hyperparameters>, *, <options>, <extra>)`` for a torch class running
    ``factory``: the factory's arguments and defaults (never repeated by hand), positional in
    torch's order where torch has the class, with torch's execution flags (accepted and
    ignored) where torch has them; ``exclude``: factory arguments the class fills itself."""
    defaults = {k: v for k, v in factory_defaults(factory).items() if k not in exclude}
    torch_parameters = list(inspect.signature(torch_class).parameters.values())[1:] if torch_class else []
    positional = [p.name for p in torch_parameters if p.kind is _P.POSITIONAL_OR_KEYWORD] or list(defaults)
    flags = {
        p.name: p.default for p in torch_parameters if p.name in (*TORCH_EXECUTION_FLAGS, "differentiable")
    }
    parameters = [_P("self", _P.POSITIONAL_ONLY), _P(first, _P.POSITIONAL_OR_KEYWORD)]
    parameters += [
        _P(name, _P.POSITIONAL_OR_KEYWORD, default=defaults[name] if name in defaults else flags[name])
        for name in positional
    ]
    keywords = {name: value for name, value in {**defaults, **flags}.items() if name not in positional}
    keywords.update(extra or {})
    parameters += [_P(name, _P.KEYWORD_ONLY, default=value) for name, value in keywords.items()]
    return inspect.Signature(parameters)


def bind_arguments(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict[str, Any]:
    """``signature.bind(*args, **kwargs)`` with its defaults applied, without ``self`` (a
    TypeError names a missing, duplicated or unknown argument, as Python's own call would)."""
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    return {k: v for k, v in bound.arguments.items() if k != "self"}


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
      compile: run the step through ``torch.compile`` (see ``_torch_compiled``): the first step
        of a layout compiles (seconds to minutes on CPU), later ones are fused loops.
      state_dtype, compensation: mixed precision, see :func:`agnostic_optim.mixed_precision`.
      **hparams: the factory's hyperparameters and options; they become the defaults of every
        param group. torch.optim's ``foreach``/``fused``/``capturable`` are accepted and ignored
        (they choose torch's execution, not its numbers).

    LARS/LAMB's ``mask=`` applies per param of a group, resolved as the functional API resolves
    it over the list of the group's params: a list of bools, or ``mask(path, param)`` with
    ``path == (index,)`` (param groups do the same job).
    """

    _step_supports_amp_scaling = False  # (GradScaler unscales and checks the grads first)
    _implicit_step = False  # see _keeps_step
    _own_inputs: tuple[str, ...] = ()  # the rule's step inputs the class makes (AdaHessian, Sophia)
    # entries every group holds whatever a loaded state dict says (torch's AdamW:
    # decoupled_weight_decay=True), and whether state is made at construction (torch's Adagrad)
    _group_constants: dict[str, Any] = {}  # noqa: RUF012 (read only)
    _eager_state = False
    #: Sparse gradients, as torch.optim's class of the same name takes them: "refuse" (most),
    #: "accept" (SGD, Adagrad) or "require" (SparseAdam).
    sparse_gradients = "refuse"

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        factory: Callable[..., ao.Optimizer] | str,
        *,
        compile: bool = False,
        **hparams: Any,
    ):
        self._factory = resolve_factory(factory)
        wrapper = next((e for e in ao.registry().values() if e.factory is self._factory and e.wraps), None)
        if wrapper is not None:
            raise TypeError(
                f"TorchOptimizer cannot run {wrapper.name}: it wraps a base optimizer; use "
                f"agnostic_optim.adapters.torch.{CLASS_NAMES[wrapper.name]}"
            )
        defaults = factory_defaults(self._factory)
        self._factory_options = tuple(defaults.items())  # (read every step: kept, not re-inspected)
        # torch.optim's execution flags are kept in the groups, as torch keeps them; they choose
        # how torch runs, not what it computes (``differentiable`` picks our executor too)
        flags = {flag: hparams.pop(flag) for flag in TORCH_EXECUTION_FLAGS if flag in hparams}
        self._differentiable = bool(hparams.pop("differentiable", False))
        unknown = set(hparams) - set(defaults) - set(PRECISION_OPTIONS)
        if unknown:
            raise TypeError(f"{self._factory.__name__} got unexpected hyperparameters {sorted(unknown)}")
        defaults.update(state_dtype=None, compensation=None)
        defaults.update(hparams)
        defaults.update(flags, differentiable=self._differentiable)
        defaults.update(self._group_constants)
        # Arguments whose default depends on the convention get their value now, so that every
        # group holds numbers (as torch.optim's groups do).
        optax_form = defaults.get("convention") == "optax"
        for name, (torch_default, optax_default) in getattr(self._factory, "convention_defaults", {}).items():
            if defaults[name] is None:
                defaults[name] = optax_default if optax_form else torch_default
        if compile and self._differentiable:
            raise ValueError("compile=True and differentiable=True cannot be used together")
        if compile and COMPILED_UNAVAILABLE is not None:
            warnings.warn(
                f"compile=True runs the eager step: the compiled step needs private torch APIs and "
                f"{COMPILED_UNAVAILABLE} (the numbers are the same)",
                UserWarning,
                stacklevel=outside_frames(),
            )
            compile = False
        self._compile = compile
        self._rules: dict[tuple, ao.Optimizer] = {}
        self._executors: dict[str, Executor] = {}
        self._hparam_tensors: dict[tuple, dict[str, Any]] = {}
        self._plans: dict[int, Plan] = {}
        self._validate(defaults)  # (before ``params`` is read, as torch.optim's constructors do)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch.optim's ``add_param_group``; the group's hyperparameters are checked as the
        constructor checks them, and a group that fails is not added."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._validate(group)
        except BaseException:
            self.param_groups.pop()
            raise
        if self.sparse_gradients == "require":  # (SparseAdam's checks, in torch's words)
            self._refuse_for_sparse_only(group)
        if self._eager_state:  # (as torch.optim.Adagrad makes its state in __init__)
            rule = self._optimizer_for(group).rule
            fresh = [p for p in group["params"] if not self.state.get(p)]
            for p, step in zip(fresh, shared_counters([0.0] * len(fresh))):
                self.state[p].update(initial_param_state(rule, p, step))

    def _check_values(self, group: dict[str, Any]) -> None:
        """A group's hyperparameters, as ``set_hparams`` checks them (a NaN lr, a beta of 1.5
        set between steps); tensors are not read (a host sync)."""
        for name in self._optimizer_for(group).rule.hparams:
            value = group.get(name)
            if value is not None and not is_scheduled(value):
                check_value(name, value)

    def _refuse_for_sparse_only(self, group: dict[str, Any]) -> None:
        index = len(self.param_groups) - 1
        for what, test in (
            ("requires dense parameter tensors", _IS_SPARSE),
            ("does not support complex parameters", torch.Tensor.is_complex),
        ):
            found = [[index, i] for i, p in enumerate(group["params"]) if test(p)]
            if found:
                self.param_groups.pop()
                kind = "Sparse" if test is _IS_SPARSE else "Complex"
                raise ValueError(f"{kind} params at indices {found}: {type(self).__name__} {what}")

    def _validate(self, group: dict[str, Any]) -> None:
        """Raise for hyperparameters the factory refuses, and for tensor-valued ones torch.optim
        refuses (more than one element; a tuple of floats and tensors mixed)."""
        for name, _ in self._factory_options:
            value = group.get(name)
            if isinstance(value, torch.Tensor) and value.numel() != 1:
                raise ValueError(f"Tensor {name} must be 1-element")
            if isinstance(value, (tuple, list)) and len({isinstance(v, torch.Tensor) for v in value}) > 1:
                raise ValueError(f"{name} must be either both floats or both Tensors")
        self._factory(**{k: _plain(v) for k, v in self._options(group).items()})  # (the factory's checks)
        self._optimizer_for(group)

    def __getstate__(self) -> dict[str, Any]:
        return {
            **super().__getstate__(),
            "_factory": self._factory,
            "_compile": self._compile,
            "_differentiable": self._differentiable,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        """A copy (``copy.deepcopy``, pickle) rebuilds its caches: rules, executors, plans.
        ``load_state_dict`` also comes through here: it keeps the rules and executors (their
        compiled steps), so a resumed run does not compile again."""
        if hasattr(self, "_rules") and set(state) == {"state", "param_groups"}:  # load_state_dict's
            self._check_loaded(state["state"], state["param_groups"])  # (before anything changes)
        super().__setstate__(state)
        self._factory_options = tuple(factory_defaults(self._factory).items())
        if not hasattr(self, "_rules"):  # a copy being made
            self._rules, self._executors = {}, {}
        if not hasattr(self, "_differentiable"):  # (pickled before it existed)
            self._differentiable = bool(self.defaults.get("differentiable", False))
        for group in self.param_groups:
            group.update(self._group_constants)
        self._hparam_tensors, self._plans = {}, {}

    def _check_loaded(self, param_state: Mapping[Any, Any], groups: list[dict[str, Any]]) -> None:
        """Raise unless a loaded state suits this optimizer: every group's hyperparameters as
        the constructor checks them, and every param's entries those its rule keeps (a state
        dict of another optimizer is refused), in their shapes, with a finite, non-negative
        ``step``. Runs before ``load_state_dict`` changes anything."""
        name = type(self).__name__
        for g, group in enumerate(groups):
            self._validate(group)
            rule = self._optimizer_for(group).rule
            buffers = set(engine.buffer_names(rule))
            kept = buffers | set(rule.scalars) | {"step"}
            for i, p in enumerate(group["params"]):
                entries = param_state.get(p)
                if not entries:
                    continue
                unknown, missing = set(entries) - kept, buffers - set(entries)
                if unknown or (missing and missing != buffers):
                    raise ValueError(
                        f"{name}.load_state_dict: param {i} of group {g} holds {sorted(entries)}; "
                        f"{rule.name} keeps {sorted(kept)} (a state dict of another optimizer or options?)"
                    )
                for key in buffers & set(entries):
                    shape = rule.buffer_shape(key, tuple(p.shape))
                    value = entries[key]
                    if isinstance(value, torch.Tensor) and tuple(value.shape) != shape:
                        raise ValueError(
                            f"{name}.load_state_dict: {key!r} of param {i} of group {g} has shape "
                            f"{tuple(value.shape)}; the param needs {shape}"
                        )
                step = entries.get("step")
                if step is not None and not (math.isfinite(float(step)) and float(step) >= 0):
                    raise ValueError(f"{name}.load_state_dict: param {i} of group {g} has step {float(step)}")

    # ---------------------------------------------------------------- building the core rule
    # ---------------------------------------------------------------- building the core rule

    def _options(self, group: dict[str, Any]) -> dict[str, Any]:
        return {name: group.get(name, default) for name, default in self._factory_options}

    def _optimizer_for(self, group: dict[str, Any]) -> ao.Optimizer:
        options = self._options(group)
        precision = {k: group.get(k) for k in PRECISION_OPTIONS}
        key = (_structure_key(options), tuple(precision.items()))
        if key not in self._rules:
            opt = self._factory(**{k: _plain(v) for k, v in options.items()})
            if opt.rule is None or set(opt.inputs) - set(self._own_inputs):
                name = getattr(self._factory, "__name__", repr(self._factory))
                special = CLASS_NAMES.get(name)
                use = f": use agnostic_optim.adapters.torch.{special}" if special else ""
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
        dtype = engine.scalar_dtype(XP, like)
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
        # grad mode as torch.optim sets it (on only for ``differentiable=True``), without the
        # decorator's objects (~15 us a step once the kernels have streamed the caches out)
        grad_enabled = torch.is_grad_enabled()
        set_grad_enabled(self._differentiable)
        try:
            self._step_groups(self._step_inputs())
        finally:
            set_grad_enabled(grad_enabled)
        return loss

    def _executor(self, sparse: bool = False, gathered: bool = False) -> Executor:
        """The one dispatch point: the executor that runs a group's step (as torch's ``adam()``
        picks its for-loop, foreach or fused implementation). ``sparse``: the step's gradients
        include sparse ones its rule takes on their support (see :meth:`_sparse_grads`);
        ``gathered``: the rule needs whole arrays and the params are DTensors (FSDP2)."""
        if self._differentiable:
            kind = "differentiable"
        elif gathered:
            kind = "gathered"
        elif sparse:
            kind = "sparse"
        else:
            kind = "compiled" if self._compile else "eager"
        executor = self._executors.get(kind)
        if executor is None:
            executor = self._executors[kind] = _EXECUTORS[kind](type(self).__name__)
        return executor

    def _sparse_grads(self, rule: engine.Rule, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """Sparse gradients as this class takes them, as torch.optim's classes do: refused
        (most), required (SparseAdam), or accepted (SGD, Adagrad): kept sparse where the rule
        may be applied to a gradient's support alone (``Rule.sparse_support``), else densified
        (SGD's momentum and weight decay move every element, as in torch.optim)."""
        name = type(self).__name__
        sparse = any(map(_IS_SPARSE, grads))
        if self.sparse_gradients == "require" and not all(map(_IS_SPARSE, grads)):
            raise RuntimeError(f"{name} does not support dense gradients, please consider Adam instead")
        if not sparse:
            return grads
        if self.sparse_gradients == "refuse" or self._differentiable:
            refuse_sparse(name, grads)
        if rule.sparse_support:
            return grads
        return [g.to_dense() if g.is_sparse else g for g in grads]

    def _step_groups(self, inputs: dict[str, dict[int, torch.Tensor]]) -> None:
        """Step every param group (grad mode as torch.optim sets it), with the rule's step
        inputs this step. Every group is checked before the first one is stepped."""
        steps = []
        for group in self.param_groups:
            params: list[torch.Tensor] = group["params"]
            grads = list(map(_GRAD, params))
            present = list(map(operator.is_not, grads, itertools.repeat(None)))
            if not all(present):
                params = list(itertools.compress(params, present))
                grads = list(itertools.compress(grads, present))
            if not params:
                continue
            plan = self._plans.get(id(group))
            # a group as the plan last saw it (its dict's version tag) keeps its options: its rule
            version = dict_version(group) if dict_version is not None else None
            reuse = plan is not None and version is not None and plan.group_version == version
            if not reuse:  # (a group edited since the last step: its values are checked again)
                self._check_values(group)
            rule = plan.rule if reuse else self._optimizer_for(group).rule
            # (the compiled step checks for sparse gradients where its graph does not take them)
            if not self._compile:
                grads = self._sparse_grads(rule, grads)
            gathered = not rule.batchable and any(map(is_sharded, params))
            executor = self._executor(not self._compile and any(map(_IS_SPARSE, grads)), gathered)
            rebuilt = plan is None or not plan.matches(group, rule, params, self.state, executor)
            if rebuilt:
                if len(set(map(id, params))) != len(params):  # (torch.optim warned at construction)
                    raise ValueError(
                        f"{type(self).__name__}: a param is listed twice in a param group; "
                        "its step would be taken twice"
                    )
                if self._compile:  # (before any state is made)
                    refuse_sparse(type(self).__name__, grads)
                if any(p.is_complex() for p in params):
                    refuse_complex(rule)
            steps.append((group, params, grads, plan, version, reuse, rule, executor, rebuilt))
        for group, params, grads, plan, version, reuse, rule, executor, rebuilt in steps:
            if rebuilt:
                plan = self._plan(group, rule, params, executor)
            for subset in plan.subsets:
                subset_grads = grads if len(plan.subsets) == 1 else list(map(_GRAD, subset.sources))
                if subset_grads is not grads:
                    subset_grads = self._sparse_grads(rule, subset_grads)
                self._step_subset(
                    executor, group, version, rule, subset, inputs, subset.real_grads(subset_grads)
                )
            if rebuilt and not self._keeps_step(rule):  # (a matching plan saw no ``step`` left)
                plan.drop_steps()
            # (the compiled step leaves the state dicts as they were)
            # (a list among the options, a mask or betas, can change in place with no dict change;
            # a reused rule was recorded with the group's version: its options were all fixed)
            fixed = reuse or not any(
                isinstance(group.get(name), (list, dict, set)) for name, _ in self._factory_options
            )
            plan.record_history(version if fixed else None, dicts=rebuilt or not self._compile)

    def _step_inputs(self) -> dict[str, dict[int, torch.Tensor]]:
        """The rule's per-param step inputs this step (``hessian_diag``...): name -> id(param) ->
        tensor. Plain optimizers take none; AdaHessian makes its Hessian estimates from autograd."""
        return {}

    def _plan(
        self, group: dict[str, Any], rule: engine.Rule, params: list[torch.Tensor], executor: Executor
    ) -> Plan:
        """Initialise missing state and lay the group's step out (kept while it matches)."""
        plan = build_plan(group, rule, params, self.state, executor)
        if plan.cacheable:
            self._plans[id(group)] = plan
        return plan

    def _keeps_step(self, rule: engine.Rule) -> bool:
        """Whether per-param state holds ``step``. torch.optim.SGD keeps none (a momentum buffer
        is present from the second step on); ours does the same unless a schedule needs the count."""
        return not self._implicit_step or bool(rule.scalars) or any(map(is_scheduled, rule.hparams.values()))

    def _step_subset(
        self,
        executor: Executor,
        group: dict[str, Any],
        version: int | None,
        rule: engine.Rule,
        subset: Subset,
        inputs: dict[str, dict[int, torch.Tensor]],
        grads: list[torch.Tensor],
    ) -> None:
        """One core step for params that share a step count. ``version``: the group dict's
        version tag (None: unknown)."""
        leaf_inputs = subset_inputs(rule, subset.sources, inputs)
        if version is not None and subset.hparams_version == version:
            hparams, scheduled = subset.hparams  # the cached tensors still hold the group's values
        else:
            hparams, scheduled, cacheable = self._hparams(group, rule, subset.params[0])
            subset.hparams, subset.hparams_version = (hparams, scheduled), version if cacheable else None
        keeps_step = self._keeps_step(rule)
        if not executor.step(rule, subset, hparams, scheduled, grads, leaf_inputs, keeps_step):
            subset.advance_steps()
        subset.count += 1

    # ---------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's ``state_dict``, with each ``step`` counter its own tensor: the state's are
        elements of one shared tensor, which ``pickle`` would copy whole for every param
        (``torch.distributed``'s object collectives pickle). Other tensors are the live state,
        as in torch.optim."""
        packed = super().state_dict()
        for index, entries in packed["state"].items():
            step = entries.get("step") if isinstance(entries, dict) else None  # (hooks add others)
            if isinstance(step, torch.Tensor) and step._base is not None:
                packed["state"][index] = {**entries, "step": step.clone()}
        return packed

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch.optim's ``load_state_dict``; in groups with a ``state_dtype`` or compensation the
        floating state keeps its saved dtype (torch would cast it to the param's, e.g. bf16).

        The ``step`` counters' values are copied into the group's shared counter tensor (see
        ``_torch_plan.shared_counters``): unlike torch.optim, the optimizer does not keep the
        given dict's counter tensors, so a dict loaded in memory and still stepped elsewhere does
        not advance this optimizer's counts. Every other tensor is taken as torch.optim takes it."""
        super().load_state_dict(state_dict)
        self._plans.clear()
        for group in self.param_groups:  # the loaded counters' values move into one shared tensor
            states = [self.state[p] for p in group["params"] if "step" in self.state.get(p, ())]
            steps = [s["step"] for s in states]
            if steps and all(is_host_counter(t) and t.dtype == steps[0].dtype for t in steps):
                values = torch.stack(steps).tolist()
                for s, step in zip(states, shared_counters(values, steps[0].dtype, steps[0].device)):
                    s["step"] = step
        saved = state_dict["state"]
        for group, saved_group in zip(self.param_groups, state_dict["param_groups"]):
            if group.get("state_dtype") is None and group.get("compensation") is None:
                continue
            for p, index in zip(group["params"], saved_group["params"]):
                for key, value in saved.get(index, {}).items():
                    if key != "step" and isinstance(value, torch.Tensor) and value.is_floating_point():
                        self.state[p][key] = value.to(device=p.device, copy=True)

    # ---------------------------------------------------------------- portable checkpoints

    def portable_state(self, names: torch.nn.Module | Mapping[str, torch.Tensor] | None = None) -> Any:
        """This optimizer's state in the core's format, which every backend reads: what
        ``factory(**hparams).init(params)`` makes, at this optimizer's step, with ``params``
        the flat dict ``{name: param}`` (so ``buffers.exp_avg.<name>``, ``hparams.lr``,
        ``count``). Save it with :func:`agnostic_optim.checkpoint.save_state` (with
        :func:`param_layouts` of the model) and resume with ``load_state`` in JAX, NumPy or
        torch (:meth:`load_portable_state`).

        Args:
          names: where the params' names come from: a module (``named_parameters()``: the keys
            of its ``state_dict``, ``0.weight``), a ``{name: param}`` mapping, or None: the
            names given to the optimizer (``model.named_parameters()``), else the params'
            positions (``"0"``, ``"1"``, ...).

        The core's state is one optimizer: every group must hold the same options (else a
        ``ValueError`` names them; the functional API's per-leaf options are ``ao.masked`` and
        ``ao.chain``), and every param the same step count.
        """
        opt, named, group = self._portable_parts(names)
        params = {name: p.detach() for name, p in named}
        template = opt.init(params)
        counts = {step_count(self.state[p]) if self.state.get(p) else 0 for _, p in named}
        if len(counts) != 1:
            raise ValueError(
                f"portable_state needs one step count for every param; they have {sorted(counts)}"
            )
        hparams = {k: _plain(group[k]) for k in template.hparams}
        template = ao.set_hparams(template, **hparams)
        buffers = {
            buffer: {name: self.state[p].get(buffer, values[name]) for name, p in named}
            for buffer, values in template.buffers.items()
        }
        first = self.state.get(named[0][1]) or {}
        scalars = {k: first[k].to(v.dtype) if k in first else v for k, v in template.scalars.items()}
        return template._replace(
            count=torch.tensor(counts.pop(), dtype=torch.int32), buffers=buffers, scalars=scalars
        )

    def load_portable_state(
        self, state: Any, names: torch.nn.Module | Mapping[str, torch.Tensor] | None = None
    ) -> None:
        """Take ``state`` (:meth:`portable_state`'s format, e.g. from
        :func:`agnostic_optim.checkpoint.load_state` or a JAX run's ``opt.init``/``step``) as
        this optimizer's: buffers, step counts, running scalars and every group's
        hyperparameters. ``names`` as for :meth:`portable_state`. Checked whole (structure,
        names, shapes) before anything changes."""
        template = self.portable_state(names)
        loaded = checkpoint.state_from_dict(template, checkpoint.state_to_dict(state))
        _, named, _ = self._portable_parts(names)
        hparams = {k: _plain(v) for k, v in ao.get_hparams(loaded).items() if k in loaded.hparams}
        for group in self.param_groups:
            self._validate({**group, **hparams})
        count = float(int(loaded.count))
        for (name, p), step in zip(named, shared_counters([count] * len(named))):
            entries = {buffer: values[name].clone() for buffer, values in loaded.buffers.items()}
            entries.update({k: v.to(step_dtype(), copy=True) for k, v in loaded.scalars.items()})
            self.state[p] = {"step": step, **entries}
        for group in self.param_groups:
            group.update(hparams)
        self._plans.clear()

    def _portable_parts(self, names: Any) -> tuple[ao.Optimizer, list[tuple[str, torch.Tensor]], dict]:
        """(the one rule every group runs, (name, param) for every param, the first group)."""
        groups = self.param_groups
        first = groups[0]
        for i, group in enumerate(groups[1:], 1):
            differ = sorted(
                k for k, v in self._options(group).items() if _plain(v) != _plain(self._options(first)[k])
            )
            if differ:
                raise ValueError(
                    f"portable_state needs one set of options; groups 0 and {i} differ in {differ}"
                )
        params = [p for group in groups for p in group["params"]]
        if any(p.is_complex() for p in params):
            raise TypeError(
                "portable_state: complex params have no portable form (the core takes real arrays)"
            )
        if isinstance(names, torch.nn.Module):
            names = dict(names.named_parameters())
        if names is not None:
            by_id = {id(p): name for name, p in names.items()}
            missing = [i for i, p in enumerate(params) if id(p) not in by_id]
            if missing:
                raise ValueError(f"portable_state: the params at positions {missing} have no name in `names`")
            named = [(by_id[id(p)], p) for p in params]
        elif all("param_names" in group for group in groups):
            named = [(n, p) for group in groups for n, p in zip(group["param_names"], group["params"])]
        else:
            named = [(str(i), p) for i, p in enumerate(params)]
        return self._optimizer_for(first), named, first


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float))


def _placeholder(spec: Any, dtype: torch.dtype, device: torch.device) -> Any:
    """Zeros shaped like a scheduled hyperparameter (a scalar or a tuple of scalars)."""
    if isinstance(spec, (tuple, list)):
        return tuple(_placeholder(v, dtype, device) for v in spec)
    return torch.zeros((), dtype=dtype, device=device)


def _plain(value: Any) -> Any:
    """A Python number for 1-element tensors (factories validate numbers), else the value."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, (tuple, list)):
        return tuple(_plain(v) for v in value)
    return value


def _scalar_tensor(cache: dict[str, Any], key: str, value: Any, dtype: torch.dtype, like: torch.Tensor):
    """A 0-d tensor holding ``value`` (a number: cached and refilled; a 1-element tensor: taken
    as is, with its autograd history, for a differentiable step)."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype=dtype, device=like.device).reshape(())
    entry = cache.get(key)
    if entry is None:
        entry = cache[key] = [torch.tensor(float(value), dtype=dtype, device=like.device), float(value)]
    elif entry[1] != value:
        entry[0].fill_(float(value))
        entry[1] = float(value)
    return entry[0]
