"""The benchmark harness on CPU at tiny sizes: every row kind is checked
against the reference before timing, results are written as markdown, CSV
and JSON, and a wrong implementation is reported as an error, not a speed.
(Timings themselves are never asserted: they belong to GPU benchmark runs.)"""

from __future__ import annotations

import dataclasses
import json
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flash_jax
from benchmarks import harness, run
from benchmarks.harness import Comparison, Row
from flash_jax.masks import MaskSpec

TINY = Row(1, 64, 64, 2, 1, 32, True, "float32")
TINY_ROWS = [
    TINY,
    dataclasses.replace(TINY, window=16),
    dataclasses.replace(TINY, documents=3),
    dataclasses.replace(TINY, is_causal=False, sparsity=0.5),
    dataclasses.replace(TINY, dropout=0.2),
]


@pytest.mark.parametrize("row", TINY_ROWS, ids=lambda r: r.label)
def test_every_row_kind_is_checked_then_timed(row):
  names = ["flash_jax"] if row.dropout else ["flash_jax", "xla"]
  results = harness.measure(row, names, trials=1)
  assert len(results) == 2 * len(names)
  for entry in results:
    assert "error" not in entry, entry
    assert entry["seconds"] > 0 and entry["tflops"] > 0
    assert entry["max_relative_error"] < 1e-4


def test_large_rows_are_checked_on_their_last_query_rows(monkeypatch):
  """Above CHECK_ELEMENTS the check slices the queries (bottom-right
  alignment keeps causal exact) and still catches a wrong result."""
  monkeypatch.setattr(harness, "CHECK_ELEMENTS", 1000)
  monkeypatch.setattr(harness, "CHECK_ROWS", 16)
  row = dataclasses.replace(TINY, documents=2, window=24)
  inputs = harness.draw(row)
  assert harness.check(row, harness.IMPLEMENTATIONS["xla"], inputs,
                       1e-5) < 1e-5

  def wrong(row, inputs):
    attend = harness.IMPLEMENTATIONS["xla"](row, inputs)
    return lambda q, k, v: attend(q, k, v) * 1.01
  with pytest.raises(AssertionError, match="exceed"):
    harness.check(row, wrong, inputs, 1e-3)


def test_wrong_results_are_errors_and_files_are_written(tmp_path, monkeypatch):
  def wrong(row, inputs):
    return lambda q, k, v: jnp.zeros_like(q) + q
  monkeypatch.setitem(harness.IMPLEMENTATIONS, "broken", wrong)
  results = harness.measure(TINY, ["flash_jax", "broken"], trials=1)
  broken = [r for r in results if r["implementation"] == "broken"]
  assert all("error" in r and "seconds" not in r for r in broken)
  other = dataclasses.replace(TINY, window=8)
  results += harness.measure(other, ["flash_jax"], trials=1)
  markdown = harness.write_results(
      results, "tiny", directory=str(tmp_path),
      comparisons=[Comparison("window vs causal", other, TINY, target=1.0)])
  assert "broken" in markdown and "## Errors" in markdown
  assert "window vs causal (fwd):" in markdown
  saved = json.loads((tmp_path / "tiny.json").read_text())
  assert saved["environment"]["jax"] and len(saved["results"]) == 6
  assert (tmp_path / "tiny.csv").read_text().startswith("row,implementation")


def test_row_sets_are_well_formed():
  for name, bench in run.ROW_SETS.items():
    assert bench.rows, name
    labels = [row.label for row in bench.rows]
    assert len(set(labels)) == len(labels), name
    for c in bench.comparisons:
      assert c.fast in bench.rows and c.slow in bench.rows, c.name
  suite = run.ROW_SETS["suite_h128"].rows
  assert {r.batch * r.q_seq for r in suite} == {16384}
  assert {r.num_heads * r.head_dim for r in suite} == {2048}


def test_xla_is_skipped_where_its_scores_cannot_fit():
  row = Row(1, 32768, 32768, 16, 16, 128, True)  # 64 GiB of f32 scores
  reason = harness.scores_too_big(row, limit=80 * 2**30)
  assert reason and "192 GiB" in reason
  assert harness.scores_too_big(row, limit=400 * 2**30) is None
  assert harness.scores_too_big(TINY, limit=2**20) is None


def test_a_slice_of_a_set_is_written_after_every_row(monkeypatch):
  measured, writes = [], []
  monkeypatch.setattr(harness, "measure", lambda row, names: (
      measured.append(row) or [{"row": row.label}]))
  monkeypatch.setattr(harness, "write_results", lambda results, name, **kw: (
      writes.append((name, len(results))) or name))
  bench = run.ROW_SETS["suite_h128"]
  run.run_set("suite_h128", ["xla"], rows=slice(2, 5))
  assert measured == list(bench.rows[2:5])
  assert writes == [("suite_h128_rows2-5", n) for n in (1, 2, 3)]


def test_attended_pairs_count_what_the_masks_allow():
  """Against the library's own element mask for the row's semantics (the
  segment ids `draw` makes), counted on small rows."""
  rows = [Row(1, 40, 40, 1, 1, 8, causal, window=window, documents=docs)
          for causal in (False, True) for window in (None, 7)
          for docs in (None, 3)] + [Row(1, 30, 50, 1, 1, 8, True)]
  for row in rows:
    spec = MaskSpec(is_causal=row.is_causal, window_left=row.window,
                    window_right=None if row.window is None else 0)
    ids = lambda n: None if row.documents is None else (
        np.arange(n) * row.documents // n)
    q_ids, kv_ids = ids(row.q_seq), ids(row.kv_seq)
    allowed = spec.allows(
        np.arange(row.q_seq)[:, None], np.arange(row.kv_seq)[None, :],
        row.kv_seq, q_segment=None if q_ids is None else q_ids[:, None],
        kv_segment=None if kv_ids is None else kv_ids[None, :])
    count = np.broadcast_to(allowed, (row.q_seq, row.kv_seq)).sum()
    assert row.attended_pairs() == count, row.label
  assert dataclasses.replace(TINY, sparsity=0.5).attended_pairs() is None


def test_plot_draws_one_line_per_implementation(tmp_path):
  pytest.importorskip("matplotlib")  # the `bench` extra, installed by CI
  from benchmarks import plot
  results = []
  for t in (32, 64):
    row = dataclasses.replace(TINY, q_seq=t, kv_seq=t)
    results += harness.measure(row, ["flash_jax", "xla"], trials=1)
  results += harness.measure(dataclasses.replace(TINY, window=8),
                             ["flash_jax"], trials=1)
  panels = plot.series(results)
  assert set(panels) == {("fwd", True, 32, "float32"),
                         ("fwd+bwd", True, 32, "float32")}
  assert [t for t, _ in panels[("fwd", True, 32, "float32")]["xla"]] == [32,
                                                                        64]
  path = tmp_path / "results.json"
  path.write_text(json.dumps({"environment": harness.environment(),
                              "results": results}))
  assert plot.plot([str(path)], str(tmp_path / "plot.png")) == 2
  assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


def test_autotune_search_and_table(tmp_path):
  """The coordinate search keeps each kernel's fastest candidate (failures
  skipped), and the written table module is what the backend reads."""
  import importlib.util

  from benchmarks import autotune
  from flash_jax.backends.pallas_triton import tuning

  start = tuning.default_tiling(128)
  spaces = {kernel: list(autotune.candidates(kernel, 128, 2, (9, 0)))
            for kernel in autotune.SPACE}
  assert all(spaces.values())

  def fake_time(kernel, tiling):
    t = getattr(tiling, kernel)
    if t.num_warps == 4 and kernel == "dq":
      raise RuntimeError("does not compile")
    # Fastest: the largest key block, then the most stages.
    return 1.0 / (t.block_kv * 10 + t.num_stages)

  log = []
  best = autotune.search(start, fake_time, spaces, log)
  assert best.forward.block_kv == 128 and best.dkv.block_kv == 128
  assert best.dq.num_warps == 8
  assert any("error" in entry for entry in log)
  sizes = autotune.block_sizes(best)
  assert sizes.block_kv == best.forward.block_kv
  assert sizes.num_warps_dq == best.dq.num_warps

  # The starting tiling is timed first (and kept unless beaten, below).
  first = [entry for entry in log if entry["kernel"] == "dkv"][0]
  assert first["tiling"] == start.dkv.__dict__

  path = tmp_path / "tuned.py"
  autotune.write_table({"sm90/h128/16bit/causal": best}, str(path))
  spec = importlib.util.spec_from_file_location("tuned", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert tuning.Tiling.from_dict(
      module.TUNED["sm90/h128/16bit/causal"]) == best
  assert "benchmarks/autotune.py" in module.__doc__


def test_autotune_keeps_the_incumbent_unless_beaten_by_the_margin():
  """A candidate within 3% of the starting tiling is noise and loses; the
  replay of a saved log applies the same rule."""
  from benchmarks import autotune
  from flash_jax.backends.pallas_triton import tuning
  from flash_jax.backends.pallas_triton.tuning import KernelTiling

  start = tuning.default_tiling(128)
  close = KernelTiling(64, 64, 4, 3)
  clear = KernelTiling(64, 64, 4, 2)
  assert autotune.pick(start.forward, [(start.forward, 1.0), (close, 0.98)]
                       ) == start.forward
  assert autotune.pick(start.forward, [(start.forward, 1.0), (clear, 0.9)]
                       ) == clear
  # Without a time for the incumbent (it failed), the fastest wins.
  assert autotune.pick(start.forward, [(close, 0.98), (clear, 0.99)]
                       ) == close

  times = {("forward", close): 0.98, ("forward", start.forward): 1.0,
           ("dkv", clear): 0.5, ("dkv", start.dkv): 1.0,
           ("dq", start.dq): 1.0}

  def fake_time(kernel, tiling):
    t = getattr(tiling, kernel)
    if (kernel, t) not in times:
      raise RuntimeError("not in this test's space")
    return times[kernel, t]

  spaces = {"forward": [close, start.forward], "dkv": [clear, start.dkv],
            "dq": [start.dq]}
  log = []
  best = autotune.search(start, fake_time, spaces, log)
  assert best == tuning.Tiling(start.forward, clear, start.dq)
  record = {"key": "sm90/h128/16bit/full", "start": start.as_dict(),
            "best": best.as_dict(), "trials": log}
  assert autotune.replay([record]) == {"sm90/h128/16bit/full": best}


def test_dropout_probe_variants_keep_their_stated_bits(rng):
  """The probe's same-bits variants agree with their reference order (so
  its timings compare like with like); on CPU, with the emulated mulhi."""
  from benchmarks import dropout_probe as probe
  from flash_jax import dropout

  seed = dropout.seed_words(rng)
  q_idx = jnp.arange(5, 37, dtype=jnp.uint32)
  args = (seed, 0.1, 1, 2, q_idx, 64, 64, dropout.mulhi_emulated)
  plain = probe.contiguous16(*args)
  assert plain.shape == (32, 64) and plain.dtype == jnp.bool_
  for name in ("bools16", "words16", "repeat16", "per_key"):
    np.testing.assert_array_equal(probe.VARIANTS[name](*args), plain)
  np.testing.assert_array_equal(
      probe.VARIANTS["shipped"](*args[:-1]), dropout.keep_tile(*args))
  ten = probe.VARIANTS["rounds10"](*args)
  np.testing.assert_array_equal(ten, dropout.keep_tile(*args, rounds=10))
  assert (ten != dropout.keep_tile(*args)).any()
  for name in ("hash_only", "join_only"):   # timing stand-ins
    assert probe.VARIANTS[name](*args).shape == (32, 64)


def test_schedule_probe_switches_each_change_and_restores_them():
  from benchmarks import schedule_probe as probe
  triton_params = probe.triton_common.KernelParams
  mosaic_params = probe.mosaic_forward.ForwardParams
  shipped = (triton_params.q_block_of, mosaic_params.q_tile_of,
             mosaic_params.folds_scale)
  try:
    probe._set_variant(heavy_first=False, fold=False)
    assert triton_params.q_block_of(None, 3) == 3
    assert mosaic_params.q_tile_of(None, 3) == 3
    assert mosaic_params.folds_scale.fget(None) is False
  finally:
    probe._set_variant(heavy_first=True, fold=True)
  assert (triton_params.q_block_of, mosaic_params.q_tile_of,
          mosaic_params.folds_scale) == shipped


def test_float32_probe_applies_the_tests_error_rule(monkeypatch):
  """On CPU (interpret mode, full-precision products) the shipped kernels
  meet the rule; an output off by 1e-3 does not."""
  from benchmarks import float32_probe as probe
  from helpers import Case
  case = Case(1, 17, 33, 2, 1, 32, 32, True, "float32")
  results = probe._errors(case)
  assert len(results) == 4 and all(ok for _, _, ok in results)
  assert all(err > 0 and base > 0 for err, base, _ in results)
  shipped = flash_jax.dot_product_attention
  monkeypatch.setattr(flash_jax, "dot_product_attention",
                      lambda *a, **kw: shipped(*a, **kw) * (1 + 1e-3))
  out_ok = probe._errors(case)[0][2]
  assert not out_ok


def test_committed_table_replays_from_its_search_logs(tmp_path, monkeypatch):
  """Each committed sm90 entry is what ``--replay LOG --keys KEY`` derives
  from the log its docstring names; ``--keys`` leaves other entries alone."""
  import os
  import sys
  from benchmarks import autotune
  from flash_jax.backends.pallas_triton import tuned_configs
  logs = os.path.join(os.path.dirname(autotune.__file__), "results",
                      "NVIDIA_H100_80GB_HBM3")
  table = tmp_path / "table.py"
  for log, key in (("autotune_h128.json", "sm90/h128/16bit/full"),
                   ("autotune_h128_causal_16k.json",
                    "sm90/h128/16bit/causal")):
    monkeypatch.setattr(sys, "argv", [
        "autotune.py", "--replay", os.path.join(logs, log), "--keys", key,
        "--table", str(table)])
    autotune.main()
    written = {}
    exec(table.read_text(), written)  # noqa: S102 - our own generated table
    assert written["TUNED"] == tuned_configs.TUNED, key
  monkeypatch.setattr(sys, "argv", [
      "autotune.py", "--replay", os.path.join(logs, "autotune_h128.json"),
      "--keys", "sm90/h64/16bit/full", "--table", str(table)])
  with pytest.raises(SystemExit):
    autotune.main()


def test_sparse_probe_times_the_maps_the_backend_uses():
  """The probe's map-only programs compute the visiting lists the Triton
  backend's kernels read (so its split of the time is the backend's): the
  forward's equal a map made directly at the forward tile."""
  from benchmarks import sparse_probe
  from flash_jax import api, block_map
  from flash_jax.backends import pallas_triton
  row = dataclasses.replace(Row(1, 256, 256, 2, 2, 64, False), sparsity=0.7)
  inputs = harness.draw(row)
  call = api.canonicalize(inputs.q, inputs.k, inputs.v, mask=inputs.mask)
  tiling = pallas_triton._tiling(call.config, call.query, call.key,
                                 call.value)
  mask = call.arrays.mask
  forward = sparse_probe._maps_fn(call, tiling, "fwd")(mask)
  q_lists, kv_lists = sparse_probe._maps_fn(call, tiling, "bwd")(mask)
  expected = block_map.kv_lists(block_map.block_states(
      call.config.mask, call.arrays, batch=1, num_heads=2, q_seq=256,
      kv_seq=256, block_q=tiling.forward.block_q,
      block_kv=tiling.forward.block_kv))
  np.testing.assert_array_equal(forward.counts, expected.counts)
  np.testing.assert_array_equal(forward.blocks, expected.blocks)
  counts = np.asarray(forward.counts)
  assert 0 < int(counts[..., 1].sum()) < counts.shape[2] * (
      forward.blocks.shape[-1])
  assert q_lists.blocks.shape[-2] == -(-256 // tiling.dkv.block_kv)
  assert kv_lists.blocks.shape[-2] == -(-256 // tiling.dq.block_q)


def test_backward_probe_counts_the_products_each_kernel_performs():
  """7 products per tile in the Hopper backward (4 in dK/dV, 3 in dQ)
  against FlashAttention's 5 (2.5x the forward's 2); causal halves all."""
  from benchmarks import backward_probe
  row = Row(2, 64, 32, 3, 3, 16, False)
  one = 2.0 * 2 * 3 * 64 * 32 * 16
  assert backward_probe._products_flops(row, 2) == 2 * one
  assert backward_probe._products_flops(row, 7) == 3.5 * (
      backward_probe._products_flops(row, 2))
  causal = dataclasses.replace(row, is_causal=True)
  assert backward_probe._products_flops(causal, 4) == 2 * one


def test_fused_dq_probe_variants_patch_only_what_they_name():
  """The probe's stand-in for ``plgpu`` drops only reduce-add copies, and
  its key-blocks-fastest grid covers the shipped fused grid's CTAs."""
  from benchmarks import fused_dq_probe
  from flash_jax.backends.pallas_mosaic_gpu.forward import ForwardParams
  calls = []
  fake = types.SimpleNamespace(
      copy_smem_to_gmem=lambda src, dst, **kw: calls.append((src, dst, kw)),
      wgmma="wgmma")
  proxy = fused_dq_probe._without_reduce_adds(fake)
  proxy.copy_smem_to_gmem("a", "b")
  proxy.copy_smem_to_gmem("c", "d", reduction_op="add")
  assert calls == [("a", "b", {})] and proxy.wgmma == "wgmma"
  p = ForwardParams(batch=2, q_seq=300, kv_seq=300, num_heads=4,
                    num_kv_heads=2, head_dim=128, dtype=jnp.bfloat16,
                    mask=MaskSpec(), scale=0.1, logits_soft_cap=None,
                    block_kv=128, stages=2, fused_dq=True)
  shipped = fused_dq_probe.hopper_backward._dkv_grid(p)
  probe = fused_dq_probe._key_blocks_fastest(p)
  assert probe["grid_names"][0] == "kv"
  assert (dict(zip(shipped["grid_names"], shipped["grid"]))
          == dict(zip(probe["grid_names"], probe["grid"])))


def test_sparse_probe_count_variants_equal_the_shipped_counts(rng):
  """The probe's block-count variants count what `block_map._block_counts`
  counts, ragged tails (padded with False) and broadcast axes included."""
  from benchmarks import sparse_probe
  from flash_jax import block_map
  for shape, block_q, block_kv in (((1, 1, 37, 203), 32, 64),
                                   ((2, 3, 5, 96), 16, 16),
                                   ((1, 1, 9, 1), 16, 1)):
    rng, key = jax.random.split(rng)
    mask = jax.random.bernoulli(key, 0.6, shape)
    expected = block_map._block_counts(mask, block_q, block_kv)
    assert expected.shape == shape[:2] + (-(-shape[2] // block_q),
                                          -(-shape[3] // block_kv))
    for name, counts in sparse_probe.COUNT_VARIANTS.items():
      np.testing.assert_array_equal(counts(mask, block_q, block_kv),
                                    expected, err_msg=name)


def test_sparse_probe_balanced_mask_keeps_the_block_count(rng):
  """`balanced_mask` keeps the number of non-empty blocks and spreads them
  over the block rows within one of each other."""
  from benchmarks import sparse_probe
  row = dataclasses.replace(Row(1, 1024, 1024, 1, 1, 64, False),
                            sparsity=0.8)
  mask = harness.draw(row).mask
  even = sparse_probe.balanced_mask(mask, rng)
  blocks = lambda m: np.asarray(m[0, 0, ::128, ::128])
  assert even.shape == mask.shape and even.dtype == jnp.bool_
  assert blocks(even).sum() == blocks(mask).sum()
  per_row = blocks(even).sum(axis=1)
  assert per_row.max() - per_row.min() <= 1
  # Block-structured: every 128x128 block is all True or all False.
  tiles = np.asarray(even[0, 0]).reshape(8, 128, 8, 128)
  assert (tiles.all(axis=(1, 3)) == tiles.any(axis=(1, 3))).all()


def test_hopper_tile_probe_patches_only_the_forward_and_restores_it(
    monkeypatch):
  """The probe's tiles replace fields of the forward kernel's parameters
  (nothing else), and `use_tile(None)` puts the shipped kernel back."""
  from benchmarks import hopper_tile_probe as probe
  from flash_jax.backends import pallas_mosaic_gpu
  assert probe.parse_tile("192x2xP") == {"block_kv": 192, "stages": 2,
                                         "ping_pong": True}
  assert probe.parse_tile("128x3") == {"block_kv": 128, "stages": 3}
  assert probe.parse_tile("128x2xNxC132") == {
      "block_kv": 128, "stages": 2, "ping_pong": False, "persistent": 132}
  assert probe.parse_tile("128x2xW3") == {"block_kv": 128, "stages": 2,
                                          "consumers": 3}
  assert probe.parse_tile("128x3xR0xC0") == {
      "block_kv": 128, "stages": 3, "reduction_scratch": 0, "persistent": 0}
  assert probe.parse_tile("64x2xL8") == {"block_kv": 64, "stages": 2,
                                         "rescale_threshold": 8.0}
  assert probe.parse_tile("64x2xL0.5xA") == {"block_kv": 64, "stages": 2,
                                             "rescale_threshold": None}
  assert probe.parse_tile("128x2xD") == {"block_kv": 128, "stages": 2,
                                         "late_rescale": True}
  with pytest.raises(ValueError, match="W<consumers>, R<bytes>, A, D or L"):
    probe.parse_tile("128x3xQ")

  @dataclasses.dataclass(frozen=True)
  class Params:
    block_kv: int = 128
    stages: int = 3

  seen = []
  monkeypatch.setattr(probe, "SHIPPED_FORWARD",
                      lambda p, *args: seen.append((p, args)) or "out")
  probe.use_tile({"block_kv": 192, "stages": 2})
  assert pallas_mosaic_gpu._forward.forward(Params(), 1, 2) == "out"
  assert seen == [(Params(192, 2), (1, 2))]
  # A schedule named without rescale fields gets the backend's for it.
  @dataclasses.dataclass(frozen=True)
  class Wide(Params):
    head_dim: int = 256
    mask: MaskSpec = MaskSpec()
    ping_pong: bool = True
    rescale_threshold: float | None = None
    late_rescale: bool = False

  for head_dim, tile, expected in (
      (256, "64x2xN", (False, 8.0, False)),
      (256, "64x2xP", (True, None, False)),
      (256, "64x2xPxL0", (True, 0.0, False)),
      (128, "128x2xP", (True, None, False)),
      (128, "128x2xN", (False, None, False))):
    probe.use_tile(probe.parse_tile(tile))
    seen.clear()
    pallas_mosaic_gpu._forward.forward(
        Wide(head_dim=head_dim, ping_pong=not expected[0]), 1)
    p = seen[0][0]
    assert (p.ping_pong, p.rescale_threshold, p.late_rescale) == expected, (
        tile)
  probe.use_tile(None)
  assert pallas_mosaic_gpu._forward.forward is probe.SHIPPED_FORWARD
  monkeypatch.undo()
  probe.use_tile(None)
  assert pallas_mosaic_gpu._forward.forward is probe.SHIPPED_FORWARD


def test_hopper_tile_probe_consumers_reach_only_the_forward_params():
  """A ``W3`` tile gives the forward's parameters three consumers (ping-pong
  off) where the backend builds them, leaves the backward's alone, and
  `use_tile(None)` restores the shipped builder."""
  from benchmarks import hopper_tile_probe as probe
  from flash_jax import api
  from flash_jax.backends import pallas_mosaic_gpu
  q = jnp.ones((1, 256, 2, 64), jnp.bfloat16)
  call = api.canonicalize(q, q, q)
  params = lambda forward: pallas_mosaic_gpu._params(
      call.config, q, q, call.arrays, forward=forward)
  assert params(True).consumers == 2 and params(True).ping_pong
  assert params(True).rescale_threshold is None
  probe.use_tile(probe.parse_tile("128x2xW3"))
  try:
    assert params(True).consumers == 3 and not params(True).ping_pong
    assert params(True).rows_per_cta == 192
    # The backend's rescaling for three consumers without turns: lazy.
    assert params(True).rescale_threshold == 8.0
    assert params(False).consumers == 2
  finally:
    probe.use_tile(None)
  assert pallas_mosaic_gpu._params is probe.SHIPPED_PARAMS
  assert pallas_mosaic_gpu._forward.forward is probe.SHIPPED_FORWARD


def test_hopper_tile_probe_reduction_scratch_reaches_every_kernel():
  """An ``R<bytes>`` tile sets the reduction reserve in the compiler
  parameters every Hopper kernel takes, and `use_tile(None)` restores
  Pallas's default (the backend's parameters are untouched by default)."""
  from jax.experimental.pallas import mosaic_gpu as plgpu
  from benchmarks import hopper_tile_probe as probe
  from flash_jax.backends.pallas_mosaic_gpu import common
  default = plgpu.CompilerParams(approx_math=True)
  assert common.compiler_params() == default
  probe.use_tile(probe.parse_tile("128x3xR0"))
  try:
    assert common.compiler_params().reduction_scratch_bytes == 0
    assert common.compiler_params().approx_math
  finally:
    probe.use_tile(None)
  assert common.compiler_params() == default


def test_hopper_tile_probe_two_consumer_tile_takes_the_two_way_schedule(
    monkeypatch):
  """Where the shipped rule picks three consumers (head dim 64, T=4096, on
  two SMs), a ``W2`` tile gives two with the backend's ping-pong for two,
  and ``P`` or ``N`` without ``W`` two as well (as `BlockSizes.ping_pong`
  does)."""
  from benchmarks import hopper_tile_probe as probe
  from flash_jax import api
  from flash_jax.backends import pallas_mosaic_gpu
  q = jnp.ones((1, 4096, 2, 64), jnp.bfloat16)
  call = api.canonicalize(q, q, q)
  params = lambda: pallas_mosaic_gpu._params(
      call.config, q, q, call.arrays, forward=True)
  monkeypatch.setattr(pallas_mosaic_gpu.platform, "sm_count",
                      lambda default=132: 2)
  assert params().consumers == 3 and not params().ping_pong
  for tile in ("128x2xW2", "128x2xN", "128x2xP"):
    probe.use_tile(probe.parse_tile(tile))
    try:   # (P and N reach the kernel's params later, in its wrapper)
      assert params().consumers == 2 and params().ping_pong
    finally:
      probe.use_tile(None)
  assert params().consumers == 3


def test_hopper_tile_probe_grid_order_switch_restores_the_shipped_params():
  from benchmarks import hopper_tile_probe as probe
  from flash_jax import api
  from flash_jax.backends import pallas_mosaic_gpu
  q = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
  call = api.canonicalize(q, q, q)
  params = lambda: pallas_mosaic_gpu._params(call.config, q, q, call.arrays,
                                            forward=True)
  assert params().seq_fastest
  probe.use_grid_order(False)
  try:
    assert not params().seq_fastest
  finally:
    probe.use_grid_order(None)
  assert pallas_mosaic_gpu._params is probe.SHIPPED_PARAMS


def test_backward_probe_stage_switch_reaches_only_the_backward_params():
  """`backward_probe.use_backward_stages` sets the backward kernels' ring
  depth for short and long rows alike (the forward keeps its own), and
  None restores the shipped rule (`pallas_mosaic_gpu.backward_stages`)."""
  from benchmarks import backward_probe as probe
  from flash_jax import api
  from flash_jax.backends import pallas_mosaic_gpu

  def params(q_seq, forward):
    q = jnp.ones((1, q_seq, 2, 128), jnp.bfloat16)
    call = api.canonicalize(q, q, q)
    return pallas_mosaic_gpu._params(call.config, q, q, call.arrays,
                                     forward=forward)
  shipped = pallas_mosaic_gpu.backward_stages
  long_rows = pallas_mosaic_gpu.LONG_BACKWARD_FROM_Q_SEQ
  assert params(256, False).stages == pallas_mosaic_gpu.BACKWARD_STAGES == 2
  assert params(long_rows, False).stages == 3
  probe.use_backward_stages(4)
  try:
    assert params(256, False).stages == params(long_rows, False).stages == 4
    assert params(256, True).stages == pallas_mosaic_gpu.FORWARD_STAGES
  finally:
    probe.use_backward_stages(None)
  assert pallas_mosaic_gpu.backward_stages is shipped
  assert params(256, False).stages == 2
  assert params(long_rows, False).stages == 3


def test_hopper_tile_probe_once_takes_a_tile(monkeypatch):
  """``--once CASE --tile T`` (what scripts/ncu_forward.sh passes for
  ``CASE:T``) runs that case at that tile."""
  from benchmarks import hopper_tile_probe as probe
  seen = []
  monkeypatch.setattr(probe, "once", lambda *args: seen.append(args))
  monkeypatch.setattr(sys, "argv", ["probe", "--once", "4096/64",
                                    "--tile", "128x2xPxW3"])
  probe.main()
  monkeypatch.setattr(sys, "argv", ["probe", "--once", "4096/64",
                                    "--implementation", "cudnn"])
  probe.main()
  assert seen == [("4096/64", "flash_jax_mosaic", "128x2xPxW3"),
                  ("4096/64", "cudnn", None)]


def test_backward_probe_once_takes_a_part_and_one_depth(monkeypatch):
  """``--once ROW --part P --backward-stages N`` (what
  scripts/ncu_backward.sh passes for ``ROW:N`` and ``ROW@P``) runs that
  part of that row at that depth; two depths are a usage error."""
  from benchmarks import backward_probe as probe
  seen = []
  monkeypatch.setattr(probe, "once", lambda *args: seen.append(args))
  for argv in (["--once", "16k", "--backward-stages", "3"],
               ["--once", "4k", "--part", "fused"],
               ["--once", "h256", "--part", "cudnn"]):
    monkeypatch.setattr(sys, "argv", ["probe", *argv])
    probe.main()
  assert seen == [("16k", "backward", 3), ("4k", "fused", None),
                  ("h256", "cudnn", None)]
  monkeypatch.setattr(sys, "argv", ["probe", "--once", "16k",
                                    "--backward-stages", "2,3"])
  with pytest.raises(SystemExit):
    probe.main()
  assert len(seen) == 3


def test_sparse_probe_modes_go_through_argparse():
  """The probe's modes are parsed by argparse: tiles as 4-tuples, one mode
  at a time, ``--once`` defaulting to the forward."""
  from benchmarks import sparse_probe
  args = sparse_probe.parse_args(["--tiles", "128x64x4x3,64x32x4x2"])
  assert args.tiles == [(128, 64, 4, 3), (64, 32, 4, 2)]
  assert not args.balanced and args.once is None
  assert sparse_probe.parse_args(["--once"]).once == "fwd"
  assert sparse_probe.parse_args(["--once", "fwd+bwd"]).once == "fwd+bwd"
  assert sparse_probe.parse_args(["--balanced"]).balanced
  assert sparse_probe.parse_args([]).tiles is None
  for bad in (["--tiles", "128x64"], ["--once", "bwd"],
              ["--balanced", "--once"]):
    with pytest.raises(SystemExit):
      sparse_probe.parse_args(bad)
