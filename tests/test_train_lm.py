"""examples/train_lm.py at a tiny size: the kernel (Pallas interpret mode on
CPU) and the XLA reference train alike, and remat keeps the kernel's
residuals."""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples/train_lm.py"


def _load_example():
  spec = importlib.util.spec_from_file_location("train_lm", EXAMPLE)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module        # dataclasses look the module up
  spec.loader.exec_module(module)
  return module


train_lm = _load_example()
TINY = train_lm.Config(dim=32, depth=1, num_heads=2, num_kv_heads=1,
                       seq_len=24, batch=4, steps=8, learning_rate=1e-2,
                       warmup=2, dtype="float32", log_every=100)


@pytest.fixture(scope="module")
def corpus():
  return train_lm.load_corpus()


def test_corpus_is_the_shipped_text(corpus):
  assert 300_000 < len(corpus) < 1_100_000
  assert corpus.max() < 128                     # plain ASCII text
  assert b"Paradise Lost" in corpus.tobytes()


def test_kernel_and_xla_losses_agree_and_decrease(corpus):
  # Full float32 products (no TF32 on a GPU): the runs differ only in the
  # attention's rounding.
  with jax.default_matmul_precision("float32"):
    runs = {name: train_lm.train(
        dataclasses.replace(TINY, implementation=implementation, remat=remat),
        corpus, log=lambda *_: None, validate=False).losses
            for name, implementation, remat in (
                ("kernel", "pallas_triton", False),
                ("kernel+remat", "pallas_triton", True),
                ("xla", "xla", False))}
  assert all(len(losses) == TINY.steps for losses in runs.values())
  for name in ("kernel", "kernel+remat"):
    np.testing.assert_allclose(runs[name], runs["xla"], rtol=2e-5,
                               err_msg=name)
  losses = runs["kernel"]
  assert losses[0] > np.log(200)          # near uniform over 256 bytes
  assert np.mean(losses[-3:]) < losses[0] - 1.0


def _forward_calls(jaxpr) -> int:
  """flash_jax backend forward calls in a jaxpr, nested ones included."""
  count = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "jit" and (
        eqn.params["name"] == "_backend_forward"):
      count += 1
      continue
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          count += _forward_calls(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          count += _forward_calls(sub)
  return count


@pytest.mark.parametrize("remat, policy, forward_calls", [
    (False, None, 1),
    (True, "example", 1),          # the kernel's output and lse are saved
    (True, jax.checkpoint_policies.nothing_saveable, 2)])
def test_remat_policy_saves_the_kernel_residuals(remat, policy,
                                                 forward_calls, monkeypatch):
  """Under --remat the backward reuses the kernel's output and lse instead
  of rerunning the forward kernel (with depth 1: one call per step)."""
  if policy != "example" and policy is not None:
    monkeypatch.setattr(train_lm, "REMAT_POLICY", policy)
  config = dataclasses.replace(TINY, implementation="xla", remat=remat)
  graphdef, params = nnx.split(train_lm.TransformerLM(config,
                                                      rngs=nnx.Rngs(0)))
  tokens = jnp.zeros((2, 9), jnp.int32)
  jaxpr = jax.make_jaxpr(jax.grad(lambda p: train_lm.next_byte_loss(
      nnx.merge(graphdef, p), tokens)))(params)
  assert _forward_calls(jaxpr.jaxpr) == forward_calls


def test_command_line_compare_xla(capsys):
  args = ["--compare-xla", "--remat", "--steps", "4", "--dim", "32",
          "--depth", "1", "--heads", "2", "--kv-heads", "1", "--seq-len",
          "16", "--batch", "2", "--dtype", "float32", "--compare-steps", "4"]
  assert train_lm.main(args) == 0
  printed = capsys.readouterr().out
  assert "[pallas_triton +remat]" in printed and "[xla +remat]" in printed
  assert "max |difference| over 4 steps" in printed and "agree" in printed
  assert "peak memory" in printed and "tok/s" in printed
