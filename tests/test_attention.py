"""Runs the shared attention tests for every implementation."""

from attention_base import AttentionTestBase


class TestPallasTriton(AttentionTestBase):
  """Pallas Triton kernels: interpret mode on CPU, compiled on a GPU."""

  implementation = "pallas_triton"


class TestXla(AttentionTestBase):
  """The XLA reference backend."""

  implementation = "xla"
