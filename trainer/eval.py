"""GSM8K evaluation through a rollout server: greedy pass@1 and sampled pass@k, STRICT and LENIENT.

    python -m trainer.eval --model DIR_OR_HUB_ID [--server-url URL] [--compare MODEL2 [--compare-server-url URL2]]
        [--split test] [--limit N] [--k 8] [--temperature 1.0] [--max-tokens 512]
        [--prompt-format reasoning|think] [--output results.jsonl] [--backend auto|torch|vllm]
        [--gsm8k-source hub|arithmetic|DIR]
    make eval MODEL=DIR_OR_HUB_ID ARGS="--limit 200 --k 8 --compare runs/NAME/checkpoints/step-000100/hf"

Without ``--server-url`` a rollout server is started for the job (``python -m rollout_server``, loopback, a
free port) and stopped after; with it, the running server is used (it must serve the same model: the
prompts are built with ``--model``'s tokenizer and chat template).

What is measured, per model (scoring rules in trainer/eval_scoring.py):
- greedy pass@1 (temperature 0, one completion) scored STRICT (the number in ``<answer>`` equals gold) and
  LENIENT (the last number in the text equals gold), each with a 95% Wilson interval;
- sampled pass@k (``k`` completions at ``--temperature``; the unbiased estimator), with a 95% percentile
  bootstrap interval over problems, and the sampled pass@1 (mean fraction correct);
- format compliance (reasoning block then answer block), mean completion length in tokens, and the
  truncation rate (completions cut at ``--max-tokens``: a high rate means the cap, not the model, decides
  the score; FIELD.md).
Per-problem records go to ``--output`` (JSONL) and the metrics to ``<output>.summary.json``; ``--compare``
evaluates a second model on the same problems and prints both in one table.

For periodic evaluation inside training, ``evaluate_with_client(client, rows, ...)`` runs the same
measurement through an existing ``RolloutClient`` and returns a flat dict of floats.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.eval_scoring import bootstrap_interval, pass_at_k, score_completion, wilson_interval


# ---- problems -------------------------------------------------------------------------------------------------
@dataclass
class EvalProblem:
    """One problem as the evaluator needs it: a ready prompt and the gold answer."""

    prompt: str  # chat-formatted prompt text, ends where the model's answer starts
    gold: str  # gold answer, a number as text
    question: str = ""  # the raw question, for the per-problem records
    prefill: str = ""  # text the prompt already opened the answer with (prepended before scoring)
    index: int = 0  # position in the split


def as_problems(rows: Sequence[Any]) -> list[EvalProblem]:
    """Accept EvalProblem objects or the trainer's prompt rows (trainer/data.py: ``prompt_text`` and ``gold``;
    a dict whose ``prompt`` is already text also works)."""
    out = []
    for i, r in enumerate(rows):
        if isinstance(r, EvalProblem):
            out.append(r)
            continue
        if not isinstance(r, dict):
            raise TypeError(f"row {i}: expected a dict or EvalProblem, got {type(r).__name__}")
        prompt = r.get("prompt_text") if isinstance(r.get("prompt_text"), str) else r.get("prompt")
        if not isinstance(prompt, str) or r.get("gold") is None:
            raise ValueError(
                f"row {i}: needs a text 'prompt_text' (or 'prompt') and a 'gold', got keys {sorted(r)}"
            )
        out.append(
            EvalProblem(
                prompt=prompt,
                gold=str(r["gold"]),
                question=str(r.get("question") or ""),
                prefill=str(r.get("prefill") or ""),
                index=int(r.get("index", i)),
            )
        )
    return out


# ---- measuring ------------------------------------------------------------------------------------------------
@dataclass
class EvalSettings:
    """How one evaluation samples (the CLI flags and the trainer's EvalConfig map onto this)."""

    k: int = 8  # samples per problem for pass@k (0 = greedy only)
    temperature: float = 1.0  # sampling temperature of the pass@k samples
    top_p: float = 1.0
    max_tokens: int = 512
    greedy: bool = True  # also measure greedy pass@1
    batch_prompts: int = 16  # prompts per /generate request
    seed: int = 0
    stop: list[str] = field(default_factory=list)


@dataclass
class EvalResult:
    metrics: dict[str, float]
    records: list[dict[str, Any]]


def _generate(client, prompts: list[str], n: int, temperature: float, s: EvalSettings, seed: int | None):
    from rollout_server.protocol import GenerateRequest

    req = GenerateRequest(
        prompts=prompts,
        n=n,
        temperature=temperature,
        top_p=s.top_p if temperature > 0 else 1.0,
        max_tokens=s.max_tokens,
        seed=seed,
        stop=list(s.stop),
    )
    return client.generate(req).completions  # prompt-major: n per prompt


def _score(problem: EvalProblem, c) -> dict[str, Any]:
    sc = score_completion(problem.prefill + c.text, problem.gold)
    return {
        "text": c.text,
        "strict": sc.strict,
        "lenient": sc.lenient,
        "formatted": sc.formatted,
        "strict_answer": sc.strict_answer,
        "lenient_answer": sc.lenient_answer,
        "num_tokens": len(c.token_ids),
        "truncated": c.finish_reason == "length",
    }


def run_eval(
    client,
    rows: Sequence[Any],
    settings: EvalSettings | None = None,
    progress: bool = False,
    desc: str = "eval",
) -> EvalResult:
    """Evaluate every problem through ``client`` (a RolloutClient); returns metrics and per-problem records."""
    s = settings or EvalSettings()
    problems = as_problems(rows)
    if not problems:
        raise ValueError("no problems to evaluate")
    if not s.greedy and s.k < 1:
        raise ValueError("nothing to measure: greedy is off and k is 0")
    records: list[dict[str, Any]] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(problems), desc=desc, unit="problem", file=sys.stderr, dynamic_ncols=True)
    for b0 in range(0, len(problems), s.batch_prompts):
        batch = problems[b0 : b0 + s.batch_prompts]
        prompts = [p.prompt for p in batch]
        greedy = _generate(client, prompts, 1, 0.0, s, None) if s.greedy else []
        # A distinct, reproducible seed per request: the same run gives the same samples.
        sampled = _generate(client, prompts, s.k, s.temperature, s, s.seed + b0) if s.k > 0 else []
        for j, p in enumerate(batch):
            rec: dict[str, Any] = {"index": p.index, "question": p.question, "gold": p.gold}
            if s.greedy:
                rec["greedy"] = _score(p, greedy[j])
            if s.k > 0:
                samples = [_score(p, c) for c in sampled[j * s.k : (j + 1) * s.k]]
                rec["samples"] = samples
                rec["n_correct_strict"] = sum(x["strict"] for x in samples)
                rec["n_correct_lenient"] = sum(x["lenient"] for x in samples)
            records.append(rec)
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    return EvalResult(metrics=summarize(records, s.k), records=records)


def summarize(records: list[dict[str, Any]], k: int) -> dict[str, float]:
    """Flat metrics (floats) from per-problem records; see the module docstring for their meaning."""
    m: dict[str, float] = {"num_problems": float(len(records))}
    greedy = [r["greedy"] for r in records if "greedy" in r]
    if greedy:
        n = len(greedy)
        for rule in ("strict", "lenient"):
            hits = sum(g[rule] for g in greedy)
            lo, hi = wilson_interval(hits, n)
            m[f"greedy/pass@1_{rule}"] = hits / n
            m[f"greedy/pass@1_{rule}_lo"], m[f"greedy/pass@1_{rule}_hi"] = lo, hi
        m["greedy/format_rate"] = sum(g["formatted"] for g in greedy) / n
        m["greedy/mean_length"] = sum(g["num_tokens"] for g in greedy) / n
        m["greedy/truncation_rate"] = sum(g["truncated"] for g in greedy) / n
    sampled = [r for r in records if r.get("samples")]
    if sampled and k > 0:
        m["sampled/k"] = float(k)
        flat = [x for r in sampled for x in r["samples"]]
        for rule in ("strict", "lenient"):
            per_problem = [pass_at_k(len(r["samples"]), r[f"n_correct_{rule}"], k) for r in sampled]
            lo, hi = bootstrap_interval(per_problem)
            m[f"sampled/pass@{k}_{rule}"] = sum(per_problem) / len(per_problem)
            m[f"sampled/pass@{k}_{rule}_lo"], m[f"sampled/pass@{k}_{rule}_hi"] = lo, hi
            m[f"sampled/pass@1_{rule}"] = sum(x[rule] for x in flat) / len(flat)
        m["sampled/format_rate"] = sum(x["formatted"] for x in flat) / len(flat)
        m["sampled/mean_length"] = sum(x["num_tokens"] for x in flat) / len(flat)
        m["sampled/truncation_rate"] = sum(x["truncated"] for x in flat) / len(flat)
    return m


def evaluate_with_client(
    client,
    rows: Sequence[Any],
    k: int = 0,
    temperature: float = 1.0,
    max_tokens: int = 512,
    greedy: bool = True,
    batch_prompts: int = 16,
    seed: int = 0,
    top_p: float = 1.0,
) -> dict[str, float]:
    """Periodic evaluation for the trainer: metrics of ``rows`` (dicts with text ``prompt`` and ``gold``)
    through an existing RolloutClient, e.g. ``logger.log(step, {f"eval/{k}": v for k, v in m.items()})``.
    Greedy only by default (k=0), the cheapest stable number to track during training."""
    s = EvalSettings(
        k=k,
        temperature=temperature,
        top_p=top_p,
        max_tokens=max_tokens,
        greedy=greedy,
        batch_prompts=batch_prompts,
        seed=seed,
    )
    return run_eval(client, rows, s).metrics


# ---- problems from GSM8K --------------------------------------------------------------------------------------
def data_config(source: str, split: str, limit: int | None, prompt_format: str):
    """The trainer's DataConfig for an evaluation: ``source`` is "hub" (openai/gsm8k), "arithmetic" (the
    synthetic task) or a folder holding ``{split}.jsonl``."""
    from trainer.data import DataConfig

    # Evaluation keeps every problem: the trainer's prompt-length filter would silently shrink the test set.
    common = dict(prompt_format=prompt_format, max_prompt_length=131_072, limit_test=limit, limit_train=limit)
    if source in ("hub", "arithmetic"):
        return DataConfig(source=source, **common)
    folder = Path(source)
    path = folder / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found (--gsm8k-source is 'hub', 'arithmetic' or a folder with {split}.jsonl)"
        )
    return DataConfig(source="jsonl", train_path=str(folder / "train.jsonl"), test_path=str(path), **common)


def load_problems(
    model: str, split: str, limit: int | None, prompt_format: str, source: str
) -> list[EvalProblem]:
    """The problems of ``split`` (first ``limit``), prompts built with ``model``'s tokenizer exactly as in training."""
    from transformers import AutoTokenizer

    from trainer.data import load_prompts

    tok = AutoTokenizer.from_pretrained(model)
    rows = load_prompts(data_config(source, split, limit, prompt_format), tok, split).rows
    return [
        EvalProblem(prompt=r["prompt_text"], gold=r["gold"], question=r["question"], index=i)
        for i, r in enumerate(rows)
    ]


# ---- a rollout server for the job -----------------------------------------------------------------------------
@contextlib.contextmanager
def rollout_server(
    model: str, backend: str = "auto", startup_timeout_s: float = 600.0, extra_args: Sequence[str] = ()
) -> Iterator[str]:
    """Start ``python -m rollout_server`` on a free loopback port, yield its URL, stop it (and its engine) after.

    Fails with the server's last output when it exits or is not ready within ``startup_timeout_s``."""
    from rollout_server.spawn import ServerProcess

    with ServerProcess(model, backend=backend, extra_args=extra_args) as server:
        yield server.wait_ready(startup_timeout_s)


# ---- CLI ------------------------------------------------------------------------------------------------------
def _pct(m: dict[str, float], key: str) -> str:
    if key not in m:
        return "-"
    if f"{key}_lo" in m:
        return f"{100 * m[key]:5.1f}% [{100 * m[key + '_lo']:.1f}, {100 * m[key + '_hi']:.1f}]"
    return f"{100 * m[key]:5.1f}%"


def format_table(results: dict[str, dict[str, float]], k: int) -> str:
    """One column per model: accuracies with 95% intervals, format, length, truncation."""
    rows = [
        ("greedy pass@1 STRICT", lambda m: _pct(m, "greedy/pass@1_strict")),
        ("greedy pass@1 LENIENT", lambda m: _pct(m, "greedy/pass@1_lenient")),
        (f"sampled pass@{k} STRICT", lambda m: _pct(m, f"sampled/pass@{k}_strict")),
        (f"sampled pass@{k} LENIENT", lambda m: _pct(m, f"sampled/pass@{k}_lenient")),
        ("sampled pass@1 STRICT", lambda m: _pct(m, "sampled/pass@1_strict")),
        ("sampled pass@1 LENIENT", lambda m: _pct(m, "sampled/pass@1_lenient")),
        ("format compliance (greedy)", lambda m: _pct(m, "greedy/format_rate")),
        ("format compliance (sampled)", lambda m: _pct(m, "sampled/format_rate")),
        (
            "mean length, tokens (greedy)",
            lambda m: f"{m['greedy/mean_length']:.1f}" if "greedy/mean_length" in m else "-",
        ),
        ("truncated at cap (greedy)", lambda m: _pct(m, "greedy/truncation_rate")),
        ("truncated at cap (sampled)", lambda m: _pct(m, "sampled/truncation_rate")),
        ("problems", lambda m: str(int(m["num_problems"]))),
    ]
    names = list(results)
    w0 = max(len(r[0]) for r in rows)
    cols = [[fn(results[n]) for _, fn in rows] for n in names]
    widths = [max(len(n), *(len(c) for c in col)) for n, col in zip(names, cols, strict=True)]
    lines = [" | ".join([" " * w0] + [n.rjust(w) for n, w in zip(names, widths, strict=True)])]
    lines.append("-+-".join(["-" * w0] + ["-" * w for w in widths]))
    for i, (label, _) in enumerate(rows):
        lines.append(
            " | ".join([label.ljust(w0)] + [col[i].rjust(w) for col, w in zip(cols, widths, strict=True)])
        )
    return "\n".join(lines)


def evaluate_model(
    model: str, server_url: str | None, args: argparse.Namespace, settings: EvalSettings
) -> EvalResult:
    from rollout_server.client import RolloutClient

    problems = load_problems(model, args.split, args.limit, args.prompt_format, args.gsm8k_source)
    ctx = (
        contextlib.nullcontext(server_url)
        if server_url
        else rollout_server(model, args.backend, args.startup_timeout, shlex.split(args.server_args))
    )
    with ctx as url:
        client = RolloutClient(url, timeout_s=args.request_timeout)
        try:
            return run_eval(
                client, problems, settings, progress=not args.no_progress, desc=Path(model).name or model
            )
        finally:
            client.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="GSM8K accuracy of a model through a rollout server.")
    p.add_argument("--model", required=True, help="HF folder or hub id (its tokenizer builds the prompts)")
    p.add_argument("--server-url", default=None, help="use this running server (default: start one)")
    p.add_argument("--compare", default=None, help="a second model evaluated on the same problems")
    p.add_argument("--compare-server-url", default=None, help="running server of --compare")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--limit", type=int, default=None, help="first N problems (default: all)")
    p.add_argument(
        "--gsm8k-source",
        default="hub",
        help="'hub' (openai/gsm8k), 'arithmetic', or a folder with {split}.jsonl",
    )
    p.add_argument("--k", type=int, default=8, help="samples per problem for pass@k (0 = greedy only)")
    p.add_argument("--temperature", type=float, default=1.0, help="temperature of the pass@k samples")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=512, help="completion token cap")
    p.add_argument("--no-greedy", action="store_true", help="skip greedy pass@1")
    p.add_argument(
        "--prompt-format",
        default="reasoning",
        choices=["reasoning", "think"],
        help="system prompt format (trainer.data)",
    )
    p.add_argument("--batch-prompts", type=int, default=16, help="prompts per /generate request")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="per-problem JSONL (+ <output>.summary.json)")
    p.add_argument(
        "--backend", default="auto", choices=["auto", "torch", "vllm"], help="backend of a started server"
    )
    p.add_argument(
        "--startup-timeout", type=float, default=900.0, help="seconds to wait for a started server"
    )
    p.add_argument(
        "--server-args",
        default="",
        help='extra arguments of a started server, one string (e.g. "--max-model-len 1024")',
    )
    p.add_argument("--request-timeout", type=float, default=1800.0, help="seconds per /generate request")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.limit is not None and a.limit < 1:
        p.error("--limit must be >= 1")
    if a.k < 0 or (a.k == 0 and a.no_greedy):
        p.error("--k must be >= 0, and > 0 with --no-greedy")
    settings = EvalSettings(
        k=a.k,
        temperature=a.temperature,
        top_p=a.top_p,
        max_tokens=a.max_tokens,
        greedy=not a.no_greedy,
        batch_prompts=a.batch_prompts,
        seed=a.seed,
    )
    from trainer.model_source import resolve_model_source  # pypi:... sources become converted folders

    a.model = resolve_model_source(a.model)
    if a.compare:
        a.compare = resolve_model_source(a.compare)
    jobs = [(a.model, a.server_url)] + ([(a.compare, a.compare_server_url)] if a.compare else [])
    results: dict[str, dict[str, float]] = {}
    out = open(a.output, "w") if a.output else None  # noqa: SIM115
    try:
        for model, url in jobs:
            res = evaluate_model(model, url, a, settings)
            name = model if model not in results else f"{model} (2)"
            results[name] = res.metrics
            if out:
                for rec in res.records:
                    out.write(json.dumps({"model": model, **rec}) + "\n")
    finally:
        if out:
            out.close()
    if a.output:
        Path(a.output + ".summary.json").write_text(
            json.dumps({"settings": vars(a), "results": results}, indent=2)
        )
    print(format_table(results, a.k))
    return 0


if __name__ == "__main__":
    sys.exit(main())
