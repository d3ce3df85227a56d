"""SAM / ASAM and Lookahead against independent references, on every backend.

The references are written here, independently of ``agnostic_optim``:

* SAM -- davda54/sam ``sam.py``: ``SAM._grad_norm``, ``first_step`` (climb to θ + e(θ), keeping
  ``old_p``), ``second_step`` (back to ``old_p``, then the base optimizer's step), in float64 NumPy,
  with the base optimizers transcribed from torch.optim's algorithms (SGD with momentum and
  weight decay, AdamW).
* Lookahead -- ``optax.lookahead`` (JAX x64, ``LookaheadParams`` fast/slow), and the official code
  michaelrzhang/lookahead ``Lookahead.step`` (slow weights cached at construction; every k-th
  step ``p = α p + (1 - α) slow``, ``slow = p``) in float64 NumPy.

The objective of the SAM cases has gradient ``g(θ) = c ⊙ θ + b ⊙ tanh(θ)`` (written with
array-API operations for ``grad_fn``), so the second gradient differs from the first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest

import agnostic_optim as ao
from agnostic_optim.conformance.backends import Backend, get_backend
from helpers import LEAF_SHAPES, assert_trajectories_close, random_gradient_stream, random_leaves

TOL = 1e-12
STEPS = 8
SGD = {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01}
ADAMW = {"lr": 0.02, "betas": (0.8, 0.9), "eps": 1e-6, "weight_decay": 0.05}

HostLeaves = list[np.ndarray]


def objective(seed: int = 0) -> tuple[HostLeaves, HostLeaves, HostLeaves]:
    """Initial params and the coefficients (c, b) of the gradient g(θ) = c ⊙ θ + b ⊙ tanh(θ)."""
    rng = np.random.default_rng(20261128 + seed)
    params = random_leaves(rng, LEAF_SHAPES)
    c = [rng.uniform(0.5, 2.0, s) for s in LEAF_SHAPES]
    b = [rng.uniform(-1.0, 1.0, s) for s in LEAF_SHAPES]
    return params, c, b


def host_grad(c: HostLeaves, b: HostLeaves) -> Callable[[HostLeaves], HostLeaves]:
    return lambda ps: [ci * p + bi * np.tanh(p) for p, ci, bi in zip(ps, c, b)]


def backend_grad(backend: Backend, c: HostLeaves, b: HostLeaves) -> Callable[[list], list]:
    xp = backend.xp
    cs, bs = [backend.asarray(x) for x in c], [backend.asarray(x) for x in b]
    return lambda ps: [ci * p + bi * xp.tanh(p) for p, ci, bi in zip(ps, cs, bs)]


# --------------------------------------------------------------------------- references


def sgd_reference(lr: float, momentum: float, weight_decay: float) -> Callable:
    """torch.optim.SGD (dampening 0, no nesterov) as a host step ``(params, grads) -> params``."""
    bufs: list[np.ndarray | None] = []

    def step(params: HostLeaves, grads: HostLeaves) -> HostLeaves:
        if not bufs:
            bufs.extend([None] * len(params))
        out = []
        for i, (p, g) in enumerate(zip(params, grads)):
            d = g + weight_decay * p
            bufs[i] = d.copy() if bufs[i] is None else momentum * bufs[i] + d
            out.append(p - lr * bufs[i])
        return out

    return step


def adamw_reference(lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> Callable:
    """torch.optim.AdamW (``_single_tensor_adamw``) as a host step."""
    b1, b2 = betas
    m: list[np.ndarray] = []
    v: list[np.ndarray] = []
    t = [0]

    def step(params: HostLeaves, grads: HostLeaves) -> HostLeaves:
        if not m:
            m.extend(np.zeros_like(p) for p in params)
            v.extend(np.zeros_like(p) for p in params)
        t[0] += 1
        out = []
        for i, (p, g) in enumerate(zip(params, grads)):
            p = p * (1 - lr * weight_decay)
            m[i] = m[i] * b1 + (1 - b1) * g
            v[i] = v[i] * b2 + (1 - b2) * g * g
            step_size = lr / (1 - b1 ** t[0])
            denom = np.sqrt(v[i]) / np.sqrt(1 - b2 ** t[0]) + eps
            out.append(p - step_size * m[i] / denom)
        return out

    return step


BASES = {
    "sgd_momentum": (lambda: ao.sgd(**SGD), lambda: sgd_reference(**SGD)),
    "adamw": (lambda: ao.adamw(**ADAMW), lambda: adamw_reference(**ADAMW)),
}


def sam_reference(
    params: HostLeaves,
    grad: Callable[[HostLeaves], HostLeaves],
    base_step: Callable,
    rho: Callable[[int], float],
    adaptive: bool,
    steps: int = STEPS,
) -> list[HostLeaves]:
    """davda54/sam: the closure computes grads at θ, then ``first_step``, closure, ``second_step``."""
    p = [np.array(x, dtype=np.float64) for x in params]
    trajectory = []
    for t in range(steps):
        grads = grad(p)
        # SAM._grad_norm: torch.norm(torch.stack([((|p| if adaptive else 1) * p.grad).norm(p=2)]), p=2)
        norm = np.linalg.norm(
            np.stack(
                [np.linalg.norm(((np.abs(x) if adaptive else 1.0) * g).ravel()) for x, g in zip(p, grads)]
            )
        )
        scale = rho(t) / (norm + 1e-12)
        old_p = [x.copy() for x in p]
        p = [x + (x**2 if adaptive else 1.0) * g * scale for x, g in zip(p, grads)]  # first_step
        sam_grads = grad(p)
        p = old_p  # second_step: p.data = old_p, then base_optimizer.step()
        p = base_step(p, sam_grads)
        trajectory.append([x.copy() for x in p])
    return trajectory


def lookahead_reference(
    params: HostLeaves, grad_stream: Sequence[HostLeaves], base_step: Callable, k: int, alpha: float
) -> list[HostLeaves]:
    """michaelrzhang/lookahead ``Lookahead.step`` (no pullback momentum)."""
    p = [np.array(x, dtype=np.float64) for x in params]
    cached = [x.copy() for x in p]
    la_step = 0
    trajectory = []
    for grads in grad_stream:
        p = base_step(p, grads)
        la_step += 1
        if la_step >= k:
            la_step = 0
            p = [x * alpha + (1.0 - alpha) * c for x, c in zip(p, cached)]
            cached = [x.copy() for x in p]
        trajectory.append([x.copy() for x in p])
    return trajectory


def run_sam(opt: ao.Optimizer, backend: Backend, params: HostLeaves, c, b, step=None) -> list[HostLeaves]:
    grad_fn = backend_grad(backend, c, b)
    step = step or (lambda s, g, p: opt.step(s, g, p, grad_fn=grad_fn))
    current = [backend.asarray(p) for p in params]
    state = opt.init(current)
    trajectory = []
    for _ in range(STEPS):
        state, current = step(state, grad_fn(current), current)
        trajectory.append([backend.to_numpy(p) for p in current])
    return trajectory


def run_stream(
    opt: ao.Optimizer, backend: Backend, params, stream, step=None, dtype: str = "float64"
) -> list[HostLeaves]:
    step = step or opt.step
    current = [backend.asarray(p, dtype) for p in params]
    state = opt.init(current)
    trajectory = []
    for grads in stream:
        state, current = step(state, [backend.asarray(g, dtype) for g in grads], current)
        trajectory.append([backend.to_numpy(p) for p in current])
    return trajectory


# --------------------------------------------------------------------------- SAM


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
@pytest.mark.parametrize("base", sorted(BASES))
def test_sam_matches_official(backend, base, adaptive):
    make, make_reference = BASES[base]
    params, c, b = objective()
    rho = 0.5 if adaptive else 0.1  # ASAM's perturbation is scaled by |θ|: a larger rho
    reference = sam_reference(params, host_grad(c, b), make_reference(), lambda t: rho, adaptive)
    ours = run_sam(ao.sam(make(), rho=rho, adaptive=adaptive), backend, params, c, b)
    assert_trajectories_close(ours, reference, TOL)
    plain = run_sam(ao.sam(make(), rho=0.0), backend, params, c, b)  # the base alone
    assert np.max(np.abs(ours[-1][2] - plain[-1][2])) > 1e-6  # the perturbation matters (>> TOL)


def test_sam_scheduled_rho_and_hparams():
    params, c, b = objective(1)
    schedule = ao.schedules.linear(0.2, 0.0, transition_steps=4)
    opt = ao.sam(ao.sgd(**SGD), rho=schedule)
    reference = sam_reference(
        params, host_grad(c, b), sgd_reference(**SGD), lambda t: 0.2 * max(0.0, 1 - t / 4), False
    )
    assert_trajectories_close(run_sam(opt, get_backend("numpy"), params, c, b), reference, TOL)

    state = ao.sam(ao.sgd(**SGD), rho=0.3).init([np.ones(2)])
    assert float(ao.get_hparams(state)["rho"]) == 0.3 and float(ao.get_hparams(state)["lr"]) == SGD["lr"]
    state = ao.set_hparams(state, rho=0.0, lr=0.5)
    assert float(ao.get_hparams(state)["rho"]) == 0.0 and float(ao.get_hparams(state)["lr"]) == 0.5


def test_sam_jit_equals_eager(jax_backend):
    import jax

    params, c, b = objective(2)
    opt = ao.sam(ao.adamw(**ADAMW), rho=0.3, adaptive=True)
    grad_fn = backend_grad(jax_backend, c, b)
    jitted = jax.jit(lambda s, g, p: opt.step(s, g, p, grad_fn=grad_fn))
    eager = run_sam(opt, jax_backend, params, c, b)
    assert_trajectories_close(run_sam(opt, jax_backend, params, c, b, step=jitted), eager, TOL)


def test_sam_float32_stays_float32(backend):
    params, c, b = objective()
    current = [backend.asarray(p, "float32") for p in params]
    cs, bs = [backend.asarray(x, "float32") for x in c], [backend.asarray(x, "float32") for x in b]
    grad_fn = lambda ps: [ci * p + bi * backend.xp.tanh(p) for p, ci, bi in zip(ps, cs, bs)]  # noqa: E731
    opt = ao.sam(ao.sgd(**SGD), adaptive=True)
    _, current = opt.step(opt.init(current), grad_fn(current), current, grad_fn=grad_fn)
    assert all(p.dtype == backend.dtype("float32") for p in current)


def test_sam_errors():
    params = [np.ones(3)]
    opt = ao.sam(ao.sgd(lr=0.1))
    state = opt.init(params)
    with pytest.raises(TypeError, match="grad_fn"):
        opt.step(state, [np.ones(3)], params)
    with pytest.raises(TypeError, match="unexpected inputs"):
        opt.step(state, [np.ones(3)], params, grad_fn=lambda ps: ps, hessian_diag=None)
    with pytest.raises(TypeError, match="state made by its init"):
        opt.step(state.base, [np.ones(3)], params, grad_fn=lambda ps: ps)
    with pytest.raises(ValueError, match="shape"):
        opt.step(state, [np.ones(2)], params, grad_fn=lambda ps: ps)
    with pytest.raises(ValueError, match="rho"):
        ao.sam(ao.sgd(lr=0.1), rho=-0.1)
    with pytest.raises(TypeError, match="adaptive"):
        ao.sam(ao.sgd(lr=0.1), adaptive=1)
    with pytest.raises(TypeError, match="Optimizer"):
        ao.sam(ao.sgd)
    assert opt.inputs == ("grad_fn",)


# --------------------------------------------------------------------------- Lookahead

LOOKAHEAD_BASES = {
    "sgd_momentum": (lambda: ao.sgd(**SGD), lambda: sgd_reference(**SGD)),
    "adamw": (lambda: ao.adamw(**ADAMW), lambda: adamw_reference(**ADAMW)),
}


def stream_problem(seed: int = 0, steps: int = 10) -> tuple[HostLeaves, list[HostLeaves]]:
    rng = np.random.default_rng(20261128 + seed)
    return random_leaves(rng, LEAF_SHAPES), random_gradient_stream(rng, steps, LEAF_SHAPES)


@pytest.mark.parametrize("base", sorted(LOOKAHEAD_BASES))
def test_lookahead_matches_official(backend, base):
    make, make_reference = LOOKAHEAD_BASES[base]
    params, stream = stream_problem()
    reference = lookahead_reference(params, stream, make_reference(), k=3, alpha=0.6)
    ours = run_stream(ao.lookahead(make(), k=3, alpha=0.6), backend, params, stream)
    assert_trajectories_close(ours, reference, TOL)


@pytest.mark.parametrize("base", ["sgd_momentum", "adam"])
def test_lookahead_matches_optax(jax_backend, base):
    import jax
    import optax

    ours_base, optax_base = {
        "sgd_momentum": (ao.sgd(lr=0.05, momentum=0.9), optax.sgd(0.05, momentum=0.9)),
        "adam": (ao.adam(lr=0.02, betas=(0.8, 0.9)), optax.adam(0.02, b1=0.8, b2=0.9)),
    }[base]
    params, stream = stream_problem(1)
    reference_opt = optax.lookahead(optax_base, sync_period=4, slow_step_size=0.3)
    lp = optax.LookaheadParams.init_synced([jax.numpy.asarray(p) for p in params])
    opt_state = reference_opt.init(lp)
    reference = []
    for grads in stream:
        updates, opt_state = reference_opt.update([jax.numpy.asarray(g) for g in grads], opt_state, lp)
        lp = optax.apply_updates(lp, updates)
        reference.append([np.asarray(p) for p in lp.fast])
    opt = ao.lookahead(ours_base, k=4, alpha=0.3)
    eager = run_stream(opt, jax_backend, params, stream)
    assert_trajectories_close(eager, reference, TOL)
    assert_trajectories_close(
        run_stream(opt, jax_backend, params, stream, step=jax.jit(opt.step)), eager, TOL
    )


def test_lookahead_state_and_hparams():
    params, stream = stream_problem(2, steps=3)
    opt = ao.lookahead(ao.sgd(lr=0.1), k=2, alpha=0.25)
    state = opt.init(params)
    assert all(np.array_equal(s, p) for s, p in zip(state.lookahead.buffers["slow"], params))
    for grads in stream:
        state, params = opt.step(state, grads, params)
    assert int(state.lookahead.count) == 3
    assert float(ao.get_hparams(state)["alpha"]) == 0.25 and float(ao.get_hparams(state)["lr"]) == 0.1
    state = ao.set_hparams(state, alpha=0.75)
    assert float(ao.get_hparams(state)["alpha"]) == 0.75


def test_lookahead_syncs_master_weights(torch_backend):
    """With a master-weight base the sync acts on the float32 masters: they follow the float32
    run exactly while the bf16 params are their rounding."""
    torch = torch_backend.module
    params, stream = stream_problem(3)

    def bf16(leaves: HostLeaves) -> HostLeaves:
        return [torch.tensor(x).bfloat16().double().numpy() for x in leaves]

    params, stream = bf16(params), [bf16(grads) for grads in stream]
    f32 = run_stream(
        ao.lookahead(ao.sgd(**SGD), k=3, alpha=0.5), torch_backend, params, stream, dtype="float32"
    )
    base = ao.mixed_precision(ao.sgd(**SGD), state_dtype="float32", compensation="master")
    opt = ao.lookahead(base, k=3, alpha=0.5)
    current = [torch_backend.asarray(p, "bfloat16") for p in params]
    state = opt.init(current)
    for step, grads in enumerate(stream):
        state, current = opt.step(state, [torch_backend.asarray(g, "bfloat16") for g in grads], current)
        masters = [torch_backend.to_numpy(m) for m in state.base.buffers["master_weights"]]
        assert all(s.dtype == torch.float32 for s in state.lookahead.buffers["slow"])
        assert_trajectories_close([masters], [f32[step]], 1e-6)


def test_lookahead_errors():
    with pytest.raises(ValueError, match="k"):
        ao.lookahead(ao.sgd(lr=0.1), k=0)
    with pytest.raises(ValueError, match="k"):
        ao.lookahead(ao.sgd(lr=0.1), k=2.0)
    with pytest.raises(ValueError, match="alpha"):
        ao.lookahead(ao.sgd(lr=0.1), alpha=1.5)
    with pytest.raises(TypeError, match="Optimizer"):
        ao.lookahead("sgd")
    opt = ao.lookahead(ao.sgd(lr=0.1))
    state = opt.init([np.ones(3)])
    with pytest.raises(TypeError, match="state made by its init"):
        opt.step(state.base, [np.ones(3)], [np.ones(3)])
    with pytest.raises(TypeError, match="unexpected inputs"):
        opt.step(state, [np.ones(3)], [np.ones(3)], grad_fn=lambda ps: ps)
    sam_inside = ao.lookahead(ao.sam(ao.sgd(lr=0.1)))
    assert sam_inside.inputs == ("grad_fn",)


# --------------------------------------------------------------------------- torch classes


def torch_objective(torch, params: HostLeaves, c: HostLeaves, b: HostLeaves):
    """Tensors of ``params`` and the loss Σ ½ c θ² + b log cosh θ (gradient c θ + b tanh θ)."""
    tensors = [torch.tensor(p, requires_grad=True) for p in params]
    cs, bs = [torch.tensor(x) for x in c], [torch.tensor(x) for x in b]

    def loss():
        return sum(
            (ci * p * p / 2 + bi * torch.log(torch.cosh(p))).sum() for p, ci, bi in zip(tensors, cs, bs)
        )

    return tensors, loss


def sam_steps(opt, tensors, loss, steps: int = STEPS, split: bool = False) -> list[HostLeaves]:
    """Train with a torch SAM: ``step(closure)`` (davda54's README), or ``first_step`` /
    ``second_step`` around a second backward pass when ``split``."""

    def closure():
        value = loss()
        value.backward()
        return value

    trajectory = []
    for _ in range(steps):
        closure()
        if split:
            opt.first_step(zero_grad=True)
            closure()
            opt.second_step(zero_grad=True)
        else:
            opt.step(closure)
            opt.zero_grad()
        trajectory.append([t.detach().numpy().copy() for t in tensors])
    return trajectory


def torch_bases(torch) -> dict[str, tuple[Any, dict[str, Any], Callable]]:
    from agnostic_optim.adapters.torch import SGD as OurSGD

    return {
        "torch.optim.SGD": (torch.optim.SGD, SGD, lambda: sgd_reference(**SGD)),
        "ours.SGD": (OurSGD, SGD, lambda: sgd_reference(**SGD)),
        "torch.optim.AdamW": (torch.optim.AdamW, ADAMW, lambda: adamw_reference(**ADAMW)),
        "ao.adamw": (ao.adamw, ADAMW, lambda: adamw_reference(**ADAMW)),
        "'adamw'": ("adamw", ADAMW, lambda: adamw_reference(**ADAMW)),
    }


TORCH_BASES = ["torch.optim.SGD", "ours.SGD", "torch.optim.AdamW", "ao.adamw", "'adamw'"]


@pytest.mark.parametrize("split", [False, True], ids=["closure", "first_second"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
@pytest.mark.parametrize("base", TORCH_BASES)
def test_torch_sam_matches_official(torch64, base, adaptive, split):
    from agnostic_optim.adapters._torch_wrappers import SAM

    base_optimizer, hparams, make_reference = torch_bases(torch64)[base]
    params, c, b = objective()
    rho = 0.5 if adaptive else 0.1
    reference = sam_reference(params, host_grad(c, b), make_reference(), lambda t: rho, adaptive)
    tensors, loss = torch_objective(torch64, params, c, b)
    opt = SAM(tensors, base_optimizer, rho=rho, adaptive=adaptive, **hparams)
    assert_trajectories_close(sam_steps(opt, tensors, loss, split=split), reference, TOL)


def test_torch_sam_state_dict_and_scheduler(torch64):
    import copy

    from agnostic_optim.adapters._torch_wrappers import SAM

    params, c, b = objective(1)
    tensors, loss = torch_objective(torch64, params, c, b)
    opt = SAM(tensors, torch64.optim.SGD, rho=0.1, **SGD)
    full = sam_steps(opt, tensors, loss, steps=5)

    tensors, loss = torch_objective(torch64, params, c, b)
    opt = SAM(tensors, "sgd", rho=0.1, **SGD)
    sam_steps(opt, tensors, loss, steps=3)
    saved = copy.deepcopy(opt.state_dict())
    assert saved["param_groups"][0]["rho"] == 0.1 and "momentum_buffer" in saved["state"][0]
    resumed_tensors, resumed_loss = torch_objective(torch64, [t.detach().numpy() for t in tensors], c, b)
    resumed = SAM(resumed_tensors, "sgd", rho=0.7, **{**SGD, "lr": 1.0})
    resumed.load_state_dict(saved)
    assert resumed.param_groups is resumed.base_optimizer.param_groups
    assert_trajectories_close(sam_steps(resumed, resumed_tensors, resumed_loss, steps=2), full[3:], TOL)

    scheduler = torch64.optim.lr_scheduler.StepLR(resumed, step_size=1, gamma=0.5)
    resumed.step(lambda: resumed_loss().backward())
    scheduler.step()
    assert resumed.base_optimizer.param_groups[0]["lr"] == SGD["lr"] / 2


def test_torch_sam_errors(torch64):
    from agnostic_optim.adapters._torch_wrappers import SAM

    params = [torch64.zeros(3, requires_grad=True)]
    with pytest.raises(ValueError, match="rho"):
        SAM(params, torch64.optim.SGD, rho=-1.0, lr=0.1)
    opt = SAM(params, torch64.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    with pytest.raises(TypeError):  # a wrapper factory is no base for the torch adapter
        SAM(params, ao.lookahead, lr=0.1)


def lookahead_steps(torch, opt, tensors, stream) -> list[HostLeaves]:
    trajectory = []
    for grads in stream:
        for t, g in zip(tensors, grads):
            t.grad = torch.tensor(g)
        opt.step()
        trajectory.append([t.detach().numpy().copy() for t in tensors])
    return trajectory


@pytest.mark.parametrize("base", TORCH_BASES[:3])
def test_torch_lookahead_matches_official(torch64, base):
    from agnostic_optim.adapters._torch_wrappers import Lookahead

    base_class, hparams, make_reference = torch_bases(torch64)[base]
    params, stream = stream_problem()
    reference = lookahead_reference(params, stream, make_reference(), k=3, alpha=0.6)
    tensors = [torch64.tensor(p, requires_grad=True) for p in params]
    opt = Lookahead(base_class(tensors, **hparams), k=3, alpha=0.6)
    assert_trajectories_close(lookahead_steps(torch64, opt, tensors, stream), reference, TOL)


def test_torch_lookahead_ours_equals_torch_sgd(torch64):
    from agnostic_optim.adapters._torch_wrappers import Lookahead
    from agnostic_optim.adapters.torch import SGD as OurSGD

    params, stream = stream_problem(1)
    runs = []
    for base_class in (torch64.optim.SGD, OurSGD):
        tensors = [torch64.tensor(p, requires_grad=True) for p in params]
        runs.append(lookahead_steps(torch64, Lookahead(base_class(tensors, **SGD), k=4), tensors, stream))
    assert_trajectories_close(runs[1], runs[0], 0.0)


@pytest.mark.parametrize("base", ["torch.optim.SGD", "ours.SGD"])
def test_torch_lookahead_state_dict(torch64, base):
    import copy

    from agnostic_optim.adapters._torch_wrappers import Lookahead

    base_class, hparams, _ = torch_bases(torch64)[base]
    params, stream = stream_problem(2)
    tensors = [torch64.tensor(p, requires_grad=True) for p in params]
    full = lookahead_steps(
        torch64, Lookahead(base_class(tensors, **hparams), k=3, alpha=0.4), tensors, stream
    )

    tensors = [torch64.tensor(p, requires_grad=True) for p in params]
    opt = Lookahead(base_class(tensors, **hparams), k=3, alpha=0.4)
    lookahead_steps(torch64, opt, tensors, stream[:4])
    saved = copy.deepcopy(opt.state_dict())
    assert saved["param_groups"][0]["lookahead_step"] == 4
    assert all("lookahead_slow_buff" in saved["state"][i] for i in range(len(params)))
    resumed_tensors = [torch64.tensor(t.detach().numpy(), requires_grad=True) for t in tensors]
    resumed = Lookahead(base_class(resumed_tensors, **{**hparams, "lr": 1.0}), k=3, alpha=0.9)
    resumed.load_state_dict(saved)
    assert resumed.param_groups is resumed.base_optimizer.param_groups
    assert resumed.param_groups[0]["lr"] == hparams["lr"]
    assert_trajectories_close(lookahead_steps(torch64, resumed, resumed_tensors, stream[4:]), full[4:], TOL)
    assert "lookahead_slow_buff" not in resumed.base_optimizer.state[resumed_tensors[0]]


def test_torch_lookahead_errors(torch64):
    from agnostic_optim.adapters._torch_wrappers import Lookahead

    base = torch64.optim.SGD([torch64.zeros(3, requires_grad=True)], lr=0.1)
    with pytest.raises(TypeError, match="Optimizer"):
        Lookahead(torch64.optim.SGD)
    with pytest.raises(ValueError, match="k"):
        Lookahead(base, k=0)
    with pytest.raises(ValueError, match="alpha"):
        Lookahead(base, alpha=-0.5)


def test_torch_sam_keeps_theta_through_misuse_and_failing_closures(torch64):
    """A second first_step() is refused (it would keep θ + e as θ), and an error raised by the
    closure leaves the params at θ."""
    from agnostic_optim.adapters._torch_wrappers import SAM

    p = torch64.tensor([1.0, 2.0], requires_grad=True)
    opt = SAM([p], torch64.optim.SGD, rho=0.5, lr=0.0)
    p.grad = torch64.tensor([1.0, 0.0])
    opt.first_step()
    assert not torch64.equal(p.detach(), torch64.tensor([1.0, 2.0]))
    with pytest.raises(RuntimeError, match="twice"):
        opt.first_step()
    opt.second_step()
    assert torch64.equal(p.detach(), torch64.tensor([1.0, 2.0]))

    def failing() -> None:
        raise KeyError("a data loader error")

    p.grad = torch64.tensor([1.0, 0.0])
    with pytest.raises(KeyError):
        opt.step(failing)
    assert torch64.equal(p.detach(), torch64.tensor([1.0, 2.0]))
    p.grad = torch64.tensor([1.0, 0.0])
    opt.step(lambda: None)  # and it steps normally afterwards
    p.grad = torch64.tensor([1.0, 0.0])
    opt.first_step()  # a manual loop whose second pass failed: restore() drops the perturbation
    opt.restore()
    assert torch64.equal(p.detach(), torch64.tensor([1.0, 2.0]))
    opt.first_step()


def test_torch_lookahead_loads_a_state_dict_of_its_base_alone(torch64):
    """A checkpoint of the base optimizer (before Lookahead was added) loads: the groups get
    Lookahead's settings, the slow weights start at the loaded params."""
    from agnostic_optim.adapters._torch_wrappers import Lookahead

    params, stream = stream_problem(3)
    tensors = [torch64.tensor(p, requires_grad=True) for p in params]
    base = torch64.optim.SGD(tensors, lr=0.05, momentum=0.9)
    for grads in stream[:2]:
        for t, g in zip(tensors, grads):
            t.grad = torch64.tensor(g)
        base.step()
    opt = Lookahead(torch64.optim.SGD(tensors, lr=0.05, momentum=0.9), k=2, alpha=0.5)
    opt.load_state_dict(base.state_dict())
    assert [g["lookahead_step"] for g in opt.param_groups] == [0]
    assert all(torch64.equal(opt.state[t]["lookahead_slow_buff"], t.detach()) for t in tensors)
    for grads in stream[2:5]:
        for t, g in zip(tensors, grads):
            t.grad = torch64.tensor(g)
        opt.step()
    assert opt.param_groups[0]["lookahead_step"] == 3
