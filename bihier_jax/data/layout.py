"""The numpy reference path: `ProteinExample`s -> one padded `Batch` of a budget.

Public: `chain_links` (the chain-neighbour rule, numpy or TF ops), `plan_inputs`,
`budget_for`, `collate`, `size_rows`, `inference_batches`. The tf.data packer
(`tf_packer`) builds the same batches from records; tests hold the two equal. Node order,
chain ids, ligand atoms, ESM rows and the chain-neighbour rule: docs/data.md ("Node
layout of a batch", "Chain neighbours"); every field: `batch.Batch`.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
import math

import jraph
import numpy as np

from bihier_jax.common import residue_constants as rc
from bihier_jax.data import budgets as budgets_lib
from bihier_jax.data import packing
from bihier_jax.data import windows
from bihier_jax.data.batch import Batch, PaddingBudget
from bihier_jax.data.example import ExampleSizes, ProteinExample

_CA = rc.ATOM_SLOT["CA"]

# Longest Cα(i)–Cα(i+1) distance still taken as a chain link, Å: bonded neighbours sit at
# 3.80 Å (trans) or 2.9 Å (cis); residues with one residue missing between them, ≥ 5 Å.
CA_CA_NEIGHBOR_MAX = 4.2
_CA_CA_MAX_SQ = np.float32(CA_CA_NEIGHBOR_MAX ** 2)


def chain_links(chain_row, residue_index, ca, ca_mask):
  """Which consecutive residues are chain neighbours (frame references); numpy or TF.

  Residue k+1 follows residue k if both are in the same chain, residue_index steps by
  exactly 1 and both Cα are present and at most `CA_CA_NEIGHBOR_MAX` Å apart; a gap is
  a chain end (docs/data.md, "Chain neighbours"). Rows of several examples: the caller
  also requires both rows to be of one example.

  Args:
    chain_row: int[n]; residue_index: int[n]; ca: float32[n, 3] (Å); ca_mask: bool[n].

  Returns:
    bool[max(n - 1, 0)]: entry k links residues k and k+1.
  """
  d = ca[1:] - ca[:-1]
  # Written out in this order so that float32 rounding is the same in numpy and TF.
  dist_sq = d[:, 0] * d[:, 0] + d[:, 1] * d[:, 1] + d[:, 2] * d[:, 2]
  return ((chain_row[1:] == chain_row[:-1])
          & (residue_index[1:] - residue_index[:-1] == 1)
          & ca_mask[1:] & ca_mask[:-1] & (dist_sq <= _CA_CA_MAX_SQ))


def plan_inputs(examples: Sequence[ProteinExample], window: int = 0):
  """(nodes, edges, ESM runs, run tokens) of `examples`, as `packing` takes them; a run
  is a chain, or with window > 0 one window of a longer chain (`windows.chain_runs`)."""
  sizes = size_rows(examples, window)
  tokens = [size + 2 for runs in _runs(examples, window) for size in runs[2].tolist()]
  return sizes[:, 0], sizes[:, 3], sizes[:, 2], np.asarray(tokens, np.int64)


def _runs(examples: Sequence[ProteinExample], window: int):
  """Per example, its ESM runs: (chain, start, length) int64[S] (`windows.chain_runs`)."""
  return [windows.chain_runs([len(s) for s in ex.sequences], window) for ex in examples]


def size_rows(examples: Sequence[ProteinExample], window: int = 0) -> np.ndarray:
  """int[M, 4] `ExampleSizes` per example: the sizes.json rows `bucket_budgets` takes.
  With window > 0, as windowed batches hold them: chains counts ESM runs (windows) and
  longest_chain is at most `window`."""
  sizes = np.array([ex.sizes() for ex in examples] or np.zeros([0, 4]),
                   np.int64).reshape(-1, len(ExampleSizes._fields))
  if window:
    sizes[:, 1] = np.minimum(sizes[:, 1], window)
    sizes[:, 2] = [len(runs[0]) for runs in _runs(examples, window)]
  return sizes


def token_copies(examples: Sequence[ProteinExample], window: int) -> int:
  """K of `PaddingBudget.token_copies`: the most windows of `window` residues one
  residue of `examples` is in (1: no chain is longer than `window`)."""
  # Not monotonic in the length: every length longer than a window counts.
  lengths = {len(s) for ex in examples for s in ex.sequences if len(s) > window}
  return max((windows.residue_windows(n, window)[0].shape[1] for n in lengths), default=1)


def budget_for(examples: Sequence[ProteinExample], *, n_graph: int | None = None,
               node_multiple: int = 1, edge_multiple: int = 1, row_multiple: int = 1,
               packed_rows: bool = False, graph_multiple: int = 0,
               window: int = 0) -> PaddingBudget:
  """The smallest budget (rounded up to multiples) that holds `examples` in one batch.

  Keeps one padding node and one padding graph, as `collate` needs. Packed, the rows are
  those the chains fill first-fit in rows of the longest chain's length. graph_multiple
  > 0 sets graph_capacity to the largest example's nodes rounded up to it (0: none).
  window > 0: chains longer than `window` residues are read in windows; if there are
  any, the budget is windowed (rows of exactly window + 2 tokens, `token_copies` > 1).
  """
  copies = token_copies(examples, window) if window else 1
  window = window if copies > 1 else 0
  sizes = size_rows(examples, window) if examples else np.zeros([1, 4], np.int64)
  up = budgets_lib.round_up
  row_length = window + 2 if window else up(sizes[:, 1].max() + 2, row_multiple)
  n_row = max(sizes[:, 2].sum(), 1)
  if packed_rows and examples:
    roomy = PaddingBudget(n_node=sizes[:, 0].sum() + 1, n_edge=sizes[:, 3].sum(),
                          n_graph=len(examples) + 1, n_row=n_row, row_length=row_length,
                          packed_rows=True, token_copies=copies)
    n_row = int(packing.plan_batches(*plan_inputs(examples, window), roomy).row.max()) + 1
  return PaddingBudget(
      n_node=up(sizes[:, 0].sum() + 1, node_multiple),
      n_edge=up(max(sizes[:, 3].sum(), 1), edge_multiple),
      n_graph=n_graph if n_graph is not None else len(examples) + 1,
      n_row=up(n_row, row_multiple), row_length=row_length,
      graph_capacity=up(sizes[:, 0].max(), graph_multiple) if graph_multiple else 0,
      packed_rows=packed_rows, token_copies=copies)


def windowed_budget(examples: Sequence[ProteinExample], window: int, *,
                    batch_size: int = 1, packed_rows: bool = False,
                    node_multiple: int = 64, edge_multiple: int = 512) -> PaddingBudget:
  """One windowed budget for batches of up to `batch_size` of `examples`, chains
  longer than `window` residues read in windows (one program for all of them).

  Each example fits alone; nodes and edges hold batch_size times the mean example (at
  least the largest), rows batch_size times the mean windows per example, as
  `budgets.bucket_budgets` sizes its budgets; `windowed_batches` fills them in order.
  """
  if not examples:
    raise ValueError("windowed_budget of no examples")
  sizes = size_rows(examples, window)
  batch = max(int(batch_size), 1)
  up = budgets_lib.round_up
  nodes = max(batch * sizes[:, 0].mean(), sizes[:, 0].max())
  degree = float((sizes[:, 3] / np.maximum(sizes[:, 0], 1)).max())
  return PaddingBudget(
      n_node=up(nodes + 1, node_multiple),
      n_edge=up(max(degree * nodes, sizes[:, 3].max(), 1), edge_multiple),
      n_graph=batch + 1,
      n_row=int(max(np.ceil(batch * sizes[:, 2].mean()), sizes[:, 2].max())),
      row_length=window + 2, packed_rows=packed_rows,
      token_copies=max(token_copies(examples, window), 2))


def windowed_batches(examples: Sequence[ProteinExample], budget: PaddingBudget
                     ) -> list[list[int]]:
  """Indices of `examples` in each batch of a `windowed_budget`, in order (next fit:
  a batch takes examples while they fit)."""
  plan = packing.plan_batches(*plan_inputs(examples, budget.window), budget)
  return [np.flatnonzero(plan.batch == b).tolist() for b in range(plan.num_batches)]


def _starts(examples: Sequence[ProteinExample]) -> np.ndarray:
  """int[M + 1, 3] (first node, first edge, first chain) of each example in a batch."""
  sizes = size_rows(examples)
  return np.concatenate([np.zeros([1, 3], np.int64),
                         np.cumsum(sizes[:, [0, 3, 2]], 0)]).astype(np.int64)


def _token_map(ex: ProteinExample, runs, window: int, copies: int
               ) -> tuple[np.ndarray, np.ndarray]:
  """(run int[n, K], offset int[n, K]) of each residue's ESM token copies: the run of
  the example (-1: no copy) and the residue's position in it; K = `copies`."""
  if not window:
    return ex.chain_row[:, None].astype(np.int64), ex.residue_index[:, None].astype(
        np.int64)
  first = np.searchsorted(runs[0], np.arange(len(ex.sequences)))  # first run per chain
  run = np.full([ex.num_residues, copies], -1, np.int64)
  offset = np.full([ex.num_residues, copies], -1, np.int64)
  for c, seq in enumerate(ex.sequences):
    which, pos = windows.residue_windows(len(seq), window)
    if which.shape[1] > copies:
      raise ValueError(f"{ex.id}: a residue of chain {ex.chain_ids[c]!r} is in "
                       f"{which.shape[1]} windows, the budget holds {copies}")
    on = ex.chain_row == c
    idx = ex.residue_index[on]
    k = which.shape[1]
    run[on, :k] = np.where(which[idx] >= 0, first[c] + which[idx], -1)
    offset[on, :k] = pos[idx]
  return run, offset


def _node_arrays(examples, budget: PaddingBudget, plan: packing.Plan):
  """(nodes dict of `Batch.graph.nodes`, node_to_token int32[N, 2] or [N, K, 2])."""
  n, a = budget.n_node, rc.NUM_ATOM_SLOTS

  def f32(*shape):
    return np.zeros(shape, np.float32)
  nodes = {
      "aatype": np.zeros([n], np.int32), "atom_positions": f32(n, a, 3),
      "atom_mask": f32(n, a), "backbone_dihedrals": f32(n, 6),
      "sidechain_torsions": f32(n, 8), "chi_mask": f32(n, 4),
      "prev_node": np.arange(n, dtype=np.int32),
      "next_node": np.arange(n, dtype=np.int32),
      "residue_index": np.zeros([n], np.int32), "chain_id": np.full([n], -1, np.int32),
      "node_kind": np.zeros([n], np.int32),
  }
  copies = budget.token_copies
  node_to_token = np.full([n, copies, 2], -1, np.int32)
  all_runs = _runs(examples, budget.window)
  run_first = np.cumsum([0] + [len(r[0]) for r in all_runs])
  for gi, (ex, (node0, _, chain0)) in enumerate(zip(examples, _starts(examples))):
    nr, nl = ex.num_residues, int(ex.ligand_elements.shape[0])
    res, lig = slice(node0, node0 + nr), slice(node0 + nr, node0 + nr + nl)
    nodes["aatype"][res] = ex.aatype
    nodes["aatype"][lig] = rc.NUM_RESTYPES + ex.ligand_elements
    nodes["atom_positions"][res] = ex.atom_positions
    nodes["atom_positions"][lig, _CA] = ex.ligand_positions
    nodes["atom_mask"][res] = ex.atom_mask
    nodes["atom_mask"][lig, _CA] = 1.0
    for name in ("backbone_dihedrals", "sidechain_torsions", "chi_mask", "residue_index"):
      nodes[name][res] = getattr(ex, name)
    nodes["chain_id"][res] = chain0 + ex.chain_row
    nodes["chain_id"][lig] = budget.max_chains + gi
    nodes["node_kind"][lig] = 1
    # Neighbours along the chain (gaps are chain ends), else the node itself.
    idx = np.arange(node0, node0 + nr, dtype=np.int32)
    link = chain_links(ex.chain_row, ex.residue_index,
                       np.asarray(ex.atom_positions[:, _CA], np.float32),
                       np.asarray(ex.atom_mask[:, _CA], bool))
    nodes["prev_node"][res] = np.where(np.concatenate([[False], link]), idx - 1, idx)
    nodes["next_node"][res] = np.where(np.concatenate([link, [False]]), idx + 1, idx)
    run, offset = _token_map(ex, all_runs[gi], budget.window, copies)
    at = run_first[gi] + np.maximum(run, 0)
    node_to_token[res, :run.shape[1], 0] = np.where(run >= 0, plan.row[at], -1)
    node_to_token[res, :run.shape[1], 1] = np.where(run >= 0, plan.column[at] + offset + 1,
                                                   -1)
  return nodes, (node_to_token[:, 0] if copies == 1 else node_to_token)


def _token_grid(examples, budget: PaddingBudget, plan: packing.Plan):
  """(tokens, token_segments, row_graph, row_mask) of `Batch`, ESM runs placed by `plan`."""
  r, g = budget.n_row, budget.n_graph
  tokens = np.full([r, budget.row_length], rc.ESM_PAD, np.int32)
  token_segments = np.full([r, budget.row_length], -1, np.int32)
  row_graphs = [set() for _ in range(r)]
  chains_in_row = np.zeros([r], np.int32)
  runs = [(gi, ex.sequences[c][s:s + size])
          for gi, (ex, run) in enumerate(zip(examples, _runs(examples, budget.window)))
          for c, s, size in zip(*(v.tolist() for v in run))]
  for (gi, seq), row, col in zip(runs, plan.row.tolist(), plan.column.tolist()):
    tokens[row, col] = rc.ESM_CLS
    tokens[row, col + 1:col + len(seq) + 1] = rc.esm_token_ids(seq)
    tokens[row, col + len(seq) + 1] = rc.ESM_EOS
    # Runs of a row are placed left to right, so their order is their index.
    token_segments[row, col:col + len(seq) + 2] = chains_in_row[row]
    chains_in_row[row] += 1
    row_graphs[row].add(gi)
  row_graph = np.array([min(s) if len(s) == 1 else (-1 if s else g - 1)
                        for s in row_graphs], np.int32)
  return tokens, token_segments, row_graph, chains_in_row > 0


def _graph_arrays(examples, budget: PaddingBudget) -> dict[str, np.ndarray]:
  """Edges, per-graph counts and masks, labels and graph_slot_node of `Batch`."""
  n, e, g = budget.n_node, budget.n_edge, budget.n_graph
  out = {
      "senders": np.full([e], n - 1, np.int32),
      "receivers": np.full([e], n - 1, np.int32),
      "n_node": np.zeros([g], np.int32), "n_edge": np.zeros([g], np.int32),
      "node_graph": np.full([n], g - 1, np.int32), "node_mask": np.zeros([n], bool),
      "edge_mask": np.zeros([e], bool), "graph_mask": np.zeros([g], bool),
      "graph_slot_node": np.full([g - 1, budget.graph_capacity], -1, np.int32),
      "node_labels": np.zeros([n], np.float32),
      "node_label_mask": np.zeros([n], np.float32),
      "node_weights": np.zeros([n], np.float32),
      "graph_labels": np.zeros([g], np.float32),
      "graph_weights": np.zeros([g], np.float32),
  }
  starts = _starts(examples)
  for gi, (ex, (node0, edge0, _)) in enumerate(zip(examples, starts)):
    nn, ne, nr = int(ex.sizes().nodes), ex.num_edges, ex.num_residues
    edges, real, res = slice(edge0, edge0 + ne), slice(node0, node0 + nn), slice(
        node0, node0 + nr)
    out["senders"][edges] = ex.senders + node0
    out["receivers"][edges] = ex.receivers + node0
    out["edge_mask"][edges] = True
    out["node_graph"][real] = gi
    out["node_mask"][real] = True
    if budget.graph_capacity:
      out["graph_slot_node"][gi, :nn] = np.arange(node0, node0 + nn)
    out["node_labels"][res] = ex.node_labels
    out["node_label_mask"][res] = ex.node_label_mask
    out["node_weights"][res] = ex.node_weights
    out["graph_labels"][gi] = ex.graph_label
    out["graph_weights"][gi] = ex.weight
    out["graph_mask"][gi] = True
    out["n_node"][gi], out["n_edge"][gi] = nn, ne
  out["n_node"][g - 1] = n - starts[-1, 0]
  out["n_edge"][g - 1] = e - starts[-1, 1]
  return out


def collate(examples: Sequence[ProteinExample], budget: PaddingBudget) -> Batch:
  """Pads `examples` into one `Batch` of exactly `budget`'s shapes (numpy arrays).

  Chains are placed in rows by `packing.plan_batches` (the budget's layout), as the
  tf.data packer places them.

  Raises:
    ValueError: the examples do not fit the budget (names the first failing limit).
  """
  inputs = plan_inputs(examples, budget.window)
  why = packing.fits(*inputs, budget)
  if why is not None:
    ids = ", ".join(ex.id for ex in examples[:4])
    raise ValueError(f"examples [{ids}{', ...' if len(examples) > 4 else ''}] do not "
                     f"fit {budget}: {why}")
  plan = packing.plan_batches(*inputs, budget)
  nodes, node_to_token = _node_arrays(examples, budget, plan)
  tokens, token_segments, row_graph, row_mask = _token_grid(examples, budget, plan)
  x = _graph_arrays(examples, budget)
  graph = jraph.GraphsTuple(nodes=nodes, edges=None, senders=x.pop("senders"),
                            receivers=x.pop("receivers"), n_node=x.pop("n_node"),
                            n_edge=x.pop("n_edge"), globals=None)
  return Batch(tokens=tokens, token_segments=token_segments, row_graph=row_graph,
               row_mask=row_mask, graph=graph, node_to_token=node_to_token,
               packed_rows=budget.packed_rows, **x)


def inference_batches(examples: Sequence[ProteinExample], config
                      ) -> list[tuple[PaddingBudget, list[int]]]:
  """Padded batches for examples held in memory, as evaluation batches them.

  Nothing is cropped. Examples whose chains all fit data.max_residues go to the task's
  `bucket_budgets` for their sizes (at most len(data.length_buckets) + 1 shapes): each
  to the smallest budget it fits, each budget's examples packed in order by
  `packing.plan_batches`, as the tf.data packer packs a chunk; one that fits no budget
  gets a batch of its own, `budget_for` it. Examples with a longer chain go, in order,
  to batches of one `windowed_budget` (windows of `long_chain_window` residues).

  Returns:
    [(budget, indices into `examples`)], every example exactly once.
  """
  sizes = size_rows(examples)
  long = sizes[:, 1] > int(config.data.max_residues)
  short = np.flatnonzero(~long).tolist()
  budgets = budgets_lib.bucket_budgets(config, sizes[short]) if short else []
  members: dict[int, list[int]] = collections.defaultdict(list)
  alone = []
  for i in short:
    tokens = [len(s) + 2 for s in examples[i].sequences]
    fit = next((b for b, budget in enumerate(budgets) if packing.oversize(
        int(sizes[i, 0]), int(sizes[i, 3]), tokens, budget) is None), None)
    (alone if fit is None else members[fit]).append(i)
  out = []
  for b in sorted(members):
    idx = members[b]
    plan = packing.plan_batches(*plan_inputs([examples[i] for i in idx]), budgets[b])
    for k in range(plan.num_batches):
      out.append((budgets[b], [i for i, j in zip(idx, plan.batch) if j == k]))
  packed = bool(config.data.get("pack_rows", False))
  rows = math.lcm(8, budgets_lib.esm_row_multiple(config))
  for i in alone:
    out.append((budget_for([examples[i]], node_multiple=64, edge_multiple=512,
                           row_multiple=rows, packed_rows=packed), [i]))
  windowed = np.flatnonzero(long).tolist()
  if windowed:
    chosen = [examples[i] for i in windowed]
    budget = windowed_budget(chosen, long_chain_window(config), packed_rows=packed,
                             batch_size=int(config.train.batch_size))
    out += [(budget, [windowed[j] for j in group])
            for group in windowed_batches(chosen, budget)]
  return out


def long_chain_window(config) -> int:
  """Residues per ESM window for chains longer than data.max_residues in evaluation and
  prediction (`windows.window_for` of it and the config's ESM row multiple)."""
  return windows.window_for(int(config.data.max_residues),
                            budgets_lib.esm_row_multiple(config))
