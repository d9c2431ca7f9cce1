"""Web UI: chat with one or two rollout servers side by side, and watch a run folder live.

    python -m launch.ui [--host 127.0.0.1] [--port 7860] [--server-url URL [--server-url URL2]] [--run-dir runs/NAME]

Two pages, plain HTML/CSS/JS in launch/ui_static/ (no build step, nothing loaded from the internet):
- Chat (``/``): a question goes to each selected rollout server's OpenAI-compatible
  ``/v1/chat/completions`` with ``stream: true``, proxied through this app (so the page never needs CORS on
  the servers and a dead server becomes a visible error, not a hung page). The format's system prompt
  (the same text the trainer uses, from trainer/data.py) is sent first; the page shows the reasoning
  dimmed and collapsible and the answer bold.
- Run (``/run.html``): polls the run folder's metrics.jsonl / completions.jsonl every few seconds (works
  while the trainer writes them and after), draws the curves as inline SVG and browses the sampled
  completions of a step, filterable by correct / incorrect.

It binds to loopback by default: it reads local run folders and forwards requests to whatever server URL a
page gives it, so exposing it beyond the machine is the operator's explicit choice (``--host 0.0.0.0``).

Run folders are read incrementally: only the bytes appended since the last poll, and a torn last line (the
trainer mid-write) waits for the next poll. Correctness of a logged completion comes from the trainer's
``correctness`` reward when logged, else from our STRICT scorer against its gold answer.
"""

from __future__ import annotations

import argparse
import json
import math
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from launch.progress import JsonlTail

STATIC_DIR = Path(__file__).with_name("ui_static")
METRICS_FILE = "metrics.jsonl"
COMPLETIONS_FILE = "completions.jsonl"


# ---- settings and request bodies ----------------------------------------------------------------------------
class UISettings(BaseModel):
    """What the command line gives the app."""

    server_urls: list[str] = Field(
        default_factory=list, max_length=2, description="Rollout servers preselected."
    )
    run_dir: str | None = Field(None, description="Run folder preselected on the Run page.")
    connect_timeout_s: float = Field(5.0, gt=0, le=120, description="Timeout to reach a rollout server.")
    read_timeout_s: float = Field(
        300.0, gt=0, le=3600, description="Longest silence while streaming an answer."
    )
    poll_interval_s: float = Field(
        3.0, ge=0.5, le=120, description="How often the Run page polls the folder."
    )


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"] = Field(..., description="Chat role.")
    content: str = Field(..., max_length=100_000, description="Message text.")


class ChatBody(BaseModel):
    """``POST /api/chat``: one streamed answer from one rollout server."""

    server_url: str = Field(..., min_length=1, max_length=2000, description="Base URL of the rollout server.")
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=200, description="The conversation.")
    max_tokens: int = Field(512, ge=1, le=32768, description="Completion token cap.")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    model: str | None = Field(
        None, max_length=2000, description="Model name sent upstream (None = the server's)."
    )


# ---- run folder reading ---------------------------------------------------------------------------------------
def _finite(v: Any) -> float | None:
    """A plottable value: a finite int/float (bools and the logger's "nan"/"inf" strings are not)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def completion_is_correct(row: dict[str, Any]) -> bool | None:
    """Correctness of one logged completion; None when it cannot be told (no reward, no gold)."""
    if isinstance(row.get("correct"), bool):
        return row["correct"]
    rewards = row.get("rewards")
    if isinstance(rewards, dict) and _finite(rewards.get("correctness")) is not None:
        return _finite(rewards["correctness"]) > 0  # the trainer's rule (trainer/browse.py)
    text, gold = row.get("completion"), row.get("gold")
    if isinstance(text, str) and gold is not None:
        from trainer.eval_scoring import score_completion

        return score_completion(text, str(gold)).strict
    return None


class RunReader:
    """metrics.jsonl + completions.jsonl of one run folder, refreshed on demand."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.metrics = JsonlTail(self.run_dir / METRICS_FILE)
        self.completions = JsonlTail(self.run_dir / COMPLETIONS_FILE)
        self._by_step: dict[int, list[dict[str, Any]]] = {}
        self._seen = 0
        self._lock = threading.Lock()

    def refresh(self) -> None:
        with self._lock:
            self.metrics.refresh()
            self.completions.refresh()
            if len(self.completions.rows) < self._seen:  # the file was reset
                self._by_step, self._seen = {}, 0
            for row in self.completions.rows[self._seen :]:
                step = row.get("step")
                step = int(step) if _finite(step) is not None else -1
                item = dict(row)
                item["correct"] = completion_is_correct(row)
                self._by_step.setdefault(step, []).append(item)
            self._seen = len(self.completions.rows)

    def summary(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "has_metrics": self.metrics.path.is_file(),
            "has_completions": self.completions.path.is_file(),
            "num_metric_rows": len(self.metrics.rows),
            "last_step": self.metrics.rows[-1].get("step") if self.metrics.rows else None,
            "completion_steps": [{"step": s, "count": len(self._by_step[s])} for s in sorted(self._by_step)],
            "bad_lines": self.metrics.bad_lines + self.completions.bad_lines,
        }

    def metric_rows(self, since: int = 0) -> list[dict[str, float | None]]:
        """Metric rows from index ``since`` on: numeric fields only, non-finite values as null."""
        return [
            {k: _finite(v) for k, v in row.items() if v is None or isinstance(v, (int, float, str))}
            for row in self.metrics.rows[max(0, since) :]
        ]

    def completion_rows(self, step: int | None, which: str, limit: int, offset: int) -> dict[str, Any]:
        """Completions of one step (the latest when None), filtered: all | correct | incorrect."""
        if step is None and self._by_step:
            step = max(self._by_step)
        rows = self._by_step.get(step, []) if step is not None else []
        counts = {
            "all": len(rows),
            "correct": sum(r["correct"] is True for r in rows),
            "incorrect": sum(r["correct"] is False for r in rows),
        }
        if which != "all":
            rows = [r for r in rows if r["correct"] is (which == "correct")]
        return {"step": step, "counts": counts, "total": len(rows), "rows": rows[offset : offset + limit]}


# ---- the app --------------------------------------------------------------------------------------------------
def system_prompts() -> dict[str, str]:
    """The format system prompts by name, the same text the trainer puts in its prompts."""
    from trainer import data

    return dict(data.SYSTEM_PROMPTS)


def create_app(settings: UISettings | None = None):
    """The FastAPI app (import-light: FastAPI and httpx are imported here, not at module import)."""
    import httpx
    from fastapi import FastAPI, HTTPException, Query
    from fastapi.responses import JSONResponse, RedirectResponse, StreamingResponse
    from fastapi.staticfiles import StaticFiles

    settings = settings or UISettings()
    app = FastAPI(title="GRPO UI", docs_url=None, redoc_url=None)
    readers: dict[str, RunReader] = {}
    readers_lock = threading.Lock()
    timeout = httpx.Timeout(settings.read_timeout_s, connect=settings.connect_timeout_s)

    def reader_for(run_dir: str) -> RunReader:
        path = Path(run_dir).expanduser()
        if not path.is_dir():
            raise HTTPException(404, f"run folder not found: {path}")
        key = str(path.resolve())
        with readers_lock:
            if key not in readers:
                readers[key] = RunReader(path)
            r = readers[key]
        r.refresh()
        if not (r.metrics.path.is_file() or r.completions.path.is_file()):
            raise HTTPException(404, f"{path} has neither {METRICS_FILE} nor {COMPLETIONS_FILE} (yet)")
        return r

    def check_url(url: str) -> str:
        url = url.strip().rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise HTTPException(400, f"server URL must start with http:// or https://, got {url!r}")
        return url

    @app.exception_handler(HTTPException)
    async def _errors(_request, exc: HTTPException):  # one error shape for the pages: {"error": "..."}
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.get("/", include_in_schema=False)
    def index():
        return RedirectResponse("/chat.html")

    @app.get("/api/config")
    def config() -> dict[str, Any]:
        return {
            "server_urls": settings.server_urls,
            "run_dir": settings.run_dir,
            "poll_interval_s": settings.poll_interval_s,
            "system_prompts": system_prompts(),
        }

    @app.get("/api/models")
    async def models(server_url: str = Query(..., max_length=2000)) -> dict[str, Any]:
        """The server's model name (from /v1/models) and health, or a readable error."""
        url = check_url(server_url)
        try:
            async with httpx.AsyncClient(timeout=httpx.Timeout(settings.connect_timeout_s * 2)) as client:
                r = await client.get(url + "/v1/models")
                r.raise_for_status()
                data = r.json().get("data") or []
        except (httpx.HTTPError, ValueError) as e:
            raise HTTPException(502, f"cannot reach {url}: {type(e).__name__}: {e}") from None
        return {"server_url": url, "models": [m.get("id") for m in data if isinstance(m, dict)]}

    @app.post("/api/chat")
    async def chat(body: ChatBody):
        """Stream the upstream server-sent events through; failures become one ``{"error"}`` event."""
        url = check_url(body.server_url)
        payload = {
            "messages": [m.model_dump() for m in body.messages],
            "max_tokens": body.max_tokens,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "stream": True,
        }
        if body.model:
            payload["model"] = body.model

        async def events() -> AsyncIterator[bytes]:
            try:
                async with httpx.AsyncClient(timeout=timeout) as client:
                    async with client.stream("POST", url + "/v1/chat/completions", json=payload) as r:
                        if r.status_code != 200:
                            detail = (await r.aread()).decode("utf-8", "replace")[:500]
                            raise RuntimeError(f"{url} answered HTTP {r.status_code}: {detail}")
                        async for chunk in r.aiter_raw():
                            yield chunk
            except Exception as e:  # any failure must reach the page as text, never as a hung stream
                msg = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                yield f"data: {json.dumps({'error': f'{url}: {msg}'})}\n\n".encode()

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    @app.get("/api/run")
    def run_summary(run_dir: str = Query(..., max_length=4000)) -> dict[str, Any]:
        return reader_for(run_dir).summary()

    @app.get("/api/run/metrics")
    def run_metrics(
        run_dir: str = Query(..., max_length=4000), since: int = Query(0, ge=0)
    ) -> dict[str, Any]:
        r = reader_for(run_dir)
        return {"since": since, "total": len(r.metrics.rows), "rows": r.metric_rows(since)}

    @app.get("/api/run/completions")
    def run_completions(
        run_dir: str = Query(..., max_length=4000),
        step: int | None = Query(None),
        filter: Literal["all", "correct", "incorrect"] = Query("all"),
        limit: int = Query(50, ge=1, le=1000),
        offset: int = Query(0, ge=0),
    ) -> dict[str, Any]:
        return reader_for(run_dir).completion_rows(step, filter, limit, offset)

    app.mount("/", StaticFiles(directory=STATIC_DIR, html=True), name="static")
    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description="Chat with rollout servers and watch a run folder in the browser."
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--server-url", action="append", default=[], help="rollout server URL (give up to two)")
    p.add_argument("--run-dir", default=None, help="run folder shown on the Run page")
    p.add_argument("--poll-interval", type=float, default=3.0, help="seconds between Run page refreshes")
    a = p.parse_args(argv)
    if len(a.server_url) > 2:
        p.error("give at most two --server-url")
    settings = UISettings(server_urls=a.server_url, run_dir=a.run_dir, poll_interval_s=a.poll_interval)

    import uvicorn

    print(f"[ui] http://{a.host}:{a.port}/  (Chat)   http://{a.host}:{a.port}/run.html  (Run)", flush=True)
    uvicorn.run(create_app(settings), host=a.host, port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
