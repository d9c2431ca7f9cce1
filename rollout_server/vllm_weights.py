"""The server side of a weight update into vLLM: the handshake, the manifest check, and vLLM's lifecycle.

`VLLMBackend` (vllm_backend.py) delegates its four weight-transfer methods here. One update:
  1. the manifest is checked against the checkpoint's names, dtypes and shapes (built on 'meta' at start), so
     a wrong push is refused with 422 before any byte moves;
  2. the server announces "ok" in the trainer's store and waits for the trainer's go (weight_transfer.py);
  3. generation is paused (`mode="wait"`: in-flight requests finish first), then vLLM's public lifecycle runs
     (`start_weight_update`, `update_weights`, `finish_weight_update`) with the registered transfer engine:
     vLLM's own `nccl` engine on GPU, our `grpo_gloo` engine (vllm_gloo_engine.py) on CPU;
  4. our gloo engine cannot raise to us from vLLM's worker, so each worker's outcome is read back from the
     trainer's store; a failed receive drops the group so that the trainer re-inits it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from rollout_server.backend import BackendInfo, BadRequest, accepted_update
from rollout_server.protocol import (
    InitWeightTransferRequest,
    InitWeightTransferResponse,
    UpdateWeightsRequest,
    UpdateWeightsResponse,
)

log = logging.getLogger("rollout_server")

GLOO_ENGINE = "grpo_gloo"  # vllm_gloo_engine.ENGINE_NAME (not imported here: that module is for workers)


# ---- pure translations (no vllm import) --------------------------------------------------------------------
def init_info(req: InitWeightTransferRequest, bucket_bytes: int, engine: str = "nccl") -> dict[str, Any]:
    """Our InitWeightTransferRequest -> the registered engine's init-info fields (NCCL or our gloo)."""
    if engine == GLOO_ENGINE:
        return {
            "master_address": req.master_addr,
            "master_port": req.master_port,
            "rank_offset": req.rank,
            "world_size": req.world_size,
            "timeout_s": req.timeout_s,
        }
    return {
        "master_address": req.master_addr,
        "master_port": req.master_port,
        "rank_offset": req.rank,
        "world_size": req.world_size,
        "packed": True,
        "packed_buffer_size_bytes": bucket_bytes,
        "packed_num_buffers": 2,
    }


def update_info(req: UpdateWeightsRequest, engine: str = "nccl") -> dict[str, Any]:
    """Our update request -> the engine's update-info fields (manifest order; gloo also takes the bucket
    size and the deadline, which the NCCL engine fixes at init)."""
    manifest = req.manifest
    info: dict[str, Any] = {
        "names": [t.name for t in manifest.tensors],
        "dtype_names": [t.dtype for t in manifest.tensors],
        "shapes": [list(t.shape) for t in manifest.tensors],
    }
    if engine == GLOO_ENGINE:
        info.update(bucket_bytes=req.bucket_bytes, sync_id=req.sync_id, timeout_s=req.timeout_s)
    return info


def checkpoint_specs(model: str, dtype: str) -> dict[str, tuple[str, list[int]]]:
    """Names, dtypes and shapes of the HF checkpoint (what vLLM's load_weights takes), built on 'meta'."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model)
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    return {n: (str(t.dtype).split(".")[-1], list(t.shape)) for n, t in m.state_dict().items()}


class VLLMWeightReceiver:
    """Receives weight updates into a running AsyncLLM. ``run(coro, timeout)`` runs a coroutine on the
    backend's event loop; ``specs`` maps checkpoint tensor names to (dtype, shape)."""

    def __init__(
        self,
        engine,
        run: Callable[[Any, float], Any],
        info: BackendInfo,
        transfer_engine: str,
        bucket_bytes: int,
        specs: dict[str, tuple[str, list[int]]],
    ):
        self.engine, self._run, self.info = engine, run, info
        self.transfer_engine = transfer_engine
        self.bucket_bytes = bucket_bytes
        self.specs = specs
        self.version = 0  # the weight version the engine serves (0: as loaded)
        self._store = None
        self._rank = 0
        self._update_lock = threading.Lock()

    @property
    def has_group(self) -> bool:
        return self._store is not None

    def init(self, req: InitWeightTransferRequest) -> InitWeightTransferResponse:
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

        from rollout_server.weight_transfer import open_store

        want = "gloo" if self.transfer_engine == GLOO_ENGINE else "nccl"
        if req.backend != want:
            raise BadRequest(f"backend: this vLLM server receives weights over {want!r}, not {req.backend!r}")
        with self._update_lock:
            self._store = open_store(req.master_addr, req.master_port, False, req.timeout_s)
            self._rank = req.rank
            info = init_info(req, self.bucket_bytes, self.transfer_engine)
            request = WeightTransferInitRequest(init_info=info)
            self._run(self.engine.init_weight_transfer_engine(request), timeout=req.timeout_s + 30)
        return InitWeightTransferResponse(
            rank=req.rank, world_size=req.world_size, backend=want, wire=self.info.transfer_wire
        )

    def close(self) -> None:
        if self._store is not None:
            self._drop_transfer_group()

    def update(self, req: UpdateWeightsRequest) -> UpdateWeightsResponse:
        from rollout_server.weight_transfer import WeightTransferError

        bucket_problems = []
        if self.info.required_bucket_bytes is not None and req.bucket_bytes != self.bucket_bytes:
            bucket_problems.append(
                f"bucket_bytes: {req.bucket_bytes} != {self.bucket_bytes} fixed by --weight-transfer-bucket-bytes"
            )
        with accepted_update(
            req,
            store=self._store,
            rank=self._rank,
            specs=self.specs,
            lock=self._update_lock,
            problems=bucket_problems,
        ) as update:
            t1 = time.monotonic()
            try:
                wire_s = self._run(self._receive(req), timeout=req.timeout_s + 60)
            except Exception as e:
                # The group is unusable after a failed collective: drop it so the trainer re-inits.
                self._drop_transfer_group()
                raise WeightTransferError(f"receive failed: {type(e).__name__}: {e}") from e
            t2 = time.monotonic()
            return update.done(
                UpdateWeightsResponse(
                    version=req.version,
                    num_tensors=len(req.manifest.tensors),
                    num_buckets=len(update.buckets),  # the worker plans the same in its own process
                    bytes=req.manifest.total_bytes,
                    handshake_s=update.handshake_s,
                    # receive: the buckets on the wire; swap: pausing, loading into vLLM (its layer-wise reload,
                    # which on CPU also re-packs every GEMM weight), finalising and resuming. Without a wire time
                    # (NCCL engine) the whole update counts as receive.
                    receive_s=(t2 - t1) if wire_s is None else wire_s,
                    swap_s=0.0 if wire_s is None else max(0.0, t2 - t1 - wire_s),
                )
            )

    def _drop_transfer_group(self) -> None:
        try:
            self._run(self.engine.shutdown_weight_transfer_engine(), timeout=60)
        except Exception as e:  # best effort: the group is being abandoned anyway
            log.warning("closing the weight-transfer engine after a failed update: %s", e)
        self._store = None

    def _check_received(self, req: UpdateWeightsRequest) -> float:
        """Our gloo engine reports each worker's outcome in the trainer's store (it must not raise):
        "ok <seconds on the wire>" or the error. Returns the slowest worker's wire time."""
        from rollout_server.weight_transfer import WeightTransferError, received_key

        wire_s = 0.0
        for tp_rank in range(self.info.transfer_ranks):
            key = received_key(req.sync_id, self._rank + tp_rank)
            try:
                outcome = self._store.get(key).decode()
            except Exception as e:
                raise WeightTransferError(f"worker {tp_rank} reported no outcome ({e})") from e
            word, _, seconds = outcome.partition(" ")
            if word != "ok":
                raise WeightTransferError(f"worker {tp_rank}: {outcome}")
            wire_s = max(wire_s, float(seconds or 0.0))
        return wire_s

    async def _receive(self, req: UpdateWeightsRequest) -> float | None:
        """Pause, receive and load, resume. Returns the seconds on the wire where the engine reports them
        (our gloo engine receives every bucket before loading any; vLLM's NCCL engine interleaves the two)."""
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        wire_s = None
        await self.engine.pause_generation(mode="wait", clear_cache=True)
        try:
            await self.engine.start_weight_update()
            ok = False
            try:
                update = WeightTransferUpdateRequest(update_info=update_info(req, self.transfer_engine))
                await asyncio.wait_for(self.engine.update_weights(update), timeout=req.timeout_s + 30)
                if self.transfer_engine == GLOO_ENGINE:
                    wire_s = self._check_received(req)
                ok = True
            finally:
                # Always end the update session (vLLM refuses to start another one otherwise). After a
                # failed gloo receive nothing was loaded, and finishing puts the old weights back.
                await self.engine.finish_weight_update(weight_version=str(req.version) if ok else None)
            await self.engine.reset_prefix_cache()
            self.version = req.version
        finally:
            await self.engine.resume_generation()
        return wire_s
