"""The small interface every generation backend implements; app.py only talks to this.

A backend owns the model and its tokenizer, generates (blocking, called from a worker thread) and takes new
weights. The weight-transfer *wiring* (group, handshake, staging) is the backend's too, because vLLM keeps
its receive loop inside its own workers while the torch backend receives in-process.
"""

from __future__ import annotations

import contextlib
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rollout_server.protocol import (
    Bucket,
    Completion,
    GenerateRequest,
    InitWeightTransferRequest,
    InitWeightTransferResponse,
    UpdateWeightsRequest,
    UpdateWeightsResponse,
    plan_buckets,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch.distributed as dist


class BadRequest(ValueError):
    """The request is wrong (4xx); the message names the field or tensor."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class AcceptedUpdate:
    """What ``accepted_update`` hands the receive: the handshake's seconds, the manifest's buckets (planned
    before the "ok"), and ``done`` to call with the response once the new weights serve (it reports them
    through the trainer's store, step 4 of weight_transfer's handshake, and returns the response for the HTTP
    answer)."""

    handshake_s: float
    buckets: list[Bucket]
    done: Callable[[UpdateWeightsResponse], UpdateWeightsResponse]


@contextlib.contextmanager
def accepted_update(
    req: UpdateWeightsRequest,
    *,
    store: dist.Store | None,
    rank: int,
    specs: Mapping[str, tuple[str, list[int]]],
    lock: threading.Lock,
    problems: Sequence[str] = (),
) -> Iterator[AcceptedUpdate]:
    """What every backend does with ``POST /update_weights`` around its receive, in the contract's order:

    409 without a transfer group (``store`` None: the trainer's store, which this server's ``rank`` joined);
    422 for a manifest the served model cannot take (``problems`` adds a backend's own, e.g. vLLM's fixed
    bucket size): the server never enters the collective, and the trainer aborts the others; 409 while
    another update runs; then the handshake ("ok" into the trainer's store, wait for its decision), 409 when
    the trainer aborted or never decided within the request's timeout. Holds the update lock until the block
    (the receive and swap) ends.
    """
    from rollout_server.weight_transfer import WeightTransferError, server_report_done, server_wait_go

    if store is None:
        raise BadRequest("no weight-transfer group: call /init_weight_transfer first", status=409)
    found = req.manifest.mismatches(specs) + list(problems)
    if found:
        raise BadRequest("manifest: " + "; ".join(found), status=422)
    # Planned now, before the "ok": a request sent ahead waits for its go with the plan made, so the receive
    # is posted as soon as the go comes (a late post holds the trainer's first broadcast back).
    buckets = plan_buckets(req.manifest, req.bucket_bytes)
    if not lock.acquire(blocking=False):
        raise BadRequest("another weight update is in progress", status=409)
    try:
        t0 = time.monotonic()
        try:
            go = server_wait_go(store, rank, req.sync_id, req.go_wait_s)
        except WeightTransferError as e:
            # No byte moved and nothing changed here: the trainer never decided (an update announced ahead of
            # a step that outlived the timeout, or a trainer gone). Called off, not a failed sync.
            raise BadRequest(f"update called off: {e}", status=409) from e
        if not go:
            raise BadRequest(
                "update aborted by the trainer (another server refused the manifest, the first bucket did not "
                "match it, or the trainer announced this update and then pushed another)",
                status=409,
            )

        def done(res: UpdateWeightsResponse) -> UpdateWeightsResponse:
            server_report_done(store, req.sync_id, rank, res.model_dump_json())
            return res

        yield AcceptedUpdate(handshake_s=time.monotonic() - t0, buckets=buckets, done=done)
    finally:
        lock.release()


@dataclass
class BackendInfo:
    model: str
    backend: str
    max_model_len: int
    eos_token_ids: list[int] = field(default_factory=list)
    transfer_ranks: int = 1  # ranks this server occupies in the weight-transfer group (vLLM: TP size)
    transfer_wire: str = "torch"  # collective implementation the trainer must use ("torch" | "vllm_pynccl")
    required_bucket_bytes: int | None = None  # vLLM: fixed when the transfer engine is initialised
    max_concurrency: int = 1  # generation requests run at once (vLLM batches across requests itself)


class Backend(ABC):
    """Generation + weight updates. Methods are blocking; app.py runs them off the event loop."""

    info: BackendInfo
    weight_version: int = 0

    @property
    @abstractmethod
    def tokenizer(self):
        """A Hugging Face tokenizer (used for prompts, chat templates and token counts)."""

    @abstractmethod
    def generate(
        self,
        req: GenerateRequest,
        prompt_ids: list[list[int]],
        on_token: Callable[[int, int, bool], None] | None = None,
    ) -> list[Completion]:
        """len(prompt_ids) * req.n completions, prompt-major; `prompt_ids` are tokenized and checked already.

        `on_token(row, token_id, finished)` is called from the generation thread for every sampled token
        (streaming); rows are numbered prompt-major like the result.
        """

    @abstractmethod
    def init_weight_transfer(self, req: InitWeightTransferRequest) -> InitWeightTransferResponse:
        """Join the trainer's dedicated process group (blocks until the rendezvous completes or times out)."""

    @abstractmethod
    def update_weights(self, req: UpdateWeightsRequest) -> UpdateWeightsResponse:
        """Validate, handshake, receive into staging, swap. Raises BadRequest before any byte moves."""

    @property
    @abstractmethod
    def has_weight_transfer(self) -> bool: ...

    def close_weight_transfer(self) -> None:  # noqa: B027 - optional hook
        """Leave the process group (the trainer re-inits after a failed sync)."""

    def pause(self) -> None:  # noqa: B027 - optional hook
        """Stop starting new generations (in-flight ones finish)."""

    def resume(self) -> None:  # noqa: B027 - optional hook
        """Undo pause()."""

    def shutdown(self) -> None:  # noqa: B027 - optional hook
        """Release resources at exit (engine processes included); idempotent."""

    def check_request(self, req: GenerateRequest) -> None:  # noqa: B027 - optional hook
        """Raise BadRequest (naming the field) for a request this backend cannot honour, before any work;
        e.g. the torch backend refuses sampling penalties that vLLM supports."""

    def dead_reason(self) -> str | None:
        """Why the backend can no longer generate (e.g. vLLM's engine process died), or None while it can.
        Once set it stays set: /health answers ready=false with it and generation routes answer 503."""
        return None
