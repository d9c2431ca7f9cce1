"""OpenAI-compatible routes, so any OpenAI client (or a web chat UI) can talk to a model while it trains.

`/v1/completions` and `/v1/chat/completions` translate to the native `GenerateRequest` and run through the same
generation queue. `stream: true` on chat sends Server-Sent Events, one `chat.completion.chunk` per decoded
text delta, then `data: [DONE]`. Fields OpenAI clients commonly send are accepted; penalties and logit_bias
only at their neutral value (the trainer's log-prob convention has no room for them); anything else is 422.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rollout_server import protocol as P
from rollout_server.app import (
    GENERATION_AUTH,
    HTTPError,
    ServerState,
    State,
    error_body,
    json_body,
    off_loop,
    prepare_prompts,
    refuse_if_unavailable,
    run_generation,
    validation_message,
)
from rollout_server.backend import BadRequest

MAX_MESSAGES = 1024
MAX_STOP_CHARS = 256


class _OAIBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, max_length=512, description="Ignored: the server serves one model.")
    n: int = Field(1, ge=1, le=P.MAX_N, description="Choices to generate.")
    max_tokens: int | None = Field(None, ge=1, le=P.MAX_TOKENS_LIMIT, description="Max new tokens.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus mass.")
    top_k: int = Field(0, ge=0, description="vLLM extension; 0 disables.")
    seed: int | None = Field(None, ge=0, description="Reproducible sampling.")
    stop: str | list[str] | None = Field(None, description="Stop string(s).")
    stream: bool = Field(False, description="Server-Sent Events (chat only).")
    stream_options: dict[str, Any] | None = Field(None, description="Accepted and ignored.")
    user: str | None = Field(None, max_length=256, description="Accepted and ignored.")
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0, description="Only 0 is supported.")
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0, description="Only 0 is supported.")
    logit_bias: dict[str, float] | None = Field(None, max_length=0, description="Only empty is supported.")

    @field_validator("stop")
    @classmethod
    def _bounded_stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > P.MAX_STOP or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(
                f"at most {P.MAX_STOP} stop strings of 1..{MAX_STOP_CHARS} characters each "
                f"(got {len(stops)}, longest {max((len(s) for s in stops), default=0)})"
            )
        return v

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_OAIBase):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description="Text or token-id prompt(s)."
    )
    logprobs: int | None = Field(
        None, ge=0, le=5, description="Return sampled-token log-probs (no top-k list)."
    )
    echo: bool = Field(False, description="Only false is supported.")

    @model_validator(mode="after")
    def _no_echo(self) -> CompletionRequest:
        if self.echo:
            raise ValueError("echo: not supported")
        return self


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"] = Field(..., description="Speaker.")
    content: str = Field(..., max_length=1 << 20, description="Message text.")
    name: str | None = Field(None, max_length=64, description="Accepted and ignored.")


class ChatRequest(_OAIBase):
    messages: list[ChatMessage] = Field(
        ..., min_length=1, max_length=MAX_MESSAGES, description="The conversation."
    )
    logprobs: bool = Field(False, description="Return sampled-token log-probs.")
    top_logprobs: int | None = Field(None, ge=0, le=0, description="Only 0 is supported.")
    max_completion_tokens: int | None = Field(
        None, ge=1, le=P.MAX_TOKENS_LIMIT, description="Alias of max_tokens."
    )


def _native(req: _OAIBase, prompts=None, token_ids=None, default_max: int = 16) -> P.GenerateRequest:
    max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens or default_max
    try:
        return P.GenerateRequest(
            prompts=prompts,
            prompt_token_ids=token_ids,
            n=req.n,
            max_tokens=max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            seed=req.seed,
            stop=req.stops(),
        )
    except ValidationError as e:
        raise HTTPError(validation_message(e), status=422, code="invalid_value") from None


def _usage(res: P.GenerateResponse) -> dict:
    return {
        "prompt_tokens": res.prompt_tokens,
        "completion_tokens": res.completion_tokens,
        "total_tokens": res.prompt_tokens + res.completion_tokens,
    }


def model_name(state: ServerState) -> str:
    return state.backend.info.model


router = APIRouter()


@router.get(P.ROUTE_OAI_MODELS, dependencies=[GENERATION_AUTH])
async def models(state: State):
    return {
        "object": "list",
        "data": [{"id": model_name(state), "object": "model", "created": 0, "owned_by": "rollout_server"}],
    }


@router.post(P.ROUTE_OAI_COMPLETIONS, dependencies=[GENERATION_AUTH])
async def completions(state: State, req: Annotated[CompletionRequest, json_body(CompletionRequest)]):
    if req.stream:
        raise HTTPError("stream: only supported on /v1/chat/completions", status=422, param="stream")
    p = req.prompt
    if isinstance(p, str):
        native = _native(req, prompts=[p])
    elif p and all(isinstance(x, str) for x in p):
        native = _native(req, prompts=list(p))
    elif p and all(isinstance(x, int) for x in p):
        native = _native(req, token_ids=[list(p)])
    else:
        native = _native(req, token_ids=[list(x) for x in p])
    ids = await prepare_prompts(state, native, field="prompt")
    res = await run_generation(state, native, ids)
    tok = state.backend.tokenizer
    choices = []
    for i, c in enumerate(res.completions):
        choice = {"index": i, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}
        if req.logprobs is not None:
            choice["logprobs"] = {
                "tokens": tok.convert_ids_to_tokens(c.token_ids),
                "token_logprobs": c.logprobs,
                "top_logprobs": None,
                "text_offset": None,
            }
        choices.append(choice)
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model_name(state),
        "choices": choices,
        "usage": _usage(res),
        "weight_version": res.weight_version,
    }


def check_chat_size(state: ServerState, req: ChatRequest) -> None:
    """The conversation becomes ONE prompt: all its characters together are bounded like one prompt."""
    total = sum(len(m.content) + len(m.name or "") for m in req.messages)
    if total > state.max_prompt_chars:
        raise HTTPError(
            f"messages: {total} characters in total exceed the limit of {state.max_prompt_chars} per "
            f"conversation ({state.limit_text()})",
            code="prompt_too_long",
            param="messages",
        )


def chat_prompt_ids(state: ServerState, req: ChatRequest) -> list[int]:
    """The chat template applied and tokenised (blocking: runs on the tokenize pool)."""
    tok = state.backend.tokenizer
    if not getattr(tok, "chat_template", None):
        raise HTTPError(
            "messages: this model's tokenizer has no chat template; use /v1/completions", param="messages"
        )
    msgs = [{"role": m.role, "content": m.content} for m in req.messages]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


@router.post(P.ROUTE_OAI_CHAT, dependencies=[GENERATION_AUTH])
async def chat(state: State, req: Annotated[ChatRequest, json_body(ChatRequest)]):
    # the sampling settings are checked (a bad one refused) before any template or tokenizer work
    _native(req, token_ids=[[0]], default_max=256)
    refuse_if_unavailable(state)
    check_chat_size(state, req)
    prompt = await off_loop(state, chat_prompt_ids, state, req)
    native = _native(req, token_ids=[prompt], default_max=256)
    ids = await prepare_prompts(state, native)  # context, budget and vocabulary: a bad request is a 4xx here
    if req.stream:
        return StreamingResponse(_stream_chat(state, native, ids), media_type="text/event-stream")
    res = await run_generation(state, native, ids)
    tok = state.backend.tokenizer
    choices = []
    for i, c in enumerate(res.completions):
        choice = {
            "index": i,
            "message": {"role": "assistant", "content": c.text},
            "finish_reason": c.finish_reason,
            "logprobs": None,
        }
        if req.logprobs:
            toks = tok.convert_ids_to_tokens(c.token_ids)
            choice["logprobs"] = {
                "content": [
                    {"token": t, "logprob": lp, "bytes": None, "top_logprobs": []}
                    for t, lp in zip(toks, c.logprobs, strict=True)
                ]
            }
        choices.append(choice)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_name(state),
        "choices": choices,
        "usage": _usage(res),
        "weight_version": res.weight_version,
    }


async def _stream_chat(state: ServerState, native: P.GenerateRequest, ids: list[list[int]]):
    """Tokens arrive from the generation thread through a queue; text deltas leave as SSE chunks."""
    from rollout_server.torch_backend import cut_at_stop

    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    tok = state.backend.tokenizer
    stops = native.stop
    hold = max((len(s) for s in stops), default=1) - 1  # chars held back: they may start a stop string
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def on_token(row: int, token: int, finished: bool) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, (row, token, finished))

    def chunk(index: int, delta: dict, finish: str | None) -> str:
        body = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model_name(state),
            "choices": [{"index": index, "delta": delta, "finish_reason": finish}],
        }
        return f"data: {json.dumps(body)}\n\n"

    task = asyncio.create_task(run_generation(state, native, ids, on_token=on_token))
    task.add_done_callback(lambda _t: loop.call_soon_threadsafe(queue.put_nowait, None))
    rows: dict[int, list[int]] = {}
    sent: dict[int, int] = {}
    for i in range(native.n):
        yield chunk(i, {"role": "assistant", "content": ""}, None)
    while True:
        item = await queue.get()
        if item is None:
            break
        row, token, finished = item
        rows.setdefault(row, []).append(token)
        text = cut_at_stop(tok.decode(rows[row], skip_special_tokens=True), stops)
        upto = len(text) if finished else max(0, len(text) - hold)
        if not finished and text.endswith("\ufffd"):
            upto = min(upto, len(text) - 1)  # an incomplete UTF-8 character: wait for its next byte
        if upto > sent.get(row, 0):
            yield chunk(row, {"content": text[sent.get(row, 0) : upto]}, None)
            sent[row] = upto
    try:
        res = task.result()
    except Exception as e:  # the status line is sent already: the error travels as one OpenAI-shaped event
        if isinstance(e, BadRequest):
            status, code = e.status, getattr(e, "code", None)
        else:
            status, code = 500, None
            e = f"internal error: {type(e).__name__}: {e}"
        yield f"data: {json.dumps(error_body(P.ROUTE_OAI_CHAT, status, str(e), code))}\n\n"
        yield "data: [DONE]\n\n"
        return
    for c in res.completions:
        rest = c.text[sent.get(c.sample_index, 0) :]
        if rest:
            yield chunk(c.sample_index, {"content": rest}, None)
        yield chunk(c.sample_index, {}, c.finish_reason)
    yield "data: [DONE]\n\n"
