"""Joining or starting a Ray cluster, and reserving the devices of a run with placement groups.

Layout (one placement group per role, so the two roles never share a GPU):
- rollout: ``num_rollout_servers`` bundles of ``rollout_gpus_per_server`` GPUs (one bundle = one server = one
  tensor-parallel group; a bundle lives on one node). Strategy PACK: servers sit together where they fit.
- trainer: ``num_trainer_ranks`` bundles of ``trainer_gpus_per_rank`` GPU (0 on CPU). Strategy PACK as well:
  DeepSpeed ranks talk the most, so they are packed onto as few nodes as possible; Ray spreads them over
  nodes by itself when one node is not enough.
On CPU every bundle is ``cpus_per_process`` CPUs.

Multi-node: start ``ray start --head`` on one node and ``ray start --address HEAD:6379`` on the others, then
run the driver anywhere with ``launch.ray_address=auto`` (or ``HEAD:6379``); nothing else changes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class Reservation:
    """The two placement groups of a run and their bundle shapes."""

    rollout_pg: object
    trainer_pg: object
    rollout_bundle: dict[str, float]
    trainer_bundle: dict[str, float]


def start_ray(
    address: str | None, num_cpus_needed: int, num_gpus_needed: int, log_to_driver: bool = False
) -> bool:
    """Join ``address`` or start a private local cluster; returns True when this process started it."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Ray prints a warning per call when it cannot find a usage-stats config; silence both.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        ray.init(address=address, log_to_driver=log_to_driver, namespace="grpo")
        return False
    local_cpus = os.cpu_count() or 1
    ray.init(
        num_cpus=max(local_cpus, num_cpus_needed),  # a 2-core laptop still fits 1 server + 1 rank
        num_gpus=num_gpus_needed if num_gpus_needed else None,
        include_dashboard=False,
        log_to_driver=log_to_driver,
        namespace="grpo",
        object_store_memory=256 * 1024 * 1024,  # only small messages travel through Ray
    )
    return True


def reserve(launch_cfg, cpus_per_process: float, timeout_s: float) -> Reservation:
    """Create the rollout and trainer placement groups; fail clearly when the cluster cannot hold them."""
    import ray
    from ray.util.placement_group import placement_group

    rollout_bundle = {"CPU": cpus_per_process}
    if launch_cfg.rollout_gpus_per_server:
        rollout_bundle["GPU"] = float(launch_cfg.rollout_gpus_per_server)
    trainer_bundle = {"CPU": cpus_per_process}
    if launch_cfg.trainer_gpus_per_rank:
        trainer_bundle["GPU"] = float(launch_cfg.trainer_gpus_per_rank)
    rollout_pg = placement_group([dict(rollout_bundle)] * launch_cfg.num_rollout_servers, strategy="PACK")
    trainer_pg = placement_group([dict(trainer_bundle)] * launch_cfg.num_trainer_ranks, strategy="PACK")
    for name, pg in (("rollout", rollout_pg), ("trainer", trainer_pg)):
        try:
            ray.get(pg.ready(), timeout=timeout_s)
        except Exception as e:
            raise RuntimeError(
                f"the cluster cannot hold the {name} placement group within {timeout_s:.0f}s "
                f"(needs {launch_cfg.num_rollout_servers} x {rollout_bundle} for rollout and "
                f"{launch_cfg.num_trainer_ranks} x {trainer_bundle} for the trainer; "
                f"cluster has {ray.cluster_resources()})"
            ) from e
    return Reservation(rollout_pg, trainer_pg, rollout_bundle, trainer_bundle)


def release(res: Reservation | None) -> None:
    if res is None:
        return
    from ray.util.placement_group import remove_placement_group

    for pg in (res.rollout_pg, res.trainer_pg):
        try:
            remove_placement_group(pg)
        except Exception:
            pass


def actor_options(pg, bundle_index: int, bundle: dict[str, float], name: str) -> dict:
    """Ray options that pin one actor to one bundle of a placement group."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return {
        "num_cpus": bundle.get("CPU", 0),
        "num_gpus": bundle.get("GPU", 0),
        "name": name,
        "scheduling_strategy": PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=bundle_index
        ),
    }
