"""Float32 inputs: what would a tensor-core product cost in accuracy, and buy
in speed? (A probe, not a benchmark row; nothing here changes the shipped
kernels.)

    python benchmarks/float32_probe.py [--precisions ieee,tf32x3,tf32]

It swaps Triton's float32 products into the kernels:

* ``ieee``: full precision on CUDA cores (what
  ``jax.default_matmul_precision("highest")`` selects);
* ``tf32x3``: three TF32 tensor-core products per tile (``a_hi b_hi + a_hi
  b_lo + a_lo b_hi``), close to float32 accuracy: the shipped default since
  session 7, chosen from this probe's session 6 run;
* ``tf32``: one TF32 product (10-bit mantissas), what XLA uses for float32
  by default on these GPUs.

For each it reports, on a few awkward shapes, the kernel's and plain float32
attention's max errors against the float64 oracle and whether the tests'
rule holds (`helpers.assert_flash_close`: factor 2 for the output, 3 for
gradients, plus a floor of 1e-5 of the oracle's scale); then the time of the
suite's float32 row (B=4 T=4096 N=16 H=128) forward and forward+backward.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import flash_jax  # noqa: E402
import helpers  # noqa: E402
from benchmarks import harness  # noqa: E402

triton_common = importlib.import_module(
    "flash_jax.backends.pallas_triton.common")

PRECISIONS = {
    "ieee": jax.lax.Precision.HIGHEST,
    "tf32x3": jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3,
    "tf32": jax.lax.DotAlgorithmPreset.TF32_TF32_F32,
}
_SHIPPED = triton_common.KernelParams.dot_precision

CASES = (
    helpers.Case(2, 113, 203, 4, 2, 64, 64, True, "float32"),
    helpers.Case(2, 97, 97, 2, 2, 128, 128, False, "float32"),
    helpers.Case(1, 1023, 1024, 2, 1, 128, 128, True, "float32"),
)


def _use(precision) -> None:
  triton_common.KernelParams.dot_precision = property(
      lambda self: precision if jnp.dtype(self.dtype) == jnp.float32
      else None)
  jax.clear_caches()


def _errors(case: helpers.Case) -> list[tuple[float, float, bool]]:
  """(kernel error, plain float32 error, whether the tests' rule holds) for
  out, dq, dk, dv: ``err <= factor * plain + 1e-5 * max(1, |oracle|)``,
  factor 2 for the output and 3 for gradients (`helpers.assert_flash_close`)."""
  q, k, v, do = helpers.draw_inputs(jax.random.key(0), case)
  kwargs = dict(is_causal=case.is_causal)
  attend = lambda *a: flash_jax.dot_product_attention(
      *a, implementation="pallas_triton", **kwargs)
  out, grads = helpers.vjp_triple(jax.jit(attend), q, k, v, do)
  oracle, plain = helpers.reference_pair(q, k, v, **kwargs)
  oracle_grads, plain_grads = helpers.reference_grad_pair(q, k, v, do,
                                                          **kwargs)
  results = []
  for factor, got, exact, base in zip(
      (2, 3, 3, 3), (out, *grads), (oracle, *oracle_grads),
      (plain, *plain_grads)):
    err, base_err, floor = helpers.flash_errors(got, exact, base)
    results.append((err, base_err, err <= factor * base_err + floor))
  return results


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--precisions", default=",".join(PRECISIONS))
  parser.add_argument("--no-timing", action="store_true")
  args = parser.parse_args()
  print(f"{jax.devices()[0].device_kind}, JAX {jax.__version__}", flush=True)
  row = harness.Row(4, 4096, 4096, 16, 16, 128, False, "float32")
  inputs = harness.draw(row)
  operands = (inputs.q, inputs.k, inputs.v, inputs.do)
  for name in args.precisions.split(","):
    _use(PRECISIONS[name])
    for case in CASES:
      try:
        text = "; ".join(
            f"{part} {err:.1e}/{base:.1e} {'ok' if ok else 'FAILS'}"
            for part, (err, base, ok) in zip(("out", "dq", "dk", "dv"),
                                             _errors(case)))
      except Exception as e:  # noqa: BLE001 - report and go on
        text = f"error {type(e).__name__}: {str(e)[:200]}"
      print(f"{name:7s} {case}: kernel/plain error {text}", flush=True)
    if args.no_timing:
      continue
    attend = lambda q, k, v: flash_jax.dot_product_attention(
        q, k, v, implementation="pallas_triton")
    for mode, make in (("fwd", harness.forward_fn),
                       ("fwd+bwd", harness.forward_backward_fn)):
      try:
        seconds = harness.time_call(make(attend), operands, trials=3)
        tflops = row.flops(mode == "fwd+bwd") / seconds / 1e12
        print(f"{name:7s} {row.label} {mode}: {seconds * 1e3:.2f} ms "
              f"({tflops:.0f} TFLOP/s)", flush=True)
      except Exception as e:  # noqa: BLE001
        print(f"{name:7s} {mode}: error {type(e).__name__}: {str(e)[:300]}",
              flush=True)
  triton_common.KernelParams.dot_precision = _SHIPPED


if __name__ == "__main__":
  main()
