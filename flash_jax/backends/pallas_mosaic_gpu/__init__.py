"""The Hopper backend, written with Pallas' Mosaic GPU dialect (sm90).

Status: the default implementation on sm90 (first in
``flash_jax.api.AUTO_ORDER``). Its kernels lower for an H100 in CI, and its
GPU test class passed on an H100 on session 14's kernels (2026-11-27,
session 14: every non-float32 case, 417 passed with ``test_api`` and
``test_mosaic_gpu``; see
``benchmarks/results/NVIDIA_H100_80GB_HBM3/gpu_tests.md``). For head dims
above 128 (padded to 256) the backward is `backward_wide`'s two kernels,
whose two consumer warpgroups split the work by role. The forward runs a
persistent grid where `persistent_forward` says so (bitwise the same
results). Session 15 made ping-pong and a 2-stage ring the head-dim-64
forward's defaults; the 97 cases of the GPU class that run it (head dims
40 and 64, persistent, ping-pong, segment ids, the parameterless feature
cases) passed again on that forward. Session 16 gave the head-dim-64
forward three consumer warpgroups from 2048 query rows (8192 causal;
`THREE_CONSUMERS_FROM_Q_SEQ`, without windows or segment ids) and the
head-dim-64 backward a 2-stage ring (`BACKWARD_STAGES`); 83 GPU cases that
run those kernels passed (head dims 40 and 64 gradients, the default and
forced three-consumer forwards, segment ids, determinism, the
parameterless feature cases). The floor of 8 tiles per SM
(`THREE_CONSUMERS_MIN_TILES_PER_SM`) came after those runs; it only
returns small grids to the two-consumer forward they also passed. Session
17 made the forward rescale O lazily where its consumers do not take turns
(`LAZY_RESCALE_HEAD_DIMS`); 29 GPU cases that run those forwards
(the non-float32 head-dim-256 forward, gradient, persistent, wide-backward
and segment cases, the three-consumer tests, among them the reworked
default-three-consumer test with 4 patched SMs, and
`test_rescale_threshold_forward_matches_the_reference`) passed on an H100,
and `test_late_rescale_forward_is_bitwise_the_same` (3 cases) showed the
late rescale (`ForwardParams.late_rescale`, a probe option, default off:
`LATE_RESCALE_HEAD_DIMS`) bitwise the same as the rescale before the
hand-over. Session 18 (on an H200, the card then lent) gave the
deterministic backward of long head-dim-128 rows that attend every key a
3-stage ring (`backward_stages`); `test_long_row_backward_matches_the_reference`
(4 cases, T = 16384-16400, both backwards) passed there, as did the 4
cases of `test_nondeterministic_backward_matches_reference`.

With ``AttentionConfig.deterministic`` False the backward is one kernel
that reduce-adds dQ (see `flash_jax.backends.pallas_mosaic_gpu.backward`;
at head dim 256 the two deterministic kernels run either way).

It takes: causal (either alignment, bottom-right also aligned to padding
lengths), local windows, padding lengths, segment ids, GQA/MQA, any T and
S, head dims up to 256 (zero-padded to 64, 128 or 256; value head dim equal
to the query head dim), float16 and bfloat16, soft-cap. Anything else
(bias, a dense mask, ``mask_fn``, dropout, float32) raises
NotImplementedError so the dispatcher falls through (usually to
``"pallas_triton"``).

With segment ids each kernel walks a block map's lists
(`flash_jax.block_map`, built here in XLA at the kernel's own tiles), so
blocks between documents are never loaded.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from flash_jax import block_map, platform
from flash_jax.backends.pallas_mosaic_gpu import backward as _backward
from flash_jax.backends.pallas_mosaic_gpu import (
    backward_wide as _backward_wide)
from flash_jax.backends.pallas_mosaic_gpu import common as _common
from flash_jax.backends.pallas_mosaic_gpu import forward as _forward
from flash_jax.config import SCHEDULE_FIELDS, AttentionConfig
from flash_jax.masks import MaskArrays

NAME = "pallas_mosaic_gpu"
HEAD_DIMS = (64, 128, 256)


def _padded_head_dim(head_dim: int) -> int:
  return next(d for d in HEAD_DIMS if d >= head_dim)


def _triton_tiling_fields(config: AttentionConfig) -> list[str]:
  """The `BlockSizes` fields set in the call that this backend cannot honour
  (all but the schedule fields, ``ping_pong`` and ``persistent``: they
  describe the Triton kernels' tiling)."""
  if config.block_sizes is None:
    return []
  return [f.name for f in dataclasses.fields(config.block_sizes)
          if f.name not in SCHEDULE_FIELDS
          and getattr(config.block_sizes, f.name) is not None]


def _unsupported(config: AttentionConfig, query, value, bias, arrays
                 ) -> list[str]:
  spec = config.mask
  tiling = _triton_tiling_fields(config)
  return [reason for reason, bad in (
      ("bias", bias is not None),
      ("a dense mask", arrays.mask is not None),
      ("mask_fn", spec.mask_fn is not None),
      ("dropout", config.dropout_rate > 0),
      (f"dtype {jnp.dtype(query.dtype).name} (float16/bfloat16 only)",
       jnp.dtype(query.dtype) not in (jnp.float16, jnp.bfloat16)),
      (f"head dim {query.shape[-1]} (up to {HEAD_DIMS[-1]})",
       query.shape[-1] > HEAD_DIMS[-1]),
      ("a value head dim different from the query head dim",
       value.shape[-1] != query.shape[-1]),
      ("Pallas interpret mode (Mosaic GPU's cannot run wgmma)",
       config.interpret),
      (f"block_sizes fields {', '.join(tiling)} (Triton tiling)", tiling),
  ) if bad]


def check_supported(config: AttentionConfig, query, key, value, bias,
                    arrays) -> None:
  """Raises NotImplementedError(reason) if this backend cannot take the call."""
  unsupported = _unsupported(config, query, value, bias, arrays)
  if unsupported:
    raise NotImplementedError(f"{NAME} does not support {', '.join(unsupported)}")
  cc = platform.compute_capability()
  if cc is None or cc[0] != 9:
    raise NotImplementedError(
        f"{NAME} needs an sm90 (Hopper) GPU, found "
        f"{'no NVIDIA GPU' if cc is None else f'sm{cc[0]}{cc[1]}'}")


# Head dims (padded) whose forward runs the ping-pong schedule unless
# BlockSizes.ping_pong says otherwise. H100, 2026-11-26 (hopper_rows*.md):
# at 128 it took the forward from 0.70x to 0.87x cuDNN (T=4k) and 0.84x to
# 0.93x (16k), never slower; at 256 it is slower (0.96x -> 0.92x, session
# 14). At 64 it changed nothing while the launch order thrashed L2 (session
# 11); on today's order it pays (session 15, `hopper_tile_probe.py`, with
# the forward's 2-stage ring): 0.90x -> 1.01x at T=4k, 0.86x -> 0.95x at
# 4k causal, 0.95x -> 1.06x at 16k causal, 1.04x -> 1.11x at B=32 T=512.
PING_PONG_HEAD_DIMS = (64, 128)

# Key/value ring depth of the forward. At head dim 64 three stages measured
# no faster than two without ping-pong (session 11); with it (session 15)
# slower on the per-tile causal rows (0.717 -> 0.770 ms at 4k causal, 2.413
# -> 2.591 ms at 16k causal) and equal within noise elsewhere; at 128 and
# 256 three do not fit shared memory.
FORWARD_STAGES = 2


# Ring depth of the backward kernels (their Q/dO or K/V rings). Head dim 64
# had three until session 16; two measured faster on an H100 in two runs
# (`backward_probe.py --backward-stages 3,2`, B=4 T=4k N=32): backward 3.850
# -> 3.719 ms and 3.835 -> 3.691 ms (its dQ kernel 1.684 -> 1.566 and 1.638
# -> 1.529), causal equal (2.098 -> 2.092). At 256 three do not fit shared
# memory. Long rows at 128 take `LONG_BACKWARD_STAGES`.
BACKWARD_STAGES = 2

# The backward's ring depth at padded head dim 128 for rows of at least
# `LONG_BACKWARD_FROM_Q_SEQ` queries that attend every key (no causal
# mask, window or segment ids). H200, session 18 (`backward_probe.py
# --backward-stages 2,3`, N=16, B*T = 16k; backward ms, 2 -> 3 stages):
#   T=16k 12.138 -> 11.562, 11.876 -> 11.355 and 11.876 -> 11.384 (three
#     runs in two processes; the dK/dV kernel 7.415 -> 6.845, dQ equal);
#   T=4k 3.026 -> 3.084 and 2.969 -> 3.029, T=8k (B=2) 5.806 -> 5.930;
#     causal 4k 1.673 -> 1.785, 16k 5.748 -> 6.180: slower, so those keep
#     two.
# The fused-dQ backward (``deterministic=False``) measured slower with
# three (16k 11.478 -> 12.684 ms, 8k 5.772 -> 6.483), so it keeps two;
# head dim 64 at 16k (N=32) too (14.464 -> 14.862). Only B=1 N=16 T=16k
# gained, on an H200: longer rows, other batch and head counts, GQA and
# the H100 were not measured. The length is the unpadded query length.
LONG_BACKWARD_STAGES = 3
LONG_BACKWARD_FROM_Q_SEQ = 16384
LONG_BACKWARD_HEAD_DIMS = (128,)


def backward_stages(padded_head_dim: int, q_seq: int, spec, segments: bool,
                    fused_dq: bool) -> int:
  """The backward kernels' ring depth: `LONG_BACKWARD_STAGES` for the
  deterministic backward (not ``fused_dq``) of long rows that attend every
  key (``spec`` a `MaskSpec` with no causal mask or window, no
  ``segments``) at the head dims where that measured faster, else
  `BACKWARD_STAGES`."""
  full_rows = not (spec.is_causal or segments
                   or spec.window_left is not None
                   or spec.window_right is not None)
  if (padded_head_dim in LONG_BACKWARD_HEAD_DIMS and full_rows
      and not fused_dq and q_seq >= LONG_BACKWARD_FROM_Q_SEQ):
    return LONG_BACKWARD_STAGES
  return BACKWARD_STAGES

# The head-dim-64 forward runs three consumer warpgroups (192 query rows per
# CTA, `ForwardParams.consumers`; ping-pong off: their round-robin turns
# measured 0.77-0.94x cuDNN against 0.94-1.09x without, session 16 call 1)
# from these query lengths on, without / with a causal mask, and two below.
# H100, session 16 (`hopper_tile_probe.py`, tiles 128x2 -> 128x2xW3, B*T =
# 16k, N*H = 2048, forward / cuDNN's; two runs at 4k, three at 4k causal):
#   non-causal T = 1k 1.08 -> 1.05, 2k 0.99 -> 1.07, 4k 1.01 -> 1.04 and
#     1.03 -> 1.07, 8k 0.97 -> 1.06, 16k 1.00 -> 1.05;
#   causal T = 1k 1.08 -> 0.88, 2k 1.02 -> 0.99, 4k 0.96 -> 0.94, 0.95 ->
#     0.92 and 0.96 -> 0.93, 8k 0.98 -> 1.01, 16k 1.05 -> 1.09.
# Short causal tiles lose to the 192-row tiles' larger masked diagonal.
# Windows and segment ids were not measured and keep two. Every measured row
# had about 21 query tiles of 192 rows per SM; with few tiles per SM the
# last round's idle SMs could outweigh the gain (not measured), so a grid of
# fewer than `THREE_CONSUMERS_MIN_TILES_PER_SM` such tiles per SM keeps two.
THREE_CONSUMERS_FROM_Q_SEQ = {False: 2048, True: 8192}
THREE_CONSUMERS_MIN_TILES_PER_SM = 8

# Padded head dims whose forward rescales O lazily when its consumers do not
# take turns (`ForwardParams.rescale_threshold` at its largest, 8: a row's
# max moves only when a block's exceeds it by more than 8 in log2 units, a
# factor 2^8, and warps where no row moved skip the multiply). H100,
# session 17 (`hopper_tile_probe.py`, B*T = 16k, N*H = 2048, forward /
# cuDNN's, every block -> lazy):
#   head dim 256: T=4k 1.001 -> 1.026, 4k causal 1.013 -> 1.034, 16k
#     0.932 -> 0.963 (the rescale was 28% of its instructions, session 16);
#   64, three consumers: 4k 1.029 -> 1.055.
# With ping-pong it measured slower: head dim 64 (two consumers) 4k causal
# 0.974 -> 0.830, B=32 T=512 1.103 -> 0.998, causal 1.076 -> 0.951; 128 4k
# 1.025 -> 1.020, causal 1.041 -> 1.020. Skipping the multiply only where
# no row's max moved at all (threshold 0) was slower at 256 (0.941x),
# likely because with 16 rows per warp some row moves in most blocks (not
# counted).
LAZY_RESCALE_HEAD_DIMS = (64, 256)

# Padded head dims whose ping-pong forward without a causal mask rescales O
# after handing the tensor cores over (`ForwardParams.late_rescale`; bitwise
# the same results): none yet. H100, session 17, one probe run (B=4 T=4k
# N=16, forward / cuDNN's): head dim 128 1.020 -> 1.075, causal 1.038 ->
# 1.027; one run, whose late time (0.862 ms) was no faster than the same
# session's earlier baseline (0.858 ms), is too little to change a default
# that no GPU test has run. Not measured at 64.
LATE_RESCALE_HEAD_DIMS = ()


def rescale_fields(padded_head_dim: int, ping_pong: bool,
                   causal: bool) -> dict:
  """The forward's `ForwardParams` ``rescale_threshold`` and
  ``late_rescale`` for a schedule (see `LAZY_RESCALE_HEAD_DIMS` and
  `LATE_RESCALE_HEAD_DIMS`)."""
  lazy = padded_head_dim in LAZY_RESCALE_HEAD_DIMS and not ping_pong
  return dict(
      rescale_threshold=_forward.MAX_RESCALE_THRESHOLD if lazy else None,
      late_rescale=(padded_head_dim in LATE_RESCALE_HEAD_DIMS and ping_pong
                    and not causal))


def _ping_pong(config: AttentionConfig, padded_head_dim: int) -> bool:
  chosen = config.block_sizes.ping_pong if config.block_sizes else None
  if chosen is None:
    return padded_head_dim in PING_PONG_HEAD_DIMS
  return chosen


def _consumers(config: AttentionConfig, padded_head_dim: int, batch: int,
               num_heads: int, q_seq: int, segments: bool) -> int:
  """The forward's consumer warpgroups (see `THREE_CONSUMERS_FROM_Q_SEQ`).
  An explicit `BlockSizes.ping_pong` keeps two, the schedule it names."""
  spec = config.mask
  if (padded_head_dim != 64 or segments
      or (config.block_sizes and config.block_sizes.ping_pong is not None)
      or spec.window_left is not None or spec.window_right is not None
      or q_seq < THREE_CONSUMERS_FROM_Q_SEQ[spec.is_causal]):
    return 2
  tiles = batch * num_heads * math.ceil(q_seq / (3 * _forward.BLOCK_Q))
  enough = tiles >= THREE_CONSUMERS_MIN_TILES_PER_SM * platform.sm_count()
  return 3 if enough else 2


def persistent_ctas(sm_count: int, tiles_per_head: int) -> int:
  """The CTAs of a persistent forward grid: the most, up to one per SM, that
  share no factor with the query tiles per head. The grid's items are
  ordered (batch, head, query tile) and dealt round-robin, so CTA ``c``
  takes item ``c + i * ctas`` in its round ``i``; with a coprime count
  its tile index moves on every round and it meets long and short causal
  tiles alike (132 CTAs and 4 tiles per head would give each CTA one
  tile index for good: every longest tile to the same CTAs)."""
  return next(ctas for ctas in range(sm_count, 0, -1)
              if math.gcd(ctas, tiles_per_head) == 1)


def persistent_forward(config: AttentionConfig, p) -> bool:
  """Whether the forward runs a persistent grid: `BlockSizes.persistent`,
  else where it measured faster on an H100 (2026-11-27, session 14,
  `benchmarks/hopper_tile_probe.py`, forward against cuDNN, one CTA per
  tile -> persistent):

  * head dim 64, B=32 T=512 N=32: 0.84x -> 1.04x, causal 0.81x -> 1.05x
    (per-tile prologues and epilogues dominate short tiles);
  * head dim 128, T=4k and 16k: 0.99x -> 1.01x;
  * head dim 64, T=4k: 0.86x -> 0.86x, causal 0.88x -> 0.90x;
  * causal head dim 128: 1.03x -> 0.96x at 4k and 1.12x -> 0.73x at 16k,
    where a CTA's 15-16 tiles cover too few of a head's 32-128 tile
    indices to even out their lengths (one CTA per tile lets the GPU
    start the next tile wherever one ends);
  * head dim 256: 0.94x -> 0.91x, causal 0.98x -> 0.79x (one Q buffer
    per consumer: shared memory leaves no room to load the next tile's Q
    ahead).

  So by default: head dims up to 128, and with a mask whose tiles differ in
  length (causal, window, segment ids) only if every CTA takes at least as
  many tiles as a head has, so that it meets every tile index
  (`persistent_ctas`)."""
  chosen = config.block_sizes.persistent if config.block_sizes else None
  if chosen is not None:
    return chosen
  if p.head_dim > 128:
    return False
  spec = p.mask
  uneven = (spec.is_causal or spec.window_left is not None
            or spec.window_right is not None or p.segments)
  items = p.batch * p.num_heads * p.num_q_tiles
  ctas = persistent_ctas(platform.sm_count(), p.num_q_tiles)
  return not uneven or items >= ctas * p.num_q_tiles


def _params(config: AttentionConfig, query, key, arrays, *, forward: bool):
  """The kernels' `ForwardParams` (``stages`` is the forward's ring depth if
  ``forward``, else the backward's)."""
  batch, q_seq, num_heads, head_dim = query.shape
  padded = _padded_head_dim(head_dim)
  block_kv = 64 if padded > 128 else 128
  segments = arrays.q_segment_ids is not None
  consumers = (_consumers(config, padded, batch, num_heads, q_seq, segments)
               if forward else _forward.CONSUMERS)
  ping_pong = _ping_pong(config, padded) and consumers == 2
  return _forward.ForwardParams(
      batch=batch, q_seq=q_seq, kv_seq=key.shape[1], num_heads=num_heads,
      num_kv_heads=key.shape[2], head_dim=padded, dtype=query.dtype,
      mask=config.mask, scale=config.scale,
      logits_soft_cap=config.logits_soft_cap, block_kv=block_kv,
      stages=(FORWARD_STAGES if forward else
              backward_stages(padded, q_seq, config.mask, segments,
                              not config.deterministic)),
      ping_pong=ping_pong, consumers=consumers,
      fused_dq=not config.deterministic, segments=segments,
      **(rescale_fields(padded, ping_pong, config.mask.is_causal)
         if forward else {}))


def _lengths(lengths, batch: int, full: int):
  """int32 ``[B]`` lengths clipped to the true (unpadded) length ``full``,
  so the kernels, which see padded sequences, never attend padding."""
  if lengths is None:
    return jnp.full((batch,), full, jnp.int32)
  return jnp.clip(lengths.astype(jnp.int32), 0, full)


def _pad(x, seq: int, head_dim: int):
  """Zero-pads the sequence axis to ``seq`` and the head axis to
  ``head_dim``. (TMA tiles need sequence lengths that are multiples of 8 and
  128-byte rows; padded keys lie past ``kv_len`` and are masked, padded
  queries are sliced off.)"""
  pad_seq, pad_head = seq - x.shape[1], head_dim - x.shape[-1]
  if pad_seq == 0 and pad_head == 0:
    return x
  return jnp.pad(x, [(0, 0), (0, pad_seq), (0, 0), (0, pad_head)])


def _padded_ids(ids, seq: int):
  """Segment ids padded to ``seq`` by repeating the last one (padded keys
  lie past ``kv_len``, which masks them, and padded query rows are sliced
  off; repeating keeps full blocks full)."""
  return jnp.pad(ids.astype(jnp.int32), [(0, 0), (0, seq - ids.shape[1])],
                 mode="edge")


def segment_lists(config: AttentionConfig, p, arrays, q_lengths, kv_lengths,
                  tiles):
  """The padded segment ids and a block map's states at each ``(block_q,
  block_kv)`` of ``tiles``, for the padded sequences of ``p``.

  The map sees the true lengths (``q_lengths``/``kv_lengths``), so no
  block holding keys at or past ``kv_len`` is full. (Query rows past
  ``q_len`` may lie in a full block: the forward zeroes them and gives
  them lse -inf, so the backward's P is 0 there.)"""
  # The kernels read a CTA's own ids from global memory without TMA's
  # clipping, so their ids cover whole CTAs; the map sees the sequences.
  whole = lambda n: -(-n // p.rows_per_cta) * p.rows_per_cta
  q_ids = _padded_ids(arrays.q_segment_ids, whole(p.q_seq))
  kv_ids = _padded_ids(arrays.kv_segment_ids, whole(p.kv_seq))
  states = block_map.block_states_for_tiles(
      config.mask, MaskArrays(q_lengths, kv_lengths,
                              q_segment_ids=q_ids[:, :p.q_seq],
                              kv_segment_ids=kv_ids[:, :p.kv_seq]),
      batch=p.batch, num_heads=p.num_heads, q_seq=p.q_seq, kv_seq=p.kv_seq,
      tiles=tiles)
  return q_ids, kv_ids, states


def forward(config: AttentionConfig, query, key, value, bias, arrays):
  """Returns ``(out [B,T,N,H], lse [B,N,T] float32)``."""
  assert not _unsupported(config, query, value, bias, arrays)
  batch, q_seq, _, head_dim = query.shape
  kv_seq = key.shape[1]
  p = _params(config, query, key, arrays, forward=True)
  q_pad, kv_pad = -(-q_seq // 8) * 8, -(-kv_seq // 8) * 8
  # The kernel sees the padded lengths; the mask keeps the true ones.
  p = dataclasses.replace(p, q_seq=q_pad, kv_seq=kv_pad)
  if persistent_forward(config, p):
    p = dataclasses.replace(p, persistent=persistent_ctas(
        platform.sm_count(), p.num_q_tiles))
  q_lengths = _lengths(arrays.q_lengths, batch, q_seq)
  kv_lengths = _lengths(arrays.kv_lengths, batch, kv_seq)
  segments = ()
  if p.segments:
    q_ids, kv_ids, (states,) = segment_lists(
        config, p, arrays, q_lengths, kv_lengths,
        [(p.rows_per_cta, p.block_kv)])
    segments = _common.segment_operands(q_ids, kv_ids,
                                        block_map.kv_lists(states))
  out, lse = _forward.forward(
      p, _pad(query, q_pad, p.head_dim), _pad(key, kv_pad, p.head_dim),
      _pad(value, kv_pad, p.head_dim), q_lengths, kv_lengths, segments)
  return out[:, :q_seq, :, :head_dim], lse[:, :, :q_seq]


def backward_kernels(p):
  """The module whose kernels form the backward for params ``p``
  (`backward`, or `backward_wide` for head dim 256, where one consumer
  forms P and dV and the other dS and dK or dQ); both have ``backward`` and
  ``list_tiles``."""
  return _backward_wide if p.head_dim > 128 else _backward


def backward(config: AttentionConfig, query, key, value, bias, arrays, out,
             lse, dout, dlse):
  """Returns ``(dq, dk, dv, None)`` from the Mosaic GPU backward kernels."""
  batch, q_seq, _, head_dim = query.shape
  kv_seq = key.shape[1]
  p = _params(config, query, key, arrays, forward=False)
  q_pad, kv_pad = -(-q_seq // 8) * 8, -(-kv_seq // 8) * 8
  p = dataclasses.replace(p, q_seq=q_pad, kv_seq=kv_pad)
  kernels = backward_kernels(p)
  # D = rowsum(dO * O), minus the lse cotangent (FlashAttention-2).
  delta = jnp.einsum("btnh,btnh->bnt", out.astype(jnp.float32),
                     dout.astype(jnp.float32)) - dlse.astype(jnp.float32)
  rows = [(0, 0), (0, 0), (0, q_pad - q_seq)]
  lse = jnp.pad(lse, rows, constant_values=-jnp.inf)
  delta = jnp.pad(delta, rows)
  q_lengths = _lengths(arrays.q_lengths, batch, q_seq)
  kv_lengths = _lengths(arrays.kv_lengths, batch, kv_seq)
  dkv_segments = dq_segments = ()
  if p.segments:
    tiles = kernels.list_tiles(p)
    unique = list(dict.fromkeys(tiles.values()))   # one map per tile
    q_ids, kv_ids, states = segment_lists(config, p, arrays, q_lengths,
                                          kv_lengths, unique)
    states = {name: states[unique.index(tile)]
              for name, tile in tiles.items()}
    dkv_segments = _common.segment_operands(
        q_ids, kv_ids, block_map.q_lists(states["dkv"]))
    if "dq" in states:
      dq_segments = _common.segment_operands(
          q_ids, kv_ids, block_map.kv_lists(states["dq"]))
  dq, dk, dv = kernels.backward(
      p, _pad(query, q_pad, p.head_dim), _pad(key, kv_pad, p.head_dim),
      _pad(value, kv_pad, p.head_dim), _pad(dout, q_pad, p.head_dim), lse,
      delta, q_lengths, kv_lengths, dkv_segments, dq_segments)
  return (dq[:, :q_seq, :, :head_dim], dk[:, :kv_seq, :, :head_dim],
          dv[:, :kv_seq, :, :head_dim], None)
