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

Causal alignment is top-left by default, as in
``jax.nn.dot_product_attention``: query ``i`` sees keys ``0..i`` whatever
``T`` and ``S`` are; ``diagonal_offset = S - T`` aligns it bottom-right::

    T=3, S=5      top-left        bottom-right (offset 2)
    query 0       x . . . .       x x x . .
    query 1       x x . . .       x x x x .
    query 2       x x x . .       x x x x x

With padding lengths, ``align_to_lengths`` aligns it bottom-right per batch
row instead: the offset is ``kv_len - q_len``, so the last valid query sees
the last valid key (FlashAttention's varlen and KV-cache convention).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
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


def heavy_first(program: IntLike, num_blocks: int) -> IntLike:
  """The query block that query-major program ``program`` (forward, dQ) owns.

  The GPU starts programs in the order of their index. Under a causal mask a
  later query block attends more key blocks, so the last one runs first:
  the longest programs start early, and the launch ends on short ones
  instead of a straggler that keeps one SM busy while the others are idle
  (the "longest processing time first" rule). Any other mask is indifferent
  to the order. Programs are independent, so results are bitwise the same.
  Key-major kernels (dK/dV) need no reversal: key block 0 is attended by
  the most query blocks and already starts first.
  """
  return num_blocks - 1 - program


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
  other side's block. Either may be empty or reach past the array.
  """
  lo = _max(lo, 0)
  hi = _max(hi, lo)
  block_lo = lo // block
  # An empty element range visits no block (cdiv alone would give one when
  # lo is not block-aligned).
  block_hi = _where(hi > lo, _max(block_lo, cdiv(hi, block)), block_lo)
  # Blocks entirely inside [full_lo, full_hi) (and inside [lo, hi)).
  full_lo = _max(full_lo, lo)
  full_hi = _min(full_hi, hi)
  full_block_lo = _min(_max(cdiv(full_lo, block), block_lo), block_hi)
  full_block_hi = _max(_min(full_hi // block, block_hi), full_block_lo)
  return BlockRange(block_lo, full_block_lo, full_block_hi, block_hi)


def trace_mask_fn(mask_fn):
  """``mask_fn(batch, head, q_idx, kv_idx)`` traced on int32 scalars, as a
  ClosedJaxpr: what the API checks (arity, a bool result, no captured
  arrays) and what the block map reads (which indices it uses)."""
  index = jax.ShapeDtypeStruct((), jnp.int32)
  return jax.make_jaxpr(mask_fn)(index, index, index, index)


def _where(cond, if_true, if_false):
  if isinstance(cond, bool):
    return if_true if cond else if_false
  return jnp.where(cond, if_true, if_false)


@dataclasses.dataclass(frozen=True)
class MaskSpec:
  """Static description of which (query, key) pairs attend.

  Attributes:
    is_causal: query ``i`` attends key ``j`` only if ``j <= i + offset``.
    diagonal_offset: where the causal diagonal and window centre sit: 0 is
      top-left alignment (``jax.nn``: query ``i`` is aligned with key
      ``i``); ``S - T`` is bottom-right alignment (FlashAttention: the last
      query is aligned with the last key).
    window_left, window_right: a local window: query ``i`` attends keys in
      ``[i + offset - window_left, i + offset + window_right]``; None leaves
      that side unbounded.
    align_to_lengths: the offset is ``kv_len - q_len`` of each batch row
      (bottom-right alignment of the valid rows), not ``diagonal_offset``.
      The element mask then needs ``q_len``.
    mask_fn: an optional jnp-traceable predicate ``mask_fn(batch, head,
      q_idx, kv_idx) -> bool`` (True = attend), evaluated element-wise. The
      block ranges do not see it; `flash_jax.block_map` skips blocks for
      it.

  Dynamic parts of the mask (per-batch ``q_len`` / ``kv_len`` from the
  padding sequence lengths, segment ids, a dense boolean mask) are passed to
  the methods as arguments.
  """

  is_causal: bool = False
  diagonal_offset: int = 0
  window_left: int | None = None
  window_right: int | None = None
  mask_fn: Any = None
  align_to_lengths: bool = False

  def offset(self, q_len, kv_len):
    """Where query 0's diagonal sits: ``kv_len - q_len`` when aligned to
    the lengths, else the static ``diagonal_offset``."""
    if self.align_to_lengths:
      if q_len is None:
        raise ValueError("a MaskSpec aligned to lengths needs q_len")
      return kv_len - q_len
    return self.diagonal_offset

  def _reach(self) -> tuple[int | None, int | None]:
    """How far left/right of the aligned diagonal a query sees (None = all)."""
    right = self.window_right
    if self.is_causal:
      right = 0 if right is None else min(right, 0)
    return self.window_left, right

  def allows(self, q_idx, kv_idx, kv_len, *, q_len=None, q_segment=None,
             kv_segment=None, batch=None, head=None):
    """Element-wise mask: True where query ``q_idx`` attends key ``kv_idx``.

    Arguments broadcast against each other; ``kv_len`` is the number of
    valid keys (padding mask); ``q_len`` (valid queries) is needed only
    with ``align_to_lengths``. Segment ids, when given, must be equal.
    ``batch``/``head`` indices are needed only with a ``mask_fn``. Query
    padding is handled by the callers (padded query rows are zeroed).
    """
    allowed = kv_idx < kv_len
    left, right = self._reach()
    diagonal = q_idx + self.offset(q_len, kv_len)
    if right is not None:
      allowed = allowed & (kv_idx <= diagonal + right)
    if left is not None:
      allowed = allowed & (kv_idx >= diagonal - left)
    if q_segment is not None:
      allowed = allowed & (q_segment == kv_segment)
    if self.mask_fn is not None:
      allowed = allowed & self.mask_fn(batch, head, q_idx, kv_idx)
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
    offset = self.offset(q_len, kv_len)
    q_stop = _min(q_stop, q_len)
    left, right = self._reach()
    first, last = q_start + offset, q_stop - 1 + offset
    lo, hi, full_lo, full_hi = 0, kv_len, 0, kv_len
    if right is not None:
      hi = _min(hi, last + right + 1)           # the last row reaches furthest
      full_hi = _min(full_hi, first + right + 1)  # the first row the least
    if left is not None:
      lo = first - left
      full_lo = last - left
    # A query block with no valid row attends nothing.
    hi = _where(q_stop <= q_start, lo, hi)
    return _split(lo, hi, full_lo, full_hi, block_kv)

  def q_block_range(self, kv_start, kv_stop, q_len, kv_len, block_q: int
                    ) -> BlockRange:
    """Query blocks that can attend the keys ``[kv_start, kv_stop)``.

    The full sub-range holds query blocks that attend every key of the block;
    a key block that straddles ``kv_len`` has none.
    """
    offset = self.offset(q_len, kv_len)
    left, right = self._reach()
    first, last = kv_start - offset, kv_stop - 1 - offset
    lo, hi, full_lo, full_hi = 0, q_len, 0, q_len
    if right is not None:
      lo = first - right          # query i sees key j iff i >= j - off - right
      full_lo = last - right
    if left is not None:
      hi = _min(hi, last + left + 1)  # ... and i <= j - off + left
      full_hi = _min(full_hi, first + left + 1)
    full_hi = _where(kv_stop > kv_len, full_lo, full_hi)
    hi = _where(kv_start >= kv_len, lo, hi)
    return _split(lo, hi, full_lo, full_hi, block_q)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MaskArrays:
  """The dynamic (traced) parts of a mask, next to the static `MaskSpec`.

  Attributes:
    q_lengths, kv_lengths: int32 ``[B]`` padding lengths.
    mask: bool, 4-D, broadcastable to ``[B, N, T, S]`` (True = attend).
    q_segment_ids, kv_segment_ids: int32 ``[B, T]`` / ``[B, S]``; a query
      attends only keys of its own segment.
    dropout_seed: uint32 ``[2]``, the dropout hash key (see
      `flash_jax.dropout`).
  """

  q_lengths: jax.Array | None = None
  kv_lengths: jax.Array | None = None
  mask: jax.Array | None = None
  q_segment_ids: jax.Array | None = None
  kv_segment_ids: jax.Array | None = None
  dropout_seed: jax.Array | None = None
