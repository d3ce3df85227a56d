"""Cache blocking for elementwise rules: cut leaves into flat chunks that share one step.

An elementwise rule (``Rule.elementwise``) computes every element from the same element of its
operands, so a leaf may be processed as independent pieces. Adapters that update arrays in
place cut params, grads and buffers into the same flat views of at most ``size`` elements and
process them a cache-sized block at a time: the ~10-20 array operations of one step then run
on data that stays in cache, and each array crosses memory about once per step instead of once
per operation. The pieces see exactly the operations the whole leaf would, so results are
bitwise those of the unchunked step.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

Array = Any


class ChunkLayout(NamedTuple):
    """How a step's leaves are cut: the param and buffer chunks (views into the arrays) and,
    per leaf, the ``(start, stop)`` spans its gradient is cut into (None: the leaf stays whole).

    The gradients are the only operand that changes from step to step, so an adapter may keep
    a layout while its params and buffers stay the same arrays and cut each step's gradients
    with :meth:`cut_grads`.
    """

    params: list[Array]
    buffers: dict[str, list[Array]]
    spans: list[list[tuple[int, int]] | None]

    def cut_grads(self, xp: Any, grads: list[Array]) -> list[Array]:
        out: list[Array] = []
        for grad, spans in zip(grads, self.spans):
            if spans is None:
                out.append(grad)
                continue
            flat = xp.reshape(grad, (-1,))
            out.extend(flat[a:b] for a, b in spans)
        return out


def chunk_layout(xp: Any, params: list[Array], buffers: dict[str, list[Array]], size: int) -> ChunkLayout:
    """Every param and buffer cut into the same flat chunks of at most ``size`` elements.

    A leaf is chunked only if its param and all its buffers have flat views (so writes through
    a chunk reach the array); otherwise, when it is already small, or with ``size <= 0``, it
    stays whole.
    """
    out_params: list[Array] = []
    out_buffers: dict[str, list[Array]] = {name: [] for name in buffers}
    all_spans: list[list[tuple[int, int]] | None] = []
    for i, param in enumerate(params):
        small = size <= 0 or math.prod(param.shape) <= size
        flats = None if small else flat_views(xp, [param, *(leaves[i] for leaves in buffers.values())])
        if flats is None:
            out_params.append(param)
            for name, leaves in buffers.items():
                out_buffers[name].append(leaves[i])
            all_spans.append(None)
            continue
        n = flats[0].shape[0]
        spans = [(k, min(k + size, n)) for k in range(0, n, size)]  # strict refuses slices past the end
        out_params.extend(flats[0][a:b] for a, b in spans)
        for name, flat in zip(buffers, flats[1:]):
            out_buffers[name].extend(flat[a:b] for a, b in spans)
        all_spans.append(spans)
    return ChunkLayout(out_params, out_buffers, all_spans)


def chunk_views(
    xp: Any, params: list[Array], grads: list[Array], buffers: dict[str, list[Array]], size: int
) -> tuple[list[Array], list[Array], dict[str, list[Array]]]:
    """Params, grads and buffers cut into the same flat chunks (see :func:`chunk_layout`)."""
    layout = chunk_layout(xp, params, buffers, size)
    return layout.params, layout.cut_grads(xp, grads), layout.buffers


def flat_views(xp: Any, arrays: list[Array]) -> list[Array] | None:
    """1-D views of ``arrays``, or None if one of them has none (non-contiguous)."""
    try:
        return [xp.reshape(a, (-1,), copy=False) for a in arrays]
    except (ValueError, TypeError, NotImplementedError, AttributeError, RuntimeError):
        return None
