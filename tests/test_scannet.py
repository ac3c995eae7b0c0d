"""PPBS and BCE: ScanNet label files + structure files -> labelled examples.

Expected labels are computed with Biopython (ScanNet's parser) from the same structure
files, independently of our gemmi-based parser; the test checks that alignment puts
every label on the right residue.
"""

import os

import numpy as np
import pytest

from bihier_jax.common import structure
from data_pipelines import scannet, tasks
from fixtures import builders


@pytest.fixture(scope="module")
def ppbs_raw(tmp_path_factory):
  root = tmp_path_factory.mktemp("ppbs")
  return str(root), builders.write_ppbs(str(root))


@pytest.fixture(scope="module")
def bce_raw(tmp_path_factory):
  root = tmp_path_factory.mktemp("bce")
  return str(root), builders.write_bce(str(root))


def _process_all(task, items):
  examples, skipped = {}, {}
  for it in items:
    try:
      examples[it.source.split(":")[1]] = task.process(it)[0]
    except tasks.SkipItem as e:
      skipped[it.source.split(":")[1]] = str(e)
  return examples, skipped


def _check_labels(ex, expected_rows, labelled_rows):
  """Node labels at residues keyed by (chain, number, icode) equal the expected ones."""
  key = {(ex.chain_ids[r], int(n), str(i)): k for k, (r, n, i) in
         enumerate(zip(ex.chain_row, ex.residue_number, ex.insertion_code))}
  want = np.zeros(ex.num_residues, bool)
  for chain, number, icode, _, label in labelled_rows:
    k = key[(chain, number, icode)]
    want[k] = True
    assert ex.node_labels[k] == label, (ex.id, chain, number, icode)
  np.testing.assert_array_equal(ex.node_label_mask, want)
  assert len(expected_rows) >= ex.node_label_mask.sum()


def test_ppbs_examples(ppbs_raw):
  raw, expected = ppbs_raw
  task = tasks.get("ppbs")
  items = task.list_items(raw, None)
  assert [(it.split, it.payload[1]) for it in items] == [
      ("train", "train"), ("train", "train"), ("val", "70"), ("test", "homology"),
      ("test", "none")]
  examples, skipped = _process_all(task, items)
  assert set(skipped) == {"9zzz_0-A"} and "biological assembly" in skipped["9zzz_0-A"]
  for k, (header, ex) in enumerate(examples.items()):
    rows = expected[header]
    labelled = [r for r in rows if not (header.startswith("1osm") and r[2] == "B")]
    _check_labels(ex, rows, labelled)
    assert ex.weight == pytest.approx(0.25 + 0.125 * k)
    np.testing.assert_allclose(ex.node_weights, ex.weight)
  assert examples["1hvr_0-A"].node_labels.sum() == 41  # contacts with chain B
  # Inserted residues (icode B) without label lines are unlabelled, not shifted.
  osm = examples["1osm_0-A"]
  assert (osm.insertion_code == "B").any()
  assert not osm.node_label_mask[osm.insertion_code == "B"].any()
  assert osm.group == "70" and examples["1a28_0-B"].group == "homology"


def test_ppbs_model_index_reads_the_symmetry_copy(ppbs_raw):
  raw, _ = ppbs_raw
  task = tasks.get("ppbs")
  item = next(it for it in task.list_items(raw, None) if "1ubi" in it.source)
  ex = task.process(item)[0]
  original = structure.parse_structure(builders.real_structure("pdb1ubi.pdb")).chains[0]
  np.testing.assert_allclose(ex.atom_positions[:, 1],
                             original.atom_positions[:, 1] + [26.0, 0, 0], atol=1e-3)
  assert ex.node_labels.sum() > 0  # contacts with the copy in MODEL 1


def test_unmatched_labels_are_reported_not_guessed(ppbs_raw, tmp_path):
  raw, expected = ppbs_raw
  rows = expected["1hvr_0-A"] + [("A", 999, "", "W", 1)]
  (tmp_path / "labels.txt").write_text(builders._label_block("1hvr_0-A", rows))
  entry = scannet.read_label_file(str(tmp_path / "labels.txt"))[0]
  import dataclasses
  payload = (dataclasses.astuple(entry), "train", 1.0, "1hvr_0-A",
             os.path.join(raw, "structures"), True)
  strict = tasks.WorkItem("x:1hvr_0-A", "train", payload + (0.0, 10.0, 32))
  with pytest.raises(tasks.SkipItem, match="1/100 label lines.*A:999W"):
    scannet.PPBS.process(strict)
  tolerant = tasks.WorkItem("x:1hvr_0-A", "train", payload + (0.05, 10.0, 32))
  ex = scannet.PPBS.process(tolerant)[0]
  assert ex.node_label_mask.sum() == 99


def test_table_counts_must_match(tmp_path, ppbs_raw):
  raw, _ = ppbs_raw
  import shutil
  shutil.copytree(raw, tmp_path / "raw")
  with open(tmp_path / "raw" / "table.csv", "a") as f:
    f.write('99,2abc_0-A,"Validation (70\\%)",1.0\n')
  with pytest.raises(ValueError, match="2 rows.*70.*1 examples"):
    scannet.PPBS.list_items(str(tmp_path / "raw"), None)


def test_table_set_names_keep_the_literal_backslash(ppbs_raw):
  raw, _ = ppbs_raw
  assert r'"Validation (70\%)"' in open(os.path.join(raw, "table.csv")).read()
  assert [s for _, _, _, s in scannet.PPBS_FILES if "70" in s] == [
      r"Validation (70\%)", r"Test (70\%)"]


def test_headers():
  assert scannet.parse_header("1a2n_0-A") == ("1a2n", [(0, "A")])
  assert scannet.parse_header("3G48_1-A+1-B") == ("3g48", [(1, "A"), (1, "B")])
  assert scannet.parse_header("7e33_AB") == ("7e33", [(0, "A"), (0, "B")])
  assert scannet.parse_header("7d3m_13") == ("7d3m", [(0, "1"), (0, "3")])
  with pytest.raises(ValueError, match="neither"):
    scannet.parse_header("1a2n")


def test_bce_folds(bce_raw):
  raw, expected = bce_raw
  task = tasks.get("bce")
  items = task.list_items(raw, None)
  assert [it.split for it in items] == [f"fold{k}" for k in range(1, 6)]
  examples, skipped = _process_all(task, items)
  assert not skipped
  for k, (header, ex) in enumerate(examples.items(), 1):
    rows = [r for chain_rows in expected[header] for r in chain_rows]
    _check_labels(ex, rows, rows)
    assert ex.group == f"fold{k}" and ex.weight == pytest.approx(1.0 / k)
  two = examples["1a28_AB"]
  assert two.chain_ids == ["A", "B"] and len(two.sequences) == 2
  assert two.node_labels.sum() == 36


def test_bce_holdout_fold_splits(bce_raw):
  import argparse
  raw, _ = bce_raw
  args = argparse.Namespace(holdout_fold=2)
  splits = {it.source.split(":")[1]: it.split for it in scannet.BCE.list_items(raw, args)}
  assert splits["1hvr_B"] == "test"
  assert {v for k, v in splits.items() if k != "1hvr_B"} <= {"train", "val"}
  held = [scannet.held_out_for_validation(f"x{i}") for i in range(2000)]
  assert 0.07 < np.mean(held) < 0.13
