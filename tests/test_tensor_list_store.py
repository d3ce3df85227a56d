"""``store`` and lazy evaluation of TensorList against an eager per-tensor reference.

:func:`store` writes several lazy values into their destinations in place, picking an order and
running in-place chains straight in a destination; every one of those shortcuts is an aliasing
hazard (a destination overwritten while another value still reads its old contents). A property
test builds random expression DAGs over a rule's operands (params ``p``, buffers ``m``, ``v``,
``u``, grad ``g``), stores 1-4 of them into distinct destinations that the expressions may read,
and compares with the same expressions evaluated eagerly on clones of the inputs. Fused kernels
round once where the expression rounds twice, so values are compared with a tolerance scaled by
a first-order error bound carried along the reference (``mag``): an aliasing bug is off by O(1).
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from hypothesis import assume, given, note, settings
from hypothesis import strategies as st

from agnostic_optim.adapters._tensor_list import NAMESPACE, TensorList, store

SHAPES = [(4,), (2, 3), (5,)]
NAMES = ("p", "m", "v", "u", "g")  # leaf node i is NAMES[i]
DESTINATIONS = ("p", "m", "v", "u")
POSITIVE = ("v", "u")  # abs() + 0.5: valid under sqrt, as a divisor, under fractional powers
OPS = [  # sampled uniformly: repeats weight the patterns the fused kernels handle
    *("add", "sub", "mul", "div", "maximum", "minimum", "radd", "rsub", "rmul", "rdiv"),
    *("neg", "abs", "sign", "sqrt", "exp", "pow", "wrap", "add", "sub", "mul"),
    *("scaled_sum", "addcmul", "addcdiv") * 3,
]
TOLERANCE = 1e-12  # relative to the error bound ``mag``: fused kernels differ by a few ulps only


# ---------------------------------------------------------------- random programs

# A program is plain data (so hypothesis prints and shrinks it): steps in SSA form over node
# indices (0-4 are the leaves p, m, v, u, g; step k defines node 5 + k), scalars as
# ``(kind, value)`` with kind "f" (Python float), "i" (Python int) or "t" (CPU 0-d float64 tensor).
#   ("wrap", name, fresh_list)      TensorList(lists[name]) or TensorList(list(lists[name]))
#   (op, a, b)                      op in add sub mul div maximum minimum (b: node or scalar)
#   (op, s, a)                      op in radd rsub rmul rdiv: ``s op a`` with a scalar s
#   (op, a)                         op in neg abs sign sqrt exp
#   ("pow", a, s)                   a ** s
# Besides single steps the generator emits the patterns the fused kernels absorb, in either order
# of the sum: ``a * s + b * t``, ``a +- b * c * s`` and ``a +- b / c * s``. Divisors, square roots
# and fractional powers only take values known positive without cancellation (``_positive``).


@dataclass
class Program:
    seed: int
    steps: list[tuple]
    outputs: list[tuple[str, int, bool]]  # (destination, node, pass a fresh list of its tensors)
    materialize: list[int] = field(default_factory=list)  # nodes whose .tensors is read first


FLOATS = st.one_of(
    st.sampled_from([1.0, -1.0, 0.9, 0.1, 0.5, 2.0, 1e-3, -0.25, 0.0, 0.999]),
    st.floats(-4.0, 4.0, allow_nan=False, allow_subnormal=False),
)


def scalars(nonzero: bool = False) -> st.SearchStrategy[tuple[str, float]]:
    """A scalar spec (a divisor's is ``nonzero``)."""
    ints, floats = st.integers(-3, 3), FLOATS
    if nonzero:
        ints, floats = ints.filter(bool), floats.filter(lambda x: abs(x) >= 1e-3)
    return st.one_of(
        st.tuples(st.just("f"), floats), st.tuples(st.just("t"), floats), st.tuples(st.just("i"), ints)
    )


def _is_scalar(arg: Any) -> bool:
    return isinstance(arg, tuple)


def _positive(step: tuple, positive: list[bool]) -> bool:
    """Whether a step's value is > 0 without cancellation (so a valid divisor, sqrt argument...)."""
    op = step[0]
    if op == "wrap":
        return step[1] in POSITIVE
    if op in ("sqrt", "exp"):
        return True
    if op in ("neg", "abs", "sign", "rsub"):
        return False
    if op == "pow":
        return positive[step[1]]
    if op in ("radd", "rmul", "rdiv"):
        scalar, a = step[1], step[2]
        return scalar[1] > 0 and (op == "rdiv" or positive[a])
    a, b = step[1], step[2]
    if op == "maximum":
        return positive[a] or positive[b]
    if op == "minimum":
        return positive[a] and positive[b]
    if _is_scalar(b):
        return positive[a] and (b[1] < 0 if op == "sub" else b[1] > 0)
    return positive[a] and positive[b] and op != "sub"


@st.composite
def programs(draw: st.DrawFn) -> Program:
    positive = [name in POSITIVE for name in NAMES]
    steps: list[tuple] = []

    def node(only_positive: bool = False) -> int:
        choices = [i for i, pos in enumerate(positive) if pos or not only_positive]
        recent = draw(st.booleans())  # bias towards recent nodes for deeper trees
        index = draw(st.integers(0, len(choices) - 1))
        return choices[-1 - index] if recent else choices[index]

    def emit(*new: tuple) -> None:
        for step in new:
            steps.append(step)
            positive.append(_positive(step, positive))

    def combine(base: int, term: int) -> tuple:  # base +- term, in either written order
        op = draw(st.sampled_from(["add", "sub"]))
        return (op, base, term) if draw(st.booleans()) else (op, term, base)

    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(OPS))
        k = len(positive)  # the index of the next node
        if op == "wrap":
            emit((op, draw(st.sampled_from(NAMES)), draw(st.booleans())))
        elif op == "scaled_sum":  # a * s + b * t: a moving average
            emit(("mul", node(), draw(scalars())), ("mul", node(), draw(scalars())), combine(k, k + 1))
        elif op == "addcmul":  # a +- b * c * s
            emit(("mul", node(), node()), ("mul", k, draw(scalars())), combine(node(), k + 1))
        elif op == "addcdiv":  # a +- b / c * s
            emit(
                ("div", node(), node(only_positive=True)), ("mul", k, draw(scalars())), combine(node(), k + 1)
            )
        elif op in ("add", "sub", "mul"):
            emit((op, node(), node() if draw(st.booleans()) else draw(scalars())))
        elif op == "div":
            emit(
                (op, node(), node(only_positive=True) if draw(st.booleans()) else draw(scalars(nonzero=True)))
            )
        elif op in ("maximum", "minimum"):
            emit((op, node(), node()))
        elif op in ("radd", "rsub", "rmul"):
            emit((op, draw(scalars()), node()))
        elif op == "rdiv":
            emit((op, draw(scalars()), node(only_positive=True)))
        elif op == "sqrt":
            emit((op, node(only_positive=True)))
        elif op == "pow":
            if draw(st.booleans()):  # any base: integral exponents only
                emit((op, node(), draw(st.sampled_from([("i", 2), ("f", 2.0), ("t", 3.0)]))))
            else:
                exponent = draw(st.sampled_from([0.5, -1.0, 1.5, -0.5, 2.0]))
                kind = draw(st.sampled_from("ft" if exponent != 2.0 else "fti"))
                emit((op, node(only_positive=True), (kind, int(exponent) if kind == "i" else exponent)))
        else:  # neg, abs, sign, exp
            emit((op, node()))

    count = len(positive)

    def output() -> int:
        if draw(st.integers(0, 3)) == 0:  # a leaf: a plain value that may be another destination
            return draw(st.integers(0, len(NAMES) - 1))
        return count - 1 - draw(st.integers(0, count - 1))

    destinations = draw(st.permutations(DESTINATIONS))[: draw(st.integers(1, 4))]
    outputs = [(name, output(), draw(st.booleans())) for name in destinations]
    materialize = draw(st.lists(st.integers(0, count - 1), max_size=3))
    return Program(draw(st.integers(0, 2**31)), steps, outputs, materialize)


# ---------------------------------------------------------------- the interpreter


def _scalar(spec: tuple[str, float]) -> Any:
    kind, value = spec
    if kind == "t":
        return torch.tensor(float(value), dtype=torch.float64)
    return int(value) if kind == "i" else float(value)


def _leafwise(fn, *args: Any) -> list[torch.Tensor]:
    """``fn`` per leaf, over per-leaf lists and scalars (repeated for every leaf)."""
    columns = [arg if isinstance(arg, list) else [arg] * len(SHAPES) for arg in args]
    return [fn(*row) for row in zip(*columns)]


@dataclass
class Node:
    value: TensorList
    ref: list[torch.Tensor]  # the eager value, from clones of the inputs
    mag: list[torch.Tensor]  # first-order error bound: |error| <~ few ulps * mag
    text: str
    leaf: bool


def _inputs(seed: int) -> dict[str, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    lists = {}
    for name in NAMES:
        tensors = [torch.randn(shape, generator=gen, dtype=torch.float64) for shape in SHAPES]
        lists[name] = [t.abs() + 0.5 for t in tensors] if name in POSITIVE else tensors
    return lists


BINARY = {
    "add": (operator.add, operator.add, "{} + {}"),
    "sub": (operator.sub, operator.sub, "{} - {}"),
    "mul": (operator.mul, operator.mul, "{} * {}"),
    "div": (operator.truediv, operator.truediv, "{} / {}"),
    "pow": (operator.pow, operator.pow, "{} ** {}"),
    "maximum": (NAMESPACE.maximum, torch.maximum, "maximum({}, {})"),
    "minimum": (NAMESPACE.minimum, torch.minimum, "minimum({}, {})"),
}
UNARY = {
    "neg": (operator.neg, torch.neg),
    **{name: (getattr(NAMESPACE, name), getattr(torch, name)) for name in ("abs", "sign", "sqrt", "exp")},
}


def _binary_bound(op: str, x: Any, xm: Any, y: Any, ym: Any) -> Any:
    """First-order error scale of ``op(x, y)`` from its operands' values and scales."""
    if op in ("add", "sub"):
        return xm + ym
    if op == "mul":
        return xm * ym
    if op == "div":
        return xm / abs(y) + abs(x) * ym / y**2
    if op == "pow":
        k = float(y)
        return abs(k) * abs(x) ** (k - 1) * xm + abs(x) ** k
    return torch.maximum(torch.as_tensor(xm), torch.as_tensor(ym))  # maximum, minimum


def _unary_bound(op: str, x: torch.Tensor, xm: torch.Tensor) -> torch.Tensor:
    if op == "sign":
        # sign is discontinuous: a rounding difference decides it near 0
        assume(bool(((x.abs() > 1e-8 * xm) | (xm == 0)).all()))
        return torch.zeros_like(x)
    if op == "sqrt":
        return xm / (2 * x.sqrt()) + x.sqrt()
    if op == "exp":
        return x.exp() * (xm + 1)
    return xm  # neg, abs


def _build(program: Program, lists: dict[str, list[torch.Tensor]]) -> list[Node]:
    """The program's nodes: lazy TensorLists over ``lists``, references over clones of them."""
    nodes = [
        Node(
            TensorList(lists[name]),
            [t.clone() for t in lists[name]],
            [t.abs() for t in lists[name]],
            name,
            True,
        )
        for name in NAMES
    ]

    def operand(arg: Any) -> tuple[Any, Any, Any, str]:
        """(lazy value, per-leaf reference, per-leaf error scale, text) of a node or a scalar."""
        if _is_scalar(arg):
            scalar = _scalar(arg)
            return scalar, scalar, abs(float(scalar)), f"{arg[0]}({arg[1]!r})"
        node = nodes[arg]
        return node.value, node.ref, node.mag, f"t{arg}"

    for step in program.steps:
        op = step[0]
        if op == "wrap":
            _, name, fresh = step
            source = nodes[NAMES.index(name)]
            value = TensorList(list(lists[name]) if fresh else lists[name])
            text = f"TensorList({'list(' + name + ')' if fresh else name})"
            nodes.append(Node(value, source.ref, source.mag, text, True))
            continue
        if op in UNARY:
            lazy, eager = UNARY[op]
            value, ref, mag, text = operand(step[1])
            value, text = lazy(value), f"{op}({text})"
            mag = [_unary_bound(op, r, m) for r, m in zip(ref, mag)]
            ref = [eager(r) for r in ref]
        else:
            base_op = op[1:] if op in ("radd", "rsub", "rmul", "rdiv") else op  # ``s op a``
            lazy, eager, template = BINARY[base_op]
            x, xr, xm, xt = operand(step[1])
            y, yr, ym, yt = operand(step[2])
            value, text = lazy(x, y), template.format(xt, yt)
            ref = _leafwise(eager, xr, yr)
            mag = _leafwise(lambda *args, op=base_op: _binary_bound(op, *args), xr, xm, yr, ym)
        assume(all(bool(torch.isfinite(r).all()) and float(m.max()) < 1e8 for r, m in zip(ref, mag)))
        nodes.append(Node(value, ref, mag, text, False))
    return nodes


def assert_close(actual: list[torch.Tensor], node: Node, what: str) -> None:
    for a, e, m in zip(actual, node.ref, node.mag, strict=True):
        assert a.shape == e.shape and a.dtype == e.dtype, what
        error = (a - e).abs()
        assert bool((error <= TOLERANCE * (m + 1)).all()), f"{what}: max error {float(error.max()):.3e}"


def _describe(program: Program, nodes: list[Node]) -> str:
    lines = ["# t0-t4: TensorList(p), TensorList(m), TensorList(v), TensorList(u), TensorList(g)"]
    lines += [f"t{i} = {node.text}" for i, node in enumerate(nodes) if i >= len(NAMES)]
    lines += [f"t{i}.tensors  # materialized first" for i in program.materialize]
    pairs = ", ".join(
        f"({name}{' [fresh list]' if fresh else ''}, t{i})" for name, i, fresh in program.outputs
    )
    return "\n".join([*lines, f"store([{pairs}])"])


@settings(max_examples=200, deadline=None)
@given(program=programs())
def test_store_matches_the_eager_reference(program: Program) -> None:
    lists = _inputs(program.seed)
    before = {name: [t.clone() for t in tensors] for name, tensors in lists.items()}
    objects = {name: [(t, t.data_ptr()) for t in tensors] for name, tensors in lists.items()}
    nodes = _build(program, lists)
    note(_describe(program, nodes))

    for i in program.materialize:  # lazy evaluation alone: right values, inputs untouched
        assert_close(nodes[i].value.tensors, nodes[i], f"t{i}.tensors")
    for name in NAMES:
        assert all(torch.equal(t, b) for t, b in zip(lists[name], before[name])), f"{name} modified"

    store(
        [(list(lists[name]) if fresh else lists[name], nodes[i].value) for name, i, fresh in program.outputs]
    )

    for name, i, _ in program.outputs:
        assert_close(lists[name], nodes[i], f"{name} <- t{i}")
        assert_close(nodes[i].value.tensors, nodes[i], f"t{i} (stored into {name}) read back")
    stored = {name for name, _, _ in program.outputs}
    for name in NAMES:
        assert [(t, t.data_ptr()) for t in lists[name]] == objects[name], f"{name} not written in place"
        if name not in stored:
            assert all(torch.equal(t, b) for t, b in zip(lists[name], before[name])), f"{name} modified"
    for i in program.materialize:  # an evaluated intermediate keeps its value
        if not nodes[i].leaf:
            assert_close(nodes[i].value.tensors, nodes[i], f"materialized t{i} after store")


# ---------------------------------------------------------------- deterministic regressions


def _close(actual: list[torch.Tensor], expected: list[torch.Tensor], what: str = "") -> None:
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12, msg=lambda message: f"{what}: {message}")


def test_adam_stores_moments_first_and_updates_the_param_without_copies(calls) -> None:
    lists = _inputs(0)
    p, m, v, g = (lists[k] for k in "pmvg")
    p0, m0, v0, g0 = ([t.clone() for t in x] for x in (p, m, v, g))
    b1, b2 = torch.tensor(0.9, dtype=torch.float64), torch.tensor(0.999, dtype=torch.float64)
    lr, eps, c, bc2 = 1e-3, 1e-8, 0.99, torch.tensor(0.3, dtype=torch.float64)
    P, M, V, G = (TensorList(x) for x in (p, m, v, g))
    m_new = M * b1 + G * (1 - b1)
    v_new = V * b2 + G * G * (1 - b2)
    update = P * c - m_new / (NAMESPACE.sqrt(v_new) / bc2 + eps) * lr
    store([(p, update), (m, m_new), (v, v_new)])

    m_ref = [a * b1 + d * (1 - b1) for a, d in zip(m0, g0)]
    v_ref = [a * b2 + d * d * (1 - b2) for a, d in zip(v0, g0)]
    p_ref = [x * c - a / (b.sqrt() / bc2 + eps) * lr for x, a, b in zip(p0, m_ref, v_ref)]
    _close(m, m_ref, "m")
    _close(v, v_ref, "v")
    _close(p, p_ref, "p")
    assert calls["_foreach_copy_"] == 0, calls


@pytest.mark.parametrize("param_first", [True, False])
def test_lion_param_update_reads_the_old_moment(calls, param_first: bool) -> None:
    lists = _inputs(1)
    p, m, g = (lists[k] for k in "pmg")
    p0, m0, g0 = ([t.clone() for t in x] for x in (p, m, g))
    b1, b2, lr, c = 0.9, 0.99, 1e-2, 0.999
    P, M, G = (TensorList(x) for x in (p, m, g))
    update = P * c - NAMESPACE.sign(M * b1 + G * (1 - b1)) * lr
    m_new = M * b2 + G * (1 - b2)
    pairs = [(p, update), (m, m_new)]
    store(pairs if param_first else pairs[::-1])

    _close(p, [x * c - torch.sign(a * b1 + d * (1 - b1)) * lr for x, a, d in zip(p0, m0, g0)], "p")
    _close(m, [a * b2 + d * (1 - b2) for a, d in zip(m0, g0)], "m")
    assert calls["_foreach_copy_"] == 0, calls


def test_moving_average_written_as_grad_first_runs_in_place(calls) -> None:
    lists = _inputs(2)
    m, g = lists["m"], lists["g"]
    m0, g0 = [t.clone() for t in m], [t.clone() for t in g]
    ptrs = [t.data_ptr() for t in m]
    store([(m, TensorList(g) * 0.1 + TensorList(m) * 0.9)])
    _close(m, [d * 0.1 + a * 0.9 for a, d in zip(m0, g0)])
    assert [t.data_ptr() for t in m] == ptrs
    assert all(torch.equal(a, b) for a, b in zip(g, g0))
    assert calls == Counter({"_foreach_mul_": 1, "_foreach_add_": 1})  # m.mul_(0.9).add_(g, alpha=0.1)


CYCLES = {  # name: (the pairs from TensorLists P, M, V; the expected p, m, v from old p, m, v)
    # each value reads another destination's old contents
    "lazy p<-m+1, m<-p+1": (
        lambda P, M, V: [("p", M + 1.0), ("m", P + 1.0)],
        lambda p, m, v: (m + 1, p + 1, v),
    ),
    "lazy m<-p+1, p<-m+1": (
        lambda P, M, V: [("m", P + 1.0), ("p", M + 1.0)],
        lambda p, m, v: (m + 1, p + 1, v),
    ),
    "p<-m*2, m<-p+m": (lambda P, M, V: [("p", M * 2.0), ("m", P + M)], lambda p, m, v: (m * 2, p + m, v)),
    "lazy rotation p<-m*2, m<-v*2, v<-p*p": (
        lambda P, M, V: [("p", M * 2.0), ("m", V * 2.0), ("v", P * P)],
        lambda p, m, v: (m * 2, v * 2, p * p),
    ),
    # a plain (already evaluated) value that is another destination's old contents
    "p<-m, m<-p (swap)": (lambda P, M, V: [("p", M), ("m", P)], lambda p, m, v: (m, p, v)),
    "m<-p+1, p<-m": (lambda P, M, V: [("m", P + 1.0), ("p", M)], lambda p, m, v: (m, p + 1, v)),
    "p<-m, m<-p+1": (lambda P, M, V: [("p", M), ("m", P + 1.0)], lambda p, m, v: (m, p + 1, v)),
    "rotation p<-m, m<-v, v<-p": (
        lambda P, M, V: [("p", M), ("m", V), ("v", P)],
        lambda p, m, v: (m, v, p),
    ),
}


@pytest.mark.parametrize("case", list(CYCLES))
def test_values_reading_each_others_destination(case: str) -> None:
    lists = _inputs(3)
    before = {name: [t.clone() for t in lists[name]] for name in "pmv"}
    pairs, reference = CYCLES[case]
    store([(lists[name], value) for name, value in pairs(*(TensorList(lists[name]) for name in "pmv"))])
    expected = [reference(*leaf) for leaf in zip(*before.values())]
    for k, name in enumerate("pmv"):
        _close(lists[name], [e[k] for e in expected], f"{case}: {name}")
