"""Recorded NumPy programs (``adapters/_chunk_program.py``) against eager NumPy, bitwise.

A recorded program writes values straight into destinations, keeps temporaries in
destinations whose old contents are dead and in reused registers, and defers a store whose
destination is still read: each shortcut is an aliasing hazard. A property test builds random
expression DAGs over a rule's operands (params ``p``, buffers ``m``, ``v``, ``u``, grad ``g``),
stores 1-4 of them into distinct destinations that the expressions may read, and compares
every array afterwards with the same expressions evaluated by eager NumPy on copies (values
first, then ``dest[...] = value``). Every recorded operation is the ufunc the eager expression
calls, so the comparison is exact.
"""

from __future__ import annotations

import operator
import tracemalloc

import array_api_compat.numpy as eager_xp
import numpy as np
import pytest
from hypothesis import example, given, note, settings
from hypothesis import strategies as st

import agnostic_optim as ao
from agnostic_optim import engine
from agnostic_optim.adapters import _chunk_program
from agnostic_optim.adapters.numpy import ArrayOptimizer

NAMES = ("p", "m", "v", "u", "g")  # node i < 5 is NAMES[i]
DESTINATIONS = ("p", "m", "v", "u")
SIZES = (11, 4, 1)  # three leaves, cut into chunks of at most CHUNK elements
CHUNK = 4
BINARY = ("add", "sub", "mul", "div", "maximum", "minimum")
ARITHMETIC = {"add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.truediv}
UNARY = ("neg", "abs", "sign", "sqrt_abs", "exp_tanh", "to_float32", "to_float64")
SCALARS = st.one_of(
    st.floats(-3, 3, allow_nan=False, allow_subnormal=False),  # a Python float (weak)
    st.builds(lambda x: np.asarray(x, np.float64), st.floats(-3, 3, allow_nan=False, allow_subnormal=False)),
    st.builds(lambda x: np.asarray(x, np.float32), st.floats(-3, 3, allow_nan=False, allow_subnormal=False)),
    st.integers(-3, 3),
)


@st.composite
def programs(draw: st.DrawFn) -> tuple[list[tuple], list[tuple[str, int]]]:
    """Steps in SSA form (step k defines node 5 + k) and ``(destination, node)`` stores."""
    steps: list[tuple] = []

    def node() -> int:
        count = len(NAMES) + len(steps)
        recent = draw(st.booleans())  # bias towards recent nodes for deeper trees
        index = draw(st.integers(0, count - 1))
        return count - 1 - index if recent else index

    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["binary", "scalar", "rscalar", "unary", "where", "full", "pick"]))
        if kind == "binary":
            steps.append((draw(st.sampled_from(BINARY)), node(), node()))
        elif kind in ("scalar", "rscalar"):
            op = draw(st.sampled_from(("add", "sub", "mul", "div")))
            steps.append((kind, op, node(), draw(SCALARS)))
        elif kind == "unary":
            steps.append((draw(st.sampled_from(UNARY)), node()))
        elif kind == "where":
            comparison = draw(st.sampled_from((">", "<", ">=", "<=")))
            steps.append(("where", comparison, node(), node(), node(), node()))
        elif kind == "full":
            steps.append(("full", node(), draw(st.sampled_from([0.0, 1.0, -2.5]))))
        else:  # where with one condition for every element (a 0-d bool)
            steps.append(("pick", draw(st.booleans()), node(), node()))
    count = len(NAMES) + len(steps)
    destinations = draw(st.permutations(DESTINATIONS))[: draw(st.integers(1, 4))]
    stores = [(name, draw(st.integers(0, count - 1))) for name in destinations]
    return steps, stores


def evaluate(xp, steps: list[tuple], leaves: list) -> list:
    """The program's nodes, written once against the array API (as the core's rules are)."""
    nodes = list(leaves)
    for step in steps:
        op = step[0]
        if op in BINARY:
            a, b = nodes[step[1]], nodes[step[2]]
            if op == "div":
                b = xp.abs(b) + 0.5
            value = {**ARITHMETIC, "maximum": xp.maximum, "minimum": xp.minimum}[op](a, b)
        elif op in ("scalar", "rscalar"):
            _, kind, index, s = step
            a = nodes[index]
            if kind == "div":
                if op == "rscalar":
                    a = xp.abs(a) + 0.5
                else:
                    s = abs(s) + 0.5
            x, y = (a, s) if op == "scalar" else (s, a)
            value = ARITHMETIC[kind](x, y)
        elif op == "neg":
            value = -nodes[step[1]]
        elif op == "abs":
            value = xp.abs(nodes[step[1]])
        elif op == "sign":
            value = xp.sign(nodes[step[1]])
        elif op == "sqrt_abs":
            value = xp.sqrt(xp.abs(nodes[step[1]]))
        elif op == "exp_tanh":  # exp of a bounded value: no overflow
            a = nodes[step[1]]
            value = xp.exp(xp.minimum(xp.maximum(a, xp.full_like(a, -3.0)), xp.full_like(a, 3.0)))
        elif op in ("to_float32", "to_float64"):
            value = xp.astype(nodes[step[1]], xp.float32 if op == "to_float32" else xp.float64)
        elif op == "where":
            _, comparison, a, b, x, y = step
            a, b = nodes[a], nodes[b]
            condition = {">": a > b, "<": a < b, ">=": a >= b, "<=": a <= b}[comparison]
            value = xp.where(condition, nodes[x], nodes[y])
        elif op == "full":
            value = xp.full_like(nodes[step[1]], step[2])
        else:
            value = xp.where(np.asarray(step[1]), nodes[step[2]], nodes[step[3]])
        nodes.append(value)
    return nodes


def make_leaves(seed: int) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {name: [rng.standard_normal(n) for n in SIZES] for name in NAMES}


def chunks(arrays: list[np.ndarray]) -> list[np.ndarray]:
    return [a[k : k + CHUNK] for a in arrays for k in range(0, a.shape[0], CHUNK)]


@settings(max_examples=400, deadline=None)
@given(program=programs(), seed=st.integers(0, 2**31))
@example(  # a temporary in p's slot hands it on to one that outlives p's new value
    program=(
        [
            ("scalar", "mul", 0, 2.0),
            ("scalar", "add", 5, 1.0),
            ("scalar", "mul", 6, 3.0),
            ("scalar", "sub", 6, 1.0),
        ],
        [("p", 7), ("m", 8)],
    ),
    seed=0,
)
def test_recorded_stores_match_eager_numpy(program, seed) -> None:
    steps, stores = program
    note(f"steps={steps}\nstores={stores}")
    expected = make_leaves(seed)
    with np.errstate(all="ignore"):
        for i in range(len(SIZES)):
            nodes = evaluate(eager_xp, steps, [expected[name][i] for name in NAMES])
            values = [np.array(nodes[index], copy=True) for _, index in stores]  # all read first
            for (name, _), value in zip(stores, values):
                expected[name][i][...] = value

    actual = make_leaves(seed)
    views = {name: chunks(actual[name]) for name in NAMES}  # a destination is its operand's views
    batching = _chunk_program.ProgramBatching()
    symbols = [batching.pack(views[name]) for name in NAMES]
    nodes = evaluate(batching.xp, steps, symbols)
    batching.store([(views[name], nodes[index]) for name, index in stores])
    with np.errstate(all="ignore"):
        batching.run()
    for name in NAMES:
        for i, (a, e) in enumerate(zip(actual[name], expected[name])):
            assert a.dtype == e.dtype
            assert np.array_equal(a, e, equal_nan=True), f"{name}[{i}]: {a} != {e}"


# ---------------------------------------------------------------- through ArrayOptimizer

ELEMENTWISE = [name for name, entry in ao.registry().items() if entry.factory().rule.elementwise]


def big_problem(n: int = 50_000):
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal(n).astype(np.float32), "b": rng.standard_normal(7).astype(np.float32)}
    grads = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
    return params, grads


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_every_elementwise_optimizer_records_and_allocates_nothing(name) -> None:
    """The recorded path is taken (no silent fallback) and a step after the first allocates
    no array: temporaries live in scratch kept from the first step (tracemalloc sees NumPy's
    buffers). The bitwise agreement with the functional API is tested in
    test_numpy_adapter.py for every optimizer."""
    chunk = 1 << 16
    params, grads = big_problem(5 * chunk)
    opt = ArrayOptimizer(params, ao.registry()[name].factory(), chunk_elements=chunk)
    opt.step(grads)
    assert opt.recorded
    tracemalloc.start()
    try:
        opt.step(grads)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert opt.recorded
    # the step's Python objects (symbols, the program, 0-d scalars) are ~20 kB; a chunk is 256 kB
    assert peak < 4 * chunk / 2, f"{name}: a recorded step allocated {peak} bytes"


def test_adamw_program_is_one_ufunc_per_operation_and_one_scratch_register() -> None:
    """AdamW's 14 operations run as 14 ufunc calls: every stored value is computed in its
    destination (no copies), and the temporaries share one chunk-sized register."""
    params, grads = big_problem()
    opt = ArrayOptimizer(params, ao.adamw(lr=1e-3, weight_decay=0.1), chunk_elements=4096)
    recorded = []
    run = _chunk_program.Program.run
    _chunk_program.Program.run = lambda self, scratch: (recorded.append(self), run(self, scratch))
    try:
        opt.step(grads)
    finally:
        _chunk_program.Program.run = run
    (program,) = recorded
    assert [getattr(f, "__name__", "") for f, _ in program.code].count("_copy") == 0
    assert len(program.code) == 14
    assert len(program.registers) == 1


def _rule(update) -> engine.Optimizer:
    return engine.build(engine.Rule(name="custom", hparams={"lr": 0.1}, update=update, buffers=("a",)))


def _functional(opt, params, grads, steps):
    state, ref = opt.init(params), {k: v.copy() for k, v in params.items()}
    for _ in range(steps):
        state, ref = opt.step(state, grads, ref)
    return ref, state


def test_a_rule_the_recorder_cannot_express_runs_directly_with_the_same_result() -> None:
    def update(xp, g, p, bufs, s):  # ``**`` is not recorded (ndarray.__pow__ has fast paths)
        a = bufs["a"] * 0.5 + g**2
        return {"a": a}, p - s.lr * a

    opt = _rule(update)
    params, grads = big_problem()
    expected, expected_state = _functional(opt, params, grads, 3)
    aopt = ArrayOptimizer(params, opt, chunk_elements=4096)
    for _ in range(3):
        aopt.step(grads)
        assert not aopt.recorded
    for k in params:
        assert np.array_equal(params[k], expected[k])
        assert np.array_equal(aopt.state.buffers["a"][k], expected_state.buffers["a"][k])


def test_a_store_whose_destination_is_still_read_waits_for_the_reads() -> None:
    """``p - (a_new - a_old)``: the new ``a`` is computed before the old one is read."""

    def update(xp, g, p, bufs, s):
        new = bufs["a"] * 0.9 + g
        return {"a": new}, p - (new - bufs["a"]) * s.lr

    opt = _rule(update)
    params, grads = big_problem()
    expected, expected_state = _functional(opt, params, grads, 3)
    aopt = ArrayOptimizer(params, opt, chunk_elements=4096)
    for _ in range(3):
        aopt.step(grads)
        assert aopt.recorded
    for k in params:
        assert np.array_equal(params[k], expected[k])
        assert np.array_equal(aopt.state.buffers["a"][k], expected_state.buffers["a"][k])


def test_gradients_aliasing_the_params_run_directly() -> None:
    """A recorded program writes some results before it reads every operand, so gradients that
    share memory with the params take the direct path (which computes everything first)."""
    opt = ao.adamw(lr=0.1)
    params, _ = big_problem()
    expected, _ = _functional(opt, params, params, 1)  # the gradient is the param's old value
    aopt = ArrayOptimizer(params, opt, chunk_elements=4096)
    aopt.step(params)
    assert not aopt.recorded
    for k in params:
        assert np.array_equal(params[k], expected[k])
