"""The weight push's ZeRO-3 gather (``trainer.weight_sync.iter_full_tensors``) on a real one-rank DeepSpeed
ZeRO-3 engine over gloo, in a child process (it initialises torch.distributed).

Buckets smaller than the embedding hold it alone, and DeepSpeed gathers a lone parameter through its
per-parameter path, a real all-gather even on one rank (37 ms for a 33 MB embedding against 0.1 ms through the
coalesced path). The push therefore gathers a lone parameter together with a small companion. Checked here:
with every parameter in a bucket of its own, the tensors come out in order, equal to the saved weights, the
companion is never yielded, every parameter is partitioned again afterwards, and DeepSpeed's per-parameter
gather is not called at all.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.trainer_support import REPO, child_env, free_port

CHILD = r"""
import json, sys
import torch, torch.distributed as dist
from deepspeed.runtime.zero.partition_parameters import Init, ZeroParamStatus
from transformers import AutoModelForCausalLM
from trainer.config import load_config
from trainer.engine_setup import build_engine
from trainer.weight_sync import iter_full_tensors, named_hf_parameters

model_dir, config = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
cfg = load_config(config, [f"model.name_or_path={model_dir}", "deepspeed.zero_stage=3", "model.dtype=float32"])
engine, _, _ = build_engine(cfg, model_dir, 1, 10)
params = named_hf_parameters(engine.module.model)
saved = dict(AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).named_parameters())

sequential_calls = []
original = Init._allgather_params_sequential
def spy(self, param_list, *args, **kwargs):
    sequential_calls.append(len(param_list))
    return original(self, param_list, *args, **kwargs)
Init._allgather_params_sequential = spy

out = {}
n = len(params)
for label, groups in {"lone": [[i] for i in range(n)], "one bucket": [list(range(n))]}.items():
    sequential_calls.clear()
    names, differ = [], []
    for name, t in iter_full_tensors(params, True, groups, None, send=True, copy=False):
        names.append(name)
        if not torch.equal(t, saved[name].detach()):
            differ.append(name)
    out[label] = {
        "in_order": names == [name for name, _ in params],
        "differ": differ,
        "sequential_calls": len(sequential_calls),
        "still_gathered": [name for name, p in params if p.ds_status != ZeroParamStatus.NOT_AVAILABLE],
    }
print("RESULT " + json.dumps({"num_params": n, **out}))
"""


def test_zero3_push_gathers_lone_parameters_through_the_coalesced_path(tiny_model_dir, tmp_path):
    script = tmp_path / "gather_child.py"
    script.write_text(CHILD)
    env = child_env(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1"
    )
    proc = subprocess.run(
        [sys.executable, str(script), str(tiny_model_dir), str(REPO / "configs/cpu-tiny-test.yaml")],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert result["num_params"] > 2
    for label in ("lone", "one bucket"):
        r = result[label]
        assert r["in_order"] and r["differ"] == [] and r["still_gathered"] == [], (label, r)
        assert r["sequential_calls"] == 0, (label, r)
