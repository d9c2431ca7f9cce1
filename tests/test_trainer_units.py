"""Fast tests of the trainer's pure pieces: sharding, token-budget micro-batches, collation, LR schedule,
prompt split over servers, metrics/completions logs and the browse command."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.engine_setup import lr_lambda_factory
from trainer.metrics_log import CompletionsLogger, MetricsLogger, read_jsonl
from trainer.rollout_side import split_evenly
from trainer.update_stage import TrainRow, collate, make_normalizer, plan_micro_batches, shard_rows


def _row(p: int, c: int, adv: float = 1.0, mask: bool = True) -> TrainRow:
    return TrainRow(list(range(1, p + 1)), list(range(100, 100 + c)), adv, [-0.5] * c, mask)


def test_shard_rows_partitions_and_balances_tokens():
    lengths = [100, 90, 80, 10, 10, 10, 5, 300]
    shards = [shard_rows(lengths, 3, r) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(len(lengths)))  # every row exactly once
    loads = [sum(lengths[i] for i in s) for s in shards]
    # The 300-token row sits alone; the others split the rest within one row of each other (greedy LPT).
    assert loads[shards.index([7])] == 300
    rest = [x for s, x in zip(shards, loads, strict=True) if s != [7]]
    assert abs(rest[0] - rest[1]) <= 80
    assert shard_rows(lengths, 1, 0) == list(range(len(lengths)))


def test_micro_batches_respect_the_token_budget():
    rows = [_row(10, c) for c in (5, 50, 30, 7, 200, 12, 1)]
    plan = plan_micro_batches(rows, list(range(len(rows))), budget_tokens=128)
    assert sorted(i for mb in plan for i in mb) == list(range(len(rows)))
    for mb in plan:
        padded = len(mb) * (
            max(len(rows[i].prompt_ids) for i in mb) + max(len(rows[i].completion_ids) for i in mb)
        )
        assert padded <= 128 or len(mb) == 1  # an over-long row goes alone
    assert [4] in plan  # the 210-token row exceeds the budget on its own
    # A budget that fits everything gives one micro-batch.
    assert len(plan_micro_batches(rows, list(range(len(rows))), 10**6)) == 1


def test_collate_pads_prompt_left_completion_right():
    rows = [_row(3, 2, adv=0.5), _row(1, 4, adv=-1.0, mask=False), _row(3, 1)]
    mb = collate(rows, pad_id=0, device=torch.device("cpu"))
    # rows 0 and 2 continue the same prompt: it is stored once
    assert mb.prompt_ids.tolist() == [[1, 2, 3], [0, 0, 1]]
    assert mb.prompt_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert mb.prompt_index.tolist() == [0, 1, 0]
    assert mb.completion_ids.tolist() == [[100, 101, 0, 0], [100, 101, 102, 103], [100, 0, 0, 0]]
    assert mb.completion_attn.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert mb.completion_mask.tolist() == [[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]]  # row 1: not in the loss
    assert mb.advantages.tolist() == [0.5, -1.0, 1.0]
    assert mb.rollout_logprobs[0, :2].tolist() == [-0.5, -0.5] and math.isnan(mb.rollout_logprobs[0, 2])
    assert mb.num_completion_tokens == 4


def test_normalizer_counts_the_whole_step():
    rows = [_row(3, 2), _row(1, 4, mask=False), _row(2, 5)]
    n = make_normalizer(rows, max_completion_length=16, world_size=2)
    assert (n.total_sequences, n.total_completion_tokens, n.num_ranks) == (3, 7, 2)


def test_lr_schedule_warmup_then_cosine():
    f = lr_lambda_factory(total_steps=10, warmup_ratio=0.2, scheduler="cosine")
    vals = [f(s) for s in range(10)]
    assert vals[0] < vals[1] < 1.0 and vals[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(vals[2:], vals[3:], strict=False)) and vals[-1] < 0.1
    assert lr_lambda_factory(10, 0.0, "constant")(7) == 1.0
    assert lr_lambda_factory(10, 0.0, "linear")(5) == pytest.approx(0.5)


@pytest.mark.parametrize(("n", "parts"), [(4, 1), (4, 2), (5, 2), (2, 3), (7, 3)])
def test_split_evenly_covers_in_order(n, parts):
    slices = split_evenly(n, parts)
    assert [i for a, b in slices for i in range(a, b)] == list(range(n))
    sizes = [b - a for a, b in slices]
    assert max(sizes) - min(sizes) <= 1 and len(slices) == min(n, parts)


def test_metrics_and_completions_logs(tmp_path):
    m = MetricsLogger(tmp_path, tensorboard=True)
    m.log(1, {"loss": 0.5, "grad_norm": float("inf"), "note": "x", "t": torch.tensor(2.0)})
    m.log(2, {"loss": 0.25})
    m.close()
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert rows[0] == {"step": 1, "loss": 0.5, "grad_norm": "inf", "note": "x", "t": 2.0}
    assert rows[1]["step"] == 2
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "lo')  # a torn line from a crash is skipped
    assert len(read_jsonl(tmp_path / "metrics.jsonl")) == 2
    CompletionsLogger(tmp_path).log([{"step": 1, "completion": "a"}, {"step": 1, "completion": "b"}])
    assert [r["completion"] for r in read_jsonl(tmp_path / "completions.jsonl")] == ["a", "b"]


def test_browse_filters_by_step_and_correctness(tmp_path, capsys):
    from trainer.browse import main

    rows = [
        {
            "step": 1,
            "weight_version": 0,
            "completion": "right",
            "rewards": {"correctness": 2.0},
            "reward": 2.0,
            "gold": "7",
            "advantage": 1.0,
        },
        {
            "step": 1,
            "weight_version": 0,
            "completion": "wrong",
            "rewards": {"correctness": 0.0},
            "reward": 0.0,
            "gold": "7",
            "advantage": -1.0,
        },
        {
            "step": 2,
            "weight_version": 1,
            "completion": "later",
            "rewards": {"correctness": 0.0},
            "reward": 0.0,
            "gold": "8",
            "advantage": 0.0,
        },
    ]
    CompletionsLogger(tmp_path).log(rows)
    assert main([str(tmp_path), "--step", "1", "--correct"]) == 0
    out = capsys.readouterr().out
    assert "right" in out and "wrong" not in out and "later" not in out
    assert main([str(tmp_path), "--incorrect"]) == 0
    out = capsys.readouterr().out
    assert "wrong" in out and "later" in out and "right" not in out
    assert main([str(tmp_path), "--steps"]) == 0
    assert "step 1: 2 completions, accuracy 0.500" in capsys.readouterr().out
    assert main([str(tmp_path / "missing")]) == 1
