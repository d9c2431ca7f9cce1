"""OpenAI-compatible routes, so any OpenAI client (the `openai` SDK, a web chat UI) can talk to a model while it
trains.

`/v1/completions` and `/v1/chat/completions` translate to the native `GenerateRequest` and run through the same
generation queue. `stream: true` (both routes) sends Server-Sent Events: one chunk per decoded text delta, then
each choice's last chunk with its `finish_reason` (and, when asked, the logprobs of all its tokens), then, with
`stream_options: {"include_usage": true}`, one chunk with empty `choices` and the `usage`, then `data: [DONE]`.

Log-probs. Chat: `logprobs: true` and `top_logprobs: k` (0..20) give `choices[].logprobs.content`, one entry per
generated token `{token, logprob, bytes, top_logprobs: [k x {token, logprob, bytes}]}`. Completions: `logprobs: k`
(0..5) gives OpenAI's legacy shape `{tokens, token_logprobs, top_logprobs, text_offset}` where each
`top_logprobs` entry maps the k most likely tokens, plus the sampled one, to their log-probs, and `text_offset`
is each token's offset in the completion text. Token strings are text, never byte-level symbols: a sampled
token's string is the text it adds to the completion, so the strings concatenate to the completion text (before
a stop-string cut); a token that ends inside a UTF-8 character reads "" and the next one carries the character,
special tokens (skipped in the text) read "", and chat `bytes` are the token's exact bytes. Alternatives are
decoded on their own (special tokens by name). The values follow the server's convention (protocol.py): the
torch backend's are `log_softmax(logits / T)` before top-k/top-p, alternatives included; vLLM's are taken after
top-k/top-p (renormalised; a token they exclude reads -9999.0, as in OpenAI's API) and after penalties.

Sampling parameters. `presence_penalty`, `frequency_penalty` (-2..2) and `repetition_penalty` (vLLM's extension,
> 0; 1 = off) pass through to vLLM. The log-probs it then returns are those of the PENALISED distribution, which
is not what the trainer recomputes from the weights: fine for chatting, wrong for GRPO rollouts (the trainer
samples with the neutral values). The torch backend implements no penalty and answers 400 naming the parameter
(`param` set) for anything but the neutral value. `logit_bias` is refused (400) unless empty; `echo` unless false.
Fields OpenAI clients commonly send are accepted (`user`, `model`, ...); unknown fields are 422.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import time
import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rollout_server import protocol as P
from rollout_server.backend import BadRequest
from rollout_server.server_core import (
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

MAX_MESSAGES = 1024
MAX_STOP_CHARS = 256
MAX_CHAT_TOP_LOGPROBS = 20  # OpenAI's limit for chat
MAX_LEGACY_LOGPROBS = 5  # OpenAI's limit for /v1/completions
IMPOSSIBLE_LOGPROB = -9999.0  # OpenAI's value for -inf (not JSON)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = Field(False, description="Send a last chunk with empty `choices` and the `usage`.")
    include_obfuscation: bool | None = Field(None, description="Accepted and ignored (no obfuscation).")


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
    stream: bool = Field(False, description="Server-Sent Events.")
    stream_options: StreamOptions | None = Field(None, description="Only with stream: true.")
    user: str | None = Field(None, max_length=256, description="Accepted and ignored.")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="vLLM backend only; 0 = off.")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="vLLM backend only; 0 = off.")
    repetition_penalty: float = Field(1.0, gt=0.0, le=1e6, description="vLLM extension and backend; 1 = off.")
    logit_bias: dict[str, float] | None = Field(None, description="Only empty is supported.")

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

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_OAIBase):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description="Text or token-id prompt(s)."
    )
    logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_LEGACY_LOGPROBS,
        description="Log-probs of the sampled tokens and of the k most likely ones at each position.",
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
    logprobs: bool | None = Field(False, description="Return the sampled tokens' log-probs.")
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_CHAT_TOP_LOGPROBS, description="Most likely tokens per position (needs logprobs)."
    )
    max_completion_tokens: int | None = Field(
        None, ge=1, le=P.MAX_TOKENS_LIMIT, description="Alias of max_tokens."
    )


def _refuse_unsupported(req: _OAIBase) -> None:
    """OpenAI-shaped 400s for settings that are valid OpenAI but that this server does not honour."""
    if req.logit_bias:
        raise HTTPError(
            "logit_bias: not supported (the trainer's log-prob convention has no room for it); omit it or send {}",
            code="unsupported_parameter",
            param="logit_bias",
        )
    if req.stream_options is not None and not req.stream:
        raise HTTPError(
            "stream_options: only allowed with stream: true", code="invalid_value", param="stream_options"
        )
    if isinstance(req, ChatRequest) and req.top_logprobs and not req.logprobs:
        raise HTTPError("top_logprobs: needs logprobs: true", code="invalid_value", param="top_logprobs")


def _top_logprobs(req: _OAIBase) -> int:
    if isinstance(req, ChatRequest):
        return (req.top_logprobs or 0) if req.logprobs else 0
    return getattr(req, "logprobs", None) or 0


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
            top_logprobs=_top_logprobs(req),
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            repetition_penalty=req.repetition_penalty,
        )
    except ValidationError as e:
        raise HTTPError(validation_message(e), status=422, code="invalid_value") from None


def _check(state: ServerState, req: _OAIBase, native: P.GenerateRequest) -> None:
    """Every refusal that needs no tokenizer, before any work: unsupported OpenAI settings, then what the
    backend cannot do (the torch backend and penalties; `check_request` is optional on a backend)."""
    _refuse_unsupported(req)
    check = getattr(state.backend, "check_request", None)
    if check is not None:
        check(native)


def _usage(res: P.GenerateResponse) -> dict:
    return {
        "prompt_tokens": res.prompt_tokens,
        "completion_tokens": res.completion_tokens,
        "total_tokens": res.prompt_tokens + res.completion_tokens,
    }


def model_name(state: ServerState) -> str:
    return state.backend.info.model


# ---- token strings and log-probs ----------------------------------------------------------------------------
def _gpt2_byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode: byte-level BPE symbol (e.g. 'Ċ', 'Ġ') -> the byte it stands for."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = list(bs)
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


BYTE_DECODER = _gpt2_byte_decoder()


def _is_byte_level(tok) -> bool:
    try:
        decoder = json.loads(tok.backend_tokenizer.decoder.__getstate__())
    except Exception:  # a slow tokenizer, no decoder, another library: the generic path
        return False
    kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders") or []}
    return "ByteLevel" in kinds


class TokenTexts:
    """Token ids -> text strings (and exact bytes) for OpenAI's logprobs, for one tokenizer and one answer."""

    def __init__(self, tok):
        self.tok = tok
        self.added = dict(getattr(tok, "added_tokens_decoder", None) or {})
        self.special = set(tok.all_special_ids) | {i for i, a in self.added.items() if a.special}
        self.byte_level = _is_byte_level(tok)
        self._alts: dict[int, tuple[str, bytes]] = {}

    def _raw(self, ids: list[int], skip_special: bool) -> list[bytes] | None:
        """Each token's exact bytes (byte-level BPE only), or None where they cannot be read off the vocab."""
        if not self.byte_level:
            return None
        out = []
        for t, sym in zip(ids, self.tok.convert_ids_to_tokens(ids), strict=True):
            if skip_special and t in self.special:
                out.append(b"")  # skipped in the text
                continue
            if t in self.added:  # added tokens are stored as text, not as byte-level symbols
                out.append(self.added[t].content.encode())
                continue
            try:
                out.append(bytes(BYTE_DECODER[ch] for ch in sym))
            except (KeyError, TypeError):
                return None
        return out

    def pieces(self, ids: list[int]) -> tuple[list[str], list[bytes]]:
        """The text each sampled token adds (they concatenate to the decoded completion) and its bytes."""
        raw = self._raw(ids, skip_special=True)
        if raw is not None:
            dec = codecs.getincrementaldecoder("utf-8")("replace")
            texts = [dec.decode(b) for b in raw]
            if texts:
                texts[-1] += dec.decode(b"", final=True)
            if "".join(texts) == self.tok.decode(ids, skip_special_tokens=True):
                return texts, raw
        texts = self._windowed(ids)
        return texts, [t.encode() for t in texts]

    def _windowed(self, ids: list[int]) -> list[str]:
        """Any tokenizer: decode a short window ending at each token and keep what it adds (vLLM's
        incremental detokenisation); a token that leaves an incomplete character adds nothing yet."""
        decode = self.tok.decode
        texts: list[str] = []
        prefix = read = 0
        for i in range(len(ids)):
            before = decode(ids[prefix:read], skip_special_tokens=True)
            now = decode(ids[prefix : i + 1], skip_special_tokens=True)
            if len(now) > len(before) and now.startswith(before) and not now.endswith("\ufffd"):
                texts.append(now[len(before) :])
                prefix, read = read, i + 1
            else:
                texts.append("")
        if texts and read < len(ids):  # the answer ends inside a character: decode says so (U+FFFD)
            before = decode(ids[prefix:read], skip_special_tokens=True)
            texts[-1] += decode(ids[prefix:], skip_special_tokens=True)[len(before) :]
        return texts

    def alternative(self, t: int) -> tuple[str, bytes]:
        """A token on its own (a top-logprobs alternative): its text (special tokens by name) and bytes."""
        if t not in self._alts:
            text = self.tok.decode([t], skip_special_tokens=False)
            raw = self._raw([t], skip_special=False)
            self._alts[t] = (text, raw[0] if raw else text.encode())
        return self._alts[t]


def _lp(x: float) -> float:
    return max(float(x), IMPOSSIBLE_LOGPROB)


def chat_logprobs(texts: TokenTexts, c: P.Completion) -> dict:
    pieces, raw = texts.pieces(c.token_ids)
    content = []
    for j, (t, lp) in enumerate(zip(c.token_ids, c.logprobs, strict=True)):
        top = []
        for alt, alt_lp in c.top_logprobs[j] if c.top_logprobs else []:
            text, b = (pieces[j], raw[j]) if alt == t else texts.alternative(alt)
            top.append({"token": text, "logprob": _lp(alt_lp), "bytes": list(b)})
        content.append({"token": pieces[j], "logprob": _lp(lp), "bytes": list(raw[j]), "top_logprobs": top})
    return {"content": content, "refusal": None}


def legacy_logprobs(texts: TokenTexts, c: P.Completion) -> dict:
    pieces, _raw = texts.pieces(c.token_ids)
    offsets, at, tops = [], 0, []
    for j, (t, lp) in enumerate(zip(c.token_ids, c.logprobs, strict=True)):
        offsets.append(at)
        at += len(pieces[j])
        top: dict[str, float] = {}
        for alt, alt_lp in c.top_logprobs[j] if c.top_logprobs else []:
            top.setdefault(pieces[j] if alt == t else texts.alternative(alt)[0], _lp(alt_lp))
        top.setdefault(pieces[j], _lp(lp))  # the sampled token is always there (OpenAI: up to k + 1 entries)
        tops.append(top)
    return {
        "tokens": pieces,
        "token_logprobs": [_lp(x) for x in c.logprobs],
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def _all_logprobs(state: ServerState, comps: list[P.Completion], chat: bool) -> list[dict]:
    """Blocking tokenizer work (runs on the tokenize pool)."""
    texts = TokenTexts(state.backend.tokenizer)
    fmt = chat_logprobs if chat else legacy_logprobs
    return [fmt(texts, c) for c in comps]


router = APIRouter()


@router.get(P.ROUTE_OAI_MODELS, dependencies=[GENERATION_AUTH])
async def models(state: State):
    return {
        "object": "list",
        "data": [{"id": model_name(state), "object": "model", "created": 0, "owned_by": "rollout_server"}],
    }


@router.post(P.ROUTE_OAI_COMPLETIONS, dependencies=[GENERATION_AUTH])
async def completions(state: State, req: Annotated[CompletionRequest, json_body(CompletionRequest)]):
    p = req.prompt
    if isinstance(p, str):
        native = _native(req, prompts=[p])
    elif p and all(isinstance(x, str) for x in p):
        native = _native(req, prompts=list(p))
    elif p and all(isinstance(x, int) for x in p):
        native = _native(req, token_ids=[list(p)])
    else:
        native = _native(req, token_ids=[list(x) for x in p])
    _check(state, req, native)
    ids = await prepare_prompts(state, native, field="prompt")
    want_logprobs = req.logprobs is not None
    if req.stream:
        events = _stream(state, native, ids, chat=False, usage=req.include_usage, logprobs=want_logprobs)
        return StreamingResponse(events, media_type="text/event-stream")
    res = await run_generation(state, native, ids)
    lps = await off_loop(state, _all_logprobs, state, res.completions, False) if want_logprobs else None
    choices = [
        {
            "index": i,
            "text": c.text,
            "finish_reason": c.finish_reason,
            "logprobs": lps[i] if lps is not None else None,
        }
        for i, c in enumerate(res.completions)
    ]
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
    _check(state, req, _native(req, token_ids=[[0]], default_max=256))
    refuse_if_unavailable(state)
    check_chat_size(state, req)
    prompt = await off_loop(state, chat_prompt_ids, state, req)
    native = _native(req, token_ids=[prompt], default_max=256)
    ids = await prepare_prompts(state, native)  # context, budget and vocabulary: a bad request is a 4xx here
    want_logprobs = bool(req.logprobs)
    if req.stream:
        events = _stream(state, native, ids, chat=True, usage=req.include_usage, logprobs=want_logprobs)
        return StreamingResponse(events, media_type="text/event-stream")
    res = await run_generation(state, native, ids)
    lps = await off_loop(state, _all_logprobs, state, res.completions, True) if want_logprobs else None
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": c.text},
            "finish_reason": c.finish_reason,
            "logprobs": lps[i] if lps is not None else None,
        }
        for i, c in enumerate(res.completions)
    ]
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_name(state),
        "choices": choices,
        "usage": _usage(res),
        "weight_version": res.weight_version,
    }


async def _stream(
    state: ServerState,
    native: P.GenerateRequest,
    ids: list[list[int]],
    chat: bool,
    usage: bool,
    logprobs: bool,
):
    """Tokens arrive from the generation thread through a queue; text deltas leave as SSE chunks.

    Choices are numbered like the rows of the result (prompt-major). A choice's last chunk carries its
    finish_reason and, when asked, the logprobs of all its tokens; with `usage`, every chunk has `usage: null`
    and a last chunk with no choices carries the counts (OpenAI's `stream_options.include_usage`).
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    tok = state.backend.tokenizer
    stops = native.stop
    hold = max((len(s) for s in stops), default=1) - 1  # chars held back: they may start a stop string
    route = P.ROUTE_OAI_CHAT if chat else P.ROUTE_OAI_COMPLETIONS
    cid = f"chatcmpl-{uuid.uuid4().hex}" if chat else f"cmpl-{uuid.uuid4().hex}"
    created, model = int(time.time()), model_name(state)

    def on_token(row: int, token: int, finished: bool) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, (row, token, finished))

    def event(choices: list[dict], counts: dict | None = None) -> str:
        body: dict[str, Any] = {
            "id": cid,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created,
            "model": model,
            "choices": choices,
        }
        if usage:
            body["usage"] = counts
        return f"data: {json.dumps(body)}\n\n"

    def choice(index: int, text: str | None, finish: str | None = None, lps: dict | None = None) -> dict:
        if chat:
            delta = {} if text is None else {"content": text}
            return {"index": index, "delta": delta, "logprobs": lps, "finish_reason": finish}
        return {"index": index, "text": text or "", "logprobs": lps, "finish_reason": finish}

    task = asyncio.create_task(run_generation(state, native, ids, on_token=on_token))
    task.add_done_callback(lambda _t: loop.call_soon_threadsafe(queue.put_nowait, None))
    rows: dict[int, list[int]] = {}
    sent: dict[int, int] = {}
    if chat:
        for i in range(native.num_prompts * native.n):
            yield event(
                [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ]
            )
    while True:
        item = await queue.get()
        if item is None:
            break
        row, token, finished = item
        rows.setdefault(row, []).append(token)
        text = P.cut_at_stop(tok.decode(rows[row], skip_special_tokens=True), stops)
        upto = len(text) if finished else max(0, len(text) - hold)
        if not finished and text.endswith("\ufffd"):
            upto = min(upto, len(text) - 1)  # an incomplete UTF-8 character: wait for its next byte
        if upto > sent.get(row, 0):
            yield event([choice(row, text[sent.get(row, 0) : upto])])
            sent[row] = upto
    try:
        res = task.result()
        lps = await off_loop(state, _all_logprobs, state, res.completions, chat) if logprobs else None
    except Exception as e:  # the status line is sent already: the error travels as one OpenAI-shaped event
        if isinstance(e, BadRequest):
            status, code, param = e.status, getattr(e, "code", None), getattr(e, "param", None)
        else:
            status, code, param = 500, None, None
            e = f"internal error: {type(e).__name__}: {e}"
        yield f"data: {json.dumps(error_body(route, status, str(e), code, param))}\n\n"
        yield "data: [DONE]\n\n"
        return
    for i, c in enumerate(res.completions):
        rest = c.text[sent.get(i, 0) :]
        if rest:
            yield event([choice(i, rest)])
        yield event([choice(i, None if chat else "", c.finish_reason, lps[i] if lps is not None else None)])
    if usage:
        yield event([], _usage(res))
    yield "data: [DONE]\n\n"
