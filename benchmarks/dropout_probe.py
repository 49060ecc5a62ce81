"""Where does the dropout time go? Times the Triton kernels with variants of
the in-kernel keep tile swapped in (a profiling probe, not a benchmark row).

    python benchmarks/dropout_probe.py [--variants a,b,...] [--seq 4096]

Variants (all at B*T = 16k tokens, B=4 at the default T=S=4096, N=16,
H=128, bf16, non-causal, rate 0.1):

* ``none``: no dropout (the baseline).
* ``shipped``: `flash_jax.dropout.keep_tile`: one Philox call per 16 keys in
  the accumulator-shaped order, expanded by broadcasting.
* ``rounds10``: ``shipped`` with Philox's standard 10 rounds instead of the
  contract's 7 (`flash_jax.dropout.DROPOUT_ROUNDS`): the contract before
  session 11. Different bits, same statistics.
* ``contiguous16``: the plain order (key ``j`` takes byte ``j % 16`` of call
  ``j // 16``), bytes interleaved with ``tt.join`` and a reshape; the
  contract before the shipped one. Different bits, same statistics.
* ``bools16`` / ``words16``: ``contiguous16`` interleaving booleans (compared
  first) or uint32 draws instead of bytes.
* ``repeat16``: ``contiguous16`` without joins: each call's words broadcast
  along a new minor axis of 16, the byte picked per position (``jnp.repeat``'s
  construction).
* ``join_only``: the interleave of ``contiguous16`` on bytes from one
  multiply per call instead of Philox. Wrong bits; measures the interleave.
* ``hash_only``: the Philox calls without any expansion: each row's draws
  are reduced to one byte and broadcast along the row. Wrong bits; measures
  the hash alone.
* ``per_key``: one full Philox call per key at the tile's own shape, no
  expansion (16x the hash work). Same bits as ``contiguous16``.

Only the timing is reported; the shipped tile's bits are checked against
`keep_from_indices` by the test suite, not here.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import flash_jax  # noqa: E402
from benchmarks import harness  # noqa: E402
from flash_jax import dropout  # noqa: E402

SHIPPED = dropout.keep_tile


def _calls(seed, batch, head, q_idx, kv_start, width, mulhi,
           rounds=dropout.DROPOUT_ROUNDS):
  rows, calls = q_idx.shape[0], width // dropout.KEYS_PER_CALL
  shape = (rows, calls)
  group = (jnp.asarray(kv_start, jnp.uint32) >> 4) + jnp.arange(
      calls, dtype=jnp.uint32)
  counter = (jnp.broadcast_to(group[None, :], shape),
             jnp.broadcast_to(q_idx.astype(jnp.uint32)[:, None], shape),
             jnp.broadcast_to(jnp.asarray(head, jnp.uint32), shape),
             jnp.broadcast_to(jnp.asarray(batch, jnp.uint32), shape))
  if rounds == 0:   # one multiply, no Philox
    word = counter[0] * jnp.uint32(0xD2511F53) ^ counter[1] ^ seed[0]
    return word, word ^ counter[2], word ^ counter[3], word ^ seed[1]
  return dropout.philox4x32(counter, (seed[0], seed[1]), rounds=rounds,
                            mulhi=mulhi)


def _interleave(pieces):
  """``2**k`` arrays ``[rows, n]`` -> ``[rows, n * 2**k]`` with column
  ``m * 2**k + r`` from ``pieces[r][:, m]``, by two-way stacks on the last
  axis (``tt.join``): the low bit of ``r`` ends up on the last axis."""
  def nested(group):
    if len(group) == 1:
      return group[0]
    return jnp.stack([nested(group[0::2]), nested(group[1::2])], axis=-1)
  rows, n = pieces[0].shape
  return nested(list(pieces)).reshape(rows, n * len(pieces))


def contiguous16(seed, rate, batch, head, q_idx, kv_start, width, mulhi):
  words = _calls(seed, batch, head, q_idx, kv_start, width, mulhi)
  draws = [(w >> (8 * k)).astype(jnp.uint8) for w in words for k in range(4)]
  return _interleave(draws) >= jnp.uint8(dropout.threshold(rate))


def bools16(seed, rate, batch, head, q_idx, kv_start, width, mulhi):
  words = _calls(seed, batch, head, q_idx, kv_start, width, mulhi)
  t = jnp.uint32(dropout.threshold(rate))
  keep = [((w >> (8 * k)) & jnp.uint32(0xFF)) >= t
          for w in words for k in range(4)]
  return _interleave(keep)


def words16(seed, rate, batch, head, q_idx, kv_start, width, mulhi):
  words = _calls(seed, batch, head, q_idx, kv_start, width, mulhi)
  draws = [(w >> (8 * k)) & jnp.uint32(0xFF) for w in words for k in range(4)]
  return _interleave(draws) >= jnp.uint32(dropout.threshold(rate))


def _repeated(seed, batch, head, q_idx, kv_start, width, mulhi):
  """``[rows, n, 16]``: call m's byte r at ``[:, m, r]``, each call's words
  broadcast along a new minor axis and the byte picked per position."""
  words = _calls(seed, batch, head, q_idx, kv_start, width, mulhi)
  r = jax.lax.broadcasted_iota(jnp.uint32, (1, 1, dropout.KEYS_PER_CALL), 2)
  return dropout.draw_byte([x[:, :, None] for x in words], r)


def repeat16(seed, rate, batch, head, q_idx, kv_start, width, mulhi):
  """``contiguous16``'s bits, built without joins."""
  draws = _repeated(seed, batch, head, q_idx, kv_start, width, mulhi)
  keep = draws >= jnp.uint32(dropout.threshold(rate))
  return keep.reshape(q_idx.shape[0], width)


def hash_only(seed, rate, batch, head, q_idx, kv_start, width, mulhi):
  words = _calls(seed, batch, head, q_idx, kv_start, width, mulhi)
  mixed = words[0] ^ words[1] ^ words[2] ^ words[3]
  row = jnp.max(mixed & jnp.uint32(0xFF), axis=1)
  keep = row >= jnp.uint32(dropout.threshold(rate))
  return jnp.broadcast_to(keep[:, None], (q_idx.shape[0], width))


def join_only(seed, rate, batch, head, q_idx, kv_start, width, mulhi):
  words = _calls(seed, batch, head, q_idx, kv_start, width, mulhi, rounds=0)
  draws = [(w >> (8 * k)).astype(jnp.uint8) for w in words for k in range(4)]
  return _interleave(draws) >= jnp.uint8(dropout.threshold(rate))


def per_key(seed, rate, batch, head, q_idx, kv_start, width, mulhi):
  kv_idx = jnp.asarray(kv_start, jnp.uint32) + jnp.arange(
      width, dtype=jnp.uint32)
  kv_idx = kv_idx[None, :]
  q = q_idx.astype(jnp.uint32)[:, None]
  shape = (q_idx.shape[0], width)
  words = dropout.philox4x32(
      (jnp.broadcast_to(kv_idx >> 4, shape), jnp.broadcast_to(q, shape),
       jnp.broadcast_to(jnp.asarray(head, jnp.uint32), shape),
       jnp.broadcast_to(jnp.asarray(batch, jnp.uint32), shape)),
      (seed[0], seed[1]), rounds=dropout.DROPOUT_ROUNDS, mulhi=mulhi)
  draw = dropout.draw_byte(words, kv_idx & jnp.uint32(15))
  return draw >= jnp.uint32(dropout.threshold(rate))


VARIANTS = {"none": None, "shipped": SHIPPED,
            "rounds10": functools.partial(SHIPPED, rounds=10),
            "contiguous16": contiguous16, "bools16": bools16,
            "words16": words16, "hash_only": hash_only,
            "join_only": join_only, "per_key": per_key, "repeat16": repeat16}


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--seq", type=int, default=4096)
  parser.add_argument("--passes", default="fwd,fwd+bwd")
  parser.add_argument("--block-sizes", default="",
                      help="BlockSizes fields for every variant, e.g. "
                      "block_q_dkv=64,block_kv_dq=64")
  args = parser.parse_args()
  sizes = None
  if args.block_sizes:
    sizes = flash_jax.BlockSizes(**{
        k: int(v) for k, v in (f.split("=") for f in
                               args.block_sizes.split(","))})
  row = harness.Row(16384 // args.seq, args.seq, args.seq, 16, 16, 128, False)
  inputs = harness.draw(row)
  operands = (inputs.q, inputs.k, inputs.v, inputs.do)
  key = jax.random.key(1)
  print(f"{jax.devices()[0].device_kind}, JAX {jax.__version__}, "
        f"{row.label}, dropout 0.1, Triton backend, {sizes}", flush=True)
  base = {}
  for name in args.variants.split(","):
    tile = VARIANTS[name]
    dropout.keep_tile = tile or SHIPPED
    jax.clear_caches()
    rate = 0.0 if tile is None else 0.1
    attend = lambda q, k, v, rate=rate: flash_jax.dot_product_attention(
        q, k, v, implementation="pallas_triton", dropout_rate=rate,
        dropout_rng=key, block_sizes=sizes)
    for pass_name in args.passes.split(","):
      make = (harness.forward_fn if pass_name == "fwd"
              else harness.forward_backward_fn)
      start = time.perf_counter()
      try:
        seconds = harness.time_call(make(attend), operands, trials=5)
      except Exception as e:  # noqa: BLE001 - report and go on
        print(f"{name:10s} {pass_name:8s} error {type(e).__name__}: "
              f"{str(e)[:300]}", flush=True)
        continue
      base.setdefault(pass_name, seconds)
      print(f"{name:10s} {pass_name:8s} {seconds * 1e3:8.3f} ms  "
            f"{seconds / base[pass_name] - 1:+7.1%} vs first  "
            f"(took {time.perf_counter() - start:.0f} s)", flush=True)
  dropout.keep_tile = SHIPPED


if __name__ == "__main__":
  main()
