"""Helpers of the trainer tests: a rollout-server process, trainer ranks as processes, and a reward with signal.

Every process started here is killed (its whole process group) when the test ends, pass or fail, and every
wait has a deadline, so a test fails rather than hangs and leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from rollout_server.spawn import free_port  # noqa: F401 (the tests import it from here)

REPO = Path(__file__).resolve().parents[1]


def digit_fraction(prompts=None, completions=(), **columns) -> list[float]:
    """A reward that varies on a random tiny model's output (fraction of digit characters), so group
    advantages are non-zero and every step really moves the weights."""
    out = []
    for c in completions:
        text = c if isinstance(c, str) else c[-1]["content"]
        out.append(sum(ch.isdigit() for ch in text) / max(len(text), 1))
    return out


# The override that makes digit_fraction the only reward (tests that need every step to move the weights).
DIGITS = 'custom_rewards={"tests.trainer_support:digit_fraction": 1.0}'


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(extra)
    return env


def run_one_rank_child(source: str, tmp_path: Path, *args: str, timeout_s: float = 300) -> dict:
    """Run the Python ``source`` as a one-rank torch.distributed process (env rendezvous on a free port) with
    ``args``; return the JSON it printed on its last ``RESULT `` line (the test fails with its output if it
    printed none or exited non-zero). For tests whose process-wide state (a process group, a compiled
    function) must not leak into pytest's process."""
    return run_rank_children(source, tmp_path, *args, ranks=1, timeout_s=timeout_s)[0]


def run_rank_children(
    source: str, tmp_path: Path, *args: str, ranks: int, timeout_s: float = 300
) -> list[dict]:
    """``run_one_rank_child`` with ``ranks`` processes of one world; returns each rank's RESULT, by rank. If a
    rank fails or runs past ``timeout_s``, every rank is killed and the test fails with the outputs."""
    script = tmp_path / "child.py"
    script.write_text(source)
    port = str(free_port())
    procs = []
    for rank in range(ranks):
        env = child_env(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(ranks),
        )
        with (tmp_path / f"child{rank}.log").open("w") as log:  # the child keeps its own handle
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(script), *args],
                    env=env,
                    cwd=REPO,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    text=True,
                    start_new_session=True,
                )
            )
    deadline = time.monotonic() + timeout_s
    try:  # a failed rank would leave the others waiting in a collective: stop them all at the first failure
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
    finally:
        timed_out = time.monotonic() >= deadline and any(p.poll() is None for p in procs)
        for p in procs:
            kill_group(p)
    codes = [p.returncode for p in procs]  # killed: negative
    outputs = [(tmp_path / f"child{rank}.log").read_text() for rank in range(ranks)]
    results = []
    for rank, (code, out) in enumerate(zip(codes, outputs, strict=True)):
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        why = f"ran past {timeout_s} s and was killed" if timed_out else f"exited {code}"
        assert code == 0 and lines, f"rank {rank} {why}:\n" + "\n".join(o[-3000:] for o in outputs)
        results.append(json.loads(lines[-1].removeprefix("RESULT ")))
    return results


def kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


@contextlib.contextmanager
def rollout_server(
    model_dir: Path,
    log_path: Path,
    ready_timeout_s: float | None = None,
    port: int | None = None,
    backend: str = "torch",
    extra_args: tuple[str, ...] = (),
):
    """``python -m rollout_server --backend B [extra_args]`` on ``port`` (default: a free one), output in
    ``log_path``; yields (url, process) and kills its process group after."""
    from rollout_server.spawn import ServerProcess

    if ready_timeout_s is None:
        ready_timeout_s = 120.0 if backend == "torch" else 300.0  # vLLM CPU: ~40 s alone, more when busy
    server = ServerProcess(
        model_dir, backend=backend, port=port, extra_args=extra_args, env=child_env(), log_path=log_path
    )
    try:
        yield server.wait_ready(ready_timeout_s), server.proc
    finally:
        server.stop(grace_s=0)


def start_trainer(
    world_size: int, config: str | Path, overrides: list[str], log_dir: Path, tag: str = "trainer"
) -> list[subprocess.Popen]:
    """``python -m trainer`` as ``world_size`` ranks (env-var rendezvous, like torchrun sets up)."""
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = child_env()
        if world_size > 1:
            env.update(
                RANK=str(rank),
                WORLD_SIZE=str(world_size),
                LOCAL_RANK=str(rank),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
            )
        log = open(log_dir / f"{tag}-rank{rank}.log", "w")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "trainer", "--config", str(config), *overrides],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        log.close()
    return procs


def run_overrides(model_dir, out, name: str, url: str, *extra: str) -> list[str]:
    """What every single-server trainer run of the tests sets: the model, RUN_DIR = out/name, the server and no
    TensorBoard (the weight-sync store picks its own port); ``extra`` comes last, so it wins."""
    return [
        f"model.name_or_path={model_dir}",
        f"run.output_dir={out}",
        f"run.name={name}",
        f"rollout.server_urls=[{url}]",
        "logging.tensorboard=false",
        *extra,
    ]


# A short run with a visible update: 4 steps at a large learning rate, a checkpoint at step 2 (the resume
# tests crash after step 3), the debug probe of every server after each push.
SHORT_RUN = ("optim.max_steps=4", "optim.lr=1e-2", "checkpoint.every_steps=2", "debug.probe_after_sync=true")


def run_short(model_dir, out: Path, url: str, name: str, tag: str, extra=(), timeout_s: float = 240) -> int:
    """One SHORT_RUN trainer process (its log: out/<tag>-rank0.log); returns its exit code."""
    overrides = run_overrides(model_dir, out, name, url, *SHORT_RUN, *extra)
    return wait_all(start_trainer(1, "configs/cpu-tiny-test.yaml", overrides, out, tag), timeout_s)[0]


def wait_all(procs: list[subprocess.Popen], timeout_s: float) -> list[int]:
    """Exit codes of every process; kills them all and raises if the deadline passes."""
    deadline = time.monotonic() + timeout_s
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired as e:
        raise TimeoutError(f"trainer did not finish within {timeout_s}s") from e
    finally:
        for p in procs:
            kill_group(p)
    return [p.returncode for p in procs]


def read_log(log_dir: Path, tag: str = "trainer", rank: int = 0) -> str:
    """The last 6000 characters of a trainer rank's log (for assertion messages; ``full_log`` for searches)."""
    return full_log(log_dir, tag, rank)[-6000:]


def full_log(log_dir: Path, tag: str = "trainer", rank: int = 0) -> str:
    return (log_dir / f"{tag}-rank{rank}.log").read_text()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def load_hf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@torch.no_grad()
def greedy_with_logprobs(model, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], list[float]]:
    """Plain greedy decoding with full forwards (no cache): token ids and log_softmax of each chosen token."""
    ids = torch.tensor([prompt_ids])  # [1, L]
    eos = model.config.eos_token_id
    toks, lps = [], []
    for _ in range(max_new_tokens):
        logits = model(ids).logits[0, -1].float()  # [V]
        logp = torch.log_softmax(logits, -1)  # [V]
        t = int(torch.argmax(logits))
        toks.append(t)
        lps.append(float(logp[t]))
        ids = torch.cat([ids, torch.tensor([[t]])], dim=1)  # [1, L + 1]
        if t == eos:
            break
    return toks, lps


def state_dicts_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
