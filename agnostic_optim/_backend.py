"""Backend facts the rules need, in one place: namespaces, devices, dtypes, scalar casts.

Everything framework-specific that the core cannot avoid knowing (which floating dtypes a
namespace offers, whether an array is being traced) is answered here through
``array_api_compat``, so the update rules never branch on a backend.
"""

from __future__ import annotations

import sys
from typing import Any

import array_api_compat

Array = Any
Namespace = Any


def namespace_of(*arrays: Array) -> Namespace:
    """The single array-API namespace of ``arrays``; a clear error for mixed or foreign inputs."""
    try:
        return array_api_compat.array_namespace(*arrays)
    except TypeError as err:
        kinds = sorted({type(a).__module__ + "." + type(a).__qualname__ for a in arrays})
        raise TypeError(
            "agnostic_optim needs every parameter, gradient and input of one step to come from "
            f"one array-API namespace; got arrays of types {kinds} ({err})"
        ) from None


def device_of(x: Array) -> Any:
    """Where new arrays made from ``x`` go: its device. A JAX array sharded over several
    devices gives its mesh, replicated: a scalar or a buffer of another shape (a step count,
    Shampoo's statistics) cannot take the param's own partitioning (``P(None, 'model')`` on a
    0-d count); param-shaped buffers keep the param's sharding through ``zeros_like``."""
    device = array_api_compat.device(x)
    if array_api_compat.is_jax_array(x) and len(getattr(device, "device_set", ())) > 1:
        return _replicated(device)
    return device


def placement_of(x: Array) -> Any:
    """Exactly where ``x`` lives (a JAX array's own sharding), for a converted copy of it."""
    return x.sharding if array_api_compat.is_jax_array(x) and not is_lazy(x) else device_of(x)


def _replicated(sharding: Any) -> Any:
    """The same devices (and mesh), every array whole on each."""
    jax = sys.modules["jax"]
    spec = jax.sharding.PartitionSpec()
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, spec)
    import numpy as np  # (host-side: the device list of a mesh)

    devices = np.array(sorted(sharding.device_set, key=lambda d: d.id))
    return jax.sharding.NamedSharding(jax.sharding.Mesh(devices, ("replicas",)), spec)


def is_lazy(x: Array) -> bool:
    """True when ``x`` has no concrete value yet (a JAX tracer under ``jit``/``vmap``)."""
    return array_api_compat.is_lazy_array(x)


def floating_dtypes(xp: Namespace, like: Array) -> dict[str, Any]:
    """Real floating dtypes ``xp`` offers on ``like``'s device (JAX without x64 has no float64)."""
    info = xp.__array_namespace_info__()
    try:
        return dict(info.dtypes(kind="real floating", device=device_of(like)))
    except Exception:  # tracers and some devices cannot be queried by device
        return dict(info.dtypes(kind="real floating"))


_SCALAR_DTYPES: dict[tuple[Any, Any], Any] = {}


def scalar_dtype(xp: Namespace, like: Array) -> Any:
    """The dtype hyperparameter arithmetic runs in: float64 where available, else float32.

    Known once per namespace and device (a step asks several times), except for JAX, whose
    float64 comes and goes with ``jax_enable_x64``."""
    if array_api_compat.is_jax_namespace(xp) or is_lazy(like):
        return floating_dtypes(xp, like).get("float64", xp.float32)
    key = (getattr(xp, "__name__", None) or id(xp), device_of(like))  # (a name: torch.compile traces this)
    try:
        return _SCALAR_DTYPES[key]
    except KeyError:
        dtype = _SCALAR_DTYPES[key] = floating_dtypes(xp, like).get("float64", xp.float32)
        return dtype
    except TypeError:  # an unhashable device
        return floating_dtypes(xp, like).get("float64", xp.float32)


def is_floating(xp: Namespace, x: Array) -> bool:
    try:
        return xp.isdtype(x.dtype, "real floating")
    except TypeError:  # a dtype the namespace does not know, e.g. ml_dtypes' bfloat16 in NumPy
        raise TypeError(
            f"{getattr(xp, '__name__', xp)} does not support {x.dtype} arrays (NumPy and array_api_strict "
            "have no bfloat16); keep the params in float32 there, or use torch or JAX for bfloat16"
        ) from None


def is_low_precision(xp: Namespace, dtype: Any) -> bool:
    """True for 16-bit floats (float16, bfloat16) -- dtypes the standard does not require."""
    return dtype not in (xp.float32, xp.float64)


def compute_dtype(xp: Namespace, dtype: Any) -> Any:
    """The dtype a rule computes in for a leaf stored in ``dtype``.

    float32/float64 leaves compute in their own dtype, as torch.optim does. 16-bit leaves compute
    in float32 so that hyperparameters such as b2 = 0.999 are never rounded (optax issue #1414).
    """
    return xp.float32 if is_low_precision(xp, dtype) else dtype


def astype(xp: Namespace, x: Array, dtype: Any) -> Array:
    """``xp.astype`` that never copies when the dtype already matches."""
    return x if x.dtype == dtype else xp.astype(x, dtype)


def scalar(xp: Namespace, value: Any, dtype: Any, device: Any) -> Array:
    """A 0-d array of ``value`` in ``dtype`` on ``device``."""
    return xp.asarray(value, dtype=dtype, device=device)


def to_device_of(xp: Namespace, x: Array, like: Array) -> Array:
    """``x`` moved to ``like``'s device when they differ (a no-op for traced JAX arrays)."""
    return x if is_lazy(like) else to_device(x, device_of(like))


def to_device(x: Array, device: Any) -> Array:
    """``x`` moved to ``device`` when it is elsewhere (a no-op for traced JAX arrays)."""
    if is_lazy(x):
        return x
    return x if device_of(x) == device else array_api_compat.to_device(x, device)


def to_host(x: Array) -> Any:
    """A NumPy copy of ``x`` from any namespace or device (16-bit floats become float32)."""
    import numpy as np

    if array_api_compat.is_torch_array(x):
        x = x.detach().cpu()
        if x.dtype.itemsize == 2 and x.is_floating_point():
            x = x.float()
        return x.numpy()
    if array_api_compat.is_cupy_array(x):
        return x.get()
    if array_api_compat.is_jax_array(x):
        host = np.asarray(x)
        return host.astype(np.float32) if host.dtype.kind == "V" or str(host.dtype) == "bfloat16" else host
    if array_api_compat.is_numpy_array(x):
        return np.asarray(x)
    return np.from_dlpack(x).copy()


def convert_like(value: Any, like: Array) -> Array:
    """``value`` (host array or any namespace) as an array of ``like``'s namespace, dtype, device."""
    xp = array_api_compat.array_namespace(like)
    host = value if not hasattr(value, "__dlpack__") or is_numpy_like(value) else to_host(value)
    if array_api_compat.is_array_api_strict_namespace(xp):
        converted = xp.asarray(host.tolist() if host.ndim == 0 else host)
    else:
        converted = xp.asarray(host)
    converted = xp.astype(converted, like.dtype)
    return array_api_compat.to_device(converted, placement_of(like))


def is_numpy_like(value: Any) -> bool:
    return array_api_compat.is_numpy_array(value)
