"""Two incremental decoders behind one small interface: prefill once, then one token per step.

* `HFDecoder`: any transformers causal LM, via its `DynamicCache` (the generic path).
* `StaticDecoder`: Qwen2/Qwen3/Llama-style decoders. Prefill goes through the HF model; decoding runs the
  HF submodules (norms, projections, MLP, rotary embedding: so the maths is the model's own) around a
  preallocated KV cache [L, B, Hkv, Tmax, D] and one `scaled_dot_product_attention(enable_gqa=True)` per
  layer. This removes what dominates small-batch decoding in HF: growing the cache with `torch.cat` every
  step (O(T^2) copies), repeating K/V for grouped-query attention, and building 4-D masks per step.

Both keep left-padded rows; `select(keep)` drops finished rows from the batch and the cache.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

STATIC_TYPES = {"qwen2", "qwen3", "llama", "mistral"}


class HFDecoder:
    def __init__(self, model):
        self.model = model

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, n: int, max_new: int) -> torch.Tensor:
        """ids, mask: [P, T] left-padded. Returns next-token logits [P*n, V] (rows prompt-major)."""
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # [P, T]
        self.cache = DynamicCache()
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=self.cache, logits_to_keep=1
        )
        if n > 1:
            self.cache.batch_repeat_interleave(n)
        self.mask = mask.repeat_interleave(n, dim=0)  # [B, T]
        self.next_pos = self.mask.sum(-1, keepdim=True)  # [B, 1]
        return out.logits[:, -1].repeat_interleave(n, dim=0)  # [B, V]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [b] sampled at the previous step. Returns logits [b, V]."""
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=-1)  # [b, T+1]
        out = self.model(
            input_ids=tokens[:, None],
            attention_mask=self.mask,
            position_ids=self.next_pos,
            past_key_values=self.cache,
        )
        self.next_pos = self.next_pos + 1
        return out.logits[:, -1]  # [b, V]

    def select(self, keep: torch.Tensor) -> None:
        self.cache.batch_select_indices(keep)
        self.mask, self.next_pos = self.mask[keep], self.next_pos[keep]


def _gqa_decode_attention(q, k, v, bias, scale: float) -> torch.Tensor:
    """One query per row against the cache, grouped-query heads without repeating K/V.

    q: [b, Hq, 1, D]; k, v: [b, Hkv, S, D]; bias: [b, 1, 1, S]. Returns [b, Hq, 1, D]. For a single query
    two small batched matmuls beat the fused CPU attention kernel.
    """
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    qg = q.view(b, hkv, hq // hkv, d)  # [b, Hkv, G, D]
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale + bias  # [b, Hkv, G, S]
    probs = torch.softmax(scores, dim=-1).to(v.dtype)  # [b, Hkv, G, S]
    return torch.matmul(probs, v).view(b, hq, 1, d)  # [b, Hq, 1, D]


def static_supported(model) -> bool:
    cfg = model.config
    return (
        getattr(cfg, "model_type", None) in STATIC_TYPES
        and not getattr(cfg, "use_sliding_window", False)
        and hasattr(model, "model")
        and hasattr(model.model, "rotary_emb")
        and all(
            hasattr(layer, "self_attn") and hasattr(layer.self_attn, "q_proj") for layer in model.model.layers
        )
    )


class StaticDecoder:
    def __init__(self, model):
        from importlib import import_module

        self.model = model
        self.inner = model.model
        cfg = model.config
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        mod = import_module(type(model).__module__)
        self.apply_rope = mod.apply_rotary_pos_emb

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, n: int, max_new: int) -> torch.Tensor:
        P, T = ids.shape
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # [P, T]
        cache = DynamicCache()
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, logits_to_keep=1
        )
        L = len(self.inner.layers)
        B, Tmax = P * n, T + max_new
        first = cache.layers[0].keys  # [P, Hkv, T, D]
        self.k = first.new_zeros((L, B, self.n_kv, Tmax, self.head_dim))  # [L, B, Hkv, Tmax, D]
        self.v = torch.zeros_like(self.k)  # [L, B, Hkv, Tmax, D]
        for i in range(L):
            self.k[i, :, :, :T] = cache.layers[i].keys.repeat_interleave(n, dim=0)
            self.v[i, :, :, :T] = cache.layers[i].values.repeat_interleave(n, dim=0)
        self.valid = torch.zeros((B, Tmax), dtype=torch.bool, device=ids.device)  # [B, Tmax] attendable
        self.valid[:, :T] = mask.bool().repeat_interleave(n, dim=0)
        self.next_pos = mask.sum(-1, keepdim=True).repeat_interleave(n, dim=0)  # [B, 1]
        self.slot = T
        return out.logits[:, -1].repeat_interleave(n, dim=0)  # [B, V]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        s = self.slot
        x = self.inner.embed_tokens(tokens[:, None])  # [b, 1, H]
        cos, sin = self.inner.rotary_emb(x, self.next_pos)  # [b, 1, D]
        self.valid[:, s] = True
        # Additive mask: 0 where attendable, -inf on left padding. [b, 1, 1, s+1]
        self.bias = torch.zeros(self.valid[:, : s + 1].shape, dtype=x.dtype, device=x.device).masked_fill_(
            ~self.valid[:, : s + 1], float("-inf")
        )[:, None, None, :]
        b = x.shape[0]
        for i, layer in enumerate(self.inner.layers):
            att = layer.self_attn
            h = layer.input_layernorm(x)  # [b, 1, H]
            q = att.q_proj(h).view(b, 1, -1, self.head_dim)  # [b, 1, Hq, D]
            k = att.k_proj(h).view(b, 1, -1, self.head_dim)  # [b, 1, Hkv, D]
            v = att.v_proj(h).view(b, 1, -1, self.head_dim).transpose(1, 2)  # [b, Hkv, 1, D]
            if hasattr(att, "q_norm"):  # Qwen3 normalises q and k per head before RoPE
                q, k = att.q_norm(q), att.k_norm(k)
            q, k = self.apply_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # [b, Hq|Hkv, 1, D]
            self.k[i, :, :, s : s + 1] = k
            self.v[i, :, :, s : s + 1] = v
            o = _gqa_decode_attention(
                q, self.k[i, :, :, : s + 1], self.v[i, :, :, : s + 1], self.bias, att.scaling
            )
            x = x + att.o_proj(o.transpose(1, 2).reshape(b, 1, -1))  # [b, 1, H]
            x = x + layer.mlp(layer.post_attention_layernorm(x))  # [b, 1, H]
        self.slot += 1
        self.next_pos = self.next_pos + 1
        return self.model.lm_head(self.inner.norm(x))[:, -1]  # [b, V]

    def select(self, keep: torch.Tensor) -> None:
        self.k, self.v = self.k[:, keep], self.v[:, keep]
        self.valid, self.next_pos = self.valid[keep], self.next_pos[keep]


def make_decoder(model, prefer_static: bool = True):
    return StaticDecoder(model) if prefer_static and static_supported(model) else HFDecoder(model)
