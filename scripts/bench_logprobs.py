"""Benchmark: peak memory and time of chunked vs naive (full-logits) per-token log-probs, forward + backward.

Each configuration runs in a fresh subprocess (so one run's allocations cannot inflate the next one's peak),
which reports its own peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) and wall times. The naive path
materialises [B, T, vocab] float32 logits; it is skipped, with the reason printed, when its estimated peak
(6 x B x T x V x 4 bytes: logits, log-softmax, entropy temporaries, gradients) exceeds 80% of the available
memory.

    make bench-logprobs                      # 16 x {1k, 4k, 8k} tokens, vocab 151,936, hidden 64, CPU, 1 thread
    .venv/bin/python scripts/bench_logprobs.py --tokens 1024 --batch 16 --skip-compare

Prints a markdown table. Runtime: the chunked 16 x 8k run alone is ~64 chunks x 2 of a 1024 x 151,936 matmul +
softmax, tens of minutes on one busy CPU core (measured 16 x 4k: 12 min); pass fewer ``--tokens`` for a quick run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# logits, log-softmax, exp/product for the entropy, d(log-softmax), d(logits): [B, T, V] float32 each.
# Measured: 5.1-5.5 buffers of peak RSS at 1 x {1k, 2k} tokens; 6 leaves a margin.
NAIVE_BUFFERS = 6


def _worker(args: argparse.Namespace) -> None:
    """Runs one configuration in this (fresh) process and prints one JSON line."""
    import torch

    sys.path.insert(0, str(REPO))
    from trainer.logprobs import chunked_token_logprobs

    # Warm-up: the first checkpointed call pays a one-off ~5 s import inside torch.utils.checkpoint; not timed.
    tiny = torch.randn(1, 4, 8, requires_grad=True)
    chunked_token_logprobs(tiny, torch.nn.Linear(8, 16), torch.zeros(1, 4, dtype=torch.long), chunk_tokens=2)[
        0
    ].sum().backward()

    torch.manual_seed(0)
    b, t, h, v = args.batch, args.tokens, args.hidden, args.vocab
    head = torch.nn.Linear(h, v, bias=False)  # [V, H] float32
    hidden = torch.randn(b, t, h, requires_grad=True)  # [B, T, H]
    targets = torch.randint(0, v, (b, t))  # [B, T]
    weights = torch.randn(b, t)  # [B, T] stands in for the loss's per-token coefficients
    base_rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    calls = [0]

    def progress(*_):  # the head runs once per chunk in forward and again in backward (recompute)
        calls[0] += 1
        if calls[0] % 8 == 0:
            peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(
                f"head call {calls[0]} at {time.perf_counter() - start:.0f} s, peak {peak_mb:.0f} MB",
                file=sys.stderr,
                flush=True,
            )

    head.register_forward_hook(progress)
    if args.mode == "chunked":
        logp, entropy = chunked_token_logprobs(
            hidden, head, targets, 0.9, args.chunk_tokens, with_entropy=True
        )
    else:
        log_p = (head(hidden) / 0.9).log_softmax(-1)  # [B, T, V] the tensor chunking avoids
        logp = log_p.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [B, T]
        entropy = -(log_p.exp() * log_p).sum(-1)  # [B, T]
    forward_s = time.perf_counter() - start
    ((logp * weights).sum() + 0.01 * entropy.sum()).backward()
    total_s = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {"base_mb": base_rss_kb / 1024, "peak_mb": peak_kb / 1024, "fwd_s": forward_s, "total_s": total_s}
        )
    )


def _available_bytes() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # /proc/meminfo on Linux without psutil
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
        raise


def _run(mode: str, batch: int, tokens: int, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "--mode",
        mode,
        "--batch",
        str(batch),
        "--tokens",
        str(tokens),
    ]
    cmd += [
        "--vocab",
        str(args.vocab),
        "--hidden",
        str(args.hidden),
        "--chunk-tokens",
        str(args.chunk_tokens),
    ]
    if mode == "naive":
        need = NAIVE_BUFFERS * batch * tokens * args.vocab * 4
        avail = _available_bytes()
        if need > 0.8 * avail:
            reason = (
                f"skipped: needs ~{need / 2**30:.0f} GiB of logits buffers, {avail / 2**30:.0f} GiB available"
            )
            print(f"[bench] naive {batch}x{tokens}: {reason}", flush=True)
            return {"skipped": reason, "need_gb": need / 2**30}
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    print(f"[bench] {mode} {batch}x{tokens} ...", flush=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout_s)
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        last = err.strip().splitlines()[-1] if err.strip() else "no progress"
        return {"skipped": f"timed out after {args.timeout_s} s (last: {last}); raise --timeout-s"}
    if proc.returncode != 0:
        return {"skipped": f"failed (rc={proc.returncode}): {proc.stderr.strip()[-300:]}"}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"[bench]   -> {result}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["chunked", "naive"], default="chunked", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=16, help="completions per run")
    parser.add_argument(
        "--tokens", type=int, nargs="+", default=[1024, 4096, 8192], help="completion lengths"
    )
    parser.add_argument("--vocab", type=int, default=151_936, help="vocabulary size (Qwen2.5: 151,936)")
    parser.add_argument(
        "--hidden", type=int, default=64, help="hidden size (small: the head matmul is not the point)"
    )
    parser.add_argument("--chunk-tokens", type=int, default=1024, help="tokens per chunk")
    parser.add_argument(
        "--compare", type=str, default="1x1024,1x2048", help="extra BxT runs of both paths where naive fits"
    )
    parser.add_argument("--skip-compare", action="store_true", help="do not run the --compare configurations")
    parser.add_argument("--timeout-s", type=int, default=3600, help="limit per configuration")
    args = parser.parse_args()
    if args.worker:
        args.tokens = args.tokens[0]
        _worker(args)
        return

    configs = [(args.batch, t) for t in args.tokens]
    if not args.skip_compare and args.compare:
        configs = [tuple(int(x) for x in c.split("x")) for c in args.compare.split(",")] + configs
    rows = []
    for batch, tokens in configs:
        for mode in ("chunked", "naive"):
            rows.append((batch, tokens, mode, _run(mode, batch, tokens, args)))

    print(
        f"\nvocab {args.vocab:,}, hidden {args.hidden}, chunk_tokens {args.chunk_tokens}, float32, CPU, "
        "OMP_NUM_THREADS=1; forward + backward incl. entropy; peak RSS of a fresh process (torch import included)\n"
    )
    print("| completions x tokens | path | full fp32 logits | peak RSS | forward | fwd + bwd |")
    print("|---|---|---|---|---|---|")
    for batch, tokens, mode, r in rows:
        logits_gb = batch * tokens * args.vocab * 4 / 2**30
        if "skipped" in r:
            print(f"| {batch} x {tokens} | {mode} | {logits_gb:.1f} GiB | {r['skipped']} | - | - |")
        else:
            print(
                f"| {batch} x {tokens} | {mode} | {logits_gb:.1f} GiB | {r['peak_mb'] / 1024:.2f} GiB "
                f"(base {r['base_mb'] / 1024:.2f}) | {r['fwd_s']:.1f} s | {r['total_s']:.1f} s |"
            )


if __name__ == "__main__":
    main()
