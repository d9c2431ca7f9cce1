"""Push the policy's weights to every rollout server: one update request per server per sync.

Interface (what the loop sees): ``WeightSync.announce(version)`` before the optimizer step (rank 0 sends the
update requests ahead; best effort), then ``WeightSync.push(version) -> stats`` pushes or raises
``WeightSyncFailed``;
``WeightSync.resync(version)`` does the same for servers known to have lost their weights. Every rank calls
them, rank 0 sends. Recovery lives here, not in the loop: a failed push (a server restarted, so its transfer
group is gone) waits for every server to be ready again (``wait_servers_ready``), re-opens the group and
pushes once more; a second failure raises.

Under ZeRO-3 no rank holds the full model, so parameters are gathered one bucket at a time
(``deepspeed.zero.GatheredParameters`` on exactly the parameters of one bucket of ``plan_buckets``, plus on
one rank a small companion for a bucket with a single parameter to gather, see ``iter_full_tensors``; every
rank joins the all-gather, only rank 0 sends). The client consumes tensors lazily in manifest order and packs a
bucket before it asks for the next bucket's first tensor, which is when the gather of the previous one ends:
so the gathered tensors are packed straight from DeepSpeed's memory (no copy of our own before the pack),
and at most one gathered bucket plus its packed copy is alive at a time. Under ZeRO-2 every rank has the
full parameters and rank 0 sends them directly.

The transfer itself (HTTP announce + packed broadcast over a dedicated gloo/NCCL group) is
``rollout_server.client.WeightSyncClient``; every step of it has a timeout (``rollout.sync_timeout_s``).
Non-zero ranks wait for rank 0's result through a broadcast (bounded by the trainer group's timeout), so a
failed push stops every rank with the same error.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

import torch

from trainer.distributed import broadcast_object

log = logging.getLogger(__name__)


class WeightSyncFailed(RuntimeError):
    """The weights could not be pushed (after the one retry); the same message is raised on every rank."""


def named_hf_parameters(hf_model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(HF checkpoint name, parameter) in module order; tied weights appear once (as named_parameters does)."""
    return list(hf_model.named_parameters())


def _numel(p: torch.nn.Parameter) -> int:
    shape = getattr(p, "ds_shape", None) or p.shape
    n = 1
    for d in shape:
        n *= int(d)
    return n


def gather_groups(
    params: list[tuple[str, torch.nn.Parameter]], bucket_bytes: int, itemsize: int
) -> list[list[int]]:
    """Indices of consecutive parameters whose gathered size stays near ``bucket_bytes`` (at least one each)."""
    groups: list[list[int]] = []
    cur: list[int] = []
    size = 0
    for i, (_, p) in enumerate(params):
        cur.append(i)
        size += _numel(p) * itemsize
        if size >= bucket_bytes:
            groups.append(cur)
            cur, size = [], 0
    if cur:
        groups.append(cur)
    return groups


def bucket_groups(manifest, bucket_bytes: int) -> list[list[int]]:
    """The push's gather groups: exactly the parameters of each bucket of ``plan_buckets`` (see the module
    docstring for why they must line up)."""
    return [[item.index for item in b.items] for b in manifest.buckets(bucket_bytes)]


def iter_full_tensors(
    params: list[tuple[str, torch.nn.Parameter]],
    zero3: bool,
    groups: list[list[int]],
    dtype: torch.dtype | None,
    send: bool,
    copy: bool = True,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Full (gathered) tensors in order. Every rank must drain this iterator (ZeRO-3 all-gathers inside).

    Under ZeRO-3 the parameters of each of ``groups`` (consecutive indices into ``params``) are gathered
    together. ``copy=False`` yields the gathered tensors themselves: each is valid only until this iterator is
    asked for the first tensor after its group, so a consumer must be done with a whole group by then (the
    weight push is: ``groups`` are its buckets). Under ZeRO-1/2 the parameters themselves are yielded."""
    if not zero3:
        for name, p in params:
            t = p.detach()
            yield name, (t.to(dtype) if dtype is not None and t.dtype != dtype else t)
        return
    import deepspeed

    if [i for g in groups for i in g] != list(range(len(params))):
        raise ValueError(f"gather groups must cover the {len(params)} parameters once, in order")
    # DeepSpeed gathers a lone parameter through its per-parameter path, which runs a real all-gather even on
    # one rank, where the group path just hands back the rank's partitions: a bucket holding only the
    # embedding took 37 ms against 0.1 ms when gathered with one more parameter. So on one rank a bucket with
    # a single parameter still to gather (the others, if any, are ZeRO-3 "persistent" ones, left gathered
    # after a training step) gathers the smallest other partitioned parameter with it; it is not yielded here.
    # With more ranks both paths run one all-gather per parameter, and a companion would only add one.
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    def partitioned(p: torch.nn.Parameter) -> bool:
        return getattr(p, "ds_status", None) == ZeroParamStatus.NOT_AVAILABLE

    one_rank = torch.distributed.get_world_size(getattr(params[0][1], "ds_process_group", None)) == 1
    by_size = sorted(range(len(params)), key=lambda i: _numel(params[i][1])) if one_rank else []
    for group in groups:
        subset = [params[i][1] for i in group]
        if one_rank and sum(partitioned(p) for p in subset) == 1:
            companion = next((j for j in by_size if j not in group and partitioned(params[j][1])), None)
            if companion is not None:
                subset.append(params[companion][1])
        with deepspeed.zero.GatheredParameters(subset, modifier_rank=None):
            for i in group:
                name, p = params[i]
                if send:
                    t = p.detach()
                    if dtype is not None and t.dtype != dtype:
                        t = t.to(dtype)  # a new tensor: outlives the gather
                    elif copy:
                        t = t.clone()  # the gathered storage is freed when the context exits
                    yield name, t


class WeightSync:
    """Every rank constructs it; only rank 0 opens the transfer group and talks to the servers."""

    def __init__(
        self,
        hf_model: torch.nn.Module,
        *,
        server_urls: list[str],
        api_token: str | None,
        rank: int,
        zero3: bool,
        backend: str,
        master_addr: str,
        master_port: int,
        bucket_bytes: int,
        timeout_s: float,
        dtype: torch.dtype | None = None,
        wait_servers_ready: Callable[[], object] | None = None,
    ):
        self.params = named_hf_parameters(hf_model)
        self.rank = rank
        self.zero3 = zero3
        self.bucket_bytes = bucket_bytes
        self.timeout_s = timeout_s
        self.dtype = dtype
        self.backend = backend
        self.master_addr, self.master_port = master_addr, master_port
        # Rank 0: blocks until every server answers ready (or raises); the rollout side's own readiness check,
        # so the servers' health is asked one way (``build.py`` wires it once the rollout side exists).
        self.wait_servers_ready = wait_servers_ready
        self.client = None
        self.server_urls = list(server_urls)
        from rollout_server.client import WeightSyncClient
        from rollout_server.protocol import TensorSpec, WeightManifest, dtype_name

        specs = []
        for name, p in self.params:
            shape = [int(d) for d in (getattr(p, "ds_shape", None) or p.shape)]
            specs.append(TensorSpec(name=name, dtype=dtype_name(dtype or p.dtype), shape=shape))
        self.manifest = WeightManifest(tensors=specs)
        # Every rank gathers (ZeRO-3) exactly the parameters of one bucket at a time: see the module docstring.
        self.gather_groups = bucket_groups(self.manifest, bucket_bytes)
        if rank == 0:
            self.client = WeightSyncClient(server_urls, api_token=api_token, http_timeout_s=timeout_s)

    def connect(self) -> None:
        """Open the transfer group (rank 0); all ranks learn whether it worked."""
        err = None
        if self.rank == 0:
            try:
                self.client.init_transfer(self.master_addr, self.master_port, self.backend, self.timeout_s)
            except Exception as e:  # reported on every rank below
                err = (
                    f"weight-sync group with {self.server_urls} could not be opened: {type(e).__name__}: {e}"
                )
        err = broadcast_object(err)
        if err:
            raise WeightSyncFailed(err)

    def announce(self, version: int) -> None:
        """Rank 0: send the update requests of the push of ``version`` now, before the optimizer step that
        makes those weights; the servers check the manifest and wait for the go while it runs, so the push
        starts at the go. Best effort and no collective: if it fails, the push sends its own requests and
        recovers as usual."""
        if self.client is None:
            return
        try:
            self.client.announce(
                self.manifest, version, bucket_bytes=self.bucket_bytes, timeout_s=self.timeout_s
            )
        except Exception as e:
            log.warning(
                "announcing weight version %d ahead failed (its push will ask itself): %s", version, e
            )

    def push(self, version: int) -> dict[str, float]:
        """Send the current weights as ``version``; returns timing stats (same dict on every rank). A failure
        is retried once on a re-opened group (``resync``); a second one raises ``WeightSyncFailed``."""
        try:
            return self._push_once(version)
        except WeightSyncFailed as e:
            log.warning("%s; waiting for the servers, re-opening the sync group and retrying once", e)
            return self.resync(version)

    def resync(self, version: int) -> dict[str, float]:
        """For servers that lost their weights (restarted): wait until every one is ready, re-open the
        group, push ``version``. Raises ``WeightSyncFailed``."""
        err = None
        if self.rank == 0:
            try:
                if self.wait_servers_ready is None:
                    raise RuntimeError("no readiness check was given to WeightSync (wait_servers_ready)")
                self.wait_servers_ready()
            except Exception as e:
                err = f"rollout server not ready for a weight re-sync: {type(e).__name__}: {e}"
        err = broadcast_object(err)
        if err:
            raise WeightSyncFailed(err)
        self.connect()
        return self._push_once(version)

    def _push_once(self, version: int) -> dict[str, float]:
        t0 = time.perf_counter()
        tensors = iter_full_tensors(
            self.params, self.zero3, self.gather_groups, self.dtype, send=self.rank == 0, copy=False
        )
        result: dict[str, float] | str
        if self.rank == 0:
            try:
                stats = self.client.push(
                    self.manifest,
                    tensors,
                    version=version,
                    bucket_bytes=self.bucket_bytes,
                    timeout_s=self.timeout_s,
                    # ZeRO-1/2: the parameters themselves, untouched until the push returns. ZeRO-3's gathered
                    # tensors are freed as the iterator advances.
                    tensors_stay=not self.zero3,
                )
                result = {
                    "sync/seconds": time.perf_counter() - t0,
                    "sync/handshake_s": stats.handshake_s,
                    # 1: the update requests went out before the optimizer step (`announce`), so the servers'
                    # manifest check and "ok" were off this push's path; 0: the push sent them itself
                    "sync/announced": float(stats.announced),
                    "sync/send_s": stats.send_s,
                    "sync/bytes": float(stats.bytes),
                    # 0 when every bucket went out of the parameters' own memory (ZeRO-1/2 keeps them in one
                    # flat buffer); ZeRO-3's gathered copies and dtype casts are packed
                    "sync/copied_bytes": float(stats.copied_bytes),
                    "sync/buckets": float(stats.num_buckets),
                    # where a server's time went (the slowest server): bytes on the wire, then loading them
                    "sync/server_receive_s": max((r.receive_s for r in stats.servers), default=0.0),
                    "sync/server_load_s": max((r.swap_s for r in stats.servers), default=0.0),
                }
            except Exception as e:
                result = (
                    f"weight sync of version {version} to {self.server_urls} failed: {type(e).__name__}: {e}"
                )
            # If the push failed midway, finish the ZeRO-3 gathers so the other ranks are not left waiting.
            for _ in tensors:
                pass
        else:
            for _ in tensors:
                pass
            result = {}
        result = broadcast_object(result)
        if isinstance(result, str):
            raise WeightSyncFailed(result)
        return result

    def close(self) -> None:
        if self.client is not None:
            try:
                self.client.close()
            except Exception as e:  # closing is best effort
                log.warning("closing the weight-sync client: %s", e)


def transfer_backend(setting: str) -> str:
    if setting != "auto":
        return setting
    return "nccl" if torch.cuda.is_available() else "gloo"
