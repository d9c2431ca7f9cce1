"""Which warm-start source to use for a model: measure what each would give, on TRAIN problems only.

    python scripts/warm_start_sources.py --config configs/smollm2-135m-gsm8k-cpu.yaml [--prompts 32] [--samples 8]

``warm_start.source`` (trainer/sft.py) can be ``sample`` (the model's own completions, kept when strictly
correct AND in the strict answer format) or ``gsm8k_solutions`` (GSM8K's worked solutions rewritten into the
format). This script starts a rollout server on the config's (converted) base model, samples ``--samples``
completions for each of the first ``--prompts`` train problems with the run's own sampling settings (the
prompts a ``sample`` warm start would use), and prints, as JSON and as a table:
- how many completions are strictly correct, how many are in the strict format, how many are both (what
  ``sample`` would keep), and the kept examples per prompt and per minute of sampling;
- how many worked solutions ``gsm8k_solutions`` has for the same prompts (no sampling needed).
The test split is never read.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--prompts", type=int, default=32, help="first N train problems")
    p.add_argument("--samples", type=int, default=8, help="completions per problem")
    p.add_argument("--backend", default="auto", help="rollout server backend (auto: vLLM where installed)")
    p.add_argument("--out", default=None, help="write the JSON summary here too")
    p.add_argument("overrides", nargs="*", help="dotted.key=value config overrides")
    a = p.parse_args(argv)

    from transformers import AutoTokenizer

    from rollout_server.client import RolloutClient
    from rollout_server.protocol import GenerateRequest
    from trainer import data
    from trainer.config import load_config
    from trainer.engine_setup import resolve_model_path
    from trainer.eval import rollout_server
    from trainer.eval_scoring import score_completion
    from trainer.rewards import FORMATS, strict_format_score

    cfg = load_config(a.config, a.overrides)
    model = str(resolve_model_path(cfg, True))
    tok = AutoTokenizer.from_pretrained(model)
    rows = data.load_prompts(cfg.data, tok, "train").rows[: a.prompts]
    fmt = FORMATS[cfg.data.prompt_format]
    g = cfg.generation
    server_args = list(cfg.launch.server_extra_args)
    counts = {"completions": 0, "correct": 0, "strict_format": 0, "kept": 0, "truncated": 0}
    prompts_with_kept = 0
    print(f"sampling {a.samples} x {len(rows)} train problems from {model}", flush=True)
    with rollout_server(model, backend=a.backend, extra_args=server_args) as url:
        client = RolloutClient(url, timeout_s=cfg.rollout.request_timeout_s)
        t0 = time.monotonic()
        for b0 in range(0, len(rows), 8):
            batch = rows[b0 : b0 + 8]
            req = GenerateRequest(
                prompt_token_ids=[list(r["prompt_ids"]) for r in batch],
                n=a.samples,
                temperature=g.temperature,
                max_tokens=g.max_completion_length,
                seed=cfg.run.seed + b0,
            )
            kept_here = set()
            for c in client.generate(req).completions:
                r = batch[c.prompt_index]
                correct = score_completion(c.text, str(r["gold"])).strict
                formatted = strict_format_score(c.text, None, fmt) > 0
                counts["completions"] += 1
                counts["correct"] += correct
                counts["strict_format"] += formatted
                counts["truncated"] += c.finish_reason == "length"
                if correct and formatted and c.finish_reason == "stop":
                    counts["kept"] += 1
                    kept_here.add(c.prompt_index)
            prompts_with_kept += len(kept_here)
            done = counts["completions"]
            print(f"  {done}/{len(rows) * a.samples} completions, kept {counts['kept']}", flush=True)
        minutes = (time.monotonic() - t0) / 60
        client.close()
    solutions = sum(1 for r in rows if r.get("solution"))
    n = max(counts["completions"], 1)
    summary = {
        "model": model,
        "prompts": len(rows),
        "samples_per_prompt": a.samples,
        "max_tokens": g.max_completion_length,
        "temperature": g.temperature,
        "sample": {
            **counts,
            "correct_frac": counts["correct"] / n,
            "strict_format_frac": counts["strict_format"] / n,
            "kept_frac": counts["kept"] / n,
            "prompts_with_a_kept_example": prompts_with_kept,
            "sampling_minutes": minutes,
            "kept_per_minute": counts["kept"] / minutes if minutes else 0.0,
        },
        "gsm8k_solutions": {"examples": solutions, "prompts_with_a_kept_example": solutions},
    }
    print(json.dumps(summary, indent=1))
    s = summary["sample"]
    print("\n| source | examples from these prompts | cost |\n|---|---|---|")
    print(
        f"| sample ({a.samples} per prompt, T={g.temperature}) | {s['kept']} kept of {s['completions']} "
        f"(correct {s['correct_frac']:.1%}, strict format {s['strict_format_frac']:.1%}, "
        f"{s['prompts_with_a_kept_example']} of {len(rows)} prompts) | {minutes:.1f} min of sampling |"
    )
    every = " (every prompt)" if solutions == len(rows) else f" of {len(rows)} prompts"
    print(f"| gsm8k_solutions | {solutions}{every} | none |")
    if a.out:
        Path(a.out).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
