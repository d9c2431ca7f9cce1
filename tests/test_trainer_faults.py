"""Faults: a reward that raises, a rollout server that goes away mid-run, a server that is never there.

(A NaN loss on one rank is in test_trainer_e2e.py: the step is skipped on every rank.)
Documented behaviour:
- a raising reward scores 0 for every completion, is counted in ``reward_failures/<name>`` and the run goes on;
- a server that stops answering is retried with backoff (``rollout.retries``, ``rollout.backoff_s``) and
  waited for (``rollout.ready_timeout_s``); if it does not come back every rank stops with exit status 1 and
  a message naming the server and the failure; if it comes back (restarted at the same URL) it gets the
  current weights again and the run goes on;
- servers not ready within ``rollout.ready_timeout_s`` at start: exit status 1, message says so.
"""

from __future__ import annotations

import time

import pytest

from tests.trainer_support import (
    free_port,
    greedy_with_logprobs,
    kill_group,
    load_hf,
    read_jsonl,
    read_log,
    rollout_server,
    run_overrides,
    start_trainer,
    wait_all,
)

pytestmark = pytest.mark.slow


def _overrides(tiny_model_dir, out, url, extra=()):
    fail_fast = [
        "rollout.retries=2",
        "rollout.backoff_s=0.2",
        "rollout.request_timeout_s=10",
        "rollout.sync_timeout_s=10",
    ]
    return run_overrides(tiny_model_dir, out, "faults", url, *fail_fast, *extra)


def test_raising_reward_is_counted_and_dead_server_stops_the_run(tiny_model_dir, tmp_path):
    metrics_path = tmp_path / "faults" / "metrics.jsonl"
    with rollout_server(tiny_model_dir, tmp_path / "server.log") as (url, server):
        extra = [
            "rollout.ready_timeout_s=5",  # how long a vanished server is waited for before the run stops
            "optim.max_steps=500",
            "debug.raising_reward=true",
            "checkpoint.every_steps=0",
            "checkpoint.save_final=false",
        ]
        procs = start_trainer(
            1, "configs/cpu-tiny-test.yaml", _overrides(tiny_model_dir, tmp_path, url, extra), tmp_path
        )
        try:
            deadline = time.monotonic() + 120
            while not (metrics_path.exists() and len(read_jsonl(metrics_path)) >= 2):
                assert procs[0].poll() is None, read_log(tmp_path)
                assert time.monotonic() < deadline, "trainer made no progress"
                time.sleep(0.2)
            kill_group(server)  # the server goes away mid-run
            t_kill = time.monotonic()
            codes = wait_all(procs, timeout_s=90)
            stopped_after = time.monotonic() - t_kill
        finally:
            for p in procs:
                kill_group(p)
    log = read_log(tmp_path)
    assert codes == [1], log
    assert "error: training stopped:" in log
    assert "127.0.0.1" in log.split("error: training stopped:")[1]  # the message names the server
    assert stopped_after < 60
    metrics = read_jsonl(metrics_path)
    n = metrics[0]["num_completions"]
    for m in metrics:
        assert m["reward_failures/debug_raise"] == n  # every completion of every step failed that reward
        assert m["reward/debug_raise/mean"] == 0.0
        assert m["step_applied"] == 1  # and training went on
    assert metrics[-1]["reward_failures/cumulative"] == n * len(metrics)


def test_unreachable_server_at_start_is_a_clear_error(tiny_model_dir, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    extra = ["optim.max_steps=2", "rollout.ready_timeout_s=3", "deepspeed.zero_stage=2"]
    procs = start_trainer(
        1, "configs/cpu-tiny-test.yaml", _overrides(tiny_model_dir, tmp_path, url, extra), tmp_path
    )
    codes = wait_all(procs, timeout_s=120)
    log = read_log(tmp_path)
    assert codes == [1], log
    assert "not ready within" in log and url in log


@pytest.mark.parametrize("off_policy", [0, 1], ids=["on-policy", "one-step-off-policy"])
def test_server_restarted_at_same_url_gets_the_current_weights_again(tiny_model_dir, tmp_path, off_policy):
    """What the Ray launcher relies on: it restarts a dead server at the same URL; the trainer waits for it
    (retries + ready wait), re-opens the sync group, pushes its current weights and carries on. With one-step
    off-policy the rollout thread may be mid-request or the push mid-transfer when the server dies."""
    import contextlib

    from tests.trainer_support import free_port as _free

    metrics_path = tmp_path / "faults" / "metrics.jsonl"
    port = _free()
    url = f"http://127.0.0.1:{port}"
    extra = [
        "deepspeed.zero_stage=2",  # (the other tests run ZeRO-3; this one also covers ZeRO-2 checkpoints)
        "optim.max_steps=6",
        "rollout.retries=20",
        "rollout.backoff_s=0.5",
        "rollout.ready_timeout_s=60",
        "debug.probe_after_sync=true",
        "checkpoint.every_steps=3",
        f"rollout.max_off_policy_steps={off_policy}",
        f"objective.importance_sampling_cap={3.0 if off_policy else 'null'}",
    ]
    with contextlib.ExitStack() as stack:
        _, server = stack.enter_context(rollout_server(tiny_model_dir, tmp_path / "server-1.log", port=port))
        procs = start_trainer(
            1, "configs/cpu-tiny-test.yaml", _overrides(tiny_model_dir, tmp_path, url, extra), tmp_path
        )
        stack.callback(lambda: [kill_group(p) for p in procs])
        deadline = time.monotonic() + 120
        while not (metrics_path.exists() and len(read_jsonl(metrics_path)) >= 2):
            assert procs[0].poll() is None, read_log(tmp_path)
            assert time.monotonic() < deadline, "trainer made no progress"
            time.sleep(0.2)
        kill_group(server)
        stack.enter_context(rollout_server(tiny_model_dir, tmp_path / "server-2.log", port=port))
        codes = wait_all(procs, timeout_s=150)
    assert codes == [0], read_log(tmp_path)
    metrics = read_jsonl(metrics_path)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    probes = read_jsonl(tmp_path / "faults" / "debug" / "probes.jsonl")
    # The kill lands at a moment the test does not control (mid-request, mid-push or between a push and its
    # probe). Only in the last case may a probe disagree with its push: the restarted server then holds its
    # initial weights (v0), and the next push must put the current ones back. So: at most one probe, showing
    # v0, disagrees, and every probe after it agrees.
    stale = [i for i, p in enumerate(probes) if p["server_version"] != p["pushed_version"]]
    assert len(stale) <= 1, probes
    for i in stale:
        assert probes[i]["server_version"] == 0 and i < len(probes) - 1, probes
    assert [p["pushed_version"] for p in probes] == [0, 1, 2, 3, 4, 5, 6]  # (0: the push at start)
    # Every completion after the restart was made by the weights the setting allows (the latest ones
    # on-policy, at most one step older off-policy), never the restarted server's initial ones.
    for m in metrics:
        assert m["step"] - 1 - off_policy <= m["weight_version/min"] <= m["step"] - 1, m
        assert m["weight_version/lag"] <= off_policy
    # The ZeRO-2 HF export is the model the servers were given last.
    last = probes[-1]
    model = load_hf(tmp_path / "faults" / "checkpoints" / "step-000006" / "hf")
    tokens, _ = greedy_with_logprobs(model, last["prompt_ids"], len(last["token_ids"]))
    assert last["pushed_version"] == 6 and tokens == last["token_ids"]
