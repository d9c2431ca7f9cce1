"""The Ray driver of a GRPO run: reserve devices, start rollout servers, form the trainer world, supervise.

What it does, in order:
1. Resolve the model (builds the offline tiny model once when ``model.name_or_path: tiny``).
2. Start or join a Ray cluster and reserve two placement groups (launch/cluster.py): rollout servers on their
   GPUs, trainer ranks on others (CPU bundles on CPU).
3. The warm start, when enabled, in trainer rank 0's actor (launch/trainer_world.py).
4. Start the rollout servers and wait for ``GET /health`` to answer ``ready: true`` (launch/server_fleet.py),
   then the trainer world (launch/trainer_world.py).
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

from launch.runtime import POLL_S, Runtime, tail
from launch.serve import ensure_model
from launch.server_fleet import ServerFleet
from launch.trainer_world import TrainerWorld


class Interrupted(BaseException):
    """SIGINT / SIGTERM reached the driver. A BaseException (as KeyboardInterrupt is), so the ``except
    Exception`` around actor calls cannot mistake it for a lost actor and restart the world instead of
    stopping (seen once: SIGINT landed inside the trainer-rank poll)."""


class Driver:
    def __init__(self, cfg, config_path: str, overrides: list[str]):
        self.rt = Runtime(cfg, config_path, overrides)
        self.servers = ServerFleet(self.rt)
        self.trainers = TrainerWorld(self.rt)
        self._heldout_rows: list | None = None

    # ---- the run --------------------------------------------------------------------------------------------
    def run(self) -> int:
        rt = self.rt
        rt.log_dir.mkdir(parents=True, exist_ok=True)
        rt.save_state("starting")
        old_int = signal.signal(signal.SIGINT, _raise_interrupted)
        old_term = signal.signal(signal.SIGTERM, _raise_interrupted)
        code = 1
        try:
            code = self._run()
        except Interrupted:
            rt.say("interrupted: stopping everything")
            rt.save_state("interrupted")
            code = 130
        except Exception as e:
            rt.say(f"failed: {e}")
            rt.save_state("failed", str(e))
            code = 1
        finally:
            # A second Ctrl-C must not cut the cleanup short (every step below is bounded by a timeout).
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            self._cleanup()
            if rt.lc.report and (rt.run_dir / "metrics.jsonl").exists():
                try:
                    from launch.report import write_report

                    rt.say(f"report: {write_report(rt.run_dir)}")
                except Exception as e:  # a broken plot must not hide the run's outcome
                    rt.say(f"report failed: {e}")
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old_term)
        return code

    def _run(self) -> int:
        import ray

        from launch.cluster import reserve, start_ray
        from launch.procs import make_actor_class
        from launch.progress import ProgressBar

        rt, lc = self.rt, self.rt.lc
        rt.model = ensure_model(rt.cfg)
        rt.say(f"run folder {rt.run_dir}; model {rt.model}")
        n_cpu = int(lc.cpus_per_process * (lc.num_rollout_servers + lc.num_trainer_ranks) + 0.999)
        n_gpu = (
            lc.num_rollout_servers * lc.rollout_gpus_per_server
            + lc.num_trainer_ranks * lc.trainer_gpus_per_rank
        )
        rt.started_ray = start_ray(lc.ray_address, n_cpu, n_gpu)
        rt.token = rt.cfg.rollout.api_token or os.environ.get("ROLLOUT_API_TOKEN")
        if not rt.token and not rt.started_ray:
            rt.token = secrets.token_hex(24)
        rt.say(f"ray {'started locally' if rt.started_ray else 'joined at ' + str(lc.ray_address)}")
        rt.ray = ray
        rt.ProcessActor = make_actor_class()
        rt.reservation = reserve(lc, lc.cpus_per_process, lc.ready_timeout_s)

        self.trainers.ensure_actors()
        rt.model = self.trainers.warm_start(rt.model)
        self.servers.start()
        self._heldout("before")
        rt.bar = ProgressBar(rt.run_dir / "metrics.jsonl", rt.cfg.optim.max_steps, enabled=lc.progress)
        self.trainers.start(resume=rt.cfg.checkpoint.resume)
        rt.save_state("running")
        return self._supervise()

    # ---- supervision ----------------------------------------------------------------------------------------
    def _supervise(self) -> int:
        rt = self.rt
        while True:
            rt.tick()
            for i, reason in self.servers.dead():
                if not self.servers.restart(i, reason):
                    self.trainers.restart("must reconnect to a moved rollout server")
            codes = self.trainers.exit_codes()
            failed = [(r, c) for r, c in enumerate(codes) if c is not None and c != 0]
            if failed:
                r, c = failed[0]
                log = rt.log_dir / f"trainer-{r}.log"
                rt.say(f"trainer rank {r} failed ({c}); log tail:\n{tail(log)}")
                if c == 2:  # configuration or checkpoint refused: a restart would be refused the same way
                    raise RuntimeError(
                        f"trainer rank {r} refused its configuration or checkpoints (exit 2); see {log}"
                    )
                self.trainers.drop_lost(codes)
                self.trainers.restart(f"rank {r} exited ({c})")
                continue
            if codes and all(c == 0 for c in codes):
                rt.tick()
                rt.say("training finished")
                self._heldout("after")
                rt.save_state("finished")
                return 0
            time.sleep(POLL_S)

    # ---- held-out accuracy ----------------------------------------------------------------------------------
    def _heldout(self, when: str) -> None:
        """Greedy held-out accuracy of server 0 now (launch/heldout.py); "before" is measured once per run."""
        rt = self.rt
        if not rt.lc.heldout_eval:
            return
        from launch import heldout

        path = rt.run_dir / "heldout.json"
        if when == "before" and path.exists() and "before" in json.loads(path.read_text()):
            return  # a resumed run keeps the measurement of the starting model
        if self._heldout_rows is None:
            self._heldout_rows = heldout.heldout_rows(rt.cfg, rt.model)
        rows = self._heldout_rows
        m = heldout.measure(rt.state.servers[0].url, rt.token, rows, rt.cfg.eval.max_tokens, rt.cfg.run.seed)
        heldout.record(rt.run_dir, when, m)
        rt.say(
            f"held-out accuracy {when}: strict {m.get('greedy/pass@1_strict', float('nan')):.3f}, lenient "
            f"{m.get('greedy/pass@1_lenient', float('nan')):.3f} on {len(rows)} problems "
            f"(weight version {m['weight_version']}, {m['seconds']:.0f}s)"
        )

    # ---- shutdown -------------------------------------------------------------------------------------------
    def _cleanup(self) -> None:
        """Stop every child and actor we started; bounded in time, tolerant of a half-dead cluster."""
        rt = self.rt
        if rt.bar is not None:
            rt.bar.close()
            rt.bar = None
        ray = rt.ray
        if ray is not None and ray.is_initialized():
            groups = [self.trainers.actors, self.servers.actors]  # trainer first: it is the servers' client
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
                    rt.kill_actor(a)
            from launch.cluster import release

            release(rt.reservation)
            ray.shutdown()
        _sweep(rt.local_pids)
        self.servers.actors, self.trainers.actors = [], []
        if rt.state.status in ("running", "starting", "restarting_server", "restarting_trainer"):
            rt.save_state("stopped")


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
    from trainer.config import ConfigError, check_run_prerequisites, load_config

    try:
        cfg = load_config(config_path, overrides)
        check_run_prerequisites(cfg)
        if not cfg.checkpoint.resume:  # refuse before Ray, the warm start and servers are started
            ensure_no_checkpoints(cfg.checkpoint_dir)
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    code = Driver(cfg, config_path, overrides).run()
    sys.stdout.flush()
    return code
