"""Benchmark one GRPO training step end to end on CPU: time split (generate / reward / train / sync) and memory.

    python scripts/bench_train.py                      # = make bench-train; lengths 256, 1024, 4096
    python scripts/bench_train.py --lengths 256 --steps 2

For each completion length L: a tiny Qwen2 model (built here, context 8192), one torch rollout server, one
trainer process (DeepSpeed ZeRO-2 over gloo, fp32); each step is 1 prompt x 16 completions of exactly L
tokens (``generation.ignore_eos``), micro-batches of ``--micro-batch-tokens``. The first step (warm-up) is
dropped; the table gives the mean of the others, the trainer's peak RSS and the server's peak RSS (VmHWM).
Each length runs in fresh processes so peak memory is per length.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one_length(length: int, steps: int, micro_batch_tokens: int, model_dir: Path, work: Path) -> dict:
    """Start a server, train ``steps`` steps in this process, return the measured numbers."""
    from tests.trainer_support import rollout_server
    from trainer.loop import run_training
    from trainer.metrics_log import read_jsonl

    with rollout_server(model_dir, work / f"server-{length}.log", ready_timeout_s=300) as (url, server):
        overrides = [
            f"model.name_or_path={model_dir}",
            f"run.output_dir={work}",
            f"run.name=bench-{length}",
            "deepspeed.zero_stage=2",
            "optim.prompts_per_step=1",
            f"optim.max_steps={steps}",
            f"optim.micro_batch_tokens={micro_batch_tokens}",
            "generation.num_generations=16",
            f"generation.max_completion_length={length}",
            "generation.ignore_eos=true",
            "objective.logprob_chunk_tokens=1024",
            "data.max_prompt_length=256",
            f"rollout.server_urls=[{url}]",
            "rollout.request_timeout_s=1800",
            "rollout.sync_timeout_s=300",
            "checkpoint.every_steps=0",
            "checkpoint.save_final=false",
            "logging.tensorboard=false",
            "logging.completions_every_steps=0",
        ]
        run_training("configs/cpu-tiny-test.yaml", overrides)
        server_peak = _vm_hwm_mb(server.pid)
    rows = read_jsonl(work / f"bench-{length}" / "metrics.jsonl")[1:]  # drop the warm-up step
    keys = [
        "time/generate",
        "time/reward",
        "time/train",
        "time/sync",
        "time/step",
        "tokens_per_s",
        "micro_batches",
    ]
    out = {k: sum(r[k] for r in rows) / len(rows) for k in keys}
    out["completion_tokens"] = rows[0]["tokens/completion"]
    out["trainer_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["server_peak_rss_mb"] = server_peak
    out["length"] = length
    out["steps_measured"] = len(rows)
    return out


def table(results: list[dict]) -> str:
    lines = [
        "| completion tokens | completions x tokens | generate s | reward s | train s | sync s | step s | "
        "tokens/s | micro-batches | trainer peak RSS MB | server peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['length']} | 16 x {r['completion_tokens'] // 16} | {r['time/generate']:.2f} | {r['time/reward']:.3f} | "
            f"{r['time/train']:.2f} | {r['time/sync']:.3f} | {r['time/step']:.2f} | {r['tokens_per_s']:.0f} | "
            f"{r['micro_batches']:.0f} | {r['trainer_peak_rss_mb']:.0f} | {r['server_peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--steps", type=int, default=3, help="steps per length (the first is warm-up)")
    p.add_argument("--micro-batch-tokens", type=int, default=16384)
    p.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # child mode: one length
    p.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if a.one is not None:
        res = one_length(a.one, a.steps, a.micro_batch_tokens, a.work / "tiny-model", a.work)
        print("RESULT " + json.dumps(res))
        return 0

    from trainer.tiny_model import build_tiny_model

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        work = Path(tmp)
        gsm8k = REPO.parent / "shared" / "data" / "gsm8k"
        build_tiny_model(
            work / "tiny-model", gsm8k_dir=gsm8k if gsm8k.exists() else None, max_position_embeddings=8192
        )
        results = []
        for length in a.lengths:
            t0 = time.perf_counter()
            r = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--one",
                    str(length),
                    "--steps",
                    str(a.steps),
                    "--work",
                    str(work),
                    "--micro-batch-tokens",
                    str(a.micro_batch_tokens),
                ],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=3600,
            )
            line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
            if r.returncode != 0 or line is None:
                print(r.stdout[-3000:], r.stderr[-3000:], file=sys.stderr)
                return 1
            results.append(json.loads(line[len("RESULT ") :]))
            print(f"length {length}: done in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    md = table(results)
    print(md)
    if a.out:
        a.out.write_text(md + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
