#!/usr/bin/env bash
# The GPU verification run, in one call: the test suite with compiled
# kernels, optionally the autotuner, then benchmark sets. Meant for a GPU
# machine whose python3 already has jax (set FLASH_JAX_PYTHON otherwise).
#
#   bash scripts/gpu_check.sh [benchmark-set[@START:STOP] ...]  (default: foundation)
#
# A set named with @START:STOP measures only that slice of its rows.
#
# Environment:
#   FLASH_JAX_TESTS        test paths (default: tests); "none" skips tests
#   FLASH_JAX_PYTEST_ARGS  extra pytest arguments (e.g. "-n 14 -x")
#   FLASH_JAX_TEST_FILTER  if set, pytest's -k expression (may hold spaces)
#   FLASH_JAX_TEST_SHARD   i/n: run a stable 1/n of the tests (tests/conftest.py)
#   FLASH_JAX_TEST_SECONDS if set, interrupts the tests after this many
#                          seconds (SIGINT: pytest still prints its summary)
#   FLASH_JAX_AUTOTUNE     if set, arguments for benchmarks/autotune.py
#                          (e.g. "--head-dims 128"), run before benchmarks
#   FLASH_JAX_TRAIN        if set, runs examples/train_lm.py --compare-xla,
#                          then with --remat, adding these arguments (use
#                          "--steps 200" or similar; "1" adds none)
#   FLASH_JAX_BENCH_IMPLEMENTATIONS
#                          if set, benchmarks/run.py's --implementations
#                          for every set (comma-separated, e.g.
#                          "flash_jax_mosaic,flash_jax,cudnn")
#   FLASH_JAX_DEADLINE     if set, seconds after this script's start by
#                          which benchmarks stop: no set starts and a
#                          running one is interrupted (rows already
#                          measured are kept)
#   OUT                    where results go (default /tmp/flash_jax_gpu)
#
# Everything is written under $OUT/run/ and also packed into
# $OUT/results.tar.gz (the device tool returns few files), with the summary
# in $OUT/summary.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=. PYTHONUNBUFFERED=1
out="${OUT:-/tmp/flash_jax_gpu}"
run="$out/run"
mkdir -p "$run"
python="${FLASH_JAX_PYTHON:-python3}"
sets=("$@")
[[ ${#sets[@]} -eq 0 ]] && sets=(foundation)

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  git rev-parse HEAD 2>/dev/null || true
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$python" -c "import jax, sys; print('python', sys.version.split()[0], 'jax', jax.__version__, jax.devices())"
} 2>&1 | tee "$run/environment.txt"

tests_rc=0
if [[ "${FLASH_JAX_TESTS:-tests}" != none ]]; then
  limit=()
  [[ -n "${FLASH_JAX_TEST_SECONDS:-}" ]] && limit=(timeout -s INT -k 30 "$FLASH_JAX_TEST_SECONDS")
  filter=()
  [[ -n "${FLASH_JAX_TEST_FILTER:-}" ]] && filter=(-k "$FLASH_JAX_TEST_FILTER")
  # shellcheck disable=SC2086
  "${limit[@]}" "$python" -m pytest ${FLASH_JAX_TESTS:-tests} -q -p no:cacheprovider -p no:benchmark --durations=15 \
    --junitxml="$run/gpu_tests.xml" \
    ${FLASH_JAX_PYTEST_ARGS:-} "${filter[@]}" \
    2>&1 | tee "$run/gpu_tests.log"
  tests_rc=${PIPESTATUS[0]}
fi

tune_rc=0
if [[ -n "${FLASH_JAX_AUTOTUNE:-}" ]]; then
  # shellcheck disable=SC2086
  "$python" benchmarks/autotune.py $FLASH_JAX_AUTOTUNE --log "$run" 2>&1 | tee "$run/autotune.log"
  tune_rc=${PIPESTATUS[0]}
  cp flash_jax/backends/pallas_triton/tuned_configs.py "$run/" 2>/dev/null
fi

train_rc=0
if [[ -n "${FLASH_JAX_TRAIN:-}" ]]; then
  train_args="${FLASH_JAX_TRAIN}"
  [[ "$train_args" == 1 ]] && train_args=""
  # shellcheck disable=SC2086
  "$python" examples/train_lm.py --compare-xla $train_args 2>&1 | tee "$run/train_lm.log"
  train_rc=${PIPESTATUS[0]}
  # shellcheck disable=SC2086
  "$python" examples/train_lm.py --remat --compare-xla $train_args 2>&1 | tee "$run/train_lm_remat.log"
  rc=${PIPESTATUS[0]}
  [[ $rc -ne 0 ]] && train_rc=$rc
fi

bench_rc=0
for spec in "${sets[@]}"; do
  [[ "$spec" == none ]] && continue
  set_name="${spec%@*}"
  rows=":"
  [[ "$spec" == *@* ]] && rows="${spec#*@}"
  limit=()
  if [[ -n "${FLASH_JAX_DEADLINE:-}" ]]; then
    # Leave the kill grace (15 s) and the packing below before the deadline.
    left=$((FLASH_JAX_DEADLINE - SECONDS - 30))
    if (( left < 30 )); then
      echo "== deadline: skipping $spec" | tee -a "$run/skipped.txt"
      bench_rc=1
      continue
    fi
    limit=(timeout -s INT -k 15 "$left")
  fi
  implementations=()
  [[ -n "${FLASH_JAX_BENCH_IMPLEMENTATIONS:-}" ]] && \
    implementations=(--implementations "$FLASH_JAX_BENCH_IMPLEMENTATIONS")
  "${limit[@]}" "$python" benchmarks/run.py "$set_name" --rows "$rows" --out "$run" \
    "${implementations[@]}" 2>&1 | tee "$run/bench_${set_name}_${rows/:/-}.log"
  rc=${PIPESTATUS[0]}
  [[ $rc -ne 0 ]] && bench_rc=$rc
done

summary="tests rc=$tests_rc ($(tail -n 1 "$run/gpu_tests.log" 2>/dev/null)), autotune rc=$tune_rc, train rc=$train_rc, benchmarks rc=$bench_rc"
echo "== summary: $summary" | tee "$out/summary.txt"
tar -czf "$out/results.tar.gz" -C "$out" run
[[ $tests_rc -eq 0 && $tune_rc -eq 0 && $train_rc -eq 0 && $bench_rc -eq 0 ]]
