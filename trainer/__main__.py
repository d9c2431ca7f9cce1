"""Train a policy with GRPO (DeepSeek-R1-Zero style) against running rollout servers.

    python -m trainer --config configs/qwen2.5-0.5b-gsm8k.yaml [key.sub=value ...]
    torchrun --nproc-per-node 2 -m trainer --config configs/cpu-tiny-test.yaml rollout.server_urls=[http://127.0.0.1:8000]
    deepspeed --num_gpus 4 --module trainer --config configs/qwen2.5-1.5b-gsm8k-long.yaml

The rollout servers (``python -m rollout_server --model ... --port ...``) must be started first and serve
the same model; their URLs go in ``rollout.server_urls``. Without RANK/WORLD_SIZE in the environment the
trainer runs as one process. What a step does, and how it departs from the paper, is in trainer/loop.py.
Exit status: 0 done, 1 the run stopped (message on stderr), 2 invalid configuration or no usable
checkpoint (nothing is retried or overwritten).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="YAML config (see configs/); omitted = schema defaults")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides (values parsed as YAML)")
    a = p.parse_args(argv)

    from trainer.config import ConfigError, check_run_prerequisites, load_config

    try:
        cfg = load_config(a.config, a.overrides)
        check_run_prerequisites(cfg)
    except (ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from trainer.checkpoint import CheckpointError
    from trainer.loop import TrainingStopped, run_training

    try:
        result = run_training(cfg)
    except CheckpointError as e:
        print(f"error: checkpoint: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:  # found while setting up (e.g. the model cannot be loaded)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"error: training stopped: {e}", file=sys.stderr)
        return 1
    print(
        f"done: {result.steps_done} steps, run folder {result.run_dir}, last checkpoint {result.last_checkpoint}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
