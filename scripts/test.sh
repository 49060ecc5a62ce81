#!/usr/bin/env bash
# Runs the test suite (Pallas kernels in interpret mode on a CPU machine,
# compiled on a GPU). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
set -euo pipefail
workers="${FLASH_JAX_TEST_WORKERS:-auto}"
exec python -m pytest tests -q -n "$workers" "$@"
