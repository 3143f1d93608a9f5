#!/usr/bin/env bash
# GPU benchmark, one short script for a CUDA machine (under 8 minutes): the stream's inference
# function at several batch sizes, fp32 vs bf16/fp16 autocast, channels-last, TorchScript vs
# torch.compile. Writes bench/gpu_results.json; commit it with the numbers in README.
# It installs nothing: run it where torch with CUDA is already present (the TileStream GPU image,
# or a VM with it), from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 2)' || {
  echo "bench/gpu.sh: no CUDA device visible to $PYTHON" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
timeout 470 "$PYTHON" bench/gpu.py --seconds "${SECONDS_EACH:-2}" --out bench/gpu_results.json
