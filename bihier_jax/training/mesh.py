"""The device mesh and the shardings of a run: the ('data', 'fsdp') mesh, parameter specs
(ESM-2 layer matrices split over 'fsdp', the rest replicated), the batch sharding of
device-stacked batches, and moving arrays on and off the mesh.

Public: make_mesh, training_mesh, local_mesh, fsdp_size, batch_axes, param_specs,
state_shardings, localize, batch_sharding, replicated, local_device_count, put_global,
host_rows. The design (why a packed batch is stacked per device, not split; FSDP groups
within a host) is in docs/training.md "Data parallelism" and docs/parallelism.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

from bihier_jax.models import esm2
from bihier_jax.models import fsdp
from bihier_jax.models import trainable

DATA_AXIS = "data"
FSDP_AXIS = fsdp.AXIS


def make_mesh(devices: Sequence[jax.Device] | None = None, fsdp_size: int = 1) -> Mesh:
  """The ('data', 'fsdp') mesh over `devices` (default: every device of every host):
  `fsdp_size` consecutive devices form one parameter-sharding group; an axis of size
  1 is left out (('data',) when fsdp_size is 1, ('fsdp',) when it is every device).

  Raises:
    ValueError: fsdp_size does not divide the devices (of every host: a group must not
      span hosts, so its all-gathers stay on the fast interconnect).
  """
  devices = list(jax.devices() if devices is None else devices)
  fsdp_size = int(fsdp_size)
  per_host = {}
  for d in devices:
    per_host[d.process_index] = per_host.get(d.process_index, 0) + 1
  if fsdp_size < 1 or any(n % fsdp_size for n in per_host.values()):
    raise ValueError(f"train.fsdp={fsdp_size} must be >= 1 and divide the devices of "
                     f"each host ({sorted(set(per_host.values()))} here, "
                     f"{len(devices)} in all)")
  # Axes of one device are left out ('data' stays on one device): no collective ever
  # runs over groups of one device (XLA's CPU backend keeps such all-reduces, a
  # state-sized copy per step).
  axes = [(n, size) for n, size in ((DATA_AXIS, len(devices) // fsdp_size),
                                    (FSDP_AXIS, fsdp_size)) if size > 1]
  axes = axes or [(DATA_AXIS, 1)]
  return Mesh(np.array(devices).reshape([size for _, size in axes]),
              tuple(n for n, _ in axes))


def training_mesh(config) -> Mesh:
  """The mesh of a run: every device, `config.train.fsdp` per sharding group."""
  return make_mesh(fsdp_size=int(config.train.get("fsdp", 1)))


def local_mesh(fsdp_size: int = 1) -> Mesh:
  """This host's devices only, with the training mesh's `fsdp_size`: evaluation runs
  per host, without cross-host programs (hosts see different numbers and shapes of
  eval batches); results are gathered once at the end."""
  return make_mesh(jax.local_devices(), fsdp_size)


def fsdp_size(mesh: Mesh) -> int:
  """Devices per parameter-sharding group (1 for a mesh without an 'fsdp' axis)."""
  return int(dict(mesh.shape).get(FSDP_AXIS, 1))


def batch_axes(mesh) -> tuple[str, ...]:
  """The mesh axes the device-stacked batch is split over: all of them."""
  return tuple(a for a in (DATA_AXIS, FSDP_AXIS) if a in mesh.axis_names)


def _is_esm_stack(path) -> bool:
  """Whether a tree path runs through params['esm']['layers' | 'lora'] (also inside an
  optimizer state, whose moments mirror the parameter tree)."""
  keys = [getattr(k, "key", None) for k in path]
  return any(a == trainable.ESM_KEY and b in (esm2.LAYERS_PARAM, esm2.LORA_PARAM)
             for a, b in zip(keys, keys[1:]))


def param_specs(tree: Any, mesh) -> Any:
  """PartitionSpec per leaf of a parameter-shaped tree (params, a trainable view,
  gradients, an optimizer state): the ESM layer matrices split over 'fsdp' on their
  `fsdp.shard_dim`, everything else replicated."""
  size = fsdp_size(mesh)

  def spec(path, leaf):
    dim = fsdp.shard_dim(tuple(leaf.shape), size) if _is_esm_stack(path) else None
    return PartitionSpec() if dim is None else PartitionSpec(*([None] * dim), FSDP_AXIS)

  return jax.tree_util.tree_map_with_path(spec, tree)


def state_shardings(tree: Any, mesh: Mesh) -> Any:
  """NamedSharding per leaf of `tree` (arrays or ShapeDtypeStructs; see param_specs)."""
  return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), param_specs(tree, mesh))


def localize(tree: Any, mesh: Mesh) -> Any:
  """Global arrays (replicated, or split over 'fsdp' within hosts) -> the same layout on
  `mesh`, this host's part of the training mesh (`local_mesh`)."""

  def one(x):
    spec = x.sharding.spec if isinstance(x.sharding, NamedSharding) else PartitionSpec()
    target = NamedSharding(mesh, spec)
    if jax.process_count() == 1:
      return jax.device_put(x, target)
    if spec == PartitionSpec():
      return jax.device_put(x.addressable_data(0), target)
    # Every piece of a split leaf lives on this host (groups never span hosts).
    return jax.make_array_from_single_device_arrays(
        x.shape, target, [s.data for s in x.addressable_shards])

  return jax.tree_util.tree_map(one, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (device) axis split over every mesh axis, everything else whole."""
  return NamedSharding(mesh, PartitionSpec(batch_axes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def local_device_count(mesh: Mesh) -> int:
  """Sub-batches this host contributes per step (its devices in the mesh)."""
  return sum(d.process_index == jax.process_index() for d in mesh.devices.flat)


def put_global(local_stacked: Any, mesh: Mesh) -> Any:
  """Host-local [D_local, ...] arrays -> global jax.Arrays [D_global, ...] on the mesh."""
  sharding = batch_sharding(mesh)
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      local_stacked)


def host_rows(mesh: Mesh, group_size: int) -> slice:
  """The rows of a device-stacked [group_size, ...] batch that this host's devices
  hold (`batch_sharding`): one contiguous block.

  Raises:
    ValueError: this host's rows are not one block (a mesh of interleaved hosts).
  """
  index_map = batch_sharding(mesh).addressable_devices_indices_map((group_size,))
  spans = sorted({(i[0].start or 0, group_size if i[0].stop is None else i[0].stop)
                  for i in index_map.values()})
  lo, hi = spans[0][0], spans[-1][1]
  if sum(b - a for a, b in spans) != hi - lo:
    raise ValueError(f"this host's batch rows {spans} are not one block")
  return slice(lo, hi)
