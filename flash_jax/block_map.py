"""Block-sparse schedules: which tiles of the ``[T, S]`` score matrix to visit.

The kernels tile the scores into ``block_q x block_kv`` blocks. For masks that
`MaskSpec.kv_block_range` cannot describe with a range (segment ids, a dense
boolean mask, a ``mask_fn``), a small map is computed here, in XLA, before
the kernel runs. Every block gets a state:

* ``EMPTY``: nothing attended; the kernels never load or compute it;
* ``PARTIAL``: some pairs attended; the kernels apply the element mask;
* ``FULL``: every pair attended; the kernels skip the mask arithmetic.

All components of the mask (causal, window, padding lengths, segments, dense
mask, ``mask_fn``) are combined: a block is ``FULL`` only if it is full for
every component, and ``EMPTY`` if any component leaves it empty (otherwise
``PARTIAL``). Combining per-component "any" flags over-approximates "some
pair attended", which is safe: a block wrongly marked ``PARTIAL`` costs time,
never correctness.

Memory is O((T / block_q) * (S / block_kv)) per map row (batch and head
dimensions appear only where a component varies along them); no ``[T, S]``
array is built. A ``mask_fn`` is evaluated one row of blocks at a time.

The kernels consume the map as *lists*: for each row block (query block for
the forward and dQ kernels, key block for the dK/dV kernel) the column block
indices to visit, partial ones first, then full ones, with their counts, so
a loop runs over visited blocks only.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from flash_jax.masks import MaskArrays, MaskSpec, cdiv, trace_mask_fn

EMPTY, PARTIAL, FULL = 0, 1, 2


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockLists:
  """Per row block, the column blocks to visit.

  Attributes:
    blocks: int32 ``[Bm, Nm, R, C]``: column block indices, the
      ``num_partial`` partial blocks first, then the ``num_full`` full ones
      (each group in increasing order), then unused entries. ``Bm`` is 1 or
      B and ``Nm`` 1 or N (1 where no component varies along that axis).
    counts: int32 ``[Bm, Nm, R, 2]``: ``(num_partial, num_full)``.
  """

  blocks: jax.Array
  counts: jax.Array


def needs_map(spec: MaskSpec, arrays: MaskArrays) -> bool:
  """True if the mask has parts block ranges cannot express."""
  return (arrays.mask is not None or arrays.q_segment_ids is not None
          or spec.mask_fn is not None)


def mask_fn_uses(mask_fn: Callable) -> tuple[bool, bool]:
  """Whether ``mask_fn(batch, head, q, kv)`` reads ``batch`` and ``head``.

  Found from its jaxpr: an input that no equation and no output reads cannot
  change the result, so the map need not vary along it. (Conservative: an
  input read only by dead code still counts as used.)
  """
  jaxpr = trace_mask_fn(mask_fn).jaxpr
  read = {id(v) for eqn in jaxpr.eqns for v in eqn.invars}
  read |= {id(v) for v in jaxpr.outvars}
  return tuple(id(v) in read for v in jaxpr.invars[:2])


def _range_any_all(spec: MaskSpec, q_lengths, kv_lengths, q_seq: int,
                   kv_seq: int, block_q: int, block_kv: int):
  """Causal/window/padding as ``(any, full)`` bool ``[Bl, 1, nq, nk]``."""
  num_q, num_kv = cdiv(q_seq, block_q), cdiv(kv_seq, block_kv)
  q_len = (jnp.asarray(q_seq, jnp.int32)[None] if q_lengths is None else
           jnp.clip(q_lengths.astype(jnp.int32), 0, q_seq))[:, None]
  kv_len = (jnp.asarray(kv_seq, jnp.int32)[None] if kv_lengths is None else
            jnp.clip(kv_lengths.astype(jnp.int32), 0, kv_seq))[:, None]
  q_start = jnp.arange(num_q, dtype=jnp.int32)[None, :] * block_q
  spec_no_fn = dataclasses.replace(spec, mask_fn=None)
  r = spec_no_fn.kv_block_range(q_start, q_start + block_q, q_len, kv_len,
                                block_kv)
  lo, full_lo, full_hi, hi = (jnp.broadcast_to(x, jnp.broadcast_shapes(
      q_start.shape, q_len.shape, kv_len.shape))[:, None, :, None]
      for x in (r.lo, r.full_lo, r.full_hi, r.hi))
  j = jnp.arange(num_kv, dtype=jnp.int32)
  return (lo <= j) & (j < hi), (full_lo <= j) & (j < full_hi)


def _blocked(x, axis: int, block: int, fill):
  """Pads ``axis`` of ``x`` to a multiple of ``block`` and splits it."""
  size = x.shape[axis]
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, -size % block)
  x = jnp.pad(x, pad, constant_values=fill)
  return x.reshape(x.shape[:axis] + (-1, block) + x.shape[axis + 1:])


def _segment_any_all(q_ids, kv_ids, block_q: int, block_kv: int):
  """Segments as ``(any, full)`` bool ``[B, 1, nq, nk]``.

  A block can attend iff its query and key id ranges overlap (exact for
  sorted, packed ids, conservative otherwise); it is full iff both sides hold
  one and the same id.
  """
  big, small = np.iinfo(np.int32).max, np.iinfo(np.int32).min
  q_min = _blocked(q_ids, 1, block_q, big).min(-1)[:, None, :, None]
  q_max = _blocked(q_ids, 1, block_q, small).max(-1)[:, None, :, None]
  kv_min = _blocked(kv_ids, 1, block_kv, big).min(-1)[:, None, None, :]
  kv_max = _blocked(kv_ids, 1, block_kv, small).max(-1)[:, None, None, :]
  any_ = (q_min <= kv_max) & (kv_min <= q_max)
  full = (q_min == q_max) & (kv_min == kv_max) & (q_min == kv_min)
  return any_, full


def _block_counts(mask, block_q: int, block_kv: int):
  """int32 ``[Bm, Nm, nq, nk]``: attended pairs of each block, counted first
  along the contiguous key axis, then over the block's query rows."""
  row_counts = jnp.sum(_blocked(mask, 3, block_kv, False), axis=-1,
                       dtype=jnp.int32)
  return jnp.sum(_blocked(row_counts, 2, block_q, 0), axis=3)


def _dense_any_all(mask, block_q: int, block_kv: int):
  """A dense mask ``[Bm, Nm, Tm, Sm]`` (Tm in {1, T}, Sm in {1, S}) as
  ``(any, full)`` bool ``[Bm, Nm, nq or 1, nk or 1]``. Lanes past the array
  count as absent for "any" and as attended for "full" (the padding
  component already makes tail blocks partial).

  One read of the mask: attended pairs are counted per block
  (`_block_counts`), and a block is full when its count equals its in-array
  element count. (Separate "any" and "all" reductions read a 64 MiB mask
  twice per map.)
  """
  q_seq, kv_seq = mask.shape[2], mask.shape[3]
  bq = block_q if q_seq > 1 else 1
  bkv = block_kv if kv_seq > 1 else 1
  counts = _block_counts(mask, bq, bkv)
  in_array = lambda n, b: jnp.minimum(b, n - b * jnp.arange(cdiv(n, b)))
  size = in_array(q_seq, bq)[:, None] * in_array(kv_seq, bkv)[None, :]
  return counts > 0, counts == size


def _coarsen(any_, full, factor_q: int, factor_kv: int):
  """``(any, full)`` of fine blocks -> of blocks ``factor_q x factor_kv``
  times larger (axes of size 1, i.e. broadcast, stay 1). Fine blocks past
  the array count as absent for "any" and attended for "full"."""
  for axis, factor in ((2, factor_q), (3, factor_kv)):
    if any_.shape[axis] > 1 and factor > 1:
      any_ = jnp.any(_blocked(any_, axis, factor, False), axis=axis + 1)
      full = jnp.all(_blocked(full, axis, factor, True), axis=axis + 1)
  return any_, full


def _mask_fn_any_all(mask_fn, batch: int, num_heads: int, q_seq: int,
                     kv_seq: int, block_q: int, block_kv: int):
  """``mask_fn`` as ``(any, full)`` bool ``[Bf, Nf, nq, nk]``, evaluated one
  row of blocks at a time (``[Bf, Nf, block_q, S]`` elements at once)."""
  uses_batch, uses_head = mask_fn_uses(mask_fn)
  num_b = batch if uses_batch else 1
  num_h = num_heads if uses_head else 1
  num_q = cdiv(q_seq, block_q)
  kv_pad = cdiv(kv_seq, block_kv) * block_kv
  b = jnp.arange(num_b, dtype=jnp.int32)[:, None, None, None]
  h = jnp.arange(num_h, dtype=jnp.int32)[None, :, None, None]
  kv_idx = jnp.arange(kv_pad, dtype=jnp.int32)[None, None, None, :]

  def row(q_block):
    q_idx = q_block * block_q + jnp.arange(block_q, dtype=jnp.int32)
    q_idx = q_idx[None, None, :, None]
    allowed = jnp.broadcast_to(mask_fn(b, h, q_idx, kv_idx),
                               (num_b, num_h, block_q, kv_pad))
    in_array = (q_idx < q_seq) & (kv_idx < kv_seq)
    blocks = lambda x: x.reshape(num_b, num_h, block_q, -1, block_kv)
    any_ = jnp.any(blocks(allowed & in_array), axis=(2, 4))
    full = jnp.all(blocks(allowed | ~in_array), axis=(2, 4))
    return any_, full

  any_, full = jax.lax.map(row, jnp.arange(num_q, dtype=jnp.int32))
  return jnp.moveaxis(any_, 0, 2), jnp.moveaxis(full, 0, 2)


def block_states(spec: MaskSpec, arrays: MaskArrays, *, batch: int,
                 num_heads: int, q_seq: int, kv_seq: int, block_q: int,
                 block_kv: int) -> jax.Array:
  """int8 ``[Bm, Nm, nq, nk]``: `EMPTY`, `PARTIAL` or `FULL` per block.

  ``arrays.mask``, when given, must be 4-D with dims 1 or full (as
  `flash_jax.api.canonicalize` leaves it).
  """
  return block_states_for_tiles(
      spec, arrays, batch=batch, num_heads=num_heads, q_seq=q_seq,
      kv_seq=kv_seq, tiles=((block_q, block_kv),))[0]


def block_states_for_tiles(spec: MaskSpec, arrays: MaskArrays, *,
                           batch: int, num_heads: int, q_seq: int,
                           kv_seq: int, tiles) -> list[jax.Array]:
  """`block_states` for several ``(block_q, block_kv)`` tilings at once.

  The O(T*S) parts (a dense mask, a ``mask_fn``) are evaluated once, at the
  smallest tile (blocks are powers of two, so it divides every other), and
  coarsened per tiling; the backward's two maps then cost one read of the
  mask instead of two.
  """
  fine_q = min(bq for bq, _ in tiles)
  fine_kv = min(bkv for _, bkv in tiles)
  for bq, bkv in tiles:
    if bq % fine_q or bkv % fine_kv:
      raise ValueError(f"tiles {tiles} do not nest (powers of two do)")
  fine = []
  if arrays.mask is not None:
    fine.append(_dense_any_all(arrays.mask, fine_q, fine_kv))
  if spec.mask_fn is not None:
    fine.append(_mask_fn_any_all(spec.mask_fn, batch, num_heads, q_seq,
                                 kv_seq, fine_q, fine_kv))
  states = []
  for block_q, block_kv in tiles:
    parts = [_range_any_all(spec, arrays.q_lengths, arrays.kv_lengths,
                            q_seq, kv_seq, block_q, block_kv)]
    if arrays.q_segment_ids is not None:
      parts.append(_segment_any_all(arrays.q_segment_ids.astype(jnp.int32),
                                    arrays.kv_segment_ids.astype(jnp.int32),
                                    block_q, block_kv))
    parts += [_coarsen(*part, block_q // fine_q, block_kv // fine_kv)
              for part in fine]
    any_, full = parts[0]
    for part_any, part_full in parts[1:]:
      any_, full = any_ & part_any, full & part_full
    state = jnp.where(full, FULL, jnp.where(any_, PARTIAL, EMPTY))
    num_q, num_kv = cdiv(q_seq, block_q), cdiv(kv_seq, block_kv)
    states.append(jnp.broadcast_to(
        state, state.shape[:2] + (num_q, num_kv)).astype(jnp.int8))
  return states


def lists_from_states(states) -> BlockLists:
  """Visiting lists along the last axis of ``states`` (see `BlockLists`)."""
  order = jnp.where(states == PARTIAL, 0, jnp.where(states == FULL, 1, 2))
  blocks = jnp.argsort(order, axis=-1, stable=True).astype(jnp.int32)
  counts = jnp.stack([jnp.sum(states == PARTIAL, axis=-1),
                      jnp.sum(states == FULL, axis=-1)], axis=-1)
  return BlockLists(blocks=blocks, counts=counts.astype(jnp.int32))


def kv_lists(states) -> BlockLists:
  """For each query block, the key blocks to visit."""
  return lists_from_states(states)


def q_lists(states) -> BlockLists:
  """For each key block, the query blocks to visit."""
  return lists_from_states(jnp.swapaxes(states, -1, -2))
