"""The conformance suite as pytest: one test per optimizer x backend x dtype (part of make test)."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys

import numpy as np
import pytest

import agnostic_optim as ao
from agnostic_optim import blocks
from agnostic_optim.conformance import cases, runner
from agnostic_optim.conformance.__main__ import main
from agnostic_optim.conformance.backends import BACKEND_NAMES, get_backend
from agnostic_optim.conformance.cases import Case, like_params, missing_cases, missing_inputs
from agnostic_optim.conformance.problems import mlp_regression, multi_leaf_tree

OPTIMIZERS = list(ao.registry())


def test_every_registered_optimizer_has_a_case() -> None:
    assert missing_cases() == []
    assert missing_inputs() == []


def test_missing_inputs_names_a_registered_input_no_case_generates(monkeypatch: pytest.MonkeyPatch) -> None:
    real = ao.registry()
    sgd = dataclasses.replace(real["sgd"], inputs={"hessian_diag": "a test input"})
    monkeypatch.setattr(ao, "registry", lambda: {**real, "sgd": sgd})
    assert missing_inputs() == ["sgd: hessian_diag"]
    covering = Case("sgd", "sgd-test-inputs", {"lr": 0.1}, inputs={"hessian_diag": like_params()})
    monkeypatch.setattr(cases, "CASES", [*cases.CASES, covering])
    assert missing_inputs() == []


# Optimizers no library implements: their official code is transcribed in these unit tests (at
# 1e-12 on every backend, with their step inputs), and here the backends meet each other.
REFERENCED_IN_UNIT_TESTS = {
    "sam": "test_wrappers.py",
    "adahessian": "test_reference_curvature.py",
    "sophia": "test_reference_curvature.py",
    "shampoo": "test_shampoo.py",
    "kfac": "test_kfac.py",
}


def test_optimizers_without_a_library_reference_have_their_unit_test() -> None:
    tests = pathlib.Path(__file__).resolve().parents[1] / "tests"
    for name, test_file in REFERENCED_IN_UNIT_TESTS.items():
        assert name in ao.registry(), name
        assert f"ao.{name}(" in (tests / test_file).read_text(), f"{test_file} does not test {name}"


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_conformance(optimizer: str, backend: str, dtype: str) -> None:
    result = runner.run_cell(optimizer, backend, dtype)
    if result.status == "skip":
        pytest.skip(f"{backend}: {'; '.join(result.notes)}")
    assert result.status == "pass", "\n".join(result.failures)
    assert result.runs > 0
    if dtype == "float64" and backend == "numpy" and optimizer not in REFERENCED_IN_UNIT_TESTS:
        assert result.error_vs_reference is not None, (
            "every case of the numpy float64 cell meets its reference"
        )


def _break_adam_bias_correction(monkeypatch: pytest.MonkeyPatch) -> None:
    """Adam's bias correction becomes 1 - β^(t+1) instead of 1 - β^t, in every backend and in the
    NumPy float64 baseline alike (fresh caches), so only the external references can see it."""
    monkeypatch.setattr(runner, "_BASELINES", {})
    monkeypatch.setattr(runner, "_REFERENCES", {})
    monkeypatch.setattr(blocks, "bias_correction", lambda beta, t: 1 - beta ** (t + 1))


@pytest.mark.parametrize(
    ("backend", "dtype"), [("numpy", "float64"), ("numpy", "float32"), ("torch", "float32")]
)
def test_a_broken_rule_is_reported_with_optimizer_backend_and_step(
    monkeypatch: pytest.MonkeyPatch, backend: str, dtype: str
) -> None:
    """The suite must fail and say which optimizer, backend, dtype and step first diverged from
    torch.optim and optax; in float32 too, where the float64 reference is met at 1e-5."""
    if not get_backend(backend).available:
        pytest.skip(f"{backend}: {get_backend(backend).reason}")
    _break_adam_bias_correction(monkeypatch)
    result = runner.run_cell("adam", backend, dtype)
    assert result.status == "fail"
    report = "\n".join(result.failures)
    assert f"adam on {backend} {dtype}" in report
    assert "diverges from torch.optim.Adam at step 1 " in report
    assert "diverges from optax.adam at step 1 " in report
    assert result.first_step == 1
    assert result.summary().startswith(f"adam on {backend} {dtype}: first divergence at step 1 (")


def test_cli_prints_one_line_per_failed_cell_and_details_when_verbose(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    _break_adam_bias_correction(monkeypatch)
    argv = ["--optimizers", "adam", "--backends", "numpy", "--dtypes", "float64", "--steps", "3", "--quiet"]
    assert main(argv) == 1
    printed = capsys.readouterr().out
    fail_lines = [line for line in printed.splitlines() if line.startswith("FAIL:")]
    assert fail_lines == [fail_lines[0]]
    assert fail_lines[0].startswith("FAIL: adam on numpy float64: first divergence at step 1 (")
    assert "detail:" not in printed
    assert main([*argv, "--verbose"]) == 1
    details = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  detail:")]
    assert details and all("diverges from" in line for line in details)


def test_cli_runs_without_tqdm(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)  # makes ``import tqdm`` raise ImportError
    status = main(["--optimizers", "sgd", "--backends", "numpy", "--dtypes", "float64", "--steps", "2"])
    assert status == 0
    assert "1 passed, 0 failed, 0 skipped" in capsys.readouterr().out


def test_a_tolerance_override_needs_a_reason_and_is_applied(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="tolerance_reason"):
        Case("sgd", "sgd-no-reason", {"lr": 0.1}, tolerance={"float32": 1e-4})
    strict = Case(
        "sgd", "sgd-strict-test", {"lr": 0.1}, tolerance={"float32": 1e-12}, tolerance_reason="test only"
    )
    monkeypatch.setattr(cases, "CASES", [strict])
    monkeypatch.setattr(runner, "_BASELINES", {})
    result = runner.run_cell("sgd", "numpy", "float32", steps=5)
    assert result.status == "fail", "float32 rounding exceeds the overridden 1e-12"
    assert any("test only" in note for note in result.notes)
    assert runner.run_cell("sgd", "numpy", "float64", steps=5).status == "pass"


def test_backend_names_map_to_frameworks_and_jax_is_pinned_to_the_cpu() -> None:
    assert get_backend("torch-cuda").framework == "torch"
    assert get_backend("jax-gpu").framework == "jax"
    jax_backend = get_backend("jax")
    if not jax_backend.available:
        pytest.skip(f"jax: {jax_backend.reason}")
    import jax

    assert jax_backend.asarray(np.ones(3), "float32").devices() == {jax.devices("cpu")[0]}


class _InputCase(Case):
    """A case whose optimizer takes ``hessian_diag`` (no registered optimizer takes inputs yet)."""

    def build(self) -> ao.Optimizer:
        def step(state, grads, params, hessian_diag=None):
            if hessian_diag is None:
                return state, [p - 0.1 * g for p, g in zip(params, grads)]
            return state + 1, [p - 0.1 * g / (1.0 + h) for p, g, h in zip(params, grads, hessian_diag)]

        return ao.Optimizer(init=lambda params: 0, step=step, name="diag-scaled", inputs=("hessian_diag",))


def test_step_inputs_are_generated_on_the_host_and_identical_for_every_backend() -> None:
    generator = like_params(positive=True, every=2)
    case = _InputCase("sgd", "sgd-fake-inputs", {}, inputs={"hessian_diag": generator})
    problem, steps = mlp_regression(), 4
    host = runner.host_inputs(case, problem, steps)
    again = runner.host_inputs(case, problem, steps)
    assert [h["hessian_diag"] is None for h in host] == [False, True, False, True]
    for a, b in zip(host[0]["hessian_diag"], again[0]["hessian_diag"]):
        assert np.array_equal(a, b)
    assert [a.shape for a in host[0]["hessian_diag"]] == [p.shape for p in problem.initial]
    other = runner.host_inputs(case, multi_leaf_tree(steps), steps)[0]["hessian_diag"]
    assert [a.shape for a in other] == [(), (5,), (4, 3), (2, 3, 2, 2)]

    # A NumPy transcription that uses the host values directly.
    numpy = get_backend("numpy")
    params, expected = [p.copy() for p in problem.initial], []
    for step in range(steps):
        grads = problem.gradient(numpy, params, step, "float64")
        diag = host[step]["hessian_diag"] or [np.zeros_like(p) for p in params]
        params = [p - 0.1 * g / (1.0 + h) for p, g, h in zip(params, grads, diag)]
        expected.append(params)
    without = runner.run_functional(dataclasses.replace(case, inputs={}), numpy, "float64", problem, steps)
    assert runner.max_relative_error(without[0], expected[0]) > 1e-6, "the input changes the trajectory"

    available = [get_backend(name) for name in ("numpy", "array_api_strict", "torch", "jax")]
    available = [b for b in available if b.available]
    assert len(available) >= 2
    for backend in available:
        runs = [("functional", runner.run_functional(case, backend, "float64", problem, steps))]
        runs += runner.run_adapters(case, backend, "float64", problem, steps)
        for entry, trajectory in runs:
            worst, first = runner.first_divergence(trajectory, expected, 1e-12)
            assert first is None, f"{backend.name} {entry}: {worst:.2e}"


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
