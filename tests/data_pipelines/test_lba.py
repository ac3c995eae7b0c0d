"""LBA: atom3d-written LMDB fixtures (real complexes) -> examples, via the task registry."""

import dataclasses
import os

import gemmi
import numpy as np
import pytest

pytest.importorskip("atom3d")

from bihier_jax.common import residue_constants as rc  # noqa: E402
from bihier_jax.common import structure  # noqa: E402
from data_pipelines import atom3d_lmdb, lba, tasks  # noqa: E402
from fixtures import builders  # noqa: E402


@pytest.fixture(scope="module")
def lba_raw(tmp_path_factory):
  root = tmp_path_factory.mktemp("lba")
  builders.write_lba(str(root), str(root / "tmp"), identity=30)
  return str(root)


_CACHE = {}


def _examples(task, raw):
  """Items and examples of `raw`, processed once per module."""
  if (task.name, raw) not in _CACHE:
    items = task.list_items(raw, None)
    _CACHE[task.name, raw] = items, {it.source: task.process(it)[0] for it in items}
  return _CACHE[task.name, raw]


def test_registry_lists_every_complex(lba_raw):
  task = tasks.get("lba30")
  items = task.list_items(lba_raw, None)
  assert [it.split for it in items] == ["train", "train", "val", "test", "test"]
  with pytest.raises(FileNotFoundError, match="identity-60"):
    tasks.get("lba60").list_items(lba_raw, None)


def _is_amino_acid(name):
  """gemmi's table alone (independent of the project's tables)."""
  info = gemmi.find_tabulated_residue(name)
  return info is not None and info.is_amino_acid()


def _pocket_hetero_rows(pocket):
  """Rows of the pocket's non-amino-acid hetero groups (heavy atoms), in table order."""
  return np.array([h not in (" ", "W") and not _is_amino_acid(r) and e not in ("H", "D")
                   for h, r, e in zip(pocket["hetero"], pocket["resname"],
                                      pocket["element"])], bool)


def test_pocket_nodes_ligand_nodes_and_full_sequences(lba_raw):
  task = tasks.get("lba30")
  items, examples = _examples(task, lba_raw)
  by_id = {ex.id: ex for ex in examples.values()}
  assert set(by_id) == {"1hvr", "3mht", "1a28", "4e43", "7pbl"}
  for split, complexes in builders.LBA_COMPLEXES.items():
    for fname, pdb_id, code, label in complexes:
      ex = by_id[pdb_id]
      assert ex.graph_label == pytest.approx(label)
      path = next(it.payload[0] for it in items if it.split == split)
      record = atom3d_lmdb.LMDBDataset(path).get(pdb_id)
      ligand = record["atoms_ligand"]
      pocket = record["atoms_pocket"]
      hetero = pocket.select(_pocket_hetero_rows(pocket))
      # Extra nodes: the ligand's atoms, then the pocket's hetero groups' heavy atoms,
      # typed by element, with the stored coordinates.
      assert len(ex.ligand_elements) == len(ligand) + len(hetero)
      np.testing.assert_allclose(ex.ligand_positions,
                                 np.concatenate([ligand.coords, hetero.coords]), atol=1e-3)
      elements = list(ligand["element"]) + [e.upper() for e in hetero["element"]]
      assert [rc.LIGAND_ELEMENTS[e] for e in ex.ligand_elements] == [
          e if e in rc.LIGAND_ELEMENTS else "OTHER" for e in elements]
      # Graph indices reach the extra nodes (after the residues).
      n = ex.num_residues
      assert ex.senders.max() >= n and ex.senders.max() < n + len(elements)
      # Pocket residues index into the full chain sequence.
      pocket_keys = {(c, int(r), i.strip()) for c, r, i, h, name in zip(
          pocket["chain"], pocket["residue"], pocket["insertion_code"], pocket["hetero"],
          pocket["resname"]) if h != "W" and _is_amino_acid(name)}
      assert n == len(pocket_keys)
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
        cas = [(c, r) for c, r, nm, h, name in zip(
            protein["chain"], protein["residue"], protein["name"], protein["hetero"],
            protein["resname"])
               if c == chain and nm == "CA" and h != "W" and _is_amino_acid(name)]
        assert cas.index((chain, ex.residue_number[k])) == ex.residue_index[k]


def test_one_typing_rule_for_tables_and_files(lba_raw, tmp_path):
  """The full chains rebuilt from atoms_protein (mmCIF written and read back by
  Biopython, as ATOM3D did) equal the chains the structure-file parser reads from the
  same PDB file: 7pbl's pocket SME (a modified Met outside the project's table) and
  1hvr's CSO are typed by gemmi's table in both, not dropped from the table path."""
  task = tasks.get("lba30")
  _, examples = _examples(task, lba_raw)
  by_id = {ex.id: ex for ex in examples.values()}
  for complexes in builders.LBA_COMPLEXES.values():
    for fname, pdb_id, _, _ in complexes:
      path = builders._prepared_pdb(builders.real_structure(fname), pdb_id, str(tmp_path))
      parsed = {c.chain_id: c.sequence
                for c in structure.parse_structure(path).chains}
      ex = by_id[pdb_id]
      assert ex.sequences == [parsed[c] for c in ex.chain_ids], pdb_id
  chain_id, number, name = builders.MODIFIED_IN_POCKET["7pbl"]
  ex = by_id["7pbl"]
  k = np.nonzero(ex.residue_number == number)[0]
  assert len(k) == 1 and rc.RESTYPES[ex.aatype[k[0]]] == "M"  # SME, in the pocket


def test_pocket_hetero_switch(lba_raw):
  """--pocket-hetero drop leaves the Mg²⁺ and the acetate out, and counts them."""
  task = tasks.get("lba30")
  items = [it for it in task.list_items(lba_raw, None) if it.split == "test"]
  assert all(it.payload[4] == "keep" for it in items)  # the default
  for it in items:
    kept = task.process(it)
    dropped = task.process(dataclasses.replace(it, payload=it.payload[:4] + ("drop",)))
    record = atom3d_lmdb.LMDBDataset(it.payload[0])[it.payload[1]]
    n_ligand = len(record["atoms_ligand"])
    n_hetero = int(_pocket_hetero_rows(record["atoms_pocket"]).sum())
    assert n_hetero > 0
    assert len(kept[0].ligand_elements) == n_ligand + n_hetero
    assert len(dropped[0].ligand_elements) == n_ligand
    assert dropped.dropped["pocket_hetero_atoms"] == n_hetero
    assert "pocket_hetero_atoms" not in kept.dropped
    assert kept.notes["pocket_hetero"] == dropped.notes["pocket_hetero"]
    if record["id"] == "7pbl":
      assert kept.notes["pocket_hetero"] == ["MG:A402"]
      mg = kept
  assert rc.LIGAND_ELEMENTS[mg[0].ligand_elements[-1]] == "MG"  # its own type
  assert rc.LIGAND_ELEMENTS[mg[0].ligand_elements[-1]] == "MG"


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


def test_atom_tables_type_unknown_polymer_residues_as_x(tmp_path):
  """An unknown HETATM residue with a CA inside the chain is X in an atom table as in
  the structure file it came from; the zinc after the chain is a ligand in both."""
  from data_pipelines import atom_rows
  lines = [l for l in open(builders.real_structure("pdb1ubi.pdb"))
           if l.startswith(("ATOM", "TER"))]
  lines = ["HETATM" + l[6:17] + "XYZ" + l[20:] if l.startswith("ATOM") and
           int(l[22:26]) == 10 else l for l in lines]
  lines.append("HETATM 9999 ZN    ZN A 101      10.000  10.000  10.000  1.00  0.00"
               "          ZN\n")
  path = tmp_path / "ubi_xyz.pdb"
  path.write_text("".join(lines) + "END\n")
  from_file = structure.parse_structure(str(path))
  frame = builders.atom3d_frame(str(path), str(tmp_path / "tmp"))
  table = atom_rows.structure_from_atoms(
      frame["chain"], frame["residue"], frame["insertion_code"], frame["resname"],
      frame["name"], frame["element"], frame[["x", "y", "z"]].to_numpy(),
      hetero=frame["hetero"])
  assert [c.sequence for c in table.chains] == [c.sequence for c in from_file.chains]
  assert table.chains[0].sequence[9] == "X" and table.chains[0].residue_names[9] == "XYZ"
  assert [(l.name, l.elements) for l in table.ligands] == [("ZN", ["ZN"])]
  np.testing.assert_allclose(table.chains[0].atom_positions,
                             from_file.chains[0].atom_positions, atol=1e-3)
