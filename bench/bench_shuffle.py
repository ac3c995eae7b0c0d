"""Training-order benchmark: how mixed the batches of `make_dataset` are on grouped records.

  python bench/bench_shuffle.py [--quick] [--json PATH] [--threads 2]

Records are written in group order, as ATOM3D PSR lists its decoys target by target:
300 targets (60 with --quick) with 10..50 decoys each; a target's length is drawn from a
lognormal fit to PDB chain lengths (median 200 residues, log-sd 0.7, clipped to
30..1500, cropped to 1022 by the pipeline) and each decoy keeps 95-100% of it, so decoys
of one target also share a length bucket. Shards hold 256 records (the preprocess
default). The stream is configs/mqa.py's (batch 8) in training mode, seed 0, one host.

Figures, over the first two passes of the stream (pass k = the batches that start
within delivered records [k n, (k+1) n), n = records; this is epoch k where the
pipeline has epochs, and the same definition for every version of the pipeline):
- same-group pair ratio: same-target pairs within a batch / all pairs within batches,
  over pass 1, divided by the same fraction expected if each batch held random records
  of its own length bucket (bucket-conditional; decoys share lengths, so any length
  bucketing raises the uniform figure) and, second, of the whole split (uniform);
- bucket runs: the longest run of consecutive batches from one padding budget, and the
  same expected from a random order of the same batches (mean of 20 permutations);
- pass-to-pass order: Spearman correlation between the positions of each record's first
  and second delivery (1 = the same order, 0 = unrelated);
- once per pass: whether every record appears exactly once in each tagged epoch (meta
  "epoch", where the pipeline tags batches with it);
- timing: wall time to the first batch, and the pause at the pass boundary against the
  median gap between batches (the shuffle buffer refills there);
- with --epoch-length: the batches one epoch emits at batch 8 and 32 against
  `bihier_jax.data.epochs.estimate_epoch` and the naive ceil(records / batch size).
The script runs against whatever `bihier_jax` is first on sys.path: copied into an older
tree it measures that tree (how BENCHMARKS.md's "before" column was taken).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from bihier_jax.common import host  # pylint: disable=wrong-import-position

host.tune_malloc()  # before JAX or TensorFlow start threads: see bihier_jax.common.host

import numpy as np  # noqa: E402

from bihier_jax.data import pipeline  # noqa: E402
from bihier_jax import testing  # noqa: E402
from configs import mqa  # noqa: E402
from data_pipelines import shards  # noqa: E402
from data_pipelines.tasks import WorkItem  # noqa: E402


def grouped_process(item):
  """Work item payload (n_residues, seed, group) -> one synthetic decoy of that group."""
  n_residues, seed, group = item.payload
  ex = testing.random_example(int(n_residues), seed=int(seed), example_id=item.source)
  return [dataclasses.replace(ex, group=str(group))]


def grouped_items(n_targets: int, seed: int = 0) -> list[WorkItem]:
  """Decoys of n_targets targets, written target by target (PSR-like)."""
  rng = np.random.default_rng(seed)
  items = []
  for t in range(n_targets):
    length = int(np.clip(rng.lognormal(np.log(200), 0.7), 30, 1500))
    for d in range(int(rng.integers(10, 51))):
      n = max(30, int(round(length * rng.uniform(0.95, 1.0))))
      items.append(WorkItem(source=f"T{t:04d}_d{d:02d}", split="train",
                            payload=(n, len(items), f"T{t:04d}")))
  return items


def longest_run(labels) -> int:
  best = run = 0
  prev = None
  for x in labels:
    run = run + 1 if x == prev else 1
    best, prev = max(best, run), x
  return best


def same_pair_fraction(batches_groups) -> tuple[int, int]:
  """(same-group pairs, all pairs) within batches."""
  same = total = 0
  for groups in batches_groups:
    _, counts = np.unique(groups, return_counts=True)
    same += int((counts * (counts - 1) // 2).sum())
    total += len(groups) * (len(groups) - 1) // 2
  return same, total


def expected_pair_fraction(groups) -> float:
  """Same-group fraction of the pairs of a random draw (without replacement) of `groups`."""
  _, counts = np.unique(groups, return_counts=True)
  n = counts.sum()
  return float((counts * (counts - 1)).sum() / max(n * (n - 1), 1))


def spearman(a, b) -> float:
  ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
  return float(np.corrcoef(ra, rb)[0, 1])


def measure(data_dir: str, config, group_of: dict, *, threads: int) -> dict:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.threading.set_inter_op_parallelism_threads(threads)
  tf.config.threading.set_intra_op_parallelism_threads(threads)
  n = len(group_of)
  start = time.perf_counter()
  it = pipeline.make_dataset(data_dir, "train", config, training=True, seed=0,
                                   process_index=0, process_count=1)
  seen = {}  # id -> positions (in delivered records)
  passes = [[], []]  # per pass: (budget, groups) of each batch
  times, epochs_of, epoch_batches = [], {}, []
  delivered = 0
  first_batch_s = None
  pass_end_batch = None
  for b, (batch, meta) in enumerate(it):
    now = time.perf_counter()
    if first_batch_s is None:
      first_batch_s = now - start
    times.append(now)
    which = delivered // n  # pass k: the batches starting in records [k n, (k+1) n)
    if which < 2:
      passes[which].append((tuple(batch.budget.__dict__.values()),
                            [group_of[i] for i in meta["ids"]]))
    if which == 1 and pass_end_batch is None:
      pass_end_batch = b
    for i in meta["ids"]:
      seen.setdefault(i, []).append(delivered)
      delivered += 1
      if "epoch" in meta:
        epochs_of.setdefault(i, []).append(int(meta["epoch"]))
    epoch_batches.append(meta.get("epoch"))
    if all(len(p) >= 2 for p in seen.values()) and len(seen) == n:
      break
  out = {"records": n, "batches_pass1": len(passes[0])}
  same, total = same_pair_fraction([g for _, g in passes[0]])
  observed = same / max(total, 1)
  # Bucket-conditional expectation: each batch's pairs drawn from its bucket's records.
  by_bucket = {}
  for budget, groups in passes[0]:
    by_bucket.setdefault(budget, []).extend(groups)
  expect_bucket = {k: expected_pair_fraction(v) for k, v in by_bucket.items()}
  pairs_expected = sum(len(g) * (len(g) - 1) / 2 * expect_bucket[k] for k, g in passes[0])
  uniform = expected_pair_fraction(list(group_of.values()))
  out["same_group_pair_fraction"] = observed
  out["expected_fraction_bucket"] = pairs_expected / max(total, 1)
  out["expected_fraction_uniform"] = uniform
  out["pair_ratio_vs_bucket"] = observed / max(pairs_expected / max(total, 1), 1e-12)
  out["pair_ratio_vs_uniform"] = observed / max(uniform, 1e-12)
  index = {k: i for i, k in enumerate(sorted(by_bucket))}
  labels = np.array([index[k] for k, _ in passes[0]])
  rng = np.random.default_rng(0)
  out["longest_bucket_run"] = longest_run(labels.tolist())
  out["longest_bucket_run_random_order"] = float(np.mean(
      [longest_run(rng.permutation(labels).tolist()) for _ in range(20)]))
  out["batches_per_bucket"] = np.bincount(labels).tolist()
  out["mean_proteins_per_batch"] = float(np.mean([len(g) for _, g in passes[0]]))
  first = [p[0] for p in seen.values()]
  second = [p[1] for p in seen.values()]
  out["pass_order_spearman"] = spearman(first, second)
  if epochs_of:
    out["every_record_once_per_epoch"] = all(e[:2] == [0, 1] for e in epochs_of.values())
    out["batches_per_epoch_emitted"] = [epoch_batches.count(e) for e in range(2)]
  gaps = np.diff(times)
  out["first_batch_s"] = first_batch_s
  out["median_batch_gap_s"] = float(np.median(gaps))
  if pass_end_batch is not None:
    out["pass_boundary_gap_s"] = float(gaps[pass_end_batch - 1])
  out["shuffle_buffer"] = (pipeline.shuffle_buffer_size(config, data_dir, "train")
                           if hasattr(pipeline, "shuffle_buffer_size")
                           else int(config.data.shuffle_buffer))
  return out


def epoch_length(data_dir: str, config, *, threads: int) -> dict:
  """Batches one epoch of `make_dataset` emits against `epochs.estimate_epoch`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from bihier_jax.data import epochs  # pylint: disable=g-import-not-at-top
  tf.config.threading.set_inter_op_parallelism_threads(threads)
  tf.config.threading.set_intra_op_parallelism_threads(threads)
  emitted = 0
  for _, meta in pipeline.make_dataset(data_dir, "train", config, training=True,
                                             seed=0, process_index=0, process_count=1):
    if meta["epoch"] > 0:
      break
    emitted += 1
  est = epochs.estimate_epoch(config, data_dir)
  return {"batch_size": int(config.train.batch_size), "emitted": emitted,
          "estimate": est.batches, "estimate_error": est.batches / emitted - 1,
          "proteins_per_batch": est.proteins_per_batch,
          "naive_ceil_records_over_batch": -(-est.records // int(config.train.batch_size))}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--json", default="")
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--data-dir", default="", help="reuse records written before")
  parser.add_argument("--shuffle-buffer", type=int, default=-1,
                      help="data.shuffle_buffer (default: the config's)")
  parser.add_argument("--epoch-length", action="store_true",
                      help="also count one epoch's batches at batch 8 and 32 against "
                           "bihier_jax.data.epochs' estimate")
  args = parser.parse_args()
  config = mqa.get_config()
  if args.shuffle_buffer >= 0:
    config.data.shuffle_buffer = args.shuffle_buffer
  items = grouped_items(60 if args.quick else 300)
  data_dir = args.data_dir or os.path.join(tempfile.mkdtemp(prefix="bench_shuffle_"), "r")
  if not os.path.exists(os.path.join(data_dir, "metadata.json")):
    t = time.perf_counter()
    shards.write_dataset(items, grouped_process, data_dir, num_workers=2, shard_size=256,
                         progress=False)
    print(f"wrote {len(items)} records in {time.perf_counter() - t:.1f} s", flush=True)
  group_of = {it.source: it.payload[2] for it in items}
  results = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}"
                        f", {os.cpu_count()} cpus", "threads": args.threads,
             "targets": len(set(group_of.values())), "batch_size": config.train.batch_size,
             "data_dir": data_dir}
  results.update(measure(data_dir, config, group_of, threads=args.threads))
  if args.epoch_length:
    for batch in (8, 32):
      config.train.batch_size = batch
      results[f"epoch_length_batch{batch}"] = epoch_length(data_dir, config,
                                                          threads=args.threads)
  for k, v in results.items():
    print(f"{k:34s} {v:.4g}" if isinstance(v, float) else f"{k:34s} {v}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
