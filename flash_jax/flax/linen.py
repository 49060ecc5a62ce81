"""`FlashMultiHeadAttention` for Flax linen."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from flash_jax.config import BlockSizes
from flash_jax.flax import check_head_layout, module_attention

__all__ = ["FlashMultiHeadAttention"]


class FlashMultiHeadAttention(nn.Module):
  """Multi-head attention whose core is `flash_jax.dot_product_attention`.

  The linen twin of `flash_jax.flax.nnx.FlashMultiHeadAttention`, with the
  same parameters (``query``, ``key``, ``value``, ``out``; Flax's
  ``DenseGeneral`` layout) and the same semantics: GQA through
  ``num_kv_heads``, causal, padding lengths, segment ids or a dense mask,
  optional RoPE, attention dropout (rng collection ``"dropout"``).

  Example::

    layer = FlashMultiHeadAttention(num_heads=8, num_kv_heads=2,
                                    is_causal=True, rope_base=10000.0)
    params = layer.init(jax.random.key(0), x)    # x: [B, T, D]
    y = layer.apply(params, x)

  Attributes:
    num_heads: query heads ``N``.
    num_kv_heads: key/value heads ``K`` (``N % K == 0``); default ``N``.
    head_dim: per-head size ``H``; default ``qkv_features // N``.
    qkv_features: ``N * H`` when ``head_dim`` is not given; default the
      input feature size.
    out_features: output size; default the input feature size.
    is_causal: causal mask (top-left aligned, as in ``jax.nn``).
    rope_base: RoPE wavelength base (e.g. 10000.0); None for no RoPE.
    dropout_rate: attention dropout rate (on the probabilities).
    broadcast_dropout: one dropout mask for every batch row and head.
    deterministic: no dropout when True; a call's argument overrides it.
    use_bias: biases in the projections.
    implementation, block_sizes, interpret: passed to
      `flash_jax.dot_product_attention`.
    dtype: computation dtype (default: inferred from inputs and params).
    param_dtype: parameter dtype.
    kernel_init, bias_init: initializers of the projections.
  """

  num_heads: int
  num_kv_heads: int | None = None
  head_dim: int | None = None
  qkv_features: int | None = None
  out_features: int | None = None
  is_causal: bool = False
  rope_base: float | None = None
  dropout_rate: float = 0.0
  broadcast_dropout: bool = False
  deterministic: bool | None = None
  use_bias: bool = False
  implementation: str | Sequence[str] | None = None
  block_sizes: BlockSizes | None = None
  interpret: bool | None = None
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, inputs_q, inputs_k=None, inputs_v=None, *, mask=None,
               query_seq_lengths=None, key_value_seq_lengths=None,
               query_segment_ids=None, kv_segment_ids=None, positions=None,
               kv_positions=None, deterministic: bool | None = None,
               dropout_rng=None) -> jax.Array:
    """Attends ``inputs_q`` ``[B, T, D]`` to ``inputs_k``/``inputs_v``.

    Args:
      inputs_q: ``[B, T, D]``.
      inputs_k: ``[B, S, Dkv]``; default ``inputs_q`` (self-attention).
      inputs_v: ``[B, S, Dkv]``; default ``inputs_k``.
      mask: boolean (or 0/1 float) mask broadcastable to ``[B, N, T, S]``,
        True = attend. Costs O(T*S) memory: prefer the lengths or ids.
      query_seq_lengths, key_value_seq_lengths: int ``[B]`` padding lengths.
      query_segment_ids, kv_segment_ids: int ``[B, T]`` / ``[B, S]``.
      positions: int positions of the queries for RoPE (``[T]`` or
        ``[B, T]``); default ``0 .. T-1``.
      kv_positions: positions of the keys; default ``positions`` for
        self-attention, else ``0 .. S-1``.
      deterministic: overrides the attribute; one of the two must be set
        when ``dropout_rate > 0``.
      dropout_rng: a key for the dropout; default
        ``self.make_rng("dropout")``.

    Returns:
      ``[B, T, out_features]``. A query row that attends nothing (padding)
      gives the output projection of 0 (its bias).
    """
    features = inputs_q.shape[-1]
    head_dim = self.head_dim
    if head_dim is None:
      qkv_features = self.qkv_features or features
      if qkv_features % self.num_heads:
        raise ValueError(f"qkv_features={qkv_features} is not a multiple of "
                         f"num_heads={self.num_heads}")
      head_dim = qkv_features // self.num_heads
    num_kv_heads = check_head_layout(self.num_heads, self.num_kv_heads,
                                     head_dim, self.rope_base)
    self_attention = inputs_k is None and inputs_v is None
    inputs_k = inputs_q if inputs_k is None else inputs_k
    inputs_v = inputs_k if inputs_v is None else inputs_v
    if self_attention and kv_positions is None:
      kv_positions = positions

    def projection(heads, name):
      return nn.DenseGeneral(
          features=(heads, head_dim), axis=-1, use_bias=self.use_bias,
          dtype=self.dtype, param_dtype=self.param_dtype,
          kernel_init=self.kernel_init, bias_init=self.bias_init, name=name)

    query = projection(self.num_heads, "query")(inputs_q)
    key = projection(num_kv_heads, "key")(inputs_k)
    value = projection(num_kv_heads, "value")(inputs_v)

    use_dropout = False
    if self.dropout_rate > 0:
      deterministic = (self.deterministic if deterministic is None
                       else deterministic)
      if deterministic is None:
        raise ValueError("dropout_rate > 0: pass deterministic= to the call "
                         "or set the attribute")
      use_dropout = not deterministic
      if use_dropout and dropout_rng is None:
        dropout_rng = self.make_rng("dropout")
    implementation = self.implementation
    if implementation is not None and not isinstance(implementation, str):
      implementation = tuple(implementation)
    x = module_attention(
        query, key, value, rope_base=self.rope_base, positions=positions,
        kv_positions=kv_positions, mask=mask, use_dropout=use_dropout,
        dropout_rate=self.dropout_rate, dropout_rng=dropout_rng,
        broadcast_dropout=self.broadcast_dropout, is_causal=self.is_causal,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
        query_segment_ids=query_segment_ids, kv_segment_ids=kv_segment_ids,
        implementation=implementation, block_sizes=self.block_sizes,
        interpret=self.interpret)
    return nn.DenseGeneral(
        features=self.out_features or features, axis=(-2, -1),
        use_bias=self.use_bias, dtype=self.dtype,
        param_dtype=self.param_dtype, kernel_init=self.kernel_init,
        bias_init=self.bias_init, name="out")(x)
