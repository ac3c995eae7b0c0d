"""The tf.data packer: flat chunks of parsed records -> cropped, padded batches.

Public: `crop_chunk` (chains longer than max_residues to one window), `pack_chunk`
(one budget's planned batches of a chunk), `split_chunk`, `concat_chunks`, `to_batch`,
and the chunk field lists `RESIDUE_FIELDS`, `COUNT`, `SCALARS`. A chunk is
`records.parse_records`' output: each array field the concatenation of its examples'
rows, with per-example counts. It builds the batches `layout.collate` builds, with
whole-chunk tensor ops (docs/data.md, "The tf.data packer").
"""

from __future__ import annotations

import jraph
import tensorflow as tf

from bihier_jax.common import residue_constants as rc
from bihier_jax.data import layout
from bihier_jax.data import tf_ragged
from bihier_jax.data.batch import Batch, PaddingBudget

_CA = rc.ATOM_SLOT["CA"]

RESIDUE_FIELDS = ("aatype", "atom_positions", "atom_mask", "chain_row", "residue_index",
                   "backbone_dihedrals", "sidechain_torsions", "chi_mask", "node_labels",
                   "node_label_mask", "node_weights")
COUNT = {**{k: "num_residues" for k in RESIDUE_FIELDS},
         "senders": "num_edges", "receivers": "num_edges",
         "ligand_elements": "num_ligand_atoms", "ligand_positions": "num_ligand_atoms",
         "sequence_lengths": "num_chains", "sequence_tokens": "num_tokens"}
SCALARS = ("num_residues", "num_edges", "num_chains", "num_ligand_atoms", "num_tokens",
           "max_sequence_length", "graph_label", "weight", "id", "group")


def crop_chunk(x, max_residues: int, crop):
  """Crops every chain of a chunk longer than `max_residues` to one window.

  When a chain's residue nodes span at most `max_residues` positions of its sequence
  (an LBA pocket inside a long chain), the window always covers all of them: it starts
  among the starts that do, at fraction crop[c] (float32[chains] in [0, 1),
  `batch_plan.Planner.crop_starts`; 0 = the first such start). Otherwise it starts at
  that fraction of the whole chain. Residues outside it, their tokens and the edges
  touching them are removed, residue_index is shifted, ligand atoms are kept.
  """
  n_ex = tf.size(x["num_residues"])
  lengths = x["sequence_lengths"]  # flat over the chunk's chains
  over = tf.maximum(lengths - max_residues, 0)
  ex_r, _ = tf_ragged.rows(x["num_residues"])
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
  for name in RESIDUE_FIELDS:
    out[name] = tf.gather(x[name], kept)
  out["residue_index"] = tf.gather(x["residue_index"] - s, kept)
  new_n_res = tf.math.unsorted_segment_sum(tf.cast(keep_res, tf.int32), ex_r, n_ex)
  # Edges: an example's nodes are its residues then its ligand atoms.
  ex_e, _ = tf_ragged.rows(x["num_edges"])
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
  chain_of_token, token_pos = tf_ragged.rows(lengths)
  token_start = tf.gather(start, chain_of_token)
  keep_t = (token_pos >= token_start) & (token_pos < token_start + max_residues)
  out["sequence_tokens"] = tf.boolean_mask(x["sequence_tokens"], keep_t)
  new_lengths = tf.minimum(lengths, max_residues)
  ex_c, _ = tf_ragged.rows(x["num_chains"])
  out["sequence_lengths"] = new_lengths
  out["num_tokens"] = tf.math.unsorted_segment_sum(new_lengths, ex_c, n_ex)
  out["max_sequence_length"] = tf.maximum(
      tf.math.unsorted_segment_max(new_lengths, ex_c, n_ex), 0)
  out["num_residues"] = new_n_res
  return out


def split_chunk(x, n):
  """(The first n examples of a flat chunk, the others): slices, no gather."""
  head = {k: x[k][:n] for k in SCALARS}
  tail = {k: x[k][n:] for k in SCALARS}
  for name, count in COUNT.items():
    rows = tf.reduce_sum(x[count][:n])
    head[name], tail[name] = x[name][:rows], x[name][rows:]
  return head, tail


def concat_chunks(a, b):
  """Two flat chunks as one (a's examples, then b's)."""
  return {k: tf.concat([a[k], b[k]], 0) for k in (*SCALARS, *COUNT)}


class _Members:
  """Where the planned examples of one budget go in a chunk's batches (TF tensors).

  Examples `sel` (int32[M], into the chunk) go to batches and their chains to rows as
  `plan` says: (batch int32[M] 0.. in leaving order, row int32[K], column int32[K] of
  each chain of the sel examples in order; `batch_plan.Planner`). A batch's examples
  keep sel order; after reordering, one batch's examples are side by side.
  """

  def __init__(self, x, sel, plan, budget: PaddingBudget):
    self.budget = budget
    self.n_ex = tf.size(x["num_residues"])
    n_res, n_lig = x["num_residues"], x["num_ligand_atoms"]
    first_chain = tf.cumsum(x["num_chains"], exclusive=True)
    batch_in, row_in, col_in = plan
    # Examples of one batch side by side (first fit may fill an earlier batch later).
    order = tf.argsort(batch_in, stable=True)
    self.sel, self.batch_of = tf.gather(sel, order), tf.gather(batch_in, order)
    sel = self.sel
    # (example in sel, chain in it, chunk chain) of each sel chain.
    self.chain_owner, chain_pos = tf_ragged.rows(tf.gather(x["num_chains"], sel))
    self.chain_src = tf.gather(tf.gather(first_chain, sel), self.chain_owner) + chain_pos
    # Where each chain of the reordered list was in the plan's (chunk-order) list.
    plan_first = tf.cumsum(tf.gather(x["num_chains"], tf.gather(sel, tf.argsort(order))),
                           exclusive=True)
    in_plan = tf.gather(plan_first, tf.gather(order, self.chain_owner)) + chain_pos
    self.chain_r, self.chain_c = tf.gather(row_in, in_plan), tf.gather(col_in, in_plan)
    self.sizes = tf.stack([tf.gather(n_res + n_lig, sel), tf.gather(x["num_edges"], sel),
                           tf.gather(x["num_chains"], sel)], 1)
    self.nb = tf.reduce_max(tf.concat([self.batch_of, [-1]], 0)) + 1
    self.slot = self.within_batch(tf.ones_like(self.batch_of))
    self.node_off = self.within_batch(self.sizes[:, 0])
    self.used = [tf.math.unsorted_segment_sum(self.sizes[:, i], self.batch_of, self.nb)
                 for i in range(2)]
    # The plan bounds a crop's nodes and edges from above; past its budget a batch would
    # write into the padding slots.
    tf.debugging.assert_less_equal(self.used[0], budget.n_node - 1, message="planned "
                                   "batch over its node budget")
    tf.debugging.assert_less_equal(self.used[1], budget.n_edge, message="planned batch "
                                   "over its edge budget")
    # A field's real nodes are one `gather_rows` over the chunk's 2C runs (its residue
    # runs, then its ligand runs; a member reads its two).
    self.total_lig = tf.shape(x["ligand_elements"])[0]
    self.run_rows = tf.concat([n_res, n_lig], 0)
    self.member_runs = tf.reshape(tf.stack([sel, self.n_ex + sel], 1), [-1])
    self.run_length = tf.reshape(tf.stack([tf.gather(n_res, sel), tf.gather(n_lig, sel)],
                                          1), [-1])

  def within_batch(self, v):
    """Exclusive cumulative sum of v restarting at each batch."""
    excl = tf.cumsum(v, exclusive=True)
    return excl - tf.gather(tf.math.segment_min(excl, self.batch_of), self.batch_of)

  def table(self, values, fill):
    """[nb, G-1] of per-member `values` at (batch, slot), `fill` elsewhere."""
    return tf.tensor_scatter_nd_update(
        tf.fill([self.nb, self.budget.n_graph - 1], fill),
        tf.stack([self.batch_of, self.slot], 1), values)

  def real_nodes(self, residue, ligand):
    """[sum of member nodes, ...] in (batch, slot) order: residue then ligand rows."""
    return tf_ragged.gather_rows(tf.concat([residue, ligand], 0), self.run_rows,
                                 self.member_runs)

  def on_runs(self, residue, ligand):
    """Per-member values (>= 0) onto its residues, then its ligand atoms."""
    return tf_ragged.repeat(tf.reshape(tf.stack([residue, ligand], 1), [-1]),
                            self.run_length)

  def padded(self, values, fill=0):
    """Real nodes -> [nb * N, ...]."""
    return tf.reshape(tf_ragged.padded(values, self.used[0], fill, self.budget.n_node),
                      [-1, *values.shape[1:]])

  def no_ligand(self, values):
    """Zeros for the ligand rows of a residue field."""
    return tf.zeros(tf.concat([[self.total_lig], tf.shape(values)[1:]], 0), values.dtype)

  def node_field(self, residue, ligand):
    """Residue rows [total_res, ...] and ligand rows [total_lig, ...] -> padded nodes."""
    return self.padded(self.real_nodes(residue, ligand))

  def residue_field(self, values):
    """A residue field as nodes: 0 on ligand atoms and padding."""
    return self.node_field(values, self.no_ligand(values))


def _frame_steps(x, n_ex):
  """(to_prev, to_next) int32[total residues]: 1 where `layout.chain_links` links a
  residue row to the row before / after it (rows of one example only)."""
  res_ex = tf_ragged.repeat(tf.range(n_ex), x["num_residues"])  # example of each row
  link = tf.cast((res_ex[1:] == res_ex[:-1]) & layout.chain_links(
      x["chain_row"], x["residue_index"], x["atom_positions"][:, _CA],
      x["atom_mask"][:, _CA]), tf.int32)
  total_res = tf.size(res_ex)
  return (tf.concat([[0], link], 0)[:total_res], tf.concat([link, [0]], 0)[:total_res])


def _node_fields(x, m: _Members) -> dict:
  """Node fields of the batches: per batch, its members' nodes in slot order, each
  member's residues then its ligand atoms, then padding."""
  budget = m.budget
  to_prev, to_next = _frame_steps(x, m.n_ex)
  j = tf.tile(tf.range(budget.n_node), [m.nb])  # node index in its batch
  is_lig = m.on_runs(tf.zeros_like(m.sel), tf.ones_like(m.sel))
  chain_real = m.real_nodes(x["chain_row"], m.no_ligand(x["chain_row"]))  # 0 on ligands
  index_real = m.real_nodes(x["residue_index"], m.no_ligand(x["residue_index"]))
  # ESM token of a residue: its chain's (row, column) in the members' chain list; ligand
  # atoms read the sentinel (-1, -2), which gives (-1, -1).
  in_list = chain_real + m.on_runs(tf.cumsum(m.sizes[:, 2], exclusive=True),
                                   tf.fill(tf.shape(m.sel), tf.size(m.chain_r)))
  token = tf.stack([
      tf.gather(tf.concat([m.chain_r, [-1]], 0), in_list),
      tf.gather(tf.concat([m.chain_c, [-2]], 0), in_list) + index_real + 1], 1)
  f32 = lambda t: tf.cast(t, tf.float32)  # pylint: disable=unnecessary-lambda-assignment
  lig_xyz = tf.pad(x["ligand_positions"][:, None, :],
                   [[0, 0], [_CA, rc.NUM_ATOM_SLOTS - _CA - 1], [0, 0]])
  lig_mask = tf.tile(tf.one_hot(_CA, rc.NUM_ATOM_SLOTS)[None], [m.total_lig, 1])
  nodes = {
      "aatype": m.node_field(x["aatype"], rc.NUM_RESTYPES + x["ligand_elements"]),
      "atom_positions": m.node_field(x["atom_positions"], lig_xyz),
      "atom_mask": m.node_field(f32(x["atom_mask"]), lig_mask),
      "backbone_dihedrals": m.residue_field(x["backbone_dihedrals"]),
      "sidechain_torsions": m.residue_field(x["sidechain_torsions"]),
      "chi_mask": m.residue_field(f32(x["chi_mask"])),
      "prev_node": j - m.residue_field(to_prev),
      "next_node": j + m.residue_field(to_next),
      "residue_index": m.padded(index_real),
      "chain_id": m.padded(chain_real + m.on_runs(m.within_batch(m.sizes[:, 2]),
                                                  budget.max_chains + m.slot), -1),
      "node_kind": m.padded(is_lig),
  }
  return {"nodes": nodes,
          "node_graph": m.padded(tf_ragged.repeat(m.slot, m.sizes[:, 0]),
                                 budget.n_graph - 1),
          "node_mask": tf.reshape(tf.sequence_mask(m.used[0], budget.n_node), [-1]),
          "node_to_token": m.padded(token, -1),
          "node_labels": m.residue_field(x["node_labels"]),
          "node_label_mask": m.residue_field(f32(x["node_label_mask"])),
          "node_weights": m.residue_field(x["node_weights"])}


def _edge_fields(x, m: _Members) -> dict:
  """The members' edge rows in (batch, slot) order by one block copy per member, shifted
  by the member's node offset in its batch, each batch's run padded to E with edges of
  the padding node."""
  n_max, e_max = m.budget.n_node, m.budget.n_edge
  shift = tf_ragged.repeat(m.node_off, m.sizes[:, 1])

  def edge_field(values):
    moved = tf_ragged.gather_rows(values, x["num_edges"], m.sel) + shift
    return tf.reshape(tf_ragged.padded(moved, m.used[1], n_max - 1, e_max), [-1])
  return {"senders": edge_field(x["senders"]), "receivers": edge_field(x["receivers"]),
          "edge_mask": tf.reshape(tf.sequence_mask(m.used[1], e_max), [-1])}


def _graph_fields(x, m: _Members) -> dict:
  """Real graphs in slots 0.., the padding graph G-1 takes the remainder."""
  n_max, e_max, g_max = m.budget.n_node, m.budget.n_edge, m.budget.n_graph
  dest_g = (m.batch_of * g_max + m.slot)[:, None]
  pad_g = (tf.range(m.nb) * g_max + g_max - 1)[:, None]
  total_g = m.nb * g_max
  dest_and_pad = tf.concat([dest_g, pad_g], 0)
  out = {
      "n_node": tf.scatter_nd(dest_and_pad, tf.concat(
          [m.sizes[:, 0], n_max - m.used[0]], 0), [total_g]),
      "n_edge": tf.scatter_nd(dest_and_pad, tf.concat(
          [m.sizes[:, 1], e_max - m.used[1]], 0), [total_g]),
      "graph_mask": tf_ragged.mask(dest_g, total_g),
      "graph_labels": tf.scatter_nd(dest_g, tf.gather(x["graph_label"], m.sel),
                                    [total_g]),
      "graph_weights": tf.scatter_nd(dest_g, tf.gather(x["weight"], m.sel), [total_g]),
  }
  slot_ex = tf.reshape(tf.concat([m.table(m.sel, m.n_ex), tf.fill([m.nb, 1], m.n_ex)], 1),
                       [-1])
  out["ids"] = tf.gather(tf.concat([x["id"], [""]], 0), slot_ex)
  out["groups"] = tf.gather(tf.concat([x["group"], [""]], 0), slot_ex)
  return out


def _graph_slot_node(m: _Members):
  """int32[nb, G-1, P]: each graph's nodes in the per-graph layout, -1 after them."""
  p = tf.range(m.budget.graph_capacity)[None, None]
  return tf.where(p < m.table(m.sizes[:, 0], 0)[..., None],
                  m.table(m.node_off, 0)[..., None] + p, -1)


def _token_grid(x, m: _Members) -> dict:
  """tokens, token_segments, row_graph, row_mask of the batches.

  `packing.plan_batches` places a row's chains back to back from column 0 (`<cls> seq
  <eos>` each), padding after them. So each row is the runs of its chains in column
  order, padded; a token is read from a table of the chunk's sequence letters followed
  by <cls>, <eos> and <pad>.
  """
  r_max, l_max, g_max = m.budget.n_row, m.budget.row_length, m.budget.n_graph
  grid_row = tf.gather(m.batch_of, m.chain_owner) * r_max + m.chain_r  # of nb x R rows
  n_rows = m.nb * r_max
  by_start = tf.argsort(grid_row * l_max + m.chain_c)
  # A chain's index in its row: its rank among the row's chains in grid order.
  row_sorted = tf.gather(grid_row, by_start)
  rank = tf.range(tf.size(row_sorted)) - tf.gather(tf.math.unsorted_segment_min(
      tf.range(tf.size(row_sorted)), row_sorted, n_rows), row_sorted)
  chain_sorted = tf.gather(m.chain_src, by_start)
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
  chain_graph = tf.gather(m.slot, m.chain_owner)
  count = tf.math.unsorted_segment_sum(tf.ones_like(grid_row), grid_row, n_rows)
  lo = tf.math.unsorted_segment_min(chain_graph, grid_row, n_rows)
  hi = tf.math.unsorted_segment_max(chain_graph, grid_row, n_rows)
  return {
      "tokens": tf.gather(token_table, tf_ragged.padded(
          tf_ragged.runs(run_start, run_length), row_tokens, n_letters + 2, l_max)),
      "token_segments": tf_ragged.padded(tf_ragged.repeat(rank, letters + 2), row_tokens,
                                         -1, l_max),
      "row_graph": tf.where(count == 0, g_max - 1, tf.where(lo == hi, lo, -1)),
      "row_mask": count > 0,
  }


def pack_chunk(x, sel, plan, budget: PaddingBudget):
  """Packs examples of a flat chunk into padded batches of one budget, as planned.

  `sel` and `plan` as `_Members` takes them. Every slot kind is filled from the real rows
  only: the members' runs of node and edge rows in (batch, slot) order by one
  `RaggedGather` per field, token rows by ragged ranges, per-member values expanded onto
  their rows by `tf_ragged.repeat`, and each batch (or ESM row) padded; no search and no
  per-slot lookup (docs/data.md, "The tf.data packer").

  Returns:
    dict of [nb, ...] tensors (nb = batches planned, 0 if none).
  """
  m = _Members(x, sel, plan, budget)
  out = {**_node_fields(x, m), **_edge_fields(x, m), **_graph_fields(x, m),
         **_token_grid(x, m)}
  per = {"senders": budget.n_edge, "receivers": budget.n_edge,
         "edge_mask": budget.n_edge, "tokens": budget.n_row,
         "token_segments": budget.n_row, "row_graph": budget.n_row,
         "row_mask": budget.n_row}
  per.update({k: budget.n_graph for k in ("n_node", "n_edge", "graph_mask",
                                          "graph_labels", "graph_weights", "ids",
                                          "groups")})

  def per_batch(name, t):  # [nb * size, ...] -> [nb, size, ...], static but for nb
    return tf.reshape(t, [-1, per.get(name, budget.n_node), *t.shape[1:]])
  nodes = {k: per_batch(k, v) for k, v in out.pop("nodes").items()}
  return {"nodes": nodes, **{k: per_batch(k, v) for k, v in out.items()},
          "graph_slot_node": _graph_slot_node(m),
          "packed_rows": tf.fill([m.nb], budget.packed_rows)}


def to_batch(d) -> tuple[Batch, dict]:
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
