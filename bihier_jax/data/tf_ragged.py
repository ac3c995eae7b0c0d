"""Ragged TF helpers of the tf.data packer: runs, repeats and padded rows of flat arrays.

Public: `runs`, `repeat`, `rows`, `gather_rows`, `padded`, `mask`. Each is one ragged op
(or two) over a whole chunk, no per-example work (docs/data.md, "The tf.data packer").
"""

from __future__ import annotations

import tensorflow as tf


def runs(starts, lengths):
  """int: the ranges [starts[i], starts[i] + lengths[i]) one after another."""
  return tf.ragged.range(starts, starts + lengths).flat_values


def repeat(values, counts):
  """int32: values[i] (int32 >= 0) counts[i] times, for each i in turn.

  tf.repeat masks a [len(values), max count] grid; a cumulative sum over the output
  costs ~7 ns an element. This is one ragged range: each value v becomes the range
  v * 2^31 + (0 .. count - 1) in int64, and the high bits give v back (~1.5 ns an
  element). Needs counts < 2^31.
  """
  flat = runs(tf.cast(values, tf.int64) * (1 << 31), tf.cast(counts, tf.int64))
  return tf.cast(tf.bitwise.right_shift(flat, tf.constant(31, tf.int64)), tf.int32)


def rows(lengths):
  """(owner, position) of each row of a flat array with per-example row `lengths`."""
  owner = repeat(tf.range(tf.size(lengths)), lengths)  # empty examples own no row
  return owner, tf.ragged.range(lengths).flat_values


def gather_rows(values, lengths, which):
  """The rows of examples `which` (int32[k]), in that order, from a flat array of
  per-example rows (`lengths` each): one RaggedGather, a block copy per example."""
  ragged = tf.RaggedTensor.from_row_lengths(values, lengths, validate=False)
  return tf.gather(ragged, which).flat_values


def padded(values, lengths, fill, width: int):
  """[len(lengths), width]: row i holds the next lengths[i] (<= width) of `values`,
  then `fill`."""
  return tf.RaggedTensor.from_row_lengths(values, lengths, validate=False).to_tensor(
      default_value=fill,
      shape=tf.concat([[tf.size(lengths), width], tf.shape(values)[1:]], 0))


def mask(dest, size):
  """bool[size], True at dest (int32[k, 1])."""
  return tf.tensor_scatter_nd_update(tf.zeros([size], tf.bool), dest,
                                     tf.ones(tf.shape(dest)[:1], tf.bool))

