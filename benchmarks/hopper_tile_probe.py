"""Which key-block size and ring depth suit the Hopper forward? Times the
Mosaic GPU forward with `ForwardParams` ``block_kv`` / ``stages`` /
``ping_pong`` replaced, against cuDNN, in one process (a probe, not a
benchmark row).

    python benchmarks/hopper_tile_probe.py [--cases 4096/64,4096c/64]
        [--tiles 128x3xP,192x2xP,...]
    ncu --clock-control none --section ... python benchmarks/hopper_tile_probe.py --once CASE
    python benchmarks/hopper_tile_probe.py --grid [--cases ...]

A case is as in `benchmarks/schedule_probe.py` (``T`` or ``Tc``, ``/H`` for
head dim H, B*T = 16k tokens, N*H = 2048, bf16). A tile is
``BLOCK_KVxSTAGES`` with an optional ``xP`` (ping-pong on) or ``xN`` (off),
without which the backend's default ping-pong choice stays, and an optional
``xC<ctas>`` (a persistent grid of that many CTAs, `ForwardParams.persistent`;
``xC0``: one CTA per tile) and an optional ``xW3`` or ``xW2`` (three or
two consumer warpgroups, `ForwardParams.consumers`, in place of the
backend's choice by head dim and length; three: 192 query rows per CTA,
head dim 64 only. Set where the backend builds the forward's parameters so
that its persistent rule and block maps see the tiles; three run with
ping-pong off unless the tile has ``P``, with which they take turns, two
with the backend's two-consumer ping-pong choice). A tile with ``P`` or
``N`` and no ``W`` runs two consumers, as ``BlockSizes(ping_pong=)`` does
in the backend. An optional ``xR<bytes>`` sets the shared memory Pallas
reserves for cross-warp reductions in every Hopper kernel
(`pallas_mosaic_gpu.common.REDUCTION_SCRATCH_BYTES`; ``xR0`` frees 2 KiB,
which a 3-stage ring at head dim 128, ``128x3xR0xC0``, needs). ``xL<t>``
sets `ForwardParams.rescale_threshold` to ``t`` (``L0``: O rescaled only in
warps where a row's max moved; ``L8``: lazily) and ``xA`` to None (O
rescaled every block); ``xD`` sets `ForwardParams.late_rescale` (O
rescaled after the softmax is handed over). The first tile
should be the shipped one, for the baseline. Each timing is preceded by the
harness's check against the reference, so a tile that computes wrong
results is reported as an error, not a speed. Only the forward kernel's
parameters change (the backward keeps its own), and only the forward is
timed. ``--grid`` instead times forward and forward+backward with every
Hopper kernel's grid in the shipped order (`ForwardParams.seq_fastest`:
one head's sequence tiles launch together) and in the order before
session 11 (tiles slowest). ``--once CASE`` runs the shipped forward of one case three times and
exits: a program for Nsight Compute's pipe and stall sections or a ptxas
dump (``--tile T`` runs the Hopper forward at tile ``T``,
``--implementation cudnn`` runs cuDNN's instead).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from benchmarks import harness  # noqa: E402
from benchmarks.schedule_probe import _row  # noqa: E402
from flash_jax.backends import pallas_mosaic_gpu  # noqa: E402
from flash_jax.backends.pallas_mosaic_gpu import common  # noqa: E402

SHIPPED_FORWARD = pallas_mosaic_gpu._forward.forward
SHIPPED_PARAMS = pallas_mosaic_gpu._params
SHIPPED_REDUCTION_SCRATCH = common.REDUCTION_SCRATCH_BYTES


def parse_tile(spec: str) -> dict:
  """``"192x2xP"`` -> ``{"block_kv": 192, "stages": 2, "ping_pong": True}``;
  ``"128x3xC132"`` -> ``{"block_kv": 128, "stages": 3, "persistent": 132}``;
  ``"128x2xW3"`` -> ``{"block_kv": 128, "stages": 2, "consumers": 3}``;
  ``"128x3xR0"`` -> ``{"block_kv": 128, "stages": 3,
  "reduction_scratch": 0}``; ``"64x2xL8"`` -> ``{"block_kv": 64,
  "stages": 2, "rescale_threshold": 8.0}``; ``"64x2xA"`` -> ``{...,
  "rescale_threshold": None}``."""
  parts = spec.split("x")
  fields = {"block_kv": int(parts[0]), "stages": int(parts[1])}
  for part in parts[2:]:
    if part in ("P", "N"):
      fields["ping_pong"] = part == "P"
    elif part[:1] == "C" and part[1:].isdigit():
      fields["persistent"] = int(part[1:])
    elif part[:1] == "W" and part[1:].isdigit():
      fields["consumers"] = int(part[1:])
    elif part[:1] == "R" and part[1:].isdigit():
      fields["reduction_scratch"] = int(part[1:])
    elif part == "A":
      fields["rescale_threshold"] = None
    elif part == "D":
      fields["late_rescale"] = True
    elif part[:1] == "L" and part[1:].replace(".", "", 1).isdigit():
      fields["rescale_threshold"] = float(part[1:])
    else:
      raise ValueError(f"tile {spec!r}: a field after the second is P, N, "
                       "C<ctas>, W<consumers>, R<bytes>, A, D or L<threshold>")
  return fields


def use_tile(fields: dict | None) -> None:
  """Makes the Hopper forward kernel's parameters take ``fields`` (None:
  the shipped ones). ``consumers`` is set where the backend builds the
  forward's parameters (`pallas_mosaic_gpu._params`; three with ping-pong
  off, two with the backend's two-consumer choice, unless ``fields`` set
  ``ping_pong``); ``reduction_scratch`` in the backend's compiler
  parameters (every Hopper kernel's, the backward's too); the other fields
  just before the kernel. A ``ping_pong`` without ``consumers`` means two
  consumers, as `BlockSizes.ping_pong` does in the backend. Unless the tile
  sets them, ``rescale_threshold`` and ``late_rescale`` are the backend's
  for the tile's schedule (`pallas_mosaic_gpu.rescale_fields`)."""
  pallas_mosaic_gpu._forward.forward = SHIPPED_FORWARD
  pallas_mosaic_gpu._params = SHIPPED_PARAMS
  common.REDUCTION_SCRATCH_BYTES = SHIPPED_REDUCTION_SCRATCH
  if fields is not None:
    fields = dict(fields)
    if "reduction_scratch" in fields:
      common.REDUCTION_SCRATCH_BYTES = fields.pop("reduction_scratch")
    consumers = fields.pop("consumers", None)
    if consumers is None and "ping_pong" in fields:
      consumers = 2

    def forward(p, *operands):
      p = dataclasses.replace(p, **fields)
      if "ping_pong" in fields:
        # The backend's rescaling for the schedule the tile names, where
        # the tile does not set it.
        chosen = pallas_mosaic_gpu.rescale_fields(
            p.head_dim, p.ping_pong, p.mask.is_causal)
        p = dataclasses.replace(p, **{
            name: value for name, value in chosen.items()
            if name not in fields})
      return SHIPPED_FORWARD(p, *operands)
    pallas_mosaic_gpu._forward.forward = forward
    if consumers is not None:
      def params(config, *args, forward, **kwargs):
        p = SHIPPED_PARAMS(config, *args, forward=forward, **kwargs)
        if not forward:
          return p
        # Two consumers take the backend's ping-pong choice for two; three
        # take turns only where the tile says P.
        two_way = (pallas_mosaic_gpu._ping_pong(config, p.head_dim)
                   and consumers == 2)
        return dataclasses.replace(
            p, consumers=consumers, ping_pong=two_way,
            **pallas_mosaic_gpu.rescale_fields(p.head_dim, two_way,
                                               p.mask.is_causal))
      pallas_mosaic_gpu._params = params
  jax.clear_caches()


def tiles(cases: str, tile_specs: str):
  """Times the forward at each tile of ``tile_specs`` against cuDNN."""
  print(f"{jax.devices()[0].device_kind}, JAX {jax.__version__}", flush=True)
  print("case      tile          fwd ms  cudnn/this", flush=True)
  for case in cases.split(","):
    row = _row(case)
    (cudnn,) = harness.measure(row, ["cudnn"], modes=("fwd",), trials=5)
    print(f"{case:9s} cudnn     {cudnn['seconds'] * 1e3:8.3f}", flush=True)
    for spec in tile_specs.split(","):
      use_tile(parse_tile(spec))
      try:
        (entry,) = harness.measure(row, ["flash_jax_mosaic"], modes=("fwd",),
                                   trials=5)
        if "error" in entry:
          print(f"{case:9s} {spec:12s} error {entry['error'][:300]}",
                flush=True)
        else:
          print(f"{case:9s} {spec:12s} {entry['seconds'] * 1e3:8.3f}  "
                f"{cudnn['seconds'] / entry['seconds']:6.3f}x", flush=True)
      finally:
        use_tile(None)


def use_grid_order(seq_fastest: bool | None) -> None:
  """Every Hopper kernel of the next calls launches in this order (None:
  the shipped parameters)."""
  if seq_fastest is None:
    pallas_mosaic_gpu._params = SHIPPED_PARAMS
  else:
    pallas_mosaic_gpu._params = lambda *a, **k: dataclasses.replace(
        SHIPPED_PARAMS(*a, **k), seq_fastest=seq_fastest)
  jax.clear_caches()


def grid_orders(cases: str):
  """Times forward and forward+backward in both grid orders against
  cuDNN."""
  print(f"{jax.devices()[0].device_kind}, JAX {jax.__version__}", flush=True)
  print("case      pass     grid order          ms  cudnn/this", flush=True)
  for case in cases.split(","):
    row = _row(case)
    cudnn = {e["pass"]: e["seconds"]
             for e in harness.measure(row, ["cudnn"], trials=5)}
    for label, seq_fastest in (("tiles slowest", False),
                               ("tiles fastest", True)):
      use_grid_order(seq_fastest)
      try:
        for entry in harness.measure(row, ["flash_jax_mosaic"], trials=5):
          head = f"{case:9s} {entry['pass']:8s} {label:14s}"
          if "error" in entry:
            print(f"{head} error {entry['error'][:300]}", flush=True)
            continue
          print(f"{head} {entry['seconds'] * 1e3:8.3f}  "
                f"{cudnn[entry['pass']] / entry['seconds']:6.3f}x",
                flush=True)
      finally:
        use_grid_order(None)


def once(case: str, implementation: str = "flash_jax_mosaic",
         tile: str | None = None):
  """Runs the forward of ``case`` three times (for ncu or a ptxas dump):
  the shipped Hopper kernel, the Hopper kernel at ``tile``, or another
  `harness.IMPLEMENTATIONS` entry."""
  if tile:
    use_tile(parse_tile(tile))
  row = _row(case)
  inputs = harness.draw(row)
  attend = harness.IMPLEMENTATIONS[implementation](row, inputs)
  fn = harness.forward_fn(attend)
  for _ in range(3):
    jax.block_until_ready(fn(inputs.q, inputs.k, inputs.v, inputs.do))


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--cases", help="default: 4096/64,4096c/64 (tiles), "
                      "4096/64,4096,4096c,16384 (--grid)")
  parser.add_argument("--tiles", default="128x3,192x2,192x3,256x2,128x3xN")
  parser.add_argument("--grid", action="store_true",
                      help="compare the grid orders instead of tiles")
  parser.add_argument("--once", metavar="CASE",
                      help="run one case's shipped forward (for ncu)")
  parser.add_argument("--implementation", default="flash_jax_mosaic",
                      help="with --once: the harness implementation run")
  parser.add_argument("--tile", help="with --once: a tile (as in --tiles) "
                      "for the Hopper forward instead of the shipped one")
  args = parser.parse_args()
  if args.once:
    once(args.once, args.implementation, args.tile)
  elif args.grid:
    grid_orders(args.cases or "4096/64,4096,4096c,16384")
  else:
    tiles(args.cases or "4096/64,4096c/64", args.tiles)


if __name__ == "__main__":
  main()
