"""Pieces shared by the Triton-backend kernels: static parameters, tiling,
masked tile loads and the pallas_call plumbing."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from flash_jax.config import AttentionConfig, BlockSizes
from flash_jax.masks import MaskSpec

LOG2_E = math.log2(math.e)
LN_2 = math.log(2.0)

# The smallest tile dimension Triton's dot accepts.
MIN_BLOCK = 16


def next_power_of_two(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


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

  @property
  def groups(self) -> int:
    """Query heads per key/value head (G)."""
    return self.num_heads // self.num_kv_heads

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
    # float32 inputs get full-precision products (no TF32).
    if jnp.dtype(self.dtype) == jnp.float32:
      return jax.lax.Precision.HIGHEST
    return None

  def compiler_params(self):
    return plgpu.CompilerParams(num_warps=self.num_warps,
                                num_stages=self.num_stages)


def _clamp_block(requested: int, length: int) -> int:
  """A power-of-two block no larger than the sequence needs."""
  return min(requested, max(MIN_BLOCK, next_power_of_two(length)))


@dataclasses.dataclass(frozen=True)
class Tiling:
  """Resolved tile sizes for the three kernels."""

  block_q: int
  block_kv: int
  block_q_dkv: int
  block_kv_dkv: int
  block_q_dq: int
  block_kv_dq: int
  num_warps: int
  num_stages: int


def default_tiling(head_dim_padded: int) -> Tiling:
  """Defaults for sm80/sm90-class GPUs, by padded head dim."""
  if head_dim_padded <= 64:
    return Tiling(128, 64, 32, 128, 128, 32, num_warps=4, num_stages=3)
  if head_dim_padded <= 128:
    return Tiling(128, 64, 32, 128, 128, 32, num_warps=8, num_stages=3)
  return Tiling(64, 32, 32, 64, 64, 32, num_warps=8, num_stages=2)


def resolve_tiling(overrides: BlockSizes | None, head_dim_padded: int,
                   q_seq: int, kv_seq: int) -> Tiling:
  """Defaults, then user overrides, then clamping to the sequence lengths."""
  tiling = default_tiling(head_dim_padded)
  if overrides is not None:
    tiling = dataclasses.replace(tiling, **{
        f.name: getattr(overrides, f.name)
        for f in dataclasses.fields(overrides)
        if getattr(overrides, f.name) is not None})
  return dataclasses.replace(
      tiling,
      block_q=_clamp_block(tiling.block_q, q_seq),
      block_kv=_clamp_block(tiling.block_kv, kv_seq),
      block_q_dkv=_clamp_block(tiling.block_q_dkv, q_seq),
      block_kv_dkv=_clamp_block(tiling.block_kv_dkv, kv_seq),
      block_q_dq=_clamp_block(tiling.block_q_dq, q_seq),
      block_kv_dq=_clamp_block(tiling.block_kv_dq, kv_seq),
  )


def kernel_params(config: AttentionConfig, query, key, value, *,
                  block_q: int, block_kv: int, tiling: Tiling) -> KernelParams:
  batch, q_seq, num_heads, head_dim = query.shape
  kv_seq, num_kv_heads = key.shape[1], key.shape[2]
  return KernelParams(
      batch=batch, q_seq=q_seq, kv_seq=kv_seq, num_heads=num_heads,
      num_kv_heads=num_kv_heads, head_dim=head_dim,
      value_head_dim=value.shape[-1], dtype=query.dtype, mask=config.mask,
      scale=config.scale, block_q=block_q, block_kv=block_kv,
      num_warps=tiling.num_warps, num_stages=tiling.num_stages,
      interpret=config.interpret)


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
  return plgpu.load(ref, mask=mask, other=other)


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
  return plgpu.load(ref, mask=valid, other=other)


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
