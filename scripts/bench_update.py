"""Time the update side alone (one GRPO optimizer step of the DeepSpeed engine) with and without sharing prompts.

    python scripts/bench_update.py                              # = make bench-update
    python scripts/bench_update.py --prompts 1 --tokens 256 --model small
    python scripts/bench_update.py --compare compile            # model.compile_regions on against off

One process, one rank (ZeRO-2 over gloo, fp32), a tiny Qwen2 of one of bench-vs-trl's shapes built here, a synthetic scored
batch: ``--prompts`` prompts of ``--prompt-tokens`` tokens, 16 completions of exactly ``--tokens`` tokens each.
The same engine runs ``UpdateStage.step`` with ``share_prompts`` on (each distinct prompt through the model
once, its completions on its cached keys/values) and off (every row is prompt + completion), alternating, for
``--repeats`` rounds after one warm-up of each; it prints the median and min of each and their ratio.
``--compare compile`` instead runs one engine (prompts shared) with ``model.compile_regions``'s regions
compiled and eager in alternation (``CompiledRegions.enable`` switches them between steps, so both sides
train the same engine); its warm-up step includes the compilation.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_vs_trl import MODELS  # noqa: E402  (the same model shapes as the TRL comparison)

# Besides bench-vs-trl's tiny shapes, the reference model's shape with random weights (for GPU runs; the
# tokenizer is the offline one, the embedding has Qwen's 151,936 rows).
SHAPES = {
    **MODELS,
    "qwen2.5-0.5b": dict(
        hidden_size=896,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        intermediate_size=4864,
        vocab_size=151936,
        max_position_embeddings=32768,
    ),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument(
        "--prompt-tokens", type=int, default=57, help="the benchmark prompts' length (bench-vs-trl)"
    )
    p.add_argument("--tokens", type=int, default=64, help="completion length")
    p.add_argument("--generations", type=int, default=16)
    p.add_argument(
        "--model", choices=sorted(SHAPES), default="large", help="bench-vs-trl's shapes, or Qwen2.5-0.5B's"
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: bf16 over NCCL")
    p.add_argument("--zero-stage", type=int, choices=[2, 3], default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--compare",
        choices=["share", "compile"],
        default="share",
        help="share: share_prompt_forward on vs off; compile: model.compile_regions on vs off",
    )
    a = p.parse_args()
    if a.compare == "compile" and a.zero_stage == 3:
        p.error("--compare compile needs --zero-stage 2 (model.compile_regions is ZeRO-2 only)")

    import torch
    import torch.distributed as dist

    from rollout_server.spawn import free_port
    from trainer.compile_regions import compile_regions
    from trainer.config import load_config
    from trainer.engine_setup import build_engine
    from trainer.tiny_model import build_tiny_model
    from trainer.update_stage import TrainBatch, TrainRow, UpdateStage

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1"
    )
    cuda = a.device == "cuda"
    if cuda:
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if cuda else "gloo")
    model_dir = Path(tempfile.mkdtemp(prefix="bench-update-"))
    build_tiny_model(model_dir, **SHAPES[a.model])
    cfg = load_config(
        "configs/cpu-tiny-test.yaml",
        [
            f"model.name_or_path={model_dir}",
            f"deepspeed.zero_stage={a.zero_stage}",
            "objective.loss_type=dapo",
            f"model.dtype={'bfloat16' if cuda else 'float32'}",
        ],
    )
    engine, _, _ = build_engine(cfg, str(model_dir), 1, 1000)
    # compile: compiled on one side, eager on the other, the same engine (regions.enable switches them)
    regions = compile_regions(engine.module.model) if a.compare == "compile" else None
    stages = {
        on: UpdateStage(
            engine,
            cfg.objective.loss_config(),
            pad_id=0,
            temperature=1.0,
            chunk_tokens=1024,
            micro_batch_tokens=1 << 20,
            max_completion_length=a.tokens,
            rank=0,
            world_size=1,
            device=torch.device(a.device),
            # the compile comparison runs with the default (prompts shared) on both sides
            share_prompts=on or a.compare == "compile",
        )
        for on in (True, False)
    }
    rng = random.Random(0)
    vocab = engine.module.model.config.vocab_size
    rows = []
    for _ in range(a.prompts):
        prompt = [rng.randrange(3, vocab) for _ in range(a.prompt_tokens)]
        for _ in range(a.generations):
            completion = [rng.randrange(3, vocab) for _ in range(a.tokens)]
            rows.append(TrainRow(prompt, completion, rng.uniform(-1, 1), [-1.0] * a.tokens))
    times: dict[bool, list[float]] = {True: [], False: []}
    for r in range(a.repeats + 1):
        for on, stage in stages.items():
            if regions:
                regions.enable(on)
            t0 = time.perf_counter()
            stage.step(TrainBatch(step=r, rows=rows))
            if cuda:
                torch.cuda.synchronize()
            if r:  # round 0 is the warm-up
                times[on].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    where = torch.cuda.get_device_name(0) if cuda else "cpu"
    print(
        f"\n{a.model} model {SHAPES[a.model]} ({n_params / 1e6:.1f}M parameters) on {where}, ZeRO-{a.zero_stage}, "
        f"{cfg.model.dtype}; {a.prompts} prompts x {a.generations} completions; prompt {a.prompt_tokens} + "
        f"completion {a.tokens} tokens; {a.repeats} rounds, alternating\n"
    )
    if cuda:
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB\n")
    label = "share_prompt_forward" if a.compare == "share" else "compile_regions"
    print(f"| {label} | step median (min) s | vs off |\n|---|---|---|")
    for on in (True, False):
        print(
            f"| {'on' if on else 'off'} | {med[on]:.3f} ({min(times[on]):.3f}) | "
            f"{med[on] / med[False]:.2f}x |"
        )
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
