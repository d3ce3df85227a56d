"""The JAX adapter (issue 5): ``ao.Optimizer`` under ``jit``/``vmap``/sharding and ``as_optax``.

Every registered optimizer must give the same trajectory eagerly, under ``jax.jit``, under
``jax.vmap`` (an ensemble of 3 models, each checked against its own eager run) and through
``as_optax`` inside an optax chain; hyperparameters are state, so ``set_hparams`` never
retraces; ``jit_step`` donates its buffers; ``as_optax`` composes with optax's own transforms
and matches optax's optimizers (the independent reference) there and in an equinox loop; the
Hessian helpers match exact Hessians from ``jax.hessian``.

JAX runs with x64 enabled (the ``jax_backend`` fixture), so float64 cases are float64.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import agnostic_optim as ao
from agnostic_optim.conformance.compare import relative_error
from helpers import with_momentum_and_decay

jax = pytest.importorskip("jax", reason="jax is not installed")
jnp = pytest.importorskip("jax.numpy", reason="jax is not installed")
flatten_util = pytest.importorskip("jax.flatten_util", reason="jax is not installed")
optax = pytest.importorskip("optax", reason="optax is not installed")
adapter = pytest.importorskip("agnostic_optim.adapters.jax", reason="the JAX adapter needs jax and optax")

REGISTRY = ao.registry()
ROOT = Path(__file__).resolve().parents[1]
TOL = {"float64": 1e-12, "float32": 1e-6}
STEPS = 4
SHAPES = {"bias": (3,), "scale": (), "weight": (2, 3, 2)}  # a pytree with a 0-d, 1-d and 3-d leaf


@pytest.fixture(autouse=True)
def _x64(jax_backend):
    """Every test here runs with x64 enabled (the shared ``jax`` backend turns it on)."""
    assert jax.config.jax_enable_x64
    return jax_backend


# --------------------------------------------------------------------------- problem


def host_tree(rng: np.random.Generator, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {k: scale * rng.standard_normal(s) for k, s in SHAPES.items()}


def to_jax(tree: dict[str, np.ndarray], dtype: str) -> dict[str, Any]:
    return {k: jnp.asarray(v, dtype=dtype) for k, v in tree.items()}


def host(tree: Any) -> list[np.ndarray]:
    # copies: a NumPy view of a JAX buffer would pin it (a pinned buffer cannot be donated)
    return [np.array(leaf, dtype=np.float64, copy=True) for leaf in jax.tree.leaves(tree)]


CURVATURE = {k: np.linspace(0.5, 2.0, int(np.prod(s))).reshape(s) for k, s in SHAPES.items()}


def extra_inputs(entry: ao.RegistryEntry, params: Any) -> dict[str, Any]:
    """Extra step inputs of optimizers that need them, from the loss ½ Σ c θ² (c = CURVATURE)."""
    c = jax.tree.map(lambda p, k: jnp.asarray(k, p.dtype), params, dict(CURVATURE))

    def grads_of(ps):
        return jax.tree.map(jnp.multiply, c, ps)

    def loss_of(ps):
        return sum(jnp.sum(k * p * p) / 2 for k, p in zip(jax.tree.leaves(c), jax.tree.leaves(ps)))

    makers = {
        "grad_fn": lambda: grads_of,
        "value_and_grad_fn": lambda: lambda ps: (loss_of(ps), grads_of(ps)),
        "hessian_diag": lambda: c,
        "layer_stats": lambda: None,  # no 2-D leaf here: K-FAC runs its SGD part (test_kfac.py)
    }
    missing = sorted(set(entry.inputs) - set(makers))
    if missing:
        pytest.fail(f"{entry.name} needs step inputs {missing}: teach extra_inputs in this test to make them")
    return {name: makers[name]() for name in entry.inputs}


def run_eager(entry, opt, params, grad_stream, step=None):
    step = step or opt.step
    state = opt.init(params)
    out = []
    for grads in grad_stream:
        state, params = step(state, grads, params, **extra_inputs(entry, params))
        out.append(host(params))
    return out, state, params


def worst_error(ours, reference) -> float:
    return max(relative_error(a, b) for sa, sb in zip(ours, reference, strict=True) for a, b in zip(sa, sb))


# --------------------------------------------------------------------------- every optimizer

FUNCTION_INPUTS = ("grad_fn", "value_and_grad_fn")  # step inputs that are Python functions


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", list(REGISTRY))
def test_eager_jit_vmap_and_optax_chain_agree(name, dtype, rng):
    entry = REGISTRY[name]
    opt = with_momentum_and_decay(entry)
    copies = [to_jax(host_tree(rng), dtype) for _ in range(3)]
    streams = [[to_jax(host_tree(rng), dtype) for _ in range(STEPS)] for _ in range(3)]
    eager = [run_eager(entry, opt, copies[i], streams[i])[0] for i in range(3)]
    errors: dict[str, float] = {}

    # jax.jit of the pure step (a function input, SAM's grad_fn, is static: jit closes over it)
    functions = tuple(name for name in entry.inputs if name in FUNCTION_INPUTS)
    step = jax.jit(opt.step, static_argnames=functions)
    if not opt.traceable:  # L-BFGS branches on values: it says so under jit (and vmap)
        with pytest.raises(TypeError, match="cannot be traced"):
            run_eager(entry, opt, copies[0], streams[0], step=step)
    else:
        jitted, state, params = run_eager(entry, opt, copies[0], streams[0], step=step)
        errors["jit"] = worst_error(jitted, eager[0])
        assert all(leaf.dtype == jnp.dtype(dtype) for leaf in jax.tree.leaves(params))
        for buf in jax.tree.leaves(state.buffers if hasattr(state, "buffers") else state):
            if jnp.issubdtype(buf.dtype, jnp.floating) and buf.ndim:
                assert buf.dtype == jnp.dtype(dtype), f"{name}: state buffer {buf.dtype} != {dtype}"

        # jax.vmap over an ensemble of 3 models: vmap(init), vmap(step), each copy vs its own run
        def stack(trees):
            return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)

        batched = stack(copies)
        vstate = jax.vmap(opt.init)(batched)
        vstep = jax.vmap(lambda s, g, p: opt.step(s, g, p, **extra_inputs(entry, p)))
        vtraj: list[list[list[np.ndarray]]] = [[], [], []]
        for k in range(STEPS):
            vstate, batched = vstep(vstate, stack([streams[i][k] for i in range(3)]), batched)
            for i in range(3):
                vtraj[i].append(host(jax.tree.map(lambda x, i=i: x[i], batched)))
        for i in range(3):
            errors[f"vmap copy {i}"] = worst_error(vtraj[i], eager[i])
        assert not np.allclose(vtraj[0][-1][2], vtraj[1][-1][2]), "the vmapped copies should differ"

    # as_optax inside an optax chain, with optax.apply_updates (extra inputs via extra_args);
    # eager here (jit and vmap are checked above, as_optax under jit in the tests below)
    tx = optax.chain(optax.identity(), adapter.as_optax(opt))

    def optax_step(opt_state, grads, params):
        updates, opt_state = tx.update(grads, opt_state, params, **extra_inputs(entry, params))
        return opt_state, optax.apply_updates(params, updates)

    opt_state, params, otraj = tx.init(copies[0]), copies[0], []
    for grads in streams[0]:
        opt_state, params = optax_step(opt_state, grads, params)
        otraj.append(host(params))
    errors["as_optax chain"] = worst_error(otraj, eager[0])
    assert all(leaf.dtype == jnp.dtype(dtype) for leaf in jax.tree.leaves(params))

    bad = {k: v for k, v in errors.items() if not v <= TOL[dtype]}
    assert not bad, f"{name} {dtype}: relative errors vs the eager run beyond {TOL[dtype]:.0e}: {bad}"
    # the optimizer did move the params
    assert worst_error(eager[0][-1:], [host(copies[0])]) > 1e-4


def test_x64_disabled_runs_under_jit_with_float32_hparams(rng):
    """With x64 off there is no float64: hyperparameters are float32 0-d arrays and the jitted
    step matches the eager step and optax.adamw (same float32 scalar arithmetic)."""
    with jax.enable_x64(False):
        params = to_jax(host_tree(rng), "float32")
        stream = [to_jax(host_tree(rng), "float32") for _ in range(STEPS)]
        opt = ao.adamw(lr=1e-2, weight_decay=0.1)
        state = opt.init(params)
        hparams = jax.tree.leaves(ao.get_hparams(state))
        assert hparams and all(h.dtype == jnp.float32 for h in hparams)
        floating = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
        assert floating and all(x.dtype == jnp.float32 for x in floating)
        eager, _, _ = run_eager(REGISTRY["adamw"], opt, params, stream)
        jitted, state, out = run_eager(REGISTRY["adamw"], opt, params, stream, step=jax.jit(opt.step))
        assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(out))
        assert all(h.dtype == jnp.float32 for h in jax.tree.leaves(ao.get_hparams(state)))

        tx = optax.adamw(1e-2, weight_decay=0.1)
        update = jax.jit(tx.update)
        opt_state, ref, reference = tx.init(params), params, []
        for grads in stream:
            updates, opt_state = update(grads, opt_state, ref)
            ref = optax.apply_updates(ref, updates)
            reference.append(host(ref))
    assert worst_error(jitted, eager) <= TOL["float32"]
    assert worst_error(jitted, reference) <= TOL["float32"]


# --------------------------------------------------------------------------- hparams and donation


def test_set_hparams_between_jitted_steps_compiles_once(rng):
    opt = ao.adamw(lr=1e-2, weight_decay=0.05)
    params = to_jax(host_tree(rng), "float64")
    stream = [to_jax(host_tree(rng), "float64") for _ in range(5)]
    traces = []

    def counted_step(state, grads, params):
        traces.append(1)  # runs only when jax traces
        return opt.step(state, grads, params)

    step = jax.jit(counted_step)
    lrs = [1e-2, 3e-3, 0.1, 5e-4, 2e-2]
    jstate, jparams = opt.init(params), params
    estate, eparams = opt.init(params), params
    cstate, cparams = opt.init(params), params  # constant lr, to show the changes took effect
    for lr, grads in zip(lrs, stream):
        jstate = ao.set_hparams(jstate, lr=lr)
        jstate, jparams = step(jstate, grads, jparams)
        estate, eparams = opt.step(ao.set_hparams(estate, lr=lr), grads, eparams)
        cstate, cparams = opt.step(cstate, grads, cparams)
        assert worst_error([host(jparams)], [host(eparams)]) <= 1e-12
    assert len(traces) == 1, f"jit traced {len(traces)} times for 5 steps with changing lr"
    assert float(ao.get_hparams(jstate)["lr"]) == lrs[-1]
    assert worst_error([host(jparams)], [host(cparams)]) > 1e-3


@pytest.mark.parametrize("name", ["adamw", "lion", "nadam"])
def test_jit_step_donates_params_and_state_and_matches_eager(name, rng):
    entry = REGISTRY[name]
    opt = with_momentum_and_decay(entry)
    params = to_jax(host_tree(rng), "float64")
    stream = [to_jax(host_tree(rng), "float64") for _ in range(3)]
    eager, _, _ = run_eager(entry, opt, params, stream)

    step = adapter.jit_step(opt)
    state, current = opt.init(params), jax.tree.map(jnp.copy, params)
    ours = []
    for grads in stream:
        old_params = jax.tree.leaves(current)
        old_buffers = jax.tree.leaves(state.buffers)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            state, current = step(state, grads, current)
        assert not [w for w in caught if "donat" in str(w.message)], [str(w.message) for w in caught]
        assert all(x.is_deleted() for x in old_params), "params passed to jit_step were not donated"
        assert all(x.is_deleted() for x in old_buffers), "state buffers were not donated"
        assert not any(g.is_deleted() for g in jax.tree.leaves(grads)), "grads must not be donated"
        ours.append(host(current))
    assert worst_error(ours, eager) <= 1e-12

    plain = adapter.jit_step(opt, donate=False)
    kept = jax.tree.map(jnp.copy, params)
    plain(opt.init(kept), stream[0], kept)
    assert not any(x.is_deleted() for x in jax.tree.leaves(kept))


# --------------------------------------------------------------------------- as_optax


def _run_optax(tx, params, stream, **extra):
    @jax.jit
    def step(opt_state, grads, params):
        updates, opt_state = tx.update(grads, opt_state, params, **extra)
        return opt_state, optax.apply_updates(params, updates)

    opt_state, out = tx.init(params), []
    for grads in stream:
        opt_state, params = step(opt_state, grads, params)
        out.append(host(params))
    return out


def test_as_optax_lion_after_clip_by_global_norm_matches_optax_lion(rng):
    params = to_jax(host_tree(rng), "float64")
    # global norms of ~0.3 to ~6: some steps are clipped, some are not
    stream = [to_jax(host_tree(rng, scale), "float64") for scale in (2.0, 0.05, 1.0, 0.08, 3.0, 0.1)]
    norms = [float(optax.tree.norm(g)) for g in stream]
    assert min(norms) < 1.0 < max(norms)
    lr, b1, b2, wd = 0.01, 0.9, 0.99, 1e-3
    ours = _run_optax(
        optax.chain(
            optax.clip_by_global_norm(1.0), adapter.as_optax(ao.lion(lr=lr, betas=(b1, b2), weight_decay=wd))
        ),
        params,
        stream,
    )
    reference = _run_optax(
        optax.chain(optax.clip_by_global_norm(1.0), optax.lion(lr, b1=b1, b2=b2, weight_decay=wd)),
        params,
        stream,
    )
    assert worst_error(ours, reference) <= 1e-12
    assert worst_error(ours[-1:], [host(params)]) > 1e-3


def test_as_optax_inside_multisteps_matches_optax_adamw(rng):
    params = to_jax(host_tree(rng), "float64")
    stream = [to_jax(host_tree(rng), "float64") for _ in range(6)]
    lr, wd = 1e-2, 0.05
    ours = _run_optax(optax.MultiSteps(adapter.as_optax(ao.adamw(lr=lr, weight_decay=wd)), 3), params, stream)
    reference = _run_optax(optax.MultiSteps(optax.adamw(lr, weight_decay=wd), 3), params, stream)
    assert worst_error(ours, reference) <= 1e-12
    # params change only on every 3rd step (the accumulated mean gradient is applied)
    assert np.array_equal(ours[0][1], host(params)[1]) and np.array_equal(ours[1][1], host(params)[1])
    assert not np.array_equal(ours[2][1], host(params)[1])


def test_as_optax_update_without_params_raises_clear_error(rng):
    params = to_jax(host_tree(rng), "float64")
    grads = to_jax(host_tree(rng), "float64")
    for tx in (adapter.as_optax(ao.adamw()), optax.chain(optax.identity(), adapter.as_optax(ao.sgd(0.1)))):
        with pytest.raises(ValueError, match="params"):
            tx.update(grads, tx.init(params))


def test_as_optax_extra_args_pass_through(rng):
    params = to_jax(host_tree(rng), "float64")
    grads = to_jax(host_tree(rng), "float64")
    hdiag = to_jax(host_tree(rng), "float64")

    # an optimizer that takes no inputs ignores extra args (as optax requires in a chain)
    tx = optax.chain(optax.identity(), adapter.as_optax(ao.adamw(lr=0.1)))
    plain, _ = tx.update(grads, tx.init(params), params)
    extra, _ = tx.update(grads, tx.init(params), params, hessian_diag=hdiag, unrelated=3)
    assert worst_error([host(extra)], [host(plain)]) == 0.0

    # one that declares inputs receives exactly those, unchanged
    base = ao.sgd(lr=0.1)
    seen: dict[str, Any] = {}

    def step(state, grads, params, **inputs):
        seen.update(inputs)
        return base.step(state, grads, params)

    probe = ao.Optimizer(init=base.init, step=step, name="probe", inputs=("hessian_diag",))
    tx = optax.chain(optax.identity(), adapter.as_optax(probe))
    tx.update(grads, tx.init(params), params, hessian_diag=hdiag, unrelated=3)
    assert set(seen) == {"hessian_diag"} and seen["hessian_diag"] is hdiag


# --------------------------------------------------------------------------- equinox


def test_equinox_mlp_trains_with_as_optax_adamw_like_optax_adamw():
    eqx = pytest.importorskip(
        "equinox", reason="equinox is not installed (pip install equinox, or the project's test extra)"
    )
    key = jax.random.PRNGKey(0)
    model_key, x_key = jax.random.split(key)
    model = eqx.nn.MLP(4, 1, width_size=16, depth=2, key=model_key, dtype=jnp.float32)
    x = jax.random.normal(x_key, (32, 4), dtype=jnp.float32)
    y = jnp.sin(x[:, :1]) + 0.5 * x[:, 1:2] ** 2

    @eqx.filter_value_and_grad
    def loss_fn(model, x, y):
        return jnp.mean((jax.vmap(model)(x) - y) ** 2)

    def train(tx):
        params = eqx.filter(model, eqx.is_inexact_array)
        opt_state = tx.init(params)

        @eqx.filter_jit
        def step(model, opt_state):
            loss, grads = loss_fn(model, x, y)
            updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
            return eqx.apply_updates(model, updates), opt_state, loss

        current, losses = model, []
        for _ in range(50):
            current, opt_state, loss = step(current, opt_state)
            losses.append(float(loss))
        return current, losses

    lr, wd = 1e-2, 1e-2
    ours, our_losses = train(adapter.as_optax(ao.adamw(lr=lr, weight_decay=wd)))
    ref, ref_losses = train(optax.adamw(lr, weight_decay=wd))
    leaves = jax.tree.leaves(eqx.filter(ours, eqx.is_inexact_array))
    ref_leaves = jax.tree.leaves(eqx.filter(ref, eqx.is_inexact_array))
    assert leaves and all(leaf.dtype == jnp.float32 for leaf in leaves)
    assert our_losses[-1] < 0.5 * our_losses[0], "the MLP did not train"
    errors = [relative_error(np.asarray(a), np.asarray(b)) for a, b in zip(leaves, ref_leaves, strict=True)]
    assert max(errors) <= 1e-5, errors
    np.testing.assert_allclose(our_losses, ref_losses, rtol=1e-5)


# --------------------------------------------------------------------------- curvature inputs


def _nonquadratic(params):
    a, b = params["a"], params["b"]
    return jnp.sum(a**3) * jnp.sum(jnp.sin(b)) + jnp.sum(jnp.exp(0.3 * a)) + jnp.sum(a[:2] * b[0]) ** 2


def _exact_hessian(loss, params):
    flat, unravel = flatten_util.ravel_pytree(params)
    return jax.hessian(lambda f: loss(unravel(f)))(flat), unravel


def _curvature_params(rng):
    return {"a": jnp.asarray(rng.standard_normal(3)), "b": jnp.asarray(rng.standard_normal((2, 2)))}


def test_hessian_vector_product_is_exact(rng):
    params = _curvature_params(rng)
    vector = _curvature_params(rng)
    hessian, unravel = _exact_hessian(_nonquadratic, params)
    assert float(jnp.max(jnp.abs(hessian - jnp.diag(jnp.diag(hessian))))) > 0.1  # not diagonal
    expected = unravel(hessian @ flatten_util.ravel_pytree(vector)[0])
    got = adapter.hessian_vector_product(_nonquadratic, params, vector)
    assert jax.tree.structure(got) == jax.tree.structure(params)
    assert worst_error([host(got)], [host(expected)]) <= 1e-12


def test_hutchinson_diagonal_converges_to_the_exact_diagonal(rng):
    params = _curvature_params(rng)
    hessian, _ = _exact_hessian(_nonquadratic, params)
    n = 2000
    estimate = adapter.hutchinson_diagonal(_nonquadratic, params, jax.random.PRNGKey(3), num_samples=n)
    assert jax.tree.structure(estimate) == jax.tree.structure(params)
    got = np.asarray(flatten_util.ravel_pytree(estimate)[0])
    h = np.asarray(hessian)
    diag = np.diag(h)
    # z_i (H z)_i = H_ii + sum_{j != i} H_ij z_i z_j: the per-sample variance is sum_{j != i} H_ij^2
    stderr = np.sqrt((np.sum(h**2, axis=1) - diag**2) / n)
    assert np.all(np.abs(got - diag) <= 5 * stderr + 1e-12), (got, diag, stderr)
    assert np.max(np.abs(got - diag)) > 0  # a real Monte-Carlo estimate, not the exact diagonal


def test_hutchinson_is_exact_for_a_diagonal_hessian(rng):
    params = _curvature_params(rng)
    c = {"a": jnp.asarray([0.5, 2.0, 3.0]), "b": jnp.asarray([[1.0, -1.5], [0.25, 4.0]])}

    def separable(p):  # Hessian diag(c) - diag(sin p): diagonal, not constant
        return sum(jnp.sum(c[k] * p[k] ** 2 / 2 + jnp.sin(p[k])) for k in p)

    hessian, unravel = _exact_hessian(separable, params)
    expected = unravel(jnp.diag(hessian))
    for samples in (1, 4):
        estimate = jax.jit(lambda key, n=samples: adapter.hutchinson_diagonal(separable, params, key, n))
        for seed in range(3):
            got = estimate(jax.random.PRNGKey(seed))
            assert worst_error([host(got)], [host(expected)]) <= 1e-12
    with pytest.raises(ValueError, match="num_samples"):
        adapter.hutchinson_diagonal(separable, params, jax.random.PRNGKey(0), num_samples=0)


# --------------------------------------------------------------------------- sharding

SHARDING_SCRIPT = textwrap.dedent(
    """
    import json
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    import agnostic_optim as ao
    from agnostic_optim.adapters.jax import hutchinson_diagonal, jit_step, kfac_layer_stats

    devices = np.array(jax.devices())
    meshes = {
        "data": (
            Mesh(devices, ("data",)), {"w1": P("data", None), "b1": P("data"), "w2": P("data", None)}
        ),
        "model": (
            Mesh(devices, ("model",)), {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None)}
        ),
        "data_model": (
            Mesh(devices.reshape(4, 2), ("data", "model")),
            {"w1": P("data", "model"), "b1": P("model"), "w2": P("data", "model")},
        ),
    }
    rng = np.random.default_rng(7)
    init = {"w1": rng.normal(size=(8, 8)) * 0.3, "b1": rng.normal(size=8) * 0.1}
    init["w2"] = rng.normal(size=(8, 2)) * 0.3
    x = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(16, 2)), jnp.float32)

    def loss(params):
        return jnp.mean((jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] - y) ** 2)

    hutchinson = jax.jit(lambda params, key: hutchinson_diagonal(loss, params, key))
    layer_stats = jax.jit(lambda params: kfac_layer_stats(loss, params)[2])

    def inputs(name, params, step):
        if name == "sam":
            return {"grad_fn": jax.grad(loss)}
        if name == "lbfgs":
            return {"value_and_grad_fn": jax.value_and_grad(loss)}
        if name in ("adahessian", "sophia"):
            return {"hessian_diag": hutchinson(params, jax.random.PRNGKey(step))}
        if name == "kfac":
            return {"layer_stats": layer_stats(params)}
        return {}

    def build(name):
        if name == "sam":
            return ao.sam(ao.sgd(lr=0.1, momentum=0.9))
        if name == "lbfgs":
            return ao.lbfgs(max_iter=4)
        if name == "lookahead":
            return ao.lookahead(ao.adamw(1e-2))
        if name == "kfac":
            return ao.kfac(
                lr=0.05, weight_layout="in_out", cov_update_frequency=1, inverse_update_frequency=1
            )
        return ao.registry()[name].factory(lr=1e-2)

    def jitted(name):
        return build(name).traceable and name != "sam"  # (SAM's grad_fn input is a function)

    def run(name, params, jit):
        params = jax.tree.map(jnp.copy, params)  # (jit_step donates them)
        opt = build(name)
        state = opt.init(params)
        step = jit_step(opt) if jit else opt.step
        for k in range(3):
            grads = jax.grad(loss)(params)
            state, params = step(state, grads, params, **inputs(name, params, k))
        return state, params

    def placements_kept(state, params, specs, mesh):
        # every state leaf shaped like a param is sharded like it; every scalar is replicated
        for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
            key = getattr(path[-1], "key", None)
            if key in specs and leaf.shape == params[key].shape:
                if not leaf.sharding.is_equivalent_to(NamedSharding(mesh, specs[key]), leaf.ndim):
                    return f"{jax.tree_util.keystr(path)}: {leaf.sharding.spec}"
            elif leaf.ndim == 0 and not leaf.sharding.is_fully_replicated:
                return f"{jax.tree_util.keystr(path)}: not replicated"
        return ""

    report = {"devices": len(devices), "cases": {}}
    plain = {k: jnp.asarray(v, jnp.float32) for k, v in init.items()}
    reference = {name: run(name, plain, jit=False)[1] for name in ao.registry()}
    everyone, some = list(ao.registry()), ["adamw", "adan", "lamb", "shampoo", "sophia", "kfac"]
    for mesh_name, (mesh, specs) in meshes.items():
        for name in everyone if mesh_name == "data_model" else some:
            try:
                sharded = {
                    k: jax.device_put(jnp.asarray(v, jnp.float32), NamedSharding(mesh, specs[k]))
                    for k, v in init.items()
                }
                state, out = run(name, sharded, jitted(name))
                error = max(
                    float(np.max(np.abs(np.asarray(out[k]) - np.asarray(reference[name][k]))))
                    / float(np.max(np.abs(np.asarray(reference[name][k]))))
                    for k in init
                )
                moved = min(float(np.max(np.abs(np.asarray(reference[name][k]) - init[k]))) for k in init)
                kept = not jitted(name) or all(
                    out[k].sharding.is_equivalent_to(NamedSharding(mesh, specs[k]), out[k].ndim) for k in init
                )
                report["cases"][f"{name}/{mesh_name}"] = {
                    "error": error, "moved": moved, "params_keep_sharding": kept,
                    "state": placements_kept(state, out, specs, mesh) if jitted(name) else "",
                }
            except Exception as failure:
                what = f"{type(failure).__name__}: {failure}"[:300]
                report["cases"][f"{name}/{mesh_name}"] = {"failure": what}
    print("REPORT " + json.dumps(report))
    """
)


def test_every_optimizer_steps_params_sharded_over_any_mesh(tmp_path):
    """8 host devices; every registered optimizer (float32, 3 steps, its step inputs made by
    JAX) from params sharded over a data x model mesh, and six of them (the layer-wise and
    curvature rules among them) over data-only and model-only meshes: the params match the
    single-device run (relative to how far they moved) and keep their sharding; under
    ``jit_step`` every param-shaped state leaf stays sharded like its param and every scalar
    replicated. (Eager steps, L-BFGS's and SAM's, place their results where JAX's propagation
    puts them.)"""
    script = tmp_path / "sharded.py"
    script.write_text(SHARDING_SCRIPT)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("REPORT ")]
    assert line, done.stdout[-2000:]
    report = json.loads(line[-1][len("REPORT ") :])
    assert report["devices"] == 8
    assert len(report["cases"]) == len(ao.registry()) + 2 * 6
    failures = {name: case for name, case in report["cases"].items() if "failure" in case}
    assert not failures, failures
    for name, case in report["cases"].items():
        assert case["moved"] > 1e-4, (name, case)
        assert case["error"] <= 1e-5, (name, case)
        assert case["params_keep_sharding"], (name, case)
        assert not case["state"], (name, case)
