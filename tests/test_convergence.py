"""Every registered optimizer drives two classic 2-D problems to their known minimum.

* an ill-conditioned quadratic ``f(x) = ½ xᵀAx - bᵀx`` (eigenvalues 1 and 10, rotated so the
  axes are coupled), whose minimum ``x* = A⁻¹b`` is computed here by a linear solve;
* the Rosenbrock function ``(1 - x)² + 100 (y - x²)²`` from the classic start (-1.2, 1),
  whose minimum is (1, 1).

Both run on NumPy in float64 with analytic gradients. Each optimizer has its own tuned
hyperparameters, step budget and tolerance in ``TUNED`` -- one table, checked against
``ao.registry()`` so that a new optimizer cannot be forgotten. The quadratic also runs on
``array_api_strict`` (shorter), which fails on any call outside the array API standard.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

import agnostic_optim as ao
from agnostic_optim import schedules as sch
from agnostic_optim.conformance.backends import get_backend

REGISTRY = ao.registry()

# --------------------------------------------------------------------------- the problems

_ANGLE = math.pi / 6
_ROTATION = np.array([[math.cos(_ANGLE), -math.sin(_ANGLE)], [math.sin(_ANGLE), math.cos(_ANGLE)]])
QUAD_A = _ROTATION @ np.diag([1.0, 10.0]) @ _ROTATION.T  # symmetric positive definite, cond 10
QUAD_B = np.array([1.0, -2.0])
QUAD_MIN = np.linalg.solve(QUAD_A, QUAD_B)  # the analytic minimum: A x* = b
QUAD_START = np.array([-2.0, 3.0])

ROSEN_MIN = np.array([1.0, 1.0])
ROSEN_START = np.array([-1.2, 1.0])


def quadratic_loss(x: np.ndarray) -> float:
    return float(0.5 * x @ QUAD_A @ x - QUAD_B @ x)


def quadratic_grad(a: Any, b: Any, x: Any) -> Any:
    """``A x - b`` with standard operators only, so it runs on any array-API namespace."""
    return a @ x - b


def rosenbrock_loss(x: np.ndarray) -> float:
    u, v = x
    return float((1.0 - u) ** 2 + 100.0 * (v - u * u) ** 2)


def rosenbrock_grad(x: np.ndarray) -> np.ndarray:
    u, v = x
    return np.array([-2.0 * (1.0 - u) - 400.0 * u * (v - u * u), 200.0 * (v - u * u)])


def rosenbrock_hessian_diag(x: np.ndarray) -> np.ndarray:
    u, v = x
    return np.array([2.0 - 400.0 * (v - u * u) + 800.0 * u * u, 200.0])


PROBLEMS = {
    "quadratic": (QUAD_START, QUAD_MIN, lambda x: quadratic_grad(QUAD_A, QUAD_B, x)),
    "rosenbrock": (ROSEN_START, ROSEN_MIN, rosenbrock_grad),
}
# what the optimizers with extra step inputs are given: the objective, the exact Hessian diagonal
LOSSES = {"quadratic": quadratic_loss, "rosenbrock": rosenbrock_loss}
HESSIAN_DIAGS = {"quadratic": lambda x: np.diag(QUAD_A).copy(), "rosenbrock": rosenbrock_hessian_diag}
# K-FAC preconditions fully-connected layers, which a 2-D point has none of (tests/test_kfac.py
# trains an MLP with it)
NOT_APPLICABLE = {"kfac": "no fully-connected layer in a 2-D problem"}


def _halving(lr: float, every: int):
    """lr halved every ``every`` steps (for sign- and norm-based steps that must shrink to settle)."""
    return sch.exponential_decay(lr, every, 0.5)


# --------------------------------------------------------------------------- the table
# name -> problem -> (factory kwargs, steps, tolerance on |x - x*|₂ after the last step).
# Schedules are used where a method's step does not shrink with the gradient by itself:
# sign-based Lion, the layer-wise trust ratios of LARS/LAMB (a step of length ∝ lr·‖θ‖),
# Adan (its short second-moment memory makes a constant lr spike near the optimum), and
# RAdam's first five un-rectified steps (plain momentum SGD at lr, which overshoots Rosenbrock).
# ``adamw`` runs without weight decay: decoupled decay moves the fixed point off the minimum.
# LARS adapts on every step (``always_adapt``) so its trust ratio is what is exercised.

TUNED: dict[str, dict[str, tuple[dict[str, Any], int, float]]] = {
    "sgd": {
        "quadratic": ({"lr": 0.2, "momentum": 0.3}, 100, 1e-8),
        "rosenbrock": ({"lr": 1e-3, "momentum": 0.95}, 1500, 1e-3),
    },
    "adagrad": {
        "quadratic": ({"lr": 2.0}, 400, 1e-8),
        "rosenbrock": ({"lr": 1.5}, 8000, 1e-2),
    },
    "rmsprop": {
        "quadratic": ({"lr": 0.05}, 800, 1e-8),
        "rosenbrock": ({"lr": sch.cosine_decay(2e-3, 3000), "momentum": 0.9}, 3000, 1e-3),
    },
    "adam": {
        "quadratic": ({"lr": 0.2}, 600, 1e-8),
        "rosenbrock": ({"lr": 0.05}, 2500, 1e-3),
    },
    "adamw": {
        "quadratic": ({"lr": 0.2, "weight_decay": 0.0}, 600, 1e-8),
        "rosenbrock": ({"lr": 0.05, "weight_decay": 0.0}, 2500, 1e-3),
    },
    "sparse_adam": {
        "quadratic": ({"lr": 0.2}, 600, 1e-8),
        "rosenbrock": ({"lr": 0.05}, 2500, 1e-3),
    },
    "amsgrad": {
        "quadratic": ({"lr": 0.2}, 600, 1e-8),
        "rosenbrock": ({"lr": 0.2}, 2000, 1e-3),
    },
    "radam": {
        "quadratic": ({"lr": 0.3}, 1000, 1e-8),
        "rosenbrock": ({"lr": sch.piecewise_constant(1e-4, {6: 1000.0})}, 2500, 1e-3),
    },
    "nadam": {
        "quadratic": ({"lr": 0.2}, 600, 1e-8),
        "rosenbrock": ({"lr": 0.02, "momentum_decay": 0.04}, 3500, 1e-2),
    },
    "adan": {
        "quadratic": ({"lr": _halving(0.5, 100), "betas": (0.9, 0.92, 0.99)}, 600, 1e-8),
        "rosenbrock": ({"lr": sch.cosine_decay(0.05, 2000)}, 2000, 1e-3),
    },
    "lion": {
        "quadratic": ({"lr": _halving(0.3, 25)}, 600, 1e-6),
        "rosenbrock": ({"lr": sch.cosine_decay(3e-3, 3000), "betas": (0.95, 0.98)}, 3000, 1e-3),
    },
    "lars": {
        "quadratic": (
            {"lr": _halving(0.1, 25), "momentum": 0.5, "trust_coefficient": 1.0, "always_adapt": True},
            600,
            1e-8,
        ),
        "rosenbrock": (
            {
                "lr": sch.cosine_decay(3e-3, 2000),
                "momentum": 0.9,
                "trust_coefficient": 1.0,
                "always_adapt": True,
            },
            2000,
            1e-3,
        ),
    },
    "lamb": {
        "quadratic": ({"lr": _halving(0.3, 25)}, 600, 1e-6),
        "rosenbrock": ({"lr": sch.cosine_decay(0.03, 3000)}, 3000, 1e-2),
    },
    "shampoo": {
        "quadratic": ({"lr": 2.0}, 100, 1e-8),
        "rosenbrock": ({"lr": 0.5, "momentum": 0.9}, 2500, 1e-3),
    },
    # SAM's ascent step of length ρ moves its fixed point off the minimum: ρ decays to settle
    "sam": {
        "quadratic": ({"base": ao.sgd(lr=0.2, momentum=0.3), "rho": _halving(0.05, 10)}, 200, 1e-6),
        "rosenbrock": ({"base": ao.sgd(lr=1e-3, momentum=0.95), "rho": _halving(0.01, 500)}, 3000, 1e-3),
    },
    "lookahead": {
        "quadratic": ({"base": ao.sgd(lr=0.2, momentum=0.3), "k": 5, "alpha": 0.5}, 200, 1e-8),
        "rosenbrock": ({"base": ao.sgd(lr=1e-3, momentum=0.95)}, 4000, 1e-6),
    },
    "lbfgs": {  # each step runs up to max_iter=20 iterations
        "quadratic": ({}, 5, 1e-8),
        "rosenbrock": ({"line_search_fn": "strong_wolfe"}, 20, 1e-3),
    },
    "adahessian": {
        "quadratic": ({"lr": 0.5}, 300, 1e-5),
        "rosenbrock": ({"lr": 0.05, "hessian_power": 0.5}, 5000, 1e-2),
    },
    "sophia": {  # bs=1: the estimate is the Hessian itself; the clipped steps need lr to shrink
        "quadratic": (
            {"lr": 0.5, "rho": 0.5, "bs": 1, "weight_decay": 0.0, "betas": (0.5, 0.99)},
            1000,
            1e-8,
        ),
        "rosenbrock": (
            {"lr": _halving(0.05, 2000), "rho": 0.02, "bs": 1, "weight_decay": 0.0, "betas": (0.9, 0.99)},
            15000,
            1e-3,
        ),
    },
}

MAX_STEPS = 20_000


def test_every_registered_optimizer_has_a_tuned_entry():
    missing = sorted(set(REGISTRY) - set(TUNED) - set(NOT_APPLICABLE))
    stale = sorted(set(TUNED) - set(REGISTRY))
    assert not missing, f"registered optimizers without an entry in TUNED: {missing}"
    assert not stale, f"TUNED names optimizers that are not registered: {stale}"
    for name, cases in TUNED.items():
        assert set(cases) == set(PROBLEMS), f"{name}: needs one case per problem {sorted(PROBLEMS)}"
        for problem, (_, steps, tol) in cases.items():
            assert 0 < steps <= MAX_STEPS, f"{name}/{problem}: step budget {steps}"
            # The stated bar: quadratic within 1e-4 of x*, Rosenbrock within 1e-2 of (1, 1).
            assert tol <= (1e-4 if problem == "quadratic" else 1e-2), f"{name}/{problem}: tol {tol}"


def test_the_analytic_minima_are_stationary():
    """The references themselves: ∇f vanishes at x* (quadratic) and at (1, 1) (Rosenbrock)."""
    assert np.linalg.norm(QUAD_A @ QUAD_MIN - QUAD_B) < 1e-14
    assert np.all(rosenbrock_grad(ROSEN_MIN) == 0.0)
    np.testing.assert_allclose(np.linalg.eigvalsh(QUAD_A), [1.0, 10.0], rtol=1e-14)


def _case(name: str, problem: str) -> tuple[ao.Optimizer, int, float]:
    if name in NOT_APPLICABLE:
        pytest.skip(f"{name}: {NOT_APPLICABLE[name]}")
    if name not in TUNED:
        pytest.fail(f"{name} has no entry in TUNED")
    kwargs, steps, tol = TUNED[name][problem]
    return REGISTRY[name].factory(**kwargs), steps, tol


def _inputs(opt: ao.Optimizer, problem: str, x: Any, xp: Any = np) -> dict[str, Any]:
    """The step inputs ``opt`` takes, at ``x``: SAM's gradient function, L-BFGS's objective, the
    exact Hessian diagonal (its magnitude: Sophia's estimates are non-negative)."""
    grad, loss = PROBLEMS[problem][2], LOSSES[problem]
    makers = {
        "grad_fn": lambda: grad,
        "value_and_grad_fn": lambda: lambda p: (xp.asarray(loss(p)), grad(p)),
        "hessian_diag": lambda: xp.abs(xp.asarray(HESSIAN_DIAGS[problem](np.asarray(x)))),
    }
    return {name: makers[name]() for name in opt.inputs}


def _descend(opt: ao.Optimizer, problem: str, steps: int) -> np.ndarray:
    start, _, grad = PROBLEMS[problem]
    x = start.copy()
    state = opt.init(x)
    for _ in range(steps):
        state, x = opt.step(state, grad(x), x, **_inputs(opt, problem, x))
    return np.asarray(x)


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
@pytest.mark.parametrize("name", list(REGISTRY))
def test_converges_to_the_known_minimum(name: str, problem: str):
    opt, steps, tol = _case(name, problem)
    start, minimum, _ = PROBLEMS[problem]
    x = _descend(opt, problem, steps)
    assert x.dtype == np.float64
    assert np.all(np.isfinite(x)), f"{name} diverged on {problem}: {x}"
    distance = float(np.linalg.norm(x - minimum))
    initial = float(np.linalg.norm(start - minimum))
    assert distance <= tol, (
        f"{name} on {problem}: |x - x*| = {distance:.3e} after {steps} steps "
        f"(started at {initial:.3e}), tolerance {tol:.1e}; ended at {x}"
    )


STRICT_STEPS = 100


@pytest.mark.parametrize("name", list(REGISTRY))
def test_quadratic_on_array_api_strict(name: str):
    """The same descent on array_api_strict: only standard calls, and the loss gap drops 10x."""
    backend = get_backend("array_api_strict")
    if not backend.available:
        pytest.skip(f"array_api_strict unavailable: {backend.reason}")
    opt, steps, _ = _case(name, "quadratic")
    a, b, x = (backend.asarray(v, "float64") for v in (QUAD_A, QUAD_B, QUAD_START))
    makers = {
        "grad_fn": lambda: lambda p: quadratic_grad(a, b, p),
        "value_and_grad_fn": lambda: lambda p: (p @ (a @ p) / 2 - b @ p, quadratic_grad(a, b, p)),
        "hessian_diag": lambda: backend.asarray(np.diag(QUAD_A).copy(), "float64"),
    }
    inputs = {name: makers[name]() for name in opt.inputs}
    state = opt.init(x)
    for _ in range(min(steps, STRICT_STEPS)):
        state, x = opt.step(state, quadratic_grad(a, b, x), x, **inputs)
    assert isinstance(x, type(a)) and x.dtype == backend.dtype("float64")
    host = backend.to_numpy(x)
    gap0 = quadratic_loss(QUAD_START) - quadratic_loss(QUAD_MIN)
    gap = quadratic_loss(host) - quadratic_loss(QUAD_MIN)
    assert np.isfinite(gap) and gap <= gap0 / 10, (
        f"{name} on array_api_strict: loss gap {gap:.3e} after {STRICT_STEPS} steps, started at {gap0:.3e}"
    )
