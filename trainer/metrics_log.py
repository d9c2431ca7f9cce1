"""Per-step metrics (metrics.jsonl + TensorBoard + optional W&B) and sampled completions (completions.jsonl).

Why local files first: completions logged only to a hosted service, or overwritten each step, are the usual
reason nobody can tell after the fact why the reward collapsed. Both files are append-only JSON lines, one
object per step (metrics) or per completion (completions), flushed every write so a crash loses nothing.
Only trainer rank 0 creates these loggers.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def _clean(v: Any) -> Any:
    """JSON-safe value: non-finite floats become strings ("nan", "inf") rather than invalid JSON."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if hasattr(v, "item") and callable(v.item):  # 0-d tensors / numpy scalars
        return _clean(v.item())
    return v


class MetricsLogger:
    """Append one JSON object per step to RUN_DIR/metrics.jsonl and mirror scalars to TensorBoard / W&B."""

    def __init__(
        self,
        run_dir: Path,
        tensorboard: bool = True,
        wandb_project: str | None = None,
        run_name: str = "",
        config: dict | None = None,
        resume: bool = False,
    ):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tb = None
        self._wandb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        if wandb_project:
            self._wandb = start_wandb(Path(run_dir), wandb_project, run_name, config or {}, resume)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for k, v in scalars.items():
                if k != "step":
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def start_wandb(run_dir: Path, project: str, run_name: str, config: dict, resume: bool):
    """The W&B run of RUN_DIR. Its id is kept in RUN_DIR/wandb-run-id, so a resumed run continues the same W&B
    run (one set of curves per training run, not one per restart). Local files go to RUN_DIR/wandb unless
    WANDB_DIR is set. W&B is a mirror: a process killed hard loses what wandb had not written yet (offline, a
    trainer that exited hard after 3 steps had written none of them), while metrics.jsonl is flushed every
    step and stays the record."""
    import wandb  # optional dependency: only imported when configured

    id_file = run_dir / "wandb-run-id"
    run_id = id_file.read_text().strip() if resume and id_file.exists() else None
    try:
        run = wandb.init(
            project=project,
            name=run_name or None,
            config=config,
            id=run_id,  # None: wandb makes a new one
            resume="allow",
            dir=os.environ.get("WANDB_DIR") or str(run_dir),
        )
    except Exception as e:  # e.g. no API key on a machine without a terminal
        raise RuntimeError(
            f"W&B logging (logging.wandb_project={project!r}) could not start: {type(e).__name__}: {e}. "
            "Log in (WANDB_API_KEY), set WANDB_MODE=offline, or unset logging.wandb_project."
        ) from e
    id_file.write_text(run.id)
    return run


class CompletionsLogger:
    """Append sampled completions (one JSON per completion) to RUN_DIR/completions.jsonl."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "completions.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, records: list[dict[str, Any]]) -> None:
        with self.path.open("a") as f:
            for r in records:
                f.write(json.dumps({k: _clean(v) for k, v in r.items()}) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All rows of a JSONL file (a torn last line from a crash is skipped)."""
    rows = []
    with Path(path).open() as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows
