"""One plan of padded batches for every host: which records each batch holds.

Public: `record_index` -> `RecordIndex` (where each record lies in the shard files, and
its sizes; read once per process), `Planner` (the training order, epoch after epoch, and
the evaluation order, chunk by chunk; each record's crop window), `PlannedBatch`,
`default_chunk_size`. Every host computes the same plan from the same inputs (index,
seed, budgets) and packs only the batches it is given (`pipeline.pack_planned`), so the
batches, and a run's numbers, do not depend on the host or device count. Sizes are
exact but for a cropped record, planned with upper bounds of its nodes and edges (its
chain tokens are exact), so a planned batch always holds its records once cropped. The
order and why: docs/data.md, "Training order".
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import struct
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from bihier_jax.common import storage
from bihier_jax.data import packing
from bihier_jax.data.batch import PaddingBudget

# Tags that keep the random streams of one seed apart.
_ORDER, _EMIT, _CROP = 0x0D, 0xE1, 0xC0
_SCAN_BATCH = 1024  # records parsed at once while building an index
# data.crop: where a chain longer than data.max_residues is cut in training.
CROPS = ("random", "first")
# data.eval_long_chains: how evaluation reads a protein with a chain longer than
# data.max_residues. "whole": every residue, the chain in overlapping ESM windows
# (`data.windows`), the structure whole, one protein per batch (`windowed_records`);
# "first_window": cropped as training's data.crop="first" does (ScanNet's protocol:
# only a chain's first residues are scored).
EVAL_LONG_CHAINS = ("whole", "first_window")


def eval_long_chains(config) -> str:
  """The config's data.eval_long_chains; configs older than the field cropped, as
  "first_window" does."""
  return str(config.data.get("eval_long_chains", "first_window"))


def default_chunk_size(batch_size: int) -> int:
  """Records planned and packed together when `make_dataset` is not told otherwise."""
  return max(256, 128 * int(batch_size))


@dataclasses.dataclass(frozen=True)
class RecordIndex:
  """Where every record of a split lies, and its sizes; records numbered in file order
  (the shard files sorted, each file front to back), as sizes.json lists them.

  Attributes:
    files: the split's shard files, sorted.
    file: int32[n] file of each record; offset, length: int64[n] byte range of its data.
    residues, ligands, edges, chains: int64[n] residue nodes, ligand atoms, edges, chains.
    max_in_degree: int64[n] most edges into one node.
    chain_length: int64[sum chains] letters of each chain, the records' chains in order;
      chain_first: int64[n + 1] index of each record's first chain.
  """
  files: tuple[str, ...]
  file: np.ndarray
  offset: np.ndarray
  length: np.ndarray
  residues: np.ndarray
  ligands: np.ndarray
  edges: np.ndarray
  chains: np.ndarray
  max_in_degree: np.ndarray
  chain_length: np.ndarray
  chain_first: np.ndarray

  def __len__(self) -> int:
    return len(self.file)

  def read(self, records: Sequence[int]) -> list[bytes]:
    """The serialized records, in the order asked for."""
    out = []
    handles: dict[int, Any] = {}
    try:
      for r in np.asarray(records, np.int64).tolist():
        f = int(self.file[r])
        if f not in handles:
          handles[f] = _Reader(self.files[f])
        out.append(handles[f].read(int(self.offset[r]), int(self.length[r])))
    finally:
      for handle in handles.values():
        handle.close()
    return out


class _Reader:
  """Byte ranges of one file: pread on a local path, seek + read through
  `storage.open` for a URL (gs://, file://)."""

  def __init__(self, path: str):
    local = None if storage.is_url(path) else path
    self._fd = os.open(local, os.O_RDONLY) if local is not None else None
    self._file = None if local is not None else storage.open(path, "rb")

  def read(self, offset: int, length: int) -> bytes:
    if self._fd is not None:
      return os.pread(self._fd, length, offset)
    self._file.seek(offset)
    return self._file.read(length)

  def close(self) -> None:
    if self._fd is not None:
      os.close(self._fd)
    else:
      self._file.close()


def _frames(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(data offset, data length) of each record of a TFRecord file (no CRC check)."""
  offsets, lengths = [], []
  with storage.open(path, "rb") as f:
    position = 0
    while True:
      header = f.read(12)  # uint64 length, uint32 masked CRC of the length
      if not header:
        break
      if len(header) < 12:
        raise ValueError(f"{path}: truncated record header at byte {position}")
      (length,) = struct.unpack("<Q", header[:8])
      offsets.append(position + 12)
      lengths.append(length)
      position += 12 + length + 4  # data, uint32 masked CRC of the data
      f.seek(position)
  return np.asarray(offsets, np.int64), np.asarray(lengths, np.int64)


def _varint(buf, i: int) -> tuple[int, int]:
  """(value, next position) of the protobuf varint at buf[i]."""
  value = shift = 0
  while True:
    byte = buf[i]
    i += 1
    value |= (byte & 0x7F) << shift
    if byte < 0x80:
      return value, i
    shift += 7


def _fields(buf, start: int, end: int):
  """(field number, value) of the fields of the message buf[start:end]: an int for a
  varint, (start, end) of the payload for a length-delimited field."""
  i = start
  while i < end:
    key, i = _varint(buf, i)
    field, wire = key >> 3, key & 7
    if wire == 0:
      value, i = _varint(buf, i)
    elif wire == 2:
      size, i = _varint(buf, i)
      value, i = (i, i + size), i + size
    elif wire in (1, 5):  # fixed 64 / 32 bits: no field read here has them
      value, i = None, i + (8 if wire == 1 else 4)
    else:
      raise ValueError(f"protobuf wire type {wire} in a record")
    yield field, value


_SIZE_INTS = ("num_residues", "num_ligand_atoms", "num_edges", "num_chains")
_SIZE_BYTES = ("sequence_lengths", "receivers")


def _record_sizes(data: bytes) -> dict:
  """The fields the sizes come from, of one serialized tf.train.Example, read from its
  wire format (Example.features > Features.feature map > Feature > int64 / bytes list)
  without decoding the rest: a tenth of the time of `tf.io.parse_example`."""
  out = {}
  for field, features in _fields(data, 0, len(data)):
    if field != 1:
      continue
    for f, entry in _fields(data, *features):
      if f != 1:
        continue
      key = value = None
      for g, part in _fields(data, *entry):
        if g == 1:
          key = bytes(data[part[0]:part[1]]).decode()
        elif g == 2:
          value = part
      if key not in _SIZE_INTS and key not in _SIZE_BYTES:
        continue
      for kind, payload in _fields(data, *value):  # Feature: 1 bytes, 3 int64 list
        for h, item in _fields(data, *payload):
          if h != 1:
            continue
          if kind == 1:
            out[key] = data[item[0]:item[1]]
          elif isinstance(item, int):  # unpacked int64
            out[key] = item
          else:  # packed int64s: the first
            out[key] = _varint(data, item[0])[0]
          break
  missing = [k for k in (*_SIZE_INTS, *_SIZE_BYTES) if k not in out]
  if missing:
    raise ValueError(f"record without {', '.join(missing)}: not a bihier_jax record")
  return out


def _scan_sizes(serialized: list[bytes]) -> dict[str, np.ndarray]:
  """Sizes of serialized records (the few fields they need, without a full parse)."""
  rows = [_record_sizes(memoryview(data)) for data in serialized]
  lengths = [np.frombuffer(r["sequence_lengths"], "<i4").astype(np.int64) for r in rows]
  out = {name: np.array([r[key] for r in rows], np.int64) for name, key in (
      ("residues", "num_residues"), ("ligands", "num_ligand_atoms"),
      ("edges", "num_edges"), ("chains", "num_chains"))}
  out["max_in_degree"] = np.array(
      [int(np.bincount(np.frombuffer(r["receivers"], "<i4")).max(initial=0))
       for r in rows], np.int64)
  out["chain_length"] = (np.concatenate(lengths) if lengths else np.zeros([0], np.int64))
  return out


@functools.lru_cache(maxsize=8)
def _cached_index(files: tuple[tuple[str, int, int], ...]) -> RecordIndex:
  paths = tuple(f for f, _, _ in files)
  frames = [_frames(p) for p in paths]
  file = np.concatenate([np.full(len(o), i, np.int32) for i, (o, _) in enumerate(frames)]
                        or [np.zeros([0], np.int32)])
  offset = np.concatenate([o for o, _ in frames] or [np.zeros([0], np.int64)])
  length = np.concatenate([n for _, n in frames] or [np.zeros([0], np.int64)])
  partial = RecordIndex(paths, file, offset, length, *([None] * 7))
  parts = collections.defaultdict(list)
  for start in range(0, len(file), _SCAN_BATCH):
    sizes = _scan_sizes(partial.read(range(start, min(start + _SCAN_BATCH, len(file)))))
    for k, v in sizes.items():
      parts[k].append(v)
  cols = {k: (np.concatenate(parts[k]) if parts[k] else np.zeros([0], np.int64))
          .astype(np.int64) for k in ("residues", "ligands", "edges", "chains",
                                      "max_in_degree", "chain_length")}
  first = np.concatenate([[0], np.cumsum(cols["chains"])]).astype(np.int64)
  return dataclasses.replace(partial, chain_first=first, **cols)


def record_index(files: Sequence[str]) -> RecordIndex:
  """The `RecordIndex` of a split's shard files (sorted), read once per process and
  kept while the files keep their size and modification time."""
  stats = tuple((f, *storage.signature(f)) for f in sorted(files))
  return _cached_index(stats)


@dataclasses.dataclass(frozen=True)
class PlannedBatch:
  """One padded batch of the plan.

  Attributes:
    index: its place in the stream (0, 1, ...; training: over all epochs).
    epoch: the training epoch (0 in evaluation).
    budget: index of its padding budget.
    records: int64[m] the records it holds, in batch order.
    row, column: int32[K] ESM row and `<cls>` column of each of their chains (the
      records' chains in order), as `packing.plan_batches` placed them.
    crop: float32[K] where each chain's window starts, as a fraction of the starts
      that keep its residue nodes (`tf_packer.crop_chunk`); 0 = the first window.
    step: the training step it was grouped into (`device_batches.StepInput`), -1 if none.
  """
  index: int
  epoch: int
  budget: int
  records: np.ndarray
  row: np.ndarray
  column: np.ndarray
  crop: np.ndarray
  step: int = -1


class Planner:
  """The batches of one split for given budgets (see the module docstring).

  Args:
    index: the split's records.
    budgets: the padding budgets, smallest first; the last holds cropped records.
    max_residues: chains longer than this are cropped to it.
    chunk_size: records planned together.
    seed: training order and crops.
    shuffle_buffer: training shuffle buffer in records (0 or >= records: the split).
    training: an endless stream of epochs in random order, else one pass in file order.
    random_crop: windows drawn at random (training only), else the first window.
    whole_chains: evaluation leaves records with a chain longer than max_residues out
      of the plan (`windowed_records`: the caller batches them whole).
  """

  def __init__(self, index: RecordIndex, budgets: Sequence[PaddingBudget], *,
               max_residues: int, chunk_size: int, seed: int, shuffle_buffer: int = 0,
               training: bool, random_crop: bool = False, whole_chains: bool = False):
    self.index = index
    self.budgets = tuple(budgets)
    self.max_residues = int(max_residues)
    self.chunk_size = int(chunk_size)
    self.seed = int(seed) & 0xFFFFFFFF
    self.shuffle_buffer = int(shuffle_buffer)
    self.training = bool(training)
    self.random_crop = bool(random_crop) and self.training
    self._sizes, self.long, self.tokens = _planned_sizes(index, self.max_residues)
    self.bucket = packing.assign_buckets(self._sizes, self.long, self.budgets)
    self.whole_chains = bool(whole_chains) and not self.training

  @property
  def windowed_records(self) -> np.ndarray:
    """int64[w] the records evaluation batches whole, in file order, outside the plan
    (whole_chains: those with a chain longer than max_residues; else none)."""
    if not self.whole_chains:
      return np.zeros([0], np.int64)
    return np.flatnonzero(self.long).astype(np.int64)

  def epoch_order(self, epoch: int) -> np.ndarray:
    """int64[n] the records of one training epoch, in order (steps 1 and 2)."""
    n = len(self.index)
    rng = np.random.default_rng([_ORDER, self.seed, int(epoch)])
    if self.shuffle_buffer <= 0 or self.shuffle_buffer >= n:
      return rng.permutation(n).astype(np.int64)
    file_rank = np.argsort(rng.permutation(len(self.index.files)))
    first = np.searchsorted(self.index.file, np.arange(len(self.index.files)))
    in_file = np.arange(n) - first[self.index.file]
    order = np.lexsort((file_rank[self.index.file], in_file))
    return _buffer_shuffle(order, self.shuffle_buffer, rng)

  def chunk(self, records: np.ndarray, *, epoch: int, chunk: int
            ) -> list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """(budget, records, row, column) of each batch of one chunk, in leaving order."""
    first, tokens = self.index.chain_first, self.tokens
    out = []
    for k, budget in enumerate(self.budgets):
      members = records[self.bucket[records] == k]
      if not len(members):
        continue
      chain_sel = np.concatenate([np.arange(first[i], first[i + 1]) for i in members])
      sizes = self._sizes[members]
      cap_nodes = budget.n_node - 1
      if budget.graph_capacity:
        cap_nodes = min(cap_nodes, budget.graph_capacity)
      # Bounds of crops above what a budget holds: the crop itself fits (budget rule).
      plan = packing.plan_batches(np.minimum(sizes[:, 0], cap_nodes),
                                  np.minimum(sizes[:, 3], budget.n_edge), sizes[:, 2],
                                  tokens[chain_sel], budget)
      chain_batch = np.repeat(plan.batch, sizes[:, 2])
      for b in range(plan.num_batches):
        out.append((k, members[plan.batch == b], plan.row[chain_batch == b],
                    plan.column[chain_batch == b]))
    if self.training:
      rng = np.random.default_rng([_EMIT, self.seed, int(epoch), int(chunk)])
      out = [out[i] for i in rng.permutation(len(out))]
    return out

  def crop_starts(self, records: np.ndarray, epoch: int) -> np.ndarray:
    """float32[K] window start draws of the records' chains (0 unless cropped)."""
    first = self.index.chain_first
    out = []
    for r in records.tolist():
      count = int(first[r + 1] - first[r])
      if self.random_crop and self.long[r]:
        out.append(np.random.default_rng([_CROP, self.seed, int(epoch), r]).random(count))
      else:
        out.append(np.zeros(count))
    return np.concatenate(out or [np.zeros([0])]).astype(np.float32)

  def stream(self, start_epoch: int = 0, start_index: int = 0) -> Iterator[PlannedBatch]:
    """The planned batches in order: training, endless from the first batch of
    `start_epoch` (numbered from `start_index`); evaluation, one pass."""
    index = int(start_index)
    epoch = int(start_epoch) if self.training else 0
    while True:
      if self.training:
        order = self.epoch_order(epoch)
      else:
        order = np.arange(len(self.index), dtype=np.int64)
        if self.whole_chains:
          order = order[~self.long]
      for c, start in enumerate(range(0, len(order), self.chunk_size)):
        for k, records, row, column in self.chunk(order[start:start + self.chunk_size],
                                                  epoch=epoch, chunk=c):
          yield PlannedBatch(index, epoch, k, records, row.astype(np.int32),
                             column.astype(np.int32), self.crop_starts(records, epoch))
          index += 1
      if not self.training or not len(order):
        return
      epoch += 1


def _planned_sizes(index: RecordIndex, max_residues: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(int64[n, 4] `ExampleSizes` rows as planned, bool[n] cropped,
  int64[K] tokens of each chain once cropped, incl. <cls>/<eos>)."""
  max_res = int(max_residues)
  owner = np.repeat(np.arange(len(index)), index.chains)
  cropped_length = np.minimum(index.chain_length, max_res)
  longest = np.zeros(len(index), np.int64)
  np.maximum.at(longest, owner, index.chain_length)
  long = longest > max_res
  window = np.zeros(len(index), np.int64)  # residues a window can keep over all chains
  np.add.at(window, owner, cropped_length)
  nodes = index.residues + index.ligands
  crop_nodes = np.minimum(index.residues, window) + index.ligands
  crop_edges = np.minimum(index.edges, index.max_in_degree * crop_nodes)
  sizes = np.stack([np.where(long, crop_nodes, nodes), np.minimum(longest, max_res),
                    index.chains, np.where(long, crop_edges, index.edges)], 1)
  return sizes, long, cropped_length + 2


def _buffer_shuffle(order: np.ndarray, buffer: int, rng: np.random.Generator
                    ) -> np.ndarray:
  """`order` through a shuffle buffer of `buffer` records (tf.data's rule: each record
  leaves from a uniformly drawn slot, which the next record takes), emptied at the end."""
  pool = list(order[:buffer])
  out = []
  draws = rng.integers(0, buffer, size=max(len(order) - buffer, 0)).tolist()
  for j, record in zip(draws, order[buffer:].tolist()):
    out.append(pool[j])
    pool[j] = record
  out.extend(np.asarray(pool)[rng.permutation(len(pool))].tolist())
  return np.asarray(out, np.int64)
