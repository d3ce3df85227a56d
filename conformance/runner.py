"""Run the conformance cases: every optimizer x backend x dtype, through every entry point.

For one cell (optimizer, backend, dtype) the runner takes each of the optimizer's cases and
each problem, runs ``steps`` steps through the functional API and through the backend's native
adapters (the named torch ``Optimizer`` class such as ``adapters.torch.SGD``; ``as_optax`` both
eagerly and with its update under ``jax.jit``; ``ArrayOptimizer``), and compares every step's
parameters with the NumPy float64 functional run and with the case's external reference (the
float64 reference trajectory, at the run's dtype's tolerance). Extra step inputs a case declares
are generated once on the host (:func:`host_inputs`) and handed to every backend identically.
Each cell reports its worst errors, a one-line summary with the earliest divergence
(:meth:`CellResult.summary`) and one detail line per failed comparison (``failures``).
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agnostic_optim.conformance.backends import Backend, get_backend
from agnostic_optim.conformance.cases import Case, ProblemFunction, cases_for
from agnostic_optim.conformance.compare import max_relative_error
from agnostic_optim.conformance.problems import Problem, all_problems

Trajectory = list[list[np.ndarray]]
HostInputs = list[dict[str, Any]]  # per step: input name -> list of host arrays like params, or None

# Tolerance policy (see the package docstring): max-norm relative error per leaf and step.
TOLERANCE = {"float64": 1e-12, "float32": 1e-5}
DEFAULT_STEPS = 25


@dataclass
class CellResult:
    """The outcome of one optimizer x backend x dtype cell.

    ``failures`` holds one detail line per failed comparison; ``first_step``/``first_where`` the
    earliest step at which any comparison diverged and which one; :meth:`summary` one line.
    """

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
    first_step: int | None = None
    first_where: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__, summary=self.summary())

    def summary(self) -> str:
        """One line: the cell and its status; for a failure, the earliest step of divergence."""
        cell = f"{self.optimizer} on {self.backend} {self.dtype}"
        if self.status != "fail":
            return f"{cell}: {self.status}"
        if self.first_step is None:
            return f"{cell}: {self.failures[0] if self.failures else 'failed'}"
        count = len(self.failures)
        return (
            f"{cell}: first divergence at step {self.first_step} ({self.first_where}; "
            f"{count} failed comparison{'s' if count != 1 else ''})"
        )


def first_divergence(ours: Trajectory, expected: Trajectory, tolerance: float) -> tuple[float, int | None]:
    """(worst error over all steps, first 1-based step above ``tolerance`` or None)."""
    worst, first = 0.0, None
    for step, (a, b) in enumerate(zip(ours, expected), start=1):
        error = max_relative_error(a, b)
        worst = max(worst, error)
        if first is None and not error <= tolerance:
            first = step
    return worst, first


# ----------------------------------------------------------------------------- step inputs


def host_inputs(case: Case, problem: Problem, steps: int) -> HostInputs:
    """The case's extra step inputs for every step, generated on the host with NumPy from a seed
    fixed by the case and problem labels (so every backend and entry point gets the same values)."""
    if not case.inputs:
        return [{} for _ in range(steps)]
    rng = np.random.default_rng(zlib.crc32(f"{case.label}/{problem.name}".encode()))
    shapes = [np.shape(p) for p in problem.initial]
    names = sorted(case.inputs)
    return [{name: case.inputs[name](rng, shapes, step) for name in names} for step in range(steps)]


def backend_inputs(
    backend: Backend, host: dict[str, Any], dtype: str, problem: Problem, step: int, params: list[Any]
) -> dict[str, Any]:
    """One step's host inputs as ``backend`` arrays in ``dtype`` (None stays None), and problem
    functions (SAM's ``grad_fn``...) bound to ``backend``, ``dtype``, the step and ``params``."""

    def convert(value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, ProblemFunction):
            return value.bind(backend, problem, step, dtype, params)
        return [backend.asarray(v, dtype) for v in value]

    return {name: convert(value) for name, value in host.items()}


# ----------------------------------------------------------------------------- entry points


def run_functional(
    case: Case, backend: Backend, dtype: str, problem: Problem, steps: int, inputs: HostInputs | None = None
) -> Trajectory:
    """``opt.init`` / ``opt.step`` on ``backend`` arrays."""
    inputs = inputs if inputs is not None else host_inputs(case, problem, steps)
    opt = case.build()
    params = [backend.asarray(p, dtype) for p in problem.initial]
    state = opt.init(params)
    trajectory = []
    for step in range(steps):
        grads = problem.gradient(backend, params, step, dtype)
        step_inputs = backend_inputs(backend, inputs[step], dtype, problem, step, params)
        state, params = opt.step(state, grads, params, **step_inputs)
        trajectory.append([backend.to_numpy(p) for p in params])
    return trajectory


def run_adapters(
    case: Case, backend: Backend, dtype: str, problem: Problem, steps: int, inputs: HostInputs | None = None
) -> list[tuple[str, Trajectory]]:
    """The backend's native entry points: (name, trajectory) for each ([] where there is none).

    The torch class runs only where it can take the case as given (see :func:`torch_class_for`);
    :func:`run_cell` notes why where it cannot.
    """
    inputs = inputs if inputs is not None else host_inputs(case, problem, steps)
    if backend.framework == "torch":
        cls, _ = torch_class_for(case)
        if cls is None:
            return []
        return [(f"torch.{cls.__name__}", _run_torch_class(cls, case, backend, dtype, problem, steps))]
    if backend.framework == "jax":
        runs = [("as_optax", _run_as_optax(case, backend, dtype, problem, steps, inputs, jit=False))]
        if case.build().traceable:  # (L-BFGS branches on values: it refuses jax.jit)
            runs.append(
                ("as_optax+jit", _run_as_optax(case, backend, dtype, problem, steps, inputs, jit=True))
            )
        return runs
    if backend.framework in ("numpy", "array_api_strict", "cupy"):
        return [("ArrayOptimizer", _run_array_optimizer(case, backend, dtype, problem, steps, inputs))]
    return []


def torch_class_for(case: Case) -> tuple[type | None, str]:
    """(the named torch class that runs ``case`` from params and gradients, or None and why not).

    ``torch.optim.Optimizer.step(closure)`` cannot receive the host-generated step inputs: the
    torch classes of optimizers with inputs make them from autograd themselves (AdaHessian's
    Hutchinson probes, Sophia's ``update_hessian``, SAM's closure, K-FAC's layer hooks), and the
    wrappers are built on an optimizer instance; their own tests cover them. L-BFGS's input is
    the objective, which its class takes as torch.optim.LBFGS does: as the step's closure."""
    from agnostic_optim.adapters.torch import CLASS_FOR_FACTORY, LBFGS, TorchOptimizer

    cls = CLASS_FOR_FACTORY[case.optimizer]
    if cls is LBFGS:
        return cls, ""
    if case.inputs:
        return None, f"torch.{cls.__name__} makes its step inputs from autograd (tested in tests/)"
    if not issubclass(cls, TorchOptimizer):
        return None, f"torch.{cls.__name__} is built on an optimizer or a model (tested in tests/)"
    return cls, ""


def _run_torch_class(
    cls: type, case: Case, backend: Backend, dtype: str, problem: Problem, steps: int
) -> Trajectory:
    """The named ``torch.optim.Optimizer`` class (``adapters.torch.SGD``...), so each class's own
    state path (SGD's torch-style momentum buffer without a step count) is the one exercised.
    A float64 run has float64 as torch's default dtype, as the torch.optim reference has: both
    keep their scalar state (step counts, NAdam's ``mu_product``) in that dtype."""
    torch = backend.module
    previous = torch.get_default_dtype()
    if dtype == "float64":
        torch.set_default_dtype(torch.float64)
    try:
        return _torch_class_trajectory(cls, case, backend, dtype, problem, steps)
    finally:
        torch.set_default_dtype(previous)


def _torch_class_trajectory(
    cls: type, case: Case, backend: Backend, dtype: str, problem: Problem, steps: int
) -> Trajectory:
    torch = backend.module
    params = [backend.asarray(p, dtype).requires_grad_() for p in problem.initial]
    opt = cls(params, **case.kwargs)
    trajectory = []
    for step in range(steps):

        def closure(step: int = step) -> Any:
            """The gradients at the current params; the loss, for a class that asks (L-BFGS)."""
            with torch.no_grad():
                values = [p.detach() for p in params]
                grads = problem.gradient(backend, values, step, dtype)
            for p, g in zip(params, grads):  # (as sparse gradients for a class that takes no others)
                p.grad = g.to_sparse() if getattr(cls, "sparse_gradients", None) == "require" else g
            return problem.loss(backend, values, dtype) if problem.loss else None

        if "value_and_grad_fn" in case.inputs:
            opt.step(closure)
        else:
            closure()
            opt.step()
        trajectory.append([backend.to_numpy(p) for p in params])
    return trajectory


def _run_as_optax(
    case: Case, backend: Backend, dtype: str, problem: Problem, steps: int, inputs: HostInputs, jit: bool
) -> Trajectory:
    """``as_optax``'s ``init``/``update`` + ``optax.apply_updates``; with ``jit`` the update runs
    under ``jax.jit`` (traced once per problem and dtype, as in a real training loop)."""
    import jax
    import optax

    from agnostic_optim.adapters.jax import as_optax

    tx = as_optax(case.build())
    jitted = jax.jit(tx.update) if jit else tx.update
    with_functions: dict[tuple, Callable[..., Any]] = {}
    params = [backend.asarray(p, dtype) for p in problem.initial]
    state = tx.init(params)
    trajectory = []
    for step in range(steps):
        grads = problem.gradient(backend, params, step, dtype)
        step_inputs = backend_inputs(backend, inputs[step], dtype, problem, step, params)
        # a function input (SAM's grad_fn) is closed over, as a jitted training step closes over
        # jax.grad(loss); this step's differs from the last one's, so the update is traced again
        functions = {k: v for k, v in step_inputs.items() if callable(v)}
        update = jitted
        if functions:
            key = tuple(sorted((k, id(v)) for k, v in functions.items()))
            if key not in with_functions:  # (a function that is the same every step: traced once)
                partial = functools.partial(tx.update, **functions)
                with_functions[key] = jax.jit(partial) if jit else partial
            update = with_functions[key]
            step_inputs = {k: v for k, v in step_inputs.items() if k not in functions}
        updates, state = update(grads, state, params, **step_inputs)
        params = optax.apply_updates(params, updates)
        trajectory.append([backend.to_numpy(p) for p in params])
    return trajectory


def _run_array_optimizer(
    case: Case, backend: Backend, dtype: str, problem: Problem, steps: int, inputs: HostInputs
) -> Trajectory:
    from agnostic_optim.adapters.numpy import ArrayOptimizer

    params = [backend.asarray(p, dtype) for p in problem.initial]
    opt = ArrayOptimizer(params, case.build())
    trajectory = []
    for step in range(steps):
        grads = problem.gradient(backend, params, step, dtype)
        opt.step(grads, **backend_inputs(backend, inputs[step], dtype, problem, step, params))
        trajectory.append([backend.to_numpy(p) for p in params])
    return trajectory


# ----------------------------------------------------------------------------- cells


@functools.cache
def _problems(steps: int) -> tuple[Problem, ...]:
    return tuple(all_problems(steps))


_BASELINES: dict[tuple[str, str, int], Trajectory] = {}
_REFERENCES: dict[tuple[str, str, int], Trajectory] = {}
_INPUTS: dict[tuple[str, str, int], HostInputs] = {}


def _host_inputs(case: Case, problem: Problem, steps: int) -> HostInputs:
    key = (case.label, problem.name, steps)
    if key not in _INPUTS:
        _INPUTS[key] = host_inputs(case, problem, steps)
    return _INPUTS[key]


def _baseline(case: Case, problem: Problem, steps: int) -> Trajectory:
    """The NumPy float64 functional run every other run is compared with (computed once)."""
    key = (case.label, problem.name, steps)
    if key not in _BASELINES:
        inputs = _host_inputs(case, problem, steps)
        _BASELINES[key] = run_functional(case, get_backend("numpy"), "float64", problem, steps, inputs)
    return _BASELINES[key]


def _reference(case: Case, problem: Problem, steps: int) -> Trajectory:
    key = (case.label, problem.name, steps)
    if key not in _REFERENCES:
        _REFERENCES[key] = case.reference.run(problem, steps)
    return _REFERENCES[key]


def run_cell(optimizer: str, backend_name: str, dtype: str, steps: int = DEFAULT_STEPS) -> CellResult:
    """Run every case of ``optimizer`` on one backend and dtype; compare and summarise."""
    backend = get_backend(backend_name)
    result = CellResult(optimizer, backend_name, dtype, "pass", tolerance=TOLERANCE[dtype])
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
        tolerance = case.tolerance.get(dtype, TOLERANCE[dtype])
        if dtype in case.tolerance:
            result.notes.append(f"{case.label}: {dtype} tolerance {tolerance:.0e} ({case.tolerance_reason})")
        reason = case.reference.unavailable() if case.reference else ""
        if reason:
            result.notes.append(f"{case.label}: reference {case.reference.name} skipped ({reason})")
        if backend.framework == "torch" and torch_class_for(case)[0] is None:
            result.notes.append(f"{case.label}: torch class entry not run ({torch_class_for(case)[1]})")
        for problem in _problems(steps):
            if not case.runs_on(problem):
                result.notes.append(f"{case.label}: not run on {problem.name} (no loss value or layers)")
                continue
            expected = _baseline(case, problem, steps)
            inputs = _host_inputs(case, problem, steps)
            runs = [("functional", run_functional(case, backend, dtype, problem, steps, inputs))]
            runs += run_adapters(case, backend, dtype, problem, steps, inputs)
            # The float64 reference trajectory is the target in every dtype: a float32 run must stay
            # within the float32 tolerance of it, so a rule broken in both our runs is caught there too.
            reference = None
            if case.reference is not None and not reason:
                reference = _reference(case, problem, steps)
            for entry, trajectory in runs:
                result.runs += 1
                where = f"{case.label} / {problem.name} / {entry}"
                _record(result, where, trajectory, expected, "numpy float64", tolerance)
                if reference is not None:
                    _record(result, where, trajectory, reference, case.reference.name, tolerance, True)
    return result


def _record(
    result: CellResult,
    where: str,
    ours: Trajectory,
    expected: Trajectory,
    against: str,
    tolerance: float,
    against_reference: bool = False,
) -> None:
    worst, first = first_divergence(ours, expected, tolerance)
    if against_reference:
        result.error_vs_reference = max(result.error_vs_reference or 0.0, worst)
    else:
        result.error_vs_numpy = max(result.error_vs_numpy, worst)
    if first is not None:
        result.status = "fail"
        error = max_relative_error(ours[first - 1], expected[first - 1])
        result.failures.append(
            f"{result.optimizer} on {result.backend} {result.dtype}: {where} diverges from {against} "
            f"at step {first} (relative error {error:.2e} > {tolerance:.0e}; worst {worst:.2e})"
        )
        if result.first_step is None or first < result.first_step:
            result.first_step = first
            result.first_where = f"{where} vs {against}: relative error {error:.2e} > {tolerance:.0e}"
