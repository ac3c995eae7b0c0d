"""LBA: atom3d-written LMDB fixtures (real complexes) -> examples, via the task registry."""

import os

import numpy as np
import pytest

pytest.importorskip("atom3d")

from bihier_jax.common import residue_constants as rc  # noqa: E402
from data_pipelines import atom3d_lmdb, lba, tasks  # noqa: E402
from fixtures import builders  # noqa: E402


@pytest.fixture(scope="module")
def lba_raw(tmp_path_factory):
  root = tmp_path_factory.mktemp("lba")
  builders.write_lba(str(root), str(root / "tmp"), identity=30)
  return str(root)


def _examples(task, raw):
  items = task.list_items(raw, None)
  return items, {it.source: task.process(it)[0] for it in items}


def test_registry_lists_every_complex(lba_raw):
  task = tasks.get("lba30")
  items = task.list_items(lba_raw, None)
  assert [it.split for it in items] == ["train", "train", "val", "test"]
  with pytest.raises(FileNotFoundError, match="identity-60"):
    tasks.get("lba60").list_items(lba_raw, None)


def test_pocket_nodes_ligand_nodes_and_full_sequences(lba_raw):
  task = tasks.get("lba30")
  items, examples = _examples(task, lba_raw)
  by_id = {ex.id: ex for ex in examples.values()}
  assert set(by_id) == {"1hvr", "3mht", "1a28", "4e43"}
  for split, complexes in builders.LBA_COMPLEXES.items():
    for fname, pdb_id, code, label in complexes:
      ex = by_id[pdb_id]
      assert ex.graph_label == pytest.approx(label)
      path = next(it.payload[0] for it in items if it.split == split)
      record = atom3d_lmdb.LMDBDataset(path).get(pdb_id)
      ligand = record["atoms_ligand"]
      # Ligand atoms are extra nodes typed by element, with the stored coordinates.
      assert len(ex.ligand_elements) == len(ligand)
      np.testing.assert_allclose(ex.ligand_positions, ligand.coords, atol=1e-3)
      assert [rc.LIGAND_ELEMENTS[e] for e in ex.ligand_elements] == [
          e if e in rc.LIGAND_ELEMENTS else "OTHER" for e in ligand["element"]]
      # Graph indices reach the ligand nodes (after the residues).
      n = ex.num_residues
      assert ex.senders.max() >= n and ex.senders.max() < n + len(ligand)
      # Pocket residues index into the full chain sequence.
      pocket = record["atoms_pocket"]
      pocket_keys = {(c, int(r), i.strip()) for c, r, i, h in zip(
          pocket["chain"], pocket["residue"], pocket["insertion_code"], pocket["hetero"])
          if h != "W" and rc.one_letter(
              pocket["resname"][list(pocket["residue"]).index(r)]) is not None}
      assert n <= len(pocket_keys)
      assert n < sum(len(s) for s in ex.sequences)
      protein = record["atoms_protein"]
      for k in range(n):
        chain = ex.chain_ids[ex.chain_row[k]]
        seq = ex.sequences[ex.chain_row[k]]
        assert seq[ex.residue_index[k]] == rc.RESTYPES[ex.aatype[k]]
        # Independent check from the table: the CA of this residue in the protein.
        rows = ((protein["chain"] == chain) & (protein["residue"] == ex.residue_number[k])
                & (protein["name"] == "CA"))
        np.testing.assert_allclose(protein.coords[rows][0], ex.atom_positions[k, 1],
                                   atol=1e-3)
        cas = [(c, r) for c, r, nm, h in zip(protein["chain"], protein["residue"],
                                             protein["name"], protein["hetero"])
               if c == chain and nm == "CA" and h != "W"
               and rc.one_letter(protein["resname"][
                   np.nonzero((protein["chain"] == c) & (protein["residue"] == r))[0][0]])]
        assert cas.index((chain, ex.residue_number[k])) == ex.residue_index[k]


def test_hydrogens_and_modified_residue_in_1hvr(lba_raw):
  task = tasks.get("lba30")
  items, examples = _examples(task, lba_raw)
  ex = next(e for e in examples.values() if e.id == "1hvr")
  # 1hvr has explicit hydrogens on its ligand (XK2) and a CSO (modified Cys) residue.
  assert "OTHER" not in [rc.LIGAND_ELEMENTS[e] for e in ex.ligand_elements]
  assert all("C" in s for s in ex.sequences)
  assert [len(s) for s in ex.sequences] == [99, 99]


def test_leaking_splits_are_rejected(tmp_path):
  splits = {"train": [("1a28.pdb.gz", "1a28", "H_STR", 8.7)],
            "val": [("1a28.pdb.gz", "1a28", "H_STR", 8.7)],
            "test": [("4E43.pdb", "4e43", "H_GOL", 3.0)]}
  builders.write_lba(str(tmp_path), str(tmp_path / "tmp"), identity=60, splits=splits)
  with pytest.raises(ValueError, match="1a28.*leak"):
    lba.LBA60.list_items(str(tmp_path), None)


def test_unmatched_pocket_residue_is_reported():
  from bihier_jax.common import structure
  chain = lambda nums: structure.Chain(  # noqa: E731
      "A", 0, ["ALA"] * len(nums), "A" * len(nums), np.full(len(nums), 4, np.int32),
      np.array(nums, np.int32), np.array([""] * len(nums)),
      np.zeros([len(nums), 9, 3], np.float32), np.ones([len(nums), 9], bool),
      np.zeros(len(nums), bool))
  _, idx = lba.pocket_in_full_chains([chain([5, 7])], [chain([4, 5, 6, 7])], "x")
  assert idx[0].tolist() == [1, 3]
  with pytest.raises(tasks.SkipItem, match="A:9"):
    lba.pocket_in_full_chains([chain([9])], [chain([4, 5])], "x")


def test_find_split_dirs_layouts(tmp_path):
  def make(base):
    for s in lba.SPLITS:
      os.makedirs(tmp_path / base / s, exist_ok=True)
      (tmp_path / base / s / "data.mdb").write_bytes(b"")
  make("LBA/split-by-sequence-identity-30/data")
  make("LBA/split-by-sequence-identity-60/data")
  assert lba.find_split_dirs(str(tmp_path), "split-by-sequence-identity-60")["val"] == str(
      tmp_path / "LBA/split-by-sequence-identity-60/data/val")
  with pytest.raises(FileNotFoundError, match="split-by-year"):
    lba.find_split_dirs(str(tmp_path), "split-by-year")
  make("other/psr_unpacked/data")  # a lone folder of unknown name is accepted
  assert lba.find_split_dirs(str(tmp_path / "other"), "split-by-year")["test"].endswith(
      "psr_unpacked/data/test")
