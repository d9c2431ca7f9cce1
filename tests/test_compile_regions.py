"""``model.compile_regions``: the trained policy with its MLPs, RMSNorms and rotary embedding compiled trains
the same as the eager one, and the graphs compiled in the first steps serve every later length.

The engines run in a child process: compiling replaces the modelling file's rotary function for the whole
process, and other tests in this one must keep the eager model. There a one-rank ZeRO-2 engine (gloo, fp32,
two updates per batch, so each step also runs a no-grad pass) trains 5 steps eagerly; then an engine built
from the same weights with compile_regions on, and one with gradient checkpointing as well, train the same 5
batches. Step 1 has one prompt, step 2 two, steps 3-5 new prompt and completion lengths (step 3 mixes prompt
lengths, so rows are padded). Compared: each step's loss and grad norm, the weights after the 5 steps, and the
number of compiled graphs after each step; reaching dynamo's limit of compiled variants is made an error.
"""

from __future__ import annotations

import pytest

from tests.trainer_support import REPO, run_one_rank_child
from trainer.config import ConfigError, load_config

CHILD = r"""
import json, random, sys
import torch, torch.distributed as dist
import torch._dynamo
from torch._dynamo.utils import counters
from trainer.compile_regions import is_compiled
from trainer.config import load_config
from trainer.engine_setup import build_engine
from trainer.update_stage import TrainBatch, TrainRow, UpdateStage

# Hitting the limit of compiled variants must fail here, not fall back to eager with a warning.
torch._dynamo.config.fail_on_recompile_limit_hit = True
model_dir, config = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")

# (prompt lengths, completion length) per step, 4 completions per prompt: one prompt first (the prompt pass
# has batch 1), then new lengths at every step and, at step 3, prompts of two lengths (padded rows).
SHAPES = [((5,), 8), ((9, 9), 12), ((6, 11), 7), ((13, 13), 20), ((4, 7), 10)]
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

def train(*extra):
    # num_iterations 2: each step also runs a no-grad pass (the old log-probs) before its two updates
    cfg = load_config(config, [f"model.name_or_path={model_dir}", "deepspeed.zero_stage=2",
                               "model.dtype=float32", "optim.lr=1e-3", "optim.max_grad_norm=0",
                               "objective.num_iterations=2", *extra])
    engine, _, _ = build_engine(cfg, model_dir, 1, 100)
    model = engine.module.model
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    stage = UpdateStage(engine, cfg.objective.loss_config(), pad_id=0, temperature=1.0, chunk_tokens=1024,
                        micro_batch_tokens=1 << 20, max_completion_length=32, rank=0, world_size=1,
                        device=torch.device("cpu"), share_prompts=True)
    steps, graphs = [], []
    for batch in batches:
        r = stage.step(batch)
        steps.append({"loss": r.loss, "grad_norm": r.grad_norm})
        graphs.append(counters["stats"]["unique_graphs"])
    weights = {k: v.detach().clone() for k, v in model.named_parameters()}
    return {
        "steps": steps,
        "graphs": graphs,
        "weights": weights,
        "moved": max((weights[k] - before[k]).abs().max().item() for k in weights),
        "compiled": sorted({type(m).__name__ for m in model.modules() if is_compiled(m.forward)}),
        "compiled_modules": sum(is_compiled(m.forward) for m in model.modules()),
        "num_modules": sum(type(m).__name__.endswith(("MLP", "RMSNorm")) for m in model.modules()),
    }

# The eager run first: compiling replaces the rotary function for the whole process.
runs = {"eager": train(), "compiled": train("model.compile_regions=true")}
runs["checkpointed"] = train("model.compile_regions=true", "model.gradient_checkpointing=true")
eager_w = runs["eager"]["weights"]
for r in runs.values():
    r["max_weight_diff"] = max((eager_w[k] - r["weights"][k]).abs().max().item() for k in eager_w)
    del r["weights"]
print("RESULT " + json.dumps(runs))
"""


@pytest.mark.slow
def test_compiled_regions_train_like_the_eager_model_and_compile_once(tiny_model_dir, tmp_path):
    runs = run_one_rank_child(
        CHILD, tmp_path, str(tiny_model_dir), str(REPO / "configs/cpu-tiny-test.yaml"), timeout_s=600
    )
    eager, compiled, checkpointed = runs["eager"], runs["compiled"], runs["checkpointed"]
    assert eager["compiled"] == [] and eager["graphs"] == [0] * 5, eager  # the eager engine compiled nothing
    # The tiny model: 2 layers x (MLP + 2 norms) + the final norm, every one compiled.
    assert compiled["compiled"] == ["Qwen2MLP", "Qwen2RMSNorm"], compiled
    assert compiled["compiled_modules"] == compiled["num_modules"] == 7, compiled
    # One prompt at step 1 and two at step 2 bring their own variants; steps 3-5 bring new prompt and
    # completion lengths and padded rows, but no new graph. Under gradient checkpointing every row is prompt
    # + completion (no shared prompt pass): its variants come at step 1, none later.
    g, gc = compiled["graphs"], checkpointed["graphs"]
    assert g[0] > 0 and g[2:] == [g[1]] * 3, g
    assert gc[0] >= g[-1] and gc == [gc[0]] * 5, gc
    for run in (compiled, checkpointed):
        for e, c in zip(eager["steps"], run["steps"], strict=True):
            assert c["loss"] == pytest.approx(e["loss"], rel=1e-5, abs=1e-7), runs
            assert c["grad_norm"] == pytest.approx(e["grad_norm"], rel=1e-5), runs
        # Adam moved the weights by more than 1e-3; fused kernels round differently (6e-6 measured).
        assert run["moved"] > 1e-3 and run["max_weight_diff"] < 1e-4, runs


def test_compile_regions_is_refused_under_zero3():
    with pytest.raises(ConfigError, match="compile_regions needs deepspeed.zero_stage 2"):
        load_config(
            str(REPO / "configs/cpu-tiny-test.yaml"), ["model.compile_regions=true", "deepspeed.zero_stage=3"]
        )
