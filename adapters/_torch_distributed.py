"""What the torch adapter does under ``torch.distributed``: whole tensors for rules that need a
param's whole array (FSDP2 shards it as a DTensor), and per-batch statistics gathered from every
data-parallel rank.

Elementwise and layer-wise rules need nothing: a DTensor runs their ``_foreach`` kernels shard
by shard, and a whole-leaf ``sum`` (LARS/LAMB trust ratios, SAM's norm, global-norm clipping)
reduces over the whole tensor. Shampoo's matrices and K-FAC's factors are functions of a
param's whole array: :func:`whole` gathers it (each rank computes the same step), and
:func:`write_back` keeps the rank's own shard of the result. Their factors are then whole on
every rank (replicated), as distributed Shampoo's default is for the dimensions it does not
block.
"""

from __future__ import annotations

from typing import Any

import torch

from agnostic_optim import engine
from agnostic_optim.adapters._torch_plan import XP, NothingKept, Subset, prepare_scalars, store_running


def is_sharded(t: Any) -> bool:
    """Whether ``t`` is a DTensor (a param FSDP2 or a device mesh shards)."""
    return hasattr(t, "full_tensor") and hasattr(t, "placements")


def whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (gathered from its mesh), else ``t``."""
    return t.full_tensor() if is_sharded(t) else t


def write_back(param: torch.Tensor, new: torch.Tensor) -> None:
    """Write a whole new value into ``param``: a DTensor keeps its own shard of it."""
    if is_sharded(param):
        from torch.distributed.tensor import distribute_tensor

        # (every rank holds the same whole value: each cuts its shard, no communication)
        new = distribute_tensor(new, param.device_mesh, param.placements, src_data_rank=None)
    param.copy_(new)


def data_parallel_group(model: torch.nn.Module) -> Any:
    """The process group a model is data-parallel over: the default group when
    ``torch.distributed`` runs with several processes and ``model`` is wrapped in
    ``DistributedDataParallel`` or holds FSDP2's DTensors; else None (one process's batch)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    from torch.nn.parallel import DistributedDataParallel

    wrapped = isinstance(model, DistributedDataParallel)
    return dist.group.WORLD if wrapped or any(map(is_sharded, model.parameters())) else None


def gather_batches(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    """Every rank's ``tensor`` (a per-sample statistic: rows are samples), concatenated in rank
    order; ranks may hold different numbers of rows."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    rows = [int(s) for s in sizes]
    padded = torch.zeros((max(rows), *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([part[:n] for part, n in zip(parts, rows)])


class GatheredExecutor:
    """Runs steps of a rule that needs each param's whole array (Shampoo's matrices) on
    DTensor params: params and gradients gathered whole, the rule run leaf by leaf on them,
    each rank keeping its own shard of the new params. The state is whole on every rank (made
    from the whole params: ``whole_state``)."""

    whole_state = True
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
        params = [whole(p) for p in subset.params]
        grads = [whole(g) for g in grads]
        leaf_inputs = {name: [whole(t) for t in values] for name, values in leaf_inputs.items()}
        step = prepare_scalars(rule, subset, hparams, scheduled, grads, params, subset.buffers, leaf_inputs)
        new_params, new_buffers = engine.update_leaves(
            rule,
            XP,
            engine.ScalarCaster(XP, step.values).for_leaf,
            grads,
            params,
            subset.buffers,
            leaf_inputs,
            subset.flags,
        )
        for p, new in zip(subset.params, new_params):
            write_back(p, new)
        for name, values in new_buffers.items():
            for buffer, new in zip(subset.buffers[name], values):
                buffer.copy_(new)
        store_running(subset.states, step)
        return False
