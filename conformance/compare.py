"""How results are compared: one relative-error measure for tests and the conformance suite."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """``max|actual - expected| / max|expected|`` (absolute error when ``expected`` is all zero).

    The max-norm relative error of a whole leaf: stable for leaves with entries near zero,
    where an elementwise ratio would measure rounding noise instead of agreement.
    """
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        raise ValueError(f"shape mismatch: {actual.shape} vs {expected.shape}")
    if not np.all(np.isfinite(actual)) or not np.all(np.isfinite(expected)):
        same = np.array_equal(np.isnan(actual), np.isnan(expected)) and np.array_equal(
            actual[~np.isfinite(actual)], expected[~np.isfinite(expected)]
        )
        if not same:
            return float("inf")
        finite = np.isfinite(expected)
        actual, expected = actual[finite], expected[finite]
    if actual.size == 0:
        return 0.0
    scale = float(np.max(np.abs(expected)))
    diff = float(np.max(np.abs(actual - expected)))
    return diff / scale if scale > 0 else diff


def max_relative_error(actual: Sequence[np.ndarray], expected: Sequence[np.ndarray]) -> float:
    """The worst :func:`relative_error` over matching leaves."""
    if len(actual) != len(expected):
        raise ValueError(f"leaf count mismatch: {len(actual)} vs {len(expected)}")
    return max((relative_error(a, e) for a, e in zip(actual, expected)), default=0.0)
