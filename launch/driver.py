"""The Ray driver of a GRPO run: reserve devices, start rollout servers, form the trainer world, supervise.

What it does, in order:
1. Resolve the model (builds the offline tiny model once when ``model.name_or_path: tiny``).
2. Start or join a Ray cluster and reserve two placement groups (launch/cluster.py): rollout servers on their
   GPUs, trainer ranks on others (CPU bundles on CPU).
3. Start one ``ProcessActor`` per server; each runs ``python -m rollout_server`` on a port it checked is free on
   its node (``server_base_port + i`` when possible) and logs to RUN_DIR/logs/rollout-<i>.log. Wait for
   ``GET /health`` to answer ``ready: true``.
4. Start one ``ProcessActor`` per trainer rank running ``python -m trainer`` with RANK / WORLD_SIZE /
   LOCAL_RANK / MASTER_ADDR / MASTER_PORT (rank 0's node and a port free there) and the server URLs and
   weight-sync address as config overrides. Logs: RUN_DIR/logs/trainer-<rank>.log.
5. Supervise until every rank exits 0, drawing a tqdm bar from RUN_DIR/metrics.jsonl:
   - a rollout server died: restart it on the same port, wait for health. The server comes back with the
     model as loaded (``weight_version`` 0, no weight-transfer group); the trainer notices that on its next
     health check and re-initialises the transfer group and pushes its current weights (trainer side).
   - a trainer rank died (or its actor): stop the whole world and start it again with
     ``checkpoint.resume=true`` (the trainer pushes the checkpoint's weights to the servers first).
   - Ctrl-C / SIGTERM: stop trainer ranks, then servers (process groups: SIGTERM, then SIGKILL), kill the
     actors, remove the placement groups, shut Ray down (or disconnect from a cluster we joined).
6. Write RUN_DIR/report.md and plots (launch/report.py).

RUN_DIR/launch_state.json always holds the current URLs, pids, restart counts and status (tests and the UI
read it). Exit codes: 0 done, 1 failed, 130 interrupted.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from launch.serve import ensure_model, resolve_backend, server_argv

POLL_S = 0.5
CHILD_ENV_DEFAULTS = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
PASS_ENV = ("HF_HUB_OFFLINE", "HF_HOME", "HF_TOKEN", "ROLLOUT_API_TOKEN", "PYTHONPATH", "RAY_AUTH_MODE")


class Interrupted(BaseException):
    """SIGINT / SIGTERM reached the driver. A BaseException (as KeyboardInterrupt is), so the ``except
    Exception`` around actor calls cannot mistake it for a lost actor and restart the world instead of
    stopping (seen once: SIGINT landed inside the trainer-rank poll)."""


@dataclass
class ServerSlot:
    index: int
    url: str = ""
    host: str = ""
    port: int = 0
    pid: int | None = None
    restarts: int = 0
    argv: list[str] = field(default_factory=list)


@dataclass
class State:
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


class Driver:
    def __init__(self, cfg, config_path: str, overrides: list[str]):
        self.cfg = cfg
        self.lc = cfg.launch
        self.config_path = str(Path(config_path).resolve())
        self.overrides = list(overrides)
        self.run_dir = Path(cfg.run_dir).resolve()
        self.log_dir = self.run_dir / "logs"
        self.state = State(run_dir=str(self.run_dir))
        self.started_ray = False
        self.reservation = None
        self.server_actors: list = []
        self.rank_actors: list = []
        self.token: str | None = None
        self._heldout_rows: list | None = None
        self.local_pids: set[int] = set()  # every child pid we started on this node (final sweep)
        self.bar = None
        self.cwd = os.getcwd()

    # ---- state ----------------------------------------------------------------------------------------------
    def _save_state(self, status: str | None = None, message: str | None = None) -> None:
        if status:
            self.state.status = status
        if message is not None:
            self.state.message = message
        path = self.run_dir / "launch_state.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self.state), indent=1))
        os.replace(tmp, path)

    def _say(self, msg: str) -> None:
        line = f"[launch {time.strftime('%H:%M:%S')}] {msg}"
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)
        with (self.log_dir / "driver.log").open("a") as f:
            f.write(line + "\n")

    def _child_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: os.environ.get(k, v) for k, v in CHILD_ENV_DEFAULTS.items()}
        env.update({k: os.environ[k] for k in PASS_ENV if k in os.environ})
        if self.token:  # servers read it at start, the trainer's clients send it (never on a command line)
            env["ROLLOUT_API_TOKEN"] = self.token
        env.update(extra or {})
        return env

    # ---- the run --------------------------------------------------------------------------------------------
    def run(self) -> int:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._save_state("starting")
        old_int = signal.signal(signal.SIGINT, _raise_interrupted)
        old_term = signal.signal(signal.SIGTERM, _raise_interrupted)
        code = 1
        try:
            code = self._run()
        except Interrupted:
            self._say("interrupted: stopping everything")
            self._save_state("interrupted")
            code = 130
        except Exception as e:
            self._say(f"failed: {e}")
            self._save_state("failed", str(e))
            code = 1
        finally:
            # A second Ctrl-C must not cut the cleanup short (every step below is bounded by a timeout).
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            self._cleanup()
            if self.lc.report and (self.run_dir / "metrics.jsonl").exists():
                try:
                    from launch.report import write_report

                    self._say(f"report: {write_report(self.run_dir)}")
                except Exception as e:  # a broken plot must not hide the run's outcome
                    self._say(f"report failed: {e}")
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old_term)
        return code

    def _run(self) -> int:
        import ray

        from launch.cluster import reserve, start_ray
        from launch.procs import make_actor_class
        from launch.progress import ProgressBar

        model = ensure_model(self.cfg)
        self.model = model
        self._say(f"run folder {self.run_dir}; model {model}")
        n_cpu = int(
            self.lc.cpus_per_process * (self.lc.num_rollout_servers + self.lc.num_trainer_ranks) + 0.999
        )
        n_gpu = (
            self.lc.num_rollout_servers * self.lc.rollout_gpus_per_server
            + self.lc.num_trainer_ranks * self.lc.trainer_gpus_per_rank
        )
        self.started_ray = start_ray(self.lc.ray_address, n_cpu, n_gpu)
        self.token = self.cfg.rollout.api_token or os.environ.get("ROLLOUT_API_TOKEN")
        if not self.token and not self.started_ray:
            self.token = secrets.token_hex(24)
        self._say(f"ray {'started locally' if self.started_ray else 'joined at ' + str(self.lc.ray_address)}")
        self.ProcessActor = make_actor_class()
        self.reservation = reserve(self.lc, self.lc.cpus_per_process, self.lc.ready_timeout_s)
        self.ray = ray

        self._ensure_rank_actors()
        self.model = self._warm_start(model)
        self._start_servers()
        self._heldout("before")
        self.bar = ProgressBar(
            self.run_dir / "metrics.jsonl", self.cfg.optim.max_steps, enabled=self.lc.progress
        )
        self._start_trainer(resume=self.cfg.checkpoint.resume)
        self._save_state("running")
        return self._supervise()

    # ---- rollout servers ------------------------------------------------------------------------------------
    def _new_server_actor(self, i: int):
        from launch.cluster import actor_options

        res = self.reservation
        opts = actor_options(res.rollout_pg, i, res.rollout_bundle, f"{self.cfg.run.name}-rollout-{i}")
        return self.ProcessActor.options(**opts).remote(
            f"rollout-{i}", str(self.log_dir / f"rollout-{i}.log")
        )

    def _start_servers(self) -> None:
        backend = resolve_backend(self.lc.rollout_backend, self.lc.rollout_gpus_per_server)
        for i in range(self.lc.num_rollout_servers):
            actor = self._new_server_actor(i)
            self.server_actors.append(actor)
            # A private local cluster serves on loopback only; on a real cluster the node's address is needed
            # and the server then insists on an API token (the driver makes one per run if none is given).
            host = "127.0.0.1" if self.started_ray else self._get(actor.node_ip.remote())
            port = self._get(actor.pick_port.remote(self.lc.server_base_port + i))
            argv = server_argv(self.model, backend, host, port, list(self.lc.server_extra_args))
            slot = ServerSlot(index=i, url=f"http://{host}:{port}", host=host, port=port, argv=argv)
            self.state.servers.append(slot)
            slot.pid = self._get(actor.start.remote(argv, self._child_env(), self.cwd))
            self._note_pid(host, slot.pid)
            self._say(f"rollout server {i}: {slot.url} ({backend}, pid {slot.pid})")
        self._save_state()
        for i in range(len(self.state.servers)):
            self._wait_healthy(i)
            self._say(f"rollout server {i} ready")

    def _wait_healthy(self, i: int) -> None:
        import httpx

        slot, actor = self.state.servers[i], self.server_actors[i]
        headers = {}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        deadline = time.monotonic() + self.lc.ready_timeout_s
        while time.monotonic() < deadline:
            rc = self._get(actor.poll.remote())
            if rc is not None:
                log = self.log_dir / f"rollout-{i}.log"
                raise RuntimeError(
                    f"rollout server {i} exited with code {rc} while starting; {log}:\n{tail(log)}"
                )
            try:
                r = httpx.get(slot.url + "/health", timeout=5.0, headers=headers)
                if r.status_code == 200 and r.json().get("ready"):
                    return
            except (httpx.HTTPError, ValueError):
                pass
            self._tick()
            time.sleep(POLL_S)
        raise RuntimeError(f"rollout server {i} not ready after {self.lc.ready_timeout_s:.0f}s ({slot.url})")

    def _restart_server(self, i: int, reason: str) -> bool:
        """Bring server i back on the same URL; returns False when its URL had to change."""
        slot = self.state.servers[i]
        if slot.restarts >= self.lc.max_server_restarts:
            raise RuntimeError(f"rollout server {i} {reason}; it was restarted {slot.restarts} times already")
        slot.restarts += 1
        self._say(f"rollout server {i} {reason}: restarting ({slot.restarts}/{self.lc.max_server_restarts})")
        self._save_state("restarting_server")
        actor = self.server_actors[i]
        same_url = True
        try:
            self._get(actor.stop.remote(5.0))
        except Exception:  # the actor itself is gone: a fresh one in the same bundle
            self._kill_actor(actor)
            actor = self.server_actors[i] = self._new_server_actor(i)
            host = self._get(actor.node_ip.remote())
            if host != slot.host:
                same_url = False
        port = self._get(actor.pick_port.remote(slot.port))
        if port != slot.port or not same_url:
            same_url = False
            slot.host = self._get(actor.node_ip.remote())
            slot.port, slot.url = port, f"http://{slot.host}:{port}"
            slot.argv = server_argv(
                self.model,
                slot.argv[slot.argv.index("--backend") + 1],
                slot.host,
                port,
                list(self.lc.server_extra_args),
            )
        slot.pid = self._get(actor.start.remote(slot.argv, self._child_env(), self.cwd))
        self._note_pid(slot.host, slot.pid)
        self._save_state()
        self._wait_healthy(i)
        self._say(f"rollout server {i} back at {slot.url} (pid {slot.pid}); the trainer re-syncs its weights")
        self._save_state("running")
        return same_url

    # ---- held-out accuracy ----------------------------------------------------------------------------------
    def _heldout(self, when: str) -> None:
        """Greedy held-out accuracy of server 0 now (launch/heldout.py); "before" is measured once per run."""
        if not self.lc.heldout_eval:
            return
        from launch import heldout

        path = self.run_dir / "heldout.json"
        if when == "before" and path.exists() and "before" in json.loads(path.read_text()):
            return  # a resumed run keeps the measurement of the starting model
        if self._heldout_rows is None:
            self._heldout_rows = heldout.heldout_rows(self.cfg, self.model)
        rows = self._heldout_rows
        m = heldout.measure(
            self.state.servers[0].url, self.token, rows, self.cfg.eval.max_tokens, self.cfg.run.seed
        )
        heldout.record(self.run_dir, when, m)
        self._say(
            f"held-out accuracy {when}: strict {m.get('greedy/pass@1_strict', float('nan')):.3f}, lenient "
            f"{m.get('greedy/pass@1_lenient', float('nan')):.3f} on {len(rows)} problems "
            f"(weight version {m['weight_version']}, {m['seconds']:.0f}s)"
        )

    # ---- warm start -----------------------------------------------------------------------------------------
    def _warm_start(self, model: str) -> str:
        """Run the supervised warm start (trainer/sft.py) in trainer rank 0's actor; returns the model to train.

        Done once per run folder: a finished warm start (RUN_DIR/warm_start/warm_start.json) is reused, so a
        resumed or restarted run never repeats it. The trainer then gets ``warm_start.enabled=false``."""
        ws = self.cfg.warm_start
        if not ws.enabled:
            return model
        out = self.run_dir / "warm_start"
        if (out / "warm_start.json").exists():
            self._say(f"warm start: reusing {out}")
            return str(out)
        argv = [
            "python",
            "-m",
            "trainer.sft",
            "--config",
            self.config_path,
            "--out",
            str(out),
            *self.overrides,
        ]
        argv.append(f"model.name_or_path={model}")
        log = self.log_dir / "warm_start.log"
        self._say(f"warm start ({ws.source}) -> {out}; log {log}")
        t0 = time.monotonic()
        actor = self.rank_actors[0]
        pid = self._get(actor.start.remote(argv, self._child_env(), self.cwd, str(log)))
        self._note_pid("", pid)
        while (rc := self._get(actor.poll.remote())) is None:
            time.sleep(POLL_S)
        if rc != 0:
            raise RuntimeError(f"warm start failed (exit {rc}); {log}:\n{tail(log)}")
        self._say(f"warm start done in {time.monotonic() - t0:.0f}s")
        return str(out)

    # ---- trainer world --------------------------------------------------------------------------------------
    def _ensure_rank_actors(self) -> None:
        from launch.cluster import actor_options

        res = self.reservation
        while len(self.rank_actors) < self.lc.num_trainer_ranks:
            r = len(self.rank_actors)
            opts = actor_options(res.trainer_pg, r, res.trainer_bundle, f"{self.cfg.run.name}-trainer-{r}")
            log = str(self.log_dir / f"trainer-{r}.log")
            self.rank_actors.append(self.ProcessActor.options(**opts).remote(f"trainer-{r}", log))

    def _start_trainer(self, resume: bool) -> None:
        world = self.lc.num_trainer_ranks
        self._ensure_rank_actors()
        ips = self._get([a.node_ip.remote() for a in self.rank_actors])
        master = ips[0]
        master_port = self._get(self.rank_actors[0].pick_port.remote(None))
        sync_port = self._get(self.rank_actors[0].pick_port.remote(self.cfg.rollout.sync_master_port))
        if sync_port == master_port:
            sync_port = self._get(self.rank_actors[0].pick_port.remote(None))
        self.state.master_addr, self.state.master_port, self.state.sync_master_port = (
            master,
            master_port,
            sync_port,
        )
        urls = json.dumps([s.url for s in self.state.servers])
        argv = [
            "python",
            "-m",
            "trainer",
            "--config",
            self.config_path,
            *self.overrides,
            f"model.name_or_path={self.model}",
            f"rollout.server_urls={urls}",
            f"rollout.sync_master_addr={master}",
            f"rollout.sync_master_port={sync_port}",
        ]
        if self.cfg.warm_start.enabled:
            argv.append("warm_start.enabled=false")  # done once by _warm_start; self.model is its output
        if resume:
            argv.append("checkpoint.resume=true")
        per_node = {ip: ips.count(ip) for ip in ips}
        local_counts: dict[str, int] = {}
        pids = []
        for r, (actor, ip) in enumerate(zip(self.rank_actors, ips, strict=True)):
            local_rank = local_counts.get(ip, 0)
            local_counts[ip] = local_rank + 1
            env = self._child_env(
                {
                    "RANK": str(r),
                    "WORLD_SIZE": str(world),
                    "LOCAL_RANK": str(local_rank),
                    "LOCAL_WORLD_SIZE": str(per_node[ip]),
                    "MASTER_ADDR": master,
                    "MASTER_PORT": str(master_port),
                }
            )
            pids.append(self._get(actor.start.remote(argv, env, self.cwd)))
            self._note_pid(ip, pids[-1])
        self.state.trainer_pids = pids
        self._save_state()
        self._say(
            f"trainer world of {world} started (MASTER {master}:{master_port}, pids {pids})"
            + (" resuming from the latest checkpoint" if resume else "")
        )

    def _stop_trainer(self) -> None:
        refs = [a.stop.remote(10.0) for a in self.rank_actors]
        for a, ref in zip(list(self.rank_actors), refs, strict=True):
            try:
                self._get(ref, timeout=30)
            except Exception:
                self._kill_actor(a)
                self.rank_actors.remove(a)

    def _restart_trainer(self, reason: str) -> None:
        if self.state.trainer_restarts >= self.lc.max_trainer_restarts:
            raise RuntimeError(f"trainer {reason}; restarted {self.state.trainer_restarts} times already")
        self.state.trainer_restarts += 1
        self._say(
            f"trainer {reason}: restarting the world from the latest checkpoint "
            f"({self.state.trainer_restarts}/{self.lc.max_trainer_restarts})"
        )
        self._save_state("restarting_trainer")
        self._stop_trainer()
        self._start_trainer(resume=True)
        self._save_state("running")

    # ---- supervision ----------------------------------------------------------------------------------------
    def _supervise(self) -> int:
        while True:
            self._tick()
            for i, actor in enumerate(self.server_actors):
                try:
                    rc = self._get(actor.poll.remote(), timeout=30)
                    reason = None if rc is None else f"exited with code {rc}"
                except Exception as e:
                    reason = f"lost its actor ({type(e).__name__})"
                if reason is not None:
                    if not self._restart_server(i, reason):
                        self._restart_trainer("must reconnect to a moved rollout server")
            codes = []
            for actor in self.rank_actors:
                try:
                    codes.append(self._get(actor.poll.remote(), timeout=30))
                except Exception as e:
                    codes.append(f"actor lost ({type(e).__name__})")
            failed = [(r, c) for r, c in enumerate(codes) if c is not None and c != 0]
            if failed:
                r, c = failed[0]
                self._say(
                    f"trainer rank {r} failed ({c}); log tail:\n{tail(self.log_dir / f'trainer-{r}.log')}"
                )
                if c == 2:  # configuration or checkpoint refused: a restart would be refused the same way
                    raise RuntimeError(
                        f"trainer rank {r} refused its configuration or checkpoints (exit 2); see "
                        f"{self.log_dir / f'trainer-{r}.log'}"
                    )
                lost = [i for i, cc in enumerate(codes) if isinstance(cc, str)]
                for i in sorted(lost, reverse=True):
                    self._kill_actor(self.rank_actors.pop(i))
                self._restart_trainer(f"rank {r} exited ({c})")
                continue
            if codes and all(c == 0 for c in codes):
                self._tick()
                self._say("training finished")
                self._heldout("after")
                self._save_state("finished")
                return 0
            time.sleep(POLL_S)

    def _tick(self) -> None:
        if self.bar is not None:
            self.bar.update()

    # ---- helpers --------------------------------------------------------------------------------------------
    def _get(self, ref, timeout: float = 120.0):
        return self.ray.get(ref, timeout=timeout)

    def _note_pid(self, host: str, pid: int | None) -> None:
        del host  # pids are only meaningful on this node; the sweep checks ownership before killing
        if pid:
            self.local_pids.add(pid)

    def _kill_actor(self, actor) -> None:
        try:
            self.ray.kill(actor, no_restart=True)
        except Exception:
            pass

    def _cleanup(self) -> None:
        """Stop every child and actor we started; bounded in time, tolerant of a half-dead cluster."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        ray = getattr(self, "ray", None)
        if ray is not None and ray.is_initialized():
            groups = [self.rank_actors, self.server_actors]  # trainer first: it is the servers' client
            for actors in groups:
                refs = []
                for a in actors:
                    try:
                        refs.append(a.stop.remote(10.0))
                    except Exception:
                        pass
                for ref in refs:
                    try:
                        ray.get(ref, timeout=30)
                    except Exception:
                        pass
                for a in actors:
                    self._kill_actor(a)
            from launch.cluster import release

            release(self.reservation)
            ray.shutdown()
        _sweep(self.local_pids)
        self.server_actors, self.rank_actors = [], []
        if self.state.status in ("running", "starting", "restarting_server", "restarting_trainer"):
            self._save_state("stopped")


def _sweep(pids: set[int]) -> None:
    """Last resort on this node: SIGKILL the process groups of children that are somehow still alive."""
    for pid in pids:
        try:  # the group outlives its leader, so signal it even when the leader pid is gone
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass


def _raise_interrupted(signum, frame) -> None:
    raise Interrupted(signal.Signals(signum).name)


def main(config_path: str, overrides: list[str]) -> int:
    """Exit status: 0 done, 1 the run failed, 2 invalid configuration or checkpoints, 130 interrupted."""
    from trainer.checkpoint import CheckpointError, ensure_no_checkpoints
    from trainer.config import ConfigError, check_model_reference, load_config

    try:
        cfg = load_config(config_path, overrides)
        check_model_reference(cfg)
        if not cfg.checkpoint.resume:  # refuse before Ray, the warm start and servers are started
            ensure_no_checkpoints(cfg.checkpoint_dir)
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    code = Driver(cfg, config_path, overrides).run()
    sys.stdout.flush()
    return code
