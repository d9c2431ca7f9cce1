"""Build a run's components from its config, in one place: ``build_components(cfg, info) -> Components``.

Every trainer rank builds the update side (DeepSpeed engine, ``UpdateStage``, ``WeightSync``); rank 0 also
builds the rollout side (prompt dataset, ``RolloutStage`` clients, ``ScoreStage`` with the run's rewards,
``RolloutSide``) and the metric writers. What to resume from is decided first, so a refusal (checkpoints
that would be started over, none that verifies) costs nothing.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainer import checkpoint as ckpt
from trainer.config import ConfigError, TrainConfig, config_to_yaml
from trainer.distributed import DistInfo, barrier, broadcast_object

log = logging.getLogger("trainer")


class TrainingStopped(RuntimeError):
    """The run cannot continue (rollout server unreachable, weight sync failed...); the message says why."""


@dataclass
class Components:
    """What the loop works with. Fields after ``sync`` exist on rank 0 only (None elsewhere)."""

    cfg: TrainConfig
    rank: int
    world: int
    model_path: str
    tokenizer: Any
    engine: Any  # DeepSpeed engine
    hf_model: torch.nn.Module
    update: Any  # UpdateStage
    sync: Any  # WeightSync
    total_steps: int
    resume_from: Path | None
    dataset: Any = None  # PromptDataset
    rollout: Any = None  # RolloutStage (its clients also serve eval and debug probes)
    producer: Any = None  # RolloutSide
    metrics: Any = None  # MetricsLogger
    completions_log: Any = None  # CompletionsLogger
    eval_rows: list[dict] = field(default_factory=list)  # held-out slice for eval.every_steps

    def close(self) -> None:
        for closer in (self.producer, self.sync, self.rollout, self.metrics):
            if closer is not None:
                try:
                    closer.close()
                except Exception as e:  # cleanup is best effort
                    log.warning("cleanup: %s", e)


def _load_data(cfg: TrainConfig, tokenizer) -> tuple[Any, list[dict]] | str:
    """Rank 0: the training prompts and the held-out eval slice, or why they cannot be loaded."""
    from trainer.data import PromptDataset, load_prompts

    try:
        split = load_prompts(cfg.data, tokenizer, "train")
    except Exception as e:
        return f"could not load prompts: {type(e).__name__}: {e}"
    dataset = PromptDataset(split.rows, seed=cfg.data.seed, shuffle=cfg.data.shuffle)
    ev, eval_rows = cfg.eval, []
    if ev.every_steps:
        try:  # the first num_problems of the split
            eval_rows = load_prompts(cfg.data, tokenizer, ev.split).rows[: ev.num_problems]
        except Exception as e:
            return f"could not load the {ev.split} split for eval.every_steps: {type(e).__name__}: {e}"
    return dataset, eval_rows


def _build_update_side(c: Components, info: DistInfo) -> None:
    from trainer.engine_setup import build_engine, build_reference, use_bf16
    from trainer.update_stage import UpdateStage
    from trainer.weight_sync import WeightSync, transfer_backend

    cfg = c.cfg
    c.engine, _, _ = build_engine(cfg, c.model_path, c.world, c.total_steps)
    c.hf_model = c.engine.module.model
    ref = build_reference(cfg, c.model_path, c.world, info.device)
    c.update = UpdateStage(
        c.engine,
        cfg.objective.loss_config(),
        pad_id=c.tokenizer.pad_token_id,
        temperature=cfg.generation.temperature,
        chunk_tokens=cfg.objective.logprob_chunk_tokens,
        micro_batch_tokens=cfg.optim.micro_batch_tokens,
        max_completion_length=cfg.generation.max_completion_length,
        rank=c.rank,
        world_size=c.world,
        device=info.device,
        ref_model=ref,
        share_prompts=cfg.optim.share_prompt_forward,
    )
    r = cfg.rollout
    train_dtype = torch.bfloat16 if use_bf16(cfg) else torch.float32
    sync_dtype = None if r.sync_dtype == "auto" else getattr(torch, r.sync_dtype)
    c.sync = WeightSync(
        c.hf_model,
        server_urls=r.server_urls,
        api_token=r.api_token,
        rank=c.rank,
        zero3=cfg.deepspeed.zero_stage == 3,
        backend=transfer_backend(r.sync_backend),
        master_addr=r.sync_master_addr,
        master_port=r.sync_master_port,  # 0: rank 0's store binds a port the OS picks (WeightSyncClient)
        bucket_bytes=int(r.sync_bucket_mb * (1 << 20)),
        timeout_s=r.sync_timeout_s,
        dtype=sync_dtype if sync_dtype != train_dtype else None,
    )


def _build_rollout_side(c: Components) -> None:
    """Rank 0: clients of the rollout servers, scoring, the producer thread, metric writers."""
    from trainer.metrics_log import CompletionsLogger, MetricsLogger
    from trainer.rewards import RewardSet
    from trainer.rollout_side import RolloutSide, RolloutStage, ScoreStage

    cfg = c.cfg
    scorer = ScoreStage(
        RewardSet.from_train_config(cfg),
        cfg.objective.scale_rewards,
        cfg.objective.advantage_eps,
        cfg.objective.mask_truncated_completions,
    )
    c.rollout = RolloutStage(cfg.rollout, cfg.generation)
    c.sync.wait_servers_ready = c.rollout.wait_until_ready  # a re-sync waits on the same health check
    c.producer = RolloutSide(
        c.dataset,
        c.rollout,
        scorer,
        cfg.optim.prompts_per_step,
        cfg.rollout.ready_timeout_s,
        nan_loss_steps=frozenset(cfg.debug.nan_loss_at_steps),
        nan_loss_rank=cfg.debug.nan_loss_rank,
    )
    c.metrics = MetricsLogger(
        cfg.run_dir,
        tensorboard=cfg.logging.tensorboard,
        wandb_project=cfg.logging.wandb_project,
        run_name=cfg.run.name,
        config=cfg.model_dump(mode="json"),
        resume=c.resume_from is not None,
    )
    c.completions_log = CompletionsLogger(cfg.run_dir)
    versions = c.rollout.wait_until_ready()
    log.info("rollout servers ready: %s (weight versions %s)", cfg.rollout.server_urls, versions)


def build_components(cfg: TrainConfig, info: DistInfo) -> Components:
    """Every rank calls this; failures raise the same error on every rank (CheckpointError, ConfigError,
    TrainingStopped)."""
    from trainer.engine_setup import load_tokenizer, resolve_model_path

    rank = info.rank
    if rank == 0:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        (cfg.run_dir / "config.yaml").write_text(config_to_yaml(cfg))
        ckpt.clean_stale_temp(cfg.checkpoint_dir)
    decision = ckpt.choose_resume_checkpoint(cfg.checkpoint_dir, cfg.checkpoint.resume) if rank == 0 else None
    decision = broadcast_object(decision)
    if decision["error"]:
        raise ckpt.CheckpointError(decision["error"])
    barrier()
    model_path = resolve_model_path(cfg, rank == 0)
    try:
        tokenizer = load_tokenizer(model_path)
    except OSError as e:  # a hub id that does not exist or is not cached offline, a broken folder
        raise ConfigError(f"model.name_or_path: cannot load {model_path!r}: {e}") from None

    data = _load_data(cfg, tokenizer) if rank == 0 else None
    num_prompts = broadcast_object(data if isinstance(data, str) or data is None else len(data[0]))
    if isinstance(num_prompts, str):
        raise TrainingStopped(num_prompts)
    steps_per_epoch = math.ceil(num_prompts / cfg.optim.prompts_per_step)
    if cfg.warm_start.enabled:
        log.warning(
            "warm_start is run by the launcher (python -m launch) or trainer.sft; python -m trainer does not"
        )

    c = Components(
        cfg=cfg,
        rank=rank,
        world=info.world_size,
        model_path=model_path,
        tokenizer=tokenizer,
        engine=None,
        hf_model=None,
        update=None,
        sync=None,
        total_steps=cfg.optim.max_steps or cfg.optim.epochs * steps_per_epoch,
        resume_from=Path(decision["path"]) if decision["path"] else None,
    )
    if rank == 0:
        c.dataset, c.eval_rows = data
    _build_update_side(c, info)
    err = None
    if rank == 0:
        try:
            _build_rollout_side(c)
        except Exception as e:
            err = f"rank-0 setup (rollout side, metric writers) failed: {type(e).__name__}: {e}"
    err = broadcast_object(err)
    if err:
        c.close()
        raise TrainingStopped(err)
    try:
        c.sync.connect()
    except RuntimeError as e:
        c.close()
        raise TrainingStopped(str(e)) from e
    return c
