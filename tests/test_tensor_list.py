"""The torch adapter's TensorList: array-API arithmetic over a list of tensors, with products
absorbed into torch's fused multiply-add foreach kernels (``_foreach_add(alpha=)``,
``_foreach_addcmul``, ``_foreach_addcdiv``) -- same values as the per-tensor expression up to
the rounding a fused kernel saves."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from agnostic_optim.adapters._tensor_list import NAMESPACE, TensorList

SHAPES = [(5, 3), (7,), (), (2, 2, 2)]


@pytest.fixture
def lists() -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    make = lambda: [torch.randn(s, generator=gen) for s in SHAPES]  # noqa: E731
    return make(), make(), [t.abs() + 0.5 for t in make()]


def close(actual: TensorList, expected: list[torch.Tensor], ulps: float = 4) -> None:
    for a, e in zip(actual.tensors, expected, strict=True):
        assert a.shape == e.shape and a.dtype == e.dtype
        tolerance = ulps * torch.finfo(e.dtype).eps * (e.abs() + 1)
        assert torch.all((a - e).abs() <= tolerance), f"max diff {(a - e).abs().max():.3e}"


def test_moving_average_runs_as_multiply_then_fused_add(lists, calls) -> None:
    m, g, _ = lists
    b1, omb1 = torch.tensor(0.9), torch.tensor(0.1)
    out = TensorList(m) * b1 + TensorList(g) * omb1
    close(out, [x * b1 + y * omb1 for x, y in zip(m, g)])
    assert calls == Counter({"_foreach_mul": 1, "_foreach_add_": 1})


def test_square_average_uses_addcmul(lists, calls) -> None:
    v, g, _ = lists
    out = TensorList(v) * 0.999 + TensorList(g) * TensorList(g) * 0.001
    close(out, [x * 0.999 + y * y * 0.001 for x, y in zip(v, g)])
    assert calls == Counter({"_foreach_mul": 1, "_foreach_addcmul_": 1})


def test_adam_step_uses_addcdiv(lists, calls) -> None:
    p, m, d = lists
    out = TensorList(p) - TensorList(m) / TensorList(d) * torch.tensor(1e-3)
    close(out, [x - y / z * 1e-3 for x, y, z in zip(p, m, d)])
    assert calls == Counter({"_foreach_addcdiv": 1})


def test_plain_minus_scaled_is_one_kernel(lists, calls) -> None:
    p, b, _ = lists
    out = TensorList(p) - TensorList(b) * 0.1
    close(out, [x - y * 0.1 for x, y in zip(p, b)])
    assert calls == Counter({"_foreach_add": 1})


def test_inputs_are_not_modified(lists) -> None:
    p, m, d = lists
    before = [[t.clone() for t in group] for group in lists]
    _ = TensorList(p) * 0.5 + TensorList(m) * TensorList(d) * 2.0
    _ = TensorList(p) * 0.5 - TensorList(m) / TensorList(d) * 2.0
    for group, saved in zip(lists, before):
        for t, s in zip(group, saved):
            assert torch.equal(t, s)


def test_pending_products_round_like_the_expression(lists) -> None:
    """A product that is not absorbed is evaluated with the expression's own roundings: bitwise."""
    x, y, z = lists
    s, t = torch.tensor(0.3), torch.tensor(1.7)
    cases = {
        "chained scales": (TensorList(x) * s * t, [a * s * t for a in x]),
        "scaled product": (TensorList(x) * TensorList(y) * s, [a * b * s for a, b in zip(x, y)]),
        "scaled quotient": (TensorList(x) / TensorList(z) * s, [a / c * s for a, c in zip(x, z)]),
        "sqrt of scaled": (
            NAMESPACE.sqrt(TensorList(z) * s),
            [(c * s).sqrt() for c in z],
        ),
    }
    for name, (actual, expected) in cases.items():
        for a, e in zip(actual.tensors, expected):
            assert torch.equal(a, e), name


def test_a_lazy_value_used_twice_is_evaluated_once_and_consistently(lists, calls) -> None:
    x, y, _ = lists
    scaled = TensorList(x) * 0.5
    second = scaled * 3.0
    close(scaled, [a * 0.5 for a in x], ulps=0)  # materialises ``scaled``
    first = scaled + TensorList(y)
    close(first, [a * 0.5 + b for a, b in zip(x, y)], ulps=0)
    close(second, [a * 0.5 * 3.0 for a in x], ulps=0)  # rounded twice, as the expression is
    assert calls == Counter({"_foreach_mul": 2, "_foreach_add": 1})  # ``scaled`` is computed once


def test_a_chain_runs_in_place_on_one_buffer(lists, calls) -> None:
    _, _, v = lists
    denominator = NAMESPACE.sqrt(TensorList(v)) / 1.25 + 1e-3
    close(denominator, [c.sqrt() / 1.25 + 1e-3 for c in v], ulps=0)
    assert calls == Counter({"_foreach_sqrt": 1, "_foreach_div_": 1, "_foreach_add_": 1})


def test_integer_and_tensorlist_scales_are_not_absorbed(lists) -> None:
    x, y, _ = lists
    counts = TensorList([torch.arange(4)]) * 2
    assert counts.dtype == torch.int64 and torch.equal(counts.tensors[0], torch.arange(4) * 2)
    per_leaf = TensorList([torch.tensor(2.0) for _ in x])  # 0-d per-leaf scales (trust ratios)
    close(TensorList(y) + TensorList(x) * per_leaf, [b + a * 2.0 for a, b in zip(x, y)])


def test_where_with_a_host_condition_picks_an_operand_without_evaluating_the_other(lists, calls) -> None:
    x, y, _ = lists
    scaled = TensorList(x) * 2.0
    for condition in (torch.tensor(True), torch.tensor(1.0) > 0, True):
        picked = NAMESPACE.where(condition, scaled, NAMESPACE.ones_like(scaled))
        assert picked is scaled
    unrectified = NAMESPACE.where(torch.tensor(False), scaled, NAMESPACE.ones_like(scaled))
    assert calls == Counter()  # nothing evaluated yet: ``ones_like`` only needs shapes
    close(TensorList(y) * unrectified, y, ulps=0)  # y * 1 is y itself: no kernel, no ones
    assert calls == Counter()
    filled = NAMESPACE.full_like(TensorList(x) + TensorList(y), 0.25)
    for t, like in zip(filled.tensors, x):
        assert t.shape == like.shape and t.dtype == like.dtype and torch.all(t == 0.25)
    per_element = NAMESPACE.where(TensorList(x) > 0, TensorList(x), NAMESPACE.zeros_like(TensorList(x)))
    close(per_element, [torch.where(a > 0, a, torch.zeros_like(a)) for a in x], ulps=0)


def test_per_leaf_scalars_never_become_the_base_of_a_full_size_chain(lists) -> None:
    """A per-leaf reduction (one 0-d tensor per leaf) broadcasts against its leaf whichever side
    of the operation it is on, and through eager results (comparisons, ``where``) too."""
    x, _, z = lists
    norms = NAMESPACE.sum(TensorList(z))
    expected = [a * a + c.sum().sqrt() for a, c in zip(x, z)]
    close(TensorList(x) * TensorList(x) + NAMESPACE.sqrt(NAMESPACE.sum(TensorList(z))), expected)
    close(
        -NAMESPACE.sum(TensorList(z)) + TensorList(x) * TensorList(x), [a * a - c.sum() for a, c in zip(x, z)]
    )
    ratio = NAMESPACE.where(norms > 0, norms, NAMESPACE.ones_like(norms))
    close((ratio * 2.0) * TensorList(x), [c.sum() * 2.0 * a for a, c in zip(x, z)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_scalar_operands_round_like_a_python_number(lists, dtype) -> None:
    """On CPU a scalar multiplication, division or addition passes the scalar to the kernel as a
    0-d tensor of the list's dtype (once per leaf for an addition), which is faster on small
    tensors; the results stay bitwise those of the per-tensor expression with the Python number
    (16-bit lists keep the number). Scalars that float32 cannot hold exactly, given as numbers
    and as 0-d float64 tensors, twice (the second time from the cache of 0-d tensors)."""
    x = [t.to(dtype) for t in lists[0]]
    for _ in range(2):
        for scalar in (1e-8, 0.3, 1 / 3):
            for given in (scalar, torch.tensor(scalar, dtype=torch.float64)):
                cases = {
                    "add": (TensorList(x) + given, [t + scalar for t in x]),
                    "sqrt add": (
                        NAMESPACE.sqrt(NAMESPACE.abs(TensorList(x))) + given,
                        [t.abs().sqrt() + scalar for t in x],
                    ),
                    "mul": (TensorList(x) * given, [t * scalar for t in x]),
                    "div": (TensorList(x) / given, [t / scalar for t in x]),
                }
                for name, (actual, expected) in cases.items():
                    for a, e in zip(actual.tensors, expected, strict=True):
                        assert a.dtype == dtype and torch.equal(a, e), (name, scalar, type(given))


def _same_bits(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """Equal values, NaNs in the same places and zeros and infinities of the same sign."""
    close = torch.isclose(actual, expected, rtol=0, atol=0, equal_nan=True)
    return bool(close.all()) and torch.equal(torch.signbit(actual), torch.signbit(expected))


def test_scalar_operands_keep_the_sign_of_zero_and_ignore_the_default_device() -> None:
    """The 0-d tensors made for scalar operands are cached by exact value (``-0.0`` is not
    ``0.0``: ``x * -0.0``, ``x / -0.0`` and ``x - 0.0`` keep their signs) and made on the list's
    device even under another default device (a cached meta tensor would corrupt every later
    step on CPU)."""
    x = torch.tensor([1.0, -0.0, 2.0, 0.0, -3.0])
    for scalar in (0.0, -0.0, 0.0, float("inf"), float("-inf"), float("nan")):
        for default in ("cpu", "meta", "cpu"):
            with torch.device(default):
                cases = {
                    "mul": (TensorList([x]) * scalar, x * scalar),
                    "div": (TensorList([x]) / scalar, x / scalar),
                    "add": (TensorList([x]) + scalar, x + scalar),
                    "sub": (TensorList([x]) - scalar, x - scalar),
                }
                for name, (actual, expected) in cases.items():
                    assert _same_bits(actual.tensors[0], expected), (name, scalar, default)
