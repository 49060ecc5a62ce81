"""FlashAttention-2 backward for head dim 256 (after padding), in Pallas'
Mosaic GPU dialect.

`backward` gives each consumer warpgroup 64 rows of the gradients (64 keys'
dK and dV, or 64 queries' dQ) and has it form every product of those rows.
At head dim 256 that needs 2 x 64 x 256 float32 accumulators for dK/dV,
256 registers a thread, more than a thread has; and 128 keys' K and V beside
a Q/dO ring would not fit shared memory. So here a CTA owns 64 rows and its
two consumers split the work by role:

* dK/dV (key-major; a CTA owns 64 keys of one (batch, kv head) and walks
  64-query blocks of every query head of its GQA group, streamed by the
  producer warpgroup):
  - the *scores* consumer forms ``S^T = K Q^T``, then ``P^T`` from the
    saved logsumexp and the element mask, hands ``P^T`` (times ``1 -
    tanh^2`` with a soft-cap) to the other consumer through shared memory,
    and accumulates ``dV += P^T dO``;
  - the *gradients* consumer forms ``dP^T = V dO^T``, takes the handed-over
    tile, forms ``dS^T = P^T (dP^T - D)`` and accumulates ``dK += dS^T Q``.
* dQ (query-major; a CTA owns 64 queries of one (batch, head) and walks
  64-key blocks): the scores consumer forms ``S`` and hands over ``P``; the
  gradients consumer forms ``dP``, ``dS`` and accumulates ``dQ += dS K``.

No product is formed twice, so the tensor cores do FlashAttention-2's 4
(dK/dV) and 3 (dQ) products per tile; each accumulator is 64 x 256 float32
in one warpgroup, as in the head-dim-128 kernels' pair of 64 x 128 ones.
The handed-over tile is float32 and single-buffered: the scores consumer
writes the next one once the gradients consumer has loaded the last (a
"free" barrier). Each result goes out through the shared buffer of an
operand only its own consumer reads (dV through K, dK through V, dQ through
dO), so neither waits for the other at the end. dQ always has its own
kernel, so the backward is deterministic whatever ``deterministic`` says.
The element mask, segment ids and soft-cap act as in `backward`, whose
helpers this module shares. (A first version had both consumers form S and
dP and split the accumulators' columns: 6 and 5 products per tile, 0.90x
cuDNN forward+backward against this one's 1.11x at B=4 T=4k N=8;
benchmarks/NOTES.md, session 13.)
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
    BLOCK, _dscores, _key_major_probabilities, _logits, _lse_log2,
    _probabilities, _smem, check_consumers)
from flash_jax.backends.pallas_mosaic_gpu.forward import (
    CONSUMERS, PRODUCER, ForwardParams)
from flash_jax.masks import heavy_first
from flash_jax.sharding import varying_like


def list_tiles(p: ForwardParams) -> dict:
  """The ``(block_q, block_kv)`` tiles of the block maps the kernels walk
  with segment ids: one 64 x 64 tile per step of either kernel."""
  del p
  return {"dkv": (BLOCK, BLOCK), "dq": (BLOCK, BLOCK)}


SCORES, GRADIENTS = 0, 1   # the consumer warpgroups' roles

# The kernels' names in profiles (Nsight Compute's ``-k``).
KERNEL_NAMES = {"dkv": "flash_jax_mosaic_wide_dkv",
                "dq": "flash_jax_mosaic_wide_dq"}


def _hand_over(t, tile, buffer, ready, free):
  """The scores consumer's side of the hand-over of step ``t``'s tile."""
  @pl.when(t > 0)
  def _():
    plgpu.barrier_wait(free)     # the previous tile has been loaded
  buffer[...] = tile
  plgpu.commit_smem()
  plgpu.barrier_arrive(ready)


def _take_over(buffer, ready, free):
  """The gradients consumer's side: the handed-over tile, in registers."""
  plgpu.barrier_wait(ready)
  tile = plgpu.load(buffer, layout=plgpu.Layout.WGMMA)
  plgpu.barrier_arrive(free)
  return tile


def _tile_smem():
  """Shared memory for the handed-over 64 x 64 float32 tile."""
  return plgpu.SMEM((BLOCK, BLOCK), jnp.float32,
                    transforms=(plgpu.TilingTransform((8, 32)),
                                plgpu.SwizzleTransform(128)))


def _handed_probs(probs, tanh):
  """What dS needs of P: P, times tanh' (``1 - tanh^2``) with a soft-cap."""
  return probs if tanh is None else probs * (1.0 - tanh * tanh)


def _dkv_kernel(q_len_ref, kv_len_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
                delta_ref, *refs, p: ForwardParams):
  segment_refs, refs = common.SegmentRefs.split(p, refs)
  (dk_ref, dv_ref, k_smem, v_smem, q_ring, do_ring, lse_ring, delta_ring,
   kv_ready, q_ready, do_ready, lse_ready, delta_ready, ring_free,
   probs_smem, probs_ready, probs_free, *ids_scratch) = refs
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
    plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem, kv_ready.at[0])
    plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem, kv_ready.at[1])
    common.stream_query_blocks(
        p, common.QueryRing(
            q_ring, do_ring, lse_ring, delta_ring, q_ready, do_ready,
            lse_ready, delta_ready, ring_free,
            ids=((segment_refs.q_ids, q_ids_ring, q_ids_ready)
                 if p.segments else None)),
        q_ref, do_ref, lse_ref, delta_ref, batch=batch, steps=steps,
        locate=locate, block=BLOCK)

  tile = (BLOCK, BLOCK)                # [keys, queries]
  column = plgpu.Layout.WGMMA.reduce(0)
  zeros = lambda: plgpu.layout_cast(
      jnp.zeros((BLOCK, p.head_dim), jnp.float32), plgpu.Layout.WGMMA)

  def over_steps(step, first_full, end_full):
    """``step`` over every query head of the group, in masked/unmasked
    phases; returns the accumulator."""
    def over_group(group, acc):
      base = group * q_steps
      shifted = lambda t, c, *, masked: step(base + t, c, masked=masked)
      return common.run_phases(q_steps, first_full, end_full, shifted, acc)
    return lax.fori_loop(0, p.groups, over_group, zeros())

  @pl.when(wg == SCORES)
  def _scores():
    plgpu.set_max_registers(232, action="increase")
    # Waited even with no steps: dV is written over K at the end.
    plgpu.barrier_wait(kv_ready.at[0])
    first_full, end_full = common.phase_steps(walk, own_range)
    if p.segments:
      kv_ids = common.load_ids(segment_refs.kv_ids.at[batch, pl.ds(
          kv_start, BLOCK)], common.ROW_IDS, from_global=True)

    def step(t, dv, *, masked: bool):
      slot = lax.rem(t, jnp.int32(p.stages))
      _, q_block = locate(t)
      plgpu.barrier_wait(q_ready.at[slot])
      plgpu.barrier_wait(lse_ready.at[slot])

      def scores(s_ref):
        plgpu.wgmma(s_ref, k_smem, q_ring.at[slot].transpose((1, 0)))
        return s_ref[...]
      s_t = pl.run_scoped(scores, plgpu.ACC(tile, jnp.float32))
      probs, tanh = _key_major_probabilities(
          s_t, lse_ring.at[slot], p, tile, masked=masked,
          tile_starts=lambda: (q_block * BLOCK, kv_start), q_len=q_len,
          kv_len=kv_len,
          streamed_ids=((kv_ids, q_ids_ring.at[slot], q_ids_ready.at[slot])
                        if p.segments else None))
      _hand_over(t, _handed_probs(probs, tanh), probs_smem, probs_ready,
                 probs_free)
      plgpu.barrier_wait(do_ready.at[slot])

      def dv_update(dv_ref):
        plgpu.wgmma(dv_ref, probs.astype(p.dtype), do_ring.at[slot])
      dv = pl.run_state(dv_update)(plgpu.ACC.init(dv))
      plgpu.barrier_arrive(ring_free.at[slot])
      return dv

    dv = over_steps(step, first_full, end_full)
    # Only this consumer reads K: its buffer takes dV.
    k_smem[...] = dv.astype(p.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(k_smem, dv_ref.at[keys])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == GRADIENTS)
  def _gradients():
    plgpu.set_max_registers(232, action="increase")
    # Waited even with no steps: dK is written over V at the end.
    plgpu.barrier_wait(kv_ready.at[1])

    def step(t, dk, *, masked: bool):
      del masked   # the handed-over P^T is masked already
      slot = lax.rem(t, jnp.int32(p.stages))
      plgpu.barrier_wait(do_ready.at[slot])

      def dprobs(dp_ref):
        plgpu.wgmma(dp_ref, v_smem, do_ring.at[slot].transpose((1, 0)))
        return dp_ref[...]
      dp_t = pl.run_scoped(dprobs, plgpu.ACC(tile, jnp.float32))
      handed = _take_over(probs_smem, probs_ready, probs_free)
      plgpu.barrier_wait(delta_ready.at[slot])
      delta = plgpu.load(delta_ring.at[slot], layout=column)
      ds_t = _dscores(handed, dp_t, delta, tile, keys_are_rows=True)
      plgpu.barrier_wait(q_ready.at[slot])

      def dk_update(dk_ref):
        plgpu.wgmma(dk_ref, ds_t.astype(p.dtype), q_ring.at[slot])
      dk = pl.run_state(dk_update)(plgpu.ACC.init(dk))
      plgpu.barrier_arrive(ring_free.at[slot])
      return dk

    dk = over_steps(step, 0, 0)   # no element mask here: one phase
    # Only this consumer reads V: its buffer takes dK.
    v_smem[...] = (dk * p.scale).astype(p.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(v_smem, dk_ref.at[keys])
    plgpu.wait_smem_to_gmem(0)


def _num_q_tiles(p: ForwardParams) -> int:
  return -(-p.q_seq // BLOCK)


def _dq_kernel(q_len_ref, kv_len_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
               delta_ref, *refs, p: ForwardParams):
  segment_refs, refs = common.SegmentRefs.split(p, refs)
  (dq_ref, q_smem, do_smem, lse_smem, delta_smem, k_ring, v_ring, row_ready,
   k_ready, v_ready, k_free, v_free, probs_smem, probs_ready, probs_free,
   *ids_scratch) = refs
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
  row = plgpu.Layout.WGMMA.reduce(1)
  tile = (BLOCK, BLOCK)                # [queries, keys]

  @pl.when(wg == PRODUCER)
  def _producer():
    for i, (src, dst) in enumerate((
        (q_ref.at[rows], q_smem), (do_ref.at[rows], do_smem),
        (lse_ref.at[batch, head, pl.ds(q_start, BLOCK)], lse_smem),
        (delta_ref.at[batch, head, pl.ds(q_start, BLOCK)], delta_smem))):
      plgpu.copy_gmem_to_smem(src, dst, row_ready.at[i])
    plgpu.set_max_registers(40, action="decrease")
    common.stream_kv(
        p, k_ref, v_ref, k_ring, v_ring, k_ready, v_ready, k_free, v_free,
        batch=batch, head=head, walk=walk, block_kv=BLOCK,
        kv_ids=((segment_refs.kv_ids, kv_ids_ring, kv_ids_ready)
                if p.segments else None))

  @pl.when(wg == SCORES)
  def _scores():
    plgpu.set_max_registers(232, action="increase")
    plgpu.barrier_wait(row_ready.at[0])   # Q
    plgpu.barrier_wait(row_ready.at[2])   # lse
    lse = _lse_log2(plgpu.load(lse_smem, layout=row))
    first_full, end_full = common.phase_steps(
        walk, lambda: p.mask.kv_block_range(q_start, q_start + BLOCK, q_len,
                                            kv_len, BLOCK))
    if p.segments:
      q_ids = common.load_ids(segment_refs.q_ids.at[batch, pl.ds(
          q_start, BLOCK)], common.ROW_IDS, from_global=True)

    def step(t, carry, *, masked: bool):
      slot = lax.rem(t, jnp.int32(p.stages))
      plgpu.barrier_wait(k_ready.at[slot])

      def scores(s_ref):
        plgpu.wgmma(s_ref, q_smem, k_ring.at[slot].transpose((1, 0)))
        return s_ref[...]
      s = pl.run_scoped(scores, plgpu.ACC(tile, jnp.float32))
      logits, tanh = _logits(s, p)
      probs = _probabilities(
          logits, lse, p, tile, masked=masked,
          tile_starts=lambda: (q_start, walk.block_of(t) * BLOCK),
          q_len=q_len, kv_len=kv_len,
          streamed_ids=((q_ids, kv_ids_ring.at[slot], kv_ids_ready.at[slot])
                        if p.segments else None))
      plgpu.barrier_arrive(k_free.at[slot])   # K (and its ids) read
      _hand_over(t, _handed_probs(probs, tanh), probs_smem, probs_ready,
                 probs_free)
      return carry

    common.run_phases(walk.steps, first_full, end_full, step, jnp.int32(0))

  @pl.when(wg == GRADIENTS)
  def _gradients():
    plgpu.set_max_registers(232, action="increase")
    # dO is waited even with no steps: dQ is written over it at the end.
    plgpu.barrier_wait(row_ready.at[1])   # dO
    plgpu.barrier_wait(row_ready.at[3])   # D
    delta = plgpu.load(delta_smem, layout=row)

    def step(t, dq):
      slot = lax.rem(t, jnp.int32(p.stages))
      plgpu.barrier_wait(v_ready.at[slot])

      def dprobs(dp_ref):
        plgpu.wgmma(dp_ref, do_smem, v_ring.at[slot].transpose((1, 0)))
        return dp_ref[...]
      dp = pl.run_scoped(dprobs, plgpu.ACC(tile, jnp.float32))
      plgpu.barrier_arrive(v_free.at[slot])
      handed = _take_over(probs_smem, probs_ready, probs_free)
      ds = _dscores(handed, dp, delta, tile)
      plgpu.barrier_wait(k_ready.at[slot])

      def dq_update(dq_ref):
        plgpu.wgmma(dq_ref, ds.astype(p.dtype), k_ring.at[slot])
      dq = pl.run_state(dq_update)(plgpu.ACC.init(dq))
      plgpu.barrier_arrive(k_free.at[slot])
      return dq

    dq = lax.fori_loop(0, walk.steps, step, plgpu.layout_cast(
        jnp.zeros((BLOCK, p.head_dim), jnp.float32), plgpu.Layout.WGMMA))
    # Only this consumer reads dO: its buffer takes dQ.
    do_smem[...] = (dq * p.scale).astype(p.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(do_smem, dq_ref.at[rows])
    plgpu.wait_smem_to_gmem(0)


def backward(p: ForwardParams, query, key, value, dout, lse, delta, q_lengths,
             kv_lengths, dkv_segments=(), dq_segments=()):
  """Returns ``(dq, dk, dv)``; the arguments are `backward.backward`'s
  (``dq_segments`` is always used: dQ has its own kernel here)."""
  check_consumers(p)
  kernel = functools.partial(
      plgpu.kernel, num_threads=CONSUMERS + 1, thread_name="wg",
      compiler_params=common.compiler_params())
  stages = p.stages
  vector = lambda *shape: plgpu.SMEM(shape, jnp.float32)
  operands = (q_lengths, kv_lengths, query, key, value, dout, lse, delta)
  hand_over_scratch = lambda: [_tile_smem(),               # the tile
                               plgpu.Barrier(),            # written
                               plgpu.Barrier()]            # loaded
  dk, dv = kernel(
      functools.partial(_dkv_kernel, p=p),
      out_type=varying_like([jax.ShapeDtypeStruct(key.shape, key.dtype),
                             jax.ShapeDtypeStruct(value.shape, value.dtype)],
                            *operands),
      scratch_types=[
          _smem(p, BLOCK, p.head_dim),                 # K, then dV
          _smem(p, BLOCK, p.head_dim),                 # V, then dK
          _smem(p, stages, BLOCK, p.head_dim),         # Q ring
          _smem(p, stages, BLOCK, p.head_dim),         # dO ring
          vector(stages, BLOCK),                       # lse ring
          vector(stages, BLOCK),                       # D ring
          plgpu.Barrier(num_barriers=2),               # K, V landed
          plgpu.Barrier(num_barriers=stages),          # Q landed
          plgpu.Barrier(num_barriers=stages),          # dO landed
          plgpu.Barrier(num_barriers=stages),          # lse landed
          plgpu.Barrier(num_barriers=stages),          # D landed
          plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),  # free
          *hand_over_scratch(),                        # P^T
      ] + common.ids_scratch(p, BLOCK),
      kernel_name=KERNEL_NAMES["dkv"],
      **common.sequence_major_grid(p, pl.cdiv(p.kv_seq, BLOCK), "kv",
                                   p.num_kv_heads),
  )(*operands, *dkv_segments)
  dq = kernel(
      functools.partial(_dq_kernel, p=p),
      out_type=varying_like(jax.ShapeDtypeStruct(query.shape, query.dtype),
                            *operands),
      scratch_types=[
          _smem(p, BLOCK, p.head_dim),                 # Q
          _smem(p, BLOCK, p.head_dim),                 # dO, then dQ
          vector(BLOCK),                               # lse
          vector(BLOCK),                               # D
          _smem(p, stages, BLOCK, p.head_dim),         # K ring
          _smem(p, stages, BLOCK, p.head_dim),         # V ring
          plgpu.Barrier(num_barriers=4),               # Q, dO, lse, D
          plgpu.Barrier(num_barriers=stages),          # K landed
          plgpu.Barrier(num_barriers=stages),          # V landed
          plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),  # K free
          plgpu.Barrier(num_barriers=stages),          # V free (dP only)
          *hand_over_scratch(),                        # P
      ] + common.ids_scratch(p, BLOCK),
      kernel_name=KERNEL_NAMES["dq"],
      **common.sequence_major_grid(p, _num_q_tiles(p), "q", p.num_heads),
  )(*operands, *dq_segments)
  return dq, dk, dv
