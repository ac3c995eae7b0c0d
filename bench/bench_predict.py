"""predict on a folder in one call vs one call per file: proteins per second.

  python bench/bench_predict.py [--workdir RUN] [--single 4] [--quick] [--json OUT]

Both sides run the same command-line entry point (`python -m bihier_jax.predict`) in
fresh processes on the same files (the DSSP-annotated chains shipped in MDAnalysisTests,
the demo's inputs) and the same run's checkpoint: `--structures FOLDER` once, and
`--structure FILE` for the first `--single` files, one process each, alternating
(folder, file, file, ..., folder). Wall time per call includes what a user waits for:
interpreter and JAX start-up, checkpoint restore, compilation and the forward passes.
Without --workdir a 2-step tiny demo run is trained first (not timed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from bench import common  # noqa: E402  # pylint: disable=wrong-import-position


def _train_tiny(workdir: str) -> None:
  from bihier_jax.training import train_lib  # pylint: disable=g-import-not-at-top
  from configs import demo  # pylint: disable=g-import-not-at-top
  config = demo.get_config("tiny")
  config.train.num_steps = config.train.eval_every = config.train.checkpoint_every = 2
  train_lib.train_and_evaluate(config, workdir)


def _call(*args) -> float:
  env = dict(os.environ, PYTHONPATH=REPO, USE_TF="0")
  start = time.perf_counter()
  proc = subprocess.run([sys.executable, "-m", "bihier_jax.predict", "--noprogress",
                         *args], cwd=REPO, env=env, capture_output=True, text=True)
  seconds = time.perf_counter() - start
  if proc.returncode != 0:
    raise RuntimeError(f"predict {' '.join(args)} failed: {proc.stderr[-2000:]}")
  return seconds


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default="", help="a trained run (default: train one)")
  parser.add_argument("--single", type=int, default=4,
                      help="files predicted one call each")
  parser.add_argument("--rounds", type=int, default=2, help="folder calls")
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--json", default="")
  args = parser.parse_args()
  from data_pipelines import demo  # pylint: disable=g-import-not-at-top
  from bihier_jax.data import from_files  # pylint: disable=g-import-not-at-top
  tmp = tempfile.mkdtemp(prefix="bench_predict_")
  try:
    workdir = args.workdir
    if not workdir:
      workdir = os.path.join(tmp, "run")
      _train_tiny(workdir)
    raw = demo.default_raw_dir()
    files = [p for p in from_files.expand(raw) if p.endswith(".pdb.gz")]
    if args.quick:
      files = files[:8]
    folder = os.path.join(tmp, "structures")
    os.makedirs(folder)
    for p in files:
      shutil.copy(p, folder)
    loaded = from_files.load(sorted(os.path.join(folder, f)
                                          for f in os.listdir(folder)))
    proteins = len(loaded.examples)
    single = loaded.example_file[:max(1, 2 if args.quick else args.single)]
    folder_s, single_s = [], []
    for r in range(args.rounds):
      folder_s.append(_call("--workdir", workdir, "--structures", folder, "--out",
                            os.path.join(tmp, f"all{r}.npz")))
      if r == 0:
        for i, path in enumerate(single):
          single_s.append(_call("--workdir", workdir, "--structure", path, "--out",
                                os.path.join(tmp, f"one{i}.npz")))
    folder_t = statistics.median(folder_s)
    single_t = statistics.median(single_s)
    results = {
        "files": len(files), "proteins": proteins,
        "residues": sum(ex.num_residues for ex in loaded.examples),
        "folder_call_s": round(folder_t, 2),
        "folder_proteins_per_s": round(proteins / folder_t, 3),
        "single_call_s_median": round(single_t, 2),
        "single_proteins_per_s": round(1.0 / single_t, 3),
        "speedup": round((proteins / folder_t) * single_t, 1),
    }
    print(json.dumps(results, indent=1))
    common.write_json(args.json, results)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  main()
