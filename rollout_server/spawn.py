"""Start a ``python -m rollout_server`` child process, wait until it serves, stop it with everything it started.

The one helper behind the evaluation CLI (``trainer/eval.py``), the scripts and the tests; the launcher's
``ServerFleet`` supervises its servers through Ray instead.

Why the READY line and not /health polling: the server prints one line starting with ``READY`` once its
backend is loaded and its port bound, so waiting costs no requests, and a server that exits first fails the
wait at once with its own last output. The child gets its own session (process group): stopping it also stops
what it started (vLLM's EngineCore and workers), even if it no longer answers.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` now (another process may take it before it is bound: bind port 0 where the
    binder allows it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerProcess:
    """A started rollout server: ``url``, ``proc``, ``lines`` (its latest output lines), ``wait_ready``, ``stop``.

    ``backend="auto"`` leaves the choice to the server (vLLM when CUDA and vLLM are there, else torch).
    ``log_path`` also writes every output line to that file. Use as a context manager to always stop it.
    """

    def __init__(
        self,
        model: str | Path,
        *,
        backend: str = "auto",
        host: str = "127.0.0.1",
        port: int | None = None,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        log_path: str | Path | None = None,
        keep_lines: int = 5000,
    ):
        self.port = port or free_port()
        self.url = f"http://{host}:{self.port}"
        cmd = [sys.executable, "-m", "rollout_server", "--model", str(model), "--host", host]
        cmd += ["--port", str(self.port)]
        if backend != "auto":
            cmd += ["--backend", backend]
        cmd += list(extra_args)
        child_env = dict(os.environ if env is None else env)
        # `-m rollout_server` must resolve to this checkout whatever the caller's working directory
        child_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), child_env.get("PYTHONPATH")) if p)
        self.lines: collections.deque[str] = collections.deque(maxlen=keep_lines)
        self._ready = threading.Event()
        self._log = open(log_path, "w") if log_path is not None else None  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=child_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        self._pump = threading.Thread(target=self._read_output, name="rollout-server-output", daemon=True)
        self._pump.start()

    def _read_output(self) -> None:
        for line in self.proc.stdout:  # ends when the process (and every holder of its stdout) is gone
            self.lines.append(line)
            if self._log is not None:
                with contextlib.suppress(ValueError):  # closed by stop() while the child still writes
                    self._log.write(line)
                    self._log.flush()
            if line.startswith("READY"):
                self._ready.set()

    def output(self, chars: int = 3000) -> str:
        """The end of what the server printed (for error messages)."""
        return "".join(list(self.lines))[-chars:]

    def wait_ready(self, timeout_s: float) -> str:
        """Block until the server printed READY; returns its URL. Raises RuntimeError (with the server's last
        output) when it exits first, TimeoutError when ``timeout_s`` passes; the server is stopped either way."""
        deadline = time.monotonic() + timeout_s
        while not self._ready.wait(0.2):
            if self.proc.poll() is not None:
                self._pump.join(timeout=5)  # its last lines say why
                if self._ready.is_set():
                    break
                self.stop()
                raise RuntimeError(
                    f"rollout server exited with code {self.proc.returncode}:\n{self.output()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"rollout server not ready after {timeout_s:.0f}s:\n{self.output()}")
        return self.url

    def stop(self, grace_s: float = 30.0) -> int | None:
        """SIGTERM the server (it stops its engine first), SIGKILL its whole process group after ``grace_s``
        (``grace_s=0``: at once). Returns the server's exit code."""
        if self.proc.poll() is None and grace_s > 0:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=grace_s)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # the server, or children it left behind
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        self._pump.join(timeout=5)
        if self._log is not None:
            self._log.close()
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
