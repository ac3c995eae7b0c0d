"""Fusion of the sequence (pLM) and structure (GNN) streams at one depth (Liu et al.
2025), on per-residue tokens of width d: `LocalFusion` (a per-residue softmax gate over
the two modalities, Z = g0·U + g1·V), `GlobalFusion` (pre-LN self-attention + FFN over
each protein's joint token set [U + e_seq ; V + e_str]), `FusionLevel` (either of them
with the projections into the fused width and the write-backs, `WRITE_BACKS`), and the
`layer_norm` of the meeting points (`SEQ_NORM_EPS`, `STRUCT_NORM_EPS`).

The equations, why the inputs are normalised and what `write_back='replace'` and
`norm=False` change: docs/model.md "The interleaving", "Normalisation where the streams
meet" and "Other switches". Shapes: N nodes, G graphs (incl. the padding graph), R x L
the ESM token grid, d fused width, ds ESM width, dg GNN width.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from bihier_jax.models import attention
from bihier_jax.models import tokens as tokens_lib

Dtype = Any


class LocalFusion(nn.Module):
  """Per-residue gated fusion, as published.

  Attributes:
    hidden: width of the hidden layer of the shared vote MLP f.
    dtype: compute dtype (parameters stay float32).
  """
  hidden: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, u, v, has_token):
    """Fuses the two modalities residue by residue.

    Args:
      u: [N, d] sequence-side tokens.
      v: [N, d] structure-side tokens.
      has_token: bool[N] node has a sequence token; nodes without one (ligand atoms,
        padding) take the structure side only (gate (0, 1)).

    Returns:
      (z [N, d], gates float32[N, 2]), gates sum to one per residue.
    """
    vote_hidden = nn.Dense(self.hidden, dtype=self.dtype, name="vote_hidden")
    vote_out = nn.Dense(2, dtype=self.dtype, name="vote_out")
    vote = lambda a: vote_out(nn.gelu(vote_hidden(a)))
    # One MLP f for both modalities (shared parameters), votes added, as published.
    logits = vote(u).astype(jnp.float32) + vote(v).astype(jnp.float32)
    gates = jax.nn.softmax(logits, axis=-1)
    struct_only = jnp.array([0.0, 1.0], jnp.float32)
    gates = jnp.where(has_token[:, None], gates, struct_only)
    g = gates.astype(u.dtype)
    z = g[:, :1] * u + g[:, 1:] * v
    return z, gates


class JointTokenBlock(nn.Module):
  """One pre-LN transformer block (MHSA + FFN) over batched token sets with a mask.

  Attributes:
    num_heads: attention heads; the width must divide by it.
    ffn_mult: FFN hidden width = ffn_mult x width.
    dropout: rate on both residual branches (attention output, FFN output).
    dtype: compute dtype; softmax runs in float32.
  """
  num_heads: int
  ffn_mult: int = 4
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens, mask, deterministic: bool):
    """Args: tokens [B, T, d]; mask: bool[B, T] real tokens (every token attends to the
    real tokens of its row), or bool[B, T, T] (query, key) pairs that may attend.

    Returns [B, T, d]. Rows whose query has no allowed key get a finite, meaningless
    value; callers mask them.
    """
    width = tokens.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"fusion width {width} is not divisible by "
                       f"num_heads={self.num_heads}")
    head_dim = width // self.num_heads
    dense_heads = lambda name: nn.DenseGeneral(
        (self.num_heads, head_dim), dtype=self.dtype, name=name)

    y = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="attention_norm")(tokens)
    q = dense_heads("query")(y) * (head_dim ** -0.5)
    k = dense_heads("key")(y)
    v = dense_heads("value")(y)
    # No dropout on the attention weights: on [B, heads, T, T] its random bits cost more
    # than the attention itself on CPU; the residual branches keep dropout.
    pairs = mask[:, None, None, :] if mask.ndim == 2 else mask[:, None]
    bias = attention.mask_bias(pairs)
    if self.is_mutable_collection("intermediates"):  # inspection only: [B, heads, T, T]
      logits = jnp.einsum("bqhc,bkhc->bhqk", q, k, preferred_element_type=jnp.float32)
      self.sow("intermediates", "attention_weights", jax.nn.softmax(logits + bias, -1))
    attended = attention.masked_attention(q, k, v, bias)
    attended = nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype,
                               name="attention_out")(attended)
    tokens = tokens + nn.Dropout(self.dropout)(attended, deterministic=deterministic)

    y = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="ffn_norm")(tokens)
    y = nn.Dense(self.ffn_mult * width, dtype=self.dtype, name="ffn_in")(y)
    y = nn.Dense(width, dtype=self.dtype, name="ffn_out")(nn.gelu(y))
    return tokens + nn.Dropout(self.dropout)(y, deterministic=deterministic)


class GlobalFusion(nn.Module):
  """Joint self-attention over each protein's sequence and structure residue tokens.

  Each protein contributes 2n tokens (U + e_seq for its n residues, V + e_str); tokens
  attend only to real tokens of the same graph.

  Two layouts of the same computation:
  - per graph (`graph_slot_node` given, with P > 0 slots): each real graph's nodes are
    laid out as [G-1, 2P] tokens (its P node slots, sequence side then structure side)
    by the input pipeline's slot table, so attention costs (G-1)·(2P)² and nothing is
    decided on device;
  - dense (no slot table, or P = 0, which the pipeline chooses where per-graph would not
    pay): one [2N, 2N] masked attention over the whole batch, O((2N)²) time and memory
    (N = 2048 nodes with 4 heads: 4096² x 4 float32 logits = 268 MB).

  Attributes:
    dim: token width d.
    num_heads: attention heads.
    dropout: dropout rate.
    ffn_mult: FFN hidden width = ffn_mult x dim.
    dtype: compute dtype.
  """
  dim: int
  num_heads: int
  dropout: float = 0.0
  ffn_mult: int = 4
  dtype: Dtype = jnp.float32

  def setup(self):
    # Modality embeddings added to the tokens so attention can tell the two apart.
    self.seq_type_embedding = self.param(
        "seq_type_embedding", nn.initializers.normal(0.02), (self.dim,))
    self.struct_type_embedding = self.param(
        "struct_type_embedding", nn.initializers.normal(0.02), (self.dim,))
    self.block = JointTokenBlock(num_heads=self.num_heads, dropout=self.dropout,
                                 ffn_mult=self.ffn_mult, dtype=self.dtype)

  def _dense(self, tokens, token_graph, token_mask, deterministic):
    allowed = ((token_graph[:, None] == token_graph[None, :])
               & token_mask[:, None] & token_mask[None, :])
    return self.block(tokens[None], allowed[None], deterministic)[0]

  def _per_graph(self, u, v, seq_mask, struct_mask, graph_slot_node, deterministic):
    """[G-1, 2P] layout from the slot table; returns (z_seq, z_struct) [N, d]."""
    n = u.shape[0]
    filled = graph_slot_node >= 0  # [G-1, P]
    node = jnp.maximum(graph_slot_node, 0)
    grid = jnp.concatenate([u[node], v[node]], axis=1)  # [G-1, 2P, d]
    grid_mask = jnp.concatenate([filled & seq_mask[node], filled & struct_mask[node]], 1)
    out = self.block(grid, grid_mask, deterministic)
    # Back to nodes; empty slots write to a dropped row N.
    target = jnp.where(filled, graph_slot_node, n).reshape(-1)
    slots = graph_slot_node.shape[1]
    back = lambda half: jnp.zeros((n + 1, u.shape[-1]), out.dtype).at[target].set(
        half.reshape(-1, u.shape[-1]))[:n]
    return back(out[:, :slots]), back(out[:, slots:])

  def __call__(self, u, v, node_graph, seq_mask, struct_mask, num_graphs: int,
               deterministic: bool, graph_slot_node=None):
    """Fuses all proteins of a batch.

    Args:
      u: [N, d] sequence-side tokens; v: [N, d] structure-side tokens.
      node_graph: int32[N] graph of each node.
      seq_mask: bool[N] the node's sequence token is real (residue with an ESM token).
      struct_mask: bool[N] the node's structure token is real (real node).
      num_graphs: G (static).
      deterministic: no dropout.
      graph_slot_node: optional int32[G-1, P], node of each (real graph, slot), -1 for
        empty slots (`Batch.graph_slot_node`); every real node has one slot.

    Returns:
      (z_seq [N, d], z_struct [N, d]); zero at masked tokens.
    """
    del num_graphs  # the layouts need no graph count beyond the slot table's
    u = u + self.seq_type_embedding.astype(u.dtype)
    v = v + self.struct_type_embedding.astype(v.dtype)
    if graph_slot_node is not None and graph_slot_node.shape[-1] > 0:
      z_seq, z_struct = self._per_graph(u, v, seq_mask, struct_mask, graph_slot_node,
                                        deterministic)
    else:
      n = u.shape[0]
      out = self._dense(jnp.concatenate([u, v], 0),
                        jnp.concatenate([node_graph, node_graph], 0),
                        jnp.concatenate([seq_mask, struct_mask], 0), deterministic)
      z_seq, z_struct = out[:n], out[n:]
    return (jnp.where(seq_mask[:, None], z_seq, 0),
            jnp.where(struct_mask[:, None], z_struct, 0))


WRITE_BACKS = ("add", "replace")  # model.fusion.write_back


@flax.struct.dataclass
class FusionOutput:
  """hidden [R, L, ds] and x [N, dg] after write-back; z_seq, z_struct [N, d] the fused
  tokens of each modality (the same array for local fusion), zero where masked."""
  hidden: Any
  x: Any
  z_seq: Any
  z_struct: Any


class FusionLevel(nn.Module):
  """Fusion at one depth: normalise, project, fuse (local or global), write back.

  Attributes:
    mode: "local" | "global".
    dim: fused token width d.
    num_heads: heads of global fusion.
    dropout: dropout in global fusion and on the write-back updates.
    ffn_mult: FFN width multiple of global fusion.
    write_struct: struct <- seq write-back (direction bi / seq2struct).
    write_seq: seq <- struct write-back (direction bi / struct2seq).
    norm: LayerNorm on both inputs, structure stream continues from LN(X).
    write_back: "add" (residual) | "replace".
    dtype: compute dtype.
  """
  mode: str
  dim: int
  num_heads: int = 4
  dropout: float = 0.0
  ffn_mult: int = 4
  write_struct: bool = True
  write_seq: bool = True
  norm: bool = True
  write_back: str = "add"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, hidden, x, node_to_token, node_graph, node_mask,
               num_graphs: int, deterministic: bool, graph_slot_node=None
               ) -> FusionOutput:
    """Args:
      hidden: [R, L, ds] pLM hidden states.
      x: [N, dg] GNN node states.
      node_to_token: int32[N, 2] or, windowed, [N, K, 2] (`tokens.gather_tokens`);
        node_graph: int32[N]; node_mask: bool[N].
      num_graphs: G (static).
      deterministic: no dropout.
      graph_slot_node: optional int32[G-1, P], the per-graph layout of global fusion;
        see `GlobalFusion`.
    """
    has_token = tokens_lib.has_token(node_to_token) & node_mask
    seq_side, struct_side = tokens_lib.gather_tokens(hidden, node_to_token), x
    if self.norm:
      seq_side = layer_norm("seq_norm", self.dtype)(seq_side)
      struct_side = jnp.where(node_mask[:, None],
                              layer_norm("struct_norm", self.dtype, structure=True)(x),
                              0).astype(x.dtype)
    u = nn.Dense(self.dim, dtype=self.dtype, name="seq_in")(seq_side)
    v = nn.Dense(self.dim, dtype=self.dtype, name="struct_in")(struct_side)

    if self.mode == "local":
      z, gates = LocalFusion(hidden=self.dim, dtype=self.dtype, name="local")(
          u, v, has_token)
      self.sow("intermediates", "gates", gates)
      z_seq = z_struct = z
    else:  # "global" (BiHierConfig.from_config checks model.fusion.mode)
      z_seq, z_struct = GlobalFusion(
          dim=self.dim, num_heads=self.num_heads, dropout=self.dropout,
          ffn_mult=self.ffn_mult, dtype=self.dtype, name="global")(
              u, v, node_graph, has_token, node_mask, num_graphs, deterministic,
              graph_slot_node)

    drop = nn.Dropout(self.dropout)
    replace = self.write_back == "replace"
    if self.write_struct:
      update = nn.Dense(x.shape[-1], dtype=self.dtype, name="to_struct")(z_struct)
      update = drop(update, deterministic=deterministic).astype(x.dtype)
      x = jnp.where(node_mask[:, None], update if replace else struct_side + update, x)
    if self.write_seq:
      # Added updates start at zero (the pretrained pLM is exact at step 0); a
      # replacement cannot.
      zero = {} if replace else {"kernel_init": nn.initializers.zeros,
                                 "bias_init": nn.initializers.zeros}
      update = nn.Dense(hidden.shape[-1], dtype=self.dtype, name="to_seq", **zero)(z_seq)
      update = drop(update, deterministic=deterministic)
      update = jnp.where(has_token[:, None], update, 0)
      grid = tokens_lib.scatter_to_tokens(update, node_to_token,
                                         hidden.shape[:2]).astype(hidden.dtype)
      if replace:
        written = tokens_lib.scatter_to_tokens(
            has_token[:, None].astype(jnp.float32), node_to_token, hidden.shape[:2]) > 0
        hidden = jnp.where(written, grid, hidden)
      else:
        hidden = hidden + grid
    return FusionOutput(hidden=hidden, x=x, z_seq=z_seq, z_struct=z_struct)


# LayerNorm epsilon where the streams meet. ProNet's states are ~1e-3 after 2 blocks
# and ~5e-5 after 4 at initialisation (variance ~1e-9): ESM's 1e-5 would dominate that
# variance and leave them small, so the structure side uses an epsilon far below it
# (still normalising states down to an RMS of about 1e-7, some 8 blocks deep).
SEQ_NORM_EPS = 1e-5
STRUCT_NORM_EPS = 1e-16


def layer_norm(name: str, dtype: Dtype = jnp.float32, *, structure: bool = False
               ) -> nn.LayerNorm:
  """The LayerNorm used where the two streams meet (float32 statistics)."""
  eps = STRUCT_NORM_EPS if structure else SEQ_NORM_EPS
  return nn.LayerNorm(epsilon=eps, dtype=dtype, name=name)
