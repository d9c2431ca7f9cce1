"""Live terminal progress of a run, driven only by the run folder's metrics.jsonl.

Why the metrics file (and not a channel from the trainer): the file is what the trainer writes anyway, it
survives trainer restarts, and the same reader serves the driver's bar, ``launch.report`` and tests. Reading
is incremental: only bytes appended since the last poll are parsed, a torn last line (the trainer
mid-write) is left for the next poll, and a file that shrank (a resumed trainer truncates the rows after its
checkpoint) is read again from the start.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# The bar's columns and the metric keys that feed them, first present wins (the trainer's names first).
COLUMNS: dict[str, tuple[str, ...]] = {
    "reward": ("reward/total/mean", "reward", "reward/mean"),
    "acc": ("accuracy", "reward/correctness/mean"),
    "len": ("completion_length/mean", "completion_length"),
    "tok/s": ("tokens_per_s",),
}


def pick(row: dict[str, Any], keys: tuple[str, ...]) -> float | None:
    for k in keys:
        v = row.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return None


class JsonlFollower:
    """Incremental reader of an append-only JSON-lines file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._offset = 0
        self._partial = b""
        self._inode: int | None = None
        self.rows: list[dict[str, Any]] = []

    def poll(self) -> list[dict[str, Any]]:
        """Rows appended since the last call (the file may not exist yet)."""
        try:
            with self.path.open("rb") as f:
                st = os.fstat(f.fileno())
                if st.st_size < self._offset or (self._inode is not None and st.st_ino != self._inode):
                    # Rewritten (a resumed trainer replaces the file without the rows after its checkpoint,
                    # and the new one may already be longer): read it again from the start.
                    self._offset, self._partial, self.rows = 0, b"", []
                self._inode = st.st_ino
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        self._offset += len(chunk)
        data = self._partial + chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()  # b"" when the chunk ended with a newline
        new = []
        for ln in lines:
            if not ln.strip():
                continue
            try:
                row = json.loads(ln)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                new.append(row)
        self.rows.extend(new)
        return new


class ProgressBar:
    """tqdm bar over optimizer steps with reward / accuracy / length / throughput of the latest step."""

    def __init__(self, metrics_path: str | Path, total_steps: int | None, enabled: bool = True):
        self.follower = JsonlFollower(metrics_path)
        self.total = total_steps
        self.last_step = 0
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, desc="GRPO", unit="step", dynamic_ncols=True)

    def update(self) -> list[dict[str, Any]]:
        rows = self.follower.poll()
        for row in rows:
            step = row.get("step")
            if not isinstance(step, int):
                continue
            if self._bar is not None:
                if step < self.last_step:  # the trainer resumed from an earlier checkpoint
                    self._bar.reset(total=self.total)
                    self._bar.update(step)
                else:
                    self._bar.update(step - self.last_step)
                post = {}
                for col, keys in COLUMNS.items():
                    v = pick(row, keys)
                    if v is not None:
                        post[col] = f"{v:.3g}"
                self._bar.set_postfix(post, refresh=True)
            self.last_step = step
        return rows

    def write(self, msg: str) -> None:
        if self._bar is not None:
            self._bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
