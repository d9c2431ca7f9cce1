"""Run report: PNG plots and a markdown summary of a run folder, from its metrics.jsonl alone.

    python -m launch.report runs/cpu-demo          # works during a run (reads what is there) and after

Writes into RUN_DIR/report/: ``rewards.png`` (each reward function's mean per step, and the total),
``accuracy.png``, ``completion_length.png``, ``truncation.png``, ``step_time.png`` (the step and its split:
generate, trainer idle waiting for rollouts, train, sync), and RUN_DIR/report.md with a table of the first, last and best
value of each headline metric, plus the before/after held-out accuracy of RUN_DIR/heldout.json when the
launcher measured it. The driver calls ``write_report`` when a run ends.

Metric names are found by pattern, not hard-coded to one trainer version: a reward function's mean is any
key ``reward/<name>/mean`` (or ``reward/<name>``, ``rewards/<name>[/mean]``); accuracy, length and throughput use
the same candidate lists as the progress bar.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Any

from launch.progress import COLUMNS, JsonlTail, pick

_REWARD_KEY = re.compile(r"^rewards?/(?P<name>[A-Za-z0-9_\-]+?)(?:/mean)?$")
_SKIP_REWARD_NAMES = {"mean", "std", "total", "min", "max"}


def load_rows(run_dir: str | Path) -> list[dict[str, Any]]:
    """metrics.jsonl rows with an integer step; a resumed run's repeated steps keep the latest row."""
    follower = JsonlTail(Path(run_dir) / "metrics.jsonl")
    follower.refresh()
    by_step: dict[int, dict[str, Any]] = {}
    for row in follower.rows:
        if isinstance(row.get("step"), int):
            by_step[row["step"]] = row
    return [by_step[s] for s in sorted(by_step)]


def reward_series(rows: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """reward function name -> [(step, mean)], plus "total" when the trainer logs it."""
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for key, v in row.items():
            m = _REWARD_KEY.match(key)
            if not m or not _finite(v):
                continue
            name = m.group("name")
            if name in _SKIP_REWARD_NAMES:
                continue
            series.setdefault(name, []).append((row["step"], float(v)))
        total = pick(row, COLUMNS["reward"])
        if total is not None:
            series.setdefault("total", []).append((row["step"], total))
    return series


def metric_series(rows: list[dict[str, Any]], column: str) -> list[tuple[int, float]]:
    out = []
    for row in rows:
        v = pick(row, COLUMNS[column])
        if v is not None and math.isfinite(v):
            out.append((row["step"], v))
    return out


def _key_series(rows: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    """(step, value) of one exact metrics key, finite values only."""
    return [(r["step"], float(r[key])) for r in rows if _finite(r.get(key))]


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _plot(path: Path, title: str, ylabel: str, curves: dict[str, list[tuple[int, float]]]) -> bool:
    if not any(curves.values()):
        return False
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for name, pts in curves.items():
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, label=name, marker="." if len(pts) < 50 else None)
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _row(name: str, pts: list[tuple[int, float]], higher_is_better: bool = True) -> str:
    """first / last / best, plus the mean of the first and last 10% of steps (single steps are noisy)."""
    if not pts:
        return f"| {name} | - | - | - | - | - |"
    best = max(pts, key=lambda p: p[1]) if higher_is_better else min(pts, key=lambda p: p[1])
    k = max(1, len(pts) // 10)
    head, tail = sum(v for _, v in pts[:k]) / k, sum(v for _, v in pts[-k:]) / k
    return (
        f"| {name} | {pts[0][1]:.4g} (step {pts[0][0]}) | {pts[-1][1]:.4g} (step {pts[-1][0]}) | "
        f"{best[1]:.4g} (step {best[0]}) | {head:.4g} | {tail:.4g} |"
    )


def _heldout_lines(data: dict[str, Any]) -> list[str]:
    """Before/after table of the launcher's held-out measurement (launch/heldout.py)."""
    lines = ["## Held-out accuracy (greedy pass@1, test split)", ""]
    lines += [
        "| | weight version | strict | lenient | format rate | mean length |",
        "|---|---|---|---|---|---|",
    ]
    for when in ("before", "after"):
        m = data.get(when)
        if not m:
            continue
        lines.append(
            f"| {when} | {m.get('weight_version')} | {m.get('greedy/pass@1_strict', float('nan')):.3f} | "
            f"{m.get('greedy/pass@1_lenient', float('nan')):.3f} | {m.get('greedy/format_rate', float('nan')):.3f} | "
            f"{m.get('greedy/mean_length', float('nan')):.1f} |"
        )
    if data.get("before") and data.get("after"):
        d = data["after"]["greedy/pass@1_strict"] - data["before"]["greedy/pass@1_strict"]
        lines.append("")
        lines.append(
            f"Change (strict): {d * 100:+.1f} points on {int(data['after'].get('num_problems', 0))} problems."
        )
    return [*lines, ""]


def write_report(run_dir: str | Path) -> Path:
    """Write the plots and report.md of ``run_dir``; returns the markdown path."""
    run_dir = Path(run_dir)
    rows = load_rows(run_dir)
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    rewards = reward_series(rows)
    acc = metric_series(rows, "acc")
    length = metric_series(rows, "len")
    tps = metric_series(rows, "tok/s")
    trunc = _key_series(rows, "truncated/frac")
    times = {
        name: _key_series(rows, key)
        for name, key in (
            ("step", "time/step"),
            ("generate (rollout side)", "time/generate"),
            ("wait for rollouts (trainer idle)", "time/wait_rollout"),
            ("train", "time/train"),
            ("weight sync", "time/sync"),
        )
        if any(key in r for r in rows)
    }
    plots = {
        "rewards.png": _plot(
            out / "rewards.png", "Reward per function (mean over completions)", "reward", rewards
        ),
        "accuracy.png": _plot(
            out / "accuracy.png", "Accuracy (correctness reward)", "accuracy", {"accuracy": acc}
        ),
        "completion_length.png": _plot(
            out / "completion_length.png", "Completion length", "tokens", {"completion length": length}
        ),
        "truncation.png": _plot(
            out / "truncation.png",
            "Completions cut at max_completion_length",
            "fraction",
            {"truncated": trunc},
        ),
        "step_time.png": _plot(out / "step_time.png", "Time per step", "seconds", times),
    }
    lines = [f"# Run report: {run_dir.name}", ""]
    if not rows:
        lines += ["No metrics yet (metrics.jsonl is missing or empty).", ""]
    else:
        lines += [f"Steps logged: {len(rows)} (step {rows[0]['step']} to {rows[-1]['step']}).", ""]
        lines += [
            "| metric | first | last | best | mean, first 10% of steps | mean, last 10% of steps |",
            "|---|---|---|---|---|---|",
        ]
        for name, pts in rewards.items():
            lines.append(_row(f"reward: {name}", pts))
        lines.append(_row("accuracy", acc))
        lines.append(_row("completion length", length, higher_is_better=False))
        lines.append(_row("tokens/s", tps))
        lines.append(_row("truncated fraction", trunc, higher_is_better=False))
        for name, pts in times.items():
            lines.append(_row(f"seconds: {name}", pts, higher_is_better=False))
        evals = sorted(k for k in rows[-1] if k.startswith("eval/") and _finite(rows[-1][k]))
        for k in evals:
            lines.append(_row(k, [(r["step"], float(r[k])) for r in rows if _finite(r.get(k))]))
        lines.append("")
    heldout = run_dir / "heldout.json"
    if heldout.exists():
        lines += _heldout_lines(json.loads(heldout.read_text()))
    for name, ok in plots.items():
        if ok:
            lines.append(f"![{name}](report/{name})")
    md = run_dir / "report.md"
    md.write_text("\n".join(lines) + "\n")
    return md


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Write RUN_DIR/report.md and plots from RUN_DIR/metrics.jsonl.")
    p.add_argument("run_dir", help="run folder (with metrics.jsonl)")
    args = p.parse_args(argv)
    if not Path(args.run_dir).is_dir():
        raise SystemExit(f"no such run folder: {args.run_dir}")
    print(write_report(args.run_dir))


if __name__ == "__main__":
    main()
