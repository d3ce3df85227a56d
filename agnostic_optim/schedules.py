"""Schedules (``ao.schedules``): callables ``count -> value`` built from array-API operations.

Pass one wherever a numeric hyperparameter is accepted (``ao.adamw(lr=warmup_cosine_decay(...))``);
the optimizer evaluates it on the step count, a 0-d integer array, so it runs under ``jax.jit``
and ``torch.compile`` without host syncs. ``count`` is the number of steps already taken (0 for
the first step), the convention of optax and of ``torch.optim.lr_scheduler`` (whose
``last_epoch`` counts ``scheduler.step()`` calls). Values are computed in float64 where the
namespace has it. A plain Python int also works (for plotting), giving a NumPy 0-d array.

The equivalences with torch and optax, checked value by value in the tests:

=========================================  ==================================================
``constant(v)``                            ``optax.constant_schedule``
``linear(a, b, n, begin)``                 ``optax.linear_schedule``; ``LinearLR``
``cosine_decay(v, n, alpha, exponent)``    ``optax.cosine_decay_schedule``; ``CosineAnnealingLR``
``warmup_cosine_decay(...)``               ``optax.warmup_cosine_decay_schedule``
``one_cycle(...)``                         ``OneCycleLR``; ``optax.cosine_onecycle_schedule``
                                           with ``convention="optax"``
``exponential_decay(...)``                 ``optax.exponential_decay``; ``ExponentialLR``,
                                           ``StepLR`` (``staircase=True``)
``piecewise_constant(v, {step: scale})``   ``optax.piecewise_constant_schedule``; ``MultiStepLR``
``join(schedules, boundaries)``            ``optax.join_schedules``; ``SequentialLR``
=========================================  ==================================================
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from agnostic_optim import _backend

Schedule = Callable[[Any], Any]


def _count_as_float(count: Any) -> tuple[Any, Any]:
    """(namespace, count as a 0-d float array in the scalar dtype)."""
    if isinstance(count, (int, np.integer)):
        count = np.asarray(count)
    xp = _backend.namespace_of(count)
    return xp, xp.astype(count, _backend.scalar_dtype(xp, count))


def _scalar_like(xp: Any, value: float, like: Any) -> Any:
    return xp.asarray(value, dtype=like.dtype, device=_backend.device_of(like))


def _check_steps(name: str, steps: int, minimum: int = 1) -> None:
    if not isinstance(steps, (int, np.integer)) or steps < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {steps!r}")


def constant(value: float) -> Schedule:
    """``value`` at every step."""

    def schedule(count: Any) -> Any:
        xp, t = _count_as_float(count)
        return _scalar_like(xp, value, t)

    return schedule


def linear(init_value: float, end_value: float, transition_steps: int, transition_begin: int = 0) -> Schedule:
    """``init_value`` until ``transition_begin``, then linearly to ``end_value`` over
    ``transition_steps`` steps, then ``end_value``::

        v(t) = a + (b - a) · clip((t - begin) / n, 0, 1)
    """
    _check_steps("transition_steps", transition_steps)
    _check_steps("transition_begin", transition_begin, 0)

    def schedule(count: Any) -> Any:
        xp, t = _count_as_float(count)
        frac = xp.clip((t - transition_begin) / transition_steps, min=0.0, max=1.0)
        return init_value + (end_value - init_value) * frac

    return schedule


def cosine_decay(init_value: float, decay_steps: int, alpha: float = 0.0, exponent: float = 1.0) -> Schedule:
    """Cosine decay from ``init_value`` to ``alpha · init_value`` over ``decay_steps``::

    v(t) = init · ((1 - α) · (½ (1 + cos(π min(t, n) / n)))^exponent + α)
    """
    _check_steps("decay_steps", decay_steps)

    def schedule(count: Any) -> Any:
        xp, t = _count_as_float(count)
        progress = xp.clip(t, min=0.0, max=float(decay_steps)) / decay_steps
        cosine = 0.5 * (1 + xp.cos(math.pi * progress))
        return init_value * ((1 - alpha) * cosine**exponent + alpha)

    return schedule


def warmup_cosine_decay(
    init_value: float,
    peak_value: float,
    warmup_steps: int,
    decay_steps: int,
    end_value: float = 0.0,
    exponent: float = 1.0,
) -> Schedule:
    """Linear warmup from ``init_value`` to ``peak_value`` over ``warmup_steps``, then cosine
    decay to ``end_value``; ``decay_steps`` counts the warmup too (optax's convention)."""
    _check_steps("warmup_steps", warmup_steps, 0)
    if decay_steps <= warmup_steps:
        raise ValueError(f"decay_steps ({decay_steps}) must exceed warmup_steps ({warmup_steps})")
    alpha = 0.0 if peak_value == 0 else end_value / peak_value
    pieces = [cosine_decay(peak_value, decay_steps - warmup_steps, alpha, exponent)]
    if warmup_steps == 0:
        return pieces[0]
    return join([linear(init_value, peak_value, warmup_steps), *pieces], [warmup_steps])


def one_cycle(
    max_lr: float,
    total_steps: int,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    anneal_strategy: Literal["cos", "linear"] = "cos",
    three_phase: bool = False,
    convention: Literal["torch", "optax"] = "torch",
) -> Schedule:
    """The 1cycle policy (Smith & Topin 2017): warm up from ``max_lr / div_factor`` to
    ``max_lr``, anneal to ``max_lr / (div_factor · final_div_factor)``.

    torch form (``OneCycleLR``): the peak is at step ``pct_start · total_steps - 1`` and the end
    at ``total_steps - 1``; ``three_phase`` anneals back to the initial value before the final
    descent. ``convention="optax"`` (``optax.cosine_onecycle_schedule``, cosine only): peak at
    step ``int(pct_start · total_steps)``, end at ``total_steps``, held there afterwards.
    Cosine phases follow ``end + (start - end) · (1 + cos(π pct)) / 2``.
    """
    _check_steps("total_steps", total_steps)
    if not 0 < pct_start < 1:
        raise ValueError(f"pct_start must lie in (0, 1), got {pct_start}")
    if anneal_strategy not in ("cos", "linear"):
        raise ValueError(f"anneal_strategy must be 'cos' or 'linear', got {anneal_strategy!r}")
    if convention not in ("torch", "optax"):
        raise ValueError(f"Invalid convention: {convention!r} (expected 'torch' or 'optax')")
    initial = max_lr / div_factor
    final = initial / final_div_factor
    if convention == "optax":
        if three_phase or anneal_strategy != "cos":
            raise ValueError("convention='optax' is optax.cosine_onecycle_schedule: two cosine phases")
        ends = [float(int(pct_start * total_steps)), float(total_steps)]
        values = [initial, max_lr, final]
    elif three_phase:
        ends = [pct_start * total_steps - 1, 2 * pct_start * total_steps - 2, total_steps - 1.0]
        values = [initial, max_lr, initial, final]
    else:
        ends = [pct_start * total_steps - 1, total_steps - 1.0]
        values = [initial, max_lr, final]
    return _piecewise_anneal(ends, values, anneal_strategy, hold=convention == "optax")


def _piecewise_anneal(ends: list[float], values: list[float], strategy: str, hold: bool) -> Schedule:
    """Anneal ``values[i] -> values[i+1]`` from ``ends[i-1]`` (0 for i = 0) to ``ends[i]``.

    The first phase with ``t <= ends[i]`` applies, else the last one, which is extrapolated as
    torch's OneCycleLR does, or held at its final value when ``hold`` (optax).
    """
    starts = [0.0, *ends[:-1]]
    for start, end in zip(starts, ends):
        if end <= start:
            raise ValueError("one_cycle phases must be at least one step long; raise total_steps")

    def anneal(start: float, end: float, pct: Any, xp: Any) -> Any:
        if strategy == "cos":
            return end + (start - end) / 2.0 * (xp.cos(math.pi * pct) + 1)
        return (end - start) * pct + start

    def schedule(count: Any) -> Any:
        xp, t = _count_as_float(count)
        value = None
        for i in reversed(range(len(ends))):
            pct = (t - starts[i]) / (ends[i] - starts[i])
            if hold:
                pct = xp.clip(pct, min=0.0, max=1.0)
            phase = anneal(values[i], values[i + 1], pct, xp)
            value = phase if value is None else xp.where(t <= ends[i], phase, value)
        return value

    return schedule


def exponential_decay(
    init_value: float,
    transition_steps: int,
    decay_rate: float,
    transition_begin: int = 0,
    staircase: bool = False,
    end_value: float | None = None,
) -> Schedule:
    """``init · rate^((t - begin) / n)`` (integer exponent if ``staircase``), held at
    ``init`` before ``transition_begin`` and clipped at ``end_value`` if given."""
    _check_steps("transition_steps", transition_steps)
    _check_steps("transition_begin", transition_begin, 0)
    if decay_rate <= 0:
        raise ValueError(f"decay_rate must be positive, got {decay_rate}")

    def schedule(count: Any) -> Any:
        xp, t = _count_as_float(count)
        exponent = xp.clip(t - transition_begin, min=0.0) / transition_steps
        if staircase:
            exponent = xp.floor(exponent)
        value = init_value * decay_rate**exponent
        if end_value is not None:
            bound = _scalar_like(xp, end_value, t)
            value = xp.maximum(value, bound) if decay_rate < 1 else xp.minimum(value, bound)
        return value

    return schedule


def piecewise_constant(init_value: float, boundaries_and_scales: Mapping[int, float]) -> Schedule:
    """``init_value`` multiplied by ``scale`` for every ``boundary <= t``."""
    for boundary in boundaries_and_scales:
        _check_steps("boundary", boundary, 0)
    items = sorted(boundaries_and_scales.items())

    def schedule(count: Any) -> Any:
        xp, t = _count_as_float(count)
        value = _scalar_like(xp, init_value, t)
        for boundary, scale in items:
            value = xp.where(t < boundary, value, value * scale)
        return value

    return schedule


def join(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """``schedules[i](t - boundaries[i-1])`` between consecutive boundaries."""
    if len(schedules) != len(boundaries) + 1:
        raise ValueError("join needs exactly one more schedule than boundaries")
    if list(boundaries) != sorted(boundaries):
        raise ValueError(f"boundaries must be increasing, got {list(boundaries)}")

    def schedule(count: Any) -> Any:
        if isinstance(count, (int, np.integer)):
            count = np.asarray(count)
        xp = _backend.namespace_of(count)
        value = xp.asarray(schedules[0](count))
        for boundary, later in zip(boundaries, schedules[1:]):
            value = xp.where(count < boundary, value, xp.asarray(later(count - boundary)))
        return value

    return schedule
