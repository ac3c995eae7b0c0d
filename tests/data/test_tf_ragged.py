"""The packer's ragged TF helpers against numpy."""

import numpy as np
import tensorflow as tf

from bihier_jax.data import tf_ragged


def test_ragged_helpers_equal_numpy():
  """The packer's ragged building blocks against numpy on random runs, empty ones too."""
  rng = np.random.default_rng(0)
  counts = rng.integers(0, 5, 40).astype(np.int32)
  counts[:3] = 0
  values = rng.integers(0, 10**6, 40).astype(np.int32)
  starts = rng.integers(0, 1000, 40).astype(np.int32)
  np.testing.assert_array_equal(tf_ragged.repeat(values, counts).numpy(),
                                np.repeat(values, counts))
  np.testing.assert_array_equal(
      tf_ragged.runs(starts, counts).numpy(),
      np.concatenate([np.arange(s, s + n) for s, n in zip(starts, counts)]))
  owner, position = tf_ragged.rows(counts)
  np.testing.assert_array_equal(owner.numpy(), np.repeat(np.arange(40), counts))
  np.testing.assert_array_equal(position.numpy(),
                                np.concatenate([np.arange(n) for n in counts]))
  rows = rng.normal(size=(int(counts.sum()), 3)).astype(np.float32)
  which = rng.permutation(40)[:25].astype(np.int32)
  first = np.cumsum(counts) - counts
  np.testing.assert_array_equal(
      tf_ragged.gather_rows(rows, counts, which).numpy(),
      np.concatenate([rows[first[i]:first[i] + counts[i]] for i in which]))
  flat = rng.integers(0, 100, int(counts.sum())).astype(np.int32)
  padded = tf_ragged.padded(flat, counts, -7, 6).numpy()
  expected = np.full((40, 6), -7, np.int32)
  for i, piece in enumerate(np.split(flat, np.cumsum(counts)[:-1])):
    expected[i, :len(piece)] = piece
  np.testing.assert_array_equal(padded, expected)
  assert tf_ragged.padded(tf.zeros([0], tf.int32), tf.zeros([0], tf.int32), 0,
                                4).shape == (0, 4)
