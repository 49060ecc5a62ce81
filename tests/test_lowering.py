"""Lowers every Pallas kernel for CUDA on the CPU machine, under an abstract
H100, so that what interpret mode accepts but the Triton lowering rejects
(non-power-of-two tiles, unsupported primitives, bad indexing) fails CI.

This runs Pallas' Triton lowering (jaxpr -> Triton IR) for sm90; the final
Triton -> PTX compile happens inside XLA on a real GPU (scripts/gpu_check.sh).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractDevice, AbstractMesh

import flash_jax
from flash_jax.config import AttentionConfig, BlockSizes
from flash_jax.masks import MaskArrays, MaskSpec
from flash_jax.vjp import flash_attention

H100 = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                      platform="gpu")
TRITON_CALL = "__gpu$xla.gpu.triton"


def lower_for_h100(fn, *args, mesh: AbstractMesh | None = None) -> str:
  """StableHLO text of ``fn`` lowered for CUDA on an abstract H100 (or on
  ``mesh``, a mesh of abstract H100s)."""
  mesh = mesh or AbstractMesh((1,), ("x",), abstract_device=H100)
  with jax.sharding.use_abstract_mesh(mesh):
    return jax.jit(fn).trace(*args).lower(
        lowering_platforms=("cuda",)).as_text()


def _structs(batch, q_seq, kv_seq, heads, kv_heads, head_dim, value_dim,
             dtype):
  sd = jax.ShapeDtypeStruct
  return (sd((batch, q_seq, heads, head_dim), dtype),
          sd((batch, kv_seq, kv_heads, head_dim), dtype),
          sd((batch, kv_seq, kv_heads, value_dim), dtype))


def _forward_and_backward(config, with_lengths):
  """value_and_grad of a loss on (out, lse): all three kernels."""
  def loss(q, k, v, q_lengths, kv_lengths):
    if not with_lengths:
      q_lengths = kv_lengths = None
    out, lse = flash_attention(config, q, k, v, None,
                               MaskArrays(q_lengths, kv_lengths))
    return jnp.sum(out.astype(jnp.float32)) + jnp.sum(
        jnp.where(jnp.isfinite(lse), lse, 0.0))
  return jax.value_and_grad(loss, argnums=(0, 1, 2))


LOWERING_CASES = [
    # (B, T, S, N, K, H, Hv, causal, dtype, lengths, block sizes)
    (2, 4096, 4096, 16, 16, 128, 128, True, jnp.bfloat16, False, None),
    (2, 1023, 1024, 4, 1, 256, 256, False, jnp.bfloat16, True, None),
    (1, 113, 203, 4, 2, 111, 111, True, jnp.float16, True, None),
    (3, 97, 97, 2, 2, 40, 40, False, jnp.float32, False, None),
    (2, 1, 1, 4, 1, 64, 64, True, jnp.bfloat16, False, None),
    (2, 17, 33, 8, 2, 59, 200, True, jnp.float32, True, None),
    (1, 500, 700, 4, 4, 64, 64, True, jnp.bfloat16, True,
     flash_jax.BlockSizes(block_q=64, block_kv=128, block_q_dkv=64,
                          block_kv_dkv=64, block_q_dq=32, block_kv_dq=64,
                          num_warps=4, num_stages=2)),
]


WINDOWED = {
    # A sliding window, and a bottom-right aligned causal window (T < S).
    "window": MaskSpec(is_causal=True, window_left=1024, window_right=0),
    "bottom_right": MaskSpec(is_causal=True, diagonal_offset=4096 - 512,
                             window_left=300, window_right=None),
    # Bottom-right per batch row (offset kv_len - q_len, from the lengths).
    "bottom_right_to_lengths": MaskSpec(is_causal=True, align_to_lengths=True,
                                        window_left=300, window_right=None),
}


@pytest.mark.parametrize("case", LOWERING_CASES, ids=lambda c: "-".join(
    str(getattr(x, "__name__", x)) for x in c[:10]))
def test_kernels_lower_for_h100(case):
  *dims, causal, dtype, with_lengths, block_sizes = case
  _lower_all_kernels(MaskSpec(is_causal=causal), dims, dtype, with_lengths,
                     block_sizes)


@pytest.mark.parametrize("name", sorted(WINDOWED))
def test_windowed_kernels_lower_for_h100(name):
  _lower_all_kernels(WINDOWED[name], (1, 512, 4096, 8, 2, 128, 128),
                     jnp.bfloat16, True, None)


def _lower_all_kernels(spec, dims, dtype, with_lengths, block_sizes):
  config = AttentionConfig(mask=spec, scale=0.125,
                           implementation="pallas_triton", interpret=False,
                           block_sizes=block_sizes)
  q, k, v = _structs(*dims, dtype)
  lengths = jax.ShapeDtypeStruct((dims[0],), jnp.int32)
  text = lower_for_h100(_forward_and_backward(config, with_lengths), q, k, v,
                        lengths, lengths)
  # The forward, dK/dV and dQ kernels, each a Triton custom call.
  assert text.count(TRITON_CALL) == 3, text.count(TRITON_CALL)


def test_lowering_catches_what_interpret_mode_accepts():
  """The check is real: a 48-row tile interprets fine but cannot lower."""
  from jax.experimental import pallas as pl

  def double(x):
    return pl.pallas_call(
        lambda x_ref, o_ref: o_ref.__setitem__(..., x_ref[...] * 2),
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), grid=(2,),
        in_specs=[pl.BlockSpec((48, 128), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((48, 128), lambda i: (i, 0)),
        interpret=False)(x)

  x = jax.ShapeDtypeStruct((96, 128), jnp.float32)
  with pytest.raises(ValueError, match="power of 2"):
    lower_for_h100(double, x)


def _prefix_lm(batch, head, q_idx, kv_idx):
  del batch, head
  return (kv_idx <= q_idx) | (kv_idx < 64)


# (B, T, S, N, K, H, Hv, dtype, bias shape or None, extra semantics)
FEATURE_CASES = {
    "bias_heads_mask_causal": (
        2, 1000, 1000, 8, 2, 128, 128, jnp.bfloat16, (1, 8, 1000, 1000),
        dict(is_causal=True, mask=(2, 1, 1, 1000))),
    "full_bias_window_f32": (
        2, 97, 113, 4, 4, 40, 40, jnp.float32, (2, 4, 97, 113),
        dict(local_window_size=(16, 8))),
    "row_bias_broadcast_dropout": (
        2, 256, 300, 4, 1, 64, 64, jnp.bfloat16, (1, 1, 1, 300),
        dict(dropout_rate=0.1, broadcast_dropout=True)),
    "segments_causal_lengths": (
        2, 1023, 1024, 4, 2, 64, 64, jnp.bfloat16, None,
        dict(is_causal=True, segments=True, lengths=True)),
    "mask_fn_gqa": (
        1, 513, 513, 8, 2, 128, 128, jnp.float16, None,
        dict(mask_fn=_prefix_lm)),
    "soft_cap_dropout": (
        2, 200, 177, 4, 2, 111, 96, jnp.float16, None,
        dict(logits_soft_cap=30.0, dropout_rate=0.2, is_causal=True)),
    "bias_bottom_right_to_lengths": (
        2, 97, 203, 4, 2, 64, 64, jnp.bfloat16, (2, 4, 97, 203),
        dict(is_causal=True, causal_alignment="bottom_right", lengths=True)),
    "everything": (
        2, 300, 300, 4, 2, 64, 64, jnp.bfloat16, (2, 1, 300, 300),
        dict(is_causal=True, segments=True, mask=(1, 4, 300, 300),
             mask_fn=_prefix_lm, logits_soft_cap=20.0, dropout_rate=0.1,
             lengths=True)),
}


@pytest.mark.parametrize("name", sorted(FEATURE_CASES))
def test_feature_kernels_lower_for_h100(name):
  """Bias (and dbias), dense masks, segment ids, mask_fn, soft-cap and
  dropout reach Triton IR in every kernel."""
  from flash_jax import api

  (batch, q_seq, kv_seq, heads, kv_heads, head_dim, value_dim, dtype,
   bias_shape, extra) = FEATURE_CASES[name]
  extra = dict(extra)
  mask_shape = extra.pop("mask", None)
  with_segments = extra.pop("segments", False)
  with_lengths = extra.pop("lengths", False)
  if extra.get("dropout_rate"):
    extra["dropout_rng"] = jax.random.key(0)
  sd = jax.ShapeDtypeStruct
  q, k, v = _structs(batch, q_seq, kv_seq, heads, kv_heads, head_dim,
                     value_dim, dtype)
  bias = None if bias_shape is None else sd(bias_shape, dtype)
  mask = None if mask_shape is None else sd(mask_shape, jnp.bool_)
  q_ids, kv_ids = sd((batch, q_seq), jnp.int32), sd((batch, kv_seq), jnp.int32)
  lengths = sd((batch,), jnp.int32)

  def loss(q, k, v, bias, mask, q_ids, kv_ids, q_lengths, kv_lengths):
    call = api.canonicalize(
        q, k, v, bias=bias, mask=mask,
        query_segment_ids=q_ids if with_segments else None,
        kv_segment_ids=kv_ids if with_segments else None,
        query_seq_lengths=q_lengths if with_lengths else None,
        key_value_seq_lengths=kv_lengths if with_lengths else None, **extra)
    config = dataclasses.replace(call.config, implementation="pallas_triton",
                                 interpret=False)
    out, lse = flash_attention(config, call.query, call.key, call.value,
                               call.bias, call.arrays)
    return jnp.sum(out.astype(jnp.float32)) + jnp.sum(
        jnp.where(jnp.isfinite(lse), lse, 0.0))

  argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
  text = lower_for_h100(jax.value_and_grad(loss, argnums=argnums), q, k, v,
                        bias, mask, q_ids, kv_ids, lengths, lengths)
  # forward, dK/dV, dQ, and dbias with a bias.
  assert text.count(TRITON_CALL) == 3 + (bias is not None)


MOSAIC_CALL = "mosaic_gpu"


@pytest.mark.parametrize("head_dim, default_is_ping_pong", [
    (128, True), (100, True), (64, True), (40, True), (256, False)])
def test_ping_pong_reaches_the_mosaic_forward_kernel(head_dim,
                                                      default_is_ping_pong):
  """BlockSizes(ping_pong=True) gives the Hopper forward kernel whose
  consumers meet at a schedule barrier (more barrier arrivals in its
  jaxpr), False the plain one; None picks per padded head dim (on at 64 and
  128)."""
  q = jax.ShapeDtypeStruct((1, 512, 2, head_dim), jnp.bfloat16)

  def kernel_jaxpr(block_sizes):
    config = AttentionConfig(mask=MaskSpec(is_causal=True), scale=0.1,
                             implementation="pallas_mosaic_gpu",
                             interpret=False, block_sizes=block_sizes)
    return str(jax.make_jaxpr(lambda q, k, v: flash_attention(
        config, q, k, v, None, MaskArrays())[0])(q, q, q))

  plain = kernel_jaxpr(BlockSizes(ping_pong=False))
  ping_pong = kernel_jaxpr(BlockSizes(ping_pong=True))
  assert ping_pong.count("barrier_arrive") > plain.count("barrier_arrive")
  assert ping_pong.count("barrier_wait") > plain.count("barrier_wait")
  default = kernel_jaxpr(None)
  assert default == (ping_pong if default_is_ping_pong else plain)


def _mosaic_forward_case(name: str, *, segments: bool, persistent: bool):
  """``(forward, operands)``: the Hopper forward of ``MOSAIC_CASES[name]``
  with ``BlockSizes(persistent=persistent)`` as a function of q, k, v,
  lengths and segment ids (used where the case or ``segments`` says), and
  abstract operands to lower it with."""
  (batch, q_seq, kv_seq, heads, kv_heads, head_dim, dtype, spec, lengths,
   cap) = MOSAIC_CASES[name]
  q, k, v = _structs(batch, q_seq, kv_seq, heads, kv_heads, head_dim,
                     head_dim, dtype)
  sd = jax.ShapeDtypeStruct
  config = AttentionConfig(
      mask=spec, scale=head_dim ** -0.5, implementation="pallas_mosaic_gpu",
      interpret=False, logits_soft_cap=cap,
      block_sizes=BlockSizes(persistent=persistent))

  def forward(q, k, v, q_lengths, kv_lengths, q_ids, kv_ids):
    arrays = MaskArrays(
        q_lengths if lengths else None, kv_lengths if lengths else None,
        q_segment_ids=q_ids if segments else None,
        kv_segment_ids=kv_ids if segments else None)
    return flash_attention(config, q, k, v, None, arrays)
  operands = (q, k, v, sd((batch,), jnp.int32), sd((batch,), jnp.int32),
              sd((batch, q_seq), jnp.int32), sd((batch, kv_seq), jnp.int32))
  return forward, operands


@pytest.mark.parametrize("segments", [False, True])
@pytest.mark.parametrize("name", ["h64_causal_gqa_tails", "h256_window",
                                  "h40_bottom_right_cap",
                                  "h128_bottom_right_to_lengths"])
def test_persistent_forward_lowers_for_h100(name, segments):
  """The persistent forward grid (`BlockSizes.persistent`) lowers: one CTA
  per SM, Q loaded one tile ahead at head dims up to 128, with segment
  ids, lengths, windows and soft-cap; the per-tile grid stays available."""
  def lowered(persistent):
    forward, operands = _mosaic_forward_case(name, segments=segments,
                                             persistent=persistent)
    return lower_for_h100(forward, *operands)
  persistent, per_tile = lowered(True), lowered(False)
  for text in (persistent, per_tile):
    assert text.count(f"custom_call @{MOSAIC_CALL}") == 1
  assert persistent != per_tile
  # The kernel's index arithmetic stays int32 when Python ints are int64.
  with jax.enable_x64(True):
    assert lowered(True).count(f"custom_call @{MOSAIC_CALL}") == 1


@pytest.mark.parametrize("ping_pong", [False, True])
@pytest.mark.parametrize("persistent", [False, True])
@pytest.mark.parametrize("segments", [False, True])
@pytest.mark.parametrize("name", ["h64_causal_gqa_tails",
                                  "h40_bottom_right_cap"])
def test_three_consumer_forward_lowers_for_h100(name, segments, persistent,
                                                ping_pong, monkeypatch):
  """The forward with three consumer warpgroups (`ForwardParams.consumers`,
  192 query rows per CTA; set where the backend builds the forward's
  parameters, as `benchmarks/hopper_tile_probe.py`'s ``W3`` tiles do)
  lowers with lengths, segment ids, GQA tails, soft-cap, either grid and
  either schedule (with ping-pong the three take turns: more barrier
  waits): four warpgroups, registers split 32 / 160."""
  from helpers import use_three_consumer_forward
  forward, operands = _mosaic_forward_case(name, segments=segments,
                                           persistent=persistent)
  # The backend's jitted forward keeps traces by config: clear them around
  # the patch, so no case sees another's consumer count.
  jax.clear_caches()
  two = lower_for_h100(forward, *operands)

  def trace(schedule: bool, make):
    """``make(forward, *operands)`` with three consumers, ping-pong
    ``schedule``."""
    use_three_consumer_forward(monkeypatch, schedule)
    return make(forward, *operands)
  try:
    jaxprs = {schedule: str(trace(schedule,
                                  lambda f, *a: jax.make_jaxpr(f)(*a)))
              for schedule in (False, True)}
    three = trace(ping_pong, lower_for_h100)
  finally:
    monkeypatch.undo()
    jax.clear_caches()
  assert three.count(f"custom_call @{MOSAIC_CALL}") == 1
  assert three != two
  jaxpr = jaxprs[ping_pong]
  assert "num_threads=4" in jaxpr
  assert "set_max_registers_p[action=increase n=160]" in jaxpr
  assert "set_max_registers_p[action=decrease n=32]" in jaxpr
  assert jaxprs[True].count("barrier_wait") > jaxprs[False].count(
      "barrier_wait")


MOSAIC_CASES = {
    # (B, T, S, N, K, H, dtype, mask spec, lengths, soft-cap)
    "h128": (2, 4096, 4096, 8, 8, 128, jnp.bfloat16, MaskSpec(), False, None),
    "h64_causal_gqa_tails": (2, 1000, 1100, 8, 2, 64, jnp.float16,
                             MaskSpec(is_causal=True), True, None),
    "h256_window": (1, 4096, 4096, 4, 4, 256, jnp.bfloat16,
                    MaskSpec(is_causal=True, window_left=512, window_right=0),
                    True, None),
    "h40_bottom_right_cap": (1, 97, 203, 4, 1, 40, jnp.bfloat16,
                             MaskSpec(is_causal=True, diagonal_offset=106),
                             True, 30.0),
    "h128_bottom_right_to_lengths": (2, 300, 500, 4, 2, 128, jnp.bfloat16,
                                     MaskSpec(is_causal=True,
                                              align_to_lengths=True),
                                     True, None),
    "h256_bottom_right_to_lengths": (2, 300, 500, 4, 2, 256, jnp.bfloat16,
                                     MaskSpec(is_causal=True,
                                              align_to_lengths=True),
                                     True, None),
    # Long enough for three forward consumers by default
    # (`THREE_CONSUMERS_FROM_Q_SEQ`), with GQA and tails.
    "h64_long_gqa_tails": (1, 2100, 2200, 4, 2, 64, jnp.bfloat16, MaskSpec(),
                           True, None),
    # Long enough for a 3-stage backward by default
    # (`LONG_BACKWARD_FROM_Q_SEQ`), with GQA, tails and a soft-cap.
    "h128_long_gqa_tails_cap": (1, 16400, 16500, 4, 2, 128, jnp.bfloat16,
                                MaskSpec(), True, 30.0),
}


@pytest.mark.parametrize("name, ping_pong, deterministic", [
    (name, False, True) for name in sorted(MOSAIC_CASES)] + [
    ("h128", True, True), ("h64_causal_gqa_tails", True, True)] + [
    (name, False, False) for name in sorted(MOSAIC_CASES)] + [
    ("h64_long_gqa_tails", None, True), ("h64_long_gqa_tails", None, False)])
def test_mosaic_gpu_kernels_lower_for_h100(name, ping_pong, deterministic,
                                           monkeypatch):
  """The Hopper backend's forward and backward kernels lower through Mosaic
  GPU, with and without the ping-pong schedule, with the backend's own
  choice (``ping_pong`` None: at ``h64_long_gqa_tails``, on a 4-SM GPU so
  that its grid passes the tiles-per-SM floor, a three-consumer forward),
  and with ``deterministic=False`` (one backward kernel, dQ
  reduce-added into a float32 buffer aliased in place; at head dim 256 the
  backward is the same two `backward_wide` kernels either way)."""
  (batch, q_seq, kv_seq, heads, kv_heads, head_dim, dtype, spec, lengths,
   cap) = MOSAIC_CASES[name]
  config = AttentionConfig(
      mask=spec, scale=head_dim ** -0.5, implementation="pallas_mosaic_gpu",
      interpret=False, logits_soft_cap=cap,
      block_sizes=BlockSizes(ping_pong=ping_pong),
      deterministic=deterministic)
  q, k, v = _structs(batch, q_seq, kv_seq, heads, kv_heads, head_dim,
                     head_dim, dtype)
  length = jax.ShapeDtypeStruct((batch,), jnp.int32)
  if ping_pong is None:
    from flash_jax.backends import pallas_mosaic_gpu
    monkeypatch.setattr(flash_jax.platform, "sm_count",
                        lambda default=132: 4)
    jax.clear_caches()   # the backend's jitted forward caches by config
    assert pallas_mosaic_gpu._params(config, q, k, MaskArrays(),
                                     forward=True).consumers == 3

  def loss(q, k, v, q_lengths, kv_lengths):
    arrays = MaskArrays(q_lengths, kv_lengths) if lengths else MaskArrays()
    out, lse = flash_attention(config, q, k, v, None, arrays)
    return jnp.sum(out.astype(jnp.float32)) + jnp.sum(
        jnp.where(jnp.isfinite(lse), lse, 0.0))

  text = lower_for_h100(jax.value_and_grad(loss, argnums=(0, 1, 2)), q, k, v,
                        length, length)
  if ping_pong is None:
    jax.clear_caches()   # no later test may reuse the 4-SM trace
  mosaic_kernels = text.count(f"custom_call @{MOSAIC_CALL}")
  triton_kernels = text.count(TRITON_CALL)
  aliased = "output_operand_alias" in text
  if deterministic or head_dim > 128:   # head dim 256: always 2 kernels
    assert (mosaic_kernels, triton_kernels, aliased) == (3, 0, False)
  else:
    assert (mosaic_kernels, triton_kernels, aliased) == (2, 0, True)


@pytest.mark.parametrize("head_dim, deterministic, kernels", [
    (128, True, ("forward", "dkv", "dq")),
    (64, False, ("forward", "dkv_dq")),
    (256, True, ("forward", "wide_dkv", "wide_dq")),
])
def test_mosaic_gpu_kernels_carry_their_names(head_dim, deterministic,
                                              kernels):
  """Each Hopper kernel is named (``flash_jax_mosaic_<role>``), so that
  profiles can pick it out (Nsight Compute's ``-k``); none is left
  "anonymous", Pallas' name for a kernel body without one."""
  from flash_jax.backends import pallas_mosaic_gpu as mosaic
  names = {"forward": mosaic._forward.KERNEL_NAME,
           **mosaic._backward.KERNEL_NAMES,
           **{f"wide_{role}": name
              for role, name in mosaic._backward_wide.KERNEL_NAMES.items()}}
  assert len(set(names.values())) == len(names)
  config = AttentionConfig(
      mask=MaskSpec(is_causal=True), scale=head_dim ** -0.5,
      implementation="pallas_mosaic_gpu", interpret=False,
      deterministic=deterministic)
  q, k, v = _structs(1, 300, 333, 2, 1, head_dim, head_dim, jnp.bfloat16)
  loss = lambda q, k, v: jnp.sum(flash_attention(
      config, q, k, v, None, MaskArrays())[0].astype(jnp.float32))
  text = lower_for_h100(jax.grad(loss, argnums=(0, 1, 2)), q, k, v)
  assert text.count(f"custom_call @{MOSAIC_CALL}") == len(kernels)
  for role, name in names.items():
    assert (name + "_mosaic_gpu" in text) == (role in kernels), role
  assert "anonymous" not in text


@pytest.mark.parametrize("head_dim, fields", [
    (64, dict(rescale_threshold=8.0)),       # lazy with ping-pong
    (128, dict(rescale_threshold=0.0)),
    (128, dict(late_rescale=True)),
    (256, dict(rescale_threshold=None)),     # every block, no ping-pong
    (256, dict(late_rescale=True)),
], ids=str)
def test_forward_rescale_variants_lower_for_h100(head_dim, fields,
                                                 monkeypatch):
  """The forward's rescale options (`ForwardParams.rescale_threshold`,
  ``late_rescale``) lower beside the defaults, and reach the kernel (its
  program differs from the default's)."""
  from helpers import use_forward_params
  config = AttentionConfig(
      mask=MaskSpec(is_causal=True), scale=head_dim ** -0.5,
      implementation="pallas_mosaic_gpu", interpret=False)
  q, k, v = _structs(2, 1000, 1100, 4, 2, head_dim, head_dim, jnp.bfloat16)
  forward = lambda q, k, v: flash_attention(config, q, k, v, None,
                                            MaskArrays())[0]
  jax.clear_caches()
  try:
    shipped = lower_for_h100(forward, q, k, v)
    use_forward_params(monkeypatch, **fields)
    variant = lower_for_h100(forward, q, k, v)
  finally:
    monkeypatch.undo()
    jax.clear_caches()
  assert variant.count(f"custom_call @{MOSAIC_CALL}") == 1
  assert variant != shipped


def test_reduction_reserve_is_what_keeps_a_3_stage_h128_forward_out(
    monkeypatch):
  """Pallas sets aside 2 KiB of shared memory for cross-warp reductions,
  which these kernels never use; without it a 3-stage K/V ring fits the
  head-dim-128 forward (one CTA per tile), with it the kernel is over the
  limit (`common.REDUCTION_SCRATCH_BYTES`; a probe option, not a default)."""
  from flash_jax.backends.pallas_mosaic_gpu import common
  from helpers import use_forward_params
  use_forward_params(monkeypatch, stages=3)
  config = AttentionConfig(
      mask=MaskSpec(is_causal=True), scale=128 ** -0.5,
      implementation="pallas_mosaic_gpu", interpret=False,
      block_sizes=BlockSizes(persistent=False))
  q, k, v = _structs(2, 1000, 1100, 4, 2, 128, 128, jnp.bfloat16)
  forward = lambda q, k, v: flash_attention(config, q, k, v, None,
                                            MaskArrays())[0]
  jax.clear_caches()
  try:
    with pytest.raises(ValueError, match="exceeds available shared memory"):
      lower_for_h100(forward, q, k, v)
    monkeypatch.setattr(common, "REDUCTION_SCRATCH_BYTES", 0)
    jax.clear_caches()
    assert f"custom_call @{MOSAIC_CALL}" in lower_for_h100(forward, q, k, v)
  finally:
    monkeypatch.undo()
    jax.clear_caches()


@pytest.mark.parametrize("head_dim, spec, deterministic", [
    (128, MaskSpec(is_causal=True), True),
    (128, MaskSpec(is_causal=True), False),
    (64, MaskSpec(), True),
    (64, MaskSpec(is_causal=True, window_left=300, window_right=0), False),
    (256, MaskSpec(is_causal=True), True),
    (128, MaskSpec(is_causal=True, align_to_lengths=True), True),
    (256, MaskSpec(is_causal=True, align_to_lengths=True), False)])
def test_mosaic_gpu_segment_kernels_lower_for_h100(head_dim, spec,
                                                   deterministic):
  """With segment ids the Hopper kernels (not a fall-through to Triton)
  walk block-map lists: forward and backward lower through Mosaic GPU,
  with GQA, padding lengths and unaligned T and S (at head dim 256 the
  backward is `backward_wide`'s two kernels either way)."""
  config = AttentionConfig(
      mask=spec, scale=head_dim ** -0.5, implementation="pallas_mosaic_gpu",
      interpret=False, deterministic=deterministic)
  batch, q_seq, kv_seq = 2, 1000, 1100
  q, k, v = _structs(batch, q_seq, kv_seq, 8, 2, head_dim, head_dim,
                     jnp.bfloat16)
  sd = jax.ShapeDtypeStruct
  ids = (sd((batch, q_seq), jnp.int32), sd((batch, kv_seq), jnp.int32))
  length = sd((batch,), jnp.int32)

  def loss(q, k, v, q_ids, kv_ids, q_lengths, kv_lengths):
    arrays = MaskArrays(q_lengths, kv_lengths, q_segment_ids=q_ids,
                        kv_segment_ids=kv_ids)
    out, lse = flash_attention(config, q, k, v, None, arrays)
    return jnp.sum(out.astype(jnp.float32)) + jnp.sum(
        jnp.where(jnp.isfinite(lse), lse, 0.0))

  text = lower_for_h100(jax.value_and_grad(loss, argnums=(0, 1, 2)), q, k, v,
                        *ids, length, length)
  kernels = (text.count(f"custom_call @{MOSAIC_CALL}"),
             text.count(TRITON_CALL))
  assert kernels == ((3, 0) if deterministic or head_dim > 128 else (2, 0))


@pytest.mark.parametrize("implementation, head_dim, segments", [
    ("pallas_mosaic_gpu", 128, False), ("pallas_mosaic_gpu", 64, False),
    ("pallas_mosaic_gpu", 128, True), ("pallas_triton", 128, False),
    ("pallas_triton", 128, True)])
def test_gradients_lower_inside_shard_map_with_vma(monkeypatch,
                                                   implementation, head_dim,
                                                   segments):
  """Inside ``jax.shard_map`` (check_vma) on two abstract H100s, the
  forward and backward of each GPU backend keep their operands' varying
  axes, so ``jax.grad`` of a sharded loss traces and lowers, also with
  segment ids (whose block-map lists are built per shard). (Mosaic GPU
  kernels do not carry the mark Pallas' Triton outputs get from
  `varying_like`; the sharding layer restores it.)"""
  from jax.sharding import PartitionSpec as P
  monkeypatch.setattr(flash_jax.platform, "compute_capability",
                      lambda: (9, 0))
  mesh = AbstractMesh((2,), ("x",), abstract_device=H100)
  batch_split = jax.sharding.NamedSharding(mesh, P("x"))
  q, k, v = (jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=batch_split)
             for s in _structs(4, 256, 256, 2, 2, head_dim, head_dim,
                               jnp.bfloat16))
  ids = jax.ShapeDtypeStruct((4, 256), jnp.int32, sharding=batch_split)

  def loss(q, k, v, ids):
    out = flash_jax.dot_product_attention(
        q, k, v, is_causal=True, implementation=implementation,
        interpret=False, query_segment_ids=ids if segments else None,
        kv_segment_ids=ids if segments else None)
    return jnp.sum(out.astype(jnp.float32))

  sharded = jax.shard_map(jax.grad(loss, argnums=(0, 1, 2)), mesh=mesh,
                          in_specs=P("x"), out_specs=P("x"))
  text = lower_for_h100(sharded, q, k, v, ids, mesh=mesh)
  marker = MOSAIC_CALL if implementation == "pallas_mosaic_gpu" else TRITON_CALL
  assert marker in text
  if implementation == "pallas_mosaic_gpu":   # taken, not passed on
    assert TRITON_CALL not in text
