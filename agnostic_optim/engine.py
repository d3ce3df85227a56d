"""The engine: ``Optimizer``/``Transform``, their state, and the per-leaf rule runner.

An optimizer is two pure functions, ``init(params) -> state`` and
``step(state, grads, params, **inputs) -> (state, params)``. Most optimizers are described by a
:class:`Rule` -- its hyperparameters, per-leaf buffers, a per-step scalar computation done once
in float64, and a per-leaf update written with array-API operations -- and turned into an
``Optimizer`` (or a gradient ``Transform``) by :func:`build`. The engine owns everything the
rules share: tree walking, input validation, hyperparameters as data, schedules, scalar
precision and casting, ``maximize``, and the step count.

Adapters that execute a rule themselves (the torch adapter's executors, the NumPy adapter's
in-place steps) use the engine through the executor contract only, the second half of
``__all__``: initialise a rule's state (:func:`init_rule_state`, :func:`buffer_names`), resolve
its mask (:func:`resolve_mask`), run the scalar half of a step (:func:`prepare_step`, in
:func:`scalar_dtype`), cast its scalars per leaf (:class:`ScalarCaster`) and run the array
half (:func:`update_leaves`) leaf by leaf or over the :func:`leaf_groups` a :class:`Batching`
packs. How leaves are cut and blocked for the cache is the executor's business.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple, Protocol

from agnostic_optim import _backend, trees
from agnostic_optim import hparams as hp
from agnostic_optim.precision import Compensation, Precision

# The names adapters' executors may use (see the module docstring); the test suite checks that
# no adapter reaches past them into the engine.
EXECUTOR_CONTRACT = (
    "Batching",
    "OptimizerState",
    "Rule",
    "ScalarCaster",
    "Scalars",
    "StepScalars",
    "apply_rule",
    "buffer_names",
    "check_state",
    "flatten_step_inputs",
    "init_rule_state",
    "leaf_groups",
    "prepare_step",
    "resolve_mask",
    "rule_identity",
    "scalar_dtype",
    "update_leaves",
)
__all__ = [
    "EXECUTOR_CONTRACT",
    "Optimizer",
    "StepContext",
    "Transform",
    "build",
    "build_transform",
    "mixed_precision",
    "zeros_buffer",
    *EXECUTOR_CONTRACT,
]

PyTree = Any
Array = Any

scalar_dtype = _backend.scalar_dtype  # (the dtype a step's scalar arithmetic runs in)


class OptimizerState(NamedTuple):
    """State of one rule-based optimizer or transform (a pytree of arrays).

    Fields:
      count:     0-d int32, the number of steps taken.
      hparams:   name -> 0-d array (or tuple of 0-d arrays, e.g. ``betas``) in the scalar dtype.
      scheduled: name -> 0-d array, the value a schedule gave at the latest step.
      buffers:   name -> pytree shaped like params (per-leaf state, named as torch.optim names it).
      scalars:   name -> 0-d array, running scalars that are not per leaf (NAdam's mu_product).
      rule:      the optimizer that made it (:func:`rule_identity`: its name and options), a
                 static part of the tree, not a leaf: a step refuses another rule's state
                 ("": unknown, not checked; adapters that assemble a state have none).
    """

    count: Array
    hparams: dict[str, Any]
    scheduled: dict[str, Array]
    buffers: dict[str, PyTree]
    scalars: dict[str, Array]
    rule: str = ""


trees.register_static_fields(OptimizerState, ("rule",))


@dataclass(frozen=True, eq=False)
class Optimizer:
    """Two pure functions: ``init(params) -> state``, ``step(state, grads, params, **inputs)``."""

    init: Callable[[PyTree], PyTree]
    step: Callable[..., tuple[PyTree, PyTree]]
    name: str = "optimizer"
    rule: Rule | None = None  # the maths, for optimizers built from one (see ``mixed_precision``)
    inputs: tuple[str, ...] = ()  # the extra keyword inputs ``step`` accepts (``grad_fn``, ...)
    traceable: bool = True  # False when ``step`` branches on values (L-BFGS): no ``jax.jit``/``vmap``

    def __repr__(self) -> str:
        return f"<agnostic_optim.Optimizer {self.name}>"


@dataclass(frozen=True, eq=False)
class Transform:
    """A gradient transformation: ``init(params) -> state``, ``update(state, grads, params)``.

    ``update`` returns ``(state, grads)``; transforms go before an optimizer in :func:`chain`.
    """

    init: Callable[[PyTree], PyTree]
    update: Callable[[PyTree, PyTree, PyTree], tuple[PyTree, PyTree]]
    name: str = "transform"

    def __repr__(self) -> str:
        return f"<agnostic_optim.Transform {self.name}>"


class Scalars(dict):
    """Per-step scalars cast to one leaf's compute dtype; read as attributes (``s.lr``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"no scalar {name!r} in this step (have {sorted(self)})") from None


@dataclass(frozen=True)
class StepContext:
    """What :attr:`Rule.prepare` sees: float64 scalars and, for global reductions, all leaves."""

    xp: Any
    h: Scalars  # current hyperparameters (constants and schedule values)
    t: Array  # the step number being taken (1 on the first step), in the scalar dtype
    first: Array  # 1.0 on the first step, else 0.0, in the scalar dtype
    scalars: Mapping[str, Array]  # running scalars before this step
    grads: list[Array]
    params: list[Array]
    inputs: Mapping[str, Any]


def zeros_buffer(xp: Any, name: str, param: Array) -> Array:
    return xp.zeros_like(param)


@dataclass(frozen=True)
class Rule:
    """The maths of one optimizer, written once against the array API.

    Attributes:
      name: factory name.
      hparams: numeric hyperparameters (floats, tuples of floats, or schedules); they become
        state data and reach ``prepare`` as ``ctx.h`` and ``update`` as attributes of ``s``.
      update: ``update(xp, grad, param, buffers, s, **leaf_inputs) -> (buffers, out)`` for one
        leaf, where ``out`` is the new parameter (optimizer) or the new gradient (transform).
      prepare: per-step scalar arithmetic in the scalar dtype (bias corrections, ...), run once
        per step; returns extra entries for ``s``. Keys named like a running scalar update it.
      buffers: names of the per-leaf buffers; ``init_buffer`` creates each (zeros by default).
      scalars: running scalars and their initial values.
      leaf_inputs: keyword inputs of ``step`` that are pytrees like params, passed per leaf.
      inputs: other keyword inputs of ``step`` (seen by ``prepare`` as ``ctx.inputs``).
      maximize: negate gradients (torch.optim's ``maximize``).
      mask: static per-leaf selection (a bool pytree or a ``(path, leaf) -> bool`` callable);
        when set, ``update`` receives ``selected=<bool>`` for each leaf.
      precision: state storage dtype and param compensation (:mod:`agnostic_optim.precision`).
      elementwise: True when the update of every element depends only on that element (no
        per-leaf or global reductions), so a leaf may be processed in independent chunks.
      batchable: True when ``update`` uses only elementwise operations and whole-leaf ``sum``s,
        so an adapter may run it on several leaves packed into one operand (the torch adapter's
        ``_foreach`` lists). False for rules that reshape, reduce over axes or multiply matrices
        (Shampoo, AdaHessian's spatial averaging): they run leaf by leaf.
      buffer_shape: ``buffer_shape(name, param_shape)``, the shape of a leaf's buffer (the
        param's unless ``init_buffer`` makes another: Shampoo's flattened statistics); steps
        check every state buffer against it.
      sparse_support: True when an element whose gradient is zero keeps its param and state
        (Adagrad; SGD without momentum or weight decay), or when the rule is defined on the
        gradient's support (SparseAdam's lazy moments): a sparse gradient may then be applied
        to the elements it holds only (the torch adapter's sparse step), with the numbers of
        the dense step on its densified form.
    """

    name: str
    hparams: Mapping[str, Any]
    update: Callable[..., tuple[dict[str, Array], Array]]
    prepare: Callable[[StepContext], Mapping[str, Any]] | None = None
    buffers: tuple[str, ...] = ()
    init_buffer: Callable[[Any, str, Array], Array] = zeros_buffer
    scalars: Mapping[str, float] = field(default_factory=dict)
    leaf_inputs: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ()
    maximize: bool = False
    mask: Any = None
    precision: Precision = field(default_factory=Precision)
    elementwise: bool = True
    batchable: bool = True
    sparse_support: bool = False
    buffer_shape: Callable[[str, tuple[int, ...]], tuple[int, ...]] = lambda name, shape: shape


# --------------------------------------------------------------------------- validation


def _params_namespace(leaves: list[Array], what: str) -> Any:
    if not leaves:
        raise ValueError(f"{what} holds no arrays")
    for leaf in leaves:
        if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            raise TypeError(f"{what} leaves must be arrays, got {type(leaf).__name__}")
    xp = _backend.namespace_of(*leaves)
    for leaf in leaves:
        if not _backend.is_floating(xp, leaf):
            raise TypeError(f"{what} leaves must be real floating arrays, got dtype {leaf.dtype}")
    return xp


def _check_like(params: list[Array], others: list[Array], what: str, tree: PyTree = None) -> None:
    """Raise if a leaf of ``others`` differs from its param in shape or dtype, naming it by its
    path in ``tree`` (``grads['encoder']['w'] has shape (2, 3), params have (3, 2)``)."""
    for i, (p, o) in enumerate(zip(params, others)):
        if tuple(o.shape) == tuple(p.shape) and o.dtype == p.dtype:
            continue
        name = trees.leaf_paths(tree, what)[i] if tree is not None else f"{what} leaf {i}"
        if tuple(o.shape) != tuple(p.shape):
            raise ValueError(f"{name} has shape {tuple(o.shape)}, params have {tuple(p.shape)}")
        raise TypeError(f"{name} has dtype {o.dtype}, params have {p.dtype}")


def flatten_step_inputs(grads: PyTree, params: PyTree) -> tuple[Any, list, list, Any]:
    """Validate and flatten ``(grads, params)``: returns (xp, grad leaves, param leaves, treedef)."""
    param_leaves, treedef = trees.flatten(params)
    xp = _params_namespace(param_leaves, "params")
    grad_leaves = trees.flatten_like(treedef, grads, "grads")
    _backend.namespace_of(*param_leaves, *grad_leaves)
    _check_like(param_leaves, grad_leaves, "grads", grads)
    return xp, grad_leaves, param_leaves, treedef


# --------------------------------------------------------------------------- rule runner


def _split_hparams(values: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Callable]]:
    constants = {k: v for k, v in values.items() if not hp.is_scheduled(v)}
    schedules = {k: v for k, v in values.items() if hp.is_scheduled(v)}
    return constants, schedules


def _cast_tree(xp: Any, value: Any, dtype: Any, device: Any) -> Any:
    """``value`` (a scalar array, a tuple of them, or a Python value) in ``dtype`` on ``device``
    (None: where it is, for traced leaves)."""
    if isinstance(value, tuple):
        return tuple(_cast_tree(xp, v, dtype, device) for v in value)
    if not hasattr(value, "dtype"):
        return value
    if device is not None:
        value = _backend.to_device(value, device)
    return _backend.astype(xp, value, dtype)


class ScalarCaster:
    """Casts the step's float64 scalars to each leaf's compute dtype, once per (dtype, device)."""

    def __init__(self, xp: Any, values: Mapping[str, Any]):
        self.xp, self.values, self.cache = xp, values, {}

    def for_leaf(self, leaf: Array, dtype: Any) -> Scalars:
        device = None if _backend.is_lazy(leaf) else _backend.device_of(leaf)
        key = (dtype, device)
        if key not in self.cache:
            self.cache[key] = Scalars(
                {k: _cast_tree(self.xp, v, dtype, device) for k, v in self.values.items()}
            )
        return self.cache[key]


def resolve_mask(mask: Any, params: PyTree) -> list[bool]:
    """One static bool per leaf of ``params`` from a bool pytree or a ``(path, leaf)`` callable."""
    pairs, treedef = trees.flatten_with_paths(params)
    if callable(mask):
        flags = [mask(path, leaf) for path, leaf in pairs]
    else:
        flags = trees.flatten_like(treedef, mask, "mask")
    for flag in flags:
        if not isinstance(flag, bool):
            raise TypeError(f"mask entries must be Python bools, got {type(flag).__name__}")
    return flags


def buffer_names(rule: Rule) -> tuple[str, ...]:
    """The per-leaf buffers in a rule's state: its own and the precision compensation's."""
    extra = rule.precision.extra_buffer
    return rule.buffers + ((extra,) if extra else ())


class Batching(Protocol):
    """How an executor runs a rule once over several leaves (see :func:`update_leaves`).

    ``pack`` turns a group's leaves into one operand of the namespace ``xp`` (the torch
    adapter's ``TensorList``, the NumPy adapter's recorded symbols); the rule runs on the packed
    operands, and ``store`` writes each result into its leaves in place, given as
    ``(destination leaves, packed value)`` pairs (the new params, then each buffer), so that the
    batching can evaluate values straight into their destinations.
    """

    xp: Any  # the namespace of packed operands

    def pack(self, arrays: list[Array]) -> Any: ...

    def store(self, pairs: list[tuple[list[Array], Any]]) -> None: ...


def leaf_groups(
    params: list[Array],
    buffers: Mapping[str, list[Array]],
    flags: list[bool] | None,
    *,
    batched: bool,
    block_elements: int | None = None,
) -> list[Sequence[int]]:
    """Indices of leaves that run together: singletons unless ``batched``; else leaves of the
    same dtype, device, buffer dtypes and mask flag, cut into blocks of at most
    ``block_elements`` elements (None: no limit; a contiguous block as a ``range``)."""
    if not batched:
        return [[i] for i in range(len(params))]
    groups: dict[Any, list[list[int]]] = {}
    sizes: dict[Any, int] = {}
    buffer_dtypes = zip(*([leaf.dtype for leaf in leaves] for leaves in buffers.values()))
    for i, (p, dtypes) in enumerate(itertools.zip_longest(params, buffer_dtypes, fillvalue=())):
        key = (
            p.dtype,
            getattr(p, "device", None) or _backend.device_of(p),
            dtypes,
            None if flags is None else flags[i],
        )
        size = math.prod(p.shape)
        blocks = groups.setdefault(key, [[]])
        if block_elements is not None and blocks[-1] and sizes[key] + size > block_elements:
            blocks.append([])
            sizes[key] = 0
        blocks[-1].append(i)
        sizes[key] = sizes.get(key, 0) + size
    # a contiguous block as a range: its leaves are then taken with one slice (see _take)
    return [
        range(block[0], block[-1] + 1) if block[-1] - block[0] == len(block) - 1 else block
        for blocks in groups.values()
        for block in blocks
    ]


def _take(leaves: list[Array], group: Sequence[int]) -> list[Array]:
    """The leaves of one group from :func:`leaf_groups` (a range: a slice, no loop)."""
    if isinstance(group, range):
        return leaves[group.start : group.stop]
    return [leaves[i] for i in group]


def _as_array(xp: Any, x: Array) -> Array:
    """``x`` as an array of ``xp`` (NumPy 2 turns 0-d array arithmetic into NumPy scalars)."""
    return xp.asarray(x) if x.shape == () else x


def _store(xp: Any, destination: Array, value: Array, in_place: bool) -> Array:
    if not in_place:
        return _as_array(xp, value)
    destination[...] = value
    return destination


def init_rule_state(rule: Rule, params: PyTree) -> OptimizerState:
    leaves, treedef = trees.flatten(params)
    xp = _params_namespace(leaves, "params")
    first = leaves[0]
    device = _backend.device_of(first)
    dtype = _backend.scalar_dtype(xp, first)
    constants, scheduled = hp.to_state(xp, rule.hparams, dtype, device)
    precision = rule.precision

    def rule_buffer(name: str, p: Array) -> Array:
        return _backend.astype(xp, rule.init_buffer(xp, name, p), precision.storage_dtype(xp, p))

    buffers = {
        name: trees.unflatten(treedef, [rule_buffer(name, p) for p in leaves]) for name in rule.buffers
    }
    if precision.extra_buffer:
        buffers[precision.extra_buffer] = trees.unflatten(
            treedef, [precision.init_extra(xp, p) for p in leaves]
        )
    scalars = {k: _backend.scalar(xp, v, dtype, device) for k, v in rule.scalars.items()}
    count = xp.asarray(0, dtype=xp.int32, device=device)
    return OptimizerState(count, constants, scheduled, buffers, scalars, rule_identity(rule))


@dataclass(frozen=True)
class StepScalars:
    """The scalar half of a step, computed once before any leaf is touched.

    Attributes:
      count: the step count after this step.
      scheduled: the schedules' values used by this step.
      values: hyperparameters and prepared scalars, in the scalar dtype.
      running: the running scalars after this step.
    """

    count: Array
    scheduled: dict[str, Array]
    values: dict[str, Any]
    running: dict[str, Array]


def prepare_step(
    rule: Rule,
    state: OptimizerState,
    xp: Any,
    grad_leaves: list[Array],
    param_leaves: list[Array],
    inputs: Mapping[str, Any],
) -> StepScalars:
    """Run the rule's float64 scalar arithmetic (bias corrections, schedules, global norms)."""
    count = _as_array(xp, state.count + 1)
    _, schedules = _split_hparams(rule.hparams)
    scheduled = hp.evaluate_schedules(xp, schedules, state.count, state.scheduled)
    sdtype = _backend.scalar_dtype(xp, param_leaves[0])
    t = xp.astype(count, sdtype)
    current = Scalars({**state.hparams, **scheduled})
    ctx = StepContext(
        xp=xp,
        h=current,
        t=t,
        first=xp.astype(count == 1, sdtype),
        scalars=state.scalars,
        grads=grad_leaves,
        params=param_leaves,
        inputs={k: v for k, v in inputs.items() if k in rule.inputs},
    )
    prepared = dict(rule.prepare(ctx)) if rule.prepare is not None else {}
    running = {k: prepared.get(k, v) for k, v in state.scalars.items()}
    return StepScalars(count, scheduled, {**current, **prepared}, running)


def update_leaves(
    rule: Rule,
    xp: Any,
    scalars_for: Callable[[Array, Any], Scalars],
    grad_leaves: list[Array],
    param_leaves: list[Array],
    buffer_leaves: Mapping[str, list[Array]],
    leaf_inputs: Mapping[str, list[Array]] | None = None,
    flags: list[bool] | None = None,
    batching: Batching | None = None,
    in_place: bool = False,
    groups: list[Sequence[int]] | None = None,
) -> tuple[list[Array], dict[str, list[Array]]]:
    """The array half of a step: run ``rule.update`` over every leaf (or batched group).

    ``scalars_for(leaf, compute_dtype)`` gives the step's scalars cast for a leaf. Returns the
    new params (or gradients, for a transform) and the new buffers, leaf by leaf.

    Without ``batching`` the rule runs once per leaf (``groups``, if given, must be
    singletons); ``in_place=True`` (for namespaces with writeable arrays) then writes each
    leaf's new param and buffers into the given arrays (``x[...] = new``) as soon as that leaf
    is done, while its data is still in cache, and returns those same arrays. With
    ``batching`` (always in place) the rule runs once per group of ``groups`` (default: every
    leaf of one dtype, device and mask flag, from :func:`leaf_groups`) on packed operands, and
    ``batching.store`` writes the results.
    """
    if batching is not None and not in_place:
        raise ValueError("a batched step stores its results in place: pass in_place=True")
    leaf_inputs = leaf_inputs or {}
    names = buffer_names(rule)
    precision, extra_name = rule.precision, rule.precision.extra_buffer
    uxp = xp if batching is None else batching.xp
    pack = (lambda arrays: arrays[0]) if batching is None else batching.pack
    new_buffers: dict[str, list[Array]] = {name: [None] * len(param_leaves) for name in names}
    outputs: list[Array] = [None] * len(param_leaves)
    if groups is None:
        groups = leaf_groups(param_leaves, buffer_leaves, flags, batched=batching is not None)
    for group in groups:
        first = param_leaves[group[0]]
        dtype = precision.compute_dtype(xp, first)
        s = scalars_for(first, dtype)

        def gather(
            leaves: list[Array],
            convert: bool = True,
            uniform: bool = False,
            group: list[int] = group,
            dtype: Any = dtype,
        ) -> Any:
            """The group's leaves packed into one operand, cast to the compute dtype if ``convert``
            (``uniform``: the group shares the leaves' dtype, so the first leaf tells for all)."""
            selected = _take(leaves, group)
            if not convert or (uniform and selected[0].dtype == dtype):
                return pack(selected)
            # one C-level count rather than a cast call per leaf (and traceable by torch.compile)
            dtypes = [leaf.dtype for leaf in selected]
            if dtypes.count(dtype) == len(selected):
                return pack(selected)
            if dtypes.count(dtypes[0]) == len(selected):  # the batching casts (a recorder, lazily)
                return _backend.astype(uxp, pack(selected), dtype)
            return pack([_backend.astype(xp, leaf, dtype) for leaf in selected])

        g = gather(grad_leaves)
        if rule.maximize:
            g = -g
        bufs = {name: gather(buffer_leaves[name], uniform=True) for name in rule.buffers}
        kwargs = {name: gather(v) for name, v in leaf_inputs.items()}
        if flags is not None:
            kwargs["selected"] = flags[group[0]]
        extra = gather(buffer_leaves[extra_name], convert=False) if extra_name else None
        working = precision.working_param(uxp, gather(param_leaves, convert=False), extra, dtype)
        bufs, out = rule.update(uxp, g, working, bufs, s, **kwargs)
        out, extra = precision.commit_param(uxp, out, first.dtype, extra)
        results = {"": out}
        for name in rule.buffers:
            results[name] = _backend.astype(uxp, bufs[name], buffer_leaves[name][group[0]].dtype)
        if extra_name:
            results[extra_name] = extra
        if batching is not None:  # the batching writes the whole group at once
            destinations = {"": param_leaves, **buffer_leaves}
            batching.store([(_take(destinations[k], group), v) for k, v in results.items()])
            continue
        (i,) = group
        outputs[i] = _store(xp, param_leaves[i], results[""], in_place)
        for name in names:
            new_buffers[name][i] = _store(xp, buffer_leaves[name][i], results[name], in_place)
    if batching is not None:  # every value went to its leaf
        return list(param_leaves), {name: list(buffer_leaves[name]) for name in names}
    return outputs, new_buffers


def rule_identity(rule: Rule) -> str:
    """What a state records of the rule that made it: its name, and the options that change
    its equations without showing in its hyperparameters or buffers (``maximize``, the state
    dtype and compensation)."""
    precision = rule.precision
    options = [f"maximize={rule.maximize}"] if rule.maximize else []
    if precision.state_dtype is not None or precision.compensation is not None:
        options.append(f"state_dtype={precision.state_dtype}, compensation={precision.compensation}")
    return f"{rule.name}({', '.join(options)})"


def check_state(
    rule: Rule, xp: Any, state: OptimizerState, params: list[Array], buffers: Mapping[str, list[Array]]
) -> None:
    """Raise unless ``state`` is one ``rule``'s init made for params like these: the same
    hyperparameters (a state of another optimizer is refused, not stepped with its values), and
    every buffer leaf in the shape and dtype the rule keeps it (a state made for other shapes
    would broadcast; one made for other dtypes would step them)."""
    if state.rule and state.rule != rule_identity(rule):
        raise ValueError(f"{rule.name}: this state was made by another optimizer or options ({state.rule})")
    held = set(state.hparams) | set(state.scheduled)
    if held != set(rule.hparams):
        raise ValueError(
            f"{rule.name}: this state was made by another optimizer or other options: it holds "
            f"hyperparameters {sorted(held)}, {rule.name} has {sorted(rule.hparams)}"
        )
    precision = rule.precision
    for name, leaves in buffers.items():
        for i, (p, leaf) in enumerate(zip(params, leaves)):
            shape = (
                tuple(p.shape) if name == precision.extra_buffer else rule.buffer_shape(name, tuple(p.shape))
            )
            if name == precision.extra_buffer:
                dtype = p.dtype if precision.compensation == "kahan" else precision.compute_dtype(xp, p)
            else:
                dtype = precision.storage_dtype(xp, p)
            if tuple(leaf.shape) != shape or leaf.dtype != dtype:
                raise ValueError(
                    f"{rule.name}: state buffer {name!r} leaf {i} has shape {tuple(leaf.shape)} and dtype "
                    f"{leaf.dtype}; for its param ({tuple(p.shape)}, {p.dtype}) it must have "
                    f"{shape} and {dtype} (a state made for other params)"
                )


def apply_rule(
    rule: Rule,
    state: OptimizerState,
    grads: PyTree,
    params: PyTree,
    inputs: Mapping[str, Any],
    in_place: bool = False,
) -> tuple[OptimizerState, PyTree]:
    """One step of ``rule``: returns the new state and the per-leaf outputs as a tree.

    Validates every input first, then runs :func:`prepare_step` and :func:`update_leaves`, once
    per leaf. ``in_place=True`` (for namespaces with writeable arrays) writes each leaf's new
    parameter and buffers into the given arrays (see :func:`update_leaves`).
    """
    if not isinstance(state, OptimizerState):
        raise TypeError(f"{rule.name}: expected the state made by its init, got {type(state).__name__}")
    unknown = set(inputs) - set(rule.inputs) - set(rule.leaf_inputs)
    if unknown:
        raise TypeError(f"{rule.name}.step got unexpected inputs {sorted(unknown)}")
    xp, grad_leaves, param_leaves, treedef = flatten_step_inputs(grads, params)
    names = buffer_names(rule)
    if set(state.buffers) != set(names):
        raise ValueError(
            f"{rule.name}: state holds buffers {sorted(state.buffers)}, expected {sorted(names)}"
        )
    buffer_leaves = {
        name: trees.flatten_like(treedef, state.buffers[name], f"state buffer {name!r}") for name in names
    }
    check_state(rule, xp, state, param_leaves, buffer_leaves)
    leaf_inputs = {}
    for name in rule.leaf_inputs:
        value = inputs.get(name)
        if value is not None:
            leaf_inputs[name] = trees.flatten_like(treedef, value, name)
            _check_like(param_leaves, leaf_inputs[name], name, value)
    flags = resolve_mask(rule.mask, params) if rule.mask is not None else None

    step = prepare_step(rule, state, xp, grad_leaves, param_leaves, inputs)
    caster = ScalarCaster(xp, step.values)
    outputs, new_buffers = update_leaves(
        rule,
        xp,
        caster.for_leaf,
        grad_leaves,
        param_leaves,
        buffer_leaves,
        leaf_inputs,
        flags,
        in_place=in_place,
    )
    new_state = OptimizerState(
        count=step.count,
        hparams=state.hparams,
        scheduled=step.scheduled,
        buffers={name: trees.unflatten(treedef, leaves) for name, leaves in new_buffers.items()},
        scalars=step.running,
        rule=state.rule,
    )
    return new_state, trees.unflatten(treedef, outputs)


def build(rule: Rule) -> Optimizer:
    """An :class:`Optimizer` whose per-leaf output is the new parameter."""

    def init(params: PyTree) -> OptimizerState:
        return init_rule_state(rule, params)

    def step(state: OptimizerState, grads: PyTree, params: PyTree, **inputs: Any):
        return apply_rule(rule, state, grads, params, inputs)

    inputs = tuple(dict.fromkeys(rule.inputs + rule.leaf_inputs))  # (one may be both, as AdaHessian's)
    return Optimizer(init=init, step=step, name=rule.name, rule=rule, inputs=inputs)


def build_transform(rule: Rule) -> Transform:
    """A gradient :class:`Transform` whose per-leaf output is the new gradient."""

    def init(params: PyTree) -> OptimizerState:
        return init_rule_state(rule, params)

    def update(state: OptimizerState, grads: PyTree, params: PyTree):
        return apply_rule(rule, state, grads, params, {})

    return Transform(init=init, update=update, name=rule.name)


def mixed_precision(
    opt: Optimizer, *, state_dtype: Any = None, compensation: Compensation = None
) -> Optimizer:
    """``opt`` with its state stored in ``state_dtype`` and low-precision params compensated.

    ``state_dtype`` is a dtype or its name (``"float32"``, ``"bfloat16"``); ``compensation`` is
    ``"kahan"`` (a param-dtype buffer holding what each rounding lost -- recommended for bf16
    params), ``"master"`` (float32 master weights in the state) or None. See
    :mod:`agnostic_optim.precision`. Works for every optimizer built from a rule; wrap a
    wrapper's base instead (``ao.sam(ao.mixed_precision(ao.adamw(...)))``).
    """
    if opt.rule is None:
        raise TypeError(
            f"mixed_precision needs an optimizer built from an update rule, which {opt.name} is not "
            "(a wrapper takes it on its base: ao.sam(ao.mixed_precision(ao.adamw(...))); L-BFGS and "
            "K-FAC keep their state in the params' dtype)"
        )
    precision = Precision(state_dtype=state_dtype, compensation=compensation)
    return build(replace(opt.rule, precision=precision))
