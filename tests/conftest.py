"""Shared fixtures: one ``backend``/``xp`` fixture parametrised over every array backend.

A missing backend is skipped with its reason (not installed / no GPU); an installed one always
runs. JAX runs with x64 enabled so float64 cases are float64 there too.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from agnostic_optim.conformance.backends import BACKEND_NAMES, Backend, get_backend


def _require(name: str) -> Backend:
    backend = get_backend(name)
    if not backend.available:
        pytest.skip(f"backend {name} unavailable: {backend.reason}")
    return backend


@pytest.fixture(params=BACKEND_NAMES)
def backend(request: pytest.FixtureRequest) -> Backend:
    """Every backend in turn (skipped with the reason when unavailable)."""
    return _require(request.param)


@pytest.fixture(params=[name for name in BACKEND_NAMES if name not in ("jax", "jax-gpu")])
def mutable(request: pytest.FixtureRequest) -> Backend:
    """Every backend whose arrays can be written in place (JAX's cannot; ArrayOptimizer refuses them)."""
    return _require(request.param)


@pytest.fixture
def xp(backend: Backend):
    return backend.xp


@pytest.fixture
def torch_backend() -> Backend:
    return _require("torch")


@pytest.fixture
def jax_backend() -> Backend:
    return _require("jax")


@pytest.fixture
def torch64():
    """torch with float64 as the default dtype, so torch.optim's scalar state is float64 too."""
    torch = _require("torch").module
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield torch
    torch.set_default_dtype(previous)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261128)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Counts the ``torch._foreach_*`` kernels launched (the torch adapter's TensorList)."""
    torch = _require("torch").module
    counter: Counter = Counter()
    for name in dir(torch):
        if name.startswith("_foreach_"):
            original = getattr(torch, name)

            def counted(*args, __name=name, __original=original, **kwargs):
                counter[__name] += 1
                return __original(*args, **kwargs)

            monkeypatch.setattr(torch, name, counted)
    return counter
