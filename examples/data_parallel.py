"""Data-parallel training over every visible device with jit + NamedSharding.

A one-layer causal language model (attention through
`flash_jax.dot_product_attention`, then an MLP) learns to continue
arithmetic sequences. The
batch is split over a 1-D mesh axis ``"data"``; parameters and optimizer
state are replicated. Under ``jit`` flash_jax runs the attention kernels on
each device's batch shard (no all-gather of q, k, v); XLA adds the gradient
all-reduce that the mean over the global batch needs.

    python examples/data_parallel.py                     # all visible devices
    XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \\
        python examples/data_parallel.py --steps 3       # 4 CPU devices

On a CPU machine the default implementation is the XLA reference; pass
``--implementation pallas_triton`` to run the Pallas kernels (interpret mode
there, so keep it small).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import flash_jax  # noqa: E402

VOCAB, DIM, HEADS, KV_HEADS, HEAD_DIM = 256, 64, 4, 2, 16


def init_params(key):
  """Parameters of the one-layer model."""
  names_shapes = {
      "embed": (VOCAB, DIM), "wq": (DIM, HEADS * HEAD_DIM),
      "wk": (DIM, KV_HEADS * HEAD_DIM), "wv": (DIM, KV_HEADS * HEAD_DIM),
      "wo": (HEADS * HEAD_DIM, DIM), "w1": (DIM, 4 * DIM),
      "w2": (4 * DIM, DIM), "unembed": (DIM, VOCAB),
  }
  keys = jax.random.split(key, len(names_shapes))
  return {name: jax.random.normal(k, shape) / np.sqrt(shape[0])
          for k, (name, shape) in zip(keys, names_shapes.items())}


def loss_fn(params, tokens, implementation):
  """Mean next-token cross-entropy over the (global) batch."""
  # One-hot products rather than gathers (here and in the loss): the same
  # code then runs with Explicit mesh axes, where a gather of sharded
  # indices (and its transpose) needs its output sharding spelled out.
  x = jax.nn.one_hot(tokens[:, :-1], VOCAB) @ params["embed"]
  b, t, _ = x.shape
  q = (x @ params["wq"]).reshape(b, t, HEADS, HEAD_DIM)
  k = (x @ params["wk"]).reshape(b, t, KV_HEADS, HEAD_DIM)
  v = (x @ params["wv"]).reshape(b, t, KV_HEADS, HEAD_DIM)
  attended = flash_jax.dot_product_attention(q, k, v, is_causal=True,
                                             implementation=implementation)
  x = x + attended.reshape(b, t, -1) @ params["wo"]
  x = x + jax.nn.gelu(x @ params["w1"]) @ params["w2"]
  log_probs = jax.nn.log_softmax(x @ params["unembed"])
  return -(log_probs * jax.nn.one_hot(tokens[:, 1:], VOCAB)).sum(-1).mean()


def main(argv=None):
  """Trains for a few steps and prints the loss and the step's collectives."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--batch-per-device", type=int, default=4)
  parser.add_argument("--seq", type=int, default=64)
  parser.add_argument("--implementation", default=None)
  parser.add_argument("--axis-type", choices=("explicit", "auto"),
                      default="explicit",
                      help="mesh axis type (jax.make_mesh's default is "
                      "explicit)")
  args = parser.parse_args(argv)

  devices = jax.devices()
  axis_type = {"explicit": AxisType.Explicit,
               "auto": AxisType.Auto}[args.axis_type]
  mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(axis_type,))
  batch_sharding = NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())

  optimizer = optax.adam(1e-2)
  params = jax.device_put(init_params(jax.random.key(0)), replicated)
  opt_state = jax.device_put(optimizer.init(params), replicated)

  @jax.jit
  def train_step(params, opt_state, tokens):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens,
                                              args.implementation)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  batch = args.batch_per_device * len(devices)
  data_key = jax.random.key(1)

  def next_batch(step):
    # Arithmetic sequences with a random start and stride: predicting the
    # next token needs the stride, which attention reads off the context.
    start_key, stride_key = jax.random.split(jax.random.fold_in(data_key, step))
    start = jax.random.randint(start_key, (batch, 1), 0, VOCAB)
    stride = jax.random.randint(stride_key, (batch, 1), 1, 8)
    tokens = (start + stride * jnp.arange(args.seq + 1)) % VOCAB
    return jax.device_put(tokens, batch_sharding)

  compiled = train_step.lower(params, opt_state, next_batch(0)).compile()
  text = compiled.as_text()
  collectives = {op: len(re.findall(rf"{op}(?:-start)?\(", text))
                 for op in ("all-gather", "all-reduce")}
  print(f"{len(devices)} x {devices[0].device_kind}, mesh {dict(mesh.shape)}"
        f" ({args.axis_type}), global batch {batch} x {args.seq} tokens; "
        f"the compiled step has {collectives}")
  every = max(1, args.steps // 6)
  loss = float("nan")
  for step in range(args.steps):
    start = time.perf_counter()
    params, opt_state, loss = compiled(params, opt_state, next_batch(step))
    loss = float(loss)
    if step % every == 0 or step == args.steps - 1:
      print(f"step {step:4d}: loss {loss:.4f} "
            f"({(time.perf_counter() - start) * 1e3:.1f} ms)")
  assert np.isfinite(loss), loss
  return loss


if __name__ == "__main__":
  main()
