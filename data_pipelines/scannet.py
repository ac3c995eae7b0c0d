"""ScanNet's per-residue benchmarks: PPBS (protein–protein binding sites) and BCE
(B-cell epitopes). Label files + table.csv + structure files (DATASETS.md §4–§5).

Raw layout (what `python -m data_pipelines.download ppbs|bce` writes):
```
<raw>/labels_*.txt, table.csv     ScanNet's datasets/PPBS or datasets/BCE files
<raw>/structures/                 PPBS: <pdb>.pdb1(.gz) or <pdb>-assembly1.cif(.gz)
                                  BCE:  <pdb>.cif(.gz) or pdb<pdb>.ent(.gz) (or <pdb>.pdb)
                                  (flat, or wwPDB-divided <xy>/ subfolders)
```
Label files: headers `>1a2n_0-A` (PPBS: PDB, 0-based model, chain; `+` joins several)
or `>7e33_AB` (BCE: each character a chain of the asymmetric unit, model 0), then lines
`<chain> <resnum> <aa> <label>` in structure order. Residue numbers carry no insertion
code, so labels are aligned to the parsed chain by **position**: in order, a label line
matches the next structure residue with the same number and one-letter type (identical
sequences align one-to-one). Label lines that match nothing are reported: by default the
item is skipped with the list (`--max-unmatched-fraction` tolerates a fraction, which
are then dropped, never guessed). Structure residues without a label line are unlabelled
(`node_label_mask` False).

Sample weights come from table.csv by row order within each `Set` (ScanNet's rule); the
counts must match the label file. Per residue: node label 0/1, node weight = the chain's
sample weight; example weight = sample weight; group = PPBS subset (`70`, `homology`,
`topology`, `none`; `train`) or BCE fold (`fold1`..`fold5`).

Splits: PPBS `train`, `val` (four validation subsets), `test` (four test subsets).
BCE: `fold1`..`fold5` by default; with `--holdout-fold k` (one run per fold of the 5-fold
cross-validation, see configs/bce.py) `test` = fold k, and the other folds are split
into `train` and `val` (a deterministic ~10% of examples by md5 of the header).

Truncation: ScanNet scores only the first 1024 residues of a PPBS chain (`Lmax_aa`; 2120
for BCE). We keep every residue here; training/evaluation crop chains to
`config.data.max_residues` (ESM's 1022), so for chains longer than that our evaluation
window differs from ScanNet's — see docs/tasks.md.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import logging
import os
import re

import numpy as np

from bihier_jax.common import structure
from data_pipelines.tasks import SkipItem, WorkItem

DEFAULT_CUTOFF = 10.0
DEFAULT_MAX_NEIGHBORS = 32

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


def read_table(path: str) -> dict[str, list[tuple[str, float]]]:
  """table.csv -> {Set: [(PDB ID, sample weight)] in row order}."""
  rows: dict[str, list[tuple[str, float]]] = {}
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    for column in ("PDB ID", "Set", "Sample weight"):
      if column not in (reader.fieldnames or []):
        raise ValueError(f"{path}: no {column!r} column (has {reader.fieldnames})")
    for row in reader:
      rows.setdefault(row["Set"], []).append((row["PDB ID"], float(row["Sample weight"])))
  return rows


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


def held_out_for_validation(header: str, fraction: float = 0.1) -> bool:
  """Deterministic ~`fraction` of examples, by md5 of the header (stable across runs)."""
  digest = hashlib.md5(header.encode()).digest()
  return int.from_bytes(digest[:4], "big") < fraction * 2**32


class ScanNetTask:
  """Preprocessing task (data_pipelines.tasks protocol) for PPBS or BCE."""

  def __init__(self, name: str, files, biounit: bool):
    self.name = name
    self.files = files
    self.biounit = biounit

  def add_arguments(self, parser: argparse.ArgumentParser) -> None:
    from data_pipelines import lba
    lba.add_graph_arguments(parser)
    if not any("--structures" in a.option_strings for a in parser._actions):
      parser.add_argument("--structures", default="",
                          help="structure folder (default: <raw>/structures)")
      parser.add_argument("--max-unmatched-fraction", type=float, default=0.0,
                          help="label lines per chain allowed to match no structure "
                               "residue (dropped and logged); above it the item is skipped")
    if self.name == "bce" and not any("--holdout-fold" in a.option_strings
                                      for a in parser._actions):
      parser.add_argument("--holdout-fold", type=int, default=0, choices=range(6),
                          help="k: test = fold k, train/val = the other folds "
                               "(0: keep splits fold1..fold5)")

  def list_items(self, raw_dir: str, args: argparse.Namespace | None = None
                 ) -> list[WorkItem]:
    table_path = os.path.join(raw_dir, "table.csv")
    if not os.path.exists(table_path):
      raise FileNotFoundError(f"{raw_dir}: no table.csv (run `python -m "
                              f"data_pipelines.download {self.name}` first)")
    table = read_table(table_path)
    structure_dir = getattr(args, "structures", "") or os.path.join(raw_dir, "structures")
    tolerance = float(getattr(args, "max_unmatched_fraction", 0.0) or 0.0)
    graph = (float(getattr(args, "cutoff", None) or DEFAULT_CUTOFF),
             int(getattr(args, "max_neighbors", None) or DEFAULT_MAX_NEIGHBORS))
    items = []
    for fname, split, group, set_name in self.files:
      path = os.path.join(raw_dir, fname)
      if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: label file missing")
      entries = read_label_file(path)
      rows = table.get(set_name, [])
      if len(rows) != len(entries):
        raise ValueError(f"{table_path}: {len(rows)} rows with Set {set_name!r} but "
                         f"{len(entries)} examples in {path}; weights are assigned by "
                         "row order, so the counts must match")
      for entry, (table_id, weight) in zip(entries, rows):
        items.append(WorkItem(
            f"{fname}:{entry.header}", self._split(split, entry.header, args),
            (dataclasses.astuple(entry), group, weight, table_id, structure_dir,
             self.biounit, tolerance) + graph))
    return items

  @staticmethod
  def _split(split: str, header: str, args) -> str:
    """Cross-validation split of a BCE example when --holdout-fold k is given."""
    k = int(getattr(args, "holdout_fold", 0) or 0)
    if not k or not split.startswith("fold"):
      return split
    if split == f"fold{k}":
      return "test"
    return "val" if held_out_for_validation(header) else "train"

  def process(self, item: WorkItem):
    from bihier_jax.data import featurize
    (entry_t, group, weight, table_id, structure_dir, biounit, tolerance, cutoff,
     max_neighbors) = item.payload
    entry = LabelEntry(*entry_t)
    where = item.source
    if not _id_matches(table_id, entry):
      raise SkipItem(f"{where}: table.csv row says {table_id!r}; weights would be "
                     "misassigned")
    path = find_structure(structure_dir, entry.pdb_id, biounit)
    if path is None:
      kind = "biological assembly" if biounit else "asymmetric unit"
      raise SkipItem(f"{where}: no {kind} file for {entry.pdb_id} in {structure_dir}")
    parsed: dict[int, structure.Structure] = {}
    chains, labels, label_mask = [], [], []
    for (model, chain_id), lines in zip(entry.chains, _chain_label_runs(entry, where)):
      if model not in parsed:
        try:
          parsed[model] = structure.parse_structure(path, model_index=model,
                                                    format=structure_format(path))
        except structure.StructureError as e:
          raise SkipItem(f"{where}: {e}") from e
      chain = next((c for c in parsed[model].chains if c.chain_id == chain_id), None)
      if chain is None:
        have = [c.chain_id for c in parsed[model].chains]
        raise SkipItem(f"{where}: chain {chain_id} not in model {model} of {path} "
                       f"(has {have})")
      index, unmatched = align_labels(chain, lines)
      if unmatched:
        shown = ", ".join(f"{lines[i][0]}:{lines[i][1]}{lines[i][2]}"
                          for i in unmatched[:5])
        message = (f"{where}: {len(unmatched)}/{len(lines)} label lines of chain "
                   f"{chain_id} match no residue of {path} ({shown}...)")
        if len(unmatched) > tolerance * len(lines):
          raise SkipItem(message)
        logging.warning("%s; dropped", message)
      y = np.zeros([chain.num_residues], np.float32)
      m = np.zeros([chain.num_residues], bool)
      values = np.array([line[3] for line in lines], np.float32)
      ok = (index >= 0) & (values >= 0)  # ScanNet: a negative label means "missing"
      y[index[ok]] = values[ok]
      m[index[ok]] = True
      chains.append(chain)
      labels.append(y)
      label_mask.append(m)
    n = sum(c.num_residues for c in chains)
    example = featurize.example_from_chains(
        entry.header, chains, cutoff=cutoff, max_neighbors=max_neighbors,
        node_labels=np.concatenate(labels), node_label_mask=np.concatenate(label_mask),
        node_weights=np.full([n], weight, np.float32), weight=weight, group=group)
    return [example]


PPBS = ScanNetTask("ppbs", PPBS_FILES, biounit=True)
BCE = ScanNetTask("bce", BCE_FILES, biounit=False)
