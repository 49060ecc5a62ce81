"""flash_jax demo: check the kernel against the reference, then time it.

On a CPU machine the Pallas kernel runs in interpret mode at a small size
and is checked against the float32 reference (forward and gradients). On an
NVIDIA GPU it runs compiled at B=4, T=S=4096, N=16, H=128 (bf16) and prints
the speed of the default implementation (the Hopper backend on sm90) and of
the portable Triton backend next to XLA and cuDNN.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from benchmarks import harness  # noqa: E402


def main():
  on_gpu = jax.default_backend() == "gpu"
  if on_gpu:
    rows = [harness.Row(4, 4096, 4096, 16, 16, 128, causal)
            for causal in (False, True)]
    names = ["flash_jax_default", "flash_jax", "xla", "cudnn"]
  else:
    rows = [harness.Row(2, 300, 300, 4, 2, 64, causal, "float32")
            for causal in (False, True)]
    names = ["flash_jax"]
  print(f"flash_jax demo on {jax.devices()[0].device_kind} "
        f"({'compiled kernels' if on_gpu else 'Pallas interpret mode'})")
  for row in rows:
    inputs = harness.draw(row)
    args = (inputs.q, inputs.k, inputs.v, inputs.do)
    for name in names:
      make_attend = harness.IMPLEMENTATIONS[name]
      try:
        error = harness.check(row, make_attend, inputs,
                              tolerance=2e-2 if on_gpu else 1e-5)
      except Exception as e:  # noqa: BLE001 - report and go on
        print(f"  {row.label:40s} {name:17s} FAILED: {str(e)[:200]}")
        continue
      line = f"  {row.label:40s} {name:17s} max rel. error {error:.1e}"
      if on_gpu:
        attend = make_attend(row, inputs)
        for mode, make in (("fwd", harness.forward_fn),
                           ("fwd+bwd", harness.forward_backward_fn)):
          seconds = harness.time_call(make(attend), args)
          tflops = row.flops(mode == "fwd+bwd") / seconds / 1e12
          line += f"  {mode} {seconds * 1e3:7.2f} ms {tflops:6.1f} TFLOP/s"
      print(line, flush=True)
  if not on_gpu:
    print("kernel matches the reference; run on an NVIDIA GPU for timings.")


if __name__ == "__main__":
  main()
