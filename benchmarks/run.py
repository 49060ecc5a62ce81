"""Runs named sets of benchmark rows on the GPU it finds.

    python benchmarks/run.py SET [SET ...] [--out DIR] [--rows START:STOP]
        [--implementations ...]
    python benchmarks/run.py --list

Each set writes ``<set>.md``, ``<set>.csv`` and ``<set>.json`` under
``benchmarks/results/<card>/`` and prints the markdown table. The files are
rewritten after every row (under ``--out`` when given, and copied to
``benchmarks/results/<card>/`` when the set finishes); ``--rows`` measures a
slice of each set's rows and names the files ``<set>_rows<START>-<STOP>``.
``benchmarks/plot.py`` turns the JSON into a PNG.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flash_jax  # noqa: E402
from benchmarks import harness  # noqa: E402
from benchmarks.harness import Comparison, Row  # noqa: E402


@dataclasses.dataclass(frozen=True)
class BenchSet:
  """Rows measured together, and the comparisons drawn from them."""

  rows: tuple[Row, ...]
  comparisons: tuple[Comparison, ...] = ()
  implementations: tuple[str, ...] = ("flash_jax", "xla", "cudnn")


SEQUENCES = (512, 1024, 2048, 4096, 8192, 16384)


def _tokens_rows(head_dim: int) -> tuple[Row, ...]:
  """Issue 5's sweep: bf16, B*T = 16k tokens, N*H = 2048, causal and not."""
  return tuple(Row(16384 // t, t, t, 2048 // head_dim, 2048 // head_dim,
                   head_dim, causal)
               for t in SEQUENCES for causal in (False, True))


# Issue 3's feature rows.
_DOCS = Row(1, 16384, 16384, 16, 16, 128, True, documents=12)
_DENSE = Row(1, 8192, 8192, 16, 16, 128, False)
_SPARSE = dataclasses.replace(_DENSE, sparsity=0.9)
_CAUSAL_32K = Row(1, 32768, 32768, 16, 16, 128, True)
_WINDOW_32K = dataclasses.replace(_CAUSAL_32K, window=4096)
_NO_DROPOUT = Row(4, 4096, 4096, 16, 16, 128, False)
_DROPOUT = dataclasses.replace(_NO_DROPOUT, dropout=0.1)

ROW_SETS = {
    # Issue 2's row: bf16, B=4 T=S=4096 N=16 H=128, causal and not.
    "foundation": BenchSet((Row(4, 4096, 4096, 16, 16, 128, False),
                            Row(4, 4096, 4096, 16, 16, 128, True))),
    # Issue 5's suite, in parts that each fit one 10-minute GPU command.
    "suite_h128": BenchSet(_tokens_rows(128)),
    "suite_h64": BenchSet(_tokens_rows(64)),
    "suite_h256": BenchSet(_tokens_rows(256)),
    "suite_gqa": BenchSet(tuple(
        Row(16384 // t, t, t, 32, 8, 64, causal)
        for t in (1024, 4096, 16384) for causal in (False, True))),
    "suite_long": BenchSet(tuple(
        Row(1, t, t, 16, 16, 128, causal)
        for t in (32768, 65536, 131072) for causal in (False, True)) + (
            # The memory target: fwd+bwd at 128k causal, N=8.
            Row(1, 131072, 131072, 8, 8, 128, True),)),
    "suite_dtypes": BenchSet(tuple(
        Row(4, 4096, 4096, 16, 16, 128, causal, dtype)
        for dtype in ("float16", "float32") for causal in (False, True))),
    # Issue 6's rows: the Hopper backend's default (deterministic)
    # backward and its deterministic=False one against cuDNN (sm90 only;
    # the Triton and XLA columns are in the suite sets).
    "hopper": BenchSet(
        tuple(Row(16384 // t, t, t, 16, 16, 128, causal)
              for t in (4096, 16384) for causal in (False, True)) + (
            Row(4, 4096, 4096, 32, 32, 64, False),
            Row(4, 4096, 4096, 32, 32, 64, True),
            Row(4, 4096, 4096, 8, 8, 256, False),
            Row(4, 4096, 4096, 8, 8, 256, True),
            Row(32, 512, 512, 32, 32, 64, False),
            Row(32, 512, 512, 32, 32, 64, True)),
        implementations=("flash_jax_mosaic",
                         "flash_jax_mosaic_nondeterministic", "cudnn")),
    # Issue 3's feature benchmarks.
    "features": BenchSet(
        (_DOCS, _DENSE, _SPARSE, _CAUSAL_32K, _WINDOW_32K, _NO_DROPOUT,
         _DROPOUT),
        comparisons=(
            Comparison("sparse (90% empty blocks) vs dense", _SPARSE, _DENSE,
                       target=5.0),
            Comparison("window 4096 vs full causal at 32k", _WINDOW_32K,
                       _CAUSAL_32K, target=6.0),
            Comparison("dropout 0.1 vs none", _DROPOUT, _NO_DROPOUT,
                       max_slowdown=0.15),
        )),
}


def run_set(name: str, implementations=None, out: str | None = None,
            rows: slice = slice(None)) -> str:
  """Measures the set's rows (or the ``rows`` slice of them).

  The results are rewritten after each row, so that an interrupted run
  keeps what it measured: under ``out`` when given (the files under
  ``benchmarks/results/<card>/`` are then replaced only when the run
  finishes), else under ``benchmarks/results/<card>/``. A slice writes
  ``<name>_rows<start>-<stop>``.
  """
  bench = ROW_SETS[name]
  names = implementations or bench.implementations
  capability = flash_jax.platform.compute_capability()
  if (implementations is None and capability and capability[0] == 9
      and not any(n.startswith("flash_jax_mosaic") for n in names)):
    names = ("flash_jax_mosaic",) + tuple(names)  # the Hopper backend too
  selected = bench.rows[rows]
  if rows != slice(None):
    start, stop, _ = rows.indices(len(bench.rows))
    name = f"{name}_rows{start}-{stop}"
  results, markdown = [], ""
  for row in selected:
    print(f"measuring {row.label}", flush=True)
    results.extend(harness.measure(row, names))
    # Under --out (or, without it, benchmarks/results/<card>/).
    markdown = harness.write_results(results, name, directory=out,
                                     comparisons=bench.comparisons)
  if out:  # the committed copy is replaced only by a finished run
    markdown = harness.write_results(results, name,
                                     comparisons=bench.comparisons)
  return markdown


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("row_sets", nargs="*", metavar="SET",
                      help=f"one or more of {', '.join(ROW_SETS)}")
  parser.add_argument("--list", action="store_true", help="list the sets")
  parser.add_argument("--out", help="also copy the results here")
  parser.add_argument("--rows", default=":",
                      help="a slice START:STOP of each set's rows (write "
                      "--rows=-2: for a negative start)")
  parser.add_argument("--implementations",
                      help="comma-separated (default: the set's)")
  args = parser.parse_args()
  if args.list or not args.row_sets:
    for name, bench in ROW_SETS.items():
      print(f"{name}: {len(bench.rows)} rows")
    return
  unknown = [name for name in args.row_sets if name not in ROW_SETS]
  if unknown:
    parser.error(f"unknown sets {unknown}; choose from {list(ROW_SETS)}")
  names = args.implementations.split(",") if args.implementations else None
  match = re.fullmatch(r"(-?\d*):(-?\d*)", args.rows)
  if not match:
    parser.error(f"--rows {args.rows!r}: expected START:STOP (either may be "
                 "empty, e.g. 0:6 or 6:)")
  start, stop = (int(x) if x else None for x in match.groups())
  rows = slice(start, stop)
  for name in args.row_sets:
    print(run_set(name, names, args.out, rows), flush=True)


if __name__ == "__main__":
  main()
