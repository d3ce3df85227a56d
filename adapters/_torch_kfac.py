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
(``step % cov_update_frequency == 0``, as KFAC-Pytorch's ``steps % TCov``), from the latest
forward and backward pass before ``step()``. ``step`` hands them to the core as
``layer_stats`` with the gradients; the core computes, this class only translates. Other
parameters (norm layers, embeddings...) get the core's SGD part.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import agnostic_optim as ao
from agnostic_optim import checkpoint

_NUMERIC = ("lr", "momentum", "stat_decay", "damping", "kl_clip", "weight_decay")


class KFAC(torch.optim.Optimizer):
    """K-FAC for the ``nn.Linear`` layers of ``model`` (see :func:`agnostic_optim.kfac`).

    One param group holds every trainable parameter of ``model``; its numeric hyperparameters
    (``lr``, ``momentum``, ``stat_decay``, ``damping``, ``kl_clip``, ``weight_decay``) are read
    every step, so ``torch.optim.lr_scheduler`` works. ``cov_update_frequency`` and
    ``inverse_update_frequency`` are KFAC-Pytorch's ``TCov`` and ``TInv``. Every parameter must
    have a gradient when ``step`` runs.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        lr: float = 0.001,
        momentum: float = 0.9,
        stat_decay: float = 0.95,
        damping: float = 0.001,
        kl_clip: float = 0.001,
        weight_decay: float = 0.0,
        cov_update_frequency: int = 10,
        inverse_update_frequency: int = 100,
        batch_averaged: bool = True,
    ) -> None:
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("KFAC: the model has no trainable parameters")
        defaults = dict(
            lr=lr, momentum=momentum, stat_decay=stat_decay, damping=damping, kl_clip=kl_clip,
            weight_decay=weight_decay,
        )  # fmt: skip
        super().__init__([p for _, p in named], defaults)
        self._names = [name for name, _ in named]
        trainable = dict(named)
        layers: dict[tuple[str], tuple[str] | None] = {}
        self._linear_modules: dict[tuple[str], torch.nn.Linear] = {}
        for prefix, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and module.weight.requires_grad:
                key = (f"{prefix}.weight" if prefix else "weight",)
                bias = key[0][: -len("weight")] + "bias"
                layers[key] = (bias,) if module.bias is not None and bias in trainable else None
                self._linear_modules[key] = module
        self._opt = ao.kfac(
            **defaults,
            cov_update_frequency=cov_update_frequency,
            inverse_update_frequency=inverse_update_frequency,
            batch_averaged=batch_averaged,
            layers=layers,
        )
        self._cov_update_frequency = cov_update_frequency
        self._kfac_state = self._opt.init(self._params())
        self._steps = 0
        self._captured: dict[tuple[str], dict[str, torch.Tensor]] = {}
        self._stat_hooks = [
            module.register_forward_hook(self._capture_hook(key))
            for key, module in self._linear_modules.items()
        ]

    # ------------------------------------------------------------------ hooks

    def _stats_due(self) -> bool:
        return self._steps % self._cov_update_frequency == 0

    def _capture_hook(self, key: tuple[str]) -> Callable[..., None]:
        """A forward hook recording the layer's input and, through a hook on its output, the
        gradient with respect to that output, on steps where statistics are due."""

        def save_output_grad(grad: torch.Tensor) -> None:
            self._captured.setdefault(key, {})["output_grads"] = grad.detach()

        def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if torch.is_grad_enabled() and output.requires_grad and self._stats_due():
                self._captured.setdefault(key, {})["activations"] = inputs[0].detach()
                output.register_hook(save_output_grad)

        return hook

    # ------------------------------------------------------------------ step

    def _params(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in zip(self._names, self.param_groups[0]["params"])}

    def _layer_stats(self) -> dict[tuple[str], tuple[torch.Tensor, torch.Tensor]] | None:
        if not self._stats_due():
            return None
        complete = {k: v for k, v in self._captured.items() if len(v) == 2}
        return {k: (v["activations"], v["output_grads"]) for k, v in complete.items()} or None

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
        grads = {name: p.grad for name, p in zip(self._names, self.param_groups[0]["params"])}
        group = self.param_groups[0]
        state = ao.set_hparams(
            self._kfac_state, **{k: group[k] for k in ao.get_hparams(self._kfac_state) if k in _NUMERIC}
        )
        self._kfac_state, new_params = self._opt.step(state, grads, params, layer_stats=self._layer_stats())
        for name, p in zip(self._names, group["params"]):
            p.copy_(new_params[name])
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
        saved = state_dict["state"]
        self._kfac_state = checkpoint.state_from_dict(self._kfac_state, saved)
        super().load_state_dict({**state_dict, "state": {}})
        self._steps = int(self._kfac_state.count)
        self._captured.clear()
