"""Atom rows (ATOM3D tables, IEConv HDF5 arrays) -> per-chain residue arrays.

ATOM3D items and react's HDF5 files hold atoms as flat arrays, not structure files, so
they cannot go through `common.structure.parse_structure`. This module groups atoms
into residues and chains and lays each residue out in `residue_constants.ATOM_NAMES`
slots (N, CA, C, O, CB, then the χ-defining atoms of `CHI_ATOMS`), which is the layout
`common.structure.Chain` uses.

Policy (the same as for structure files): a residue is an amino acid (standard, or a
modified residue mapped to its parent by `residue_constants.one_letter`) that has a CA;
hydrogens are ignored; the first atom of a given name wins (altlocs were already
resolved upstream); residues and chains keep file order.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from bihier_jax.common import residue_constants as rc
from bihier_jax.common import structure

# Modified residues whose side-chain atoms are named differently from the parent's
# (the same rule as common.structure: MSE's SE is MET's SD).
_SIDECHAIN_RENAMES = {"MSE": {"SE": "SD"}}


def select_residues(chain: structure.Chain, rows) -> structure.Chain:
  """The residues `rows` (bool mask or indices, in order) of `chain`, as a new Chain."""
  rows = np.asarray(rows)
  if rows.dtype == bool:
    rows = np.nonzero(rows)[0]
  return dataclasses.replace(
      chain, residue_names=[chain.residue_names[i] for i in rows],
      sequence="".join(chain.sequence[i] for i in rows), aatype=chain.aatype[rows],
      residue_number=chain.residue_number[rows],
      insertion_code=chain.insertion_code[rows],
      atom_positions=chain.atom_positions[rows], atom_mask=chain.atom_mask[rows],
      is_modified=chain.is_modified[rows])


def slot_of(resname: str, atom_name: str) -> int | None:
  """Layout slot of an atom name in a residue, or None if the layout has no slot."""
  if atom_name in ("N", "CA", "C", "O", "CB"):
    return rc.ATOM_SLOT[atom_name]
  atom_name = _SIDECHAIN_RENAMES.get(resname, {}).get(atom_name, atom_name)
  parent = rc.MODIFIED_TO_PARENT.get(resname, resname)
  chi_atoms = rc.CHI_ATOMS.get(parent, ())
  if atom_name in chi_atoms:
    return 5 + chi_atoms.index(atom_name)
  return None


def chains_from_atoms(chain_ids: Sequence[str], residue_numbers: Sequence[int],
                      insertion_codes: Sequence[str], resnames: Sequence[str],
                      atom_names: Sequence[str], elements: Sequence[str],
                      coords: np.ndarray, *, residue_keys: Sequence | None = None,
                      model_index: int = 0) -> list[structure.Chain]:
  """Group flat atom rows into chains of amino-acid residues.

  Args:
    chain_ids, residue_numbers, insertion_codes, resnames, atom_names, elements: [a]
      per-atom columns (strings are stripped; element "H"/"D" rows are skipped).
    coords: float[a, 3] Å.
    residue_keys: optional [a] extra per-atom key that separates residues (e.g. the
      hetero flag, or react's amino id); defaults to (chain, number, icode).

  Returns:
    Chains in order of first appearance, each with its residues in file order.
  """
  coords = np.asarray(coords, dtype=np.float64)
  chains: dict[str, list] = {}
  current_key = None
  residue = None
  for i in range(len(atom_names)):
    element = str(elements[i]).strip().upper()
    if element in ("H", "D"):
      continue
    chain = str(chain_ids[i]).strip()
    number = int(residue_numbers[i])
    icode = str(insertion_codes[i]).strip()
    resname = str(resnames[i]).strip().upper()
    key = (chain, number, icode, resname,
           None if residue_keys is None else residue_keys[i])
    if key != current_key:
      current_key = key
      letter = rc.one_letter(resname)
      if letter is None:
        residue = None
      else:
        residue = {"resname": resname, "letter": letter, "number": number,
                   "icode": icode, "pos": np.zeros([rc.NUM_ATOM_SLOTS, 3]),
                   "mask": np.zeros([rc.NUM_ATOM_SLOTS], bool)}
        chains.setdefault(chain, []).append(residue)
    if residue is None:
      continue
    slot = slot_of(resname, str(atom_names[i]).strip().upper())
    if slot is not None and not residue["mask"][slot]:
      residue["pos"][slot] = coords[i]
      residue["mask"][slot] = True
  out = []
  for chain, residues in chains.items():
    residues = [r for r in residues if r["mask"][rc.ATOM_SLOT["CA"]]]
    if not residues:
      continue
    sequence = "".join(r["letter"] for r in residues)
    out.append(structure.Chain(
        chain_id=chain, model_index=model_index,
        residue_names=[r["resname"] for r in residues], sequence=sequence,
        aatype=np.array([rc.restype_index(c) for c in sequence], np.int32),
        residue_number=np.array([r["number"] for r in residues], np.int32),
        insertion_code=np.array([r["icode"] for r in residues], dtype=str),
        atom_positions=np.stack([r["pos"] for r in residues]).astype(np.float32),
        atom_mask=np.stack([r["mask"] for r in residues]),
        is_modified=np.array([rc.MODIFIED_TO_PARENT.get(r["resname"]) is not None
                              for r in residues])))
  return out
