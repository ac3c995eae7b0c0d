"""Task `pdb_dir`: any folder of structure files -> one example per protein chain.

Files: every file under `--raw`, recursively, in sorted path order; each one ends up
in the manifest as `ok` or `skipped` with the reason. The reader goes by content
(bihier_jax.common.structure): PDB or mmCIF, plain or gzip / bzip2 / xz, whatever the
name (`.pdbx`, `.pdb1`, no extension); anything else (a README, a zip archive, a
truncated download) is skipped and says why. All go to one split (`--split`, default
`train`). `--whole` keeps all protein chains of a file in one example instead.
"""

from __future__ import annotations

import argparse
import os
import re

from bihier_jax.data import from_files
from data_pipelines.tasks import SkipItem, WorkItem

# Names that look like structure files (label matching in data_pipelines.custom).
_STRUCTURE_FILE = re.compile(r"\.(pdb\d*|ent|cif|mmcif|pdbx)(\.(gz|bz2|xz))?$",
                             re.IGNORECASE)


def structure_files(raw_dir: str) -> list[str]:
  """The files under `raw_dir` whose names look like structure files, sorted."""
  return [p for p in from_files.all_files(raw_dir)
          if _STRUCTURE_FILE.search(os.path.basename(p))]


class PdbDirTask:
  """One `WorkItem` per structure file; `process` runs the featuriser."""
  name = "pdb_dir"

  def add_arguments(self, parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--split", default="train", help="split of every example")
    parser.add_argument("--whole", action="store_true",
                        help="one example per file (all protein chains) instead of per chain")

  def list_items(self, raw_dir: str, args: argparse.Namespace) -> list[WorkItem]:
    if not raw_dir or not os.path.isdir(raw_dir):
      raise SystemExit(f"pdb_dir: --raw {raw_dir!r} is not a directory")
    split = getattr(args, "split", "train")
    per_chain = not getattr(args, "whole", False)
    return [WorkItem(source=path, split=split, payload=(per_chain,))
            for path in from_files.all_files(raw_dir)]

  def process(self, item: WorkItem):
    from bihier_jax.data import featurize  # pylint: disable=g-import-not-at-top
    per_chain = item.payload[0] if item.payload else True
    examples = featurize.examples_from_file(item.source, per_chain=per_chain)
    if not examples:
      raise SkipItem(f"{item.source}: no protein chain")
    return examples


PDB_DIR = PdbDirTask()
