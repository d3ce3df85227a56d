"""Building blocks shared by the update rules: moments, bias corrections, decay forms, norms.

Scalar helpers (``bias_correction``...) work on 0-d arrays in the scalar dtype inside a rule's
``prepare``; array helpers work on one leaf inside a rule's ``update``. Each exists once and
every optimizer that needs it calls it.
"""

from __future__ import annotations

from typing import Any

from agnostic_optim._backend import astype, compute_dtype, device_of

Array = Any


# ----------------------------------------------------------------- per-leaf array helpers


def ema(average: Array, value: Array, decay: Array, one_minus_decay: Array) -> Array:
    """Exponential moving average ``decay * average + (1 - decay) * value``."""
    return average * decay + value * one_minus_decay


def coupled_weight_decay(grad: Array, param: Array, weight_decay: Array) -> Array:
    """L2 regularisation folded into the gradient: ``g + weight_decay * param``."""
    return grad + param * weight_decay


def decoupled_weight_decay(param: Array, lr_times_weight_decay: Array) -> Array:
    """AdamW's decoupled decay, applied before the update: ``param * (1 - lr * weight_decay)``."""
    return param * (1 - lr_times_weight_decay)


def sum_of_squares(xp: Any, x: Array) -> Array:
    """``sum(x ** 2)`` over every element, as a 0-d array."""
    return xp.sum(x * x)


def l2_norm(xp: Any, x: Array) -> Array:
    return xp.sqrt(sum_of_squares(xp, x))


def psd_matrix_power(xp: Any, matrix: Array, exponent: float, shift: Array) -> Array:
    """``(matrix + shift I) ** exponent`` of a symmetric positive semi-definite ``matrix``.

    From the eigendecomposition ``matrix = V diag(w) Vᵀ`` (the array API's ``linalg.eigh``):
    ``V diag((max(w, 0) + shift) ** exponent) Vᵀ``. Eigenvalues are clamped at 0 before the shift
    (rounding can make those of a PSD matrix slightly negative), so with ``shift > 0`` every
    eigenvalue raised to a negative ``exponent`` is at least ``shift``.
    """
    w, v = xp.linalg.eigh(matrix)
    w = (xp.clip(w, min=0.0) + shift) ** exponent
    return (v * w) @ xp.matrix_transpose(v)


# ----------------------------------------------------------------- scalar helpers (prepare)


def bias_correction(beta: Array, t: Array) -> Array:
    """``1 - beta ** t``: the bias of an EMA started at zero after ``t`` steps."""
    return 1 - beta**t


def global_norm(xp: Any, leaves: list[Array], dtype: Any) -> Array:
    """The L2 norm over all leaves, accumulated in ``dtype`` (the scalar dtype).

    Each leaf is squared in its compute dtype (float32 for 16-bit leaves), so a float16 gradient
    of 300 neither overflows nor rounds its square.
    """
    total = xp.zeros((), dtype=dtype, device=device_of(leaves[0]))
    for leaf in leaves:
        leaf = astype(xp, leaf, compute_dtype(xp, leaf.dtype))
        total = total + xp.astype(sum_of_squares(xp, leaf), dtype)
    return xp.sqrt(total)


def trust_ratio(
    xp: Any, numerator: Array, denominator: Array, param_norm: Array, update_norm: Array
) -> Array:
    """``numerator / denominator`` where both norms are positive, else 1 (no layer adaptation).

    The layer-wise trust ratio of LARS and LAMB: a zero weight norm (fresh bias) or a zero
    update norm leaves the step unscaled, as timm and optax do.
    """
    adapt = (param_norm > 0) & (update_norm > 0)
    one = xp.ones_like(numerator)
    return xp.where(adapt, numerator / xp.where(adapt, denominator, one), one)


def clip_above_one(xp: Any, x: Array) -> Array:
    """``min(x, 1)``."""
    return xp.where(x < 1, x, xp.ones_like(x))
