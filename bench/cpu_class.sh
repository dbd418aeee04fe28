#!/usr/bin/env bash
# Every CPU figure of the speed work for the machine class this runs on, in one go, into one
# Markdown file: the seed presets against the matrix-product ceilings (eager and compiled), the
# Qwen-VL shapes against transformers' towers, the run against its work-conserving bound, start-up
# and refusals, and peak memory per dtype. About 45 minutes on 2 cores; run it on a quiet machine.
#   bash bench/cpu_class.sh [RESULTS_FILE]         (default: cpu-class-<date>.md)
# QUICK=1 keeps to the seed presets small and base, float32 alone, and the dtype auto would choose
# (for a CPU without native bf16, or one held to AVX2: ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2).
set -uo pipefail
cd "$(dirname "$0")/.."
results=${1:-cpu-class-$(date +%F).md}
python=${PYTHON:-python3}
export PYTHONPATH=$PWD CUDA_VISIBLE_DEVICES=
section() { printf '\n### %s\n\n' "$1" | tee -a "$results"; }
{ echo "## $(date +%F): $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs), $(nproc) CPUs"
  echo
  echo "native bf16 flags: $(grep -o -w 'amx_bf16\|avx512_bf16' /proc/cpuinfo | sort -u | tr '\n' ' ')"
  echo "torch kernels: $("$python" -c 'import torch; print(torch.__version__, torch.backends.cpu.get_cpu_capability())')" \
       "${ONEDNN_MAX_CPU_ISA:+(oneDNN held to $ONEDNN_MAX_CPU_ISA)}"; } | tee "$results"
section "--dtype auto's choice"
VIT_EXTRACT_CACHE_DIR=$(mktemp -d) "$python" -c '
from vitcore.system.calibrate import choose_cpu_dtype
for width in (384, 768, 1024):
    print(f"- width {width}: {choose_cpu_dtype(width).reason}")' | tee -a "$results"
section "Seed presets against the matrix-product ceiling (bench/cpu_ceiling.py)"
if [ -n "${QUICK:-}" ]; then
  "$python" bench/cpu_ceiling.py --presets small,base --compile small,base --dtypes float32 --seconds 5 | tee -a "$results"
  exit 0
fi
"$python" bench/cpu_ceiling.py --presets small,base,large --compile small,base --seconds 5 | tee -a "$results"
section "Qwen-VL shapes against transformers' towers (bench/qwen_cpu.py)"
"$python" bench/qwen_cpu.py --shapes qwen3-2b,qwen2.5-3b,qwen2-2b --dtypes float32,bfloat16 | tee -a "$results"
section "The run against its work-conserving bound (bench/bound.py)"
"$python" bench/bound.py --images 192 --rounds 3 | tee -a "$results"
section "Start-up and refusals (bench/startup.py)"
"$python" bench/startup.py 2>/dev/null | tee -a "$results"
section "Peak memory per preset and dtype (bench/throughput.py)"
"$python" bench/throughput.py --device cpu --presets small,base,large --dtypes float32,bfloat16 \
  --skip encoder,e2e,startup 2>/dev/null | tee -a "$results"
