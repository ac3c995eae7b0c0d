"""ESM-2 (Lin et al., Science 2023) in Flax: the sequence branch of the fusion model.

Numerically the same model as fair-esm's `esm.model.esm2.ESM2` (the original) and
transformers' `EsmModel` / `EsmForMaskedLM` (≤ 1e-5 per layer where float32 matmuls are
exact: on CPU, or under `jax.default_matmul_precision("highest")` on GPU and TPU, see
docs/model.md "Matmul precision"):

  embed   word embedding (no absolute positions), token dropout (zero `<mask>` rows,
          scale by (1 - 0.15*0.8) / (1 - observed mask ratio of the real tokens)),
          times the padding mask
  layer   pre-LN; q scaled by head_dim^-0.5, then rotary on q and k; softmax attention
          over non-padding keys; exact (erf) GELU FFN of width 4*D; LayerNorm eps 1e-5
  final   `emb_layer_norm_after`; optional MLM head dense -> GELU -> LN -> tied embedding

Layers are stacked: every layer parameter has a leading axis of length `num_layers`
(`params['layers']`), and a contiguous range of layers is applied with `lax.scan` over the
slice, so compile time does not grow with depth and the fusion model can interleave ESM
layer ranges (i, j] with GNN blocks (`embed` / `run_layers` / `final_norm`).

Parameter tree (D = embed_dim, F = ffn_dim, V = 33, S = num_layers)::

  embed_tokens          {embedding [V, D]}
  layers                {self_attn_layer_norm {scale [S, D], bias [S, D]},
                         qkv_proj {kernel [S, D, 3D], bias [S, 3D]}   # columns q | k | v
                         out_proj {kernel [S, D, D], bias [S, D]},
                         final_layer_norm {scale [S, D], bias [S, D]},
                         fc1 {kernel [S, D, F], bias [S, F]},
                         fc2 {kernel [S, F, D], bias [S, D]}}
  emb_layer_norm_after  {scale [D], bias [D]}
  lm_head               {dense {kernel [D, D], bias [D]}, layer_norm {scale [D], bias [D]},
                         bias [V]}                                   # only if cfg.mlm_head

Kernels are (in, out), i.e. torch Linear weights transposed. Parameters are float32;
matmuls run in `cfg.dtype` (bfloat16 option); LayerNorm, softmax and token dropout in
float32; the residual stream between layers in `cfg.residual_dtype` (float32 with
`f32_residual`, as torch autocast keeps it).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, NamedTuple, Sequence

from absl import logging
import flax
import flax.linen as nn
import flax.struct
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from bihier_jax.common import residue_constants as rc
from bihier_jax.models import attention
from bihier_jax.models import fsdp

MASK_RATIO_TRAIN = 0.15 * 0.8  # fraction of tokens ESM-2 replaced by <mask> in training
ROTARY_BASE = 10000.0
ATTENTION_KINDS = ("auto", "exact", "splash", "flash_gpu")
# Top-level parameter names (the tree in the module docstring).
EMBEDDING_PARAM = "embed_tokens"
LAYERS_PARAM = "layers"
FINAL_NORM_PARAM = "emb_layer_norm_after"
LORA_PARAM = "lora"
# Checkpoint name of one layer's weights read from the stack (never saved for the
# backward pass: re-read, see _layer_fn).
LAYER_WEIGHTS = "esm_layer_weights"
# Projections LoRA can adapt: q/k/v (the three parts of the fused qkv_proj), the
# attention output, the two FFN matmuls.
LORA_TARGETS = ("q", "k", "v", "out", "fc1", "fc2")


# --- configuration ---------------------------------------------------------------------


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
    attention: 'auto' = fastest exact path for the backend (CPU:
      `attention.masked_attention`, and for packed rows of >= 256 tokens
      `attention.segment_attention`, each query block over its chains' key window,
      forward and backward; TPU: Pallas splash attention when the row length is a
      multiple of 128; GPU bf16: cuDNN fused attention via jax.nn.dot_product_attention,
      XLA's with a warning where cuDNN refuses; else XLA's
      jax.nn.dot_product_attention); 'exact' = plain einsum + float32 softmax;
      'splash' = the splash kernel on any backend (interpreted off TPU), computing only
      the 128 x 128 blocks that hold a query and a key of one chain
      (`attention.block_visits`, from the segment ids at trace time) and masking by
      segment ids inside them; 'flash_gpu' = Pallas' Triton flash attention with
      segment ids (`jax.experimental.pallas.ops.gpu.attention.mha`; interpreted off
      GPU), which computes every key block. Both Pallas kinds never write the [L, L]
      scores, take rows padded to a multiple of `PALLAS_BLOCK` (the data pipeline
      rounds row lengths up for them) and run inside the steps' shard_map through
      `attention.untyped_kernel`. flash_gpu is opt-in: not yet timed on a GPU by this
      project.
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


# Released ESM-2 models (Lin et al. 2023, fair-esm README).
PRESETS: dict[str, ESM2Config] = {
    "t6_8M": ESM2Config(num_layers=6, embed_dim=320, num_heads=20),
    "t12_35M": ESM2Config(num_layers=12, embed_dim=480, num_heads=20),
    "t30_150M": ESM2Config(num_layers=30, embed_dim=640, num_heads=20),
    "t33_650M": ESM2Config(num_layers=33, embed_dim=1280, num_heads=20),
    "t36_3B": ESM2Config(num_layers=36, embed_dim=2560, num_heads=40),
    "t48_15B": ESM2Config(num_layers=48, embed_dim=5120, num_heads=40),
    # Not released: a small random model for demos and tests.
    "tiny": ESM2Config(num_layers=4, embed_dim=64, num_heads=4, ffn_dim=256),
}


# An architecture that is no preset (a checkpoint of another size), written as
# "L<layers>_D<width>_H<heads>_F<ffn width>", e.g. "L3_D48_H4_F96".
_ARCHITECTURE = re.compile(r"L(\d+)_D(\d+)_H(\d+)_F(\d+)")


def preset_architecture(name: str) -> ESM2Config:
  """The ESM2Config of a preset name or an "L<n>_D<d>_H<h>_F<f>" architecture.

  Raises:
    ValueError: neither (the message lists the presets).
  """
  if name in PRESETS:
    return PRESETS[name]
  match = _ARCHITECTURE.fullmatch(str(name))
  if not match:
    raise ValueError(f"unknown ESM-2 preset {name!r}; known: {sorted(PRESETS)} or "
                     "L<layers>_D<width>_H<heads>_F<ffn width> (e.g. L3_D48_H4_F96)")
  layers, width, heads, ffn = (int(g) for g in match.groups())
  return ESM2Config(num_layers=layers, embed_dim=width, num_heads=heads, ffn_dim=ffn)


def preset_name(cfg: ESM2Config) -> str:
  """The preset with `cfg`'s architecture, else its "L<n>_D<d>_H<h>_F<f>" name."""
  shape = (cfg.num_layers, cfg.embed_dim, cfg.num_heads, cfg.ffn_dim)
  for name, preset in PRESETS.items():
    if (preset.num_layers, preset.embed_dim, preset.num_heads, preset.ffn_dim) == shape:
      return name
  return "L{}_D{}_H{}_F{}".format(*shape)


def config_from_preset(name: str, **overrides) -> ESM2Config:
  """A preset (or architecture name, `preset_architecture`) with fields replaced
  (ffn_dim follows embed_dim unless given)."""
  if "embed_dim" in overrides and "ffn_dim" not in overrides:
    overrides["ffn_dim"] = 4 * overrides["embed_dim"]
  return dataclasses.replace(preset_architecture(name), **overrides)


# --- tokenizer -------------------------------------------------------------------------

_SPECIAL = re.compile(r"<[a-z_0-9]+>")


def _tokenize_one(sequence: str) -> list[int]:
  """Token ids of one sequence, without <cls>/<eos>.

  Residue letters are case-insensitive; '<mask>' and the other special tokens may be
  written inline; any other character not in the vocabulary becomes <unk>.
  """
  ids = []
  pos = 0
  for match in _SPECIAL.finditer(sequence):
    ids.extend(rc.ESM_TOKEN.get(ch, rc.ESM_UNK) for ch in sequence[pos:match.start()].upper())
    ids.append(rc.ESM_TOKEN.get(match.group(), rc.ESM_UNK))
    pos = match.end()
  ids.extend(rc.ESM_TOKEN.get(ch, rc.ESM_UNK) for ch in sequence[pos:].upper())
  return ids


def tokenize(sequences: Sequence[str] | str, max_length: int | None = None,
             crop: bool = False) -> np.ndarray:
  """ESM-2 tokens `<cls> seq <eos> <pad>...` of a batch of sequences.

  Args:
    sequences: amino-acid strings (one string is a batch of one). Lowercase is accepted;
      letters outside the vocabulary map to <unk>; '<mask>' etc. may appear inline.
    max_length: token length L of the result, incl. <cls>/<eos>; None -> longest + 2.
    crop: over-long policy. A sequence needing more than L tokens (or more than
      ESM_MAX_TOKENS = 1024, the positions ESM-2 was trained on, when max_length is None)
      raises ValueError unless crop=True, which keeps its first L - 2 residues (the data
      pipeline chooses random windows itself, before tokenising).

  Returns:
    int32 [B, L] numpy array.
  """
  if isinstance(sequences, str):
    sequences = [sequences]
  rows = [_tokenize_one(s) for s in sequences]
  longest = max((len(r) for r in rows), default=0) + 2
  if max_length is None:
    max_length = longest if not crop else min(longest, rc.ESM_MAX_TOKENS)
    limit = rc.ESM_MAX_TOKENS
  else:
    limit = max_length
  if max_length < 2:
    raise ValueError(f"max_length {max_length} leaves no room for <cls> and <eos>")
  out = np.full((len(rows), max_length), rc.ESM_PAD, np.int32)
  for i, ids in enumerate(rows):
    if len(ids) + 2 > limit:
      if not crop:
        raise ValueError(
            f"sequence {i} has {len(ids)} residues: {len(ids) + 2} tokens exceed the limit "
            f"of {limit}; crop it first or pass crop=True (keeps the first {limit - 2})")
      ids = ids[:limit - 2]
    out[i, 0] = rc.ESM_CLS
    out[i, 1:len(ids) + 1] = ids
    out[i, len(ids) + 1] = rc.ESM_EOS
  return out


# --- pure layer functions --------------------------------------------------------------


def rotary_tables(length: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
  """cos, sin [length, head_dim] of rotary embeddings, computed in float32 like torch.

  inv_freq = 1 / 10000^(arange(0, hd, 2) / hd); angles over cat(freqs, freqs).
  """
  inv_freq = (1.0 / (np.float32(ROTARY_BASE) ** (np.arange(0, head_dim, 2).astype(np.float32)
                                                 / np.float32(head_dim)))).astype(np.float32)
  freqs = np.outer(np.arange(length, dtype=np.float32), inv_freq).astype(np.float32)
  angles = np.concatenate([freqs, freqs], axis=-1)
  return np.cos(angles), np.sin(angles)


def _rotate_half(x):
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def _apply_rotary(x, cos, sin):
  """x [B, L, H, hd]; cos, sin [L, hd] (one position per column) or [B, L, hd]."""
  cos = (cos[None] if cos.ndim == 2 else cos)[:, :, None, :].astype(x.dtype)
  sin = (sin[None] if sin.ndim == 2 else sin)[:, :, None, :].astype(x.dtype)
  return x * cos + _rotate_half(x) * sin


def segment_positions(segments):
  """Position of each token within its segment: int32[B, L].

  segments: int[B, L], chains packed into a row as contiguous runs of one id
  (`<cls> seq <eos>` each); a new run starts wherever the id changes.
  """
  start, _ = attention.run_bounds(segments)
  return jnp.arange(segments.shape[1], dtype=jnp.int32)[None] - start


class AttentionLayout(NamedTuple):
  """Who attends to whom in a token grid [B, L].

  mask: bool[B, L] (real keys, one chain per row) or bool[B, L, L] ((query, key) pairs
    of one chain, packed rows).
  segment_ids: int32[B, L] chain of each token within its row, -1 at padding (padding
    attends to padding only): the form segment-id kernels (splash attention) take.
  """
  mask: Any
  segment_ids: Any


def attention_layout(tokens, segments=None) -> AttentionLayout:
  """The `AttentionLayout` of a token grid, one chain per row unless `segments`."""
  real = tokens != rc.ESM_PAD
  ids = jnp.where(real, 0 if segments is None else segments, -1).astype(jnp.int32)
  if segments is None:
    return AttentionLayout(real, ids)
  return AttentionLayout((ids[:, :, None] == ids[:, None, :]) & real[:, None, :], ids)


def _mask4(mask):
  """[B, L] key mask or [B, L, L] pair mask -> broadcastable to [B, H, L, L]."""
  return mask[:, None, None, :] if mask.ndim == 2 else mask[:, None]


def _layer_norm(x, p, eps, dtype):
  """LayerNorm over the last axis in float32; result in `dtype`."""
  x = x.astype(jnp.float32)
  mean = x.mean(-1, keepdims=True)
  centred = x - mean
  var = jnp.mean(centred * centred, axis=-1, keepdims=True)
  y = centred * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]
  return y.astype(dtype)


def _dense(x, p, dtype):
  return jnp.dot(x, p["kernel"].astype(dtype)) + p["bias"].astype(dtype)


def _lora_delta(x, lora, target: str, cfg):
  """(alpha / r) · B A x of one adapted projection, or None where it is not adapted."""
  if lora is None or target not in lora:
    return None
  dtype = cfg.dtype
  low = jnp.dot(x, lora[target]["a"].astype(dtype))
  return jnp.dot(low, lora[target]["b"].astype(dtype)) * jnp.asarray(cfg.lora_scale, dtype)


def _adapted(x, p, lora, target: str, cfg):
  y = _dense(x, p, cfg.dtype)
  delta = _lora_delta(x, lora, target, cfg)
  return y if delta is None else y + delta


def _exact_attention(q, k, v, mask):
  """Reference einsum attention with float32 softmax. q, k, v [B, L, H, hd]; mask as
  `AttentionLayout.mask` holds."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  logits = jnp.where(_mask4(mask), logits, attention.MASKED_LOGIT)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def _cpu_attention(q, k, v, mask):
  """Same maths as `_exact_attention`, arranged for CPU (`attention.masked_attention`:
  head-major GEMMs, late softmax normalisation, closed-form backward)."""
  return attention.masked_attention(q, k, v, attention.mask_bias(_mask4(mask)))


def _cudnn_attention(q, k, v, mask):
  """cuDNN fused attention; padding given as per-row key lengths.

  Assumes padding is trailing (`<cls> seq <eos> <pad>...`, as `tokenize` and the batch
  pipeline produce). Rows of only padding get length 1 (finite, ignored outputs).
  Packed rows (a pair mask) go to `jax.nn.dot_product_attention` with the mask.
  """
  if mask.ndim == 3:
    return jax.nn.dot_product_attention(q, k, v, mask=_mask4(mask), scale=1.0)
  lengths = jnp.maximum(mask.sum(-1), 1).astype(jnp.int32)
  return jax.nn.dot_product_attention(q, k, v, scale=1.0, key_value_seq_lengths=lengths,
                                      implementation="cudnn")


def _xla_attention(q, k, v, mask):
  return jax.nn.dot_product_attention(q, k, v, mask=_mask4(mask), scale=1.0)


_CUDNN_WARNED: set[str] = set()


def _warn_cudnn_refused(reason: str) -> None:
  """One warning per distinct reason (each layer's trace would repeat it)."""
  if reason not in _CUDNN_WARNED:
    _CUDNN_WARNED.add(reason)
    logging.warning("cuDNN fused attention refused (%s): ESM attention falls back to "
                    "XLA's jax.nn.dot_product_attention", reason)


def _cudnn_refusal(shape, dtype, packed: bool) -> str | None:
  """Why cuDNN would refuse q, k, v of `shape` [B, L, H, hd] and `dtype` (first line of
  its error), or None: the same call traced on shapes only."""
  b, length = shape[:2]
  qkv = jax.ShapeDtypeStruct(shape, dtype)
  mask = jax.ShapeDtypeStruct((b, length, length) if packed else (b, length), jnp.bool_)
  try:
    jax.eval_shape(_cudnn_attention, qkv, qkv, qkv, mask)
  except Exception as e:  # pylint: disable=broad-except  # any refusal: report it
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
  return None


def _gpu_attention(q, k, v, mask):
  """cuDNN fused attention, or XLA's with a warning where cuDNN refuses the call."""
  try:
    return _cudnn_attention(q, k, v, mask)
  except Exception as e:  # pylint: disable=broad-except  # unsupported shape/version
    _warn_cudnn_refused((str(e).strip().splitlines() or [type(e).__name__])[0])
  return _xla_attention(q, k, v, mask)


# --- Pallas kernels (splash on TPU, Triton flash on GPU; interpreted elsewhere) -----------

PALLAS_KINDS = ("splash", "flash_gpu")
# Query and key block of both kernels: rows are padded to a multiple of it (the data
# pipeline chooses such row lengths for these kinds, `pallas_row_multiple`).
PALLAS_BLOCK = 128


def pallas_row_multiple(kind: str) -> int:
  """The multiple ESM row lengths are rounded up to for `model.esm.attention=kind`:
  `PALLAS_BLOCK` for the Pallas kinds, else 1."""
  return PALLAS_BLOCK if kind in PALLAS_KINDS else 1


def _loaded_blocks(visits, axis: int):
  """int32 [nb, nb]: the block (index along `axis`) each grid entry of a splash kernel
  loads: its own where visited, else the last visited one before it (the first after
  it at the start), so a skipped entry reuses the block the kernel holds (no copy)."""
  n = visits.shape[axis]
  index = jax.lax.broadcasted_iota(jnp.int32, visits.shape, axis)
  last = jax.lax.cummax(jnp.where(visits, index, -1), axis=axis)
  first = jnp.min(jnp.where(visits, index, n), axis=axis, keepdims=True)
  return jnp.where(last >= 0, last, first)


def _splash_kernel(visits, interpret: bool):
  """The splash kernel of one row, computing only the (query block, key block) pairs
  `visits` (bool [nb, nb], `attention.block_visits`; segment ids mask inside them).

  Built inside the trace from traced arrays (never cached: a cached kernel would hold
  one trace's arrays). Its mask info has no partial-mask tables: a visited block is
  "full" (block_mask 2) and the segment ids do the elementwise masking, so the kernel
  keeps O(nb²) integers per row, not an [L, L] mask.
  """
  from jax.experimental.pallas.ops.tpu import splash_attention  # pylint: disable=g-import-not-at-top
  kernel_lib = splash_attention.splash_attention_kernel
  block_mask = jnp.where(visits, 2, 0).astype(jnp.int8)[None]  # [1, nb, nb]: all heads

  def info(loaded):
    return splash_attention.splash_attention_mask_info.MaskInfo(
        data_next=loaded[None], mask_next=None, block_mask=block_mask,
        partial_mask_blocks=None, q_sequence=None, is_dynamic_mask=True)

  key_blocks = info(_loaded_blocks(visits, 1))  # forward and dq kernels walk key blocks
  query_blocks = info(_loaded_blocks(visits, 0))  # the dk/dv kernel walks query blocks
  size = PALLAS_BLOCK
  blocks = kernel_lib.BlockSizes(
      block_q=size, block_kv=size, block_kv_compute=size, block_q_dkv=size,
      block_kv_dkv=size, block_kv_dkv_compute=size, block_q_dq=size, block_kv_dq=size)
  return kernel_lib.SplashAttentionKernel(
      key_blocks, key_blocks, query_blocks, block_sizes=blocks, is_mqa=False,
      save_residuals=False, mask_value=kernel_lib.DEFAULT_MASK_VALUE,
      attn_logits_soft_cap=None, residual_checkpoint_name=None, mask_function=None,
      interpret=interpret)


def _splash_rows(q, k, v, segment_ids):
  """Splash attention of rows: q, k, v [B, L, H, hd] (L a multiple of PALLAS_BLOCK),
  segment_ids [B, L]; each row's kernel visits only the blocks `attention.block_visits`
  names (on TPU natively, elsewhere interpreted)."""
  from jax.experimental.pallas.ops.tpu import splash_attention  # pylint: disable=g-import-not-at-top
  interpret = jax.default_backend() != "tpu"
  visits = attention.block_visits(segment_ids, PALLAS_BLOCK)

  def row(q, k, v, ids, visits):  # q, k, v [H, L, hd]
    return _splash_kernel(visits, interpret)(
        q, k, v, segment_ids=splash_attention.SegmentIds(q=ids, kv=ids))

  heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # [B, L, H, hd] <-> [B, H, L, hd]
  return heads_first(jax.vmap(row)(heads_first(q), heads_first(k), heads_first(v),
                                   segment_ids, visits))


def _flash_gpu_rows(q, k, v, segment_ids):
  """Pallas (Triton) flash attention with segment ids (`pallas.ops.gpu.attention.mha`):
  a query attends to keys of its own id; every key block is computed. q, k, v
  [B, L, H, hd], L a multiple of PALLAS_BLOCK; interpreted off GPU."""
  from jax.experimental.pallas.ops.gpu import attention as gpu  # pylint: disable=g-import-not-at-top
  return gpu.mha(q, k, v, segment_ids, sm_scale=1.0,
                        interpret=jax.default_backend() != "gpu")


def _pallas_attention(rows, q, k, v, segment_ids):
  """A Pallas kernel `rows` (`_splash_rows`, `_flash_gpu_rows`) on q, k, v [B, L, H, hd]
  with segment ids [B, L]: rows padded to a multiple of PALLAS_BLOCK (padding tokens get
  id -1, their outputs are cut off), run through `attention.untyped_kernel` so that it
  traces inside the steps' shard_map."""
  length = q.shape[1]
  pad = -length % PALLAS_BLOCK
  if pad:
    q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
    segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=-1)
  return attention.untyped_kernel(rows)(q, k, v, segment_ids)[:, :length]


def _segment_windows_pay(length: int) -> bool:
  """Packed rows on CPU: `attention.segment_attention` (each query block over its own
  chains' key window) where the row holds at least two blocks; measured in
  BENCHMARKS.md "Packed ESM rows"."""
  block = attention.SEGMENT_BLOCK
  return length % block == 0 and length >= 2 * block


def _choose_attention(kind: str, shape, dtype, packed: bool):
  """(name, fn(q, k, v, layout)) of the attention run for `kind` on q, k, v of `shape`
  [B, L, H, hd] and `dtype`; packed: a pair mask (several chains per row).

  kind 'exact': einsum reference. 'splash' / 'flash_gpu': the Pallas kernels
  (`_pallas_attention`). 'auto': by backend - CPU: `_cpu_attention` (same maths,
  CPU-friendly arrangement), packed rows by key windows where `_segment_windows_pay`;
  TPU: splash when L is a multiple of PALLAS_BLOCK; GPU with bf16/fp16 compute: cuDNN
  fused attention (XLA's jax.nn.dot_product_attention, with a warning, where cuDNN
  refuses the shapes); otherwise XLA's.
  """
  backend = jax.default_backend()
  length = shape[1]
  pallas = lambda rows: lambda q, k, v, layout: _pallas_attention(
      rows, q, k, v, layout.segment_ids)
  if kind == "exact":
    return "exact (einsum, float32 softmax)", lambda q, k, v, layout: _exact_attention(
        q, k, v, layout.mask)
  if kind == "flash_gpu":
    where = "" if backend == "gpu" else ", interpreted"
    return (f"flash_gpu (Pallas Triton{where}; every key block computed)",
            pallas(_flash_gpu_rows))
  if kind == "splash" or (backend == "tpu" and length % PALLAS_BLOCK == 0):
    where = "" if backend == "tpu" else ", interpreted"
    return (f"splash (Pallas{where}; key blocks of other chains skipped)",
            pallas(_splash_rows))
  if backend == "cpu":
    if packed and _segment_windows_pay(length):
      return ("key windows (attention.segment_attention)",
              lambda q, k, v, layout: attention.segment_attention(q, k, v,
                                                                  layout.segment_ids))
    return "masked_attention (CPU)", lambda q, k, v, layout: _cpu_attention(
        q, k, v, layout.mask)
  if backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    refusal = _cudnn_refusal(shape, dtype, packed)
    if refusal is None:
      return ("cuDNN fused (jax.nn.dot_product_attention)" if not packed else
              "jax.nn.dot_product_attention with the same-chain mask",
              lambda q, k, v, layout: _gpu_attention(q, k, v, layout.mask))
    _warn_cudnn_refused(refusal)
    return (f"XLA jax.nn.dot_product_attention (cuDNN refused: {refusal})",
            lambda q, k, v, layout: _xla_attention(q, k, v, layout.mask))
  return "XLA jax.nn.dot_product_attention", lambda q, k, v, layout: _xla_attention(
      q, k, v, layout.mask)


def describe_attention(cfg: "ESM2Config", rows: int, length: int, packed: bool) -> str:
  """What `_attention` runs for `cfg` on a token grid [rows, length], e.g. 'splash
  (Pallas, interpreted; key blocks of other chains skipped) on 768-token packed rows'
  (for the log line of each compiled step)."""
  shape = (rows, length, cfg.num_heads, cfg.head_dim)
  name, _ = _choose_attention(cfg.attention, shape, cfg.dtype, packed)
  layout = "packed" if packed else "one-chain"
  padded = -length % PALLAS_BLOCK if cfg.attention in PALLAS_KINDS else 0
  pad_note = f", padded to {length + padded} in the kernel" if padded else ""
  return f"{name} on {length}-token {layout} rows{pad_note}"


def _attention(q, k, v, layout: AttentionLayout, kind):
  """Softmax attention, q already scaled. q, k, v [B, L, H, hd]; layout from
  `attention_layout`; kind: `ESM2Config.attention`, resolved by `_choose_attention`."""
  _, fn = _choose_attention(kind, q.shape, q.dtype, layout.mask.ndim == 3)
  return fn(q, k, v, layout)


def _transformer_layer(p, h, layout, cos, sin, lora=None, *, cfg: ESM2Config):
  """One pre-LN ESM-2 layer. p: one layer's params (no layer axis); h [B, L, D] in
  cfg.residual_dtype (kept); lora: that layer's adapters (params['lora'] sliced) or
  None. Matmul inputs are cfg.dtype, LayerNorm statistics float32."""
  dtype = cfg.dtype
  b, length, d = h.shape
  x = _layer_norm(h, p["self_attn_layer_norm"], cfg.layer_norm_eps, dtype)
  # One fused q|k|v matmul (on an H100 this measured faster than a projection-major
  # einsum or three separate matmuls).
  qkv = _dense(x, p["qkv_proj"], dtype)
  deltas = [_lora_delta(x, lora, t, cfg) for t in ("q", "k", "v")]
  if any(delta is not None for delta in deltas):
    zero = jnp.zeros((b, length, d), dtype)
    qkv = qkv + jnp.concatenate([zero if delta is None else delta for delta in deltas],
                                axis=-1)
  qkv = qkv.reshape(b, length, 3, cfg.num_heads, cfg.head_dim)
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  q = q * jnp.asarray(cfg.head_dim ** -0.5, dtype)  # before rotary, as the original
  q = _apply_rotary(q, cos, sin)
  k = _apply_rotary(k, cos, sin)
  attn = _attention(q, k, v, layout, cfg.attention).reshape(b, length, d)
  # Branch outputs (compute dtype) join the stream in its own dtype (cfg.residual_dtype).
  h = h + _adapted(attn, p["out_proj"], lora, "out", cfg).astype(h.dtype)
  x = _layer_norm(h, p["final_layer_norm"], cfg.layer_norm_eps, dtype)
  x = jax.nn.gelu(_adapted(x, p["fc1"], lora, "fc1", cfg), approximate=False)
  return h + _adapted(x, p["fc2"], lora, "fc2", cfg).astype(h.dtype)


def _constant_if(frozen: bool, params):
  """`params` as constants of the computation (no gradient, no weight-gradient work)."""
  return jax.tree.map(jax.lax.stop_gradient, params) if frozen else params


# --- parameter initialisation ----------------------------------------------------------


def _normal(key, shape):
  return 0.02 * jax.random.normal(key, shape, jnp.float32)


def _init_norm(shape):
  return {"scale": jnp.ones(shape, jnp.float32), "bias": jnp.zeros(shape, jnp.float32)}


def _init_dense(key, shape_in_out, lead=()):
  d_in, d_out = shape_in_out
  return {"kernel": _normal(key, (*lead, d_in, d_out)),
          "bias": jnp.zeros((*lead, d_out), jnp.float32)}


def _init_layers(cfg: "ESM2Config", key) -> dict:
  """params['layers']: every layer's parameters stacked on a leading [S] axis."""
  d, f, s = cfg.embed_dim, cfg.ffn_dim, cfg.num_layers
  k = jax.random.split(key, 4)
  return {
      "self_attn_layer_norm": _init_norm((s, d)),
      "qkv_proj": _init_dense(k[0], (d, 3 * d), (s,)),
      "out_proj": _init_dense(k[1], (d, d), (s,)),
      "final_layer_norm": _init_norm((s, d)),
      "fc1": _init_dense(k[2], (d, f), (s,)),
      "fc2": _init_dense(k[3], (f, d), (s,)),
  }


def _init_lora(cfg: "ESM2Config", key) -> dict:
  """params['lora']: A (uniform ±1/sqrt(d_in)) and B (zero) per target, stacked [S]."""
  out = {}
  shapes = cfg.lora_shapes()
  for t, key_t in zip(shapes, jax.random.split(key, len(LORA_TARGETS))):
    d_in, d_out = shapes[t]
    bound = d_in ** -0.5
    out[t] = {"a": jax.random.uniform(key_t, (cfg.num_layers, d_in, cfg.lora_rank),
                                      jnp.float32, -bound, bound),
              "b": jnp.zeros((cfg.num_layers, cfg.lora_rank, d_out), jnp.float32)}
  return out


@functools.lru_cache(maxsize=None)
def _stacked_shapes(cfg: "ESM2Config") -> tuple[dict, dict | None]:
  """Global shapes of params['layers'] and params['lora'] (None without adapters): what
  `fsdp.gather` needs inside a body that only sees this device's pieces."""
  shape_of = lambda init: jax.eval_shape(functools.partial(init, cfg), jax.random.key(0))
  return shape_of(_init_layers), (shape_of(_init_lora) if cfg.lora_rank else None)


def _stack_init(init, cfg: "ESM2Config", shapes: dict):
  """The initializer of a stacked tree (`_init_layers`, `_init_lora`) for `self.param`.

  Inside a step body with the layers split over 'fsdp' (`fsdp.active_size()` > 1) the
  existing parameters are this device's pieces, and Flax checks their shapes against
  the initializer's output: there it describes the pieces (it never runs then: the
  parameters exist)."""
  size = fsdp.active_size()
  if size == 1:
    return functools.partial(init, cfg)
  return lambda key: jax.tree.map(
      lambda s: jnp.zeros(fsdp.local_shape(s.shape, size), s.dtype), shapes)


# Primitives that only move or cast values: how a layer's weights reach its matmuls
# (slice of the stack, squeeze, cast, FSDP's all-gather, also as a custom VJP, the
# device-varying cast inside shard_map, broadcast of a vector, checkpoint names).
_WEIGHT_READ_PRIMITIVES = frozenset({
    "dynamic_slice", "slice", "squeeze", "reshape", "convert_element_type",
    "all_gather", "custom_vjp_call", "pvary", "broadcast_in_dim", "name"})


def _save_all_but_weight_reads(weight_shapes: frozenset[tuple[int, ...]]):
  """Checkpoint policy: save every value a layer computes except its weight reads.

  jax 0.10's `save_anything_except_these_names` saves everything (it is
  `lambda *_, **__: True`), and a policy refusing only the named values would still
  save their producers (the sliced, cast, gathered weights): a value recomputed in
  the backward pass needs its inputs saved unless they too are recomputed. So this
  policy refuses every step of the read: a primitive of `_WEIGHT_READ_PRIMITIVES`
  whose array operands all have a shape in `weight_shapes` (the stacked leaves, one
  layer's slice of them, whole or as this device's FSDP piece). Activations have
  [B, L, ...] shapes; one that matched by coincidence would only be recomputed.
  """
  def saveable(prim, *avals, **params):
    if prim.name == "name" and params["name"] in (LAYER_WEIGHTS, fsdp.GATHERED):
      return False
    arrays = [a.shape for a in avals if getattr(a, "ndim", 0)]
    return not (prim.name in _WEIGHT_READ_PRIMITIVES and arrays
                and all(shape in weight_shapes for shape in arrays))
  return saveable


def _weight_read_shapes(stacked_shapes, size: int) -> frozenset[tuple[int, ...]]:
  """Shapes a weight takes on its way from the stack [S, ...] to a matmul: the stack
  (this device's piece under FSDP `size` > 1), one layer's [1, ...] slice of it, the
  squeezed slice, and the whole (gathered) layer."""
  out = set()
  for leaf in jax.tree.leaves(stacked_shapes):
    piece = fsdp.local_shape(tuple(leaf.shape), size)
    out |= {tuple(leaf.shape), piece, (1, *piece[1:]), piece[1:], tuple(leaf.shape[1:])}
  return frozenset(out)


def _layer_fn(cfg: "ESM2Config", layers, lora, layout, cos, sin):
  """fn(i, h): layer i (0-based, traced or static) of the stacked trees applied to h.

  The layer's weights are read from the whole stack INSIDE the function, and the
  function is rematerialised with a policy that never saves them
  (`_save_all_but_weight_reads`), so a scan over i copies no weights: slicing the
  stack per layer range (xs of a scan) would materialise a copy of every layer it
  covers, and saving each layer's slice for the backward pass another. The backward
  pass reads each layer's weights from the stack again. With cfg.remat nothing else
  is saved either (the whole layer is recomputed); otherwise every activation is.

  Inside a step body with the layers split over 'fsdp' (`fsdp.active_size()` > 1),
  the layer's pieces are all-gathered first (`fsdp.gather`); the gathered weights are
  not saved either, so the backward pass gathers them again.
  """
  flat_shapes = lambda tree: (None if tree is None else flax.traverse_util.flatten_dict(
      flax.core.unfreeze(tree)))
  stacked = _stacked_shapes(cfg)
  layer_shapes, lora_shapes = map(flat_shapes, stacked)
  gathering = fsdp.active_size() > 1

  def layer_slice(tree, shapes, i):
    """Layer i of a stacked tree; `shapes`: its global leaf shapes by flat path."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))
    out = {}
    for path, a in flat.items():
      x = checkpoint_name(jax.lax.dynamic_index_in_dim(a, i, keepdims=False),
                          LAYER_WEIGHTS)
      out[path] = fsdp.gather(x, shapes[path].shape, cfg.dtype) if gathering else x
    return flax.traverse_util.unflatten_dict(out)

  def one(i, h):
    p = layer_slice(layers, layer_shapes, i)
    adapters = None if lora is None else layer_slice(lora, lora_shapes, i)
    return _transformer_layer(p, h, layout, cos, sin, adapters, cfg=cfg)

  policy = None if cfg.remat else _save_all_but_weight_reads(
      _weight_read_shapes(stacked, fsdp.active_size()))
  return jax.checkpoint(one, prevent_cse=not cfg.scan_layers, policy=policy)


# --- the model -------------------------------------------------------------------------


@flax.struct.dataclass
class ESM2Output:
  """last_hidden_state [B, L, D] (after emb_layer_norm_after); hidden_states: tuple of
  S + 1 arrays [B, L, D] (embeddings, layers 1..S-1, and the final normed state, as
  transformers and fair-esm report them) or None; logits [B, L, V] float32 or None."""
  last_hidden_state: Any
  hidden_states: Any = None
  logits: Any = None


class ESM2(nn.Module):
  """ESM-2 encoder with stacked layers. See the module docstring for the param tree."""
  config: ESM2Config

  def setup(self):
    cfg = self.config
    d, v = cfg.embed_dim, cfg.vocab_size

    def init_embedding(key):
      emb = _normal(key, (v, d))
      return {"embedding": emb.at[rc.ESM_PAD].set(0.0)}  # torch padding_idx row is zero

    def init_lm_head(key):
      return {"dense": _init_dense(key, (d, d)), "layer_norm": _init_norm((d,)),
              "bias": jnp.zeros((v,), jnp.float32)}

    self.embed_tokens = self.param(EMBEDDING_PARAM, init_embedding)
    layer_shapes, lora_shapes = _stacked_shapes(cfg)
    self.layers = self.param(LAYERS_PARAM, _stack_init(_init_layers, cfg, layer_shapes))
    self.emb_layer_norm_after = self.param(FINAL_NORM_PARAM, lambda _: _init_norm((d,)))
    self.lora = (self.param(LORA_PARAM, _stack_init(_init_lora, cfg, lora_shapes))
                 if cfg.lora_rank else None)
    if cfg.mlm_head:
      self.lm_head = self.param("lm_head", init_lm_head)

  def embed(self, tokens, segments=None):
    """Token embeddings with token dropout and padding mask.

    Args:
      tokens: int [B, L].
      segments: optional int [B, L] chain of each token within its row (packed rows,
        see `segment_positions`); token dropout's observed-mask ratio is then taken per
        chain, as fair-esm takes it per sequence.

    Returns:
      [B, L, D] in cfg.residual_dtype.
    """
    cfg = self.config
    table = _constant_if(cfg.frozen_embedding, self.embed_tokens["embedding"])
    x = jnp.take(table, tokens, axis=0)  # float32
    real = tokens != rc.ESM_PAD
    if cfg.token_dropout:
      is_mask = tokens == rc.ESM_MASK
      x = jnp.where(is_mask[..., None], 0.0, x)
      if segments is None:
        num_real, num_masked = real.sum(-1, keepdims=True), is_mask.sum(-1, keepdims=True)
      else:  # per (row, chain): ids row * L + segment, summed and read back per token
        rows, length = tokens.shape
        ids = (jnp.arange(rows)[:, None] * length + jnp.clip(segments, 0, length - 1))
        ids = ids.reshape(-1)
        count = lambda a: jax.ops.segment_sum(a.reshape(-1).astype(jnp.int32), ids,
                                              num_segments=rows * length)[ids].reshape(
                                                  tokens.shape)
        num_real, num_masked = count(real), count(is_mask)
      # max(., 1): all-padding rows (batch padding) stay finite instead of 0/0.
      ratio_observed = (num_masked.astype(jnp.float32)
                        / jnp.maximum(num_real, 1).astype(jnp.float32))
      x = x * ((1.0 - MASK_RATIO_TRAIN) / (1.0 - ratio_observed))[..., None]
    x = x * real[..., None].astype(x.dtype)
    return x.astype(cfg.residual_dtype)

  def run_layers(self, h, tokens, start: int, stop: int, collect: bool = False,
                 segments=None):
    """Layers (start, stop] on h [B, L, D]: 1-based layers start+1..stop, which are
    params['layers'][start:stop] (0-based). h comes from `embed` or an earlier range.

    start, stop: static python ints, 0 <= start <= stop <= num_layers. segments:
    optional int [B, L] for packed rows (several chains per row): attention stays
    within a chain and rotary positions restart at each chain. Returns h, or
    (h, per-layer outputs [stop - start, B, L, D]) if collect, in cfg.residual_dtype.
    """
    cfg = self.config
    if not (0 <= start <= stop <= cfg.num_layers):
      raise ValueError(f"layer range ({start}, {stop}] outside 0..{cfg.num_layers}")
    h = h.astype(cfg.residual_dtype)
    if start == stop:
      return (h, jnp.zeros((0, *h.shape), h.dtype)) if collect else h
    layout = attention_layout(tokens, segments)
    cos, sin = rotary_tables(h.shape[1], cfg.head_dim)  # static: constants in the program
    if segments is not None:
      positions = segment_positions(segments)
      cos, sin = jnp.asarray(cos)[positions], jnp.asarray(sin)[positions]
    def apply(h, first, last):
      """Layers (first, last]: scanned over the layer index, or unrolled."""
      # Adapters train whatever is frozen: never constants.
      one = _layer_fn(cfg, _constant_if(last <= cfg.frozen_layers, self.layers),
                      self.lora, layout, cos, sin)
      if cfg.scan_layers:
        def body(carry, i):
          out = one(i, carry)
          return out, (out if collect else None)
        return jax.lax.scan(body, h, jnp.arange(first, last))
      outs = []
      for i in range(first, last):
        h = one(i, h)
        outs.append(h)
      return h, (jnp.stack(outs) if collect else None)

    # Frozen and trainable layers run as separate pieces, so the frozen slice of the
    # stacked parameters is a constant as a whole (inside one scan it would not be).
    pieces = [(a, b) for a, b in ((start, min(stop, max(start, cfg.frozen_layers))),
                                  (max(start, cfg.frozen_layers), stop)) if a < b]
    outs = []
    for first, last in pieces:
      h, out = apply(h, first, last)
      outs.append(out)
    if not collect:
      return h
    return h, (outs[0] if len(outs) == 1 else jnp.concatenate(outs))

  def final_norm(self, h):
    """emb_layer_norm_after. h [B, L, D] -> [B, L, D] in cfg.dtype."""
    cfg = self.config
    params = _constant_if(cfg.frozen_final_norm, self.emb_layer_norm_after)
    return _layer_norm(h, params, cfg.layer_norm_eps, cfg.dtype)

  def mlm_logits(self, h):
    """MLM head on final (normed) states h [B, L, D] -> float32 logits [B, L, V]."""
    cfg = self.config
    if not cfg.mlm_head:
      raise ValueError("this ESM2 has no MLM head (config.mlm_head=False)")
    p = self.lm_head
    x = jax.nn.gelu(_dense(h.astype(cfg.dtype), p["dense"], cfg.dtype), approximate=False)
    x = _layer_norm(x, p["layer_norm"], cfg.layer_norm_eps, cfg.dtype)
    table = _constant_if(cfg.frozen_embedding, self.embed_tokens["embedding"])
    logits = jnp.dot(x, table.T.astype(cfg.dtype),
                     preferred_element_type=jnp.float32)
    return logits + p["bias"]

  def __call__(self, tokens, return_mlm_logits: bool = False,
               output_hidden_states: bool = True, segments=None) -> ESM2Output:
    """Full forward. tokens int [B, L] (from `tokenize`); segments: optional int [B, L]
    for packed rows (see `run_layers`)."""
    cfg = self.config
    h = self.embed(tokens, segments)
    if output_hidden_states:
      h_last, outs = self.run_layers(h, tokens, 0, cfg.num_layers, collect=True,
                                     segments=segments)
      final = self.final_norm(h_last)
      hidden = (h, *(outs[i] for i in range(cfg.num_layers - 1)), final)
    else:
      final = self.final_norm(self.run_layers(h, tokens, 0, cfg.num_layers,
                                              segments=segments))
      hidden = None
    logits = self.mlm_logits(final) if return_mlm_logits else None
    return ESM2Output(last_hidden_state=final, hidden_states=hidden, logits=logits)


def merge_lora(cfg: ESM2Config, params: dict) -> tuple[ESM2Config, dict]:
  """(config, params) of a plain model computing what the adapted one computes: each
  adapted kernel W [S, d_in, d_out] becomes W + (alpha / r) · A B; params['lora'] is
  dropped and lora_rank set to 0. Float32 arithmetic."""
  if not cfg.lora_rank:
    return cfg, params
  params = dict(params)
  lora = params.pop(LORA_PARAM)
  layers = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params[LAYERS_PARAM])
  d = cfg.embed_dim
  for t, ab in lora.items():
    delta = cfg.lora_scale * jnp.einsum("sir,sro->sio", jnp.asarray(ab["a"], jnp.float32),
                                        jnp.asarray(ab["b"], jnp.float32))
    if t in ("q", "k", "v"):
      k = ("q", "k", "v").index(t)
      kernel = layers["qkv_proj"]["kernel"]
      layers["qkv_proj"] = {**layers["qkv_proj"],
                            "kernel": kernel.at[..., k * d:(k + 1) * d].add(delta)}
    else:
      name = "out_proj" if t == "out" else t
      layers[name] = {**layers[name], "kernel": layers[name]["kernel"] + delta}
  params[LAYERS_PARAM] = layers
  return dataclasses.replace(cfg, lora_rank=0), params


def init_params(cfg: ESM2Config, seed: int = 0, length: int = 8) -> dict:
  """Random float32 parameters (normal(0.02) kernels, like the torch references)."""
  tokens = jnp.zeros((1, length), jnp.int32)
  return ESM2(cfg).init(jax.random.PRNGKey(seed), tokens)["params"]


def param_shapes(cfg: ESM2Config) -> dict:
  """Parameter tree of ShapeDtypeStructs, no allocation (jax.eval_shape)."""
  return jax.eval_shape(lambda: init_params(cfg))


def num_params(cfg: ESM2Config) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(param_shapes(cfg)))


def from_pretrained(path: str, **overrides) -> tuple[ESM2, dict]:
  """Model and float32 params from a Hugging Face ESM directory (config.json +
  model.safetensors / pytorch_model.bin), a fair-esm `.pt` file, or a directory written
  by `python -m bihier_jax.convert_esm`. overrides: execution options of ESM2Config
  (dtype, f32_residual, remat, scan_layers, attention, mlm_head=False drops the head)."""
  from bihier_jax.models.esm2 import checkpoint as esm2_checkpoint  # pylint: disable=import-outside-toplevel
  cfg, params = esm2_checkpoint.load_pretrained(path, **overrides)
  return ESM2(cfg), params
