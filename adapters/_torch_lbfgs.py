"""``LBFGS``: a drop-in for ``torch.optim.LBFGS`` running the core's :func:`agnostic_optim.lbfgs`.

The class only translates: each ``step(closure)`` hands the core a ``value_and_grad_fn`` that
writes the candidate params into the model's parameters, calls the closure with grad enabled and
reads back the loss and ``.grad`` (zeros for a parameter without one, as torch does). The core's
state lives, as torch's does, on the first parameter (``self.state[params[0]]``), one entry per
field of :class:`agnostic_optim.LBFGSState` with per-parameter values as lists of tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import array_api_compat.torch
import torch

import agnostic_optim as ao
from agnostic_optim import engine
from agnostic_optim.adapters._torch_distributed import is_sharded, whole, write_back
from agnostic_optim.adapters._torch_optimizer import bind_arguments, class_signature
from agnostic_optim.adapters._torch_plan import real_view
from agnostic_optim.quasi_newton import default_max_eval

XP = array_api_compat.torch
_HPARAMS = ("lr", "tolerance_grad", "tolerance_change")
_OPTIONS = ("max_iter", "max_eval", "history_size", "line_search_fn")
_COUNTERS = ("n_iter", "func_evals")  # Python ints in the torch state, as torch.optim keeps them
_SIGNATURE = class_signature(ao.lbfgs, torch.optim.LBFGS)  # torch's order, the core's defaults


class LBFGS(torch.optim.Optimizer):
    """``torch.optim.LBFGS`` (same arguments, one param group, ``step(closure)``) running
    :func:`agnostic_optim.lbfgs`, which reproduces torch's iterates and closure calls.

    ``lr``, ``tolerance_grad`` and ``tolerance_change`` are read from the param group at every
    step (so ``torch.optim.lr_scheduler`` works); ``state_dict``/``load_state_dict`` round-trip the
    whole state, keeping its dtypes.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        arguments = bind_arguments(_SIGNATURE, (self, *args), kwargs)
        params, lr = arguments.pop("params"), arguments["lr"]
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if arguments["max_eval"] is None:  # (torch.optim.LBFGS keeps the number in its group)
            arguments["max_eval"] = default_max_eval(arguments["max_iter"])
        super().__init__(params, arguments)
        if len(self.param_groups) != 1:
            raise ValueError("LBFGS doesn't support per-parameter options (parameter groups)")
        self._params: list[torch.Tensor] = self.param_groups[0]["params"]
        self._optimizer()  # validates the options now

    __init__.__signature__ = _SIGNATURE  # (help(), IDEs and inspect see the real arguments)

    def _optimizer(self) -> ao.Optimizer:
        group = self.param_groups[0]
        return ao.lbfgs(
            **{k: float(group[k]) for k in _HPARAMS},
            **{k: group[k] for k in _OPTIONS},
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], Any]) -> Any:  # type: ignore[override]
        """Run up to ``max_iter`` L-BFGS iterations; returns the closure's first loss."""
        group = self.param_groups[0]
        opt = self._optimizer()
        # (complex params as their real views, as torch.optim.LBFGS flattens them; an FSDP2
        # shard's whole tensor: the directions are dot products over every element)
        start = [real_view(whole(p.detach())).clone() for p in self._params]
        saved = self.state[self._params[0]]
        state = self._core_state(saved) if saved else opt.init(start)
        state = ao.set_hparams(state, **{k: float(group[k]) for k in _HPARAMS})
        losses: list[Any] = []

        def value_and_grad_fn(candidate: list[torch.Tensor]) -> tuple[Any, list[torch.Tensor]]:
            for p, value in zip(self._params, candidate):
                _put(p, value)
            with torch.enable_grad():
                loss = closure()
            losses.append(loss)
            grads = [
                real_view(whole(torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()))
                for p in self._params
            ]
            return (loss.detach() if isinstance(loss, torch.Tensor) else loss), grads

        state, new_params = opt.step(state, None, start, value_and_grad_fn=value_and_grad_fn)
        for p, value in zip(self._params, new_params):
            _put(p, value)
        self.state[self._params[0]] = self._torch_state(state)
        return losses[0]

    @staticmethod
    def _torch_state(state: ao.LBFGSState) -> dict[str, Any]:
        entries = {
            name: getattr(state, name) for name in state._fields if name not in ("hparams", "scheduled")
        }
        return {name: int(value) if name in _COUNTERS else value for name, value in entries.items()}

    def _core_state(self, saved: dict[str, Any]) -> ao.LBFGSState:
        """The core state from the entries kept in ``self.state`` (hyperparameters are set from
        the group by the caller)."""
        first = self._params[0]
        dtype = engine.scalar_dtype(XP, first)
        entries = {
            name: torch.tensor(value, dtype=torch.int32, device=first.device) if name in _COUNTERS else value
            for name, value in saved.items()
        }
        hparams = {k: torch.zeros((), dtype=dtype, device=first.device) for k in _HPARAMS}
        return ao.LBFGSState(hparams=hparams, scheduled={}, **entries)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch.optim's ``load_state_dict``, keeping each saved tensor's dtype (torch would cast
        the float64 scalars to the params' dtype). A state saved by ``torch.optim.LBFGS`` (flat
        vectors, list histories) is refused: its layout is not this one."""
        saved = next(iter(state_dict["state"].values()), None)
        expected = set(ao.LBFGSState._fields) - {"hparams", "scheduled"}
        if saved and set(saved) != expected:
            raise ValueError(
                f"not a state of agnostic_optim's LBFGS (entries {sorted(saved)}, expected "
                f"{sorted(expected)}); a torch.optim.LBFGS state does not load here"
            )
        super().load_state_dict(state_dict)
        first = self._params[0]

        def moved(value: Any) -> Any:
            if isinstance(value, list):
                return [moved(v) for v in value]
            return value.to(first.device, copy=True) if isinstance(value, torch.Tensor) else value

        if saved:
            self.state[first] = {name: moved(value) for name, value in saved.items()}


def _put(param: torch.Tensor, value: torch.Tensor) -> None:
    """A whole new value into ``param`` (a complex param through its real view; a DTensor
    keeps its shard)."""
    if is_sharded(param):
        write_back(param, value)
    else:
        real_view(param).copy_(value)
