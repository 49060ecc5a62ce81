"""Masks, bias, segment ids, windows, alignment, mask_fn, soft-cap and
dropout: the reference's semantics against independent constructions, and
every implementation that takes them against the reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flash_jax
from helpers import Case, draw_inputs, max_abs_error

B, T, S, N, K, H = 2, 37, 53, 4, 2, 32


@pytest.fixture
def qkv(rng):
  q, k, v, do = draw_inputs(rng, Case(B, T, S, N, K, H, H, False, "float32"))
  return q, k, v, do


def _plain(q, k, v, *, allowed=None, bias=None, cap=None, probs_fn=None):
  """Attention written out with jax.nn.softmax and a dense boolean mask."""
  groups = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
  logits = jnp.einsum("btnh,bsnh->bnts", q, k,
                      precision="highest") / np.sqrt(q.shape[-1])
  if bias is not None:
    logits = logits + bias
  if cap is not None:
    logits = cap * jnp.tanh(logits / cap)
  if allowed is None:
    allowed = jnp.ones(logits.shape, bool)
  allowed = jnp.broadcast_to(allowed, logits.shape)
  probs = jax.nn.softmax(jnp.where(allowed, logits, -1e30), axis=-1)
  probs = jnp.where(allowed.any(-1, keepdims=True), probs, 0)
  if probs_fn is not None:
    probs = probs_fn(probs)
  return jnp.einsum("bnts,bsnh->btnh", probs, v, precision="highest")


def _close(a, b, tol=2e-5):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


def _attend(q, k, v, **kwargs):
  return flash_jax.dot_product_attention(q, k, v, implementation="xla",
                                         **kwargs)


def test_dense_mask_and_bias_match_plain_attention(qkv, rng):
  q, k, v, _ = qkv
  mask = jax.random.bernoulli(rng, 0.7, (B, 1, T, S))
  bias = jax.random.normal(jax.random.fold_in(rng, 1), (1, N, T, S))
  _close(_attend(q, k, v, mask=mask, bias=bias),
         _plain(q, k, v, allowed=mask, bias=bias))
  with jax.default_matmul_precision("highest"):
    expected = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask,
                                            is_causal=True)
  out = _attend(q, k, v, mask=mask, bias=bias, is_causal=True)
  # jax.nn averages the values on rows with no attended key; we give 0.
  causal = jnp.arange(S)[None, :] <= jnp.arange(T)[:, None]
  attends = jnp.any(mask & causal, axis=-1)            # [B, 1, T]
  attends = jnp.swapaxes(attends, 1, 2)[..., None]     # [B, T, 1, 1]
  _close(jnp.where(attends, out, 0), jnp.where(attends, expected, 0))
  assert not jnp.any(jnp.where(attends, 0, out))


@pytest.mark.parametrize("window", [3, (5, 0), (0, 7), (20, 2)])
def test_local_window_matches_jax_nn(qkv, window):
  q, k, v, _ = qkv
  with jax.default_matmul_precision("highest"):
    expected = jax.nn.dot_product_attention(q, k, v,
                                            local_window_size=window)
  _close(_attend(q, k, v, local_window_size=window), expected)


def test_bottom_right_causal_aligns_the_last_query_with_the_last_key(qkv):
  q, k, v, _ = qkv
  offset = S - T
  allowed = jnp.arange(S)[None, :] <= jnp.arange(T)[:, None] + offset
  out = _attend(q, k, v, is_causal=True, causal_alignment="bottom_right")
  _close(out, _plain(q, k, v, allowed=allowed))
  # The last query sees every key: plain (unmasked) attention for that row.
  _close(out[:, -1], _plain(q, k, v)[:, -1])
  # Bottom-right windows move with the diagonal too.
  allowed &= jnp.arange(S)[None, :] >= jnp.arange(T)[:, None] + offset - 4
  _close(_attend(q, k, v, is_causal=True, local_window_size=(4, 0),
                 causal_alignment="bottom_right"),
         _plain(q, k, v, allowed=allowed))


def test_segment_ids_with_causal(qkv, rng):
  q, k, v, _ = qkv
  q_seg = jnp.sort(jax.random.randint(rng, (B, T), 0, 4), axis=1)
  kv_seg = jnp.sort(jax.random.randint(jax.random.fold_in(rng, 1), (B, S),
                                       0, 4), axis=1)
  allowed = (q_seg[:, None, :, None] == kv_seg[:, None, None, :]) & (
      jnp.arange(S)[None, :] <= jnp.arange(T)[:, None])
  _close(_attend(q, k, v, is_causal=True, query_segment_ids=q_seg,
                 kv_segment_ids=kv_seg), _plain(q, k, v, allowed=allowed))


def test_mask_fn_prefix_lm_with_segments(qkv, rng):
  q, k, v, _ = qkv
  prefix = 9
  mask_fn = lambda b, h, i, j: (j < prefix) | (j <= i)
  seg = jnp.sort(jax.random.randint(rng, (B, S), 0, 3), axis=1)
  allowed = ((jnp.arange(S)[None, :] < prefix) |
             (jnp.arange(S)[None, :] <= jnp.arange(T)[:, None])) & (
                 seg[:, None, :T, None] == seg[:, None, None, :])
  _close(_attend(q, k, v, mask_fn=mask_fn, query_segment_ids=seg[:, :T],
                 kv_segment_ids=seg), _plain(q, k, v, allowed=allowed))


def test_mask_fn_sees_batch_and_head(qkv):
  q, k, v, _ = qkv
  mask_fn = lambda b, h, i, j: (j + b + h) % 3 != 0
  b = jnp.arange(B)[:, None, None, None]
  h = jnp.arange(N)[None, :, None, None]
  allowed = (jnp.arange(S)[None, None, None, :] + b + h) % 3 != 0
  _close(_attend(q, k, v, mask_fn=mask_fn), _plain(q, k, v, allowed=allowed))


def test_soft_cap_forward_and_gradient(qkv):
  q, k, v, do = qkv
  q = q * 4  # logits large enough for the cap to bite
  cap = 5.0
  _close(_attend(q, k, v, logits_soft_cap=cap), _plain(q, k, v, cap=cap))
  grads = jax.vjp(lambda *a: _attend(*a, logits_soft_cap=cap), q, k, v)[1](do)
  expected = jax.vjp(lambda *a: _plain(*a, cap=cap), q, k, v)[1](do)
  for g, e in zip(grads, expected):
    _close(g, e, tol=1e-4)


@pytest.mark.parametrize("bias_shape", [(B, N, T, S), (1, N, T, S),
                                        (B, 1, T, S), (1, 1, 1, S)])
def test_bias_gradient_has_the_bias_shape(qkv, rng, bias_shape):
  q, k, v, do = qkv
  bias = jax.random.normal(rng, bias_shape)
  loss = lambda attend, b: jnp.sum(attend(q, k, v, bias=b) * do)
  dbias = jax.grad(lambda b: loss(_attend, b))(bias)
  with jax.default_matmul_precision("highest"):
    expected = jax.grad(lambda b: loss(jax.nn.dot_product_attention, b))(bias)
  assert dbias.shape == bias_shape
  _close(dbias, expected, tol=1e-4)


def test_fully_masked_rows_are_zero_without_nan(qkv):
  """A row whose keys are all masked (by the dense mask, a window or
  segments) gives 0, lse -inf and zero gradients."""
  q, k, v, do = qkv
  mask = jnp.ones((B, 1, T, S), bool).at[:, :, 5].set(False)
  q_seg = jnp.zeros((B, T), jnp.int32).at[:, 7].set(9)
  kv_seg = jnp.zeros((B, S), jnp.int32)
  fn = lambda *a: _attend(*a, mask=mask, query_segment_ids=q_seg,
                          kv_segment_ids=kv_seg, return_residual=True)
  (out, lse), pull = jax.vjp(fn, q, k, v)
  dq, dk, dv = pull((do, jnp.ones_like(lse)))
  for row in (5, 7):
    assert not jnp.any(out[:, row]) and jnp.all(lse[:, row] == -jnp.inf)
    assert not jnp.any(dq[:, row])
  for x in (out, dq, dk, dv):
    assert not jnp.any(jnp.isnan(x))


class TestDropout:
  """In-kernel-style dropout from the Philox hash."""

  # Random123's published Philox-4x32 vectors: three (counter, key) inputs
  # and their outputs at the standard 10 rounds and at the 7 the dropout
  # contract uses.
  PHILOX_INPUTS = [
      ((0, 0, 0, 0), (0, 0)),
      ((0xffffffff,) * 4, (0xffffffff,) * 2),
      ((0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344),
       (0xa4093822, 0x299f31d0)),
  ]
  PHILOX_OUTPUTS = {
      10: [(0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8),
           (0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd),
           (0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1)],
      7: [(0x5f6fb709, 0x0d893f64, 0x4f121f81, 0x4f730a48),
          (0x5207ddc2, 0x45165e59, 0x4d8ee751, 0x8c52f662),
          (0x4dfccaba, 0x190a87f0, 0xc47362ba, 0xb6b5242a)],
  }

  @pytest.mark.parametrize("rounds", [10, 7])
  def test_philox_known_answers(self, rounds):
    """Philox-4x32-10 (`philox4x32`'s default) and Philox-4x32-7 (the
    dropout contract's `flash_jax.dropout.DROPOUT_ROUNDS`) against
    Random123's vectors."""
    dropout = flash_jax.dropout
    assert dropout.DROPOUT_ROUNDS == 7
    for (counter, key), expected in zip(self.PHILOX_INPUTS,
                                        self.PHILOX_OUTPUTS[rounds]):
      words = (dropout.philox4x32(counter, key) if rounds == 10
               else dropout.philox4x32(counter, key, rounds=rounds))
      assert tuple(int(w) for w in words) == expected

  def test_emulated_mulhi_is_exact(self, rng):
    a_values = [flash_jax.dropout._M0, flash_jax.dropout._M1, 1, 0xFFFFFFFF]
    b = np.asarray(jax.random.bits(rng, (4096,), jnp.uint32)).astype(np.uint64)
    b[:3] = (0, 1, 2**32 - 1)
    for a in a_values:
      high = flash_jax.dropout.mulhi_emulated(a, jnp.asarray(b, jnp.uint32))
      np.testing.assert_array_equal(np.asarray(high, np.uint64),
                                    (np.uint64(a) * b) >> np.uint64(32))

  def test_kernel_tile_form_equals_per_element_form(self, rng):
    """`keep_tile` (one Philox call per sixteen keys, broadcast over the
    accumulator-shaped order as the kernels do) gives the bits of
    `keep_from_indices` element by element."""
    seed = flash_jax.dropout.seed_words(rng)
    q_idx = jnp.arange(37, 37 + 16, dtype=jnp.uint32)
    kept = []
    for kv_start, width in [(0, 16), (112, 16), (96, 32), (192, 64),
                            (1024, 128), (256, 256)]:
      tile = flash_jax.dropout.keep_tile(seed, 0.5, 3, 5, q_idx, kv_start,
                                         width)
      kv_idx = kv_start + jnp.arange(width, dtype=jnp.uint32)
      expected = flash_jax.dropout.keep_from_indices(
          seed, 0.5, jnp.uint32(3), jnp.uint32(5), q_idx[:, None],
          kv_idx[None, :])
      np.testing.assert_array_equal(tile, expected)
      # Kernels pass a traced start (block index * width).
      traced = jax.jit(lambda start, width=width: flash_jax.dropout.keep_tile(
          seed, 0.5, 3, 5, q_idx, start, width))(jnp.int32(kv_start))
      np.testing.assert_array_equal(traced, expected)
      kept.append(np.asarray(tile).ravel())
    # 8448 draws (sigma 0.0054): 0.025 is 4.6 sigma, a 4e-6 false alarm.
    assert abs(np.concatenate(kept).mean() - 0.5) < 0.025
    for kv_start, width, message in [(0, 48, "must be 16, 32"),
                                     (8, 16, "not a multiple of 16"),
                                     (32, 64, "not a multiple of 64")]:
      with pytest.raises(ValueError, match=message):
        flash_jax.dropout.keep_tile(seed, 0.5, 0, 0, q_idx, kv_start, width)

  def test_sixteen_keys_share_a_call_in_accumulator_order(self, rng):
    """In key group g, key 64g + 8c + 2q + e takes byte 2c + e of the call
    with counter 4g + q, reading the words as little-endian bytes: a draw d
    is kept at exactly the rates whose threshold is at most d."""
    seed = flash_jax.dropout.seed_words(rng)
    group, row = 3, 7
    for quad in range(4):
      words = flash_jax.dropout.philox4x32(
          (4 * group + quad, row, 1, 0), (seed[0], seed[1]),
          rounds=flash_jax.dropout.DROPOUT_ROUNDS)
      draws = np.frombuffer(np.asarray([int(w) for w in words], "<u4")
                            .tobytes(), np.uint8)
      for chunk in range(8):
        for e in range(2):
          key = 64 * group + 8 * chunk + 2 * quad + e
          draw = int(draws[2 * chunk + e])
          for levels in (draw, draw + 1):
            if not 1 <= levels <= 255:
              continue
            kept = bool(flash_jax.dropout.keep_from_indices(
                seed, levels / 256, jnp.uint32(0), jnp.uint32(1),
                jnp.uint32(row), jnp.uint32(key)))
            assert kept == (draw >= levels)

  def test_rate_resolution_is_one_256th(self):
    """Rates round to multiples of 1/256 (half up), kept values scale by the
    inverse keep probability, and unrepresentable rates raise."""
    dropout = flash_jax.dropout
    assert dropout.drop_probability(0.1) == 26 / 256
    assert dropout.drop_probability(0.5) == 0.5
    assert dropout.drop_probability(1 / 512) == 1 / 256
    assert dropout.keep_scale(0.1) == 256 / 230
    assert dropout.keep_scale(0.0) == 1.0
    for rate in (0.0019, 0.9981, 1.0, -0.5):
      with pytest.raises(ValueError, match="rounds to|must be in"):
        dropout.threshold(rate)

  def test_output_equals_reference_fed_the_rebuilt_mask(self, qkv, rng):
    q, k, v, do = qkv
    rate = 0.3
    keep = flash_jax.dropout_keep_mask(rng, rate, (B, N, T, S))
    assert keep.shape == (B, N, T, S) and keep.dtype == jnp.bool_
    fn = lambda *a: _attend(*a, is_causal=True, dropout_rate=rate,
                            dropout_rng=rng)
    causal = jnp.arange(S)[None, :] <= jnp.arange(T)[:, None]
    dropped = lambda p: jnp.where(
        keep, p * flash_jax.dropout.keep_scale(rate), 0)
    plain = lambda *a: _plain(*a, allowed=causal, probs_fn=dropped)
    out, pull = jax.vjp(fn, q, k, v)
    expected, pull_expected = jax.vjp(plain, q, k, v)
    _close(out, expected)
    for g, e in zip(pull(do), pull_expected(do)):
      _close(g, e, tol=1e-4)
    # lse is the undropped one.
    _close(_attend(q, k, v, is_causal=True, dropout_rate=rate,
                   dropout_rng=rng, return_residual=True)[1],
           _attend(q, k, v, is_causal=True, return_residual=True)[1])

  @pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
  def test_kept_fraction(self, rng, rate):
    keep = flash_jax.dropout_keep_mask(rng, rate, (2, 2, 500, 500))
    assert abs(float(keep.mean()) - (1 - rate)) <= 0.01

  def test_masks_differ_across_heads_rows_and_keys(self, rng):
    keep = np.asarray(flash_jax.dropout_keep_mask(rng, 0.5, (2, 3, 64, 64)))
    slices = [keep[b, h] for b in range(2) for h in range(3)]
    for i, a in enumerate(slices):
      for b in slices[i + 1:]:
        # Independent halves agree on about half the elements.
        assert 0.4 < (a == b).mean() < 0.6
    other = np.asarray(flash_jax.dropout_keep_mask(
        jax.random.fold_in(rng, 1), 0.5, (2, 3, 64, 64)))
    assert 0.4 < (keep == other).mean() < 0.6
    broadcast = flash_jax.dropout_keep_mask(rng, 0.5, (2, 3, 64, 64),
                                            broadcast=True)
    assert broadcast.shape == (1, 1, 64, 64)

  def test_same_key_is_bitwise_identical_and_rate_zero_is_no_dropout(
      self, qkv, rng):
    q, k, v, _ = qkv
    first = _attend(q, k, v, dropout_rate=0.2, dropout_rng=rng)
    second = _attend(q, k, v, dropout_rate=0.2, dropout_rng=rng)
    np.testing.assert_array_equal(first, second)
    assert max_abs_error(first, _attend(q, k, v)) > 1e-3
    np.testing.assert_array_equal(
        _attend(q, k, v, dropout_rate=0.0, dropout_rng=rng), _attend(q, k, v))

  def test_broadcast_dropout_shares_the_mask(self, qkv, rng):
    q, k, v, _ = qkv
    rate = 0.4
    keep = flash_jax.dropout_keep_mask(rng, rate, (B, N, T, S),
                                       broadcast=True)
    dropped = lambda p: jnp.where(
        keep, p * flash_jax.dropout.keep_scale(rate), 0)
    _close(_attend(q, k, v, dropout_rate=rate, dropout_rng=rng,
                   broadcast_dropout=True),
           _plain(q, k, v, probs_fn=dropped))
