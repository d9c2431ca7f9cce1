"""GPU check: the paths that the CPU machines never run, in one go on one CUDA GPU (the `device` tool's H200).

    bash scripts/gpu_wheels.sh                 # here, once: the wheels the GPU machine lacks, into .whl/
    device run, carry [".whl"]: bash scripts/gpu_check.sh    # there: installs them, then runs this script
    python scripts/gpu_check.py --device cpu --shape small    # the same plumbing on a CPU machine (minutes)

What it runs, in this order (each part is reported even when a later one fails), into --out (default $OUT):
1. the environment: torch, CUDA, DeepSpeed and transformers versions, the GPU;
2. the update side alone (`scripts/bench_update.py`): one DeepSpeed ZeRO-2 optimizer step in bf16 on a
   random-init model of Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate 4864,
   vocab 151,936, tied embeddings), for 1 and for 4 prompts x 16 completions x 200 tokens (the recipe's
   completion cap), with prompts shared and not; median of the repeats, peak GPU memory;
3. the whole trainer, `configs/qwen2.5-0.5b-gsm8k.yaml` as shipped (bf16, beta 0.04 so the reference model
   too, ZeRO-2, 4 prompts x 16 completions of up to 200 tokens) on the same random-init model and the offline
   arithmetic task, for --steps steps against a torch-backend rollout server on the same GPU, checkpoint and
   HF export at the last step, the server probed after every push. The weights go over gloo: NCCL refuses
   two ranks on one GPU, so the NCCL push needs a second GPU (not tried here).

Results: gpu_check.json (every number below), gpu_check.md (the summary), and the logs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.trainer_support import child_env  # noqa: E402  (OMP 1 thread, offline hub, this checkout first)

SHAPES = {"qwen2.5-0.5b": "qwen2.5-0.5b", "small": "large"}  # --shape -> bench_update's --model


def env_report() -> dict:
    import torch

    out = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.cuda.is_available()}
    for pkg in ("deepspeed", "transformers", "pydantic", "fastapi"):
        try:
            import importlib.metadata as md

            out[pkg] = md.version(pkg)
        except Exception as e:  # reported, not fatal: the part that needs it fails with its own message
            out[pkg] = f"missing ({e})"
    if out["cuda"]:
        p = torch.cuda.get_device_properties(0)
        out["gpu"] = {
            "name": p.name,
            "memory_gib": round(p.total_memory / 2**30, 1),
            "count": torch.cuda.device_count(),
        }
    return out


def bench_update(shape: str, device: str, prompts: int, tokens: int, repeats: int, log: Path) -> dict:
    from rollout_server.spawn import free_port

    cmd = [
        sys.executable,
        str(REPO / "scripts/bench_update.py"),
        "--model",
        SHAPES[shape],
        "--device",
        device,
    ]
    cmd += ["--prompts", str(prompts), "--tokens", str(tokens), "--repeats", str(repeats)]
    env = child_env()
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    log.write_text(proc.stdout + proc.stderr)
    result = {"cmd": " ".join(cmd[1:]), "exit": proc.returncode, "wall_s": round(time.time() - t0, 1)}
    rows = re.findall(r"\| (on|off) \| ([\d.]+) \(([\d.]+)\) \|", proc.stdout)
    result["step_s"] = {share: {"median": float(med), "min": float(mn)} for share, med, mn in rows}
    peak = re.search(r"peak GPU memory: ([\d.]+) GiB", proc.stdout)
    result["peak_gpu_gib"] = float(peak.group(1)) if peak else None
    head = re.search(r"\n(\S+ model .*)\n", proc.stdout)
    result["what"] = head.group(1) if head else None
    if proc.returncode:
        result["error_tail"] = (proc.stdout + proc.stderr)[-3000:]
    return result


def build_model(shape: str, out: Path) -> Path:
    sys.path.insert(0, str(REPO / "scripts"))
    from bench_update import SHAPES as BENCH_SHAPES

    from trainer.tiny_model import build_tiny_model

    if not (out / "config.json").exists():
        build_tiny_model(out, **BENCH_SHAPES[SHAPES[shape]])
    return out


def trainer_run(model_dir: Path, device: str, steps: int, work: Path) -> dict:
    from rollout_server.spawn import ServerProcess, free_port
    from trainer.metrics_log import read_jsonl

    cuda = device == "cuda"
    result: dict = {}
    server_args = ["--device", "cuda:0" if cuda else "cpu", "--dtype", "bfloat16" if cuda else "float32"]
    with ServerProcess(
        model_dir, backend="torch", extra_args=server_args, env=child_env(), log_path=work / "server.log"
    ) as server:
        t0 = time.time()
        url = server.wait_ready(600)
        result["server_ready_s"] = round(time.time() - t0, 1)
        overrides = [
            f"model.name_or_path={model_dir}",
            f"model.dtype={'auto' if cuda else 'float32'}",
            "data.source=arithmetic",
            "data.arithmetic.n_train=2000",
            "data.arithmetic.n_test=50",
            f"run.output_dir={work}",
            "run.name=trainer",
            f"rollout.server_urls=[{url}]",
            f"rollout.sync_master_port={free_port()}",
            "rollout.sync_backend=gloo",  # NCCL refuses two ranks (trainer, server) on one GPU
            f"optim.max_steps={steps}",
            f"checkpoint.every_steps={steps}",
            "logging.tensorboard=false",
            "debug.probe_after_sync=true",
        ]
        if not cuda:
            overrides += ["generation.max_completion_length=32", "optim.prompts_per_step=1"]
        cmd = [sys.executable, "-m", "trainer", "--config", "configs/qwen2.5-0.5b-gsm8k.yaml", *overrides]
        t0 = time.time()
        with (work / "trainer.log").open("w") as log:
            proc = subprocess.run(
                cmd, cwd=REPO, env=child_env(), stdout=log, stderr=subprocess.STDOUT, timeout=1500
            )
        result.update(exit=proc.returncode, wall_s=round(time.time() - t0, 1), overrides=overrides)
    run_dir = work / "trainer"
    rows = read_jsonl(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
    keys = (
        "loss",
        "grad_norm",
        "kl",
        "reward/total/mean",
        "completion_length/mean",
        "tokens_per_s",
        "time/generate",
        "time/train",
        "time/sync",
        "sync/bytes",
        "sync/server_load_s",
        "sync/copied_bytes",
    )
    result["steps"] = [{"step": r["step"], **{k: r.get(k) for k in keys}} for r in rows]
    probes_path = run_dir / "debug" / "probes.jsonl"
    probes = read_jsonl(probes_path) if probes_path.exists() else []
    result["probes"] = [(p["pushed_version"], p["server_version"]) for p in probes]
    result["probes_ok"] = bool(probes) and all(a == b for a, b in result["probes"])
    result["checkpoint"] = (
        sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) if run_dir.exists() else []
    )
    if proc.returncode:
        result["error_tail"] = (work / "trainer.log").read_text()[-4000:]
    return result


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def summary(results: dict) -> str:
    lines = ["# GPU check", "", f"environment: `{json.dumps(results.get('env'))}`", ""]
    for key in ("update_1_prompt", "update_4_prompts"):
        r = results.get(key)
        if r:
            lines.append(
                f"- {key}: exit {r['exit']}, {r.get('what')}; step s (median/min) {r['step_s']}; "
                f"peak GPU {r['peak_gpu_gib']} GiB"
            )
    t = results.get("trainer")
    if t:
        lines.append(
            f"- trainer: exit {t.get('exit')}, {t.get('wall_s')} s, server ready in {t.get('server_ready_s')} s, "
            f"probes {t.get('probes')} ok={t.get('probes_ok')}, checkpoints {t.get('checkpoint')}"
        )
        lines += [
            "",
            "| step | loss | grad_norm | kl | reward | len | generate s | train s | sync s | sync MB |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for s in t.get("steps", []):
            cells = [
                _fmt(s.get(k))
                for k in ("loss", "grad_norm", "kl", "reward/total/mean", "completion_length/mean")
            ]
            cells += [_fmt(s.get(k)) for k in ("time/generate", "time/train", "time/sync")]
            cells.append(
                _fmt(s["sync/bytes"] * 1e-6) if isinstance(s.get("sync/bytes"), (int, float)) else "-"
            )
            lines.append(f"| {s['step']} | " + " | ".join(cells) + " |")
    for k, v in results.items():
        if isinstance(v, dict) and v.get("error_tail"):
            lines += ["", f"## {k} failed", "```", v["error_tail"][-2000:], "```"]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu-check")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-bench", action="store_true")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("GPU_CHECK_WORK", "/tmp/gpu-check"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"env": env_report()}
    print(json.dumps(results["env"]), flush=True)

    def save() -> None:
        (out / "gpu_check.json").write_text(json.dumps(results, indent=1))
        (out / "gpu_check.md").write_text(summary(results))

    tokens = 200 if a.device == "cuda" else 32
    if not a.skip_bench:
        for prompts, key in ((1, "update_1_prompt"), (4, "update_4_prompts")):
            print(f"[gpu-check] update side, {prompts} prompt(s)", flush=True)
            try:
                results[key] = bench_update(a.shape, a.device, prompts, tokens, a.repeats, out / f"{key}.log")
            except Exception as e:
                results[key] = {
                    "exit": -1,
                    "error_tail": f"{type(e).__name__}: {e}",
                    "step_s": {},
                    "peak_gpu_gib": None,
                }
            save()
    print("[gpu-check] trainer against a rollout server", flush=True)
    try:
        model_dir = build_model(a.shape, work / f"model-{a.shape}")
        results["trainer"] = trainer_run(model_dir, a.device, a.steps, work)
    except Exception as e:
        results["trainer"] = {"exit": -1, "error_tail": f"{type(e).__name__}: {e}"}
    for name in ("server.log", "trainer.log"):
        if (work / name).exists():
            (out / name).write_text((work / name).read_text()[-200_000:])
    save()
    print(summary(results), flush=True)
    ok = all(results[k].get("exit") == 0 for k in results if k != "env") and results["trainer"].get(
        "probes_ok"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
