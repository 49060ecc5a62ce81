"""Pieces shared by the Triton-backend kernels: static parameters, masked
tile loads, the per-tile math, block schedules and the pallas_call plumbing.
(Tiling lives in `tuning`.)"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from flash_jax import dropout
from flash_jax.backends.pallas_triton.tuning import (MIN_BLOCK, KernelTiling,
                                                     next_power_of_two)
from flash_jax.config import AttentionConfig
from flash_jax.masks import BlockRange, MaskSpec, heavy_first

LOG2_E = math.log2(math.e)
LN_2 = math.log(2.0)

@dataclasses.dataclass(frozen=True)
class KernelParams:
  """Static shapes and options one kernel launch is specialised on."""

  batch: int
  q_seq: int              # T
  kv_seq: int             # S
  num_heads: int          # N
  num_kv_heads: int       # K
  head_dim: int           # H (query/key)
  value_head_dim: int     # Hv
  dtype: jnp.dtype
  mask: MaskSpec
  scale: float
  block_q: int
  block_kv: int
  num_warps: int
  num_stages: int
  interpret: bool
  logits_soft_cap: float | None = None
  dropout_rate: float = 0.0
  dropout_broadcast: bool = False
  float32_products: str = "tf32x3"

  @property
  def groups(self) -> int:
    """Query heads per key/value head (G)."""
    return self.num_heads // self.num_kv_heads

  @property
  def num_q_blocks(self) -> int:
    """Query blocks of ``block_q`` rows: a query-major kernel's grid size."""
    return -(-self.q_seq // self.block_q)

  def q_block_of(self, program):
    """The query block of a query-major program (forward, dQ): the last
    first (`flash_jax.masks.heavy_first`). Kernels and index maps agree by
    both calling this."""
    return heavy_first(program, self.num_q_blocks)

  @property
  def head_dim_padded(self) -> int:
    """H rounded up to a power of two: Triton tiles must be powers of two."""
    return max(MIN_BLOCK, next_power_of_two(self.head_dim))

  @property
  def value_head_dim_padded(self) -> int:
    return max(MIN_BLOCK, next_power_of_two(self.value_head_dim))

  @property
  def qk_scale_log2(self) -> float:
    """Logit scale with log2(e) folded in, so the kernels use exp2."""
    return self.scale * LOG2_E

  @property
  def dot_precision(self):
    """The tile products' precision: 16-bit inputs are exact in float32
    accumulation; float32 ones get three TF32 tensor-core products (as
    accurate as full precision by the tests' rule, and 7-10x faster on an
    H100: `suite_dtypes_s7.md`) unless the config asks for ``"ieee"``. Interpret mode runs on
    CPU XLA, which has no TF32: full precision."""
    if jnp.dtype(self.dtype) != jnp.float32:
      return None
    if self.interpret or self.float32_products == "ieee":
      return jax.lax.Precision.HIGHEST
    return jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3

  def compiler_params(self):
    return plgpu.CompilerParams(num_warps=self.num_warps,
                                num_stages=self.num_stages)


def kernel_params(config: AttentionConfig, query, key, value,
                  tiling: KernelTiling) -> KernelParams:
  """The static parameters of one kernel launch with ``tiling``."""
  batch, q_seq, num_heads, head_dim = query.shape
  kv_seq, num_kv_heads = key.shape[1], key.shape[2]
  return KernelParams(
      batch=batch, q_seq=q_seq, kv_seq=kv_seq, num_heads=num_heads,
      num_kv_heads=num_kv_heads, head_dim=head_dim,
      value_head_dim=value.shape[-1], dtype=query.dtype, mask=config.mask,
      scale=config.scale, block_q=tiling.block_q, block_kv=tiling.block_kv,
      num_warps=tiling.num_warps, num_stages=tiling.num_stages,
      interpret=config.interpret, logits_soft_cap=config.logits_soft_cap,
      dropout_rate=config.dropout_rate,
      dropout_broadcast=config.dropout_broadcast,
      float32_products=config.float32_products)


def round_up(n: int, block: int) -> int:
  return -(-n // block) * block


def lengths_or_full(lengths, batch: int, full: int):
  """Per-batch valid lengths as int32 ``[B]`` (the full length if absent)."""
  if lengths is None:
    return jnp.full((batch,), full, jnp.int32)
  return lengths.astype(jnp.int32)


def clamp_length(length, full: int):
  """Clamps a loaded per-batch length into ``[0, full]``."""
  return jnp.minimum(jnp.maximum(length, 0), full)


def valid_below(idx, bound: int, block: int, length: int):
  """``idx < bound`` as a row mask, or None when no row can be out of range.

  ``length`` is the array extent the block tiles; when it is a multiple of the
  block the mask is statically all-true and skipped.
  """
  if length % block == 0 and bound >= length:
    return None
  return idx < bound


def _tile_mask(shape, rows_valid, cols_valid):
  """The 2-D lane mask of a tile, or None when every lane is valid."""
  mask = None
  if rows_valid is not None:
    mask = jnp.broadcast_to(rows_valid[:, None], shape)
  if cols_valid is not None:
    cols = jnp.broadcast_to(cols_valid[None, :], shape)
    mask = cols if mask is None else mask & cols
  return mask


def load_tile(ref, rows_valid=None, cols_valid=None, other=0.0):
  """Loads a 2-D tile, zero-filling rows/columns outside the array.

  Masked lanes never touch memory, so tiles may hang past the array's end.
  """
  mask = _tile_mask(ref.shape, rows_valid, cols_valid)
  if mask is None:
    return ref[...]
  return plgpu.load(ref, mask=mask, other=jnp.asarray(other, ref.dtype))


def store_tile(ref, value, rows_valid=None, cols_valid=None):
  """Stores a 2-D tile, skipping rows/columns outside the array."""
  mask = _tile_mask(ref.shape, rows_valid, cols_valid)
  if mask is None:
    ref[...] = value
  else:
    plgpu.store(ref, value, mask=mask)


def load_vector(ref, valid=None, other=0.0):
  """Loads a 1-D tile (lse, delta), filling invalid lanes with ``other``."""
  if valid is None:
    return ref[...]
  return plgpu.load(ref, mask=valid, other=jnp.asarray(other, ref.dtype))


def store_vector(ref, value, valid=None):
  if valid is None:
    ref[...] = value
  else:
    plgpu.store(ref, value, mask=valid)


def head_mask(head_dim: int, padded: int):
  """Valid head-dim lanes, or None when the head dim is a power of two."""
  if head_dim == padded:
    return None
  return jnp.arange(padded) < head_dim


def dot(a, b, params: KernelParams, *, trans_a=False, trans_b=False):
  """A float32-accumulating tile product at the call's precision."""
  return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b,
                   precision=params.dot_precision)


SQUEEZED = pl.squeezed


# ---------------------------------------------------------------------------
# Optional inputs. Kernels take their refs by name so that each feature adds
# its operands without changing any signature.


class Refs:
  """A kernel's input refs by name (absent features give None)."""

  def __init__(self, names: tuple[str, ...], refs):
    self._refs = dict(zip(names, refs))

  def __getattr__(self, name):
    if name.startswith("_"):
      raise AttributeError(name)
    return self._refs.get(name)


class Inputs:
  """Builds a pallas_call's operand list, its BlockSpecs and the names the
  kernel unpacks them by (`Refs`)."""

  def __init__(self):
    self.names, self.arrays, self.specs = [], [], []

  def add(self, name: str, array, spec):
    if array is not None:
      self.names.append(name)
      self.arrays.append(array)
      self.specs.append(spec)


def load_pair_tile(ref, prefix: tuple, q_rows, kv_rows, q_valid, kv_valid,
                   shape):
  """Loads a bias/mask tile and broadcasts it to ``shape``.

  ``ref``'s last two dims are either the tile's own (selected by ``q_rows`` /
  ``kv_rows``) or 1 (broadcast); ``prefix`` indexes its leading dims. One
  indexer per load: Triton's lowering takes no chained ``.at``.
  """
  q_full, kv_full = ref.shape[-2] > 1, ref.shape[-1] > 1
  view = ref.at[(*prefix, q_rows if q_full else pl.ds(0, 1),
                 kv_rows if kv_full else pl.ds(0, 1))]
  tile = load_tile(view, q_valid if q_full else None,
                   kv_valid if kv_full else None)
  return jnp.broadcast_to(tile, shape)


# ---------------------------------------------------------------------------
# The per-tile math every kernel shares.


@dataclasses.dataclass(frozen=True)
class TileContext:
  """What one program knows about its rows for masking and dropout."""

  batch: jax.Array       # batch index
  kv_len: jax.Array      # valid keys of this batch row
  seed: tuple | None     # dropout hash key words, or None
  q_len: jax.Array | None = None  # valid queries (for align_to_lengths)


def element_mask(p: KernelParams, ctx: TileContext, head, q_idx, kv_idx, *,
                 q_segment=None, kv_segment=None, dense=None):
  """The ``[block_q, block_kv]`` mask of a partial block (True = attend)."""
  segments = {}
  if q_segment is not None:
    segments = dict(q_segment=q_segment[:, None],
                    kv_segment=kv_segment[None, :])
  allowed = p.mask.allows(q_idx[:, None], kv_idx[None, :], ctx.kv_len,
                          q_len=ctx.q_len, batch=ctx.batch, head=head,
                          **segments)
  if dense is not None:
    allowed = allowed & (dense != 0)
  return allowed


def scores(q, k, p: KernelParams, bias=None):
  """Logits in log2 units (``logits * log2(e)``), and ``tanh`` of the
  soft-capped logits (for its gradient) or None.

  Without a soft-cap, log2(e) is folded into the scale (one multiply per
  element); with one, ``cap * tanh((s * scale + bias) / cap)`` with 1/cap
  folded into the scale and ``cap * log2(e)`` into the output.
  """
  s = dot(q, k, p, trans_b=True)
  cap = p.logits_soft_cap
  if cap is None:
    logits = s * p.qk_scale_log2
    if bias is not None:
      logits = logits + bias.astype(jnp.float32) * LOG2_E
    return logits, None
  x = s * (p.scale / cap)
  if bias is not None:
    x = x + bias.astype(jnp.float32) * (1.0 / cap)
  tanh = jnp.tanh(x)
  return tanh * (cap * LOG2_E), tanh


def _mulhi_ptx(a: int, b):
  """The high half of ``a * b`` in one ``mul.hi.u32`` (the uint32 emulation
  takes about ten instructions; the bits are the same)."""
  # The asm speaks int32: its uint32 results would lower to a type (ui32)
  # that the rest of the kernel's integer ops (signless i32) do not match.
  as_int = jax.lax.bitcast_convert_type(b, jnp.int32)
  (high,) = plgpu.elementwise_inline_asm(
      f"mul.hi.u32 $0, $1, {a:#x};", args=[as_int], constraints="=r,r",
      pack=1, result_shape_dtypes=[jax.ShapeDtypeStruct(b.shape, jnp.int32)])
  return jax.lax.bitcast_convert_type(high, jnp.uint32)


def dropout_scale(p: KernelParams, ctx: TileContext, head, q_idx, kv_start):
  """``keep * dropout.keep_scale(rate)`` for the tile of rows ``q_idx`` and keys
  ``kv_start + arange(block_kv)``, from the counter-based hash (the same
  bits `flash_jax.dropout.keep_mask` computes outside)."""
  zero = jnp.uint32(0)
  batch = zero if p.dropout_broadcast else ctx.batch.astype(jnp.uint32)
  head = zero if p.dropout_broadcast else jnp.asarray(head).astype(jnp.uint32)
  # Interpret mode runs on the CPU, where inline PTX cannot.
  mulhi = dropout.mulhi_emulated if p.interpret else _mulhi_ptx
  keep = dropout.keep_tile(ctx.seed, p.dropout_rate, batch, head, q_idx,
                           kv_start, p.block_kv, mulhi=mulhi)
  return jnp.where(keep, jnp.float32(dropout.keep_scale(p.dropout_rate)),
                   0.0)


def load_seed(seed_ref):
  """The two dropout key words, or None without dropout."""
  if seed_ref is None:
    return None
  return seed_ref[0], seed_ref[1]


def q_major_bias_and_mask(p: KernelParams, ctx: TileContext, inputs: Refs,
                          head, q_idx, kv_idx, kv_rows, q_in_array,
                          kv_in_array, q_segment, *, masked: bool):
  """The bias tile and, for a partial block, the element mask of one tile
  of a query-major kernel (forward, dQ): its bias/mask refs hold one query
  block by all key rows; ``q_segment`` is the block's segment ids."""
  tile = (p.block_q, p.block_kv)
  own_rows = pl.ds(0, p.block_q)
  bias = allowed = None
  if inputs.bias is not None:
    bias = load_pair_tile(inputs.bias, (), own_rows, kv_rows, q_in_array,
                          kv_in_array, tile)
  if masked:
    dense = kv_segment = None
    if inputs.mask is not None:
      dense = load_pair_tile(inputs.mask, (), own_rows, kv_rows, q_in_array,
                             kv_in_array, tile)
    if q_segment is not None:
      kv_segment = load_vector(inputs.kv_segment_ids.at[kv_rows], kv_in_array)
    allowed = element_mask(p, ctx, head, q_idx, kv_idx, q_segment=q_segment,
                           kv_segment=kv_segment, dense=dense)
  return bias, allowed


def backward_tile(p: KernelParams, ctx: TileContext, head, q, k, v, do,
                  lse_log2, delta, q_idx, kv_start, *, bias=None,
                  allowed=None):
  """Recomputes one tile of the backward (FlashAttention-2, Algorithm 2).

  Returns ``(probs_kept, dlogits)``: the dropped-and-rescaled probabilities
  (for dV) and the gradient of the pre-soft-cap logits ``s * scale + bias``
  (for dQ, dK and dbias).
  """
  logits, tanh = scores(q, k, p, bias)
  probs = jnp.exp2(logits - lse_log2[:, None])
  if allowed is not None:
    probs = jnp.where(allowed, probs, 0.0)
  dprobs = dot(do, v, p, trans_b=True)
  probs_kept = probs
  if p.dropout_rate > 0:
    # dO flows only through kept probabilities; D = rowsum(dO * O) already
    # equals rowsum(P * dP) with dP taken through the dropout.
    keep_scale = dropout_scale(p, ctx, head, q_idx, kv_start)
    probs_kept = probs * keep_scale
    dprobs = dprobs * keep_scale
  dlogits = probs * (dprobs - delta[:, None])
  if tanh is not None:
    dlogits = dlogits * (1.0 - tanh * tanh)
  return probs_kept, dlogits


# ---------------------------------------------------------------------------
# Block schedules: a static range split (causal, window, padding) or lists
# from `flash_jax.block_map` (segments, dense mask, mask_fn).


@dataclasses.dataclass(frozen=True)
class ListSchedule:
  """Column blocks to visit from a block-map row: ``blocks_ref[*prefix, t]``
  for ``t < num_partial`` are partial, the next ``num_full`` are full."""

  blocks_ref: object
  prefix: tuple
  num_partial: jax.Array
  num_full: jax.Array

  def block(self, t):
    return self.blocks_ref[(*self.prefix, t)]


def visit_blocks(schedule, step, carry):
  """Runs ``step(block, carry, masked=...)`` over the scheduled blocks:
  partial blocks with ``masked=True``, full blocks with ``masked=False``."""
  masked = functools.partial(step, masked=True)
  unmasked = functools.partial(step, masked=False)
  if isinstance(schedule, BlockRange):
    carry = jax.lax.fori_loop(schedule.lo, schedule.full_lo, masked, carry)
    carry = jax.lax.fori_loop(schedule.full_lo, schedule.full_hi, unmasked,
                              carry)
    return jax.lax.fori_loop(schedule.full_hi, schedule.hi, masked, carry)
  carry = jax.lax.fori_loop(
      0, schedule.num_partial, lambda t, c: masked(schedule.block(t), c),
      carry)
  return jax.lax.fori_loop(
      schedule.num_partial, schedule.num_partial + schedule.num_full,
      lambda t, c: unmasked(schedule.block(t), c), carry)


def list_schedule(blocks_ref, counts_ref, prefix: tuple = ()) -> ListSchedule:
  """The `ListSchedule` of a block-map row (``prefix`` picks the row)."""
  return ListSchedule(blocks_ref, prefix, counts_ref[(*prefix, 0)],
                      counts_ref[(*prefix, 1)])


def q_major_pair_spec(x, p: KernelParams, kv_rows: int):
  """BlockSpec of a bias/mask ``[Bx, Nx, Tx, Sx]`` (dims 1 or full) for a
  kernel whose grid is ``(query program, batch, head)`` and that walks the
  whole key axis: one query tile by all key rows, broadcast dims kept at 1."""
  b_dim, n_dim, t_dim, s_dim = x.shape
  return pl.BlockSpec(
      (SQUEEZED, SQUEEZED, p.block_q if t_dim > 1 else 1,
       kv_rows if s_dim > 1 else 1),
      lambda i, b, n: (b if b_dim > 1 else 0, n if n_dim > 1 else 0,
                       p.q_block_of(i) if t_dim > 1 else 0, 0))


def kv_major_pair_spec(x, block_kv: int, q_rows: int, groups: int):
  """BlockSpec of a bias/mask for a kernel whose grid is ``(key block,
  batch, kv head)`` and that walks the query heads of its GQA group and the
  whole query axis."""
  b_dim, n_dim, t_dim, s_dim = x.shape
  return pl.BlockSpec(
      (SQUEEZED, groups if n_dim > 1 else 1, q_rows if t_dim > 1 else 1,
       block_kv if s_dim > 1 else 1),
      lambda j, b, h: (b if b_dim > 1 else 0, h if n_dim > 1 else 0, 0,
                       j if s_dim > 1 else 0))


def q_major_list_specs(lists, p: KernelParams):
  """BlockSpecs of `flash_jax.block_map.BlockLists` for a ``(query program,
  batch, head)`` grid: one query block's row of key blocks."""
  b_dim, n_dim, _, num_cols = lists.blocks.shape
  index = lambda i, b, n: (b if b_dim > 1 else 0, n if n_dim > 1 else 0,
                           p.q_block_of(i), 0)
  return (pl.BlockSpec((SQUEEZED, SQUEEZED, SQUEEZED, num_cols), index),
          pl.BlockSpec((SQUEEZED, SQUEEZED, SQUEEZED, 2), index))


def kv_major_list_specs(lists, groups: int):
  """BlockSpecs of `BlockLists` (query blocks per key block) for a ``(key
  block, batch, kv head)`` grid: the rows of the group's query heads."""
  b_dim, n_dim, _, num_cols = lists.blocks.shape
  heads = groups if n_dim > 1 else 1
  index = lambda j, b, h: (b if b_dim > 1 else 0, h if n_dim > 1 else 0, j, 0)
  return (pl.BlockSpec((SQUEEZED, heads, SQUEEZED, num_cols), index),
          pl.BlockSpec((SQUEEZED, heads, SQUEEZED, 2), index))


def whole_spec(shape):
  """A BlockSpec covering the whole (small) array."""
  return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def add_q_major_features(inputs: Inputs, p: KernelParams, bias, arrays,
                         kv_rows: int, kv_lists) -> None:
  """Adds the bias, mask, segment-id, dropout-seed and block-list operands
  of a ``(query block, batch, head)`` kernel (forward, dQ)."""
  q_major = lambda x: q_major_pair_spec(x, p, kv_rows)
  if bias is not None:
    inputs.add("bias", bias, q_major(bias))
  # Dense masks go in as bool: Pallas' Triton lowering loads i1 through an
  # i8 pointer, so no int8 copy is made (64 MiB per call at T=S=8192).
  mask = arrays.mask
  if mask is not None:
    inputs.add("mask", mask, q_major(mask))
  if arrays.q_segment_ids is not None:
    inputs.add("q_segment_ids", arrays.q_segment_ids.astype(jnp.int32),
               pl.BlockSpec((SQUEEZED, p.block_q),
                            lambda i, b, n: (b, p.q_block_of(i))))
    inputs.add("kv_segment_ids", arrays.kv_segment_ids.astype(jnp.int32),
               pl.BlockSpec((SQUEEZED, kv_rows), lambda i, b, n: (b, 0)))
  if p.dropout_rate > 0:
    inputs.add("seed", arrays.dropout_seed, whole_spec((2,)))
  if kv_lists is not None:
    blocks_spec, counts_spec = q_major_list_specs(kv_lists, p)
    inputs.add("kv_blocks", kv_lists.blocks, blocks_spec)
    inputs.add("kv_counts", kv_lists.counts, counts_spec)


def add_kv_major_features(inputs: Inputs, p: KernelParams, bias, arrays,
                          q_rows: int, q_lists) -> None:
  """The same operands for a ``(key block, batch, kv head)`` kernel that
  walks its GQA group's query heads (dK/dV)."""
  kv_major = lambda x: kv_major_pair_spec(x, p.block_kv, q_rows, p.groups)
  if bias is not None:
    inputs.add("bias", bias, kv_major(bias))
  mask = arrays.mask
  if mask is not None:
    inputs.add("mask", mask, kv_major(mask))
  if arrays.q_segment_ids is not None:
    inputs.add("q_segment_ids", arrays.q_segment_ids.astype(jnp.int32),
               pl.BlockSpec((SQUEEZED, q_rows), lambda j, b, h: (b, 0)))
    inputs.add("kv_segment_ids", arrays.kv_segment_ids.astype(jnp.int32),
               pl.BlockSpec((SQUEEZED, p.block_kv), lambda j, b, h: (b, j)))
  if p.dropout_rate > 0:
    inputs.add("seed", arrays.dropout_seed, whole_spec((2,)))
  if q_lists is not None:
    blocks_spec, counts_spec = kv_major_list_specs(q_lists, p.groups)
    inputs.add("q_blocks", q_lists.blocks, blocks_spec)
    inputs.add("q_counts", q_lists.counts, counts_spec)
