"""Which examples share a padded batch, where each chain sits in its ESM rows; the fit rule.

Public: `plan_batches` -> `Plan` (unpacked: next fit, one chain per row; packed: first
fit of each chain over its batch's rows and of each example over the chunk's batches),
`oversize` / `fits` / `limits` (does an example alone, or a batch, fit a budget), and
the simulation on sizes.json (`cropped_sizes`, `chain_lengths`, `assign_buckets`,
`simulate`). One implementation for `layout.collate`, the batch plan, the epoch estimate
and the row-length choice. A batch's examples keep the order they joined it in, so
`collate` of them places every chain where the tf.data packer does. Sizes are token
counts: a chain of n residues takes n + 2 (`<cls>`, `<eos>`). The rule and why first
fit: docs/data.md, "Packed rows".
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses

import numpy as np

from bihier_jax.data.batch import PaddingBudget


@dataclasses.dataclass(frozen=True)
class Plan:
  """Where the examples of one packing call go.

  Attributes:
    batch: int32[M] batch of each example, 0.. in the order batches were opened; a
      batch's examples are in input order.
    row: int32[K] row of each chain (examples' chains in order) within its batch.
    column: int32[K] column of the chain's `<cls>` token in that row.
  """
  batch: np.ndarray
  row: np.ndarray
  column: np.ndarray

  @property
  def num_batches(self) -> int:
    return int(self.batch.max(initial=-1)) + 1


# What one example alone needs of a budget, in the order of `limits` and `_needs`.
_LIMITS = ("nodes (one kept for padding)", "edges", "ESM rows", "ESM row length",
           "nodes of one graph (graph_capacity)")


def limits(budget: PaddingBudget) -> np.ndarray:
  """int64[5]: the most (nodes, edges, chains, tokens of the longest chain, nodes) one
  example may have to fit `budget` alone (the last: graph_capacity, if any)."""
  return np.array([budget.n_node - 1, budget.n_edge, budget.n_row, budget.row_length,
                   budget.graph_capacity or np.iinfo(np.int64).max], np.int64)


def _needs(nodes, edges, chains, longest_tokens, graph_nodes=None) -> np.ndarray:
  """int64[..., 5]: what examples need of `limits` (arguments scalars or int[n]);
  graph_nodes: the nodes of the largest graph (default `nodes`)."""
  graph_nodes = nodes if graph_nodes is None else graph_nodes
  return np.stack(np.broadcast_arrays(nodes, edges, chains, longest_tokens, graph_nodes),
                  -1).astype(np.int64)


def _first_over(need: np.ndarray, budget: PaddingBudget) -> str | None:
  """The first limit of `budget` that `need` (int64[5]) exceeds, as a message."""
  for need_k, have, what in zip(need.tolist(), limits(budget).tolist(), _LIMITS):
    if need_k > have:
      return f"{what}: need {need_k}, budget has {have}"
  return None


def oversize(nodes: int, edges: int, chain_tokens: Sequence[int],
             budget: PaddingBudget) -> str | None:
  """Why one example alone does not fit `budget` (None if it does).

  Alone, an example fits if its chains fit one per row; packing can only do better.
  """
  return _first_over(_needs(nodes, edges, len(chain_tokens), max(chain_tokens, default=2)),
                     budget)


def fits(nodes: np.ndarray, edges: np.ndarray, num_chains: np.ndarray,
         chain_tokens: np.ndarray, budget: PaddingBudget) -> str | None:
  """Why examples of these sizes (as `plan_batches` takes them) do not fit one batch of
  `budget` together, in order (None if they do)."""
  nodes, edges, num_chains, chain_tokens = (np.asarray(v, np.int64).reshape(-1) for v in (
      nodes, edges, num_chains, chain_tokens))
  if len(nodes) > budget.n_graph - 1:
    return (f"graphs (one kept for padding): need {len(nodes)}, budget has "
            f"{budget.n_graph - 1}")
  # Packed, the rows are checked by the plan below; one example's chains need their count.
  rows = num_chains.max(initial=0) if budget.packed_rows else num_chains.sum()
  why = _first_over(_needs(nodes.sum(), edges.sum(), rows, chain_tokens.max(initial=2),
                           nodes.max(initial=0)), budget)
  if why is not None:
    return why
  if (budget.packed_rows
      and plan_batches(nodes, edges, num_chains, chain_tokens, budget).num_batches > 1):
    return (f"ESM rows: the chains do not fit {budget.n_row} rows of {budget.row_length} "
            "tokens, placed first-fit in order")
  return None


def _first_fit(free: np.ndarray, tokens: np.ndarray) -> list[int] | None:
  """Rows (first fit, in order) for chains of `tokens` given each row's free slots."""
  free = free.copy()
  rows = []
  for t in tokens.tolist():
    r = int(np.argmax(free >= t))
    if free[r] < t:
      return None
    free[r] -= t
    rows.append(r)
  return rows


def plan_batches(nodes: np.ndarray, edges: np.ndarray, num_chains: np.ndarray,
                 chain_tokens: np.ndarray, budget: PaddingBudget) -> Plan:
  """Batches of `budget` for examples in order, and the place of every chain.

  Args:
    nodes: int[M] nodes (residues + ligand atoms) of each example.
    edges: int[M] edges of each example.
    num_chains: int[M] chains (ESM sequences) of each example.
    chain_tokens: int[sum(num_chains)] tokens of each chain incl. `<cls>`/`<eos>`,
      the examples' chains in order.
    budget: limits (one node and one graph are kept for padding) and the row layout.

  Returns:
    The `Plan` (see the module docstring for the rule of each layout).

  Raises:
    ValueError: an example alone exceeds the budget.
  """
  nodes = np.asarray(nodes, np.int64).reshape(-1)
  edges = np.asarray(edges, np.int64).reshape(-1)
  num_chains = np.asarray(num_chains, np.int64).reshape(-1)
  chain_tokens = np.asarray(chain_tokens, np.int64).reshape(-1)
  m = len(nodes)
  first = np.concatenate([[0], np.cumsum(num_chains)])
  if first[-1] != len(chain_tokens):
    raise ValueError(f"{len(chain_tokens)} chain sizes for {first[-1]} chains")
  n_lim, e_lim, g_lim = budget.n_node - 1, budget.n_edge, budget.n_graph - 1
  r_lim, length = budget.n_row, budget.row_length
  longest = np.zeros(m, np.int64)
  if len(chain_tokens):
    owner = np.repeat(np.arange(m), num_chains)
    np.maximum.at(longest, owner, chain_tokens)
  over = (_needs(nodes, edges, num_chains, longest) > limits(budget)).any(-1)
  if over.any():
    i = int(np.argmax(over))
    why = oversize(int(nodes[i]), int(edges[i]), chain_tokens[first[i]:first[i + 1]],
                   budget)
    raise ValueError(f"example {i} alone exceeds {budget}: {why}")
  batch = np.zeros(m, np.int32)
  row = np.zeros(len(chain_tokens), np.int32)
  column = np.zeros(len(chain_tokens), np.int32)
  if not budget.packed_rows:
    b = n = e = r = g = 0
    for i, (dn, de, dr) in enumerate(zip(nodes.tolist(), edges.tolist(),
                                         num_chains.tolist())):
      if g and (g >= g_lim or n + dn > n_lim or e + de > e_lim or r + dr > r_lim):
        b += 1
        n = e = r = g = 0
      batch[i] = b
      row[first[i]:first[i + 1]] = r + np.arange(dr)
      n, e, r, g = n + dn, e + de, r + dr, g + 1
    return Plan(batch, row, column)

  # Packed. Per batch opened so far (at most one per example): the room left for nodes,
  # edges and graphs and the widest row's free slots, and every row's free slots.
  room = np.zeros((max(m, 1), 4), np.int64)
  free = np.full((max(m, 1), r_lim), length, np.int64)
  opened = 0
  tokens_of = chain_tokens.tolist()
  for i, (dn, de, dc, dl) in enumerate(zip(nodes.tolist(), edges.tolist(),
                                           num_chains.tolist(), longest.tolist())):
    tokens = tokens_of[first[i]:first[i + 1]]
    rows = None
    if opened:
      ok = (room[:opened] >= (dn, de, 1, dl)).all(1)
      for b in (np.flatnonzero(ok).tolist() if dc > 1 else
                ([int(np.argmax(ok))] if ok.any() else [])):
        # One chain: the widest row has room, so the first row with room exists.
        rows = ([int(np.argmax(free[b] >= dl))] if dc == 1 else
                _first_fit(free[b], np.asarray(tokens)))
        if rows is not None:
          break
    if rows is None:
      b = opened
      opened += 1
      room[b] = (n_lim, e_lim, g_lim, length)
      rows = _first_fit(free[b], np.asarray(tokens, np.int64))
    for c, (r, t) in enumerate(zip(rows, tokens)):
      column[first[i] + c] = length - free[b, r]
      row[first[i] + c] = r
      free[b, r] -= t
    room[b] -= (dn, de, 1, 0)
    room[b, 3] = free[b].max()
    batch[i] = b
  return Plan(batch, row, column)


# --- simulation on sizes.json -----------------------------------------------------------
#
# sizes.json has, per example, its `ExampleSizes`: the length of every
# chain is known for single-chain examples only. For several chains the others are taken
# as equal, (nodes - longest) / (chains - 1) residues each, between 1 and the longest:
# exact in total for complexes whose residues are all nodes, short for pockets (LBA),
# whose chains have many residues without a node.


def cropped_sizes(sizes: np.ndarray, max_residues: int) -> tuple[np.ndarray, np.ndarray]:
  """Sizes after cropping chains to `max_residues`, as the packer will see them.

  Cropping drops `excess` nodes when every residue of the chain is a node (exact for one
  chain); when the nodes are a few residues of a long chain (an LBA pocket), the window
  keeps them all (`tf_packer.crop_chunk`), so the example keeps all its nodes. Edges are
  scaled with the nodes.

  Args:
    sizes: int[n, 4] `ExampleSizes` rows per example.

  Returns:
    (sizes int[n, 4] after cropping, long bool[n]: the example is cropped).
  """
  sizes = np.asarray(sizes, np.int64).reshape(-1, 4)
  nodes, longest, chains, edges = (sizes[:, i] for i in range(4))
  long = longest > max_residues
  excess = np.maximum(longest - max_residues, 0)
  cropped = nodes - excess
  crop_nodes = np.where(cropped >= np.minimum(nodes, max_residues), cropped, nodes)
  crop_edges = np.round(edges * crop_nodes / np.maximum(nodes, 1)).astype(np.int64)
  out = np.stack([np.where(long, crop_nodes, nodes), np.minimum(longest, max_residues),
                  chains, np.where(long, crop_edges, edges)], 1)
  return out, long


def chain_lengths(sizes: np.ndarray) -> np.ndarray:
  """int[sum chains] residues of each chain, estimated as above (longest chain first).

  Args:
    sizes: int[n, 4] `ExampleSizes` rows, e.g. after `cropped_sizes`.
  """
  sizes = np.asarray(sizes, np.int64).reshape(-1, 4)
  nodes, longest, chains = sizes[:, 0], sizes[:, 1], np.maximum(sizes[:, 2], 1)
  others = np.clip(np.round((nodes - longest) / np.maximum(chains - 1, 1)), 1,
                   np.maximum(longest, 1)).astype(np.int64)
  owner = np.repeat(np.arange(len(sizes)), chains)
  is_first = np.concatenate([[True], owner[1:] != owner[:-1]]) if len(owner) else owner
  return np.where(is_first, longest[owner], others[owner])


def assign_buckets(sizes: np.ndarray, long: np.ndarray,
                   budgets: Sequence[PaddingBudget]) -> np.ndarray:
  """int[n] budget of each example: the first it fits alone; cropped ones the last.

  Args:
    sizes: int[n, 4] after `cropped_sizes`; long: bool[n] cropped (to the last budget,
      whose row length holds max_residues + 2).

  Raises:
    ValueError: an example fits no budget.
  """
  nodes, longest, chains, edges = (sizes[:, i] for i in range(4))
  table = np.stack([limits(b) for b in budgets])
  need = _needs(nodes, edges, chains, longest + 2)
  has_slot = np.array([b.n_graph >= 2 for b in budgets])  # a graph besides the padding one
  fits = (need[:, None, :] <= table[None]).all(-1) & has_slot[None]
  fits[long] = np.arange(len(budgets))[None] == len(budgets) - 1
  if not fits.any(1).all():
    bad = np.flatnonzero(~fits.any(1))[:4]
    raise ValueError(f"examples {bad.tolist()} fit no padding budget: sizes "
                     f"{sizes[bad].tolist()}")
  return fits.argmax(1)


@dataclasses.dataclass(frozen=True)
class SimulatedBatches:
  """Per padded batch of a simulated pass (arrays of one entry per batch).

  Attributes:
    budget: int[B] index of its budget.
    proteins: int[B] real graphs.
    nodes: int[B] real nodes.
    tokens: int[B] real ESM tokens (incl. `<cls>`/`<eos>`).
    pairs: int[B] real (query, key) pairs: the sum over chains of tokens².
  """
  budget: np.ndarray
  proteins: np.ndarray
  nodes: np.ndarray
  tokens: np.ndarray
  pairs: np.ndarray

  def __len__(self) -> int:
    return len(self.budget)


def simulate(sizes: np.ndarray, budgets: Sequence[PaddingBudget], *, max_residues: int,
             chunk_size: int, process_count: int = 1, seed: int = 0) -> SimulatedBatches:
  """The batches one random-order pass over `sizes` gives, over all hosts.

  Hosts take every process_count-th record of a random order, as the pipeline does; each
  host packs chunks of `chunk_size` records bucket by bucket with `plan_batches`, in
  chunk order (the last bucket: uncropped examples, then cropped ones), as `make_dataset`
  does.

  Args:
    sizes: int[n, 4] `ExampleSizes` rows as in sizes.json (uncropped).
  """
  sizes, long = cropped_sizes(sizes, max_residues)
  bucket = assign_buckets(sizes, long, budgets)
  lengths = chain_lengths(sizes)
  first = np.concatenate([[0], np.cumsum(sizes[:, 2])])
  order = np.random.default_rng(seed).permutation(len(sizes))
  out = {k: [] for k in ("budget", "proteins", "nodes", "tokens", "pairs")}
  for host in range(process_count):
    mine = order[host::process_count]
    for start in range(0, len(mine), chunk_size):
      chunk = mine[start:start + chunk_size]
      for k, budget in enumerate(budgets):
        members = chunk[bucket[chunk] == k]
        if k == len(budgets) - 1:
          members = np.concatenate([members[~long[members]], members[long[members]]])
        if not len(members):
          continue
        chain_sel = np.concatenate([np.arange(first[i], first[i + 1]) for i in members])
        tokens = lengths[chain_sel] + 2
        # Scaled edges of a crop may exceed what fits; the real crop drops those edges.
        plan = plan_batches(np.minimum(sizes[members, 0], budget.n_node - 1),
                            np.minimum(sizes[members, 3], budget.n_edge),
                            sizes[members, 2], tokens, budget)
        nb = plan.num_batches
        chain_batch = np.repeat(plan.batch, sizes[members, 2])
        out["budget"].append(np.full(nb, k))
        out["proteins"].append(np.bincount(plan.batch, minlength=nb))
        out["nodes"].append(np.bincount(plan.batch, sizes[members, 0], minlength=nb))
        out["tokens"].append(np.bincount(chain_batch, tokens, minlength=nb))
        out["pairs"].append(np.bincount(chain_batch, tokens.astype(np.float64) ** 2,
                                        minlength=nb))
  return SimulatedBatches(**{k: (np.concatenate(v) if v else np.zeros([0])).astype(np.int64)
                             for k, v in out.items()})
