"""One-step off-policy (``rollout.max_off_policy_steps=1``) against a real torch rollout server.

Run A: 4 steps straight, off-policy. Run B: the same, exits hard after step 3 (checkpoint at step 2) while the
rollout side has already drawn step 4's prompts, then resumes against a fresh server. Checked:
- the lag is what the setting says: step 1 is sampled on v0 and trained from v0 (lag 0); step s >= 2 is
  sampled on v(s-2) while step s-1 trains, and trained from v(s-1) (lag 1);
- weights are still pushed after every step, and each server probe after a push serves that version;
- the loss applied its truncated importance weight (its metrics are there and finite);
- a checkpoint of step 2 resumes with step 3's prompts although step 3's (and 4's) had been drawn already:
  steps 3-4 of B draw exactly A's prompts.
And on-policy (``max_off_policy_steps=0``) stays on-policy: every batch is sampled on the weights it trains.
``rollout.sync_every_steps=2`` (a push every second step) is off-policy between pushes: it needs the same
importance weight, which is 1 on the steps sampled on the training weights and corrects the others.
"""

from __future__ import annotations

import math

import pytest

from tests.trainer_support import DIGITS, read_jsonl, read_log, rollout_server, run_short
from trainer.config import ConfigError, load_config

pytestmark = pytest.mark.slow


# DIGITS: a reward that varies, so every step moves the weights and a lagging batch really is off-policy
OFF = ["rollout.max_off_policy_steps=1", "objective.importance_sampling_cap=3.0", DIGITS]


def test_off_policy_needs_the_importance_weight():
    with pytest.raises(ConfigError, match="importance_sampling_cap"):
        load_config("configs/cpu-tiny-test.yaml", ["rollout.max_off_policy_steps=1"])
    cfg = load_config("configs/cpu-tiny-test.yaml", OFF)
    assert cfg.rollout.max_off_policy_steps == 1
    # Pushing every N > 1 steps makes the steps between pushes off-policy too.
    with pytest.raises(ConfigError, match="sync_every_steps.*importance_sampling_cap"):
        load_config("configs/cpu-tiny-test.yaml", ["rollout.sync_every_steps=2"])
    cfg = load_config(
        "configs/cpu-tiny-test.yaml", ["rollout.sync_every_steps=2", "objective.importance_sampling_cap=3.0"]
    )
    assert cfg.rollout.sync_every_steps == 2


def test_pushing_every_second_step_trains_the_steps_between_with_the_importance_weight(
    tiny_model_dir, tmp_path
):
    extra = ["rollout.sync_every_steps=2", "objective.importance_sampling_cap=3.0", DIGITS]
    with rollout_server(tiny_model_dir, tmp_path / "server.log") as (url, _):
        assert run_short(tiny_model_dir, tmp_path, url, "e2", "e2", extra) == 0, read_log(tmp_path, "e2")
    rows = read_jsonl(tmp_path / "e2" / "metrics.jsonl")
    assert [m["step"] for m in rows] == [1, 2, 3, 4]
    assert [m.get("weight_version/pushed") for m in rows] == [None, 2, None, 4]
    assert [m["weight_version/min"] for m in rows] == [0, 0, 2, 2]
    assert [m["weight_version/lag"] for m in rows] == [0, 1, 0, 1]
    for m in rows:  # the weight is 1 on the weights that sampled; after an unpushed step it corrects
        w = m["train/is_weight_mean"]
        assert (abs(w - 1) > 1e-4) if m["weight_version/lag"] else (abs(w - 1) < 1e-5), (m["step"], w)
    probes = read_jsonl(tmp_path / "e2" / "debug" / "probes.jsonl")
    assert [(p["pushed_version"], p["server_version"]) for p in probes] == [(0, 0), (2, 2), (4, 4)]


@pytest.mark.faults
def test_one_step_off_policy_lags_by_one_pushes_every_step_and_resumes_exactly(
    tiny_model_dir, tmp_path, fault_report
):
    with rollout_server(tiny_model_dir, tmp_path / "server-1.log") as (url, _):
        assert run_short(tiny_model_dir, tmp_path, url, "a", "a", OFF) == 0, read_log(tmp_path, "a")
        assert run_short(tiny_model_dir, tmp_path, url, "onpolicy", "onpolicy") == 0, read_log(
            tmp_path, "onpolicy"
        )
        code = run_short(tiny_model_dir, tmp_path, url, "b", "b1", [*OFF, "debug.crash_after_step=3"])
        assert code == 3, read_log(tmp_path, "b1")
    with rollout_server(tiny_model_dir, tmp_path / "server-2.log") as (url, _):  # fresh: initial weights
        resumed = run_short(tiny_model_dir, tmp_path, url, "b", "b2", [*OFF, "checkpoint.resume=true"])
        assert resumed == 0, read_log(tmp_path, "b2")

    a = read_jsonl(tmp_path / "a" / "metrics.jsonl")
    assert [m["step"] for m in a] == [1, 2, 3, 4]
    assert [m["weight_version/min"] for m in a] == [0, 0, 1, 2]
    assert [m["weight_version/lag"] for m in a] == [0, 1, 1, 1]
    assert [m["weight_version/pushed"] for m in a] == [1, 2, 3, 4]
    for m in a:
        assert math.isfinite(m["train/is_weight_mean"]) and 0 < m["train/is_weight_mean"] <= 3.0
        assert 0.0 <= m["train/is_capped_frac"] <= 1.0
        # lag 0 (step 1): sampled on the training weights, weight 1; lag 1: the weight is really applied
        assert (abs(m["train/is_weight_mean"] - 1) > 1e-4) == bool(m["weight_version/lag"]), m["step"]
    probes = read_jsonl(tmp_path / "a" / "debug" / "probes.jsonl")
    assert [(p["pushed_version"], p["server_version"]) for p in probes] == [(v, v) for v in range(5)]
    completions = read_jsonl(tmp_path / "a" / "completions.jsonl")
    assert {(c["step"], c["weight_version"]) for c in completions} == {(1, 0), (2, 0), (3, 1), (4, 2)}

    on = read_jsonl(tmp_path / "onpolicy" / "metrics.jsonl")
    assert [m["weight_version/min"] for m in on] == [0, 1, 2, 3]
    assert [m["weight_version/lag"] for m in on] == [0, 0, 0, 0]
    # Same prompts in the same order whatever the setting: only the weights that sample them differ.
    assert [m["data/prompts_digest"] for m in on] == [m["data/prompts_digest"] for m in a]

    b_rows = read_jsonl(tmp_path / "b" / "metrics.jsonl")
    b = {m["step"]: m for m in b_rows}
    fault_report(
        "off-policy (lag 1) trainer exits hard after step 3 (checkpoint at 2, step 4 already drawn), resumed",
        "steps 1-4 once; steps 3-4 draw the uninterrupted run's prompts",
        f"steps {[m['step'] for m in b_rows]}; prompts equal at steps 3, 4: "
        + ", ".join(
            str(b[s]["data/prompts_digest"] == a[s - 1]["data/prompts_digest"]) for s in (3, 4) if s in b
        ),
    )
    assert [m["step"] for m in b_rows] == [1, 2, 3, 4]
    for s in (1, 2, 3, 4):
        assert b[s]["data/prompts_digest"] == a[s - 1]["data/prompts_digest"], f"step {s} drew other prompts"
        assert (b[s]["data/epoch"], b[s]["data/index"]) == (a[s - 1]["data/epoch"], a[s - 1]["data/index"])
    # After the resume push (v2), step 3 is sampled on v2 and step 4 on v2 as well (released before step 3
    # trained): the lag restarts at 0.
    assert [b[s]["weight_version/min"] for s in (3, 4)] == [2, 2]
    assert [b[s]["weight_version/lag"] for s in (3, 4)] == [0, 1]
