"""Lowers every Pallas kernel for CUDA on the CPU machine, under an abstract
H100, so that what interpret mode accepts but the Triton lowering rejects
(non-power-of-two tiles, unsupported primitives, bad indexing) fails CI.

This runs Pallas' Triton lowering (jaxpr -> Triton IR) for sm90; the final
Triton -> PTX compile happens inside XLA on a real GPU (scripts/gpu_check.sh).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractDevice, AbstractMesh

import flash_jax
from flash_jax.config import AttentionConfig
from flash_jax.masks import MaskArrays, MaskSpec
from flash_jax.vjp import flash_attention

H100 = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                      platform="gpu")
TRITON_CALL = "__gpu$xla.gpu.triton"


def lower_for_h100(fn, *args) -> str:
  """StableHLO text of ``fn`` lowered for CUDA on an abstract H100."""
  mesh = AbstractMesh((1,), ("x",), abstract_device=H100)
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
