"""The portable Pallas backend, written with Pallas' Triton lowering (sm80+).

Pallas' Triton lowering is deprecated since JAX 0.11; everything that imports
it lives in this package, reached only through the backend registry.
"""

from __future__ import annotations

from flash_jax import platform
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


def _unsupported_features(config: AttentionConfig, bias, arrays) -> list[str]:
  spec = config.mask
  return [name for name, used in (
      ("bias", bias is not None),
      ("mask", arrays.mask is not None),
      ("segment ids", arrays.q_segment_ids is not None),
      ("mask_fn", spec.mask_fn is not None),
      ("logits_soft_cap", config.logits_soft_cap is not None),
      ("dropout", config.dropout_rate > 0)) if used]


def check_supported(config: AttentionConfig, query, key, value, bias,
                    arrays) -> None:
  """Raises NotImplementedError(reason) if this backend cannot take the call."""
  unsupported = _unsupported_features(config, bias, arrays)
  if unsupported:
    raise NotImplementedError(
        f"{NAME} does not implement {', '.join(unsupported)} yet")
  if max(query.shape[-1], value.shape[-1]) > MAX_HEAD_DIM:
    raise NotImplementedError(
        f"{NAME} supports head dims up to {MAX_HEAD_DIM}, got "
        f"{query.shape[-1]} (query/key) and {value.shape[-1]} (value)")
  if not config.interpret:
    reason = platform.triton_gpu_unsupported_reason()
    if reason:
      raise NotImplementedError(f"{NAME}: {reason} (pass interpret=True to run "
                                "it in Pallas interpret mode)")


def forward(config: AttentionConfig, query, key, value, bias, arrays):
  """Returns ``(out [B,T,N,Hv], lse [B,N,T] float32)``."""
  assert not _unsupported_features(config, bias, arrays)
  tiling = _tiling(config, query, key, value)
  params = _common.kernel_params(config, query, key, value,
                                 block_q=tiling.block_q,
                                 block_kv=tiling.block_kv, tiling=tiling)
  return _forward.forward(params, query, key, value, arrays.q_lengths,
                          arrays.kv_lengths)


def backward(config: AttentionConfig, query, key, value, bias, arrays, out,
             lse, dout, dlse):
  """Returns ``(dq, dk, dv, None)`` for cotangents ``dout`` and ``dlse``."""
  assert not _unsupported_features(config, bias, arrays)
  tiling = _tiling(config, query, key, value)
  params_dkv = _common.kernel_params(config, query, key, value,
                                     block_q=tiling.block_q_dkv,
                                     block_kv=tiling.block_kv_dkv,
                                     tiling=tiling)
  params_dq = _common.kernel_params(config, query, key, value,
                                    block_q=tiling.block_q_dq,
                                    block_kv=tiling.block_kv_dq,
                                    tiling=tiling)
  dq, dk, dv = _backward.backward(params_dkv, params_dq, query, key, value,
                                  arrays.q_lengths, arrays.kv_lengths, out,
                                  lse, dout, dlse)
  return dq, dk, dv, None


