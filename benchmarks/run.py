"""Runs a named set of benchmark rows on the GPU it finds.

    python benchmarks/run.py foundation [--out DIR]

Writes ``<set>.md`` and ``<set>.json`` under ``benchmarks/results/<card>/``
(and a copy under ``--out``), then prints the markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness  # noqa: E402
from benchmarks.harness import Row  # noqa: E402

ROW_SETS = {
    # Issue 2's row: bf16, B=4 T=S=4096 N=16 H=128, causal and not.
    "foundation": [Row(4, 4096, 4096, 16, 16, 128, False),
                   Row(4, 4096, 4096, 16, 16, 128, True)],
}


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("row_set", choices=sorted(ROW_SETS))
  parser.add_argument("--out", help="also copy the results here")
  parser.add_argument("--implementations", default="flash_jax,xla,cudnn")
  args = parser.parse_args()
  names = args.implementations.split(",")
  results = []
  for row in ROW_SETS[args.row_set]:
    print(f"measuring {row.label}", flush=True)
    results.extend(harness.measure(row, names))
  markdown = harness.write_results(results, args.row_set)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    harness.write_results(results, args.row_set, directory=args.out)
  print(markdown)


if __name__ == "__main__":
  main()
