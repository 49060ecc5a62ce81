"""The one mask vocabulary of flash_jax.

Every backend, the reference and the block-skipping logic describe which
(query, key) pairs may attend through :class:`MaskSpec`. It answers two kinds
of question:

* element-wise: ``spec.allows(q_idx, kv_idx, kv_len)`` is the boolean mask of
  one tile (or of the whole ``[T, S]`` matrix in the reference);
* block-wise: ``spec.kv_block_range(...)`` / ``spec.q_block_range(...)`` give,
  for one query (key) block, the range of key (query) blocks that hold any
  attended element, and the sub-range whose blocks are attended everywhere
  and so need no element-wise masking.

The block functions take plain Python ints or traced int32 scalars, so the same
code runs inside a Pallas kernel and in NumPy-level unit tests.

Causal alignment is top-left, as in ``jax.nn.dot_product_attention``: query
``i`` sees keys ``0..i`` whatever ``T`` and ``S`` are::

    T=3, S=5      keys ->
    query 0       x . . . .
    query 1       x x . . .
    query 2       x x x . .
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

IntLike = Any  # a Python int or a traced int32 scalar


def _min(a, b):
  if isinstance(a, int) and isinstance(b, int):
    return min(a, b)
  return jnp.minimum(a, b)


def _max(a, b):
  if isinstance(a, int) and isinstance(b, int):
    return max(a, b)
  return jnp.maximum(a, b)


def cdiv(a: IntLike, b: int) -> IntLike:
  """Ceiling division that works for ints and traced int scalars."""
  return (a + b - 1) // b


@dataclasses.dataclass(frozen=True)
class BlockRange:
  """A range of blocks ``[lo, hi)`` split as masked ``[lo, full_lo)``,
  unmasked ``[full_lo, full_hi)`` and masked ``[full_hi, hi)``.

  ``lo <= full_lo <= full_hi <= hi`` always holds.
  """

  lo: IntLike
  full_lo: IntLike
  full_hi: IntLike
  hi: IntLike


def _split(lo, hi, full_lo, full_hi, block: int) -> BlockRange:
  """Converts element ranges into an ordered, clamped `BlockRange`.

  `[lo, hi)` is the element range holding any attended element and
  `[full_lo, full_hi)` the element range attended by every row of the
  other side's block.
  """
  block_lo = lo // block
  block_hi = _max(block_lo, cdiv(hi, block))
  # Blocks entirely inside [full_lo, full_hi).
  full_block_lo = _min(_max(cdiv(full_lo, block), block_lo), block_hi)
  full_block_hi = _max(_min(full_hi // block, block_hi), full_block_lo)
  return BlockRange(block_lo, full_block_lo, full_block_hi, block_hi)


@dataclasses.dataclass(frozen=True)
class MaskSpec:
  """Static description of which (query, key) pairs attend.

  Attributes:
    is_causal: query ``i`` attends key ``j`` only if ``j <= i`` (top-left).

  Dynamic parts of the mask (per-batch ``q_len`` / ``kv_len`` from the
  padding sequence lengths) are passed to the methods as arguments.
  """

  is_causal: bool = False

  def allows(self, q_idx, kv_idx, kv_len):
    """Element-wise mask: True where query ``q_idx`` attends key ``kv_idx``.

    ``q_idx`` and ``kv_idx`` broadcast against each other; ``kv_len`` is the
    number of valid keys (padding mask). Query padding is handled by the
    callers (padded query rows are zeroed), not here.
    """
    allowed = kv_idx < kv_len
    if self.is_causal:
      allowed = allowed & (kv_idx <= q_idx)
    return allowed

  def kv_block_range(self, q_start, q_stop, q_len, kv_len, block_kv: int
                     ) -> BlockRange:
    """Key blocks that the queries ``[q_start, q_stop)`` can attend.

    Args:
      q_start, q_stop: the query block's element range.
      q_len: valid queries; rows at or past it attend nothing.
      kv_len: valid keys.
      block_kv: key block size.
    """
    q_stop = _min(q_stop, q_len)
    lo, hi = 0, kv_len
    full_lo, full_hi = 0, kv_len
    if self.is_causal:
      hi = _min(hi, q_stop)          # the last query sees keys <= q_stop - 1
      full_hi = _min(full_hi, q_start + 1)  # the first query sees <= q_start
    # A query block with no valid row attends nothing.
    hi = _max(_min(hi, kv_len), 0)
    empty = q_stop <= q_start
    if isinstance(empty, bool):
      if empty:
        hi = lo
    else:
      hi = jnp.where(empty, lo, hi)
    return _split(lo, hi, full_lo, full_hi, block_kv)

  def q_block_range(self, kv_start, kv_stop, q_len, kv_len, block_q: int
                    ) -> BlockRange:
    """Query blocks that can attend the keys ``[kv_start, kv_stop)``.

    The full sub-range holds query blocks that attend every key of the block;
    a key block that straddles ``kv_len`` has none.
    """
    lo, hi = 0, q_len
    full_lo, full_hi = 0, q_len
    if self.is_causal:
      lo = _min(kv_start, q_len)     # query kv_start is the first to see it
      full_lo = kv_stop - 1          # queries >= kv_stop - 1 see all of it
    straddles = kv_stop > kv_len
    if isinstance(straddles, bool):
      if straddles:
        full_lo = full_hi = 0
    else:
      full_hi = jnp.where(straddles, 0, full_hi)
    no_keys = kv_start >= kv_len
    if isinstance(no_keys, bool):
      if no_keys:
        hi = lo
    else:
      hi = jnp.where(no_keys, lo, hi)
    return _split(lo, hi, full_lo, full_hi, block_q)
