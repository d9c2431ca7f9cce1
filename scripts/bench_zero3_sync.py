"""Benchmark the weight push from a multi-rank DeepSpeed ZeRO-3 trainer and print a markdown table.

`scripts/bench_rollout.py` pushes from one rank. With more ranks the push cannot be a broadcast alone: each
bucket's partitions are first gathered to rank 0 (`trainer.weight_sync.iter_full_tensors`, point-to-point
sends), which then broadcasts the bucket to a real `python -m rollout_server` process (torch backend, gloo).
So besides the raw broadcast of the same bytes, each push is compared with the collectives it cannot avoid
(`collectives`: each rank's share of the model's bytes sent to rank 0 into warm memory, one send per rank,
then the raw broadcast), and with the push as it was before session 14: each bucket gathered by DeepSpeed's
`GatheredParameters`, an all-gather to every rank, then packed (`deepspeed_tensors` below keeps that
iterator for the comparison). `raw all-gather` is one all-gather of the same bytes, what that way needed.

Per repeat, in an order reversed every other repeat (the first repeat is a warm-up and is dropped):
`collectives` (the sends to rank 0, then rank 0's broadcast to a receiver process, each timed; then the
all-gather), `gather alone` (every rank drains the push's iterator, nothing is sent), the same through
DeepSpeed, `push` and `push, announced` (its update requests sent 50 ms ahead, as the training loop sends
them before the optimizer step), and `push, DeepSpeed all-gather`. A push is timed as `bench_rollout.py` times one
(`SyncStats.seconds`): from the call, once the previous push's requests are settled (the announced push's
went out before it), through the servers' "done".

    python scripts/bench_zero3_sync.py                 # 2 ranks, 256 and 8 MiB buckets, ~80 MB model
    python scripts/bench_zero3_sync.py --ranks 2 --buckets-mib 256 --repeats 20
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from scripts.bench_rollout import (  # noqa: E402
    announce_then_step,
    free_port,
    med,
    ratios,
    save_sync_model,
    start_raw_receiver,
    start_server,
    stop_procs,
)

ROWS = (
    "raw broadcast",
    "raw to rank 0",
    "raw all-gather",
    "collectives",
    "gather alone",
    "gather alone, DeepSpeed",
    "push",
    "push, announced",
    "push, DeepSpeed all-gather",
)


def deepspeed_tensors(params, groups: list[list[int]], send: bool):
    """The push's iterator before session 14: DeepSpeed all-gathers each bucket's parameters to every rank
    and the sender gets them as gathered (valid until the next bucket is asked for, so the push packs them)."""
    import deepspeed

    for group in groups:
        with deepspeed.zero.GatheredParameters([params[i][1] for i in group], modifier_rank=None):
            for i in group:
                if send:
                    yield params[i][0], params[i][1].detach()


def rank_main(args) -> None:
    """One trainer rank (env rendezvous). Rank 0 also runs the rollout server, the raw receiver and the table."""
    import deepspeed
    import torch.distributed as dist

    from rollout_server.client import WeightSyncClient
    from rollout_server.protocol import WeightManifest
    from rollout_server.weight_transfer import join_group, open_store
    from trainer.config import load_config
    from trainer.engine_setup import build_engine
    from trainer.weight_sync import bucket_groups, iter_full_tensors, named_hf_parameters

    # The parent stops a rank with SIGTERM when another failed: exit through `finally`, which stops the server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    dist.init_process_group("gloo")
    rank, ranks = dist.get_rank(), dist.get_world_size()
    cfg = load_config(
        str(REPO / "configs/cpu-tiny-test.yaml"),
        [f"model.name_or_path={args.model_dir}", "deepspeed.zero_stage=3"],
    )
    engine, _, _ = build_engine(cfg, args.model_dir, 1, 1000)
    params = named_hf_parameters(engine.module.model)
    with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
        manifest = WeightManifest.from_named_tensors([(n, p.detach()) for n, p in params])
    nbytes = manifest.total_bytes
    buckets = [int(float(x) * (1 << 20)) for x in args.buckets_mib.split(",")]
    shard = torch.randn(nbytes // 4 // ranks)  # [nbytes / 4 / ranks]: this rank's share, as float32
    gathered = torch.empty(ranks * shard.numel())  # [~nbytes / 4]
    version = 0
    server = receiver = sync = raw_group = raw_buf = None
    slots: list = []  # the gather's buffers, kept from push to push as `WeightSync` keeps them

    def run(item: str, bucket: int, groups: list[list[int]]) -> dict[str, float]:
        """One item of a repeat, on every rank; returns its row(s) and seconds."""
        nonlocal version
        dist.barrier()
        if item == "collectives":
            t0 = time.perf_counter()
            if rank == 0:  # every other rank's share, point to point, into warm memory (as the push gathers)
                rows = gathered.view(ranks, -1)
                rows[0].copy_(shard)
                for work in dist.batch_isend_irecv(
                    [dist.P2POp(dist.irecv, rows[q], q) for q in range(1, ranks)]
                ):
                    work.wait()
            else:
                dist.send(shard, 0)
            t1 = time.perf_counter()
            if rank == 0:
                raw_group.broadcast(raw_buf)
            t2 = time.perf_counter()
            dist.barrier()
            t3 = time.perf_counter()
            dist.all_gather_into_tensor(gathered, shard)  # what DeepSpeed's gather runs, for reference
            t4 = time.perf_counter()
            return {
                "raw to rank 0": t1 - t0,
                "raw broadcast": t2 - t1,
                "collectives": t2 - t0,
                "raw all-gather": t4 - t3,
            }
        if "DeepSpeed" in item:
            tensors = deepspeed_tensors(params, groups, send=rank == 0)
        else:
            tensors = iter_full_tensors(params, True, groups, None, send=rank == 0, slots=slots)
        if rank == 0 and not item.startswith("gather alone"):
            version += 1
            if item == "push, announced":
                announce_then_step(sync, manifest, version, bucket)
            # Timed as bench_rollout times a push (`SyncStats.seconds`): an announced push from the go, the other
            # from after the previous push's requests are settled, through the servers' "done".
            # as the trainer passes it; DeepSpeed's gathered tensors are freed as its iterator advances
            stay = "DeepSpeed" not in item
            stats = sync.push(manifest, tensors, version=version, bucket_bytes=bucket, tensors_stay=stay)
            return {item: stats.seconds}
        t0 = time.perf_counter()
        for _ in tensors:  # a push's gathers on the other ranks, or the gathers alone
            pass
        return {item: time.perf_counter() - t0}

    try:
        if rank == 0:
            server, url = start_server(Path(args.model_dir))
            raw_port = free_port()
            receiver = start_raw_receiver(raw_port, nbytes, len(buckets) * (args.repeats + 1), [[]])
            raw_group = join_group(
                open_store("127.0.0.1", raw_port, True, 60), "127.0.0.1", 0, 2, "gloo", 300
            )
            raw_buf = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)  # [nbytes]
            sync = WeightSyncClient(url)
            sync.init_transfer("127.0.0.1", 0, backend="gloo", timeout_s=120)
        for bucket in buckets:
            groups = bucket_groups(manifest, bucket)
            times: dict[str, list[float]] = {row: [] for row in ROWS}
            items = [row for row in ROWS if not row.startswith("raw")]
            for r in range(args.repeats + 1):
                for item in items if r % 2 == 0 else items[::-1]:
                    for row, seconds in run(item, bucket, groups).items():
                        if r > 0:
                            times[row].append(seconds)
            if rank == 0:
                print(
                    f"\n### {bucket / (1 << 20):g} MiB buckets ({len(groups)}), {ranks} ZeRO-3 ranks, "
                    f"{nbytes / 1e6:.1f} MB, {args.repeats} repeats\n"
                )
                print(
                    "| what | best / median | vs raw broadcast (best / median / paired) | vs to rank 0 + "
                    "broadcast (best / median / paired) |\n|---|---|---|---|"
                )
                for row, xs in times.items():
                    print(
                        f"| {row} | {min(xs) * 1e3:.0f} / {med(xs) * 1e3:.0f} ms | "
                        f"{ratios(xs, times['raw broadcast'])} | {ratios(xs, times['collectives'])} |"
                    )
        if receiver is not None and receiver.wait(timeout=120) != 0:  # it took every broadcast sent
            raise RuntimeError(f"the raw receiver failed (exit {receiver.returncode})")
    finally:
        if sync is not None:
            sync.close()
        stop_procs(*(p for p in (receiver, server) if p is not None))
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=2, help="ZeRO-3 trainer ranks (processes).")
    p.add_argument("--buckets-mib", default="256,8", help="Bucket sizes to push with, in MiB.")
    p.add_argument("--repeats", type=int, default=12)
    p.add_argument("--sync-hidden", type=int, default=512)
    p.add_argument("--sync-layers", type=int, default=4)
    p.add_argument("--sync-vocab", type=int, default=16384)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)  # given to the rank processes
    p.add_argument(
        "--as-rank", action="store_true", help=argparse.SUPPRESS
    )  # run as one rank (env rendezvous)
    args = p.parse_args()
    if args.as_rank:
        rank_main(args)
        return
    model_dir, _ = save_sync_model(args)
    print(f"torch {torch.__version__}, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, {args.ranks} ranks")
    port = str(free_port())
    procs = []
    for rank in range(args.ranks):
        env = dict(
            os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), LOCAL_RANK=str(rank)
        )
        env.update(WORLD_SIZE=str(args.ranks), PYTHONPATH=str(REPO))
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, *sys.argv[1:], "--as-rank", "--model-dir", str(model_dir)], env=env
            )
        )
    try:  # a rank that fails leaves the others waiting in a collective: stop them at once
        while any(p.poll() is None for p in procs) and not any(p.poll() for p in procs):
            time.sleep(0.5)
    finally:  # SIGTERM first: rank 0 then stops its rollout server and raw receiver
        stop_procs(*procs, grace_s=30)
    codes = [p.wait() for p in procs]
    if any(codes):
        sys.exit(f"a rank failed: exit codes {codes}")


if __name__ == "__main__":
    main()
