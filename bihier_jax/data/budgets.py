"""Padding budgets of a task: one per ESM row-length bucket, each one compiled program.

Public: `bucket_budgets` (the budget rule), `load_sizes`, `dataset_sizes`,
`row_length_costs`, `choose_row_length`, `packing_row_length`, `esm_row_multiple`,
`round_up`. The rule (row lengths, node/edge/row counts, graph capacity, node_fill,
row_fill) and why its numbers are what they are: docs/data.md, "Padding budgets".
"""

from __future__ import annotations

from collections.abc import Sequence
import functools

from absl import logging
import numpy as np

from bihier_jax.common import esm_shapes
from bihier_jax.common import flops
from bihier_jax.common import residue_constants as rc
from bihier_jax.common import storage
from bihier_jax.data import batch_plan
from bihier_jax.data import packing
from bihier_jax.data.batch import PaddingBudget
from bihier_jax.data.example import ExampleSizes
from bihier_jax.data.graph import DEFAULT_GRAPH

GRAPH_CAPACITY_MULTIPLE = 16
DEFAULT_ROW_LENGTHS = (256, 384, 512, 768, 1024)  # candidates of choose_row_length
_ROW_FILL = 0.9
_CHOOSE_MAX_EXAMPLES = 8192  # sizes simulated by choose_row_length (random subset)
_COLUMNS = len(ExampleSizes._fields)  # a sizes.json row


def round_up(x, m) -> int:
  """x rounded up to a multiple of m."""
  return int(-(-int(x) // m) * m)


def load_sizes(data_dir: str, split: str) -> np.ndarray | None:
  """int[n, 4] `ExampleSizes` per example of a split (its sizes.json), or None."""
  path = storage.join(data_dir, split, "sizes.json")
  if not storage.exists(path):
    return None
  return np.asarray(storage.read_json(path), np.int64).reshape(-1, _COLUMNS)


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
  """Budgets for row `lengths` (ascending) by the budget rule (docs/data.md)."""
  batch, max_res, k = int(batch_size), int(max_residues), int(max_neighbors)
  if node_fill is None:
    node_fill = 1.0 if packed_rows else 0.9
  lengths = sorted(set(int(b) for b in lengths))
  has_sizes = sizes is not None and len(sizes)
  if has_sizes:
    raw = np.asarray(sizes, np.int64).reshape(-1, _COLUMNS)
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
      capacity = round_up(capacity_nodes[member].max(), GRAPH_CAPACITY_MULTIPLE)
    else:
      mean_nodes = 0.75 * (length - 2)
      max_nodes = length - 2
      degree, n_row, capacity = k, batch, 0
    n_node = round_up(max(node_fill * batch * mean_nodes, max_nodes) + 1, node_multiple)
    if batch * (2 * capacity) ** 2 >= (2 * n_node) ** 2:
      capacity = 0
    budgets.append(PaddingBudget(
        n_node=n_node, n_edge=round_up(max(degree * n_node, 1), node_multiple),
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
                     max_residues: int = rc.ESM_MAX_RESIDUES,
                     length_buckets: Sequence[int] = (128, 256, 512, 1024),
                     max_neighbors: int = DEFAULT_GRAPH.max_neighbors,
                     chunk_size: int | None = None,
                     max_examples: int = _CHOOSE_MAX_EXAMPLES, seed: int = 0
                     ) -> dict[int, dict]:
  """What each packing row length costs, simulated with the packer on `sizes`.

  For each candidate L (capped at max_residues + 2): the packed budgets (L, then the
  length buckets above it), one simulated pass of `packing.simulate`, and its matmul
  FLOPs of one ESM-2 layer forward, `flops.esm_matmul_flops` per token slot of every
  row of every batch, over its real tokens.

  Args:
    sizes: int[n, 4] `ExampleSizes` rows per example (sizes.json);
      at most max_examples of them (a random subset) are simulated.
    embed_dim, ffn_dim: the ESM-2 model's D and F.

  Returns:
    {L: {"flops_per_real_token", "token_efficiency" (real tokens / token slots),
    "attention_efficiency" (real same-chain (query, key) pairs / score entries),
    "proteins_per_batch", "budgets": [PaddingBudget]}}.
  """
  sizes = np.asarray(sizes, np.int64).reshape(-1, _COLUMNS)
  if len(sizes) > max_examples:
    sizes = sizes[np.random.default_rng(seed).choice(len(sizes), max_examples,
                                                     replace=False)]
  max_res = int(max_residues)
  buckets = sorted({min(int(b), max_res + 2) for b in length_buckets} | {max_res + 2})
  chunk = chunk_size or batch_plan.default_chunk_size(batch_size)
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
  esm = esm_shapes.architecture(config.model.esm.preset)
  sizes = np.ascontiguousarray(sizes, np.int64).reshape(-1, _COLUMNS)
  return _choose_row_length_cached(
      sizes.tobytes(), esm.embed_dim, esm.ffn_dim, int(config.train.batch_size), max_res,
      tuple(int(b) for b in config.data.length_buckets), int(config.data.max_neighbors))


@functools.lru_cache(maxsize=8)
def _choose_row_length_cached(sizes_bytes: bytes, embed_dim: int, ffn_dim: int,
                              batch_size: int, max_residues: int,
                              length_buckets: tuple[int, ...], max_neighbors: int) -> int:
  """`choose_row_length` once per (sizes, model, config): a run builds its budgets for
  every stream and the epoch estimate, and the choice takes seconds."""
  sizes = np.frombuffer(sizes_bytes, np.int64).reshape(-1, _COLUMNS)
  return choose_row_length(sizes, embed_dim, ffn_dim, batch_size=batch_size,
                           max_residues=max_residues, length_buckets=length_buckets,
                           max_neighbors=max_neighbors)


def esm_row_multiple(config) -> int:
  """The multiple every ESM row length of `config` is rounded up to: the Pallas
  kernels' block when model.esm.attention names one (`esm_shapes.pallas_row_multiple`: 128
  for splash and flash_gpu), else 1."""
  model = config.get("model")
  kind = model.esm.get("attention", "auto") if model and "esm" in model else "auto"
  return esm_shapes.pallas_row_multiple(str(kind))


def bucket_budgets(config, sizes: np.ndarray | None = None, *,
                   node_fill: float | None = None, node_multiple: int = 128
                   ) -> list[PaddingBudget]:
  """The fixed budgets of a task (the budget rule: docs/data.md), smallest first.

  Every row length is rounded up to `esm_row_multiple(config)` (128 with a Pallas
  attention kernel, so the rows, the init sample batch's included, fill whole blocks).

  Args:
    config: uses data.length_buckets, data.max_residues, data.max_neighbors,
      data.pack_rows (missing = False), data.row_length, model.esm.preset (packed with
      data.row_length = 0), model.esm.attention and train.batch_size.
    sizes: int[n, 4] `ExampleSizes` rows, e.g. the train
      split's `load_sizes`; chains longer than max_residues are counted as cropped.
    node_fill: default 0.9 unpacked, 1.0 packed.
  """
  lengths = _config_lengths(config)
  packed = bool(config.data.get("pack_rows", False))
  if packed:
    row = packing_row_length(config, sizes)
    lengths = [row] + [b for b in lengths if b > row]
  multiple = esm_row_multiple(config)
  lengths = sorted({round_up(b, multiple) for b in lengths})
  return _budgets(sizes, lengths, batch_size=int(config.train.batch_size),
                  max_residues=int(config.data.max_residues),
                  max_neighbors=int(config.data.max_neighbors), packed_rows=packed,
                  node_fill=node_fill, node_multiple=node_multiple)

