"""MQA (ATOM3D PSR): atom3d-written LMDB fixtures -> one example per decoy."""

import numpy as np
import pytest

pytest.importorskip("atom3d")

from data_pipelines import mqa, tasks  # noqa: E402
from fixtures import builders  # noqa: E402


@pytest.fixture(scope="module")
def psr_raw(tmp_path_factory):
  root = tmp_path_factory.mktemp("psr")
  builders.write_psr(str(root), str(root / "tmp"), fmt="msgpack")
  return str(root)


def test_decoys_labels_groups(psr_raw):
  task = tasks.get("mqa")
  items = task.list_items(psr_raw, None)
  expected = [(split, target, decoy, gdt)
              for split, targets in builders.PSR_TARGETS.items()
              for target, (_, decoys) in targets.items()
              for decoy, _, gdt in decoys]
  assert [it.split for it in items] == [e[0] for e in expected]
  examples = [task.process(it)[0] for it in items]
  for ex, (_, target, decoy, gdt) in zip(examples, expected):
    assert mqa.parse_decoy_id(ex.id) == (target, decoy)
    assert ex.group == target
    assert ex.graph_label == pytest.approx(gdt)
    assert len(ex.sequences) == 1 and len(ex.sequences[0]) == ex.num_residues
  # Decoys of one target share a sequence; coordinates differ by the added noise.
  a, b = examples[0], examples[1]
  assert a.sequences == b.sequences
  rms = np.sqrt(((a.atom_positions[:, 1] - b.atom_positions[:, 1]) ** 2).sum(-1).mean())
  assert 0.8 < rms < 2.0  # 0.8 Å per axis noise -> ~1.4 Å rms displacement


def test_decoy_id_parsing_never_evaluates():
  assert mqa.parse_decoy_id("('T0759', 'BAKER_TS1')") == ("T0759", "BAKER_TS1")
  for bad in ("__import__('os').system('true')", "'T0759'", "('a', 'b', 'c')"):
    with pytest.raises(ValueError):
      mqa.parse_decoy_id(bad)


def test_casp_round():
  assert mqa.casp_round("T0759") == "CASP11"
  assert mqa.casp_round("T0858") == "CASP11"
  assert mqa.casp_round("T0949") == "CASP13"
  assert mqa.casp_round("R0001") == "?"


def test_target_in_two_splits_is_rejected(tmp_path, monkeypatch):
  targets = {"train": {"T0601": ("1ahsA.pdb.gz", [("a_TS1", 0.0, 0.9)])},
             "val": {"T0601": ("1ahsA.pdb.gz", [("b_TS1", 0.5, 0.5)])},
             "test": {"T0801": ("1eteA.pdb.gz", [("a_TS1", 0.0, 0.9)])}}
  monkeypatch.setattr(builders, "PSR_TARGETS", targets)
  builders.write_psr(str(tmp_path), str(tmp_path / "tmp"))
  with pytest.raises(ValueError, match="T0601.*train and val"):
    mqa.MQA.list_items(str(tmp_path), None)


def test_pickle_lmdb_is_refused_with_its_path(tmp_path, monkeypatch):
  import argparse
  targets = {s: {"T0601": ("1ahsA.pdb.gz", [("a_TS1", 0.0, 0.9)])} if s == "train" else
             {f"T070{i}": ("1eteA.pdb.gz", [("a_TS1", 0.0, 0.9)])}
             for i, s in enumerate(("train", "val", "test"))}
  monkeypatch.setattr(builders, "PSR_TARGETS", targets)
  builders.write_psr(str(tmp_path), str(tmp_path / "tmp"), fmt="pkl")
  parser = argparse.ArgumentParser()
  mqa.MQA.add_arguments(parser)
  with pytest.raises(Exception, match="pickle-serialised, which is never read"):
    mqa.MQA.list_items(str(tmp_path), parser.parse_args([]))
  # The flag that once opted in is gone.
  with pytest.raises(SystemExit):
    parser.parse_args(["--allow-pickle"])
