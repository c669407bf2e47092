#!/usr/bin/env bash
# Runs one process of a multi-host GPU job. Start it once per host (or via SLURM's srun):
#
#   COORDINATOR_ADDRESS=host0:12345 NUM_PROCESSES=4 PROCESS_ID=<0..3> \
#     launch/gpu_multihost.sh agfsync-jax train --config=configs/sd15.py --workdir=/shared/run \
#       --config.model.path=/models/sd15
#
# Under SLURM, the address, count and id come from SLURM_* (first node of the allocation,
# SLURM_NTASKS, SLURM_PROCID) when the variables above are unset. Every process must see the
# same --workdir (a shared filesystem): checkpoints are written once, collectively.
set -euo pipefail
if [[ -z "${COORDINATOR_ADDRESS:-}" && -n "${SLURM_JOB_NODELIST:-}" ]]; then
  head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  COORDINATOR_ADDRESS="${head_node}:${COORDINATOR_PORT:-12345}"
fi
: "${COORDINATOR_ADDRESS:?set COORDINATOR_ADDRESS=host:port (or run under SLURM)}"
export JAX_COORDINATOR_ADDRESS="$COORDINATOR_ADDRESS"
export JAX_NUM_PROCESSES="${NUM_PROCESSES:-${SLURM_NTASKS:?set NUM_PROCESSES}}"
export JAX_PROCESS_ID="${PROCESS_ID:-${SLURM_PROCID:?set PROCESS_ID}}"
# JAX preallocates this fraction of GPU memory; the rest is headroom for cuDNN and NCCL buffers.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
exec "$@"
