"""Checkpointing: one flat, framework-neutral layout for every optimizer state.

``state_to_dict`` names each array of a state by its key path (``buffers.exp_avg.layer1.weight``,
``hparams.betas.0``, ``count``), the same names on NumPy, torch, JAX or CuPy. ``save_state`` and
``load_state`` write and read them with safetensors (no pickle), so a state saved from a torch
run resumes a JAX run: loading takes a freshly initialised state as the template and converts
every array to the template's namespace, dtype and device.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from agnostic_optim import _backend, trees

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


def save_state(path: str | os.PathLike, state: PyTree) -> None:
    """Write ``state`` to a safetensors file (16-bit floats are stored losslessly as float32)."""
    from safetensors.numpy import save_file

    host = {}
    for name, leaf in state_to_dict(state).items():
        array = _backend.to_host(leaf)
        host[name] = np.ascontiguousarray(array).reshape(np.shape(array))  # keeps 0-d arrays 0-d
    save_file(host, os.fspath(path))


def load_state(path: str | os.PathLike, like: PyTree) -> PyTree:
    """Read a state written by :func:`save_state` into the structure, namespace and dtypes of
    ``like`` (typically ``opt.init(params)`` on the new backend)."""
    from safetensors.numpy import load_file

    return state_from_dict(like, load_file(os.fspath(path)))
