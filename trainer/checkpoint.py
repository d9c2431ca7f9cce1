"""Atomic checkpoints: DeepSpeed state, trainer state (step, data position, RNG), and a Hugging Face export.

Layout (``checkpoint.dir``, default RUN_DIR/checkpoints)::

    checkpoints/
      latest                      text file naming the newest complete checkpoint ("step-000010")
      step-000010/
        deepspeed/                engine.save_checkpoint: module, optimizer (ZeRO shards), LR scheduler
        trainer_state.json        step, weight_version, data position, config of the run
        rng/rank-00000.pt         python / numpy / torch RNG states of each rank
        hf/                       save_pretrained + tokenizer: loads with from_pretrained and `vllm serve`

Atomicity: every rank writes into ``.tmp-step-000010``; after a barrier rank 0 renames it to ``step-000010``
(``os.rename`` of a directory is atomic on one filesystem) and only then rewrites ``latest`` (write-to-temp +
``os.replace``). A crash at any point leaves the previous checkpoint and ``latest`` untouched; stale
``.tmp-*`` folders are removed at the next start. Older checkpoints beyond ``keep_last`` are deleted after
the new one is in place. Multi-node runs need ``checkpoint.dir`` on a filesystem every rank shares.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.distributed import barrier, broadcast_object
from trainer.weight_sync import iter_full_tensors

log = logging.getLogger(__name__)

LATEST = "latest"
DS_TAG = "deepspeed"


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint folder, or None."""
    marker = Path(root) / LATEST
    if not marker.exists():
        return None
    path = Path(root) / marker.read_text().strip()
    return path if (path / "trainer_state.json").exists() else None


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def export_hf(hf_model, tokenizer, out_dir: Path, rank: int, zero3: bool) -> None:
    """save_pretrained (+ tokenizer). Under ZeRO-3 the full weights are gathered first (all ranks join)."""
    params = list(hf_model.named_parameters())
    if zero3:
        # Gather in ~256 MB groups; rank 0 keeps CPU copies, others only join the all-gathers.
        state = {
            name: t.cpu() for name, t in iter_full_tensors(params, True, 256 << 20, None, send=rank == 0)
        }
    else:
        state = None
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        if state is None:
            state = {name: p.detach().cpu() for name, p in params}
        # Persistent buffers are not parameters; keep them so the export is complete.
        for name, b in hf_model.named_buffers():
            if name not in state and not name.endswith("inv_freq"):
                state[name] = b.detach().cpu()
        hf_model.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)


def save_checkpoint(
    root: Path,
    step: int,
    engine,
    *,
    rank: int,
    trainer_state: dict[str, Any],
    hf_model=None,
    tokenizer=None,
    zero3: bool = False,
    keep_last: int = 2,
) -> Path:
    """Write checkpoint ``step`` atomically (every rank calls this); returns the final folder."""
    t0 = time.perf_counter()
    root = Path(root)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    engine.save_checkpoint(str(tmp / "deepspeed"), tag=DS_TAG, save_latest=False)
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(rng_state(), tmp / "rng" / f"rank-{rank:05d}.pt")
    if hf_model is not None:
        export_hf(hf_model, tokenizer, tmp / "hf", rank, zero3)
    if rank == 0:
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}, indent=1))
    barrier()
    err = None
    if rank == 0:
        try:
            if final.exists():  # same step saved before (e.g. final save right after a periodic one)
                shutil.rmtree(final)
            os.rename(tmp, final)
            _write_text_atomic(root / LATEST, final.name)
            prune(root, keep_last)
        except OSError as e:
            err = f"checkpoint {final} could not be committed: {e}"
    err = broadcast_object(err)
    if err:
        raise RuntimeError(err)
    log.info("checkpoint %s written in %.1fs", final, time.perf_counter() - t0)
    return final


def prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints (never the one ``latest`` names)."""
    latest = latest_checkpoint(root)
    done = sorted(p for p in root.glob("step-*") if (p / "trainer_state.json").exists())
    for p in done[:-keep_last]:
        if latest is None or p.resolve() != latest.resolve():
            shutil.rmtree(p, ignore_errors=True)


def clean_stale_temp(root: Path) -> None:
    for p in Path(root).glob(".tmp-step-*"):
        shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: Path, engine, rank: int) -> dict[str, Any]:
    """Restore engine (module, optimizer, scheduler) and this rank's RNG; returns trainer_state.json."""
    path = Path(path)
    load_path, _ = engine.load_checkpoint(
        str(path / "deepspeed"), tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path / 'deepspeed'}")
    rng_file = path / "rng" / f"rank-{rank:05d}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    else:
        log.warning("no RNG state for rank %d in %s (world size changed?)", rank, path)
    return json.loads((path / "trainer_state.json").read_text())
