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
    """A group of tensors (one per leaf) acting as a single array operand."""

    __slots__ = ("tensors",)

    def __init__(self, tensors: Sequence[torch.Tensor]):
        self.tensors = list(tensors)

    @property
    def dtype(self) -> torch.dtype:
        return self.tensors[0].dtype

    @property
    def device(self) -> torch.device:
        return self.tensors[0].device

    def __len__(self) -> int:
        return len(self.tensors)

    def __array_namespace__(self, api_version: str | None = None) -> TensorListNamespace:
        return NAMESPACE

    # ------------------------------------------------------------ arithmetic

    def __add__(self, other: Operand) -> TensorList:
        return TensorList(torch._foreach_add(self.tensors, _operand(other)))

    __radd__ = __add__

    def __sub__(self, other: Operand) -> TensorList:
        if isinstance(other, TensorList):
            return TensorList(torch._foreach_sub(self.tensors, other.tensors))
        if isinstance(other, torch.Tensor):
            return TensorList(torch._foreach_add(self.tensors, other, alpha=-1))
        return TensorList(torch._foreach_sub(self.tensors, other))

    def __rsub__(self, other: Operand) -> TensorList:
        return TensorList(torch._foreach_add(torch._foreach_neg(self.tensors), _operand(other)))

    def __mul__(self, other: Operand) -> TensorList:
        return TensorList(torch._foreach_mul(self.tensors, _operand(other)))

    __rmul__ = __mul__

    def __truediv__(self, other: Operand) -> TensorList:
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
