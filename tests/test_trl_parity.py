"""Our loss, its gradient and our advantages equal what TRL 1.16's own GRPOTrainer code computes.

The loss side calls TRL's real ``GRPOTrainer._compute_loss``: an instance is built with ``object.__new__`` and
given only the attributes that method reads; its log-prob method is replaced by one returning our tensors
(that method runs a model, which is not what is compared here). TRL's accelerator is replaced by a
single-process stand-in (gather / reduce are identities on one process). Everything runs in float64.

The advantages in TRL are computed inline in ``_generate_and_score_completions`` (trl/trainer/grpo_trainer.py,
"sum_then_normalize" branch, lines ~2763-2793 in 1.16.0), which needs reward functions, a generation batch and an
accelerator to reach. ``_trl_reference_advantages`` below reproduces those lines ONLY as the test reference; it
calls TRL's own ``nanstd``.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from trainer.advantages import group_advantages
from trainer.loss import LossConfig, LossNormalizer, grpo_loss

grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer")
from trl.trainer.utils import nanstd  # noqa: E402

GRPOTrainer = grpo_trainer.GRPOTrainer
DT = torch.float64


class _OneProcessAccelerator:
    """What ``_compute_loss`` uses of accelerate on one process: num_processes, gather, reduce."""

    num_processes = 1

    def gather(self, x):
        return x

    def reduce(self, x, reduction="sum"):
        return x


def _trl_trainer(cfg: LossConfig, max_completion_length: int, grad_accum: int, logps, entropies):
    trainer = object.__new__(GRPOTrainer)
    trainer.loss_type = cfg.loss_type
    trainer.epsilon_low = cfg.epsilon
    trainer.epsilon_high = cfg.epsilon_high_value
    trainer.beta = cfg.beta
    trainer.importance_sampling_level = "token"
    trainer.top_entropy_quantile = 1.0
    trainer.off_policy_mask_threshold = None
    trainer.use_vllm = cfg.importance_sampling_cap is not None
    trainer.vllm_importance_sampling_correction = cfg.importance_sampling_cap is not None
    trainer.max_completion_length = max_completion_length
    trainer.current_gradient_accumulation_steps = grad_accum
    trainer.aux_loss_enabled = False
    trainer._entropy_bonus_enabled = False
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer.accelerator = _OneProcessAccelerator()
    trainer.model = SimpleNamespace(training=True)
    trainer.args = SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=grad_accum)
    trainer._get_per_token_logps_and_entropies = lambda *args, **kwargs: (logps, entropies, None)
    return trainer


def _trl_token_truncate_ratio(old, rollout, mask, cap):
    # Reference only: TRL 1.16 grpo_trainer.py ~L2660-2685 (token_truncate mode), inline in
    # _generate_and_score_completions, so reproduced here.
    diff = torch.nan_to_num((old - rollout) * mask, nan=0.0)
    return torch.clamp(torch.exp(diff), min=None, max=cap)


def _batch(seed: int, b: int = 6, t: int = 9):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(b, t, generator=g, dtype=DT) * 3 - 0.05
    mask = (torch.rand(b, t, generator=g) > 0.25).to(torch.int64)
    mask[:, 0] = 1
    mask[1, 4:] = 0  # a short completion
    return dict(
        logps=logps,
        old=logps + 0.3 * torch.randn(b, t, generator=g, dtype=DT),  # ratios well outside [0.8, 1.28]
        ref=logps + 0.2 * torch.randn(b, t, generator=g, dtype=DT),
        rollout=logps + 0.6 * torch.randn(b, t, generator=g, dtype=DT),
        adv=torch.randn(b, generator=g, dtype=DT),
        ent=torch.rand(b, t, generator=g, dtype=DT) * 2,
        mask=mask,
    )


def _trl_loss_and_grad(cfg, d, use_old, max_len, micro_slices):
    """TRL's loss summed over micro-batches (TRL divides by grad-accum steps itself) and d loss / d logps."""
    logps = d["logps"].clone().requires_grad_(True)
    num_items = d["mask"].sum()  # TRL: gather(completion_mask.sum()).sum() over the generation batch
    total, metrics = 0.0, []
    for sl in micro_slices:
        trainer = _trl_trainer(cfg, max_len, len(micro_slices), logps[sl], d["ent"][sl])
        b, t = d["mask"][sl].shape
        inputs = {
            "prompt_ids": torch.zeros(b, 2, dtype=torch.long),
            "prompt_mask": torch.ones(b, 2, dtype=torch.long),
            "completion_ids": torch.zeros(b, t, dtype=torch.long),
            "completion_mask": d["mask"][sl],
            "advantages": d["adv"][sl],
            "num_items_in_batch": num_items,
        }
        if use_old:
            inputs["old_per_token_logps"] = d["old"][sl]
        if cfg.beta > 0:
            inputs["ref_per_token_logps"] = d["ref"][sl]
        if cfg.importance_sampling_cap is not None:
            old = d["old"][sl] if use_old else logps[sl].detach()
            inputs["importance_sampling_ratio"] = _trl_token_truncate_ratio(
                old, d["rollout"][sl], d["mask"][sl], cfg.importance_sampling_cap
            )
        total = total + trainer._compute_loss(None, inputs)
        metrics.append(trainer._metrics["train"])
    (grad,) = torch.autograd.grad(total, logps)
    return total.detach(), grad, metrics


def _our_loss_and_grad(cfg, d, use_old, max_len, micro_slices):
    logps = d["logps"].clone().requires_grad_(True)
    norm = LossNormalizer.from_completion_mask(d["mask"], max_completion_length=max_len)
    total, metrics = 0.0, []
    for sl in micro_slices:
        out = grpo_loss(
            logps[sl],
            d["adv"][sl],
            d["mask"][sl],
            old_logprobs=d["old"][sl] if use_old else None,
            ref_logprobs=d["ref"][sl] if cfg.beta > 0 else None,
            rollout_logprobs=d["rollout"][sl] if cfg.importance_sampling_cap is not None else None,
            entropy=d["ent"][sl],
            config=cfg,
            normalizer=norm,
        )
        total = total + out.loss
        metrics.append(out.metrics)
    (grad,) = torch.autograd.grad(total, logps)
    return total.detach(), grad, metrics


CASES = [
    # (config kwargs, pass old logprobs)
    (dict(), False),
    (dict(num_iterations=2), True),
    (dict(beta=0.04), False),
    (dict(epsilon=0.2, epsilon_high=0.28), True),
    (dict(num_iterations=3, beta=0.1, epsilon_high=0.3), True),
    (dict(importance_sampling_cap=2.0), False),
    (dict(importance_sampling_cap=1.5, num_iterations=2, beta=0.05), True),
]


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_loss_and_grad_match_trl_one_micro_batch(loss_type, case):
    kwargs, use_old = CASES[case]
    cfg = LossConfig(loss_type=loss_type, **kwargs)
    d = _batch(seed=case)
    whole = [slice(None)]
    ref_loss, ref_grad, ref_metrics = _trl_loss_and_grad(cfg, d, use_old, 12, whole)
    loss, grad, metrics = _our_loss_and_grad(cfg, d, use_old, 12, whole)
    assert ref_grad.abs().max() > 1e-3  # the comparison is not between two zeros
    torch.testing.assert_close(loss, ref_loss, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-9)
    # Token-weighted metrics agree with TRL's logged ones on one process.
    for ours, theirs in [
        ("clip_frac_low", "clip_ratio/low_mean"),
        ("clip_frac_high", "clip_ratio/high_mean"),
        ("clip_frac_region", "clip_ratio/region_mean"),
        ("entropy_mean", "entropy"),
    ] + ([("kl_mean", "kl")] if cfg.beta > 0 else []):
        assert metrics[0][ours].item() == pytest.approx(ref_metrics[0][theirs][0], abs=1e-6), (
            ours
        )  # TRL logs float32
    if use_old:  # ratios far from 1: the clipped branches are really exercised
        assert metrics[0]["clip_frac_region"] > 0


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_accumulated_micro_batches_match_trl(loss_type):
    """TRL with 3 equal micro-batches (dividing by accumulation steps) equals our global-count reduction."""
    cfg = LossConfig(loss_type=loss_type, num_iterations=2, beta=0.02, epsilon_high=0.28)
    d = _batch(seed=11)
    slices = [slice(0, 2), slice(2, 4), slice(4, 6)]
    ref_loss, ref_grad, _ = _trl_loss_and_grad(cfg, d, True, 12, slices)
    loss, grad, _ = _our_loss_and_grad(cfg, d, True, 12, slices)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-9)


def _trl_reference_advantages(
    rewards: torch.Tensor, num_generations: int, scale_rewards: str
) -> torch.Tensor:
    # Reference only: TRL 1.16 grpo_trainer.py ~L2763-2793 + L2796 (nan_to_num), inline in
    # _generate_and_score_completions.
    mean_grouped = torch.nanmean(rewards.view(-1, num_generations), dim=1).repeat_interleave(num_generations)
    if scale_rewards in ["group", "none"]:
        std = nanstd(rewards.view(-1, num_generations), dim=1).repeat_interleave(num_generations)
    else:
        std = nanstd(rewards).expand_as(rewards)
    adv = rewards - mean_grouped
    if scale_rewards != "none":
        adv = adv / (std + 1e-4)
    return torch.nan_to_num(adv, nan=0.0)


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_advantages_match_trl(scale_rewards, dtype):
    g = torch.Generator().manual_seed(3)
    num_generations = 4
    binary = (torch.rand(8, num_generations, generator=g) > 0.5).to(dtype)  # correctness rewards
    shaped = torch.randn(8, num_generations, generator=g, dtype=dtype)  # continuous rewards
    rewards = torch.cat([binary, shaped]).flatten()  # [64]
    rewards[5] = float("nan")  # an unscorable completion
    rewards[8:12] = 1.0  # a zero-variance group
    ours = group_advantages(rewards, num_generations, scale_rewards=scale_rewards)
    ref = _trl_reference_advantages(rewards, num_generations, scale_rewards)
    if dtype == torch.float32:  # TRL's rewards are float32: bit-for-bit equal
        assert torch.equal(ours.advantages, ref)
    else:  # TRL's nanstd forms the n / (n - 1) factor as int / int = float32 even for float64 rewards
        torch.testing.assert_close(ours.advantages, ref, rtol=1e-7, atol=1e-7)
    assert ours.advantages.abs().max() > 0.5
