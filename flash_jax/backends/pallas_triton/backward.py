"""FlashAttention-2 backward kernels (Triton backend of Pallas).

Following FlashAttention-2 (Dao 2023, Algorithm 2), the probabilities are
recomputed from the saved logsumexp, ``P = exp2(S * scale * log2(e) - lse *
log2(e))``, never stored. With ``D = rowsum(dO * O)`` (computed in XLA, minus
the lse cotangent when the caller differentiates lse too):

    dV = P^T dO      dP = dO V^T      dS = P * (dP - D)
    dK = scale * dS^T Q                dQ = scale * dS K

Two kernels avoid atomics, so the backward is bitwise deterministic:

* dK/dV: one program per key block of one (batch, kv head). It loops over the
  query heads of its GQA group and over the query blocks that can attend it,
  so a kv head's gradient sums its group inside the kernel.
* dQ: one program per query block of one (batch, head), looping over key
  blocks exactly like the forward.

Rows that attend nothing carry lse = -inf; it is read as +inf so that their
``P`` is exactly 0 and they contribute nothing.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from flash_jax.backends.pallas_triton import common
from flash_jax.backends.pallas_triton.common import KernelParams


def _lse_log2(lse_ref, rows_valid):
  """Loads lse as a base-2 exponent; padded or empty rows become +inf."""
  lse = common.load_vector(lse_ref, rows_valid, other=jnp.inf)
  return jnp.where(lse == -jnp.inf, jnp.inf, lse) * common.LOG2_E


def _dkv_kernel(q_len_ref, kv_len_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
                delta_ref, dk_ref, dv_ref, *, p: KernelParams):
  block_q, block_kv = p.block_q, p.block_kv
  kv_block, batch = pl.program_id(0), pl.program_id(1)
  q_len = common.clamp_length(q_len_ref[batch], p.q_seq)
  kv_len = common.clamp_length(kv_len_ref[batch], p.kv_seq)

  kv_start = kv_block * block_kv
  kv_idx = kv_start + jnp.arange(block_kv)
  kv_in_array = common.valid_below(kv_idx, p.kv_seq, block_kv, p.kv_seq)
  h_valid = common.head_mask(p.head_dim, p.head_dim_padded)
  hv_valid = common.head_mask(p.value_head_dim, p.value_head_dim_padded)
  k = common.load_tile(k_ref, kv_in_array, h_valid)
  v = common.load_tile(v_ref, kv_in_array, hv_valid)

  def step(q_block, carry, *, group: int | jax.Array, masked: bool):
    dk, dv = carry
    q_start = q_block * block_q
    q_rows = pl.ds(q_start, block_q)
    q_idx = q_start + jnp.arange(block_q)
    # Padded query rows read lse = +inf (P = 0), so no other row mask is needed.
    q_in_array = common.valid_below(q_idx, p.q_seq, block_q, p.q_seq)
    q = common.load_tile(q_ref.at[q_rows, group, :], q_in_array, h_valid)
    do = common.load_tile(do_ref.at[q_rows, group, :], q_in_array, hv_valid)
    lse = _lse_log2(lse_ref.at[group, q_rows], q_in_array)
    delta = common.load_vector(delta_ref.at[group, q_rows], q_in_array)

    logits = common.dot(q, k, p, trans_b=True) * p.qk_scale_log2
    probs = jnp.exp2(logits - lse[:, None])                  # [bq, bkv]
    if masked:
      allowed = p.mask.allows(q_idx[:, None], kv_idx[None, :], kv_len)
      probs = jnp.where(allowed, probs, 0.0)
    dv = dv + common.dot(probs.astype(do.dtype), do, p, trans_a=True)
    dprobs = common.dot(do, v, p, trans_b=True)              # [bq, bkv]
    dlogits = probs * (dprobs - delta[:, None])
    dk = dk + common.dot(dlogits.astype(q.dtype), q, p, trans_a=True)
    return dk, dv

  blocks = p.mask.q_block_range(kv_start, kv_start + block_kv, q_len, kv_len,
                                block_q)

  def over_query_blocks(group, carry):
    masked_step = functools.partial(step, group=group, masked=True)
    carry = jax.lax.fori_loop(blocks.lo, blocks.full_lo, masked_step, carry)
    carry = jax.lax.fori_loop(
        blocks.full_lo, blocks.full_hi,
        functools.partial(step, group=group, masked=False), carry)
    return jax.lax.fori_loop(blocks.full_hi, blocks.hi, masked_step, carry)

  carry = (jnp.zeros((block_kv, p.head_dim_padded), jnp.float32),
           jnp.zeros((block_kv, p.value_head_dim_padded), jnp.float32))
  if p.groups == 1:
    dk, dv = over_query_blocks(jnp.int32(0), carry)
  else:
    dk, dv = jax.lax.fori_loop(0, p.groups, over_query_blocks, carry)
  common.store_tile(dk_ref, (dk * p.scale).astype(dk_ref.dtype), kv_in_array,
                    h_valid)
  common.store_tile(dv_ref, dv.astype(dv_ref.dtype), kv_in_array, hv_valid)


def _dq_kernel(q_len_ref, kv_len_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
               delta_ref, dq_ref, *, p: KernelParams):
  block_q, block_kv = p.block_q, p.block_kv
  q_block, batch = pl.program_id(0), pl.program_id(1)
  q_len = common.clamp_length(q_len_ref[batch], p.q_seq)
  kv_len = common.clamp_length(kv_len_ref[batch], p.kv_seq)

  q_start = q_block * block_q
  q_idx = q_start + jnp.arange(block_q)
  q_in_array = common.valid_below(q_idx, p.q_seq, block_q, p.q_seq)
  h_valid = common.head_mask(p.head_dim, p.head_dim_padded)
  hv_valid = common.head_mask(p.value_head_dim, p.value_head_dim_padded)
  q = common.load_tile(q_ref, q_in_array, h_valid)
  do = common.load_tile(do_ref, q_in_array, hv_valid)
  lse = _lse_log2(lse_ref, q_in_array)
  delta = common.load_vector(delta_ref, q_in_array)

  def step(kv_block, dq, *, masked: bool):
    kv_start = kv_block * block_kv
    kv_rows = pl.ds(kv_start, block_kv)
    kv_idx = kv_start + jnp.arange(block_kv)
    kv_in_array = kv_idx < p.kv_seq if masked else None
    k = common.load_tile(k_ref.at[kv_rows, :], kv_in_array, h_valid)
    v = common.load_tile(v_ref.at[kv_rows, :], kv_in_array, hv_valid)
    logits = common.dot(q, k, p, trans_b=True) * p.qk_scale_log2
    probs = jnp.exp2(logits - lse[:, None])
    if masked:
      allowed = p.mask.allows(q_idx[:, None], kv_idx[None, :], kv_len)
      probs = jnp.where(allowed, probs, 0.0)
    dprobs = common.dot(do, v, p, trans_b=True)
    dlogits = probs * (dprobs - delta[:, None])
    return dq + common.dot(dlogits.astype(k.dtype), k, p)

  blocks = p.mask.kv_block_range(q_start, q_start + block_q, q_len, kv_len,
                                 block_kv)
  dq = jnp.zeros((block_q, p.head_dim_padded), jnp.float32)
  masked_step = functools.partial(step, masked=True)
  dq = jax.lax.fori_loop(blocks.lo, blocks.full_lo, masked_step, dq)
  dq = jax.lax.fori_loop(blocks.full_lo, blocks.full_hi,
                         functools.partial(step, masked=False), dq)
  dq = jax.lax.fori_loop(blocks.full_hi, blocks.hi, masked_step, dq)
  common.store_tile(dq_ref, (dq * p.scale).astype(dq_ref.dtype), q_in_array,
                    h_valid)


def backward(p_dkv: KernelParams, p_dq: KernelParams, query, key, value,
             q_lengths, kv_lengths, out, lse, dout, dlse):
  """Runs the dK/dV and dQ kernels; returns ``(dq, dk, dv)``."""
  batch, q_seq, kv_seq = p_dq.batch, p_dq.q_seq, p_dq.kv_seq
  num_heads, num_kv_heads, groups = p_dq.num_heads, p_dq.num_kv_heads, p_dq.groups
  h_pad, hv_pad = p_dq.head_dim_padded, p_dq.value_head_dim_padded
  q_len = common.lengths_or_full(q_lengths, batch, q_seq)
  kv_len = common.lengths_or_full(kv_lengths, batch, kv_seq)

  # D = rowsum(dO * O) (FlashAttention-2 eq. for dS), float32, [B, N, T].
  # An lse cotangent adds P * dlse to dS, i.e. it shifts D by -dlse.
  delta = jnp.einsum("btnh,btnh->bnt", out.astype(jnp.float32),
                     dout.astype(jnp.float32)) - dlse.astype(jnp.float32)
  sq = common.SQUEEZED
  lengths_specs = [pl.BlockSpec((batch,), lambda *_: (0,))] * 2

  q_rows = common.round_up(q_seq, p_dkv.block_q)
  kv_spec = lambda width: pl.BlockSpec(
      (sq, p_dkv.block_kv, sq, width), lambda j, b, h: (b, j, h, 0))
  group_spec = lambda width: pl.BlockSpec(
      (sq, q_rows, groups, width), lambda j, b, h: (b, 0, h, 0))
  group_rows_spec = pl.BlockSpec((sq, groups, q_rows),
                                 lambda j, b, h: (b, h, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, p=p_dkv),
      grid=(pl.cdiv(kv_seq, p_dkv.block_kv), batch, num_kv_heads),
      in_specs=[*lengths_specs, group_spec(h_pad), kv_spec(h_pad),
                kv_spec(hv_pad), group_spec(hv_pad), group_rows_spec,
                group_rows_spec],
      out_specs=[kv_spec(h_pad), kv_spec(hv_pad)],
      out_shape=[jax.ShapeDtypeStruct(key.shape, key.dtype),
                 jax.ShapeDtypeStruct(value.shape, value.dtype)],
      compiler_params=p_dkv.compiler_params(),
      interpret=p_dkv.interpret,
      name="flash_jax_backward_dkv",
  )(q_len, kv_len, query, key, value, dout, lse, delta)

  kv_rows = common.round_up(kv_seq, p_dq.block_kv)
  q_spec = lambda width: pl.BlockSpec(
      (sq, p_dq.block_q, sq, width), lambda i, b, n: (b, i, n, 0))
  whole_kv_spec = lambda width: pl.BlockSpec(
      (sq, kv_rows, sq, width), lambda i, b, n: (b, 0, n // groups, 0))
  rows_spec = pl.BlockSpec((sq, sq, p_dq.block_q), lambda i, b, n: (b, n, i))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, p=p_dq),
      grid=(pl.cdiv(q_seq, p_dq.block_q), batch, num_heads),
      in_specs=[*lengths_specs, q_spec(h_pad), whole_kv_spec(h_pad),
                whole_kv_spec(hv_pad), q_spec(hv_pad), rows_spec, rows_spec],
      out_specs=q_spec(h_pad),
      out_shape=jax.ShapeDtypeStruct(query.shape, query.dtype),
      compiler_params=p_dq.compiler_params(),
      interpret=p_dq.interpret,
      name="flash_jax_backward_dq",
  )(q_len, kv_len, query, key, value, dout, lse, delta)
  return dq, dk, dv
