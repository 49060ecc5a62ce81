"""Tuned launch shapes of the Triton-backend kernels, by GPU generation.

Written by ``benchmarks/autotune.py`` on a live GPU; keys are
``"<generation>/h<padded head dim>/<16bit|float32>/<causal|full>"`` and
values `flash_jax.backends.pallas_triton.tuning.Tiling.as_dict()` dicts.
Missing keys use `tuning.default_tiling`.

No tuned entries yet: the autotuner has not been run on a GPU (the H100
device budget of the session that wrote it was spent).
"""

TUNED: dict[str, dict] = {}
