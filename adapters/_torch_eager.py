"""The torch adapter's default executor: a rule's step on ``torch._foreach_*`` kernels.

The scalar half of the step (:func:`engine.prepare_step`: bias corrections, schedules, global
norms) runs once, on 0-d float64 tensors; the array half (:func:`engine.update_leaves`) runs
the core's *unchanged* update rule on :class:`~._tensor_list.TensorList` operands, one per
block of same-dtype leaves, so each array-API operation is one fused ``_foreach`` kernel over
the block, evaluated lazily into multiply-adds and straight into the params and state (see
``_tensor_list``). No compilation, no host syncs, instant start.

Elementwise rules run over flat chunks of at most :data:`CHUNK_ELEMENTS` of each leaf, in
blocks of about :data:`BLOCK_ELEMENTS` (cache blocking, :mod:`agnostic_optim.chunking`): the
~10-20 operations of a step then run on data that stays in cache. Rules that need each leaf's
own array (Shampoo's matrices) run leaf by leaf.
"""

from __future__ import annotations

from typing import Any

import torch

from agnostic_optim import chunking, engine
from agnostic_optim.adapters._tensor_list import NAMESPACE, TensorList, store
from agnostic_optim.adapters._torch_plan import XP, Subset, prepare_scalars, store_running

# Leaves are cut into flat chunks of at most CHUNK_ELEMENTS and processed in blocks of about
# BLOCK_ELEMENTS. With the step evaluated in place (a single temporary at most), chunks of
# 1 << 20 were fastest on a 2-core CPU in benchmarks/torch_step.py (ResNet-18 SGD-momentum
# 7.2 ms vs 8.9 ms with 1 << 18). Blocks of 1 << 21 against 1 << 20: the same on ResNet-18
# (SGD-momentum, AdamW), and on the 600-small-tensor set a little slower while the machine's
# memory ran fast (RMSprop 9.95 vs 9.71 ms, AdamW 15.6 vs 14.8) but much faster while it ran
# slow (RMSprop 13.9 vs 15.6 ms, Adagrad 13.6 vs 15.2; torch foreach 15.3 and 17.5).
CHUNK_ELEMENTS = 1 << 20
BLOCK_ELEMENTS = 1 << 21


class ForeachBatching:
    """The :class:`engine.Batching` of the eager executor: same-dtype, same-device leaves
    packed into a :class:`TensorList`, results evaluated straight into their leaves."""

    xp = NAMESPACE

    @staticmethod
    def pack(arrays: list[torch.Tensor]) -> TensorList:
        return TensorList(arrays)

    @staticmethod
    def store(pairs: list[tuple[list[torch.Tensor], TensorList]]) -> None:
        store(pairs)


_BATCHING = ForeachBatching()


class EagerLayout:
    """A subset's chunk views (:class:`chunking.ChunkLayout`) and the leaf groups run together."""

    def __init__(self, chunks: chunking.ChunkLayout, groups: list, batching: ForeachBatching | None):
        self.chunks, self.groups, self.batching = chunks, groups, batching
        # the params and buffers cut into views: their memory must stay where it is
        self.viewed: list[torch.Tensor] = []

    @classmethod
    def make(
        cls, rule: engine.Rule, params: list[torch.Tensor], buffers: dict[str, list], flags: list | None
    ) -> EagerLayout:
        size = CHUNK_ELEMENTS if rule.elementwise and rule.mask is None else 0
        chunks = chunking.chunk_layout(XP, params, buffers, size)
        # leaves packed into _foreach lists unless the rule needs each leaf's own array
        batching = _BATCHING if rule.batchable else None
        groups = engine.leaf_groups(
            chunks.params, chunks.buffers, flags, batched=batching is not None, block_elements=BLOCK_ELEMENTS
        )
        layout = cls(chunks, groups, batching)
        layout.viewed = [
            t
            for i, spans in enumerate(chunks.spans)
            if spans is not None
            for t in (params[i], *(leaves[i] for leaves in buffers.values()))
        ]
        return layout


class EagerExecutor:
    """Runs steps eagerly: the scalars on 0-d tensors, the arrays on ``_foreach`` kernels."""

    @staticmethod
    def lay_out(
        rule: engine.Rule, params: list[torch.Tensor], buffers: dict[str, list], flags: list | None
    ) -> EagerLayout:
        return EagerLayout.make(rule, params, buffers, flags)

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
        layout = subset.layout
        chunks = layout.chunks
        step = prepare_scalars(
            rule, subset, hparams, scheduled, grads, subset.params, subset.buffers, leaf_inputs
        )
        engine.update_leaves(
            rule,
            XP,
            engine.ScalarCaster(XP, step.values).for_leaf,
            chunks.cut_grads(XP, grads),
            chunks.params,
            chunks.buffers,
            {name: chunks.cut_grads(XP, values) for name, values in leaf_inputs.items()},
            flags=subset.flags,
            batching=layout.batching,
            in_place=True,
            groups=layout.groups,
        )
        store_running(subset.states, step)
        return False
