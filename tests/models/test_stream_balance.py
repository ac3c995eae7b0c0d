"""Where the sequence and structure streams meet, neither drowns the other at init.

ProNet's node states shrink about 8x per block at initialisation while ESM-2's are O(1).
With `model.fusion.norm` (the default) every meeting point is normalised; the checks
below also run with the switch off, where they fail by orders of magnitude, which is the
bias the switch removes.

Tiny configs (ESM preset 'tiny', GNN 3 blocks x 32) on three synthetic proteins.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bihier_jax import models
from bihier_jax import testing
from configs import default


@pytest.fixture(scope="module", autouse=True)
def _fast_compiles():
  """XLA's optimisation passes dominate the runtime of these tiny programs."""
  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", before)


def _config(kind, mode="global", norm=True, levels=(1, 3)):
  return testing.tiny_config(default.get_config(), {
      "model.kind": kind, "model.gnn.hidden": 32, "model.gnn.num_blocks": 3,
      "model.fusion.mode": mode, "model.fusion.levels": levels, "model.fusion.dim": 32,
      "model.fusion.norm": norm})


@functools.lru_cache(maxsize=None)
def _batch():
  examples = [testing.random_example(40, seed=0),
              testing.random_example(30, seed=1, n_chains=2),
              testing.random_example(25, seed=2)]
  return jax.tree_util.tree_map(jnp.asarray, testing.batch_of(examples, n_graph=4,
                                                               node_multiple=8))


@functools.lru_cache(maxsize=None)
def _forward(kind, mode="global", norm=True, levels=(1, 3)):
  """(params, jitted forward returning (output, intermediates)) at initialisation."""
  model = models.build_model(_config(kind, mode, norm, levels))
  params = model.init(jax.random.PRNGKey(0), _batch())["params"]

  @jax.jit
  def forward(params, batch):
    out, state = model.apply({"params": params}, batch, mutable=["intermediates"])
    return out, state["intermediates"]

  return params, forward


def _residues(batch):
  return np.asarray(batch.node_mask) & (np.asarray(batch.graph.nodes["node_kind"]) == 0)


def _rms(x):
  return float(np.sqrt(np.mean(np.square(x))))


def _half_rms(kind, mode="global", norm=True):
  params, forward = _forward(kind, mode, norm)
  batch = _batch()
  out, _ = forward(params, batch)
  emb = np.asarray(out.node_embeddings)[_residues(batch)]
  half = emb.shape[1] // 2
  return _rms(emb[:, :half]), _rms(emb[:, half:])


TWO_STREAM = [("serial", "global"), ("parallel", "global"), ("cross", "global"),
              ("bihier", "local"), ("bihier", "global")]


@pytest.mark.parametrize("kind,mode", TWO_STREAM, ids=lambda v: str(v))
def test_readout_halves_are_balanced_at_init(kind, mode):
  seq, struct = _half_rms(kind, mode)
  assert 0.25 < seq / struct < 4.0, (seq, struct)


def test_without_norm_the_structure_half_vanishes():
  """The check above can fail: with fusion.norm off, the structure half is ~1e-3 of the
  sequence half (the bias the switch removes)."""
  seq, struct = _half_rms("parallel", norm=False)
  assert seq / struct > 100, (seq, struct)


def _move_structure(batch, seed):
  """Same residues and tokens, other coordinates: the structure input alone changes."""
  nodes = dict(batch.graph.nodes)
  rng = np.random.default_rng(seed)
  pos = np.asarray(nodes["atom_positions"])
  nodes["atom_positions"] = (pos + rng.normal(scale=1.5, size=pos.shape[:1] + (1, 3))
                             ).astype(np.float32)
  return batch.replace(graph=batch.graph._replace(nodes=nodes))


@pytest.mark.parametrize("norm", [True, False])
def test_local_gate_follows_the_structure(norm):
  """Only the structure changes: the gate of a fusion level after the last GNN block
  must change with it (its sequence side is the same ESM layers on the same tokens)."""
  params, forward = _forward("bihier", "local", norm, levels=(3,))
  batch = _batch()
  residues = _residues(batch)
  gates = lambda b: np.asarray(forward(params, b)[1]["fusion_3"]["gates"][0])[residues]
  change = np.abs(gates(_move_structure(batch, seed=4)) - gates(batch)).max()
  if norm:
    assert change > 1e-2, change
  else:
    assert change < 1e-3, change  # without the norm the vote f(V) is f(0)


def _structure_attention_mass(norm):
  """Mean attention mass real sequence tokens put on the structure tokens of their own
  protein in the first global-fusion level (dense layout: tokens [seq N; struct N])."""
  params, forward = _forward("bihier", "global", norm)
  batch = _batch()
  weights = np.asarray(
      forward(params, batch)[1]["fusion_1"]["global"]["block"]["attention_weights"][0])
  n = batch.node_mask.shape[0]
  assert weights.shape[-1] == 2 * n  # the dense layout at this size
  real = _residues(batch)
  on_struct = weights[0][:, :n, n:].sum(-1)  # [heads, N] over sequence queries
  return float(on_struct[:, real].mean())


def test_global_fusion_attends_to_structure_at_init():
  assert _structure_attention_mass(norm=True) > 0.3
