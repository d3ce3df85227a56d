"""L-BFGS: ``ao.lbfgs`` (every backend) and ``adapters.torch.LBFGS`` against torch.optim.LBFGS.

The reference is torch.optim.LBFGS itself (torch 2.13), run on the same problem with a closure
that autograd differentiates. Both sides record every point the objective is evaluated at, so
the runs are compared evaluation by evaluation (the points, their number per ``step``, torch's
``func_evals``/``n_iter``), on an ill-conditioned multi-leaf problem (a Rosenbrock valley spread
over leaves of rank 0-2) and a small MLP regression, without and with the strong-Wolfe line
search, with ``history_size=3`` so the history wraps.
"""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import agnostic_optim as ao
from agnostic_optim import checkpoint
from agnostic_optim.adapters._torch_lbfgs import LBFGS
from agnostic_optim.conformance.backends import Backend
from agnostic_optim.conformance.compare import max_relative_error

torch = pytest.importorskip("torch", reason="torch is not installed (the reference is torch.optim.LBFGS)")

TOL = 1e-12
STEPS = 3

# ----------------------------------------------------------------------------- problems
# Each problem is ``loss(xp, params, data)`` for a dict of leaves, written with array-API
# operations so that it runs on every backend and, with torch tensors, under autograd; the core
# gets its gradient by hand (``*_value_and_grad``), torch.optim by autograd.

ROSENBROCK_SHAPES = {"a": (), "b": (3,), "c": (2, 2)}
MLP_SHAPES = {"w1": (3, 5), "b1": (5,), "w2": (5, 2), "b2": (2,)}


def _flat(xp: Any, params: dict[str, Any]) -> Any:
    return xp.concat([xp.reshape(params[k], (-1,)) for k in sorted(params)])


def _unflat(xp: Any, flat: Any, like: dict[str, Any]) -> dict[str, Any]:
    out, start = {}, 0
    for k in sorted(like):
        size = math.prod(like[k].shape)
        out[k] = xp.reshape(flat[start : start + size], like[k].shape)
        start += size
    return out


def rosenbrock(xp: Any, params: dict[str, Any], data: dict[str, Any]) -> Any:
    """Σ_i 100 (z_{i+1} - z_i²)² + (1 - z_i)² over the leaves flattened into one vector z."""
    z = _flat(xp, params)
    a, b = z[:-1], z[1:]
    return xp.sum(100 * (b - a * a) ** 2 + (1 - a) ** 2)


def rosenbrock_value_and_grad(xp: Any, params: dict[str, Any], data: dict[str, Any]) -> tuple:
    z = _flat(xp, params)
    a, b = z[:-1], z[1:]
    r = b - a * a
    zero = xp.zeros((1,), dtype=z.dtype, device=z.device)
    grad = xp.concat([-400 * a * r - 2 * (1 - a), zero]) + xp.concat([zero, 200 * r])
    return xp.sum(100 * r**2 + (1 - a) ** 2), _unflat(xp, grad, params)


def quadratic(xp: Any, params: dict[str, Any], data: dict[str, Any]) -> Any:
    """½ Σ_i c_i (z_i - 1)² with curvatures c from 1 to 100 over the leaves flattened into z."""
    r = _flat(xp, params) - 1
    return xp.sum(data["c"] * r * r) / 2


def quadratic_value_and_grad(xp: Any, params: dict[str, Any], data: dict[str, Any]) -> tuple:
    r = _flat(xp, params) - 1
    return xp.sum(data["c"] * r * r) / 2, _unflat(xp, data["c"] * r, params)


def mlp(xp: Any, params: dict[str, Any], data: dict[str, Any]) -> Any:
    """½ mean ‖tanh(X W1 + b1) W2 + b2 - Y‖² over the samples."""
    hidden = xp.tanh(data["x"] @ params["w1"] + params["b1"])
    residual = hidden @ params["w2"] + params["b2"] - data["y"]
    return xp.sum(residual**2) / (2 * data["x"].shape[0])


def mlp_value_and_grad(xp: Any, params: dict[str, Any], data: dict[str, Any]) -> tuple:
    x, n = data["x"], data["x"].shape[0]
    hidden = xp.tanh(x @ params["w1"] + params["b1"])
    residual = hidden @ params["w2"] + params["b2"] - data["y"]
    d_out = residual / n
    d_pre = (d_out @ params["w2"].T) * (1 - hidden * hidden)
    grads = {
        "w1": x.T @ d_pre,
        "b1": xp.sum(d_pre, axis=0),
        "w2": hidden.T @ d_out,
        "b2": xp.sum(d_out, axis=0),
    }
    return xp.sum(residual**2) / (2 * n), grads


def problem_data(name: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(initial params, data) on the host, from a fixed seed."""
    rng = np.random.default_rng(7)
    if name == "rosenbrock":
        return {k: 0.5 * rng.standard_normal(s) for k, s in ROSENBROCK_SHAPES.items()}, {}
    if name == "quadratic":
        params = {k: rng.standard_normal(s) for k, s in ROSENBROCK_SHAPES.items()}
        return params, {"c": np.geomspace(1.0, 100.0, 8)}
    params = {k: 0.5 * rng.standard_normal(s) for k, s in MLP_SHAPES.items()}
    x = rng.standard_normal((12, 3))
    return params, {"x": x, "y": np.stack([np.sin(x[:, 0]) + x[:, 1], x[:, 2] * x[:, 0]], axis=1)}


PROBLEMS = {
    "rosenbrock": (rosenbrock, rosenbrock_value_and_grad),
    "quadratic": (quadratic, quadratic_value_and_grad),
    "mlp": (mlp, mlp_value_and_grad),
}
# (problem, options), chosen so that every branch of torch's loop and line search runs
CASES = [
    ("rosenbrock", {"line_search_fn": None, "lr": 0.3}),
    ("rosenbrock", {"line_search_fn": "strong_wolfe", "lr": 0.02, "max_eval": 4}),  # extrapolates, runs out
    ("rosenbrock", {"line_search_fn": "strong_wolfe", "lr": 8.0}),  # overshoots and zooms
    ("mlp", {"line_search_fn": None, "lr": 0.5, "tolerance_change": 1e-2}),  # |f - f_prev| stops
    ("mlp", {"line_search_fn": "strong_wolfe", "tolerance_grad": 3e-2}),  # max|g| stops
    ("quadratic", {"line_search_fn": "strong_wolfe", "max_iter": 20, "tolerance_grad": 0.0}),  # g.d stops
    ("quadratic", {"line_search_fn": None, "lr": 0.002, "tolerance_change": 1e-2}),  # max|t d| stops
]
CASE_IDS = [f"{name}-{options['line_search_fn']}-lr{options.get('lr', 1)}" for name, options in CASES]


def options_for(options: dict[str, Any]) -> dict[str, Any]:
    return {"history_size": 3, "max_iter": 5, **options}


# ----------------------------------------------------------------------------- the reference


class Run:
    """What a run recorded: the points evaluated during each step and the params after it."""

    def __init__(self) -> None:
        self.points: list[list[dict[str, np.ndarray]]] = []
        self.params: list[dict[str, np.ndarray]] = []


def torch_reference(
    name: str, options: dict[str, Any], steps: int = STEPS, lrs: list[float] | None = None
) -> tuple[Run, dict]:
    """torch.optim.LBFGS on the problem, its closure differentiated by autograd (``lrs``: the
    group's lr at each step)."""
    loss_fn, _ = PROBLEMS[name]
    init, host_data = problem_data(name)
    params = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in init.items()}
    data = {k: torch.tensor(v, dtype=torch.float64) for k, v in host_data.items()}
    order = sorted(params)
    optimizer = torch.optim.LBFGS([params[k] for k in order], **options)
    run = Run()

    def closure():
        optimizer.zero_grad()
        run.points[-1].append({k: p.detach().double().numpy().copy() for k, p in params.items()})
        loss = loss_fn(torch, params, data)
        loss.backward()
        return loss

    for k in range(steps):
        if lrs is not None:
            optimizer.param_groups[0]["lr"] = lrs[k]
        run.points.append([])
        optimizer.step(closure)
        run.params.append({k: p.detach().double().numpy().copy() for k, p in params.items()})
    return run, optimizer.state[params[order[0]]]


def core_run(
    backend: Backend,
    name: str,
    options: dict[str, Any],
    steps: int = STEPS,
    between: Callable[[ao.Optimizer, Any, Any, int], Any] | None = None,
) -> tuple[Run, Any]:
    """``ao.lbfgs`` on the problem; ``between(opt, state, params, k)`` may replace the state
    before step ``k``."""
    _, value_and_grad = PROBLEMS[name]
    init, host_data = problem_data(name)
    xp = backend.xp
    data = {k: backend.asarray(v) for k, v in host_data.items()}
    run = Run()

    def value_and_grad_fn(params):
        run.points[-1].append({k: backend.to_numpy(v) for k, v in params.items()})
        return value_and_grad(xp, params, data)

    opt = ao.lbfgs(**options)
    params = {k: backend.asarray(v) for k, v in init.items()}
    state = opt.init(params)
    for k in range(steps):
        if between is not None:
            state = between(opt, state, params, k)
        run.points.append([])
        state, params = opt.step(state, None, params, value_and_grad_fn=value_and_grad_fn)
        run.params.append({k: backend.to_numpy(v) for k, v in params.items()})
    return run, state


def host(value: Any) -> np.ndarray:
    """A torch.optim state entry (tensor or Python number) as a float64 NumPy array."""
    return torch.as_tensor(value, dtype=torch.float64).numpy()


def worst_error(ours: Run, reference: Run) -> float:
    """The worst relative error over every evaluated point and every step's params; asserts
    that each step evaluated the objective as many times as torch."""
    assert [len(p) for p in ours.points] == [len(p) for p in reference.points]
    worst = 0.0
    pairs = [*zip(ours.params, reference.params)]
    pairs += [pair for a, b in zip(ours.points, reference.points) for pair in zip(a, b)]
    for a, b in pairs:
        worst = max(worst, max_relative_error([a[k] for k in sorted(b)], [b[k] for k in sorted(b)]))
    return worst


def flat_host(tree: dict[str, Any], to_numpy: Callable, rows: int | None = None) -> np.ndarray:
    """The torch.optim.LBFGS layout of a per-leaf value: leaves flattened and concatenated (per
    history row when ``rows`` is given)."""
    leaves = [to_numpy(tree[k]) for k in sorted(tree)]
    if rows is None:
        return np.concatenate([leaf.reshape(-1) for leaf in leaves])
    return np.stack([np.concatenate([leaf[i].reshape(-1) for leaf in leaves]) for i in range(rows)])


# ----------------------------------------------------------------------------- the core


@pytest.mark.parametrize(("name", "options"), CASES, ids=CASE_IDS)
def test_core_matches_torch_lbfgs(backend: Backend, name: str, options: dict[str, Any]):
    options = options_for(options)
    reference, torch_state = torch_reference(name, options)
    ours, state = core_run(backend, name, options)
    assert worst_error(ours, reference) < TOL
    assert int(state.func_evals) == torch_state["func_evals"] == sum(len(p) for p in reference.points)
    assert int(state.n_iter) == torch_state["n_iter"]
    if name == "quadratic" and options["line_search_fn"]:
        return  # converged: the carried history is rounding noise
    # the carried state, in torch's flat layout
    num_old = int(state.num_old)
    assert num_old == len(torch_state["old_dirs"])
    for ours_value, theirs in [
        (flat_host(state.d, backend.to_numpy), torch_state["d"]),
        (flat_host(state.prev_flat_grad, backend.to_numpy), torch_state["prev_flat_grad"]),
        (flat_host(state.old_dirs, backend.to_numpy, num_old), torch.stack(torch_state["old_dirs"])),
        (flat_host(state.old_stps, backend.to_numpy, num_old), torch.stack(torch_state["old_stps"])),
        (backend.to_numpy(state.ro)[:num_old], torch.stack(torch_state["ro"])),
        (backend.to_numpy(state.H_diag), torch_state["H_diag"]),
        (backend.to_numpy(state.t), torch_state["t"]),
        (backend.to_numpy(state.prev_loss), torch_state["prev_loss"]),
    ]:
        assert max_relative_error([ours_value], [host(theirs)]) < TOL


def test_core_lbfgs_under_jax_jit_is_a_clear_error(jax_backend: Backend):
    import jax

    opt = ao.lbfgs()
    init, _ = problem_data("rosenbrock")
    params = {k: jax_backend.asarray(v) for k, v in init.items()}
    fn = lambda p: rosenbrock_value_and_grad(jax_backend.xp, p, {})  # noqa: E731
    with pytest.raises(TypeError, match=r"lbfgs cannot be traced .*outside jit"):
        jax.jit(lambda s, p: opt.step(s, p, p, value_and_grad_fn=fn))(opt.init(params), params)


def test_core_lr_changes_and_checkpoint_round_trip(backend: Backend):
    """``set_hparams(lr=...)`` between steps acts as a new ``group["lr"]`` in torch, and a state
    saved between steps and loaded into a fresh one (``ao.checkpoint``) continues identically."""
    lrs = [0.5, 0.25, 0.1]
    options = options_for({"line_search_fn": "strong_wolfe"})

    def between(opt, state, params, k):
        state = ao.set_hparams(state, lr=lrs[k])
        return checkpoint.state_from_dict(opt.init(params), checkpoint.state_to_dict(state))

    reference, _ = torch_reference("mlp", options, lrs=lrs)
    ours, state = core_run(backend, "mlp", options, between=between)
    assert worst_error(ours, reference) < TOL
    assert float(ao.get_hparams(state)["lr"]) == lrs[-1]


def test_core_given_grads_only_fix_the_structure():
    """The step starts, like torch's, by evaluating the objective: ``grads`` may be None, and
    its values are not used; a missing ``value_and_grad_fn`` or a mismatched tree is refused."""
    opt = ao.lbfgs(max_iter=3)
    params = [np.array([1.0, 2.0]), np.array(0.5)]
    state = opt.init(params)

    def fn(p):
        return sum(float(np.sum(x**2)) for x in p), [2 * x for x in p]

    _, with_none = opt.step(state, None, params, value_and_grad_fn=fn)
    _, with_grads = opt.step(state, [np.ones(2), np.array(7.0)], params, value_and_grad_fn=fn)
    assert all(np.array_equal(a, b) for a, b in zip(with_none, with_grads))
    with pytest.raises(TypeError, match="needs value_and_grad_fn"):
        opt.step(state, None, params)
    with pytest.raises(ValueError, match=r"grads must have the structure of params: missing grads\[1\]"):
        opt.step(state, [np.ones(2)], params, value_and_grad_fn=fn)


@pytest.mark.parametrize(
    "kwargs",
    [{"lr": -1.0}, {"max_iter": 0}, {"max_eval": 0}, {"history_size": 0}, {"line_search_fn": "armijo"}],
)
def test_invalid_options_raise(kwargs):
    with pytest.raises(ValueError):
        ao.lbfgs(**kwargs)


# ----------------------------------------------------------------------------- the torch class


def torch_mlp_run(cls: type, dtype: Any, options: dict[str, Any], steps: int, resume_at: int | None = None):
    """A torch MLP trained by ``cls`` (torch.optim.LBFGS or ours); returns per step the params,
    the returned loss and the closure calls, and the final optimizer state. With ``resume_at``
    the run is rebuilt there from ``state_dict`` (saved and loaded through ``torch.save``)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)).to(dtype)
    x = torch.randn(16, 3, dtype=dtype)
    y = torch.stack([torch.sin(x[:, 0]) + x[:, 1], x[:, 2] * x[:, 0]], dim=1)
    optimizer = cls(model.parameters(), **options)
    calls = [0]

    def closure():
        calls[0] += 1
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    out = []
    for k in range(steps):
        if k == resume_at:
            buffer = io.BytesIO()
            torch.save(optimizer.state_dict(), buffer)
            model = copy.deepcopy(model)
            optimizer = cls(model.parameters(), **options)
            buffer.seek(0)
            optimizer.load_state_dict(torch.load(buffer))
        before = calls[0]
        loss = optimizer.step(closure)
        params = [p.detach().double().numpy().copy() for p in model.parameters()]
        out.append((params, float(loss.detach()), calls[0] - before))
    return out, optimizer.state[next(iter(model.parameters()))]


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, TOL), (torch.float32, 1e-5)])
def test_torch_class_matches_torch_lbfgs(line_search_fn, dtype, tol):
    options = {"lr": 0.5 if line_search_fn is None else 1.0, "history_size": 3, "max_iter": 5}
    options["line_search_fn"] = line_search_fn
    reference, torch_state = torch_mlp_run(torch.optim.LBFGS, dtype, options, STEPS + 1)
    ours, state = torch_mlp_run(LBFGS, dtype, options, STEPS + 1)
    resumed, resumed_state = torch_mlp_run(LBFGS, dtype, options, STEPS + 1, resume_at=2)
    for (p_ref, loss_ref, calls_ref), *runs in zip(reference, ours, resumed):
        for params, loss, calls in runs:
            assert calls == calls_ref
            assert max_relative_error(params, p_ref) < tol
            assert abs(loss - loss_ref) <= tol * abs(loss_ref)
    for s in (state, resumed_state):
        assert (s["func_evals"], s["n_iter"]) == (torch_state["func_evals"], torch_state["n_iter"])
    assert state["t"].dtype == resumed_state["t"].dtype == torch.float64  # kept through load_state_dict


def test_torch_class_is_torch_lbfgs_drop_in():
    param = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="parameter groups"):
        LBFGS([{"params": [param]}, {"params": [torch.nn.Parameter(torch.ones(1))]}])
    with pytest.raises(TypeError):
        LBFGS([param]).step()  # the closure is required


def test_torch_class_refuses_a_torch_lbfgs_state_dict():
    """torch.optim.LBFGS keeps flat vectors and list histories: its state is refused clearly,
    before anything changes (it used to load, then fail inside the next step)."""
    param = torch.nn.Parameter(torch.tensor([1.5, -0.5], dtype=torch.float64))

    def closure() -> torch.Tensor:
        param.grad = None
        loss = ((param - 1.0) ** 4).sum()
        loss.backward()
        return loss

    theirs = torch.optim.LBFGS([param], max_iter=3)
    theirs.step(closure)
    ours = LBFGS([param], max_iter=3)
    ours.step(closure)
    before = copy.deepcopy(ours.state_dict())
    with pytest.raises(ValueError, match=r"torch\.optim\.LBFGS state does not load here"):
        ours.load_state_dict(theirs.state_dict())
    after = ours.state_dict()
    assert sorted(after["state"][0]) == sorted(before["state"][0])
    ours.step(closure)  # and it goes on
