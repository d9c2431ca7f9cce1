"""Trainer-side clients of the rollout server: generation (`RolloutClient`) and weight sync (`WeightSyncClient`).

Runnable example (start a server first: `python -m rollout_server --model <dir> --backend torch --port 8000`)::

    import torch
    from transformers import AutoModelForCausalLM
    from rollout_server.client import RolloutClient, WeightSyncClient
    from rollout_server.protocol import GenerateRequest, WeightManifest

    client = RolloutClient("http://127.0.0.1:8000")
    client.wait_until_ready(timeout_s=120)
    res = client.generate(GenerateRequest(prompts=["1 + 1 ="], n=4, max_tokens=16, temperature=1.0, seed=0))
    for c in res.completions:
        print(c.prompt_index, c.finish_reason, repr(c.text), sum(c.logprobs))

    model = AutoModelForCausalLM.from_pretrained("<dir>")          # the trainer's copy
    sync = WeightSyncClient("http://127.0.0.1:8000")                # or a list of URLs: one group, one broadcast
    sync.init_transfer("127.0.0.1", 29555, backend="gloo")          # once
    named = list(model.state_dict().items())
    stats = sync.push(WeightManifest.from_named_tensors(named), iter(named), version=1, bucket_bytes=64 << 20)
    print(stats)                                                    # every server now serves version 1
    sync.close()

`push` sends ONE request per server per sync, then broadcasts the packed buckets (see protocol.plan_buckets)
while consuming `tensors` lazily in manifest order, so a ZeRO-3 trainer can gather parameters bucket by
bucket. `announce(manifest, version)` sends those requests ahead (the trainer calls it before its optimizer
step): the servers check the manifest and wait for the go meanwhile, and the `push` of that version starts at
the go. A refused manifest raises `WeightSyncRejected` before any byte moved (the group stays usable); a
failure during the transfer raises `WeightSyncError` and the servers keep their old weights (call
`init_transfer` again). This module imports only torch, httpx and pydantic.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import torch
import torch.distributed as dist

from rollout_server import protocol as P
from rollout_server.spawn import free_port
from rollout_server.weight_transfer import (
    TransferGroup,
    WeightTransferError,
    done_key,
    first_signs,
    forget_sync,
    go_key,
    iter_packed_buckets,
    join_group,
    join_pynccl_trainer,
    open_store,
    send_buckets,
    status_key,
)

DEFAULT_BUCKET_BYTES = 64 << 20


class RolloutServerUnavailable(RuntimeError):
    """The server did not answer (connection error / 5xx) after all retries."""


class RolloutServerError(RuntimeError):
    """The server refused the request (4xx); `status` and the server's message are kept."""

    def __init__(self, status: int, message: str, url: str = ""):
        super().__init__(f"{url}: HTTP {status}: {message}")
        self.status, self.message, self.url = status, message, url


class WeightSyncRejected(RolloutServerError):
    """A server refused the update before any byte moved; old weights serve, the group is still usable."""


class WeightSyncError(RuntimeError):
    """The transfer failed midway; servers keep their old weights; call `init_transfer` again."""


def _headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _message(r: httpx.Response) -> str:
    try:
        return str(r.json().get("error") or r.json())
    except Exception:
        return r.text[:500]


def _answer_error(url: str, answer: Future, if_none: str) -> RolloutServerError:
    """The error a finished HTTP answer carries, as a RolloutServerError (``if_none`` if it succeeded)."""
    exc = answer.exception()
    if isinstance(exc, RolloutServerError):
        return exc
    return RolloutServerError(500 if exc is None else 503, str(exc or if_none), url)


def _handshake_errors(
    store: dist.Store, urls: list[str], ranks: list[int], sync_id: str, futures: list[Future], deadline: float
) -> list[tuple[str, RolloutServerError]]:
    """Wait until every server said ok (store key) or answered with an error. Returns the errors."""
    signs = first_signs(store, [status_key(sync_id, r) for r in ranks], futures, deadline)
    errors = []
    for url, (ok, answer), f in zip(urls, signs, futures, strict=True):
        if answer is not None:  # an error; a 200 before the handshake cannot happen
            errors.append((url, _answer_error(url, answer, "answered before the handshake")))
        elif ok is None:
            errors.append((url, RolloutServerError(504, "no handshake before the deadline")))
        elif f.done():  # it said ok (long ago, if announced), then its request ended: e.g. it restarted
            errors.append((url, _answer_error(url, f, "answered before the go")))
    return errors


def _done_responses(
    store: dist.Store, urls: list[str], ranks: list[int], sync_id: str, futures: list[Future], deadline: float
) -> list[P.UpdateWeightsResponse]:
    """Every server's UpdateWeightsResponse once it serves the new weights: from its "done" store key or its
    HTTP answer, whichever comes first (weight_transfer.py, step 4). Raises a server's error."""
    signs = first_signs(store, [done_key(sync_id, r) for r in ranks], futures, deadline)
    results = []
    for url, (done, answer) in zip(urls, signs, strict=True):
        if done is not None:
            results.append(P.UpdateWeightsResponse.model_validate_json(done))
        elif answer is not None and answer.exception() is None:
            results.append(P.UpdateWeightsResponse.model_validate(answer.result()))
        elif answer is not None:
            raise _answer_error(url, answer, "")
        else:
            raise RolloutServerError(504, "no answer before the deadline", url)
    return results


class RolloutClient:
    """Generation client: retries connection errors and 5xx with exponential backoff."""

    def __init__(
        self,
        base_url: str,
        api_token: str | None = None,
        timeout_s: float = 600.0,
        retries: int = 3,
        backoff_s: float = 0.5,
    ):
        self.base_url = base_url.rstrip("/")
        self.retries, self.backoff_s = retries, backoff_s
        self._http = httpx.Client(base_url=self.base_url, headers=_headers(api_token), timeout=timeout_s)

    def _request(self, method: str, route: str, json: dict | None = None, retries: int | None = None) -> dict:
        attempts = (self.retries if retries is None else retries) + 1
        last = ""
        for i in range(attempts):
            try:
                r = self._http.request(method, route, json=json)
                if r.status_code < 500:
                    if r.status_code >= 400:
                        raise RolloutServerError(r.status_code, _message(r), self.base_url + route)
                    return r.json()
                last = f"HTTP {r.status_code}: {_message(r)}"
            except httpx.TransportError as e:  # connect / read errors and timeouts
                last = f"{type(e).__name__}: {e}"
            if i + 1 < attempts:
                time.sleep(self.backoff_s * 2**i)
        raise RolloutServerUnavailable(f"{self.base_url}{route} failed after {attempts} attempts: {last}")

    def health(self) -> P.HealthResponse:
        return P.HealthResponse.model_validate(self._request("GET", P.ROUTE_HEALTH, retries=0))

    def wait_until_ready(self, timeout_s: float = 300.0, poll_s: float = 0.5) -> P.HealthResponse:
        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            try:
                h = self.health()
                if h.ready:
                    return h
                last = f"server reports ready=false ({h.error or 'paused'})"
            except (RolloutServerUnavailable, RolloutServerError) as e:
                last = str(e)
            time.sleep(poll_s)
        raise RolloutServerUnavailable(f"{self.base_url} not ready within {timeout_s:.0f}s: {last}")

    def generate(self, req: P.GenerateRequest) -> P.GenerateResponse:
        body = req.model_dump(exclude_none=True)
        return P.GenerateResponse.model_validate(self._request("POST", P.ROUTE_GENERATE, json=body))

    def close(self) -> None:
        self._http.close()


@dataclass
class SyncStats:
    version: int
    bytes: int
    num_tensors: int
    num_buckets: int
    seconds: float = 0.0  # whole push, as seen by the trainer
    # push started -> the go; not a server's own `handshake_s` (see UpdateWeightsResponse.handshake_s)
    handshake_s: float = 0.0
    send_s: float = 0.0  # packing + broadcasting every bucket
    copied_bytes: int = (
        0  # bytes packed into bucket buffers; 0 when every bucket was sent from the tensors' memory
    )
    servers: list[P.UpdateWeightsResponse] = field(default_factory=list)
    sync_id: str = ""  # this push's handshake keys in the store: rollout_sync/<sync_id>/...
    announced: bool = False  # its update requests went out ahead (`announce`): the push started at the go


@dataclass
class _SentRequests:
    """One push's update requests, sent: its id, the servers' pending HTTP answers, and what it announced."""

    request: P.UpdateWeightsRequest  # the body each server got
    answers: list[Future]
    at: float = field(default_factory=time.monotonic)

    @property
    def sync_id(self) -> str:
        return self.request.sync_id

    def serves(self, manifest: P.WeightManifest, version: int, bucket_bytes: int) -> bool:
        """True for the push it announced, while the request still takes a go (`go_usable_s`)."""
        req = self.request
        return (
            (req.version, req.bucket_bytes) == (version, bucket_bytes)
            and (req.manifest is manifest or req.manifest == manifest)
            and time.monotonic() - self.at < req.go_usable_s
        )


class UpdateRequests:
    """The weight-update requests, one per server per push: sent at the push or ahead of it (`announced`),
    aborted when not pushed, and settled before the next are sent. Settling waits for their HTTP answers (a
    server's update lock is free once it answered; they come ~ms after the store said "done") and deletes
    their keys from the store, which would otherwise grow every step."""

    def __init__(self, base_urls: list[str], submit: Callable[[str, str, dict, float], Future]):
        self.base_urls = base_urls
        self._submit = submit  # (url, route, body, timeout_s) -> the answer's future
        # sent ahead (`WeightSyncClient.announce`), not yet pushed
        self.announced: _SentRequests | None = None
        self.outstanding: list[_SentRequests] = []  # pushed or aborted, answers maybe still to come

    def send(
        self, manifest: P.WeightManifest, version: int, bucket_bytes: int, timeout_s: float
    ) -> _SentRequests:
        sync_id = f"v{version}-{uuid.uuid4().hex[:12]}"
        req = P.UpdateWeightsRequest(
            version=version,
            manifest=manifest,
            bucket_bytes=bucket_bytes,
            sync_id=sync_id,
            timeout_s=timeout_s,
        )
        body = req.model_dump()
        # The answer comes once the update is over: the server waits for the go at most `go_wait_s`, then
        # receives within the timeout ("done" 30 s after the send at the latest).
        http_timeout_s = req.go_wait_s + timeout_s + 60
        answers = [self._submit(url, P.ROUTE_UPDATE_WEIGHTS, body, http_timeout_s) for url in self.base_urls]
        return _SentRequests(req, answers)

    def take(
        self, store: dist.Store, manifest: P.WeightManifest, version: int, bucket_bytes: int
    ) -> _SentRequests | None:
        """The announced requests of this push, if they still serve it; any other announcement is aborted."""
        if self.announced is not None and self.announced.serves(manifest, version, bucket_bytes):
            taken, self.announced = self.announced, None
            return taken
        self.abort(store)
        return None

    def abort(self, store: dist.Store) -> None:
        """Call the announced push off: its servers, waiting for the go, answer 409."""
        announced, self.announced = self.announced, None
        if announced is not None:
            self.call_off(store, announced)

    def call_off(self, store: dist.Store, sent: _SentRequests) -> None:
        """go = 0 for requests that will not be pushed (before any byte moved); settled like any other."""
        try:
            store.set(go_key(sent.sync_id), "0")
        except Exception:  # the store is gone: the servers' wait for the go fails on its own
            pass
        self.outstanding.append(sent)

    def settle(self, group: TransferGroup, timeout_s: float) -> None:
        answers = [f for sent in self.outstanding for f in sent.answers]
        _, late = concurrent.futures.wait(answers, timeout=timeout_s)
        if late:
            raise WeightSyncError(
                f"{len(late)} server(s) never answered the previous update within {timeout_s:.0f}s"
            )
        for sent in self.outstanding:
            forget_sync(group.store, sent.sync_id, group.world_size)
        self.outstanding = []


class WeightSyncClient:
    """Pushes weights to one or more servers over ONE dedicated process group (trainer = rank 0).

    Servers take ranks 1.. in `base_urls` order; every bucket is broadcast once to all of them. Over NCCL to
    vLLM servers the trainer joins with vLLM's own PyNccl communicator (vllm must be importable there).
    """

    def __init__(
        self, base_urls: str | Sequence[str], api_token: str | None = None, http_timeout_s: float = 600.0
    ):
        self.base_urls = [base_urls] if isinstance(base_urls, str) else list(base_urls)
        if not self.base_urls:
            raise ValueError("base_urls: at least one server")
        self._http = httpx.Client(headers=_headers(api_token), timeout=http_timeout_s)
        self._pool = ThreadPoolExecutor(max_workers=len(self.base_urls), thread_name_prefix="weight-sync")
        self._group: TransferGroup | None = None
        self._ranks: list[int] = []
        self.default_bucket_bytes = DEFAULT_BUCKET_BYTES  # or what the servers require (see /health)
        self._slots: list[torch.Tensor] = []  # two reusable pack buffers (warm pages, no realloc per sync)
        self._requests = UpdateRequests(
            self.base_urls, lambda url, route, body, t: self._pool.submit(self._post, url, route, body, t)
        )
        self.timeout_s = 60.0

    def _post(self, url: str, route: str, body: dict, timeout_s: float) -> dict:
        try:
            r = self._http.post(url.rstrip("/") + route, json=body, timeout=timeout_s)
        except httpx.TransportError as e:
            raise RolloutServerUnavailable(f"{url}{route}: {type(e).__name__}: {e}") from e
        if r.status_code >= 400:
            cls = WeightSyncRejected if 400 <= r.status_code < 500 else RolloutServerError
            raise cls(r.status_code, _message(r), url + route)
        return r.json()

    def init_transfer(
        self, master_addr: str, master_port: int, backend: str = "gloo", timeout_s: float = 60.0
    ) -> None:
        """Create the group: this process hosts the TCPStore at master_addr:master_port and is rank 0.

        Servers take consecutive ranks after it (a vLLM server with tensor parallelism takes one per GPU).
        ``master_port`` 0: the store binds a port the OS picks and the servers are told that one, so no other
        process can take it between the choice and the bind (a port picked beforehand and bound later was
        taken in between once in a full test run: EADDRINUSE). vLLM's NCCL group cannot bind port 0: there a
        free port is picked just before.
        """
        self.close_group()
        self.timeout_s = timeout_s
        healths = []
        for url in self.base_urls:
            try:
                r = self._http.get(url.rstrip("/") + P.ROUTE_HEALTH, timeout=min(timeout_s, 30))
                r.raise_for_status()
            except httpx.HTTPError as e:
                raise RolloutServerUnavailable(f"{url}{P.ROUTE_HEALTH}: {e}") from e
            healths.append(P.HealthResponse.model_validate(r.json()))
        wires = {h.weight_transfer_wire for h in healths}
        if len(wires) != 1:
            raise ValueError(f"servers need different collectives {sorted(wires)}: push to them separately")
        self._ranks, world = [], 1
        for h in healths:
            self._ranks.append(world)
            world += h.weight_transfer_ranks
        wire = wires.pop()
        required = {h.weight_transfer_bucket_bytes for h in healths} - {None}
        if len(required) > 1:
            raise ValueError(
                f"servers require different bucket_bytes {sorted(required)}: push to them separately"
            )
        self.default_bucket_bytes = required.pop() if required else DEFAULT_BUCKET_BYTES
        if wire == "torch":
            store = open_store(master_addr, master_port, True, timeout_s)
            master_port = store.port  # the bound one, also when 0 was asked for
        elif master_port == 0:
            master_port = free_port(master_addr)
        futures = [
            self._pool.submit(
                self._post,
                url,
                P.ROUTE_INIT_WEIGHT_TRANSFER,
                P.InitWeightTransferRequest(
                    master_addr=master_addr,
                    master_port=master_port,
                    rank=rank,
                    world_size=world,
                    backend=backend,
                    timeout_s=timeout_s,
                ).model_dump(),
                timeout_s + 30,
            )
            for url, rank in zip(self.base_urls, self._ranks, strict=True)
        ]
        try:
            if wire == "torch":
                group = join_group(store, master_addr, 0, world, backend, timeout_s)
            else:
                group = join_pynccl_trainer(master_addr, master_port, world, timeout_s)
        except WeightTransferError as e:
            errors = [str(f.exception()) for f in futures if f.done() and f.exception() is not None]
            raise WeightSyncError(f"init_transfer: {e}; server errors: {errors or 'none reported'}") from e
        for f in futures:
            f.result(timeout=timeout_s + 30)
        self._group = group

    def announce(
        self,
        manifest: P.WeightManifest,
        version: int,
        bucket_bytes: int | None = None,
        timeout_s: float | None = None,
    ) -> None:
        """Send the update requests of the push of `version` now, without waiting: every server checks the
        manifest, says "ok" and waits for the go while the caller finishes the weights (the trainer announces
        before its optimizer step). The `push` of the same version, manifest and bucket size then starts at
        the go, so the requests' HTTP round trip is not on its path. A refusal surfaces in that push. An
        announcement that is not pushed is aborted by the next announce, push or close."""
        group = self._require_group("announce")
        bucket_bytes = bucket_bytes or self.default_bucket_bytes
        timeout_s = timeout_s or max(self.timeout_s, 60.0)
        self._requests.abort(group.store)
        # A server still busy with the previous update after 10 s: do not wait here too (the push waits).
        self._requests.settle(group, min(timeout_s, 10.0))
        self._requests.announced = self._requests.send(manifest, version, bucket_bytes, timeout_s)

    def push(
        self,
        manifest: P.WeightManifest,
        tensors: Iterable[tuple[str, torch.Tensor]],
        version: int,
        bucket_bytes: int | None = None,
        timeout_s: float | None = None,
        tensors_stay: bool = False,
    ) -> SyncStats:
        """One sync: announce `manifest` to every server (unless `announce` did), then broadcast the buckets
        of `tensors`.

        `bucket_bytes` defaults to what the servers require (vLLM) or 64 MiB. `tensors_stay`: the tensors'
        memory stays valid and unchanged until the push returns (a model's own parameters), or at least
        until the iterator has yielded `MAX_BUCKETS_IN_FLIGHT` more buckets (the trainer's ZeRO-3 gather,
        whose buffers are reused in turn), so a bucket sent straight from it may still be on the wire while
        the next one starts. Leave it False for tensors that the iterator frees or reuses sooner.
        """
        bucket_bytes = bucket_bytes or self.default_bucket_bytes
        group = self._require_group("push")
        timeout_s = timeout_s or max(self.timeout_s, 60.0)
        requests = self._requests
        sent = requests.take(group.store, manifest, version, bucket_bytes)
        if sent is None:
            requests.settle(group, timeout_s)
        t0 = time.monotonic()
        announced = sent is not None
        sent = sent or requests.send(manifest, version, bucket_bytes, timeout_s)
        sync_id, futures = sent.sync_id, sent.answers
        try:
            buckets = iter_packed_buckets(manifest, tensors, bucket_bytes, group.device, self._slots)
            bad = None
            try:  # the first bucket is gathered (ZeRO-3) and packed while the servers handshake: they overlap
                first = list(itertools.islice(buckets, 1))
            except (
                Exception
            ) as e:  # e.g. a tensor that does not match the manifest: abort before any byte moves
                first, bad = [], e
            errors = _handshake_errors(
                group.store, self.base_urls, self._ranks, sync_id, futures, t0 + timeout_s
            )
        except BaseException:  # e.g. the store failed: no server may be left waiting for a go
            requests.call_off(group.store, sent)
            raise
        if errors or bad is not None:
            requests.call_off(group.store, sent)  # the accepting servers answer 409 (aborted)
            if errors:
                status = errors[0][1].status
                raise WeightSyncRejected(status, "; ".join(f"{u}: {e.message}" for u, e in errors))
            raise WeightSyncError(f"push v{version} aborted before any byte moved: {bad}") from bad
        group.store.set(go_key(sync_id), "1")
        t1 = time.monotonic()
        try:

            def server_failed() -> str | None:  # a server that answered with an error has left the collective
                for url, f in zip(self.base_urls, futures, strict=True):
                    if f.done() and f.exception() is not None:
                        return f"{url}: {f.exception()}"
                return None

            copied = send_buckets(
                group, itertools.chain(first, buckets), tensors_stay, t0 + timeout_s, abort=server_failed
            )
            # As long as the HTTP answers were given before: a slow load (vLLM) is not cut short.
            results = _done_responses(
                group.store, self.base_urls, self._ranks, sync_id, futures, time.monotonic() + timeout_s + 30
            )
        except Exception as e:
            self.close_group()
            late = [str(f.exception()) for f in futures if f.done() and f.exception() is not None]
            raise WeightSyncError(f"push v{version} failed: {e}; servers: {late or 'no answer yet'}") from e
        t2 = time.monotonic()
        requests.outstanding.append(sent)
        return SyncStats(
            version=version,
            bytes=manifest.total_bytes,
            num_tensors=len(manifest.tensors),
            num_buckets=results[0].num_buckets,
            seconds=t2 - t0,
            handshake_s=t1 - t0,
            send_s=t2 - t1,
            copied_bytes=copied,
            servers=results,
            sync_id=sync_id,
            announced=announced,
        )

    def _require_group(self, what: str) -> TransferGroup:
        if self._group is None:
            raise WeightSyncError(f"{what}: call init_transfer first (or again, after a failed push)")
        return self._group

    def close_group(self) -> None:
        if self._group is not None:
            self._requests.abort(self._group.store)
            self._group.close()
            self._group = None
        self._requests.outstanding = []

    def close(self) -> None:
        """Leave the group and tell the servers (best effort)."""
        if self._group is not None:
            self._requests.abort(self._group.store)
            for url in self.base_urls:
                try:
                    self._post(url, P.ROUTE_CLOSE_WEIGHT_TRANSFER, {}, 10)
                except Exception:
                    pass
        self.close_group()
        self._pool.shutdown(wait=False)
        self._http.close()
