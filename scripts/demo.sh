#!/usr/bin/env bash
# Runs the demo: checks the kernel against the reference and, on a GPU,
# prints its speed next to XLA and cuDNN.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
set -euo pipefail
exec python examples/demo.py "$@"
