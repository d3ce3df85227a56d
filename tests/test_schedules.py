"""Schedules against torch.optim.lr_scheduler and optax, value by value, in float64.

Every schedule of ``ao.schedules`` is evaluated over a range of step counts that crosses each of
its phase boundaries and compared with the torch scheduler and/or optax schedule that defines the
same curve (relative 1e-12 per value; values far below the schedule's peak are compared with an
absolute floor of 1e-15 times the peak, since torch's recursive forms round differently there).

torch schedulers are read the way a training loop sees them: a dummy optimizer with one
parameter, ``param_groups[0]['lr']`` read before each ``scheduler.step()`` -- the lr used by
the optimizer step with that count (``count`` = steps already taken, optax's convention).

The rest checks schedules as hyperparameters: evaluated on 0-d int32 counts from every backend
(eager and under ``jax.jit``), driving ``ao.sgd``/``ao.adam``/... exactly as torch.optim with the
matching lr_scheduler, reported by ``get_hparams``, refused by ``set_hparams``, and argument
validation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import array_api_compat
import numpy as np
import pytest

import agnostic_optim as ao
from agnostic_optim import schedules as sch
from agnostic_optim.conformance.backends import Backend
from helpers import random_gradient_stream, random_leaves

RTOL = 1e-12
FLOOR = 1e-3  # values below FLOOR * peak are compared with an absolute tolerance RTOL * FLOOR * peak


def ours_values(schedule: Callable[[Any], Any], counts: Sequence[int]) -> np.ndarray:
    return np.array([float(np.asarray(schedule(c))) for c in counts], dtype=np.float64)


def optax_values(schedule: Callable[[Any], Any], counts: Sequence[int]) -> np.ndarray:
    out = []
    for c in counts:
        value = np.asarray(schedule(c))
        assert value.dtype == np.float64, f"optax computed in {value.dtype}: is x64 enabled?"
        out.append(float(value))
    return np.array(out, dtype=np.float64)


def torch_values(torch: Any, make_scheduler: Callable[[Any], Any], base_lr: float, n: int) -> np.ndarray:
    """The lr a torch optimizer uses at steps 0..n-1 under ``make_scheduler(optimizer)``."""
    param = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.SGD([param], lr=base_lr)
    scheduler = make_scheduler(optimizer)
    values = []
    for i in range(n):
        values.append(float(optimizer.param_groups[0]["lr"]))
        if i < n - 1:
            optimizer.step()  # no gradient: a no-op that keeps torch's call-order check quiet
            scheduler.step()
    return np.array(values, dtype=np.float64)


def assert_values_close(ours: np.ndarray, reference: np.ndarray, rtol: float = RTOL) -> None:
    assert ours.shape == reference.shape
    assert np.all(np.isfinite(reference))
    peak = float(np.max(np.abs(reference)))
    bound = rtol * np.maximum(np.abs(reference), FLOOR * peak)
    error = np.abs(ours - reference)
    bad = np.flatnonzero(~(error <= bound))
    if bad.size:
        i = int(bad[0])
        raise AssertionError(
            f"{bad.size} values differ; first at count {i}: ours {ours[i]!r}, reference {reference[i]!r} "
            f"(relative error {error[i] / max(abs(reference[i]), 1e-300):.3e})"
        )


def assert_not_constant(values: np.ndarray) -> None:
    """A guard that the compared range really exercises the schedule."""
    assert np.ptp(values) > 0


# --------------------------------------------------------------------------- optax


@pytest.fixture
def optax(jax_backend: Backend):
    """optax, with JAX in x64 mode (the jax backend fixture enables it)."""
    return pytest.importorskip("optax")


def test_constant_matches_optax(optax):
    counts = range(12)
    assert_values_close(
        ours_values(sch.constant(0.3), counts), optax_values(optax.constant_schedule(0.3), counts)
    )


@pytest.mark.parametrize(
    ("init", "end", "steps", "begin"),
    [(1.0, 0.1, 10, 0), (0.0, 0.5, 7, 3), (0.2, 0.8, 1, 5), (3e-4, 3e-6, 25, 12)],
)
def test_linear_matches_optax(optax, init, end, steps, begin):
    counts = range(begin + steps + 6)
    ours = ours_values(sch.linear(init, end, steps, begin), counts)
    reference = optax_values(optax.linear_schedule(init, end, steps, begin), counts)
    assert_not_constant(reference)
    assert_values_close(ours, reference)


@pytest.mark.parametrize(("alpha", "exponent"), [(0.0, 1.0), (0.1, 1.0), (0.05, 2.0), (0.0, 0.5), (0.2, 3.0)])
def test_cosine_decay_matches_optax(optax, alpha, exponent):
    counts = range(30)
    ours = ours_values(sch.cosine_decay(0.4, 20, alpha, exponent), counts)
    reference = optax_values(optax.cosine_decay_schedule(0.4, 20, alpha, exponent), counts)
    assert_not_constant(reference)
    assert_values_close(ours, reference)


@pytest.mark.parametrize(
    ("init", "peak", "warmup", "decay", "end", "exponent"),
    [
        (0.0, 1.0, 5, 25, 0.0, 1.0),
        (1e-4, 3e-3, 10, 40, 1e-5, 1.0),
        (0.01, 0.1, 0, 15, 0.001, 1.0),
        (0.0, 0.5, 3, 12, 0.05, 2.0),
        (0.2, 0.2, 4, 9, 0.0, 1.0),
    ],
)
def test_warmup_cosine_decay_matches_optax(optax, init, peak, warmup, decay, end, exponent):
    counts = range(decay + 8)
    ours = ours_values(sch.warmup_cosine_decay(init, peak, warmup, decay, end, exponent), counts)
    reference = optax_values(
        optax.warmup_cosine_decay_schedule(init, peak, warmup, decay, end, exponent), counts
    )
    assert_not_constant(reference)
    assert_values_close(ours, reference)


@pytest.mark.parametrize(
    ("steps", "pct", "div", "final_div"), [(40, 0.3, 25.0, 1e4), (37, 0.25, 10.0, 100.0), (9, 0.5, 4.0, 2.0)]
)
def test_one_cycle_optax_convention_matches_optax(optax, steps, pct, div, final_div):
    counts = range(steps + 6)
    ours = ours_values(sch.one_cycle(0.5, steps, pct, div, final_div, convention="optax"), counts)
    reference = optax_values(optax.cosine_onecycle_schedule(steps, 0.5, pct, div, final_div), counts)
    assert_not_constant(reference)
    assert_values_close(ours, reference)


@pytest.mark.parametrize(
    ("steps", "rate", "begin", "staircase", "end"),
    [
        (1, 0.9, 0, False, None),
        (5, 0.5, 0, True, None),
        (4, 0.7, 6, False, None),
        (3, 0.5, 2, True, 0.05),
        (6, 0.3, 0, False, 0.01),
        (2, 1.5, 3, False, 4.0),
        (3, 2.0, 0, True, 5.0),
    ],
)
def test_exponential_decay_matches_optax(optax, steps, rate, begin, staircase, end):
    counts = range(begin + 8 * steps + 4)
    ours = ours_values(sch.exponential_decay(1.0, steps, rate, begin, staircase, end), counts)
    reference = optax_values(optax.exponential_decay(1.0, steps, rate, begin, staircase, end), counts)
    assert_not_constant(reference)
    if end is not None:  # the clip must be reached inside the range
        assert np.any(reference == end)
    assert_values_close(ours, reference)


@pytest.mark.parametrize(
    "boundaries_and_scales",
    [{5: 0.1}, {3: 0.5, 8: 0.2, 12: 3.0}, {0: 0.5, 4: 0.5}, {10: 0.0, 2: 2.0}],
)
def test_piecewise_constant_matches_optax(optax, boundaries_and_scales):
    counts = range(18)
    ours = ours_values(sch.piecewise_constant(0.7, boundaries_and_scales), counts)
    reference = optax_values(optax.piecewise_constant_schedule(0.7, boundaries_and_scales), counts)
    assert_not_constant(reference)
    assert_values_close(ours, reference)


def test_join_matches_optax(optax):
    ours = sch.join(
        [sch.linear(0.0, 1.0, 5), sch.cosine_decay(1.0, 10, 0.1), sch.exponential_decay(0.1, 2, 0.5)], [5, 15]
    )
    reference = optax.join_schedules(
        [
            optax.linear_schedule(0.0, 1.0, 5),
            optax.cosine_decay_schedule(1.0, 10, 0.1),
            optax.exponential_decay(0.1, 2, 0.5),
        ],
        [5, 15],
    )
    counts = range(26)
    expected = optax_values(reference, counts)
    assert_not_constant(expected)
    assert_values_close(ours_values(ours, counts), expected)


def test_nested_join_matches_optax(optax):
    inner_ours = sch.join([sch.constant(0.5), sch.linear(0.5, 0.1, 4)], [3])
    inner_ref = optax.join_schedules([optax.constant_schedule(0.5), optax.linear_schedule(0.5, 0.1, 4)], [3])
    ours = sch.join([sch.linear(0.0, 0.5, 4), inner_ours, sch.piecewise_constant(0.1, {2: 0.5})], [4, 12])
    reference = optax.join_schedules(
        [optax.linear_schedule(0.0, 0.5, 4), inner_ref, optax.piecewise_constant_schedule(0.1, {2: 0.5})],
        [4, 12],
    )
    counts = range(20)
    assert_values_close(ours_values(ours, counts), optax_values(reference, counts))


# --------------------------------------------------------------------------- torch.optim.lr_scheduler


@pytest.mark.parametrize(
    ("base", "start_factor", "end_factor", "total"),
    [(0.2, 0.25, 1.0, 8), (0.1, 1.0, 0.1, 10), (1e-3, 1.0 / 3, 1.0, 5)],
)
def test_linear_matches_torch_linear_lr(torch64, base, start_factor, end_factor, total):
    from torch.optim.lr_scheduler import LinearLR

    n = total + 8
    reference = torch_values(torch64, lambda o: LinearLR(o, start_factor, end_factor, total), base, n)
    ours = ours_values(sch.linear(base * start_factor, base * end_factor, total), range(n))
    assert_not_constant(reference)
    assert_values_close(ours, reference)


def test_join_matches_torch_sequential_lr(torch64):
    """``join`` is ``SequentialLR``: each scheduler restarts its own count at its milestone."""
    from torch.optim.lr_scheduler import CosineAnnealingLR, ExponentialLR, LinearLR, SequentialLR

    base, n = 0.1, 19  # to the end of the cosine (CosineAnnealingLR rises again after T_max)

    def make(o):
        parts = [LinearLR(o, 0.1, 1.0, 5), ExponentialLR(o, 0.8), CosineAnnealingLR(o, 6, eta_min=0.01)]
        return SequentialLR(o, parts, milestones=[5, 12])

    reference = torch_values(torch64, make, base, n)
    ours = sch.join(
        [
            sch.linear(0.1 * base, base, 5),
            sch.exponential_decay(base, 1, 0.8),
            sch.cosine_decay(base, 6, alpha=0.01 / base),
        ],
        [5, 12],
    )
    assert_not_constant(reference)
    assert_values_close(ours_values(ours, range(n)), reference)


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("t_max", [7, 20])
def test_cosine_decay_matches_torch_cosine_annealing(torch64, alpha, t_max):
    """torch's recursive form agrees with the closed form up to a few ulps on [0, T_max]
    (beyond T_max torch rises again; ours holds, as optax does)."""
    from torch.optim.lr_scheduler import CosineAnnealingLR

    base = 0.3
    n = t_max + 1
    reference = torch_values(torch64, lambda o: CosineAnnealingLR(o, t_max, eta_min=alpha * base), base, n)
    ours = ours_values(sch.cosine_decay(base, t_max, alpha=alpha), range(n))
    assert reference[-1] == pytest.approx(alpha * base, abs=1e-15)
    assert_values_close(ours, reference)


@pytest.mark.parametrize("anneal", ["cos", "linear"])
@pytest.mark.parametrize("three_phase", [False, True])
@pytest.mark.parametrize(
    ("total", "pct", "div", "final_div"),
    [(40, 0.3, 25.0, 1e4), (37, 0.25, 10.0, 100.0), (12, 0.4, 5.0, 10.0)],
)
def test_one_cycle_matches_torch_one_cycle_lr(torch64, anneal, three_phase, total, pct, div, final_div):
    from torch.optim.lr_scheduler import OneCycleLR

    def make(optimizer):
        return OneCycleLR(
            optimizer,
            max_lr=0.5,
            total_steps=total,
            pct_start=pct,
            anneal_strategy=anneal,
            cycle_momentum=False,
            div_factor=div,
            final_div_factor=final_div,
            three_phase=three_phase,
        )

    n = total + 1  # torch accepts up to total_steps scheduler steps
    reference = torch_values(torch64, make, 0.5, n)
    schedule = sch.one_cycle(0.5, total, pct, div, final_div, anneal, three_phase)
    ours = ours_values(schedule, range(n))
    assert_not_constant(reference)
    assert_values_close(ours, reference)


@pytest.mark.parametrize("gamma", [0.9, 0.5, 1.1])
def test_exponential_decay_matches_torch_exponential_lr(torch64, gamma):
    from torch.optim.lr_scheduler import ExponentialLR

    n = 30
    reference = torch_values(torch64, lambda o: ExponentialLR(o, gamma), 0.2, n)
    ours = ours_values(sch.exponential_decay(0.2, 1, gamma), range(n))
    assert_values_close(ours, reference)


@pytest.mark.parametrize(("step_size", "gamma"), [(4, 0.5), (1, 0.8), (7, 0.1)])
def test_exponential_decay_staircase_matches_torch_step_lr(torch64, step_size, gamma):
    from torch.optim.lr_scheduler import StepLR

    n = 30
    reference = torch_values(torch64, lambda o: StepLR(o, step_size, gamma), 0.2, n)
    ours = ours_values(sch.exponential_decay(0.2, step_size, gamma, staircase=True), range(n))
    assert_not_constant(reference)
    assert_values_close(ours, reference)


@pytest.mark.parametrize(("milestones", "gamma"), [([3, 7, 15], 0.3), ([1], 0.1), ([5, 6, 20], 2.0)])
def test_piecewise_constant_matches_torch_multistep_lr(torch64, milestones, gamma):
    from torch.optim.lr_scheduler import MultiStepLR

    n = 25
    reference = torch_values(torch64, lambda o: MultiStepLR(o, milestones, gamma), 0.05, n)
    ours = ours_values(sch.piecewise_constant(0.05, dict.fromkeys(milestones, gamma)), range(n))
    assert_not_constant(reference)
    assert_values_close(ours, reference)


# --------------------------------------------------------------------------- array counts, every backend


def _representative_schedules() -> dict[str, Callable[[Any], Any]]:
    return {
        "constant": sch.constant(0.25),
        "linear": sch.linear(0.1, 0.9, 6, 2),
        "cosine_decay": sch.cosine_decay(0.5, 10, 0.1, 2.0),
        "warmup_cosine_decay": sch.warmup_cosine_decay(0.0, 1.0, 4, 14, 0.01),
        "one_cycle": sch.one_cycle(0.5, 14, 0.3, three_phase=True),
        "one_cycle_linear": sch.one_cycle(0.5, 14, 0.3, anneal_strategy="linear"),
        "one_cycle_optax": sch.one_cycle(0.5, 14, 0.3, convention="optax"),
        "exponential_decay": sch.exponential_decay(1.0, 3, 0.5, 2, True, 0.1),
        "piecewise_constant": sch.piecewise_constant(0.7, {3: 0.5, 9: 0.1}),
        "join": sch.join([sch.linear(0.0, 1.0, 4), sch.exponential_decay(1.0, 2, 0.7)], [4]),
    }


SCHEDULE_NAMES = list(_representative_schedules())
COUNTS = range(18)


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_schedule_on_array_counts_matches_numpy(backend: Backend, name: str):
    schedule = _representative_schedules()[name]
    xp = backend.xp
    expected = ours_values(schedule, COUNTS)
    if name != "constant":
        assert_not_constant(expected)
    values = []
    for c in COUNTS:
        count = xp.asarray(c, dtype=xp.int32)
        value = schedule(count)
        assert tuple(value.shape) == ()
        assert array_api_compat.array_namespace(value) is array_api_compat.array_namespace(count)
        assert value.dtype == xp.float64, f"{name} on {backend.name}: dtype {value.dtype}"
        values.append(float(backend.to_numpy(value)))
    assert_values_close(np.array(values), expected)


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_schedule_under_jax_jit_matches_numpy(jax_backend: Backend, name: str):
    import jax
    import jax.numpy as jnp

    schedule = _representative_schedules()[name]
    jitted = jax.jit(schedule)
    values = [float(jitted(jnp.asarray(c, dtype=jnp.int32))) for c in COUNTS]
    assert_values_close(np.array(values), ours_values(schedule, COUNTS))


# --------------------------------------------------------------------------- schedules as hyperparameters

STEPS = 30
SHAPES = ((), (3,), (4, 5), (2, 3, 2, 2))


def _scheduled_cases():
    from torch.optim import lr_scheduler as ls

    return {
        "sgd_momentum_one_cycle": (
            lambda: ao.sgd(lr=sch.one_cycle(0.1, STEPS), momentum=0.9),
            lambda torch, ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
            lambda o: ls.OneCycleLR(o, max_lr=0.1, total_steps=STEPS, cycle_momentum=False),
        ),
        "sgd_nesterov_wd_multistep": (
            lambda: ao.sgd(
                lr=sch.piecewise_constant(0.05, {5: 0.5, 12: 0.5}),
                momentum=0.8,
                nesterov=True,
                weight_decay=1e-2,
            ),
            lambda torch, ps: torch.optim.SGD(ps, lr=0.05, momentum=0.8, nesterov=True, weight_decay=1e-2),
            lambda o: ls.MultiStepLR(o, [5, 12], 0.5),
        ),
        "adam_cosine": (
            lambda: ao.adam(lr=sch.cosine_decay(1e-2, STEPS, alpha=0.01), betas=(0.8, 0.95)),
            lambda torch, ps: torch.optim.Adam(ps, lr=1e-2, betas=(0.8, 0.95)),
            lambda o: ls.CosineAnnealingLR(o, T_max=STEPS, eta_min=1e-4),
        ),
        "adamw_linear_warmup": (
            lambda: ao.adamw(lr=sch.linear(2e-3, 1e-2, 8), weight_decay=0.1),
            lambda torch, ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
            lambda o: ls.LinearLR(o, start_factor=0.2, end_factor=1.0, total_iters=8),
        ),
        "rmsprop_exponential": (
            lambda: ao.rmsprop(lr=sch.exponential_decay(1e-2, 1, 0.93), momentum=0.5, centered=True),
            lambda torch, ps: torch.optim.RMSprop(ps, lr=1e-2, momentum=0.5, centered=True),
            lambda o: ls.ExponentialLR(o, 0.93),
        ),
        "adagrad_step": (
            lambda: ao.adagrad(lr=sch.exponential_decay(0.1, 6, 0.5, staircase=True), lr_decay=1e-2),
            lambda torch, ps: torch.optim.Adagrad(ps, lr=0.1, lr_decay=1e-2),
            lambda o: ls.StepLR(o, 6, 0.5),
        ),
    }


SCHEDULED_CASES = [
    "sgd_momentum_one_cycle",
    "sgd_nesterov_wd_multistep",
    "adam_cosine",
    "adamw_linear_warmup",
    "rmsprop_exponential",
    "adagrad_step",
]


@pytest.mark.parametrize("case", SCHEDULED_CASES)
def test_scheduled_optimizer_matches_torch_lr_scheduler(torch64, rng, case):
    """ao.<opt>(lr=schedule) over STEPS steps equals torch.optim with the matching lr_scheduler,
    and get_hparams reports the lr torch used at the latest step."""
    torch = torch64
    cases = _scheduled_cases()
    assert list(cases) == SCHEDULED_CASES
    make_ours, make_torch, make_scheduler = cases[case]
    params = random_leaves(rng, SHAPES)
    stream = random_gradient_stream(rng, STEPS, SHAPES)

    tensors = [torch.tensor(p, requires_grad=True) for p in params]
    optimizer = make_torch(torch, tensors)
    scheduler = make_scheduler(optimizer)
    torch_lrs, torch_traj = [], []
    for grads in stream:
        for t, g in zip(tensors, grads):
            t.grad = torch.tensor(g)
        torch_lrs.append(float(optimizer.param_groups[0]["lr"]))
        optimizer.step()
        scheduler.step()
        torch_traj.append([t.detach().numpy().copy() for t in tensors])
    assert np.ptp(torch_lrs) > 0

    opt = make_ours()
    current = [p.copy() for p in params]
    state = opt.init(current)
    for step, grads in enumerate(stream):
        state, current = opt.step(state, [g.copy() for g in grads], current)
        lr = ao.get_hparams(state)["lr"]
        assert tuple(lr.shape) == () and lr.dtype == np.float64
        assert_values_close(np.array([float(lr)]), np.array([torch_lrs[step]]))
        for leaf, (ours, ref) in enumerate(zip(current, torch_traj[step])):
            scale = max(float(np.max(np.abs(ref))), 1e-300)
            error = float(np.max(np.abs(ours - ref))) / scale
            assert error <= RTOL, f"{case}: step {step + 1}, leaf {leaf}: relative error {error:.3e}"


def test_get_hparams_reports_scheduled_value_of_latest_step():
    """With a schedule written out in the test: lr at step k (count k-1) is 0.1 * 0.5**(k-1)."""
    opt = ao.sgd(lr=sch.exponential_decay(0.1, 1, 0.5))
    params = np.ones(3)
    state = opt.init(params)
    for k in range(1, 6):
        previous = params
        state, params = opt.step(state, np.ones(3), params)
        used = 0.1 * 0.5 ** (k - 1)
        assert float(ao.get_hparams(state)["lr"]) == pytest.approx(used, rel=1e-15)
        np.testing.assert_allclose(previous - params, used, rtol=1e-14)


def test_set_hparams_on_a_scheduled_hparam_raises_type_error():
    opt = ao.sgd(lr=sch.cosine_decay(0.1, 10), momentum=0.9)
    state = opt.init([np.zeros(2)])
    state, _ = opt.step(state, [np.ones(2)], [np.zeros(2)])
    with pytest.raises(TypeError):
        ao.set_hparams(state, lr=0.5)
    # a constant hyperparameter of the same optimizer can still be set
    changed = ao.set_hparams(state, momentum=0.5)
    assert float(ao.get_hparams(changed)["momentum"]) == 0.5


def test_scheduled_beta_in_a_tuple(torch64):
    """A schedule may drive one entry of ``betas`` (DESIGN: any numeric hyperparameter): equal to
    torch Adam whose ``betas`` are changed in its param group before every step."""
    torch = torch64
    b1 = sch.linear(0.5, 0.9, 4)
    opt = ao.adam(lr=0.1, betas=(b1, 0.99))
    rng = np.random.default_rng(3)
    p = rng.standard_normal(4)
    grads = [rng.standard_normal(4) for _ in range(8)]
    tensor = torch.tensor(p, requires_grad=True)
    reference = torch.optim.Adam([tensor], lr=0.1, betas=(0.5, 0.99))
    state = opt.init(p)
    ours = p
    for k, g in enumerate(grads):
        state, ours = opt.step(state, g, ours)
        reference.param_groups[0]["betas"] = (0.5 + 0.4 * min(k / 4, 1.0), 0.99)
        tensor.grad = torch.tensor(g)
        reference.step()
        np.testing.assert_allclose(ours, tensor.detach().numpy(), rtol=1e-12)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "build",
    [
        lambda: sch.linear(1.0, 0.0, 0),
        lambda: sch.linear(1.0, 0.0, -3),
        lambda: sch.linear(1.0, 0.0, 5, -1),
        lambda: sch.linear(1.0, 0.0, 2.5),
        lambda: sch.cosine_decay(1.0, 0),
        lambda: sch.warmup_cosine_decay(0.0, 1.0, 10, 10),
        lambda: sch.warmup_cosine_decay(0.0, 1.0, 10, 5),
        lambda: sch.warmup_cosine_decay(0.0, 1.0, -1, 5),
        lambda: sch.one_cycle(1.0, 0),
        lambda: sch.one_cycle(1.0, 100, pct_start=0.0),
        lambda: sch.one_cycle(1.0, 100, pct_start=1.0),
        lambda: sch.one_cycle(1.0, 100, anneal_strategy="exp"),
        lambda: sch.one_cycle(1.0, 100, convention="keras"),
        lambda: sch.one_cycle(1.0, 100, three_phase=True, convention="optax"),
        lambda: sch.one_cycle(1.0, 100, anneal_strategy="linear", convention="optax"),
        lambda: sch.one_cycle(1.0, 2, pct_start=0.3),
        lambda: sch.exponential_decay(1.0, 0, 0.5),
        lambda: sch.exponential_decay(1.0, 5, 0.0),
        lambda: sch.exponential_decay(1.0, 5, -0.5),
        lambda: sch.exponential_decay(1.0, 5, 0.5, transition_begin=-2),
        lambda: sch.piecewise_constant(1.0, {-1: 0.5}),
        lambda: sch.join([sch.constant(1.0)], [3]),
        lambda: sch.join([sch.constant(1.0), sch.constant(2.0), sch.constant(3.0)], [5]),
        lambda: sch.join([sch.constant(1.0), sch.constant(2.0), sch.constant(3.0)], [8, 4]),
    ],
)
def test_invalid_schedule_arguments_raise_value_error(build):
    with pytest.raises(ValueError):
        build()
