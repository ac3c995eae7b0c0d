"""Atom rows (ATOM3D atom tables) -> a `common.structure.Structure`.

ATOM3D items hold atoms as flat tables, not structure files. This module puts the rows
into a gemmi structure (ATOM records for rows whose `hetero` flag is blank, HETATM for
the rest, chains and residues in row order) and reads it with
`common.structure.structure_from_gemmi`, so atom tables follow exactly the rules of
structure files: one residue-typing rule (`structure.residue_kind`: the project's
tables, then gemmi's, so CAS or YCM are cysteines), unknown polymer residues with a CA
as X, non-polymer groups (ions, cofactors) as `Ligand`s, waters and hydrogens dropped,
and every drop counted in `Structure.stats`.

Biopython (which wrote the tables) already resolved alternate locations, so each atom
appears once; a repeated atom name keeps its first row.
"""

from __future__ import annotations

from typing import Sequence

import gemmi
import numpy as np

from bihier_jax.common import structure


def _element(symbol: str) -> gemmi.Element:
  symbol = symbol.strip()
  return gemmi.Element(symbol.capitalize() if symbol else "X")


def structure_from_atoms(chain_ids: Sequence[str], residue_numbers: Sequence[int],
                         insertion_codes: Sequence[str], resnames: Sequence[str],
                         atom_names: Sequence[str], elements: Sequence[str],
                         coords: np.ndarray, *, hetero: Sequence[str] | None = None,
                         occupancies: Sequence[float] | None = None,
                         name: str = "<atoms>") -> structure.Structure:
  """Reads flat atom rows as one model of a structure.

  Args:
    chain_ids, residue_numbers, insertion_codes, resnames, atom_names, elements: [a]
      per-atom columns (strings are stripped; element "H"/"D" rows are counted in
      `stats["hydrogens"]` and left out).
    coords: float[a, 3] Å.
    hetero: [a] Biopython hetero flags (" " standard residue, "W" water, "H_<RES>"
      other); None reads every row as an ATOM record.
    occupancies: [a]; 1 if None.
    name: how errors and `Structure.source` name the table.

  Returns:
    A `Structure` (chains in order of first appearance, residues in row order).

  Raises:
    structure.StructureError: no amino-acid residue with a CA.
  """
  coords = np.asarray(coords, dtype=np.float64)
  model = gemmi.Model("1")
  chain = residue = None
  key = None
  hydrogens = 0
  for i in range(len(atom_names)):
    element = str(elements[i]).strip().upper()
    if element in ("H", "D"):
      hydrogens += 1
      continue
    chain_id = str(chain_ids[i]).strip()
    flag = " " if hetero is None else str(hetero[i]).strip() or " "
    row_key = (chain_id, flag, int(residue_numbers[i]),
               str(insertion_codes[i]).strip(), str(resnames[i]).strip().upper())
    if row_key != key:
      if residue is not None:
        chain.add_residue(residue)
      if chain is None or chain.name != chain_id:
        if chain is not None:
          model.add_chain(chain)
        chain = gemmi.Chain(chain_id)
      key = row_key
      residue = gemmi.Residue()
      residue.name = row_key[4]
      residue.seqid = gemmi.SeqId(row_key[2], row_key[3] or " ")
      residue.het_flag = "A" if flag == " " else "H"
    atom = gemmi.Atom()
    atom.name = str(atom_names[i]).strip().upper()
    atom.element = _element(element)
    atom.pos = gemmi.Position(*coords[i])
    atom.occ = 1.0 if occupancies is None else float(occupancies[i])
    residue.add_atom(atom)
  if residue is not None:
    chain.add_residue(residue)
    model.add_chain(chain)
  st = gemmi.Structure()
  st.add_model(model)
  return structure.structure_from_gemmi(st, 0, name=name,
                                        stats={"hydrogens": hydrogens})
