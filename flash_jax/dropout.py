"""Attention dropout from a counter-based hash (Philox-4x32-10).

The keep decision of element ``(b, h, i, j)`` is a pure function of the
seed and those four indices, computed with uint32 operations only, so a
kernel can regenerate it tile by tile in the backward (it is never stored)
and `keep_mask` rebuilds it bit for bit outside any kernel.

Contract: ``word = philox4x32_10(counter=(j, i, h, b), key=seed)[0]``;
the element is kept iff ``word >= threshold(rate)``. With broadcast dropout
(one mask for every batch row and head) ``b = h = 0``.

Philox: Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as
1, 2, 3" (SC 2011).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_M0, _M1 = 0xD2511F53, 0xCD9E8D57   # round multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85   # key schedule (golden ratio, sqrt(3)-1)
ROUNDS = 10


def _u32(x):
  return jnp.asarray(x, jnp.uint32)


def _mulhilo(a: int, b):
  """(high, low) 32-bit halves of ``a * b`` with uint32 ops only.

  Splitting into 16-bit halves keeps every partial product below 2**32, so
  the same code runs in a GPU kernel without 64-bit integers.
  """
  b = _u32(b)
  mask16 = _u32(0xFFFF)
  a_lo, a_hi = _u32(a & 0xFFFF), _u32(a >> 16)
  b_lo, b_hi = b & mask16, b >> 16
  ll, lh, hl, hh = a_lo * b_lo, a_lo * b_hi, a_hi * b_lo, a_hi * b_hi
  mid = (ll >> 16) + (lh & mask16) + (hl & mask16)
  high = hh + (lh >> 16) + (hl >> 16) + (mid >> 16)
  return high, _u32(a) * b


def philox4x32(counter, key, rounds: int = ROUNDS):
  """Philox-4x32 of a 4-word counter under a 2-word key (uint32 arrays that
  broadcast together). Returns the four output words."""
  c0, c1, c2, c3 = (_u32(c) for c in counter)
  k0, k1 = (_u32(k) for k in key)
  for _ in range(rounds):
    hi0, lo0 = _mulhilo(_M0, c0)
    hi1, lo1 = _mulhilo(_M1, c2)
    c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    k0, k1 = k0 + _u32(_W0), k1 + _u32(_W1)
  return c0, c1, c2, c3


def seed_words(rng) -> jax.Array:
  """The two uint32 key words a JAX PRNG key gives the hash."""
  return jax.random.bits(rng, (2,), jnp.uint32)


def threshold(rate: float) -> int:
  """Words below this are dropped: ``P(drop) = threshold / 2**32``."""
  return min(int(round(rate * 2.0**32)), 2**32 - 1)


def keep_from_indices(seed, rate: float, batch, head, q_idx, kv_idx):
  """Keep decisions for broadcasting index arrays (the in-kernel form)."""
  word = philox4x32((kv_idx, q_idx, head, batch), (seed[0], seed[1]))[0]
  return word >= _u32(threshold(rate))


def keep_mask(rng, rate: float, shape: tuple[int, int, int, int], *,
              broadcast: bool = False) -> jax.Array:
  """The exact dropout keep mask flash_jax applies for ``dropout_rng``.

  Args:
    rng: the JAX PRNG key passed as ``dropout_rng``.
    rate: the dropout rate in [0, 1).
    shape: ``(B, N, T, S)``.
    broadcast: one mask for every batch row and head (Flax's
      ``broadcast_dropout``); the result then has shape ``(1, 1, T, S)``.

  Returns:
    bool ``[B, N, T, S]``: True where a probability is kept (and scaled by
    ``1 / (1 - rate)``).
  """
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
  batch, heads, q_seq, kv_seq = shape
  if broadcast:
    batch = heads = 1
  b = jnp.arange(batch, dtype=jnp.uint32)[:, None, None, None]
  h = jnp.arange(heads, dtype=jnp.uint32)[None, :, None, None]
  i = jnp.arange(q_seq, dtype=jnp.uint32)[None, None, :, None]
  j = jnp.arange(kv_seq, dtype=jnp.uint32)[None, None, None, :]
  return keep_from_indices(seed_words(rng), rate, b, h, i, j)
