"""Where does the block-sparse row's time go? (A probe, not a benchmark row.)

    python benchmarks/sparse_probe.py [--tiles BQxBKVxWARPSxSTAGES,...]
    python benchmarks/sparse_probe.py --balanced
    ncu --clock-control none python benchmarks/sparse_probe.py --once [fwd|fwd+bwd]

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
* the same with the block counts taken other ways (``COUNT_VARIANTS``):
  the row counts on the mask read as uint32 words of four bools, summed by
  popcount (``packed``, a quarter of the elements for XLA's first
  reduction; measured slower), or one reduction over both block axes
  (``single``);
* the sparse forward with its key loop's list read three ways
  (``LOOP_VARIANTS``): ``list`` (shipped: one scalar load of the list per
  step), ``preloaded`` (the row's list loaded once as a vector, each step's
  entry picked from registers: same results) and ``range`` (the first
  ``count`` blocks in order instead of the listed ones: wrong results, the
  same number of steps with addresses known without a load), which says
  what the indirection costs;
* the sparse forward on a balanced mask (``--balanced``): the same number
  of non-empty 128x128 blocks, spread as evenly as possible over the
  block rows (random columns), against the row's random mask, whose rows
  hold Binomial(64, 0.1) blocks: what uneven programs cost at the end of
  the launch;
* the sparse forward at other forward tiles (``FORWARD_TILES``): the
  shipped tile is tuned for dense loops, and a list-driven loop of ~13
  blocks per program may prefer more, smaller programs; and the document
  row (causal + 12 packed documents in 16k, also list-driven) at the
  same tiles, since a tile rule for list schedules would apply to it too.

``--once`` instead compiles the sparse call's pass (``fwd``, the default,
or ``fwd+bwd``), runs it once to warm up and twice more, and exits: a
program for Nsight Compute, whose per-kernel durations split the call
between XLA's map kernels and the Pallas kernels.

Nothing here changes the shipped code.
"""

from __future__ import annotations

import argparse
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
from flash_jax.backends.pallas_triton import common as triton_common  # noqa: E402,E501


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


SHIPPED_BLOCK_COUNTS = block_map._block_counts


def packed_block_counts(mask, block_q: int, block_kv: int):
  """`block_map._block_counts` with the row counts taken on the mask read
  as uint32 words of four bools (0 or 1 bytes), summed by popcount."""
  if block_kv % 4:
    return SHIPPED_BLOCK_COUNTS(mask, block_q, block_kv)
  blocked = block_map._blocked(mask, 3, block_kv, False)
  quads = blocked.astype(jnp.uint8).reshape(blocked.shape[:-1]
                                            + (block_kv // 4, 4))
  words = jax.lax.bitcast_convert_type(quads, jnp.uint32)
  row_counts = jnp.sum(jax.lax.population_count(words), axis=-1,
                       dtype=jnp.int32)
  return jnp.sum(block_map._blocked(row_counts, 2, block_q, 0), axis=3)


def single_block_counts(mask, block_q: int, block_kv: int):
  """`block_map._block_counts` as one reduction over both block axes."""
  blocked = block_map._blocked(block_map._blocked(mask, 3, block_kv, False),
                               2, block_q, False)
  return jnp.sum(blocked, axis=(3, 5), dtype=jnp.int32)


COUNT_VARIANTS = {"shipped": SHIPPED_BLOCK_COUNTS,
                  "packed": packed_block_counts,
                  "single": single_block_counts}


class _RangeSchedule:
  """Timing stand-in: a list row's counts, visiting blocks 0, 1, 2, ..."""

  def __init__(self, blocks_ref, counts_ref, prefix=()):
    self.num_partial = counts_ref[(*prefix, 0)]
    self.num_full = counts_ref[(*prefix, 1)]

  def block(self, t):
    return t


class _PreloadedSchedule(_RangeSchedule):
  """The list row loaded once; step t's block picked from the vector."""

  def __init__(self, blocks_ref, counts_ref, prefix=()):
    super().__init__(blocks_ref, counts_ref, prefix)
    self.row = blocks_ref[(*prefix, slice(None))]

  def block(self, t):
    lanes = jnp.arange(self.row.shape[0])
    return jnp.sum(jnp.where(lanes == t, self.row, 0))


SHIPPED_LIST_SCHEDULE = triton_common.list_schedule
LOOP_VARIANTS = {"list": SHIPPED_LIST_SCHEDULE,
                 "preloaded": _PreloadedSchedule, "range": _RangeSchedule}


# (block_q, block_kv, warps, stages) tried for the sparse forward.
FORWARD_TILES = ((128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 2),
                 (64, 64, 4, 3), (64, 128, 4, 2), (128, 128, 8, 2),
                 (64, 32, 4, 3))


def balanced_mask(mask, rng, block: int = 128):
  """A ``[1, 1, T, S]`` mask with as many non-empty ``block``-square blocks
  as ``mask`` (block-structured, T and S multiples of ``block``), each block
  row holding the same number (give or take one), at random columns."""
  _, _, q_seq, kv_seq = mask.shape
  num_q, num_kv = q_seq // block, kv_seq // block
  total = int(jnp.sum(mask[0, 0, ::block, ::block]))
  per_row = total // num_q + (jnp.arange(num_q) < total % num_q)
  order = jnp.argsort(jax.random.uniform(rng, (num_q, num_kv)), axis=1)
  ranks = jnp.argsort(order, axis=1)         # a random rank per column
  keep = ranks < per_row[:, None]
  full = jnp.repeat(jnp.repeat(keep, block, 0), block, 1)
  return full[None, None]


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
  """Prints dense and sparse ms per pass, and with ``maps`` (seconds per
  pass) the split of the sparse call into the maps and the rest."""
  print(title)
  for pass_ in ("fwd", "fwd+bwd"):
    dense, sparse = (times[k, pass_] * 1e3 for k in ("dense", "sparse"))
    line = (f"  {pass_:8s} dense {dense:7.3f}  sparse {sparse:7.3f} "
            f"(dense/sparse {dense / sparse:5.2f}x)")
    if maps is not None:
      map_ms = maps[pass_] * 1e3
      line += (f"  maps {map_ms:7.3f}  sparse - maps {sparse - map_ms:7.3f} "
               f"(dense/that {dense / (sparse - map_ms):5.2f}x)")
    print(line, flush=True)


def main(tiles=None):
  """The sections above; with ``tiles`` (``(block_q, block_kv, warps,
  stages)`` tuples), only the dense and sparse rows and those tiles."""
  inputs = harness.draw(_SPARSE)
  args = (inputs.q, inputs.k, inputs.v, inputs.do)
  make = harness.IMPLEMENTATIONS["flash_jax"]
  call = api.canonicalize(inputs.q, inputs.k, inputs.v, mask=inputs.mask)
  tiling = pallas_triton._tiling(call.config, call.query, call.key,
                                 call.value, call.arrays)
  mask = call.arrays.mask
  print(f"{jax.devices()[0].device_kind}, JAX {jax.__version__}")
  print(f"tiles: {tiling}")
  print(f"mask {mask.shape} {mask.dtype}; ms per call:")
  rows = (("dense", _DENSE, harness.draw(_DENSE)), ("sparse", _SPARSE,
                                                     inputs))
  times = _time_rows(rows, make)
  _report(times, None, "whole calls:")
  for variant, counts in ({} if tiles else COUNT_VARIANTS).items():
    block_map._block_counts = counts
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
      block_map._block_counts = SHIPPED_BLOCK_COUNTS
  if not tiles:
    print("sparse forward by loop variant:")
  for variant, schedule in ({} if tiles else LOOP_VARIANTS).items():
    triton_common.list_schedule = schedule
    jax.clear_caches()
    try:
      if variant != "range":
        harness.check(_SPARSE, make, inputs, tolerance=2e-2)
      ms = harness.time_call(harness.forward_fn(make(_SPARSE, inputs)),
                             args) * 1e3
      print(f"  {variant:10s} {ms:.3f} ms (dense/this "
            f"{times['dense', 'fwd'] * 1e3 / ms:.2f}x)", flush=True)
    except Exception as e:  # noqa: BLE001 - a probe reports and goes on
      print(f"  {variant:10s} {type(e).__name__}: {str(e)[:300]}")
    finally:
      triton_common.list_schedule = SHIPPED_LIST_SCHEDULE
  jax.clear_caches()
  docs = harness.draw(_DOCS)
  docs_args = (docs.q, docs.k, docs.v, docs.do)
  print("forward by forward tile (block_q, block_kv, warps, stages), "
        "sparse row | document row:")
  for bq, bkv, warps, stages in tiles or FORWARD_TILES:
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


def balanced(make=None):
  """The sparse forward on its random mask and on `balanced_mask`."""
  make = make or harness.IMPLEMENTATIONS["flash_jax"]
  inputs = harness.draw(_SPARSE)
  args = (inputs.q, inputs.k, inputs.v, inputs.do)
  even = dataclasses.replace(inputs, mask=balanced_mask(
      inputs.mask, jax.random.key(5)))
  print(f"{jax.devices()[0].device_kind}, JAX {jax.__version__}")
  for label, row_inputs in (("random rows", inputs), ("balanced rows", even),
                            ("random rows", inputs)):
    harness.check(_SPARSE, make, row_inputs, tolerance=2e-2)
    ms = harness.time_call(harness.forward_fn(make(_SPARSE, row_inputs)),
                           args) * 1e3
    blocks = int(jnp.sum(row_inputs.mask[0, 0, ::128, ::128]))
    print(f"  {label:14s} {blocks} blocks: forward {ms:.3f} ms", flush=True)


def once(pass_: str):
  inputs = harness.draw(_SPARSE)
  args = (inputs.q, inputs.k, inputs.v, inputs.do)
  attend = harness.IMPLEMENTATIONS["flash_jax"](_SPARSE, inputs)
  make = harness.forward_fn if pass_ == "fwd" else harness.forward_backward_fn
  fn = make(attend)
  for _ in range(3):
    jax.block_until_ready(fn(*args))


def parse_tiles(spec: str) -> list[tuple[int, int, int, int]]:
  """``"128x64x4x3,64x64x4x2"`` -> ``[(128, 64, 4, 3), (64, 64, 4, 2)]``:
  forward tiles ``(block_q, block_kv, warps, stages)``."""
  tiles = [tuple(int(n) for n in tile.split("x")) for tile in spec.split(",")]
  for tile in tiles:
    if len(tile) != 4:
      raise ValueError(f"tile {tile}: expected BQxBKVxWARPSxSTAGES")
  return tiles


def parse_args(argv=None) -> argparse.Namespace:
  """The probe's modes: the default sections, ``--tiles`` (only those
  forward tiles), ``--balanced`` or ``--once [PASS]`` (for ncu)."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  modes = parser.add_mutually_exclusive_group()
  modes.add_argument("--tiles", type=parse_tiles,
                     help="forward tiles BQxBKVxWARPSxSTAGES,...")
  modes.add_argument("--balanced", action="store_true",
                     help="the random mask against one with even rows")
  modes.add_argument("--once", nargs="?", const="fwd",
                     choices=("fwd", "fwd+bwd"),
                     help="run one pass of the sparse row (for ncu)")
  return parser.parse_args(argv)


if __name__ == "__main__":
  args = parse_args()
  if args.once:
    once(args.once)
  elif args.balanced:
    balanced()
  else:
    main(args.tiles)
