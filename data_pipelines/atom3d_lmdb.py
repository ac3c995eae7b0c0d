"""Reader of ATOM3D LMDB datasets (LBA, PSR), without atom3d, torch or pandas.

DataFrames come back as `AtomTable`s (numpy columns), also from items written before
atom3d stored `types`. Pickle-serialised datasets (`pkl`) are refused: loading one runs
code stored in the file (re-serialise as json or msgpack where you trust it). The
format: docs/tasks.md, "Raw inputs". Public: LMDBDataset, AtomTable, table_from_split,
LMDBFormatError, SERIALIZATION_FORMATS.
"""

from __future__ import annotations

import gzip
import json
import os
from typing import Any, Iterator, Mapping

import numpy as np

SERIALIZATION_FORMATS = ("json", "msgpack", "pkl")
_OPEN_ENVS: dict[tuple[str, int], Any] = {}


class LMDBFormatError(ValueError):
  """The directory is not an ATOM3D LMDB dataset, or an item is malformed."""


class AtomTable:
  """A pandas-free DataFrame stand-in: named numpy columns of equal length.

  Numeric columns are float64 / int64 arrays (JSON nulls become NaN), text columns are
  numpy unicode arrays.
  """

  def __init__(self, columns: Mapping[str, np.ndarray]):
    lengths = {len(v) for v in columns.values()}
    if len(lengths) > 1:
      raise LMDBFormatError(f"columns of unequal length: {sorted(lengths)}")
    self.columns = dict(columns)
    self.num_rows = lengths.pop() if lengths else 0

  def __len__(self) -> int:
    return self.num_rows

  def __getitem__(self, name: str) -> np.ndarray:
    return self.columns[name]

  def __contains__(self, name: str) -> bool:
    return name in self.columns

  def select(self, rows: np.ndarray) -> "AtomTable":
    """Rows by boolean mask or index array, as a new table."""
    return AtomTable({k: v[rows] for k, v in self.columns.items()})

  @property
  def coords(self) -> np.ndarray:
    """float64[rows, 3] x, y, z in Å."""
    return np.stack([self["x"], self["y"], self["z"]], axis=-1).astype(np.float64)


def _column_array(values: list[Any]) -> np.ndarray:
  """One column of a split-orientation frame as a typed numpy array."""
  present = [v for v in values if v is not None]
  if present and all(isinstance(v, (bool, np.bool_)) for v in present):
    return np.array([bool(v) for v in values])
  if present and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                     for v in present):
    if len(present) == len(values):
      return np.array(values, dtype=np.int64)
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)
  if present and all(isinstance(v, (int, float, np.number)) for v in present):
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)
  return np.array(["" if v is None else str(v) for v in values], dtype=str)


def table_from_split(frame: Mapping[str, Any], where: str = "") -> AtomTable:
  """pandas `to_dict(orient="split")` / `to_json(orient="split")` dict -> AtomTable."""
  try:
    columns = list(frame["columns"])
    rows = frame["data"]
  except (KeyError, TypeError) as e:
    raise LMDBFormatError(f"{where}: not a split-orientation DataFrame ({e})") from e
  for i, row in enumerate(rows):
    if len(row) != len(columns):
      raise LMDBFormatError(
          f"{where}: row {i} has {len(row)} values for {len(columns)} columns")
  by_column = list(zip(*rows)) if rows else [() for _ in columns]
  return AtomTable({name: _column_array(list(vals))
                    for name, vals in zip(columns, by_column)})


def _deserialize(raw: bytes, fmt: str, where: str) -> Any:
  if fmt == "json":
    return json.loads(raw)
  if fmt == "msgpack":
    import msgpack  # runtime dependency, imported lazily for a fast module import
    return msgpack.unpackb(raw, raw=False, strict_map_key=False)
  raise LMDBFormatError(f"{where}: unknown serialization format {fmt!r}")


def _is_frame_type(type_string: Any) -> bool:
  # atom3d compares to str(pd.DataFrame); pandas 3 changed that string, so match loosely.
  return isinstance(type_string, str) and "DataFrame" in type_string


_SPLIT_KEYS = frozenset({"index", "columns", "data"})


def _is_split_frame(value: Any) -> bool:
  """A pandas split-orientation dict (what atom3d stores for every DataFrame)."""
  return isinstance(value, dict) and set(value) == _SPLIT_KEYS

class LMDBDataset:
  """Read-only random access to one ATOM3D LMDB directory.

  Usage: `ds = LMDBDataset(path); len(ds); item = ds[0]; ds.get(id)`. Items are dicts; the
  keys typed as DataFrames (e.g. `atoms`, `atoms_pocket`), or holding a
  split-orientation dict, are `AtomTable`s.
  """

  def __init__(self, path: str | os.PathLike):
    import lmdb  # runtime dependency
    self.path = os.fspath(path)
    if not os.path.isdir(self.path) or not os.path.exists(
        os.path.join(self.path, "data.mdb")):
      raise LMDBFormatError(
          f"{self.path}: not an ATOM3D LMDB directory (expected a folder with data.mdb)")
    # Keyed by process too: an environment must not be used in a forked child.
    key = (os.path.realpath(self.path), os.getpid())
    if key not in _OPEN_ENVS:  # LMDB allows one open environment per path and process
      _OPEN_ENVS[key] = lmdb.open(self.path, readonly=True, lock=False, readahead=False,
                                  meminit=False, max_readers=1, subdir=True)
    self._env = _OPEN_ENVS[key]
    with self._env.begin(write=False) as txn:
      num = txn.get(b"num_examples")
      fmt = txn.get(b"serialization_format")
      id_to_idx = txn.get(b"id_to_idx")
    if num is None or fmt is None:
      raise LMDBFormatError(f"{self.path}: missing num_examples / serialization_format")
    self.num_examples = int(num.decode())
    self.serialization_format = fmt.decode()
    if self.serialization_format not in SERIALIZATION_FORMATS:
      raise LMDBFormatError(
          f"{self.path}: unknown serialization format {self.serialization_format!r}")
    if self.serialization_format == "pkl":
      raise LMDBFormatError(
          f"{self.path}: this dataset is pickle-serialised, which is never read (loading "
          "it would run code stored in the file); re-serialise it as json or msgpack, "
          "e.g. with atom3d's make_lmdb_dataset(..., serialization_format='json')")
    self._id_to_idx = (_deserialize(id_to_idx, self.serialization_format,
                                    f"{self.path}:id_to_idx") if id_to_idx else {})

  def __len__(self) -> int:
    return self.num_examples

  def __iter__(self) -> Iterator[dict[str, Any]]:
    for i in range(self.num_examples):
      yield self[i]

  def ids(self) -> list[str]:
    return list(self._id_to_idx)

  def get(self, item_id: str) -> dict[str, Any]:
    if item_id not in self._id_to_idx:
      raise KeyError(f"{self.path}: no item with id {item_id!r}")
    return self[int(self._id_to_idx[item_id])]

  def raw_item(self, index: int) -> dict[str, Any]:
    """Item `index` deserialised, DataFrames still as split dicts."""
    if not 0 <= index < self.num_examples:
      raise IndexError(f"{self.path}: index {index} outside [0, {self.num_examples})")
    where = f"{self.path}[{index}]"
    with self._env.begin(write=False) as txn:
      compressed = txn.get(str(index).encode())
    if compressed is None:
      raise LMDBFormatError(f"{where}: item missing")
    try:
      raw = gzip.decompress(compressed)
    except OSError as e:
      raise LMDBFormatError(f"{where}: item is not gzip data ({e})") from e
    item = _deserialize(raw, self.serialization_format, where)
    if not isinstance(item, dict):
      raise LMDBFormatError(f"{where}: item is a {type(item).__name__}, not a dict")
    return item

  def __getitem__(self, index: int) -> dict[str, Any]:
    item = self.raw_item(index)
    where = f"{self.path}[{index}]"
    types = item.get("types") or {}
    for key, value in list(item.items()):
      if _is_frame_type(types.get(key)) or _is_split_frame(value):
        item[key] = table_from_split(value, f"{where}.{key}")
    item.setdefault("file_path", self.path)
    item.setdefault("id", str(index))
    return item

  def close(self) -> None:
    """Closes the environment (shared by every reader of this path in the process)."""
    _OPEN_ENVS.pop((os.path.realpath(self.path), os.getpid()), None)
    self._env.close()

