"""The "xla" backend: `flash_jax.reference` in float32 (O(T*S) memory).

It implements every feature, so it is the fall-back for anything a kernel
backend does not take yet.
"""

from __future__ import annotations

import jax

from flash_jax import reference
from flash_jax.config import AttentionConfig

NAME = "xla"


def check_supported(config: AttentionConfig, query, key, value, bias,
                    arrays) -> None:
  """The reference takes every valid call."""
  del config, query, key, value, bias, arrays


def forward(config: AttentionConfig, query, key, value, bias, arrays):
  """Returns ``(out, lse)``."""
  return reference.attention(query, key, value, bias, arrays, config=config)


def backward(config: AttentionConfig, query, key, value, bias, arrays, out,
             lse, dout, dlse):
  """Differentiates the reference (recomputing its forward); returns
  ``(dq, dk, dv, dbias)`` with dbias None when there is no bias."""
  del out, lse
  attend = lambda q, k, v, b: reference.attention(q, k, v, b, arrays,
                                                  config=config)
  _, vjp = jax.vjp(attend, query, key, value, bias)
  return vjp((dout, dlse))
