"""Token sampling with the log-prob convention of the whole project.

The log-prob returned for a sampled token is `log_softmax(logits / temperature)[token]`, computed BEFORE the
top-k / top-p truncation (the trainer recomputes exactly this from the same weights; truncation only changes
which tokens can be drawn). Greedy (temperature 0) returns `log_softmax(logits)[argmax]`.
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


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row. logits: [B, V] (any float dtype). Returns (tokens [B], logprobs [B] float32)."""
    logits = logits.float()  # [B, V]
    if temperature == 0.0:
        tokens = logits.argmax(dim=-1)  # [B]
        logp = torch.log_softmax(logits, dim=-1)  # [B, V]
        return tokens, logp.gather(-1, tokens[:, None])[:, 0]
    scaled = logits / temperature  # [B, V]
    logp = torch.log_softmax(scaled, dim=-1)  # [B, V]  (pre-truncation: the returned convention)
    probs = torch.softmax(truncate_logits(scaled, top_k, top_p), dim=-1)  # [B, V]
    # Inverse-CDF draw: one uniform per row (multinomial draws one exponential per vocab entry: 10x slower).
    cdf = probs.cumsum(dim=-1)  # [B, V]
    u = torch.rand((probs.shape[0], 1), generator=generator, device=probs.device) * cdf[:, -1:]  # [B, 1]
    tokens = torch.searchsorted(cdf, u, right=True)[:, 0].clamp_(max=probs.shape[-1] - 1)  # [B]
    return tokens, logp.gather(-1, tokens[:, None])[:, 0]
