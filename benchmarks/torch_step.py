"""Optimizer step time and peak memory: agnostic_optim's torch adapter vs torch.optim.

Two parameter sets: ResNet-18's (62 float32 tensors, 11.7M parameters) and a many-small-tensors
set (600 tensors of 1k-10k elements). For each optimizer it times, in one process and in
alternating order, torch.optim's for-loop, foreach and fused (where torch has it)
implementations and ours (eager, and ``compile=True`` with ``--compile``), and prints medians
and ratios side by side plus the peak memory of a step's temporaries (replayed from the torch
profiler's allocation and free events). Each round runs every contender once, in an order
shuffled per round (seeded): a step pays for what the step before it left in the caches
(lines still to be written back), and a fixed order would give every contender the same
predecessor each time.

    python benchmarks/torch_step.py                 # eager only (quick)
    python benchmarks/torch_step.py --compile       # adds the torch.compile path (slow to compile)
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time
from collections.abc import Callable, Iterator

import torch
from param_sets import resnet18_shapes, small_shapes

from agnostic_optim.adapters import torch as ours

OPTIMIZERS: dict[str, tuple[Callable, Callable, dict, tuple[str, ...]]] = {
    # name: (torch class, our class, hyperparameters, torch implementations)
    "AdamW": (
        torch.optim.AdamW,
        ours.AdamW,
        {"lr": 1e-3, "weight_decay": 1e-2},
        ("forloop", "foreach", "fused"),
    ),
    "SGD-momentum": (
        torch.optim.SGD,
        ours.SGD,
        {"lr": 0.1, "momentum": 0.9},
        ("forloop", "foreach", "fused"),
    ),
    "Adagrad": (torch.optim.Adagrad, ours.Adagrad, {"lr": 1e-2}, ("forloop", "foreach", "fused")),
    "RMSprop": (torch.optim.RMSprop, ours.RMSprop, {"lr": 1e-3}, ("forloop", "foreach")),
    "Lion": (None, ours.Lion, {"lr": 1e-4, "weight_decay": 1e-2}, ()),
}


def build(make: Callable, shapes: list[tuple[int, ...]], **kwargs) -> torch.optim.Optimizer:
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=generator).requires_grad_() for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator) * 1e-3
    return make(params, **kwargs)


def peak_step_memory(opt: torch.optim.Optimizer) -> float:
    """Peak bytes held by a step's temporaries (MiB), from the profiler's allocation events.

    Allocations and frees are replayed in time order and the running total's maximum is kept
    (``cpu_memory_usage`` of ``prof.events()`` counts allocations only, nesting included, so it
    is not a peak; the resident-set high-water mark misses memory the allocator reuses).
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    def walk(nodes: list) -> Iterator:
        for node in nodes:
            yield node
            yield from walk(node.children)

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        opt.step()
    tree = prof.profiler.kineto_results.experimental_event_tree()
    allocations = sorted(
        (e for e in walk(tree) if e.tag == _EventType.Allocation), key=lambda e: e.start_time_ns
    )
    current = peak = 0
    for event in allocations:
        current += event.extra_fields.alloc_size
        peak = max(peak, current)
    return peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--compile", action="store_true", help="also time compile=True (compiles first)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.repeats} steps\n")

    for set_name, shapes in (("resnet18", resnet18_shapes()), ("small-tensors", small_shapes())):
        numel = sum(torch.Size(s).numel() for s in shapes)
        print(f"== {set_name}: {len(shapes)} tensors, {numel / 1e6:.1f}M float32 parameters")
        for name in args.optimizers.split(","):
            torch_cls, our_cls, hparams, impls = OPTIMIZERS[name]
            contenders: dict[str, torch.optim.Optimizer] = {}
            for impl in impls:
                flags = {
                    "forloop": {"foreach": False},
                    "foreach": {"foreach": True},
                    "fused": {"fused": True},
                }
                contenders[f"torch-{impl}"] = build(torch_cls, shapes, **hparams, **flags[impl])
            contenders["ours-eager"] = build(our_cls, shapes, **hparams)
            if args.compile:
                contenders["ours-compiled"] = build(our_cls, shapes, **hparams, compile=True)
                started = time.perf_counter()
                contenders["ours-compiled"].step()
                print(f"   ({name}: compile=True first step took {time.perf_counter() - started:.1f} s)")
            for opt in contenders.values():
                opt.step()
            times: dict[str, list[float]] = {k: [] for k in contenders}
            order, shuffle = list(contenders), random.Random(0).shuffle
            for _ in range(args.repeats):
                shuffle(order)
                for key in order:
                    started = time.perf_counter()
                    contenders[key].step()
                    times[key].append(time.perf_counter() - started)
            medians = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            torch_keys = [k for k in medians if k.startswith("torch")]
            best = min((medians[k] for k in torch_keys), default=None)
            foreach = medians.get("torch-foreach")
            memory = {k: peak_step_memory(opt) for k, opt in contenders.items()}
            print(f"  {name}")
            for key in contenders:
                ratios = []
                if best is not None:
                    ratios.append(f"{medians[key] / best:5.2f}x best torch")
                if foreach is not None:
                    ratios.append(f"{medians[key] / foreach:5.2f}x foreach")
                print(
                    f"    {key:15s} {medians[key]:8.2f} ms   peak +{memory[key]:7.1f} MiB   "
                    + "  ".join(ratios)
                )
        print()


if __name__ == "__main__":
    main()
