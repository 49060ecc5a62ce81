"""FlashAttention forward kernel (Triton backend of Pallas).

One program owns one query block of one (batch, head) and streams the key and
value blocks it can attend, keeping the online-softmax state in registers
(FlashAttention-2, Dao 2023, Algorithm 1): running row max ``m``, running row
sum ``l`` and the unnormalised output ``acc``, rescaled by ``exp2(m_old -
m_new)`` whenever the max grows. Logits are scaled by ``scale * log2(e)`` so
the exponentials are ``exp2``.

The key loop is split by the mask vocabulary into masked and unmasked phases:
blocks with nothing to attend are never visited, and only blocks on a mask
boundary (the causal diagonal, the key tail) pay for element-wise masking.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from flash_jax.backends.pallas_triton import common
from flash_jax.backends.pallas_triton.common import KernelParams


def _forward_kernel(q_len_ref, kv_len_ref, q_ref, k_ref, v_ref,
                    out_ref, lse_ref, *, p: KernelParams):
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

  def step(kv_block, carry, *, masked: bool):
    acc, m_prev, l_prev = carry
    kv_start = kv_block * block_kv
    kv_rows = pl.ds(kv_start, block_kv)
    kv_idx = kv_start + jnp.arange(block_kv)
    # Unmasked blocks lie wholly below kv_len <= S, so only masked blocks
    # can hang past the array.
    kv_in_array = kv_idx < p.kv_seq if masked else None
    k = common.load_tile(k_ref.at[kv_rows, :], kv_in_array, h_valid)
    logits = common.dot(q, k, p, trans_b=True) * p.qk_scale_log2
    if masked:
      allowed = p.mask.allows(q_idx[:, None], kv_idx[None, :], kv_len)
      logits = jnp.where(allowed, logits, -jnp.inf)
    m_next = jnp.maximum(m_prev, jnp.max(logits, axis=1))
    m_shift = m_next
    if masked:
      # A row with nothing attended so far keeps m = -inf; shifting by 0
      # instead keeps exp2 at exactly 0 rather than NaN. The carried max
      # stays -inf, so a later block's logits (however negative) set it.
      m_shift = jnp.where(m_next == -jnp.inf, 0.0, m_next)
    correction = jnp.exp2(m_prev - m_shift)
    probs = jnp.exp2(logits - m_shift[:, None])
    l_next = l_prev * correction + jnp.sum(probs, axis=1)
    v = common.load_tile(v_ref.at[kv_rows, :], kv_in_array, hv_valid)
    acc = acc * correction[:, None] + common.dot(probs.astype(v.dtype), v, p)
    return acc, m_next, l_next

  blocks = p.mask.kv_block_range(q_start, q_start + block_q, q_len, kv_len,
                                 block_kv)
  carry = (
      jnp.zeros((block_q, p.value_head_dim_padded), jnp.float32),
      jnp.full((block_q,), -jnp.inf, jnp.float32),
      jnp.zeros((block_q,), jnp.float32),
  )
  masked_step = functools.partial(step, masked=True)
  carry = jax.lax.fori_loop(blocks.lo, blocks.full_lo, masked_step, carry)
  carry = jax.lax.fori_loop(blocks.full_lo, blocks.full_hi,
                            functools.partial(step, masked=False), carry)
  carry = jax.lax.fori_loop(blocks.full_hi, blocks.hi, masked_step, carry)
  acc, m, l = carry

  # Rows that attended nothing (padding, or every key masked): out 0, lse -inf.
  attends = (l > 0.0) & (q_idx < q_len)
  safe_l = jnp.where(attends, l, 1.0)
  out = jnp.where(attends[:, None], acc / safe_l[:, None], 0.0)
  lse = jnp.where(attends, (m + jnp.log2(safe_l)) * common.LN_2, -jnp.inf)
  common.store_tile(out_ref, out.astype(out_ref.dtype), q_in_array, hv_valid)
  common.store_vector(lse_ref, lse, q_in_array)


def forward(p: KernelParams, query, key, value, q_lengths, kv_lengths):
  """Runs the forward kernel; returns ``out [B,T,N,Hv]`` and ``lse [B,N,T]``."""
  batch, q_seq, num_heads = p.batch, p.q_seq, p.num_heads
  groups = p.groups
  h_pad, hv_pad = p.head_dim_padded, p.value_head_dim_padded
  kv_rows = common.round_up(p.kv_seq, p.block_kv)
  num_q_blocks = pl.cdiv(q_seq, p.block_q)
  sq = common.SQUEEZED
  return pl.pallas_call(
      functools.partial(_forward_kernel, p=p),
      grid=(num_q_blocks, batch, num_heads),
      in_specs=[
          pl.BlockSpec((batch,), lambda i, b, n: (0,)),
          pl.BlockSpec((batch,), lambda i, b, n: (0,)),
          pl.BlockSpec((sq, p.block_q, sq, h_pad), lambda i, b, n: (b, i, n, 0)),
          pl.BlockSpec((sq, kv_rows, sq, h_pad),
                       lambda i, b, n: (b, 0, n // groups, 0)),
          pl.BlockSpec((sq, kv_rows, sq, hv_pad),
                       lambda i, b, n: (b, 0, n // groups, 0)),
      ],
      out_specs=[
          pl.BlockSpec((sq, p.block_q, sq, hv_pad),
                       lambda i, b, n: (b, i, n, 0)),
          pl.BlockSpec((sq, sq, p.block_q), lambda i, b, n: (b, n, i)),
      ],
      out_shape=[
          jax.ShapeDtypeStruct((batch, q_seq, num_heads, p.value_head_dim),
                               query.dtype),
          jax.ShapeDtypeStruct((batch, num_heads, q_seq), jnp.float32),
      ],
      compiler_params=p.compiler_params(),
      interpret=p.interpret,
      name="flash_jax_forward",
  )(common.lengths_or_full(q_lengths, batch, q_seq),
    common.lengths_or_full(kv_lengths, batch, p.kv_seq),
    query, key, value)
