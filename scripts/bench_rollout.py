"""Benchmark the rollout server's two hot paths and print a markdown table.

1. Generation: tokens/s of the PyTorch backend's engine (`torch_generate.generate_batch`, static-cache and
   generic HF-cache decoders) against plain `model.generate` on the same random Qwen2 model and the same batch
   (default 4 prompts x 16 samples x 128 tokens, hidden 256, 4 layers). Runs alternate and the best of
   `--repeats` is kept, so a busy shared machine penalises every method alike.
2. Weight sync: `WeightSyncClient.push` to a real `python -m rollout_server` process (HTTP handshake, buckets
   over gloo, unpack + swap on the server) against a raw gloo broadcast of the same number of bytes between two
   processes (one flat buffer, nothing else; and the same bytes in the push's own bucket sizes, which is
   what gloo alone costs per bucket), for a ~80 MB float32 model (`--sync-hidden 1024 --sync-vocab
   32768`: ~314 MB). Three layouts of the trainer's parameters are pushed: `separate` (one allocation per
   tensor, as `from_pretrained` leaves them: every bucket is packed, i.e. copied), `flat` (views of one
   flat buffer, the layout DeepSpeed ZeRO-1/2 gives the trainer's parameters: buckets are sent from the
   parameters' own memory, no copy; the trainer reports it as `sync/copied_bytes` = 0) and `zero3` (a real
   one-rank DeepSpeed ZeRO-3 engine: each bucket's partitions are gathered into one flat buffer that is sent
   as is, as the trainer pushes under ZeRO-3; `--skip-zero3` leaves it out). `flat, announced` and `zero3, announced` push those
   layouts as the training loop does: its update requests are sent before the optimizer step (here a 50 ms
   wait), so the push is timed from the go.

    python scripts/bench_rollout.py            # or: make bench-rollout
    python scripts/bench_rollout.py --skip-sync --prompts 8
"""

from __future__ import annotations

import argparse
import json
import os
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


from rollout_server.spawn import free_port  # noqa: E402  (bench_vllm imports it from here)


def random_qwen2(hidden: int, layers: int, vocab: int, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 32),
        num_key_value_heads=max(1, hidden // 128),
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(cfg).eval()


# ---- 1. generation ------------------------------------------------------------------------------------------
def bench_generation(args) -> list[tuple[str, str, str]]:
    from rollout_server.torch_decoders import HFDecoder, StaticDecoder
    from rollout_server.torch_generate import StopChecker, generate_batch, left_pad

    model = random_qwen2(args.hidden, args.layers, args.vocab)
    g = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(0, args.vocab, (args.prompt_len + 4 * i,), generator=g).tolist()
        for i in range(args.prompts)
    ]
    n, t = args.samples, args.tokens

    def ours(decoder_cls):
        rows = generate_batch(
            model,
            prompts,
            n=n,
            max_tokens=t,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            generator=torch.Generator().manual_seed(1),
            eos_ids=set(),
            pad_id=0,
            stop=StopChecker(None, []),
            ignore_eos=True,
            decoder=decoder_cls(model),
        )
        return sum(len(r.token_ids) for r in rows)

    ids, mask = left_pad(prompts, 0, "cpu")  # [P, T]
    ids, mask = ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)  # [P*n, T]: generate needs copies

    def hf_generate():
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=t,
                min_new_tokens=t,
                pad_token_id=0,
            )
        return (out.shape[1] - ids.shape[1]) * out.shape[0]

    methods = {
        "model.generate": hf_generate,
        "ours (HF DynamicCache decoder)": lambda: ours(HFDecoder),
        "ours (static-cache decoder)": lambda: ours(StaticDecoder),
    }
    best: dict[str, float] = {}
    tokens: dict[str, int] = {}
    for _ in range(args.repeats):
        for name, fn in methods.items():
            t0 = time.perf_counter()
            tokens[name] = fn()
            dt = time.perf_counter() - t0
            best[name] = min(best.get(name, float("inf")), dt)
    base = tokens["model.generate"] / best["model.generate"]
    rows = []
    for name in methods:
        tps = tokens[name] / best[name]
        rows.append((name, f"{tps:,.0f} tok/s ({best[name]:.2f} s)", f"{tps / base:.2f}x"))
    return rows


def med(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def ratios(xs: list[float], base: list[float]) -> str:
    """best / median / paired: the last is the median of each repeat's own ratio. The two sides of a repeat ran
    back to back, so it is the figure the machine's drift between repeats moves least."""
    paired = med([x / b for x, b in zip(xs, base, strict=True)])
    return f"{min(xs) / min(base):.2f}x / {med(xs) / med(base):.2f}x / {paired:.2f}x"


# ---- 2. weight sync -----------------------------------------------------------------------------------------
def broadcast_in_pieces(group, buf: torch.Tensor, sizes: list[int]) -> None:
    """Broadcast ``buf`` as consecutive slices of ``sizes`` bytes (a push's buckets), one collective each."""
    offset = 0
    for n in sizes:
        group.broadcast(buf[offset : offset + n])
        offset += n


def time_raw_pair(group, buf: torch.Tensor, sizes: list[int]) -> tuple[float, float]:
    """Seconds of one broadcast of the whole ``buf``, then of the same bytes in ``sizes`` pieces (the raw
    receiver takes them in this order)."""
    t0 = time.perf_counter()
    group.broadcast(buf)
    t1 = time.perf_counter()
    broadcast_in_pieces(group, buf, sizes)
    return t1 - t0, time.perf_counter() - t1


def raw_receive(addr: str, port: int, nbytes: int, repeats: int, pieces: list[list[int]]) -> None:
    """The raw receiver's side (rank 1): for each bucket setting, ``repeats`` times, one broadcast of the whole
    buffer, then the same bytes in that setting's pieces (none for an empty list): what the sender runs."""
    from rollout_server.weight_transfer import join_group, open_store

    group = join_group(open_store(addr, port, False, 60), addr, 1, 2, "gloo", 300)
    buf = torch.empty(nbytes, dtype=torch.uint8)  # [nbytes]
    for sizes in pieces:
        for _ in range(repeats):
            group.broadcast(buf)
            broadcast_in_pieces(group, buf, sizes)


def start_raw_receiver(port: int, nbytes: int, repeats: int, pieces: list[list[int]]) -> subprocess.Popen:
    """``raw_receive`` in its own process, joining the sender's gloo group on 127.0.0.1:``port``."""
    code = (
        "import json, sys; from scripts.bench_rollout import raw_receive; raw_receive(sys.argv[1], "
        "int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), json.loads(sys.argv[5]))"
    )
    argv = [sys.executable, "-c", code, "127.0.0.1", str(port), str(nbytes), str(repeats), json.dumps(pieces)]
    return subprocess.Popen(argv, env=dict(os.environ, PYTHONPATH=str(REPO)))


def stop_procs(*procs: subprocess.Popen, grace_s: float = 15.0) -> None:
    """Terminate the bench's helper processes that still run (killed after ``grace_s``)."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                p.kill()


def start_server(
    model_dir: Path, backend: str = "torch", timeout_s: float = 400
) -> tuple[subprocess.Popen, str]:
    """A rollout server on a free port, once it printed READY: (process, url)."""
    from rollout_server.spawn import ServerProcess

    server = ServerProcess(model_dir, backend=backend, extra_args=("--log-level", "warning"))
    return server.proc, server.wait_ready(timeout_s)


def save_sync_model(args) -> tuple[Path, list]:
    """A random Qwen2 of ~80 MB plus a tokenizer (the server needs one; its vocabulary is irrelevant here)."""
    from trainer.tiny_model import build_tiny_model

    model = random_qwen2(args.sync_hidden, args.sync_layers, args.sync_vocab, seed=1)
    out = Path(tempfile.mkdtemp(prefix="bench-rollout-"))
    model.save_pretrained(out)
    tok_dir = Path(tempfile.mkdtemp(prefix="bench-rollout-tok-"))
    build_tiny_model(tok_dir, seed=0)
    for f in list(tok_dir.glob("*token*")) + [tok_dir / "chat_template.jinja"]:
        (out / f.name).write_bytes(f.read_bytes())
    return out, list(model.named_parameters())


def flat_copy(named: list) -> list:
    """The same tensors as views of ONE flat buffer, as DeepSpeed ZeRO-1/2 lays out a parameter group."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    tensors = [t.detach() for _, t in named]
    views = _unflatten_dense_tensors(_flatten_dense_tensors(tensors), tensors)
    return [(name, v) for (name, _), v in zip(named, views, strict=True)]


def zero3_layout(model_dir: Path, named: list):
    """The same model under DeepSpeed ZeRO-3 (one rank over gloo, as the trainer builds it), and a function
    giving, for a bucket size, the trainer's own push iterator: each bucket's partitions gathered into one flat
    buffer, then yielded from it (`trainer.weight_sync.iter_full_tensors`, as `WeightSync` calls it)."""
    import torch.distributed as dist

    from rollout_server.protocol import WeightManifest
    from trainer.config import load_config
    from trainer.engine_setup import build_engine
    from trainer.weight_sync import bucket_groups, iter_full_tensors, named_hf_parameters

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1"
    )
    dist.init_process_group("gloo")
    cfg = load_config(
        str(REPO / "configs/cpu-tiny-test.yaml"),
        [f"model.name_or_path={model_dir}", "deepspeed.zero_stage=3"],
    )
    engine, _, _ = build_engine(cfg, str(model_dir), 1, 1000)
    params = named_hf_parameters(engine.module.model)
    assert [n for n, _ in params] == [n for n, _ in named], (
        "ZeRO-3 model's parameters differ from the manifest"
    )
    manifest = WeightManifest.from_named_tensors(named)
    slots: list = []  # kept from push to push, as `WeightSync` keeps them

    def tensors(bucket_bytes: int):
        groups = bucket_groups(manifest, bucket_bytes)
        return iter_full_tensors(params, True, groups, None, send=True, slots=slots)

    return tensors


OPTIMIZER_STEP_S = 0.05  # stands for the step between announce and push: time for every server to say "ok"


def announce_then_step(sync, manifest, version: int, bucket_bytes: int) -> None:
    """What the training loop does before a push: send its update requests ahead (`WeightSyncClient.announce`),
    then run the optimizer step (here a pause) while the servers check the manifest and say "ok"."""
    sync.announce(manifest, version, bucket_bytes=bucket_bytes)
    time.sleep(OPTIMIZER_STEP_S)


def bench_sync(args) -> list[tuple[str, str, str, str]]:
    """Raw broadcasts and pushes (each layout) alternate (same load for all), the order reversed every other
    repeat; best, median and median per-repeat ratio of `repeats`."""
    from rollout_server.client import WeightSyncClient
    from rollout_server.protocol import WeightManifest, plan_buckets
    from rollout_server.weight_transfer import join_group, open_store

    model_dir, named = save_sync_model(args)
    flat = flat_copy(named)
    layouts = {"separate": lambda _: iter(named), "flat": lambda _: iter(flat)}
    if not args.skip_zero3:
        layouts["zero3"] = zero3_layout(model_dir, named)
    # "..., announced" pushes as the training loop does (`announce_then_step`) and times the push from the go:
    # what a training step waits for.
    variants = [(name, fn, False) for name, fn in layouts.items()]
    variants += [(f"{name}, announced", layouts[name], True) for name in ("flat", "zero3") if name in layouts]
    manifest = WeightManifest.from_named_tensors(named)
    nbytes = manifest.total_bytes
    buckets = [int(float(x) * (1 << 20)) for x in args.sync_buckets_mib.split(",")]
    server, url = start_server(model_dir)
    raw_port = free_port()
    # The same bytes in the same pieces as each push: what gloo alone costs per bucket.
    pieces = [[b.nbytes for b in plan_buckets(manifest, bucket)] for bucket in buckets]
    receiver = start_raw_receiver(raw_port, nbytes, args.repeats, pieces)
    rows = []
    try:
        raw_group = join_group(open_store("127.0.0.1", raw_port, True, 60), "127.0.0.1", 0, 2, "gloo", 300)
        raw_buf = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)  # [nbytes]
        sync = WeightSyncClient(url)
        sync.init_transfer("127.0.0.1", 0, backend="gloo", timeout_s=120)  # 0: the store binds its own port
        version = 0
        for tensors in layouts.values():  # warm-up (first allocations on both sides)
            version += 1
            sync.push(manifest, tensors(buckets[0]), version=version, bucket_bytes=buckets[0])
        for bucket, sizes in zip(buckets, pieces, strict=True):
            raw_pairs: list[tuple[float, float]] = []
            runs: dict[str, list] = {name: [] for name, _, _ in variants}
            for r in range(args.repeats):
                # Odd repeats run the pushes first, in reverse order: what runs first after another kind of
                # work was up to 15% slower here, and no row should always be the one that pays it.
                if r % 2 == 0:
                    raw_pairs.append(time_raw_pair(raw_group, raw_buf, sizes))
                for name, tensors, announced in variants if r % 2 == 0 else variants[::-1]:
                    version += 1
                    if announced:
                        announce_then_step(sync, manifest, version, bucket)
                    runs[name].append(
                        sync.push(
                            manifest,
                            tensors(bucket),
                            version=version,
                            bucket_bytes=bucket,
                            tensors_stay=True,  # as the trainer passes it
                        )
                    )
                if r % 2 == 1:
                    raw_pairs.append(time_raw_pair(raw_group, raw_buf, sizes))
            raw_t = [whole for whole, _ in raw_pairs]
            raw_pieces_t = [in_buckets for _, in_buckets in raw_pairs]
            rows.append(
                (
                    f"raw gloo broadcast of {nbytes / 1e6:.1f} MB (1 buffer)",
                    f"{min(raw_t) * 1e3:.0f} ms, median {med(raw_t) * 1e3:.0f}",
                    "1",
                    "",
                )
            )
            rows.append(
                (
                    f"raw gloo broadcast of the same bytes in the push's {len(sizes)} bucket(s)",
                    f"{min(raw_pieces_t) * 1e3:.0f} ms, median {med(raw_pieces_t) * 1e3:.0f}",
                    ratios(raw_pieces_t, raw_t),
                    "1",
                )
            )
            for name, pushes in runs.items():
                push_t = [r.seconds for r in pushes]
                best = min(pushes, key=lambda r: r.seconds)
                server_side = best.servers[0]
                rows.append(
                    (
                        f"push `{name}`, bucket {bucket / (1 << 20):g} MiB ({best.num_buckets} buckets, "
                        f"{best.num_tensors} tensors, {best.copied_bytes / 1e6:.1f} MB copied)",
                        f"{best.seconds * 1e3:.0f} ms, median {med(push_t) * 1e3:.0f} (best: handshake + first pack "
                        f"{best.handshake_s * 1e3:.0f}, send {best.send_s * 1e3:.0f}; server: receive "
                        f"{server_side.receive_s * 1e3:.0f}, swap {server_side.swap_s * 1e3:.1f})",
                        ratios(push_t, raw_t),
                        ratios(push_t, raw_pieces_t),
                    )
                )
        sync.close()
        receiver.wait(timeout=120)
    finally:
        stop_procs(receiver, server)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--sync-hidden", type=int, default=512)
    p.add_argument("--sync-layers", type=int, default=4)
    p.add_argument("--sync-vocab", type=int, default=16384)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sync-buckets-mib", default="256,32,8,1", help="Bucket sizes to push with, in MiB.")
    p.add_argument("--skip-sync", action="store_true")
    p.add_argument("--skip-generation", action="store_true")
    p.add_argument("--skip-zero3", action="store_true", help="Do not push from a ZeRO-3 engine.")
    args = p.parse_args()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
    )
    if not args.skip_generation:
        print(
            f"\n### Generation: {args.prompts} prompts x {args.samples} samples x {args.tokens} tokens, random Qwen2 "
            f"hidden {args.hidden}, {args.layers} layers, vocab {args.vocab} (best of {args.repeats})\n"
        )
        print("| method | throughput | vs model.generate |\n|---|---|---|")
        for r in bench_generation(args):
            print(f"| {r[0]} | {r[1]} | {r[2]} |")
    if not args.skip_sync:
        print(f"\n### Weight sync over gloo (CPU), best of {args.repeats}\n")
        print(
            "| method | time | vs raw broadcast, one buffer (best / median / paired) | vs raw broadcast in the "
            "same buckets (best / median / paired) |\n|---|---|---|---|"
        )
        for r in bench_sync(args):
            print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} |")


if __name__ == "__main__":
    main()
