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
(``adapters/_chunk_program.py``; :attr:`ArrayOptimizer.recorded` tells whether a step ran so).
Other namespaces (CuPy, array_api_strict, torch) and rules the recorder cannot express run the
rule directly on each chunk. Either way results are bitwise those of the functional API (the
chunks see the same operations on the same elements). JAX arrays are immutable: use
``opt.init``/``opt.step`` (or ``adapters.jax``) there.
"""

from __future__ import annotations

from typing import Any

import array_api_compat
import numpy as np

from agnostic_optim import _backend, checkpoint, chunking, engine, trees
from agnostic_optim.adapters import _chunk_program

__all__ = ["ArrayOptimizer"]

PyTree = Any
# 128k elements: a chunk of every operand still fits in L2, and NumPy's temporary elision (>= 256 KiB)
# reuses temporaries (benchmarks/jax_step.py, ResNet-18 AdamW float32: 33 ms vs 40 ms at 32k).
CHUNK_ELEMENTS = 1 << 17
# Recorded programs mirror NumPy 2's type promotion (NEP 50: 0-d arrays are not value-based).
_RECORDABLE = int(np.__version__.split(".")[0]) >= 2


class ArrayOptimizer:
    """Holds an optimizer's state and applies its steps in place to ``params``.

    Args:
      params: a pytree of writeable arrays (NumPy, CuPy, array_api_strict...). The same array
        objects are updated by every ``step``.
      opt: any ``agnostic_optim`` optimizer.
      chunk_elements: chunk length for elementwise rules (0 disables chunking).
    """

    def __init__(self, params: PyTree, opt: engine.Optimizer, *, chunk_elements: int = CHUNK_ELEMENTS):
        leaves, self._treedef = trees.flatten(params)
        if not leaves:
            raise ValueError("params holds no arrays")
        for leaf in leaves:
            _check_writeable(leaf)
        self.params = params
        self.opt = opt
        self.chunk_elements = chunk_elements
        self.state = opt.init(params)
        self._program = _chunk_program.ProgramBatching() if _RECORDABLE else None
        self._layout: tuple | None = None  # (key, chunk layout, leaf groups) of recorded steps
        self._recorded = False

    def step(self, grads: PyTree, **inputs: Any) -> PyTree:
        """Apply one step with ``grads``; the arrays of ``params`` are updated in place."""
        rule = self.opt.rule
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
        size = self.chunk_elements if rule.elementwise and rule.mask is None else 0
        self._recorded = (
            self._program is not None
            and size > 0
            and array_api_compat.is_numpy_namespace(xp)
            and not _aliased(grad_leaves, param_leaves, buffer_leaves)
            and self._recorded_step(rule, xp, grad_leaves, param_leaves, buffer_leaves, size)
        )
        if self._recorded:
            return self.params
        views, grad_views, buffer_views = chunking.chunk_views(
            xp, param_leaves, grad_leaves, buffer_leaves, size
        )
        view_state = self.state._replace(buffers=buffer_views)
        new_state, _ = engine.apply_rule(rule, view_state, grad_views, views, {}, in_place=True)
        self.state = new_state._replace(buffers=self.state.buffers)
        return self.params

    def _recorded_step(
        self,
        rule: engine.Rule,
        xp: Any,
        grads: list[Any],
        params: list[Any],
        buffers: dict[str, list[Any]],
        size: int,
    ) -> bool:
        """One step as recorded programs (``_chunk_program``) over chunk views kept from step
        to step; False, with nothing written, when the rule cannot be recorded."""
        key = (size, *map(id, params), *(id(leaf) for leaves in buffers.values() for leaf in leaves))
        if self._layout is None or self._layout[0] != key:
            layout = chunking.chunk_layout(xp, params, buffers, size)
            groups = engine.leaf_groups(layout.params, layout.buffers, None, self._program)
            self._layout = (key, layout, groups)
        _, layout, groups = self._layout
        step = engine.prepare_step(rule, self.state, xp, grads, params, {})
        caster = engine.ScalarCaster(xp, step.values)
        try:
            engine.update_leaves(
                rule,
                xp,
                caster.for_leaf,
                layout.cut_grads(xp, grads),
                layout.params,
                layout.buffers,
                batching=self._program,
                in_place=True,
                groups=groups,
            )
        except _chunk_program.Unsupported:
            self._program.discard()  # nothing was written: this rule runs directly from now on
            self._program = self._layout = None
            return False
        self._program.run()
        self.state = engine.OptimizerState(
            step.count, self.state.hparams, step.scheduled, self.state.buffers, step.running
        )
        return True

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
    if _backend.is_lazy(leaf) or not hasattr(leaf, "__setitem__"):
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


def _aliased(grads: list[Any], params: list[Any], buffers: dict[str, list[Any]]) -> bool:
    """Whether a gradient may share memory with a param or buffer of its leaf (a recorded
    program writes some results before it reads every operand)."""
    for i, grad in enumerate(grads):
        if any(np.may_share_memory(grad, other[i]) for other in (params, *buffers.values())):
            return True
    return False
