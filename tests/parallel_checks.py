"""Multi-device checks of flash_jax, run by tests/test_parallel.py.

Run in a fresh process as ``python tests/parallel_checks.py GROUP ARG``
(``pmap xla|pallas_triton``, ``shard_map pallas_triton``, ``jit
explicit|auto``): it asks XLA for 4 host (CPU) devices before jax starts its
backends, which a pytest process that has already imported jax cannot do.
Each group runs its checks and exits non-zero (with the failing check's
message) on the first failure. Sizes are tiny: on CPU the Pallas kernels
run in interpret mode.
"""

from __future__ import annotations

import os
import sys

_FLAGS = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _FLAGS:
  os.environ["XLA_FLAGS"] = f"{_FLAGS} --xla_force_host_platform_device_count=4"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import re  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import flash_jax  # noqa: E402

# float32 throughout; a per-shard run does the same arithmetic as the whole
# one, so results agree to rounding.
TOLERANCE = 2e-5


def _close(name: str, actual, expected, tolerance=TOLERANCE):
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected),
                  strict=True):
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    assert a.shape == e.shape, f"{name}: shape {a.shape} != {e.shape}"
    finite = np.isfinite(e)
    assert (np.isfinite(a) == finite).all(), f"{name}: non-finite mismatch"
    error = np.abs(a[finite] - e[finite]).max(initial=0.0)
    scale = max(1.0, np.abs(e[finite]).max(initial=0.0))
    assert error <= tolerance * scale, f"{name}: max error {error:.3g}"


def _qkv(batch=4, seq=16, heads=8, kv_heads=4, head_dim=16, seed=0):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(kq, (batch, seq, heads, head_dim)),
          jax.random.normal(kk, (batch, seq, kv_heads, head_dim)),
          jax.random.normal(kv, (batch, seq, kv_heads, head_dim)))


def _all_gathers(compiled_text: str) -> int:
  return len(re.findall(r"all-gather(?:-start)?\(", compiled_text))


# ------------------------------------------------------------------ pmap --


def _model_init(key, vocab=32, dim=32, heads=4, kv_heads=2, head_dim=8):
  keys = jax.random.split(key, 6)
  init = lambda k, shape: jax.random.normal(k, shape) / np.sqrt(shape[0])
  return {
      "embed": init(keys[0], (vocab, dim)),
      "wq": init(keys[1], (dim, heads * head_dim)),
      "wk": init(keys[2], (dim, kv_heads * head_dim)),
      "wv": init(keys[3], (dim, kv_heads * head_dim)),
      "wo": init(keys[4], (heads * head_dim, dim)),
      "unembed": init(keys[5], (dim, vocab)),
  }


def _model_loss(params, tokens, implementation, heads=4, kv_heads=2):
  """Next-token loss of one causal attention layer."""
  x = params["embed"][tokens[:, :-1]]
  b, t, _ = x.shape
  q = (x @ params["wq"]).reshape(b, t, heads, -1)
  k = (x @ params["wk"]).reshape(b, t, kv_heads, -1)
  v = (x @ params["wv"]).reshape(b, t, kv_heads, -1)
  attended = flash_jax.dot_product_attention(
      q, k, v, is_causal=True, implementation=implementation)
  h = x + attended.reshape(b, t, -1) @ params["wo"]
  logits = h @ params["unembed"]
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, tokens[:, 1:]).mean()


def check_pmap(implementation: str):
  """Two pmap data-parallel steps give the single-device parameters."""
  devices = jax.local_device_count()
  assert devices == 4, jax.devices()
  optimizer = optax.sgd(0.5, momentum=0.9)
  params = _model_init(jax.random.key(0))
  state = optimizer.init(params)
  batches = [jax.random.randint(jax.random.key(i + 1), (8, 17), 0, 32)
             for i in range(2)]
  loss = lambda p, t: _model_loss(p, t, implementation)

  @jax.jit
  def step(params, state, tokens):
    grads = jax.grad(loss)(params, tokens)
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  def parallel_step(params, state, tokens):
    grads = jax.lax.pmean(jax.grad(loss)(params, tokens), "devices")
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  parallel_step = jax.pmap(parallel_step, axis_name="devices")
  replicate = lambda tree: jax.tree.map(
      lambda x: jnp.broadcast_to(x, (devices,) + x.shape), tree)
  single, single_state = params, state
  replicas, replicas_state = replicate(params), replicate(state)
  for tokens in batches:
    single, single_state = step(single, single_state, tokens)
    replicas, replicas_state = parallel_step(
        replicas, replicas_state, tokens.reshape(devices, -1, 17))
  for i in range(devices):
    _close(f"pmap replica {i}", jax.tree.map(lambda x: x[i], replicas),
           single)
  assert not np.allclose(single["wq"], params["wq"]), "the step did nothing"


# ------------------------------------------------------------- shard_map --


def _attention(implementation, **kwargs):
  """Causal attention returning ``(out, lse)``, and a loss of both."""

  def attend(q, k, v, bias=None):
    return flash_jax.dot_product_attention(
        q, k, v, bias, is_causal=True, implementation=implementation,
        return_residual=True, **kwargs)

  def loss(q, k, v, bias=None):
    out, lse = attend(q, k, v, bias)
    # lse takes part, so the backward's D carries the lse cotangent too.
    return (out * out).sum() + jnp.where(jnp.isfinite(lse), lse, 0.0).sum()

  return attend, loss


def check_shard_map(implementation: str):
  """Batch and head splits under shard_map (check_vma=True, the default).

  Every case has padding lengths split with the batch, a bias broadcast
  over the batch (so, where the batch is split, it does not vary over that
  axis and its gradient must be summed over it) and a differentiated lse.
  """
  q, k, v = _qkv()
  bias = jax.random.normal(jax.random.key(5), (1, 8, 16, 16))
  lengths = jnp.array([16, 9, 1, 0], jnp.int32)
  cases = [
      # (name, mesh shape, q/out spec, k/v spec, bias spec, kv heads)
      ("batch", (4,), P("x"), P("x"), P(), 4),
      ("heads (GQA)", (4,), P(None, None, "x"), P(None, None, "x"),
       P(None, "x"), 4),
      # MQA: k, v split over the batch only, so they do not vary over "y"
      # and their gradients must be summed over it.
      ("batch x heads (MQA)", (2, 2), P("x", None, "y"), P("x"),
       P(None, "y"), 1),
  ]

  def run(q, k, v, bias, lengths):
    attend, loss = _attention(implementation, query_seq_lengths=lengths)
    return attend(q, k, v, bias), jax.grad(loss, (0, 1, 2, 3))(q, k, v, bias)

  for name, shape, q_spec, kv_spec, bias_spec, kv_heads in cases:
    mesh = jax.make_mesh(shape, ("x", "y")[:len(shape)])
    kk, vv = k[:, :, :kv_heads], v[:, :, :kv_heads]
    expected = jax.jit(run)(q, kk, vv, bias, lengths)
    lse_spec = P(*(tuple(q_spec) + (None,) * 3)[:3])   # lse is [B, T, N]
    sharded = jax.jit(jax.shard_map(
        run, mesh=mesh,
        in_specs=(q_spec, kv_spec, kv_spec, bias_spec, P(q_spec[0])),
        out_specs=((q_spec, lse_spec), (q_spec, kv_spec, kv_spec, bias_spec))))
    put = lambda x, s: jax.device_put(x, NamedSharding(mesh, s))
    actual = sharded(put(q, q_spec), put(kk, kv_spec), put(vv, kv_spec),
                     put(bias, bias_spec), put(lengths, P(q_spec[0])))
    _close(f"shard_map {name}", actual, expected)


# ------------------------------------------------------- jit NamedSharding --


def check_jit(axis_type: str):
  """Sharded inputs under jit stay sharded: no all-gather, same results."""
  axis_type = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}[axis_type]
  q, k, v = _qkv()
  lengths = jnp.array([16, 9, 1, 0], jnp.int32)

  def program(implementation, **kwargs):
    attend, loss = _attention(implementation, **kwargs)
    return jax.jit(lambda q, k, v: (attend(q, k, v),
                                    jax.grad(loss, (0, 1, 2))(q, k, v)))

  expected = program("pallas_triton")(q, k, v)
  cases = [
      # (name, mesh shape, spec of q, k and v, may all-gather)
      ("batch", (4,), P("x"), False),
      ("heads (GQA)", (4,), P(None, None, "x"), False),
      ("batch x heads", (2, 2), P("x", None, "y"), False),
      ("sequence (gathered)", (4,), P(None, "x"), True),
  ]
  for name, shape, spec, may_gather in cases:
    mesh = jax.make_mesh(shape, ("x", "y")[:len(shape)],
                         axis_types=(axis_type,) * len(shape))
    sharding = NamedSharding(mesh, spec)
    args = [jax.device_put(x, sharding) for x in (q, k, v)]
    run = program("pallas_triton")
    text = run.lower(*args).compile().as_text()
    gathers = _all_gathers(text)
    assert may_gather or gathers == 0, f"jit {name}: {gathers} all-gathers"
    (out, lse), grads = run(*args)
    _close(f"jit {name}", ((out, lse), grads), expected)
    for what, x in (("out", out), *zip(("dq", "dk", "dv"), grads)):
      assert x.sharding.is_equivalent_to(sharding, 4), (
          f"jit {name}: {what} has {x.sharding}, not {sharding}")

  # MQA (one kv head): split by batch, or split the query heads while the
  # single kv head stays whole (its gradients are summed, not gathered).
  q1, k1, v1 = _qkv(kv_heads=1, seed=3)
  run = program("pallas_triton")
  expected = run(q1, k1, v1)
  mesh = jax.make_mesh((4,), ("x",), axis_types=(axis_type,))
  for name, q_spec, kv_spec in (("MQA batch", P("x"), P("x")),
                                ("MQA heads", P(None, None, "x"), P())):
    args = [jax.device_put(q1, NamedSharding(mesh, q_spec))] + [
        jax.device_put(x, NamedSharding(mesh, kv_spec)) for x in (k1, v1)]
    text = run.lower(*args).compile().as_text()
    assert _all_gathers(text) == 0, f"jit {name}: {_all_gathers(text)} gathers"
    (out, lse), grads = run(*args)
    _close(f"jit {name}", ((out, lse), grads), expected)
    assert out.sharding.is_equivalent_to(NamedSharding(mesh, q_spec), 4), (
        f"jit {name}: out has {out.sharding}")

  # vmap over a leading axis: correct (with Auto axes the kernels then run
  # unpartitioned, custom_partitioning having no batching rule).
  mesh = jax.make_mesh((4,), ("x",), axis_types=(axis_type,))
  stacked = jnp.stack([q, q[::-1]])
  vmapped = jax.jit(jax.vmap(lambda q: program("pallas_triton")(q, q, q)))
  expected_vmap = vmapped(stacked)
  _close("jit vmap", vmapped(jax.device_put(
      stacked, NamedSharding(mesh, P(None, "x")))), expected_vmap)

  # Padding lengths and a bias broadcast over the batch: the lengths split
  # with the batch; the bias stays whole and its gradient is summed (an
  # all-reduce, no all-gather).
  mesh = jax.make_mesh((4,), ("x",), axis_types=(axis_type,))
  bias = jax.random.normal(jax.random.key(7), (1, 8, 16, 16))
  def attend(q, k, v, b):
    return flash_jax.dot_product_attention(
        q, k, v, b, is_causal=True, query_seq_lengths=lengths,
        implementation="pallas_triton")

  def bias_loss(q, k, v, b):
    out = attend(q, k, v, b)
    return (out * out).sum()

  bias_program = jax.jit(lambda q, k, v, b: (
      attend(q, k, v, b), jax.grad(bias_loss, (0, 1, 2, 3))(q, k, v, b)))
  expected = bias_program(q, k, v, bias)
  sharding = NamedSharding(mesh, P("x"))
  args = [jax.device_put(x, sharding) for x in (q, k, v)]
  args.append(jax.device_put(bias, NamedSharding(mesh, P())))
  text = bias_program.lower(*args).compile().as_text()
  assert _all_gathers(text) == 0, f"jit bias: {_all_gathers(text)} gathers"
  _close("jit bias", bias_program(*args), expected)


def check_rules(axis_type: str):
  """The split rules on every mask operand, through the XLA reference.

  The reference is normally left to XLA's own partitioner; here it is sent
  through flash_jax.sharding like a kernel, so that the rules for biases,
  masks, segment ids, lengths, dropout and mask_fn are checked whatever the
  kernels support.
  """
  flash_jax.sharding.SELF_PARTITIONING = frozenset()
  axis_type = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}[axis_type]
  mesh = jax.make_mesh((2, 2), ("x", "y"), axis_types=(axis_type,) * 2)
  q, k, v = _qkv()
  keys = jax.random.split(jax.random.key(3), 3)
  segments = jnp.repeat(jnp.arange(4), 4)[None].repeat(4, 0)
  common = dict(is_causal=True, implementation="xla",
                key_value_seq_lengths=jnp.array([16, 5, 12, 1], jnp.int32),
                query_segment_ids=segments, kv_segment_ids=segments)
  cases = [
      # (name, extra arguments, may all-gather)
      ("bias broadcast over batch and mask over heads",
       dict(bias=jax.random.normal(keys[0], (1, 8, 16, 16)),
            mask=jax.random.bernoulli(keys[1], 0.8, (4, 1, 16, 16))), False),
      ("dropout (gathered)",
       dict(dropout_rate=0.25, dropout_rng=keys[2]), True),
      ("mask_fn (gathered)",
       dict(mask_fn=lambda b, h, i, j: (b + h + i + j) % 3 != 0), True),
  ]
  spec = P("x", None, "y")
  sharding = NamedSharding(mesh, spec)
  for name, extra, may_gather in cases:
    kwargs = {**common, **extra}
    bias = kwargs.pop("bias", None)

    def loss(q, k, v, bias):
      out = flash_jax.dot_product_attention(q, k, v, bias, **kwargs)
      return (out * out).sum(), out

    run = jax.jit(jax.grad(loss, (0, 1, 2, 3), has_aux=True))
    expected = run(q, k, v, bias)
    # The bias split like the heads it has: a replicated bias would need its
    # gradient all-gathered (each device computes its heads' part).
    args = [jax.device_put(x, sharding) for x in (q, k, v)] + [
        None if bias is None else
        jax.device_put(bias, NamedSharding(mesh, P(None, "y")))]
    gathers = _all_gathers(run.lower(*args).compile().as_text())
    assert may_gather or gathers == 0, f"rules {name}: {gathers} all-gathers"
    actual = run(*args)
    _close(f"rules {name}", actual, expected)
    assert actual[1].sharding.is_equivalent_to(sharding, 4), name


# A group runs its checks in turn, in one process (one jax start-up).
GROUPS = {
    "pmap": (check_pmap,),
    "shard_map": (check_shard_map,),
    # The rules check reroutes the reference through flash_jax.sharding, so
    # it runs after the kernel checks.
    "jit": (check_jit, check_rules),
}

if __name__ == "__main__":
  group, *args = sys.argv[1:]
  for check in GROUPS[group]:
    check(*args)
    print(f"ok: {check.__name__.removeprefix('check_')} {' '.join(args)} on "
          f"{jax.device_count()} {jax.default_backend()} devices", flush=True)
