"""The Bi-Hierarchical model: ESM-2 and a ProNet-style GNN interleaved with fusion.

Forward pass (DESIGN.md "Model"), for GNN blocks k = 1..K:

    X <- GNN block k
    if k in fusion.levels:
      H <- ESM layers (π(previous fusion level), π(k)]
      H, X <- FusionLevel_k(H, X)          (local or global; write-back per direction)
    H <- remaining ESM layers, final LayerNorm

ESM layers between two fusion levels do not depend on the GNN, so running them in one
chunk right before the fusion is the same computation as DESIGN's per-block interleave,
with fewer program pieces. Readout per residue: concat(Dense(gather(H)), X).

Baselines share this module and its parameter names (`model.kind`):
  esm_only  ESM only; readout Dense(gather(H)).
  gnn_only  GNN only; readout X.
  serial    final ESM features per residue are the GNN's extra input features
            (ESM-GearNet style); readout concat(Dense(gather(H)), X).
  parallel  both encoders independently; readout concat.
  cross     both independently, then one global-fusion block (MHSA over both token sets,
            write-back both ways) on the final states; readout concat.

Parameter tree: params['esm'] (ESM-2, names as `esm2.ESM2`), params['gnn'] (ProNet),
params['fusion_<k>'] (fusion after GNN block k; 'fusion_cross' for kind cross),
params['seq_readout'], params['head']. The optimizer freezes / scales the 'esm' subtree
by name.

Randomness: flax rng stream 'dropout' (and whatever ProNet's augmentations use) when
deterministic=False.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from bihier_jax.data import batch as batch_lib
from bihier_jax.models import esm2
from bihier_jax.models import fusion as fusion_lib
from bihier_jax.models import heads
from bihier_jax.models import pronet

KINDS = ("bihier", "esm_only", "gnn_only", "serial", "parallel", "cross")
DIRECTIONS = ("bi", "seq2struct", "struct2seq")
MODES = ("local", "global")


@flax.struct.dataclass
class ModelOutput:
  """logits: float32[N, C] (task.level 'node') or [G, C] ('graph');
  node_embeddings: [N, D] per-residue readout features;
  graph_embeddings: [G, D] pooled per protein (head.pooling), zero for the padding graph.
  """
  logits: Any
  node_embeddings: Any
  graph_embeddings: Any


def esm_layer_pairing(pairing, levels, num_esm_layers: int, num_blocks: int):
  """ESM layer π(k) paired with each fusion level k (fusion runs after that layer).

  Args:
    pairing: "even" (π(k) = round(k·S/K)), "last" (π(k) = S − K + k, the last K layers),
      or explicit ints (a tuple, or a string "3,6"): one per GNN block (length K) or one
      per fusion level.
    levels: sorted 1-based GNN block indices where fusion happens.
    num_esm_layers: S.
    num_blocks: K.

  Returns:
    tuple of ints, π(k) for each k in `levels`, nondecreasing, each in 0..S.
  """
  s, k_max = num_esm_layers, num_blocks
  if isinstance(pairing, str) and pairing not in ("even", "last"):
    # Explicit layers given on the command line to a string field: "3,6" or "(3, 6)".
    try:
      pairing = tuple(int(p) for p in pairing.strip("()[] ").split(",") if p.strip())
    except ValueError:
      raise ValueError(f"model.fusion.layer_pairing must be 'even', 'last' or ESM layer "
                       f"indices like '3,6', got {pairing!r}") from None
  if isinstance(pairing, str):
    if pairing == "even":
      table = {k: int(math.floor(k * s / k_max + 0.5)) for k in range(1, k_max + 1)}
    elif pairing == "last":
      table = {k: max(0, s - k_max + k) for k in range(1, k_max + 1)}
    else:
      raise ValueError(f"model.fusion.layer_pairing must be 'even', 'last' or a tuple of "
                       f"ESM layer indices, got {pairing!r}")
    paired = tuple(table[k] for k in levels)
  else:
    explicit = tuple(int(p) for p in pairing)
    if len(explicit) == k_max:
      paired = tuple(explicit[k - 1] for k in levels)
    elif len(explicit) == len(levels):
      paired = explicit
    else:
      raise ValueError(f"explicit model.fusion.layer_pairing {explicit} needs one ESM layer "
                       f"per GNN block ({k_max}) or per fusion level ({len(levels)})")
  if any(not 0 <= p <= s for p in paired) or list(paired) != sorted(paired):
    raise ValueError(f"ESM layers paired with fusion levels {tuple(levels)} must be "
                     f"nondecreasing in 0..{s}, got {paired}")
  return paired


@dataclasses.dataclass(frozen=True)
class BiHierConfig:
  """Everything `BiHierModel` needs, hashable; built from the ml_collections config by
  `from_config(config)` (reads config.model and config.task)."""
  kind: str
  dtype: Any
  esm: esm2.ESM2Config
  esm_frozen: bool
  gnn: pronet.ProNetConfig
  fusion_mode: str
  fusion_levels: tuple[int, ...]
  fusion_direction: str
  fusion_esm_layers: tuple[int, ...]  # π(k) per fusion level
  fusion_dim: int
  fusion_heads: int
  fusion_dropout: float
  fusion_ffn_mult: int
  head_pooling: str
  head_hidden: int
  head_dropout: float
  task_level: str
  num_classes: int

  @classmethod
  def from_config(cls, config) -> "BiHierConfig":
    m, t = config.model, config.task
    if m.kind not in KINDS:
      raise ValueError(f"model.kind must be one of {KINDS}, got {m.kind!r}")
    if m.fusion.mode not in MODES:
      raise ValueError(f"model.fusion.mode must be one of {MODES}, got {m.fusion.mode!r}")
    if m.fusion.direction not in DIRECTIONS:
      raise ValueError(f"model.fusion.direction must be one of {DIRECTIONS}, "
                       f"got {m.fusion.direction!r}")
    if t.level not in heads.LEVELS:
      raise ValueError(f"task.level must be one of {heads.LEVELS}, got {t.level!r}")
    dtype = jnp.dtype(m.dtype)
    esm_cfg = esm2.config_from_preset(
        m.esm.preset, token_dropout=bool(m.esm.token_dropout), dtype=dtype,
        remat=bool(m.esm.remat), scan_layers=bool(m.esm.scan_layers),
        attention=m.esm.attention, mlm_head=False)
    gnn_cfg = pronet.ProNetConfig(
        level=m.gnn.level, hidden=m.gnn.hidden, num_blocks=m.gnn.num_blocks,
        num_radial=m.gnn.num_radial, num_spherical=m.gnn.num_spherical,
        cutoff=m.gnn.cutoff, dropout=m.gnn.dropout,
        mask_aatype_prob=m.gnn.mask_aatype_prob, coord_noise_std=m.gnn.coord_noise_std,
        coord_noise_clip=m.gnn.coord_noise_clip, dtype=dtype)
    levels = tuple(sorted({int(k) for k in m.fusion.levels}))
    if m.kind == "bihier":
      if not levels:
        raise ValueError("model.kind='bihier' needs at least one model.fusion.levels entry")
      if levels[0] < 1 or levels[-1] > m.gnn.num_blocks:
        raise ValueError(f"model.fusion.levels {levels} must lie in 1..{m.gnn.num_blocks} "
                         f"(1-based GNN blocks)")
      paired = esm_layer_pairing(m.fusion.layer_pairing, levels, esm_cfg.num_layers,
                                 m.gnn.num_blocks)
    else:
      levels, paired = (), ()
    if m.esm.trainable not in ("frozen", "finetune", "last_n"):
      raise ValueError(f"model.esm.trainable must be frozen | finetune | last_n, "
                       f"got {m.esm.trainable!r}")
    return cls(
        kind=m.kind, dtype=dtype, esm=esm_cfg, esm_frozen=m.esm.trainable == "frozen",
        gnn=gnn_cfg, fusion_mode=m.fusion.mode, fusion_levels=levels,
        fusion_direction=m.fusion.direction, fusion_esm_layers=paired,
        fusion_dim=m.fusion.dim, fusion_heads=m.fusion.num_heads,
        fusion_dropout=m.fusion.dropout, fusion_ffn_mult=m.fusion.get("ffn_mult", 4),
        head_pooling=m.head.pooling,
        head_hidden=m.head.hidden, head_dropout=m.head.dropout, task_level=t.level,
        num_classes=t.num_classes)

  @property
  def uses_esm(self) -> bool:
    return self.kind != "gnn_only"

  @property
  def uses_gnn(self) -> bool:
    return self.kind != "esm_only"


def _graph_capacity(num_nodes: int, num_graphs: int, row_length: int) -> int | None:
  """Static per-protein capacity for global fusion, or None for the dense layout.

  Nodes per protein rarely exceed one ESM row (single-chain proteins); bigger ones fall
  back to dense at run time. Per-graph attention (two compiled branches) is used only
  where dense attention is big and at least twice as costly: N > 512 and
  2·(G−1)·(2P)² < (2N)² (the padding graph G−1 gets no slots).
  """
  cap = min(row_length, num_nodes)
  worth_it = num_nodes > 512 and 2 * (num_graphs - 1) * cap * cap < num_nodes * num_nodes
  return cap if worth_it else None


class BiHierModel(nn.Module):
  """All model kinds on one code path. `__call__(batch, deterministic) -> ModelOutput`."""
  config: BiHierConfig

  def setup(self):
    cfg = self.config
    if cfg.uses_esm:
      self.esm = esm2.ESM2(cfg.esm)
      self.seq_readout = nn.Dense(cfg.gnn.hidden, dtype=cfg.dtype)
    if cfg.uses_gnn:
      self.gnn = pronet.ProNet(cfg.gnn)
    write_struct = cfg.fusion_direction in ("bi", "seq2struct")
    write_seq = cfg.fusion_direction in ("bi", "struct2seq")
    level = lambda mode, ws, wq: fusion_lib.FusionLevel(
        mode=mode, dim=cfg.fusion_dim, num_heads=cfg.fusion_heads,
        dropout=cfg.fusion_dropout, ffn_mult=cfg.fusion_ffn_mult, write_struct=ws,
        write_seq=wq, dtype=cfg.dtype)
    self.fusion = {str(k): level(cfg.fusion_mode, write_struct, write_seq)
                   for k in cfg.fusion_levels}
    if cfg.kind == "cross":
      self.fusion_cross = level("global", True, True)
    self.head = heads.MLPHead(hidden=cfg.head_hidden, num_outputs=cfg.num_classes,
                              dropout=cfg.head_dropout, dtype=cfg.dtype)

  def _fuse(self, module, hidden, x, batch, deterministic):
    num_nodes, num_graphs = batch.node_mask.shape[0], batch.graph_mask.shape[0]
    capacity = _graph_capacity(num_nodes, num_graphs, batch.tokens.shape[1])
    return module(hidden, x, batch.node_to_token, batch.node_graph, batch.node_mask,
                  num_graphs, deterministic, capacity)

  def _esm_full(self, tokens):
    """Plain ESM-2 forward: final (normed) states [R, L, ds]."""
    cfg = self.config
    h = self.esm.run_layers(self.esm.embed(tokens), tokens, 0, cfg.esm.num_layers)
    h = self.esm.final_norm(h)
    return jax.lax.stop_gradient(h) if cfg.esm_frozen else h

  def __call__(self, batch: batch_lib.Batch, deterministic: bool = True) -> ModelOutput:
    cfg = self.config
    tokens, graph = batch.tokens, batch.graph
    hidden = x = None

    if cfg.kind == "bihier":
      hidden = self.esm.embed(tokens)
      # Until something trainable writes into the pLM stream, a frozen ESM needs no
      # backward pass.
      seq_frozen = cfg.esm_frozen
      x, edges = self.gnn.embed(graph, deterministic)
      done = 0
      for k in range(1, cfg.gnn.num_blocks + 1):
        x = self.gnn.block(k - 1, x, edges, graph, deterministic)
        if k in cfg.fusion_levels:
          stop = cfg.fusion_esm_layers[cfg.fusion_levels.index(k)]
          hidden = self.esm.run_layers(hidden, tokens, done, stop)
          done = stop
          if seq_frozen:
            hidden = jax.lax.stop_gradient(hidden)
          hidden, x = self._fuse(self.fusion[str(k)], hidden, x, batch, deterministic)
          seq_frozen = seq_frozen and cfg.fusion_direction == "seq2struct"
      hidden = self.esm.final_norm(
          self.esm.run_layers(hidden, tokens, done, cfg.esm.num_layers))
      if seq_frozen:
        hidden = jax.lax.stop_gradient(hidden)
    else:
      if cfg.uses_esm:
        hidden = self._esm_full(tokens)
      if cfg.uses_gnn:
        extra = (batch_lib.gather_tokens(hidden, batch.node_to_token)
                 if cfg.kind == "serial" else None)
        x, edges = self.gnn.embed(graph, deterministic, extra_node_features=extra)
        for k in range(cfg.gnn.num_blocks):
          x = self.gnn.block(k, x, edges, graph, deterministic)
      if cfg.kind == "cross":
        hidden, x = self._fuse(self.fusion_cross, hidden, x, batch, deterministic)

    if hidden is not None:
      self.sow("intermediates", "sequence_states", hidden)
    parts = []
    if hidden is not None:
      parts.append(self.seq_readout(batch_lib.gather_tokens(hidden, batch.node_to_token)))
    if x is not None:
      parts.append(x.astype(cfg.dtype))
    node_embeddings = jnp.concatenate(parts, axis=-1)
    node_embeddings = jnp.where(batch.node_mask[:, None], node_embeddings, 0)
    graph_embeddings = heads.pool(node_embeddings, batch.node_graph, batch.node_mask,
                                  batch.graph_mask.shape[0], cfg.head_pooling)
    features = node_embeddings if cfg.task_level == "node" else graph_embeddings
    logits = self.head(features, deterministic)
    return ModelOutput(logits=logits, node_embeddings=node_embeddings,
                       graph_embeddings=graph_embeddings)
