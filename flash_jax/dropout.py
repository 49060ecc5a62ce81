"""Attention dropout from a counter-based hash (Philox-4x32-10).

The keep decision of element ``(b, h, i, j)`` is a pure function of the
seed and those four indices, computed with uint32 operations only, so a
kernel can regenerate it tile by tile in the backward (it is never stored)
and `keep_mask` rebuilds it bit for bit outside any kernel.

Contract: one Philox call serves four neighbouring keys,
``words = philox4x32_10(counter=(j // 4, i, h, b), key=seed)``, and key
``j`` takes ``words[j % 4]``; the element is kept iff that word is
``>= threshold(rate)``. With broadcast dropout (one mask for every batch row
and head) ``b = h = 0``. Using all four output words makes the hash a
quarter of the integer work of one call per element; kernels tile keys in
multiples of four, so a tile computes ``[rows, width / 4]`` calls and
interleaves the words (`keep_tile`).

Philox: Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as
1, 2, 3" (SC 2011).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

_M0, _M1 = 0xD2511F53, 0xCD9E8D57   # round multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85   # key schedule (golden ratio, sqrt(3)-1)
ROUNDS = 10
KEYS_PER_CALL = 4                   # one Philox output word per key


def _u32(x):
  return jnp.asarray(x, jnp.uint32)


def mulhi_emulated(a: int, b):
  """The high 32 bits of ``a * b`` with uint32 ops only.

  Splitting into 16-bit halves keeps every partial product below 2**32, so
  it runs anywhere (CPU, interpret mode) without 64-bit integers. Kernels
  on a GPU pass a one-instruction ``mul.hi.u32`` instead.
  """
  b = _u32(b)
  mask16 = _u32(0xFFFF)
  a_lo, a_hi = _u32(a & 0xFFFF), _u32(a >> 16)
  b_lo, b_hi = b & mask16, b >> 16
  ll, lh, hl, hh = a_lo * b_lo, a_lo * b_hi, a_hi * b_lo, a_hi * b_hi
  mid = (ll >> 16) + (lh & mask16) + (hl & mask16)
  return hh + (lh >> 16) + (hl >> 16) + (mid >> 16)


MulHi = Callable[[int, jax.Array], jax.Array]


def philox4x32(counter, key, rounds: int = ROUNDS,
               mulhi: MulHi = mulhi_emulated):
  """Philox-4x32 of a 4-word counter under a 2-word key (uint32 arrays that
  broadcast together). Returns the four output words.

  ``mulhi(constant, x)`` gives the high half of a 32x32-bit product; any
  exact implementation gives the same bits.
  """
  c0, c1, c2, c3 = (_u32(c) for c in counter)
  k0, k1 = (_u32(k) for k in key)
  for _ in range(rounds):
    hi0, lo0 = mulhi(_M0, c0), _u32(_M0) * c0
    hi1, lo1 = mulhi(_M1, c2), _u32(_M1) * c2
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
  """Keep decisions for broadcasting index arrays, one element at a time
  (the reference form: it computes all four words and picks one)."""
  kv_idx = _u32(kv_idx)
  words = philox4x32((kv_idx >> 2, q_idx, head, batch), (seed[0], seed[1]))
  lane = kv_idx & _u32(KEYS_PER_CALL - 1)
  word = jnp.where(lane == 0, words[0],
                   jnp.where(lane == 1, words[1],
                             jnp.where(lane == 2, words[2], words[3])))
  return word >= _u32(threshold(rate))


def interleave_words(words):
  """``[rows, n]`` words ``(w0, w1, w2, w3)`` -> ``[rows, 4n]`` with column
  ``4m + r`` from ``w_r[:, m]``, built from two-way stacks on the last axis
  (the only interleave Pallas' Triton lowering has: ``tt.join``)."""
  w0, w1, w2, w3 = words
  rows, n = w0.shape
  # [m, c, a] = w_{2c + a}: the reshape puts it at column 4m + 2c + a.
  evens_odds = jnp.stack([jnp.stack([w0, w2], axis=-1),
                          jnp.stack([w1, w3], axis=-1)], axis=-1)
  return evens_odds.reshape(rows, KEYS_PER_CALL * n)


def keep_tile(seed, rate: float, batch, head, q_idx, kv_start, width: int,
              mulhi: MulHi = mulhi_emulated):
  """``[len(q_idx), width]`` keep decisions for the keys ``kv_start +
  arange(width)`` (the in-kernel form: one Philox call per four keys).

  ``kv_start`` and ``width`` must be multiples of four (kernel tiles are).
  """
  if width % KEYS_PER_CALL:
    raise ValueError(f"tile width {width} is not a multiple of "
                     f"{KEYS_PER_CALL}")
  if isinstance(kv_start, int) and kv_start % KEYS_PER_CALL:
    # (A traced start is the kernel's block_kv * block: a multiple of 16.)
    raise ValueError(f"tile start {kv_start} is not a multiple of "
                     f"{KEYS_PER_CALL}")
  rows = q_idx.shape[0]
  calls = width // KEYS_PER_CALL
  shape = (rows, calls)
  group = (_u32(kv_start) >> 2) + jnp.arange(calls, dtype=jnp.uint32)
  counter = (jnp.broadcast_to(group[None, :], shape),
             jnp.broadcast_to(_u32(q_idx)[:, None], shape),
             jnp.broadcast_to(_u32(head), shape),
             jnp.broadcast_to(_u32(batch), shape))
  words = philox4x32(counter, (seed[0], seed[1]), mulhi=mulhi)
  return interleave_words(words) >= _u32(threshold(rate))


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
