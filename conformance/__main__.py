"""``python -m agnostic_optim.conformance``: run the matrix and print it (see the package docs).

Each failed cell prints one ``FAIL:`` line naming optimizer, backend, dtype and the earliest step
of divergence; ``--verbose`` adds one line per failed comparison (always in ``--json``). The
progress bar needs tqdm (the test/bench extras); without it the run simply shows none.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import agnostic_optim as ao
from agnostic_optim.conformance.backends import BACKEND_NAMES, get_backend
from agnostic_optim.conformance.cases import missing_cases, missing_inputs
from agnostic_optim.conformance.runner import DEFAULT_STEPS, CellResult, run_cell

DTYPES = ("float64", "float32")


def _split(value: str, allowed: tuple[str, ...] | list[str], what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    unknown = sorted(set(items) - set(allowed))
    if unknown:
        raise SystemExit(f"unknown {what} {unknown}; choose from {list(allowed)}")
    return items


def _format_error(value: float | None) -> str:
    return "-" if value is None else f"{value:.1e}"


def markdown_table(results: list[CellResult]) -> str:
    lines = [
        "| optimizer | backend | dtype | status | max rel. error vs NumPy float64 | vs reference |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        status = {"pass": "pass", "fail": "**FAIL**", "skip": "skipped"}[r.status]
        error = "-" if r.status == "skip" else _format_error(r.error_vs_numpy)
        reference = _format_error(r.error_vs_reference)
        lines.append(f"| {r.optimizer} | {r.backend} | {r.dtype} | {status} | {error} | {reference} |")
    return "\n".join(lines)


def text_table(results: list[CellResult]) -> str:
    lines = [
        f"{'optimizer':10s} {'backend':17s} {'dtype':8s} {'status':6s} {'vs numpy64':>11s} {'vs ref':>9s}"
    ]
    for r in results:
        error = "-" if r.status == "skip" else _format_error(r.error_vs_numpy)
        lines.append(
            f"{r.optimizer:10s} {r.backend:17s} {r.dtype:8s} {r.status.upper():6s} {error:>11s} "
            f"{_format_error(r.error_vs_reference):>9s}"
        )
    return "\n".join(lines)


def _progress_bar(total: int) -> Any:
    """A tqdm bar on stderr, or None when tqdm is not installed (it is only in the extras)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="conformance", unit="cell", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    names = list(ao.registry())
    parser = argparse.ArgumentParser(prog="python -m agnostic_optim.conformance", description=__doc__)
    parser.add_argument("--backends", default=",".join(BACKEND_NAMES))
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--optimizers", default=",".join(names))
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--require", default="", help="backends whose absence is an error")
    parser.add_argument("--json", metavar="FILE", help="write the full results as JSON")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table (for the README)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--verbose", action="store_true", help="print every failed comparison, not only one line per cell"
    )
    args = parser.parse_args(argv)

    backends = _split(args.backends, BACKEND_NAMES, "backends")
    dtypes = _split(args.dtypes, DTYPES, "dtypes")
    optimizers = _split(args.optimizers, names, "optimizers")
    required = _split(args.require, BACKEND_NAMES, "backends") if args.require else []

    problems: list[str] = []
    for name in missing_cases():
        problems.append(f"{name} is registered but has no conformance case")
    for item in missing_inputs():
        problems.append(f"{item} is a registered step input that no conformance case generates")
    for name in required:
        backend = get_backend(name)
        if not backend.available:
            problems.append(f"required backend {name} is unavailable: {backend.reason}")

    cells = [(o, b, d) for o in optimizers for b in backends for d in dtypes]
    results: list[CellResult] = []
    progress = None if args.quiet else _progress_bar(len(cells))
    for optimizer, backend, dtype in cells:
        if progress is not None:
            progress.set_postfix_str(f"{optimizer} {backend} {dtype}")
        results.append(run_cell(optimizer, backend, dtype, args.steps))
        if progress is not None:
            progress.update()
    if progress is not None:
        progress.close()

    print(markdown_table(results) if args.markdown else text_table(results))
    skipped = sorted({(r.backend, r.notes[0]) for r in results if r.status == "skip" and r.notes})
    for backend, reason in skipped:
        print(f"skipped {backend}: {reason}")
    notes = sorted({n for r in results for n in r.notes if r.status != "skip"})
    for note in notes:
        print(f"note: {note}")
    failed = [r for r in results if r.status == "fail"]
    for line in problems + [r.summary() for r in failed]:
        print(f"FAIL: {line}")
    if args.verbose:
        for line in (f for r in failed for f in r.failures):
            print(f"  detail: {line}")
    passed = sum(r.status == "pass" for r in results)
    print(
        f"{passed} passed, {sum(r.status == 'fail' for r in results)} failed, "
        f"{sum(r.status == 'skip' for r in results)} skipped ({args.steps} steps per run)"
    )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {"steps": args.steps, "problems": problems, "cells": [r.as_dict() for r in results]},
                handle,
                indent=2,
            )
    return 1 if failed or problems else 0


if __name__ == "__main__":
    sys.exit(main())
