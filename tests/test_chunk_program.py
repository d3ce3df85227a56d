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

import copy
import operator
import os
import signal

import array_api_compat.numpy as eager_xp
import numpy as np
import pytest
from hypothesis import example, given, note, settings
from hypothesis import strategies as st

import agnostic_optim as ao
from agnostic_optim import engine
from agnostic_optim.adapters import _chunk_program
from agnostic_optim.adapters.numpy import ArrayOptimizer
from helpers import peak_bytes_of_step

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

ELEMENTWISE = [
    name
    for name, entry in ao.registry().items()
    if not entry.wraps and getattr(entry.factory().rule, "elementwise", False)
]


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
    peak = peak_bytes_of_step(opt, grads)
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


def _functional(opt, params, grads, steps):
    state, ref = opt.init(params), {k: v.copy() for k, v in params.items()}
    for _ in range(steps):
        state, ref = opt.step(state, grads, ref)
    return ref, state


def assert_custom_rule_matches_functional(update, *, recorded: bool, steps: int = 3) -> None:
    """A one-buffer rule with ``update`` through ArrayOptimizer vs the functional API, bitwise."""
    opt = engine.build(engine.Rule(name="custom", hparams={"lr": 0.1}, update=update, buffers=("a",)))
    params, grads = big_problem()
    expected, expected_state = _functional(opt, params, grads, steps)
    aopt = ArrayOptimizer(params, opt, chunk_elements=4096)
    for step in range(steps):
        if recorded or step > 0:
            aopt.step(grads)
        else:  # the fallback is announced once
            with pytest.warns(UserWarning, match="could not be recorded"):
                aopt.step(grads)
        assert aopt.recorded == recorded
    for k in params:
        assert np.array_equal(params[k], expected[k])
        assert np.array_equal(aopt.state.buffers["a"][k], expected_state.buffers["a"][k])


def test_a_rule_the_recorder_cannot_express_runs_directly_with_the_same_result() -> None:
    def update(xp, g, p, bufs, s):  # ``**`` is not recorded (ndarray.__pow__ has fast paths)
        a = bufs["a"] * 0.5 + g**2
        return {"a": a}, p - s.lr * a

    assert_custom_rule_matches_functional(update, recorded=False)


def test_a_store_whose_destination_is_still_read_waits_for_the_reads() -> None:
    """``p - (a_new - a_old)``: the new ``a`` is computed before the old one is read."""

    def update(xp, g, p, bufs, s):
        new = bufs["a"] * 0.9 + g
        return {"a": new}, p - (new - bufs["a"]) * s.lr

    assert_custom_rule_matches_functional(update, recorded=True)


# ---------------------------------------------------------------- review findings (each failed before)


def test_an_interrupted_recording_leaves_nothing_to_replay() -> None:
    """An exception while the second dtype group is recorded (Ctrl-C) writes nothing, and the
    next step does not replay the first group's program or its half-packed operands."""
    calls = {"n": 0}

    def update(xp, g, p, bufs, s):
        calls["n"] += 1
        if calls["n"] == 2:  # the second group of the first step
            raise KeyboardInterrupt
        return bufs, p - s.lr * g

    opt = engine.build(engine.Rule(name="sgd-like", hparams={"lr": 0.5}, update=update))
    params = {"a": np.ones(64, np.float32), "b": np.ones(16, np.float64)}  # two dtype groups
    grads = {k: np.ones_like(v) for k, v in params.items()}
    aopt = ArrayOptimizer(params, opt, chunk_elements=16)
    with pytest.raises(KeyboardInterrupt):
        aopt.step(grads)
    assert np.all(params["a"] == 1.0) and np.all(params["b"] == 1.0) and int(aopt.state.count) == 0
    aopt.step(grads)
    assert aopt.recorded
    assert np.all(params["a"] == 0.5) and np.all(params["b"] == 0.5)
    aopt.step(grads)
    assert np.all(params["a"] == 0.0) and np.all(params["b"] == 0.0)


@pytest.mark.parametrize(
    ("label", "update", "recorded"),
    [
        ("builtin abs", lambda xp, g, p, b, s: (b, p - s.lr * abs(g)), True),
        ("unary plus", lambda xp, g, p, b, s: (b, p - s.lr * +g), True),
        ("reflected &", lambda xp, g, p, b, s: (b, p - s.lr * xp.where((s.lr > 0) & (g > 0), g, p)), True),
        ("non-bool where condition", lambda xp, g, p, b, s: (b, xp.where(xp.sign(g) * g, p - s.lr, p)), True),
        ("a NumPy ufunc called directly", lambda xp, g, p, b, s: (b, p - s.lr * np.tanh(g)), False),
        ("floor division", lambda xp, g, p, b, s: (b, p - s.lr * (g // 0.25)), False),
    ],
)
def test_rules_using_more_of_numpy_match_the_functional_api(label, update, recorded) -> None:
    """What a Symbol models is recorded; anything else (a ufunc that refuses Symbols, an
    operator it lacks) falls back to the direct path instead of failing."""
    opt = engine.build(engine.Rule(name="custom", hparams={"lr": 0.1}, update=update))
    params, grads = big_problem()
    params["b"][:3] = 0.0  # zeros for the where conditions
    grads["b"][:2] = 0.0
    expected, _ = _functional(opt, params, grads, 2)
    aopt = ArrayOptimizer(params, opt, chunk_elements=4096)
    for step in range(2):
        if recorded or step > 0:
            aopt.step(grads)
        else:  # the fallback is announced once
            with pytest.warns(UserWarning, match="could not be recorded"):
                aopt.step(grads)
        assert aopt.recorded == recorded, label
    for k in params:
        assert np.array_equal(params[k], expected[k]), label


def test_rebinding_a_param_to_another_view_updates_the_new_array() -> None:
    """The kept chunk layout belongs to the arrays it was made for (compared by identity, with
    references held, so a freed param's id reused by the new view cannot match it)."""
    params = {"w": np.ones(1000, np.float32)[:1000]}
    grads = {"w": np.ones(1000, np.float32)}
    aopt = ArrayOptimizer(params, ao.sgd(lr=0.5), chunk_elements=256)
    aopt.step(grads)
    for k in range(1, 4):  # e.g. weights reloaded into a new flat buffer, the param a view into it
        new = np.full(1000, 10.0 * k, np.float32)
        old = params.pop("w").base  # the old view object is freed here, and in CPython its
        params["w"] = new[:1000]  # memory (so its id) usually goes to the new view
        aopt.step(grads)
        assert np.all(new == 10.0 * k - 0.5), k
        assert np.all(old == (0.5 if k == 1 else 10.0 * (k - 1) - 0.5)), k


@pytest.mark.parametrize(
    "make",
    [
        lambda: ao.adamw(lr=1e-3),
        lambda: ao.mixed_precision(ao.adamw(lr=1e-3), state_dtype="float32", compensation="kahan"),
    ],
    ids=["adamw", "adamw-kahan-float32-state"],
)
def test_float16_params_are_cast_chunk_by_chunk(make) -> None:
    """16-bit leaves compute in float32: the casts are recorded too, so a step allocates no
    float32 copy of the params, grads or buffers."""
    chunk = 1 << 16
    params = {"w": np.linspace(-1, 1, 8 * chunk).astype(np.float16)}
    grads = {"w": np.full(8 * chunk, 0.01, np.float16)}
    aopt = ArrayOptimizer(params, make(), chunk_elements=chunk)
    aopt.step(grads)
    peak = peak_bytes_of_step(aopt, grads)
    assert aopt.recorded
    assert peak < 2 * chunk, f"a float16 step allocated {peak} bytes (a float32 chunk is {4 * chunk})"


def test_recorded_is_false_after_a_step_on_the_functional_path() -> None:
    def update(xp, g, p, bufs, s, **_):
        return bufs, p - s.lr * g

    opt = engine.build(engine.Rule(name="with-input", hparams={"lr": 0.1}, update=update, inputs=("scale",)))
    params, grads = big_problem()
    aopt = ArrayOptimizer(params, opt, chunk_elements=4096)
    aopt.step(grads)
    assert aopt.recorded
    aopt.step(grads, scale=2.0)
    assert not aopt.recorded


@pytest.mark.parametrize("chunk", [4096, 0])
@pytest.mark.parametrize("alias", ["own param", "another leaf's param", "a view of a buffer"])
def test_gradients_sharing_memory_with_the_state_match_the_functional_api(chunk, alias) -> None:
    """Every path reads the gradients as they were before the step, as the functional API does
    (a step writes some results before it has read every operand, so such gradients are
    copied first)."""
    opt = ao.adamw(lr=0.1)
    params = {"v": np.linspace(-1, 1, 50_000), "w": np.linspace(2, 1, 50_000)}
    aopt = ArrayOptimizer(params, opt, chunk_elements=chunk)
    aopt.step({"v": np.full(50_000, 0.5), "w": np.full(50_000, 0.25)})  # non-zero moments
    shared = {
        "own param": params["w"],
        "another leaf's param": params["v"],
        "a view of a buffer": aopt.state.buffers["exp_avg"]["v"][::-1],
    }[alias]
    grads = {"v": np.full(50_000, 0.5), "w": shared}
    state = aopt.state._replace(
        buffers={k: {n: a.copy() for n, a in b.items()} for k, b in aopt.state.buffers.items()}
    )
    expected_state, expected = opt.step(
        state, {k: g.copy() for k, g in grads.items()}, {k: p.copy() for k, p in params.items()}
    )
    aopt.step(grads)
    assert aopt.recorded == (chunk > 0)
    for k in params:
        assert np.array_equal(params[k], expected[k]), k
        assert np.array_equal(aopt.state.buffers["exp_avg_sq"][k], expected_state.buffers["exp_avg_sq"][k]), k


def test_a_deep_copy_steps_its_own_arrays() -> None:
    """The kept chunk layout holds views into the original's arrays: a copy must not reuse it."""
    import copy

    opt = ao.adamw(lr=0.1)
    params, grads = big_problem()
    aopt = ArrayOptimizer(params, opt, chunk_elements=4096)
    aopt.step(grads)
    twin = copy.deepcopy(aopt)
    before = {k: v.copy() for k, v in params.items()}
    _, expected = opt.step(twin.state, grads, {k: v.copy() for k, v in twin.params.items()})
    twin.step(grads)
    assert twin.recorded
    for k in params:
        assert np.array_equal(twin.params[k], expected[k]), k
        assert np.array_equal(params[k], before[k]), k  # the original's arrays are untouched


def test_torch_tensors_whose_storage_is_swapped_keep_being_updated() -> None:
    """Views are kept between steps only on NumPy: a torch tensor can change its memory
    (``p.data = ...``), so ArrayOptimizer cuts torch views afresh every step."""
    torch = pytest.importorskip("torch", reason="torch is not installed")
    param = torch.ones(20_000)
    aopt = ArrayOptimizer({"p": param}, ao.sgd(lr=0.1), chunk_elements=4096)
    grads = {"p": torch.ones(20_000)}
    aopt.step(grads)
    param.data = param.data.clone()  # new storage, same tensor object
    aopt.step(grads)
    assert torch.allclose(param, torch.full((20_000,), 0.8))


def test_torch_gradients_sharing_storage_with_another_leaf_match_the_functional_api() -> None:
    """As on NumPy (above), for torch tensors in ArrayOptimizer: such gradients are cloned first."""
    torch = pytest.importorskip("torch", reason="torch is not installed")
    opt = ao.adamw(lr=0.1)
    params = {
        "v": torch.linspace(-1, 1, 20_000, dtype=torch.float64),
        "w": torch.ones(20_000, dtype=torch.float64),
    }
    grads = {"v": torch.full((20_000,), 0.5, dtype=torch.float64), "w": params["v"]}  # w's is v's param
    state, expected = opt.init(params), {k: v.clone() for k, v in params.items()}
    state, expected = opt.step(state, {k: g.clone() for k, g in grads.items()}, expected)
    ArrayOptimizer(params, opt, chunk_elements=4096).step(grads)
    for k in params:
        assert torch.equal(params[k], expected[k]), k


# ---------------------------------------------------------------- threads


def test_large_steps_split_between_threads_with_the_same_results() -> None:
    """A recorded step over more than PARALLEL_ELEMENTS splits its chunks between threads, each
    with its own scratch; the params and state are bitwise those of one thread and of the
    functional API."""
    n = 3 * _chunk_program.PARALLEL_ELEMENTS + 12_345
    params, grads = big_problem(n)
    opt = ao.adamw(lr=1e-3, weight_decay=0.1)
    state, expected = opt.init(params), params
    runs = {threads: ArrayOptimizer(copy.deepcopy(params), opt, threads=threads) for threads in (1, 2, 3)}
    for _ in range(3):
        state, expected = opt.step(state, grads, expected)
        for run in runs.values():
            run.step(grads)
            assert run.recorded
    for threads, run in runs.items():
        for key in params:
            assert np.array_equal(run.params[key], expected[key]), f"{threads} threads: {key}"
            for name, buffers in state.buffers.items():
                assert np.array_equal(run.state.buffers[name][key], buffers[key]), f"{threads}: {name}"
    # every thread had chunks to run: each scratch holds AdamW's one register
    assert all(scratch._buffers for scratch in runs[3]._program._scratch)


def test_threads_see_the_callers_numpy_error_state() -> None:
    """np.errstate is the caller's in every thread (NumPy 1 keeps it per thread): an overflow in
    the second half of the chunks (run by a worker thread) raises under ``over="raise"``."""
    n = 2 * _chunk_program.PARALLEL_ELEMENTS
    params, grads = big_problem(n)
    grads["w"][n // 2 + 1000] = 1e30  # g * g overflows float32
    opt = ArrayOptimizer(params, ao.adam(lr=1e-3), threads=2)
    with np.errstate(over="raise"), pytest.raises(FloatingPointError):
        opt.step(grads)


def test_threads_must_be_positive() -> None:
    params, _ = big_problem(10)
    with pytest.raises(ValueError, match="threads must be at least 1"):
        ArrayOptimizer(params, ao.adam(lr=1e-3), threads=0)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is not available on this platform")
def test_a_forked_child_steps_with_threads_of_its_own() -> None:
    """A child forked after the parent's threads started (a data-loader worker) would wait
    forever on the parent's pool; it starts its own."""
    n = 2 * _chunk_program.PARALLEL_ELEMENTS
    params, grads = big_problem(n)
    opt = ArrayOptimizer(params, ao.adam(lr=1e-3), threads=2)
    opt.step(grads)  # the parent's pool is running
    expected = copy.deepcopy(opt)
    expected.step(grads)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: one step, then report whether it matches
        try:
            signal.alarm(20)
            opt.step(grads)
            same = all(np.array_equal(opt.params[k], expected.params[k]) for k in params)
            os.write(write, b"1" if same else b"0")
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        answer = pipe.read()
    os.waitpid(pid, 0)
    assert answer == b"1"
