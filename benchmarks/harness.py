"""Timing and FLOP accounting shared by the benchmarks and the demo.

Method: every implementation is checked against the float32 reference on
fresh random normal inputs before it is timed (a wrong result is reported as
an error, never as a speed). Timing is the wall clock of ``launches``
pipelined calls of one jitted function, synchronised once at the end, after
warm-up; the figure is the median over ``trials`` such batches.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import flash_jax


@dataclasses.dataclass(frozen=True)
class Row:
  """One benchmark shape."""

  batch: int
  q_seq: int
  kv_seq: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  is_causal: bool
  dtype: str = "bfloat16"

  @property
  def label(self) -> str:
    heads = (f"{self.num_heads}" if self.num_heads == self.num_kv_heads
             else f"{self.num_heads}/{self.num_kv_heads}")
    seq = (f"{self.q_seq}" if self.q_seq == self.kv_seq
           else f"{self.q_seq}x{self.kv_seq}")
    causal = ", causal" if self.is_causal else ""
    return (f"B={self.batch} T={seq} N={heads} H={self.head_dim} "
            f"{self.dtype}{causal}")

  def flops(self, backward: bool) -> float:
    """FlashAttention's count: 4*B*N*T*S*H, halved for causal, x3.5 with
    the backward."""
    flops = 4.0 * self.batch * self.num_heads * self.q_seq * self.kv_seq * \
        self.head_dim
    if self.is_causal:
      flops /= 2
    return flops * (3.5 if backward else 1.0)


def draw(row: Row, seed: int = 0):
  keys = jax.random.split(jax.random.key(seed), 4)
  dtype = jnp.dtype(row.dtype)
  shape_q = (row.batch, row.q_seq, row.num_heads, row.head_dim)
  shape_kv = (row.batch, row.kv_seq, row.num_kv_heads, row.head_dim)
  return (jax.random.normal(keys[0], shape_q, dtype),
          jax.random.normal(keys[1], shape_kv, dtype),
          jax.random.normal(keys[2], shape_kv, dtype),
          jax.random.normal(keys[3], shape_q, dtype))


# name -> attention(q, k, v, is_causal) for every implementation compared.
IMPLEMENTATIONS: dict[str, Callable] = {
    "flash_jax": lambda q, k, v, c: flash_jax.dot_product_attention(
        q, k, v, is_causal=c, implementation="pallas_triton"),
    "xla": lambda q, k, v, c: jax.nn.dot_product_attention(
        q, k, v, is_causal=c, implementation="xla"),
    "cudnn": lambda q, k, v, c: jax.nn.dot_product_attention(
        q, k, v, is_causal=c, implementation="cudnn"),
}


def forward_fn(attend, is_causal):
  return jax.jit(lambda q, k, v, do: attend(q, k, v, is_causal))


def forward_backward_fn(attend, is_causal):
  def run(q, k, v, do):
    out, pull = jax.vjp(lambda *a: attend(*a, is_causal), q, k, v)
    return out, pull(do)
  return jax.jit(run)


def relative_error(actual, expected) -> float:
  actual = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
  expected = np.asarray(jnp.asarray(expected, jnp.float32), np.float64)
  if not np.all(np.isfinite(actual)):
    return float("inf")
  return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def check(row: Row, attend, inputs, tolerance: float) -> float:
  """Relative error of output and gradients on batch row 0 against the
  float32 reference; raises if any exceeds ``tolerance``."""
  q, k, v, do = (x[:1] for x in inputs)
  out, grads = forward_backward_fn(attend, row.is_causal)(q, k, v, do)
  f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
  ref_out, ref_grads = forward_backward_fn(
      lambda *a: flash_jax.reference.dot_product_attention(
          *a[:3], is_causal=a[3]), row.is_causal)(*f32)
  errors = [relative_error(out, ref_out)] + [
      relative_error(g, r) for g, r in zip(grads, ref_grads)]
  worst = max(errors)
  if not worst <= tolerance:
    raise AssertionError(
        f"relative errors (out, dq, dk, dv) {errors} exceed {tolerance}")
  return worst


def time_call(fn, args, *, launches: int = 10, trials: int = 7,
              warmup: int = 2) -> float:
  """Median seconds per call over ``trials`` batches of pipelined launches."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  samples = []
  for _ in range(trials):
    start = time.perf_counter()
    results = [fn(*args) for _ in range(launches)]
    jax.block_until_ready(results)
    samples.append((time.perf_counter() - start) / launches)
    del results
  return statistics.median(samples)


def compiled_scratch_bytes(fn, args) -> int | None:
  try:
    stats = fn.lower(*args).compile().memory_analysis()
    return int(stats.temp_size_in_bytes)
  except Exception:  # memory_analysis is unavailable on some backends
    return None


def measure(row: Row, names, *, tolerance: float = 2e-2, seed: int = 0):
  """Checks then times each implementation on ``row``.

  Returns a list of dicts, one per (implementation, pass) with seconds,
  TFLOP/s and compiled scratch, or an ``error`` string.
  """
  inputs = draw(row, seed)
  results = []
  for name in names:
    attend = IMPLEMENTATIONS[name]
    entry = {"row": row.label, "implementation": name}
    try:
      entry["max_relative_error"] = check(row, attend, inputs, tolerance)
    except Exception as e:  # noqa: BLE001 - reported, never timed
      for mode in ("fwd", "fwd+bwd"):
        results.append({**entry, "pass": mode,
                        "error": f"{type(e).__name__}: {str(e)[:300]}"})
      continue
    for mode, make in (("fwd", forward_fn), ("fwd+bwd", forward_backward_fn)):
      fn = make(attend, row.is_causal)
      try:
        seconds = time_call(fn, inputs)
      except Exception as e:  # noqa: BLE001 - e.g. out of memory
        results.append({**entry, "pass": mode,
                        "error": f"{type(e).__name__}: {str(e)[:300]}"})
        continue
      results.append({
          **entry, "pass": mode, "seconds": seconds,
          "tflops": row.flops(mode == "fwd+bwd") / seconds / 1e12,
          "scratch_bytes": compiled_scratch_bytes(fn, inputs)})
  return results


def environment() -> dict:
  device = jax.devices()[0]
  return {
      "card": device.device_kind,
      "platform": device.platform,
      "date": datetime.date.today().isoformat(),
      "jax": jax.__version__,
      "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__")
      else None,
  }


def ratio_table(results) -> str:
  """Markdown: TFLOP/s per implementation and flash_jax's ratios."""
  by_key = {}
  for r in results:
    by_key.setdefault((r["row"], r["pass"]), {})[r["implementation"]] = r
  names = sorted({r["implementation"] for r in results},
                 key=list(IMPLEMENTATIONS).index)
  header = ("| case | pass | " + " | ".join(f"{n} TFLOP/s" for n in names)
            + " | flash_jax / cudnn | flash_jax / xla |")
  lines = [header, "|" + "---|" * (header.count("|") - 1)]
  for (label, mode), entries in by_key.items():
    cells = []
    for n in names:
      e = entries.get(n)
      cells.append("–" if e is None else
                   "error" if "error" in e else f"{e['tflops']:.1f}")
    def ratio(other):
      a, b = entries.get("flash_jax"), entries.get(other)
      if not a or not b or "error" in a or "error" in b:
        return "–"
      return f"{b['seconds'] / a['seconds']:.2f}x"
    lines.append(f"| {label} | {mode} | " + " | ".join(cells) +
                 f" | {ratio('cudnn')} | {ratio('xla')} |")
  return "\n".join(lines)


def write_results(results, name: str, directory: str | None = None) -> str:
  """Writes ``<name>.json`` and ``<name>.md`` under
  ``benchmarks/results/<card>/`` (or ``directory``); returns the markdown."""
  env = environment()
  card = env["card"].replace(" ", "_").replace("/", "_")
  directory = directory or os.path.join(os.path.dirname(__file__), "results",
                                        card)
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, f"{name}.json"), "w") as f:
    json.dump({"environment": env, "results": results}, f, indent=1)
  markdown = (f"# {name}\n\n{env['card']}, {env['date']}, JAX {env['jax']}."
              "\n\nTFLOP/s by FlashAttention's count (4·B·N·T·S·H, halved for "
              "causal, x3.5 for fwd+bwd); ratios are speed-ups of flash_jax "
              "measured in the same run.\n\n" + ratio_table(results) + "\n")
  errors = [r for r in results if "error" in r]
  if errors:
    markdown += "\nErrors:\n" + "".join(
        f"- {e['implementation']} {e['row']} {e['pass']}: {e['error']}\n"
        for e in errors)
  with open(os.path.join(directory, f"{name}.md"), "w") as f:
    f.write(markdown)
  return markdown
