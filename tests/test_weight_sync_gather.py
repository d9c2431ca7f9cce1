"""The weight push's ZeRO-3 gather (``trainer.weight_sync.iter_full_tensors``) on real DeepSpeed ZeRO-3 engines
over gloo, one rank and three, in child processes (they initialise torch.distributed).

The push gathers each bucket's partitions to rank 0 itself, reading DeepSpeed's partition layout, instead of
DeepSpeed's all-gather. So it is checked against DeepSpeed's own ``GatheredParameters`` on every rank, before
and after real training steps (after a step ZeRO-3 keeps its small "persistent" parameters gathered, and the
partitions are what the optimizer wrote): with every parameter in a bucket of its own, in pairs and in one
bucket, rank 0 gets every tensor in order and equal to DeepSpeed's, the other rank gets none, a bucket's
tensors lie back to back (the push sends them without packing), with reused buffers a bucket's tensors are
still intact when the next bucket has been gathered (the push keeps two buckets on the wire), a cast to
another dtype is exact, no parameter is left gathered or in flight, a receiving rank other than the first
is refused, a gather that no rank asks for yields nothing and does not hang, and partitions of two dtypes
with no dtype to push in are refused.
"""

from __future__ import annotations

import pytest

from tests.trainer_support import REPO, rollout_server, run_rank_children

CHILD = r"""
import datetime, json, random, sys
import deepspeed
import torch, torch.distributed as dist
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from trainer.config import load_config
from trainer.engine_setup import build_engine
from trainer.update_stage import TrainBatch, TrainRow, UpdateStage
from trainer.weight_sync import iter_full_tensors, named_hf_parameters

model_dir, config = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
rank, ranks = dist.get_rank(), dist.get_world_size()
cfg = load_config(config, [f"model.name_or_path={model_dir}", "deepspeed.zero_stage=3", "model.dtype=float32"])
engine, _, _ = build_engine(cfg, model_dir, 1, 10)
params = named_hf_parameters(engine.module.model)
n = len(params)
statuses = lambda: [p.ds_status for _, p in params]

def deepspeed_gather():
    with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
        return {name: p.detach().clone() for name, p in params}

def check(groups, dtype=None, slots=None):
    reference = deepspeed_gather()
    before = statuses()
    ref_dtype = lambda m: reference[m].to(dtype) if dtype is not None else reference[m]
    got, differ, intact, adjacent = [], [], True, True
    index = {i: k for k, g in enumerate(groups) for i in g}
    it = iter_full_tensors(params, True, groups, dtype, send=rank == 0, slots=slots)
    for name, t in it:
        got.append((name, t))
        if t.dtype != ref_dtype(name).dtype or not torch.equal(t, ref_dtype(name)):
            differ.append(name)
        k = index[len(got) - 1]
        # everything yielded for this bucket and the one before must still hold its values
        for j, (m, u) in enumerate(got):
            if index[j] >= k - 1 and not torch.equal(u, reference[m].to(u.dtype)):
                intact = False
        first = groups[k][0]
        if len(got) - 1 > first:
            prev = got[-2][1]
            adjacent &= t.data_ptr() == prev.data_ptr() + prev.numel() * prev.element_size()
    return {
        "names": [m for m, _ in got],
        "differ": differ,
        "intact": intact,
        "adjacent": adjacent,
        "statuses_kept": statuses() == before and ZeroParamStatus.INFLIGHT not in statuses(),
    }

lone = [[i] for i in range(n)]
pairs = [[i, i + 1] for i in range(0, n - 1, 2)] + ([[n - 1]] if n % 2 else [])
cases = {"lone": lone, "pairs": pairs, "one bucket": [list(range(n))]}
result = {"num_params": n, "names": [m for m, _ in params], "ranks": ranks,
          "padded": [m for m, p in params if ranks * p.ds_tensor.ds_numel > p.ds_numel]}
saved = deepspeed_gather()
for label, groups in cases.items():
    result[label] = check(groups)
result["pairs, bfloat16"] = check(pairs, torch.bfloat16)
kept = []  # buffers a push keeps for the next one

stage = UpdateStage(engine, cfg.objective.loss_config(), pad_id=0, temperature=1.0, chunk_tokens=1024,
                    micro_batch_tokens=1 << 20, max_completion_length=8, rank=rank, world_size=ranks,
                    device=torch.device("cpu"), share_prompts=True)
rng = random.Random(0)
rows = [TrainRow([rng.randrange(3, 500) for _ in range(5)], [rng.randrange(3, 500) for _ in range(8)],
                 rng.uniform(-1, 1), [-1.0] * 8) for _ in range(4)]
for step, label in enumerate(["lone", "pairs"], start=1):
    stage.step(TrainBatch(step=step, rows=rows))
    result[f"persistent after step {step}"] = [m for m, p in params if p.ds_status == ZeroParamStatus.AVAILABLE]
    result[f"{label}, trained"] = check(cases[label], None, kept)
result["moved"] = [m for m, t in deepspeed_gather().items() if not torch.equal(t, saved[m])]
if rank == 1:
    try:
        next(iter_full_tensors(params, True, pairs, None, send=True))
        result["refused"] = False
    except ValueError as e:
        result["refused"] = "first rank" in str(e)
# no rank asks for the tensors (the first rank still receives what the others send): nothing, and no hang
result["none sent"] = len(list(iter_full_tensors(params, True, pairs, None, send=False)))
params[1][1].ds_tensor.data = params[1][1].ds_tensor.data.double()  # a bucket would have to cast it silently
try:
    result["mixed"] = len(list(iter_full_tensors(params, True, pairs, None, send=rank == 0)))
except ValueError as e:
    result["mixed"] = str(e)
print("RESULT " + json.dumps(result))
"""


@pytest.mark.parametrize("ranks", [1, 3])
def test_zero3_push_gathers_each_bucket_to_rank_0_as_deepspeed_does(tiny_model_dir, tmp_path, ranks):
    results = run_rank_children(
        CHILD, tmp_path, str(tiny_model_dir), str(REPO / "configs/cpu-tiny-test.yaml"), ranks=ranks
    )
    first = results[0]
    assert first["ranks"] == ranks and first["num_params"] > 2
    for r in results:
        assert r["moved"], "the training step changed no weight"
        # the tiny test config partitions every tensor of 100 elements or more; the smaller ones stay gathered
        # after a step
        assert 0 < len(r["persistent after step 1"]) < r["num_params"], r
        for label in (
            "lone",
            "pairs",
            "one bucket",
            "pairs, bfloat16",
            "lone, trained",
            "pairs, trained",
        ):
            c = r[label]
            assert c["names"] == (r["names"] if r is first else []), (label, c)
            assert c["differ"] == [] and c["intact"] and c["statuses_kept"] and c["adjacent"], (label, c)
    if ranks > 1:
        # the tiny model's tensors have 2^k elements: over 3 ranks every one's last run holds padding, which
        # is received apart and only its real elements copied into place
        assert set(first["padded"]) == set(first["names"]), first["padded"]
        assert results[1]["refused"], "rank 1 was allowed to receive the full tensors"
        # partitions of two dtypes with no dtype to push in: refused on every rank before anything moves
        assert all("mix dtypes" in str(r["mixed"]) for r in results), [r["mixed"] for r in results]
    else:
        # one rank sends its partitions as they are, each in its own dtype
        assert first["mixed"] == first["num_params"], first["mixed"]
    assert [r["none sent"] for r in results] == [0] * ranks


FAILING_RANK_CHILD = r"""
import datetime, json, sys, time
import torch, torch.distributed as dist
import trainer.weight_sync as ws
from trainer.config import load_config
from trainer.engine_setup import build_engine

model_dir, config, url = sys.argv[1], sys.argv[2], sys.argv[3]
# the trainer group's timeout bounds how long rank 0 waits for sends that will never come
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=15))
rank = dist.get_rank()
cfg = load_config(config, [f"model.name_or_path={model_dir}", "deepspeed.zero_stage=3", "model.dtype=float32"])
engine, _, _ = build_engine(cfg, model_dir, 1, 10)
sync = ws.WeightSync(engine.module.model, server_urls=[url], api_token=None, rank=rank, zero3=True,
                     backend="gloo", master_addr="127.0.0.1", master_port=0, bucket_bytes=64 << 10,
                     timeout_s=60.0)
sync.connect()
result = {"first push": sorted(sync.push(1))[:1]}  # a whole push works
if rank == 1:  # this rank's gather fails at the third bucket
    calls, original = [], ws._gather_group
    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected gather failure")
        return original(*args, **kwargs)
    ws._gather_group = failing
t0 = time.monotonic()
try:
    sync.push(2)
    result["raised"] = None
except Exception as e:
    result["raised"] = type(e).__name__
    result["message"] = str(e)
result["seconds"] = time.monotonic() - t0
sync.close()
print("RESULT " + json.dumps(result))
"""


def test_a_gather_that_fails_on_one_rank_fails_the_push_on_every_rank(tiny_model_dir, tmp_path):
    """Rank 1's gather raises midway through a push: both ranks raise ``WeightSyncFailed`` within the trainer
    group's timeout (15 s here), rank 1's naming the failure; rank 0's receives from rank 1 time out, which
    closes gloo's connections, so the push is not retried on that group."""
    with rollout_server(tiny_model_dir, tmp_path / "server.log") as (url, _):
        results = run_rank_children(
            FAILING_RANK_CHILD,
            tmp_path,
            str(tiny_model_dir),
            str(REPO / "configs/cpu-tiny-test.yaml"),
            url,
            ranks=2,
            timeout_s=240,
        )
    for rank, r in enumerate(results):
        assert r["first push"], (rank, r)
        assert r["raised"] == "WeightSyncFailed", (rank, r)
        assert "could not share its outcome" in r["message"], (rank, r)
        assert r["seconds"] < 60, (rank, r)
    assert "rank 1's gather failed: RuntimeError: injected gather failure" in results[1]["message"]
