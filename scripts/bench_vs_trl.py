"""Our GRPO step against TRL's ``GRPOTrainer`` on identical work, alternating the systems in one run.

    python scripts/bench_vs_trl.py                        # = make bench-vs-trl (every configuration)
    python scripts/bench_vs_trl.py --configs small:64:1 --steps 4 --rounds 1

Configuration ``MODEL:L:P``: model ``small`` (the CPU demo's shape: hidden 64, 2 layers) or ``large`` (hidden
256, 4 layers), 16 completions of exactly ``L`` tokens (EOS ignored on our side, ``min_new_tokens = L`` on
TRL's; the lengths obtained are checked), ``P`` prompts per step. Both systems: the same local model folder,
the same arithmetic prompts in the same order, the reference reward set, DAPO loss, beta 0, AdamW, fp32,
one optimizer step per batch; TRL with its default generation (transformers ``generate``), ours with a torch
rollout server on its own process, with ``rollout.max_off_policy_steps`` 0 (on-policy) and 1 (generation of
step s+1 overlapped with training of step s), and ``ours-1c``: ours-1 with ``model.compile_regions`` (the
trained policy's MLPs, norms and rotary embedding compiled; its first step pays the compilation, which the
dropped warm-up steps absorb). TRL has a ``torch_compile`` option too; it is not used here (its default).

Each round runs every system once per configuration, in alternation (ours-0, ours-1, ours-1c, TRL, then the
next round; ``--systems`` picks a subset), each for ``--steps`` steps in a fresh process; the first ``--warmup`` steps of each run are dropped.
Step times are pooled over rounds: median, min, max, and the ratio of medians. For ours the time split is
the update side's: waiting for rollouts (idle), train, sync; generation runs on the server meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODELS = {
    "small": dict(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128),
    "large": dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=512),
}
LR = 1e-5
DEFAULT_CONFIGS = [f"{m}:{L}:{P}" for m in MODELS for L in (64, 256) for P in (1, 4)]
# our systems: name -> (rollout.max_off_policy_steps, model.compile_regions)
OURS = {"ours-0": (0, False), "ours-1": (1, False), "ours-1c": (1, True)}
SYSTEMS = [*OURS, "trl"]


def parse_config(text: str) -> tuple[str, int, int]:
    model, length, prompts = text.split(":")
    if model not in MODELS:
        raise SystemExit(f"unknown model {model!r} in {text!r}; choose from {sorted(MODELS)}")
    return model, int(length), int(prompts)


# ---- one run of our service (child process) -----------------------------------------------------------------
def run_ours(
    model_dir: Path,
    work: Path,
    length: int,
    prompts: int,
    steps: int,
    off_policy: int,
    compiled: bool,
    url: str,
):
    from trainer.loop import run_training
    from trainer.metrics_log import read_jsonl

    name = f"ours-{off_policy}-{int(time.time() * 1000)}"
    overrides = [
        f"model.name_or_path={model_dir}",
        f"run.output_dir={work}",
        f"run.name={name}",
        "deepspeed.zero_stage=2",
        f"optim.prompts_per_step={prompts}",
        f"optim.max_steps={steps}",
        f"optim.lr={LR}",
        "optim.micro_batch_tokens=65536",
        "generation.num_generations=16",
        f"generation.max_completion_length={length}",
        "generation.ignore_eos=true",
        "objective.loss_type=dapo",
        "objective.logprob_chunk_tokens=1024",
        f"objective.importance_sampling_cap={3.0 if off_policy else 'null'}",
        f"rollout.max_off_policy_steps={off_policy}",
        f"model.compile_regions={str(compiled).lower()}",
        f"rollout.server_urls=[{url}]",
        "rollout.sync_bucket_mb=256",
        "checkpoint.every_steps=0",
        "checkpoint.save_final=false",
        "logging.tensorboard=false",
        "logging.completions_every_steps=0",
    ]
    run_training("configs/cpu-tiny-test.yaml", overrides)
    rows = read_jsonl(work / name / "metrics.jsonl")
    return [
        {
            "step_s": r["time/step"],
            "generate_s": r["time/generate"],
            "wait_s": r["time/wait_rollout"],
            "train_s": r["time/train"],
            "sync_s": r["time/sync"],
            "mean_len": r["completion_length/mean"],
            "lag": r["weight_version/lag"],
        }
        for r in rows
    ]


# ---- one run of TRL's GRPOTrainer (child process) -------------------------------------------------------------
def run_trl(model_dir: Path, work: Path, length: int, prompts: int, steps: int):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from trainer.config import load_config
    from trainer.data import load_prompts
    from trainer.rewards import RewardSet

    torch.set_num_threads(1)
    cfg = load_config("configs/cpu-tiny-test.yaml", [f"model.name_or_path={model_dir}"])
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = load_prompts(cfg.data, tok, "train").rows
    ds = Dataset.from_list([{"prompt": r["prompt_text"], "gold": r["gold"]} for r in rows])
    rewards = RewardSet.from_train_config(cfg)

    def reference_rewards(prompts=None, completions=(), **columns):
        return rewards(prompts, completions, **columns).total

    times: list[float] = []
    lengths: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                lengths.append(float(logs["completions/mean_length"]))

    args = GRPOConfig(
        output_dir=str(work / "trl-out"),
        per_device_train_batch_size=16 * prompts,
        gradient_accumulation_steps=1,
        num_generations=16,
        max_completion_length=length,
        generation_kwargs={"min_new_tokens": length},
        temperature=1.0,
        loss_type="dapo",
        beta=0.0,
        learning_rate=LR,
        adam_beta1=0.9,
        adam_beta2=0.99,
        weight_decay=0.1,
        max_grad_norm=0.1,
        lr_scheduler_type="constant",
        max_steps=steps,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        bf16=False,
        use_cpu=True,
        seed=0,
        shuffle_dataset=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reference_rewards,
        args=args,
        train_dataset=ds,
        processing_class=tok,
        callbacks=[Timer()],
    )
    trainer.train()
    return [{"step_s": t, "mean_len": lengths[i] if i < len(lengths) else None} for i, t in enumerate(times)]


# ---- the driver -----------------------------------------------------------------------------------------------
def child(kind: str, a: argparse.Namespace) -> int:
    model, length, prompts = parse_config(a.config)
    model_dir = a.work / f"model-{model}"
    if kind == "trl":
        rows = run_trl(model_dir, a.work, length, prompts, a.steps)
    else:
        off_policy, compiled = OURS[kind]
        rows = run_ours(model_dir, a.work, length, prompts, a.steps, off_policy, compiled, a.url)
    print("RESULT " + json.dumps(rows), flush=True)
    return 0


def spawn(kind: str, config: str, a: argparse.Namespace, work: Path, url: str | None) -> list[dict]:
    cmd = [sys.executable, __file__, "--child", kind, "--config1", config, "--steps", str(a.steps)]
    cmd += ["--work", str(work)] + (["--url", url] if url else [])
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=a.timeout)
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{kind} {config} failed (exit {r.returncode}):\n{(r.stdout + r.stderr)[-4000:]}")


def summary(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="MODEL:L:P (see above)")
    p.add_argument("--steps", type=int, default=5, help="steps per run (the first --warmup are dropped)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="alternations of the systems")
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=SYSTEMS, help="which systems to run")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    p.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--config1", default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--url", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    for k, v in {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}.items():
        os.environ.setdefault(k, v)
    if a.child:
        a.config = a.config1
        return child(a.child, a)
    if a.steps <= a.warmup:
        p.error("--steps must exceed --warmup")

    from tests.trainer_support import rollout_server
    from trainer.tiny_model import build_tiny_model

    systems = [s for s in SYSTEMS if s in a.systems]
    if "trl" not in systems:
        p.error("--systems must include trl (the ratios are to it)")
    results: dict[str, dict[str, list[dict]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-vs-trl-") as tmp:
        work = Path(tmp)
        for name, shape in MODELS.items():
            if any(c.startswith(name + ":") for c in a.configs):
                build_tiny_model(work / f"model-{name}", max_position_embeddings=1024, **shape)
        for config in a.configs:
            model, length, prompts = parse_config(config)
            results[config] = {s: [] for s in systems}
            log = work / f"server-{model}.log"
            with rollout_server(work / f"model-{model}", log, ready_timeout_s=300) as (url, _):
                for rnd in range(a.rounds):
                    for system in systems:
                        t0 = time.perf_counter()
                        rows = spawn(system, config, a, work, url if system != "trl" else None)
                        results[config][system].extend(rows[a.warmup :])
                        med = statistics.median(r["step_s"] for r in rows[a.warmup :])
                        print(
                            f"[{config} round {rnd + 1}] {system}: median step {med:.2f}s "
                            f"(run {time.perf_counter() - t0:.0f}s)",
                            flush=True,
                        )
    lines = [
        "| config (model:L:prompts) | system | step median (min-max) s | / TRL | generate | wait (idle) | train "
        "| sync | mean length | lag |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for config, by_system in results.items():
        trl_med = summary([r["step_s"] for r in by_system["trl"]])[0]
        for system in systems:
            rows = by_system[system]
            med, lo, hi = summary([r["step_s"] for r in rows])
            lens = [r["mean_len"] for r in rows if r.get("mean_len") is not None]
            mean_len = f"{statistics.mean(lens):.1f}" if lens else "?"

            def part(key: str, rows=rows) -> str:
                vals = [r[key] for r in rows if key in r]
                return f"{statistics.median(vals):.2f}" if vals else "-"

            lines.append(
                f"| {config} | {system} | {med:.2f} ({lo:.2f}-{hi:.2f}) | {med / trl_med:.2f} | "
                f"{part('generate_s')} | {part('wait_s')} | {part('train_s')} | {part('sync_s')} | {mean_len} | "
                f"{part('lag')} |"
            )
    text = "\n".join(lines)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
