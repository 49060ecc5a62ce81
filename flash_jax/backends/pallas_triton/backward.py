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
  blocks exactly like the forward (query blocks last first, as there).

A third kernel, only with a bias, computes dbias = dS tile by tile, summing
in registers over the batch rows and heads the bias is broadcast over.
Bias, soft-cap (its gradient ``1 - tanh^2``), dropout (the keep mask is
regenerated from the hash, never stored) and the masks enter every kernel
through the shared tile functions of `common`.

Rows that attend nothing carry lse = -inf; it is read as +inf so that their
``P`` is exactly 0 and they contribute nothing.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from flash_jax import block_map
from flash_jax.backends.pallas_triton import common
from flash_jax.backends.pallas_triton.common import KernelParams
from flash_jax.sharding import varying_like


def _lse_log2(lse_ref, rows_valid):
  """Loads lse as a base-2 exponent; padded or empty rows become +inf."""
  lse = common.load_vector(lse_ref, rows_valid, other=jnp.inf)
  return jnp.where(lse == -jnp.inf, jnp.inf, lse) * common.LOG2_E


def _dkv_kernel(*refs, p: KernelParams, names: tuple[str, ...]):
  inputs = common.Refs(names, refs[:len(names)])
  dk_ref, dv_ref = refs[len(names):]
  block_q, block_kv = p.block_q, p.block_kv
  kv_block, batch, kv_head = (pl.program_id(0), pl.program_id(1),
                              pl.program_id(2))
  q_len = common.clamp_length(inputs.q_len[batch], p.q_seq)
  kv_len = common.clamp_length(inputs.kv_len[batch], p.kv_seq)
  ctx = common.TileContext(batch, kv_len, common.load_seed(inputs.seed),
                           q_len)

  kv_start = kv_block * block_kv
  kv_idx = kv_start + jnp.arange(block_kv)
  kv_in_array = common.valid_below(kv_idx, p.kv_seq, block_kv, p.kv_seq)
  h_valid = common.head_mask(p.head_dim, p.head_dim_padded)
  hv_valid = common.head_mask(p.value_head_dim, p.value_head_dim_padded)
  k = common.load_tile(inputs.k, kv_in_array, h_valid)
  v = common.load_tile(inputs.v, kv_in_array, hv_valid)
  kv_segment = None
  if inputs.kv_segment_ids is not None:
    kv_segment = common.load_vector(inputs.kv_segment_ids, kv_in_array)
  tile = (block_q, block_kv)
  # Bias/mask/list refs hold the group's heads, or one broadcast head.
  per_head = lambda ref, group: (
      group if ref.shape[0] > 1 else jnp.int32(0),)

  def step(q_block, carry, *, group, masked: bool):
    dk, dv = carry
    head = kv_head * p.groups + group
    q_start = q_block * block_q
    q_rows = pl.ds(q_start, block_q)
    q_idx = q_start + jnp.arange(block_q)
    # Padded query rows read lse = +inf (P = 0), so no other row mask is needed.
    q_in_array = common.valid_below(q_idx, p.q_seq, block_q, p.q_seq)
    q = common.load_tile(inputs.q.at[q_rows, group, :], q_in_array, h_valid)
    do = common.load_tile(inputs.do.at[q_rows, group, :], q_in_array,
                          hv_valid)
    lse = _lse_log2(inputs.lse.at[group, q_rows], q_in_array)
    delta = common.load_vector(inputs.delta.at[group, q_rows], q_in_array)
    bias = allowed = None
    if inputs.bias is not None:
      bias = common.load_pair_tile(inputs.bias, per_head(inputs.bias, group),
                                   q_rows,
                                   pl.ds(0, block_kv), q_in_array,
                                   kv_in_array, tile)
    if masked:
      dense = q_segment = None
      if inputs.mask is not None:
        dense = common.load_pair_tile(inputs.mask,
                                      per_head(inputs.mask, group), q_rows,
                                      pl.ds(0, block_kv), q_in_array,
                                      kv_in_array, tile)
      if kv_segment is not None:
        q_segment = common.load_vector(inputs.q_segment_ids.at[q_rows],
                                       q_in_array)
      allowed = common.element_mask(p, ctx, head, q_idx, kv_idx,
                                    q_segment=q_segment,
                                    kv_segment=kv_segment, dense=dense)
    probs_kept, dlogits = common.backward_tile(
        p, ctx, head, q, k, v, do, lse, delta, q_idx, kv_start, bias=bias,
        allowed=allowed)
    dv = dv + common.dot(probs_kept.astype(do.dtype), do, p, trans_a=True)
    dk = dk + common.dot(dlogits.astype(q.dtype), q, p, trans_a=True)
    return dk, dv

  blocks = None
  if inputs.q_blocks is None:
    blocks = p.mask.q_block_range(kv_start, kv_start + block_kv, q_len,
                                  kv_len, block_q)

  def over_query_blocks(group, carry):
    schedule = blocks
    if schedule is None:
      schedule = common.list_schedule(inputs.q_blocks, inputs.q_counts,
                                      per_head(inputs.q_blocks, group))
    return common.visit_blocks(
        schedule, functools.partial(step, group=group), carry)

  carry = (jnp.zeros((block_kv, p.head_dim_padded), jnp.float32),
           jnp.zeros((block_kv, p.value_head_dim_padded), jnp.float32))
  if p.groups == 1:
    dk, dv = over_query_blocks(jnp.int32(0), carry)
  else:
    dk, dv = jax.lax.fori_loop(0, p.groups, over_query_blocks, carry)
  common.store_tile(dk_ref, (dk * p.scale).astype(dk_ref.dtype), kv_in_array,
                    h_valid)
  common.store_tile(dv_ref, dv.astype(dv_ref.dtype), kv_in_array, hv_valid)


def _dq_kernel(*refs, p: KernelParams, names: tuple[str, ...]):
  inputs = common.Refs(names, refs[:len(names)])
  (dq_ref,) = refs[len(names):]
  block_q, block_kv = p.block_q, p.block_kv
  q_block = p.q_block_of(pl.program_id(0))
  batch, head = pl.program_id(1), pl.program_id(2)
  q_len = common.clamp_length(inputs.q_len[batch], p.q_seq)
  kv_len = common.clamp_length(inputs.kv_len[batch], p.kv_seq)
  ctx = common.TileContext(batch, kv_len, common.load_seed(inputs.seed),
                           q_len)

  q_start = q_block * block_q
  q_idx = q_start + jnp.arange(block_q)
  q_in_array = common.valid_below(q_idx, p.q_seq, block_q, p.q_seq)
  h_valid = common.head_mask(p.head_dim, p.head_dim_padded)
  hv_valid = common.head_mask(p.value_head_dim, p.value_head_dim_padded)
  q = common.load_tile(inputs.q, q_in_array, h_valid)
  do = common.load_tile(inputs.do, q_in_array, hv_valid)
  lse = _lse_log2(inputs.lse, q_in_array)
  delta = common.load_vector(inputs.delta, q_in_array)
  q_segment = None
  if inputs.q_segment_ids is not None:
    q_segment = common.load_vector(inputs.q_segment_ids, q_in_array)

  def step(kv_block, dq, *, masked: bool):
    kv_start = kv_block * block_kv
    kv_rows = pl.ds(kv_start, block_kv)
    kv_idx = kv_start + jnp.arange(block_kv)
    kv_in_array = kv_idx < p.kv_seq if masked else None
    k = common.load_tile(inputs.k.at[kv_rows, :], kv_in_array, h_valid)
    v = common.load_tile(inputs.v.at[kv_rows, :], kv_in_array, hv_valid)
    bias, allowed = common.q_major_bias_and_mask(
        p, ctx, inputs, head, q_idx, kv_idx, kv_rows, q_in_array,
        kv_in_array, q_segment, masked=masked)
    _, dlogits = common.backward_tile(
        p, ctx, head, q, k, v, do, lse, delta, q_idx, kv_start, bias=bias,
        allowed=allowed)
    return dq + common.dot(dlogits.astype(k.dtype), k, p)

  if inputs.kv_blocks is not None:
    schedule = common.list_schedule(inputs.kv_blocks, inputs.kv_counts)
  else:
    schedule = p.mask.kv_block_range(q_start, q_start + block_q, q_len,
                                     kv_len, block_kv)
  dq = common.visit_blocks(
      schedule, step, jnp.zeros((block_q, p.head_dim_padded), jnp.float32))
  common.store_tile(dq_ref, (dq * p.scale).astype(dq_ref.dtype), q_in_array,
                    h_valid)


def _dbias_kernel(*refs, p: KernelParams, names: tuple[str, ...],
                  bias_batch: int, bias_heads: int):
  """One ``[block_q, block_kv]`` tile of dbias for one (bias batch row, bias
  head), summed over the batch rows and heads the bias is broadcast over."""
  inputs = common.Refs(names, refs[:len(names)])
  (dbias_ref,) = refs[len(names):]
  block_q, block_kv = p.block_q, p.block_kv
  q_block, kv_block, member = (pl.program_id(0), pl.program_id(1),
                               pl.program_id(2))
  # lax.div/rem (the operands are non-negative): jnp's floor-mod inside this
  # kernel's loops failed Triton lowering with an i32/i1 type mismatch.
  bias_b = jax.lax.div(member, bias_heads)
  bias_n = jax.lax.rem(member, bias_heads)
  # The (batch, head) pairs this tile sums over.
  loop_b = p.batch if bias_batch == 1 else 1
  loop_n = p.num_heads if bias_heads == 1 else 1

  q_start, kv_start = q_block * block_q, kv_block * block_kv
  q_rows, kv_rows = pl.ds(q_start, block_q), pl.ds(kv_start, block_kv)
  q_idx = q_start + jnp.arange(block_q)
  kv_idx = kv_start + jnp.arange(block_kv)
  q_in_array = common.valid_below(q_idx, p.q_seq, block_q, p.q_seq)
  kv_in_array = common.valid_below(kv_idx, p.kv_seq, block_kv, p.kv_seq)
  h_valid = common.head_mask(p.head_dim, p.head_dim_padded)
  hv_valid = common.head_mask(p.value_head_dim, p.value_head_dim_padded)
  tile = (block_q, block_kv)
  seed = common.load_seed(inputs.seed)
  bias = common.load_pair_tile(inputs.bias, (bias_b, bias_n), q_rows,
                               kv_rows, q_in_array, kv_in_array, tile)
  states = inputs.states
  # Traced zeros: interpret mode rejects Python ints mixed with slices.
  pick = lambda ref, index: index if ref.shape[0] > 1 else jnp.int32(0)

  def member_tile(t, acc):
    batch = bias_b if loop_b == 1 else jax.lax.div(t, loop_n)
    head = bias_n if loop_n == 1 else jax.lax.rem(t, loop_n)
    kv_head = head // p.groups
    kv_len = common.clamp_length(inputs.kv_len[batch], p.kv_seq)
    q_len = (common.clamp_length(inputs.q_len[batch], p.q_seq)
             if p.mask.align_to_lengths else None)
    ctx = common.TileContext(batch, kv_len, seed, q_len)
    state = states[pick(states, batch), head if states.shape[1] > 1 else jnp.int32(0),
                   q_block, kv_block]

    def compute(masked: bool):
      q = common.load_tile(inputs.q.at[batch, q_rows, head, :], q_in_array,
                           h_valid)
      do = common.load_tile(inputs.do.at[batch, q_rows, head, :],
                            q_in_array, hv_valid)
      k = common.load_tile(inputs.k.at[batch, kv_rows, kv_head, :],
                           kv_in_array, h_valid)
      v = common.load_tile(inputs.v.at[batch, kv_rows, kv_head, :],
                           kv_in_array, hv_valid)
      lse = _lse_log2(inputs.lse.at[batch, head, q_rows], q_in_array)
      delta = common.load_vector(inputs.delta.at[batch, head, q_rows],
                                 q_in_array)
      allowed = None
      if masked:
        dense = q_segment = kv_segment = None
        if inputs.mask is not None:
          mask = inputs.mask
          dense = common.load_pair_tile(
              mask, (pick(mask, batch),
                     head if mask.shape[1] > 1 else jnp.int32(0)),
              q_rows, kv_rows, q_in_array, kv_in_array, tile)
        if inputs.q_segment_ids is not None:
          q_segment = common.load_vector(
              inputs.q_segment_ids.at[batch, q_rows], q_in_array)
          kv_segment = common.load_vector(
              inputs.kv_segment_ids.at[batch, kv_rows], kv_in_array)
        allowed = common.element_mask(p, ctx, head, q_idx, kv_idx,
                                      q_segment=q_segment,
                                      kv_segment=kv_segment, dense=dense)
      _, dlogits = common.backward_tile(
          p, ctx, head, q, k, v, do, lse, delta, q_idx, kv_start, bias=bias,
          allowed=allowed)
      return acc + dlogits

    return jax.lax.cond(
        state == block_map.EMPTY, lambda: acc,
        lambda: jax.lax.cond(state == block_map.FULL,
                             lambda: compute(False), lambda: compute(True)))

  dbias = jax.lax.fori_loop(0, loop_b * loop_n, member_tile,
                            jnp.zeros(tile, jnp.float32))
  common.store_tile(dbias_ref, dbias, q_in_array, kv_in_array)


def _dbias(p: KernelParams, query, key, value, bias, arrays, dout, lse, delta,
           states):
  """dbias ``[Bb, Nb, T, S]`` float32 for a bias of shape ``[Bb, Nb, Tb,
  Sb]``: no ``[B, N, T, S]`` buffer when the bias is broadcast over batch
  or heads (the kernel sums those in registers)."""
  bias_batch, bias_heads = bias.shape[:2]
  whole = lambda x: pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)
  # Head dims are read padded to a power of two (masked lanes), like the
  # other kernels' blocks.
  padded = lambda x, width: pl.BlockSpec(x.shape[:-1] + (width,),
                                         lambda *_: (0,) * x.ndim)
  inputs = common.Inputs()
  for name, array, width in (("q", query, p.head_dim_padded),
                             ("k", key, p.head_dim_padded),
                             ("v", value, p.value_head_dim_padded),
                             ("do", dout, p.value_head_dim_padded)):
    inputs.add(name, array, padded(array, width))
  for name, array in (
      ("q_len", common.lengths_or_full(arrays.q_lengths, p.batch, p.q_seq)),
      ("kv_len", common.lengths_or_full(arrays.kv_lengths, p.batch,
                                        p.kv_seq)),
      ("lse", lse), ("delta", delta), ("bias", bias),
      ("mask", arrays.mask),
      ("q_segment_ids", arrays.q_segment_ids),
      ("kv_segment_ids", arrays.kv_segment_ids),
      ("seed", arrays.dropout_seed if p.dropout_rate > 0 else None),
      ("states", states.astype(jnp.int32))):
    if array is not None:
      inputs.add(name, array, whole(array))
  sq = common.SQUEEZED
  return pl.pallas_call(
      functools.partial(_dbias_kernel, p=p, names=tuple(inputs.names),
                        bias_batch=bias_batch, bias_heads=bias_heads),
      grid=(pl.cdiv(p.q_seq, p.block_q), pl.cdiv(p.kv_seq, p.block_kv),
            bias_batch * bias_heads),
      in_specs=inputs.specs,
      out_specs=pl.BlockSpec(
          (sq, sq, p.block_q, p.block_kv),
          lambda i, j, m: (m // bias_heads, m % bias_heads, i, j)),
      out_shape=varying_like(jax.ShapeDtypeStruct(
          (bias_batch, bias_heads, p.q_seq, p.kv_seq), jnp.float32),
          *inputs.arrays),
      compiler_params=p.compiler_params(),
      interpret=p.interpret,
      name="flash_jax_backward_dbias",
  )(*inputs.arrays)


def backward(p_dkv: KernelParams, p_dq: KernelParams, query, key, value, bias,
             arrays, out, lse, dout, dlse, *, q_lists=None, kv_lists=None,
             dbias_states=None):
  """Runs the dK/dV and dQ kernels (and dbias with a bias); returns ``(dq,
  dk, dv, dbias)``.

  ``q_lists`` / ``kv_lists`` are `flash_jax.block_map.BlockLists` for the
  dK/dV and dQ tilings (None: static ranges); ``dbias_states`` is the block
  map of the dQ tiling, needed with a bias.
  """
  batch, q_seq, kv_seq = p_dq.batch, p_dq.q_seq, p_dq.kv_seq
  num_heads, num_kv_heads, groups = (p_dq.num_heads, p_dq.num_kv_heads,
                                     p_dq.groups)
  h_pad, hv_pad = p_dq.head_dim_padded, p_dq.value_head_dim_padded
  q_len = common.lengths_or_full(arrays.q_lengths, batch, q_seq)
  kv_len = common.lengths_or_full(arrays.kv_lengths, batch, kv_seq)

  # D = rowsum(dO * O) (FlashAttention-2 eq. for dS), float32, [B, N, T].
  # An lse cotangent adds P * dlse to dS, i.e. it shifts D by -dlse.
  delta = jnp.einsum("btnh,btnh->bnt", out.astype(jnp.float32),
                     dout.astype(jnp.float32)) - dlse.astype(jnp.float32)
  sq = common.SQUEEZED
  whole = common.whole_spec

  q_rows = common.round_up(q_seq, p_dkv.block_q)
  kv_spec = lambda width: pl.BlockSpec(
      (sq, p_dkv.block_kv, sq, width), lambda j, b, h: (b, j, h, 0))
  group_spec = lambda width: pl.BlockSpec(
      (sq, q_rows, groups, width), lambda j, b, h: (b, 0, h, 0))
  group_rows_spec = pl.BlockSpec((sq, groups, q_rows),
                                 lambda j, b, h: (b, h, 0))
  inputs = common.Inputs()
  inputs.add("q_len", q_len, whole((batch,)))
  inputs.add("kv_len", kv_len, whole((batch,)))
  inputs.add("q", query, group_spec(h_pad))
  inputs.add("k", key, kv_spec(h_pad))
  inputs.add("v", value, kv_spec(hv_pad))
  inputs.add("do", dout, group_spec(hv_pad))
  inputs.add("lse", lse, group_rows_spec)
  inputs.add("delta", delta, group_rows_spec)
  common.add_kv_major_features(inputs, p_dkv, bias, arrays, q_rows, q_lists)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, p=p_dkv, names=tuple(inputs.names)),
      grid=(pl.cdiv(kv_seq, p_dkv.block_kv), batch, num_kv_heads),
      in_specs=inputs.specs,
      out_specs=[kv_spec(h_pad), kv_spec(hv_pad)],
      out_shape=varying_like([jax.ShapeDtypeStruct(key.shape, key.dtype),
                              jax.ShapeDtypeStruct(value.shape, value.dtype)],
                             *inputs.arrays),
      compiler_params=p_dkv.compiler_params(),
      interpret=p_dkv.interpret,
      name="flash_jax_backward_dkv",
  )(*inputs.arrays)

  kv_rows = common.round_up(kv_seq, p_dq.block_kv)
  q_spec = lambda width: pl.BlockSpec(
      (sq, p_dq.block_q, sq, width),
      lambda i, b, n: (b, p_dq.q_block_of(i), n, 0))
  whole_kv_spec = lambda width: pl.BlockSpec(
      (sq, kv_rows, sq, width), lambda i, b, n: (b, 0, n // groups, 0))
  rows_spec = pl.BlockSpec((sq, sq, p_dq.block_q),
                           lambda i, b, n: (b, n, p_dq.q_block_of(i)))
  inputs = common.Inputs()
  inputs.add("q_len", q_len, whole((batch,)))
  inputs.add("kv_len", kv_len, whole((batch,)))
  inputs.add("q", query, q_spec(h_pad))
  inputs.add("k", key, whole_kv_spec(h_pad))
  inputs.add("v", value, whole_kv_spec(hv_pad))
  inputs.add("do", dout, q_spec(hv_pad))
  inputs.add("lse", lse, rows_spec)
  inputs.add("delta", delta, rows_spec)
  common.add_q_major_features(inputs, p_dq, bias, arrays, kv_rows, kv_lists)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, p=p_dq, names=tuple(inputs.names)),
      grid=(p_dq.num_q_blocks, batch, num_heads),
      in_specs=inputs.specs,
      out_specs=q_spec(h_pad),
      out_shape=varying_like(jax.ShapeDtypeStruct(query.shape, query.dtype),
                             *inputs.arrays),
      compiler_params=p_dq.compiler_params(),
      interpret=p_dq.interpret,
      name="flash_jax_backward_dq",
  )(*inputs.arrays)

  dbias = None
  if bias is not None:
    dbias = _dbias(p_dq, query, key, value, bias, arrays, dout, lse, delta,
                   dbias_states)
    # Sum the dims the bias broadcasts over T or S (the kernel expands them),
    # then return the bias's own shape and dtype.
    sum_axes = tuple(axis for axis in (2, 3) if bias.shape[axis] == 1)
    dbias = jnp.sum(dbias, axis=sum_axes, keepdims=True).astype(bias.dtype)
  return dq, dk, dv, dbias
