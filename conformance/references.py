"""External references: the implementations users already trust, run on the same problems.

* torch.optim classes (torch-convention optimizers), in float64 with torch's default dtype set to
  float64 so its scalar state (``step``, NAdam's ``mu_product``) is float64 too;
* optax transformations (optax-convention options), in float64 with JAX x64 enabled;
* timm's ``Lars``/``Lamb`` (ports of the LARS paper and NVIDIA's FusedLAMB), loaded from timm's
  source files without importing timm (whose package needs torchvision);
* NumPy transcriptions of the official algorithms where no library has them: Adan from
  sail-sg/Adan (``_single_tensor_adan``) and Lion from google/automl (``lion_pytorch.py``).

None of them imports agnostic_optim's update rules: they are independent of the code under test.
A reference whose library is missing reports why, and the suite records it as skipped.
"""

from __future__ import annotations

import importlib.util
import math
import pathlib
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from agnostic_optim.conformance.backends import get_backend
from agnostic_optim.conformance.problems import Problem

Trajectory = list[list[np.ndarray]]


@dataclass(frozen=True)
class Reference:
    """A named external implementation that can run a problem for some steps."""

    name: str
    library: str  # the backend/library it needs ("torch", "jax", "numpy", "timm")
    run: Callable[[Problem, int], Trajectory]

    def unavailable(self) -> str:
        """Why this reference cannot run here ('' when it can)."""
        if self.library == "timm":
            if importlib.util.find_spec("timm") is None:
                return "timm is not installed"
            return get_backend("torch").reason
        if self.library == "numpy":
            return ""
        return get_backend(self.library).reason


# ----------------------------------------------------------------------------- torch.optim


def torch_optim(class_name: str, **kwargs: Any) -> Reference:
    """``torch.optim.<class_name>(params, **kwargs)``."""
    return Reference(f"torch.optim.{class_name}", "torch", lambda p, n: _run_torch(p, n, class_name, kwargs))


def timm_optimizer(class_name: str, **kwargs: Any) -> Reference:
    """``timm.optim.<Lars|Lamb>(params, **kwargs)``."""
    return Reference(f"timm.optim.{class_name}", "timm", lambda p, n: _run_torch(p, n, class_name, kwargs))


def _torch_class(name: str) -> Any:
    import torch

    if name in ("Lars", "Lamb"):
        return getattr(_load_timm_module(name.lower()), name)
    return getattr(torch.optim, name)


def _run_torch(problem: Problem, steps: int, class_name: str, kwargs: dict[str, Any]) -> Trajectory:
    backend = get_backend("torch")
    torch = backend.module
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        params = [torch.tensor(p, dtype=torch.float64, requires_grad=True) for p in problem.initial]
        optimizer = _torch_class(class_name)(params, **kwargs)
        trajectory = []
        for step in range(steps):

            def closure(step: int = step) -> Any:
                """Sets the gradients at the current params; returns the loss (L-BFGS calls it)."""
                with torch.no_grad():
                    values = [p.detach() for p in params]
                    grads = problem.gradient(backend, values, step, "float64")
                for p, g in zip(params, grads):
                    p.grad = g.detach().to_sparse() if class_name == "SparseAdam" else g.detach().clone()
                return problem.loss(backend, values, "float64") if problem.loss else None

            if class_name == "LBFGS":
                optimizer.step(closure)
            else:
                closure()
                optimizer.step()
            trajectory.append([p.detach().numpy().copy() for p in params])
        return trajectory
    finally:
        torch.set_default_dtype(previous)


def _load_timm_module(name: str) -> types.ModuleType:
    """One of timm's optimizer modules, loaded from its file (timm's __init__ needs torchvision)."""
    package = "_agnostic_optim_timm_optim"
    qualified = f"{package}.{name}"
    if qualified in sys.modules:
        return sys.modules[qualified]
    spec = importlib.util.find_spec("timm")
    if spec is None or spec.origin is None:
        raise ImportError("timm is not installed")
    root = pathlib.Path(spec.origin).parent / "optim"
    if package not in sys.modules:
        stub = types.ModuleType(package)
        stub.__path__ = [str(root)]
        sys.modules[package] = stub
    module_spec = importlib.util.spec_from_file_location(qualified, root / f"{name}.py")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[qualified] = module
    module_spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- optax


def optax_transform(builder: Callable[[Any], Any], label: str) -> Reference:
    """An optax transformation built by ``builder(optax)``."""
    return Reference(f"optax.{label}", "jax", lambda p, n: _run_optax(p, n, builder))


def _run_optax(problem: Problem, steps: int, builder: Callable[[Any], Any]) -> Trajectory:
    import optax

    backend = get_backend("jax")
    jnp = backend.module
    tx = builder(optax)
    params = [jnp.asarray(p, dtype=jnp.float64) for p in problem.initial]
    state = tx.init(params)
    trajectory = []
    for step in range(steps):
        grads = problem.gradient(backend, params, step, "float64")
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        trajectory.append([np.asarray(p, dtype=np.float64) for p in params])
    return trajectory


def optax_lookahead(
    fast: Callable[[Any], Any], sync_period: int, slow_step_size: float, label: str
) -> Reference:
    """``optax.lookahead(fast(optax), sync_period, slow_step_size)`` on ``LookaheadParams``
    (gradients taken at the fast params; the trajectory is the fast params, which the sync
    resets to the slow ones)."""
    return Reference(
        f"optax.lookahead({label})",
        "jax",
        lambda p, n: _run_optax_lookahead(p, n, fast, sync_period, slow_step_size),
    )


def _run_optax_lookahead(
    problem: Problem, steps: int, fast: Callable[[Any], Any], sync_period: int, slow_step_size: float
) -> Trajectory:
    import optax

    backend = get_backend("jax")
    jnp = backend.module
    tx = optax.lookahead(fast(optax), sync_period, slow_step_size)
    params = optax.LookaheadParams.init_synced([jnp.asarray(p, dtype=jnp.float64) for p in problem.initial])
    state = tx.init(params)
    trajectory = []
    for step in range(steps):
        grads = problem.gradient(backend, params.fast, step, "float64")
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        trajectory.append([np.asarray(p, dtype=np.float64) for p in params.fast])
    return trajectory


# ----------------------------------------------------------------------------- official code


def official_adan(
    lr: float = 1e-3,
    betas: tuple[float, float, float] = (0.98, 0.92, 0.99),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    max_grad_norm: float = 0.0,
    no_prox: bool = False,
) -> Reference:
    """sail-sg/Adan ``Adan.step`` + ``_single_tensor_adan``, transcribed to NumPy float64."""

    def run(problem: Problem, steps: int) -> Trajectory:
        backend = get_backend("numpy")
        beta1, beta2, beta3 = betas
        params = [p.copy() for p in problem.initial]
        exp_avg = [np.zeros_like(p) for p in params]
        exp_avg_sq = [np.zeros_like(p) for p in params]
        exp_avg_diff = [np.zeros_like(p) for p in params]
        neg_pre_grad: list[np.ndarray] = []
        trajectory = []
        for step in range(1, steps + 1):
            grads = [np.asarray(g) for g in problem.gradient(backend, params, step - 1, "float64")]
            clip = 1.0
            if max_grad_norm > 0:
                norm = math.sqrt(sum(float(np.sum(g**2)) for g in grads))
                clip = min(max_grad_norm / (norm + eps), 1.0)
            if step == 1:
                neg_pre_grad = [-clip * g for g in grads]
            bias1, bias2, bias3 = (1 - b**step for b in betas)
            for i, p in enumerate(params):
                grad = grads[i] * clip
                diff = neg_pre_grad[i] + grad
                exp_avg[i] = exp_avg[i] * beta1 + grad * (1 - beta1)
                exp_avg_diff[i] = exp_avg_diff[i] * beta2 + diff * (1 - beta2)
                nesterov = diff * beta2 + grad
                exp_avg_sq[i] = exp_avg_sq[i] * beta3 + nesterov * nesterov * (1 - beta3)
                denom = np.sqrt(exp_avg_sq[i]) / math.sqrt(bias3) + eps
                if no_prox:
                    p = p * (1 - lr * weight_decay)
                p = p - (lr / bias1) * exp_avg[i] / denom
                p = p - (lr * beta2 / bias2) * exp_avg_diff[i] / denom
                if not no_prox:
                    p = p / (1 + lr * weight_decay)
                params[i] = p
                neg_pre_grad[i] = -grad
            trajectory.append([p.copy() for p in params])
        return trajectory

    return Reference("official Adan (sail-sg)", "numpy", run)


def official_lion(
    lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0
) -> Reference:
    """google/automl ``lion_pytorch.Lion.step``, transcribed to NumPy float64."""

    def run(problem: Problem, steps: int) -> Trajectory:
        backend = get_backend("numpy")
        beta1, beta2 = betas
        params = [p.copy() for p in problem.initial]
        exp_avg = [np.zeros_like(p) for p in params]
        trajectory = []
        for step in range(steps):
            grads = [np.asarray(g) for g in problem.gradient(backend, params, step, "float64")]
            for i, grad in enumerate(grads):
                p = params[i] * (1 - lr * weight_decay)
                update = exp_avg[i] * beta1 + grad * (1 - beta1)
                params[i] = p - lr * np.sign(update)
                exp_avg[i] = exp_avg[i] * beta2 + grad * (1 - beta2)
            trajectory.append([p.copy() for p in params])
        return trajectory

    return Reference("official Lion (google/automl)", "numpy", run)
