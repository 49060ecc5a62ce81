"""Tuned launch shapes of the Triton-backend kernels, by GPU generation.

Written by ``benchmarks/autotune.py`` on a live GPU; keys are
``"<generation>/h<padded head dim>/<16bit|float32>/<causal|full>"`` and
values `flash_jax.backends.pallas_triton.tuning.Tiling.as_dict()` dicts.
Missing keys use `tuning.default_tiling`.

The sm90 entries come from the H100 search logged in
``benchmarks/results/NVIDIA_H100_80GB_HBM3/autotune_h128.json`` (bf16,
T = 4096, B = 4, N = 16), each kernel's default kept unless a candidate beat
it by 3% (``autotune.py --replay`` re-derives them from that log).
"""

TUNED: dict[str, dict] = {'sm90/h128/16bit/causal': {'dkv': {'block_kv': 64,
                                    'block_q': 64,
                                    'num_stages': 2,
                                    'num_warps': 4},
                            'dq': {'block_kv': 32,
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
