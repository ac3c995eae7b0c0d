"""PPBS and BCE: ScanNet label files + structure files -> labelled examples.

Expected labels are computed with Biopython (ScanNet's parser) from the same structure
files, independently of our gemmi-based parser; the test checks that alignment puts
every label on the right residue.
"""

import os

import numpy as np
import pytest

from bihier_jax.common import structure
from bihier_jax.data.graph import DEFAULT_GRAPH
from data_pipelines import scannet, tasks
from fixtures import builders

GRAPH = (DEFAULT_GRAPH.cutoff, DEFAULT_GRAPH.max_neighbors)


@pytest.fixture(scope="module")
def ppbs_raw(tmp_path_factory):
  root = tmp_path_factory.mktemp("ppbs")
  return str(root), builders.write_ppbs(str(root))


@pytest.fixture(scope="module")
def bce_raw(tmp_path_factory):
  root = tmp_path_factory.mktemp("bce")
  return str(root), builders.write_bce(str(root))


def _process_all(task, items):
  examples, skipped, dropped = {}, {}, {}
  for it in items:
    try:
      out = task.process(it)
      examples[it.source.split(":")[1]] = out[0]
      dropped[it.source.split(":")[1]] = out.dropped
    except tasks.SkipItem as e:
      skipped[it.source.split(":")[1]] = str(e)
  return examples, skipped, dropped


def _check_labels(ex, expected_rows, labelled_rows, chain_of=None):
  """Node labels at residues keyed by (chain, number, icode) equal the expected ones;
  `chain_of` maps a label file's chain id to the structure's (assembly copies)."""
  key = {(ex.chain_ids[r], int(n), str(i)): k for k, (r, n, i) in
         enumerate(zip(ex.chain_row, ex.residue_number, ex.insertion_code))}
  want = np.zeros(ex.num_residues, bool)
  for row in labelled_rows:
    k = key[((chain_of or {}).get(row.chain, row.chain), row.number, row.icode)]
    want[k] = True
    assert ex.node_labels[k] == row.label, (ex.id, row)
  np.testing.assert_array_equal(ex.node_label_mask, want)
  assert len(expected_rows) >= ex.node_label_mask.sum()


def test_ppbs_examples(ppbs_raw):
  raw, expected = ppbs_raw
  task = tasks.get("ppbs")
  items = task.list_items(raw, None)
  assert [(it.split, it.group) for it in items] == [
      ("train", "train"), ("train", "train"), ("val", "70"), ("test", "homology"),
      ("test", "none")]
  examples, skipped, dropped = _process_all(task, items)
  assert set(skipped) == {"9zzz_0-A"} and "biological assembly" in skipped["9zzz_0-A"]
  for k, (header, ex) in enumerate(examples.items()):
    rows = expected[header]
    # Lines of residues without CA have no node; 1osm's inserted residues no line.
    labelled = [r for r in rows if r.has_ca
                and not (header.startswith("1osm") and r.icode == "B")]
    _check_labels(ex, rows, labelled, chain_of={"B": "B-2"} if header == "1a28_1-B"
                  else None)
    assert ex.weight == pytest.approx(0.25 + 0.125 * k)
    np.testing.assert_allclose(ex.node_weights, ex.weight)
  # Contacts with chain B: 41 residues, less CSO 67 (not a ScanNet residue) and Ile 50
  # (no CA, no node).
  assert examples["1hvr_0-A"].node_labels.sum() == 39
  # Inserted residues (icode B) without label lines are unlabelled, not shifted.
  osm = examples["1osm_0-A"]
  assert (osm.insertion_code == "B").any()
  assert not osm.node_label_mask[osm.insertion_code == "B"].any()
  assert osm.group == "70" and examples["1a28_1-B"].group == "homology"


def test_ppbs_residue_sets_follow_scannet(ppbs_raw):
  """1hvr chain A as ScanNet reads it: the residue without CA and the Phe written as
  HETATM after TER are in the label lines. The Phe is a labelled residue here too; the
  CA-less residue cannot be a node, so its line is dropped and counted, and the chain
  is kept under the default --max-unmatched-fraction 0."""
  raw, expected = ppbs_raw
  task = tasks.get("ppbs")
  item = next(it for it in task.list_items(raw, None) if "1hvr" in it.source)
  out = task.process(item)
  ex = out[0]
  rows = expected["1hvr_0-A"]
  assert [(r.number, r.has_ca) for r in rows if not r.has_ca] == [(50, False)]
  phe = np.nonzero(ex.residue_number == builders.HETATM_AFTER_TER[1])[0]
  assert len(phe) == 1 and ex.sequences[0][phe[0]] == "F" and ex.node_label_mask[phe[0]]
  assert ex.node_labels[phe[0]] == rows[-1].label == 1
  assert builders.CA_LESS[1] not in ex.residue_number
  assert out.dropped["label_lines_without_ca"] == 1
  assert out.dropped["residues_without_ca"] == 1
  assert "label_lines_unmatched" not in out.dropped
  # CSO 67 is not one of ScanNet's residues: kept here, without a label line.
  k = np.nonzero(ex.residue_number == 67)[0][0]
  assert not ex.node_label_mask[k]
  assert out.dropped["residues_without_label_line"] == 1
  assert out.notes["hetatm_amino_acids"] == 1


def test_post_2022_single_model_assembly(ppbs_raw):
  """`1a28_1-B` (model 1, chain B of the old .pdb1) read from a single-model assembly
  mmCIF: it is chain B-2, the second copy, not an error ("model 1 requested")."""
  raw, _ = ppbs_raw
  task = tasks.get("ppbs")
  item = next(it for it in task.list_items(raw, None) if "1a28" in it.source)
  ex = task.process(item)[0]
  assert ex.chain_ids == ["B-2"]
  original = next(c for c in structure.parse_structure(
      builders.real_structure("1a28.pdb.gz")).chains if c.chain_id == "B")
  np.testing.assert_allclose(ex.atom_positions[:, 1],
                             original.atom_positions[:, 1] + [80.0, 0, 0], atol=1e-3)
  parsed = structure.parse_structure(os.path.join(
      raw, "structures", "a2", "1a28-assembly1.cif.gz"))
  assert scannet.assembly_copy(parsed, 0, "B") == "B"
  assert scannet.assembly_copy(parsed, 1, "A") == "A-2"
  assert scannet.assembly_copy(parsed, 2, "A") is None


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
  rows = expected["1hvr_0-A"] + [builders.LabelRow("A", 999, "", "W", 1, True)]
  (tmp_path / "labels.txt").write_text(builders._label_block("1hvr_0-A", rows))
  entry = scannet.read_label_file(str(tmp_path / "labels.txt"))[0]
  import dataclasses
  payload = (dataclasses.astuple(entry), "1hvr_0-A", "train", 1.0, "1hvr_0-A",
             os.path.join(raw, "structures"), True)
  strict = tasks.WorkItem("x:1hvr_0-A", "train", payload + (0.0, *GRAPH))
  with pytest.raises(tasks.SkipItem, match=f"1/{len(rows)} label lines.*A:999W"):
    scannet.PPBS.process(strict)
  tolerant = tasks.WorkItem("x:1hvr_0-A", "train", payload + (0.05, *GRAPH))
  out = scannet.PPBS.process(tolerant)
  assert out[0].node_label_mask.sum() == sum(r.has_ca for r in rows) - 1
  assert out.dropped["label_lines_unmatched"] == 1


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


def test_table_set_names_without_the_backslash(tmp_path, ppbs_raw):
  """A table.csv whose Set strings lack the backslash (`Validation (70%)`) gives the
  same items and weights."""
  import shutil
  raw, _ = ppbs_raw
  shutil.copytree(raw, tmp_path / "raw")
  table = tmp_path / "raw" / "table.csv"
  text = table.read_text()
  table.write_text(text.replace("\\%", "%"))
  assert "\\" not in table.read_text()
  ours = [(it.source, it.split, it.payload[3]) for it in
          scannet.PPBS.list_items(str(tmp_path / "raw"), None)]
  assert ours == [(it.source, it.split, it.payload[3])
                  for it in scannet.PPBS.list_items(raw, None)]


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
  assert [it.split for it in items] == ["fold1"] + [f"fold{k}" for k in range(1, 6)]
  examples, skipped, _ = _process_all(task, items)
  assert not skipped and list(examples) == list(expected)
  for example_id, ex in examples.items():
    rows = [r for chain_rows in expected[example_id] for r in chain_rows]
    _check_labels(ex, rows, rows)
    k = int(ex.group[-1])
    assert ex.group == f"fold{k}" and ex.weight == pytest.approx(1.0 / k)
  two = examples["1a28_AB#1"]
  assert two.chain_ids == ["A", "B"] and len(two.sequences) == 2
  assert two.node_labels.sum() == 36


def test_bce_repeated_headers_get_unique_ids(bce_raw):
  """The two `1a28_AB` blocks of fold 1 label one structure differently; each keeps its
  own labels under its own id, and the manifest sources differ."""
  raw, expected = bce_raw
  items = scannet.BCE.list_items(raw, None)
  assert len({it.source for it in items}) == len(items)
  assert [it.source for it in items[:2]] == ["labels_fold1.txt:1a28_AB#1",
                                             "labels_fold1.txt:1a28_AB#2"]
  first, second = (scannet.BCE.process(it)[0] for it in items[:2])
  assert (first.id, second.id) == ("1a28_AB#1", "1a28_AB#2")
  assert second.node_labels.sum() > first.node_labels.sum()  # 8 Å vs 5 Å contacts
  for ex in (first, second):
    rows = [r for chain_rows in expected[ex.id] for r in chain_rows]
    _check_labels(ex, rows, rows)
  assert scannet.unique_ids(["a", "b", "a", "c", "a"]) == ["a#1", "b", "a#2", "c", "a#3"]


def test_bce_holdout_fold_splits(bce_raw):
  import argparse
  raw, _ = bce_raw
  args = argparse.Namespace(holdout_fold=4)
  splits = {it.source.split(":")[1]: it.split for it in scannet.BCE.list_items(raw, args)}
  assert splits == {"1a28_AB#1": "train", "1a28_AB#2": "train", "1hvr_B": "train",
                    "4e43_A": "train", "1ubi_A": "test", "1osm_A": "val"}


def test_validation_holdout_keeps_entries_and_antigens_together():
  """Chains of one entry (2ltq_A, 2ltq_D) or one antigen never straddle train and val;
  about 10% of the examples are held out."""
  rng = np.random.default_rng(0)
  examples = []
  for i in range(600):
    pdb_id = f"{i // 3:04d}"  # three chains per entry, entries of one antigen in a row
    antigen = f"Antigen {i // 3 // rng.integers(1, 4)}" if i % 7 else ""
    examples.append((f"{pdb_id}_{'ABC'[i % 3]}", pdb_id, antigen))
  val = scannet.validation_holdout(examples)
  assert 0.08 * len(examples) <= len(val) <= 0.1 * len(examples)
  for key in (1, 2):  # PDB id, antigen name
    sides = {}
    for example_id, *fields in examples:
      if fields[key - 1]:
        sides.setdefault(fields[key - 1], set()).add(example_id in val)
    assert all(len(s) == 1 for s in sides.values())
  assert scannet.validation_holdout(examples) == val  # deterministic
  assert scannet.validation_holdout(list(reversed(examples))) == val
