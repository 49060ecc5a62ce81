"""Attention dropout from a counter-based hash (Philox-4x32, 7 rounds).

The keep decision of element ``(b, h, i, j)`` is a pure function of the
seed and those four indices, computed with uint32 operations only, so a
kernel can regenerate it tile by tile in the backward (it is never stored)
and `keep_mask` rebuilds it bit for bit outside any kernel.

Contract: one Philox call serves sixteen keys of a row, read as sixteen
little-endian bytes (byte ``t`` is bits ``8 (t % 4) ...`` of word ``t // 4``).
In each aligned group of 64 keys, key ``j = 64 g + 8 c + 2 q + e`` (``c`` in
0..7, ``q`` in 0..3, ``e`` in 0..1) takes byte ``2 c + e`` of
``philox4x32_7(counter=(4 g + q, i, h, b), key=seed)``, and the element is
kept iff that byte is ``>= threshold(rate)``. With broadcast dropout (one
mask for every batch row and head) ``b = h = 0``.

Why that order: it is the column pattern of a tensor-core accumulator tile
(thread quad ``q`` of a warp holds columns ``8 c + 2 q + {0, 1}``), so a
kernel can compute each call in the thread that applies its bytes, with no
data moving between threads. The plain order (key ``j`` takes byte
``j % 16`` of call ``j // 16``) needs the bytes of a call spread across a
row, a layout conversion that cost more than the hash: on an H100 at
p = 0.1 (untuned tiles) it measured +70% forward and forward+backward,
against +28% and +39% with this order (`benchmarks/dropout_probe.py`).

Eight-bit draws are FlashAttention's choice: they make the hash a sixteenth
of the integer work of one call per element, which matters because one
call per element costs about as much as the attention's matrix products. The
price is resolution: the drop probability is ``rate`` rounded to a multiple
of 1/256 (`drop_probability`), and kept values are scaled by
``1 / (1 - drop_probability(rate))`` (`keep_scale`) so that the expectation
is exact. Rates below 1/512 or from 1 - 1/512 up are rejected rather than
silently rounded to no dropout or to dropping everything.

Seven rounds, not Philox's customary ten, are FlashAttention-2's choice
too: Salmon et al. report Philox-4x32 passing TestU01's BigCrush from 7
rounds on and recommend 10 as a safety margin. Here the hash is most of
dropout's cost (it runs in the forward and in both backward kernels): on an
H100 at p = 0.1 (B=4 T=4096 N=16 H=128) 7 rounds cost +23% forward and +12%
forward+backward where 10 cost +28% and +17% (`benchmarks/dropout_probe.py`,
one run). `philox4x32` itself still defaults to the standard 10 rounds; the
tests check both rounds' published vectors.

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
ROUNDS = 10                         # Philox-4x32-10, the standard form
DROPOUT_ROUNDS = 7                  # the dropout contract (see above)
KEYS_PER_CALL = 16                  # four words of four 8-bit draws
GROUP = 64                          # keys of one call pattern (see above)
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
    raise ValueError(f"dropout_rate must be in [0, 1), got {rate}")
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


def draw_byte(words, byte):
  """Byte ``byte`` (0..15, little-endian) of the four words, as uint32
  (broadcasting: ``byte`` may vary per element)."""
  word = jnp.where(byte < 4, words[0],
                   jnp.where(byte < 8, words[1],
                             jnp.where(byte < 12, words[2], words[3])))
  return (word >> ((byte & _u32(3)) * _u32(8))) & _u32(0xFF)


def keep_from_indices(seed, rate: float, batch, head, q_idx, kv_idx, *,
                      rounds: int = DROPOUT_ROUNDS):
  """Keep decisions for broadcasting index arrays, one element at a time
  (the reference form of the contract above; ``rounds`` is for probes)."""
  kv_idx = _u32(kv_idx)
  column = kv_idx & _u32(GROUP - 1)
  call = (kv_idx >> 6) * _u32(4) + ((column & _u32(7)) >> 1)
  byte = (column >> 3) * _u32(2) + (column & _u32(1))
  words = philox4x32((call, q_idx, head, batch), (seed[0], seed[1]),
                     rounds=rounds)
  return draw_byte(words, byte) >= _u32(threshold(rate))


def keep_tile(seed, rate: float, batch, head, q_idx, kv_start, width: int,
              mulhi: MulHi = mulhi_emulated, *, rounds: int = DROPOUT_ROUNDS):
  """``[len(q_idx), width]`` keep decisions for the keys ``kv_start +
  arange(width)`` (the in-kernel form: one Philox call per sixteen keys).

  ``width`` must be 16 or 32 (a tile inside one 64-key group; ``kv_start``
  a multiple of it) or a multiple of 64 (``kv_start`` too). Kernel tiles
  are powers of two from 16 and start at multiples of their width.

  The tile is built as ``[rows, groups, chunks, 4, 2]`` (key ``64 g + 8 c
  + 2 q + e`` at ``[:, g, c, q, e]``) from calls of shape ``[rows, groups,
  1, 4, 1]`` broadcast over ``c`` and ``e``, which lets Triton lay the
  calls out like the accumulator tile they multiply and keep the expansion
  in registers (measured: the forward then costs little more than the hash
  alone, `benchmarks/dropout_probe.py`).
  """
  if not (width in (16, 32) or width % GROUP == 0):
    raise ValueError(f"tile width {width} must be 16, 32 or a multiple of "
                     f"{GROUP}")
  align = min(width, GROUP)
  if isinstance(kv_start, int) and kv_start % align:
    # (A traced start is the kernel's block_kv * block: a multiple of it.)
    raise ValueError(f"tile start {kv_start} is not a multiple of {align}")
  rows = q_idx.shape[0]
  groups, chunks = max(1, width // GROUP), min(8, width // 8)
  kv_start = _u32(kv_start)
  first_chunk = ((kv_start & _u32(GROUP - 1)) >> 3 if width < GROUP
                 else _u32(0))

  def iota(n, axis):
    return jax.lax.broadcasted_iota(
        jnp.uint32, tuple(n if a == axis else 1 for a in range(5)), axis)

  # The counter words keep their own shapes (call: columns, q: rows, head
  # and batch: one value). Philox's first rounds multiply words that each
  # depend on one of them, so only 18 of its 28 products run at the full
  # [rows, groups, 1, 4, 1] shape. Same bits.
  one = (1,) * 5
  call = ((kv_start >> 6) + iota(groups, 1)) * _u32(4) + iota(4, 3)
  counter = (call, _u32(q_idx).reshape(rows, 1, 1, 1, 1),
             jnp.broadcast_to(_u32(head), one),
             jnp.broadcast_to(_u32(batch), one))
  words = philox4x32(counter, (seed[0], seed[1]), rounds=rounds,
                     mulhi=mulhi)
  byte = (first_chunk + iota(chunks, 2)) * _u32(2) + iota(2, 4)
  keep = draw_byte(words, byte) >= _u32(threshold(rate))
  return keep.reshape(rows, width)


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
