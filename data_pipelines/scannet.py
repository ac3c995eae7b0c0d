"""ScanNet's per-residue benchmarks: PPBS (protein–protein binding sites) and BCE
(B-cell epitopes), from ScanNet's label files, table.csv and wwPDB structure files.

Raw layout (what `python -m data_pipelines.download ppbs|bce` writes): `<raw>/labels_*.txt`
and `<raw>/table.csv`; `<raw>/structures/` with PPBS first assemblies (`<pdb>.pdb1` or
`<pdb>-assembly1.cif`) or BCE asymmetric units (`<pdb>.cif`, `pdb<pdb>.ent`, `<pdb>.pdb`),
any of them gzipped, flat or in wwPDB-divided `<xy>/` folders.

Public: PPBS, BCE (the tasks), read_label_file, read_table, unique_ids,
validation_holdout, align_labels, assembly_copy, find_structure. The rules they follow
(ScanNet's residue set, label lines aligned by position, assemblies, sample weights,
repeated headers, BCE's holdout folds, truncation): docs/tasks.md, "ppbs" and "bce".
"""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import hashlib
import logging
import os
import re

import numpy as np

from bihier_jax.common import structure
from data_pipelines import tasks
from data_pipelines.reference import ReferenceCounts
from data_pipelines.tasks import Processed, SkipItem, WorkItem


PPBS_FILES = (
    ("labels_train.txt", "train", "train", "Train"),
    ("labels_validation_70.txt", "val", "70", "Validation (70\\%)"),
    ("labels_validation_homology.txt", "val", "homology", "Validation (Homology)"),
    ("labels_validation_topology.txt", "val", "topology", "Validation (Topology)"),
    ("labels_validation_none.txt", "val", "none", "Validation (None)"),
    ("labels_test_70.txt", "test", "70", "Test (70\\%)"),
    ("labels_test_homology.txt", "test", "homology", "Test (Homology)"),
    ("labels_test_topology.txt", "test", "topology", "Test (Topology)"),
    ("labels_test_none.txt", "test", "none", "Test (None)"),
)  # (label file, split, group, table.csv Set value — literal backslash before %)
BCE_FILES = tuple((f"labels_fold{k}.txt", f"fold{k}", f"fold{k}", f"Fold {k}")
                  for k in range(1, 6))

BIOUNIT_NAMES = ("{id}.pdb1", "{id}.pdb1.gz", "{id}-assembly1.cif", "{id}-assembly1.cif.gz")
ASYM_NAMES = ("{id}.cif", "{id}.cif.gz", "pdb{id}.ent", "pdb{id}.ent.gz", "{id}.pdb",
              "{id}.pdb.gz")

_PPBS_HEADER = re.compile(r"^([0-9A-Za-z]{4})_(\d+-[^+\s]+(?:\+\d+-[^+\s]+)*)$")
_BCE_HEADER = re.compile(r"^([0-9A-Za-z]{4})_([^_\s]+)$")


@dataclasses.dataclass
class LabelEntry:
  """One example of a label file.

  Attributes:
    header: the header without `>`, e.g. "1a2n_0-A".
    pdb_id: lowercase 4-character PDB code.
    chains: [(model index, chain id)] in header order.
    residues: [(chain id, residue number, one-letter type, label)] in file order.
  """
  header: str
  pdb_id: str
  chains: list[tuple[int, str]]
  residues: list[tuple[str, int, str, int]]


def parse_header(header: str, where: str = "") -> tuple[str, list[tuple[int, str]]]:
  """`1a2n_0-A` / `3g48_1-A+1-B` (PPBS) or `7e33_AB` (BCE) -> (pdb, [(model, chain)])."""
  m = _PPBS_HEADER.match(header)
  if m:
    pairs = [part.split("-", 1) for part in m.group(2).split("+")]
    return m.group(1).lower(), [(int(model), chain) for model, chain in pairs]
  m = _BCE_HEADER.match(header)
  if m:
    return m.group(1).lower(), [(0, chain) for chain in m.group(2)]
  raise ValueError(f"{where}: header {header!r} is neither <pdb>_<model>-<chain> "
                   "nor <pdb>_<chains>")


def read_label_file(path: str) -> list[LabelEntry]:
  """All entries of a ScanNet label file, with format checks naming the line."""
  entries: list[LabelEntry] = []
  with open(path) as f:
    for n, line in enumerate(f, 1):
      line = line.strip()
      if not line:
        continue
      if line.startswith(">"):
        header = line[1:].strip()
        pdb_id, chains = parse_header(header, f"{path}:{n}")
        entries.append(LabelEntry(header, pdb_id, chains, []))
        continue
      if not entries:
        raise ValueError(f"{path}:{n}: residue line before the first header")
      parts = line.split()
      if len(parts) != 4:
        raise ValueError(f"{path}:{n}: expected '<chain> <resnum> <aa> <label>', "
                         f"got {line!r}")
      chain, number, aa, label = parts
      try:
        entries[-1].residues.append((chain, int(number), aa.upper(), int(float(label))))
      except ValueError as e:
        raise ValueError(f"{path}:{n}: bad residue number or label in {line!r}") from e
  return entries


TableRow = collections.namedtuple("TableRow", "pdb_id weight antigen")


def set_key(set_name: str) -> str:
  """A table.csv `Set` value as compared: `Validation (70\\%)` and `Validation (70%)`
  are the same set (ScanNet's file has the backslash; copies may not)."""
  return set_name.replace("\\", "").strip()


def read_table(path: str) -> dict[str, list[TableRow]]:
  """table.csv -> {set_key(Set): [TableRow] in row order}; antigen "" if no column."""
  rows: dict[str, list[TableRow]] = {}
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    for column in ("PDB ID", "Set", "Sample weight"):
      if column not in (reader.fieldnames or []):
        raise ValueError(f"{path}: no {column!r} column (has {reader.fieldnames})")
    for n, row in enumerate(reader, 2):
      try:
        weight = float(row["Sample weight"])
      except ValueError as e:
        raise ValueError(f"{path}:{n}: Sample weight {row['Sample weight']!r} is not "
                         "a number") from e
      rows.setdefault(set_key(row["Set"]), []).append(
          TableRow(row["PDB ID"], weight, (row.get("Antigen Name") or "").strip()))
  return rows


def unique_ids(headers: list[str]) -> list[str]:
  """Example ids: the header, or `<header>#<k>` for the k-th copy of a repeated one."""
  counts = collections.Counter(headers)
  seen: collections.Counter = collections.Counter()
  ids = []
  for header in headers:
    if counts[header] > 1:
      seen[header] += 1
      ids.append(f"{header}#{seen[header]}")
    else:
      ids.append(header)
  return ids


def validation_holdout(examples: list[tuple[str, str, str]], fraction: float = 0.1
                       ) -> set[str]:
  """Ids of the validation examples among (id, PDB id, antigen name) triples.

  Examples sharing a PDB id or a (case-folded) antigen name are one group, transitively;
  groups are taken in md5 order of their smallest PDB id while the total stays within
  `fraction` of all examples (a group that would overshoot is passed over; if none fits,
  the smallest group is taken unless it is every example, so validation is empty only
  when nothing can be held out without a shared entry or antigen).
  """
  parent = {}

  def find(x):
    while parent.setdefault(x, x) != x:
      parent[x] = parent[parent[x]]
      x = parent[x]
    return x

  for example_id, pdb_id, antigen in examples:
    links = [("pdb", pdb_id.lower())]
    if antigen and antigen.lower() not in ("nan", "none", "unknown"):
      links.append(("antigen", antigen.casefold()))
    for link in links:
      parent[find(("id", example_id))] = find(link)
  groups = collections.defaultdict(list)
  for example_id, pdb_id, _ in examples:
    groups[find(("id", example_id))].append((pdb_id.lower(), example_id))
  ordered = sorted(groups.values(),
                   key=lambda g: hashlib.md5(min(g)[0].encode()).hexdigest())
  target, held = fraction * len(examples), []
  for group in ordered:
    if len(held) + len(group) <= target:
      held += group
  if not held and len(ordered) > 1:
    held = min(ordered, key=len)
  return {example_id for _, example_id in held}


def _id_matches(table_id: str, entry: LabelEntry) -> bool:
  """Table ids are the header (BCE) or start with the PDB code; compare loosely."""
  table_id = table_id.strip().lower()
  return table_id in (entry.header.lower(), entry.pdb_id) or table_id.startswith(
      entry.pdb_id)


def find_structure(structure_dir: str, pdb_id: str, biounit: bool) -> str | None:
  """Path of the structure file of `pdb_id` (flat or wwPDB-divided layout), or None."""
  names = [p.format(id=pdb_id) for p in (BIOUNIT_NAMES if biounit else ASYM_NAMES)]
  for folder in (structure_dir, os.path.join(structure_dir, pdb_id[1:3])):
    for name in names:
      path = os.path.join(folder, name)
      if os.path.exists(path):
        return path
  return None


def structure_format(path: str) -> str:
  """"pdb" or "cif" from the name (gemmi does not know the .pdb1 extension)."""
  name = os.path.basename(path).lower().removesuffix(".gz")
  return "cif" if name.endswith((".cif", ".mmcif")) else "pdb"


def _chain_label_runs(entry: LabelEntry, where: str) -> list[list[tuple]]:
  """Residue lines split per header chain (consecutive runs, else by chain id)."""
  runs: list[list[tuple]] = []
  for res in entry.residues:
    if runs and runs[-1][0][0] == res[0]:
      runs[-1].append(res)
    else:
      runs.append([res])
  wanted = [c for _, c in entry.chains]
  if [r[0][0] for r in runs] == wanted:
    return runs
  if len(set(wanted)) == len(wanted):
    by_chain = {c: [r for r in entry.residues if r[0] == c] for c in wanted}
    extra = {r[0] for r in entry.residues} - set(wanted)
    if not extra:
      return [by_chain[c] for c in wanted]
    raise SkipItem(f"{where}: residue lines for chains {sorted(extra)} not in the header")
  raise SkipItem(f"{where}: cannot assign residue lines to header chains {wanted}")


def align_labels(chain: structure.Chain, labels: list[tuple[str, int, str, int]]
                 ) -> tuple[np.ndarray, list[int]]:
  """Label line -> structure residue, by position.

  Identical sequences align one-to-one. Otherwise each label line, in order, takes the
  next structure residue with the same residue number and one-letter type (labels have
  no insertion codes, and come in structure order).

  Returns:
    (int[len(labels)] structure residue index or −1, indices of unmatched label lines).
  """
  seq = "".join(aa for _, _, aa, _ in labels)
  if seq == chain.sequence:
    return np.arange(len(labels)), []
  out = np.full([len(labels)], -1, np.int64)
  unmatched, j = [], 0
  numbers = chain.residue_number
  for i, (_, number, aa, _) in enumerate(labels):
    k = j
    while k < chain.num_residues and not (numbers[k] == number and chain.sequence[k] == aa):
      k += 1
    if k < chain.num_residues:
      out[i], j = k, k + 1
    else:
      unmatched.append(i)
  return out, unmatched


# ScanNet's subset and fold sizes (counted in its label files; the PPBS training set's
# size is not published).
PPBS_REFERENCE = ReferenceCounts(
    source="ScanNet's PPBS label files", unit="chains", by="split/group",
    counts={"val/70": 414, "val/homology": 1458, "val/topology": 590, "val/none": 754,
            "test/70": 554, "test/homology": 1488, "test/topology": 915,
            "test/none": 1079})
BCE_REFERENCE = ReferenceCounts(
    source="ScanNet's BCE label files", unit="examples", by="group",
    counts={"fold1": 990, "fold2": 580, "fold3": 760, "fold4": 927, "fold5": 499})


def assembly_copy(parsed: structure.Structure, model: int, chain_id: str) -> str | None:
  """Chain id of symmetry copy `model` (0-based) of `chain_id` in a single-model
  assembly (wwPDB mmCIF since May 2022: copies X, X-2, X-3, … in file order)."""
  copies = [c.chain_id for c in parsed.chains
            if c.chain_id == chain_id or c.chain_id.startswith(chain_id + "-")]
  return copies[model] if model < len(copies) else None


class ScanNetTask:
  """Preprocessing task (data_pipelines.tasks protocol) for PPBS or BCE."""

  def __init__(self, name: str, files, biounit: bool, reference_counts: ReferenceCounts,
               description: str):
    self.name = name
    self.description = description
    self.files = files
    self.biounit = biounit
    self.reference_counts = reference_counts

  def add_arguments(self, parser: argparse.ArgumentParser) -> None:
    tasks.add_graph_arguments(parser)
    if not any("--structures" in a.option_strings for a in parser._actions):
      parser.add_argument("--structures", default="",
                          help="structure folder (default: <raw>/structures)")
      parser.add_argument("--max-unmatched-fraction", type=float, default=0.0,
                          help="label lines per chain allowed to match no structure "
                               "residue (dropped and counted); above it the item is "
                               "skipped")
    if self.name == "bce" and not any("--holdout-fold" in a.option_strings
                                      for a in parser._actions):
      parser.add_argument("--holdout-fold", type=int, default=0, choices=range(6),
                          help="k: test = fold k, train/val = the other folds, "
                               "validation grouped by PDB entry and antigen "
                               "(0: keep splits fold1..fold5)")

  def _read_files(self, raw_dir: str):
    """[(file name, split, group, entries, table rows)] with the count checks."""
    table_path = os.path.join(raw_dir, "table.csv")
    if not os.path.exists(table_path):
      raise FileNotFoundError(f"{raw_dir}: no table.csv (run `python -m "
                              f"data_pipelines.download {self.name}` first)")
    table = read_table(table_path)
    out = []
    for fname, split, group, set_name in self.files:
      path = os.path.join(raw_dir, fname)
      if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: label file missing")
      entries = read_label_file(path)
      rows = table.get(set_key(set_name), [])
      if len(rows) != len(entries):
        raise ValueError(f"{table_path}: {len(rows)} rows with Set {set_name!r} but "
                         f"{len(entries)} examples in {path}; weights are assigned by "
                         "row order, so the counts must match")
      out.append((fname, split, group, entries, rows))
    return out

  def list_items(self, raw_dir: str, args: argparse.Namespace | None = None
                 ) -> list[WorkItem]:
    files = self._read_files(raw_dir)
    structure_dir = getattr(args, "structures", "") or os.path.join(raw_dir, "structures")
    tolerance = float(getattr(args, "max_unmatched_fraction", 0.0) or 0.0)
    graph = tasks.graph_arguments(args)
    ids = iter(unique_ids([e.header for f in files for e in f[3]]))
    listed = [(fname, split, group, entry, row, next(ids))
              for fname, split, group, entries, rows in files
              for entry, row in zip(entries, rows)]
    holdout = int(getattr(args, "holdout_fold", 0) or 0)
    val = validation_holdout([(i, e.pdb_id, row.antigen)
                              for _, split, _, e, row, i in listed
                              if split != f"fold{holdout}"]) if holdout else set()
    items = []
    for fname, split, group, entry, row, example_id in listed:
      if holdout and split.startswith("fold"):
        split = ("test" if split == f"fold{holdout}" else
                 "val" if example_id in val else "train")
      items.append(WorkItem(
          f"{fname}:{example_id}", split,
          (dataclasses.astuple(entry), example_id, group, row.weight, row.pdb_id,
           structure_dir, self.biounit, tolerance) + graph, group=group))
    return items

  def _chain(self, path: str, model: int, chain_id: str, parsed: dict, where: str):
    """(parsed structure holding the chain, the chain) for header chain (model, id)."""
    def parse(model_index):
      try:
        return structure.parse_structure(path, model_index=model_index,
                                         format=structure_format(path),
                                         hetatm_amino_acids=True)
      except structure.StructureError as e:
        if isinstance(e, structure.ModelNotFoundError) and e.num_models == 1:
          raise
        raise SkipItem(f"{where}: {e}", kind="unreadable structure file or model") from e

    if model not in parsed:
      try:
        parsed[model] = parse(model)
      except structure.ModelNotFoundError:  # a single-model assembly: copies are chains
        parsed[model] = parsed[0] = parsed[0] if 0 in parsed else parse(0)
    st = parsed[model]
    wanted = chain_id if st.chains[0].model_index == model else assembly_copy(
        st, model, chain_id)
    chain = next((c for c in st.chains if c.chain_id == wanted), None)
    if chain is None:
      have = [c.chain_id for c in st.chains]
      raise SkipItem(f"{where}: chain {chain_id} not in model {model} of {path} "
                     f"(has {have})", kind="chain not in the structure file")
    return st, chain

  def process(self, item: WorkItem):
    from bihier_jax.data import featurize
    (entry_t, example_id, group, weight, table_id, structure_dir, biounit, tolerance,
     cutoff, max_neighbors) = item.payload
    entry = LabelEntry(*entry_t)
    where = item.source
    if not _id_matches(table_id, entry):
      raise SkipItem(f"{where}: table.csv row says {table_id!r}; weights would be "
                     "misassigned", kind="table.csv row of another example")
    path = find_structure(structure_dir, entry.pdb_id, biounit)
    if path is None:
      kind = "biological assembly" if biounit else "asymmetric unit"
      raise SkipItem(f"{where}: no {kind} file for {entry.pdb_id} in {structure_dir}",
                     kind=f"no {kind} file")
    parsed: dict[int, structure.Structure] = {}
    chains, labels, label_mask = [], [], []
    dropped = collections.Counter()
    for (model, chain_id), lines in zip(entry.chains, _chain_label_runs(entry, where)):
      st, chain = self._chain(path, model, chain_id, parsed, where)
      index, unmatched = align_labels(chain, lines)
      without_ca = _lines_on_residues_without_ca(st, chain.chain_id, lines, unmatched)
      unmatched = [i for i in unmatched if i not in without_ca]
      if unmatched:
        shown = ", ".join(f"{lines[i][0]}:{lines[i][1]}{lines[i][2]}"
                          for i in unmatched[:5])
        message = (f"{where}: {len(unmatched)}/{len(lines)} label lines of chain "
                   f"{chain_id} match no residue of {path} ({shown}...)")
        if len(unmatched) > tolerance * len(lines):
          raise SkipItem(message, kind="label lines match no residue")
        logging.warning("%s; dropped", message)
      y = np.zeros([chain.num_residues], np.float32)
      m = np.zeros([chain.num_residues], bool)
      values = np.array([line[3] for line in lines], np.float32)
      ok = (index >= 0) & (values >= 0)  # ScanNet: a negative label means "missing"
      y[index[ok]] = values[ok]
      m[index[ok]] = True
      dropped.update(label_lines_without_ca=len(without_ca),
                     label_lines_unmatched=len(unmatched),
                     residues_without_label_line=int((~m).sum()),
                     residues_without_ca=sum(r[0] == chain.chain_id
                                             for r in st.residues_without_ca))
      chains.append(chain)
      labels.append(y)
      label_mask.append(m)
    n = sum(c.num_residues for c in chains)
    example = featurize.example_from_chains(
        example_id, chains, cutoff=cutoff, max_neighbors=max_neighbors,
        node_labels=np.concatenate(labels), node_label_mask=np.concatenate(label_mask),
        node_weights=np.full([n], weight, np.float32), weight=weight, group=group)
    kept_hetatm = sum(p.stats["hetatm_amino_acids"] for p in
                      {id(p): p for p in parsed.values()}.values())
    notes = {"hetatm_amino_acids": kept_hetatm} if kept_hetatm else {}
    return Processed([example], dropped=dict(dropped), notes=notes)


def _lines_on_residues_without_ca(st: structure.Structure, chain_id: str, lines,
                                  unmatched: list[int]) -> set[int]:
  """The unmatched label lines that name a residue the parser dropped for lacking a CA
  (same chain, number and one-letter type, taken in order)."""
  pending = [(number, structure.residue_kind(name).letter or "X")
             for c, number, _, name in st.residues_without_ca if c == chain_id]
  found = set()
  for i in unmatched:
    key = (lines[i][1], lines[i][2])
    if key in pending:
      pending.remove(key)
      found.add(i)
  return found


PPBS = ScanNetTask("ppbs", PPBS_FILES, biounit=True, reference_counts=PPBS_REFERENCE,
                   description="ScanNet PPBS; node_labels = binding-site residue, "
                   "node_weights = chain sample weight, group = test subset.")
BCE = ScanNetTask("bce", BCE_FILES, biounit=False, reference_counts=BCE_REFERENCE,
                  description="ScanNet BCE; node_labels = epitope residue, node_weights = "
                  "example sample weight, group = fold.")
