"""FlashAttention-2 backward for head dim 256 (after padding), in Pallas'
Mosaic GPU dialect.

`backward` keeps a consumer's gradient rows whole: 64 keys' dK and dV, or
64 queries' dQ, in one warpgroup's registers. At head dim 256 that is 2 x
64 x 256 float32 for dK/dV, 256 registers a thread, more than a thread has,
and 128 keys' K and V beside a Q/dO ring would not fit shared memory
either. So here the two consumer warpgroups of a CTA split its gradient
rows by the head dim:

* dK/dV (key-major): a CTA owns 64 keys of one (batch, kv head) and walks
  64-query blocks of every query head of its GQA group. Per block, each
  consumer forms the transposed scores ``S^T = K Q^T`` and ``dP^T = V
  dO^T`` over the whole head dim, then ``P^T`` and ``dS^T`` in registers,
  and consumer ``c`` accumulates ``dV[:, half c] += P^T dO[:, half c]`` and
  ``dK[:, half c] += dS^T Q[:, half c]``.
* dQ (query-major): a CTA owns 64 queries of one (batch, head) and walks
  64-key blocks; each consumer forms ``S``, ``dP`` and ``dS``, and consumer
  ``c`` accumulates ``dQ[:, half c] += dS K[:, half c]``.

Both consumers form the same score tiles, so the tensor cores do 3 (dK/dV)
or 2.5 (dQ) products' work where 2 (1.5) would do. The alternatives were
worse here: splitting the score tile's columns between the consumers gives
64 x 32 wgmma tiles, whose B operand Mosaic GPU's layout inference refuses
from our 128-byte swizzled rings (for M = 64 it splits N into two groups,
none narrower than a swizzle tile), and trading the halves of P^T and dS^T
through shared memory needs more of it than the rings leave. The
consumers never wait on each other. dQ always has its own kernel, so the
backward is deterministic whatever ``deterministic`` says. The
probabilities come from the saved logsumexp; the element mask, segment ids
and soft-cap act as in `backward`, whose helpers this module shares.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from flash_jax.backends.pallas_mosaic_gpu import common
from flash_jax.backends.pallas_mosaic_gpu.backward import (
    BLOCK, _logits, _lse_log2, _smem)
from flash_jax.backends.pallas_mosaic_gpu.forward import (
    CONSUMERS, PRODUCER, ForwardParams)
from flash_jax.masks import heavy_first
from flash_jax.sharding import varying_like


def list_tiles(p: ForwardParams) -> dict:
  """The ``(block_q, block_kv)`` tiles of the block maps the kernels walk
  with segment ids: one 64 x 64 tile per step of either kernel."""
  del p
  return {"dkv": (BLOCK, BLOCK), "dq": (BLOCK, BLOCK)}


def _half(i, p: ForwardParams):
  """Consumer ``i``'s half of the head dim."""
  return pl.ds(i * (p.head_dim // CONSUMERS), p.head_dim // CONSUMERS)


def _halves_product(acc_ref, a_halves, b, p: ForwardParams):
  """Issues ``acc += A B^T`` over the head dim, with ``A`` held as its two
  column halves (``a_halves.at[i]``, so that each half is one contiguous
  buffer a TMA copy can fill and drain) and ``b`` whole."""
  for i in range(CONSUMERS):
    plgpu.wgmma(acc_ref, a_halves.at[i],
                b.at[:, _half(i, p)].transpose((1, 0)))


def _dkv_kernel(q_len_ref, kv_len_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
                delta_ref, *refs, p: ForwardParams):
  segment_refs, refs = common.SegmentRefs.split(p, refs)
  (dk_ref, dv_ref, k_smem, v_smem, q_ring, do_ring, lse_ring, delta_ring,
   kv_ready, q_ready, do_ready, lse_ready, delta_ready, ring_free, done,
   *ids_scratch) = refs
  if p.segments:
    q_ids_ring, q_ids_ready = ids_scratch
  batch = lax.axis_index("batch")
  kv_head = lax.axis_index("heads")
  wg = lax.axis_index("wg")
  q_len, kv_len = common.clipped_lengths(p, q_len_ref, kv_len_ref, batch)
  kv_tile = lax.axis_index("kv")
  kv_start = kv_tile * BLOCK
  keys = (batch, pl.ds(kv_start, BLOCK), kv_head)
  own_range = lambda: p.mask.q_block_range(kv_start, kv_start + BLOCK, q_len,
                                           kv_len, BLOCK)
  if p.segments:
    walk = common.list_walk(segment_refs, batch, kv_tile)
  else:
    walk = common.range_walk(own_range())
  q_steps = walk.steps
  steps = q_steps * p.groups   # every query head of the GQA group

  def locate(t):
    per_head = jnp.maximum(q_steps, 1)
    return (kv_head * p.groups + lax.div(t, per_head),
            walk.block_of(lax.rem(t, per_head)))

  @pl.when(wg == PRODUCER)
  def _producer():
    for i, (src, dst) in enumerate((
        (k_ref, k_smem.at[0]), (k_ref, k_smem.at[1]),
        (v_ref, v_smem.at[0]), (v_ref, v_smem.at[1]))):
      plgpu.copy_gmem_to_smem(src.at[(*keys, _half(i % CONSUMERS, p))], dst,
                              kv_ready.at[i])
    common.stream_query_blocks(
        p, common.QueryRing(
            q_ring, do_ring, lse_ring, delta_ring, q_ready, do_ready,
            lse_ready, delta_ready, ring_free,
            *((q_ids_ring, q_ids_ready) if p.segments else ())),
        q_ref, do_ref, lse_ref, delta_ref, batch=batch, steps=steps,
        locate=locate, block=BLOCK,
        q_ids_ref=segment_refs.q_ids if p.segments else None)

  @pl.when(wg < CONSUMERS)
  def _consumer():
    plgpu.set_max_registers(232, action="increase")
    for i in range(2 * CONSUMERS):
      plgpu.barrier_wait(kv_ready.at[i])
    # Both consumers cover all 64 keys, so the CTA's range is each one's.
    first_full, end_full = common.phase_steps(walk, own_range)
    tile = (BLOCK, BLOCK)                # [keys, queries]
    column = plgpu.Layout.WGMMA.reduce(0)
    cols = _half(wg, p)
    if p.segments:
      kv_ids = common.load_ids(segment_refs.kv_ids.at[batch, pl.ds(
          kv_start, BLOCK)], common.ROW_IDS, from_global=True)

    def step(t, carry, *, masked: bool):
      dk, dv = carry
      slot = lax.rem(t, jnp.int32(p.stages))
      _, q_block = locate(t)
      for ready in (q_ready, lse_ready, do_ready):
        plgpu.barrier_wait(ready.at[slot])

      def scores_and_dprobs(s_ref, dp_ref):
        _halves_product(s_ref, k_smem, q_ring.at[slot], p)
        _halves_product(dp_ref, v_smem, do_ring.at[slot], p)
        s_t = plgpu.wgmma_accumulator_load(s_ref, wait_n=1)
        logits, tanh = _logits(s_t, p)
        lse = _lse_log2(plgpu.load(lse_ring.at[slot], layout=column))
        probs = jnp.exp2(logits - lax.broadcast_in_dim(lse, tile, [1]))
        if p.segments:
          # Every step waits (barriers track their phase per wait).
          plgpu.barrier_wait(q_ids_ready.at[slot])
        if masked:
          segment_ids = None
          if p.segments:
            segment_ids = (kv_ids, common.load_ids(q_ids_ring.at[slot],
                                                   common.COLUMN_IDS))
          allowed = common.tile_allowed(
              p, tile, q_block * BLOCK, kv_start, q_len, kv_len,
              keys_are_rows=True, segment_ids=segment_ids)
          probs = jnp.where(allowed, probs, 0.0)
        return probs, tanh, dp_ref[...]
      probs, tanh, dp_t = pl.run_scoped(
          scores_and_dprobs, plgpu.ACC(tile, jnp.float32),
          plgpu.ACC(tile, jnp.float32))
      plgpu.barrier_wait(delta_ready.at[slot])
      delta = plgpu.load(delta_ring.at[slot], layout=column)
      ds_t = probs * (dp_t - lax.broadcast_in_dim(delta, tile, [1]))
      if tanh is not None:
        ds_t = ds_t * (1.0 - tanh * tanh)

      def dv_and_dk(refs):
        dv_ref, dk_ref = refs
        plgpu.wgmma(dv_ref, probs.astype(p.dtype), do_ring.at[slot, :, cols])
        plgpu.wgmma(dk_ref, ds_t.astype(p.dtype), q_ring.at[slot, :, cols])
      dv, dk = pl.run_state(dv_and_dk)((plgpu.ACC.init(dv),
                                        plgpu.ACC.init(dk)))
      plgpu.barrier_arrive(ring_free.at[slot])
      return dk, dv

    zeros = plgpu.layout_cast(
        jnp.zeros((BLOCK, p.head_dim // CONSUMERS), jnp.float32),
        plgpu.Layout.WGMMA)

    def over_group(group, carry):
      base = group * q_steps
      shifted = lambda t, c, *, masked: step(base + t, c, masked=masked)
      return common.run_phases(q_steps, first_full, end_full, shifted, carry)

    dk, dv = lax.fori_loop(0, p.groups, over_group, (zeros, zeros))
    # Both consumers read all of K and V until their last step: meet first.
    plgpu.barrier_arrive(done)
    plgpu.barrier_wait(done)
    k_out, v_out = k_smem.at[wg], v_smem.at[wg]
    k_out[...] = (dk * p.scale).astype(p.dtype)
    v_out[...] = dv.astype(p.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(k_out, dk_ref.at[(*keys, cols)])
    plgpu.copy_smem_to_gmem(v_out, dv_ref.at[(*keys, cols)])
    plgpu.wait_smem_to_gmem(0)


def _num_q_tiles(p: ForwardParams) -> int:
  return -(-p.q_seq // BLOCK)


def _dq_kernel(q_len_ref, kv_len_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
               delta_ref, *refs, p: ForwardParams):
  segment_refs, refs = common.SegmentRefs.split(p, refs)
  (dq_ref, q_smem, do_smem, lse_smem, delta_smem, k_ring, v_ring, row_ready,
   k_ready, v_ready, k_free, v_free, done, *ids_scratch) = refs
  if p.segments:
    kv_ids_ring, kv_ids_ready = ids_scratch
  batch = lax.axis_index("batch")
  head = lax.axis_index("heads")
  wg = lax.axis_index("wg")
  q_len, kv_len = common.clipped_lengths(p, q_len_ref, kv_len_ref, batch)
  # Last tile first, as in the forward (`flash_jax.masks.heavy_first`).
  q_tile = heavy_first(lax.axis_index("q"), _num_q_tiles(p))
  q_start = q_tile * BLOCK
  rows = (batch, pl.ds(q_start, BLOCK), head)
  walk = common.query_major_walk(p, segment_refs, batch, q_tile, q_len,
                                 kv_len, BLOCK, rows=BLOCK)

  @pl.when(wg == PRODUCER)
  def _producer():
    for i, (src, dst) in enumerate((
        (q_ref.at[(*rows, _half(0, p))], q_smem.at[0]),
        (q_ref.at[(*rows, _half(1, p))], q_smem.at[1]),
        (do_ref.at[rows], do_smem),
        (lse_ref.at[batch, head, pl.ds(q_start, BLOCK)], lse_smem),
        (delta_ref.at[batch, head, pl.ds(q_start, BLOCK)], delta_smem))):
      plgpu.copy_gmem_to_smem(src, dst, row_ready.at[i])
    common.stream_kv(
        p, k_ref, v_ref, k_ring, v_ring, k_ready, v_ready, k_free, v_free,
        batch=batch, head=head, walk=walk, block_kv=BLOCK,
        kv_ids=((segment_refs.kv_ids, kv_ids_ring, kv_ids_ready)
                if p.segments else None))

  @pl.when(wg < CONSUMERS)
  def _consumer():
    plgpu.set_max_registers(232, action="increase")
    for i in range(5):
      plgpu.barrier_wait(row_ready.at[i])
    row = plgpu.Layout.WGMMA.reduce(1)
    lse = _lse_log2(plgpu.load(lse_smem, layout=row))
    delta = plgpu.load(delta_smem, layout=row)
    first_full, end_full = common.phase_steps(
        walk, lambda: p.mask.kv_block_range(q_start, q_start + BLOCK, q_len,
                                            kv_len, BLOCK))
    tile = (BLOCK, BLOCK)                # [queries, keys]
    cols = _half(wg, p)
    if p.segments:
      q_ids = common.load_ids(segment_refs.q_ids.at[batch, pl.ds(
          q_start, BLOCK)], common.ROW_IDS, from_global=True)

    def step(t, dq, *, masked: bool):
      slot = lax.rem(t, jnp.int32(p.stages))
      plgpu.barrier_wait(k_ready.at[slot])
      plgpu.barrier_wait(v_ready.at[slot])

      def scores_and_dprobs(s_ref, dp_ref):
        _halves_product(s_ref, q_smem, k_ring.at[slot], p)
        plgpu.wgmma(dp_ref, do_smem, v_ring.at[slot].transpose((1, 0)))
        s = plgpu.wgmma_accumulator_load(s_ref, wait_n=1)
        logits, tanh = _logits(s, p)
        probs = jnp.exp2(logits - lax.broadcast_in_dim(lse, tile, [0]))
        if p.segments:
          # Every step waits (barriers track their phase per wait).
          plgpu.barrier_wait(kv_ids_ready.at[slot])
        if masked:
          segment_ids = None
          if p.segments:
            segment_ids = (q_ids, common.load_ids(kv_ids_ring.at[slot],
                                                  common.COLUMN_IDS))
          allowed = common.tile_allowed(p, tile, q_start,
                                        walk.block_of(t) * BLOCK, q_len,
                                        kv_len, segment_ids=segment_ids)
          probs = jnp.where(allowed, probs, 0.0)
        return probs, tanh, dp_ref[...]
      probs, tanh, dp = pl.run_scoped(
          scores_and_dprobs, plgpu.ACC(tile, jnp.float32),
          plgpu.ACC(tile, jnp.float32))
      plgpu.barrier_arrive(v_free.at[slot])
      ds = probs * (dp - lax.broadcast_in_dim(delta, tile, [0]))
      if tanh is not None:
        ds = ds * (1.0 - tanh * tanh)

      def dq_update(dq_ref):
        plgpu.wgmma(dq_ref, ds.astype(p.dtype), k_ring.at[slot, :, cols])
      dq = pl.run_state(dq_update)(plgpu.ACC.init(dq))
      plgpu.barrier_arrive(k_free.at[slot])
      return dq

    zeros = plgpu.layout_cast(
        jnp.zeros((BLOCK, p.head_dim // CONSUMERS), jnp.float32),
        plgpu.Layout.WGMMA)
    dq = common.run_phases(walk.steps, first_full, end_full, step, zeros)
    # Both consumers read all of Q until their last step: meet first.
    plgpu.barrier_arrive(done)
    plgpu.barrier_wait(done)
    dq_out = q_smem.at[wg]
    dq_out[...] = (dq * p.scale).astype(p.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(dq_out, dq_ref.at[(*rows, cols)])
    plgpu.wait_smem_to_gmem(0)


def backward(p: ForwardParams, query, key, value, dout, lse, delta, q_lengths,
             kv_lengths, dkv_segments=(), dq_segments=()):
  """Returns ``(dq, dk, dv)``; the arguments are `backward.backward`'s
  (``dq_segments`` is always used: dQ has its own kernel here)."""
  kernel = functools.partial(
      plgpu.kernel, num_threads=CONSUMERS + 1, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True))
  stages = p.stages
  vector = lambda *shape: plgpu.SMEM(shape, jnp.float32)
  operands = (q_lengths, kv_lengths, query, key, value, dout, lse, delta)
  ids_scratch = lambda: [plgpu.SMEM((stages, BLOCK), jnp.int32),  # ids ring
                         plgpu.Barrier(num_barriers=stages)]      # landed
  dk, dv = kernel(
      functools.partial(_dkv_kernel, p=p),
      out_type=varying_like([jax.ShapeDtypeStruct(key.shape, key.dtype),
                             jax.ShapeDtypeStruct(value.shape, value.dtype)],
                            *operands),
      scratch_types=[
          _smem(p, CONSUMERS, BLOCK, p.head_dim // 2),  # K halves, then dK
          _smem(p, CONSUMERS, BLOCK, p.head_dim // 2),  # V, then dV
          _smem(p, stages, BLOCK, p.head_dim),         # Q ring
          _smem(p, stages, BLOCK, p.head_dim),         # dO ring
          vector(stages, BLOCK),                       # lse ring
          vector(stages, BLOCK),                       # D ring
          plgpu.Barrier(num_barriers=2 * CONSUMERS),   # K, V halves landed
          plgpu.Barrier(num_barriers=stages),          # Q landed
          plgpu.Barrier(num_barriers=stages),          # dO landed
          plgpu.Barrier(num_barriers=stages),          # lse landed
          plgpu.Barrier(num_barriers=stages),          # D landed
          plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),  # free
          plgpu.Barrier(num_arrivals=CONSUMERS),       # K, V read
      ] + (ids_scratch() if p.segments else []),
      **common.sequence_major_grid(p, pl.cdiv(p.kv_seq, BLOCK), "kv",
                                   p.num_kv_heads),
  )(*operands, *dkv_segments)
  dq = kernel(
      functools.partial(_dq_kernel, p=p),
      out_type=varying_like(jax.ShapeDtypeStruct(query.shape, query.dtype),
                            *operands),
      scratch_types=[
          _smem(p, CONSUMERS, BLOCK, p.head_dim // 2),  # Q halves, then dQ
          _smem(p, BLOCK, p.head_dim),                 # dO
          vector(BLOCK),                               # lse
          vector(BLOCK),                               # D
          _smem(p, stages, BLOCK, p.head_dim),         # K ring
          _smem(p, stages, BLOCK, p.head_dim),         # V ring
          plgpu.Barrier(num_barriers=5),               # Q halves, dO, lse, D
          plgpu.Barrier(num_barriers=stages),          # K landed
          plgpu.Barrier(num_barriers=stages),          # V landed
          plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),  # K free
          plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),  # V free
          plgpu.Barrier(num_arrivals=CONSUMERS),       # Q read
      ] + (ids_scratch() if p.segments else []),
      **common.sequence_major_grid(p, _num_q_tiles(p), "q", p.num_heads),
  )(*operands, *dq_segments)
  return dq, dk, dv
