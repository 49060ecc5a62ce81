"""Shared pytest setup: fresh random inputs per test, reproducible by seed."""

from __future__ import annotations

import os
import random
import zlib

import jax
import pytest

_SEED_VARIABLE = "FLASH_JAX_TEST_SEED"


def pytest_configure(config):
  """Draws this run's base seed once, in the controlling process.

  Every run draws fresh inputs; FLASH_JAX_TEST_SEED replays one. The seed is
  put in the environment before pytest-xdist starts its workers, so they all
  use the seed the header prints.
  """
  del config
  if _SEED_VARIABLE not in os.environ:
    os.environ[_SEED_VARIABLE] = str(random.SystemRandom().randrange(2**31))


_SHARD_VARIABLE = "FLASH_JAX_TEST_SHARD"


def pytest_collection_modifyitems(config, items):
  """FLASH_JAX_TEST_SHARD=i/n keeps a stable 1/n of the tests (shard i,
  from 0, by a hash of each test id), so a GPU run too long for one call
  splits into calls that together run every test exactly once."""
  shard = os.environ.get(_SHARD_VARIABLE)
  if not shard:
    return
  index, _, count = shard.partition("/")
  if not (index.isdigit() and count.isdigit()) or not 0 <= int(index) < int(
      count):
    raise pytest.UsageError(f"{_SHARD_VARIABLE}={shard}: need 0 <= i < n")
  index, count = int(index), int(count)
  keep, drop = [], []
  for item in items:
    (keep if zlib.crc32(item.nodeid.encode()) % count == index
     else drop).append(item)
  items[:] = keep
  config.hook.pytest_deselected(items=drop)


def base_seed() -> int:
  return int(os.environ[_SEED_VARIABLE])


def pytest_report_header(config):
  del config
  return [f"flash_jax: {_SEED_VARIABLE}={base_seed()} "
          f"backend={jax.default_backend()} devices={jax.devices()}"]


@pytest.fixture
def rng(request) -> jax.Array:
  """A PRNG key unique to this test and this run's base seed."""
  test_id = zlib.crc32(request.node.nodeid.encode())
  return jax.random.key((base_seed() ^ test_id) % (2**31))
