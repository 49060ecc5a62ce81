"""Where does the block-sparse row's time go? (A probe, not a benchmark row.)

    python benchmarks/sparse_probe.py

Issue 3 asks the 90%-empty-block mask (B=1 T=S=8192 N=16 H=128, a dense
``[1, 1, T, S]`` boolean mask built from random 128x128 blocks) to run 5x
faster than the dense row. This times, for the Triton backend with its
resolved tiles, in one process:

* ``dense`` / ``sparse``: the whole call, forward and forward+backward;
* ``maps``: only the XLA side of the sparse call, the block states and
  visiting lists every kernel of that pass reads (one map for the forward;
  two for the backward, at the dK/dV and dQ tiles), from the same mask,
  built by the backend's own `forward_lists` / `backward_maps` (one pass
  over the mask at the smallest of the three kernels' tiles, coarsened);
* ``sparse - maps``: the rest, i.e. the kernels and their launch;
* the sparse forward at other forward tiles (``FORWARD_TILES``): the
  shipped tile is tuned for dense loops, and a list-driven loop of ~13
  blocks per program may prefer more, smaller programs.

Nothing here changes the shipped code.
"""

from __future__ import annotations

import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

import flash_jax  # noqa: E402
from benchmarks import harness  # noqa: E402
from benchmarks.run import _DENSE, _SPARSE  # noqa: E402
from flash_jax import api  # noqa: E402
from flash_jax.backends import pallas_triton  # noqa: E402


def _maps_fn(call, tiling, pass_: str):
  """A jitted function of the mask computing the block maps the backend
  builds for ``pass_`` (``"fwd"`` or ``"bwd"``), through its own
  `forward_lists` / `backward_maps`."""
  def maps(mask):
    arrays = dataclasses.replace(call.arrays, mask=mask)
    if pass_ == "fwd":
      return pallas_triton.forward_lists(call.config, call.query, call.key,
                                         arrays, tiling)
    return pallas_triton.backward_maps(call.config, call.query, call.key,
                                       arrays, None, tiling)[:2]
  return jax.jit(maps)


# (block_q, block_kv, warps, stages) tried for the sparse forward.
FORWARD_TILES = ((128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 2),
                 (64, 64, 4, 3), (64, 128, 4, 2), (128, 128, 8, 2),
                 (64, 32, 4, 3))


def main():
  inputs = harness.draw(_SPARSE)
  args = (inputs.q, inputs.k, inputs.v, inputs.do)
  make = harness.IMPLEMENTATIONS["flash_jax"]
  times = {}
  for label, row, row_inputs in (("dense", _DENSE, harness.draw(_DENSE)),
                                 ("sparse", _SPARSE, inputs)):
    attend = make(row, row_inputs)
    row_args = (row_inputs.q, row_inputs.k, row_inputs.v, row_inputs.do)
    times[label, "fwd"] = harness.time_call(harness.forward_fn(attend),
                                            row_args)
    times[label, "fwd+bwd"] = harness.time_call(
        harness.forward_backward_fn(attend), row_args)
  call = api.canonicalize(inputs.q, inputs.k, inputs.v, mask=inputs.mask)
  tiling = pallas_triton._tiling(call.config, call.query, call.key,
                                 call.value)
  forward_maps = _maps_fn(call, tiling, "fwd")
  backward_maps = _maps_fn(call, tiling, "bwd")
  mask = call.arrays.mask
  times["maps", "fwd"] = harness.time_call(forward_maps, (mask,))
  times["maps", "fwd+bwd"] = times["maps", "fwd"] + harness.time_call(
      backward_maps, (mask,))
  print(f"tiles: {tiling}")
  print(f"mask {mask.shape} {mask.dtype}; ms per call:")
  for pass_ in ("fwd", "fwd+bwd"):
    dense, sparse, maps = (times[k, pass_] * 1e3
                           for k in ("dense", "sparse", "maps"))
    print(f"  {pass_:8s} dense {dense:7.3f}  sparse {sparse:7.3f} "
          f"(dense/sparse {dense / sparse:5.2f}x)  maps {maps:7.3f}  "
          f"sparse - maps {sparse - maps:7.3f} (dense/that "
          f"{dense / (sparse - maps):5.2f}x)")
  print("sparse forward by forward tile (block_q, block_kv, warps, stages):")
  for bq, bkv, warps, stages in FORWARD_TILES:
    sizes = flash_jax.BlockSizes(block_q=bq, block_kv=bkv,
                                 num_warps_fwd=warps, num_stages_fwd=stages)
    attend = harness._flash("pallas_triton", sizes)(_SPARSE, inputs)
    try:
      harness.check(_SPARSE, harness._flash("pallas_triton", sizes), inputs,
                    tolerance=2e-2)
      ms = harness.time_call(harness.forward_fn(attend), args) * 1e3
      print(f"  {(bq, bkv, warps, stages)}: {ms:.3f} ms "
            f"(dense/this {times['dense', 'fwd'] * 1e3 / ms:.2f}x)")
    except Exception as e:  # noqa: BLE001 - a probe reports and goes on
      print(f"  {(bq, bkv, warps, stages)}: {type(e).__name__}: "
            f"{str(e)[:120]}")


if __name__ == "__main__":
  main()
