"""Tuned launch shapes of the Triton-backend kernels, by GPU generation.

Written by ``benchmarks/autotune.py`` on a live GPU; keys are
``"<generation>/h<padded head dim>/<16bit|float32>/<causal|full>"`` and
values `flash_jax.backends.pallas_triton.tuning.Tiling.as_dict()` dicts.
Missing keys use `tuning.default_tiling`.

The sm90 entries come from H100 searches logged under
``benchmarks/results/NVIDIA_H100_80GB_HBM3/``, each kernel's incumbent kept
unless a candidate beat it by 3% (``autotune.py --replay LOG --keys KEY``
re-derives an entry from its log): ``h128/16bit/full`` from
``autotune_h128.json`` (bf16, T = 4096, B = 4, N = 16);
``h128/16bit/causal`` from ``autotune_h128_causal_16k.json`` (T = 16384,
B = 1, N = 16, searched from the T = 4096 entry of ``autotune_h128.json`` as
incumbent, which that log's causal record no longer gives; only its dQ
tile changed).
"""

TUNED: dict[str, dict] = {'sm90/h128/16bit/causal': {'dkv': {'block_kv': 64,
                                    'block_q': 64,
                                    'num_stages': 2,
                                    'num_warps': 4},
                            'dq': {'block_kv': 64,
                                   'block_q': 128,
                                   'num_stages': 3,
                                   'num_warps': 8},
                            'forward': {'block_kv': 64,
                                        'block_q': 128,
                                        'num_stages': 3,
                                        'num_warps': 8}},
 'sm90/h128/16bit/full': {'dkv': {'block_kv': 64,
                                  'block_q': 64,
                                  'num_stages': 2,
                                  'num_warps': 4},
                          'dq': {'block_kv': 64,
                                 'block_q': 128,
                                 'num_stages': 3,
                                 'num_warps': 8},
                          'forward': {'block_kv': 64,
                                      'block_q': 128,
                                      'num_stages': 3,
                                      'num_warps': 8}}}
