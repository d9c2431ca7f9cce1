"""Launch a GRPO run on a Ray cluster: rollout servers + a DeepSpeed trainer world, supervised.

    python -m launch --config configs/cpu-demo.yaml [dotted.key=value ...]     (`make launch` runs this)

Single node: nothing to set up; a private Ray instance is started and shut down with the run.
Multi-node: `ray start --head` on one node, `ray start --address HEAD_IP:6379` on the others (same checkout
path and Python environment everywhere, a shared run folder), then on the head:
    python -m launch --config configs/X.yaml launch.ray_address=auto
Ctrl-C stops everything (servers, trainer ranks, actors, the local Ray instance); running again with
`checkpoint.resume=true` continues from the latest checkpoint. See launch/driver.py for the lifecycle.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/cpu-demo.yaml", help="run config YAML")
    p.add_argument("overrides", nargs="*", help="dotted.key=value config overrides (YAML values)")
    args = p.parse_args(argv)

    from launch.driver import main as drive

    return drive(args.config, args.overrides)


if __name__ == "__main__":
    sys.exit(main())
