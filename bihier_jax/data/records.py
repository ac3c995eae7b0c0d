"""Shard records: `ProteinExample` <-> serialized `tf.train.Example`, and the tf.data parse.

Public: `serialize_example`, `deserialize_example`, `read_records`, `parse_record`,
`parse_records` (a batch of records as one flat chunk), `SCHEMA_VERSION` and the field
tables. Serialization is pure Python + numpy (it writes the protobuf wire format
directly), so preprocessing workers never import TensorFlow; reading uses TensorFlow.
Files: `OUT/<split>/<split>-00000-of-000NN.tfrecord`, one `tf.train.Example` per
example; arrays as one `bytes_list` value of raw little-endian bytes (far cheaper to
parse than varint lists). Every field: docs/data.md, "Shard records".
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import numpy as np

from bihier_jax.common import residue_constants as rc
from bihier_jax.data.example import ProteinExample

SCHEMA_VERSION = 1
_A = rc.NUM_ATOM_SLOTS

# Array fields: name -> (numpy dtype stored, trailing shape, count key).
ARRAY_FIELDS = {
    "sequence_lengths": (np.int32, (), "c"),
    "sequence_tokens": (np.uint8, (), "t"),
    "aatype": (np.int32, (), "n"),
    "atom_positions": (np.float32, (_A, 3), "n"),
    "atom_mask": (np.uint8, (_A,), "n"),
    "chain_row": (np.int32, (), "n"),
    "residue_index": (np.int32, (), "n"),
    "residue_number": (np.int32, (), "n"),
    "backbone_dihedrals": (np.float32, (6,), "n"),
    "sidechain_torsions": (np.float32, (8,), "n"),
    "chi_mask": (np.uint8, (4,), "n"),
    "senders": (np.int32, (), "e"),
    "receivers": (np.int32, (), "e"),
    "node_labels": (np.float32, (), "n"),
    "node_label_mask": (np.uint8, (), "n"),
    "node_weights": (np.float32, (), "n"),
    "ligand_elements": (np.int32, (), "m"),
    "ligand_positions": (np.float32, (3,), "m"),
}
INT_FIELDS = ("schema_version", "num_residues", "num_edges", "num_chains",
              "num_ligand_atoms", "max_sequence_length")
FLOAT_FIELDS = ("graph_label", "weight")



# --- protobuf wire format (tf.train.Example), written by hand -------------------------


def _varint(value: int) -> bytes:
  out = bytearray()
  value &= (1 << 64) - 1  # int64 negatives are ten-byte two's complement varints
  while True:
    byte = value & 0x7F
    value >>= 7
    if value:
      out.append(byte | 0x80)
    else:
      out.append(byte)
      return bytes(out)


def _len_field(field: int, payload: bytes) -> bytes:
  return _varint((field << 3) | 2) + _varint(len(payload)) + payload


def _bytes_feature(values: list[bytes]) -> bytes:
  inner = b"".join(_len_field(1, v) for v in values)
  return _len_field(1, inner)  # Feature.bytes_list = 1


def _float_feature(value: float) -> bytes:
  return _len_field(2, _len_field(1, struct.pack("<f", value)))  # packed float


def _int_feature(value: int) -> bytes:
  return _len_field(3, _len_field(1, _varint(int(value))))  # packed int64


def _example(features: dict[str, bytes]) -> bytes:
  entries = b"".join(
      _len_field(1, _len_field(1, k.encode()) + _len_field(2, v))
      for k, v in features.items())
  return _len_field(1, entries)  # Example.features = 1 { Features.feature = 1 map }


def _check(ex: ProteinExample) -> None:
  n, e, m, c = ex.num_residues, ex.num_edges, len(ex.ligand_elements), len(ex.sequences)
  if len(ex.chain_ids) != c:
    raise ValueError(f"{ex.id}: {len(ex.chain_ids)} chain ids for {c} sequences")
  shapes = {"aatype": (n,), "atom_positions": (n, _A, 3), "atom_mask": (n, _A),
            "chain_row": (n,), "residue_index": (n,), "residue_number": (n,),
            "insertion_code": (n,), "backbone_dihedrals": (n, 6),
            "sidechain_torsions": (n, 8), "chi_mask": (n, 4), "senders": (e,),
            "receivers": (e,), "node_labels": (n,), "node_label_mask": (n,),
            "node_weights": (n,), "ligand_elements": (m,), "ligand_positions": (m, 3)}
  for name, shape in shapes.items():
    got = np.shape(getattr(ex, name))
    if got != shape:
      raise ValueError(f"{ex.id}: {name} has shape {got}, expected {shape}")
  if n and (ex.chain_row.min() < 0 or ex.chain_row.max() >= c):
    raise ValueError(f"{ex.id}: chain_row outside 0..{c - 1}")
  lengths = np.array([len(s) for s in ex.sequences])
  if n and (ex.residue_index.min() < 0
            or (ex.residue_index >= lengths[ex.chain_row]).any()):
    raise ValueError(f"{ex.id}: residue_index outside its chain's sequence")
  if e and (min(ex.senders.min(), ex.receivers.min()) < 0
            or max(ex.senders.max(), ex.receivers.max()) >= n + m):
    raise ValueError(f"{ex.id}: graph index outside 0..{n + m - 1}")


def serialize_example(ex: ProteinExample) -> bytes:
  """Serialized `tf.train.Example` of `ex` (no TensorFlow needed).

  Raises:
    ValueError: inconsistent shapes or indices (names the example and field).
  """
  _check(ex)
  arrays = {name: getattr(ex, name) for name in ARRAY_FIELDS
            if name not in ("sequence_lengths", "sequence_tokens")}
  arrays["sequence_lengths"] = [len(s) for s in ex.sequences]
  arrays["sequence_tokens"] = (np.concatenate([rc.esm_token_ids(s) for s in ex.sequences])
                               if ex.sequences else np.zeros([0], np.uint8))
  features = {
      "schema_version": _int_feature(SCHEMA_VERSION),
      "id": _bytes_feature([ex.id.encode()]),
      "group": _bytes_feature([ex.group.encode()]),
      "chain_ids": _bytes_feature([c.encode() for c in ex.chain_ids]),
      "sequences": _bytes_feature([s.encode() for s in ex.sequences]),
      "num_residues": _int_feature(ex.num_residues),
      "num_edges": _int_feature(ex.num_edges),
      "num_chains": _int_feature(len(ex.sequences)),
      "num_ligand_atoms": _int_feature(len(ex.ligand_elements)),
      "max_sequence_length": _int_feature(max((len(s) for s in ex.sequences),
                                              default=0)),
      "insertion_code": _bytes_feature([
          "".join((str(i) or " ")[:1] for i in ex.insertion_code).encode()]),
      "graph_label": _float_feature(float(ex.graph_label)),
      "weight": _float_feature(float(ex.weight)),
  }
  for name, (dtype, _, _) in ARRAY_FIELDS.items():
    raw = np.ascontiguousarray(np.asarray(arrays[name]).astype(dtype, copy=False))
    features[name] = _bytes_feature([raw.astype(raw.dtype.newbyteorder("<")).tobytes()])
  return _example(features)


# --- reading ---------------------------------------------------------------------------


def example_from_features(f: dict) -> ProteinExample:
  """`ProteinExample` from a dict of numpy values as `parse_record` returns them."""
  def text(v):
    return v.decode() if isinstance(v, bytes) else str(v)
  n = int(f["num_residues"])
  ins = f["insertion_code"]
  ins = ins.decode() if isinstance(ins, bytes) else str(ins)
  return ProteinExample(
      id=text(f["id"]),
      chain_ids=[text(c) for c in f["chain_ids"]],
      sequences=[text(s) for s in f["sequences"]],
      aatype=np.asarray(f["aatype"], np.int32),
      atom_positions=np.asarray(f["atom_positions"], np.float32).reshape(n, _A, 3),
      atom_mask=np.asarray(f["atom_mask"]).astype(bool).reshape(n, _A),
      chain_row=np.asarray(f["chain_row"], np.int32),
      residue_index=np.asarray(f["residue_index"], np.int32),
      residue_number=np.asarray(f["residue_number"], np.int32),
      insertion_code=np.array([c.strip() for c in ins], dtype=str).reshape(n),
      backbone_dihedrals=np.asarray(f["backbone_dihedrals"], np.float32).reshape(n, 6),
      sidechain_torsions=np.asarray(f["sidechain_torsions"], np.float32).reshape(n, 8),
      chi_mask=np.asarray(f["chi_mask"]).astype(bool).reshape(n, 4),
      senders=np.asarray(f["senders"], np.int32),
      receivers=np.asarray(f["receivers"], np.int32),
      node_labels=np.asarray(f["node_labels"], np.float32),
      node_label_mask=np.asarray(f["node_label_mask"]).astype(bool),
      node_weights=np.asarray(f["node_weights"], np.float32),
      graph_label=float(f["graph_label"]),
      weight=float(f["weight"]),
      group=text(f["group"]),
      ligand_elements=np.asarray(f["ligand_elements"], np.int32),
      ligand_positions=np.asarray(f["ligand_positions"], np.float32).reshape(-1, 3),
  )


def deserialize_example(data: bytes) -> ProteinExample:
  """Inverse of `serialize_example` (uses the TensorFlow protobuf classes)."""
  from tensorflow.core.example import example_pb2  # pylint: disable=g-import-not-at-top
  proto = example_pb2.Example.FromString(data)
  feat = proto.features.feature
  version = feat["schema_version"].int64_list.value[0]
  if version != SCHEMA_VERSION:
    raise ValueError(f"record schema version {version}, this code reads "
                     f"{SCHEMA_VERSION}")
  f = {k: feat[k].int64_list.value[0] for k in INT_FIELDS}
  f.update({k: feat[k].float_list.value[0] for k in FLOAT_FIELDS})
  for k in ("id", "group", "insertion_code"):
    f[k] = feat[k].bytes_list.value[0]
  for k in ("chain_ids", "sequences"):
    f[k] = list(feat[k].bytes_list.value)
  for name, (dtype, _, _) in ARRAY_FIELDS.items():
    f[name] = np.frombuffer(feat[name].bytes_list.value[0], np.dtype(dtype).newbyteorder("<"))
  return example_from_features(f)


def read_records(path: str) -> Iterator[ProteinExample]:
  """Every `ProteinExample` of one TFRecord shard, in file order."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  for data in tf.data.TFRecordDataset(path).as_numpy_iterator():
    yield deserialize_example(data)


def _feature_spec():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  spec = {k: tf.io.FixedLenFeature([], tf.int64) for k in INT_FIELDS}
  spec.update({k: tf.io.FixedLenFeature([], tf.float32) for k in FLOAT_FIELDS})
  spec.update({k: tf.io.FixedLenFeature([], tf.string)
               for k in ("id", "group", *ARRAY_FIELDS)})
  return spec


def _decode(f, raw):
  """Parsed features -> dict of tensors; raw(name) gives the bytes of an array field."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  out = {k: tf.cast(f[k], tf.int32) for k in INT_FIELDS}
  out.update({k: f[k] for k in ("id", "group", *FLOAT_FIELDS)})
  tf_dtype = {np.int32: tf.int32, np.uint8: tf.uint8, np.float32: tf.float32}
  for name, (dtype, trailing, _) in ARRAY_FIELDS.items():
    x = tf.io.decode_raw(raw(name), tf_dtype[dtype], little_endian=True)
    if trailing:
      x = tf.reshape(x, (-1, *trailing))
    if name in ("atom_mask", "chi_mask", "node_label_mask"):
      x = tf.cast(x, tf.bool)
    elif dtype == np.uint8:
      x = tf.cast(x, tf.int32)
    out[name] = x
  return out


def parse_record(serialized):
  """tf.data map function: one serialized record -> dict of flat tensors.

  Arrays come back with their leading axis (n, e, m, c or t) and trailing shape as in
  the schema; masks as bool; the scalar counts as int32.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  f = tf.io.parse_single_example(serialized, _feature_spec())
  return _decode(f, lambda name: f[name])


# Which count gives the number of rows of each array field.
ROW_COUNT = {name: {"n": "num_residues", "e": "num_edges", "m": "num_ligand_atoms",
                    "c": "num_chains", "t": "num_tokens"}[count]
             for name, (_, _, count) in ARRAY_FIELDS.items()}


def parse_records(serialized):
  """tf.data map function on a batch of C serialized records -> one flat chunk.

  Vectorised: one parse and one decode per field for the whole batch. Returns a dict
  of scalars as [C] tensors (the INT_FIELDS as int32, FLOAT_FIELDS, id, group, and
  num_tokens = letters per example) and of array fields as the concatenation over the
  C examples of their rows ([sum of ROW_COUNT[field]], trailing shape).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  f = tf.io.parse_example(serialized, _feature_spec())
  tf.debugging.assert_equal(f["schema_version"], tf.constant(SCHEMA_VERSION, tf.int64),
                            message="record schema version differs from this code's")
  out = _decode(f, lambda name: tf.strings.reduce_join(f[name]))
  chain_example = tf.repeat(tf.range(tf.size(out["num_chains"])), out["num_chains"])
  out["num_tokens"] = tf.math.unsorted_segment_sum(
      out["sequence_lengths"], chain_example, tf.size(out["num_chains"]))
  return out
