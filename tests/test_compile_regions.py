"""``model.compile_regions``: the trained policy with its MLPs, RMSNorms and rotary embedding compiled trains
the same as the eager one, and one compilation serves every later prompt and completion length.

The engines run in a child process: compiling replaces the modelling file's rotary function for the whole
process, and other tests in this one must keep the eager model. There a one-rank ZeRO-2 engine (gloo, fp32)
trains 4 steps eagerly, then a second engine, built from the same weights with compile_regions on, trains the
same 4 batches. Each step has other prompt and completion lengths (and the third mixes prompt lengths, so rows
are padded). Compared: each step's loss and grad norm, and the weights after the 4 steps.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.trainer_support import REPO, child_env, free_port
from trainer.config import ConfigError, load_config

CHILD = r"""
import json, random, sys
import torch, torch.distributed as dist
from torch._dynamo.utils import counters
from trainer.config import load_config
from trainer.engine_setup import build_engine
from trainer.update_stage import TrainBatch, TrainRow, UpdateStage

model_dir, config = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")

# (prompt lengths, completion length) per step: 2 prompts x 4 completions
SHAPES = [((5, 5), 8), ((9, 9), 12), ((6, 11), 7), ((13, 13), 20)]
rng = random.Random(0)
batches = []
for step, (prompt_lens, length) in enumerate(SHAPES, start=1):
    rows = []
    for p_len in prompt_lens:
        prompt = [rng.randrange(3, 500) for _ in range(p_len)]
        for _ in range(4):
            completion = [rng.randrange(3, 500) for _ in range(length)]
            rows.append(TrainRow(prompt, completion, rng.uniform(-1, 1), [-1.0] * length))
    batches.append(TrainBatch(step=step, rows=rows))

def train(compile_regions):
    cfg = load_config(config, [f"model.name_or_path={model_dir}", "deepspeed.zero_stage=2",
                               "model.dtype=float32", "optim.lr=1e-3", "optim.max_grad_norm=0",
                               f"model.compile_regions={str(compile_regions).lower()}"])
    engine, _, _ = build_engine(cfg, model_dir, 1, 100)
    before = {k: v.detach().clone() for k, v in engine.module.model.named_parameters()}
    stage = UpdateStage(engine, cfg.objective.loss_config(), pad_id=0, temperature=1.0, chunk_tokens=1024,
                        micro_batch_tokens=1 << 20, max_completion_length=32, rank=0, world_size=1,
                        device=torch.device("cpu"), share_prompts=True)
    steps, graphs = [], []
    for batch in batches:
        r = stage.step(batch)
        steps.append({"loss": r.loss, "grad_norm": r.grad_norm})
        graphs.append(counters["stats"]["unique_graphs"])
    weights = {k: v.detach().clone() for k, v in engine.module.model.named_parameters()}
    moved = max((weights[k] - before[k]).abs().max().item() for k in weights)
    return steps, graphs, weights, engine.module.model, moved

eager_steps, eager_graphs, eager_w, _, moved = train(False)
compiled_steps, graphs, compiled_w, model, _ = train(True)
print("RESULT " + json.dumps({
    "eager": eager_steps, "compiled": compiled_steps, "eager_graphs": eager_graphs, "graphs": graphs,
    "moved": moved,
    "max_weight_diff": max((eager_w[k] - compiled_w[k]).abs().max().item() for k in eager_w),
    "compiled_mlps": sum(type(m).__name__.endswith("MLP") and getattr(m, "_compiled_call_impl", None) is not None
                         for m in model.modules()),
}))
"""


def test_compiled_regions_train_like_the_eager_model_and_compile_once(tiny_model_dir, tmp_path):
    script = tmp_path / "compile_child.py"
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
        timeout=600,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(lines[-1].removeprefix("RESULT "))
    assert r["compiled_mlps"] == 2, r  # the tiny model's two layers
    assert r["eager_graphs"] == [0, 0, 0, 0], r  # the eager engine compiled nothing
    assert r["graphs"][0] > 0, r
    # Steps 2-4 bring new prompt and completion lengths (and padded rows) but no new graph.
    assert r["graphs"] == [r["graphs"][0]] * 4, r
    for e, c in zip(r["eager"], r["compiled"], strict=True):
        assert c["loss"] == pytest.approx(e["loss"], rel=1e-5, abs=1e-7), r
        assert c["grad_norm"] == pytest.approx(e["grad_norm"], rel=1e-5), r
    # Adam moved the weights by 4e-3; the fused kernels round differently (6e-6 measured).
    assert r["moved"] > 1e-3 and r["max_weight_diff"] < 1e-4, r


def test_compile_regions_is_refused_under_zero3():
    with pytest.raises(ConfigError, match="compile_regions needs deepspeed.zero_stage 2"):
        load_config(
            str(REPO / "configs/cpu-tiny-test.yaml"), ["model.compile_regions=true", "deepspeed.zero_stage=3"]
        )
