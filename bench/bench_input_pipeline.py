"""Input pipeline benchmark: padding efficiency, distinct shapes, proteins/s from shards.

  python bench/bench_input_pipeline.py [--quick] [--json PATH] [--demo-dir DIR]
                                       [--realistic-dir DIR]

Two datasets:
- demo: the MDAnalysisTests DSSP chains (built with `preprocess demo` if --demo-dir is
  not given), batch size from configs/default.py;
- realistic: synthetic helical chains whose lengths follow a lognormal fit to PDB
  protein chain lengths (median 200 residues, log-sd 0.7, clipped to 30..1500; an
  assumption close to PISCES chain-length statistics), written as records.
Figures: padding efficiency = real nodes / padded node slots over the batches
delivered; ESM token efficiency = real tokens / token slots of the ESM rows; distinct
budgets (shapes and row layout); proteins/s delivered as numpy batches by
`make_dataset` (training mode: shuffle, crop, bucket, pack, prefetch) after a warm-up,
with tf.data limited to `--threads` threads (2 = the 2-core target), and per CPU-second
of this process (all threads), which is steadier than wall time on a shared machine.
The 1,000 timed batches (6,800 proteins) span more than one epoch of the 4,000
realistic records, so they include one refill of the training shuffle buffer.
`--realistic-dir` writes the realistic records once and reuses them, so that two
versions of the pipeline can be timed on the same records, alternately. The config is
configs/default.py (packed ESM rows, row length chosen for its ESM-2 preset);
`--unpacked` sets data.pack_rows = False (one chain per row, length buckets).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import common  # noqa: E402  # pylint: disable=wrong-import-position

common.setup(jax_platforms="cpu")

from bihier_jax.data import budgets as budgets_lib  # noqa: E402
from bihier_jax.data import pipeline  # noqa: E402
from bihier_jax import testing  # noqa: E402
from configs import default  # noqa: E402
from data_pipelines import shards  # noqa: E402
from data_pipelines.tasks import WorkItem  # noqa: E402


def realistic_dataset(out_dir: str, n: int, seed: int = 0) -> None:
  lengths = testing.pdb_like_lengths(n, seed)
  items = [WorkItem(source=f"r{i:05d}", split="train", payload=(int(l), i, 1, 0))
           for i, l in enumerate(lengths)]
  shards.write_dataset(items, testing.synthetic_process, out_dir, num_workers=2,
                       shard_size=max(1, n // 8), progress=False)


def measure(data_dir: str, config, *, batches: int, warmup: int, threads: int,
            training: bool = True) -> dict:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.threading.set_inter_op_parallelism_threads(threads)
  tf.config.threading.set_intra_op_parallelism_threads(threads)
  budgets = budgets_lib.bucket_budgets(config, budgets_lib.dataset_sizes(data_dir))
  it = pipeline.make_dataset(data_dir, "train", config, training=training, seed=0,
                                   process_index=0, process_count=1, budgets=budgets)
  real = slots = proteins = tokens = token_slots = 0
  shapes = set()
  start = cpu = None
  done = 0
  for i, (batch, meta) in enumerate(it):
    if i == warmup:
      start, cpu = time.perf_counter(), time.process_time()
      real = slots = proteins = tokens = token_slots = 0
    real += int(batch.node_mask.sum())
    slots += batch.node_mask.size
    tokens += int((batch.token_segments >= 0).sum())
    token_slots += batch.tokens.size
    proteins += len(meta["ids"])
    shapes.add(tuple(batch.budget.__dict__.values()))
    done = i + 1
    if training and done >= warmup + batches:
      break
  elapsed = time.perf_counter() - start if start is not None else float("nan")
  cpu = time.process_time() - cpu if cpu is not None else float("nan")
  return {"padding_efficiency": real / max(slots, 1),
          "token_efficiency": tokens / max(token_slots, 1), "distinct_shapes": len(shapes),
          "budgets": [b.__dict__ for b in budgets], "batches": done - warmup,
          "proteins": proteins, "proteins_per_s": proteins / elapsed,
          "proteins_per_cpu_s": proteins / cpu,
          "mean_proteins_per_batch": proteins / max(done - warmup, 1)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--json", default="")
  parser.add_argument("--demo-dir", default="")
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--realistic-dir", default="",
                      help="realistic records: reused if there, else written there")
  parser.add_argument("--unpacked", action="store_true",
                      help="data.pack_rows = False: one chain per ESM row")
  args = parser.parse_args()
  config = default.get_config()
  config.data.pack_rows = not args.unpacked
  tmp = tempfile.mkdtemp(prefix="bench_input_")
  demo_dir = args.demo_dir
  if not demo_dir:
    from data_pipelines import preprocess  # pylint: disable=g-import-not-at-top
    demo_dir = os.path.join(tmp, "demo")
    preprocess.main(["demo", "--out", demo_dir, "--workers", "2", "--no-progress"])
  n = 600 if args.quick else 4000
  real_dir = args.realistic_dir or os.path.join(tmp, "realistic")
  if not os.path.exists(os.path.join(real_dir, "metadata.json")):
    t = time.perf_counter()
    realistic_dataset(real_dir, n)
    print(f"wrote {n} realistic records in {time.perf_counter() - t:.1f} s", flush=True)
  results = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}"
                        f", {os.cpu_count()} cpus", "threads": args.threads,
             "batch_size": config.train.batch_size, "pack_rows": config.data.pack_rows}
  results["demo_eval_epoch"] = measure(demo_dir, config, batches=0, warmup=0,
                                       threads=args.threads, training=False)
  batches = 100 if args.quick else 1000
  results["demo_train"] = measure(demo_dir, config, batches=batches, warmup=20,
                                  threads=args.threads)
  results["realistic_train"] = measure(real_dir, config, batches=batches, warmup=20,
                                       threads=args.threads)
  for key in ("demo_eval_epoch", "demo_train", "realistic_train"):
    r = results[key]
    print(f"{key:18s} efficiency {r['padding_efficiency']:.3f}  tokens "
          f"{r['token_efficiency']:.3f}  shapes "
          f"{r['distinct_shapes']}  proteins/batch {r['mean_proteins_per_batch']:.2f}  "
          f"proteins/s {r['proteins_per_s']:.0f} wall, "
          f"{r['proteins_per_cpu_s']:.0f} per CPU-second")
  common.write_json(args.json, results)


if __name__ == "__main__":
  main()
