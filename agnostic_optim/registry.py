"""``ao.registry()``: every optimizer factory, so tests, conformance and benchmarks miss none."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

FAMILIES = (
    "plain first-order / momentum",
    "adaptive",
    "large-batch / layer-wise",
    "generalization wrappers",
    "curvature-aware",
)


@dataclass(frozen=True)
class RegistryEntry:
    """One optimizer factory.

    Attributes:
      name: the factory's name in ``agnostic_optim``.
      factory: the callable that builds the optimizer.
      family: the seed deck's section it belongs to (one of ``FAMILIES``).
      inputs: extra keyword inputs of ``step`` -> what they hold (empty for plain optimizers).
      wraps: True when the factory takes a base optimizer as its first argument (SAM, Lookahead).
      summary: the first line of the factory's docstring.
    """

    name: str
    factory: Callable[..., Any]
    family: str
    inputs: Mapping[str, str] = field(default_factory=dict)
    wraps: bool = False
    summary: str = ""


_REGISTRY: dict[str, RegistryEntry] = {}


def register(family: str, *, inputs: Mapping[str, str] | None = None, wraps: bool = False):
    """Decorator adding an optimizer factory to the registry."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")

    def decorate(factory: Callable[..., Any]) -> Callable[..., Any]:
        doc = (factory.__doc__ or "").strip().splitlines()
        _REGISTRY[factory.__name__] = RegistryEntry(
            name=factory.__name__,
            factory=factory,
            family=family,
            inputs=dict(inputs or {}),
            wraps=wraps,
            summary=doc[0] if doc else "",
        )
        return factory

    return decorate


def registry() -> dict[str, RegistryEntry]:
    """Every registered optimizer factory by name, in the seed deck's order of families."""
    ordered = sorted(_REGISTRY.values(), key=lambda entry: FAMILIES.index(entry.family))
    return {entry.name: entry for entry in ordered}
