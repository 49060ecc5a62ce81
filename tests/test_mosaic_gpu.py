"""The Hopper (Mosaic GPU) backend's CPU-testable parts: which calls it
takes, the fall-through for the rest, and its CTA schedule (both consumer
warpgroups walk the union of their rows' key blocks, each splitting it into
masked and unmasked phases) against brute force. Its kernels are lowered in
test_lowering.py and run by TestPallasMosaicGpu on an H100."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flash_jax
from flash_jax.backends import pallas_mosaic_gpu as mosaic
from flash_jax.backends.pallas_mosaic_gpu import common
from flash_jax.backends.pallas_mosaic_gpu.forward import BLOCK_Q, CONSUMERS
from flash_jax.masks import MaskArrays, MaskSpec
from helpers import Case, draw_inputs
from test_masks import _dense, _random_spec


def test_unsupported_calls_name_their_reason_and_fall_through(rng,
                                                              monkeypatch):
  q, k, v, _ = draw_inputs(rng, Case(1, 40, 40, 2, 1, 32, 32, True,
                                     "float32"))
  with pytest.raises(NotImplementedError, match="float32"):
    flash_jax.dot_product_attention(q, k, v, implementation="pallas_mosaic_gpu")
  bias = jnp.ones((1, 1, 40, 40))
  with pytest.raises(NotImplementedError, match="bias"):
    flash_jax.dot_product_attention(q.astype(jnp.bfloat16),
                                    k.astype(jnp.bfloat16),
                                    v.astype(jnp.bfloat16), bias=bias,
                                    implementation="pallas_mosaic_gpu",
                                    interpret=False)
  # A supported call on a machine without an sm90 GPU is refused too.
  monkeypatch.setattr(flash_jax.platform, "compute_capability", lambda: (8, 0))
  with pytest.raises(NotImplementedError, match="sm90"):
    flash_jax.dot_product_attention(
        *(x.astype(jnp.bfloat16) for x in (q, k, v)),
        implementation="pallas_mosaic_gpu", interpret=False)
  # Triton tiling in block_sizes is refused by name (ping_pong is its own).
  with pytest.raises(NotImplementedError, match="block_q, num_warps_dq"):
    flash_jax.dot_product_attention(
        *(x.astype(jnp.bfloat16) for x in (q, k, v)),
        implementation="pallas_mosaic_gpu", interpret=False,
        block_sizes=flash_jax.BlockSizes(block_q=32, num_warps_dq=4,
                                         ping_pong=True))
  monkeypatch.undo()
  # In a sequence, the next implementation takes what it refuses.
  out = flash_jax.dot_product_attention(
      q, k, v, is_causal=True,
      implementation=["pallas_mosaic_gpu", "pallas_triton"])
  expected = flash_jax.dot_product_attention(
      q, k, v, is_causal=True, implementation="pallas_triton")
  np.testing.assert_array_equal(out, expected)


def test_head_dims_pad_to_wgmma_widths():
  assert [mosaic._padded_head_dim(h) for h in (1, 40, 64, 65, 111, 128, 200,
                                               256)] == [
      64, 64, 64, 128, 128, 128, 256, 256]


def _cta_schedule(spec, cta, q_len, kv_len, block_kv):
  """What the kernel computes for one CTA: the shared key-block range and,
  per consumer, its (first_full, end_full) steps, through the kernels' own
  `common.shared_range` / `common.own_phase_steps`."""
  rows = CONSUMERS * BLOCK_Q
  lo, steps = (int(x) for x in common.shared_range(spec.kv_block_range(
      cta * rows, (cta + 1) * rows, q_len, kv_len, block_kv)))
  phases = []
  for wg in range(CONSUMERS):
    start = cta * rows + wg * BLOCK_Q
    own = spec.kv_block_range(start, start + BLOCK_Q, q_len, kv_len, block_kv)
    first_full, end_full = (int(x) for x in
                            common.own_phase_steps(own, lo, steps))
    phases.append((start, first_full, end_full))
  return lo, steps, phases


@pytest.mark.parametrize("seed", range(60))
def test_cta_schedule_covers_every_attended_key_and_masks_every_boundary(
    seed):
  rs = np.random.RandomState(seed)
  q_seq, kv_seq = (int(x) for x in rs.randint(1, 700, size=2))
  block_kv = int(rs.choice([64, 128]))
  q_len = int(rs.randint(0, q_seq + 1)) if rs.rand() < 0.3 else q_seq
  kv_len = int(rs.randint(0, kv_seq + 1)) if rs.rand() < 0.3 else kv_seq
  spec = _random_spec(rs, q_seq, kv_seq, may_align_to_lengths=True)
  allowed = _dense(spec, q_seq, kv_seq, q_len, kv_len)
  rows = CONSUMERS * BLOCK_Q
  for cta in range(-(-q_seq // rows)):
    lo, steps, phases = _cta_schedule(spec, cta, q_len, kv_len, block_kv)
    visited = np.zeros(kv_seq, bool)
    visited[lo * block_kv:(lo + steps) * block_kv] = True
    for start, first_full, end_full in phases:
      mine = allowed[start:start + BLOCK_Q]
      # Every attended key of this warpgroup's rows is in a visited block.
      assert not (mine & ~visited[None, :]).any(), (cta, start)
      # Blocks it computes without a mask are attended by all its valid rows.
      valid_rows = max(0, min(start + BLOCK_Q, q_len) - start)
      for t in range(first_full, end_full):
        block = mine[:valid_rows, (lo + t) * block_kv:(lo + t + 1) * block_kv]
        assert block.shape[1] == block_kv and block.all(), (cta, start, t)


def test_cta_schedule_is_tight_for_causal():
  """T = S = 1024, blocks of 128: CTA 3 (rows 384..511) visits key blocks
  0..3; consumer 0 (rows 384..447) masks only block 3, consumer 1 too."""
  lo, steps, phases = _cta_schedule(MaskSpec(is_causal=True), 3, 1024, 1024,
                                    128)
  assert (lo, steps) == (0, 4)
  assert [p[1:] for p in phases] == [(0, 3), (0, 3)]


def _params(**overrides):
  from flash_jax.backends.pallas_mosaic_gpu.forward import ForwardParams
  fields = dict(batch=1, q_seq=300, kv_seq=300, num_heads=2, num_kv_heads=2,
                head_dim=128, dtype=jnp.bfloat16, mask=MaskSpec(is_causal=True),
                scale=0.1, logits_soft_cap=None, block_kv=128, stages=2)
  return ForwardParams(**{**fields, **overrides})


def test_query_tiles_run_last_first():
  """T=300 makes 3 CTA tiles of 128 rows; CTA 0 owns the last (partial)
  one, and every tile is owned once."""
  p = _params()
  assert [p.q_tile_of(i) for i in range(3)] == [2, 1, 0]


def test_scale_folds_only_where_max_commutes_with_it():
  """The forward moves the scale past the row max only for a positive
  scale and no soft-cap (tanh acts on scaled logits)."""
  assert _params().folds_scale
  assert not _params(logits_soft_cap=30.0).folds_scale
  assert not _params(scale=-0.1).folds_scale


@pytest.mark.parametrize("seed", range(60))
def test_key_major_schedule_of_the_dkv_kernel(seed):
  """dK/dV CTAs own 128 keys; both consumers walk the union of their keys'
  query blocks, each unmasked only where all its keys are attended. At head
  dim 256 (`backward_wide`) a CTA owns 64 keys, which both consumers share:
  its own range is the CTA's."""
  rs = np.random.RandomState(1000 + seed)
  q_seq, kv_seq = (int(x) for x in rs.randint(1, 700, size=2))
  q_len = int(rs.randint(0, q_seq + 1)) if rs.rand() < 0.3 else q_seq
  kv_len = int(rs.randint(0, kv_seq + 1)) if rs.rand() < 0.3 else kv_seq
  spec = _random_spec(rs, q_seq, kv_seq, may_align_to_lengths=True)
  allowed = _dense(spec, q_seq, kv_seq, q_len, kv_len)
  for key_blocks_per_cta in (CONSUMERS, 1):
    rows = key_blocks_per_cta * BLOCK_Q
    for cta in range(-(-kv_seq // rows)):
      lo, steps = (int(x) for x in common.shared_range(spec.q_block_range(
          cta * rows, (cta + 1) * rows, q_len, kv_len, BLOCK_Q)))
      visited = np.zeros(q_seq, bool)
      visited[lo * BLOCK_Q:(lo + steps) * BLOCK_Q] = True
      for part in range(key_blocks_per_cta):
        start = cta * rows + part * BLOCK_Q
        own = spec.q_block_range(start, start + BLOCK_Q, q_len, kv_len,
                                 BLOCK_Q)
        first_full, end_full = (int(x) for x in
                                common.own_phase_steps(own, lo, steps))
        mine = allowed[:, start:start + BLOCK_Q]
        assert not (mine & ~visited[:, None]).any(), (cta, part)
        for t in range(first_full, end_full):
          q0 = (lo + t) * BLOCK_Q
          block = mine[q0:min(q0 + BLOCK_Q, q_len)]
          assert block.shape[1] == BLOCK_Q and block.all(), (cta, part, t)


@pytest.mark.parametrize("seed", range(40))
def test_segment_list_walks_cover_every_attended_pair(seed):
  """With segment ids each Hopper kernel walks its row of a block map's
  lists, built by `segment_lists` at that kernel's tiles on the padded
  sequences: the forward's and dQ's key blocks per 128 queries, dK/dV's
  query blocks per 128 keys (at head dim 256 the backward's per 64 queries
  and 64 keys). Read through the kernels' own `list_walk` and
  `phase_steps`, every attended pair lies in a visited block, and every
  block taken without the element mask is attended by all of its valid
  rows and lies inside the valid keys."""
  from flash_jax import block_map
  from flash_jax.config import AttentionConfig
  from flash_jax.masks import MaskArrays
  rs = np.random.RandomState(2000 + seed)
  batch = 2
  q_seq, kv_seq = (int(x) for x in rs.randint(1, 600, size=2))
  spec = _random_spec(rs, q_seq, kv_seq, may_align_to_lengths=True)
  num_ids = int(rs.randint(1, 6))
  q_ids = np.sort(rs.randint(0, num_ids, size=(batch, q_seq)), axis=1)
  kv_ids = np.sort(rs.randint(0, num_ids, size=(batch, kv_seq)), axis=1)
  if rs.rand() < 0.3:  # unsorted ids: the map is then conservative
    kv_ids = rs.randint(0, num_ids, size=(batch, kv_seq))
  q_lengths = np.where(rs.rand(batch) < 0.4,
                       rs.randint(0, q_seq + 1, size=batch), q_seq)
  kv_lengths = np.where(rs.rand(batch) < 0.4,
                        rs.randint(0, kv_seq + 1, size=batch), kv_seq)
  q_pad, kv_pad = -(-q_seq // 8) * 8, -(-kv_seq // 8) * 8
  # Head dim 256 has its own backward kernels (`backward_wide`) and tiles.
  head_dim = int(rs.choice([128, 256]))
  p = _params(batch=batch, q_seq=q_pad, kv_seq=kv_pad, mask=spec,
              block_kv=int(rs.choice([64, 128])), segments=True,
              head_dim=head_dim)
  config = AttentionConfig(mask=spec, scale=0.1, implementation=mosaic.NAME)
  arrays = MaskArrays(q_segment_ids=jnp.asarray(q_ids, jnp.int32),
                      kv_segment_ids=jnp.asarray(kv_ids, jnp.int32))
  rows = p.rows_per_cta
  # The backend's tiles: (query block, key block) of each kernel's map.
  tiles = {"forward": (rows, p.block_kv),
           **mosaic.backward_kernels(p).list_tiles(p)}
  # A CTA of any kernel owns one row of its map: at most `rows` rows.
  assert tiles["dq"][0] <= rows and tiles["dkv"][1] <= rows
  walks = {  # kernel: (row block, column block, lists from states)
      "forward": (*tiles["forward"], block_map.kv_lists),
      "dkv": (*tiles["dkv"][::-1], block_map.q_lists),
      "dq": (*tiles["dq"], block_map.kv_lists)}
  q_ids_in, kv_ids_in, states = mosaic.segment_lists(
      config, p, arrays, jnp.asarray(q_lengths, jnp.int32),
      jnp.asarray(kv_lengths, jnp.int32), [tiles[name] for name in walks])
  # The kernels' copies of the ids cover whole CTAs, repeating the last id.
  assert q_ids_in.shape[1] % rows == 0 and kv_ids_in.shape[1] % rows == 0
  np.testing.assert_array_equal(q_ids_in[:, :q_seq], q_ids)
  np.testing.assert_array_equal(kv_ids_in[:, kv_seq:],
                                np.repeat(kv_ids[:, -1:], kv_ids_in.shape[1]
                                          - kv_seq, axis=1))
  for (name, (row_block, col_block, to_lists)), state in zip(walks.items(),
                                                             states):
    lists = to_lists(state)
    refs = common.SegmentRefs(None, None, np.asarray(lists.blocks),
                              np.asarray(lists.counts))
    for b in range(batch):
      q_len, kv_len = int(q_lengths[b]), int(kv_lengths[b])
      allowed = _dense(spec, q_pad, kv_pad, q_len, kv_len) & (
          np.asarray(q_ids_in)[b, :q_pad, None]
          == np.asarray(kv_ids_in)[b, None, :kv_pad])
      if name == "dkv":        # rows are keys, columns queries
        allowed, row_len, col_len = allowed.T, kv_len, q_len
      else:
        row_len, col_len = q_len, kv_len
      for r in range(lists.blocks.shape[2]):
        walk = common.list_walk(refs, b, r)
        first_full, end_full = common.phase_steps(walk)
        steps = int(walk.steps)
        mine = allowed[r * row_block:(r + 1) * row_block]
        visited = np.zeros(mine.shape[1], bool)
        for t in range(steps):
          c = int(walk.block_of(t))
          visited[c * col_block:(c + 1) * col_block] = True
          if int(first_full) <= t < int(end_full):   # unmasked
            cols = slice(c * col_block, min((c + 1) * col_block, col_len))
            if name == "dkv":
              # Every key is valid (its dK, dV must stay 0 otherwise);
              # queries past q_len have lse = -inf, so P = 0 there.
              assert (r + 1) * row_block <= kv_len, (name, b, r, t)
              assert mine[:, cols].all(), (name, b, r, t)
            else:
              assert (c + 1) * col_block <= kv_len, (name, b, r, t)
              valid = max(0, min(row_len - r * row_block, row_block))
              assert mine[:valid, cols].all(), (name, b, r, t)
        assert not (mine & ~visited[None, :]).any(), (name, b, r)


def test_grids_launch_one_heads_tiles_together_and_split_wide_heads():
  """Mosaic GPU launches the last grid axis fastest: every kernel's last
  axis is its sequence tiles (the fused dK/dV kernel keeps its measured
  ``(heads, kv, batch)``), ``seq_fastest=False`` gives the order before
  session 11, and each order covers the same CTAs; consumers split dQ's
  columns where half the head dim is a whole 128-byte swizzle tile (head dim
  128), else each adds its own keys' part."""
  import importlib
  backward = importlib.import_module(
      "flash_jax.backends.pallas_mosaic_gpu.backward")
  common = importlib.import_module(
      "flash_jax.backends.pallas_mosaic_gpu.common")
  p = _params(num_kv_heads=2, num_heads=4)
  plain = backward._dkv_grid(p)
  fused = backward._dkv_grid(_params(num_kv_heads=2, num_heads=4,
                                     fused_dq=True))
  old = backward._dkv_grid(_params(num_kv_heads=2, num_heads=4,
                                   seq_fastest=False))
  assert plain["grid_names"] == ("batch", "heads", "kv")
  assert fused["grid_names"] == ("heads", "kv", "batch")
  assert old["grid_names"] == ("kv", "heads", "batch")
  for grid in (plain, fused, old):
    assert dict(zip(grid["grid_names"], grid["grid"])) == {
        "kv": 3, "heads": 2, "batch": 1}
  q_grid = common.sequence_major_grid(p, p.num_q_tiles, "q", p.num_heads)
  assert q_grid["grid_names"][-1] == "q"
  assert dict(zip(q_grid["grid_names"], q_grid["grid"])) == {
      "q": p.num_q_tiles, "heads": 4, "batch": 1}
  # CUDA's z axis holds at most 65535 blocks: a larger batch keeps the
  # tiles-slowest order, whose x axis has no such limit.
  huge = _params(batch=70000)
  assert common.sequence_major_grid(huge, 3, "q", 2)["grid_names"] == (
      "q", "heads", "batch")
  assert backward._splits_dq_columns(_params(head_dim=128))
  assert not backward._splits_dq_columns(_params(head_dim=64))


@pytest.mark.parametrize("batch, heads, q_seq, sms", [
    (2, 3, 512, 7), (1, 2, 300, 132), (3, 5, 1000, 8), (1, 1, 100, 4)])
def test_persistent_grid_deals_every_tile_once_in_rotation(batch, heads,
                                                            q_seq, sms):
  """A persistent forward grid takes every (batch, head, query tile) item
  exactly once, and a CTA count coprime with the tiles per head moves each
  CTA's tile index every round, so a CTA with as many items as a head has
  tiles meets each tile index once (long and short causal tiles alike)."""
  forward = mosaic._forward   # the module (mosaic.forward is the backend's)
  tiles = -(-q_seq // (CONSUMERS * BLOCK_Q))
  ctas = mosaic.persistent_ctas(sms, tiles)
  assert ctas <= sms and np.gcd(ctas, tiles) == 1
  assert all(np.gcd(n, tiles) > 1 for n in range(ctas + 1, sms + 1))
  p = _params(batch=batch, num_heads=heads, num_kv_heads=heads, q_seq=q_seq,
              persistent=ctas)
  grid = forward.persistent_grid_size(p)
  assert grid == min(ctas, batch * heads * tiles)
  taken = []
  for cta in range(grid):
    mine = [tuple(int(x) for x in forward.persistent_item(p, cta, i))
            for i in range(int(forward.persistent_item_count(p, cta)))]
    taken += mine
    if len(mine) >= tiles:
      assert {q for _, _, q in mine[:tiles]} == set(range(tiles))
  assert sorted(taken) == [(b, n, q) for b in range(batch)
                           for n in range(heads) for q in range(tiles)]


def test_persistent_forward_default_rule(monkeypatch):
  """`BlockSizes.persistent` decides when given; by default the persistent
  grid is taken up to head dim 128, and with tiles of unequal length
  (causal, window, segment ids) only where every CTA meets every tile
  index (`persistent_forward`'s measurements, on an H100's 132 SMs)."""
  from flash_jax.config import AttentionConfig, BlockSizes
  monkeypatch.setattr(flash_jax.platform, "sm_count",
                      lambda default=132: 132)
  config = lambda block_sizes=None: AttentionConfig(
      mask=MaskSpec(), scale=0.1, implementation="pallas_mosaic_gpu",
      block_sizes=block_sizes)
  rule = lambda **kw: mosaic.persistent_forward(config(), _params(**kw))
  short = dict(batch=32, num_heads=32, num_kv_heads=32, q_seq=512,
               kv_seq=512, head_dim=64)
  assert rule(**short, mask=MaskSpec()) and rule(**short)   # causal too
  long_causal = dict(batch=4, num_heads=16, num_kv_heads=16, q_seq=4096,
                     kv_seq=4096)
  assert not rule(**long_causal)
  assert not rule(**long_causal, mask=MaskSpec(window_left=512))
  assert not rule(**long_causal, mask=MaskSpec(), segments=True)
  assert rule(**long_causal, mask=MaskSpec())
  assert not rule(**long_causal, mask=MaskSpec(), head_dim=256)
  for chosen in (True, False):
    assert mosaic.persistent_forward(config(BlockSizes(persistent=chosen)),
                                     _params(**long_causal)) is chosen
  with pytest.raises(ValueError, match="CTA count"):
    _params(persistent=True)   # a count, not a flag


def test_consumer_count_is_checked():
  """Two or three consumer warpgroups (192 query rows per CTA with three,
  at head dim 64 only)."""
  assert _params().consumers == 2 and _params().rows_per_cta == 128
  with pytest.raises(ValueError, match="3 consumers are for head dim 64"):
    _params(consumers=3)   # head dim 128
  three = _params(consumers=3, head_dim=64)
  assert three.rows_per_cta == 192
  assert three.num_q_tiles == -(-three.q_seq // 192)
  for bad in (1, 4):
    with pytest.raises(ValueError, match="consumers is one of"):
      _params(consumers=bad)
  # With ping-pong the three take turns (`test_three_consumers_take_turns`).
  assert _params(consumers=3, head_dim=64, ping_pong=True).rows_per_cta == 192


def _run_turns(turns_per_consumer: int, rng):
  """Three consumers taking ``turns_per_consumer`` turns each through the
  forward's own rotation (`forward.FIRST_TURN_ARRIVALS`, `turn_passes`),
  interleaved at random against a model of mbarriers (a phase completes on
  its 2nd arrival; a wait for phase k passes once k phases completed).
  Returns the order in which turns were taken; raises on a deadlock or on
  two arrivals of one consumer within one phase."""
  forward = mosaic._forward   # the kernel module
  arrivals = [[] for _ in range(3)]   # per barrier: arrivers this phase
  completed = [0, 0, 0]

  def arrive(barrier, consumer):
    assert consumer not in arrivals[barrier], "two arrivals in one phase"
    arrivals[barrier].append(consumer)
    if len(arrivals[barrier]) == 2:
      completed[barrier] += 1
      arrivals[barrier] = []

  for consumer, barrier in forward.FIRST_TURN_ARRIVALS:
    arrive(barrier, consumer)
  taken = [0, 0, 0]
  order = []
  while min(taken) < turns_per_consumer:
    ready = [c for c in range(3) if taken[c] < turns_per_consumer
             and completed[c] > taken[c]]   # its barrier's next phase is in
    assert ready, f"deadlock after {order}"
    consumer = int(rng.choice(ready))
    taken[consumer] += 1
    order.append(consumer)
    for barrier in forward.turn_passes(consumer):
      arrive(int(barrier), consumer)
  return order


@pytest.mark.parametrize("turns", [1, 2, 7])
def test_three_consumers_take_turns(turns, rng):
  """The three-consumer ping-pong's barriers admit exactly one order, 0, 1,
  2, 0, 1, 2, ..., however the consumers race, with never more than one
  arrival of a consumer per phase (so a parity wait cannot alias). Every
  consumer takes as many turns (two per block), so this holds across a
  persistent CTA's items."""
  generator = np.random.default_rng(np.asarray(jax.random.key_data(rng)))
  for _ in range(20):
    assert _run_turns(turns, generator) == [0, 1, 2] * turns


def test_backward_kernels_refuse_three_consumer_params():
  """The backward kernels run two consumers over 128-row tiles: params of a
  three-consumer forward (192 rows) would leave rows without dQ."""
  p = _params(consumers=3, head_dim=64)
  for module in (mosaic._backward, mosaic._backward_wide):
    with pytest.raises(ValueError, match="take 2 consumers, got 3"):
      module.backward(p, *[None] * 8)


@pytest.mark.parametrize("head_dim", [40, 64, 128, 200])
def test_forward_and_backward_ring_depths(head_dim, monkeypatch):
  """The forward's K/V ring has `FORWARD_STAGES` slots at every head dim
  and the backward's rings, for short rows, `BACKWARD_STAGES`, each read on
  its own, so a forward-only tuning cannot move the backward kernels."""
  q = jnp.ones((1, 256, 2, head_dim), jnp.bfloat16)
  call = flash_jax.api.canonicalize(q, q, q)
  params = lambda forward: mosaic._params(call.config, q, q, call.arrays,
                                          forward=forward)
  assert params(True).stages == mosaic.FORWARD_STAGES == 2
  assert params(False).stages == mosaic.BACKWARD_STAGES == 2
  monkeypatch.setattr(mosaic, "BACKWARD_STAGES", 3)
  assert (params(True).stages, params(False).stages) == (2, 3)


@pytest.mark.parametrize("head_dim, q_seq, kv_seq, semantics, stages", [
    (128, 16384, 16384, {}, 3),
    (128, 16384, 16384, dict(deterministic=False), 2),
    (100, 20000, 333, {}, 3),          # head dim 100 pads to 128
    (128, 16383, 16384, {}, 2),
    (128, 4096, 16384, {}, 2),
    (64, 16384, 16384, {}, 2),
    (256, 16384, 16384, {}, 2),
    (128, 16384, 16384, dict(is_causal=True), 2),
    (128, 16384, 16384, dict(local_window_size=(4096, 4096)), 2),
    (128, 16384, 16384, dict(local_window_size=(8192, 0)), 2),
    (128, 16384, 16384, dict(segments=True), 2),
], ids=str)
def test_backward_ring_depth_rule(head_dim, q_seq, kv_seq, semantics,
                                  stages):
  """Three backward stages only for the deterministic backward of long
  rows that attend every key, at head dim 128 (`backward_stages`); the
  forward keeps `FORWARD_STAGES`."""
  semantics = dict(semantics)
  deterministic = semantics.pop("deterministic", True)
  segment_ids = {}
  if semantics.pop("segments", False):
    segment_ids = dict(
        query_segment_ids=jnp.ones((1, q_seq), jnp.int32),
        kv_segment_ids=jnp.ones((1, kv_seq), jnp.int32))
  # Shapes are all the rule reads.
  q = jnp.ones((1, q_seq, 2, head_dim), jnp.bfloat16)
  k = jnp.ones((1, kv_seq, 2, head_dim), jnp.bfloat16)
  call = flash_jax.api.canonicalize(q, k, k, **semantics, **segment_ids)
  config = dataclasses.replace(call.config, deterministic=deterministic)
  params = lambda forward: mosaic._params(config, q, k, call.arrays,
                                          forward=forward)
  assert params(False).stages == stages
  assert params(True).stages == mosaic.FORWARD_STAGES


@pytest.mark.parametrize("head_dim, q_seq, kv_seq, semantics, consumers", [
    (64, 2048, 2048, {}, 3),
    (40, 4096, 512, {}, 3),          # head dim 40 pads to 64
    (64, 2047, 2048, {}, 2),
    (64, 1024, 4096, {}, 2),
    (128, 4096, 4096, {}, 2),
    (64, 8192, 8192, dict(is_causal=True), 3),
    (64, 4096, 4096, dict(is_causal=True), 2),
    (64, 8192, 8192, dict(is_causal=True, local_window_size=(512, 0)), 2),
    (64, 4096, 4096, dict(local_window_size=256), 2),
    (64, 4096, 4096, dict(segments=True), 2),
    (64, 4096, 4096, dict(ping_pong=True), 2),
    (64, 4096, 4096, dict(ping_pong=False), 2),
    (64, 4096, 4096, dict(persistent=False), 3),
], ids=str)
def test_forward_consumer_rule(head_dim, q_seq, kv_seq, semantics,
                               consumers, monkeypatch):
  """`THREE_CONSUMERS_FROM_Q_SEQ`: the head-dim-64 forward takes three
  consumer warpgroups (ping-pong off) from 2048 query rows without a causal
  mask and 8192 with one; windows, segment ids and an explicit
  `BlockSizes.ping_pong` keep two; the backward always has two. (Two SMs
  here, so that these one-row grids pass the tiles-per-SM floor.)"""
  monkeypatch.setattr(flash_jax.platform, "sm_count", lambda default=132: 2)
  semantics = dict(semantics)
  tiling = {f: semantics.pop(f) for f in ("ping_pong", "persistent")
            if f in semantics}
  if semantics.pop("segments", False):
    semantics["query_segment_ids"] = jnp.ones((1, q_seq), jnp.int32)
    semantics["kv_segment_ids"] = jnp.ones((1, kv_seq), jnp.int32)
  q = jnp.ones((1, q_seq, 2, head_dim), jnp.bfloat16)
  kv = jnp.ones((1, kv_seq, 2, head_dim), jnp.bfloat16)
  call = flash_jax.api.canonicalize(q, kv, kv, **semantics)
  config = dataclasses.replace(
      call.config,
      block_sizes=flash_jax.BlockSizes(**tiling) if tiling else None)
  params = lambda forward: mosaic._params(config, call.query, call.key,
                                          call.arrays, forward=forward)
  forward, backward = params(True), params(False)
  assert forward.consumers == consumers
  assert forward.rows_per_cta == 64 * consumers
  expected_ping_pong = (consumers == 2 and tiling.get("ping_pong", True)
                        and mosaic._padded_head_dim(head_dim) <= 128)
  assert forward.ping_pong == expected_ping_pong
  assert backward.consumers == 2


@pytest.mark.parametrize("batch, heads, sm_count, consumers", [
    (1, 2, 132, 2),     # 2 x 43 tiles of 192 rows: under 8 per SM
    (1, 2, 10, 3),      # 86 tiles >= 8 x 10
    (1, 2, 11, 2),      # 86 < 8 x 11
    (4, 32, 132, 3),    # issue 6's 4k row at B*T = 16k tokens: 2816 tiles
])
def test_three_consumers_need_tiles_for_every_sm(batch, heads, sm_count,
                                                 consumers, monkeypatch):
  """`THREE_CONSUMERS_MIN_TILES_PER_SM`: a grid with fewer 192-row tiles
  than 8 per SM keeps two consumers, however long its rows."""
  monkeypatch.setattr(flash_jax.platform, "sm_count",
                      lambda default=132: sm_count)
  q_seq = 8192 if heads == 2 else 4096
  q = jax.ShapeDtypeStruct((batch, q_seq, heads, 64), jnp.bfloat16)
  small = jnp.ones((1, 16, 1, 64), jnp.bfloat16)
  config = flash_jax.api.canonicalize(small, small, small).config
  p = mosaic._params(config, q, q, MaskArrays(), forward=True)
  assert p.consumers == consumers


@pytest.mark.parametrize(
    "head_dim, q_seq, ping_pong, causal, threshold, late", [
    (40, 1000, None, False, None, False),   # two consumers taking turns
    (64, 1000, False, False, 8.0, False),   # two, no turns
    (64, 4096, None, False, 8.0, False),    # three consumers (no turns)
    (128, 1000, None, False, None, False),  # ping-pong: late is a probe option
    (128, 1000, None, True, None, False),   # ping-pong, causal
    (128, 1000, False, False, None, False),
    (200, 1000, None, False, 8.0, False),   # 256 runs no turns
    (256, 1000, True, False, None, False),
])
def test_forward_rescale_rule(head_dim, q_seq, ping_pong, causal, threshold,
                              late, monkeypatch):
  """`LAZY_RESCALE_HEAD_DIMS`: the forward rescales O lazily
  (`ForwardParams.rescale_threshold` at its largest) at padded head dims 64
  and 256 when its consumers do not take turns, else every block;
  `LATE_RESCALE_HEAD_DIMS`: after the hand-over (``late_rescale``) with
  ping-pong and no causal mask at none yet (the rule itself is checked with
  128 patched in). Bad thresholds are refused."""
  monkeypatch.setattr(flash_jax.platform, "sm_count", lambda default=132: 2)
  q = jax.ShapeDtypeStruct((1, q_seq, 4, head_dim), jnp.bfloat16)
  small = jnp.ones((1, 16, 1, head_dim), jnp.bfloat16)
  config = dataclasses.replace(
      flash_jax.api.canonicalize(small, small, small, is_causal=causal).config,
      block_sizes=(None if ping_pong is None
                   else flash_jax.BlockSizes(ping_pong=ping_pong)))
  p = mosaic._params(config, q, q, MaskArrays(), forward=True)
  assert (p.rescale_threshold, p.late_rescale) == (threshold, late)
  assert mosaic.rescale_fields(p.head_dim, p.ping_pong, causal) == dict(
      rescale_threshold=threshold, late_rescale=late)
  monkeypatch.setattr(mosaic, "LATE_RESCALE_HEAD_DIMS", (128,))
  assert mosaic.rescale_fields(p.head_dim, p.ping_pong, causal)[
      "late_rescale"] == (p.head_dim == 128 and p.ping_pong and not causal)
  assert not mosaic._params(config, q, q, MaskArrays(),
                            forward=False).late_rescale
  for bad in (-1.0, mosaic._forward.MAX_RESCALE_THRESHOLD + 1):
    with pytest.raises(ValueError, match="rescale_threshold"):
      dataclasses.replace(p, rescale_threshold=bad)


def _online_softmax(logits, values, block_kv, threshold):
  """The forward's consumer loop in plain jnp (`forward.softmax_block` per
  key block, O rescaled by each block's correction): ``(out, lse in log2
  units, max moves per row, largest probability)``."""
  rows = logits.shape[0]
  acc = jnp.zeros((rows, values.shape[1]), jnp.float32)
  m = jnp.full((rows,), -jnp.inf, jnp.float32)
  l = jnp.zeros((rows,), jnp.float32)
  moves, largest = jnp.zeros((rows,), jnp.int32), 0.0
  for start in range(0, logits.shape[1], block_kv):
    block = logits[:, start:start + block_kv]
    probs, correction, m_next, l = mosaic._forward.softmax_block(
        block, jnp.max(block, axis=1), m, l, threshold=threshold,
        masked=True)
    moves += (m_next != m).astype(jnp.int32)
    largest = max(largest, float(jnp.max(probs)))
    acc = acc * correction[:, None] + probs @ values[start:start + block_kv]
    m = m_next
  attends = l > 0
  out = jnp.where(attends[:, None], acc / jnp.where(attends, l, 1.0)[:, None],
                  0.0)
  return out, m + jnp.log2(l), moves, largest


@pytest.mark.parametrize("seed", range(4))
def test_lazy_rescaling_is_exact(seed):
  """`forward.softmax_block`, the kernel's own code, walked block by block
  in float32 on CPU: with a rescale threshold of 0 or 8 it gives softmax's
  output and lse (to float32 rounding) as rescaling every block does, also
  for rows masked in whole blocks and rows that attend nothing; at 8 a
  row's max moves only a few times while its scores climb, and no
  probability exceeds 2^8 before normalisation."""
  rng = np.random.default_rng(seed)
  rows, keys, block_kv = 48, 1000, 64
  # Scores that climb along the keys (the max moves often), in log2 units.
  logits = rng.normal(size=(rows, keys)) * np.linspace(1.0, 12.0, keys)
  allowed = rng.random((rows, keys)) < 0.8
  allowed[:8, :300] = False      # rows that start in fully masked blocks
  allowed[8:10] = False          # rows that attend nothing
  logits = jnp.asarray(np.where(allowed, logits, -np.inf), jnp.float32)
  values = jnp.asarray(rng.normal(size=(keys, 32)), jnp.float32)
  natural = logits * np.log(2.0)
  expected = jnp.where(jnp.asarray(allowed).any(1)[:, None],
                       jax.nn.softmax(natural, axis=1, where=allowed) @ values,
                       0.0)
  expected_lse = jax.nn.logsumexp(natural, axis=1, where=allowed) / np.log(2.0)
  every_block = _online_softmax(logits, values, block_kv, None)
  for threshold in (None, 0.0, 8.0):
    out, lse, moves, largest = _online_softmax(logits, values, block_kv,
                                               threshold)
    assert not jnp.isnan(out).any()
    np.testing.assert_allclose(out, expected, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(lse, expected_lse, rtol=1e-5)
    assert bool(jnp.all(jnp.isneginf(lse[8:10])))
    if threshold == 0.0:   # the same arithmetic as rescaling every block
      np.testing.assert_array_equal(out, every_block[0])
    if threshold == 8.0:
      assert largest <= 2.0 ** 8
      assert int(moves.max()) < int(every_block[2].max())
      assert float(moves[10:].mean()) <= 0.5 * float(every_block[2][10:].mean())


def test_exp2_tanh_matches_tanh():
  """The soft-cap's tanh (built from exp2 so that approx math keeps it
  accurate) against jnp.tanh, including saturation."""
  from flash_jax.backends.pallas_mosaic_gpu.forward import tanh
  x = jnp.concatenate([jnp.linspace(-30.0, 30.0, 2001),
                       jnp.array([-1e4, -1e-6, 0.0, 1e-6, 1e4])])
  np.testing.assert_allclose(tanh(x), jnp.tanh(x), rtol=0, atol=3e-7)


def test_lengths_are_clipped_to_the_true_length():
  lengths = mosaic._lengths(jnp.array([5, 300, -2]), 3, 100)
  np.testing.assert_array_equal(lengths, [5, 100, 0])
