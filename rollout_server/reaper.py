"""Kill the rollout server's descendants when the server dies, however it dies (SIGKILL included).

Why: vLLM runs its engine in separate processes (`VLLM::EngineCore`, `VLLM::Worker`, about 2 GB on CPU). A
graceful stop shuts them down (rollout_server/__main__.py), but a SIGKILL or an OOM kill of the server gives
no chance to run code, and the engine processes kept running, orphaned. The server therefore starts this
small watcher first: it holds the read end of a pipe whose write end only the server holds, notes the
server's descendants every `interval_s`, and when the pipe reports EOF (the server is gone) it terminates the
last set it saw, then kills whatever did not exit within a few seconds.

    python -m rollout_server.reaper SERVER_PID     (started by `start_reaper`; not meant to be run by hand)
"""

from __future__ import annotations

import os
import select
import subprocess
import sys

import psutil

GRACE_S = 5.0


def start_reaper(interval_s: float = 1.0) -> subprocess.Popen:
    """Start the watcher for this process; keep the returned Popen referenced for the process's life."""
    return subprocess.Popen(
        [sys.executable, "-m", "rollout_server.reaper", str(os.getpid()), str(interval_s)],
        stdin=subprocess.PIPE,
        start_new_session=True,  # a Ctrl-C to the server's group must not kill the watcher first
    )


def _snapshot(server: psutil.Process, me: int) -> dict[int, float]:
    try:
        kids = server.children(recursive=True)
    except psutil.Error:
        return {}
    out = {}
    for k in kids:
        if k.pid == me:
            continue
        try:
            out[k.pid] = k.create_time()
        except psutil.Error:
            pass
    return out


def _live(pids: dict[int, float]) -> list[psutil.Process]:
    """Processes of the snapshot that still exist and are the same processes (not a reused pid)."""
    procs = []
    for pid, created in pids.items():
        try:
            p = psutil.Process(pid)
            if abs(p.create_time() - created) < 1e-3:
                procs.append(p)
        except psutil.Error:
            pass
    return procs


def watch(server_pid: int, interval_s: float) -> int:
    me = os.getpid()
    try:
        server = psutil.Process(server_pid)
    except psutil.Error:
        return 0
    seen: dict[int, float] = {}
    stdin = sys.stdin.fileno()
    while True:
        seen.update(_snapshot(server, me))
        ready, _, _ = select.select([stdin], [], [], interval_s)
        if ready and not os.read(stdin, 4096):
            break  # EOF: the server's end of the pipe closed, i.e. the server exited or was killed
    victims = _live(seen)
    for p in victims:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(victims, timeout=GRACE_S)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    if victims:
        print(f"[reaper] server {server_pid} exited; stopped {len(victims)} leftover process(es)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(watch(int(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else 1.0))
