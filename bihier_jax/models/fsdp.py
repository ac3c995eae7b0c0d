"""Parameter sharding over the 'fsdp' mesh axis (ZeRO-3 style): which dimension of a
parameter is split, and the per-layer all-gather inside the model.

Layout. With `train.fsdp = F > 1` the mesh is ('data', 'fsdp') (see
`training.mesh`). Each large ESM-2 layer-stack leaf ([S, ...], S = layers) is split
into F pieces along one dimension that is not the layer axis (`shard_dim`), so a device
holds 1/F of every layer, and Adam's moments follow the same split. Everything else (the
GNN, the fusion modules, the heads, the token embedding, LayerNorms and small biases) is
replicated: together it is a few percent of a 3B/15B model.

Gathering. Inside the step's `shard_map` body (`gathering(F)` active), the ESM-2 stack
gathers ONE layer's pieces at a time, inside the scanned (and rematerialised) layer, with
`all_gather(..., tiled=True)`. Its transpose is a reduce-scatter, so the gradient of each
layer comes back already split: no device ever holds more than one whole layer's
weights or gradients. Kernels are cast to the compute dtype before the gather, which
halves the gathered bytes under bfloat16 and changes no number (the layer would cast
them anyway). The reduce-scatter of the gradients runs in float32 whatever the compute
dtype (a custom VJP: a bfloat16 sum over the group would round every partial sum to
8 bits, so FSDP and plain data-parallel bfloat16 runs would differ); it moves twice the
bytes of a bfloat16 one.

Outside `gathering` (one device, inference, `train.fsdp = 1`) `gather` is the identity.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Iterator

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

AXIS = "fsdp"
GATHERED = "fsdp_gathered"  # checkpoint name of gathered weights: never saved for the
# backward pass (the rematerialised layer gathers them again)
# Per-layer matrices smaller than this (entries) stay whole: gathering them costs more
# in latency than their memory is worth.
MIN_SHARDED_SIZE = 2 ** 10

_active_size = [1]  # the fsdp axis size while a step body is being traced


def shard_dim(shape: tuple[int, ...], size: int) -> int | None:
  """The dimension of a stacked-layer leaf [S, ...] split over `size` devices, or None.

  Only matrices are split (kernels and LoRA factors: one layer's slice shape[1:] is at
  least 2-D with MIN_SHARDED_SIZE entries or more; LayerNorms and biases stay whole),
  along the largest dimension after the layer axis that `size` divides (the last one on
  a tie); None when size is 1 or nothing qualifies. The layer axis itself is never
  split: the scan slices it, and a `last_n` slice [n, ...] of a leaf is split as the
  leaf is.
  """
  per_layer = tuple(shape[1:])
  if size <= 1 or len(per_layer) < 2 or math.prod(per_layer) < MIN_SHARDED_SIZE:
    return None
  dims = [d for d in range(1, len(shape)) if shape[d] % size == 0]
  if not dims:
    return None
  return max(dims, key=lambda d: (shape[d], d))


def local_shape(shape: tuple[int, ...], size: int) -> tuple[int, ...]:
  """One device's piece of a stacked-layer leaf of global `shape` (see shard_dim)."""
  dim = shard_dim(tuple(shape), size)
  if dim is None:
    return tuple(shape)
  return tuple(n // size if d == dim else n for d, n in enumerate(shape))


@contextlib.contextmanager
def gathering(size: int) -> Iterator[None]:
  """While tracing a shard_map body over the 'fsdp' axis of `size` devices: `gather`
  all-gathers split layer leaves."""
  previous = _active_size[0]
  _active_size[0] = int(size)
  try:
    yield
  finally:
    _active_size[0] = previous


def active_size() -> int:
  return _active_size[0]


def gather(leaf, stacked_shape: tuple[int, ...], dtype):
  """One layer's slice of a stacked leaf (its global shape `stacked_shape`), whole.

  Args:
    leaf: this device's piece of layer i: stacked_shape[1:] with the `shard_dim`
      dimension divided by the fsdp size (or whole when that leaf is not split).
    stacked_shape: the global [S, ...] shape of the stacked leaf.
    dtype: the compute dtype the layer casts this matrix to; a split leaf is cast
      before the gather, a whole one is returned as is.
  """
  size = _active_size[0]
  dim = shard_dim(tuple(stacked_shape), size)
  if dim is None:
    return leaf
  gathered = _gather_then_reduce_scatter_f32(leaf, dim - 1, jnp.dtype(dtype),
                                             jnp.dtype(leaf.dtype))
  return checkpoint_name(gathered, GATHERED)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _gather_then_reduce_scatter_f32(piece, axis: int, dtype, piece_dtype):
  """all_gather of `piece` cast to `dtype` over 'fsdp' along `axis`; its VJP
  reduce-scatters the cotangent in float32 and returns it in `piece_dtype`."""
  del piece_dtype  # used by the VJP only
  return jax.lax.all_gather(piece.astype(dtype), AXIS, axis=axis, tiled=True)


def _gather_fwd(piece, axis, dtype, piece_dtype):
  return _gather_then_reduce_scatter_f32(piece, axis, dtype, piece_dtype), None


def _reduce_scatter_f32(axis, dtype, piece_dtype, _, cotangent):
  del dtype
  summed = jax.lax.psum_scatter(cotangent.astype(jnp.float32), AXIS,
                                scatter_dimension=axis, tiled=True)
  return (summed.astype(piece_dtype),)


_gather_then_reduce_scatter_f32.defvjp(_gather_fwd, _reduce_scatter_f32)
