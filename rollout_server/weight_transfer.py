"""The dedicated trainer <-> rollout-server process group, its handshake, and the bucket send/receive loops.

Why a separate group: the trainer already runs a DeepSpeed world (the default torch.distributed group). We
never call `init_process_group`; each side builds its own `TCPStore` (the trainer is the store master, rank 0)
and a `ProcessGroupGloo` (CPU) or `ProcessGroupNCCL` (CUDA) directly on a `PrefixStore` of it, so the two
worlds coexist. Every collective waits with a timeout, so a dead peer gives an error, never a hang.

Handshake of one update (no byte moves before everyone agreed):
  1. trainer POSTs /update_weights (manifest, bucket_bytes, version, sync_id) to every server; the training
     loop sends these requests ahead, before its optimizer step (`WeightSyncClient.announce`), so steps 1-2
     run while it trains and its push starts at step 3 (a go=0 calls off one that is not pushed);
  2. each server validates the manifest against its model; if bad it answers 4xx at once (it never enters
     the collective). If good it writes `rollout_sync/<sync_id>/status/<rank> = ok` into the trainer's store
     and waits for `rollout_sync/<sync_id>/go`;
  3. the trainer waits until every server either wrote `ok` or answered its HTTP request with an error.
     All ok -> it writes go=1 and broadcasts the buckets. Otherwise go=0: the accepting servers return 409
     and nobody has entered a collective, so the group stays usable.
  4. each server loads what it received, then writes its `UpdateWeightsResponse` (JSON) under
     `rollout_sync/<sync_id>/done/<rank>` and answers the HTTP request with the same body. The trainer takes
     whichever comes first: the store key is read ~2 ms sooner than the HTTP answer on loopback (the
     server's thread hop back to its event loop, the response, the client's parse), a fixed cost that was
     a tenth of a 79 MB push. A server that only answers over HTTP still works.
"""

from __future__ import annotations

import datetime
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.distributed as dist

from rollout_server.protocol import (
    SYNC_KEY_PREFIX,
    Bucket,
    WeightManifest,
    pack_bucket,
    torch_dtype,
    unpack_bucket,
)

log = logging.getLogger(__name__)

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class WeightTransferError(RuntimeError):
    """A weight-transfer step failed or timed out; the message says which step."""


def status_key(sync_id: str, rank: int) -> str:
    return f"{SYNC_KEY_PREFIX}/{sync_id}/status/{rank}"


def go_key(sync_id: str) -> str:
    return f"{SYNC_KEY_PREFIX}/{sync_id}/go"


def received_key(sync_id: str, rank: int) -> str:
    """Where a receiver that cannot raise to its caller (a vLLM worker) reports "ok" or its error."""
    return f"{SYNC_KEY_PREFIX}/{sync_id}/received/{rank}"


def done_key(sync_id: str, rank: int) -> str:
    """Where a server writes its UpdateWeightsResponse (JSON) once the new weights serve (step 4 above)."""
    return f"{SYNC_KEY_PREFIX}/{sync_id}/done/{rank}"


def forget_sync(store: dist.Store, sync_id: str, world_size: int) -> None:
    """Delete one finished update's keys (every rank's status, received and done, and the go): without this
    the trainer's store would grow with every step."""
    keys = [go_key(sync_id)]
    for rank in range(1, world_size):
        keys += [status_key(sync_id, rank), received_key(sync_id, rank), done_key(sync_id, rank)]
    for key in keys:
        store.delete_key(key)


def _td(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


class TransferGroup:
    """One member's handle: the store (handshake keys) and the collective used for the buckets."""

    def __init__(
        self,
        store: dist.Store,
        pg: dist.ProcessGroup,
        rank: int,
        world_size: int,
        backend: str,
        timeout_s: float,
        device: torch.device,
    ):
        self.store, self.pg = store, pg
        self.rank, self.world_size, self.backend = rank, world_size, backend
        self.timeout_s, self.device = timeout_s, device

    def broadcast(self, buf: torch.Tensor, timeout_s: float | None = None) -> None:
        """Broadcast `buf` from rank 0 to all; raises WeightTransferError after the timeout."""
        self.wait(self.broadcast_async(buf), timeout_s)

    def broadcast_async(self, buf: torch.Tensor):
        """Start a broadcast; pass the handle to `wait`. The trainer packs the next bucket meanwhile."""
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        opts.rootTensor = 0
        try:
            return (self.pg.broadcast([buf], opts), buf)
        except Exception as e:
            raise WeightTransferError(f"broadcast of {buf.numel()} bytes failed to start: {e}") from e

    def wait(
        self, handle, timeout_s: float | None = None, abort: Callable[[], str | None] | None = None
    ) -> None:
        """Wait for a broadcast. `abort()` is polled meanwhile: a message means a peer gave up (stop now)."""
        work, buf = handle
        timeout_s = timeout_s or self.timeout_s
        try:
            if abort is not None:
                deadline = time.monotonic() + timeout_s
                finished = None
                if self.backend == "gloo":
                    # Woken by the collective's own completion (a polling nap overslept the end of a 20 ms
                    # broadcast by 1 ms on average); `abort` is asked every 5 ms meanwhile. An NCCL work's
                    # future completes when the work is enqueued, so NCCL polls the work itself.
                    finished = threading.Event()
                    work.get_future().add_done_callback(lambda _: finished.set())
                nap = 1e-4
                while not (finished.wait(0.005) if finished is not None else work.is_completed()):
                    reason = abort()
                    if reason:
                        raise WeightTransferError(f"peer gave up: {reason}")
                    if time.monotonic() > deadline:
                        raise WeightTransferError(f"timed out after {timeout_s:.0f}s")
                    if finished is None:
                        time.sleep(nap)
                        nap = min(nap * 2, 2e-3)  # short waits stay short; long ones do not spin the CPU
            work.wait(_td(timeout_s))
        except Exception as e:  # gloo raises RuntimeError("Timed out ...") or connection errors
            raise WeightTransferError(f"broadcast of {buf.numel()} bytes failed: {e}") from e

    def close(self) -> None:
        # Dropping the references closes gloo's sockets; ProcessGroupNCCL needs an explicit abort.
        abort = getattr(self.pg, "abort", None)
        if self.backend == "nccl" and abort is not None:
            try:
                abort()
            except Exception:
                pass
        self.pg = None  # type: ignore[assignment]
        self.store = None  # type: ignore[assignment]


def _make_pg(store: dist.Store, rank: int, world_size: int, backend: str, timeout_s: float, addr: str):
    prefix = dist.PrefixStore("rollout_pg", store)
    if backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = _td(timeout_s)
        # On loopback bind gloo to 127.0.0.1: hostname resolution inside containers is unreliable.
        if addr in LOOPBACK:
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
        else:
            opts._devices = [dist.ProcessGroupGloo.create_default_device()]
        return dist.ProcessGroupGloo(prefix, rank, world_size, opts), torch.device("cpu")
    if not torch.cuda.is_available():
        raise WeightTransferError("backend 'nccl' needs CUDA on this side; use 'gloo' on CPU")
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = _td(timeout_s)
    device = torch.device("cuda", torch.cuda.current_device())
    return dist.ProcessGroupNCCL(prefix, rank, world_size, opts), device


def open_store(addr: str, port: int, is_master: bool, timeout_s: float) -> dist.Store:
    try:
        return dist.TCPStore(addr, port, None, is_master, _td(timeout_s), wait_for_workers=False)
    except Exception as e:
        role = "create" if is_master else "connect to"
        raise WeightTransferError(f"could not {role} the TCPStore at {addr}:{port}: {e}") from e


def join_group(
    store: dist.Store, addr: str, rank: int, world_size: int, backend: str, timeout_s: float
) -> TransferGroup:
    """Build this member's collective (blocks until all `world_size` members joined, or times out)."""
    try:
        pg, device = _make_pg(store, rank, world_size, backend, timeout_s, addr)
    except WeightTransferError:
        raise
    except Exception as e:
        raise WeightTransferError(
            f"rank {rank}: joining the {backend} group of {world_size} failed: {e}"
        ) from e
    return TransferGroup(store, pg, rank, world_size, backend, timeout_s, device)


# ---- server side -------------------------------------------------------------------------------------------
def server_wait_go(store: dist.Store, rank: int, sync_id: str, timeout_s: float) -> bool:
    """Announce 'ok' for this sync and wait for the trainer's go/abort decision."""
    try:
        store.set(status_key(sync_id, rank), "ok")
        store.wait([go_key(sync_id)], _td(timeout_s))
        return store.get(go_key(sync_id)) == b"1"
    except Exception as e:
        raise WeightTransferError(
            f"handshake: no go/abort from the trainer within {timeout_s:.0f}s: {e}"
        ) from e


def server_report_done(store: dist.Store, sync_id: str, rank: int, response_json: str) -> None:
    """Step 4: tell the trainer through its store that this server serves the update (the fast path). The
    weights are in place already, so a failed write only costs the trainer the wait for the HTTP answer."""
    try:
        store.set(done_key(sync_id, rank), response_json)
    except Exception as e:
        log.warning(
            "could not report update %s in the trainer's store (the HTTP answer will): %s", sync_id, e
        )


def take_spare(spares: list[torch.Tensor], nbytes: int, device: torch.device) -> torch.Tensor:
    """A receive buffer of ``nbytes``: the smallest of ``spares`` that fits (removed from the list), else a new
    one. Reused buffers have warm pages: faulting in fresh memory each sync costs as much as the transfer."""
    fits = [i for i, s in enumerate(spares) if s.numel() >= nbytes and s.device == device]
    if fits:
        best = min(fits, key=lambda i: spares[i].numel())
        return spares.pop(best)[:nbytes]  # by index: list.remove would compare tensors elementwise
    return torch.empty(nbytes, dtype=torch.uint8, device=device)  # [nbytes]


def server_receive(
    group: TransferGroup,
    manifest: WeightManifest,
    buckets: list[Bucket],
    deadline: float,
    on_bucket: Callable[[list[tuple[str, torch.Tensor]]], None],
    alloc: Callable[[int], torch.Tensor] | None = None,
) -> int:
    """Receive every bucket (one broadcast each) and hand its unpacked views to `on_bucket`. Returns bytes.

    `alloc(nbytes)` gives the receive buffer (default: a fresh one); the torch backend recycles buffers.
    """
    alloc = alloc or (lambda nbytes: torch.empty(nbytes, dtype=torch.uint8, device=group.device))
    total = 0
    # The receive of bucket i+1 is posted before bucket i is waited for and handed on, so the trainer's next
    # broadcast never waits for this side's per-bucket work (allocation, unpacking, the caller's callback).
    posted = []  # broadcast handles, in bucket order

    def post(i: int) -> None:
        try:
            posted.append(group.broadcast_async(alloc(buckets[i].nbytes)))  # into a [nbytes] uint8 buffer
        except WeightTransferError as e:
            raise WeightTransferError(f"bucket {i + 1}/{len(buckets)} not received: {e}") from e

    if buckets:
        post(0)
    for i, b in enumerate(buckets):
        if i + 1 < len(buckets):
            post(i + 1)
        handle = posted.pop(0)
        buf = handle[1]
        left = deadline - time.monotonic()
        if left <= 0:
            raise WeightTransferError(f"receive deadline passed after {i}/{len(buckets)} buckets")
        try:
            group.wait(handle, timeout_s=left)
        except WeightTransferError as e:
            raise WeightTransferError(f"bucket {i + 1}/{len(buckets)} not received: {e}") from e
        on_bucket(unpack_bucket(b, buf, manifest))
        total += b.nbytes
    return total


# ---- trainer side ------------------------------------------------------------------------------------------
def _adjacent_span(chunk: list[torch.Tensor], nbytes: int) -> torch.Tensor | None:
    """A uint8 view over the bucket's bytes when its tensors already sit back to back in the first one's
    storage. Consecutive addresses that all fall inside that one allocation are its bytes, whichever tensor
    object views them (allocations do not overlap), so each tensor's own storage need not be asked for: that
    took a few microseconds per tensor, on the push's path before any byte moves."""
    first = chunk[0]
    ptr = first.data_ptr()
    for t in chunk:
        if t.data_ptr() != ptr or not t.is_contiguous():
            return None
        ptr += t.numel() * t.element_size()
    storage = first.untyped_storage()
    start = first.storage_offset() * first.element_size()
    if start + nbytes > storage.nbytes() or ptr - first.data_ptr() != nbytes:
        return None
    span = torch.empty(0, dtype=torch.uint8, device=first.device)
    return span.set_(storage, start, (nbytes,))  # [nbytes], no copy


# Buckets ``send_buckets`` keeps on the wire at once: it waits for bucket k before it asks for bucket
# k + MAX_BUCKETS_IN_FLIGHT. A producer that reuses its buffers (the packer's slots below, the ZeRO-3 gather,
# ``trainer.weight_sync.iter_full_tensors``) keeps this many in turn, so a buffer is refilled only after it
# was sent.
MAX_BUCKETS_IN_FLIGHT = 2


def iter_packed_buckets(
    manifest: WeightManifest,
    tensors: Iterable[tuple[str, torch.Tensor]],
    bucket_bytes: int,
    device: torch.device,
    slots: list[torch.Tensor] | None = None,
) -> Iterator[tuple[torch.Tensor, bool]]:
    """Consume `tensors` lazily in manifest order and yield (packed uint8 buffer, borrowed) per bucket.

    `borrowed` buffers are views of the caller's own tensors (no copy was needed): the caller must finish
    sending one before advancing the iterator, which may free it (e.g. a ZeRO-3 gather context exiting).

    Each tensor is checked against the manifest (name, dtype, shape) before packing: a mismatch would make the
    two sides cut the byte stream differently. With `slots` (a list of `MAX_BUCKETS_IN_FLIGHT` reusable
    buffers, grown as needed) bucket k is packed into slot k % MAX_BUCKETS_IN_FLIGHT: the caller must have
    finished sending the bucket that used it before asking for k (`send_buckets` has).
    """
    it = iter(tensors)
    device = torch.device(device)
    # Blocking into CPU memory: a non-blocking copy from the GPU could still be landing when gloo reads.
    non_blocking = device.type != "cpu"
    for k, b in enumerate(manifest.buckets(bucket_bytes)):
        chunk = []
        for item in b.items:
            try:
                name, t = next(it)
            except StopIteration:
                raise WeightTransferError(f"tensors ended before {item.name!r} (manifest has more)") from None
            spec = manifest.tensors[item.index]
            if name != spec.name or t.dtype != torch_dtype(spec.dtype) or list(t.shape) != spec.shape:
                raise WeightTransferError(
                    f"tensor #{item.index} is {name!r} {str(t.dtype)} {list(t.shape)}, manifest says "
                    f"{spec.name!r} {spec.dtype} {spec.shape}"
                )
            t = t.detach()
            chunk.append(t if t.device == device else t.to(device, non_blocking=non_blocking))
        span = _adjacent_span(chunk, b.nbytes)
        if span is not None:  # already one flat run of memory (a lone tensor, a flat buffer): send it as is
            yield span, True
            continue
        if slots is None:
            out = torch.empty(b.nbytes, dtype=torch.uint8, device=device)  # [nbytes]
        else:
            depth = MAX_BUCKETS_IN_FLIGHT
            slots.extend(torch.empty(0, dtype=torch.uint8, device=device) for _ in range(depth - len(slots)))
            if slots[k % depth].numel() < b.nbytes or slots[k % depth].device != device:
                slots[k % depth] = torch.empty(b.nbytes, dtype=torch.uint8, device=device)
            out = slots[k % depth][: b.nbytes]  # [nbytes]
        yield pack_bucket(b, chunk, out=out), False
    if next(it, None) is not None:
        raise WeightTransferError("more tensors than the manifest declares")


def send_buckets(
    group: TransferGroup,
    buckets: Iterable[tuple[torch.Tensor, bool]],
    tensors_stay: bool,
    deadline: float,
    abort: Callable[[], str | None],
) -> int:
    """Broadcast every (buffer, borrowed) of ``iter_packed_buckets``; returns the bytes that were packed.

    Pipelined: bucket k is on the wire while bucket k+1 is gathered and packed, at most
    ``MAX_BUCKETS_IN_FLIGHT`` in flight (as many as the producers' buffers in turn). A borrowed bucket views
    the caller's own tensors: unless they stay put until the push ends (``tensors_stay``), it must be sent
    before the iterator moves on and may free them.
    """

    def wait(handle) -> None:
        group.wait(handle, max(1.0, deadline - time.monotonic()), abort=abort)

    in_flight: deque = deque()  # oldest first
    copied = 0
    for buf, borrowed in buckets:
        copied += 0 if borrowed else buf.numel()
        in_flight.append(group.broadcast_async(buf))
        # before the iterator is asked for the next bucket, whose buffer may be the oldest one's
        keep = 0 if borrowed and not tensors_stay else MAX_BUCKETS_IN_FLIGHT - 1
        while len(in_flight) > keep:
            wait(in_flight.popleft())
    while in_flight:
        wait(in_flight.popleft())
    return copied


# first_signs' naps double up to a cap that grows with the wait: (waited less than, seconds). Short waits stay
# short: a local server's "ok" or "done" comes within a few ms, and naps of up to 1 ms saw a "done" 1.8 ms
# (median) after it was written; a long wait (a vLLM reload, ~0.5 s) does not ask the store a thousand times.
_NAP_CAPS = ((0.01, 2.5e-4), (0.05, 1e-3), (math.inf, 5e-3))


def first_signs(
    store: dist.Store, keys: list[str], answers: list, deadline: float
) -> list[tuple[bytes | None, object | None]]:
    """Per server i, whichever comes first: (the value of store key ``keys[i]``, None) or (None, its finished
    HTTP answer, a ``concurrent.futures.Future``); (None, None) for one with neither by the deadline."""
    signs: dict[int, tuple[bytes | None, object | None]] = {}
    start, nap = time.monotonic(), 1e-4
    while len(signs) < len(keys):
        for i, key in enumerate(keys):
            if i in signs:
                continue
            if store.check([key]):
                signs[i] = (store.get(key), None)
            elif answers[i].done():
                signs[i] = (None, answers[i])
        if len(signs) < len(keys):
            if time.monotonic() > deadline:
                break
            time.sleep(nap)
            waited = time.monotonic() - start
            nap = min(nap * 2, next(cap for until, cap in _NAP_CAPS if waited < until))
    return [signs.get(i, (None, None)) for i in range(len(keys))]


class _PyncclTrainerGroup(TransferGroup):
    """Trainer end of a vLLM server's NCCL group: vLLM's StatelessProcessGroup + PyNcclCommunicator.

    vLLM's workers rendezvous through that class (not torch's ProcessGroupNCCL), so the trainer must too.
    PyNccl has no timeout of its own: we poll a CUDA event against the deadline instead.
    """

    def broadcast_async(self, buf: torch.Tensor):
        stream = torch.cuda.current_stream()
        self.pg.broadcast(buf, src=0, stream=stream)
        done = torch.cuda.Event()
        done.record(stream)
        return (done, buf)

    def wait(
        self, handle, timeout_s: float | None = None, abort: Callable[[], str | None] | None = None
    ) -> None:
        done, buf = handle
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        while not done.query():
            reason = abort() if abort is not None else None
            if reason:
                raise WeightTransferError(f"NCCL broadcast of {buf.numel()} bytes: peer gave up: {reason}")
            if time.monotonic() > deadline:
                raise WeightTransferError(f"NCCL broadcast of {buf.numel()} bytes timed out")
            time.sleep(0.0005)

    def close(self) -> None:
        self.pg = None  # type: ignore[assignment]
        self.store = None  # type: ignore[assignment]


def join_pynccl_trainer(addr: str, port: int, world_size: int, timeout_s: float) -> TransferGroup:
    """Rank 0 of a vLLM weight-transfer group (needs vllm and CUDA on the trainer side)."""
    try:
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup
    except ImportError as e:
        raise WeightTransferError("NCCL sync to a vLLM server needs the vllm package on the trainer") from e
    try:
        spg = StatelessProcessGroup.create(
            host=addr, port=port, rank=0, world_size=world_size, store_timeout=int(timeout_s)
        )
        device = torch.device("cuda", torch.cuda.current_device())
        comm = PyNcclCommunicator(spg, device=device)
    except Exception as e:
        raise WeightTransferError(f"joining the vLLM NCCL group at {addr}:{port} failed: {e}") from e
    return _PyncclTrainerGroup(spg.store, comm, 0, world_size, "nccl", timeout_s, device)
