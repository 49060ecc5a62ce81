"""Pieces the Hopper kernels share: sequence lengths, a CTA's block range
and its masked/unmasked phases, the element mask of a tile, and the TMA
producer that streams key/value blocks through a ring."""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu


MAX_GRID_Z = 65535   # CUDA's limit on gridDim.y and gridDim.z


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


def shared_range(block_range):
  """``(lo, steps)``: the first block and the block count of a CTA's range,
  which its producer and both consumers walk."""
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


def tile_allowed(p, tile, q_start, kv_start, kv_len, *, keys_are_rows=False):
  """The element mask of a ``tile`` of scores in the wgmma layout, whose
  rows are queries from ``q_start`` (or, with ``keys_are_rows``, keys from
  ``kv_start``: the transposed tiles of the dK/dV kernel)."""
  iota = lambda axis: plgpu.broadcasted_iota(jnp.int32, tile, axis,
                                             layout=plgpu.Layout.WGMMA)
  q_axis, kv_axis = (1, 0) if keys_are_rows else (0, 1)
  return p.mask.allows(q_start + iota(q_axis), kv_start + iota(kv_axis),
                       kv_len)


def stream_kv(p, k_ref, v_ref, k_ring, v_ring, k_ready, v_ready, k_free,
              v_free, *, batch, head, lo, steps, block_kv: int):
  """The producer warpgroup of a query-major kernel: TMA copies of the key
  and value blocks ``lo .. lo + steps`` into a ``p.stages``-slot ring. A
  slot is reused only after both consumers released it (its "free"
  barrier), K and V separately so K can land while V is still read."""
  plgpu.set_max_registers(40, action="decrease")
  kv_head = lax.div(head, jnp.int32(p.groups))

  @pl.loop(0, steps)
  def _(t):
    slot = lax.rem(t, jnp.int32(p.stages))
    rows = pl.ds((lo + t) * block_kv, block_kv)
    for src, ring, ready, free in ((k_ref, k_ring, k_ready, k_free),
                                   (v_ref, v_ring, v_ready, v_free)):
      @pl.when(t >= p.stages)
      def _():
        plgpu.barrier_wait(free.at[slot])
      plgpu.copy_gmem_to_smem(src.at[batch, rows, kv_head], ring.at[slot],
                              ready.at[slot])
