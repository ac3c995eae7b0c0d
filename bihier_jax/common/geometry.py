"""Backbone and side-chain torsion features of residue arrays (pure numpy, preprocessing).

Conventions: dihedrals follow IUPAC-IUB 1970 (looking along the central bond p1 -> p2, the
angle from p0 to p3, clockwise positive, in (-π, π]); an ideal α-helix has φ ≈ -57°,
ψ ≈ -47°. Backbone features follow ProNet/DIG (docs/model.md "ProNet"): per residue i,
φᵢ = (Cᵢ₋₁, Nᵢ, CAᵢ, Cᵢ), ψᵢ = (Nᵢ, CAᵢ, Cᵢ, Nᵢ₊₁), ωᵢ = (CAᵢ, Cᵢ, Nᵢ₊₁, CAᵢ₊₁), stored as
[cos φ, cos ψ, cos ω, sin φ, sin ψ, sin ω]. Unlike DIG, which runs over the flattened
batch, angles are never taken across a chain break (a C–N gap > 2 Å) and are 0 (both sin
and cos) wherever undefined. Side-chain χ1..χ4 use the atoms of
`residue_constants.CHI_ATOMS` in layout slots `CHI_SLOTS`, stored as [sin χ, cos χ].
"""

from __future__ import annotations

import numpy as np

from bihier_jax.common import residue_constants as rc

# Longest C(i-1)–N(i) distance still taken as a peptide bond (ideal 1.33 Å), Å.
PEPTIDE_BOND_MAX = 2.0

_N, _CA, _C = rc.ATOM_SLOT["N"], rc.ATOM_SLOT["CA"], rc.ATOM_SLOT["C"]
assert (_N, _CA, _C) == (0, 1, 2)  # backbone_dihedrals reads the trace as slots 0..2


def _dihedral_xy(p0, p1, p2, p3):
  """(x, y) with dihedral = atan2(y, x); x, y scaled by the same positive factor."""
  b0 = p0 - p1
  b1 = p2 - p1
  b2 = p3 - p2
  b1_norm = np.sqrt(np.sum(b1 * b1, -1, keepdims=True))
  b1 = b1 / np.where(b1_norm > 0, b1_norm, 1.0)
  # Components of b0 and b2 perpendicular to the central bond.
  v = b0 - np.sum(b0 * b1, -1, keepdims=True) * b1
  w = b2 - np.sum(b2 * b1, -1, keepdims=True) * b1
  x = np.sum(v * w, -1)
  # (b1 x v) . w, written out: np.cross is slow on many small arrays.
  y = ((b1[..., 1] * v[..., 2] - b1[..., 2] * v[..., 1]) * w[..., 0]
       + (b1[..., 2] * v[..., 0] - b1[..., 0] * v[..., 2]) * w[..., 1]
       + (b1[..., 0] * v[..., 1] - b1[..., 1] * v[..., 0]) * w[..., 2])
  return x, y


def dihedral(p0: np.ndarray, p1: np.ndarray, p2: np.ndarray,
             p3: np.ndarray) -> np.ndarray:
  """Dihedral angle p0-p1-p2-p3 in radians, (-π, π], over leading dims.

  Args:
    p0, p1, p2, p3: [..., 3] points (Å; any unit).

  Returns:
    [...] float64 angles. Degenerate input (collinear points) gives 0, not NaN.
  """
  p0, p1, p2, p3 = (np.asarray(p, np.float64) for p in (p0, p1, p2, p3))
  x, y = _dihedral_xy(p0, p1, p2, p3)
  return np.arctan2(y, x)


def _cos_sin(p0, p1, p2, p3):
  """cos and sin of the dihedral without atan2; degenerate input gives (1, 0)."""
  x, y = _dihedral_xy(p0, p1, p2, p3)
  r = np.sqrt(x * x + y * y)
  safe = r > 0
  r = np.where(safe, r, 1.0)
  return np.where(safe, x / r, 1.0), y / r


def chain_breaks(atom_positions: np.ndarray, atom_mask: np.ndarray) -> np.ndarray:
  """Residues that start a new backbone segment.

  Args:
    atom_positions: [n, A, 3] Å, layout `ATOM_NAMES`, residues of one chain in order.
    atom_mask: [n, A] atom present.

  Returns:
    bool[n]: True for residue 0, and for residue i when C(i-1)–N(i) > 2.0 Å or either
    atom is missing.
  """
  n = atom_positions.shape[0]
  breaks = np.ones([n], bool)
  if n > 1:
    gap = np.linalg.norm(
        atom_positions[1:, _N].astype(np.float64) - atom_positions[:-1, _C], axis=-1)
    bonded = (gap <= PEPTIDE_BOND_MAX) & atom_mask[1:, _N] & atom_mask[:-1, _C]
    breaks[1:] = ~bonded
  return breaks


def backbone_dihedrals(atom_positions: np.ndarray, atom_mask: np.ndarray,
                       chain_break: np.ndarray | None = None) -> np.ndarray:
  """φ, ψ, ω per residue as cos/sin features (ProNet's 6 backbone features).

  Args:
    atom_positions: [n, A, 3] Å, one chain (or several, separated by `chain_break`).
    atom_mask: [n, A] atom present.
    chain_break: bool[n] residue i starts a new segment (default: `chain_breaks`).

  Returns:
    float32[n, 6] [cos φ, cos ψ, cos ω, sin φ, sin ψ, sin ω]; 0 where an angle is
    undefined (first residue of a segment: φ; last: ψ, ω; or a missing atom).
  """
  n = atom_positions.shape[0]
  if n < 2:
    return np.zeros([n, 6], np.float32)
  if chain_break is None:
    chain_break = chain_breaks(atom_positions, atom_mask)
  # The N, CA, C trace (slots 0, 1, 2); dihedral k uses trace atoms k..k+3, so residue
  # i's φ, ψ, ω are dihedrals 3i-1, 3i, 3i+1 (DIG's flattened-trace construction).
  trace = atom_positions[:, :3].astype(np.float64).reshape(-1, 3)
  present = np.asarray(atom_mask[:, :3], bool).reshape(-1)
  cos, sin = _cos_sin(trace[:-3], trace[1:-2], trace[2:-1], trace[3:])
  # Dihedral k spans residues (k+3)//3 - 1 and (k+3)//3: undefined across a break.
  spans_break = np.asarray(chain_break, bool)[np.arange(3, 3 * n) // 3]
  ok = present[:-3] & present[1:-2] & present[2:-1] & present[3:] & ~spans_break
  out = np.zeros([2, 3 * n], np.float32)
  out[0, 1:-2] = np.where(ok, cos, 0.0)
  out[1, 1:-2] = np.where(ok, sin, 0.0)
  # [2, n, 3] -> [n, (cos φψω, sin φψω)]
  return out.reshape(2, n, 3).transpose(1, 0, 2).reshape(n, 6)


# Number of χ angles per residue type index (RESTYPES), from CHI_ATOMS.
_NUM_CHI_BY_RESTYPE = np.array(
    [len(rc.CHI_ATOMS.get(
        next((k for k, v in rc.THREE_TO_ONE.items() if v == letter), "UNK"), ()))
     for letter in rc.RESTYPES], np.int32)


def _num_chi(aatype_or_resnames) -> np.ndarray:
  arr = np.asarray(aatype_or_resnames)
  if arr.dtype.kind in "iu":
    return _NUM_CHI_BY_RESTYPE[arr]
  names = [rc.MODIFIED_TO_PARENT.get(str(r).upper(), str(r).upper()) for r in arr]
  return np.array([len(rc.CHI_ATOMS.get(r, ())) for r in names], np.int32)


def sidechain_torsions(atom_positions: np.ndarray, atom_mask: np.ndarray,
                       aatype_or_resnames) -> tuple[np.ndarray, np.ndarray]:
  """χ1..χ4 per residue as sin/cos features (ProNet's 8 side-chain features).

  Args:
    atom_positions: [n, A, 3] Å, layout `ATOM_NAMES` (slots G, D, E, Z hold the χ atoms
      of each residue type, `CHI_ATOMS`).
    atom_mask: [n, A] atom present.
    aatype_or_resnames: int[n] `RESTYPES` indices, or [n] residue names (modified names
      count as their parent).

  Returns:
    (float32[n, 8] [sin χ1..χ4, cos χ1..χ4], 0 where undefined; bool[n, 4] chi_mask:
    the residue type has χk and its four atoms are present).
  """
  n = atom_positions.shape[0]
  num_chi = _num_chi(aatype_or_resnames).reshape(n)
  slots = np.array(rc.CHI_SLOTS)  # [4, 4]
  pos = atom_positions[:, slots].astype(np.float64)  # [n, 4 chi, 4 atoms, 3]
  has_chi = np.arange(rc.NUM_CHI)[None] < num_chi[:, None]
  chi_mask = atom_mask[:, slots].all(-1) & has_chi
  cos, sin = _cos_sin(pos[..., 0, :], pos[..., 1, :], pos[..., 2, :], pos[..., 3, :])
  feats = np.concatenate([np.where(chi_mask, sin, 0.0), np.where(chi_mask, cos, 0.0)],
                         axis=-1)
  return feats.astype(np.float32), chi_mask
