"""A TFDS builder over prepared shard records, so `tfds.load` works on them.

    import tensorflow_datasets as tfds
    from bihier_jax.data import tfds_builder  # registers "bihier_records"
    ds = tfds.load("bihier_records", split="train", data_dir=TFDS_DIR,
                   builder_kwargs={"records_dir": OUT})

`records_dir` is a directory written by `data_pipelines.preprocess` (splits from its
metadata.json). `download_and_prepare` (run by `tfds.load`) converts the records into
TFDS's own files under `data_dir`, one example per record with the fields of
`ProteinExample` as tensors; nothing is downloaded. The training pipeline reads the
records directly (`pipeline.make_dataset`); this builder is for TFDS users and
tools.
"""

from __future__ import annotations

import importlib.resources
import importlib.resources.abc
import json
import os
import sys

import numpy as np
import tensorflow as tf

# tensorflow-datasets 4.9.10 reads `importlib_resources.abc.Traversable` (the backport,
# not installed on Python ≥ 3.9, where the standard library has the same module).
if "importlib_resources" not in sys.modules:
  try:
    import importlib_resources  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    sys.modules["importlib_resources"] = importlib.resources

import tensorflow_datasets as tfds  # noqa: E402  pylint: disable=g-import-not-at-top

from bihier_jax.common import residue_constants as rc
from bihier_jax.data import pipeline
from bihier_jax.data import records

_A = rc.NUM_ATOM_SLOTS


def _features() -> tfds.features.FeaturesDict:
  t = tfds.features.Tensor
  return tfds.features.FeaturesDict({
      "id": t(shape=(), dtype=tf.string),
      "group": t(shape=(), dtype=tf.string),
      "chain_ids": t(shape=(None,), dtype=tf.string),
      "sequences": t(shape=(None,), dtype=tf.string),
      "aatype": t(shape=(None,), dtype=tf.int32),
      "atom_positions": t(shape=(None, _A, 3), dtype=tf.float32),
      "atom_mask": t(shape=(None, _A), dtype=tf.bool),
      "chain_row": t(shape=(None,), dtype=tf.int32),
      "residue_index": t(shape=(None,), dtype=tf.int32),
      "residue_number": t(shape=(None,), dtype=tf.int32),
      "backbone_dihedrals": t(shape=(None, 6), dtype=tf.float32),
      "sidechain_torsions": t(shape=(None, 8), dtype=tf.float32),
      "chi_mask": t(shape=(None, 4), dtype=tf.bool),
      "senders": t(shape=(None,), dtype=tf.int32),
      "receivers": t(shape=(None,), dtype=tf.int32),
      "node_labels": t(shape=(None,), dtype=tf.float32),
      "node_label_mask": t(shape=(None,), dtype=tf.bool),
      "node_weights": t(shape=(None,), dtype=tf.float32),
      "graph_label": t(shape=(), dtype=tf.float32),
      "weight": t(shape=(), dtype=tf.float32),
      "ligand_elements": t(shape=(None,), dtype=tf.int32),
      "ligand_positions": t(shape=(None, 3), dtype=tf.float32),
  })


class BihierRecords(tfds.core.GeneratorBasedBuilder):
  """Protein examples of one prepared records directory (any task)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Records schema version 1."}

  def __init__(self, *, records_dir: str = "", task: str = "", **kwargs):
    self._records_dir = records_dir
    self._task = task  # if given, refuse records of another task
    super().__init__(**kwargs)

  def _metadata(self) -> dict:
    path = os.path.join(self._records_dir or "", "metadata.json")
    if not os.path.exists(path):
      return {}
    with open(path) as f:
      return json.load(f)

  def _info(self) -> tfds.core.DatasetInfo:
    # The task's own description (written by data_pipelines.preprocess), else this one.
    description = self._metadata().get("description") or __doc__.split("\n")[0]
    return tfds.core.DatasetInfo(builder=self, description=description,
                                 features=_features(), supervised_keys=None)

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download: the records are local
    if not self._records_dir:
      raise ValueError("BihierRecords needs builder_kwargs={'records_dir': DIR}")
    with open(os.path.join(self._records_dir, "metadata.json")) as f:
      metadata = json.load(f)
    if self._task and metadata.get("task") not in (None, self._task):
      raise ValueError(f"{self._records_dir}: records of task {metadata['task']!r}, "
                       f"not {self._task!r}")
    return {split: self._generate_examples(split) for split in metadata["splits"]}

  def _generate_examples(self, split: str):
    for path in pipeline.shard_files(self._records_dir, split):
      for ex in records.read_records(path):
        yield ex.id, {
            "id": ex.id, "group": ex.group,
            "chain_ids": np.array(ex.chain_ids, dtype=object),
            "sequences": np.array(ex.sequences, dtype=object),
            "aatype": ex.aatype, "atom_positions": ex.atom_positions,
            "atom_mask": ex.atom_mask, "chain_row": ex.chain_row,
            "residue_index": ex.residue_index, "residue_number": ex.residue_number,
            "backbone_dihedrals": ex.backbone_dihedrals,
            "sidechain_torsions": ex.sidechain_torsions, "chi_mask": ex.chi_mask,
            "senders": ex.senders, "receivers": ex.receivers,
            "node_labels": ex.node_labels, "node_label_mask": ex.node_label_mask,
            "node_weights": ex.node_weights, "graph_label": np.float32(ex.graph_label),
            "weight": np.float32(ex.weight), "ligand_elements": ex.ligand_elements,
            "ligand_positions": ex.ligand_positions,
        }
