"""AdaHessian and Sophia against float64 NumPy transcriptions of their official code.

The references below are written here, independently of ``agnostic_optim``, line by line from:

* AdaHessian -- amirgholami/adahessian, ``image_classification/optim_adahessian.py``:
  ``Adahessian.get_trace`` (``|z ⊙ Hz|``, kernel mean for 4-D leaves) and ``Adahessian.step``.
  The official code estimates every step; for steps without an estimate the reference follows
  our documented extension (``v`` and its bias correction ``1 - β2^n`` kept, ``n`` the number
  of estimates; no move before the first one).
* Sophia -- Liuhong99/Sophia, ``sophia.py``: ``SophiaG.update_hessian`` (fed the given estimate
  instead of ``p.grad ⊙ p.grad``) then ``_single_tensor_sophiag``, with the official's hard-coded
  ``1e-15`` as ``eps``.

The official AdaHessian has no ``maximize``; ours negates the gradient as torch.optim does
(and as the official SophiaG does), so the reference negates ``g``. Each case runs ``STEPS`` steps on a random
multi-leaf problem (a 0-d, 1-d, 2-d and 4-d leaf) and compares every parameter after every step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest

import agnostic_optim as ao
from agnostic_optim.conformance.backends import Backend
from helpers import LEAF_SHAPES, assert_trajectories_close, random_leaves

STEPS = 24
TOL = 1e-12
TOL_FLOAT32 = 2e-5  # float32 rounding over STEPS steps (observed <= 6e-6 on CPU backends)

Estimates = list[list[np.ndarray] | None]


def problem(seed: int, positive: bool) -> tuple[list[np.ndarray], list[list[np.ndarray]], Estimates]:
    """Params, gradients and one Hessian-diagonal estimate per step (GNB-like ``ĝ ⊙ ĝ`` when
    ``positive``, else Hutchinson-like products of either sign)."""
    rng = np.random.default_rng(20261128 + seed)
    params = random_leaves(rng, LEAF_SHAPES)
    grads = [random_leaves(rng, LEAF_SHAPES) for _ in range(STEPS)]
    estimates: Estimates = []
    for _ in range(STEPS):
        leaves = random_leaves(rng, LEAF_SHAPES)
        estimates.append([x * x for x in leaves] if positive else [2 * x for x in leaves])
    return params, grads, estimates


def every(k: int, estimates: Estimates, offset: int = 0) -> Estimates:
    """Only steps ``offset, offset + k, ...`` (0-based) keep their estimate; the rest get None."""
    return [e if i >= offset and (i - offset) % k == 0 else None for i, e in enumerate(estimates)]


def run(
    opt: ao.Optimizer,
    backend: Backend,
    params: Sequence[np.ndarray],
    grads: Sequence[Sequence[np.ndarray]],
    estimates: Estimates,
    dtype: str = "float64",
    step: Callable[..., Any] | None = None,
) -> list[list[np.ndarray]]:
    """Our trajectory on ``backend``, with a ``hessian_diag`` (or None) per step."""
    step = step or opt.step
    current = [backend.asarray(p, dtype) for p in params]
    state = opt.init(current)
    trajectory = []
    for g, e in zip(grads, estimates):
        diag = None if e is None else [backend.asarray(x, dtype) for x in e]
        state, current = step(state, [backend.asarray(x, dtype) for x in g], current, hessian_diag=diag)
        trajectory.append([backend.to_numpy(p) for p in current])
    return trajectory


def rounded(values: Sequence[Any], dtype: str) -> list[Any]:
    """Host values rounded through ``dtype`` (lists of leaves, or None), as float64."""
    if dtype == "float64":
        return list(values)
    return [None if v is None else [x.astype(np.float32).astype(np.float64) for x in v] for v in values]


# --------------------------------------------------------------------------- references


def adahessian_reference(
    params: Sequence[np.ndarray],
    grad_stream: Sequence[Sequence[np.ndarray]],
    estimates: Estimates,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    hessian_power: float,
    spatial_averaging: bool = True,
    maximize: bool = False,
) -> list[list[np.ndarray]]:
    """amirgholami/adahessian ``Adahessian.get_trace`` + ``Adahessian.step`` in float64 NumPy."""
    beta1, beta2 = betas
    p = [np.array(x, dtype=np.float64) for x in params]
    exp_avg = [np.zeros_like(x) for x in p]
    exp_hessian_diag_sq = [np.zeros_like(x) for x in p]
    hessian_step = 0
    trajectory = []
    for step, (raw, zhz) in enumerate(zip(grad_stream, estimates), start=1):
        hut_traces = None
        if zhz is not None:
            hessian_step += 1
            hut_traces = []
            for hv in zhz:  # get_trace: |z ⊙ Hz| == |Hz| for z in {-1, 1}
                if hv.ndim == 4 and spatial_averaging:
                    hut_traces.append(np.mean(np.abs(hv), axis=(2, 3), keepdims=True))
                else:
                    hut_traces.append(np.abs(hv))
        for i in range(len(p)):
            grad = -raw[i] if maximize else raw[i]
            exp_avg[i] = exp_avg[i] * beta1 + (1 - beta1) * grad
            if hut_traces is not None:
                exp_hessian_diag_sq[i] = exp_hessian_diag_sq[i] * beta2 + (1 - beta2) * (
                    hut_traces[i] * hut_traces[i]
                )
            if hessian_step == 0:
                continue  # no curvature yet: the params stay
            bias_correction1 = 1 - beta1**step
            bias_correction2 = 1 - beta2**hessian_step
            k = hessian_power
            denom = (np.sqrt(exp_hessian_diag_sq[i]) ** k) / math.sqrt(bias_correction2) ** k + eps
            p[i] = p[i] - lr * (exp_avg[i] / bias_correction1 / denom + weight_decay * p[i])
        trajectory.append([x.copy() for x in p])
    return trajectory


def sophia_reference(
    params: Sequence[np.ndarray],
    grad_stream: Sequence[Sequence[np.ndarray]],
    estimates: Estimates,
    *,
    lr: float,
    betas: tuple[float, float],
    rho: float,
    weight_decay: float,
    bs: float,
    eps: float = 1e-15,
    maximize: bool = False,
) -> list[list[np.ndarray]]:
    """Liuhong99/Sophia ``SophiaG.update_hessian`` + ``_single_tensor_sophiag`` in float64 NumPy."""
    beta1, beta2 = betas
    p = [np.array(x, dtype=np.float64) for x in params]
    exp_avg = [np.zeros_like(x) for x in p]
    hessian = [np.zeros_like(x) for x in p]
    trajectory = []
    for raw, estimate in zip(grad_stream, estimates):
        if estimate is not None:  # update_hessian with the estimate at the current params
            for i in range(len(p)):
                hessian[i] = hessian[i] * beta2 + (1 - beta2) * estimate[i]
        for i in range(len(p)):
            grad = -raw[i] if maximize else raw[i]
            p[i] = p[i] * (1 - lr * weight_decay)
            exp_avg[i] = exp_avg[i] * beta1 + (1 - beta1) * grad
            ratio = np.minimum(np.abs(exp_avg[i]) / (rho * bs * hessian[i] + eps), 1.0)
            p[i] = p[i] + (-lr) * (np.sign(exp_avg[i]) * ratio)
        trajectory.append([x.copy() for x in p])
    return trajectory


# --------------------------------------------------------------------------- AdaHessian

ADAHESSIAN_HP = {"lr": 0.1, "betas": (0.8, 0.95), "eps": 1e-3, "weight_decay": 0.0, "hessian_power": 1.0}

ADAHESSIAN_CASES = [
    pytest.param({}, 1, 0, id="plain"),
    pytest.param({"hessian_power": 0.6}, 1, 0, id="hessian_power"),
    pytest.param({"weight_decay": 0.05}, 1, 0, id="weight_decay"),
    pytest.param({"maximize": True, "weight_decay": 0.05}, 1, 0, id="maximize-weight_decay"),
    pytest.param({"spatial_averaging": False, "hessian_power": 0.5}, 1, 0, id="no_spatial_averaging"),
    pytest.param({"hessian_power": 0.7, "weight_decay": 0.05}, 3, 0, id="estimate-every-3"),
    pytest.param({"weight_decay": 0.05, "maximize": True}, 4, 2, id="first-estimate-at-step-3"),
    pytest.param({"lr": 0.15, "betas": (0.9, 0.999), "eps": 1e-4}, 1, 0, id="official-defaults"),
]


@pytest.mark.parametrize(("options", "period", "offset"), ADAHESSIAN_CASES)
def test_adahessian_matches_official(backend, options, period, offset):
    hp = {**ADAHESSIAN_HP, **options}
    params, grads, estimates = problem(seed=0, positive=False)
    estimates = every(period, estimates, offset)
    reference = adahessian_reference(params, grads, estimates, **hp)
    ours = run(ao.adahessian(**hp), backend, params, grads, estimates)
    assert_trajectories_close(ours, reference, TOL)


def test_adahessian_spatial_averaging_is_per_kernel():
    """The 4-D leaf's second moment is constant over each kernel and equals the kernel mean."""
    params, grads, estimates = problem(seed=1, positive=False)
    opt = ao.adahessian()
    state = opt.init(params)
    state, _ = opt.step(state, grads[0], params, hessian_diag=estimates[0])
    v = state.buffers["exp_hessian_diag_sq"][3]
    expected = (1 - 0.999) * np.mean(np.abs(estimates[0][3]), axis=(2, 3), keepdims=True) ** 2
    np.testing.assert_allclose(v, np.broadcast_to(expected, v.shape), rtol=1e-14)


def test_adahessian_without_estimates_holds_params_and_counts_estimates():
    params, grads, estimates = problem(seed=1, positive=False)
    opt = ao.adahessian(weight_decay=0.1)
    state = opt.init(params)
    state, moved = opt.step(state, grads[0], params)
    assert all(np.array_equal(a, b) for a, b in zip(moved, params))
    assert float(state.scalars["hessian_step"]) == 0
    state, _ = opt.step(state, grads[1], params, hessian_diag=estimates[1])
    state, _ = opt.step(state, grads[2], params, hessian_diag=None)
    assert float(state.scalars["hessian_step"]) == 1 and int(state.count) == 3


# --------------------------------------------------------------------------- Sophia

SOPHIA_HP = {"lr": 0.05, "betas": (0.9, 0.95), "rho": 0.04, "weight_decay": 0.0, "bs": 25.0}

SOPHIA_CASES = [
    pytest.param({}, 1, 0, id="plain"),
    pytest.param({"weight_decay": 0.2}, 1, 0, id="weight_decay"),
    pytest.param({"maximize": True}, 1, 0, id="maximize"),
    pytest.param({"weight_decay": 0.2, "maximize": True}, 3, 2, id="estimate-every-3-from-step-3"),
    pytest.param({"eps": 1e-8, "bs": 40.0}, 2, 1, id="eps-estimate-every-2"),
    pytest.param({"lr": 1e-4, "betas": (0.965, 0.99), "rho": 0.04, "bs": 5120}, 1, 0, id="official-defaults"),
]


@pytest.mark.parametrize(("options", "period", "offset"), SOPHIA_CASES)
def test_sophia_matches_official(backend, options, period, offset):
    hp = {**SOPHIA_HP, **options}
    params, grads, estimates = problem(seed=3, positive=True)
    estimates = every(period, estimates, offset)
    reference = sophia_reference(params, grads, estimates, **hp)
    ours = run(ao.sophia(**hp), backend, params, grads, estimates)
    assert_trajectories_close(ours, reference, TOL)


def test_sophia_clipping_is_exercised():
    """The test problem has both clipped (ratio 1) and Newton-like (ratio < 1) coordinates."""
    params, grads, estimates = problem(seed=3, positive=True)
    beta1, beta2 = SOPHIA_HP["betas"]
    m = [np.zeros_like(p) for p in params]
    h = [np.zeros_like(p) for p in params]
    clipped = unclipped = 0
    for g, e in zip(grads, estimates):
        for i in range(len(params)):
            h[i] = beta2 * h[i] + (1 - beta2) * e[i]
            m[i] = beta1 * m[i] + (1 - beta1) * g[i]
            ratio = np.abs(m[i]) / (SOPHIA_HP["rho"] * SOPHIA_HP["bs"] * h[i] + 1e-15)
            clipped += int(np.sum(ratio >= 1))
            unclipped += int(np.sum(ratio < 1))
    assert clipped > 50 and unclipped > 50, (clipped, unclipped)


# name -> (factory, reference, hyperparameters, estimate sign, seed, the Hessian buffer's name)
FLOAT32_CASES = {
    "adahessian": (
        ao.adahessian,
        adahessian_reference,
        {**ADAHESSIAN_HP, "hessian_power": 0.7, "weight_decay": 0.05},
        False,
        2,
        "exp_hessian_diag_sq",
    ),
    "sophia": (
        ao.sophia,
        sophia_reference,
        {**SOPHIA_HP, "weight_decay": 0.2},
        True,
        4,
        "hessian",
    ),
}


@pytest.mark.parametrize("name", sorted(FLOAT32_CASES))
def test_float32_runs_stay_float32_and_near_the_reference(backend, name):
    factory, reference_of, hp, positive, seed, buffer = FLOAT32_CASES[name]
    params, grads, estimates = problem(seed=seed, positive=positive)
    estimates = every(2, estimates)
    opt = factory(**hp)
    ours = run(opt, backend, params, grads, estimates, dtype="float32")
    reference = reference_of(
        rounded([params], "float32")[0], rounded(grads, "float32"), rounded(estimates, "float32"), **hp
    )
    assert_trajectories_close(ours, reference, TOL_FLOAT32)
    state = opt.init([backend.asarray(p, "float32") for p in params])
    assert all(b.dtype == backend.dtype("float32") for b in state.buffers[buffer])


# --------------------------------------------------------------------------- validation

INVALID = [
    (ao.adahessian, {"lr": -1.0}),
    (ao.adahessian, {"eps": -1e-4}),
    (ao.adahessian, {"betas": (1.0, 0.999)}),
    (ao.adahessian, {"weight_decay": -0.1}),
    (ao.adahessian, {"hessian_power": 1.5}),
    (ao.sophia, {"lr": -1.0}),
    (ao.sophia, {"betas": (0.9, -0.1)}),
    (ao.sophia, {"rho": -0.04}),
    (ao.sophia, {"weight_decay": -0.1}),
    (ao.sophia, {"bs": 0}),
    (ao.sophia, {"eps": -1.0}),
]


@pytest.mark.parametrize(("factory", "bad"), INVALID)
def test_invalid_hyperparameters_raise(factory, bad):
    with pytest.raises(ValueError):
        factory(**bad)


@pytest.mark.parametrize("factory", [ao.adahessian, ao.sophia])
def test_hessian_diag_must_match_params(factory):
    params = [np.ones(3), np.ones((2, 2))]
    opt = factory()
    state = opt.init(params)
    with pytest.raises(ValueError, match="hessian_diag"):
        opt.step(state, params, params, hessian_diag=[np.ones(3), np.ones(4)])


# --------------------------------------------------------------------------- real curvature

CURVATURE = np.array([0.5, 1.0, 3.0, 10.0, 40.0])  # diag(A) of the quadratic ½ xᵀAx
CONVERGING = [  # Sophia with ρ·bs = 1: the unclipped step is lr · m / h, a damped Newton step
    pytest.param(ao.adahessian(lr=0.5), id="adahessian"),
    pytest.param(ao.sophia(lr=0.5, betas=(0.9, 0.99), rho=0.5, bs=2.0, weight_decay=0.0), id="sophia"),
]


@pytest.mark.parametrize("opt", CONVERGING)
def test_exact_hessian_diagonal_converges(backend, opt):
    """With the exact ``diag(A)`` (whose Hutchinson product is exact too), both converge."""
    a = backend.asarray(CURVATURE)
    x = backend.asarray(np.linspace(-2.0, 3.0, CURVATURE.size))
    state = opt.init(x)
    for _ in range(300):
        state, x = opt.step(state, a * x, x, hessian_diag=a)
    assert float(np.max(np.abs(backend.to_numpy(x)))) < 1e-5


@pytest.mark.parametrize("opt", CONVERGING)
def test_jax_hutchinson_end_to_end_under_jit(jax_backend, opt):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    adapter = pytest.importorskip("agnostic_optim.adapters.jax")
    curvature = {"w": jnp.asarray(CURVATURE), "b": jnp.asarray([2.0, 0.3])}

    def loss(params):
        return sum(jnp.sum(curvature[k] * params[k] ** 2) / 2 for k in params)

    @jax.jit
    def train_step(state, params, key):
        diag = adapter.hutchinson_diagonal(loss, params, key)
        return opt.step(state, jax.grad(loss)(params), params, hessian_diag=diag)

    params = {"w": jnp.linspace(-2.0, 3.0, CURVATURE.size), "b": jnp.asarray([1.0, -1.0])}
    state = opt.init(params)
    for key in jax.random.split(jax.random.PRNGKey(0), 300):
        state, params = train_step(state, params, key)
    assert float(loss(params)) < 1e-8
    assert params["w"].dtype == jnp.float64


@pytest.mark.parametrize("factory", [ao.adahessian, ao.sophia])
def test_jit_matches_eager_with_missing_estimates(jax_backend, factory):
    """Steps with and without ``hessian_diag`` (two traces) give the eager trajectory under jit."""
    jax = pytest.importorskip("jax")
    params, grads, estimates = problem(seed=5, positive=True)
    estimates = every(3, estimates, offset=1)
    opt = factory(lr=0.05)
    eager = run(opt, jax_backend, params, grads, estimates)
    jitted = run(opt, jax_backend, params, grads, estimates, step=jax.jit(opt.step))
    assert_trajectories_close(jitted, eager, 1e-13)
