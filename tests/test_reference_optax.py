"""The optax-convention options against optax, step by step, in float64 (JAX with x64 enabled).

Each case runs one of our optimizers and the optax transformation with the same
hyperparameters on the same random multi-leaf problem (a dict of a 0-d, 1-d, 2-d and 4-d
leaf) for ``STEPS`` steps and compares every parameter after every step to ``TOL`` (max-norm
relative error per leaf). optax always runs on JAX pytrees (dicts of jax arrays); our core runs
on NumPy arrays and on the same dicts of jax arrays (the ``jax`` backend).

Where optax's optimizer coincides with the torch convention (Adam without AMSGrad, AdamW,
SGD without dampening, Lion) our default is compared; the other cases pass
``convention="optax"``.
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
B1, B2 = 0.8, 0.95
B2_ON_THRESHOLD = 0.8397685748659791  # RAdam's rho_6 == 5.0 exactly (float64)
NAMES = ("scalar", "vector", "matrix", "conv")  # one name per leaf of LEAF_SHAPES


def problem(seed: int = 0) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    rng = np.random.default_rng(20261128 + seed)
    params = dict(zip(NAMES, random_leaves(rng, LEAF_SHAPES)))
    stream = [dict(zip(NAMES, g)) for g in random_gradient_stream(rng, STEPS, LEAF_SHAPES)]
    return params, stream


def run_ours(
    opt: Any, backend: Any, params: Mapping[str, np.ndarray], grad_stream: Sequence[Mapping[str, np.ndarray]]
) -> list[list[np.ndarray]]:
    """Our trajectory on ``backend``, with params and grads given as dicts; leaves in NAMES order."""
    current = {k: backend.asarray(v) for k, v in params.items()}
    state = opt.init(current)
    trajectory = []
    for grads in grad_stream:
        state, current = opt.step(state, {k: backend.asarray(v) for k, v in grads.items()}, current)
        assert isinstance(current, dict) and set(current) == set(NAMES)
        trajectory.append([backend.to_numpy(current[k]) for k in NAMES])
    return trajectory


def run_optax(
    tx: Any, params: Mapping[str, np.ndarray], grad_stream: Sequence[Mapping[str, np.ndarray]]
) -> list[list[np.ndarray]]:
    """optax's trajectory on dicts of float64 jax arrays; leaves in NAMES order."""
    import jax.numpy as jnp
    import optax

    current = {k: jnp.asarray(v, dtype=jnp.float64) for k, v in params.items()}
    state = tx.init(current)
    trajectory = []
    for grads in grad_stream:
        g = {k: jnp.asarray(v, dtype=jnp.float64) for k, v in grads.items()}
        updates, state = tx.update(g, state, current)
        current = optax.apply_updates(current, updates)
        assert all(current[k].dtype == jnp.float64 for k in NAMES)
        trajectory.append([np.asarray(current[k], dtype=np.float64) for k in NAMES])
    return trajectory


def assert_moved(trajectory: Sequence[Sequence[np.ndarray]], params: Mapping[str, np.ndarray]) -> None:
    for name, final in zip(NAMES, trajectory[-1]):
        assert np.max(np.abs(final - params[name])) > 1e-6, f"leaf {name} did not move"


def _case(case_id: str, ours: Callable[[], Any], reference: Callable[[Any], Any]):
    """``reference(optax)`` builds the optax transformation (optax is imported lazily)."""
    return pytest.param(ours, reference, id=case_id)


CASES = [
    # --- Adam family: optax.adam is torch's Adam plus eps_root inside the root.
    _case(
        "adam",
        lambda: ao.adam(lr=0.05, betas=(B1, B2), eps=1e-6),
        lambda optax: optax.adam(0.05, b1=B1, b2=B2, eps=1e-6),
    ),
    _case(
        "adam-eps_root",
        lambda: ao.adam(lr=0.05, betas=(B1, B2), eps=1e-6, eps_root=1e-3),
        lambda optax: optax.adam(0.05, b1=B1, b2=B2, eps=1e-6, eps_root=1e-3),
    ),
    _case(
        "adam-eps_root-optax-convention",
        lambda: ao.adam(lr=0.05, betas=(B1, B2), eps=1e-4, eps_root=1e-2, convention="optax"),
        lambda optax: optax.adam(0.05, b1=B1, b2=B2, eps=1e-4, eps_root=1e-2),
    ),
    # optax.adamw's default weight_decay is 1e-4 (torch: 1e-2): always pass it explicitly.
    _case(
        "adamw",
        lambda: ao.adamw(lr=0.05, betas=(B1, B2), eps=1e-6, weight_decay=0.1),
        lambda optax: optax.adamw(0.05, b1=B1, b2=B2, eps=1e-6, weight_decay=0.1),
    ),
    _case(
        "adamw-eps_root",
        lambda: ao.adamw(lr=0.05, betas=(B1, B2), eps=1e-6, weight_decay=0.1, eps_root=1e-3),
        lambda optax: optax.adamw(0.05, b1=B1, b2=B2, eps=1e-6, eps_root=1e-3, weight_decay=0.1),
    ),
    _case(
        "adamw-optax-default-decay",
        lambda: ao.adamw(lr=0.05, weight_decay=1e-4),
        lambda optax: optax.adamw(0.05, weight_decay=1e-4),
    ),
    # optax.amsgrad takes the running max of the bias-corrected second moment.
    _case(
        "amsgrad",
        lambda: ao.amsgrad(lr=0.05, betas=(B1, B2), eps=1e-6, convention="optax"),
        lambda optax: optax.amsgrad(0.05, b1=B1, b2=B2, eps=1e-6),
    ),
    _case(
        "amsgrad-eps_root",
        lambda: ao.amsgrad(lr=0.05, betas=(B1, B2), eps=1e-6, eps_root=1e-3, convention="optax"),
        lambda optax: optax.amsgrad(0.05, b1=B1, b2=B2, eps=1e-6, eps_root=1e-3),
    ),
    _case(
        "adam-amsgrad-optax",
        lambda: ao.adam(lr=0.05, betas=(B1, B2), eps=1e-6, eps_root=1e-3, amsgrad=True, convention="optax"),
        lambda optax: optax.amsgrad(0.05, b1=B1, b2=B2, eps=1e-6, eps_root=1e-3),
    ),
    # --- convention="optax" alone gives optax's defaults.
    _case(
        "rmsprop-optax-defaults", lambda: ao.rmsprop(convention="optax"), lambda optax: optax.rmsprop(0.01)
    ),
    _case(
        "adagrad-optax-defaults",
        lambda: ao.adagrad(lr=0.1, convention="optax"),
        lambda optax: optax.adagrad(0.1),
    ),
    # optax applies the learning rate before the momentum trace: differs from torch's form
    # once lr changes, so a decaying schedule tells them apart (halving every 4 steps from 2^-6:
    # exact even in the float32 that optax's schedules return).
    _case(
        "rmsprop-momentum-scheduled-lr",
        lambda: ao.rmsprop(
            lr=ao.schedules.exponential_decay(2**-6, 4, 0.5, staircase=True),
            momentum=0.8,
            eps=1e-3,
            convention="optax",
        ),
        lambda optax: optax.rmsprop(
            optax.exponential_decay(2**-6, 4, 0.5, staircase=True), momentum=0.8, eps=1e-3
        ),
    ),
    # --- RMSProp: eps inside the root (optax's default eps_in_sqrt=True).
    _case(
        "rmsprop",
        lambda: ao.rmsprop(lr=0.01, alpha=0.9, eps=1e-3, convention="optax"),
        lambda optax: optax.rmsprop(0.01, decay=0.9, eps=1e-3),
    ),
    _case(
        "rmsprop-centered",
        lambda: ao.rmsprop(lr=0.01, alpha=0.9, eps=1e-3, centered=True, convention="optax"),
        lambda optax: optax.rmsprop(0.01, decay=0.9, eps=1e-3, centered=True),
    ),
    _case(
        "rmsprop-momentum",
        lambda: ao.rmsprop(lr=0.01, alpha=0.9, eps=1e-3, momentum=0.8, convention="optax"),
        lambda optax: optax.rmsprop(0.01, decay=0.9, eps=1e-3, momentum=0.8),
    ),
    _case(
        "rmsprop-centered-momentum",
        lambda: ao.rmsprop(lr=0.01, alpha=0.85, eps=1e-4, momentum=0.6, centered=True, convention="optax"),
        lambda optax: optax.rmsprop(0.01, decay=0.85, eps=1e-4, momentum=0.6, centered=True),
    ),
    # The torch form is optax's eps_in_sqrt=False.
    _case(
        "rmsprop-torch-form-eps_in_sqrt-False",
        lambda: ao.rmsprop(lr=0.01, alpha=0.9, eps=1e-3, momentum=0.8, centered=True),
        lambda optax: optax.rmsprop(
            0.01, decay=0.9, eps=1e-3, momentum=0.8, centered=True, eps_in_sqrt=False
        ),
    ),
    # --- Adagrad: optax's initial 0.1 and eps in the root.
    _case(
        "adagrad",
        lambda: ao.adagrad(lr=0.1, initial_accumulator_value=0.1, eps=1e-7, convention="optax"),
        lambda optax: optax.adagrad(0.1, initial_accumulator_value=0.1, eps=1e-7),
    ),
    _case(
        "adagrad-large-eps",
        lambda: ao.adagrad(lr=0.1, initial_accumulator_value=0.3, eps=1e-2, convention="optax"),
        lambda optax: optax.adagrad(0.1, initial_accumulator_value=0.3, eps=1e-2),
    ),
    _case(
        "adagrad-zero-accumulator",
        lambda: ao.adagrad(lr=0.1, initial_accumulator_value=0.0, eps=1e-7, convention="optax"),
        lambda optax: optax.adagrad(0.1, initial_accumulator_value=0.0, eps=1e-7),
    ),
    # --- RAdam: threshold rho_t >= 5, eps after bias correction. b2 = 0.999 crosses the
    # threshold between steps 5 and 6 (checked in test_radam_crosses_threshold).
    _case(
        "radam",
        lambda: ao.radam(lr=0.05, betas=(0.9, 0.999), eps=1e-6, convention="optax"),
        lambda optax: optax.radam(0.05, b1=0.9, b2=0.999, eps=1e-6),
    ),
    _case(
        "radam-eps_root",
        lambda: ao.radam(lr=0.05, betas=(0.9, 0.999), eps=1e-6, eps_root=1e-3, convention="optax"),
        lambda optax: optax.radam(0.05, b1=0.9, b2=0.999, eps=1e-6, eps_root=1e-3),
    ),
    _case(
        "radam-betas",
        lambda: ao.radam(lr=0.05, betas=(B1, B2), eps=1e-4, eps_root=1e-2, convention="optax"),
        lambda optax: optax.radam(0.05, b1=B1, b2=B2, eps=1e-4, eps_root=1e-2),
    ),
    # b2 chosen so that rho_6 is exactly 5.0 in float64 (checked in test_radam_hits_threshold):
    # optax rectifies that step (rho_t >= 5), torch does not (rho_t > 5).
    _case(
        "radam-on-threshold",
        lambda: ao.radam(lr=0.05, betas=(0.9, B2_ON_THRESHOLD), eps=1e-6, convention="optax"),
        lambda optax: optax.radam(0.05, b1=0.9, b2=B2_ON_THRESHOLD, eps=1e-6),
    ),
    # --- NAdam: optax.nadam is scale_by_adam(nesterov=True).
    _case(
        "nadam",
        lambda: ao.nadam(lr=0.02, betas=(B1, B2), eps=1e-6, convention="optax"),
        lambda optax: optax.nadam(0.02, b1=B1, b2=B2, eps=1e-6),
    ),
    _case(
        "nadam-eps_root",
        lambda: ao.nadam(lr=0.02, betas=(B1, B2), eps=1e-6, eps_root=1e-3, convention="optax"),
        lambda optax: optax.nadam(0.02, b1=B1, b2=B2, eps=1e-6, eps_root=1e-3),
    ),
    # --- SGD: optax.trace is t = g + μ t (first step t = g), i.e. torch's heavy ball without
    # dampening; nesterov returns g + μ t, torch's nesterov. Dampening has no optax counterpart.
    _case("sgd", lambda: ao.sgd(lr=0.05), lambda optax: optax.sgd(0.05)),
    _case(
        "sgd-momentum",
        lambda: ao.sgd(lr=0.05, momentum=0.9),
        lambda optax: optax.sgd(0.05, momentum=0.9),
    ),
    _case(
        "sgd-nesterov",
        lambda: ao.sgd(lr=0.05, momentum=0.9, nesterov=True),
        lambda optax: optax.sgd(0.05, momentum=0.9, nesterov=True),
    ),
    # --- Lion: optax.lion = chain(scale_by_lion, add_decayed_weights, scale_by_learning_rate),
    # i.e. θ - lr (sign(c) + λ θ) = θ (1 - lr λ) - lr sign(c): the official update. optax's
    # default weight_decay is 1e-3 (ours and the official code: 0), so pass it explicitly.
    _case(
        "lion",
        lambda: ao.lion(lr=0.01, betas=(B1, B2)),
        lambda optax: optax.lion(0.01, b1=B1, b2=B2, weight_decay=0.0),
    ),
    _case(
        "lion-weight_decay",
        lambda: ao.lion(lr=0.01, betas=(B1, B2), weight_decay=0.5),
        lambda optax: optax.lion(0.01, b1=B1, b2=B2, weight_decay=0.5),
    ),
    # --- clip_by_global_norm (optax form) chained before adam. max_norm 7 sits in the middle of
    # this problem's gradient norms (about sqrt(48)), so some steps clip and others do not.
    _case(
        "clip_by_global_norm-adam",
        lambda: ao.chain(
            ao.clip_by_global_norm(7.0, convention="optax"),
            ao.adam(lr=0.05, betas=(B1, B2), eps=1e-6, eps_root=1e-3),
        ),
        lambda optax: optax.chain(
            optax.clip_by_global_norm(7.0), optax.adam(0.05, b1=B1, b2=B2, eps=1e-6, eps_root=1e-3)
        ),
    ),
]


@pytest.mark.parametrize("backend_name", ["numpy", "jax"])
@pytest.mark.parametrize(("make", "reference"), CASES)
def test_matches_optax(jax_backend, backend_name, make, reference):
    import optax

    params, grads = problem()
    expected = run_optax(reference(optax), params, grads)
    assert_moved(expected, params)
    backend = get_backend(backend_name)
    ours = run_ours(make(), backend, params, grads)
    assert_trajectories_close(ours, expected, TOL)


def test_clip_problem_clips_some_steps_only():
    """The clipping case above is only meaningful if max_norm=7 clips some steps, not all."""
    _, grads = problem()
    norms = [np.sqrt(sum(float(np.sum(g**2)) for g in step.values())) for step in grads]
    assert any(n > 7.0 for n in norms) and any(n < 7.0 for n in norms), norms


def test_radam_hits_threshold():
    """With B2_ON_THRESHOLD, step 6 sits exactly on rho_t = 5 (optax's expression, float64), so
    the radam-on-threshold case tells ``>=`` (optax) from ``>`` (torch)."""
    b2 = np.float64(B2_ON_THRESHOLD)
    ro_inf = 2.0 / (1.0 - b2) - 1.0
    t = np.float64(6)
    b2t = b2**t
    assert ro_inf - 2.0 * t * b2t / (1.0 - b2t) == 5.0


@pytest.mark.parametrize("b2", [0.999, B2])
def test_radam_crosses_threshold(b2):
    """The RAdam cases take steps both with rho_t < 5 (plain momentum) and rho_t >= 5."""
    t = np.arange(1, STEPS + 1, dtype=np.float64)
    rho_inf = 2 / (1 - b2) - 1
    rho = rho_inf - 2 * t * b2**t / (1 - b2**t)
    assert np.any(rho < 5) and np.any(rho >= 5)
    assert np.all(np.abs(rho - 5) > 1e-6)  # no step sits on the threshold itself
