"""Shard records: exact round trips through the hand-written protobuf encoding."""

import dataclasses

import numpy as np
import tensorflow as tf

from bihier_jax.common import residue_constants as rc
from bihier_jax.data import records
from bihier_jax import testing


def _assert_same(a, b):
  for field in dataclasses.fields(a):
    x, y = getattr(a, field.name), getattr(b, field.name)
    if isinstance(x, np.ndarray):
      assert x.shape == np.asarray(y).shape, field.name
      np.testing.assert_array_equal(x, y, err_msg=field.name)
    else:
      assert x == y, field.name


def _odd_example():
  ex = testing.random_example(23, seed=5, n_chains=2, n_ligand=4)
  ex.insertion_code = np.array([""] * 20 + ["A", "B", ""])
  ex.residue_number = ex.residue_number - 10  # negative author numbers
  ex.sequences = [ex.sequences[0], "J" + ex.sequences[1][1:]]  # J is not ESM vocab
  ex.group = "fold 3"
  ex.id = "('T0759', 'server_TS1')"
  ex.graph_label = 7.25
  ex.weight = 0.5
  return ex


def test_round_trip_is_exact():
  for ex in (testing.random_example(40, seed=1), _odd_example()):
    data = records.serialize_example(ex)
    # TensorFlow's own protobuf parser reads what we wrote by hand.
    proto = tf.train.Example.FromString(data)
    assert proto.features.feature["num_residues"].int64_list.value[0] == ex.num_residues
    _assert_same(ex, records.deserialize_example(data))


def test_parse_record_in_tf_matches():
  ex = _odd_example()
  f = records.parse_record(tf.constant(records.serialize_example(ex)))
  np.testing.assert_array_equal(f["atom_positions"].numpy(), ex.atom_positions)
  np.testing.assert_array_equal(f["atom_mask"].numpy(), ex.atom_mask)
  np.testing.assert_array_equal(f["senders"].numpy(), ex.senders)
  np.testing.assert_array_equal(f["ligand_positions"].numpy(), ex.ligand_positions)
  assert int(f["max_sequence_length"]) == max(len(s) for s in ex.sequences)
  want = [rc.ESM_TOKEN.get(a, rc.ESM_TOKEN["X"]) for a in "".join(ex.sequences)]
  np.testing.assert_array_equal(f["sequence_tokens"].numpy(), want)
  assert f["sequence_tokens"].numpy()[12] == rc.ESM_TOKEN["X"]  # the J


def test_inconsistent_example_is_rejected():
  ex = testing.random_example(10, seed=2)
  ex.senders = ex.senders.copy()
  ex.senders[0] = 10
  try:
    records.serialize_example(ex)
  except ValueError as err:
    assert "synthetic_2" in str(err) and "graph index" in str(err)
  else:
    raise AssertionError("expected ValueError")
