#!/usr/bin/env bash
# Entry point of the GRPO image: one image, one role per container.
#
#   rollout   the rollout server (model, backend and extra args come from the run config, so the
#             server always serves the model the trainer trains)
#   trainer   the DeepSpeed trainer, one process per visible GPU (torchrun sets RANK/WORLD_SIZE/...)
#   launch    the Ray driver (everything in one container, e.g. a single multi-GPU host)
#   *         any other command is run as is (e.g. `bash`)
#
# Environment (all optional): CONFIG (run config, default configs/qwen2.5-0.5b-gsm8k.yaml),
# ROLLOUT_PORT (8000), ROLLOUT_URLS (comma-separated, the trainer's servers; default http://rollout:8000),
# TRAINER_NPROC (trainer processes; default: number of visible GPUs), RUN_NAME, SYNC_MASTER_ADDR
# (how the rollout server reaches trainer rank 0; default: this container's hostname),
# ROLLOUT_API_TOKEN or ROLLOUT_API_TOKEN_FILE (a compose secret file, /run/secrets/rollout_api_token).
set -euo pipefail

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
CONFIG="${CONFIG:-configs/qwen2.5-0.5b-gsm8k.yaml}"
RUNS_DIR="${GRPO_RUNS_DIR:-/data/runs}"
ROLLOUT_PORT="${ROLLOUT_PORT:-8000}"
cd /opt/grpo

# The token: a secret file wins over the environment; it is never written to the image or the logs.
TOKEN_FILE="${ROLLOUT_API_TOKEN_FILE:-/run/secrets/rollout_api_token}"
if [ -r "$TOKEN_FILE" ]; then
  ROLLOUT_API_TOKEN="$(tr -d '[:space:]' <"$TOKEN_FILE")"
fi
export ROLLOUT_API_TOKEN="${ROLLOUT_API_TOKEN:-}"

# Overrides shared by every role: runs on the shared volume, optional run name.
overrides=("run.output_dir=${RUNS_DIR}")
if [ -n "${RUN_NAME:-}" ]; then overrides+=("run.name=${RUN_NAME}"); fi

role="${1:-rollout}"
[ "$#" -gt 0 ] && shift
case "$role" in
  rollout)
    exec python -m launch.serve --config "$CONFIG" --host 0.0.0.0 --port "$ROLLOUT_PORT" "${overrides[@]}" "$@"
    ;;
  trainer)
    nproc="${TRAINER_NPROC:-$(python -c 'import torch; print(max(1, torch.cuda.device_count()))')}"
    urls="${ROLLOUT_URLS:-http://rollout:${ROLLOUT_PORT}}"
    overrides+=("rollout.server_urls=[${urls}]" "rollout.sync_master_addr=${SYNC_MASTER_ADDR:-$(hostname)}")
    if [ -n "$ROLLOUT_API_TOKEN" ]; then overrides+=("rollout.api_token=${ROLLOUT_API_TOKEN}"); fi
    exec torchrun --standalone --nproc_per_node "$nproc" -m trainer --config "$CONFIG" "${overrides[@]}" "$@"
    ;;
  launch)
    exec python -m launch --config "$CONFIG" "${overrides[@]}" "$@"
    ;;
  *)
    exec "$role" "$@"
    ;;
esac
