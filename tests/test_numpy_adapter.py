"""The NumPy/CuPy adapter (issue 5): ``ArrayOptimizer`` updates the user's arrays in place.

The reference is the functional API (``opt.init``/``opt.step``) of the same optimizer on
copies of the same arrays: ``ArrayOptimizer`` must reproduce it bitwise, for every registered
optimizer, on every backend with writeable arrays (NumPy, array_api_strict, torch, and CuPy
when a GPU is present), with leaves cut into chunks, a non-contiguous (transposed) param and a
0-d param -- while keeping the very same array objects, so that views the user holds see the
update. States round-trip through ``state_dict``/``load_state_dict`` and safetensors files,
also across frameworks (a torch run resumes on NumPy and JAX).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import agnostic_optim as ao
from agnostic_optim import checkpoint, chunking
from agnostic_optim.adapters.numpy import CHUNK_ELEMENTS, ArrayOptimizer
from agnostic_optim.conformance.backends import Backend
from agnostic_optim.conformance.compare import relative_error
from helpers import peak_bytes_of_step, with_momentum_and_decay

REGISTRY = ao.registry()
STEPS = 3
CHUNK = 16  # small, so that the (70,) and (6, 7) leaves are cut into several chunks
# name -> shape; "t" is made as the transpose of a (5, 4) array (a non-contiguous view)
SHAPES = {"scale": (), "small": (3,), "vec": (70,), "mat": (6, 7), "t": (4, 5)}


def inputs_for(entry: ao.RegistryEntry, backend: Backend, params: dict[str, Any]) -> dict[str, Any]:
    """Extra step inputs from the loss ½‖θ‖² (gradient θ, Hessian diagonal 1)."""
    xp = backend.xp
    makers = {
        "grad_fn": lambda: lambda ps: {k: xp.asarray(v, copy=True) for k, v in ps.items()},
        "value_and_grad_fn": lambda: (
            lambda ps: (
                sum(xp.sum(v * v) for v in ps.values()) / 2,
                {k: xp.asarray(v, copy=True) for k, v in ps.items()},
            )
        ),
        "hessian_diag": lambda: {k: xp.ones_like(v) for k, v in params.items()},
        # K-FAC stats of each 2-D leaf (out, in) as a layer: 2 rows of inputs, of output grads
        "layer_stats": lambda: {
            (k,): (v[:2, :], xp.permute_dims(v, (1, 0))[:2, :]) for k, v in params.items() if v.ndim == 2
        },
    }
    missing = sorted(set(entry.inputs) - set(makers))
    if missing:
        pytest.fail(f"{entry.name} needs step inputs {missing}: teach inputs_for in this test to make them")
    return {name: makers[name]() for name in entry.inputs}


def host_problem(rng: np.random.Generator, shapes=SHAPES, steps: int = STEPS):
    init = {k: rng.standard_normal(s) for k, s in shapes.items()}
    stream = [{k: rng.standard_normal(s) for k, s in shapes.items()} for _ in range(steps)]
    return init, stream


def user_params(backend: Backend, init: dict[str, np.ndarray], dtype: str) -> tuple[dict, Any]:
    """The user's arrays; ``params["t"]`` is a transposed view of the returned base array."""
    params = {k: backend.asarray(v, dtype) for k, v in init.items() if k != "t"}
    base = None
    if "t" in init:
        base = backend.asarray(init["t"].T, dtype)
        params["t"] = backend.xp.permute_dims(base, (1, 0))
    return params, base


def fresh(backend: Backend, init: dict[str, np.ndarray], dtype: str) -> dict[str, Any]:
    return {k: backend.asarray(v, dtype) for k, v in init.items()}


def to_host(backend: Backend, tree: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: backend.to_numpy(v) for k, v in tree.items()}


def assert_bitwise(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray], what: str) -> None:
    assert actual.keys() == expected.keys()
    for k in expected:
        assert np.array_equal(actual[k], expected[k], equal_nan=True), (
            f"{what}: leaf {k!r} differs from the functional API "
            f"(max |diff| {np.max(np.abs(actual[k] - expected[k])):.3e})"
        )


def state_host(backend: Backend, state: Any) -> dict[str, np.ndarray]:
    return {k: backend.to_numpy(v) for k, v in checkpoint.state_to_dict(state).items()}


def step_count(state: Any) -> Any:
    """A state's step count (a wrapper's own part comes first in its state)."""
    while "count" not in getattr(state, "_fields", ()):
        state = state[0]
    return state.count


# --------------------------------------------------------------------------- bitwise, in place


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", list(REGISTRY))
def test_array_optimizer_matches_functional_api_bitwise_in_place(name, dtype, mutable, rng):
    backend, entry = mutable, REGISTRY[name]
    opt = with_momentum_and_decay(entry)
    init, stream = host_problem(rng)
    params, base = user_params(backend, init, dtype)
    ids = {k: id(v) for k, v in params.items()}
    mat_view = params["mat"][1:3, 2:]  # a view the user holds into a param
    aopt = ArrayOptimizer(params, opt, chunk_elements=CHUNK)

    ref = fresh(backend, init, dtype)
    ref_state = opt.init(ref)
    for k, host_grads in enumerate(stream):
        grads = fresh(backend, host_grads, dtype)
        returned = aopt.step(grads, **inputs_for(entry, backend, params))
        ref_state, ref = opt.step(
            ref_state, fresh(backend, host_grads, dtype), ref, **inputs_for(entry, backend, ref)
        )
        assert returned is params and aopt.params is params
        assert {k: id(v) for k, v in params.items()} == ids, "ArrayOptimizer replaced the user's arrays"
        assert_bitwise(to_host(backend, params), to_host(backend, ref), f"{name} {dtype} step {k + 1}")
        assert {k: v.dtype for k, v in params.items()} == {k: backend.dtype(dtype) for k in params}
        # NumPy runs elementwise rules as recorded ufunc programs (tests/test_chunk_program.py)
        elementwise = opt.rule is not None and opt.rule.elementwise
        assert aopt.recorded == (backend.name == "numpy" and elementwise and not entry.inputs)
    assert_bitwise(state_host(backend, aopt.state), state_host(backend, ref_state), f"{name} state")
    state_dict = {k: backend.to_numpy(v) for k, v in aopt.state_dict().items()}
    assert_bitwise(state_dict, state_host(backend, ref_state), f"{name} state_dict()")

    # views see the update: a slice the user kept, and the base of the transposed param
    final = to_host(backend, params)
    assert np.array_equal(backend.to_numpy(mat_view), final["mat"][1:3, 2:])
    assert np.array_equal(backend.to_numpy(base).T, final["t"])
    for k in init:
        assert not np.array_equal(final[k], backend.to_numpy(backend.asarray(init[k], dtype))), (
            f"{name}: leaf {k!r} did not move"
        )


def test_chunking_cuts_large_leaves_into_views_that_write_through():
    """The premise of the chunked tests: big contiguous leaves are cut into chunks that are
    views (writes reach the array); a transposed leaf and small leaves stay whole."""
    import array_api_compat.numpy as xp

    p = {"vec": np.zeros(70), "t": np.zeros((5, 4)).T, "small": np.zeros(3)}
    g = {k: np.ones_like(v) for k, v in p.items()}
    b = {"m": [np.zeros_like(v) for v in p.values()]}
    views, grads, bufs = chunking.chunk_views(xp, list(p.values()), list(g.values()), b, CHUNK)
    assert len(views) == len(grads) == len(bufs["m"]) == 5 + 1 + 1  # 70 = 4 x 16 + 6
    assert [v.shape[0] for v in views[:5]] == [16, 16, 16, 16, 6]
    for v in views[:5]:
        v[...] = 7.0
    assert np.all(p["vec"] == 7.0)
    assert views[5] is p["t"] and views[6] is p["small"]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", list(REGISTRY))
def test_default_chunking_and_no_chunking_give_identical_results(name, dtype, rng):
    """A leaf larger than the default chunk (CHUNK_ELEMENTS): chunked, unchunked and the
    functional API agree bitwise."""
    from agnostic_optim.conformance.backends import get_backend

    backend, entry = get_backend("numpy"), REGISTRY[name]
    opt = with_momentum_and_decay(entry)
    shapes = {"big": (CHUNK_ELEMENTS + 1000,), "w": (3, 4), "s": ()}
    init, stream = host_problem(rng, shapes, steps=2)
    chunked, unchunked = fresh(backend, init, dtype), fresh(backend, init, dtype)
    a = ArrayOptimizer(chunked, opt)
    b = ArrayOptimizer(unchunked, opt, chunk_elements=0)
    assert a.chunk_elements == CHUNK_ELEMENTS
    ref = fresh(backend, init, dtype)
    ref_state = opt.init(ref)
    for host_grads in stream:
        a.step(fresh(backend, host_grads, dtype), **inputs_for(entry, backend, chunked))
        b.step(fresh(backend, host_grads, dtype), **inputs_for(entry, backend, unchunked))
        ref_state, ref = opt.step(
            ref_state, fresh(backend, host_grads, dtype), ref, **inputs_for(entry, backend, ref)
        )
    assert_bitwise(to_host(backend, chunked), to_host(backend, unchunked), f"{name} chunked vs unchunked")
    assert_bitwise(to_host(backend, chunked), to_host(backend, ref), f"{name} chunked vs functional")
    assert_bitwise(state_host(backend, a.state), state_host(backend, b.state), f"{name} states")


@pytest.mark.parametrize("name", list(REGISTRY))
def test_chunked_step_makes_no_full_size_temporaries(name):
    """Issue 5: ``.step`` writes in place "with no extra full-size temporaries where avoidable".
    For an elementwise rule the peak extra memory of a chunked step (NumPy reports its buffers
    to tracemalloc) is a few chunks, well below half of one leaf; unchunked, each operation allocates a full
    leaf-sized temporary (checked for one optimizer, to show the measurement sees them)."""

    entry = REGISTRY[name]
    opt = with_momentum_and_decay(entry)
    if opt.rule is None or not opt.rule.elementwise:
        pytest.skip(f"{name} reduces over whole leaves (norms): its leaves are not chunked")
    n = 1 << 21
    leaf_bytes = 8 * n

    def peak_of_second_step(chunk: int) -> int:
        params = {"w": np.linspace(-1.0, 1.0, n), "s": np.ones(())}
        grads = {"w": np.full(n, 0.1), "s": np.full((), 0.1)}
        aopt = ArrayOptimizer(params, opt, chunk_elements=chunk)
        aopt.step(grads)
        return peak_bytes_of_step(aopt, grads)

    chunk = n // 64  # small against the leaf, so that chunk-sized and leaf-sized temporaries differ
    peak = peak_of_second_step(chunk)
    # One chunk-sized temporary per live intermediate value of the rule (at most ~20).
    assert peak <= 24 * 8 * chunk, f"{name}: a chunked step allocated {peak / (8 * chunk):.1f} chunks"
    assert peak < leaf_bytes / 2
    if name == "adamw":
        assert peak_of_second_step(0) >= leaf_bytes


def test_mixed_precision_kahan_on_float16_in_place(mutable, rng):
    backend = mutable
    if "float16" not in backend.dtypes:
        pytest.skip(f"{backend.name} has no float16")
    opt = ao.mixed_precision(
        ao.adamw(lr=1e-3, weight_decay=0.01), state_dtype="float32", compensation="kahan"
    )
    init, stream = host_problem(rng, {"vec": (70,), "mat": (6, 7), "s": ()}, steps=5)
    params = fresh(backend, init, "float16")
    ids = {k: id(v) for k, v in params.items()}
    aopt = ArrayOptimizer(params, opt, chunk_elements=CHUNK)
    ref = fresh(backend, init, "float16")
    ref_state = opt.init(ref)
    for host_grads in stream:
        aopt.step(fresh(backend, host_grads, "float16"))
        ref_state, ref = opt.step(ref_state, fresh(backend, host_grads, "float16"), ref)
    assert {k: id(v) for k, v in params.items()} == ids
    assert aopt.recorded == (backend.name == "numpy")
    assert all(v.dtype == backend.dtype("float16") for v in params.values())
    assert_bitwise(to_host(backend, params), to_host(backend, ref), "float16 kahan params")
    assert_bitwise(state_host(backend, aopt.state), state_host(backend, ref_state), "float16 kahan state")
    buffers = aopt.state.buffers
    assert all(v.dtype == backend.dtype("float32") for v in buffers["exp_avg"].values())
    assert all(v.dtype == backend.dtype("float16") for v in buffers["kahan_compensation"].values())
    # lr 1e-3 steps are below float16 resolution near |θ| ~ 1: the compensation holds them
    comp = to_host(backend, buffers["kahan_compensation"])
    assert any(np.any(c != 0) for c in comp.values())


# --------------------------------------------------------------------------- state round trips


@pytest.mark.parametrize("name", list(REGISTRY))
def test_state_dict_round_trip_continues_identically(name, mutable, rng, tmp_path):
    backend, entry = mutable, REGISTRY[name]
    opt = with_momentum_and_decay(entry)
    init, stream = host_problem(rng, {"vec": (70,), "mat": (6, 7), "s": ()}, steps=6)
    params = fresh(backend, init, "float64")
    a = ArrayOptimizer(params, opt, chunk_elements=CHUNK)
    for host_grads in stream[:3]:
        a.step(fresh(backend, host_grads, "float64"), **inputs_for(entry, backend, params))
    at_three = to_host(backend, params)

    # B: load_state_dict of A's live state_dict (B must own its state: A keeps stepping)
    b_params = fresh(backend, at_three, "float64")
    b = ArrayOptimizer(b_params, opt, chunk_elements=CHUNK)
    b.load_state_dict(a.state_dict())
    # C: through a safetensors file (save_state / load_state)
    path = tmp_path / "state.safetensors"
    checkpoint.save_state(path, a.state)
    c_params = fresh(backend, at_three, "float64")
    c = ArrayOptimizer(c_params, opt, chunk_elements=CHUNK)
    c.load_state_dict(checkpoint.state_to_dict(checkpoint.load_state(path, c.state)))
    assert int(backend.to_numpy(step_count(c.state))) == 3

    for host_grads in stream[3:]:
        for o, p in ((a, params), (b, b_params), (c, c_params)):
            o.step(fresh(backend, host_grads, "float64"), **inputs_for(entry, backend, p))
    assert_bitwise(to_host(backend, b_params), to_host(backend, params), f"{name} state_dict round trip")
    assert_bitwise(to_host(backend, c_params), to_host(backend, params), f"{name} save_state/load_state")
    assert_bitwise(state_host(backend, b.state), state_host(backend, a.state), f"{name} states")


@pytest.mark.parametrize("name", list(REGISTRY))
def test_torch_checkpoint_resumes_on_numpy_and_jax(name, torch_backend, rng, tmp_path, request):
    """A state saved from a torch run (functional API on torch tensors) resumes a NumPy run
    (ArrayOptimizer) and a JAX run, which continue the torch trajectory (float64, 1e-12)."""
    entry = REGISTRY[name]
    opt = with_momentum_and_decay(entry)
    torch = torch_backend
    init, stream = host_problem(rng, {"vec": (7,), "mat": (3, 4), "s": ()}, steps=6)
    params = fresh(torch, init, "float64")
    state = opt.init(params)
    for host_grads in stream[:3]:
        state, params = opt.step(
            state, fresh(torch, host_grads, "float64"), params, **inputs_for(entry, torch, params)
        )
    path = tmp_path / "torch_state.safetensors"
    checkpoint.save_state(path, state)
    at_three = to_host(torch, params)
    reference = []
    for host_grads in stream[3:]:
        state, params = opt.step(
            state, fresh(torch, host_grads, "float64"), params, **inputs_for(entry, torch, params)
        )
        reference.append(to_host(torch, params))

    from agnostic_optim.conformance.backends import get_backend

    numpy = get_backend("numpy")
    np_params = fresh(numpy, at_three, "float64")
    aopt = ArrayOptimizer(np_params, opt)
    aopt.load_state_dict(checkpoint.state_to_dict(checkpoint.load_state(path, aopt.state)))
    for host_grads, expected in zip(stream[3:], reference):
        aopt.step(fresh(numpy, host_grads, "float64"), **inputs_for(entry, numpy, np_params))
        for k in expected:
            assert relative_error(np_params[k], expected[k]) <= 1e-12, (name, "numpy", k)

    jax = get_backend("jax")
    if not jax.available:
        pytest.skip(f"numpy resumed the torch run; jax unavailable: {jax.reason}")
    request.getfixturevalue("jax_backend")  # x64 on
    jparams = fresh(jax, at_three, "float64")
    jstate = checkpoint.load_state(path, opt.init(jparams))
    for host_grads, expected in zip(stream[3:], reference):
        jstate, jparams = opt.step(
            jstate, fresh(jax, host_grads, "float64"), jparams, **inputs_for(entry, jax, jparams)
        )
        for k in expected:
            assert relative_error(jax.to_numpy(jparams[k]), expected[k]) <= 1e-12, (name, "jax", k)


# --------------------------------------------------------------------------- errors


def test_jax_arrays_are_rejected_pointing_to_the_functional_api(jax_backend):
    params = {"w": jax_backend.asarray(np.ones((2, 3)), "float32")}
    with pytest.raises(TypeError, match="functional API"):
        ArrayOptimizer(params, ao.adamw())


def test_read_only_numpy_arrays_are_rejected():
    frozen = np.ones(4)
    frozen.flags.writeable = False
    with pytest.raises(TypeError, match="writeable"):
        ArrayOptimizer({"ok": np.ones(3), "frozen": frozen}, ao.sgd(lr=0.1))
    assert np.all(frozen == 1.0)
