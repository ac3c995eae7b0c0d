"""ATOM3D LBA (ligand binding affinity), 30% and 60% sequence-identity splits.

Raw layout (Zenodo record 4914718): `split-by-sequence-identity-<30|60>/data/{train,
val,test}/` ATOM3D LMDB directories (items: docs/tasks.md, "Raw inputs"). One example
per complex: the pocket's residues, the ligand's heavy atoms and (by default) the
pocket's other hetero groups as element-typed nodes; ESM reads the full chains the
pocket comes from. What is kept, dropped and counted: docs/tasks.md, "lba30 / lba60".

Public: LBA30, LBA60, POCKET_HETERO, add_pocket_arguments, and the LMDB helpers mqa
shares (find_split_dirs, list_lmdb_items, read_lmdb_item, structure_from_table,
dropped_counts, ligand_from_table, pocket_in_full_chains).
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from bihier_jax.common import structure
from data_pipelines import atom3d_lmdb, atom_rows, tasks
from data_pipelines.reference import ReferenceCounts
from data_pipelines.tasks import Processed, SkipItem, WorkItem

SPLITS = ("train", "val", "test")
POCKET_HETERO = ("keep", "drop")  # keep: ATOM3D's baselines featurise every pocket atom


def find_split_dirs(raw_dir: str, marker: str) -> dict[str, str]:
  """LMDB directory of each split under `raw_dir`, for a split archive named `marker`.

  Looks for a folder holding `train/`, `val/`, `test/` LMDB directories anywhere under
  `raw_dir` (the archive's top folder name is not fixed [U]); the one whose path contains
  `marker` wins (both LBA splits may be extracted side by side), else a single folder
  not named `split-by-*` at all.
  """
  found = []
  for root, dirs, _ in os.walk(raw_dir):
    have = [s for s in SPLITS if s in dirs
            and os.path.exists(os.path.join(root, s, "data.mdb"))]
    if have:
      found.append((root, have))
  matching = [f for f in found if marker in os.path.abspath(f[0])]
  # A lone folder of unknown name is accepted; one named for another split never is.
  unnamed = [f for f in found if "split-by-" not in os.path.abspath(f[0])]
  chosen = matching or (unnamed if len(unnamed) == 1 else [])
  if len(chosen) != 1:
    where = ", ".join(f[0] for f in found) or "none"
    raise FileNotFoundError(
        f"{raw_dir}: expected one {marker}/data/{{train,val,test}} set of LMDB "
        f"directories, found: {where} (run `python -m data_pipelines.download` first)")
  base, have = chosen[0]
  missing = set(SPLITS) - set(have)
  if missing:
    raise FileNotFoundError(f"{base}: split(s) {sorted(missing)} missing")
  return {s: os.path.join(base, s) for s in SPLITS}


def list_lmdb_items(split_dirs: dict[str, str], extra: tuple,
                    group_of) -> list[WorkItem]:
  """One WorkItem per LMDB entry; asserts that `group_of(id)` never spans splits."""
  items, owner = [], {}
  for split, path in split_dirs.items():
    ds = atom3d_lmdb.LMDBDataset(path)
    ids = ds.ids()
    n = len(ds)
    ds.close()  # workers reopen it: an LMDB environment must not cross a fork
    for item_id in ids:
      key = group_of(item_id)
      if owner.setdefault(key, split) != split:
        raise ValueError(f"{key!r} occurs in both {owner[key]} and {split} "
                         f"({path}): the splits leak")
    items += [WorkItem(f"{path}#{i}", split, (path, i) + extra)
              for i in range(n)]
  return items


def read_lmdb_item(item: WorkItem) -> dict:
  path, index = item.payload[:2]
  try:
    return atom3d_lmdb.LMDBDataset(path)[index]
  except (atom3d_lmdb.LMDBFormatError, ValueError, KeyError) as e:
    raise SkipItem(f"{item.source}: unreadable item ({e})") from e


def structure_from_table(table: atom3d_lmdb.AtomTable, where: str) -> structure.Structure:
  """An ATOM3D atoms table read as one model (`atom_rows.structure_from_atoms`)."""
  def column(name, default):
    return table[name] if name in table else np.full(len(table), default)
  try:
    return atom_rows.structure_from_atoms(
        table["chain"], table["residue"], column("insertion_code", ""),
        table["resname"], table["name"], table["element"], table.coords,
        hetero=column("hetero", " "), occupancies=column("occupancy", 1.0), name=where)
  except structure.StructureError as e:
    raise SkipItem(str(e), kind="no amino-acid residue with a CA") from e


def dropped_counts(st: structure.Structure, prefix: str) -> dict[str, int]:
  """What the structure rules left out of `st`, as manifest `dropped` counts."""
  return {f"{prefix}{k}": st.stats[k] for k in structure.DROPPED_STATS if st.stats[k]}


def ligand_from_table(table: atom3d_lmdb.AtomTable, where: str) -> structure.Ligand:
  """The ligand's heavy atoms as one `Ligand` (elements upper case)."""
  elements = np.char.upper(np.char.strip(table["element"].astype(str)))
  heavy = ~np.isin(elements, ("H", "D"))
  if not heavy.any():
    raise SkipItem(f"{where}: ligand has no heavy atoms", kind="ligand without heavy atoms")
  return structure.Ligand(name="LIG", chain_id="LIG", residue_number=0,
                          elements=[str(e) for e in elements[heavy]],
                          positions=table.coords[heavy].astype(np.float32))


def pocket_in_full_chains(pocket: list[structure.Chain], full: list[structure.Chain],
                          where: str) -> tuple[list[structure.Chain], list[np.ndarray]]:
  """Full chains that hold pocket residues, and each pocket residue's index in them.

  Returns:
    (full chains, in pocket chain order; [per chain] int32[n_pocket] indices).
  """
  by_id = {c.chain_id: c for c in full}
  chains, indices = [], []
  for pc in pocket:
    fc = by_id.get(pc.chain_id)
    if fc is None:
      raise SkipItem(f"{where}: pocket chain {pc.chain_id!r} not in atoms_protein",
                     kind="pocket chain not in atoms_protein")
    lookup = {(int(n), str(i)): k for k, (n, i) in
              enumerate(zip(fc.residue_number, fc.insertion_code))}
    idx = []
    for n, i, letter in zip(pc.residue_number, pc.insertion_code, pc.sequence):
      k = lookup.get((int(n), str(i)))
      if k is None or fc.sequence[k] != letter:
        raise SkipItem(f"{where}: pocket residue {pc.chain_id}:{n}{i}{letter} has no "
                       "matching residue in atoms_protein",
                       kind="pocket residue not in atoms_protein")
      idx.append(k)
    chains.append(fc)
    indices.append(np.asarray(idx, np.int32))
  return chains, indices


# The ATOM3D paper's split sizes. For the 60% split the released LMDB reportedly holds
# fewer (3,563 train / 452 test, unverified): the printed difference says which.
REFERENCE_COUNTS = {
    30: ReferenceCounts(source="ATOM3D (Townshend et al. 2021), LBA 30% identity",
                        unit="complexes", by="split",
                        counts={"train": 3507, "val": 466, "test": 490}),
    60: ReferenceCounts(source="ATOM3D (Townshend et al. 2021), LBA 60% identity; the "
                        "released LMDB reportedly differs", unit="complexes", by="split",
                        counts={"train": 3678, "val": 460, "test": 460}),
}


def add_pocket_arguments(parser: argparse.ArgumentParser) -> None:
  tasks.add_once(parser, "--pocket-hetero", choices=POCKET_HETERO, default="keep",
            help="the pocket's hetero groups (metal ions, cofactors): keep = heavy atoms "
                 "as element-typed nodes like the ligand's (ATOM3D's baselines featurise "
                 "every pocket atom), drop = leave them out (counted in the manifest)")


class LBATask:
  """Preprocessing task (data_pipelines.tasks protocol) for one LBA split archive."""

  def __init__(self, identity: int):
    self.identity = identity
    self.name = f"lba{identity}"
    self.description = (f"ATOM3D LBA, {identity}% identity split; pocket residues + "
                        "ligand atoms; graph_label = pK.")
    self.marker = f"split-by-sequence-identity-{identity}"
    self.reference_counts = REFERENCE_COUNTS.get(identity)

  def add_arguments(self, parser: argparse.ArgumentParser) -> None:
    tasks.add_graph_arguments(parser)
    add_pocket_arguments(parser)

  def list_items(self, raw_dir: str, args: argparse.Namespace | None = None
                 ) -> list[WorkItem]:
    extra = (*tasks.graph_arguments(args), getattr(args, "pocket_hetero", None) or "keep")
    dirs = find_split_dirs(raw_dir, self.marker)
    return list_lmdb_items(dirs, extra, group_of=lambda i: str(i).lower())

  def process(self, item: WorkItem):
    from bihier_jax.data import featurize
    cutoff, max_neighbors, pocket_hetero = item.payload[2:5]
    record = read_lmdb_item(item)
    where = f"{item.source} ({record.get('id')})"
    for key in ("atoms_protein", "atoms_pocket", "atoms_ligand", "scores"):
      if key not in record:
        raise SkipItem(f"{where}: missing {key}", kind=f"missing {key}")
    try:
      label = float(record["scores"]["neglog_aff"])
    except (KeyError, TypeError, ValueError) as e:
      raise SkipItem(f"{where}: no neglog_aff score ({e})", kind="no neglog_aff score") from e
    pocket = structure_from_table(record["atoms_pocket"], f"{where} atoms_pocket")
    protein = structure_from_table(record["atoms_protein"], f"{where} atoms_protein")
    full, indices = pocket_in_full_chains(pocket.chains, protein.chains, where)
    ligand = ligand_from_table(record["atoms_ligand"], where)
    hetero = pocket.ligands
    dropped = {**dropped_counts(pocket, "pocket_"), **dropped_counts(protein, "protein_")}
    n_hetero = sum(len(h.elements) for h in hetero)
    if pocket_hetero == "drop":
      dropped["pocket_hetero_atoms"] = n_hetero
    notes = {"pocket_hetero": [f"{h.name}:{h.chain_id}{h.residue_number}"
                               for h in hetero]} if hetero else {}
    example = featurize.example_from_chains(
        str(record["id"]), pocket.chains,
        ligands=(ligand,) + (tuple(hetero) if pocket_hetero == "keep" else ()),
        cutoff=cutoff, max_neighbors=max_neighbors, graph_label=label)
    # ESM reads the whole chains; pocket nodes point into them.
    example.sequences = [c.sequence for c in full]
    example.residue_index = np.concatenate(indices).astype(np.int32)
    return Processed([example], dropped=dropped, notes=notes)


LBA30 = LBATask(30)
LBA60 = LBATask(60)
