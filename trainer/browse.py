"""Browse a run's sampled completions: ``python -m trainer.browse RUN_DIR [--step N] [--correct|--incorrect]``.

Reads RUN_DIR/completions.jsonl (written by the trainer every ``logging.completions_every_steps`` steps) and
prints each completion with its prompt, gold answer, rewards and the weight version that produced it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trainer.metrics_log import read_jsonl


def is_correct(row: dict) -> bool:
    """A completion counts as correct when its correctness reward is > 0."""
    rewards = row.get("rewards") or {}
    return float(rewards.get("correctness", 0.0) or 0.0) > 0.0


def select(
    rows: list[dict], step: int | None = None, correct: bool | None = None, limit: int | None = None
) -> list[dict]:
    out = [
        r
        for r in rows
        if (step is None or r.get("step") == step) and (correct is None or is_correct(r) == correct)
    ]
    return out[:limit] if limit else out


def render(row: dict, width: int = 100) -> str:
    rewards = row.get("rewards") or {}
    reward_txt = ", ".join(f"{k}={float(v):.3g}" for k, v in rewards.items()) if rewards else "-"
    prompt = row.get("prompt_text") or row.get("prompt") or ""
    if isinstance(prompt, list):  # chat messages
        prompt = "\n".join(f"[{m.get('role')}] {m.get('content')}" for m in prompt)
    head = (
        f"step {row.get('step')}  weight_version {row.get('weight_version')}  group {row.get('group')}"
        f"  #{row.get('index')}  tokens {row.get('num_tokens')}  finish {row.get('finish_reason')}"
        f"  advantage {row.get('advantage', float('nan')):.3f}"
    )
    return "\n".join(
        [
            "=" * width,
            head,
            f"rewards: total={float(row.get('reward', 0.0)):.3g} ({reward_txt})  gold: {row.get('gold')}"
            f"  {'CORRECT' if is_correct(row) else 'incorrect'}",
            "-" * width,
            "PROMPT: " + str(prompt)[-2000:],
            "-" * width,
            str(row.get("completion", "")),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Print sampled completions of a GRPO run readably.")
    p.add_argument("run_dir", type=Path, help="run folder (holding completions.jsonl)")
    p.add_argument("--step", type=int, default=None, help="only this step")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--correct", action="store_true", help="only completions with correctness > 0")
    g.add_argument("--incorrect", action="store_true", help="only completions with correctness <= 0")
    p.add_argument("--limit", type=int, default=20, help="print at most this many (0 = all)")
    p.add_argument("--steps", action="store_true", help="list the logged steps and their accuracy, then exit")
    a = p.parse_args(argv)
    path = a.run_dir / "completions.jsonl" if a.run_dir.is_dir() else a.run_dir
    if not path.exists():
        print(f"no completions file at {path}", file=sys.stderr)
        return 1
    rows = read_jsonl(path)
    if a.steps:
        by_step: dict[int, list[bool]] = {}
        for r in rows:
            by_step.setdefault(int(r.get("step", -1)), []).append(is_correct(r))
        for s, flags in sorted(by_step.items()):
            print(f"step {s}: {len(flags)} completions, accuracy {sum(flags) / len(flags):.3f}")
        return 0
    correct = True if a.correct else False if a.incorrect else None
    chosen = select(rows, a.step, correct, a.limit or None)
    for r in chosen:
        print(render(r))
    print(f"({len(chosen)} shown of {len(rows)} logged)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
