"""Tiling resolution of the Triton backend: tuned table, overrides, clamping
and the ahead-of-time resource check (CPU only: no kernel runs)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import flash_jax
from flash_jax.backends.pallas_triton import tuned_configs, tuning
from flash_jax.backends.pallas_triton.tuning import KernelTiling, Tiling

H100, A100, RTX = (9, 0), (8, 0), (8, 6)


def resolve(overrides=None, *, head_dim=128, item_bytes=2, causal=False,
            seq=8192, capability=H100, check=True, listed=False):
  return tuning.resolve_tiling(
      overrides, head_dim=head_dim, value_dim=head_dim, item_bytes=item_bytes,
      causal=causal, q_seq=seq, kv_seq=seq, capability=capability,
      check_resources=check, listed=listed)


@pytest.fixture
def no_tuned_table(monkeypatch):
  """Resolution as on a GPU nobody has tuned for."""
  monkeypatch.setattr(tuned_configs, "TUNED", {})


def test_defaults_fit_the_h100_unchanged(no_tuned_table):
  for head_dim in (16, 64, 128, 256):
    assert resolve(head_dim=head_dim) == tuning.default_tiling(head_dim)
    assert resolve(head_dim=head_dim, item_bytes=4) == tuning.default_tiling(
        head_dim, float32=True)


def test_tuned_entries_win_over_defaults(no_tuned_table, monkeypatch):
  tuned = Tiling(KernelTiling(64, 128, 4, 2), KernelTiling(64, 64, 4, 2),
                 KernelTiling(64, 64, 4, 2))
  key = tuning.table_key(H100, 128, False, True)
  assert key == "sm90/h128/16bit/causal"
  monkeypatch.setitem(tuned_configs.TUNED, key, tuned.as_dict())
  assert resolve(causal=True) == tuned
  assert resolve(causal=False) == tuning.default_tiling(128)
  assert resolve(causal=True, capability=A100) == tuning.default_tiling(128)


def test_overrides_apply_per_kernel_and_blocks_clamp_to_the_sequence(
    no_tuned_table):
  sizes = flash_jax.BlockSizes(block_q=64, block_kv_dq=64, num_warps=4,
                               num_warps_dkv=8, num_stages_dkv=2,
                               num_warps_dq=8)
  tiling = resolve(sizes)
  assert tiling.forward == KernelTiling(64, 64, 4, 3)
  assert tiling.dkv == KernelTiling(32, 128, 8, 2)
  assert tiling.dq == KernelTiling(128, 64, 8, 3)
  short = resolve(sizes, seq=20)
  assert short.forward.block_q == 32 and short.dkv.block_kv == 32


def test_committed_tuned_entries_fit_and_are_used():
  """Every entry of the committed table fits its GPU generation as it
  stands (nothing is shrunk) and is what resolution returns there."""
  generations = {"sm80": A100, "sm90": H100}
  assert tuned_configs.TUNED, "the H100 search has been committed"
  for key, entry in tuned_configs.TUNED.items():
    generation, head, width, mode = key.split("/")
    head_dim = int(head[1:])
    item_bytes = 4 if width == "float32" else 2
    capability = generations[generation]
    tiling = Tiling.from_dict(entry)
    for kernel in ("forward", "dkv", "dq"):
      assert tuning.check_fits(kernel, getattr(tiling, kernel), head_dim,
                               head_dim, item_bytes, capability) is None
    assert resolve(head_dim=head_dim, item_bytes=item_bytes,
                   causal=mode == "causal", capability=capability) == tiling


def test_listed_forward_tile_applies_where_measured():
  """A forward that walks a block list takes `LISTED_FORWARD`'s tile on the
  GPU, head dim and width it was measured for, in both causal modes, unless
  the caller sets a forward field; the backward tiles, other keys and
  interpret mode are untouched."""
  listed = tuning.LISTED_FORWARD["sm90/h128/16bit"]
  for causal in (False, True):
    plain = resolve(causal=causal)
    tiling = resolve(causal=causal, listed=True)
    assert tiling == Tiling(listed, plain.dkv, plain.dq)
    for kernel in ("forward", "dkv", "dq"):
      assert tuning.check_fits(kernel, getattr(tiling, kernel), 128, 128, 2,
                               H100) is None
  for other in (dict(head_dim=64), dict(item_bytes=4), dict(capability=A100),
                dict(check=False)):
    assert resolve(listed=True, **other) == resolve(**other)
  # Any forward field asked for starts from the dense loops' tile instead.
  sizes = flash_jax.BlockSizes(num_stages_fwd=2)
  assert resolve(sizes, listed=True) == resolve(sizes)
  sizes = flash_jax.BlockSizes(block_q_dq=64)
  assert resolve(sizes, listed=True).forward == listed


def test_backend_lists_the_forward_tile_by_its_schedule():
  """`pallas_triton._tiling` takes the listed tile exactly when the call
  needs a block map (here a dense mask; causal alone is a range)."""
  from flash_jax import api
  from flash_jax.backends import pallas_triton
  q = jnp.zeros((1, 256, 2, 128), jnp.bfloat16)
  mask = jnp.ones((1, 1, 256, 256), bool)
  masked = api.canonicalize(q, q, q, mask=mask)
  causal = api.canonicalize(q, q, q, is_causal=True)
  listed = tuning.LISTED_FORWARD["sm90/h128/16bit"]
  tiles = lambda call, arrays: pallas_triton._tiling(
      call.config, call.query, call.key, call.value, arrays)
  if flash_jax.platform.compute_capability() not in (None, H100):
    pytest.skip("the listed tile is keyed to sm90")
  assert tiles(masked, masked.arrays).forward == listed
  assert tiles(masked, None).forward != listed
  assert tiles(causal, causal.arrays).forward != listed


def test_defaults_shrink_to_fit_smaller_gpus():
  for capability in (A100, RTX):
    for head_dim in (64, 128, 256):
      for item_bytes in (2, 4):
        if (capability, head_dim, item_bytes) == (RTX, 256, 4):
          # Not even 16x16 tiles fit ~100 KiB: the backend declines.
          with pytest.raises(NotImplementedError, match="smallest tiles"):
            resolve(head_dim=head_dim, item_bytes=item_bytes,
                    capability=capability)
          continue
        tiling = resolve(head_dim=head_dim, item_bytes=item_bytes,
                         capability=capability)
        for kernel in ("forward", "dkv", "dq"):
          assert tuning.check_fits(kernel, getattr(tiling, kernel), head_dim,
                                   head_dim, item_bytes, capability) is None
  assert resolve(capability=RTX).forward.num_stages < 3


def test_requested_tiles_that_cannot_fit_raise_before_compiling():
  too_big = flash_jax.BlockSizes(block_q=128, block_kv=128, num_stages=4)
  with pytest.raises(ValueError, match="shared memory"):
    resolve(too_big, head_dim=256)
  # The same request is fine where nothing is compiled (interpret mode).
  resolve(too_big, head_dim=256, check=False)
  # And through the public API, at trace time.
  q = jax.ShapeDtypeStruct((1, 512, 2, 256), jnp.bfloat16)
  call = lambda q, k, v: flash_jax.dot_product_attention(
      q, k, v, implementation="pallas_triton", interpret=False,
      block_sizes=too_big)
  monkey = pytest.MonkeyPatch()
  monkey.setattr(flash_jax.platform, "triton_gpu_unsupported_reason",
                 lambda: None)
  try:
    with pytest.raises(ValueError, match="shared memory"):
      jax.eval_shape(call, q, q, q)
  finally:
    monkey.undo()


def test_register_estimate_rejects_huge_accumulators():
  reason = tuning.check_fits("forward", KernelTiling(256, 16, 1, 1), 256,
                             256, 2, H100)
  assert reason and "accumulators" in reason


def test_warps_alone_shrink_default_tiles_instead_of_raising():
  """Only block sizes the caller chose are held to the estimate; asking for
  4 warps everywhere shrinks the default tiles that would no longer fit."""
  tiling = resolve(flash_jax.BlockSizes(num_warps=4))
  for kernel in ("forward", "dkv", "dq"):
    t = getattr(tiling, kernel)
    assert t.num_warps == 4
    assert tuning.check_fits(kernel, t, 128, 128, 2, H100) is None


def _h100_search_trials():
  """``(kernel, tiling, head_dim, item_bytes, compiled)`` for every trial in
  the committed H100 autotune logs: what Triton compiled, or refused for
  shared memory."""
  import json
  import os
  results = os.path.join(os.path.dirname(os.path.dirname(__file__)),
                         "benchmarks", "results", "NVIDIA_H100_80GB_HBM3")
  trials = []
  for name in sorted(os.listdir(results)):
    if not (name.startswith("autotune_") and name.endswith(".json")):
      continue
    with open(os.path.join(results, name)) as f:
      for record in json.load(f):
        _, head, width, _ = record["key"].split("/")
        item_bytes = 4 if width == "float32" else 2
        for trial in record["trials"]:
          error = trial.get("error", "")
          if error and "Shared memory" not in error:
            continue  # Failed for another reason: says nothing here.
          trials.append((trial["kernel"], KernelTiling(**trial["tiling"]),
                         int(head[1:]), item_bytes, not error))
  return trials


def test_shared_memory_estimate_agrees_with_the_h100_compiler():
  """Every tiling the H100 searches compiled passes the estimate, and every
  one Triton refused for shared memory fails it (the float32 search found
  the old estimate short by up to 160 KiB)."""
  trials = _h100_search_trials()
  assert any(not ok for *_, ok in trials), "the logs hold refused tilings"
  assert any(b == 4 for *_, b, _ in trials)
  for kernel, t, head_dim, item_bytes, compiled in trials:
    fits = tuning.check_fits(kernel, t, head_dim, head_dim, item_bytes,
                             H100) is None
    assert fits == compiled, (kernel, t, item_bytes, compiled)


def test_backend_declines_a_call_no_tile_can_fit(monkeypatch):
  """Where even the smallest tiles overflow shared memory, the Triton
  backend raises NotImplementedError when asked, so the dispatcher falls
  through instead of handing Triton a kernel it cannot compile."""
  from flash_jax import api, backends
  monkeypatch.setattr(flash_jax.platform, "triton_gpu_unsupported_reason",
                      lambda: None)
  monkeypatch.setattr(flash_jax.platform, "compute_capability", lambda: RTX)
  backend = backends.get("pallas_triton")
  for dtype, declines in ((jnp.float32, True), (jnp.bfloat16, False)):
    q = jnp.ones((1, 64, 1, 256), dtype)
    call = api.canonicalize(q, q, q)
    check = lambda: backend.check_supported(call.config, q, q, q, None,
                                            call.arrays)
    if declines:
      with pytest.raises(NotImplementedError, match="smallest tiles"):
        check()
    else:
      check()
