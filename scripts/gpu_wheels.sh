#!/usr/bin/env bash
# Wheels that scripts/gpu_check.sh needs on the `device` tool's GPU machine, into .whl/ (git-ignored through
# .git/info/exclude; name it in the run's `carry`). That machine's Python 3.12 image already has torch,
# transformers' dependencies, numpy, httpx, pyyaml, psutil, ninja, einops, msgpack and sympy, and nothing can
# be fetched there; these are what it lacks, at the versions of this checkout's .venv (transformers too: the
# image's is older than our pin). deepspeed ships only as a source archive: it is built here into a
# pure-Python wheel (its CUDA ops are JIT-built on first use, as in our Docker image).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
EXCLUDE="$(git rev-parse --git-common-dir)/info/exclude"
grep -qx '/.whl/' "$EXCLUDE" 2>/dev/null || echo '/.whl/' >>"$EXCLUDE"
rm -rf .whl && mkdir -p .whl
PKGS=(pydantic pydantic-core annotated-types typing-inspection fastapi starlette uvicorn hjson
  math-verify latex2sympy2_extended antlr4-python3-runtime transformers)
pins=()
for p in "${PKGS[@]}"; do
  pins+=("$p==$($PY -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$p")")
done
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${pins[@]}"
DS=$($PY -c "import importlib.metadata as m; print(m.version('deepspeed'))")
DS_BUILD_OPS=0 $PY -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==$DS"
ls -la .whl
du -sh .whl
