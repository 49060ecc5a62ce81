"""FlashAttention-2 backward for Hopper, in Pallas' Mosaic GPU dialect.

The probabilities are recomputed from the saved logsumexp, ``P = exp2(S *
scale * log2(e) - lse * log2(e))``; with ``D = rowsum(dO * O)`` (computed in
XLA, minus the lse cotangent):

    dV = P^T dO     dP = dO V^T     dS = P * (dP - D)
    dK = scale * dS^T Q             dQ = scale * dS K

By default two kernels, no atomics, so the backward is bitwise
deterministic. Each has the forward's shape: a producer warpgroup streams
tiles through a TMA ring and two consumer warpgroups (64 rows each) run
wgmma.

* dK/dV (key-major): a CTA owns 128 keys of one (batch, kv head); each
  consumer holds 64 keys' K and V in shared memory and its dK, dV in
  registers, and walks the query blocks of every query head of its GQA group
  (the producer streams Q, dO, lse and D for them), so a kv head's gradient
  sums its group in registers. It computes the transposed products (``S^T =
  K Q^T``, ``dP^T = V dO^T``) so that keys are the wgmma M dimension.
* dQ (query-major): a CTA owns 128 queries of one (batch, head), like the
  forward (in its last-first order), and streams K and V.

With ``deterministic=False`` (``ForwardParams.fused_dq``) the dK/dV kernel
also forms dQ, so no second kernel recomputes S and dP: 5 products per tile
instead of 7. Each consumer writes its dS^T tile to shared memory; for head
dim 128 both consumers then take half of dQ's columns over all 128 keys of
the CTA (64 keys' worth each for head dim 64) and add the float32 tile into
a zeroed ``[B, T, N, H]`` buffer with a TMA reduce-add. The order of those
adds varies, so the gradients do too, in the last bits (FlashAttention-3
accumulates dQ with atomics in the same way). That kernel's grid order is
in `_dkv_grid`.

With segment ids (``ForwardParams.segments``) each kernel walks its row of
a block map's lists (`flash_jax.block_map`), as the forward does: the dK/dV
kernel the query blocks of its 128 keys, the dQ kernel the key blocks of its
128 queries (tiles in `list_tiles`); the producer streams the walked
blocks' segment ids next to them.

Rows that attend nothing carry lse = -inf; it is read as +inf so that their
P is exactly 0.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from flash_jax.backends.pallas_mosaic_gpu import common
from flash_jax.backends.pallas_mosaic_gpu.forward import (
    BLOCK_Q, CONSUMERS, LOG2_E, PRODUCER, ForwardParams)
from flash_jax.backends.pallas_mosaic_gpu.forward import tanh as _tanh
from flash_jax.sharding import varying_like

BLOCK = BLOCK_Q       # rows per consumer warpgroup, and streamed block rows

# The kernels' names in profiles (Nsight Compute's ``-k``): dK/dV, the
# fused dK/dV/dQ kernel of ``fused_dq``, and dQ.
KERNEL_NAMES = {"dkv": "flash_jax_mosaic_dkv",
                "dkv_dq": "flash_jax_mosaic_dkv_dq",
                "dq": "flash_jax_mosaic_dq"}


def _smem(p: ForwardParams, *shape):
  transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
  return plgpu.SMEM(shape, p.dtype, transforms=transforms)


def _logits(s, p: ForwardParams):
  """Logits in log2 units and tanh of the soft-cap (or None)."""
  cap = p.logits_soft_cap
  if cap is None:
    return s * (p.scale * LOG2_E), None
  tanh = _tanh(s * (p.scale / cap))
  return tanh * (cap * LOG2_E), tanh


def _splits_dq_columns(p: ForwardParams) -> bool:
  """Whether the fused dQ product splits dQ's columns between the
  consumers (each over all 128 keys of the CTA, halving the reduce-adds):
  only where half the head dim is still a whole 128-byte swizzle tile."""
  return p.head_dim >= 128


def _dkv_grid(p: ForwardParams) -> dict:
  """The dK/dV kernel's grid (`common.sequence_major_grid`: key-block CTAs
  of one head run side by side and share its Q, dO, lse and D in L2).

  The fused-dQ kernel keeps the order it was measured with, ``(heads, kv,
  batch)``: Mosaic GPU launches the last axis fastest, so there the batch
  rows of one key block, then the key blocks of one head, run together. On
  an H100 (B=4 T=4k N=16 H=128, bf16) it took the fused backward from 5.1
  to 3.0 ms against ``(kv, heads, batch)``, whose waves span every head
  (`fused_dq_probe.py`; session 8 read it as same-row reduce-add
  contention, but the order it replaced was the L2-thrashing one)."""
  kv_ctas = pl.cdiv(p.kv_seq, CONSUMERS * BLOCK)
  if p.fused_dq:
    return dict(grid=(p.num_kv_heads, kv_ctas, p.batch),
                grid_names=("heads", "kv", "batch"))
  return common.sequence_major_grid(p, kv_ctas, "kv", p.num_kv_heads)


def list_tiles(p: ForwardParams) -> dict:
  """The ``(block_q, block_kv)`` tiles of the block maps the kernels walk
  with segment ids: the dK/dV kernel's query blocks per CTA of keys, and
  the dQ kernel's key blocks per CTA of queries (none with ``fused_dq``)."""
  cta = CONSUMERS * BLOCK
  tiles = {"dkv": (BLOCK, cta)}
  if not p.fused_dq:
    tiles["dq"] = (cta, BLOCK)
  return tiles


def _lse_log2(lse):
  return jnp.where(lse == -jnp.inf, jnp.inf, lse) * LOG2_E


def _probabilities(logits, lse, p: ForwardParams, tile, *, masked: bool,
                   tile_starts, q_len, kv_len, keys_are_rows=False,
                   streamed_ids=None):
  """P from the logits (`_logits`) and the rows' lse in log2 units
  (`_lse_log2`); P^T, with lse per column, with ``keys_are_rows`` (the
  dK/dV kernels' transposed tiles). A ``masked`` tile takes the element
  mask (`common.tile_allowed`); ``tile_starts()`` gives its ``(q_start,
  kv_start)``, computed for masked tiles only.

  ``streamed_ids``, with segment ids, is ``(own_ids, ids_slot,
  ids_ready)``: the CTA's own ids (`common.ROW_IDS`), the ring slot of the
  streamed block's ids and its barrier, which is waited on every step
  (barriers track their phase per wait)."""
  probs = jnp.exp2(logits - lax.broadcast_in_dim(
      lse, tile, [1 if keys_are_rows else 0]))
  if streamed_ids is not None:
    own_ids, ids_slot, ids_ready = streamed_ids
    plgpu.barrier_wait(ids_ready)
  if masked:
    segment_ids = None
    if streamed_ids is not None:
      segment_ids = (own_ids, common.load_ids(ids_slot, common.COLUMN_IDS))
    allowed = common.tile_allowed(p, tile, *tile_starts(), q_len, kv_len,
                                  keys_are_rows=keys_are_rows,
                                  segment_ids=segment_ids)
    probs = jnp.where(allowed, probs, 0.0)
  return probs


def _key_major_probabilities(s_t, lse_slot, p: ForwardParams, tile, *,
                             masked: bool, tile_starts, q_len, kv_len,
                             streamed_ids=None):
  """``(P^T, tanh)`` of a dK/dV kernel's tile of scores ``S^T = K Q^T``:
  the logits (`_logits`; tanh None without a soft-cap), the query block's
  lse read from its ring slot ``lse_slot``, then `_probabilities` with keys
  as rows (the other arguments are its own)."""
  logits, tanh = _logits(s_t, p)
  lse = _lse_log2(plgpu.load(lse_slot, layout=plgpu.Layout.WGMMA.reduce(0)))
  probs = _probabilities(logits, lse, p, tile, masked=masked,
                         tile_starts=tile_starts, q_len=q_len, kv_len=kv_len,
                         keys_are_rows=True, streamed_ids=streamed_ids)
  return probs, tanh


def _dscores(probs, dprobs, delta, tile, *, keys_are_rows=False, tanh=None):
  """dS = P * (dP - D) in float32 (transposed with ``keys_are_rows``),
  times tanh' (``1 - tanh^2``) with a soft-cap's ``tanh``."""
  ds = probs * (dprobs - lax.broadcast_in_dim(
      delta, tile, [1 if keys_are_rows else 0]))
  if tanh is not None:
    ds = ds * (1.0 - tanh * tanh)
  return ds


def _dkv_kernel(q_len_ref, kv_len_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
                delta_ref, *refs, p: ForwardParams):
  segment_refs, refs = common.SegmentRefs.split(p, refs)
  if p.segments:
    *refs, q_ids_ring, q_ids_ready = refs
  if p.fused_dq:
    (dq_acc_ref, dk_ref, dv_ref, k_smem, v_smem, q_ring, do_ring, lse_ring,
     delta_ring, kv_ready, q_ready, do_ready, lse_ready, delta_ready,
     ring_free, ds_smem, dq_smem, ds_ready) = refs
  else:
    (dk_ref, dv_ref, k_smem, v_smem, q_ring, do_ring, lse_ring, delta_ring,
     kv_ready, q_ready, do_ready, lse_ready, delta_ready, ring_free) = refs
  batch = lax.axis_index("batch")
  kv_head = lax.axis_index("heads")
  wg = lax.axis_index("wg")
  stages = p.stages
  q_len, kv_len = common.clipped_lengths(p, q_len_ref, kv_len_ref, batch)
  kv_tile = lax.axis_index("kv")
  cta_start = kv_tile * (CONSUMERS * BLOCK)
  if p.segments:
    walk = common.list_walk(segment_refs, batch, kv_tile)
  else:
    walk = common.range_walk(p.mask.q_block_range(
        cta_start, cta_start + CONSUMERS * BLOCK, q_len, kv_len, BLOCK))
  q_steps = walk.steps
  # Every query head of the GQA group, each over the same query blocks.
  steps = q_steps * p.groups

  def locate(t):
    group, i = lax.div(t, jnp.maximum(q_steps, 1)), lax.rem(
        t, jnp.maximum(q_steps, 1))
    return kv_head * p.groups + group, walk.block_of(i)

  @pl.when(wg == PRODUCER)
  def _producer():
    common.stream_query_blocks(
        p, common.QueryRing(
            q_ring, do_ring, lse_ring, delta_ring, q_ready, do_ready,
            lse_ready, delta_ready, ring_free,
            ids=((segment_refs.q_ids, q_ids_ring, q_ids_ready)
                 if p.segments else None)),
        q_ref, do_ref, lse_ref, delta_ref, batch=batch, steps=steps,
        locate=locate, block=BLOCK)

  @pl.when(wg < CONSUMERS)
  def _consumer():
    plgpu.set_max_registers(232, action="increase")
    kv_start = cta_start + wg * BLOCK
    keys = (batch, pl.ds(kv_start, BLOCK), kv_head)
    k_tile, v_tile = k_smem.at[pl.ds(wg * BLOCK, BLOCK)], v_smem.at[wg]
    plgpu.copy_gmem_to_smem(k_ref.at[keys], k_tile, kv_ready.at[wg])
    plgpu.copy_gmem_to_smem(v_ref.at[keys], v_tile,
                            kv_ready.at[CONSUMERS + wg])
    plgpu.barrier_wait(kv_ready.at[wg])
    plgpu.barrier_wait(kv_ready.at[CONSUMERS + wg])

    first_full, end_full = common.phase_steps(
        walk, lambda: p.mask.q_block_range(kv_start, kv_start + BLOCK, q_len,
                                           kv_len, BLOCK))
    tile = (BLOCK, BLOCK)          # [keys, queries]
    column = plgpu.Layout.WGMMA.reduce(0)
    if p.segments:
      kv_ids = common.load_ids(
          segment_refs.kv_ids.at[batch, pl.ds(kv_start, BLOCK)],
          common.ROW_IDS, from_global=True)

    split = _splits_dq_columns(p)
    dq_cols = p.head_dim // CONSUMERS if split else p.head_dim

    def both_consumers_meet():
      plgpu.barrier_arrive(ds_ready)
      plgpu.barrier_wait(ds_ready)

    def probabilities_of(s_t, slot, q_block, masked: bool):
      """P^T from the scores S^T (and tanh of the soft-capped logits)."""
      return _key_major_probabilities(
          s_t, lse_ring.at[slot], p, tile, masked=masked,
          tile_starts=lambda: (q_block * BLOCK, kv_start), q_len=q_len,
          kv_len=kv_len,
          streamed_ids=((kv_ids, q_ids_ring.at[slot], q_ids_ready.at[slot])
                        if p.segments else None))

    def dscores(probs, tanh, dp_t, slot):
      """dS^T = P^T * (dP^T - D), times tanh' with a soft-cap."""
      delta = plgpu.load(delta_ring.at[slot], layout=column)
      return _dscores(probs, dp_t, delta, tile, keys_are_rows=True,
                      tanh=tanh).astype(p.dtype)

    def step(t, carry, *, masked: bool):
      """Two rounds of products per query block: S^T with dP^T (P^T is
      formed while dP^T is still on the tensor cores), then dV with dK
      (dS^T is formed while dV's product runs)."""
      dk, dv = carry
      slot = lax.rem(t, jnp.int32(stages))
      _, q_block = locate(t)
      for ready in (q_ready, lse_ready, do_ready):
        plgpu.barrier_wait(ready.at[slot])

      def scores_and_dprobs(s_ref, dp_ref):
        plgpu.wgmma(s_ref, k_tile, q_ring.at[slot].transpose((1, 0)))
        plgpu.wgmma(dp_ref, v_tile, do_ring.at[slot].transpose((1, 0)))
        s_t = plgpu.wgmma_accumulator_load(s_ref, wait_n=1)
        return probabilities_of(s_t, slot, q_block, masked), dp_ref[...]
      (probs, tanh), dp_t = pl.run_scoped(
          scores_and_dprobs, plgpu.ACC(tile, jnp.float32),
          plgpu.ACC(tile, jnp.float32))
      plgpu.barrier_wait(delta_ready.at[slot])

      def dv_and_dk(refs):
        dv_ref, dk_ref = refs
        plgpu.wgmma(dv_ref, probs.astype(p.dtype), do_ring.at[slot])
        plgpu.wgmma(dk_ref, dscores(probs, tanh, dp_t, slot),
                    q_ring.at[slot])
      dv, dk = pl.run_state(dv_and_dk)((plgpu.ACC.init(dv),
                                        plgpu.ACC.init(dk)))
      plgpu.barrier_arrive(ring_free.at[slot])
      return dk, dv

    def fused_step(t, carry, *, masked: bool):
      """The step with dQ += dS K (dS read transposed from shared memory),
      the dQ tile then added into the float32 accumulator in global memory
      by a TMA reduce-add (order-dependent sums). Split by columns, each
      consumer forms half of dQ's head dim over all 128 keys of the CTA
      (one reduce-add per query block and column half); unsplit, its own
      64 keys' part of all of dQ (two reduce-adds per query block).

      Its products run one after another, except dK with dQ: pairing S
      with dP and dV with dK as `step` does (or dV, dK and dQ at once)
      measured slower here, 3.16-3.28 against 2.96 ms at B=4 T=4k N=16
      H=128 on an H100 (the dQ tile adds to the registers live; session 8
      in benchmarks/NOTES.md, whose logs were lost: re-measure)."""
      dk, dv = carry
      slot = lax.rem(t, jnp.int32(stages))
      head, q_block = locate(t)
      plgpu.barrier_wait(q_ready.at[slot])
      plgpu.barrier_wait(lse_ready.at[slot])

      def scores(acc_ref):
        plgpu.wgmma(acc_ref, k_tile, q_ring.at[slot].transpose((1, 0)))
        return acc_ref[...]
      s_t = pl.run_scoped(scores, plgpu.ACC(tile, jnp.float32))
      probs, tanh = probabilities_of(s_t, slot, q_block, masked)
      plgpu.barrier_wait(do_ready.at[slot])
      plgpu.barrier_wait(delta_ready.at[slot])

      def dv_update(acc_ref):
        plgpu.wgmma(acc_ref, probs.astype(p.dtype), do_ring.at[slot])
      dv = pl.run_state(dv_update)(plgpu.ACC.init(dv))

      def dprobs(acc_ref):
        plgpu.wgmma(acc_ref, v_tile, do_ring.at[slot].transpose((1, 0)))
        return acc_ref[...]
      dp_t = pl.run_scoped(dprobs, plgpu.ACC(tile, jnp.float32))
      ds_t = dscores(probs, tanh, dp_t, slot)
      # Two dS buffers by step parity: the other consumer may still read
      # this step's buffer while this one writes the next.
      ds_all = ds_smem.at[lax.rem(t, 2)]
      ds_all.at[pl.ds(wg * BLOCK, BLOCK)][...] = ds_t
      plgpu.commit_smem()
      if split:
        both_consumers_meet()     # the other consumer's dS rows are in
        cols = pl.ds(wg * dq_cols, dq_cols)
        ds_rows, k_rows = ds_all, k_smem.at[:, cols]
      else:
        cols = pl.ds(0, dq_cols)
        ds_rows, k_rows = ds_all.at[pl.ds(wg * BLOCK, BLOCK)], k_tile

      def dk_and_dq(dq_ref):
        def dk_product(dk_ref):
          plgpu.wgmma(dk_ref, ds_t, q_ring.at[slot])
          plgpu.wgmma(dq_ref, ds_rows.transpose((1, 0)), k_rows)
        return pl.run_state(dk_product)(plgpu.ACC.init(dk)), dq_ref[...]
      dk, dq = pl.run_scoped(dk_and_dq,
                             plgpu.ACC((BLOCK, dq_cols), jnp.float32))
      plgpu.barrier_arrive(ring_free.at[slot])
      dq_tile = dq_smem.at[wg]
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # last add has read it
      dq_tile[...] = dq
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(
          dq_tile,
          dq_acc_ref.at[batch, pl.ds(q_block * BLOCK, BLOCK), head, cols],
          reduction_op="add")
      return dk, dv

    zeros = plgpu.layout_cast(jnp.zeros((BLOCK, p.head_dim), jnp.float32),
                              plgpu.Layout.WGMMA)

    def over_group(group, carry):
      base = group * q_steps
      one_step = fused_step if p.fused_dq else step
      shifted = lambda t, c, *, masked: one_step(base + t, c, masked=masked)
      return common.run_phases(q_steps, first_full, end_full, shifted, carry)

    dk, dv = lax.fori_loop(0, p.groups, over_group, (zeros, zeros))
    if p.fused_dq and split:
      both_consumers_meet()   # the other consumer's last dQ has read K
    k_tile[...] = (dk * p.scale).astype(p.dtype)
    v_tile[...] = dv.astype(p.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(k_tile, dk_ref.at[keys])
    plgpu.copy_smem_to_gmem(v_tile, dv_ref.at[keys])
    plgpu.wait_smem_to_gmem(0)   # also the last dQ reduce-add


def _dq_kernel(q_len_ref, kv_len_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
               delta_ref, *refs, p: ForwardParams):
  segment_refs, refs = common.SegmentRefs.split(p, refs)
  (dq_ref, q_smem, do_smem, lse_smem, delta_smem, k_ring, v_ring, row_ready,
   k_ready, v_ready, k_free, v_free, *ids_scratch) = refs
  batch = lax.axis_index("batch")
  head = lax.axis_index("heads")
  wg = lax.axis_index("wg")
  block_kv, stages = BLOCK, p.stages
  q_len, kv_len = common.clipped_lengths(p, q_len_ref, kv_len_ref, batch)
  # The forward's query tiles, in its order (the last first).
  q_tile = p.q_tile_of(lax.axis_index("q"))
  cta_start = q_tile * p.rows_per_cta
  walk = common.query_major_walk(p, segment_refs, batch, q_tile, q_len,
                                 kv_len, block_kv)
  steps = walk.steps
  if p.segments:
    kv_ids_ring, kv_ids_ready = ids_scratch

  @pl.when(wg == PRODUCER)
  def _producer():
    plgpu.set_max_registers(40, action="decrease")
    common.stream_kv(
        p, k_ref, v_ref, k_ring, v_ring, k_ready, v_ready, k_free, v_free,
        batch=batch, head=head, walk=walk, block_kv=block_kv,
        kv_ids=((segment_refs.kv_ids, kv_ids_ring, kv_ids_ready)
                if p.segments else None))

  @pl.when(wg < CONSUMERS)
  def _consumer():
    plgpu.set_max_registers(232, action="increase")
    q_start = cta_start + wg * BLOCK
    rows = pl.ds(q_start, BLOCK)
    q_tile, do_tile = q_smem.at[wg], do_smem.at[wg]
    # One barrier per array: each TMA copy arrives on its own barrier.
    ready = lambda i: row_ready.at[i * CONSUMERS + wg]
    plgpu.copy_gmem_to_smem(q_ref.at[batch, rows, head], q_tile, ready(0))
    plgpu.copy_gmem_to_smem(do_ref.at[batch, rows, head], do_tile, ready(1))
    plgpu.copy_gmem_to_smem(lse_ref.at[batch, head, rows], lse_smem.at[wg],
                            ready(2))
    plgpu.copy_gmem_to_smem(delta_ref.at[batch, head, rows],
                            delta_smem.at[wg], ready(3))
    for i in range(4):
      plgpu.barrier_wait(ready(i))
    row = plgpu.Layout.WGMMA.reduce(1)
    lse = _lse_log2(plgpu.load(lse_smem.at[wg], layout=row))
    delta = plgpu.load(delta_smem.at[wg], layout=row)

    first_full, end_full = common.phase_steps(
        walk, lambda: p.mask.kv_block_range(q_start, q_start + BLOCK, q_len,
                                            kv_len, block_kv))
    tile = (BLOCK, block_kv)
    if p.segments:
      q_ids = common.load_ids(segment_refs.q_ids.at[batch, rows],
                              common.ROW_IDS, from_global=True)

    def step(t, dq, *, masked: bool):
      slot = lax.rem(t, jnp.int32(stages))
      plgpu.barrier_wait(k_ready.at[slot])
      plgpu.barrier_wait(v_ready.at[slot])

      # S and dP issued together; P is formed while dP is in flight.
      def products(s_ref, dp_ref):
        plgpu.wgmma(s_ref, q_tile, k_ring.at[slot].transpose((1, 0)))
        plgpu.wgmma(dp_ref, do_tile, v_ring.at[slot].transpose((1, 0)))
        s = plgpu.wgmma_accumulator_load(s_ref, wait_n=1)
        logits, tanh = _logits(s, p)
        probs = _probabilities(
            logits, lse, p, tile, masked=masked,
            tile_starts=lambda: (q_start, walk.block_of(t) * block_kv),
            q_len=q_len, kv_len=kv_len,
            streamed_ids=((q_ids, kv_ids_ring.at[slot],
                           kv_ids_ready.at[slot]) if p.segments else None))
        return probs, tanh, dp_ref[...]
      probs, tanh, dp = pl.run_scoped(products, plgpu.ACC(tile, jnp.float32),
                                      plgpu.ACC(tile, jnp.float32))
      plgpu.barrier_arrive(v_free.at[slot])
      ds = _dscores(probs, dp, delta, tile, tanh=tanh)

      def dq_update(acc_ref):
        plgpu.wgmma(acc_ref, ds.astype(p.dtype), k_ring.at[slot])
      dq = pl.run_state(dq_update)(plgpu.ACC.init(dq))
      plgpu.barrier_arrive(k_free.at[slot])
      return dq

    zeros = plgpu.layout_cast(jnp.zeros((BLOCK, p.head_dim), jnp.float32),
                              plgpu.Layout.WGMMA)
    dq = common.run_phases(steps, first_full, end_full, step, zeros)
    q_tile[...] = (dq * p.scale).astype(p.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_tile, dq_ref.at[batch, rows, head])
    plgpu.wait_smem_to_gmem(0)


def check_consumers(p: ForwardParams) -> None:
  """Raises ValueError unless ``p`` has the backward kernels' consumer count:
  they run CONSUMERS warpgroups of BLOCK rows, so more rows per CTA (a
  three-consumer forward's params) would go without dQ."""
  if p.consumers != CONSUMERS:
    raise ValueError(f"the backward kernels take {CONSUMERS} consumers, "
                     f"got {p.consumers}")


def backward(p: ForwardParams, query, key, value, dout, lse, delta, q_lengths,
             kv_lengths, dkv_segments=(), dq_segments=()):
  """Returns ``(dq, dk, dv)``.

  With ``p.segments``, ``dkv_segments`` and ``dq_segments`` are
  `common.segment_operands` of the padded ids and, respectively, the query
  lists and the key lists of the `list_tiles` maps (``dq_segments`` is
  unused with ``p.fused_dq``).

  Sequence lengths are multiples of 8 and head dims of 64 (callers pad);
  ``lse``/``delta`` are float32 ``[B, N, T]``. Tiles hanging past T or S
  read zeros through TMA, which contribute nothing (zero Q and dO rows give
  zero products; padded keys are masked by ``kv_len``), and their stores
  are clipped.

  With ``p.fused_dq`` one kernel forms all three gradients (5 products per
  tile instead of 7): dQ is summed in float32 in global memory by TMA
  reduce-adds, whose order varies from run to run.
  """
  check_consumers(p)
  kernel = functools.partial(
      plgpu.kernel, num_threads=CONSUMERS + 1, thread_name="wg",
      compiler_params=common.compiler_params())
  stages = p.stages
  vector = lambda *shape: plgpu.SMEM(shape, jnp.float32)

  operands = (q_lengths, kv_lengths, query, key, value, dout, lse, delta)
  dkv_scratch = [
      _smem(p, CONSUMERS * BLOCK, p.head_dim),         # K
      _smem(p, CONSUMERS, BLOCK, p.head_dim),          # V
      _smem(p, stages, BLOCK, p.head_dim),             # Q ring
      _smem(p, stages, BLOCK, p.head_dim),             # dO ring
      vector(stages, BLOCK),                           # lse ring
      vector(stages, BLOCK),                           # D ring
      plgpu.Barrier(num_barriers=2 * CONSUMERS),       # K, V landed
      plgpu.Barrier(num_barriers=stages),              # Q landed
      plgpu.Barrier(num_barriers=stages),              # dO landed
      plgpu.Barrier(num_barriers=stages),              # lse landed
      plgpu.Barrier(num_barriers=stages),              # D landed
      plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),  # free
  ]
  dkv_operands = operands + tuple(dkv_segments)
  if p.fused_dq:
    dq_cols = p.head_dim // CONSUMERS if _splits_dq_columns(p) else p.head_dim
    dkv_scratch += [
        _smem(p, 2, CONSUMERS * BLOCK, BLOCK),         # dS^T (keys x queries)
        plgpu.SMEM((CONSUMERS, BLOCK, dq_cols), jnp.float32,
                   transforms=(plgpu.TilingTransform((8, 32)),
                               plgpu.SwizzleTransform(128))),  # dQ part
        plgpu.Barrier(num_arrivals=CONSUMERS),         # both dS written
    ]
    # Reduce-adds need a zeroed accumulator that the kernel updates in
    # place: a mutable array, aliased to the kernel's input. (A head-major
    # [B, N, T, H] one was tried and measured slower; benchmarks/NOTES.md,
    # session 8.)
    dq_acc = jax.new_ref(jnp.zeros(query.shape, jnp.float32))
    dkv_operands += (dq_acc,)
  dkv_scratch += common.ids_scratch(p, BLOCK)
  dk, dv = kernel(
      functools.partial(_dkv_kernel, p=p),
      out_type=varying_like([jax.ShapeDtypeStruct(key.shape, key.dtype),
                             jax.ShapeDtypeStruct(value.shape, value.dtype)],
                            *operands),
      scratch_types=dkv_scratch,
      kernel_name=KERNEL_NAMES["dkv_dq" if p.fused_dq else "dkv"],
      **_dkv_grid(p),
  )(*dkv_operands)
  if p.fused_dq:
    dq = (jax.freeze(dq_acc) * p.scale).astype(query.dtype)
    return dq, dk, dv

  dq = kernel(
      functools.partial(_dq_kernel, p=p),
      out_type=varying_like(jax.ShapeDtypeStruct(query.shape, query.dtype),
                            *operands),
      scratch_types=[
          _smem(p, CONSUMERS, BLOCK, p.head_dim),          # Q
          _smem(p, CONSUMERS, BLOCK, p.head_dim),          # dO
          vector(CONSUMERS, BLOCK),                        # lse
          vector(CONSUMERS, BLOCK),                        # D
          _smem(p, stages, BLOCK, p.head_dim),             # K ring
          _smem(p, stages, BLOCK, p.head_dim),             # V ring
          plgpu.Barrier(num_barriers=4 * CONSUMERS),       # Q, dO, lse, D
          plgpu.Barrier(num_barriers=stages),              # K landed
          plgpu.Barrier(num_barriers=stages),              # V landed
          plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),  # K free
          plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),  # V free
      ] + common.ids_scratch(p, BLOCK),
      kernel_name=KERNEL_NAMES["dq"],
      **common.sequence_major_grid(p, p.num_q_tiles, "q", p.num_heads),
  )(*operands, *dq_segments)
  return dq, dk, dv
