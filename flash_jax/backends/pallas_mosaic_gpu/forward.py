"""FlashAttention forward for Hopper (sm90), in Pallas' Mosaic GPU dialect.

One CTA owns ``2 * BLOCK_Q`` query rows of one (batch, head) and runs three
warpgroups (FlashAttention-3, Shah et al. 2024, Sec. 3.1; with
``consumers=3``, a tiling FlashAttention-3 uses at head dim 64, it owns
``3 * BLOCK_Q`` rows and runs a third consumer):

* a producer warpgroup streams key and value blocks into a ``stages``-deep
  shared-memory ring with TMA, each slot guarded by a "ready" barrier (TMA
  completion) and a "free" barrier (every consumer done with it);
* the consumer warpgroups, ``BLOCK_Q = 64`` query rows each (one wgmma M
  tile), compute ``S = Q K^T`` and ``O += P V`` with wgmma, keeping the
  online softmax (running max ``m`` and sum ``l``, exp2 with log2(e) folded
  into the scale) in registers.

CTAs own query tiles last first (`flash_jax.masks.heavy_first`), and the
tiles of one head launch one after another (`common.sequence_major_grid`),
so that CTAs running together share the head's K/V in L2 and a causal
launch does not end on a wave of its longest CTAs. Without a soft-cap, the
scale meets the scores after the row max (``folds_scale``).

All consumers walk the same key blocks, the union of what their rows can
attend (`MaskSpec.kv_block_range` for the CTA's rows), so the producer needs
no per-consumer schedule; each consumer splits that range by its own rows
into masked and unmasked phases, so only blocks on a mask boundary pay for
the element-wise mask. With segment ids (``segments``) the CTA walks its
row of a block map's lists instead (`flash_jax.block_map`: partial blocks,
then full ones, empty blocks never), and the producer streams each block's
key segment ids with its K. Tails need no padding: TMA reads past the array as
zeros (those keys are masked by ``kv_len``) and clips stores past it.

With ``rescale_threshold`` the consumers rescale O lazily
(FlashAttention-4): a row's running max moves only when a block's exceeds
it by more than the threshold, and a warp none of whose rows moved skips
the multiply (`rescale_rows`). With ``late_rescale`` a consumer rescales
O after handing its softmax over (with ping-pong, after the "softmax
done" arrival) instead of before. The online-softmax update itself is one
plain-jnp function, `softmax_block`, which CPU tests also run.

With ``persistent`` (a CTA count) the grid is instead about one CTA per SM,
each taking its share of the (batch, head, query tile) items
(`persistent_item`): the producer's ring runs on from one tile to the next,
so a CTA never waits for its first K/V block after the first tile, and
at head dims up to 128 each consumer loads its next tile's Q into a second
buffer while it works on this one. Each tile's arithmetic is the same as in
the per-tile grid, so the results are bitwise the same. It pays where tiles
are short (B=32 T=512: 0.84x -> 1.04x cuDNN on an H100), and it is not the
default where it cannot even out unequal tiles (long causal rows; see
`flash_jax.backends.pallas_mosaic_gpu.persistent_forward`).

With ``ping_pong`` the consumers also take turns on the tensor cores
(FlashAttention-3, Sec. 3.1, "pingpong scheduling"): a two-arrival
"schedule" barrier makes one consumer's softmax of block t run while the
other issues its products, each consumer handing the tensor cores over
twice per block. Both walk the same number of blocks, so the hand-overs
pair up; the second consumer starts one hand-over late and the first ends
one late. Three consumers (``consumers=3``) instead issue their products in
a fixed rotation, 0, 1, 2, 0, ...: each waits on its own barrier for the
other two to have issued since its last product (FlashAttention-3's
scheduler barrier for three warpgroups), so each softmax overlaps two
other consumers' products. That rotation measured slower than none (0.77-
0.94x cuDNN against 0.94-1.09x, H100, session 16), so the backend runs three
consumers without it (`THREE_CONSUMERS_FROM_Q_SEQ` in the backend says
where).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.mosaic import gpu as mgpu
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.extend.mlir import ir
from jax.extend.mlir.dialects import arith, scf, vector
from jaxlib.mlir.dialects import nvvm   # Mosaic GPU's own import of it

from flash_jax.backends.pallas_mosaic_gpu import common
from flash_jax.masks import MaskSpec, heavy_first
from flash_jax.sharding import varying_like

LOG2_E = math.log2(math.e)
LN_2 = math.log(2.0)
# The kernel's name in profiles (Nsight Compute's ``-k``), beside the
# backward's `backward.KERNEL_NAMES`.
KERNEL_NAME = "flash_jax_mosaic_forward"
BLOCK_Q = 64          # query rows per consumer warpgroup
CONSUMERS = 2         # consumer warpgroups (the backward kernels' count)
PRODUCER = CONSUMERS  # warpgroup index of the TMA producer (backward)

# Registers per thread after `set_max_registers`, by consumer count: the
# producer's and each consumer's. (1 + consumers) warpgroups of 128 threads
# share a CTA's 65536: 128 x (40 + 2 x 232) = 64512, 128 x (32 + 3 x 160)
# = 65536 (FlashAttention-3's split for three consumers).
REGISTERS = {2: (40, 232), 3: (32, 160)}

# The largest `ForwardParams.rescale_threshold`: probabilities then reach
# 2^8 = 256 before the P V product, far from float16's 65504 and with the
# same relative rounding as at 1 (FlashAttention-4 uses 8).
MAX_RESCALE_THRESHOLD = 8.0


@dataclasses.dataclass(frozen=True)
class ForwardParams:
  """Static shapes and options of one forward launch."""

  batch: int
  q_seq: int
  kv_seq: int
  num_heads: int
  num_kv_heads: int
  head_dim: int          # a multiple of 64 (callers pad)
  dtype: jnp.dtype
  mask: MaskSpec
  scale: float
  logits_soft_cap: float | None
  block_kv: int
  stages: int
  ping_pong: bool = False   # consumers take turns on the tensor cores
  consumers: int = CONSUMERS  # consumer warpgroups (2; 3: forward, h64)
  persistent: int = 0       # CTAs of a persistent grid (0: one per tile)
  fused_dq: bool = False    # backward: dQ reduce-added by the dK/dV kernel
  seq_fastest: bool = True  # grid order (`common.sequence_major_grid`)
  segments: bool = False    # segment ids: walks block-map lists
  # Forward: None rescales O by every block's row correction; a number
  # ``t >= 0`` moves a row's max only when a block's exceeds it by more than
  # ``t`` (log2 units) and skips the multiply in a warp none of whose rows
  # moved (`rescale_rows`). 0 is bitwise the same as None.
  rescale_threshold: float | None = None
  # Forward: rescale O after the softmax is handed over (with ping-pong,
  # after the "softmax done" arrival, so the other consumer's products need
  # not wait for it) and V has landed, rather than before. The same
  # operations on the same values: bitwise the same results.
  late_rescale: bool = False

  def __post_init__(self):
    # A CTA count: True would quietly mean a grid of one CTA.
    if isinstance(self.persistent, bool) or self.persistent < 0:
      raise ValueError(f"persistent is a CTA count, got {self.persistent!r}")
    if self.consumers not in REGISTERS:
      raise ValueError(f"consumers is one of {sorted(REGISTERS)}, got "
                       f"{self.consumers!r}")
    if self.rescale_threshold is not None and not (
        0 <= self.rescale_threshold <= MAX_RESCALE_THRESHOLD):
      raise ValueError(f"rescale_threshold is None or in [0, "
                       f"{MAX_RESCALE_THRESHOLD}], got "
                       f"{self.rescale_threshold!r}")
    if self.consumers == 3 and self.head_dim > 64:
      # 160 registers a thread hold no 64 x 128 float32 accumulator beside
      # S, and at 128 two Q buffers of three consumers overflow shared
      # memory (233,608 bytes of 232,448).
      raise ValueError("3 consumers are for head dim 64, got "
                       f"{self.head_dim}")

  @property
  def groups(self) -> int:
    return self.num_heads // self.num_kv_heads

  @property
  def rows_per_cta(self) -> int:
    return self.consumers * BLOCK_Q

  @property
  def num_q_tiles(self) -> int:
    """Query tiles of ``rows_per_cta`` rows: a query-major grid's size."""
    return -(-self.q_seq // self.rows_per_cta)

  @property
  def q_buffers(self) -> int:
    """Q/O buffers per consumer: a persistent CTA loads the next tile's Q
    while it works on this one where shared memory allows (not at head dim
    256: 2 x 64 KiB of Q beside the K/V ring is too much)."""
    return 2 if self.persistent and self.head_dim <= 128 else 1

  def q_tile_of(self, program):
    """The query tile a CTA owns: the last first
    (`flash_jax.masks.heavy_first`)."""
    return heavy_first(program, self.num_q_tiles)

  @property
  def folds_scale(self) -> bool:
    """Whether the scale may act after the row max (``max(s) * c = max(s *
    c)`` for ``c > 0``), making ``s * c - m`` one fused multiply-add per
    element: not with a soft-cap (tanh acts on scaled logits) or a negative
    scale (the max would become a min)."""
    return self.logits_soft_cap is None and self.scale > 0


# Three consumers' ping-pong (`ForwardParams.consumers` 3): consumer ``c``
# waits on schedule barrier ``c`` (two arrivals) before each product and,
# once it is issued, arrives on the other two consumers' barriers. These
# arrivals, made before the first turn, start the rotation at consumer 0:
# barrier 0 gets those of 1 and 2, barrier 1 that of 2.
FIRST_TURN_ARRIVALS = ((1, 0), (2, 0), (2, 1))   # (consumer, barrier)


def turn_passes(consumer):
  """The schedule barriers three-consumer ``consumer`` arrives on once its
  product is issued: the other two consumers'."""
  return [lax.rem(consumer + ahead, jnp.int32(3)) for ahead in (1, 2)]


def _scaled_logits(s, p: ForwardParams):
  """Logits in log2 units from the raw ``q . k`` accumulator."""
  cap = p.logits_soft_cap
  if cap is None:
    return s * (p.scale * LOG2_E)
  return tanh(s * (p.scale / cap)) * (cap * LOG2_E)


def tanh(x):
  """tanh from exp2: with ``approx_math`` Mosaic GPU lowers ``jnp.tanh`` to
  ``tanh.approx.f32`` (relative error ~2^-11, i.e. ~1.5% of a soft-capped
  logit of 30), while ``ex2.approx`` is accurate to ~2^-22."""
  return 1.0 - 2.0 / (jnp.exp2(x * (2.0 * LOG2_E)) + 1.0)


def _row_vector_of(tile_condition):
  """A per-row bool (the accumulator's row layout) from a 2-D condition that
  is constant along each row."""
  return jnp.max(jnp.where(tile_condition, 1.0, 0.0), axis=1) > 0.5


def softmax_block(logits, row_max, m_prev, l_prev, *,
                  threshold: float | None, masked: bool):
  """One key block of the online softmax, in log2 units.

  ``logits`` ``[rows, block_kv]`` (masked entries -inf) and their
  ``row_max``; ``m_prev`` / ``l_prev`` the running max and sum. Returns
  ``(probs, correction, m_next, l_next)``: the block's unnormalised
  probabilities against ``m_next``, and the factor by which the output
  accumulator (and the sum, already in ``l_next``) must be rescaled.
  ``threshold`` is `ForwardParams.rescale_threshold`; ``masked`` whether
  a row's max may still be -inf after this block (a block on a mask
  boundary; a full block attends every row's keys). Plain jnp: the
  kernel's consumers and the CPU tests run the same code.
  """
  m_next = jnp.maximum(m_prev, row_max)
  if threshold:
    # Lazy rescaling (FlashAttention-4): a row keeps its max until a block's
    # exceeds it by more than the threshold, so after the first blocks O is
    # rarely rescaled. Exact: O and l share the max the probabilities are
    # taken against. (-inf + t is -inf, so a row's first attended block
    # always sets it.)
    m_next = jnp.where(row_max > m_prev + threshold, m_next, m_prev)
  # Rows with nothing attended yet keep m = -inf; shift them by 0 so exp2
  # gives 0, not NaN.
  m_shift = jnp.where(m_next == -jnp.inf, 0.0, m_next) if masked else m_next
  correction = jnp.exp2(m_prev - m_shift)
  probs = jnp.exp2(logits - lax.broadcast_in_dim(m_shift, logits.shape, [0]))
  l_next = l_prev * correction + jnp.sum(probs, axis=1)
  return probs, correction, m_next, l_next


ROW_LAYOUT = plgpu.Layout.WGMMA.reduce(1)   # one value per accumulator row


def rescale_rows(acc, correction):
  """``acc * correction[:, None]`` for a ``[64, H]`` float32 wgmma
  accumulator, skipped in each warp none of whose rows has a correction
  other than 1 (the multiply is then the identity, so the result is bitwise
  the same). Each warp holds 16 whole rows of the accumulator, so a warp's
  vote decides for its own registers alone; no warpgroup-wide reduction
  (and no shared memory) is needed. Written in Mosaic GPU's own IR
  (`plgpu.inline_mgpu`) because Pallas has no per-warp branch.

  At head dim 256 this multiply was 28% of the forward's instructions (ncu,
  session 16): 64 x 256 products per consumer per 64-key block, 4 per score.
  """
  @plgpu.inline_mgpu(
      arg_types=(plgpu.Layout.WGMMA, ROW_LAYOUT),
      return_type=plgpu.ShapeDtypeStruct(acc.shape, jnp.float32,
                                         layout=plgpu.Layout.WGMMA))
  def rescale(_, acc, correction):
    f32, i1 = ir.F32Type.get(), ir.IntegerType.get_signless(1)
    one = arith.constant(f32, 1.0)
    moved = arith.constant(i1, 0)
    for register in correction.registers.flat:
      for i in range(ir.VectorType(register.type).shape[0]):
        value = vector.extract(register, dynamic_position=[],
                               static_position=ir.DenseI64ArrayAttr.get([i]))
        # UNE: true for NaN too, which then reaches the accumulator.
        moved = arith.ori(moved, arith.cmpf(arith.CmpFPredicate.UNE, value,
                                            one))
    all_lanes = mgpu.c(0xFFFFFFFF, ir.IntegerType.get_signless(32))
    moved = nvvm.vote_sync(all_lanes, moved, "any")   # warp-uniform
    branch = scf.IfOp(moved, [r.type for r in acc.registers.flat],
                      has_else=True)
    with ir.InsertionPoint(branch.then_block):
      scaled = acc * correction.broadcast_in_dim(acc.shape, (0,), acc.layout)
      scf.yield_(list(scaled.registers.flat))
    with ir.InsertionPoint(branch.else_block):
      scf.yield_(list(acc.registers.flat))
    registers = np.empty(acc.registers.shape, dtype=object)
    for index, result in zip(np.ndindex(registers.shape), branch.results):
      registers[index] = result
    return mgpu.FragmentedArray(_registers=registers, _layout=acc.layout,
                                _is_signed=None)
  return rescale(acc, correction)


def persistent_grid_size(p: ForwardParams) -> int:
  """CTAs of a persistent grid: ``p.persistent``, or fewer with fewer
  items (one per (batch, head, query tile))."""
  return min(p.persistent, p.batch * p.num_heads * p.num_q_tiles)


def persistent_item_count(p: ForwardParams, cta):
  """How many items persistent CTA ``cta`` takes: items are dealt
  round-robin, item ``cta + i * grid size`` in its round ``i``."""
  items = p.batch * p.num_heads * p.num_q_tiles
  return lax.div(items - 1 - cta, jnp.int32(persistent_grid_size(p))) + 1


def persistent_item(p: ForwardParams, cta, i):
  """``(batch, head, query program)`` of persistent CTA ``cta``'s item
  ``i``, in the grid's order: query tiles of a head fastest, so the CTAs
  at work at any time share a few heads' K/V in L2, as the CTAs of the
  plain grid do (`common.sequence_major_grid`)."""
  # int32 constants: lax.div and lax.rem take no Python ints (int64 under
  # jax_enable_x64) beside the int32 indices.
  tiles, heads = jnp.int32(p.num_q_tiles), jnp.int32(p.num_heads)
  flat = cta + i * persistent_grid_size(p)
  return (lax.div(flat, heads * tiles), lax.rem(lax.div(flat, tiles), heads),
          lax.rem(flat, tiles))


def _forward_kernel(q_len_ref, kv_len_ref, q_ref, k_ref, v_ref, *refs,
                    p: ForwardParams):
  segment_refs, refs = common.SegmentRefs.split(p, refs)
  (out_ref, lse_ref, qo_smem, k_smem, v_smem, lse_smem, q_ready, k_ready,
   v_ready, k_free, v_free, schedule, *ids_scratch) = refs
  wg = lax.axis_index("wg")
  block_kv, stages = p.block_kv, p.stages
  if p.segments:
    kv_ids_ring, kv_ids_ready = ids_scratch

  # A CTA's work: one (batch, head, query tile) item, or with `persistent`
  # its share of them (`persistent_item`).
  if p.persistent:
    cta = lax.axis_index("cta")
    num_items = persistent_item_count(p, cta)
    coords = functools.partial(persistent_item, p, cta)

    def over_items(body, carry):
      return lax.fori_loop(0, num_items,
                           lambda i, c: body(i, coords(i), c), carry)
  else:
    def over_items(body, carry):
      return body(0, (lax.axis_index("batch"), lax.axis_index("heads"),
                      lax.axis_index("q")), carry)

  def item_walk(batch, q_program):
    """``(q_len, kv_len, first row of the CTA's tile, walk)``."""
    q_len, kv_len = common.clipped_lengths(p, q_len_ref, kv_len_ref, batch)
    q_tile = p.q_tile_of(q_program)
    walk = common.query_major_walk(p, segment_refs, batch, q_tile, q_len,
                                   kv_len, block_kv)
    return q_len, kv_len, q_tile * p.rows_per_cta, walk

  producer_registers, consumer_registers = REGISTERS[p.consumers]

  @pl.when(wg == p.consumers)   # the producer warpgroup comes last
  def _producer():
    plgpu.set_max_registers(producer_registers, action="decrease")

    def produce(i, item, first_step):
      batch, head, q_program = item
      walk = item_walk(batch, q_program)[-1]
      common.stream_kv(
          p, k_ref, v_ref, k_smem, v_smem, k_ready, v_ready, k_free, v_free,
          batch=batch, head=head, walk=walk, block_kv=block_kv,
          kv_ids=((segment_refs.kv_ids, kv_ids_ring, kv_ids_ready)
                  if p.segments else None), first_step=first_step)
      return first_step + walk.steps if p.persistent else None
    # The ring runs on across items: step t of the CTA uses slot t % stages.
    over_items(produce, jnp.int32(0) if p.persistent else 0)

  # Ping-pong: two consumers meet at one barrier twice per block; three
  # take their products in turn (`take_turn`/`pass_turn`).
  two_way = p.ping_pong and p.consumers == 2
  round_robin = p.ping_pong and p.consumers == 3

  @pl.when(wg < p.consumers)
  def _consumer():
    plgpu.set_max_registers(consumer_registers, action="increase")

    def q_buffer(i):
      return lax.rem(i, jnp.int32(p.q_buffers)) if p.q_buffers > 1 else 0

    # This consumer's Q/O buffer, lse buffer and Q barrier.
    if p.persistent:
      qo_of = lambda buffer: qo_smem.at[buffer, wg]
      lse_of = lambda buffer: lse_smem.at[buffer, wg]
      q_landed = lambda buffer: q_ready.at[buffer * p.consumers + wg]
    else:
      qo_of = lambda _: qo_smem.at[wg]
      lse_of = lambda _: lse_smem.at[wg]
      q_landed = lambda _: q_ready.at[wg]

    def load_q(item, buffer):
      batch, head, q_program = item
      q_start = p.q_tile_of(q_program) * p.rows_per_cta + wg * BLOCK_Q
      plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(q_start, BLOCK_Q), head],
                              qo_of(buffer), q_landed(buffer))

    if p.q_buffers > 1:
      load_q(coords(0), 0)   # later items' Q are loaded one item ahead

    def consume(i, item, first_step):
      batch, head, _ = item
      q_len, kv_len, cta_start, walk = item_walk(batch, item[2])
      buffer = q_buffer(i)
      if p.persistent and p.q_buffers == 1:
        # This item's Q overwrites the last item's O: wait until it is read.
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
      if p.q_buffers == 1:
        load_q(item, buffer)
      plgpu.barrier_wait(q_landed(buffer))
      if p.q_buffers > 1:
        @pl.when(i + 1 < num_items)
        def _():
          # The next item's Q goes where the last item's O was stored from.
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)
          load_q(coords(i + 1), q_buffer(i + 1))
      q_start = cta_start + wg * BLOCK_Q
      qo, lse_out = qo_of(buffer), lse_of(buffer)
      steps = walk.steps
      slot_of = ((lambda t: lax.rem(first_step + t, jnp.int32(stages)))
                 if p.persistent else
                 (lambda t: lax.rem(t, jnp.int32(stages))))

      first_full, end_full = common.phase_steps(
          walk, lambda: p.mask.kv_block_range(q_start, q_start + BLOCK_Q,
                                              q_len, kv_len, block_kv))
      tile = (BLOCK_Q, block_kv)
      if p.segments:
        q_ids = common.load_ids(
            segment_refs.q_ids.at[batch, pl.ds(q_start, BLOCK_Q)],
            common.ROW_IDS, from_global=True)

      def hand_over():
        """Both consumers meet here: the tensor cores change hands."""
        plgpu.barrier_arrive(schedule)
        plgpu.barrier_wait(schedule)

      def take_turn():
        """Three consumers: wait until both others issued since our last
        product (`round_robin`)."""
        plgpu.barrier_wait(schedule.at[wg])

      def pass_turn():
        for barrier in turn_passes(wg):
          plgpu.barrier_arrive(schedule.at[barrier])

      def step(t, carry, *, masked: bool):
        acc, m_prev, l_prev = carry
        slot = slot_of(t)
        plgpu.barrier_wait(k_ready.at[slot])
        if p.segments:
          # Every step waits (barriers track their phase per wait).
          plgpu.barrier_wait(kv_ids_ready.at[slot])

        def qk(acc_ref):
          if round_robin:
            take_turn()
          plgpu.wgmma(acc_ref, qo, k_smem.at[slot].transpose((1, 0)))
          if two_way:
            hand_over()   # issued; the other consumer's softmax may start
          elif round_robin:
            pass_turn()
          return acc_ref[...]
        s = pl.run_scoped(qk, plgpu.ACC(tile, jnp.float32))
        segment_ids = None
        if p.segments and masked:   # read before K's slot is released
          segment_ids = (q_ids, common.load_ids(kv_ids_ring.at[slot],
                                                common.COLUMN_IDS))
        plgpu.barrier_arrive(k_free.at[slot])
        # With folds_scale, logits stay raw scores until the exponent.
        logits = s if p.folds_scale else _scaled_logits(s, p)
        if masked:
          allowed = common.tile_allowed(p, tile, q_start,
                                        walk.block_of(t) * block_kv, q_len,
                                        kv_len, segment_ids=segment_ids)
          logits = jnp.where(allowed, logits, -jnp.inf)
        row_max = jnp.max(logits, axis=1)
        if p.folds_scale:
          row_max = row_max * (p.scale * LOG2_E)
          logits = logits * (p.scale * LOG2_E)
        probs, correction, m_next, l_next = softmax_block(
            logits, row_max, m_prev, l_prev,
            threshold=p.rescale_threshold, masked=masked)

        def rescaled(acc):
          if p.rescale_threshold is None:
            return acc * lax.broadcast_in_dim(correction, acc.shape, [0])
          return rescale_rows(acc, correction)
        if not p.late_rescale:
          acc = rescaled(acc)
        probs = probs.astype(p.dtype)
        if two_way:
          plgpu.barrier_arrive(schedule)      # softmax done
        plgpu.barrier_wait(v_ready.at[slot])
        if p.late_rescale:
          acc = rescaled(acc)   # after the hand-over, before the turn wait
        if two_way:
          plgpu.barrier_wait(schedule)        # the tensor cores are ours
        elif round_robin:
          take_turn()

        def pv(acc_ref):
          plgpu.wgmma(acc_ref, probs, v_smem.at[slot])
          if round_robin:
            pass_turn()
        acc = pl.run_state(pv)(plgpu.ACC.init(acc))
        plgpu.barrier_arrive(v_free.at[slot])
        return acc, m_next, l_next

      carry = (
          plgpu.layout_cast(jnp.zeros((BLOCK_Q, p.head_dim), jnp.float32),
                            plgpu.Layout.WGMMA),
          plgpu.layout_cast(jnp.full((BLOCK_Q,), -jnp.inf, jnp.float32),
                            ROW_LAYOUT),
          plgpu.layout_cast(jnp.zeros((BLOCK_Q,), jnp.float32), ROW_LAYOUT),
      )
      if two_way:
        pl.when(wg == 1)(hand_over)   # the second consumer starts one behind
      acc, m, l = common.run_phases(steps, first_full, end_full, step, carry)
      if two_way:
        pl.when(wg == 0)(hand_over)   # and the first ends one behind

      # Rows that attend nothing (padding, or every key masked): 0 and -inf.
      rows = q_start + plgpu.broadcasted_iota(
          jnp.int32, (BLOCK_Q, p.head_dim), 0, layout=plgpu.Layout.WGMMA)
      attends = (l > 0.0) & _row_vector_of(rows < q_len)
      safe_l = jnp.where(attends, l, 1.0)
      scale_rows = jnp.where(attends, 1.0 / safe_l, 0.0)
      out = acc * lax.broadcast_in_dim(scale_rows, acc.shape, [0])
      lse = jnp.where(attends, (m + jnp.log2(safe_l)) * LN_2, -jnp.inf)
      qo[...] = out.astype(p.dtype)
      lse_out[...] = lse
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(qo, out_ref.at[batch, pl.ds(q_start, BLOCK_Q),
                                              head])
      plgpu.copy_smem_to_gmem(lse_out,
                              lse_ref.at[batch, head, pl.ds(q_start, BLOCK_Q)])
      return first_step + steps if p.persistent else None

    if round_robin:
      # Consumer 0 goes first, then 1, then 2 (`FIRST_TURN_ARRIVALS`). Every
      # consumer takes as many turns per item (all walk the CTA's blocks),
      # so the order holds across a persistent CTA's items; the last turns'
      # arrivals are never waited for.
      for consumer, barrier in FIRST_TURN_ARRIVALS:
        pl.when(wg == consumer)(
            functools.partial(plgpu.barrier_arrive, schedule.at[barrier]))
    over_items(consume, jnp.int32(0) if p.persistent else 0)
    plgpu.wait_smem_to_gmem(0)


def _grid(p: ForwardParams) -> dict:
  """One CTA per (batch, head, query tile), or with ``p.persistent`` that
  many CTAs, each walking its share of the items."""
  if p.persistent:
    return dict(grid=(persistent_grid_size(p),), grid_names=("cta",))
  return common.sequence_major_grid(p, p.num_q_tiles, "q", p.num_heads)


def forward(p: ForwardParams, query, key, value, q_lengths, kv_lengths,
            segments=()):
  """Returns ``out [B,T,N,H]`` and ``lse [B,N,T]`` (float32, natural log).

  ``query``/``key``/``value`` have a head dim that is a multiple of 64;
  ``q_lengths``/``kv_lengths`` are int32 ``[B]``. With ``p.segments``,
  ``segments`` is `common.segment_operands` of the padded ids and the key
  lists of ``(rows_per_cta, block_kv)`` blocks.
  """
  transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
  smem = lambda *shape: plgpu.SMEM(shape, p.dtype, transforms=transforms)
  per_consumer = ((p.q_buffers, p.consumers) if p.persistent
                  else (p.consumers,))
  scratch = [
      smem(*per_consumer, BLOCK_Q, p.head_dim),               # Q, then O
      smem(p.stages, p.block_kv, p.head_dim),                 # K ring
      smem(p.stages, p.block_kv, p.head_dim),                 # V ring
      plgpu.SMEM((*per_consumer, BLOCK_Q), jnp.float32),      # lse
      plgpu.Barrier(num_barriers=p.q_buffers * p.consumers),  # Q landed
      plgpu.Barrier(num_barriers=p.stages),                   # K landed
      plgpu.Barrier(num_barriers=p.stages),                   # V landed
      plgpu.Barrier(num_arrivals=p.consumers, num_barriers=p.stages),  # K free
      plgpu.Barrier(num_arrivals=p.consumers, num_barriers=p.stages),  # V free
      # schedule: one barrier for two consumers; one each for three, which
      # the other two arrive on
      (plgpu.Barrier(num_arrivals=CONSUMERS) if p.consumers == 2 else
       plgpu.Barrier(num_arrivals=2, num_barriers=3)),
  ]
  scratch += common.ids_scratch(p, p.block_kv)                 # key ids
  out_type = [
      jax.ShapeDtypeStruct((p.batch, p.q_seq, p.num_heads, p.head_dim),
                           p.dtype),
      # Padded to whole CTAs: a TMA row stride must be a multiple of 16
      # bytes, which T * 4 need not be.
      jax.ShapeDtypeStruct((p.batch, p.num_heads,
                            p.num_q_tiles * p.rows_per_cta),
                           jnp.float32),
  ]
  operands = (q_lengths, kv_lengths, query, key, value, *segments)
  out, lse = plgpu.kernel(
      functools.partial(_forward_kernel, p=p),
      out_type=varying_like(out_type, *operands),
      scratch_types=scratch,
      **_grid(p),
      num_threads=p.consumers + 1,
      thread_name="wg",
      kernel_name=KERNEL_NAME,
      compiler_params=common.compiler_params(),
  )(*operands)
  return out, lse[:, :, :p.q_seq]
