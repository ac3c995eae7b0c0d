"""The pure functions of one ESM-2 layer: `rotary_tables`, `apply_rotary`, `layer_norm`,
`dense`, `lora_delta`, `transformer_layer` (pre-LN attention + GELU FFN, LoRA on the
adapted projections), and `constant_if` (frozen parameters as constants). Parameters
come in as arrays of one layer (no layer axis); the layer maths: docs/model.md "ESM-2".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from bihier_jax.models import attention_backends
from bihier_jax.models.esm2.config import ESM2Config

ROTARY_BASE = 10000.0


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


def apply_rotary(x, cos, sin):
  """x [B, L, H, hd]; cos, sin [L, hd] (one position per column) or [B, L, hd]."""
  cos = (cos[None] if cos.ndim == 2 else cos)[:, :, None, :].astype(x.dtype)
  sin = (sin[None] if sin.ndim == 2 else sin)[:, :, None, :].astype(x.dtype)
  return x * cos + _rotate_half(x) * sin


def layer_norm(x, p, eps, dtype):
  """LayerNorm over the last axis in float32; result in `dtype`."""
  x = x.astype(jnp.float32)
  mean = x.mean(-1, keepdims=True)
  centred = x - mean
  var = jnp.mean(centred * centred, axis=-1, keepdims=True)
  y = centred * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]
  return y.astype(dtype)


def dense(x, p, dtype):
  return jnp.dot(x, p["kernel"].astype(dtype)) + p["bias"].astype(dtype)


def lora_delta(x, lora, target: str, cfg):
  """(alpha / r) · B A x of one adapted projection, or None where it is not adapted."""
  if lora is None or target not in lora:
    return None
  dtype = cfg.dtype
  low = jnp.dot(x, lora[target]["a"].astype(dtype))
  return jnp.dot(low, lora[target]["b"].astype(dtype)) * jnp.asarray(cfg.lora_scale, dtype)


def _adapted(x, p, lora, target: str, cfg):
  y = dense(x, p, cfg.dtype)
  delta = lora_delta(x, lora, target, cfg)
  return y if delta is None else y + delta


def transformer_layer(p, h, layout, cos, sin, lora=None, *, cfg: ESM2Config):
  """One pre-LN ESM-2 layer. p: one layer's params (no layer axis); h [B, L, D] in
  cfg.residual_dtype (kept); lora: that layer's adapters (params['lora'] sliced) or
  None. Matmul inputs are cfg.dtype, LayerNorm statistics float32."""
  dtype = cfg.dtype
  b, length, d = h.shape
  x = layer_norm(h, p["self_attn_layer_norm"], cfg.layer_norm_eps, dtype)
  # One fused q|k|v matmul (on an H100 this measured faster than a projection-major
  # einsum or three separate matmuls).
  qkv = dense(x, p["qkv_proj"], dtype)
  deltas = [lora_delta(x, lora, t, cfg) for t in ("q", "k", "v")]
  if any(delta is not None for delta in deltas):
    zero = jnp.zeros((b, length, d), dtype)
    qkv = qkv + jnp.concatenate([zero if delta is None else delta for delta in deltas],
                                axis=-1)
  qkv = qkv.reshape(b, length, 3, cfg.num_heads, cfg.head_dim)
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  q = q * jnp.asarray(cfg.head_dim ** -0.5, dtype)  # before rotary, as the original
  q = apply_rotary(q, cos, sin)
  k = apply_rotary(k, cos, sin)
  attn = attention_backends.attend(q, k, v, layout, cfg.attention).reshape(b, length, d)
  # Branch outputs (compute dtype) join the stream in its own dtype (cfg.residual_dtype).
  h = h + _adapted(attn, p["out_proj"], lora, "out", cfg).astype(h.dtype)
  x = layer_norm(h, p["final_layer_norm"], cfg.layer_norm_eps, dtype)
  x = jax.nn.gelu(_adapted(x, p["fc1"], lora, "fc1", cfg), approximate=False)
  return h + _adapted(x, p["fc2"], lora, "fc2", cfg).astype(h.dtype)


def constant_if(frozen: bool, params):
  """`params` as constants of the computation (no gradient, no weight-gradient work)."""
  return jax.tree.map(jax.lax.stop_gradient, params) if frozen else params

