"""Task `custom`: your own labelled structures (docs/custom_data.md).

labels (the label file and its kind), matching (rows to structures), splits (dealing and
MMseqs2 clusters), task (the preprocessing task and OUT/custom.json), example (the
worked example). Exported here: what the preprocessing CLI and configs/custom.py use.
"""

from data_pipelines.custom.labels import LabelFileError
from data_pipelines.custom.task import CUSTOM, METADATA, load_task_metadata

__all__ = ["CUSTOM", "METADATA", "LabelFileError", "load_task_metadata"]
