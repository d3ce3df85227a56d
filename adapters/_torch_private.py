"""Every private torch API the torch adapter uses, found (or found missing) once, at import.

Nothing else in the adapter reaches into torch's internals; it takes them from here. Three kinds:

* **Required by every step**: the ``torch._foreach_*`` kernels, torch.optim's own foreach
  building blocks (``_tensor_list`` runs the eager executor on them). Without them the adapter
  does not import, and says so. (The step plan also reads two tensor attributes that
  torch.optim's own tests and Dynamo read: ``Tensor._version``, to see that only the optimizer
  wrote a counter, and ``Tensor._base``, to find the shared step-counter tensor.)
* **Required by the compiled executor** (``compile=True``): Inductor's ``compile_fx`` (our
  ``torch.compile`` backend), Dynamo's graph-break counters, ``BackendCompilerFailed`` and
  ``disable``, ``torch._C._increment_version`` and the profiler's on/off flag (the direct graph
  calls of ``_torch_compiled``). If one is missing, :data:`COMPILED_UNAVAILABLE` says which,
  and ``compile=True`` runs the eager executor (same numbers) after one warning.
* **Speed-ups with a public fallback**: CPython's dict version tags (``dict_version``: the step
  plan compares values instead), Dynamo's C++ guards (``TensorGuards``, ``GlobalStateGuard``:
  Python comparisons), Inductor's heuristics hook (``InductorChoices``, ``V``: Inductor's own
  heuristics), ``reset_code`` (compiled graphs then live as long as the process),
  ``torch._C._set_grad_enabled`` (``torch.set_grad_enabled``). Inductor's
  ``CompiledFxGraph.current_callable``/``mutated_input_idxs`` are probed on each first call of a
  compiled graph (``_torch_compiled._observed_call``), which goes through AOT autograd's
  wrappers where they are missing.

Tested with torch 2.13 (the pinned version; ``pyproject.toml`` claims only it).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch

_compiled_missing: list[str] = []


def _find(path: str, missing: list[str] | None = None) -> Any:
    """The object at dotted ``path`` (module, then attributes), or None (noted in ``missing``)."""
    module_path, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_path), name)
    except (ImportError, AttributeError):
        if missing is not None:
            missing.append(path)
        return None


# ------------------------------------------------------------------ required by every step
FOREACH_KERNELS = (
    "add", "sub", "mul", "div", "pow", "sqrt", "abs", "sign", "exp", "neg", "reciprocal",
    "maximum", "minimum", "addcmul", "addcdiv", "copy_",
)  # fmt: skip
_missing_foreach = [k for k in FOREACH_KERNELS if not hasattr(torch, f"_foreach_{k}")]
if _missing_foreach:  # pragma: no cover - depends on the torch build
    raise ImportError(
        f"agnostic_optim.adapters.torch needs torch's _foreach_ kernels (torch.optim's foreach "
        f"implementation); this torch {torch.__version__} lacks {_missing_foreach}"
    )

# ------------------------------------------------------------------ the compiled executor
compile_fx: Callable[..., Any] | None = _find("torch._inductor.compile_fx.compile_fx", _compiled_missing)
dynamo_counters: Any = _find("torch._dynamo.utils.counters", _compiled_missing)
BackendCompilerFailed: type[Exception] = (
    _find("torch._dynamo.exc.BackendCompilerFailed", _compiled_missing) or RuntimeError
)
dynamo_disable: Callable[..., Any] | None = _find("torch._dynamo.disable", _compiled_missing)
increment_version: Callable[..., Any] | None = _find("torch._C._increment_version", _compiled_missing)
_profiler = _find("torch.autograd.profiler", _compiled_missing)
if _profiler is not None and not hasattr(_profiler, "_is_profiler_enabled"):  # pragma: no cover
    _compiled_missing.append("torch.autograd.profiler._is_profiler_enabled")


def profiler_enabled() -> bool:
    """Whether torch's profiler is recording (it labels graph calls through AOT's wrappers)."""
    return bool(_profiler._is_profiler_enabled)


COMPILED_UNAVAILABLE: str | None = (
    f"this torch ({torch.__version__}) lacks {', '.join(_compiled_missing)}" if _compiled_missing else None
)

# ------------------------------------------------------------------ speed-ups with fallbacks
TensorGuards: Any = _find("torch._C._dynamo.guards.TensorGuards")
GlobalStateGuard: Any = _find("torch._C._dynamo.guards.GlobalStateGuard")
InductorChoices: Any = _find("torch._inductor.choices.InductorChoices")
V: Any = _find("torch._inductor.virtualized.V")
if V is not None and not hasattr(V, "set_choices_handler"):  # pragma: no cover - torch build
    InductorChoices = V = None
reset_code: Callable[[Any], None] | None = _find("torch._dynamo.eval_frame.reset_code")
set_grad_enabled: Callable[[bool], Any] = _find("torch._C._set_grad_enabled") or torch.set_grad_enabled


def _probe_dict_version() -> Callable[[dict], int] | None:
    """CPython's per-dict version tag (moved by every insertion, deletion or replacement of a
    value), as Dynamo reads it for its guards; None where it is missing or does not move."""
    version = _find("torch._C._dynamo.guards.dict_version")
    if version is None:  # pragma: no cover - depends on the torch build
        return None
    probe: dict[str, object] = {}
    tags = [version(probe)]
    for change in (lambda: probe.setdefault("a", 0), lambda: probe.update(a=1), lambda: probe.pop("a")):
        change()
        tags.append(version(probe))
    return version if len(set(tags)) == len(tags) else None


dict_version: Callable[[dict], int] | None = _probe_dict_version()
