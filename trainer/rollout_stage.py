"""The rollout stage: prompts in, ``num_generations`` completions per prompt out, from one or more servers.

Only trainer rank 0 runs this stage. A step's prompts are dealt to the servers in contiguous slices (server i
gets prompts ``[i*k, (i+1)*k)``), the requests run in parallel threads, and the answers are put back in prompt
order, so the result is prompt-major whatever the number of servers. Prompts are sent as token ids (the
trainer's tokenisation), so trainer and server agree on every prompt token.

Every completion keeps the ``weight_version`` that produced it: with generation overlapped with training
(one-step off-policy, a later issue) the update stage needs it to know how stale a batch is.

A server that does not answer is retried by ``RolloutClient`` with exponential backoff; after the last retry
``RolloutServerUnavailable`` propagates and the loop stops the run with that message.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from rollout_server.client import RolloutClient
from rollout_server.protocol import Completion, GenerateRequest
from trainer.config import GenerationConfig, RolloutConfig


@dataclass
class RolloutBatch:
    """Completions of one step, prompt-major: completions[p * G + g] is sample g of prompts[p]."""

    step: int
    prompts: list[dict[str, Any]]  # data rows: prompt, prompt_text, prompt_ids, gold, ...
    completions: list[Completion]
    num_generations: int
    generate_s: float = 0.0
    server_versions: list[int] = field(default_factory=list)

    @property
    def weight_versions(self) -> list[int]:
        return [c.weight_version for c in self.completions]

    def prompt_of(self, i: int) -> dict[str, Any]:
        return self.prompts[i // self.num_generations]


def split_evenly(n: int, parts: int) -> list[tuple[int, int]]:
    """[start, end) slices of ``range(n)`` over ``parts`` servers, sizes differing by at most one (empty dropped)."""
    base, extra = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        if size:
            out.append((start, start + size))
        start += size
    return out


class RolloutStage:
    """Asks the rollout servers for completions; one ``RolloutClient`` per server."""

    def __init__(self, rollout: RolloutConfig, generation: GenerationConfig):
        self.cfg = rollout
        self.gen = generation
        self.clients = [
            RolloutClient(
                url,
                api_token=rollout.api_token,
                timeout_s=rollout.request_timeout_s,
                retries=rollout.retries,
                backoff_s=rollout.backoff_s,
            )
            for url in rollout.server_urls
        ]
        self._pool = ThreadPoolExecutor(max_workers=len(self.clients), thread_name_prefix="rollout")

    def wait_until_ready(self) -> list[int]:
        """Block until every server is ready; returns their weight versions."""
        return [c.wait_until_ready(timeout_s=self.cfg.ready_timeout_s).weight_version for c in self.clients]

    def health_versions(self) -> list[int]:
        return [c.health().weight_version for c in self.clients]

    def _request(self, prompt_ids: list[list[int]], seed: int | None) -> GenerateRequest:
        g = self.gen
        return GenerateRequest(
            prompt_token_ids=prompt_ids,
            n=g.num_generations,
            max_tokens=g.max_completion_length,
            temperature=g.temperature,
            top_p=g.top_p,
            top_k=max(g.top_k, 0),
            stop=list(g.stop),
            ignore_eos=g.ignore_eos,
            seed=seed,
        )

    def generate(self, step: int, prompts: list[dict[str, Any]]) -> RolloutBatch:
        t0 = time.perf_counter()
        slices = split_evenly(len(prompts), len(self.clients))
        base_seed = self.gen.seed
        futures = []
        for server, (a, b) in enumerate(slices):
            seed = None if base_seed is None else base_seed + 1000 * step + server
            req = self._request([list(p["prompt_ids"]) for p in prompts[a:b]], seed)
            futures.append(self._pool.submit(self.clients[server].generate, req))
        completions: list[Completion] = []
        versions = []
        for (a, b), fut in zip(slices, futures, strict=True):
            res = fut.result()  # re-raises RolloutServerUnavailable / RolloutServerError
            expected = (b - a) * self.gen.num_generations
            if len(res.completions) != expected:
                raise RuntimeError(f"server returned {len(res.completions)} completions, expected {expected}")
            completions.extend(res.completions)
            versions.append(res.weight_version)
        return RolloutBatch(
            step=step,
            prompts=prompts,
            completions=completions,
            num_generations=self.gen.num_generations,
            generate_s=time.perf_counter() - t0,
            server_versions=versions,
        )

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        for c in self.clients:
            c.close()
