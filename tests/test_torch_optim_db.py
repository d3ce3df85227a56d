"""torch's own optimizer test suite, ported: ``TestOptimRenewed`` (``test/test_optim.py``) and
``TestDifferentiableOptimizer`` (``test/optim/test_optim.py``), run over our torch classes.

The configurations and error inputs are torch's own: ``optim_db`` from
``torch.testing._internal.common_optimizers`` (installed with torch), expanded on CPU as torch
expands them (``_get_optim_inputs_including_global_cliquey_kwargs``). Each check below is the
one torch's test makes (setups, step counts, tolerances), written here; tests of torch's own
kernels (foreach/fused parity, CUDA, peak memory) are replaced by one parity test of ours
against torch's class on the model torch uses for them. Every test also runs torch's own class
(``impl == "torch"``), so a check that torch's class fails is a bad port, not a finding.
"""

# ruff: noqa: B023 (closures here run in the iteration that defines them, as in torch's tests)
from __future__ import annotations

import copy
import functools
import io
import math
from collections.abc import Callable
from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed")
ours = pytest.importorskip("agnostic_optim.adapters.torch", reason="the torch adapter needs torch")
common = pytest.importorskip(
    "torch.testing._internal.common_optimizers", reason="torch's optim_db needs the expecttest package"
)

from torch.nn import Parameter  # noqa: E402
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook  # noqa: E402
from torch.testing import assert_close  # noqa: E402

NAMES = ["SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "RAdam", "NAdam", "LBFGS", "SparseAdam"]
INFO = {info.optim_cls.__name__: info for info in common.optim_db}
IMPLS = {"torch": torch.optim, "ours": ours}
CASES = [pytest.param(impl, name, id=f"{impl}-{name}") for name in NAMES for impl in IMPLS]
COMPLEX_CASES = [c for c in CASES if INFO[c.values[1]].supports_complex]
DENSE_CASES = [c for c in CASES if not INFO[c.values[1]].only_supports_sparse_grads]


def assert_equal(actual: Any, expected: Any, **tolerance: Any) -> None:
    """torch's ``assertEqual`` over state dicts: tensors and numbers within the default
    tolerances of their dtype, everything else (strings, None, bools) exactly."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), (actual, expected)
        for key in expected:
            assert_equal(actual[key], expected[key], **tolerance)
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected) and len(actual) == len(expected), (actual, expected)
        for a, b in zip(actual, expected):
            assert_equal(a, b, **tolerance)
    elif isinstance(expected, (torch.Tensor, float)) and not isinstance(expected, bool):
        assert_close(actual, expected, **tolerance)
    else:
        assert actual == expected, (actual, expected)


class _Case:
    """What ``TensorTracker.pop_check_set`` asks of a ``TestCase``."""

    def __init__(self, **tolerance: Any):
        self.tolerance = tolerance

    def assertGreater(self, a: Any, b: Any, msg: str = "") -> None:
        assert a > b, msg

    def assertTrue(self, value: Any, msg: str = "") -> None:
        assert value, msg

    def assertEqual(self, a: Any, b: Any, **kwargs: Any) -> None:
        assert_close(a, b, **{**self.tolerance, **kwargs})


def sparse_if_only(name: str, *params: torch.Tensor) -> None:
    """As torch's tests do for optimizers that take only sparse gradients (SparseAdam): the
    dense gradients converted to sparse ones (which "does NOT represent the expected use
    case", in torch's words)."""
    if INFO[name].only_supports_sparse_grads:
        for p in params:
            if p.grad is not None:
                p.grad = p.grad.to_sparse()


def optim_class(impl: str, name: str) -> type[torch.optim.Optimizer]:
    return getattr(IMPLS[impl], name)


def configs(name: str, skip: tuple[str, ...] = (), dtype: torch.dtype = torch.float32) -> list:
    return common._get_optim_inputs_including_global_cliquey_kwargs("cpu", dtype, INFO[name], skip=skip)


def run_step(opt: torch.optim.Optimizer, closure: Callable[[], Any], name: str) -> Any:
    """As torch's tests step: ``step(closure)`` where the optimizer requires one."""
    if INFO[name].step_requires_closure:
        return opt.step(closure)
    loss = closure()
    opt.step()
    return loss


def weight_bias(contiguous: bool = True) -> tuple[Parameter, Parameter, torch.Tensor]:
    if contiguous:
        weight, bias = Parameter(torch.randn(10, 5)), Parameter(torch.randn(10))
    else:
        weight, bias = Parameter(torch.randn(10, 5, 2)[..., 0]), Parameter(torch.randn(10, 2)[..., 0])
    return weight, bias, torch.randn(5)


# ------------------------------------------------------------------ construction errors


# torch refuses these for its foreach kernels only; our ``foreach`` flag chooses no kernel, and
# tensor hyperparameters work on every path (README, "torch's own test suite")
FOREACH_KERNEL_LIMITS = "foreach=True"


@pytest.mark.parametrize(("impl", "name"), CASES)
def test_errors(impl: str, name: str) -> None:
    cls = optim_class(impl, name)
    for error_input in INFO[name].optim_error_inputs_func(device="cpu", dtype=torch.float32):
        if impl == "ours" and FOREACH_KERNEL_LIMITS in error_input.error_regex.replace("\\", ""):
            continue
        optim_input = error_input.optimizer_error_input
        params, kwargs = copy.deepcopy(optim_input.params), copy.deepcopy(optim_input.kwargs)
        if error_input.error_on == common.OptimizerErrorEnum.CONSTRUCTION_ERROR:
            if issubclass(error_input.error_type, Warning):
                with pytest.warns(error_input.error_type, match=error_input.error_regex):
                    cls(params, **kwargs)
            else:
                with pytest.raises(error_input.error_type, match=error_input.error_regex):
                    cls(params, **kwargs)
        else:  # a step error
            opt = cls(params, **kwargs)
            with pytest.raises(error_input.error_type, match=error_input.error_regex):
                opt.step()


# ------------------------------------------------------------------ convergence direction


@pytest.mark.parametrize("with_lrsched", [False, True])
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize(("impl", "name"), CASES)
def test_forloop_goes_right_direction(impl: str, name: str, contiguous: bool, with_lrsched: bool) -> None:
    cls, info = optim_class(impl, name), INFO[name]
    for schedulers_c in info.scheduler_inputs if with_lrsched else [None]:
        for optim_input in info.optim_inputs_func(device="cpu"):
            kwargs = dict(optim_input.kwargs)
            if "foreach" in info.supported_impls:
                kwargs["foreach"] = False
            weight, bias, input = weight_bias(contiguous)
            opt = cls([weight, bias], **kwargs)
            schedulers = [s(opt) for s in (schedulers_c or [])]

            def closure(weight=weight, bias=bias, input=input, opt=opt) -> torch.Tensor:
                opt.zero_grad()
                loss = (weight.mv(input) + bias).pow(2).sum()
                loss.backward()
                sparse_if_only(name, weight, bias)
                return loss

            initial = closure().item()
            for _ in range(20):
                loss = run_step(opt, closure, name)
                for scheduler in schedulers:
                    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                        scheduler.step(loss)
                    else:
                        scheduler.step()
            final = closure().item()
            if kwargs.get("maximize", False):
                assert final > initial, optim_input.desc
            else:
                assert final < initial, optim_input.desc


@pytest.mark.parametrize(("impl", "name"), [c for c in CASES if c.values[1] != "LBFGS"])
def test_param_group_with_lrscheduler_goes_right_direction(impl: str, name: str) -> None:
    cls = optim_class(impl, name)
    for schedulers_c in INFO[name].scheduler_inputs:
        weight, weight2 = Parameter(torch.randn(10, 5)), Parameter(torch.randn(10, 5))
        inpt = torch.randn(5)
        opt = cls([{"params": [weight]}, {"params": [weight2], "lr": 0.01}])
        schedulers = [s(opt) for s in schedulers_c]

        def closure(opt=opt, weight=weight, weight2=weight2, inpt=inpt) -> torch.Tensor:
            opt.zero_grad()
            loss = (weight.mv(inpt) + weight2.mv(inpt)).pow(2).sum()
            loss.backward()
            sparse_if_only(name, weight, weight2)
            return loss

        initial = closure().item()
        for _ in range(20):
            loss = run_step(opt, closure, name)
            for scheduler in schedulers:
                if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    scheduler.step(loss)
                else:
                    scheduler.step()
        assert closure().item() < initial


@pytest.mark.parametrize("num_dim", [0, 1, 2])
@pytest.mark.parametrize(("impl", "name"), CASES)
def test_tensor_lr(impl: str, name: str, num_dim: int) -> None:
    cls = optim_class(impl, name)
    for optim_input in configs(name, skip=("differentiable",)):
        weight, bias, input = weight_bias()
        weight_c, bias_c = Parameter(weight.clone()), Parameter(bias.clone())
        kwargs = {k: v for k, v in optim_input.kwargs.items() if k != "lr"}
        lr = 1.0 if name == "LBFGS" else 1e-3
        reference = cls([weight, bias], lr=lr, **kwargs)
        try:
            tensor_lr = cls([weight_c, bias_c], lr=torch.tensor(lr).reshape([1] * num_dim), **kwargs)
        except ValueError as error:
            assert "lr as a Tensor is not supported" in str(error)
            continue

        def closure(opt, w, b) -> torch.Tensor:
            opt.zero_grad()
            loss = (w.mv(input) + b).pow(2).sum()
            loss.backward()
            sparse_if_only(name, w, b)
            return loss

        for _ in range(5):
            run_step(reference, functools.partial(closure, reference, weight, bias), name)
            run_step(tensor_lr, functools.partial(closure, tensor_lr, weight_c, bias_c), name)
            assert_close(weight, weight_c)
            assert_close(bias, bias_c)


# ------------------------------------------------------------------ complex params


@pytest.mark.parametrize(("impl", "name"), COMPLEX_CASES)
def test_complex(impl: str, name: str) -> None:
    """A complex param steps as its ``view_as_real`` would, at every step and closure call."""
    cls = optim_class(impl, name)
    for optim_input in configs(name, skip=("differentiable", "fused"), dtype=torch.complex64):
        complex_params = [
            torch.randn(10, 5, dtype=torch.complex64, requires_grad=True),
            torch.randn(10, dtype=torch.complex64, requires_grad=True),
            torch.randn(10, 5, dtype=torch.float32, requires_grad=True),
        ]
        real_params = [
            (torch.view_as_real(p) if p.is_complex() else p).detach().clone().requires_grad_()
            for p in complex_params
        ]
        complex_opt = cls(complex_params, **optim_input.kwargs)
        real_opt = cls(real_params, **optim_input.kwargs)
        real_steps, complex_steps, grads_losses = [], [], []

        def real_closure() -> torch.Tensor:
            for param in real_params:
                grad = torch.randn_like(param)
                param.grad = grad
                real_steps.append(param.detach().clone())
                grads_losses.append(grad.clone())
            loss = torch.randn(1)
            grads_losses.append(loss.clone())
            return loss

        def complex_closure() -> torch.Tensor:
            for param in complex_params:
                grad = grads_losses.pop(0)
                param.grad = torch.view_as_complex(grad) if param.is_complex() else grad
                complex_steps.append(
                    torch.view_as_real_copy(param.detach()) if param.is_complex() else param.detach().clone()
                )
            return grads_losses.pop(0)

        for _ in range(3):
            if INFO[name].step_requires_closure:
                real_opt.step(real_closure)
                complex_opt.step(complex_closure)
            else:
                real_closure()
                complex_closure()
                real_opt.step()
                complex_opt.step()
            assert_close(
                real_params, [torch.view_as_real(p) if p.is_complex() else p for p in complex_params]
            )
            assert_close(real_steps, complex_steps)


def rosenbrock(t: torch.Tensor) -> torch.Tensor:
    x, y = t
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


@pytest.mark.parametrize(("impl", "name"), COMPLEX_CASES)
def test_complex_2d(impl: str, name: str) -> None:
    """One complex param against its real and imaginary parts as two params: values, grads and
    losses compared at every closure call (and then aligned, as torch's TensorTracker does)."""
    cls = optim_class(impl, name)
    case = _Case(**({"rtol": 4.5e-5, "atol": 5e-5} if name == "LBFGS" else {}))
    for optim_input in configs(name, skip=("differentiable", "fused"), dtype=torch.complex64):
        if name == "LBFGS":
            torch.manual_seed(2024)
        a1 = torch.randn(2, dtype=torch.complex64, requires_grad=True)
        a1_real, a1_imag = a1.real.detach().clone(), a1.imag.detach().clone()
        a1_real.requires_grad_()
        a1_imag.requires_grad_()
        opt1, opt2 = cls([a1], **optim_input.kwargs), cls([a1_real, a1_imag], **optim_input.kwargs)
        trackers = {key: common.TensorTracker() for key in ("real", "imag", "grad_real", "grad_imag", "loss")}

        def closure1() -> torch.Tensor:
            opt1.zero_grad()
            loss = rosenbrock(a1).abs()
            loss.backward()
            for key, value in (("real", a1.real), ("imag", a1.imag), ("grad_real", a1.grad.real),
                               ("grad_imag", a1.grad.imag), ("loss", loss)):  # fmt: skip
                trackers[key].add(value)
            return loss

        def closure2() -> torch.Tensor:
            opt2.zero_grad()
            trackers["real"].pop_check_set(a1_real, case)
            trackers["imag"].pop_check_set(a1_imag, case)
            a2 = torch.complex(a1_real, a1_imag)
            loss = rosenbrock(a2).abs()
            loss.backward()
            trackers["grad_real"].pop_check_set(a1_real.grad, case)
            trackers["grad_imag"].pop_check_set(a1_imag.grad, case)
            trackers["loss"].pop_check_set(loss, case)
            return loss

        for _ in range(3):
            if INFO[name].step_requires_closure:
                opt1.step(closure1)
                opt2.step(closure2)
            else:
                closure1()
                closure2()
                opt1.step()
                opt2.step()
            case.assertEqual(a1.real, a1_real)
            case.assertEqual(a1.imag, a1_imag)
        assert all(tracker.all_popped() for tracker in trackers.values())


# ------------------------------------------------------------------ sparse gradients


@pytest.mark.parametrize("with_lrsched", [False, True])
@pytest.mark.parametrize(("impl", "name"), [c for c in CASES if INFO[c.values[1]].supports_sparse])
def test_rosenbrock_sparse(impl: str, name: str, with_lrsched: bool) -> None:
    """Coordinate descent on Rosenbrock with uncoalesced sparse gradients, against the same
    optimizer given the dense gradients (torch's 1800 iterations, atol = rtol = 5e-6)."""
    cls, info = optim_class(impl, name), INFO[name]
    metadata, scheduler_makers = info.metadata_for_sparse
    if with_lrsched and not scheduler_makers:
        return
    kwargs_list: list[dict[str, Any]] = []
    for optim_input in info.optim_inputs_func(device="cpu"):
        kwargs = {k: v for k, v in optim_input.kwargs.items() if k not in metadata}
        if kwargs and kwargs not in kwargs_list:
            kwargs_list.append(kwargs)
    for kwargs in kwargs_list:
        kwargs = {**kwargs, "lr": metadata["lr"]}
        twin = not info.only_supports_sparse_grads  # (a dense-gradient run to compare with)
        param, param_c = [torch.tensor([1.5, 1.5], dtype=torch.float64).requires_grad_() for _ in range(2)]
        opt, opt_c = cls([param], **kwargs), cls([param_c], **kwargs)
        schedulers = [s(opt) for s in scheduler_makers] if with_lrsched else []
        schedulers_c = [s(opt_c) for s in scheduler_makers] if with_lrsched else []
        start = param.detach().clone()
        for i in range(1800):
            w = i % 2
            opt.zero_grad()
            opt_c.zero_grad()
            loss = rosenbrock(param)
            rosenbrock(param_c).backward()
            grad = torch.autograd.grad(loss, param)[0]
            x, y = grad.tolist()
            if w:
                indices, values, dense = [[0, 0]], [x / 4.0, x - x / 4.0], [x, 0.0]
            else:
                indices, values, dense = [[1, 1]], [y - y / 4.0, y / 4.0], [0.0, y]
            param.grad = torch.sparse_coo_tensor(indices, values, (2,), dtype=torch.float64)
            param_c.grad = torch.tensor(dense, dtype=torch.float64)
            opt.step()
            if twin:
                opt_c.step()
            for scheduler, scheduler_c in zip(schedulers, schedulers_c):
                if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    scheduler.step(rosenbrock(param))
                    scheduler_c.step(rosenbrock(param_c))
                else:
                    scheduler.step()
                    scheduler_c.step()
            if twin:
                assert_close(param, param_c, atol=5e-6, rtol=5e-6)
        if kwargs.get("maximize"):
            assert rosenbrock(param) >= rosenbrock(start)
        else:
            target = torch.ones(2, dtype=torch.float64)
            assert torch.dist(param, target) <= torch.dist(start, target)


# ------------------------------------------------------------------ ours against torch's class


def _compare_between(name: str, kwargs: dict[str, Any], dtype: torch.dtype = torch.float64) -> None:
    """torch's ``_compare_between`` (its foreach/fused parity harness), ours against torch's:
    7 steps of a small MLP with a 0-d param, no gradients at the third step, a layer frozen
    for two steps; every param and state tensor compared after each step."""
    models, optimizers = [], []
    for module in (torch.optim, ours):
        torch.manual_seed(1)
        model = torch.nn.Sequential(
            torch.nn.Linear(2, 3), torch.nn.Sigmoid(), torch.nn.Linear(3, 1), torch.nn.Sigmoid()
        ).to(dtype)
        empty = torch.empty((), dtype=dtype, requires_grad=True)
        empty.grad = torch.rand_like(empty)
        params = [*model.parameters(), empty]
        models.append((model, params))
        optimizers.append(getattr(module, name)(params, **kwargs))
    input = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], dtype=dtype).reshape(3, 2)
    tolerance = {"atol": 1.5e-7, "rtol": 1.1e-7} if name == "RAdam" else {}
    for i in range(7):
        for (model, _), opt in zip(models, optimizers):
            if i == 3:
                model[2].requires_grad_(False)
            if i == 5:
                model[2].requires_grad_(True)

            def closure(model=model, opt=opt) -> torch.Tensor:
                opt.zero_grad()
                loss = model(input).sum()
                if i != 2:
                    loss.backward()
                    sparse_if_only(name, *model.parameters())
                return loss

            opt.step(closure) if INFO[name].step_requires_closure else (closure(), opt.step())
        (_, theirs), (_, mine) = models
        for p, q in zip(theirs, mine):
            assert_close(q, p, **tolerance)
            if name == "LBFGS":  # (its state has another layout, by design: see adapters._torch_lbfgs)
                continue
            for key, value in optimizers[0].state[p].items():
                mine_value = optimizers[1].state[q][key]
                if isinstance(value, torch.Tensor):
                    assert_close(torch.as_tensor(mine_value).to(value.dtype), value, **tolerance, msg=key)


@pytest.mark.parametrize("name", NAMES)
def test_matches_torch_on_every_config(name: str) -> None:
    """Every CPU configuration of optim_db, ours against torch's class (float64)."""
    for optim_input in configs(name, skip=("differentiable", "fused"), dtype=torch.float64):
        _compare_between(name, optim_input.kwargs)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_adamw_serialization(impl: str) -> None:
    module = IMPLS[impl]
    model = torch.nn.Linear(5, 5)
    adamw = module.AdamW(model.parameters())
    adam = module.Adam(model.parameters())
    adam.load_state_dict(adamw.state_dict())
    assert adam.param_groups[0]["decoupled_weight_decay"]
    assert not module.Adam(model.parameters()).param_groups[0]["decoupled_weight_decay"]
    adamw.load_state_dict(module.Adam(model.parameters()).state_dict())
    assert adamw.param_groups[0]["decoupled_weight_decay"]
    state = module.AdamW(model.parameters()).state_dict()
    del state["param_groups"][0]["decoupled_weight_decay"]
    adamw.load_state_dict(state)
    assert adamw.param_groups[0]["decoupled_weight_decay"]


# ------------------------------------------------------------------ param groups, no-op steps


@pytest.mark.parametrize(("impl", "name"), [c for c in CASES if c.values[1] != "LBFGS"])
def test_param_groups_weight_decay(impl: str, name: str) -> None:
    cls = optim_class(impl, name)
    for optim_input in configs(name, skip=("differentiable",)):
        weight, weight2 = Parameter(torch.randn(10, 5)), Parameter(torch.randn(10, 5))
        input = torch.randn(5)
        kwargs = optim_input.kwargs
        opt = cls(
            [dict(params=[weight], **kwargs), dict(params=[weight2], **{**kwargs, "weight_decay": 0.0})]
        )
        loss = (weight.mv(input) + weight2.mv(input)).pow(2).sum()
        initial = loss.item()
        for _ in range(20):
            opt.zero_grad()
            loss = (weight.mv(input) + weight2.mv(input)).pow(2).sum()
            loss.backward()
            sparse_if_only(name, weight, weight2)
            opt.step()
        final = (weight.mv(input) + weight2.mv(input)).pow(2).sum().item()
        assert (final > initial) if kwargs.get("maximize", False) else (final < initial), optim_input.desc


@pytest.mark.parametrize(("impl", "name"), [c for c in CASES if c.values[1] != "LBFGS"])
def test_param_groups_lr(impl: str, name: str) -> None:
    cls = optim_class(impl, name)
    for optim_input in configs(name, skip=("differentiable",)):
        kwargs = dict(optim_input.kwargs)
        if "lr" not in kwargs or kwargs["lr"] == 0:
            kwargs["lr"] = 1e-3
        weight, bias = Parameter(torch.randn(10, 5)), Parameter(torch.randn(10))
        irrelevant = Parameter(torch.randn(2, 2))
        irrelevant_clone = irrelevant.clone()
        input = torch.randn(5)
        opt = cls([dict(params=[weight, bias], **kwargs), dict(params=[irrelevant])], lr=1e-28)
        initial = (weight.mv(input) + bias).pow(2).sum().item()
        for _ in range(20):
            opt.zero_grad()
            (weight.mv(input) + bias).pow(2).sum().backward()
            irrelevant.grad = torch.rand_like(irrelevant)
            sparse_if_only(name, weight, bias, irrelevant)
            opt.step()
        final = (weight.mv(input) + bias).pow(2).sum().item()
        assert (final > initial) if kwargs.get("maximize", False) else (final < initial), optim_input.desc
        assert_close(irrelevant, irrelevant_clone)


@pytest.mark.parametrize(("impl", "name"), CASES)
def test_step_is_noop_when_params_have_no_grad(impl: str, name: str) -> None:
    cls = optim_class(impl, name)
    for optim_input in configs(name):
        params = [torch.randn(2, 3, requires_grad=False) for _ in range(2)]
        before = [p.clone() for p in params]
        opt = cls(params, **optim_input.kwargs)
        opt.step(lambda: torch.tensor([1]))
        assert_close(params, before)


@pytest.mark.parametrize(("impl", "name"), CASES)
def test_step_is_noop_for_zero_grads(impl: str, name: str) -> None:
    cls = optim_class(impl, name)
    for optim_input in configs(name):
        kwargs = dict(optim_input.kwargs)
        if kwargs.get("weight_decay", 0) != 0:
            continue
        if name == "AdamW":  # its default weight decay moves the param: torch takes a tiny lr
            kwargs["lr"] = torch.tensor(1e-5) if isinstance(kwargs.get("lr"), torch.Tensor) else 1e-5
        param = torch.randn((5, 1), requires_grad=True)
        old = param.detach().clone()
        params = [param.detach()] if kwargs.get("differentiable") else [param]
        opt = cls(params, **kwargs)

        def closure() -> torch.Tensor:
            return torch.tensor([1])

        if INFO[name].only_supports_sparse_grads:  # (an empty sparse gradient, multidimensional)
            params[0].grad = torch.sparse_coo_tensor(torch.empty((1, 0)), torch.empty((0, 1)), (5, 1))
        else:
            params[0].grad = torch.zeros_like(params[0])
        opt.step(closure)
        assert_close(old, params[0].detach(), msg=optim_input.desc)


@pytest.mark.parametrize(("impl", "name"), CASES)
def test_grads_are_never_inplaced_into(impl: str, name: str) -> None:
    cls = optim_class(impl, name)
    for optim_input in configs(name):
        param = torch.randn((5, 1), requires_grad=True)
        params = [param.detach()] if optim_input.kwargs.get("differentiable") else [param]
        opt = cls(params, **optim_input.kwargs)
        if INFO[name].only_supports_sparse_grads:
            params[0].grad = torch.sparse_coo_tensor(torch.empty((1, 0)), torch.empty((0, 1)), (5, 1))
        else:
            params[0].grad = torch.rand_like(params[0])
        version = params[0].grad._version
        for _ in range(5):
            opt.step(lambda: torch.tensor([1.0]))
            assert params[0].grad._version == version, optim_input.desc


@pytest.mark.parametrize(("impl", "name"), CASES)
def test_optimizer_can_be_printed(impl: str, name: str) -> None:
    """``repr`` works on every config, and prints as torch.optim's base class prints."""
    cls = optim_class(impl, name)
    for optim_input in configs(name):
        opt = cls([Parameter(torch.randn(2, 3)) for _ in range(2)], **optim_input.kwargs)
        text = repr(opt)
        expected = f"{type(opt).__name__} ("
        for i, group in enumerate(opt.param_groups):
            expected += f"\nParameter Group {i}\n"
            expected += "".join(f"    {key}: {group[key]}\n" for key in sorted(group) if key != "params")
        assert text == expected + ")"


@pytest.mark.parametrize(("impl", "name"), CASES)
def test_non_empty_state(impl: str, name: str) -> None:
    cls = optim_class(impl, name)
    for optim_input in INFO[name].optim_inputs_func(device="cpu"):
        model = torch.nn.Linear(5, 5, bias=False)
        opt = cls(model.parameters(), **optim_input.kwargs)
        model(torch.randn(1, 5)).sum().backward()
        sparse_if_only(name, *model.parameters())
        opt.step(lambda: 1.0) if name == "LBFGS" else opt.step()
        assert all(len(state) > 0 for state in opt.state.values()), optim_input.desc


# ------------------------------------------------------------------ state dicts


def _primed(cls: type, name: str, kwargs: dict[str, Any], named: bool = False):
    weight, bias = Parameter(torch.randn(2, 3)), Parameter(torch.randn(2))
    input = torch.randn(3, requires_grad=True)
    params = [(f"name{i}", p) for i, p in enumerate((weight, bias))] if named else [weight, bias]
    opt = cls(params, **kwargs)

    def closure(opt=opt, weight=weight, bias=bias) -> torch.Tensor:
        opt.zero_grad()
        loss = (weight.mv(input) + bias).pow(2).sum()
        loss.backward()
        sparse_if_only(name, weight, bias)
        return loss

    return opt, weight, bias, input, closure


def _without_param_names(state_dict: dict[str, Any]) -> dict[str, Any]:
    groups = [{k: v for k, v in group.items() if k != "param_names"} for group in state_dict["param_groups"]]
    return {**state_dict, "param_groups": groups}


@pytest.mark.parametrize(
    "named", [(False, False), (True, False), (False, True)], ids=["plain", "named-first", "named-second"]
)
@pytest.mark.parametrize(("impl", "name"), CASES)
def test_state_dict_deterministic(impl: str, name: str, named: tuple[bool, bool]) -> None:
    cls = optim_class(impl, name)
    every = configs(name, skip=("differentiable",))
    for optim_input in every if named == (False, False) else every[:1]:  # (naming: one config)
        opt, weight, bias, input, closure = _primed(cls, name, optim_input.kwargs, named[0])
        for _ in range(10):
            run_step(opt, closure, name)
        weight_c, bias_c = Parameter(weight.clone()), Parameter(bias.clone())
        params_c = [("name0", weight_c), ("name1", bias_c)] if named[1] else [weight_c, bias_c]
        opt_c = cls(params_c, **optim_input.kwargs)

        def closure_c() -> torch.Tensor:
            opt_c.zero_grad()
            loss = (weight_c.mv(input) + bias_c).pow(2).sum()
            loss.backward()
            sparse_if_only(name, weight_c, bias_c)
            return loss

        opt_c.load_state_dict(copy.deepcopy(opt.state_dict()))
        for _ in range(10):
            run_step(opt, closure, name)
            run_step(opt_c, closure_c, name)
            assert_close(weight, weight_c)
            assert_close(bias, bias_c)
        assert_equal(_without_param_names(opt.state_dict()), _without_param_names(opt_c.state_dict()))
        opt_c.param_groups.extend(opt_c.param_groups)
        assert_equal(
            _without_param_names(opt.state_dict())["param_groups"][-1],
            _without_param_names(opt_c.state_dict())["param_groups"][-1],
        )


@pytest.mark.parametrize(("impl", "name"), DENSE_CASES)  # (torch skips SparseAdam: dense grads)
def test_can_load_older_state_dict(impl: str, name: str) -> None:
    cls, info = optim_class(impl, name), INFO[name]
    for optim_input in configs(name, skip=("differentiable",)):
        torch.manual_seed(1)
        model = torch.nn.Sequential(
            torch.nn.Conv2d(4, 2, 1, stride=2), torch.nn.BatchNorm2d(2, eps=1e-05, momentum=0.1)
        )
        model.train()
        input = torch.rand(1, 4, 16, 16)
        opt = cls(model.parameters(), **optim_input.kwargs)

        def closure(opt=opt, model=model) -> torch.Tensor:
            opt.zero_grad()
            loss = model(input).sum()
            loss.backward()
            return loss

        for _ in range(3):
            run_step(opt, closure, name)
        state_dict = copy.deepcopy(opt.state_dict())
        for group in state_dict["param_groups"]:
            for flag in info.not_og_supported_flags:
                group.pop(flag, None)
        opt.load_state_dict(state_dict)
        run_step(opt, closure, name)


@pytest.mark.parametrize(("impl", "name"), DENSE_CASES)
def test_can_load_from_to_named_state_dict(impl: str, name: str) -> None:
    cls = optim_class(impl, name)
    for optim_input in configs(name, skip=("differentiable",)):
        for named1, named2 in ((False, True), (True, False), (True, True)):
            torch.manual_seed(1)
            model = torch.nn.Sequential(torch.nn.Conv2d(4, 2, 1, stride=2), torch.nn.BatchNorm2d(2))
            input = torch.rand(1, 4, 16, 16)
            params = model.named_parameters() if named1 else model.parameters()
            opt = cls(params, **optim_input.kwargs)

            def closure(opt=opt, model=model) -> torch.Tensor:
                opt.zero_grad()
                loss = model(input).sum()
                loss.backward()
                return loss

            for _ in range(3):
                run_step(opt, closure, name)
            opt2 = cls(model.named_parameters() if named2 else model.parameters(), **optim_input.kwargs)
            opt2.load_state_dict(copy.deepcopy(opt.state_dict()))

            def closure2(opt2=opt2, model=model) -> torch.Tensor:
                opt2.zero_grad()
                loss = model(input).sum()
                loss.backward()
                return loss

            run_step(opt2, closure2, name)
            names = opt2.state_dict()["param_groups"][0]["param_names"]
            assert names == [n for n, _ in model.named_parameters()]


@pytest.mark.parametrize("named", [False, True])
@pytest.mark.parametrize(("impl", "name"), CASES)
def test_save_load_equality_with_weights_only(impl: str, name: str, named: bool) -> None:
    cls = optim_class(impl, name)
    for optim_input in configs(name, skip=("differentiable",)):
        opt, *_, closure = _primed(cls, name, optim_input.kwargs, named)
        for _ in range(3):
            opt.step(closure)
        state_dict = opt.state_dict()
        buffer = io.BytesIO()
        torch.save(state_dict, buffer)
        buffer.seek(0)
        assert_equal(torch.load(buffer), state_dict)
        buffer.seek(0)
        assert_equal(torch.load(buffer, weights_only=True), state_dict)


@pytest.mark.parametrize(("impl", "name"), CASES)
def test_load_nontensor_step(impl: str, name: str) -> None:
    cls = optim_class(impl, name)
    for optim_input in configs(name, skip=("differentiable",)):
        params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
        for p in params:
            p.grad = torch.rand_like(p)
        sparse_if_only(name, *params)
        opt = cls(params, **optim_input.kwargs)

        def closure() -> torch.Tensor:
            return torch.rand(1)

        for _ in range(3):
            opt.step(closure)
        state_dict = opt.state_dict()
        for state in state_dict["state"].values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].item()
        opt.load_state_dict(state_dict)
        opt.step(closure)


@pytest.mark.parametrize(("impl", "name"), CASES)
def test_deepcopy_copies_all_public_attrs(impl: str, name: str) -> None:
    cls = optim_class(impl, name)
    for optim_input in configs(name, skip=("differentiable",)):
        params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
        for p in params:
            p.grad = torch.rand_like(p)
        sparse_if_only(name, *params)
        opt = cls(params, **optim_input.kwargs)
        for _ in range(3):
            opt.step(lambda: torch.rand(1))

        def public(o: Any) -> set[str]:
            return {k for k in o.__dict__ if not k.startswith("_")}

        assert public(opt) == public(copy.deepcopy(opt))


# ------------------------------------------------------------------ hooks


def _state_dict_pre_hook(opt: torch.optim.Optimizer) -> None:
    opt.state["test"] = 1


def _state_dict_post_hook(opt: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    if "test" in state_dict["state"]:
        state_dict["state"].pop("test")
        state_dict["ran_state_dict_pre_hook"] = True
    else:
        state_dict["ran_state_dict_pre_hook"] = False
    return state_dict


def _load_state_dict_pre_hook1(opt: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
    state_dict["param_groups"][0]["lr"] = 0.002


def _load_state_dict_pre_hook2(opt: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    copied = copy.deepcopy(state_dict)
    copied["param_groups"][0]["lr"] = 0.003
    return copied


def _load_state_dict_post_hook(opt: torch.optim.Optimizer) -> None:
    opt.state["ran_load_state_dict_pre_hook2"] = opt.param_groups[0]["lr"] == 0.003
    opt.state["ran_load_state_dict_post_hook"] = True


def _each_optimizer(impl: str, name: str):
    cls = optim_class(impl, name)
    for optim_input in configs(name):
        yield cls([torch.rand(2, 3, requires_grad=True)], **optim_input.kwargs)


@pytest.mark.parametrize(("impl", "name"), CASES)
def test_state_dict_hooks(impl: str, name: str) -> None:
    """torch's test_state_dict_pre_hook, _post_hook and _pre_post_hook."""
    for opt in _each_optimizer(impl, name):
        opt.register_state_dict_pre_hook(_state_dict_pre_hook)
        assert opt.state_dict()["state"]["test"] == 1
    for opt in _each_optimizer(impl, name):
        opt.register_state_dict_post_hook(_state_dict_post_hook)
        assert opt.state_dict()["ran_state_dict_pre_hook"] is False
    for opt in _each_optimizer(impl, name):
        opt.register_state_dict_pre_hook(_state_dict_pre_hook)
        opt.register_state_dict_post_hook(_state_dict_post_hook)
        state_dict = opt.state_dict()
        assert "test" not in state_dict["state"]
        assert state_dict["ran_state_dict_pre_hook"] is True


@pytest.mark.parametrize(("impl", "name"), CASES)
def test_load_state_dict_hooks(impl: str, name: str) -> None:
    """torch's test_load_state_dict_pre_hook_and_prepend, _post_hook and _pre_post_hook."""
    for opt in _each_optimizer(impl, name):
        state_dict = opt.state_dict()
        opt.register_load_state_dict_pre_hook(_load_state_dict_pre_hook1)
        opt.load_state_dict(state_dict)
        assert opt.param_groups[0]["lr"] == 0.002
        opt.register_load_state_dict_pre_hook(_load_state_dict_pre_hook2, prepend=True)
        opt.load_state_dict(state_dict)
        assert opt.param_groups[0]["lr"] == 0.002  # (hook1 edits hook2's copy)
    for opt in _each_optimizer(impl, name):
        opt.register_load_state_dict_post_hook(_load_state_dict_post_hook)
        opt.load_state_dict(opt.state_dict())
        assert not opt.state["ran_load_state_dict_pre_hook2"]
        assert opt.state["ran_load_state_dict_post_hook"]
    for opt in _each_optimizer(impl, name):
        opt.register_load_state_dict_pre_hook(_load_state_dict_pre_hook2)
        opt.register_load_state_dict_post_hook(_load_state_dict_post_hook)
        opt.load_state_dict(opt.state_dict())
        assert opt.state["ran_load_state_dict_pre_hook2"]
        assert opt.state["ran_load_state_dict_post_hook"]


@pytest.mark.parametrize(("impl", "name"), CASES)
def test_step_hooks(impl: str, name: str) -> None:
    """torch's test_step_pre_hook, test_step_post_hook and test_step_all_hooks."""
    cls = optim_class(impl, name)
    closure = (lambda: 1) if name == "LBFGS" else None
    for optim_input in configs(name):
        params = [torch.tensor([[1, 1]], dtype=torch.float32)]
        opt = cls(params, **optim_input.kwargs)
        data = [2]
        handle = opt.register_step_post_hook(lambda o, a, k: data.__setitem__(0, data[0] + 2))
        opt.step(closure)
        opt.step(closure)
        assert data[0] == 6
        handle.remove()
        opt.step(closure)
        assert data[0] == 6
        data = [5]
        handle = opt.register_step_pre_hook(lambda o, a, k: data.__setitem__(0, data[0] + 2))
        opt.step(closure)
        opt.step(closure)
        assert data[0] == 9
        handle.remove()
        opt.step(closure)
        assert data[0] == 9

        order: list[int] = []
        opt, opt2 = cls(params, **optim_input.kwargs), torch.optim.SGD(params)
        handles = [
            register_optimizer_step_pre_hook(lambda o, a, k: order.append(0)),
            register_optimizer_step_post_hook(lambda o, a, k: order.append(5)),
            opt.register_step_pre_hook(lambda o, a, k: order.append(1)),
            opt.register_step_post_hook(lambda o, a, k: order.append(2)),
            opt2.register_step_pre_hook(lambda o, a, k: order.append(3)),
            opt2.register_step_post_hook(lambda o, a, k: order.append(4)),
        ]
        try:
            opt.step(closure)
            opt2.step()
            opt.step(closure)
            assert order == [0, 1, 2, 5, 0, 3, 4, 5, 0, 1, 2, 5]
        finally:
            for h in handles:
                h.remove()
        opt.step(closure)
        opt2.step()
        assert order == [0, 1, 2, 5, 0, 3, 4, 5, 0, 1, 2, 5]


# ------------------------------------------------------------------ L-BFGS


@pytest.mark.parametrize("impl", list(IMPLS))
def test_second_order_optims_return_consistent_types(impl: str) -> None:
    cls = optim_class(impl, "LBFGS")
    params = [torch.randn(10, 5), torch.randn(10)]
    for optim_input in configs("LBFGS"):
        opt1 = cls(params, **{**optim_input.kwargs, "tolerance_grad": math.inf})
        opt2 = cls(params, **{**optim_input.kwargs, "tolerance_grad": -math.inf})
        result1 = opt1.step(lambda: torch.tensor([10]))
        result2 = opt2.step(lambda: torch.tensor([10]))
        assert type(result1) is type(result2)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_step_iteration(impl: str) -> None:
    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(4, 2, 1, stride=2), torch.nn.BatchNorm2d(2, eps=1e-05, momentum=0.1)
    )
    input = torch.rand(1, 4, 16, 16)
    opt = optim_class(impl, "LBFGS")(
        model.parameters(), max_iter=1, max_eval=5, line_search_fn="strong_wolfe"
    )
    counter = [0]

    def closure() -> torch.Tensor:
        counter[0] += 1
        opt.zero_grad()
        loss = model(input).sum()
        loss.backward()
        return loss

    opt.step(closure)
    assert counter[0] == 6
