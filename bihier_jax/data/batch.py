"""`Batch`: the one padded, static-shaped input of every model kind.

Built on the host by the input pipeline from `ProteinExample`s (numpy arrays), then put
on devices. Shapes are fixed by a `PaddingBudget`; each budget is one compiled program.

Padding conventions (jraph's): the last graph (index G-1) is the padding graph, owning
every padding node; padding edges connect padding node N-1 to itself. Padding rows of
the token grid are all `<pad>`. Everything a model reads is multiplied by the masks, so
padded values never reach real outputs.

Two layouts of the ESM token grid (`PaddingBudget.packed_rows`, `data.pack_rows`):
unpacked, one chain per row; packed, several chains per row back to back, each
`<cls> seq <eos>`, a chain never split over two rows (`bihier_jax.data.packing`).
`token_segments` tells the chains of a row apart in both.

Shapes: R = ESM rows, L = token length of a row incl. <cls>/<eos>, N = nodes,
E = edges, G = graphs (proteins + 1 padding graph), P = graph capacity (nodes of one
graph in the per-graph layout), A = 9 atom slots.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jraph


@dataclasses.dataclass(frozen=True)
class PaddingBudget:
  """Static shapes of one compiled program, and the row layout its batches use."""
  n_node: int  # N, incl. at least one padding node
  n_edge: int  # E
  n_graph: int  # G, incl. the padding graph
  n_row: int  # R
  row_length: int  # L
  # P: most nodes of one protein; every example of the budget has at most P nodes, and
  # `Batch.graph_slot_node` lays the nodes out as [G-1, P]. 0 = no per-graph layout.
  graph_capacity: int = 0
  # Several chains per ESM row (a layout, not a shape: both layouts run one program).
  packed_rows: bool = False
  # K: the most ESM windows one residue is in. 1: every chain is one `<cls> seq <eos>`
  # run and node_to_token is [N, 2]. K > 1: a windowed budget; chains longer than
  # `window` residues are read in overlapping windows (`data.windows`) and node_to_token
  # is [N, K, 2].
  token_copies: int = 1

  @property
  def window(self) -> int:
    """Residues per ESM window (row_length - 2) of a windowed budget, else 0."""
    return self.row_length - 2 if self.token_copies > 1 else 0

  @property
  def max_chains(self) -> int:
    """Most chains a batch can hold: one per row, or, packed, R·⌊L/2⌋ (a chain takes at
    least its <cls> and <eos>). Ligand atoms of graph g have chain id max_chains + g."""
    return self.n_row * (self.row_length // 2) if self.packed_rows else self.n_row


@flax.struct.dataclass
class Batch:
  """A padded batch of proteins.

  Attributes:
    tokens: int32[R, L] ESM-2 tokens: each chain `<cls> seq <eos>`, one chain per row
      (unpacked) or several back to back (packed), then `<pad>`; padding rows `<pad>`.
    token_segments: int32[R, L] index of each token's chain within its row (0, 1, ... in
      column order; a chain's `<cls> seq <eos>` is one run of one id), -1 at `<pad>`.
      Unpacked, 0 at every real token.
    row_graph: int32[R] graph of the chains of each row if they all belong to one
      protein (always so unpacked), -1 if a packed row holds chains of several
      proteins, G-1 for rows without a chain.
    row_mask: bool[R] the row holds at least one chain.
    graph: jraph.GraphsTuple with
      nodes: dict of
        aatype int32[N] (0..25, ligand atoms 26+element), atom_positions float32[N, A, 3]
        (Å), atom_mask float32[N, A], backbone_dihedrals float32[N, 6],
        sidechain_torsions float32[N, 8], chi_mask float32[N, 4],
        prev_node int32[N], next_node int32[N] (index of residue i-1 / i+1 of the same
        chain; the node itself at chain ends, at gaps (residue_index not consecutive
        or Cα–Cα > 4.2 Å: `layout.chain_links`) and for padding/ligand nodes),
        residue_index int32[N] (position in its chain), chain_id int32[N] (unique per
        chain within the batch: a residue's is its chain's index in the batch, examples'
        chains in order, i.e. its ESM row when unpacked; the ligand atoms of graph g
        share `budget.max_chains + g`; -1 for padding), node_kind int32[N] (0 residue,
        1 ligand atom);
      edges: None (edge features are computed inside the model from coordinates);
      senders, receivers int32[E]; n_node, n_edge int32[G]; globals None.
    node_to_token: int32[N, 2] (row, column) of each residue node in `tokens`; (-1, -1)
      for padding and ligand nodes. Consumers clamp and mask. In a windowed batch
      (`PaddingBudget.token_copies` K > 1) int32[N, K, 2]: the residue's token in every
      window that holds it, the one it reads first, (-1, -1) after its last copy.
    graph_slot_node: int32[G-1, P] node index of slot p of real-graph slot g (graph g's
      nodes in order, then -1); the padding graph G-1 has no slots. P =
      `budget.graph_capacity` (0: [G-1, 0], no per-graph layout).
    node_graph: int32[N] graph index of each node (segment ids for pooling).
    node_mask: bool[N] real node; edge_mask: bool[E]; graph_mask: bool[G] real graph.
    node_labels: float32[N]; node_label_mask: float32[N] (0 on padding/unlabelled);
    node_weights: float32[N].
    graph_labels: float32[G]; graph_weights: float32[G] (0 on padding graph).
    packed_rows: static bool, the layout of `tokens` (the budget's `packed_rows`).
  """

  tokens: Any
  token_segments: Any
  row_graph: Any
  row_mask: Any
  graph: jraph.GraphsTuple
  node_to_token: Any
  node_graph: Any
  node_mask: Any
  edge_mask: Any
  graph_mask: Any
  node_labels: Any
  node_label_mask: Any
  node_weights: Any
  graph_labels: Any
  graph_weights: Any
  graph_slot_node: Any
  packed_rows: bool = flax.struct.field(pytree_node=False, default=False)

  @property
  def budget(self) -> PaddingBudget:
    # node_to_token has one more axis than node_mask (the pair), two when windowed.
    windowed = self.node_to_token.ndim - self.node_mask.ndim == 2
    return PaddingBudget(
        n_node=int(self.node_mask.shape[-1]), n_edge=int(self.edge_mask.shape[-1]),
        n_graph=int(self.graph_mask.shape[-1]), n_row=int(self.tokens.shape[-2]),
        row_length=int(self.tokens.shape[-1]),
        graph_capacity=int(self.graph_slot_node.shape[-1]), packed_rows=self.packed_rows,
        token_copies=int(self.node_to_token.shape[-2]) if windowed else 1)
