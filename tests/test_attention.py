"""Runs the shared attention tests for every implementation."""

import dataclasses

import flash_jax
import pytest
from attention_base import AttentionTestBase
from helpers import Case, draw_inputs, packed_segment_ids



def _call_semantics(rng, case: Case, semantics: dict) -> dict:
  """Keyword arguments for a call from a test's semantics: lengths given as
  tuples become arrays, and ``segments=True`` becomes packed segment ids
  drawn for ``case`` (the same ids for queries and keys)."""
  import jax.numpy as jnp
  semantics = {name: jnp.array(x) if name.endswith("lengths") else x
               for name, x in semantics.items()}
  if semantics.pop("segments", False):
    ids, _ = packed_segment_ids(rng, case.q_seq, case.kv_seq,
                                batch=case.batch)
    semantics.update(query_segment_ids=ids, kv_segment_ids=ids)
  return semantics

class TestPallasTriton(AttentionTestBase):
  """Pallas Triton kernels: interpret mode on CPU, compiled on a GPU."""

  implementation = "pallas_triton"

  def test_launch_order_leaves_every_bit_unchanged(self, rng, monkeypatch):
    """Query blocks run last first (`flash_jax.masks.heavy_first`); each
    program is independent, so the plain order gives the same bits."""
    import jax
    import numpy as np
    from flash_jax.backends.pallas_triton import common
    from helpers import Case, draw_inputs, vjp_triple
    q, k, v, do = draw_inputs(rng, Case(2, 97, 113, 4, 2, 64, 64, True,
                                        "bfloat16"))
    run = lambda: jax.tree.leaves(jax.jit(lambda *a: vjp_triple(
        lambda *b: self.attend(*b, is_causal=True,
                               block_sizes=self.small_tiles), *a))(
                                   q, k, v, do))
    shipped = run()
    monkeypatch.setattr(common.KernelParams, "q_block_of",
                        lambda self, program: program)
    jax.clear_caches()
    for a, b in zip(shipped, run()):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


class TestXla(AttentionTestBase):
  """The XLA reference backend."""

  implementation = "xla"


@pytest.mark.skipif(
    flash_jax.platform.compute_capability() is None
    or flash_jax.platform.compute_capability()[0] != 9,
    reason="Mosaic GPU kernels run on sm90 only (no interpret mode for "
    "wgmma); CI lowers them (test_lowering.py) and tests their schedule "
    "(test_mosaic_gpu.py)")
class TestPallasMosaicGpu(AttentionTestBase):
  """The Hopper backend, falling through to Triton for what it refuses."""

  implementation = ("pallas_mosaic_gpu", "pallas_triton")
  small_tiles = None   # its tiles are fixed (BlockSizes would send calls to Triton)

  def test_supported_calls_run_the_mosaic_kernel(self, rng):
    import jax
    import jax.numpy as jnp
    q = jax.random.normal(rng, (2, 1000, 4, 128), jnp.bfloat16)
    text = jax.jit(lambda q: self.attend(q, q, q, is_causal=True)).lower(
        q).as_text()
    assert "mosaic_gpu" in text

  @pytest.mark.parametrize("case, semantics", [
      (Case(1, 1023, 1024, 4, 1, 128, 128, True, "bfloat16"), {}),
      (Case(2, 113, 203, 4, 2, 64, 64, False, "float16"), {}),
      (Case(2, 97, 203, 4, 1, 40, 40, True, "bfloat16"),
       dict(causal_alignment="bottom_right", logits_soft_cap=30.0)),
      (Case(1, 1000, 1000, 4, 2, 128, 128, True, "bfloat16"),
       dict(local_window_size=(200, 0))),
  ], ids=lambda x: str(x) if isinstance(x, Case) else "-".join(x) or "plain")
  def test_nondeterministic_backward_matches_reference(self, rng, case,
                                                       semantics):
    """``deterministic=False``: the dK/dV kernel also reduce-adds dQ."""
    q, k, v, do = draw_inputs(rng, case)
    self.check_against_reference(q, k, v, do, is_causal=case.is_causal,
                                 options=dict(deterministic=False),
                                 **semantics)

  @pytest.mark.parametrize("head_dim, deterministic, extra", [
      (128, False, {}), (64, False, {}), (64, True, {}), (256, True, {}),
      (256, False, dict(local_window_size=(150, 0))),
      (128, True, dict(local_window_size=(150, 0), logits_soft_cap=30.0)),
      (64, False, dict(causal_alignment="bottom_right",
                       logits_soft_cap=20.0))],
      ids=lambda x: ("-".join(x) or "plain") if isinstance(x, dict) else str(x))
  def test_segment_ids_run_the_mosaic_kernels(self, rng, head_dim,
                                              deterministic, extra):
    """Segment ids with causal, GQA and unaligned T and S (and a window,
    bottom-right alignment, soft-cap) take the Hopper kernels (the lowered
    program holds no Triton forward) and match the reference, with either
    backward."""
    import jax
    case = Case(2, 300, 410, 4, 2, head_dim, head_dim, True, "bfloat16")
    q, k, v, do = draw_inputs(rng, case)
    q_ids, kv_ids = packed_segment_ids(rng, 300, 410)
    semantics = dict(is_causal=True, query_segment_ids=q_ids,
                     kv_segment_ids=kv_ids, **extra)
    text = jax.jit(lambda q, k, v: self.attend(q, k, v, **semantics)).lower(
        q, k, v).as_text()
    assert "mosaic_gpu" in text and "xla.gpu.triton" not in text
    self.check_against_reference(
        q, k, v, do, options=dict(deterministic=deterministic), **semantics)

  @pytest.mark.parametrize("case, semantics, deterministic", [
      (Case(2, 1000, 1100, 8, 2, 256, 256, True, "bfloat16"), {}, True),
      (Case(2, 1000, 1100, 8, 2, 256, 256, False, "bfloat16"), {}, False),
      (Case(1, 1023, 1024, 2, 1, 256, 256, True, "float16"), {}, True),
      (Case(2, 300, 410, 4, 4, 200, 200, True, "bfloat16"),
       dict(local_window_size=(100, 20), logits_soft_cap=30.0,
            causal_alignment="bottom_right"), True),
      (Case(3, 200, 300, 4, 2, 256, 256, True, "bfloat16"),
       dict(query_seq_lengths=(200, 77, 0),
            key_value_seq_lengths=(300, 150, 5),
            causal_alignment="bottom_right"), True),
  ], ids=lambda x: str(x) if isinstance(x, Case) else (
      "-".join(x) or "plain") if isinstance(x, dict) else f"det={x}")
  def test_head_dim_256_backward_runs_the_mosaic_kernels(
      self, rng, case, semantics, deterministic):
    """Head dims 129-256 take `backward_wide`'s two Mosaic GPU kernels
    (one consumer forms P and dV, the other dS and dK or dQ), with either
    ``deterministic``: the lowered gradient holds no Triton kernel, the
    gradients match the reference and repeat bitwise."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from helpers import vjp_triple
    q, k, v, do = draw_inputs(rng, case)
    semantics = {name: jnp.array(x) if isinstance(x, tuple) and
                 name.endswith("lengths") else x
                 for name, x in semantics.items()}
    options = dict(deterministic=deterministic)
    grads = jax.jit(lambda *a: vjp_triple(
        lambda *b: self.attend(*b, is_causal=case.is_causal, **semantics,
                               **options), *a))
    text = grads.lower(q, k, v, do).as_text()
    # Forward, dK/dV and dQ; no Triton kernel.
    assert text.count("custom_call @mosaic_gpu") == 3
    assert "xla.gpu.triton" not in text
    first = jax.tree.leaves(grads(q, k, v, do))
    for a, b in zip(first, jax.tree.leaves(grads(q, k, v, do))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    self.check_against_reference(q, k, v, do, is_causal=case.is_causal,
                                 options=options, **semantics)

  @pytest.mark.parametrize("case, semantics, deterministic", [
      (Case(1, 16400, 16500, 2, 1, 128, 128, False, "bfloat16"), {}, True),
      (Case(1, 16400, 16500, 2, 1, 128, 128, False, "bfloat16"),
       dict(logits_soft_cap=30.0), True),
      (Case(1, 16400, 16500, 2, 1, 128, 128, False, "bfloat16"), {}, False),
      (Case(2, 16384, 4100, 1, 1, 100, 100, False, "float16"),
       dict(query_seq_lengths=(16384, 9001),
            key_value_seq_lengths=(4000, 4100)), True),
  ], ids=lambda x: str(x) if isinstance(x, Case) else (
      "-".join(x) or "plain") if isinstance(x, dict) else f"det={x}")
  def test_long_row_backward_matches_the_reference(self, rng, case,
                                                   semantics, deterministic):
    """Rows of at least `LONG_BACKWARD_FROM_Q_SEQ` queries that attend
    every key take the 3-stage deterministic backward at head dim 128, the
    fused-dQ one keeps two (the backend's pick is checked first, so a case
    cannot silently run another depth): the Mosaic kernels run, the
    gradients meet the 2x/3x rule with no NaN and repeat bitwise if
    deterministic. Two (batch, head) pairs each, so the
    float64 oracle's [B, N, T, S] arrays are about 4 GiB (a third case of
    16k x 16k keys ran out of an H200's memory in the oracle beside two
    other such tests; these passed with two pytest workers)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flash_jax import api
    from flash_jax.backends import pallas_mosaic_gpu as mosaic
    from helpers import vjp_triple
    q, k, v, do = draw_inputs(rng, case)
    semantics = {name: jnp.array(x) if isinstance(x, tuple) and
                 name.endswith("lengths") else x
                 for name, x in semantics.items()}
    call = api.canonicalize(q, k, v, **semantics)
    config = dataclasses.replace(call.config, deterministic=deterministic)
    assert mosaic._params(config, q, k, call.arrays, forward=False).stages == (
        mosaic.LONG_BACKWARD_STAGES if deterministic
        else mosaic.BACKWARD_STAGES)
    options = dict(deterministic=deterministic)
    grads = jax.jit(lambda *a: vjp_triple(
        lambda *b: self.attend(*b, **semantics, **options), *a))
    text = grads.lower(q, k, v, do).as_text()
    assert "mosaic_gpu" in text and "xla.gpu.triton" not in text
    _, _, checked = self.check_against_reference(q, k, v, do, options=options,
                                                 **semantics)
    if deterministic:
      first = jax.tree.leaves(grads(q, k, v, do))
      for a, b in zip(first, jax.tree.leaves(grads(q, k, v, do))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for g in checked:
      assert not np.any(np.isnan(np.asarray(g, np.float32)))

  @pytest.mark.parametrize("head_dim", [64, 128, 256])
  def test_alignment_to_lengths_runs_the_mosaic_kernels(self, rng,
                                                         head_dim):
    """Bottom-right alignment to padding lengths, with segment ids, GQA and
    rows with no valid keys or queries, stays in the Hopper kernels
    (forward, dK/dV and dQ; no Triton kernel) and matches the reference."""
    import jax
    import jax.numpy as jnp
    from helpers import vjp_triple
    case = Case(3, 200, 300, 4, 2, head_dim, head_dim, True, "bfloat16")
    q, k, v, do = draw_inputs(rng, case)
    q_ids, kv_ids = packed_segment_ids(rng, 200, 300, batch=3)
    semantics = dict(is_causal=True, causal_alignment="bottom_right",
                     query_segment_ids=q_ids, kv_segment_ids=kv_ids,
                     query_seq_lengths=jnp.array([200, 61, 0]),
                     key_value_seq_lengths=jnp.array([0, 300, 9]))
    text = jax.jit(lambda *a: vjp_triple(
        lambda *b: self.attend(*b, **semantics), *a)).lower(
            q, k, v, do).as_text()
    assert text.count("custom_call @mosaic_gpu") == 3
    assert "xla.gpu.triton" not in text
    self.check_against_reference(q, k, v, do, **semantics)

  @pytest.mark.parametrize("case, semantics, sm_count", [
      (Case(4, 1023, 1024, 8, 2, 64, 64, True, "bfloat16"), {}, 132),
      (Case(4, 1023, 1024, 8, 2, 64, 64, True, "float16"), {}, 7),
      (Case(3, 200, 300, 4, 2, 128, 128, True, "bfloat16"),
       dict(causal_alignment="bottom_right", query_seq_lengths=(200, 61, 0),
            key_value_seq_lengths=(0, 300, 9)), 5),
      (Case(2, 517, 700, 6, 2, 40, 40, True, "bfloat16"),
       dict(logits_soft_cap=30.0, local_window_size=(90, 10)), 3),
      (Case(2, 640, 640, 4, 4, 128, 128, True, "bfloat16"),
       dict(segments=True), 6),
      (Case(2, 97, 113, 4, 1, 256, 256, False, "bfloat16"), {}, 5),
  ], ids=lambda x: str(x) if isinstance(x, Case) else (
      "-".join(x) or "plain") if isinstance(x, dict) else f"sms={x}")
  def test_persistent_forward_is_bitwise_the_per_tile_forward(
      self, rng, monkeypatch, case, semantics, sm_count):
    """A persistent forward grid (`BlockSizes.persistent`; its CTAs each
    take many tiles when the SM count is patched low) forms every tile
    with the same arithmetic as one CTA per tile: same bits, no NaN."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    q, k, v, _ = draw_inputs(rng, case)
    semantics = _call_semantics(rng, case, semantics)
    monkeypatch.setattr(flash_jax.platform, "sm_count",
                        lambda default=132: sm_count)

    def run(persistent):
      jax.clear_caches()
      attend = jax.jit(lambda q, k, v: self.attend(
          q, k, v, is_causal=case.is_causal, return_residual=True,
          block_sizes=flash_jax.BlockSizes(persistent=persistent),
          **semantics))
      assert "xla.gpu.triton" not in attend.lower(q, k, v).as_text()
      return [np.asarray(x.astype(jnp.float32)) for x in attend(q, k, v)]
    per_tile, persistent = run(False), run(True)
    assert not np.isnan(persistent[0]).any()
    for a, b in zip(per_tile, persistent):
      np.testing.assert_array_equal(a, b)

  @pytest.mark.parametrize("case, semantics, ping_pong, persistent", [
      (Case(4, 1023, 1024, 8, 2, 64, 64, True, "bfloat16"), {}, True, None),
      (Case(2, 517, 700, 6, 2, 40, 40, True, "float16"),
       dict(logits_soft_cap=30.0, local_window_size=(90, 10)), False, True),
      (Case(3, 200, 300, 4, 2, 64, 64, True, "bfloat16"),
       dict(causal_alignment="bottom_right", query_seq_lengths=(200, 61, 0),
            key_value_seq_lengths=(0, 300, 9)), True, True),
      (Case(2, 640, 640, 4, 4, 64, 64, True, "bfloat16"),
       dict(segments=True), True, False),
      (Case(1, 97, 113, 2, 1, 64, 64, False, "bfloat16"), {}, True, None),
  ], ids=lambda x: str(x) if isinstance(x, Case) else (
      "-".join(x) or "plain") if isinstance(x, dict) else repr(x))
  def test_three_consumer_forward_matches_the_reference(
      self, rng, monkeypatch, case, semantics, ping_pong, persistent):
    """The forward with three consumer warpgroups (`ForwardParams.consumers`,
    forced here at any length; ``ping_pong``: the three take turns) meets the
    reference by the 2x/3x rule (the backward keeps two consumers), with
    no NaN, and repeats bitwise."""
    import jax
    import numpy as np
    from helpers import use_three_consumer_forward
    q, k, v, do = draw_inputs(rng, case)
    semantics = _call_semantics(rng, case, semantics)
    use_three_consumer_forward(monkeypatch, ping_pong)
    try:
      block_sizes = (None if persistent is None
                     else flash_jax.BlockSizes(persistent=persistent))
      out, _, _ = self.check_against_reference(
          q, k, v, do, is_causal=case.is_causal, block_sizes=block_sizes,
          **semantics)
      again = self.attend(q, k, v, is_causal=case.is_causal,
                          block_sizes=block_sizes, **semantics)
      np.testing.assert_array_equal(np.asarray(out), np.asarray(again))
    finally:
      monkeypatch.undo()
      jax.clear_caches()

  @pytest.mark.parametrize("case, deterministic", [
      (Case(1, 2100, 2200, 4, 2, 64, 64, False, "bfloat16"), True),
      (Case(1, 8192, 8192, 2, 1, 64, 64, True, "bfloat16"), True),
      (Case(2, 2048, 2048, 2, 2, 40, 40, False, "float16"), False),
  ], ids=str)
  def test_default_three_consumer_forward_matches_the_reference(
      self, rng, monkeypatch, case, deterministic):
    """Where the backend picks three forward consumers by itself
    (`THREE_CONSUMERS_FROM_Q_SEQ`; on a GPU patched to 4 SMs, so that these
    grids pass the tiles-per-SM floor and a persistent CTA walks many tiles;
    the pick is checked first, so the case cannot silently run two), the
    Mosaic kernels run, forward and gradients meet the 2x/3x rule with no
    NaN, results repeat bitwise (the gradients too, if deterministic), and
    one CTA per tile gives the same forward bits as the default grid."""
    import jax
    import numpy as np
    from flash_jax import api
    from flash_jax.backends import pallas_mosaic_gpu as mosaic
    q, k, v, do = draw_inputs(rng, case)
    monkeypatch.setattr(flash_jax.platform, "sm_count",
                        lambda default=132: 4)
    jax.clear_caches()   # the backend's jitted forward caches by config
    try:
      call = api.canonicalize(q, k, v, is_causal=case.is_causal)
      assert mosaic._params(call.config, q, k, call.arrays,
                            forward=True).consumers == 3
      options = dict(deterministic=deterministic)
      attend = lambda q, k, v, **extra: self.attend(
          q, k, v, is_causal=case.is_causal, **options, **extra)
      assert "mosaic_gpu" in jax.jit(attend).lower(q, k, v).as_text()
      out, _, grads = self.check_against_reference(
          q, k, v, do, is_causal=case.is_causal, options=options)
      again, pull = jax.vjp(attend, q, k, v)
      np.testing.assert_array_equal(np.asarray(out), np.asarray(again))
      if deterministic:
        for first, second in zip(grads, pull(do)):
          np.testing.assert_array_equal(np.asarray(first),
                                        np.asarray(second))
      per_tile = attend(q, k, v,
                        block_sizes=flash_jax.BlockSizes(persistent=False))
      np.testing.assert_array_equal(np.asarray(out), np.asarray(per_tile))
    finally:
      monkeypatch.undo()
      jax.clear_caches()

  @pytest.mark.parametrize("case, semantics, ramp", [
      (Case(2, 1000, 1100, 4, 2, 256, 256, False, "bfloat16"), {}, 6.0),
      (Case(1, 1023, 1024, 4, 1, 128, 128, True, "bfloat16"),
       dict(causal_alignment="bottom_right"), 6.0),
      (Case(2, 700, 900, 4, 2, 128, 128, False, "float16"), {}, 1 / 6),
      (Case(3, 200, 300, 4, 2, 64, 64, True, "bfloat16"),
       dict(query_seq_lengths=(200, 61, 0), key_value_seq_lengths=(0, 300, 9),
            logits_soft_cap=30.0), 6.0),
      (Case(2, 640, 640, 4, 4, 64, 64, True, "bfloat16"),
       dict(segments=True), 6.0),
      (Case(1, 1000, 1000, 4, 2, 200, 200, True, "bfloat16"),
       dict(local_window_size=(300, 0)), 6.0),
  ], ids=lambda x: str(x) if isinstance(x, Case) else (
      "-".join(x) or "plain") if isinstance(x, dict) else f"ramp{x:.2g}")
  def test_rescale_threshold_forward_matches_the_reference(
      self, rng, monkeypatch, case, semantics, ramp):
    """`ForwardParams.rescale_threshold`: at 0 (O rescaled only in warps
    where a row's max moved) the forward is bitwise the one that always
    rescales; at the largest threshold (lazy rescaling) it meets the 2x/3x
    rule with no NaN and repeats bitwise. The keys' scale ramps along the
    sequence by ``ramp`` (6: row maxes climb many times past the
    threshold, so rescales happen late in the walk; 1/6: they fall)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flash_jax.backends import pallas_mosaic_gpu as mosaic
    from helpers import use_forward_params
    q, k, v, do = draw_inputs(rng, case)
    growth = jnp.linspace(1.0, ramp, case.kv_seq)[None, :, None, None]
    k = (k.astype(jnp.float32) * growth).astype(k.dtype)
    semantics = _call_semantics(rng, case, semantics)
    attend = lambda: [np.asarray(x.astype(jnp.float32)) for x in self.attend(
        q, k, v, is_causal=case.is_causal, return_residual=True,
        **semantics)]
    results = {}
    try:
      for threshold in (None, 0.0,
                        mosaic._forward.MAX_RESCALE_THRESHOLD):
        use_forward_params(monkeypatch, rescale_threshold=threshold)
        assert "xla.gpu.triton" not in jax.jit(lambda q: self.attend(
            q, k, v, is_causal=case.is_causal, **semantics)).lower(
                q).as_text()
        results[threshold] = attend()
        if threshold:
          self.check_against_reference(q, k, v, do, is_causal=case.is_causal,
                                       **semantics)
          for first, second in zip(results[threshold], attend()):
            np.testing.assert_array_equal(first, second)
        monkeypatch.undo()
    finally:
      monkeypatch.undo()
      jax.clear_caches()
    for always, skipped in zip(results[None], results[0.0]):
      np.testing.assert_array_equal(always, skipped)

  @pytest.mark.parametrize("case, semantics", [
      (Case(2, 1000, 1100, 4, 2, 128, 128, True, "bfloat16"), {}),
      (Case(2, 700, 900, 4, 2, 64, 64, False, "float16"),
       dict(logits_soft_cap=30.0)),
      (Case(1, 1000, 1000, 4, 2, 256, 256, True, "bfloat16"),
       dict(local_window_size=(300, 0))),
  ], ids=lambda x: str(x) if isinstance(x, Case) else "-".join(x) or "plain")
  def test_late_rescale_forward_is_bitwise_the_same(self, rng, monkeypatch,
                                                    case, semantics):
    """`ForwardParams.late_rescale` moves O's rescale after the softmax is
    handed over: the same operations on the same values, so the output and
    lse are bitwise those of the forward without it (ping-pong at 64 and
    128, lazy rescaling at 256), with no NaN."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from helpers import use_forward_params
    q, k, v, _ = draw_inputs(rng, case)
    results = []
    try:
      for late in (False, True):
        use_forward_params(monkeypatch, late_rescale=late)
        assert "xla.gpu.triton" not in jax.jit(lambda q: self.attend(
            q, k, v, is_causal=case.is_causal, **semantics)).lower(
                q).as_text()
        results.append([np.asarray(x.astype(jnp.float32)) for x in
                        self.attend(q, k, v, is_causal=case.is_causal,
                                    return_residual=True, **semantics)])
        monkeypatch.undo()
    finally:
      monkeypatch.undo()
      jax.clear_caches()
    assert not any(np.isnan(x).any() for x in results[1])
    for first, second in zip(*results):
      np.testing.assert_array_equal(first, second)

  def test_nondeterministic_backward_with_padding_lengths(self, rng):
    import jax.numpy as jnp
    q, k, v, do = draw_inputs(rng, Case(3, 200, 300, 4, 2, 128, 128, True,
                                        "bfloat16"))
    self.check_against_reference(
        q, k, v, do, is_causal=True, options=dict(deterministic=False),
        query_seq_lengths=jnp.array([200, 77, 0]),
        key_value_seq_lengths=jnp.array([300, 150, 5]))
