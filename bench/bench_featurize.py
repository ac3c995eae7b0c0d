"""Preprocessing throughput: residues/s per core for parse + features + graph.

Runs in one process over real structures shipped with MDAnalysisTests: the 52 DSSP test
chains (data/dssp/*.pdb.gz) and the PDB/mmCIF entries in data/ and data/mmcif/. Reports,
per stage, residues per CPU-second (process time, robust on a shared machine) and per
wall-second:

  bare      gemmi.read_structure + cKDTree neighbour query on Cα (the floor to compare)
  parse     structure.parse_structure (all rules: altlocs, entities, ligands, ...)
  features  featurize.example_from_chains on parsed chains (torsions + graph)
  total     featurize.examples_from_file (parse + features + graph), one example/chain

Usage:
  python bench/bench_featurize.py [--quick] [--repeats N] [--json PATH]
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import platform
import sys
import time

import gemmi
import numpy as np
from scipy import spatial

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=wrong-import-position
from bench import common
from bihier_jax.common import structure
from bihier_jax.data import featurize

# Crystal/NMR entries of MDAnalysisTests/data (MD topologies, mostly solvent, left out).
_ENTRIES = ("19hc.pdb.gz", "1a28.pdb.gz", "1hvr.pdb", "1osm.pdb.gz", "4E43.pdb",
            "5a7u.pdb", "adk_open.pdb", "mmcif/1BD2.cif.gz", "mmcif/3KPR.cif.gz",
            "mmcif/3PWP.cif.gz", "mmcif/5PTI.cif.gz", "mmcif/1BD2.pdb.gz",
            "mmcif/3KPR.pdb.gz", "mmcif/3PWP.pdb.gz")


def structure_files(quick: bool) -> list[str]:
  spec = importlib.util.find_spec("MDAnalysisTests")
  if spec is None:
    raise SystemExit("MDAnalysisTests is not installed (pip install -e .[demo])")
  data = os.path.join(spec.submodule_search_locations[0], "data")
  files = sorted(glob.glob(os.path.join(data, "dssp", "*.pdb.gz")))
  if not quick:
    files += [os.path.join(data, name) for name in _ENTRIES]
  return [f for f in files if os.path.exists(f)]


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _timed(fn, repeats):
  """(result, best CPU seconds, best wall seconds) over repeats."""
  best_cpu = best_wall = float("inf")
  result = None
  for _ in range(repeats):
    c0, w0 = time.process_time(), time.perf_counter()
    result = fn()
    best_cpu = min(best_cpu, time.process_time() - c0)
    best_wall = min(best_wall, time.perf_counter() - w0)
  return result, best_cpu, best_wall


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="DSSP chains only, 1 repeat")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--json", help="write the figures to this file")
  args = parser.parse_args()
  repeats = 1 if args.quick else args.repeats
  files = structure_files(args.quick)
  parsed = [structure.parse_structure(f) for f in files]  # warm-up, residue count
  n_res = sum(p.num_residues for p in parsed)
  n_chains = sum(len(p.chains) for p in parsed)

  def bare():
    for f in files:
      st = gemmi.read_structure(f)
      ca = np.array([r["CA"][0].pos.tolist() for ch in st[0] for r in ch
                     if r.find_atom("CA", "*")])
      spatial.cKDTree(ca).query(ca, k=33, distance_upper_bound=10.0)

  def parse():
    return [structure.parse_structure(f) for f in files]

  def features():
    return [featurize.example_from_chains(f"{i}", [c])
            for i, p in enumerate(parsed) for c in p.chains]

  def total():
    return [ex for f in files for ex in featurize.examples_from_file(f)]

  results = {}
  for name, fn in (("bare", bare), ("parse", parse), ("features", features),
                   ("total", total)):
    out, cpu, wall = _timed(fn, repeats)
    results[name] = {"cpu_s": cpu, "wall_s": wall, "residues_per_cpu_s": n_res / cpu,
                     "residues_per_wall_s": n_res / wall}
    if name == "total":
      results[name]["edges_per_residue"] = sum(e.num_edges for e in out) / n_res
  report = {
      "machine": f"{_cpu_name()}, {os.cpu_count()} logical CPUs, "
                 f"load average {os.getloadavg()[0]:.1f} at start",
      "files": len(files), "chains": n_chains, "residues": n_res, "repeats": repeats,
      "stages": results,
  }
  print(f"{report['machine']}\n{len(files)} files, {n_chains} chains, {n_res} residues, "
        f"best of {repeats}")
  for name, r in results.items():
    print(f"  {name:9s} {r['residues_per_cpu_s']:>10,.0f} residues/CPU-s "
          f"{r['residues_per_wall_s']:>10,.0f} residues/wall-s")
  common.write_json(args.json, report, indent=2)


if __name__ == "__main__":
  main()
