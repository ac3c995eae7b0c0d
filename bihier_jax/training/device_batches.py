"""Device-stacked batches and the resumable input position of a training stream.

A step takes D sub-batches of one padding budget stacked on a leading [D] axis;
`DeviceBatcher` groups a stream by budget in stream order, `StepInput` groups the one
global plan into steps and packs this host's rows, `InputPosition` (saved in every
checkpoint) lets a restart see exactly the same stream. Public: InputPosition,
DeviceBatcher, StepInput, stack, blank_like, iterate_finite, tree_unstack.
Rules: docs/training.md "Data parallelism".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
import dataclasses
from typing import Any

import jax
import numpy as np

from bihier_jax.data.batch import Batch

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
      (`pipeline.pack_planned`).
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
