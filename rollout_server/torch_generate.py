"""Batched incremental decoding for a Hugging Face causal LM: all n samples of all prompts in one batch.

Why not `model.generate`: it prefills every sample separately (n times the prompt compute), keeps finished
rows in the batch until the longest one ends, grows its cache by concatenation, and runs a stack of logits
processors and stopping criteria in Python at every step. Here:
  * prompts are left-padded and prefilled ONCE each; the KV cache is then repeated n times;
  * decoding uses a preallocated KV cache where the architecture allows (torch_decoders.StaticDecoder);
  * rows that finished (EOS, stop string, length) are dropped from the batch and the cache;
  * sampling is a few tensor ops (see sampling.py), under `torch.inference_mode`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from rollout_server.sampling import sample_next, sample_next_top
from rollout_server.torch_decoders import make_decoder


@dataclass
class RowResult:
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str = "length"
    stop_hit: str | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per position, with top_logprobs > 0


class StopChecker:
    """Finds stop strings in the decoded tail of a row (decodes only the last few tokens each step)."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tok = tokenizer
        self.stops = stops
        # A token is at least one byte; decoding max_len + 2 trailing tokens covers any stop ending now.
        self.window = max((len(s.encode()) for s in stops), default=0) + 2

    def hit(self, ids: list[int]) -> str | None:
        if not self.stops:
            return None
        tail = self.tok.decode(ids[-self.window :], skip_special_tokens=True)
        for s in self.stops:
            if s in tail:
                return s
        return None


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # [P, T]
    mask = torch.zeros((len(prompts), width), dtype=torch.long)  # [P, T]
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def generate_batch(
    model,
    prompts: list[list[int]],
    *,
    n: int,
    max_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator | None,
    eos_ids: set[int],
    pad_id: int,
    stop: StopChecker,
    ignore_eos: bool = False,
    on_token: Callable[[int, int, bool], None] | None = None,
    decoder=None,
    top_logprobs: int = 0,
) -> list[RowResult]:
    """Returns len(prompts) * n RowResults, prompt-major. `on_token(row, token, finished)` streams tokens.

    `top_logprobs` = k > 0 also records, per position, the k most likely (token id, log-prob) pairs of the
    same distribution the sampled token's log-prob comes from (only then: the default path does no top-k)."""
    device = next(model.parameters()).device
    decoder = decoder or make_decoder(model)
    ids, mask = left_pad(prompts, pad_id, device)  # [P, T], [P, T]
    logits = decoder.prefill(ids, mask, n, max_tokens)  # [B, V]
    rows = [RowResult() for _ in range(len(prompts) * n)]
    if top_logprobs:
        for row in rows:
            row.top_logprobs = []
    alive = list(range(len(rows)))  # original row of each batch row
    finished = [False] * len(rows)  # by batch row: done but not yet dropped from the batch
    eos = torch.tensor(sorted(eos_ids) if not ignore_eos else [], dtype=torch.long, device=device)  # [E]
    for step in range(max_tokens):
        if top_logprobs:
            tokens, lps, top_ids, top_lps = sample_next_top(
                logits, temperature, top_k, top_p, generator, top_logprobs
            )  # [b], [b], [b, k], [b, k]
            top_l = [
                list(zip(i, v, strict=True)) for i, v in zip(top_ids.tolist(), top_lps.tolist(), strict=True)
            ]
        else:
            tokens, lps = sample_next(logits, temperature, top_k, top_p, generator)  # [b], [b]
        is_eos = torch.isin(tokens, eos).tolist() if len(eos) else [False] * len(alive)
        tok_l, lp_l = tokens.tolist(), lps.tolist()
        last = step == max_tokens - 1
        for j, r in enumerate(alive):
            if finished[j]:
                continue
            row = rows[r]
            row.token_ids.append(tok_l[j])
            row.logprobs.append(lp_l[j])
            if top_logprobs:
                row.top_logprobs.append(top_l[j])
            if is_eos[j]:
                row.finish_reason, finished[j] = "stop", True
            elif stop.stops and (s := stop.hit(row.token_ids)) is not None:
                row.finish_reason, row.stop_hit, finished[j] = "stop", s, True
            if on_token is not None:
                on_token(r, tok_l[j], finished[j] or last)
        n_done = sum(finished)
        if last or n_done == len(alive):
            break
        # Drop finished rows once they are an eighth of the batch: a cache copy per finished row costs more.
        if n_done and n_done * 8 >= len(alive):
            keep_l = [j for j, f in enumerate(finished) if not f]
            keep = torch.tensor(keep_l, dtype=torch.long, device=device)  # [b']
            decoder.select(keep)
            tokens = tokens[keep]
            alive = [alive[j] for j in keep_l]
            finished = [False] * len(alive)
        logits = decoder.step(tokens)  # [b, V]
    return rows
