"""The rollout-server contract: request/response models, the weight manifest, and the bucket packing.

Why one module: the trainer-side client and the server both import this file, so the wire format is written
exactly once. It imports only pydantic at module level; torch is imported inside the pack/unpack helpers so
that the models can be used (and tested) without it.

Weight sync in one sentence: the trainer POSTs `/update_weights` with a `WeightManifest` (ordered names,
dtypes, shapes) and `bucket_bytes`; both sides call `plan_buckets(manifest, bucket_bytes)` and get the same
list of buckets; the trainer then broadcasts each bucket as one flat uint8 buffer over the dedicated process
group. The bucketing rule is the one of vLLM's packed NCCL transfer (append tensors in order; a bucket is
closed as soon as its size *exceeds* `bucket_bytes`, so one bucket may overshoot by at most one tensor), which
makes the bytes on the wire identical to vLLM's `packed=True, packed_buffer_size_bytes=bucket_bytes`.

Log-prob convention (every backend): the log-prob of a sampled token is `log_softmax(logits / temperature)`
at that token, computed BEFORE top-k / top-p truncation; for temperature 0 (greedy) it is
`log_softmax(logits)`. This is what the trainer recomputes from the same weights.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

if TYPE_CHECKING:  # pragma: no cover
    import torch

# ---- routes (one place, both sides) -------------------------------------------------------------------------
ROUTE_HEALTH = "/health"
ROUTE_GENERATE = "/generate"
ROUTE_INIT_WEIGHT_TRANSFER = "/init_weight_transfer"
ROUTE_UPDATE_WEIGHTS = "/update_weights"
ROUTE_CLOSE_WEIGHT_TRANSFER = "/close_weight_transfer"
ROUTE_PAUSE = "/pause"
ROUTE_RESUME = "/resume"
ROUTE_METRICS = "/metrics"
ROUTE_OAI_MODELS = "/v1/models"
ROUTE_OAI_COMPLETIONS = "/v1/completions"
ROUTE_OAI_CHAT = "/v1/chat/completions"

# Store key prefix of the update handshake (see weight_transfer.py); distinct from any process-group key.
SYNC_KEY_PREFIX = "rollout_sync"

MAX_PROMPTS = 4096
MAX_N = 256
MAX_TOKENS_LIMIT = 1 << 20
MAX_STOP = 16
MAX_TOP_LOGPROBS = 20  # vLLM's default max_logprobs
MAX_TENSORS = 1 << 20

DTYPE_ITEMSIZE: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float64": 8,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
}
DtypeName = Literal[
    "float32",
    "float16",
    "bfloat16",
    "float64",
    "int64",
    "int32",
    "int16",
    "int8",
    "uint8",
    "bool",
    "float8_e4m3fn",
    "float8_e5m2",
]


class _Strict(BaseModel):
    """Unknown fields are an error (a typo must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid")


# ---- generation ---------------------------------------------------------------------------------------------
class SamplingParams(_Strict):
    """Sampling settings shared by all prompts of one request."""

    n: int = Field(1, ge=1, le=MAX_N, description="Completions per prompt (the GRPO group size).")
    max_tokens: int = Field(
        256,
        ge=1,
        le=MAX_TOKENS_LIMIT,
        description="Max new tokens; prompt + max_tokens must fit the context.",
    )
    temperature: float = Field(1.0, ge=0.0, le=100.0, description="0 means greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass; 1 disables it.")
    top_k: int = Field(0, ge=0, le=1 << 20, description="Keep the k most likely tokens; 0 disables it.")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Seed for reproducible sampling.")
    stop: list[str] = Field(
        default_factory=list,
        max_length=MAX_STOP,
        description="Stop strings: generation ends once the text contains one; the text is cut before it.",
    )
    ignore_eos: bool = Field(False, description="Keep generating after EOS (benchmarks only).")

    @model_validator(mode="after")
    def _check_stop(self) -> SamplingParams:
        for s in self.stop:
            if not s or len(s) > 256:
                raise ValueError("stop: each stop string must have 1..256 characters")
        return self


class GenerateRequest(SamplingParams):
    """`POST /generate`: a batch of prompts (text or token ids), `n` completions each."""

    prompts: list[str] | None = Field(
        None, max_length=MAX_PROMPTS, description="Text prompts (already chat-formatted if needed)."
    )
    prompt_token_ids: list[list[int]] | None = Field(
        None, max_length=MAX_PROMPTS, description="Token-id prompts; give this or `prompts`, not both."
    )
    # Optional extras (OpenAI routes, evaluation). Left out of the serialised request at their neutral value,
    # so the trainer's /generate body is the same as before they existed.
    top_logprobs: int = Field(
        0,
        ge=0,
        le=MAX_TOP_LOGPROBS,
        exclude_if=lambda v: v == 0,
        description="Also return the k most likely tokens and their log-probs at every position (0: none).",
    )
    presence_penalty: float = Field(
        0.0,
        ge=-2.0,
        le=2.0,
        exclude_if=lambda v: v == 0.0,
        description="OpenAI's presence penalty (vLLM backend only; 0 disables). Log-probs are then of the "
        "penalised distribution.",
    )
    frequency_penalty: float = Field(
        0.0,
        ge=-2.0,
        le=2.0,
        exclude_if=lambda v: v == 0.0,
        description="OpenAI's frequency penalty (vLLM backend only; 0 disables).",
    )
    repetition_penalty: float = Field(
        1.0,
        gt=0.0,
        le=1e6,
        exclude_if=lambda v: v == 1.0,
        description="vLLM's (HF-style) repetition penalty (vLLM backend only; 1 disables).",
    )

    @model_validator(mode="after")
    def _one_prompt_kind(self) -> GenerateRequest:
        if (self.prompts is None) == (self.prompt_token_ids is None):
            raise ValueError("prompts: give exactly one of `prompts` or `prompt_token_ids`")
        items = self.prompts if self.prompts is not None else self.prompt_token_ids
        if not items:
            raise ValueError("prompts: at least one prompt is required")
        if self.prompt_token_ids is not None and any(len(p) == 0 for p in self.prompt_token_ids):
            raise ValueError("prompt_token_ids: every prompt needs at least one token")
        if len(items) * self.n > 65536:
            raise ValueError("n: len(prompts) * n must be <= 65536")
        return self

    @property
    def num_prompts(self) -> int:
        return len(self.prompts if self.prompts is not None else self.prompt_token_ids)


FinishReason = Literal["stop", "length"]


class Completion(BaseModel):
    """One sampled completion."""

    prompt_index: int = Field(..., ge=0, description="Index of its prompt in the request.")
    sample_index: int = Field(..., ge=0, description="0..n-1 within its prompt's group.")
    token_ids: list[int] = Field(
        ..., description="Generated token ids (EOS included when it ended the text)."
    )
    text: str = Field(..., description="Decoded text, special tokens skipped, cut before a stop string.")
    logprobs: list[float] = Field(
        ...,
        description="log_softmax(logits / T) of each sampled token, before top-k/top-p; len == token_ids.",
    )
    finish_reason: FinishReason = Field(..., description="'stop' (EOS or stop string) or 'length'.")
    weight_version: int = Field(..., description="Weight version that produced this completion.")
    top_logprobs: list[list[tuple[int, float]]] | None = Field(
        None,
        exclude_if=lambda v: v is None,
        description="Only with `top_logprobs` > 0: per position, the k most likely (token id, log-prob) "
        "pairs, most likely first (impossible tokens read -9999.0); absent otherwise.",
    )


class GenerateResponse(BaseModel):
    """Completions flattened prompt-major: the n samples of prompt 0, then of prompt 1, ..."""

    completions: list[Completion] = Field(..., description="len(prompts) * n completions, prompt-major.")
    weight_version: int = Field(..., description="Weight version that produced every completion.")
    model: str = Field(..., description="Served model name.")
    prompt_tokens: int = Field(..., ge=0, description="Total prompt tokens (each prompt counted once).")
    completion_tokens: int = Field(..., ge=0, description="Total generated tokens.")


class HealthResponse(BaseModel):
    model: str = Field(..., description="Served model name or path.")
    backend: Literal["torch", "vllm"] = Field(..., description="Generation backend.")
    weight_version: int = Field(..., description="Version of the weights now serving (0 = as loaded).")
    ready: bool = Field(..., description="True once the model is loaded and generation is not paused.")
    max_model_len: int = Field(..., description="Context length: prompt + completion tokens.")
    weight_transfer: bool = Field(False, description="True when a weight-transfer group is initialised.")
    weight_transfer_ranks: int = Field(
        1, description="Ranks this server takes in the group (vLLM: its TP size)."
    )
    weight_transfer_wire: Literal["torch", "vllm_pynccl"] = Field(
        "torch", description="Collective the trainer must use: torch ProcessGroup, or vLLM's PyNccl."
    )
    weight_transfer_bucket_bytes: int | None = Field(
        None, description="bucket_bytes every update must use (vLLM fixes it at startup); None = any."
    )
    error: str | None = Field(
        None,
        description="Why the backend cannot generate (e.g. its engine process died); None while healthy.",
    )


class ErrorResponse(BaseModel):
    """Error body of the native routes (every 4xx/5xx, 404/405/413/422 included)."""

    error: str = Field(..., description="What was wrong, naming the field or tensor.")
    code: str | None = Field(
        None,
        description="Machine-readable reason when there is one: engine_dead, paused, prompt_too_long, ...",
    )


class OpenAIErrorDetail(BaseModel):
    message: str = Field(..., description="What was wrong, naming the field.")
    type: str = Field(..., description="invalid_request_error, authentication_error, ..., server_error.")
    param: str | None = Field(None, description="The offending request field, when one is to blame.")
    code: str | None = Field(None, description="Machine-readable reason, e.g. 'engine_dead'.")


class OpenAIErrorResponse(BaseModel):
    """Error body of the /v1/* routes: OpenAI's shape, so the `openai` SDK shows the message."""

    error: OpenAIErrorDetail


# ---- weight sync --------------------------------------------------------------------------------------------
class TensorSpec(_Strict):
    name: str = Field(..., min_length=1, max_length=1024, description="Parameter name (HF checkpoint name).")
    dtype: DtypeName = Field(..., description="torch dtype name, e.g. 'bfloat16'.")
    shape: list[int] = Field(..., max_length=8, description="Tensor shape.")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_ITEMSIZE[self.dtype]


class WeightManifest(_Strict):
    """The ordered tensors of one weight update (the trainer sends them in this order)."""

    tensors: list[TensorSpec] = Field(..., min_length=1, max_length=MAX_TENSORS, description="In send order.")
    # (the tensors list they were planned from, bucket_bytes -> plan): see `buckets`
    _plans: tuple[list[TensorSpec], dict[int, list[Bucket]]] | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _check(self) -> WeightManifest:
        seen: set[str] = set()
        for t in self.tensors:
            if t.name in seen:
                raise ValueError(f"manifest: duplicate tensor name {t.name!r}")
            if any(d < 0 for d in t.shape):
                raise ValueError(f"manifest: negative dimension in shape of {t.name!r}")
            seen.add(t.name)
        return self

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def buckets(self, bucket_bytes: int) -> list[Bucket]:
        """``plan_buckets(self, bucket_bytes)``, kept for the next call with the same size: the trainer pushes
        the same manifest every step, and planning ~300 tensors cost ~0.5 ms before the push's first byte. A
        manifest is not edited in place; one whose ``tensors`` were replaced (``model_copy(update=...)``) is
        planned again."""
        plans = self._plans[1] if self._plans is not None and self._plans[0] is self.tensors else {}
        if bucket_bytes not in plans:
            # Replaced, never changed in place: a copy (model_copy shares private values) keeps its own.
            plans = {**plans, bucket_bytes: plan_buckets(self, bucket_bytes)}
            self._plans = (self.tensors, plans)
        return plans[bucket_bytes]

    def __eq__(self, other: object) -> bool:
        # The tensors only: pydantic's == also compares private attributes, so a manifest whose buckets were
        # planned would differ from an equal one not yet planned (and an announced push would not be used).
        if not isinstance(other, WeightManifest):
            return NotImplemented
        return self.tensors == other.tensors

    def mismatches(self, model: Mapping[str, tuple[str, list[int]]], limit: int = 5) -> list[str]:
        """Every way this manifest disagrees with a served model given as name -> (dtype, shape); empty when
        it fits. Each backend refuses a manifest with these (422) before any byte moves."""
        problems = []
        for t in self.tensors:
            spec = model.get(t.name)
            if spec is None:
                problems.append(f"unknown tensor {t.name!r}")
            elif list(spec[1]) != t.shape:
                problems.append(f"tensor {t.name!r}: shape {t.shape} != model's {list(spec[1])}")
            elif spec[0] != t.dtype:
                problems.append(f"tensor {t.name!r}: dtype {t.dtype} != model's {spec[0]}")
            if len(problems) >= limit:
                break
        return problems

    @classmethod
    def from_named_tensors(cls, named: Iterable[tuple[str, torch.Tensor]]) -> WeightManifest:
        """Manifest of (name, tensor) pairs; only metadata is read (works for ZeRO-3 via `ds_shape`)."""
        specs = []
        for name, t in named:
            shape = list(getattr(t, "ds_shape", None) or t.shape)
            specs.append(TensorSpec(name=name, dtype=dtype_name(t.dtype), shape=shape))
        return cls(tensors=specs)


@dataclass(frozen=True, slots=True)
class BucketItem:
    """One tensor's place in a bucket. Buckets are computed on each side (`plan_buckets`), never sent, so
    they are plain dataclasses: building 290 pydantic models per push cost 0.8 ms before any byte moved."""

    index: int  # index of the tensor in the manifest
    name: str
    offset: int  # byte offset inside the bucket
    nbytes: int


@dataclass(frozen=True, slots=True)
class Bucket:
    items: list[BucketItem]
    nbytes: int  # size of the flat uint8 buffer


def plan_buckets(manifest: WeightManifest, bucket_bytes: int) -> list[Bucket]:
    """Split the manifest into buckets, in order. Pure; both sides call it and must agree.

    Rule (same as vLLM's packed NCCL transfer): append tensors until the running size exceeds `bucket_bytes`,
    then close the bucket. Zero-size tensors ride along in whatever bucket is open.
    """
    if bucket_bytes < 1:
        raise ValueError("bucket_bytes must be >= 1")
    buckets: list[Bucket] = []
    items: list[BucketItem] = []
    size = 0
    for i, t in enumerate(manifest.tensors):
        nbytes = t.nbytes
        items.append(BucketItem(index=i, name=t.name, offset=size, nbytes=nbytes))
        size += nbytes
        if size > bucket_bytes:
            buckets.append(Bucket(items=items, nbytes=size))
            items, size = [], 0
    if items:
        buckets.append(Bucket(items=items, nbytes=size))
    return buckets


class InitWeightTransferRequest(_Strict):
    """`POST /init_weight_transfer`: join the trainer's dedicated process group (trainer = rank 0)."""

    master_addr: str = Field(..., min_length=1, max_length=253, description="Trainer's TCPStore host.")
    master_port: int = Field(..., ge=1, le=65535, description="Trainer's TCPStore port.")
    rank: int = Field(1, ge=1, le=4096, description="This server's rank in the group (trainer is 0).")
    world_size: int = Field(2, ge=2, le=4097, description="1 trainer + all servers of the group.")
    backend: Literal["gloo", "nccl"] = Field("gloo", description="gloo (CPU tensors) or nccl (CUDA).")
    timeout_s: float = Field(60.0, gt=0, le=3600, description="Rendezvous and per-collective timeout.")

    @model_validator(mode="after")
    def _rank(self) -> InitWeightTransferRequest:
        if self.rank >= self.world_size:
            raise ValueError("rank: must be < world_size")
        return self


class InitWeightTransferResponse(BaseModel):
    rank: int
    world_size: int
    backend: Literal["gloo", "nccl"]
    wire: Literal["torch", "vllm_pynccl"] = Field(
        ..., description="Collective implementation the trainer must use for this server."
    )


class UpdateWeightsRequest(_Strict):
    """`POST /update_weights`: announce one sync; the buckets then arrive over the process group."""

    version: int = Field(..., ge=0, le=2**62, description="Weight version after this update (trainer step).")
    manifest: WeightManifest
    bucket_bytes: int = Field(
        64 << 20, ge=1024, le=1 << 36, description="Target bucket size; see plan_buckets for the rule."
    )
    sync_id: str = Field(
        ..., min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.-]+$", description="Unique per push."
    )
    timeout_s: float = Field(300.0, gt=0, le=7200, description="Deadline for the whole receive.")

    # How long a request stays usable is one rule, read by both sides from here:
    @property
    def go_wait_s(self) -> float:
        """How long the server waits for the trainer's go (or abort) after its "ok"; then it answers 409."""
        return self.timeout_s

    @property
    def go_usable_s(self) -> float:
        """How long after sending a request ahead (`WeightSyncClient.announce`) the trainer may still give it
        the go: half the server's wait, so a go never lands just as a server gives up. Later, the push sends
        its own request."""
        return self.go_wait_s / 2


class UpdateWeightsResponse(BaseModel):
    """A server's account of one update (its HTTP answer, also written into the trainer's store)."""

    version: int = Field(..., description="The weight version now served.")
    num_tensors: int = Field(..., description="Tensors received.")
    num_buckets: int = Field(..., description="Buckets received (plan_buckets of the manifest).")
    bytes: int = Field(..., description="Bytes received.")
    handshake_s: float = Field(
        ...,
        description="From the request's acceptance (manifest checked, update lock taken) to the trainer's go. "
        "For a request sent ahead of the optimizer step (the trainer's `sync/announced` = 1) this includes the "
        "step: it is the server's wait, not the trainer's `sync/handshake_s` (from the push's start to the go: "
        "then ~1 ms plus gathering and packing the first bucket).",
    )
    receive_s: float = Field(
        ...,
        description="The buckets on the wire, as this server saw them (vLLM's NCCL engine, which receives and "
        "loads together: the whole update, and swap_s 0).",
    )
    swap_s: float = Field(
        ..., description="Unpacking and loading them into the served model, after the wire."
    )


# ---- pack / unpack (torch imported lazily) ------------------------------------------------------------------
def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).split(".")[-1]
    if name not in DTYPE_ITEMSIZE:
        raise ValueError(f"unsupported dtype {dtype}")
    return name


@functools.cache  # called per tensor while a push packs its buckets: the import and lookup once per name
def torch_dtype(name: str) -> torch.dtype:
    import torch

    return getattr(torch, name)


def pack_bucket(
    bucket: Bucket, tensors: Sequence[torch.Tensor], out: torch.Tensor | None = None
) -> torch.Tensor:
    """Concatenate the bucket's tensors (in order) into one flat uint8 buffer."""
    import torch

    if len(tensors) != len(bucket.items):
        raise ValueError(f"bucket expects {len(bucket.items)} tensors, got {len(tensors)}")
    device = tensors[0].device if tensors else "cpu"
    if out is None:
        out = torch.empty(bucket.nbytes, dtype=torch.uint8, device=device)  # [nbytes]
    for item, t in zip(bucket.items, tensors, strict=True):
        flat = t.detach().contiguous().reshape(-1).view(torch.uint8)  # [item.nbytes]
        if flat.numel() != item.nbytes:
            raise ValueError(f"tensor {item.name!r}: {flat.numel()} bytes, manifest says {item.nbytes}")
        out[item.offset : item.offset + item.nbytes].copy_(flat)
    return out


def unpack_bucket(
    bucket: Bucket, buffer: torch.Tensor, manifest: WeightManifest
) -> list[tuple[str, torch.Tensor]]:
    """Views of `buffer` shaped as the manifest says (no copy)."""
    out = []
    for item in bucket.items:
        spec = manifest.tensors[item.index]
        raw = buffer[item.offset : item.offset + item.nbytes]  # [nbytes] uint8
        if item.offset % DTYPE_ITEMSIZE[spec.dtype]:
            raw = raw.clone()  # a dtype view needs an aligned offset (odd-sized half tensors before it)
        out.append((spec.name, raw.view(torch_dtype(spec.dtype)).view(spec.shape)))
    return out


def cut_at_stop(text: str, stops: list[str]) -> str:
    """The contract's stop-string rule: the text ends before the earliest stop string (not included)."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[: min(hits)] if hits else text
