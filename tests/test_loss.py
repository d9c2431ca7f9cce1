"""GRPO loss: hand-checked values, invariance of the reduction to micro-batch / rank splits, edge cases."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from trainer.loss import LossConfig, LossNormalizer, grpo_loss, reduce_per_token_loss

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo"]
DT = torch.float64


def _batch(seed, n=12, t=7):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(n, t, generator=g) > 0.3).long()
    mask[3] = 0  # an all-masked completion (e.g. a truncated one dropped by the caller)
    logps = -torch.rand(n, t, generator=g, dtype=DT) * 2 - 0.01
    return dict(
        logps=logps,
        old=logps + 0.25 * torch.randn(n, t, generator=g, dtype=DT),
        ref=logps + 0.2 * torch.randn(n, t, generator=g, dtype=DT),
        rollout=logps + 0.5 * torch.randn(n, t, generator=g, dtype=DT),
        adv=torch.randn(n, generator=g, dtype=DT),
        mask=mask,
    )


def _loss(cfg, d, logps, idx, norm):
    return grpo_loss(
        logps[idx],
        d["adv"][idx],
        d["mask"][idx],
        old_logprobs=d["old"][idx],
        ref_logprobs=d["ref"][idx],
        rollout_logprobs=d["rollout"][idx],
        config=cfg,
        normalizer=norm,
    ).loss


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradient_is_invariant_to_rank_and_micro_batch_split(loss_type, seed):
    """Full batch on one rank == DeepSpeed's average over ranks of the sum over each rank's micro-batches."""
    cfg = LossConfig(
        loss_type=loss_type, num_iterations=2, beta=0.05, epsilon_high=0.28, importance_sampling_cap=2.0
    )
    d = _batch(seed)
    n = d["mask"].shape[0]

    logps = d["logps"].clone().requires_grad_(True)
    full_norm = LossNormalizer.from_completion_mask(d["mask"], max_completion_length=9, num_ranks=1)
    full_loss = _loss(cfg, d, logps, torch.arange(n), full_norm)
    (full_grad,) = torch.autograd.grad(full_loss, logps)

    g = torch.Generator().manual_seed(100 + seed)
    for num_ranks in (1, 2, 3):
        perm = torch.randperm(n, generator=g)
        norm = LossNormalizer.from_completion_mask(d["mask"], max_completion_length=9, num_ranks=num_ranks)
        logps = d["logps"].clone().requires_grad_(True)
        per_rank_grads, loss_sum = [], 0.0
        for rank_rows in perm.tensor_split(num_ranks):
            # Random, unequal micro-batches on each rank (token-budget packing gives unequal sizes).
            cuts = sorted(torch.randint(1, len(rank_rows), (2,), generator=g).tolist())
            micro = [m for m in rank_rows.tensor_split(cuts) if len(m)]
            rank_loss = sum(_loss(cfg, d, logps, rows, norm) for rows in micro)
            (grad,) = torch.autograd.grad(rank_loss, logps)
            per_rank_grads.append(grad)
            loss_sum += rank_loss.item()
        averaged = torch.stack(per_rank_grads).mean(0)  # what DeepSpeed's all-reduce leaves on every rank
        torch.testing.assert_close(averaged, full_grad, rtol=1e-12, atol=1e-12)
        assert loss_sum / num_ranks == pytest.approx(full_loss.item(), abs=1e-12)
    assert full_grad.abs().max() > 1e-3


def test_reductions_by_hand():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 0.0, 0.0, 0.0]], dtype=DT)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    norm = LossNormalizer(total_sequences=4, total_completion_tokens=8, max_completion_length=5)
    assert reduce_per_token_loss(per_token, mask, "grpo", norm).item() == pytest.approx((2.0 + 10.0) / 4)
    assert reduce_per_token_loss(per_token, mask, "bnpo", norm).item() == pytest.approx(16.0 / 8)
    assert reduce_per_token_loss(per_token, mask, "dapo", norm).item() == pytest.approx(16.0 / 8)
    assert reduce_per_token_loss(per_token, mask, "dr_grpo", norm).item() == pytest.approx(16.0 / 20)
    two_ranks = norm.model_copy(update={"num_ranks": 2})
    assert reduce_per_token_loss(per_token, mask, "dapo", two_ranks).item() == pytest.approx(2 * 16.0 / 8)


def test_on_policy_loss_is_the_policy_gradient():
    """num_iterations=1: ratio == 1, loss value is -mean(A), gradient is -A_i / n_i / N per token (grpo)."""
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -9.0]], dtype=DT, requires_grad=True)
    adv = torch.tensor([2.0, -1.0], dtype=DT)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    norm = LossNormalizer.from_completion_mask(mask, max_completion_length=3)
    out = grpo_loss(logps, adv, mask, config=LossConfig(loss_type="grpo"), normalizer=norm)
    assert out.loss.item() == pytest.approx(-(2.0 - 1.0) / 2)
    out.loss.backward()
    expected = torch.tensor([[-2 / 3 / 2] * 3, [1 / 2 / 2, 1 / 2 / 2, 0.0]], dtype=DT)
    torch.testing.assert_close(logps.grad, expected)
    assert out.metrics["ratio_mean"].item() == pytest.approx(1.0)
    assert out.metrics["clip_frac_region"].item() == 0.0


def test_clipping_metrics_and_gradient_cut():
    # ratios: e^0.5 = 1.65 (A > 0: clipped high), e^-0.5 = 0.61 (A < 0: clipped low), 1.1 (inside)
    old = torch.zeros(2, 3, dtype=DT)
    logps = torch.tensor(
        [[0.5, math.log(1.1), 0.0], [-0.5, math.log(1.1), 0.0]], dtype=DT, requires_grad=True
    )
    adv = torch.tensor([1.0, -1.0], dtype=DT)
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    cfg = LossConfig(loss_type="dapo", num_iterations=2, epsilon=0.2, epsilon_high=0.28)
    norm = LossNormalizer.from_completion_mask(mask, max_completion_length=3)
    out = grpo_loss(logps, adv, mask, old_logprobs=old, config=cfg, normalizer=norm)
    out.loss.backward()
    assert out.metrics["clip_frac_high"].item() == pytest.approx(1 / 4)
    assert out.metrics["clip_frac_low"].item() == pytest.approx(1 / 4)
    assert out.metrics["clip_frac_region"].item() == pytest.approx(2 / 4)
    assert logps.grad[0, 0] == 0 and logps.grad[1, 0] == 0  # clipped tokens get no gradient
    assert logps.grad[0, 1] == pytest.approx(-1.1 / 4) and logps.grad[1, 1] == pytest.approx(1.1 / 4)
    assert out.metrics["num_tokens"].item() == 4


def test_importance_weight_is_truncated_and_detached():
    logps = torch.zeros(1, 3, dtype=DT, requires_grad=True)
    rollout = torch.tensor([[-2.0, 0.1, float("nan")]], dtype=DT)  # weights e^2 -> cap 3, e^-0.1, NaN -> 1
    cfg = LossConfig(loss_type="dapo", importance_sampling_cap=3.0)
    mask = torch.ones(1, 3)
    norm = LossNormalizer.from_completion_mask(mask, max_completion_length=3)
    out = grpo_loss(
        logps, torch.tensor([1.0], dtype=DT), mask, rollout_logprobs=rollout, config=cfg, normalizer=norm
    )
    weights = torch.tensor([3.0, math.exp(-0.1), 1.0], dtype=DT)
    assert out.loss.item() == pytest.approx(-weights.sum().item() / 3)
    out.loss.backward()
    torch.testing.assert_close(logps.grad, -weights.view(1, 3) / 3)
    assert out.metrics["is_capped_frac"].item() == pytest.approx(1 / 3)
    assert out.metrics["is_weight_mean"].item() == pytest.approx(weights.mean().item())


def test_kl_penalty_is_k3_and_zero_at_reference():
    logps = torch.tensor([[-1.0, -2.0]], dtype=DT, requires_grad=True)
    mask = torch.ones(1, 2)
    norm = LossNormalizer.from_completion_mask(mask, max_completion_length=2)
    cfg = LossConfig(loss_type="dapo", beta=0.5)
    zero_adv = torch.zeros(1, dtype=DT)
    at_ref = grpo_loss(logps, zero_adv, mask, ref_logprobs=logps.detach(), config=cfg, normalizer=norm)
    assert at_ref.loss.item() == 0.0 and at_ref.metrics["kl_mean"].item() == 0.0
    ref = torch.tensor([[-1.5, -1.0]], dtype=DT)
    out = grpo_loss(logps, zero_adv, mask, ref_logprobs=ref, config=cfg, normalizer=norm)
    delta = ref - logps.detach()
    k3 = (delta.exp() - delta - 1).mean().item()
    assert out.metrics["kl_mean"].item() == pytest.approx(k3) and k3 > 0
    assert out.loss.item() == pytest.approx(0.5 * k3)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_masked_rows_and_garbage_never_give_nan(loss_type):
    logps = torch.tensor([[-1.0, -2.0], [float("-inf"), float("nan")]], dtype=DT, requires_grad=True)
    old = torch.tensor([[-1.1, -2.0], [5.0, float("nan")]], dtype=DT)
    mask = torch.tensor([[1, 1], [0, 0]])  # row 1 is all masked and holds garbage
    cfg = LossConfig(loss_type=loss_type, num_iterations=2, beta=0.1, importance_sampling_cap=2.0)
    norm = LossNormalizer.from_completion_mask(mask, max_completion_length=2)
    out = grpo_loss(
        logps,
        torch.tensor([1.0, -1.0], dtype=DT),
        mask,
        old_logprobs=old,
        ref_logprobs=old,
        rollout_logprobs=old,
        entropy=torch.ones(2, 2),
        config=cfg,
        normalizer=norm,
    )
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert torch.isfinite(logps.grad).all() and (logps.grad[1] == 0).all()
    assert all(torch.isfinite(v) for v in out.metrics.values())
    # A micro-batch with no unmasked token at all: loss 0, gradient 0.
    empty = grpo_loss(logps[1:], torch.ones(1, dtype=DT), mask[1:], old_logprobs=old[1:], ref_logprobs=old[1:],
                      rollout_logprobs=old[1:], config=cfg, normalizer=norm)  # fmt: skip
    assert empty.loss.item() == 0.0 and all(torch.isfinite(v) for v in empty.metrics.values())


def test_config_validation_and_required_inputs():
    with pytest.raises(ValidationError):
        LossConfig(loss_type="cispo")
    with pytest.raises(ValidationError):
        LossConfig(epsilon=-0.1)
    with pytest.raises(ValidationError):
        LossConfig(importance_sampling_cap=0.5)
    with pytest.raises(ValidationError):
        LossConfig(unknown_field=1)
    assert LossConfig(epsilon=0.2).epsilon_high_value == 0.2
    mask = torch.ones(1, 2)
    norm = LossNormalizer.from_completion_mask(mask, max_completion_length=2)
    lp, adv = torch.zeros(1, 2), torch.zeros(1)
    with pytest.raises(ValueError, match="old_logprobs"):
        grpo_loss(lp, adv, mask, config=LossConfig(num_iterations=2), normalizer=norm)
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(lp, adv, mask, config=LossConfig(beta=0.1), normalizer=norm)
    with pytest.raises(ValueError, match="rollout_logprobs"):
        grpo_loss(lp, adv, mask, config=LossConfig(importance_sampling_cap=2.0), normalizer=norm)
    with pytest.raises(ValueError):
        grpo_loss(lp, torch.zeros(2), mask, config=LossConfig(), normalizer=norm)
