"""Rotary position embedding (RoPE; Su et al., "RoFormer", 2021).

Each head vector is split into two halves ``(x1, x2)`` and the pair
``(x1[i], x2[i])`` is rotated by the angle ``position * base**(-2i/H)``
(the "rotate half" layout of GPT-NeoX and Llama). Rotating queries and keys
by their positions makes ``q . k`` depend on the positions only through
their difference. Plain jnp, no Flax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_angles(positions, head_dim: int, base: float = 10000.0) -> jax.Array:
  """Rotation angles ``[..., head_dim // 2]`` (float32) for int ``positions``."""
  if head_dim % 2:
    raise ValueError(f"RoPE needs an even head dim, got {head_dim}")
  if base <= 0:
    raise ValueError(f"RoPE base must be > 0, got {base}")
  half = head_dim // 2
  # Frequency of pair i: base ** (-2i / H), from 1 down to about 1 / base.
  inverse_frequencies = base ** (-jnp.arange(half, dtype=jnp.float32) * 2.0
                                 / head_dim)
  return jnp.asarray(positions, jnp.float32)[..., None] * inverse_frequencies


def apply_rope(x, positions=None, *, base: float = 10000.0) -> jax.Array:
  """Rotates ``x`` ``[batch..., T, N, H]`` by its positions.

  Args:
    x: queries or keys, ``[batch..., T, N, H]`` with an even ``H``.
    positions: int positions broadcastable to ``[batch..., T]`` (e.g. ``[T]``
      or ``[B, T]``, restarting at 0 per packed document); default
      ``0 .. T-1``.
    base: the wavelength base (10000 in RoFormer and Llama 2).

  Returns:
    The rotated array, in ``x``'s dtype (computed in float32).
  """
  x = jnp.asarray(x)
  if x.ndim < 3:
    raise ValueError(f"apply_rope takes [batch..., T, N, H], got {x.shape}")
  if positions is None:
    positions = jnp.arange(x.shape[-3])
  positions = jnp.asarray(positions)
  if not jnp.issubdtype(positions.dtype, jnp.integer):
    raise ValueError(f"positions must be integers, got {positions.dtype}")
  angles = rope_angles(positions, x.shape[-1], base)[..., None, :]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
  return rotated.astype(x.dtype)
