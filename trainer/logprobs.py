"""Per-token log-probs (and entropy) of sampled tokens, computed in chunks of tokens.

Why: the full float32 logits of 16 completions x 8k tokens x 151,936 vocab are ~80 GB, and autograd would keep
them (plus the log-softmax and its gradient) alive until backward. Here the tokens are cut into chunks of
``chunk_tokens`` rows; each chunk runs ``head -> float32 log-softmax -> gather`` under a non-reentrant
``torch.utils.checkpoint``, so the forward keeps only the chunk's hidden states, and backward recomputes one
chunk's logits at a time. Peak extra memory is ~3 x chunk_tokens x vocab x 4 bytes, whatever B and T are.

When a micro-batch's logits are small (at most ``KEEP_LOGITS_BYTES``, judged from the head's
``out_features``), the chunks are not checkpointed: their logits stay alive for backward instead of being
recomputed, which saves one head matmul per chunk (close to half the forward of a small model with a
64-wide body and a 1k vocabulary) and costs at most that many bytes.

Inside a chunk a small autograd Function turns logits into (log-prob of the target, entropy) with a hand
written backward (d logp_y / dz = onehot(y) - p, dH / dz = -p (log p + H)), so it never stores the
log-softmax matrix nor builds the one-hot scatter that ``log_softmax(...).gather(...)`` would.

Convention (shared with the rollout servers, see ARCHITECTURE.md): ``log_softmax(logits / temperature)``,
computed in float32 whatever the model dtype.

Shared prompts: GRPO scores G completions of each prompt, so a micro-batch's [B, prompt + completion] input
repeats every prompt G times. ``grouped_completion_logprobs`` runs each distinct prompt once (keeping its
keys/values, with their autograd history), selects them per row, and runs only the completion tokens on top:
the same log-probs and gradients (the selection's backward sums the rows' gradients into the prompt pass),
with B x prompt fewer tokens through the body. Not under gradient checkpointing: recomputing a layer would
append its keys to the cache a second time.

ZeRO-3: ``head`` is *called* (``head(hidden_chunk)``), never read through ``.weight``, because a partitioned
weight is only gathered inside the module's forward. The head is therefore called once per chunk in forward
and once more per chunk in backward; with ZeRO-3 each call gathers the head weight (use large chunks, or wrap
the call in ``deepspeed.zero.GatheredParameters`` if that gather dominates).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

# Logits up to this size are kept for backward rather than recomputed (see the module docstring). 64 MiB is
# small next to the activations a micro-batch keeps anyway; a 150k-vocabulary model passes it at ~100 tokens,
# so every realistic GSM8K micro-batch of a real model still takes the recomputing path.
KEEP_LOGITS_BYTES = 64 << 20


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    """float32 for bf16/fp16/fp32 models; float64 stays float64 (lets tests compare tightly)."""
    return torch.promote_types(logits.dtype, torch.float32)


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / temperature in the compute dtype; returns ``logits`` itself (no copy) when nothing changes."""
    z = logits.to(_compute_dtype(logits))
    return z / temperature if temperature != 1.0 else z


class _TargetLogprobAndEntropy(torch.autograd.Function):
    """logits [C, V] (any float dtype), targets [C] -> (log p(target) [C], entropy [C]), both fp32 (fp64 for fp64).

    Every [C, V] pass costs memory bandwidth (and, on CPU, page faults for each fresh buffer), so both
    directions use as few full-vocabulary passes and buffers as they can: at most 3 [C, V] buffers alive.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool):
        z = _scaled(logits, temperature)  # [C, V]
        row_max = z.amax(dim=-1, keepdim=True)  # [C, 1]
        e = (z - row_max).exp_()  # [C, V] unnormalised probabilities
        denom = e.sum(dim=-1)  # [C]
        lse = row_max.squeeze(-1) + denom.log()  # [C] log-sum-exp
        logp = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse  # [C]
        if with_entropy:
            # H = lse - E_p[z], with E_p[z] = <e, z> / denom as one batched dot product (no [C, V] temporary)
            entropy = lse - torch.bmm(e.unsqueeze(1), z.unsqueeze(2)).view(-1) / denom  # [C]
        else:
            entropy = torch.zeros_like(lse)  # [C]
            ctx.mark_non_differentiable(entropy)
        ctx.save_for_backward(logits, targets, lse, entropy)
        ctx.temperature = temperature
        ctx.with_entropy = with_entropy
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp: torch.Tensor, grad_entropy: torch.Tensor):
        logits, targets, lse, entropy = ctx.saved_tensors
        z = _scaled(logits, ctx.temperature)  # [C, V]
        p = (z - lse.unsqueeze(-1)).exp_()  # [C, V] softmax
        if ctx.with_entropy:
            # dlogp_y/dz = onehot(y) - p;  dH/dz = -p (log p + H) = -p (z - lse + H)
            # => dL/dz = -p * (g_lp + g_H (z - lse + H)) + g_lp onehot(y)
            shift = (lse - entropy).unsqueeze(-1)  # [C, 1]
            coef = z.sub_(shift) if z is not logits else z - shift  # [C, V] reuse z when it is our own copy
            coef.mul_(grad_entropy.unsqueeze(-1)).add_(grad_logp.unsqueeze(-1))
            grad_z = p.mul_(coef).neg_()  # [C, V]
            del coef
        else:
            grad_z = p.mul_(-grad_logp.unsqueeze(-1))  # [C, V]
        del z
        grad_z.scatter_add_(-1, targets.unsqueeze(-1), grad_logp.unsqueeze(-1))
        if ctx.temperature != 1.0:
            grad_z.div_(ctx.temperature)
        return grad_z.to(logits.dtype), None, None, None


def chunked_token_logprobs(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    targets: torch.Tensor,
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
    with_entropy: bool = False,
    keep_logits_bytes: int = KEEP_LOGITS_BYTES,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of ``targets`` under ``log_softmax(head(hidden) / temperature)``, never holding full logits
    (unless they fit in ``keep_logits_bytes``: then they are kept for backward instead of recomputed).

    hidden [B, T, H] are the states that *predict* targets [B, T] (already shifted by the caller). Returns
    (logprobs [B, T] float32, entropy [B, T] float32 or None). Both are differentiable w.r.t. ``hidden`` and
    the head's parameters; the entropy is the full-vocabulary entropy of the tempered distribution.
    (Outputs are float64 if the head returns float64 logits.)
    """
    if hidden.dim() != 3 or targets.shape != hidden.shape[:2]:
        raise ValueError(
            f"need hidden [B, T, H] and targets [B, T], got {tuple(hidden.shape)} / {tuple(targets.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    batch, length, width = hidden.shape
    flat_hidden = hidden.reshape(batch * length, width)  # [B*T, H]
    flat_targets = targets.reshape(batch * length).long()  # [B*T]

    def one_chunk(h: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _TargetLogprobAndEntropy.apply(head(h), y, temperature, with_entropy)  # [C], [C]

    # Recompute in backward only when a backward can happen (under no_grad plain calls are cheaper) and the
    # logits are too large to keep. A head without ``out_features`` is always recomputed.
    vocab = getattr(head, "out_features", None)
    small = vocab is not None and batch * length * vocab * hidden.element_size() <= keep_logits_bytes
    recompute = torch.is_grad_enabled() and not small
    logps, entropies = [], []
    for start in range(0, batch * length, chunk_tokens):
        h = flat_hidden[start : start + chunk_tokens]  # [C, H]
        y = flat_targets[start : start + chunk_tokens]  # [C]
        if recompute:
            lp, ent = checkpoint(one_chunk, h, y, use_reentrant=False)
        else:
            lp, ent = one_chunk(h, y)
        logps.append(lp)
        entropies.append(ent)

    if not logps:  # B*T == 0
        empty = hidden.new_zeros((batch, length), dtype=torch.promote_types(hidden.dtype, torch.float32))
        return empty, (empty.clone() if with_entropy else None)
    logprobs = torch.cat(logps).view(batch, length)  # [B, T]
    entropy = torch.cat(entropies).view(batch, length) if with_entropy else None  # [B, T]
    return logprobs, entropy


def completion_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    num_completion_tokens: int,
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of the last ``num_completion_tokens`` tokens of ``input_ids`` [B, L] under a HF causal LM.

    ``input_ids`` = left-padded prompt + right-padded completion (K = ``num_completion_tokens`` columns).
    Runs the transformer body (``model.get_decoder()``) for the last hidden state, then the chunked head on the
    K positions that predict the completion tokens (position t predicts token t + 1). Position ids count real
    tokens only (``cumsum(attention_mask) - 1``), as HF ``generate`` and vLLM do, so a left-padded row scores
    like the same row unpadded. ``model`` is the HF model itself, not a DeepSpeed engine; under DeepSpeed call
    this from inside the engine's forward (a wrapper module) so ZeRO's per-forward bookkeeping runs.
    Returns (logprobs [B, K] float32, entropy [B, K] or None); padded completion positions hold garbage
    values that the caller masks with the completion mask.
    """
    seq_len = input_ids.shape[1]
    if not 1 <= num_completion_tokens < seq_len:
        raise ValueError(f"num_completion_tokens must be in [1, {seq_len - 1}], got {num_completion_tokens}")
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, L]
    body = model.get_decoder()
    out = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    k = num_completion_tokens
    hidden = out.last_hidden_state[:, seq_len - k - 1 : seq_len - 1]  # [B, K, H]
    targets = input_ids[:, seq_len - k :]  # [B, K]
    return chunked_token_logprobs(
        hidden,
        model.get_output_embeddings(),
        targets,
        temperature=temperature,
        chunk_tokens=chunk_tokens,
        with_entropy=with_entropy,
    )


def _prompt_sharing_possible(body: torch.nn.Module) -> bool:
    """The two-pass path needs a cache that records autograd history; HF gradient checkpointing recomputes
    layers (and would re-append to the cache) and turns ``use_cache`` off while training."""
    return not (getattr(body, "gradient_checkpointing", False) and body.training)


def grouped_completion_logprobs(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    prompt_index: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_attn: torch.Tensor,
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
    with_entropy: bool = False,
    share_prompts: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of completions whose prompts are given once each: row b continues prompt ``prompt_index[b]``.

    prompt_ids / prompt_mask [U, Lp] (left-padded distinct prompts), prompt_index [B] (long), completion_ids /
    completion_attn [B, K] (right-padded). Returns what ``completion_logprobs`` returns for the concatenated
    rows (logprobs [B, K], entropy [B, K] or None). With ``share_prompts`` each prompt goes through the body
    once and its rows attend to its cached keys/values; otherwise the rows are concatenated and scored in one
    pass. The choice never depends on the data (not even when no prompt repeats): under ZeRO-3 every rank
    must call the body the same number of times, since each call all-gathers the partitioned weights.
    """
    k = completion_ids.shape[1]
    body = model.get_decoder()
    if not share_prompts or not _prompt_sharing_possible(body):
        ids = torch.cat([prompt_ids[prompt_index], completion_ids], dim=1)  # [B, Lp + K]
        attn = torch.cat([prompt_mask[prompt_index], completion_attn], dim=1)  # [B, Lp + K]
        return completion_logprobs(model, ids, attn, k, temperature, chunk_tokens, with_entropy)
    from transformers import DynamicCache

    # 1. Each distinct prompt once; position ids count real tokens (as in ``completion_logprobs``).
    prompt_pos = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)  # [U, Lp]
    cache = DynamicCache(config=getattr(body, "config", None))
    prompt_out = body(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=prompt_pos,
        past_key_values=cache,
        use_cache=True,
    )
    # 2. Row b's copy of its prompt's keys/values (indexing is differentiable: backward sums over rows).
    cache.batch_select_indices(prompt_index)
    prompt_len = prompt_mask.long().sum(-1)[prompt_index]  # [B]
    completion_pos = prompt_len[:, None] + torch.arange(k, device=completion_ids.device)[None]  # [B, K]
    attn = torch.cat([prompt_mask[prompt_index], completion_attn], dim=1)  # [B, Lp + K]
    completion_out = body(
        input_ids=completion_ids,
        attention_mask=attn,
        position_ids=completion_pos,
        past_key_values=cache,
        use_cache=True,
    )
    # 3. The prompt's last state predicts completion token 0; completion state t predicts token t + 1.
    first = prompt_out.last_hidden_state[prompt_index, -1:]  # [B, 1, H] (left padding: -1 is the last token)
    hidden = torch.cat([first, completion_out.last_hidden_state[:, : k - 1]], dim=1)  # [B, K, H]
    del cache, prompt_out, completion_out
    return chunked_token_logprobs(
        hidden,
        model.get_output_embeddings(),
        completion_ids,
        temperature=temperature,
        chunk_tokens=chunk_tokens,
        with_entropy=with_entropy,
    )
