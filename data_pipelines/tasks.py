"""Registry of preprocessing tasks run by `python -m data_pipelines.preprocess <task>`.

A task turns a raw directory into work items (one per input source, e.g. a structure
file or an LMDB entry) and a work item into `ProteinExample`s. Work items are plain
picklable data: `process` runs in worker processes that never import TensorFlow or JAX.
Tasks are found lazily (`_LAZY`: name -> "module:attribute", imported on first `get`),
so running one task does not import every other task's dependencies.

Public: Task, WorkItem, Processed, SkipItem, register, names, get; the flags tasks share:
add_graph_arguments / graph_arguments (defaults `data.graph.DEFAULT_GRAPH`), add_once.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
from typing import Protocol, runtime_checkable

from bihier_jax.data.example import ProteinExample
from bihier_jax.data.graph import DEFAULT_GRAPH


@dataclasses.dataclass(frozen=True)
class WorkItem:
  """One input source. `payload` is plain picklable data (no open handles)."""
  source: str  # what the manifest calls it: a path, or "lmdb_dir#index"
  split: str  # train / val / test / fold1 ...
  payload: tuple = ()
  group: str = ""  # subset within the split (PPBS test subset, BCE fold), if any


class Processed(list):
  """The examples of one item, plus what was left out of them on the way.

  `Task.process` may return this instead of a plain list. `dropped` counts what was
  left out, by name (e.g. {"pocket_waters": 3}); the manifest line carries it and
  metadata.json sums it per split. `notes` are per-item facts for the manifest line
  (e.g. the names of dropped hetero groups), not summed.
  """

  def __init__(self, examples=(), dropped: dict[str, int] | None = None,
               notes: dict | None = None):
    super().__init__(examples)
    self.dropped = {k: int(v) for k, v in (dropped or {}).items() if v}
    self.notes = dict(notes or {})


class SkipItem(Exception):
  """Raised by `Task.process` for bad input; the manifest records `str(err)`.

  `kind` names the reason without the item's particulars ("no structure file"), so
  reasons can be counted across items (metadata `skipped_reasons`, the comparison with
  the literature's counts); without it the message stands for itself.
  """

  def __init__(self, message: str, kind: str = ""):
    super().__init__(message)
    self.kind = kind


@runtime_checkable
class Task(Protocol):
  """What the preprocessing CLI needs from a task."""
  name: str

  def list_items(self, raw_dir: str, args: argparse.Namespace) -> list[WorkItem]:
    """Every work item of the dataset under `raw_dir`, in a deterministic order."""

  def process(self, item: WorkItem) -> list[ProteinExample]:
    """The examples of one item (a list or `Processed`); raises `SkipItem(reason)`."""

  # Optional: def add_arguments(self, parser: argparse.ArgumentParser) -> None
  # Optional: reference_counts: data_pipelines.reference.ReferenceCounts (the split
  #   and subset sizes of the literature, printed next to ours after preprocessing)
  # Optional: metadata_notes: dict of facts about the task's fields, written to
  #   metadata.json "notes" (e.g. what react's residue numbers are)
  # Optional: description: one line on what the records hold, written to metadata.json
  #   "description" (the TFDS builder's dataset description)



def add_once(parser: argparse.ArgumentParser, flag: str, **kw) -> None:
  """Adds `flag` unless the parser has it (tasks share flags in one parser)."""
  if not any(flag in a.option_strings for a in parser._actions):
    parser.add_argument(flag, **kw)


def add_graph_arguments(parser: argparse.ArgumentParser) -> None:
  """Radius-graph flags shared by the tasks; defaults `data.graph.DEFAULT_GRAPH`."""
  add_once(parser, "--cutoff", type=float, default=DEFAULT_GRAPH.cutoff,
           help="residue graph radius in Å")
  add_once(parser, "--max-neighbors", type=int, default=DEFAULT_GRAPH.max_neighbors,
           help="most incoming edges per node")


def graph_arguments(args: argparse.Namespace | None) -> tuple[float, int]:
  """(cutoff, max_neighbors) of parsed flags; DEFAULT_GRAPH's where absent or 0."""
  return (float(getattr(args, "cutoff", None) or DEFAULT_GRAPH.cutoff),
          int(getattr(args, "max_neighbors", None) or DEFAULT_GRAPH.max_neighbors))


_REGISTRY: dict[str, Task] = {}
_LAZY: dict[str, str] = {
    "pdb_dir": "data_pipelines.pdb_dir:PDB_DIR",
    "demo": "data_pipelines.demo:DEMO",
    "lba30": "data_pipelines.lba:LBA30",
    "lba60": "data_pipelines.lba:LBA60",
    "mqa": "data_pipelines.mqa:MQA",
    "react": "data_pipelines.react:REACT",
    "ppbs": "data_pipelines.scannet:PPBS",
    "bce": "data_pipelines.scannet:BCE",
}


def register(task: Task) -> Task:
  """Adds `task` under `task.name` (replacing a lazy entry of that name)."""
  if not isinstance(task, Task):
    raise TypeError(f"{task!r} lacks name/list_items/process")
  _REGISTRY[task.name] = task
  return task


def names() -> list[str]:
  return sorted(set(_REGISTRY) | set(_LAZY))


def get(name: str) -> Task:
  """The task called `name`, importing its module on first use."""
  if name not in _REGISTRY:
    if name not in _LAZY:
      raise KeyError(f"unknown task {name!r}; known: {', '.join(names())}")
    module, attr = _LAZY[name].split(":")
    task = getattr(importlib.import_module(module), attr)
    _REGISTRY.setdefault(name, task)
  return _REGISTRY[name]
