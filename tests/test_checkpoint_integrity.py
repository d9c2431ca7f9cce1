"""Checkpoint integrity without DeepSpeed: the manifest, verification, choosing what to resume, pruning,
refusing to start over existing checkpoints, and a full disk named as such.

The end-to-end versions (a real trainer resuming past a damaged checkpoint) are in test_trainer_resume.py.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from trainer import checkpoint as ckpt


def _fake_checkpoint(root: Path, step: int, manifest: bool = True) -> Path:
    d = root / ckpt.step_dir_name(step)
    (d / "deepspeed").mkdir(parents=True)
    (d / "deepspeed" / "optim_states.pt").write_bytes(bytes(range(256)) * 40)
    (d / "rng").mkdir()
    (d / "rng" / "rank-00000.pt").write_bytes(b"rng" * 10)
    (d / "trainer_state.json").write_text(json.dumps({"step": step}))
    if manifest:
        ckpt.write_manifest(d)
    return d


@pytest.mark.faults
def test_manifest_verifies_and_names_each_kind_of_damage(tmp_path, fault_report):
    d = _fake_checkpoint(tmp_path, 1)
    assert ckpt.verify_checkpoint(d) is None
    files = json.loads((d / ckpt.MANIFEST).read_text())["files"]
    assert set(files) == {"deepspeed/optim_states.pt", "rng/rank-00000.pt", "trainer_state.json"}

    opt = d / "deepspeed" / "optim_states.pt"
    data = opt.read_bytes()
    opt.write_bytes(data[:100])  # truncated
    assert "deepspeed/optim_states.pt is 100 bytes" in ckpt.verify_checkpoint(d)
    opt.write_bytes(bytes(len(data)))  # same size, other bytes
    assert ckpt.verify_checkpoint(d, checksums=False) is None  # sizes alone cannot see it...
    assert "SHA-256" in ckpt.verify_checkpoint(d)  # ...the checksums do
    opt.unlink()
    assert "deepspeed/optim_states.pt is missing" in ckpt.verify_checkpoint(d)
    (d / ckpt.MANIFEST).write_text('{"files": ')
    assert "unreadable" in ckpt.verify_checkpoint(d)
    (d / ckpt.MANIFEST).unlink()
    fault_report(
        "checkpoint damaged: truncated, rewritten, missing file, bad or missing manifest",
        "verify_checkpoint names each kind of damage",
        f"truncated, same-size rewrite, missing file, unreadable manifest each named (asserted above); "
        f"missing manifest -> {ckpt.verify_checkpoint(d)!r}",
    )
    assert "no MANIFEST.json" in ckpt.verify_checkpoint(d)


@pytest.mark.faults
def test_resume_picks_newest_verified_checkpoint_whatever_latest_says(tmp_path, fault_report):
    for s in (2, 4, 6):
        _fake_checkpoint(tmp_path, s)
    (tmp_path / ckpt.LATEST).write_text("")  # emptied marker: the bug that restarted runs from step 0
    path, skipped = ckpt.select_resume_checkpoint(tmp_path)
    assert path == tmp_path / "step-000006" and skipped == []

    (tmp_path / "step-000006" / "trainer_state.json").write_text('{"st')  # truncated
    _fake_checkpoint(tmp_path, 8, manifest=False)  # a save that never finished
    path, skipped = ckpt.select_resume_checkpoint(tmp_path)
    fault_report(
        "`latest` emptied, step 6 truncated, step 8 without manifest",
        "resume picks step-000004, skips 8 and 6",
        f"picked {path.name}, skipped {[p.name for p, _ in skipped]}",
    )
    assert path == tmp_path / "step-000004"
    assert [p.name for p, _ in skipped] == ["step-000008", "step-000006"]
    assert "no MANIFEST.json" in skipped[0][1] and "trainer_state.json" in skipped[1][1]

    moved = ckpt.set_aside(skipped[1][0], skipped[1][1])
    assert moved.name == "damaged-step-000006" and "trainer_state.json" in (moved / "DAMAGED.txt").read_text()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000008", "step-000004", "step-000002"]


@pytest.mark.faults
def test_no_usable_checkpoint_is_an_error_not_a_fresh_start(tmp_path, fault_report):
    assert ckpt.select_resume_checkpoint(tmp_path / "absent") == (None, [])  # nothing yet: a fresh start
    for s in (1, 2):
        d = _fake_checkpoint(tmp_path, s)
        (d / "rng" / "rank-00000.pt").write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.select_resume_checkpoint(tmp_path)
    msg = str(e.value)
    fault_report(
        "every checkpoint damaged (empty RNG file)",
        "CheckpointError naming both, nothing removed, no fresh start",
        f"CheckpointError ({len(msg.splitlines())} lines); {len(ckpt.list_checkpoints(tmp_path))} checkpoints left",
    )
    assert "step-000002" in msg and "step-000001" in msg and "rng/rank-00000.pt is 0 bytes" in msg
    assert len(ckpt.list_checkpoints(tmp_path)) == 2  # nothing removed


def test_fresh_run_refuses_to_write_over_existing_checkpoints(tmp_path):
    ckpt.ensure_no_checkpoints(tmp_path)  # empty: fine
    _fake_checkpoint(tmp_path, 5)
    with pytest.raises(ckpt.CheckpointError, match="checkpoint.resume=true"):
        ckpt.ensure_no_checkpoints(tmp_path)


@pytest.mark.faults
def test_prune_keeps_the_newest_good_checkpoints_and_never_the_last_good_ones(tmp_path, fault_report):
    for s in (1, 2, 3, 4):
        _fake_checkpoint(tmp_path, s)
    ckpt.prune(tmp_path, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000004", "step-000003"]

    # Newest two damaged: only one good checkpoint is left, so pruning deletes nothing at all.
    for s in (5, 6):
        _fake_checkpoint(tmp_path, s, manifest=False)
    (tmp_path / "step-000004" / "trainer_state.json").write_text("{}")
    ckpt.prune(tmp_path, keep_last=2)
    fault_report(
        "prune (keep_last=2) with the newest three checkpoints damaged",
        "nothing deleted: step-3 is the only good one",
        f"left {[p.name for p in ckpt.list_checkpoints(tmp_path)]}",
    )
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [
        "step-000006",
        "step-000005",
        "step-000004",
        "step-000003",
    ]


@pytest.mark.faults
def test_disk_full_is_named_with_the_path_and_free_space(tmp_path, fault_report):
    _fake_checkpoint(tmp_path, 3)
    torch_style = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    assert ckpt._is_disk_full(torch_style)
    assert ckpt._is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert not ckpt._is_disk_full(OSError(errno.EACCES, "Permission denied"))
    msg = ckpt._disk_full_message(tmp_path, 4, torch_style)
    fault_report(
        "disk full while saving a checkpoint (ENOSPC, torch's 'unexpected pos')",
        "named as a full disk with path, free MiB and the previous checkpoint",
        msg.split(". The previous")[0],
    )
    assert "no space left" in msg and str(tmp_path) in msg and "MiB free" in msg and "step-000003" in msg
