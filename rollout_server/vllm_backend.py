"""vLLM 0.32.0 backend: the async engine (AsyncLLM) with vLLM's native NCCL weight-transfer engine.

Thin on purpose (vLLM breaks between versions): the translation of our requests and CLI flags into vLLM's is
pure functions below (testable without vLLM); `vllm` is imported only inside `VLLMBackend`.

Choices, and why:
  * `logprobs_mode="processed_logprobs"` with `SamplingParams(logprobs=0)`: vLLM returns the log-prob of the
    sampled token after temperature scaling. vLLM's "processed" values are taken after top-k/top-p too, so
    they equal our convention (log_softmax(logits / T), pre-truncation) exactly when top_k=0 and top_p=1,
    which is how GRPO samples; with truncation vLLM renormalises over the kept tokens (documented gap).
    "raw_logprobs" (the default) would ignore the temperature, which is worse for T != 1.
  * `generation_config="vllm"`: otherwise vLLM applies the model's generation_config.json defaults (Qwen2.5
    ships repetition_penalty=1.05, top_k=20, top_p=0.8) to every field a request leaves unset, and the
    returned log-probs would no longer be what the trainer recomputes.
  * Weights: `WeightTransferConfig(backend="nccl")`, packed, with `packed_buffer_size_bytes` = our
    `bucket_bytes`. Our `plan_buckets` is vLLM's packing rule and our buckets are the same concatenated
    bytes, so the same `WeightSyncClient.push` feeds this backend; vLLM fixes the bucket size at init, so an
    update with another `bucket_bytes` is refused (422). The trainer joins with vLLM's PyNccl communicator
    (`weight_transfer_wire = "vllm_pynccl"` in /health). vLLM's NCCL group is CUDA-only: no gloo here.
  * Unlike the torch backend, vLLM loads received weights layer by layer into the live model, so generation
    is paused (`mode="wait"`: in-flight requests finish first) for the whole receive, and an update that
    fails midway can leave mixed weights: the server then reports the failure and the trainer must push a
    full update again.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
import uuid
from typing import Any

from rollout_server.backend import Backend, BackendInfo, BadRequest
from rollout_server.protocol import (
    Completion,
    GenerateRequest,
    InitWeightTransferRequest,
    InitWeightTransferResponse,
    UpdateWeightsRequest,
    UpdateWeightsResponse,
    WeightManifest,
    plan_buckets,
)

DEFAULT_BUCKET_BYTES = 256 << 20


# ---- pure translations (no vllm import) --------------------------------------------------------------------
def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """CLI flags -> AsyncEngineArgs keyword arguments."""
    kw: dict[str, Any] = {
        "model": args.model,
        "tensor_parallel_size": args.tensor_parallel_size,
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "dtype": args.dtype,
        "logprobs_mode": "processed_logprobs",
        "generation_config": "vllm",
        "enable_prefix_caching": True,
        "weight_transfer_config": {"backend": "nccl"},
        "seed": 0,
    }
    if args.max_model_len is not None:
        kw["max_model_len"] = args.max_model_len
    if getattr(args, "served_model_name", None):
        kw["served_model_name"] = args.served_model_name
    return kw


def sampling_kwargs(req: GenerateRequest) -> dict[str, Any]:
    """Our GenerateRequest -> vllm.SamplingParams keyword arguments (one SamplingParams per prompt)."""
    return {
        "n": req.n,
        "max_tokens": req.max_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,  # 0 disables in both
        "seed": req.seed,
        "stop": list(req.stop) or None,
        "ignore_eos": req.ignore_eos,
        "logprobs": 0,  # only the sampled token's log-prob
        "skip_special_tokens": True,
        "include_stop_str_in_output": False,
    }


def prompt_seed(seed: int | None, prompt_index: int, n: int) -> int | None:
    """Seed of prompt `prompt_index`'s vLLM request. vLLM gives the n children of a request seeds base+0..n-1,
    so bases are spaced n apart: every completion of our request gets its own reproducible seed."""
    return None if seed is None else (seed * 1_000_003 + prompt_index * n) % (2**62)


def init_info(req: InitWeightTransferRequest, bucket_bytes: int) -> dict[str, Any]:
    """Our InitWeightTransferRequest -> vLLM's NCCLWeightTransferInitInfo fields."""
    return {
        "master_address": req.master_addr,
        "master_port": req.master_port,
        "rank_offset": req.rank,
        "world_size": req.world_size,
        "packed": True,
        "packed_buffer_size_bytes": bucket_bytes,
        "packed_num_buffers": 2,
    }


def update_info(manifest: WeightManifest) -> dict[str, Any]:
    """Our manifest -> vLLM's NCCLWeightTransferUpdateInfo fields (same order)."""
    return {
        "names": [t.name for t in manifest.tensors],
        "dtype_names": [t.dtype for t in manifest.tensors],
        "shapes": [list(t.shape) for t in manifest.tensors],
    }


def finish_reason(vllm_reason: str | None) -> str:
    """vLLM's finish reasons -> ours; 'abort' (engine paused/shut down mid-request) is an error."""
    if vllm_reason in ("stop", "length"):
        return vllm_reason
    raise RuntimeError(f"generation ended with finish_reason={vllm_reason!r}")


def checkpoint_specs(model: str, dtype: str) -> dict[str, tuple[str, list[int]]]:
    """Names, dtypes and shapes of the HF checkpoint (what vLLM's load_weights takes), built on 'meta'."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model)
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    return {n: (str(t.dtype).split(".")[-1], list(t.shape)) for n, t in m.state_dict().items()}


# ---- the backend --------------------------------------------------------------------------------------------
class VLLMBackend(Backend):
    """Runs AsyncLLM on a private event loop thread; the blocking Backend methods submit coroutines to it."""

    @classmethod
    def from_cli(cls, args: argparse.Namespace) -> VLLMBackend:
        return cls(engine_kwargs(args), bucket_bytes=args.weight_transfer_bucket_bytes)

    def __init__(self, kwargs: dict[str, Any], bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        from vllm import AsyncEngineArgs
        from vllm.config import WeightTransferConfig
        from vllm.v1.engine.async_llm import AsyncLLM

        kwargs = dict(kwargs)
        kwargs["weight_transfer_config"] = WeightTransferConfig(**kwargs["weight_transfer_config"])
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="vllm-loop", daemon=True).start()
        self.engine = self._run(self._make(AsyncLLM, AsyncEngineArgs(**kwargs)), timeout=3600)
        mc = self.engine.model_config
        self._tok = self.engine.get_tokenizer()
        self.dtype = str(mc.dtype).split(".")[-1]
        self.specs = checkpoint_specs(kwargs["model"], self.dtype)
        eos = self._tok.eos_token_id
        self.info = BackendInfo(
            model=kwargs.get("served_model_name") or kwargs["model"],
            backend="vllm",
            max_model_len=mc.max_model_len,
            eos_token_ids=[eos] if eos is not None else [],
            transfer_ranks=kwargs["tensor_parallel_size"],
            transfer_wire="vllm_pynccl",
            required_bucket_bytes=bucket_bytes,
            max_concurrency=256,
        )
        self.vocab_size = mc.get_vocab_size()
        self.bucket_bytes = bucket_bytes
        self.weight_version = 0
        self._store = None
        self._rank = 0
        self._update_lock = threading.Lock()

    @staticmethod
    async def _make(cls, engine_args):
        return cls.from_engine_args(engine_args)

    def _run(self, coro, timeout: float):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=timeout)

    @property
    def tokenizer(self):
        return self._tok

    # ---- generation ---------------------------------------------------------------------------------------
    def generate(self, req: GenerateRequest, prompt_ids: list[list[int]], on_token=None) -> list[Completion]:
        return self._run(self._generate(req, prompt_ids, on_token), timeout=24 * 3600)

    async def _generate(self, req, prompt_ids, on_token) -> list[Completion]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        kind = RequestOutputKind.CUMULATIVE if on_token else RequestOutputKind.FINAL_ONLY

        async def one(i: int, ids: list[int]):
            kw = sampling_kwargs(req) | {"seed": prompt_seed(req.seed, i, req.n), "output_kind": kind}
            sent = [0] * req.n
            final = None
            async for out in self.engine.generate(
                {"prompt_token_ids": ids}, SamplingParams(**kw), str(uuid.uuid4())
            ):
                final = out
                if on_token:
                    for c in out.outputs:
                        for tok in list(c.token_ids)[sent[c.index] :]:
                            sent[c.index] += 1
                            on_token(
                                i * req.n + c.index, tok, c.finished() and sent[c.index] == len(c.token_ids)
                            )
            return final

        outs = await asyncio.gather(*(one(i, ids) for i, ids in enumerate(prompt_ids)))
        version = self.weight_version
        comps = []
        for i, out in enumerate(outs):
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                lps = [c.logprobs[j][t].logprob for j, t in enumerate(ids)] if c.logprobs else []
                comps.append(
                    Completion(
                        prompt_index=i,
                        sample_index=c.index,
                        token_ids=ids,
                        text=c.text,
                        logprobs=lps,
                        finish_reason=finish_reason(c.finish_reason),
                        weight_version=version,
                    )
                )
        return comps

    # ---- weight transfer ----------------------------------------------------------------------------------
    @property
    def has_weight_transfer(self) -> bool:
        return self._store is not None

    def init_weight_transfer(self, req: InitWeightTransferRequest) -> InitWeightTransferResponse:
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

        from rollout_server.weight_transfer import open_store

        if req.backend != "nccl":
            raise BadRequest("backend: the vLLM backend receives weights over 'nccl' only")
        with self._update_lock:
            self._store = open_store(req.master_addr, req.master_port, False, req.timeout_s)
            self._rank = req.rank
            request = WeightTransferInitRequest(init_info=init_info(req, self.bucket_bytes))
            self._run(self.engine.init_weight_transfer_engine(request), timeout=req.timeout_s + 30)
        return InitWeightTransferResponse(
            rank=req.rank, world_size=req.world_size, backend="nccl", wire="vllm_pynccl"
        )

    def close_weight_transfer(self) -> None:
        if self._store is not None:
            self._run(self.engine.shutdown_weight_transfer_engine(), timeout=60)
            self._store = None

    def update_weights(self, req: UpdateWeightsRequest) -> UpdateWeightsResponse:
        from rollout_server.weight_transfer import TransferGroup, server_wait_go

        if self._store is None:
            raise BadRequest("no weight-transfer group: call /init_weight_transfer first", status=409)
        problems = []
        for t in req.manifest.tensors:
            spec = self.specs.get(t.name)
            if spec is None:
                problems.append(f"unknown tensor {t.name!r}")
            elif spec != (t.dtype, t.shape):
                problems.append(f"tensor {t.name!r}: {t.dtype} {t.shape} != model's {spec[0]} {spec[1]}")
        if problems:
            raise BadRequest("manifest: " + "; ".join(problems[:5]), status=422)
        if req.bucket_bytes != self.bucket_bytes:
            raise BadRequest(
                f"bucket_bytes: {req.bucket_bytes} != {self.bucket_bytes} fixed by --weight-transfer-bucket-bytes",
                status=422,
            )
        if not self._update_lock.acquire(blocking=False):
            raise BadRequest("another weight update is in progress", status=409)
        try:
            t0 = time.monotonic()
            handle = TransferGroup(self._store, None, self._rank, 0, "nccl", req.timeout_s, None)
            if not server_wait_go(handle, req.sync_id, req.timeout_s):
                raise BadRequest(
                    "update aborted by the trainer (another server refused the manifest)", status=409
                )
            t1 = time.monotonic()
            self._run(self._receive(req), timeout=req.timeout_s + 60)
            t2 = time.monotonic()
            return UpdateWeightsResponse(
                version=req.version,
                num_tensors=len(req.manifest.tensors),
                num_buckets=len(plan_buckets(req.manifest, req.bucket_bytes)),
                bytes=req.manifest.total_bytes,
                handshake_s=t1 - t0,
                receive_s=t2 - t1,
                swap_s=0.0,
            )
        finally:
            self._update_lock.release()

    async def _receive(self, req: UpdateWeightsRequest) -> None:
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        await self.engine.pause_generation(mode="wait", clear_cache=True)
        try:
            await self.engine.start_weight_update()
            update = WeightTransferUpdateRequest(update_info=update_info(req.manifest))
            await asyncio.wait_for(self.engine.update_weights(update), timeout=req.timeout_s)
            await self.engine.finish_weight_update(weight_version=str(req.version))
            await self.engine.reset_prefix_cache()
            self.weight_version = req.version
        finally:
            await self.engine.resume_generation()

    def pause(self) -> None:
        self._run(self.engine.pause_generation(mode="keep", clear_cache=False), timeout=300)

    def resume(self) -> None:
        self._run(self.engine.resume_generation(), timeout=300)

    def shutdown(self) -> None:
        try:
            self.engine.shutdown()
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
