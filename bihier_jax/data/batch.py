"""`Batch`: the one padded, static-shaped input of every model kind.

Built on the host by the input pipeline from `ProteinExample`s (numpy arrays), then put
on devices. Shapes are fixed by a `PaddingBudget`; each budget is one compiled program.

Padding conventions (jraph's): the last graph (index G-1) is the padding graph, owning
every padding node; padding edges connect padding node N-1 to itself. Padding rows of
the token grid are all `<pad>`. Everything a model reads is multiplied by the masks, so
padded values never reach real outputs.

Shapes: R = ESM rows (chains), L = token length incl. <cls>/<eos>, N = nodes,
E = edges, G = graphs (proteins + 1 padding graph), A = 9 atom slots.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax.numpy as jnp
import jraph


@dataclasses.dataclass(frozen=True)
class PaddingBudget:
  """Static shapes of one compiled program."""
  n_node: int  # N, incl. at least one padding node
  n_edge: int  # E
  n_graph: int  # G, incl. the padding graph
  n_row: int  # R
  row_length: int  # L


@flax.struct.dataclass
class Batch:
  """A padded batch of proteins.

  Attributes:
    tokens: int32[R, L] ESM-2 tokens, `<cls> seq <eos> <pad>...`; padding rows `<pad>`.
    row_graph: int32[R] graph of each row (padding rows -> G-1).
    row_mask: bool[R] real row.
    graph: jraph.GraphsTuple with
      nodes: dict of
        aatype int32[N] (0..25, ligand atoms 26+element), atom_positions float32[N, A, 3]
        (Å), atom_mask float32[N, A], backbone_dihedrals float32[N, 6],
        sidechain_torsions float32[N, 8], chi_mask float32[N, 4],
        prev_node int32[N], next_node int32[N] (index of residue i-1 / i+1 of the same
        chain; the node itself at chain ends, at gaps (residue_index not consecutive
        or Cα–Cα > 4.2 Å: `input_pipeline.linked_to_next`) and for padding/ligand nodes),
        residue_index int32[N] (position in its chain), chain_id int32[N] (unique per
        chain within the batch, -1 for padding), node_kind int32[N] (0 residue,
        1 ligand atom);
      edges: None (edge features are computed inside the model from coordinates);
      senders, receivers int32[E]; n_node, n_edge int32[G]; globals None.
    node_to_token: int32[N, 2] (row, column) of each residue node in `tokens`; (-1, -1)
      for padding and ligand nodes. Consumers clamp and mask.
    node_graph: int32[N] graph index of each node (segment ids for pooling).
    node_mask: bool[N] real node; edge_mask: bool[E]; graph_mask: bool[G] real graph.
    node_labels: float32[N]; node_label_mask: float32[N] (0 on padding/unlabelled);
    node_weights: float32[N].
    graph_labels: float32[G]; graph_weights: float32[G] (0 on padding graph).
  """

  tokens: Any
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

  @property
  def budget(self) -> PaddingBudget:
    return PaddingBudget(
        n_node=int(self.node_mask.shape[-1]), n_edge=int(self.edge_mask.shape[-1]),
        n_graph=int(self.graph_mask.shape[-1]), n_row=int(self.tokens.shape[-2]),
        row_length=int(self.tokens.shape[-1]))


def gather_tokens(hidden, node_to_token):
  """Per-node ESM features from a token grid.

  Args:
    hidden: [R, L, D] ESM hidden states.
    node_to_token: int32[N, 2] (row, column); negative for nodes without a token.

  Returns:
    [N, D], zero for nodes without a token.
  """
  rows, cols = node_to_token[:, 0], node_to_token[:, 1]
  valid = (rows >= 0)[:, None]
  out = hidden[jnp.maximum(rows, 0), jnp.maximum(cols, 0)]
  return jnp.where(valid, out, jnp.zeros_like(out))


def scatter_to_tokens(values, node_to_token, grid_shape):
  """Adds per-node values into a token grid (inverse of `gather_tokens`).

  Args:
    values: [N, D] per-node values.
    node_to_token: int32[N, 2]; nodes with negative rows contribute nothing.
    grid_shape: (R, L).

  Returns:
    [R, L, D] grid, zero at tokens no node maps to.
  """
  rows, cols = node_to_token[:, 0], node_to_token[:, 1]
  valid = (rows >= 0)[:, None]
  values = jnp.where(valid, values, jnp.zeros_like(values))
  grid = jnp.zeros(tuple(grid_shape) + values.shape[-1:], values.dtype)
  return grid.at[jnp.maximum(rows, 0), jnp.maximum(cols, 0)].add(values)
