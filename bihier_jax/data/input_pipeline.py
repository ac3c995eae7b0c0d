"""From `ProteinExample`s or shard records to padded, static-shaped `Batch`es.

Two paths build the same `Batch` (see bihier_jax/data/batch.py for every field):
- `collate(examples, budget)`: numpy, for tests, tools and small evaluations.
- `make_dataset(data_dir, split, config, ...)`: tf.data over the shard records,
  with shuffling, per-host sharding, cropping, bucketing and packing inside tf.data.

Node order inside a batch: for each example, its residues (in example order) then its
ligand atoms; examples in batch order; then padding nodes. Ligand atoms are nodes with
aatype = NUM_RESTYPES + element index, node_kind 1, their position in the CA slot of
atom_positions (atom_mask set only there), prev/next = themselves, residue_index 0,
node_to_token (-1, -1), and one chain_id per example's ligand (after the chains).
"""

from __future__ import annotations

from collections.abc import Sequence

import jraph
import numpy as np

from bihier_jax.common import residue_constants as rc
from bihier_jax.data.batch import Batch, PaddingBudget
from bihier_jax.data.example import ProteinExample

_CA = rc.ATOM_SLOT["CA"]
# ESM id of each one-letter code; letters outside the ESM vocabulary read as X.
_ESM_X = rc.ESM_TOKEN["X"]


def esm_tokens(sequence: str) -> np.ndarray:
  """int32[len] ESM-2 token ids of a one-letter sequence, without <cls>/<eos>."""
  return np.array([rc.ESM_TOKEN.get(a, _ESM_X) if len(a) == 1 else _ESM_X
                   for a in sequence.upper()], np.int32)


def example_sizes(ex: ProteinExample) -> tuple[int, int, int, int]:
  """(nodes, edges, chains, longest row incl. <cls>/<eos>) of one example."""
  n_node = ex.num_residues + int(ex.ligand_elements.shape[0])
  row = max((len(s) for s in ex.sequences), default=0) + 2
  return n_node, ex.num_edges, len(ex.sequences), row


def budget_for(examples: Sequence[ProteinExample], *, n_graph: int | None = None,
               node_multiple: int = 1, edge_multiple: int = 1,
               row_multiple: int = 1) -> PaddingBudget:
  """The smallest budget (rounded up to multiples) that holds `examples` in one batch.

  Keeps one padding node and one padding graph, as `collate` needs.
  """
  sizes = np.array([example_sizes(ex) for ex in examples] or [[0, 0, 0, 2]])
  def up(x, m):
    return int(-(-int(x) // m) * m)
  return PaddingBudget(
      n_node=up(sizes[:, 0].sum() + 1, node_multiple),
      n_edge=up(max(sizes[:, 1].sum(), 1), edge_multiple),
      n_graph=n_graph if n_graph is not None else len(examples) + 1,
      n_row=up(max(sizes[:, 2].sum(), 1), row_multiple),
      row_length=up(sizes[:, 3].max(), row_multiple))


def fits(examples: Sequence[ProteinExample], budget: PaddingBudget) -> str | None:
  """None if `examples` fit in one batch of `budget`, else why not."""
  sizes = np.array([example_sizes(ex) for ex in examples] or [[0, 0, 0, 2]])
  checks = [
      (len(examples), budget.n_graph - 1, "graphs (one kept for padding)"),
      (sizes[:, 0].sum(), budget.n_node - 1, "nodes (one kept for padding)"),
      (sizes[:, 1].sum(), budget.n_edge, "edges"),
      (sizes[:, 2].sum(), budget.n_row, "ESM rows"),
      (sizes[:, 3].max(), budget.row_length, "ESM row length"),
  ]
  for need, have, what in checks:
    if need > have:
      return f"{what}: need {need}, budget has {have}"
  return None


def collate(examples: Sequence[ProteinExample], budget: PaddingBudget) -> Batch:
  """Pads `examples` into one `Batch` of exactly `budget`'s shapes (numpy arrays).

  Raises:
    ValueError: the examples do not fit the budget (names the first failing limit).
  """
  why = fits(examples, budget)
  if why is not None:
    ids = ", ".join(ex.id for ex in examples[:4])
    raise ValueError(f"examples [{ids}{', ...' if len(examples) > 4 else ''}] do not "
                     f"fit {budget}: {why}")
  n, e, g, r, length = (budget.n_node, budget.n_edge, budget.n_graph, budget.n_row,
                        budget.row_length)
  a = rc.NUM_ATOM_SLOTS
  pad_node = n - 1
  nodes = {
      "aatype": np.zeros([n], np.int32),
      "atom_positions": np.zeros([n, a, 3], np.float32),
      "atom_mask": np.zeros([n, a], np.float32),
      "backbone_dihedrals": np.zeros([n, 6], np.float32),
      "sidechain_torsions": np.zeros([n, 8], np.float32),
      "chi_mask": np.zeros([n, 4], np.float32),
      "prev_node": np.arange(n, dtype=np.int32),
      "next_node": np.arange(n, dtype=np.int32),
      "residue_index": np.zeros([n], np.int32),
      "chain_id": np.full([n], -1, np.int32),
      "node_kind": np.zeros([n], np.int32),
  }
  senders = np.full([e], pad_node, np.int32)
  receivers = np.full([e], pad_node, np.int32)
  n_node = np.zeros([g], np.int32)
  n_edge = np.zeros([g], np.int32)
  tokens = np.full([r, length], rc.ESM_PAD, np.int32)
  row_graph = np.full([r], g - 1, np.int32)
  row_mask = np.zeros([r], bool)
  node_to_token = np.full([n, 2], -1, np.int32)
  node_graph = np.full([n], g - 1, np.int32)
  node_mask = np.zeros([n], bool)
  edge_mask = np.zeros([e], bool)
  graph_mask = np.zeros([g], bool)
  node_labels = np.zeros([n], np.float32)
  node_label_mask = np.zeros([n], np.float32)
  node_weights = np.zeros([n], np.float32)
  graph_labels = np.zeros([g], np.float32)
  graph_weights = np.zeros([g], np.float32)

  node0 = edge0 = row0 = chain0 = 0
  for gi, ex in enumerate(examples):
    nr = ex.num_residues
    nl = int(ex.ligand_elements.shape[0])
    ne = ex.num_edges
    res = slice(node0, node0 + nr)
    lig = slice(node0 + nr, node0 + nr + nl)
    nodes["aatype"][res] = ex.aatype
    nodes["aatype"][lig] = rc.NUM_RESTYPES + ex.ligand_elements
    nodes["atom_positions"][res] = ex.atom_positions
    nodes["atom_positions"][lig, _CA] = ex.ligand_positions
    nodes["atom_mask"][res] = ex.atom_mask
    nodes["atom_mask"][lig, _CA] = 1.0
    nodes["backbone_dihedrals"][res] = ex.backbone_dihedrals
    nodes["sidechain_torsions"][res] = ex.sidechain_torsions
    nodes["chi_mask"][res] = ex.chi_mask
    nodes["residue_index"][res] = ex.residue_index
    nodes["chain_id"][res] = chain0 + ex.chain_row
    nodes["chain_id"][lig] = chain0 + len(ex.sequences)
    nodes["node_kind"][lig] = 1
    # Neighbours along the chain: the adjacent node of the same chain, else itself.
    idx = np.arange(node0, node0 + nr, dtype=np.int32)
    same_prev = np.zeros(nr, bool)
    same_prev[1:] = ex.chain_row[1:] == ex.chain_row[:-1]
    nodes["prev_node"][res] = np.where(same_prev, idx - 1, idx)
    same_next = np.zeros(nr, bool)
    same_next[:-1] = same_prev[1:]
    nodes["next_node"][res] = np.where(same_next, idx + 1, idx)

    node_to_token[res, 0] = row0 + ex.chain_row
    node_to_token[res, 1] = ex.residue_index + 1
    for c, seq in enumerate(ex.sequences):
      tokens[row0 + c, 0] = rc.ESM_CLS
      tokens[row0 + c, 1:len(seq) + 1] = esm_tokens(seq)
      tokens[row0 + c, len(seq) + 1] = rc.ESM_EOS
      row_graph[row0 + c] = gi
      row_mask[row0 + c] = True

    senders[edge0:edge0 + ne] = ex.senders + node0
    receivers[edge0:edge0 + ne] = ex.receivers + node0
    edge_mask[edge0:edge0 + ne] = True
    node_graph[node0:node0 + nr + nl] = gi
    node_mask[node0:node0 + nr + nl] = True
    node_labels[res] = ex.node_labels
    node_label_mask[res] = ex.node_label_mask
    node_weights[res] = ex.node_weights
    graph_labels[gi] = ex.graph_label
    graph_weights[gi] = ex.weight
    graph_mask[gi] = True
    n_node[gi] = nr + nl
    n_edge[gi] = ne
    node0 += nr + nl
    edge0 += ne
    row0 += len(ex.sequences)
    chain0 += len(ex.sequences) + (1 if nl else 0)

  n_node[g - 1] = n - node0
  n_edge[g - 1] = e - edge0
  graph = jraph.GraphsTuple(nodes=nodes, edges=None, senders=senders,
                            receivers=receivers, n_node=n_node, n_edge=n_edge,
                            globals=None)
  return Batch(tokens=tokens, row_graph=row_graph, row_mask=row_mask, graph=graph,
               node_to_token=node_to_token, node_graph=node_graph, node_mask=node_mask,
               edge_mask=edge_mask, graph_mask=graph_mask, node_labels=node_labels,
               node_label_mask=node_label_mask, node_weights=node_weights,
               graph_labels=graph_labels, graph_weights=graph_weights)
