"""The array backends the project runs on, loaded lazily, each with a reason when missing.

Used by the test suite's ``xp`` fixture and by the conformance runner, so both see the same
backends and the same skip reasons. Data always starts on the host as NumPy float64 and is
handed to every backend identically with :meth:`Backend.asarray`.

Each framework has a CPU backend and a GPU one: ``torch`` (CPU) and ``torch-cuda`` (available iff
``torch.cuda.is_available()``), ``jax`` (pinned to ``jax.devices("cpu")[0]``, so the ``jax`` cell
is always the CPU one even where JAX defaults to a GPU) and ``jax-gpu`` (``jax.devices("gpu")[0]``),
plus ``cupy`` (GPU only). Code that depends on the library rather than the device switches on
:attr:`Backend.framework`, never on the name.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

BACKEND_NAMES = ("numpy", "array_api_strict", "torch", "torch-cuda", "jax", "jax-gpu", "cupy")
_FRAMEWORK = {"torch-cuda": "torch", "jax-gpu": "jax"}


@dataclass
class Backend:
    """One array namespace as the tests and the conformance suite use it.

    Attributes:
      name: one of ``BACKEND_NAMES`` (``torch-cuda`` and ``jax-gpu`` are the GPU cells).
      xp: the array-API namespace (``array_api_compat``'s wrapper where the library needs one).
      module: the library itself (``torch``, ``jax.numpy``...), or None when missing.
      reason: why the backend is unavailable ('' when it is available).
      device: the device arrays are created on (None: the library's default).
      framework: the library, whatever the device: ``numpy``, ``array_api_strict``, ``torch``,
        ``jax`` or ``cupy`` (``torch-cuda`` -> ``torch``, ``jax-gpu`` -> ``jax``).
    """

    name: str
    xp: Any = None
    module: Any = None
    reason: str = ""
    device: Any = None
    dtypes: dict[str, Any] = field(default_factory=dict)
    framework: str = ""

    def __post_init__(self) -> None:
        if not self.framework:
            self.framework = _FRAMEWORK.get(self.name, self.name)

    @property
    def available(self) -> bool:
        return not self.reason

    def dtype(self, name: str) -> Any:
        """The backend's dtype called ``name`` (``float32``, ``float64``, ``bfloat16``...)."""
        if name not in self.dtypes:
            raise LookupError(f"{self.name} has no dtype {name}")
        return self.dtypes[name]

    def asarray(self, value: Any, dtype: str = "float64") -> Any:
        """A backend array holding the host value ``value`` (NumPy or Python), in ``dtype``."""
        host = np.array(value, dtype=np.float64, copy=True)  # never share memory with the caller
        if self.framework == "torch":
            return self.module.asarray(host, device=self.device).to(self.dtype(dtype))
        if self.framework == "jax":
            import jax

            # Straight from the host onto the backend's device (committed there), then cast.
            return jax.device_put(host, self.device).astype(self.dtype(dtype))
        if self.framework == "cupy":
            return self.module.asarray(host).astype(self.dtype(dtype))
        if self.framework == "array_api_strict":
            return self.module.asarray(host.tolist() if host.ndim == 0 else host, dtype=self.dtype(dtype))
        return host.astype(self.dtype(dtype))

    def to_numpy(self, x: Any) -> np.ndarray:
        """A float64 NumPy copy of a backend array (any dtype, any device)."""
        if self.framework == "torch":
            return x.detach().to("cpu", self.module.float64).numpy().copy()
        if self.framework == "cupy":
            return self.module.asnumpy(x).astype(np.float64)
        if self.framework == "array_api_strict":
            return np.from_dlpack(self.xp.astype(x, self.xp.float64)).copy()
        return np.array(x, dtype=np.float64, copy=True)


def _load(name: str) -> Backend:
    try:
        if name == "numpy":
            import array_api_compat.numpy as xp

            return Backend(
                name, xp, np, dtypes={"float32": np.float32, "float64": np.float64, "float16": np.float16}
            )
        if name == "array_api_strict":
            strict = importlib.import_module("array_api_strict")
            return Backend(
                name, strict, strict, dtypes={"float32": strict.float32, "float64": strict.float64}
            )
        if name in ("torch", "torch-cuda"):
            torch = importlib.import_module("torch")
            if name == "torch-cuda" and not torch.cuda.is_available():
                return Backend(name, reason="no CUDA GPU (torch.cuda.is_available() is False)")
            import array_api_compat.torch as xp

            dtypes = {n: getattr(torch, n) for n in ("float16", "bfloat16", "float32", "float64")}
            device = "cuda" if name == "torch-cuda" else "cpu"
            return Backend(name, xp, torch, device=device, dtypes=dtypes)
        if name in ("jax", "jax-gpu"):
            jax = importlib.import_module("jax")
            jax.config.update("jax_enable_x64", True)
            jnp = importlib.import_module("jax.numpy")
            if name == "jax-gpu":
                try:
                    devices = jax.devices("gpu")
                except RuntimeError:  # no GPU platform (CPU-only jaxlib, or no driver)
                    devices = []
                if not devices:
                    return Backend(name, reason="no GPU device for JAX")
                device = devices[0]
            else:
                device = jax.devices("cpu")[0]
            dtypes = {n: getattr(jnp, n) for n in ("float16", "bfloat16", "float32", "float64")}
            return Backend(name, jnp, jnp, device=device, dtypes=dtypes)
        if name == "cupy":
            cupy = importlib.import_module("cupy")
            try:
                count = cupy.cuda.runtime.getDeviceCount()
            except Exception as err:  # CUDA driver missing or broken
                return Backend(name, reason=f"cupy is installed but no CUDA device is usable ({err})")
            if count == 0:
                return Backend(name, reason="cupy is installed but no GPU is present")
            import array_api_compat.cupy as xp

            dtypes = {n: getattr(cupy, n) for n in ("float16", "float32", "float64")}
            return Backend(name, xp, cupy, dtypes=dtypes)
    except ImportError as err:
        return Backend(name, reason=f"{name} is not installed ({err.msg})")
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKEND_NAMES}")


_CACHE: dict[str, Backend] = {}


def get_backend(name: str) -> Backend:
    """The backend called ``name`` (loaded once); check ``.available``/``.reason`` before use."""
    if name not in _CACHE:
        _CACHE[name] = _load(name)
    return _CACHE[name]


def all_backends() -> list[Backend]:
    return [get_backend(name) for name in BACKEND_NAMES]
