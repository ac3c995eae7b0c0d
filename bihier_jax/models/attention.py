"""CPU attention kernels with a closed-form backward: `masked_attention` (softmax(q kᵀ +
bias) v, bias from `mask_bias`, `MASKED_LOGIT`) and, for packed rows, `segment_attention`
(each query block over its chains' key window; `run_bounds`, `segment_windows`).

Shared by the ESM-2 port (its CPU path, through `attention_backends`) and global
fusion. Why the arrangement is fast on CPU, and what it keeps in memory: docs/model.md
"Attention on CPU".
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


# --- packed rows: attention inside each chain's window ------------------------------------
#
# In a packed row (several chains back to back, `<cls> seq <eos>` each) a query may only
# attend to keys of its own chain, so most of the row's [L, L] score grid is masked: on
# the realistic length distribution about half of it (BENCHMARKS.md "Packed ESM rows").
# `segment_attention` cuts the row into query blocks of `SEGMENT_BLOCK` tokens and gives
# each block the narrowest key window, a multiple of `SEGMENT_BLOCK` wide, that holds
# every chain its queries belong to (chains are contiguous, so that is one interval).
# The window width is data; each width is a branch of a `lax.switch`, so shapes stay
# static and only the chosen width is computed. The backward pass runs over the same
# windows, recomputing each block's weights (see `segment_attention`).

SEGMENT_BLOCK = 128


def run_bounds(segment_ids):
  """[start, end) of each token's contiguous run of one id in its row: int32 [B, L] x 2."""
  length = segment_ids.shape[1]
  column = jnp.arange(length, dtype=jnp.int32)[None]
  first = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                           segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  last = jnp.concatenate([segment_ids[:, :-1] != segment_ids[:, 1:],
                          jnp.ones_like(segment_ids[:, :1], bool)], axis=1)
  start = jax.lax.cummax(jnp.where(first, column, 0), axis=1)
  from_right = jnp.where(last, length - 1 - column, 0)[:, ::-1]
  end = length - jax.lax.cummax(from_right, axis=1)[:, ::-1]
  return start, end


def segment_windows(segment_ids, block: int = SEGMENT_BLOCK):
  """Key window of every block of `block` tokens of a packed row.

  segment_ids: int [B, L] (L a multiple of `block`), chains as contiguous runs of one
  id, -1 at padding. Returns (widths, starts), int32 [B, L // block]: the window holds
  keys [start, start + width · block), every key of every chain that a real token of
  the block belongs to; width 0 for a block of padding only.
  """
  b, length = segment_ids.shape
  start, end = run_bounds(segment_ids)
  blocks = (b, length // block, block)
  real = (segment_ids >= 0).reshape(blocks)
  lo = jnp.min(jnp.where(real, start.reshape(blocks), length), axis=-1)
  hi = jnp.max(jnp.where(real, end.reshape(blocks), 0), axis=-1)
  widths = (jnp.maximum(hi - lo, 0) + block - 1) // block
  starts = jnp.clip(lo, 0, length - jnp.maximum(widths, 1) * block)
  return widths.astype(jnp.int32), starts.astype(jnp.int32)


def _window_logits(q, k, q_ids, k_ids):
  """Logits [H, Tq, Tk] float32 of queries q [H, Tq, c] over keys k [H, Tk, c], with
  `MASKED_LOGIT` added where the ids differ or the query is padding."""
  allowed = (q_ids[:, None] == k_ids[None, :]) & (q_ids[:, None] >= 0)
  logits = jnp.einsum("hqc,hkc->hqk", q, k, preferred_element_type=jnp.float32)
  return logits + mask_bias(allowed)[None]


def _window_weights(q, k, q_ids, k_ids):
  """(unnormalised softmax weights [H, Tq, Tk] float32, their sum over keys [H, Tq, 1],
  the row maxima [H, Tq, 1]) of `_window_logits`."""
  logits = _window_logits(q, k, q_ids, k_ids)
  # A real query's own key is allowed, so the max is a real logit and masked entries
  # are exactly 0; a padding query gets uniform weights, zeroed by the caller.
  peak = jnp.max(logits, axis=-1, keepdims=True)
  unnormalised = jnp.exp(logits - peak)
  return unnormalised, jnp.sum(unnormalised, axis=-1, keepdims=True), peak


def _over_blocks(fn, widths, starts, block: int, length: int, carry=None, combine=None):
  """Run fn(row, block index, window start, width) over every block of every row.

  fn is traced once per static width 1..length // block and runs, through a
  `lax.switch`, only for the block's own width; a block of padding only (width 0) runs
  width 1, whose output fn zeroes at padding queries. (No separate zeros branch: inside
  shard_map its constant output would not match the other branches' device-varying
  type.) combine(carry, row, output) -> (carry, kept output), if given, runs after each
  block outside the switch (a carry passed through the switch's branches is copied in
  every block). Returns (final carry, the kept outputs with leading axes [B, L // block]).
  """
  b, num_blocks = widths.shape
  branches = [functools.partial(fn, width=w) for w in range(1, length // block + 1)]
  combine = combine or (lambda carry, row, out: (carry, out))

  def step(carry, pair):
    row, i, width, start = pair
    return combine(carry, row, jax.lax.switch(jnp.maximum(width, 1) - 1, branches, row, i,
                                              start))

  rows = jnp.repeat(jnp.arange(b, dtype=jnp.int32), num_blocks)
  index = jnp.tile(jnp.arange(num_blocks, dtype=jnp.int32), b)
  carry, out = jax.lax.scan(step, carry,
                            (rows, index, widths.reshape(-1), starts.reshape(-1)))
  return carry, jax.tree.map(lambda x: x.reshape((b, num_blocks) + x.shape[1:]), out)


def _blocks_to_row(x):
  """[B, nb, H, block, ...] -> [B, H, nb · block, ...]."""
  x = jnp.moveaxis(x, 2, 1)
  return x.reshape(x.shape[:2] + (-1,) + x.shape[4:])


def _slice_tokens(x, row, start, size: int):
  """x [B, H, L, ...] -> row `row`, tokens [start, start + size): [H, size, ...]."""
  x = jax.lax.dynamic_index_in_dim(x, row, axis=0, keepdims=False)
  return jax.lax.dynamic_slice_in_dim(x, start, size, axis=1)


def _slice_ids(ids, row, start, size: int):
  return jax.lax.dynamic_slice_in_dim(
      jax.lax.dynamic_index_in_dim(ids, row, axis=0, keepdims=False), start, size)


def _segment_forward(q, k, v, ids, block):
  """(output [B, H, L, c] in v's dtype, zeros at padding queries; log-sum-exp of each
  query's logits [B, H, L, 1] float32) of head-major q, k, v, by key windows."""
  length = q.shape[2]
  widths, starts = segment_windows(ids, block)

  def one(row, i, start, width):
    span = width * block
    q_ids = _slice_ids(ids, row, i * block, block)
    weights, total, peak = _window_weights(
        _slice_tokens(q, row, i * block, block), _slice_tokens(k, row, start, span), q_ids,
        _slice_ids(ids, row, start, span))
    out = jnp.einsum("hqk,hkc->hqc", weights.astype(v.dtype),
                     _slice_tokens(v, row, start, span), preferred_element_type=jnp.float32)
    out = jnp.where((q_ids >= 0)[None, :, None], out / total, 0.0).astype(v.dtype)
    return out, peak + jnp.log(total)

  _, (out, lse) = _over_blocks(one, widths, starts, block, length)
  return _blocks_to_row(out), _blocks_to_row(lse)


def _segment_backward(q, k, v, ids, out, lse, g, block):
  """(dq, dk, dv) of `_segment_forward`'s output for its cotangent g, by the same key
  windows, in one pass: each block recomputes its weights from the saved log-sum-exp
  (nothing [L, L]-sized is kept from the forward), gives its queries' dq and adds its
  keys' dk, dv into row-sized float32 accumulators."""
  length = q.shape[2]
  widths, starts = segment_windows(ids, block)
  # Σ_c g ⊙ out per query: the softmax backward's row term Σ_k w ⊙ dw, without w.
  row_term = jnp.sum(g.astype(jnp.float32) * out.astype(jnp.float32), -1, keepdims=True)

  def one(row, i, start, width):
    span = width * block
    q_ids = _slice_ids(ids, row, i * block, block)
    q_block, g_block = (_slice_tokens(x, row, i * block, block) for x in (q, g))
    k_window, v_window = (_slice_tokens(x, row, start, span) for x in (k, v))
    logits = _window_logits(q_block, k_window, q_ids, _slice_ids(ids, row, start, span))
    weights = jnp.exp(logits - _slice_tokens(lse, row, i * block, block))
    weights = jnp.where((q_ids >= 0)[None, :, None], weights, 0.0)
    dv = jnp.einsum("hqk,hqc->hkc", weights, g_block, preferred_element_type=jnp.float32)
    dw = jnp.einsum("hqc,hkc->hqk", g_block, v_window, preferred_element_type=jnp.float32)
    dlogits = weights * (dw - _slice_tokens(row_term, row, i * block, block))
    dk = jnp.einsum("hqk,hqc->hkc", dlogits, q_block, preferred_element_type=jnp.float32)
    dq = jnp.einsum("hqk,hkc->hqc", dlogits, k_window, preferred_element_type=jnp.float32)
    # The window's dk, dv placed in a row-long buffer: every branch returns one shape.
    place = lambda x: jax.lax.dynamic_update_slice(
        jnp.zeros((x.shape[0], length, x.shape[2]), x.dtype), x, (0, start, 0))
    return dq.astype(q.dtype), place(dk), place(dv)

  def accumulate(carry, row, out):
    """Adds a block's row-long dk, dv to its row's sums; keeps its dq."""
    dq, dk_row, dv_row = out
    add = lambda acc, x: jax.lax.dynamic_update_slice(
        acc, jax.lax.dynamic_index_in_dim(acc, row, 0) + x[None], (row, 0, 0, 0))
    return (add(carry[0], dk_row), add(carry[1], dv_row)), dq

  zeros = jnp.zeros_like(k, jnp.float32)
  (dk, dv), dq = _over_blocks(one, widths, starts, block, length, (zeros, zeros),
                              accumulate)
  return _blocks_to_row(dq), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _segment_attend(q, k, v, ids, block: int):
  """Head-major packed-row attention by key windows, forward and backward."""
  return _segment_forward(q, k, v, ids, block)[0]


def _segment_attend_fwd(q, k, v, ids, block):
  out, lse = _segment_forward(q, k, v, ids, block)
  return out, (q, k, v, ids, out, lse)


def _segment_attend_bwd(block, residuals, g):
  q, k, v, ids, out, lse = residuals
  return _segment_backward(q, k, v, ids, out, lse, g, block) + (
      np.zeros(ids.shape, jax.dtypes.float0),)


_segment_attend.defvjp(_segment_attend_fwd, _segment_attend_bwd)


def segment_attention(q, k, v, segment_ids, block: int = SEGMENT_BLOCK):
  """Attention of packed rows, each query over the keys of its own chain only.

  Each block of `block` queries attends over its key window only (`segment_windows`),
  in the forward and in the backward (flash-attention style: the backward recomputes a
  block's weights from the saved log-sum-exp of its logits, so no [L, L] tensor is
  kept between the passes). Same values as `masked_attention` with a same-chain mask.

  Args:
    q: [B, L, H, c], already scaled; k, v: [B, L, H, c]; L a multiple of `block`.
    segment_ids: int [B, L], each chain a contiguous run of one id, -1 at padding.
    block: query-block size and window granularity (tokens).

  Returns:
    [B, L, H, c] in v's dtype: softmax over same-chain keys, float32 softmax; zeros at
    padding queries.
  """
  ids = jnp.asarray(segment_ids, jnp.int32)
  out = _segment_attend(_head_major(q), _head_major(k), _head_major(v), ids, block)
  return jnp.where((ids >= 0)[:, :, None, None], _head_major(out), jnp.zeros((), v.dtype))
