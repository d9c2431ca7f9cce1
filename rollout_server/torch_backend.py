"""PyTorch backend: a transformers causal LM on CPU or one CUDA GPU, batched sampling, in-process weight receive.

Generation runs one request at a time (app.py feeds it from a single worker thread) through
`torch_generate.generate_batch`: all n samples of all prompts in one batch with a KV cache. A weight update
receives every bucket into a staging copy while generation keeps serving the old weights; only the final
copy into the live parameters holds the generation lock. No prefix/KV cache survives a request, so there is
nothing to reset after a swap.
"""

from __future__ import annotations

import logging
import threading
import time

import torch

from rollout_server.backend import AcceptedUpdate, Backend, BackendInfo, BadRequest, accepted_update
from rollout_server.protocol import (
    Completion,
    GenerateRequest,
    InitWeightTransferRequest,
    InitWeightTransferResponse,
    UpdateWeightsRequest,
    UpdateWeightsResponse,
    cut_at_stop,
    dtype_name,
)
from rollout_server.torch_decoders import weights_swapped
from rollout_server.torch_generate import StopChecker, generate_batch
from rollout_server.weight_transfer import (
    TransferGroup,
    WeightTransferError,
    join_group,
    open_store,
    server_receive,
    take_spare,
)

log = logging.getLogger("rollout_server")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# Sampling settings only the vLLM backend implements, with their neutral value (the torch backend refuses others).
VLLM_ONLY = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0}


def unsupported(req: GenerateRequest) -> BadRequest | None:
    """The refusal of a setting this backend cannot honour (a 400 naming it), or None."""
    for name, neutral in VLLM_ONLY.items():
        value = getattr(req, name)
        if value != neutral:
            e = BadRequest(
                f"{name}: not supported by the torch backend (got {value}; only {neutral} is); "
                "use --backend vllm"
            )
            e.param, e.code = name, "unsupported_parameter"  # read by the HTTP layer (OpenAI's error shape)
            return e
    return None


class TorchBackend(Backend):
    def __init__(
        self, model: str, device: str | None = None, dtype: str = "auto", max_model_len: int | None = None
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch_dtype = DTYPES.get(dtype, "auto") if dtype != "auto" else "auto"
        if torch_dtype == "auto" and self.device.type == "cpu":
            torch_dtype = torch.float32  # bf16 matmuls on CPU are slow and less exact
        self._tok = AutoTokenizer.from_pretrained(model)
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype).to(self.device).eval()
        cfg = self.model.config
        ctx = getattr(cfg, "max_position_embeddings", None) or 2048
        if max_model_len is not None and max_model_len > ctx:
            raise ValueError(f"--max-model-len {max_model_len} exceeds the model's context {ctx}")
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self._tok.eos_token_id is not None:
            eos_ids.add(self._tok.eos_token_id)
        self.eos_ids = eos_ids
        self.pad_id = (
            self._tok.pad_token_id if self._tok.pad_token_id is not None else min(eos_ids, default=0)
        )
        self.info = BackendInfo(
            model=model, backend="torch", max_model_len=max_model_len or ctx, eos_token_ids=sorted(eos_ids)
        )
        self.vocab_size = cfg.vocab_size
        # state_dict(keep_vars=True) lists tied weights under both names (embed + lm_head): both accepted.
        self.params: dict[str, torch.Tensor] = dict(self.model.state_dict(keep_vars=True))
        # name -> (dtype, shape) of what a weight update must send (swaps keep both)
        self.specs = {n: (dtype_name(p.dtype), list(p.shape)) for n, p in self.params.items()}
        self.weight_version = 0
        self._gen_lock = threading.Lock()  # held by a generation; the weight swap takes it
        self._update_lock = threading.Lock()  # one update at a time
        self._group: TransferGroup | None = None
        self._spares: list[torch.Tensor] = []  # free receive buffers
        self._backing: dict[int, torch.Tensor] = {}  # id(param) -> received buffer it lives in
        self._users: dict[int, set[int]] = {}  # id(buffer) -> ids of params living in it
        self._seed_rng = torch.Generator().manual_seed(int(time.time_ns() % 2**63))

    @property
    def tokenizer(self):
        return self._tok

    # ---- generation ---------------------------------------------------------------------------------------
    def check_request(self, req: GenerateRequest) -> None:
        """Refuse (BadRequest, 400) what this backend cannot do, before any work; the routes call it early."""
        error = unsupported(req)
        if error is not None:
            raise error

    def generate(self, req: GenerateRequest, prompt_ids: list[list[int]], on_token=None) -> list[Completion]:
        self.check_request(req)
        seed = (
            req.seed if req.seed is not None else int(torch.randint(0, 2**62, (1,), generator=self._seed_rng))
        )
        gen = torch.Generator(device=self.device).manual_seed(seed)
        with self._gen_lock:
            version = self.weight_version
            rows = generate_batch(
                self.model,
                prompt_ids,
                n=req.n,
                max_tokens=req.max_tokens,
                temperature=req.temperature,
                top_k=req.top_k,
                top_p=req.top_p,
                generator=gen,
                eos_ids=self.eos_ids,
                pad_id=self.pad_id,
                stop=StopChecker(self._tok, req.stop),
                ignore_eos=req.ignore_eos,
                on_token=on_token,
                top_logprobs=req.top_logprobs,
            )
        out = []
        for i, row in enumerate(rows):
            text = self._tok.decode(row.token_ids, skip_special_tokens=True)
            if row.stop_hit is not None:
                text = cut_at_stop(text, req.stop)
            out.append(
                Completion(
                    prompt_index=i // req.n,
                    sample_index=i % req.n,
                    token_ids=row.token_ids,
                    text=text,
                    logprobs=row.logprobs,
                    finish_reason=row.finish_reason,
                    weight_version=version,
                    top_logprobs=row.top_logprobs,
                )
            )
        return out

    # ---- weight transfer ----------------------------------------------------------------------------------
    @property
    def has_weight_transfer(self) -> bool:
        return self._group is not None

    def init_weight_transfer(self, req: InitWeightTransferRequest) -> InitWeightTransferResponse:
        if req.backend == "nccl" and self.device.type != "cuda":
            raise BadRequest("backend: 'nccl' needs the model on CUDA; this server runs on CPU (use 'gloo')")
        with self._update_lock:
            self.close_weight_transfer()
            store = open_store(req.master_addr, req.master_port, False, req.timeout_s)
            self._group = join_group(
                store, req.master_addr, req.rank, req.world_size, req.backend, req.timeout_s
            )
        log.info("joined weight-transfer group: rank %d of %d over %s", req.rank, req.world_size, req.backend)
        return InitWeightTransferResponse(
            rank=req.rank, world_size=req.world_size, backend=req.backend, wire="torch"
        )

    def close_weight_transfer(self) -> None:
        if self._group is not None:
            self._group.close()
            self._group = None

    def update_weights(self, req: UpdateWeightsRequest) -> UpdateWeightsResponse:
        group = self._group
        with accepted_update(
            req,
            store=group.store if group is not None else None,
            rank=group.rank if group is not None else 0,
            specs=self.specs,
            lock=self._update_lock,
        ) as update:
            return update.done(self._receive_and_swap(group, req, update))

    def _receive_and_swap(
        self, group: TransferGroup, req: UpdateWeightsRequest, update: AcceptedUpdate
    ) -> UpdateWeightsResponse:
        t1 = time.monotonic()
        deadline = t1 + req.timeout_s
        buckets = update.buckets
        staging: list[tuple[str, torch.Tensor]] = []  # views into the received buckets
        received: list[torch.Tensor] = []

        def alloc(nbytes: int) -> torch.Tensor:
            buf = take_spare(self._spares, nbytes, group.device)
            received.append(buf)
            return buf

        try:
            nbytes = server_receive(group, req.manifest, buckets, deadline, staging.extend, alloc=alloc)
        except WeightTransferError as e:
            self._spares.extend(received)
            # The group's state is unknown after a partial transfer: leave it, the trainer must re-init.
            self.close_weight_transfer()
            raise WeightTransferError(
                f"{e}; the update was dropped, version {self.weight_version} keeps serving; "
                "call /init_weight_transfer again"
            ) from e
        t2 = time.monotonic()
        with self._gen_lock, torch.no_grad():
            for (name, t), buf in zip(staging, self._bucket_of(staging, buckets, received), strict=True):
                p = self.params[name]
                if t.device == p.device and t.is_contiguous() and t.data_ptr() % 16 == 0:
                    p.data = t  # O(1): the parameter now lives in the received bucket (no second copy)
                    self._back(p, buf)
                else:
                    p.copy_(t, non_blocking=True)  # e.g. received on CPU over gloo, model on CUDA
                    self._back(p, None)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            weights_swapped(self.model)
            self.weight_version = req.version
        t3 = time.monotonic()
        return UpdateWeightsResponse(
            version=req.version,
            num_tensors=len(req.manifest.tensors),
            num_buckets=len(buckets),
            bytes=nbytes,
            handshake_s=update.handshake_s,
            receive_s=t2 - t1,
            swap_s=t3 - t2,
        )

    # Buffer recycling: after a pointer swap the parameters live in received buckets; the buckets they lived in
    # before are free once every parameter they backed has moved, and become the next update's receive buffers
    # (warm pages: allocating and faulting in fresh memory each sync cost as much as the transfer itself).
    @staticmethod
    def _bucket_of(staging, buckets, received) -> list[torch.Tensor]:
        owners = []
        for b, buf in zip(buckets, received, strict=True):
            owners += [buf] * len(b.items)
        return owners

    def _back(self, param: torch.Tensor, buf: torch.Tensor | None) -> None:
        old = self._backing.pop(id(param), None)
        if old is not None:
            users = self._users[id(old)]
            users.discard(id(param))
            if not users:
                del self._users[id(old)]
                self._spares.append(old)
        if buf is not None:
            self._backing[id(param)] = buf
            self._users.setdefault(id(buf), set()).add(id(param))

    def shutdown(self) -> None:
        self.close_weight_transfer()
