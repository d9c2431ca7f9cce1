"""The small interface every generation backend implements; app.py only talks to this.

A backend owns the model and its tokenizer, generates (blocking, called from a worker thread) and takes new
weights. The weight-transfer *wiring* (group, handshake, staging) is the backend's too, because vLLM keeps
its receive loop inside its own workers while the torch backend receives in-process.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

from rollout_server.protocol import (
    Completion,
    GenerateRequest,
    InitWeightTransferRequest,
    InitWeightTransferResponse,
    UpdateWeightsRequest,
    UpdateWeightsResponse,
)


class BadRequest(ValueError):
    """The request is wrong (4xx); the message names the field or tensor."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


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
