"""Autotunes the Triton-backend kernels on the live GPU and writes the table.

    python benchmarks/autotune.py [--head-dims 64,128,256] [--dtypes bfloat16]
        [--causal both] [--seq 4096] [--table PATH] [--log DIR]

For each (head dim, dtype, causal) it searches a small space, one kernel at
a time: first the forward kernel's tile, warps and stages (timing the
forward), then the dK/dV kernel's (timing forward+backward with the best
forward), then the dQ kernel's. Candidates that the ahead-of-time resource
estimate rejects for this GPU are never compiled; one that fails anyway is
logged and skipped. Every timed candidate is first checked against the
reference (a wrong result is never tuned for). The winners go into
``flash_jax/backends/pallas_triton/tuned_configs.py`` (merged with entries
for other GPUs and keys), which the backend reads automatically.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import pprint
import sys
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flash_jax  # noqa: E402
from flash_jax import platform  # noqa: E402
from flash_jax.backends.pallas_triton import tuned_configs, tuning  # noqa: E402
from flash_jax.backends.pallas_triton.tuning import (  # noqa: E402
    KernelTiling, Tiling)

TABLE_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), "flash_jax", "backends", "pallas_triton", "tuned_configs.py")

# The search space per kernel: (block_q, block_kv) x warps x stages.
SPACE = {
    "forward": ([(128, 64), (128, 128), (64, 64), (128, 32), (64, 128)],
                [4, 8], [2, 3, 4]),
    "dkv": ([(32, 128), (64, 128), (64, 64), (32, 64), (128, 128)],
            [4, 8], [2, 3]),
    "dq": ([(128, 32), (64, 64), (128, 64), (64, 32), (128, 128)],
           [4, 8], [2, 3]),
}
FIELDS = {
    "forward": ("block_q", "block_kv", "num_warps_fwd", "num_stages_fwd"),
    "dkv": ("block_q_dkv", "block_kv_dkv", "num_warps_dkv", "num_stages_dkv"),
    "dq": ("block_q_dq", "block_kv_dq", "num_warps_dq", "num_stages_dq"),
}


def candidates(kernel: str, head_dim: int, item_bytes: int, capability):
  """The kernel's search space, less what cannot fit this GPU."""
  blocks, warps, stages = SPACE[kernel]
  for (bq, bkv), w, s in itertools.product(blocks, warps, stages):
    t = KernelTiling(bq, bkv, w, s)
    if tuning.check_fits(kernel, t, head_dim, head_dim, item_bytes,
                         capability) is None:
      yield t


def block_sizes(tiling: Tiling) -> flash_jax.BlockSizes:
  """A `BlockSizes` that pins every kernel to ``tiling``."""
  values = {}
  for kernel, names in FIELDS.items():
    t = getattr(tiling, kernel)
    values.update(zip(names, (t.block_q, t.block_kv, t.num_warps,
                              t.num_stages)))
  return flash_jax.BlockSizes(**values)


# A challenger must beat the incumbent by this much: closer results are run
# noise (a few percent on these machines), and a noise win at the tuning
# length can lose at others (a causal forward tile that won by 2.4% at 4k
# ran 11% slower at 16k).
MARGIN = 0.03


def search(start: Tiling, time_fn: Callable[[str, Tiling], float],
           spaces: dict, log: list, margin: float = MARGIN) -> Tiling:
  """Coordinate search, one kernel at a time in the order of ``spaces``.

  ``time_fn(kernel, tiling)`` returns seconds (the forward alone for
  ``"forward"``, forward+backward otherwise) or raises; failures are logged
  and skipped. The starting tiling is timed first and stays unless a
  candidate is faster by more than ``margin``.
  """
  best = start
  for kernel, space in spaces.items():
    incumbent = getattr(start, kernel)
    order = [incumbent] + [t for t in space if t != incumbent]
    trials = []
    for t in order:
      trial = dataclasses.replace(best, **{kernel: t})
      try:
        seconds = time_fn(kernel, trial)
      except Exception as e:  # noqa: BLE001 - a candidate that fails is skipped
        log.append({"kernel": kernel, "tiling": t.__dict__,
                    "error": f"{type(e).__name__}: {str(e)[:200]}"})
        continue
      log.append({"kernel": kernel, "tiling": t.__dict__, "seconds": seconds})
      print(f"  {kernel} {t}: {seconds * 1e3:.3f} ms", flush=True)
      trials.append((t, seconds))
    winner = pick(incumbent, trials, margin)
    best = dataclasses.replace(best, **{kernel: winner})
  return best


def pick(incumbent: KernelTiling, trials, margin: float = MARGIN
         ) -> KernelTiling:
  """The fastest of ``trials`` (``(tiling, seconds)`` pairs) if it beats
  ``incumbent``'s time by more than ``margin``, else ``incumbent``."""
  timed = dict(trials)
  if not timed:
    return incumbent
  fastest = min(timed, key=timed.get)
  if incumbent in timed and timed[fastest] > timed[incumbent] * (1 - margin):
    return incumbent
  return fastest


def replay(log: list, margin: float = MARGIN) -> dict:
  """Re-picks each key's tiling from a saved search log (``--log``'s
  ``autotune.json``) with ``pick``: key -> Tiling."""
  entries = {}
  for record in log:
    best = Tiling.from_dict(record["start"])
    for kernel in FIELDS:
      trials = [(KernelTiling(**t["tiling"]), t["seconds"])
                for t in record["trials"]
                if t["kernel"] == kernel and "seconds" in t]
      best = dataclasses.replace(
          best, **{kernel: pick(getattr(best, kernel), trials, margin)})
    entries[record["key"]] = best
  return entries


def write_table(entries: dict, path: str = TABLE_PATH) -> None:
  """Merges ``entries`` (key -> Tiling) into the tuned table module."""
  table = dict(tuned_configs.TUNED)
  table.update({key: tiling.as_dict() for key, tiling in entries.items()})
  header = tuned_configs.__doc__.split("\n\nNo tuned entries yet")[0]
  with open(path, "w") as f:
    f.write(f'"""{header.strip()}\n"""\n\nTUNED: dict[str, dict] = ')
    f.write(pprint.pformat(dict(sorted(table.items())), indent=1, width=78))
    f.write("\n")


def _live_time_fn(head_dim: int, dtype: str, causal: bool, seq: int,
                  batch_tokens: int):
  """Times the real kernels (checked against the reference first)."""
  from benchmarks import harness

  heads = max(1, 2048 // head_dim)
  row = harness.Row(max(1, batch_tokens // seq), seq, seq, heads, heads,
                    head_dim, causal, dtype)
  inputs = harness.draw(row)
  args = (inputs.q, inputs.k, inputs.v, inputs.do)

  def time_fn(kernel: str, tiling: Tiling) -> float:
    sizes = block_sizes(tiling)
    make = lambda row, inputs: (lambda q, k, v: flash_jax.dot_product_attention(
        q, k, v, is_causal=row.is_causal, implementation="pallas_triton",
        block_sizes=sizes))
    harness.check(row, make, inputs, tolerance=2e-2)
    fn = (harness.forward_fn if kernel == "forward"
          else harness.forward_backward_fn)(make(row, inputs))
    return harness.time_call(fn, args, trials=3)

  return time_fn


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--head-dims", default="64,128,256")
  parser.add_argument("--dtypes", default="bfloat16")
  parser.add_argument("--causal", choices=["both", "yes", "no"],
                      default="both")
  parser.add_argument("--seq", type=int, default=4096)
  parser.add_argument("--batch-tokens", type=int, default=16384)
  parser.add_argument("--table", default=TABLE_PATH)
  parser.add_argument("--log", help="directory for the search log (JSON)")
  parser.add_argument("--replay", metavar="JSON",
                      help="rewrite the table from a saved search log "
                      "instead of searching (no GPU needed)")
  parser.add_argument("--keys", help="with --replay: only these table keys "
                      "(comma-separated); a log may hold keys that a later "
                      "search superseded")
  args = parser.parse_args()
  if args.keys and not args.replay:
    parser.error("--keys only applies to --replay")
  if args.replay:
    with open(args.replay) as f:
      entries = replay(json.load(f))
    if args.keys:
      wanted = args.keys.split(",")
      missing = sorted(set(wanted) - set(entries))
      if missing:
        parser.error(f"{args.replay} holds no {missing}; it holds "
                     f"{sorted(entries)}")
      entries = {key: entries[key] for key in wanted}
    for key, tiling in entries.items():
      print(f"{key}: {tiling}")
    write_table(entries, args.table)
    print(f"wrote {len(entries)} entries to {args.table}")
    return
  capability = platform.compute_capability()
  if capability is None:
    raise SystemExit("autotune needs an NVIDIA GPU")
  causal_values = {"both": (False, True), "yes": (True,), "no": (False,)}[
      args.causal]
  entries, log = {}, []
  for head_dim, dtype, causal in itertools.product(
      [int(h) for h in args.head_dims.split(",")], args.dtypes.split(","),
      causal_values):
    item_bytes = 4 if dtype == "float32" else 2
    key = tuning.table_key(capability, head_dim, item_bytes == 4, causal)
    start = tuning.resolve_tiling(
        None, head_dim=head_dim, value_dim=head_dim, item_bytes=item_bytes,
        causal=causal, q_seq=args.seq, kv_seq=args.seq,
        capability=capability, check_resources=True)
    spaces = {kernel: list(candidates(kernel, head_dim, item_bytes,
                                      capability)) for kernel in SPACE}
    key_log = []
    best = search(start, _live_time_fn(head_dim, dtype, causal, args.seq,
                                       args.batch_tokens), spaces, key_log)
    log.append({"key": key, "start": start.as_dict(), "best": best.as_dict(),
                "trials": key_log})
    entries[key] = best
    print(f"{key}: {best}", flush=True)
    # Written after every key, so an interrupted run keeps finished keys.
    write_table(entries, args.table)
    if args.log:
      os.makedirs(args.log, exist_ok=True)
      with open(os.path.join(args.log, "autotune.json"), "w") as f:
        json.dump(log, f, indent=1)
  print(f"wrote {len(entries)} entries to {args.table}")


if __name__ == "__main__":
  main()
