"""Kill and resume: a run that dies after step 2 and is resumed continues exactly like an uninterrupted run.

Run A: 4 steps straight. Run B: the same config, exits hard right after step 3 (checkpoint at step 2), then
the rollout server is replaced by a FRESH one (initial weights, version 0), as after a whole-job restart,
and B resumes. Checked: steps 3-4 of B draw the same prompts as A's, and (same sampling seeds, restored
optimizer state) reach the same loss and gradient norm; before the first resumed step the new server serves
the checkpoint's weights (version 2, greedy output and log-probs of the checkpoint's HF export).
"""

from __future__ import annotations

import pytest
import torch

from tests.trainer_support import (
    free_port,
    greedy_with_logprobs,
    load_hf,
    read_jsonl,
    read_log,
    rollout_server,
    start_trainer,
    wait_all,
)

pytestmark = pytest.mark.slow


def _overrides(tiny_model_dir, out, name, url, extra=()):
    return [
        f"model.name_or_path={tiny_model_dir}",
        f"run.output_dir={out}",
        f"run.name={name}",
        f"rollout.server_urls=[{url}]",
        f"rollout.sync_master_port={free_port()}",
        "optim.max_steps=4",
        "optim.lr=1e-2",
        "checkpoint.every_steps=2",
        'custom_rewards={"tests.trainer_support:digit_fraction": 1.0}',
        "debug.probe_after_sync=true",
        "logging.tensorboard=false",
        *extra,
    ]


def _run(tiny_model_dir, out, url, name, tag, extra=()):
    procs = start_trainer(
        1, "configs/cpu-tiny-test.yaml", _overrides(tiny_model_dir, out, name, url, extra), out, tag
    )
    return wait_all(procs, timeout_s=180)[0]


def test_kill_and_resume_matches_uninterrupted_run(tiny_model_dir, tmp_path):
    with rollout_server(tiny_model_dir, tmp_path / "server-1.log") as (url, _):
        assert _run(tiny_model_dir, tmp_path, url, "a", "a") == 0, read_log(tmp_path, "a")
        # Checkpoint at step 2, crash after step 3: step 3 is lost and must run again after the resume.
        code = _run(tiny_model_dir, tmp_path, url, "b", "b1", ["debug.crash_after_step=3"])
        assert code == 3, read_log(tmp_path, "b1")
    ck = tmp_path / "b" / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step-000002"
    with rollout_server(tiny_model_dir, tmp_path / "server-2.log") as (url, _):  # fresh: initial weights
        assert _run(tiny_model_dir, tmp_path, url, "b", "b2", ["checkpoint.resume=true"]) == 0, read_log(
            tmp_path, "b2"
        )

    a = {m["step"]: m for m in read_jsonl(tmp_path / "a" / "metrics.jsonl")}
    b_rows = read_jsonl(tmp_path / "b" / "metrics.jsonl")
    assert [m["step"] for m in b_rows] == [1, 2, 3, 4]  # each step once, though the first process ran 1-2
    b = {m["step"]: m for m in b_rows}
    assert sorted(a) == [1, 2, 3, 4]
    for s in (1, 2, 3, 4):
        assert b[s]["data/prompts_digest"] == a[s]["data/prompts_digest"], f"step {s} drew other prompts"
        assert (b[s]["data/epoch"], b[s]["data/index"]) == (a[s]["data/epoch"], a[s]["data/index"])
    for s in (3, 4):
        assert b[s]["loss"] == pytest.approx(a[s]["loss"], rel=1e-4, abs=1e-9), s
        assert b[s]["grad_norm"] == pytest.approx(a[s]["grad_norm"], rel=1e-4), s

    # Probes of run B: pushes 0-3 by the first process; then 2 (the resume push), 3, 4 by the second.
    probes = read_jsonl(tmp_path / "b" / "debug" / "probes.jsonl")
    assert [p["pushed_version"] for p in probes] == [0, 1, 2, 3, 2, 3, 4]
    resumed = probes[4]
    assert resumed["server_version"] == 2
    tokens, logprobs = greedy_with_logprobs(load_hf(ck / "step-000002" / "hf"), resumed["prompt_ids"], 8)
    assert tokens[: len(resumed["token_ids"])] == resumed["token_ids"]
    assert torch.allclose(
        torch.tensor(logprobs[: len(resumed["logprobs"])]), torch.tensor(resumed["logprobs"]), atol=1e-4
    )
    # ... and those are not the initial weights' outputs (the fresh server started from them).
    _, init_lp = greedy_with_logprobs(load_hf(tiny_model_dir), resumed["prompt_ids"], 8)
    assert not torch.allclose(
        torch.tensor(init_lp[: len(resumed["logprobs"])]), torch.tensor(resumed["logprobs"]), atol=1e-3
    )


def test_resume_skips_a_damaged_checkpoint_and_never_starts_over(tiny_model_dir, tmp_path):
    """The run-destroying bug: with `latest` emptied (or the newest checkpoint damaged), resume used to log
    "starting fresh", train from step 0 and prune the intact older checkpoints away. Now it resumes from
    the newest checkpoint that verifies, keeps the damaged one aside, and refuses when nothing verifies."""
    ck = tmp_path / "c" / "checkpoints"
    every = ["checkpoint.every_steps=1", "checkpoint.keep_last=3", "checkpoint.export_hf=false"]
    with rollout_server(tiny_model_dir, tmp_path / "server.log") as (url, _):
        assert _run(tiny_model_dir, tmp_path, url, "c", "c1", every) == 0, read_log(tmp_path, "c1")
        assert sorted(p.name for p in ck.glob("step-*")) == ["step-000002", "step-000003", "step-000004"]

        # Damage the newest checkpoint (a truncated optimizer shard) and empty the `latest` marker.
        shard = max((ck / "step-000004" / "deepspeed").rglob("*optim*"), key=lambda p: p.stat().st_size)
        shard.write_bytes(shard.read_bytes()[:100])
        (ck / "latest").write_text("")
        resume = [*every, "checkpoint.resume=true", "optim.max_steps=5"]
        assert _run(tiny_model_dir, tmp_path, url, "c", "c2", resume) == 0, read_log(tmp_path, "c2")
        log = read_log(tmp_path, "c2")
        assert "step-000004 is unusable" in log and "resumed from" in log and "step-000003" in log
        steps = [m["step"] for m in read_jsonl(tmp_path / "c" / "metrics.jsonl")]
        assert steps == [1, 2, 3, 4, 5]  # steps 4-5 trained again from step 3; never 1, 2, ... again
        assert (ck / "damaged-step-000004" / "DAMAGED.txt").exists()  # kept for inspection, not deleted
        assert sorted(p.name for p in ck.glob("step-*")) == ["step-000003", "step-000004", "step-000005"]

        # Nothing verifies: a clear refusal (exit 2) naming every checkpoint, and nothing is deleted.
        for p in ck.glob("step-*"):
            (p / "MANIFEST.json").unlink()
        before = sorted(p.name for p in ck.iterdir())
        assert _run(tiny_model_dir, tmp_path, url, "c", "c3", resume) == 2
        log = read_log(tmp_path, "c3")
        assert "none of the 3 checkpoint(s)" in log and "no MANIFEST.json" in log
        assert sorted(p.name for p in ck.iterdir()) == before

        # A fresh run (resume=false) into a folder that holds checkpoints is refused too.
        assert _run(tiny_model_dir, tmp_path, url, "c", "c4", every) == 2
        assert "checkpoint.resume=true" in read_log(tmp_path, "c4")
        assert sorted(p.name for p in ck.iterdir()) == before
