"""``KFAC``: the core's K-FAC (:func:`agnostic_optim.kfac`) as a ``torch.optim.Optimizer``.

Built from a model, as alecwangcq/KFAC-Pytorch's ``KFACOptimizer`` is::

    opt = KFAC(model, lr=0.01, damping=0.003, weight_decay=1e-3)
    for x, y in loader:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()

A forward hook on every ``nn.Linear`` records its input and, through a hook on its output
tensor, the gradient of the loss with respect to that output (KFAC-Pytorch uses a backward
module hook; a tensor hook gives the same gradient without torch's warning for a first layer
whose input needs no gradient), on the steps where statistics are due
(``step % cov_update_frequency == 0``, as KFAC-Pytorch's ``steps % TCov``). ``step`` hands
them to the core as ``layer_stats`` with the gradients, then drops them; the core computes,
this class only translates. Other parameters (norm layers, embeddings...) get the core's SGD
part.
"""

from __future__ import annotations

import warnings
import weakref
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

import agnostic_optim as ao
from agnostic_optim import checkpoint
from agnostic_optim.adapters._torch_distributed import data_parallel_group, gather_batches, whole, write_back
from agnostic_optim.adapters._torch_optimizer import bind_arguments, class_signature

_NUMERIC = ("lr", "momentum", "stat_decay", "damping", "kl_clip", "weight_decay")

LayerKey = tuple[str]
# the core's arguments and defaults but ``layers`` (found in the model) and ``weight_layout``
# (torch's ``(out, in)``)
_SIGNATURE = class_signature(ao.kfac, first="model", exclude=("layers", "weight_layout"))


class KFAC(torch.optim.Optimizer):
    """K-FAC for the ``nn.Linear`` layers of ``model`` (see :func:`agnostic_optim.kfac`).

    One param group holds every trainable parameter of ``model``; its numeric hyperparameters
    (``lr``, ``momentum``, ``stat_decay``, ``damping``, ``kl_clip``, ``weight_decay``) are read
    every step, so ``torch.optim.lr_scheduler`` works. ``cov_update_frequency`` and
    ``inverse_update_frequency`` are KFAC-Pytorch's ``TCov`` and ``TInv``. Every parameter must
    have a gradient when ``step`` runs.

    Layers are named by their weight's name in ``model.named_parameters()``, so tied weights
    (``lm_head.weight = emb.weight``) work: a weight used by one ``nn.Linear`` is that layer's,
    preconditioned with its statistics, as KFAC-Pytorch does. A weight (or bias) shared by
    several ``nn.Linear`` modules has no well-defined factors: it gets the SGD part only, with a
    ``UserWarning`` naming it.

    Statistics: on a step where they are due (:attr:`stats_due`), ``step`` uses the input and
    the output gradient of each layer from the latest backward pass run while ``acc_stats`` is
    true (with the forward pass of that backward). ``acc_stats`` starts ``True``, so by default
    the backward of the loss itself is used (the empirical Fisher). KFAC-Pytorch's true-Fisher
    loop samples labels from the model instead::

        if opt.stats_due:
            opt.acc_stats = True
            loss_fn(out, sampled_labels).backward(retain_graph=True)
            opt.acc_stats = False
            opt.zero_grad()
        loss_fn(out, y).backward()
        opt.step()

    The hooks hold the optimizer weakly and go when it is garbage-collected, or at once with
    :meth:`remove_hooks`.
    """

    acc_stats: bool  # record statistics from the backward passes run while this is true

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """``KFAC(model, lr, momentum, ...)``: see the signature (the core's defaults)."""
        arguments = bind_arguments(_SIGNATURE, (self, *args), kwargs)
        model = arguments.pop("model")
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("KFAC: the model has no trainable parameters")
        layers, modules = _linear_layers(model, {id(p): name for name, p in named})
        opt = ao.kfac(**arguments, layers=layers)
        super().__init__([p for _, p in named], {k: arguments[k] for k in _NUMERIC})
        self._names = [name for name, _ in named]
        self._opt = opt
        self._cov_update_frequency = arguments["cov_update_frequency"]
        self._group = data_parallel_group(model)  # (statistics are gathered over it)
        self._kfac_state = opt.init(self._params())
        self._steps = 0
        self._captured: dict[LayerKey, tuple[torch.Tensor, torch.Tensor]] = {}
        self.acc_stats = True
        ref = weakref.ref(self)
        handles = [module.register_forward_hook(_capture_hook(ref, key)) for key, module in modules.items()]
        self._hooks = weakref.finalize(self, _remove_handles, handles)

    __init__.__signature__ = _SIGNATURE

    @property
    def stats_due(self) -> bool:
        """Whether the next ``step`` updates the statistics (KFAC-Pytorch's ``steps % TCov == 0``)."""
        return self._steps % self._cov_update_frequency == 0

    def remove_hooks(self) -> None:
        """Remove the hooks from the model and drop what they recorded. Later steps get no new
        statistics: the layers keep their factors. Done by itself when the optimizer is collected."""
        self._hooks()
        self._captured.clear()

    # ------------------------------------------------------------------ step

    def _params(self) -> dict[str, torch.Tensor]:
        """The params by name, whole (an FSDP2 shard's whole tensor: K-FAC's factors need it)."""
        return {name: whole(p.detach()) for name, p in zip(self._names, self.param_groups[0]["params"])}

    def _statistics(self) -> dict[LayerKey, tuple[torch.Tensor, torch.Tensor]] | None:
        """This step's layer statistics; under data parallelism every rank's samples, with the
        output gradients of the loss the ranks' averaged gradients are of (each rank's mean
        loss over the number of ranks): the single-process full-batch statistics."""
        if not self.stats_due or not self._captured:
            return None
        if self._group is None:
            return dict(self._captured)
        world = torch.distributed.get_world_size(self._group)
        return {
            key: (gather_batches(a, self._group), gather_batches(g, self._group) / world)
            for key, (a, g) in self._captured.items()
        }

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = self._params()
        missing = [name for name, p in zip(self._names, self.param_groups[0]["params"]) if p.grad is None]
        if missing:
            raise RuntimeError(f"KFAC steps every parameter of the model; no gradient for {missing}")
        grads = {name: whole(p.grad) for name, p in zip(self._names, self.param_groups[0]["params"])}
        group = self.param_groups[0]
        state = ao.set_hparams(
            self._kfac_state, **{k: group[k] for k in ao.get_hparams(self._kfac_state) if k in _NUMERIC}
        )
        self._kfac_state, new_params = self._opt.step(state, grads, params, layer_stats=self._statistics())
        for name, p in zip(self._names, group["params"]):
            write_back(p, new_params[name])
        self._captured.clear()
        self._steps += 1
        return loss

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """``param_groups`` as torch.optim packs them, and ``state``: the core state by name
        (``count``, ``layers.fc1.weight.m_aa``, ``momentum_buffer.fc1.weight``...)."""
        packed = super().state_dict()
        packed["state"] = checkpoint.state_to_dict(self._kfac_state)
        return packed

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict``; both parts are checked first, a failing load changes nothing."""
        kfac_state = checkpoint.state_from_dict(self._kfac_state, state_dict["state"])
        super().load_state_dict({**state_dict, "state": {}})
        self._kfac_state = kfac_state
        self._steps = int(kfac_state.count)
        self._captured.clear()


def _linear_layers(
    model: torch.nn.Module, names: dict[int, str]
) -> tuple[dict[LayerKey, LayerKey | None], dict[LayerKey, torch.nn.Linear]]:
    """The core's ``layers`` and each layer's module, named by the canonical names ``names``
    (``id(param) -> name`` of the trainable params); warns about params several modules share."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    uses = Counter(id(p) for m in linears for p in (m.weight, m.bias) if p is not None)
    shared = sorted(names[i] for i, n in uses.items() if n > 1 and i in names)
    if shared:
        warnings.warn(
            f"KFAC: {shared} belong to several nn.Linear modules, whose K-FAC factors are "
            "ill-defined; they get the SGD part only",
            UserWarning,
            stacklevel=3,
        )
    layers: dict[LayerKey, LayerKey | None] = {}
    modules: dict[LayerKey, torch.nn.Linear] = {}
    for module in linears:
        weight = names.get(id(module.weight))
        if weight is None or weight in shared:
            continue
        bias = names.get(id(module.bias)) if module.bias is not None else None
        layers[(weight,)] = (bias,) if bias is not None and bias not in shared else None
        modules[(weight,)] = module
    return layers, modules


def _capture_hook(ref: weakref.ReferenceType[KFAC], key: LayerKey) -> Callable[..., None]:
    """A forward hook that, on steps where statistics are due, hooks the layer's output to record
    ``(input, output gradient)`` from backward passes run while ``acc_stats`` is true. It holds
    the optimizer weakly, so a model never keeps its optimizer alive."""

    def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        opt = ref()
        if opt is None or not (torch.is_grad_enabled() and output.requires_grad and opt.stats_due):
            return
        activations = inputs[0].detach()

        def save(grad: torch.Tensor) -> None:
            owner = ref()
            if owner is not None and owner.acc_stats:
                owner._captured[key] = (activations, grad.detach())

        output.register_hook(save)

    return hook


def _remove_handles(handles: list[torch.utils.hooks.RemovableHandle]) -> None:
    for handle in handles:
        handle.remove()
