"""Supervised warm start: example collection rules (fast) and the CPU demo's warm start raising the format
reward of sampled completions on held-out prompts, measured through real rollout servers (slow)."""

from __future__ import annotations

import json

import pytest

from trainer.sft import SFTExample, dedupe_and_cap, format_reward, from_completions_file, keep_completion

GOOD = "<reasoning>\n3 + 4 = 7\n</reasoning>\n<answer>\n7\n</answer>\n"


def test_keep_completion_needs_correct_and_strict_format():
    assert keep_completion(GOOD, "7")
    assert not keep_completion(GOOD, "8")  # wrong answer
    assert not keep_completion(
        "<reasoning>3 + 4 = 7</reasoning><answer>7</answer>", "7"
    )  # not the exact layout
    assert not keep_completion("The answer is 7", "7")
    assert keep_completion(GOOD.replace("reasoning", "think"), "7", prompt_format="think")


def test_dedupe_and_cap():
    ex = [
        SFTExample("p1", GOOD),
        SFTExample("p1", GOOD + " "),
        SFTExample("p1", GOOD.replace("7", "7.0")),
        SFTExample("p1", "other"),
        SFTExample("p2", GOOD),
    ]
    out = dedupe_and_cap(ex, max_per_prompt=2)
    assert [(e.prompt, e.completion) for e in out] == [
        ("p1", GOOD),
        ("p1", GOOD.replace("7", "7.0")),
        ("p2", GOOD),
    ]


def test_format_reward_range():
    assert format_reward([GOOD]) == 1.0
    assert format_reward(["nothing"]) == 0.0
    assert format_reward([GOOD, "nothing"]) == 0.5


def test_from_completions_file(tmp_path):
    path = tmp_path / "completions.jsonl"
    rows = [
        {
            "prompt_text": "P1",
            "completion": GOOD,
            "gold": "7",
            "rewards": {"correctness": 2.0, "strict_format": 0.5},
        },
        {
            "prompt_text": "P1",
            "completion": GOOD,
            "gold": "7",
            "rewards": {"correctness": 2.0, "strict_format": 0.5},
        },
        {
            "prompt_text": "P2",
            "completion": GOOD,
            "gold": "8",
            "rewards": {"correctness": 0.0, "strict_format": 0.5},
        },
        {
            "prompt_text": "P3",
            "completion": "7",
            "gold": "7",
            "rewards": {"correctness": 2.0, "strict_format": 0.0},
        },
        {"prompt_text": "P4", "completion": GOOD, "gold": "7"},  # no rewards logged: our own checks
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"torn line')
    out = from_completions_file(path, max_per_prompt=4)
    assert [e.prompt for e in out] == ["P1", "P4"]


def _sample_format_reward(model_dir, rows, n: int, max_tokens: int) -> tuple[float, float]:
    """(format reward, STRICT accuracy) of ``n`` sampled completions per row through a real rollout server."""
    from rollout_server.client import RolloutClient
    from rollout_server.protocol import GenerateRequest
    from trainer.eval import rollout_server
    from trainer.eval_scoring import score_completion

    with rollout_server(str(model_dir), backend="torch", startup_timeout_s=300) as url:
        client = RolloutClient(url, timeout_s=300)
        req = GenerateRequest(
            prompts=[r["prompt_text"] for r in rows], n=n, temperature=1.0, max_tokens=max_tokens, seed=123
        )
        comps = client.generate(req).completions
        client.close()
    texts = [c.text for c in comps]
    acc = sum(score_completion(c.text, rows[c.prompt_index]["gold"]).strict for c in comps) / len(comps)
    return format_reward(texts), acc


@pytest.mark.slow
def test_warm_start_raises_format_reward_on_cpu_demo(tiny_model_dir, tmp_path):
    """The CPU demo's warm start (configs/cpu-demo.yaml: arithmetic gold solutions), before any GRPO step."""
    from transformers import AutoTokenizer

    from trainer.config import load_config
    from trainer.data import load_prompts
    from trainer.sft import run_warm_start

    # 1,440 distinct problems x 2 epochs: measured enough for the format (256 x 1 epoch was not: reward 0.0).
    cfg = load_config(
        "configs/cpu-demo.yaml",
        [f"run.output_dir={tmp_path}", "warm_start.num_prompts=2000", "warm_start.epochs=2"],
    )
    assert cfg.warm_start.source == "arithmetic_solutions"
    out = run_warm_start(cfg, str(tiny_model_dir))
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    stats = json.loads((out / "warm_start.json").read_text())
    assert stats["sft/loss_last"] < stats["sft/loss_first"]
    # Held-out prompts: the arithmetic task's test split (disjoint from the training problems by construction).
    tok = AutoTokenizer.from_pretrained(out)
    rows = load_prompts(cfg.data, tok, "test").rows[:32]
    max_tokens = cfg.generation.max_completion_length
    base_fmt, base_acc = _sample_format_reward(tiny_model_dir, rows, 4, max_tokens)
    warm_fmt, warm_acc = _sample_format_reward(out, rows, 4, max_tokens)
    print(
        f"format reward (strict+soft, 0..1): base {base_fmt:.3f} -> warm {warm_fmt:.3f}; "
        f"strict accuracy: base {base_acc:.3f} -> warm {warm_acc:.3f}; sft {stats}"
    )
    assert warm_fmt > base_fmt
    assert warm_fmt >= 0.25  # a clear gain, not noise: the random base model essentially never formats


@pytest.mark.slow
def test_warm_start_sources_script_counts_what_each_source_gives(tiny_model_dir, tmp_path):
    """scripts/warm_start_sources.py against a real (torch) rollout server: the counts add up, and every
    sampled prompt's worked solution is counted (the CPU demo's arithmetic rows carry one too)."""
    import subprocess
    import sys

    out = tmp_path / "sources.json"
    cmd = [
        sys.executable,
        "scripts/warm_start_sources.py",
        "--config",
        "configs/cpu-demo.yaml",
        "--prompts",
        "4",
        "--samples",
        "3",
        "--backend",
        "torch",
        "--out",
        str(out),
        f"model.name_or_path={tiny_model_dir}",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads(out.read_text())
    s = summary["sample"]
    assert summary["prompts"] == 4 and s["completions"] == 12
    assert s["kept"] <= min(s["correct"], s["strict_format"]) and s["truncated"] <= 12
    assert 0 <= s["prompts_with_a_kept_example"] <= 4 and s["sampling_minutes"] > 0
    assert summary["gsm8k_solutions"]["examples"] == 4
    assert "| sample (3 per prompt" in res.stdout and "| gsm8k_solutions | 4 (every prompt) |" in res.stdout
