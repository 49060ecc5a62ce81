"""The mask vocabulary's block ranges and the block map against brute force
(CPU only).

A block outside a range must hold no attended element; a block inside the
"full" sub-range must be attended everywhere (so the kernels may skip the
element-wise mask there).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from flash_jax import block_map
from flash_jax.masks import MaskArrays, MaskSpec


def _random_spec(rs: np.random.RandomState, q_seq: int, kv_seq: int, *,
                 may_align_to_lengths: bool = False):
  """A random causal/window spec; with ``may_align_to_lengths``, a quarter
  of them align bottom-right to each row's lengths."""
  window = rs.rand() < 0.6
  aligned = may_align_to_lengths and rs.rand() < 0.25
  return MaskSpec(
      align_to_lengths=aligned,
      is_causal=bool(rs.rand() < 0.5),
      diagonal_offset=int(rs.choice([0, kv_seq - q_seq, rs.randint(-40, 40)])),
      window_left=int(rs.randint(0, 90)) if window and rs.rand() < 0.8
      else None,
      window_right=int(rs.randint(-5, 90)) if window and rs.rand() < 0.8
      else None)


def _dense(spec, q_seq, kv_seq, q_len, kv_len):
  q_idx = np.arange(q_seq)[:, None]
  kv_idx = np.arange(kv_seq)[None, :]
  allowed = np.asarray(spec.allows(q_idx, kv_idx, kv_len, q_len=q_len))
  return allowed & (q_idx < q_len)


@pytest.mark.parametrize("seed", range(300))
def test_block_ranges_match_brute_force(seed):
  rs = np.random.RandomState(seed)
  q_seq, kv_seq = (int(x) for x in rs.randint(1, 300, size=2))
  block_q, block_kv = (int(x) for x in rs.choice([16, 32, 64], size=2))
  q_len = int(rs.randint(0, q_seq + 1)) if rs.rand() < 0.3 else q_seq
  kv_len = int(rs.randint(0, kv_seq + 1)) if rs.rand() < 0.3 else kv_seq
  spec = _random_spec(rs, q_seq, kv_seq, may_align_to_lengths=True)
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


# -- The block map (segments, dense masks, mask_fn) against brute force. --


def _dense_everything(spec, rs, batch, heads, q_seq, kv_seq):
  """Random arrays for every map component and the dense [B, N, T, S] truth
  (rows at or past q_len excluded, as the kernels zero them)."""
  q_len = rs.randint(0, q_seq + 1, size=batch)
  kv_len = rs.randint(0, kv_seq + 1, size=batch)
  num_ids = int(rs.randint(1, 5))
  q_ids = np.sort(rs.randint(0, num_ids, size=(batch, q_seq)), axis=1)
  kv_ids = np.sort(rs.randint(0, num_ids, size=(batch, kv_seq)), axis=1)
  if rs.rand() < 0.3:  # unsorted ids
    q_ids = rs.randint(0, num_ids, size=(batch, q_seq))
  mask_shape = tuple(d if rs.rand() < 0.5 else 1
                     for d in (batch, heads, q_seq, kv_seq))
  # Mostly-true masks with some all-false blocks.
  mask = rs.rand(*mask_shape) < rs.choice([0.5, 0.97, 1.0])
  b, h = np.arange(batch)[:, None, None, None], np.arange(heads)[None, :,
                                                                   None, None]
  i, j = np.arange(q_seq)[None, None, :, None], np.arange(kv_seq)[None, None,
                                                                    None, :]
  truth = np.asarray(spec.allows(i, j, kv_len[:, None, None, None],
                                 q_len=q_len[:, None, None, None],
                                 q_segment=q_ids[:, None, :, None],
                                 kv_segment=kv_ids[:, None, None, :],
                                 batch=b, head=h))
  truth = truth & mask & (i < q_len[:, None, None, None])
  arrays = MaskArrays(q_lengths=jnp.asarray(q_len, jnp.int32),
                      kv_lengths=jnp.asarray(kv_len, jnp.int32),
                      mask=jnp.asarray(mask),
                      q_segment_ids=jnp.asarray(q_ids, jnp.int32),
                      kv_segment_ids=jnp.asarray(kv_ids, jnp.int32))
  return arrays, np.broadcast_to(truth, (batch, heads, q_seq, kv_seq)), q_len


MASK_FNS = [
    None,
    lambda b, h, i, j: (j <= i) | (j < 7),                 # prefix LM
    lambda b, h, i, j: (i // (8 * (h + 1))) == (j // (8 * (h + 1))),
    lambda b, h, i, j: (b == 0) | (j % 3 == 0),
]


@pytest.mark.parametrize("seed", range(40))
def test_block_map_matches_brute_force(seed):
  rs = np.random.RandomState(seed)
  batch, heads = int(rs.randint(1, 3)), int(rs.randint(1, 4))
  q_seq, kv_seq = (int(x) for x in rs.randint(1, 120, size=2))
  block_q, block_kv = (int(x) for x in rs.choice([16, 32], size=2))
  spec = dataclasses.replace(
      _random_spec(rs, q_seq, kv_seq, may_align_to_lengths=True),
      mask_fn=MASK_FNS[seed % len(MASK_FNS)])
  arrays, truth, q_len = _dense_everything(spec, rs, batch, heads, q_seq,
                                           kv_seq)
  states = np.asarray(block_map.block_states(
      spec, arrays, batch=batch, num_heads=heads, q_seq=q_seq, kv_seq=kv_seq,
      block_q=block_q, block_kv=block_kv))
  n_q, n_kv = -(-q_seq // block_q), -(-kv_seq // block_kv)
  assert states.shape[2:] == (n_q, n_kv)
  states = np.broadcast_to(states, (batch, heads, n_q, n_kv))
  for b, h, i, j in np.ndindex(batch, heads, n_q, n_kv):
    tile = truth[b, h, i * block_q:(i + 1) * block_q,
                 j * block_kv:(j + 1) * block_kv]
    state = states[b, h, i, j]
    if state == block_map.EMPTY:
      assert not tile.any(), f"skipped block {(b, h, i, j)} attends"
    elif state == block_map.FULL:
      rows = min((i + 1) * block_q, q_len[b]) - i * block_q
      assert tile.shape[1] == block_kv and tile[:rows].all(), (
          f"block {(b, h, i, j)} marked full has masked elements")

  # The visiting lists: partial blocks, then full ones, each ascending.
  for lists, grid in ((block_map.kv_lists(states), states),
                      (block_map.q_lists(states),
                       np.swapaxes(states, -1, -2))):
    blocks, counts = np.asarray(lists.blocks), np.asarray(lists.counts)
    for index in np.ndindex(*grid.shape[:3]):
      row = grid[index]
      num_partial, num_full = counts[index]
      partial = blocks[index][:num_partial]
      full = blocks[index][num_partial:num_partial + num_full]
      np.testing.assert_array_equal(partial,
                                    np.flatnonzero(row == block_map.PARTIAL))
      np.testing.assert_array_equal(full, np.flatnonzero(row == block_map.FULL))
      # The whole row is a permutation: the empty blocks last, ascending.
      np.testing.assert_array_equal(
          np.sort(blocks[index]), np.arange(row.shape[0]))
      np.testing.assert_array_equal(
          blocks[index][num_partial + num_full:],
          np.flatnonzero(row == block_map.EMPTY))


@pytest.mark.parametrize("seed", range(12))
def test_maps_of_several_tilings_equal_maps_made_one_at_a_time(seed):
  """The backward's maps come from one pass at the smallest tile, coarsened
  (`block_states_for_tiles`); each equals the map computed at its own tile."""
  rs = np.random.RandomState(100 + seed)
  batch, heads = int(rs.randint(1, 3)), int(rs.randint(1, 4))
  q_seq, kv_seq = (int(x) for x in rs.randint(1, 200, size=2))
  spec = dataclasses.replace(
      _random_spec(rs, q_seq, kv_seq, may_align_to_lengths=True),
      mask_fn=MASK_FNS[seed % len(MASK_FNS)])
  arrays, _, _ = _dense_everything(spec, rs, batch, heads, q_seq, kv_seq)
  tiles = [(16, 32), (64, 16), (32, 64)]
  dims = dict(batch=batch, num_heads=heads, q_seq=q_seq, kv_seq=kv_seq)
  together = block_map.block_states_for_tiles(spec, arrays, tiles=tiles,
                                              **dims)
  for (block_q, block_kv), states in zip(tiles, together):
    alone = block_map.block_states(spec, arrays, block_q=block_q,
                                   block_kv=block_kv, **dims)
    np.testing.assert_array_equal(states, alone)
  with pytest.raises(ValueError, match="nest"):
    block_map.block_states_for_tiles(spec, arrays, tiles=[(16, 16), (24, 16)],
                                     **dims)


def test_block_map_is_tight_for_packed_documents():
  """Two documents of 64 tokens, blocks of 32, causal: the cross-document
  blocks are skipped and the off-diagonal in-document block is full."""
  ids = jnp.asarray([[0] * 64 + [1] * 64], jnp.int32)
  states = np.asarray(block_map.block_states(
      MaskSpec(is_causal=True), MaskArrays(q_segment_ids=ids,
                                           kv_segment_ids=ids),
      batch=1, num_heads=1, q_seq=128, kv_seq=128, block_q=32, block_kv=32))
  E, P, F = block_map.EMPTY, block_map.PARTIAL, block_map.FULL
  np.testing.assert_array_equal(states[0, 0], [[P, E, E, E], [F, P, E, E],
                                               [E, E, P, E], [E, E, F, P]])


def test_mask_fn_dependence_is_detected():
  assert block_map.mask_fn_uses(lambda b, h, i, j: j <= i) == (False, False)
  assert block_map.mask_fn_uses(lambda b, h, i, j: (h > 0) | (j <= i)) == (
      False, True)
  assert block_map.mask_fn_uses(lambda b, h, i, j: b == i) == (True, False)


def test_empty_ranges_visit_no_block():
  """Rows past q_len attend nothing, even where their window would start
  mid-block (it used to schedule one fully masked block)."""
  r = MaskSpec(window_left=10).kv_block_range(100, 164, 50, 300, 64)
  assert r.lo == r.full_lo == r.full_hi == r.hi
  r = MaskSpec(is_causal=True).q_block_range(100, 164, 300, 90, 64)
  assert r.lo == r.hi


def test_heavy_first_reverses_the_query_blocks():
  """Program i owns block n-1-i: a permutation of the blocks, the last
  (under causal, the longest) first; traced scalars work too."""
  from flash_jax.masks import heavy_first
  assert [heavy_first(i, 5) for i in range(5)] == [4, 3, 2, 1, 0]
  assert int(heavy_first(jnp.int32(1), 3)) == 1
  spec = MaskSpec(is_causal=True)
  work = [spec.kv_block_range(b * 64, (b + 1) * 64, 512, 512, 64).hi
          for b in (heavy_first(i, 8) for i in range(8))]
  assert work == sorted(work, reverse=True)
