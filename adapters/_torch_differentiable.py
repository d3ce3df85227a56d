"""The torch adapter's ``differentiable=True`` executor: a step autograd can go through.

torch.optim's ``differentiable=True`` runs the step with grad mode on, so that a meta-learning
loop can backpropagate through ``opt.step()`` to the params, gradients, state and tensor
hyperparameters (a learning rate that requires grad) it started from. This executor runs the
core's pure rule -- :func:`engine.prepare_step` and :func:`engine.update_leaves`, leaf by leaf,
out of place -- on copies of the params and state, and writes the results back with ``copy_``,
which autograd records: each param and state tensor then carries the step's graph, as the
in-place updates of torch.optim's own differentiable step leave it. (The copies keep the values
the graph saved from being overwritten by those writes.) Like torch.optim, it refuses to write
into a leaf tensor that requires grad: pass ``param.detach()`` or a non-leaf tensor.
"""

from __future__ import annotations

from typing import Any

import torch

from agnostic_optim import engine
from agnostic_optim.adapters._torch_plan import XP, NothingKept, Subset, prepare_scalars


class DifferentiableExecutor:
    """Runs steps with autograd recording (grad mode is on: see the front's ``step``)."""

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
        before = [p.clone() for p in params]
        buffers_before = {name: [b.clone() for b in values] for name, values in buffers.items()}
        step = prepare_scalars(rule, subset, hparams, scheduled, grads, before, buffers_before, leaf_inputs)
        new_params, new_buffers = engine.update_leaves(
            rule,
            XP,
            engine.ScalarCaster(XP, step.values).for_leaf,
            grads,
            before,
            buffers_before,
            leaf_inputs,
            subset.flags,
        )
        for p, new in zip(params, new_params):
            p.copy_(new)
        for name, values in new_buffers.items():
            for buffer, new in zip(buffers[name], values):
                buffer.copy_(new)
        for k, v in step.running.items():
            for s in states:
                s[k].copy_(v)
        return False
