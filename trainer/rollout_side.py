"""The rollout side of the loop: prompts -> completions -> scores -> training batches, in a background thread.

Runs on trainer rank 0 only. One thread draws a step's prompts, waits until every rollout server is ready,
asks them for completions (``RolloutStage``), scores them (``ScoreStage``) and puts the step's batch on a
queue the update side takes from. The update side never talks to the servers' generation routes.

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
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

from trainer.data import PromptDataset
from trainer.rollout_stage import RolloutStage
from trainer.score_stage import ScoredBatch, ScoreStage
from trainer.update_stage import TrainBatch

log = logging.getLogger(__name__)


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
