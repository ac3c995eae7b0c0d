"""The one fixture source of tests and benches: synthetic proteins, batches, configs.

random_example, small_examples, synthetic_process, batch_of(examples, **budget_kw),
tiny_config(base, overrides), synthetic_dataset(budget, ...), pdb_like_lengths(n, seed, clip).
Chains are ideal α-helices (Cα on a helix of radius 2.3 Å, rise 1.5 Å and 100° per
residue, so consecutive Cα are 3.8 Å apart) with N, C, O, CB placed at fixed offsets
around each Cα; chains are translated 12 Å apart. The residue graph is the records'
own (`data.graph.radius_graph`) over residues then ligand atoms.
"""

from __future__ import annotations

import itertools
from typing import Any, Mapping, Sequence

import ml_collections
import numpy as np

from bihier_jax.common import residue_constants as rc
from bihier_jax.data import graph
from bihier_jax.data import layout
from bihier_jax.data.batch import Batch, PaddingBudget
from bihier_jax.data.example import ProteinExample

_HELIX_RADIUS = 2.3  # Å
_HELIX_RISE = 1.5  # Å per residue
_HELIX_TURN = np.deg2rad(100.0)  # per residue


def _helix_backbone(n: int, rng: np.random.Generator) -> np.ndarray:
  """float32[n, A, 3] atom layout for an ideal helix; side-chain slots 0."""
  t = np.arange(n) * _HELIX_TURN + rng.uniform(0, 2 * np.pi)
  ca = np.stack([_HELIX_RADIUS * np.cos(t), _HELIX_RADIUS * np.sin(t),
                 _HELIX_RISE * np.arange(n)], axis=-1)
  radial = np.stack([np.cos(t), np.sin(t), np.zeros(n)], -1)
  tangent = np.stack([-np.sin(t), np.cos(t), np.zeros(n)], -1)
  axis = np.array([0.0, 0.0, 1.0])
  pos = np.zeros([n, rc.NUM_ATOM_SLOTS, 3])
  pos[:, 1] = ca
  pos[:, 0] = ca - 0.8 * tangent - 0.6 * axis + 0.5 * radial  # N, ~1.46 Å from CA
  pos[:, 2] = ca + 0.8 * tangent + 0.6 * axis + 0.5 * radial  # C, ~1.52 Å from CA
  pos[:, 3] = pos[:, 2] + 1.23 * radial  # O
  pos[:, 4] = ca + 1.53 * (0.8 * radial - 0.6 * axis)  # CB
  return pos.astype(np.float32)


def random_example(n_residues: int, *, seed: int, n_chains: int = 1,
                   n_ligand: int = 0, example_id: str | None = None,
                   num_classes: int = 3, cutoff: float = graph.DEFAULT_GRAPH.cutoff,
                   max_neighbors: int = graph.DEFAULT_GRAPH.max_neighbors
                   ) -> ProteinExample:
  """A synthetic protein of `n_residues` split over `n_chains` helical chains.

  Args:
    n_residues: total residues (≥ n_chains).
    seed: makes the example reproducible.
    n_chains: chains; residues are split as evenly as possible.
    n_ligand: ligand heavy atoms placed near the protein centre (LBA-like).
    example_id: defaults to f"synthetic_{seed}".
    num_classes: node labels are drawn from 0..num_classes-1.

  Returns:
    A `ProteinExample` with all fields filled, a real radius graph and random labels.
  """
  if n_residues < n_chains or n_chains < 1:
    raise ValueError(f"need n_residues >= n_chains >= 1, got {n_residues}, {n_chains}")
  rng = np.random.default_rng(seed)
  sizes = np.full(n_chains, n_residues // n_chains)
  sizes[: n_residues % n_chains] += 1
  letters = rng.choice(list(rc.STANDARD_AA), size=n_residues)
  positions, chain_row, residue_index, sequences = [], [], [], []
  start = 0
  for c, size in enumerate(sizes):
    pos = _helix_backbone(int(size), rng)
    pos += np.array([12.0 * c, 0.0, 0.0], np.float32)
    positions.append(pos)
    chain_row.append(np.full(size, c))
    residue_index.append(np.arange(size))
    sequences.append("".join(letters[start:start + size]))
    start += size
  atom_positions = np.concatenate(positions).astype(np.float32)
  atom_mask = np.zeros([n_residues, rc.NUM_ATOM_SLOTS], bool)
  atom_mask[:, :4] = True
  atom_mask[:, 4] = letters != "G"
  atom_positions[~atom_mask] = 0.0
  ca = atom_positions[:, 1]
  ligand_positions = (ca.mean(0) + rng.normal(0, 2.0, [n_ligand, 3])).astype(np.float32)
  senders, receivers = graph.radius_graph(np.concatenate([ca, ligand_positions]),
                                          cutoff, max_neighbors)
  angles = rng.uniform(-np.pi, np.pi, [n_residues, 3])
  chi = rng.uniform(-np.pi, np.pi, [n_residues, 4])
  chi_mask = np.zeros([n_residues, 4], bool)
  return ProteinExample(
      id=example_id if example_id is not None else f"synthetic_{seed}",
      chain_ids=[chr(ord("A") + c) for c in range(n_chains)],
      sequences=sequences,
      aatype=np.array([rc.restype_index(a) for a in letters], np.int32),
      atom_positions=atom_positions,
      atom_mask=atom_mask,
      chain_row=np.concatenate(chain_row).astype(np.int32),
      residue_index=np.concatenate(residue_index).astype(np.int32),
      residue_number=(np.concatenate(residue_index) + 1).astype(np.int32),
      insertion_code=np.array([""] * n_residues, dtype=object).astype(str),
      backbone_dihedrals=np.concatenate([np.cos(angles), np.sin(angles)], -1
                                        ).astype(np.float32),
      sidechain_torsions=np.concatenate([np.sin(chi), np.cos(chi)], -1
                                        ).astype(np.float32) * 0.0,
      chi_mask=chi_mask,
      senders=senders,
      receivers=receivers,
      node_labels=rng.integers(0, num_classes, n_residues).astype(np.float32),
      node_label_mask=np.ones(n_residues, bool),
      node_weights=np.ones(n_residues, np.float32),
      graph_label=float(rng.integers(0, num_classes)),
      weight=1.0,
      group="",
      ligand_elements=rng.integers(0, len(rc.LIGAND_ELEMENTS), n_ligand).astype(np.int32),
      ligand_positions=ligand_positions,
  )


def synthetic_process(item) -> list[ProteinExample]:
  """A task `process` for tests: payload (n_residues, seed, n_chains, n_ligand).

  n_residues ≤ 0 raises ValueError (a "bad input"); picklable, no TensorFlow.
  """
  n_residues, seed, n_chains, n_ligand = item.payload
  if n_residues <= 0:
    raise ValueError(f"{item.source}: no residues")
  return [random_example(n_residues, seed=seed, n_chains=n_chains, n_ligand=n_ligand,
                         example_id=item.source)]


def small_examples() -> list[ProteinExample]:
  """Three small proteins of every kind: one chain (12), two chains (9), one chain with
  3 ligand atoms (7); the model tests' batch."""
  return [random_example(12, seed=0), random_example(9, seed=1, n_chains=2),
          random_example(7, seed=2, n_ligand=3)]


def batch_of(examples: Sequence[ProteinExample], **budget_kw) -> Batch:
  """`examples` collated into the smallest budget that holds them (numpy `Batch`).

  budget_kw go to `layout.budget_for` (n_graph, node_multiple, ...).
  """
  return layout.collate(examples, layout.budget_for(examples, **budget_kw))


def tiny_config(base: ml_collections.ConfigDict,
                overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
  """`base` (e.g. configs.default.get_config(), which this layer cannot import) with the
  test model: random `tiny` ESM-2, a 16-wide GNN of 2 blocks, 16-wide fusion and head;
  then `overrides`, dotted paths as on the command line ({"model.kind": "serial"})."""
  c = base
  c.model.esm.preset = "tiny"
  c.model.gnn.hidden = 16
  c.model.gnn.num_blocks = 2
  c.model.fusion.dim = 16
  c.model.head.hidden = 16
  for path, value in (overrides or {}).items():
    *parents, leaf = path.split(".")
    node = c
    for name in parents:
      node = node[name]
    node[leaf] = value
  return c


def synthetic_dataset(budget: PaddingBudget, *, eval_batches: int,
                      bad_from: int | None = None):
  """A `make_dataset` stand-in over synthetic proteins in `budget`: training batches
  without end, `eval_batches` in evaluation; NaN node weights from training batch
  `bad_from` on."""
  def dataset_fn(data_dir, split, config, *, training, seed, process_index=None,
                 process_count=None, skip_batches=0):
    del data_dir, process_index, process_count
    per = config.train.batch_size
    def gen():
      for i in itertools.count(skip_batches):
        if not training and i >= eval_batches:
          return
        exs = [random_example(12 + (5 * i + j) % 7, seed=seed + 31 * i + j
                              + (0 if training else 10_000)) for j in range(per)]
        batch = layout.collate(exs, budget)
        if training and bad_from is not None and i >= bad_from:
          batch = batch.replace(node_weights=np.full_like(batch.node_weights, np.nan))
        yield batch, {"ids": [e.id for e in exs], "groups": [split] * per}
    return gen()
  return dataset_fn


def pdb_like_lengths(n: int, seed: int = 0, clip: tuple[int, int] = (30, 1500)
                     ) -> np.ndarray:
  """int64[n] chain lengths fit to the PDB: lognormal, median 200 residues, log-sd 0.7,
  clipped to `clip` (ESM-2's 1,022 residues: clip=(30, 1022))."""
  lengths = np.random.default_rng(seed).lognormal(np.log(200), 0.7, n)
  return np.clip(lengths, *clip).astype(np.int64)
