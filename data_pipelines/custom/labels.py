"""The label file of task `custom`: its rows, reading and checks, and the label kind.

Public: LabelFileError, LabelRow, LabelFile, parse_residue, read_label_file, LabelKind,
infer_label_kind, kind_warnings; SPLITS, KINDS, LOSSES, COLUMNS. The file format and the
kind rule: docs/custom_data.md ("The label file", "Label kinds").
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import math
import os
import re

SPLITS = ("train", "val", "test")
KINDS = ("class", "binary", "regression")
LOSSES = {"class": "softmax_ce", "binary": "sigmoid_bce", "regression": "mse"}
COLUMNS = ("structure", "chain", "residue", "label", "split")
MANY_CLASSES = 50  # integer labels with more distinct values look like a measurement

_RESIDUE = re.compile(r"^([+-]?\d+)([A-Za-z]?)$")


class LabelFileError(ValueError):
  """The label file or the options cannot be used; one line naming file:line, field."""


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
  """The kind of the file's labels (docs/custom_data.md, "Label kinds"); `forced` overrides.

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
