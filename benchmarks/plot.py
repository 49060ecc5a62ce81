"""Plots TFLOP/s against sequence length from benchmark JSON files.

    python benchmarks/plot.py RESULTS.json [RESULTS.json ...] --out PLOT.png

One panel per (pass, causal) pair and head dim found, one line per
implementation; rows with other semantics (windows, documents, dropout,
sparsity) and failed measurements are left out. Needs matplotlib (the
``bench`` extra); measuring does not, so GPU runs write JSON and plots are
drawn anywhere.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict


def series(results):
  """``{(pass, causal, head_dim, dtype): {implementation: [(T, tflops)]}}``
  of the plain rows in ``results``."""
  out = defaultdict(lambda: defaultdict(list))
  for r in results:
    fields = r.get("row_fields")
    if not fields or "error" in r or fields["q_seq"] != fields["kv_seq"]:
      continue
    if (fields.get("window") is not None or fields.get("documents") is not None
        or fields.get("sparsity") is not None or fields.get("dropout")):
      continue
    key = (r["pass"], fields["is_causal"], fields["head_dim"],
           fields["dtype"])
    out[key][r["implementation"]].append((fields["q_seq"], r["tflops"]))
  return {k: {name: sorted(points) for name, points in v.items()}
          for k, v in out.items()}


def plot(paths, out_path: str, title: str | None = None) -> int:
  """Draws the panels into ``out_path``; returns how many were drawn."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  results, environment = [], None
  for path in paths:
    with open(path) as f:
      data = json.load(f)
    results.extend(data["results"])
    environment = environment or data.get("environment")
  panels = series(results)
  if not panels:
    raise SystemExit("no plain rows to plot in " + ", ".join(paths))
  keys = sorted(panels, key=lambda k: (k[2], k[3], k[1], k[0]))
  columns = min(4, len(keys))
  rows = -(-len(keys) // columns)
  fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows),
                           squeeze=False)
  for ax, key in zip(axes.flat, keys):
    mode, causal, head_dim, dtype = key
    for name, points in sorted(panels[key].items()):
      seqs, tflops = zip(*points)
      ax.plot(seqs, tflops, marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_title(f"{mode}, {'causal' if causal else 'non-causal'}, "
                 f"H={head_dim}, {dtype}", fontsize=9)
    ax.set_xlabel("sequence length")
    ax.set_ylabel("TFLOP/s")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  for ax in list(axes.flat)[len(keys):]:
    ax.axis("off")
  if environment:
    fig.suptitle(title or f"{environment['card']}, {environment['date']}, "
                 f"JAX {environment['jax']}")
  fig.tight_layout()
  fig.savefig(out_path, dpi=110)
  plt.close(fig)
  return len(keys)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("results", nargs="+")
  parser.add_argument("--out", required=True)
  parser.add_argument("--title")
  args = parser.parse_args()
  print(f"{plot(args.results, args.out, args.title)} panels -> {args.out}")


if __name__ == "__main__":
  main()
