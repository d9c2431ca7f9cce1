"""Chunked log-probs equal the naive full-logits computation: values, entropy, and gradients."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from trainer.logprobs import chunked_token_logprobs, completion_logprobs, grouped_completion_logprobs


def _naive(hidden, head, targets, temperature):
    logits = head(hidden)  # [B, T, V] the full tensor we avoid
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    log_p = logits.log_softmax(-1)
    logp = log_p.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return logp, entropy


def _setup(dtype, b=3, t=10, h=8, v=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g, dtype=dtype)
    head = torch.nn.Linear(h, v, bias=False).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(v, h, generator=g, dtype=dtype))
    targets = torch.randint(0, v, (b, t), generator=g)
    w_lp = torch.randn(b, t, generator=g, dtype=torch.float64)
    w_ent = torch.randn(b, t, generator=g, dtype=torch.float64)
    return hidden, head, targets, w_lp, w_ent


def _values_and_grads(fn, hidden, head, targets, w_lp, w_ent, with_entropy):
    hidden = hidden.clone().requires_grad_(True)
    head.zero_grad()
    logp, entropy = fn(hidden, head, targets)
    objective = (logp.double() * w_lp).sum()
    if with_entropy:
        objective = objective + (entropy.double() * w_ent).sum()
    objective.backward()
    return logp.detach(), (entropy.detach() if with_entropy else None), hidden.grad, head.weight.grad.clone()


@pytest.mark.parametrize("chunk_tokens", [1, 4, 7, 30, 1000])  # 7 does not divide B*T=30; 1000 > B*T
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("keep_logits_bytes", [0, 1 << 30], ids=["recompute", "keep"])
def test_chunked_equals_naive_float64(chunk_tokens, temperature, with_entropy, keep_logits_bytes):
    hidden, head, targets, w_lp, w_ent = _setup(torch.float64)
    ours = _values_and_grads(
        lambda h, m, y: chunked_token_logprobs(
            h, m, y, temperature, chunk_tokens, with_entropy, keep_logits_bytes=keep_logits_bytes
        ),
        hidden, head, targets, w_lp, w_ent, with_entropy,
    )  # fmt: skip
    ref = _values_and_grads(
        lambda h, m, y: _naive(h, m, y, temperature), hidden, head, targets, w_lp, w_ent, with_entropy
    )
    assert ours[0].shape == targets.shape
    assert (ours[1] is None) == (not with_entropy)
    for a, b in zip(ours, ref, strict=True):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert ours[2].abs().max() > 1e-3 and ours[3].abs().max() > 1e-3


def test_chunked_float32_and_bf16_outputs_are_float32():
    hidden, head, targets, w_lp, w_ent = _setup(torch.float32, t=33)
    ours = _values_and_grads(
        lambda h, m, y: chunked_token_logprobs(h, m, y, 0.9, 16, True),
        hidden,
        head,
        targets,
        w_lp,
        w_ent,
        True,
    )
    ref = _values_and_grads(lambda h, m, y: _naive(h, m, y, 0.9), hidden, head, targets, w_lp, w_ent, True)
    assert ours[0].dtype == torch.float32
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # bf16 head: bf16 logits, softmax in float32 (as the naive path with .float()), output float32
    head16, hidden16 = head.bfloat16(), hidden.bfloat16()
    logp, entropy = chunked_token_logprobs(hidden16, head16, targets, chunk_tokens=16, with_entropy=True)
    ref_logp, ref_entropy = _naive(hidden16, head16, targets, 1.0)
    assert logp.dtype == torch.float32 and entropy.dtype == torch.float32
    torch.testing.assert_close(logp, ref_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy, ref_entropy, rtol=1e-5, atol=1e-5)


def test_no_grad_path_and_probability_sanity():
    hidden, head, targets, *_ = _setup(torch.float64)
    with torch.no_grad():
        logp, entropy = chunked_token_logprobs(hidden, head, targets, chunk_tokens=4, with_entropy=True)
    assert not logp.requires_grad
    assert (logp <= 0).all()
    assert ((entropy >= 0) & (entropy <= torch.log(torch.tensor(37.0)) + 1e-9)).all()
    # Summed over every possible target, the probabilities are 1.
    all_targets = torch.arange(37).expand(30, 37).T.reshape(37, 30, 1)  # [V, B*T, 1]
    flat = hidden.reshape(1, 30, 8).expand(37, 30, 8)
    with torch.no_grad():
        lp_all, _ = chunked_token_logprobs(flat, head, all_targets.squeeze(-1), chunk_tokens=64)
    torch.testing.assert_close(lp_all.exp().sum(0), torch.ones(30, dtype=torch.float64))


@pytest.mark.parametrize("budget_logits", [1.0, 0.999])  # the budget as a fraction of the logits' bytes
def test_logits_are_saved_for_backward_only_within_the_budget(budget_logits):
    """What autograd keeps between forward and backward: above ``keep_logits_bytes`` at most the hidden
    states, never [B*T, V] (every chunk is recomputed); within it, the chunks' logits (no recompute)."""
    b, t, h, v = 2, 64, 4, 500
    hidden, head, targets, *_ = _setup(torch.float32, b=b, t=t, h=h, v=v)
    hidden.requires_grad_(True)
    saved_numels = []

    def pack(x):
        saved_numels.append(x.numel())
        return x

    budget = int(b * t * v * 4 * budget_logits)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        logp, _ = chunked_token_logprobs(
            hidden, head, targets, chunk_tokens=16, with_entropy=True, keep_logits_bytes=budget
        )
    if budget_logits < 1:
        # chunks of hidden, never logits (b*t*v = 64,000)
        assert saved_numels and max(saved_numels) <= b * t * h
    else:
        assert max(saved_numels) == 16 * v  # each chunk's logits
    logp.sum().backward()
    assert hidden.grad is not None and head.weight.grad is not None


def _tiny_qwen2(seed=0):
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    return Qwen2ForCausalLM(cfg).double().eval()


def _left_padded_batch():
    """Three rows: prompts of 5, 3 and 1 tokens left-padded to 5; completions of 4 tokens."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 256, (n,), generator=g) for n in (5, 3, 1)]
    completion = torch.randint(1, 256, (3, 4), generator=g)
    ids = torch.zeros(3, 9, dtype=torch.long)
    mask = torch.zeros(3, 9, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, 5 - len(p) : 5] = p
        mask[i, 5 - len(p) :] = 1
    ids[:, 5:] = completion
    return prompts, completion, ids, mask


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_completion_logprobs_match_naive_model_logits(temperature):
    model = _tiny_qwen2()
    _, completion, ids, mask = _left_padded_batch()
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)

    logp, entropy = completion_logprobs(model, ids, mask, 4, temperature, chunk_tokens=5, with_entropy=True)
    (logp * torch.linspace(-1, 1, 12).view(3, 4)).sum().backward()
    ours_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits  # [B, L, V]
    log_p = (logits[:, -5:-1] / temperature).log_softmax(-1)  # [B, K, V] positions predicting the completion
    ref = log_p.gather(-1, completion.unsqueeze(-1)).squeeze(-1)
    ref_entropy = -(log_p.exp() * log_p).sum(-1)
    (ref * torch.linspace(-1, 1, 12).view(3, 4)).sum().backward()

    torch.testing.assert_close(logp, ref.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(entropy, ref_entropy.detach(), rtol=1e-10, atol=1e-10)
    for name, param in model.named_parameters():
        torch.testing.assert_close(ours_grads[name], param.grad, rtol=1e-9, atol=1e-12, msg=name)
    assert ours_grads["model.embed_tokens.weight"].abs().max() > 0


def test_left_padding_does_not_change_completion_logprobs():
    """A left-padded row scores exactly like the same prompt + completion with no padding (as vLLM sees it)."""
    model = _tiny_qwen2()
    prompts, completion, ids, mask = _left_padded_batch()
    with torch.no_grad():
        padded, _ = completion_logprobs(model, ids, mask, 4)
        for i, prompt in enumerate(prompts):
            row = torch.cat([prompt, completion[i]]).unsqueeze(0)
            alone, _ = completion_logprobs(model, row, torch.ones_like(row), 4)
            torch.testing.assert_close(padded[i], alone[0], rtol=1e-9, atol=1e-9)


def _grouped_batch():
    """Two distinct prompts (5 and 3 tokens, left-padded) continued by 5 rows of 1-4 completion tokens."""
    g = torch.Generator().manual_seed(2)
    prompt_ids = torch.zeros(2, 5, dtype=torch.long)
    prompt_mask = torch.zeros(2, 5, dtype=torch.long)
    prompt_ids[0] = torch.randint(1, 256, (5,), generator=g)
    prompt_mask[0] = 1
    prompt_ids[1, 2:] = torch.randint(1, 256, (3,), generator=g)
    prompt_mask[1, 2:] = 1
    index = torch.tensor([0, 0, 1, 0, 1])
    completion_ids = torch.randint(1, 256, (5, 4), generator=g)
    completion_attn = torch.ones(5, 4, dtype=torch.long)
    for row, length in ((1, 2), (2, 1), (4, 3)):
        completion_attn[row, length:] = 0
        completion_ids[row, length:] = 0
    return prompt_ids, prompt_mask, index, completion_ids, completion_attn


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_shared_prompts_give_the_same_logprobs_and_gradients_as_full_rows(temperature):
    """Each prompt once + its rows on its cached keys/values == every row as prompt + completion."""
    model = _tiny_qwen2()
    batch = _grouped_batch()
    real = batch[4].bool()
    weights = torch.linspace(-1, 1, 20, dtype=torch.float64).view(5, 4)
    results = []
    for share in (True, False):
        model.zero_grad()
        logp, entropy = grouped_completion_logprobs(
            model, *batch, temperature=temperature, chunk_tokens=3, with_entropy=True, share_prompts=share
        )
        ((logp + 0.3 * entropy) * weights * real).sum().backward()
        results.append(
            (logp.detach(), entropy.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
        )
    (lp_s, ent_s, grads_s), (lp_f, ent_f, grads_f) = results
    torch.testing.assert_close(lp_s[real], lp_f[real], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ent_s[real], ent_f[real], rtol=1e-10, atol=1e-10)
    # Gradients agree to float32 rounding, not float64's: HF's RMSNorm computes in float32 even in a float64
    # model, and the shared path sums a prompt's gradient over its rows before that norm, the full rows after.
    for name in grads_f:
        scale = grads_f[name].abs().max()
        torch.testing.assert_close(grads_s[name], grads_f[name], rtol=0, atol=float(scale) * 1e-6, msg=name)
    assert grads_s["model.embed_tokens.weight"].abs().max() > 0
    # and the full rows are the naive reference's (tested above), so the shared path is too: spot-check a row
    ids = torch.cat([batch[0][0], batch[3][0]]).unsqueeze(0)  # row 0: prompt 0 (no padding) + 4 tokens
    alone, _ = completion_logprobs(model, ids, torch.ones_like(ids), 4, temperature)
    torch.testing.assert_close(lp_s[0], alone[0].detach(), rtol=1e-10, atol=1e-10)


def test_shared_prompts_run_each_prompt_once_unless_checkpointing():
    model = _tiny_qwen2()
    shapes = []
    model.model.embed_tokens.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    batch = _grouped_batch()
    with torch.no_grad():
        grouped_completion_logprobs(model, *batch, share_prompts=True)
        assert shapes == [(2, 5), (5, 4)]  # 2 prompts once, then 5 rows of completion tokens
        shapes.clear()
        grouped_completion_logprobs(model, *batch, share_prompts=False)
        assert shapes == [(5, 9)]
    shapes.clear()
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    logp, _ = grouped_completion_logprobs(model, *batch, share_prompts=True)
    logp.sum().backward()
    assert shapes[0] == (5, 9)  # recomputing layers would re-append to a cache: full rows instead


def test_rejects_bad_arguments():
    hidden, head, targets, *_ = _setup(torch.float32)
    with pytest.raises(ValueError):
        chunked_token_logprobs(hidden, head, targets, temperature=0.0)
    with pytest.raises(ValueError):
        chunked_token_logprobs(hidden, head, targets[:, :-1])
    with pytest.raises(ValueError):
        completion_logprobs(_tiny_qwen2(), torch.ones(1, 4, dtype=torch.long), torch.ones(1, 4), 4)
