#!/usr/bin/env bash
# Train the hypernetwork on one host with several GPUs (one process drives all local GPUs).
#
#   launch/gpu_host.sh runs/hypernet                      # data parallel over all GPUs
#   launch/gpu_host.sh runs/hypernet --config.mesh.fsdp=2 # shard frozen UNet/ViT over pairs
#   launch/gpu_host.sh runs/hypernet --dry_run            # mesh + shardings + compile, then exit
#
# PYTHON picks the interpreter (default: `python` on PATH), e.g. PYTHON=.venv/bin/python.
set -euo pipefail
WORKDIR=${1:?workdir}; shift
DRY_RUN=False
[[ "${1:-}" == "--dry_run" ]] && DRY_RUN=True && shift
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
exec "${PYTHON:-python}" -m hdb_jax.train --config "${CONFIG:-configs/hypernet.py:sd15}" \
  --config.workdir="$WORKDIR" --config.dry_run=$DRY_RUN --config.mesh.data=-1 "$@"
