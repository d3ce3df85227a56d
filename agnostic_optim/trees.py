"""Pytrees: flatten parameters into leaves and rebuild them, the same way on every backend.

Parameters, gradients and optimizer state are nests of dict / list / tuple / NamedTuple / None
with arrays at the leaves. When JAX is loaded, ``jax.tree_util`` does the work, so every JAX
pytree (flax, equinox, custom nodes) is understood. Otherwise a small built-in walker with the
same conventions is used (dict keys sorted, ``None`` holds no leaves), so leaf order -- and with
it state and checkpoints -- is identical whichever is in charge.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Any

PyTree = Any
KeyPath = tuple[Hashable, ...]


# NamedTuple types with static fields: Python values that describe a node rather than hold
# data (an optimizer state's ``rule``), kept in the tree's structure, not among its leaves
_STATIC: dict[type, tuple[str, ...]] = {}
_REGISTERED_WITH_JAX: set[type] = set()


def register_static_fields(cls: type, fields: tuple[str, ...]) -> None:
    """Make ``fields`` of the NamedTuple ``cls`` static: part of a tree's structure (compared
    with it, kept by ``jax.jit`` as part of the treedef), not leaves (never traced, never
    saved in a checkpoint's arrays)."""
    _STATIC[cls] = fields
    _register_with_jax()


def _register_with_jax() -> None:
    jax = sys.modules.get("jax")
    if jax is None:
        return
    tu = jax.tree_util
    for cls, fields in _STATIC.items():
        if cls in _REGISTERED_WITH_JAX:
            continue
        dynamic = tuple(f for f in cls._fields if f not in fields)

        def flatten_with_keys(node: Any, dynamic: tuple[str, ...] = dynamic, fields: tuple = fields):
            children = [(tu.GetAttrKey(f), getattr(node, f)) for f in dynamic]
            return children, tuple(getattr(node, f) for f in fields)

        def flatten(node: Any, dynamic: tuple[str, ...] = dynamic, fields: tuple = fields):
            return tuple(getattr(node, f) for f in dynamic), tuple(getattr(node, f) for f in fields)

        def unflatten(statics: tuple, children: Any, cls: type = cls, dynamic=dynamic, fields=fields):
            return cls(**dict(zip(dynamic, children)), **dict(zip(fields, statics)))

        tu.register_pytree_with_keys(cls, flatten_with_keys, unflatten, flatten)
        _REGISTERED_WITH_JAX.add(cls)


def _jax_tree_util() -> Any:
    jax = sys.modules.get("jax")
    if jax is None:
        return None
    if len(_REGISTERED_WITH_JAX) != len(_STATIC):  # (JAX was imported after the registrations)
        _register_with_jax()
    return jax.tree_util


def _is_namedtuple(node: Any) -> bool:
    return isinstance(node, tuple) and hasattr(type(node), "_fields")


def _children(node: Any) -> tuple[Any, list[tuple[Hashable, Any]]] | None:
    """(node kind, [(key, child)]) for a container, ``None`` for a leaf."""
    if node is None:
        return ("none", [])
    if isinstance(node, OrderedDict):
        return (("ordereddict", tuple(node)), list(node.items()))
    if isinstance(node, dict):
        try:
            keys = sorted(node)
        except TypeError:
            keys = list(node)
        return (("dict", tuple(keys)), [(k, node[k]) for k in keys])
    if _is_namedtuple(node):
        static = _STATIC.get(type(node), ())
        items = [(f, v) for f, v in zip(type(node)._fields, node) if f not in static]
        return (("namedtuple", type(node), tuple(getattr(node, f) for f in static)), items)
    if isinstance(node, (list, tuple)):
        return (("sequence", type(node), len(node)), list(enumerate(node)))
    return None


def _rebuild(kind: Any, children: list[Any]) -> Any:
    if kind == "none":
        return None
    tag = kind[0]
    if tag == "ordereddict":
        return OrderedDict(zip(kind[1], children))
    if tag == "dict":
        return dict(zip(kind[1], children))
    if tag == "namedtuple":
        cls, statics = kind[1], kind[2]
        fields = _STATIC.get(cls, ())
        dynamic = [f for f in cls._fields if f not in fields]
        return cls(**dict(zip(dynamic, children)), **dict(zip(fields, statics)))
    return kind[1](children)


class TreeDef:
    """Structure of a built-in pytree: hashable, comparable, rebuilds from leaves."""

    __slots__ = ("_spec", "num_leaves")

    def __init__(self, spec: Any, num_leaves: int):
        self._spec = spec
        self.num_leaves = num_leaves

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TreeDef) and self._spec == other._spec

    def __hash__(self) -> int:
        return hash(self._spec)

    def __repr__(self) -> str:
        return f"TreeDef({self._spec!r})"

    def unflatten(self, leaves: Sequence[Any]) -> PyTree:
        leaves = list(leaves)
        if len(leaves) != self.num_leaves:
            raise ValueError(f"expected {self.num_leaves} leaves, got {len(leaves)}")
        position = 0

        def build(spec: Any) -> Any:
            nonlocal position
            if spec == "*":
                position += 1
                return leaves[position - 1]
            kind, subs = spec
            return _rebuild(kind, [build(s) for s in subs])

        return build(self._spec)


def _flatten_builtin(tree: PyTree) -> tuple[list[tuple[KeyPath, Any]], TreeDef]:
    leaves: list[tuple[KeyPath, Any]] = []

    def walk(node: Any, path: KeyPath) -> Any:
        found = _children(node)
        if found is None:
            leaves.append((path, node))
            return "*"
        kind, items = found
        return (kind, tuple(walk(child, (*path, key)) for key, child in items))

    spec = walk(tree, ())
    return leaves, TreeDef(spec, len(leaves))


def _key_of(entry: Any) -> Hashable:
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return getattr(entry, attr)
    return str(entry)


def flatten_with_paths(tree: PyTree) -> tuple[list[tuple[KeyPath, Any]], Any]:
    """Leaves with their key paths (tuples of dict keys, indices and field names), and the treedef."""
    tu = _jax_tree_util()
    if tu is None:
        return _flatten_builtin(tree)
    pairs, treedef = tu.tree_flatten_with_path(tree)
    return [(tuple(_key_of(e) for e in path), leaf) for path, leaf in pairs], treedef


def flatten(tree: PyTree) -> tuple[list[Any], Any]:
    """The leaves of ``tree`` in canonical order, and its treedef."""
    tu = _jax_tree_util()
    if tu is None:
        pairs, treedef = _flatten_builtin(tree)
        return [leaf for _, leaf in pairs], treedef
    return tu.tree_flatten(tree)


def unflatten(treedef: Any, leaves: Sequence[Any]) -> PyTree:
    if isinstance(treedef, TreeDef):
        return treedef.unflatten(leaves)
    return _jax_tree_util().tree_unflatten(treedef, list(leaves))


def tree_map(fn: Callable[..., Any], tree: PyTree, *rest: PyTree) -> PyTree:
    """Apply ``fn`` leaf-wise over trees of one structure."""
    leaves, treedef = flatten(tree)
    others = [flatten_like(treedef, r, "tree_map argument") for r in rest]
    return unflatten(treedef, [fn(*args) for args in zip(leaves, *others)])


def flatten_like(treedef: Any, tree: PyTree, what: str) -> list[Any]:
    """Leaves of ``tree``, with an error naming the leaves where its structure differs from
    ``treedef``'s (``grads: missing ['b'], unexpected ['c']``)."""
    leaves, other = flatten(tree)
    if other != treedef:
        raise ValueError(structure_mismatch(treedef, tree, what))
    return leaves


def structure_mismatch(treedef: Any, tree: PyTree, what: str) -> str:
    """What differs between ``tree`` and the structure ``treedef`` describes, by leaf path."""
    expected = [path for path, _ in flatten_with_paths(unflatten(treedef, [0] * num_leaves(treedef)))[0]]
    found = [path for path, _ in flatten_with_paths(tree)[0]]
    missing = [path_repr(p, what) for p in expected if p not in set(found)]
    unexpected = [path_repr(p, what) for p in found if p not in set(expected)]
    parts = [f"missing {_listed(missing)}"] if missing else []
    parts += [f"unexpected {_listed(unexpected)}"] if unexpected else []
    if not parts:  # the same leaf paths in other containers (a tuple for a list, ...)
        parts = [f"the same leaves in other containers ({type(tree).__name__} against the params')"]
    return f"{what} must have the structure of params: {'; '.join(parts)}"


def _listed(paths: list[str], most: int = 8) -> str:
    shown = ", ".join(paths[:most])
    return shown + (f" and {len(paths) - most} more" if len(paths) > most else "")


def num_leaves(treedef: Any) -> int:
    return treedef.num_leaves


def path_repr(path: KeyPath, root: str = "") -> str:
    """A leaf's path as Python would index it: ``grads['encoder']['w']``, ``params[0]``."""
    return root + "".join(f"[{k!r}]" for k in path) if path else (root or "<root>")


def leaf_paths(tree: PyTree, root: str) -> list[str]:
    """Every leaf of ``tree`` as :func:`path_repr` writes it, in leaf order."""
    return [path_repr(path, root) for path, _ in flatten_with_paths(tree)[0]]


def paths_str(path: KeyPath) -> str:
    """A readable dotted name for a key path, e.g. ``layers.0.bias``."""
    return ".".join(str(k) for k in path) if path else "<root>"
