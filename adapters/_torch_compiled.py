"""The torch adapter's ``compile=True`` step: a rule's step compiled by ``torch.compile`` as two
graphs (the scalar arithmetic, then the update of every param), called straight through the
compiled graphs while the layout they were compiled for holds.

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
import operator
import types
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch._inductor.compile_fx import compile_fx

try:  # Inductor's heuristics hook (a private API: Inductor's own heuristics where it is missing)
    from torch._inductor.choices import InductorChoices
    from torch._inductor.virtualized import V
except ImportError:  # pragma: no cover - depends on the torch build
    InductorChoices = V = None

try:  # Dynamo's C++ checks (a private API: Python comparisons stand in where it is missing)
    from torch._C._dynamo.guards import GlobalStateGuard, TensorGuards
except ImportError:  # pragma: no cover - depends on the torch build
    GlobalStateGuard = TensorGuards = None

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
        breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
        with warnings.catch_warnings():
            # array_api_compat caches its type checks (``_issubclass_fast``: pure functions of a
            # class) with lru_cache, which Dynamo traces through and says so once per function
            warnings.filterwarnings("ignore", message=_LRU_CACHE_NOTICE, category=UserWarning)
            vectors = self._dynamo(scalar_args, update_args)
        ran, self._ran = self._ran, []
        if vectors is None or sum(torch._dynamo.utils.counters["graph_break"].values()) != breaks:
            return None  # eager, or more than one graph per function: Dynamo runs every call
        return _graph_call(ran, flat, written, vectors)

    def _through_dynamo(self, scalar_args: tuple, update_args: tuple) -> tuple | None:
        """The step through Dynamo; the scalar vectors (None where it fell back to eager)."""
        (scalars, update), (compiled_scalars, compiled_update) = self._eager, self._compiled
        try:
            vectors, layout = compiled_scalars(*scalar_args)
        except torch._dynamo.exc.BackendCompilerFailed as error:
            # raised while compiling, before the step ran: nothing has been written yet
            self._fall_back(error)
            update(*scalars(*scalar_args), *update_args)
            return None
        try:
            compiled_update(vectors, layout, *update_args)
        except torch._dynamo.exc.BackendCompilerFailed as error:
            self._fall_back(error)
            update(vectors, layout, *update_args)
            return None
        return vectors

    def _fall_back(self, error: Exception) -> None:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        self._on_fallback(first_line)
        self._dynamo = None


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
    pick_written, increment = _picker(written), torch._C._increment_version

    def direct(*args: Any) -> Any:
        if torch.autograd.profiler._is_profiler_enabled:
            return graph(*args)
        increment(pick_written(args))
        return code(list(args))

    # as Dynamo calls its graphs: not traced, should a compiled frame reach the call
    return torch._dynamo.disable(direct), outputs


def versions(values: Sequence[Any]) -> list[int | None]:
    """Each value's version counter; None for a number (old checkpoints' ``step``) and for an
    inference tensor, which has none."""
    return [v._version if isinstance(v, torch.Tensor) and not v.is_inference() else None for v in values]


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
    reset_code = getattr(torch._dynamo.eval_frame, "reset_code", None)
    if reset_code is not None:
        reset_code(code)
