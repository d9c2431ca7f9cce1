"""ZeRO-Offload (``deepspeed.offload_optimizer``, and ``offload_param`` under ZeRO-3) trains like the plain
engine and resumes.

Offload moves the optimizer step to the CPU with DeepSpeed's CPU Adam (a torch optimizer is refused there), so
the claim to check is that it is the same AdamW update. One rollout server; per ZeRO stage:
- A: the plain engine, 4 steps (checkpoint at 2 and 4);
- B: the same with offload, which exits hard after step 3 and resumes from the step-2 checkpoint.
Checked: B's steps 1-4 are logged once each and match A's loss and gradient norm, and B's exported weights at
steps 2 and 4 equal A's within float tolerance (so the resumed run got its offloaded Adam moments back: fresh
moments would move the weights differently at step 3).

With two ranks (ZeRO-3, optimizer and parameters offloaded) each rank keeps and steps only its own shard of
the Adam moments on the CPU: the same comparison, plain against offload, both with two ranks, no crash.
"""

from __future__ import annotations

import pytest

from tests.trainer_support import (
    DIGITS,
    SHORT_RUN,
    full_log,
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


def _max_weight_diff(a, b) -> float:
    sa, sb = load_hf(a).state_dict(), load_hf(b).state_dict()
    assert sa.keys() == sb.keys()
    return max(float((sa[k] - sb[k]).abs().max()) for k in sa)


def _assert_same_training(a_dir, b_dir, model_dir) -> None:
    """B logged steps 1-4 once each with A's prompts, loss and grad norm, and exported A's weights."""
    a = {m["step"]: m for m in read_jsonl(a_dir / "metrics.jsonl")}
    b_rows = read_jsonl(b_dir / "metrics.jsonl")
    assert [m["step"] for m in b_rows] == [1, 2, 3, 4]
    for m in b_rows:
        s = m["step"]
        assert m["data/prompts_digest"] == a[s]["data/prompts_digest"], s
        assert m["loss"] == pytest.approx(a[s]["loss"], rel=1e-3, abs=1e-7), s
        assert m["grad_norm"] == pytest.approx(a[s]["grad_norm"], rel=1e-3), s
        assert m["grad_norm"] > 0, s  # the reward varies, so every step really updates
    for step in ("step-000002", "step-000004"):
        ck = [run / "checkpoints" / step / "hf" for run in (a_dir, b_dir)]
        assert _max_weight_diff(*ck) < 1e-5, step
    moved = _max_weight_diff(model_dir, b_dir / "checkpoints" / "step-000004" / "hf")
    assert moved > 1e-3  # the comparison above is not between untrained copies


@pytest.mark.parametrize(
    ("stage", "offload"),
    [
        ("2", ["deepspeed.offload_optimizer=true"]),
        ("3", ["deepspeed.offload_optimizer=true", "deepspeed.offload_param=true"]),
    ],
    ids=["zero2-optimizer", "zero3-optimizer-and-params"],
)
def test_offload_trains_like_the_plain_engine_and_resumes(tiny_model_dir, tmp_path, stage, offload):
    # weight decay on: the CPU Adam must apply AdamW's decoupled decay as torch does
    zero = [f"deepspeed.zero_stage={stage}", DIGITS, "optim.weight_decay=0.1"]
    with rollout_server(tiny_model_dir, tmp_path / "server.log") as (url, _):
        assert run_short(tiny_model_dir, tmp_path, url, "a", "a", zero) == 0, read_log(tmp_path, "a")
        code = run_short(
            tiny_model_dir, tmp_path, url, "b", "b1", [*zero, *offload, "debug.crash_after_step=3"]
        )
        assert code == 3, read_log(tmp_path, "b1")
        code = run_short(
            tiny_model_dir, tmp_path, url, "b", "b2", [*zero, *offload, "checkpoint.resume=true"]
        )
        assert code == 0, read_log(tmp_path, "b2")
    assert "DeepSpeed's CPU Adam" in full_log(tmp_path, "b2")

    _assert_same_training(tmp_path / "a", tmp_path / "b", tiny_model_dir)


def test_offload_with_two_ranks_trains_like_the_plain_engine(tiny_model_dir, tmp_path):
    zero = ["deepspeed.zero_stage=3", DIGITS, "optim.weight_decay=0.1"]
    offload = ["deepspeed.offload_optimizer=true", "deepspeed.offload_param=true"]
    with rollout_server(tiny_model_dir, tmp_path / "server.log") as (url, _):
        for name, extra in {"a": zero, "b": [*zero, *offload]}.items():
            overrides = run_overrides(tiny_model_dir, tmp_path, name, url, *SHORT_RUN, *extra)
            procs = start_trainer(2, "configs/cpu-tiny-test.yaml", overrides, tmp_path, name)
            codes = wait_all(procs, 300)
            assert codes == [0, 0], read_log(tmp_path, name, 0) + read_log(tmp_path, name, 1)
    for rank in (0, 1):
        assert "DeepSpeed's CPU Adam" in full_log(tmp_path, "b", rank)
    _assert_same_training(tmp_path / "a", tmp_path / "b", tiny_model_dir)
