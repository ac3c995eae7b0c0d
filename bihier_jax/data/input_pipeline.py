"""From `ProteinExample`s or shard records to padded, static-shaped `Batch`es.

Two paths build the same `Batch` (see bihier_jax/data/batch.py for every field):
- `collate(examples, budget)`: numpy, for tests, tools and small evaluations.
- `make_dataset(data_dir, split, config, ...)`: the split's batches as planned by
  `batch_plan` (the same plan on every host: order, buckets, which records form each
  batch), read by offset and cropped and packed inside tf.data; `pack_planned` packs
  any planned batches (the training loop: its devices' part of each step).

Node order inside a batch: for each example, its residues (in example order) then its
ligand atoms; examples in batch order; then padding nodes. Ligand atoms are nodes with
aatype = NUM_RESTYPES + element index, node_kind 1, their position in the CA slot of
atom_positions (atom_mask set only there), prev/next = themselves, residue_index 0,
node_to_token (-1, -1). chain_id: a residue's chain id is its chain's index in the batch
(the examples' chains in order: its ESM row when rows are unpacked); the ligand atoms of
graph g share chain id `budget.max_chains + g`, so ids are unique within a batch.

ESM rows (`PaddingBudget.packed_rows`): one chain per row, or several chains per row
back to back, each `<cls> seq <eos>`; which batch each example joins and where each chain
sits is decided once, by `packing.plan_batches`, for both paths. `token_segments` numbers
the chains of each row; `graph_slot_node` lists each graph's nodes for the per-graph
layout of global fusion (`PaddingBudget.graph_capacity`).

prev_node / next_node (the frame references of each residue) follow the chain, and a gap
is a chain end: residues k and k+1 of an example are neighbours only if they share a
chain, their residue_index values are consecutive and their Cα atoms are at most
`CA_CA_NEIGHBOR_MAX` (4.2 Å) apart (`linked_to_next`). Both paths apply this rule.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
import functools
import math
import os

from absl import logging
import jraph
import numpy as np

from bihier_jax.common import flops
from bihier_jax.common import storage
from bihier_jax.common import residue_constants as rc
from bihier_jax.data import packing
from bihier_jax.data.batch import Batch, PaddingBudget
from bihier_jax.data.example import ProteinExample

_CA = rc.ATOM_SLOT["CA"]
# ESM id of each one-letter code; letters outside the ESM vocabulary read as X.
_ESM_X = rc.ESM_TOKEN["X"]

# Longest Cα(i)–Cα(i+1) distance still taken as a chain link, Å: bonded neighbours sit at
# 3.80 Å (trans) or 2.9 Å (cis); residues with one residue missing between them, ≥ 5 Å.
CA_CA_NEIGHBOR_MAX = 4.2
_CA_CA_MAX_SQ = np.float32(CA_CA_NEIGHBOR_MAX ** 2)


def linked_to_next(chain_row: np.ndarray, residue_index: np.ndarray, ca: np.ndarray,
                   ca_mask: np.ndarray) -> np.ndarray:
  """Which consecutive residues of one example are chain neighbours (frame references).

  Residue k+1 follows residue k along the chain if both are in the same chain, their
  residue_index values are consecutive (k+1's is k's + 1: a pocket residue 12 after 9
  is not) and both Cα are present and at most `CA_CA_NEIGHBOR_MAX` Å apart (an
  unresolved loop keeps consecutive indices in a chain parsed from a file, but not the
  3.8 Å step). A gap is thus a chain end. The tf.data packer computes the same rule.

  Args:
    chain_row: int[n] chain of each residue.
    residue_index: int[n] position in its chain's sequence.
    ca: float32[n, 3] Cα positions (Å).
    ca_mask: bool[n] Cα present.

  Returns:
    bool[max(n - 1, 0)]: entry k links residues k and k+1.
  """
  ca = np.asarray(ca, np.float32)
  d = ca[1:] - ca[:-1]
  # Written out in this order so that float32 rounding equals the tf.data packer's.
  dist_sq = d[:, 0] * d[:, 0] + d[:, 1] * d[:, 1] + d[:, 2] * d[:, 2]
  ca_mask = np.asarray(ca_mask, bool)
  return ((chain_row[1:] == chain_row[:-1])
          & (residue_index[1:] - residue_index[:-1] == 1)
          & ca_mask[1:] & ca_mask[:-1] & (dist_sq <= _CA_CA_MAX_SQ))


def esm_tokens(sequence: str) -> np.ndarray:
  """int32[len] ESM-2 token ids of a one-letter sequence, without <cls>/<eos>."""
  return np.array([rc.ESM_TOKEN.get(a, _ESM_X) if len(a) == 1 else _ESM_X
                   for a in sequence.upper()], np.int32)


def example_sizes(ex: ProteinExample) -> tuple[int, int, int, int]:
  """(nodes, edges, chains, longest row incl. <cls>/<eos>) of one example."""
  n_node = ex.num_residues + int(ex.ligand_elements.shape[0])
  row = max((len(s) for s in ex.sequences), default=0) + 2
  return n_node, ex.num_edges, len(ex.sequences), row


def _plan(examples: Sequence[ProteinExample], budget: PaddingBudget) -> packing.Plan:
  """`packing.plan_batches` of `examples` (in order) for `budget`."""
  return packing.plan_batches(
      [ex.num_residues + int(ex.ligand_elements.shape[0]) for ex in examples],
      [ex.num_edges for ex in examples], [len(ex.sequences) for ex in examples],
      [len(s) + 2 for ex in examples for s in ex.sequences], budget)


def budget_for(examples: Sequence[ProteinExample], *, n_graph: int | None = None,
               node_multiple: int = 1, edge_multiple: int = 1, row_multiple: int = 1,
               packed_rows: bool = False, graph_multiple: int = 0) -> PaddingBudget:
  """The smallest budget (rounded up to multiples) that holds `examples` in one batch.

  Keeps one padding node and one padding graph, as `collate` needs. Packed, the rows are
  those the chains fill first-fit in rows of the longest chain's length. graph_multiple
  > 0 sets graph_capacity to the largest example's nodes rounded up to it (0: none).
  """
  sizes = np.array([example_sizes(ex) for ex in examples] or [[0, 0, 0, 2]])
  def up(x, m):
    return int(-(-int(x) // m) * m)
  row_length = up(sizes[:, 3].max(), row_multiple)
  n_row = max(sizes[:, 2].sum(), 1)
  if packed_rows and examples:
    roomy = PaddingBudget(n_node=sizes[:, 0].sum() + 1, n_edge=sizes[:, 1].sum(),
                          n_graph=len(examples) + 1, n_row=n_row, row_length=row_length,
                          packed_rows=True)
    n_row = int(_plan(examples, roomy).row.max()) + 1
  return PaddingBudget(
      n_node=up(sizes[:, 0].sum() + 1, node_multiple),
      n_edge=up(max(sizes[:, 1].sum(), 1), edge_multiple),
      n_graph=n_graph if n_graph is not None else len(examples) + 1,
      n_row=up(n_row, row_multiple), row_length=row_length,
      graph_capacity=up(sizes[:, 0].max(), graph_multiple) if graph_multiple else 0,
      packed_rows=packed_rows)


def fits(examples: Sequence[ProteinExample], budget: PaddingBudget) -> str | None:
  """None if `examples` fit in one batch of `budget`, else why not."""
  sizes = np.array([example_sizes(ex) for ex in examples] or [[0, 0, 0, 2]])
  checks = [
      (len(examples), budget.n_graph - 1, "graphs (one kept for padding)"),
      (sizes[:, 0].sum(), budget.n_node - 1, "nodes (one kept for padding)"),
      (sizes[:, 1].sum(), budget.n_edge, "edges"),
      (sizes[:, 2].max() if budget.packed_rows else sizes[:, 2].sum(), budget.n_row,
       "ESM rows"),
      (sizes[:, 3].max(), budget.row_length, "ESM row length"),
  ]
  if budget.graph_capacity:
    checks.append((sizes[:, 0].max(), budget.graph_capacity,
                   "nodes of one graph (graph_capacity)"))
  for need, have, what in checks:
    if need > have:
      return f"{what}: need {need}, budget has {have}"
  if budget.packed_rows and _plan(examples, budget).num_batches > 1:
    return (f"ESM rows: the chains do not fit {budget.n_row} rows of {budget.row_length} "
            "tokens, placed first-fit in order")
  return None


def collate(examples: Sequence[ProteinExample], budget: PaddingBudget) -> Batch:
  """Pads `examples` into one `Batch` of exactly `budget`'s shapes (numpy arrays).

  Chains are placed in rows by `packing.plan_batches` (the budget's layout), as the
  tf.data packer places them.

  Raises:
    ValueError: the examples do not fit the budget (names the first failing limit).
  """
  why = fits(examples, budget)
  if why is not None:
    ids = ", ".join(ex.id for ex in examples[:4])
    raise ValueError(f"examples [{ids}{', ...' if len(examples) > 4 else ''}] do not "
                     f"fit {budget}: {why}")
  plan = _plan(examples, budget)
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
  token_segments = np.full([r, length], -1, np.int32)
  row_graphs = [set() for _ in range(r)]
  chains_in_row = np.zeros([r], np.int32)
  node_to_token = np.full([n, 2], -1, np.int32)
  node_graph = np.full([n], g - 1, np.int32)
  node_mask = np.zeros([n], bool)
  edge_mask = np.zeros([e], bool)
  graph_mask = np.zeros([g], bool)
  graph_slot_node = np.full([g - 1, budget.graph_capacity], -1, np.int32)
  node_labels = np.zeros([n], np.float32)
  node_label_mask = np.zeros([n], np.float32)
  node_weights = np.zeros([n], np.float32)
  graph_labels = np.zeros([g], np.float32)
  graph_weights = np.zeros([g], np.float32)

  node0 = edge0 = chain0 = 0
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
    nodes["chain_id"][lig] = budget.max_chains + gi
    nodes["node_kind"][lig] = 1
    # Neighbours along the chain (gaps are chain ends), else the node itself.
    idx = np.arange(node0, node0 + nr, dtype=np.int32)
    link = linked_to_next(ex.chain_row, ex.residue_index, ex.atom_positions[:, _CA],
                          ex.atom_mask[:, _CA])
    same_prev = np.zeros(nr, bool)
    same_prev[1:] = link
    nodes["prev_node"][res] = np.where(same_prev, idx - 1, idx)
    same_next = np.zeros(nr, bool)
    same_next[:-1] = link
    nodes["next_node"][res] = np.where(same_next, idx + 1, idx)

    chain_rows = plan.row[chain0:chain0 + len(ex.sequences)]
    chain_cols = plan.column[chain0:chain0 + len(ex.sequences)]
    node_to_token[res, 0] = chain_rows[ex.chain_row]
    node_to_token[res, 1] = chain_cols[ex.chain_row] + ex.residue_index + 1
    for seq, row, col in zip(ex.sequences, chain_rows.tolist(), chain_cols.tolist()):
      tokens[row, col] = rc.ESM_CLS
      tokens[row, col + 1:col + len(seq) + 1] = esm_tokens(seq)
      tokens[row, col + len(seq) + 1] = rc.ESM_EOS
      # Chains of a row are placed left to right, so their order is their index.
      token_segments[row, col:col + len(seq) + 2] = chains_in_row[row]
      chains_in_row[row] += 1
      row_graphs[row].add(gi)

    senders[edge0:edge0 + ne] = ex.senders + node0
    receivers[edge0:edge0 + ne] = ex.receivers + node0
    edge_mask[edge0:edge0 + ne] = True
    node_graph[node0:node0 + nr + nl] = gi
    node_mask[node0:node0 + nr + nl] = True
    if budget.graph_capacity:
      graph_slot_node[gi, :nr + nl] = np.arange(node0, node0 + nr + nl)
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
    chain0 += len(ex.sequences)

  n_node[g - 1] = n - node0
  n_edge[g - 1] = e - edge0
  row_graph = np.array([min(s) if len(s) == 1 else (-1 if s else g - 1)
                        for s in row_graphs], np.int32)
  graph = jraph.GraphsTuple(nodes=nodes, edges=None, senders=senders,
                            receivers=receivers, n_node=n_node, n_edge=n_edge,
                            globals=None)
  return Batch(tokens=tokens, token_segments=token_segments, row_graph=row_graph,
               row_mask=chains_in_row > 0, graph=graph, node_to_token=node_to_token,
               node_graph=node_graph, node_mask=node_mask, edge_mask=edge_mask,
               graph_mask=graph_mask, node_labels=node_labels,
               node_label_mask=node_label_mask, node_weights=node_weights,
               graph_labels=graph_labels, graph_weights=graph_weights,
               graph_slot_node=graph_slot_node, packed_rows=budget.packed_rows)


# --- padding budgets -------------------------------------------------------------------
#
# Budget rule (one budget per ESM row-length bucket; each is one compiled program):
#   row_length L_b: unpacked (data.pack_rows = False), each of config.data.length_buckets,
#     capped at max_residues + 2 (and max_residues + 2 added if no bucket reaches it).
#     Packed, the packing row length L_p (data.row_length, or 0: `choose_row_length` for
#     the config's ESM-2 preset), then the length buckets above it for longer chains.
#     Buckets above the one holding the longest (cropped) chain of the data are dropped.
#     With a Pallas attention kernel (model.esm.attention splash | flash_gpu) every
#     length is rounded up to the kernels' block of 128 tokens (`esm_row_multiple`).
#     An example goes to the first bucket whose budget it fits alone (longest chain + 2
#     <= L_b, nodes, edges, chains, graph capacity).
#   n_graph G_b = batch_size + 1: batch_size is the most proteins in a batch.
#   n_node N_b = round_up(node_fill * batch_size * mean nodes of the data's examples in
#     the bucket, 128), at least the bucket's largest example + 1; unpacked, node_fill =
#     0.9 makes the node budget, not the graph count, end most batches (simulated on
#     lognormal PDB-like lengths: 0.914 efficiency vs 0.905 at 1.0, 0.80 at 1.2). Packed,
#     node_fill = 1.0, so that the ESM rows, not the nodes, end most batches (the ESM is
#     most of the step). Proteins join a batch while nodes, edges, rows and graphs fit
#     (`packing.plan_batches`), so padding is what is left after the last that fits.
#   n_edge E_b = round_up(d_b * N_b, 128), d_b = the bucket's largest edges/node ratio
#     (≤ max_neighbors): any set of examples that fits the nodes fits the edges.
#   n_row R_b: unpacked, max(ceil(batch_size * mean chains), largest chain count) in the
#     bucket. Packed, max(round(row_fill * batch_size * rows per example), largest chain
#     count), rows per example = the rows the bucket's chains fill first-fit, in random
#     order, over its examples; row_fill = 0.9, as node_fill unpacked.
#   graph_capacity P_b = round_up(largest node count of the bucket's examples, 16) (before
#     cropping for cropped ones: the crop's node count is not known here, and P must hold
#     it), or 0 where the per-graph layout would not pay: (G_b-1)·(2P)² >= (2N_b)² score
#     entries of global fusion's joint attention.
# Without size statistics (no sizes.json) the mean is taken as 3/4 of the bucket's
# longest chain, one chain per example, d_b = max_neighbors, P = 0, and packed rows
# are max_residues + 2 long (one packed bucket).

GRAPH_CAPACITY_MULTIPLE = 16
DEFAULT_ROW_LENGTHS = (256, 384, 512, 768, 1024)  # candidates of choose_row_length
_ROW_FILL = 0.9
_CHOOSE_MAX_EXAMPLES = 8192  # sizes simulated by choose_row_length (random subset)


def _round_up(x, m):
  return int(-(-int(x) // m) * m)


def load_sizes(data_dir: str, split: str) -> np.ndarray | None:
  """int[n, 4] (nodes, longest chain, chains, edges) per example of a split, or None."""
  path = storage.join(data_dir, split, "sizes.json")
  if not storage.exists(path):
    return None
  return np.asarray(storage.read_json(path), np.int64).reshape(-1, 4)


def dataset_sizes(data_dir: str) -> np.ndarray | None:
  """Sizes of the examples of every split of a prepared directory (None if unknown)."""
  found = [load_sizes(data_dir, d) for d in sorted(storage.listdir(data_dir))
           if storage.exists(storage.join(data_dir, d, "sizes.json"))]
  found = [f for f in found if f is not None and len(f)]
  return np.concatenate(found) if found else None


def _budgets(sizes: np.ndarray | None, lengths: Sequence[int], *, batch_size: int,
             max_residues: int, max_neighbors: int, packed_rows: bool,
             node_fill: float | None = None, node_multiple: int = 128
             ) -> list[PaddingBudget]:
  """Budgets for row `lengths` (ascending) by the budget rule above."""
  batch, max_res, k = int(batch_size), int(max_residues), int(max_neighbors)
  if node_fill is None:
    node_fill = 1.0 if packed_rows else 0.9
  lengths = sorted(set(int(b) for b in lengths))
  has_sizes = sizes is not None and len(sizes)
  if has_sizes:
    raw = np.asarray(sizes, np.int64).reshape(-1, 4)
    sizes, long = packing.cropped_sizes(raw, max_res)
    # P must hold a crop's nodes, which only the crop knows: bound them by the uncropped.
    capacity_nodes = np.where(long, raw[:, 0], sizes[:, 0])
    longest = int(sizes[:, 1].max()) + 2
    lengths = [b for b in lengths if b < longest] + [min(b for b in lengths if b >= longest)]
    lengths_of = packing.chain_lengths(sizes)
    first = np.concatenate([[0], np.cumsum(sizes[:, 2])])
  budgets, lower = [], 0
  for length in lengths:
    if has_sizes:
      member = np.flatnonzero((sizes[:, 1] + 2 > lower) & (sizes[:, 1] + 2 <= length))
    else:
      member = np.zeros([0], np.int64)
    if len(member):
      rows = sizes[member]
      mean_nodes = rows[:, 0].mean()
      max_nodes = rows[:, 0].max()
      # Uncropped edges over cropped nodes: a bound on a crop's edges per node.
      degree = min(k, float((raw[member, 3] / np.maximum(rows[:, 0], 1)).max()))
      max_chains = int(rows[:, 2].max())
      if packed_rows:
        n_row = max(int(round(_ROW_FILL * batch * _rows_per_example(
            member, first, lengths_of, length))), max_chains, 1)
      else:
        n_row = max(int(np.ceil(batch * rows[:, 2].mean())), max_chains)
      capacity = _round_up(capacity_nodes[member].max(), GRAPH_CAPACITY_MULTIPLE)
    else:
      mean_nodes = 0.75 * (length - 2)
      max_nodes = length - 2
      degree, n_row, capacity = k, batch, 0
    n_node = _round_up(max(node_fill * batch * mean_nodes, max_nodes) + 1, node_multiple)
    if batch * (2 * capacity) ** 2 >= (2 * n_node) ** 2:
      capacity = 0
    budgets.append(PaddingBudget(
        n_node=n_node, n_edge=_round_up(max(degree * n_node, 1), node_multiple),
        n_graph=batch + 1, n_row=n_row, row_length=length, graph_capacity=capacity,
        packed_rows=packed_rows))
    lower = length
  return budgets


def _rows_per_example(member: np.ndarray, first: np.ndarray, lengths_of: np.ndarray,
                      row_length: int) -> float:
  """Rows the chains of examples `member` fill first-fit (random order), per example."""
  order = np.random.default_rng(0).permutation(member)
  chain_sel = np.concatenate([np.arange(first[i], first[i + 1]) for i in order])
  tokens = lengths_of[chain_sel] + 2
  counts = first[order + 1] - first[order]
  many = 1 << 30
  roomy = PaddingBudget(n_node=many, n_edge=many, n_graph=many, n_row=64,
                        row_length=row_length, packed_rows=True)
  plan = packing.plan_batches(np.zeros(len(order)), np.zeros(len(order)), counts, tokens,
                              roomy)
  rows_used = len(np.unique(plan.batch[np.repeat(np.arange(len(order)), counts)] * 64
                            + plan.row))
  return rows_used / max(len(order), 1)


def _config_lengths(config) -> list[int]:
  max_res = int(config.data.max_residues)
  return sorted({min(int(b), max_res + 2) for b in config.data.length_buckets}
                | {max_res + 2})


def row_length_costs(sizes: np.ndarray, embed_dim: int, ffn_dim: int,
                     candidates: Sequence[int] = DEFAULT_ROW_LENGTHS, *, batch_size: int,
                     max_residues: int = 1022,
                     length_buckets: Sequence[int] = (128, 256, 512, 1024),
                     max_neighbors: int = 32, chunk_size: int | None = None,
                     max_examples: int = _CHOOSE_MAX_EXAMPLES, seed: int = 0
                     ) -> dict[int, dict]:
  """What each packing row length costs, simulated with the packer on `sizes`.

  For each candidate L (capped at max_residues + 2): the packed budgets (L, then the
  length buckets above it), one simulated pass of `packing.simulate`, and its matmul
  FLOPs of one ESM-2 layer forward, `flops.esm_matmul_flops` per token slot of every
  row of every batch, over its real tokens.

  Args:
    sizes: int[n, 4] (nodes, longest chain, chains, edges) per example (sizes.json);
      at most max_examples of them (a random subset) are simulated.
    embed_dim, ffn_dim: the ESM-2 model's D and F.

  Returns:
    {L: {"flops_per_real_token", "token_efficiency" (real tokens / token slots),
    "attention_efficiency" (real same-chain (query, key) pairs / score entries),
    "proteins_per_batch", "budgets": [PaddingBudget]}}.
  """
  sizes = np.asarray(sizes, np.int64).reshape(-1, 4)
  if len(sizes) > max_examples:
    sizes = sizes[np.random.default_rng(seed).choice(len(sizes), max_examples,
                                                     replace=False)]
  max_res = int(max_residues)
  buckets = sorted({min(int(b), max_res + 2) for b in length_buckets} | {max_res + 2})
  chunk = chunk_size or default_chunk_size(batch_size)
  out = {}
  for length in sorted({min(int(c), max_res + 2) for c in candidates}):
    budgets = _budgets(sizes, [length] + [b for b in buckets if b > length],
                       batch_size=batch_size, max_residues=max_res,
                       max_neighbors=max_neighbors, packed_rows=True)
    sim = packing.simulate(sizes, budgets, max_residues=max_res, chunk_size=chunk,
                           seed=seed)
    shape = np.array([[b.n_row, b.row_length] for b in budgets], np.int64)[sim.budget]
    slots = shape[:, 0] * shape[:, 1]
    layer = np.array([flops.esm_matmul_flops(b.row_length, embed_dim, ffn_dim)
                      for b in budgets], np.float64)[sim.budget]
    out[length] = {
        "flops_per_real_token": float((slots * layer).sum() / sim.tokens.sum()),
        "token_efficiency": float(sim.tokens.sum() / slots.sum()),
        "attention_efficiency": float(sim.pairs.sum() / (slots * shape[:, 1]).sum()),
        "proteins_per_batch": float(sim.proteins.mean()),
        "budgets": budgets,
    }
  return out


def choose_row_length(sizes: np.ndarray, embed_dim: int, ffn_dim: int,
                      candidates: Sequence[int] = DEFAULT_ROW_LENGTHS, **kwargs) -> int:
  """The packing row length with the fewest ESM matmul FLOPs per real token.

  Longer rows waste fewer token slots (more chains share a row, fewer chains need the
  longer buckets) but cost more attention per token (4·L·D a slot, dense over the row);
  `row_length_costs` simulates the packer on `sizes` for each candidate and this takes
  the cheapest (the shorter of equals). Arguments as `row_length_costs`.
  """
  costs = row_length_costs(sizes, embed_dim, ffn_dim, candidates, **kwargs)
  chosen = min(costs, key=lambda length: (costs[length]["flops_per_real_token"], length))
  logging.info("packing row length %d for D=%d, F=%d; GFLOP per real token of one ESM "
               "layer by row length: %s", chosen, embed_dim, ffn_dim,
               {k: round(v["flops_per_real_token"] / 1e9, 4) for k, v in costs.items()})
  return chosen


def packing_row_length(config, sizes: np.ndarray | None) -> int:
  """L_p of a config: data.row_length if > 0, else `choose_row_length` for the
  config's ESM-2 preset (model.esm.preset) on `sizes` (max_residues + 2 without)."""
  max_res = int(config.data.max_residues)
  forced = int(config.data.get("row_length", 0) or 0)
  if forced > 0:
    return min(forced, max_res + 2)
  if sizes is None or not len(sizes):
    return max_res + 2
  if "model" not in config or "esm" not in config.model:
    raise ValueError("data.row_length = 0 chooses the packing row length for "
                     "model.esm.preset, which this config lacks: set either")
  from bihier_jax.models import esm2  # pylint: disable=g-import-not-at-top
  esm = esm2.config_from_preset(config.model.esm.preset)
  sizes = np.ascontiguousarray(sizes, np.int64).reshape(-1, 4)
  return _choose_row_length_cached(
      sizes.tobytes(), esm.embed_dim, esm.ffn_dim, int(config.train.batch_size), max_res,
      tuple(int(b) for b in config.data.length_buckets), int(config.data.max_neighbors))


@functools.lru_cache(maxsize=8)
def _choose_row_length_cached(sizes_bytes: bytes, embed_dim: int, ffn_dim: int,
                              batch_size: int, max_residues: int,
                              length_buckets: tuple[int, ...], max_neighbors: int) -> int:
  """`choose_row_length` once per (sizes, model, config): a run builds its budgets for
  every stream and the epoch estimate, and the choice takes seconds."""
  sizes = np.frombuffer(sizes_bytes, np.int64).reshape(-1, 4)
  return choose_row_length(sizes, embed_dim, ffn_dim, batch_size=batch_size,
                           max_residues=max_residues, length_buckets=length_buckets,
                           max_neighbors=max_neighbors)


def esm_row_multiple(config) -> int:
  """The multiple every ESM row length of `config` is rounded up to: the Pallas
  kernels' block when model.esm.attention names one (`esm2.pallas_row_multiple`: 128
  for splash and flash_gpu), else 1."""
  model = config.get("model")
  kind = model.esm.get("attention", "auto") if model and "esm" in model else "auto"
  from bihier_jax.models import esm2  # pylint: disable=g-import-not-at-top
  return esm2.pallas_row_multiple(str(kind))


def bucket_budgets(config, sizes: np.ndarray | None = None, *,
                   node_fill: float | None = None, node_multiple: int = 128
                   ) -> list[PaddingBudget]:
  """The fixed budgets of a task (see the budget rule above), smallest first.

  Every row length is rounded up to `esm_row_multiple(config)` (128 with a Pallas
  attention kernel, so the rows, the init sample batch's included, fill whole blocks).

  Args:
    config: uses data.length_buckets, data.max_residues, data.max_neighbors,
      data.pack_rows (missing = False), data.row_length, model.esm.preset (packed with
      data.row_length = 0), model.esm.attention and train.batch_size.
    sizes: int[n, 4] per-example (nodes, longest chain, chains, edges), e.g. the train
      split's `load_sizes`; chains longer than max_residues are counted as cropped.
    node_fill: default 0.9 unpacked, 1.0 packed.
  """
  lengths = _config_lengths(config)
  packed = bool(config.data.get("pack_rows", False))
  if packed:
    row = packing_row_length(config, sizes)
    lengths = [row] + [b for b in lengths if b > row]
  multiple = esm_row_multiple(config)
  lengths = sorted({_round_up(b, multiple) for b in lengths})
  return _budgets(sizes, lengths, batch_size=int(config.train.batch_size),
                  max_residues=int(config.data.max_residues),
                  max_neighbors=int(config.data.max_neighbors), packed_rows=packed,
                  node_fill=node_fill, node_multiple=node_multiple)


def size_rows(examples: Sequence[ProteinExample]) -> np.ndarray:
  """int[M, 4] (nodes, longest chain, chains, edges) per example: the sizes.json rows
  that `bucket_budgets` takes."""
  rows = [example_sizes(ex) for ex in examples]
  return np.array([[n, row - 2, c, e] for n, e, c, row in rows] or np.zeros([0, 4]),
                  np.int64).reshape(-1, 4)


def inference_batches(examples: Sequence[ProteinExample], config
                      ) -> list[tuple[PaddingBudget, list[int]]]:
  """Padded batches for examples held in memory, as evaluation would batch them.

  The budgets are the task's `bucket_budgets` for these examples' sizes (the rule of
  evaluation, so at most len(data.length_buckets) + 1 compiled shapes); each example
  goes to the smallest budget it fits and each budget's examples are packed in order by
  `packing.plan_batches`, as the tf.data packer packs a chunk. Nothing is cropped:
  data.max_residues is raised to the longest chain, so a longer chain gets the top
  length bucket; an example that still fits no budget gets a batch of its own,
  `budget_for` it.

  Returns:
    [(budget, indices into `examples`)], every example exactly once.
  """
  sizes = size_rows(examples)
  longest = int(sizes[:, 1].max(initial=0))
  if longest > int(config.data.max_residues):
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.data.max_residues = longest
  budgets = bucket_budgets(config, sizes)
  members: dict[int, list[int]] = collections.defaultdict(list)
  alone = []
  for i, ex in enumerate(examples):
    n_node, n_edge, _, _ = example_sizes(ex)
    tokens = [len(s) + 2 for s in ex.sequences]
    fit = next((b for b, budget in enumerate(budgets)
                if packing.oversize(n_node, n_edge, tokens, budget) is None), None)
    if fit is None:
      alone.append(i)
    else:
      members[fit].append(i)
  out = []
  for b in sorted(members):
    idx = members[b]
    plan = _plan([examples[i] for i in idx], budgets[b])
    for k in range(plan.num_batches):
      out.append((budgets[b], [i for i, j in zip(idx, plan.batch) if j == k]))
  packed = bool(config.data.get("pack_rows", False))
  rows = math.lcm(8, esm_row_multiple(config))
  for i in alone:
    out.append((budget_for([examples[i]], node_multiple=64, edge_multiple=512,
                           row_multiple=rows, packed_rows=packed), [i]))
  return out


# --- tf.data pipeline ------------------------------------------------------------------
#
# The pipeline works on chunks: C serialized records are batched, parsed at once into
# flat arrays (`records.parse_records`: each array field is the concatenation of the C
# examples' rows, with per-example counts), bucketed, and each bucket's examples are
# packed into padded batches by gathers from the flat arrays, all with whole-chunk
# tensor ops; only examples with a chain longer than max_residues are copied (cropped).
# Per-record tf.data work (a map per record) costs more than the data at this size.

_RESIDUE_FIELDS = ("aatype", "atom_positions", "atom_mask", "chain_row", "residue_index",
                   "backbone_dihedrals", "sidechain_torsions", "chi_mask", "node_labels",
                   "node_label_mask", "node_weights")
_COUNT = {**{k: "num_residues" for k in _RESIDUE_FIELDS},
          "senders": "num_edges", "receivers": "num_edges",
          "ligand_elements": "num_ligand_atoms", "ligand_positions": "num_ligand_atoms",
          "sequence_lengths": "num_chains", "sequence_tokens": "num_tokens"}
_SCALARS = ("num_residues", "num_edges", "num_chains", "num_ligand_atoms", "num_tokens",
            "max_sequence_length", "graph_label", "weight", "id", "group")


def _runs(starts, lengths):
  """int: the ranges [starts[i], starts[i] + lengths[i]) one after another."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.ragged.range(starts, starts + lengths).flat_values


def _repeat(values, counts):
  """int32: values[i] (int32 >= 0) counts[i] times, for each i in turn.

  tf.repeat masks a [len(values), max count] grid; a cumulative sum over the output
  costs ~7 ns an element. This is one ragged range: each value v becomes the range
  v * 2^31 + (0 .. count - 1) in int64, and the high bits give v back (~1.5 ns an
  element). Needs counts < 2^31.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  flat = _runs(tf.cast(values, tf.int64) * (1 << 31), tf.cast(counts, tf.int64))
  return tf.cast(tf.bitwise.right_shift(flat, tf.constant(31, tf.int64)), tf.int32)


def _rows(lengths):
  """(owner, position) of each row of a flat array with per-example row `lengths`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  owner = _repeat(tf.range(tf.size(lengths)), lengths)  # empty examples own no row
  return owner, tf.ragged.range(lengths).flat_values


def _gather_rows(values, lengths, which):
  """The rows of examples `which` (int32[k]), in that order, from a flat array of
  per-example rows (`lengths` each): one RaggedGather, a block copy per example."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  ragged = tf.RaggedTensor.from_row_lengths(values, lengths, validate=False)
  return tf.gather(ragged, which).flat_values


def _padded(values, lengths, fill, width: int):
  """[len(lengths), width]: row i holds the next lengths[i] (<= width) of `values`,
  then `fill`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.RaggedTensor.from_row_lengths(values, lengths, validate=False).to_tensor(
      default_value=fill,
      shape=tf.concat([[tf.size(lengths), width], tf.shape(values)[1:]], 0))


def _crop(x, max_residues: int, crop):
  """Crops every chain of a chunk longer than `max_residues` to one window.

  When a chain's residue nodes span at most `max_residues` positions of its sequence
  (an LBA pocket inside a long chain), the window always covers all of them: it starts
  among the starts that do, at fraction crop[c] (float32[chains] in [0, 1),
  `batch_plan.Planner.crop_starts`; 0 = the first such start). Otherwise it starts at
  that fraction of the whole chain. Residues outside it, their tokens and the edges
  touching them are removed, residue_index is shifted, ligand atoms are kept.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  n_ex = tf.size(x["num_residues"])
  lengths = x["sequence_lengths"]  # flat over the chunk's chains
  over = tf.maximum(lengths - max_residues, 0)
  ex_r, _ = _rows(x["num_residues"])
  first_chain = tf.cumsum(x["num_chains"], exclusive=True)
  chain_of_res = tf.gather(first_chain, ex_r) + x["chain_row"]
  n_chains = tf.size(lengths)
  # Starts whose window covers every node of the chain: [lo, hi] (empty if lo > hi).
  first_node = tf.math.unsorted_segment_min(x["residue_index"], chain_of_res, n_chains)
  last_node = tf.math.unsorted_segment_max(x["residue_index"], chain_of_res, n_chains)
  lo = tf.clip_by_value(last_node - max_residues + 1, 0, over)
  hi = tf.clip_by_value(first_node, 0, over)
  covered = lo <= hi
  lo = tf.where(covered, lo, 0)
  hi = tf.where(covered, hi, over)
  span = hi - lo
  start = lo + tf.minimum(tf.cast(crop * tf.cast(span + 1, tf.float32), tf.int32), span)
  out = dict(x)
  # Residues.
  s = tf.gather(start, chain_of_res)
  keep_res = (x["residue_index"] >= s) & (x["residue_index"] < s + max_residues)
  kept = tf.where(keep_res)[:, 0]  # one index computation, one gather per field
  for name in _RESIDUE_FIELDS:
    out[name] = tf.gather(x[name], kept)
  out["residue_index"] = tf.gather(x["residue_index"] - s, kept)
  new_n_res = tf.math.unsorted_segment_sum(tf.cast(keep_res, tf.int32), ex_r, n_ex)
  # Edges: an example's nodes are its residues then its ligand atoms.
  ex_e, _ = _rows(x["num_edges"])
  res_start = tf.cumsum(x["num_residues"], exclusive=True)
  n_total = tf.size(keep_res)
  kept_before = tf.concat([tf.cumsum(tf.cast(keep_res, tf.int32), exclusive=True),
                           [tf.reduce_sum(tf.cast(keep_res, tf.int32))]], 0)
  keep_ext = tf.concat([keep_res, [True]], 0)  # sentinel row for ligand nodes
  n_res_e = tf.gather(x["num_residues"], ex_e)
  start_e = tf.gather(res_start, ex_e)

  def remap(local):
    is_res = local < n_res_e
    row = tf.where(is_res, start_e + local, n_total)
    new_res = tf.gather(kept_before, row) - tf.gather(kept_before, start_e)
    new_lig = tf.gather(new_n_res, ex_e) + local - n_res_e
    return tf.gather(keep_ext, row), tf.where(is_res, new_res, new_lig)

  keep_s, senders = remap(x["senders"])
  keep_r, receivers = remap(x["receivers"])
  keep_e = keep_s & keep_r
  kept_e = tf.where(keep_e)[:, 0]
  out["senders"] = tf.gather(senders, kept_e)
  out["receivers"] = tf.gather(receivers, kept_e)
  out["num_edges"] = tf.math.unsorted_segment_sum(tf.cast(keep_e, tf.int32), ex_e, n_ex)
  # Tokens.
  chain_of_token, token_pos = _rows(lengths)
  token_start = tf.gather(start, chain_of_token)
  keep_t = (token_pos >= token_start) & (token_pos < token_start + max_residues)
  out["sequence_tokens"] = tf.boolean_mask(x["sequence_tokens"], keep_t)
  new_lengths = tf.minimum(lengths, max_residues)
  ex_c, _ = _rows(x["num_chains"])
  out["sequence_lengths"] = new_lengths
  out["num_tokens"] = tf.math.unsorted_segment_sum(new_lengths, ex_c, n_ex)
  out["max_sequence_length"] = tf.maximum(
      tf.math.unsorted_segment_max(new_lengths, ex_c, n_ex), 0)
  out["num_residues"] = new_n_res
  return out


def _select(x, keep):
  """The examples of a chunk where keep (bool[C]) holds, still a flat chunk."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  kept = tf.cast(tf.where(keep)[:, 0], tf.int32)
  out = {k: tf.gather(x[k], kept) for k in _SCALARS}
  for name, count in _COUNT.items():
    out[name] = _gather_rows(x[name], x[count], kept)
  return out


def _mask(dest, size):
  """bool[size], True at dest (int32[k, 1])."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.tensor_scatter_nd_update(tf.zeros([size], tf.bool), dest,
                                     tf.ones(tf.shape(dest)[:1], tf.bool))


def _split(x, n):
  """(The first n examples of a flat chunk, the others): slices, no gather."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  head = {k: x[k][:n] for k in _SCALARS}
  tail = {k: x[k][n:] for k in _SCALARS}
  for name, count in _COUNT.items():
    rows = tf.reduce_sum(x[count][:n])
    head[name], tail[name] = x[name][:rows], x[name][rows:]
  return head, tail


def _concat(a, b):
  """Two flat chunks as one (a's examples, then b's)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return {k: tf.concat([a[k], b[k]], 0) for k in (*_SCALARS, *_COUNT)}


def _pack(x, sel, plan, budget: PaddingBudget):
  """Packs examples of a flat chunk into padded batches of one budget, as planned.

  Examples `sel` (int32[M], into the chunk) go to batches and their chains to rows as
  `plan` says: (batch int32[M] 0.. in leaving order, row int32[K], column int32[K] of
  each chain of the sel examples in order; `batch_plan.Planner`, from
  `packing.plan_batches` in sel order). A batch's examples keep sel order. Every
  slot kind is filled from the real rows only: the members' runs of node and edge rows
  in (batch, slot) order by one `RaggedGather` per field (`_gather_rows`), the token
  rows' source indices by ragged ranges (`_runs`), per-member values expanded onto
  their rows by `_repeat`, and each batch (or ESM row) padded by `_padded`. No search
  and no per-slot lookup of the member a padded slot belongs to.

  Returns:
    dict of [nb, ...] tensors (nb = batches planned, 0 if none).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  n_max, e_max, g_max, r_max, l_max = (budget.n_node, budget.n_edge, budget.n_graph,
                                       budget.n_row, budget.row_length)
  cap = budget.graph_capacity
  n_ex = tf.size(x["num_residues"])
  n_res, n_lig = x["num_residues"], x["num_ligand_atoms"]
  n_nodes = n_res + n_lig
  first_chain = tf.cumsum(x["num_chains"], exclusive=True)

  def member_chains(sel):  # (example in sel, chain in it, chunk chain) per sel chain
    owner, pos = _rows(tf.gather(x["num_chains"], sel))
    return owner, pos, tf.gather(tf.gather(first_chain, sel), owner) + pos
  batch_in, row_in, col_in = plan
  # Examples of one batch side by side (first fit may fill an earlier batch later).
  order = tf.argsort(batch_in, stable=True)
  sel, batch_of = tf.gather(sel, order), tf.gather(batch_in, order)
  chain_owner, chain_pos, chain_src = member_chains(sel)
  # Where each chain of the reordered list was in the plan's (chunk-order) list.
  plan_first = tf.cumsum(tf.gather(x["num_chains"], tf.gather(sel, tf.argsort(order))),
                         exclusive=True)
  in_plan = tf.gather(plan_first, tf.gather(order, chain_owner)) + chain_pos
  chain_r, chain_c = tf.gather(row_in, in_plan), tf.gather(col_in, in_plan)
  sizes = tf.stack([tf.gather(n_nodes, sel), tf.gather(x["num_edges"], sel),
                    tf.gather(x["num_chains"], sel)], 1)
  nb = tf.reduce_max(tf.concat([batch_of, [-1]], 0)) + 1

  def within_batch(v):  # exclusive cumulative sum restarting at each batch
    excl = tf.cumsum(v, exclusive=True)
    return excl - tf.gather(tf.math.segment_min(excl, batch_of), batch_of)

  slot = within_batch(tf.ones_like(batch_of))
  where2 = tf.stack([batch_of, slot], 1)
  g_real = g_max - 1

  def table(values, fill):  # [nb, G-1] per (batch, slot) of the member examples
    return tf.tensor_scatter_nd_update(tf.fill([nb, g_real], fill), where2, values)

  members = table(sel, n_ex)
  node_off = within_batch(sizes[:, 0])
  used = [tf.math.unsorted_segment_sum(sizes[:, i], batch_of, nb) for i in range(2)]
  # The plan bounds a crop's nodes and edges from above; past its budget a batch would
  # write into the padding slots.
  tf.debugging.assert_less_equal(used[0], n_max - 1, message="planned batch over its "
                                 "node budget")
  tf.debugging.assert_less_equal(used[1], e_max, message="planned batch over its edge "
                                 "budget")

  # Nodes: per batch, its members' nodes in slot order, each member's residues then its
  # ligand atoms, then padding. A field's real nodes are one `_gather_rows` over the
  # chunk's 2C runs (its residue runs, then its ligand runs; a member reads its two),
  # padded per batch; per-member values reach their nodes by `_repeat`.
  total_lig = tf.shape(x["ligand_elements"])[0]
  n_res_sel, n_lig_sel = tf.gather(n_res, sel), tf.gather(n_lig, sel)
  run_rows = tf.concat([n_res, n_lig], 0)
  member_runs = tf.reshape(tf.stack([sel, n_ex + sel], 1), [-1])
  run_length = tf.reshape(tf.stack([n_res_sel, n_lig_sel], 1), [-1])

  def real_nodes(residue, ligand):  # [sum of sizes[:, 0], ...] in (batch, slot) order
    return _gather_rows(tf.concat([residue, ligand], 0), run_rows, member_runs)

  def on_runs(residue, ligand):  # per-member values (>= 0) onto its residues, ligands
    return _repeat(tf.reshape(tf.stack([residue, ligand], 1), [-1]), run_length)

  def padded(values, fill=0):  # real nodes -> [nb * n_max, ...]
    return tf.reshape(_padded(values, used[0], fill, n_max), [-1, *values.shape[1:]])

  def no_ligand(values):  # zeros for the ligand rows of a residue field
    return tf.zeros(tf.concat([[total_lig], tf.shape(values)[1:]], 0), values.dtype)

  def node_field(residue, ligand):  # residue rows [total_res, ...], ligand [total_lig, ...]
    return padded(real_nodes(residue, ligand))

  def residue_field(values):  # 0 on ligand atoms and padding
    return node_field(values, no_ligand(values))

  chain_row, residue_index = x["chain_row"], x["residue_index"]
  # Frame references: `linked_to_next` once over the chunk's residue rows, for pairs of
  # consecutive rows of one example.
  res_ex = _repeat(tf.range(n_ex), n_res)  # the chunk example of each residue row
  ca = rc.ATOM_SLOT["CA"]
  ca_xyz, ca_ok = x["atom_positions"][:, ca], x["atom_mask"][:, ca]
  d = ca_xyz[1:] - ca_xyz[:-1]
  dist_sq = d[:, 0] * d[:, 0] + d[:, 1] * d[:, 1] + d[:, 2] * d[:, 2]
  link = tf.cast((res_ex[1:] == res_ex[:-1]) & (chain_row[1:] == chain_row[:-1])
                 & (residue_index[1:] - residue_index[:-1] == 1)
                 & ca_ok[1:] & ca_ok[:-1] & (dist_sq <= _CA_CA_MAX_SQ), tf.int32)
  total_res = tf.size(res_ex)
  to_next = tf.concat([link, [0]], 0)[:total_res]
  to_prev = tf.concat([[0], link], 0)[:total_res]
  j = tf.tile(tf.range(n_max), [nb])  # node index in its batch
  is_lig = on_runs(tf.zeros_like(sel), tf.ones_like(sel))
  chain_real = real_nodes(chain_row, no_ligand(chain_row))  # 0 on ligand atoms
  index_real = real_nodes(residue_index, no_ligand(residue_index))
  # ESM token of a residue: its chain's (row, column) in the members' chain list; ligand
  # atoms read the sentinel (-1, -2), which gives (-1, -1).
  in_list = chain_real + on_runs(tf.cumsum(sizes[:, 2], exclusive=True),
                                 tf.fill(tf.shape(sel), tf.size(chain_r)))
  token = tf.stack([tf.gather(tf.concat([chain_r, [-1]], 0), in_list),
                    tf.gather(tf.concat([chain_c, [-2]], 0), in_list) + index_real + 1], 1)
  f32 = lambda t: tf.cast(t, tf.float32)  # pylint: disable=unnecessary-lambda-assignment
  lig_xyz = tf.pad(x["ligand_positions"][:, None, :],
                   [[0, 0], [ca, rc.NUM_ATOM_SLOTS - ca - 1], [0, 0]])
  lig_mask = tf.tile(tf.one_hot(ca, rc.NUM_ATOM_SLOTS)[None], [total_lig, 1])
  nodes = {
      "aatype": node_field(x["aatype"], rc.NUM_RESTYPES + x["ligand_elements"]),
      "atom_positions": node_field(x["atom_positions"], lig_xyz),
      "atom_mask": node_field(f32(x["atom_mask"]), lig_mask),
      "backbone_dihedrals": residue_field(x["backbone_dihedrals"]),
      "sidechain_torsions": residue_field(x["sidechain_torsions"]),
      "chi_mask": residue_field(f32(x["chi_mask"])),
      "prev_node": j - residue_field(to_prev),
      "next_node": j + residue_field(to_next),
      "residue_index": padded(index_real),
      "chain_id": padded(chain_real + on_runs(within_batch(sizes[:, 2]),
                                              budget.max_chains + slot), -1),
      "node_kind": padded(is_lig),
  }
  out = {"nodes": nodes, "node_graph": padded(_repeat(slot, sizes[:, 0]), g_max - 1),
         "node_mask": tf.reshape(tf.sequence_mask(used[0], n_max), [-1]),
         "node_to_token": padded(token, -1)}
  out["node_labels"] = residue_field(x["node_labels"])
  out["node_label_mask"] = residue_field(f32(x["node_label_mask"]))
  out["node_weights"] = residue_field(x["node_weights"])

  # Edges: the members' edge rows in (batch, slot) order by one block copy per member,
  # shifted by the member's node offset in its batch, then each batch's run padded to
  # e_max with edges of the padding node. Real edges only until the padding.
  shift = _repeat(node_off, sizes[:, 1])

  def edge_field(values):
    moved = _gather_rows(values, x["num_edges"], sel) + shift
    return tf.reshape(_padded(moved, used[1], n_max - 1, e_max), [-1])
  out["senders"] = edge_field(x["senders"])
  out["receivers"] = edge_field(x["receivers"])
  out["edge_mask"] = tf.reshape(tf.sequence_mask(used[1], e_max), [-1])

  # Graphs: real graphs in slots 0.., the padding graph G-1 takes the remainder.
  dest_g = (batch_of * g_max + slot)[:, None]
  pad_g = (tf.range(nb) * g_max + g_max - 1)[:, None]
  total_g = nb * g_max
  out["n_node"] = tf.scatter_nd(tf.concat([dest_g, pad_g], 0),
                                tf.concat([sizes[:, 0], n_max - used[0]], 0), [total_g])
  out["n_edge"] = tf.scatter_nd(tf.concat([dest_g, pad_g], 0),
                                tf.concat([sizes[:, 1], e_max - used[1]], 0), [total_g])
  out["graph_mask"] = _mask(dest_g, total_g)
  out["graph_labels"] = tf.scatter_nd(dest_g, tf.gather(x["graph_label"], sel), [total_g])
  out["graph_weights"] = tf.scatter_nd(dest_g, tf.gather(x["weight"], sel), [total_g])
  slot_ex = tf.reshape(tf.concat([members, tf.fill([nb, 1], n_ex)], 1), [-1])
  out["ids"] = tf.gather(tf.concat([x["id"], [""]], 0), slot_ex)
  out["groups"] = tf.gather(tf.concat([x["group"], [""]], 0), slot_ex)
  p = tf.range(cap)[None, None]
  graph_slot_node = tf.where(p < table(sizes[:, 0], 0)[..., None],
                             table(node_off, 0)[..., None] + p, -1)  # [nb, G-1, P]

  # Token grid: `packing.plan_batches` places a row's chains back to back from column 0
  # (`<cls> seq <eos>` each), padding after them. So each row is the runs of its chains
  # in column order, padded by RaggedTensorToTensor; a token is read from a table of the
  # chunk's sequence letters followed by <cls>, <eos> and <pad>.
  grid_row = tf.gather(batch_of, chain_owner) * r_max + chain_r  # of all nb x R rows
  n_rows = nb * r_max
  by_start = tf.argsort(grid_row * l_max + chain_c)
  # A chain's index in its row: its rank among the row's chains in grid order.
  row_sorted = tf.gather(grid_row, by_start)
  rank = tf.range(tf.size(row_sorted)) - tf.gather(tf.math.unsorted_segment_min(
      tf.range(tf.size(row_sorted)), row_sorted, n_rows), row_sorted)
  chain_sorted = tf.gather(chain_src, by_start)
  letters = tf.gather(x["sequence_lengths"], chain_sorted)
  n_letters = tf.size(x["sequence_tokens"])
  token_table = tf.concat([x["sequence_tokens"],
                           tf.constant([rc.ESM_CLS, rc.ESM_EOS, rc.ESM_PAD],
                                       x["sequence_tokens"].dtype)], 0)
  run_start = tf.reshape(tf.stack([
      tf.fill(tf.shape(letters), n_letters),
      tf.gather(tf.cumsum(x["sequence_lengths"], exclusive=True), chain_sorted),
      tf.fill(tf.shape(letters), n_letters + 1)], 1), [-1])
  run_length = tf.reshape(tf.stack([tf.ones_like(letters), letters,
                                    tf.ones_like(letters)], 1), [-1])
  row_tokens = tf.math.unsorted_segment_sum(letters + 2, row_sorted, n_rows)
  out["tokens"] = tf.gather(token_table, _padded(_runs(run_start, run_length),
                                                 row_tokens, n_letters + 2, l_max))
  out["token_segments"] = _padded(_repeat(rank, letters + 2), row_tokens, -1, l_max)
  chain_graph = tf.gather(slot, chain_owner)
  count = tf.math.unsorted_segment_sum(tf.ones_like(grid_row), grid_row, n_rows)
  lo = tf.math.unsorted_segment_min(chain_graph, grid_row, n_rows)
  hi = tf.math.unsorted_segment_max(chain_graph, grid_row, n_rows)
  out["row_graph"] = tf.where(count == 0, g_max - 1, tf.where(lo == hi, lo, -1))
  out["row_mask"] = count > 0

  per = {"senders": e_max, "receivers": e_max, "edge_mask": e_max, "n_node": g_max,
         "n_edge": g_max, "graph_mask": g_max, "graph_labels": g_max,
         "graph_weights": g_max, "ids": g_max, "groups": g_max, "tokens": r_max,
         "token_segments": r_max, "row_graph": r_max, "row_mask": r_max}

  def per_batch(name, t):  # [nb * size, ...] -> [nb, size, ...], static but for nb
    return tf.reshape(t, [-1, per.get(name, n_max), *t.shape[1:]])
  nodes = {k: per_batch(k, v) for k, v in out.pop("nodes").items()}
  return {"nodes": nodes, **{k: per_batch(k, v) for k, v in out.items()},
          "graph_slot_node": graph_slot_node,
          "packed_rows": tf.fill([nb], budget.packed_rows)}


def _to_batch(d) -> tuple[Batch, dict]:
  """numpy dict from the tf.data pipeline -> (Batch, meta)."""
  graph = jraph.GraphsTuple(
      nodes=d["nodes"], edges=None, senders=d["senders"], receivers=d["receivers"],
      n_node=d["n_node"], n_edge=d["n_edge"], globals=None)
  batch = Batch(
      tokens=d["tokens"], token_segments=d["token_segments"], row_graph=d["row_graph"],
      row_mask=d["row_mask"], graph=graph, node_to_token=d["node_to_token"],
      node_graph=d["node_graph"], node_mask=d["node_mask"], edge_mask=d["edge_mask"],
      graph_mask=d["graph_mask"], node_labels=d["node_labels"],
      node_label_mask=d["node_label_mask"], node_weights=d["node_weights"],
      graph_labels=d["graph_labels"], graph_weights=d["graph_weights"],
      graph_slot_node=d["graph_slot_node"], packed_rows=bool(d["packed_rows"]))
  real = d["graph_mask"]
  meta = {"ids": [s.decode() for s in d["ids"][real]],
          "groups": [s.decode() for s in d["groups"][real]],
          "epoch": int(d["epoch"]), "index": int(d["index"]), "step": int(d["step"])}
  return batch, meta


def shard_files(data_dir: str, split: str) -> list[str]:
  """The split's record files, sorted."""
  found = sorted(storage.glob(storage.join(data_dir, split, f"{split}-*-of-*.tfrecord")))
  if not found:
    raise FileNotFoundError(f"no records for split {split!r} under {data_dir}")
  return found


# --- tf.data: packing the planned batches ----------------------------------------------
#
# Which records form each batch, and where each chain sits, is planned in numpy
# (`batch_plan`), the same on every host; tf.data reads and packs the batches one host
# is given. A unit is the host's next planned batches, up to `chunk_size` records: read
# by offset, parsed at once, cropped (only the records with a long chain are copied),
# each budget's batches packed by one `_pack` with the plan's rows and columns, and let
# out in plan order.


def default_chunk_size(batch_size: int) -> int:
  """Records planned and packed together when `make_dataset` is not told otherwise."""
  return max(256, 128 * int(batch_size))


def make_planner(data_dir: str, split: str, config, *, training: bool, seed: int,
                 budgets: Sequence[PaddingBudget] | None = None,
                 chunk_size: int | None = None):
  """The `batch_plan.Planner` of a split: the record index (read once per process), the
  budgets (default `bucket_budgets` of every split's sizes, so train and eval share
  programs), data.max_residues, data.shuffle_buffer, data.crop and train.batch_size."""
  from bihier_jax.data import batch_plan  # pylint: disable=g-import-not-at-top
  if budgets is None:
    budgets = bucket_budgets(config, dataset_sizes(data_dir))
  index = batch_plan.record_index(shard_files(data_dir, split))
  return batch_plan.Planner(
      index, budgets, max_residues=int(config.data.max_residues),
      chunk_size=chunk_size or default_chunk_size(int(config.train.batch_size)),
      seed=seed, shuffle_buffer=int(config.data.get("shuffle_buffer", 0) or 0),
      training=training, random_crop=config.data.get("crop", "random") == "random")


def _unit(planner, batches) -> dict[str, np.ndarray]:
  """The numpy inputs of one tf.data unit: planned batches -> their records and plan."""
  records = np.concatenate([b.records for b in batches])
  long = planner.long[records]
  order = np.argsort(long, kind="stable")  # records that are cropped last
  position = np.empty(len(records), np.int32)
  position[order] = np.arange(len(records), dtype=np.int32)
  chains = np.diff(planner.index.chain_first)[records]
  crop = np.split(np.concatenate([b.crop for b in batches]), np.cumsum(chains)[:-1])
  budget = np.array([b.budget for b in batches], np.int32)
  within = np.zeros(len(batches), np.int32)  # a batch's rank among its budget's
  for k in np.unique(budget):
    within[budget == k] = np.arange(int((budget == k).sum()), dtype=np.int32)
  sizes = [len(b.records) for b in batches]
  return {
      "serialized": np.array(planner.index.read(records[order]), dtype=object),
      "short": np.int32(len(records) - int(long.sum())),
      "crop": np.concatenate([crop[i] for i in order[long[order]]]
                             + [np.zeros([0], np.float32)]).astype(np.float32),
      "position": position,
      "member_budget": np.repeat(budget, sizes),
      "member_batch": np.repeat(within, sizes),
      "chain_budget": np.repeat(budget, [len(b.row) for b in batches]),
      "row": np.concatenate([b.row for b in batches]).astype(np.int32),
      "column": np.concatenate([b.column for b in batches]).astype(np.int32),
      "budget": budget,
      "epoch": np.array([b.epoch for b in batches], np.int64),
      "index": np.array([b.index for b in batches], np.int64),
      "step": np.array([b.step for b in batches], np.int64),
  }


def _units(planner, planned):
  """Units of the planned batches, in order, each up to chunk_size records."""
  group, count = [], 0
  for b in planned:
    group.append(b)
    count += len(b.records)
    if count >= planner.chunk_size:
      yield _unit(planner, group)
      group, count = [], 0
  if group:
    yield _unit(planner, group)


def _unit_signature():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  spec = {k: tf.TensorSpec([None], tf.int32) for k in (
      "position", "member_budget", "member_batch", "chain_budget", "row", "column",
      "budget")}
  spec.update({k: tf.TensorSpec([None], tf.int64) for k in ("epoch", "index", "step")})
  spec.update(serialized=tf.TensorSpec([None], tf.string),
              short=tf.TensorSpec([], tf.int32), crop=tf.TensorSpec([None], tf.float32))
  return spec


@functools.lru_cache(maxsize=8)
def _unit_packer(budgets: tuple[PaddingBudget, ...], max_residues: int):
  """The tf.function packing one unit (traced once per budgets: thousands of ops)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from bihier_jax.data import records  # pylint: disable=g-import-not-at-top
  keys = (*_SCALARS, *_COUNT)

  @tf.function(input_signature=[_unit_signature()])
  def pack(unit):
    x = records.parse_records(unit["serialized"])

    def crop_the_rest():  # records that are cropped come last in a unit
      head, tail = _split(x, unit["short"])
      return _concat(head, _crop(tail, max_residues, unit["crop"]))

    x = tf.cond(unit["short"] < tf.size(x["num_residues"]), crop_the_rest,
                lambda: {k: x[k] for k in keys})
    packed = []
    for k, budget in enumerate(budgets):
      on, chain_on = tf.equal(unit["member_budget"], k), tf.equal(unit["chain_budget"], k)
      plan = (tf.boolean_mask(unit["member_batch"], on),
              tf.boolean_mask(unit["row"], chain_on),
              tf.boolean_mask(unit["column"], chain_on))
      p = _pack(x, tf.boolean_mask(unit["position"], on), plan, budget)
      for name in ("epoch", "index", "step"):
        p[name] = tf.boolean_mask(unit[name], tf.equal(unit["budget"], k))
      packed.append(p)
    return tf.cast(unit["budget"], tf.int64), tuple(packed)

  return pack


def packed_dataset(planner, planned_fn, *, prefetch: int = 4):
  """tf.data.Dataset of the batches `planned_fn()` plans (dicts of numpy-ready tensors,
  with "epoch", "index" and "step" of each batch), packed in that order.

  Args:
    planner: the `batch_plan.Planner` that planned them (records, budgets).
    planned_fn: () -> iterator of `batch_plan.PlannedBatch`; called at each iteration.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  pack = _unit_packer(planner.budgets, planner.max_residues)
  ds = tf.data.Dataset.from_generator(lambda: _units(planner, planned_fn()),
                                      output_signature=_unit_signature())
  ds = ds.map(pack, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  def emit(order, per_bucket):
    return tf.data.Dataset.choose_from_datasets(
        [tf.data.Dataset.from_tensor_slices(b) for b in per_bucket],
        tf.data.Dataset.from_tensor_slices(order))

  return ds.flat_map(emit).prefetch(prefetch if prefetch else tf.data.AUTOTUNE)


def pack_planned(planner, planned, *, prefetch: int = 4):
  """(Batch, meta) of each planned batch of the iterator `planned`, in its order; meta
  as `make_dataset`'s, plus "step" (`PlannedBatch.step`)."""
  ds = packed_dataset(planner, lambda: planned, prefetch=prefetch)
  for d in ds.as_numpy_iterator():
    yield _to_batch(d)


def host_share(planned, process_index: int, process_count: int, skip: int = 0):
  """The planned batches of one host: every process_count-th from batch `skip` on."""
  for b in planned:
    if b.index >= skip and b.index % process_count == process_index:
      yield b


def make_tf_dataset(data_dir: str, split: str, config, *, training: bool, seed: int,
                    process_index: int | None = None, process_count: int | None = None,
                    budgets: Sequence[PaddingBudget] | None = None,
                    chunk_size: int | None = None, skip_batches: int = 0,
                    prefetch: int = 4):
  """The tf.data.Dataset of `make_dataset` (dicts of tensors; each iteration starts at
  the beginning)."""
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index, process_count = jax.process_index(), jax.process_count()
  planner = make_planner(data_dir, split, config, training=training, seed=seed,
                         budgets=budgets, chunk_size=chunk_size)
  return packed_dataset(
      planner, lambda: host_share(planner.stream(), process_index, process_count,
                                  skip_batches), prefetch=prefetch)


def make_dataset(data_dir: str, split: str, config, *, training: bool, seed: int,
                 process_index: int | None = None, process_count: int | None = None,
                 skip_batches: int = 0, budgets: Sequence[PaddingBudget] | None = None,
                 prefetch: int = 4, chunk_size: int | None = None):
  """Padded batches of a split: an iterator of (Batch of numpy arrays, meta).

  The batches are those of the split's `batch_plan.Planner` (one global plan, the same
  on every host): training, endless, epoch after epoch in an order drawn from (seed,
  epoch); evaluation, one pass in file order, the last partial batches padded, not
  dropped. Chains are cropped to config.data.max_residues (random window in training if
  config.data.crop == "random", else the first), bucketed by length and packed into the
  fixed `bucket_budgets` (up to batch_size proteins per batch). This host reads and packs
  every process_count-th planned batch (the training loop instead takes its devices'
  part of every step, `device_batches.StepInput`). The same arguments give the same batches.

  Args:
    data_dir: directory written by `data_pipelines.preprocess`.
    split: e.g. "train", "val".
    config: the experiment config (data.*, train.batch_size).
    training: shuffle + repeat + random crops.
    seed: shuffling and cropping seed; same seed, same batches.
    process_index, process_count: this host's share; default jax.process_index()/count().
    skip_batches: planned batches (of all hosts) to skip first.
    budgets: override `bucket_budgets(config, dataset_sizes(data_dir))` (every split's
      sizes, so that train and eval share programs and every example fits).
    prefetch: batches prepared ahead.
    chunk_size: records planned together (default `default_chunk_size`, max(256, 128 x
      batch_size)); the last batch of each bucket in a chunk may be partly empty.

  Yields:
    (Batch, meta) with meta = {"ids": [...], "groups": [...]} of the real graphs, in
    graph order, "epoch" (the training epoch, 0 in evaluation), "index" (the batch's
    place in the global plan) and "step" (-1).
  """
  ds = make_tf_dataset(data_dir, split, config, training=training, seed=seed,
                       process_index=process_index, process_count=process_count,
                       budgets=budgets, chunk_size=chunk_size, skip_batches=skip_batches,
                       prefetch=prefetch)
  for d in ds.as_numpy_iterator():
    yield _to_batch(d)
