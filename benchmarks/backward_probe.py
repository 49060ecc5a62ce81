"""Where does the Hopper backward's time go? (A probe, not a benchmark row.)

    python benchmarks/backward_probe.py [--rows 4k,4k-causal,16k,16k-causal]
        [--backward-stages 3,2]
    ncu ... python benchmarks/backward_probe.py --once ROW [--part fused]
        [--backward-stages 3]

The Hopper backend's backward is two kernels with no atomics (see
`flash_jax.backends.pallas_mosaic_gpu.backward`): dK/dV recomputes the
scores and dP and forms dV and dK (4 matrix products per tile), dQ
recomputes both again and forms dQ (3 products). That is 7 products per tile
against the 5 that FlashAttention's count (2.5x the forward) assumes (rows
``h256`` and ``h256-causal``: the two `backward_wide` kernels, 4 and 3
products, so "fused dQ" is the same backward there). This times, for bf16
rows and in one process:

* the Hopper forward, backward, and each backward kernel alone (the other's
  outputs unused, so XLA drops it; the two alone should sum to about the
  backward);
* cuDNN's forward and forward+backward, whose difference is its backward.

With ``--backward-stages`` the backward parts are timed once per ring depth
of the backward kernels (the shipped rule, `pallas_mosaic_gpu.backward_stages`,
replaced; the forward keeps its own), each part's name carrying the depth.

``--once ROW`` runs one backward part of a row three times and exits: a
program for Nsight Compute (`scripts/ncu_backward.sh`). ``--part``
picks it: ``backward`` (the shipped deterministic kernels, the default),
``fused`` (``deterministic=False``) or ``cudnn`` (cuDNN's forward and
backward); ``--backward-stages`` with one depth sets the Hopper kernels'
ring depth.

TFLOP/s are given both by FlashAttention's count (backward = 2.5x the
forward's 4*B*N*T*S*H, halved for causal) and by the products each kernel
really performs. Nothing here changes the shipped code.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import harness  # noqa: E402
from flash_jax import api  # noqa: E402

ROWS = {
    "4k": harness.Row(4, 4096, 4096, 16, 16, 128, False),
    "4k-causal": harness.Row(4, 4096, 4096, 16, 16, 128, True),
    "16k": harness.Row(1, 16384, 16384, 16, 16, 128, False),
    "16k-causal": harness.Row(1, 16384, 16384, 16, 16, 128, True),
    "8k": harness.Row(2, 8192, 8192, 16, 16, 128, False),
    "h256": harness.Row(4, 4096, 4096, 8, 8, 256, False),
    "h256-causal": harness.Row(4, 4096, 4096, 8, 8, 256, True),
    "h64": harness.Row(4, 4096, 4096, 32, 32, 64, False),
    "h64-causal": harness.Row(4, 4096, 4096, 32, 32, 64, True),
    "h64-16k": harness.Row(1, 16384, 16384, 32, 32, 64, False),
    "h64-512": harness.Row(32, 512, 512, 32, 32, 64, False),
}


def _products_flops(row: harness.Row, products: int) -> float:
  """FLOPs of ``products`` [T, S] x H matrix products over the row."""
  flops = 2.0 * row.batch * row.num_heads * row.q_seq * row.kv_seq
  flops *= row.head_dim * products
  return flops / 2 if row.is_causal else flops


def _hopper_parts(row: harness.Row, inputs: harness.Inputs):
  """name -> (jitted fn, args) for the Hopper forward and backward parts."""
  from flash_jax.backends import pallas_mosaic_gpu as hopper
  call = api.canonicalize(inputs.q, inputs.k, inputs.v,
                          is_causal=row.is_causal)
  config = dataclasses.replace(call.config,
                               implementation="pallas_mosaic_gpu")
  arrays = call.arrays
  forward = jax.jit(lambda q, k, v: hopper.forward(config, q, k, v, None,
                                                   arrays))
  out, lse = forward(inputs.q, inputs.k, inputs.v)

  def backward(select, config=config):
    def run(q, k, v, out, lse, do):
      grads = hopper.backward(config, q, k, v, None, arrays, out, lse, do,
                              jnp.zeros_like(lse))
      return select(grads)
    return jax.jit(run)

  fused = dataclasses.replace(config, deterministic=False)

  args = (inputs.q, inputs.k, inputs.v, out, lse, inputs.do)
  return {
      "forward": (forward, (inputs.q, inputs.k, inputs.v)),
      "backward": (backward(lambda g: g[:3]), args),
      "dK/dV kernel alone": (backward(lambda g: g[1:3]), args),
      "dQ kernel alone": (backward(lambda g: g[0]), args),
      "backward, fused dQ": (backward(lambda g: g[:3], fused), args),
  }


SHIPPED_BACKWARD_STAGES = None


def use_backward_stages(stages: int | None) -> None:
  """Makes the Hopper backward kernels' rings ``stages`` deep for every
  call (`pallas_mosaic_gpu.backward_stages` replaced; None: the shipped
  rule)."""
  from flash_jax.backends import pallas_mosaic_gpu as hopper
  global SHIPPED_BACKWARD_STAGES
  if SHIPPED_BACKWARD_STAGES is None:
    SHIPPED_BACKWARD_STAGES = hopper.backward_stages
  hopper.backward_stages = (SHIPPED_BACKWARD_STAGES if stages is None
                            else lambda *_: stages)
  jax.clear_caches()


def _time_hopper_parts(row, inputs, depths) -> dict:
  """part -> seconds for `_hopper_parts`; with ``depths``, the backward
  parts once per ring depth (``"<part>, <depth> stages"``), each timed
  while its depth is in force (clearing the caches retraces)."""
  times = {}

  def time_parts(parts, suffix=""):
    for part, (fn, fn_args) in parts.items():
      try:
        times[part + suffix] = harness.time_call(fn, fn_args)
      except Exception as e:  # noqa: BLE001 - a probe reports and goes on
        print(f"  {part}{suffix}: {type(e).__name__}: {str(e)[:200]}")

  parts = _hopper_parts(row, inputs)
  if not depths:
    time_parts(parts)
    return times
  time_parts({"forward": parts["forward"]})
  for depth in depths:
    use_backward_stages(depth)
    try:
      parts = _hopper_parts(row, inputs)
      del parts["forward"]
      time_parts(parts, f", {depth} stages")
    finally:
      use_backward_stages(None)
  return times


def once(row_name: str, part: str = "backward",
         stages: int | None = None) -> None:
  """Runs one backward part of row ``row_name`` three times (see the
  module docstring's ``--once``); the first call compiles. The Hopper
  parts are called on a forward's outputs computed first, so in a profile
  the backward kernels (`pallas_mosaic_gpu.backward.KERNEL_NAMES`) of
  the later calls stand alone."""
  row = ROWS[row_name]
  inputs = harness.draw(row)
  if part == "cudnn":
    fn = harness.forward_backward_fn(
        harness.IMPLEMENTATIONS["cudnn"](row, inputs))
    args = (inputs.q, inputs.k, inputs.v, inputs.do)
  else:
    use_backward_stages(stages)
    parts = _hopper_parts(row, inputs)
    fn, args = parts[{"backward": "backward",
                      "fused": "backward, fused dQ"}[part]]
  for _ in range(3):
    jax.block_until_ready(fn(*args))
  if part != "cudnn":
    use_backward_stages(None)


def _without_depth(part: str) -> str:
  """``"backward, 2 stages"`` -> ``"backward"`` (`_time_hopper_parts`'s
  suffix); other names as they are."""
  return part.rsplit(", ", 1)[0] if part.endswith(" stages") else part


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--rows", default="4k,4k-causal,16k,16k-causal")
  parser.add_argument("--backward-stages", default="",
                      help="ring depths of the backward kernels to time, "
                      "e.g. 3,2 (default: the shipped rule only)")
  parser.add_argument("--once", metavar="ROW",
                      help="run one backward part of ROW three times "
                      "(for a profiler) and exit")
  parser.add_argument("--part", default="backward",
                      choices=("backward", "fused", "cudnn"),
                      help="with --once: the part run")
  args = parser.parse_args()
  depths = [int(d) for d in args.backward_stages.split(",") if d]
  if args.once:
    if len(depths) > 1:
      parser.error("--once takes at most one --backward-stages depth")
    once(args.once, args.part, depths[0] if depths else None)
    return
  for name in args.rows.split(","):
    row = ROWS[name]
    inputs = harness.draw(row)
    qkvd = (inputs.q, inputs.k, inputs.v, inputs.do)
    forward_flops = _products_flops(row, 2)
    counted = {"forward": forward_flops, "backward": 2.5 * forward_flops}
    performed = {"forward": forward_flops,
                 "backward": _products_flops(row, 7),
                 "dK/dV kernel alone": _products_flops(row, 4),
                 "dQ kernel alone": _products_flops(row, 3),
                 "backward, fused dQ": _products_flops(row, 5)}
    counted["backward, fused dQ"] = counted["backward"]
    print(f"{name}: B={row.batch} T={row.q_seq} N={row.num_heads} "
          f"H={row.head_dim} causal={row.is_causal}")
    try:
      times = _time_hopper_parts(row, inputs, depths)
    except Exception as e:  # noqa: BLE001 - a probe reports and goes on
      print(f"  hopper: {type(e).__name__}: {str(e)[:200]}")
      times = {}
    try:
      cudnn = harness.IMPLEMENTATIONS["cudnn"](row, inputs)
      times["cudnn forward"] = harness.time_call(harness.forward_fn(cudnn),
                                                 qkvd)
      times["cudnn backward"] = harness.time_call(
          harness.forward_backward_fn(cudnn), qkvd) - times["cudnn forward"]
      counted["cudnn forward"] = forward_flops
      counted["cudnn backward"] = 2.5 * forward_flops
    except Exception as e:  # noqa: BLE001
      print(f"  cudnn: {type(e).__name__}: {str(e)[:200]}")
    for part, seconds in times.items():
      base = _without_depth(part)
      line = f"  {part:20s} {seconds * 1e3:8.3f} ms"
      if base in counted:
        line += f"  {counted[base] / seconds / 1e12:6.0f} TFLOP/s counted"
      if base in performed:
        line += f"  {performed[base] / seconds / 1e12:6.0f} TFLOP/s performed"
      print(line, flush=True)
    for part in times:
      base = _without_depth(part)
      if (base in ("backward", "backward, fused dQ")
          and "cudnn backward" in times):
        print(f"  {part} / cudnn backward: "
              f"{times['cudnn backward'] / times[part]:.2f}x speed")


if __name__ == "__main__":
  main()
