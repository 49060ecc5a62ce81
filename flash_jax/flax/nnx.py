"""`FlashMultiHeadAttention` for Flax NNX."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from flash_jax.config import BlockSizes
from flash_jax.flax import check_head_layout, module_attention

__all__ = ["FlashMultiHeadAttention"]


class FlashMultiHeadAttention(nnx.Module):
  """Multi-head attention whose core is `flash_jax.dot_product_attention`.

  Query, key, value and output projections with Flax's parameter layout
  (``query.kernel [D, N, H]``, ``key.kernel [Dkv, K, H]``, ``out.kernel
  [N, H, Dout]``), grouped-query attention through ``num_kv_heads``, an
  optional rotary position embedding on queries and keys, and attention
  dropout; masks may be given as padding lengths, segment ids (packed
  documents), ``is_causal`` or a dense boolean mask.

  Example::

    layer = FlashMultiHeadAttention(8, 512, num_kv_heads=2, is_causal=True,
                                    rope_base=10000.0, rngs=nnx.Rngs(0))
    y = layer(x)                            # x: [B, T, 512]

  Args:
    num_heads: query heads ``N``.
    in_features: feature size ``D`` of ``inputs_q``.
    num_kv_heads: key/value heads ``K`` (``N % K == 0``); default ``N``.
    head_dim: per-head size ``H``; default ``qkv_features // N``.
    qkv_features: ``N * H`` when ``head_dim`` is not given; default ``D``.
    out_features: output size; default ``D``.
    in_kv_features: feature size of ``inputs_k``/``inputs_v``; default ``D``.
    is_causal: causal mask (top-left aligned, as in ``jax.nn``).
    rope_base: RoPE wavelength base (e.g. 10000.0); None for no RoPE.
    dropout_rate: attention dropout rate (on the probabilities).
    broadcast_dropout: one dropout mask for every batch row and head.
    deterministic: no dropout when True; `nnx.Module.eval` sets it,
      `nnx.Module.train` clears it, and a call's argument overrides it.
    use_bias: biases in the projections.
    implementation, block_sizes, interpret: passed to
      `flash_jax.dot_product_attention`.
    dtype: computation dtype (default: inferred from inputs and params).
    param_dtype: parameter dtype.
    kernel_init, bias_init: initializers of the projections.
    rngs: `nnx.Rngs` for the parameters and, with dropout, the ``dropout``
      stream.
  """

  def __init__(
      self, num_heads: int, in_features: int, *,
      num_kv_heads: int | None = None, head_dim: int | None = None,
      qkv_features: int | None = None, out_features: int | None = None,
      in_kv_features: int | None = None, is_causal: bool = False,
      rope_base: float | None = None, dropout_rate: float = 0.0,
      broadcast_dropout: bool = False, deterministic: bool = False,
      use_bias: bool = False,
      implementation: str | Sequence[str] | None = None,
      block_sizes: BlockSizes | None = None, interpret: bool | None = None,
      dtype=None, param_dtype=jnp.float32,
      kernel_init=nnx.initializers.lecun_normal(),
      bias_init=nnx.initializers.zeros_init(), rngs: nnx.Rngs):
    if head_dim is None:
      qkv_features = in_features if qkv_features is None else qkv_features
      if qkv_features % num_heads:
        raise ValueError(f"qkv_features={qkv_features} is not a multiple of "
                         f"num_heads={num_heads}")
      head_dim = qkv_features // num_heads
    self.num_heads = num_heads
    self.num_kv_heads = check_head_layout(num_heads, num_kv_heads, head_dim,
                                          rope_base)
    self.head_dim = head_dim
    self.is_causal = is_causal
    self.rope_base = rope_base
    self.dropout_rate = dropout_rate
    self.broadcast_dropout = broadcast_dropout
    self.deterministic = deterministic
    # A tuple, not a list: nnx keeps tuples of strings as static metadata.
    self.implementation = (implementation if implementation is None or
                           isinstance(implementation, str)
                           else tuple(implementation))
    self.block_sizes = block_sizes
    self.interpret = interpret
    in_kv_features = in_features if in_kv_features is None else in_kv_features

    def projection(features_in, features_out, axis=-1):
      return nnx.LinearGeneral(
          features_in, features_out, axis=axis, use_bias=use_bias,
          dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init,
          bias_init=bias_init, rngs=rngs)

    self.query = projection(in_features, (num_heads, head_dim))
    self.key = projection(in_kv_features, (self.num_kv_heads, head_dim))
    self.value = projection(in_kv_features, (self.num_kv_heads, head_dim))
    self.out = projection((num_heads, head_dim),
                          in_features if out_features is None
                          else out_features, axis=(-2, -1))
    # Its own stream, as nnx.Dropout keeps one: calls draw fresh keys.
    self.rngs = (rngs["dropout"].fork() if dropout_rate > 0
                 else nnx.data(None))

  def __call__(self, inputs_q, inputs_k=None, inputs_v=None, *, mask=None,
               query_seq_lengths=None, key_value_seq_lengths=None,
               query_segment_ids=None, kv_segment_ids=None, positions=None,
               kv_positions=None, deterministic: bool | None = None,
               rngs: nnx.Rngs | nnx.RngStream | jax.Array | None = None
               ) -> jax.Array:
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
      deterministic: overrides the module's ``deterministic``.
      rngs: dropout randomness overriding the module's stream: `nnx.Rngs`
        (its ``dropout`` stream), an `nnx.RngStream` or a key.

    Returns:
      ``[B, T, out_features]``. A query row that attends nothing (padding)
      gives the output projection of 0 (its bias).
    """
    self_attention = inputs_k is None and inputs_v is None
    inputs_k = inputs_q if inputs_k is None else inputs_k
    inputs_v = inputs_k if inputs_v is None else inputs_v
    if self_attention and kv_positions is None:
      kv_positions = positions
    deterministic = (self.deterministic if deterministic is None
                     else deterministic)
    use_dropout = not deterministic and self.dropout_rate > 0
    dropout_rng = self._dropout_key(rngs) if use_dropout else None
    x = module_attention(
        self.query(inputs_q), self.key(inputs_k), self.value(inputs_v),
        rope_base=self.rope_base, positions=positions,
        kv_positions=kv_positions, mask=mask, use_dropout=use_dropout,
        dropout_rate=self.dropout_rate, dropout_rng=dropout_rng,
        broadcast_dropout=self.broadcast_dropout, is_causal=self.is_causal,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
        query_segment_ids=query_segment_ids, kv_segment_ids=kv_segment_ids,
        implementation=self.implementation, block_sizes=self.block_sizes,
        interpret=self.interpret)
    return self.out(x)

  def _dropout_key(self, rngs):
    if rngs is None:
      rngs = self.rngs
    if isinstance(rngs, nnx.Rngs):
      return rngs["dropout"]()
    if isinstance(rngs, nnx.RngStream):
      return rngs()
    if isinstance(rngs, jax.Array):
      return rngs
    raise ValueError(
        "dropout is on (deterministic=False, dropout_rate > 0) but there is "
        "no dropout randomness: pass rngs= to the call, or build the module "
        f"with dropout_rate > 0 and rngs (got {rngs!r})")

  def set_view(self, deterministic: bool | None = None):
    """For `nnx.view`: ``deterministic=True`` turns dropout off."""
    if deterministic is not None:
      self.deterministic = deterministic
