"""Checkpointing: one flat, framework-neutral layout for every optimizer state.

``state_to_dict`` names each array of a state by its key path (``buffers.exp_avg.layer1.weight``,
``hparams.betas.0``, ``count``), the same names on NumPy, torch, JAX or CuPy. ``save_state`` and
``load_state`` write and read them with safetensors (no pickle), so a state saved from a torch
run resumes a JAX run: loading takes a freshly initialised state as the template and converts
every array to the template's namespace, dtype and device.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from agnostic_optim import _backend, trees
from agnostic_optim import hparams as hp

PyTree = Any


def state_to_dict(state: PyTree) -> dict[str, Any]:
    """``{key path: array}`` for every array in ``state`` (no copies)."""
    pairs, _ = trees.flatten_with_paths(state)
    return {trees.paths_str(path): leaf for path, leaf in pairs}


def state_from_dict(like: PyTree, arrays: dict[str, Any]) -> PyTree:
    """A state shaped like ``like`` holding ``arrays`` (host or any namespace), converted to each
    template leaf's namespace, dtype and device. Raises ``KeyError``/``ValueError`` on missing,
    unexpected or misshaped entries before building anything."""
    pairs, treedef = trees.flatten_with_paths(like)
    names = [trees.paths_str(path) for path, _ in pairs]
    missing = sorted(set(names) - set(arrays))
    unexpected = sorted(set(arrays) - set(names))
    if missing or unexpected:
        raise KeyError(f"state mismatch: missing {missing}, unexpected {unexpected}")
    for name, (_, leaf) in zip(names, pairs):
        if tuple(np.shape(arrays[name])) != tuple(leaf.shape):
            raise ValueError(f"{name}: shape {tuple(np.shape(arrays[name]))} != {tuple(leaf.shape)}")
    leaves = [_backend.convert_like(arrays[name], leaf) for name, (_, leaf) in zip(names, pairs)]
    return trees.unflatten(treedef, leaves)


# safetensors metadata (strings): the layouts of the params' weights, and a checksum
LAYOUTS_KEY = "agnostic_optim.layouts"  # JSON {param path: layout}
RULES_KEY = "agnostic_optim.rules"  # JSON [the rule of each optimizer state inside, in order]
CHECKSUM_KEY = "agnostic_optim.sha256"  # of every tensor's name, dtype, shape and bytes, in name order
# What a weight's axes mean, where moving a state between frameworks depends on it: torch's
# nn.Linear weight is (out, in) and its convolutions' (out, in, *kernel); flax's Dense and Conv
# kernels are (in, out) and (*kernel, in, out); equinox follows torch.
LAYOUTS = {
    "out_in": "torch's (out, in) weight",
    "out_in_spatial": "torch's (out, in, *kernel) convolution weight",
    "in_out": "flax's (in, out) kernel",
}


def save_state(path: str | os.PathLike, state: PyTree, *, layouts: Mapping[str, str] | None = None) -> None:
    """Write ``state`` to a safetensors file (16-bit floats are stored losslessly as float32).

    ``layouts``: ``{param path: layout}`` (a key of :data:`LAYOUTS`) for weights whose axes
    another framework orders otherwise (``adapters.torch.param_layouts(model)``); ``load_state``
    refuses to put such a state on params laid out the other way. The file holds a SHA-256 of
    its tensors, checked at load, and is written atomically: to a temporary file in the same
    folder, flushed to disk, then renamed over ``path`` (a crash leaves the old file whole).
    """
    from safetensors.numpy import save

    host = {}
    for name, leaf in state_to_dict(state).items():
        array = _backend.to_host(leaf)
        host[name] = np.ascontiguousarray(array).reshape(np.shape(array))  # keeps 0-d arrays 0-d
    for name, layout in (layouts or {}).items():
        if layout not in LAYOUTS:
            raise ValueError(f"layout of {name!r}: {layout!r} is not one of {sorted(LAYOUTS)}")
    metadata = {
        CHECKSUM_KEY: _checksum(host),
        LAYOUTS_KEY: json.dumps(dict(layouts or {}), sort_keys=True),
        RULES_KEY: json.dumps(_rules(state)),
    }
    _write_atomically(os.fspath(path), save(host, metadata=metadata))


def load_state(
    path: str | os.PathLike,
    like: PyTree,
    *,
    rename: Mapping[str, str] | Callable[[str], str] | None = None,
    layouts: Mapping[str, str] | None = None,
) -> PyTree:
    """Read a state written by :func:`save_state` into the structure, namespace and dtypes of
    ``like`` (typically ``opt.init(params)`` on the new backend).

    Args:
      rename: the saved params' paths -> the target's (``{"0.weight": "params.Dense_0.kernel"}``),
        applied to the end of every key (``buffers.exp_avg.0.weight``); or a function of the
        whole key.
      layouts: the target params' layouts (:data:`LAYOUTS`); a path ending in ``kernel`` is taken
        as flax's ``in_out``. A weight saved in one layout and loaded on a param of another is an
        error, never a silent transpose (a square weight would load with its axes swapped).

    Raises ``ValueError`` for a file whose checksum does not match its tensors (a flipped bit, a
    truncated write) and for mismatched layouts, ``KeyError``/``ValueError`` for missing,
    unexpected or misshaped entries, before anything is built.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load

    with open(os.fspath(path), "rb") as file:
        raw = file.read()
    try:
        arrays = load(raw)
        metadata = _metadata(raw)
    except (SafetensorError, ValueError, json.JSONDecodeError) as error:
        raise ValueError(f"{os.fspath(path)}: not a readable safetensors file ({error})") from None
    # (a file with no metadata at all is an older save_state's; any other must hold its checksum)
    if metadata and (
        set(metadata) != {CHECKSUM_KEY, LAYOUTS_KEY, RULES_KEY} or metadata[CHECKSUM_KEY] != _checksum(arrays)
    ):
        raise ValueError(f"{os.fspath(path)}: its tensors do not match the checksum it was saved with")
    saved_rules, rules = json.loads(metadata.get(RULES_KEY, "[]")), _rules(like)
    if any(a and b and a != b for a, b in zip(saved_rules, rules)):
        raise ValueError(f"{os.fspath(path)}: a state of {saved_rules} does not load into one of {rules}")
    _check_values(arrays, os.fspath(path))
    saved_layouts = json.loads(metadata.get(LAYOUTS_KEY, "{}"))
    renamed = {}
    for key, value in arrays.items():
        new = _renamed(key, rename)
        _check_layout(key, new, value, saved_layouts, layouts or {})
        renamed[new] = value
    return state_from_dict(like, renamed)


def _rules(state: PyTree) -> list[str]:
    """The rule of every optimizer state inside ``state`` (a chain's, a wrapper's), in order."""
    return [node.rule for node in hp.rule_states(state) if hasattr(node, "rule")]


def _check_values(arrays: Mapping[str, Any], where: str) -> None:
    """Refuse step counts that are negative or not whole, and hyperparameters their optimizer
    would refuse (a NaN lr), in a file that passed its checksum (written so by someone)."""
    for key, value in arrays.items():
        parts = key.split(".")
        if np.ndim(value) != 0:
            continue
        number = float(value)
        if parts[-1] == "count" and not (math.isfinite(number) and number >= 0 and number == int(number)):
            raise ValueError(f"{where}: {key} is {number}, not a step count")
        if "hparams" in parts[:-1]:
            name = parts[parts.index("hparams") + 1]
            try:
                hp.check_value(name, number)
            except ValueError as error:
                raise ValueError(f"{where}: {key}: {error}") from None


def _renamed(key: str, rename: Mapping[str, str] | Callable[[str], str] | None) -> str:
    if rename is None:
        return key
    if callable(rename):
        return rename(key)
    for old, new in rename.items():
        if key == old or key.endswith("." + old):
            return key[: len(key) - len(old)] + new
    return key


def _check_layout(
    key: str, new: str, value: Any, saved: Mapping[str, str], target: Mapping[str, str]
) -> None:
    """Raise where a weight saved in one layout would land on a param of another."""
    if np.ndim(value) < 2:
        return
    source = next((layout for path, layout in saved.items() if key == path or key.endswith("." + path)), None)
    if source is None:
        return
    path = next((p for p in target if new == p or new.endswith("." + p)), None)
    wanted = target[path] if path is not None else ("in_out" if new.rsplit(".", 1)[-1] == "kernel" else None)
    if wanted is not None and wanted != source:
        raise ValueError(
            f"{new} (saved as {key}): the state was saved for {LAYOUTS[source]} and the target "
            f"param is {LAYOUTS[wanted]}; its axes are not transposed silently. Load the file's "
            "arrays (safetensors.numpy.load_file), transpose those leaves, and build the state "
            "with agnostic_optim.checkpoint.state_from_dict"
        )


def _checksum(arrays: Mapping[str, Any]) -> str:
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}:{array.dtype.str}:{array.shape};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _metadata(raw: bytes) -> dict[str, str]:
    """The safetensors header's ``__metadata__`` (its first 8 bytes give the header's length)."""
    size = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + size]).get("__metadata__") or {}


def _write_atomically(path: str, data: bytes) -> None:
    """``data`` at ``path``, or the old file untouched: a temporary file in the same folder,
    written and fsynced, renamed over ``path``, then the folder fsynced (the rename is durable).
    The new file's mode follows the umask, as ``open`` would make it."""
    folder = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=folder)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    if hasattr(os, "O_DIRECTORY"):  # (POSIX: make the rename itself durable)
        directory = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
