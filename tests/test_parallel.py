"""Parallel execution on 4 CPU devices: pmap, shard_map, jit + NamedSharding.

Each test runs ``tests/parallel_checks.py`` (or the data-parallel example)
in a fresh Python process with ``--xla_force_host_platform_device_count=4``.
XLA reads that flag once, when jax initialises its backends, and a pytest
process cannot promise it has not done so before this file is imported:
conftest.py imports jax and its report header calls ``jax.devices()``, and
a pytest-xdist worker may collect (and initialise jax in) other test files
first. A subprocess gets its 4 devices whatever the run order, ``-n`` or
``-k``, and leaves this process alone.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHECKS = ROOT / "tests" / "parallel_checks.py"
EXAMPLE = ROOT / "examples" / "data_parallel.py"
TRAIN_LM = ROOT / "examples" / "train_lm.py"
DEVICE_FLAG = "--xla_force_host_platform_device_count=4"


def _run(*args: str, timeout: int = 300) -> str:
  """Runs a script on 4 CPU devices; fails the test with its output."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {DEVICE_FLAG}",
             PYTHONPATH=os.pathsep.join(
                 p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
  result = subprocess.run([sys.executable, *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
  output = result.stdout + result.stderr
  if result.returncode != 0:
    pytest.fail(f"{' '.join(args)} failed:\n{output[-6000:]}", pytrace=False)
  return output


@pytest.mark.parametrize("implementation", ["xla", "pallas_triton"])
def test_pmap_data_parallel_step_matches_single_device(implementation):
  """pmap + pmean over gradients == one device on the concatenated batch."""
  assert "ok: pmap" in _run(str(CHECKS), "pmap", implementation)


def test_shard_map_batch_and_head_splits():
  """Pallas kernels inside shard_map(check_vma=True): batch, GQA heads, and
  MQA kv that do not vary over the head axis; forward, lse and gradients
  equal the unsharded ones."""
  assert "ok: shard_map" in _run(str(CHECKS), "shard_map", "pallas_triton")


@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
def test_jit_named_sharding_keeps_shards(axis_type):
  """Batch- and head-sharded inputs under jit: no all-gather in the compiled
  forward+backward, results keep the input sharding and equal the unsharded
  ones; sequence-sharded inputs are gathered and still exact. Then the split
  rules for bias, mask, segment ids, lengths, dropout and mask_fn."""
  output = _run(str(CHECKS), "jit", axis_type)
  assert "ok: jit" in output and "ok: rules" in output


def test_data_parallel_example_runs():
  """examples/data_parallel.py trains on 4 devices without an all-gather."""
  output = _run(str(EXAMPLE), "--steps", "12")
  assert "'all-gather': 0" in output, output


def test_training_script_runs_data_parallel():
  """examples/train_lm.py --data-parallel: the batch split over 4 devices
  (an MQA model, the kernel in interpret mode) trains like the XLA
  reference split the same way."""
  output = _run(str(TRAIN_LM), "--data-parallel", "--compare-xla",
                "--steps", "4", "--dim", "32", "--depth", "1", "--heads", "2",
                "--kv-heads", "1", "--seq-len", "16", "--batch", "4",
                "--dtype", "float32", "--compare-steps", "4")
  assert output.count("data-parallel over 4 devices") == 2, output
  assert "agree (tolerance 0.001)" in output, output
