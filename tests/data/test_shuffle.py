"""Training order and epoch length of `make_dataset` on records written group by group.

The records: 32 groups ("targets") of 8 decoys each, written group after group over 16
shard files; a group's decoys share a length (±2 residues), so they also share a length
bucket, as PSR decoys of one target do. The stream is the global plan's (all hosts');
the shares of 2 hosts are checked against it. Figures are checked against what random
batches would give and against the source order (the evaluation stream, which keeps it).
"""

import dataclasses
import functools

import ml_collections
import numpy as np
import pytest

from bihier_jax.data import epochs
from bihier_jax.data import pipeline
from bihier_jax import testing
from data_pipelines import shards
from data_pipelines.tasks import WorkItem

N_GROUPS, PER_GROUP = 32, 8
N_RECORDS = N_GROUPS * PER_GROUP


def _grouped_process(item):
  n_residues, seed, group = item.payload
  ex = testing.random_example(n_residues, seed=seed, example_id=item.source)
  return [dataclasses.replace(ex, group=group)]


def _config(packed=False):
  """One chain per row, or (packed) rows of 64 tokens and the 128 bucket above them."""
  c = ml_collections.ConfigDict()
  c.data = ml_collections.ConfigDict(dict(
      train_split="train", max_residues=1022, crop="random", shuffle_buffer=0,
      length_buckets=(32, 64, 128), max_neighbors=32, pack_rows=packed,
      row_length=64 if packed else 0))
  c.train = ml_collections.ConfigDict(dict(batch_size=4))
  return c


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("grouped"))
  rng = np.random.default_rng(0)
  items = []
  for g in range(N_GROUPS):
    length = int(np.exp(rng.uniform(np.log(14), np.log(120))))  # all 3 buckets
    for d in range(PER_GROUP):
      items.append(WorkItem(source=f"g{g:02d}_d{d}", split="train",
                            payload=(length + int(rng.integers(-2, 3)), len(items),
                                     f"g{g:02d}")))
  shards.write_dataset(items, _grouped_process, root, num_workers=1, shard_size=16,
                       progress=False)
  return root


@functools.lru_cache(maxsize=None)
def _stream(data_dir, *, process_index=0, process_count=1, skip=0, epochs=3,
            packed=False):
  """The first `epochs` epochs of host process_index of process_count, seed 0:
  [(Batch, meta)]."""
  out = []
  it = pipeline.make_dataset(data_dir, "train", _config(packed), training=True,
                                   seed=0, process_index=process_index,
                                   process_count=process_count, skip_batches=skip)
  for batch, meta in it:
    if meta["epoch"] >= epochs:
      break
    out.append((batch, meta))
  return out


def _budget(batch):
  return tuple(batch.budget.__dict__.values())


def _same_group_pairs(batches):
  """(same-group pairs, all pairs) within batches."""
  same = total = 0
  for _, meta in batches:
    _, counts = np.unique(meta["groups"], return_counts=True)
    same += int((counts * (counts - 1) // 2).sum())
    total += len(meta["groups"]) * (len(meta["groups"]) - 1) // 2
  return same, total


def _bucket_random_pairs(batches):
  """Same-group pairs expected if each batch held random records of its bucket (of
  its epoch)."""
  members = {}
  for batch, meta in batches:
    members.setdefault((meta["epoch"], _budget(batch)), []).extend(meta["groups"])
  expected = 0.0
  for batch, meta in batches:
    _, counts = np.unique(members[meta["epoch"], _budget(batch)], return_counts=True)
    n = counts.sum()
    p = (counts * (counts - 1)).sum() / (n * (n - 1))
    expected += p * len(meta["groups"]) * (len(meta["groups"]) - 1) / 2
  return expected


def _longest_run(labels):
  best = run = 0
  for i, x in enumerate(labels):
    run = run + 1 if i and x == labels[i - 1] else 1
    best = max(best, run)
  return best


def test_same_group_pairs_near_random_and_far_below_source_order(data_dir):
  train = _stream(data_dir)
  same, total = _same_group_pairs(train)
  ratio = same / _bucket_random_pairs(train)
  source = list(pipeline.make_dataset(data_dir, "train", _config(), training=False,
                                            seed=0, process_index=0, process_count=1))
  same_src, total_src = _same_group_pairs(source)
  assert same_src / total_src > 0.5  # source order: batches of one group's decoys
  assert ratio < 1.5, (same, total, ratio)
  assert same / total < 0.3 * same_src / total_src


def test_no_long_runs_of_one_bucket(data_dir):
  train = _stream(data_dir)
  for epoch in range(3):
    labels = [_budget(b) for b, m in train if m["epoch"] == epoch]
    counts = np.unique(np.array(labels), axis=0, return_counts=True)[1]
    assert len(counts) == 3 and counts.min() >= 5  # the check needs several buckets
    rng = np.random.default_rng(epoch)
    index = {k: i for i, k in enumerate(sorted(set(labels)))}
    coded = [index[k] for k in labels]
    random_runs = np.mean([_longest_run(list(rng.permutation(coded))) for _ in range(50)])
    # Bucket by bucket, the longest run would be the largest bucket's batch count.
    assert _longest_run(labels) <= 2 * random_runs < counts.max(), (labels, random_runs)


def test_epochs_differ(data_dir):
  train = _stream(data_dir)
  # Where each record comes in epochs 0 and 1: its rank in the epoch, as a fraction.
  where = [{}, {}]
  for e in range(2):
    ids = [i for _, m in train if m["epoch"] == e for i in m["ids"]]
    where[e].update({r: k / len(ids) for k, r in enumerate(ids)})
  records = sorted(where[0])
  rho = np.corrcoef([where[0][r] for r in records], [where[1][r] for r in records])[0, 1]
  assert abs(rho) < 0.3, rho  # unrelated orders (the old stream repeated its order)
  # Batches are new groupings too: few pairs of records share a batch in two epochs.
  def pairs(e):
    return {frozenset((x, y)) for _, m in train if m["epoch"] == e
            for x in m["ids"] for y in m["ids"] if x < y}
  assert len(pairs(0) & pairs(1)) < 0.25 * len(pairs(0))


def test_same_seed_same_sequence_and_skip_resumes_exactly(data_dir):
  train = _stream(data_dir)
  n0 = sum(m["epoch"] == 0 for _, m in train)
  skip = n0 - 3  # the resumed stream crosses into epoch 1
  resumed = _stream(data_dir, skip=skip, epochs=2)
  assert len(resumed) == len([1 for _, m in train if m["epoch"] < 2]) - skip
  import jax  # pylint: disable=g-import-not-at-top
  for (a, meta_a), (b, meta_b) in zip(train[skip:], resumed):
    assert meta_a == meta_b
    for (path, u), (_, v) in zip(jax.tree_util.tree_flatten_with_path(a)[0],
                                 jax.tree_util.tree_flatten_with_path(b)[0]):
      np.testing.assert_array_equal(u, v, err_msg=str(path))


def test_every_record_once_per_epoch_and_two_hosts_share_the_batches(data_dir):
  train = _stream(data_dir)
  for e in range(3):
    got = [i for _, m in train if m["epoch"] == e for i in m["ids"]]
    assert sorted(got) == sorted(set(got)) and len(got) == N_RECORDS
  # Host k of 2 packs the planned batches k, k + 2, ...: together, the global stream.
  hosts = [_stream(data_dir, process_index=k, process_count=2, epochs=2)
           for k in range(2)]
  merged = sorted((m["index"], m["ids"]) for s in hosts for _, m in s)
  assert merged == [(m["index"], m["ids"]) for _, m in train if m["epoch"] < 2]
  assert {m["index"] % 2 for _, m in hosts[1]} == {1}


@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
def test_epoch_estimate_matches_the_batches_the_pipeline_emits(data_dir, packed):
  train = _stream(data_dir, epochs=2, packed=packed)
  if packed:
    assert all(b.packed_rows for b, _ in train)
  emitted = np.mean([sum(m["epoch"] == e for _, m in train) for e in range(2)])
  config = _config(packed)
  config.train.batch_size = 8  # 2 devices of 4 proteins, as streamed
  est = epochs.estimate_epoch(config, data_dir, num_devices=2, seeds=range(8))
  assert est.batches == pytest.approx(emitted, rel=0.05)
  assert est.steps == est.batches / 2
  assert est.proteins_per_batch == pytest.approx(N_RECORDS / emitted, rel=0.05)
  assert est.proteins_per_batch < 4  # under-full: more steps than records / batch size
  # Epoch fields become steps; a 0 or missing one keeps its step field.
  config.train.update(num_steps=7, num_epochs=20, eval_every_epochs=5, eval_every=3,
                      checkpoint_every=11)
  config.optim = ml_collections.ConfigDict(dict(step_every=13, step_every_epochs=0))
  got = epochs.resolve_epochs(config, data_dir, num_devices=2)
  steps = epochs.batches_per_epoch(config, data_dir, num_devices=2)
  assert got.train.num_steps == pytest.approx(20 * emitted / 2, rel=0.05)
  assert got.train.num_steps == round(20 * steps)
  assert got.train.eval_every == round(5 * steps)
  assert (got.train.checkpoint_every, got.optim.step_every) == (11, 13)
  assert got.train.steps_per_epoch == steps and config.train.num_steps == 7
