#!/usr/bin/env bash
# On the `device` tool's GPU machine (see scripts/gpu_check.py): install the wheels that
# scripts/gpu_wheels.sh put in .whl/ (carried), then run the GPU check; its results land in $OUT.
#   device run: command "bash scripts/gpu_check.sh", carry [".whl"], timeout_s 580
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 540 python3 scripts/gpu_check.py --out "${OUT:-runs/gpu-check}" "$@"
