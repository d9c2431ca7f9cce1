"""The GRPO training loop: the update side, step after step, on every trainer rank.

``run_training(config)`` is the whole run; ``python -m trainer`` and the Ray launcher both call it (with
RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT in the environment; without them it runs as one process).
The components are built from the config in trainer/build.py.

Two sides:
- the rollout side (rank 0, a background thread; trainer/rollout_side.py) draws ``optim.prompts_per_step``
  prompts, asks the rollout servers for ``num_generations`` completions each, scores them (rewards, group
  advantages, truncation) and queues the training batch. It generates a step only once this loop has
  released it (``rollout.max_off_policy_steps``: 0 = after the previous step's weights were pushed; 1 =
  while the previous step trains);
- the update side (here, every rank): take the step's batch (rank 0 broadcasts it), train on the rank's
  token-balanced shard in token-budget micro-batches (``UpdateStage``: one DeepSpeed optimizer step; a
  non-finite gradient norm skips it on all ranks), push the new weights to every server as version = step
  (``WeightSync``: its update requests go out before the optimizer step, so the servers' manifest check
  and handshake overlap it; it also recovers servers that restarted), release the next step, write metrics
  (rank 0), sampled completions every ``logging.completions_every_steps`` and an atomic checkpoint every
  ``checkpoint.every_steps``.

Differences from the R1-Zero recipe: the reference model is only built when ``objective.beta > 0``
(default 0, as TRL); the loss reduction is configurable (``objective.loss_type``, default DAPO's token mean).
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer import checkpoint as ckpt
from trainer import debug_hooks
from trainer.build import Components, TrainingStopped, build_components
from trainer.config import TrainConfig, load_config, validate_config
from trainer.distributed import broadcast_object, init_distributed
from trainer.rollout_side import ProducedStep
from trainer.step_report import StepTimes, log_step, sample_completions, step_metrics
from trainer.update_stage import TrainBatch
from trainer.weight_sync import WeightSyncFailed

__all__ = ["TrainResult", "TrainingStopped", "run_training"]

log = logging.getLogger("trainer")


@dataclass
class TrainResult:
    run_dir: Path
    steps_done: int  # last completed step
    start_step: int  # step the run resumed from (0 = fresh)
    skipped_steps: int
    last_checkpoint: Path | None
    last_metrics: dict[str, Any] = field(default_factory=dict)


def _coerce_config(
    config: TrainConfig | dict | str | os.PathLike, overrides: list[str] | None
) -> TrainConfig:
    if isinstance(config, TrainConfig):
        if overrides:
            from trainer.config import apply_overrides

            return validate_config(apply_overrides(config.model_dump(mode="json"), overrides), "<config>")
        return config
    if isinstance(config, dict):
        from trainer.config import apply_overrides

        return validate_config(apply_overrides(dict(config), list(overrides or [])), "<dict>")
    return load_config(config, overrides)


def _setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s [rank{rank}] %(name)s %(levelname)s: %(message)s",
        force=False,
    )


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# The run folder's per-step logs (rank 0 writes them): each step appears once, whatever restarts happened.
STEP_LOGS = ("metrics.jsonl", "completions.jsonl")


def _truncate_after_step(path: Path, step: int) -> None:
    """Rewrite a JSONL log keeping only rows with ``step <= step`` (atomic replace)."""
    if not path.exists():
        return
    from trainer.metrics_log import read_jsonl

    kept = [r for r in read_jsonl(path) if int(r.get("step", 0)) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)


class Trainer:
    """The update side of the loop over the run's components; ``run()`` is the whole loop."""

    def __init__(self, c: Components):
        self.c, self.cfg = c, c.cfg
        self.rank = c.rank
        self.off_policy = self.cfg.rollout.max_off_policy_steps
        self.skipped_steps = 0
        self.reward_failures_total = 0
        self.last_checkpoint: Path | None = None
        self.synced_version: int | None = None  # version the servers were last given
        self.trained_version = 0  # version of the weights the current step starts from
        self.data_states: dict[int, dict[str, int]] = {}  # rank 0: step -> data position after its prompts
        self.sample_rng = random.Random(self.cfg.run.seed + 7)

    # ---- resume -------------------------------------------------------------------------------------------
    def maybe_resume(self) -> int:
        """Load the checkpoint chosen at build time, if any; returns the step to continue after (0 = fresh)."""
        path = self.c.resume_from
        if path is None:
            if self.rank == 0:
                self._start_logs_over()
            return 0
        state = ckpt.load_checkpoint(path, self.c.engine, self.rank)
        if self.rank == 0:
            self.c.dataset.load_state_dict(state["data"])
            self.skipped_steps = int(state.get("skipped_steps", 0))
            # Steps after the checkpoint will run again: drop their old rows so every step appears once.
            for name in STEP_LOGS:
                _truncate_after_step(self.cfg.run_dir / name, int(state["step"]))
        self.last_checkpoint = path
        log.info("resumed from %s (step %d)", path, state["step"])
        return int(state["step"])

    def _start_logs_over(self) -> None:
        """A run that starts at step 1 in a run folder that already has step rows. With ``checkpoint.resume``
        they are an earlier attempt of this run that died before its first checkpoint (the launcher restarts
        such a trainer): it runs those steps again, so their rows go, as after any resume. Without it they
        belong to an earlier run in the same folder: they are kept aside, renamed, and never appended to."""
        for name in STEP_LOGS:
            path = self.cfg.run_dir / name
            if not path.exists() or path.stat().st_size == 0:
                continue
            if self.cfg.checkpoint.resume:
                _truncate_after_step(path, 0)
                log.warning(
                    "no checkpoint to resume from: starting at step 1, dropped the old rows of %s", path
                )
            else:
                aside = path.with_name(f"{path.stem}.before-{time.strftime('%Y%m%d-%H%M%S')}{path.suffix}")
                os.replace(path, aside)
                log.warning(
                    "fresh run: %s of an earlier run in this folder was moved to %s", path, aside.name
                )

    # ---- weights to the servers -----------------------------------------------------------------------------
    def push(self, version: int) -> dict[str, float]:
        """Weight sync (all ranks; it recovers restarted servers itself), then the optional debug probe."""
        try:
            stats = self.c.sync.push(version)
        except WeightSyncFailed as e:
            raise TrainingStopped(str(e)) from e
        self.synced_version = version
        if self.cfg.debug.probe_after_sync and self.rank == 0:
            prompt_ids = self.c.dataset.rows[0]["prompt_ids"]
            debug_hooks.probe_servers(self.cfg.run_dir, self.c.rollout.clients, prompt_ids, version)
        return stats

    def release(self, step: int) -> None:
        """Let the rollout side generate ``step`` on the weights the servers hold now (rank 0)."""
        if self.rank == 0 and step <= self.c.total_steps:
            self.c.producer.release(step, self.synced_version)

    # ---- one step -------------------------------------------------------------------------------------------
    def next_batch(self, step: int) -> tuple[TrainBatch, ProducedStep | None]:
        """``step``'s training batch on every rank (rank 0 takes it from the rollout side and broadcasts it).
        A stale batch (a server lost its weights) re-syncs the servers and is generated again, up to 3 times."""
        r = self.cfg.rollout
        timeout = r.ready_timeout_s + r.request_timeout_s * (r.retries + 1) + 60.0
        for attempt in range(3):
            produced = None
            if self.rank == 0:
                try:
                    produced = self.c.producer.next(step, timeout)
                    batch = produced.batch
                except Exception as e:
                    batch = TrainBatch(step=step, rows=[], stop_reason=f"step {step}: rollout failed: {e}")
            batch = broadcast_object(batch if self.rank == 0 else None)
            if batch.stop_reason:
                raise TrainingStopped(batch.stop_reason)
            if not batch.stale:
                return batch, produced
            log.warning("step %d: %s: re-syncing the servers, attempt %d", step, batch.stale, attempt + 1)
            try:
                self.c.sync.resync(self.synced_version)
            except WeightSyncFailed as e:
                raise TrainingStopped(str(e)) from e
            if self.rank == 0:
                self.c.producer.release(step, self.synced_version)  # same prompts, generated again
        raise TrainingStopped(f"step {step}: servers kept answering with stale weights")

    def step(self, step: int) -> dict[str, Any]:
        t_step = time.perf_counter()
        batch, produced = self.next_batch(step)
        wait_s = time.perf_counter() - t_step
        if self.cfg.debug.dump_batches and self.rank == 0:
            debug_hooks.dump_batch(self.cfg.run_dir, batch)
        sync_due = step % self.cfg.rollout.sync_every_steps == 0
        if sync_due:  # the servers take the update request (manifest check, handshake) while this step trains
            self.c.sync.announce(step)
        t_train = time.perf_counter()
        result = self.c.update.step(batch)
        train_s = time.perf_counter() - t_train
        if not result.applied:
            self.skipped_steps += 1
            log.warning(
                "step %d SKIPPED: non-finite gradient norm (loss finite on all ranks: %s); weights unchanged",
                step,
                not result.nonfinite_loss,
            )
        trained_from, self.trained_version = self.trained_version, step
        t_sync = time.perf_counter()
        sync_stats = self.push(step) if sync_due else {}
        sync_s = time.perf_counter() - t_sync
        self.release(step + 1 + self.off_policy)
        step_s = time.perf_counter() - t_step
        if self.rank != 0:
            return {}
        self.data_states[step] = produced.data_state
        self.reward_failures_total += int(produced.scored.metrics.get("reward_failures/total", 0))
        extra = {**sync_stats, **self._evaluate(step)}
        times = StepTimes(wait_rollout=wait_s, train=train_s, sync=sync_s, step=step_s)
        m = step_metrics(
            step, trained_from, produced, result, extra, times, self.skipped_steps, self.reward_failures_total
        )
        self.c.metrics.log(step, m)
        log_step(step, self.c.total_steps, m, result)
        every = self.cfg.logging.completions_every_steps
        if every and step % every == 0:
            rows = sample_completions(produced, self.cfg.logging.completions_sample_size, self.sample_rng)
            self.c.completions_log.log(rows)
        return m

    def _evaluate(self, step: int) -> dict[str, float]:
        """Held-out accuracy of the weights just pushed (version == step), through the first rollout server."""
        from trainer.eval import evaluate_with_client

        ev = self.cfg.eval
        if not ev.every_steps or step % ev.every_steps or not self.c.eval_rows:
            return {}
        t0 = time.perf_counter()
        m = evaluate_with_client(
            self.c.rollout.clients[0],
            self.c.eval_rows,
            k=ev.k,
            temperature=ev.temperature,
            max_tokens=ev.max_tokens,
            seed=self.cfg.run.seed,
        )
        out = {f"eval/{k}": v for k, v in m.items()}
        out["time/eval_s"] = time.perf_counter() - t0
        log.info("step %d held-out eval: %s", step, {k: round(v, 4) for k, v in out.items()})
        return out

    def save(self, step: int) -> None:
        """Checkpoint ``step`` (all ranks). Its data position is the one right after step ``step``'s prompts,
        even if the rollout side has already drawn later ones."""
        data = None
        if self.rank == 0:
            data = self.data_states[step]  # every step that ran recorded its position
            self.data_states = {s: d for s, d in self.data_states.items() if s > step}
        state = {
            "weight_version": step,
            "skipped_steps": self.skipped_steps,
            "total_steps": self.c.total_steps,
            "run_name": self.cfg.run.name,
        }
        state = broadcast_object({**state, "data": data})
        self.last_checkpoint = ckpt.save_checkpoint(
            self.cfg.checkpoint_dir,
            step,
            self.c.engine,
            rank=self.rank,
            trainer_state=state,
            hf_model=self.c.hf_model if self.cfg.checkpoint.export_hf else None,
            tokenizer=self.c.tokenizer,
            zero3=self.cfg.deepspeed.zero_stage == 3,
            keep_last=self.cfg.checkpoint.keep_last,
        )

    # ---- the loop ---------------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        start = self.maybe_resume()
        self.trained_version = start
        # Servers must serve the trainer's weights before the first rollout: after a resume they still hold
        # the initial (or some later, lost) weights; on a fresh start this also validates the manifest.
        self.push(start)
        if self.rank == 0:
            self.c.producer.start(start + 1, self.c.total_steps)
        for s in range(start + 1, start + 2 + self.off_policy):
            self.release(s)
        last: dict[str, Any] = {}
        step = start
        saved_at = start if start else None
        for step in range(start + 1, self.c.total_steps + 1):
            last = self.step(step)
            every = self.cfg.checkpoint.every_steps
            if every and step % every == 0:
                self.save(step)
                saved_at = step
            if self.cfg.debug.crash_after_step == step:
                debug_hooks.crash_now(step)
        if self.cfg.checkpoint.save_final and saved_at != step and step > start:
            self.save(step)
        return TrainResult(
            run_dir=self.cfg.run_dir,
            steps_done=step,
            start_step=start,
            skipped_steps=self.skipped_steps,
            last_checkpoint=self.last_checkpoint,
            last_metrics=last,
        )


def run_training(
    config: TrainConfig | dict | str | os.PathLike, overrides: list[str] | None = None
) -> TrainResult:
    """Run (or resume) a GRPO training run; every trainer rank calls this.

    ``config``: a TrainConfig, a nested dict, or a YAML path; ``overrides``: ``["a.b=c", ...]``.
    Distributed setup comes from the environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK);
    without it the run is a single process. Raises ``TrainingStopped`` (same message on every rank) when a
    rollout server or the weight sync fails for good. Returns a TrainResult on every rank.
    """
    cfg = _coerce_config(config, overrides)
    info = init_distributed(cfg.deepspeed.dist_timeout_s)
    _setup_logging(info.rank)
    _seed_everything(cfg.run.seed)
    components = build_components(cfg, info)
    try:
        return Trainer(components).run()
    finally:
        components.close()
