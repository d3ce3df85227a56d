"""``differentiable=True``: autograd through ``opt.step()``, checked as torch's own
``TestDifferentiableOptimizer`` (``test/optim/test_optim.py``) checks torch.optim's: ``gradcheck``
of one step with respect to the param, its gradient and the state it starts from, and gradients
of a two-step meta-loss with respect to tensor hyperparameters (lr, weight decay, betas).
Every check also runs torch's own class, so a check torch's class fails is a bad port."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed")
ours = pytest.importorskip("agnostic_optim.adapters.torch", reason="the torch adapter needs torch")

from torch.autograd import gradcheck  # noqa: E402

IMPLS = {"torch": torch.optim, "ours": ours}


def _rand(*shape: int, grad: bool = True) -> torch.Tensor:
    return torch.rand(*shape, requires_grad=grad, dtype=torch.float64)


def _one_step(p, grad, state, cls, kwargs, *state_values) -> tuple[torch.Tensor, ...]:
    """torch's ``_diff_fn``: one step of a fresh optimizer from ``state``; the new param and
    every state tensor that carries a graph. (``state_values`` are ``state``'s tensors, passed
    again so that gradcheck sees them as inputs.)"""
    p = p.clone()
    p.grad = grad
    opt = cls([p], **kwargs)
    opt.state[p].update({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()})
    opt.step()
    return (p, *(v for v in opt.state[p].values() if isinstance(v, torch.Tensor) and v.requires_grad))


def _states() -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """torch's test cases: (kwargs, the state a step starts from), per optimizer."""
    torch.manual_seed(0)
    step = torch.tensor(10.0, requires_grad=False, dtype=torch.float64)
    adam = {"step": step, "exp_avg": _rand(10), "exp_avg_sq": _rand(10), "max_exp_avg_sq": _rand(10)}
    radam = {"step": step, "exp_avg": _rand(10), "exp_avg_sq": _rand(10)}
    return {
        "SGD": ({"lr": 0.9, "differentiable": True}, {"momentum_buffer": _rand(10)}),
        "Adam": ({"lr": 0.9, "differentiable": True, "amsgrad": True}, adam),
        "AdamW": ({"lr": 0.9, "differentiable": True, "amsgrad": True}, adam),
        "RMSprop": (
            {
                "lr": 0.9,
                "maximize": True,
                "momentum": 0.9,
                "differentiable": True,
                "centered": True,
                "weight_decay": 0.1,
            },
            {
                "step": torch.zeros((), dtype=torch.float64),
                "square_avg": _rand(10),
                "momentum_buffer": _rand(10),
                "grad_avg": 1e-2 * _rand(10),
            },
        ),
        "Adagrad": (
            {"lr": 0.9, "weight_decay": 0.1, "differentiable": True},
            {"step": step, "sum": _rand(10)},
        ),
        "NAdam": (
            {"lr": 0.9, "differentiable": True},
            {**radam, "mu_product": torch.tensor(1.0, requires_grad=True, dtype=torch.float64)},
        ),
        "NAdam-decoupled": (
            {"lr": 0.9, "differentiable": True, "decoupled_weight_decay": True, "weight_decay": 0.1},
            {**radam, "mu_product": torch.tensor(1.0, requires_grad=True, dtype=torch.float64)},
        ),
        "RAdam": ({"lr": 0.9, "differentiable": True}, radam),
        "RAdam-decoupled": (
            {"lr": 0.9, "weight_decay": 0.1, "decoupled_weight_decay": True, "differentiable": True},
            radam,
        ),
    }


CASES = list(_states())


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("case", CASES)
def test_gradcheck_of_one_step(impl: str, case: str) -> None:
    kwargs, state = _states()[case]
    cls = getattr(IMPLS[impl], case.split("-")[0])
    p, grad = _rand(10), _rand(10)
    assert gradcheck(_one_step, (p, grad, state, cls, kwargs, *state.values()))


def _two_steps_meta_loss(params, grad, state, cls, kwargs, *ignored) -> tuple[torch.Tensor, ...]:
    """torch's ``_multistep_backprop_diff_hyperparams_fn``: two steps on ``MSE(x · Σθ, y)`` with
    the graph kept, the loss of the second as the meta-loss; gradients must reach every tensor
    hyperparameter (``betas`` passed as two tensors)."""
    params = params.clone()
    params.grad = grad
    kwargs = dict(kwargs)
    tensors = [v for v in kwargs.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    tensors += list(kwargs.get("betas", ()))
    opt = cls([params], **kwargs)
    opt.state[params].update({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()})
    x, y = torch.tensor([1.0], dtype=torch.float64), torch.tensor([2.0], dtype=torch.float64)
    for _ in range(2):
        loss = torch.nn.functional.mse_loss(x * torch.sum(params), y)
        loss.backward(inputs=(params,), create_graph=True)
        opt.step()
        opt.zero_grad()
    loss.backward(inputs=tuple(tensors), create_graph=True)
    assert all(t.grad is not None for t in tensors)
    state_tensors = [v for v in opt.state[params].values() if isinstance(v, torch.Tensor) and v.requires_grad]
    return (loss, *state_tensors, *tensors)


def _hyperparameters(which: str) -> dict[str, Any]:
    def tensor(value: float, shape: tuple[int, ...] = ()) -> torch.Tensor:
        return torch.tensor(value, requires_grad=True, dtype=torch.float64).reshape(shape)

    return {
        "lr": {"lr": tensor(0.001)},
        "weight_decay": {"weight_decay": tensor(0.999)},
        "betas": {"lr": tensor(0.001, (1,)), "betas": (tensor(0.9), tensor(0.999))},
        "all": {"lr": tensor(0.001), "weight_decay": tensor(0.999), "betas": (tensor(0.9), tensor(0.999))},
    }[which]


HYPERPARAMETER_CASES = [
    (name, which)
    for name in ("Adam", "AdamW", "SGD")
    for which in ("lr", "weight_decay", "betas", "all")
    if name != "SGD" or which in ("lr", "weight_decay")  # (SGD has no betas)
]


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize(("name", "which"), HYPERPARAMETER_CASES)
def test_gradients_reach_tensor_hyperparameters(impl: str, name: str, which: str) -> None:
    torch.manual_seed(0)
    params, grad = _rand(10), _rand(10)
    hyperparameters = _hyperparameters(which)
    if name == "SGD":
        state = {"momentum_buffer": _rand(10)}  # (as torch's SGD cases, which set no momentum)
    else:
        state = {
            "step": torch.tensor(10.0, dtype=torch.float64),
            "exp_avg": _rand(10),
            "exp_avg_sq": _rand(10),
        }
    kwargs = {**hyperparameters, "differentiable": True}
    cls = getattr(IMPLS[impl], name)
    flat = [
        v for value in hyperparameters.values() for v in (value if isinstance(value, tuple) else (value,))
    ]
    tensors = [v for v in flat if isinstance(v, torch.Tensor)]
    assert gradcheck(_two_steps_meta_loss, (params, grad, state, cls, kwargs, *state.values(), *tensors))


def test_meta_learning_loop_matches_torch(torch64) -> None:
    """The meta-gradient of a learning rate through five differentiable steps, ours equal to
    torch.optim's. (Under a float64 default dtype: torch's differentiable step computes its bias
    corrections in the step counter's dtype, float32 otherwise -- 3e-7 off after one float64
    step -- where ours, like torch's default step, computes them in float64.)"""
    results = {}
    for module_name, module in IMPLS.items():
        torch.manual_seed(0)
        weight = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
        lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
        theta = weight.clone()
        opt = module.Adam([theta], lr=lr, differentiable=True)
        data = torch.randn(8, 3, dtype=torch.float64)
        for _ in range(5):
            loss = (data @ theta.t()).pow(2).mean()
            (g,) = torch.autograd.grad(loss, theta, create_graph=True)
            theta.grad = g
            opt.step()
        meta = (data @ theta.t()).sum()
        (results[module_name],) = torch.autograd.grad(meta, lr)
    torch.testing.assert_close(results["ours"], results["torch"], rtol=1e-10, atol=1e-12)
