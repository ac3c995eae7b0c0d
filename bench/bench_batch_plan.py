"""What the global batch plan costs every host: reading the record index, planning epochs.

  python bench/bench_batch_plan.py [--records N] [--realistic-dir DIR] [--json PATH]
                                   [--quick]

- plan: one training epoch of `batch_plan.Planner` over N records (default 30,000, about
  react's training split) of PDB-like single chains (lognormal lengths, median 200
  residues, log-sd 0.7, clipped to 30..1500, 0.9 nodes per residue, 14 edges per node),
  configs/default.py (packed rows, batch 32 on 8 devices: sub-batches of 4); the index
  is made from those sizes, no records are read. Every host plans every epoch, so this
  is per host, whatever the host count.
- index: `batch_plan.record_index` of real records (`--realistic-dir`, as written by
  bench/bench_input_pipeline.py): one read of the split, once per process.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import common  # noqa: E402  # pylint: disable=wrong-import-position

common.setup()

import numpy as np  # noqa: E402

from bihier_jax import testing  # noqa: E402
from bihier_jax.data import batch_plan  # noqa: E402
from bihier_jax.data import epochs  # noqa: E402
from bihier_jax.data import budgets as budgets_lib  # noqa: E402
from bihier_jax.data import pipeline  # noqa: E402
from configs import default  # noqa: E402


def synthetic_index(n: int, seed: int = 0) -> batch_plan.RecordIndex:
  length = testing.pdb_like_lengths(n, seed)
  residues = np.maximum(1, (0.9 * length).astype(np.int64))
  edges = 14 * residues
  zeros = np.zeros(n, np.int64)
  return batch_plan.RecordIndex(
      files=("synthetic",), file=zeros.astype(np.int32), offset=zeros, length=zeros,
      residues=residues, ligands=zeros, edges=edges, chains=np.ones(n, np.int64),
      max_in_degree=np.full(n, 32, np.int64), chain_length=length,
      chain_first=np.arange(n + 1, dtype=np.int64))


def plan_epoch(n: int) -> dict:
  config = default.get_config()
  config.train.batch_size = 32
  config = epochs.sub_batch_config(config, 8)
  index = synthetic_index(n)
  sizes = np.stack([index.residues, index.chain_length, index.chains, index.edges], 1)
  budgets = budgets_lib.bucket_budgets(config, sizes)
  start = time.perf_counter()
  planner = batch_plan.Planner(
      index, budgets, max_residues=int(config.data.max_residues),
      chunk_size=batch_plan.default_chunk_size(config.train.batch_size), seed=0,
      training=True, random_crop=True)
  setup = time.perf_counter() - start
  start = time.perf_counter()
  batches = proteins = 0
  for b in planner.stream():
    if b.epoch > 0:
      break
    batches += 1
    proteins += len(b.records)
  seconds = time.perf_counter() - start
  return {"records": n, "setup_s": setup, "epoch_s": seconds, "batches": batches,
          "us_per_record": 1e6 * seconds / n, "proteins_per_batch": proteins / batches}


def read_index(data_dir: str) -> dict:
  files = pipeline.shard_files(data_dir, "train")
  start = time.perf_counter()
  index = batch_plan.record_index(files)
  seconds = time.perf_counter() - start
  size = sum(os.path.getsize(f) for f in files)
  return {"records": len(index), "bytes": size, "seconds": seconds,
          "mb_per_s": size / 2**20 / seconds}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--records", type=int, default=30_000)
  p.add_argument("--realistic-dir", default="")
  p.add_argument("--json", default="")
  p.add_argument("--quick", action="store_true", help="3,000 records")
  args = p.parse_args()
  if args.quick:
    args.records = min(args.records, 3000)
  out = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                    f"{os.cpu_count()} cpus", "plan": plan_epoch(args.records)}
  r = out["plan"]
  print(f"plan: {r['records']} records, {r['batches']} batches "
        f"({r['proteins_per_batch']:.2f} proteins each) in {r['epoch_s']:.2f} s "
        f"({r['us_per_record']:.0f} us per record; setup {r['setup_s']:.2f} s)")
  if args.realistic_dir:
    out["index"] = read_index(args.realistic_dir)
    r = out["index"]
    print(f"index: {r['records']} records, {r['bytes'] / 2**20:.0f} MiB in "
          f"{r['seconds']:.2f} s ({r['mb_per_s']:.0f} MiB/s)")
  common.write_json(args.json, out)


if __name__ == "__main__":
  main()
