#!/usr/bin/env bash
# Train the hypernetwork on a TPU pod slice: the same command runs on every worker.
#
#   launch/tpu_pod.sh my-tpu-v4-32 us-central2-b gs://bucket/runs/hypernet [--dry_run]
#
# Each worker runs `python -m hdb_jax.train`; jax.distributed.initialize discovers the pod's
# coordinator by itself (config.distributed.auto), every process loads only its slice of the
# global batch, and Orbax writes one sharded checkpoint. --dry_run builds the mesh, the
# shardings and the compiled step on shape-only inputs, prints them, and exits.
set -euo pipefail
TPU_NAME=${1:?tpu name}; ZONE=${2:?zone}; WORKDIR=${3:?workdir}; shift 3
DRY_RUN=False
[[ "${1:-}" == "--dry_run" ]] && DRY_RUN=True && shift
REPO=${REPO:-~/hdb_jax}
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  cd $REPO && pip install -q -e '.[tfds]' jax[tpu] &&
  python -m hdb_jax.train --config configs/hypernet.py:sd15 \
    --config.workdir=$WORKDIR --config.dry_run=$DRY_RUN \
    --config.mesh.data=-1 --config.mesh.fsdp=1 $*"
