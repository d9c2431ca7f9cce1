"""Held-out accuracy of what a rollout server serves right now: the launcher's before/after measurement.

Why in the launcher: the question a demo run must answer is "did GRPO make the model better on problems it
never trained on?". The driver measures greedy pass@1 on the config's test split (the first
``eval.num_problems`` rows, ``eval.max_tokens`` tokens) once the servers serve the starting weights (the
warm-start model, weight version 0) and again after the last step (the final weights), through the same
server and the same scoring (trainer/eval.py), and writes both to RUN_DIR/heldout.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


def heldout_rows(cfg, model_dir: str) -> list[dict[str, Any]]:
    from transformers import AutoTokenizer

    from trainer.data import load_prompts

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return list(load_prompts(cfg.data, tokenizer, "test").rows)[: cfg.eval.num_problems]


def measure(
    url: str, token: str | None, rows: list[dict[str, Any]], max_tokens: int, seed: int
) -> dict[str, Any]:
    """Greedy pass@1 (strict and lenient) of the server at ``url`` on ``rows``, with its weight version."""
    from rollout_server.client import RolloutClient
    from trainer.eval import evaluate_with_client

    client = RolloutClient(url, api_token=token, timeout_s=600.0, retries=2)
    try:
        version = client.health().weight_version
        t0 = time.monotonic()
        m = evaluate_with_client(client, rows, k=0, max_tokens=max_tokens, seed=seed)
        return {"weight_version": version, "seconds": time.monotonic() - t0, **m}
    finally:
        client.close()


def record(run_dir: str | Path, when: str, result: dict[str, Any]) -> dict[str, Any]:
    """Merge ``result`` under ``when`` ("before" / "after") into RUN_DIR/heldout.json; returns the whole file."""
    path = Path(run_dir) / "heldout.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[when] = result
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)
    return data
