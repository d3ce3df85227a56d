"""Deterministic problems the conformance suite runs every optimizer on.

Each problem has host (NumPy float64) initial parameters from a fixed seed and a gradient
function written with array-API operations, so every backend computes its own gradients from its
own parameters with the same code. Gradients are computed in float64 and only then cast to the
run's dtype, so a float32 run differs from the float64 one by the optimizer's own float32
arithmetic, not by a float32 loss surface. The gradient stream problem hands every backend
identical host gradients instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from agnostic_optim.conformance.backends import Backend

Array = Any
LayerStats = dict[tuple[int], tuple[Array, Array]]  # weight leaf path -> (layer inputs, output grads)


@dataclass(frozen=True)
class Problem:
    """A named problem: initial host params and a per-step gradient on a given backend.

    Attributes:
      name: short identifier used in reports.
      initial: host float64 arrays, one per leaf.
      gradient: ``gradient(backend, params, step, dtype) -> grads`` (a list like ``params``).
      loss: ``loss(backend, params, dtype) -> 0-d array``, the objective whose gradient
        ``gradient`` is (None for the gradient stream, which has no objective).
      layer_stats: ``layer_stats(backend, params, dtype) -> {(i,): (inputs, output grads)}`` for
        the fully-connected layers whose weight is leaf ``i``, stored (in, out) with leaf ``i + 1``
        its bias (K-FAC's step input; None where the problem has no layers).
      streamed: True when ``gradient`` depends on the step (a stream of gradients), not on the
        params alone.
    """

    name: str
    initial: list[np.ndarray]
    gradient: Callable[[Backend, list[Array], int, str], list[Array]]
    loss: Callable[[Backend, list[Array], str], Array] | None = None
    layer_stats: Callable[[Backend, list[Array], str], LayerStats] | None = None
    streamed: bool = False  # the gradient depends on the step (a stream), not on the params only


def multi_leaf_tree(steps: int, seed: int = 0) -> Problem:
    """0-d, 1-d, 2-d and 4-d leaves with a fixed stream of host gradients (every backend gets
    identical values each step)."""
    rng = np.random.default_rng(seed)
    shapes = [(), (5,), (4, 3), (2, 3, 2, 2)]
    initial = [rng.standard_normal(s) for s in shapes]
    stream = [[rng.standard_normal(s) for s in shapes] for _ in range(steps)]

    def gradient(backend: Backend, params: list[Array], step: int, dtype: str) -> list[Array]:
        return [backend.asarray(g, dtype) for g in stream[step]]

    return Problem("tree", initial, gradient, streamed=True)


def ill_conditioned_quadratic(seed: int = 1, dimension: int = 6, condition: float = 1e2) -> Problem:
    """``f(x) = ½ xᵀAx - bᵀx`` with eigenvalues from 0.1 to ``0.1 · condition`` in a random
    basis (stable for every case's learning rate, yet a hundredfold anisotropic)."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((dimension, dimension)))
    matrix = basis @ np.diag(np.geomspace(0.1, 0.1 * condition, dimension)) @ basis.T
    offset = rng.standard_normal(dimension)
    initial = [rng.standard_normal(dimension)]

    def gradient(backend: Backend, params: list[Array], step: int, dtype: str) -> list[Array]:
        xp = backend.xp
        a, b = backend.asarray(matrix), backend.asarray(offset)
        return _cast(backend, [xp.matmul(a, _float64(backend, params[0])) - b], dtype)

    def loss(backend: Backend, params: list[Array], dtype: str) -> Array:
        xp = backend.xp
        a, b, x = backend.asarray(matrix), backend.asarray(offset), _float64(backend, params[0])
        return _cast(backend, [xp.sum(x * xp.matmul(a, x)) / 2 - xp.sum(b * x)], dtype)[0]

    return Problem("quadratic", initial, gradient, loss)


def mlp_regression(seed: int = 2, batch: int = 16, width: int = 8) -> Problem:
    """A tanh MLP (4 -> width -> 1) fitting a fixed regression target by mean squared error,
    with gradients by hand-written backpropagation in array-API operations."""
    rng = np.random.default_rng(seed)
    inputs = rng.standard_normal((batch, 4))
    targets = np.sin(inputs @ rng.standard_normal((4, 1)))
    initial = [
        rng.standard_normal((4, width)) * 0.5,
        np.zeros(width) + 0.1,
        rng.standard_normal((width, 1)) * 0.5,
        np.full(1, 0.3),  # no leaf near zero: relative errors stay meaningful
    ]

    def forward(backend: Backend, params: list[Array]) -> tuple[Array, Array, Array]:
        """(inputs, hidden activations, prediction - target) in float64."""
        xp = backend.xp
        x, y = backend.asarray(inputs), backend.asarray(targets)
        w1, b1, w2, b2 = (_float64(backend, p) for p in params)
        hidden = xp.tanh(xp.matmul(x, w1) + b1)
        return x, hidden, xp.matmul(hidden, w2) + b2 - y

    def loss(backend: Backend, params: list[Array], dtype: str) -> Array:
        error = forward(backend, params)[2]
        return _cast(backend, [backend.xp.sum(error * error) / batch], dtype)[0]

    def backward(backend: Backend, params: list[Array]) -> tuple[Array, ...]:
        """(layer inputs x, hidden; gradients of the loss at the layers' outputs: delta, residual)."""
        xp = backend.xp
        x, hidden, error = forward(backend, params)
        w2 = _float64(backend, params[2])
        residual = error * (2.0 / batch)
        delta = xp.matmul(residual, xp.matrix_transpose(w2)) * (1 - hidden * hidden)
        return x, hidden, delta, residual

    def gradient(backend: Backend, params: list[Array], step: int, dtype: str) -> list[Array]:
        xp = backend.xp
        x, hidden, delta, residual = backward(backend, params)
        grad_w2 = xp.matmul(xp.matrix_transpose(hidden), residual)
        grad_b2 = xp.sum(residual, axis=0)
        grad_w1 = xp.matmul(xp.matrix_transpose(x), delta)
        grad_b1 = xp.sum(delta, axis=0)
        return _cast(backend, [grad_w1, grad_b1, grad_w2, grad_b2], dtype)

    def layer_stats(
        backend: Backend, params: list[Array], dtype: str
    ) -> dict[tuple[int], tuple[Array, Array]]:
        x, hidden, delta, residual = _cast(backend, list(backward(backend, params)), dtype)
        return {(0,): (x, delta), (2,): (hidden, residual)}

    return Problem("mlp", initial, gradient, loss, layer_stats)


def _float64(backend: Backend, x: Array) -> Array:
    return backend.xp.astype(x, backend.dtype("float64"))


def _cast(backend: Backend, arrays: list[Array], dtype: str) -> list[Array]:
    return [backend.xp.astype(a, backend.dtype(dtype)) for a in arrays]


def all_problems(steps: int) -> list[Problem]:
    return [multi_leaf_tree(steps), ill_conditioned_quadratic(), mlp_regression()]
