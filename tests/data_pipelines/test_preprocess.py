"""Preprocessing: broken inputs end as `skipped`, resumable shards, manifest, TFDS."""

import glob
import gzip
import json
import os
import shutil

import numpy as np
import pytest

from bihier_jax.data import records
from bihier_jax import testing
from data_pipelines import demo
from data_pipelines import preprocess
from data_pipelines import shards
from data_pipelines import tasks
from data_pipelines.tasks import WorkItem


def _manifest(out):
  with open(os.path.join(out, "manifest.jsonl")) as f:
    return [json.loads(line) for line in f]


def _good_files():
  raw = demo.default_raw_dir()
  return [os.path.join(raw, f) for f in ("1ahsA.pdb.gz", "3q4oA.pdb.gz")]


def test_broken_inputs_are_skipped_and_the_rest_written(tmp_path):
  raw = tmp_path / "raw"
  raw.mkdir()
  good = _good_files()
  for path in good:
    shutil.copy(path, raw / os.path.basename(path))
  (raw / "empty.pdb").write_bytes(b"")
  with open(good[0], "rb") as f:
    (raw / "truncated.pdb.gz").write_bytes(f.read()[:300])  # cut gzip stream
  (raw / "garbage.cif").write_bytes(bytes(np.random.default_rng(0).integers(
      0, 256, 2000, dtype=np.uint8)))
  (raw / "ligand_only.pdb").write_text(
      "HETATM    1  O   HOH A   1      10.000  10.000  10.000  1.00  0.00           O\n"
      "HETATM    2  C1  LIG A   2      11.000  10.000  10.000  1.00  0.00           C\n"
      "END\n")
  out = str(tmp_path / "out")
  metadata = preprocess.main(["pdb_dir", "--raw", str(raw), "--out", out,
                              "--workers", "2", "--shard-size", "3", "--no-progress"])
  lines = {os.path.basename(m["source"]): m for m in _manifest(out)}
  assert len(lines) == 6
  for name in ("empty.pdb", "truncated.pdb.gz", "garbage.cif", "ligand_only.pdb"):
    assert lines[name]["status"] == "skipped", name
    assert lines[name]["reason"], name
    assert lines[name]["examples"] == 0
  for path in good:
    line = lines[os.path.basename(path)]
    assert line["status"] == "ok" and line["chains"] == 1 and line["n_residues"] > 50
  written = [ex for path in sorted(glob.glob(os.path.join(out, "train", "*.tfrecord")))
             for ex in records.read_records(path)]
  assert sorted(ex.num_residues for ex in written) == sorted(
      lines[os.path.basename(p)]["n_residues"] for p in good)
  assert metadata["splits"]["train"]["examples"] == 2
  assert metadata["splits"]["train"]["skipped"] == 4
  assert not glob.glob(os.path.join(out, "**", "*.tmp-*"), recursive=True)


def _ca_only(path) -> str:
  """The CA lines of a real gzipped PDB file (every residue lacks N, C and O)."""
  with open(path, "rb") as f:
    text = gzip.decompress(f.read()).decode()
  return "".join(l + "\n" for l in text.splitlines()
                 if l.startswith("ATOM") and l[12:16] == " CA ") + "END\n"


def _odd_folder(raw):
  """Real structures under odd names and compressions, and files that are not ones."""
  import bz2  # pylint: disable=g-import-not-at-top
  import zipfile  # pylint: disable=g-import-not-at-top
  import zlib  # pylint: disable=g-import-not-at-top
  import gemmi  # pylint: disable=g-import-not-at-top
  good = _good_files()
  with open(good[0], "rb") as f:
    plain = gzip.decompress(f.read())
  raw.mkdir()
  (raw / "1ahsA.pdb.bz2").write_bytes(bz2.compress(plain))
  st = gemmi.read_structure(good[1])
  st.setup_entities()
  st.make_mmcif_document().write_file(str(raw / "3q4oA.pdbx"))
  (raw / "1ahsA_copy.structure").write_bytes(plain)  # PDB content, unlisted extension
  (raw / "1ahsA_ca.pdb").write_text(_ca_only(good[0]))
  (raw / "README.txt").write_text("Structures for the odd-folder test.\n")
  with zipfile.ZipFile(raw / "archive.zip", "w") as z:
    z.writestr("1ahsA.pdb", plain)
  (raw / "cut.pdb.bz2").write_bytes(bz2.compress(plain)[:1500])
  # gzip output ending on a whole record: read in part before, refused now.
  head = plain[:plain.index(b"\nATOM", len(plain) // 2) + 1]
  gz = zlib.compressobj(wbits=31)
  (raw / "cut_at_record.pdb.gz").write_bytes(gz.compress(head) + gz.flush(zlib.Z_FULL_FLUSH))
  return {"ok": ("1ahsA.pdb.bz2", "3q4oA.pdbx", "1ahsA_copy.structure", "1ahsA_ca.pdb"),
          "skipped": {"README.txt": "not a PDB or mmCIF", "archive.zip": "zip archive",
                      "cut.pdb.bz2": "truncated or corrupt bzip2",
                      "cut_at_record.pdb.gz": "truncated or corrupt gzip"}}


def test_pdb_dir_accounts_for_every_file(tmp_path, capsys):
  """Every file of the folder is in the manifest, read by content or skipped with why;
  CA-only residues are counted and warned about (default), left out (skip), or kept
  quietly (allow)."""
  raw = tmp_path / "raw"
  expect = _odd_folder(raw)
  out = str(tmp_path / "warn")
  metadata = preprocess.main(["pdb_dir", "--raw", str(raw), "--out", out,
                              "--workers", "1", "--no-progress"])
  lines = {os.path.basename(m["source"]): m for m in _manifest(out)}
  assert sorted(lines) == sorted(os.listdir(raw))
  for name in expect["ok"]:
    assert lines[name]["status"] == "ok", (name, lines[name]["reason"])
  for name, reason in expect["skipped"].items():
    assert lines[name]["status"] == "skipped" and reason in lines[name]["reason"], name
  n_ca = lines["1ahsA_ca.pdb"]["n_residues"]
  assert n_ca == lines["1ahsA.pdb.bz2"]["n_residues"] > 50
  assert lines["1ahsA_ca.pdb"]["incomplete_backbone"] == n_ca
  assert all(lines[n]["incomplete_backbone"] == 0 for n in expect["ok"][:3])
  assert metadata["incomplete_backbone"] == {
      "policy": "warn", "sources": 1, "residues": n_ca, "examples_left_out": 0}
  warning = [l for l in capsys.readouterr().err.splitlines() if l.startswith("warning:")]
  assert len(warning) == 1 and f"{n_ca} residue(s) without a complete backbone" in warning[0]

  out = str(tmp_path / "skip")
  metadata = preprocess.main(["pdb_dir", "--raw", str(raw), "--out", out, "--workers",
                              "1", "--no-progress", "--incomplete-backbone", "skip"])
  line = {os.path.basename(m["source"]): m for m in _manifest(out)}["1ahsA_ca.pdb"]
  assert line["status"] == "skipped" and "incomplete_backbone=skip" in line["reason"]
  assert metadata["splits"]["train"]["examples"] == 3
  out = str(tmp_path / "allow")
  capsys.readouterr()
  metadata = preprocess.main(["pdb_dir", "--raw", str(raw), "--out", out, "--workers",
                              "1", "--no-progress", "--incomplete-backbone", "allow"])
  assert metadata["splits"]["train"]["examples"] == 4
  assert metadata["incomplete_backbone"]["residues"] == n_ca
  assert "warning:" not in capsys.readouterr().err


def _items(n):
  return [WorkItem(source=f"s{i:02d}", split="train" if i % 4 else "val",
                   payload=(10 + i, i, 1, 0)) for i in range(n)]


class _Recorder:
  """A process function that records the items it saw (in-process runs only)."""

  def __init__(self):
    self.seen = []

  def __call__(self, item):
    self.seen.append(item.source)
    if item.source == "s05":
      raise KeyError("boom")  # an unexpected crash type
    return testing.synthetic_process(item)


def test_rerun_skips_finished_shards(tmp_path):
  out = str(tmp_path / "out")
  items = _items(16)  # train: 12 items -> 3 shards of 4; val: 4 items -> 1 shard
  first = _Recorder()
  shards.write_dataset(items, first, out, num_workers=1, shard_size=4, progress=False)
  assert len(first.seen) == 16
  lines = _manifest(out)
  crash = [m for m in lines if m["source"] == "s05"][0]
  assert crash["status"] == "skipped" and "KeyError" in crash["reason"]
  assert "boom" in crash["reason"]
  train_files = sorted(glob.glob(os.path.join(out, "train", "*.tfrecord")))
  assert [os.path.basename(f) for f in train_files] == [
      f"train-0000{i}-of-00003.tfrecord" for i in range(3)]
  mtime = os.path.getmtime(train_files[0])
  # A shard that was interrupted: its file is gone (a temp file never counts).
  os.remove(train_files[1])
  second = _Recorder()
  metadata = shards.write_dataset(items, second, out, num_workers=1, shard_size=4,
                                  progress=False)
  assert second.seen == ["s06", "s07", "s09", "s10"]  # train items 4..7 of the split
  assert os.path.getmtime(train_files[0]) == mtime
  assert _manifest(out) == lines  # finished shards' lines kept, same order
  assert metadata["splits"]["train"]["examples"] == 11
  assert metadata["splits"]["val"]["examples"] == 4
  # A third run has nothing to do.
  third = _Recorder()
  shards.write_dataset(items, third, out, num_workers=1, shard_size=4, progress=False)
  assert third.seen == []


def test_task_registry():
  assert {"pdb_dir", "demo", "lba30", "lba60", "mqa", "react", "ppbs", "bce"} <= set(
      tasks.names())
  assert tasks.get("demo") is demo.DEMO
  with pytest.raises(KeyError, match="unknown task"):
    tasks.get("nope")


def test_tfds_load_on_prepared_dir(tmp_path):
  out = str(tmp_path / "out")
  shards.write_dataset(_items(8), testing.synthetic_process, out, num_workers=1,
                       shard_size=4, progress=False)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from bihier_jax.data import tfds_builder  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  ds = tfds.load("bihier_records", split="val", data_dir=str(tmp_path / "tfds"),
                 builder_kwargs={"records_dir": out})
  got = {x["id"].decode(): x for x in tfds.as_numpy(ds)}
  assert sorted(got) == ["s00", "s04"]
  want = testing.synthetic_process(_items(8)[4])[0]
  np.testing.assert_array_equal(got["s04"]["atom_positions"], want.atom_positions)
  np.testing.assert_array_equal(got["s04"]["senders"], want.senders)
  assert [s.decode() for s in got["s04"]["sequences"]] == want.sequences


def test_gzip_helper_files_are_real():
  # The broken-input test relies on cutting a real gzip member short.
  with gzip.open(_good_files()[0]) as f:
    assert f.read(6) in (b"ATOM  ", b"HEADER", b"REMARK", b"CRYST1")


def test_other_shard_size_replaces_old_shards(tmp_path):
  out = str(tmp_path / "out")
  shards.write_dataset(_items(8), testing.synthetic_process, out, num_workers=1,
                       shard_size=2, progress=False)
  metadata = shards.write_dataset(_items(8), testing.synthetic_process, out,
                                  num_workers=1, shard_size=4, progress=False)
  assert sorted(os.listdir(os.path.join(out, "train"))) == [
      "sizes.json", "train-00000-of-00002.json", "train-00000-of-00002.tfrecord",
      "train-00001-of-00002.json", "train-00001-of-00002.tfrecord"]
  assert metadata["splits"]["train"]["examples"] == 6


def test_react_drops_notes_and_literature_counts(tmp_path, capsys):
  """What each item leaves out is in its manifest line and summed per split; the split
  sizes are printed and stored next to IEConv's, each difference with its reasons."""
  from fixtures import builders  # pylint: disable=g-import-not-at-top
  from data_pipelines import react  # pylint: disable=g-import-not-at-top
  raw = str(tmp_path / "raw")
  _, facts = builders.write_react(raw)
  out = str(tmp_path / "out")
  metadata = preprocess.main(["react", "--raw", raw, "--out", out, "--workers", "1",
                              "--no-progress", "--max-neighbors", "8"])
  lines = {m["source"].rsplit("/", 1)[1][:-5]: m for m in _manifest(out)}
  for name, chain_facts in facts.items():
    assert lines[name]["dropped"].get("hetero_atoms", 0) == len(chain_facts["hetero"])
  for split in ("train", "val", "test"):
    assert metadata["splits"][split]["dropped"].get("hetero_atoms", 0) == sum(
        len(facts[n]["hetero"]) for n, c in builders.REACT_CHAINS.items() if c[3] == split)
  assert metadata["dropped"]["hetero_atoms"] == sum(len(f["hetero"]) for f in facts.values())
  assert metadata["notes"]["residue_number"] == react.RESIDUE_NUMBER_NOTE
  subsets = metadata["reference_counts"]["subsets"]
  assert {k: (v["examples"], v["reference"]) for k, v in subsets.items()} == {
      "train": (4, 29215), "val": (1, 2562), "test": (1, 5651)}
  assert subsets["test"]["difference"] == 1 - 5651
  assert subsets["test"]["reasons"] == {
      "not listed in the raw files (partial download or --limit)": 5651 - 2,
      "missing HDF5 file": 1}
  printed = capsys.readouterr().out
  assert "react: chains per split vs. IEConv's ProtFunct split files" in printed
  assert "  test                    1      5,651      -5,650" in printed
  assert "1 × missing HDF5 file" in printed


def test_reference_counts_by_subset():
  from data_pipelines import reference  # pylint: disable=g-import-not-at-top
  ref = reference.ReferenceCounts("a paper", "chains", "split/group",
                                  {"val/70": 3, "test/70": 1})
  line = lambda split, group, status="ok", reason="", kind="": dict(  # noqa: E731
      source="x", split=split, group=group, status=status, reason=reason,
      examples=int(status == "ok"), **({"reason_kind": kind} if kind else {}))
  manifest = [line("val", "70"), line("val", "70", "skipped", "x: no file 1abc", "no file"),
              line("test", "70"), line("train", "train")]
  got = reference.compare(ref, manifest)
  assert got["val/70"] == {"examples": 1, "reference": 3, "difference": -2, "items": 2,
                           "reasons": {"no file": 1, "not listed in the raw files "
                                       "(partial download or --limit)": 1}}
  assert got["test/70"]["difference"] == 0 and not got["test/70"]["reasons"]
  assert got["train/train"]["reference"] is None
  assert reference.reason_kind(line("val", "70", "skipped", "x: 12 of 340 lines")) == (
      "# of # lines")
