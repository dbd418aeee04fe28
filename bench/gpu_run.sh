#!/usr/bin/env bash
# Every GPU figure of the throughput work, in one call on a machine with a CUDA GPU and torch,
# timm, torchvision and h5py installed (no install step: such machines may be offline).
#   bash bench/gpu_run.sh [RESULTS_DIR]        (default: $OUT, else ./gpu-results)
# At most about 9 minutes on one H100/H200 (timeouts of 180 + 390 s): correctness of the GPU
# paths, then the encoder per preset against timm (eager, and compiled for base), memory, end
# to end on 7680 generated JPEGs (outputs deleted as it goes), start-up. The tables land in
# RESULTS_DIR; progress.txt has every row as soon as it is measured, should a timeout cut a section.
set -uo pipefail
cd "$(dirname "$0")/.."
results=${1:-${OUT:-gpu-results}}
mkdir -p "$results"
export PYTHONPATH=$PWD
python=${PYTHON:-python3}
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; nproc; df -h /tmp | tail -1;
  "$python" -c "import torch, timm, torchvision; print('torch', torch.__version__, 'timm', timm.__version__, 'torchvision', torchvision.__version__)"; } \
  2>&1 | tee "$results/machine.txt"
timeout 180 "$python" bench/cuda_check.py 2>&1 | tee "$results/cuda_check.txt"
timeout 390 "$python" bench/throughput.py --presets small,base,large --compile --compile-presets base \
  --repeats 3 --min-seconds 2 --e2e-preset base --e2e-images 7680 --workers 16 --workdir /tmp \
  --json "$results/throughput.json" 2>"$results/progress.txt" | tee "$results/throughput.md"
tail -5 "$results/progress.txt"
