"""Plain attention with `jax.nn.softmax`: the test oracle and the "xla" backend.

It materialises the ``[B, N, T, S]`` logits, so it is O(T*S) in memory; it
exists to be obviously right, not fast.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flash_jax import dropout
from flash_jax.config import AttentionConfig
from flash_jax.masks import MaskArrays


def attention(query, key, value, bias=None, arrays: MaskArrays | None = None,
              *, config: AttentionConfig, compute_dtype=jnp.float32):
  """Attention on canonical inputs; returns ``(out, lse)``.

  Args:
    query: ``[B, T, N, H]``.
    key: ``[B, S, K, H]`` with ``N % K == 0``.
    value: ``[B, S, K, Hv]``.
    bias: optional additive bias, 4-D, broadcastable to ``[B, N, T, S]``.
    arrays: the dynamic mask parts (lengths, dense mask, segment ids,
      dropout seed).
    config: the static options (mask spec, scale, soft-cap, dropout rate).
    compute_dtype: dtype of every intermediate. float32 gives the oracle;
      the input dtype gives the "plain same-dtype attention" that
      FlashAttention's error rule compares against.

  Returns:
    ``out`` ``[B, T, N, Hv]`` in the query's dtype and ``lse`` ``[B, N, T]``
    (natural log, of the undropped probabilities) in float32, or float64
    when ``compute_dtype`` is. Rows that attend nothing (padded queries, or
    every key masked) give output 0 and lse -inf; their gradients are 0,
    not NaN.
  """
  arrays = arrays if arrays is not None else MaskArrays()
  out_dtype = query.dtype
  batch, q_seq, num_heads, _ = query.shape
  kv_seq, num_kv_heads = key.shape[1], key.shape[2]
  groups = num_heads // num_kv_heads
  q = query.astype(compute_dtype)
  k = jnp.repeat(key.astype(compute_dtype), groups, axis=2)
  v = jnp.repeat(value.astype(compute_dtype), groups, axis=2)

  logits = jnp.einsum("btnh,bsnh->bnts", q, k,
                      precision=jax.lax.Precision.HIGHEST,
                      preferred_element_type=compute_dtype)
  logits = logits * jnp.asarray(config.scale, compute_dtype)
  if bias is not None:
    logits = logits + bias.astype(compute_dtype)
  if config.logits_soft_cap is not None:
    cap = jnp.asarray(config.logits_soft_cap, compute_dtype)
    logits = cap * jnp.tanh(logits / cap)

  b_idx = jnp.arange(batch)[:, None, None, None]
  h_idx = jnp.arange(num_heads)[None, :, None, None]
  q_idx = jnp.arange(q_seq)[None, None, :, None]
  kv_idx = jnp.arange(kv_seq)[None, None, None, :]
  per_batch = lambda x: None if x is None else jnp.asarray(x)[
      :, None, None, None]
  kv_len = kv_seq if arrays.kv_lengths is None else per_batch(
      arrays.kv_lengths)
  segments = {}
  if arrays.q_segment_ids is not None:
    segments = dict(q_segment=arrays.q_segment_ids[:, None, :, None],
                    kv_segment=arrays.kv_segment_ids[:, None, None, :])
  q_len = q_seq if arrays.q_lengths is None else per_batch(arrays.q_lengths)
  allowed = config.mask.allows(q_idx, kv_idx, kv_len, q_len=q_len,
                               batch=b_idx, head=h_idx, **segments)
  if arrays.q_lengths is not None:
    allowed = allowed & (q_idx < q_len)
  if arrays.mask is not None:
    allowed = allowed & arrays.mask
  # A -inf bias masks its element like the boolean mask (so a row whose
  # bias is all -inf is empty: output 0, lse -inf, as in the kernels).
  # Under a soft-cap it no longer does: the cap above maps -inf to -cap.
  allowed = jnp.broadcast_to(allowed, logits.shape) & (logits != -jnp.inf)

  # A finite stand-in keeps softmax and its gradient free of NaN on fully
  # masked rows; the `where` after it zeroes every masked probability.
  finite_min = jnp.asarray(jnp.finfo(compute_dtype).min, compute_dtype)
  safe_logits = jnp.where(allowed, logits, finite_min)
  probs = jnp.where(allowed, jax.nn.softmax(safe_logits, axis=-1), 0)
  if config.dropout_rate > 0:
    keep = dropout.keep_from_indices(
        arrays.dropout_seed, config.dropout_rate,
        *(jnp.zeros_like(x) if config.dropout_broadcast else x
          for x in (b_idx, h_idx)), q_idx, kv_idx)
    scale = dropout.keep_scale(config.dropout_rate)
    probs = jnp.where(keep, probs * jnp.asarray(scale, compute_dtype), 0)
  out = jnp.einsum("bnts,bsnh->btnh", probs.astype(compute_dtype), v,
                   precision=jax.lax.Precision.HIGHEST,
                   preferred_element_type=compute_dtype)

  row_attends = jnp.any(allowed, axis=-1)
  lse_dtype = jnp.promote_types(compute_dtype, jnp.float32)
  lse = jnp.where(
      row_attends,
      jax.nn.logsumexp(safe_logits.astype(lse_dtype), axis=-1),
      -jnp.inf)
  return out.astype(out_dtype), lse


def dot_product_attention(query, key, value, bias=None, mask=None, *,
                          return_residual=False, compute_dtype=jnp.float32,
                          **semantics):
  """Reference attention with `flash_jax.dot_product_attention`'s semantics.

  Takes the same arguments and layout (BTNH query, BSKH key/value, optional
  leading batch) and the same semantic keywords (``scale``, ``is_causal``,
  seq lengths, ``local_window_size``, segment ids, ``causal_alignment``,
  ``mask_fn``, ``logits_soft_cap``, dropout), computed plainly in
  ``compute_dtype`` (float32 by default). Fully masked rows give 0, as in
  flash_jax (``jax.nn`` gives the mean of the values there instead).

  Returns:
    The output ``[B, T, N, Hv]``, or ``(output, lse)`` with lse ``[B, T, N]``
    when ``return_residual`` is True.
  """
  from flash_jax import api  # validation is shared with the public API
  call = api.canonicalize(query, key, value, bias=bias, mask=mask,
                          **semantics)
  out, lse = attention(call.query, call.key, call.value, call.bias,
                       call.arrays, config=call.config,
                       compute_dtype=compute_dtype)
  return call.finish(out, lse, return_residual)


__all__ = ["attention", "dot_product_attention"]
