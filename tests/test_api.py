"""Validation, dispatch and the reference oracle (implementation-independent)."""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flash_jax
from flash_jax import api, reference
from helpers import Case, draw_inputs

B, T, S, N, K, H = 2, 17, 23, 4, 2, 40


@pytest.fixture
def qkv(rng):
  q, k, v, _ = draw_inputs(rng, Case(B, T, S, N, K, H, H, False, "float32"))
  return q, k, v


@pytest.mark.parametrize("mutate, message", [
    (lambda q, k, v: (q[0, 0], k, v), "must all be 4-D"),
    (lambda q, k, v: (q[None], k[None], v[None]), "must all be 4-D"),
    (lambda q, k, v: (q, k[0], v), "must all be 4-D"),
    (lambda q, k, v: (q, k[:1], v[:1]), "batch sizes differ"),
    (lambda q, k, v: (q, k, v[:, :5]), "agree in S and K"),
    (lambda q, k, v: (q, k[..., :8], v), "head dims differ"),
    (lambda q, k, v: (q[:, :, :3], k, v), "multiple of key/value heads"),
    (lambda q, k, v: (q, k.astype(jnp.bfloat16), v), "share one dtype"),
    (lambda q, k, v: tuple(x.astype(jnp.int32) for x in (q, k, v)),
     "float32, float16 or bfloat16"),
    (lambda q, k, v: (q[:, :, :0], k[:, :, :0], v[:, :, :0]),
     "head counts must be >= 1"),
    (lambda q, k, v: (q[..., :0], k[..., :0], v), "head dim must be >= 1"),
    (lambda q, k, v: (q, k, v[..., :0]), "value head dim must be >= 1"),
])
def test_bad_shapes_and_dtypes_raise_value_error(qkv, mutate, message):
  with pytest.raises(ValueError, match=message):
    flash_jax.dot_product_attention(*mutate(*qkv))


@pytest.mark.parametrize("q_seq, kv_seq", [(0, S), (T, 0), (0, 0)])
@pytest.mark.parametrize("implementation", [None, "pallas_triton", "xla"])
def test_empty_sequences_match_jax_nn(rng, q_seq, kv_seq, implementation):
  """T = 0 gives an empty output and S = 0 zeros (no key to attend), as in
  jax.nn, with lse -inf, zero gradients and no kernel; the reference
  agrees."""
  q, k, v, do = draw_inputs(rng, Case(B, q_seq, kv_seq, N, K, H, H, True,
                                      "float32"))
  kwargs = dict(is_causal=True,
                query_seq_lengths=jnp.full((B,), q_seq, jnp.int32))
  out, lse = flash_jax.dot_product_attention(
      q, k, v, return_residual=True, implementation=implementation, **kwargs)
  assert out.shape == (B, q_seq, N, H) and lse.shape == (B, q_seq, N)
  jaxpr = jax.make_jaxpr(lambda q, k, v: flash_jax.dot_product_attention(
      q, k, v, implementation=implementation, **kwargs))(q, k, v)
  assert "pallas_call" not in str(jaxpr)
  np.testing.assert_array_equal(
      out, jax.nn.dot_product_attention(q, k, v, **kwargs))
  assert lse.dtype == jnp.float32 and bool(jnp.all(lse == -jnp.inf))
  ref_out, ref_lse = reference.dot_product_attention(
      q, k, v, return_residual=True, **kwargs)
  np.testing.assert_array_equal(out, ref_out)
  np.testing.assert_array_equal(lse, ref_lse)
  grads = jax.grad(lambda q, k, v: jnp.sum(flash_jax.dot_product_attention(
      q, k, v, implementation=implementation, **kwargs) * do),
      argnums=(0, 1, 2))(q, k, v)
  for g, x in zip(grads, (q, k, v)):
    assert g.shape == x.shape and not bool(jnp.any(g))


@pytest.mark.parametrize("kwargs, message", [
    (dict(query_seq_lengths=jnp.ones((B + 1,), jnp.int32)), r"shape \(B,\)"),
    (dict(key_value_seq_lengths=jnp.ones((B, 1), jnp.int32)), r"shape \(B,\)"),
    (dict(query_seq_lengths=jnp.ones((B,), jnp.float32)), "integer array"),
    (dict(scale=float("nan")), "finite"),
    (dict(scale="big"), "real number"),
    (dict(is_causal="yes"), "is_causal must be a static bool"),
    (dict(return_residual="no"), "return_residual must be a static bool"),
    (dict(implementation="flash"), "implementation must be"),
    (dict(implementation=["xla", "triton"]), "implementation must be"),
    (dict(implementation=[]), "implementation must be"),
    (dict(interpret="no"), "interpret must be"),
    (dict(block_sizes=(64, 64)), "block_sizes must be"),
    (dict(deterministic="yes"), "deterministic must be a static bool"),
])
def test_bad_arguments_raise_value_error(qkv, kwargs, message):
  with pytest.raises(ValueError, match=message):
    flash_jax.dot_product_attention(*qkv, **kwargs)


def test_lengths_of_any_integer_dtype_keep_their_meaning(qkv):
  """Lengths past the sequence mean "all valid" and negative ones "none",
  whatever the integer dtype (no wrap-around in the int32 cast)."""
  q, k, v = qkv
  full = flash_jax.dot_product_attention(q, k, v)
  huge = jnp.full((B,), 3_000_000_000, jnp.uint32)
  np.testing.assert_array_equal(
      flash_jax.dot_product_attention(q, k, v, query_seq_lengths=huge,
                                      key_value_seq_lengths=huge), full)
  none = flash_jax.dot_product_attention(
      q, k, v, query_seq_lengths=jnp.array([-5, T], jnp.int32))
  assert not jnp.any(none[0])
  np.testing.assert_array_equal(none[1], full[1])


def test_concrete_boolean_arrays_are_static_bools(qkv):
  out = flash_jax.dot_product_attention(*qkv, is_causal=jnp.array(True))
  np.testing.assert_array_equal(
      out, flash_jax.dot_product_attention(*qkv, is_causal=True))


@pytest.mark.parametrize("implementation", ["xla", "pallas_triton"])
def test_traced_scale_is_folded_into_the_query(qkv, implementation):
  """``scale=1 / jnp.sqrt(H)`` under jit (as jax.nn allows): the result is
  the static scale's, and the scale gets jax.nn's gradient."""
  attend = lambda scale: flash_jax.dot_product_attention(  # noqa: E731
      *qkv, scale=scale, is_causal=True, implementation=implementation)
  # Scaling Q before the product (traced) or the logits after it (static)
  # rounds differently in float32: on an H100 one element of 5440 was
  # 1.2e-6 off (session 14), where a wrong scale would be off by ~0.1.
  np.testing.assert_allclose(jax.jit(attend)(0.3), attend(0.3),
                             rtol=1e-5, atol=1e-5)
  plain = lambda scale: jax.nn.dot_product_attention(  # noqa: E731
      *qkv, scale=scale, is_causal=True)
  loss = lambda f: lambda scale: jnp.sum(jnp.sin(f(scale)))  # noqa: E731
  # The gradient is a sum of 5440 terms cos(out) * d out / d scale, which
  # can nearly cancel (0.017 against terms summing to ~100 in absolute
  # value on one seed), so the tolerance is relative to the terms, not to
  # the sum. (A float32 finite difference was used here before; its
  # rounding noise, ~1e-3, failed such a seed in CI.)
  out, tangent = jax.jvp(plain, (0.3,), (1.0,))
  terms = float(jnp.sum(jnp.abs(jnp.cos(out) * tangent)))
  np.testing.assert_allclose(jax.grad(loss(attend))(0.3),
                             jax.grad(loss(plain))(0.3), rtol=0,
                             atol=1e-5 * terms)
  with pytest.raises(ValueError, match="scalar"):
    jax.jit(attend)(jnp.full((2,), 0.3))


def test_head_dims_above_256_run_on_the_xla_path(rng):
  """As in jax.nn, any head dim is valid; the kernel backends decline
  those above 256 and say so."""
  q, k, v, _ = draw_inputs(rng, Case(B, T, S, N, K, 260, 300, True,
                                     "float32"))
  out = flash_jax.dot_product_attention(q, k, v, is_causal=True)
  k_per_head, v_per_head = (jnp.repeat(x, N // K, axis=2) for x in (k, v))
  logits = jnp.einsum("btnh,bsnh->bnts", q, k_per_head,
                      precision="highest") / np.sqrt(260)
  logits = jnp.where(jnp.tril(jnp.ones((T, S), bool)), logits, -jnp.inf)
  expected = jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, axis=-1),
                        v_per_head, precision="highest")
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  with pytest.raises(NotImplementedError, match="head dims up to 256"):
    flash_jax.dot_product_attention(q, k, v, implementation="pallas_triton")
  with pytest.raises(NotImplementedError, match="head dim 260"):
    flash_jax.dot_product_attention(
        q.astype(jnp.bfloat16), k.astype(jnp.bfloat16),
        v[..., :260].astype(jnp.bfloat16),
        implementation="pallas_mosaic_gpu")


@pytest.mark.parametrize("implementation", ["xla", "pallas_triton"])
@pytest.mark.parametrize("window", [None, (4, 1)])
def test_bottom_right_follows_padding_lengths(qkv, implementation, window):
  """With padding lengths, bottom-right alignment follows each row's valid
  lengths (FlashAttention's varlen / KV-cache convention): checked against
  the same attention given as a dense mask built here by hand."""
  q, k, v = qkv
  q_len = np.array([T, T - 6])
  kv_len = np.array([S - 3, S - 9])
  offset = (kv_len - q_len)[:, None, None, None]
  i = np.arange(T)[None, None, :, None]
  j = np.arange(S)[None, None, None, :]
  left = None if window is None else window[0]   # causal: no key right of it
  allowed = (j < kv_len[:, None, None, None]) & (j <= i + offset)
  if left is not None:
    allowed &= j >= i + offset - left
  attend = lambda q, **kwargs: flash_jax.dot_product_attention(  # noqa: E731
      q, k, v, query_seq_lengths=jnp.asarray(q_len, jnp.int32),
      implementation=implementation, block_sizes=flash_jax.BlockSizes(
          block_q=16, block_kv=16), **kwargs)
  aligned = attend(q, is_causal=True, local_window_size=window,
                   causal_alignment="bottom_right",
                   key_value_seq_lengths=jnp.asarray(kv_len, jnp.int32))
  dense = attend(q, mask=jnp.asarray(allowed))
  np.testing.assert_allclose(aligned, dense, rtol=1e-5, atol=1e-6)
  # Decode (T = 1): the one query sees every valid key.
  decode = flash_jax.dot_product_attention(
      q[:, -1:], k, v, is_causal=True, causal_alignment="bottom_right",
      key_value_seq_lengths=jnp.asarray(kv_len, jnp.int32),
      implementation=implementation)
  np.testing.assert_allclose(decode, flash_jax.dot_product_attention(
      q[:, -1:], k, v, key_value_seq_lengths=jnp.asarray(kv_len, jnp.int32),
      implementation=implementation), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("field, value", [
    ("block_q", 48), ("block_kv", 8), ("block_q_dq", 0), ("num_warps", 0),
    ("block_kv_dkv", 64.0), ("ping_pong", 1), ("persistent", 1)])
def test_bad_block_sizes(field, value):
  with pytest.raises(ValueError, match=field):
    flash_jax.BlockSizes(**{field: value})


@pytest.mark.parametrize("kwargs, message", [
    (dict(mask=jnp.ones((B, N, T, S))), "boolean array"),
    (dict(mask=jnp.ones((B, N, T, S + 1), bool)), "does not broadcast"),
    (dict(mask=jnp.ones((1, B, N, T, S), bool)), "at most 4 dims"),
    (dict(bias=jnp.ones((B, 3, T, S))), "does not broadcast"),
    (dict(bias=jnp.ones((B, N, T, S), jnp.int32)), "floating"),
    (dict(query_segment_ids=jnp.ones((B, T), jnp.int32)), "together"),
    (dict(query_segment_ids=jnp.ones((B, T)), kv_segment_ids=jnp.ones((B, S))),
     "integer array"),
    (dict(query_segment_ids=jnp.ones((B, S), jnp.int32),
          kv_segment_ids=jnp.ones((B, S), jnp.int32)), "must have shape"),
    (dict(local_window_size=1.5), "local_window_size"),
    (dict(local_window_size=(1, 2, 3)), "local_window_size"),
    (dict(local_window_size=(-1, 2)), "local_window_size"),
    (dict(causal_alignment="bottom"), "causal_alignment"),
    (dict(mask_fn=3), "mask_fn must be callable"),
    (dict(mask_fn=lambda b, h, i: i > 0), "mask_fn.*failed"),
    (dict(mask_fn=lambda b, h, i, j: (i - j).astype(jnp.float32)),
     "must return one bool"),
    (dict(mask_fn=lambda b, h, i, j: j < jnp.array([3, 9])[b]),
     "captures array values"),
    (dict(mask_fn=lambda b, h, i, j, prefix=jnp.int32(3): j < prefix),
     "captures array"),
    (dict(logits_soft_cap=0.0), "logits_soft_cap must be > 0"),
    (dict(logits_soft_cap=-2.0), "logits_soft_cap must be > 0"),
    (dict(dropout_rate=1.0, dropout_rng=jax.random.key(0)), r"\[0, 1\)"),
    (dict(dropout_rate=-0.1, dropout_rng=jax.random.key(0)), r"\[0, 1\)"),
    (dict(dropout_rate=0.1), "needs a dropout_rng"),
    # 8-bit draws: 0.001 would round to no dropout, 0.999 to dropping all.
    (dict(dropout_rate=0.001, dropout_rng=jax.random.key(0)), "rounds to 0"),
    (dict(dropout_rate=0.999, dropout_rng=jax.random.key(0)), "rounds to 256"),
])
def test_bad_feature_arguments_raise_value_error(qkv, kwargs, message):
  with pytest.raises(ValueError, match=message):
    flash_jax.dot_product_attention(*qkv, **kwargs)


@pytest.mark.parametrize("kwargs", [
    dict(bias=jnp.ones((1, 1, T, S))),
    dict(mask=jnp.ones((1, 1, T, S), bool)),
    dict(logits_soft_cap=30.0),
    dict(dropout_rate=0.1, dropout_rng=jax.random.key(0)),
    dict(mask_fn=lambda b, h, i, j: j <= i + 2),
], ids=["bias", "mask", "soft_cap", "dropout", "mask_fn"])
def test_kernel_backend_takes_every_feature(qkv, kwargs):
  """No feature makes the Triton backend fall through to the reference:
  with a sequence of implementations, the kernel's result is returned."""
  kernel = flash_jax.dot_product_attention(
      *qkv, implementation="pallas_triton", **kwargs)
  chosen = flash_jax.dot_product_attention(
      *qkv, implementation=["pallas_triton", "xla"], **kwargs)
  np.testing.assert_array_equal(chosen, kernel)


def test_fallthrough_lists_every_reason(qkv, monkeypatch):
  """A named implementation that cannot run is skipped; if none can, the
  error lists each one's reason."""
  monkeypatch.setattr(flash_jax.platform, "compute_capability", lambda: None)
  q, k, v = qkv
  out = flash_jax.dot_product_attention(
      q, k, v, implementation=["cudnn", "xla"])
  expected = flash_jax.dot_product_attention(q, k, v, implementation="xla")
  np.testing.assert_array_equal(out, expected)
  with pytest.raises(NotImplementedError) as info:
    flash_jax.dot_product_attention(q, k, v, implementation=[
        "cudnn", "pallas_triton"], interpret=False)
  assert "cudnn: cudnn needs an NVIDIA GPU" in str(info.value)
  assert "pallas_triton: pallas_triton: needs an NVIDIA GPU" in str(info.value)


def test_auto_implementation_on_cpu_is_xla(qkv, monkeypatch):
  """With no GPU, implementation=None runs the XLA reference, not the
  Pallas interpreter."""
  if jax.default_backend() == "gpu":
    pytest.skip("checks the CPU default")
  chosen = []
  original = api.flash_attention

  def record(config, *args):
    chosen.append(config.implementation)
    return original(config, *args)

  monkeypatch.setattr(api, "flash_attention", record)
  flash_jax.dot_product_attention(*qkv)
  assert chosen == ["xla"]


@pytest.mark.parametrize("capability, dtype, expected", [
    ((9, 0), jnp.bfloat16, "pallas_mosaic_gpu"),
    ((9, 0), jnp.float32, "pallas_triton"),   # Hopper backend declines f32
    ((8, 0), jnp.bfloat16, "pallas_triton"),
])
def test_auto_implementation_per_gpu(qkv, monkeypatch, capability, dtype,
                                     expected):
  """implementation=None takes the Hopper backend on sm90 and the Triton
  backend elsewhere (or where the Hopper one declines), without warning."""
  chosen = _record_choice_on(monkeypatch, capability)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    with pytest.raises(_Stop):
      flash_jax.dot_product_attention(*(x.astype(dtype) for x in qkv[:3]))
  assert chosen == [expected]


def test_auto_implementation_warns_when_a_gpu_call_falls_back_to_xla(
    qkv, monkeypatch):
  """On a GPU neither Pallas backend can use (sm70), implementation=None
  runs the XLA reference and says why."""
  chosen = _record_choice_on(monkeypatch, (7, 0))
  with pytest.warns(UserWarning, match="falls back to the O.T.S.-memory XLA "
                    "reference: pallas_mosaic_gpu: .*sm70.*pallas_triton: "
                    ".*compute capability 8.0"):
    with pytest.raises(_Stop):
      flash_jax.dot_product_attention(*(x.astype(jnp.bfloat16)
                                        for x in qkv[:3]))
  assert chosen == ["xla"]


class _Stop(Exception):
  pass


def _record_choice_on(monkeypatch, capability) -> list[str]:
  """Fakes a GPU of ``capability`` and stops each call at the custom_vjp
  (the kernels cannot run on this machine); the returned list collects the
  implementation dispatch chose."""
  chosen = []

  def record(config, *args):
    chosen.append(config.implementation)
    raise _Stop

  monkeypatch.setattr(flash_jax.platform, "compute_capability",
                      lambda: capability)
  monkeypatch.setattr(api, "flash_attention", record)
  return chosen


def test_reference_matches_jax_nn(qkv):
  """The oracle agrees with jax.nn wherever jax.nn's semantics coincide."""
  q, k, v = qkv
  q_lengths = jnp.array([T, 5], jnp.int32)
  kv_lengths = jnp.array([S, 9], jnp.int32)
  for causal in (False, True):
    kwargs = dict(is_causal=causal, query_seq_lengths=q_lengths,
                  key_value_seq_lengths=kv_lengths)
    ours = flash_jax.reference.dot_product_attention(q, k, v, **kwargs)
    with jax.default_matmul_precision("highest"):  # no TF32 on GPUs
      theirs = jax.nn.dot_product_attention(q, k, v, implementation="xla",
                                            **kwargs)
    np.testing.assert_allclose(ours, theirs, rtol=2e-5, atol=2e-5)
    ours_lse = flash_jax.reference.dot_product_attention(
        q, k, v, return_residual=True, is_causal=causal)[1]
    with jax.default_matmul_precision("highest"):
      theirs_lse = jax.nn.dot_product_attention(
          q, k, v, implementation="xla", return_residual=True,
          is_causal=causal)[1]
    np.testing.assert_allclose(ours_lse, theirs_lse, rtol=2e-5, atol=2e-5)


def test_float32_products_follow_the_default_matmul_precision():
  """Compiled kernels multiply float32 with three TF32 products unless the
  caller asks for full precision; interpret mode is always full precision."""
  from flash_jax.backends.pallas_triton import common
  q = jnp.ones((1, 4, 1, 8), jnp.float32)

  def products():
    return flash_jax.api.canonicalize(q, q, q).config.float32_products

  assert products() == "tf32x3"
  for level in ("highest", "float32"):
    with jax.default_matmul_precision(level):
      assert products() == "ieee"
  with jax.default_matmul_precision("tensorfloat32"):
    assert products() == "tf32x3"   # Never below tf32x3.
  params = lambda dtype, interpret, products: common.KernelParams(
      1, 4, 4, 1, 1, 8, 8, dtype, flash_jax.masks.MaskSpec(), 1.0, 16, 16,
      4, 2, interpret, float32_products=products)
  assert (params(jnp.float32, False, "tf32x3").dot_precision
          == jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3)
  assert (params(jnp.float32, False, "ieee").dot_precision
          == jax.lax.Precision.HIGHEST)
  assert (params(jnp.float32, True, "tf32x3").dot_precision
          == jax.lax.Precision.HIGHEST)
  assert params(jnp.bfloat16, False, "tf32x3").dot_precision is None
  with pytest.raises(ValueError, match="float32_products"):
    flash_jax.config.AttentionConfig(flash_jax.masks.MaskSpec(), 1.0, "",
                                     float32_products="tf32")


def test_deterministic_false_reaches_the_config_and_triton_ignores_it(
    rng, monkeypatch):
  """``deterministic=False`` reaches the backend's config; it only permits
  a nondeterministic backward, and the Triton backend has none, so its
  gradients are bitwise those of the default (interpret mode on CPU,
  compiled kernels on a GPU)."""
  q, k, v, do = draw_inputs(rng, Case(2, 37, 50, 4, 2, 32, 32, True,
                                      "float32"))

  def grads(deterministic):
    fn = lambda *b: flash_jax.dot_product_attention(
        *b, is_causal=True, implementation="pallas_triton",
        deterministic=deterministic)
    out, pull = jax.vjp(fn, q, k, v)
    return jax.tree.leaves((out, pull(do)))

  for a, b in zip(grads(True), grads(False)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  configs = []
  original = api.flash_attention
  monkeypatch.setattr(api, "flash_attention",
                      lambda config, *a: configs.append(config) or original(
                          config, *a))
  for deterministic in (True, False):
    flash_jax.dot_product_attention(q, k, v, implementation="xla",
                                    deterministic=deterministic)
  assert [c.deterministic for c in configs] == [True, False]


def test_hopper_backend_takes_alignment_to_lengths(qkv, monkeypatch):
  """Bottom-right alignment to padding lengths reaches the Mosaic kernels
  (their element mask and block ranges take each row's ``kv_len - q_len``
  offset) on an sm90 GPU; without lengths it is the static ``S - T``."""
  from flash_jax.backends import pallas_mosaic_gpu
  q, k, v = (x.astype(jnp.bfloat16) for x in qkv)
  lengths = jnp.array([S - 2, S], jnp.int32)
  call = api.canonicalize(q, k, v, is_causal=True,
                          causal_alignment="bottom_right",
                          key_value_seq_lengths=lengths)
  assert call.config.mask.align_to_lengths
  assert call.config.mask.diagonal_offset == 0
  monkeypatch.setattr(flash_jax.platform, "compute_capability",
                      lambda: (9, 0))
  config = dataclasses.replace(call.config, interpret=False)
  pallas_mosaic_gpu.check_supported(config, call.query, call.key,
                                    call.value, None, call.arrays)
  plain = api.canonicalize(q, k, v, is_causal=True,
                           causal_alignment="bottom_right")
  assert not plain.config.mask.align_to_lengths
  assert plain.config.mask.diagonal_offset == S - T
