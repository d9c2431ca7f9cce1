"""Group-relative advantages (GRPO): each completion's reward minus the mean reward of its prompt's group.

Rewards arrive prompt-major: the ``G = num_generations`` completions of one prompt are consecutive, so
``rewards.view(-1, G)`` puts one prompt per row. The advantage of completion ``i`` of prompt ``p`` is

    A_pi = (r_pi - mean_p) / (s + eps)      s = group std ("group"), batch std ("batch"); no division ("none")

Numerics follow TRL 1.16 (``GRPOTrainer._generate_and_score_completions``, sum-then-normalize branch), which
``tests/test_trl_parity.py`` checks:
- the std is the *sample* std, with Bessel's correction (divide by n - 1), not the population std;
- ``eps`` (default 1e-4) is added to the std, not to the variance;
- a NaN reward marks an unscorable completion: it is left out of its group's mean and std, and its
  advantage is 0 (so it neither moves the policy nor biases its group's baseline);
- a group (or batch) of one has std 0, not NaN.

Zero-variance groups (every scorable completion got exactly the same reward, or fewer than two are
scorable) carry no learning signal: we set their advantages to exactly 0 whatever the scaling. TRL leaves
``(r - mean) / (0 + eps)`` there, which is 0 too unless the mean rounds (e.g. three rewards of 0.1 give
~2e-13); that is the only place our advantages may differ from TRL's. We count these groups per *group* in
every mode, by exact equality; TRL's ``frac_reward_zero_std`` uses ``isclose(std, 0)`` per group in
"group"/"none" mode but looks at the single batch std in "batch" mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

ScaleRewards = Literal["group", "batch", "none"]


@dataclass(frozen=True)
class GroupAdvantages:
    """Advantages of one generation batch and the group statistics behind them."""

    advantages: torch.Tensor  # [N] same dtype as the rewards; 0 for NaN rewards
    group_mean: torch.Tensor  # [N // G] mean reward of each prompt's group (NaNs ignored)
    group_std: torch.Tensor  # [N // G] sample std (Bessel) of each group; 0 for a group of one
    num_zero_variance_groups: int  # groups whose rewards are all equal (advantages all 0)
    frac_zero_variance_groups: float  # the same, as a fraction of the number of groups


def _nan_sample_std(x: torch.Tensor, dim: int | None) -> torch.Tensor:
    """Sample std (n - 1 in the denominator) ignoring NaNs; 0 where fewer than two values are present."""
    valid = ~torch.isnan(x)
    count = valid.sum(dim=dim, keepdim=True)
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    mean_sq_dev = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    bessel = count.to(x.dtype) / (count - 1).clamp(min=1).to(x.dtype)  # n / (n - 1)
    var = mean_sq_dev * bessel  # sample variance; this operation order reproduces TRL's float32 bits
    std = torch.sqrt(var)
    std = torch.where(count > 1, std, torch.zeros_like(std))
    return std.squeeze(dim) if dim is not None else std.reshape(())


def group_advantages(
    rewards: torch.Tensor,
    num_generations: int,
    scale_rewards: ScaleRewards = "group",
    eps: float = 1e-4,
) -> GroupAdvantages:
    """Group-relative advantages for ``rewards`` [N], prompt-major with ``num_generations`` per prompt.

    ``scale_rewards``: "group" divides by each group's std (GRPO), "batch" by the std of the whole batch
    (more robust when many groups have small spread), "none" only centres (Dr. GRPO).
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if num_generations < 1 or rewards.numel() % num_generations != 0:
        raise ValueError(f"{rewards.numel()} rewards cannot be split into groups of {num_generations}")
    if scale_rewards not in ("group", "batch", "none"):
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")

    grouped = rewards.view(-1, num_generations)  # [P, G]
    group_mean = torch.nanmean(grouped, dim=1)  # [P]
    group_std = _nan_sample_std(grouped, dim=1)  # [P]
    centred = rewards - group_mean.repeat_interleave(num_generations)  # [N]

    if scale_rewards == "group":
        advantages = centred / (group_std.repeat_interleave(num_generations) + eps)  # [N]
    elif scale_rewards == "batch":
        advantages = centred / (_nan_sample_std(rewards, dim=None) + eps)  # [N]
    else:
        advantages = centred  # [N]
    advantages = torch.nan_to_num(advantages, nan=0.0)  # unscorable completions carry no signal

    valid = ~torch.isnan(grouped)  # [P, G]
    group_max = torch.where(valid, grouped, float("-inf")).amax(dim=1)  # [P]
    group_min = torch.where(valid, grouped, float("inf")).amin(dim=1)  # [P]
    zero_var = (valid.sum(dim=1) <= 1) | (group_max == group_min)  # [P]
    # Exact zeros, not float noise from a mean that does not round-trip (see module docstring).
    advantages = advantages.masked_fill(zero_var.repeat_interleave(num_generations), 0.0)  # [N]
    num_zero = int(zero_var.sum().item())
    return GroupAdvantages(
        advantages=advantages,
        group_mean=group_mean,
        group_std=group_std,
        num_zero_variance_groups=num_zero,
        frac_zero_variance_groups=num_zero / zero_var.numel(),
    )
