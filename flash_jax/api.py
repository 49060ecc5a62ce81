"""The public entry point: validate, canonicalise, dispatch.

Everything a caller can get wrong is caught here with a ValueError naming the
argument and the shapes, before any kernel is traced.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flash_jax import backends, dropout, platform
from flash_jax.config import AttentionConfig, BlockSizes
from flash_jax.masks import MaskArrays, MaskSpec, trace_mask_fn
from flash_jax.vjp import flash_attention

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.float16),
                    jnp.dtype(jnp.bfloat16))
IMPLEMENTATIONS = ("pallas_triton", "pallas_mosaic_gpu", "xla", "cudnn")
# What implementation=None tries, in order: the Hopper backend on sm90 (it
# declines everything else, and calls it does not support), the portable
# Triton backend on sm80+, else the XLA reference.
AUTO_ORDER = ("pallas_mosaic_gpu", "pallas_triton", "xla")
CAUSAL_ALIGNMENTS = ("top_left", "bottom_right")


@dataclasses.dataclass(frozen=True)
class CanonicalCall:
  """A validated call: 4-D operands, the dynamic mask arrays and the static
  semantics (``config``, whose implementation is filled in at dispatch)."""

  query: jax.Array        # [B, T, N, H]
  key: jax.Array          # [B, S, K, H]
  value: jax.Array        # [B, S, K, Hv]
  bias: jax.Array | None  # 4-D, broadcastable to [B, N, T, S]
  arrays: MaskArrays
  config: AttentionConfig
  had_batch_dim: bool

  def finish(self, out, lse, return_residual: bool):
    """Restores the caller's rank; lse goes from ``[B,N,T]`` to ``[B,T,N]``."""
    if not self.had_batch_dim:
      out = out[0]
    if not return_residual:
      return out
    lse = jnp.swapaxes(lse, 1, 2)
    if not self.had_batch_dim:
      lse = lse[0]
    return out, lse


def _as_array(x, name: str) -> jax.Array:
  if x is None:
    raise ValueError(f"{name} must be an array, got None")
  try:
    return jnp.asarray(x)
  except TypeError as e:
    raise ValueError(f"{name} must be an array, got {type(x).__name__}") from e


def _static_number(value, name: str) -> float:
  if isinstance(value, jax.core.Tracer):
    raise ValueError(f"{name} must be a static Python number, not a traced "
                     "value (it is compiled into the kernels)")
  try:
    number = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a real number, got {value!r}") from None
  if not math.isfinite(number):
    raise ValueError(f"{name} must be finite, got {number}")
  return number


def _check_lengths(lengths, name: str, batch: int, full: int):
  if lengths is None:
    return None
  lengths = _as_array(lengths, name)
  if not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(f"{name} must be an integer array, got {lengths.dtype}")
  if lengths.shape != (batch,):
    raise ValueError(
        f"{name} must have shape (B,) = ({batch},), got {lengths.shape}")
  # Clipping first keeps the meaning (index < length) of any integer dtype:
  # a length past the sequence means "all valid", a negative one "none".
  return jnp.clip(lengths, 0, full).astype(jnp.int32)


def _check_bool(value, name: str) -> bool:
  """A static bool (a concrete 0-d boolean array is accepted too)."""
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  if (not isinstance(value, jax.core.Tracer) and getattr(value, "shape", None)
      == () and getattr(value, "dtype", None) == np.bool_):
    return bool(value)
  raise ValueError(f"{name} must be a static bool, got {value!r}")


def _check_broadcastable(x, name: str, full: tuple[int, ...], had_batch: bool):
  """A bias or mask: at most 4-D, each dim 1 or the full ``[B, N, T, S]``."""
  if x.ndim > 4:
    raise ValueError(f"{name} must have at most 4 dims, got shape {x.shape}")
  given = x.shape
  x = x.reshape((1,) * (4 - x.ndim) + x.shape)
  if any(d not in (1, f) for d, f in zip(x.shape, full)):
    target, shape = (("[B, N, T, S]", full) if had_batch
                     else ("[N, T, S]", full[1:]))
    raise ValueError(
        f"{name} of shape {given} does not broadcast to {target} = {shape}")
  return x


def _check_segment_ids(q_ids, kv_ids, batch, q_seq, kv_seq, had_batch):
  if q_ids is None and kv_ids is None:
    return None, None
  if q_ids is None or kv_ids is None:
    raise ValueError("query_segment_ids and kv_segment_ids must be given "
                     "together")
  result = []
  for name, ids, seq in (("query_segment_ids", q_ids, q_seq),
                         ("kv_segment_ids", kv_ids, kv_seq)):
    ids = _as_array(ids, name)
    if not had_batch and ids.ndim == 1:
      ids = ids[None]
    if not jnp.issubdtype(ids.dtype, jnp.integer):
      raise ValueError(f"{name} must be an integer array, got {ids.dtype}")
    if ids.shape != (batch, seq):
      raise ValueError(f"{name} must have shape {(batch, seq)}, got "
                       f"{ids.shape}")
    result.append(ids.astype(jnp.int32))
  return tuple(result)


def _check_mask_fn(mask_fn) -> None:
  """Traces ``mask_fn`` once on int32 scalar indices: it must take the four
  indices, give one bool, and capture no arrays (the kernels evaluate it
  from the indices alone, and a Pallas kernel cannot close over arrays)."""
  if mask_fn is None:
    return
  if not callable(mask_fn):
    raise ValueError(f"mask_fn must be callable, got {mask_fn!r}")
  try:
    traced = trace_mask_fn(mask_fn)
  except Exception as e:  # the caller's code: report any failure as theirs
    raise ValueError(
        "mask_fn(batch, head, q_idx, kv_idx) failed on int32 scalar indices "
        f"({type(e).__name__}: {e})") from e
  outputs = traced.out_avals
  if (len(outputs) != 1 or outputs[0].shape != ()
      or outputs[0].dtype != jnp.bool_):
    raise ValueError(
        "mask_fn(batch, head, q_idx, kv_idx) must return one bool per index "
        f"tuple; on int32 scalar indices it returned {outputs}")
  if traced.consts:
    # Python and NumPy scalars become literals; a captured JAX array (even
    # 0-d) or NumPy array would be a constant of the Pallas kernel.
    shapes = [jax.typeof(c).str_short() for c in traced.consts]
    raise ValueError(
        f"mask_fn captures array values ({', '.join(shapes)}); it must "
        "compute the mask from its four index arguments and scalars "
        "alone. Per-batch data goes in query_segment_ids/kv_segment_ids, "
        "the seq lengths or a dense mask")


def _check_window(window) -> tuple[int, int] | None:
  if window is None:
    return None
  pair = (window, window) if isinstance(window, (int, np.integer)) else window
  if (not isinstance(pair, (tuple, list)) or len(pair) != 2 or
      not all(isinstance(w, (int, np.integer)) and not isinstance(w, bool)
              and w >= 0 for w in pair)):
    raise ValueError(
        "local_window_size must be a non-negative int or a (left, right) "
        f"pair of them, got {window!r}")
  return int(pair[0]), int(pair[1])


def canonicalize(query, key, value, *, bias=None, mask=None, scale=None,
                 is_causal=False, query_seq_lengths=None,
                 key_value_seq_lengths=None, local_window_size=None,
                 query_segment_ids=None, kv_segment_ids=None,
                 causal_alignment="top_left", mask_fn=None,
                 logits_soft_cap=None, dropout_rate=0.0, dropout_rng=None,
                 broadcast_dropout=False) -> CanonicalCall:
  """Validates `dot_product_attention`'s semantic arguments.

  Raises:
    ValueError: for any malformed argument (rank, shapes, dtypes, lengths,
      masks, window, soft-cap, dropout).
  """
  query = _as_array(query, "query")
  key = _as_array(key, "key")
  value = _as_array(value, "value")

  ranks = (query.ndim, key.ndim, value.ndim)
  if query.ndim not in (3, 4) or len(set(ranks)) != 1:
    raise ValueError(
        "query, key and value must all be 4-D (BTNH / BSKH) or all 3-D "
        f"(TNH / SKH); got shapes query={query.shape}, key={key.shape}, "
        f"value={value.shape}")
  had_batch_dim = query.ndim == 4
  if not had_batch_dim:
    query, key, value = query[None], key[None], value[None]

  dtypes = {jnp.dtype(x.dtype) for x in (query, key, value)}
  if len(dtypes) != 1:
    raise ValueError(
        "query, key and value must share one dtype; got "
        f"query={query.dtype}, key={key.dtype}, value={value.dtype}")
  if jnp.dtype(query.dtype) not in SUPPORTED_DTYPES:
    raise ValueError(
        f"dtype must be float32, float16 or bfloat16; got {query.dtype}")

  batch, q_seq, num_heads, head_dim = query.shape
  kv_batch, kv_seq, num_kv_heads, kv_head_dim = key.shape
  shapes = f"query={query.shape}, key={key.shape}, value={value.shape}"
  if kv_batch != batch or value.shape[0] != batch:
    raise ValueError(f"batch sizes differ: {shapes}")
  if value.shape[1:3] != (kv_seq, num_kv_heads):
    raise ValueError(f"key and value must agree in S and K: {shapes}")
  if kv_head_dim != head_dim:
    raise ValueError(f"query and key head dims differ: {shapes}")
  # Empty sequences are valid (as in jax.nn): see `_no_pairs`.
  if min(num_heads, num_kv_heads) < 1:
    raise ValueError(f"head counts must be >= 1: {shapes}")
  if num_heads % num_kv_heads:
    raise ValueError(
        f"query heads N={num_heads} must be a multiple of key/value heads "
        f"K={num_kv_heads} (GQA/MQA): {shapes}")
  # Head dims above 256 (config.MAX_HEAD_DIM) are valid, as in jax.nn: the
  # kernel backends decline them (NotImplementedError), the XLA path runs.
  for name, dim in (("query/key", head_dim), ("value", value.shape[-1])):
    if dim < 1:
      raise ValueError(f"{name} head dim must be >= 1, got {dim}: {shapes}")
  is_causal = _check_bool(is_causal, "is_causal")
  if causal_alignment not in CAUSAL_ALIGNMENTS:
    raise ValueError(f"causal_alignment must be one of {CAUSAL_ALIGNMENTS}, "
                     f"got {causal_alignment!r}")
  _check_mask_fn(mask_fn)

  full = (batch, num_heads, q_seq, kv_seq)
  if bias is not None:
    bias = _as_array(bias, "bias")
    if not jnp.issubdtype(bias.dtype, jnp.floating):
      raise ValueError(f"bias must be a floating array, got {bias.dtype}")
    bias = _check_broadcastable(bias, "bias", full, had_batch_dim)
  if mask is not None:
    mask = _as_array(mask, "mask")
    if mask.dtype != jnp.bool_:
      raise ValueError(f"mask must be a boolean array (True = attend), got "
                       f"{mask.dtype}; pass an additive mask as bias")
    mask = _check_broadcastable(mask, "mask", full, had_batch_dim)
  q_segments, kv_segments = _check_segment_ids(
      query_segment_ids, kv_segment_ids, batch, q_seq, kv_seq, had_batch_dim)
  window = _check_window(local_window_size)

  if logits_soft_cap is not None:
    logits_soft_cap = _static_number(logits_soft_cap, "logits_soft_cap")
    if logits_soft_cap <= 0:
      raise ValueError(f"logits_soft_cap must be > 0, got {logits_soft_cap}")
  dropout_rate = _static_number(dropout_rate, "dropout_rate")
  # Rejects rates outside [0, 1) and those 8-bit draws cannot hold.
  dropout.threshold(dropout_rate)
  seed = None
  if dropout_rate > 0:
    if dropout_rng is None:
      raise ValueError("dropout_rate > 0 needs a dropout_rng (a JAX PRNG key)")
    try:
      seed = dropout.seed_words(dropout_rng)
    except (TypeError, ValueError) as e:
      raise ValueError(f"dropout_rng must be a JAX PRNG key: {e}") from e

  bottom_right = causal_alignment == "bottom_right"
  # With padding lengths, bottom-right alignment follows each row's valid
  # lengths (the last valid query sees the last valid key), as
  # FlashAttention's varlen and KV-cache calls do.
  align_to_lengths = bottom_right and (
      is_causal or window is not None) and (
          query_seq_lengths is not None or key_value_seq_lengths is not None)
  if isinstance(scale, jax.core.Tracer):
    # A traced scale (e.g. 1 / jnp.sqrt(H) under jit) cannot be compiled
    # into the kernels: fold it into the query instead, in float32 before
    # the cast, so it stays differentiable.
    if scale.shape != ():
      raise ValueError(f"scale must be a scalar, got shape {scale.shape}")
    query = (query.astype(jnp.float32) * scale).astype(query.dtype)
    scale = 1.0
  scale = (1.0 / math.sqrt(head_dim) if scale is None
           else _static_number(scale, "scale"))
  spec = MaskSpec(
      is_causal=is_causal,
      diagonal_offset=(kv_seq - q_seq
                       if bottom_right and not align_to_lengths else 0),
      align_to_lengths=align_to_lengths,
      window_left=None if window is None else window[0],
      window_right=None if window is None else window[1],
      mask_fn=mask_fn)
  config = AttentionConfig(
      mask=spec, scale=scale, implementation="", logits_soft_cap=logits_soft_cap,
      dropout_rate=dropout_rate,
      dropout_broadcast=_check_bool(broadcast_dropout, "broadcast_dropout"),
      float32_products=float32_products())
  arrays = MaskArrays(
      q_lengths=_check_lengths(query_seq_lengths, "query_seq_lengths", batch,
                               q_seq),
      kv_lengths=_check_lengths(key_value_seq_lengths,
                                "key_value_seq_lengths", batch, kv_seq),
      mask=mask, q_segment_ids=q_segments, kv_segment_ids=kv_segments,
      dropout_seed=seed)
  return CanonicalCall(query=query, key=key, value=value, bias=bias,
                       arrays=arrays, config=config,
                       had_batch_dim=had_batch_dim)


def float32_products() -> str:
  """How compiled kernels multiply float32 tiles, from the caller's
  ``jax.default_matmul_precision``: ``"ieee"`` (full precision) under
  ``"highest"`` or ``"float32"``, else ``"tf32x3"`` (three TF32 products,
  float32-level accuracy; never the one-pass TF32 XLA defaults to)."""
  requested = jax.config.jax_default_matmul_precision
  if requested is not None and str(requested).lower() in ("highest",
                                                          "float32"):
    return "ieee"
  return "tf32x3"


def _implementation_order(implementation) -> tuple[tuple[str, ...], bool]:
  """The names to try, and whether the caller named them explicitly."""
  if implementation is None:
    return AUTO_ORDER, False
  names = ((implementation,) if isinstance(implementation, str)
           else tuple(implementation) if isinstance(implementation, Sequence)
           else None)
  if not names or any(n not in IMPLEMENTATIONS for n in names):
    raise ValueError(
        f"implementation must be None, one of {IMPLEMENTATIONS} or a sequence "
        f"of them; got {implementation!r}")
  return names, True


def _run_cudnn(call: CanonicalCall, return_residual: bool):
  """Passes the call to `jax.nn.dot_product_attention(implementation="cudnn")`."""
  config, arrays = call.config, call.arrays
  if platform.compute_capability() is None:
    raise NotImplementedError("cudnn needs an NVIDIA GPU")
  if jnp.dtype(call.query.dtype) == jnp.float32:
    raise NotImplementedError("cudnn takes float16 and bfloat16 only")
  if call.value.shape[-1] != call.query.shape[-1]:
    raise NotImplementedError("cudnn needs equal query and value head dims")
  unsupported = [name for name, used in (
      ("segment ids", arrays.q_segment_ids is not None),
      ("mask_fn", config.mask.mask_fn is not None),
      ("logits_soft_cap", config.logits_soft_cap is not None),
      ("dropout", config.dropout_rate > 0),
      ("bottom-right alignment", config.mask.diagonal_offset != 0
       or config.mask.align_to_lengths),
      ("local_window_size", config.mask.window_left is not None)) if used]
  if unsupported:
    raise NotImplementedError(
        f"flash_jax does not pass {', '.join(unsupported)} to cudnn")
  try:
    result = jax.nn.dot_product_attention(
        call.query, call.key, call.value, bias=call.bias, mask=arrays.mask,
        scale=config.scale, is_causal=config.mask.is_causal,
        query_seq_lengths=arrays.q_lengths,
        key_value_seq_lengths=arrays.kv_lengths, implementation="cudnn",
        return_residual=return_residual)
  except (ValueError, RuntimeError, NotImplementedError, TypeError) as e:
    raise NotImplementedError(f"cuDNN rejected the call: {e}") from e
  if return_residual:
    out, lse = result
    return call.finish(out, jnp.swapaxes(lse.astype(jnp.float32), 1, 2), True)
  return call.finish(result, None, False)


def _no_pairs(call: CanonicalCall):
  """``(out, lse)`` of a call with T = 0 or S = 0, where no (query, key)
  pair exists: an empty output, or zeros with lse -inf (every row attends
  nothing, as with a fully masked row; `jax.nn` gives zeros too). No kernel
  runs, and the gradients are zero."""
  batch, q_seq, num_heads, _ = call.query.shape
  out = jnp.zeros((batch, q_seq, num_heads, call.value.shape[-1]),
                  call.query.dtype)
  return out, jnp.full((batch, num_heads, q_seq), -jnp.inf, jnp.float32)


def dot_product_attention(
    query, key, value, bias=None, mask=None, *, scale: float | None = None,
    is_causal: bool = False, query_seq_lengths=None,
    key_value_seq_lengths=None,
    local_window_size: int | tuple[int, int] | None = None,
    implementation: str | Sequence[str] | None = None,
    return_residual: bool = False,
    query_segment_ids=None, kv_segment_ids=None,
    causal_alignment: str = "top_left",
    mask_fn: Callable | None = None,
    logits_soft_cap: float | None = None,
    dropout_rate: float = 0.0, dropout_rng=None,
    broadcast_dropout: bool = False,
    interpret: bool | None = None,
    block_sizes: BlockSizes | None = None,
    deterministic: bool = True) -> Any:
  """Exact attention computed tile by tile: a drop-in for
  `jax.nn.dot_product_attention`.

  Memory is O(T + S) per head in the Pallas kernels: the ``[T, S]`` scores
  are never materialised (``implementation="xla"``, the reference, does).

  Args:
    query: ``[B, T, N, H]`` (or ``[T, N, H]``).
    key: ``[B, S, K, H]`` (or ``[S, K, H]``); ``N % K == 0`` (GQA/MQA).
      ``T = 0`` or ``S = 0`` give an empty output or zeros (no key to
      attend; lse -inf), as in ``jax.nn``.
    value: ``[B, S, K, Hv]``; ``Hv`` may differ from ``H``. The Pallas
      kernels take head dims up to 256; larger ones run on the XLA path.
    bias: additive bias broadcastable to ``[B, N, T, S]``; differentiable.
    mask: boolean mask broadcastable to ``[B, N, T, S]`` (True = attend).
    scale: logits multiplier; default ``1 / sqrt(H)``. A static number is
      compiled into the kernels; a traced scalar (under ``jit``) is folded
      into the query instead (rounded to its dtype) and is differentiable.
    is_causal: causal mask. Aligned top-left by default, as in ``jax.nn``:
      query ``i`` sees keys ``0..i``::

          T=3, S=5   k0 k1 k2 k3 k4
          q0          x  .  .  .  .
          q1          x  x  .  .  .
          q2          x  x  x  .  .

    query_seq_lengths: int ``[B]``; query rows at or past it are padding and
      give output 0 (and lse -inf, zero gradients). Lengths are clipped to
      ``[0, T]`` (and key lengths to ``[0, S]``).
    key_value_seq_lengths: int ``[B]``; keys at or past it are ignored.
    local_window_size: ``w`` or ``(left, right)``: query ``i`` attends keys
      ``i - left .. i + right`` (relative to the aligned diagonal), as in
      ``jax.nn``.
    implementation: None (auto: on sm90 the Hopper Mosaic GPU kernels where
      they take the call, else the Triton Pallas kernels on an NVIDIA sm80+
      GPU, else the XLA reference, with a warning if a GPU call falls back
      to it), ``"pallas_triton"``, ``"pallas_mosaic_gpu"`` (sm90 only),
      ``"xla"``,
      ``"cudnn"`` (`jax.nn`'s cuDNN path), or a sequence tried in order:
      one that cannot take the call raises NotImplementedError internally
      and the next is tried; if none can, one NotImplementedError lists every
      reason.
    return_residual: also return the logsumexp ``[B, T, N]`` in natural log,
      like `jax.nn`, but always float32 (`jax.nn` returns the input dtype).
      It is differentiable, except with ``implementation="cudnn"``, whose
      `jax.nn` backward ignores the lse cotangent, and whose lse is computed
      in the input dtype before the cast to float32.
    query_segment_ids, kv_segment_ids: int ``[B, T]`` / ``[B, S]`` (packed
      documents): a query attends only keys with its segment id.
    causal_alignment: ``"top_left"`` (default, ``jax.nn``) or
      ``"bottom_right"`` (FlashAttention: the last query sees the last key;
      for chunked prefill and decode with ``T < S``). Applies to
      ``is_causal`` and ``local_window_size``. With padding lengths it
      follows each batch row's valid lengths: the last valid query sees
      the last valid key (FlashAttention's varlen / KV-cache convention).
    mask_fn: a jnp-traceable predicate ``mask_fn(batch, head, q_idx,
      kv_idx) -> bool`` (True = attend) on broadcasting index arrays. It
      must compute the mask from the indices alone: a function that
      captures arrays raises ValueError (the kernels cannot close over
      them); per-batch data goes in segment ids, lengths or ``mask``.
    logits_soft_cap: if set, logits become ``cap * tanh(logits / cap)``
      after scale and bias. So a bias used as an additive mask stops
      masking (``-inf`` or ``-1e9`` is capped to ``-cap``): pass masks as
      ``mask``, segment ids or lengths, which are applied after the cap.
    dropout_rate: probability of dropping each attention probability (after
      normalisation; lse is not dropped), rounded to a multiple of 1/256
      (`flash_jax.dropout.drop_probability`; nonzero rates below 1/512 are
      rejected). Kept ones are scaled by ``1 / (1 - that probability)``.
      Needs ``dropout_rng``. The mask is `flash_jax.dropout.keep_mask`.
    dropout_rng: a JAX PRNG key.
    broadcast_dropout: use one dropout mask for every batch row and head.
    interpret: run Pallas kernels in Pallas interpret mode. Default: True
      when no GPU is present and a Pallas implementation was named
      explicitly, so ``implementation="pallas_triton"`` works on CPU.
    block_sizes: `flash_jax.BlockSizes` tiling overrides (tuning only).
    deterministic: True (default): the backward gives bitwise-identical
      gradients on every run. False allows a faster backward whose dQ is
      summed by float32 reduce-adds (TMA, atomic per element) in global
      memory, in an order that varies between runs
      (same accuracy, last-bit differences): on the Hopper backend (head
      dims up to 128), one kernel then forms dK, dV and dQ. Other backends
      ignore it. (FlashAttention's ``deterministic`` flag; not Flax's,
      which turns dropout off.)

  Returns:
    ``out [B, T, N, Hv]`` in the input dtype, or ``(out, lse)``.

  Rows that attend nothing give output 0, lse -inf and zero gradients; never
  NaN. (`jax.nn` also gives 0 for padded queries, but averages the values
  on a row whose keys are all masked, and its lse there is a large negative
  number rather than -inf.)

  Float32 inputs: the compiled Pallas kernels multiply their tiles as three
  TF32 tensor-core products (float32-level accuracy, where XLA's default
  is one TF32 product); under ``jax.default_matmul_precision("highest")``
  (or ``"float32"``) they use full-precision products, several times
  slower. Accumulation and the softmax statistics are float32 throughout.
  """
  call = canonicalize(
      query, key, value, bias=bias, mask=mask, scale=scale,
      is_causal=is_causal, query_seq_lengths=query_seq_lengths,
      key_value_seq_lengths=key_value_seq_lengths,
      local_window_size=local_window_size,
      query_segment_ids=query_segment_ids, kv_segment_ids=kv_segment_ids,
      causal_alignment=causal_alignment, mask_fn=mask_fn,
      logits_soft_cap=logits_soft_cap, dropout_rate=dropout_rate,
      dropout_rng=dropout_rng, broadcast_dropout=broadcast_dropout)
  names, explicit = _implementation_order(implementation)
  return_residual = _check_bool(return_residual, "return_residual")
  if interpret is not None:
    interpret = _check_bool(interpret, "interpret")
  if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
    raise ValueError(
        f"block_sizes must be a flash_jax.BlockSizes, got {block_sizes!r}")
  deterministic = _check_bool(deterministic, "deterministic")
  if interpret is None:
    interpret = explicit and platform.default_interpret()
  if call.query.shape[1] == 0 or call.key.shape[1] == 0:
    return call.finish(*_no_pairs(call), return_residual)

  reasons = []
  for name in names:
    try:
      if name == "cudnn":
        return _run_cudnn(call, return_residual)
      config = dataclasses.replace(call.config, implementation=name,
                                   interpret=bool(interpret),
                                   block_sizes=block_sizes,
                                   deterministic=deterministic)
      backends.get(name).check_supported(config, call.query, call.key,
                                         call.value, call.bias, call.arrays)
    except NotImplementedError as e:
      reasons.append(f"{name}: {e}")
      continue
    if (name == "xla" and reasons and not explicit
        and platform.compute_capability() is not None):
      warnings.warn("flash_jax falls back to the O(T*S)-memory XLA reference: "
                    + "; ".join(reasons), stacklevel=2)
    out, lse = flash_attention(config, call.query, call.key, call.value,
                               call.bias, call.arrays)
    return call.finish(out, lse, return_residual)
  raise NotImplementedError(
      "no implementation can take this call:\n  " + "\n  ".join(reasons))
