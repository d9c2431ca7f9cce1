"""The clipped GRPO objective (GRPO / BNPO / Dr. GRPO / DAPO) as pure functions of tensors.

Per token t of completion i (A_i = group-relative advantage, r = exp(logp - old_logp)):

    l_it = -min(r A_i, clip(r, 1 - eps_low, 1 + eps_high) A_i) * w_it + beta * KL_it
    w_it = min(exp(old_logp - rollout_logp), cap)        truncated IS weight (rollout engine vs trainer), detached
    KL_it = exp(ref - logp) - (ref - logp) - 1            k3 estimator of KL(pi || pi_ref)

which is TRL 1.16's ``GRPOTrainer._compute_loss`` for these loss types with ``vllm_importance_sampling_mode=
"token_truncate"`` (checked in tests/test_trl_parity.py). The log-probs come from ``trainer/logprobs.py``.

Reduction (``reduce_per_token_loss``) is a separate pure function that divides by counts of the WHOLE optimizer
step, passed in by the caller (``LossNormalizer``), so that summing micro-batch losses over micro-batches and
averaging over ranks gives exactly the full-batch loss, however the batch was split:

    grpo     sum_i [ sum_t l_it / n_i ] / N_seq          (mean over each sequence, then over sequences)
    bnpo     sum_it l_it / N_tok                          (TRL divides by the *micro-batch* token count and then by
                                                           the number of accumulation steps, which depends on the
                                                           split; with a global count bnpo == dapo here)
    dr_grpo  sum_it l_it / (N_seq * max_completion_length)
    dapo     sum_it l_it / N_tok

Ranks: DeepSpeed *averages* gradients over the data-parallel ranks (divides the all-reduced sum by the world
size), so every micro-batch loss is multiplied by ``num_ranks``: (1/R) sum_ranks sum_micro loss = full loss.
Gradient accumulation: call ``engine.backward(loss, scale_wrt_gas=False)``, since the normaliser already spans
the accumulation window (DeepSpeed's default divides by gradient_accumulation_steps again).

Truncated completions: to drop completions that hit the token cap (``mask_truncated_completions``) the caller
zeroes their rows of ``completion_mask``, and counts them in ``LossNormalizer`` exactly as they appear in the
masks (``LossNormalizer.from_completion_mask`` on the global masks does this).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]


class LossConfig(BaseModel):
    """Settings of the policy objective. Defaults follow TRL 1.16's GRPOConfig."""

    model_config = ConfigDict(extra="forbid")

    loss_type: LossType = Field(
        "dapo",
        description="Token reduction: 'grpo' (mean per sequence, then over sequences), 'bnpo' and 'dapo' (mean over "
        "all tokens of the step), 'dr_grpo' (sum / (sequences x max_completion_length)).",
    )
    epsilon: float = Field(
        0.2, ge=0.0, le=1.0, description="Low clip range: ratios below 1 - epsilon are clipped."
    )
    epsilon_high: float | None = Field(
        None,
        ge=0.0,
        le=10.0,
        description="High clip range (DAPO clip-higher, e.g. 0.28): ratios above 1 + epsilon_high are clipped. "
        "None = epsilon.",
    )
    beta: float = Field(
        0.0,
        ge=0.0,
        le=10.0,
        description="Weight of the k3 KL penalty to the reference policy (0 = no reference).",
    )
    num_iterations: int = Field(
        1,
        ge=1,
        le=64,
        description="Policy updates per generation batch (mu). With 1 the old policy is the current one "
        "(old_logprobs = logprobs.detach()); above 1 the caller must pass old_logprobs.",
    )
    importance_sampling_cap: float | None = Field(
        None,
        ge=1.0,
        le=1000.0,
        description="Cap C of the token-level truncated importance weight min(exp(old - rollout), C) that corrects "
        "for rollout-engine vs trainer log-prob mismatch (TRL: vllm_importance_sampling_clip_max, default 3.0). "
        "None = no correction.",
    )

    @property
    def epsilon_high_value(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


class LossNormalizer(BaseModel):
    """Counts of the whole optimizer step (all ranks, all micro-batches), fixed before the first micro-batch."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    total_sequences: int = Field(..., ge=1, description="Completions in the optimizer step, over all ranks.")
    total_completion_tokens: int = Field(
        ..., ge=0, description="Unmasked completion tokens in the optimizer step, over all ranks."
    )
    max_completion_length: int = Field(
        ...,
        ge=1,
        le=1_000_000,
        description="Generation token cap; dr_grpo's constant per-sequence normaliser.",
    )
    num_ranks: int = Field(
        1, ge=1, le=65_536, description="Data-parallel world size; undoes DeepSpeed's gradient averaging."
    )

    @classmethod
    def from_completion_mask(
        cls, completion_mask: torch.Tensor, max_completion_length: int, num_ranks: int = 1
    ) -> LossNormalizer:
        """Counts from the completion mask [N, T] of the whole step (every rank's rows)."""
        return cls(
            total_sequences=int(completion_mask.shape[0]),
            total_completion_tokens=int(completion_mask.sum().item()),
            max_completion_length=max_completion_length,
            num_ranks=num_ranks,
        )


@dataclass(frozen=True)
class LossOutput:
    loss: torch.Tensor  # [] differentiable micro-batch loss, to pass to backward as is
    metrics: dict[
        str, torch.Tensor
    ]  # [] each, detached, token-weighted over this micro-batch's unmasked tokens


def reduce_per_token_loss(
    per_token_loss: torch.Tensor,
    completion_mask: torch.Tensor,
    loss_type: LossType,
    normalizer: LossNormalizer,
) -> torch.Tensor:
    """Micro-batch share of the step loss; summing it over micro-batches and averaging over ranks gives the whole."""
    keep = completion_mask.bool()  # [B, T]
    masked = torch.where(
        keep, per_token_loss, torch.zeros_like(per_token_loss)
    )  # [B, T] garbage -> 0, no NaN
    if loss_type == "grpo":
        seq_len = keep.sum(-1).clamp(min=1).to(per_token_loss.dtype)  # [B] an all-masked row contributes 0
        total = (masked.sum(-1) / seq_len).sum() / normalizer.total_sequences
    elif loss_type in ("bnpo", "dapo"):
        total = masked.sum() / max(normalizer.total_completion_tokens, 1)
    elif loss_type == "dr_grpo":
        total = masked.sum() / (normalizer.total_sequences * normalizer.max_completion_length)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    return total * normalizer.num_ranks


def loss_metric_keys(config: LossConfig) -> list[str]:
    """The per-token metric names ``grpo_loss`` reports for ``config`` (besides num_tokens and loss), in a
    fixed order: the update stage all-reduces them as one vector, so every rank needs the same list."""
    keys = ["clip_frac_low", "clip_frac_high", "clip_frac_region", "ratio_mean", "entropy_mean"]
    if config.importance_sampling_cap is not None:
        keys += ["is_weight_mean", "is_capped_frac"]
    if config.beta > 0:
        keys.append("kl_mean")
    return keys


def grpo_loss(
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    rollout_logprobs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    config: LossConfig,
    normalizer: LossNormalizer,
) -> LossOutput:
    """Clipped policy loss of one micro-batch.

    logprobs [B, T] (trainer, differentiable); advantages [B]; completion_mask [B, T] (0/1 or bool);
    old_logprobs [B, T] (policy that the ratio is taken against; required when num_iterations > 1);
    ref_logprobs [B, T] (required when beta > 0); rollout_logprobs [B, T] (the sampler's, required when
    importance_sampling_cap is set; NaN = unknown, weight 1); entropy [B, T] (only logged).
    """
    if (
        logprobs.dim() != 2
        or completion_mask.shape != logprobs.shape
        or advantages.shape != logprobs.shape[:1]
    ):
        raise ValueError(
            f"need logprobs/completion_mask [B, T] and advantages [B]; got {tuple(logprobs.shape)}, "
            f"{tuple(completion_mask.shape)}, {tuple(advantages.shape)}"
        )
    if old_logprobs is None:
        if config.num_iterations > 1:
            raise ValueError("num_iterations > 1 needs old_logprobs (the policy that generated the batch)")
        old_logprobs = logprobs.detach()
    if config.beta > 0 and ref_logprobs is None:
        raise ValueError("beta > 0 needs ref_logprobs")
    if config.importance_sampling_cap is not None and rollout_logprobs is None:
        raise ValueError("importance_sampling_cap needs rollout_logprobs")

    keep = completion_mask.bool()  # [B, T]
    zeros = torch.zeros_like(logprobs)  # [B, T]
    adv = advantages.to(logprobs.dtype).unsqueeze(1)  # [B, 1]
    eps_low, eps_high = config.epsilon, config.epsilon_high_value

    # Masked positions may hold garbage log-probs (padding); zero them before exp() so they cannot overflow.
    log_ratio = torch.where(keep, logprobs - old_logprobs.detach(), zeros)  # [B, T]
    ratio = torch.exp(log_ratio)  # [B, T]
    clipped_ratio = ratio.clamp(1 - eps_low, 1 + eps_high)  # [B, T]
    per_token = -torch.min(ratio * adv, clipped_ratio * adv)  # [B, T]

    metrics: dict[str, torch.Tensor] = {}
    if config.importance_sampling_cap is not None:
        mismatch = torch.where(keep, old_logprobs.detach() - rollout_logprobs, zeros).nan_to_num(
            nan=0.0
        )  # [B, T]
        raw_weight = torch.exp(mismatch)  # [B, T]
        is_weight = raw_weight.clamp(max=config.importance_sampling_cap)  # [B, T]
        per_token = per_token * is_weight
        metrics["is_weight_mean"] = is_weight
        metrics["is_capped_frac"] = (raw_weight > config.importance_sampling_cap).to(logprobs.dtype)
    if config.beta > 0:
        delta = torch.where(keep, ref_logprobs - logprobs, zeros)  # [B, T]
        kl = torch.exp(delta) - delta - 1  # [B, T] k3, >= 0
        per_token = per_token + config.beta * kl
        metrics["kl_mean"] = kl

    loss = reduce_per_token_loss(per_token, completion_mask, config.loss_type, normalizer)

    clip_low = (ratio < 1 - eps_low) & (adv < 0)  # [B, T] gradient cut at the low side
    clip_high = (ratio > 1 + eps_high) & (adv > 0)  # [B, T] gradient cut at the high side
    metrics["clip_frac_low"] = clip_low.to(logprobs.dtype)
    metrics["clip_frac_high"] = clip_high.to(logprobs.dtype)
    metrics["clip_frac_region"] = (clip_low | clip_high).to(logprobs.dtype)
    metrics["ratio_mean"] = ratio
    if entropy is not None:
        metrics["entropy_mean"] = entropy
    num_tokens = keep.sum()
    with torch.no_grad():
        out = {
            name: torch.where(keep, value.detach(), zeros).sum() / num_tokens.clamp(min=1)
            for name, value in metrics.items()
        }
        out["num_tokens"] = num_tokens.to(logprobs.dtype)
        out["loss"] = loss.detach()
    return LossOutput(loss=loss, metrics=out)
