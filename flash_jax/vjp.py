"""The one `jax.custom_vjp` every backend runs under.

Both passes go through `flash_jax.sharding`, which runs an opaque kernel
backend per batch/head shard under ``shard_map``, ``jit`` with sharded
inputs, or ``pmap``, instead of letting XLA all-gather its operands.
"""

from __future__ import annotations

import functools

import jax
from jax.ad_checkpoint import checkpoint_name

from flash_jax import sharding
from flash_jax.config import AttentionConfig
from flash_jax.masks import MaskArrays

# Names of the forward's residuals, for remat policies such as
# ``jax.checkpoint_policies.save_only_these_names(*RESIDUAL_NAMES)``: saving
# them keeps a checkpointed backward from rerunning the forward kernel.
OUTPUT_NAME = "flash_jax_output"
LSE_NAME = "flash_jax_lse"
RESIDUAL_NAMES = (OUTPUT_NAME, LSE_NAME)


@functools.partial(jax.jit, static_argnums=0)
def _backend_forward(config: AttentionConfig, query, key, value, bias, arrays):
  # Wrapped in jit so that an unused forward (the recompute inside a
  # jax.checkpoint whose policy saved the residuals) is dead code that
  # jaxpr-level DCE removes; a bare pallas_call is never DCE'd.
  return sharding.forward(config, query, key, value, bias, arrays)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def flash_attention(config: AttentionConfig, query, key, value, bias,
                    arrays: MaskArrays):
  """Attention on canonical (validated, 4-D) inputs: returns ``(out, lse)``.

  ``bias`` (or None) is differentiable, as is ``lse`` (float32 ``[B, N, T]``,
  natural log); ``arrays`` holds the non-differentiable mask parts. Call
  `flash_jax.dot_product_attention` instead of this unless you have already
  canonicalised the inputs.
  """
  return _backend_forward(config, query, key, value, bias, arrays)


def _forward(config, query, key, value, bias, arrays):
  out, lse = _backend_forward(config, query, key, value, bias, arrays)
  out = checkpoint_name(out, OUTPUT_NAME)
  lse = checkpoint_name(lse, LSE_NAME)
  return (out, lse), (query, key, value, bias, arrays, out, lse)


def _backward(config, residuals, cotangents):
  query, key, value, bias, arrays, out, lse = residuals
  dout, dlse = cotangents
  dq, dk, dv, dbias = sharding.backward(
      config, query, key, value, bias, arrays, out, lse, dout, dlse)
  # The mask arrays are integers and booleans: no cotangent.
  return dq, dk, dv, dbias, None


flash_attention.defvjp(_forward, _backward)
