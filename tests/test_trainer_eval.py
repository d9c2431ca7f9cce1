"""Periodic held-out evaluation inside the trainer (``eval.every_steps``): logged with the step's metrics."""

from __future__ import annotations

import pytest

from tests.trainer_support import read_jsonl, read_log, rollout_server, start_trainer, wait_all

pytestmark = pytest.mark.slow


def test_eval_every_steps_logs_held_out_accuracy(tiny_model_dir, tmp_path):
    with rollout_server(tiny_model_dir, tmp_path / "server.log") as (url, _server):
        overrides = [
            f"model.name_or_path={tiny_model_dir}",
            f"run.output_dir={tmp_path}",
            "run.name=evalrun",
            f"rollout.server_urls=[{url}]",
            "logging.tensorboard=false",
            "optim.max_steps=4",
            "checkpoint.every_steps=0",
            "eval.every_steps=2",
            "eval.num_problems=6",
            "eval.max_tokens=12",
        ]
        procs = start_trainer(1, "configs/cpu-tiny-test.yaml", overrides, tmp_path)
        codes = wait_all(procs, timeout_s=240)
    assert codes == [0], read_log(tmp_path)
    rows = {r["step"]: r for r in read_jsonl(tmp_path / "evalrun" / "metrics.jsonl")}
    assert sorted(rows) == [1, 2, 3, 4]
    for step in (1, 3):
        assert not any(k.startswith("eval/") for k in rows[step]), rows[step]
    for step in (2, 4):
        m = rows[step]
        assert m["eval/num_problems"] == 6
        for key in ("eval/greedy/pass@1_strict", "eval/greedy/pass@1_lenient", "eval/greedy/format_rate"):
            assert 0.0 <= m[key] <= 1.0, (key, m[key])
        assert 0 < m["eval/greedy/mean_length"] <= 12
        assert m["time/eval_s"] > 0
