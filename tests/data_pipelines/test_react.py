"""react: IEConv ProtFunct fixtures (HDF5 per chain, built from real PDBs) -> examples."""

import os

import numpy as np
import pytest

from bihier_jax.common import residue_constants as rc
from bihier_jax.common import structure
from data_pipelines import react, tasks
from fixtures import builders


@pytest.fixture(scope="module")
def react_raw(tmp_path_factory):
  root = tmp_path_factory.mktemp("react")
  base, facts = builders.write_react(str(root))
  return str(root), base, facts


def test_items_labels_and_missing_file(react_raw):
  root, base, _ = react_raw
  task = tasks.get("react")
  items = task.list_items(root, None)
  assert [it.split for it in items].count("test") == 2
  done = {}
  for it in items:
    try:
      done[it.payload[1]] = task.process(it)[0]
    except tasks.SkipItem as e:
      assert "9xyz.A" in it.source and "missing" in str(e)
  assert set(done) == set(builders.REACT_CHAINS)
  for name, (_, _, label, _) in builders.REACT_CHAINS.items():
    assert done[name].graph_label == label
    assert done[name].id == name


def test_residues_and_coordinates_match_structure(react_raw):
  _, base, facts = react_raw
  for name, (fname, chain_id, _, _) in builders.REACT_CHAINS.items():
    chain, dropped = react.chain_from_hdf5(os.path.join(base, "data", f"{name}.hdf5"),
                                           chain_id)
    assert chain.num_residues == facts[name]["num_residues"]
    assert dropped["hetero_atoms"] == len(facts[name]["hetero"])
    # pos_center is added back: CA positions are the file's coordinates.
    np.testing.assert_allclose(chain.atom_positions[:, 1], facts[name]["ca"], atol=1e-4)
    types = np.array(facts[name]["amino_types"])
    known = types >= 0
    np.testing.assert_array_equal(chain.aatype[known], types[known])
  # CSO (amino type -1 in IEConv) is typed as its parent, Cys.
  chain, _ = react.chain_from_hdf5(os.path.join(base, "data", "1hvr.B.hdf5"), "B")
  assert chain.sequence[66] == "C" and chain.residue_names[66] == "CSO"


def _ieconv_rank(structure_path, chain_id):
  """IEConv's atom_residue_id per residue with a carbon CA, from the source file: the
  rank of its author number among every residue number of the chain (hetero groups
  included; waters and hydrogens are not read; a number's later insertion codes are
  not read either)."""
  import gemmi
  st = gemmi.read_structure(structure_path)
  st.remove_hydrogens()
  st.remove_waters()
  first = {}
  for r in st[0][chain_id]:
    first.setdefault(r.seqid.num, r)
  residues = list(first.values())
  numbers = sorted({r.seqid.num for r in residues})
  return [numbers.index(r.seqid.num) for r in residues
          if any(a.name == "CA" and a.element.name == "C" for a in r)]


def test_residue_numbers_are_ieconv_ranks(react_raw):
  """atom_residue_id is a 0-based rank over all residues of the file, not the author
  number: 1hvr.B's residues 1, 2, ... are 0, 1, ...; 4e43.A's hetero groups count."""
  _, base, facts = react_raw
  for name, (fname, chain_id, _, _) in builders.REACT_CHAINS.items():
    chain, _ = react.chain_from_hdf5(os.path.join(base, "data", f"{name}.hdf5"), chain_id)
    np.testing.assert_array_equal(chain.residue_number,
                                  _ieconv_rank(builders.real_structure(fname), chain_id))
  chain, _ = react.chain_from_hdf5(os.path.join(base, "data", "1hvr.B.hdf5"), "B")
  assert facts["1hvr.B"]["author_numbers"][:3] == [1, 2, 3]
  assert chain.residue_number[:3].tolist() == [0, 1, 2]
  assert "atom_residue_id" in react.RESIDUE_NUMBER_NOTE
  assert react.REACT.metadata_notes["residue_number"] == react.RESIDUE_NUMBER_NOTE


def test_unlisted_names_follow_the_one_typing_rule(react_raw, tmp_path):
  """amino_types == -1 residues are typed like structure files type them: YCM (outside
  the project's table, in gemmi's) is a Cys with its SG, an unknown name is X."""
  import h5py
  import shutil
  _, base, _ = react_raw
  for new_name, letter in (("YCM", "C"), ("ZZZ", "X")):
    path = str(tmp_path / f"{new_name}.hdf5")
    shutil.copy(os.path.join(base, "data", "1hvr.B.hdf5"), path)
    with h5py.File(path, "r+") as f:
      names = f["atom_residue_names"][()]
      amino = f["atom_amino_id"][()]
      names[amino == 66] = new_name.encode()
      del f["atom_residue_names"]
      f.create_dataset("atom_residue_names", data=names)
      assert f["amino_types"][66] == -1
    chain, _ = react.chain_from_hdf5(path, "B")
    assert chain.residue_names[66] == new_name
    assert chain.sequence[66] == letter
    assert chain.is_modified[66] == (letter != "X")
    assert chain.atom_mask[66, rc.ATOM_SLOT["G"]] == (letter == "C")  # SG of the Cys


def test_hetero_atoms_do_not_overwrite_last_residue(react_raw):
  """DIG's quirk: atom_amino_id == -1 indexes the last residue. Ours masks it."""
  _, base, facts = react_raw
  assert "C" in facts["4e43.A"]["hetero"]  # ACT's carboxyl carbon
  ours, _ = react.chain_from_hdf5(os.path.join(base, "data", "4e43.A.hdf5"), "A")
  parsed = next(c for c in structure.parse_structure(
      builders.real_structure("4E43.pdb")).chains if c.chain_id == "A")
  assert ours.sequence == parsed.sequence
  np.testing.assert_allclose(ours.atom_positions[-1, :4], parsed.atom_positions[-1, :4],
                             atol=1e-3)
  np.testing.assert_array_equal(ours.atom_mask[:, :5], parsed.atom_mask[:, :5])


def test_hetero_atom_never_fills_an_empty_slot(react_raw, tmp_path):
  """Strip the last residue to its CA: ACT's atom "C" must not fill the empty C slot."""
  import h5py
  import shutil
  _, base, _ = react_raw
  path = str(tmp_path / "4e43.A.hdf5")
  shutil.copy(os.path.join(base, "data", "4e43.A.hdf5"), path)
  with h5py.File(path, "r+") as f:
    amino = f["atom_amino_id"][()]
    names = f["atom_names"][()]
    last = (amino == amino.max()) & (names != b"CA")
    names[last] = b"XX"
    del f["atom_names"]
    f.create_dataset("atom_names", data=names)
    assert ((amino == -1) & (names == b"C")).any()
  chain, _ = react.chain_from_hdf5(path, "A")
  assert chain.atom_mask[-1].tolist() == [False, True] + [False] * 7


def test_bad_label_files_are_rejected(tmp_path):
  (tmp_path / "unique_functions.txt").write_text("1.1.1.1\n2.2.2.2\n")
  (tmp_path / "chain_functions.txt").write_text("1abc.A,2\n")
  with pytest.raises(ValueError, match="class 2 outside"):
    react.read_labels(str(tmp_path))
  for split_file in react.SPLIT_FILES.values():
    (tmp_path / split_file).write_text("")
  (tmp_path / "chain_functions.txt").write_text("1abc.A,1\n")
  with pytest.raises(ValueError, match="2 classes, expected 384"):
    react.REACT.list_items(str(tmp_path), None)
