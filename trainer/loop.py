"""The GRPO training loop: rollout -> score -> update -> weight sync, step after step, on every trainer rank.

``run_training(config)`` is the whole run; ``python -m trainer`` and the Ray launcher both call it (with
RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT in the environment; without them it runs as one process).

One step:
1. rank 0 draws ``optim.prompts_per_step`` prompts and asks the rollout servers for ``num_generations``
   completions each (``RolloutStage``; prompts spread over the servers);
2. rank 0 scores them (``ScoreStage``: rewards, group advantages, truncation count) and broadcasts the
   training rows (token ids, advantages, sampler log-probs) to every rank;
3. every rank trains on its token-balanced shard in token-budget micro-batches (``UpdateStage``), one
   DeepSpeed optimizer step (clip, AdamW, schedule; a non-finite gradient norm skips it on all ranks);
4. the new weights go to every server (``WeightSync``; ZeRO-3 gathers bucket by bucket) as version = step;
5. metrics (rank 0) every step; sampled completions every ``logging.completions_every_steps``; an atomic
   checkpoint every ``checkpoint.every_steps``.

The stages hand batches over through queues (``rollout_q``, ``scored_q``) and every completion records the
weight version that produced it. Today the stages run in sequence (strictly on-policy); overlapping the
generation of step s+1 with training on step s (one-step off-policy) only needs the rollout stage to run in a
thread that fills ``rollout_q`` ahead.

Differences from the R1-Zero recipe: the reference model is only built when ``objective.beta > 0``
(default 0, as TRL); the loss reduction is configurable (``objective.loss_type``, default DAPO's token mean).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import math
import os
import queue
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer import checkpoint as ckpt
from trainer.config import ConfigError, TrainConfig, config_to_yaml, load_config, validate_config
from trainer.distributed import DistInfo, barrier, broadcast_object, free_port, init_distributed
from trainer.update_stage import TrainBatch, UpdateResult

log = logging.getLogger("trainer")


class TrainingStopped(RuntimeError):
    """The run cannot continue (rollout server unreachable, weight sync failed...); the message says why."""


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


def _debug_raising_reward(prompts=None, completions=(), **columns):
    raise RuntimeError("debug.raising_reward: this reward always raises")


def _truncate_after_step(path: Path, step: int) -> None:
    """Rewrite a JSONL log keeping only rows with ``step <= step`` (atomic replace)."""
    if not path.exists():
        return
    from trainer.metrics_log import read_jsonl

    kept = [r for r in read_jsonl(path) if int(r.get("step", 0)) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)


class _Runner:
    """Holds the run's components; ``run()`` is the loop. Split out so each phase reads on its own."""

    def __init__(self, cfg: TrainConfig, info: DistInfo):
        self.cfg, self.info = cfg, info
        self.rank, self.world = info.rank, info.world_size
        self.run_dir = cfg.run_dir
        self.ckpt_root = cfg.checkpoint_dir
        self.zero3 = cfg.deepspeed.zero_stage == 3
        self.rollout = None
        self.scorer = None
        self.dataset = None
        self.eval_rows: list[dict] = []  # held-out slice for eval.every_steps (rank 0)
        self.metrics = None
        self.completions_log = None
        self.sync = None
        self.skipped_steps = 0
        self.reward_failures_total = 0
        self.last_checkpoint: Path | None = None
        self.resume_from: Path | None = None  # chosen in setup (rank 0 verifies, all ranks agree)
        self.synced_version: int | None = None  # version the servers were last given
        self.rollout_q: queue.Queue = queue.Queue(maxsize=1)
        self.scored_q: queue.Queue = queue.Queue(maxsize=1)

    # ---- setup ----------------------------------------------------------------------------------------
    def setup(self) -> None:
        from trainer.engine_setup import (
            build_engine,
            build_reference,
            load_tokenizer,
            resolve_model_path,
            use_bf16,
        )
        from trainer.update_stage import UpdateStage
        from trainer.weight_sync import WeightSync, transfer_backend

        cfg = self.cfg
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(config_to_yaml(cfg))
            ckpt.clean_stale_temp(self.ckpt_root)
        # Decide what to resume from before anything heavy is built, so a refusal costs nothing.
        decision = self._choose_checkpoint() if self.rank == 0 else None
        decision = broadcast_object(decision)
        if decision["error"]:
            raise ckpt.CheckpointError(decision["error"])
        self.resume_from = Path(decision["path"]) if decision["path"] else None
        barrier()
        self.model_path = resolve_model_path(cfg, self.rank == 0)
        try:
            self.tokenizer = load_tokenizer(self.model_path)
        except OSError as e:  # a hub id that does not exist or is not cached offline, a broken folder
            raise ConfigError(f"model.name_or_path: cannot load {self.model_path!r}: {e}") from None

        num_prompts = self._setup_data() if self.rank == 0 else None
        num_prompts = broadcast_object(num_prompts)
        if isinstance(num_prompts, str):
            raise TrainingStopped(num_prompts)
        steps_per_epoch = math.ceil(num_prompts / cfg.optim.prompts_per_step)
        self.total_steps = cfg.optim.max_steps or cfg.optim.epochs * steps_per_epoch

        self.engine, _, _ = build_engine(cfg, self.model_path, self.world, self.total_steps)
        self.hf_model = self.engine.module.model
        ref = build_reference(cfg, self.model_path, self.world, self.info.device)
        if cfg.warm_start.enabled:
            log.warning(
                "warm_start is run by the launcher (python -m launch) or trainer.sft; python -m trainer does not"
            )
        self.update = UpdateStage(
            self.engine,
            cfg.objective.loss_config(),
            pad_id=self.tokenizer.pad_token_id,
            temperature=cfg.generation.temperature,
            chunk_tokens=cfg.objective.logprob_chunk_tokens,
            micro_batch_tokens=cfg.optim.micro_batch_tokens,
            max_completion_length=cfg.generation.max_completion_length,
            rank=self.rank,
            world_size=self.world,
            device=self.info.device,
            ref_model=ref,
        )
        r = cfg.rollout
        train_dtype = torch.bfloat16 if use_bf16(cfg) else torch.float32
        sync_dtype = None if r.sync_dtype == "auto" else getattr(torch, r.sync_dtype)
        self.sync = WeightSync(
            self.hf_model,
            server_urls=r.server_urls,
            api_token=r.api_token,
            rank=self.rank,
            zero3=self.zero3,
            backend=transfer_backend(r.sync_backend),
            master_addr=r.sync_master_addr,
            master_port=r.sync_master_port or broadcast_object(free_port() if self.rank == 0 else None),
            bucket_bytes=int(r.sync_bucket_mb * (1 << 20)),
            timeout_s=r.sync_timeout_s,
            dtype=sync_dtype if sync_dtype != train_dtype else None,
        )
        err = None
        if self.rank == 0:
            try:
                self._setup_rank0_io()
                versions = self.rollout.wait_until_ready()
                log.info("rollout servers ready: %s (weight versions %s)", r.server_urls, versions)
            except Exception as e:
                err = f"rollout setup failed: {type(e).__name__}: {e}"
        err = broadcast_object(err)
        if err:
            raise TrainingStopped(err)
        try:
            self.sync.connect()
        except RuntimeError as e:
            raise TrainingStopped(str(e)) from e

    def _setup_data(self) -> int | str:
        from trainer.data import PromptDataset, load_prompts

        try:
            split = load_prompts(self.cfg.data, self.tokenizer, "train")
        except Exception as e:
            return f"could not load prompts: {type(e).__name__}: {e}"
        self.dataset = PromptDataset(split.rows, seed=self.cfg.data.seed, shuffle=self.cfg.data.shuffle)
        ev = self.cfg.eval
        if ev.every_steps:
            try:  # the held-out slice for periodic evaluation: the first num_problems of the split
                self.eval_rows = load_prompts(self.cfg.data, self.tokenizer, ev.split).rows[: ev.num_problems]
            except Exception as e:
                return f"could not load the {ev.split} split for eval.every_steps: {type(e).__name__}: {e}"
        return len(split.rows)

    def _evaluate(self, step: int) -> dict[str, float]:
        """Held-out accuracy of the weights just pushed (version == step), through the first rollout server."""
        from trainer.eval import evaluate_with_client

        ev = self.cfg.eval
        if not ev.every_steps or step % ev.every_steps or not self.eval_rows:
            return {}
        t0 = time.perf_counter()
        m = evaluate_with_client(
            self.rollout.clients[0],
            self.eval_rows,
            k=ev.k,
            temperature=ev.temperature,
            max_tokens=ev.max_tokens,
            seed=self.cfg.run.seed,
        )
        out = {f"eval/{k}": v for k, v in m.items()}
        out["time/eval_s"] = time.perf_counter() - t0
        log.info("step %d held-out eval: %s", step, {k: round(v, 4) for k, v in out.items()})
        return out

    def _setup_rank0_io(self) -> None:
        from trainer.metrics_log import CompletionsLogger, MetricsLogger
        from trainer.rewards import RewardSet
        from trainer.rollout_stage import RolloutStage
        from trainer.score_stage import ScoreStage

        cfg = self.cfg
        weights = dict(cfg.rewards)
        extra = {}
        for path, w in cfg.custom_rewards.items():
            module, _, func = path.partition(":")
            name = func
            weights[name] = w
            extra[name] = getattr(importlib.import_module(module), func)
        if cfg.debug.raising_reward:
            weights["debug_raise"] = 1.0
            extra["debug_raise"] = _debug_raising_reward
        rewards = RewardSet(weights, cfg.data.prompt_format, extra=extra)
        self.scorer = ScoreStage(
            rewards,
            cfg.objective.scale_rewards,
            cfg.objective.advantage_eps,
            cfg.objective.mask_truncated_completions,
        )
        self.rollout = RolloutStage(cfg.rollout, cfg.generation)
        self.metrics = MetricsLogger(
            self.run_dir,
            tensorboard=cfg.logging.tensorboard,
            wandb_project=cfg.logging.wandb_project,
            run_name=cfg.run.name,
            config=cfg.model_dump(mode="json"),
        )
        self.completions_log = CompletionsLogger(self.run_dir)
        self.sample_rng = random.Random(cfg.run.seed + 7)

    # ---- resume -------------------------------------------------------------------------------------------
    def _choose_checkpoint(self) -> dict[str, str | None]:
        """Rank 0: the verified checkpoint to resume from (newer damaged ones are set aside with a warning),
        or an error: existing checkpoints are never started over, whatever ``checkpoint.resume`` says."""
        root = self.ckpt_root
        try:
            if not self.cfg.checkpoint.resume:
                ckpt.ensure_no_checkpoints(root)
                return {"path": None, "error": None}
            path, skipped = ckpt.select_resume_checkpoint(root)
        except ckpt.CheckpointError as e:
            return {"path": None, "error": str(e)}
        for bad, why in skipped:
            moved = ckpt.set_aside(bad, why)
            log.warning(
                "checkpoint %s is unusable (%s): moved to %s; resuming from an older one", bad, why, moved
            )
        if path is None:
            log.warning("checkpoint.resume=true but %s holds no checkpoint yet: starting at step 0", root)
        return {"path": str(path) if path else None, "error": None}

    def maybe_resume(self) -> int:
        """Load the checkpoint chosen in setup, if any; returns the step to continue after (0 = fresh)."""
        path = self.resume_from
        if path is None:
            return 0
        state = ckpt.load_checkpoint(path, self.engine, self.rank)
        if self.rank == 0:
            self.dataset.load_state_dict(state["data"])
            self.skipped_steps = int(state.get("skipped_steps", 0))
            # Steps after the checkpoint will run again: drop their old rows so every step appears once.
            for name in ("metrics.jsonl", "completions.jsonl"):
                _truncate_after_step(self.run_dir / name, int(state["step"]))
        self.last_checkpoint = path
        log.info("resumed from %s (step %d)", path, state["step"])
        return int(state["step"])

    # ---- one step -------------------------------------------------------------------------------------------
    def _produce(self, step: int, prompts: list[dict]) -> tuple[TrainBatch, Any]:
        """Rank 0: rollout -> score; returns the batch to broadcast (or one carrying a stop reason, or marked
        stale when a server answered with other weights than the ones last pushed: it restarted meanwhile)."""
        try:
            self.rollout_q.put(
                self.rollout.generate(step, prompts), timeout=self.cfg.rollout.request_timeout_s
            )
            rolled = self.rollout_q.get(timeout=self.cfg.rollout.request_timeout_s)
            if any(v != self.synced_version for v in rolled.weight_versions):
                return TrainBatch(step=step, rows=[], stale=True), None
            scored = self.scorer.score(rolled)
            self.scored_q.put(scored)
            scored = self.scored_q.get()
            batch = self.scorer.to_train_batch(scored, nan_loss=step in self.cfg.debug.nan_loss_at_steps)
            batch.nan_loss_rank = self.cfg.debug.nan_loss_rank
            return batch, scored
        except Exception as e:
            msg = f"step {step}: rollout failed: {type(e).__name__}: {e}"
            return TrainBatch(step=step, rows=[], stop_reason=msg), None

    def ensure_servers_current(self, version: int | None) -> None:
        """Before a rollout: a server that restarted (same URL, initial weights, no transfer group) is waited
        for (``rollout.ready_timeout_s``), then the group is re-opened and the current weights pushed again."""
        stale: bool | str = False
        if self.rank == 0:
            try:
                timeout = self.cfg.rollout.ready_timeout_s
                health = [c.wait_until_ready(timeout_s=timeout) for c in self.rollout.clients]
                stale = any(h.weight_version != version or not h.weight_transfer for h in health)
            except Exception as e:
                stale = f"rollout server not ready: {type(e).__name__}: {e}"
        stale = broadcast_object(stale)
        if isinstance(stale, str):
            raise TrainingStopped(stale)
        if stale:
            log.warning(
                "a rollout server lost its weights (restarted?): re-opening the sync group, pushing v%s",
                version,
            )
            self.reconnect_and_push(version)

    def reconnect_and_push(self, version: int) -> dict[str, float]:
        """Wait for every server to be ready (a restarted one takes a while), re-open the group, push."""
        err = None
        if self.rank == 0:
            try:
                for c in self.rollout.clients:
                    c.wait_until_ready(timeout_s=self.cfg.rollout.ready_timeout_s)
            except Exception as e:
                err = f"rollout server not ready for a weight re-sync: {type(e).__name__}: {e}"
        err = broadcast_object(err)
        if err:
            raise TrainingStopped(err)
        try:
            self.sync.connect()
            return self.push(version, retry=False)
        except RuntimeError as e:
            raise TrainingStopped(str(e)) from e

    def step(self, step: int) -> dict[str, Any]:
        t_step = time.perf_counter()
        prompts = self.dataset.next_batch(self.cfg.optim.prompts_per_step) if self.rank == 0 else None
        for attempt in range(3):
            self.ensure_servers_current(self.synced_version)
            batch, scored = self._produce(step, prompts) if self.rank == 0 else (None, None)
            batch = broadcast_object(batch)
            if batch.stop_reason:
                raise TrainingStopped(batch.stop_reason)
            if not batch.stale:
                break
            log.warning(
                "step %d: a server generated with stale weights (restarted?): re-syncing, attempt %d",
                step,
                attempt + 1,
            )
            self.reconnect_and_push(self.synced_version)
        else:
            raise TrainingStopped(f"step {step}: servers kept answering with stale weights")
        if self.cfg.debug.dump_batches and self.rank == 0:
            dump = self.run_dir / "debug"
            dump.mkdir(exist_ok=True)
            torch.save(batch, dump / f"batch-{step:06d}.pt")
        t_train = time.perf_counter()
        result: UpdateResult = self.update.step(batch)
        train_s = time.perf_counter() - t_train
        if not result.applied:
            self.skipped_steps += 1
            log.warning(
                "step %d SKIPPED: non-finite gradient norm (loss finite on all ranks: %s); weights unchanged",
                step,
                not result.nonfinite_loss,
            )
        sync_stats: dict[str, float] = {}
        t_sync = time.perf_counter()
        if step % self.cfg.rollout.sync_every_steps == 0:
            sync_stats = self.push(step)
        sync_s = time.perf_counter() - t_sync
        step_s = time.perf_counter() - t_step
        if self.rank != 0:
            return {}
        extra = {**sync_stats, **self._evaluate(step)}
        return self._step_metrics(step, batch, scored, result, extra, train_s, sync_s, step_s)

    def _step_metrics(
        self, step, batch, scored, result, sync_stats, train_s, sync_s, step_s
    ) -> dict[str, Any]:
        rb = scored.rollout
        n_prompt_tok = sum(len(r.prompt_ids) for r in batch.rows)
        n_comp_tok = sum(len(r.completion_ids) for r in batch.rows)
        self.reward_failures_total += int(scored.metrics.get("reward_failures/total", 0))
        versions = rb.weight_versions
        m: dict[str, Any] = dict(scored.metrics)
        m.update({f"train/{k}": v for k, v in result.metrics.items()})
        m.update(
            {
                "loss": result.loss,
                "grad_norm": result.grad_norm,
                "lr": result.lr,
                "step_applied": int(result.applied),
                "skipped_steps": self.skipped_steps,
                "nonfinite_loss": int(result.nonfinite_loss),
                "reward_failures/cumulative": self.reward_failures_total,
                "micro_batches": result.num_micro_batches,
                "num_completions": len(batch.rows),
                "tokens/prompt": n_prompt_tok,
                "tokens/completion": n_comp_tok,
                "tokens_per_s": (n_prompt_tok + n_comp_tok) / max(step_s, 1e-9),
                "weight_version/min": min(versions),
                "weight_version/max": max(versions),
                "weight_version/pushed": step if sync_stats else None,
                "time/generate": rb.generate_s,
                "time/reward": scored.score_s,
                "time/train": train_s,
                "time/sync": sync_s,
                "time/step": step_s,
                "data/epoch": self.dataset.state.epoch,
                "data/index": self.dataset.state.index,
                "data/prompts_digest": hashlib.sha1(
                    "\x00".join(p["prompt_text"] for p in rb.prompts).encode()
                ).hexdigest()[:16],
            }
        )
        m.update(sync_stats)
        if "train/kl_mean" in m:
            m["kl"] = m["train/kl_mean"]
        if "train/entropy_mean" in m:
            m["entropy"] = m["train/entropy_mean"]
        self.metrics.log(step, m)
        every = self.cfg.logging.completions_every_steps
        if every and step % every == 0:
            from trainer.score_stage import completion_records

            k = min(self.cfg.logging.completions_sample_size, len(rb.prompts))
            idx = sorted(self.sample_rng.sample(range(len(rb.prompts)), k))
            self.completions_log.log(completion_records(scored, idx))
        log.info(
            "step %d/%d reward %.3f acc %.3f len %.0f trunc %.2f loss %.4g gnorm %.3g lr %.2e | gen %.2fs "
            "reward %.2fs train %.2fs sync %.2fs%s",
            step,
            self.total_steps,
            m.get("reward/total/mean", float("nan")),
            m.get("accuracy", float("nan")),
            m["completion_length/mean"],
            m["truncated/frac"],
            result.loss,
            result.grad_norm,
            result.lr,
            rb.generate_s,
            scored.score_s,
            train_s,
            sync_s,
            "  [SKIPPED]" if not result.applied else "",
        )
        return m

    def push(self, version: int, retry: bool = True) -> dict[str, float]:
        """Weight sync (all ranks), then the optional debug probe of every server (rank 0). A failed push is
        retried once on a re-opened group (a server may have restarted); a second failure stops the run."""
        try:
            stats = self.sync.push(version)
        except RuntimeError as e:
            if not retry:
                raise TrainingStopped(str(e)) from e
            log.warning("%s; re-opening the sync group and retrying once", e)
            return self.reconnect_and_push(version)
        self.synced_version = version
        if self.cfg.debug.probe_after_sync and self.rank == 0:
            self._probe(version)
        return stats

    def _probe(self, version: int) -> None:
        from rollout_server.protocol import GenerateRequest

        ids = list(self.dataset.rows[0]["prompt_ids"])
        req = GenerateRequest(prompt_token_ids=[ids], n=1, max_tokens=8, temperature=0.0)
        out = self.run_dir / "debug"
        out.mkdir(exist_ok=True)
        with (out / "probes.jsonl").open("a") as f:
            for i, client in enumerate(self.rollout.clients):
                res = client.generate(req)
                c = res.completions[0]
                row = {
                    "pushed_version": version,
                    "server": i,
                    "server_version": res.weight_version,
                    "prompt_ids": ids,
                    "token_ids": c.token_ids,
                    "logprobs": c.logprobs,
                }
                f.write(json.dumps(row) + "\n")

    def save(self, step: int) -> None:
        state = {
            "weight_version": step,
            "skipped_steps": self.skipped_steps,
            "total_steps": self.total_steps,
            "run_name": self.cfg.run.name,
        }
        state = broadcast_object({**state, "data": self.dataset.state_dict() if self.rank == 0 else None})
        self.last_checkpoint = ckpt.save_checkpoint(
            self.ckpt_root,
            step,
            self.engine,
            rank=self.rank,
            trainer_state=state,
            hf_model=self.hf_model if self.cfg.checkpoint.export_hf else None,
            tokenizer=self.tokenizer,
            zero3=self.zero3,
            keep_last=self.cfg.checkpoint.keep_last,
        )

    # ---- the loop ---------------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        start = self.maybe_resume()
        # Servers must serve the trainer's weights before the first rollout: after a resume they still hold
        # the initial (or some later, lost) weights; on a fresh start this also validates the manifest.
        self.push(start)
        last: dict[str, Any] = {}
        step = start
        saved_at = start if start else None
        for step in range(start + 1, self.total_steps + 1):
            last = self.step(step)
            every = self.cfg.checkpoint.every_steps
            if every and step % every == 0:
                self.save(step)
                saved_at = step
            if self.cfg.debug.crash_after_step == step:
                log.warning("debug.crash_after_step=%d: exiting hard", step)
                logging.shutdown()
                os._exit(3)
        if self.cfg.checkpoint.save_final and saved_at != step and step > start:
            self.save(step)
        return TrainResult(
            run_dir=self.run_dir,
            steps_done=step,
            start_step=start,
            skipped_steps=self.skipped_steps,
            last_checkpoint=self.last_checkpoint,
            last_metrics=last,
        )

    def close(self) -> None:
        for closer in (self.sync, self.rollout, self.metrics):
            if closer is not None:
                try:
                    closer.close()
                except Exception as e:  # cleanup is best effort
                    log.warning("cleanup: %s", e)


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
    runner = _Runner(cfg, info)
    try:
        runner.setup()
        return runner.run()
    finally:
        runner.close()
