"""``make demo`` runs: a short run of benchmarks/demo.py trains every listed optimizer; so does
benchmarks/convergence.py for every registered optimizer's torch class."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import agnostic_optim as ao

DEMO = Path(__file__).resolve().parents[1] / "benchmarks" / "demo.py"


def test_demo_prints_a_loss_per_step_and_the_losses_fall() -> None:
    out = subprocess.run(
        [sys.executable, str(DEMO), "--steps", "40"], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    rows = [line.split() for line in out.splitlines() if re.match(r"^\s*\d+\s+\d", line)]
    assert [int(row[0]) for row in rows] == list(range(1, 41))
    first, last = [float(v) for v in rows[0][1:]], [float(v) for v in rows[-1][1:]]
    assert len(first) >= 5 and all(b < a for a, b in zip(first, last)), (first, last)


CONVERGENCE = DEMO.parent / "convergence.py"


def test_convergence_benchmark_runs_every_registered_optimizers_torch_class(tmp_path: Path) -> None:
    """benchmarks/convergence.py (30 steps): every registered optimizer, through its torch class,
    lowers the loss; the plot is written."""
    pytest.importorskip("torch", reason="torch is not installed")
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (the bench extra)")
    plot = tmp_path / "convergence.png"
    out = subprocess.run(
        [sys.executable, "-W", "ignore", str(CONVERGENCE), "--steps", "30", "--plot", str(plot)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    rows = {
        line.split()[0]: line.split()[1:] for line in out.splitlines() if re.match(r"^\s*[a-z_]+\s+\d", line)
    }
    assert set(rows) == set(ao.registry())
    initial = float(np.log(2.0))  # the untrained net's loss is close to log 2
    for name, (final, accuracy, *_) in rows.items():
        assert float(final) < initial and float(accuracy) > 0.55, (name, final, accuracy)
    assert plot.stat().st_size > 10_000
