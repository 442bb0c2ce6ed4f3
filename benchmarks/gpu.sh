#!/usr/bin/env bash
# HyperDreamBooth at SD 1.5 shapes on one GPU: one command, at most ~8 minutes with cold compiles,
# for a single H200 machine without network. Three parts, each in its own process and under its
# own time limit, all writing into $OUT (default benchmarks/results):
#   1. benchmarks/finetune_step.py --device cuda --dtype bfloat16 --configs sd15: the SD 1.5 UNet
#      LoRA step, ours (JAX) against PyTorch CUDA + peft in one process -> gpu_finetune_step.json
#   2. benchmarks/gpu_personalize.py: hypernetwork prediction + rank relaxation + 40 finetune steps
#      at 512 px in bfloat16 on random weights, 1 and 4 identities per program (compile seconds,
#      first and steady calls, seconds per identity, identities per second) -> gpu_personalize.json
#   3. gpu.json: the machine (nvidia-smi), Python package versions, both parts and their exit codes
# Each part's output also lands in $OUT/<part>.log. Part 2 goes last because it keeps what it
# finished when its limit cuts it short (its JSON is rewritten after every phase); part 1 writes
# its JSON only at the end.
#
# The machine has JAX with CUDA, torch, flax and optax, but transformers 5.x and no diffusers. Our
# pins travel in .whl/ (git-ignored) and go into /tmp/site, ahead of the image's packages on
# PYTHONPATH. Fill .whl/ once, here, from the repository root:
#   echo /.whl/ >> "$(git rev-parse --git-path info/exclude)"
#   for p in diffusers==0.39.0 transformers==4.57.6 huggingface_hub==0.36.2 tokenizers==0.22.2 \
#            accelerate==1.16.0 peft==0.21.2 ml_collections==1.1.0 tensorboardX==2.6.5; do
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl "$p"; done                     # 23 MB of wheels; the image's Python is 3.12, x86-64
#   bash benchmarks/gpu.sh --pack              # -> .whl/site.tar.xz (8.6 MB): the same files, installed
# Carry the packed file: the tree that travels is at most 64 MiB and the repository alone is ~44 MB
# (the toy weights), so the 23 MB of wheels would leave almost no room. gpu.sh unpacks
# .whl/site.tar.xz if it is there, else installs .whl/*.whl with pip (--no-index --no-deps).
# Why these: transformers 4.57.6 checks at import that huggingface_hub < 1.0 and tokenizers <= 0.23.0
# (the image has hub 1.x and tokenizers 0.23.2), so both travel too; accelerate and peft are the
# versions our PyTorch comparison was written against (diffusers and peft import them);
# ml_collections is imported by the personalisation stage; tensorboardX by the training jobs (not
# here, but launch/h200_toy.sh shares the folder). Not carried: jax, flax, optax, orbax-checkpoint,
# torch, numpy, safetensors (the image's own, built for its CUDA and JAX).
#
# With the device tool (from the repository root; files in $OUT come back):
#   run(command="bash benchmarks/gpu.sh", carry=[".whl/site.tar.xz"], kind="nvidia-h200", timeout_s=540)
#   bash benchmarks/gpu.sh --dry_run      # prints the commands only, runs and writes nothing
# Limits (seconds, environment): STEP_S=150 for part 1, BUDGET=460 for parts 1-2 together (part 2
# gets what part 1 left, at least 240). Compile times on the GPU are estimates (1-2 min per SD 1.5
# training program, three programs in part 2, one in part 1): adjust these after a first run.
# Never run on a GPU yet (no machine was lent to the session that wrote it); the reduced CPU run
# (python benchmarks/gpu_personalize.py --reduced) goes through the same code.
set -uo pipefail
OUT=${OUT:-benchmarks/results}
PY=${PYTHON:-python3}
STEP_S=${STEP_S:-150}
BUDGET=${BUDGET:-460}
[[ "${1:-}" == "--dry_run" ]] && DRY_RUN=1
dry() { [[ "${DRY_RUN:-}" == 1 ]]; }

# part NAME LIMIT CMD...: runs CMD under a time limit (its process group is killed at the limit),
# output to the terminal and $OUT/NAME.log, exit code appended to $OUT/exit_codes.txt.
part() {
  local name=$1 limit=$2
  shift 2
  echo "+ timeout $limit $* > $OUT/$name.log"
  dry && return 0
  timeout --kill-after=15 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  echo "$name=${PIPESTATUS[0]}" >>"$OUT/exit_codes.txt"
}

PIP=($PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target)
UNPACK=($PY -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='data')")
if [[ "${1:-}" == "--pack" ]]; then # here: .whl/*.whl -> .whl/site.tar.xz (the installed files, xz)
  rm -rf /tmp/hdb_pack && "${PIP[@]}" /tmp/hdb_pack .whl/*.whl && rm -rf /tmp/hdb_pack/bin || exit 1
  $PY -c "import sys, tarfile; tarfile.open(sys.argv[1], 'w:xz').add(sys.argv[2], '.')" .whl/site.tar.xz /tmp/hdb_pack
  rm -rf /tmp/hdb_pack && ls -l .whl/site.tar.xz && exit 0
fi
if [[ -f .whl/site.tar.xz ]]; then
  echo "+ ${UNPACK[*]} .whl/site.tar.xz /tmp/site"
  dry || "${UNPACK[@]}" .whl/site.tar.xz /tmp/site || exit 1
elif compgen -G ".whl/*.whl" >/dev/null || dry; then
  echo "+ ${PIP[*]} /tmp/site .whl/*.whl"
  dry || "${PIP[@]}" /tmp/site .whl/*.whl || exit 1
else
  echo "warning: nothing in .whl/: diffusers 0.39.0 / transformers 4.57.6 must already be importable" >&2
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TF_CPP_MIN_LOG_LEVEL=1
unset JAX_COMPILATION_CACHE_DIR # cold compiles: the figures are what a first run costs

echo "+ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/nvidia_smi.csv"
if ! dry; then
  mkdir -p "$OUT"
  rm -f "$OUT/exit_codes.txt" "$OUT/gpu_finetune_step.json"  # the step benchmark appends to its JSON
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/nvidia_smi.csv" 2>&1 ||
    echo "nvidia-smi failed" >>"$OUT/nvidia_smi.csv"
  cat "$OUT/nvidia_smi.csv"
fi

part gpu_finetune_step "$STEP_S" \
  $PY benchmarks/finetune_step.py --device cuda --dtype bfloat16 --configs sd15 --batch 4 \
  --steps 10 --warmup 2 --blocks 2 --json "$OUT/gpu_finetune_step.json"
left=$((BUDGET - SECONDS))
dry && left=$((BUDGET - STEP_S)) # what is left if part 1 takes its whole limit
((left < 240)) && left=240
# Batch 4 vmaps 4 identities x 4 views: the UNet trains on 16 images at once (tens of GB).
part gpu_personalize "$left" env XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 \
  $PY benchmarks/gpu_personalize.py --out "$OUT/gpu_personalize.json" --steps 40 --batches 1,4
echo "+ $PY benchmarks/gpu_personalize.py --collect $OUT   # -> $OUT/gpu.json"
dry || $PY benchmarks/gpu_personalize.py --collect "$OUT"
echo "gpu.sh: ${SECONDS}s"
