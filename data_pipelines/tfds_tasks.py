"""One TFDS builder per benchmark, over that task's prepared records.

    import tensorflow_datasets as tfds
    from data_pipelines import tfds_tasks  # registers bihier_react, bihier_mqa, ...
    ds = tfds.load("bihier_lba30", split="test", data_dir=TFDS_DIR,
                   builder_kwargs={"records_dir": PREPARED})

Thin subclasses of the generic `bihier_jax.data.tfds_builder.BihierRecords`: each names
its task, describes it, and refuses a records directory prepared for another task
(metadata.json's `task`).
"""

from __future__ import annotations

import json
import os

from bihier_jax.data import tfds_builder

DESCRIPTIONS = {
    "react": "EC reaction classification (IEConv ProtFunct, 384 classes); graph_label = "
             "class index.",
    "mqa": "ATOM3D PSR split by year; graph_label = GDT_TS (0-1), group = CASP target.",
    "lba30": "ATOM3D LBA, 30% identity split; pocket residues + ligand atoms; "
             "graph_label = pK.",
    "lba60": "ATOM3D LBA, 60% identity split; pocket residues + ligand atoms; "
             "graph_label = pK.",
    "ppbs": "ScanNet PPBS; node_labels = binding-site residue, node_weights = chain "
            "sample weight, group = test subset.",
    "bce": "ScanNet BCE; node_labels = epitope residue, node_weights = example sample "
           "weight, group = fold.",
}


class _TaskRecords(tfds_builder.BihierRecords):
  """Base: `TASK` names the preprocessing task whose records this builder reads."""
  TASK = ""

  def _info(self):
    info = super()._info()
    info._info_proto.description = DESCRIPTIONS[self.TASK]  # pylint: disable=protected-access
    return info

  def _split_generators(self, dl_manager):
    path = os.path.join(self._records_dir or "", "metadata.json")
    if os.path.exists(path):
      with open(path) as f:
        task = json.load(f).get("task")
      if task not in (None, self.TASK):
        raise ValueError(f"{self._records_dir}: records of task {task!r}, not {self.TASK!r}")
    return super()._split_generators(dl_manager)


class BihierReact(_TaskRecords):
  """EC reaction classification records."""
  TASK = "react"


class BihierMqa(_TaskRecords):
  """ATOM3D PSR (model quality assessment) records."""
  TASK = "mqa"


class BihierLba30(_TaskRecords):
  """ATOM3D LBA 30% records."""
  TASK = "lba30"


class BihierLba60(_TaskRecords):
  """ATOM3D LBA 60% records."""
  TASK = "lba60"


class BihierPpbs(_TaskRecords):
  """ScanNet PPBS records."""
  TASK = "ppbs"


class BihierBce(_TaskRecords):
  """ScanNet BCE records."""
  TASK = "bce"
