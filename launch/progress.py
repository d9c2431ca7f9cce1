"""Live terminal progress of a run, driven only by the run folder's metrics.jsonl.

Why the metrics file (and not a channel from the trainer): the file is what the trainer writes anyway, it
survives trainer restarts, and the same reader serves the driver's bar, ``launch.report`` and tests. Reading
is incremental (``JsonlTail``, also the web UI's reader): only bytes appended since the last refresh are
parsed, a torn last line (the trainer mid-write) is left for the next one, and a file that was replaced or
shrank (a resumed trainer rewrites it without the rows after its checkpoint) is read again from the start.
"""

from __future__ import annotations

import json
import os
import threading
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


class JsonlTail:
    """The rows of one append-only JSONL file, extended by each ``refresh()`` with what was appended."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []
        self.bad_lines = 0  # complete lines that were not JSON objects
        self._offset = 0  # bytes consumed, always at a line boundary
        self._inode: int | None = None
        self._lock = threading.Lock()

    def refresh(self) -> list[dict[str, Any]]:
        """Read what was appended since the last call; returns the new rows."""
        with self._lock:
            try:
                st = os.stat(self.path)
            except (FileNotFoundError, NotADirectoryError):
                self._reset(None)
                return []
            if st.st_ino != self._inode or st.st_size < self._offset:
                self._reset(st.st_ino)  # replaced or truncated: start over
            if st.st_size == self._offset:
                return []
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read(st.st_size - self._offset)
            end = chunk.rfind(b"\n")
            if end < 0:
                return []  # only a partial line so far
            self._offset += end + 1
            new = []
            for line in chunk[: end + 1].splitlines():
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    row = None
                if isinstance(row, dict):
                    new.append(row)
                else:
                    self.bad_lines += 1
            self.rows.extend(new)
            return new

    def _reset(self, inode: int | None) -> None:
        self.rows, self.bad_lines, self._offset, self._inode = [], 0, 0, inode


class ProgressBar:
    """tqdm bar over optimizer steps with reward / accuracy / length / throughput of the latest step."""

    def __init__(self, metrics_path: str | Path, total_steps: int | None, enabled: bool = True):
        self.follower = JsonlTail(metrics_path)
        self.total = total_steps
        self.last_step = 0
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, desc="GRPO", unit="step", dynamic_ncols=True)

    def update(self) -> list[dict[str, Any]]:
        rows = self.follower.refresh()
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
