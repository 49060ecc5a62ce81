"""Plain attention with `jax.nn.softmax`: the test oracle and the "xla" backend.

It materialises the ``[B, N, T, S]`` logits, so it is O(T*S) in memory; it
exists to be obviously right, not fast.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flash_jax.masks import MaskSpec


def attention(query, key, value, *, mask_spec: MaskSpec, scale: float,
              q_lengths=None, kv_lengths=None, compute_dtype=jnp.float32):
  """Attention on canonical inputs; returns ``(out, lse)``.

  Args:
    query: ``[B, T, N, H]``.
    key: ``[B, S, K, H]`` with ``N % K == 0``.
    value: ``[B, S, K, Hv]``.
    mask_spec: the static mask.
    scale: logits multiplier.
    q_lengths, kv_lengths: optional int ``[B]`` padding lengths.
    compute_dtype: dtype of every intermediate. float32 gives the oracle;
      the input dtype gives the "plain same-dtype attention" that
      FlashAttention's error rule compares against.

  Returns:
    ``out`` ``[B, T, N, Hv]`` in the query's dtype and ``lse`` ``[B, N, T]``
    float32 (natural log). Rows that attend nothing (padded queries, or every
    key masked) give output 0 and lse -inf; their gradients are 0, not NaN.
  """
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
  logits = logits * jnp.asarray(scale, compute_dtype)

  q_idx = jnp.arange(q_seq)[None, None, :, None]
  kv_idx = jnp.arange(kv_seq)[None, None, None, :]
  kv_len = (kv_seq if kv_lengths is None
            else jnp.asarray(kv_lengths)[:, None, None, None])
  allowed = mask_spec.allows(q_idx, kv_idx, kv_len)
  if q_lengths is not None:
    allowed = allowed & (q_idx < jnp.asarray(q_lengths)[:, None, None, None])
  allowed = jnp.broadcast_to(allowed, logits.shape)

  # A finite stand-in keeps softmax and its gradient free of NaN on fully
  # masked rows; the `where` after it zeroes every masked probability.
  finite_min = jnp.asarray(jnp.finfo(compute_dtype).min, compute_dtype)
  safe_logits = jnp.where(allowed, logits, finite_min)
  probs = jnp.where(allowed, jax.nn.softmax(safe_logits, axis=-1), 0)
  out = jnp.einsum("bnts,bsnh->btnh", probs.astype(compute_dtype), v,
                   precision=jax.lax.Precision.HIGHEST,
                   preferred_element_type=compute_dtype)

  row_attends = jnp.any(allowed, axis=-1)
  lse = jnp.where(
      row_attends,
      jax.nn.logsumexp(safe_logits.astype(jnp.float32), axis=-1),
      -jnp.inf)
  return out.astype(out_dtype), lse.astype(jnp.float32)


def dot_product_attention(query, key, value, bias=None, mask=None, *,
                          scale=None, is_causal=False, query_seq_lengths=None,
                          key_value_seq_lengths=None, local_window_size=None,
                          return_residual=False, compute_dtype=jnp.float32):
  """Reference attention with `jax.nn.dot_product_attention`'s signature.

  Same arguments and layout (BTNH query, BSKH key/value, optional leading
  batch) as :func:`flash_jax.dot_product_attention`, computed plainly in
  ``compute_dtype`` (float32 by default). Fully masked rows give 0, as in
  flash_jax (``jax.nn`` gives the mean of the values there instead).

  Returns:
    The output ``[B, T, N, Hv]``, or ``(output, lse)`` with lse ``[B, T, N]``
    when ``return_residual`` is True.
  """
  from flash_jax import api  # validation is shared with the public API
  call = api.canonicalize(
      query, key, value, bias=bias, mask=mask, scale=scale,
      is_causal=is_causal, query_seq_lengths=query_seq_lengths,
      key_value_seq_lengths=key_value_seq_lengths,
      local_window_size=local_window_size)
  out, lse = attention(call.query, call.key, call.value,
                       mask_spec=call.mask_spec, scale=call.scale,
                       q_lengths=call.q_lengths, kv_lengths=call.kv_lengths,
                       compute_dtype=compute_dtype)
  return call.finish(out, lse, return_residual)


__all__ = ["attention", "dot_product_attention"]
