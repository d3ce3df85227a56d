"""LARS and LAMB match their references step by step (issue 3).

References, all run in float64 on the same host data:

* ``timm.optim.Lars`` -- the default ``ao.lars`` and its options (momentum, dampening, nesterov,
  weight decay, ``trust_coefficient`` vs timm's ``trust_coeff``, eps, LARC's ``trust_clip``,
  ``always_adapt``);
* ``timm.optim.Lamb`` -- the apex / NVIDIA FusedLAMB options of ``ao.lamb`` (``max_grad_norm``,
  ``always_adapt=False``, ``grad_averaging``, ``trust_clip``);
* ``optax.lamb`` / ``optax.lars`` -- ``ao.lamb``'s defaults and ``ao.lars(convention="optax")``.

Masks (no weight decay and no trust ratio on excluded leaves) are checked against timm with two
param groups (the excluded group has ``weight_decay=0, always_adapt=False``), against
``optax.lars(weight_decay_mask=m, trust_ratio_mask=m)``, and for LAMB against an optax chain
that masks both the decay and the trust ratio.

The problem has four leaves: a 2-d weight, a 1-d bias that starts at zero (its zero norm hits the
ratio-1 branch on the first step), a 3-d kernel, and a 1-d scale whose gradient is zero on the
first two steps (zero gradient norm: the other ratio-1 branch). Gradients are scaled per step so
that the global gradient norm crosses ``max_grad_norm``: LAMB's pre-normalisation clips on some
steps and not on others.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys
import types
from typing import Any

import numpy as np
import pytest

import agnostic_optim as ao
from agnostic_optim.conformance.backends import Backend, get_backend
from helpers import assert_trajectories_close, trajectory_error

STEPS = 30
TOL = 1e-12
MAX_GRAD_NORM = 5.0  # the stream's global gradient norms range over ~0.7 .. ~17

KEYS = ("w", "b", "k", "s")
SHAPES = {"w": (4, 5), "b": (5,), "k": (2, 3, 3), "s": (3,)}
ONE_D = [len(SHAPES[key]) != 1 for key in KEYS]  # True: decayed and adapted; False: excluded


def exclude_1d(path: Any, leaf: Any) -> bool:
    """The callable mask: biases and scales (1-d leaves) get no decay and no trust ratio."""
    return leaf.ndim != 1


# --------------------------------------------------------------------------- the problem


@pytest.fixture
def problem(rng: np.random.Generator) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """(initial params, gradient stream) as host float64 lists in ``KEYS`` order."""
    params = [
        1.5 * rng.standard_normal(SHAPES["w"]),
        np.zeros(SHAPES["b"]),  # zero norm on the first step
        0.5 * rng.standard_normal(SHAPES["k"]),
        1.0 + 0.1 * rng.standard_normal(SHAPES["s"]),
    ]
    stream = []
    for step in range(STEPS):
        scale = rng.uniform(0.1, 2.5)
        grads = [scale * rng.standard_normal(SHAPES[key]) for key in KEYS]
        if step < 2:
            grads[3] = np.zeros(SHAPES["s"])  # zero gradient norm
        stream.append(grads)
    norms = [np.sqrt(sum(float(np.sum(g * g)) for g in grads)) for grads in stream]
    # the stream must exercise both sides of LAMB's global-norm clipping
    assert min(norms) < MAX_GRAD_NORM < max(norms), norms
    return params, stream


def as_dict(leaves: list[Any]) -> dict[str, Any]:
    return dict(zip(KEYS, leaves))


# --------------------------------------------------------------------------- runners


def run_ours(
    opt: ao.Optimizer,
    backend: Backend,
    params: list[np.ndarray],
    stream: list[list[np.ndarray]],
    as_tree: bool = False,
) -> list[list[np.ndarray]]:
    """Our trajectory on ``backend`` (params as a list, or as a dict with ``as_tree``)."""

    def wrap(leaves):
        arrays = [backend.asarray(x, "float64") for x in leaves]
        return as_dict(arrays) if as_tree else arrays

    def unwrap(tree):
        leaves = [tree[key] for key in KEYS] if as_tree else list(tree)
        return [backend.to_numpy(x) for x in leaves]

    current = wrap(params)
    state = opt.init(current)
    trajectory = []
    for grads in stream:
        state, current = opt.step(state, wrap(grads), current)
        trajectory.append(unwrap(current))
    return trajectory


@pytest.fixture(scope="module")
def timm_optim() -> types.SimpleNamespace:
    """timm's ``Lars`` and ``Lamb``, loaded without timm's ``__init__`` (which needs torchvision)."""
    spec = importlib.util.find_spec("timm")
    if spec is None or spec.origin is None:
        pytest.skip("timm is not installed (install it with `pip install --no-deps timm`)")
    root = pathlib.Path(spec.origin).parent / "optim"
    if "_timm_optim" not in sys.modules:
        package = types.ModuleType("_timm_optim")
        package.__path__ = [str(root)]
        sys.modules["_timm_optim"] = package

    def load(name: str) -> types.ModuleType:
        full = f"_timm_optim.{name}"
        if full in sys.modules:
            return sys.modules[full]
        module_spec = importlib.util.spec_from_file_location(full, root / f"{name}.py")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[full] = module
        module_spec.loader.exec_module(module)
        return module

    return types.SimpleNamespace(Lars=load("lars").Lars, Lamb=load("lamb").Lamb)


def timm_reference(
    torch: Any,
    make: Any,
    params: list[np.ndarray],
    stream: list[list[np.ndarray]],
    groups: list[bool] | None = None,
    **group_overrides: Any,
) -> list[list[np.ndarray]]:
    """timm's trajectory in float64. With ``groups`` the leaves where it is False form a second
    param group with ``group_overrides`` (e.g. ``weight_decay=0, always_adapt=False``)."""
    tensors = [torch.tensor(p, dtype=torch.float64, requires_grad=True) for p in params]
    if groups is None:
        optimizer = make(tensors)
    else:
        selected = [t for t, keep in zip(tensors, groups) if keep]
        excluded = [t for t, keep in zip(tensors, groups) if not keep]
        optimizer = make([{"params": selected}, {"params": excluded, **group_overrides}])
    trajectory = []
    for grads in stream:
        for t, g in zip(tensors, grads):
            t.grad = torch.tensor(g, dtype=torch.float64)
        optimizer.step()
        trajectory.append([t.detach().numpy().copy() for t in tensors])
    return trajectory


@pytest.fixture(scope="module")
def optax_mod() -> Any:
    backend = get_backend("jax")  # enables x64, so the references run in float64
    if not backend.available:
        pytest.skip(f"backend jax unavailable: {backend.reason}")
    return pytest.importorskip("optax")


def optax_reference(
    optax: Any, tx: Any, params: list[np.ndarray], stream: list[list[np.ndarray]], as_tree: bool = False
) -> list[list[np.ndarray]]:
    import jax.numpy as jnp

    def wrap(leaves):
        arrays = [jnp.asarray(x, dtype=jnp.float64) for x in leaves]
        return as_dict(arrays) if as_tree else arrays

    current = wrap(params)
    state = tx.init(current)
    trajectory = []
    for grads in stream:
        updates, state = tx.update(wrap(grads), state, current)
        current = optax.apply_updates(current, updates)
        leaves = [current[key] for key in KEYS] if as_tree else current
        assert all(x.dtype == jnp.float64 for x in leaves)
        trajectory.append([np.asarray(x, dtype=np.float64) for x in leaves])
    return trajectory


def timm_lars_kwargs(ours: dict[str, Any]) -> dict[str, Any]:
    """timm spells ``trust_coefficient`` as ``trust_coeff``."""
    kwargs = dict(ours)
    if "trust_coefficient" in kwargs:
        kwargs["trust_coeff"] = kwargs.pop("trust_coefficient")
    return kwargs


# --------------------------------------------------------------------------- LARS vs timm

LARS_TIMM_CASES = {
    "defaults": {},
    "momentum": {"lr": 0.1, "momentum": 0.9},
    "dampening": {"lr": 0.1, "momentum": 0.9, "dampening": 0.3},
    "nesterov": {"lr": 0.1, "momentum": 0.9, "nesterov": True},
    "weight_decay": {"lr": 1.0, "weight_decay": 5e-3, "trust_coefficient": 0.01},
    "weight_decay_momentum_nesterov": {
        "lr": 2.0,
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 1e-2,
        "trust_coefficient": 0.02,
    },
    "eps": {"lr": 0.5, "always_adapt": True, "eps": 0.5, "trust_coefficient": 0.05},
    "trust_clip": {
        "lr": 0.01,
        "momentum": 0.9,
        "weight_decay": 1e-3,
        "trust_coefficient": 0.02,
        "trust_clip": True,
    },
    "always_adapt": {"lr": 1.0, "momentum": 0.9, "always_adapt": True, "trust_coefficient": 0.01},
    "always_adapt_weight_decay_clip": {
        "lr": 0.05,
        "weight_decay": 1e-2,
        "always_adapt": True,
        "trust_clip": True,
        "trust_coefficient": 0.1,
    },
}


@pytest.mark.parametrize("case", sorted(LARS_TIMM_CASES))
def test_lars_matches_timm(case, problem, torch64, timm_optim):
    params, stream = problem
    kwargs = LARS_TIMM_CASES[case]
    ours = run_ours(ao.lars(**kwargs), get_backend("numpy"), params, stream)
    reference = timm_reference(
        torch64, lambda p: timm_optim.Lars(p, **timm_lars_kwargs(kwargs)), params, stream
    )
    assert_trajectories_close(ours, reference, TOL)


def test_lars_trust_clip_case_clips_some_leaves(problem, torch64, timm_optim):
    """The trust_clip case is informative: clipping changes timm's trajectory, and not every
    leaf is clipped (otherwise LARC would reduce to plain SGD on the decayed gradient)."""
    params, stream = problem
    kwargs = dict(LARS_TIMM_CASES["trust_clip"])
    clipped = timm_reference(
        torch64, lambda p: timm_optim.Lars(p, **timm_lars_kwargs(kwargs)), params, stream
    )
    kwargs["trust_clip"] = False
    unclipped = timm_reference(
        torch64, lambda p: timm_optim.Lars(p, **timm_lars_kwargs(kwargs)), params, stream
    )
    assert trajectory_error(clipped, unclipped) > 1e-3
    plain = timm_reference(
        torch64,
        lambda p: torch64.optim.SGD(p, lr=kwargs["lr"], momentum=0.9, weight_decay=kwargs["weight_decay"]),
        params,
        stream,
    )
    assert trajectory_error(clipped, plain) > 1e-3


# --------------------------------------------------------------------------- LAMB vs timm

APEX = {"max_grad_norm": MAX_GRAD_NORM, "always_adapt": False, "weight_decay": 0.01}
LAMB_TIMM_CASES = {
    # ao.lamb(max_grad_norm=1.0, always_adapt=False) with timm's default weight decay vs Lamb()
    "timm_defaults": ({"max_grad_norm": 1.0, "always_adapt": False, "weight_decay": 0.01}, {}),
    "apex": ({**APEX, "lr": 0.02}, {"lr": 0.02, "max_grad_norm": MAX_GRAD_NORM}),
    "no_grad_averaging": (
        {**APEX, "lr": 0.02, "grad_averaging": False},
        {"lr": 0.02, "max_grad_norm": MAX_GRAD_NORM, "grad_averaging": False},
    ),
    "trust_clip": (
        {**APEX, "lr": 0.02, "trust_clip": True},
        {"lr": 0.02, "max_grad_norm": MAX_GRAD_NORM, "trust_clip": True},
    ),
    "weight_decay_0": (
        {**APEX, "lr": 0.02, "weight_decay": 0.0},
        {"lr": 0.02, "max_grad_norm": MAX_GRAD_NORM, "weight_decay": 0.0},
    ),
    "weight_decay_0_always_adapt": (
        {**APEX, "lr": 0.02, "weight_decay": 0.0, "always_adapt": True},
        {"lr": 0.02, "max_grad_norm": MAX_GRAD_NORM, "weight_decay": 0.0, "always_adapt": True},
    ),
    "large_weight_decay_betas": (
        {**APEX, "lr": 0.05, "weight_decay": 0.1, "betas": (0.8, 0.99), "eps": 1e-4},
        {
            "lr": 0.05,
            "max_grad_norm": MAX_GRAD_NORM,
            "weight_decay": 0.1,
            "betas": (0.8, 0.99),
            "eps": 1e-4,
        },
    ),
    "no_clipping": (
        {"max_grad_norm": None, "always_adapt": False, "weight_decay": 0.01, "lr": 0.02},
        {"lr": 0.02, "max_grad_norm": None},
    ),
}


@pytest.mark.parametrize("case", sorted(LAMB_TIMM_CASES))
def test_lamb_matches_timm(case, problem, torch64, timm_optim):
    params, stream = problem
    ours_kwargs, timm_kwargs = LAMB_TIMM_CASES[case]
    ours = run_ours(ao.lamb(**ours_kwargs), get_backend("numpy"), params, stream)
    reference = timm_reference(torch64, lambda p: timm_optim.Lamb(p, **timm_kwargs), params, stream)
    assert_trajectories_close(ours, reference, TOL)


def test_lamb_clipping_and_trust_clip_are_exercised(problem, torch64, timm_optim):
    """Sanity of the cases above: max_grad_norm and trust_clip both change timm's trajectory."""
    params, stream = problem

    def timm(**kwargs):
        return timm_reference(torch64, lambda p: timm_optim.Lamb(p, lr=0.02, **kwargs), params, stream)

    base = timm(max_grad_norm=MAX_GRAD_NORM)
    assert trajectory_error(timm(max_grad_norm=None), base) > 1e-6
    assert trajectory_error(timm(max_grad_norm=MAX_GRAD_NORM, trust_clip=True), base) > 1e-6


# --------------------------------------------------------------------------- vs optax

LAMB_OPTAX_CASES = {
    "defaults": ({}, {}),
    "weight_decay": (
        {"lr": 0.02, "weight_decay": 0.05},
        {"learning_rate": 0.02, "weight_decay": 0.05},
    ),
    "eps_root_betas": (
        {"lr": 0.02, "betas": (0.8, 0.95), "eps": 1e-4, "eps_root": 1e-3, "weight_decay": 0.01},
        {"learning_rate": 0.02, "b1": 0.8, "b2": 0.95, "eps": 1e-4, "eps_root": 1e-3, "weight_decay": 0.01},
    ),
}


@pytest.mark.parametrize("case", sorted(LAMB_OPTAX_CASES))
def test_lamb_matches_optax(case, problem, optax_mod):
    params, stream = problem
    ours_kwargs, optax_kwargs = LAMB_OPTAX_CASES[case]
    optax_kwargs = {"learning_rate": 1e-3, **optax_kwargs}
    ours = run_ours(ao.lamb(**ours_kwargs), get_backend("numpy"), params, stream)
    reference = optax_reference(optax_mod, optax_mod.lamb(**optax_kwargs), params, stream)
    assert_trajectories_close(ours, reference, TOL)


LARS_OPTAX_CASES = {
    "optax_defaults": ({"lr": 0.1}, {"learning_rate": 0.1}),
    "weight_decay": (
        {"lr": 0.5, "weight_decay": 1e-2, "trust_coefficient": 0.02},
        {"learning_rate": 0.5, "weight_decay": 1e-2, "trust_coefficient": 0.02},
    ),
    "nesterov_weight_decay": (
        {"lr": 0.5, "weight_decay": 1e-2, "trust_coefficient": 0.02, "nesterov": True},
        {"learning_rate": 0.5, "weight_decay": 1e-2, "trust_coefficient": 0.02, "nesterov": True},
    ),
    "eps_momentum": (
        {"lr": 0.3, "weight_decay": 1e-3, "trust_coefficient": 0.05, "eps_": 0.3, "momentum_": 0.5},
        {"learning_rate": 0.3, "weight_decay": 1e-3, "trust_coefficient": 0.05, "eps": 0.3, "momentum": 0.5},
    ),
}


def optax_form_lars(**kwargs: Any) -> ao.Optimizer:
    """``ao.lars(convention="optax")``: left out, momentum and eps take optax's defaults (0.9, 0)
    from the convention; a case may override them (as ``eps_``/``momentum_``)."""
    overrides = {name: kwargs.pop(name + "_") for name in ("eps", "momentum") if name + "_" in kwargs}
    return ao.lars(convention="optax", **overrides, **kwargs)


@pytest.mark.parametrize("case", sorted(LARS_OPTAX_CASES))
def test_lars_optax_convention_matches_optax(case, problem, optax_mod):
    params, stream = problem
    ours_kwargs, optax_kwargs = LARS_OPTAX_CASES[case]
    ours = run_ours(optax_form_lars(**ours_kwargs), get_backend("numpy"), params, stream)
    reference = optax_reference(optax_mod, optax_mod.lars(**optax_kwargs), params, stream)
    assert_trajectories_close(ours, reference, TOL)


# --------------------------------------------------------------------------- masks


def test_lars_mask_matches_timm_param_groups(problem, torch64, timm_optim):
    params, stream = problem
    kwargs = {"lr": 0.5, "momentum": 0.9, "weight_decay": 1e-2, "trust_coefficient": 0.02}
    ours = run_ours(ao.lars(**kwargs, mask=exclude_1d), get_backend("numpy"), params, stream)
    reference = timm_reference(
        torch64,
        lambda groups: timm_optim.Lars(groups, **timm_lars_kwargs(kwargs)),
        params,
        stream,
        groups=ONE_D,
        weight_decay=0.0,
        always_adapt=False,
    )
    assert_trajectories_close(ours, reference, TOL)
    # the mask matters: without it the excluded leaves move differently
    unmasked = run_ours(ao.lars(**kwargs), get_backend("numpy"), params, stream)
    assert trajectory_error(unmasked, reference) > 1e-3


def test_lars_mask_always_adapt_matches_timm_param_groups(problem, torch64, timm_optim):
    """``always_adapt`` applies only to selected leaves; excluded ones are plain SGD momentum."""
    params, stream = problem
    kwargs = {"lr": 1.0, "momentum": 0.9, "nesterov": True, "always_adapt": True, "trust_coefficient": 0.01}
    ours = run_ours(ao.lars(**kwargs, mask=exclude_1d), get_backend("numpy"), params, stream)
    reference = timm_reference(
        torch64,
        lambda groups: timm_optim.Lars(groups, **timm_lars_kwargs(kwargs)),
        params,
        stream,
        groups=ONE_D,
        weight_decay=0.0,
        always_adapt=False,
    )
    assert_trajectories_close(ours, reference, TOL)


def test_lamb_mask_matches_timm_param_groups(problem, torch64, timm_optim):
    params, stream = problem
    ours = run_ours(ao.lamb(lr=0.02, **APEX, mask=exclude_1d), get_backend("numpy"), params, stream)
    reference = timm_reference(
        torch64,
        lambda groups: timm_optim.Lamb(groups, lr=0.02, max_grad_norm=MAX_GRAD_NORM, weight_decay=0.01),
        params,
        stream,
        groups=ONE_D,
        weight_decay=0.0,
        always_adapt=False,
    )
    assert_trajectories_close(ours, reference, TOL)
    unmasked = run_ours(ao.lamb(lr=0.02, **APEX), get_backend("numpy"), params, stream)
    assert trajectory_error(unmasked, reference) > 1e-3


def test_lars_mask_matches_optax_masks(problem, optax_mod):
    params, stream = problem
    ours = run_ours(
        optax_form_lars(lr=0.5, weight_decay=1e-2, trust_coefficient=0.02, mask=exclude_1d),
        get_backend("numpy"),
        params,
        stream,
    )
    reference = optax_reference(
        optax_mod,
        optax_mod.lars(
            0.5, weight_decay=1e-2, trust_coefficient=0.02, weight_decay_mask=ONE_D, trust_ratio_mask=ONE_D
        ),
        params,
        stream,
    )
    assert_trajectories_close(ours, reference, TOL)


def optax_masked_lamb(optax: Any, lr: float, weight_decay: float, mask: Any) -> Any:
    """LAMB with the decay and the trust ratio both masked, composed from optax's own parts
    (``optax.lamb(mask=)`` masks only the decay)."""
    return optax.chain(
        optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-6),
        optax.add_decayed_weights(weight_decay, mask=mask),
        optax.masked(optax.scale_by_trust_ratio(), mask),
        optax.scale_by_learning_rate(lr),
    )


def test_bool_pytree_mask_on_dict(problem, optax_mod, torch64, timm_optim):
    """A dict of params with a dict of bools as mask, for both optimizers and three references."""
    params, stream = problem
    mask = as_dict(ONE_D)
    numpy = get_backend("numpy")

    lars_ours = run_ours(
        optax_form_lars(lr=0.5, weight_decay=1e-2, trust_coefficient=0.02, mask=mask),
        numpy,
        params,
        stream,
        as_tree=True,
    )
    lars_ref = optax_reference(
        optax_mod,
        optax_mod.lars(
            0.5, weight_decay=1e-2, trust_coefficient=0.02, weight_decay_mask=mask, trust_ratio_mask=mask
        ),
        params,
        stream,
        as_tree=True,
    )
    assert_trajectories_close(lars_ours, lars_ref, TOL)

    lamb_ours = run_ours(ao.lamb(lr=0.02, weight_decay=0.05, mask=mask), numpy, params, stream, as_tree=True)
    lamb_ref = optax_reference(
        optax_mod, optax_masked_lamb(optax_mod, 0.02, 0.05, mask), params, stream, as_tree=True
    )
    assert_trajectories_close(lamb_ours, lamb_ref, TOL)

    apex_ours = run_ours(ao.lamb(lr=0.02, **APEX, mask=mask), numpy, params, stream, as_tree=True)
    apex_ref = timm_reference(
        torch64,
        lambda groups: timm_optim.Lamb(groups, lr=0.02, max_grad_norm=MAX_GRAD_NORM, weight_decay=0.01),
        params,
        stream,
        groups=ONE_D,
        weight_decay=0.0,
        always_adapt=False,
    )
    assert_trajectories_close(apex_ours, apex_ref, TOL)


def test_callable_mask_receives_paths_of_a_dict(problem, optax_mod):
    """The callable sees each leaf's path, so it can select by name as well as by shape."""
    params, stream = problem
    seen = []

    def by_name(path, leaf):
        seen.append(path)
        return "w" in path or "k" in path

    ours = run_ours(
        ao.lamb(lr=0.02, weight_decay=0.05, mask=by_name), get_backend("numpy"), params, stream, as_tree=True
    )
    reference = optax_reference(
        optax_mod, optax_masked_lamb(optax_mod, 0.02, 0.05, as_dict(ONE_D)), params, stream, as_tree=True
    )
    assert_trajectories_close(ours, reference, TOL)
    assert seen, "the callable mask was never called"


# --------------------------------------------------------------------------- every backend


def _backend_cases(optax: Any, timm: Any) -> dict[str, tuple[ao.Optimizer, Any, str]]:
    """name -> (our optimizer, reference factory, reference kind)."""
    lars_kwargs = {
        "lr": 0.5,
        "momentum": 0.9,
        "weight_decay": 1e-2,
        "trust_coefficient": 0.02,
        "nesterov": True,
    }
    return {
        "lars_timm_mask": (
            ao.lars(**lars_kwargs, mask=exclude_1d),
            lambda groups: timm.Lars(groups, **timm_lars_kwargs(lars_kwargs)),
            "timm_groups",
        ),
        "lamb_timm_apex": (
            ao.lamb(lr=0.02, **APEX),
            lambda p: timm.Lamb(p, lr=0.02, max_grad_norm=MAX_GRAD_NORM),
            "timm",
        ),
        "lamb_optax": (
            ao.lamb(lr=0.02, weight_decay=0.05, eps_root=1e-3),
            optax.lamb(0.02, weight_decay=0.05, eps_root=1e-3),
            "optax",
        ),
        "lars_optax_mask": (
            optax_form_lars(lr=0.5, weight_decay=1e-2, trust_coefficient=0.02, mask=exclude_1d),
            optax.lars(
                0.5,
                weight_decay=1e-2,
                trust_coefficient=0.02,
                weight_decay_mask=ONE_D,
                trust_ratio_mask=ONE_D,
            ),
            "optax",
        ),
    }


@pytest.mark.parametrize("case", ["lars_timm_mask", "lamb_timm_apex", "lamb_optax", "lars_optax_mask"])
def test_every_backend_matches_references(case, backend, problem, torch64, timm_optim, optax_mod):
    params, stream = problem
    opt, reference_factory, kind = _backend_cases(optax_mod, timm_optim)[case]
    ours = run_ours(opt, backend, params, stream)
    if kind == "optax":
        reference = optax_reference(optax_mod, reference_factory, params, stream)
    elif kind == "timm_groups":
        reference = timm_reference(
            torch64, reference_factory, params, stream, groups=ONE_D, weight_decay=0.0, always_adapt=False
        )
    else:
        reference = timm_reference(torch64, reference_factory, params, stream)
    assert_trajectories_close(ours, reference, TOL)


def test_lamb_float32_state_and_params_stay_float32(problem, backend):
    """dtype is preserved on every backend: float32 params and buffers stay float32."""
    params, stream = problem
    opt = ao.lamb(lr=0.02, **APEX, mask=exclude_1d)
    current = [backend.asarray(p, "float32") for p in params]
    state = opt.init(current)
    for grads in stream[:3]:
        state, current = opt.step(state, [backend.asarray(g, "float32") for g in grads], current)
    f32 = backend.dtype("float32")
    assert all(p.dtype == f32 for p in current)
    for name in ("exp_avg", "exp_avg_sq"):
        assert all(b.dtype == f32 for b in state.buffers[name]), name
