"""Kill and resume: a run that dies after step 2 and is resumed continues exactly like an uninterrupted run.

Run A: 4 steps straight. Run B: the same config, exits hard right after step 3 (checkpoint at step 2), then
the rollout server is replaced by a FRESH one (initial weights, version 0), as after a whole-job restart,
and B resumes. Checked: steps 3-4 of B draw the same prompts as A's, and (same sampling seeds, restored
optimizer state) reach the same loss and gradient norm; before the first resumed step the new server serves
the checkpoint's weights (version 2, greedy output and log-probs of the checkpoint's HF export).
"""

from __future__ import annotations

import time

import pytest
import torch

from tests.trainer_support import (
    DIGITS,
    SHORT_RUN,
    full_log,
    greedy_with_logprobs,
    kill_group,
    load_hf,
    read_jsonl,
    read_log,
    rollout_server,
    run_overrides,
    run_short,
    start_trainer,
    wait_all,
)

pytestmark = pytest.mark.slow


def _overrides(model_dir, out, name, url, extra=()):
    return run_overrides(model_dir, out, name, url, *SHORT_RUN, DIGITS, *extra)


def _run(tiny_model_dir, out, url, name, tag, extra=()):
    return run_short(tiny_model_dir, out, url, name, tag, [DIGITS, *extra], timeout_s=180)


@pytest.mark.faults
def test_kill_and_resume_matches_uninterrupted_run(tiny_model_dir, tmp_path, fault_report):
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
    fault_report(
        "trainer exits hard after step 3 (checkpoint at 2), resumed against a fresh server",
        "crash exit 3; resume exits 0; steps 1-4 once; steps 3-4 match the uninterrupted run",
        f"crash exit {code}; resume exit 0; steps {[m['step'] for m in b_rows]}; |loss A - B| at steps 3, 4: "
        + ", ".join(f"{abs(b[s]['loss'] - a[s]['loss']):.1e}" if s in a and s in b else "-" for s in (3, 4)),
    )
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


@pytest.mark.faults
def test_resume_skips_a_damaged_checkpoint_and_never_starts_over(tiny_model_dir, tmp_path, fault_report):
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
        log = (tmp_path / "c2-rank0.log").read_text()  # whole log: the warning comes first
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
        log = (tmp_path / "c3-rank0.log").read_text()
        assert "none of the 3 checkpoint(s)" in log and "no MANIFEST.json" in log
        assert sorted(p.name for p in ck.iterdir()) == before

        # A fresh run (resume=false) into a folder that holds checkpoints is refused too.
        assert _run(tiny_model_dir, tmp_path, url, "c", "c4", every) == 2
        assert "checkpoint.resume=true" in read_log(tmp_path, "c4")
        fault_report(
            "newest checkpoint truncated + `latest` emptied; then no checkpoint verifies; then a fresh run",
            "resume from step 3, damaged one set aside; then exit 2 twice, nothing deleted",
            f"resumed from step-000003, steps {steps}, damaged-step-000004 kept; no verified checkpoint -> "
            f"exit 2; fresh run over checkpoints -> exit 2; {len(before)} entries unchanged",
        )
        assert sorted(p.name for p in ck.iterdir()) == before


@pytest.mark.faults
def test_a_death_before_the_first_checkpoint_restarts_the_logs_too(tiny_model_dir, tmp_path, fault_report):
    """A trainer that dies before its first checkpoint (the recipe checkpoints every 100 steps) and is
    restarted with ``checkpoint.resume=true``, as the launcher does, trains from step 1 again. Its logs used to
    keep the dead attempt's rows, so metrics.jsonl read steps 1, 2, 1, 2, 3, 4. Now the old rows go. A fresh
    run (resume=false) in a folder whose earlier run left rows but no checkpoint keeps them, moved aside."""
    first_ck = ["checkpoint.every_steps=3", "debug.crash_after_step=2"]
    with rollout_server(tiny_model_dir, tmp_path / "server.log") as (url, _):
        for name in ("r", "f"):
            assert _run(tiny_model_dir, tmp_path, url, name, f"{name}1", first_ck) == 3, read_log(
                tmp_path, f"{name}1"
            )
            assert not (tmp_path / name / "checkpoints" / "latest").exists()
        again = ["checkpoint.every_steps=3", "checkpoint.resume=true"]
        assert _run(tiny_model_dir, tmp_path, url, "r", "r2", again) == 0, read_log(tmp_path, "r2")
        assert _run(tiny_model_dir, tmp_path, url, "f", "f2", ["checkpoint.every_steps=3"]) == 0, read_log(
            tmp_path, "f2"
        )
    steps = [m["step"] for m in read_jsonl(tmp_path / "r" / "metrics.jsonl")]
    sampled = sorted({c["step"] for c in read_jsonl(tmp_path / "r" / "completions.jsonl")})
    fault_report(
        "trainer exits hard after step 2, before its first checkpoint (step 3); restarted with resume=true",
        "starts at step 1 again; metrics.jsonl holds steps 1-4 once",
        f"metrics.jsonl steps {steps}",
    )
    assert steps == [1, 2, 3, 4]
    assert sampled == sorted(set(sampled)) and all(1 <= s <= 4 for s in sampled)
    assert "no checkpoint to resume from" in full_log(tmp_path, "r2")

    assert [m["step"] for m in read_jsonl(tmp_path / "f" / "metrics.jsonl")] == [1, 2, 3, 4]
    aside = list((tmp_path / "f").glob("metrics.before-*.jsonl"))
    assert len(aside) == 1 and [m["step"] for m in read_jsonl(aside[0])] == [1, 2]
    assert "moved to metrics.before-" in full_log(tmp_path, "f2")


def _bytes_in(folder) -> int:
    try:
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    except OSError:  # renamed or removed while walking it
        return 0


@pytest.mark.faults
def test_sigkill_during_a_checkpoint_save_leaves_the_previous_one_resumable(tmp_path, fault_report):
    """SIGKILL of the trainer's process group while it writes a checkpoint (`.tmp-step-N` exists): the
    previous checkpoint still verifies and is the one chosen, and a resumed run finishes with each step once.

    The model is larger than the tiny one (4.2M parameters, ~70 MB per checkpoint with optimizer state) so a
    save takes long enough to be caught by polling the checkpoint folder (~0.3 s a save here; the kill lands
    while the optimizer shard is being written); nothing in the trainer is patched."""
    from trainer import checkpoint as ckpt
    from trainer.tiny_model import build_tiny_model

    model_dir = build_tiny_model(
        tmp_path / "model", seed=0, hidden_size=256, num_layers=4, intermediate_size=1024
    )
    root = tmp_path / "k" / "checkpoints"
    extra = [
        "optim.max_steps=5",
        "checkpoint.every_steps=1",
        "checkpoint.keep_last=2",
        "debug.probe_after_sync=false",
    ]
    with rollout_server(model_dir, tmp_path / "server.log") as (url, _):
        procs = start_trainer(
            1, "configs/cpu-tiny-test.yaml", _overrides(model_dir, tmp_path, "k", url, extra), tmp_path, "k1"
        )
        proc = procs[0]
        victim = None  # the .tmp-step-N folder being written when the kill landed
        try:
            deadline = time.monotonic() + 300
            while victim is None and time.monotonic() < deadline and proc.poll() is None:
                for tmp in root.glob(".tmp-step-*"):
                    # N >= 2, so an earlier checkpoint exists; 4 MiB written: inside the optimizer shard
                    # (~50 MB of the ~64 MB, written in ~0.1 s; hashing and fsync follow before the rename)
                    if int(tmp.name.rsplit("-", 1)[1]) >= 2 and _bytes_in(tmp) >= 4 << 20:
                        kill_group(proc)  # SIGKILL to the whole process group
                        victim = tmp
                        break
                time.sleep(0.005)
        finally:
            kill_group(proc)
        if victim is None:
            if proc.returncode not in (None, 0, -9):
                pytest.fail(
                    f"trainer exited {proc.returncode} before any save was caught:\n{read_log(tmp_path, 'k1')}"
                )
            pytest.skip(
                "no .tmp-step-N folder (N >= 2) holding >= 4 MiB was ever seen: saves too quick to catch here"
            )
        if not victim.exists():
            pytest.skip(f"{victim.name} was renamed before the kill landed: the save was not interrupted")
        step = int(victim.name.rsplit("-", 1)[1])
        partial = [p for p in victim.rglob("*") if p.is_file()]
        partial_mib = sum(p.stat().st_size for p in partial) / 2**20
        manifest_written = (victim / ckpt.MANIFEST).exists()
        metrics_before = [m["step"] for m in read_jsonl(tmp_path / "k" / "metrics.jsonl")]

        path, skipped = ckpt.select_resume_checkpoint(root)
        problem = ckpt.verify_checkpoint(path) if path is not None else "no checkpoint selected"
        resumed_code = None
        steps: list[int] = []
        if path is not None and path.name == ckpt.step_dir_name(step - 1) and problem is None:
            resume = [*extra, "checkpoint.resume=true"]
            procs = start_trainer(
                1,
                "configs/cpu-tiny-test.yaml",
                _overrides(model_dir, tmp_path, "k", url, resume),
                tmp_path,
                "k2",
            )
            resumed_code = wait_all(procs, timeout_s=400)[0]
            steps = [m["step"] for m in read_jsonl(tmp_path / "k" / "metrics.jsonl")]
    fault_report(
        f"SIGKILL of the trainer while saving checkpoint step {step}",
        f"step-{step - 1:06d} verifies and is chosen; resume exits 0; steps 1-5 once; no .tmp left",
        f"killed with {len(partial)} files ({partial_mib:.1f} MiB) in {victim.name}"
        f"{', MANIFEST written' if manifest_written else ''}; metrics had {metrics_before}; chosen "
        f"{path.name if path else None} ({problem or 'verified'}); resume exit {resumed_code}, steps {steps}",
    )
    assert path == root / ckpt.step_dir_name(step - 1) and skipped == [], (path, skipped)
    assert problem is None, problem
    assert resumed_code == 0, read_log(tmp_path, "k2")
    log = (tmp_path / "k2-rank0.log").read_text()
    assert "resumed from" in log and ckpt.step_dir_name(step - 1) in log
    assert steps == [1, 2, 3, 4, 5]  # the steps after the checkpoint ran again and were logged once
    assert list(root.glob(".tmp-step-*")) == []  # the partial save was cleaned up at the next start
    assert ckpt.verify_checkpoint(root / ckpt.step_dir_name(5)) is None
