"""Matrix-multiply FLOPs of a JAX function, counted exactly from its jaxpr.

    flops.matmul_flops(jax.value_and_grad(loss_fn), params, rng)

Counts 2 FLOPs per multiply-add of every `dot_general` and `conv_general_dilated` the
function traces, forward and (for a gradient function) backward alike. Elementwise work
(softmax, LayerNorm, dropout) is not counted: it is memory-bound, and what compares two
models' arithmetic is the matmul count.

Not XLA's `cost_analysis()`: it counts a loop body once, not once per trip (18 GFLOP
for a t6_8M training step counted here at 104 GFLOP).
Control flow (scan, cond, while, shard_map, remat, fused kernels): `matmul_flops`.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
from jax.extend import core as jax_core


def _dot_general_flops(eqn) -> int:
  (lhs_contracting, _), _ = eqn.params["dimension_numbers"]
  lhs = eqn.invars[0].aval
  macs_per_output = math.prod(lhs.shape[d] for d in lhs_contracting)
  return 2 * math.prod(eqn.outvars[0].aval.shape) * macs_per_output


def _conv_flops(eqn) -> int:
  rhs = eqn.invars[1].aval  # kernel [O, I / groups, *spatial] in its own dim order
  out_features = rhs.shape[eqn.params["dimension_numbers"].rhs_spec[0]]
  macs_per_output = math.prod(rhs.shape) // out_features
  return 2 * math.prod(eqn.outvars[0].aval.shape) * macs_per_output


# Dense bf16 peak of one chip, FLOP/s (vendor datasheets, without sparsity), by a name
# found in `jax.Device.device_kind`; the first match counts, so variants come first.
PEAK_BF16_FLOPS = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,  # SXM ("NVIDIA H100 80GB HBM3")
    "H200": 989e12,
    "A100": 312e12,
    "L4": 121e12,
}


def esm_matmul_flops(row_length: int, embed_dim: int, ffn_dim: int) -> int:
  """Matmul FLOPs of one ESM-2 layer forward per token slot of a row of `row_length`.

  2·(4D² + 2DF) for the q, k, v, output and FFN weights, plus 4·L·D for the attention
  scores q·kᵀ and the weighted sum of values over the whole row: dense attention over
  the row, which every dense attention backend computes (a segment mask hides entries,
  it does not skip them; splash skips whole blocks of other chains, which this count
  does not credit). A training step is 3x the forward (the backward's two matmuls per
  forward matmul), without remat.
  """
  d, f = int(embed_dim), int(ffn_dim)
  return 2 * (4 * d * d + 2 * d * f) + 4 * int(row_length) * d


def peak_bf16_flops(device) -> float | None:
  """The chip's dense bf16 peak FLOP/s from `PEAK_BF16_FLOPS`, None if not listed."""
  kind = getattr(device, "device_kind", "")
  return next((peak for name, peak in PEAK_BF16_FLOPS.items() if name in kind), None)


_COUNTED = {"dot_general": _dot_general_flops, "conv_general_dilated": _conv_flops}


def _sub_jaxprs(value):
  """Jaxprs held in one equation parameter (a jaxpr, a closed jaxpr, or a tuple)."""
  items = value if isinstance(value, (tuple, list)) else (value,)
  for item in items:
    if isinstance(item, jax_core.ClosedJaxpr):
      yield item.jaxpr
    elif isinstance(item, jax_core.Jaxpr):
      yield item


def _shard_map_copies(eqn) -> int:
  """How many times a shard_map body runs: once per device along its manual axes."""
  mesh = eqn.params["mesh"]
  axes = eqn.params.get("newly_manual_axes") or mesh.axis_names
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  return math.prod(sizes[a] for a in axes)


def jaxpr_matmul_flops(jaxpr, cond_branch: str = "min") -> int:
  """Matmul FLOPs of a (closed or open) jaxpr; see the module docstring."""
  if cond_branch not in ("min", "max"):
    raise ValueError(f"cond_branch must be 'min' or 'max', got {cond_branch!r}")
  if isinstance(jaxpr, jax_core.ClosedJaxpr):
    jaxpr = jaxpr.jaxpr
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name in _COUNTED:
      total += _COUNTED[name](eqn)
    elif name == "cond":
      branches = [jaxpr_matmul_flops(b, cond_branch) for b in eqn.params["branches"]]
      total += min(branches) if cond_branch == "min" else max(branches)
    elif name == "scan":
      total += eqn.params["length"] * jaxpr_matmul_flops(eqn.params["jaxpr"], cond_branch)
    elif name == "shard_map":
      total += _shard_map_copies(eqn) * jaxpr_matmul_flops(eqn.params["jaxpr"], cond_branch)
    else:  # pjit, remat, custom_jvp/vjp calls, while (body once), ...
      for value in eqn.params.values():
        for sub in _sub_jaxprs(value):
          total += jaxpr_matmul_flops(sub, cond_branch)
  return total


def matmul_flops(fn: Callable[..., Any], *args, cond_branch: str = "min",
                 **kwargs) -> int:
  """Matmul FLOPs of one call `fn(*args, **kwargs)` (traced, not run).

  Control flow: `scan` bodies count `length` times; `cond` counts one branch, the cheapest
  (`cond_branch="min"`, what runs when a fast path is taken) or the dearest ("max", an
  upper bound); `while` bodies count once (their trip count is not static), so a
  function with a `while` around matmuls gets a lower bound. A `shard_map` body (per-device
  shapes) counts once per device of its manual mesh axes: the result is the whole
  program's FLOPs, summed over devices. Rematerialised work (`jax.checkpoint`) counts as
  often as it runs. Fused kernels that are single primitives, such as cuDNN attention
  (`jax.nn.dot_product_attention(implementation="cudnn")`, ESM-2's GPU bf16 path), are
  opaque and not counted, so on GPU the count leaves out ESM-2's attention.
  """
  return jaxpr_matmul_flops(jax.make_jaxpr(fn)(*args, **kwargs), cond_branch)
