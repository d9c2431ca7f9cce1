"""Hardening of the rollout server's HTTP surface: size limits checked before tokenising (and tokenising off the
event loop, so /health keeps answering), auth before the body, one error shape (OpenAI's on /v1/*, read by the
official `openai` SDK) and engine-death reporting.

Real `python -m rollout_server` processes with the torch backend on the tiny model (the helpers of
test_rollout_server.py); only the engine-death case runs in-process (FastAPI's TestClient over a subclass of the
real TorchBackend whose `dead_reason()` we control), because a torch backend cannot die on its own.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import psutil
import pytest

from tests.test_rollout_server import ADMIN, TOKEN, start_server, stop

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

CTX = 2048  # the tiny model's context: the per-prompt limit is 32 x 2048 = 65536 characters
ADMIN_ROUTES = ["/init_weight_transfer", "/update_weights", "/close_weight_transfer", "/pause", "/resume"]


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    """Default body limit (64 MiB); a 1M-token batch budget so the budget refusal below comes quickly."""
    proc, url, _ = start_server(tiny_model_dir, "--api-token", TOKEN, "--max-batch-tokens", "1000000")
    yield url, proc.pid
    stop(proc)


@pytest.fixture(scope="module")
def url(server):
    return server[0]


def oai(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


class Watch:
    """Runs `fn` in a thread while polling /health (latency) and sampling the server's RSS."""

    def __init__(self, url: str, pid: int):
        self.url, self.proc = url, psutil.Process(pid)
        self.health_s: list[float] = []
        self.rss: list[int] = []

    def run(self, fn):
        out: dict = {}

        def call():
            try:
                out["result"] = fn()
            except Exception as e:  # re-raised below
                out["error"] = e

        t0 = time.monotonic()
        worker = threading.Thread(target=call)
        worker.start()
        with httpx.Client(timeout=10) as c:
            while worker.is_alive():
                s = time.monotonic()
                assert c.get(self.url + "/health").status_code == 200
                self.health_s.append(time.monotonic() - s)
                self.rss.append(self.proc.memory_info().rss)
                time.sleep(0.05)
        worker.join()
        self.elapsed = time.monotonic() - t0
        if "error" in out:
            raise out["error"]
        return out["result"]


def post_raw(url: str, route: str, body: dict) -> httpx.Response:
    data = json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    return httpx.post(url + route, content=data, headers=headers, timeout=120)


# ---- 1. one request must not stall the server ---------------------------------------------------------------
@pytest.mark.faults
def test_huge_requests_refused_before_tokenising_while_health_answers(server, fault_report):
    url, pid = server
    proc = psutil.Process(pid)
    baseline = proc.memory_info().rss
    huge_prompt = {"prompts": ["hello world 123 " * 3_125_000], "max_tokens": 8}  # 50M characters, one prompt
    huge_chat = {"messages": [{"role": "user", "content": "x" * 900_000}] * 60}  # 54M characters
    watch = Watch(url, pid)
    r = watch.run(lambda: post_raw(url, "/generate", huge_prompt))
    assert r.status_code == 400, r.text[:500]
    err = r.json()["error"]
    assert "prompts[0]" in err and "50000000 characters" in err and "65536" in err
    assert watch.elapsed < 60
    chat = watch.run(lambda: post_raw(url, "/v1/chat/completions", huge_chat))
    assert chat.status_code == 400, chat.text[:500]
    e = chat.json()["error"]
    assert e["param"] == "messages" and "54000000 characters" in e["message"] and "65536" in e["message"]
    assert e["type"] == "invalid_request_error" and e["code"] == "prompt_too_long"
    assert max(watch.health_s, default=0.0) < 1.0, watch.health_s
    peak = max(watch.rss, default=baseline)
    time.sleep(1.0)
    after = proc.memory_info().rss
    print(
        f"\nhuge requests: /health max {max(watch.health_s, default=0.0):.3f}s over {len(watch.health_s)} polls; "
        f"RSS baseline {baseline / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB, after {after / 2**20:.0f} MiB"
    )
    fault_report(
        "50M-character prompt on /generate, 54M-character chat on /v1",
        "400 naming the field before tokenising; /health < 1 s; RSS growth < 2 GiB",
        f"{r.status_code} and {chat.status_code}; /health max {max(watch.health_s, default=0.0):.3f}s over "
        f"{len(watch.health_s)} polls; RSS {baseline / 2**20:.0f} -> peak {peak / 2**20:.0f} MiB",
    )
    assert peak - baseline < 2 << 30  # the old code grew by ~12 GB tokenising the 50 MB prompt


def test_many_prompts_tokenised_off_the_event_loop(server):
    """4096 prompts that each fit the context: tokenised on the pool, stopped at the batch budget."""
    url, pid = server
    body = {"prompts": ["hello world 123 " * 180] * 4096, "max_tokens": 8}  # 11.8M characters in all
    watch = Watch(url, pid)
    r = watch.run(lambda: post_raw(url, "/generate", body))
    assert r.status_code == 400 and "--max-batch-tokens 1000000" in r.json()["error"], r.text[:500]
    assert max(watch.health_s, default=0.0) < 1.0, watch.health_s
    print(
        f"\nmany prompts: refused in {watch.elapsed:.2f}s, /health max {max(watch.health_s, default=0.0):.3f}s"
    )


def test_count_and_length_limits_name_the_field(url):
    cases = [
        ("/generate", {"prompts": ["a"] * 5000}, 422, "prompts"),
        ("/generate", {"prompt_token_ids": [[1] * (CTX + 1)]}, 400, "context length 2048"),
        ("/generate", {"prompts": ["a"], "stop": ["x"] * 17}, 422, "stop"),
        ("/generate", {"prompts": ["a"], "stop": ["x" * 300]}, 422, "1..256"),
        ("/v1/completions", {"prompt": "a" * 70_000}, 400, "65536"),
        ("/v1/completions", {"prompt": "a", "stop": ["x"] * 17}, 422, "at most 16 stop strings"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}] * 1025}, 422, "1024"),
    ]
    for route, body, status, needle in cases:
        r = httpx.post(url + route, json=body, timeout=30)
        assert r.status_code == status, (route, r.text)
        err = r.json()["error"]
        text = err["message"] if route.startswith("/v1/") else err
        assert needle in text, (route, text)
        assert (
            "validation error for" not in text and "errors.pydantic.dev" not in text
        )  # no raw pydantic dump


# ---- 2. auth before body ------------------------------------------------------------------------------------
@pytest.mark.faults
@pytest.mark.parametrize("route", ADMIN_ROUTES)
def test_admin_routes_check_the_token_before_the_body(url, route, fault_report):
    r = httpx.post(url + route, json={}, timeout=30)
    assert r.status_code == 401, r.text  # not 422: the empty body is never looked at
    assert "authorization" in r.json()["error"] and r.headers["www-authenticate"] == "Bearer"
    r = httpx.post(url + route, content=b"{not json", headers={"Authorization": "Bearer nope"}, timeout=30)
    assert r.status_code == 403, r.text
    if route in ("/init_weight_transfer", "/update_weights"):  # with the token, the body is validated
        r = httpx.post(url + route, json={}, headers=ADMIN, timeout=30)
        assert r.status_code == 422 and "Field required" in r.json()["error"], r.text
    fault_report(
        f"admin route {route} without token / wrong token, bad body",
        "401 then 403, body never read (422 only with the token)",
        "401 (empty body), 403 (non-JSON body)"
        + (f", {r.status_code} with the token" if r.status_code == 422 else ""),
    )


def test_require_token_for_generation_covers_every_route(tiny_model_dir):
    proc, url, _ = start_server(tiny_model_dir, "--api-token", TOKEN, "--require-token-for-generation")
    try:
        for route in ("/generate", "/v1/completions", "/v1/chat/completions"):
            r = httpx.post(url + route, json={}, timeout=30)
            assert r.status_code == 401, (route, r.text)
        for route in ("/v1/models", "/metrics"):
            assert httpx.get(url + route, timeout=30).status_code == 401, route
            assert httpx.get(url + route, headers=ADMIN, timeout=30).status_code == 200, route
        assert httpx.get(url + "/health", timeout=30).status_code == 200  # health stays open
        r = httpx.get(url + "/v1/models", timeout=30).json()["error"]
        assert r["type"] == "authentication_error" and r["code"] == "missing_api_key"
        no_bearer = oai(url, key="x").with_options(default_headers={"Authorization": "Basic eDp5"})
        with pytest.raises(openai.AuthenticationError) as info:
            no_bearer.models.list()
        assert "authorization" in str(info.value) and info.value.type == "authentication_error"
        with pytest.raises(openai.PermissionDeniedError, match="invalid token"):
            oai(url, key="wrong").completions.create(model="m", prompt="a", max_tokens=2)
        assert oai(url, key=TOKEN).models.list().data[0].id
        out = oai(url, key=TOKEN).completions.create(model="m", prompt="a", max_tokens=2)
        assert len(out.choices) == 1
    finally:
        stop(proc)


# ---- 3. one error shape -------------------------------------------------------------------------------------
def test_openai_sdk_shows_our_error_messages(url):
    client = oai(url)
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.chat.completions.create(model="m", messages=msgs, n=1000)
    assert "n: Input should be less than or equal to 256" in str(info.value)
    assert info.value.param == "n" and info.value.type == "invalid_request_error"
    with pytest.raises(openai.UnprocessableEntityError, match="bogus: unknown field"):
        client.chat.completions.create(model="m", messages=msgs, extra_body={"bogus": 1})
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="m", prompt="word " * 3000, max_tokens=8)
    assert "context length 2048" in str(info.value) and info.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="65536"):
        client.completions.create(model="m", prompt="a" * 70_000)
    with pytest.raises(openai.UnprocessableEntityError, match="at most 16 stop strings"):
        client.chat.completions.create(model="m", messages=msgs, stop=["x"] * 17)
    ok = client.chat.completions.create(model="m", messages=msgs, max_tokens=4, temperature=0)
    assert ok.choices[0].message.role == "assistant"


def test_every_error_has_our_shape(url):
    r = httpx.get(url + "/no/such/route", timeout=30)
    assert r.status_code == 404 and r.json() == {"error": "route: no route GET /no/such/route", "code": None}
    r = httpx.get(url + "/generate", timeout=30)
    assert r.status_code == 405 and set(r.json()) == {"error", "code"} and "GET" in r.json()["error"]
    r = httpx.get(url + "/v1/nope", timeout=30)
    assert r.status_code == 404
    assert r.json() == {
        "error": {
            "message": "route: no route GET /v1/nope",
            "type": "not_found_error",
            "param": None,
            "code": None,
        }
    }
    with pytest.raises(openai.NotFoundError, match="no route"):
        oai(url).embeddings.create(model="m", input="a")
    r = httpx.post(url + "/v1/completions", content=b"{not json", timeout=30)
    assert r.status_code == 422 and "Invalid JSON" in r.json()["error"]["message"]
    r = httpx.post(url + "/generate", content=b"{not json", timeout=30)
    assert r.status_code == 422 and "Invalid JSON" in r.json()["error"]
    metrics = httpx.get(url + "/metrics", timeout=30).text
    assert 'rollout_requests_total{route="unmatched",status="4xx"}' in metrics
    assert 'rollout_requests_total{route="/v1/completions",status="4xx"}' in metrics
    assert "rollout_backend_dead 0" in metrics


# ---- 4. engine death ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dying(tiny_model_dir):
    """The real TorchBackend, with dead_reason() under the test's control (a torch backend cannot die)."""
    from rollout_server.torch_backend import TorchBackend

    class DyingBackend(TorchBackend):
        reason: str | None = None
        die_during_generate = False

        def dead_reason(self) -> str | None:
            return self.reason

        def generate(self, req, prompt_ids, on_token=None):
            if self.die_during_generate:
                self.reason = "EngineCore process 1234 exited with code -9"
                raise RuntimeError("EngineDeadError: engine loop is not running")
            return super().generate(req, prompt_ids, on_token)

    return DyingBackend(str(tiny_model_dir))


@pytest.mark.faults
def test_dead_engine_reported_and_generation_refused(dying, fault_report):
    from fastapi.testclient import TestClient

    from rollout_server.app import ServerState, build_asgi

    client = TestClient(build_asgi(ServerState(backend=dying)))
    gen = {"prompts": ["a"], "max_tokens": 2}
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert client.get("/health").json()["ready"] is True and client.get("/health").json()["error"] is None
    assert client.post("/generate", json=gen).status_code == 200

    dying.reason = "EngineCore process 4242 exited with code -9"
    h = client.get("/health").json()
    assert h["ready"] is False and h["error"] == dying.reason
    r = client.post("/generate", json=gen)
    assert r.status_code == 503 and r.json()["code"] == "engine_dead"
    assert "engine is dead" in r.json()["error"] and "4242" in r.json()["error"]
    for route, body in (("/v1/completions", {"prompt": "a"}), ("/v1/chat/completions", chat)):
        r = client.post(route, json=body)
        assert r.status_code == 503, r.text
        e = r.json()["error"]
        assert (
            "4242" in e["message"] and e["code"] == "engine_dead" and e["type"] == "service_unavailable_error"
        )
    assert "rollout_backend_dead 1" in client.get("/metrics").text

    # the engine dies while a request is generating: 503 naming the cause, not a 500
    dying.reason, dying.die_during_generate = None, True
    try:
        r = client.post("/generate", json=gen)
        assert r.status_code == 503 and "1234" in r.json()["error"], r.text
        dying.reason = None
        with client.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as s:
            events = [ln[6:] for ln in s.iter_lines() if ln.startswith("data: ")]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        fault_report(
            "engine dies (idle, then mid-request and mid-stream)",
            "/health not ready with the cause; 503 engine_dead on every route; stream ends with an error",
            f"/health ready=False; 503 on /generate, /v1/completions, /v1/chat/completions; stream: "
            f"error {error['code']!r} then [DONE]",
        )
        assert error["code"] == "engine_dead" and "1234" in error["message"]
    finally:
        dying.reason, dying.die_during_generate = None, False
