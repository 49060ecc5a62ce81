"""Runs the shared attention tests for every implementation."""

import flash_jax
import pytest
from attention_base import AttentionTestBase


class TestPallasTriton(AttentionTestBase):
  """Pallas Triton kernels: interpret mode on CPU, compiled on a GPU."""

  implementation = "pallas_triton"


class TestXla(AttentionTestBase):
  """The XLA reference backend."""

  implementation = "xla"


@pytest.mark.skipif(
    flash_jax.platform.compute_capability() is None
    or flash_jax.platform.compute_capability()[0] != 9,
    reason="Mosaic GPU kernels run on sm90 only (no interpret mode for "
    "wgmma); CI lowers them (test_lowering.py) and tests their schedule "
    "(test_mosaic_gpu.py)")
class TestPallasMosaicGpu(AttentionTestBase):
  """The Hopper backend, falling through to Triton for what it refuses."""

  implementation = ("pallas_mosaic_gpu", "pallas_triton")
  small_tiles = None   # its tiles are fixed (BlockSizes would send calls to Triton)

  def test_supported_calls_run_the_mosaic_kernel(self, rng):
    import jax
    import jax.numpy as jnp
    q = jax.random.normal(rng, (2, 1000, 4, 128), jnp.bfloat16)
    text = jax.jit(lambda q: self.attend(q, q, q, is_causal=True)).lower(
        q).as_text()
    assert "mosaic_gpu" in text
