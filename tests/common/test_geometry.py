"""Torsion features on constructed geometry with known angles, and against Bio.PDB."""

import gzip
import importlib.util
import os
import warnings

import numpy as np
import pytest

from bihier_jax.common import geometry
from bihier_jax.common import residue_constants as rc

vectors = pytest.importorskip("Bio.PDB.vectors")


def place(a, b, c, bond, angle, torsion):
  """NeRF (Parsons et al. 2005): atom d with |cd| = bond, ∠bcd = angle, dihedral abcd.

  Angles in degrees; IUPAC sign convention.
  """
  angle, torsion = np.radians(angle), np.radians(torsion)
  bc = (c - b) / np.linalg.norm(c - b)
  n = np.cross(b - a, bc)
  n /= np.linalg.norm(n)
  m = np.cross(n, bc)
  d2 = np.array([-bond * np.cos(angle), bond * np.sin(angle) * np.cos(torsion),
                 bond * np.sin(angle) * np.sin(torsion)])
  return c + d2[0] * bc + d2[1] * m + d2[2] * n


# Engh & Huber backbone geometry (Å, degrees).
N_CA, CA_C, C_N = 1.458, 1.525, 1.329
ANG_N_CA_C, ANG_CA_C_N, ANG_C_N_CA = 111.2, 116.2, 121.7


def build_backbone(phi, psi, omega):
  """N, CA, C of len(phi) residues from internal coordinates; [n, 3, 3] Å."""
  n_res = len(phi)
  atoms = [np.array([0.0, 0.0, 0.0]), np.array([N_CA, 0.0, 0.0])]
  atoms.append(place(np.array([0.0, 1.0, 0.0]), atoms[0], atoms[1], CA_C, ANG_N_CA_C,
                     -60.0))
  for i in range(1, n_res):
    n, ca, c = atoms[-3:]
    atoms.append(place(n, ca, c, C_N, ANG_CA_C_N, psi[i - 1]))  # N_i
    atoms.append(place(ca, c, atoms[-1], N_CA, ANG_C_N_CA, omega[i - 1]))  # CA_i
    atoms.append(place(c, atoms[-2], atoms[-1], CA_C, ANG_N_CA_C, phi[i]))  # C_i
  return np.array(atoms).reshape(n_res, 3, 3)


def to_layout(backbone):
  positions = np.zeros([backbone.shape[0], rc.NUM_ATOM_SLOTS, 3], np.float32)
  mask = np.zeros([backbone.shape[0], rc.NUM_ATOM_SLOTS], bool)
  positions[:, :3] = backbone
  mask[:, :3] = True
  return positions, mask


def angles_from_features(feats):
  """[n, 6] [cos φψω, sin φψω] -> degrees [n, 3]."""
  return np.degrees(np.arctan2(feats[:, 3:], feats[:, :3]))


def test_right_angle_dihedral_sign():
  p0, p1, p2 = np.array([1.0, 0, 0]), np.zeros(3), np.array([0, 0, 1.0])
  assert geometry.dihedral(p0, p1, p2, np.array([0, 1.0, 0])) == pytest.approx(np.pi / 2)
  down, back = np.array([0, -1.0, 0]), np.array([-1.0, 0, 0])
  assert geometry.dihedral(p0, p1, p2, down) == pytest.approx(-np.pi / 2)
  assert abs(geometry.dihedral(p0, p1, p2, back)) == pytest.approx(np.pi)
  assert geometry.dihedral(p0, p1, p2, np.array([2.0, 0, 3])) == pytest.approx(0.0)


def test_dihedral_matches_bio_pdb_on_random_points():
  rng = np.random.default_rng(0)
  pts = rng.normal(size=[200, 4, 3]) * 3
  ours = geometry.dihedral(pts[:, 0], pts[:, 1], pts[:, 2], pts[:, 3])
  ref = [vectors.calc_dihedral(*[vectors.Vector(*p) for p in quad]) for quad in pts]
  np.testing.assert_allclose(ours, ref, atol=1e-9)


def test_dihedral_invariant_to_rigid_motion():
  rng = np.random.default_rng(1)
  pts = rng.normal(size=[50, 4, 3])
  q, _ = np.linalg.qr(rng.normal(size=[3, 3]))
  q *= np.sign(np.linalg.det(q))  # proper rotation
  moved = pts @ q.T + rng.normal(size=3)
  np.testing.assert_allclose(geometry.dihedral(*np.moveaxis(pts, 1, 0)),
                             geometry.dihedral(*np.moveaxis(moved, 1, 0)), atol=1e-9)
  mirrored = pts * np.array([1.0, 1.0, -1.0])  # a mirror flips the sign
  np.testing.assert_allclose(geometry.dihedral(*np.moveaxis(pts, 1, 0)),
                             -geometry.dihedral(*np.moveaxis(mirrored, 1, 0)), atol=1e-9)


def test_ideal_alpha_helix():
  n = 37  # ten turns
  backbone = build_backbone([-57.0] * n, [-47.0] * n, [180.0] * n)
  positions, mask = to_layout(backbone)
  feats = geometry.backbone_dihedrals(positions, mask)
  angles = angles_from_features(feats)
  np.testing.assert_allclose(angles[1:, 0], -57.0, atol=1e-3)  # φ
  np.testing.assert_allclose(angles[:-1, 1], -47.0, atol=1e-3)  # ψ
  np.testing.assert_allclose(np.abs(angles[:-1, 2]), 180.0, atol=1e-3)  # ω
  # Undefined ends are exactly 0 (sin and cos).
  assert np.all(feats[0, [0, 3]] == 0) and np.all(feats[-1, [1, 2, 4, 5]] == 0)
  np.testing.assert_allclose(np.hypot(feats[1:-1, :3], feats[1:-1, 3:]), 1.0, atol=1e-6)
  # Independent facts about that helix: right-handed (Cα virtual torsion ≈ +50°, by
  # Bio.PDB), about 1.5 Å rise per residue, Cα(i)–Cα(i+3) ≈ 5 Å, (i+4) ≈ 6.2 Å.
  ca = backbone[:, 1]
  virtual = np.degrees(vectors.calc_dihedral(*[vectors.Vector(*p) for p in ca[3:7]]))
  assert 45 < virtual < 55
  axis = np.linalg.svd(ca - ca.mean(0))[2][0]
  rise = np.abs((ca[-1] - ca[0]) @ axis) / (n - 1)
  assert rise == pytest.approx(1.5, abs=0.08)
  d = np.linalg.norm(ca[1:6] - ca[0], axis=-1)
  assert d[2] < d[1]  # i+3 comes back closer than i+2: a helix, not a strand
  assert 4.8 < d[2] < 5.6 and 5.9 < d[3] < 6.6


def test_beta_strand_and_chain_break():
  n = 8
  phi, psi, omega = [-120.0] * n, [130.0] * n, [178.0] * n
  backbone = build_backbone(phi, psi, omega)
  backbone[5:] += np.array([30.0, 0.0, 0.0])  # residue 5 starts a new segment
  positions, mask = to_layout(backbone)
  breaks = geometry.chain_breaks(positions, mask)
  np.testing.assert_array_equal(breaks, [1, 0, 0, 0, 0, 1, 0, 0])
  feats = geometry.backbone_dihedrals(positions, mask, breaks)
  angles = angles_from_features(feats)
  defined = np.ones([n, 3], bool)
  defined[[0, 5], 0] = False  # φ at segment starts
  defined[[4, 7], 1:] = False  # ψ, ω at segment ends
  np.testing.assert_allclose(angles[defined[:, 0], 0], -120.0, atol=1e-3)
  np.testing.assert_allclose(angles[defined[:, 1], 1], 130.0, atol=1e-3)
  np.testing.assert_allclose(angles[defined[:, 2], 2], 178.0, atol=1e-3)
  np.testing.assert_array_equal(feats[~defined[:, 0]][:, [0, 3]], 0)
  np.testing.assert_array_equal(feats[~defined[:, 1]][:, [1, 2, 4, 5]], 0)
  # Same result when the break is found by backbone_dihedrals itself.
  np.testing.assert_array_equal(geometry.backbone_dihedrals(positions, mask), feats)
  # A missing C of residue 2 removes ψ₂, ω₂, φ₃ and makes residue 3 a segment start.
  mask[2, rc.ATOM_SLOT["C"]] = False
  assert geometry.chain_breaks(positions, mask)[3]
  feats = geometry.backbone_dihedrals(positions, mask)
  assert np.all(feats[2] == 0) and np.all(feats[3, [0, 3]] == 0)


def build_lysine(chis):
  """N, CA, C, O, CB, CG, CD, CE, NZ of a lysine with the given χ1..χ4 (degrees)."""
  n = np.array([0.0, 1.4, 0.0])
  ca = np.zeros(3)
  c = place(np.array([1.0, 2.0, 0.5]), n, ca, 1.525, 111.0, -60.0)
  o = place(n, ca, c, 1.23, 120.0, 150.0)
  cb = place(c, n, ca, 1.53, 110.5, -122.0)
  cg = place(n, ca, cb, 1.52, 114.0, chis[0])
  cd = place(ca, cb, cg, 1.52, 111.0, chis[1])
  ce = place(cb, cg, cd, 1.52, 111.0, chis[2])
  nz = place(cg, cd, ce, 1.49, 112.0, chis[3])
  return np.array([n, ca, c, o, cb, cg, cd, ce, nz])


def test_lysine_chi_angles():
  chis = [-65.0, 175.0, 62.0, -170.0]
  positions = build_lysine(chis)[None].astype(np.float32)
  mask = np.ones([1, 9], bool)
  for types in ([rc.RESTYPE_INDEX["K"]], ["LYS"], ["MLY"]):  # MLY: modified lysine
    feats, chi_mask = geometry.sidechain_torsions(positions, mask, types)
    assert chi_mask.tolist() == [[True] * 4]
    np.testing.assert_allclose(np.degrees(np.arctan2(feats[0, :4], feats[0, 4:])), chis,
                               atol=1e-3)
  # A missing CD (slot D) removes χ2 and χ3 (its dihedrals), keeps χ1; χ4 needs CD too.
  mask[0, rc.ATOM_SLOT["D"]] = False
  feats, chi_mask = geometry.sidechain_torsions(positions, mask, ["LYS"])
  assert chi_mask.tolist() == [[True, False, False, False]]
  assert np.all(feats[0, [1, 2, 3, 5, 6, 7]] == 0)
  # The same atoms read as serine (one χ) or glycine (none).
  mask[:] = True
  _, chi_mask = geometry.sidechain_torsions(positions, mask, ["SER"])
  assert chi_mask.tolist() == [[True, False, False, False]]
  feats, chi_mask = geometry.sidechain_torsions(positions, mask, [rc.RESTYPE_INDEX["G"]])
  assert not chi_mask.any() and not feats.any()


def _bio_chain(path):
  bio_pdb = pytest.importorskip("Bio.PDB")
  with warnings.catch_warnings(), gzip.open(path, "rt") as f:
    warnings.simplefilter("ignore")
    return next(iter(bio_pdb.PDBParser(QUIET=True).get_structure("x", f)[0]))


@pytest.mark.parametrize("name", ["1ahsA", "3e8mA", "2cayA"])
def test_real_protein_angles_match_bio_pdb(name):
  """φ/ψ/ω and χ1..χ4 of real chains against Bio.PDB's own dihedral on its atoms."""
  from bihier_jax.common import structure  # pylint: disable=import-outside-toplevel
  spec = importlib.util.find_spec("MDAnalysisTests")
  if spec is None:
    pytest.skip("MDAnalysisTests not installed")
  path = os.path.join(spec.submodule_search_locations[0], "data", "dssp",
                      f"{name}.pdb.gz")
  chain = structure.parse_structure(path).chains[0]
  residues = [r for r in _bio_chain(path) if r.id[0] == " " and "CA" in r]
  assert len(residues) == chain.num_residues
  feats = geometry.backbone_dihedrals(chain.atom_positions, chain.atom_mask)
  breaks = geometry.chain_breaks(chain.atom_positions, chain.atom_mask)

  def bio_dihedral(atoms):
    return vectors.calc_dihedral(*[a.get_vector() for a in atoms])

  checked = 0
  for i in range(1, len(residues)):
    prev, cur = residues[i - 1], residues[i]
    bonded = (prev["C"] - cur["N"]) <= geometry.PEPTIDE_BOND_MAX
    assert breaks[i] == (not bonded)
    if not bonded:
      continue
    phi = bio_dihedral([prev["C"], cur["N"], cur["CA"], cur["C"]])
    psi = bio_dihedral([prev["N"], prev["CA"], prev["C"], cur["N"]])
    omega = bio_dihedral([prev["CA"], prev["C"], cur["N"], cur["CA"]])
    np.testing.assert_allclose(feats[i, [0, 3]], [np.cos(phi), np.sin(phi)], atol=1e-5)
    np.testing.assert_allclose(feats[i - 1, [1, 4]], [np.cos(psi), np.sin(psi)],
                               atol=1e-5)
    np.testing.assert_allclose(feats[i - 1, [2, 5]], [np.cos(omega), np.sin(omega)],
                               atol=1e-5)
    checked += 1
  assert checked > 0.9 * len(residues)

  torsions, chi_mask = geometry.sidechain_torsions(chain.atom_positions, chain.atom_mask,
                                                   chain.residue_names)
  n_chi = 0
  for i, residue in enumerate(residues):
    names = ("N", "CA", "CB") + rc.CHI_ATOMS.get(residue.get_resname(), ())
    for k in range(4):
      atoms = names[k:k + 4]
      expected = len(atoms) == 4 and all(a in residue for a in atoms)
      assert chi_mask[i, k] == expected, (i, k)
      if expected:
        chi = bio_dihedral([residue[a] for a in atoms])
        np.testing.assert_allclose(torsions[i, [k, k + 4]], [np.sin(chi), np.cos(chi)],
                                   atol=1e-5)
        n_chi += 1
  assert n_chi > chain.num_residues
