"""The worked example of task `custom`: label files from MDAnalysisTests' DSSP strings.

  python -m data_pipelines.custom example --out DIR

Public: SS_NAMES, write_dssp_example, main (docs/custom_data.md, "Worked example").
"""

from __future__ import annotations

import argparse
import csv
import glob
import os

import numpy as np

SS_NAMES = ("helix", "strand", "other")  # data_pipelines.demo's 3-state classes 0, 1, 2


def write_dssp_example(out_dir: str, raw_dir: str | None = None) -> dict[str, str]:
  """Label files of the worked example from MDAnalysisTests' `data/dssp/` (real DSSP).

  Writes
    helix_fraction.csv         structure,chain,label: the fraction of the chain's
                               residues in a helix (DSSP H, G, I), 6 decimals
    secondary_structure.csv    structure,chain,residue,label: helix / strand / other per
                               residue (the demo's 3-state reduction of DSSP)
  for every chain whose DSSP string fits its residues (data_pipelines/demo.py).

  Returns:
    {'raw': the structure folder, 'protein': path, 'residue': path}.
  """
  from bihier_jax.common import structure  # pylint: disable=g-import-not-at-top
  from data_pipelines import demo  # pylint: disable=g-import-not-at-top
  raw_dir = raw_dir or demo.default_raw_dir()
  os.makedirs(out_dir, exist_ok=True)
  protein_rows, residue_rows = [], []
  for path in sorted(glob.glob(os.path.join(raw_dir, "*.pdb.gz"))):
    file_id = os.path.basename(path)[:-len(".pdb.gz")]
    dssp_path = path[:-len(".gz")] + ".dssp"
    if not os.path.exists(dssp_path):
      continue
    dssp = demo.read_dssp(dssp_path)
    chains = structure.parse_structure(path).chains
    if len(chains) != 1 or chains[0].num_residues != len(dssp):
      continue
    chain = chains[0]
    classes = demo.ss_labels(dssp).astype(int)
    protein_rows.append((file_id, chain.chain_id, f"{np.mean(classes == 0):.6f}"))
    residue_rows.extend(
        (file_id, chain.chain_id, f"{n}{i}", SS_NAMES[k])
        for n, i, k in zip(chain.residue_number.tolist(), chain.insertion_code.tolist(),
                           classes.tolist()))
  out = {"raw": raw_dir}
  for key, name, header, rows in (
      ("protein", "helix_fraction.csv", ("structure", "chain", "label"), protein_rows),
      ("residue", "secondary_structure.csv", ("structure", "chain", "residue", "label"),
       residue_rows)):
    out[key] = os.path.join(out_dir, name)
    with open(out[key], "w", newline="") as f:
      writer = csv.writer(f, lineterminator="\n")
      writer.writerow(header)
      writer.writerows(rows)
  return out


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m data_pipelines.custom",
      description="Writes the worked example's label files (docs/custom_data.md).")
  parser.add_argument("command", choices=("example",))
  parser.add_argument("--out", required=True, help="folder for the two CSV files")
  args = parser.parse_args(argv)
  paths = write_dssp_example(args.out)
  print(f"structures: {paths['raw']}\nprotein-level labels: {paths['protein']}\n"
        f"residue-level labels: {paths['residue']}\n\nnext:\n"
        f"  python -m data_pipelines.preprocess custom --raw {paths['raw']} "
        f"--labels {paths['protein']} --out PREPARED")
  return 0
