"""Protein structure files (PDB, mmCIF, and their .gz/.bz2/.xz forms) -> per-chain
residue arrays, read with gemmi.

`parse_structure(source)` and `structure_from_gemmi(st)` give a `Structure` of `Chain`s
(residue types, atom positions in Å in `residue_constants.ATOM_NAMES` order, masks,
author numbering, flags) and `Ligand`s, with `stats` counting everything dropped
(`DROPPED_STATS`). `residue_kind` is the one residue-typing rule of every input path;
`sniff_format` and `decompress` decide a file's format from its content; bad input is a
`StructureError` naming the file. The rules (models, altlocs, hydrogens, waters, chains,
unknown and modified residues, HETATM amino acids, backbone completeness):
docs/structures.md.
"""

from __future__ import annotations

import bz2
import dataclasses
import functools
import gzip
import lzma
import os
from typing import Sequence

import gemmi
import numpy as np

from bihier_jax.common import residue_constants as rc


_CA_SLOT = rc.ATOM_SLOT["CA"]
_NO_NUMBER = -(2**31)  # a ligand listed without a residue number
_BACKBONE_SLOTS = frozenset(rc.ATOM_SLOT[a] for a in rc.BACKBONE_ATOMS)
_BACKBONE_SLOT_LIST = [rc.ATOM_SLOT[a] for a in rc.BACKBONE_ATOMS]


def incomplete_backbone(atom_mask: np.ndarray) -> np.ndarray:
  """bool[n]: residues of an [n, NUM_ATOM_SLOTS] atom mask lacking N, CA, C or O."""
  mask = np.asarray(atom_mask, bool)
  return ~mask[:, _BACKBONE_SLOT_LIST].all(axis=-1)


class StructureError(ValueError):
  """A structure file cannot be used; the message names the file and the reason."""


class ModelNotFoundError(StructureError):
  """The requested model index is beyond the file's models (`num_models` of them)."""

  def __init__(self, message: str, num_models: int):
    super().__init__(message)
    self.num_models = num_models


# Water names of crystallography (gemmi knows these) and of MD force fields (it does not).
WATER_NAMES = frozenset({
    "HOH", "WAT", "H2O", "DOD", "D2O", "TIP", "TIP3", "TIP4", "TIP5", "TP3", "T3P",
    "T4P", "T5P", "SOL", "SPC", "SPCE", "OH2"})

# Modified residues whose side-chain atoms are named differently from the parent's.
_SIDECHAIN_RENAMES = {"MSE": {"SE": "SD"}}

_STAT_KEYS = (
    "residues", "chains", "ligands", "residues_without_ca", "hydrogens", "waters",
    "nucleic_chains", "altlocs_resolved", "modified_residues", "unknown_residues",
    "non_amino_acid_residues", "incomplete_backbone", "hetatm_amino_acids")
# The stats that count something left out of the chains (the rest count what was kept
# or changed): preprocessing reports these per item as `dropped`.
DROPPED_STATS = ("hydrogens", "waters", "altlocs_resolved", "residues_without_ca",
                 "non_amino_acid_residues", "nucleic_chains")


@dataclasses.dataclass
class Chain:
  """One protein chain of one model, residues in file order.

  Attributes:
    chain_id: author chain id.
    model_index: 0-based index of the model it was read from.
    residue_names: [n] residue names as in the file (e.g. "MSE").
    sequence: one-letter sequence, length n (parent letter for modified residues, X for
      unknown).
    aatype: int32[n] index into `residue_constants.RESTYPES`.
    residue_number: int32[n] author residue number.
    insertion_code: str array [n], "" if none.
    atom_positions: float32[n, 9, 3] Å, layout `residue_constants.ATOM_NAMES`; 0 if
      absent.
    atom_mask: bool[n, 9] atom present.
    is_modified: bool[n] modified residue mapped to its parent.
  """
  chain_id: str
  model_index: int
  residue_names: list[str]
  sequence: str
  aatype: np.ndarray
  residue_number: np.ndarray
  insertion_code: np.ndarray
  atom_positions: np.ndarray
  atom_mask: np.ndarray
  is_modified: np.ndarray

  @property
  def num_residues(self) -> int:
    return int(self.aatype.shape[0])

  @property
  def incomplete_backbone(self) -> np.ndarray:
    """bool[n]: residues lacking N, C or O (CA is always present)."""
    return incomplete_backbone(self.atom_mask)


@dataclasses.dataclass
class Ligand:
  """One non-polymer residue (ligand, ion, sugar), heavy atoms only.

  Attributes:
    name: residue name.
    chain_id: author chain id it is listed under.
    residue_number: author residue number.
    elements: [m] element symbols, upper case ("C", "CL", "ZN").
    positions: float32[m, 3] Å.
  """
  name: str
  chain_id: str
  residue_number: int
  elements: list[str]
  positions: np.ndarray


@dataclasses.dataclass
class Structure:
  """The protein chains and ligands of one model of a structure file.

  `stats` counts what the rules above dropped or changed (keys in `_STAT_KEYS`);
  `residues_without_ca` names the residues dropped for lacking a CA, as
  (chain id, residue number, insertion code, residue name) in file order.
  """
  source: str
  chains: list[Chain]
  ligands: list[Ligand]
  stats: dict[str, int]
  residues_without_ca: list[tuple[str, int, str, str]] = dataclasses.field(
      default_factory=list)

  @property
  def num_residues(self) -> int:
    return sum(c.num_residues for c in self.chains)


@dataclasses.dataclass(frozen=True)
class _ResidueKind:
  """How a residue name is typed: amino acid (with letter, slots) or something else."""
  is_amino_acid: bool
  is_nucleotide: bool
  letter: str  # one-letter (parent) code, "X" unknown; "" if not an amino acid
  is_modified: bool
  slots: dict  # atom name -> layout slot
  restype: int = rc.UNKNOWN_RESTYPE  # index into RESTYPES

  @functools.cached_property
  def slot_items(self) -> tuple:
    return tuple(self.slots.items())


def _slots_for(parent3: str, resname: str) -> dict[str, int]:
  slots = {name: rc.ATOM_SLOT[name] for name in ("N", "CA", "C", "O", "CB")}
  for k, atom in enumerate(rc.CHI_ATOMS.get(parent3, ())):
    slots[atom] = 5 + k
  for file_name, parent_name in _SIDECHAIN_RENAMES.get(resname, {}).items():
    slots[file_name] = slots.pop(parent_name)
  return slots


_KIND_CACHE: dict[str, _ResidueKind] = {}


def residue_kind(resname: str) -> _ResidueKind:
  """How a residue name is typed: this module's tables, then gemmi's (cached)."""
  kind = _KIND_CACHE.get(resname)
  if kind is None:
    kind = _KIND_CACHE[resname] = _type_residue(resname)
  return kind


def _type_residue(resname: str) -> _ResidueKind:
  name = resname.strip().upper()
  parent = rc.MODIFIED_TO_PARENT.get(name, name)
  if parent in rc.THREE_TO_ONE:
    letter = rc.THREE_TO_ONE[parent]
    return _ResidueKind(True, False, letter, parent != name, _slots_for(parent, name),
                        rc.restype_index(letter))
  info = gemmi.find_tabulated_residue(name)
  if info is not None and info.is_amino_acid():
    code = info.one_letter_code
    # gemmi writes a modified residue's parent letter in lower case ("m" for MSE).
    letter = code.upper() if code.strip() and code.upper() in rc.STANDARD_AA else "X"
    parent3 = next((k for k, v in rc.THREE_TO_ONE.items() if v == letter), "UNK")
    return _ResidueKind(True, False, letter, letter != "X", _slots_for(parent3, name),
                        rc.restype_index(letter))
  if info is not None and info.is_nucleic_acid():
    return _ResidueKind(False, True, "", False, {})
  return _ResidueKind(False, False, "", False, {})


# A polymer residue of unknown name that has a CA: an unknown amino acid (X).
UNKNOWN_AMINO_ACID = _ResidueKind(True, False, "X", False, _slots_for("UNK", "UNK"))


# Compressions by their magic bytes: the content decides, never the file name.
_DECOMPRESSORS = {b"\x1f\x8b": ("gzip", gzip.decompress),
                  b"BZh": ("bzip2", bz2.decompress),
                  b"\xfd7zXZ\x00": ("xz", lzma.decompress)}
_UNREAD_CONTAINERS = {b"PK\x03\x04": "a zip archive: unpack it first",
                      b"\x28\xb5\x2f\xfd": "zstd-compressed: decompress it first (zstd -d)",
                      b"\x89HDF": "an HDF5 file, not a structure file"}
# Record names that open a PDB-format file (wwPDB format v3.3) when no ATOM/HETATM
# record comes early: a header-only file reads as PDB and then fails as "no atoms".
_PDB_RECORDS = frozenset({
    "HEADER", "OBSLTE", "TITLE", "SPLIT", "CAVEAT", "COMPND", "SOURCE", "KEYWDS",
    "EXPDTA", "NUMMDL", "MDLTYP", "AUTHOR", "REVDAT", "SPRSDE", "JRNL", "REMARK",
    "DBREF", "DBREF1", "DBREF2", "SEQADV", "SEQRES", "MODRES", "HET", "HETNAM",
    "HETSYN", "FORMUL", "HELIX", "SHEET", "SSBOND", "LINK", "CISPEP", "SITE", "CRYST1",
    "ORIGX1", "SCALE1", "MTRIX1", "MODEL", "ATOM", "HETATM", "ANISOU", "TER"})
_SNIFF_LINES = 64


def decompress(data: bytes, name: str) -> bytes:
  """The plain bytes of a file that may be gzip, bzip2 or xz compressed.

  Raises:
    StructureError: a truncated or corrupt compressed stream (never read in part), or a
      container this reader does not open (zip, zstd).
  """
  for magic, (kind, decompress_fn) in _DECOMPRESSORS.items():
    if data.startswith(magic):
      try:
        return decompress_fn(data)
      except (EOFError, OSError, ValueError, lzma.LZMAError) as e:
        raise StructureError(f"{name}: truncated or corrupt {kind} stream ({e}); "
                             "nothing of it was read") from e
  for magic, what in _UNREAD_CONTAINERS.items():
    if data.startswith(magic):
      raise StructureError(f"{name}: {what}")
  return data


def sniff_format(text: str) -> str | None:
  """'cif', 'pdb', or None for text that is neither, from its first lines."""
  lines = 0
  for line in text.splitlines():
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
      continue  # blank lines; mmCIF comments
    if stripped.startswith("data_"):
      return "cif"
    if line[:6].rstrip() in _PDB_RECORDS:
      return "pdb"
    lines += 1
    if lines >= _SNIFF_LINES:
      break
  return None


def _read_gemmi(source, fmt: str | None, name: str) -> gemmi.Structure:
  """Reads a path or bytes into a gemmi.Structure; raises StructureError.

  The format comes from the content (after any decompression), not the file name:
  `fmt` ("pdb" | "cif") overrides it.
  """
  if isinstance(source, (bytes, bytearray)):
    data = bytes(source)
  else:
    if not os.path.exists(source):
      raise StructureError(f"{name}: file not found")
    if os.path.isdir(source):
      raise StructureError(f"{name}: a directory, not a structure file")
    try:
      with open(source, "rb") as f:
        data = f.read()
    except OSError as e:
      raise StructureError(f"{name}: cannot read ({e.strerror or e})") from e
  if not data:
    raise StructureError(f"{name}: empty file")
  data = decompress(data, name)
  if not data.strip():
    raise StructureError(f"{name}: empty file (after decompression)")
  if b"\x00" in data[:4096]:
    raise StructureError(f"{name}: binary content, not a PDB or mmCIF text file")
  text = data.decode("utf-8", errors="replace")
  if fmt is not None:
    fmt = {"mmcif": "cif", "ent": "pdb", "pdbx": "cif"}.get(fmt.lower(), fmt.lower())
  fmt = fmt or sniff_format(text)
  if fmt is None:
    first = next((l.strip() for l in text.splitlines() if l.strip()), "")[:40]
    raise StructureError(f"{name}: not a PDB or mmCIF file (first line: {first!r})")
  try:
    if fmt == "cif":
      doc = gemmi.cif.read_string(text)
      return gemmi.make_structure_from_block(doc.sole_block())
    return gemmi.read_pdb_string(text)
  except (RuntimeError, ValueError, OSError, EOFError, IndexError, KeyError) as e:
    raise StructureError(f"{name}: cannot parse ({type(e).__name__}: {e})") from e


def parse_structure(source: str | os.PathLike | bytes, model_index: int = 0, *,
                    format: str | None = None, name: str | None = None,
                    hetatm_amino_acids: bool = False) -> Structure:
  """Reads the protein chains and ligands of one model of a structure file.

  Args:
    source: path to a .pdb/.ent/.cif/.mmcif file (optionally .gz; other names, e.g.
      assemblies "1abc.pdb1.gz", are recognised by content), or the file's bytes.
    model_index: 0-based model to read (the first by default).
    format: "pdb" or "cif" to override detection from the extension / content.
    name: how errors and `Structure.source` name the input (default: the path).
    hetatm_amino_acids: keep standard amino acids outside the polymer (HETATM after
      TER) that have a CA as residues of their chain (ScanNet's rule), not ligands.

  Returns:
    A `Structure` with at least one protein chain.

  Raises:
    StructureError: unreadable, empty, or without protein residues (message names the
      file and the reason); `ModelNotFoundError` for a model beyond the file's.
  """
  if not isinstance(source, (bytes, bytearray)):
    source = os.fspath(source)
  name = name or (source if isinstance(source, str) else "<bytes>")
  st = _read_gemmi(source, format, name)
  return structure_from_gemmi(st, model_index, name=name,
                              hetatm_amino_acids=hetatm_amino_acids)


def structure_from_gemmi(st: gemmi.Structure, model_index: int = 0, *, name: str,
                         hetatm_amino_acids: bool = False,
                         stats: dict[str, int] | None = None) -> Structure:
  """The rules of this module applied to one model of a gemmi structure (modified).

  Args:
    st: the structure (entity typing and chain-part merging change it in place).
    model_index, name, hetatm_amino_acids: as for `parse_structure`.
    stats: counts already made by the caller (e.g. hydrogens it left out), added to.
  """
  if len(st) == 0:
    raise StructureError(f"{name}: no atoms (empty or not a structure file)")
  if not 0 <= model_index < len(st):
    raise ModelNotFoundError(
        f"{name}: model {model_index} requested, file has {len(st)}", len(st))
  model = st[model_index]
  stats = {**dict.fromkeys(_STAT_KEYS, 0), **(stats or {})}
  n_sites = model.count_atom_sites()
  if n_sites == 0:
    raise StructureError(f"{name}: no atoms in model {model_index}")
  model.remove_hydrogens()  # C++ side; also removes deuterium
  stats["hydrogens"] += n_sites - model.count_atom_sites()
  # Entity typing needs the whole structure; only one model is read below.
  st.setup_entities()
  st.merge_chain_parts()
  model = st[model_index]

  chains, ligands, without_ca = [], [], []
  for gchain in model:
    chain, chain_ligands = _read_chain(gchain, model_index, stats, name,
                                       hetatm_amino_acids, without_ca)
    ligands.extend(chain_ligands)
    if chain is not None:
      chains.append(chain)
  stats["chains"] = len(chains)
  stats["ligands"] = len(ligands)
  stats["residues"] = sum(c.num_residues for c in chains)
  stats["incomplete_backbone"] = sum(int(c.incomplete_backbone.sum()) for c in chains)
  if not chains:
    reason = ("only nucleic-acid chains" if stats["nucleic_chains"] else
              "ligands/water only" if ligands or stats["waters"] else
              "no amino-acid residues with CA")
    raise StructureError(f"{name}: no protein chain in model {model_index} ({reason})")
  return Structure(source=name, chains=chains, ligands=ligands, stats=stats,
                   residues_without_ca=without_ca)


def _ligand_atoms(residue: gemmi.Residue, stats: dict):
  """Heavy atoms of a ligand, highest-occupancy conformer per atom name (ties: first).

  Returns ([element], [[x, y, z]]).
  """
  best = {}
  for atom in residue:
    atom_name = atom.name
    prev = best.get(atom_name)
    if prev is not None:
      stats["altlocs_resolved"] += 1
      if atom.occ <= prev[0]:
        continue
    best[atom_name] = (atom.occ, atom.element.name.upper(), atom.pos.tolist())
  return [e for _, e, _ in best.values()], [p for _, _, p in best.values()]


def _slot_atoms(residue: gemmi.Residue, slot_items: tuple, stats: dict):
  """Layout atoms of an amino-acid residue, highest-occupancy conformer per atom.

  Args:
    slot_items: ((atom name, slot), ...) of the residue type.

  Returns:
    (slots [k], flat coordinates [3k], CA occupancy or None). Ties keep the first
    conformer in the file (as does a duplicated atom name without altloc flags).
  """
  slots, coords = [], []
  ca_occ = None
  find_atom = residue.find_atom
  for atom_name, slot in slot_items:
    # C++ lookup of the first conformer; the slow path only where altlocs exist.
    atom = find_atom(atom_name, "*")
    if atom is None:
      continue
    if atom.has_altloc():
      return _slot_atoms_altloc(residue, dict(slot_items), stats)
    slots.append(slot)
    coords += atom.pos.tolist()
    if slot == _CA_SLOT:
      ca_occ = atom.occ
  return slots, coords, ca_occ


def _slot_atoms_altloc(residue: gemmi.Residue, slot_of: dict, stats: dict):
  """`_slot_atoms` for a residue with alternate locations: visits every atom."""
  best = {}
  for atom in residue:
    slot = slot_of.get(atom.name)
    if slot is None:
      continue
    prev = best.get(slot)
    if prev is not None:
      stats["altlocs_resolved"] += 1
      if atom.occ <= prev[0]:
        continue
    best[slot] = (atom.occ, atom.pos.tolist())
  return _from_slot_dict(best)


def _from_slot_dict(best: dict):
  """{slot: (occupancy, xyz)} -> (slots, flat coordinates, CA occupancy or None)."""
  slots = list(best)
  coords = [x for _, xyz in best.values() for x in xyz]
  ca = best.get(_CA_SLOT)
  return slots, coords, None if ca is None else ca[0]


def _merge_microheterogeneity(first, second):
  """Second residue type wins; it keeps the first's backbone atoms it lacks."""
  best = {slot: (0.0, first[1][3 * k:3 * k + 3]) for k, slot in enumerate(first[0])
          if slot in _BACKBONE_SLOTS}
  best.update({slot: (0.0, second[1][3 * k:3 * k + 3])
               for k, slot in enumerate(second[0])})
  slots, coords, _ = _from_slot_dict(best)
  return slots, coords, second[2]


def _read_chain(gchain: gemmi.Chain, model_index: int, stats: dict, name: str,
                hetatm_amino_acids: bool = False, without_ca: list | None = None):
  """One author chain -> (Chain or None, [Ligand]); CA-less residues go to `without_ca`."""
  chain_id = gchain.name
  ligands = []
  kept = []  # (residue name, kind, seqid, (slots, flat coords, CA occupancy))
  n_nucleotides = 0
  polymer = gemmi.EntityType.Polymer
  for residue in gchain:
    resname = residue.name
    free_amino_acid = (hetatm_amino_acids and residue.entity_type != polymer
                       and resname in rc.STANDARD_THREE_LETTER)
    if residue.entity_type != polymer and not free_amino_acid:
      if residue.is_water() or resname in WATER_NAMES:
        stats["waters"] += 1
        continue
      elements, coords = _ligand_atoms(residue, stats)
      if elements:
        ligands.append(Ligand(
            name=resname, chain_id=chain_id,
            residue_number=_NO_NUMBER if residue.seqid.num is None else residue.seqid.num,
            elements=elements, positions=np.array(coords, np.float32).reshape(-1, 3)))
      continue
    kind = residue_kind(resname)
    if kind.is_nucleotide:
      n_nucleotides += 1
      continue
    if not kind.is_amino_acid:
      if resname in WATER_NAMES:  # MD solvent typed as polymer (no TER record)
        stats["waters"] += 1
        continue
      # Unknown polymer residue: an amino acid if it has a backbone CA, else a cap etc.
      if residue.find_atom("CA", "*") is None:
        stats["non_amino_acid_residues"] += 1
        continue
      kind = UNKNOWN_AMINO_ACID
    atoms = _slot_atoms(residue, kind.slot_items, stats)
    seqid = residue.seqid
    if seqid.num is None:
      raise StructureError(f"{name}: residue {resname} of chain {chain_id!r} has no "
                           "residue number (not a PDB/mmCIF file?)")
    if kept and kept[-1][2] == seqid:
      # Microheterogeneity: two residue types at one id (gemmi gives the atoms shared by
      # both to the first); keep the one whose CA is better occupied, ties the first.
      stats["altlocs_resolved"] += 1
      prev_atoms = kept[-1][3]
      if atoms[2] is not None and atoms[2] > prev_atoms[2]:
        kept[-1] = (resname, kind, seqid, _merge_microheterogeneity(prev_atoms, atoms))
      continue
    if atoms[2] is None:
      stats["residues_without_ca"] += 1
      if without_ca is not None:
        without_ca.append((chain_id, seqid.num, seqid.icode.strip(), resname))
      continue
    stats["hetatm_amino_acids"] += free_amino_acid
    kept.append((resname, kind, seqid, atoms))

  if not kept:
    if n_nucleotides:
      stats["nucleic_chains"] += 1
    return None, ligands
  return _chain_arrays(chain_id, model_index, kept, stats), ligands


def _chain_arrays(chain_id: str, model_index: int, kept: Sequence, stats: dict) -> Chain:
  """Fills numpy arrays from the kept residues in one vectorised scatter."""
  n = len(kept)
  slots, coords, counts = [], [], []
  for _, _, _, (residue_slots, residue_coords, _) in kept:
    slots += residue_slots
    coords += residue_coords
    counts.append(len(residue_slots))
  # Index into the flattened [n * NUM_ATOM_SLOTS] layout.
  flat_slots = (np.repeat(np.arange(n) * rc.NUM_ATOM_SLOTS, counts)
                + np.array(slots, np.int64))
  positions = np.zeros([n * rc.NUM_ATOM_SLOTS, 3], np.float32)
  mask = np.zeros([n * rc.NUM_ATOM_SLOTS], bool)
  positions[flat_slots] = np.array(coords, np.float32).reshape(-1, 3)
  mask[flat_slots] = True
  kinds = [k[1] for k in kept]
  sequence = "".join([k.letter for k in kinds])
  is_modified = np.array([k.is_modified for k in kinds], bool)
  stats["modified_residues"] += int(is_modified.sum())
  stats["unknown_residues"] += sequence.count("X")
  return Chain(
      chain_id=chain_id, model_index=model_index, residue_names=[k[0] for k in kept],
      sequence=sequence, aatype=np.array([k.restype for k in kinds], np.int32),
      residue_number=np.array([k[2].num for k in kept], np.int32),
      insertion_code=np.array([k[2].icode.strip() for k in kept], dtype=str),
      atom_positions=positions.reshape(n, rc.NUM_ATOM_SLOTS, 3),
      atom_mask=mask.reshape(n, rc.NUM_ATOM_SLOTS), is_modified=is_modified)
