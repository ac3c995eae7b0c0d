"""Numpy `collate`: the layout of a padded `Batch` and its budget checks."""

import numpy as np
import pytest

from bihier_jax.common import residue_constants as rc
from bihier_jax.data import layout
from bihier_jax import testing
from bihier_jax.data.batch import PaddingBudget


def _examples():
  return [testing.random_example(30, seed=0),
          testing.random_example(41, seed=1, n_chains=2),
          testing.random_example(12, seed=2, n_ligand=5)]


def test_collate_layout_matches_examples():
  exs = _examples()
  budget = PaddingBudget(n_node=128, n_edge=4096, n_graph=5, n_row=6, row_length=40)
  b = layout.collate(exs, budget)
  assert b.budget == budget
  nodes = b.graph.nodes
  # jraph bookkeeping: node_graph is n_node repeated; padding graph last.
  np.testing.assert_array_equal(b.node_graph, np.repeat(np.arange(5), b.graph.n_node))
  assert b.graph.n_node.sum() == 128 and b.graph.n_edge.sum() == 4096
  np.testing.assert_array_equal(b.graph_mask, [1, 1, 1, 0, 0])
  n_real = 30 + 41 + 12 + 5
  assert b.node_mask.sum() == n_real and not b.node_mask[n_real:].any()
  # Edges keep their geometry: same sender/receiver distances as in the examples.
  ca = nodes["atom_positions"][:, 1]
  d_batch = np.linalg.norm(ca[b.graph.senders] - ca[b.graph.receivers], axis=-1)
  d_ex = np.concatenate([np.linalg.norm(
      np.concatenate([ex.atom_positions[:, 1], ex.ligand_positions])[ex.senders]
      - np.concatenate([ex.atom_positions[:, 1], ex.ligand_positions])[ex.receivers],
      axis=-1) for ex in exs])
  np.testing.assert_allclose(d_batch[b.edge_mask], d_ex, atol=1e-5)
  assert (b.graph.senders[~b.edge_mask] == 127).all()
  # Tokens: decoding each residue node's token gives its sequence letter.
  vocab = np.array(rc.ESM_VOCAB)
  letters = vocab[b.tokens[b.node_to_token[:, 0], b.node_to_token[:, 1]]]
  res = nodes["node_kind"] == 0
  want = np.concatenate([[rc.RESTYPES[a] for a in ex.aatype] for ex in exs])
  np.testing.assert_array_equal(letters[res & b.node_mask], want)
  assert (b.tokens[:4, 0] == rc.ESM_CLS).all() and not b.row_mask[4:].any()
  assert b.tokens[0, 31] == rc.ESM_EOS and b.tokens[0, 32] == rc.ESM_PAD
  np.testing.assert_array_equal(b.row_graph, [0, 1, 1, 2, 4, 4])
  # Ligand atoms: element types after the residue types, position in the CA slot.
  lig = nodes["node_kind"] == 1
  assert lig.sum() == 5
  np.testing.assert_array_equal(nodes["aatype"][lig] - rc.NUM_RESTYPES,
                                exs[2].ligand_elements)
  np.testing.assert_allclose(nodes["atom_positions"][lig, 1], exs[2].ligand_positions)
  assert (b.node_to_token[lig] == -1).all()
  # Chains: prev/next stay inside a chain; chain ids unique per chain.
  idx = np.arange(128)
  prev, nxt, chain = nodes["prev_node"], nodes["next_node"], nodes["chain_id"]
  assert (chain[prev] == chain).all() and (chain[nxt] == chain).all()
  starts = idx[res & b.node_mask & (prev == idx)]
  np.testing.assert_array_equal(starts, [0, 30, 51, 71])
  assert len(set(chain[res & b.node_mask].tolist())) == 4
  assert (chain[~b.node_mask] == -1).all()
  np.testing.assert_allclose(b.node_labels[:30], exs[0].node_labels)
  assert b.node_label_mask[~b.node_mask].sum() == 0


def test_collate_rejects_over_budget():
  exs = _examples()
  tight = layout.budget_for(exs)
  layout.collate(exs, tight)
  for field in ("n_node", "n_edge", "n_graph", "n_row", "row_length"):
    small = dict(tight.__dict__)
    small[field] -= 1
    with pytest.raises(ValueError, match="do not fit"):
      layout.collate(exs, PaddingBudget(**small))


def test_random_example_geometry_and_graph():
  ex = testing.random_example(60, seed=3, n_chains=2)
  ca = ex.atom_positions[:, 1]
  step = np.linalg.norm(np.diff(ca[:30], axis=0), axis=-1)
  np.testing.assert_allclose(step, 3.8, atol=0.05)
  # Graph against brute force: nearest ≤32 within 10 Å, no self edges.
  d = np.linalg.norm(ca[:, None] - ca[None], axis=-1)
  np.fill_diagonal(d, np.inf)
  want = set()
  for i in range(len(ca)):
    nbrs = [j for j in np.argsort(d[i], kind="stable")[:32] if d[i, j] <= 10.0]
    want |= {(int(j), i) for j in nbrs}
  assert set(zip(ex.senders.tolist(), ex.receivers.tolist())) == want
