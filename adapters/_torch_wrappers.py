"""``torch.optim`` drop-ins for the generalization wrappers: ``SAM`` and ``Lookahead``.

They follow the torch versions people use (davda54/sam's ``SAM``; timm's / the official
``Lookahead`` wrapping an optimizer instance) and share the base optimizer's ``param_groups``, so
``torch.optim.lr_scheduler`` and manual edits reach the base. The maths is the core's
(:mod:`agnostic_optim.wrappers`), applied to the lists of tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import array_api_compat.torch
import torch

from agnostic_optim import hparams as hp
from agnostic_optim.adapters._torch_optimizer import TorchOptimizer
from agnostic_optim.wrappers import lookahead_sync, sam_grad_norm, sam_perturbation

XP = array_api_compat.torch
_SLOW = "lookahead_slow_buff"  # timm's key for the slow weights in a param's state


def _base_for(base_optimizer: Any, param_groups: list[dict[str, Any]], kwargs: dict[str, Any]):
    """A torch optimizer class is built on the groups; anything else is an agnostic_optim factory
    (or its registry name) run by ``TorchOptimizer``."""
    if isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer):
        return base_optimizer(param_groups, **kwargs)
    return TorchOptimizer(param_groups, base_optimizer, **kwargs)


class SAM(torch.optim.Optimizer):
    """Sharpness-Aware Minimization (ASAM with ``adaptive=True``), as davda54/sam's ``SAM``.

    Args:
      params: tensors or param-group dicts.
      base_optimizer: a ``torch.optim.Optimizer`` class (``torch.optim.SGD``, or one of ours) or an
        ``agnostic_optim`` factory / its registry name (run by ``TorchOptimizer``).
      rho, adaptive: the perturbation radius and ASAM's scaling (per param group).
      **kwargs: the base optimizer's hyperparameters.

    ``first_step`` climbs to ``θ + e`` with the gradients in ``.grad``::

        e = (θ² if adaptive else 1) ⊙ g · rho / (‖ stack ‖(|θ| if adaptive else 1) ⊙ g‖ ‖ + 1e-12)

    (the norm is global over every group), ``second_step`` returns to ``θ`` and runs the base
    step with the gradients computed at ``θ + e``. ``step(closure)`` does both around a call of
    ``closure`` (a full forward and backward pass), after the caller's first backward pass.
    ``state_dict`` is the base optimizer's (the groups hold ``rho`` and ``adaptive`` too).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        base_optimizer: Any,
        rho: float = 0.05,
        adaptive: bool = False,
        **kwargs: Any,
    ):
        hp.check_range("rho", rho)
        super().__init__(params, dict(rho=rho, adaptive=adaptive, **kwargs))
        self.base_optimizer = _base_for(base_optimizer, self.param_groups, kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "base_optimizer": self.base_optimizer}

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move every param with a gradient to ``θ + e`` (keeping ``θ`` to return to)."""
        groups = [(g, [p for p in g["params"] if p.grad is not None]) for g in self.param_groups]
        params = [p for _, members in groups for p in members]
        if any("old_p" in self.state[p] for g in self.param_groups for p in g["params"]):
            raise RuntimeError(
                "SAM.first_step() called twice: call second_step() first (or restore(), to drop the "
                "perturbation without a step)"
            )
        if params:
            flags = [bool(g["adaptive"]) for g, members in groups for _ in members]
            norm = sam_grad_norm(XP, [p.grad for p in params], params, flags)
            for group, members in groups:
                grads = [p.grad for p in members]
                perturbation = sam_perturbation(XP, grads, members, group["rho"], group["adaptive"], norm)
                for p, e in zip(members, perturbation):
                    self.state[p]["old_p"] = p.detach().clone()
                    p.add_(e)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Return to ``θ`` and take the base optimizer's step with the current gradients."""
        self.restore()
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """``first_step(zero_grad=True)``, ``closure()``, ``second_step()``; returns the closure's
        loss (at the perturbed params)."""
        if closure is None:
            raise ValueError(
                "SAM.step needs a closure that does a full forward and backward pass "
                "(or call first_step() and second_step() around your own second pass)"
            )
        self.first_step(zero_grad=True)
        try:
            with torch.enable_grad():
                loss = closure()
        except BaseException:
            self.restore()  # an error in the closure leaves the params at θ, not θ + e
            raise
        self.second_step()
        return loss

    @torch.no_grad()
    def restore(self) -> None:
        """Move perturbed params back to the ``θ`` that ``first_step`` kept, without a step (e.g.
        after an error in your own second pass, between ``first_step`` and ``second_step``)."""
        for group in self.param_groups:
            for p in group["params"]:
                old = self.state[p].pop("old_p", None)
                if old is not None:
                    p.copy_(old)

    def state_dict(self) -> dict[str, Any]:
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups


class Lookahead(torch.optim.Optimizer):
    """Lookahead (Zhang et al. 2019) around an optimizer instance, as timm's ``Lookahead`` with
    the official code's slow weights (michaelrzhang/lookahead: cached at construction).

    Args:
      base_optimizer: a ``torch.optim.Optimizer`` (torch's or ours) over the params.
      k: base steps between synchronisations; alpha: the slow step size.

    After every k-th base step (counted per group in ``group["lookahead_step"]``)::

        φ = φ + α (θ − φ)
        θ = φ

    ``param_groups`` are the base's, with ``lookahead_k``/``lookahead_alpha``/``lookahead_step``
    added; ``state_dict`` is the base's with each param's slow weights under
    ``"lookahead_slow_buff"``. Add param groups to the base before wrapping it.
    """

    def __init__(self, base_optimizer: torch.optim.Optimizer, k: int = 5, alpha: float = 0.5):
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError(f"Lookahead wraps a torch.optim.Optimizer instance, got {base_optimizer!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"Invalid k: {k!r} (must be an integer >= 1)")
        hp.check_range("alpha", alpha, 0.0, 1.0)
        defaults = {"lookahead_k": k, "lookahead_alpha": alpha, "lookahead_step": 0}
        self.base_optimizer = base_optimizer
        super().__init__(base_optimizer.param_groups, defaults)
        self.param_groups = base_optimizer.param_groups
        self.defaults = {**base_optimizer.defaults, **defaults}
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p][_SLOW] = p.detach().clone()

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "base_optimizer": self.base_optimizer}

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """The base optimizer's step, then the sync of the groups whose k-th step this was."""
        loss = self.base_optimizer.step() if closure is None else self.base_optimizer.step(closure)
        with torch.no_grad():
            for group in self.param_groups:
                group["lookahead_step"] += 1
                if group["lookahead_step"] % group["lookahead_k"] == 0:
                    params = group["params"]
                    slow = [self.state[p][_SLOW] for p in params]
                    for p, s, new in zip(
                        params, slow, lookahead_sync(XP, slow, params, group["lookahead_alpha"])
                    ):
                        s.copy_(new)
                        p.copy_(new)
        return loss

    def state_dict(self) -> dict[str, Any]:
        packed = self.base_optimizer.state_dict()
        state = dict(packed["state"])
        for group, saved in zip(self.param_groups, packed["param_groups"]):
            for p, index in zip(group["params"], saved["params"]):
                state[index] = {**state.get(index, {}), _SLOW: self.state[p][_SLOW]}
        return {**packed, "state": state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_state = state_dict["state"]
        base_state = {i: {k: v for k, v in s.items() if k != _SLOW} for i, s in saved_state.items()}
        self.base_optimizer.load_state_dict(
            {**state_dict, "state": {i: s for i, s in base_state.items() if s}}
        )
        self.param_groups = self.base_optimizer.param_groups
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            for key in ("lookahead_k", "lookahead_alpha", "lookahead_step"):  # (a base-only dict)
                group.setdefault(key, self.defaults[key])
            for p, index in zip(group["params"], saved["params"]):
                if _SLOW in saved_state.get(index, {}):
                    self.state[p][_SLOW] = saved_state[index][_SLOW].to(
                        device=p.device, dtype=p.dtype, copy=True
                    )
                else:  # the slow weights start from the loaded params, as at construction
                    self.state[p][_SLOW] = p.detach().clone()
