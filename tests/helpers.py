"""Helpers shared by the tests: problems, trajectories and comparisons on host data."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

import agnostic_optim as ao
from agnostic_optim.conformance.backends import Backend
from agnostic_optim.conformance.compare import max_relative_error, relative_error

# Multi-leaf problem shapes: a 0-d, 1-d, 2-d and 4-d leaf.
LEAF_SHAPES: tuple[tuple[int, ...], ...] = ((), (3,), (4, 5), (2, 3, 2, 2))


def random_leaves(
    rng: np.random.Generator, shapes: Sequence[tuple[int, ...]] = LEAF_SHAPES
) -> list[np.ndarray]:
    return [rng.standard_normal(shape) for shape in shapes]


def random_gradient_stream(
    rng: np.random.Generator, steps: int, shapes: Sequence[tuple[int, ...]] = LEAF_SHAPES
) -> list[list[np.ndarray]]:
    """``steps`` lists of host gradients, one array per leaf."""
    return [random_leaves(rng, shapes) for _ in range(steps)]


def run_functional(
    opt: Any,
    backend: Backend,
    params: Sequence[np.ndarray],
    grad_stream: Sequence[Sequence[np.ndarray]],
    dtype: str = "float64",
    **inputs: Any,
) -> list[list[np.ndarray]]:
    """Run ``opt`` on ``backend`` with the given host gradients; return host params per step."""
    current = [backend.asarray(p, dtype) for p in params]
    state = opt.init(current)
    trajectory = []
    for grads in grad_stream:
        state, current = opt.step(state, [backend.asarray(g, dtype) for g in grads], current, **inputs)
        trajectory.append([backend.to_numpy(p) for p in current])
    return trajectory


def trajectory_error(
    ours: Sequence[Sequence[np.ndarray]], reference: Sequence[Sequence[np.ndarray]]
) -> float:
    """The worst relative error over every step and leaf of two trajectories."""
    assert len(ours) == len(reference)
    return max(max_relative_error(a, b) for a, b in zip(ours, reference))


def assert_trajectories_close(ours, reference, tol: float) -> None:
    worst = 0.0
    for step, (a, b) in enumerate(zip(ours, reference, strict=True)):
        for leaf, (x, y) in enumerate(zip(a, b, strict=True)):
            err = relative_error(x, y)
            assert err <= tol, f"step {step + 1}, leaf {leaf}: relative error {err:.3e} > {tol:.1e}"
            worst = max(worst, err)


def torch_reference(
    torch: Any,
    make: Callable[[list], Any],
    params: Sequence[np.ndarray],
    grad_stream: Sequence[Sequence[np.ndarray]],
    dtype: Any = None,
) -> list[list[np.ndarray]]:
    """The trajectory of a torch.optim optimizer built by ``make(tensors)`` on the same gradients."""
    dtype = dtype or torch.float64
    tensors = [torch.tensor(p, dtype=dtype, requires_grad=True) for p in params]
    optimizer = make(tensors)
    trajectory = []
    for grads in grad_stream:
        for t, g in zip(tensors, grads):
            t.grad = torch.tensor(g, dtype=dtype)
        optimizer.step()
        trajectory.append([t.detach().to(torch.float64).numpy().copy() for t in tensors])
    return trajectory


def with_momentum_and_decay(entry: ao.RegistryEntry) -> ao.Optimizer:
    """A registered optimizer with non-trivial hyperparameters: lr 0.02, and momentum 0.9 and
    weight decay 0.01 where it has them (a wrapper wraps SGD configured that way)."""
    if entry.wraps:
        return entry.factory(ao.sgd(lr=0.02, momentum=0.9, weight_decay=0.01))
    accepted = inspect.signature(entry.factory).parameters
    wanted = {"lr": 0.02, "weight_decay": 0.01, "momentum": 0.9}
    return entry.factory(**{k: v for k, v in wanted.items() if k in accepted})


def peak_bytes_of_step(opt: Any, grads: Any) -> int:
    """The peak memory one ``opt.step(grads)`` allocates (NumPy reports its buffers to
    tracemalloc)."""
    import tracemalloc

    tracemalloc.start()
    try:
        opt.step(grads)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
