"""The ESM-2 model (Lin et al., Science 2023) in Flax: `ESM2` (`embed`, `run_layers`,
`final_norm`, `mlm_logits`; layers stacked and scanned, remat policy that never saves
the weight reads, FSDP gather of each layer), `ESM2Output`, `merge_lora`, `init_params`,
`param_shapes`, `num_params` and `from_pretrained`.

Numerically fair-esm's `esm.model.esm2.ESM2` and transformers' `EsmModel` (≤ 1e-5 per
layer where float32 matmuls are exact). The layer maths, the parameter tree and the
dtypes: docs/model.md "ESM-2".
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax
import flax.linen as nn
import flax.struct
import flax.traverse_util
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from bihier_jax.common import residue_constants as rc
from bihier_jax.models import attention_backends
from bihier_jax.models import fsdp
from bihier_jax.models.esm2.config import (EMBEDDING_PARAM, FINAL_NORM_PARAM,
                                           LAYERS_PARAM, LORA_PARAM, LORA_TARGETS,
                                           ESM2Config)
from bihier_jax.models.esm2.layers import (constant_if, dense, layer_norm, rotary_tables,
                                           transformer_layer)

MASK_RATIO_TRAIN = 0.15 * 0.8  # fraction of tokens ESM-2 replaced by <mask> in training
# Checkpoint name of one layer's weights read from the stack (never saved for the
# backward pass: re-read, see _layer_fn).
LAYER_WEIGHTS = "esm_layer_weights"


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
    return transformer_layer(p, h, layout, cos, sin, adapters, cfg=cfg)

  policy = None if cfg.remat else _save_all_but_weight_reads(
      _weight_read_shapes(stacked, fsdp.active_size()))
  return jax.checkpoint(one, prevent_cse=not cfg.scan_layers, policy=policy)


@flax.struct.dataclass
class ESM2Output:
  """last_hidden_state [B, L, D] (after emb_layer_norm_after); hidden_states: tuple of
  S + 1 arrays [B, L, D] (embeddings, layers 1..S-1, and the final normed state, as
  transformers and fair-esm report them) or None; logits [B, L, V] float32 or None."""
  last_hidden_state: Any
  hidden_states: Any = None
  logits: Any = None


class ESM2(nn.Module):
  """ESM-2 encoder with stacked layers; the param tree: docs/model.md "ESM-2"."""
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
    table = constant_if(cfg.frozen_embedding, self.embed_tokens["embedding"])
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
    layout = attention_backends.attention_layout(tokens, segments)
    cos, sin = rotary_tables(h.shape[1], cfg.head_dim)  # static: constants in the program
    if segments is not None:
      positions = attention_backends.segment_positions(segments)
      cos, sin = jnp.asarray(cos)[positions], jnp.asarray(sin)[positions]
    def apply(h, first, last):
      """Layers (first, last]: scanned over the layer index, or unrolled."""
      # Adapters train whatever is frozen: never constants.
      one = _layer_fn(cfg, constant_if(last <= cfg.frozen_layers, self.layers),
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
    params = constant_if(cfg.frozen_final_norm, self.emb_layer_norm_after)
    return layer_norm(h, params, cfg.layer_norm_eps, cfg.dtype)

  def mlm_logits(self, h):
    """MLM head on final (normed) states h [B, L, D] -> float32 logits [B, L, V]."""
    cfg = self.config
    if not cfg.mlm_head:
      raise ValueError("this ESM2 has no MLM head (config.mlm_head=False)")
    p = self.lm_head
    x = jax.nn.gelu(dense(h.astype(cfg.dtype), p["dense"], cfg.dtype), approximate=False)
    x = layer_norm(x, p["layer_norm"], cfg.layer_norm_eps, cfg.dtype)
    table = constant_if(cfg.frozen_embedding, self.embed_tokens["embedding"])
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
  from bihier_jax.models.esm2 import checkpoint  # pylint: disable=import-outside-toplevel
  cfg, params = checkpoint.load_pretrained(path, **overrides)
  return ESM2(cfg), params
