"""Push the policy's weights to every rollout server: one update request per server per sync.

Interface (what the loop sees): ``WeightSync.announce(version)`` before the optimizer step (rank 0 sends the
update requests ahead; best effort), then ``WeightSync.push(version) -> stats`` pushes or raises
``WeightSyncFailed``;
``WeightSync.resync(version)`` does the same for servers known to have lost their weights. Every rank calls
them, rank 0 sends. Recovery lives here, not in the loop: a failed push (a server restarted, so its transfer
group is gone) waits for every server to be ready again (``wait_servers_ready``), re-opens the group and
pushes once more; a second failure raises.

Under ZeRO-3 no rank holds the full model, so the partitions of one bucket of ``plan_buckets`` at a time are
gathered to rank 0 (``iter_full_tensors``; every rank sends its partitions, only rank 0 receives and sends
on), straight into a flat buffer where the bucket's tensors lie back to back as the transfer sends them: the
client finds them adjacent and sends that buffer without packing it. Two such buffers are used in turn, so
bucket k is on the wire while bucket k+1 is gathered. Under ZeRO-2 every rank has the full parameters and
rank 0 sends them directly.

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
    """The weights could not be pushed (after the one retry); the same message is raised on every rank, unless
    the trainer's own group failed during the push (``retry`` False: a retry would need that group), when
    each rank raises what it knows."""

    def __init__(self, message: str, retry: bool = True):
        super().__init__(message)
        self.retry = retry


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
    slots: list[torch.Tensor | None] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Full tensors in order, in ``dtype`` if given. Every rank must drain this iterator (ZeRO-3 gathers
    inside) and only the sending rank gets tensors: under ZeRO-3 that is the first rank of the parameters'
    partition group (``send`` on any other rank is an error; without ``send`` the first rank still receives
    what the others send, and yields nothing).

    Under ZeRO-3 each of ``groups`` (consecutive indices into ``params``) is gathered to the sender
    (``_gather_group``) into one flat buffer where its tensors lie back to back, so the push sends it without
    packing it. It uses the buffers of ``slots`` in turn, ``MAX_BUCKETS_IN_FLIGHT`` of them (a caller that
    keeps the list keeps CPU ones warm for its next call: fresh ones cost page faults): a group's tensors stay
    valid until the iterator has yielded the tensors of that many more groups, which the push's pipeline
    allows (``send_buckets``). The push's gather groups must therefore be its buckets, and a caller that keeps
    tensors longer copies them (the checkpoint export does). On one rank, without a cast, the partitions themselves are
    yielded: views of DeepSpeed's flat buffer, valid until the next optimizer step. Under ZeRO-1/2 the
    parameters themselves are yielded (cast if ``dtype`` differs)."""
    if not zero3:
        for name, p in params:
            t = p.detach()
            yield name, (t.to(dtype) if dtype is not None and t.dtype != dtype else t)
        return
    if [i for g in groups for i in g] != list(range(len(params))):
        raise ValueError(f"gather groups must cover the {len(params)} parameters once, in order")
    group = params[0][1].ds_process_group
    if any(p.ds_process_group is not group for _, p in params):
        raise ValueError("the ZeRO-3 parameters are partitioned over different process groups")
    first = torch.distributed.get_rank(group) == 0  # the rank the gather delivers to, whatever ``send`` says
    if send and not first:
        raise ValueError(
            "under ZeRO-3 only the first rank of the partition group can receive the full tensors"
        )
    _check_partitions(params)
    if torch.distributed.get_world_size(group) == 1 and all(
        dtype in (None, p.ds_tensor.dtype) for _, p in params
    ):
        # One rank: its partitions are the full tensors, in DeepSpeed's flat buffer: send straight from there
        if not send:
            return
        for name, p in params:
            t = p.ds_tensor.reshape(-1)[: p.ds_numel].view(p.ds_shape)
            yield name, t
        return
    from rollout_server.weight_transfer import MAX_BUCKETS_IN_FLIGHT as in_turn

    dtypes = {p.ds_tensor.dtype for _, p in params}
    if dtype is None and len(dtypes) > 1:
        # a bucket is one flat buffer of one dtype: without a target dtype, some tensors would be cast silently
        raise ValueError(
            f"the ZeRO-3 partitions mix dtypes {sorted(map(str, dtypes))}: give the push's dtype"
        )
    if slots is None:
        slots = []
    slots.extend([None] * (in_turn - len(slots)))
    try:
        for k, indices in enumerate(groups):
            members = [params[i] for i in indices]
            out = _gather_group(members, group, dtype, first, slots[k % in_turn])
            if out is None:
                continue
            slots[k % in_turn] = out
            if not send:
                continue
            offset = 0
            for name, p in members:
                n = p.ds_numel
                t = out[offset : offset + n].view(p.ds_shape)
                yield name, t
                offset += n
    finally:  # also when a push stops midway
        if any(s is not None and s.device.type != "cpu" for s in slots):
            # A GPU's caching allocator reuses the memory anyway; kept, it would hold buckets for the whole run.
            slots[:] = [None] * in_turn


def _check_partitions(params: list[tuple[str, torch.nn.Parameter]]) -> None:
    """The gather reads ``ds_tensor`` as it lies in memory: NVMe-offloaded or quantized partitions (neither
    is configurable here) are not."""
    from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum

    for name, p in params:
        part = p.ds_tensor
        if getattr(part, "final_location", None) == OffloadDeviceEnum.nvme or hasattr(part, "ds_quant_scale"):
            raise ValueError(f"{name}: NVMe-offloaded or quantized ZeRO-3 partitions cannot be gathered here")


def _gather_group(
    members: list[tuple[str, torch.nn.Parameter]],
    group,
    dtype: torch.dtype | None,
    receive: bool,
    out: torch.Tensor | None,
) -> torch.Tensor | None:
    """Gather the ZeRO-3 partitions of ``members`` to the group's first rank; there, return a flat buffer
    (``out`` if it is large enough and of the right dtype and device) whose first elements are their full
    tensors back to back in ``dtype`` (default: theirs), else None.

    Why not DeepSpeed's ``GatheredParameters``: it all-gathers, so every rank receives every byte although
    only one rank sends them on, into freshly allocated buffers that the push then packs. Why not
    ``torch.distributed.gather``: over gloo it lands in a temporary buffer of its own first. Here every rank
    sends its partitions to rank 0 point to point (one batch of sends and receives per bucket), and rank 0
    receives each straight into its place in the bucket. Over gloo on 2 ranks, 78 MB in 50 tensors took
    29-39 ms this way (best to median), 79-150 ms with one ``gather`` per tensor, 67-88 ms with one
    ``gather`` of one flat buffer, 117-163 ms with one all-gather, and a broadcast of the same bytes 19-30 ms.

    DeepSpeed's layout, which this reads: a parameter of ``ds_numel`` elements is padded to
    ``ranks * ds_tensor.ds_numel`` and rank r holds the r-th run of that length in ``ds_tensor``, the
    authoritative copy (the optimizer writes it; the gathered ``data`` of a "persistent" parameter is
    refreshed from it). A run that holds padding, or one of another dtype than ``out``, is received into a
    buffer of its own and its real elements are copied into place once it has arrived."""
    import torch.distributed as dist

    ranks = dist.get_world_size(group)
    # The partitions travel on the device the process group talks from (NCCL: this GPU); under CPU offload
    # they sit in host memory, and DeepSpeed moves them the same way before its own gather.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else None
    device = device or members[0][1].ds_tensor.device
    if not receive:
        if ranks > 1:
            dst = dist.get_global_rank(group, 0)
            sends = [p.ds_tensor.reshape(-1)[: p.ds_tensor.ds_numel].to(device) for _, p in members]
            for work in dist.batch_isend_irecv([dist.P2POp(dist.isend, t, dst, group) for t in sends]):
                work.wait()
        return None
    full_dtype = dtype or members[0][1].ds_tensor.dtype
    total = sum(p.ds_numel for _, p in members)
    if out is None or out.numel() < total or out.dtype != full_dtype or out.device != device:
        out = torch.empty(total, dtype=full_dtype, device=device)
    peers = [dist.get_global_rank(group, q) for q in range(ranks)]  # group rank -> global rank
    ops, later = [], []  # later: (received run, where its real elements go)
    offset = 0
    for _, p in members:
        n, size = p.ds_numel, int(p.ds_tensor.ds_numel)
        mine = p.ds_tensor.reshape(-1)[:size]
        out[offset : offset + min(n, size)].copy_(mine[: min(n, size)])  # rank 0 holds the first run
        for q in range(1, ranks):
            real = min(size, max(0, n - q * size))  # elements of run q that are not padding
            place = out[offset + q * size : offset + q * size + real]
            if real == size and mine.dtype == out.dtype:
                run = place
            else:
                run = torch.empty(size, dtype=mine.dtype, device=device)
                later.append((run[:real], place))
            ops.append(dist.P2POp(dist.irecv, run, peers[q], group))
        offset += n
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    for run, place in later:
        place.copy_(run)
    return out


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
        # Rank 0's ZeRO-3 gather buffers, kept from push to push on a CPU, where fresh ones of bucket size cost
        # page faults every push (on a GPU ``iter_full_tensors`` lets them go after each push).
        self._gather_slots: list[torch.Tensor | None] = [None, None]
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
            if not e.retry:
                raise
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
            self.params,
            self.zero3,
            self.gather_groups,
            self.dtype,
            send=self.rank == 0,
            slots=self._gather_slots,
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
                    # buckets stay valid until MAX_BUCKETS_IN_FLIGHT more are gathered (``iter_full_tensors``).
                    tensors_stay=True,
                )
                result = {
                    "sync/seconds": time.perf_counter() - t0,
                    "sync/handshake_s": stats.handshake_s,
                    # 1: the update requests went out before the optimizer step (`announce`), so the servers'
                    # manifest check and "ok" were off this push's path; 0: the push sent them itself
                    "sync/announced": float(stats.announced),
                    "sync/send_s": stats.send_s,
                    "sync/bytes": float(stats.bytes),
                    # 0 when every bucket went out as it lay in memory: ZeRO-1/2 keeps the parameters in one
                    # flat buffer, ZeRO-3 gathers each bucket into one; ZeRO-1/2 with a dtype cast is packed
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
                # The transfer may have stopped with buckets still being sent from the kept buffers: the drain
                # below gathers into fresh ones rather than under a send that has not let go of them.
                self._gather_slots[:] = [None] * len(self._gather_slots)
        else:
            result = {}
        # Every rank drains the gathers (rank 0's push may have stopped midway) and reaches the broadcast below
        # even if its own gather raised, so a failure on one rank raises on all instead of leaving them waiting
        # (over gloo, after the group's timeout; over NCCL a receive that never completes is not an error that
        # reaches Python: its watchdog ends the processes after the same timeout).
        own = None
        try:
            for _ in tensors:
                pass
        except Exception as e:
            own = (
                f"weight sync of version {version}: rank {self.rank}'s gather failed: {type(e).__name__}: {e}"
            )
            log.error("%s", own)
        try:
            result = broadcast_object(own if own and not isinstance(result, str) else result)
        except Exception as e:
            # The trainer group itself failed: a rank's gather broke off, so the others' transfers with it ran
            # into the group's timeout, which closes gloo's connections. Nothing can be agreed on any more.
            known = own or (result if isinstance(result, str) else "")
            raise WeightSyncFailed(
                f"weight sync of version {version}: the trainer ranks could not share its outcome "
                f"({type(e).__name__}: {e}); on rank {self.rank}: {known or 'no error of its own'}",
                retry=False,
            ) from e
        if isinstance(result, str) or own:
            raise WeightSyncFailed(result if isinstance(result, str) else own)
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
