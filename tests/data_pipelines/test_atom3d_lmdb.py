"""Our ATOM3D LMDB reader against atom3d's own reader, on datasets atom3d wrote."""

import os

import numpy as np
import pytest

pytest.importorskip("atom3d")
pytest.importorskip("pandas")

from data_pipelines import atom3d_lmdb  # noqa: E402
from fixtures import builders  # noqa: E402
from tests import paths  # noqa: E402


def _atom3d_reader(path):
  from atom3d.datasets import datasets
  return datasets.LMDBDataset(path)


def _assert_same_frame(ours, theirs, where):
  assert list(ours.columns) == list(theirs.columns), where
  assert len(ours) == len(theirs), where
  for name in theirs.columns:
    expected = theirs[name].to_numpy()
    got = ours[name]
    if expected.dtype.kind in "fiu":
      np.testing.assert_allclose(got.astype(float), expected.astype(float),
                                 equal_nan=True, err_msg=f"{where}.{name}")
    else:
      assert [str(v) for v in got] == [("" if v is None else str(v)) for v in expected], (
          f"{where}.{name}")


def _assert_same_dataset(path):
  # LMDB allows one open environment per path and process: read atom3d's copy first.
  theirs = _atom3d_reader(path)
  their_ids, their_items = theirs.ids(), [theirs[i] for i in range(len(theirs))]
  theirs._env.close()
  ours = atom3d_lmdb.LMDBDataset(path)
  assert len(ours) == len(their_items) > 0
  assert ours.ids() == their_ids
  for i, b in enumerate(their_items):
    a = ours[i]
    assert a["id"] == b["id"]
    assert a["scores"] == pytest.approx(b["scores"])
    frames = [k for k, v in b.items() if type(v).__name__ == "DataFrame"]
    assert frames, "atom3d returned no DataFrames"
    for key in frames:
      assert isinstance(a[key], atom3d_lmdb.AtomTable)
      _assert_same_frame(a[key], b[key], f"{path}[{i}].{key}")


@pytest.fixture(scope="module")
def psr_json(tmp_path_factory):
  root = tmp_path_factory.mktemp("psr")
  return builders.write_psr(str(root), str(root / "tmp"))


@pytest.mark.parametrize("split", ["train", "test"])
def test_psr_json_matches_atom3d(psr_json, split):
  _assert_same_dataset(os.path.join(psr_json, "data", split))


def test_lba_json_and_msgpack_match_atom3d(tmp_path):
  splits = {"train": [("1hvr.pdb", "1hvr", "H_XK2", 9.51)]}
  for fmt in ("json", "msgpack"):
    base = builders.write_lba(str(tmp_path / fmt), str(tmp_path / "tmp"), fmt=fmt,
                              splits=splits)
    path = os.path.join(base, "data", "train")
    _assert_same_dataset(path)
    item = atom3d_lmdb.LMDBDataset(path)[0]  # a cached environment: opening twice works
    # The pocket is a subset of the protein; the ligand has no hydrogens.
    assert 0 < len(item["atoms_pocket"]) < len(item["atoms_protein"])
    assert set(item["atoms_ligand"]["element"]) <= {"C", "N", "O", "S"}
    assert item["atoms_protein"]["x"].dtype == np.float64


def _strip_types(path):
  """Rewrites every item of an LMDB as atom3d wrote it before February 2021 (commit
  5085fb6 added `types`): the same gzipped json, without the `types` entry."""
  import gzip
  import json
  import lmdb
  env = lmdb.open(path, map_size=1 << 30)
  with env.begin(write=True) as txn:
    for i in range(int(txn.get(b"num_examples"))):
      item = json.loads(gzip.decompress(txn.get(str(i).encode())))
      del item["types"]
      txn.put(str(i).encode(), gzip.compress(json.dumps(item).encode()))
  env.close()


def test_lmdb_without_types_reads_as_frames(tmp_path):
  """An LMDB from before atom3d stored `types`: frames are split-orientation dicts with
  nothing flagging them. They read as AtomTables, and the LBA task makes the same
  example of them as of the typed dataset."""
  from data_pipelines import lba, tasks
  splits = {"train": [("1hvr.pdb", "1hvr", "H_XK2", 9.51)]}
  typed = builders.write_lba(str(tmp_path / "typed"), str(tmp_path / "tmp"), splits=splits)
  old = str(tmp_path / "old")
  import shutil
  shutil.copytree(typed, old)
  _strip_types(os.path.join(old, "data", "train"))
  items = {}
  for name, base in (("typed", typed), ("old", old)):
    path = os.path.join(base, "data", "train")
    ds = atom3d_lmdb.LMDBDataset(path)
    raw = ds.raw_item(0)
    assert ("types" in raw) == (name == "typed")
    item = ds[0]
    for key in ("atoms_protein", "atoms_pocket", "atoms_ligand"):
      assert isinstance(item[key], atom3d_lmdb.AtomTable), (name, key)
    work = tasks.WorkItem(f"{path}#0", "train", (path, 0, 10.0, 32, "keep"))
    items[name] = lba.LBA30.process(work)[0]
  a, b = items["typed"], items["old"]
  assert a.sequences == b.sequences
  np.testing.assert_array_equal(a.aatype, b.aatype)
  np.testing.assert_array_equal(a.ligand_elements, b.ligand_elements)
  np.testing.assert_allclose(a.atom_positions, b.atom_positions)


def test_pickle_dataset_refused(tmp_path):
  splits = {"train": [("1hvr.pdb", "1hvr", "H_XK2", 9.51)]}
  base = builders.write_lba(str(tmp_path), str(tmp_path / "tmp"), fmt="pkl", splits=splits)
  path = os.path.join(base, "data", "train")
  with pytest.raises(atom3d_lmdb.LMDBFormatError,
                     match=f"{path}: this dataset is pickle-serialised, which is never read"):
    atom3d_lmdb.LMDBDataset(path)


def test_not_an_lmdb_directory(tmp_path):
  with pytest.raises(atom3d_lmdb.LMDBFormatError, match="data.mdb"):
    atom3d_lmdb.LMDBDataset(tmp_path)


def test_split_table_nulls_and_types():
  table = atom3d_lmdb.table_from_split(
      {"index": [0, 1], "columns": ["x", "name", "residue"],
       "data": [[1.5, "CA", 3], [None, "CB", 4]]})
  assert np.isnan(table["x"][1]) and table["x"][0] == 1.5
  assert table["name"].tolist() == ["CA", "CB"]
  assert table["residue"].dtype == np.int64
  with pytest.raises(atom3d_lmdb.LMDBFormatError, match="row 0"):
    atom3d_lmdb.table_from_split({"columns": ["a", "b"], "data": [[1]]})


def test_reader_needs_no_pandas(psr_json):
  """The runtime path (reader + MQA task) works with pandas made unimportable."""
  import subprocess
  import sys
  code = (
      "import sys; sys.modules['pandas'] = None\n"
      "from data_pipelines import atom3d_lmdb, mqa\n"
      f"ds = atom3d_lmdb.LMDBDataset({os.path.join(psr_json, 'data', 'val')!r})\n"
      "item = ds[0]\n"
      "assert isinstance(item['atoms'], atom3d_lmdb.AtomTable), type(item['atoms'])\n"
      "print(len(ds), mqa.parse_decoy_id(item['id'])[0], len(item['atoms']))\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=paths.REPO, capture_output=True,
                       text=True, check=True)
  assert out.stdout.split()[:2] == ["2", "T0702"]
