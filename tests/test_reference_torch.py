"""The torch-convention optimizers against torch.optim, step by step, in float64.

Each case builds one of our optimizers and the torch.optim optimizer with the same
hyperparameters, feeds both the same random multi-leaf gradient stream (a 0-d, 1-d, 2-d and 4-d
leaf) for ``STEPS`` steps and compares every parameter after every step to ``TOL`` (max-norm
relative error per leaf). torch runs with float64 as its default dtype (``torch64``) so its
scalar state (step counts, NAdam's ``mu_product``) is float64 too. Our core runs on NumPy and on
torch tensors (through the array API).

Hyperparameters are deliberately far from the defaults (large learning rates, betas
(0.8, 0.95), sizeable weight decay, large eps where eps is under test) so that a wrong equation
moves the parameters visibly. A second group of tests edits hyperparameters mid-run with
``ao.set_hparams`` and the torch param_group at the same step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pytest

import agnostic_optim as ao
from agnostic_optim.conformance.backends import get_backend
from helpers import LEAF_SHAPES, assert_trajectories_close, random_gradient_stream, random_leaves

STEPS = 32
TOL = 1e-12
EDIT_STEP = 15  # mid-run edits apply from the 16th step on (index 15 of the stream)
BETAS = (0.8, 0.95)


def _case(case_id: str, ours: Callable[[], Any], torch_name: str, **torch_kwargs: Any):
    """One case: our factory call, the torch.optim class name and its keyword arguments."""
    return pytest.param(ours, torch_name, torch_kwargs, id=case_id)


SGD_CASES = [
    _case("sgd-plain", lambda: ao.sgd(lr=0.05), "SGD", lr=0.05),
    _case("sgd-momentum", lambda: ao.sgd(lr=0.05, momentum=0.9), "SGD", lr=0.05, momentum=0.9),
    _case(
        "sgd-dampening",
        lambda: ao.sgd(lr=0.05, momentum=0.9, dampening=0.3),
        "SGD",
        lr=0.05,
        momentum=0.9,
        dampening=0.3,
    ),
    _case(
        "sgd-polyak-ema",
        lambda: ao.sgd(lr=0.1, momentum=0.8, dampening=0.8),
        "SGD",
        lr=0.1,
        momentum=0.8,
        dampening=0.8,
    ),
    _case(
        "sgd-nesterov",
        lambda: ao.sgd(lr=0.05, momentum=0.9, nesterov=True),
        "SGD",
        lr=0.05,
        momentum=0.9,
        nesterov=True,
    ),
    _case("sgd-weight_decay", lambda: ao.sgd(lr=0.05, weight_decay=0.1), "SGD", lr=0.05, weight_decay=0.1),
    _case(
        "sgd-momentum-weight_decay",
        lambda: ao.sgd(lr=0.05, momentum=0.7, dampening=0.1, weight_decay=0.1),
        "SGD",
        lr=0.05,
        momentum=0.7,
        dampening=0.1,
        weight_decay=0.1,
    ),
    _case(
        "sgd-nesterov-weight_decay",
        lambda: ao.sgd(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1),
        "SGD",
        lr=0.05,
        momentum=0.9,
        nesterov=True,
        weight_decay=0.1,
    ),
    _case("sgd-maximize", lambda: ao.sgd(lr=0.05, maximize=True), "SGD", lr=0.05, maximize=True),
    _case(
        "sgd-maximize-nesterov-weight_decay",
        lambda: ao.sgd(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1, maximize=True),
        "SGD",
        lr=0.05,
        momentum=0.9,
        nesterov=True,
        weight_decay=0.1,
        maximize=True,
    ),
    _case("sgd-defaults", lambda: ao.sgd(), "SGD"),
]

ADAGRAD_CASES = [
    _case("adagrad-plain", lambda: ao.adagrad(lr=0.1), "Adagrad", lr=0.1),
    _case("adagrad-lr_decay", lambda: ao.adagrad(lr=0.1, lr_decay=0.05), "Adagrad", lr=0.1, lr_decay=0.05),
    _case(
        "adagrad-initial_accumulator_value",
        lambda: ao.adagrad(lr=0.1, initial_accumulator_value=0.3),
        "Adagrad",
        lr=0.1,
        initial_accumulator_value=0.3,
    ),
    _case(
        "adagrad-weight_decay",
        lambda: ao.adagrad(lr=0.1, weight_decay=0.1),
        "Adagrad",
        lr=0.1,
        weight_decay=0.1,
    ),
    _case("adagrad-eps", lambda: ao.adagrad(lr=0.1, eps=1e-2), "Adagrad", lr=0.1, eps=1e-2),
    _case("adagrad-maximize", lambda: ao.adagrad(lr=0.1, maximize=True), "Adagrad", lr=0.1, maximize=True),
    _case(
        "adagrad-all",
        lambda: ao.adagrad(
            lr=0.1, lr_decay=0.02, weight_decay=0.05, initial_accumulator_value=0.2, eps=1e-3, maximize=True
        ),
        "Adagrad",
        lr=0.1,
        lr_decay=0.02,
        weight_decay=0.05,
        initial_accumulator_value=0.2,
        eps=1e-3,
        maximize=True,
    ),
    _case("adagrad-defaults", lambda: ao.adagrad(), "Adagrad"),
]

RMSPROP_CASES = [
    _case("rmsprop-plain", lambda: ao.rmsprop(lr=0.01, alpha=0.9), "RMSprop", lr=0.01, alpha=0.9),
    _case("rmsprop-eps", lambda: ao.rmsprop(lr=0.01, eps=1e-2), "RMSprop", lr=0.01, eps=1e-2),
    _case(
        "rmsprop-centered",
        lambda: ao.rmsprop(lr=0.01, alpha=0.9, centered=True),
        "RMSprop",
        lr=0.01,
        alpha=0.9,
        centered=True,
    ),
    _case(
        "rmsprop-momentum",
        lambda: ao.rmsprop(lr=0.01, alpha=0.9, momentum=0.8),
        "RMSprop",
        lr=0.01,
        alpha=0.9,
        momentum=0.8,
    ),
    _case(
        "rmsprop-weight_decay",
        lambda: ao.rmsprop(lr=0.01, alpha=0.9, weight_decay=0.1),
        "RMSprop",
        lr=0.01,
        alpha=0.9,
        weight_decay=0.1,
    ),
    _case(
        "rmsprop-maximize",
        lambda: ao.rmsprop(lr=0.01, alpha=0.9, maximize=True),
        "RMSprop",
        lr=0.01,
        alpha=0.9,
        maximize=True,
    ),
    _case(
        "rmsprop-centered-momentum",
        lambda: ao.rmsprop(lr=0.01, alpha=0.9, centered=True, momentum=0.8),
        "RMSprop",
        lr=0.01,
        alpha=0.9,
        centered=True,
        momentum=0.8,
    ),
    _case(
        "rmsprop-momentum-weight_decay-maximize",
        lambda: ao.rmsprop(lr=0.01, alpha=0.95, momentum=0.5, weight_decay=0.1, maximize=True),
        "RMSprop",
        lr=0.01,
        alpha=0.95,
        momentum=0.5,
        weight_decay=0.1,
        maximize=True,
    ),
    _case(
        "rmsprop-all",
        lambda: ao.rmsprop(
            lr=0.02, alpha=0.85, eps=1e-3, weight_decay=0.05, momentum=0.6, centered=True, maximize=True
        ),
        "RMSprop",
        lr=0.02,
        alpha=0.85,
        eps=1e-3,
        weight_decay=0.05,
        momentum=0.6,
        centered=True,
        maximize=True,
    ),
    _case("rmsprop-defaults", lambda: ao.rmsprop(), "RMSprop"),
]

ADAM_CASES = [
    _case(
        "adam-plain",
        lambda: ao.adam(lr=0.05, betas=BETAS, eps=1e-6),
        "Adam",
        lr=0.05,
        betas=BETAS,
        eps=1e-6,
    ),
    _case("adam-eps", lambda: ao.adam(lr=0.05, betas=BETAS, eps=0.1), "Adam", lr=0.05, betas=BETAS, eps=0.1),
    _case(
        "adam-weight_decay-coupled",
        lambda: ao.adam(lr=0.05, betas=BETAS, weight_decay=0.1),
        "Adam",
        lr=0.05,
        betas=BETAS,
        weight_decay=0.1,
    ),
    _case(
        "adam-amsgrad",
        lambda: ao.adam(lr=0.05, betas=BETAS, amsgrad=True),
        "Adam",
        lr=0.05,
        betas=BETAS,
        amsgrad=True,
    ),
    _case(
        "adam-amsgrad-weight_decay",
        lambda: ao.adam(lr=0.05, betas=BETAS, weight_decay=0.1, amsgrad=True),
        "Adam",
        lr=0.05,
        betas=BETAS,
        weight_decay=0.1,
        amsgrad=True,
    ),
    _case(
        "adam-maximize",
        lambda: ao.adam(lr=0.05, betas=BETAS, maximize=True),
        "Adam",
        lr=0.05,
        betas=BETAS,
        maximize=True,
    ),
    _case(
        "adam-decoupled_weight_decay",
        lambda: ao.adam(lr=0.05, betas=BETAS, weight_decay=0.1, decoupled_weight_decay=True),
        "Adam",
        lr=0.05,
        betas=BETAS,
        weight_decay=0.1,
        decoupled_weight_decay=True,
    ),
    _case(
        "adam-all",
        lambda: ao.adam(
            lr=0.05,
            betas=BETAS,
            eps=1e-4,
            weight_decay=0.1,
            amsgrad=True,
            maximize=True,
            decoupled_weight_decay=True,
        ),
        "Adam",
        lr=0.05,
        betas=BETAS,
        eps=1e-4,
        weight_decay=0.1,
        amsgrad=True,
        maximize=True,
        decoupled_weight_decay=True,
    ),
    _case("adam-defaults", lambda: ao.adam(), "Adam"),
]

ADAMW_CASES = [
    _case(
        "adamw-weight_decay",
        lambda: ao.adamw(lr=0.05, betas=BETAS, weight_decay=0.1),
        "AdamW",
        lr=0.05,
        betas=BETAS,
        weight_decay=0.1,
    ),
    _case(
        "adamw-amsgrad",
        lambda: ao.adamw(lr=0.05, betas=BETAS, weight_decay=0.1, amsgrad=True),
        "AdamW",
        lr=0.05,
        betas=BETAS,
        weight_decay=0.1,
        amsgrad=True,
    ),
    _case(
        "adamw-amsgrad-maximize-eps",
        lambda: ao.adamw(lr=0.05, betas=BETAS, eps=1e-3, weight_decay=0.2, amsgrad=True, maximize=True),
        "AdamW",
        lr=0.05,
        betas=BETAS,
        eps=1e-3,
        weight_decay=0.2,
        amsgrad=True,
        maximize=True,
    ),
    _case("adamw-default-decay", lambda: ao.adamw(lr=0.05), "AdamW", lr=0.05),
    _case("adamw-defaults", lambda: ao.adamw(), "AdamW"),
]

AMSGRAD_CASES = [
    _case(
        "amsgrad-plain",
        lambda: ao.amsgrad(lr=0.05, betas=BETAS),
        "Adam",
        lr=0.05,
        betas=BETAS,
        amsgrad=True,
    ),
    _case(
        "amsgrad-weight_decay-maximize",
        lambda: ao.amsgrad(lr=0.05, betas=BETAS, weight_decay=0.1, maximize=True),
        "Adam",
        lr=0.05,
        betas=BETAS,
        weight_decay=0.1,
        amsgrad=True,
        maximize=True,
    ),
    _case(
        "amsgrad-decoupled_weight_decay",
        lambda: ao.amsgrad(lr=0.05, betas=BETAS, weight_decay=0.1, decoupled_weight_decay=True),
        "AdamW",
        lr=0.05,
        betas=BETAS,
        weight_decay=0.1,
        amsgrad=True,
    ),
]

RADAM_CASES = [
    _case("radam-plain", lambda: ao.radam(lr=0.05, betas=BETAS), "RAdam", lr=0.05, betas=BETAS),
    _case(
        "radam-b2-0.999-eps",
        lambda: ao.radam(lr=0.05, betas=(0.9, 0.999), eps=1e-3),
        "RAdam",
        lr=0.05,
        betas=(0.9, 0.999),
        eps=1e-3,
    ),
    _case(
        "radam-weight_decay-coupled",
        lambda: ao.radam(lr=0.05, betas=BETAS, weight_decay=0.1),
        "RAdam",
        lr=0.05,
        betas=BETAS,
        weight_decay=0.1,
    ),
    _case(
        "radam-decoupled_weight_decay",
        lambda: ao.radam(lr=0.05, betas=BETAS, weight_decay=0.1, decoupled_weight_decay=True),
        "RAdam",
        lr=0.05,
        betas=BETAS,
        weight_decay=0.1,
        decoupled_weight_decay=True,
    ),
    _case(
        "radam-maximize",
        lambda: ao.radam(lr=0.05, betas=BETAS, maximize=True),
        "RAdam",
        lr=0.05,
        betas=BETAS,
        maximize=True,
    ),
    _case("radam-defaults", lambda: ao.radam(), "RAdam"),
]

NADAM_CASES = [
    _case("nadam-plain", lambda: ao.nadam(lr=0.02, betas=BETAS), "NAdam", lr=0.02, betas=BETAS),
    _case(
        "nadam-momentum_decay",
        lambda: ao.nadam(lr=0.02, betas=BETAS, momentum_decay=0.05),
        "NAdam",
        lr=0.02,
        betas=BETAS,
        momentum_decay=0.05,
    ),
    _case(
        "nadam-weight_decay-coupled",
        lambda: ao.nadam(lr=0.02, betas=BETAS, weight_decay=0.1),
        "NAdam",
        lr=0.02,
        betas=BETAS,
        weight_decay=0.1,
    ),
    _case(
        "nadam-decoupled_weight_decay",
        lambda: ao.nadam(lr=0.02, betas=BETAS, weight_decay=0.1, decoupled_weight_decay=True),
        "NAdam",
        lr=0.02,
        betas=BETAS,
        weight_decay=0.1,
        decoupled_weight_decay=True,
    ),
    _case(
        "nadam-maximize-eps",
        lambda: ao.nadam(lr=0.02, betas=BETAS, eps=1e-3, maximize=True),
        "NAdam",
        lr=0.02,
        betas=BETAS,
        eps=1e-3,
        maximize=True,
    ),
    _case("nadam-defaults", lambda: ao.nadam(), "NAdam"),
]

ALL_CASES = (
    SGD_CASES
    + ADAGRAD_CASES
    + RMSPROP_CASES
    + ADAM_CASES
    + ADAMW_CASES
    + AMSGRAD_CASES
    + RADAM_CASES
    + NADAM_CASES
)


# --------------------------------------------------------------------------- runners


def run_ours(
    opt: Any,
    backend: Any,
    params: Sequence[np.ndarray],
    grad_stream: Sequence[Sequence[np.ndarray]],
    edits: Mapping[int, dict[str, Any]] | None = None,
) -> list[list[np.ndarray]]:
    """Our trajectory; ``edits[i]`` is applied with ``ao.set_hparams`` before step ``i + 1``."""
    current = [backend.asarray(p) for p in params]
    state = opt.init(current)
    trajectory = []
    for i, grads in enumerate(grad_stream):
        if edits and i in edits:
            state = ao.set_hparams(state, **edits[i])
        state, current = opt.step(state, [backend.asarray(g) for g in grads], current)
        trajectory.append([backend.to_numpy(p) for p in current])
    return trajectory


def run_torch(
    torch: Any,
    name: str,
    kwargs: Mapping[str, Any],
    params: Sequence[np.ndarray],
    grad_stream: Sequence[Sequence[np.ndarray]],
    edits: Mapping[int, dict[str, Any]] | None = None,
) -> list[list[np.ndarray]]:
    """torch.optim's trajectory; ``edits[i]`` is written into the param group before step ``i + 1``."""
    tensors = [torch.tensor(p, dtype=torch.float64, requires_grad=True) for p in params]
    optimizer = getattr(torch.optim, name)(tensors, **kwargs)
    trajectory = []
    for i, grads in enumerate(grad_stream):
        if edits and i in edits:
            for group in optimizer.param_groups:
                group.update(edits[i])
        for t, g in zip(tensors, grads):
            t.grad = torch.tensor(g, dtype=torch.float64)
        optimizer.step()
        trajectory.append([t.detach().numpy().copy() for t in tensors])
    return trajectory


def problem(seed: int = 0) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    rng = np.random.default_rng(20261128 + seed)
    return random_leaves(rng, LEAF_SHAPES), random_gradient_stream(rng, STEPS, LEAF_SHAPES)


def assert_moved(trajectory: Sequence[Sequence[np.ndarray]], params: Sequence[np.ndarray]) -> None:
    """Guard against a vacuous comparison: the reference must actually move every leaf."""
    for leaf, (final, start) in enumerate(zip(trajectory[-1], params)):
        assert np.max(np.abs(final - start)) > 1e-6, f"leaf {leaf} did not move"


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("backend_name", ["numpy", "torch"])
@pytest.mark.parametrize(("make", "torch_name", "torch_kwargs"), ALL_CASES)
def test_matches_torch_optim(torch64, backend_name, make, torch_name, torch_kwargs):
    backend = get_backend(backend_name)
    params, grads = problem()
    reference = run_torch(torch64, torch_name, torch_kwargs, params, grads)
    assert_moved(reference, params)
    ours = run_ours(make(), backend, params, grads)
    assert_trajectories_close(ours, reference, TOL)


# Mid-run edits: lr halved (and, per optimizer, another hyperparameter changed) at step 15.
EDIT_CASES = [
    pytest.param(
        lambda: ao.sgd(lr=0.05, momentum=0.9, dampening=0.2, weight_decay=0.1),
        "SGD",
        {"lr": 0.05, "momentum": 0.9, "dampening": 0.2, "weight_decay": 0.1},
        {"lr": 0.025, "momentum": 0.5, "weight_decay": 0.3},
        id="sgd",
    ),
    pytest.param(
        lambda: ao.adagrad(lr=0.1, lr_decay=0.02, weight_decay=0.05),
        "Adagrad",
        {"lr": 0.1, "lr_decay": 0.02, "weight_decay": 0.05},
        {"lr": 0.05, "lr_decay": 0.1},
        id="adagrad",
    ),
    pytest.param(
        lambda: ao.rmsprop(lr=0.01, alpha=0.9, momentum=0.8, centered=True),
        "RMSprop",
        {"lr": 0.01, "alpha": 0.9, "momentum": 0.8, "centered": True},
        {"lr": 0.005, "alpha": 0.95, "momentum": 0.5},
        id="rmsprop",
    ),
    pytest.param(
        lambda: ao.adam(lr=0.05, betas=BETAS, weight_decay=0.1),
        "Adam",
        {"lr": 0.05, "betas": BETAS, "weight_decay": 0.1},
        {"lr": 0.025, "betas": (0.9, 0.99), "weight_decay": 0.2},
        id="adam",
    ),
    pytest.param(
        lambda: ao.adamw(lr=0.05, betas=BETAS, weight_decay=0.1),
        "AdamW",
        {"lr": 0.05, "betas": BETAS, "weight_decay": 0.1},
        {"lr": 0.025, "weight_decay": 0.3, "eps": 1e-3},
        id="adamw",
    ),
    pytest.param(
        lambda: ao.amsgrad(lr=0.05, betas=BETAS),
        "Adam",
        {"lr": 0.05, "betas": BETAS, "amsgrad": True},
        {"lr": 0.025},
        id="amsgrad",
    ),
    pytest.param(
        lambda: ao.radam(lr=0.05, betas=BETAS, weight_decay=0.1, decoupled_weight_decay=True),
        "RAdam",
        {"lr": 0.05, "betas": BETAS, "weight_decay": 0.1, "decoupled_weight_decay": True},
        {"lr": 0.025, "weight_decay": 0.2},
        id="radam",
    ),
    pytest.param(
        lambda: ao.nadam(lr=0.02, betas=BETAS, momentum_decay=0.01),
        "NAdam",
        {"lr": 0.02, "betas": BETAS, "momentum_decay": 0.01},
        {"lr": 0.01, "momentum_decay": 0.03},
        id="nadam",
    ),
]


@pytest.mark.parametrize(("make", "torch_name", "torch_kwargs", "edit"), EDIT_CASES)
def test_set_hparams_mid_run_matches_torch(torch64, make, torch_name, torch_kwargs, edit):
    params, grads = problem(seed=1)
    edits = {EDIT_STEP: edit}
    reference = run_torch(torch64, torch_name, torch_kwargs, params, grads, edits)
    ours = run_ours(make(), get_backend("numpy"), params, grads, edits)
    assert_trajectories_close(ours, reference, TOL)
    # The edit must matter: without it torch ends elsewhere.
    unedited = run_torch(torch64, torch_name, torch_kwargs, params, grads)
    assert max(np.max(np.abs(a - b)) for a, b in zip(unedited[-1], reference[-1])) > 1e-6
