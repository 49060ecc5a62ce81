"""The backend registry.

A backend is a module exposing ``NAME`` and three plain functions, none of
which touches autodiff (the single ``custom_vjp`` in `flash_jax.vjp` does):

* ``check_supported(config, query, key, value, bias, arrays)`` raises
  ``NotImplementedError(reason)`` for a call it cannot take, so the dispatcher
  can fall through to the next implementation;
* ``forward(config, query, key, value, bias, arrays)`` returns
  ``(out [B,T,N,Hv], lse [B,N,T] float32, natural log)``;
* ``backward(config, query, key, value, bias, arrays, out, lse, dout,
  dlse)`` returns ``(dq, dk, dv, dbias)`` (dbias None without a bias).

``bias`` is the differentiable additive bias or None; ``arrays`` is a
`flash_jax.masks.MaskArrays` of the dynamic mask parts.

Backends are imported on first use, so a backend whose Pallas lowering is
missing or deprecated costs nothing until it is asked for.
"""

from __future__ import annotations

import importlib
from types import ModuleType

_MODULES = {
    "pallas_mosaic_gpu": "flash_jax.backends.pallas_mosaic_gpu",
    "pallas_triton": "flash_jax.backends.pallas_triton",
    "xla": "flash_jax.backends.xla",
}


def names() -> tuple[str, ...]:
  """Registered backend names."""
  return tuple(_MODULES)


def get(name: str) -> ModuleType:
  """The backend module registered under ``name``."""
  try:
    module_name = _MODULES[name]
  except KeyError:
    raise ValueError(
        f"unknown flash_jax backend {name!r}; registered: {names()}") from None
  return importlib.import_module(module_name)
