"""Static options: the one frozen, hashable dataclass every layer shares."""

from __future__ import annotations

import dataclasses

from flash_jax.masks import MaskSpec


# How compiled kernels may multiply float32 tiles (AttentionConfig).
FLOAT32_PRODUCTS = ("tf32x3", "ieee")

# The largest head dim (query/key and value) any backend takes.
MAX_HEAD_DIM = 256


def _is_power_of_two(n: int) -> bool:
  return n > 0 and (n & (n - 1)) == 0


# BlockSizes fields that pick a Hopper kernel schedule rather than a tile.
SCHEDULE_FIELDS = ("ping_pong", "persistent")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiling overrides for the Pallas kernels. Tuning only: no semantics.

  Every field is optional; ``None`` keeps the backend's default. Block sizes
  must be powers of two and at least 16 (the smallest tile Triton's matrix
  instructions take). Sequence lengths need not be multiples of them: tails
  are masked inside the kernels.

  Attributes:
    block_q, block_kv: forward kernel tile (query rows x key rows).
    block_q_dkv, block_kv_dkv: dK/dV kernel tile.
    block_q_dq, block_kv_dq: dQ kernel tile.
    num_warps, num_stages: Triton launch options for all three kernels,
      unless a kernel's own field below is set.
    num_warps_fwd, num_stages_fwd: the forward kernel's.
    num_warps_dkv, num_stages_dkv: the dK/dV kernel's.
    num_warps_dq, num_stages_dq: the dQ kernel's.
    ping_pong: the Hopper backend's forward only: its two consumer
      warpgroups take turns on the tensor cores (FlashAttention-3's
      ping-pong schedule), so one's softmax overlaps the other's matrix
      products. None (the default) turns it on for head dims padded to 64
      and 128, where it measured faster on an H100, and off for 256, where
      it did not; at head dim 64 from 2048 query rows (8192 causal; no
      window or segment ids; at least 8 such 192-row tiles per SM) the
      backend runs three consumer warpgroups without it instead. Setting
      it (True or False) keeps two consumers at every length.
    persistent: the Hopper backend's forward only: a persistent grid of
      about one CTA per SM, each CTA walking its share of the query tiles
      and streaming keys and values without a break between them (and
      loading its next tile's queries ahead at head dims up to 128). None
      (the default) lets the backend choose (see
      ``flash_jax.backends.pallas_mosaic_gpu.persistent_forward``). Results
      are bitwise the same either way.

  The Hopper backend takes no field but ``ping_pong`` and ``persistent``:
  given another, it declines the call (falling through to the Triton
  backend, whose tiling the fields describe).

  Tiles that cannot fit the GPU's shared memory (estimated ahead of time)
  raise ValueError when the call is traced, not a compile error later.
  """

  block_q: int | None = None
  block_kv: int | None = None
  block_q_dkv: int | None = None
  block_kv_dkv: int | None = None
  block_q_dq: int | None = None
  block_kv_dq: int | None = None
  num_warps: int | None = None
  num_stages: int | None = None
  num_warps_fwd: int | None = None
  num_stages_fwd: int | None = None
  num_warps_dkv: int | None = None
  num_stages_dkv: int | None = None
  num_warps_dq: int | None = None
  num_stages_dq: int | None = None
  ping_pong: bool | None = None
  persistent: bool | None = None

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if value is None:
        continue
      if field.name in SCHEDULE_FIELDS:
        if not isinstance(value, bool):
          raise ValueError(
              f"BlockSizes.{field.name} must be a bool, got {value!r}")
        continue
      if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(
            f"BlockSizes.{field.name} must be an int, got {value!r}")
      if field.name.startswith("block"):
        if not _is_power_of_two(value) or value < 16:
          raise ValueError(
              f"BlockSizes.{field.name} must be a power of two >= 16, got "
              f"{value}")
      elif field.name.startswith("num_warps"):
        if not _is_power_of_two(value) or value > 16:
          raise ValueError(f"BlockSizes.{field.name} must be a power of two "
                           f"<= 16, got {value}")
      elif value < 1:
        raise ValueError(f"BlockSizes.{field.name} must be >= 1, got {value}")


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """Every static option of one attention call.

  It is the ``nondiff`` argument of the single ``custom_vjp`` and is passed
  unchanged to a backend's ``forward`` and ``backward``.

  Attributes:
    mask: which (query, key) pairs attend (see `flash_jax.masks`).
    scale: multiplier of the logits ``q . k``.
    logits_soft_cap: if set, logits become ``cap * tanh(logits / cap)``
      after scale and bias.
    dropout_rate: probability of dropping an attention probability.
    dropout_broadcast: one dropout mask for every batch row and head.
    implementation: registered backend name (``"pallas_triton"``, ``"xla"``).
    interpret: run Pallas kernels in interpret mode (CPU testing).
    block_sizes: tiling overrides, or None for the backend's defaults.
    float32_products: how compiled Pallas kernels multiply float32 tiles:
      ``"tf32x3"`` (three TF32 tensor-core products per tile, float32-level
      accuracy by the tests' rule) or ``"ieee"`` (full-precision products
      on CUDA cores, several times slower). `flash_jax.api.canonicalize`
      picks ``"ieee"`` under ``jax.default_matmul_precision("highest")``
      (or ``"float32"``). Interpret mode always multiplies at full
      precision (CPU XLA has no TF32).
    deterministic: the backward gives bitwise-identical gradients on every
      run (the default). ``False`` lets a backend sum dQ with atomic
      float32 adds, whose order varies between runs, where that is faster:
      the Hopper backend then forms dQ inside its dK/dV kernel (5 matrix
      products per tile instead of 7). Backends without such a path ignore
      it.
  """

  mask: MaskSpec
  scale: float
  implementation: str
  logits_soft_cap: float | None = None
  dropout_rate: float = 0.0
  dropout_broadcast: bool = False
  interpret: bool = False
  block_sizes: BlockSizes | None = None
  float32_products: str = "tf32x3"
  deterministic: bool = True

  def __post_init__(self):
    if self.float32_products not in FLOAT32_PRODUCTS:
      raise ValueError(f"float32_products must be one of {FLOAT32_PRODUCTS}, "
                       f"got {self.float32_products!r}")
