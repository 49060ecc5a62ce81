"""Where does the fused-dQ Hopper backward's time go? (A probe.)

    python benchmarks/fused_dq_probe.py [--rows 4k,16k,4k-causal]

Times the Hopper backward with ``deterministic=False`` (dQ reduce-added by
the dK/dV kernel) in variants built by patching the backward module in this
process only: as shipped (grid ``(heads, kv, batch)``); on the
deterministic kernel's grid order before session 11, ``(kv, heads,
batch)``; without the TMA reduce-adds (dQ is then wrong: timing only); and
the
deterministic two-kernel backward, for the same rows as
`backward_probe.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import backward_probe, harness  # noqa: E402
from flash_jax import api  # noqa: E402

hopper_backward = importlib.import_module(
    "flash_jax.backends.pallas_mosaic_gpu.backward")


def _without_reduce_adds(plgpu):
  """A stand-in for the ``plgpu`` module that drops reduce-add copies."""
  proxy = types.SimpleNamespace(**{n: getattr(plgpu, n) for n in dir(plgpu)
                                   if not n.startswith("__")})

  def copy(src, dst, *args, reduction_op=None, **kwargs):
    if reduction_op is None:
      plgpu.copy_smem_to_gmem(src, dst, *args, **kwargs)
  proxy.copy_smem_to_gmem = copy
  return proxy


def _key_blocks_fastest(p):
  """The fused kernel on the deterministic kernel's grid order before
  session 11, ``(kv, heads, batch)``. (Named when the first grid axis was
  thought to run fastest; Mosaic GPU runs the last one fastest, so this
  order has each wave of CTAs span every head: see
  `flash_jax.backends.pallas_mosaic_gpu.common.sequence_major_grid`.)"""
  kv_ctas = -(-p.kv_seq // (2 * hopper_backward.BLOCK))
  return dict(grid=(kv_ctas, p.num_kv_heads, p.batch),
              grid_names=("kv", "heads", "batch"))


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--rows", default="4k,16k,4k-causal")
  args = parser.parse_args()
  from flash_jax.backends import pallas_mosaic_gpu as hopper
  shipped_plgpu = hopper_backward.plgpu
  shipped_grid = hopper_backward._dkv_grid
  variants = {
      "deterministic": {},
      "fused": {},
      "fused, no reduce-adds": {"plgpu": _without_reduce_adds(shipped_plgpu)},
      "fused, key blocks fastest": {"_dkv_grid": _key_blocks_fastest},
  }
  for name in args.rows.split(","):
    row = backward_probe.ROWS[name]
    inputs = harness.draw(row)
    call = api.canonicalize(inputs.q, inputs.k, inputs.v,
                            is_causal=row.is_causal)
    config = dataclasses.replace(call.config,
                                 implementation="pallas_mosaic_gpu")
    out, lse = jax.jit(lambda q, k, v: hopper.forward(
        config, q, k, v, None, call.arrays))(inputs.q, inputs.k, inputs.v)
    bwd_args = (inputs.q, inputs.k, inputs.v, out, lse, inputs.do)
    print(f"{name}: B={row.batch} T={row.q_seq} N={row.num_heads} "
          f"H={row.head_dim} causal={row.is_causal}", flush=True)
    for variant, patches in variants.items():
      hopper_backward.plgpu = patches.get("plgpu", shipped_plgpu)
      hopper_backward._dkv_grid = patches.get("_dkv_grid", shipped_grid)
      jax.clear_caches()
      run_config = dataclasses.replace(
          config, deterministic=variant == "deterministic")
      fn = jax.jit(lambda q, k, v, o, l, do, c=run_config: hopper.backward(
          c, q, k, v, None, call.arrays, o, l, do, jnp.zeros_like(l))[:3])
      try:
        seconds = harness.time_call(fn, bwd_args)
        print(f"  {variant:24s} {seconds * 1e3:8.3f} ms", flush=True)
      except Exception as e:  # noqa: BLE001 - a probe reports and goes on
        print(f"  {variant}: {type(e).__name__}: {str(e)[:300]}", flush=True)
    hopper_backward.plgpu = shipped_plgpu
    hopper_backward._dkv_grid = shipped_grid


if __name__ == "__main__":
  main()
