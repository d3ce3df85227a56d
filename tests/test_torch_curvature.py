"""The torch classes of the diagonal-curvature optimizers: AdaHessian and Sophia.

Both run the core's rule; what the adapter adds is the Hessian estimate, taken from autograd:
AdaHessian draws a Rademacher probe ``z`` each step and passes ``z ⊙ Hz`` (the gradients
carry their graph: ``backward(create_graph=True)``), Sophia takes ``ĝ ⊙ ĝ`` of the gradients
present when ``update_hessian()`` is called (the official SophiaG API). Each test replays the
same estimates through the functional API (``ao.adahessian`` / ``ao.sophia``, themselves checked
against the official code in ``test_reference_curvature.py``) and requires the same params.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import numpy as np
import pytest

import agnostic_optim as ao

torch = pytest.importorskip("torch", reason="torch is not installed")
ours = pytest.importorskip("agnostic_optim.adapters.torch")
nn, F = torch.nn, torch.nn.functional

STEPS = 12
TOL = 1e-12


@pytest.fixture(autouse=True)
def _float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    with warnings.catch_warnings():  # backward(create_graph=True)'s reference-cycle advice
        warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
        yield
    torch.set_default_dtype(previous)


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 1))


def make_data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 2, 4, 4, generator=generator)
    return x, torch.randn(8, 1, generator=generator)


def loss_of(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.mse_loss(model(data[0]), data[1])


def functional_step(core: ao.Optimizer, state: Any, model: nn.Module, data: Any, **inputs: Any) -> Any:
    """One step of the functional API on ``model``'s params, written back into them."""
    params = list(model.parameters())
    grads = torch.autograd.grad(loss_of(model, data), params)
    state, new = core.step(state, list(grads), [p.detach() for p in params], **inputs)
    with torch.no_grad():
        for p, value in zip(params, new):
            p.copy_(value)
    return state


@torch.no_grad()
def close(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max() / y.abs().max()) for x, y in zip(a, b) if y.abs().max() > 0)


def test_adahessian_class_passes_hutchinson_estimates_to_the_rule() -> None:
    """Two param groups (the conv kernel takes the 4-D spatial averaging) and a scheduler."""
    data = make_data()
    model, twin = make_model(), make_model()
    hparams = dict(lr=0.05, weight_decay=1e-3, hessian_power=0.5)
    opt = ours.AdaHessian(
        [{"params": model[0].parameters()}, {"params": model[3].parameters(), "lr": 0.02}], **hparams
    )
    core = {lr: ao.adahessian(**{**hparams, "lr": lr}) for lr in (0.05, 0.02)}
    groups = [list(twin[0].parameters()), list(twin[3].parameters())]
    states = [
        core[0.05].init([p.detach() for p in groups[0]]),
        core[0.02].init([p.detach() for p in groups[1]]),
    ]
    for step in range(STEPS):
        torch.manual_seed(100 + step)
        opt.zero_grad()
        loss_of(model, data).backward(create_graph=True)
        opt.step()

        torch.manual_seed(100 + step)  # the same probes, in the same order (params of all groups)
        params = [p for group in groups for p in group]
        grads = torch.autograd.grad(loss_of(twin, data), params, create_graph=True)
        probes = [torch.randint_like(p, 2) * 2 - 1 for p in params]
        products = torch.autograd.grad(grads, params, grad_outputs=probes)
        estimates = [z * hz for z, hz in zip(probes, products)]
        offset = 0
        for i, (group, lr) in enumerate(zip(groups, (0.05, 0.02))):
            n = len(group)
            values = [p.detach() for p in group]
            states[i], new = core[lr].step(
                states[i],
                [g.detach() for g in grads[offset : offset + n]],
                values,
                hessian_diag=estimates[offset : offset + n],
            )
            with torch.no_grad():
                for p, value in zip(group, new):
                    p.copy_(value)
            offset += n
        assert close(list(model.parameters()), list(twin.parameters())) <= TOL, step
    assert sorted(opt.state[model[0].weight]) == ["exp_avg", "exp_hessian_diag_sq", "hessian_step", "step"]


def test_adahessian_needs_gradients_with_their_graph() -> None:
    model, data = make_model(), make_data()
    opt = ours.AdaHessian(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    loss_of(model, data).backward()
    with pytest.raises(RuntimeError, match="create_graph=True"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_adahessian_class_trains_and_resumes_from_state_dict() -> None:
    data = make_data()

    def run(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> list[float]:
        losses = []
        for step in steps:
            torch.manual_seed(step)  # the probes of step ``step``
            opt.zero_grad()
            loss = loss_of(model, data)
            loss.backward(create_graph=True)
            losses.append(loss.item())
            opt.step()
        return losses

    model = make_model()
    opt = ours.AdaHessian(model.parameters(), lr=0.05)
    losses = run(model, opt, range(15))
    saved = copy.deepcopy(opt.state_dict())
    resumed_model = copy.deepcopy(model)
    losses += run(model, opt, range(15, 30))
    assert np.isfinite(losses[-1]) and losses[-1] < 0.5 * losses[0], losses

    resumed = ours.AdaHessian(resumed_model.parameters(), lr=0.05)
    resumed.load_state_dict(saved)
    run(resumed_model, resumed, range(15, 30))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed_model.parameters()))


def test_sophia_class_folds_update_hessian_estimates_into_the_next_step() -> None:
    data = make_data()
    model, twin = make_model(), make_model()
    hparams = dict(lr=1e-2, rho=0.05, bs=8, weight_decay=0.1)
    opt = ours.Sophia(model.parameters(), **hparams)
    core = ao.sophia(**hparams)
    params = list(twin.parameters())
    state = core.init([p.detach() for p in params])
    pending = None
    for step in range(STEPS):
        opt.zero_grad()
        loss_of(model, data).backward()
        opt.step()
        state = functional_step(core, state, twin, data, hessian_diag=pending)
        pending = None
        if step % 3 == 1:  # every 3 steps: a loss on labels sampled from the model (GNB)
            generator = torch.Generator().manual_seed(step)
            for m in (model, twin):
                m.zero_grad()
                out = m(data[0])
                sampled = out.detach() + torch.randn(out.shape, generator=generator)
                F.mse_loss(out, sampled).backward()
                generator.manual_seed(step)
            opt.update_hessian()
            pending = [p.grad.detach() * p.grad.detach() for p in params]
        assert close(list(model.parameters()), params) <= TOL, step


def sampled_backward(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], seed: int) -> None:
    """The official loop's Hessian pass: backward of a loss on labels sampled from the model."""
    model.zero_grad()
    out = model(data[0])
    noise = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    F.mse_loss(out, out.detach() + noise).backward()


def test_sophia_checkpoint_after_update_hessian_resumes_identically() -> None:
    """update_hessian folds the estimate into the state at once, as SophiaG does: a checkpoint
    taken before the next step holds it."""
    data = make_data()

    def run(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
        for step in steps:
            opt.zero_grad()
            loss_of(model, data).backward()
            opt.step()
            sampled_backward(model, data, step)
            opt.update_hessian()

    model = make_model()
    opt = ours.Sophia(model.parameters(), lr=1e-2, bs=8)
    run(model, opt, range(5))
    saved, resumed_model = copy.deepcopy(opt.state_dict()), copy.deepcopy(model)
    run(model, opt, range(5, 10))
    resumed = ours.Sophia(resumed_model.parameters(), lr=1e-2, bs=8)
    resumed.load_state_dict(saved)
    run(resumed_model, resumed, range(5, 10))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed_model.parameters()))


def test_sophia_params_outside_the_hessian_pass_keep_their_hessian() -> None:
    """A param with a gradient at step() but none at update_hessian() (a head the sampled loss
    does not reach) keeps its Hessian EMA; the others get theirs; twice is twice."""
    model, data = make_model(), make_data()
    opt = ours.Sophia(model.parameters(), lr=1e-2, bs=8)
    loss_of(model, data).backward()
    opt.step()
    head = model[3].bias
    sampled_backward(model, data, 0)
    head.grad = None
    before = {p: opt.state[p]["hessian"].clone() for p in model.parameters()}
    squares = {p: p.grad * p.grad for p in model.parameters() if p.grad is not None}
    opt.update_hessian()
    opt.update_hessian()
    for p in model.parameters():
        expected = (
            before[p] if p is head else (before[p] * 0.99 + squares[p] * 0.01) * 0.99 + squares[p] * 0.01
        )
        assert torch.allclose(opt.state[p]["hessian"], expected, rtol=1e-14, atol=0), p.shape
    loss_of(model, data).backward()
    opt.step()  # every param has a gradient again: steps as usual


@pytest.mark.slow
def test_adahessian_compiled_on_a_conv_net_matches_eager() -> None:
    """``compile=True`` on 3x3 conv kernels (Inductor 2.13 fails to compile the kernel-averaged
    Hessian feeding two in-place outputs: the step then runs eagerly, with a warning)."""
    data = make_data()
    runs = []
    for compiled in (False, True):
        model = make_model()
        opt = ours.AdaHessian(model.parameters(), lr=0.05, compile=compiled)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.compile failed on adahessian")
            for step in range(4):
                torch.manual_seed(step)
                opt.zero_grad()
                loss_of(model, data).backward(create_graph=True)
                opt.step()
        runs.append([p.detach().clone() for p in model.parameters()])
    assert close(runs[1], runs[0]) <= TOL


def test_sophia_update_hessian_with_a_scheduled_beta2() -> None:
    """β2 given as a schedule: update_hessian takes its value at the steps taken, as the core's
    fold-in at the next step would."""
    data = make_data()
    model, twin = make_model(), make_model()
    schedule = ao.schedules.linear(0.9, 0.99, 10)
    opt = ours.Sophia(model.parameters(), lr=1e-2, bs=8, betas=(0.965, schedule))
    core = ao.sophia(lr=1e-2, bs=8, betas=(0.965, schedule))
    params = list(twin.parameters())
    state = core.init([p.detach() for p in params])
    pending = None
    for step in range(6):
        opt.zero_grad()
        loss_of(model, data).backward()
        opt.step()
        state = functional_step(core, state, twin, data, hessian_diag=pending)
        sampled_backward(model, data, step)
        opt.update_hessian()
        pending = [p.grad.detach() * p.grad.detach() for p in model.parameters()]
        assert close(list(model.parameters()), params) <= TOL, step
