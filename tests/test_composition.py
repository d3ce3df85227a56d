"""Composition: chain, clip_by_global_norm, masked, skip_nonfinite and accumulate.

References: torch.nn.utils.clip_grad_norm_ followed by a torch.optim step; optax.chain with
optax.clip_by_global_norm; torch.optim with two param groups for masked weight decay;
torch.optim on the mean gradient and optax.MultiSteps for accumulation; for skip_nonfinite, a
run that never saw the bad steps. Everything in float64 to 1e-12 relative (max-norm per leaf),
and "unchanged" means bitwise equal.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest

import agnostic_optim as ao
from agnostic_optim.conformance.backends import Backend, get_backend
from agnostic_optim.conformance.compare import relative_error
from helpers import assert_trajectories_close, random_gradient_stream, random_leaves

TOL = 1e-12
STEPS = 30


# --------------------------------------------------------------------------- helpers


def host_leaves(tree: Any, backend: Backend) -> list[np.ndarray]:
    """Every array in a (state) tree as a float64 NumPy copy, in a fixed walk order.

    Written here, independently of ``agnostic_optim.trees``: dicts by sorted key, sequences in
    order, None skipped; Python scalars become 0-d arrays.
    """
    out: list[np.ndarray] = []

    def walk(node: Any) -> None:
        if node is None:
            return
        if hasattr(node, "shape") and hasattr(node, "dtype"):
            out.append(np.array(backend.to_numpy(node), copy=True))
        elif isinstance(node, dict):
            for key in sorted(node):
                walk(node[key])
        elif isinstance(node, (tuple, list)):
            for child in node:
                walk(child)
        else:
            out.append(np.asarray(node))

    walk(tree)
    return out


def assert_bitwise_equal(a: Sequence[np.ndarray], b: Sequence[np.ndarray], what: str) -> None:
    assert len(a) == len(b), f"{what}: {len(a)} arrays vs {len(b)}"
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.shape == y.shape and x.tobytes() == y.tobytes(), f"{what}: array {i} changed"


def torch_run(
    torch: Any,
    make: Callable[[list], Any],
    params: Sequence[np.ndarray],
    grad_stream: Sequence[Sequence[np.ndarray]],
    clip: float | None = None,
) -> list[list[np.ndarray]]:
    """torch.optim trajectory, with ``clip_grad_norm_(max_norm=clip)`` before each step if given."""
    tensors = [torch.tensor(p, dtype=torch.float64, requires_grad=True) for p in params]
    optimizer = make(tensors)
    trajectory = []
    for grads in grad_stream:
        for t, g in zip(tensors, grads):
            t.grad = torch.tensor(g, dtype=torch.float64)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(tensors, clip)
        optimizer.step()
        trajectory.append([t.detach().numpy().copy() for t in tensors])
    return trajectory


def run_ours(opt, backend: Backend, params, grad_stream, step=None) -> list[list[np.ndarray]]:
    step = step or opt.step
    current = [backend.asarray(p) for p in params]
    state = opt.init(current)
    trajectory = []
    for grads in grad_stream:
        state, current = step(state, [backend.asarray(g) for g in grads], current)
        trajectory.append([backend.to_numpy(p) for p in current])
    return trajectory


def scaled_stream(rng: np.random.Generator, steps: int) -> list[list[np.ndarray]]:
    """Gradients whose global norm alternates between ~0.3x and ~3x of sqrt(48)."""
    stream = random_gradient_stream(rng, steps)
    factors = [0.3 if k % 3 else 3.0 for k in range(steps)]
    return [[g * f for g in grads] for grads, f in zip(stream, factors)]


# --------------------------------------------------------------------------- chain + clipping

CLIP = 5.0


@pytest.mark.parametrize(
    ("label", "ours", "reference"),
    [
        (
            "sgd_momentum",
            lambda: ao.sgd(lr=0.05, momentum=0.9, weight_decay=1e-2),
            lambda torch, ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-2),
        ),
        (
            "adam",
            lambda: ao.adam(lr=1e-2, betas=(0.8, 0.95)),
            lambda torch, ps: torch.optim.Adam(ps, lr=1e-2, betas=(0.8, 0.95)),
        ),
    ],
)
def test_chain_clip_matches_torch_clip_grad_norm(backend: Backend, torch64, rng, label, ours, reference):
    params = random_leaves(rng)
    stream = scaled_stream(rng, STEPS)
    norms = [np.sqrt(sum(float(np.sum(g * g)) for g in grads)) for grads in stream]
    assert any(n > CLIP for n in norms) and any(n < CLIP for n in norms)

    opt = ao.chain(ao.clip_by_global_norm(CLIP), ours())
    assert isinstance(opt, ao.Optimizer)
    expected = torch_run(torch64, lambda ps: reference(torch64, ps), params, stream, clip=CLIP)
    assert_trajectories_close(run_ours(opt, backend, params, stream), expected, TOL)


def test_clip_changes_the_result(rng):
    """Guard: the clipped run really differs from the unclipped one on this stream."""
    params = random_leaves(rng)
    stream = scaled_stream(rng, 6)
    backend = get_backend("numpy")
    clipped = run_ours(ao.chain(ao.clip_by_global_norm(CLIP), ao.sgd(lr=0.1)), backend, params, stream)
    plain = run_ours(ao.sgd(lr=0.1), backend, params, stream)
    assert max(relative_error(a, b) for a, b in zip(clipped[-1], plain[-1])) > 1e-3


@pytest.mark.parametrize("backend_name", ["numpy", "jax"])
def test_clip_optax_convention_matches_optax_chain(jax_backend: Backend, rng, backend_name):
    import jax
    import jax.numpy as jnp
    import optax

    backend = get_backend(backend_name)
    params = random_leaves(rng)
    stream = scaled_stream(rng, STEPS)
    tx = optax.chain(optax.clip_by_global_norm(CLIP), optax.sgd(0.05, momentum=0.9))

    @jax.jit
    def optax_step(state, grads, current):
        updates, state = tx.update(grads, state, current)
        return state, optax.apply_updates(current, updates)

    current = [jnp.asarray(p) for p in params]
    state = tx.init(current)
    expected = []
    for grads in stream:
        state, current = optax_step(state, [jnp.asarray(g) for g in grads], current)
        expected.append([np.asarray(p, dtype=np.float64) for p in current])

    opt = ao.chain(ao.clip_by_global_norm(CLIP, convention="optax"), ao.sgd(lr=0.05, momentum=0.9))
    assert_trajectories_close(run_ours(opt, backend, params, stream), expected, TOL)


def test_chain_of_transforms_is_a_transform(rng):
    grads = random_leaves(rng)
    grads = [g * 3 for g in grads]
    one = ao.chain(ao.clip_by_global_norm(2.0))
    two = ao.chain(ao.clip_by_global_norm(2.0), ao.clip_by_global_norm(1.0))
    assert isinstance(one, ao.Transform) and isinstance(two, ao.Transform)
    assert not isinstance(two, ao.Optimizer)

    def clip(gs, c):  # torch's clip_grad_norm_ written out
        norm = np.sqrt(sum(float(np.sum(g * g)) for g in gs))
        return [g * min(1.0, c / (norm + 1e-6)) for g in gs]

    params = [np.zeros_like(g) for g in grads]
    state = two.init(params)
    _, out = two.update(state, grads, params)
    expected = clip(clip(grads, 2.0), 1.0)
    assert max(relative_error(a, b) for a, b in zip(out, expected)) <= TOL
    assert np.sqrt(sum(float(np.sum(g * g)) for g in out)) == pytest.approx(1.0, rel=1e-5)
    # the input gradients are untouched
    assert np.sqrt(sum(float(np.sum(g * g)) for g in grads)) > 2.0

    # a chain of transforms can itself lead a chain with an optimizer
    nested = ao.chain(two, ao.sgd(lr=0.5))
    plain = ao.chain(ao.clip_by_global_norm(2.0), ao.clip_by_global_norm(1.0), ao.sgd(lr=0.5))
    _, a = nested.step(nested.init(params), grads, params)
    _, b = plain.step(plain.init(params), grads, params)
    for x, y, g in zip(a, b, expected):
        np.testing.assert_allclose(x, -0.5 * g, rtol=1e-12)
        np.testing.assert_array_equal(x, y)


def test_chain_errors():
    clip = ao.clip_by_global_norm(1.0)
    with pytest.raises(TypeError):
        ao.chain(ao.sgd(lr=0.1), clip)
    with pytest.raises(TypeError):
        ao.chain(clip, ao.sgd(lr=0.1), ao.adam())
    with pytest.raises(TypeError):
        ao.chain(clip, "not a transform")
    with pytest.raises(TypeError):
        ao.chain(lambda g: g, ao.sgd(lr=0.1))
    with pytest.raises(ValueError):
        ao.chain()


def test_clip_invalid_arguments():
    with pytest.raises(ValueError):
        ao.clip_by_global_norm(-1.0)
    with pytest.raises(ValueError):
        ao.clip_by_global_norm(1.0, convention="keras")


# --------------------------------------------------------------------------- masked

NAMES = {
    "dense": {"kernel": (4, 5), "bias": (5,)},
    "conv": {"kernel": (2, 3, 2, 2), "bias": (3,)},
    "scale": (),
}


def tree_params(rng: np.random.Generator) -> dict:
    return {
        "dense": {"kernel": rng.standard_normal((4, 5)), "bias": rng.standard_normal(5)},
        "conv": {"kernel": rng.standard_normal((2, 3, 2, 2)), "bias": rng.standard_normal(3)},
        "scale": rng.standard_normal(()),
    }


PATHS = [("conv", "bias"), ("conv", "kernel"), ("dense", "bias"), ("dense", "kernel"), ("scale",)]


def get_path(tree: dict, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def map_tree(fn: Callable, tree: dict) -> dict:
    return {k: map_tree(fn, v) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


def subtree(tree: dict, paths: Sequence[tuple]) -> dict:
    out: dict = {}
    for path in paths:
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = get_path(tree, path)
    return out


@pytest.mark.parametrize("backend_name", ["numpy", "torch", "array_api_strict"])
@pytest.mark.parametrize("mask_kind", ["bool_tree", "callable"])
def test_masked_freezes_unselected_and_matches_opt_on_selected(backend_name, mask_kind, torch64, rng):
    backend = get_backend(backend_name)
    if not backend.available:
        pytest.skip(backend.reason)
    selected = [("conv", "kernel"), ("dense", "bias"), ("dense", "kernel")]
    seen_paths = []
    if mask_kind == "bool_tree":
        mask = {
            "dense": {"kernel": True, "bias": True},
            "conv": {"kernel": True, "bias": False},
            "scale": False,
        }
    else:

        def mask(path, leaf):
            seen_paths.append(tuple(path))
            assert hasattr(leaf, "shape")
            return tuple(path) in selected

    host = tree_params(rng)
    streams = [tree_params(rng) for _ in range(10)]
    to_backend = lambda t: map_tree(backend.asarray, t)  # noqa: E731

    opt = ao.masked(ao.adam(lr=0.1, betas=(0.8, 0.9)), mask)
    alone = ao.adam(lr=0.1, betas=(0.8, 0.9))
    params = to_backend(host)
    state = opt.init(params)
    sub_params = to_backend(subtree(host, selected))
    sub_state = alone.init(sub_params)
    for grads in streams:
        state, params = opt.step(state, to_backend(grads), params)
        sub_state, sub_params = alone.step(sub_state, to_backend(subtree(grads, selected)), sub_params)
        for path in PATHS:
            value = backend.to_numpy(get_path(params, path))
            if path in selected:
                expected = backend.to_numpy(get_path(sub_params, path))
                assert relative_error(value, expected) <= TOL, path
            else:
                assert value.tobytes() == get_path(host, path).tobytes(), f"{path} moved"
    for path in selected:
        assert np.max(np.abs(backend.to_numpy(get_path(params, path)) - get_path(host, path))) > 0.1
    if mask_kind == "callable":
        assert sorted(set(seen_paths)) == PATHS

    # the selected leaves also match torch.optim.Adam directly
    torch = torch64
    tensors = [torch.tensor(get_path(host, p), requires_grad=True) for p in selected]
    reference = torch.optim.Adam(tensors, lr=0.1, betas=(0.8, 0.9))
    for grads in streams:
        for t, p in zip(tensors, selected):
            t.grad = torch.tensor(get_path(grads, p))
        reference.step()
    for t, p in zip(tensors, selected):
        assert relative_error(backend.to_numpy(get_path(params, p)), t.detach().numpy()) <= TOL


@pytest.mark.parametrize("backend_name", ["numpy", "torch", "jax"])
def test_masked_weight_decay_matches_torch_adamw_param_groups(backend_name, torch64, rng):
    backend = get_backend(backend_name)
    if not backend.available:
        pytest.skip(backend.reason)

    def decay(path, leaf):
        return leaf.ndim >= 2

    opt = ao.masked(ao.adamw(lr=1e-2, weight_decay=0.1), decay, otherwise=ao.adamw(lr=1e-2, weight_decay=0.0))
    host = tree_params(rng)
    streams = [tree_params(rng) for _ in range(STEPS)]
    params = map_tree(backend.asarray, host)
    state = opt.init(params)
    for grads in streams:
        state, params = opt.step(state, map_tree(backend.asarray, grads), params)

    torch = torch64
    matrices = [p for p in PATHS if get_path(host, p).ndim >= 2]
    vectors = [p for p in PATHS if get_path(host, p).ndim < 2]
    tensors = {p: torch.tensor(get_path(host, p), requires_grad=True) for p in PATHS}
    reference = torch.optim.AdamW(
        [
            {"params": [tensors[p] for p in matrices], "weight_decay": 0.1},
            {"params": [tensors[p] for p in vectors], "weight_decay": 0.0},
        ],
        lr=1e-2,
    )
    for grads in streams:
        for p in PATHS:
            tensors[p].grad = torch.tensor(get_path(grads, p))
        reference.step()
    for p in PATHS:
        error = relative_error(backend.to_numpy(get_path(params, p)), tensors[p].detach().numpy())
        assert error <= TOL, f"{p}: relative error {error:.3e}"

    # guard: decaying the biases too gives a measurably different result
    everything = ao.adamw(lr=1e-2, weight_decay=0.1)
    other = map_tree(backend.asarray, host)
    other_state = everything.init(other)
    for grads in streams:
        other_state, other = everything.step(other_state, map_tree(backend.asarray, grads), other)
    assert (
        relative_error(backend.to_numpy(other["dense"]["bias"]), tensors[("dense", "bias")].detach().numpy())
        > 1e-6
    )


# --------------------------------------------------------------------------- skip_nonfinite


def _bad_stream(rng: np.random.Generator) -> tuple[list, list[int]]:
    good = random_gradient_stream(rng, 9)
    nan_step = [g.copy() for g in random_leaves(rng)]
    nan_step[2][1, 3] = np.nan
    inf_step = [g.copy() for g in random_leaves(rng)]
    inf_step[0] = np.asarray(np.inf)
    neg_inf_step = [g.copy() for g in random_leaves(rng)]
    neg_inf_step[3][0, 1, 1, 0] = -np.inf
    stream = [*good[:3], nan_step, inf_step, *good[3:6], neg_inf_step, *good[6:]]
    bad = [3, 4, 8]
    return stream, bad


def _check_skip_run(opt, backend: Backend, step, rng, torch):
    params = random_leaves(rng)
    stream, bad = _bad_stream(rng)
    good = [g for k, g in enumerate(stream) if k not in bad]

    current = [backend.asarray(p) for p in params]
    state = opt.init(current)
    trajectory = []
    skipped = 0
    for k, grads in enumerate(stream):
        before_params = [backend.to_numpy(p) for p in current]
        before_inner = host_leaves(state.inner, backend)
        state, current = step(state, [backend.asarray(g) for g in grads], current)
        count = state.skipped
        assert tuple(count.shape) == () and "int32" in str(count.dtype)
        if k in bad:
            skipped += 1
            assert_bitwise_equal([backend.to_numpy(p) for p in current], before_params, f"step {k} params")
            assert_bitwise_equal(host_leaves(state.inner, backend), before_inner, f"step {k} inner state")
        else:
            trajectory.append([backend.to_numpy(p) for p in current])
        assert int(backend.to_numpy(count)) == skipped

    # as if the bad steps never happened: torch.optim.Adam on the good gradients only
    expected = torch_run(torch, lambda ps: torch.optim.Adam(ps, lr=0.1, betas=(0.8, 0.95)), params, good)
    assert_trajectories_close(trajectory, expected, TOL)


def test_skip_nonfinite_eager(backend: Backend, torch64, rng):
    opt = ao.skip_nonfinite(ao.adam(lr=0.1, betas=(0.8, 0.95)))
    _check_skip_run(opt, backend, opt.step, rng, torch64)


def test_skip_nonfinite_under_jax_jit(jax_backend: Backend, torch64, rng):
    import jax

    opt = ao.skip_nonfinite(ao.adam(lr=0.1, betas=(0.8, 0.95)))
    _check_skip_run(opt, jax_backend, jax.jit(opt.step), rng, torch64)


def test_skip_nonfinite_with_momentum_sgd_matches_run_without_bad_steps(rng):
    """Also for SGD's first-step momentum seeding: a skipped first step must not seed the buffer."""
    backend = get_backend("numpy")
    params = random_leaves(rng)
    good = random_gradient_stream(rng, 5)
    bad = [g.copy() for g in random_leaves(rng)]
    bad[1][0] = np.nan
    opt = ao.skip_nonfinite(ao.sgd(lr=0.1, momentum=0.9, dampening=0.5))
    ours = run_ours(opt, backend, params, [bad, *good])
    reference = run_ours(ao.sgd(lr=0.1, momentum=0.9, dampening=0.5), backend, params, good)
    assert_bitwise_equal(ours[0], params, "params after the skipped first step")
    assert_trajectories_close(ours[1:], reference, 0.0)


# --------------------------------------------------------------------------- accumulate

EVERY = 4


def mean_stream(stream: Sequence[Sequence[np.ndarray]], every: int) -> list[list[np.ndarray]]:
    out = []
    for start in range(0, len(stream) - every + 1, every):
        chunk = stream[start : start + every]
        out.append([sum(gs) / every for gs in zip(*chunk)])
    return out


def _check_accumulate(backend: Backend, step_fn, opt, torch_make, torch, rng, steps: int = 4 * 6):
    params = random_leaves(rng)
    stream = random_gradient_stream(rng, steps)
    trajectory = run_ours(opt, backend, params, stream, step=step_fn)
    previous = params
    for k, current in enumerate(trajectory):
        if (k + 1) % EVERY:
            assert_bitwise_equal(current, previous, f"micro step {k + 1}")
        else:
            assert max(np.max(np.abs(a - b)) for a, b in zip(current, previous)) > 0
        previous = current
    expected = torch_run(torch, torch_make, params, mean_stream(stream, EVERY))
    assert_trajectories_close(trajectory[EVERY - 1 :: EVERY], expected, TOL)


@pytest.mark.parametrize(
    ("label", "ours", "reference"),
    [
        (
            "sgd_momentum",
            lambda: ao.sgd(lr=0.1, momentum=0.9),
            lambda torch: lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
        ),
        (
            "adam",
            lambda: ao.adam(lr=0.05, betas=(0.8, 0.9)),
            lambda torch: lambda ps: torch.optim.Adam(ps, lr=0.05, betas=(0.8, 0.9)),
        ),
    ],
)
def test_accumulate_equals_opt_on_mean_gradient(backend: Backend, torch64, rng, label, ours, reference):
    opt = ao.accumulate(ours(), every=EVERY)
    _check_accumulate(backend, opt.step, opt, reference(torch64), torch64, rng)


def test_accumulate_under_jax_jit(jax_backend: Backend, torch64, rng):
    import jax

    opt = ao.accumulate(ao.adam(lr=0.05, betas=(0.8, 0.9)), every=EVERY)
    make = lambda ps: torch64.optim.Adam(ps, lr=0.05, betas=(0.8, 0.9))  # noqa: E731
    _check_accumulate(jax_backend, jax.jit(opt.step), opt, make, torch64, rng)


@pytest.mark.parametrize(("backend_name", "jit"), [("numpy", False), ("jax", False), ("jax", True)])
def test_accumulate_matches_optax_multisteps(jax_backend: Backend, rng, backend_name, jit):
    import jax
    import jax.numpy as jnp
    import optax

    backend = get_backend(backend_name)
    params = random_leaves(rng)
    stream = random_gradient_stream(rng, 4 * 5 + 2)

    # optax accumulates in float32 by default; ask for float64 like the params
    tx = optax.MultiSteps(optax.sgd(0.1, momentum=0.9), every_k_schedule=EVERY, accumulator_dtype=jnp.float64)

    def optax_step(state, grads, current):
        updates, state = tx.update(grads, state, current)
        return state, optax.apply_updates(current, updates)

    optax_step = jax.jit(optax_step)  # the reference is always jitted (eager optax is slow)
    current = [jnp.asarray(p) for p in params]
    state = tx.init(current)
    expected = []
    for grads in stream:
        state, current = optax_step(state, [jnp.asarray(g) for g in grads], current)
        expected.append([np.asarray(p, dtype=np.float64) for p in current])

    opt = ao.accumulate(ao.sgd(lr=0.1, momentum=0.9), every=EVERY)
    step = jax.jit(opt.step) if jit else opt.step
    assert_trajectories_close(run_ours(opt, backend, params, stream, step=step), expected, TOL)


def test_accumulate_every_one_is_the_plain_optimizer(rng):
    backend = get_backend("numpy")
    params = random_leaves(rng)
    stream = random_gradient_stream(rng, 5)
    a = run_ours(ao.accumulate(ao.adam(lr=0.1), every=1), backend, params, stream)
    b = run_ours(ao.adam(lr=0.1), backend, params, stream)
    assert_trajectories_close(a, b, TOL)


@pytest.mark.parametrize("every", [0, -2, 2.0, "4"])
def test_accumulate_invalid_every(every):
    with pytest.raises(ValueError):
        ao.accumulate(ao.sgd(lr=0.1), every=every)
