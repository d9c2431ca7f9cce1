"""What every part of the Ray driver shares: the config, the run folder, the state file, the log line, the
Ray handles, the children's environment and the pids to sweep at the end.

``launch/driver.py`` owns one ``Runtime`` and hands it to ``launch/server_fleet.py`` (the rollout servers) and
``launch/trainer_world.py`` (the trainer ranks and the warm start), so each of them can start processes,
write the state file and say what happened without knowing about the others.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

POLL_S = 0.5
CHILD_ENV_DEFAULTS = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
PASS_ENV = ("HF_HUB_OFFLINE", "HF_HOME", "HF_TOKEN", "ROLLOUT_API_TOKEN", "PYTHONPATH", "RAY_AUTH_MODE")


@dataclass
class ServerSlot:
    """One rollout server as RUN_DIR/launch_state.json records it."""

    index: int
    url: str = ""
    host: str = ""
    port: int = 0
    pid: int | None = None
    restarts: int = 0
    argv: list[str] = field(default_factory=list)


@dataclass
class State:
    """RUN_DIR/launch_state.json: current URLs, pids, restart counts and status (tests and the UI read it)."""

    status: str = "starting"
    driver_pid: int = field(default_factory=os.getpid)
    run_dir: str = ""
    servers: list[ServerSlot] = field(default_factory=list)
    trainer_pids: list[int | None] = field(default_factory=list)
    trainer_restarts: int = 0
    master_addr: str = ""
    master_port: int = 0
    sync_master_port: int = 0
    message: str = ""


def tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


class Runtime:
    """The driver's shared handles. ``ray``, ``ProcessActor`` and ``reservation`` are set once Ray is up."""

    def __init__(self, cfg, config_path: str, overrides: list[str]):
        self.cfg = cfg
        self.lc = cfg.launch
        self.config_path = str(Path(config_path).resolve())
        self.overrides = list(overrides)
        self.run_dir = Path(cfg.run_dir).resolve()
        self.log_dir = self.run_dir / "logs"
        self.state = State(run_dir=str(self.run_dir))
        self.cwd = os.getcwd()
        self.model = ""  # the model folder servers and trainer load (the warm start's output once it ran)
        self.token: str | None = None
        self.started_ray = False
        self.ray = None
        self.ProcessActor = None
        self.reservation = None
        self.bar = None  # the progress bar, once training runs (log lines are written above it)
        self.local_pids: set[int] = set()  # every child pid we started on this node (final sweep)

    def save_state(self, status: str | None = None, message: str | None = None) -> None:
        if status:
            self.state.status = status
        if message is not None:
            self.state.message = message
        path = self.run_dir / "launch_state.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self.state), indent=1))
        os.replace(tmp, path)

    def say(self, msg: str) -> None:
        line = f"[launch {time.strftime('%H:%M:%S')}] {msg}"
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)
        with (self.log_dir / "driver.log").open("a") as f:
            f.write(line + "\n")

    def tick(self) -> None:
        if self.bar is not None:
            self.bar.update()

    def child_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: os.environ.get(k, v) for k, v in CHILD_ENV_DEFAULTS.items()}
        env.update({k: os.environ[k] for k in PASS_ENV if k in os.environ})
        if self.token:  # servers read it at start, the trainer's clients send it (never on a command line)
            env["ROLLOUT_API_TOKEN"] = self.token
        env.update(extra or {})
        return env

    def get(self, ref, timeout: float = 120.0):
        return self.ray.get(ref, timeout=timeout)

    def new_actor(self, pg, index: int, bundle: dict, name: str, log: Path):
        """A ProcessActor in bundle ``index`` of placement group ``pg`` (launch/procs.py, launch/cluster.py)."""
        from launch.cluster import actor_options

        opts = actor_options(pg, index, bundle, f"{self.cfg.run.name}-{name}")
        return self.ProcessActor.options(**opts).remote(name, str(log))

    def note_pid(self, pid: int | None) -> None:
        # pids are only meaningful on this node; the sweep checks ownership before killing
        if pid:
            self.local_pids.add(pid)

    def kill_actor(self, actor) -> None:
        try:
            self.ray.kill(actor, no_restart=True)
        except Exception:
            pass
