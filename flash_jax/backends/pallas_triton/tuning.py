"""Tile sizes, warps and stages for the three Triton-backend kernels.

Resolution order for one call:

1. the tuned table (`tuned_configs.TUNED`, written by
   ``benchmarks/autotune.py`` on a live GPU) for (GPU generation, padded
   head dim, 16-bit or float32, causal), else the defaults below; when the
   forward's key loop walks a block list (`LISTED_FORWARD`), its forward
   tile from there;
2. the caller's `flash_jax.BlockSizes` overrides, field by field;
3. blocks clamped to the sequence lengths (no tile larger than needed);
4. the shared-memory and register estimates below, checked ahead of time so
   that no configuration fails when Triton compiles it: a tuned or default
   configuration that does not fit this GPU is shrunk (fewer stages, then
   smaller key blocks); tiles the caller asked for (block sizes) raise
   ValueError instead.

The estimates are deliberately simple (pipelined tiles plus one score tile
in shared memory; float32 accumulators in registers) and err on the large
side; the float32 shared-memory estimate is fitted to what Triton asked for
in an H100 search (`_estimates`).
"""

from __future__ import annotations

import dataclasses

from flash_jax.config import BlockSizes

# The smallest tile dimension Triton's dot accepts.
MIN_BLOCK = 16

# Usable shared memory per block, by compute capability major.minor.
SHARED_MEMORY_BYTES = {
    (8, 0): 166912, (8, 6): 101376, (8, 7): 166912, (8, 9): 101376,
    (9, 0): 232448, (10, 0): 232448, (12, 0): 101376,
}
# Target when the GPU is unknown (e.g. lowering on a CPU machine): the H100.
DEFAULT_CAPABILITY = (9, 0)
# Beyond this many float32 accumulator values per thread Triton spills badly.
MAX_ACCUMULATOR_REGISTERS = 224


def next_power_of_two(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class KernelTiling:
  """Launch shape of one kernel."""

  block_q: int
  block_kv: int
  num_warps: int
  num_stages: int


@dataclasses.dataclass(frozen=True)
class Tiling:
  """Resolved launch shapes of the forward, dK/dV and dQ kernels."""

  forward: KernelTiling
  dkv: KernelTiling
  dq: KernelTiling

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, data: dict) -> "Tiling":
    return cls(**{name: KernelTiling(**data[name])
                  for name in ("forward", "dkv", "dq")})


# Forward tiles for key loops driven by a block list (a dense mask, segment
# ids or mask_fn: `flash_jax.block_map`), by "<generation>/h<head dim>/<16bit
# or float32>". Such a loop visits few blocks per program, so each program's
# prologue (the Q tile, the first K/V loads) weighs more; 64x64 tiles with
# 4 warps fit two programs per SM, one loading while the other computes.
# On an H100 (`benchmarks/sparse_probe.py`, session 11, bf16 h128, against
# the dense loops' 128x64 / 8 warps / 3 stages): the 90%-empty-block mask
# 0.287 -> 0.253 ms forward, causal + 12 documents in 16k 0.436 -> 0.385 ms.
LISTED_FORWARD = {"sm90/h128/16bit": KernelTiling(64, 64, 4, 2)}


def generation(capability: tuple[int, int] | None) -> str:
  """The tuning-table generation key, e.g. ``"sm90"``."""
  major, minor = capability or DEFAULT_CAPABILITY
  return f"sm{major}{minor}"


def table_key(capability, head_dim_padded: int, float32: bool,
              causal: bool) -> str:
  return (f"{generation(capability)}/h{head_dim_padded}/"
          f"{'float32' if float32 else '16bit'}/"
          f"{'causal' if causal else 'full'}")


def default_tiling(head_dim_padded: int, float32: bool = False) -> Tiling:
  """Untuned defaults for sm80/sm90-class GPUs, by padded head dim.

  float32 gets smaller tiles: its tiles take twice the shared memory. The
  h<=128 forward tile is the float32 autotune's pick on an H100 (T=2048,
  both causal modes: 6.9 against 10.4 ms non-causal; the backward tiles
  below were not beaten, as no larger one fits).
  """
  if float32:
    if head_dim_padded <= 128:
      return Tiling(KernelTiling(128, 32, 8, 3), KernelTiling(32, 64, 8, 2),
                    KernelTiling(64, 32, 4, 2))
    return Tiling(KernelTiling(32, 32, 4, 2), KernelTiling(16, 32, 8, 2),
                  KernelTiling(32, 16, 4, 2))
  if head_dim_padded <= 64:
    return Tiling(KernelTiling(128, 64, 4, 3), KernelTiling(32, 128, 4, 3),
                  KernelTiling(128, 32, 4, 3))
  if head_dim_padded <= 128:
    return Tiling(KernelTiling(128, 64, 8, 3), KernelTiling(32, 128, 8, 3),
                  KernelTiling(128, 32, 8, 3))
  return Tiling(KernelTiling(64, 32, 8, 2), KernelTiling(32, 64, 8, 2),
                KernelTiling(64, 32, 8, 2))


def _estimates(kernel: str, t: KernelTiling, head_dim: int, value_dim: int,
               item_bytes: int) -> tuple[int, float]:
  """(shared-memory bytes, float32 accumulator values per thread)."""
  bq, bkv, stages = t.block_q, t.block_kv, max(t.num_stages, 1)
  threads = 32 * t.num_warps
  if kernel == "dkv":
    # Q and dO tiles stream through the pipeline; K, V, dK, dV stay put.
    streamed = stages * bq * (head_dim + value_dim)
    resident = bkv * (head_dim + value_dim)
    accumulators = bkv * (head_dim + value_dim) + 3 * bq * bkv
  else:
    # K and V tiles stream; Q (and dO) stay put.
    streamed = stages * bkv * (head_dim + value_dim)
    resident = bq * (head_dim + (value_dim if kernel == "dq" else 0))
    width = value_dim if kernel == "forward" else head_dim
    accumulators = bq * width + (2 if kernel == "forward" else 3) * bq * bkv
  if item_bytes == 4:
    # float32 tiles (TF32x3 products), fitted to the session 7 float32
    # autotune log on an H100: equal to the bytes Triton requested for 11
    # of its 12 refused tilings (16 KiB over for the 12th) and passing the
    # 13 it compiled. The tiles held across the loop are staged twice, and
    # the dK/dV kernel's transposed P and dS operands add 4 * bq * bkv.
    extra = 4 * bq * bkv + 128 if kernel == "dkv" else 0
    shared = item_bytes * (streamed + 2 * resident + extra)
  else:
    # Plus one probability tile re-laid out as a dot operand.
    shared = item_bytes * (streamed + resident + bq * bkv)
  return shared, accumulators / threads


def check_fits(kernel: str, t: KernelTiling, head_dim: int, value_dim: int,
               item_bytes: int, capability) -> str | None:
  """Why ``t`` cannot run on this GPU, or None if it fits."""
  limit = SHARED_MEMORY_BYTES.get(tuple(capability or DEFAULT_CAPABILITY),
                                  101376)
  shared, registers = _estimates(kernel, t, head_dim, value_dim, item_bytes)
  if shared > limit:
    return (f"the {kernel} kernel's tiles {t} need about {shared // 1024} KiB "
            f"of shared memory, more than the {limit // 1024} KiB of "
            f"{generation(capability)}")
  if registers > MAX_ACCUMULATOR_REGISTERS:
    return (f"the {kernel} kernel's tiles {t} hold about {registers:.0f} "
            f"float32 accumulators per thread (limit "
            f"{MAX_ACCUMULATOR_REGISTERS}); use smaller blocks or more warps")
  return None


def _shrink(kernel, t: KernelTiling, head_dim, value_dim, item_bytes,
            capability) -> KernelTiling:
  """Fewer stages, then halved key blocks, then halved query blocks, until
  the tiles fit (for defaults and tuned entries only).

  Raises:
    NotImplementedError: if even the smallest tiles cannot fit (float32 at
      head dim 256 on a GPU with ~100 KiB of shared memory), so that the
      call falls through to another backend instead of failing to compile.
  """
  while reason := check_fits(kernel, t, head_dim, value_dim, item_bytes,
                             capability):
    if t.num_stages > 1:
      t = dataclasses.replace(t, num_stages=t.num_stages - 1)
    elif t.block_kv > MIN_BLOCK:
      t = dataclasses.replace(t, block_kv=t.block_kv // 2)
    elif t.block_q > MIN_BLOCK:
      t = dataclasses.replace(t, block_q=t.block_q // 2)
    else:
      raise NotImplementedError(f"pallas_triton: even the smallest tiles "
                                f"cannot fit: {reason}")
  return t


_OVERRIDE_FIELDS = {
    "forward": ("block_q", "block_kv", "num_warps_fwd", "num_stages_fwd"),
    "dkv": ("block_q_dkv", "block_kv_dkv", "num_warps_dkv", "num_stages_dkv"),
    "dq": ("block_q_dq", "block_kv_dq", "num_warps_dq", "num_stages_dq"),
}


def _clamp_block(requested: int, length: int) -> int:
  """A power-of-two block no larger than the sequence needs."""
  return min(requested, max(MIN_BLOCK, next_power_of_two(length)))


def resolve_tiling(overrides: BlockSizes | None, *, head_dim: int,
                   value_dim: int, item_bytes: int, causal: bool, q_seq: int,
                   kv_seq: int, capability, check_resources: bool,
                   listed: bool = False) -> Tiling:
  """The tiling of one call (see the module docstring for the order).

  ``head_dim`` / ``value_dim`` are the padded (power-of-two) head dims;
  ``capability`` the GPU's (major, minor) or None when unknown; ``listed``
  says the forward walks a block list (see `LISTED_FORWARD`).
  """
  from flash_jax.backends.pallas_triton import tuned_configs

  widest = max(head_dim, value_dim)
  key = table_key(capability, widest, item_bytes == 4, causal)
  base = tuned_configs.TUNED.get(key)
  # Interpret mode (check_resources=False) keeps the big 16-bit tiles for
  # every dtype and for listed loops: fewer grid steps interpret faster, and
  # tiling has no semantics (small tiles are tested explicitly through
  # BlockSizes).
  tiling = (Tiling.from_dict(base) if base else default_tiling(
      widest, float32=item_bytes == 4 and check_resources))
  listed_forward = LISTED_FORWARD.get(key.rsplit("/", 1)[0])
  resolved = {}
  for kernel, (bq, bkv, warps, stages) in _OVERRIDE_FIELDS.items():
    t = getattr(tiling, kernel)
    requested = {}
    if overrides is not None:
      requested = {
          "block_q": getattr(overrides, bq), "block_kv": getattr(overrides, bkv),
          "num_warps": getattr(overrides, warps) or overrides.num_warps,
          "num_stages": getattr(overrides, stages) or overrides.num_stages}
      requested = {k: v for k, v in requested.items() if v is not None}
    if (kernel == "forward" and listed and listed_forward is not None
        and check_resources and not requested):
      # Only whole: fields asked for apply to the dense loops' tile, so a
      # caller's block_sizes mean the same with and without a block map.
      t = listed_forward
    t = dataclasses.replace(t, **requested)
    t = dataclasses.replace(t, block_q=_clamp_block(t.block_q, q_seq),
                            block_kv=_clamp_block(t.block_kv, kv_seq))
    if check_resources:
      if "block_q" in requested or "block_kv" in requested:
        reason = check_fits(kernel, t, head_dim, value_dim, item_bytes,
                            capability)
        if reason:
          raise ValueError(f"block_sizes: {reason}")
      else:
        # Tiles the caller did not choose are shrunk to fit (keeping any
        # warps or stages asked for, unless stages must go).
        t = _shrink(kernel, t, head_dim, value_dim, item_bytes, capability)
    resolved[kernel] = t
  return Tiling(**resolved)
