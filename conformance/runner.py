"""Run the conformance cases: every optimizer x backend x dtype, through every entry point.

For one cell (optimizer, backend, dtype) the runner takes each of the optimizer's cases and
each problem, runs ``steps`` steps through the functional API and through the backend's native
adapter (torch ``Optimizer`` class, ``as_optax``, ``ArrayOptimizer``), and compares every
step's parameters with the NumPy float64 functional run and, in float64, with the case's
external reference. The worst errors and the first divergence (case, problem, entry, step) are
reported per cell.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agnostic_optim.conformance.backends import Backend, get_backend
from agnostic_optim.conformance.cases import Case, cases_for
from agnostic_optim.conformance.compare import max_relative_error
from agnostic_optim.conformance.problems import Problem, all_problems

Trajectory = list[list[np.ndarray]]

# Tolerance policy (see the package docstring): max-norm relative error per leaf and step.
TOLERANCE = {"float64": 1e-12, "float32": 1e-5}
DEFAULT_STEPS = 25


@dataclass
class CellResult:
    """The outcome of one optimizer x backend x dtype cell."""

    optimizer: str
    backend: str
    dtype: str
    status: str  # "pass", "fail" or "skip"
    error_vs_numpy: float = 0.0
    error_vs_reference: float | None = None
    tolerance: float = 0.0
    runs: int = 0
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def first_divergence(ours: Trajectory, expected: Trajectory, tolerance: float) -> tuple[float, int | None]:
    """(worst error over all steps, first 1-based step above ``tolerance`` or None)."""
    worst, first = 0.0, None
    for step, (a, b) in enumerate(zip(ours, expected), start=1):
        error = max_relative_error(a, b)
        worst = max(worst, error)
        if first is None and not error <= tolerance:
            first = step
    return worst, first


# ----------------------------------------------------------------------------- entry points


def run_functional(case: Case, backend: Backend, dtype: str, problem: Problem, steps: int) -> Trajectory:
    """``opt.init`` / ``opt.step`` on ``backend`` arrays."""
    opt = case.build()
    params = [backend.asarray(p, dtype) for p in problem.initial]
    state = opt.init(params)
    trajectory = []
    for step in range(steps):
        grads = problem.gradient(backend, params, step, dtype)
        state, params = opt.step(state, grads, params)
        trajectory.append([backend.to_numpy(p) for p in params])
    return trajectory


def run_adapter(
    case: Case, backend: Backend, dtype: str, problem: Problem, steps: int
) -> tuple[str, Trajectory] | None:
    """The backend's native entry point: (its name, trajectory), or None where there is none."""
    if backend.name == "torch":
        return "torch.Optimizer", _run_torch_class(case, backend, dtype, problem, steps)
    if backend.name == "jax":
        return "as_optax", _run_as_optax(case, backend, dtype, problem, steps)
    if backend.name in ("numpy", "array_api_strict", "cupy"):
        return "ArrayOptimizer", _run_array_optimizer(case, backend, dtype, problem, steps)
    return None


def _run_torch_class(case: Case, backend: Backend, dtype: str, problem: Problem, steps: int) -> Trajectory:
    from agnostic_optim.adapters.torch import TorchOptimizer

    torch = backend.module
    params = [backend.asarray(p, dtype).requires_grad_() for p in problem.initial]
    opt = TorchOptimizer(params, case.optimizer, **case.kwargs)
    trajectory = []
    for step in range(steps):
        with torch.no_grad():
            grads = problem.gradient(backend, [p.detach() for p in params], step, dtype)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        trajectory.append([backend.to_numpy(p) for p in params])
    return trajectory


def _run_as_optax(case: Case, backend: Backend, dtype: str, problem: Problem, steps: int) -> Trajectory:
    import optax

    from agnostic_optim.adapters.jax import as_optax

    tx = as_optax(case.build())
    params = [backend.asarray(p, dtype) for p in problem.initial]
    state = tx.init(params)
    trajectory = []
    for step in range(steps):
        grads = problem.gradient(backend, params, step, dtype)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        trajectory.append([backend.to_numpy(p) for p in params])
    return trajectory


def _run_array_optimizer(
    case: Case, backend: Backend, dtype: str, problem: Problem, steps: int
) -> Trajectory:
    from agnostic_optim.adapters.numpy import ArrayOptimizer

    params = [backend.asarray(p, dtype) for p in problem.initial]
    opt = ArrayOptimizer(params, case.build())
    trajectory = []
    for step in range(steps):
        opt.step(problem.gradient(backend, params, step, dtype))
        trajectory.append([backend.to_numpy(p) for p in params])
    return trajectory


# ----------------------------------------------------------------------------- cells


@functools.cache
def _problems(steps: int) -> tuple[Problem, ...]:
    return tuple(all_problems(steps))


_BASELINES: dict[tuple[str, str, int], Trajectory] = {}
_REFERENCES: dict[tuple[str, str, int], Trajectory] = {}


def _baseline(case: Case, problem: Problem, steps: int) -> Trajectory:
    """The NumPy float64 functional run every other run is compared with (computed once)."""
    key = (case.label, problem.name, steps)
    if key not in _BASELINES:
        _BASELINES[key] = run_functional(case, get_backend("numpy"), "float64", problem, steps)
    return _BASELINES[key]


def _reference(case: Case, problem: Problem, steps: int) -> Trajectory:
    key = (case.label, problem.name, steps)
    if key not in _REFERENCES:
        _REFERENCES[key] = case.reference.run(problem, steps)
    return _REFERENCES[key]


def run_cell(optimizer: str, backend_name: str, dtype: str, steps: int = DEFAULT_STEPS) -> CellResult:
    """Run every case of ``optimizer`` on one backend and dtype; compare and summarise."""
    backend = get_backend(backend_name)
    tolerance = TOLERANCE[dtype]
    result = CellResult(optimizer, backend_name, dtype, "pass", tolerance=tolerance)
    if not backend.available:
        result.status = "skip"
        result.notes.append(backend.reason)
        return result
    if dtype not in backend.dtypes:
        result.status = "skip"
        result.notes.append(f"{backend_name} has no {dtype}")
        return result
    cases = cases_for(optimizer)
    if not cases:
        result.status = "fail"
        result.failures.append(f"{optimizer} has no conformance case (add one to conformance/cases.py)")
        return result
    for case in cases:
        reason = case.reference.unavailable() if case.reference else ""
        if reason:
            result.notes.append(f"{case.label}: reference {case.reference.name} skipped ({reason})")
        for problem in _problems(steps):
            expected = _baseline(case, problem, steps)
            runs = [("functional", run_functional(case, backend, dtype, problem, steps))]
            adapter = run_adapter(case, backend, dtype, problem, steps)
            if adapter is not None:
                runs.append(adapter)
            for entry, trajectory in runs:
                result.runs += 1
                _record(
                    result, f"{case.label} / {problem.name} / {entry}", trajectory, expected, "numpy float64"
                )
                if case.reference is not None and not reason and dtype == "float64":
                    reference = _reference(case, problem, steps)
                    _record(result, f"{case.label} / {problem.name} / {entry}", trajectory, reference,
                            case.reference.name, against_reference=True)  # fmt: skip
    return result


def _record(
    result: CellResult,
    where: str,
    ours: Trajectory,
    expected: Trajectory,
    against: str,
    against_reference: bool = False,
) -> None:
    worst, first = first_divergence(ours, expected, result.tolerance)
    if against_reference:
        result.error_vs_reference = max(result.error_vs_reference or 0.0, worst)
    else:
        result.error_vs_numpy = max(result.error_vs_numpy, worst)
    if first is not None:
        result.status = "fail"
        error = max_relative_error(ours[first - 1], expected[first - 1])
        result.failures.append(
            f"{result.optimizer} on {result.backend} {result.dtype}: {where} diverges from {against} "
            f"at step {first} (relative error {error:.2e} > {result.tolerance:.0e}; worst {worst:.2e})"
        )
