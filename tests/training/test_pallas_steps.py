"""Pallas attention (splash, flash_gpu; interpreted on CPU) inside the real steps.

The steps run under `jax.shard_map(..., check_vma=True)`; each kernel must trace there,
again in every new program (eval after train, a second budget of one row length, a
gradient after a forward), and give `attention=exact`'s loss, gradients and predictions
(float32, 1e-5), on one device and on two simulated ones. Also: the block-sparse splash
grid (`attention_backends.block_visits`) and what skipping it means for other chains' values,
rows rounded up to the kernels' block, the log line, the cuDNN fallback warning.

Budget: 41 s of CPU for the file (measured, user + sys, the 2-device subprocess
included; interpreted kernels, the ESM-only tiny model, rows of 128 tokens).
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bihier_jax import config_check
from bihier_jax.data import budgets as budgets_lib
from bihier_jax.data import layout
from bihier_jax import testing
from bihier_jax.data.batch import PaddingBudget
from bihier_jax.models import attention_backends
from bihier_jax.training import device_batches
from bihier_jax.training import mesh as mesh_lib
from bihier_jax import models
from bihier_jax.training import steps
from bihier_jax.training import train_state
from configs import demo
from tests import multidevice

TOL = 1e-5
KINDS = ("splash", "flash_gpu")
LENGTH = 128  # the kernels' block: the cheapest row they take


def config_for(kind: str):
  """configs/demo.py:tiny with the ESM-only model (the steps are the same; the GNN and
  fusion would only add compile time) and attention `kind`."""
  config = demo.get_config("tiny")
  config.model.kind = "esm_only"
  config.model.esm.attention = kind
  return config


def stacked_batch(n_row: int, devices: int, seed: int = 0):
  """Device-stacked packed batches [devices, ...] of rows of LENGTH tokens: two proteins
  per sub-batch, three chains, so rows hold several chains and padding."""
  budget = PaddingBudget(n_node=96, n_edge=2048, n_graph=3, n_row=n_row,
                         row_length=LENGTH, packed_rows=True)
  return device_batches.stack([layout.collate(
      [testing.random_example(40, seed=seed + 10 * d, n_chains=2),
       testing.random_example(30 + 5 * d, seed=seed + 10 * d + 1)], budget)
      for d in range(devices)])


def run_sequence(kind, params, batch_a, batch_b, mesh):
  """Programs with attention `kind`: eval (budget A), one train step (A: a gradient
  after a forward), then, unless batch_b is None, eval (budget B: same row length, more
  rows). The train step uses SGD(1), so its new parameters are params - grads."""
  config = config_for(kind)
  model = models.build_model(config)
  eval_step = steps.jit_eval_step(model, config.task, mesh)
  put = lambda b: mesh_lib.put_global(b, mesh)
  first = jax.device_get(eval_step(params, put(batch_a))["predictions"])
  tx = optax.sgd(1.0)
  state = train_state.TrainState(
      step=jnp.zeros([], jnp.int32), params=params,
      opt_state=tx.init(model.config.trainable.select(params)),
      rng=jax.random.key_data(jax.random.key(1)),
      nonfinite_streak=jnp.zeros([], jnp.int32), nonfinite_total=jnp.zeros([], jnp.int32))
  state = jax.device_put(state, mesh_lib.state_shardings(state, mesh))
  train_step = steps.jit_train_step(model, tx, config.task, mesh, state)
  state, metrics = train_step(state, put(batch_a))
  out = {"predictions_a": first, "loss": float(metrics["loss"]),
         "new_params": jax.device_get(state.params)}
  if batch_b is not None:
    out["predictions_b"] = jax.device_get(eval_step(params, put(batch_b))["predictions"])
  return out


def assert_equal_runs(got, want, tol=TOL):
  assert np.isfinite(want["loss"]) and abs(got["loss"] - want["loss"]) <= tol
  assert got.keys() == want.keys()
  for key in (k for k in got if k.startswith("predictions")):
    np.testing.assert_allclose(got[key], want[key], atol=tol, rtol=0)
  pairs = list(zip(jax.tree_util.tree_leaves(got["new_params"]),
                   jax.tree_util.tree_leaves(want["new_params"])))
  assert len(pairs) > 10
  for a, b in pairs:
    np.testing.assert_allclose(a, b, atol=tol, rtol=0)


def initial_params(batch):
  model = models.build_model(config_for("exact"))
  return jax.device_get(jax.jit(lambda k, b: model.init(k, b)["params"])(
      jax.random.key(0), jax.tree_util.tree_map(lambda x: x[0], batch)))


@pytest.fixture(scope="module")
def reference():
  """(params, batches A and B, exact's run on one device)."""
  batch_a, batch_b = stacked_batch(2, 1), stacked_batch(3, 1, seed=5)
  params = initial_params(batch_a)
  mesh = mesh_lib.make_mesh(jax.devices()[:1])
  return params, batch_a, batch_b, run_sequence("exact", params, batch_a, batch_b, mesh)


@pytest.mark.parametrize("kind", KINDS)
def test_kernel_in_the_steps_equals_exact_on_one_device(reference, kind, caplog):
  """Three programs in a row with the kernel, each equal to exact; one log line each
  naming the kernel."""
  params, batch_a, batch_b, want = reference
  assert (batch_a.token_segments[0] >= 1).any()  # rows hold more than one chain
  mesh = mesh_lib.make_mesh(jax.devices()[:1])
  with caplog.at_level(logging.INFO, logger="absl"):
    got = run_sequence(kind, params, batch_a, batch_b, mesh)
  assert_equal_runs(got, want, TOL)
  lines = [r.getMessage() for r in caplog.records
           if r.getMessage().startswith("ESM attention:")]
  assert len(lines) == 3, lines  # eval A, train A, eval B
  assert all(line.startswith(f"ESM attention: {kind} (Pallas") and "interpreted" in line
             and f"on {LENGTH}-token packed rows" in line for line in lines), lines


@pytest.mark.parametrize("kind", KINDS)
def test_windowed_batch_in_the_eval_step_equals_exact(reference, kind):
  """A protein of 300 residues read whole (data.eval_long_chains='whole'): windows of
  `layout.long_chain_window` = 126 residues fill rows of the kernels' block."""
  params = reference[0]
  assert layout.long_chain_window(config_for(kind)) == LENGTH - 2
  examples = [testing.random_example(300, seed=7), testing.random_example(40, seed=8)]
  budget = layout.windowed_budget(examples, LENGTH - 2, batch_size=2)
  assert budget.token_copies > 1 and budget.row_length == LENGTH
  batch = device_batches.stack([layout.collate(examples, budget)])
  mesh = mesh_lib.make_mesh(jax.devices()[:1])

  def predictions(attention):
    config = config_for(attention)
    step = steps.jit_eval_step(models.build_model(config), config.task, mesh)
    return jax.device_get(step(params, mesh_lib.put_global(batch, mesh))["predictions"])
  np.testing.assert_allclose(predictions(kind), predictions("exact"), atol=TOL, rtol=0)


def test_kernels_in_the_steps_equal_exact_on_two_devices():
  multidevice.run("pallas_equivalence", timeout=400)


# --- the block-sparse splash grid ---------------------------------------------------------


def test_block_visits_are_the_blocks_holding_a_same_chain_pair():
  rng = np.random.default_rng(0)
  block, length = 4, 24
  ids = np.full((3, length), -1, np.int32)
  for r in range(3):
    cuts = np.sort(rng.choice(np.arange(1, length - 3), 3, replace=False))
    for c, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, length - 3 + r])):
      ids[r, lo:hi] = c
  got = np.asarray(attention_backends.block_visits(ids, block))
  n = length // block
  for r in range(3):
    for i in range(n):
      for j in range(n):
        q, k = ids[r, i * block:(i + 1) * block], ids[r, j * block:(j + 1) * block]
        pair = any(a == b and a >= 0 for a in q for b in k)
        assert got[r, i, j] == (pair or i == j), (r, i, j)


def test_splash_skips_the_blocks_of_other_chains():
  """A row of two chains, one per block: with chain 1's values NaN, chain 0's output is
  finite and exact. A kernel that computes the (chain 0, chain 1) block multiplies
  those NaNs by zero weights: NaN."""
  rng = np.random.default_rng(1)
  shape = (1, 2 * LENGTH, 2, 8)  # [B, L, H, hd]
  q, k, v = (jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(3))
  ids = np.repeat(np.arange(2, dtype=np.int32), LENGTH)[None]
  attn_layout = attention_backends.AttentionLayout(
      mask=ids[:, :, None] == ids[:, None, :], segment_ids=jnp.asarray(ids))
  poisoned = v.at[:, LENGTH:].set(jnp.nan)
  got = np.asarray(jax.jit(lambda q, k, v: attention_backends.attend(
      q, k, v, attn_layout, "splash"))(q, k, poisoned))
  want = np.asarray(attention_backends.attend(q, k, v, attn_layout, "exact"))
  assert np.isfinite(got[:, :LENGTH]).all()
  np.testing.assert_allclose(got[:, :LENGTH], want[:, :LENGTH], atol=TOL, rtol=0)


# --- rows, config, fallbacks --------------------------------------------------------------


@pytest.mark.parametrize("pack_rows", [False, True])
def test_pallas_kinds_round_rows_up_to_the_block(pack_rows):
  """configs/demo.py:tiny's 66-token rows become 128 with a Pallas kernel, stay 66
  otherwise; a forced row length off the block is refused in one line."""
  config = demo.get_config("tiny")
  config.data.pack_rows = pack_rows
  assert [b.row_length for b in budgets_lib.bucket_budgets(config)] == [66]
  for kind in KINDS:
    config.model.esm.attention = kind
    assert [b.row_length for b in budgets_lib.bucket_budgets(config)] == [LENGTH]
  config.data.row_length = 200
  with pytest.raises(config_check.ConfigError,
                     match=r"^data.row_length=200 is not a multiple of 128.*use 128 or 256"):
    config_check.check_values(config)


def test_cudnn_refusal_warns_and_falls_back(monkeypatch, caplog):
  """As if on a GPU with bf16 compute: cuDNN (absent here) refuses, and the layer says
  so once and computes XLA's attention, equal to exact."""
  rng = np.random.default_rng(2)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 16, 2, 8)), jnp.bfloat16) for _ in range(3))
  tokens = np.full((2, 16), 5, np.int32)
  tokens[1, 10:] = 1  # <pad>
  attn_layout = attention_backends.attention_layout(jnp.asarray(tokens))
  want = attention_backends.attend(q, k, v, attn_layout, "exact")
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(attention_backends, "_CUDNN_WARNED", set(), raising=False)
  with caplog.at_level(logging.WARNING, logger="absl"):
    got = attention_backends.attend(q, k, v, attn_layout, "auto")
    attention_backends.attend(q, k, v, attn_layout, "auto")
  warnings = [r.getMessage() for r in caplog.records if "cuDNN" in r.getMessage()]
  assert len(warnings) == 1 and "falls back" in warnings[0], warnings
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             atol=2e-2)
