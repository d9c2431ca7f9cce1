"""Two incremental decoders behind one small interface: prefill once, then one token per step.

* `HFDecoder`: any transformers causal LM, via its `DynamicCache` (the generic path).
* `StaticDecoder`: Qwen2/Qwen3/Llama-style decoders. Prefill goes through the HF model; each decoding step
  is written out over the model's own weights around a preallocated KV cache [L, B, Hkv, Tmax, D]. This
  removes what dominates small-batch decoding in HF: growing the cache with `torch.cat` every step (O(T^2)
  copies), repeating K/V for grouped-query attention, building 4-D masks per step, and, at the sizes our
  CPU runs use, the number of small operations per step (each costs microseconds of dispatch whatever its
  size): q/k/v and gate/up run as one matrix product each, RMSNorm as one fused op, RoPE as one rotation
  of q and k together from a position table computed once per request.

Both keep left-padded rows; `select(keep)` drops finished rows from the batch and the cache.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
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
    inner = getattr(model, "model", None)
    rope = getattr(inner, "rotary_emb", None)
    return (
        getattr(cfg, "model_type", None) in STATIC_TYPES
        and not getattr(cfg, "use_sliding_window", False)
        and rope is not None
        # The position table is computed once per request; a RoPE that rescales with the length cannot be.
        and "dynamic" not in str(getattr(rope, "rope_type", "default"))
        and all(
            hasattr(layer, "self_attn")
            and hasattr(layer.self_attn, "q_proj")
            and hasattr(layer.input_layernorm, "variance_epsilon")
            for layer in inner.layers
        )
    )


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's RMSNorm (Qwen2/Llama/Mistral): normalise in float32, cast back, then scale."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)  # one fused op
    return weight * F.rms_norm(x.float(), weight.shape, None, eps).to(x.dtype)


def _joined(linears) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight [sum(out), in] (and bias) for several Linears that read the same input."""
    weight = torch.cat([lin.weight for lin in linears])
    if all(lin.bias is None for lin in linears):
        return weight, None
    bias = [lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.out_features) for lin in linears]
    return weight, torch.cat(bias)


@dataclass
class _Layer:
    """One decoder layer's weights in the form the decoding step uses them."""

    attn_norm: torch.Tensor  # [H]
    mlp_norm: torch.Tensor  # [H]
    eps: float
    qkv_w: torch.Tensor  # [(Hq + 2 Hkv) D, H]: q, k, v projections joined
    qkv_b: torch.Tensor | None
    o_w: torch.Tensor  # [H, Hq D] (the model's own parameter, as are the norms and down_w)
    o_b: torch.Tensor | None
    gate_up_w: torch.Tensor  # [2 I, H]: gate and up projections joined
    gate_up_b: torch.Tensor | None
    down_w: torch.Tensor  # [H, I]
    down_b: torch.Tensor | None
    act: object  # the MLP's activation function
    q_norm: torch.nn.Module | None  # Qwen3 normalises q and k per head before RoPE
    k_norm: torch.nn.Module | None


def _sources(model) -> list[torch.Tensor]:
    out = []
    for layer in model.model.layers:
        att, mlp = layer.self_attn, layer.mlp
        for lin in (att.q_proj, att.k_proj, att.v_proj, mlp.gate_proj, mlp.up_proj):
            out.append(lin.weight)
            if lin.bias is not None:
                out.append(lin.bias)
    return out


# model -> (identity of the weights the joined copies were made from, the layers). The joined q/k/v and
# gate/up weights are copies (they cost one more copy of those weights in memory); they are rebuilt when a
# weight changes place or is written in place (the tensor's version counter), and after every weight swap
# (`weights_swapped`, below).
_LAYERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def weights_swapped(model) -> None:
    """Drop the joined copies of `model`'s weights; the torch backend calls it after every weight swap. The
    (address, version) key alone cannot tell: the backend recycles its receive buffers, so the weights of
    update k+2 land at the addresses update k had, and a gloo receive leaves the version counter as it was.
    Two updates with no generation in between then served update k's joined q/k/v and gate/up weights."""
    _LAYERS.pop(model, None)


def _layers(model) -> list[_Layer]:
    sources = _sources(model)
    if any(t.is_inference() for t in sources):  # no version counter: cannot tell an in-place write
        key = None
    else:
        key = tuple((t.data_ptr(), t._version) for t in sources)
    cached = _LAYERS.get(model)
    if key is not None and cached is not None and cached[0] == key:
        return cached[1]
    layers = []
    with torch.no_grad():
        for layer in model.model.layers:
            att, mlp = layer.self_attn, layer.mlp
            qkv_w, qkv_b = _joined([att.q_proj, att.k_proj, att.v_proj])
            gate_up_w, gate_up_b = _joined([mlp.gate_proj, mlp.up_proj])
            layers.append(
                _Layer(
                    attn_norm=layer.input_layernorm.weight,
                    mlp_norm=layer.post_attention_layernorm.weight,
                    eps=layer.input_layernorm.variance_epsilon,
                    qkv_w=qkv_w,
                    qkv_b=qkv_b,
                    o_w=att.o_proj.weight,
                    o_b=att.o_proj.bias,
                    gate_up_w=gate_up_w,
                    gate_up_b=gate_up_b,
                    down_w=mlp.down_proj.weight,
                    down_b=mlp.down_proj.bias,
                    act=F.silu if getattr(model.config, "hidden_act", None) == "silu" else mlp.act_fn,
                    q_norm=getattr(att, "q_norm", None),
                    k_norm=getattr(att, "k_norm", None),
                )
            )
    if key is not None:
        _LAYERS[model] = (key, layers)
    return layers


class StaticDecoder:
    def __init__(self, model):
        self.model = model
        self.inner = model.model
        cfg = model.config
        self.n_q = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scaling = self.inner.layers[0].self_attn.scaling
        self.final_eps = self.inner.norm.variance_epsilon

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, n: int, max_new: int) -> torch.Tensor:
        P, T = ids.shape
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # [P, T]
        cache = DynamicCache()
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, logits_to_keep=1
        )
        self.layers = _layers(self.model)
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
        # RoPE for every position this request can reach, from the model's own rotary module. HF rotates
        # x * cos + rotate_half(x) * sin with rotate_half(x) = cat(-x2, x1); here roll(x) = cat(x2, x1) and the
        # sign is folded into the table's first half: the same products, one op fewer per use.
        positions = torch.arange(Tmax, device=ids.device)[None]  # [1, Tmax]
        cos, sin = self.inner.rotary_emb(first, positions)  # [1, Tmax, D]
        half = self.head_dim // 2
        self.cos = cos[0]  # [Tmax, D]
        self.sin = torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1)  # [Tmax, D]
        return out.logits[:, -1].repeat_interleave(n, dim=0)  # [B, V]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        s, b, d = self.slot, tokens.shape[0], self.head_dim
        nq, nkv = self.n_q, self.n_kv
        x = self.inner.embed_tokens(tokens[:, None])  # [b, 1, H]
        cos = self.cos[self.next_pos][:, :, None]  # [b, 1, 1, D]
        sin = self.sin[self.next_pos][:, :, None]  # [b, 1, 1, D]
        self.valid[:, s] = True
        # Additive mask: 0 where attendable, -inf on left padding. [b, 1, 1, s+1]
        bias = torch.zeros(self.valid[:, : s + 1].shape, dtype=x.dtype, device=x.device).masked_fill_(
            ~self.valid[:, : s + 1], float("-inf")
        )[:, None, None, :]
        for i, w in enumerate(self.layers):
            h = _rms_norm(x, w.attn_norm, w.eps)  # [b, 1, H]
            qkv = F.linear(h, w.qkv_w, w.qkv_b).view(b, 1, nq + 2 * nkv, d)  # [b, 1, Hq+2Hkv, D]
            qk, v = qkv[:, :, : nq + nkv], qkv[:, :, nq + nkv :]  # [b, 1, Hq+Hkv, D], [b, 1, Hkv, D]
            if w.q_norm is not None:
                qk = torch.cat([w.q_norm(qk[:, :, :nq]), w.k_norm(qk[:, :, nq:])], dim=2)
            qk = (qk * cos + torch.roll(qk, d // 2, dims=-1) * sin).transpose(1, 2)  # [b, Hq+Hkv, 1, D]
            self.k[i, :, :, s : s + 1] = qk[:, nq:]
            self.v[i, :, :, s : s + 1] = v.transpose(1, 2)
            o = _gqa_decode_attention(
                qk[:, :nq], self.k[i, :, :, : s + 1], self.v[i, :, :, : s + 1], bias, self.scaling
            )  # [b, Hq, 1, D]
            x = x + F.linear(o.transpose(1, 2).reshape(b, 1, -1), w.o_w, w.o_b)  # [b, 1, H]
            gate_up = F.linear(_rms_norm(x, w.mlp_norm, w.eps), w.gate_up_w, w.gate_up_b)  # [b, 1, 2I]
            gate, up = gate_up.chunk(2, dim=-1)  # [b, 1, I] each
            x = x + F.linear(w.act(gate) * up, w.down_w, w.down_b)  # [b, 1, H]
        self.slot += 1
        self.next_pos = self.next_pos + 1
        return self.model.lm_head(_rms_norm(x, self.inner.norm.weight, self.final_eps))[:, -1]  # [b, V]

    def select(self, keep: torch.Tensor) -> None:
        self.k, self.v = self.k[:, keep], self.v[:, keep]
        self.valid, self.next_pos = self.valid[keep], self.next_pos[keep]


def make_decoder(model, prefer_static: bool = True):
    return StaticDecoder(model) if prefer_static and static_supported(model) else HFDecoder(model)
