"""Group-relative advantages: definitions, scaling modes, zero-variance groups, unscorable (NaN) rewards."""

from __future__ import annotations

import pytest
import torch

from trainer.advantages import group_advantages


def test_group_mode_is_centred_and_scaled_by_sample_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 4.0, 6.0, 8.0])
    out = group_advantages(rewards, num_generations=4, scale_rewards="group", eps=0.0)
    torch.testing.assert_close(out.group_mean, torch.tensor([0.25, 5.0]))
    torch.testing.assert_close(out.group_std, torch.stack([rewards[:4].std(), rewards[4:].std()]))  # Bessel
    expected = torch.cat([(rewards[:4] - 0.25) / rewards[:4].std(), (rewards[4:] - 5.0) / rewards[4:].std()])
    torch.testing.assert_close(out.advantages, expected)
    # Each group's advantages sum to zero and have unit sample std.
    for grp in out.advantages.view(2, 4):
        assert grp.sum().abs() < 1e-5
        assert grp.std().item() == pytest.approx(1.0, abs=1e-5)


def test_batch_and_none_modes():
    rewards = torch.tensor([1.0, 0.0, 3.0, 5.0])
    batch = group_advantages(rewards, num_generations=2, scale_rewards="batch", eps=1e-4)
    centred = torch.tensor([0.5, -0.5, -1.0, 1.0])
    torch.testing.assert_close(batch.advantages, centred / (rewards.std() + 1e-4))
    none = group_advantages(rewards, num_generations=2, scale_rewards="none")
    torch.testing.assert_close(none.advantages, centred)


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_zero_variance_groups_give_exact_zero_advantages(scale_rewards):
    rewards = torch.tensor([0.1, 0.1, 0.1, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0])  # 0.1 * 3 / 3 != 0.1 in float
    out = group_advantages(rewards, num_generations=3, scale_rewards=scale_rewards)
    assert torch.equal(out.advantages[:3], torch.zeros(3))
    assert torch.equal(out.advantages[6:], torch.zeros(3))
    assert (out.advantages[3:6] != 0).all()
    assert out.num_zero_variance_groups == 2
    assert out.frac_zero_variance_groups == pytest.approx(2 / 3)


def test_nan_reward_is_excluded_and_gets_zero_advantage():
    rewards = torch.tensor([1.0, float("nan"), 0.0, 2.0])
    out = group_advantages(rewards, num_generations=4, scale_rewards="group", eps=0.0)
    assert out.advantages[1] == 0
    assert out.group_mean.item() == pytest.approx(1.0)  # mean of the three scorable rewards
    assert out.group_std.item() == pytest.approx(1.0)  # sample std of [1, 0, 2]
    torch.testing.assert_close(out.advantages[[0, 2, 3]], torch.tensor([0.0, -1.0, 1.0]))
    assert not torch.isnan(out.advantages).any()


def test_single_generation_groups_do_not_produce_nan():
    out = group_advantages(torch.tensor([1.0, 0.0, 3.0]), num_generations=1)
    assert torch.equal(out.advantages, torch.zeros(3))
    assert out.num_zero_variance_groups == 3


def test_rejects_bad_shapes_and_modes():
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(5), num_generations=2)
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(2, 2), num_generations=2)
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(4), num_generations=2, scale_rewards="global")  # type: ignore[arg-type]
