"""One step's metrics row (RUN_DIR/metrics.jsonl), its log line, and the sampled completions (rank 0).

Key families: ``reward/*``, ``accuracy``, ``completion_length/*``, ``truncated/*`` come from the scoring;
``train/*`` from the loss (trainer/loss.py ``loss_metric_keys``); ``sync/*`` from the weight sync
(trainer/weight_sync.py: the whole push, its handshake and send, and for the slowest server
``sync/server_receive_s``, the bytes on the wire, and ``sync/server_load_s``, putting them into its engine);
the rest is written here. Times: ``time/generate`` and ``time/reward`` ran on the rollout side (overlapped
with the previous step's training when ``rollout.max_off_policy_steps`` > 0), ``time/wait_rollout`` is how
long the update side sat idle waiting for the batch, ``time/train`` and ``time/sync`` are the update side's
own work. ``weight_version/lag`` is how many optimizer steps older than the trained weights the sampling
weights were.
"""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass
from typing import Any

from trainer.rollout_side import ProducedStep
from trainer.update_stage import UpdateResult

log = logging.getLogger("trainer")


@dataclass
class StepTimes:
    wait_rollout: float
    train: float
    sync: float
    step: float


def step_metrics(
    step: int,
    trained_version: int,
    produced: ProducedStep,
    result: UpdateResult,
    extra: dict[str, float],
    times: StepTimes,
    skipped_steps: int,
    reward_failures_total: int,
) -> dict[str, Any]:
    """The metrics row of ``step``; ``trained_version`` is the version of the weights the step started from."""
    scored, batch = produced.scored, produced.batch
    rb = scored.rollout
    n_prompt_tok = sum(len(r.prompt_ids) for r in batch.rows)
    n_comp_tok = sum(len(r.completion_ids) for r in batch.rows)
    versions = rb.weight_versions
    m: dict[str, Any] = dict(scored.metrics)
    m.update({f"train/{k}": v for k, v in result.metrics.items()})
    m.update(
        {
            "loss": result.loss,
            "grad_norm": result.grad_norm,
            "lr": result.lr,
            "step_applied": int(result.applied),
            "skipped_steps": skipped_steps,
            "nonfinite_loss": int(result.nonfinite_loss),
            "reward_failures/cumulative": reward_failures_total,
            "micro_batches": result.num_micro_batches,
            "num_completions": len(batch.rows),
            "tokens/prompt": n_prompt_tok,
            "tokens/completion": n_comp_tok,
            "tokens_per_s": (n_prompt_tok + n_comp_tok) / max(times.step, 1e-9),
            "weight_version/min": min(versions),
            "weight_version/max": max(versions),
            "weight_version/lag": trained_version - min(versions),
            "weight_version/pushed": step if "sync/seconds" in extra else None,
            "time/generate": rb.generate_s,
            "time/reward": scored.score_s,
            "time/wait_rollout": times.wait_rollout,
            "time/train": times.train,
            "time/sync": times.sync,
            "time/step": times.step,
            "data/epoch": produced.data_state["epoch"],
            "data/index": produced.data_state["index"],
            "data/prompts_digest": hashlib.sha1(
                "\x00".join(p["prompt_text"] for p in rb.prompts).encode()
            ).hexdigest()[:16],
        }
    )
    m.update(extra)
    if "train/kl_mean" in m:
        m["kl"] = m["train/kl_mean"]
    if "train/entropy_mean" in m:
        m["entropy"] = m["train/entropy_mean"]
    return m


def log_step(step: int, total_steps: int, m: dict[str, Any], result: UpdateResult) -> None:
    log.info(
        "step %d/%d reward %.3f acc %.3f len %.0f trunc %.2f loss %.4g gnorm %.3g lr %.2e | gen %.2fs "
        "reward %.2fs wait %.2fs train %.2fs sync %.2fs lag %d%s",
        step,
        total_steps,
        m.get("reward/total/mean", float("nan")),
        m.get("accuracy", float("nan")),
        m["completion_length/mean"],
        m["truncated/frac"],
        result.loss,
        result.grad_norm,
        result.lr,
        m["time/generate"],
        m["time/reward"],
        m["time/wait_rollout"],
        m["time/train"],
        m["time/sync"],
        m["weight_version/lag"],
        "  [SKIPPED]" if not result.applied else "",
    )


def sample_completions(produced: ProducedStep, k: int, rng: random.Random) -> list[dict]:
    """completions.jsonl rows of ``k`` randomly chosen prompts of the step (every completion of each)."""
    from trainer.rollout_side import completion_records

    rb = produced.scored.rollout
    idx = sorted(rng.sample(range(len(rb.prompts)), min(k, len(rb.prompts))))
    return completion_records(produced.scored, idx)
