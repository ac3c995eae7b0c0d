"""bfloat16 compute against float32, same parameters: the full model for every task
kind on proteins of more than 300 residues, pooling over more than 256 nodes, ProNet's
message sums, the ESM-2 residual stream. Budget: ≈ 60 s on one core.

bfloat16 keeps 8 significant bits, so a sum accumulated in it drifts (256 + 1 rounds to
256: a count saturates, a running sum of O(1) terms stops growing past a few hundred).
The tolerances below sit a few times above the rounding noise of bf16 matmul inputs and
activations (about 1 % per feature here) and far below what such sums give (tens of
percent at these sizes).
"""

import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bihier_jax import models
from bihier_jax.data import layout
from bihier_jax import testing
from bihier_jax.models import esm2
from bihier_jax.models import heads
from bihier_jax.models import pronet

F32, BF16 = "float32", "bfloat16"


def _relative(got, want, axis=None):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return (np.linalg.norm(got - want, axis=axis)
          / np.maximum(np.linalg.norm(want, axis=axis), 1e-30))


def _both_dtypes(task: str, examples):
  """(batch, {dtype: ModelOutput}) of `configs/<task>.py:tiny` in float32 and bfloat16
  with the same (float32) parameters, dropout off."""
  config = importlib.import_module(f"configs.{task}").get_config("tiny")
  config.model.gnn.dropout = config.model.fusion.dropout = config.model.head.dropout = 0.0
  budget = layout.budget_for(examples, packed_rows=config.data.pack_rows)
  batch = layout.collate(examples, budget)
  outputs, params = {}, None
  for dtype in (F32, BF16):
    config.model.dtype = dtype
    model = models.build_model(config)
    if params is None:
      params = models.init_params(model, batch, jax.random.key(0))
    outputs[dtype] = jax.jit(lambda p, b, m=model: m.apply({"params": p}, b))(
        params, batch)
  return batch, outputs


def _proteins(n_ligand=0):
  """Two proteins of more than 300 residues (one of two chains), ligand atoms if asked."""
  return [testing.random_example(620, seed=1, n_chains=2, n_ligand=n_ligand),
          testing.random_example(330, seed=2, n_ligand=n_ligand)]


def _check_nodes(batch, outputs, tolerance=0.03):
  real = np.asarray(batch.node_mask)
  got, want = (np.asarray(outputs[d].node_embeddings, np.float32)[real]
               for d in (BF16, F32))
  error = _relative(got, want)
  assert error <= tolerance, f"node embeddings: bf16 vs f32 relative error {error:.4f}"
  return error


def _check_graphs(outputs, num_proteins, tolerance=0.02, logits=True):
  pooled = [np.asarray(outputs[d].graph_embeddings, np.float32)[:num_proteins]
            for d in (BF16, F32)]
  errors = _relative(*pooled, axis=-1)
  assert np.all(errors <= tolerance), f"graph embeddings: bf16 vs f32 {errors}"
  if not logits:
    return
  logits = [np.asarray(outputs[d].logits)[:num_proteins] for d in (BF16, F32)]
  error = _relative(*logits)
  assert error <= 0.05, f"graph logits: bf16 vs f32 relative error {error:.4f}"


def test_react_kind_sum_pooling_in_bf16_matches_f32():
  examples = _proteins()
  batch, outputs = _both_dtypes("react", examples)
  _check_graphs(outputs, len(examples))
  _check_nodes(batch, outputs)
  assert outputs[BF16].graph_embeddings.dtype == jnp.float32  # pooled in float32


def test_lba_kind_mean_pooling_and_ligand_atoms_in_bf16_match_f32():
  examples = _proteins(n_ligand=24)
  batch, outputs = _both_dtypes("lba30", examples)
  _check_graphs(outputs, len(examples))
  _check_nodes(batch, outputs)
  ligand = np.asarray(batch.graph.nodes["node_kind"]) == 1
  assert ligand.sum() == 48
  got, want = (np.asarray(outputs[d].node_embeddings, np.float32)[ligand]
               for d in (BF16, F32))
  assert _relative(got, want) <= 0.04


def test_ppbs_kind_residue_level_in_bf16_matches_f32():
  examples = _proteins()
  batch, outputs = _both_dtypes("ppbs", examples)
  _check_nodes(batch, outputs)
  real = np.asarray(batch.node_mask)
  got, want = (np.asarray(outputs[d].logits)[real] for d in (BF16, F32))
  assert _relative(got, want) <= 0.05
  # Residue-level tasks pool too: predict writes each protein's graph embedding.
  _check_graphs(outputs, len(examples), logits=False)


@pytest.mark.parametrize("kind", ["sum", "mean"])
def test_pool_over_more_than_256_bf16_nodes_is_float32_exact(kind):
  # 700 nodes in graph 0, 40 in graph 1, padding graph 2; O(1) positive features, so
  # a bf16 running sum would stall near 256 x its terms and a bf16 count at 256.
  rng = np.random.default_rng(0)
  features = jnp.asarray(rng.uniform(0.5, 1.5, (741, 8)), jnp.bfloat16)
  node_graph = np.repeat([0, 1, 2], [700, 40, 1]).astype(np.int32)
  node_mask = node_graph < 2
  got = heads.pool(features, jnp.asarray(node_graph), jnp.asarray(node_mask), 3, kind)
  exact = np.zeros((3, 8))
  np.add.at(exact, node_graph[node_mask], np.asarray(features, np.float64)[node_mask])
  if kind == "mean":
    exact[:2] /= np.array([[700], [40]])
  np.testing.assert_allclose(np.asarray(got, np.float64), exact, rtol=1e-6, atol=0)
  assert got.dtype == jnp.float32


def test_pronet_sums_many_messages_in_float32():
  # ProNet keeps at most 32 neighbours; there a bf16 sum loses ~0.6 %, below the rest
  # of a block's bf16 noise. Hub receivers with 1,000+ senders make the sum's own
  # precision visible: a bf16 sum is off by several percent, a float32 one is not.
  n, hubs = 1200, np.arange(3)
  example = testing.random_example(n, seed=3, n_chains=12)
  keep = ~np.isin(example.receivers, hubs)
  senders = [example.senders[keep]] + [np.delete(np.arange(n), h) for h in hubs]
  receivers = [example.receivers[keep]] + [np.full(n - 1, h) for h in hubs]
  example = dataclasses.replace(
      example, senders=np.concatenate(senders).astype(np.int32),
      receivers=np.concatenate(receivers).astype(np.int32))
  batch = layout.collate([example], layout.budget_for([example]))
  configs = {d: pronet.ProNetConfig(hidden=16, num_blocks=1, cutoff=1000.0, dropout=0.0,
                                    dtype=d) for d in (jnp.float32, jnp.bfloat16)}
  params = jax.jit(pronet.ProNet(configs[jnp.float32]).init)(jax.random.key(0),
                                                               batch.graph)
  nodes = {d: np.asarray(jax.jit(lambda p, c=c: pronet.ProNet(c).apply(p, batch.graph))(
      params).nodes, np.float32)[hubs] for d, c in configs.items()}
  errors = _relative(nodes[jnp.bfloat16], nodes[jnp.float32], axis=-1)
  assert np.all(errors <= 0.015), errors


def test_esm_residual_stream_in_float32():
  # The embeddings scaled 8x: each layer adds a branch smaller than the stream, the case
  # where a bf16 stream drops the low bits of every update (12 layers of them).
  cfg32 = esm2.config_from_preset("tiny", num_layers=12, mlm_head=False)
  params = esm2.init_params(cfg32)
  params["embed_tokens"] = {"embedding": 8.0 * params["embed_tokens"]["embedding"]}
  tokens = jnp.asarray(esm2.tokenize(["MKTAYIAKQRQISFVKSHFSRQ" * 14] * 2))
  want = esm2.ESM2(cfg32).apply({"params": params}, tokens).last_hidden_state
  errors = {}
  for f32_residual in (False, True):
    cfg = dataclasses.replace(cfg32, dtype=jnp.dtype(jnp.bfloat16),
                              f32_residual=f32_residual)
    out = jax.jit(lambda p, c=cfg: esm2.ESM2(c).apply({"params": p}, tokens))(params)
    stream = jnp.float32 if f32_residual else jnp.bfloat16
    assert all(h.dtype == stream for h in out.hidden_states[:-1])
    assert out.last_hidden_state.dtype == jnp.bfloat16  # the final LN's output
    errors[f32_residual] = _relative(out.last_hidden_state.astype(jnp.float32), want)
  # Measured: 0.0085 with a bf16 stream, 0.0032 with a float32 one.
  assert errors[True] < 0.6 * errors[False], errors
