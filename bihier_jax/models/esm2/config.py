"""ESM-2 architecture and execution options: `ESM2Config`, the released `PRESETS`,
`preset_architecture`, `preset_name`, `config_from_preset`, and the names of the
top-level parameters (`EMBEDDING_PARAM`, `LAYERS_PARAM`, `FINAL_NORM_PARAM`,
`LORA_PARAM`) and of the LoRA targets. The parameter tree: docs/model.md "ESM-2".
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from bihier_jax.common import esm_shapes
from bihier_jax.common import residue_constants as rc
from bihier_jax.models.attention_backends import ATTENTION_KINDS

# Top-level parameter names (the tree in docs/model.md "ESM-2").
EMBEDDING_PARAM = "embed_tokens"
LAYERS_PARAM = "layers"
FINAL_NORM_PARAM = "emb_layer_norm_after"
LORA_PARAM = "lora"
# Projections LoRA can adapt: q/k/v (the three parts of the fused qkv_proj), the
# attention output, the two FFN matmuls.
LORA_TARGETS = ("q", "k", "v", "out", "fc1", "fc2")


@dataclasses.dataclass(frozen=True)
class ESM2Config:
  """Architecture and execution options of an ESM-2 model.

  Attributes:
    num_layers: transformer layers S.
    embed_dim: model width D.
    num_heads: attention heads (D must be divisible, head width even for rotary).
    ffn_dim: FFN width F; None -> 4 * embed_dim (every released model).
    vocab_size: 33 (ESM-2 vocabulary, residue_constants.ESM_VOCAB).
    token_dropout: ESM-2's <mask> handling (True for every released model).
    mlm_head: create the masked-LM head parameters (tied to the embedding).
    layer_norm_eps: 1e-5 (torch.nn.LayerNorm default, used by both references).
    dtype: compute dtype of matmuls and hidden states (params stay float32).
    f32_residual: keep the residual stream h (embeddings, every layer's h + branch
      sums, the states fusion reads and writes) in float32 while the layer inputs to
      the matmuls stay in `dtype`, as torch autocast does; only matters when dtype is
      not float32. Costs next to nothing on CPU (docs/model.md "Numerics").
    remat: rematerialise each layer in the backward pass (memory for compute).
    scan_layers: apply layers with lax.scan (False: unrolled python loop, same numbers).
    attention: one of `ATTENTION_KINDS`: 'auto' = the fastest exact path for the
      backend, 'exact' = plain einsum + float32 softmax, 'splash' / 'flash_gpu' = the
      Pallas kernels on any backend (interpreted off TPU / GPU) on rows padded to a
      multiple of `PALLAS_BLOCK`; chosen in `attention_backends.attend`; the table in
      docs/model.md "ESM-2 attention backends". flash_gpu is opt-in: not yet timed on
      a GPU by this project.
    frozen_embedding, frozen_layers, frozen_final_norm: parameters that enter the
      computation as constants (`stop_gradient` on the parameters): the token
      embedding, the first `frozen_layers` layers, the final LayerNorm. Their gradient
      is exactly zero and no weight-gradient matmuls are computed for them; gradients
      of activations still flow through them. `bihier_jax.models.trainable` sets these
      from `model.esm.trainable`; the numbers of the forward pass do not change.
    lora_rank, lora_alpha, lora_targets: low-rank adapters (Hu et al. 2021, "LoRA")
      on the projections `lora_targets` of every layer when lora_rank > 0: W x + b +
      (alpha / rank) · B A x with A [d_in, r], B [r, d_out] (params['lora'][t]['a'],
      ['b'], stacked over layers). B starts at zero, so an unadapted model computes
      exactly the base model's numbers; A starts uniform in ±1/sqrt(d_in) (the
      Kaiming-uniform bound peft uses). The adapters are never constants, whatever
      the frozen_* fields say.
  """
  num_layers: int
  embed_dim: int
  num_heads: int
  ffn_dim: int | None = None
  vocab_size: int = len(rc.ESM_VOCAB)
  token_dropout: bool = True
  mlm_head: bool = True
  layer_norm_eps: float = 1e-5
  dtype: Any = jnp.float32
  f32_residual: bool = True
  remat: bool = False
  scan_layers: bool = True
  attention: str = "auto"
  frozen_embedding: bool = False
  frozen_layers: int = 0
  frozen_final_norm: bool = False
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = ("q", "v")

  def __post_init__(self):
    if self.ffn_dim is None:
      object.__setattr__(self, "ffn_dim", 4 * self.embed_dim)
    object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
    if self.embed_dim % self.num_heads:
      raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
    if (self.embed_dim // self.num_heads) % 2:
      raise ValueError(f"head width {self.embed_dim // self.num_heads} must be even (rotary)")
    if self.attention not in ATTENTION_KINDS:
      raise ValueError(f"attention must be one of {ATTENTION_KINDS}, "
                       f"got {self.attention!r}")
    if not 0 <= self.frozen_layers <= self.num_layers:
      raise ValueError(f"frozen_layers {self.frozen_layers} outside 0..{self.num_layers}")
    object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
    unknown = sorted(set(self.lora_targets) - set(LORA_TARGETS))
    if self.lora_rank < 0 or unknown or (self.lora_rank and not self.lora_targets):
      raise ValueError(f"LoRA: rank {self.lora_rank} (>= 0) on targets "
                       f"{self.lora_targets} (a non-empty subset of {LORA_TARGETS})")

  @property
  def lora_scale(self) -> float:
    return float(self.lora_alpha) / self.lora_rank if self.lora_rank else 0.0

  def lora_shapes(self) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of each adapted projection."""
    d, f = self.embed_dim, self.ffn_dim
    io = {"q": (d, d), "k": (d, d), "v": (d, d), "out": (d, d), "fc1": (d, f),
          "fc2": (f, d)}
    return {t: io[t] for t in self.lora_targets} if self.lora_rank else {}

  @property
  def residual_dtype(self):
    """dtype of the residual stream between layers: float32 or the compute dtype."""
    return jnp.dtype(jnp.float32) if self.f32_residual else self.dtype

  @property
  def head_dim(self) -> int:
    return self.embed_dim // self.num_heads

  def to_dict(self) -> dict[str, Any]:
    """JSON-serialisable fields (dtype by name)."""
    d = dataclasses.asdict(self)
    d["dtype"] = jnp.dtype(self.dtype).name
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ESM2Config":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
      raise ValueError(f"unknown ESM2Config fields {sorted(unknown)}")
    return cls(**d)


# Released ESM-2 models and `tiny`, from their one home (common/esm_shapes.py).
PRESETS: dict[str, ESM2Config] = {
    name: ESM2Config(**arch._asdict())
    for name, arch in esm_shapes.ARCHITECTURES.items()}


def preset_architecture(name: str) -> ESM2Config:
  """The ESM2Config of a preset name or an "L<n>_D<d>_H<h>_F<f>" architecture.

  Raises:
    ValueError: neither (the message lists the presets).
  """
  if name in PRESETS:
    return PRESETS[name]
  return ESM2Config(**esm_shapes.architecture(name)._asdict())


def preset_name(cfg: ESM2Config) -> str:
  """The preset with `cfg`'s architecture, else its "L<n>_D<d>_H<h>_F<f>" name."""
  return esm_shapes.architecture_name(esm_shapes.Architecture(
      cfg.num_layers, cfg.embed_dim, cfg.num_heads, cfg.ffn_dim))


def config_from_preset(name: str, **overrides) -> ESM2Config:
  """A preset (or architecture name, `preset_architecture`) with fields replaced
  (ffn_dim follows embed_dim unless given)."""
  if "embed_dim" in overrides and "ffn_dim" not in overrides:
    overrides["ffn_dim"] = 4 * overrides["embed_dim"]
  return dataclasses.replace(preset_architecture(name), **overrides)

