"""Timing, checking and FLOP accounting shared by the benchmarks and the demo.

Method (the README's "Benchmarks" section says the same):

* Inputs are fresh random normal arrays (never zeros), drawn per row.
* Every implementation is checked against the float32 reference before it is
  timed: output and gradients, relative L2 error. A wrong result (or a
  crash) is reported as an error, never as a speed. Rows too large for the
  O(T*S) reference are checked on their last query rows (``CHECK_ROWS``):
  the output, lse and dQ of a query row depend only on that row, so slicing
  the queries (with bottom-right causal alignment, which keeps every row's
  diagonal) gives an exact reference for them.
* Timing: two warm-up calls, then the median over ``trials`` batches of
  pipelined launches of one jitted function, synchronised once per batch.
  The launch count adapts so a batch lasts about 0.1 s.
* FLOPs by FlashAttention's count: 4*B*N*T*S*H, halved for causal, x3.5 for
  forward+backward. Masked rows (window, documents, sparse) use the same
  nominal count, so compare their times, not their TFLOP/s.
* Memory from XLA's compiled-program analysis: ``scratch`` is the temporary
  buffer size (beyond arguments and outputs), ``peak`` adds arguments and
  outputs.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import io
import json
import os
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import flash_jax

# Reference checks materialise [rows, N, T_checked, S] float32 several
# times; above this many score elements the check slices the query rows.
CHECK_ELEMENTS = 1 << 28
CHECK_ROWS = 512


@dataclasses.dataclass(frozen=True)
class Row:
  """One benchmark shape and its semantics.

  Attributes:
    batch, q_seq, kv_seq, num_heads, num_kv_heads, head_dim: B, T, S, N, K, H.
    is_causal: causal masking (top-left, as in jax.nn).
    dtype: of q, k, v.
    window: a left window ``(window, 0)`` (with causal: sliding window).
    documents: packed documents of equal length (segment ids); jax.nn gets
      the equivalent dense mask.
    sparsity: fraction of 128x128 blocks masked out by a random dense block
      mask (diagonal blocks always kept, so no row is empty).
    dropout: dropout rate (flash_jax only; jax.nn has no dropout).
  """

  batch: int
  q_seq: int
  kv_seq: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  is_causal: bool
  dtype: str = "bfloat16"
  window: int | None = None
  documents: int | None = None
  sparsity: float | None = None
  dropout: float = 0.0

  @property
  def label(self) -> str:
    heads = (f"{self.num_heads}" if self.num_heads == self.num_kv_heads
             else f"{self.num_heads}/{self.num_kv_heads}")
    seq = (f"{self.q_seq}" if self.q_seq == self.kv_seq
           else f"{self.q_seq}x{self.kv_seq}")
    extras = [self.dtype] + (["causal"] if self.is_causal else [])
    if self.window is not None:
      extras.append(f"window {self.window}")
    if self.documents is not None:
      extras.append(f"{self.documents} docs")
    if self.sparsity is not None:
      extras.append(f"{self.sparsity:.0%} empty blocks")
    if self.dropout:
      extras.append(f"dropout {self.dropout}")
    return (f"B={self.batch} T={seq} N={heads} H={self.head_dim} "
            + ", ".join(extras))

  def attended_pairs(self) -> int | None:
    """(query, key) pairs one head of one batch row attends, from causal,
    window and documents (None with a random sparsity mask). The ratio of
    two rows' counts bounds the speed-up block skipping can give."""
    if self.sparsity is not None:
      return None
    i = np.arange(self.q_seq)
    hi = np.minimum(i, self.kv_seq - 1) if self.is_causal else np.full_like(
        i, self.kv_seq - 1)
    lo = np.zeros_like(i)
    if self.window is not None:  # local_window_size=(window, 0)
      lo = np.maximum(lo, i - self.window)
      hi = np.minimum(hi, i)
    if self.documents is not None:  # the segment ids `draw` makes
      q_ids = i * self.documents // self.q_seq
      kv_ids = np.arange(self.kv_seq) * self.documents // self.kv_seq
      lo = np.maximum(lo, np.searchsorted(kv_ids, q_ids, "left"))
      hi = np.minimum(hi, np.searchsorted(kv_ids, q_ids, "right") - 1)
    return int(np.maximum(hi - lo + 1, 0).sum())

  def flops(self, backward: bool) -> float:
    """FlashAttention's count: 4*B*N*T*S*H, halved for causal, x3.5 with
    the backward."""
    flops = 4.0 * self.batch * self.num_heads * self.q_seq * self.kv_seq * \
        self.head_dim
    if self.is_causal:
      flops /= 2
    return flops * (3.5 if backward else 1.0)


@dataclasses.dataclass
class Inputs:
  """Random operands of one row and the arrays its semantics need."""

  q: jax.Array
  k: jax.Array
  v: jax.Array
  do: jax.Array
  q_segment_ids: jax.Array | None = None
  kv_segment_ids: jax.Array | None = None
  mask: jax.Array | None = None
  dropout_rng: jax.Array | None = None


def _sparse_block_mask(rng, row: Row, block: int = 128):
  """A dense ``[1, 1, T, S]`` mask built from a random block pattern."""
  num_q, num_kv = -(-row.q_seq // block), -(-row.kv_seq // block)
  keep = jax.random.uniform(rng, (num_q, num_kv)) >= row.sparsity
  keep = keep | jnp.eye(num_q, num_kv, dtype=bool)
  mask = jnp.repeat(jnp.repeat(keep, block, 0), block, 1)
  return mask[:row.q_seq, :row.kv_seq][None, None]


def draw(row: Row, seed: int = 0) -> Inputs:
  """Fresh random normal operands (and masks) for ``row``."""
  keys = jax.random.split(jax.random.key(seed), 6)
  dtype = jnp.dtype(row.dtype)
  shape_q = (row.batch, row.q_seq, row.num_heads, row.head_dim)
  shape_kv = (row.batch, row.kv_seq, row.num_kv_heads, row.head_dim)
  inputs = Inputs(q=jax.random.normal(keys[0], shape_q, dtype),
                  k=jax.random.normal(keys[1], shape_kv, dtype),
                  v=jax.random.normal(keys[2], shape_kv, dtype),
                  do=jax.random.normal(keys[3], shape_q, dtype))
  if row.documents is not None:
    ids = lambda n: jnp.broadcast_to(
        (jnp.arange(n) * row.documents // n).astype(jnp.int32),
        (row.batch, n))
    inputs.q_segment_ids, inputs.kv_segment_ids = ids(row.q_seq), ids(
        row.kv_seq)
  if row.sparsity is not None:
    inputs.mask = _sparse_block_mask(keys[4], row)
  if row.dropout:
    inputs.dropout_rng = keys[5]
  return inputs


def semantics(row: Row, inputs: Inputs) -> dict:
  """flash_jax keyword arguments for the row's semantics."""
  kwargs = dict(is_causal=row.is_causal)
  if row.window is not None:
    kwargs["local_window_size"] = (row.window, 0)
  if inputs.q_segment_ids is not None:
    kwargs.update(query_segment_ids=inputs.q_segment_ids,
                  kv_segment_ids=inputs.kv_segment_ids)
  if inputs.mask is not None:
    kwargs["mask"] = inputs.mask
  if row.dropout:
    kwargs.update(dropout_rate=row.dropout, dropout_rng=inputs.dropout_rng)
  return kwargs


def jax_nn_semantics(row: Row, inputs: Inputs) -> dict:
  """The same semantics for jax.nn.dot_product_attention (segments become a
  dense mask; dropout is refused)."""
  if row.dropout:
    raise NotImplementedError("jax.nn.dot_product_attention has no dropout")
  kwargs = dict(is_causal=row.is_causal)
  if row.window is not None:
    kwargs["local_window_size"] = (row.window, 0)
  mask = inputs.mask
  if inputs.q_segment_ids is not None:
    mask = (inputs.q_segment_ids[:, None, :, None]
            == inputs.kv_segment_ids[:, None, None, :])
  if mask is not None:
    kwargs["mask"] = mask
  return kwargs


def _flash(implementation, block_sizes=None, **options):
  def make(row, inputs):
    kwargs = semantics(row, inputs)
    return lambda q, k, v: flash_jax.dot_product_attention(
        q, k, v, implementation=implementation, block_sizes=block_sizes,
        **options, **kwargs)
  return make


def _jax_nn(implementation):
  def make(row, inputs):
    kwargs = jax_nn_semantics(row, inputs)
    return lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, implementation=implementation, **kwargs)
  return make


# name -> make(row, inputs) -> attend(q, k, v), for every implementation
# compared. "flash_jax" is the portable Triton-backend kernel;
# "flash_jax_default" is what implementation=None picks (on sm90 the Hopper
# backend where it takes the call).
IMPLEMENTATIONS: dict[str, Callable] = {
    "flash_jax": _flash("pallas_triton"),
    "flash_jax_default": _flash(None),
    # The Hopper backend, as its own column (sm90 only), with its defaults
    # and with the ping-pong schedule forced on and off (either keeps two
    # consumer warpgroups; the default takes ping-pong at head dims 64 and
    # 128, except where it runs three consumers at 64).
    "flash_jax_mosaic": _flash("pallas_mosaic_gpu"),
    "flash_jax_mosaic_pingpong": _flash(
        "pallas_mosaic_gpu", flash_jax.BlockSizes(ping_pong=True)),
    "flash_jax_mosaic_no_pingpong": _flash(
        "pallas_mosaic_gpu", flash_jax.BlockSizes(ping_pong=False)),
    # Its backward with deterministic=False (dQ reduce-added by the dK/dV
    # kernel, head dims up to 128).
    "flash_jax_mosaic_nondeterministic": _flash("pallas_mosaic_gpu",
                                                deterministic=False),
    "xla": _jax_nn("xla"),
    "cudnn": _jax_nn("cudnn"),
}


def forward_fn(attend):
  return jax.jit(lambda q, k, v, do: attend(q, k, v))


def forward_backward_fn(attend):
  def run(q, k, v, do):
    out, pull = jax.vjp(attend, q, k, v)
    return out, pull(do)
  return jax.jit(run)


def relative_error(actual, expected) -> float:
  actual = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
  expected = np.asarray(jnp.asarray(expected, jnp.float32), np.float64)
  if not np.all(np.isfinite(actual)):
    return float("inf")
  norm = np.linalg.norm(expected)
  return float(np.linalg.norm(actual - expected) / max(norm, 1e-30))


def check(row: Row, make_attend, inputs: Inputs, tolerance: float) -> float:
  """Worst relative error of out and gradients (batch row 0) against the
  float32 reference; raises AssertionError above ``tolerance``.

  Large rows are checked on their last ``CHECK_ROWS`` query rows only
  (out and dQ; dK and dV sum over all queries, so they are not comparable
  on a slice).
  """
  one = dataclasses.replace(row, batch=1)
  first = lambda x: None if x is None else x[:1]
  sub = Inputs(*(first(getattr(inputs, f.name)) if f.name != "dropout_rng"
                 else inputs.dropout_rng
                 for f in dataclasses.fields(Inputs)))
  attend = make_attend(one, sub)
  out, grads = forward_backward_fn(attend)(sub.q, sub.k, sub.v, sub.do)

  rows = row.q_seq
  if row.num_heads * row.q_seq * row.kv_seq > CHECK_ELEMENTS and (
      not row.dropout):  # the hash's counter holds absolute query indices
    rows = min(row.q_seq, CHECK_ROWS)
  start = row.q_seq - rows
  sliced = Inputs(
      q=sub.q[:, start:], k=sub.k, v=sub.v, do=sub.do[:, start:],
      q_segment_ids=None if sub.q_segment_ids is None
      else sub.q_segment_ids[:, start:],
      kv_segment_ids=sub.kv_segment_ids,
      mask=None if sub.mask is None else sub.mask[:, :, start:]
      if sub.mask.shape[2] > 1 else sub.mask,
      dropout_rng=sub.dropout_rng)
  kwargs = semantics(one, sliced)
  if rows < row.q_seq:
    # Bottom-right alignment keeps each sliced row on its own diagonal.
    kwargs["causal_alignment"] = "bottom_right"
  f32 = lambda x: x.astype(jnp.float32)
  reference = lambda q, k, v: flash_jax.reference.dot_product_attention(
      q, k, v, **kwargs)
  ref_out, ref_grads = forward_backward_fn(reference)(
      f32(sliced.q), f32(sliced.k), f32(sliced.v), f32(sliced.do))
  errors = [relative_error(out[:, start:], ref_out),
            relative_error(grads[0][:, start:], ref_grads[0])]
  if rows == row.q_seq:
    errors += [relative_error(g, r) for g, r in zip(grads[1:], ref_grads[1:])]
  worst = max(errors)
  if not worst <= tolerance:
    names = ("out", "dq", "dk", "dv")[:len(errors)]
    raise AssertionError(
        f"relative errors {dict(zip(names, errors))} exceed {tolerance}")
  return worst


def time_call(fn, args, *, trials: int = 7, warmup: int = 2,
              batch_seconds: float = 0.1) -> float:
  """Median seconds per call over ``trials`` batches of pipelined launches."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  single = time.perf_counter() - start
  launches = int(min(20, max(1, round(batch_seconds / max(single, 1e-6)))))
  samples = []
  for _ in range(trials):
    start = time.perf_counter()
    results = [fn(*args) for _ in range(launches)]
    jax.block_until_ready(results)
    samples.append((time.perf_counter() - start) / launches)
    del results
  return statistics.median(samples)


def compiled_memory(fn, args) -> dict:
  """``scratch_bytes`` (temporaries) and ``peak_bytes`` (arguments + outputs
  + temporaries, minus aliased) from XLA's compiled-program analysis."""
  try:
    stats = fn.lower(*args).compile().memory_analysis()
  except Exception:  # noqa: BLE001 - unavailable on some backends
    return {}
  if stats is None:
    return {}
  scratch = int(stats.temp_size_in_bytes)
  peak = (int(stats.argument_size_in_bytes) + int(stats.output_size_in_bytes)
          + scratch - int(getattr(stats, "alias_size_in_bytes", 0)))
  return {"scratch_bytes": scratch, "peak_bytes": peak}


def _error(e: Exception) -> str:
  return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def _device_memory_bytes() -> int | None:
  try:
    return int(jax.devices()[0].memory_stats()["bytes_limit"])
  except Exception:  # noqa: BLE001 - no memory stats on this backend
    return None


def scores_too_big(row: Row, limit: int | None = None) -> str | None:
  """Why XLA's plain attention cannot fit ``row`` on the device (of
  ``limit`` bytes, default: the first device's), or None.

  Its forward+backward holds about three float32 [B, N, T, S] arrays (the
  scores or probabilities, a mask or bias broadcast to them, and their
  gradient); above half the device's memory it is reported, not run.
  """
  needed = 3 * 4.0 * row.batch * row.num_heads * row.q_seq * row.kv_seq
  limit = limit if limit is not None else _device_memory_bytes()
  if limit is None or needed <= limit / 2:
    return None
  return (f"skipped: three float32 [B,N,T,S] arrays need "
          f"{needed / 2**30:.0f} GiB of {limit / 2**30:.0f} GiB")


def measure(row: Row, names, *, tolerance: float = 2e-2, seed: int = 0,
            modes=("fwd", "fwd+bwd"), trials: int = 7):
  """Checks then times each implementation on ``row``.

  Returns one dict per (implementation, pass) with ``seconds``, ``tflops``
  and compiled memory, or an ``error`` string.
  """
  inputs = draw(row, seed)
  args = (inputs.q, inputs.k, inputs.v, inputs.do)
  results = []
  for name in names:
    entry = {"row": row.label, "implementation": name,
             "row_fields": dataclasses.asdict(row)}
    too_big = scores_too_big(row) if name == "xla" else None
    if too_big:  # XLA's out-of-memory failure costs minutes of autotuning
      results.extend({**entry, "pass": mode, "error": too_big}
                     for mode in modes)
      continue
    try:
      attend = IMPLEMENTATIONS[name](row, inputs)
      entry["max_relative_error"] = check(row, IMPLEMENTATIONS[name], inputs,
                                          tolerance)
    except Exception as e:  # noqa: BLE001 - reported, never timed
      results.extend({**entry, "pass": mode, "error": _error(e)}
                     for mode in modes)
      continue
    for mode in modes:
      fn = (forward_fn if mode == "fwd" else forward_backward_fn)(attend)
      try:
        seconds = time_call(fn, args, trials=trials)
      except Exception as e:  # noqa: BLE001 - e.g. out of memory
        results.append({**entry, "pass": mode, "error": _error(e)})
        continue
      results.append({
          **entry, "pass": mode, "seconds": seconds,
          "tflops": row.flops(mode == "fwd+bwd") / seconds / 1e12,
          **compiled_memory(fn, args)})
    del attend
  return results


def environment() -> dict:
  device = jax.devices()[0]
  return {
      "card": device.device_kind,
      "platform": device.platform,
      "date": datetime.date.today().isoformat(),
      "jax": jax.__version__,
  }


def _index(results):
  by_key = {}
  for r in results:
    by_key.setdefault((r["row"], r["pass"]), {})[r["implementation"]] = r
  return by_key


def _ratio(fast, slow) -> str:
  if not fast or not slow or "error" in fast or "error" in slow:
    return "–"
  return f"{slow['seconds'] / fast['seconds']:.2f}x"


def _mib(entry, field) -> str:
  if not entry or field not in entry:
    return "–"
  return f"{entry[field] / 2**20:.0f}"


def ratio_table(results) -> str:
  """Markdown: ms and TFLOP/s per implementation; for each flash_jax
  implementation its speed-up over cuDNN and XLA and its compiled scratch
  and peak memory."""
  names = []
  for r in results:
    if r["implementation"] not in names:
      names.append(r["implementation"])
  subjects = [n for n in names if n.startswith("flash_jax")]
  header = "| case | pass | " + " | ".join(f"{n} ms (TFLOP/s)" for n in names)
  for subject in subjects:
    header += (f" | {subject} / cudnn | {subject} / xla | {subject} scratch "
               "MiB | peak MiB")
  header += " |"
  lines = [header, "|" + "---|" * (header.count("|") - 1)]
  for (label, mode), entries in _index(results).items():
    cells = []
    for n in names:
      e = entries.get(n)
      cells.append("–" if e is None else "error" if "error" in e else
                   f"{e['seconds'] * 1e3:.2f} ({e['tflops']:.0f})")
    for subject in subjects:
      mine = entries.get(subject)
      cells += [_ratio(mine, entries.get("cudnn")),
                _ratio(mine, entries.get("xla")),
                _mib(mine, "scratch_bytes"), _mib(mine, "peak_bytes")]
    lines.append(f"| {label} | {mode} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Comparison:
  """A speed-up of one row over another for one implementation, with the
  target it must reach (e.g. sliding window vs full causal)."""

  name: str
  fast: Row
  slow: Row
  target: float | None = None
  implementation: str = "flash_jax"
  # The fast row may also be the slower one by design (an overhead, e.g.
  # dropout); then ``max_slowdown`` bounds fast/slow time instead.
  max_slowdown: float | None = None


def comparison_lines(results, comparisons) -> str:
  by_key = _index(results)
  lines = []
  for c in comparisons:
    for mode in ("fwd", "fwd+bwd"):
      a = by_key.get((c.fast.label, mode), {}).get(c.implementation)
      b = by_key.get((c.slow.label, mode), {}).get(c.implementation)
      if not a or not b or "error" in a or "error" in b:
        lines.append(f"- {c.name} ({mode}): not measured")
        continue
      if c.max_slowdown is not None:
        overhead = a["seconds"] / b["seconds"] - 1
        verdict = "meets" if overhead <= c.max_slowdown else "MISSES"
        lines.append(f"- {c.name} ({mode}): overhead {overhead:+.1%} "
                     f"({verdict} <= {c.max_slowdown:.0%})")
      else:
        speedup = b["seconds"] / a["seconds"]
        verdict = "" if c.target is None else (
            f" ({'meets' if speedup >= c.target else 'MISSES'} >= "
            f"{c.target}x)")
        bound = ""
        fast_pairs, slow_pairs = c.fast.attended_pairs(), c.slow.attended_pairs()
        if fast_pairs and slow_pairs:
          bound = (f"; skipping work can give at most "
                   f"{slow_pairs / fast_pairs:.2f}x, the ratio of attended "
                   "pairs")
        lines.append(f"- {c.name} ({mode}): {speedup:.2f}x{verdict}{bound}")
  return "\n".join(lines)


def to_csv(results) -> str:
  fields = ["row", "implementation", "pass", "seconds", "tflops",
            "scratch_bytes", "peak_bytes", "max_relative_error", "error"]
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore")
  writer.writeheader()
  writer.writerows(results)
  return buffer.getvalue()


def write_results(results, name: str, directory: str | None = None,
                  comparisons=()) -> str:
  """Writes ``<name>.json``, ``<name>.csv`` and ``<name>.md`` under
  ``benchmarks/results/<card>/`` (or ``directory``); returns the markdown."""
  env = environment()
  card = env["card"].replace(" ", "_").replace("/", "_")
  directory = directory or os.path.join(os.path.dirname(__file__), "results",
                                        card)
  os.makedirs(directory, exist_ok=True)
  _write_atomically(os.path.join(directory, f"{name}.json"), json.dumps(
      {"environment": env, "results": results}, indent=1))
  _write_atomically(os.path.join(directory, f"{name}.csv"), to_csv(results))
  markdown = (
      f"# {name}\n\n{env['card']}, {env['date']}, JAX {env['jax']}.\n\n"
      "ms per call (TFLOP/s by FlashAttention's count: 4·B·N·T·S·H, halved "
      "for causal, x3.5 for fwd+bwd); ratios are speed-ups of each "
      "flash_jax implementation measured in the same run; memory from XLA's "
      "compiled "
      "analysis of the timed function (scratch = temporaries beyond "
      "arguments and outputs).\n\n" + ratio_table(results) + "\n")
  if comparisons:
    markdown += "\n## Comparisons\n\n" + comparison_lines(
        results, comparisons) + "\n"
  errors = [r for r in results if "error" in r]
  if errors:
    markdown += "\n## Errors\n\n" + "".join(
        f"- {e['implementation']} {e['row']} {e['pass']}: {e['error']}\n"
        for e in errors)
  _write_atomically(os.path.join(directory, f"{name}.md"), markdown)
  return markdown


def _write_atomically(path: str, text: str):
  """A run killed mid-write leaves the previous file, never half of one."""
  partial = f"{path}.partial"
  with open(partial, "w") as f:
    f.write(text)
  os.replace(partial, path)
