"""Rollout server entry point: serve a causal LM for GRPO rollouts and take weight updates from the trainer.

    python -m rollout_server --model Qwen/Qwen2.5-0.5B-Instruct --backend vllm --port 8000
    python -m rollout_server --model /path/to/tiny-model --backend torch --port 8000

Prints one line starting with "READY" once it serves. Binds 127.0.0.1 by default; a non-loopback host needs
--api-token (or --allow-insecure-remote). Exit status: 0 after SIGTERM/Ctrl-C (the engine's processes are
stopped first), 2 bad arguments or model (the message says which), 3 the generation engine died.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from rollout_server.backends import BACKENDS, installed, resolve

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
EXIT_ENGINE_DEAD = 3  # the generation engine died; a supervisor should start a new server
DEAD_GRACE_S = 3.0  # how long /health reports the death before the process exits


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rollout_server", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="Hugging Face hub id or local model directory.")
    p.add_argument(
        "--backend",
        choices=[*BACKENDS, "auto"],
        default="auto",
        help="Generation backend (default auto: vllm wherever it is installed, GPU or CPU build; else torch).",
    )
    p.add_argument("--host", default="127.0.0.1", help="Bind address (default 127.0.0.1).")
    p.add_argument("--port", type=int, default=8000, help="Port (default 8000).")
    p.add_argument(
        "--tensor-parallel-size", type=int, default=1, help="vLLM tensor parallel GPUs (default 1)."
    )
    p.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.9,
        help="vLLM fraction of GPU memory for weights + KV cache, in (0, 1] (default 0.9).",
    )
    p.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="Context length (prompt + completion); default: the model's.",
    )
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="Weights dtype (default auto: bf16 on GPU for vLLM, float32 on CPU for torch).",
    )
    p.add_argument("--device", default=None, help="torch backend device, e.g. cpu or cuda:0 (default: auto).")
    p.add_argument(
        "--api-token",
        default=os.environ.get("ROLLOUT_API_TOKEN"),
        help="Bearer token for admin routes (weight transfer, pause/resume). Env: ROLLOUT_API_TOKEN.",
    )
    p.add_argument(
        "--require-token-for-generation",
        action="store_true",
        help="Also require the token on /generate and the OpenAI routes.",
    )
    p.add_argument(
        "--allow-insecure-remote",
        action="store_true",
        help="Allow a non-loopback --host without --api-token (anyone reaching it can change weights).",
    )
    p.add_argument(
        "--max-batch-tokens",
        type=int,
        default=1 << 22,
        help="Refuse a request whose prompts*n + n*max_tokens exceeds this (default 4194304).",
    )
    p.add_argument(
        "--max-body-bytes", type=int, default=64 << 20, help="Request body limit (default 64 MiB)."
    )
    p.add_argument(
        "--weight-transfer-bucket-bytes",
        type=int,
        default=256 << 20,
        help="vLLM only: packed bucket size fixed at /init_weight_transfer (default 256 MiB); "
        "updates must use the same bucket_bytes.",
    )
    p.add_argument(
        "--kv-cache-bytes",
        type=int,
        default=None,
        help="vLLM on CPU: KV cache size in bytes (default 1 GiB; --gpu-memory-utilization would take a "
        "share of host RAM there).",
    )
    p.add_argument(
        "--enforce-eager",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="vLLM: skip graph compilation (start-up ~20 s instead of 70-80 s on CPU, where it is the "
        "default; same throughput on small models). --no-enforce-eager compiles.",
    )
    p.add_argument("--served-model-name", default=None, help="Name reported by /health and /v1/models.")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


# Set by whoever starts the server (the launcher's command line); extra arguments must not repeat them: the
# last occurrence would win, and the launcher would wait on a port or backend the server does not use.
LAUNCHER_FLAGS = ("--model", "--backend", "--host", "--port")


class _ArgError(ValueError):
    pass


def check_extra_args(extra: list[str]) -> str | None:
    """Why ``extra`` (arguments appended to a launcher-built command line) would not start a server; None when
    every one is a known option with a valid value. Lets a run config fail at load time, not at launch."""
    for arg in extra:
        flag = arg.split("=", 1)[0]
        if flag in LAUNCHER_FLAGS:
            return (
                f"{flag} is set by the launcher (launch.rollout_backend, launch.server_base_port); remove it"
            )
    parser = build_parser()

    def error(message: str):
        raise _ArgError(message)

    parser.error = error  # type: ignore[method-assign]  # argparse reports every problem through error()
    try:
        parser.parse_args(["--model", "unused", *extra])
    except _ArgError as e:
        return f"python -m rollout_server would refuse {extra}: {e}"
    return None


def validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if not 1 <= args.port <= 65535:
        parser.error(f"--port {args.port}: must be in 1..65535")
    if not 0 < args.gpu_memory_utilization <= 1:
        parser.error(f"--gpu-memory-utilization {args.gpu_memory_utilization}: must be in (0, 1]")
    if args.tensor_parallel_size < 1:
        parser.error("--tensor-parallel-size: must be >= 1")
    if args.max_model_len is not None and args.max_model_len < 16:
        parser.error("--max-model-len: must be >= 16")
    if args.max_batch_tokens < 1 or args.max_body_bytes < 1024:
        parser.error("--max-batch-tokens must be >= 1 and --max-body-bytes >= 1024")
    # A hub id is "org/name"; anything path-like must be an existing directory.
    looks_local = args.model.startswith((".", "/", "~")) or args.model.count("/") > 1
    if looks_local and not Path(args.model).expanduser().is_dir():
        parser.error(f"--model {args.model}: no such directory")
    if args.host not in LOOPBACK_HOSTS and not args.api_token and not args.allow_insecure_remote:
        parser.error(f"--host {args.host} is not loopback: set --api-token (or pass --allow-insecure-remote)")
    if args.require_token_for_generation and not args.api_token:
        parser.error("--require-token-for-generation needs --api-token")
    args.backend = resolve(args.backend or "auto")
    if not installed(args.backend):
        entry = BACKENDS[args.backend]
        parser.error(f"--backend {args.backend} needs the {entry.requires} package ({entry.install_hint})")
    if args.kv_cache_bytes is not None and args.kv_cache_bytes < 1 << 20:
        parser.error("--kv-cache-bytes: must be at least 1 MiB")
    if args.backend == "torch" and args.tensor_parallel_size != 1:
        parser.error("--tensor-parallel-size > 1 needs --backend vllm")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    validate(args, parser)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    import uvicorn

    from rollout_server.app import ServerState, build_asgi
    from rollout_server.reaper import start_reaper

    reaper = start_reaper()  # noqa: F841 - kept alive with this process; reaps vLLM's engine if we are killed
    try:
        backend = BACKENDS[args.backend].build(args)
    except (OSError, ValueError) as e:
        print(f"error: could not load --model {args.model}: {e}", file=sys.stderr)
        return 2
    if args.served_model_name:
        backend.info.model = args.served_model_name
    state = ServerState(
        backend=backend,
        api_token=args.api_token,
        require_token_for_generation=args.require_token_for_generation,
        max_body_bytes=args.max_body_bytes,
        max_batch_tokens=args.max_batch_tokens,
    )

    exit_code = 0

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if not self.should_exit:
                asyncio.get_running_loop().create_task(self.watch_backend())
                print(
                    f"READY rollout_server on http://{args.host}:{args.port} model={backend.info.model} "
                    f"backend={args.backend} max_model_len={backend.info.max_model_len}",
                    flush=True,
                )

        async def watch_backend(self):
            # A dead engine (vLLM's EngineDeadError) never recovers in-process: /health reports it and
            # generation answers 503 for a few seconds, then the server exits non-zero so a supervisor
            # (the launcher, Docker's restart policy) starts a fresh one and the trainer re-syncs it.
            nonlocal exit_code
            while not self.should_exit:
                reason = backend.dead_reason()
                if reason is not None:
                    logging.getLogger("rollout_server").error("%s: exiting in %.0fs", reason, DEAD_GRACE_S)
                    await asyncio.sleep(DEAD_GRACE_S)
                    exit_code = EXIT_ENGINE_DEAD
                    self.should_exit = True
                    return
                await asyncio.sleep(0.5)

        async def shutdown(self, sockets=None):
            # Stop the engine here, inside uvicorn's own shutdown: after a SIGTERM/SIGINT uvicorn re-raises
            # the signal when run() returns, which kills this process before any code after run() (vLLM's
            # EngineCore and Worker processes, ~2 GB, were left running that way).
            try:
                await super().shutdown(sockets=sockets)
            finally:
                await asyncio.to_thread(backend.shutdown)

    config = uvicorn.Config(
        build_asgi(state),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    try:
        Server(config).run()
    finally:
        backend.shutdown()  # idempotent: covers a failed start-up, where shutdown() never ran
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
