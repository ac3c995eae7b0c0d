"""Data parallelism: device mesh, shardings, multi-host start-up, device-stacked batches.

Design. A `Batch` is a packed graph (nodes of several proteins in one array), so it
cannot be split along its node axis without cutting proteins. Instead the host builds
D independent padded sub-batches of the same `PaddingBudget` (D = this host's devices),
stacks them along a new leading "device" axis ([D, N, ...], [D, E], ...), and the
global array of all hosts ([D_global, ...]) is sharded on that axis over the mesh axis
'data' (`NamedSharding(mesh, P('data'))`). Inside `jax.jit` the step is a
`jax.shard_map` over 'data' (see train_lib): each device runs the unbatched model on its
own sub-batch, and the weighted loss sums are `psum`med, so the parameter gradients
become an all-reduce. Not `vmap`: a batched predicate would turn the models' on-device
`lax.cond` layout choices (global fusion's per-graph vs dense attention) into selects
that compute both branches. The loss is the mean over the global batch:
Σ_d loss_d·W_d / Σ_d W_d with W_d the label weight of sub-batch d, so one D-device step
equals one 1-device step on the same stacked batch (tests/test_parallel.py checks it,
8 vs 1).

Sub-batches are grouped by budget: `DeviceBatcher` collects batches from the input
stream per budget and emits D of the same budget at once; its `position` (raw batches
consumed and those still waiting) is saved in checkpoints so a restarted run sees
exactly the same stream.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
import dataclasses
from typing import Any

from absl import logging
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

from bihier_jax.data.batch import Batch

DATA_AXIS = "data"


def initialize_distributed(multi_host: bool) -> None:
  """Joins the multi-host job (coordinator and ranks come from the TPU/SLURM env)."""
  if multi_host:
    jax.distributed.initialize()
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh ('data',) over `devices` (default: every device of every host)."""
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(np.array(devices), (DATA_AXIS,))


def local_mesh() -> Mesh:
  """This host's devices only: evaluation runs per host, without cross-host programs
  (hosts see different numbers and shapes of eval batches); results are gathered
  once at the end."""
  return make_mesh(jax.local_devices())


def localize(tree: Any, mesh: Mesh) -> Any:
  """Replicated global arrays -> replicated on `mesh` (e.g. the local mesh)."""
  if jax.process_count() > 1:
    tree = jax.tree_util.tree_map(lambda x: x.addressable_data(0), tree)
  return jax.device_put(tree, replicated(mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (device) axis split over 'data', everything else whole."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def local_device_count(mesh: Mesh) -> int:
  """Sub-batches this host contributes per step (its devices in the mesh)."""
  return sum(d.process_index == jax.process_index() for d in mesh.devices.flat)


def stack(batches: Sequence[Batch]) -> Batch:
  """D sub-batches of one budget -> one Batch with a leading [D] axis (numpy)."""
  budgets = {b.budget for b in batches}
  if len(budgets) != 1:
    raise ValueError(f"sub-batches to stack must share one budget, got {budgets}")
  return jax.tree_util.tree_map(lambda *xs: np.stack(xs), *batches)


def blank_like(batch: Batch) -> Batch:
  """A copy of `batch` that contributes nothing: every mask and weight zero, no graph
  with per-graph slots.

  Fills the device slots of the last incomplete group of an evaluation pass.
  """
  return batch.replace(
      node_mask=np.zeros_like(batch.node_mask), edge_mask=np.zeros_like(
          batch.edge_mask), graph_mask=np.zeros_like(batch.graph_mask),
      row_mask=np.zeros_like(batch.row_mask),
      graph_slot_node=np.full_like(batch.graph_slot_node, -1),
      node_label_mask=np.zeros_like(batch.node_label_mask),
      node_weights=np.zeros_like(batch.node_weights),
      graph_weights=np.zeros_like(batch.graph_weights))


def put_global(local_stacked: Any, mesh: Mesh) -> Any:
  """Host-local [D_local, ...] arrays -> global jax.Arrays [D_global, ...] on the mesh."""
  sharding = batch_sharding(mesh)
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      local_stacked)


@dataclasses.dataclass
class InputPosition:
  """Where a training stream stands: batches read, and those read but not yet used."""
  consumed: int = 0
  pending: tuple[int, ...] = ()

  def to_json(self) -> dict[str, Any]:
    return {"consumed": int(self.consumed), "pending": [int(i) for i in self.pending]}

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> "InputPosition":
    return cls(int(d.get("consumed", 0)), tuple(int(i) for i in d.get("pending", ())))

  @property
  def resume_from(self) -> int:
    """Index of the first raw batch a restarted stream must read again."""
    return min(self.pending) if self.pending else self.consumed


class DeviceBatcher:
  """Groups a stream of (Batch, meta) into D-stacks of one budget.

  Args:
    stream: raw batches; when resuming, it must start at `position.resume_from`.
    num_devices: D, sub-batches per stack.
    position: where a previous run stopped (None = the start).
  """

  def __init__(self, stream: Iterable[tuple[Batch, dict]], num_devices: int,
               position: InputPosition | None = None):
    position = position or InputPosition()
    self._stream = iter(stream)
    self._num_devices = num_devices
    self._next_index = position.resume_from
    self._consumed = position.consumed
    # Raw batches in [resume_from, consumed) that were used before the restart.
    self._skip = (set(range(position.resume_from, position.consumed))
                  - set(position.pending))
    self._waiting: dict[Any, list[tuple[int, Batch, dict]]] = {}

  @property
  def position(self) -> InputPosition:
    pending = sorted(i for group in self._waiting.values() for i, _, _ in group)
    return InputPosition(max(self._consumed, self._next_index), tuple(pending))

  def __iter__(self) -> Iterator[tuple[Batch, list[dict]]]:
    return self

  def __next__(self) -> tuple[Batch, list[dict]]:
    """The next stacked Batch [D, ...] and the D metas, in stream order per budget."""
    while True:
      batch, meta = next(self._stream)
      index = self._next_index
      self._next_index += 1
      if index in self._skip:
        self._skip.discard(index)
        continue
      group = self._waiting.setdefault(batch.budget, [])
      group.append((index, batch, meta))
      if len(group) == self._num_devices:
        del self._waiting[batch.budget]
        self._consumed = max(self._consumed, self._next_index)
        return stack([b for _, b, _ in group]), [m for _, _, m in group]

  def flush(self) -> Iterator[tuple[Batch, list[dict]]]:
    """Incomplete groups left at the end of a finite stream, filled with blanks."""
    for budget in list(self._waiting):
      group = self._waiting.pop(budget)
      batches = [b for _, b, _ in group]
      metas = [m for _, _, m in group]
      while len(batches) < self._num_devices:
        batches.append(blank_like(batches[0]))
        metas.append(None)
      yield stack(batches), metas


def iterate_finite(stream: Iterable[tuple[Batch, dict]], num_devices: int
                   ) -> Iterator[tuple[Batch, list[dict | None]]]:
  """Every batch of a finite stream exactly once, in D-stacks (blanks at the end)."""
  batcher = DeviceBatcher(stream, num_devices)
  while True:
    try:
      yield next(batcher)
    except StopIteration:
      break
  yield from batcher.flush()


def tree_unstack(tree: Any, index: int) -> Any:
  """Slice `index` of the leading axis of every leaf (host numpy)."""
  return jax.tree_util.tree_map(lambda x: np.asarray(x)[index], tree)

