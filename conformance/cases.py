"""The conformance cases: for every registered optimizer, configurations and their references.

Every name in ``ao.registry()`` must have at least one case here (``missing_cases`` says which
do not, and the suite fails on them), and the cases of an optimizer must between them declare
every extra step input the registry lists for it (``missing_inputs``). Each case fixes the
factory's keyword arguments, the extra step inputs it needs (generated on the host from a fixed
seed by :func:`agnostic_optim.conformance.runner.host_inputs`, identical for every backend) and,
where one exists, the external reference that must produce the same trajectory.

Tolerances come from the policy in the package docstring. A case may override them with
``tolerance`` (dtype -> tolerance), which must carry a justification string in
``tolerance_reason`` (a case without one is refused when it is built); no current case needs it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import agnostic_optim as ao
from agnostic_optim.conformance.backends import Backend
from agnostic_optim.conformance.problems import Problem
from agnostic_optim.conformance.references import (
    Reference,
    official_adan,
    official_lion,
    optax_lookahead,
    optax_transform,
    timm_optimizer,
    torch_optim,
)

InputGenerator = Callable[[np.random.Generator, list[tuple[int, ...]], int], "list[np.ndarray] | None"]


def like_params(scale: float = 1.0, positive: bool = False, every: int = 1) -> InputGenerator:
    """An input generator: standard-normal host arrays shaped like the params, times ``scale``
    (absolute values when ``positive``, e.g. a Hessian-diagonal estimate), on every ``every``-th
    step and None on the others (as AdaHessian/Sophia get a new estimate only every k steps)."""

    def generate(rng: np.random.Generator, shapes: list[tuple[int, ...]], step: int) -> Any:
        values = [rng.standard_normal(shape) * scale for shape in shapes]  # drawn every step: a fixed stream
        if step % every:
            return None
        return [np.abs(v) for v in values] if positive else values

    return generate


@dataclass(frozen=True)
class ProblemFunction:
    """A step input computed from the problem rather than drawn as data: ``"gradient"`` (SAM's
    ``grad_fn``: params -> grads), ``"value_and_gradient"`` (L-BFGS's ``value_and_grad_fn``:
    params -> (loss, grads)) or ``"layer_stats"`` (K-FAC's layer inputs and output gradients at
    the current params). Used as a case's input generator, it yields itself every step; the
    runner binds it to the problem, backend, dtype, step and params (:meth:`bind`)."""

    kind: str

    def __post_init__(self) -> None:
        if self.kind not in ("gradient", "value_and_gradient", "layer_stats"):
            raise ValueError(f"unknown problem function {self.kind!r}")

    def __call__(self, rng: np.random.Generator, shapes: list[tuple[int, ...]], step: int) -> ProblemFunction:
        return self

    def runs_on(self, problem: Problem) -> bool:
        needs = {"gradient": problem.gradient, "value_and_gradient": problem.loss}
        return needs.get(self.kind, problem.layer_stats) is not None

    def bind(self, backend: Backend, problem: Problem, step: int, dtype: str, params: list[Any]) -> Any:
        if self.kind == "layer_stats":
            return problem.layer_stats(backend, params, dtype)
        # one function object for every step where the gradient does not depend on it, so that a
        # jitted update closing over it is traced once (as over jax.grad(loss) in a training loop)
        key = (self.kind, id(problem), backend.name, dtype, step if problem.streamed else None)
        if key not in _BOUND:

            def gradient(values: Any) -> list[Any]:
                return problem.gradient(backend, list(values), step, dtype)

            if self.kind == "gradient":
                _BOUND[key] = gradient
            else:
                _BOUND[key] = lambda values: (problem.loss(backend, list(values), dtype), gradient(values))
        return _BOUND[key]


_BOUND: dict[tuple, Callable[..., Any]] = {}  # (see ProblemFunction.bind)


@dataclass(frozen=True)
class Case:
    """One optimizer configuration.

    Attributes:
      optimizer: the registry name.
      label: a unique, readable id (``adam-optax-eps-root``).
      kwargs: the factory's keyword arguments.
      reference: the external implementation it must match (None: cross-backend only).
      inputs: extra step inputs (``hessian_diag``...) -> a host generator
        ``(rng, shapes, step) -> list of NumPy float64 arrays shaped like the params, or None``
        (see :func:`like_params`). The runner calls it with a generator seeded from the case and
        problem, so every backend and entry point gets identical values, cast to the run's dtype.
      tolerance: per-dtype overrides of the policy's tolerance (``{"float32": 3e-5}``).
      tolerance_reason: why the override is needed; required with ``tolerance``.
    """

    optimizer: str
    label: str
    kwargs: dict[str, Any]
    reference: Reference | None = None
    inputs: dict[str, InputGenerator] = field(default_factory=dict)
    tolerance: dict[str, float] = field(default_factory=dict)
    tolerance_reason: str = ""

    def __post_init__(self) -> None:
        if self.tolerance and not self.tolerance_reason.strip():
            raise ValueError(f"case {self.label}: a tolerance override must carry a tolerance_reason")

    def build(self) -> ao.Optimizer:
        return ao.registry()[self.optimizer].factory(**self.kwargs)

    def runs_on(self, problem: Problem) -> bool:
        """False when an input needs what ``problem`` lacks (a loss value for L-BFGS, layers for
        K-FAC)."""
        return all(g.runs_on(problem) for g in self.inputs.values() if isinstance(g, ProblemFunction))


def _case(optimizer: str, label: str, reference: Reference | None = None, **kwargs: Any) -> Case:
    return Case(optimizer, f"{optimizer}-{label}", kwargs, reference)


CASES: list[Case] = [
    # ---- plain first-order / momentum
    _case("sgd", "momentum-dampening-decay", torch_optim("SGD", lr=0.05, momentum=0.9, dampening=0.1,
          weight_decay=1e-3), lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-3),
    _case("sgd", "nesterov", torch_optim("SGD", lr=0.05, momentum=0.9, nesterov=True),
          lr=0.05, momentum=0.9, nesterov=True),
    _case("sgd", "maximize", torch_optim("SGD", lr=0.02, momentum=0.5, weight_decay=1e-3, maximize=True),
          lr=0.02, momentum=0.5, weight_decay=1e-3, maximize=True),
    _case("sgd", "optax-nesterov", optax_transform(lambda o: o.sgd(0.05, momentum=0.9, nesterov=True), "sgd"),
          lr=0.05, momentum=0.9, nesterov=True),
    # ---- adaptive
    _case("adagrad", "lr-decay", torch_optim("Adagrad", lr=0.1, lr_decay=1e-3, weight_decay=1e-3),
          lr=0.1, lr_decay=1e-3, weight_decay=1e-3),
    _case("adagrad", "optax", optax_transform(lambda o: o.adagrad(0.1), "adagrad"),
          lr=0.1, initial_accumulator_value=0.1, eps=1e-7, convention="optax"),
    _case("rmsprop", "centered-momentum", torch_optim("RMSprop", lr=1e-2, momentum=0.5, centered=True,
          weight_decay=1e-3), lr=1e-2, momentum=0.5, centered=True, weight_decay=1e-3),
    _case("rmsprop", "optax-centered", optax_transform(lambda o: o.rmsprop(1e-2, centered=True, momentum=0.5),
          "rmsprop"), lr=1e-2, alpha=0.9, centered=True, momentum=0.5, convention="optax"),
    _case("adam", "decay", torch_optim("Adam", lr=1e-2, betas=(0.8, 0.95), weight_decay=1e-3),
          lr=1e-2, betas=(0.8, 0.95), weight_decay=1e-3),
    _case("adam", "optax-eps-root", optax_transform(lambda o: o.adam(1e-2, eps_root=1e-8), "adam"),
          lr=1e-2, eps_root=1e-8),
    _case("adamw", "decay", torch_optim("AdamW", lr=1e-2, weight_decay=0.1), lr=1e-2, weight_decay=0.1),
    _case("adamw", "optax", optax_transform(lambda o: o.adamw(1e-2, weight_decay=0.1), "adamw"),
          lr=1e-2, weight_decay=0.1),
    _case("amsgrad", "torch", torch_optim("Adam", lr=1e-2, amsgrad=True), lr=1e-2),
    _case("sparse_adam", "torch", torch_optim("SparseAdam", lr=1e-2, betas=(0.8, 0.95)),
          lr=1e-2, betas=(0.8, 0.95)),
    _case("sparse_adam", "maximize", torch_optim("SparseAdam", lr=1e-2, eps=1e-6, maximize=True),
          lr=1e-2, eps=1e-6, maximize=True),
    _case("amsgrad", "optax", optax_transform(lambda o: o.amsgrad(1e-2), "amsgrad"),
          lr=1e-2, convention="optax"),
    _case("radam", "decay", torch_optim("RAdam", lr=1e-2, weight_decay=1e-3), lr=1e-2, weight_decay=1e-3),
    _case("radam", "optax", optax_transform(lambda o: o.radam(1e-2, eps_root=1e-8), "radam"),
          lr=1e-2, eps_root=1e-8, convention="optax"),
    _case("nadam", "decoupled", torch_optim("NAdam", lr=1e-2, weight_decay=1e-2, decoupled_weight_decay=True),
          lr=1e-2, weight_decay=1e-2, decoupled_weight_decay=True),
    _case("nadam", "coupled-decay", torch_optim("NAdam", lr=1e-2, weight_decay=1e-2),
          lr=1e-2, weight_decay=1e-2),
    _case("nadam", "optax", optax_transform(lambda o: o.nadam(1e-2), "nadam"), lr=1e-2, convention="optax"),
    _case("adan", "prox-clip", official_adan(lr=1e-2, weight_decay=0.02, max_grad_norm=5.0),
          lr=1e-2, weight_decay=0.02, max_grad_norm=5.0),
    _case("adan", "no-prox", official_adan(lr=1e-2, weight_decay=0.02, no_prox=True),
          lr=1e-2, weight_decay=0.02, no_prox=True),
    _case("lion", "decay", official_lion(lr=1e-3, weight_decay=0.1), lr=1e-3, weight_decay=0.1),
    _case("lion", "optax", optax_transform(lambda o: o.lion(1e-3, weight_decay=0.1), "lion"),
          lr=1e-3, weight_decay=0.1),
    # ---- large-batch / layer-wise
    _case("lars", "timm-larc",
          timm_optimizer("Lars", lr=0.1, momentum=0.9, weight_decay=1e-3, trust_clip=True),
          lr=0.1, momentum=0.9, weight_decay=1e-3, trust_clip=True),
    _case("lars", "timm-nesterov",
          timm_optimizer("Lars", lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True),
          lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True),
    _case("lars", "optax", optax_transform(lambda o: o.lars(0.1, weight_decay=1e-3), "lars"),
          lr=0.1, momentum=0.9, eps=0.0, weight_decay=1e-3, convention="optax"),
    _case("lamb", "optax", optax_transform(lambda o: o.lamb(1e-2, weight_decay=1e-2), "lamb"),
          lr=1e-2, weight_decay=1e-2),
    _case("lamb", "fusedlamb", timm_optimizer("Lamb", lr=1e-2, weight_decay=1e-2),
          lr=1e-2, weight_decay=1e-2, max_grad_norm=1.0, always_adapt=False),
    _case("lamb", "timm-trust-clip-no-averaging",
          timm_optimizer("Lamb", lr=1e-2, weight_decay=1e-2, trust_clip=True, grad_averaging=False),
          lr=1e-2, weight_decay=1e-2, max_grad_norm=1.0, always_adapt=False, trust_clip=True,
          grad_averaging=False),
    # ---- generalization wrappers (the official code is transcribed in tests/test_wrappers.py)
    Case("sam", "sam-sgd-momentum", dict(base=ao.sgd(lr=0.05, momentum=0.9), rho=0.05),
         inputs={"grad_fn": ProblemFunction("gradient")}),
    Case("sam", "asam-adamw", dict(base=ao.adamw(lr=1e-2, weight_decay=1e-2), rho=0.5, adaptive=True),
         inputs={"grad_fn": ProblemFunction("gradient")}),
    _case("lookahead", "adam", optax_lookahead(lambda o: o.adam(1e-2), 3, 0.5, "adam"),
          base=ao.adam(lr=1e-2), k=3, alpha=0.5),
    _case("lookahead", "sgd-nesterov", base=ao.sgd(lr=0.05, momentum=0.9, nesterov=True), k=5, alpha=0.8),
    # ---- curvature-aware (no library has them: cross-backend; the official code is transcribed
    # in tests/test_reference_curvature.py and tests/test_shampoo.py)
    Case("adahessian", "adahessian-decay", dict(lr=0.02, eps=1e-2, weight_decay=1e-3),
         inputs={"hessian_diag": like_params()}),
    Case("adahessian", "adahessian-every-3", dict(lr=0.05, eps=1e-3, hessian_power=0.5),
         inputs={"hessian_diag": like_params(every=3)}),
    Case("sophia", "sophia-every-2", dict(lr=0.01, rho=0.04, bs=25, weight_decay=0.1),
         inputs={"hessian_diag": like_params(positive=True, every=2)}),
    Case("kfac", "kfac-frequent", dict(lr=0.02, momentum=0.9, weight_decay=1e-3, cov_update_frequency=2,
         inverse_update_frequency=4, layers={(0,): (1,), (2,): (3,)}, weight_layout="in_out"),
         inputs={"layer_stats": ProblemFunction("layer_stats")}),
    # (L-BFGS divides differences of gradients: rounding grows with every inner iteration, so the
    # cases take few; these stay within 1e-12 of torch.optim.LBFGS in float64 over 25 steps)
    Case("lbfgs", "lbfgs-history-3", dict(lr=0.2, max_iter=2, history_size=3),
         torch_optim("LBFGS", lr=0.2, max_iter=2, history_size=3),
         inputs={"value_and_grad_fn": ProblemFunction("value_and_gradient")}),
    Case("lbfgs", "lbfgs-strong-wolfe", dict(max_iter=2, history_size=3, line_search_fn="strong_wolfe"),
         torch_optim("LBFGS", max_iter=2, history_size=3, line_search_fn="strong_wolfe"),
         inputs={"value_and_grad_fn": ProblemFunction("value_and_gradient")}, tolerance={"float32": 2e-4},
         tolerance_reason="the strong-Wolfe line search's cubic interpolation amplifies float32 rounding "
         "(6.5e-5 from the float64 run on numpy, which meets torch.optim.LBFGS to 1e-12)"),
    # (ε bounds the inverse roots' amplification of rounding: with the default 1e-4 a float32 run
    # is 1e-4 away from the float64 one on the quadratic, whose statistics span 5 decades)
    _case("shampoo", "eps-0.1", lr=0.1, eps=0.1),
    _case("shampoo", "stale-roots-momentum", lr=0.05, eps=1e-2, precondition_frequency=3,
          max_preconditioner_dim=4, momentum=0.9, weight_decay=1e-2),
]  # fmt: skip


def cases_for(optimizer: str) -> list[Case]:
    return [case for case in CASES if case.optimizer == optimizer]


def missing_cases() -> list[str]:
    """Registered optimizers with no conformance case (the suite fails on any)."""
    covered = {case.optimizer for case in CASES}
    return [name for name in ao.registry() if name not in covered]


def missing_inputs() -> list[str]:
    """``optimizer: input`` for every extra step input an optimizer declares in the registry that
    none of its cases generates (the suite fails on any)."""
    missing = []
    for name, entry in ao.registry().items():
        covered = {key for case in cases_for(name) for key in case.inputs}
        missing += [f"{name}: {key}" for key in entry.inputs if key not in covered]
    return missing
