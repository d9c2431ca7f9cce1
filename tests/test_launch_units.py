"""Fast tests of the launcher's parts that need no cluster: the metrics follower, the report, the supervised
subprocess (process-group stop, parent-death signal) and the server command line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from launch.procs import Supervised, pick_port, port_is_free
from launch.progress import JsonlTail, ProgressBar
from launch.report import load_rows, reward_series, write_report
from launch.serve import resolve_backend, server_argv


def _wait_gone(pid: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def test_follower_reads_increments_and_waits_for_torn_lines(tmp_path: Path):
    path = tmp_path / "metrics.jsonl"
    f = JsonlTail(path)
    assert f.refresh() == []  # no file yet
    path.write_text('{"step": 1, "reward": 0.5}\n{"step": 2, "rew')
    assert [r["step"] for r in f.refresh()] == [1]
    with path.open("a") as fh:
        fh.write('ard": 0.7}\nnot json\n')
    rows = f.refresh()
    assert rows == [{"step": 2, "reward": 0.7}]
    assert [r["step"] for r in f.rows] == [1, 2]
    path.write_text('{"step": 1, "reward": 0.5}\n')  # a resumed trainer truncated the file
    assert [r["step"] for r in f.refresh()] == [1]
    with path.open("a") as fh:
        fh.write('{"step": 2, "reward": 0.9}\n')
    assert f.refresh() == [{"step": 2, "reward": 0.9}] and [r["step"] for r in f.rows] == [1, 2]
    # Replaced by a new file that is already longer than what was read (the trainer rewrites it with
    # os.replace): the size alone cannot tell, the new inode does.
    tmp = tmp_path / "metrics.jsonl.tmp"
    tmp.write_text("".join(json.dumps({"step": s, "reward": 0.0, "pad": "x" * 40}) + "\n" for s in (1, 2, 3)))
    os.replace(tmp, path)
    assert [r["step"] for r in f.refresh()] == [1, 2, 3] and [r["step"] for r in f.rows] == [1, 2, 3]


def test_progress_bar_tracks_steps_and_resume(tmp_path: Path):
    path = tmp_path / "metrics.jsonl"
    bar = ProgressBar(path, total_steps=10, enabled=True)
    path.write_text("".join(json.dumps({"step": s, "reward": s / 10}) + "\n" for s in (1, 2, 3)))
    bar.update()
    assert bar.last_step == 3 and bar._bar.n == 3
    with path.open("a") as fh:  # a resumed trainer repeats step 3 onwards from checkpoint step 2
        fh.write(json.dumps({"step": 3, "reward": 0.3}) + "\n")
    bar.update()
    assert bar._bar.n == 3
    bar.close()


def test_report_writes_plots_and_table(tmp_path: Path):
    rows = []
    for s in range(1, 21):  # the trainer's key names (trainer/rollout_side.py, trainer/loop.py)
        rows.append(
            {
                "step": s,
                "reward/total/mean": 1.0 + s * 0.1,
                "reward/correctness/mean": s / 20,
                "reward/correctness/std": 0.1,
                "reward/strict_format/mean": 0.5,
                "accuracy": s / 20,
                "completion_length/mean": 30 - s * 0.5,
                "tokens_per_s": 100.0,
                "truncated/frac": 0.5 - s * 0.02,
                "time/step": 2.0 + s * 0.01,
                "time/generate": 1.0,
                "time/wait_rollout": 0.0,
                "time/train": 1.5,
                "time/sync": 0.1,
            }
        )
    rows.append(
        {"step": 20, "reward/total/mean": 3.0, "reward/correctness/mean": 1.0}
    )  # a resumed repeat wins
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(load_rows(tmp_path)) == 20
    series = reward_series(load_rows(tmp_path))
    assert set(series) == {"correctness", "strict_format", "total"}
    (tmp_path / "heldout.json").write_text(
        json.dumps(
            {
                "before": {"weight_version": 0, "greedy/pass@1_strict": 0.25, "num_problems": 200},
                "after": {"weight_version": 20, "greedy/pass@1_strict": 0.5, "num_problems": 200},
            }
        )
    )
    md = write_report(tmp_path)
    text = md.read_text()
    # first, last, best, then the means of the first and last two steps (10% of 20)
    assert "| reward: correctness | 0.05 (step 1) | 1 (step 20) | 1 (step 20) | 0.075 | 0.975 |" in text
    assert "Change (strict): +25.0 points on 200 problems." in text
    assert "| truncated fraction | 0.48 (step 1) | 0.12 (step 19) | 0.12 (step 19) |" in text
    assert "| seconds: wait for rollouts (trainer idle) | 0 (step 1) |" in text
    for png in ("rewards.png", "accuracy.png", "completion_length.png", "truncation.png", "step_time.png"):
        data = (tmp_path / "report" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000, png


def test_report_of_empty_run(tmp_path: Path):
    md = write_report(tmp_path)
    assert "No metrics yet" in md.read_text()


def test_supervised_stop_kills_the_whole_process_group(tmp_path: Path):
    sup = Supervised("t", str(tmp_path / "logs" / "t.log"))
    # The child spawns a grandchild that ignores SIGTERM: stop() must still leave nothing behind.
    code = (
        "import subprocess, sys, time;"
        "p = subprocess.Popen([sys.executable, '-c', "
        "'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(\"gc\", flush=True); time.sleep(60)']);"
        "print('grandchild', p.pid, flush=True); time.sleep(60)"
    )
    pid = sup.start(["python", "-c", code])
    log = tmp_path / "logs" / "t.log"
    deadline = time.monotonic() + 20

    def lines() -> list[str]:  # the log's header line repeats the command, so match whole lines only
        return log.read_text().splitlines()

    while "gc" not in lines() and time.monotonic() < deadline:
        time.sleep(0.1)
    gpid = int(next(ln for ln in lines() if ln.startswith("grandchild ")).split()[1])
    assert sup.running() and sup.poll() is None
    rc = sup.stop(timeout_s=2)
    assert rc == -signal.SIGTERM
    assert _wait_gone(pid) and _wait_gone(gpid), "child or grandchild survived stop()"
    assert "start #1" in log.read_text()


def test_child_dies_with_its_supervisor(tmp_path: Path):
    """The parent-death signal: a SIGKILLed actor process cannot leave its child running."""
    repo, log = str(Path(__file__).resolve().parents[1]), str(tmp_path / "x.log")
    script = (
        f"import sys, time; sys.path.insert(0, {repo!r});"
        "from launch.procs import Supervised;"
        f"s = Supervised('x', {log!r}); print(s.start(['python', '-c', 'import time; time.sleep(60)']), flush=True);"
        "time.sleep(60)"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        assert psutil.pid_exists(child)
        parent.kill()
        parent.wait(timeout=10)
        assert _wait_gone(child), "the child outlived its supervisor"
    finally:
        parent.kill()


def test_ports_and_server_command():
    port = pick_port(None)
    assert 1024 <= port <= 65535 and port_is_free(port)
    import importlib.util

    auto = "vllm" if importlib.util.find_spec("vllm") is not None else "torch"  # wherever vLLM is installed
    assert resolve_backend("auto", 0) == auto and resolve_backend("auto", 2) == auto
    assert resolve_backend("torch", 1) == "torch"
    argv = server_argv("/m", "torch", "127.0.0.1", port, ["--max-model-len", "512"])
    assert argv[:3] == ["python", "-m", "rollout_server"]
    assert argv[argv.index("--port") + 1] == str(port) and argv[-2:] == ["--max-model-len", "512"]
    # The rollout server's own parser accepts what we build (no server is started).
    from rollout_server.__main__ import build_parser

    ns = build_parser().parse_args(argv[3:])
    assert ns.model == "/m" and ns.backend == "torch" and ns.port == port and ns.max_model_len == 512


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="POSIX only")
def test_pick_port_prefers_the_requested_port_when_free():
    free = pick_port(None)
    assert pick_port(free) == free
