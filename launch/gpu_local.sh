#!/usr/bin/env bash
# One host, all its GPUs: a single process drives every local GPU and the mesh spans them (no
# jax.distributed: one process needs no coordinator).
#
#   launch/gpu_local.sh --config=configs/deepseek_mini.py --config.mesh.fsdp=-1 --config.mesh.data=1
#   GPUS=0,1,2,3 launch/gpu_local.sh --config=...        # only these GPUs (CUDA_VISIBLE_DEVICES)
#
# Everything is passed to `python -m superlm_jax.train` unchanged. Settings (environment): GPUS, PYTHON.
# DRY_RUN=1, or --dry_run as the first argument: print the command instead of running it.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
source "$REPO/launch/common.sh"
if [[ "${1:-}" == "--dry_run" ]]; then
  DRY_RUN=1
  shift
fi

env_vars=()
if [[ -n "${GPUS:-}" ]]; then
  env_vars+=("CUDA_VISIBLE_DEVICES=$GPUS")
fi
cd "$REPO"
run env ${env_vars[@]+"${env_vars[@]}"} "$PYTHON" -m superlm_jax.train "$@"
