"""GSM8K evaluation: aggregation (fast) and the whole CLI through real rollout servers on the tiny model (slow)."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from trainer.eval import as_problems, format_table, summarize
from trainer.eval_scoring import pass_at_k


def _sample(
    strict: bool, lenient: bool, tokens: int = 10, truncated: bool = False, formatted: bool = True
) -> dict:
    return {
        "strict": strict,
        "lenient": lenient,
        "formatted": formatted,
        "num_tokens": tokens,
        "truncated": truncated,
    }


def test_summarize_aggregates_records():
    records = [
        {
            "greedy": _sample(True, True),
            "samples": [_sample(True, True), _sample(False, True), _sample(False, False)],
        },
        {"greedy": _sample(False, True, 20, True, False), "samples": [_sample(False, False)] * 3},
    ]
    for r in records:
        r["n_correct_strict"] = sum(s["strict"] for s in r["samples"])
        r["n_correct_lenient"] = sum(s["lenient"] for s in r["samples"])
    m = summarize(records, k=2)
    assert m["num_problems"] == 2
    assert m["greedy/pass@1_strict"] == 0.5 and m["greedy/pass@1_lenient"] == 1.0
    assert m["greedy/pass@1_strict_lo"] < 0.5 < m["greedy/pass@1_strict_hi"]
    assert (
        m["greedy/format_rate"] == 0.5
        and m["greedy/truncation_rate"] == 0.5
        and m["greedy/mean_length"] == 15
    )
    assert m["sampled/pass@2_strict"] == pytest.approx((pass_at_k(3, 1, 2) + 0.0) / 2)
    assert m["sampled/pass@2_lenient"] == pytest.approx((pass_at_k(3, 2, 2) + 0.0) / 2)
    assert m["sampled/pass@1_strict"] == pytest.approx(1 / 6) and m[
        "sampled/pass@1_lenient"
    ] == pytest.approx(2 / 6)
    table = format_table({"base": m, "trained": m}, k=2)
    assert "greedy pass@1 STRICT" in table and "base" in table and "trained" in table and "50.0%" in table


def test_as_problems_takes_trainer_rows():
    rows = [
        {"prompt": [{"role": "user", "content": "q"}], "prompt_text": "<chat>q", "question": "q", "gold": "3"}
    ]
    (p,) = as_problems(rows)
    assert (p.prompt, p.gold, p.question) == ("<chat>q", "3", "q")
    with pytest.raises(ValueError):
        as_problems([{"prompt": [{"role": "user", "content": "q"}], "gold": "3"}])


@pytest.mark.slow
def test_cli_compare_end_to_end(tiny_model_dir, gsm8k_dir, tmp_path):
    """`python -m trainer.eval` starts a server per model, evaluates, writes records + summary, stops the servers.

    The same model twice must give identical numbers (greedy is deterministic, sampling is seeded)."""
    out = tmp_path / "results.jsonl"
    limit, k, max_tokens = 6, 2, 16
    cmd = [
        sys.executable,
        "-m",
        "trainer.eval",
        "--model",
        str(tiny_model_dir),
        "--compare",
        str(tiny_model_dir),
        "--gsm8k-source",
        str(gsm8k_dir),
        "--split",
        "test",
        "--limit",
        str(limit),
        "--k",
        str(k),
        "--max-tokens",
        str(max_tokens),
        "--backend",
        "torch",
        "--output",
        str(out),
        "--no-progress",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "greedy pass@1 STRICT" in r.stdout and "sampled pass@2 LENIENT" in r.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2 * limit
    golds = [
        json.loads(line)["answer"].split("####")[-1].strip().replace(",", "")
        for line in (gsm8k_dir / "test.jsonl").read_text().splitlines()[:limit]
    ]
    assert [rec["gold"] for rec in records[:limit]] == golds
    summary = json.loads(out.with_name(out.name + ".summary.json").read_text())["results"]
    a, b = summary[str(tiny_model_dir)], summary[f"{tiny_model_dir} (2)"]
    assert a == b
    # The summary is what the records say.
    first = records[:limit]
    assert a["greedy/pass@1_strict"] == sum(rec["greedy"]["strict"] for rec in first) / limit
    assert (
        a["greedy/truncation_rate"] == sum(rec["greedy"]["num_tokens"] == max_tokens for rec in first) / limit
    )
    assert all(len(rec["samples"]) == k for rec in records)
    assert all(rec["greedy"]["num_tokens"] <= max_tokens for rec in records)


@pytest.mark.slow
def test_evaluate_with_client_on_arithmetic(tiny_model_dir):
    """The trainer's periodic evaluation through an existing client; the server is gone after its context."""
    from transformers import AutoTokenizer

    from rollout_server.client import RolloutClient
    from trainer.data import DataConfig, load_prompts
    from trainer.eval import evaluate_with_client, rollout_server

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = load_prompts(DataConfig(source="arithmetic", limit_test=10), tok, "test").rows
    with rollout_server(str(tiny_model_dir), backend="torch", startup_timeout_s=300) as url:
        client = RolloutClient(url, timeout_s=300)
        m1 = evaluate_with_client(client, rows, max_tokens=12, batch_prompts=4)
        m2 = evaluate_with_client(client, rows, max_tokens=12, k=3, temperature=1.0)
        client.close()
    with pytest.raises(httpx.HTTPError):
        httpx.get(url + "/health", timeout=2.0)
    assert m1["num_problems"] == 10 and "sampled/pass@3_strict" not in m1
    # Greedy is deterministic and independent of how prompts are batched.
    assert {k: v for k, v in m2.items() if k.startswith("greedy/")} == {
        k: v for k, v in m1.items() if k.startswith("greedy/")
    }
    # pass@k >= pass@1 for every problem, so also on average.
    for rule in ("strict", "lenient"):
        assert 0.0 <= m2[f"sampled/pass@1_{rule}"] <= m2[f"sampled/pass@3_{rule}"] <= 1.0
    assert 0.0 <= m2["sampled/truncation_rate"] <= 1.0 and m2["sampled/mean_length"] <= 12
    assert all(isinstance(v, float) for v in m2.values())
