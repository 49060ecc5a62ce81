#!/usr/bin/env bash
# Nsight Compute's throughput, pipe and stall sections on the Hopper
# forward of each case (one launch each; `benchmarks/hopper_tile_probe.py
# --once CASE`), for a GPU machine with ncu on its PATH:
#
#   bash scripts/ncu_forward.sh 4096/64 4096/64@cudnn 4096/256 ...   > log
#
# A case ``CASE@cudnn`` profiles cuDNN's kernel for the same call instead,
# ``CASE:TILE`` the Hopper forward at a `hopper_tile_probe.py` tile (e.g.
# ``4096/64:128x2xPxW3``).
# Pipe metrics are asked for only where this ncu knows their names (the
# per-pipe names differ between ncu versions and chips), so an unknown name
# cannot fail the whole profile. The clocks are left as they are.
set -uo pipefail
cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=. PYTHONUNBUFFERED=1
python="${FLASH_JAX_PYTHON:-python3}"
known=$(ncu --query-metrics --chip gh100 2>/dev/null | awk '{print $1}')
metrics=$(grep -E '^sm__(inst_executed_pipe_(xu|fma|fmaheavy|fmalite|alu|fp16|uniform|lsu|adu)|pipe_(tensor_op_gmma|tensor_op_hmma|shared|xu|fma|alu)_cycles_active)$' <<<"$known" \
  | sed 's/$/.avg.pct_of_peak_sustained_active/' | sort -u | paste -sd, -)
echo "pipe metrics: ${metrics:-none known}"
for case in "$@"; do
  echo "=== case $case"
  impl=flash_jax_mosaic kernels=regex:mosaic tile=()
  if [[ "$case" == *@cudnn ]]; then
    case="${case%@cudnn}" impl=cudnn kernels='regex:sdpa|fmha|flash|attn|cudnn'
  elif [[ "$case" == *:* ]]; then
    tile=(--tile "${case#*:}") case="${case%%:*}"
  fi
  ncu --clock-control none -k "$kernels" --launch-skip 1 --launch-count 1 \
    --section SpeedOfLight --section ComputeWorkloadAnalysis \
    --section WarpStateStats --section SchedulerStats \
    --section InstructionStats \
    ${metrics:+--metrics "$metrics"} \
    "$python" benchmarks/hopper_tile_probe.py --once "$case" \
    --implementation "$impl" "${tile[@]}" 2>&1 \
    | grep -v -E '^\s*(----|$)'
done
