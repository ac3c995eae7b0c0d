"""EC reaction classification ("react"): IEConv's ProtFunct dataset, 384 classes.

Raw layout (what DIG's ECdataset reads): `ProtFunct/data/<pdb>.<chain>.hdf5` (one chain
per file) beside chain_functions.txt, unique_functions.txt (line i = class i) and the
training / validation / testing lists; the HDF5 datasets read and the residue numbers
(IEConv's 0-based rank, not author numbers): docs/tasks.md, "Raw inputs" and "react".
Public: REACT, NUM_CLASSES, find_root, read_labels, read_split, chain_from_hdf5.

Deviations from DIG's conversion (stated so comparisons can account for them):
- Atoms with `atom_amino_id == -1` (ligands, ions) are masked and counted
  (`dropped.hetero_atoms`). DIG indexes with −1, so a hetero atom named N/CA/C/CB
  overwrites the *last* residue's coordinate.
- Missing backbone atoms stay absent (mask) instead of copying the CA position.
- `amino_types == -1` (e.g. MSE) is typed by the project's one rule for residue names
  (`structure.residue_kind`: the parent letter of a modified residue, else X = 25);
  DIG always uses 25.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from bihier_jax.common import residue_constants as rc
from bihier_jax.common import structure
from data_pipelines import download, tasks
from data_pipelines.reference import ReferenceCounts
from data_pipelines.tasks import Processed, SkipItem, WorkItem

NUM_CLASSES = 384
RESIDUE_NUMBER_NOTE = (
    "IEConv's atom_residue_id: the 0-based rank of the residue among all residues of "
    "the chain file (hetero groups included), not the author residue number")
SPLIT_FILES = {"train": "training.txt", "val": "validation.txt", "test": "testing.txt"}


def find_root(raw_dir: str) -> str:
  """The ProtFunct folder (the one holding chain_functions.txt) under `raw_dir`."""
  for root, _, files in os.walk(raw_dir):
    if "chain_functions.txt" in files:
      return root
  raise FileNotFoundError(f"{raw_dir}: no ProtFunct/chain_functions.txt found "
                          "(run `python -m data_pipelines.download react` first)")


def read_labels(root: str) -> tuple[dict[str, int], list[str]]:
  """(chain name -> class index, class names) with range and count checks."""
  with open(os.path.join(root, "unique_functions.txt")) as f:
    classes = [line.strip() for line in f if line.strip()]
  labels = {}
  path = os.path.join(root, "chain_functions.txt")
  with open(path) as f:
    for n, line in enumerate(f, 1):
      line = line.strip()
      if not line:
        continue
      name, _, value = line.partition(",")
      try:
        label = int(value)
      except ValueError as e:
        raise ValueError(f"{path}:{n}: expected '<pdb>.<chain>,<class>', got {line!r}") from e
      if not 0 <= label < len(classes):
        raise ValueError(f"{path}:{n}: class {label} outside [0, {len(classes)})")
      labels[name.strip()] = label
  return labels, classes


def read_split(root: str, split: str) -> list[str]:
  with open(os.path.join(root, SPLIT_FILES[split])) as f:
    return [line.strip() for line in f if line.strip()]


def _text(values) -> np.ndarray:
  return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values],
                  dtype=str)


def chain_from_hdf5(path: str, chain_id: str) -> tuple[structure.Chain, dict[str, int]]:
  """The residues of one IEConv HDF5 chain file as a `Chain` (coordinates in Å).

  A residue is one of IEConv's (an atom named CA of element carbon). Its type is
  IEConv's `amino_types` entry, or for −1 (a name IEConv does not know) the project's
  one typing rule (`structure.residue_kind`: MSE → M, CAS → C, unknown → X). Its number
  is `atom_residue_id`, IEConv's 0-based rank over all residues of the file (hetero
  groups included), not the author number, which the file does not hold.

  Returns:
    (chain, dropped counts: "hetero_atoms" = atoms outside any residue, masked).
  """
  import h5py
  with h5py.File(path, "r") as f:
    pos = np.asarray(f["atom_pos"][0], np.float64)
    if "pos_center" in f:  # IEConv stores coordinates minus the bounding-box centre
      pos = pos + np.asarray(f["pos_center"], np.float64).reshape(1, 3)
    names = np.char.strip(_text(f["atom_names"][()]))
    amino_id = np.asarray(f["atom_amino_id"][()], np.int64)
    res_names = np.char.strip(_text(f["atom_residue_names"][()]))
    res_ids = np.asarray(f["atom_residue_id"][()], np.int64)
    amino_types = np.asarray(f["amino_types"][()], np.int64)
  n_res = len(amino_types)
  if not (len(names) == len(amino_id) == len(res_names) == len(pos)):
    raise SkipItem(f"{path}: per-atom datasets disagree in length",
                   kind="malformed HDF5 file")
  if amino_id.max(initial=-1) >= n_res:
    raise SkipItem(f"{path}: atom_amino_id up to {amino_id.max()} for {n_res} residues",
                   kind="malformed HDF5 file")
  resname = np.full([n_res], "UNK", dtype=object)
  number = np.zeros([n_res], np.int32)
  is_ca = (names == "CA") & (amino_id >= 0)
  resname[amino_id[is_ca]] = res_names[is_ca]
  number[amino_id[is_ca]] = res_ids[is_ca]
  kinds = [_kind(str(n)) for n in resname]
  positions = np.zeros([n_res, rc.NUM_ATOM_SLOTS, 3], np.float32)
  mask = np.zeros([n_res, rc.NUM_ATOM_SLOTS], bool)
  # atom_amino_id == -1 marks hetero atoms: masked here (DIG's index -1 would write them
  # onto the last residue).
  for a in np.nonzero(amino_id >= 0)[0]:
    r = amino_id[a]
    slot = kinds[r].slots.get(names[a])
    if slot is not None and not mask[r, slot]:
      positions[r, slot] = pos[a]
      mask[r, slot] = True
  sequence = "".join(rc.RESTYPES[t] if t >= 0 else k.letter
                     for t, k in zip(amino_types, kinds))
  chain = structure.Chain(
      chain_id=chain_id, model_index=0, residue_names=[str(n) for n in resname],
      sequence=sequence, aatype=np.array([rc.restype_index(c) for c in sequence], np.int32),
      residue_number=number, insertion_code=np.full([n_res], "", dtype=str),
      atom_positions=positions, atom_mask=mask,
      is_modified=np.array([k.is_modified for k in kinds], bool))
  return chain, {"hetero_atoms": int((amino_id < 0).sum())}


def _kind(resname: str):
  """`structure.residue_kind`, with a name that is no amino acid read as X: IEConv made
  it a residue because it has a carbon CA."""
  kind = structure.residue_kind(resname)
  return kind if kind.is_amino_acid else structure.UNKNOWN_AMINO_ACID


class ReactTask:
  """Preprocessing task (data_pipelines.tasks protocol) for ProtFunct."""
  name = "react"
  description = ("EC reaction classification (IEConv ProtFunct, 384 classes); "
                 "graph_label = class index.")
  # The split files' line counts (IEConv's repository; ProNet and DIG use them as is).
  reference_counts = ReferenceCounts(
      source="IEConv's ProtFunct split files", unit="chains", by="split",
      counts={split: download.REACT_LABEL_FILES[f].lines
              for split, f in SPLIT_FILES.items()})
  metadata_notes = {"residue_number": RESIDUE_NUMBER_NOTE}

  def add_arguments(self, parser: argparse.ArgumentParser) -> None:
    tasks.add_graph_arguments(parser)

  def list_items(self, raw_dir: str, args: argparse.Namespace | None = None
                 ) -> list[WorkItem]:
    root = find_root(raw_dir)
    labels, classes = read_labels(root)
    if len(classes) != NUM_CLASSES:
      raise ValueError(f"{root}/unique_functions.txt: {len(classes)} classes, "
                       f"expected {NUM_CLASSES}")
    cutoff, max_neighbors = tasks.graph_arguments(args)
    items, owner = [], {}
    for split in SPLIT_FILES:
      for name in read_split(root, split):
        if owner.setdefault(name, split) != split:
          raise ValueError(f"{name} is in both {owner[name]} and {split}")
        path = os.path.join(root, "data", f"{name}.hdf5")
        items.append(WorkItem(path, split, (path, name, labels.get(name, -1),
                                            cutoff, max_neighbors)))
    return items

  def process(self, item: WorkItem):
    from bihier_jax.data import featurize
    path, name, label, cutoff, max_neighbors = item.payload
    if label < 0:
      raise SkipItem(f"{name}: no entry in chain_functions.txt",
                     kind="no entry in chain_functions.txt")
    if not os.path.exists(path):
      raise SkipItem(f"{path}: missing HDF5 file", kind="missing HDF5 file")
    try:
      chain, dropped = chain_from_hdf5(path, chain_id=name.rpartition(".")[2])
    except (OSError, KeyError) as e:
      raise SkipItem(f"{path}: unreadable HDF5 ({e})", kind="unreadable HDF5 file") from e
    if chain.num_residues == 0:
      raise SkipItem(f"{path}: no residues", kind="no residues")
    if not chain.atom_mask[:, rc.ATOM_SLOT["CA"]].all():
      raise SkipItem(f"{path}: residue(s) without a CA atom", kind="residue without CA")
    return Processed([featurize.example_from_chains(
        name, [chain], cutoff=cutoff, max_neighbors=max_neighbors,
        graph_label=float(label))], dropped=dropped)


REACT = ReactTask()
