"""Atomic checkpoints: DeepSpeed state, trainer state (step, data position, RNG), and a Hugging Face export.

Layout (``checkpoint.dir``, default RUN_DIR/checkpoints)::

    checkpoints/
      latest                      text file naming the newest complete checkpoint ("step-000010")
      step-000010/
        deepspeed/                engine.save_checkpoint: module, optimizer (ZeRO shards), LR scheduler
        trainer_state.json        step, weight_version, data position, config of the run
        rng/rank-00000.pt         python / numpy / torch RNG states of each rank
        hf/                       save_pretrained + tokenizer: loads with from_pretrained and `vllm serve`

Atomicity: every rank writes into ``.tmp-step-000010``; after a barrier rank 0 writes ``MANIFEST.json``
(every file's size and SHA-256, each file fsynced as it is hashed), fsyncs the folder, renames it to
``step-000010`` (``os.rename`` of a directory is atomic on one filesystem), fsyncs the parent, and only then
rewrites ``latest`` (write-to-temp + fsync + ``os.replace``). A crash at any point leaves the previous
checkpoints untouched; stale ``.tmp-*`` folders are removed at the next start.

Resume never trusts a single file: ``select_resume_checkpoint`` walks the ``step-*`` folders newest first and
takes the first whose manifest verifies (sizes and checksums), warning about each newer one it skips and
moving those aside as ``damaged-step-*`` (kept for inspection, never deleted). If checkpoints exist but none
verifies, it raises ``CheckpointError`` naming each folder and what is wrong with it: a run is never
restarted from step 0 over checkpoints. ``latest`` is a hint for people and tools, not the source of truth.

Pruning keeps the newest ``keep_last`` *verified* checkpoints and deletes only checkpoints older than all of
them, so it can never delete the last good ones. Multi-node runs need ``checkpoint.dir`` on a filesystem
every rank shares.
"""

from __future__ import annotations

import errno
import hashlib
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

from trainer.distributed import all_gather_object, broadcast_object
from trainer.weight_sync import gather_groups, iter_full_tensors

log = logging.getLogger(__name__)

LATEST = "latest"
DS_TAG = "deepspeed"
MANIFEST = "MANIFEST.json"  # written last: its presence and contents say the checkpoint is complete
_STEP_PREFIX = "step-"
_DAMAGED_PREFIX = "damaged-"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or no usable checkpoint can be resumed; the message names paths."""


def step_dir_name(step: int) -> str:
    return f"{_STEP_PREFIX}{step:06d}"


def _step_of(path: Path) -> int | None:
    name = path.name
    if not name.startswith(_STEP_PREFIX):
        return None
    try:
        return int(name[len(_STEP_PREFIX) :])
    except ValueError:
        return None


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


# ---- durability and integrity ---------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path, fsync: bool = False) -> str:
    """SHA-256 of a file; with ``fsync`` the same descriptor is fsynced, so the bytes hashed are on disk."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
        if fsync:
            os.fsync(f.fileno())
    return h.hexdigest()


def _files_of(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path) -> dict[str, Any]:
    """Hash and fsync every file of ``folder``, then write MANIFEST.json durably (the last file written)."""
    folder = Path(folder)
    files = {}
    for p in _files_of(folder):
        files[p.relative_to(folder).as_posix()] = {
            "bytes": p.stat().st_size,
            "sha256": _sha256(p, fsync=True),
        }
    for d in sorted({p.parent for p in folder.rglob("*") if p.is_file()} | {folder}):
        _fsync_dir(d)
    manifest = {"format": 1, "files": files}
    _write_text_atomic(folder / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def verify_checkpoint(folder: Path, checksums: bool = True) -> str | None:
    """None if ``folder`` is a complete, undamaged checkpoint; otherwise what is wrong, in words.

    ``checksums=False`` checks presence and sizes only (cheap: used when pruning)."""
    folder = Path(folder)
    mpath = folder / MANIFEST
    if not mpath.exists():
        return f"no {MANIFEST} (the save did not finish, or the folder was written by an older version)"
    try:
        files = json.loads(mpath.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} is unreadable ({e})"
    for rel, want in files.items():
        p = folder / rel
        if not p.is_file():
            return f"{rel} is missing"
        size = p.stat().st_size
        if size != want["bytes"]:
            return f"{rel} is {size} bytes, the manifest says {want['bytes']} (truncated or overwritten)"
    if "trainer_state.json" not in files:
        return "trainer_state.json is not in the manifest"
    if checksums:
        for rel, want in files.items():
            if _sha256(folder / rel) != want["sha256"]:
                return f"{rel} does not match its SHA-256 in the manifest (damaged)"
    return None


def list_checkpoints(root: Path) -> list[Path]:
    """The ``step-*`` folders under ``root``, newest step first (complete or not)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(s, p) for p in root.iterdir() if p.is_dir() and (s := _step_of(p)) is not None]
    return [p for _, p in sorted(found, reverse=True)]


def select_resume_checkpoint(root: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest verified checkpoint (or None if there are no checkpoints at all), and the newer ones
    skipped with the reason for each. Raises CheckpointError when checkpoints exist but none verifies."""
    skipped: list[tuple[Path, str]] = []
    for path in list_checkpoints(root):
        problem = verify_checkpoint(path)
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    if skipped:
        lines = "\n".join(f"  {p}: {why}" for p, why in skipped)
        raise CheckpointError(
            f"checkpoint.resume=true, but none of the {len(skipped)} checkpoint(s) in {root} is usable:\n"
            f"{lines}\nNothing was changed. Repair or move them away to start over, or resume another run."
        )
    return None, skipped


def choose_resume_checkpoint(root: Path, resume: bool) -> dict[str, str | None]:
    """Rank 0, before anything heavy is built: ``{"path": checkpoint to resume from or None, "error": ...}``.
    Newer damaged checkpoints are set aside with a warning; existing checkpoints are never started over,
    whatever ``resume`` says (the error then names them)."""
    try:
        if not resume:
            ensure_no_checkpoints(root)
            return {"path": None, "error": None}
        path, skipped = select_resume_checkpoint(root)
    except CheckpointError as e:
        return {"path": None, "error": str(e)}
    for bad, why in skipped:
        moved = set_aside(bad, why)
        log.warning(
            "checkpoint %s is unusable (%s): moved to %s; resuming from an older one", bad, why, moved
        )
    if path is None:
        log.warning("checkpoint.resume=true but %s holds no checkpoint yet: starting at step 0", root)
    return {"path": str(path) if path else None, "error": None}


def set_aside(path: Path, why: str) -> Path:
    """Rename a damaged checkpoint to ``damaged-step-*`` so it neither shadows nor collides with a new save;
    it is kept for inspection, with the reason written beside it."""
    dest = path.with_name(f"{_DAMAGED_PREFIX}{path.name}")
    n = 1
    while dest.exists():
        dest = path.with_name(f"{_DAMAGED_PREFIX}{path.name}.{n}")
        n += 1
    os.rename(path, dest)
    (dest / "DAMAGED.txt").write_text(why + "\n")
    return dest


def latest_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint that verifies, or None (no checkpoint, or none usable)."""
    try:
        return select_resume_checkpoint(root)[0]
    except CheckpointError:
        return None


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _is_disk_full(e: BaseException) -> bool:
    # torch.save reports a full disk as "[enforce fail at inline_container.cc] . unexpected pos"
    # (a RuntimeError without errno), so the message is checked as well as ENOSPC / EDQUOT.
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return "No space left" in text or "unexpected pos" in text or "file write failed" in text


def _disk_full_message(root: Path, step: int, e: BaseException) -> str:
    free = shutil.disk_usage(root if root.exists() else root.parent).free
    prev = list_checkpoints(root)
    need = ""
    if prev:
        size = sum(p.stat().st_size for p in prev[0].rglob("*") if p.is_file())
        need = f"; one checkpoint takes about {size / 2**20:.1f} MiB (the last one, {prev[0].name})"
    return (
        f"no space left on the device while writing checkpoint step {step} under {root}: "
        f"{free / 2**20:.1f} MiB free{need}. The previous checkpoints are intact. Free space or point "
        f"checkpoint.dir at a larger disk, then resume with checkpoint.resume=true. ({type(e).__name__}: {e})"
    )


def export_hf(hf_model, tokenizer, out_dir: Path, rank: int, zero3: bool) -> None:
    """save_pretrained (+ tokenizer). Under ZeRO-3 the full weights are gathered first (all ranks join)."""
    params = list(hf_model.named_parameters())
    if zero3:
        # Gather to rank 0 in ~256 MB groups; rank 0 keeps CPU copies, the others only send their partitions.
        groups = gather_groups(params, 256 << 20, params[0][1].element_size())
        # One copy of each tensor into host memory: from a GPU that is .cpu(); on a CPU .cpu() would share the
        # gather's buffers (reused for the next groups), so it is clone().
        gathered = iter_full_tensors(params, True, groups, None, send=rank == 0)
        state = {name: (t.cpu() if t.is_cuda else t.clone()) for name, t in gathered}
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
    """Write checkpoint ``step`` atomically and durably (every rank calls this); returns the final folder.

    Raises CheckpointError on every rank if any rank failed (a full disk is named as such, with the free
    space); the previous checkpoints are left as they were and the partial folder is removed."""
    t0 = time.perf_counter()
    root = Path(root)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}"
    err = None
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        except OSError as e:
            err = _disk_full_message(root, step, e) if _is_disk_full(e) else f"cannot create {tmp}: {e}"
    err = broadcast_object(err)
    if err:
        raise CheckpointError(err)
    err = None
    try:
        engine.save_checkpoint(str(tmp / "deepspeed"), tag=DS_TAG, save_latest=False)
        (tmp / "rng").mkdir(exist_ok=True)
        torch.save(rng_state(), tmp / "rng" / f"rank-{rank:05d}.pt")
        if hf_model is not None:
            export_hf(hf_model, tokenizer, tmp / "hf", rank, zero3)
        if rank == 0:
            (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}, indent=1))
    except (OSError, RuntimeError) as e:
        err = _disk_full_message(root, step, e) if _is_disk_full(e) else f"writing {tmp} failed: {e!r}"
    errors = [e for e in all_gather_object(err) if e]
    if not errors and rank == 0:
        try:
            write_manifest(tmp)
            if final.exists():  # same step saved before (e.g. final save right after a periodic one)
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(root)
            _write_text_atomic(root / LATEST, final.name)
            prune(root, keep_last)
        except OSError as e:
            msg = _disk_full_message(root, step, e) if _is_disk_full(e) else f"could not commit {final}: {e}"
            errors = [msg]
    errors = broadcast_object(errors)
    if errors:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(errors[0])
    log.info("checkpoint %s written in %.1fs", final, time.perf_counter() - t0)
    return final


def prune(root: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` verified checkpoints; delete only ``step-*`` folders older than all of
    them. With fewer verified checkpoints than ``keep_last`` nothing is deleted."""
    ordered = list_checkpoints(root)  # newest first
    good = [p for p in ordered if verify_checkpoint(p, checksums=False) is None]
    if keep_last < 1 or len(good) < keep_last:
        return
    oldest_kept = _step_of(good[keep_last - 1])
    for p in ordered:
        if _step_of(p) < oldest_kept:
            shutil.rmtree(p, ignore_errors=True)


def ensure_no_checkpoints(root: Path) -> None:
    """A fresh run (checkpoint.resume=false) must not write over (and then prune) an earlier run's
    checkpoints; raises CheckpointError naming them."""
    found = list_checkpoints(root)
    if found:
        raise CheckpointError(
            f"{root} already holds {len(found)} checkpoint(s) (newest {found[0].name}) and "
            "checkpoint.resume=false: continue that run with checkpoint.resume=true, or start a new one with "
            "another run.name (or checkpoint.dir). Nothing was changed."
        )


def clean_stale_temp(root: Path) -> None:
    for p in Path(root).glob(".tmp-step-*"):
        shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: Path, engine, rank: int) -> dict[str, Any]:
    """Restore engine (module, optimizer, scheduler) and this rank's RNG; returns trainer_state.json.

    Raises CheckpointError naming the folder when any part cannot be read."""
    path = Path(path)
    try:
        load_path, _ = engine.load_checkpoint(
            str(path / "deepspeed"), tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise CheckpointError(f"DeepSpeed found no checkpoint in {path / 'deepspeed'}")
        rng_file = path / "rng" / f"rank-{rank:05d}.pt"
        if rng_file.exists():
            set_rng_state(torch.load(rng_file, weights_only=False))
        else:
            log.warning("no RNG state for rank %d in %s (world size changed?)", rank, path)
        return json.loads((path / "trainer_state.json").read_text())
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"cannot load checkpoint {path}: {type(e).__name__}: {e}") from e
