"""The score stage: rewards per function and in total, group-relative advantages, truncation accounting.

Runs on trainer rank 0 between the rollout and the update stage. Truncated completions (finish_reason
"length": they hit ``max_completion_length``) are counted and reported loudly every step, because a cap that
cuts most answers silently zeroes every correctness reward; with ``mask_truncated_completions`` they are also
left out of the loss (their advantage still counts in their group's statistics, as in DAPO).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch

from trainer.advantages import group_advantages
from trainer.rewards import RewardSet
from trainer.rollout_stage import RolloutBatch
from trainer.update_stage import TrainBatch, TrainRow

log = logging.getLogger(__name__)


@dataclass
class ScoredBatch:
    rollout: RolloutBatch
    per_func: dict[str, list[float]]  # name -> [N]
    total: list[float]  # [N]
    advantages: list[float]  # [N]
    truncated: list[bool]  # [N]
    reward_failures: dict[str, int]
    frac_zero_variance_groups: float
    score_s: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)


def _mean_std(xs: list[float]) -> tuple[float, float]:
    if not xs:
        return float("nan"), float("nan")
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


class ScoreStage:
    def __init__(self, rewards: RewardSet, scale_rewards: str, eps: float, mask_truncated: bool):
        self.rewards = rewards
        self.scale_rewards = scale_rewards
        self.eps = eps
        self.mask_truncated = mask_truncated

    def score(self, batch: RolloutBatch) -> ScoredBatch:
        t0 = time.perf_counter()
        n = len(batch.completions)
        prompts = [batch.prompt_of(i)["prompt"] for i in range(n)]
        texts = [c.text for c in batch.completions]
        golds = [batch.prompt_of(i)["gold"] for i in range(n)]
        scores = self.rewards(prompts, texts, gold=golds)
        total = torch.tensor(scores.total, dtype=torch.float64)  # [N]
        adv = group_advantages(total, batch.num_generations, self.scale_rewards, self.eps)
        truncated = [c.finish_reason == "length" for c in batch.completions]
        lengths = [len(c.token_ids) for c in batch.completions]

        m: dict[str, float] = {}
        for name, vals in scores.per_func.items():
            m[f"reward/{name}/mean"], m[f"reward/{name}/std"] = _mean_std(vals)
        m["reward/total/mean"], m["reward/total/std"] = _mean_std(scores.total)
        accuracy = self.rewards.accuracy(scores.per_func)
        if accuracy is not None:
            m["accuracy"] = accuracy
        m["completion_length/mean"] = sum(lengths) / max(n, 1)
        m["completion_length/max"] = float(max(lengths, default=0))
        m["completion_length/min"] = float(min(lengths, default=0))
        m["truncated/frac"] = sum(truncated) / max(n, 1)
        m["truncated/count"] = float(sum(truncated))
        m["frac_zero_variance_groups"] = adv.frac_zero_variance_groups
        for name, k in scores.failures.items():
            m[f"reward_failures/{name}"] = float(k)
        m["reward_failures/total"] = float(sum(scores.failures.values()))
        if sum(truncated):
            log.warning(
                "step %d: %d of %d completions (%.0f%%) hit max_completion_length (%s)",
                batch.step,
                sum(truncated),
                n,
                100.0 * sum(truncated) / max(n, 1),
                "masked out of the loss" if self.mask_truncated else "kept in the loss",
            )
        return ScoredBatch(
            rollout=batch,
            per_func=scores.per_func,
            total=scores.total,
            advantages=adv.advantages.tolist(),
            truncated=truncated,
            reward_failures=scores.failures,
            frac_zero_variance_groups=adv.frac_zero_variance_groups,
            score_s=time.perf_counter() - t0,
            metrics=m,
        )

    def to_train_batch(self, scored: ScoredBatch, nan_loss: bool = False) -> TrainBatch:
        rb = scored.rollout
        rows = []
        for i, c in enumerate(rb.completions):
            rows.append(
                TrainRow(
                    prompt_ids=list(rb.prompt_of(i)["prompt_ids"]),
                    completion_ids=list(c.token_ids),
                    advantage=float(scored.advantages[i]),
                    rollout_logprobs=list(c.logprobs),
                    loss_mask=not (self.mask_truncated and scored.truncated[i]),
                )
            )
        return TrainBatch(step=rb.step, rows=rows, nan_loss=nan_loss)


def completion_records(scored: ScoredBatch, prompt_indices: list[int]) -> list[dict]:
    """completions.jsonl rows for the sampled prompts (every completion of each)."""
    rb = scored.rollout
    g = rb.num_generations
    out = []
    for p in prompt_indices:
        prompt = rb.prompts[p]
        for j in range(g):
            i = p * g + j
            c = rb.completions[i]
            out.append(
                {
                    "step": rb.step,
                    "weight_version": c.weight_version,
                    "group": p,
                    "index": j,
                    "prompt": prompt.get("prompt"),
                    "prompt_text": prompt.get("prompt_text"),
                    "gold": prompt.get("gold"),
                    "completion": c.text,
                    "num_tokens": len(c.token_ids),
                    "finish_reason": c.finish_reason,
                    "reward": scored.total[i],
                    "rewards": {k: v[i] for k, v in scored.per_func.items()},
                    "advantage": scored.advantages[i],
                }
            )
    return out
