"""Pieces the Hopper kernels share: sequence lengths, the blocks a CTA walks
(a range, or a block map's list with segment ids) and their masked/unmasked
phases, the element mask of a tile, and the TMA producers that stream
key/value blocks (query-major kernels) or query blocks (key-major ones)
through a ring."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu


MAX_GRID_Z = 65535   # CUDA's limit on gridDim.y and gridDim.z

# Shared memory Pallas sets aside for cross-warp reductions in any kernel
# that reduces (None: its default, `CompilerParams.reduction_scratch_bytes`,
# 2048 bytes). These kernels reduce only along rows of wgmma tiles, which
# stay inside a warp: lowering every kernel of test_lowering's cases asks
# for no scratch in any of their 336 reductions (session 16). 0 would free
# 2 KiB, enough for a 3-stage K/V ring in the head-dim-128 forward (232568
# -> 230520 bytes of 232448). Not yet run on a GPU, so the default stays;
# `benchmarks/hopper_tile_probe.py` sets it for a tile (``xR0``).
REDUCTION_SCRATCH_BYTES: int | None = None


def compiler_params() -> plgpu.CompilerParams:
  """The Mosaic GPU compiler parameters of every kernel of this backend."""
  reserve = ({} if REDUCTION_SCRATCH_BYTES is None
             else dict(reduction_scratch_bytes=REDUCTION_SCRATCH_BYTES))
  return plgpu.CompilerParams(approx_math=True, **reserve)


def sequence_major_grid(p, tiles: int, tile_name: str, heads: int) -> dict:
  """``grid`` and ``grid_names`` of a kernel over (sequence tile, head,
  batch row).

  Mosaic GPU launches the *last* grid axis fastest (it reverses the grid
  into CUDA's x, y, z). With ``p.seq_fastest`` the tiles of one head come
  last, so the CTAs running side by side are the tiles of a few heads and
  share those heads' streamed operands in L2. The other order (tiles
  slowest) has every CTA of a wave in a different head: an H100's 50 MB L2
  then holds a head's K/V for none of its other tiles, and Nsight Compute
  showed the forward at 80-84% of HBM bandwidth (h64 and h128, B*T=16k).
  The first axis becomes CUDA's z, limited to 65535 blocks, so a batch
  larger than that keeps the other order (its x axis has no such limit).
  """
  if p.seq_fastest and p.batch <= MAX_GRID_Z:
    return dict(grid=(p.batch, heads, tiles),
                grid_names=("batch", "heads", tile_name))
  return dict(grid=(tiles, heads, p.batch),
              grid_names=(tile_name, "heads", "batch"))


def clipped_lengths(p, q_len_ref, kv_len_ref, batch):
  """This batch row's valid query and key counts."""
  return (jnp.clip(q_len_ref[batch], 0, p.q_seq),
          jnp.clip(kv_len_ref[batch], 0, p.kv_seq))


@dataclasses.dataclass(frozen=True)
class Walk:
  """The blocks a CTA visits, which its producer and every consumer walk:
  ``steps`` of them, step ``t`` visiting block ``block_of(t)``.

  A range walk (`range_walk`, ``lo`` set) visits ``lo .. lo + steps``. A
  list walk (`list_walk`, ``num_partial`` set) reads a
  `flash_jax.block_map.BlockLists` row: its ``num_partial`` partial blocks
  first, then its full ones.
  """

  steps: Any
  block_of: Callable[[Any], Any]
  num_partial: Any = None   # list walks only
  lo: Any = None            # range walks only


def range_walk(block_range) -> Walk:
  """The walk over a `flash_jax.masks.BlockRange` (causal, window and
  lengths need nothing else)."""
  lo, steps = shared_range(block_range)
  return Walk(steps=steps, block_of=lambda t: lo + t, lo=lo)


def list_walk(segment_refs: "SegmentRefs", batch, row_block) -> Walk:
  """The walk over row ``row_block`` of a block map's lists (in global
  memory, ``[Bm, 1, R, C]`` and ``[Bm, 1, R, 2]``), read with scalar
  loads."""
  blocks, counts = segment_refs.blocks, segment_refs.counts
  # Segment ids vary by batch row only (a per-head map would need the head).
  assert blocks.shape[1] == 1, blocks.shape
  b = batch if blocks.shape[0] > 1 else 0
  # Under shard_map a value loaded from a ref carries the operand's varying
  # mesh axes, but arithmetic inside the kernel drops them, and a loop
  # bound must have its counter's type: the count goes through a (no-op)
  # clamp before it bounds a loop.
  num_partial = jnp.maximum(counts[b, 0, row_block, 0], 0)
  return Walk(steps=num_partial + counts[b, 0, row_block, 1],
              block_of=lambda t: blocks[b, 0, row_block, t],
              num_partial=num_partial)


def query_major_walk(p, segment_refs, batch, q_tile, q_len, kv_len,
                     block_kv: int, rows: int | None = None) -> Walk:
  """The key blocks of query tile ``q_tile`` (``rows`` rows, by default
  ``p.rows_per_cta``) in a query-major kernel (forward, dQ): its row of the
  key lists with segment ids (built by the caller at ``rows`` x
  ``block_kv`` tiles; ``rows`` is not read then), else the range its rows
  can attend."""
  if p.segments:
    return list_walk(segment_refs, batch, q_tile)
  rows = p.rows_per_cta if rows is None else rows
  start = q_tile * rows
  return range_walk(p.mask.kv_block_range(start, start + rows, q_len,
                                          kv_len, block_kv))


def phase_steps(walk: Walk, own_range=None):
  """``(first_full, end_full)``: the unmasked steps of one consumer.

  A list walk's full blocks are full for every row of the CTA, so both
  consumers take its classification; a range walk splits by the
  consumer's own rows (``own_range()``, their `BlockRange`)."""
  if walk.num_partial is not None:
    return walk.num_partial, walk.steps
  return own_phase_steps(own_range(), walk.lo, walk.steps)


@dataclasses.dataclass(frozen=True)
class SegmentRefs:
  """A kernel's segment-id inputs (global memory): the ids, int32 ``[B,
  T']`` and ``[B, S']`` with T' and S' padded to whole CTAs (128 rows, 192
  with a three-consumer forward; the kernels read a CTA's own ids without
  TMA's clipping), and the block
  map's lists of its walk."""

  q_ids: Any
  kv_ids: Any
  blocks: Any
  counts: Any

  @classmethod
  def split(cls, p, refs):
    """``(SegmentRefs or None, the other refs)`` from a kernel's refs after
    its common inputs (segment inputs come first when ``p.segments``)."""
    if not p.segments:
      return None, refs
    return cls(*refs[:4]), refs[4:]


def ids_scratch(p, block: int) -> list:
  """The scratch of a streamed ids ring (with segment ids; none without):
  int32 ids of ``block`` rows per slot, and one "landed" barrier per slot.
  A kernel's refs end with them (`SegmentRefs` splits off its inputs)."""
  if not p.segments:
    return []
  return [plgpu.SMEM((p.stages, block), jnp.int32),
          plgpu.Barrier(num_barriers=p.stages)]


def segment_operands(q_ids, kv_ids, lists) -> tuple:
  """The kernel operands `SegmentRefs.split` takes apart."""
  return (q_ids, kv_ids, lists.blocks, lists.counts)


def shared_range(block_range):
  """``(lo, steps)``: the first block and the block count of a CTA's range,
  which its producer and every consumer walk."""
  lo = jnp.asarray(block_range.lo, jnp.int32)
  return lo, jnp.asarray(block_range.hi, jnp.int32) - lo


def own_phase_steps(own, lo, steps):
  """``(first_full, end_full)``: one consumer's unmasked blocks (``own`` is
  the range of its rows) as steps into the shared range ``[lo, lo +
  steps)``."""
  first_full = jnp.clip(jnp.asarray(own.full_lo, jnp.int32) - lo, 0, steps)
  end_full = jnp.clip(jnp.asarray(own.full_hi, jnp.int32) - lo, first_full,
                      steps)
  return first_full, end_full


def run_phases(total, first_full, end_full, step, carry):
  """``step(t, carry, masked=...)`` over masked steps, unmasked steps, then
  masked steps: only blocks on a mask boundary pay for the element mask."""
  masked = functools.partial(step, masked=True)
  carry = lax.fori_loop(0, first_full, masked, carry)
  carry = lax.fori_loop(first_full, end_full,
                        functools.partial(step, masked=False), carry)
  return lax.fori_loop(end_full, total, masked, carry)


def tile_allowed(p, tile, q_start, kv_start, q_len, kv_len, *,
                 keys_are_rows=False, segment_ids=None):
  """The element mask of a ``tile`` of scores in the wgmma layout, whose
  rows are queries from ``q_start`` (or, with ``keys_are_rows``, keys from
  ``kv_start``: the transposed tiles of the dK/dV kernel). ``q_len`` and
  ``kv_len`` are the batch row's valid lengths (``q_len`` matters only
  with ``MaskSpec.align_to_lengths``).

  ``segment_ids``, if given, is ``(row_ids, column_ids)``: the tile's rows'
  ids in the ``WGMMA.reduce(1)`` layout and its columns' in
  ``WGMMA.reduce(0)`` (`load_ids`); pairs of different ids are masked."""
  iota = lambda axis: plgpu.broadcasted_iota(jnp.int32, tile, axis,
                                             layout=plgpu.Layout.WGMMA)
  q_axis, kv_axis = (1, 0) if keys_are_rows else (0, 1)
  allowed = p.mask.allows(q_start + iota(q_axis), kv_start + iota(kv_axis),
                          kv_len, q_len=q_len)
  if segment_ids is not None:
    row_ids, column_ids = segment_ids
    allowed = allowed & (lax.broadcast_in_dim(row_ids, tile, [0])
                         == lax.broadcast_in_dim(column_ids, tile, [1]))
  return allowed


ROW_IDS = plgpu.Layout.WGMMA.reduce(1)      # one id per row of a tile
COLUMN_IDS = plgpu.Layout.WGMMA.reduce(0)   # one id per column


def load_ids(ids_ref, layout, *, from_global: bool = False):
  """Segment ids as a vector in ``layout``, from shared memory or (once per
  CTA, where latency matters little) straight from global memory, which
  Mosaic GPU loads only element by element (``optimized=False``)."""
  return plgpu.load(ids_ref, layout=layout, optimized=not from_global)


def stream_kv(p, k_ref, v_ref, k_ring, v_ring, k_ready, v_ready, k_free,
              v_free, *, batch, head, walk: Walk, block_kv: int,
              kv_ids=None, first_step=0):
  """The producer warpgroup's copies for a query-major kernel: TMA copies of
  the key and value blocks of ``walk`` into a ``p.stages``-slot ring. A slot
  is reused only after every consumer released it (its "free" barrier), K
  and V separately so K can land while V is still read. ``first_step`` is
  the ring's step count before this walk (a persistent CTA's ring runs on
  across its tiles): step ``first_step + t`` uses slot ``(first_step + t) %
  p.stages``.

  ``kv_ids``, with segment ids, is ``(ids_ref, ids_ring, ids_ready)``: the
  blocks' key segment ids ride with K, in the slot that K's "free" barrier
  guards, so consumers must read them before they release K."""
  kv_head = lax.div(head, jnp.int32(p.groups))

  @pl.loop(0, walk.steps)
  def _(t):
    ring_step = t if isinstance(first_step, int) and not first_step else \
        first_step + t
    slot = lax.rem(ring_step, jnp.int32(p.stages))
    start = walk.block_of(t) * block_kv
    rows = pl.ds(start, block_kv)
    for src, ring, ready, free in ((k_ref, k_ring, k_ready, k_free),
                                   (v_ref, v_ring, v_ready, v_free)):
      @pl.when(ring_step >= p.stages)
      def _():
        plgpu.barrier_wait(free.at[slot])
      plgpu.copy_gmem_to_smem(src.at[batch, rows, kv_head], ring.at[slot],
                              ready.at[slot])
      if kv_ids is not None and src is k_ref:
        # Behind K's "free" wait: the slot's old ids have been read.
        ids_ref, ids_ring, ids_ready = kv_ids
        plgpu.copy_gmem_to_smem(ids_ref.at[batch, pl.ds(start, block_kv)],
                                ids_ring.at[slot], ids_ready.at[slot])


@dataclasses.dataclass(frozen=True)
class QueryRing:
  """The shared-memory ring a key-major (dK/dV) kernel streams query blocks
  through: Q, dO, lse and D per slot, each with its "ready" barriers, and
  one "free" barrier per slot that every consumer arrives on. ``ids``, with
  segment ids, is ``(ids_ref, ids_ring, ids_ready)``, as in `stream_kv`:
  the query ids in global memory, and their ring and barriers."""

  q: Any
  dout: Any
  lse: Any
  delta: Any
  q_ready: Any
  dout_ready: Any
  lse_ready: Any
  delta_ready: Any
  free: Any
  ids: tuple | None = None


def stream_query_blocks(p, ring: QueryRing, q_ref, do_ref, lse_ref, delta_ref,
                        *, batch, steps, locate, block: int):
  """The producer warpgroup of a key-major kernel: for step ``t`` < ``steps``
  copies query block ``locate(t) = (head, block index)`` (``block`` rows)
  of Q, lse, its segment ids, dO and D into ring slot ``t % p.stages``,
  once every consumer has released the slot. The order is the order of
  use: S needs Q, P needs lse (and the ids), dP needs dO, dS needs D."""
  plgpu.set_max_registers(40, action="decrease")

  @pl.loop(0, steps)
  def _(t):
    slot = lax.rem(t, jnp.int32(p.stages))
    head, q_block = locate(t)
    rows = pl.ds(q_block * block, block)

    @pl.when(t >= p.stages)
    def _():
      plgpu.barrier_wait(ring.free.at[slot])
    plgpu.copy_gmem_to_smem(q_ref.at[batch, rows, head], ring.q.at[slot],
                            ring.q_ready.at[slot])
    plgpu.copy_gmem_to_smem(lse_ref.at[batch, head, rows],
                            ring.lse.at[slot], ring.lse_ready.at[slot])
    if ring.ids is not None:
      ids_ref, ids_ring, ids_ready = ring.ids
      plgpu.copy_gmem_to_smem(ids_ref.at[batch, rows], ids_ring.at[slot],
                              ids_ready.at[slot])
    plgpu.copy_gmem_to_smem(do_ref.at[batch, rows, head], ring.dout.at[slot],
                            ring.dout_ready.at[slot])
    plgpu.copy_gmem_to_smem(delta_ref.at[batch, head, rows],
                            ring.delta.at[slot], ring.delta_ready.at[slot])
