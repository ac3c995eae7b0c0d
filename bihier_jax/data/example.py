"""`ProteinExample`: one training example on the host, as stored in a shard record;
`ExampleSizes`: its sizes, a row of sizes.json.

One example is one protein (one or more chains), a protein–ligand complex (LBA), or one
decoy (MQA). It is what every task's preprocessing produces and what the input pipeline
pads into a `Batch`. All arrays are numpy. Residues ("nodes") of all chains are
concatenated in chain order, then file order within a chain.

Shapes: n = residues, e = directed graph edges, m = ligand atoms (0 unless LBA),
A = `residue_constants.NUM_ATOM_SLOTS` (9), c = chains.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np


class ExampleSizes(NamedTuple):
  """Sizes of one example: a row of <split>/sizes.json, in this column order."""
  nodes: int  # residues + ligand atoms
  longest_chain: int  # residues of its longest chain's sequence (no <cls>/<eos>)
  chains: int
  edges: int


@dataclasses.dataclass
class ProteinExample:
  """A protein (or complex) ready for batching.

  Attributes:
    id: unique id within its dataset, e.g. "1abc_A", "('T0759', 'server_TS1')".
    chain_ids: [c] author chain ids; chain row r of the ESM grid is chain_ids[r].
    sequences: [c] one-letter sequences fed to ESM-2, one per chain row. Every residue
      node points into one of them (chain_row, residue_index); a sequence may contain
      residues that have no node (e.g. unresolved), never the reverse.
    aatype: int32[n] residue type, index into `residue_constants.RESTYPES` (0..25).
    atom_positions: float32[n, A, 3] coordinates in Å, layout `ATOM_NAMES`; 0 if absent.
    atom_mask: bool[n, A] atom present.
    chain_row: int32[n] index into `sequences` of each residue's chain.
    residue_index: int32[n] 0-based position of the residue in its chain's sequence
      (ESM token column = residue_index + 1, after <cls>).
    residue_number: int32[n] author residue number.
    insertion_code: str array [n] author insertion code, "" if none.
    backbone_dihedrals: float32[n, 6] [cos φ, cos ψ, cos ω, sin φ, sin ψ, sin ω]
      (0 where undefined: φ of a chain's first residue, ψ and ω of its last, or across
      a chain break).
    sidechain_torsions: float32[n, 8] [sin χ1..χ4, cos χ1..χ4], 0 where undefined.
    chi_mask: bool[n, 4] χk defined (residue has it and its atoms are present).
    senders, receivers: int32[e] graph, messages flow sender -> receiver; nearest
      ≤ max_neighbors within cutoff by Cα (ligand atoms by their own position), no self
      edges. Indices into the node list [residues (n), then ligand atoms (m)].
    node_labels: float32[n] per-residue label (class index or 0/1), 0 where unlabelled.
    node_label_mask: bool[n] residue has a label.
    node_weights: float32[n] per-residue loss/metric weight (ScanNet chain weight), 1 by
      default.
    graph_label: float32[] per-example label (class index, GDT_TS, pK), 0 if none.
    weight: float32 example weight.
    group: str grouping key for metrics (MQA target, PPBS subset, BCE fold), "" if none.
    ligand_elements: int32[m] element index (`residue_constants.LIGAND_ELEMENTS`).
    ligand_positions: float32[m, 3] ligand heavy-atom coordinates in Å.
  """

  id: str
  chain_ids: list[str]
  sequences: list[str]
  aatype: np.ndarray
  atom_positions: np.ndarray
  atom_mask: np.ndarray
  chain_row: np.ndarray
  residue_index: np.ndarray
  residue_number: np.ndarray
  insertion_code: np.ndarray
  backbone_dihedrals: np.ndarray
  sidechain_torsions: np.ndarray
  chi_mask: np.ndarray
  senders: np.ndarray
  receivers: np.ndarray
  node_labels: np.ndarray
  node_label_mask: np.ndarray
  node_weights: np.ndarray
  graph_label: float = 0.0
  weight: float = 1.0
  group: str = ""
  ligand_elements: np.ndarray = dataclasses.field(
      default_factory=lambda: np.zeros([0], np.int32))
  ligand_positions: np.ndarray = dataclasses.field(
      default_factory=lambda: np.zeros([0, 3], np.float32))

  @property
  def num_residues(self) -> int:
    return int(self.aatype.shape[0])

  @property
  def num_edges(self) -> int:
    return int(self.senders.shape[0])

  def sizes(self) -> ExampleSizes:
    return ExampleSizes(
        nodes=self.num_residues + int(self.ligand_elements.shape[0]),
        longest_chain=max((len(s) for s in self.sequences), default=0),
        chains=len(self.sequences), edges=self.num_edges)
