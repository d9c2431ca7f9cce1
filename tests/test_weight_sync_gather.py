"""The weight push's ZeRO-3 gather (``trainer.weight_sync.iter_full_tensors``) on a real one-rank DeepSpeed
ZeRO-3 engine over gloo, in a child process (it initialises torch.distributed).

Buckets smaller than the embedding hold it alone, and DeepSpeed gathers a lone parameter through its
per-parameter path, a real all-gather even on one rank (37 ms for a 33 MB embedding against 0.1 ms through the
coalesced path). The push therefore gathers a lone partitioned parameter together with a small partitioned
companion. Checked here, before and after a real training step (after which ZeRO-3 keeps its small
"persistent" parameters gathered, so a bucket can hold one partitioned parameter among gathered ones): with
every parameter in a bucket of its own, and in pairs, the tensors come out in order, equal to the saved
weights (before) or to a one-bucket gather (after), the companion is never yielded, no parameter is left in
flight, and DeepSpeed's per-parameter gather is not called at all.
"""

from __future__ import annotations

from tests.trainer_support import REPO, run_one_rank_child

CHILD = r"""
import json, random, sys
import torch, torch.distributed as dist
from deepspeed.runtime.zero.partition_parameters import Init, ZeroParamStatus
from transformers import AutoModelForCausalLM
from trainer.config import load_config
from trainer.engine_setup import build_engine
from trainer.update_stage import TrainBatch, TrainRow, UpdateStage
from trainer.weight_sync import iter_full_tensors, named_hf_parameters

model_dir, config = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
cfg = load_config(config, [f"model.name_or_path={model_dir}", "deepspeed.zero_stage=3", "model.dtype=float32"])
engine, _, _ = build_engine(cfg, model_dir, 1, 10)
params = named_hf_parameters(engine.module.model)
n = len(params)
saved = {k: v.detach() for k, v in AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).named_parameters()}

sequential_calls = []
original = Init._allgather_params_sequential
def spy(self, param_list, *args, **kwargs):
    sequential_calls.append(len(param_list))
    return original(self, param_list, *args, **kwargs)
Init._allgather_params_sequential = spy

def gather(groups):
    sequential_calls.clear()
    pairs = list(iter_full_tensors(params, True, groups, None, send=True, copy=True))
    out = dict(pairs)
    return {
        "in_order": [name for name, _ in pairs] == [name for name, _ in params],  # no companion yielded
        "sequential_calls": len(sequential_calls),
        "released": all(p.ds_status != ZeroParamStatus.INFLIGHT for _, p in params),
    }, out

# Control: the spy sees DeepSpeed's per-parameter gather when a lone parameter goes through it.
import deepspeed
with deepspeed.zero.GatheredParameters([params[0][1]], modifier_rank=None):
    pass
control_calls = len(sequential_calls)

lone = [[i] for i in range(n)]
result = {"num_params": n, "control_calls": control_calls}
for label, groups in {"lone": lone, "one bucket": [list(range(n))]}.items():
    result[label], out = gather(groups)
    result[label]["differ"] = [k for k, t in out.items() if not torch.equal(t, saved[k])]

# One real training step: afterwards ZeRO-3 leaves its "persistent" (small) parameters gathered, so a bucket
# may hold one partitioned parameter next to gathered ones.
stage = UpdateStage(engine, cfg.objective.loss_config(), pad_id=0, temperature=1.0, chunk_tokens=1024,
                    micro_batch_tokens=1 << 20, max_completion_length=8, rank=0, world_size=1,
                    device=torch.device("cpu"), share_prompts=True)
rng = random.Random(0)
rows = [TrainRow([rng.randrange(3, 500) for _ in range(5)], [rng.randrange(3, 500) for _ in range(8)],
                 rng.uniform(-1, 1), [-1.0] * 8) for _ in range(4)]
pairs = [[i, i + 1] for i in range(0, n - 1, 2)] + ([[n - 1]] if n % 2 else [])
for step, (label, groups) in enumerate({"lone, trained": lone, "pairs, trained": pairs}.items(), start=1):
    stage.step(TrainBatch(step=step, rows=rows))
    # what the push finds right after a step (a gather ends with every parameter of it partitioned again)
    persistent = [name for name, p in params if p.ds_status == ZeroParamStatus.AVAILABLE]
    result[label], out = gather(groups)
    _, reference = gather([list(range(n))])
    result[label]["differ"] = [k for k, t in out.items() if not torch.equal(t, reference[k])]
    result[label]["persistent"] = persistent
result["moved"] = [k for k, t in reference.items() if not torch.equal(t, saved[k])]
print("RESULT " + json.dumps(result))
"""


def test_zero3_push_gathers_lone_parameters_through_the_coalesced_path(tiny_model_dir, tmp_path):
    result = run_one_rank_child(
        CHILD, tmp_path, str(tiny_model_dir), str(REPO / "configs/cpu-tiny-test.yaml")
    )
    assert result["num_params"] > 2
    assert result["control_calls"] == 1  # the spy does see a per-parameter gather
    assert result["moved"], "the training step changed no weight"
    for label in ("lone", "one bucket", "lone, trained", "pairs, trained"):
        r = result[label]
        if "trained" in label:
            # the tiny test config partitions every tensor of 100 elements or more; the smaller ones stay
            # gathered after a step
            assert 0 < len(r["persistent"]) < result["num_params"], (label, r)
        assert r["in_order"] and r["differ"] == [] and r["released"], (label, r)
        assert r["sequential_calls"] == 0, (label, r)
