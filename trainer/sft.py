"""Supervised warm start: teach the answer format (and some correct answers) before GRPO.

    python -m trainer.sft --config configs/X.yaml [--out DIR] [dotted.key=value ...]

Why: R1-Zero starts GRPO from the base model and waits for the format reward to appear by chance; with a
small model that can take hundreds of steps or never happen (every reward zero, no gradient). A short
supervised pass on correct, well-formatted completions makes the format reward non-zero from step one. This
is the "cold start" of DeepSeek-R1 (not R1-Zero), kept optional (``warm_start.enabled``).

Where the examples come from (``warm_start.source``):
- ``sample``: rejection sampling from the current model through a rollout server: ``samples_per_prompt``
  completions per training prompt, kept when STRICT-correct and well formatted (trainer/eval_scoring.py),
  deduplicated, at most ``max_per_prompt`` per prompt;
- ``completions_file``: a finished run's completions.jsonl, rows whose correctness reward is positive and
  whose strict-format reward is positive (or, without one, that pass our format check);
- ``arithmetic_solutions``: the synthetic arithmetic task's gold worked solutions
  (``trainer.data.arithmetic_solution_text``), for the CPU demo where the tiny model never samples one;
- ``gsm8k_solutions``: GSM8K's own worked solutions from the TRAIN split, rewritten into the answer format
  (``trainer.data.gsm8k_solution_text``: the steps are the reasoning, the number after ``####`` the answer).

Training is our own short loop (no TRL SFTTrainer: one less moving part, works offline): AdamW on
prompt + completion + EOS, the loss the mean negative log-likelihood of the completion tokens only
(prompt tokens are context, never targets), log-probs from trainer/logprobs.py (chunked, so a 150k vocab
never materialises full-batch float32 logits). The result is saved as a Hugging Face folder that the GRPO
run then loads as its ``model.name_or_path``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.eval_scoring import score_completion


@dataclass(frozen=True)
class SFTExample:
    """One training pair: the chat-formatted prompt text and the completion the model should write."""

    prompt: str
    completion: str


# ---- example sources ------------------------------------------------------------------------------------------
def dedupe_and_cap(examples: Sequence[SFTExample], max_per_prompt: int) -> list[SFTExample]:
    """Drop exact duplicates (same prompt and completion) and keep at most ``max_per_prompt`` per prompt."""
    seen: set[tuple[str, str]] = set()
    per_prompt: dict[str, int] = {}
    out = []
    for ex in examples:
        key = (ex.prompt, ex.completion.strip())
        if key in seen or per_prompt.get(ex.prompt, 0) >= max_per_prompt:
            continue
        seen.add(key)
        per_prompt[ex.prompt] = per_prompt.get(ex.prompt, 0) + 1
        out.append(ex)
    return out


def keep_completion(text: str, gold: str, prompt_format: str = "reasoning") -> bool:
    """A completion worth imitating: STRICT-correct and earning the trainer's strict format reward."""
    from trainer.rewards import FORMATS, strict_format_score

    return score_completion(text, gold).strict and strict_format_score(text, gold, FORMATS[prompt_format]) > 0


def format_reward(completions: Sequence[str], prompt_format: str = "reasoning") -> float:
    """Mean of the trainer's strict + soft format rewards (0 to 1 per completion): how well a model has the
    answer format, the number a warm start must raise."""
    from trainer.rewards import FORMATS, soft_format_score, strict_format_score

    fmt = FORMATS[prompt_format]
    if not completions:
        raise ValueError("no completions")
    return sum(
        strict_format_score(t, None, fmt) + soft_format_score(t, None, fmt) for t in completions
    ) / len(completions)


def keep_format(text: str) -> bool:
    """Format check of a logged completion without a strict_format reward: either prompt format passes."""
    from trainer.rewards import FORMATS, strict_format_score

    return any(strict_format_score(text, None, f) > 0 for f in FORMATS.values())


def from_completions_file(path: str | Path, max_per_prompt: int, tokenizer=None) -> list[SFTExample]:
    """Correct, well-formatted completions of a finished run's completions.jsonl."""
    from trainer.metrics_log import read_jsonl

    examples = []
    for row in read_jsonl(Path(path)):
        text = row.get("completion")
        prompt = row.get("prompt_text") or row.get("prompt")
        if not isinstance(text, str) or prompt is None:
            continue
        if isinstance(prompt, list):  # chat messages: render them as the trainer did
            if tokenizer is None:
                continue
            prompt = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        rewards = row.get("rewards") or {}
        correct = (
            float(rewards["correctness"]) > 0
            if "correctness" in rewards
            else (row.get("gold") is not None and score_completion(text, str(row["gold"])).strict)
        )
        formatted = float(rewards["strict_format"]) > 0 if "strict_format" in rewards else keep_format(text)
        if correct and formatted:
            examples.append(SFTExample(prompt=str(prompt), completion=text))
    return dedupe_and_cap(examples, max_per_prompt)


def by_rejection_sampling(
    client,
    problems: Sequence[Any],
    samples_per_prompt: int,
    max_per_prompt: int,
    temperature: float = 1.0,
    max_tokens: int = 256,
    seed: int = 0,
    batch_prompts: int = 16,
    prompt_format: str = "reasoning",
) -> list[SFTExample]:
    """Sample ``samples_per_prompt`` completions per problem (dicts with text ``prompt`` and ``gold``) through a
    RolloutClient and keep the correct, well-formatted ones (deduplicated, capped per prompt)."""
    from rollout_server.protocol import GenerateRequest

    examples = []
    for b0 in range(0, len(problems), batch_prompts):
        batch = problems[b0 : b0 + batch_prompts]
        req = GenerateRequest(
            prompts=[p["prompt"] for p in batch],
            n=samples_per_prompt,
            temperature=temperature,
            max_tokens=max_tokens,
            seed=seed + b0,
        )
        comps = client.generate(req).completions  # prompt-major
        for c in comps:
            p = batch[c.prompt_index]
            if c.finish_reason == "stop" and keep_completion(c.text, str(p["gold"]), prompt_format):
                examples.append(SFTExample(prompt=p["prompt"], completion=c.text))
    return dedupe_and_cap(examples, max_per_prompt)


# ---- training -------------------------------------------------------------------------------------------------
def tokenize_examples(
    tokenizer, examples: Sequence[SFTExample], max_len: int
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids + EOS) per example; too-long ones are cut from the completion's end."""
    eos = tokenizer.eos_token_id
    out = []
    for ex in examples:
        p = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
        c = tokenizer(ex.completion, add_special_tokens=False)["input_ids"] + [eos]
        room = max_len - len(p)
        if room < 1:
            continue  # a prompt that alone exceeds the budget teaches nothing
        out.append((p, c[:room]))
    return out


def _batch_tensors(batch: Sequence[tuple[list[int], list[int]]], pad_id: int):
    """Left-padded prompts + right-padded completions, the layout of trainer/logprobs.completion_logprobs."""
    import torch

    p_len = max(len(p) for p, _ in batch)
    c_len = max(len(c) for _, c in batch)
    ids, attn, cmask = [], [], []
    for p, c in batch:
        ids.append([pad_id] * (p_len - len(p)) + p + c + [pad_id] * (c_len - len(c)))
        attn.append([0] * (p_len - len(p)) + [1] * (len(p) + len(c)) + [0] * (c_len - len(c)))
        cmask.append([1] * len(c) + [0] * (c_len - len(c)))
    return (
        torch.tensor(ids),  # [B, P + C]
        torch.tensor(attn),  # [B, P + C]
        torch.tensor(cmask, dtype=torch.float32),  # [B, C]
        c_len,
    )


def train_sft(
    model,
    tokenizer,
    examples: Sequence[SFTExample],
    epochs: int = 1,
    lr: float = 1e-5,
    batch_size: int = 8,
    max_len: int = 1024,
    seed: int = 0,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    log_every: int = 10,
) -> dict[str, float]:
    """Fine-tune ``model`` in place on ``examples`` (loss on completion tokens only); returns loss stats."""
    import torch

    from trainer.logprobs import completion_logprobs

    data = tokenize_examples(tokenizer, examples, max_len)
    if not data:
        raise ValueError("no usable warm-start examples (none collected, or every prompt exceeds max_len)")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay
    )
    rng = random.Random(seed)
    steps_per_epoch = math.ceil(len(data) / batch_size)
    total = epochs * steps_per_epoch
    # Linear warmup over the first 10% then constant: short runs, no schedule subtleties.
    warmup = max(1, total // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    model.train()
    first = last = float("nan")
    step = 0
    t0 = time.monotonic()
    for _ in range(epochs):
        order = list(range(len(data)))
        rng.shuffle(order)
        for b0 in range(0, len(order), batch_size):
            ids, attn, cmask, c_len = _batch_tensors([data[i] for i in order[b0 : b0 + batch_size]], pad_id)
            ids, attn, cmask = ids.to(device), attn.to(device), cmask.to(device)
            # bf16 autocast on GPU (weights and optimizer state stay float32); plain float32 on CPU.
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logp, _ = completion_logprobs(model, ids, attn, c_len)  # [B, C] float32
            loss = -(logp * cmask).sum() / cmask.sum()  # mean NLL per completion token
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            opt.step()
            sched.step()
            step += 1
            last = loss.item()
            if step == 1:
                first = last
            if log_every and (step % log_every == 0 or step == total):
                print(f"[sft] step {step}/{total} loss {last:.4f} ({time.monotonic() - t0:.0f}s)", flush=True)
    model.eval()
    return {
        "sft/steps": float(step),
        "sft/examples": float(len(data)),
        "sft/loss_first": first,
        "sft/loss_last": last,
    }


# ---- the warm start of a run ----------------------------------------------------------------------------------
def arithmetic_examples(tokenizer, data_cfg, n: int, seed: int = 0) -> list[SFTExample]:
    """``n`` training problems of the synthetic arithmetic task with their gold worked solutions."""
    from trainer import data

    ac = data_cfg.arithmetic
    problems = data.make_arithmetic_problems(n, seed, ac.min_digits, ac.max_digits, ac.ops, split="train")
    out = []
    for p in problems:
        msgs = data.build_messages(p["question"], data_cfg.prompt_format, data_cfg.system_prompt)
        prompt = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        out.append(
            SFTExample(prompt=prompt, completion=data.arithmetic_solution_text(p, data_cfg.prompt_format))
        )
    return dedupe_and_cap(out, max_per_prompt=1)


def gsm8k_examples(tokenizer, data_cfg, n: int) -> list[SFTExample]:
    """The first ``n`` usable TRAIN prompts with their worked solutions in the answer format."""
    from trainer import data

    rows = [r for r in data.load_prompts(data_cfg, tokenizer, "train").rows if r.get("solution")][:n]
    if not rows:
        raise ValueError(
            f"warm_start.source=gsm8k_solutions: no worked solutions in '{data_cfg.answer_field}'"
        )
    out = [
        SFTExample(
            prompt=r["prompt_text"],
            completion=data.gsm8k_solution_text(r["solution"], r["gold"], data_cfg.prompt_format),
        )
        for r in rows
    ]
    return dedupe_and_cap(out, max_per_prompt=1)


def collect_examples(cfg, tokenizer, model_dir: str | None = None, client=None) -> list[SFTExample]:
    """The examples ``cfg.warm_start.source`` names (see the module docstring)."""
    from trainer import data

    ws = cfg.warm_start
    if ws.source == "completions_file":
        if not ws.completions_file:
            raise ValueError(
                "warm_start.completions_file must be set when warm_start.source is completions_file"
            )
        return from_completions_file(ws.completions_file, ws.max_per_prompt, tokenizer)
    if ws.source == "arithmetic_solutions":
        return arithmetic_examples(tokenizer, cfg.data, ws.num_prompts, seed=cfg.data.seed)
    if ws.source == "gsm8k_solutions":
        return gsm8k_examples(tokenizer, cfg.data, ws.num_prompts)
    # source == "sample": rejection sampling from the current model through a rollout server.
    rows = data.load_prompts(cfg.data, tokenizer, "train").rows[: ws.num_prompts]
    problems = [{"prompt": r["prompt_text"], "gold": r["gold"]} for r in rows]
    kwargs = dict(
        samples_per_prompt=ws.samples_per_prompt,
        max_per_prompt=ws.max_per_prompt,
        temperature=cfg.generation.temperature,
        max_tokens=cfg.generation.max_completion_length,
        seed=cfg.run.seed,
        prompt_format=cfg.data.prompt_format,
    )
    if client is not None:
        return by_rejection_sampling(client, problems, **kwargs)
    if model_dir is None:
        raise ValueError("warm_start.source=sample needs a RolloutClient or a model folder to serve")
    from rollout_server.client import RolloutClient
    from trainer.eval import rollout_server

    with rollout_server(model_dir, backend="auto") as url:
        c = RolloutClient(url, timeout_s=cfg.rollout.request_timeout_s)
        try:
            return by_rejection_sampling(c, problems, **kwargs)
        finally:
            c.close()


def run_warm_start(
    cfg, model_dir_or_model, tokenizer=None, client=None, out_dir: str | Path | None = None
) -> Path:
    """Collect examples, fine-tune, save an HF folder (model + tokenizer) and return its path.

    ``model_dir_or_model`` is a folder / hub id or an already-loaded HF model (then pass ``tokenizer``).
    ``client`` is a RolloutClient serving the same weights (only for ``source: sample``; without it a
    server is started for the job). The GRPO run then uses the returned folder as ``model.name_or_path``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ws = cfg.warm_start
    out = Path(out_dir or ws.output_dir or cfg.run_dir / "warm_start")
    model_dir = model_dir_or_model if isinstance(model_dir_or_model, (str, Path)) else None
    if tokenizer is None:
        if model_dir is None:
            raise ValueError("pass the tokenizer with an already-loaded model")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = collect_examples(cfg, tokenizer, str(model_dir) if model_dir else None, client)
    print(f"[sft] {len(examples)} examples from source={ws.source}", flush=True)
    if model_dir is not None:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    else:
        model = model_dir_or_model
    if torch.cuda.is_available():
        model.to("cuda")
    torch.manual_seed(cfg.run.seed)
    stats = train_sft(
        model,
        tokenizer,
        examples,
        epochs=ws.epochs,
        lr=ws.lr,
        batch_size=ws.batch_size,
        max_len=ws.max_len,
        seed=cfg.run.seed,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "warm_start.json").write_text(json.dumps({"source": ws.source, **stats}, indent=2))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Supervised warm start before GRPO (see the module docstring).")
    p.add_argument("--config", required=True, help="run config YAML (its warm_start section)")
    p.add_argument("--out", default=None, help="output HF folder (default RUN_DIR/warm_start)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    a = p.parse_args(argv)
    from trainer.config import load_config

    cfg = load_config(a.config, a.overrides)
    from trainer.engine_setup import resolve_model_path

    model = resolve_model_path(cfg, True)  # "tiny" is built, pypi:... sources are converted (once, cached)
    out = run_warm_start(cfg, model, out_dir=a.out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
