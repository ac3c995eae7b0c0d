"""Between the ESM token grid [R, L] and the residue nodes [N]: `gather_tokens` (each
node's token state), `scatter_to_tokens` (per-node values added into the grid, in
float32), `mask_tokens` (`<mask>` at the tokens of masked residues) and `has_token`.
The map is `Batch.node_to_token`: (row, column) per node, negative for nodes without a
token; in a windowed batch [N, K, 2], a residue's token in each window that holds it
(`data.windows`): it reads its first copy, and values are written to every copy.
"""

from __future__ import annotations

import jax.numpy as jnp

from bihier_jax.common import residue_constants as rc


def _read(node_to_token):
  """int32[N, 2]: the token each node reads (the first copy of a windowed map)."""
  return node_to_token[:, 0] if node_to_token.ndim == 3 else node_to_token


def has_token(node_to_token):
  """bool[N]: the node has an ESM token (a residue, not a ligand atom or padding)."""
  return _read(node_to_token)[:, 0] >= 0


def gather_tokens(hidden, node_to_token):
  """Per-node ESM features from a token grid.

  Args:
    hidden: [R, L, D] ESM hidden states.
    node_to_token: int32[N, 2] (row, column), or [N, K, 2] (the first copy is read);
      negative for nodes without a token.

  Returns:
    [N, D], zero for nodes without a token.
  """
  read = _read(node_to_token)
  rows, cols = read[:, 0], read[:, 1]
  valid = (rows >= 0)[:, None]
  out = hidden[jnp.maximum(rows, 0), jnp.maximum(cols, 0)]
  return jnp.where(valid, out, jnp.zeros_like(out))


def scatter_to_tokens(values, node_to_token, grid_shape):
  """Adds per-node values into a token grid (inverse of `gather_tokens`), in float32.

  The sum is taken in float32 whatever the dtype of `values` (several nodes may map to
  one token); callers cast the grid to their stream's dtype. A windowed map writes each
  node's value to every copy of its token.

  Args:
    values: [N, D] per-node values, any float dtype.
    node_to_token: int32[N, 2] or [N, K, 2]; negative entries receive nothing.
    grid_shape: (R, L).

  Returns:
    float32[R, L, D] grid, zero at tokens no node maps to.
  """
  if node_to_token.ndim == 3:  # every copy: [N * K, 2] with the values repeated
    k = node_to_token.shape[1]
    values = jnp.repeat(values, k, axis=0)
    node_to_token = node_to_token.reshape(-1, 2)
  rows, cols = node_to_token[:, 0], node_to_token[:, 1]
  valid = (rows >= 0)[:, None]
  values = jnp.where(valid, values.astype(jnp.float32), 0.0)
  grid = jnp.zeros(tuple(grid_shape) + values.shape[-1:], jnp.float32)
  return grid.at[jnp.maximum(rows, 0), jnp.maximum(cols, 0)].add(values)


def mask_tokens(tokens, node_to_token, residue_mask):
  """tokens int[R, L] with the tokens of masked residues (bool[N]) set to `<mask>` (in
  every window that holds them)."""
  hit = residue_mask[:, None].astype(jnp.float32)
  grid = scatter_to_tokens(hit, node_to_token, tokens.shape)[..., 0] > 0
  return jnp.where(grid, rc.ESM_MASK, tokens)
