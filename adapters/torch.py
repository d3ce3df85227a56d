"""PyTorch adapter: ``torch.optim.Optimizer`` classes backed by the array-API core.

Drop-in replacements for torch.optim (same class names, constructor arguments, param groups,
``state_dict`` keys and numbers) plus classes for optimizers torch lacks::

    from agnostic_optim.adapters.torch import AdamW, Lion, TorchOptimizer
    opt = AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    opt = TorchOptimizer(model.parameters(), ao.adan, lr=1e-3)          # any factory

The adapter translates, the core computes: each step gathers a group's parameters that have
gradients, assembles the core state from torch's per-parameter ``self.state[p]`` (``step``,
``exp_avg``, ...), runs the core's update rule and writes the results back in place.

This module is the public face: the classes and their signatures. Where the work happens:

* ``_torch_optimizer``: :class:`TorchOptimizer`, the torch.optim front (param groups, options,
  hyperparameter tensors, ``state_dict``) and the dispatch to an executor;
* ``_torch_plan``: a group's step laid out once and reused, torch.optim's per-param state;
* ``_torch_eager`` (default) and ``_torch_compiled`` (``compile=True``): the executors;
  ``_tensor_list`` runs the core's rule on ``_foreach`` kernels for the eager one;
* ``_torch_private``: every private torch API, checked at import;
* ``_torch_wrappers`` (SAM, Lookahead), ``_torch_lbfgs``, ``_torch_kfac``: the classes whose
  step is not one rule over the params.

Mixed precision: pass ``state_dtype=`` and ``compensation=`` (see
:func:`agnostic_optim.mixed_precision`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

import agnostic_optim as ao
from agnostic_optim.adapters._torch_kfac import KFAC
from agnostic_optim.adapters._torch_lbfgs import LBFGS
from agnostic_optim.adapters._torch_optimizer import (
    CLASS_NAMES,
    PRECISION_OPTIONS,
    TorchOptimizer,
    bind_arguments,
    class_signature,
)
from agnostic_optim.adapters._torch_plan import XP, initial_param_state, shared_counters, step_count
from agnostic_optim.adapters._torch_wrappers import SAM, Lookahead
from agnostic_optim.curvature import sophia_hessian_update
from agnostic_optim.hparams import is_scheduled

__all__ = [
    "KFAC",
    "LAMB",
    "LARS",
    "LBFGS",
    "SAM",
    "SGD",
    "AMSGrad",
    "AdaHessian",
    "Adagrad",
    "Adam",
    "AdamW",
    "Adan",
    "Lion",
    "Lookahead",
    "NAdam",
    "RAdam",
    "RMSprop",
    "Shampoo",
    "Sophia",
    "SparseAdam",
    "TorchOptimizer",
    "param_layouts",
]


def _named_class(name: str, factory: Callable[..., ao.Optimizer], **behaviour: Any) -> type[TorchOptimizer]:
    """A TorchOptimizer subclass for one factory, with its real signature (positional arguments
    in torch's order where torch has the class: see :func:`class_signature`)."""
    extra = {"compile": False, **dict.fromkeys(PRECISION_OPTIONS)}
    signature = class_signature(factory, getattr(torch.optim, name, None), extra=extra)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        hparams = bind_arguments(signature, (self, *args), kwargs)
        TorchOptimizer.__init__(self, hparams.pop("params"), factory, **hparams)

    __init__.__signature__ = signature  # (help(), IDEs and inspect see the real arguments)
    doc = f"``torch.optim.Optimizer`` running ``agnostic_optim.{factory.__name__}``.\n\n"
    doc += inspect.getdoc(factory)
    namespace = {
        "__init__": __init__,
        "__doc__": doc,
        "__module__": __name__,
        **{key if key == "sparse_gradients" else f"_{key}": value for key, value in behaviour.items()},
    }
    return type(name, (TorchOptimizer,), namespace)


SGD = _named_class("SGD", ao.sgd, implicit_step=True, sparse_gradients="accept")
Adagrad = _named_class("Adagrad", ao.adagrad, eager_state=True, sparse_gradients="accept")
RMSprop = _named_class("RMSprop", ao.rmsprop)
Adam = _named_class("Adam", ao.adam)
AdamW = _named_class("AdamW", ao.adamw, group_constants={"decoupled_weight_decay": True})
AMSGrad = _named_class("AMSGrad", ao.amsgrad)
SparseAdam = _named_class("SparseAdam", ao.sparse_adam, sparse_gradients="require")
RAdam = _named_class("RAdam", ao.radam)
NAdam = _named_class("NAdam", ao.nadam)
Adan = _named_class("Adan", ao.adan)
Lion = _named_class("Lion", ao.lion)
LARS = _named_class("LARS", ao.lars)
LAMB = _named_class("LAMB", ao.lamb)
Shampoo = _named_class("Shampoo", ao.shampoo)


class AdaHessian(_named_class("AdaHessian", ao.adahessian)):
    __doc__ = (
        "``torch.optim.Optimizer`` running ``agnostic_optim.adahessian``; each step draws a "
        "Hutchinson probe and passes ``z ⊙ Hz`` as ``hessian_diag``, as the official AdaHessian "
        "does. The gradients must carry their graph: call ``loss.backward(create_graph=True)`` "
        "before ``step()``. Probes come from torch's global generator (``torch.manual_seed``).\n\n"
        + inspect.getdoc(ao.adahessian)
    )

    _own_inputs = ("hessian_diag",)

    def _step_inputs(self) -> dict[str, dict[int, torch.Tensor]]:
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        curved = [p for p in params if p.grad.grad_fn is not None]
        if params and not curved:
            raise RuntimeError(
                "AdaHessian needs Hessian-vector products of the loss: compute the gradients with "
                "loss.backward(create_graph=True) before step(). (DDP and FSDP2 reduce the "
                "gradients without their graph: AdaHessian does not run under them; README, "
                "Scaling out)"
            )
        if not curved:
            return {}
        probes = [torch.randint_like(p, 2).mul_(2).sub_(1) for p in curved]  # Rademacher ±1
        with torch.enable_grad():
            products = torch.autograd.grad(
                [p.grad for p in curved], curved, grad_outputs=probes, allow_unused=True
            )
        diag = {id(p): torch.zeros_like(p) for p in params}  # a gradient without a graph: H = 0
        for p, z, hz in zip(curved, probes, products):
            if hz is not None:
                diag[id(p)] = z.mul_(hz)
        return {"hessian_diag": diag}


class Sophia(_named_class("Sophia", ao.sophia)):
    __doc__ = (
        "``torch.optim.Optimizer`` running ``agnostic_optim.sophia``. As with the official "
        "SophiaG, call ``update_hessian()`` every k steps right after back-propagating a loss on "
        "labels sampled from the model (the Gauss-Newton-Bartlett estimator): it folds the "
        "gradients' squares ``ĝ ⊙ ĝ`` into the ``hessian`` EMA of every param with a gradient, "
        "there and then (so a checkpoint taken before the next step holds it).\n\n"
        + inspect.getdoc(ao.sophia)
    )

    _own_inputs = ("hessian_diag",)  # (folded in by update_hessian)

    @torch.no_grad()
    def update_hessian(self) -> None:
        """The core's Sophia curvature EMA (:func:`agnostic_optim.curvature.sophia_hessian_update`)
        with the estimate ``ĝ ⊙ ĝ``, for every param with a gradient (SophiaG's
        ``update_hessian``; a param without state gets it, as there)."""
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            rule = self._optimizer_for(group).rule
            for p in params:
                state = self.state[p]
                if not state:
                    state.update(initial_param_state(rule, p, shared_counters([0.0])[0]))
                beta2 = group["betas"][1]
                if is_scheduled(beta2):  # its value at the steps taken, as the next step's fold-in
                    beta2 = beta2(torch.tensor(step_count(state), dtype=torch.int32))
                beta2 = torch.as_tensor(beta2, dtype=torch.float64)
                dtype = rule.precision.compute_dtype(XP, p)
                g = p.grad.to(dtype)
                hessian = state["hessian"]
                decay, weight = (x.to(device=p.device, dtype=dtype) for x in (beta2, 1 - beta2))
                hessian.copy_(sophia_hessian_update(hessian.to(dtype), g * g, decay, weight))


def param_layouts(model: torch.nn.Module) -> dict[str, str]:
    """``{name: layout}`` for the weights of ``model``'s ``nn.Linear`` (``"out_in"``) and
    ``nn.Conv1d/2d/3d`` (``"out_in_spatial"``) layers, named as ``model.named_parameters()``
    names them: pass it to :func:`agnostic_optim.checkpoint.save_state` with
    ``opt.portable_state(model)``, so that loading the state onto a framework that orders
    those axes otherwise (flax's ``(in, out)`` kernels) is refused rather than transposed."""
    kinds = {torch.nn.Linear: "out_in", torch.nn.Conv1d: "out_in_spatial"}
    kinds.update({torch.nn.Conv2d: "out_in_spatial", torch.nn.Conv3d: "out_in_spatial"})
    names = {id(p): name for name, p in model.named_parameters()}
    return {
        names[id(module.weight)]: layout
        for module in model.modules()
        for kind, layout in kinds.items()
        if type(module) is kind and id(module.weight) in names
    }


# The class of every registered factory (tests check that none is missing).
CLASS_FOR_FACTORY: dict[str, type[torch.optim.Optimizer]] = {
    factory: globals()[name] for factory, name in CLASS_NAMES.items()
}
