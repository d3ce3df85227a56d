"""The README's quick start runs as written, and its layout names real modules."""

from __future__ import annotations

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs_and_steps_the_params() -> None:
    block = re.search(r"## Quick start\s+```python\n(.*?)```", README.read_text(), re.S).group(1)
    namespace: dict = {}
    exec(compile(block, "README quick start", "exec"), namespace)
    params = namespace["params"]
    # warmup starts at lr 0, so the first step moves nothing but the state advanced
    assert np.array_equal(params["w"], np.zeros((3, 2)))
    assert int(namespace["state"][1].count) == 1
    assert float(namespace["ao"].get_hparams(namespace["state"])["weight_decay"]) == 0.0


def test_layout_lists_existing_modules() -> None:
    """Every module the layout names (``  engine.py ...`` under ``agnostic_optim/``, the
    adapters' under ``adapters/``) exists in that folder."""
    root = README.parent
    layout = README.read_text().split("## Layout", 1)[1].split("```", 2)[1]
    folder, checked = None, 0
    for line in layout.splitlines():
        top = re.match(r"^(\w+)/ ", line)
        if top:
            folder = top.group(1)
        for name in re.findall(r"\b(\w+\.py)\b", line) if line.startswith("  ") else []:
            assert (root / folder / name).exists(), f"{folder}/{name}"
            checked += 1
    assert checked >= 25
