"""The trainer ranks of a run: one ``python -m trainer`` per bundle as a DeepSpeed world, and the warm start.

Each rank runs in its own ``ProcessActor`` with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT
(rank 0's node and a port free there) and the server URLs and weight-sync address as config overrides; logs go
to RUN_DIR/logs/trainer-<rank>.log. A rank that dies takes the world down with it: ``restart`` stops every
rank and starts them again with ``checkpoint.resume=true`` (the trainer pushes the checkpoint's weights to the
servers first). The supervised warm start (trainer/sft.py) runs once per run folder in rank 0's actor.
"""

from __future__ import annotations

import json
import time

from launch.runtime import POLL_S, Runtime, tail


class TrainerWorld:
    def __init__(self, rt: Runtime):
        self.rt = rt
        self.actors: list = []

    def ensure_actors(self) -> None:
        rt, res = self.rt, self.rt.reservation
        while len(self.actors) < rt.lc.num_trainer_ranks:
            r = len(self.actors)
            log = rt.log_dir / f"trainer-{r}.log"
            self.actors.append(rt.new_actor(res.trainer_pg, r, res.trainer_bundle, f"trainer-{r}", log))

    def warm_start(self, model: str) -> str:
        """Run the supervised warm start (trainer/sft.py) in rank 0's actor; returns the model to train.

        Done once per run folder: a finished warm start (RUN_DIR/warm_start/warm_start.json) is reused, so a
        resumed or restarted run never repeats it. The trainer then gets ``warm_start.enabled=false``."""
        rt = self.rt
        ws = rt.cfg.warm_start
        if not ws.enabled:
            return model
        out = rt.run_dir / "warm_start"
        if (out / "warm_start.json").exists():
            rt.say(f"warm start: reusing {out}")
            return str(out)
        argv = ["python", "-m", "trainer.sft", "--config", rt.config_path, "--out", str(out), *rt.overrides]
        argv.append(f"model.name_or_path={model}")
        log = rt.log_dir / "warm_start.log"
        rt.say(f"warm start ({ws.source}) -> {out}; log {log}")
        t0 = time.monotonic()
        self.ensure_actors()
        actor = self.actors[0]
        rt.note_pid(rt.get(actor.start.remote(argv, rt.child_env(), rt.cwd, str(log))))
        while (rc := rt.get(actor.poll.remote())) is None:
            time.sleep(POLL_S)
        if rc != 0:
            raise RuntimeError(f"warm start failed (exit {rc}); {log}:\n{tail(log)}")
        rt.say(f"warm start done in {time.monotonic() - t0:.0f}s")
        return str(out)

    def start(self, resume: bool) -> None:
        rt = self.rt
        world = rt.lc.num_trainer_ranks
        self.ensure_actors()
        ips = rt.get([a.node_ip.remote() for a in self.actors])
        master = ips[0]
        master_port = rt.get(self.actors[0].pick_port.remote(None))
        sync_port = rt.get(self.actors[0].pick_port.remote(rt.cfg.rollout.sync_master_port))
        if sync_port == master_port:
            sync_port = rt.get(self.actors[0].pick_port.remote(None))
        rt.state.master_addr, rt.state.master_port, rt.state.sync_master_port = master, master_port, sync_port
        urls = json.dumps([s.url for s in rt.state.servers])
        argv = [
            "python",
            "-m",
            "trainer",
            "--config",
            rt.config_path,
            *rt.overrides,
            f"model.name_or_path={rt.model}",
            f"rollout.server_urls={urls}",
            f"rollout.sync_master_addr={master}",
            f"rollout.sync_master_port={sync_port}",
        ]
        if rt.cfg.warm_start.enabled:
            argv.append("warm_start.enabled=false")  # done once by warm_start; rt.model is its output
        if resume:
            argv.append("checkpoint.resume=true")
        per_node = {ip: ips.count(ip) for ip in ips}
        local_counts: dict[str, int] = {}
        pids = []
        for r, (actor, ip) in enumerate(zip(self.actors, ips, strict=True)):
            local_rank = local_counts.get(ip, 0)
            local_counts[ip] = local_rank + 1
            env = rt.child_env(
                {
                    "RANK": str(r),
                    "WORLD_SIZE": str(world),
                    "LOCAL_RANK": str(local_rank),
                    "LOCAL_WORLD_SIZE": str(per_node[ip]),
                    "MASTER_ADDR": master,
                    "MASTER_PORT": str(master_port),
                }
            )
            pids.append(rt.get(actor.start.remote(argv, env, rt.cwd)))
            rt.note_pid(pids[-1])
        rt.state.trainer_pids = pids
        rt.save_state()
        rt.say(
            f"trainer world of {world} started (MASTER {master}:{master_port}, pids {pids})"
            + (" resuming from the latest checkpoint" if resume else "")
        )

    def exit_codes(self) -> list[int | str | None]:
        """Per rank: None while running, its exit code, or "actor lost (...)" when its actor is gone."""
        codes: list[int | str | None] = []
        for actor in self.actors:
            try:
                codes.append(self.rt.get(actor.poll.remote(), timeout=30))
            except Exception as e:
                codes.append(f"actor lost ({type(e).__name__})")
        return codes

    def drop_lost(self, codes: list) -> None:
        """Forget (and kill) the actors ``exit_codes`` reported lost; ``ensure_actors`` replaces them."""
        for i in sorted((i for i, c in enumerate(codes) if isinstance(c, str)), reverse=True):
            self.rt.kill_actor(self.actors.pop(i))

    def stop(self) -> None:
        refs = [a.stop.remote(10.0) for a in self.actors]
        for a, ref in zip(list(self.actors), refs, strict=True):
            try:
                self.rt.get(ref, timeout=30)
            except Exception:
                self.rt.kill_actor(a)
                self.actors.remove(a)

    def restart(self, reason: str) -> None:
        rt = self.rt
        if rt.state.trainer_restarts >= rt.lc.max_trainer_restarts:
            raise RuntimeError(f"trainer {reason}; restarted {rt.state.trainer_restarts} times already")
        rt.state.trainer_restarts += 1
        rt.say(
            f"trainer {reason}: restarting the world from the latest checkpoint "
            f"({rt.state.trainer_restarts}/{rt.lc.max_trainer_restarts})"
        )
        rt.save_state("restarting_trainer")
        self.stop()
        self.start(resume=True)
        rt.save_state("running")
