#!/usr/bin/env bash
# Nsight Compute's throughput, pipe and stall sections on the backward
# kernels of `benchmarks/backward_probe.py` rows (the second of its three
# calls: one launch of each kernel), for a GPU machine with ncu on its PATH:
#
#   bash scripts/ncu_backward.sh 4k 16k:3 16k@fused 16k@cudnn ...   > log
#
# ``ROW`` profiles the Hopper backend's deterministic backward (its dK/dV
# and dQ kernels, `pallas_mosaic_gpu.backward.KERNEL_NAMES`), ``ROW:N``
# the same with N-stage rings, ``ROW@fused`` the ``deterministic=False``
# kernel, ``ROW@cudnn`` cuDNN's backward kernels for the same call.
# Metrics as in `scripts/ncu_forward.sh`; the clocks are left as they are.
set -uo pipefail
cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=. PYTHONUNBUFFERED=1
python="${FLASH_JAX_PYTHON:-python3}"
known=$(ncu --query-metrics --chip gh100 2>/dev/null | awk '{print $1}')
metrics=$(grep -E '^sm__(inst_executed_pipe_(xu|fma|fmaheavy|fmalite|alu|fp16|uniform|lsu|adu)|pipe_(tensor_op_gmma|tensor_op_hmma|shared|xu|fma|alu)_cycles_active)$' <<<"$known" \
  | sed 's/$/.avg.pct_of_peak_sustained_active/' | sort -u | paste -sd, -)
echo "pipe metrics: ${metrics:-none known}"
for spec in "$@"; do
  echo "=== case $spec"
  part=backward kernels='regex:flash_jax_mosaic_(wide_)?(dkv|dq)' per_call=2
  stages=()
  row="$spec"
  if [[ "$row" == *@fused ]]; then
    row="${row%@fused}" part=fused kernels='regex:flash_jax_mosaic_(dkv_dq|wide_dkv|wide_dq)'
    # Head dim 256 runs the two wide kernels either way.
    [[ "$row" == h256* ]] || per_call=1
  elif [[ "$row" == *@cudnn ]]; then
    # cuDNN's backward kernel names (not its forward's); unchecked
    # against this cuDNN: an unmatched name profiles nothing.
    row="${row%@cudnn}" part=cudnn kernels='regex:(bprop|bwd|backward|dgrad)' per_call=1
  fi
  if [[ "$row" == *:* ]]; then
    stages=(--backward-stages "${row#*:}") row="${row%%:*}"
  fi
  ncu --clock-control none -k "$kernels" --launch-skip "$per_call" \
    --launch-count "$per_call" \
    --section SpeedOfLight --section ComputeWorkloadAnalysis \
    --section WarpStateStats --section SchedulerStats \
    --section InstructionStats \
    ${metrics:+--metrics "$metrics"} \
    "$python" benchmarks/backward_probe.py --once "$row" --part "$part" \
    "${stages[@]}" 2>&1 \
    | grep -v -E '^\s*(----|$)'
done
