#!/usr/bin/env bash
# The GPU verification run: the whole test suite with compiled kernels, then
# a benchmark row set, in one call. Meant for a GPU machine whose python3
# already has jax (set FLASH_JAX_PYTHON otherwise). Logs go to $OUT.
#
#   bash scripts/gpu_check.sh [benchmark-set ...]      (default: foundation)
#
# FLASH_JAX_TESTS picks test paths (default: tests) and FLASH_JAX_PYTEST_ARGS
# adds pytest arguments (e.g. "-n 12 -x").
set -uo pipefail
cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=. PYTHONUNBUFFERED=1
out="${OUT:-/tmp/flash_jax_gpu}"
mkdir -p "$out"
python="${FLASH_JAX_PYTHON:-python3}"
sets=("$@")
[[ ${#sets[@]} -eq 0 ]] && sets=(foundation)

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$python" -c "import jax, sys; print('python', sys.version.split()[0], 'jax', jax.__version__, jax.devices())"
} 2>&1 | tee "$out/environment.txt"

# shellcheck disable=SC2086
"$python" -m pytest ${FLASH_JAX_TESTS:-tests} -q -p no:cacheprovider -p no:benchmark --durations=10 \
  ${FLASH_JAX_PYTEST_ARGS:-} \
  2>&1 | tee "$out/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}

bench_rc=0
for set in "${sets[@]}"; do
  "$python" benchmarks/run.py "$set" --out "$out" 2>&1 | tee "$out/bench_$set.log"
  rc=${PIPESTATUS[0]}
  [[ $rc -ne 0 ]] && bench_rc=$rc
done

echo "== summary: tests rc=$tests_rc ($(tail -n 1 "$out/gpu_tests.log")), benchmarks rc=$bench_rc"
[[ $tests_rc -eq 0 && $bench_rc -eq 0 ]]
