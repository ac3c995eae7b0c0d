"""Multi-process, resumable writer of sharded TFRecord datasets with a manifest.

`write_dataset` runs a task's `process` on every work item in spawned worker processes
(TensorFlow, imported by the parent to write files, never reaches them), serialises the
examples there and writes them in the parent, shard by shard, in work-item order;
`finalize` merges the shards' sidecars into manifest.jsonl, sizes.json and
metadata.json. Public: write_dataset, finalize, run_item, shard_name, example_size,
split_statistics, METADATA, MANIFEST. The folder's layout, resuming, the
incomplete-backbone policy and the accounting: docs/tasks.md, "The prepared folder".
"""

from __future__ import annotations

import collections
import dataclasses
import json
import multiprocessing
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence

import numpy as np
import tqdm

from bihier_jax.data import featurize
from bihier_jax.data import records
from data_pipelines import reference
from data_pipelines.tasks import SkipItem, WorkItem

METADATA = "metadata.json"
MANIFEST = "manifest.jsonl"
HISTOGRAM_BIN = 16  # residues per bin of the length histogram


@dataclasses.dataclass
class ItemResult:
  """What a worker sends back for one work item."""
  manifest: dict
  records: list[bytes]
  sizes: list[list[int]]  # [nodes, longest chain, chains, edges] per example


def example_size(ex) -> list[int]:
  """The example's sizes.json row (`ExampleSizes`)."""
  return list(ex.sizes())


def filter_incomplete_backbone(examples, policy: str, source: str):
  """`featurize.apply_incomplete_backbone`; raises SkipItem when `skip` left none."""
  kept, incomplete, dropped = featurize.apply_incomplete_backbone(examples, policy)
  if not kept:
    raise SkipItem(f"{source}: residues without a complete backbone (N, CA, C, O) in "
                   f"{', '.join(dropped)} and incomplete_backbone=skip")
  return kept, incomplete, dropped


def run_item(process_fn: Callable, item: WorkItem,
             incomplete_backbone: str = "warn") -> ItemResult:
  """Processes and serialises one item; every failure becomes a `skipped` line."""
  line = {"source": item.source, "split": item.split, "status": "ok", "reason": "",
          "chains": 0, "n_residues": 0, "examples": 0, "incomplete_backbone": 0,
          "dropped": {}}
  if item.group:
    line["group"] = item.group
  try:
    examples = process_fn(item)
    line["dropped"] = dict(getattr(examples, "dropped", {}))
    line.update(getattr(examples, "notes", {}))
    if not examples:
      raise SkipItem("no examples (no protein chain)")
    examples, incomplete, dropped = filter_incomplete_backbone(
        examples, incomplete_backbone, item.source)
    line["incomplete_backbone"] = incomplete
    if dropped:
      line["left_out_incomplete_backbone"] = dropped
    data = [records.serialize_example(ex) for ex in examples]
  except SkipItem as err:
    line.update(status="skipped", reason=str(err))
    if err.kind:
      line["reason_kind"] = err.kind
    return ItemResult(line, [], [])
  except Exception as err:  # pylint: disable=broad-except
    # Parser errors name the file; anything else is logged with its type to find bugs.
    name = type(err).__name__
    expected = name in ("StructureError", "ValueError")
    where = "" if expected else " at " + traceback.extract_tb(err.__traceback__)[-1].name
    line.update(status="skipped", reason=f"{name}{where}: {err}")
    return ItemResult(line, [], [])
  line.update(chains=sum(len(ex.sequences) for ex in examples),
              n_residues=sum(ex.num_residues for ex in examples),
              examples=len(examples),
              ids=[ex.id for ex in examples] if len(examples) <= 64 else [])
  return ItemResult(line, data, [example_size(ex) for ex in examples])


class _Runner:
  """Picklable callable for the pool: `run_item` bound to a process function."""

  def __init__(self, process_fn, incomplete_backbone: str = "warn"):
    self.process_fn = process_fn
    self.incomplete_backbone = incomplete_backbone

  def __call__(self, item):
    return run_item(self.process_fn, item, self.incomplete_backbone)


def shard_name(split: str, index: int, count: int) -> str:
  return f"{split}-{index:05d}-of-{count:05d}"


def _plan(work_items: Sequence[WorkItem], shard_size: int):
  """[(split, shard index, shard count, items)] in a deterministic order."""
  by_split = collections.OrderedDict()
  for item in work_items:
    by_split.setdefault(item.split, []).append(item)
  plan = []
  for split, items in by_split.items():
    count = max(1, -(-len(items) // shard_size))
    for i in range(count):
      plan.append((split, i, count, items[i * shard_size:(i + 1) * shard_size]))
  return plan


def _write_atomic(path: str, write: Callable[[str], None]) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  write(tmp)
  os.replace(tmp, path)  # atomic on POSIX: a shard is either complete or absent


def _write_shard(path: str, data: list[bytes]) -> None:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  def write(tmp):
    with tf.io.TFRecordWriter(tmp) as writer:
      for record in data:
        writer.write(record)
  _write_atomic(path, write)


def _write_json(path: str, obj) -> None:
  def write(tmp):
    with open(tmp, "w") as f:
      json.dump(obj, f)
  _write_atomic(path, write)


def write_dataset(work_items: Sequence[WorkItem], process_fn: Callable, out_dir: str, *,
                  num_workers: int = 1, shard_size: int = 256, task: str = "",
                  progress: bool = True, chunksize: int = 4,
                  incomplete_backbone: str = "warn", reference_counts=None,
                  notes: dict | None = None, description: str = "") -> dict:
  """Processes `work_items` into sharded records under `out_dir`.

  Args:
    work_items: every input source, each with its split; order fixes record order.
    process_fn: picklable `WorkItem -> list[ProteinExample]` (a task's `process`).
    out_dir: output directory (created).
    num_workers: worker processes; ≤ 1 runs in this process.
    shard_size: work items per shard.
    task: name written to the metadata.
    progress: show a tqdm bar.
    chunksize: items sent to a worker at a time.
    incomplete_backbone: warn | skip | allow, for residues lacking N, C or O.
    reference_counts: the literature's split sizes (`reference.ReferenceCounts`), to
      compare ours with in metadata["reference_counts"].
    notes: facts about the task's fields (metadata["notes"]), e.g. what react's
      residue numbers are.
    description: one line on what the records hold (metadata["description"]).

  Returns:
    The metadata dict also written to `out_dir/metadata.json`.
  """
  os.makedirs(out_dir, exist_ok=True)
  plan = _plan(work_items, shard_size)
  todo = []
  for split, index, count, items in plan:
    base = os.path.join(out_dir, split, shard_name(split, index, count))
    if not (os.path.exists(base + ".tfrecord") and os.path.exists(base + ".json")):
      todo.append((base, items))
  n_todo = sum(len(items) for _, items in todo)
  n_done = len(work_items) - n_todo

  featurize.check_incomplete_backbone_policy(incomplete_backbone)
  runner = _Runner(process_fn, incomplete_backbone)
  all_items = [item for _, items in todo for item in items]
  pool = None
  if num_workers > 1 and all_items:
    pool = multiprocessing.get_context("spawn").Pool(num_workers)
    results = pool.imap(runner, all_items, chunksize=chunksize)
  else:
    results = map(runner, all_items)
  bar = tqdm.tqdm(total=len(work_items), initial=n_done, disable=not progress,
                  desc=f"preprocess {task}".strip(), unit="item", smoothing=0.05)
  skipped = 0
  start = time.perf_counter()
  try:
    for base, items in todo:
      os.makedirs(os.path.dirname(base), exist_ok=True)
      shard_records, lines, sizes = [], [], []
      for _ in items:
        result = next(results)
        shard_records.extend(result.records)
        lines.append(result.manifest)
        sizes.extend(result.sizes)
        skipped += result.manifest["status"] != "ok"
        bar.update(1)
        bar.set_postfix(skipped=skipped, refresh=False)
      _write_shard(base + ".tfrecord", shard_records)
      _write_json(base + ".json", {"manifest": lines, "sizes": sizes})
  finally:
    bar.close()
    if pool is not None:
      pool.terminate()
  elapsed = time.perf_counter() - start
  metadata = finalize(out_dir, plan, task=task, elapsed_s=elapsed, processed=n_todo,
                      incomplete_backbone=incomplete_backbone,
                      reference_counts=reference_counts, notes=notes,
                      description=description)
  found = metadata["incomplete_backbone"]
  if incomplete_backbone == "warn" and found["residues"]:
    print(f"warning: {found['sources']} input(s) hold {found['residues']} residue(s) "
          "without a complete backbone (N, C or O missing), featurised with degenerate "
          f"frames; see 'incomplete_backbone' in {os.path.join(out_dir, MANIFEST)} "
          "(--incomplete-backbone=skip leaves them out)", file=sys.stderr)
  return metadata


def _summed_drops(lines: list[dict]) -> dict[str, int]:
  """The manifest lines' `dropped` counts summed by name."""
  total = collections.Counter()
  for line in lines:
    total.update(line.get("dropped", {}))
  return dict(sorted(total.items()))


def finalize(out_dir: str, plan, *, task: str, elapsed_s: float, processed: int,
             incomplete_backbone: str = "warn", reference_counts=None,
             notes: dict | None = None, description: str = "") -> dict:
  """Merges shard sidecars into manifest.jsonl, <split>/sizes.json and metadata.json."""
  manifest, sizes_by_split, files = [], collections.OrderedDict(), {}
  _remove_stale_shards(out_dir, plan)
  for split, index, count, _ in plan:
    base = os.path.join(out_dir, split, shard_name(split, index, count))
    with open(base + ".json") as f:
      side = json.load(f)
    manifest.extend(side["manifest"])
    sizes_by_split.setdefault(split, []).extend(side["sizes"])
    files.setdefault(split, []).append(os.path.basename(base) + ".tfrecord")
  with open(os.path.join(out_dir, MANIFEST + ".tmp"), "w") as f:
    for line in manifest:
      f.write(json.dumps(line) + "\n")
  os.replace(os.path.join(out_dir, MANIFEST + ".tmp"), os.path.join(out_dir, MANIFEST))
  splits = {}
  for split, sizes in sizes_by_split.items():
    _write_json(os.path.join(out_dir, split, "sizes.json"), sizes)
    lines = [m for m in manifest if m["split"] == split]
    splits[split] = dict(split_statistics(sizes), files=files[split],
                         sources=len(lines),
                         residues=sum(m["n_residues"] for m in lines),
                         skipped=sum(m["status"] != "ok" for m in lines),
                         dropped=_summed_drops(lines))
  reasons = collections.Counter(reference.reason_kind(m) for m in manifest
                                if m["status"] != "ok")
  metadata = {
      "schema_version": records.SCHEMA_VERSION,
      "task": task,
      "format": "tfrecord",
      "splits": splits,
      "skipped_reasons": dict(reasons.most_common()),
      "incomplete_backbone": {
          "policy": incomplete_backbone,
          "sources": sum(bool(m.get("incomplete_backbone")) for m in manifest),
          "residues": sum(m.get("incomplete_backbone", 0) for m in manifest),
          "examples_left_out": sum(len(m.get("left_out_incomplete_backbone", ()))
                                   for m in manifest)},
      "dropped": _summed_drops(manifest),
      "last_run": {"processed_items": processed, "seconds": round(elapsed_s, 3)},
  }
  if notes:
    metadata["notes"] = dict(notes)
  if description:
    metadata["description"] = description
  if reference_counts is not None:
    metadata["reference_counts"] = {
        "source": reference_counts.source, "unit": reference_counts.unit,
        "by": reference_counts.by,
        "subsets": reference.compare(reference_counts, manifest)}
  _write_json(os.path.join(out_dir, METADATA), metadata)
  return metadata


def _remove_stale_shards(out_dir: str, plan) -> None:
  """Deletes shards of an earlier run with other items or shard size (else read twice)."""
  import glob  # pylint: disable=g-import-not-at-top
  keep = {os.path.join(out_dir, split, shard_name(split, i, n))
          for split, i, n, _ in plan}
  for split in {p[0] for p in plan}:
    for path in glob.glob(os.path.join(out_dir, split, f"{split}-*-of-*.*")):
      base, ext = os.path.splitext(path)
      if ext in (".tfrecord", ".json") and base not in keep:
        os.remove(path)


def split_statistics(sizes: list[list[int]]) -> dict:
  """Counts and a length histogram (nodes per example, bins of HISTOGRAM_BIN)."""
  s = np.asarray(sizes, np.int64).reshape(-1, 4)
  nodes = s[:, 0]
  counts = np.bincount(nodes // HISTOGRAM_BIN) if len(nodes) else np.zeros([0], int)
  return {
      "examples": int(len(s)),
      "residues_and_ligand_atoms": int(nodes.sum()),
      "edges": int(s[:, 3].sum()),
      "max_nodes": int(nodes.max(initial=0)),
      "max_chain_length": int(s[:, 1].max(initial=0)),
      "max_chains": int(s[:, 2].max(initial=0)),
      "mean_nodes": float(nodes.mean()) if len(nodes) else 0.0,
      "length_histogram": {"bin_width": HISTOGRAM_BIN, "counts": counts.tolist()},
  }
