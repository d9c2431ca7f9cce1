#!/usr/bin/env bash
# Creates .venv with the pinned stack. CPU machines get the CPU build of torch 2.13.0
# (installed first and constrained, so pip never pulls the CUDA packages).
# Set TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cpu) where the CPU wheel
# is not already reachable through your pip configuration.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  $PY -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  echo "[setup] installing torch==2.13.0"
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    .venv/bin/pip install -q torch==2.13.0 --index-url "$TORCH_INDEX_URL"
  else
    .venv/bin/pip install -q torch==2.13.0
  fi
fi
echo "[setup] installing the project and its pinned dependencies"
.venv/bin/pip install -q -c constraints.txt -e ".[dev]"
touch .venv/.installed
echo "[setup] done: $(.venv/bin/python -c 'import torch, transformers, deepspeed, ray; print("torch", torch.__version__, "transformers", transformers.__version__, "deepspeed", deepspeed.__version__, "ray", ray.__version__)')"
