"""NumPy / CuPy adapter: a stateful optimizer that updates the user's arrays in place.

For hand-written training loops over mutable arrays (NumPy, CuPy, array_api_strict)::

    opt = ArrayOptimizer(params, ao.adamw(1e-3))
    for batch in data:
        opt.step(grads_of(params, batch))      # params' arrays now hold the new values

The maths is the core's. What this adapter adds is the memory behaviour a plain-array loop
needs: every new value is written into the existing arrays (the standard's ``x[...] = y``), and
elementwise rules run over each leaf in cache-sized chunks of flat views, so the temporaries of
one chunk stay in cache and each array crosses memory about once per step. On NumPy the rule
runs once per step on symbolic operands and its operations replay over the chunks as ufunc
calls with ``out=``: results go straight into the params and buffers, temporaries into a few
chunk-sized scratch buffers kept between steps, so a step allocates nothing
(``adapters/_chunk_program.py``; :attr:`ArrayOptimizer.recorded` tells whether a step ran so),
and a step over more than a million elements splits its chunks between threads (``threads=``).
Other namespaces (CuPy, array_api_strict, torch) and rules the recorder cannot express run the
rule directly on each chunk. Either way results are bitwise those of the functional API (the
chunks see the same operations on the same elements). JAX arrays are immutable: use
``opt.init``/``opt.step`` (or ``adapters.jax``) there.
"""

from __future__ import annotations

import bisect
import operator
import warnings
from typing import Any

import array_api_compat
import numpy as np

try:
    from numpy.lib.array_utils import byte_bounds
except ImportError:  # NumPy 1.x
    from numpy import byte_bounds

from agnostic_optim import checkpoint, chunking, engine, trees
from agnostic_optim.adapters import _chunk_program

__all__ = ["ArrayOptimizer"]

PyTree = Any
# 128k elements: each recorded operation is one ufunc call per chunk (~0.5 us of Python), so smaller
# chunks cost more calls than they gain in cache (benchmarks/jax_step.py, ResNet-18 AdamW float32:
# 22 ms at 128k and 256k, 25 ms at 32k, 28 ms at 16k).
CHUNK_ELEMENTS = 1 << 17
# Recorded programs mirror NumPy 2's type promotion (NEP 50: 0-d arrays are not value-based).
_RECORDABLE = int(np.__version__.split(".")[0]) >= 2


class ArrayOptimizer:
    """Holds an optimizer's state and applies its steps in place to ``params``.

    Args:
      params: a pytree of writeable arrays (NumPy, CuPy, array_api_strict...). The same array
        objects are updated by every ``step``; a leaf may be rebound to another array between
        steps. Views into the params and buffers are kept from step to step (so NumPy refuses
        to ``resize`` them in place).
      opt: any ``agnostic_optim`` optimizer.
      chunk_elements: chunk length for elementwise rules (0 disables chunking).
      threads: how many threads a recorded step over more than about a million elements
        splits its chunks between (the calling thread included); None: every core this
        process may use. Results do not depend on it.

    Gradients are read as they are before the step, even when they share memory with a param
    or a buffer (those are copied first), as the functional API reads them.
    """

    def __init__(
        self,
        params: PyTree,
        opt: engine.Optimizer,
        *,
        chunk_elements: int = CHUNK_ELEMENTS,
        threads: int | None = None,
    ):
        leaves, self._treedef = trees.flatten(params)
        if not leaves:
            raise ValueError("params holds no arrays")
        for leaf in leaves:
            _check_writeable(leaf)
        _refuse_shared(leaves, params)
        self.params = params
        self.opt = opt
        self.chunk_elements = chunk_elements
        self.state = opt.init(params)
        self._program = _chunk_program.ProgramBatching(threads) if _RECORDABLE else None
        self.threads = threads
        self._layout: _StepLayout | None = None
        self._recorded = False

    def step(self, grads: PyTree, **inputs: Any) -> PyTree:
        """Apply one step with ``grads``; the arrays of ``params`` are updated in place."""
        rule = self.opt.rule
        self._recorded = False
        if rule is None or inputs:
            self.state, new_params = self.opt.step(self.state, grads, self.params, **inputs)
            for leaf, new in zip(trees.flatten(self.params)[0], trees.flatten(new_params)[0]):
                leaf[...] = new
            return self.params
        xp, grad_leaves, param_leaves, _ = engine.flatten_step_inputs(grads, self.params)
        buffer_leaves = {
            name: trees.flatten_like(self._treedef, tree, f"state buffer {name!r}")
            for name, tree in self.state.buffers.items()
        }
        if self._layout is None or not self._layout.made_for([*param_leaves], 0, prefix=True):
            # (leaves rebound since the last step: checked before anything is written)
            _refuse_shared(param_leaves, self.params)
            engine.check_state(rule, xp, self.state, param_leaves, buffer_leaves)
        size = self.chunk_elements if rule.elementwise and rule.mask is None else 0
        layout = self._layout_for(xp, param_leaves, buffer_leaves, size)
        grad_leaves = layout.unaliased(grad_leaves)
        if layout.groups is not None and self._program is not None:
            self._recorded = self._recorded_step(rule, xp, grad_leaves, param_leaves, layout)
            if self._recorded:
                return self.params
        chunks = layout.chunks
        view_state = self.state._replace(buffers=chunks.buffers)
        new_state, _ = engine.apply_rule(
            rule, view_state, chunks.cut_grads(xp, grad_leaves), chunks.params, {}, in_place=True
        )
        self.state = new_state._replace(buffers=self.state.buffers)
        return self.params

    def _layout_for(self, xp: Any, params: list, buffers: dict[str, list], size: int) -> _StepLayout:
        """The step's chunk views and leaf groups. On NumPy they are kept while the params and
        buffers are the same arrays (the user may rebind a leaf; ``load_state_dict`` replaces the
        buffers): an ndarray never changes its memory. A torch tensor can (``p.data = ...``), so
        other namespaces cut their views afresh each step."""
        leaves = [*params, *(leaf for leaves in buffers.values() for leaf in leaves)]
        if self._layout is not None and self._layout.made_for(leaves, size):
            return self._layout
        chunks = chunking.chunk_layout(xp, params, buffers, size)
        if not array_api_compat.is_numpy_namespace(xp):
            return _StepLayout(leaves, size, chunks, None)
        groups = None
        if size > 0 and self._program is not None:
            groups = engine.leaf_groups(chunks.params, chunks.buffers, None, batched=True)
        self._layout = _StepLayout(leaves, size, chunks, groups)
        return self._layout

    def _recorded_step(
        self, rule: engine.Rule, xp: Any, grads: list, params: list, layout: _StepLayout
    ) -> bool:
        """One step as recorded programs (``_chunk_program``); False, with nothing written, when
        the rule cannot be recorded (it then runs directly, which raises any genuine error)."""
        step = engine.prepare_step(rule, self.state, xp, grads, params, {})
        caster = engine.ScalarCaster(xp, step.values)
        chunks = layout.chunks
        try:
            engine.update_leaves(
                rule,
                xp,
                caster.for_leaf,
                chunks.cut_grads(xp, grads),
                chunks.params,
                chunks.buffers,
                batching=self._program,
                in_place=True,
                groups=layout.groups,
            )
        except Exception as err:  # Unsupported, or an operation a Symbol lacks (``np.tanh(g)``)
            self._program.discard()
            self._program = None  # this rule runs directly from now on
            warnings.warn(
                f"ArrayOptimizer runs {rule.name!r} directly, chunk by chunk: it could not be recorded "
                f"({type(err).__name__}: {err}). Results are the same; steps are slower.",
                stacklevel=3,
            )
            return False
        except BaseException:  # interrupted: drop what was recorded, write nothing
            self._program.discard()
            raise
        self._program.run()
        self.state = self.state._replace(count=step.count, scheduled=step.scheduled, scalars=step.running)
        return True

    def __getstate__(self) -> dict[str, Any]:
        """For ``copy.deepcopy``: the kept layout holds views into this optimizer's own arrays,
        and the scratch buffers are no state; a copy makes its own."""
        state = dict(self.__dict__)
        state["_layout"] = None
        if state["_program"] is not None:
            state["_program"] = _chunk_program.ProgramBatching(self.threads)
        return state

    @property
    def recorded(self) -> bool:
        """Whether the latest step ran as recorded ufunc programs over cache-sized chunks (the
        fast path for elementwise rules on NumPy; see ``adapters/_chunk_program.py``)."""
        return self._recorded

    def state_dict(self) -> dict[str, Any]:
        """The state as ``{name: array}`` (see :func:`agnostic_optim.checkpoint.state_to_dict`)."""
        return checkpoint.state_to_dict(self.state)

    def load_state_dict(self, arrays: dict[str, Any]) -> None:
        """Replace the state with ``arrays`` (as returned by :meth:`state_dict`, any backend)."""
        self.state = checkpoint.state_from_dict(self.state, arrays)


def _check_writeable(leaf: Any) -> None:
    if array_api_compat.is_lazy_array(leaf) or not hasattr(leaf, "__setitem__"):
        raise TypeError(
            f"ArrayOptimizer updates arrays in place, and {type(leaf).__module__}.{type(leaf).__name__} "
            "arrays are immutable; use the functional API (opt.init / opt.step) or "
            "agnostic_optim.adapters.jax for JAX"
        )
    try:
        leaf[...] = leaf
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"ArrayOptimizer needs writeable arrays ({err}); use the functional API (opt.init / opt.step)"
        ) from None


def _refuse_shared(leaves: list, params: PyTree) -> None:
    """Refuse two param leaves that are one array, or (NumPy) views of overlapping memory:
    an in-place step would write one param's update over the other's."""
    seen: dict[int, int] = {}
    for i, leaf in enumerate(leaves):
        if id(leaf) in seen:
            names = trees.leaf_paths(params, "params")
            raise ValueError(f"{names[seen[id(leaf)]]} and {names[i]} are the same array")
        seen[id(leaf)] = i
    if not array_api_compat.is_numpy_array(leaves[0]):
        return
    reach, owner = -1, -1  # the furthest end among the ranges so far, and its leaf
    for start, end, j in sorted((*byte_bounds(leaf), i) for i, leaf in enumerate(leaves) if leaf.size):
        if start < reach and np.shares_memory(leaves[owner], leaves[j]):
            names = trees.leaf_paths(params, "params")
            raise ValueError(f"{names[owner]} and {names[j]} share memory (views of one array)")
        if end > reach:
            reach, owner = end, j


class _StepLayout:
    """What a step needs about its params and buffers, made once for the same arrays: chunk
    views, leaf groups of recorded steps (None: direct steps), and the memory they own, so
    that gradients sharing it are copied first (the step writes some results before it reads
    every gradient; the functional API reads them all first). NumPy arrays are compared by
    byte range, torch tensors by storage."""

    def __init__(self, leaves: list, size: int, chunks: chunking.ChunkLayout, groups: list | None):
        self.leaves, self.size, self.chunks, self.groups = leaves, size, chunks, groups
        self.starts: list[int] = []  # NumPy: owned byte ranges, sorted by start
        self.reach: list[int] = []  # the furthest end among the ranges up to each one
        self.storages: set[int] = set()  # torch: the owned storages' addresses
        if array_api_compat.is_numpy_array(leaves[0]):
            for start, end in sorted(byte_bounds(leaf) for leaf in leaves if leaf.size):
                self.starts.append(start)
                self.reach.append(max(end, self.reach[-1]) if self.reach else end)
        elif array_api_compat.is_torch_array(leaves[0]):
            self.storages = {leaf.untyped_storage().data_ptr() for leaf in leaves}

    def made_for(self, leaves: list, size: int, prefix: bool = False) -> bool:
        """Whether the layout was made for these arrays (``prefix``: these params, whatever the
        chunk size) and this chunk size."""
        if prefix:
            return len(leaves) <= len(self.leaves) and all(map(operator.is_, leaves, self.leaves))
        return (
            size == self.size
            and len(leaves) == len(self.leaves)
            and all(map(operator.is_, leaves, self.leaves))
        )

    def unaliased(self, grads: list) -> list:
        """``grads``, with a copy of each that may share memory with a param or buffer."""
        if self.storages:
            return [g.clone() if g.untyped_storage().data_ptr() in self.storages else g for g in grads]
        if not self.starts:
            return grads
        out = []
        for grad in grads:
            start, end = byte_bounds(grad) if grad.size else (0, 0)
            k = bisect.bisect_left(self.starts, end)  # ranges that start before this one ends
            out.append(grad.copy() if grad.size and k and self.reach[k - 1] > start else grad)
        return out
