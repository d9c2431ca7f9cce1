"""The rollout servers of a run: start one ``python -m rollout_server`` per bundle, wait for health, restart.

Each server runs in its own ``ProcessActor`` on a port that actor checked is free on its node
(``server_base_port + i`` when possible) and logs to RUN_DIR/logs/rollout-<i>.log. A server that died is
restarted on the same port when it can be; it comes back with the model as loaded (``weight_version`` 0, no
weight-transfer group), and the trainer notices that on its next health check and pushes its current weights.
When the URL had to change, ``restart`` says so and the driver restarts the trainer world to reconnect.
"""

from __future__ import annotations

import time

from launch.runtime import POLL_S, Runtime, ServerSlot, tail
from launch.serve import resolve_backend, server_argv


class ServerFleet:
    def __init__(self, rt: Runtime):
        self.rt = rt
        self.actors: list = []

    def _new_actor(self, i: int):
        res = self.rt.reservation
        return self.rt.new_actor(
            res.rollout_pg, i, res.rollout_bundle, f"rollout-{i}", self.rt.log_dir / f"rollout-{i}.log"
        )

    def start(self) -> None:
        rt, lc = self.rt, self.rt.lc
        backend = resolve_backend(lc.rollout_backend, lc.rollout_gpus_per_server)
        for i in range(lc.num_rollout_servers):
            actor = self._new_actor(i)
            self.actors.append(actor)
            # A private local cluster serves on loopback only; on a real cluster the node's address is needed
            # and the server then insists on an API token (the driver makes one per run if none is given).
            host = "127.0.0.1" if rt.started_ray else rt.get(actor.node_ip.remote())
            port = rt.get(actor.pick_port.remote(lc.server_base_port + i))
            argv = server_argv(rt.model, backend, host, port, list(lc.server_extra_args))
            slot = ServerSlot(index=i, url=f"http://{host}:{port}", host=host, port=port, argv=argv)
            rt.state.servers.append(slot)
            slot.pid = rt.get(actor.start.remote(argv, rt.child_env(), rt.cwd))
            rt.note_pid(slot.pid)
            rt.say(f"rollout server {i}: {slot.url} ({backend}, pid {slot.pid})")
        rt.save_state()
        for i in range(len(rt.state.servers)):
            self.wait_healthy(i)
            rt.say(f"rollout server {i} ready")

    def wait_healthy(self, i: int) -> None:
        import httpx

        rt = self.rt
        slot, actor = rt.state.servers[i], self.actors[i]
        headers = {"Authorization": f"Bearer {rt.token}"} if rt.token else {}
        deadline = time.monotonic() + rt.lc.ready_timeout_s
        while time.monotonic() < deadline:
            rc = rt.get(actor.poll.remote())
            if rc is not None:
                log = rt.log_dir / f"rollout-{i}.log"
                raise RuntimeError(
                    f"rollout server {i} exited with code {rc} while starting; {log}:\n{tail(log)}"
                )
            try:
                r = httpx.get(slot.url + "/health", timeout=5.0, headers=headers)
                if r.status_code == 200 and r.json().get("ready"):
                    return
            except (httpx.HTTPError, ValueError):
                pass
            rt.tick()
            time.sleep(POLL_S)
        raise RuntimeError(f"rollout server {i} not ready after {rt.lc.ready_timeout_s:.0f}s ({slot.url})")

    def dead(self) -> list[tuple[int, str]]:
        """(index, why) of every server whose process exited or whose actor is gone."""
        out = []
        for i, actor in enumerate(self.actors):
            try:
                rc = self.rt.get(actor.poll.remote(), timeout=30)
                if rc is not None:
                    out.append((i, f"exited with code {rc}"))
            except Exception as e:
                out.append((i, f"lost its actor ({type(e).__name__})"))
        return out

    def restart(self, i: int, reason: str) -> bool:
        """Bring server i back on the same URL; returns False when its URL had to change."""
        rt, lc = self.rt, self.rt.lc
        slot = rt.state.servers[i]
        if slot.restarts >= lc.max_server_restarts:
            raise RuntimeError(f"rollout server {i} {reason}; it was restarted {slot.restarts} times already")
        slot.restarts += 1
        rt.say(f"rollout server {i} {reason}: restarting ({slot.restarts}/{lc.max_server_restarts})")
        rt.save_state("restarting_server")
        actor = self.actors[i]
        same_url = True
        try:
            rt.get(actor.stop.remote(5.0))
        except Exception:  # the actor itself is gone: a fresh one in the same bundle
            rt.kill_actor(actor)
            actor = self.actors[i] = self._new_actor(i)
            if rt.get(actor.node_ip.remote()) != slot.host:
                same_url = False
        port = rt.get(actor.pick_port.remote(slot.port))
        if port != slot.port or not same_url:
            same_url = False
            slot.host = rt.get(actor.node_ip.remote())
            slot.port, slot.url = port, f"http://{slot.host}:{port}"
            backend = slot.argv[slot.argv.index("--backend") + 1]
            slot.argv = server_argv(rt.model, backend, slot.host, port, list(lc.server_extra_args))
        slot.pid = rt.get(actor.start.remote(slot.argv, rt.child_env(), rt.cwd))
        rt.note_pid(slot.pid)
        rt.save_state()
        self.wait_healthy(i)
        rt.say(f"rollout server {i} back at {slot.url} (pid {slot.pid}); the trainer re-syncs its weights")
        rt.save_state("running")
        return same_url
