"""``make demo`` runs: a short run of benchmarks/demo.py trains every listed optimizer."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parents[1] / "benchmarks" / "demo.py"


def test_demo_prints_a_loss_per_step_and_the_losses_fall() -> None:
    out = subprocess.run(
        [sys.executable, str(DEMO), "--steps", "40"], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    rows = [line.split() for line in out.splitlines() if re.match(r"^\s*\d+\s+\d", line)]
    assert [int(row[0]) for row in rows] == list(range(1, 41))
    first, last = [float(v) for v in rows[0][1:]], [float(v) for v in rows[-1][1:]]
    assert len(first) >= 5 and all(b < a for a, b in zip(first, last)), (first, last)
