"""Softmax attention with an additive mask and a closed-form backward.

Shared by the ESM-2 port (its CPU path) and global fusion. The maths is plain
softmax(q kᵀ + bias) v; the arrangement is what makes it fast on CPU (measured on the
2-core dev VM, BENCHMARKS.md):

- operands head-major [B, H, T, c], so both products are plain batched GEMMs;
- the forward divides the [T, c] output by the softmax denominator instead of
  normalising the [T, T] weights (one pass fewer over the scores): ESM-2 t12_35M forward
  8 x 256 went from 4,250 to 4,950 tokens/s;
- the backward uses dlogits = w ⊙ (dw − Σ_k dw ⊙ w) on the saved weights, shorter than
  autodiff's chain over the [B, H, T, T] tensors: ESM-2 t6_8M forward + backward
  815 -> 720 ms, a global-fusion block 56 -> 49 ms;
- on CPU, training with a key count that is a multiple of 256 adds 8 masked padding
  keys (see `_CPU_SLOW_KEY_MULTIPLE`).

Memory: the whole [B, H, T, T] score tensor is materialised (the weights are kept for the
backward), 4·B·H·T² bytes; 671 MB for 8 x 20 heads x 1024².
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

# Logit of a forbidden (query, key) pair: the most negative finite float32, as
# transformers' ESM uses. Finite, so a query with no allowed key gets uniform weights
# (its output is meaningless and masked by the caller) instead of NaN.
MASKED_LOGIT = float(np.finfo(np.float32).min)


def _head_major(x):
  """[B, T, H, c] <-> [B, H, T, c]."""
  return jnp.transpose(x, (0, 2, 1, 3))


def _logits(q, k, bias):
  return jnp.einsum("bhqc,bhkc->bhqk", q, k, preferred_element_type=jnp.float32) + bias


# On XLA:CPU, attention training steps whose key count is a multiple of 256 run
# 1.05-1.6x slower than with 8 more keys (score rows a multiple of 1 KiB apart:
# cache-set conflicts; measured on the dev VM, BENCHMARKS.md "Attention on CPU"). So
# there the differentiated path adds 8 masked zero keys: same result, a few % more
# arithmetic. The undifferentiated forward does not gain from it and stays as is.
_CPU_SLOW_KEY_MULTIPLE = 256
_CPU_KEY_PADDING = 8


def _key_padding(num_keys: int) -> int:
  slow = jax.default_backend() == "cpu" and num_keys % _CPU_SLOW_KEY_MULTIPLE == 0
  return _CPU_KEY_PADDING if slow else 0


def _pad_keys(k, v, bias, pad: int):
  """k, v [B, H, S, c] and bias (broadcastable to [..., S]) with `pad` more keys: zero
  vectors, masked by `MASKED_LOGIT`."""
  bias = jnp.broadcast_to(bias, bias.shape[:-1] + (k.shape[2],))
  kv_pad = ((0, 0), (0, 0), (0, pad), (0, 0))
  bias_pad = ((0, 0),) * (bias.ndim - 1) + ((0, pad),)
  return (jnp.pad(k, kv_pad), jnp.pad(v, kv_pad),
          jnp.pad(bias, bias_pad, constant_values=MASKED_LOGIT))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attend(q, k, v, bias, key_padding: int):
  """Head-major attention: q, k, v [B, H, T, c]; bias broadcastable to [B, H, T, T].
  key_padding: masked keys the differentiated path adds (`_key_padding`)."""
  del key_padding
  logits = _logits(q, k, bias)
  unnormalised = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
  total = jnp.sum(unnormalised, axis=-1, keepdims=True)  # >= 1: the max term is exp(0)
  out = jnp.einsum("bhqk,bhkc->bhqc", unnormalised.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return (out / total).astype(v.dtype)


def _attend_fwd(q, k, v, bias, key_padding):
  padded_bias = bias
  if key_padding:
    k, v, padded_bias = _pad_keys(k, v, bias, key_padding)
  weights = jax.nn.softmax(_logits(q, k, padded_bias), axis=-1)  # float32
  out = jnp.einsum("bhqk,bhkc->bhqc", weights.astype(v.dtype), v)
  return out, (q, k, v, weights, bias)


def _attend_bwd(key_padding, residuals, g):
  q, k, v, weights, bias = residuals
  dv = jnp.einsum("bhqk,bhqc->bhkc", weights.astype(g.dtype), g)
  dw = jnp.einsum("bhqc,bhkc->bhqk", g, v, preferred_element_type=jnp.float32)
  dlogits = weights * (dw - jnp.sum(dw * weights, axis=-1, keepdims=True))
  dlogits = dlogits.astype(q.dtype)
  dq = jnp.einsum("bhqk,bhkc->bhqc", dlogits, k)
  dk = jnp.einsum("bhqk,bhqc->bhkc", dlogits, q)
  if key_padding:
    dk, dv = dk[:, :, :-key_padding], dv[:, :, :-key_padding]
  return dq, dk, dv, jnp.zeros_like(bias)


_attend.defvjp(_attend_fwd, _attend_bwd)


def mask_bias(allowed):
  """bool mask, True where a (query, key) pair may attend -> float32 additive bias
  (0 or `MASKED_LOGIT`), same shape."""
  return jnp.where(allowed, 0.0, MASKED_LOGIT).astype(jnp.float32)


def masked_attention(q, k, v, bias):
  """softmax(q kᵀ + bias) v, softmax in float32.

  Args:
    q: [B, T, H, c], already scaled; k, v: [B, T, H, c].
    bias: float32, broadcastable to [B, H, T, T], from `mask_bias`: 0 where a (query,
      key) pair may attend, `MASKED_LOGIT` where not ([B, 1, 1, T] for a key mask,
      [B, 1, T, T] for pairs).

  Returns:
    [B, T, H, c] in v's dtype. No gradient flows to `bias`.
  """
  return _head_major(_attend(_head_major(q), _head_major(k), _head_major(v), bias,
                             _key_padding(k.shape[1])))
