"""Weights & Biases logging (``logging.wandb_project``) with the real wandb package in offline mode: a 2-step
run, then the same run resumed from its last checkpoint and taken to step 4.

The offline run files (``RUN_DIR/wandb/offline-run-*/run-<id>.wandb``) are read back record by record: they
are a LevelDB-style log of wandb's protobuf ``Record`` messages (32 KiB blocks; each chunk is a 7-byte header,
crc32c, length, type, then the bytes; FULL/FIRST/MIDDLE/LAST chunks), after a 7-byte file header.
Checked: both attempts write to the same W&B run id (kept in RUN_DIR/wandb-run-id), that run carries the
project, the run name and our config, every step 1-4 reaches W&B once with the values of metrics.jsonl, and
each attempt finishes its part of the W&B run (exit code 0).

(A hard crash is not part of this: wandb had written nothing of a 3-step attempt that exited hard, see
``trainer.metrics_log.start_wandb``.)
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from tests.trainer_support import DIGITS, full_log, read_jsonl, read_log, rollout_server, run_short

pytestmark = pytest.mark.slow

pytest.importorskip("wandb")

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: Path):
    """wandb's protobuf Records of one .wandb file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:16]
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero padding up to the next block
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_offline_run_gets_every_step_and_continues_after_a_resume(
    tiny_model_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    extra = [DIGITS, "logging.wandb_project=grpo-test"]
    with rollout_server(tiny_model_dir, tmp_path / "server.log") as (url, _):
        code = run_short(tiny_model_dir, tmp_path, url, "w", "w1", [*extra, "optim.max_steps=2"])
        assert code == 0, read_log(tmp_path, "w1")
        code = run_short(tiny_model_dir, tmp_path, url, "w", "w2", [*extra, "checkpoint.resume=true"])
        assert code == 0, read_log(tmp_path, "w2")
    assert "resumed from" in full_log(tmp_path, "w2")

    run_dir = tmp_path / "w"
    run_id = (run_dir / "wandb-run-id").read_text().strip()
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert [f.name for f in files] == [f"run-{run_id}.wandb"] * 2, files  # two attempts, one run id

    history: dict[int, dict[str, float]] = {}
    exits = []
    for attempt, f in enumerate(files):
        for r in wandb_records(f):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                assert (r.run.run_id, r.run.project, r.run.display_name) == (run_id, "grpo-test", "w")
                config = {u.key: json.loads(u.value_json) for u in r.run.config.update}
                assert config["optim"]["max_steps"] == (2, 4)[attempt]  # each attempt logs its own config
                assert config["logging"]["wandb_project"] == "grpo-test"
            elif kind == "history":
                # keys with a "/" come as nested_key parts
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                assert r.history.step.num == row["_step"] and row["_step"] not in history
                history[row["_step"]] = {**row, "attempt": attempt}
            elif kind == "exit":
                exits.append((attempt, r.exit.exit_code))
    assert {s: row["attempt"] for s, row in history.items()} == {1: 0, 2: 0, 3: 1, 4: 1}
    assert exits == [(0, 0), (1, 0)]
    for m in read_jsonl(run_dir / "metrics.jsonl"):
        logged = history[m["step"]]
        for key in ("loss", "grad_norm", "reward/total/mean", "lr"):
            assert logged[key] == pytest.approx(m[key], rel=1e-6, abs=1e-12), (m["step"], key)
