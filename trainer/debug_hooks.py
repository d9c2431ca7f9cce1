"""Fault-injection and inspection hooks of the loop (``debug.*`` in the config); all off by default."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger("trainer")


def dump_batch(run_dir: Path, batch) -> None:
    """``debug.dump_batches``: the training batch of each step, for the equivalence tests."""
    dump = run_dir / "debug"
    dump.mkdir(exist_ok=True)
    torch.save(batch, dump / f"batch-{batch.step:06d}.pt")


def probe_servers(run_dir: Path, clients, prompt_ids: list[int], version: int) -> None:
    """``debug.probe_after_sync``: a greedy 8-token probe of every server after a push, to
    RUN_DIR/debug/probes.jsonl (the tests compare it with the trainer's own weights)."""
    from rollout_server.protocol import GenerateRequest

    req = GenerateRequest(prompt_token_ids=[list(prompt_ids)], n=1, max_tokens=8, temperature=0.0)
    out = run_dir / "debug"
    out.mkdir(exist_ok=True)
    with (out / "probes.jsonl").open("a") as f:
        for i, client in enumerate(clients):
            res = client.generate(req)
            c = res.completions[0]
            row = {
                "pushed_version": version,
                "server": i,
                "server_version": res.weight_version,
                "prompt_ids": list(prompt_ids),
                "token_ids": c.token_ids,
                "logprobs": c.logprobs,
            }
            f.write(json.dumps(row) + "\n")


def crash_now(step: int) -> None:
    """``debug.crash_after_step``: exit hard, as a killed trainer would (resume tests)."""
    log.warning("debug.crash_after_step=%d: exiting hard", step)
    logging.shutdown()
    os._exit(3)
