"""The embedded demo dataset: 50 DSSP-labelled chains, labels aligned, fixed split."""

import glob
import json
import os

import numpy as np
import pytest

from bihier_jax.common import residue_constants as rc
from bihier_jax.data import pipeline
from bihier_jax.data import records
from data_pipelines import demo
from data_pipelines import preprocess


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("demo"))
  preprocess.main(["demo", "--out", out, "--workers", "1", "--no-progress"])
  return out


def _examples(out):
  exs = {}
  for split in ("train", "val", "test"):
    for path in pipeline.shard_files(out, split):
      for ex in records.read_records(path):
        exs[ex.id] = (split, ex)
  return exs


def test_demo_has_50_labelled_chains_and_two_documented_skips(demo_dir):
  with open(os.path.join(demo_dir, "metadata.json")) as f:
    metadata = json.load(f)
  counts = {s: v["examples"] for s, v in metadata["splits"].items()}
  assert counts == {"train": 35, "val": 8, "test": 7}
  with open(os.path.join(demo_dir, "manifest.jsonl")) as f:
    skipped = [json.loads(line) for line in f if '"skipped"' in line]
  assert sorted(os.path.basename(m["source"]) for m in skipped) == [
      "1mr1D_failing.pdb.gz", "wrong_hydrogens.pdb.gz"]
  assert all("no DSSP string" in m["reason"] for m in skipped)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::PendingDeprecationWarning")
def test_labels_align_with_dssp_and_an_independent_parser(demo_dir):
  import MDAnalysis  # pylint: disable=g-import-not-at-top
  raw = demo.default_raw_dir()
  exs = _examples(demo_dir)
  assert len(exs) == len(glob.glob(os.path.join(raw, "*.pdb.dssp")))
  for ex_id, (split, ex) in exs.items():
    assert split == demo.SPLIT_OF[ex_id]
    dssp = demo.read_dssp(os.path.join(raw, ex_id + ".pdb.dssp"))
    want = np.array([0 if c in "HGI" else 1 if c in "EB" else 2 for c in dssp])
    np.testing.assert_array_equal(ex.node_labels, want)
    assert ex.node_label_mask.all()
  # Residue-by-residue check of a few chains against MDAnalysis's own parse: the
  # residues with a CA, in file order, have our one-letter codes.
  for ex_id in ("1ahsA", "3q4oA", "2va0A"):
    u = MDAnalysis.Universe(os.path.join(raw, ex_id + ".pdb.gz"))
    ca = u.select_atoms("protein and name CA")
    letters = "".join(rc.one_letter(r) or "X" for r in ca.resnames)
    ex = exs[ex_id][1]
    assert ex.sequences[0] == letters
    np.testing.assert_array_equal(ex.residue_number, ca.resnums)
    np.testing.assert_allclose(ex.atom_positions[:, 1], ca.positions, atol=1e-3)


def test_split_is_fixed_and_disjoint():
  assert not set(demo.TRAIN) & set(demo.VAL)
  assert not set(demo.TRAIN) & set(demo.TEST)
  assert not set(demo.VAL) & set(demo.TEST)
  import hashlib  # pylint: disable=g-import-not-at-top
  for ex_id, split in demo.SPLIT_OF.items():
    h = int(hashlib.sha256(ex_id.encode()).hexdigest(), 16) % 100
    assert split == ("train" if h < 70 else "val" if h < 85 else "test")
