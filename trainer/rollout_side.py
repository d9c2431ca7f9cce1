"""The rollout side of the loop: prompts -> completions -> scores -> training batches, in a background thread.

Runs on trainer rank 0 only. One thread draws a step's prompts, waits until every rollout server is ready,
asks them for completions (``RolloutStage``), scores them (``ScoreStage``) and puts the step's batch on a
queue the update side takes from. The three parts are in this file, in that order, so one prompt's way from
the dataset to a training batch reads top to bottom in one place. The update side never talks to the
servers' generation routes.

Back-pressure (what ``rollout.max_off_policy_steps`` = k means): the update side *releases* steps. It
releases steps 1..k+1 after the first push and step s+k+1 once step s has trained and its weights were pushed,
giving with each release the weight version the servers then hold. The thread generates a step only once it
is released, so
- k = 0: step s is generated on weights s-1, after they were pushed; generation and training take turns
  (strictly on-policy, the loop's original behaviour);
- k = 1: step s+1 is generated on weights s-1 while step s trains, so the rollout servers and the trainer
  work at the same time; the batch is one step stale when it trains, and the loss's truncated importance
  weight (rollout log-probs vs trainer log-probs) corrects for it.
The queue never holds more than k+1 batches.

Every completion carries the weight version it was sampled with. A batch whose completions came from weights
older than its release version (a server restarted and serves its initial weights) is handed over as
*stale*, with the reason; the update side re-syncs the servers (a collective on every trainer rank) and
releases the step again, and the same prompts are generated again.

A checkpoint of step s must resume with step s+1's prompts even if the thread has already drawn later ones,
so each batch carries the dataset position right after its own prompts were drawn (``data_state``).

Generation (``RolloutStage``): a step's prompts are dealt to the servers in contiguous slices (server i gets
prompts ``[i*k, (i+1)*k)``), the requests run in parallel threads, and the answers are put back in prompt
order, so the result is prompt-major whatever the number of servers. Prompts are sent as token ids (the
trainer's tokenisation), so trainer and server agree on every prompt token. A server that does not answer is
retried by ``RolloutClient`` with exponential backoff; after the last retry ``RolloutServerUnavailable``
propagates and the run stops with that message.

Scoring (``ScoreStage``): rewards per function and in total, group-relative advantages, truncation
accounting. Truncated completions (finish_reason "length": they hit ``max_completion_length``) are counted and
reported loudly every step, because a cap that cuts most answers silently zeroes every correctness reward;
with ``mask_truncated_completions`` they are also left out of the loss (their advantage still counts in their
group's statistics, as in DAPO).
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from rollout_server.client import RolloutClient
from rollout_server.protocol import Completion, GenerateRequest
from trainer.advantages import group_advantages
from trainer.config import GenerationConfig, RolloutConfig
from trainer.data import PromptDataset
from trainer.rewards import RewardSet
from trainer.update_stage import TrainBatch, TrainRow

log = logging.getLogger(__name__)


# ---- generation: prompts -> completions from the rollout servers ----------------------------------------------
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


# ---- scoring: rewards, advantages, truncation -----------------------------------------------------------------
@dataclass
class ScoredBatch:
    rollout: RolloutBatch
    per_func: dict[str, list[float]]  # name -> [N]
    total: list[float]  # [N]
    advantages: list[float]  # [N]
    truncated: list[bool]  # [N]
    reward_failures: dict[str, int]
    frac_zero_variance_groups: float
    score_s: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)


def _mean_std(xs: list[float]) -> tuple[float, float]:
    if not xs:
        return float("nan"), float("nan")
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


class ScoreStage:
    def __init__(self, rewards: RewardSet, scale_rewards: str, eps: float, mask_truncated: bool):
        self.rewards = rewards
        self.scale_rewards = scale_rewards
        self.eps = eps
        self.mask_truncated = mask_truncated

    def score(self, batch: RolloutBatch) -> ScoredBatch:
        t0 = time.perf_counter()
        n = len(batch.completions)
        prompts = [batch.prompt_of(i)["prompt"] for i in range(n)]
        texts = [c.text for c in batch.completions]
        golds = [batch.prompt_of(i)["gold"] for i in range(n)]
        scores = self.rewards(prompts, texts, gold=golds)
        total = torch.tensor(scores.total, dtype=torch.float64)  # [N]
        adv = group_advantages(total, batch.num_generations, self.scale_rewards, self.eps)
        truncated = [c.finish_reason == "length" for c in batch.completions]
        lengths = [len(c.token_ids) for c in batch.completions]

        m: dict[str, float] = {}
        for name, vals in scores.per_func.items():
            m[f"reward/{name}/mean"], m[f"reward/{name}/std"] = _mean_std(vals)
        m["reward/total/mean"], m["reward/total/std"] = _mean_std(scores.total)
        accuracy = self.rewards.accuracy(scores.per_func)
        if accuracy is not None:
            m["accuracy"] = accuracy
        m["completion_length/mean"] = sum(lengths) / max(n, 1)
        m["completion_length/max"] = float(max(lengths, default=0))
        m["completion_length/min"] = float(min(lengths, default=0))
        m["truncated/frac"] = sum(truncated) / max(n, 1)
        m["truncated/count"] = float(sum(truncated))
        m["frac_zero_variance_groups"] = adv.frac_zero_variance_groups
        for name, k in scores.failures.items():
            m[f"reward_failures/{name}"] = float(k)
        m["reward_failures/total"] = float(sum(scores.failures.values()))
        if sum(truncated):
            log.warning(
                "step %d: %d of %d completions (%.0f%%) hit max_completion_length (%s)",
                batch.step,
                sum(truncated),
                n,
                100.0 * sum(truncated) / max(n, 1),
                "masked out of the loss" if self.mask_truncated else "kept in the loss",
            )
        return ScoredBatch(
            rollout=batch,
            per_func=scores.per_func,
            total=scores.total,
            advantages=adv.advantages.tolist(),
            truncated=truncated,
            reward_failures=scores.failures,
            frac_zero_variance_groups=adv.frac_zero_variance_groups,
            score_s=time.perf_counter() - t0,
            metrics=m,
        )

    def to_train_batch(self, scored: ScoredBatch, nan_loss: bool = False) -> TrainBatch:
        rb = scored.rollout
        rows = []
        for i, c in enumerate(rb.completions):
            rows.append(
                TrainRow(
                    prompt_ids=list(rb.prompt_of(i)["prompt_ids"]),
                    completion_ids=list(c.token_ids),
                    advantage=float(scored.advantages[i]),
                    rollout_logprobs=list(c.logprobs),
                    loss_mask=not (self.mask_truncated and scored.truncated[i]),
                )
            )
        return TrainBatch(step=rb.step, rows=rows, nan_loss=nan_loss)


def completion_records(scored: ScoredBatch, prompt_indices: list[int]) -> list[dict]:
    """completions.jsonl rows for the sampled prompts (every completion of each)."""
    rb = scored.rollout
    g = rb.num_generations
    out = []
    for p in prompt_indices:
        prompt = rb.prompts[p]
        for j in range(g):
            i = p * g + j
            c = rb.completions[i]
            out.append(
                {
                    "step": rb.step,
                    "weight_version": c.weight_version,
                    "group": p,
                    "index": j,
                    "prompt": prompt.get("prompt"),
                    "prompt_text": prompt.get("prompt_text"),
                    "gold": prompt.get("gold"),
                    "completion": c.text,
                    "num_tokens": len(c.token_ids),
                    "finish_reason": c.finish_reason,
                    "reward": scored.total[i],
                    "rewards": {k: v[i] for k, v in scored.per_func.items()},
                    "advantage": scored.advantages[i],
                }
            )
    return out


# ---- the producer thread: released steps -> batches on a queue ------------------------------------------------
@dataclass
class ProducedStep:
    """One step's output of the rollout side: a training batch, or why there is none."""

    batch: TrainBatch  # rows, or stale / stop_reason set
    scored: ScoredBatch | None  # rewards, completions and metrics (None when stale or failed)
    data_state: dict[str, int] | None  # dataset position after this step's prompts were drawn
    min_version: int  # the weight version the completions had to come from (at least)


class RolloutSide:
    """The background producer of training batches (rank 0). ``start`` once, ``release`` / ``next``
    from the update side, ``close`` at the end."""

    def __init__(
        self,
        dataset: PromptDataset,
        rollout: RolloutStage,
        scorer: ScoreStage,
        prompts_per_step: int,
        ready_timeout_s: float,
        nan_loss_steps: frozenset[int] = frozenset(),
        nan_loss_rank: int | None = None,
    ):
        self.dataset = dataset
        self.rollout = rollout
        self.scorer = scorer
        self.prompts_per_step = prompts_per_step
        self.ready_timeout_s = ready_timeout_s
        self.nan_loss_steps = nan_loss_steps
        self.nan_loss_rank = nan_loss_rank
        self._cond = threading.Condition()
        self._released: dict[int, int] = {}  # step -> minimum weight version its completions must have
        self._closed = False
        self._out: queue.Queue[ProducedStep] = queue.Queue()
        self._thread: threading.Thread | None = None

    # ---- update side's calls ----------------------------------------------------------------------------------
    def start(self, first_step: int, last_step: int) -> None:
        self._thread = threading.Thread(
            target=self._run, args=(first_step, last_step), name="rollout-side", daemon=True
        )
        self._thread.start()

    def release(self, step: int, version: int) -> None:
        """Step ``step`` may be generated now, on weights at least ``version`` (what the servers hold)."""
        with self._cond:
            self._released[step] = version
            self._cond.notify_all()

    def next(self, step: int, timeout_s: float) -> ProducedStep:
        """The next batch (it must be ``step``'s); raises TimeoutError if none comes within ``timeout_s``, or
        RuntimeError at once if the thread died."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                item = self._out.get(timeout=1.0)
            except queue.Empty:
                if self._thread is None or not self._thread.is_alive():
                    raise RuntimeError("the rollout thread is not running") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no rollout batch for step {step} within {timeout_s:.0f}s") from None
                continue
            if item.batch.step != step:
                raise RuntimeError(f"rollout side produced step {item.batch.step}, expected {step}")
            return item

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        # The thread may be inside an HTTP request (bounded by rollout.request_timeout_s); it is a daemon and
        # exits at its next wait, so closing does not block on it.

    # ---- the thread ---------------------------------------------------------------------------------------------
    def _wait_released(self, step: int) -> int | None:
        """Block until ``step`` is released; returns its minimum version (and forgets it), None when closed."""
        with self._cond:
            while step not in self._released and not self._closed:
                self._cond.wait()
            return None if self._closed else self._released.pop(step)

    def _run(self, first_step: int, last_step: int) -> None:
        for step in range(first_step, last_step + 1):
            prompts, data_state = None, None
            while True:
                min_version = self._wait_released(step)
                if min_version is None:
                    return
                if prompts is None:
                    prompts = self.dataset.next_batch(self.prompts_per_step)
                    data_state = self.dataset.state_dict()
                item = self._produce(step, prompts, data_state, min_version)
                self._out.put(item)
                if item.batch.stop_reason:
                    return
                if not item.batch.stale:
                    break  # stale: the update side re-syncs the servers, then releases the step again

    def _produce(
        self, step: int, prompts: list[dict[str, Any]], data_state: dict[str, int], min_version: int
    ) -> ProducedStep:
        def empty(**why) -> ProducedStep:
            return ProducedStep(TrainBatch(step=step, rows=[], **why), None, data_state, min_version)

        try:
            # A server that restarted comes back with its initial weights and no transfer group: wait until it
            # answers, then report it stale so the update side re-syncs it before anything is generated.
            health = [c.wait_until_ready(timeout_s=self.ready_timeout_s) for c in self.rollout.clients]
            lost = [
                f"server {i} holds v{h.weight_version}"
                for i, h in enumerate(health)
                if h.weight_version < min_version or not h.weight_transfer
            ]
            if lost:
                return empty(stale=f"{', '.join(lost)} (needs >= v{min_version}, or lost its transfer group)")
            rolled = self.rollout.generate(step, prompts)
            oldest = min(rolled.weight_versions)
            if oldest < min_version:
                return empty(
                    stale=f"completions from v{oldest}, needs >= v{min_version} (a server restarted?)"
                )
            scored = self.scorer.score(rolled)
            batch = self.scorer.to_train_batch(scored, nan_loss=step in self.nan_loss_steps)
            batch.nan_loss_rank = self.nan_loss_rank
            return ProducedStep(batch, scored, data_state, min_version)
        except Exception as e:
            log.exception("step %d: rollout failed", step)
            return empty(stop_reason=f"step {step}: rollout failed: {type(e).__name__}: {e}")
