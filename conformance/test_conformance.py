"""The conformance suite as pytest: one test per optimizer x backend x dtype (part of make test)."""

from __future__ import annotations

import json

import pytest

import agnostic_optim as ao
from agnostic_optim import blocks
from agnostic_optim.conformance import runner
from agnostic_optim.conformance.__main__ import main
from agnostic_optim.conformance.backends import BACKEND_NAMES
from agnostic_optim.conformance.cases import missing_cases

OPTIMIZERS = list(ao.registry())


def test_every_registered_optimizer_has_a_case() -> None:
    assert missing_cases() == []


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_conformance(optimizer: str, backend: str, dtype: str) -> None:
    result = runner.run_cell(optimizer, backend, dtype)
    if result.status == "skip":
        pytest.skip(f"{backend}: {'; '.join(result.notes)}")
    assert result.status == "pass", "\n".join(result.failures)
    assert result.runs > 0
    if dtype == "float64" and backend == "numpy":
        assert result.error_vs_reference is not None, (
            "every case of the numpy float64 cell meets its reference"
        )


def test_a_broken_rule_is_reported_with_optimizer_backend_and_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """Break Adam's bias correction (1 - β^(t+1) instead of 1 - β^t): the suite must fail and say
    which optimizer, backend and step first diverged from torch.optim."""
    monkeypatch.setattr(runner, "_BASELINES", {})
    monkeypatch.setattr(runner, "_REFERENCES", {})
    monkeypatch.setattr(blocks, "bias_correction", lambda beta, t: 1 - beta ** (t + 1))
    result = runner.run_cell("adam", "numpy", "float64")
    assert result.status == "fail"
    report = "\n".join(result.failures)
    assert "adam on numpy float64" in report
    assert "diverges from torch.optim.Adam at step 1 " in report
    assert "diverges from optax.adam at step 1 " in report


def test_cli_writes_json_and_markdown(tmp_path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "matrix.json"
    status = main(["--optimizers", "sgd,lion", "--backends", "numpy", "--steps", "5", "--quiet",
                   "--json", str(out), "--markdown"])  # fmt: skip
    printed = capsys.readouterr().out
    assert status == 0
    assert "| sgd | numpy | float64 | pass |" in printed
    cells = json.loads(out.read_text())["cells"]
    assert {(c["optimizer"], c["dtype"]) for c in cells} == {
        ("sgd", "float64"),
        ("sgd", "float32"),
        ("lion", "float64"),
        ("lion", "float32"),
    }
    assert all(c["status"] == "pass" for c in cells)


def test_cli_fails_when_a_required_backend_is_missing(capsys: pytest.CaptureFixture) -> None:
    from agnostic_optim.conformance.backends import get_backend

    missing = next((name for name in BACKEND_NAMES if not get_backend(name).available), None)
    if missing is None:
        pytest.skip("every backend is available here, so none can be missing")
    status = main(
        ["--optimizers", "sgd", "--backends", "numpy", "--steps", "3", "--quiet", "--require", missing]
    )
    assert status == 1
    assert f"required backend {missing} is unavailable" in capsys.readouterr().out
