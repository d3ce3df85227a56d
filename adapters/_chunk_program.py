"""One elementwise rule, recorded once per step and run chunk by chunk as NumPy ufunc calls.

The NumPy adapter cuts leaves into cache-sized chunks (:mod:`agnostic_optim.chunking`). Run
directly, the core's rule would execute once per chunk -- its Python once per chunk, a fresh
temporary for every operation and a copy for every result. Instead, :class:`ProgramBatching`
hands the core's *unchanged* rule symbolic operands (:class:`Symbol`), one per operand list
(params, grads, each buffer, over every chunk of a dtype group). The rule runs once per group
and its operations are recorded; :meth:`ProgramBatching.store` turns the recorded values into a
straight-line program of ufunc calls with ``out=``:

* every temporary lives in a small set of chunk-sized scratch buffers, kept between steps, and
  an operation whose operand dies with it overwrites that operand's buffer (so the step
  allocates nothing);
* each new value is written into its destination by the ufunc that computes it (no copy),
  once no later operation reads the destination's old contents; otherwise it waits in scratch
  and is copied in at the end (Adan's ``pre_grad``, read before it is replaced);
* the program then runs over every chunk, so all operations of a chunk hit data in cache;
* chunks are independent (each operation reads and writes the chunk's own slices), so a large
  program's chunks are split between threads, each with its own scratch buffers: NumPy
  releases the GIL inside every ufunc call.

Each recorded operation is the very ufunc the eager rule calls (``a * b`` is
``np.multiply(a, b)``), on operands of the same dtypes, so results are bitwise those of the
rule run on plain arrays. A rule that does anything this recorder does not model (a reduction,
Python control flow on array values, ``**``, a NumPy function called directly) fails while it
is recorded, before any array is written (:class:`Unsupported`, or the TypeError of an operand
that refuses a Symbol), and the adapter runs it directly instead. Casts are recorded like any
operation, so 16-bit leaves are converted to float32 a chunk at a time.
"""

from __future__ import annotations

import itertools
import numbers
import operator
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

Array = Any
# A program over fewer elements runs in the calling thread: handing chunks to another thread
# costs tens of microseconds, a 1M-element AdamW step about a millisecond.
PARALLEL_ELEMENTS = 1 << 20


class Unsupported(NotImplementedError):
    """The rule did something a recorded program cannot express; run it directly."""


class Symbol:
    """A value of the rule over every chunk of a group: an input list, a constant-filled
    array, or an operation of other symbols and constants (0-d arrays, Python numbers)."""

    __slots__ = ("args", "dtype", "op")
    __array_ufunc__ = None  # NumPy defers to the reflected operators below (``b1 * m``)

    def __init__(self, op: Any, args: tuple, dtype: np.dtype):
        self.op, self.args, self.dtype = op, args, np.dtype(dtype)

    def __array_namespace__(self, api_version: str | None = None) -> ProgramNamespace:
        return NAMESPACE

    @property
    def device(self) -> str:
        return "cpu"

    @property
    def shape(self) -> tuple:
        raise Unsupported("a recorded value has no single shape (it spans chunks of different sizes)")

    def __bool__(self) -> bool:
        raise Unsupported("the rule branches on array values")

    __hash__ = object.__hash__

    def __add__(self, other):
        return apply(np.add, self, other)

    def __radd__(self, other):
        return apply(np.add, other, self)

    def __sub__(self, other):
        return apply(np.subtract, self, other)

    def __rsub__(self, other):
        return apply(np.subtract, other, self)

    def __mul__(self, other):
        return apply(np.multiply, self, other)

    def __rmul__(self, other):
        return apply(np.multiply, other, self)

    def __truediv__(self, other):
        return apply(np.true_divide, self, other)

    def __rtruediv__(self, other):
        return apply(np.true_divide, other, self)

    def __neg__(self):
        return apply(np.negative, self)

    def __pow__(self, other):
        # ndarray.__pow__ swaps in square/sqrt/reciprocal for some exponents: not modelled
        raise Unsupported("** on arrays")

    __rpow__ = __pow__

    def __gt__(self, other):
        return apply(np.greater, self, other)

    def __lt__(self, other):
        return apply(np.less, self, other)

    def __ge__(self, other):
        return apply(np.greater_equal, self, other)

    def __le__(self, other):
        return apply(np.less_equal, self, other)

    def __eq__(self, other):  # type: ignore[override]
        return apply(np.equal, self, other)

    def __ne__(self, other):  # type: ignore[override]
        return apply(np.not_equal, self, other)

    def __and__(self, other):
        return apply(np.bitwise_and, self, other)

    def __or__(self, other):
        return apply(np.bitwise_or, self, other)

    def __rand__(self, other):
        return apply(np.bitwise_and, other, self)

    def __ror__(self, other):
        return apply(np.bitwise_or, other, self)

    def __xor__(self, other):
        return apply(np.bitwise_xor, self, other)

    def __rxor__(self, other):
        return apply(np.bitwise_xor, other, self)

    def __invert__(self):
        return apply(np.invert, self)

    def __abs__(self):
        return apply(np.absolute, self)

    def __pos__(self):
        return apply(np.positive, self)


def _constant(value: Any) -> Any:
    """``value`` as an operand of a recorded operation: numbers and 0-d arrays only."""
    if isinstance(value, Symbol | numbers.Number | np.generic):
        return value
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return value
    raise Unsupported(f"operand of type {type(value).__name__}")


def _probe(value: Any) -> Any:
    """A stand-in with ``value``'s type-promotion behaviour: an empty array for a symbol (a
    full-size array in the eager rule), the constant itself otherwise."""
    return np.empty(0, value.dtype) if isinstance(value, Symbol) else value


def apply(ufunc: np.ufunc, *args: Any) -> Any:
    """``ufunc(*args)`` recorded; computed now when no operand is a symbol (``xp.sqrt`` of a
    scalar), exactly as the eager rule computes it."""
    args = tuple(_constant(a) for a in args)
    if not any(isinstance(a, Symbol) for a in args):
        return ufunc(*args)
    return Symbol(ufunc, args, ufunc(*(_probe(a) for a in args)).dtype)


def _full(like: Symbol, value: Any, dtype: Any = None) -> Symbol:
    dtype = like.dtype if dtype is None else np.dtype(dtype)
    return Symbol("full", (np.asarray(value, dtype=dtype),), dtype)


class ProgramNamespace:
    """The array-API functions elementwise rules use, recorded on :class:`Symbol` operands."""

    float16, float32, float64 = np.float16, np.float32, np.float64
    int32, bool = np.int32, np.bool_

    @staticmethod
    def sqrt(x):
        return apply(np.sqrt, x)

    @staticmethod
    def abs(x):
        return apply(np.absolute, x)

    @staticmethod
    def sign(x):
        return apply(np.sign, x)

    @staticmethod
    def exp(x):
        return apply(np.exp, x)

    @staticmethod
    def maximum(a, b):
        return apply(np.maximum, a, b)

    @staticmethod
    def minimum(a, b):
        return apply(np.minimum, a, b)

    @staticmethod
    def isfinite(x):
        return apply(np.isfinite, x)

    @staticmethod
    def where(condition, a, b):
        a, b = _constant(a), _constant(b)
        dtype = np.where(np.empty(0, bool), _probe(a), _probe(b)).dtype
        if not isinstance(condition, Symbol):  # one condition for every element: pick now
            picked = a if bool(condition) else b
            if isinstance(picked, Symbol):
                return picked if picked.dtype == dtype else ProgramNamespace.astype(picked, dtype)
            return Symbol("full", (np.asarray(picked, dtype=dtype),), dtype)
        if condition.dtype != np.bool_:  # np.where takes any truth values; copyto needs bools
            condition = ProgramNamespace.astype(condition, np.bool_)
        return Symbol("select", (condition, a, b), dtype)

    @staticmethod
    def astype(x, dtype, /, *, copy: bool = True):
        if not isinstance(x, Symbol):
            raise Unsupported(f"astype of {type(x).__name__}")
        if x.dtype == np.dtype(dtype):
            return x  # a copy with equal values: nothing to record
        return Symbol("cast", (x,), dtype)

    @staticmethod
    def zeros_like(x, /, *, dtype=None, device=None):
        return _full(x, 0, dtype)

    @staticmethod
    def ones_like(x, /, *, dtype=None, device=None):
        return _full(x, 1, dtype)

    @staticmethod
    def full_like(x, /, fill_value, *, dtype=None, device=None):
        return _full(x, fill_value, dtype)

    def __getattr__(self, name: str) -> Any:
        raise Unsupported(f"xp.{name}")


NAMESPACE = ProgramNamespace()


# ---------------------------------------------------------------- instructions


def _copy(x: Array, out: Array) -> None:
    np.copyto(out, x, casting="unsafe")


def _select(condition: Array, a: Array, b: Array, out: Array) -> None:
    """``np.where(condition, a, b)`` into ``out`` (which may be ``b`` itself)."""
    if out is not b:
        np.copyto(out, b, casting="unsafe")
    np.copyto(out, a, where=condition, casting="unsafe")


def _maximum(a: Array, b: Array, out: Array) -> None:
    np.maximum(a, b, out=out)  # the two extrema deprecate a positional out


def _minimum(a: Array, b: Array, out: Array) -> None:
    np.minimum(a, b, out=out)


_FUNCTIONS: dict[Any, Callable] = {
    "cast": _copy,
    "copy": _copy,
    "select": _select,
    np.maximum: _maximum,
    np.minimum: _minimum,
}


class Program:
    """A straight-line list of ``function(*operands, out)`` calls (``out`` positional, as
    ufuncs take it) over a frame of slots:
    the group's input lists (one chunk of each per run), then scratch registers, then
    constants."""

    def __init__(self, inputs: list[list[Array]], registers: list[np.dtype], constants: list[Any], code):
        self.inputs, self.registers, self.constants, self.code = inputs, registers, constants, code
        self.sizes = [chunk.size for chunk in inputs[0]]

    def run(self, scratch: list[Scratch]) -> None:
        """Execute for every chunk, the chunks split into up to ``len(scratch)`` contiguous runs
        of about equal size, one per thread (the calling thread takes the first)."""
        chunks = list(zip(*self.inputs))
        total = sum(self.sizes)
        parts = min(len(scratch), max(1, total // PARALLEL_ELEMENTS), len(chunks))
        if parts == 1:
            self._run(chunks, scratch[0])
            return
        cuts, done, part = [0], 0, 1
        for i, size in enumerate(self.sizes):
            done += size
            if part < parts and done >= total * part / parts:
                cuts.append(i + 1)
                part += 1
        cuts.append(len(chunks))
        runs = [chunks[a:b] for a, b in itertools.pairwise(cuts) if b > a]
        # each thread runs under the caller's NumPy error state (per thread before NumPy 2)
        error_state = {**np.geterr(), "call": np.geterrcall()}
        futures = [
            _pool().submit(self._run_under, error_state, run, registers)
            for run, registers in zip(runs[1:], scratch[1:])
        ]
        try:
            self._run(runs[0], scratch[0])
        finally:
            errors = [future.exception() for future in futures]  # (waits for each)
        for error in errors:
            if error is not None:
                raise error

    def _run_under(
        self, error_state: dict[str, Any], chunks: list[tuple[Array, ...]], scratch: Scratch
    ) -> None:
        with np.errstate(**error_state):
            self._run(chunks, scratch)

    def _run(self, chunks: list[tuple[Array, ...]], scratch: Scratch) -> None:
        registers: dict[tuple, list[Array]] = {}  # chunk shape -> register views
        for chunk in chunks:
            shape = chunk[0].shape
            views = registers.get(shape)
            if views is None:
                views = registers[shape] = [scratch(d, shape, k) for k, d in enumerate(self.registers)]
            frame = [*chunk, *views, *self.constants]
            for function, arguments in self.code:
                function(*arguments(frame))


class Scratch:
    """One thread's scratch registers: chunk-shaped views of buffers kept between steps."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[np.dtype, int], np.ndarray] = {}
        self._views: dict[tuple[np.dtype, tuple, int], np.ndarray] = {}

    def __call__(self, dtype: np.dtype, shape: tuple, k: int) -> np.ndarray:
        view = self._views.get((dtype, shape, k))
        if view is None:
            size = int(np.prod(shape))
            buffer = self._buffers.get((dtype, k))
            if buffer is None or buffer.size < size:
                buffer = self._buffers[(dtype, k)] = np.empty(size, dtype)
                self._views = {key: v for key, v in self._views.items() if key[0] != dtype or key[2] != k}
            view = self._views[(dtype, shape, k)] = buffer[:size].reshape(shape)
        return view


def available_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    """The worker threads every program shares (started on first use)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max(1, available_cores() - 1), thread_name_prefix="agnostic_optim")
        return _POOL


def _forget_pool() -> None:
    """In a forked child: the parent's worker threads do not exist there (a new pool starts)."""
    global _POOL, _POOL_LOCK
    _POOL, _POOL_LOCK = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _operations(values: list[Symbol]) -> list[Symbol]:
    """The operations ``values`` need, each once, every operand before its users."""
    order: list[Symbol] = []
    seen: set[int] = set()

    def visit(symbol: Symbol) -> None:
        if id(symbol) in seen or symbol.op in ("input", "full"):
            return
        seen.add(id(symbol))
        for arg in symbol.args:
            if isinstance(arg, Symbol):
                visit(arg)
        order.append(symbol)

    for value in values:
        visit(value)
    return order


def compile_program(inputs: list[list[Array]], stores: list[tuple[int, Symbol]]) -> Program:
    """The program that writes each ``(input index, value)`` of ``stores`` into that input.

    Operations run in dependency order. A stored value is computed straight into its
    destination when no later operation reads the destination's old contents, else into a
    register that is copied in after everything else.
    """
    targets: dict[int, int] = {}  # id(operation) -> destination input
    values = []
    for destination, value in stores:
        if value.op == "input" and value.args[0] == destination:
            continue  # unchanged (a buffer the rule returns as it was)
        if value.dtype != inputs[destination][0].dtype:
            value = Symbol("cast", (value,), inputs[destination][0].dtype)
        elif value.op in ("input", "full") or id(value) in targets:
            value = Symbol("copy", (value,), value.dtype)
        targets[id(value)] = destination
        values.append(value)
    return _Allocator(inputs, _operations(values), targets).program()


def _is_operation(arg: Any) -> bool:
    return isinstance(arg, Symbol) and arg.op not in ("input", "full")


class _Allocator:
    """Assigns each operation an output slot. Slots are ``(kind, index)`` with kind "input",
    "register" or "constant".

    In order of preference, an operation writes into: its destination, when it is a stored
    value and the destination's old contents are read no more; the slot of an operand that dies
    with it; a destination whose old contents are read no more and whose stored value comes
    after this temporary's last use (AdamW's ``m * b1`` goes into ``m``, just before
    ``m * b1 + g * (1 - b1)`` does); a free register; a new register.
    """

    def __init__(self, inputs: list[list[Array]], order: list[Symbol], targets: dict[int, int]):
        self.inputs, self.order, self.targets = inputs, order, targets
        self.last_read: dict[int, int] = {}  # input index -> last position that reads it
        self.last_use: dict[int, int] = {}  # id(operation) -> last position that reads it
        self.stored_at: dict[int, int] = {}  # destination input -> position of its stored value
        for position, operation in enumerate(order):
            for arg in operation.args:
                if isinstance(arg, Symbol) and arg.op == "input":
                    self.last_read[arg.args[0]] = position
                elif _is_operation(arg):
                    self.last_use[id(arg)] = position
            if id(operation) in targets:
                self.stored_at[targets[id(operation)]] = position
        self.registers: list[np.dtype] = []
        self.free: dict[np.dtype, list[int]] = {}
        self.pinned: set[int] = set()  # registers holding a value until its deferred copy
        self.occupied: set[int] = set()  # destinations holding a temporary
        self.constants: list[Any] = []
        self.location: dict[int, tuple[str, int]] = {}

    def operand(self, arg: Any) -> tuple[str, int]:
        if isinstance(arg, Symbol) and arg.op == "input":
            return ("input", arg.args[0])
        if _is_operation(arg):
            return self.location[id(arg)]
        self.constants.append(arg.args[0] if isinstance(arg, Symbol) else arg)
        return ("constant", len(self.constants) - 1)

    def dies(self, arg: Any, slot: tuple[str, int], position: int) -> bool:
        """Whether ``arg`` is a temporary whose slot is free after the operation at ``position``
        (a stored value keeps its destination)."""
        if not _is_operation(arg) or self.last_use[id(arg)] != position:
            return False
        if slot[0] == "register":
            return slot[1] not in self.pinned
        return id(arg) not in self.targets

    def dtype_of(self, slot: tuple[str, int]) -> np.dtype:
        if slot[0] == "register":
            return self.registers[slot[1]]
        return self.inputs[slot[1]][0].dtype

    def holds(self, destination: int, position: int, operation: Symbol) -> bool:
        """Whether ``destination`` may hold ``operation``'s value as a temporary."""
        stored = self.stored_at[destination]
        return (
            self.dtype_of(("input", destination)) == operation.dtype
            and self.last_read.get(destination, -1) <= position < stored
            and self.last_use[id(operation)] <= stored
            and destination not in self.occupied
        )

    def output(self, position: int, operation: Symbol, operands: tuple) -> tuple[str, int]:
        # select writes b first: its output may be b's slot, never a's or the condition's
        writable = (2,) if operation.op == "select" else tuple(range(len(operands)))
        forbidden = {operands[j] for j in range(len(operands)) if j not in writable}
        destination = self.targets.get(id(operation))
        if destination is not None:
            slot = ("input", destination)
            if self.last_read.get(destination, -1) <= position and slot not in forbidden:
                return slot
            return self.register(operation.dtype)  # it waits in a register until the end
        for j in writable:
            slot = operands[j]
            if (
                slot not in forbidden
                and self.dies(operation.args[j], slot, position)
                and self.dtype_of(slot) == operation.dtype
                and (slot[0] == "register" or self.last_use[id(operation)] <= self.stored_at[slot[1]])
            ):
                return slot
        for candidate in self.stored_at:
            slot = ("input", candidate)
            if slot not in forbidden and self.holds(candidate, position, operation):
                return slot
        return self.register(operation.dtype)

    def register(self, dtype: np.dtype) -> tuple[str, int]:
        reusable = self.free.get(dtype)
        if reusable:
            return ("register", reusable.pop())
        self.registers.append(dtype)
        return ("register", len(self.registers) - 1)

    def release(self, slot: tuple[str, int]) -> None:
        if slot[0] == "input":
            self.occupied.discard(slot[1])
            return
        released = self.free.setdefault(self.registers[slot[1]], [])
        if slot[1] not in released:  # an operand used twice (g * g)
            released.append(slot[1])

    def program(self) -> Program:
        code, deferred = [], []
        for position, operation in enumerate(self.order):
            operands = tuple(self.operand(arg) for arg in operation.args)
            out = self.output(position, operation, operands)
            code.append((_FUNCTIONS.get(operation.op, operation.op), operands, out))
            for arg, slot in zip(operation.args, operands):
                if slot != out and self.dies(arg, slot, position):
                    self.release(slot)
            self.location[id(operation)] = out
            destination = self.targets.get(id(operation))
            if destination is not None and out[0] == "register":
                self.pinned.add(out[1])
                deferred.append((_copy, (out,), ("input", destination)))
            elif out[0] == "input" and destination is None:  # a temporary in a destination
                self.occupied.add(out[1])
            elif out[0] == "input":  # the stored value: the destination holds no temporary now
                self.occupied.discard(out[1])
        code.extend(deferred)
        base = {"input": 0, "register": len(self.inputs)}
        base["constant"] = base["register"] + len(self.registers)
        resolved = [
            (function, operator.itemgetter(*(base[k] + i for k, i in (*operands, out))))
            for function, operands, out in code
        ]
        return Program(self.inputs, self.registers, self.constants, resolved)


class ProgramBatching:
    """The :class:`agnostic_optim.engine.Batching` of the NumPy adapter's chunked steps.

    A step packs each group's operand lists into input symbols, the rule records its values,
    and :meth:`store` compiles them into a :class:`Program`; nothing is written until
    :meth:`run`, so a rule that turns out to be :class:`Unsupported` in any group leaves every
    array as it was. Scratch registers are kept between steps (a few chunks per dtype).
    """

    xp = NAMESPACE  # (a whole dtype group is one program; the chunks bound the cache use)

    def __init__(self, threads: int | None = None) -> None:
        self._inputs: list[list[Array]] = []
        self._programs: list[Program] = []
        self.threads = available_cores() if threads is None else threads
        if self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")
        self._scratch = [Scratch() for _ in range(self.threads)]

    def pack(self, arrays: list[Array]) -> Symbol:
        self._inputs.append(list(arrays))
        return Symbol("input", (len(self._inputs) - 1,), arrays[0].dtype)

    def store(self, pairs: list[tuple[list[Array], Symbol]]) -> None:
        stores = []
        for destinations, value in pairs:
            if not isinstance(value, Symbol):
                raise Unsupported(f"a stored value of type {type(value).__name__}")
            index = next((k for k, arrays in enumerate(self._inputs) if arrays[0] is destinations[0]), None)
            if index is None:  # not read by the rule (its operand was a converted copy)
                self._inputs.append(list(destinations))
                index = len(self._inputs) - 1
            stores.append((index, value))
        self._programs.append(compile_program(self._inputs, stores))
        self._inputs = []

    def run(self) -> None:
        """Execute the recorded programs (in the order their groups were stored)."""
        programs, self._programs = self._programs, []
        for program in programs:
            program.run(self._scratch)

    def discard(self) -> None:
        self._inputs, self._programs = [], []
