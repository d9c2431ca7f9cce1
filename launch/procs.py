"""A supervised subprocess, and the Ray actor that runs one on the node and devices Ray reserved for it.

Why a subprocess inside an actor (not the server or the trainer in the actor itself): the rollout server and
the trainer are ordinary command-line programs (``python -m rollout_server``, ``python -m trainer``) that must
also run without Ray (docker compose, a laptop). The actor only gives them a place: Ray puts it on a node,
sets ``CUDA_VISIBLE_DEVICES`` to the GPUs of its bundle, and the child inherits that. The child is started in
its own process group (so stopping it also stops whatever it spawned, e.g. vLLM workers) with a parent-death
signal (so a killed actor cannot leave an orphan behind), and its stdout/stderr go to a log file of the run.

``Supervised`` is plain Python (testable without Ray); ``ProcessActor`` is the same class made remote.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """preexec_fn: ask Linux to SIGKILL the child when the process that started it dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except OSError:  # not Linux: the process-group kill in stop() still applies
        pass


def port_is_free(port: int, host: str = "0.0.0.0") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def pick_port(preferred: int | None = None) -> int:
    """``preferred`` if it can be bound on this node, else a free port chosen by the kernel."""
    if preferred and port_is_free(preferred):
        return preferred
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


class Supervised:
    """One child process at a time: start, poll, stop; logs appended to ``log_path`` across restarts."""

    def __init__(self, name: str, log_path: str):
        self.name = name
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._proc: subprocess.Popen | None = None
        self.starts = 0

    # -- where am I -------------------------------------------------------------------------------------------
    def node_ip(self) -> str:
        try:
            import ray

            return ray.util.get_node_ip_address()
        except Exception:  # outside Ray
            return "127.0.0.1"

    def visible_devices(self) -> str | None:
        return os.environ.get("CUDA_VISIBLE_DEVICES")

    def pick_port(self, preferred: int | None = None) -> int:
        return pick_port(preferred)

    # -- the child --------------------------------------------------------------------------------------------
    def start(
        self,
        argv: list[str],
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        log_path: str | None = None,
    ) -> int:
        """Start ``argv`` (``python`` is replaced by this interpreter) and return its pid.

        Output goes to ``log_path`` when given (a one-off job such as the warm start), else to the actor's log."""
        if self._proc is not None and self._proc.poll() is None:
            raise RuntimeError(f"{self.name}: already running (pid {self._proc.pid})")
        if argv and argv[0] == "python":
            argv = [sys.executable, *argv[1:]]
        full_env = {**os.environ, **(env or {})}
        self.starts += 1
        path = Path(log_path) if log_path else self.log_path
        path.parent.mkdir(parents=True, exist_ok=True)
        log = path.open("ab")
        shown = " ".join(_redact(a) for a in argv)
        log.write(f"\n===== [{time.strftime('%H:%M:%S')}] start #{self.starts}: {shown}\n".encode())
        log.flush()
        self._proc = subprocess.Popen(
            argv,
            env=full_env,
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # own process group: stop() kills the whole tree; Ctrl-C is ours to route
            preexec_fn=_die_with_parent,
        )
        log.close()  # the child holds its own descriptor
        return self._proc.pid

    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def poll(self) -> int | None:
        """None while running (or never started), else the exit code (negative = killed by that signal)."""
        return None if self._proc is None else self._proc.poll()

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM the child's process group, SIGKILL after ``timeout_s``; returns the exit code."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
        # Always sweep the group: the leader may be gone while something it spawned is not.
        _signal_group(proc.pid, signal.SIGKILL)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        return proc.poll()


def _redact(arg: str) -> str:
    """Hide secrets in the logged command line (the token override of the trainer)."""
    key, sep, _ = arg.partition("=")
    return f"{key}=***" if sep and ("token" in key.lower() or "secret" in key.lower()) else arg


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def make_actor_class():
    """``Supervised`` as a Ray actor class (Ray imported only when the driver asks for it)."""
    import ray

    # max_concurrency=1: methods run on the actor's main thread, which is also the parent the children's
    # parent-death signal watches (PR_SET_PDEATHSIG fires when the *thread* that forked exits).
    return ray.remote(max_restarts=0, max_concurrency=1)(Supervised)
