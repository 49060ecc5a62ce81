#!/usr/bin/env bash
# Creates (once) and activates .venv with a Python >= 3.12 and the pinned
# JAX. Source it: `source scripts/env.sh`. Set FLASH_JAX_PYTHON to choose
# the interpreter.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${FLASH_JAX_VENV:-$repo_root/.venv}"
jax_pin="jax==0.11.2 jaxlib==0.11.2"

find_python() {
  local candidates=()
  [[ -n "${FLASH_JAX_PYTHON:-}" ]] && candidates+=("$FLASH_JAX_PYTHON")
  candidates+=(python3.14 python3.13 python3.12 python3 python)
  # pyenv keeps other versions out of PATH; look there too.
  local pyenv_root="${PYENV_ROOT:-$HOME/.pyenv}"
  for p in "$pyenv_root"/versions/3.1[2-9]*/bin/python3 /usr/local/bin/python3.1[2-9]; do
    [[ -x "$p" ]] && candidates+=("$p")
  done
  for py in "${candidates[@]}"; do
    if command -v "$py" >/dev/null 2>&1 && \
       "$py" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      command -v "$py"; return 0
    fi
  done
  echo "flash_jax needs Python >= 3.12; none found (set FLASH_JAX_PYTHON)" >&2
  return 1
}

if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c 'import flash_jax, jax, pytest, xdist, optax, chex, matplotlib' >/dev/null 2>&1; then
  python="$(find_python)"
  echo "flash_jax: creating $venv with $python ($("$python" --version))" >&2
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  extras="test,examples,bench"
  # On a GPU machine the CUDA plugin comes too, so the kernels compile.
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    extras="$extras,cuda13"
  fi
  # shellcheck disable=SC2086
  "$venv/bin/python" -m pip install --quiet $jax_pin -e "$repo_root[$extras]"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"
export PYTHONPATH="$repo_root${PYTHONPATH:+:$PYTHONPATH}"
set +euo pipefail
