"""Adan and Lion against float64 NumPy transcriptions of their official code, on every backend.

The references below are written here, independently of ``agnostic_optim``, line by line from:

* Adan -- sail-sg/Adan, ``adan.py``: ``Adan.step`` (global-norm clipping factor,
  ``neg_pre_grad`` initialised from the clipped first gradient so the first difference is 0)
  and ``_single_tensor_adan`` (the update and the proximal / ``no_prox`` weight decay).
* Lion -- google/automl, ``lion/lion_pytorch.py``: ``Lion.step``.

Neither official optimizer has ``maximize``; ours negates the gradient as torch.optim does, so
the reference is fed ``-g``. Each case runs ``STEPS`` steps on a random multi-leaf problem (a
0-d, 1-d, 2-d and 4-d leaf) and compares every parameter after every step to ``TOL``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

import agnostic_optim as ao
from agnostic_optim.conformance.backends import get_backend
from helpers import LEAF_SHAPES, assert_trajectories_close, random_leaves, run_functional

STEPS = 32
TOL = 1e-12
MAX_GRAD_NORM = 7.0  # inside the range of this problem's gradient norms: clips some steps only


def problem(seed: int = 0) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """Params and a gradient stream whose global norm varies from step to step (scale 0.4-2.5)."""
    rng = np.random.default_rng(20261128 + seed)
    params = random_leaves(rng, LEAF_SHAPES)
    stream = []
    for _ in range(STEPS):
        scale = rng.uniform(0.4, 2.5)
        stream.append([scale * g for g in random_leaves(rng, LEAF_SHAPES)])
    return params, stream


def global_norm(grads: Sequence[np.ndarray]) -> float:
    return float(np.sqrt(sum(float(np.sum(g * g)) for g in grads)))


# --------------------------------------------------------------------------- references


def adan_reference(
    params: Sequence[np.ndarray],
    grad_stream: Sequence[Sequence[np.ndarray]],
    *,
    lr: float,
    betas: tuple[float, float, float],
    eps: float,
    weight_decay: float,
    no_prox: bool,
    max_grad_norm: float,
    maximize: bool = False,
) -> list[list[np.ndarray]]:
    """sail-sg/Adan ``Adan.step`` + ``_single_tensor_adan`` in float64 NumPy."""
    beta1, beta2, beta3 = betas
    p = [np.array(x, dtype=np.float64) for x in params]
    exp_avg = [np.zeros_like(x) for x in p]
    exp_avg_sq = [np.zeros_like(x) for x in p]
    exp_avg_diff = [np.zeros_like(x) for x in p]
    neg_pre_grad: list[np.ndarray] = []
    trajectory = []
    for step, raw in enumerate(grad_stream, start=1):
        grads = [(-g if maximize else g).astype(np.float64) for g in raw]
        if max_grad_norm > 0:
            norm = global_norm(grads)
            clip_global_grad_norm = min(max_grad_norm / (norm + eps), 1.0)  # torch.clamp(max=1.0)
        else:
            clip_global_grad_norm = 1.0
        bias_correction1 = 1.0 - beta1**step
        bias_correction2 = 1.0 - beta2**step
        bias_correction3_sqrt = np.sqrt(1.0 - beta3**step)
        if step == 1:
            neg_pre_grad = [-g * clip_global_grad_norm for g in grads]
        for i in range(len(p)):
            grad = grads[i] * clip_global_grad_norm
            diff = neg_pre_grad[i] + grad  # g_t - g_{t-1}
            exp_avg[i] = exp_avg[i] * beta1 + (1 - beta1) * grad
            exp_avg_diff[i] = exp_avg_diff[i] * beta2 + (1 - beta2) * diff
            nesterov = diff * beta2 + grad
            exp_avg_sq[i] = exp_avg_sq[i] * beta3 + (1 - beta3) * nesterov * nesterov
            denom = np.sqrt(exp_avg_sq[i]) / bias_correction3_sqrt + eps
            step_size_diff = lr * beta2 / bias_correction2
            step_size = lr / bias_correction1
            if no_prox:
                p[i] = p[i] * (1 - lr * weight_decay)
                p[i] = p[i] - step_size * exp_avg[i] / denom
                p[i] = p[i] - step_size_diff * exp_avg_diff[i] / denom
            else:
                p[i] = p[i] - step_size * exp_avg[i] / denom
                p[i] = p[i] - step_size_diff * exp_avg_diff[i] / denom
                p[i] = p[i] / (1 + lr * weight_decay)
            neg_pre_grad[i] = -grad
        trajectory.append([x.copy() for x in p])
    return trajectory


def lion_reference(
    params: Sequence[np.ndarray],
    grad_stream: Sequence[Sequence[np.ndarray]],
    *,
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    maximize: bool = False,
) -> list[list[np.ndarray]]:
    """google/automl ``lion_pytorch.Lion.step`` in float64 NumPy."""
    beta1, beta2 = betas
    p = [np.array(x, dtype=np.float64) for x in params]
    exp_avg = [np.zeros_like(x) for x in p]
    trajectory = []
    for raw in grad_stream:
        for i, g in enumerate(raw):
            grad = -g if maximize else g
            p[i] = p[i] * (1 - lr * weight_decay)
            update = exp_avg[i] * beta1 + grad * (1 - beta1)
            p[i] = p[i] - lr * np.sign(update)
            exp_avg[i] = exp_avg[i] * beta2 + grad * (1 - beta2)
        trajectory.append([x.copy() for x in p])
    return trajectory


# --------------------------------------------------------------------------- tests

ADAN_CASES = [
    pytest.param({}, id="plain"),
    pytest.param({"weight_decay": 0.2}, id="weight_decay-prox"),
    pytest.param({"weight_decay": 0.2, "no_prox": True}, id="weight_decay-no_prox"),
    pytest.param({"max_grad_norm": MAX_GRAD_NORM}, id="max_grad_norm"),
    pytest.param(
        {"weight_decay": 0.2, "max_grad_norm": MAX_GRAD_NORM, "no_prox": True}, id="clip-weight_decay-no_prox"
    ),
    pytest.param({"maximize": True, "weight_decay": 0.2}, id="maximize-weight_decay"),
    pytest.param(
        {"maximize": True, "weight_decay": 0.2, "no_prox": True, "max_grad_norm": MAX_GRAD_NORM},
        id="all-options",
    ),
    pytest.param({"betas": (0.98, 0.92, 0.99), "eps": 1e-8}, id="official-defaults-betas"),
]


@pytest.mark.parametrize("options", ADAN_CASES)
def test_adan_matches_official(backend, options):
    hp = {
        "lr": 0.05,
        "betas": (0.8, 0.7, 0.9),
        "eps": 1e-3,
        "weight_decay": 0.0,
        "no_prox": False,
        "max_grad_norm": 0.0,
        "maximize": False,
    }
    hp.update(options)
    params, grads = problem()
    reference = adan_reference(params, grads, **hp)
    ours = run_functional(ao.adan(**hp), backend, params, grads)
    assert_trajectories_close(ours, reference, TOL)


def test_adan_clip_threshold_is_exercised():
    """MAX_GRAD_NORM clips some steps of the problem and leaves others unclipped."""
    _, grads = problem()
    norms = [global_norm(g) for g in grads]
    assert any(n > MAX_GRAD_NORM for n in norms) and any(n < MAX_GRAD_NORM for n in norms), norms


def test_adan_first_step_clip_matters():
    """The first gradient is clipped before it seeds the previous gradient (diff_1 = 0)."""
    _, grads = problem(seed=3)
    first_norm = global_norm(grads[0])
    grads[0] = [g * (2 * MAX_GRAD_NORM / first_norm) for g in grads[0]]  # first step clips
    params = random_leaves(np.random.default_rng(7), LEAF_SHAPES)
    hp = {"lr": 0.05, "betas": (0.8, 0.7, 0.9), "eps": 1e-3, "weight_decay": 0.1}
    reference = adan_reference(params, grads, no_prox=False, max_grad_norm=MAX_GRAD_NORM, **hp)
    ours = run_functional(ao.adan(max_grad_norm=MAX_GRAD_NORM, **hp), get_backend("numpy"), params, grads)
    assert_trajectories_close(ours, reference, TOL)


LION_CASES = [
    pytest.param({}, id="plain"),
    pytest.param({"weight_decay": 0.5}, id="weight_decay"),
    pytest.param({"maximize": True}, id="maximize"),
    pytest.param({"maximize": True, "weight_decay": 0.5}, id="maximize-weight_decay"),
    pytest.param({"betas": (0.9, 0.99)}, id="official-default-betas"),
]


@pytest.mark.parametrize("options", LION_CASES)
def test_lion_matches_official(backend, options):
    hp = {"lr": 0.01, "betas": (0.8, 0.95), "weight_decay": 0.0, "maximize": False}
    hp.update(options)
    params, grads = problem(seed=1)
    reference = lion_reference(params, grads, **hp)
    ours = run_functional(ao.lion(**hp), backend, params, grads)
    assert_trajectories_close(ours, reference, TOL)


# The official code's defaults: sail-sg/Adan ``Adan(params, lr=1e-3, betas=(0.98, 0.92, 0.99),
# eps=1e-8, weight_decay=0.0, max_grad_norm=0.0, no_prox=False)`` and google/automl's
# ``Lion(params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0)``.
OFFICIAL_DEFAULTS = {
    "adan": {
        "lr": 1e-3,
        "betas": (0.98, 0.92, 0.99),
        "eps": 1e-8,
        "weight_decay": 0.0,
        "no_prox": False,
        "max_grad_norm": 0.0,
    },
    "lion": {"lr": 1e-4, "betas": (0.9, 0.99), "weight_decay": 0.0},
}


@pytest.mark.parametrize("name", sorted(OFFICIAL_DEFAULTS))
def test_defaults_are_the_official_codes(name):
    """``ao.adan()`` / ``ao.lion()`` with no arguments take the official code's steps."""
    reference_fn = {"adan": adan_reference, "lion": lion_reference}[name]
    params, grads = problem(seed=2)
    reference = reference_fn(params, grads, **OFFICIAL_DEFAULTS[name])
    ours = run_functional(getattr(ao, name)(), get_backend("numpy"), params, grads)
    assert_trajectories_close(ours, reference, TOL)
