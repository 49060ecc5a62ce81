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
* the same with the per-row key-block counts taken on the mask read as
  uint32 words (four bools each) and summed by popcount (``packed``), a
  quarter of the elements for XLA's reduction;
* the sparse forward at other forward tiles (``FORWARD_TILES``): the
  shipped tile is tuned for dense loops, and a list-driven loop of ~13
  blocks per program may prefer more, smaller programs; and the document
  row (causal + 12 packed documents in 16k, also list-driven) at the
  same tiles, since a tile rule for list schedules would apply to it too.

Nothing here changes the shipped code.
"""

from __future__ import annotations

import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import flash_jax  # noqa: E402
from benchmarks import harness  # noqa: E402
from benchmarks.run import _DENSE, _DOCS, _SPARSE  # noqa: E402
from flash_jax import api, block_map  # noqa: E402
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


SHIPPED_ROW_COUNTS = block_map._row_counts


def packed_row_counts(mask, block_kv: int):
  """`block_map._row_counts` from the mask read as uint32 words of four
  bools (0 or 1 bytes), summed by popcount: the same counts."""
  if block_kv % 4:
    return SHIPPED_ROW_COUNTS(mask, block_kv)
  blocked = block_map._blocked(mask, 3, block_kv, False)
  quads = blocked.astype(jnp.uint8).reshape(blocked.shape[:-1]
                                            + (block_kv // 4, 4))
  words = jax.lax.bitcast_convert_type(quads, jnp.uint32)
  return jnp.sum(jax.lax.population_count(words), axis=-1, dtype=jnp.int32)


# (block_q, block_kv, warps, stages) tried for the sparse forward.
FORWARD_TILES = ((128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 2),
                 (64, 64, 4, 3), (64, 128, 4, 2), (128, 128, 8, 2),
                 (64, 32, 4, 3))


def _time_rows(labels_rows, make):
  """``{(label, pass): seconds}`` for ``(label, row, inputs)`` triples."""
  times = {}
  for label, row, row_inputs in labels_rows:
    attend = make(row, row_inputs)
    row_args = (row_inputs.q, row_inputs.k, row_inputs.v, row_inputs.do)
    times[label, "fwd"] = harness.time_call(harness.forward_fn(attend),
                                            row_args)
    times[label, "fwd+bwd"] = harness.time_call(
        harness.forward_backward_fn(attend), row_args)
  return times


def _report(times, maps, title):
  print(title)
  for pass_ in ("fwd", "fwd+bwd"):
    dense, sparse = (times[k, pass_] * 1e3 for k in ("dense", "sparse"))
    map_ms = maps[pass_] * 1e3
    print(f"  {pass_:8s} dense {dense:7.3f}  sparse {sparse:7.3f} "
          f"(dense/sparse {dense / sparse:5.2f}x)  maps {map_ms:7.3f}  "
          f"sparse - maps {sparse - map_ms:7.3f} (dense/that "
          f"{dense / (sparse - map_ms):5.2f}x)", flush=True)


def main():
  inputs = harness.draw(_SPARSE)
  args = (inputs.q, inputs.k, inputs.v, inputs.do)
  make = harness.IMPLEMENTATIONS["flash_jax"]
  call = api.canonicalize(inputs.q, inputs.k, inputs.v, mask=inputs.mask)
  tiling = pallas_triton._tiling(call.config, call.query, call.key,
                                 call.value)
  mask = call.arrays.mask
  print(f"{jax.devices()[0].device_kind}, JAX {jax.__version__}")
  print(f"tiles: {tiling}")
  print(f"mask {mask.shape} {mask.dtype}; ms per call:")
  rows = (("dense", _DENSE, harness.draw(_DENSE)), ("sparse", _SPARSE,
                                                     inputs))
  times = _time_rows(rows, make)
  for variant, counts in (("shipped", SHIPPED_ROW_COUNTS),
                          ("packed", packed_row_counts)):
    block_map._row_counts = counts
    jax.clear_caches()
    try:
      if variant != "shipped":
        times.update(_time_rows(rows[1:], make))
        harness.check(_SPARSE, make, inputs, tolerance=2e-2)
      forward_maps = _maps_fn(call, tiling, "fwd")
      backward_maps = _maps_fn(call, tiling, "bwd")
      maps = {"fwd": harness.time_call(forward_maps, (mask,))}
      maps["fwd+bwd"] = maps["fwd"] + harness.time_call(backward_maps,
                                                        (mask,))
      _report(times, maps, f"row counts: {variant}")
    except Exception as e:  # noqa: BLE001 - a probe reports and goes on
      print(f"row counts {variant}: {type(e).__name__}: {str(e)[:300]}")
    finally:
      block_map._row_counts = SHIPPED_ROW_COUNTS
  jax.clear_caches()
  docs = harness.draw(_DOCS)
  docs_args = (docs.q, docs.k, docs.v, docs.do)
  print("forward by forward tile (block_q, block_kv, warps, stages), "
        "sparse row | document row:")
  for bq, bkv, warps, stages in FORWARD_TILES:
    sizes = flash_jax.BlockSizes(block_q=bq, block_kv=bkv,
                                 num_warps_fwd=warps, num_stages_fwd=stages)
    line = f"  {(bq, bkv, warps, stages)}:"
    for row, row_inputs, row_args in ((_SPARSE, inputs, args),
                                      (_DOCS, docs, docs_args)):
      make_tiled = harness._flash("pallas_triton", sizes)
      try:
        harness.check(row, make_tiled, row_inputs, tolerance=2e-2)
        ms = harness.time_call(harness.forward_fn(
            make_tiled(row, row_inputs)), row_args) * 1e3
        extra = (f" (dense/this {times['dense', 'fwd'] * 1e3 / ms:.2f}x)"
                 if row is _SPARSE else "")
        line += f" {ms:.3f} ms{extra} |"
      except Exception as e:  # noqa: BLE001 - a probe reports and goes on
        line += f" {type(e).__name__}: {str(e)[:120]} |"
    print(line, flush=True)


if __name__ == "__main__":
  main()
