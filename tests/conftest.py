"""Shared fixtures: paths to the local GSM8K copy and a tiny offline model built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# One thread per process: with 2 threads torch was 10-100x slower at random on our 2-core machines.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

REPO = Path(__file__).resolve().parents[1]
GSM8K_DIR = REPO.parent / "shared" / "data" / "gsm8k"


@pytest.fixture(scope="session")
def gsm8k_dir() -> Path:
    if not (GSM8K_DIR / "train.jsonl").exists():
        pytest.fail(f"GSM8K is expected at {GSM8K_DIR} (the shared data folder beside the checkout)")
    return GSM8K_DIR


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Qwen2-architecture model + locally trained tokenizer, saved as a normal HF directory."""
    from trainer.tiny_model import build_tiny_model

    out = tmp_path_factory.mktemp("tiny-model")
    build_tiny_model(out, gsm8k_dir=GSM8K_DIR, seed=0)
    return out


# ---- the fault table (make test-faults) ---------------------------------------------------------------------
# A fault test records what it expected and what it observed with `fault_report(scenario, expected, observed)`;
# the rows are printed as one markdown table at the end of the run, each with the outcome of the test that
# recorded it. A `faults` test that failed (or was skipped) before recording a row still gets one, saying so.
_FAULT_ROWS: list[dict[str, str]] = []
_OUTCOMES: dict[str, str] = {}  # nodeid -> passed / failed / error / skipped
_FAULT_NODES: dict[str, str] = {}  # nodeid -> short failure text, for `faults` tests (filled as they run)
_current_nodeid: list[str] = [""]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _current_nodeid[0] = item.nodeid


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    nodeid = report.nodeid
    prev = _OUTCOMES.get(nodeid)
    if report.failed:
        _OUTCOMES[nodeid] = "failed" if report.when == "call" else f"error ({report.when})"
        if item.get_closest_marker("faults") is not None and call.excinfo is not None:
            _FAULT_NODES[nodeid] = call.excinfo.exconly().splitlines()[0][:200]
    elif report.skipped and prev is None:
        _OUTCOMES[nodeid] = "skipped"
        if item.get_closest_marker("faults") is not None and isinstance(report.longrepr, tuple):
            _FAULT_NODES[nodeid] = str(report.longrepr[2]).removeprefix("Skipped: ")[:200]
    elif report.when == "call" and report.passed and prev is None:
        _OUTCOMES[nodeid] = "passed"
    if item.get_closest_marker("faults") is not None:
        _FAULT_NODES.setdefault(nodeid, "")


@pytest.fixture(scope="session")
def fault_report():
    """`fault_report(scenario, expected, observed)`: record one row of the fault table for the running test."""

    def record(scenario: str, expected: str, observed: str) -> None:
        _FAULT_ROWS.append(
            {"nodeid": _current_nodeid[0], "scenario": scenario, "expected": expected, "observed": observed}
        )

    return record


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    by_node: dict[str, list[dict[str, str]]] = {}
    for r in _FAULT_ROWS:
        by_node.setdefault(r["nodeid"], []).append(r)
    rows = []
    for nodeid in dict.fromkeys([*_FAULT_NODES, *by_node]):  # in the order the tests ran
        if nodeid in by_node:
            rows.extend(by_node[nodeid])
            continue
        failure = _FAULT_NODES[nodeid]
        if _OUTCOMES.get(nodeid) == "skipped":
            observed = f"not run: {failure}"
        else:
            observed = f"no row recorded: the test stopped before reporting ({failure or 'see above'})"
        rows.append({"nodeid": nodeid, "scenario": nodeid, "expected": "-", "observed": observed})
    if not rows:
        return
    tr = terminalreporter
    tr.write_sep("=", f"fault scenarios ({len(rows)})")
    tr.write_line("| scenario | expected | observed | result |")
    tr.write_line("|---|---|---|---|")
    for r in rows:
        result = _OUTCOMES.get(r["nodeid"], "unknown")
        tr.write_line(
            f"| {_cell(r['scenario'])} | {_cell(r['expected'])} | {_cell(r['observed'])} | {result} |"
        )
