"""The "xla" backend: `flash_jax.reference` in float32 (O(T*S) memory)."""

from __future__ import annotations

import jax

from flash_jax import reference
from flash_jax.config import AttentionConfig

NAME = "xla"


def check_supported(config: AttentionConfig, query, key, value) -> None:
  """The reference takes every valid call."""
  del config, query, key, value


def _attention(config: AttentionConfig, q_lengths, kv_lengths):
  return lambda q, k, v: reference.attention(
      q, k, v, mask_spec=config.mask, scale=config.scale,
      q_lengths=q_lengths, kv_lengths=kv_lengths)


def forward(config: AttentionConfig, query, key, value, q_lengths, kv_lengths):
  """Returns ``(out, lse)``."""
  return _attention(config, q_lengths, kv_lengths)(query, key, value)


def backward(config: AttentionConfig, query, key, value, q_lengths,
             kv_lengths, out, lse, dout, dlse):
  """Differentiates the reference (recomputing its forward)."""
  del out, lse
  _, vjp = jax.vjp(_attention(config, q_lengths, kv_lengths), query, key,
                   value)
  return vjp((dout, dlse))
