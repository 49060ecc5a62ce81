"""Trains a small byte-level decoder-only transformer (Flax NNX) on flash_jax.

The model is pre-norm GPT-style: byte embedding, blocks of causal
`flash_jax.flax.nnx.FlashMultiHeadAttention` (GQA, RoPE) and a GELU MLP,
a final RMSNorm and a byte head. It trains on the public-domain texts in
``examples/data/`` with optax AdamW, one `jax.jit`-compiled step on the
split NNX state.

    python examples/train_lm.py                  # GPU: ~10M params, T=2048; CPU: tiny, ~1 min
    python examples/train_lm.py --compare-xla    # also with implementation="xla": the losses must agree
    python examples/train_lm.py --remat          # blocks under jax.checkpoint, saving the kernel's residuals
    python examples/train_lm.py --data-parallel  # the batch split over every visible device (jit + NamedSharding)

It prints the loss, tokens/s and peak device memory as it goes (the
allocator's peak where the device reports one, ``n/a`` on CPU) and the
compiled step's temporary memory (XLA's analysis, on every device).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import flash_jax  # noqa: E402
from flash_jax.flax.nnx import FlashMultiHeadAttention  # noqa: E402

DATA_DIR = pathlib.Path(__file__).resolve().parent / "data"
VOCAB = 256                  # byte-level tokens
# Under --remat: keep only the attention kernel's output and lse, so the
# backward recomputes the projections and the MLP but never the kernel.
REMAT_POLICY = jax.checkpoint_policies.save_only_these_names(
    *flash_jax.RESIDUAL_NAMES)


@dataclasses.dataclass(frozen=True)
class Config:
  """Model size, data shape and optimisation settings of one run."""

  dim: int = 128
  depth: int = 3
  num_heads: int = 4
  num_kv_heads: int = 2
  mlp_ratio: int = 4
  seq_len: int = 128
  batch: int = 16
  steps: int = 300
  learning_rate: float = 3e-3
  warmup: int = 30
  weight_decay: float = 0.1
  dtype: str = "float32"
  implementation: str | None = None
  remat: bool = False
  data_parallel: bool = False
  seed: int = 0
  log_every: int = 50


# ~10M parameters and 2k context on a GPU; a model that trains in about a
# minute on CPU (the XLA reference runs there by default).
GPU_DEFAULTS = Config(dim=384, depth=6, num_heads=6, num_kv_heads=2,
                      seq_len=2048, batch=16, steps=500, learning_rate=2e-3,
                      warmup=50, dtype="bfloat16")
CPU_DEFAULTS = Config()


# -- data ---------------------------------------------------------------------

def load_corpus(data_dir: pathlib.Path = DATA_DIR) -> np.ndarray:
  """All ``*.txt`` files under ``data_dir`` (sorted), as one uint8 array."""
  files = sorted(pathlib.Path(data_dir).glob("*.txt"))
  if not files:
    raise FileNotFoundError(f"no *.txt files in {data_dir}")
  return np.frombuffer(b"\n".join(f.read_bytes() for f in files), np.uint8)


def split_corpus(corpus: np.ndarray, held_out: float = 0.05):
  """(train, validation): the last ``held_out`` fraction is validation."""
  cut = int(len(corpus) * (1 - held_out))
  return corpus[:cut], corpus[cut:]


def batches(tokens: np.ndarray, batch: int, seq_len: int, seed: int):
  """Endless random windows ``int32 [batch, seq_len + 1]`` (inputs and the
  next-byte targets shifted by one), reproducible from ``seed``."""
  if len(tokens) <= seq_len + 1:
    raise ValueError(f"corpus of {len(tokens)} bytes is too short for "
                     f"seq_len={seq_len}")
  rng = np.random.default_rng(seed)
  offsets = np.arange(seq_len + 1)
  while True:
    starts = rng.integers(0, len(tokens) - seq_len - 1, batch)
    yield tokens[starts[:, None] + offsets].astype(np.int32)


# -- model --------------------------------------------------------------------

class MLP(nnx.Module):
  """``D -> mlp_ratio * D -> D`` with GELU."""

  def __init__(self, config: Config, *, rngs: nnx.Rngs):
    hidden = config.mlp_ratio * config.dim
    self.up = nnx.Linear(config.dim, hidden, dtype=config.dtype, rngs=rngs)
    self.down = nnx.Linear(hidden, config.dim, dtype=config.dtype, rngs=rngs)

  def __call__(self, x):
    return self.down(jax.nn.gelu(self.up(x)))


class PreNorm(nnx.Module):
  """``layer(rms_norm(x))``: one residual branch."""

  def __init__(self, config: Config, layer: nnx.Module, *, rngs: nnx.Rngs):
    self.norm = nnx.RMSNorm(config.dim, dtype=config.dtype, rngs=rngs)
    self.layer = layer

  def __call__(self, x):
    return self.layer(self.norm(x))


def _run_branch(branch: PreNorm, x):
  return branch(x)


class Block(nnx.Module):
  """Causal self-attention and MLP branches, each added to the residual."""

  def __init__(self, config: Config, *, rngs: nnx.Rngs):
    attention = FlashMultiHeadAttention(
        config.num_heads, config.dim, num_kv_heads=config.num_kv_heads,
        is_causal=True, rope_base=10000.0,
        implementation=config.implementation, dtype=config.dtype, rngs=rngs)
    self.branches = nnx.List([PreNorm(config, attention, rngs=rngs),
                              PreNorm(config, MLP(config, rngs=rngs),
                                      rngs=rngs)])
    self.remat = config.remat

  def __call__(self, x):
    run = (nnx.remat(_run_branch, policy=REMAT_POLICY) if self.remat
           else _run_branch)
    for branch in self.branches:
      x = x + run(branch, x)
    return x


class TransformerLM(nnx.Module):
  """Byte-level decoder-only transformer: tokens ``[B, T]`` -> logits
  ``[B, T, 256]`` (float32)."""

  def __init__(self, config: Config, *, rngs: nnx.Rngs):
    self.embed = nnx.Embed(VOCAB, config.dim, dtype=config.dtype, rngs=rngs)
    self.blocks = nnx.List([Block(config, rngs=rngs)
                            for _ in range(config.depth)])
    self.norm = nnx.RMSNorm(config.dim, dtype=config.dtype, rngs=rngs)
    self.head = nnx.Linear(config.dim, VOCAB, use_bias=False,
                           dtype=config.dtype, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x)).astype(jnp.float32)


# -- training -----------------------------------------------------------------

def make_optimizer(config: Config) -> optax.GradientTransformation:
  """AdamW with warmup and cosine decay; no weight decay on vectors (norm
  scales, biases)."""
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, config.learning_rate, config.warmup, max(config.steps,
                                                    config.warmup + 1),
      end_value=config.learning_rate / 10)
  return optax.chain(
      optax.clip_by_global_norm(1.0),
      optax.adamw(schedule, b1=0.9, b2=0.95,
                  weight_decay=config.weight_decay,
                  mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2,
                                                   params)))


def next_byte_loss(model: TransformerLM, tokens):
  """Mean cross-entropy (nats per byte) of predicting ``tokens[:, 1:]``."""
  logits = model(tokens[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, tokens[:, 1:]).mean()


def make_train_step(graphdef, optimizer):
  """One jitted step on the split state: ``(params, opt_state, tokens) ->
  (params, opt_state, loss)``; params and optimizer state are donated."""

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(params, opt_state, tokens):
    loss, grads = jax.value_and_grad(
        lambda p: next_byte_loss(nnx.merge(graphdef, p), tokens))(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return train_step


def peak_memory_bytes() -> int | None:
  """The device allocator's peak so far, or None where it reports none
  (CPU). It is the process's peak: an earlier run in the process counts."""
  stats = jax.devices()[0].memory_stats()
  return None if not stats else stats.get("peak_bytes_in_use")


def mib(n: int | None) -> str:
  return "n/a" if n is None else f"{n / 2**20:.1f} MiB"


@dataclasses.dataclass
class Result:
  """What one run measured."""

  config: Config
  num_params: int
  losses: list[float]
  tokens_per_second: float
  peak_bytes: int | None
  step_temp_bytes: int | None
  validation_loss: float | None = None


def train(config: Config, corpus: np.ndarray | None = None, *,
          log=print, validate: bool = True) -> Result:
  """Trains ``config.steps`` steps from ``config.seed``; returns the losses.

  The data order and the initialisation depend only on the seed, so two
  runs that differ only in ``implementation`` see the same batches and
  start from the same weights.
  """
  corpus = load_corpus() if corpus is None else corpus
  train_tokens, validation_tokens = split_corpus(corpus)
  model = TransformerLM(config, rngs=nnx.Rngs(config.seed))
  graphdef, params = nnx.split(model)
  num_params = sum(p.size for p in jax.tree.leaves(params))
  optimizer = make_optimizer(config)
  opt_state = optimizer.init(params)
  data = batches(train_tokens, config.batch, config.seq_len, config.seed)

  place = jnp.asarray
  if config.data_parallel:
    # Data parallelism through jit: the batch is split over a mesh of every
    # device, parameters and optimizer state are replicated; flash_jax runs
    # its kernels on each device's shard and XLA all-reduces the gradients.
    devices = jax.devices()
    if config.batch % len(devices):
      raise ValueError(f"batch {config.batch} does not split evenly over "
                       f"{len(devices)} devices")
    mesh = jax.make_mesh((len(devices),), ("data",),
                         axis_types=(AxisType.Auto,))
    replicated = NamedSharding(mesh, P())
    params = jax.device_put(params, replicated)
    opt_state = jax.device_put(opt_state, replicated)
    batch_sharding = NamedSharding(mesh, P("data"))
    place = lambda batch: jax.device_put(batch, batch_sharding)  # noqa: E731
  tokens = place(next(data))
  # Compiled ahead of time: the memory analysis comes from the very
  # executable that then runs.
  step = make_train_step(graphdef, optimizer).lower(
      params, opt_state, tokens).compile()
  analysis = step.memory_analysis()
  spread = (f", data-parallel over {jax.device_count()} devices"
            if config.data_parallel else "")
  temp_bytes = None if analysis is None else analysis.temp_size_in_bytes
  log(f"[{config.implementation or 'auto'}{' +remat' if config.remat else ''}]"
      f" {num_params / 1e6:.2f}M params, B={config.batch} T={config.seq_len}"
      f" {config.dtype}{spread}; compiled step temp memory {mib(temp_bytes)}")

  losses, pending = [], []
  tokens_per_step = config.batch * config.seq_len
  timed_tokens, timed_seconds = 0, 0.0
  interval_start = time.perf_counter()
  for index in range(config.steps):
    params, opt_state, loss = step(params, opt_state, tokens)
    pending.append(loss)
    tokens = place(next(data))
    last = index == config.steps - 1
    if (index + 1) % config.log_every and not last and index:
      continue
    losses.extend(float(x) for x in jax.device_get(pending))  # waits
    now = time.perf_counter()
    if index:  # step 0 is logged alone: it includes the first dispatch
      timed_tokens += len(pending) * tokens_per_step
      timed_seconds += now - interval_start
    speed = len(pending) * tokens_per_step / (now - interval_start)
    pending, interval_start = [], now
    log(f"  step {index + 1:5d}  loss {losses[-1]:.4f}  {speed:10.0f} tok/s"
        f"  peak memory {mib(peak_memory_bytes())}")

  result = Result(
      config=config, num_params=num_params, losses=losses,
      tokens_per_second=(timed_tokens / timed_seconds if timed_seconds
                         else float("nan")),
      peak_bytes=peak_memory_bytes(), step_temp_bytes=temp_bytes)
  if validate:
    result.validation_loss = evaluate(graphdef, params, validation_tokens,
                                      config, place=place)
    log(f"  validation loss {result.validation_loss:.4f} nats/byte")
  return result


def evaluate(graphdef, params, tokens: np.ndarray, config: Config,
             num_batches: int = 4, place=jnp.asarray) -> float:
  """Mean loss over a few fixed windows of held-out text (each batch put on
  the devices by ``place``, as in training)."""
  seq_len = min(config.seq_len, len(tokens) - 2)
  loss_of = jax.jit(lambda p, t: next_byte_loss(nnx.merge(graphdef, p), t))
  data = batches(tokens, config.batch, seq_len, seed=12345)
  return float(np.mean([loss_of(params, place(next(data)))
                        for _ in range(num_batches)]))


def compare_losses(flash: list[float], xla: list[float], steps: int,
                   log=print) -> float:
  """Prints both loss curves over the first ``steps`` steps; returns the
  largest absolute difference."""
  steps = min(steps, len(flash), len(xla))
  log(f"\nloss curves, first {steps} steps (same seed, same batches):")
  log("   step     kernel        xla       diff")
  every = max(1, steps // 10)
  for i in range(steps):
    if i % every == 0 or i == steps - 1:
      log(f"  {i + 1:5d}  {flash[i]:9.5f}  {xla[i]:9.5f}  "
          f"{flash[i] - xla[i]:+9.2e}")
  difference = float(np.max(np.abs(np.subtract(flash[:steps], xla[:steps]))))
  log(f"max |difference| over {steps} steps: {difference:.3e}")
  return difference


def parse_args(argv=None) -> tuple[Config, argparse.Namespace]:
  """The run's Config: the machine's defaults overridden by the flags."""
  on_gpu = jax.default_backend() == "gpu"
  defaults = GPU_DEFAULTS if on_gpu else CPU_DEFAULTS
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--implementation", default=None,
                      choices=list(flash_jax.api.IMPLEMENTATIONS),
                      help="flash_jax implementation (default: auto, the "
                      "kernel on a GPU, the XLA reference on CPU)")
  parser.add_argument("--steps", type=int, default=defaults.steps)
  parser.add_argument("--seq-len", type=int, default=defaults.seq_len)
  parser.add_argument("--batch", type=int, default=defaults.batch)
  parser.add_argument("--dim", type=int, default=defaults.dim)
  parser.add_argument("--depth", type=int, default=defaults.depth)
  parser.add_argument("--heads", type=int, default=defaults.num_heads)
  parser.add_argument("--kv-heads", type=int, default=defaults.num_kv_heads)
  parser.add_argument("--lr", type=float, default=defaults.learning_rate)
  parser.add_argument("--dtype", default=defaults.dtype,
                      choices=["float32", "bfloat16", "float16"])
  parser.add_argument("--seed", type=int, default=defaults.seed)
  parser.add_argument("--log-every", type=int, default=defaults.log_every)
  parser.add_argument("--remat", action="store_true",
                      help="attention and MLP branches under jax.checkpoint, "
                      "saving only flash_jax.RESIDUAL_NAMES")
  parser.add_argument("--data-parallel", action="store_true",
                      help="split the batch over every visible device "
                      "(jit with NamedSharding; the batch must divide)")
  parser.add_argument("--compare-xla", action="store_true",
                      help="run the same steps again with "
                      "implementation='xla' and compare the losses")
  parser.add_argument("--compare-steps", type=int, default=50)
  args = parser.parse_args(argv)
  implementation = args.implementation
  if args.compare_xla and implementation is None:
    # Auto would pick the XLA reference on CPU: name the kernel.
    implementation = "pallas_triton"
  config = dataclasses.replace(
      defaults, implementation=implementation, steps=args.steps,
      seq_len=args.seq_len, batch=args.batch, dim=args.dim,
      depth=args.depth, num_heads=args.heads, num_kv_heads=args.kv_heads,
      learning_rate=args.lr, dtype=args.dtype, seed=args.seed,
      log_every=args.log_every, remat=args.remat,
      data_parallel=args.data_parallel,
      warmup=min(defaults.warmup, max(args.steps // 5, 1)))
  return config, args


def main(argv=None) -> int:
  config, args = parse_args(argv)
  print(f"flash_jax {flash_jax.__version__} on {jax.devices()[0].device_kind}"
        f" ({jax.default_backend()})")
  corpus = load_corpus()
  print(f"corpus: {len(corpus):,} bytes from {DATA_DIR}")
  result = train(config, corpus)
  print(f"throughput {result.tokens_per_second:,.0f} tok/s, peak memory "
        f"{mib(result.peak_bytes)}, compiled step temp "
        f"{mib(result.step_temp_bytes)}"
        f"{' (with remat)' if config.remat else ''}")
  if not args.compare_xla:
    return 0
  reference = train(dataclasses.replace(config, implementation="xla"),
                    corpus, validate=False)
  print(f"xla throughput {reference.tokens_per_second:,.0f} tok/s, compiled "
        f"step temp {mib(reference.step_temp_bytes)}")
  difference = compare_losses(result.losses, reference.losses,
                              args.compare_steps)
  # bf16 rounds differently in the two attention paths, and the
  # difference compounds over the updates; float32 agrees far closer. The
  # bf16 bound is the measured noise: on an H100 (2026-11-26, defaults,
  # benchmarks/results/NVIDIA_H100_80GB_HBM3/train_lm*.log) the same kernel
  # with and without remat, identical math in another rounding order,
  # differed by 0.064 nats at step 21 (a lower bound: the logs show every
  # 5th step), and kernel vs XLA by 0.070 at most over the first 50 steps.
  # A bf16 run can still exceed this bound by chance.
  tolerance = 1e-1 if config.dtype != "float32" else 1e-3
  agree = difference <= tolerance
  print(f"{'agree' if agree else 'DIFFER'} (tolerance {tolerance:g})")
  return 0 if agree else 1


if __name__ == "__main__":
  sys.exit(main())
