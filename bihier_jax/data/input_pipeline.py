"""From `ProteinExample`s or shard records to padded, static-shaped `Batch`es.

Two paths build the same `Batch` (see bihier_jax/data/batch.py for every field):
- `collate(examples, budget)`: numpy, for tests, tools and small evaluations.
- `make_dataset(data_dir, split, config, ...)`: tf.data over the shard records,
  with shuffling, per-host sharding, cropping, bucketing and packing inside tf.data.

Node order inside a batch: for each example, its residues (in example order) then its
ligand atoms; examples in batch order; then padding nodes. Ligand atoms are nodes with
aatype = NUM_RESTYPES + element index, node_kind 1, their position in the CA slot of
atom_positions (atom_mask set only there), prev/next = themselves, residue_index 0,
node_to_token (-1, -1). chain_id: a residue's chain id is its ESM row; the ligand atoms
of graph g share chain id R + g (R = budget.n_row), so ids are unique within a batch.
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

  node0 = edge0 = row0 = 0
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
    nodes["chain_id"][res] = row0 + ex.chain_row
    nodes["chain_id"][lig] = r + gi
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


# --- padding budgets -------------------------------------------------------------------
#
# Budget rule (one budget per ESM row-length bucket; each is one compiled program):
#   row_length L_b: each of config.data.length_buckets, capped at max_residues + 2 (and
#     max_residues + 2 added if no bucket reaches it); buckets above the one holding the
#     longest (cropped) chain of the data are dropped. An example goes to the smallest
#     bucket whose budget it fits (longest chain + 2 <= L_b, nodes, edges and chains).
#   n_graph G_b = batch_size + 1: batch_size is the most proteins in a batch.
#   n_node N_b = round_up(node_fill * batch_size * mean nodes of the data's examples in
#     the bucket, 128), at least the bucket's largest example + 1. Batches are packed:
#     proteins are added in stream order while nodes, edges, rows and graphs all fit, so
#     padding is what is left after the last protein that fits.
#   n_edge E_b = round_up(d_b * N_b, 128), d_b = the bucket's largest edges/node ratio
#     (≤ max_neighbors): any set of examples that fits the nodes fits the edges.
#   n_row R_b = max(ceil(batch_size * mean chains), largest chain count) in the bucket.
# Without size statistics (no sizes.json) the mean is taken as 3/4 of the bucket's
# longest chain, one chain per example and d_b = max_neighbors.


def _round_up(x, m):
  return int(-(-int(x) // m) * m)


def load_sizes(data_dir: str, split: str) -> np.ndarray | None:
  """int[n, 4] (nodes, longest chain, chains, edges) per example of a split, or None."""
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  path = os.path.join(data_dir, split, "sizes.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return np.asarray(json.load(f), np.int64).reshape(-1, 4)


def bucket_budgets(config, sizes: np.ndarray | None = None, *,
                   node_fill: float = 1.0, node_multiple: int = 128) -> list[PaddingBudget]:
  """The fixed budgets of a task (see the budget rule above), smallest first.

  Args:
    config: uses data.length_buckets, data.max_residues, data.max_neighbors and
      train.batch_size.
    sizes: int[n, 4] per-example (nodes, longest chain, chains, edges), e.g. the train
      split's `load_sizes`; chains longer than max_residues are counted as cropped.
  """
  batch = int(config.train.batch_size)
  max_res = int(config.data.max_residues)
  k = int(config.data.max_neighbors)
  lengths = sorted({min(int(b), max_res + 2) for b in config.data.length_buckets}
                   | {max_res + 2})
  if sizes is not None and len(sizes):
    sizes = np.asarray(sizes, np.int64).copy()
    excess = np.maximum(sizes[:, 1] - max_res, 0)
    sizes[:, 0] -= excess  # exact for one chain; multi-chain: a lower bound
    sizes[:, 1] -= excess
    longest = int(sizes[:, 1].max()) + 2
    lengths = [b for b in lengths if b < longest] + [min(b for b in lengths if b >= longest)]
  budgets, lower = [], 0
  for length in lengths:
    if sizes is not None and len(sizes):
      rows = sizes[(sizes[:, 1] + 2 > lower) & (sizes[:, 1] + 2 <= length)]
    else:
      rows = np.zeros([0, 4], np.int64)
    if len(rows):
      mean_nodes = rows[:, 0].mean()
      max_nodes = rows[:, 0].max()
      degree = min(k, float((rows[:, 3] / np.maximum(rows[:, 0], 1)).max()))
      n_row = max(int(np.ceil(batch * rows[:, 2].mean())), int(rows[:, 2].max()))
    else:
      mean_nodes = max_nodes = 0.75 * (length - 2)
      max_nodes = length - 2
      degree, n_row = k, batch
    n_node = _round_up(max(node_fill * batch * mean_nodes, max_nodes) + 1, node_multiple)
    budgets.append(PaddingBudget(
        n_node=n_node, n_edge=_round_up(max(degree * n_node, 1), node_multiple),
        n_graph=batch + 1, n_row=n_row, row_length=length))
    lower = length
  return budgets


# --- tf.data pipeline ------------------------------------------------------------------

_RESIDUE_FIELDS = ("aatype", "atom_positions", "atom_mask", "chain_row", "residue_index",
                   "backbone_dihedrals", "sidechain_torsions", "chi_mask", "node_labels",
                   "node_label_mask", "node_weights")
_KEEP = (*_RESIDUE_FIELDS, "senders", "receivers", "ligand_elements", "ligand_positions",
         "sequence_lengths", "sequence_tokens", "num_residues", "num_edges", "num_chains",
         "num_ligand_atoms", "max_sequence_length", "graph_label", "weight", "id", "group")


def _crop(f, max_residues: int, seed):
  """Crops every chain longer than `max_residues` to one window of residues.

  The window starts at a uniform random position (seed: int32[2] stateless seed) or at
  0 (seed None). Residues outside it, their tokens, and edges touching them are removed;
  residue_index is shifted; ligand atoms are kept.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  lengths = f["sequence_lengths"]
  over = tf.maximum(lengths - max_residues, 0)
  if seed is None:
    start = tf.zeros_like(over)
  else:
    u = tf.random.stateless_uniform(tf.shape(over), seed=seed)
    start = tf.minimum(tf.cast(u * tf.cast(over + 1, tf.float32), tf.int32), over)
  chain_start = tf.gather(start, f["chain_row"])
  keep_res = ((f["residue_index"] >= chain_start)
              & (f["residue_index"] < chain_start + max_residues))
  out = dict(f)
  for name in _RESIDUE_FIELDS:
    out[name] = tf.boolean_mask(f[name], keep_res)
  out["residue_index"] = tf.boolean_mask(f["residue_index"] - chain_start, keep_res)
  keep_node = tf.concat([keep_res, tf.ones_like(f["ligand_elements"], tf.bool)], 0)
  new_index = tf.cumsum(tf.cast(keep_node, tf.int32)) - 1
  keep_edge = tf.gather(keep_node, f["senders"]) & tf.gather(keep_node, f["receivers"])
  out["senders"] = tf.gather(new_index, tf.boolean_mask(f["senders"], keep_edge))
  out["receivers"] = tf.gather(new_index, tf.boolean_mask(f["receivers"], keep_edge))
  chain_of_token = tf.repeat(tf.range(tf.size(lengths)), lengths)
  token_pos = (tf.range(tf.size(f["sequence_tokens"]))
               - tf.gather(tf.cumsum(lengths, exclusive=True), chain_of_token))
  token_start = tf.gather(start, chain_of_token)
  keep_token = (token_pos >= token_start) & (token_pos < token_start + max_residues)
  out["sequence_tokens"] = tf.boolean_mask(f["sequence_tokens"], keep_token)
  out["sequence_lengths"] = tf.minimum(lengths, max_residues)
  out["num_residues"] = tf.size(out["aatype"])
  out["num_edges"] = tf.size(out["senders"])
  out["max_sequence_length"] = tf.reduce_max(tf.concat([out["sequence_lengths"], [0]], 0))
  return out


def _mask(dest, size):
  """bool[size], True at dest (int32[k, 1])."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.tensor_scatter_nd_update(tf.zeros([size], tf.bool), dest,
                                     tf.ones(tf.shape(dest)[:1], tf.bool))


def _pack(x, budget):
  """Packs a ragged chunk of C examples of one bucket into padded batches.

  Args:
    x: dict of ragged [C, ...] per-example arrays and dense [C] scalars.
    budget: int32[5] (N, E, G, R, L).

  Returns:
    dict of [nb, ...] tensors, nb = number of batches the chunk fills; examples go to
    batches in order, a new batch starting when the next example does not fit.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  n_max, e_max, g_max, r_max, l_max = tf.unstack(budget)
  n_res = tf.cast(x["num_residues"], tf.int32)
  n_nodes = n_res + x["num_ligand_atoms"]
  n_edges, n_chains = x["num_edges"], x["num_chains"]
  limits = tf.stack([n_max - 1, e_max, r_max])

  def step(state, size):
    used, graphs = state[1:4], state[4]
    fits = (graphs < g_max - 1) & tf.reduce_all(used + size <= limits)
    new = tf.logical_not(fits) & (graphs > 0)
    base = tf.where(new, tf.zeros_like(used), used)
    return tf.concat([[state[0] + tf.cast(new, tf.int32)], base + size,
                      [tf.where(new, 0, graphs) + 1]], 0)

  sizes = tf.stack([n_nodes, n_edges, n_chains], 1)
  states = tf.scan(step, sizes, initializer=tf.zeros([5], tf.int32))
  tf.debugging.assert_less_equal(states[:, 1:4], limits[None],
                                 message="an example exceeds its bucket's budget")
  batch_of = states[:, 0]
  nb = batch_of[-1] + 1

  def within_batch(v):  # exclusive cumulative sum restarting at each batch
    excl = tf.cumsum(v, exclusive=True)
    return excl - tf.gather(tf.math.segment_min(excl, batch_of), batch_of)

  node_off = within_batch(n_nodes)
  edge_off = within_batch(n_edges)
  row_off = within_batch(n_chains)
  slot = within_batch(tf.ones_like(n_nodes))

  def flat(name):
    r = x[name]
    ex = tf.cast(r.value_rowids(), tf.int32)
    pos = tf.range(tf.shape(r.flat_values)[0]) - tf.gather(
        tf.cast(r.row_starts(), tf.int32), ex)
    return r.flat_values, ex, pos

  # Residue nodes.
  aatype, ex_r, pos_r = flat("aatype")
  local_r = tf.gather(node_off, ex_r) + pos_r
  dest_r = tf.gather(batch_of, ex_r) * n_max + local_r
  chain_row = x["chain_row"].flat_values
  same_prev = (pos_r > 0) & tf.equal(chain_row, tf.concat([[-1], chain_row[:-1]], 0))
  same_next = tf.concat([same_prev[1:], [False]], 0)
  row_r = tf.gather(row_off, ex_r) + chain_row
  # Ligand nodes.
  elements, ex_l, pos_l = flat("ligand_elements")
  local_l = tf.gather(node_off + n_res, ex_l) + pos_l
  dest_l = tf.gather(batch_of, ex_l) * n_max + local_l
  n_lig = tf.shape(elements)[0]
  dest_n = tf.concat([dest_r, dest_l], 0)[:, None]
  total_n = nb * n_max

  def scatter(updates, dest, shape_tail=(), base=None):
    if base is None:
      shape = tf.concat([[total_n], tf.constant(shape_tail, tf.int32)], 0)
      return tf.scatter_nd(dest, updates, shape)
    return tf.tensor_scatter_nd_update(base, dest, updates)

  local_all = tf.tile(tf.range(n_max), [nb])
  ca = rc.ATOM_SLOT["CA"]
  lig_pos = tf.pad(x["ligand_positions"].flat_values[:, None, :],
                   [[0, 0], [ca, rc.NUM_ATOM_SLOTS - ca - 1], [0, 0]])
  lig_mask = tf.one_hot(tf.fill([n_lig], ca), rc.NUM_ATOM_SLOTS)
  f32 = lambda t: tf.cast(t, tf.float32)  # pylint: disable=unnecessary-lambda-assignment
  dr = dest_r[:, None]
  nodes = {
      "aatype": scatter(tf.concat([aatype, rc.NUM_RESTYPES + elements], 0), dest_n),
      "atom_positions": scatter(tf.concat([x["atom_positions"].flat_values, lig_pos], 0),
                                dest_n, [rc.NUM_ATOM_SLOTS, 3]),
      "atom_mask": scatter(tf.concat([f32(x["atom_mask"].flat_values), lig_mask], 0),
                           dest_n, [rc.NUM_ATOM_SLOTS]),
      "backbone_dihedrals": scatter(x["backbone_dihedrals"].flat_values, dr, [6]),
      "sidechain_torsions": scatter(x["sidechain_torsions"].flat_values, dr, [8]),
      "chi_mask": scatter(f32(x["chi_mask"].flat_values), dr, [4]),
      "prev_node": scatter(local_r - tf.cast(same_prev, tf.int32), dr, base=local_all),
      "next_node": scatter(local_r + tf.cast(same_next, tf.int32), dr, base=local_all),
      "residue_index": scatter(x["residue_index"].flat_values, dr),
      "chain_id": scatter(tf.concat([row_r, r_max + tf.gather(slot, ex_l)], 0), dest_n,
                          base=tf.fill([total_n], -1)),
      "node_kind": scatter(tf.ones([n_lig], tf.int32), dest_l[:, None]),
  }
  ex_n = tf.concat([ex_r, ex_l], 0)
  out = {"nodes": nodes}
  out["node_graph"] = scatter(tf.gather(slot, ex_n), dest_n,
                              base=tf.fill([total_n], g_max - 1))
  out["node_mask"] = _mask(dest_n, total_n)
  out["node_to_token"] = scatter(
      tf.stack([row_r, x["residue_index"].flat_values + 1], 1), dr,
      base=tf.fill([total_n, 2], -1))
  out["node_labels"] = scatter(x["node_labels"].flat_values, dr)
  out["node_label_mask"] = scatter(f32(x["node_label_mask"].flat_values), dr)
  out["node_weights"] = scatter(x["node_weights"].flat_values, dr)

  # Edges.
  senders, ex_e, pos_e = flat("senders")
  dest_e = (tf.gather(batch_of, ex_e) * e_max + tf.gather(edge_off, ex_e) + pos_e)[:, None]
  total_e = nb * e_max
  shift = tf.gather(node_off, ex_e)
  pad_edges = tf.fill([total_e], n_max - 1)
  out["senders"] = tf.tensor_scatter_nd_update(pad_edges, dest_e, senders + shift)
  out["receivers"] = tf.tensor_scatter_nd_update(
      pad_edges, dest_e, x["receivers"].flat_values + shift)
  out["edge_mask"] = _mask(dest_e, total_e)

  # Graphs: real graphs in slots 0.., the padding graph G-1 takes the remainder.
  dest_g = (batch_of * g_max + slot)[:, None]
  pad_g = (tf.range(nb) * g_max + g_max - 1)[:, None]
  total_g = nb * g_max
  used_n = tf.math.segment_sum(n_nodes, batch_of)
  used_e = tf.math.segment_sum(n_edges, batch_of)
  out["n_node"] = tf.scatter_nd(tf.concat([dest_g, pad_g], 0),
                                tf.concat([n_nodes, n_max - used_n], 0), [total_g])
  out["n_edge"] = tf.scatter_nd(tf.concat([dest_g, pad_g], 0),
                                tf.concat([n_edges, e_max - used_e], 0), [total_g])
  out["graph_mask"] = _mask(dest_g, total_g)
  out["graph_labels"] = tf.scatter_nd(dest_g, x["graph_label"], [total_g])
  out["graph_weights"] = tf.scatter_nd(dest_g, x["weight"], [total_g])
  # Strings by gather: slot -> example index, "" for empty slots.
  first = tf.math.segment_min(tf.range(tf.size(batch_of)), batch_of)
  count = tf.math.segment_sum(tf.ones_like(batch_of), batch_of)
  slot_ex = first[:, None] + tf.range(g_max)[None]
  slot_ex = tf.where(tf.range(g_max)[None] < count[:, None], slot_ex, tf.size(batch_of))
  slot_ex = tf.reshape(slot_ex, [-1])
  out["ids"] = tf.gather(tf.concat([x["id"], [""]], 0), slot_ex)
  out["groups"] = tf.gather(tf.concat([x["group"], [""]], 0), slot_ex)

  # Token grid: one row per chain, <cls> seq <eos> <pad>...
  lengths, ex_c, pos_c = flat("sequence_lengths")
  row_dest = tf.gather(batch_of, ex_c) * r_max + tf.gather(row_off, ex_c) + pos_c
  tokens = x["sequence_tokens"].flat_values
  chain_of_token = tf.repeat(tf.range(tf.size(lengths)), lengths)
  col = (tf.range(tf.size(tokens))
         - tf.gather(tf.cumsum(lengths, exclusive=True), chain_of_token) + 1)
  total_r = nb * r_max
  idx = tf.concat([
      tf.stack([tf.gather(row_dest, chain_of_token), col], 1),
      tf.stack([row_dest, tf.zeros_like(row_dest)], 1),
      tf.stack([row_dest, lengths + 1], 1)], 0)
  vals = tf.concat([tokens, tf.fill(tf.shape(row_dest), rc.ESM_CLS),
                    tf.fill(tf.shape(row_dest), rc.ESM_EOS)], 0)
  out["tokens"] = tf.tensor_scatter_nd_update(
      tf.fill([total_r, l_max], rc.ESM_PAD), idx, vals)
  out["row_graph"] = tf.tensor_scatter_nd_update(
      tf.fill([total_r], g_max - 1), row_dest[:, None], tf.gather(slot, ex_c))
  out["row_mask"] = _mask(row_dest[:, None], total_r)

  def per_batch(t):
    return tf.reshape(t, tf.concat([[nb, -1], tf.shape(t)[1:]], 0))
  return tf.nest.map_structure(per_batch, out)


def _to_batch(d) -> tuple[Batch, dict]:
  """numpy dict from the tf.data pipeline -> (Batch, meta)."""
  graph = jraph.GraphsTuple(
      nodes=d["nodes"], edges=None, senders=d["senders"], receivers=d["receivers"],
      n_node=d["n_node"], n_edge=d["n_edge"], globals=None)
  batch = Batch(
      tokens=d["tokens"], row_graph=d["row_graph"], row_mask=d["row_mask"], graph=graph,
      node_to_token=d["node_to_token"], node_graph=d["node_graph"],
      node_mask=d["node_mask"], edge_mask=d["edge_mask"], graph_mask=d["graph_mask"],
      node_labels=d["node_labels"], node_label_mask=d["node_label_mask"],
      node_weights=d["node_weights"], graph_labels=d["graph_labels"],
      graph_weights=d["graph_weights"])
  real = d["graph_mask"]
  meta = {"ids": [s.decode() for s in d["ids"][real]],
          "groups": [s.decode() for s in d["groups"][real]]}
  return batch, meta


def shard_files(data_dir: str, split: str) -> list[str]:
  """The split's record files, sorted."""
  import glob  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  files = sorted(glob.glob(os.path.join(data_dir, split, f"{split}-*-of-*.tfrecord")))
  if not files:
    raise FileNotFoundError(f"no records for split {split!r} under {data_dir}")
  return files


def make_tf_dataset(data_dir: str, split: str, config, *, training: bool, seed: int,
                    process_index: int | None = None, process_count: int | None = None,
                    budgets: Sequence[PaddingBudget] | None = None,
                    chunk_size: int | None = None):
  """The tf.data.Dataset of padded batches (dicts of tensors; see `make_dataset`)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from bihier_jax.data import records  # pylint: disable=g-import-not-at-top
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index, process_count = jax.process_index(), jax.process_count()
  if budgets is None:
    budgets = bucket_budgets(config, load_sizes(data_dir, config.data.train_split))
  batch = int(config.train.batch_size)
  chunk_size = chunk_size or max(64, 32 * batch)
  max_res = int(config.data.max_residues)
  table = tf.constant([[b.n_node, b.n_edge, b.n_graph, b.n_row, b.row_length]
                       for b in budgets], tf.int32)
  autotune = tf.data.AUTOTUNE

  ds = tf.data.TFRecordDataset(shard_files(data_dir, split))
  # Record-level host sharding: disjoint and complete whatever the number of files.
  ds = ds.shard(process_count, process_index)
  if training:
    ds = ds.repeat()
    ds = ds.shuffle(int(config.data.shuffle_buffer), seed=seed,
                    reshuffle_each_iteration=True)
  ds = ds.enumerate()
  random_crop = training and config.data.crop == "random"

  def prepare(index, serialized):
    f = records.parse_record(serialized)
    f = {k: f[k] for k in _KEEP}
    crop_seed = tf.stack([tf.cast(seed, tf.int32), tf.cast(index, tf.int32)])
    f = tf.cond(f["max_sequence_length"] > max_res,
                lambda: _crop(f, max_res, crop_seed if random_crop else None),
                lambda: dict(f))
    need = tf.stack([f["num_residues"] + f["num_ligand_atoms"] + 1, f["num_edges"],
                     2, f["num_chains"], f["max_sequence_length"] + 2])
    fits = tf.reduce_all(need[None] <= table, axis=1)
    tf.debugging.Assert(tf.reduce_any(fits), [
        "an example fits no padding budget (id, needs N E G R L):", f["id"], need])
    f["bucket"] = tf.cast(tf.argmax(tf.cast(fits, tf.int32)), tf.int64)
    return f

  ds = ds.map(prepare, num_parallel_calls=autotune, deterministic=True)
  ds = ds.group_by_window(
      key_func=lambda f: f["bucket"],
      reduce_func=lambda key, window: window.ragged_batch(chunk_size),
      window_size=chunk_size)
  ds = ds.map(lambda x: _pack(x, tf.gather(table, x["bucket"][0])),
              num_parallel_calls=autotune, deterministic=True)
  ds = ds.unbatch()
  return ds


def make_dataset(data_dir: str, split: str, config, *, training: bool, seed: int,
                 process_index: int | None = None, process_count: int | None = None,
                 skip_batches: int = 0, budgets: Sequence[PaddingBudget] | None = None,
                 prefetch: int = 4, chunk_size: int | None = None):
  """Padded batches of a split: an iterator of (Batch of numpy arrays, meta).

  Records are sharded by host (record i goes to process i mod process_count), shuffled
  with `seed` (training: shuffle buffer config.data.shuffle_buffer, endless repeat;
  evaluation: one pass in file order, the last partial batches padded, not dropped),
  cropped to config.data.max_residues per chain (random window in training if
  config.data.crop == "random", else the first), bucketed by length and packed into
  the fixed `bucket_budgets` (up to batch_size proteins per batch), then prefetched.
  Everything up to the final numpy conversion runs in tf.data.

  Args:
    data_dir: directory written by `data_pipelines.preprocess`.
    split: e.g. "train", "val".
    config: the experiment config (data.*, train.batch_size).
    training: shuffle + repeat + random crops.
    seed: shuffling and cropping seed; same seed, same batches.
    process_index, process_count: host sharding; default jax.process_index()/count().
    skip_batches: batches to skip first (resuming a run at an input position).
    budgets: override `bucket_budgets(config, train split sizes)`.
    prefetch: batches prepared ahead.
    chunk_size: examples of one bucket packed together (default max(64, 32 x
      batch_size)); the last batch of each chunk may be partly empty.

  Yields:
    (Batch, meta) with meta = {"ids": [...], "groups": [...]} of the real graphs, in
    graph order.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  ds = make_tf_dataset(data_dir, split, config, training=training, seed=seed,
                       process_index=process_index, process_count=process_count,
                       budgets=budgets, chunk_size=chunk_size)
  if skip_batches:
    ds = ds.skip(skip_batches)
  ds = ds.prefetch(prefetch if prefetch else tf.data.AUTOTUNE)
  for d in ds.as_numpy_iterator():
    yield _to_batch(d)
