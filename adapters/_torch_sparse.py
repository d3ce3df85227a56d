"""The torch adapter's sparse executor: a step on the elements a sparse gradient holds.

``nn.Embedding(sparse=True)`` gives a sparse COO gradient: the rows of the looked-up tokens.
For a rule that declares ``sparse_support`` (an element with a zero gradient keeps its param
and state -- Adagrad, SGD without momentum or weight decay -- or a rule defined on the
gradient's support, SparseAdam), the step runs on those elements only: the gradient is
coalesced (duplicate indices summed, as torch.optim does), the params' and buffers' elements at
its indices are gathered, the core's rule runs on them (:func:`engine.prepare_step`,
:func:`engine.update_leaves`) and the results are written back at the same indices. The cost
follows the gradient's size, not the table's. Dense gradients in the same step run on their
whole param. For a sparse gradient of a rule without ``sparse_support`` (SGD with momentum or
weight decay) the front densifies it and the dense executor runs, as torch.optim's numbers are
those of the dense step.
"""

from __future__ import annotations

from typing import Any

import torch

from agnostic_optim import engine
from agnostic_optim.adapters._torch_plan import XP, NothingKept, Subset, prepare_scalars, store_running


def _support(grad: torch.Tensor) -> tuple[tuple[torch.Tensor, ...] | None, torch.Tensor]:
    """(the indices a sparse gradient holds, or None for a dense one; its values there)."""
    if not grad.is_sparse:
        return None, grad
    grad = grad.coalesce()
    return tuple(grad.indices()), grad.values()


class SparseExecutor:
    """Runs steps on the support of each param's gradient (see the module docstring)."""

    lay_out = NothingKept.lay_out

    @staticmethod
    def step(
        rule: engine.Rule,
        subset: Subset,
        hparams: dict[str, Any],
        scheduled: dict[str, Any],
        grads: list[torch.Tensor],
        leaf_inputs: dict[str, list[torch.Tensor]],
        keeps_step: bool,
    ) -> bool:
        params, states, buffers = subset.params, subset.states, subset.buffers
        supports, values = zip(*map(_support, grads))

        def gather(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
            return [t if where is None else t[where] for t, where in zip(tensors, supports)]

        gathered = {name: gather(tensors) for name, tensors in buffers.items()}
        at_support = gather(params)
        step = prepare_scalars(
            rule, subset, hparams, scheduled, list(values), at_support, gathered, leaf_inputs
        )
        new_params, new_buffers = engine.update_leaves(
            rule, XP, engine.ScalarCaster(XP, step.values).for_leaf, list(values), at_support, gathered
        )
        for name, tensors in [("", params), *buffers.items()]:
            news = new_params if name == "" else new_buffers[name]
            for tensor, where, new in zip(tensors, supports, news):
                if where is None:
                    tensor.copy_(new)
                else:
                    tensor[where] = new
        store_running(states, step)
        return False
