"""What every route of the rollout server shares: the server state, auth as a dependency (checked before the
body is read), body parsing, request size limits, tokenisation off the event loop, the generation queue, the
two error shapes (native and OpenAI) and their exception handlers, and the ASGI gate (body limit, request
counting). The native routes (app.py) and the OpenAI routes (openai_api.py) both import this module; neither
imports the other, and app.py puts them together.

Routes (see protocol.py for the bodies): GET /health, POST /generate, POST /init_weight_transfer,
POST /update_weights, POST /close_weight_transfer, POST /pause, POST /resume, GET /metrics, and the OpenAI
routes of openai_api.py (GET /v1/models, POST /v1/completions, POST /v1/chat/completions). Routes read the
shared `ServerState` through the `rollout_state` dependency (`request.app.state.rollout`).

Concurrency: generation runs on ONE worker thread fed by a queue (the backend batches inside a request), so
concurrent clients are served in arrival order; tokenisation and chat templates run on a small pool of their
own, never on the event loop; weight updates run on another thread so generation keeps serving the old weights
while the new ones arrive, and only the final swap pauses it.

Security: with an API token, admin routes (weight transfer, pause/resume) need `Authorization: Bearer <t>`
(missing -> 401, wrong -> 403); generation routes, /v1/models and /metrics too with
`require_token_for_generation`. The token is checked by a dependency that runs BEFORE the body is read.

Size limits (each refusal is a 4xx naming the field and the limit, before any tokenisation): bodies larger than
`max_body_bytes` get 413; a text prompt (or a chat conversation) may have at most
`CHARS_PER_TOKEN x max_model_len` characters, all text prompts of a request together at most
`CHARS_PER_TOKEN x max_batch_tokens / n`; token-id prompts must fit the context; tokenisation stops at the
first prompt that overflows the context or the `max_batch_tokens` budget, so memory per request stays bounded.

Errors: native routes answer `{"error": "<what, naming the field>", "code": <str | null>}` (code: a
machine-readable reason such as "engine_dead", "paused", "prompt_too_long"); `/v1/*` routes answer OpenAI's shape
`{"error": {"message", "type", "param", "code"}}` (so the `openai` SDK shows the message). That includes 404,
405, 413, validation errors and internal errors. A dead backend (`Backend.dead_reason()`) makes /health say
`ready: false` with `error`, and every generation route answer 503.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from rollout_server import protocol as P
from rollout_server.backend import Backend, BadRequest
from rollout_server.metrics import Metrics
from rollout_server.weight_transfer import WeightTransferError

log = logging.getLogger("rollout_server")

# A generous upper bound on characters per token: a prompt with more characters than this times the context
# length cannot fit the context with any real tokenizer, so it is refused before it is tokenised.
CHARS_PER_TOKEN = 32
TOKENIZE_WORKERS = 2

KNOWN_ROUTES = frozenset(
    {
        P.ROUTE_HEALTH,
        P.ROUTE_GENERATE,
        P.ROUTE_INIT_WEIGHT_TRANSFER,
        P.ROUTE_UPDATE_WEIGHTS,
        P.ROUTE_CLOSE_WEIGHT_TRANSFER,
        P.ROUTE_PAUSE,
        P.ROUTE_RESUME,
        P.ROUTE_METRICS,
        P.ROUTE_OAI_MODELS,
        P.ROUTE_OAI_COMPLETIONS,
        P.ROUTE_OAI_CHAT,
    }
)


@dataclass
class ServerState:
    backend: Backend
    api_token: str | None = None
    require_token_for_generation: bool = False
    max_body_bytes: int = 64 << 20
    max_batch_tokens: int = 1 << 22
    max_prompt_chars: int | None = (
        None  # per text prompt / chat conversation; None: CHARS_PER_TOKEN x context
    )
    metrics: Metrics = field(default_factory=Metrics)
    executor: ThreadPoolExecutor | None = None
    tokenize_executor: ThreadPoolExecutor | None = None
    paused: bool = False

    def __post_init__(self) -> None:
        if self.executor is None:  # a queue + as many workers as the backend runs at once (torch: one)
            workers = max(1, self.backend.info.max_concurrency)
            self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="generate")
        if self.tokenize_executor is None:
            self.tokenize_executor = ThreadPoolExecutor(
                max_workers=TOKENIZE_WORKERS, thread_name_prefix="tokenize"
            )
        if self.max_prompt_chars is None:
            self.max_prompt_chars = CHARS_PER_TOKEN * self.backend.info.max_model_len

    def max_request_chars(self, n: int) -> int:
        """Characters of all text prompts of one request: more cannot fit `max_batch_tokens` at n samples."""
        return max(self.max_prompt_chars, CHARS_PER_TOKEN * self.max_batch_tokens // max(1, n))

    def limit_text(self) -> str:
        return f"{CHARS_PER_TOKEN} characters per token x max_model_len {self.backend.info.max_model_len}"


class HTTPError(BadRequest):
    """A refusal with an HTTP status, an optional machine-readable code and the offending parameter."""

    def __init__(self, message: str, status: int = 400, code: str | None = None, param: str | None = None):
        super().__init__(message, status=status)
        self.code, self.param = code, param


# ---- shared state and auth (dependencies) ------------------------------------------------------------------
def rollout_state(request: Request) -> ServerState:
    return request.app.state.rollout


State = Annotated[ServerState, Depends(rollout_state)]


def check_token(state: ServerState, authorization: str | None, admin: bool) -> None:
    if state.api_token is None or (not admin and not state.require_token_for_generation):
        return
    header = authorization or ""
    if not header.lower().startswith("bearer "):
        raise HTTPError(
            "authorization: missing 'Authorization: Bearer <token>' header", 401, code="missing_api_key"
        )
    if not hmac.compare_digest(header[7:].strip().encode(), state.api_token.encode()):
        raise HTTPError("authorization: invalid token", 403, code="invalid_api_key")


def require_token(admin: bool):
    """The auth dependency of every protected route. Route-level dependencies are solved before the body
    dependency (`json_body`), so an unauthenticated request is refused before its body is even read."""

    async def authorize(request: Request) -> None:
        check_token(rollout_state(request), request.headers.get("authorization"), admin)

    authorize.__name__ = "authorize_admin" if admin else "authorize_generation"
    return Depends(authorize)


ADMIN_AUTH = require_token(admin=True)
GENERATION_AUTH = require_token(admin=False)


def json_body(model: type[BaseModel]) -> Any:
    """A dependency that reads and validates the JSON body (after the auth dependency, never before)."""

    async def parse(request: Request):
        raw = await request.body()
        try:
            return model.model_validate_json(raw)
        except ValidationError as e:
            errors = [
                {**err, "loc": ("body", *err.get("loc", ()))}
                for err in e.errors(include_url=False, include_input=False, include_context=False)
            ]
            raise RequestValidationError(errors) from None

    parse.__name__ = f"{model.__name__}_body"
    return Depends(parse)


# ---- generation helpers (used by the OpenAI routes too) -----------------------------------------------------
def refuse_if_unavailable(state: ServerState) -> None:
    reason = state.backend.dead_reason()
    if reason is not None:
        raise HTTPError(
            f"backend: the generation engine is dead ({reason}); restart the server",
            503,
            code="engine_dead",
        )
    if state.paused:
        raise HTTPError("server is paused (weight update in progress); retry shortly", 503, code="paused")


def check_request_size(state: ServerState, req: P.GenerateRequest, field: str | None = None) -> None:
    """Cheap bounds (O(number of prompts)) checked on the event loop before any tokenisation."""
    ctx = state.backend.info.max_model_len
    if req.prompts is not None:
        name = field or "prompts"
        total = 0
        for i, p in enumerate(req.prompts):
            if len(p) > state.max_prompt_chars:
                raise HTTPError(
                    f"{name}[{i}]: {len(p)} characters exceed the limit of {state.max_prompt_chars} per prompt "
                    f"({state.limit_text()})",
                    code="prompt_too_long",
                    param=name,
                )
            total += len(p)
        limit = state.max_request_chars(req.n)
        if total > limit:
            raise HTTPError(
                f"{name}: {total} characters in total exceed the limit of {limit} per request "
                f"({CHARS_PER_TOKEN} characters per token x --max-batch-tokens {state.max_batch_tokens} / "
                f"n {req.n}); split it",
                code="request_too_large",
                param=name,
            )
    else:
        name = field or "prompt_token_ids"
        for i, p in enumerate(req.prompt_token_ids):
            if len(p) + req.max_tokens > ctx:
                raise HTTPError(
                    f"max_tokens: prompt {i} has {len(p)} tokens; + max_tokens {req.max_tokens} exceeds the "
                    f"context length {ctx}",
                    code="context_length_exceeded",
                    param="max_tokens",
                )
        budget = sum(len(p) + req.max_tokens for p in req.prompt_token_ids) * req.n
        if budget > state.max_batch_tokens:
            raise _budget_error(state, budget, exact=True)


def _budget_error(state: ServerState, budget: int, exact: bool) -> HTTPError:
    needs = f"up to {budget}" if exact else f"more than {budget}"
    return HTTPError(
        f"n: this request needs {needs} tokens (prompts x n + max_tokens x n), above the server's "
        f"--max-batch-tokens {state.max_batch_tokens}; split it",
        code="request_too_large",
        param="n",
    )


def tokenize_prompts(state: ServerState, req: P.GenerateRequest) -> list[list[int]]:
    """Token ids of every prompt, checked against the context length, the batch budget and the vocabulary.

    Blocking: runs on the tokenize pool. Stops at the first prompt that overflows, so a refused request never
    holds more than `max_batch_tokens` token ids plus one prompt's tokenisation.
    """
    backend = state.backend
    tok = backend.tokenizer
    ctx = backend.info.max_model_len
    used = 0

    def admit(i: int, p: list[int]) -> None:
        nonlocal used
        if len(p) + req.max_tokens > ctx:
            raise HTTPError(
                f"max_tokens: prompt {i} has {len(p)} tokens; + max_tokens {req.max_tokens} exceeds the "
                f"context length {ctx}",
                code="context_length_exceeded",
                param="max_tokens",
            )
        used += (len(p) + req.max_tokens) * req.n
        if used > state.max_batch_tokens:
            last = i + 1 == req.num_prompts
            raise _budget_error(state, used, exact=last)

    if req.prompts is not None:
        ids = []
        for i, text in enumerate(req.prompts):
            p = tok(text, add_special_tokens=False)["input_ids"]
            if not p:
                raise HTTPError(f"prompts[{i}]: empty after tokenization", param="prompts")
            admit(i, p)
            ids.append(p)
        return ids
    ids = req.prompt_token_ids
    for i, p in enumerate(ids):
        admit(i, p)
    vocab = getattr(backend, "vocab_size", None) or len(tok)
    for i, p in enumerate(ids):
        bad = [t for t in p if t < 0 or t >= vocab]
        if bad:
            raise HTTPError(
                f"prompt_token_ids[{i}]: token id {bad[0]} outside the vocabulary [0, {vocab})",
                param="prompt_token_ids",
            )
    return ids


async def off_loop(state: ServerState, fn: Callable[..., Any], *args: Any) -> Any:
    """Run blocking tokenizer work (tokenisation, chat templates) on the tokenize pool."""
    return await asyncio.get_running_loop().run_in_executor(state.tokenize_executor, fn, *args)


async def prepare_prompts(
    state: ServerState, req: P.GenerateRequest, field: str | None = None
) -> list[list[int]]:
    """Every check of a generation request, then its token ids (tokenised off the event loop)."""
    refuse_if_unavailable(state)
    check_request_size(state, req, field)
    return await off_loop(state, tokenize_prompts, state, req)


async def run_generation(
    state: ServerState,
    req: P.GenerateRequest,
    ids: list[list[int]] | None = None,
    on_token: Callable[[int, int, bool], None] | None = None,
) -> P.GenerateResponse:
    if ids is None:
        ids = await prepare_prompts(state, req)
    refuse_if_unavailable(state)  # again: tokenisation took time
    state.metrics.queue(+1)
    t0 = time.monotonic()
    try:
        loop = asyncio.get_running_loop()
        args = (req, ids) if on_token is None else (req, ids, on_token)
        comps = await loop.run_in_executor(state.executor, state.backend.generate, *args)
    except BadRequest:
        raise
    except Exception as e:
        reason = state.backend.dead_reason()
        if reason is None:
            raise
        raise HTTPError(
            f"backend: generation failed because the engine is dead ({reason}); restart the server",
            503,
            code="engine_dead",
        ) from e
    finally:
        state.metrics.queue(-1)
    n_tokens = sum(len(c.token_ids) for c in comps)
    n_prompt = sum(len(p) for p in ids)
    state.metrics.generation(time.monotonic() - t0, n_prompt, n_tokens, len(comps))
    return P.GenerateResponse(
        completions=comps,
        weight_version=comps[0].weight_version if comps else state.backend.weight_version,
        model=state.backend.info.model,
        prompt_tokens=n_prompt,
        completion_tokens=n_tokens,
    )


# ---- one error shape ----------------------------------------------------------------------------------------
OPENAI_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}
_PARAM = re.compile(r"^([A-Za-z_][\w.\[\]]*): ")


def is_openai_path(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def error_body(
    path: str, status: int, message: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """Native routes: {"error": message, "code": code}. /v1/*: OpenAI's {"error": {message, type, param, code}}."""
    if not is_openai_path(path):
        return {"error": message, "code": code}
    if param is None:
        m = _PARAM.match(message)
        param = m.group(1) if m and m.group(1) not in ("body", "authorization", "backend", "route") else None
    kind = OPENAI_ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(
    path: str,
    status: int,
    message: str,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(path, status, message, code, param), status_code=status, headers=headers)


def _validation_parts(errors: list[dict]) -> tuple[str, str | None]:
    parts, first = [], None
    for err in errors[:8]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        msg = err.get("msg", "invalid")
        if err.get("type") == "extra_forbidden":
            msg = "unknown field"
        elif err.get("type") == "value_error":
            msg = msg.removeprefix("Value error, ")  # our validators' messages name their field already
        if not loc and (m := _PARAM.match(msg)):
            loc, msg = m.group(1), msg[m.end() :]
        first = first or (loc.split(".")[0] if loc else None)  # the top-level field (not a union branch)
        parts.append(f"{loc or 'body'}: {msg}")
    return "; ".join(parts), first


def validation_message(exc: ValidationError | RequestValidationError) -> str:
    """One line naming each bad field, e.g. `n: Input should be less than or equal to 256` (no pydantic dump)."""
    if isinstance(exc, ValidationError):
        errors = exc.errors(include_url=False, include_input=False, include_context=False)
    else:
        errors = list(exc.errors())
    return _validation_parts(errors)[0]


async def _on_bad_request(request: Request, exc: BadRequest):
    code, param = getattr(exc, "code", None), getattr(exc, "param", None)
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return error_response(request.url.path, exc.status, str(exc), code, param, headers)


async def _on_invalid(request: Request, exc: RequestValidationError):
    message, param = _validation_parts(list(exc.errors()))
    return error_response(request.url.path, 422, message, "invalid_value", param)


async def _on_http(request: Request, exc: StarletteHTTPException):
    if exc.status_code == 404:
        message = f"route: no route {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"route: method {request.method} not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    return error_response(request.url.path, exc.status_code, message, headers=getattr(exc, "headers", None))


async def _on_transfer(request: Request, exc: WeightTransferError):
    return error_response(request.url.path, 500, f"weight transfer: {exc}")


async def _on_unexpected(
    request: Request, exc: Exception
):  # a bug answers with its message, the server lives on
    log.exception("unhandled error")
    return error_response(request.url.path, 500, f"internal error: {type(exc).__name__}: {exc}")


class Gate:
    """ASGI middleware: 413 for bodies over the limit (by Content-Length, or counted while streaming), and the
    request counter of /metrics (every answer, 413 and 500 included; unknown paths share one label)."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        status = 500  # an exception that escapes the app becomes a 500 outside this middleware
        limit = self.state.max_body_bytes

        async def counted_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            length = dict(scope.get("headers") or []).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > limit:
                msg = f"body: {int(length)} bytes exceed the limit of {limit} (--max-body-bytes)"
                response = error_response(path, 413, msg, code="body_too_large")
                return await response(scope, receive, counted_send)
            seen = 0

            async def limited_receive():
                nonlocal seen
                msg = await receive()
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise HTTPError(
                        f"body: more than {limit} bytes (--max-body-bytes)", 413, code="body_too_large"
                    )
                return msg

            return await self.app(scope, limited_receive, counted_send)
        finally:
            self.state.metrics.count_request(path if path in KNOWN_ROUTES else "unmatched", status)


# ---- native routes ------------------------------------------------------------------------------------------


def install_error_handling(app: FastAPI, state: ServerState) -> None:
    """Both error shapes (native and OpenAI, by path) for every kind of failure, and the gate (body limit,
    request counting) in front of the app."""
    app.add_exception_handler(BadRequest, _on_bad_request)
    app.add_exception_handler(RequestValidationError, _on_invalid)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(WeightTransferError, _on_transfer)
    app.add_exception_handler(Exception, _on_unexpected)
    app.add_middleware(Gate, state=state)
