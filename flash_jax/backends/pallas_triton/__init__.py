"""The portable Pallas backend, written with Pallas' Triton lowering (sm80+).

Pallas' Triton lowering is deprecated since JAX 0.11; everything that imports
it lives in this package, reached only through the backend registry.
"""

from __future__ import annotations

import jax.numpy as jnp

from flash_jax import block_map, platform
from flash_jax.config import MAX_HEAD_DIM, AttentionConfig
from flash_jax.backends.pallas_triton import backward as _backward
from flash_jax.backends.pallas_triton import common as _common
from flash_jax.backends.pallas_triton import forward as _forward
from flash_jax.backends.pallas_triton import tuning as _tuning

NAME = "pallas_triton"


def _tiling(config: AttentionConfig, query, key, value,
            arrays=None) -> _tuning.Tiling:
  """The call's tiling; with ``arrays``, a forward that walks a block list
  gets its own tile (`tuning.LISTED_FORWARD`)."""
  pad = lambda n: max(_tuning.MIN_BLOCK, _tuning.next_power_of_two(n))
  listed = arrays is not None and block_map.needs_map(config.mask, arrays)
  return _tuning.resolve_tiling(
      config.block_sizes, head_dim=pad(query.shape[-1]),
      value_dim=pad(value.shape[-1]),
      item_bytes=jnp.dtype(query.dtype).itemsize,
      causal=config.mask.is_causal, q_seq=query.shape[1],
      kv_seq=key.shape[1], capability=platform.compute_capability(),
      check_resources=not config.interpret, listed=listed)


def check_supported(config: AttentionConfig, query, key, value, bias,
                    arrays) -> None:
  """Raises NotImplementedError(reason) if this backend cannot take the call."""
  del bias  # every mask, bias, soft-cap and dropout is supported
  if max(query.shape[-1], value.shape[-1]) > MAX_HEAD_DIM:
    raise NotImplementedError(
        f"{NAME} supports head dims up to {MAX_HEAD_DIM}, got "
        f"{query.shape[-1]} (query/key) and {value.shape[-1]} (value)")
  if not config.interpret:
    reason = platform.triton_gpu_unsupported_reason()
    if reason:
      raise NotImplementedError(f"{NAME}: {reason} (pass interpret=True to run "
                                "it in Pallas interpret mode)")
    _tiling(config, query, key, value, arrays)  # Raises if no tile fits.


def _states(config: AttentionConfig, query, key, arrays, *tiles):
  """Block states (`flash_jax.block_map`) per ``KernelTiling`` in ``tiles``."""
  return block_map.block_states_for_tiles(
      config.mask, arrays, batch=query.shape[0], num_heads=query.shape[2],
      q_seq=query.shape[1], kv_seq=key.shape[1],
      tiles=[(t.block_q, t.block_kv) for t in tiles])


def forward_lists(config: AttentionConfig, query, key, arrays,
                  tiling: _tuning.Tiling):
  """The forward kernel's `block_map.BlockLists`, or None where the mask's
  ranges schedule it.

  Evaluated at the backward's tiles too, although only the forward's map is
  used: the O(T*S) pass over a dense mask or ``mask_fn`` is then the same
  computation as in `backward_maps`, and XLA's CSE keeps one when both
  passes are in one program (the rest is dead code).
  """
  if not block_map.needs_map(config.mask, arrays):
    return None
  return block_map.kv_lists(_states(config, query, key, arrays,
                                    tiling.forward, tiling.dkv,
                                    tiling.dq)[0])


def backward_maps(config: AttentionConfig, query, key, arrays, bias,
                  tiling: _tuning.Tiling):
  """``(q_lists, kv_lists, dq_states)`` of the backward kernels: the dK/dV
  kernel's and dQ kernel's `block_map.BlockLists` (None where the mask's
  ranges schedule them), and the dQ tiling's states, which the dbias kernel
  also reads (None without a map or a bias)."""
  if block_map.needs_map(config.mask, arrays):
    dkv_states, dq_states = _states(config, query, key, arrays, tiling.dkv,
                                    tiling.dq)
    return (block_map.q_lists(dkv_states), block_map.kv_lists(dq_states),
            dq_states)
  if bias is not None:
    return None, None, _states(config, query, key, arrays, tiling.dq)[0]
  return None, None, None


def forward(config: AttentionConfig, query, key, value, bias, arrays):
  """Returns ``(out [B,T,N,Hv], lse [B,N,T] float32)``."""
  tiling = _tiling(config, query, key, value, arrays)
  params = _common.kernel_params(config, query, key, value, tiling.forward)
  kv_lists = forward_lists(config, query, key, arrays, tiling)
  return _forward.forward(params, query, key, value, bias, arrays, kv_lists)


def backward(config: AttentionConfig, query, key, value, bias, arrays, out,
             lse, dout, dlse):
  """Returns ``(dq, dk, dv, dbias)`` for cotangents ``dout`` and ``dlse``
  (dbias None without a bias)."""
  tiling = _tiling(config, query, key, value, arrays)
  params_dkv = _common.kernel_params(config, query, key, value, tiling.dkv)
  params_dq = _common.kernel_params(config, query, key, value, tiling.dq)
  q_lists, kv_lists, dq_states = backward_maps(config, query, key, arrays,
                                               bias, tiling)
  return _backward.backward(params_dkv, params_dq, query, key, value, bias,
                            arrays, out, lse, dout, dlse, q_lists=q_lists,
                            kv_lists=kv_lists, dbias_states=dq_states)
