"""The mask vocabulary's block ranges against brute force (CPU only).

A block outside a range must hold no attended element; a block inside the
"full" sub-range must be attended everywhere (so the kernels may skip the
element-wise mask there).
"""

from __future__ import annotations

import numpy as np
import pytest

from flash_jax.masks import MaskSpec


def _random_spec(rs: np.random.RandomState, q_seq: int, kv_seq: int):
  window = rs.rand() < 0.6
  return MaskSpec(
      is_causal=bool(rs.rand() < 0.5),
      diagonal_offset=int(rs.choice([0, kv_seq - q_seq, rs.randint(-40, 40)])),
      window_left=int(rs.randint(0, 90)) if window and rs.rand() < 0.8
      else None,
      window_right=int(rs.randint(-5, 90)) if window and rs.rand() < 0.8
      else None)


def _dense(spec, q_seq, kv_seq, q_len, kv_len):
  q_idx = np.arange(q_seq)[:, None]
  kv_idx = np.arange(kv_seq)[None, :]
  allowed = np.asarray(spec.allows(q_idx, kv_idx, kv_len))
  return allowed & (q_idx < q_len)


@pytest.mark.parametrize("seed", range(300))
def test_block_ranges_match_brute_force(seed):
  rs = np.random.RandomState(seed)
  q_seq, kv_seq = (int(x) for x in rs.randint(1, 300, size=2))
  block_q, block_kv = (int(x) for x in rs.choice([16, 32, 64], size=2))
  q_len = int(rs.randint(0, q_seq + 1)) if rs.rand() < 0.3 else q_seq
  kv_len = int(rs.randint(0, kv_seq + 1)) if rs.rand() < 0.3 else kv_seq
  spec = _random_spec(rs, q_seq, kv_seq)
  allowed = _dense(spec, q_seq, kv_seq, q_len, kv_len)
  n_q = -(-q_seq // block_q)
  n_kv = -(-kv_seq // block_kv)

  def tile(i, j):
    return allowed[i * block_q:(i + 1) * block_q,
                   j * block_kv:(j + 1) * block_kv]

  for i in range(n_q):
    r = spec.kv_block_range(i * block_q, (i + 1) * block_q, q_len, kv_len,
                            block_kv)
    assert 0 <= r.lo <= r.full_lo <= r.full_hi <= r.hi, (i, r)
    valid_rows = min((i + 1) * block_q, q_len) - i * block_q
    for j in range(n_kv):
      if not r.lo <= j < r.hi:
        assert not tile(i, j).any(), f"q block {i} skips kv block {j}: {r}"
      elif r.full_lo <= j < r.full_hi:
        t = tile(i, j)[:max(valid_rows, 0)]
        assert t.shape[1] == block_kv and t.all(), (
            f"kv block {j} marked full for q block {i}: {r}")

  for j in range(n_kv):
    r = spec.q_block_range(j * block_kv, (j + 1) * block_kv, q_len, kv_len,
                           block_q)
    assert 0 <= r.lo <= r.full_lo <= r.full_hi <= r.hi, (j, r)
    for i in range(n_q):
      if not r.lo <= i < r.hi:
        assert not tile(i, j).any(), f"kv block {j} skips q block {i}: {r}"
      elif r.full_lo <= i < r.full_hi:
        rows = min((i + 1) * block_q, q_len) - i * block_q
        t = tile(i, j)[:max(rows, 0)]
        assert t.shape[1] == block_kv and t.all(), (
            f"q block {i} marked full for kv block {j}: {r}")


def test_ranges_are_tight_for_causal():
  """Causal, T = S = 256, blocks of 64: q block 2 visits kv blocks 0..2 and
  only block 2 (the diagonal) is masked."""
  r = MaskSpec(is_causal=True).kv_block_range(128, 192, 256, 256, 64)
  assert (r.lo, r.full_lo, r.full_hi, r.hi) == (0, 0, 2, 3)
  r = MaskSpec(is_causal=True).q_block_range(128, 192, 256, 256, 64)
  assert (r.lo, r.full_lo, r.full_hi, r.hi) == (2, 3, 4, 4)
