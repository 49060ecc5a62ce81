"""What do two forward-path changes buy? Times the Pallas kernels with each
switched off, in one process (a probe, not a benchmark row).

    python benchmarks/schedule_probe.py [--variants base,heavy_first,fold,both]
        [--cases 4096,4096c,16384c] [--implementations flash_jax,...]

The two changes:

* ``heavy_first``: query-major kernels (forward, dQ) own query blocks last
  first (`flash_jax.masks.heavy_first`), so under a causal mask the longest
  programs start first. Off: program ``i`` owns block ``i``.
* ``fold``: the Hopper forward applies the logit scale after the row max,
  so that ``s * c - m`` can be one multiply-add per element
  (`ForwardParams.folds_scale`). Off: scaled logits first. (The same change
  in the Triton forward measured no gain on an H100, -3% to +1%, and was
  dropped: `benchmarks/NOTES.md`, session 6.)

Variants: ``base`` (both off), ``heavy_first``, ``fold``, ``both`` (the
shipped kernels). A case is ``T`` (non-causal) or ``Tc`` (causal) at
B*T = 16k tokens, N=16, H=128, bf16; ``T/H`` or ``Tc/H`` sets head dim H
(N = 2048 / H). Other schedules are harness implementations
(``--implementations flash_jax_mosaic_pingpong,...``). ``cudnn``
(jax.nn's) is timed once per case, for the ratio. Every variant computes the same function; the test
suite checks the shipped kernels, and each timing here is preceded by the
harness's check against the reference.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import importlib  # noqa: E402

import jax  # noqa: E402

from benchmarks import harness  # noqa: E402

# By module path: the backend packages export functions named `forward`.
mosaic_forward = importlib.import_module(
    "flash_jax.backends.pallas_mosaic_gpu.forward")
triton_common = importlib.import_module(
    "flash_jax.backends.pallas_triton.common")

VARIANTS = {"base": (False, False), "heavy_first": (True, False),
            "fold": (False, True), "both": (True, True)}

_SHIPPED = (triton_common.KernelParams.q_block_of,
            mosaic_forward.ForwardParams.q_tile_of,
            mosaic_forward.ForwardParams.folds_scale)


def _set_variant(heavy_first: bool, fold: bool) -> None:
  q_block_of, q_tile_of, folds_scale = _SHIPPED
  identity = lambda self, program: program
  triton_common.KernelParams.q_block_of = (q_block_of if heavy_first
                                           else identity)
  mosaic_forward.ForwardParams.q_tile_of = (q_tile_of if heavy_first
                                            else identity)
  mosaic_forward.ForwardParams.folds_scale = (
      folds_scale if fold else property(lambda self: False))
  jax.clear_caches()


def _row(case: str) -> harness.Row:
  """``T``, ``Tc`` (causal), optionally ``/H`` for head dim ``H`` (N*H =
  2048)."""
  case, _, head_dim = case.partition("/")
  head_dim = int(head_dim or 128)
  causal = case.endswith("c")
  seq = int(case.rstrip("c"))
  return harness.Row(16384 // seq, seq, seq, 2048 // head_dim,
                     2048 // head_dim, head_dim, causal)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--cases", default="4096,4096c,16384c")
  parser.add_argument("--implementations", default="flash_jax,flash_jax_mosaic",
                      help="harness.IMPLEMENTATIONS names")
  parser.add_argument("--passes", default="fwd,fwd+bwd")
  args = parser.parse_args()
  modes = tuple(args.passes.split(","))
  unknown = set(args.variants.split(",")) - set(VARIANTS)
  if unknown:
    parser.error(f"unknown variants {sorted(unknown)}; choose from "
                 f"{list(VARIANTS)}")
  print(f"{jax.devices()[0].device_kind}, JAX {jax.__version__}", flush=True)
  print("case     pass     implementation     variant          ms  "
        "cudnn/this", flush=True)
  for case in args.cases.split(","):
    row = _row(case)
    cudnn = {}
    plan = [("cudnn", "-")] + [
        (impl, variant) for impl in args.implementations.split(",")
        for variant in args.variants.split(",")]
    for impl, variant in plan:
      _set_variant(*VARIANTS.get(variant, (True, True)))  # cudnn: "-"
      start = time.perf_counter()
      for entry in harness.measure(row, [impl], modes=modes, trials=5):
        mode = entry["pass"]
        head = f"{case:8s} {mode:8s} {impl:36s} {variant:11s}"
        if "error" in entry:
          print(f"{head} error {entry['error'][:300]}", flush=True)
          continue
        seconds = entry["seconds"]
        if impl == "cudnn":
          cudnn[mode] = seconds
        ratio = f"{cudnn[mode] / seconds:6.3f}x" if mode in cudnn else "   -"
        print(f"{head} {seconds * 1e3:8.3f}  {ratio}", flush=True)
      print(f"   ({impl} {variant}: {time.perf_counter() - start:.0f} s)",
            flush=True)
  _set_variant(True, True)


if __name__ == "__main__":
  main()
