"""Preprocessing throughput: residues/s per core, parse + features + graph + records.

  python bench/bench_preprocess.py [--quick] [--json PATH] [--raw DIR]

End to end through `data_pipelines.shards.write_dataset` with the `pdb_dir` task (gemmi
parse, dihedrals, χ angles, radius graph, record serialisation, TFRecord writing) on
the MDAnalysisTests structures (`data/dssp/*.pdb.gz` plus the larger protein files of
`data/`), in this process (1 worker), so CPU seconds of this process = one core.
Also: the CPU cost per residue of serialising records, which `write_dataset` does in
the workers so that the single parent only writes bytes (sending `ProteinExample`s back
and serialising in the parent was measured on 2026-11-24 at ~2.5 µs/residue of parent
time, against ~2 µs/residue of worker time).
"""

from __future__ import annotations

import argparse
import glob
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import common  # noqa: E402  # pylint: disable=wrong-import-position

common.setup()

from bihier_jax.data import featurize  # noqa: E402
from bihier_jax.data import records  # noqa: E402
from data_pipelines import demo  # noqa: E402
from data_pipelines import pdb_dir  # noqa: E402
from data_pipelines import shards  # noqa: E402


def structure_files(quick: bool) -> list[str]:
  raw = demo.default_raw_dir()
  files = sorted(glob.glob(os.path.join(raw, "*.pdb.gz")))
  data = os.path.dirname(raw)
  extra = [os.path.join(data, f) for f in ("1ZOM.pdb.gz", "2jln.pdb.gz", "4gcnA.pdb.gz",
                                           "adk_oplsaa.pdb", "1ubq.pdb", "3bn3.pdb.gz")]
  files += [f for f in extra if os.path.exists(f)]
  return files[:12] if quick else files


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--json", default="")
  parser.add_argument("--repeats", type=int, default=0, help="passes over the files")
  args = parser.parse_args()
  files = structure_files(args.quick)
  repeats = args.repeats or (1 if args.quick else 3)
  items = [pdb_dir.WorkItem(source=f, split="train", payload=(True,))
           for _ in range(repeats) for f in files]
  import tensorflow as tf  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  out = tempfile.mkdtemp(prefix="bench_preprocess_")
  # Warm-up: imports and first-call costs outside the measurement.
  shards.write_dataset(items[:2], pdb_dir.PDB_DIR.process, os.path.join(out, "warm"),
                       num_workers=1, progress=False)
  wall, cpu = time.perf_counter(), time.process_time()
  metadata = shards.write_dataset(items, pdb_dir.PDB_DIR.process, os.path.join(out, "a"),
                                  num_workers=1, shard_size=64, progress=False)
  wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  residues = metadata["splits"]["train"]["residues"]

  # Per-residue CPU of serialize_example (done in the workers).
  examples = [ex for f in files for ex in featurize.examples_from_file(f)]
  n_res = sum(ex.num_residues for ex in examples)
  t = time.process_time()
  for ex in examples:
    records.serialize_example(ex)
  serialize = (time.process_time() - t) / n_res
  t = time.process_time()
  for f in files:
    featurize.examples_from_file(f)
  featurise = (time.process_time() - t) / n_res

  results = {
      "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cpus",
      "files": len(files), "passes": repeats, "residues": residues,
      "skipped": metadata["splits"]["train"]["skipped"],
      "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
      "residues_per_cpu_s": residues / cpu, "residues_per_wall_s": residues / wall,
      "us_per_residue": {"featurise (parse+features+graph)": featurise * 1e6,
                         "serialize_example (worker)": serialize * 1e6},
  }
  print(f"{residues} residues from {len(files)} files x {repeats}: "
        f"{results['residues_per_cpu_s']:.0f} residues per CPU-second (one core), "
        f"{results['residues_per_wall_s']:.0f}/s wall")
  for k, v in results["us_per_residue"].items():
    print(f"  {k}: {v:.2f} µs/residue")
  common.write_json(args.json, results)


if __name__ == "__main__":
  main()
