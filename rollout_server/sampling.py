"""Token sampling with the log-prob convention of the whole project.

The log-prob returned for a sampled token is `log_softmax(logits / temperature)[token]`, computed BEFORE the
top-k / top-p truncation (the trainer recomputes exactly this from the same weights; truncation only changes
which tokens can be drawn). Greedy (temperature 0) returns `log_softmax(logits)[argmax]`. The top-k
alternatives of `sample_next_top` (OpenAI's `top_logprobs`) come from the same table, so the sampled token's
value and its alternatives' agree; the default `sample_next` computes no top-k.
"""

from __future__ import annotations

import torch


def truncate_logits(scaled: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the top-p nucleus. scaled: [B, V]."""
    if top_k and top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]  # [B, 1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)  # [B, V]
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)  # [B, V]
        # Drop a token when the mass BEFORE it already reaches top_p (the first token is always kept).
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p  # [B, V]
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # [B, V]
        scaled = scaled.masked_fill(drop, float("-inf"))
    return scaled


# What OpenAI (and vLLM) report for a token that cannot be drawn (-inf is not JSON).
IMPOSSIBLE_LOGPROB = -9999.0


def _draw(
    logits: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [B], logp [B, V]): one token per row and the full log-prob table of the convention."""
    logits = logits.float()  # [B, V]
    if temperature == 0.0:
        return logits.argmax(dim=-1), torch.log_softmax(logits, dim=-1)  # [B], [B, V]
    scaled = logits / temperature  # [B, V]
    logp = torch.log_softmax(scaled, dim=-1)  # [B, V]  (pre-truncation: the returned convention)
    probs = torch.softmax(truncate_logits(scaled, top_k, top_p), dim=-1)  # [B, V]
    # Inverse-CDF draw: one uniform per row (multinomial draws one exponential per vocab entry: 10x slower).
    cdf = probs.cumsum(dim=-1)  # [B, V]
    u = torch.rand((probs.shape[0], 1), generator=generator, device=probs.device) * cdf[:, -1:]  # [B, 1]
    tokens = torch.searchsorted(cdf, u, right=True)[:, 0].clamp_(max=probs.shape[-1] - 1)  # [B]
    return tokens, logp


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row. logits: [B, V] (any float dtype). Returns (tokens [B], logprobs [B] float32)."""
    tokens, logp = _draw(logits, temperature, top_k, top_p, generator)
    return tokens, logp.gather(-1, tokens[:, None])[:, 0]


def sample_next_top(
    logits: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator | None,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`sample_next` plus the k most likely tokens of the SAME log-prob table (the convention's, before
    truncation), most likely first. Draws exactly what `sample_next` draws with the same generator.

    Returns (tokens [B], logprobs [B], top_ids [B, k], top_logprobs [B, k]); -inf reads IMPOSSIBLE_LOGPROB.
    """
    tokens, logp = _draw(logits, temperature, top_k, top_p, generator)
    top = torch.topk(logp, min(k, logp.shape[-1]), dim=-1)  # sorted, descending
    return (
        tokens,
        logp.gather(-1, tokens[:, None])[:, 0],
        top.indices,
        top.values.clamp(min=IMPOSSIBLE_LOGPROB),
    )
