"""Shared pytest setup: fresh random inputs per test, reproducible by seed."""

from __future__ import annotations

import os
import random
import zlib

import jax
import pytest

# Every run draws fresh inputs; set FLASH_JAX_TEST_SEED to replay one.
BASE_SEED = int(os.environ.get("FLASH_JAX_TEST_SEED",
                               random.SystemRandom().randrange(2**31)))


def pytest_report_header(config):
  del config
  return [f"flash_jax: FLASH_JAX_TEST_SEED={BASE_SEED} "
          f"backend={jax.default_backend()} devices={jax.devices()}"]


@pytest.fixture
def rng(request) -> jax.Array:
  """A PRNG key unique to this test and this run's base seed."""
  test_id = zlib.crc32(request.node.nodeid.encode())
  return jax.random.key((BASE_SEED ^ test_id) % (2**31))
