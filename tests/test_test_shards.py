"""FLASH_JAX_TEST_SHARD splits a run into calls that together collect every
test exactly once (conftest.py), for GPU runs longer than one call."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _collected(shard: str | None) -> list[str]:
  env = dict(os.environ)
  env.pop("FLASH_JAX_TEST_SHARD", None)
  if shard:
    env["FLASH_JAX_TEST_SHARD"] = shard
  result = subprocess.run(
      [sys.executable, "-m", "pytest", "tests/test_masks.py", "--collect-only",
       "-q", "-p", "no:cacheprovider"], cwd=ROOT, env=env,
      capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stdout + result.stderr
  return [line for line in result.stdout.splitlines() if "::" in line]


def test_shards_partition_the_tests():
  every = _collected(None)
  shards = [_collected(f"{i}/3") for i in range(3)]
  assert all(shards), "a shard of a non-trivial file came out empty"
  joined = [test for shard in shards for test in shard]
  assert sorted(joined) == sorted(every)
