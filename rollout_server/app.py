"""HTTP routes over a generation backend (FastAPI). Flat on purpose: one module-level function per route.

Routes (see protocol.py for the bodies): GET /health, POST /generate, POST /init_weight_transfer,
POST /update_weights, POST /close_weight_transfer, POST /pause, POST /resume, GET /metrics here, and the OpenAI
routes of openai_api.py (GET /v1/models, POST /v1/completions, POST /v1/chat/completions). What both share
(state, auth, limits, errors) lives in server_core.py; `create_app` puts the two routers together.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Annotated

from fastapi import APIRouter, FastAPI
from fastapi.responses import PlainTextResponse

from rollout_server import protocol as P
from rollout_server.backend import BadRequest
from rollout_server.openai_api import router as openai_router
from rollout_server.server_core import (
    ADMIN_AUTH,
    GENERATION_AUTH,
    ServerState,
    State,
    install_error_handling,
    json_body,
    run_generation,
)
from rollout_server.weight_transfer import WeightTransferError

log = logging.getLogger("rollout_server")

router = APIRouter()


@router.get(P.ROUTE_HEALTH, response_model=P.HealthResponse)
async def health(state: State) -> P.HealthResponse:
    b = state.backend
    reason = b.dead_reason()
    return P.HealthResponse(
        model=b.info.model,
        backend=b.info.backend,
        weight_version=b.weight_version,
        ready=not state.paused and reason is None,
        max_model_len=b.info.max_model_len,
        weight_transfer=b.has_weight_transfer,
        weight_transfer_ranks=b.info.transfer_ranks,
        weight_transfer_wire=b.info.transfer_wire,
        weight_transfer_bucket_bytes=b.info.required_bucket_bytes,
        error=reason,
    )


@router.post(P.ROUTE_GENERATE, response_model=P.GenerateResponse, dependencies=[GENERATION_AUTH])
async def generate(
    state: State, req: Annotated[P.GenerateRequest, json_body(P.GenerateRequest)]
) -> P.GenerateResponse:
    return await run_generation(state, req)


@router.post(
    P.ROUTE_INIT_WEIGHT_TRANSFER, response_model=P.InitWeightTransferResponse, dependencies=[ADMIN_AUTH]
)
async def init_weight_transfer(
    state: State, req: Annotated[P.InitWeightTransferRequest, json_body(P.InitWeightTransferRequest)]
):
    return await asyncio.to_thread(state.backend.init_weight_transfer, req)


@router.post(P.ROUTE_UPDATE_WEIGHTS, response_model=P.UpdateWeightsResponse, dependencies=[ADMIN_AUTH])
async def update_weights(
    state: State, req: Annotated[P.UpdateWeightsRequest, json_body(P.UpdateWeightsRequest)]
):
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
    log.info("weights updated to version %d (%d bytes, %.3fs)", res.version, res.bytes, time.monotonic() - t0)
    return res


@router.post(P.ROUTE_CLOSE_WEIGHT_TRANSFER, dependencies=[ADMIN_AUTH])
async def close_weight_transfer(state: State):
    await asyncio.to_thread(state.backend.close_weight_transfer)
    return {"closed": True}


@router.post(P.ROUTE_PAUSE, dependencies=[ADMIN_AUTH])
async def pause(state: State):
    state.paused = True
    state.backend.pause()
    return {"paused": True}


@router.post(P.ROUTE_RESUME, dependencies=[ADMIN_AUTH])
async def resume(state: State):
    state.paused = False
    state.backend.resume()
    return {"paused": False}


@router.get(P.ROUTE_METRICS, response_class=PlainTextResponse, dependencies=[GENERATION_AUTH])
async def metrics(state: State) -> str:
    return state.metrics.render(
        state.backend.weight_version, backend_dead=state.backend.dead_reason() is not None
    )


# ---- the app ------------------------------------------------------------------------------------------------
def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="rollout_server", version="1", docs_url=None, redoc_url=None)
    app.state.rollout = state
    install_error_handling(app, state)
    app.include_router(router)
    app.include_router(openai_router)
    return app


def build_asgi(state: ServerState):
    """The object uvicorn serves (the body limit and request counting are part of the app itself)."""
    return create_app(state)
