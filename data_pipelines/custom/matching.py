"""Label rows matched to structure files: the examples of task `custom`, and the reports.

Public: StructureIndex (how a label's structure name resolves to a file), Example,
Report, Matched, match_labels. Matching rules and the accounting of unused rows and
files: docs/custom_data.md.
"""

from __future__ import annotations

import collections
import dataclasses
import os

from data_pipelines.custom.labels import LabelFile, LabelFileError, LabelKind, LabelRow


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
