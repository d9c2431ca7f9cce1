"""End-to-end tests of the rollout server: a real `python -m rollout_server` process on 127.0.0.1, tiny model.

The test process plays the trainer (rank 0 of the weight-transfer group) with its own copy of the model.
Every HTTP call and collective has a timeout; the server processes are killed in the fixtures' finalizers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from rollout_server.client import (
    RolloutClient,
    RolloutServerError,
    WeightSyncClient,
    WeightSyncError,
    WeightSyncRejected,
)
from rollout_server.protocol import GenerateRequest, UpdateWeightsResponse, WeightManifest
from rollout_server.spawn import free_port
from rollout_server.weight_transfer import done_key, status_key

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[1]
TOKEN = "test-secret"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


def start_server(model_dir: Path, *extra: str, timeout_s: float | None = None, backend: str = "torch"):
    """A real server on a free port: (process, url, its latest output lines)."""
    from rollout_server.spawn import ServerProcess

    if timeout_s is None:
        timeout_s = 90.0 if backend == "torch" else 240.0  # vLLM CPU starts in ~40 s (eager), more when busy
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    server = ServerProcess(model_dir, backend=backend, extra_args=("--log-level", "warning", *extra), env=env)
    url = server.wait_ready(timeout_s)
    return server.proc, url, server.lines


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=90)  # vLLM stops its EngineCore and Worker first (~5 s alone, more when busy)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


BACKENDS = [
    "torch",
    pytest.param(
        "vllm",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (x86 AVX-512 CPU or GPU)"
        ),
    ),
]


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request) -> str:
    """Every test that talks to the shared server runs once per backend: the contract is the same."""
    return request.param


@pytest.fixture(scope="module")
def server(tiny_model_dir, backend):
    proc, url, _lines = start_server(
        tiny_model_dir, "--api-token", TOKEN, "--max-body-bytes", "200000", backend=backend
    )
    yield url
    stop(proc)
    # uvicorn re-raises SIGTERM after its graceful shutdown, so a clean stop reads -SIGTERM.
    assert proc.returncode in (0, -signal.SIGTERM), "".join(list(_lines)[-30:])


@pytest.fixture(scope="module")
def client(server):
    c = RolloutClient(server, api_token=TOKEN, timeout_s=60, retries=1, backoff_s=0.1)
    c.wait_until_ready(timeout_s=30)
    yield c
    c.close()


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def sync(server):
    s = WeightSyncClient(server, api_token=TOKEN, http_timeout_s=60)
    s.init_transfer("127.0.0.1", free_port(), backend="gloo", timeout_s=20)
    yield s
    s.close()


def greedy_ref(model, prompt: list[int], max_tokens: int) -> list[int]:
    """The trainer model's own greedy continuation (plain full forward per step, no cache)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_tokens):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def sampled_logprobs(
    model, prompt: list[int], completion: list[int], temperature: float, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """Log-probs of the sampled tokens under `log_softmax(logits / T)`; with top_k/top_p given, over the
    truncated and renormalised distribution instead (what vLLM reports, see vllm_backend.py)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0].double()  # [T, V]
    logits = logits[len(prompt) - 1 : -1]  # [C, V]: the positions that predicted each completion token
    if temperature > 0:
        logits = logits / temperature
    if top_k > 0:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # [C, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1)  # ascending, as vLLM does
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum <= 1 - top_p
        drop[:, -1] = False  # always keep the most likely token
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(-1, torch.tensor(completion)[:, None])[:, 0]


PROMPTS = ["Natalia sold clips to 48 of her friends", "What is 7 + 5?", "x"]


# ---- generation ---------------------------------------------------------------------------------------------
def test_health_and_shapes(client, backend):
    h = client.health()
    assert h.backend == backend and h.ready and h.max_model_len > 0
    res = client.generate(GenerateRequest(prompts=PROMPTS, n=3, max_tokens=12, temperature=1.0, seed=1))
    assert len(res.completions) == 9
    assert [c.prompt_index for c in res.completions] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [c.sample_index for c in res.completions] == [0, 1, 2] * 3
    for c in res.completions:
        assert 0 < len(c.token_ids) <= 12 and len(c.logprobs) == len(c.token_ids)
        assert c.finish_reason == ("length" if len(c.token_ids) == 12 else "stop")
        assert all(lp <= 0 for lp in c.logprobs)
        assert c.weight_version == res.weight_version
    assert res.completion_tokens == sum(len(c.token_ids) for c in res.completions)


def test_logprobs_match_full_forward(client, hf, backend):
    model, tok = hf
    for temperature, top_k, top_p in [(0.7, 5, 0.9), (1.0, 0, 1.0), (0.0, 0, 1.0)]:
        res = client.generate(
            GenerateRequest(
                prompts=PROMPTS[:2],
                n=2,
                max_tokens=10,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                seed=3,
            )
        )
        for c in res.completions:
            prompt = tok(PROMPTS[c.prompt_index], add_special_tokens=False)["input_ids"]
            # The contract's log-probs are pre-truncation; vLLM's are over the truncated distribution
            # (a documented difference: GRPO samples with top_k=0, top_p=1, where both agree).
            trunc = (top_k, top_p) if backend == "vllm" else (0, 1.0)
            ref = sampled_logprobs(model, prompt, c.token_ids, temperature, *trunc)
            torch.testing.assert_close(torch.tensor(c.logprobs, dtype=torch.float64), ref, atol=1e-4, rtol=0)


def test_seeded_reproducible_and_greedy_deterministic(client, hf):
    model, tok = hf
    req = GenerateRequest(prompts=PROMPTS, n=2, max_tokens=10, temperature=1.0, seed=11)
    a, b = client.generate(req), client.generate(req)
    assert [c.token_ids for c in a.completions] == [c.token_ids for c in b.completions]
    other = client.generate(req.model_copy(update={"seed": 12}))
    assert [c.token_ids for c in a.completions] != [c.token_ids for c in other.completions]
    g = client.generate(GenerateRequest(prompts=PROMPTS[:1], n=3, max_tokens=10, temperature=0))
    assert len({tuple(c.token_ids) for c in g.completions}) == 1
    prompt = tok(PROMPTS[0], add_special_tokens=False)["input_ids"]
    ids = client.generate(GenerateRequest(prompt_token_ids=[prompt], max_tokens=10, temperature=0))
    assert ids.completions[0].token_ids == g.completions[0].token_ids
    ref = greedy_ref(model, prompt, 10)
    got = g.completions[0].token_ids
    assert got == ref[: len(got)]


def test_stop_string_cuts_text(client):
    base = client.generate(GenerateRequest(prompts=PROMPTS[:1], max_tokens=16, temperature=0)).completions[0]
    assert base.finish_reason == "length" and len(base.text) > 6
    stop = base.text[4:7]
    cut = client.generate(GenerateRequest(prompts=PROMPTS[:1], max_tokens=16, temperature=0, stop=[stop]))
    c = cut.completions[0]
    assert c.finish_reason == "stop"
    assert c.text == base.text[: base.text.find(stop)]
    assert stop not in c.text and len(c.token_ids) < len(base.token_ids)
    assert c.token_ids == base.token_ids[: len(c.token_ids)]


# ---- bad input and auth -------------------------------------------------------------------------------------
BAD = [
    ("/generate", {"prompts": ["a"], "n": 0}, 422, "n"),
    ("/generate", {"prompts": ["a"], "n": 100000}, 422, "n"),
    ("/generate", {"prompts": ["a"], "max_tokens": -1}, 422, "max_tokens"),
    ("/generate", {"prompts": ["a"], "max_tokens": 100000}, 400, "max_tokens"),
    ("/generate", {"prompts": ["a"], "temperature": -0.5}, 422, "temperature"),
    ("/generate", {"prompts": ["a"], "top_p": 0}, 422, "top_p"),
    ("/generate", {"prompts": ["a"], "bogus": 1}, 422, "bogus"),
    ("/generate", {"prompts": "a"}, 422, "prompts"),
    ("/generate", {}, 422, "prompts"),
    ("/generate", {"prompts": ["a"], "prompt_token_ids": [[1]]}, 422, "prompts"),
    ("/generate", {"prompt_token_ids": [[1, 10**9]]}, 400, "prompt_token_ids"),
    ("/generate", {"prompts": ["word " * 3000], "max_tokens": 8}, 400, "max_tokens"),
    ("/generate", {"prompts": ["a"], "stop": [""]}, 422, "stop"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 0}, 422, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 422, "role"),
    ("/v1/chat/completions", {"messages": [], "stream": True}, 422, "messages"),
]


@pytest.mark.parametrize(("route", "body", "status", "field"), BAD)
def test_bad_input(server, route, body, status, field):
    r = httpx.post(server + route, json=body, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    if route.startswith("/v1/"):  # OpenAI's error shape
        assert error["type"] == "invalid_request_error" and set(error) == {"message", "type", "param", "code"}
        error = error["message"]
    assert field in error


def test_malformed_and_oversized(server, client):
    r = httpx.post(
        server + "/generate", content=b"{not json", headers={"content-type": "application/json"}, timeout=30
    )
    assert r.status_code == 422 and "json" in r.json()["error"].lower()
    r = httpx.post(server + "/generate", json={"prompts": ["a" * 300_000]}, timeout=30)
    assert r.status_code == 413 and "body" in r.json()["error"]
    assert client.health().ready  # still serving


def test_auth(server, tiny_model_dir):
    body = {"master_addr": "127.0.0.1", "master_port": 1, "rank": 1, "world_size": 2}
    assert httpx.post(server + "/init_weight_transfer", json=body, timeout=30).status_code == 401
    bad = {"Authorization": "Bearer nope"}
    assert httpx.post(server + "/init_weight_transfer", json=body, headers=bad, timeout=30).status_code == 403
    assert httpx.post(server + "/pause", timeout=30).status_code == 401
    # generation routes are open unless --require-token-for-generation
    assert (
        httpx.post(server + "/generate", json={"prompts": ["a"], "max_tokens": 2}, timeout=30).status_code
        == 200
    )


def test_cli_refuses_bad_args(tiny_model_dir):
    cases = [
        (["--host", "0.0.0.0"], "--api-token"),
        (["--port", "70000"], "--port"),
        (["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization"),
    ]
    for extra, needle in cases:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "rollout_server",
                "--model",
                str(tiny_model_dir),
                "--backend",
                "torch",
                *extra,
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 2 and needle in out.stderr, out.stderr
    out = subprocess.run(
        [sys.executable, "-m", "rollout_server", "--model", "/no/such/dir"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "no such directory" in out.stderr


@pytest.mark.faults
def test_concurrent_clients(server, backend, fault_report):
    errors: list[str] = []
    counts: list[int] = []

    def worker(i: int):
        c = RolloutClient(server, timeout_s=120, retries=0)
        try:
            for j in range(3):
                res = c.generate(
                    GenerateRequest(prompts=[PROMPTS[(i + j) % 3]], n=2, max_tokens=6, seed=i * 10 + j)
                )
                counts.append(len(res.completions))
        except Exception as e:  # collected and asserted below
            errors.append(repr(e))
        finally:
            c.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    fault_report(
        f"8 concurrent clients x 3 requests ({backend})",
        "24 answers of 2 completions, no error, no hung thread",
        f"{len(counts)} answers, {len(errors)} errors, {sum(t.is_alive() for t in threads)} threads alive"
        + (f"; first error {errors[0][:120]}" if errors else ""),
    )
    assert not any(t.is_alive() for t in threads)
    assert errors == [] and counts == [2] * 24


def test_pause_resume_and_client_retries(server, client):
    from rollout_server.client import RolloutServerError, RolloutServerUnavailable

    assert httpx.post(server + "/pause", headers=ADMIN, timeout=30).status_code == 200
    assert client.health().ready is False
    r = httpx.post(server + "/generate", json={"prompts": ["a"], "max_tokens": 2}, timeout=30)
    assert r.status_code == 503 and "paused" in r.json()["error"]
    resumer = threading.Timer(0.5, lambda: httpx.post(server + "/resume", headers=ADMIN, timeout=30))
    resumer.start()  # the client retries 503 with backoff and succeeds once resumed
    patient = RolloutClient(server, timeout_s=30, retries=4, backoff_s=0.3)
    assert len(patient.generate(GenerateRequest(prompts=["a"], max_tokens=2)).completions) == 1
    resumer.join(timeout=10)
    assert client.health().ready
    dead = RolloutClient(f"http://127.0.0.1:{free_port()}", timeout_s=2, retries=2, backoff_s=0.05)
    t0 = time.monotonic()
    with pytest.raises(RolloutServerUnavailable, match="3 attempts"):
        dead.generate(GenerateRequest(prompts=["a"], max_tokens=2))
    assert time.monotonic() - t0 < 10
    with pytest.raises(RolloutServerError) as info:  # 4xx is not retried
        client.generate(GenerateRequest(prompt_token_ids=[[10**8]], max_tokens=2))
    assert info.value.status == 400


# ---- OpenAI routes ------------------------------------------------------------------------------------------
def test_openai_routes(server, client):
    models = httpx.get(server + "/v1/models", timeout=30).json()
    assert models["data"][0]["id"]
    r = httpx.post(
        server + "/v1/completions",
        json={"prompt": PROMPTS[1], "max_tokens": 5, "n": 2, "temperature": 0, "logprobs": 1},
        timeout=30,
    ).json()
    assert len(r["choices"]) == 2 and len(r["choices"][0]["logprobs"]["token_logprobs"]) <= 5
    native = client.generate(GenerateRequest(prompts=[PROMPTS[1]], max_tokens=5, temperature=0)).completions[
        0
    ]
    assert r["choices"][0]["text"] == native.text
    chat = {"messages": [{"role": "user", "content": "What is 2 + 3?"}], "max_tokens": 12, "temperature": 0}
    full = httpx.post(server + "/v1/chat/completions", json=chat, timeout=30).json()
    text = full["choices"][0]["message"]["content"]
    assert full["usage"]["completion_tokens"] >= 1
    deltas, finish = [], None
    with httpx.stream(
        "POST", server + "/v1/chat/completions", json={**chat, "stream": True}, timeout=30
    ) as s:
        assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in s.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    for ln in lines[:-1]:
        ch = json.loads(ln[6:])["choices"][0]
        deltas.append(ch["delta"].get("content", ""))
        finish = ch["finish_reason"] or finish
    assert "".join(deltas) == text and finish == full["choices"][0]["finish_reason"]
    assert len([d for d in deltas if d]) >= 2  # really incremental


def test_metrics(server, client):
    client.generate(GenerateRequest(prompts=["a"], max_tokens=3))
    text = httpx.get(server + "/metrics", timeout=30).text
    values = {
        ln.split()[0]: float(ln.split()[-1]) for ln in text.splitlines() if ln and not ln.startswith("#")
    }
    assert values["rollout_tokens_generated_total"] >= 3
    assert values["rollout_tokens_per_second"] > 0
    assert values['rollout_requests_total{route="/generate",status="2xx"}'] >= 1
    assert "rollout_weight_sync_bytes_total" in values and "rollout_queue_depth" in values


# ---- weight updates -----------------------------------------------------------------------------------------
def perturbed(model, seed: int):
    import copy

    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return m


def greedy_server(client, prompt_ids, max_tokens=12):
    res = client.generate(GenerateRequest(prompt_token_ids=prompt_ids, max_tokens=max_tokens, temperature=0))
    return [c.token_ids for c in res.completions], res.weight_version


def test_weight_update_round_trip(client, sync, hf):
    model, tok = hf
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    trainer = perturbed(model, seed=1)
    named = list(trainer.named_parameters())  # tied lm_head is not listed: the server ties it again
    before, _ = greedy_server(client, prompts)
    # Many small buckets, several on the wire at once (the parameters stay put: tensors_stay) and received
    # one ahead on the server: every byte must still land in its place.
    stats = sync.push(
        WeightManifest.from_named_tensors(named),
        iter(named),
        version=7,
        bucket_bytes=16 << 10,
        tensors_stay=True,
    )
    assert stats.num_buckets > 10 and stats.copied_bytes < stats.bytes and stats.servers[0].version == 7
    after, version = greedy_server(client, prompts)
    assert version == 7 and client.health().weight_version == 7
    expected = [greedy_ref(trainer, p, 12) for p in prompts]
    assert [a == e[: len(a)] for a, e in zip(after, expected, strict=True)] == [True] * 3
    assert after != before
    # The server said "done" twice, through the trainer's store (read first) and in its HTTP answer: the same.
    done = sync._group.store.get(done_key(stats.sync_id, 1))
    answer = sync._requests.outstanding[-1].answers[0].result(timeout=30)
    assert UpdateWeightsResponse.model_validate_json(done) == UpdateWeightsResponse.model_validate(answer)
    assert stats.servers[0] == UpdateWeightsResponse.model_validate(answer)
    # The next push deletes this one's keys from the store (it would grow every step otherwise).
    again = sync.push(WeightManifest.from_named_tensors(named), iter(named), version=8)
    assert not sync._group.store.check([done_key(stats.sync_id, 1)])
    assert sync._group.store.check([done_key(again.sync_id, 1)])


def test_back_to_back_pushes_serve_the_last(client, sync, hf):
    """Pushes with no generation between them: the last one serves. The torch backend recycles its receive
    buffers, so update k+2 lands at update k's addresses; its decoder's joined q/k/v and gate/up weights,
    keyed by address, once took that for "unchanged" and served update k's."""
    model, tok = hf
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    _, base = greedy_server(client, prompts)
    for k in range(3):
        trainer = perturbed(model, seed=30 + k)
        named = list(trainer.named_parameters())
        sync.push(WeightManifest.from_named_tensors(named), iter(named), version=base + 1 + k)
        if k == 0:
            greedy_server(client, prompts)  # the decoder joins update 1's weights
    after, version = greedy_server(client, prompts)
    expected = [greedy_ref(trainer, p, 12) for p in prompts]
    assert version == base + 3
    assert [a == e[: len(a)] for a, e in zip(after, expected, strict=True)] == [True] * 3


def test_bad_manifest_refused_and_old_weights_serve(client, sync, hf):
    model, tok = hf
    prompts = [tok(PROMPTS[0], add_special_tokens=False)["input_ids"]]
    before, version = greedy_server(client, prompts)
    named = list(perturbed(model, seed=2).named_parameters())
    for bad in (
        [(n, t[:1] if i == 3 else t) for i, (n, t) in enumerate(named)],  # wrong shape
        [(n, t.half() if i == 3 else t) for i, (n, t) in enumerate(named)],  # wrong dtype
        [("model.not_a_layer.weight", named[0][1])] + named[1:],  # unknown name
    ):
        t0 = time.monotonic()
        with pytest.raises(WeightSyncRejected) as info:
            sync.push(WeightManifest.from_named_tensors(bad), iter(bad), version=99)
        assert info.value.status == 422 and "manifest" in str(info.value) and time.monotonic() - t0 < 10
    assert greedy_server(client, prompts) == (before, version)
    good = list(perturbed(model, seed=3).named_parameters())  # the group is still usable
    assert (
        sync.push(WeightManifest.from_named_tensors(good), iter(good), version=version + 1).version
        == version + 1
    )


def test_push_failing_in_its_first_bucket_aborts_before_any_byte_moved(client, sync, hf):
    """The first bucket is packed during the handshake: a tensor that does not match the manifest there
    aborts every server (go = 0), so the old weights serve and the group stays usable without a re-init."""
    model, tok = hf
    prompts = [tok(PROMPTS[0], add_special_tokens=False)["input_ids"]]
    before, version = greedy_server(client, prompts)
    named = list(perturbed(model, seed=6).named_parameters())
    wrong = [(n, t.double() if i == 1 else t) for i, (n, t) in enumerate(named)]
    with pytest.raises(WeightSyncError, match="aborted before any byte moved.*manifest says"):
        # one bucket holds the whole tiny model, tensor #1 included
        sync.push(WeightManifest.from_named_tensors(named), iter(wrong), version=98, bucket_bytes=64 << 20)
    assert greedy_server(client, prompts) == (before, version)
    pushed = sync.push(WeightManifest.from_named_tensors(named), iter(named), version=version + 1)
    assert pushed.version == version + 1 and client.health().weight_version == version + 1


def test_announced_push_starts_at_the_go(client, sync, hf):
    """`announce` sends the update request before the weights exist (the trainer's optimizer step): the
    server checks the manifest and waits for the go meanwhile, still generating on its old weights; the push
    of that version then starts at the go. An announcement that is not pushed is called off (409), and a
    refused one surfaces in its push."""
    model, tok = hf
    prompts = [tok(PROMPTS[2], add_special_tokens=False)["input_ids"]]
    before, version = greedy_server(client, prompts)
    trainer = perturbed(model, seed=7)
    named = list(trainer.named_parameters())
    manifest = WeightManifest.from_named_tensors(named)

    def said_ok(sync_id: str) -> bool:
        deadline = time.monotonic() + 30
        while not sync._group.store.check([status_key(sync_id, 1)]):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    # Called off: announced as one version, pushed as another.
    sync.announce(manifest, version + 1)
    off = sync._requests.announced
    assert said_ok(off.sync_id)
    assert greedy_server(client, prompts) == (before, version)  # generation goes on while it waits
    other = sync.push(manifest, iter(named), version=version + 2)
    assert not other.announced
    with pytest.raises(RolloutServerError) as info:
        off.answers[0].result(timeout=30)
    assert info.value.status == 409 and "aborted" in str(info.value)
    assert other.version == version + 2 and other.sync_id != off.sync_id
    # Pushed as announced: the server said ok before the push began, so the push starts at the go.
    trainer = perturbed(model, seed=8)
    named = list(trainer.named_parameters())
    sync.announce(manifest, version + 3)
    ahead = sync._requests.announced.sync_id
    assert said_ok(ahead)
    stats = sync.push(manifest, iter(named), version=version + 3)
    assert stats.announced and stats.sync_id == ahead  # the push used the announced requests
    assert stats.servers[0].version == version + 3 and client.health().weight_version == version + 3
    after, _ = greedy_server(client, prompts)
    assert after[0] == greedy_ref(trainer, prompts[0], 12)[: len(after[0])]
    # A refused announcement: the push raises what the server answered, and the group stays usable.
    bad = [(n, t[:1] if i == 3 else t) for i, (n, t) in enumerate(named)]
    bad_manifest = WeightManifest.from_named_tensors(bad)
    sync.announce(bad_manifest, version + 4)
    with pytest.raises(WeightSyncRejected) as refused:
        sync.push(bad_manifest, iter(bad), version=version + 4)
    assert refused.value.status == 422
    assert sync.push(manifest, iter(named), version=version + 5).version == version + 5


def test_announcement_past_its_timeout_is_called_off_and_the_push_asks_again(server, client, sync, hf):
    """A step that outlives the announcement: the server stops waiting for the go and answers 409 "called
    off", which is not a failed sync; the push sees the announcement is stale and sends its own request."""

    def failures() -> float:
        text = httpx.get(server + "/metrics", timeout=30).text
        return next(
            float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith("rollout_weight_sync_failures")
        )

    model, tok = hf
    named = list(perturbed(model, seed=9).named_parameters())
    manifest = WeightManifest.from_named_tensors(named)
    _, version = greedy_server(client, [tok(PROMPTS[0], add_special_tokens=False)["input_ids"]])
    failed_before = failures()
    sync.announce(manifest, version + 1, timeout_s=1.0)
    stale = sync._requests.announced
    with pytest.raises(RolloutServerError) as info:
        stale.answers[0].result(timeout=30)
    assert info.value.status == 409 and "called off" in str(info.value)
    stats = sync.push(manifest, iter(named), version=version + 1, timeout_s=30)
    assert not stats.announced and stats.sync_id != stale.sync_id
    assert client.health().weight_version == version + 1 and failures() == failed_before


@pytest.mark.faults
@pytest.mark.parametrize("failure", ["crash", "stall"])
def test_interrupted_update_keeps_old_weights(client, server, sync, hf, failure, backend, fault_report):
    """The trainer dies midway (its end of the group closes) or stalls past the server's receive deadline."""
    model, tok = hf
    prompts = [tok(PROMPTS[1], add_special_tokens=False)["input_ids"]]
    before, version = greedy_server(client, prompts)
    trainer = perturbed(model, seed=4 if failure == "crash" else 5)
    named = list(trainer.named_parameters())

    def stops_midway():
        for i, item in enumerate(named):
            if i == len(named) // 2:
                if failure == "crash":
                    raise RuntimeError("trainer crashed")
                time.sleep(6)  # the server's deadline is 3 s
            yield item

    t0 = time.monotonic()
    with pytest.raises(WeightSyncError, match="trainer crashed" if failure == "crash" else "failed"):
        sync.push(
            WeightManifest.from_named_tensors(named),
            stops_midway(),
            version=123,
            bucket_bytes=16 << 10,
            timeout_s=3,
        )
    assert time.monotonic() - t0 < 30
    deadline = time.monotonic() + 30
    while httpx.get(server + "/health", timeout=10).json()["weight_transfer"] and time.monotonic() < deadline:
        time.sleep(0.2)  # the server notices (deadline or closed peer) and drops the group
    kept, kept_version = greedy_server(client, prompts)
    fault_report(
        f"trainer {'crashes' if failure == 'crash' else 'stalls 6 s (deadline 3 s)'} midway through a "
        f"weight push ({backend})",
        f"push fails < 30 s; old weights and version {version} keep serving; re-init then push works",
        f"push raised, group dropped {time.monotonic() - t0:.1f}s after the push began; serving version "
        f"{kept_version}, "
        f"greedy output {'unchanged' if kept == before else 'CHANGED'}",
    )
    assert greedy_server(client, prompts) == (before, version)  # old weights, old version
    with pytest.raises(WeightSyncError, match="init_transfer"):  # the trainer must re-init first
        sync.push(WeightManifest.from_named_tensors(named), iter(named), version=124)
    sync.init_transfer("127.0.0.1", free_port(), backend="gloo", timeout_s=20)
    assert sync.push(WeightManifest.from_named_tensors(named), iter(named), version=124).version == 124
    after, v = greedy_server(client, prompts)
    assert v == 124 and after[0] == greedy_ref(trainer, prompts[0], 12)[: len(after[0])]


def test_require_token_for_generation(tiny_model_dir):
    proc, url, _ = start_server(tiny_model_dir, "--api-token", TOKEN, "--require-token-for-generation")
    try:
        body = {"prompts": ["a"], "max_tokens": 2}
        assert httpx.post(url + "/generate", json=body, timeout=30).status_code == 401
        assert httpx.post(url + "/v1/completions", json={"prompt": "a"}, timeout=30).status_code == 401
        assert httpx.post(url + "/generate", json=body, headers=ADMIN, timeout=30).status_code == 200
        assert httpx.get(url + "/health", timeout=30).status_code == 200
    finally:
        stop(proc)


def test_push_to_two_servers_in_one_group(tiny_model_dir, server, client, sync, hf):
    """One group (trainer + 2 servers), one request per server, every bucket broadcast once."""
    model, tok = hf
    proc, url2, _ = start_server(tiny_model_dir, "--api-token", TOKEN)
    multi = WeightSyncClient([server, url2], api_token=TOKEN, http_timeout_s=60)
    client2 = RolloutClient(url2, api_token=TOKEN, timeout_s=60, retries=0)
    try:
        multi.init_transfer("127.0.0.1", free_port(), backend="gloo", timeout_s=20)
        trainer = perturbed(model, seed=6)
        named = list(trainer.named_parameters())
        stats = multi.push(
            WeightManifest.from_named_tensors(named), iter(named), version=500, bucket_bytes=32 << 10
        )
        assert [s.version for s in stats.servers] == [500, 500]
        prompts = [tok(PROMPTS[2], add_special_tokens=False)["input_ids"]]
        expected = greedy_ref(trainer, prompts[0], 12)
        for c in (client, client2):
            got, version = greedy_server(c, prompts)
            assert version == 500 and got[0] == expected[: len(got[0])]
        bad = [(n, t.half()) for n, t in named]
        with pytest.raises(WeightSyncRejected):  # refused by both: no byte moved, the group stays usable
            multi.push(WeightManifest.from_named_tensors(bad), iter(bad), version=501)
        assert multi.push(WeightManifest.from_named_tensors(named), iter(named), version=502).version == 502
    finally:
        multi.close()
        client2.close()
        stop(proc)
        sync.init_transfer(
            "127.0.0.1", free_port(), backend="gloo", timeout_s=20
        )  # server 1 left sync's group
