"""Preprocessing CLI: raw inputs of a task -> sharded records + manifest + metadata.

  python -m data_pipelines.preprocess pdb_dir --raw DIR --out OUT [--split NAME]
  python -m data_pipelines.preprocess demo --out OUT
  python -m data_pipelines.preprocess custom --raw DIR --labels LABELS.csv --out OUT
  python -m data_pipelines.preprocess <task> --raw DIR --out OUT [--workers N]
      [--shard-size K] [--limit N]

Tasks come from `data_pipelines.tasks` (each may add its own flags). Output layout,
resumability and the manifest are described in `data_pipelines.shards`. Re-running the
same command resumes: finished shards are kept. The benchmark tasks end by printing
their split and subset sizes next to the literature's, each difference with its
reasons counted (`data_pipelines.reference`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from bihier_jax.data import featurize
from data_pipelines import custom
from data_pipelines import reference
from data_pipelines import shards
from data_pipelines import tasks

tasks.register(custom.CUSTOM)  # your own labelled structures (docs/custom_data.md)


def build_parser(task: tasks.Task | None) -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m data_pipelines.preprocess",
      description="Turn a task's raw inputs into sharded TFRecord datasets.")
  parser.add_argument("task", help=f"one of: {', '.join(tasks.names())}")
  parser.add_argument("--raw", default="", help="raw input directory")
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8),
                      help="worker processes (1 = in this process)")
  parser.add_argument("--shard-size", type=int, default=256, help="work items per shard")
  parser.add_argument("--limit", type=int, default=0,
                      help="only the first N work items (0 = all); for trials")
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")
  parser.add_argument("--incomplete-backbone", default="warn",
                      choices=featurize.INCOMPLETE_BACKBONE_POLICIES,
                      help="residues lacking N, C or O (e.g. CA-only models): warn = keep "
                      "and say how many (manifest field incomplete_backbone), skip = "
                      "leave out the examples that have any, allow = keep quietly")
  if task is not None and hasattr(task, "add_arguments"):
    task.add_arguments(parser)
  return parser


def main(argv: list[str] | None = None) -> dict:
  argv = sys.argv[1:] if argv is None else argv
  first = argparse.ArgumentParser(add_help=False)
  first.add_argument("task", nargs="?")
  known, _ = first.parse_known_args(argv)
  task = None
  if known.task and not known.task.startswith("-"):
    try:
      task = tasks.get(known.task)
    except KeyError as err:
      build_parser(None).error(str(err))
  args = build_parser(task).parse_args(argv)
  if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", args.out):
    # Shards are written and renamed in place (resumable): a local folder only.
    build_parser(task).error(f"--out {args.out}: write to a local folder, then copy it "
                             "to the bucket (docs/cloud.md: gcloud storage cp --recursive)")
  items = task.list_items(args.raw, args)
  if args.limit:
    items = items[:args.limit]
  reference_counts = getattr(task, "reference_counts", None)
  metadata = shards.write_dataset(items, task.process, args.out,
                                  num_workers=args.workers, shard_size=args.shard_size,
                                  task=task.name, progress=not args.no_progress,
                                  incomplete_backbone=args.incomplete_backbone,
                                  reference_counts=reference_counts,
                                  notes=getattr(task, "metadata_notes", None),
                                  description=getattr(task, "description", ""))
  summary = {split: {k: v[k] for k in ("examples", "residues", "sources", "skipped",
                                       "dropped")}
             for split, v in metadata["splits"].items()}
  print(json.dumps({"out": args.out, "splits": summary,
                    "skipped_reasons": metadata["skipped_reasons"],
                    "incomplete_backbone": metadata["incomplete_backbone"]}, indent=1))
  if reference_counts is not None:
    print(reference.format_table(task.name, reference_counts,
                                 metadata["reference_counts"]["subsets"]))
  return metadata


if __name__ == "__main__":
  main()
