#!/usr/bin/env bash
# The CPU figures of the throughput work on a CPU that multiplies bf16 natively (AMX or
# AVX-512-BF16), held to 2 cores as the targets assume: the small encoder in float32 and bfloat16
# against timm, and end to end with our defaults (bfloat16 on such a CPU) against the by-hand
# float32 script. About 3 minutes; needs torch, timm and h5py (a GPU host has them).
#   bash bench/cpu_run.sh [RESULTS_DIR]        (default: $OUT, else ./cpu-results)
set -uo pipefail
cd "$(dirname "$0")/.."
results=${1:-${OUT:-cpu-results}}
mkdir -p "$results"
export PYTHONPATH=$PWD CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=2
python=${PYTHON:-python3}
{ grep -m1 'model name' /proc/cpuinfo; nproc;
  echo "native bf16 flags: $(grep -o -w 'amx_bf16\|avx512_bf16' /proc/cpuinfo | sort -u | tr '\n' ' ')"; } \
  2>&1 | tee "$results/cpu_machine.txt"
timeout 300 taskset -c 0,1 "$python" bench/throughput.py --device cpu --presets small --repeats 3 \
  --skip memory,startup --e2e-images 96 --workers 2 --json "$results/cpu_throughput.json" \
  2>"$results/cpu_progress.txt" | tee "$results/cpu_throughput.md"
tail -3 "$results/cpu_progress.txt"
