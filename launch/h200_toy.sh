#!/usr/bin/env bash
# Stages 1-2 of HyperDreamBooth on the toy world at a scale 2 CPU cores cannot reach, on one H200
# machine without network, then the full main job; everything it trains lands in $OUT (default
# runs/h200).
#
# The machine has JAX with CUDA and flax but not our pins (diffusers 0.39.0 and transformers 4.57.6
# ship the last Flax classes; transformers 4.57.6 also needs huggingface_hub < 1.0 and tokenizers
# <= 0.23.0 beside it). Fill .whl/ once, here, and pack it, as benchmarks/gpu.sh's header says
# (`bash benchmarks/gpu.sh --pack` -> .whl/site.tar.xz), and carry .whl/site.tar.xz with the tree.
# Then, on the machine (the device tool runs this from the repository root):
#   bash launch/h200_toy.sh            # 2000 training identities (the config's), 32 held out, hypernet, demo
#   STEPS=1000 bash launch/h200_toy.sh # a shorter stage 2
# Never run yet (no machine was lent to the session that wrote it): the 8-minute budget is an estimate
# from the CPU rates (~16 identity-steps/s on 2 cores), not a measurement.
#   bash launch/h200_toy.sh --dry_run  # prints the commands only
set -euo pipefail
OUT=${OUT:-runs/h200}
STEPS=${STEPS:-3000}
PY=${PYTHON:-python3}
run() { echo "+ $*"; [[ "${DRY_RUN:-}" == 1 ]] || "$@"; }
[[ "${1:-}" == "--dry_run" ]] && DRY_RUN=1
if [[ -f .whl/site.tar.xz && "${DRY_RUN:-}" != 1 ]]; then
  $PY -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='data')" \
    .whl/site.tar.xz /tmp/site
  export PYTHONPATH=/tmp/site:$PWD
elif [[ -d .whl && "${DRY_RUN:-}" != 1 ]]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
B="--config.adapter.basis_file=$OUT/lidb_basis.safetensors"
mkdir -p "$OUT"
# Stage 1: the chosen recipe (configs/preopt.py:toy), 250 identities per program on the one GPU.
run $PY -m hdb_jax.train --config configs/preopt.py:toy,heldout --config.workdir="$OUT/preopt_heldout" \
  --config.chunk_size=32 $B
run $PY -m hdb_jax.train --config configs/preopt.py:toy --config.workdir="$OUT/preopt" \
  --config.chunk_size=250 $B
# Stage 2: the toy recipe (configs/hypernet.py:toy) on every identity, more steps and a larger batch.
run $PY -m hdb_jax.train --config configs/hypernet.py:toy --config.workdir="$OUT/hypernet" \
  --config.data.preopt_dir="$OUT/preopt" --config.data.heldout_preopt_dir="$OUT/preopt_heldout" \
  --config.steps=$STEPS --config.batch_size=64 --config.loss.regress_only_steps=$((STEPS / 2)) $B
# The full main job on the bundle just trained.
run $PY -m hdb_jax.train --config configs/demo.py:full --config.workdir="$OUT/demo" \
  --config.personalize.bundle="$OUT/hypernet/hypernet"
