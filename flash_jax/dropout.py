"""Attention dropout from a counter-based hash (Philox-4x32-10).

The keep decision of element ``(b, h, i, j)`` is a pure function of the
seed and those four indices, computed with uint32 operations only, so a
kernel can regenerate it tile by tile in the backward (it is never stored)
and `keep_mask` rebuilds it bit for bit outside any kernel.

Contract: one Philox call serves sixteen neighbouring keys.
``words = philox4x32_10(counter=(j // 16, i, h, b), key=seed)``; read as
sixteen little-endian bytes (byte ``k`` of word ``w`` is byte ``4w + k``),
key ``j`` takes byte ``j % 16``, and the element is kept iff that byte is
``>= threshold(rate)``. With broadcast dropout (one mask for every batch row
and head) ``b = h = 0``.

Eight-bit draws are FlashAttention's choice: they make the hash a sixteenth
of the integer work of one call per element, which matters because ten
Philox rounds cost about as much as the attention's matrix products. The
price is resolution: the drop probability is ``rate`` rounded to a multiple
of 1/256 (`drop_probability`), and kept values are scaled by
``1 / (1 - drop_probability(rate))`` (`keep_scale`) so that the expectation
is exact. Rates below 1/512 or from 1 - 1/512 up are rejected rather than
silently rounded to no dropout or to dropping everything.

Kernels tile keys in multiples of sixteen, so a tile computes ``[rows,
width / 16]`` calls and interleaves the bytes (`keep_tile`).

Philox: Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as
1, 2, 3" (SC 2011).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

_M0, _M1 = 0xD2511F53, 0xCD9E8D57   # round multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85   # key schedule (golden ratio, sqrt(3)-1)
ROUNDS = 10
KEYS_PER_CALL = 16                  # four words of four 8-bit draws
LEVELS = 256                        # values of one 8-bit draw


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
  """Draws (bytes) below this are dropped: ``P(drop) = threshold / 256``.

  Raises:
    ValueError: for a rate outside [0, 1), or one the 8-bit draws cannot
      represent (it would round to 0 or to 256).
  """
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
  levels = math.floor(rate * LEVELS + 0.5)   # round half up
  if rate > 0 and not 1 <= levels < LEVELS:
    raise ValueError(
        f"dropout rate {rate} rounds to {levels}/{LEVELS}: the dropout hash "
        f"draws 8-bit thresholds, so a nonzero rate must lie in "
        f"[1/{2 * LEVELS}, 1 - 1/{2 * LEVELS})")
  return levels


def drop_probability(rate: float) -> float:
  """The probability with which ``rate`` drops an element: ``rate`` rounded
  to a multiple of 1/256."""
  return threshold(rate) / LEVELS


def keep_scale(rate: float) -> float:
  """The factor kept probabilities are multiplied by:
  ``1 / (1 - drop_probability(rate))``, which keeps the expectation exact."""
  return LEVELS / (LEVELS - threshold(rate))


def keep_from_indices(seed, rate: float, batch, head, q_idx, kv_idx):
  """Keep decisions for broadcasting index arrays, one element at a time
  (the reference form: it computes all four words and picks a byte)."""
  kv_idx = _u32(kv_idx)
  words = philox4x32((kv_idx >> 4, q_idx, head, batch), (seed[0], seed[1]))
  lane = (kv_idx >> 2) & _u32(3)
  word = jnp.where(lane == 0, words[0],
                   jnp.where(lane == 1, words[1],
                             jnp.where(lane == 2, words[2], words[3])))
  draw = (word >> ((kv_idx & _u32(3)) * _u32(8))) & _u32(0xFF)
  return draw >= _u32(threshold(rate))


def interleave(pieces):
  """``2**k`` arrays ``[rows, n]`` -> ``[rows, n * 2**k]`` whose column
  ``m * 2**k + r`` is ``pieces[r][:, m]``.

  Built from two-way stacks on the last axis (the only interleave Pallas'
  Triton lowering has: ``tt.join``): stacking the pieces of even and odd
  ``r`` puts the low bit of ``r`` on the last axis, and recursing on each
  half orders the higher bits before it, so one reshape finishes the job.
  """
  def nested(group):
    if len(group) == 1:
      return group[0]
    return jnp.stack([nested(group[0::2]), nested(group[1::2])], axis=-1)

  rows, n = pieces[0].shape
  return nested(list(pieces)).reshape(rows, n * len(pieces))


def keep_tile(seed, rate: float, batch, head, q_idx, kv_start, width: int,
              mulhi: MulHi = mulhi_emulated):
  """``[len(q_idx), width]`` keep decisions for the keys ``kv_start +
  arange(width)`` (the in-kernel form: one Philox call per sixteen keys).

  ``kv_start`` and ``width`` must be multiples of sixteen (kernel tiles
  are).
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
  group = (_u32(kv_start) >> 4) + jnp.arange(calls, dtype=jnp.uint32)
  counter = (jnp.broadcast_to(group[None, :], shape),
             jnp.broadcast_to(_u32(q_idx)[:, None], shape),
             jnp.broadcast_to(_u32(head), shape),
             jnp.broadcast_to(_u32(batch), shape))
  words = philox4x32(counter, (seed[0], seed[1]), mulhi=mulhi)
  # Interleave bytes, not words or booleans: a quarter of the registers
  # and shared memory of words if the interleave converts layouts.
  draws = [(word >> (8 * k)).astype(jnp.uint8)
           for word in words for k in range(4)]
  return interleave(draws) >= jnp.uint8(threshold(rate))


def keep_mask(rng, rate: float, shape: tuple[int, int, int, int], *,
              broadcast: bool = False) -> jax.Array:
  """The exact dropout keep mask flash_jax applies for ``dropout_rng``.

  Args:
    rng: the JAX PRNG key passed as ``dropout_rng``.
    rate: the dropout rate in [0, 1) (see `threshold` for the resolution).
    shape: ``(B, N, T, S)``.
    broadcast: one mask for every batch row and head (Flax's
      ``broadcast_dropout``); the result then has shape ``(1, 1, T, S)``.

  Returns:
    bool ``[B, N, T, S]``: True where a probability is kept (and scaled by
    `keep_scale` ``(rate)``).
  """
  threshold(rate)   # validates
  batch, heads, q_seq, kv_seq = shape
  if broadcast:
    batch = heads = 1
  b = jnp.arange(batch, dtype=jnp.uint32)[:, None, None, None]
  h = jnp.arange(heads, dtype=jnp.uint32)[None, :, None, None]
  i = jnp.arange(q_seq, dtype=jnp.uint32)[None, None, :, None]
  j = jnp.arange(kv_seq, dtype=jnp.uint32)[None, None, None, :]
  return keep_from_indices(seed_words(rng), rate, b, h, i, j)
