"""Flax integration: flash_jax as Flax's ``attention_fn``, and ready modules.

`attention_fn` (or one made by `make_attention_fn`) plugs into Flax's own
attention modules::

    nn.MultiHeadDotProductAttention(num_heads=8, attention_fn=attention_fn)
    nnx.MultiHeadAttention(8, 512, attention_fn=attention_fn, rngs=rngs)

`flash_jax.flax.linen.FlashMultiHeadAttention` and
`flash_jax.flax.nnx.FlashMultiHeadAttention` are complete attention layers
(projections, GQA, causal, padding, segment ids, RoPE, dropout) that call
`flash_jax.dot_product_attention` directly. `apply_rope` is their rotary
position embedding.

This package imports no Flax itself; the two module files do.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from flash_jax.api import dot_product_attention
from flash_jax.flax.rope import apply_rope

__all__ = ["apply_rope", "attention_fn", "make_attention_fn", "as_bool_mask"]

# The arguments the returned attention function fills in per call from what
# Flax passes; make_attention_fn refuses them as fixed settings.
_PER_CALL_ARGUMENTS = frozenset({
    "query", "key", "value", "bias", "mask", "dropout_rate", "dropout_rng",
    "broadcast_dropout", "return_residual"})
_FLASH_ARGUMENTS = frozenset(
    inspect.signature(dot_product_attention).parameters) - _PER_CALL_ARGUMENTS
_PRECISION_NAMES = frozenset(p.name.lower() for p in jax.lax.Precision) | {
    "bfloat16", "tensorfloat32", "float32", "fastest"}


def as_bool_mask(mask) -> jax.Array | None:
  """A Flax mask as flash_jax wants it: bool, True = attend.

  Flax builds masks as floats (`flax.linen.make_causal_mask` gives float32
  ones and zeros) and applies them with ``jnp.where(mask, ...)``, so any
  nonzero entry means "attend"; the cast keeps that meaning.
  """
  if mask is None:
    return None
  mask = jnp.asarray(mask)
  return mask if mask.dtype == jnp.bool_ else mask != 0


def _wants_full_precision(precision) -> bool:
  """Checks ``precision``; True if it asks for full float32 products.

  The kernels multiply bfloat16/float16 inputs exactly with float32
  accumulation, and float32 inputs with three TF32 products (float32-level
  accuracy), which meets every `jax.lax.Precision` level below HIGHEST.
  HIGHEST (or ``"highest"`` / ``"float32"``) switches float32 inputs to
  full-precision products. A `jax.lax.DotAlgorithm` or preset pins an
  algorithm the kernels do not take: refused.
  """
  levels = precision if isinstance(precision, (tuple, list)) else (precision,)
  full = False
  for level in levels:
    if level is None:
      continue
    if isinstance(level, jax.lax.Precision):
      full |= level == jax.lax.Precision.HIGHEST
      continue
    if isinstance(level, str) and level.lower() in _PRECISION_NAMES:
      full |= level.lower() in ("highest", "float32")
      continue
    raise ValueError(
        f"flash_jax attention_fn cannot honour precision={precision!r}: it "
        "takes None or jax.lax.Precision levels (HIGHEST gives float32 "
        "inputs full-precision products), not a dot algorithm")
  return full


def _flatten_batch(x, name: str, batch_shape: tuple[int, ...], rank: int):
  """``[batch..., A, B, C]`` (or fewer leading dims) -> ``[prod(batch), A, B, C]``.

  For masks and biases: leading dims of 1 broadcast, as in Flax.
  """
  if x is None:
    return None
  if x.ndim > rank:
    raise ValueError(f"{name} has rank {x.ndim}, more than the inputs' "
                     f"rank {rank}: shape {x.shape}")
  x = x.reshape((1,) * (rank - x.ndim) + x.shape)
  lead = x.shape[:len(batch_shape)]
  if all(d == 1 for d in lead):
    return x.reshape((1,) + x.shape[len(batch_shape):])
  try:
    x = jnp.broadcast_to(x, batch_shape + x.shape[len(batch_shape):])
  except ValueError:
    raise ValueError(f"{name} of shape {x.shape} does not broadcast over the "
                     f"batch dims {batch_shape}") from None
  return x.reshape((math.prod(batch_shape),) + x.shape[len(batch_shape):])


def make_attention_fn(**flash_kwargs) -> Callable[..., jax.Array]:
  """Makes an ``attention_fn`` for Flax that runs `flash_jax.dot_product_attention`.

  Args:
    **flash_kwargs: fixed keyword arguments of
      `flash_jax.dot_product_attention`, e.g. ``implementation=``,
      ``is_causal=True`` (causal without a dense mask: the kernel skips the
      masked tiles, where a mask from `flax.linen.make_causal_mask` costs
      O(T*S) memory), ``block_sizes=``, ``local_window_size=``,
      ``logits_soft_cap=``, ``scale=``, ``interpret=``. The per-call
      arguments (q, k, v, bias, mask, dropout) come from Flax and cannot be
      fixed here. A fixed ``deterministic=False`` is flash_jax's flag (a
      backward whose dQ sums vary in the last bits); the returned
      function's own ``deterministic`` argument is Flax's (no dropout).

  Returns:
    ``attention_fn(query, key, value, bias=None, mask=None,
    broadcast_dropout=True, dropout_rng=None, dropout_rate=0.0,
    deterministic=False, dtype=None, precision=None, module=None,
    force_fp32_for_softmax=False, qk_attn_weights_einsum=None,
    attn_weights_value_einsum=None, is_causal=False,
    input_positions=None)``: the signature of Flax's
    ``dot_product_attention`` (linen and nnx), every argument explicit,
    because linen passes only the keywords the signature names. Mapping:

    - ``query/key/value``: ``[batch..., T, N, H]`` / ``[batch..., S, K, H]``
      (any number of batch dims, none included; ``K`` may divide ``N``).
    - ``mask``: broadcastable to ``[batch..., N, T, S]``; a float mask is
      cast to bool (nonzero = attend), as Flax's ``jnp.where`` reads it.
    - ``dropout``: applied when ``not deterministic and dropout_rate > 0``,
      with flash_jax's in-kernel dropout (``broadcast_dropout=True``: one
      mask for every batch row and head). Flax's masks come from
      `jax.random.bernoulli`, ours from a Philox hash of the same key:
      different draws, and the rate rounded to a multiple of 1/256 (0.1
      drops 26/256 = 0.1016 of the probabilities; kept ones are scaled by
      the inverse of the rounded keep probability).
    - ``dtype``: q, k, v are cast to it (else promoted to a common dtype,
      as Flax does); the output has that dtype.
    - ``precision``: None or any `jax.lax.Precision` level (or a pair).
      Float32 inputs are multiplied with three TF32 products (float32-level
      accuracy), or at full precision under HIGHEST; a dot algorithm
      raises. ``force_fp32_for_softmax`` is always honoured
      (the softmax statistics are float32).
    - ``is_causal`` (nnx passes it): causal if either it or the fixed
      ``is_causal`` is True.

    Raises ValueError for what it cannot honour: ``module`` (sowing the
    attention weights, which FlashAttention never forms), custom einsums,
    ``input_positions`` (RoPE inside ``attention_fn``; use
    `FlashMultiHeadAttention` with ``rope_base``), a dot algorithm as
    precision, dropout without a ``dropout_rng``, inputs of rank < 3.

    A fixed ``is_causal=True`` refuses a single query against several keys
    (Flax's decode step), where top-left alignment would show it key 0
    only; with ``causal_alignment="bottom_right"`` it is allowed.

    One semantic difference from Flax: a query row whose keys are all
    masked (e.g. a padded query under a padding mask) gives 0, where Flax
    gives the mean of the values.

  Raises:
    TypeError: for a keyword that is not a fixed argument of
      `flash_jax.dot_product_attention`.
  """
  unknown = sorted(set(flash_kwargs) - _FLASH_ARGUMENTS)
  if unknown:
    raise TypeError(
        f"make_attention_fn got {unknown}; it takes fixed arguments of "
        f"flash_jax.dot_product_attention: {sorted(_FLASH_ARGUMENTS)} (the "
        f"per-call ones, {sorted(_PER_CALL_ARGUMENTS)}, come from Flax)")
  fixed = dict(flash_kwargs)
  fixed_causal = fixed.pop("is_causal", False)

  def flash_attention_fn(
      query, key, value, bias=None, mask=None, broadcast_dropout: bool = True,
      dropout_rng=None, dropout_rate: float = 0.0,
      deterministic: bool = False, dtype=None, precision=None, module=None,
      force_fp32_for_softmax: bool = False, qk_attn_weights_einsum=None,
      attn_weights_value_einsum=None, is_causal: bool = False,
      input_positions=None) -> jax.Array:
    """Flax's ``dot_product_attention`` computed by flash_jax (see
    `make_attention_fn`)."""
    del force_fp32_for_softmax  # The softmax statistics are always float32.
    if module is not None:
      raise ValueError(
          "flash_jax attention_fn cannot sow attention weights (module= / "
          "sow_weights=True): FlashAttention never forms them. Use Flax's "
          "default attention_fn to inspect weights")
    if qk_attn_weights_einsum is not None or (
        attn_weights_value_einsum is not None):
      raise ValueError(
          "flash_jax attention_fn cannot run custom einsums "
          "(qk_attn_weights_einsum / attn_weights_value_einsum): the "
          "products happen inside the kernel")
    if input_positions is not None:
      raise ValueError(
          "flash_jax attention_fn applies no rotary embedding, so it cannot "
          "take input_positions; apply flash_jax.flax.apply_rope to query "
          "and key first, or use FlashMultiHeadAttention(rope_base=...)")
    full_precision = _wants_full_precision(precision)
    if isinstance(deterministic, jax.core.Tracer):
      raise ValueError("deterministic must be a static bool, not traced")

    query, key, value = (jnp.asarray(x) for x in (query, key, value))
    target = (jnp.dtype(dtype) if dtype is not None
              else jnp.result_type(query, key, value))
    query, key, value = (x.astype(target) for x in (query, key, value))
    if not query.ndim == key.ndim == value.ndim:
      raise ValueError(
          f"query, key and value must have one rank; got shapes "
          f"{query.shape}, {key.shape}, {value.shape}")
    rank = query.ndim
    if rank < 3:
      raise ValueError(
          f"query must be [batch..., length, heads, head_dim] (rank >= 3), "
          f"got shape {query.shape}")
    mask = as_bool_mask(mask)
    bias = None if bias is None else jnp.asarray(bias)

    batch_shape = query.shape[:-3]
    if rank > 4:
      # flash_jax takes one batch dim: merge Flax's batch dims into it.
      for name, x in (("key", key), ("value", value)):
        if x.shape[:-3] != batch_shape:
          raise ValueError(f"query and {name} batch dims differ: "
                           f"{query.shape} vs {x.shape}")
      query, key, value = (x.reshape((-1,) + x.shape[-3:])
                           for x in (query, key, value))
      mask = _flatten_batch(mask, "mask", batch_shape, rank)
      bias = _flatten_batch(bias, "bias", batch_shape, rank)

    if (fixed_causal and fixed.get("causal_alignment", "top_left") ==
        "top_left" and query.shape[-3] == 1 < key.shape[-3]):
      # Flax's decode step: one query against the cache. Top-left causal
      # would let it see key 0 only (nnx turns its own flag off here).
      raise ValueError(
          "a fixed is_causal=True with one query and several keys (a decode "
          "step) attends key 0 only; make the attention_fn with "
          "causal_alignment='bottom_right', or use a separate one for decode")
    use_dropout = not deterministic and dropout_rate > 0
    if use_dropout and dropout_rng is None:
      raise ValueError("dropout_rate > 0 with deterministic=False needs a "
                       "dropout_rng")
    with (jax.default_matmul_precision("highest") if full_precision
          else contextlib.nullcontext()):
      out = dot_product_attention(
          query, key, value, bias=bias, mask=mask,
          is_causal=bool(fixed_causal or is_causal),
          dropout_rate=dropout_rate if use_dropout else 0.0,
          dropout_rng=dropout_rng if use_dropout else None,
          broadcast_dropout=bool(broadcast_dropout), **fixed)
    if rank > 4:
      out = out.reshape(batch_shape + out.shape[1:])
    return out

  flash_attention_fn.flash_kwargs = dict(flash_kwargs)
  return flash_attention_fn


attention_fn: Callable[..., Any] = make_attention_fn()
attention_fn.__doc__ = (
    "Flax's ``dot_product_attention`` computed by flash_jax with default "
    "settings (``implementation=None``); `make_attention_fn` documents the "
    "mapping and makes variants.")


def check_head_layout(num_heads: int, num_kv_heads: int | None,
                      head_dim: int, rope_base: float | None) -> int:
  """Validates a module's head layout; returns the kv head count."""
  num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
  if min(num_heads, num_kv_heads, head_dim) < 1:
    raise ValueError(f"num_heads={num_heads}, num_kv_heads={num_kv_heads} "
                     f"and head_dim={head_dim} must be >= 1")
  if num_heads % num_kv_heads:
    raise ValueError(f"num_heads={num_heads} must be a multiple of "
                     f"num_kv_heads={num_kv_heads} (GQA/MQA)")
  if rope_base is not None and head_dim % 2:
    raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
  return num_kv_heads


def module_attention(query, key, value, *, rope_base, positions, kv_positions,
                     mask, use_dropout: bool, dropout_rate: float, dropout_rng,
                     **flash_kwargs) -> jax.Array:
  """The attention step shared by the linen and nnx modules.

  Rotates query and key (if ``rope_base`` is set), casts a float mask to
  bool and calls `flash_jax.dot_product_attention` with dropout only when
  ``use_dropout``; ``flash_kwargs`` go through unchanged.
  """
  if query.ndim != 4:
    raise ValueError("FlashMultiHeadAttention takes inputs [B, T, features]")
  if rope_base is not None:
    query = apply_rope(query, positions, base=rope_base)
    key = apply_rope(key, kv_positions, base=rope_base)
  elif positions is not None or kv_positions is not None:
    raise ValueError("positions are only used with RoPE: set rope_base")
  if use_dropout and dropout_rng is None:
    raise ValueError("dropout needs a dropout rng")
  return dot_product_attention(
      query, key, value, mask=as_bool_mask(mask),
      dropout_rate=dropout_rate if use_dropout else 0.0,
      dropout_rng=dropout_rng if use_dropout else None, **flash_kwargs)
