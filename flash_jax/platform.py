"""What the current machine can run."""

from __future__ import annotations

import jax


def default_device():
  return jax.devices()[0]


def compute_capability() -> tuple[int, int] | None:
  """The default device's CUDA compute capability, or None off NVIDIA GPUs."""
  device = default_device()
  if device.platform != "gpu":
    return None
  cc = getattr(device, "compute_capability", None)
  if cc is None:
    return None
  major, minor = str(cc).split(".")
  return int(major), int(minor)


def sm_count(default: int = 132) -> int:
  """Streaming multiprocessors of the default device if it is a GPU, else
  ``default`` (an H100 SXM's 132: kernels lowered on a CPU for an abstract
  H100)."""
  device = default_device()
  count = getattr(device, "core_count", None) if device.platform == "gpu" \
      else None
  return int(count) if count else default


def triton_gpu_unsupported_reason() -> str | None:
  """Why compiled Triton kernels cannot run here, or None if they can."""
  cc = compute_capability()
  if cc is None:
    return f"needs an NVIDIA GPU, found {default_device().platform!r}"
  if cc < (8, 0):
    return f"needs compute capability 8.0 or newer, found {cc[0]}.{cc[1]}"
  return None


def default_interpret() -> bool:
  """Pallas kernels run in interpret mode when no GPU is present."""
  return default_device().platform != "gpu"
