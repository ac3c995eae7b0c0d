"""Task `demo`: the DSSP-annotated chains shipped in MDAnalysisTests (`data/dssp/`).

Files: `<pdb id><chain>.pdb.gz`, one protein chain each, and beside 50 of them
`<pdb id><chain>.pdb.dssp` (the chain's DSSP string, one character per residue with a
CA). Labels: the 3-state reduction of DSSP (H, G, I -> 0 helix; E, B -> 1 strand; else
2 other). Split: fixed by the SHA-256 of the file id (35 / 8 / 7 labelled chains).
Details: docs/tasks.md, "Raw inputs". Public: DEMO, default_raw_dir, read_dssp,
ss_labels, SS_CLASS, TRAIN, VAL, TEST.
"""

from __future__ import annotations

import argparse
import glob
import os

import numpy as np

from data_pipelines.tasks import SkipItem, WorkItem

NUM_CLASSES = 3
SS_CLASS = {"H": 0, "G": 0, "I": 0, "E": 1, "B": 1}  # anything else -> 2
OTHER = 2

TRAIN = ("1ahsA", "1dx5I", "1eteA", "1h4aX", "1lpbA", "1mr1D", "1mr1D_failing", "1or4A",
         "1pdoA", "1y1lA", "2cayA", "2cviA", "2fvvA", "2gu3A", "2i39A", "2j49A", "2qdlA",
         "2xcjA", "2xdgA", "2xr6A", "3a4rA", "3e8mA", "3ejfA", "3gfsA", "3gknA", "3gwiA",
         "3ieyB", "3ii2A", "3k7pA", "3lqcA", "3nbkA", "3nngA", "3ny7A", "3on9A", "3vjzA",
         "4dkcA")
VAL = ("1bvyF", "1i8nA", "2a2lA", "2va0A", "3aqgA", "3hklA", "3l4rA", "3pivA",
       "wrong_hydrogens")
TEST = ("1v7mV", "3fhkA", "3nzmA", "3q4oA", "3so6A", "3t5gB", "4gcnA")
SPLIT_OF = {**{i: "train" for i in TRAIN}, **{i: "val" for i in VAL},
            **{i: "test" for i in TEST}}


def default_raw_dir() -> str:
  """`data/dssp/` of the installed MDAnalysisTests package (the `demo` extra)."""
  try:
    import MDAnalysisTests  # pylint: disable=g-import-not-at-top
  except ImportError as err:
    raise SystemExit("demo data needs MDAnalysisTests: pip install -e '.[demo]'") from err
  return os.path.join(os.path.dirname(MDAnalysisTests.__file__), "data", "dssp")


def read_dssp(path: str) -> str:
  """The secondary-structure string of a `.pdb.dssp` file (first field of line 1)."""
  with open(path) as f:
    line = f.readline().rstrip("\n")
  fields = line.split(" ")
  if len(fields) < 2 or not fields[0]:
    raise SkipItem(f"{path}: first line is not '<dssp string> <file name>'")
  return fields[0]


def ss_labels(dssp: str) -> np.ndarray:
  """float32[len] 3-state class per residue (0 helix, 1 strand, 2 other)."""
  return np.array([SS_CLASS.get(c, OTHER) for c in dssp], np.float32)


class DemoTask:
  """Chains of MDAnalysisTests/data/dssp with per-residue secondary-structure labels."""
  name = "demo"

  def list_items(self, raw_dir: str, args: argparse.Namespace) -> list[WorkItem]:
    del args
    raw_dir = raw_dir or default_raw_dir()
    items = []
    for path in sorted(glob.glob(os.path.join(raw_dir, "*.pdb.gz"))):
      file_id = os.path.basename(path)[:-len(".pdb.gz")]
      dssp = path[:-len(".gz")] + ".dssp"
      items.append(WorkItem(source=path, split=SPLIT_OF.get(file_id, "train"),
                            payload=(file_id, dssp if os.path.exists(dssp) else "")))
    if not items:
      raise SystemExit(f"demo: no *.pdb.gz under {raw_dir}")
    return items

  def process(self, item: WorkItem):
    from bihier_jax.data import featurize  # pylint: disable=g-import-not-at-top
    file_id, dssp_path = item.payload
    if not dssp_path:
      raise SkipItem(f"{item.source}: no DSSP string beside it")
    dssp = read_dssp(dssp_path)
    examples = featurize.examples_from_file(item.source, per_chain=False)
    if len(examples) != 1:
      raise SkipItem(f"{item.source}: expected one protein example, got {len(examples)}")
    ex = examples[0]
    if ex.num_residues != len(dssp):
      raise SkipItem(f"{item.source}: DSSP string has {len(dssp)} residues, the "
                     f"structure {ex.num_residues}")
    ex.id = file_id
    ex.node_labels = ss_labels(dssp)
    ex.node_label_mask = np.ones(ex.num_residues, bool)
    ex.node_weights = np.ones(ex.num_residues, np.float32)
    return [ex]


DEMO = DemoTask()


def build_records(directory: str) -> None:
  """Writes the demo records into `directory` (configs/demo.py's data.builder: training,
  eval and predict run it when the directory has none)."""
  from data_pipelines import preprocess  # pylint: disable=g-import-not-at-top
  preprocess.main(["demo", "--out", directory, "--workers", "1", "--no-progress"])
