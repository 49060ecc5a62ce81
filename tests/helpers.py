"""Input drawing and FlashAttention's error rule, shared by the test files."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from flash_jax import api, reference


@dataclasses.dataclass(frozen=True)
class Case:
  """One attention problem: shapes, dtype and causality."""

  batch: int
  q_seq: int
  kv_seq: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  value_head_dim: int
  is_causal: bool
  dtype: str

  def __str__(self):
    kind = "causal" if self.is_causal else "full"
    return (f"B{self.batch}-T{self.q_seq}-S{self.kv_seq}-N{self.num_heads}"
            f"-K{self.num_kv_heads}-H{self.head_dim}-Hv{self.value_head_dim}"
            f"-{kind}-{self.dtype}")


def draw_inputs(rng, case: Case, scale: float = 1.0):
  """Random normal query, key, value and output cotangent (never zeros)."""
  dtype = jnp.dtype(case.dtype)
  kq, kk, kv, kdo = jax.random.split(rng, 4)
  q = jax.random.normal(kq, (case.batch, case.q_seq, case.num_heads,
                             case.head_dim), jnp.float32) * scale
  k = jax.random.normal(kk, (case.batch, case.kv_seq, case.num_kv_heads,
                             case.head_dim), jnp.float32) * scale
  v = jax.random.normal(kv, (case.batch, case.kv_seq, case.num_kv_heads,
                             case.value_head_dim), jnp.float32)
  do = jax.random.normal(kdo, (case.batch, case.q_seq, case.num_heads,
                               case.value_head_dim), jnp.float32)
  return tuple(x.astype(dtype) for x in (q, k, v, do))


def packed_segment_ids(rng, q_seq: int, kv_seq: int, *, batch: int = 2,
                       num_ids: int = 4):
  """Sorted random segment ids ``[batch, T]`` and ``[batch, S]`` (packed
  documents of random lengths, drawn fresh from ``rng``)."""
  kq, kk = jax.random.split(jax.random.fold_in(rng, 77))
  draw = lambda key, seq: jnp.sort(
      jax.random.randint(key, (batch, seq), 0, num_ids), axis=1)
  return draw(kq, q_seq), draw(kk, kv_seq)


def max_abs_error(actual, expected) -> float:
  """Max |actual - expected| over finite entries; inf where the -inf
  pattern (empty rows) disagrees."""
  actual = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
  expected = np.asarray(expected, np.float64)
  if np.isnan(actual).any():
    return float("inf")
  inf_a, inf_e = np.isinf(actual), np.isinf(expected)
  if (inf_a != inf_e).any() or (actual[inf_a] != expected[inf_e]).any():
    return float("inf")
  finite = ~inf_e
  if not finite.any():
    return 0.0
  return float(np.max(np.abs(actual[finite] - expected[finite])))


def flash_errors(actual, oracle, plain, *, relative_floor: float = 1e-5):
  """``(err(actual), err(plain), floor)`` of FlashAttention's rule (see
  `assert_flash_close`), errors as max absolute differences from
  ``oracle``."""
  err = max_abs_error(actual, oracle)
  base = max_abs_error(plain, oracle)
  expected = np.asarray(oracle, np.float64)
  magnitude = np.max(np.abs(expected[np.isfinite(expected)]), initial=0.0)
  return err, base, relative_floor * max(1.0, float(magnitude))


def assert_flash_close(actual, oracle, plain, *, factor: float, name: str,
                       relative_floor: float = 1e-5):
  """FlashAttention's rule: ``err(actual) <= factor * err(plain) + floor``.

  ``oracle`` is the reference computed in float64 (so that float32 inputs
  get a meaningful plain error too), ``plain`` the same attention computed
  plainly in the input dtype. The floor (``relative_floor`` of the oracle's
  scale, 1e-5 by default) only matters where ``plain`` happens to be exact,
  e.g. a single key, where the true gradient is 0 and both computations
  return rounding noise.
  """
  err, base, floor = flash_errors(actual, oracle, plain,
                                  relative_floor=relative_floor)
  assert err <= factor * base + floor, (
      f"{name}: error {err:.3e} > {factor} x plain-dtype error {base:.3e} "
      f"+ floor {floor:.1e}")


def _float64(x):
  return jnp.asarray(np.asarray(jnp.asarray(x, jnp.float32), np.float64))


def _oracle_fn(q, k, v, kwargs):
  """The reference in float64 on float64 copies, plus the call's finisher.

  The returned ``attend(q, k, v)`` must run under ``jax.enable_x64``; it
  adds the call's bias (if any) in float64 too.
  """
  kwargs = dict(kwargs)
  return_residual = kwargs.pop("return_residual", False)
  call = api.canonicalize(q, k, v, **kwargs)
  if not call.had_batch_dim:
    raise ValueError("the oracle expects batched (4-D) inputs")

  def attend(q, k, v):
    bias = None if call.bias is None else _float64(call.bias)
    out, lse = reference.attention(q, k, v, bias, call.arrays,
                                   config=call.config,
                                   compute_dtype=jnp.float64)
    return call.finish(out, lse, return_residual)

  return call, attend


def oracle(q, k, v, **kwargs):
  """The float64 oracle of `flash_jax.dot_product_attention(q, k, v, ...)`."""
  call, attend = _oracle_fn(q, k, v, kwargs)
  with jax.enable_x64(True):
    result = attend(*(_float64(x) for x in (call.query, call.key, call.value)))
    return jax.tree.map(np.asarray, result)


def oracle_grads(q, k, v, do, **kwargs):
  """Gradients of the float64 oracle for output cotangent ``do``."""
  _, attend = _oracle_fn(q, k, v, kwargs)
  with jax.enable_x64(True):
    _, grads = vjp_triple(attend, *(_float64(x) for x in (q, k, v, do)))
    return tuple(np.asarray(g) for g in grads)


def reference_pair(q, k, v, **kwargs):
  """The float64 oracle and the plain same-dtype attention of one call."""
  plain = reference.dot_product_attention(q, k, v, compute_dtype=q.dtype,
                                          **kwargs)
  return oracle(q, k, v, **kwargs), plain


def vjp_triple(fn, q, k, v, do):
  """``(out, (dq, dk, dv))`` of ``fn`` for output cotangent ``do``."""
  out, pull = jax.vjp(fn, q, k, v)
  return out, pull(do)


def reference_grad_pair(q, k, v, do, **kwargs):
  """Gradients of the float64 oracle and of the plain same-dtype attention."""
  plain = vjp_triple(
      lambda *a: reference.dot_product_attention(
          *a, compute_dtype=q.dtype, **kwargs), q, k, v, do)[1]
  return oracle_grads(q, k, v, do, **kwargs), plain


def bias_grad_pair(q, k, v, do, bias, **kwargs):
  """dbias of the float64 oracle and of the plain same-dtype attention, for
  output cotangent ``do`` (``bias`` 4-D, so its canonical form is itself)."""
  call, _ = _oracle_fn(q, k, v, dict(kwargs, bias=bias))
  assert call.bias.shape == bias.shape

  def oracle_out(b):
    out, lse = reference.attention(
        *(_float64(x) for x in (call.query, call.key, call.value)), b,
        call.arrays, config=call.config, compute_dtype=jnp.float64)
    return out

  with jax.enable_x64(True):
    _, pull = jax.vjp(oracle_out, _float64(bias))
    oracle_dbias = np.asarray(pull(_float64(do))[0])
  _, pull = jax.vjp(lambda b: reference.dot_product_attention(
      q, k, v, b, compute_dtype=q.dtype, **kwargs), bias)
  return oracle_dbias, pull(do)[0]


def use_forward_params(monkeypatch, derive=None, **fields) -> None:
  """Makes the Hopper backend build its forward's `ForwardParams` with
  ``fields`` replaced, then the fields ``derive(params)`` returns, if
  given (the backward keeps its own). Clears jit traces (the backend's
  jitted forward caches by config); `monkeypatch.undo()` restores, after
  which the caller clears them again."""
  from flash_jax.backends import pallas_mosaic_gpu as mosaic
  shipped = mosaic._params

  def params(*args, forward, **kwargs):
    p = shipped(*args, forward=forward, **kwargs)
    if not forward:
      return p
    p = dataclasses.replace(p, **fields)
    return dataclasses.replace(p, **derive(p)) if derive else p
  monkeypatch.setattr(mosaic, "_params", params)
  jax.clear_caches()


def use_three_consumer_forward(monkeypatch, ping_pong: bool) -> None:
  """`use_forward_params` with three consumer warpgroups
  (`ForwardParams.consumers`; ``ping_pong``: the three take turns) and
  the backend's rescaling for that schedule, as
  `benchmarks/hopper_tile_probe.py`'s ``W3`` tiles do."""
  from flash_jax.backends import pallas_mosaic_gpu as mosaic
  use_forward_params(
      monkeypatch, consumers=3, ping_pong=ping_pong,
      derive=lambda p: mosaic.rescale_fields(p.head_dim, p.ping_pong,
                                             p.mask.is_causal))
