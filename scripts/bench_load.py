"""Load benchmark of the rollout server's OpenAI API: N concurrent clients of the official `openai` SDK for a
fixed time against a real `python -m rollout_server` on 127.0.0.1, then one markdown table.

Each client (a thread with its own `openai.OpenAI`, no SDK retries) sends short chat completions
(`max_tokens` 16 by default) one after another until the duration is over (or it has sent
`--max-requests-per-client`). Reported: answers and errors by type, p50/p99/max latency of the answers,
throughput (answers/s, completion tokens/s), and the server's RSS (the server process and all its children,
e.g. vLLM's EngineCore and Worker) before the load, at its peak (sampled every 0.25 s) and after it (once the
last client is done and the server has had a few seconds to settle). A benchmark figure, not an assertion:
the numbers depend on the machine and on whatever else runs on it.

    python scripts/bench_load.py                                 # or: make bench-load
    python scripts/bench_load.py --duration 20 --clients 16
    python scripts/bench_load.py --backend vllm                  # make bench-load ARGS="--backend vllm"

The model is the tiny offline Qwen2 of the tests (trainer.tiny_model.build_tiny_model, in a temp dir) unless
`--model DIR` names another. Nothing leaves the machine: the server binds 127.0.0.1 and is stopped (its whole
process group) at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402
import openai  # noqa: E402
import psutil  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROMPTS = [
    "What is 7 + 5?",
    "Natalia sold clips to 48 of her friends in April. How many clips did she sell?",
    "A train travels 60 miles in 2 hours. What is its speed?",
    "Tom has 3 apples and buys 4 more. How many apples does he have?",
]


def tree_rss(pid: int) -> int:
    """RSS of a process and all its descendants, in bytes (0 once it is gone)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


class RssSampler(threading.Thread):
    def __init__(self, pid: int, every_s: float = 0.25):
        super().__init__(daemon=True)
        self.pid, self.every_s = pid, every_s
        self.peak = 0
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            self.stop_event.wait(self.every_s)


def error_kind(e: BaseException) -> str:
    """A short, stable name for an error: the SDK's class, with the HTTP status when there is one."""
    status = getattr(e, "status_code", None)
    return f"{type(e).__name__} ({status})" if status else type(e).__name__


def client_loop(i: int, url: str, model: str, args, end: float, out: dict, lock: threading.Lock) -> None:
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=args.request_timeout)
    latencies, tokens, errors = [], 0, collections.Counter()
    try:
        for j in range(args.max_requests_per_client):  # bounded in count, and in time just below
            if time.monotonic() >= end:
                break
            t0 = time.monotonic()
            try:
                r = client.chat.completions.create(
                    model=model,
                    messages=[{"role": "user", "content": PROMPTS[(i + j) % len(PROMPTS)]}],
                    max_tokens=args.max_tokens,
                    temperature=1.0,
                    seed=i * 100_000 + j,
                )
            except Exception as e:  # counted by kind; the loop goes on
                errors[error_kind(e)] += 1
                if isinstance(e, openai.APIConnectionError):
                    time.sleep(0.2)  # a dead server must not turn this loop into a busy spin
                continue
            if not r.choices:
                errors["answer without choices"] += 1
                continue
            latencies.append(time.monotonic() - t0)
            tokens += r.usage.completion_tokens if r.usage else 0
    finally:
        client.close()
        with lock:
            out["latencies"].extend(latencies)
            out["tokens"] += tokens
            out["errors"].update(errors)


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


def run(args) -> list[tuple[str, str]]:
    work = Path(tempfile.mkdtemp(prefix="bench-load-"))
    try:
        if args.model:
            model_dir = Path(args.model)
        else:
            from trainer.tiny_model import build_tiny_model

            model_dir = build_tiny_model(work / "tiny-model", seed=0)
        from rollout_server.spawn import ServerProcess

        t0 = time.monotonic()
        server = ServerProcess(
            model_dir,
            backend=args.backend,
            extra_args=("--log-level", "warning"),
            log_path=work / "server.log",
        )
        try:
            url = server.wait_ready(args.start_timeout)
            return load(args, server.proc, url, time.monotonic() - t0)
        finally:
            server.stop(grace_s=60)  # vLLM stops its engine processes first
    finally:
        shutil.rmtree(work, ignore_errors=True)


def load(args, proc: subprocess.Popen, url: str, start_s: float) -> list[tuple[str, str]]:
    warm = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=args.request_timeout)
    model = warm.models.list().data[0].id
    warm.chat.completions.create(
        model=model, messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=args.max_tokens
    )  # first request (lazy initialisation) is not part of the measurement
    warm.close()
    time.sleep(1.0)
    rss_before = tree_rss(proc.pid)

    out = {"latencies": [], "tokens": 0, "errors": collections.Counter()}
    lock = threading.Lock()
    sampler = RssSampler(proc.pid)
    sampler.start()
    t_start = time.monotonic()
    end = t_start + args.duration
    threads = [
        threading.Thread(target=client_loop, args=(i, url, model, args, end, out, lock), daemon=True)
        for i in range(args.clients)
    ]
    for t in threads:
        t.start()
    join_deadline = end + args.request_timeout + 30  # a request started just before the end may run that long
    for t in threads:
        t.join(timeout=max(0.1, join_deadline - time.monotonic()))
    elapsed = time.monotonic() - t_start
    hung = sum(t.is_alive() for t in threads)
    time.sleep(args.settle)
    sampler.stop_event.set()
    sampler.join(timeout=5)
    rss_after = tree_rss(proc.pid)
    try:
        health = httpx.get(url + "/health", timeout=10).json()
        alive = f"yes (ready={health.get('ready')})"
    except (httpx.HTTPError, ValueError) as e:
        alive = f"no ({type(e).__name__})"

    lat = sorted(out["latencies"])
    answers, errors = len(lat), sum(out["errors"].values())
    error_text = ", ".join(f"{k}: {v}" for k, v in out["errors"].most_common()) or "none"
    mib = 2**20
    return [
        ("backend", args.backend),
        ("clients x duration", f"{args.clients} x {args.duration:.0f} s (max_tokens {args.max_tokens})"),
        ("server start (to READY)", f"{start_s:.1f} s"),
        ("answers", str(answers)),
        ("errors", f"{errors} ({error_text})"),
        ("clients still waiting at the end", str(hung)),
        (
            "latency p50 / p99 / max",
            f"{percentile(lat, 50):.3f} / {percentile(lat, 99):.3f} / "
            f"{lat[-1] if lat else float('nan'):.3f} s",
        ),
        (
            "throughput",
            f"{answers / elapsed:.1f} answers/s, {out['tokens'] / elapsed:.0f} completion tokens/s",
        ),
        (
            "server RSS before / peak / after",
            f"{rss_before / mib:.0f} / {sampler.peak / mib:.0f} / "
            f"{rss_after / mib:.0f} MiB (after {args.settle:.0f} s idle)",
        ),
        ("server answers /health after", alive),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=["torch", "vllm"], default="torch")
    p.add_argument("--clients", type=int, default=32, help="Concurrent OpenAI clients (threads).")
    p.add_argument("--duration", type=float, default=60.0, help="Seconds of load.")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument(
        "--max-requests-per-client", type=int, default=100_000, help="Bound on each client's loop."
    )
    p.add_argument("--request-timeout", type=float, default=60.0, help="Per-request timeout, seconds.")
    p.add_argument(
        "--start-timeout", type=float, default=400.0, help="Seconds the server has to print READY."
    )
    p.add_argument("--settle", type=float, default=3.0, help="Seconds idle before the 'after' RSS sample.")
    p.add_argument("--model", default=None, help="Model directory (default: build the tiny test model).")
    args = p.parse_args()
    if args.clients < 1 or args.duration <= 0:
        p.error("--clients must be >= 1 and --duration > 0")
    rows = run(args)
    print(
        f"\n### Load: {args.clients} concurrent OpenAI-SDK clients, chat completions, {args.backend} backend\n"
    )
    print("| metric | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
