"""A list of tensors that behaves like one array, so a core rule runs once over many leaves.

The torch adapter's eager path groups leaves of one dtype and device and hands the core's
*unchanged* update rule a :class:`TensorList` per operand. Every arithmetic operator and the
array-API functions the rules use dispatch to torch's horizontally fused ``torch._foreach_*``
kernels (one launch per operation for the whole group instead of one per leaf). Per-leaf
reductions (``sum``) give a list of 0-d tensors, which broadcast against their own leaf, so the
layer-wise trust ratios of LARS/LAMB stay per leaf. Nothing here knows an optimizer: it is the
batching half of "one rule, made fast by batching or compiling it".

Arithmetic is lazy: an expression is recorded and evaluated only when its value is needed, so
that

* products are absorbed into the multiply-add kernels torch's own foreach optimizers are built
  from, which the array API lacks: ``a + x * s`` runs as ``_foreach_add(a, x, alpha=s)``,
  ``a + x * y * s`` as ``_foreach_addcmul`` and ``a - x / y * s`` as ``_foreach_addcdiv``;
* a chain of operations on one operand runs in place on one buffer (``sqrt(v) / c + eps`` is
  one allocation and three kernels);
* :func:`store` evaluates a step's results straight into their destinations:
  ``m * b1 + g * (1 - b1)`` stored into ``m`` runs as ``m.mul_(b1).add_(g, alpha=1 - b1)``, with
  no temporary and no copy -- provided nothing evaluated later still reads the old ``m``.

Only scales known on the host (Python numbers and CPU 0-d tensors) are absorbed, so CUDA never
syncs. A fused kernel rounds its product and sum once instead of twice (ulp-level differences
from the unfused expression); every other operation rounds exactly as the expression does.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch

Operand = Any  # TensorList, 0-d tensor or Python number

_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
_UNARY = ("sqrt", "abs", "sign", "exp", "neg", "reciprocal")


class _Node:
    """A recorded operation on ``base``: ``kind`` names the foreach kernel family.

    ``add`` is ``base + alpha * other``; ``mul``, ``div``, ``pow``, ``maximum`` and ``minimum``
    combine ``base`` with ``other``; the unary kinds (``sqrt``, ...) only use ``base``; ``full``
    is ``other`` in the shape of ``base``.
    """

    __slots__ = ("alpha", "base", "kind", "other")

    def __init__(self, kind: str, base: TensorList, other: Any = None, alpha: float = 1.0):
        self.kind, self.base, self.other, self.alpha = kind, base, other, alpha


class TensorList:
    """A group of tensors (one per leaf) acting as a single array operand (see the module doc).

    A TensorList holds either its tensors or the operation that computes them; reading
    :attr:`tensors` evaluates (once) into fresh tensors. Tensors given to the constructor are
    only ever read, except by :func:`store`.
    """

    __slots__ = ("_node", "_per_leaf", "_tensors")

    def __init__(
        self,
        tensors: Sequence[torch.Tensor] | None,
        node: _Node | None = None,
        per_leaf: bool = False,
    ):
        self._tensors = None if tensors is None else list(tensors)
        self._node = node
        self._per_leaf = per_leaf  # one 0-d tensor per leaf (a reduction's result)

    @property
    def tensors(self) -> list[torch.Tensor]:
        if self._tensors is None:
            self._tensors = _evaluate(self._node, None)
            self._node = None
        return self._tensors

    @property
    def dtype(self) -> torch.dtype:
        return self._any().dtype

    @property
    def device(self) -> torch.device:
        return self._any().device

    def _any(self) -> torch.Tensor:
        operand = self
        while operand._tensors is None:
            operand = operand._node.base
        return operand._tensors[0]

    def __len__(self) -> int:
        operand = self
        while operand._tensors is None:
            operand = operand._node.base
        return len(operand._tensors)

    def __array_namespace__(self, api_version: str | None = None) -> TensorListNamespace:
        return NAMESPACE

    # ------------------------------------------------------------ arithmetic

    def _binary(
        self, kind: str, other: Operand, alpha: float = 1.0, commutative: bool = False
    ) -> TensorList | None:
        """A lazy ``kind`` of self and ``other``, or None where it must run now."""
        if not self._any().is_floating_point():
            return None
        if isinstance(other, TensorList):
            if other.dtype != self.dtype:
                return None  # type promotion: let torch decide, eagerly
            if kind == "mul" and _is_ones(other) and (other._per_leaf or not self._per_leaf):
                return self  # x * 1 is x exactly (RAdam's unrectified steps scale by ones_like)
            if kind == "mul" and _is_ones(self) and (self._per_leaf or not other._per_leaf):
                return other
            if self._per_leaf and not other._per_leaf:  # the full-size operand must be the base
                if not commutative:
                    return None
                return TensorList(None, _Node(kind, other, self, alpha))
            return TensorList(None, _Node(kind, self, other, alpha), self._per_leaf)
        scale = _host_scalar(other)
        if scale is not None:
            return TensorList(None, _Node(kind, self, scale, alpha), self._per_leaf)
        if isinstance(other, torch.Tensor) and other.ndim == 0 and other.is_floating_point():
            return TensorList(None, _Node(kind, self, other, alpha), self._per_leaf)
        return None

    def _unary(self, kind: str) -> TensorList:
        return TensorList(None, _Node(kind, self), self._per_leaf)

    def __add__(self, other: Operand) -> TensorList:
        lazy = self._binary("add", other, commutative=True)
        return (
            lazy
            if lazy is not None
            else _eager(torch._foreach_add(self.tensors, _operand(other)), self, other)
        )

    __radd__ = __add__

    def __sub__(self, other: Operand) -> TensorList:
        lazy = self._binary("add", other, alpha=-1.0)
        return (
            lazy
            if lazy is not None
            else _eager(torch._foreach_sub(self.tensors, _operand(other)), self, other)
        )

    def __rsub__(self, other: Operand) -> TensorList:
        return -self + other

    def __mul__(self, other: Operand) -> TensorList:
        lazy = self._binary("mul", other, commutative=True)
        return (
            lazy
            if lazy is not None
            else _eager(torch._foreach_mul(self.tensors, _operand(other)), self, other)
        )

    __rmul__ = __mul__

    def __truediv__(self, other: Operand) -> TensorList:
        lazy = self._binary("div", other)
        return (
            lazy
            if lazy is not None
            else _eager(torch._foreach_div(self.tensors, _operand(other)), self, other)
        )

    def __rtruediv__(self, other: Operand) -> TensorList:
        return self._unary("reciprocal") * other

    def __pow__(self, other: Operand) -> TensorList:
        lazy = self._binary("pow", other)
        return (
            lazy
            if lazy is not None
            else _eager(torch._foreach_pow(self.tensors, _operand(other)), self, other)
        )

    def __neg__(self) -> TensorList:
        return self._unary("neg")

    # ------------------------------------------------------------ comparisons and logic

    def _elementwise(self, other: Operand, op: Callable[[Any, Any], Any]) -> TensorList:
        if isinstance(other, TensorList):
            return _eager([op(a, b) for a, b in zip(self.tensors, other.tensors)], self, other)
        return _eager([op(a, other) for a in self.tensors], self)

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
        return _eager([torch.logical_not(t) for t in self.tensors], self)


def _eager(tensors: Sequence[torch.Tensor], *operands: Operand) -> TensorList:
    """An evaluated result; per-leaf (0-d per leaf) when every list operand is."""
    lists = [o for o in operands if isinstance(o, TensorList)]
    return TensorList(tensors, per_leaf=bool(lists) and all(o._per_leaf for o in lists))


def _operand(value: Operand) -> Any:
    if isinstance(value, TensorList):
        return value.tensors
    if isinstance(value, (torch.Tensor, numbers.Number)):
        return value
    raise TypeError(f"unsupported operand for a TensorList: {type(value).__name__}")


def _host_condition(value: Operand) -> bool | None:
    """A condition known on the host (a bool or a CPU 0-d tensor) as a bool, else None."""
    if isinstance(value, bool):
        return value
    if isinstance(value, torch.Tensor) and value.ndim == 0 and value.device.type == "cpu":
        return bool(value)
    return None


def _is_ones(x: TensorList) -> bool:
    node = x._node if x._tensors is None else None
    return node is not None and node.kind == "full" and node.other == 1


def _root(x: TensorList) -> TensorList:
    """The concrete list at the start of ``x``'s chain: same shapes, dtype and device."""
    while x._tensors is None:
        x = x._node.base
    return x


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


# ---------------------------------------------------------------- evaluation


def _lazy(value: Any) -> _Node | None:
    return value._node if isinstance(value, TensorList) and value._tensors is None else None


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """Whether two leaf-aligned lists hold the same tensors (a block's lists are aligned leaf by
    leaf, so they share either every tensor or none)."""
    return a[0] is b[0]


def _product(term: TensorList, alpha: float) -> tuple:
    """``alpha * term`` as the operands of a multiply-add kernel:
    ``("add", x, alpha)``, ``("addcmul", x, y, value)`` or ``("addcdiv", x, y, value)``."""
    node = _lazy(term)
    if node is None:
        return ("add", term, alpha)
    if node.kind == "mul" and isinstance(node.other, float):
        alpha, inner = alpha * node.other, node.base
        product = _lazy(inner)
        if product is not None and product.kind in ("mul", "div") and isinstance(product.other, TensorList):
            return ("addcmul" if product.kind == "mul" else "addcdiv", product.base, product.other, alpha)
        return ("add", inner, alpha)
    if node.kind in ("mul", "div") and isinstance(node.other, TensorList):
        return ("addcmul" if node.kind == "mul" else "addcdiv", node.base, node.other, alpha)
    return ("add", term, alpha)


def _is_product(term: Any) -> bool:
    if not isinstance(term, TensorList):
        return False
    form = _product(term, 1.0)
    return form[0] != "add" or form[1] is not term


def _reaches(value: Any, destination: list[torch.Tensor]) -> bool:
    """Whether ``value``'s in-place chain starts from ``destination`` itself."""
    while isinstance(value, TensorList):
        if value._tensors is not None:
            return _same(value._tensors, destination)
        node = value._node
        if node.kind == "add" and node.alpha == 1.0 and _reaches(node.other, destination):
            return True
        value = node.base
    return False


def _plan(node: _Node, destination: list[torch.Tensor] | None) -> tuple[TensorList, str, tuple, dict]:
    """(base, kernel, operands, keyword arguments) for one node: ``kernel(base, *operands)``."""
    base, other, kind = node.base, node.other, node.kind
    if kind != "add":
        if kind in _UNARY:
            return base, kind, (), {}
        return base, kind, (other,), {}
    if not isinstance(other, TensorList):  # a scalar
        if isinstance(other, float):
            return base, "add", (node.alpha * other,), {}
        return base, "add", (other,), {"alpha": node.alpha}
    if node.alpha == 1.0:
        # The base is the operand whose chain reaches the destination, or else the one that is
        # not a product, so that the other becomes the multiply-add's product.
        base_reaches = destination is not None and _reaches(base, destination)
        other_reaches = destination is not None and _reaches(other, destination)
        keeps_full_base = base._per_leaf or not other._per_leaf  # never a 0-d list as the base
        if (
            keeps_full_base
            and not base_reaches
            and (other_reaches or (_is_product(base) and not _is_product(other)))
        ):
            base, other = other, base
    term = _product(other, node.alpha)
    if term[0] == "add":
        return base, "add", (term[1],), {"alpha": term[2]}
    return base, term[0], (term[1], term[2]), {"value": term[3]}


def _evaluate(node: _Node, destination: list[torch.Tensor] | None) -> list[torch.Tensor]:
    """``node``'s value, written into ``destination`` (whose old values may be overwritten) or
    into fresh tensors. Operands are evaluated before the base is written, so they may read the
    destination's old values; intermediate results are not kept (a shared lazy operand is
    recomputed, always from unchanged inputs)."""
    if node.kind == "full":
        if destination is None:
            return [torch.full_like(t, node.other) for t in node.base.tensors]
        for d in destination:
            d.fill_(node.other)
        return destination
    base, kernel, operands, kwargs = _plan(node, destination)
    values = tuple(v.tensors if isinstance(v, TensorList) else v for v in operands)
    if kernel in ("mul", "div", "add") and isinstance(values[0], float):
        values = (_cpu_scalar(kernel, values[0], base),)
    if destination is not None and any(isinstance(v, list) and _same(v, destination) for v in values):
        result = _evaluate(node, None)  # an operand is the destination's old value
        _copy(destination, result)
        return destination
    base_node = _lazy(base)
    if destination is None and base_node is None:
        return getattr(torch, f"_foreach_{kernel}")(base.tensors, *values, **kwargs)
    if base_node is not None:
        target = _evaluate(base_node, destination)
    else:
        target = destination
        if not _same(base.tensors, destination):
            _copy(destination, base.tensors)
    getattr(torch, f"_foreach_{kernel}_")(target, *values, **kwargs)
    return target


def _cpu_scalar(kernel: str, value: float, like: TensorList) -> float | torch.Tensor | list[torch.Tensor]:
    """``value`` as the scalar operand of a CPU ``_foreach_{mul,div,add}``, in the form torch runs
    fastest on many small tensors: a 0-d tensor of ``like``'s dtype for a multiplication or
    division, the same 0-d tensor once per leaf for an addition. Measured on 600 tensors of 5k
    float32 elements: ``mul_`` 0.46 ms against 1.34 ms with a Python number, ``add_`` 0.52 ms
    against 1.33 ms (with a single 0-d tensor, also 1.33 ms). Only float32/float64 lists: the
    kernels meet a number in the list's dtype, so the results are identical; a 16-bit list
    would meet it in float32 and keeps the number.
    """
    first = like._any()
    if first.device.type != "cpu" or first.dtype not in (torch.float32, torch.float64):
        return value
    key = (value.hex(), first.dtype)  # (the exact value: -0.0 is not 0.0, and NaN is NaN)
    scalar = _SCALARS.get(key)
    if scalar is None:
        if len(_SCALARS) >= 64:  # (a schedule makes new values every step)
            _SCALARS.clear()
        # (on the list's device, whatever ``torch.set_default_device`` says)
        scalar = _SCALARS[key] = torch.tensor(value, dtype=first.dtype, device=first.device)
    return [scalar] * len(like) if kernel == "add" else scalar


# 0-d CPU tensors made by _cpu_scalar, by (float.hex(value), dtype): the kernels only read them,
# and making one costs more than a small kernel (a step on 600 leaves made eight of them)
_SCALARS: dict[tuple[str, torch.dtype], torch.Tensor] = {}


def _copy(destinations: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    if all(type(d) in _PLAIN_TENSORS for d in destinations):
        torch._foreach_copy_(destinations, values)
        return
    for destination, value in zip(destinations, values):  # tensor subclasses (FSDP's DTensor)
        destination.copy_(value)


def _reads(value: Any, destination: list[torch.Tensor], skip: TensorList) -> bool:
    """Whether evaluating ``value`` reads ``destination`` (not counting the subexpression
    ``skip``, which will be stored into it)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if item is skip or not isinstance(item, TensorList):
            continue
        if item._tensors is not None:
            if _same(item._tensors, destination):
                return True
            continue
        stack.append(item._node.base)
        stack.append(item._node.other)
    return False


def _contains(value: TensorList, part: TensorList) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if item is part:
            return True
        if isinstance(item, TensorList) and item._tensors is None:
            stack.append(item._node.base)
            stack.append(item._node.other)
    return False


def store(pairs: list[tuple[list[torch.Tensor], TensorList]]) -> None:
    """Write each value into its destination tensors, in place.

    Values that other values use are stored first (a new moment feeding the parameter update),
    and a value is written into its destination directly -- continuing the in-place chain that
    starts there -- only once no other pending value reads the destination's old contents.
    """
    pending = sorted(
        pairs, key=lambda pair: -sum(_contains(v, pair[1]) for _, v in pairs if v is not pair[1])
    )
    while pending:
        for index, (destination, value) in enumerate(pending):
            if not any(_reads(v, destination, value) for j, (_, v) in enumerate(pending) if j != index):
                break
        else:  # every destination is still read by another value (a cycle): take them all first
            for _, value in pending:
                if value._tensors is None:
                    value.tensors  # noqa: B018  (fresh tensors)
                elif any(_same(value._tensors, d) for d, _ in pending):
                    value._tensors = [t.clone() for t in value._tensors]
            index = 0
        destination, value = pending.pop(index)
        if value.dtype != destination[0].dtype:  # a converting copy: the value keeps its own
            _copy(destination, value.tensors)
            continue
        if value._tensors is not None:
            if not _same(value._tensors, destination):
                _copy(destination, value._tensors)
        else:
            _evaluate(value._node, destination)
        value._tensors, value._node = destination, None


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
        return x._unary("sqrt")

    @staticmethod
    def abs(x: TensorList) -> TensorList:
        return x._unary("abs")

    @staticmethod
    def sign(x: TensorList) -> TensorList:
        return x._unary("sign")

    @staticmethod
    def exp(x: TensorList) -> TensorList:
        return x._unary("exp")

    @staticmethod
    def maximum(a: Operand, b: Operand) -> TensorList:
        return TensorListNamespace._extremum("maximum", a, b, torch.maximum)

    @staticmethod
    def minimum(a: Operand, b: Operand) -> TensorList:
        return TensorListNamespace._extremum("minimum", a, b, torch.minimum)

    @staticmethod
    def _extremum(kind: str, a: Operand, b: Operand, op: Callable) -> TensorList:
        if isinstance(a, TensorList) and isinstance(b, TensorList):
            lazy = a._binary(kind, b, commutative=True)
            if lazy is not None:
                return lazy
        like = a if isinstance(a, TensorList) else b
        return _eager([op(x, y) for x, y in zip(_tensors(a, like), _tensors(b, like))], a, b)

    @staticmethod
    def where(condition: Operand, a: Operand, b: Operand) -> TensorList:
        choice = _host_condition(condition)
        if (
            choice is not None
            and isinstance(a, TensorList)
            and isinstance(b, TensorList)
            and (a.dtype, a._per_leaf) == (b.dtype, b._per_leaf)
        ):  # one condition for every element: pick an operand, lazily
            return a if choice else b
        like = next(v for v in (condition, a, b) if isinstance(v, TensorList))
        return _eager(
            [
                torch.where(c, x, y)
                for c, x, y in zip(_tensors(condition, like), _tensors(a, like), _tensors(b, like))
            ],
            condition,
            a,
            b,
        )

    @staticmethod
    def sum(x: TensorList) -> TensorList:
        """Per-leaf sums: a list of 0-d tensors, each broadcasting against its own leaf."""
        return TensorList([torch.sum(t) for t in x.tensors], per_leaf=True)

    @staticmethod
    def zeros_like(x: TensorList) -> TensorList:
        return TensorListNamespace.full_like(x, 0)

    @staticmethod
    def ones_like(x: TensorList) -> TensorList:
        return TensorListNamespace.full_like(x, 1)

    @staticmethod
    def full_like(x: TensorList, value: float) -> TensorList:
        """Lazy: only shapes are needed, so ``x`` itself is not evaluated (a ``where`` may not
        even pick this operand)."""
        return TensorList(None, _Node("full", _root(x), value), x._per_leaf)

    @staticmethod
    def astype(x: TensorList, dtype: torch.dtype) -> TensorList:
        return x if x.dtype == dtype else _eager([t.to(dtype) for t in x.tensors], x)

    @staticmethod
    def isfinite(x: TensorList) -> TensorList:
        return _eager([torch.isfinite(t) for t in x.tensors], x)


NAMESPACE = TensorListNamespace()
