"""Build the policy (and reference) model, the optimizer, the LR schedule and the DeepSpeed engine from config.

Decisions taken here, each for a measured reason:
- On CPU we pass ``torch.optim.AdamW`` to DeepSpeed: its fused CPU/GPU Adam ops JIT-compile (~60 s) on first
  use. On CUDA we also use torch's AdamW (fused=True): one code path, and same numerics on both devices.
  The exception is ZeRO-Offload: DeepSpeed refuses a torch optimizer there, so it gets DeepSpeed's CPU Adam
  (``build_optimizer``), the same update rule.
- ``managed_gradient_accumulation: false``: ``engine.step()`` is the accumulation boundary, so the number of
  micro-batches (set by the token budget) may vary from step to step.
- bf16 ``auto`` = bf16 on CUDA, fp32 on CPU (CPU bf16 matmuls are slow and the tests compare in fp32).
- The reference model (only when ``beta > 0``) is a second DeepSpeed engine without optimizer under ZeRO-3, so
  it is sharded like the policy; under ZeRO-2 it is a plain frozen replica on the training device.
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any

import torch

from trainer.compile_regions import compile_regions
from trainer.config import TrainConfig
from trainer.update_stage import LogprobPolicy

log = logging.getLogger(__name__)


def resolve_model_path(cfg: TrainConfig, is_main: bool) -> str:
    """``"tiny"`` builds the offline tiny model under RUN_DIR/tiny-model; a ``pypi:`` source is converted once
    into its cache folder (trainer/model_source.py). Rank 0 builds while the others wait on a barrier; then
    the others resolve too, which finds the cache valid (or, on a node without that cache, converts it under
    the cache's lock). Hub ids and local folders are returned unchanged."""
    from trainer.model_source import is_model_source, resolve_model_source

    name = cfg.model.name_or_path
    if name != "tiny" and not is_model_source(name):
        return name
    from trainer.distributed import barrier

    if name == "tiny":
        from trainer.tiny_model import ensure_tiny_model

        out = cfg.run_dir / "tiny-model"
        if is_main:
            ensure_tiny_model(out, cfg.model.tiny)
        barrier()
        return str(out)
    path = resolve_model_source(name) if is_main else None
    barrier()
    return path if path is not None else resolve_model_source(name)


def use_bf16(cfg: TrainConfig) -> bool:
    if cfg.model.dtype == "bfloat16" or cfg.deepspeed.bf16 == "true":
        return True
    if cfg.model.dtype == "float32" or cfg.deepspeed.bf16 == "false":
        return False
    return torch.cuda.is_available()


def lr_lambda_factory(total_steps: int, warmup_ratio: float, scheduler: str):
    """LR multiplier of optimizer step s (0-based): linear warmup, then cosine/linear decay to 0, or constant."""
    warmup = int(math.ceil(total_steps * warmup_ratio))

    def fn(s: int) -> float:
        if s < warmup:
            return (s + 1) / (warmup + 1)
        if scheduler == "constant":
            return 1.0
        progress = (s - warmup) / max(1, total_steps - warmup)
        progress = min(max(progress, 0.0), 1.0)
        if scheduler == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    d = cfg.deepspeed
    zero: dict[str, Any] = {
        "stage": d.zero_stage,
        "reduce_bucket_size": d.reduce_bucket_size,
        "overlap_comm": torch.cuda.is_available(),
        "contiguous_gradients": True,
    }
    if d.zero_stage == 3:
        zero.update(
            stage3_param_persistence_threshold=d.stage3_param_persistence_threshold,
            stage3_prefetch_bucket_size=d.stage3_prefetch_bucket_size,
            stage3_gather_16bit_weights_on_model_save=False,  # we gather ourselves, see checkpoint.py
        )
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if d.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        # Batch sizes are nominal: we drive accumulation ourselves (managed_gradient_accumulation=false).
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": cfg.optim.max_grad_norm,
        "bf16": {"enabled": use_bf16(cfg)},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _preimport() -> None:
    """Import what from_pretrained imports lazily BEFORE entering ``deepspeed.zero.Init``: under it
    ``torch.Tensor.__new__`` is patched and torch._dynamo's import-time signature checks then fail."""
    import torch._dynamo  # noqa: F401
    import transformers.generation.utils  # noqa: F401
    import transformers.masking_utils  # noqa: F401


_HF_DS_CONFIGS: list = []  # transformers reads the ZeRO-3 setting through a weak global reference


def load_model(path: str, dtype: torch.dtype, cfg: TrainConfig, ds_config: dict | None = None):
    """from_pretrained; under ZeRO-3 transformers itself builds the model inside ``deepspeed.zero.Init`` and
    loads each checkpoint tensor into its partition (so the full model never sits on one device)."""
    from transformers import AutoModelForCausalLM

    if ds_config is not None and ds_config["zero_optimization"]["stage"] == 3:
        from transformers.integrations import HfDeepSpeedConfig

        _HF_DS_CONFIGS.append(HfDeepSpeedConfig(ds_config))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation=cfg.model.attn_implementation
        )
    finally:
        _HF_DS_CONFIGS.clear()  # later plain from_pretrained calls (exports, tests) must not partition
    model.config.use_cache = False
    return model


def _skip_cpu_shm_comm_build() -> None:
    """On CPU DeepSpeed JIT-compiles a shared-memory all-reduce op (~60 s on a cold cache) that ZeRO training
    does not use (gradients go through torch.distributed/gloo). Marking it incompatible skips the build."""
    if torch.cuda.is_available():
        return
    import deepspeed.ops

    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(compatible, dict):
        compatible["deepspeed_shm_comm"] = False


def _quiet_deepspeed_collective_deprecations() -> None:
    """DeepSpeed's ZeRO calls torch's ``all_gather_into_tensor`` / ``reduce_scatter_tensor``, which torch 2.13
    deprecates. The warning is not the user's to act on, and it was not shown only once: it came back about
    twice per step and rank (36 lines per rank in a 16-step run), because Python forgets which warnings it has
    shown whenever the warning filters change (``catch_warnings`` does)."""
    warnings.filterwarnings(
        "ignore",
        message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
        category=FutureWarning,
    )


def build_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW with the config's settings. Under ZeRO-Offload (``deepspeed.offload_optimizer``) the optimizer
    steps on the CPU, where DeepSpeed refuses a torch optimizer (too slow for a GPU node's model) and takes its
    own vectorised CPU Adam: the same AdamW update (decoupled weight decay, bias correction), JIT-compiled on
    first use (about a minute; needs a C++ compiler; cached under ~/.cache/torch_extensions)."""
    o = cfg.optim
    if cfg.deepspeed.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        log.info(
            "optimizer: DeepSpeed's CPU Adam for ZeRO-Offload (its first use compiles it, about a minute)"
        )
        return DeepSpeedCPUAdam(
            params, lr=o.lr, betas=o.betas, eps=o.adam_eps, weight_decay=o.weight_decay, adamw_mode=True
        )
    fused = torch.cuda.is_available() or None
    return torch.optim.AdamW(
        params, lr=o.lr, betas=o.betas, eps=o.adam_eps, weight_decay=o.weight_decay, fused=fused
    )


def build_engine(cfg: TrainConfig, model_path: str, world_size: int, total_steps: int):
    """(engine, optimizer, scheduler); the engine wraps ``LogprobPolicy(hf_model)``: the HF model is
    ``engine.module.model`` and its parameter names carry a ``model.`` prefix inside the engine."""
    import deepspeed

    _skip_cpu_shm_comm_build()
    _quiet_deepspeed_collective_deprecations()
    _preimport()

    dtype = torch.bfloat16 if use_bf16(cfg) else torch.float32
    ds_config = deepspeed_config(cfg, world_size)
    hf_model = load_model(model_path, dtype, cfg, ds_config)
    if cfg.model.gradient_checkpointing:
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.model.compile_regions:
        compile_regions(hf_model)
    model = LogprobPolicy(hf_model)
    o = cfg.optim
    optimizer = build_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda_factory(total_steps, o.warmup_ratio, o.scheduler)
    )
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    return engine, optimizer, scheduler


def build_reference(cfg: TrainConfig, model_path: str, world_size: int, device: torch.device):
    """The frozen reference policy for the KL term, or None when beta == 0."""
    if cfg.objective.beta <= 0:
        return None
    dtype = torch.bfloat16 if use_bf16(cfg) else torch.float32
    if cfg.deepspeed.zero_stage == 3:
        import deepspeed

        _preimport()
        ds_config = deepspeed_config(cfg, world_size)
        ds_config.pop("gradient_clipping")
        ref = load_model(model_path, dtype, cfg, ds_config)
        ref.requires_grad_(False)
        engine, *_ = deepspeed.initialize(model=LogprobPolicy(ref), config=ds_config)
        engine.eval()
        return engine
    ref = load_model(model_path, dtype, cfg).to(device)
    ref.requires_grad_(False)
    ref.eval()
    return LogprobPolicy(ref)


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
