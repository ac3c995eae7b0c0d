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
equals one 1-device step on the same stacked batch (tests/training/test_parallel.py checks it,
8 vs 1).

Parameter sharding (`train.fsdp = F`, ZeRO-3 style). The mesh is 2-D, ('data', 'fsdp')
with F consecutive devices (within one host) per 'fsdp' group. The batch is still split
over EVERY device (leading axis on both mesh axes); only the large ESM-2 layer matrices
and their optimizer moments are split over 'fsdp' (`param_specs`, rule in
`models.fsdp`); everything else stays replicated. Inside the step body each layer's
pieces are all-gathered one layer at a time and its gradient reduce-scattered, so a
device holds ~1/F of the ESM weights, gradients and Adam moments. F = 1 is plain data
parallelism.

Sub-batches are grouped by budget: `DeviceBatcher` collects batches from the input
stream per budget and emits D of the same budget at once; its `position` (raw batches
consumed and those still waiting) is saved in checkpoints so a restarted run sees
exactly the same stream.

Several hosts (one JAX process each, `initialize_distributed`): `StepInput` groups the
one global plan of batches (`data.batch_plan`, the same on every host) into steps by
that rule, and each host packs only the rows its devices hold (`host_rows`), so a step,
its position and the run's numbers do not depend on the host count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
import dataclasses
from typing import Any

from absl import logging
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

from bihier_jax.data.batch import Batch
from bihier_jax.models import esm2
from bihier_jax.models import fsdp
from bihier_jax.models import trainable

DATA_AXIS = "data"
FSDP_AXIS = fsdp.AXIS


def initialize_distributed(multi_host: bool) -> None:
  """Joins the multi-process job when `multi_host` (train.multi_host), once.

  The coordinator, the process count and this process's rank come from the launcher's
  environment, which `jax.distributed.initialize()` reads: a Cloud TPU VM, SLURM
  (`launch.slurm_gpu`, and `launch.local` on one machine), Open MPI, or
  JAX_COORDINATOR_ADDRESS with one of those.

  Raises:
    config_check.ConfigError: no launcher environment (a run alone, e.g. evaluating a
      pod run's workdir on one machine, needs --config.train.multi_host=False).
  """
  if not multi_host or jax.distributed.is_initialized():
    return
  try:
    jax.distributed.initialize()
  except ValueError as e:
    from bihier_jax import config_check  # pylint: disable=g-import-not-at-top
    raise config_check.ConfigError(
        f"train.multi_host=True but this process was not started as part of a "
        f"multi-process job ({e}): start it with python -m launch.local, SLURM or on a "
        f"TPU VM slice, or pass --config.train.multi_host=False to run it alone") from e
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


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
  """Where a training stream stands: planned batches read, those read but not yet
  used, and the epoch of the first batch a restart reads again (`resume_from`) with
  the index of that epoch's first batch, where a restarted plan starts (0, 0: from the
  beginning). Indices count the global plan's batches, the same for any host count."""
  consumed: int = 0
  pending: tuple[int, ...] = ()
  epoch: int = 0
  epoch_start: int = 0

  def to_json(self) -> dict[str, Any]:
    return {"consumed": int(self.consumed), "pending": [int(i) for i in self.pending],
            "epoch": int(self.epoch), "epoch_start": int(self.epoch_start)}

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> "InputPosition":
    return cls(int(d.get("consumed", 0)), tuple(int(i) for i in d.get("pending", ())),
               int(d.get("epoch", 0)), int(d.get("epoch_start", 0)))

  @property
  def resume_from(self) -> int:
    """Index of the first raw batch a restarted stream must read again."""
    return min(self.pending) if self.pending else self.consumed


def _stack_group(items):
  return stack([b for b, _ in items]), [m for _, m in items]


class DeviceBatcher:
  """Groups a stream into stacks of D items of one budget, in stream order per budget.

  Args:
    stream: raw items, by default (Batch, meta); when resuming, it must start at
      `position.resume_from`.
    num_devices: D, items per group.
    position: where a previous run stopped (None = the start).
    key: the budget of an item (default: a (Batch, meta)'s batch budget).
    combine: a group's D items -> what `next` returns (default: the stacked Batch
      [D, ...] and the D metas).
  """

  def __init__(self, stream: Iterable[Any], num_devices: int,
               position: InputPosition | None = None, *,
               key: Callable[[Any], Any] = lambda item: item[0].budget,
               combine: Callable[[list[Any]], Any] = _stack_group):
    position = position or InputPosition()
    self._stream = iter(stream)
    self._num_devices = num_devices
    self._key, self._combine = key, combine
    self._next_index = position.resume_from
    self._consumed = position.consumed
    # Raw batches in [resume_from, consumed) that were used before the restart.
    self._skip = (set(range(position.resume_from, position.consumed))
                  - set(position.pending))
    self._waiting: dict[Any, list[tuple[int, Any]]] = {}

  @property
  def position(self) -> InputPosition:
    pending = sorted(i for group in self._waiting.values() for i, _ in group)
    return InputPosition(max(self._consumed, self._next_index), tuple(pending))

  def __iter__(self) -> Iterator[Any]:
    return self

  def __next__(self) -> Any:
    """The next group of D items of one budget, combined."""
    while True:
      item = next(self._stream)
      index = self._next_index
      self._next_index += 1
      if index in self._skip:
        self._skip.discard(index)
        continue
      group = self._waiting.setdefault(self._key(item), [])
      group.append((index, item))
      if len(group) == self._num_devices:
        del self._waiting[self._key(item)]
        self._consumed = max(self._consumed, self._next_index)
        return self._combine([x for _, x in group])

  def close(self) -> None:
    """Stops the stream now (a generator's tf.data iterator), not at interpreter exit."""
    if hasattr(self._stream, "close"):
      self._stream.close()

  def flush(self) -> Iterator[tuple[Batch, list[dict]]]:
    """Incomplete groups of (Batch, meta) left at the end of a finite stream, filled
    with blanks."""
    for budget in list(self._waiting):
      group = self._waiting.pop(budget)
      batches = [b for _, (b, _) in group]
      metas = [m for _, (_, m) in group]
      while len(batches) < self._num_devices:
        batches.append(blank_like(batches[0]))
        metas.append(None)
      yield stack(batches), metas


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


class StepInput:
  """This host's part of every training step, from the one global plan.

  The planned batches (`batch_plan.Planner.stream`, the same on every host) are grouped
  into steps of `group_size` batches of one budget by `DeviceBatcher`'s rule, so the
  steps do not depend on the host count; this host packs only the batches of its rows
  (`host_rows`) and stacks them. `position` is the step's input position, for the
  checkpoint written after it.

  Args:
    planner: the training split's `batch_plan.Planner`.
    group_size: planned batches per step (devices x train.grad_accum_steps).
    rows: this host's rows of a step.
    position: where a previous run stopped.
    pack: iterator of `PlannedBatch` -> iterator of (Batch, meta) in that order
      (`input_pipeline.pack_planned`).
  """

  def __init__(self, planner, group_size: int, rows: slice,
               position: InputPosition | None, pack):
    self.position = position or InputPosition()
    self._rows = rows
    self._positions: dict[int, InputPosition] = {}  # step -> its position, planned ahead
    resume = self.position.resume_from
    planned = (b for b in planner.stream(self.position.epoch, self.position.epoch_start)
               if b.index >= resume)
    self._epoch_starts: dict[int, int] = {self.position.epoch: self.position.epoch_start}
    self._grouper = DeviceBatcher(self._noting_epochs(planned), group_size,
                                  self.position, key=lambda b: b.budget, combine=list)
    self._batches = pack(self._host_plan())

  def _noting_epochs(self, planned):
    for b in planned:
      self._epoch_starts.setdefault(b.epoch, b.index)
      yield b

  def _host_plan(self):
    for step, group in enumerate(self._grouper):
      where = self._grouper.position
      epoch = max(e for e, start in self._epoch_starts.items()
                  if start <= where.resume_from)
      self._positions[step] = dataclasses.replace(
          where, epoch=epoch, epoch_start=self._epoch_starts[epoch])
      for b in group[self._rows]:
        yield dataclasses.replace(b, step=step)

  def __iter__(self) -> Iterator[tuple[Batch, list[dict]]]:
    return self

  def close(self) -> None:
    """Stops the pipeline now: its tf.data iterator, which a reference cycle through
    the plan's generator would otherwise keep until interpreter exit."""
    if hasattr(self._batches, "close"):
      self._batches.close()

  def __next__(self) -> tuple[Batch, list[dict]]:
    """This host's stacked part of the next step [rows, ...] and its metas."""
    items = [next(self._batches) for _ in range(self._rows.stop - self._rows.start)]
    steps = {m["step"] for _, m in items}
    if len(steps) != 1:
      raise RuntimeError(f"one step's batches came from steps {sorted(steps)}")
    self.position = self._positions.pop(steps.pop())
    return _stack_group(items)


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

