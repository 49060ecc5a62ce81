"""The portable Pallas backend, written with Pallas' Triton lowering (sm80+).

Pallas' Triton lowering is deprecated since JAX 0.11; everything that imports
it lives in this package, reached only through the backend registry.
"""

from __future__ import annotations

from flash_jax import block_map, platform
from flash_jax.config import MAX_HEAD_DIM, AttentionConfig
from flash_jax.backends.pallas_triton import backward as _backward
from flash_jax.backends.pallas_triton import common as _common
from flash_jax.backends.pallas_triton import forward as _forward

NAME = "pallas_triton"


def _tiling(config: AttentionConfig, query, key, value):
  # The wider of the two head dims sets the tile budget (registers, smem).
  widest = max(query.shape[-1], value.shape[-1])
  padded = max(_common.MIN_BLOCK, _common.next_power_of_two(widest))
  return _common.resolve_tiling(config.block_sizes, padded, query.shape[1],
                                key.shape[1])


def check_supported(config: AttentionConfig, query, key, value, bias,
                    arrays) -> None:
  """Raises NotImplementedError(reason) if this backend cannot take the call."""
  del bias, arrays  # every mask, bias, soft-cap and dropout is supported
  if max(query.shape[-1], value.shape[-1]) > MAX_HEAD_DIM:
    raise NotImplementedError(
        f"{NAME} supports head dims up to {MAX_HEAD_DIM}, got "
        f"{query.shape[-1]} (query/key) and {value.shape[-1]} (value)")
  if not config.interpret:
    reason = platform.triton_gpu_unsupported_reason()
    if reason:
      raise NotImplementedError(f"{NAME}: {reason} (pass interpret=True to run "
                                "it in Pallas interpret mode)")


def _states(config: AttentionConfig, query, key, arrays, block_q: int,
            block_kv: int):
  return block_map.block_states(
      config.mask, arrays, batch=query.shape[0], num_heads=query.shape[2],
      q_seq=query.shape[1], kv_seq=key.shape[1], block_q=block_q,
      block_kv=block_kv)


def forward(config: AttentionConfig, query, key, value, bias, arrays):
  """Returns ``(out [B,T,N,Hv], lse [B,N,T] float32)``."""
  tiling = _tiling(config, query, key, value)
  params = _common.kernel_params(config, query, key, value,
                                 block_q=tiling.block_q,
                                 block_kv=tiling.block_kv, tiling=tiling)
  kv_lists = None
  if block_map.needs_map(config.mask, arrays):
    kv_lists = block_map.kv_lists(_states(config, query, key, arrays,
                                          tiling.block_q, tiling.block_kv))
  return _forward.forward(params, query, key, value, bias, arrays, kv_lists)


def backward(config: AttentionConfig, query, key, value, bias, arrays, out,
             lse, dout, dlse):
  """Returns ``(dq, dk, dv, dbias)`` for cotangents ``dout`` and ``dlse``
  (dbias None without a bias)."""
  tiling = _tiling(config, query, key, value)
  params_dkv = _common.kernel_params(config, query, key, value,
                                     block_q=tiling.block_q_dkv,
                                     block_kv=tiling.block_kv_dkv,
                                     tiling=tiling)
  params_dq = _common.kernel_params(config, query, key, value,
                                    block_q=tiling.block_q_dq,
                                    block_kv=tiling.block_kv_dq,
                                    tiling=tiling)
  q_lists = kv_lists = dq_states = None
  if block_map.needs_map(config.mask, arrays) or bias is not None:
    dq_states = _states(config, query, key, arrays, tiling.block_q_dq,
                        tiling.block_kv_dq)
  if block_map.needs_map(config.mask, arrays):
    q_lists = block_map.q_lists(_states(config, query, key, arrays,
                                        tiling.block_q_dkv,
                                        tiling.block_kv_dkv))
    kv_lists = block_map.kv_lists(dq_states)
  return _backward.backward(params_dkv, params_dq, query, key, value, bias,
                            arrays, out, lse, dout, dlse, q_lists=q_lists,
                            kv_lists=kv_lists, dbias_states=dq_states)
