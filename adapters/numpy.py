"""NumPy / CuPy adapter: a stateful optimizer that updates the user's arrays in place.

For hand-written training loops over mutable arrays (NumPy, CuPy, array_api_strict)::

    opt = ArrayOptimizer(params, ao.adamw(1e-3))
    for batch in data:
        opt.step(grads_of(params, batch))      # params' arrays now hold the new values

The maths is the core's. What this adapter adds is the memory behaviour a plain-array loop
needs: every new value is written into the existing arrays (the standard's ``x[...] = y``), and
elementwise rules run over each leaf in cache-sized chunks of flat views, so the temporaries of
one chunk stay in cache and each array crosses memory about once per step. Results are bitwise
those of the functional API (the chunks see the same operations on the same elements).
JAX arrays are immutable: use ``opt.init``/``opt.step`` (or ``adapters.jax``) there.
"""

from __future__ import annotations

from typing import Any

from agnostic_optim import _backend, checkpoint, chunking, engine, trees

__all__ = ["ArrayOptimizer"]

PyTree = Any
# 128k elements: a chunk of every operand still fits in L2, and NumPy's temporary elision (>= 256 KiB)
# reuses temporaries (benchmarks/jax_step.py, ResNet-18 AdamW float32: 33 ms vs 40 ms at 32k).
CHUNK_ELEMENTS = 1 << 17


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
        views, grad_views, buffer_views = chunking.chunk_views(
            xp, param_leaves, grad_leaves, buffer_leaves, size
        )
        view_state = self.state._replace(buffers=buffer_views)
        new_state, _ = engine.apply_rule(rule, view_state, grad_views, views, {}, in_place=True)
        self.state = new_state._replace(buffers=self.state.buffers)
        return self.params

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
