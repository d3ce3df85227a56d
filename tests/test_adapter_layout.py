"""The adapters' structure: they reach the engine through its declared contract, their modules
import each other without a cycle, private torch APIs sit behind one gate, and without them
``compile=True`` falls back to the eager step with one warning."""

from __future__ import annotations

import ast
import json
import os
import pathlib
import subprocess
import sys

import pytest

from agnostic_optim import engine

ROOT = pathlib.Path(__file__).resolve().parent.parent
ADAPTERS = sorted((ROOT / "adapters").glob("*.py"))
PACKAGE = "agnostic_optim.adapters"


def _tree(path: pathlib.Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _imports(path: pathlib.Path) -> list[tuple[str, list[str]]]:
    """Every import in the file, top-level or not: (module, names imported from it)."""
    found = []
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, [alias.name for alias in node.names]))
    return found


def test_adapters_use_only_the_engines_declared_contract() -> None:
    allowed = set(engine.__all__)
    assert set(engine.EXECUTOR_CONTRACT) <= allowed
    assert all(hasattr(engine, name) for name in allowed)
    used: dict[str, set[str]] = {}
    for path in ADAPTERS:
        tree = _tree(path)
        names = {
            node.attr
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "engine"
        }
        for module, imported in _imports(path):
            if module == "agnostic_optim.engine":
                names.update(imported)
            # the core's private modules (``_backend``...) are nobody's contract
            private = [n for n in imported if n.startswith("_")] if module == "agnostic_optim" else []
            assert not module.startswith("agnostic_optim._") and not private, (path.name, module, private)
        used[path.name] = names
    outside = {name: sorted(names - allowed) for name, names in used.items() if names - allowed}
    assert not outside, f"adapters reach past engine.__all__: {outside}"
    assert used["numpy.py"] and used["_torch_eager.py"]  # (the scan sees their use of the engine)


def _adapter_graph() -> dict[str, set[str]]:
    """adapter module -> the adapter modules it imports (anywhere in the file)."""
    modules = {f"{PACKAGE}.{path.stem}": path for path in ADAPTERS}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for module, imported in _imports(path):
            if module in modules:
                edges.add(module)
            elif module == PACKAGE:
                edges.update(f"{PACKAGE}.{n}" for n in imported if f"{PACKAGE}.{n}" in modules)
        graph[name] = edges - {name}
    return graph


def test_adapter_modules_import_each_other_without_a_cycle() -> None:
    graph = _adapter_graph()
    assert graph[f"{PACKAGE}._torch_wrappers"] == {f"{PACKAGE}._torch_optimizer"}
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            pytest.fail(f"import cycle: {' -> '.join([*path[path.index(name) :], name])}")
        if name in done:
            return
        for other in sorted(graph[name]):
            visit(other, [*path, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


def test_private_torch_apis_are_used_only_through_the_gate() -> None:
    """``torch._*`` appears only in ``_torch_private`` (the ``_foreach_`` kernels, torch.optim's
    own building blocks, excepted: the gate checks them at import)."""
    offenders = []
    for path in ADAPTERS:
        if path.name == "_torch_private.py":
            continue
        for node in ast.walk(_tree(path)):
            dotted = ast.unparse(node) if isinstance(node, ast.Attribute) else ""
            if dotted.startswith("torch._") and not dotted.startswith("torch._foreach_"):
                offenders.append(f"{path.name}:{node.lineno}: {dotted}")
        for module, _ in _imports(path):
            if module.startswith("torch._"):
                offenders.append(f"{path.name}: import {module}")
    assert not offenders, offenders


FALLBACK_SCRIPT = r"""
import json, sys, warnings
sys.modules["torch._inductor.compile_fx"] = None  # a torch without Inductor's compile_fx
import torch
from agnostic_optim.adapters import _torch_private
from agnostic_optim.adapters.torch import AdamW

torch.manual_seed(0)
params = [torch.randn(shape, dtype=torch.float64) for shape in ((5, 3), (3,))]
runs = {}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for compile in (True, False, None):
        copies = [p.detach().clone().requires_grad_() for p in params]
        if compile is None:
            opt = torch.optim.AdamW(copies, lr=0.1, weight_decay=0.1)
        else:
            opt = AdamW(copies, lr=0.1, weight_decay=0.1, compile=compile)
        for step in range(4):
            for i, p in enumerate(copies):
                p.grad = torch.sin(p.detach() * (i + 1) + step)
            opt.step()
        runs[compile] = [p.detach().flatten().tolist() for p in copies]
print(json.dumps({
    "unavailable": _torch_private.COMPILED_UNAVAILABLE,
    "warnings": [str(w.message) for w in caught],
    "same": runs[True] == runs[False],
    "error": max(abs(a - b) for p, q in zip(runs[True], runs[None]) for a, b in zip(p, q)),
}))
"""


def test_compile_falls_back_to_the_eager_step_without_the_private_apis() -> None:
    pytest.importorskip("torch", reason="torch is not installed")
    env = {**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    result = subprocess.run(
        [sys.executable, "-c", FALLBACK_SCRIPT], capture_output=True, text=True, env=env, check=True
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert "torch._inductor.compile_fx.compile_fx" in report["unavailable"]
    assert len(report["warnings"]) == 1, report["warnings"]
    assert "compile=True runs the eager step" in report["warnings"][0]
    assert "torch._inductor.compile_fx.compile_fx" in report["warnings"][0]
    assert report["same"]
    assert report["error"] <= 1e-12  # (torch.optim.AdamW's numbers)
