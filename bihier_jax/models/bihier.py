"""The Bi-Hierarchical model: ESM-2 and a ProNet-style GNN interleaved with fusion
(`BiHierModel`, `BiHierConfig`, `ModelOutput`, `esm_layer_pairing`), and the baselines
on the same code path (`KINDS`: esm_only, gnn_only, serial, parallel, cross).

`BiHierConfig.from_config` is the one validator of `config.model`: it checks every
allowed value (`KINDS`, `DIRECTIONS`, `MODES`, `READOUTS`, `MATMUL_PRECISIONS`,
`models.DTYPES`, `fusion.WRITE_BACKS`, `heads.POOLINGS`, `heads.LEVELS`) and the fusion
levels and layer pairing. The forward pass, the readouts, the baselines, the parameter
tree and the rng streams: docs/model.md "The interleaving" and "Baselines, readout and
parameters".
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from bihier_jax.data import batch as batch_lib
from bihier_jax.models import DTYPES
from bihier_jax.models import esm2
from bihier_jax.models import fusion as fusion_lib
from bihier_jax.models import heads
from bihier_jax.models import pronet
from bihier_jax.models import tokens as tokens_lib
from bihier_jax.models import trainable as trainable_lib

KINDS = ("bihier", "esm_only", "gnn_only", "serial", "parallel", "cross")
DIRECTIONS = ("bi", "seq2struct", "struct2seq")
MODES = ("local", "global")
READOUTS = ("auto", "streams", "fused")
# model.matmul_precision: JAX's precision of float32 matmuls (docs/model.md, "Matmul
# precision"); 'default' leaves it to the backend (GPU: TF32, TPU: one bfloat16 pass).
MATMUL_PRECISIONS = ("default", "high", "highest")


def matmul_precision_scope(precision: str):
  """Context in which traced matmuls take `precision` (one of MATMUL_PRECISIONS);
  'default' leaves JAX's setting as it is."""
  return (contextlib.nullcontext() if precision == "default"
          else jax.default_matmul_precision(precision))


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
  trainable: trainable_lib.Trainable
  gnn: pronet.ProNetConfig
  fusion_mode: str
  fusion_levels: tuple[int, ...]
  fusion_direction: str
  fusion_esm_layers: tuple[int, ...]  # π(k) per fusion level
  fusion_dim: int
  fusion_heads: int
  fusion_dropout: float
  fusion_ffn_mult: int
  fusion_norm: bool
  fusion_write_back: str
  readout: str  # streams | fused (auto resolved)
  mask_esm_tokens: bool
  head_pooling: str
  head_hidden: int
  head_dropout: float
  task_level: str
  num_classes: int
  matmul_precision: str = "default"  # one of MATMUL_PRECISIONS

  @classmethod
  def from_config(cls, config) -> "BiHierConfig":
    m, t = config.model, config.task
    if m.kind not in KINDS:
      raise ValueError(f"model.kind must be one of {KINDS}, got {m.kind!r}")
    dtype_name = m.dtype if isinstance(m.dtype, str) else jnp.dtype(m.dtype).name
    if dtype_name not in DTYPES:
      raise ValueError(f"model.dtype must be one of {DTYPES}, got {m.dtype!r}")
    if m.fusion.mode not in MODES:
      raise ValueError(f"model.fusion.mode must be one of {MODES}, got {m.fusion.mode!r}")
    if m.fusion.direction not in DIRECTIONS:
      raise ValueError(f"model.fusion.direction must be one of {DIRECTIONS}, "
                       f"got {m.fusion.direction!r}")
    write_back = m.fusion.get("write_back", "add")
    if write_back not in fusion_lib.WRITE_BACKS:
      raise ValueError(f"model.fusion.write_back must be one of {fusion_lib.WRITE_BACKS}, "
                       f"got {write_back!r}")
    readout = m.get("readout", "auto")
    if readout not in READOUTS:
      raise ValueError(f"model.readout must be one of {READOUTS}, got {readout!r}")
    if readout == "auto":
      readout = "fused" if m.kind == "cross" else "streams"
    if readout == "fused" and m.kind not in ("bihier", "cross"):
      raise ValueError(f"model.readout='fused' reads the last fusion level's tokens; "
                       f"model.kind={m.kind!r} has no fusion (use streams or auto)")
    if m.head.pooling not in heads.POOLINGS:
      raise ValueError(f"model.head.pooling must be one of {heads.POOLINGS}, "
                       f"got {m.head.pooling!r}")
    if t.level not in heads.LEVELS:
      raise ValueError(f"task.level must be one of {heads.LEVELS}, got {t.level!r}")
    precision = m.get("matmul_precision", "default")  # saved configs without it
    if precision not in MATMUL_PRECISIONS:
      raise ValueError(f"model.matmul_precision must be one of {MATMUL_PRECISIONS}, "
                       f"got {precision!r}")
    dtype = jnp.dtype(m.dtype)
    trainable = trainable_lib.Trainable.from_config(config)
    esm_cfg = esm2.config_from_preset(
        m.esm.preset, token_dropout=bool(m.esm.token_dropout), dtype=dtype,
        remat=bool(m.esm.remat), scan_layers=bool(m.esm.scan_layers),
        f32_residual=bool(m.esm.get("f32_residual", True)),
        attention=m.esm.attention, mlm_head=False, **trainable.esm_overrides())
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
    return cls(
        kind=m.kind, dtype=dtype, esm=esm_cfg, trainable=trainable,
        gnn=gnn_cfg, fusion_mode=m.fusion.mode, fusion_levels=levels,
        fusion_direction=m.fusion.direction, fusion_esm_layers=paired,
        fusion_dim=m.fusion.dim, fusion_heads=m.fusion.num_heads,
        fusion_dropout=m.fusion.dropout, fusion_ffn_mult=m.fusion.get("ffn_mult", 4),
        fusion_norm=bool(m.fusion.get("norm", True)), fusion_write_back=write_back,
        readout=readout, mask_esm_tokens=bool(m.esm.get("mask_augmented", True)),
        head_pooling=m.head.pooling,
        head_hidden=m.head.hidden, head_dropout=m.head.dropout, task_level=t.level,
        num_classes=t.num_classes, matmul_precision=precision)

  @property
  def uses_esm(self) -> bool:
    return self.kind != "gnn_only"

  @property
  def uses_gnn(self) -> bool:
    return self.kind != "esm_only"


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
    if cfg.fusion_norm:
      self.seq_readout_norm = fusion_lib.layer_norm("seq_readout_norm", cfg.dtype)
      self.struct_readout_norm = fusion_lib.layer_norm("struct_readout_norm", cfg.dtype,
                                                       structure=True)
    write_struct = cfg.fusion_direction in ("bi", "seq2struct")
    write_seq = cfg.fusion_direction in ("bi", "struct2seq")
    level = lambda mode, ws, wq: fusion_lib.FusionLevel(
        mode=mode, dim=cfg.fusion_dim, num_heads=cfg.fusion_heads,
        dropout=cfg.fusion_dropout, ffn_mult=cfg.fusion_ffn_mult, write_struct=ws,
        write_seq=wq, norm=cfg.fusion_norm, write_back=cfg.fusion_write_back,
        dtype=cfg.dtype)
    self.fusion = {str(k): level(cfg.fusion_mode, write_struct, write_seq)
                   for k in cfg.fusion_levels}
    if cfg.kind == "cross":
      # Read out from the attended tokens (ESM-GearNet), or write back both ways.
      streams = cfg.readout == "streams"
      self.fusion_cross = level("global", streams, streams)
    self.head = heads.MLPHead(hidden=cfg.head_hidden, num_outputs=cfg.num_classes,
                              dropout=cfg.head_dropout, dtype=cfg.dtype)

  def _fuse(self, module, hidden, x, batch, deterministic) -> fusion_lib.FusionOutput:
    return module(hidden, x, batch.node_to_token, batch.node_graph, batch.node_mask,
                  batch.graph_mask.shape[0], deterministic, batch.graph_slot_node)

  def _residue_mask(self, batch, deterministic):
    """Residues masked by the residue-type augmentation this step, or None."""
    cfg = self.config
    if deterministic or cfg.gnn.mask_aatype_prob <= 0:
      return None
    if cfg.uses_gnn:
      return self.gnn.draw_residue_mask(batch.graph)
    if not cfg.mask_esm_tokens:
      return None
    key = self.make_rng("augment" if self.has_rng("augment") else "dropout")
    hit = jax.random.bernoulli(key, cfg.gnn.mask_aatype_prob, batch.node_mask.shape)
    return hit & (jnp.asarray(batch.graph.nodes["node_kind"]) == 0)

  def _readout_halves(self, halves):
    """LN on each half (fusion.norm), concatenated: [N, sum of widths]."""
    cfg = self.config
    if cfg.fusion_norm:
      norms = {"seq": self.seq_readout_norm, "struct": self.struct_readout_norm}
      halves = [norms[name](h) for name, h in halves]
    else:
      halves = [h for _, h in halves]
    return jnp.concatenate([h.astype(cfg.dtype) for h in halves], axis=-1)

  def __call__(self, batch: batch_lib.Batch, deterministic: bool = True) -> ModelOutput:
    """The model on one padded batch; every matmul it traces at
    `config.matmul_precision` (the backward pass of a primitive keeps its forward's
    precision; custom VJP rules are traced when the gradient is taken, so a step also
    takes its gradient inside `matmul_precision_scope`)."""
    with matmul_precision_scope(self.config.matmul_precision):
      return self._forward(batch, deterministic)

  def _forward(self, batch: batch_lib.Batch, deterministic: bool) -> ModelOutput:
    cfg = self.config
    tokens, graph = batch.tokens, batch.graph
    hidden = x = fused = None
    residue_mask = self._residue_mask(batch, deterministic)
    if cfg.uses_esm and cfg.mask_esm_tokens and residue_mask is not None:
      tokens = tokens_lib.mask_tokens(tokens, batch.node_to_token, residue_mask)

    # Packed rows (several chains per row): attention, rotary positions and token
    # dropout follow each token's chain. The batch says how its rows are laid out
    # (`Batch.packed_rows`), not the config the model was built from.
    segments = batch.token_segments if batch.packed_rows else None
    if cfg.kind == "bihier":
      hidden = self.esm.embed(tokens, segments)
      x, edges = self.gnn.embed(graph, deterministic, residue_mask=residue_mask)
      done = 0
      for k in range(1, cfg.gnn.num_blocks + 1):
        x = self.gnn.block(k - 1, x, edges, graph, deterministic)
        if k in cfg.fusion_levels:
          stop = cfg.fusion_esm_layers[cfg.fusion_levels.index(k)]
          hidden = self.esm.run_layers(hidden, tokens, done, stop, segments=segments)
          done = stop
          fused = self._fuse(self.fusion[str(k)], hidden, x, batch, deterministic)
          hidden, x = fused.hidden, fused.x
      hidden = self.esm.final_norm(self.esm.run_layers(
          hidden, tokens, done, cfg.esm.num_layers, segments=segments))
    else:
      if cfg.uses_esm:
        hidden = self.esm.final_norm(self.esm.run_layers(
            self.esm.embed(tokens, segments), tokens, 0, cfg.esm.num_layers,
            segments=segments))
      if cfg.uses_gnn:
        extra = (tokens_lib.gather_tokens(hidden, batch.node_to_token)
                 if cfg.kind == "serial" else None)
        x, edges = self.gnn.embed(graph, deterministic, extra_node_features=extra,
                                  residue_mask=residue_mask,
                                  normalize_extra=cfg.fusion_norm)
        for k in range(cfg.gnn.num_blocks):
          x = self.gnn.block(k, x, edges, graph, deterministic)
      if cfg.kind == "cross":
        fused = self._fuse(self.fusion_cross, hidden, x, batch, deterministic)
        hidden, x = fused.hidden, fused.x

    if hidden is not None:
      self.sow("intermediates", "sequence_states", hidden)
    if cfg.readout == "fused":
      halves = [("seq", fused.z_seq)]
      if cfg.kind == "cross" or cfg.fusion_mode == "global":
        halves.append(("struct", fused.z_struct))
    else:
      halves = []
      if hidden is not None:
        halves.append(("seq", self.seq_readout(
            tokens_lib.gather_tokens(hidden, batch.node_to_token))))
      if x is not None:
        halves.append(("struct", x))
    node_embeddings = self._readout_halves(halves)
    node_embeddings = jnp.where(batch.node_mask[:, None], node_embeddings, 0)
    graph_embeddings = heads.pool(node_embeddings, batch.node_graph, batch.node_mask,
                                  batch.graph_mask.shape[0], cfg.head_pooling)
    features = node_embeddings if cfg.task_level == "node" else graph_embeddings
    logits = self.head(features, deterministic)
    return ModelOutput(logits=logits, node_embeddings=node_embeddings,
                       graph_embeddings=graph_embeddings)
