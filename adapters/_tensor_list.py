"""A list of tensors that behaves like one array, so a core rule runs once over many leaves.

The torch adapter's eager path groups leaves of one dtype and device and hands the core's
*unchanged* update rule a :class:`TensorList` per operand. Every arithmetic operator and the
array-API functions the rules use dispatch to torch's horizontally fused ``torch._foreach_*``
kernels (one launch per operation for the whole group instead of one per leaf). Per-leaf
reductions (``sum``) give a list of 0-d tensors, which broadcast against their own leaf, so the
layer-wise trust ratios of LARS/LAMB stay per leaf. Nothing here knows an optimizer: it is the
batching half of "one rule, made fast by batching or compiling it".
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch

Operand = Any  # TensorList, 0-d tensor or Python number


class TensorList:
    """A group of tensors (one per leaf) acting as a single array operand.

    Products are kept pending until they are needed, so that an addition can absorb them into
    one fused kernel: ``a + x * s`` runs as ``_foreach_add(a, x, alpha=s)``, ``a + x * y * s`` as
    ``_foreach_addcmul`` and ``a - x / y * s`` as ``_foreach_addcdiv`` -- the multiply-add
    primitives torch's own foreach optimizers are built from, which the array API lacks. Only
    scales known on the host (Python numbers and CPU 0-d tensors) are absorbed, so CUDA never
    syncs. A fused kernel rounds its product and sum once instead of twice (ulp-level
    differences from the unfused functional step).
    """

    __slots__ = ("_pending", "_tensors")

    def __init__(self, tensors: Sequence[torch.Tensor] | None, pending: _Pending | None = None):
        self._tensors = None if tensors is None else list(tensors)
        self._pending = pending

    @property
    def tensors(self) -> list[torch.Tensor]:
        if self._tensors is None:
            self._tensors = self._pending.evaluate()
            self._pending = None
        return self._tensors

    @property
    def dtype(self) -> torch.dtype:
        return self._any().dtype

    @property
    def device(self) -> torch.device:
        return self._any().device

    def _any(self) -> torch.Tensor:
        return self._tensors[0] if self._tensors is not None else self._pending.x[0]

    def __len__(self) -> int:
        return len(self._tensors) if self._tensors is not None else len(self._pending.x)

    def __array_namespace__(self, api_version: str | None = None) -> TensorListNamespace:
        return NAMESPACE

    # ------------------------------------------------------------ arithmetic

    def __add__(self, other: Operand) -> TensorList:
        if isinstance(other, TensorList):
            fused = _fused_add(self, other, 1.0)
            if fused is not None:
                return fused
        return TensorList(torch._foreach_add(self.tensors, _operand(other)))

    __radd__ = __add__

    def __sub__(self, other: Operand) -> TensorList:
        if isinstance(other, TensorList):
            fused = _fused_add(self, other, -1.0)
            if fused is not None:
                return fused
            return TensorList(torch._foreach_sub(self.tensors, other.tensors))
        if isinstance(other, torch.Tensor):
            return TensorList(torch._foreach_add(self.tensors, other, alpha=-1))
        return TensorList(torch._foreach_sub(self.tensors, other))

    def __rsub__(self, other: Operand) -> TensorList:
        return TensorList(torch._foreach_add(torch._foreach_neg(self.tensors), _operand(other)))

    def __mul__(self, other: Operand) -> TensorList:
        scale = _host_scalar(other) if self._any().is_floating_point() else None
        if scale is not None:
            pending = self._pending
            if pending is not None and pending.scale is None and pending.kind != "scale":
                return TensorList(None, _Pending(pending.kind, pending.x, pending.y, scale))
            return TensorList(None, _Pending("scale", self.tensors, None, scale))
        if isinstance(other, TensorList) and self._pending is None and other._pending is None:
            return TensorList(None, _Pending("mul", self._tensors, other._tensors, None))
        return TensorList(torch._foreach_mul(self.tensors, _operand(other)))

    __rmul__ = __mul__

    def __truediv__(self, other: Operand) -> TensorList:
        if isinstance(other, TensorList) and self._pending is None and other._pending is None:
            return TensorList(None, _Pending("div", self._tensors, other._tensors, None))
        return TensorList(torch._foreach_div(self.tensors, _operand(other)))

    def __rtruediv__(self, other: Operand) -> TensorList:
        return TensorList(torch._foreach_mul(torch._foreach_reciprocal(self.tensors), _operand(other)))

    def __pow__(self, other: Operand) -> TensorList:
        return TensorList(torch._foreach_pow(self.tensors, _operand(other)))

    def __neg__(self) -> TensorList:
        return TensorList(torch._foreach_neg(self.tensors))

    # ------------------------------------------------------------ comparisons and logic

    def _elementwise(self, other: Operand, op: Callable[[Any, Any], Any]) -> TensorList:
        if isinstance(other, TensorList):
            return TensorList([op(a, b) for a, b in zip(self.tensors, other.tensors)])
        return TensorList([op(a, other) for a in self.tensors])

    def __gt__(self, other: Operand) -> TensorList:
        return self._elementwise(other, torch.gt)

    def __lt__(self, other: Operand) -> TensorList:
        return self._elementwise(other, torch.lt)

    def __ge__(self, other: Operand) -> TensorList:
        return self._elementwise(other, torch.ge)

    def __le__(self, other: Operand) -> TensorList:
        return self._elementwise(other, torch.le)

    def __and__(self, other: Operand) -> TensorList:
        return self._elementwise(other, torch.logical_and)

    def __or__(self, other: Operand) -> TensorList:
        return self._elementwise(other, torch.logical_or)

    def __invert__(self) -> TensorList:
        return TensorList([torch.logical_not(t) for t in self.tensors])


def _operand(value: Operand) -> Any:
    if isinstance(value, TensorList):
        return value.tensors
    if isinstance(value, (torch.Tensor, numbers.Number)):
        return value
    raise TypeError(f"unsupported operand for a TensorList: {type(value).__name__}")


class _Pending:
    """A product not computed yet: ``x * s`` ("scale"), ``x * y [* s]`` ("mul"), ``x / y [* s]`` ("div")."""

    __slots__ = ("kind", "scale", "x", "y")

    def __init__(self, kind: str, x: list[torch.Tensor], y: list[torch.Tensor] | None, scale: float | None):
        self.kind, self.x, self.y, self.scale = kind, x, y, scale

    def evaluate(self) -> list[torch.Tensor]:
        """The product, rounded after each operation as the unfused expression would be."""
        if self.kind == "scale":
            return torch._foreach_mul(self.x, self.scale)
        out = (torch._foreach_mul if self.kind == "mul" else torch._foreach_div)(self.x, self.y)
        if self.scale is not None:
            torch._foreach_mul_(out, self.scale)
        return out

    def add_to(self, base: list[torch.Tensor], sign: float, in_place: bool) -> list[torch.Tensor]:
        """``base + sign * product`` in one fused kernel (into ``base`` if ``in_place``)."""
        value = sign * (1.0 if self.scale is None else self.scale)
        if self.kind == "scale" and in_place:
            torch._foreach_add_(base, self.x, alpha=value)
            return base
        if self.kind == "scale":
            return torch._foreach_add(base, self.x, alpha=value)
        op = {
            ("mul", False): torch._foreach_addcmul,
            ("mul", True): torch._foreach_addcmul_,
            ("div", False): torch._foreach_addcdiv,
            ("div", True): torch._foreach_addcdiv_,
        }[self.kind, in_place]
        result = op(base, self.x, self.y, value=value)
        return base if in_place else result


def _fused_add(a: TensorList, b: TensorList, sign: float) -> TensorList | None:
    """``a + sign * b`` with a pending product absorbed into the addition, or None."""
    if b._pending is not None:
        if a._pending is not None and a._pending.kind == "scale":
            base = a._pending.evaluate()  # a fresh temporary: add into it
            return TensorList(b._pending.add_to(base, sign, in_place=True))
        return TensorList(b._pending.add_to(a.tensors, sign, in_place=False))
    if a._pending is not None and sign == 1.0:
        return _fused_add(b, a, 1.0)
    return None


def _host_scalar(value: Operand) -> float | None:
    """``value`` as a Python float when it is a host scalar a fused kernel can take, else None."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if (
        isinstance(value, torch.Tensor)
        and value.ndim == 0
        and value.device.type == "cpu"
        and value.is_floating_point()
    ):
        return value.item()
    return None


def _tensors(value: Operand, like: TensorList) -> list[Any]:
    """Per-leaf operands: a TensorList's tensors, or ``value`` repeated for every leaf."""
    return value.tensors if isinstance(value, TensorList) else [value] * len(like)


class TensorListNamespace:
    """The array-API functions the core rules use, over :class:`TensorList` operands."""

    float32 = torch.float32
    float64 = torch.float64
    float16 = torch.float16
    bfloat16 = torch.bfloat16
    int32 = torch.int32
    bool = torch.bool

    @staticmethod
    def sqrt(x: TensorList) -> TensorList:
        return TensorList(torch._foreach_sqrt(x.tensors))

    @staticmethod
    def abs(x: TensorList) -> TensorList:
        return TensorList(torch._foreach_abs(x.tensors))

    @staticmethod
    def sign(x: TensorList) -> TensorList:
        return TensorList(torch._foreach_sign(x.tensors))

    @staticmethod
    def exp(x: TensorList) -> TensorList:
        return TensorList(torch._foreach_exp(x.tensors))

    @staticmethod
    def maximum(a: Operand, b: Operand) -> TensorList:
        if isinstance(a, TensorList) and isinstance(b, TensorList):
            return TensorList(torch._foreach_maximum(a.tensors, b.tensors))
        like = a if isinstance(a, TensorList) else b
        return TensorList([torch.maximum(x, y) for x, y in zip(_tensors(a, like), _tensors(b, like))])

    @staticmethod
    def minimum(a: Operand, b: Operand) -> TensorList:
        if isinstance(a, TensorList) and isinstance(b, TensorList):
            return TensorList(torch._foreach_minimum(a.tensors, b.tensors))
        like = a if isinstance(a, TensorList) else b
        return TensorList([torch.minimum(x, y) for x, y in zip(_tensors(a, like), _tensors(b, like))])

    @staticmethod
    def where(condition: Operand, a: Operand, b: Operand) -> TensorList:
        like = next(v for v in (condition, a, b) if isinstance(v, TensorList))
        return TensorList(
            [
                torch.where(c, x, y)
                for c, x, y in zip(_tensors(condition, like), _tensors(a, like), _tensors(b, like))
            ]
        )

    @staticmethod
    def sum(x: TensorList) -> TensorList:
        """Per-leaf sums: a list of 0-d tensors, each broadcasting against its own leaf."""
        return TensorList([torch.sum(t) for t in x.tensors])

    @staticmethod
    def zeros_like(x: TensorList) -> TensorList:
        return TensorList([torch.zeros_like(t) for t in x.tensors])

    @staticmethod
    def ones_like(x: TensorList) -> TensorList:
        return TensorList([torch.ones_like(t) for t in x.tensors])

    @staticmethod
    def full_like(x: TensorList, value: float) -> TensorList:
        return TensorList([torch.full_like(t, value) for t in x.tensors])

    @staticmethod
    def astype(x: TensorList, dtype: torch.dtype) -> TensorList:
        return TensorList([t.to(dtype) for t in x.tensors])

    @staticmethod
    def isfinite(x: TensorList) -> TensorList:
        return TensorList([torch.isfinite(t) for t in x.tensors])


NAMESPACE = TensorListNamespace()
