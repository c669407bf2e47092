#!/usr/bin/env bash
# Runs the same command on every worker of a Cloud TPU VM pod slice.
#
#   TPU_NAME=my-v4-32 ZONE=us-central2-b launch/tpu_pod.sh \
#     agfsync-jax train --config=configs/sd15.py --workdir=gs://bucket/runs/sd15 --config.model.path=/models/sd15
#
# Set-up once per pod (same command on all workers):
#   launch/tpu_pod.sh bash -c 'git clone <your fork> agfsync-jax && cd agfsync-jax && \
#       python3 -m venv .venv && .venv/bin/pip install "jax[tpu]" -e .'
# On TPU, JAX_DISTRIBUTED_AUTO=1 lets jax.distributed.initialize() find the coordinator and
# process ids by itself (agfsync_jax/distributed.py).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
REPO_DIR=${REPO_DIR:-agfsync-jax}
printf -v cmd '%q ' "$@"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"} --worker=all \
  --command="cd $REPO_DIR && JAX_DISTRIBUTED_AUTO=1 PATH=\$PWD/.venv/bin:\$PATH $cmd"
