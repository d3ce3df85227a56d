"""Hyperparameters as data: validated at construction, held in the state as 0-d arrays.

Every numeric hyperparameter lives in the optimizer state as a 0-d array in the *scalar dtype*
(float64 where the namespace has it, else float32), on the parameters' device. Changing one is
a data change, never a retrace under ``jax.jit`` or a recompile under ``torch.compile``.

A hyperparameter may instead be a schedule (a callable ``count -> value``, see
:mod:`agnostic_optim.schedules`). Its current value is kept in ``state.scheduled`` and
recomputed from the step count at every step.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any, Literal

from agnostic_optim import _backend

HParam = Any  # a float, a 0-d array, or a schedule ``count -> value``
HParamValue = Any  # an HParam or a tuple of them (``betas``)
Convention = Literal["torch", "optax"]


def is_schedule(value: Any) -> bool:
    return callable(value) and not hasattr(value, "shape")


def is_scheduled(value: Any) -> bool:
    """A schedule, or a tuple holding one (``betas=(schedule, 0.999)``)."""
    if isinstance(value, (tuple, list)):
        return any(is_scheduled(v) for v in value)
    return is_schedule(value)


def _evaluate(spec: Any, count: Any) -> Any:
    if isinstance(spec, (tuple, list)):
        return tuple(_evaluate(v, count) for v in spec)
    return spec(count) if is_schedule(spec) else spec


def is_nonzero(value: Any) -> bool:
    """False only for a literal zero; schedules and arrays count as possibly non-zero.

    A hyperparameter that is literally 0 at construction switches its term off structurally
    (no buffer, no work), as torch.optim does; it cannot be made non-zero later with
    ``set_hparams``.
    """
    return not (isinstance(value, numbers.Real) and not hasattr(value, "shape") and value == 0)


def check_convention(convention: str) -> None:
    if convention not in ("torch", "optax"):
        raise ValueError(f"Invalid convention: {convention!r} (expected 'torch' or 'optax')")


def convention_defaults(**table: tuple[Any, Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Factory decorator: each named argument left ``None`` takes its ``(torch, optax)`` default
    according to the factory's ``convention`` argument, so ``convention="optax"`` alone gives
    optax's defaults. The table is kept as ``factory.convention_defaults`` for adapters."""

    def decorate(factory: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(factory)

        @functools.wraps(factory)
        def resolved(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            check_convention(bound.arguments["convention"])
            for name, (torch_default, optax_default) in table.items():
                if bound.arguments[name] is None:
                    optax_form = bound.arguments["convention"] == "optax"
                    bound.arguments[name] = optax_default if optax_form else torch_default
            return factory(*bound.args, **bound.kwargs)

        resolved.convention_defaults = dict(table)
        return resolved

    return decorate


# The hyperparameter each ``check_range`` name stands for, so that a value set later
# (``set_hparams``, a schedule's number, a torch param group edited between steps) is checked
# against the limits construction checked it against.
_KEYS = {
    "learning rate": "lr",
    "epsilon value": "eps",
    "weight_decay value": "weight_decay",
    "momentum value": "momentum",
    "lr_decay value": "lr_decay",
    "alpha value": "alpha",
    "momentum_decay value": "momentum_decay",
    "Hessian power value": "hessian_power",
    "rho parameter": "rho",
    "Max grad norm": "max_grad_norm",
}
# key -> the intervals factories allow it (their union is checked: names are shared)
LIMITS: dict[str, set[tuple[float | None, float | None, bool, bool, bool]]] = {}


def check_range(
    name: str,
    value: Any,
    low: float | None = 0.0,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    finite: bool = True,
) -> None:
    """Raise if a hyperparameter given at construction is not a number, a 0-d array or a
    schedule (``TypeError`` naming it), or lies outside its interval (``ValueError``, in
    torch.optim's words: ``Invalid learning rate: -1.0``). Non-finite numbers are refused
    unless ``finite=False``. The interval is remembered under the hyperparameter's key for
    :func:`check_value`.

    Schedules and arrays are not inspected (reading an array's value would force a host sync;
    a traced schedule's values are checked nowhere, as under ``jax.jit`` they cannot be).
    """
    LIMITS.setdefault(_KEYS.get(name, name), set()).add((low, high, low_open, high_open, finite))
    if is_scheduled(value) or hasattr(value, "shape"):
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"Invalid {name}: {value!r} is a {type(value).__name__}; expected a number, a 0-d array "
            "or a schedule"
        )
    if not _inside(value, low, high, low_open, high_open, finite):
        lo = "-inf" if low is None else f"{low}"
        hi = "inf" if high is None else f"{high}"
        interval = ("(" if low_open else "[") + f"{lo}, {hi}" + (")" if high_open else "]")
        finiteness = "finite, " if finite else ""
        raise ValueError(f"Invalid {name}: {value!r} (must be {finiteness}in {interval})")


def _inside(value: float, low: Any, high: Any, low_open: bool, high_open: bool, finite: bool) -> bool:
    if math.isnan(value) or (finite and math.isinf(value)):
        return False
    if low is not None and not (value > low if low_open else value >= low):
        return False
    return high is None or (value < high if high_open else value <= high)


def check_value(key: str, value: Any) -> None:
    """Raise if a value given for hyperparameter ``key`` after construction is not a number or
    scalar array, or (a number) lies outside every interval a factory allows for ``key``
    (``ValueError`` naming it). Arrays are not read (a host sync); nor are traced values."""
    if isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            check_value(f"{key}[{i}]" if key != "betas" else "betas", v)
        return
    if hasattr(value, "shape"):
        if math.prod(value.shape) != 1:
            raise ValueError(f"Invalid {key}: an array of shape {tuple(value.shape)} (expected one value)")
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"Invalid {key}: {value!r} is a {type(value).__name__}; expected a number")
    limits = LIMITS.get(key)
    if limits and not any(_inside(float(value), *limit) for limit in limits):
        raise ValueError(f"Invalid {key}: {value!r} (outside the range its optimizer allows)")
    if not limits and not math.isfinite(value):
        raise ValueError(f"Invalid {key}: {value!r} (must be finite)")


def check_betas(betas: Any, count: int, name: str = "betas") -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != count:
        raise ValueError(f"Invalid {name}: {betas!r} (expected a tuple of {count} values)")
    for i, b in enumerate(betas):  # (torch.optim's wording for ``betas``)
        what = f"beta parameter at index {i}" if name == "betas" else f"{name}[{i}]"
        check_range(what, b, 0.0, 1.0, high_open=True)
    LIMITS.setdefault(name, set()).add((0.0, 1.0, False, True, True))


def to_state(
    xp: Any, values: Mapping[str, HParamValue], dtype: Any, device: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split hyperparameters into (constant 0-d arrays, schedules' values at count 0)."""
    constants: dict[str, Any] = {}
    scheduled: dict[str, Any] = {}
    count = xp.asarray(0, dtype=xp.int32, device=device)
    for name, value in values.items():
        if is_scheduled(value):
            scheduled[name] = _as_scalar(xp, _evaluate(value, count), dtype, device)
        else:
            constants[name] = _as_scalar(xp, value, dtype, device)
    return constants, scheduled


def _as_scalar(xp: Any, value: Any, dtype: Any, device: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return tuple(_as_scalar(xp, v, dtype, device) for v in value)
    if hasattr(value, "shape") and tuple(value.shape) != ():
        raise ValueError(f"hyperparameters must be scalars, got an array of shape {value.shape}")
    if isinstance(value, numbers.Real):
        return _backend.scalar(xp, float(value), dtype, device)
    return _backend.scalar(xp, value, dtype, device)


def evaluate_schedules(
    xp: Any, schedules: Mapping[str, Callable[[Any], Any]], count: Any, like: Mapping[str, Any]
) -> dict[str, Any]:
    """Each schedule's value at ``count`` as a 0-d array with the dtype/device of ``like[name]``
    (entry by entry for tuples such as ``betas``). A schedule that returns a Python number is
    checked as ``set_hparams`` checks it (an array is not read: a host sync, or a traced value)."""

    def convert(name: str, value: Any, ref: Any) -> Any:
        if isinstance(ref, tuple):
            return tuple(convert(name, v, r) for v, r in zip(value, ref))
        if hasattr(value, "shape"):
            return xp.astype(xp.asarray(value), ref.dtype)
        check_value(name, value)
        return xp.asarray(value, dtype=ref.dtype, device=_backend.device_of(ref))

    return {name: convert(name, _evaluate(spec, count), like[name]) for name, spec in schedules.items()}


def replace(hparams: Mapping[str, Any], name: str, value: Any) -> dict[str, Any]:
    """``hparams`` with ``name`` set to ``value``, converted like the existing entry."""
    old = hparams[name]
    return {**hparams, name: _like(old, value)}


def _like(old: Any, value: Any) -> Any:
    if isinstance(old, tuple):
        if not isinstance(value, (tuple, list)) or len(value) != len(old):
            raise ValueError(f"expected a tuple of {len(old)} values, got {value!r}")
        return tuple(_like(o, v) for o, v in zip(old, value))
    xp = _backend.namespace_of(old)
    dtype = old.dtype
    if is_schedule(value):
        raise TypeError("a schedule can only be given when the optimizer is constructed")
    if hasattr(value, "shape"):
        if tuple(value.shape) != ():
            raise ValueError(f"hyperparameters must be scalars, got shape {value.shape}")
        return _backend.to_device_of(xp, xp.astype(xp.asarray(value), dtype), old)
    return xp.asarray(float(value), dtype=dtype, device=_backend.device_of(old))


# --------------------------------------------------------------------------- get / set


def _is_rule_state(node: Any) -> bool:
    return isinstance(node, tuple) and hasattr(node, "hparams") and hasattr(node, "scheduled")


def rule_states(state: Any):
    """Every rule state (``OptimizerState``) inside a wrapper state (tuples and NamedTuples)."""
    if _is_rule_state(state):
        yield state
    elif isinstance(state, (tuple, list)):
        for child in state:
            yield from rule_states(child)


def get_hparams(state: Any) -> dict[str, Any]:
    """The current hyperparameters of an optimizer state, by name (0-d arrays, tuples for betas).

    Scheduled hyperparameters report the value used at the latest step. In composed states
    (``chain``, wrappers) the names of every component are merged; the outermost wins a clash.
    """
    found: dict[str, Any] = {}
    for node in rule_states(state):
        for name, value in {**node.hparams, **node.scheduled}.items():
            found.setdefault(name, value)
    return found


def set_hparams(state: Any, **values: Any) -> Any:
    """A copy of ``state`` with new hyperparameter values (every component holding the name).

    Values keep the dtype and device of the entries they replace. Raises ``KeyError`` for a name
    no component has (including terms switched off by a literal 0 at construction) and
    ``TypeError`` for a hyperparameter driven by a schedule.
    """
    seen: set[str] = set()

    def rebuild(node: Any) -> Any:
        if _is_rule_state(node):
            new = dict(node.hparams)
            for name, value in values.items():
                if name in node.scheduled:
                    raise TypeError(
                        f"{name} is driven by a schedule; build the optimizer with a constant "
                        "(or another schedule) to set it"
                    )
                if name in new:
                    new = replace(new, name, value)
                    seen.add(name)
            return node._replace(hparams=new)
        if isinstance(node, tuple) and hasattr(type(node), "_fields"):
            return type(node)(*(rebuild(child) for child in node))
        if isinstance(node, (tuple, list)):
            return type(node)(rebuild(child) for child in node)
        return node

    new_state = rebuild(state)
    missing = set(values) - seen
    if missing:
        available = sorted(get_hparams(state))
        raise KeyError(
            f"no hyperparameter {sorted(missing)} in this state; it has {available}. "
            "A term given as a literal 0 at construction (weight_decay=0, momentum=0) is "
            "switched off structurally and cannot be set later."
        )
    for name, value in values.items():  # (checked as construction checks them)
        check_value(name, value)
    return new_state
