"""The torch adapter's ``compile=True`` step: a rule's update compiled by ``torch.compile``, then
called straight through the compiled graph while the layout it was compiled for holds.

Dynamo checks every input of a compiled function on every call (sizes, strides, dtype, device of
each tensor: ~2,400 tensors for AdamW over 600 params) before it runs the graph. The adapter's
step plan already checks, in fewer and cheaper comparisons, that the params, state buffers and
step counters are the same tensors on the same storage (see ``_Plan.matches``). So the first
call of a layout goes through Dynamo (which compiles, or finds the graph it compiled before),
and the following calls of that layout hand the inputs to the graph Dynamo compiled for it,
after checking, besides the plan, what may have changed: the params' element counts and
strides (a ``.data`` swap to another view of the same memory keeps the data pointer), the
gradients' element counts, strides and dtypes, the scalars' and step inputs' metadata (and the
value of a scalar that is a Python number, which the graph holds as a constant), and which
inputs are one tensor. Anything else goes back through Dynamo. Not followed: a state buffer
rebound through ``.data`` to another view of its own memory (the plan sees the same tensor
and pointer).
"""

from __future__ import annotations

import itertools
import operator
import types
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch._inductor.compile_fx import compile_fx

Signature = tuple


class GraphCall:
    """One layout's compiled graph: its inputs picked from the step's flat input list.

    Dynamo gives a tensor passed twice one graph input: ``aliases`` are the pairs of positions
    that held one tensor when the graph was compiled, and must still do."""

    def __init__(
        self,
        graph: Callable[..., Any],
        index: list[int],
        aliases: list[tuple[int, int]],
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        other: list[Any],
    ):
        self.graph, self.aliases = graph, aliases
        # the graph's inputs, in its order, picked in one C-level call
        self.pick = operator.itemgetter(*index) if len(index) > 1 else lambda flat: (flat[index[0]],)
        self.layout = _layout(params, grads)
        self.other = _metadata(other)

    def accepts(self, flat: list[Any], params: list, grads: list, other: list[Any]) -> bool:
        return (
            _layout(params, grads) == self.layout
            and _metadata(other) == self.other
            and all(flat[i] is flat[j] for i, j in self.aliases)
        )

    def __call__(self, flat: list[Any]) -> None:
        self.graph(*self.pick(flat))  # (as Dynamo calls its graphs)


def _layout(params: list[torch.Tensor], grads: list[torch.Tensor]) -> list[list]:
    """The params' and gradients' element counts and strides (``p.data = p.data.t()`` keeps the
    data pointer the plan checks; with the strides, the count fixes the shape of any view of
    the same memory) and the gradients' dtypes (``p.grad_dtype = None`` lets them change): one
    C-level pass per property (a ``torch.Size`` per tensor would cost 3x a count)."""
    numel, stride, dtype = torch.Tensor.numel, torch.Tensor.stride, operator.attrgetter("dtype")
    return [
        list(map(numel, params)),
        list(map(stride, params)),
        list(map(numel, grads)),
        list(map(stride, grads)),
        list(map(dtype, grads)),
    ]


class CompiledRule:
    """``update`` (the rule's in-place step over lists of tensors) compiled by ``torch.compile``.

    Call it with the step's inputs and the object that keeps its layout (``holder.graph``)."""

    def __init__(self, owner: Any, update: Callable[..., None], on_fallback: Callable[[str], None]):
        # Dynamo keeps at most ``recompile_limit`` (8) graphs per code object and then runs the
        # function eagerly: each optimizer's rule gets a code object of its own, or every
        # compiled optimizer in a process would share the one of ``update``.
        own = types.FunctionType(
            update.__code__.replace(), update.__globals__, update.__name__, None, update.__closure__
        )
        # Dynamo's cache entries on a code object are not freed with it: drop them with us
        weakref.finalize(owner, _release_compiled, own.__code__)
        self._eager, self._on_fallback = own, on_fallback
        self._dynamo: Callable[..., None] | None = torch.compile(own, backend=self._compile, dynamic=False)
        self._graphs: dict[Signature, tuple[Callable, list[int]]] = {}  # layouts compiled so far
        self._compiled_now: list[tuple[Callable, list[int]]] = []

    def _compile(self, graph_module: torch.fx.GraphModule, example_inputs: list) -> Callable:
        """Dynamo's backend: Inductor, remembering the graph and which inputs it takes.

        Inductor's per-call size asserts are off: Dynamo's guards check every input's sizes and
        strides on the first call of a layout, and :class:`GraphCall` the ones that may change."""
        graph = compile_fx(graph_module, example_inputs, config_patches={"size_asserts": False})
        self._compiled_now.append((graph, [id(t) for t in example_inputs]))
        return graph

    def __call__(
        self,
        holder: Any,
        cast: dict,
        params: list,
        grads: list,
        buffers: dict,
        steps: list,
        flags: list | None,
        leaf_inputs: dict,
    ) -> None:
        # what changes from step to step, besides the gradients: the scalars and the inputs
        other = [*_leaves(*cast.values()), *itertools.chain(*leaf_inputs.values())]
        flat = [*other, *params, *grads, *itertools.chain(*buffers.values()), *steps]
        call = holder.graph
        if call is not None and call.accepts(flat, params, grads, other):
            call(flat)
            return
        args = (cast, params, grads, buffers, steps, flags, leaf_inputs)
        if self._dynamo is None:  # the compiler failed once: eager from then on
            self._eager(*args)
            return
        self._compiled_now.clear()
        breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
        try:
            self._dynamo(*args)
        except torch._dynamo.exc.BackendCompilerFailed as error:
            # raised while compiling, before the step ran: nothing has been written yet
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            self._on_fallback(first_line)
            self._dynamo = None
            self._eager(*args)
            return
        if sum(torch._dynamo.utils.counters["graph_break"].values()) != breaks:
            return  # more than one graph: Dynamo runs every call
        written = [*params, *itertools.chain(*buffers.values()), *steps]
        structure = (
            tuple((dtype, tuple(scalars)) for dtype, scalars in cast.items()),
            tuple(flags or ()),
            tuple(buffers),
            tuple(leaf_inputs),
            len(params),
        )
        holder.graph = self._graph_call(flat, params, grads, other, written, structure)

    def _graph_call(
        self, flat: list, params: list, grads: list, other: list, written: list, structure: tuple
    ) -> GraphCall | None:
        """The graph Dynamo has just run for this layout, or None where that is not certain."""
        if len({t.untyped_storage().data_ptr() for t in written}) != len(written):
            return None  # state sharing storage: Dynamo's guards decide every step
        position: dict[int, int] = {}
        aliases = []
        for i, t in enumerate(flat):
            if isinstance(t, torch.Tensor):
                if id(t) in position:
                    aliases.append((position[id(t)], i))
                else:
                    position[id(t)] = i
        signature = (
            tuple(_metadata(flat)),
            tuple(t.requires_grad for t in flat if isinstance(t, torch.Tensor)),
            tuple(aliases),
            structure,
        )
        if len(self._compiled_now) == 1:  # compiled on this call
            graph, input_ids = self._compiled_now[0]
            index = [position.get(i) for i in input_ids]
            if None in index:
                return None
            self._graphs[signature] = (graph, index)
        elif self._compiled_now or signature not in self._graphs:
            return None
        graph, index = self._graphs[signature]
        return GraphCall(graph, index, aliases, params, grads, other)


def _leaves(*mappings: dict[str, Any]) -> list[Any]:
    """The values of ``mappings``, in order, tuples flattened."""
    out: list[Any] = []

    def add(value: Any) -> None:
        if isinstance(value, tuple):
            for v in value:
                add(v)
        else:
            out.append(value)

    for mapping in mappings:
        for value in mapping.values():
            add(value)
    return out


def _metadata(values: list[Any]) -> list[Any]:
    """What a compiled graph specializes on: a tensor's dtype, shape, strides and device; a
    Python value's type and value."""
    return [
        (v.dtype, v.shape, v.stride(), v.device) if isinstance(v, torch.Tensor) else (type(v), v)
        for v in values
    ]


def _release_compiled(code: types.CodeType) -> None:
    """Free the graphs Dynamo compiled for ``code`` (its cache lives on the code object)."""
    reset_code = getattr(torch._dynamo.eval_frame, "reset_code", None)
    if reset_code is not None:
        reset_code(code)
