"""The public entry point: validate, canonicalise, dispatch.

Everything a caller can get wrong is caught here with a ValueError naming the
argument and the shapes, before any kernel is traced.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flash_jax import backends, platform
from flash_jax.config import AttentionConfig, BlockSizes
from flash_jax.masks import MaskSpec
from flash_jax.vjp import flash_attention

MAX_HEAD_DIM = 256
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.float16),
                    jnp.dtype(jnp.bfloat16))
IMPLEMENTATIONS = ("pallas_triton", "xla", "cudnn")
# What implementation=None tries, in order.
AUTO_ORDER = ("pallas_triton", "xla")

_MASKS_FEATURE = ("is not supported yet: it arrives with the full attention "
                  "semantics (masks, bias, segment ids, sliding window) "
                  "feature; it is never silently ignored")


@dataclasses.dataclass(frozen=True)
class CanonicalCall:
  """A validated call: 4-D operands plus the static mask and scale."""

  query: jax.Array        # [B, T, N, H]
  key: jax.Array          # [B, S, K, H]
  value: jax.Array        # [B, S, K, Hv]
  q_lengths: jax.Array | None
  kv_lengths: jax.Array | None
  mask_spec: MaskSpec
  scale: float
  is_causal: bool
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


def _check_lengths(lengths, name: str, batch: int):
  if lengths is None:
    return None
  lengths = _as_array(lengths, name)
  if not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(f"{name} must be an integer array, got {lengths.dtype}")
  if lengths.shape != (batch,):
    raise ValueError(
        f"{name} must have shape (B,) = ({batch},), got {lengths.shape}")
  return lengths.astype(jnp.int32)


def _check_scale(scale, head_dim: int) -> float:
  if scale is None:
    return 1.0 / math.sqrt(head_dim)
  if isinstance(scale, jax.core.Tracer):
    raise ValueError("scale must be a static Python number, not a traced "
                     "value (it is compiled into the kernels)")
  try:
    value = float(scale)
  except (TypeError, ValueError):
    raise ValueError(f"scale must be a real number, got {scale!r}") from None
  if not math.isfinite(value):
    raise ValueError(f"scale must be finite, got {value}")
  return value


def canonicalize(query, key, value, *, bias=None, mask=None, scale=None,
                 is_causal=False, query_seq_lengths=None,
                 key_value_seq_lengths=None, local_window_size=None
                 ) -> CanonicalCall:
  """Validates `dot_product_attention`'s arguments; returns a CanonicalCall.

  Raises:
    ValueError: for any malformed argument (rank, shapes, dtypes, lengths).
    NotImplementedError: for a feature flash_jax does not implement yet.
  """
  for name, feature in (("bias", bias), ("mask", mask),
                        ("local_window_size", local_window_size)):
    if feature is not None:
      raise NotImplementedError(f"{name} {_MASKS_FEATURE}")
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
  if min(q_seq, kv_seq, num_heads, num_kv_heads) < 1:
    raise ValueError(f"sequence lengths and head counts must be >= 1: "
                     f"{shapes}")
  if num_heads % num_kv_heads:
    raise ValueError(
        f"query heads N={num_heads} must be a multiple of key/value heads "
        f"K={num_kv_heads} (GQA/MQA): {shapes}")
  for name, dim in (("query/key", head_dim), ("value", value.shape[-1])):
    if not 1 <= dim <= MAX_HEAD_DIM:
      raise ValueError(
          f"{name} head dim must be in [1, {MAX_HEAD_DIM}], got {dim}: "
          f"{shapes}")
  if not isinstance(is_causal, (bool, np.bool_)):
    raise ValueError(f"is_causal must be a bool, got {is_causal!r}")

  return CanonicalCall(
      query=query, key=key, value=value,
      q_lengths=_check_lengths(query_seq_lengths, "query_seq_lengths", batch),
      kv_lengths=_check_lengths(key_value_seq_lengths,
                                "key_value_seq_lengths", batch),
      mask_spec=MaskSpec(is_causal=bool(is_causal)),
      scale=_check_scale(scale, head_dim),
      is_causal=bool(is_causal),
      had_batch_dim=had_batch_dim)


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
  if platform.compute_capability() is None:
    raise NotImplementedError("cudnn needs an NVIDIA GPU")
  if jnp.dtype(call.query.dtype) == jnp.float32:
    raise NotImplementedError("cudnn takes float16 and bfloat16 only")
  if call.value.shape[-1] != call.query.shape[-1]:
    raise NotImplementedError("cudnn needs equal query and value head dims")
  try:
    result = jax.nn.dot_product_attention(
        call.query, call.key, call.value, scale=call.scale,
        is_causal=call.is_causal, query_seq_lengths=call.q_lengths,
        key_value_seq_lengths=call.kv_lengths, implementation="cudnn",
        return_residual=return_residual)
  except (ValueError, RuntimeError, NotImplementedError) as e:
    raise NotImplementedError(f"cuDNN rejected the call: {e}") from e
  if return_residual:
    out, lse = result
    return call.finish(out, jnp.swapaxes(lse.astype(jnp.float32), 1, 2), True)
  return call.finish(result, None, False)


def dot_product_attention(
    query, key, value, bias=None, mask=None, *, scale: float | None = None,
    is_causal: bool = False, query_seq_lengths=None,
    key_value_seq_lengths=None,
    local_window_size: int | tuple[int, int] | None = None,
    implementation: str | Sequence[str] | None = None,
    return_residual: bool = False, interpret: bool | None = None,
    block_sizes: BlockSizes | None = None) -> Any:
  """Exact attention computed tile by tile: a drop-in for
  `jax.nn.dot_product_attention`.

  Memory is O(T + S) per head: the ``[T, S]`` scores are never materialised
  (except by ``implementation="xla"``, the reference).

  Args:
    query: ``[B, T, N, H]`` (or ``[T, N, H]``).
    key: ``[B, S, K, H]`` (or ``[S, K, H]``); ``N % K == 0`` (GQA/MQA).
    value: ``[B, S, K, Hv]``; ``Hv`` may differ from ``H``.
    bias, mask, local_window_size: not supported yet; passing one raises
      NotImplementedError rather than being ignored.
    scale: logits multiplier; default ``1 / sqrt(H)``. A static number.
    is_causal: top-left causal mask, as in ``jax.nn``: query ``i`` sees keys
      ``0..i``::

          T=3, S=5   k0 k1 k2 k3 k4
          q0          x  .  .  .  .
          q1          x  x  .  .  .
          q2          x  x  x  .  .

    query_seq_lengths: int ``[B]``; query rows at or past it are padding and
      give output 0 (and lse -inf, zero gradients).
    key_value_seq_lengths: int ``[B]``; keys at or past it are ignored.
    implementation: None (auto: the Pallas kernel on an NVIDIA sm80+ GPU,
      the XLA reference elsewhere), ``"pallas_triton"``, ``"xla"``,
      ``"cudnn"`` (`jax.nn`'s cuDNN path), or a sequence tried in order:
      one that cannot take the call raises NotImplementedError internally
      and the next is tried; if none can, one NotImplementedError lists every
      reason.
    return_residual: also return the logsumexp ``[B, T, N]`` (float32,
      natural log), as `jax.nn` does.
    interpret: run Pallas kernels in Pallas interpret mode. Default: True
      when no GPU is present and a Pallas implementation was named
      explicitly, so ``implementation="pallas_triton"`` works on CPU.
    block_sizes: `flash_jax.BlockSizes` tiling overrides (tuning only).

  Returns:
    ``out [B, T, N, Hv]`` in the input dtype, or ``(out, lse)``.

  Rows that attend nothing give output 0, lse -inf and zero gradients (where
  ``jax.nn`` would average the values); never NaN.
  """
  call = canonicalize(
      query, key, value, bias=bias, mask=mask, scale=scale,
      is_causal=is_causal, query_seq_lengths=query_seq_lengths,
      key_value_seq_lengths=key_value_seq_lengths,
      local_window_size=local_window_size)
  names, explicit = _implementation_order(implementation)
  if interpret is not None and not isinstance(interpret, (bool, np.bool_)):
    raise ValueError(f"interpret must be None or a bool, got {interpret!r}")
  if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
    raise ValueError(
        f"block_sizes must be a flash_jax.BlockSizes, got {block_sizes!r}")
  if interpret is None:
    interpret = explicit and platform.default_interpret()

  reasons = []
  for name in names:
    try:
      if name == "cudnn":
        return _run_cudnn(call, return_residual)
      config = AttentionConfig(mask=call.mask_spec, scale=call.scale,
                               implementation=name, interpret=bool(interpret),
                               block_sizes=block_sizes)
      backends.get(name).check_supported(config, call.query, call.key,
                                         call.value)
    except NotImplementedError as e:
      reasons.append(f"{name}: {e}")
      continue
    out, lse = flash_attention(config, call.query, call.key, call.value,
                               call.q_lengths, call.kv_lengths)
    return call.finish(out, lse, return_residual)
  raise NotImplementedError(
      "no implementation can take this call:\n  " + "\n  ".join(reasons))
