"""The batches of a split from its records: `make_dataset`, through tf.data.

Public: `make_dataset` (an iterator of (Batch, meta)), `make_tf_dataset`, `make_planner`,
`pack_planned` (the training loop's devices' batches), `packed_dataset`, `host_share`,
`shard_files`. Which records form each batch is planned in numpy (`batch_plan`, the same
on every host); tf.data reads the batches one host is given by offset, a unit of up to
chunk_size records at a time, parses them at once, crops and packs them (`tf_packer`)
and lets them out in plan order. docs/data.md describes the order and the budgets.
"""

from __future__ import annotations

from collections.abc import Sequence
import functools

import numpy as np
import tensorflow as tf

from bihier_jax.common import storage
from bihier_jax.data import batch_plan
from bihier_jax.data import budgets as budgets_lib
from bihier_jax.data import records
from bihier_jax.data import tf_packer
from bihier_jax.data.batch import PaddingBudget


def shard_files(data_dir: str, split: str) -> list[str]:
  """The split's record files, sorted."""
  found = sorted(storage.glob(storage.join(data_dir, split, f"{split}-*-of-*.tfrecord")))
  if not found:
    raise FileNotFoundError(f"no records for split {split!r} under {data_dir}")
  return found


def make_planner(data_dir: str, split: str, config, *, training: bool, seed: int,
                 budgets: Sequence[PaddingBudget] | None = None,
                 chunk_size: int | None = None):
  """The `batch_plan.Planner` of a split: the record index (read once per process), the
  budgets (default `bucket_budgets` of every split's sizes, so train and eval share
  programs), data.max_residues, data.shuffle_buffer, data.crop and train.batch_size."""
  if budgets is None:
    budgets = budgets_lib.bucket_budgets(config, budgets_lib.dataset_sizes(data_dir))
  index = batch_plan.record_index(shard_files(data_dir, split))
  return batch_plan.Planner(
      index, budgets, max_residues=int(config.data.max_residues),
      chunk_size=(chunk_size
                  or batch_plan.default_chunk_size(int(config.train.batch_size))),
      seed=seed, shuffle_buffer=int(config.data.get("shuffle_buffer", 0) or 0),
      training=training, random_crop=config.data.get("crop", "random") == "random",
      whole_chains=batch_plan.eval_long_chains(config) == "whole")


def windowed_batches(planner, config, *, first_index: int, process_index: int,
                     process_count: int, skip: int = 0):
  """(Batch, meta) of the `planner.windowed_records`, read whole: every chain longer
  than data.max_residues in overlapping ESM windows, in batches of up to
  train.batch_size proteins of one `layout.windowed_budget` (one shape for the split),
  filled in file order. Batch k is number first_index + k of the plan and goes to host
  (first_index + k) % process_count."""
  from bihier_jax.data import layout  # pylint: disable=g-import-not-at-top
  chosen = planner.windowed_records
  examples = [records.deserialize_example(b) for b in planner.index.read(chosen)]
  budget = layout.windowed_budget(examples, layout.long_chain_window(config),
                                  batch_size=int(config.train.batch_size))
  for k, group in enumerate(layout.windowed_batches(examples, budget)):
    index = first_index + k
    if index < skip or index % process_count != process_index:
      continue
    members = [examples[i] for i in group]
    yield layout.collate(members, budget), {
        "ids": [ex.id for ex in members], "groups": [ex.group for ex in members],
        "epoch": 0, "index": index, "step": -1, "windowed": True}


def _unit(planner, batches) -> dict[str, np.ndarray]:
  """The numpy inputs of one tf.data unit: planned batches -> their records and plan."""
  records = np.concatenate([b.records for b in batches])
  long = planner.long[records]
  order = np.argsort(long, kind="stable")  # records that are cropped last
  position = np.empty(len(records), np.int32)
  position[order] = np.arange(len(records), dtype=np.int32)
  chains = np.diff(planner.index.chain_first)[records]
  crop = np.split(np.concatenate([b.crop for b in batches]), np.cumsum(chains)[:-1])
  budget = np.array([b.budget for b in batches], np.int32)
  within = np.zeros(len(batches), np.int32)  # a batch's rank among its budget's
  for k in np.unique(budget):
    within[budget == k] = np.arange(int((budget == k).sum()), dtype=np.int32)
  sizes = [len(b.records) for b in batches]
  return {
      "serialized": np.array(planner.index.read(records[order]), dtype=object),
      "short": np.int32(len(records) - int(long.sum())),
      "crop": np.concatenate([crop[i] for i in order[long[order]]]
                             + [np.zeros([0], np.float32)]).astype(np.float32),
      "position": position,
      "member_budget": np.repeat(budget, sizes),
      "member_batch": np.repeat(within, sizes),
      "chain_budget": np.repeat(budget, [len(b.row) for b in batches]),
      "row": np.concatenate([b.row for b in batches]).astype(np.int32),
      "column": np.concatenate([b.column for b in batches]).astype(np.int32),
      "budget": budget,
      "epoch": np.array([b.epoch for b in batches], np.int64),
      "index": np.array([b.index for b in batches], np.int64),
      "step": np.array([b.step for b in batches], np.int64),
  }


def _units(planner, planned):
  """Units of the planned batches, in order, each up to chunk_size records."""
  group, count = [], 0
  for b in planned:
    group.append(b)
    count += len(b.records)
    if count >= planner.chunk_size:
      yield _unit(planner, group)
      group, count = [], 0
  if group:
    yield _unit(planner, group)


def _unit_signature():
  spec = {k: tf.TensorSpec([None], tf.int32) for k in (
      "position", "member_budget", "member_batch", "chain_budget", "row", "column",
      "budget")}
  spec.update({k: tf.TensorSpec([None], tf.int64) for k in ("epoch", "index", "step")})
  spec.update(serialized=tf.TensorSpec([None], tf.string),
              short=tf.TensorSpec([], tf.int32), crop=tf.TensorSpec([None], tf.float32))
  return spec


@functools.lru_cache(maxsize=8)
def _unit_packer(budgets: tuple[PaddingBudget, ...], max_residues: int):
  """The tf.function packing one unit (traced once per budgets: thousands of ops)."""
  keys = (*tf_packer.SCALARS, *tf_packer.COUNT)

  @tf.function(input_signature=[_unit_signature()])
  def pack(unit):
    x = records.parse_records(unit["serialized"])

    def crop_the_rest():  # records that are cropped come last in a unit
      head, tail = tf_packer.split_chunk(x, unit["short"])
      return tf_packer.concat_chunks(
          head, tf_packer.crop_chunk(tail, max_residues, unit["crop"]))

    x = tf.cond(unit["short"] < tf.size(x["num_residues"]), crop_the_rest,
                lambda: {k: x[k] for k in keys})
    packed = []
    for k, budget in enumerate(budgets):
      on, chain_on = tf.equal(unit["member_budget"], k), tf.equal(unit["chain_budget"], k)
      plan = (tf.boolean_mask(unit["member_batch"], on),
              tf.boolean_mask(unit["row"], chain_on),
              tf.boolean_mask(unit["column"], chain_on))
      p = tf_packer.pack_chunk(x, tf.boolean_mask(unit["position"], on), plan, budget)
      for name in ("epoch", "index", "step"):
        p[name] = tf.boolean_mask(unit[name], tf.equal(unit["budget"], k))
      packed.append(p)
    return tf.cast(unit["budget"], tf.int64), tuple(packed)

  return pack


def packed_dataset(planner, planned_fn, *, prefetch: int = 4):
  """tf.data.Dataset of the batches `planned_fn()` plans (dicts of numpy-ready tensors,
  with "epoch", "index" and "step" of each batch), packed in that order.

  Args:
    planner: the `batch_plan.Planner` that planned them (records, budgets).
    planned_fn: () -> iterator of `batch_plan.PlannedBatch`; called at each iteration.
  """
  pack = _unit_packer(planner.budgets, planner.max_residues)
  ds = tf.data.Dataset.from_generator(lambda: _units(planner, planned_fn()),
                                      output_signature=_unit_signature())
  ds = ds.map(pack, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  def emit(order, per_bucket):
    return tf.data.Dataset.choose_from_datasets(
        [tf.data.Dataset.from_tensor_slices(b) for b in per_bucket],
        tf.data.Dataset.from_tensor_slices(order))

  return ds.flat_map(emit).prefetch(prefetch if prefetch else tf.data.AUTOTUNE)


def pack_planned(planner, planned, *, prefetch: int = 4):
  """(Batch, meta) of each planned batch of the iterator `planned`, in its order; meta
  as `make_dataset`'s, plus "step" (`PlannedBatch.step`)."""
  ds = packed_dataset(planner, lambda: planned, prefetch=prefetch)
  for d in ds.as_numpy_iterator():
    yield tf_packer.to_batch(d)


def host_share(planned, process_index: int, process_count: int, skip: int = 0):
  """The planned batches of one host: every process_count-th from batch `skip` on."""
  for b in planned:
    if b.index >= skip and b.index % process_count == process_index:
      yield b


def make_tf_dataset(data_dir: str, split: str, config, *, training: bool, seed: int,
                    process_index: int | None = None, process_count: int | None = None,
                    budgets: Sequence[PaddingBudget] | None = None,
                    chunk_size: int | None = None, skip_batches: int = 0,
                    prefetch: int = 4):
  """The tf.data.Dataset of `make_dataset`'s planned batches (dicts of tensors; each
  iteration starts at the beginning), and its planner: (dataset, planner)."""
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index, process_count = jax.process_index(), jax.process_count()
  planner = make_planner(data_dir, split, config, training=training, seed=seed,
                         budgets=budgets, chunk_size=chunk_size)
  return packed_dataset(
      planner, lambda: host_share(planner.stream(), process_index, process_count,
                                  skip_batches), prefetch=prefetch), planner


def make_dataset(data_dir: str, split: str, config, *, training: bool, seed: int,
                 process_index: int | None = None, process_count: int | None = None,
                 skip_batches: int = 0, budgets: Sequence[PaddingBudget] | None = None,
                 prefetch: int = 4, chunk_size: int | None = None):
  """Padded batches of a split: an iterator of (Batch of numpy arrays, meta).

  The batches are those of the split's `batch_plan.Planner` (one global plan, the same
  on every host): training, endless, epoch after epoch in an order drawn from (seed,
  epoch); evaluation, one pass in file order, the last partial batches padded, not
  dropped. Chains are cropped to config.data.max_residues (random window in training if
  config.data.crop == "random", else the first), bucketed by length and packed into the
  fixed `bucket_budgets` (up to batch_size proteins per batch). In evaluation with
  data.eval_long_chains == "whole", proteins with a longer chain are not cropped: they
  follow the planned batches in batches of their own (`windowed_batches`). This host reads and packs
  every process_count-th planned batch (the training loop instead takes its devices'
  part of every step, `device_batches.StepInput`). The same arguments give the same batches.

  Args:
    data_dir: directory written by `data_pipelines.preprocess`.
    split: e.g. "train", "val".
    config: the experiment config (data.*, train.batch_size).
    training: shuffle + repeat + random crops.
    seed: shuffling and cropping seed; same seed, same batches.
    process_index, process_count: this host's share; default jax.process_index()/count().
    skip_batches: planned batches (of all hosts) to skip first.
    budgets: override `bucket_budgets(config, dataset_sizes(data_dir))` (every split's
      sizes, so that train and eval share programs and every example fits).
    prefetch: batches prepared ahead.
    chunk_size: records planned together (default `batch_plan.default_chunk_size`,
      max(256, 128 x batch_size)); the last batch of each bucket in a chunk may be
      partly empty.

  Yields:
    (Batch, meta) with meta = {"ids": [...], "groups": [...]} of the real graphs, in
    graph order, "epoch" (the training epoch, 0 in evaluation), "index" (the batch's
    place in the global plan) and "step" (-1); a windowed batch's also "windowed"
    (True).
  """
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index, process_count = jax.process_index(), jax.process_count()
  ds, planner = make_tf_dataset(
      data_dir, split, config, training=training, seed=seed, process_index=process_index,
      process_count=process_count, budgets=budgets, chunk_size=chunk_size,
      skip_batches=skip_batches, prefetch=prefetch)
  for d in ds.as_numpy_iterator():
    yield tf_packer.to_batch(d)
  if len(planner.windowed_records):
    planned = sum(1 for _ in planner.stream())
    yield from windowed_batches(planner, config, first_index=planned,
                                process_index=process_index,
                                process_count=process_count, skip=skip_batches)
