#!/usr/bin/env bash
# Runs the test suite (Pallas kernels in interpret mode on a CPU machine,
# compiled on a GPU). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
set -euo pipefail
# Several pytest workers share a GPU: none may preallocate most of its memory.
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
workers="${FLASH_JAX_TEST_WORKERS:-auto}"
exec python -m pytest tests -q -n "$workers" "$@"
