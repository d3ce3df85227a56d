"""The PyTorch adapter as a drop-in for torch.optim, with torch.optim as the reference.

A small MLP (Linear-Tanh-Linear, full-batch MSE on a fixed teacher's data) is trained by
torch.optim and by our classes from identical starting weights, in lockstep, and compared after
every step (max-norm relative error over all parameters: ``<= 1e-6`` in float32, ``<= 1e-12`` in
float64, where torch runs with float64 as its default dtype so its scalar state is float64 too).

Covered: trajectories with two param groups and lr schedulers (OneCycleLR cycling momentum and
Adam's betas included); checkpoints (``state_dict`` through ``torch.save``/``torch.load(...,
weights_only=True)``) resumed in a fresh optimizer of ours and across ours <-> torch.optim; every
registered optimizer training through the eager path and through ``compile=True``; construction
(factories, registry names, errors, torch-only flags, positional arguments); the drop-in details
(grads that are None, closures, hooks, ``add_param_group``, zero-lr steps, sparse gradients);
``torch.amp.GradScaler``; bf16 params with float32 state; DDP and FSDP2 on two gloo processes.

Every tensor here is tiny, so torch runs single-threaded (OpenMP threads only add contention).
"""

from __future__ import annotations

import collections
import copy
import inspect
import io
import itertools
import os
import pathlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np
import pytest

import agnostic_optim as ao
from agnostic_optim.conformance.compare import relative_error

torch = pytest.importorskip("torch", reason="torch is not installed")
ours = pytest.importorskip("agnostic_optim.adapters.torch", reason="the torch adapter needs torch")
_torch_eager = pytest.importorskip("agnostic_optim.adapters._torch_eager")
_torch_plan = pytest.importorskip("agnostic_optim.adapters._torch_plan")
nn = torch.nn
F = torch.nn.functional

IN, HIDDEN, OUT, BATCH = 4, 16, 3, 64
STEPS = 50  # trajectory length of the comparisons with torch.optim
RESUME_AT = 25  # checkpoints are taken after this many steps
TRAIN_STEPS = 60  # every registered optimizer must halve the loss in this many steps
TOL = {"float32": 1e-6, "float64": 1e-12}

TORCH_CLASSES = ("SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "RAdam", "NAdam")


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(params=["float32", "float64"])
def dtype(request: pytest.FixtureRequest) -> str:
    """float32 with torch's default dtype; float64 with float64 as torch's default dtype."""
    if request.param == "float64":
        request.getfixturevalue("torch64")
    return request.param


# --------------------------------------------------------------------------- the problem


def make_mlp(dtype: Any = torch.float32, seed: int = 0) -> nn.Sequential:
    """Linear-Tanh-Linear with weights drawn from a fixed seed (the global RNG is left alone),
    in float32 whatever the default dtype, then cast: the same weights in every process."""
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Linear(IN, HIDDEN, dtype=torch.float32), nn.Tanh(), nn.Linear(HIDDEN, OUT, dtype=torch.float32)
        )
    return model.to(dtype)


def make_data(dtype: Any = torch.float32, batch: int = BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and the targets of a fixed random teacher network (drawn in float64, then cast)."""
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, IN, generator=g, dtype=torch.float64)
    w1 = torch.randn(IN, 8, generator=g, dtype=torch.float64)
    w2 = torch.randn(8, OUT, generator=g, dtype=torch.float64)
    return x.to(dtype), (torch.tanh(x @ w1) @ w2).to(dtype)


def backward(
    model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], sign: float = 1.0, create_graph: bool = False
) -> float:
    """Zero the grads, compute ``sign * MSE`` and its gradients; returns the MSE."""
    x, y = data
    for p in model.parameters():
        p.grad = None
    loss = F.mse_loss(model(x), y)
    (sign * loss).backward(create_graph=create_graph)
    return loss.item()


def train(opt: Any, model: nn.Module, data: Any, steps: int, scheduler: Any = None) -> list[float]:
    """``steps`` steps of backward + ``opt.step()`` (AdaHessian's backward keeps the graph for its
    Hessian-vector products)."""
    losses = []
    create_graph = isinstance(opt, ours.AdaHessian)
    for _ in range(steps):
        losses.append(backward(model, data, create_graph=create_graph))
        opt.step()
        if scheduler is not None:
            scheduler.step()
    return losses


def flat(model_or_params: Any) -> np.ndarray:
    params = model_or_params.parameters() if isinstance(model_or_params, nn.Module) else model_or_params
    return np.concatenate([p.detach().to(torch.float64).reshape(-1).numpy() for p in params])


def error(ours_model: Any, reference: Any) -> float:
    """Max-norm relative error over all parameters."""
    return relative_error(flat(ours_model), flat(reference))


def two_groups(model: nn.Sequential, second: dict[str, Any]) -> list[dict[str, Any]]:
    """The first layer with the optimizer's defaults, the last layer with ``second``'s overrides."""
    return [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters()), **second}]


def roundtrip(obj: Any) -> Any:
    """``obj`` through ``torch.save`` and ``torch.load(weights_only=True)`` (nothing unpicklable)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def state_snapshot(opt: torch.optim.Optimizer) -> dict[int, dict[str, Any]]:
    """A deep copy of the per-parameter state, keyed by position in the param groups."""
    params = [p for group in opt.param_groups for p in group["params"]]
    return {
        i: {
            k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in opt.state[p].items()
        }
        for i, p in enumerate(params)
        if p in opt.state
    }


def assert_same_state(a: dict[int, dict[str, Any]], b: dict[int, dict[str, Any]]) -> None:
    assert a.keys() == b.keys()
    for i in a:
        assert a[i].keys() == b[i].keys(), f"param {i}"
        for k in a[i]:
            x, y = a[i][k], b[i][k]
            if isinstance(x, torch.Tensor):
                assert x.dtype == y.dtype and torch.equal(x, y), f"param {i}: state {k!r} changed"
            else:
                assert x == y, f"param {i}: state {k!r} changed"


def make_scheduler(kind: str | None, opt: torch.optim.Optimizer, steps: int = STEPS) -> Any:
    if kind is None:
        return None
    if kind == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
    if kind == "one_cycle":  # cycles SGD's momentum / Adam's betas[0] between 0.85 and 0.95
        max_lr = [2 * group["lr"] for group in opt.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=steps, cycle_momentum=True)
    raise ValueError(kind)


# --------------------------------------------------------------------------- 1. trajectories


@dataclass(frozen=True)
class Case:
    """One comparison with torch.optim: the class name (ours and torch's), its hyperparameters,
    the second param group's overrides, the lr scheduler, and the loss sign (-1 with maximize)."""

    id: str
    name: str
    hparams: dict[str, Any]
    second: dict[str, Any] = field(default_factory=dict)
    schedule: str | None = "step"
    sign: float = 1.0


TRAJECTORY_CASES = [
    Case(
        "sgd-nesterov-wd",
        "SGD",
        dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
        dict(lr=0.025, weight_decay=5e-2),
    ),
    Case(
        "sgd-one_cycle-momentum",
        "SGD",
        dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-3),
        dict(lr=0.025, weight_decay=0.0),
        schedule="one_cycle",
    ),
    Case(
        "adam-amsgrad",
        "Adam",
        dict(lr=1e-2, betas=(0.8, 0.95), weight_decay=1e-2, amsgrad=True),
        dict(lr=5e-3, weight_decay=0.0),
    ),
    Case(
        "adam-one_cycle-betas",
        "Adam",
        dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-6),
        dict(lr=5e-3, weight_decay=0.1),
        schedule="one_cycle",
    ),
    Case("adamw", "AdamW", dict(lr=1e-2, weight_decay=0.1), dict(lr=5e-3, weight_decay=0.01)),
    Case(
        "adamw-one_cycle-maximize",
        "AdamW",
        dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.05, maximize=True),
        dict(lr=5e-3, weight_decay=0.2),
        schedule="one_cycle",
        sign=-1.0,
    ),
    Case(
        "rmsprop-centered-momentum",
        "RMSprop",
        dict(lr=1e-2, alpha=0.9, eps=1e-6, momentum=0.5, centered=True, weight_decay=1e-2),
        dict(lr=5e-3, momentum=0.3, weight_decay=0.0),
    ),
    Case(
        "rmsprop-maximize",
        "RMSprop",
        dict(lr=1e-2, maximize=True),
        dict(lr=5e-3, alpha=0.9),
        sign=-1.0,
    ),
    Case(
        "adagrad-lr_decay",
        "Adagrad",
        dict(lr=0.1, lr_decay=1e-2, weight_decay=1e-2, initial_accumulator_value=0.1),
        dict(lr=0.05, weight_decay=0.0, eps=1e-6),
    ),
    Case(
        "radam-decoupled",
        "RAdam",
        dict(lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1, decoupled_weight_decay=True),
        dict(lr=5e-3, weight_decay=0.01),
    ),
    Case("radam-coupled", "RAdam", dict(lr=1e-2, weight_decay=1e-2), dict(lr=5e-3, weight_decay=0.1)),
    Case(
        "nadam-decoupled",
        "NAdam",
        dict(lr=1e-2, weight_decay=0.05, decoupled_weight_decay=True),
        dict(lr=5e-3, momentum_decay=8e-3, weight_decay=0.01),
    ),
    Case(
        "nadam-one_cycle",
        "NAdam",
        dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=1e-2),
        dict(lr=5e-3, weight_decay=0.0),
        schedule="one_cycle",
    ),
]


def test_cases_cover_every_torch_class() -> None:
    assert {case.name for case in TRAJECTORY_CASES} == set(TORCH_CLASSES)
    for name in TORCH_CLASSES:
        assert issubclass(getattr(ours, name), torch.optim.Optimizer)


def lockstep(
    case: Case, dtype: str, steps: int = STEPS, model: nn.Sequential | None = None
) -> tuple[float, list[Any]]:
    """Run ``case`` with torch.optim and with ours in lockstep; (worst error, [ours, torch] runs)."""
    data = make_data(dtype)
    reference_model = model if model is not None else make_mlp(dtype)
    runs = []
    for module in (ours, torch.optim):
        m = copy.deepcopy(reference_model)
        opt = getattr(module, case.name)(two_groups(m, case.second), **case.hparams)
        runs.append((m, opt, make_scheduler(case.schedule, opt, steps)))
    worst = 0.0
    for step in range(steps):
        for m, opt, scheduler in runs:
            backward(m, data, case.sign)
            opt.step()
            if scheduler is not None:
                scheduler.step()
        err = error(runs[0][0], runs[1][0])
        assert np.isfinite(err), f"step {step + 1}: non-finite parameters"
        worst = max(worst, err)
    return worst, runs


@pytest.mark.parametrize("case", TRAJECTORY_CASES, ids=lambda c: c.id)
def test_trajectory_matches_torch_optim(case: Case, dtype: str) -> None:
    worst, runs = lockstep(case, dtype)
    assert worst <= TOL[dtype], f"{case.id} {dtype}: max relative error {worst:.3e} > {TOL[dtype]:.0e}"
    (_, mine, _), (_, reference, _) = runs
    # The schedulers really moved the hyperparameters, identically on both sides.
    for group, ref_group in zip(mine.param_groups, reference.param_groups):
        for name in ("lr", "momentum", "betas"):
            if name in ref_group:
                assert group[name] == ref_group[name]
    if case.schedule == "one_cycle":
        key = "betas" if "betas" in reference.defaults else "momentum"
        assert mine.param_groups[0][key] != case.hparams.get(key)


# --------------------------------------------------------------------------- 2. checkpoints

CHECKPOINT_CASES = {
    "Adam": dict(lr=1e-2, betas=(0.8, 0.95), weight_decay=1e-2, amsgrad=True),
    "AdamW": dict(lr=1e-2, weight_decay=0.1),
    "SGD": dict(lr=0.05, momentum=0.9, weight_decay=1e-2),
    "RMSprop": dict(lr=1e-2, alpha=0.9, momentum=0.5, centered=True),
    "Adagrad": dict(lr=0.1, lr_decay=1e-2, initial_accumulator_value=0.1),
    "NAdam": dict(lr=1e-2, weight_decay=1e-2),
    "RAdam": dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True),
}
SECOND_GROUP = dict(lr=5e-3)
STATE_KEYS = {
    "Adam": {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"},
    "AdamW": {"step", "exp_avg", "exp_avg_sq"},
    "SGD": {"momentum_buffer"},
    "RMSprop": {"step", "square_avg", "momentum_buffer", "grad_avg"},
    "Adagrad": {"step", "sum"},
    "NAdam": {"step", "mu_product", "exp_avg", "exp_avg_sq"},
    "RAdam": {"step", "exp_avg", "exp_avg_sq"},
}


class Run:
    """A model, an optimizer (ours or torch's) over two groups and a StepLR, on float64 data."""

    def __init__(self, module: Any, name: str, model: nn.Sequential):
        self.model = model
        self.opt = getattr(module, name)(two_groups(model, SECOND_GROUP), **CHECKPOINT_CASES[name])
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.opt, step_size=10, gamma=0.5)

    def train(self, steps: int) -> Run:
        train(self.opt, self.model, make_data(torch.float64), steps, self.scheduler)
        return self

    def checkpoint(self) -> dict[str, Any]:
        return roundtrip(
            {
                "model": self.model.state_dict(),
                "optimizer": self.opt.state_dict(),
                "scheduler": self.scheduler.state_dict(),
            }
        )

    @classmethod
    def resume(cls, module: Any, name: str, checkpoint: dict[str, Any]) -> Run:
        model = make_mlp(torch.float64, seed=123)  # other weights: the checkpoint must set them
        model.load_state_dict(checkpoint["model"])
        run = cls(module, name, model)
        run.opt.load_state_dict(checkpoint["optimizer"])
        run.scheduler.load_state_dict(checkpoint["scheduler"])
        return run


@pytest.mark.parametrize("name", sorted(CHECKPOINT_CASES))
def test_checkpoint_resumes_in_fresh_optimizer_of_ours(torch64, name: str) -> None:
    uninterrupted = Run(ours, name, make_mlp(torch.float64)).train(STEPS)
    checkpoint = Run(ours, name, make_mlp(torch.float64)).train(RESUME_AT).checkpoint()
    resumed = Run.resume(ours, name, checkpoint).train(STEPS - RESUME_AT)
    for p, q in zip(resumed.model.parameters(), uninterrupted.model.parameters(), strict=True):
        assert torch.equal(p, q), (
            f"{name}: resumed run differs by {error(resumed.model, uninterrupted.model):.3e}"
        )
    assert_same_state(state_snapshot(resumed.opt), state_snapshot(uninterrupted.opt))


@pytest.mark.parametrize("name", sorted(CHECKPOINT_CASES))
def test_checkpoint_state_keys_match_torch(torch64, name: str) -> None:
    mine = Run(ours, name, make_mlp(torch.float64)).train(RESUME_AT).checkpoint()["optimizer"]
    theirs = Run(torch.optim, name, make_mlp(torch.float64)).train(RESUME_AT).checkpoint()["optimizer"]
    assert mine["state"].keys() == theirs["state"].keys()
    for i, state in theirs["state"].items():
        assert set(state) == STATE_KEYS[name]
        assert set(mine["state"][i]) == set(state), f"{name} param {i}"
        for key, value in state.items():
            assert mine["state"][i][key].shape == value.shape, f"{name} param {i}: {key}"
    assert len(mine["param_groups"]) == len(theirs["param_groups"])
    for group, ref_group in zip(mine["param_groups"], theirs["param_groups"]):
        assert group["params"] == ref_group["params"]
        assert group["lr"] == ref_group["lr"]


@pytest.mark.parametrize("name", sorted(CHECKPOINT_CASES))
def test_state_tensors_are_each_params_own(torch64, name: str) -> None:
    """torch.optim updates loaded state in place (``mu_product *= mu``, ``step += 1``): memory
    shared by several params (torch.save keeps the sharing) would be updated once per param.
    (The step counters are elements of one tensor, so they share a storage but no memory.)"""
    run = Run(ours, name, make_mlp(torch.float64)).train(3)
    for state in (
        {i: dict(run.opt.state[p]) for i, p in enumerate(run.model.parameters())},
        run.checkpoint()["optimizer"]["state"],
    ):
        spans = sorted(
            (value.data_ptr(), value.data_ptr() + value.numel() * value.element_size(), f"param {i} {key!r}")
            for i, entries in state.items()
            for key, value in entries.items()
        )
        for (_, end, where), (start, _, other) in itertools.pairwise(spans):
            assert end <= start, f"{name}: {other} overlaps {where}'s memory"
        torch.save(state, buffer := io.BytesIO())
        loaded = torch.load(io.BytesIO(buffer.getvalue()))
        for entries in loaded.values():  # as torch.optim increments loaded counters, in place
            for value in entries.values():
                value.add_(1)
        for i, entries in loaded.items():
            for key, value in entries.items():
                assert torch.equal(value, state[i][key] + 1), f"{name}: param {i} {key!r}"


@pytest.mark.parametrize("name", sorted(CHECKPOINT_CASES))
def test_checkpoint_of_ours_resumes_in_torch_optim(torch64, name: str) -> None:
    uninterrupted = Run(ours, name, make_mlp(torch.float64)).train(STEPS)
    checkpoint = Run(ours, name, make_mlp(torch.float64)).train(RESUME_AT).checkpoint()
    resumed = Run.resume(torch.optim, name, checkpoint).train(STEPS - RESUME_AT)
    err = error(resumed.model, uninterrupted.model)
    assert err <= TOL["float64"], f"{name}: torch.optim resumed from ours differs by {err:.3e}"


@pytest.mark.parametrize("name", sorted(CHECKPOINT_CASES))
def test_checkpoint_of_torch_optim_resumes_in_ours(torch64, name: str) -> None:
    uninterrupted = Run(torch.optim, name, make_mlp(torch.float64)).train(STEPS)
    checkpoint = Run(torch.optim, name, make_mlp(torch.float64)).train(RESUME_AT).checkpoint()
    resumed = Run.resume(ours, name, checkpoint)
    if name != "SGD":  # torch.optim's one tensor per counter become elements of one per group
        for group in resumed.opt.param_groups:
            steps = [resumed.opt.state[p]["step"] for p in group["params"]]
            assert _torch_plan.counters_base(steps) is not None
    resumed.train(STEPS - RESUME_AT)
    err = error(resumed.model, uninterrupted.model)
    assert err <= TOL["float64"], f"{name}: ours resumed from torch.optim differs by {err:.3e}"


# --------------------------------------------------------------------------- 3. every optimizer trains

TRAIN_HPARAMS: dict[str, dict[str, Any]] = {
    "sgd": dict(lr=0.1, momentum=0.9),
    "adagrad": dict(lr=0.1),
    "rmsprop": dict(lr=1e-2),
    "adam": dict(lr=3e-2),
    "adamw": dict(lr=3e-2, weight_decay=1e-2),
    "amsgrad": dict(lr=3e-2),
    "radam": dict(lr=3e-2),
    "nadam": dict(lr=3e-2),
    "adan": dict(lr=3e-2),
    "lion": dict(lr=1e-2),
    "lars": dict(lr=5.0, momentum=0.9, weight_decay=1e-4),
    "lamb": dict(lr=3e-2),
    "adahessian": dict(lr=0.1),
    "sophia": dict(lr=1e-2),  # (no update_hessian: the Hessian EMA stays 0, sign steps)
    "shampoo": dict(lr=0.1),
}
# The classes built as torch.optim's are, from params and hyperparameters, and stepped after a
# backward: those running a rule. SAM and LBFGS step with a closure, Lookahead wraps an optimizer
# instance and KFAC takes the model: test_wrappers.py, test_lbfgs.py and test_kfac.py test them.
RULE_CLASSES = sorted(
    name
    for name, cls in ours.CLASS_FOR_FACTORY.items()
    if issubclass(cls, ours.TorchOptimizer) and cls.sparse_gradients != "require"
)
OWN_TESTS = {
    "sparse_adam": "test_torch_sparse.py",
    "sam": "test_wrappers.py",
    "lookahead": "test_wrappers.py",
    "lbfgs": "test_lbfgs.py",
    "kfac": "test_kfac.py",
}


def test_every_registered_optimizer_has_a_class() -> None:
    registered = set(ao.registry())
    missing = registered - set(ours.CLASS_FOR_FACTORY)
    assert not missing, f"registered optimizers without a torch class: {sorted(missing)}"
    for name, cls in ours.CLASS_FOR_FACTORY.items():
        assert issubclass(cls, torch.optim.Optimizer), name
        assert cls.__name__ in ours.__all__, name
    assert set(ours.CLASS_FOR_FACTORY) - set(RULE_CLASSES) == set(OWN_TESTS)
    for name, test_file in OWN_TESTS.items():
        cls_name = ours.CLASS_FOR_FACTORY[name].__name__
        assert f"{cls_name}(" in (pathlib.Path(__file__).parent / test_file).read_text(), name


@pytest.mark.parametrize("name", sorted(set(RULE_CLASSES) | {"lbfgs", "kfac"}))
def test_class_signatures_are_torchs_with_the_cores_defaults(name: str) -> None:
    """``help(AdamW)`` and IDEs show the real arguments: torch.optim's positional order and
    defaults where torch has the class (its execution flags included), the core factory's
    defaults otherwise, and a call is bound as Python binds it."""
    cls = ours.CLASS_FOR_FACTORY[name]
    ours_parameters = inspect.signature(cls).parameters
    factory = ao.registry()[name].factory
    for key, parameter in inspect.signature(factory).parameters.items():
        if key in ours_parameters:
            assert ours_parameters[key].default == parameter.default, key
    torch_class = getattr(torch.optim, cls.__name__, None)
    if torch_class is None:
        return
    theirs = list(inspect.signature(torch_class).parameters.values())
    positional = [p.name for p in theirs if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    mine = [p.name for p in ours_parameters.values() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert mine == positional
    by_convention = getattr(factory, "convention_defaults", {})  # None: the convention's default
    for p in theirs[1:]:
        assert p.name in ours_parameters, p.name
        default = ours_parameters[p.name].default
        if default is None and p.name in by_convention:
            default = by_convention[p.name][0]  # (torch's convention)
        if default != p.default:  # (a float for torch's int 0 or 1)
            assert float(default) == float(p.default), p.name
    with pytest.raises(TypeError, match="multiple values for argument 'lr'"):
        cls(make_mlp().parameters(), 0.1, lr=0.1)
    with pytest.raises(TypeError, match="unexpected keyword argument 'not_a_hyperparameter'"):
        cls(make_mlp().parameters(), not_a_hyperparameter=1)


@pytest.mark.parametrize("name", ["adahessian", "sophia", "lbfgs", "kfac", "sam", "lookahead"])
def test_torch_optimizer_refuses_factories_that_need_their_class(name: str) -> None:
    """A factory taking step inputs runs through its class, which makes them from autograd."""
    cls = ours.CLASS_FOR_FACTORY[name].__name__
    with pytest.raises(TypeError, match=f"use agnostic_optim.adapters.torch.{cls}"):
        ours.TorchOptimizer(make_mlp().parameters(), name)


@pytest.mark.parametrize("name", sorted(set(RULE_CLASSES) - {"adahessian", "sophia"}))
def test_class_runs_its_registered_factory(name: str) -> None:
    """The class and ``TorchOptimizer(params, name)`` take bitwise the same steps."""
    hparams = TRAIN_HPARAMS[name]
    data = make_data()
    a, b = make_mlp(), make_mlp()
    train(ours.CLASS_FOR_FACTORY[name](a.parameters(), **hparams), a, data, 3)
    train(ours.TorchOptimizer(b.parameters(), name, **hparams), b, data, 3)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", RULE_CLASSES)
def test_every_optimizer_trains_the_mlp(name: str) -> None:
    assert name in TRAIN_HPARAMS, f"add training hyperparameters for {name!r} to TRAIN_HPARAMS"
    model, data = make_mlp(), make_data()
    opt = ours.CLASS_FOR_FACTORY[name](model.parameters(), **TRAIN_HPARAMS[name])
    losses = train(opt, model, data, TRAIN_STEPS)
    final = F.mse_loss(model(data[0]), data[1]).item()
    assert np.isfinite(final) and final < 0.5 * losses[0], f"{name}: loss {losses[0]:.4f} -> {final:.4f}"
    for group in opt.param_groups:
        for p in group["params"]:
            assert p.dtype == torch.float32
            if name == "sgd":  # torch.optim.SGD keeps no step count, nor do we
                assert set(opt.state[p]) <= {"momentum_buffer"}
            else:
                assert int(opt.state[p]["step"]) == TRAIN_STEPS


@pytest.mark.slow
@pytest.mark.parametrize("name", ["adamw", "sgd", "lion", "adahessian", "sophia", "shampoo"])
def test_compiled_path_agrees_with_eager_and_trains(name: str) -> None:
    """compile=True: same numbers as eager, no recompilation when the scheduler changes lr."""
    data = make_data()
    runs = {}
    for compiled in (False, True):
        torch.manual_seed(0)  # (AdaHessian's probes)
        model = make_mlp()
        opt = ours.CLASS_FOR_FACTORY[name](model.parameters(), compile=compiled, **TRAIN_HPARAMS[name])
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=20, gamma=0.5)
        torch._dynamo.utils.counters.clear()
        losses = train(opt, model, data, 1, scheduler)  # the compiled path compiles here
        # one graph: a break would compile the rule per leaf (and fall back to eager past the
        # recompile limit), which still gives the right numbers but none of the speed
        breaks = torch._dynamo.utils.counters["graph_break"]
        assert not breaks, f"{name}: graph breaks in the compiled step: {dict(breaks)}"
        with torch._dynamo.config.patch(error_on_recompile=True):
            losses += train(opt, model, data, 9, scheduler)
            at_10 = [p.detach().clone() for p in model.parameters()]
            losses += train(opt, model, data, TRAIN_STEPS - 10, scheduler)
        runs[compiled] = (at_10, losses, F.mse_loss(model(data[0]), data[1]).item())
        if name != "sgd":  # the counters are incremented inside the compiled step
            assert [float(opt.state[p]["step"]) for p in model.parameters()] == [TRAIN_STEPS] * 4
    err = relative_error(flat(runs[True][0]), flat(runs[False][0]))
    assert err <= 1e-5, f"{name}: compiled vs eager after 10 steps: {err:.3e}"
    initial, final = runs[True][1][0], runs[True][2]
    assert final < 0.5 * initial, f"{name} compiled: loss {initial:.4f} -> {final:.4f}"


@pytest.mark.slow
def test_compiled_path_follows_a_param_rebound_to_other_strides() -> None:
    """The compiled step skips Inductor's per-call size asserts, since Dynamo's guards check
    every input's sizes and strides: a weight rebound to transposed storage (same values, other
    strides) must recompile rather than be read with the old strides."""
    data = make_data(torch.float64)
    runs = []
    for module, kwargs in ((ours, {"compile": True}), (torch.optim, {})):
        model = make_mlp(torch.float64)
        runs.append((model, module.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-2, **kwargs)))
    for step in range(6):
        for model, opt in runs:
            backward(model, data)
            if step == 3:
                weight = model[0].weight
                weight.data = weight.data.t().contiguous().t()  # the same values, column-major
                assert weight.stride() == (1, weight.shape[0])
            opt.step()
        assert error(runs[0][0], runs[1][0]) <= 1e-12, f"step {step}"


def dynamo_calls(opt: ours.TorchOptimizer) -> list[int]:
    """Count the steps that go through Dynamo (its guards, a compile) rather than straight
    into the graph compiled for the layout: one counter per compiled rule."""
    counts = []
    for compiled in opt._executor()._steps.values():
        through_dynamo, count = compiled._dynamo, [0]

        def counting(*args: Any, through_dynamo: Callable = through_dynamo, count: list = count) -> Any:
            count[0] += 1
            return through_dynamo(*args)

        compiled._dynamo = counting
        counts.append(count)
    return counts


@pytest.mark.slow
def test_compiled_step_runs_its_graph_without_dynamo_and_follows_the_gradients_strides() -> None:
    """After a layout's first step, ``compile=True`` hands the inputs straight to the graph
    Dynamo compiled (skipping its per-call guards over every tensor); it goes back through
    Dynamo, and still matches torch.optim, when the gradients come with other strides (a
    column-major weight gradient) or the scalars change dtype."""
    data = make_data(torch.float64)
    runs = []
    for module, kwargs in ((ours, {"compile": True}), (torch.optim, {})):
        model = make_mlp(torch.float64)
        opt = module.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-2, **kwargs)
        runs.append((model, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)))
    counts = None
    for step in range(8):
        for model, opt, scheduler in runs:
            backward(model, data)
            if step in (4, 5):
                weight = model[0].weight
                weight.grad = weight.grad.t().contiguous().t()  # the same values, column-major
                assert weight.grad.stride() == (1, weight.shape[0])
            opt.step()
            scheduler.step()
        if counts is None:
            counts = dynamo_calls(runs[0][1])
        assert error(runs[0][0], runs[1][0]) <= 1e-12, f"step {step}"
    # steps 1-3 and 7 straight into the graph; 4 (new strides) and 6 (back) through Dynamo; 5
    # straight into the graph compiled at 4
    assert counts == [[2]]


@pytest.mark.slow
def test_compiled_step_follows_params_and_grads_rebound_in_place() -> None:
    """What keeps a tensor's data pointer but not its layout goes back through Dynamo: a param
    rebound through ``.data`` to its own transpose (its gradient kept, as with
    ``zero_grad(set_to_none=False)``), gradients of another dtype (``p.grad_dtype = None``),
    and a param cut to fewer rows, which fails as the eager step does rather than reading past
    the gradient's end."""
    runs = {}
    for compiled in (True, False):
        square = torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        wide = torch.randn(3, 4, dtype=torch.float32, generator=torch.Generator().manual_seed(1))
        params = [square.requires_grad_(), wide.requires_grad_()]
        params[1].grad_dtype = None
        opt = ours.Adam(params, lr=0.1, compile=compiled)
        for step in range(5):
            if step == 2:
                params[0].data = params[0].data.t()  # the same storage, transposed strides
            g = torch.arange(9.0, dtype=torch.float64).reshape(3, 3) + step
            if params[0].grad is None:
                params[0].grad = g.clone()
            else:
                params[0].grad.copy_(g)
            params[1].grad = (torch.arange(12.0).reshape(3, 4) - 5 + step).to(
                torch.float32 if step < 3 else torch.float64
            )
            opt.step()
        runs[compiled] = [p.detach().clone() for p in params]
        params[1].data = params[1].data[:2]  # the same pointer and strides, fewer rows
        with pytest.raises(Exception):  # noqa: B017 (eager: a size mismatch; compiled: Dynamo's)
            opt.step()
    assert relative_error(flat(runs[True][:1]), flat(runs[False][:1])) <= 1e-12
    assert relative_error(flat(runs[True][1:]), flat(runs[False][1:])) <= 1e-6


@pytest.mark.slow
def test_compiled_step_follows_state_rebound_through_data() -> None:
    """A param rebound to new memory (its plan is rebuilt: Dynamo finds the graphs it has) and
    a state buffer rebound to its own transpose (the same memory and dict, other strides: a
    layout the graphs were not compiled for, caught by their input check) both go back
    through Dynamo once, and the steps follow them as torch.optim does."""
    runs = {}
    for module, kwargs in ((ours, {"compile": True}), (ours, {}), (torch.optim, {})):
        generator = torch.Generator().manual_seed(0)
        params = [
            torch.randn(3, 3, dtype=torch.float64, generator=generator).requires_grad_() for _ in range(2)
        ]
        opt = module.Adam(params, lr=0.1, **kwargs)
        counts = None
        for step in range(6):
            if step == 2:
                params[1].data = params[1].data.clone()  # other memory, the same layout
            if step == 4:
                state = opt.state[params[0]]
                state["exp_avg"].data = state["exp_avg"].data.t()  # the same memory, transposed
            for i, p in enumerate(params):
                p.grad = torch.arange(9.0, dtype=torch.float64).reshape(3, 3) * (i + 1) - step
            opt.step()
            if kwargs and counts is None:
                counts = dynamo_calls(opt)
        runs[(module.__name__, bool(kwargs))] = [p.detach().clone() for p in params]
        if kwargs:
            assert counts == [[2]]  # steps 2 and 4
    reference = flat(runs[(torch.optim.__name__, False)])
    for key in ((ours.__name__, True), (ours.__name__, False)):
        assert relative_error(flat(runs[key]), reference) <= 1e-12, key


def test_compiled_step_marks_what_it_writes_and_follows_the_global_state() -> None:
    """The graphs called straight (past AOT autograd's wrappers) increment the version counters
    of the params and buffers they write, as torch.optim's default step does (its fused kernels
    do not), so autograd still refuses a backward through a param the step changed; a change of
    the global state Dynamo guards on (the thread count) goes back through Dynamo, and the
    numbers stay torch.optim's."""
    runs = {}
    for module, kwargs in ((ours, {"compile": True}), (torch.optim, {})):
        generator = torch.Generator().manual_seed(0)
        params = [torch.randn(5, dtype=torch.float64, generator=generator).requires_grad_() for _ in range(2)]
        opt = module.SGD(params, lr=0.1, momentum=0.9, **kwargs)
        threads, counts, bumps = torch.get_num_threads(), None, []
        try:
            for step in range(6):
                for i, p in enumerate(params):
                    p.grad = torch.linspace(-1.0, 1.0, 5, dtype=torch.float64) * (i + 1) - step
                if step == 4:
                    torch.set_num_threads(threads + 1)
                tensors = [*params, *(opt.state[p]["momentum_buffer"] for p in params if opt.state[p])]
                versions = [t._version for t in tensors]
                opt.step()
                bumps += [t._version - v for t, v in zip(tensors, versions)]
                if kwargs and counts is None:
                    counts = dynamo_calls(opt)
        finally:
            torch.set_num_threads(threads)
        saved = (params[0] * params[0]).sum()
        opt.step()
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            saved.backward()
        assert min(bumps) >= 1, module.__name__
        runs[module.__name__] = [p.detach().clone() for p in params]
        if kwargs:
            assert counts == [[2]]  # step 4, at another thread count, and the last, back at the first
    assert relative_error(flat(runs[ours.__name__]), flat(runs[torch.optim.__name__])) <= 1e-12


@pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled:UserWarning")
def test_compiled_step_takes_inference_tensors_and_a_grad_sharing_its_params_counter() -> None:
    """Inference tensors have no version counter: gradients made under ``inference_mode`` and a
    step taken in it (its scalars are inference tensors) step as torch.optim does. A gradient
    that is its param (``p.grad = p.detach()``: one counter) is bumped once a step, as on the
    eager path: not twice (once for the param and once more for the gradient), and not zero
    times, as AOT autograd's wrappers leave it when Inductor compiles the graph anew (a fresh
    cache), alone in its optimizer or among other params. Steps where it is and steps where it
    is not (Dynamo's guards do not tell them apart) step as torch.optim's do."""
    runs, bumps = {}, {}
    for key, module, kwargs, caches_off in (
        ("compiled anew", ours, {"compile": True}, True),
        ("compiled", ours, {"compile": True}, False),
        ("compiled from the cache", ours, {"compile": True}, False),
        ("eager", ours, {}, False),
        ("torch", torch.optim, {}, False),
    ):
        params = [torch.linspace(-1.0, 1.0, 5, dtype=torch.float64).requires_grad_() for _ in range(3)]
        adam = module.Adam(params, lr=0.1, **kwargs)
        alone = torch.linspace(-1.0, 1.0, 5, dtype=torch.float64).requires_grad_()
        sgd = module.SGD([alone], lr=0.1, momentum=0.9, **kwargs)
        bumps[key] = []
        with torch._inductor.config.patch(force_disable_caches=caches_off):
            for step in range(5):
                with torch.inference_mode():
                    params[0].grad = torch.linspace(0.5, -0.5, 5, dtype=torch.float64) - step
                params[1].grad = torch.full((5,), 0.25 * step - 0.5, dtype=torch.float64)
                fresh = torch.linspace(-0.5, 0.5, 5, dtype=torch.float64) * step
                params[2].grad = fresh.clone() if step in (1, 4) else params[2].detach()
                alone.grad = fresh.clone() if step in (2, 3) else alone.detach()
                versions = params[2]._version, alone._version
                if step == 3:
                    with torch.inference_mode():
                        adam.step()
                else:
                    adam.step()
                sgd.step()
                bumps[key].append((params[2]._version - versions[0], alone._version - versions[1]))
        runs[key] = flat([p.detach() for p in (*params, alone)])
    for key in runs:
        assert relative_error(runs[key], runs["torch"]) <= 1e-12, key
        assert bumps[key] == [(1, 1)] * 5, key


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_state_reset_model_cast_and_schedule_only_groups_step_like_eager(torch64, compiled: bool) -> None:
    """What the plan must not hide: ``opt.state`` replaced by a fresh mapping (a reset: torch
    starts every param afresh), the model cast to float32 (``.data`` rebinds every param: the
    buffers follow), and a group whose only hyperparameter is a schedule."""
    data = make_data(torch.float64)
    runs = []
    for module, kwargs in ((ours, {"compile": compiled}), (torch.optim, {})):
        model = make_mlp(torch.float64)
        opt = module.Adam(model.parameters(), lr=1e-2, **kwargs)
        for step in range(6):
            if step == 2:
                opt.state = collections.defaultdict(dict)
            backward(model, data)
            opt.step()
        runs.append((model, opt))
    assert error(runs[0][0], runs[1][0]) <= TOL["float64"]
    assert [float(s["step"]) for s in runs[0][1].state.values()] == [4.0] * 4

    model = make_mlp(torch.float64)
    opt = ours.Adam(model.parameters(), lr=1e-2, compile=compiled)
    for step in range(5):
        if step == 2:
            model.float()
        backward(model, make_data(torch.float32 if step >= 2 else torch.float64))
        opt.step()
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt.state.values())

    schedule = ao.schedules.linear(0.1, 0.01, 4)
    finals = []
    for on in (compiled, False):
        model = make_mlp(torch.float64)
        train(ours.SGD(model.parameters(), lr=schedule, compile=on), model, data, 4)
        finals.append(model)
    assert error(finals[0], finals[1]) <= TOL["float64"]


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_tensor_hyperparameters_are_read_every_step(compiled: bool) -> None:
    """A step reuses a group's hyperparameter tensors while the group dict is unchanged, but
    not one made from a tensor the user gave (a float32 lr tensor edited in place changes no
    dict, and its float64 copy would go stale): a run with an lr tensor filled between steps
    matches one whose group gets the same numbers (powers of two: exact in float32)."""
    data = make_data(torch.float64)
    runs = []
    for lr in (torch.tensor(2.0**-7, dtype=torch.float32), 2.0**-7):
        model = make_mlp(torch.float64)
        opt = ours.AdamW(model.parameters(), lr=lr, compile=compiled)
        for step in range(5):
            backward(model, data)
            opt.step()
            if isinstance(lr, torch.Tensor):
                lr.fill_(2.0 ** -(step + 8))
            else:
                opt.param_groups[0]["lr"] = 2.0 ** -(step + 8)
        runs.append(model)
    assert error(runs[0], runs[1]) == 0.0


@pytest.mark.slow
def test_compiled_optimizers_do_not_share_dynamos_graph_cache() -> None:
    """Dynamo keeps a bounded number of graphs per code object and silently runs the rest
    eagerly: compiled optimizers over differently shaped params in one process (a sweep, a
    second model) each keep their own graphs. With the limit lowered to 2, a third optimizer
    sharing one code object would fail here."""
    data = make_data()
    with torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True):
        for width in (3, 4, 5):
            model = nn.Sequential(nn.Linear(IN, width), nn.Tanh(), nn.Linear(width, OUT))
            opt = ours.AdamW(model.parameters(), lr=1e-2, compile=True)
            losses = train(opt, model, data, 3)
            assert losses[-1] < losses[0]


@pytest.mark.slow
def test_compiled_step_fuses_the_loops_of_small_same_sized_params_only() -> None:
    """Inductor fuses the update loops of same-sized params into one loop; the compiled step
    keeps that for params of at most 2**16 elements and runs larger ones loop after loop
    (``StreamingChoices``: a fused loop streams every fused param's arrays at once), with the
    numbers of torch.optim."""
    from torch._inductor.utils import run_and_get_code

    big, small = 1 << 17, 64
    runs = []
    for module, kwargs in ((ours, {"compile": True}), (torch.optim, {"foreach": False})):
        generator = torch.Generator().manual_seed(0)
        params = [torch.randn(n, generator=generator, requires_grad=True) for n in (big, big, small, small)]
        opt = module.SGD(params, lr=0.1, momentum=0.9, **kwargs)
        for step in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator)
            if step == 0 and module is ours:
                with torch._inductor.config.patch(fx_graph_cache=False):
                    _, sources = run_and_get_code(opt.step)
            else:
                opt.step()
        runs.append(params)
    code = "\n".join(sources)
    loops = {n: code.count(f"x0<static_cast<int64_t>({n}L)") for n in (big, small)}
    assert loops == {big: 2, small: 1}, f"loops over each size in the update graph: {loops}"
    for p, expected in zip(*runs):
        assert relative_error(p.detach().numpy(), expected.detach().numpy()) <= 1e-6


@pytest.mark.slow
def test_compiled_path_resumes_from_load_state_dict_without_compiling_again() -> None:
    """torch.optim's ``load_state_dict`` runs ``__setstate__``; the compiled steps survive it
    (a fresh compile per load took seconds and kept the old graphs)."""
    data = make_data()
    model = make_mlp()
    opt = ours.AdamW(model.parameters(), lr=1e-2, compile=True)
    train(opt, model, data, 2)
    saved = copy.deepcopy(opt.state_dict())
    torch._dynamo.utils.counters.clear()
    counts = dynamo_calls(opt)
    for _ in range(2):
        opt.load_state_dict(saved)
        train(opt, model, data, 3)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0
    # the first step after a load (a new plan) finds its graph through Dynamo, the others go
    # straight to it
    assert counts == [[2]]


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", ["lars", "lamb"])
@pytest.mark.parametrize(
    "mask", [lambda path, p: p.ndim > 1, [True, False, True, False]], ids=["callable", "list"]
)
def test_mask_selects_params_as_the_functional_api_does(torch64, name, mask, compiled) -> None:
    """LARS/LAMB's ``mask=`` (no decay or trust ratio for unselected params, e.g. biases)
    applies per param of the group, resolved as the functional API resolves it over the list of
    params (it used to be ignored by the adapter)."""
    data = make_data(torch.float64)
    model = make_mlp(torch.float64)
    params = [p.detach().clone() for p in model.parameters()]
    factory = ao.registry()[name].factory
    hparams = {"lr": 1e-2, "weight_decay": 0.1}
    opt = ours.TorchOptimizer(model.parameters(), factory, mask=mask, compile=compiled, **hparams)
    reference = factory(mask=mask, **hparams)
    unmasked = factory(**hparams)
    state, free_state, free = reference.init(params), unmasked.init(params), list(params)
    for _ in range(3):
        for p, value in zip(model.parameters(), params):
            p.data.copy_(value)  # the gradients at the reference's params
        backward(model, data)
        grads = [p.grad.clone() for p in model.parameters()]
        for p, value in zip(model.parameters(), params):
            p.data.copy_(value)
        opt.step()
        state, params = reference.step(state, grads, params)
        free_state, free = unmasked.step(free_state, grads, free)
        assert relative_error(flat(list(model.parameters())), flat(params)) <= 1e-12
    assert relative_error(flat(free), flat(params)) > 1e-6  # the mask changes the result


# --------------------------------------------------------------------------- 4. construction


def adamw_reference(steps: int = 5, **kwargs: Any) -> nn.Sequential:
    model = make_mlp()
    train(torch.optim.AdamW(model.parameters(), lr=1e-2, **kwargs), model, make_data(), steps)
    return model


def test_torch_optimizer_with_factory_and_registry_name() -> None:
    reference = adamw_reference(weight_decay=0.1)
    for factory in (ao.adamw, "adamw"):
        model = make_mlp()
        opt = ours.TorchOptimizer(model.parameters(), factory, lr=1e-2, weight_decay=0.1)
        train(opt, model, make_data(), 5)
        assert error(model, reference) <= TOL["float32"], factory


def test_construction_errors() -> None:
    params = list(make_mlp().parameters())
    with pytest.raises(TypeError):
        ours.AdamW(params, lr=1e-3, bogus=1.0)
    with pytest.raises(TypeError):
        ours.TorchOptimizer(params, ao.sgd, lr=0.1, betas=(0.9, 0.99))
    with pytest.raises(ValueError):
        ours.TorchOptimizer(params, "no_such_optimizer")
    with pytest.raises(ValueError):  # per-group values are validated at construction too
        ours.AdamW([{"params": params[:2], "lr": -1.0}, {"params": params[2:]}], lr=1e-3)
    with pytest.raises(ValueError, match="compile=True and differentiable=True"):
        ours.AdamW(params, lr=1e-3, differentiable=True, compile=True)


@pytest.mark.parametrize("name", RULE_CLASSES)
def test_negative_lr_is_refused_at_construction(name: str) -> None:
    with pytest.raises(ValueError):
        ours.CLASS_FOR_FACTORY[name](make_mlp().parameters(), lr=-1.0)


@pytest.mark.parametrize(
    "flags", [dict(foreach=True), dict(foreach=False), dict(fused=True), dict(capturable=False)], ids=str
)
def test_torch_execution_flags_are_accepted(flags: dict[str, Any]) -> None:
    reference = adamw_reference()
    model = make_mlp()
    train(ours.AdamW(model.parameters(), lr=1e-2, **flags), model, make_data(), 5)
    assert error(model, reference) <= TOL["float32"]


POSITIONAL_VALUES = {  # values for every argument torch.optim accepts positionally
    "lr": 0.01,
    "momentum": 0.5,
    "dampening": 0.0,
    "weight_decay": 0.01,
    "nesterov": True,
    "betas": (0.8, 0.95),
    "eps": 1e-6,
    "amsgrad": True,
    "alpha": 0.9,
    "centered": True,
    "capturable": False,
    "foreach": True,
    "maximize": True,
    "differentiable": False,
    "lr_decay": 0.01,
    "initial_accumulator_value": 0.1,
    "decoupled_weight_decay": True,
    "momentum_decay": 0.005,
}


@pytest.mark.parametrize("name", TORCH_CLASSES)
def test_positional_arguments_mean_what_they_mean_in_torch(name: str) -> None:
    """``Cls(params, lr, ...)`` with all of torch's positional arguments, as in torch.optim."""
    signature = inspect.signature(getattr(torch.optim, name).__init__)
    names = [
        p.name
        for p in signature.parameters.values()
        if p.kind is p.POSITIONAL_OR_KEYWORD and p.name not in ("self", "params")
    ]
    args = [POSITIONAL_VALUES[n] for n in names]
    models = []
    for module in (ours, torch.optim):
        model = make_mlp()
        train(getattr(module, name)(model.parameters(), *args), model, make_data(), 5)
        models.append(model)
    assert error(*models) <= TOL["float32"], f"{name}{tuple(zip(names, args))}"


# --------------------------------------------------------------------------- 5. drop-in details


def drop_grads(step: int, model: nn.Sequential) -> None:
    """Leave some params without a gradient: the last layer for the first 8 steps and every
    third step after; the first layer's weight on steps 15-19."""
    if step < 8 or step % 3 == 0:
        model[2].weight.grad = None
        model[2].bias.grad = None
    if 15 <= step < 20:
        model[0].weight.grad = None


@pytest.mark.parametrize(
    "name, hparams",
    [
        ("Adam", dict(lr=1e-2, weight_decay=1e-2)),
        ("SGD", dict(lr=0.05, momentum=0.9, weight_decay=1e-2)),
        ("NAdam", dict(lr=1e-2)),
        ("Adagrad", dict(lr=0.1, lr_decay=1e-2)),
        ("RMSprop", dict(lr=1e-2, momentum=0.5, centered=True)),
    ],
)
def test_params_without_grad_are_skipped_like_torch(torch64, name: str, hparams: dict[str, Any]) -> None:
    data = make_data(torch.float64)
    base = make_mlp(torch.float64)
    runs = []
    for module in (ours, torch.optim):
        model = copy.deepcopy(base)
        runs.append((model, getattr(module, name)(model.parameters(), **hparams)))
    (mine_model, mine), (ref_model, reference) = runs
    last, ref_last = mine_model[2].weight, ref_model[2].weight
    stepped = {p: 0 for p in mine_model.parameters()}
    for step in range(30):
        for model, _ in runs:
            backward(model, data)
            drop_grads(step, model)
        skipped = [p for p in mine_model.parameters() if p.grad is None]
        before = {p: (p.detach().clone(), {k: v.clone() for k, v in mine.state[p].items()}) for p in skipped}
        for _, opt in runs:
            opt.step()
        for p in mine_model.parameters():
            stepped[p] += p.grad is not None
        for p, (value, state) in before.items():
            assert torch.equal(p, value), f"step {step}: a param without grad moved"
            if state:
                assert_same_state({0: dict(mine.state[p])}, {0: state})
            else:
                assert p not in mine.state or not mine.state[p], "state created for a param without grad"
        if step < 8:  # (state as torch.optim has it: none yet, but Adagrad's from construction)
            assert bool(mine.state.get(last)) == bool(reference.state.get(ref_last))
        err = error(runs[0][0], runs[1][0])
        assert err <= TOL["float64"], f"{name} step {step + 1}: {err:.3e}"
    for p, q in zip(mine_model.parameters(), runs[1][0].parameters()):
        assert set(mine.state[p]) == set(reference.state[q])
        if "step" in reference.state[q]:
            assert int(mine.state[p]["step"]) == stepped[p]
            assert float(mine.state[p]["step"]) == float(reference.state[q]["step"])


def _intervene(step: int, model: nn.Sequential, opt: torch.optim.Optimizer) -> None:
    """What a user may do between steps, which a step must honour as torch.optim does."""
    weight, bias = model[0].weight, model[0].bias
    if step == 4:
        weight.data = weight.data.clone() * 0.5  # rebinds the storage the chunks were cut from
    if step == 7:
        opt.state[weight]["exp_avg"] = torch.zeros_like(weight)  # a replaced buffer
    if step == 10:
        opt.state[bias]["step"].fill_(3.0)  # an edited step count: this param's own history now
    if step == 13:
        opt.state[weight]["exp_avg_sq"].mul_(0.5)  # a buffer edited in place
    if step == 16:
        model[2].bias.grad = None
    if step == 19:
        opt.state.pop(model[2].weight)  # a dropped state starts afresh
    if step == 21:
        opt.state[weight] = dict(opt.state[weight])  # a new state dict holding the same tensors
    if step == 23:
        state = opt.state[weight]
        state["exp_avg"].data = state["exp_avg"].data.clone()  # the buffer's storage rebound
    if step == 26:
        opt.state[bias]["step"].data.fill_(2.0)  # through ``.data``: no version counter bump


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", ["AdamW", "NAdam"])
def test_user_edits_between_steps_are_honoured_like_torch(torch64, monkeypatch, name: str, compiled) -> None:
    """Both paths keep each group's step layout (the eager path's chunk views and leaf groups,
    step counts; the compiled path's graphs, called directly) from step to step; every edit
    above must still reach the step, exactly as in torch.optim (NAdam also keeps a running
    scalar per param)."""
    monkeypatch.setattr(_torch_eager, "CHUNK_ELEMENTS", 16)  # cut the 64-element weights into chunks
    monkeypatch.setattr(_torch_eager, "BLOCK_ELEMENTS", 40)
    data = make_data(torch.float64)
    base = make_mlp(torch.float64)
    runs = []
    for module, kwargs in ((ours, {"compile": compiled}), (torch.optim, {})):
        model = copy.deepcopy(base)
        opt = getattr(module, name)(model.parameters(), lr=1e-2, weight_decay=1e-2, **kwargs)
        runs.append((model, opt))
    for step in range(30):
        for model, opt in runs:
            backward(model, data)
            _intervene(step, model, opt)
            opt.step()
        err = error(runs[0][0], runs[1][0])
        assert err <= TOL["float64"], f"step {step + 1}: {err:.3e}"
    (mine_model, mine), (ref_model, ref) = runs
    for p, q in zip(mine_model.parameters(), ref_model.parameters()):
        assert float(mine.state[p]["step"]) == float(ref.state[q]["step"])
        assert torch.allclose(mine.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"], rtol=1e-12, atol=0)


COUNTER_EDITS = {
    # its storage rebound (same value): no longer an element of the counters' shared tensor
    "rebound": lambda step: setattr(step, "data", step.data.clone()),
    "through .data": lambda step: step.data.fill_(1.0),  # no version counter bump
    "in place": lambda step: step.fill_(1.0),
}


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
@pytest.mark.parametrize("edit", sorted(COUNTER_EDITS))
def test_step_counter_edits_reach_the_step_like_torch(torch64, edit: str, compiled: bool) -> None:
    """A group's step counters are elements of one tensor, incremented and checked in one call
    each (inside the graph on the compiled path); an edit of one of them (the first made in the
    run) must still reach the step."""
    data = make_data(torch.float64)
    base = make_mlp(torch.float64)
    runs = []
    for module, kwargs in ((ours, {"compile": compiled}), (torch.optim, {})):
        model = copy.deepcopy(base)
        runs.append((model, module.Adam(model.parameters(), lr=1e-2, **kwargs)))
    for step in range(8):
        for model, opt in runs:
            backward(model, data)
            if step == 3:
                COUNTER_EDITS[edit](opt.state[model[2].bias]["step"])
            opt.step()
        assert error(runs[0][0], runs[1][0]) <= TOL["float64"], f"step {step + 1}"
        if step == 2:  # the path under test
            steps = [runs[0][1].state[p]["step"] for p in runs[0][0].parameters()]
            assert _torch_plan.counters_base(steps) is not None
    for p, q in zip(runs[0][0].parameters(), runs[1][0].parameters()):
        assert float(runs[0][1].state[p]["step"]) == float(runs[1][1].state[q]["step"])


@pytest.mark.parametrize("hparams", [dict(lr=0.1), dict(lr=0.1, momentum=0.9)], ids=["plain", "momentum"])
def test_sgd_keeps_its_step_plan(monkeypatch, hparams: dict[str, float]) -> None:
    """torch.optim.SGD keeps no ``step``; ours drops its counters after the first step, and the
    plan must then still match (rebuilding it every step cost 12x in time)."""
    built = []
    original = ours.SGD._plan
    monkeypatch.setattr(ours.SGD, "_plan", lambda self, *a: built.append(1) or original(self, *a))
    model, data = make_mlp(), make_data()
    opt = ours.SGD(model.parameters(), **hparams)
    train(opt, model, data, 6)
    assert len(built) == 1
    assert all("step" not in s for s in opt.state.values())


def test_state_dict_counters_pickle_like_torch_optim() -> None:
    """The live counters share one tensor; the state dict's must not (plain pickle, which
    torch.distributed's object collectives use, would copy the shared tensor per counter)."""
    import pickle

    sizes = {}
    for module in (ours, torch.optim):
        params = [torch.zeros(2, requires_grad=True) for _ in range(300)]
        opt = module.Adam(params, lr=1e-3)
        for p in params:
            p.grad = torch.ones(2)
        opt.step()
        sizes[module.__name__] = len(pickle.dumps(opt.state_dict()))
        assert all(float(s["step"]) == 1.0 for s in opt.state_dict()["state"].values())
    assert sizes[ours.__name__] <= 1.2 * sizes[torch.optim.__name__], sizes


def test_deepcopy_of_the_optimizer_continues_like_the_original() -> None:
    data = make_data(torch.float64)
    model = make_mlp(torch.float64)
    opt = ours.NAdam(model.parameters(), lr=1e-2)
    train(opt, model, data, 3)
    model_copy, opt_copy = copy.deepcopy((model, opt))
    train(opt, model, data, 3)
    train(opt_copy, model_copy, data, 3)
    assert error(model, model_copy) == 0.0
    for p, q in zip(model.parameters(), model_copy.parameters()):
        assert float(opt.state[p]["step"]) == float(opt_copy.state[q]["step"]) == 6.0


def test_step_counters_have_torch_optims_dtype_under_a_16_bit_default() -> None:
    """torch.optim counts in float32 unless the default dtype is float64 (a bf16 counter would
    stop at 256)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        dtypes = {}
        for module in (ours, torch.optim):
            p = torch.zeros(3, dtype=torch.float32, requires_grad=True)
            opt = module.Adam([p], lr=1e-3)
            for _ in range(300):
                p.grad = torch.ones(3, dtype=torch.float32)
                opt.step()
            dtypes[module.__name__] = (opt.state[p]["step"].dtype, float(opt.state[p]["step"]))
    finally:
        torch.set_default_dtype(previous)
    assert dtypes[ours.__name__] == dtypes[torch.optim.__name__] == (torch.float32, 300.0)


def test_a_factory_object_that_cannot_be_hashed() -> None:
    @dataclass(eq=True)  # eq without frozen: unhashable
    class Configured:
        """A factory object forwarding to ao.adamw."""

        __signature__ = inspect.signature(ao.adamw)

        def __call__(self, **options: Any) -> ao.Optimizer:
            return ao.adamw(**options)

    model = make_mlp()
    opt = ours.TorchOptimizer(model.parameters(), Configured(), lr=1e-2, weight_decay=0.1)
    train(opt, model, make_data(), 5)
    assert error(model, adamw_reference(weight_decay=0.1)) <= TOL["float32"]


def test_zero_grad() -> None:
    model, data = make_mlp(), make_data()
    opt = ours.Adam(model.parameters(), lr=1e-2)
    backward(model, data)
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    backward(model, data)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    before = flat(model)
    opt.step()  # no grads at all: nothing to do
    assert np.array_equal(flat(model), before) and not opt.state


def test_step_with_closure_like_torch(torch64) -> None:
    data = make_data(torch.float64)
    base = make_mlp(torch.float64)
    runs = []
    for module in (ours, torch.optim):
        model = copy.deepcopy(base)
        opt = module.Adam(model.parameters(), lr=1e-2)
        calls = []

        def closure(model=model, opt=opt, calls=calls) -> torch.Tensor:
            assert torch.is_grad_enabled()  # torch runs closures with grad enabled
            opt.zero_grad()
            loss = F.mse_loss(model(data[0]), data[1])
            loss.backward()
            calls.append(loss.item())
            return loss

        losses = [opt.step(closure) for _ in range(10)]
        assert all(isinstance(loss, torch.Tensor) for loss in losses)
        assert [loss.item() for loss in losses] == calls
        runs.append((model, calls))
    assert error(runs[0][0], runs[1][0]) <= TOL["float64"]
    np.testing.assert_allclose(runs[0][1], runs[1][1], rtol=1e-12)
    assert ours.Adam(make_mlp().parameters()).step() is None


@pytest.mark.parametrize(
    ("name", "hparams"),
    [("SGD", {"momentum": 0.9, "weight_decay": 0.1}), ("AdamW", {}), ("LAMB", {}), ("Adan", {})],
)
@pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled:UserWarning")
def test_compiled_step_with_gradients_in_their_params_memory(name: str, hparams: dict) -> None:
    """``p.grad = p.detach()`` on some steps, separate gradients on others, in both orders: the
    compiled step gives what the eager one gives with the gradients copied out. Graphs compiled
    on separate memory take the shared one (the direct calls do not check it); a step through
    Dynamo with shared memory runs uncompiled, as a graph compiled on it would mistake later
    separate gradients for views of the params (Dynamo's guards do not tell them apart)."""

    def run(kwargs: dict, pattern: list[str]) -> np.ndarray:
        params = [torch.linspace(-1.0, 1.0, n, dtype=torch.float64).requires_grad_() for n in (64, 300, 7)]
        opt = getattr(ours, name)(params, lr=0.01, **hparams, **kwargs)
        for step, kind in enumerate(pattern):
            for i, p in enumerate(params):
                separate = torch.linspace(0.5, -0.5, p.numel(), dtype=torch.float64) + step + i
                p.grad = {"shared": p.detach(), "copied": p.detach().clone(), "separate": separate}[kind]
            opt.step()
        return flat(params)

    # the first step through Dynamo, then the direct calls on separate memory and on shared
    pattern = ["shared"] * 2 + ["separate"] * 2 + ["shared"] * 2
    expected = run({}, ["copied" if kind == "shared" else kind for kind in pattern])
    # compiled anew: Inductor's cache would serve a graph compiled before on either kind
    with torch._inductor.config.patch(force_disable_caches=True):
        assert relative_error(run({"compile": True}, pattern), expected) <= 1e-12


@pytest.mark.parametrize("compiled", [False, True])
def test_step_runs_without_grad_and_restores_the_grad_mode(compiled: bool) -> None:
    """The step runs with grad mode off, as under ``torch.no_grad`` (its in-place writes to a
    leaf that requires grad would raise otherwise, and record no graph), and leaves the
    caller's grad mode as it found it, also when it raises."""
    param = torch.linspace(-1.0, 1.0, 6).requires_grad_()
    opt = ours.Adam([param], lr=0.1, compile=compiled)
    for enabled in (True, False, True):
        param.grad = torch.ones(6)
        with torch.set_grad_enabled(enabled):
            opt.step()
            assert torch.is_grad_enabled() is enabled
        assert param.grad_fn is None and param.is_leaf and opt.state[param]["exp_avg"].grad_fn is None
    param.grad = torch.ones(6).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert torch.is_grad_enabled()


def test_step_hooks_are_called() -> None:
    model, data = make_mlp(), make_data()
    opt = ours.AdamW(model.parameters(), lr=1e-2)
    events: list[tuple[str, np.ndarray]] = []
    pre = opt.register_step_pre_hook(lambda o, args, kwargs: events.append(("pre", flat(model))))
    post = opt.register_step_post_hook(lambda o, args, kwargs: events.append(("post", flat(model))))
    before = flat(model)
    backward(model, data)
    opt.step()
    after = flat(model)
    assert [kind for kind, _ in events] == ["pre", "post"]
    assert np.array_equal(events[0][1], before) and np.array_equal(events[1][1], after)
    assert not np.array_equal(before, after)
    pre.remove()
    post.remove()
    backward(model, data)
    opt.step()
    assert len(events) == 2


@pytest.mark.parametrize(
    "name, hparams", [("Adam", dict(lr=1e-2, weight_decay=1e-2)), ("SGD", dict(lr=0.05, momentum=0.9))]
)
def test_add_param_group_mid_training(torch64, name: str, hparams: dict[str, Any]) -> None:
    data = make_data(torch.float64)
    base = make_mlp(torch.float64)
    models = []
    for module in (ours, torch.optim):
        model = copy.deepcopy(base)
        opt = getattr(module, name)(model[0].parameters(), **hparams)
        train(opt, model, data, 10)
        opt.add_param_group({"params": list(model[2].parameters()), "lr": hparams["lr"] / 3})
        train(opt, model, data, 20)
        assert len(opt.param_groups) == 2 and opt.param_groups[1]["lr"] == hparams["lr"] / 3
        models.append(model)
    err = error(*models)
    assert err <= TOL["float64"], f"{name}: {err:.3e}"


# (AdaHessian refuses gradients without their graph, as distributed checkpoint's zeros are: a
# forgotten create_graph=True must not go unnoticed)
@pytest.mark.parametrize("name", sorted(set(RULE_CLASSES) - {"adahessian"}))
def test_zero_lr_step_with_zero_grads_changes_nothing(name: str) -> None:
    """What ``torch.distributed.checkpoint``'s ``_init_optim_state`` does to create the state."""
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    model = make_mlp()
    hparams = dict(TRAIN_HPARAMS[name])
    if "weight_decay" in inspect.signature(ao.registry()[name].factory).parameters:
        hparams["weight_decay"] = 0.1
    opt = ours.CLASS_FOR_FACTORY[name](
        [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters()), "lr": 1e-3}],
        **hparams,
    )
    before = [p.detach().clone() for p in model.parameters()]
    _init_optim_state(opt)
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q), f"{name}: a zero-lr step moved a parameter"
        assert p.grad is None
        assert opt.state[p], f"{name}: no state created"
    assert [g["lr"] for g in opt.param_groups] == [hparams["lr"], 1e-3]
    train(opt, model, make_data(), 2)  # trains normally afterwards
    assert not np.array_equal(flat(model), flat(before))


def test_sparse_gradients_are_refused() -> None:
    embedding = nn.Embedding(10, 3, sparse=True)
    linear = nn.Linear(3, 1)
    params = [*linear.parameters(), *embedding.parameters()]
    opt = ours.Adam(params, lr=1e-2)
    before = [p.detach().clone() for p in params]
    linear(embedding(torch.tensor([1, 2, 4]))).sum().backward()
    assert embedding.weight.grad.is_sparse
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    for p, q in zip(params, before):
        assert torch.equal(p, q)
    assert not any(opt.state[p] for p in params if p in opt.state)


@pytest.mark.parametrize("name", ["AdamW", "RMSprop"])
def test_eager_blocks_over_interleaved_dtypes_match_torch(monkeypatch, name: str) -> None:
    """One group whose float32 and float64 params alternate, in blocks of a few leaves: the
    eager path's leaf groups are then index lists (one dtype each), not contiguous ranges, and
    each param still follows torch.optim's own foreach step (which groups by dtype too)."""
    monkeypatch.setattr(_torch_eager, "BLOCK_ELEMENTS", 30)  # two 12-element leaves a block
    runs = []
    for module in (ours, torch.optim):
        generator = torch.Generator().manual_seed(0)
        params = [
            torch.randn(3, 4, generator=generator, dtype=dtype).requires_grad_()
            for dtype in (torch.float32, torch.float64) * 4
        ]
        opt = getattr(module, name)(params, lr=1e-2, weight_decay=0.1)
        for step in range(6):
            for i, p in enumerate(params):
                p.grad = torch.sin(torch.arange(12.0, dtype=p.dtype).reshape(3, 4) * (i + 1) + step)
            opt.step()
        runs.append(params)
    for mine, theirs in zip(*runs, strict=True):
        tolerance = TOL[str(mine.dtype).removeprefix("torch.")]
        assert relative_error(mine.detach().numpy(), theirs.detach().numpy()) <= tolerance, mine.dtype


# --------------------------------------------------------------------------- 6. GradScaler


def test_grad_scaler_matches_torch_and_skips_non_finite_steps() -> None:
    data = make_data()
    base = make_mlp()
    runs = []
    for module in (ours, torch.optim):
        model = copy.deepcopy(base)
        opt = module.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        runs.append((model, opt, torch.amp.GradScaler("cpu", init_scale=2.0**12)))

    def scaled_step(model: nn.Module, opt: Any, scaler: Any, inject: bool = False) -> Any:
        opt.zero_grad()
        scaler.scale(F.mse_loss(model(data[0]), data[1])).backward()
        if inject:
            model[2].weight.grad[0, 0] = float("inf")
        result = scaler.step(opt)
        scaler.update()
        return result

    for _ in range(10):
        for run in runs:
            scaled_step(*run)
    assert error(runs[0][0], runs[1][0]) <= TOL["float32"]

    model, opt, scaler = runs[0]
    params, state, scale = flat(model), state_snapshot(opt), scaler.get_scale()
    assert scaled_step(*runs[0], inject=True) is None
    assert np.array_equal(flat(model), params), "a skipped step moved parameters"
    assert_same_state(state_snapshot(opt), state)
    assert scaler.get_scale() == scale * 0.5
    scaled_step(*runs[1], inject=True)

    for _ in range(5):
        for run in runs:
            scaled_step(*run)
    assert error(runs[0][0], runs[1][0]) <= TOL["float32"]
    assert int(opt.state[model[0].weight]["step"]) == 15


# --------------------------------------------------------------------------- 7. mixed precision


def bf16_adamw(model: nn.Module) -> Any:
    return ours.AdamW(
        model.parameters(), lr=1e-2, weight_decay=0.01, state_dtype="float32", compensation="kahan"
    )


def bf16_resume(checkpoint: dict[str, Any]) -> tuple[nn.Module, Any]:
    model = make_mlp(torch.bfloat16, seed=7)
    model.load_state_dict(checkpoint["model"])
    opt = bf16_adamw(model)
    opt.load_state_dict(checkpoint["optimizer"])  # torch casts floating state to the params' bf16 here
    return model, opt


def check_bf16_dtypes(model: nn.Module, opt: Any) -> None:
    for p in model.parameters():
        assert p.dtype == torch.bfloat16
        state = opt.state[p]
        assert state["exp_avg"].dtype == torch.float32
        assert state["exp_avg_sq"].dtype == torch.float32
        compensation = [v for k, v in state.items() if k not in ("step", "exp_avg", "exp_avg_sq")]
        assert compensation and all(v.dtype == torch.bfloat16 for v in compensation)


def test_bf16_params_keep_float32_state_across_load_state_dict() -> None:
    data, model = make_data(torch.bfloat16), make_mlp(torch.bfloat16)
    opt = bf16_adamw(model)
    losses = train(opt, model, data, 20)
    check_bf16_dtypes(model, opt)
    model, opt = bf16_resume(roundtrip({"model": model.state_dict(), "optimizer": opt.state_dict()}))
    losses += train(opt, model, data, 20)
    check_bf16_dtypes(model, opt)  # the adapter stores the state as float32 again
    final = F.mse_loss(model(data[0]), data[1]).item()
    assert final < 0.5 * losses[0], f"bf16 AdamW: loss {losses[0]:.4f} -> {final:.4f}"


def test_bf16_checkpoint_resumes_identically() -> None:
    """The float32 state survives a checkpoint: the resumed run is the uninterrupted one."""
    data = make_data(torch.bfloat16)
    uninterrupted = make_mlp(torch.bfloat16)
    train(bf16_adamw(uninterrupted), uninterrupted, data, 20)
    model = make_mlp(torch.bfloat16)
    opt = bf16_adamw(model)
    train(opt, model, data, 10)
    model, opt = bf16_resume(roundtrip({"model": model.state_dict(), "optimizer": opt.state_dict()}))
    train(opt, model, data, 10)
    err = error(model, uninterrupted)
    assert err == 0.0, f"bf16 + float32 state: resumed run differs from the uninterrupted one by {err:.3e}"


@pytest.mark.parametrize("name", ["AdamW", "LAMB"])
def test_bf16_training_through_the_adapter_tracks_float32_only_with_compensation(name: str) -> None:
    """Issue 3 through the adapter's batched eager path: a bf16 MLP ends within 2% of the float32
    run's loss with Kahan or master compensation (float32 state), and clearly worse without."""
    hparams = dict(lr=1e-3, weight_decay=0.01)
    data32, data16 = make_data(torch.float32), make_data(torch.bfloat16)

    def final_loss(dtype: torch.dtype, **precision: Any) -> float:
        model = make_mlp(dtype)
        opt = getattr(ours, name)(model.parameters(), **hparams, **precision)
        train(opt, model, data16 if dtype == torch.bfloat16 else data32, 300)
        return F.mse_loss(model.float()(data32[0]), data32[1]).item()

    reference = final_loss(torch.float32)
    for compensation in ("kahan", "master"):
        loss = final_loss(torch.bfloat16, state_dtype="float32", compensation=compensation)
        assert abs(loss - reference) <= 0.02 * reference, (
            f"{name} {compensation}: {loss:.5f} vs {reference:.5f}"
        )
    plain = final_loss(torch.bfloat16, state_dtype="float32")
    assert plain > 1.05 * reference, f"{name} without compensation: {plain:.5f} vs {reference:.5f}"


# --------------------------------------------------------------------------- 8. DDP and FSDP2

DIST_WORLD = 2
DIST_STEPS = 8


def _distributed_train(kind: str, wrap: Callable[[nn.Module], nn.Module], rank: int) -> list[torch.Tensor]:
    """Train a float64 MLP on this rank's half of the batch; return the full parameters."""
    x, y = make_data(torch.float64)
    half = BATCH // DIST_WORLD
    shard = slice(rank * half, (rank + 1) * half)
    model = make_mlp(torch.float64)
    wrapped = wrap(model)
    module = ours if kind == "ours" else torch.optim
    opt = module.AdamW(wrapped.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(DIST_STEPS):
        opt.zero_grad()
        F.mse_loss(wrapped(x[shard]), y[shard]).backward()
        opt.step()
    return [
        (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for p in model.parameters()
    ]


def _fully_shard(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    fully_shard(model[0])
    fully_shard(model[2])
    return fully_shard(model)


def _distributed_worker(rank: int, out_dir: str) -> None:
    """One of two gloo ranks: ours and torch.optim's AdamW under DDP and under FSDP2. They meet
    through a file (a TCP rendezvous on a port found free beforehand can lose it to another
    process before rank 0 binds it)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{os.path.join(out_dir, 'rendezvous')}",
        rank=rank,
        world_size=DIST_WORLD,
        timeout=timedelta(seconds=60),
    )
    results: dict[str, Any] = {}
    try:
        for kind in ("ours", "torch"):
            results[f"ddp-{kind}"] = _distributed_train(kind, DistributedDataParallel, rank)
        try:  # torch's own optimizer first: a failure there means FSDP2 itself does not run here
            results["fsdp-torch"] = _distributed_train("torch", _fully_shard, rank)
        except Exception as exc:
            results["fsdp-unavailable"] = f"{type(exc).__name__}: {exc}"
        else:
            try:
                results["fsdp-ours"] = _distributed_train("ours", _fully_shard, rank)
            except Exception as exc:
                results["fsdp-ours-error"] = f"{type(exc).__name__}: {exc}"
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    out_dir = tmp_path_factory.mktemp("distributed")
    context = mp.start_processes(
        _distributed_worker,
        args=(str(out_dir),),
        nprocs=DIST_WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + 120
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the two gloo processes did not finish within 120 s")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(DIST_WORLD)]


def single_process_adamw() -> list[torch.Tensor]:
    model, data = make_mlp(torch.float64), make_data(torch.float64)
    train(ours.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), model, data, DIST_STEPS)
    return list(model.parameters())


@pytest.mark.slow
def test_ddp_matches_torch_optim(torch64, distributed_results: list[dict[str, Any]]) -> None:
    rank0, rank1 = distributed_results
    for key in ("ddp-ours", "ddp-torch"):
        for p, q in zip(rank0[key], rank1[key], strict=True):
            assert torch.equal(p, q), f"{key}: ranks disagree"
    err = relative_error(flat(rank0["ddp-ours"]), flat(rank0["ddp-torch"]))
    assert err <= TOL["float64"], f"DDP: ours vs torch.optim.AdamW {err:.3e}"
    err = relative_error(flat(rank0["ddp-ours"]), flat(single_process_adamw()))
    assert err <= 1e-10, f"DDP over two half batches vs one process over the full batch: {err:.3e}"


@pytest.mark.slow
def test_fsdp2_matches_torch_optim(torch64, distributed_results: list[dict[str, Any]]) -> None:
    rank0, rank1 = distributed_results
    if "fsdp-unavailable" in rank0:
        pytest.skip(f"FSDP2 (fully_shard) does not run on CPU/gloo here: {rank0['fsdp-unavailable']}")
    assert "fsdp-ours-error" not in rank0, f"our AdamW under FSDP2 failed: {rank0['fsdp-ours-error']}"
    for p, q in zip(rank0["fsdp-ours"], rank1["fsdp-ours"], strict=True):
        assert torch.equal(p, q), "FSDP2: ranks disagree"
    err = relative_error(flat(rank0["fsdp-ours"]), flat(rank0["fsdp-torch"]))
    assert err <= TOL["float64"], f"FSDP2: ours vs torch.optim.AdamW {err:.3e}"
    err = relative_error(flat(rank0["fsdp-ours"]), flat(rank0["ddp-ours"]))
    assert err <= 1e-10, f"FSDP2 vs DDP: {err:.3e}"
