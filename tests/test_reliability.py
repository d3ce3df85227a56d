"""Reliability: every input is checked before anything changes, states are checked against the
params and optimizer they are used with, and checkpoints survive crashes and refuse corruption.

Bad inputs are tried on the functional API (every registered optimizer), ``set_hparams``, the
torch classes and ``ArrayOptimizer``; properties (hypothesis) over random trees, shapes, dtypes
and hyperparameters: purity, shape and dtype preservation, NumPy = torch in float64, save ->
load -> step = step, and any changed byte of a checkpoint is an error.
"""

from __future__ import annotations

import copy
import math
import os
import pathlib
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import agnostic_optim as ao
from agnostic_optim import checkpoint

REGISTRY = ao.registry()
# the factories built from hyperparameters alone (the wrappers take a base optimizer)
PLAIN = sorted(name for name, entry in REGISTRY.items() if not entry.wraps)
# what a step of each needs besides (state, grads, params)
INPUTS = {
    "lbfgs": lambda params: {
        "value_and_grad_fn": lambda p: (sum(float(np.sum(x * x)) for x in p.values()), dict(p))
    },
    "adahessian": lambda params: {"hessian_diag": {k: np.abs(v) + 0.1 for k, v in params.items()}},
    "sophia": lambda params: {"hessian_diag": {k: np.abs(v) + 0.1 for k, v in params.items()}},
    "kfac": lambda params: {},
}


def tree(dtype: str = "float64") -> dict:
    rng = np.random.default_rng(0)
    return {"encoder": {"w": rng.normal(size=(3, 2)).astype(dtype), "b": rng.normal(size=2).astype(dtype)}}


# ------------------------------------------------------------------ hyperparameters


BAD_LR = [
    (float("inf"), ValueError, "must be finite"),
    (float("nan"), ValueError, "Invalid"),
    (-1.0, ValueError, "Invalid"),
    ("0.1", TypeError, "is a str"),
    (None, TypeError, "is a NoneType"),
    (True, TypeError, "is a bool"),
]


@pytest.mark.parametrize("name", PLAIN)
@pytest.mark.parametrize(
    ("lr", "error", "message"), BAD_LR, ids=["inf", "nan", "negative", "str", "None", "bool"]
)
def test_a_bad_learning_rate_is_refused_at_construction(name: str, lr, error, message) -> None:
    with pytest.raises(error, match=message):
        REGISTRY[name].factory(lr=lr)


@pytest.mark.parametrize(
    ("values", "error"),
    [
        ({"lr": -1.0}, ValueError),
        ({"lr": float("nan")}, ValueError),
        ({"lr": float("inf")}, ValueError),
        ({"betas": (0.9, 1.5)}, ValueError),
        ({"eps": -1e-8}, ValueError),
        ({"lr": "0.1"}, TypeError),
        ({"lr": np.ones(2)}, ValueError),
    ],
    ids=str,
)
def test_set_hparams_checks_values_as_construction_does(values: dict, error: type) -> None:
    state = ao.adam(1e-3).init(tree())
    with pytest.raises(error):
        ao.set_hparams(state, **values)
    assert float(ao.get_hparams(state)["lr"]) == 1e-3
    ao.set_hparams(state, lr=0.5, betas=(0.8, 0.9))  # (valid values pass)


def test_a_schedule_that_returns_nan_is_refused_at_the_step() -> None:
    opt = ao.sgd(lr=lambda count: float("nan") if count > 0 else 0.1)
    params = tree()
    state, params = opt.step(opt.init(params), params, params)  # (its value at count 0: 0.1)
    with pytest.raises(ValueError, match="Invalid lr: nan"):
        opt.step(state, params, params)


# ------------------------------------------------------------------ trees and states


def test_errors_name_the_leaf_by_its_path() -> None:
    params, opt = tree(), ao.adamw(1e-3)
    state = opt.init(params)
    bad = copy.deepcopy(params)
    bad["encoder"]["w"] = np.zeros((2, 3))
    with pytest.raises(
        ValueError, match=r"grads\['encoder'\]\['w'\] has shape \(2, 3\), params have \(3, 2\)"
    ):
        opt.step(state, bad, params)
    with pytest.raises(ValueError, match=r"missing grads\['encoder'\]\['b'\]"):
        opt.step(state, {"encoder": {"w": params["encoder"]["w"]}}, params)
    with pytest.raises(ValueError, match=r"unexpected grads\['encoder'\]\['c'\]"):
        opt.step(state, {"encoder": {**params["encoder"], "c": np.zeros(1)}}, params)
    bad["encoder"]["w"] = params["encoder"]["w"].astype(np.float32)
    with pytest.raises(TypeError, match=r"grads\['encoder'\]\['w'\] has dtype float32, params have float64"):
        opt.step(state, bad, params)


def test_a_state_is_checked_against_its_params_and_optimizer() -> None:
    params = tree()
    opt = ao.adam(1e-3)
    small = {"encoder": {"w": np.zeros((1, 2)), "b": np.zeros(2)}}
    with pytest.raises(ValueError, match=r"must have \(3, 2\) and float64"):
        opt.step(opt.init(small), params, params)  # (would broadcast)
    with pytest.raises(ValueError, match="float32"):
        opt.step(opt.init(tree("float32")), params, params)
    with pytest.raises(ValueError, match="made by another optimizer"):
        opt.step(ao.adamw(1e-3, weight_decay=0.1).init(params), params, params)  # (same buffers)
    with pytest.raises(ValueError, match="holds buffers"):
        opt.step(ao.sgd(lr=0.1, momentum=0.9).init(params), params, params)
    with pytest.raises(ValueError, match=r"made by another optimizer or options \(adam\(\)\)"):
        ao.lamb().step(opt.init(params), params, params)  # (the same buffers and hyperparameters)
    with pytest.raises(ValueError, match=r"maximize=True"):
        opt.step(ao.adam(1e-3, maximize=True).init(params), params, params)


def test_a_checkpoint_loads_only_into_the_optimizer_that_saved_it(tmp_path: pathlib.Path) -> None:
    params = tree()
    checkpoint.save_state(tmp_path / "adam.safetensors", ao.adam().init(params))
    with pytest.raises(
        ValueError, match=r"a state of \['adam\(\)'\] does not load into one of \['lamb\(\)'\]"
    ):
        checkpoint.load_state(tmp_path / "adam.safetensors", like=ao.lamb().init(params))
    state = checkpoint.load_state(tmp_path / "adam.safetensors", like=ao.adam().init(params))
    assert state.rule == "adam()"


def test_as_optax_reports_the_same_errors(jax_backend) -> None:
    import jax.numpy as jnp

    from agnostic_optim.adapters.jax import as_optax

    params = {"encoder": {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}}
    tx = as_optax(ao.adamw(1e-3))
    state = tx.init(params)
    with pytest.raises(
        ValueError, match=r"grads\['encoder'\]\['w'\] has shape \(2, 3\), params have \(3, 2\)"
    ):
        tx.update({"encoder": {"w": jnp.ones((2, 3)), "b": jnp.ones(2)}}, state, params)
    with pytest.raises(ValueError, match="made by another optimizer"):
        as_optax(ao.lamb()).update(params, state, params)


def test_array_optimizer_refuses_shared_arrays_and_checks_rebound_leaves() -> None:
    from agnostic_optim.adapters.numpy import ArrayOptimizer

    table = np.zeros((4, 3))
    with pytest.raises(ValueError, match=r"params\['a'\] and params\['b'\] are the same array"):
        ArrayOptimizer({"a": table, "b": table}, ao.adam())
    with pytest.raises(ValueError, match="share memory"):
        ArrayOptimizer({"a": table[:2], "b": table[1:]}, ao.adam())
    params = tree()
    opt = ArrayOptimizer(params, ao.adam(1e-2))
    opt.step(copy.deepcopy(params))
    params["encoder"]["w"] = np.ones((4, 2))  # rebound to another shape: refused, nothing written
    before = copy.deepcopy(params)
    with pytest.raises(ValueError, match="state made for other params"):
        opt.step(copy.deepcopy(params))
    np.testing.assert_array_equal(params["encoder"]["b"], before["encoder"]["b"])


# ------------------------------------------------------------------ the torch classes


torch_only = pytest.mark.skipif(
    __import__("importlib").util.find_spec("torch") is None, reason="torch is not installed"
)


@torch_only
def test_torch_load_state_dict_refuses_another_optimizers_state_before_changing_anything() -> None:
    import torch

    from agnostic_optim.adapters import torch as ours

    model = torch.nn.Linear(3, 2)
    adamw = ours.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 3)).sum().backward()
    adamw.step()
    saved = adamw.state_dict()
    for make in (
        lambda: ours.Lion(model.parameters()),
        lambda: ours.SGD(model.parameters(), lr=0.1, momentum=0.9),
    ):
        opt = make()
        opt.step()  # (a state of its own, which a refused load must leave as it was)
        before = {p: {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
        groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        with pytest.raises(ValueError, match="another optimizer"):
            opt.load_state_dict(saved)
        assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups
        assert all(torch.equal(opt.state[p][k], v) for p, s in before.items() for k, v in s.items())
    for edit, message in (
        (lambda d: d["state"][0].__setitem__("step", torch.tensor(-5.0)), "step -5"),
        (lambda d: d["state"][0].__setitem__("exp_avg", torch.zeros(5)), "has shape"),
        (lambda d: d["param_groups"][0].__setitem__("lr", float("nan")), "Invalid learning rate"),
        (lambda d: d["param_groups"][0].__setitem__("betas", (0.9, 1.5)), "beta parameter at index 1"),
    ):
        bad = copy.deepcopy(saved)
        edit(bad)
        with pytest.raises(ValueError, match=message):
            ours.AdamW(model.parameters()).load_state_dict(bad)


@torch_only
def test_torch_param_listed_twice_is_refused_at_the_step() -> None:
    """torch.optim warns at construction (its own test asks for the warning) and then steps
    such a param twice; ours warns the same and refuses the step before anything moves."""
    import torch

    from agnostic_optim.adapters import torch as ours

    weight = torch.nn.Parameter(torch.ones(3))
    with pytest.warns(UserWarning, match="duplicate parameters"):
        opt = ours.SGD([weight, weight], lr=0.1)
    weight.grad = torch.ones(3)
    with pytest.raises(ValueError, match="listed twice"):
        opt.step()
    assert torch.equal(weight.detach(), torch.ones(3))


@torch_only
def test_torch_group_edited_between_steps_is_checked_before_any_group_moves() -> None:
    import torch

    from agnostic_optim.adapters import torch as ours

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    opt = ours.Adam([{"params": model[0].parameters()}, {"params": model[1].parameters()}], lr=1e-2)
    for lr in (float("nan"), -1.0, float("inf")):
        opt.param_groups[1]["lr"] = lr
        model(torch.randn(4, 3)).sum().backward()
        before = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(ValueError, match="Invalid lr"):
            opt.step()
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # (group 0 too)
    opt.param_groups[1]["lr"] = 1e-2
    opt.step()
    with pytest.raises(ValueError, match="Invalid learning rate"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "lr": float("inf")})
    assert len(opt.param_groups) == 2


# ------------------------------------------------------------------ checkpoints


def test_a_checkpoint_with_an_impossible_count_or_hyperparameter_is_refused(tmp_path: pathlib.Path) -> None:
    from safetensors.numpy import save_file

    params = tree()
    state = ao.adam(1e-3).init(params)
    good = checkpoint.state_to_dict(state)
    for key, value, message in (
        ("count", np.array(-5, np.int32), "not a step count"),
        ("hparams.lr", np.array(np.nan), "Invalid lr"),
    ):
        arrays = {k: np.asarray(v) for k, v in good.items()}
        arrays[key] = value
        save_file(arrays, str(tmp_path / "bad.safetensors"))  # (no checksum: written by someone else)
        with pytest.raises(ValueError, match=message):
            checkpoint.load_state(tmp_path / "bad.safetensors", like=state)


SAVER = textwrap.dedent(
    """
    import sys
    import numpy as np
    import agnostic_optim as ao
    path = sys.argv[1]
    params = {"w": np.zeros((1024, 2048)), "v": np.zeros(4096)}   # 16 MiB of state buffers
    opt = ao.adam(1e-3)
    state = opt.init(params)
    step = 0
    print("ready", flush=True)
    while True:
        step += 1
        state = state._replace(count=np.asarray(step, np.int32))
        ao.checkpoint.save_state(path, state)
    """
)


def test_a_kill_during_a_save_never_loses_the_previous_checkpoint(tmp_path: pathlib.Path) -> None:
    """16 times: a process saving a 32 MiB state in a loop (its step count, from 1) is killed
    (SIGKILL) at a random moment; the file always loads whole (its checksum holds), and the
    only leftover is the temporary file of the save the kill interrupted."""
    path = tmp_path / "state.safetensors"
    like = ao.adam(1e-3).init({"w": np.zeros((1024, 2048)), "v": np.zeros(4096)})
    checkpoint.save_state(path, like)
    rng, counts = random.Random(0), []
    for _ in range(16):
        child = subprocess.Popen([sys.executable, "-c", SAVER, str(path)], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.4))
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        child.stdout.close()
        counts.append(int(checkpoint.load_state(path, like=like).count))
        assert len(list(tmp_path.glob(".tmp-*"))) <= 1  # (the save the kill interrupted)
        for leftover in tmp_path.glob(".tmp-*"):
            leftover.unlink()
    assert max(counts) > 0  # (saves completed between the kills, and were kept)


# ------------------------------------------------------------------ properties


@st.composite
def problems(draw):
    """A tree of 1-3 leaves of random shapes, a dtype, a registered optimizer with plain steps
    and a learning rate."""
    name = draw(st.sampled_from([n for n in PLAIN if n not in ("kfac",)]))
    dtype = draw(st.sampled_from(["float64", "float32"]))
    shapes = draw(st.lists(st.lists(st.integers(1, 4), min_size=0, max_size=3), min_size=1, max_size=3))
    seed = draw(st.integers(0, 2**16))
    lr = draw(st.floats(1e-4, 1e-1))
    rng = np.random.default_rng(seed)
    params = {f"p{i}": rng.normal(size=tuple(shape)).astype(dtype) for i, shape in enumerate(shapes)}
    grads = {k: rng.normal(size=v.shape).astype(dtype) for k, v in params.items()}
    return name, params, grads, lr


def _step(name: str, params: dict, grads: dict, lr: float, state=None):
    opt = REGISTRY[name].factory(lr=lr)
    state = opt.init(params) if state is None else state
    return opt, opt.step(state, grads, params, **INPUTS.get(name, lambda p: {})(params))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems())
def test_steps_are_pure_and_keep_shapes_and_dtypes(problem) -> None:
    name, params, grads, lr = problem
    params_before, grads_before = copy.deepcopy(params), copy.deepcopy(grads)
    _, (_, new) = _step(name, params, grads, lr)
    for k in params:
        np.testing.assert_array_equal(params[k], params_before[k])  # (nothing mutated)
        np.testing.assert_array_equal(grads[k], grads_before[k])
        assert new[k].shape == params[k].shape and new[k].dtype == params[k].dtype, (name, k)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems())
def test_save_load_step_equals_step(problem) -> None:
    name, params, grads, lr = problem
    opt, (state, new) = _step(name, params, grads, lr)
    directory = pathlib.Path(os.environ.get("TMPDIR", "/tmp"))
    path = directory / f"agnostic-optim-property-{os.getpid()}.safetensors"
    try:
        checkpoint.save_state(path, state)
        loaded = checkpoint.load_state(path, like=opt.init(params))
    finally:
        path.unlink(missing_ok=True)
    _, (_, direct) = _step(name, new, grads, lr, state)
    _, (_, resumed) = _step(name, new, grads, lr, loaded)
    for k in params:
        np.testing.assert_array_equal(direct[k], resumed[k])


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems())
def test_numpy_and_torch_agree_in_float64(problem) -> None:
    torch = pytest.importorskip("torch", reason="torch is not installed")
    name, params, grads, lr = problem
    # (the step inputs here are NumPy functions; float32 runs are compared in conformance)
    assume(name not in INPUTS and next(iter(params.values())).dtype == np.float64)
    _, (_, mine) = _step(name, params, grads, lr)
    as_torch = {k: torch.from_numpy(v.copy()) for k, v in params.items()}
    torch_grads = {k: torch.from_numpy(v.copy()) for k, v in grads.items()}
    _, (_, theirs) = _step(name, as_torch, torch_grads, lr)
    for k in params:
        np.testing.assert_allclose(theirs[k].numpy(), mine[k], rtol=1e-12, atol=1e-14)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems(), where=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7))
def test_any_changed_byte_of_a_checkpoint_is_an_error(problem, where: float, bit: int) -> None:
    name, params, grads, lr = problem
    opt, (state, _) = _step(name, params, grads, lr)
    path = (
        pathlib.Path(os.environ.get("TMPDIR", "/tmp")) / f"agnostic-optim-corrupt-{os.getpid()}.safetensors"
    )
    try:
        checkpoint.save_state(path, state)
        data = bytearray(path.read_bytes())
        data[math.floor(where * len(data))] ^= 1 << bit
        path.write_bytes(bytes(data))
        with pytest.raises((ValueError, KeyError)):
            checkpoint.load_state(path, like=opt.init(params))
    finally:
        path.unlink(missing_ok=True)
