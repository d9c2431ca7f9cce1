"""HTTP routes over a generation backend (FastAPI). Flat on purpose: one function per route.

Routes (see protocol.py for the bodies): GET /health, POST /generate, POST /init_weight_transfer,
POST /update_weights, POST /close_weight_transfer, POST /pause, POST /resume, GET /metrics, and the OpenAI
routes of openai_api.py (GET /v1/models, POST /v1/completions, POST /v1/chat/completions).

Concurrency: generation runs on ONE worker thread fed by a queue (the backend batches inside a request), so
concurrent clients are served in arrival order; weight updates run on another thread so generation keeps
serving the old weights while the new ones arrive, and only the final swap pauses it.

Security: with an API token, admin routes (weight transfer, pause/resume) need `Authorization: Bearer <t>`
(missing -> 401, wrong -> 403); generation routes too with `require_token_for_generation`. Bodies larger
than `max_body_bytes` get 413. Every error body is `{"error": "<what, naming the field>"}`.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse

from rollout_server import protocol as P
from rollout_server.backend import Backend, BadRequest
from rollout_server.metrics import Metrics
from rollout_server.weight_transfer import WeightTransferError

log = logging.getLogger("rollout_server")


@dataclass
class ServerState:
    backend: Backend
    api_token: str | None = None
    require_token_for_generation: bool = False
    max_body_bytes: int = 64 << 20
    max_batch_tokens: int = 1 << 22
    metrics: Metrics = field(default_factory=Metrics)
    executor: ThreadPoolExecutor | None = None
    paused: bool = False

    def __post_init__(self) -> None:
        if self.executor is None:  # a queue + as many workers as the backend runs at once (torch: one)
            workers = max(1, self.backend.info.max_concurrency)
            self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="generate")


# ---- helpers used by the OpenAI routes too ------------------------------------------------------------------
def check_token(state: ServerState, request: Request, admin: bool) -> None:
    if state.api_token is None or (not admin and not state.require_token_for_generation):
        return
    header = request.headers.get("authorization", "")
    if not header.lower().startswith("bearer "):
        raise BadRequest("authorization: missing 'Authorization: Bearer <token>' header", status=401)
    if not hmac.compare_digest(header[7:].strip().encode(), state.api_token.encode()):
        raise BadRequest("authorization: invalid token", status=403)


def tokenize_prompts(state: ServerState, req: P.GenerateRequest) -> list[list[int]]:
    """Token ids of every prompt, checked against the vocabulary and the context length."""
    backend = state.backend
    tok = backend.tokenizer
    if req.prompts is not None:
        ids = [tok(p, add_special_tokens=False)["input_ids"] for p in req.prompts]
        for i, p in enumerate(ids):
            if not p:
                raise BadRequest(f"prompts[{i}]: empty after tokenization")
    else:
        ids = req.prompt_token_ids
        vocab = getattr(backend, "vocab_size", None) or len(tok)
        for i, p in enumerate(ids):
            bad = [t for t in p if t < 0 or t >= vocab]
            if bad:
                raise BadRequest(
                    f"prompt_token_ids[{i}]: token id {bad[0]} outside the vocabulary [0, {vocab})"
                )
    ctx = backend.info.max_model_len
    for i, p in enumerate(ids):
        if len(p) + req.max_tokens > ctx:
            raise BadRequest(
                f"max_tokens: prompt {i} has {len(p)} tokens; + max_tokens {req.max_tokens} exceeds the "
                f"context length {ctx}"
            )
    budget = sum(len(p) for p in ids) * req.n + len(ids) * req.n * req.max_tokens
    if budget > state.max_batch_tokens:
        raise BadRequest(
            f"n: this request needs up to {budget} tokens (prompts x n + max_tokens x n), above the "
            f"server's --max-batch-tokens {state.max_batch_tokens}; split it"
        )
    return ids


async def run_generation(
    state: ServerState, req: P.GenerateRequest, on_token: Callable[[int, int, bool], None] | None = None
) -> P.GenerateResponse:
    if state.paused:
        raise BadRequest("server is paused (weight update in progress); retry shortly", status=503)
    ids = tokenize_prompts(state, req)
    state.metrics.queue(+1)
    t0 = time.monotonic()
    try:
        loop = asyncio.get_running_loop()
        if on_token is None:
            comps = await loop.run_in_executor(state.executor, state.backend.generate, req, ids)
        else:
            comps = await loop.run_in_executor(state.executor, state.backend.generate, req, ids, on_token)
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


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _format_validation(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:8]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
        msg = err.get("msg", "invalid")
        if err.get("type") == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


class BodyLimit:
    """ASGI middleware: 413 for bodies over the limit (by Content-Length, or counted while streaming)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _error(413, f"body: {int(length)} bytes exceed the limit of {self.limit}")(
                scope, receive, send
            )
        seen = 0

        async def limited_receive():
            nonlocal seen
            msg = await receive()
            seen += len(msg.get("body", b""))
            if seen > self.limit:
                raise BadRequest(f"body: more than {self.limit} bytes", status=413)
            return msg

        return await self.app(scope, limited_receive, send)


# ---- the app ------------------------------------------------------------------------------------------------
def create_app(state: ServerState) -> FastAPI:
    from rollout_server.openai_api import register_openai_routes

    app = FastAPI(title="rollout_server", version="1", docs_url=None, redoc_url=None)
    app.state.rollout = state

    @app.exception_handler(BadRequest)
    async def _bad_request(_req: Request, exc: BadRequest):
        return _error(exc.status, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, exc: RequestValidationError):
        return _error(422, _format_validation(exc))

    @app.exception_handler(WeightTransferError)
    async def _transfer(_req: Request, exc: WeightTransferError):
        return _error(500, f"weight transfer: {exc}")

    @app.exception_handler(Exception)
    async def _unexpected(
        _req: Request, exc: Exception
    ):  # a bug answers with its message, the server lives on
        log.exception("unhandled error")
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    @app.middleware("http")
    async def _count(request: Request, call_next):
        response = await call_next(request)
        state.metrics.count_request(request.url.path, response.status_code)
        return response

    @app.get(P.ROUTE_HEALTH, response_model=P.HealthResponse)
    async def health() -> P.HealthResponse:
        b = state.backend
        return P.HealthResponse(
            model=b.info.model,
            backend=b.info.backend,
            weight_version=b.weight_version,
            ready=not state.paused,
            max_model_len=b.info.max_model_len,
            weight_transfer=b.has_weight_transfer,
            weight_transfer_ranks=b.info.transfer_ranks,
            weight_transfer_wire=b.info.transfer_wire,
            weight_transfer_bucket_bytes=b.info.required_bucket_bytes,
        )

    @app.post(P.ROUTE_GENERATE, response_model=P.GenerateResponse)
    async def generate(req: P.GenerateRequest, request: Request) -> P.GenerateResponse:
        check_token(state, request, admin=False)
        return await run_generation(state, req)

    @app.post(P.ROUTE_INIT_WEIGHT_TRANSFER, response_model=P.InitWeightTransferResponse)
    async def init_weight_transfer(req: P.InitWeightTransferRequest, request: Request):
        check_token(state, request, admin=True)
        return await asyncio.to_thread(state.backend.init_weight_transfer, req)

    @app.post(P.ROUTE_UPDATE_WEIGHTS, response_model=P.UpdateWeightsResponse)
    async def update_weights(req: P.UpdateWeightsRequest, request: Request):
        check_token(state, request, admin=True)
        t0 = time.monotonic()
        try:
            res = await asyncio.to_thread(state.backend.update_weights, req)
        except WeightTransferError:
            state.metrics.weight_sync(time.monotonic() - t0, 0, ok=False)
            raise
        except BadRequest:
            raise
        except Exception as e:  # a bug must still answer with a message (and the old weights keep serving)
            log.exception("weight update failed")
            state.metrics.weight_sync(time.monotonic() - t0, 0, ok=False)
            raise WeightTransferError(f"unexpected {type(e).__name__}: {e}") from e
        state.metrics.weight_sync(time.monotonic() - t0, res.bytes, ok=True)
        log.info(
            "weights updated to version %d (%d bytes, %.3fs)", res.version, res.bytes, time.monotonic() - t0
        )
        return res

    @app.post(P.ROUTE_CLOSE_WEIGHT_TRANSFER)
    async def close_weight_transfer(request: Request):
        check_token(state, request, admin=True)
        await asyncio.to_thread(state.backend.close_weight_transfer)
        return {"closed": True}

    @app.post(P.ROUTE_PAUSE)
    async def pause(request: Request):
        check_token(state, request, admin=True)
        state.paused = True
        state.backend.pause()
        return {"paused": True}

    @app.post(P.ROUTE_RESUME)
    async def resume(request: Request):
        check_token(state, request, admin=True)
        state.paused = False
        state.backend.resume()
        return {"paused": False}

    @app.get(P.ROUTE_METRICS, response_class=PlainTextResponse)
    async def metrics() -> str:
        return state.metrics.render(state.backend.weight_version)

    register_openai_routes(app, state)
    return app


def build_asgi(state: ServerState):
    """The app wrapped in the body-size limit (the object uvicorn serves)."""
    return BodyLimit(create_app(state), state.max_body_bytes)
