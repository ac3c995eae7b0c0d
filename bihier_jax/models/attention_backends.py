"""ESM-2's attention backends: who attends to whom (`AttentionLayout`, `attention_layout`,
`segment_positions`), the kinds (`ATTENTION_KINDS`: exact, CPU, cuDNN, XLA, and the
Pallas kernels splash and flash_gpu) and `attend(q, k, v, layout, kind)`, which runs the
one `kind` picks for the backend (`describe_attention` names it for the logs). Also
what the Pallas kernels need: `block_visits` (splash's block skipping) and
`untyped_kernel` (a kernel inside the steps' shard_map). The CPU kernels themselves are
`attention.py`; the choice per backend: docs/model.md "ESM-2 attention backends".
"""

from __future__ import annotations

from typing import Any, NamedTuple

from absl import logging
import jax
import jax.extend
import jax.interpreters.batching
import jax.interpreters.mlir
import jax.numpy as jnp
import numpy as np

from bihier_jax.common import residue_constants as rc
from bihier_jax.common.esm_shapes import PALLAS_BLOCK, PALLAS_KINDS
from bihier_jax.models import attention

ATTENTION_KINDS = ("auto", "exact", "splash", "flash_gpu")


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
  `visits` (bool [nb, nb], `block_visits`; segment ids mask inside them).

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
  segment_ids [B, L]; each row's kernel visits only the blocks `block_visits`
  names (on TPU natively, elsewhere interpreted)."""
  from jax.experimental.pallas.ops.tpu import splash_attention  # pylint: disable=g-import-not-at-top
  interpret = jax.default_backend() != "tpu"
  visits = block_visits(segment_ids, PALLAS_BLOCK)

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
  id -1, their outputs are cut off), run through `untyped_kernel` so that it
  traces inside the steps' shard_map."""
  length = q.shape[1]
  pad = -length % PALLAS_BLOCK
  if pad:
    q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
    segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=-1)
  return untyped_kernel(rows)(q, k, v, segment_ids)[:, :length]


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


def describe_attention(cfg, rows: int, length: int, packed: bool) -> str:
  """What `attend` runs for `cfg` (an `ESM2Config`) on a token grid [rows, length],
  e.g. 'splash (Pallas, interpreted; key blocks of other chains skipped) on 768-token
  packed rows' (for the log line of each compiled step)."""
  shape = (rows, length, cfg.num_heads, cfg.head_dim)
  name, _ = _choose_attention(cfg.attention, shape, cfg.dtype, packed)
  layout = "packed" if packed else "one-chain"
  padded = -length % PALLAS_BLOCK if cfg.attention in PALLAS_KINDS else 0
  pad_note = f", padded to {length + padded} in the kernel" if padded else ""
  return f"{name} on {length}-token {layout} rows{pad_note}"


def attend(q, k, v, layout: AttentionLayout, kind):
  """Softmax attention, q already scaled. q, k, v [B, L, H, hd]; layout from
  `attention_layout`; kind: `ESM2Config.attention`, resolved by `_choose_attention`."""
  _, fn = _choose_attention(kind, q.shape, q.dtype, layout.mask.ndim == 3)
  return fn(q, k, v, layout)


def block_visits(segment_ids, block: int = attention.SEGMENT_BLOCK):
  """Which (query block, key block) pairs of a row a block-sparse kernel must compute.

  segment_ids: int [B, L] (L a multiple of `block`), -1 at padding. Returns bool
  [B, L // block, L // block]: True where a real query of query block i shares a chain
  with a key of key block j, and on the diagonal (every query, padding included, has
  at least its own block, so a kernel's softmax never sums over nothing). Other blocks
  hold no pair a real query may attend to; skipping them leaves every real query's
  output unchanged.
  """
  b, length = segment_ids.shape
  n = length // block
  ids = jnp.asarray(segment_ids, jnp.int32)
  same = (ids[:, :, None] == ids[:, None, :]) & (ids[:, :, None] >= 0)
  visits = same.reshape(b, n, block, n, block).any(axis=(2, 4))
  return visits | jnp.eye(n, dtype=bool)[None]


# --- Pallas kernels inside shard_map ------------------------------------------------------
#
# The steps run under `jax.shard_map(..., check_vma=True)`, which types every value with
# the mesh axes it varies over (vma). jax 0.10.2's Pallas attention kernels (splash, the
# Triton flash kernel) declare their outputs with untyped `jax.ShapeDtypeStruct`s, which
# `pallas_call` refuses there, and their custom VJPs and interpreters (CPU) compare
# those untyped results with typed inputs. `untyped_kernel` runs such a kernel in a
# nested shard_map over no axes with check_vma=False, on inputs whose vma type is
# dropped (`_drop_vma`, an identity), and types what comes out as varying over the
# inputs' axes again: a kernel maps one device's rows to the same device's rows, so
# that is their type. Everything outside the kernel keeps the check.

_drop_vma_p = jax.extend.core.Primitive("drop_vma")
_drop_vma_p.def_impl(lambda x: x)
_drop_vma_p.def_abstract_eval(
    lambda aval: aval.update(manual_axis_type=aval.mat.update(varying=frozenset())))
jax.interpreters.mlir.register_lowering(_drop_vma_p, lambda ctx, x: [x])
jax.interpreters.batching.primitive_batchers[_drop_vma_p] = (
    lambda args, dims: (_drop_vma_p.bind(args[0]), dims[0]))


def _drop_vma(tree):
  """`tree` with no vma type (identity on the values; only inside a region whose
  check_vma is off, where nothing relies on the type)."""
  return jax.tree.map(_drop_vma_p.bind, tree)


def _varying_axes(tree) -> tuple[str, ...]:
  """Mesh axes any leaf of `tree` varies over (none outside shard_map)."""
  axes = set()
  for x in jax.tree.leaves(tree):
    axes |= set(jax.typeof(x).mat.varying)
  return tuple(sorted(axes))


def _as_varying(tree, axes: tuple[str, ...]):
  """`tree` typed as varying over `axes` (no-op on the values)."""
  def one(x):
    missing = tuple(a for a in axes if a not in jax.typeof(x).mat.varying)
    return jax.lax.pcast(x, missing, to="varying") if missing else x
  return jax.tree.map(one, tree)


def _unchecked(fn, *args):
  """fn(*args) run on untyped values with the vma check off (a nested shard_map over
  no axes) when inside shard_map; the outputs are typed as varying over the axes of
  `args`. Outside shard_map: fn(*args)."""
  if not jax.sharding.get_abstract_mesh().manual_axes:
    return fn(*args)
  spec = jax.sharding.PartitionSpec()
  out = jax.shard_map(lambda *args: fn(*_drop_vma(args)), in_specs=(spec,) * len(args),
                      out_specs=spec, axis_names=frozenset(), check_vma=False)(*args)
  return _as_varying(out, _varying_axes(args))


def untyped_kernel(kernel):
  """A Pallas attention kernel made callable inside `shard_map(check_vma=True)`.

  kernel(q, k, v, segment_ids) -> out, differentiable in q, k, v (its own custom VJP is
  used). Returns a function of the same arguments and values whose outputs and
  gradients carry the inputs' vma type; outside shard_map it computes `kernel`. Build
  it inside the traced function: it keeps the kernel VJP's structure from the forward
  to the backward of one trace.
  """
  structure = {}  # the non-array parts of the kernel's VJP, from the forward's trace

  def forward(q, k, v, ids):
    out, pullback = jax.vjp(lambda q, k, v: kernel(q, k, v, ids), q, k, v)
    leaves, treedef = jax.tree.flatten(pullback)
    structure["pullback"] = treedef, [None if isinstance(x, jax.Array) else x
                                      for x in leaves]
    return out, [x for x in leaves if isinstance(x, jax.Array)]

  def backward(residuals, g):
    treedef, static = structure["pullback"]
    arrays = iter(residuals)
    return treedef.unflatten([next(arrays) if x is None else x for x in static])(g)

  @jax.custom_vjp
  def call(q, k, v, ids):
    return _unchecked(kernel, q, k, v, ids)

  def call_fwd(q, k, v, ids):
    out, residuals = _unchecked(forward, q, k, v, ids)
    return out, (residuals, ids)

  def call_bwd(saved, g):
    residuals, ids = saved
    return (*_unchecked(backward, residuals, g), np.zeros(ids.shape, jax.dtypes.float0))

  call.defvjp(call_fwd, call_bwd)
  return call
