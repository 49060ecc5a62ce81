"""Flax integration: flash_jax as Flax's attention_fn, and FlashMultiHeadAttention.

Exactness uses FlashAttention's rule (`helpers.assert_flash_close`): the
flash path's error against a float64 oracle is at most 2x (3x for
gradients) that of the same layer computed plainly in the input dtype.
Flax's own layers with their default attention_fn give the plain and (run
in float64) the oracle numbers; FlashMultiHeadAttention is checked against
an independent plain-JAX layer written below.

The flash path asks for ("pallas_triton", "xla"): the Pallas kernel (in
interpret mode on CPU) wherever it takes the call, the XLA reference for
what it does not take yet (dense masks, dropout).
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import flash_jax
from flash_jax.flax import apply_rope, attention_fn, make_attention_fn
from flash_jax.flax import linen as flash_linen
from flash_jax.flax import nnx as flash_nnx
from helpers import assert_flash_close

IMPLEMENTATION = ("pallas_triton", "xla")
FLASH_FN = make_attention_fn(implementation=IMPLEMENTATION)
B, T, D, N, K = 2, 17, 32, 4, 2          # H = D // N = 8
KV_LENGTHS = np.array([T, 9])


def _normal(key, shape, dtype="float32"):
  return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def _to64(tree):
  return jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)), tree)


def _padding_mask():
  """Flax's float padding mask ``[B, 1, T, T]``; padded query rows are
  fully masked."""
  valid = (jnp.arange(T)[None] < KV_LENGTHS[:, None]).astype(jnp.float32)
  return nn.make_attention_mask(valid, valid)


def _valid_rows(masking: str) -> np.ndarray:
  """bool ``[B, T]``: the query rows compared. Flax gives a fully masked
  row the mean of the values, flash_jax gives 0: those rows are left out
  (and get no cotangent)."""
  if masking == "padding":
    return np.arange(T)[None] < KV_LENGTHS[:, None]
  return np.ones((B, T), bool)


def _assert_outputs_and_grads(results, rows, name):
  """results: {"flash", "plain", "oracle"} -> (out, grads)."""
  (out, grads), (plain_out, plain_grads), (oracle_out, oracle_grads) = (
      results["flash"], results["plain"], results["oracle"])
  take = lambda x: np.asarray(jnp.asarray(x, jnp.float32))[rows]  # noqa: E731
  assert_flash_close(take(out), np.asarray(oracle_out)[rows],
                     take(plain_out), factor=2, name=f"{name} out")
  chex.assert_trees_all_equal_structs(grads, plain_grads, oracle_grads)
  chex.assert_trees_all_equal_shapes(grads, plain_grads, oracle_grads)
  flat, _ = jax.tree_util.tree_flatten_with_path(grads)
  flat_plain = jax.tree.leaves(plain_grads)
  flat_oracle = jax.tree.leaves(oracle_grads)
  assert len(flat) >= 4
  for (path, g), g_plain, g_oracle in zip(flat, flat_plain, flat_oracle):
    if "'key']['bias']" in jax.tree_util.keystr(path):
      # q.(k_j + b) shifts every logit of a row by q.b: softmax ignores it,
      # so the exact gradient is 0 and both sides are rounding noise.
      continue
    assert_flash_close(g, g_oracle, g_plain, factor=3,
                       name=f"{name} d{jax.tree_util.keystr(path)}")


# -- Flax's own layers with the flash attention_fn ---------------------------

@pytest.mark.parametrize("masking, dtype", [
    ("causal_flag", "float32"), ("causal_flag", "bfloat16"),
    ("causal_mask", "float32"), ("padding", "bfloat16")])
def test_linen_multi_head_attention_matches_default(rng, dtype, masking):
  """nn.MultiHeadDotProductAttention: outputs and parameter gradients.

  "causal_flag" gives the flash layer no mask but
  ``make_attention_fn(is_causal=True)`` (the kernel path), the default
  layer nn.make_causal_mask.
  """
  k_x, k_g, k_init = jax.random.split(rng, 3)
  x = _normal(k_x, (B, T, D), dtype)
  rows = _valid_rows(masking)
  cotangent = _normal(k_g, (B, T, D)) * rows[..., None]
  causal = nn.make_causal_mask(jnp.ones((B, T)))       # float32 [B, 1, T, T]
  mask = {"causal_mask": causal, "causal_flag": causal,
          "padding": _padding_mask()}[masking]
  flash_fn, flash_mask = FLASH_FN, mask
  if masking == "causal_flag":
    flash_fn = make_attention_fn(implementation=IMPLEMENTATION,
                                 is_causal=True)
    flash_mask = None

  def layer(fn, compute_dtype):
    # Parameters come from outside; dtype sets the computation.
    return nn.MultiHeadDotProductAttention(
        num_heads=N, dtype=compute_dtype, attention_fn=fn)

  params = layer(nn.dot_product_attention, jnp.float32).init(k_init, x)

  @functools.partial(jax.jit, static_argnums=0)
  def run(module, params, x, mask, cotangent):
    def loss(params):
      out = module.apply(params, x, mask=mask)
      return jnp.sum(out.astype(cotangent.dtype) * cotangent), out
    (_, out), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return out, grads

  results = {
      "flash": run(layer(flash_fn, dtype), params, x, flash_mask, cotangent),
      "plain": run(layer(nn.dot_product_attention, dtype), params, x, mask,
                   cotangent)}
  with jax.enable_x64(True):
    results["oracle"] = jax.tree.map(np.asarray, run(
        layer(nn.dot_product_attention, jnp.float64), _to64(params),
        _to64(x), mask, _to64(cotangent)))
  _assert_outputs_and_grads(results, rows, f"linen {masking} {dtype}")


@pytest.mark.parametrize("masking, dtype", [
    ("is_causal", "float32"), ("is_causal", "bfloat16"),
    ("causal_mask", "bfloat16"), ("padding", "float32")])
def test_nnx_multi_head_attention_matches_default(rng, dtype, masking):
  """nnx.MultiHeadAttention with GQA (N=4, K=2): outputs and parameter
  gradients; "is_causal" is nnx's call flag, which attention_fn receives."""
  k_x, k_g, k_init = jax.random.split(rng, 3)
  x = _normal(k_x, (B, T, D), dtype)
  rows = _valid_rows(masking)
  cotangent = _normal(k_g, (B, T, D)) * rows[..., None]
  call_kwargs = {
      "is_causal": dict(is_causal=True),
      "causal_mask": dict(mask=nn.make_causal_mask(jnp.ones((B, T)))),
      "padding": dict(mask=_padding_mask()),
  }[masking]
  seed = int(jax.random.randint(k_init, (), 0, 2**30))

  def layer(fn, compute_dtype):
    param_dtype = jnp.float64 if compute_dtype == jnp.float64 else "float32"
    return nnx.MultiHeadAttention(
        N, D, num_kv_heads=K, attention_fn=fn, decode=False,
        dtype=compute_dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed))

  def run(model, x, cotangent):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def value_and_grad(params, rest, x, cotangent):
      def loss(params):
        out = nnx.merge(graphdef, params, rest)(x, **call_kwargs)
        return jnp.sum(out.astype(cotangent.dtype) * cotangent), out
      return jax.value_and_grad(loss, has_aux=True)(params)
    (_, out), grads = value_and_grad(params, rest, x, cotangent)
    return out, nnx.to_pure_dict(grads)

  default_fn = nnx.dot_product_attention
  params = nnx.state(layer(default_fn, jnp.float32), nnx.Param)
  flash, plain = (layer(fn, dtype) for fn in (FLASH_FN, default_fn))
  for model in (flash, plain):
    nnx.update(model, params)
  results = {"flash": run(flash, x, cotangent),
             "plain": run(plain, x, cotangent)}
  with jax.enable_x64(True):
    oracle = layer(default_fn, jnp.float64)
    nnx.update(oracle, _to64(params))
    results["oracle"] = jax.tree.map(
        np.asarray, run(oracle, _to64(x), _to64(cotangent)))
  _assert_outputs_and_grads(results, rows, f"nnx {masking} {dtype}")


def test_extra_batch_dims_and_unbatched_inputs_match_flax(rng):
  """Flax allows any number of batch dims (or none); masks and biases
  broadcast over them."""
  k_q, k_k, k_v, k_bias = jax.random.split(rng, 4)
  q = _normal(k_q, (2, 3, T, N, 8))
  k = _normal(k_k, (2, 3, T + 2, N, 8))
  v = _normal(k_v, (2, 3, T + 2, N, 8))
  kv_valid = jnp.arange(T + 2) < jnp.array([[5], [T + 2]])[:, :, None]
  mask = nn.make_attention_mask(jnp.ones((2, 3, T)), kv_valid)  # [2,3,1,T,S]
  bias = _normal(k_bias, (3, 1, T, T + 2))                       # no batch 0
  for args in ((q, k, v, bias, mask), (q[0, 0], k[0, 0], v[0, 0], None,
                                       mask[0, 0])):
    # jit: one compile each instead of one per eager op. Full float32
    # products: on a GPU Flax's einsums would otherwise use TF32.
    with jax.default_matmul_precision("float32"):
      expected = jax.jit(nn.dot_product_attention)(*args)
    np.testing.assert_allclose(jax.jit(FLASH_FN)(*args), expected,
                               atol=2e-6, rtol=1e-5)


def test_float_mask_is_cast_to_bool_and_dtype_is_honoured(rng):
  k_q, k_k, k_v = jax.random.split(rng, 3)
  q, k, v = (_normal(key, (B, T, N, 8)) for key in (k_q, k_k, k_v))
  causal = nn.make_causal_mask(jnp.ones((B, T)))
  assert causal.dtype == jnp.float32
  as_float = attention_fn(q, k, v, mask=causal)
  np.testing.assert_array_equal(as_float,
                                attention_fn(q, k, v, mask=causal > 0))
  # A dense mask and is_causal visit the same blocks in different orders
  # (block-map lists put partial blocks first), so on a GPU the sums round
  # differently: equal to float32 rounding, not bitwise.
  np.testing.assert_allclose(as_float, attention_fn(q, k, v, is_causal=True),
                             rtol=1e-5, atol=1e-6)
  low = attention_fn(q, k, v, mask=causal, dtype=jnp.bfloat16)
  assert low.dtype == jnp.bfloat16
  np.testing.assert_array_equal(low, attention_fn(
      *(x.astype(jnp.bfloat16) for x in (q, k, v)), mask=causal))
  # Mixed dtypes are promoted, as Flax's promote_dtype does.
  assert attention_fn(q.astype(jnp.bfloat16), k, v).dtype == jnp.float32
  for precision in (None, "high", (jax.lax.Precision.DEFAULT, "high")):
    np.testing.assert_array_equal(
        attention_fn(q, k, v, mask=causal, precision=precision), as_float)
  # HIGHEST gives float32 inputs full-precision products (on a GPU these
  # differ from the default three-TF32 products).
  with jax.default_matmul_precision("highest"):
    full = attention_fn(q, k, v, mask=causal)
  for precision in ("highest", "float32", jax.lax.Precision.HIGHEST,
                    (jax.lax.Precision.DEFAULT, jax.lax.Precision.HIGHEST)):
    np.testing.assert_array_equal(
        attention_fn(q, k, v, mask=causal, precision=precision), full)


def test_make_attention_fn_fixes_flash_arguments(rng):
  k_q, k_k, k_v = jax.random.split(rng, 3)
  q, k, v = (_normal(key, (B, T, N, 8)) for key in (k_q, k_k, k_v))
  windowed = make_attention_fn(implementation="xla", local_window_size=(3, 0))
  assert windowed.flash_kwargs == dict(implementation="xla",
                                       local_window_size=(3, 0))
  np.testing.assert_array_equal(
      windowed(q, k, v), flash_jax.dot_product_attention(
          q, k, v, local_window_size=(3, 0), implementation="xla"))
  # A fixed is_causal and nnx's per-call flag combine (either one is enough).
  causal = make_attention_fn(is_causal=True)
  np.testing.assert_array_equal(causal(q, k, v), attention_fn(
      q, k, v, is_causal=True))
  np.testing.assert_array_equal(causal(q, k, v, is_causal=False),
                                causal(q, k, v))
  # A decode step (one query, the cache's keys) needs bottom-right causal.
  with pytest.raises(ValueError, match="decode"):
    causal(q[:, -1:], k, v)
  decode = make_attention_fn(is_causal=True, causal_alignment="bottom_right")
  np.testing.assert_allclose(decode(q[:, -1:], k, v),
                             causal(q, k, v)[:, -1:], atol=1e-6, rtol=1e-6)


# -- dropout -----------------------------------------------------------------

class TestDropout:
  """Flax's dropout arguments mapped onto flash_jax's in-kernel dropout."""

  RATE = 0.5

  @pytest.fixture
  def qkv(self, rng):
    k_q, k_k, k_v = jax.random.split(rng, 3)
    return tuple(_normal(key, (B, T, N, 8)) for key in (k_q, k_k, k_v))

  def test_deterministic_or_rate_zero_is_no_dropout(self, qkv, rng):
    plain = FLASH_FN(*qkv)
    np.testing.assert_array_equal(FLASH_FN(
        *qkv, dropout_rate=self.RATE, dropout_rng=rng, deterministic=True),
                                  plain)
    np.testing.assert_array_equal(FLASH_FN(
        *qkv, dropout_rate=0.0, dropout_rng=rng, deterministic=False), plain)
    dropped = FLASH_FN(*qkv, dropout_rate=self.RATE, dropout_rng=rng)
    assert np.abs(np.asarray(dropped - plain)).max() > 0.1

  def test_same_rng_same_output_other_rng_other_output(self, qkv, rng):
    first, second = jax.random.split(rng)
    run = lambda key: FLASH_FN(*qkv, dropout_rate=self.RATE,  # noqa: E731
                               dropout_rng=key, is_causal=True)
    np.testing.assert_array_equal(run(first), run(first))
    assert not np.array_equal(run(first), run(second))

  @pytest.mark.parametrize("broadcast", [True, False])
  def test_broadcast_dropout_shares_one_mask(self, rng, broadcast):
    """Same q/k/v in every batch row and head: the outputs agree across
    them iff the mask does. Each output is also checked against attention
    computed with flash_jax.dropout_keep_mask."""
    k_q, k_k, k_v, k_drop = jax.random.split(rng, 4)
    q, k, v = (jnp.broadcast_to(_normal(key, (1, T, 1, 8)), (B, T, N, 8))
               for key in (k_q, k_k, k_v))
    out = FLASH_FN(q, k, v, dropout_rate=self.RATE, dropout_rng=k_drop,
                   broadcast_dropout=broadcast)
    same = np.asarray(out == out[:1, :, :1]).all()
    assert same == broadcast
    keep = flash_jax.dropout_keep_mask(k_drop, self.RATE, (B, N, T, T),
                                       broadcast=broadcast)
    highest = jax.lax.Precision.HIGHEST
    probs = jax.nn.softmax(jnp.einsum("btnh,bsnh->bnts", q, k,
                                      precision=highest) / np.sqrt(8))
    expected = jnp.einsum("bnts,bsnh->btnh", probs * keep
                          * flash_jax.dropout.keep_scale(self.RATE),
                          v, precision=highest)
    np.testing.assert_allclose(out, expected, atol=2e-6, rtol=1e-5)

  def test_linen_layer_dropout(self, rng):
    x = _normal(rng, (B, T, D))
    make = lambda rate: nn.MultiHeadDotProductAttention(  # noqa: E731
        num_heads=N, dropout_rate=rate, attention_fn=FLASH_FN)
    params = make(0.0).init(jax.random.key(0), x)
    reference = make(0.0).apply(params, x)
    layer = make(self.RATE)
    np.testing.assert_array_equal(
        layer.apply(params, x, deterministic=True), reference)
    run = lambda seed: layer.apply(  # noqa: E731
        params, x, deterministic=False, rngs={"dropout": jax.random.key(seed)})
    np.testing.assert_array_equal(run(1), run(1))
    assert not np.array_equal(run(1), run(2))
    assert not np.array_equal(run(1), reference)

  def test_nnx_layer_dropout_follows_train_and_eval(self, rng):
    x = _normal(rng, (B, T, D))
    layer = nnx.MultiHeadAttention(N, D, dropout_rate=self.RATE,
                                   attention_fn=FLASH_FN, decode=False,
                                   rngs=nnx.Rngs(0))
    layer.eval()
    reference = layer(x)
    np.testing.assert_array_equal(layer(x), reference)
    layer.train()
    first, second = layer(x), layer(x)   # the stream moves on between calls
    assert not np.array_equal(first, reference)
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(layer(x, rngs=nnx.Rngs(dropout=7)),
                                  layer(x, rngs=nnx.Rngs(dropout=7)))


# -- what attention_fn cannot honour -----------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(module=object()), "cannot sow attention weights"),
    (dict(qk_attn_weights_einsum=jnp.einsum,
          attn_weights_value_einsum=jnp.einsum), "custom einsums"),
    (dict(input_positions=jnp.arange(T)), "input_positions"),
    (dict(precision=jax.lax.DotAlgorithmPreset.BF16_BF16_F32),
     "cannot honour precision"),
    (dict(precision="fast"), "cannot honour precision"),
    (dict(dropout_rate=0.1), "needs a dropout_rng"),
    (dict(mask=jnp.ones((3, 1, 1, T, T), bool)), "does not broadcast"),
])
def test_attention_fn_refuses_what_it_cannot_honour(rng, kwargs, message):
  x = _normal(rng, (B, T, N, 8))
  if "mask" in kwargs:
    x = x[None]                                   # rank 5: [1, B, T, N, H]
  with pytest.raises(ValueError, match=message):
    FLASH_FN(x, x, x, **kwargs)


def test_attention_fn_refuses_bad_ranks_and_factory_arguments(rng):
  x = _normal(rng, (T, 8))
  with pytest.raises(ValueError, match="rank >= 3"):
    attention_fn(x, x, x)
  with pytest.raises(ValueError, match="one rank"):
    attention_fn(x[None], x[None, None], x[None])
  with pytest.raises(TypeError, match="per-call"):
    make_attention_fn(mask=None)
  with pytest.raises(TypeError, match="fixed arguments"):
    make_attention_fn(causal=True)            # the flag is named is_causal
  # flash_jax's own deterministic flag is a fixed argument, not Flax's.
  assert callable(make_attention_fn(deterministic=False))


def test_linen_sow_weights_is_refused(rng):
  x = _normal(rng, (B, T, D))
  layer = nn.MultiHeadDotProductAttention(num_heads=N, attention_fn=FLASH_FN)
  params = layer.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="cannot sow"):
    layer.apply(params, x, sow_weights=True, mutable=["intermediates"])


# -- FlashMultiHeadAttention -------------------------------------------------

def _rope_by_complex_numbers(x, positions, base):
  """RoPE written independently: pair (x[i], x[i + H/2]) as a complex
  number, multiplied by exp(1j * position * base**(-2i/H))."""
  half = x.shape[-1] // 2
  z = x[..., :half] + 1j * x[..., half:]
  frequencies = base ** (-np.arange(half) * 2.0 / x.shape[-1])
  angles = np.asarray(positions)[..., None, None] * frequencies
  z = z * np.exp(1j * angles)
  return np.concatenate([z.real, z.imag], -1)


def _plain_layer(params, x, *, rope_base, positions, allowed, dtype):
  """Multi-head GQA attention in plain JAX, every step in ``dtype``.

  ``allowed`` bool ``[B, 1, T, T]``; rows with nothing allowed give 0.
  """
  cast = lambda a: jnp.asarray(a, dtype)  # noqa: E731
  p = jax.tree.map(cast, params)
  x = cast(x)
  q, k, v = (jnp.einsum("btd,dnh->btnh", x, p[name]["kernel"])
             + p[name]["bias"] for name in ("query", "key", "value"))
  if rope_base is not None:
    # The rotation is data-independent: its sin/cos table comes from numpy
    # in float64, the product with q/k runs in ``dtype``.
    half = q.shape[-1] // 2
    frequencies = rope_base ** (-np.arange(half) * 2.0 / q.shape[-1])
    angles = np.asarray(positions)[..., None, None] * frequencies
    cos, sin = cast(np.cos(angles)), cast(np.sin(angles))
    rotate = lambda a: jnp.concatenate(  # noqa: E731
        [a[..., :half] * cos - a[..., half:] * sin,
         a[..., half:] * cos + a[..., :half] * sin], -1)
    q, k = rotate(q), rotate(k)
  groups = q.shape[2] // k.shape[2]
  k, v = (jnp.repeat(a, groups, axis=2) for a in (k, v))
  logits = jnp.einsum("btnh,bsnh->bnts", q, k) / cast(np.sqrt(q.shape[-1]))
  logits = jnp.where(allowed, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max,
                                            0))
  weights = jnp.exp(logits - row_max)
  total = jnp.sum(weights, axis=-1, keepdims=True)
  weights = weights / jnp.where(total == 0, 1, total)
  out = jnp.einsum("bnts,bsnh->btnh", weights, v)
  return (jnp.einsum("btnh,nhd->btd", out, p["out"]["kernel"])
          + p["out"]["bias"])


def _module_case(features: str, rng):
  """Call arguments for FlashMultiHeadAttention and the ``allowed`` mask
  and RoPE positions the plain layer needs."""
  i, j = np.arange(T)[:, None], np.arange(T)[None]
  if features == "causal_lengths":
    q_lengths, kv_lengths = np.array([T, 12]), np.array([T, 9])
    allowed = ((j <= i)[None] & (i[None] < q_lengths[:, None, None])
               & (j[None] < kv_lengths[:, None, None]))
    call = dict(query_seq_lengths=jnp.asarray(q_lengths),
                key_value_seq_lengths=jnp.asarray(kv_lengths))
    return dict(is_causal=True), call, allowed[:, None], np.arange(T)
  # Packed documents: segment ids, positions restarting per document, and a
  # dense mask that hides key 0 from every query.
  boundary = int(jax.random.randint(rng, (), 3, T - 3))
  segments = np.stack([(np.arange(T) >= boundary).astype(np.int32),
                       np.zeros(T, np.int32)])
  positions = np.stack([np.where(np.arange(T) >= boundary,
                                 np.arange(T) - boundary, np.arange(T)),
                        np.arange(T)])
  dense = np.broadcast_to(j > 0, (B, 1, T, T))
  allowed = (segments[:, :, None] == segments[:, None, :])[:, None] & dense
  call = dict(query_segment_ids=jnp.asarray(segments),
              kv_segment_ids=jnp.asarray(segments),
              positions=jnp.asarray(positions), mask=jnp.asarray(dense))
  return dict(is_causal=False), call, allowed, positions


@pytest.mark.parametrize("framework, features, dtype", [
    ("linen", "causal_lengths", "float32"),
    ("nnx", "causal_lengths", "bfloat16"),
    ("linen", "segments_mask", "bfloat16"),
    ("nnx", "segments_mask", "float32")])
def test_flash_multi_head_attention_matches_plain_jax(rng, dtype, framework,
                                                      features):
  """GQA (N=4, K=2) with RoPE, biases, and either causal + padding lengths
  or segment ids + restarting positions + a dense mask."""
  k_x, k_g, k_init, k_case = jax.random.split(rng, 4)
  x = _normal(k_x, (B, T, D), dtype)
  cotangent = _normal(k_g, (B, T, D))
  config, call, allowed, positions = _module_case(features, k_case)
  settings = dict(num_kv_heads=K, rope_base=10000.0, use_bias=True,
                  implementation=IMPLEMENTATION, dtype=dtype,
                  bias_init=nn.initializers.normal(0.1), **config)
  if framework == "linen":
    module = flash_linen.FlashMultiHeadAttention(num_heads=N, **settings)
    params = module.init(k_init, x, **call)["params"]
    flash_params = params
    apply = lambda params: module.apply({"params": params}, x,  # noqa: E731
                                        **call)
  else:
    seed = int(jax.random.randint(k_init, (), 0, 2**30))
    model = flash_nnx.FlashMultiHeadAttention(N, D, rngs=nnx.Rngs(seed),
                                              **settings)
    graphdef, flash_params = nnx.split(model)
    params = nnx.to_pure_dict(flash_params)
    apply = lambda state: nnx.merge(graphdef, state)(x, **call)  # noqa: E731
  assert jax.tree.map(jnp.shape, params) == {
      "query": {"kernel": (D, N, 8), "bias": (N, 8)},
      "key": {"kernel": (D, K, 8), "bias": (K, 8)},
      "value": {"kernel": (D, K, 8), "bias": (K, 8)},
      "out": {"kernel": (N, 8, D), "bias": (D,)}}

  def run(fn, params, cotangent):
    def loss(params):
      out = fn(params)
      return jnp.sum(out.astype(cotangent.dtype) * cotangent), out
    (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
        params)
    return out, (grads if isinstance(grads, dict) else
                 nnx.to_pure_dict(grads))

  plain = lambda dtype: (lambda params: _plain_layer(  # noqa: E731
      params, x, rope_base=10000.0, positions=positions, allowed=allowed,
      dtype=dtype))
  results = {"flash": run(apply, flash_params, cotangent),
             "plain": run(plain(dtype), params, cotangent)}
  with jax.enable_x64(True):
    results["oracle"] = jax.tree.map(np.asarray, run(
        plain(jnp.float64), _to64(params), _to64(cotangent)))
  _assert_outputs_and_grads(results, np.ones((B, T), bool),
                            f"{framework} {features} {dtype}")


def test_linen_and_nnx_modules_agree_and_expose_implementation(rng):
  k_x, k_init = jax.random.split(rng)
  x = _normal(k_x, (B, T, D))
  settings = dict(num_kv_heads=K, is_causal=True, rope_base=500.0,
                  implementation="xla")
  linen_layer = flash_linen.FlashMultiHeadAttention(num_heads=N, **settings)
  params = linen_layer.init(k_init, x)
  nnx_layer = flash_nnx.FlashMultiHeadAttention(N, D, rngs=nnx.Rngs(0),
                                                **settings)
  assert nnx_layer.implementation == linen_layer.implementation == "xla"
  nnx.update(nnx_layer, params["params"])
  with jax.default_matmul_precision("float32"):   # no TF32 on a GPU
    expected = linen_layer.apply(params, x)
    np.testing.assert_allclose(nnx_layer(x), expected, atol=1e-6, rtol=1e-6)
    nnx_layer.implementation = "pallas_triton"
    np.testing.assert_allclose(nnx_layer(x), expected, atol=1e-5, rtol=1e-5)


def test_module_dropout(rng):
  x = _normal(rng, (B, T, D))
  layer = flash_nnx.FlashMultiHeadAttention(
      N, D, is_causal=True, dropout_rate=0.5, broadcast_dropout=True,
      rngs=nnx.Rngs(0))
  reference = layer(x, deterministic=True)
  first, second = layer(x), layer(x)
  assert not np.array_equal(first, reference)
  assert not np.array_equal(first, second)
  np.testing.assert_array_equal(nnx.view(layer, deterministic=True)(x),
                                reference)
  layer.eval()
  np.testing.assert_array_equal(layer(x), reference)
  key = jax.random.key(3)
  layer.train()
  np.testing.assert_array_equal(layer(x, rngs=key), layer(x, rngs=key))

  linen_layer = flash_linen.FlashMultiHeadAttention(
      num_heads=N, is_causal=True, dropout_rate=0.5)
  params = linen_layer.init(jax.random.key(0), x, deterministic=True)
  with pytest.raises(ValueError, match="deterministic"):
    linen_layer.apply(params, x)
  run = lambda seed: linen_layer.apply(  # noqa: E731
      params, x, deterministic=False, rngs={"dropout": jax.random.key(seed)})
  np.testing.assert_array_equal(run(1), run(1))
  assert not np.array_equal(run(1), run(2))
  assert not np.array_equal(run(1), linen_layer.apply(params, x,
                                                      deterministic=True))


@pytest.mark.parametrize("make, message", [
    (lambda: flash_nnx.FlashMultiHeadAttention(
        4, D, num_kv_heads=3, rngs=nnx.Rngs(0)), "multiple of num_kv_heads"),
    (lambda: flash_nnx.FlashMultiHeadAttention(
        4, D, head_dim=5, rope_base=1e4, rngs=nnx.Rngs(0)), "even head_dim"),
    (lambda: flash_nnx.FlashMultiHeadAttention(
        3, D, rngs=nnx.Rngs(0)), "not a multiple of num_heads"),
    (lambda: flash_nnx.FlashMultiHeadAttention(N, D, rngs=nnx.Rngs(0))(
        jnp.ones((B, T, D)), positions=jnp.arange(T)), "set rope_base"),
    (lambda: flash_linen.FlashMultiHeadAttention(num_heads=4, num_kv_heads=3)
     .init(jax.random.key(0), jnp.ones((B, T, D))), "multiple of num_kv"),
])
def test_module_errors(make, message):
  with pytest.raises(ValueError, match=message):
    make()


def test_apply_rope(rng):
  """Matches the complex-number form, keeps norms, and makes q.k depend
  only on the position difference."""
  k_x, k_y = jax.random.split(rng)
  x = _normal(k_x, (B, T, N, 8))
  positions = np.arange(T)[None] * np.array([[1], [3]])
  rotated = apply_rope(x, positions, base=100.0)
  np.testing.assert_allclose(
      rotated, _rope_by_complex_numbers(np.asarray(x, np.float64), positions,
                                        100.0), atol=1e-5)
  np.testing.assert_allclose(jnp.linalg.norm(rotated, axis=-1),
                             jnp.linalg.norm(x, axis=-1), rtol=1e-5)
  np.testing.assert_array_equal(apply_rope(x), apply_rope(x, jnp.arange(T)))
  q, k = _normal(k_x, (1, 1, 1, 8)), _normal(k_y, (1, 1, 1, 8))
  dots = [float(jnp.sum(apply_rope(q, jnp.array([m])) *
                        apply_rope(k, jnp.array([m - 4]))))
          for m in (4, 9, 30)]
  np.testing.assert_allclose(dots, dots[0], rtol=1e-4)
  with pytest.raises(ValueError, match="even head dim"):
    apply_rope(x[..., :7])
