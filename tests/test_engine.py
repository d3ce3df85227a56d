"""The engine's contract: pytrees, purity, hyperparameters as data, dtypes, jit, input errors.

Values are checked against torch.optim (float64, 1e-12 relative) or a direct computation in the
test; structure is checked with a walker written here, independently of ``agnostic_optim.trees``.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import pytest

import agnostic_optim as ao
from agnostic_optim.conformance.backends import Backend, get_backend
from agnostic_optim.conformance.compare import relative_error
from agnostic_optim.registry import FAMILIES
from helpers import random_gradient_stream, random_leaves

TOL = 1e-12
REGISTRY = ao.registry()


# --------------------------------------------------------------------------- helpers


def walk(tree: Any, path: tuple = ()) -> list[tuple[tuple, Any]]:
    """(path, leaf) pairs of a nest of dict / list / tuple / NamedTuple / None (None: no leaf).

    Objects with ``__dict__`` that are not arrays (the custom pytree class below) are walked
    through their attributes ``w`` and ``b``.
    """
    if tree is None:
        return []
    if hasattr(tree, "shape") and hasattr(tree, "dtype"):
        return [(path, tree)]
    if isinstance(tree, dict):
        return [pair for key in sorted(tree) for pair in walk(tree[key], (*path, key))]
    if isinstance(tree, (tuple, list)):
        return [pair for i, child in enumerate(tree) for pair in walk(child, (*path, i))]
    if isinstance(tree, Linear):
        return walk(tree.w, (*path, "w")) + walk(tree.b, (*path, "b"))
    return [(path, tree)]  # a Python scalar in a state


def assert_same_structure(a: Any, b: Any, where: str = "<root>") -> None:
    """Same container types, keys, lengths and None holes; array leaves with equal shapes."""
    if b is None:
        assert a is None, f"{where}: expected None, got {type(a).__name__}"
        return
    if hasattr(b, "shape") and hasattr(b, "dtype"):
        assert hasattr(a, "shape"), f"{where}: expected an array, got {type(a).__name__}"
        assert tuple(a.shape) == tuple(b.shape), f"{where}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        return
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(b, dict):
        assert set(a) == set(b), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for key in b:
            assert_same_structure(a[key], b[key], f"{where}.{key}")
    elif isinstance(b, (tuple, list)):
        assert len(a) == len(b), f"{where}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_structure(x, y, f"{where}.{i}")
    elif isinstance(b, Linear):
        assert_same_structure(a.w, b.w, f"{where}.w")
        assert_same_structure(a.b, b.b, f"{where}.b")


def host_copy(tree: Any, backend: Backend) -> list[tuple[tuple, np.ndarray]]:
    out = []
    for path, leaf in walk(tree):
        if hasattr(leaf, "shape"):
            host = backend.to_numpy(leaf)
            out.append((path, np.array(host, copy=True), str(leaf.dtype)))
        else:
            out.append((path, np.asarray(leaf), type(leaf).__name__))
    return out


def assert_bitwise_same(a: list, b: list, what: str) -> None:
    assert [p for p, *_ in a] == [p for p, *_ in b], f"{what}: structure changed"
    for (path, x, dx), (_, y, dy) in zip(a, b):
        assert dx == dy, f"{what} {path}: dtype {dx} -> {dy}"
        assert x.shape == y.shape and x.tobytes() == y.tobytes(), f"{what} {path}: values changed"


def map_tree(fn: Callable, tree: Any) -> Any:
    if tree is None:
        return None
    if isinstance(tree, dict):
        return {k: map_tree(fn, v) for k, v in tree.items()}
    if isinstance(tree, tuple) and hasattr(type(tree), "_fields"):
        return type(tree)(*(map_tree(fn, v) for v in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(map_tree(fn, v) for v in tree)
    if isinstance(tree, Linear):
        return Linear(map_tree(fn, tree.w), map_tree(fn, tree.b))
    return fn(tree)


def torch_adam_reference(torch, params_tree, grad_trees, **kwargs) -> dict[tuple, np.ndarray]:
    """torch.optim.Adam on the leaves of ``params_tree`` (host arrays): final value by path."""
    pairs = walk(params_tree)
    tensors = {path: torch.tensor(leaf, dtype=torch.float64, requires_grad=True) for path, leaf in pairs}
    optimizer = torch.optim.Adam(list(tensors.values()), **kwargs)
    for grads in grad_trees:
        by_path = dict(walk(grads))
        for path, t in tensors.items():
            t.grad = torch.tensor(by_path[path], dtype=torch.float64)
        optimizer.step()
    return {path: t.detach().numpy() for path, t in tensors.items()}


class Pair(NamedTuple):
    weight: Any
    bias: Any


class Linear:
    """A flax-like module: registered as a JAX pytree node when JAX is used."""

    def __init__(self, w: Any, b: Any):
        self.w, self.b = w, b


_REGISTERED = False


def register_linear() -> None:
    global _REGISTERED
    if not _REGISTERED:
        import jax

        jax.tree_util.register_pytree_node(
            Linear, lambda node: ((node.w, node.b), None), lambda aux, children: Linear(*children)
        )
        _REGISTERED = True


def _tree_cases(rng: np.random.Generator) -> dict[str, Any]:
    def r(*shape):
        return rng.standard_normal(shape)

    return {
        "bare_array": r(3, 4),
        "bare_0d": r(),
        "list": [r(3), r(2, 2), r()],
        "tuple": (r(4), r(1, 3)),
        "nested_dict": {"layer": {"w": r(3, 2), "b": r(2)}, "out": [r(2, 2), {"scale": r()}]},
        "namedtuple": {"dense": Pair(r(3, 3), r(3)), "extra": Pair(r(2), r())},
        "none_holes": {"a": r(3), "frozen": None, "rest": [r(2, 2), None, (r(1),)], "z": Pair(r(2), None)},
    }


TREE_CASES = list(_tree_cases(np.random.default_rng(0)))


# --------------------------------------------------------------------------- pytrees


@pytest.mark.parametrize("case", TREE_CASES)
def test_pytrees_match_torch_and_state_mirrors_params(backend: Backend, torch64, case: str):
    rng = np.random.default_rng(7)
    host = _tree_cases(rng)[case]
    grad_trees = [map_tree(lambda leaf: rng.standard_normal(leaf.shape), host) for _ in range(4)]
    opt = ao.adam(lr=0.1, betas=(0.8, 0.9))

    params = map_tree(backend.asarray, host)
    state = opt.init(params)
    for name in ("exp_avg", "exp_avg_sq"):
        assert_same_structure(state.buffers[name], host, f"init buffer {name}")
    for grads in grad_trees:
        state, params = opt.step(state, map_tree(backend.asarray, grads), params)
    assert_same_structure(params, host, "params")
    for name in ("exp_avg", "exp_avg_sq"):
        assert_same_structure(state.buffers[name], host, f"buffer {name}")

    expected = torch_adam_reference(torch64, host, grad_trees, lr=0.1, betas=(0.8, 0.9))
    ours = dict(walk(params))
    assert set(ours) == set(expected)
    for path, value in ours.items():
        error = relative_error(backend.to_numpy(value), expected[path])
        assert error <= TOL, f"{case} {path}: relative error {error:.3e}"
        assert relative_error(backend.to_numpy(value), dict(walk(host))[path]) > 1e-3


@pytest.mark.parametrize("jit", [False, True])
def test_custom_jax_pytree_node(jax_backend: Backend, torch64, jit: bool):
    import jax

    register_linear()
    rng = np.random.default_rng(11)
    host = {
        "l1": Linear(rng.standard_normal((3, 2)), rng.standard_normal(2)),
        "l2": [Linear(rng.standard_normal((2, 1)), rng.standard_normal(1))],
    }
    grad_trees = [map_tree(lambda leaf: rng.standard_normal(leaf.shape), host) for _ in range(4)]
    opt = ao.chain(ao.clip_by_global_norm(10.0), ao.adam(lr=0.1, betas=(0.8, 0.9)))
    step = jax.jit(opt.step) if jit else opt.step

    params = map_tree(jax_backend.asarray, host)
    state = opt.init(params)
    for grads in grad_trees:
        state, params = step(state, map_tree(jax_backend.asarray, grads), params)
    assert isinstance(params["l1"], Linear) and isinstance(params["l2"][0], Linear)
    assert_same_structure(params, host, "params")
    adam_state = state[-1]
    assert isinstance(adam_state.buffers["exp_avg"]["l1"], Linear)
    assert_same_structure(adam_state.buffers["exp_avg_sq"], host, "buffer exp_avg_sq")

    norms = [np.sqrt(sum(float(np.sum(leaf**2)) for _, leaf in walk(g))) for g in grad_trees]
    assert max(norms) < 10.0  # the clip is inactive: plain Adam is the reference
    expected = torch_adam_reference(torch64, host, grad_trees, lr=0.1, betas=(0.8, 0.9))
    for path, value in walk(params):
        assert relative_error(np.asarray(value), expected[path]) <= TOL, path


# --------------------------------------------------------------------------- purity


def _plain_entries() -> list[str]:
    return [name for name, entry in REGISTRY.items() if not entry.inputs]


def _build(name: str) -> ao.Optimizer:
    entry = REGISTRY[name]
    if entry.wraps:
        return entry.factory(ao.sgd(lr=0.1))
    kwargs: dict[str, Any] = {}
    params = inspect.signature(entry.factory).parameters
    if "weight_decay" in params:
        kwargs["weight_decay"] = 1e-2  # exercise the decay term too
    if "momentum" in params and name in ("sgd", "rmsprop", "lars"):
        kwargs["momentum"] = 0.9
    return entry.factory(**kwargs)


COMPOSED: dict[str, Callable[[], ao.Optimizer]] = {
    "chain_clip_adam": lambda: ao.chain(ao.clip_by_global_norm(1.0), ao.adam(lr=0.1)),
    "masked_adamw": lambda: ao.masked(
        ao.adamw(lr=0.1), lambda path, leaf: leaf.ndim >= 2, otherwise=ao.sgd(lr=0.1, momentum=0.9)
    ),
    "skip_nonfinite_adam": lambda: ao.skip_nonfinite(ao.adam(lr=0.1)),
    "accumulate_sgd": lambda: ao.accumulate(ao.sgd(lr=0.1, momentum=0.9), every=2),
}
PURITY_CASES = [*_plain_entries(), *COMPOSED]


def _make(case: str) -> ao.Optimizer:
    return COMPOSED[case]() if case in COMPOSED else _build(case)


@pytest.mark.parametrize("backend_name", ["numpy", "torch"])
@pytest.mark.parametrize("case", PURITY_CASES)
def test_purity_inputs_never_mutated_and_deterministic(backend_name: str, case: str):
    backend = get_backend(backend_name)
    if not backend.available:
        pytest.skip(backend.reason)
    rng = np.random.default_rng(5)
    opt = _make(case)
    params = [backend.asarray(p) for p in random_leaves(rng)]
    state = opt.init(params)
    for grads in random_gradient_stream(rng, 3):  # a non-trivial state first
        state, params = opt.step(state, [backend.asarray(g) for g in grads], params)
    grads = [backend.asarray(g) for g in random_leaves(rng)]

    before = [host_copy(x, backend) for x in (params, grads, state)]
    new_state, new_params = opt.step(state, grads, params)
    after = [host_copy(x, backend) for x in (params, grads, state)]
    for what, b, a in zip(("params", "grads", "state"), before, after):
        assert_bitwise_same(b, a, f"{case}: {what}")

    again_state, again_params = opt.step(state, grads, params)
    assert_bitwise_same(host_copy(new_params, backend), host_copy(again_params, backend), "params twice")
    assert_bitwise_same(host_copy(new_state, backend), host_copy(again_state, backend), "state twice")
    # and the step did something
    moved = [
        float(np.max(np.abs(x - y)))
        for (_, x, _), (_, y, _) in zip(before[0], host_copy(new_params, backend))
    ]
    assert max(moved) > 0  # (for accumulate every=2 this 4th micro-step is an update step)


# --------------------------------------------------------------------------- hyperparameters


def _scalar_leaves(value: Any) -> list[Any]:
    return list(value) if isinstance(value, tuple) else [value]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", _plain_entries())
def test_get_hparams_are_0d_float64(backend: Backend, name: str, dtype: str):
    opt = _build(name)
    params = [backend.asarray(p, dtype) for p in random_leaves(np.random.default_rng(1))]
    state = opt.init(params)
    hparams = ao.get_hparams(state)
    assert "lr" in hparams
    for key, value in hparams.items():
        for leaf in _scalar_leaves(value):
            assert tuple(leaf.shape) == (), f"{name}.{key}: shape {leaf.shape}"
            assert leaf.dtype == backend.xp.float64, f"{name}.{key}: dtype {leaf.dtype}"


def test_get_hparams_values_are_the_given_ones(backend: Backend):
    opt = ao.adam(lr=3e-3, betas=(0.8, 0.95), eps=1e-7, weight_decay=0.1)
    state = opt.init([backend.asarray(np.ones(3), "float32")])
    h = ao.get_hparams(state)
    assert float(backend.to_numpy(h["lr"])) == 3e-3
    assert [float(backend.to_numpy(b)) for b in h["betas"]] == [0.8, 0.95]
    assert float(backend.to_numpy(h["eps"])) == 1e-7
    assert float(backend.to_numpy(h["weight_decay"])) == 0.1


def test_set_hparams_returns_new_state_and_takes_effect(torch64):
    torch = torch64
    rng = np.random.default_rng(2)
    params = random_leaves(rng)
    stream = random_gradient_stream(rng, 8)
    opt = ao.adam(lr=1e-2, betas=(0.9, 0.999), weight_decay=1e-2)
    tensors = [torch.tensor(p, requires_grad=True) for p in params]
    reference = torch.optim.Adam(tensors, lr=1e-2, betas=(0.9, 0.999), weight_decay=1e-2)

    state = opt.init(params)
    current = params
    for k, grads in enumerate(stream):
        if k == 3:
            old = state
            state = ao.set_hparams(state, lr=0.05, weight_decay=0.2)
            assert float(ao.get_hparams(old)["lr"]) == 1e-2  # the old state is unchanged
            assert float(ao.get_hparams(old)["weight_decay"]) == 1e-2
            assert float(ao.get_hparams(state)["lr"]) == 0.05
            reference.param_groups[0].update(lr=0.05, weight_decay=0.2)
        if k == 5:
            old = state
            state = ao.set_hparams(state, betas=(0.7, 0.9))
            assert [float(b) for b in ao.get_hparams(old)["betas"]] == [0.9, 0.999]
            assert [float(b) for b in ao.get_hparams(state)["betas"]] == [0.7, 0.9]
            assert all(b.dtype == np.float64 and b.shape == () for b in ao.get_hparams(state)["betas"])
            reference.param_groups[0]["betas"] = (0.7, 0.9)
        state, current = opt.step(state, grads, current)
        for t, g in zip(tensors, grads):
            t.grad = torch.tensor(g)
        reference.step()
        for ours, t in zip(current, tensors):
            assert relative_error(ours, t.detach().numpy()) <= TOL, f"step {k + 1}"


def test_set_hparams_in_composed_states():
    opt = ao.skip_nonfinite(ao.chain(ao.clip_by_global_norm(1.0), ao.sgd(lr=0.1, momentum=0.9)))
    state = opt.init([np.ones(2)])
    new = ao.set_hparams(state, lr=0.3, max_norm=2.0)
    assert float(ao.get_hparams(new)["lr"]) == 0.3 and float(ao.get_hparams(new)["max_norm"]) == 2.0
    assert float(ao.get_hparams(state)["lr"]) == 0.1 and float(ao.get_hparams(state)["max_norm"]) == 1.0
    _, params = opt.step(new, [np.array([3.0, 4.0])], [np.ones(2)])
    np.testing.assert_allclose(params[0], 1 - 0.3 * np.array([3.0, 4.0]) * 2.0 / (5.0 + 1e-6), rtol=1e-14)


@pytest.mark.parametrize(
    ("make", "values"),
    [
        (lambda: ao.adam(), {"learning_rate": 0.1}),
        (lambda: ao.adam(), {"momentum": 0.1}),
        (lambda: ao.sgd(lr=0.1), {"momentum": 0.9}),
        (lambda: ao.sgd(lr=0.1, momentum=0.0), {"momentum": 0.9}),
        (lambda: ao.sgd(lr=0.1, momentum=0.9), {"weight_decay": 1e-2}),
        (lambda: ao.adam(weight_decay=0), {"weight_decay": 1e-2}),
        (lambda: ao.rmsprop(momentum=0), {"momentum": 0.5}),
        (lambda: ao.sgd(lr=0.1), {"lr": 0.2, "nesterov": True}),
    ],
)
def test_set_hparams_unknown_or_structurally_zero_raises_key_error(make, values):
    state = make().init([np.ones(3)])
    with pytest.raises(KeyError):
        ao.set_hparams(state, **values)


# --------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("name", [*_plain_entries(), *COMPOSED])
def test_float32_params_and_state_stay_float32(backend: Backend, name: str):
    _check_dtype_kept(backend, name, "float32")


@pytest.mark.parametrize("backend_name", ["numpy", "torch"])
@pytest.mark.parametrize("name", _plain_entries())
def test_float16_params_and_state_stay_float16(backend_name: str, name: str):
    backend = get_backend(backend_name)
    if not backend.available:
        pytest.skip(backend.reason)
    _check_dtype_kept(backend, name, "float16")


def _check_dtype_kept(backend: Backend, name: str, dtype: str) -> None:
    target = backend.dtype(dtype)
    rng = np.random.default_rng(4)
    opt = _make(name)
    initial = random_leaves(rng)
    params = [backend.asarray(p, dtype) for p in initial]
    state = opt.init(params)
    for grads in random_gradient_stream(rng, 4):
        state, params = opt.step(state, [backend.asarray(g, dtype) for g in grads], params)
        for p in params:
            assert p.dtype == target, f"{name}: param dtype {p.dtype} != {dtype}"
    moved = max(float(np.max(np.abs(backend.to_numpy(p) - q))) for p, q in zip(params, initial))
    assert moved > 0
    for path, leaf in walk(state):
        if not hasattr(leaf, "shape") or tuple(leaf.shape) == ():
            continue  # 0-d: counts and hyperparameters (float64 by design)
        assert leaf.dtype == target, f"{name}: state leaf {path} has dtype {leaf.dtype}, expected {dtype}"
        assert np.all(np.isfinite(backend.to_numpy(leaf))), path
    for p in params:
        assert np.all(np.isfinite(backend.to_numpy(p)))


def test_0d_leaves_keep_dtype(backend: Backend):
    """A 0-d float32 param (and its state) stays a float32 array, not a Python/NumPy float64."""
    opt = ao.adam(lr=0.1)
    params = {"s": backend.asarray(1.5, "float32"), "v": backend.asarray(np.ones(2), "float32")}
    state = opt.init(params)
    state, params = opt.step(
        state, {"s": backend.asarray(0.5, "float32"), "v": backend.asarray(np.ones(2), "float32")}, params
    )
    assert params["s"].dtype == backend.dtype("float32") and tuple(params["s"].shape) == ()
    assert state.buffers["exp_avg"]["s"].dtype == backend.dtype("float32")


# --------------------------------------------------------------------------- jit


def test_jit_set_hparams_does_not_retrace(jax_backend: Backend):
    import jax
    import jax.numpy as jnp

    opt = ao.adam(lr=0.1, betas=(0.9, 0.99))
    traces = 0

    def step(state, grads, params):
        nonlocal traces
        traces += 1
        return opt.step(state, grads, params)

    jitted = jax.jit(step)
    rng = np.random.default_rng(9)
    host = rng.standard_normal(3)
    params = {"w": jnp.asarray(host)}
    state = opt.init(params)
    grads = [rng.standard_normal(3) for _ in range(5)]
    lrs = [0.1, 0.05, 0.2, 0.01, 0.3]
    betas = [(0.9, 0.99), (0.9, 0.99), (0.8, 0.95), (0.8, 0.95), (0.5, 0.9)]
    # direct Adam transcription (torch's form) with the changing hyperparameters
    p, m, v = host.copy(), np.zeros(3), np.zeros(3)
    for k in range(5):
        state = ao.set_hparams(state, lr=lrs[k], betas=betas[k])
        state, params = jitted(state, {"w": jnp.asarray(grads[k])}, params)
        b1, b2 = betas[k]
        m = b1 * m + (1 - b1) * grads[k]
        v = b2 * v + (1 - b2) * grads[k] ** 2
        t = k + 1
        p = p - lrs[k] / (1 - b1**t) * m / (np.sqrt(v) / np.sqrt(1 - b2**t) + 1e-8)
        assert relative_error(np.asarray(params["w"]), p) <= TOL, f"step {t}"
    assert traces == 1, f"traced {traces} times"


# --------------------------------------------------------------------------- bad input

ERROR_CASES = ["adam", "sgd_momentum", *COMPOSED]


def _error_opt(case: str) -> ao.Optimizer:
    if case == "adam":
        return ao.adam(lr=0.1)
    if case == "sgd_momentum":
        return ao.sgd(lr=0.1, momentum=0.9)
    return COMPOSED[case]()


def _bad_inputs(params: dict, torch: Any) -> dict[str, tuple[type[Exception], Any, dict]]:
    """name -> (expected error, grads, extra step kwargs), for dict params {'w': (3, 2), 'b': (2,)}."""
    w, b = params["w"], params["b"]
    return {
        "missing_key": (ValueError, {"w": np.ones_like(w)}, {}),
        "extra_key": (ValueError, {"w": np.ones_like(w), "b": np.ones_like(b), "c": np.ones(2)}, {}),
        "list_not_dict": (ValueError, [np.ones_like(w), np.ones_like(b)], {}),
        "nested": (ValueError, {"w": {"x": np.ones_like(w)}, "b": np.ones_like(b)}, {}),
        "shape": (ValueError, {"w": np.ones((2, 3)), "b": np.ones_like(b)}, {}),
        "shape_broadcastable": (ValueError, {"w": np.ones((1, 2)), "b": np.ones_like(b)}, {}),
        "dtype": (TypeError, {"w": np.ones_like(w, dtype=np.float32), "b": np.ones_like(b)}, {}),
        "mixed_namespaces": (
            TypeError,
            {"w": torch.ones(3, 2, dtype=torch.float64), "b": torch.ones(2, dtype=torch.float64)},
            {},
        ),
        "one_foreign_leaf": (TypeError, {"w": np.ones_like(w), "b": torch.ones(2, dtype=torch.float64)}, {}),
        "unexpected_input": (TypeError, {"w": np.ones_like(w), "b": np.ones_like(b)}, {"closure": None}),
    }


BAD_INPUTS = [
    "missing_key",
    "extra_key",
    "list_not_dict",
    "nested",
    "shape",
    "shape_broadcastable",
    "dtype",
    "mixed_namespaces",
    "one_foreign_leaf",
    "unexpected_input",
]


@pytest.mark.parametrize("bad", BAD_INPUTS)
@pytest.mark.parametrize("case", ERROR_CASES)
def test_bad_step_input_raises_before_anything_changes(torch64, case: str, bad: str):
    numpy_backend = get_backend("numpy")
    rng = np.random.default_rng(8)
    params = {"w": rng.standard_normal((3, 2)), "b": rng.standard_normal(2)}
    opt = _error_opt(case)
    state = opt.init(params)
    good = {"w": rng.standard_normal((3, 2)), "b": rng.standard_normal(2)}
    for _ in range(2):
        state, params = opt.step(state, good, params)

    cases = _bad_inputs(params, torch64)
    assert list(cases) == BAD_INPUTS
    error, grads, kwargs = cases[bad]
    before = [host_copy(x, numpy_backend) for x in (params, state)]
    with pytest.raises(error):
        opt.step(state, grads, params, **kwargs)
    after = [host_copy(x, numpy_backend) for x in (params, state)]
    assert_bitwise_same(before[0], after[0], "params")
    assert_bitwise_same(before[1], after[1], "state")
    # the state is still good for a regular step, equal to a step from an untouched copy
    _, p1 = opt.step(state, good, params)
    _, p2 = opt.step(state, good, params)
    assert_bitwise_same(host_copy(p1, numpy_backend), host_copy(p2, numpy_backend), "after error")


@pytest.mark.parametrize("case", ERROR_CASES)
def test_integer_params_raise_type_error(case: str):
    opt = _error_opt(case)
    with pytest.raises(TypeError):
        opt.init({"w": np.ones((3, 2), dtype=np.int64), "b": np.ones(2)})
    state = opt.init({"w": np.ones((3, 2)), "b": np.ones(2)})
    params = {"w": np.ones((3, 2), dtype=np.int32), "b": np.ones(2)}
    with pytest.raises(TypeError):
        opt.step(state, {"w": np.ones((3, 2), dtype=np.int32), "b": np.ones(2)}, params)


@pytest.mark.parametrize("name", [n for n, e in REGISTRY.items() if not e.wraps])
@pytest.mark.parametrize("lr", [-1e-3, -1.0, float("nan")])
def test_negative_lr_raises_value_error(name: str, lr: float):
    with pytest.raises(ValueError):
        REGISTRY[name].factory(lr=lr)


BETA_FACTORIES = [n for n, e in REGISTRY.items() if "betas" in inspect.signature(e.factory).parameters]


def _bad_betas(name: str) -> list[tuple]:
    default = inspect.signature(REGISTRY[name].factory).parameters["betas"].default
    out = []
    for i in range(len(default)):
        for value in (1.0, 1.5, -0.1):
            betas = list(default)
            betas[i] = value
            out.append(tuple(betas))
    out.append(tuple(default[:-1]))  # wrong length
    return out


@pytest.mark.parametrize("name", BETA_FACTORIES)
def test_betas_outside_unit_interval_raise_value_error(name: str):
    assert {"adam", "adamw", "amsgrad", "radam", "nadam", "adan", "lion"} <= set(BETA_FACTORIES)
    for betas in _bad_betas(name):
        with pytest.raises(ValueError):
            REGISTRY[name].factory(betas=betas)
    default = inspect.signature(REGISTRY[name].factory).parameters["betas"].default
    REGISTRY[name].factory(betas=(0.0,) * len(default))  # 0 lies inside [0, 1)


# --------------------------------------------------------------------------- import and registry


def test_import_needs_no_framework():
    code = (
        "import sys, agnostic_optim as ao\n"
        "ao.adam(lr=0.1); ao.schedules.cosine_decay(1.0, 10)\n"
        "print(','.join(m for m in ('torch', 'jax', 'jaxlib', 'optax', 'cupy') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "", f"import agnostic_optim loaded {out.stdout.strip()}"


def test_import_works_with_only_numpy_and_array_api_compat():
    """Every other third-party import is refused: the core still imports and steps."""
    code = (
        "import sys\n"
        "ALLOWED = {'numpy', 'array_api_compat', 'agnostic_optim'}\n"
        "class Refuse:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        top = name.partition('.')[0]\n"
        "        if top in ALLOWED or top in sys.stdlib_module_names or top.startswith('_'):\n"
        "            return None\n"
        "        raise ImportError(f'refused: {name}')\n"
        "sys.meta_path.insert(0, Refuse())\n"
        "import numpy as np, agnostic_optim as ao\n"
        "opt = ao.chain(ao.clip_by_global_norm(1.0), ao.adamw(lr=ao.schedules.cosine_decay(0.1, 10)))\n"
        "params = {'w': np.ones((2, 3)), 'b': np.zeros(3)}\n"
        "state, new = opt.step(opt.init(params), {'w': np.ones((2, 3)), 'b': np.ones(3)}, params)\n"
        "print(float(new['w'][0, 0]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) < 1.0


def test_registry_lists_the_core_optimizers():
    required = {"sgd", "adagrad", "rmsprop", "adam", "adamw", "amsgrad", "radam", "nadam", "adan", "lion"}
    assert required <= set(REGISTRY)
    for name, entry in REGISTRY.items():
        assert entry.name == name
        assert entry.family in FAMILIES, f"{name}: family {entry.family!r}"
        assert isinstance(entry.summary, str) and entry.summary.strip(), f"{name}: no summary"
        assert callable(entry.factory)
        assert isinstance(entry.inputs, dict)
    assert REGISTRY["sgd"].family == "plain first-order / momentum"
    for name in required - {"sgd"}:
        assert REGISTRY[name].family == "adaptive"
    # every registered factory builds an Optimizer with its defaults
    for name, entry in REGISTRY.items():
        opt = entry.factory(ao.sgd(lr=0.1)) if entry.wraps else entry.factory()
        assert isinstance(opt, ao.Optimizer), name


@pytest.mark.parametrize("wrapper", ["skip_nonfinite_adam", "accumulate_sgd"])
def test_wrappers_reject_unexpected_inputs_on_every_step(wrapper: str):
    """Also on the steps where the wrapper does not call its inner optimizer (a skipped step,
    an accumulation micro-step): the error must not depend on the data or the step count."""
    opt = COMPOSED[wrapper]()
    params = [np.ones(3)]
    state = opt.init(params)
    grads = [np.array([1.0, np.nan, 2.0])] if wrapper.startswith("skip") else [np.ones(3)]
    with pytest.raises(TypeError):
        opt.step(state, grads, params, closure=None)
