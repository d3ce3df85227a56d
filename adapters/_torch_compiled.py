"""The torch adapter's ``compile=True`` executor (:class:`CompiledExecutor`): a rule's step
compiled by ``torch.compile`` as two graphs (the scalar arithmetic, then the update of every
param), called straight through the compiled graphs while the layout they were compiled for
holds. The private torch APIs it needs come from ``_torch_private``; without them the front runs
the eager executor instead.

Two graphs, because Inductor cannot give one good code for both: a scalar it computes in the
graph that streams the params is either recomputed inside every loop that reads it (a 0-d
result: powers and square roots per element) or, stacked into one buffer, read by each of
thousands of loops, which makes Inductor's scheduler quadratic in the number of params (3 min to
compile 600). The first graph returns the step's scalars stacked into one vector per compute
dtype; the second reads them as inputs.

Dynamo checks every input of a compiled function on every call (sizes, strides, dtype, device of
each tensor: ~2,400 tensors for AdamW over 600 params) in guard code before it runs a graph.
A layout's first step goes through Dynamo (which compiles, or finds the graphs it compiled
before) and records which graphs ran on which of the step's tensors; the following steps hand
the tensors straight to those graphs, after one C++ pass over the graphs' inputs (Dynamo's own
``TensorGuards``: dispatch keys, dtype, device, sizes, strides and ``requires_grad`` of each,
as recorded), a check of whatever else the step passed (Python values by value, tensors the
graphs only read metadata from), of which inputs are one tensor and of the global state
Dynamo guards on (``GlobalStateGuard``). Anything else goes back through Dynamo. Where the
first call showed that AOT autograd's wrappers around Inductor's code only pass the inputs
through and bump version counters, the direct calls skip them and bump the same counters.
A graph reads each tensor's memory when it runs, so a tensor rebound through
``.data`` to other memory of the same layout is followed. Not followed, as under
``torch.compile`` itself: a rebinding that makes two tensors of the step share memory.

Inductor compiles both graphs with its own heuristics but one (:class:`StreamingChoices`): on
CPU, it runs same-sized loops over more than ``2**16`` elements one after the other rather than
fused into one loop.
"""

from __future__ import annotations

import inspect
import itertools
import operator
import types
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch

from agnostic_optim import engine
from agnostic_optim.adapters._torch_plan import (
    PLAIN_TENSORS,
    XP,
    Subset,
    outside_frames,
    refuse_sparse,
    versions,
)
from agnostic_optim.adapters._torch_private import (
    BackendCompilerFailed,
    GlobalStateGuard,
    InductorChoices,
    TensorGuards,
    V,
    compile_fx,
    dynamo_counters,
    dynamo_disable,
    increment_version,
    profiler_enabled,
    reset_code,
)

Graph = Callable[..., Any]
_LRU_CACHE_NOTICE = "Dynamo detected a call to a `functools.lru_cache`-wrapped function"


class GraphCall:
    """A layout's two compiled graphs, called with their inputs picked from the step's flat
    list (the update graph's also from the vectors the scalar graph returns), while the global
    state Dynamo guards on (grad mode, autocast, threads...) is the one they ran under.

    ``index_scalars``/``index_update``: the position of each graph input in ``flat`` (positions
    past its end: the returned vectors). Dynamo gives a tensor passed twice one graph input:
    ``aliases`` are the pairs of positions that held one tensor when the graphs ran, and must
    still do."""

    def __init__(
        self,
        scalar_graph: Graph,
        index_scalars: list[int],
        update_graph: Graph,
        index_update: list[int],
        aliases: list[tuple[int, int]],
        flat: list,
    ):
        self.scalar_graph, self.update_graph, self.aliases = scalar_graph, update_graph, aliases
        self.pick_scalars = _picker(index_scalars)
        self.pick_update = _picker(index_update)
        taken = {i for i in (*index_scalars, *index_update) if i < len(flat)}
        self.pick_inputs = _picker(sorted(taken))
        self.check_inputs = _input_check(self.pick_inputs(flat))
        self.pick_rest = _picker(sorted(set(range(len(flat))) - taken))
        self.rest = _metadata(self.pick_rest(flat))
        self.same_state = _state_check()

    def accepts(self, flat: list) -> bool:
        return (
            self.same_state()
            and self.check_inputs(self.pick_inputs(flat))
            and _metadata(self.pick_rest(flat)) == self.rest
            and all(flat[i] is flat[j] for i, j in self.aliases)
        )

    def __call__(self, flat: list) -> None:
        vectors = self.scalar_graph(*self.pick_scalars(flat))  # (as Dynamo calls its graphs)
        self.update_graph(*self.pick_update([*flat, *vectors]))


def _picker(index: Sequence[int]) -> Callable[[list], tuple]:
    """``flat -> tuple(flat[i] for i in index)`` in one C-level call."""
    if len(index) > 1:
        return operator.itemgetter(*index)
    if index:
        return lambda flat: (flat[index[0]],)
    return lambda flat: ()


def _state_check() -> Callable[[], bool]:
    """A check that the global state Dynamo guards on is still the present one."""
    if GlobalStateGuard is not None:
        return GlobalStateGuard().check
    state = _global_state()
    return lambda: _global_state() == state


def _autocast_enabled() -> bool:
    return torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")


def _global_state() -> tuple:
    return (
        torch.is_grad_enabled(),
        _autocast_enabled(),
        torch.get_num_threads(),
        torch.get_default_dtype(),
        torch.are_deterministic_algorithms_enabled(),
    )


def _input_check(inputs: tuple) -> Callable[[tuple], bool]:
    """A check that tensors have the dispatch keys, dtype, device, sizes, strides and
    ``requires_grad`` of ``inputs``: one C++ pass (a Python one without ``TensorGuards``)."""
    if TensorGuards is not None and all(isinstance(t, torch.Tensor) for t in inputs):
        guards = TensorGuards(
            *inputs,
            dynamic_dims_sizes=[list(t.shape) for t in inputs],
            dynamic_dims_strides=[list(t.stride()) for t in inputs],
        )
        return lambda tensors: guards.check(*tensors)
    expected = _metadata(inputs)
    return lambda tensors: _metadata(tensors) == expected


class CompiledStep:
    """A step as two functions compiled by ``torch.compile``: ``scalars(*scalar_args) ->
    (vectors, layout)`` (the scalars stacked into one tensor per compute dtype, and how to read
    them back) and ``update(vectors, layout, *update_args)``, writing its results in place.

    :meth:`run` takes the arguments, every tensor and Python value they hold in one flat list
    (``flat``, in an order the caller keeps) and the tensors the step writes."""

    def __init__(
        self,
        owner: Any,
        scalars: Callable[..., tuple],
        update: Callable[..., None],
        on_fallback: Callable[[str], None],
    ):
        # Dynamo keeps at most ``recompile_limit`` (8) graphs per code object and then runs the
        # function eagerly: each optimizer's rule gets code objects of its own, or every
        # compiled optimizer in a process would share those of ``scalars`` and ``update``.
        self._eager = (_own_code(scalars, owner), _own_code(update, owner))
        self._compiled = tuple(torch.compile(f, backend=self._compile, dynamic=False) for f in self._eager)
        self._on_fallback = on_fallback
        self._dynamo: Callable[[tuple, tuple], tuple | None] | None = self._through_dynamo
        self._ran: list[tuple[Graph, list[int], Any]] = []  # graphs run by Dynamo on this call

    def _compile(self, graph_module: torch.fx.GraphModule, example_inputs: list) -> Graph:
        """Dynamo's backend: Inductor, and a record of each call Dynamo makes to the graph (with
        what to call in its place, :func:`_observed_call`).

        Inductor's per-call size asserts are off: Dynamo's guards check every input's sizes and
        strides on the first call of a layout, and :class:`GraphCall` on the others."""
        if StreamingChoices is None:  # pragma: no cover - depends on the torch build
            graph = compile_fx(graph_module, example_inputs, config_patches={"size_asserts": False})
        else:  # (the config entry keys Inductor's caches; the handler is what its scheduler asks)
            patches = {"size_asserts": False, "inductor_choices_class": StreamingChoices}
            with V.set_choices_handler(StreamingChoices()):
                graph = compile_fx(graph_module, example_inputs, config_patches=patches)

        def recorded(*args: Any) -> Any:
            direct, outputs = _observed_call(graph, args)
            self._ran.append((direct, [id(a) for a in args], outputs))
            return outputs

        return recorded

    def run(self, scalar_args: tuple, update_args: tuple, flat: list, written: list) -> GraphCall | None:
        """The step through Dynamo; the graphs that ran, to be called directly while their
        :meth:`GraphCall.accepts` the step's ``flat`` list (None: Dynamo runs every call)."""
        if self._dynamo is None:  # the compiler failed once: eager from then on
            scalars, update = self._eager
            update(*scalars(*scalar_args), *update_args)
            return None
        self._ran.clear()
        breaks = sum(dynamo_counters["graph_break"].values())
        with warnings.catch_warnings():
            # array_api_compat caches its type checks (``_issubclass_fast``: pure functions of a
            # class) with lru_cache, which Dynamo traces through and says so once per function
            warnings.filterwarnings("ignore", message=_LRU_CACHE_NOTICE, category=UserWarning)
            vectors = self._dynamo(scalar_args, update_args)
        ran, self._ran = self._ran, []
        if vectors is None or sum(dynamo_counters["graph_break"].values()) != breaks:
            return None  # eager, or more than one graph per function: Dynamo runs every call
        return _graph_call(ran, flat, written, vectors)

    def _through_dynamo(self, scalar_args: tuple, update_args: tuple) -> tuple | None:
        """The step through Dynamo; the scalar vectors (None where it fell back to eager)."""
        (scalars, update), (compiled_scalars, compiled_update) = self._eager, self._compiled
        try:
            vectors, layout = compiled_scalars(*scalar_args)
        except BackendCompilerFailed as error:
            # raised while compiling, before the step ran: nothing has been written yet
            self._fall_back(error)
            update(*scalars(*scalar_args), *update_args)
            return None
        try:
            compiled_update(vectors, layout, *update_args)
        except BackendCompilerFailed as error:
            self._fall_back(error)
            update(vectors, layout, *update_args)
            return None
        return vectors

    def _fall_back(self, error: Exception) -> None:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        self._on_fallback(first_line)
        self._dynamo = None


class CompiledLayout:
    """What the compiled executor keeps for a subset: its step count as a tensor the graphs
    increment, the compute dtypes of its params and the graphs to call directly."""

    def __init__(self, rule: engine.Rule, params: list[torch.Tensor]):
        self.viewed: list[torch.Tensor] = []  # (the graphs read each tensor's memory as they run)
        self.compute_dtypes = tuple(dict.fromkeys(rule.precision.compute_dtype(XP, p) for p in params))
        self.count_tensor: torch.Tensor | None = None  # made at the first step, from the count
        self.graph: GraphCall | None = None  # the graphs for this layout, once Dynamo ran them


class CompiledExecutor:
    """Runs steps as compiled graphs (``compile=True``; see the module docstring).

    ``name``: the optimizer's class name, for messages. Each rule gets its own
    :class:`CompiledStep` (its own code objects and Dynamo cache), freed with this executor."""

    def __init__(self, name: str):
        self.name = name
        self._steps: dict[int, CompiledStep] = {}

    @staticmethod
    def lay_out(
        rule: engine.Rule, params: list[torch.Tensor], buffers: dict[str, list], flags: list | None
    ) -> CompiledLayout:
        return CompiledLayout(rule, params)

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
        """The whole step, scalars and torch.optim's step counters included, as compiled graphs
        (not torch.optim.SGD's counters, which the front drops after the first step)."""
        params, states, buffers, layout = subset.params, subset.states, subset.buffers, subset.layout
        if layout.count_tensor is None:
            layout.count_tensor = torch.tensor(subset.count, dtype=torch.int32, device=params[0].device)
        counted = subset.counters is not None and keeps_step
        counters = [subset.counters] if counted else []
        # Inductor passes a 0-d float64 CPU input to its kernels by value (torch 2.13): a write
        # to one is lost. The running scalars are read and written through 1-element views.
        running = {k: [s[k].view(1) for s in states] for k in rule.scalars}
        written = [
            layout.count_tensor,
            *params,
            *itertools.chain(*buffers.values()),
            *counters,
            *itertools.chain(*running.values()),
        ]
        flat = _step_inputs_flat(hparams, scheduled, grads, leaf_inputs, written)
        if layout.graph is not None and layout.graph.accepts(flat):
            # (a gradient in its param's memory too: graphs compiled on separate memory read each
            # element before they write it, as torch.optim's step does; tested with SGD, AdamW,
            # LAMB and Adan)
            layout.graph(flat)
            return counted
        refuse_sparse(self.name, grads)
        if _grad_in_param_memory(params, grads):  # compiled on copies (see there)
            grads = [g.clone() for g in grads]
            flat = _step_inputs_flat(hparams, scheduled, grads, leaf_inputs, written)
        dtypes = layout.compute_dtypes
        scalar_args = (
            layout.count_tensor,
            hparams,
            scheduled,
            running,
            params,
            grads,
            leaf_inputs,
            counters,
            dtypes,
        )
        update_args = (dtypes, params, grads, buffers, subset.flags, leaf_inputs)
        layout.graph = self._compiled_step(rule).run(scalar_args, update_args, flat, written)
        return counted

    def _compiled_step(self, rule: engine.Rule) -> CompiledStep:
        """A step of ``rule`` as two functions for ``torch.compile``: the float64 scalar
        arithmetic (with the running scalars and step counters it writes in place), returning the
        scalars cast to each compute dtype and stacked into one tensor per dtype; then
        ``update_leaves`` reading them, writing params and buffers in place."""
        if id(rule) not in self._steps:

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
                scalar_dtype, device = engine.scalar_dtype(XP, params[0]), params[0].device
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
                    stacklevel=outside_frames(),
                )

            self._steps[id(rule)] = CompiledStep(self, scalars, update, fall_back)
        return self._steps[id(rule)]


def _grad_in_param_memory(params: list[torch.Tensor], grads: list[torch.Tensor]) -> bool:
    """Whether a gradient starts where a param does (``p.grad = p.detach()``). AOT autograd
    compiles such inputs as views of one base, and Dynamo's guards (torch 2.13) do not tell
    them from separate memory: a graph compiled on them would run later steps on separate
    memory wrongly (also read back from Inductor's cache). A step that goes through Dynamo
    with such a gradient runs on copies of the gradients instead."""
    if not all(type(t) in PLAIN_TENSORS for t in itertools.chain(params, grads)):
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


def _leaves(*mappings: dict[str, Any]) -> list[Any]:
    """The values of ``mappings``, in order, tuples flattened."""
    return [leaf for mapping in mappings for value in mapping.values() for leaf in _flat_value(value)]


def _flat_value(value: Any) -> list[Any]:
    return [leaf for v in value for leaf in _flat_value(v)] if isinstance(value, tuple) else [value]


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


HORIZONTAL_FUSION_ELEMENTS = 1 << 16


def _loop_elements(node: Any) -> int | None:
    """The number of iterations of a scheduler node's loops (None: unknown, e.g. symbolic)."""
    try:  # ``group``: (device, loop sizes), tuples of sizes on CPU, their products on GPU
        _, sizes = node.group
        count = 1
        for part in sizes:
            for size in part if isinstance(part, tuple) else (part,):
                count *= int(size)
    except (AttributeError, TypeError, ValueError):  # no group, or a symbolic size
        return None
    return count


if InductorChoices is not None:

    class StreamingChoices(InductorChoices):
        """Inductor's heuristics, but no horizontal fusion on CPU of loops over more than
        ``HORIZONTAL_FUSION_ELEMENTS`` elements.

        Inductor fuses independent loops of the same range (the updates of same-sized params)
        into one loop, up to ``cpp.max_horizontal_fusion_size`` (16) nodes. Small loops are
        worth fusing (one loop's overhead and barrier instead of several); a fused loop over
        large tensors streams every fused tensor's arrays at once (15 for the three 512x512x3x3
        convolutions of ResNet-18 under SGD-momentum) through a memory-bound update, and saves
        nothing. On ResNet-18's params against torch's fused SGD (six processes, each timing
        both, with the params re-allocated every 10 rounds): 0.955-0.988x with the limit,
        0.992-1.009x without; AdamW and Adagrad within 0.01x of unchanged."""

        @staticmethod
        def can_fuse_horizontal(scheduler: Any, node1: Any, node2: Any, shared_data_score: int) -> bool:
            if all(node.is_cpu() for node in (node1, node2)):
                sizes = (_loop_elements(node1), _loop_elements(node2))
                if None not in sizes and max(sizes) > HORIZONTAL_FUSION_ELEMENTS:
                    return False
            return InductorChoices.can_fuse_horizontal(scheduler, node1, node2, shared_data_score)

        def uuid(self) -> str:
            """What Inductor's cache keys record of these heuristics."""
            return f"{__name__}.StreamingChoices({HORIZONTAL_FUSION_ELEMENTS})"

else:  # pragma: no cover - depends on the torch build
    StreamingChoices = None


def _graph_call(
    ran: list[tuple[Graph, list[int], Any]], flat: list, written: list, vectors: tuple
) -> GraphCall | None:
    """The graphs Dynamo has just run for this layout, or None where that is not certain: one
    graph per function, the scalar one returning exactly ``vectors``, every graph input found
    in ``flat`` or ``vectors``, and no two written tensors sharing storage (Dynamo's guards
    decide every step then)."""
    if len(ran) != 2 or len({t.untyped_storage().data_ptr() for t in written}) != len(written):
        return None
    (scalar_graph, scalar_ids, outputs), (update_graph, update_ids, _) = ran
    if len(outputs) != len(vectors) or not all(map(operator.is_, outputs, vectors)):
        return None
    position: dict[int, int] = {}
    aliases = []
    for i, t in enumerate([*flat, *vectors]):
        if isinstance(t, torch.Tensor):
            if id(t) in position:
                aliases.append((position[id(t)], i))
            else:
                position[id(t)] = i
    index_scalars = [position.get(i) for i in scalar_ids]
    index_update = [position.get(i) for i in update_ids]
    if None in index_scalars or None in index_update or any(i >= len(flat) for i in index_scalars):
        return None
    return GraphCall(scalar_graph, index_scalars, update_graph, index_update, aliases, flat)


def _observed_call(graph: Graph, args: tuple) -> tuple[Graph, Any]:
    """``graph(*args)``, and what to call in its place from then on: Inductor's compiled code
    itself, without the wrappers AOT autograd puts around it (~10 us per call, 0.1 ms with
    thousands of inputs), where this call showed that they handed it ``args`` as they were,
    returned its outputs, and only incremented the version counters of the inputs the code
    writes (as an in-place op does: the direct call increments them too); else ``graph``.

    Only with grad mode and autocast off, where the wrappers do nothing else (:class:`GraphCall`
    checks that the state is unchanged), and not while the profiler runs, which labels graph
    calls through the wrappers."""
    inner = inspect.unwrap(graph)  # (Inductor's CompiledFxGraph, at the end of the wrappers)
    code, mutated = getattr(inner, "current_callable", None), getattr(inner, "mutated_input_idxs", None)
    if code is None or mutated is None or torch.is_grad_enabled() or _autocast_enabled():
        return graph, graph(*args)
    written, before = sorted(mutated), versions(args)
    if any(i >= len(args) or before[i] is None for i in written):  # (None: an inference tensor)
        return graph, graph(*args)
    seen: list[Any] = []

    def watched(inputs: list) -> Any:
        seen.extend((list(inputs), versions(inputs)))
        outputs = code(inputs)
        seen.extend((outputs, versions(args)))
        return outputs

    inner.current_callable = watched
    try:
        outputs = graph(*args)
    finally:
        inner.current_callable = code
    if len(seen) != 4 or len(seen[0]) != len(args) or not all(map(operator.is_, seen[0], args)):
        return graph, outputs
    if len(seen[2]) != len(outputs) or not all(map(operator.is_, seen[2], outputs)):
        return graph, outputs
    # each written input's counter moved by the wrappers (before the code ran, or after it), and
    # no other input's but one sharing a written input's memory (a view of it: one counter)
    after, ran_with, ran_to = versions(args), seen[1], seen[3]
    moved = [
        i for i, v in enumerate(before) if v is not None and (ran_with[i] - v) + (after[i] - ran_to[i]) > 0
    ]
    shared = {args[i].untyped_storage().data_ptr() for i in written}
    if not set(written) <= set(moved) or any(
        i not in mutated and args[i].untyped_storage().data_ptr() not in shared for i in moved
    ):
        return graph, outputs
    pick_written = _picker(written)

    def direct(*args: Any) -> Any:
        if profiler_enabled():
            return graph(*args)
        increment_version(pick_written(args))
        return code(list(args))

    # as Dynamo calls its graphs: not traced, should a compiled frame reach the call
    return dynamo_disable(direct), outputs


def _own_code(function: Callable, owner: Any) -> Callable:
    """``function`` with a code object of its own, whose Dynamo cache is freed with ``owner``."""
    own = types.FunctionType(
        function.__code__.replace(), function.__globals__, function.__name__, None, function.__closure__
    )
    # Dynamo's cache entries on a code object are not freed with it: drop them with the owner
    weakref.finalize(owner, _release_compiled, own.__code__)
    return own


def _metadata(values: Sequence[Any]) -> list[Any]:
    """What a compiled graph specializes on: a tensor's dtype, shape, layout, strides and
    device; a Python value's type and value."""
    return [
        (v.dtype, v.shape, v.layout, v.stride() if v.layout == torch.strided else None, v.device)
        if isinstance(v, torch.Tensor)
        else (type(v), v)
        for v in values
    ]


def _release_compiled(code: types.CodeType) -> None:
    """Free the graphs Dynamo compiled for ``code`` (its cache lives on the code object)."""
    if reset_code is not None:
        reset_code(code)
