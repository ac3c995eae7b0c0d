"""Every amino-acid and vocabulary table of the project, once.

Residue types follow the 26-letter alphabet of IEConv's ProtFunct data (used by ProNet
for EC react), so that react's stored `amino_types` are our indices unchanged; index 25
(`X`) is "unknown", and is also the token that residue-type masking writes.

Atom layout per residue (``ATOM_NAMES``): the four backbone atoms, CB, then the four
side-chain atoms that define χ1..χ4 for that residue type (``CHI_ATOMS``), so that
χk is always the dihedral of layout slots ``CHI_SLOTS[k]``.
"""

from __future__ import annotations

import numpy as np

# --- residue types ---------------------------------------------------------------------

# IEConv / ProNet order (IEConv's PyPeriodicTable amino list). Index 25 = unknown / masked.
RESTYPES = "HDRFACGQEKLMNSYTIWPVUOBJZX"
NUM_RESTYPES = len(RESTYPES)  # 26
UNKNOWN_RESTYPE = RESTYPES.index("X")  # 25
RESTYPE_INDEX = {letter: i for i, letter in enumerate(RESTYPES)}

STANDARD_AA = "ACDEFGHIKLMNPQRSTVWY"

THREE_TO_ONE = {
    "ALA": "A", "ARG": "R", "ASN": "N", "ASP": "D", "CYS": "C", "GLN": "Q", "GLU": "E",
    "GLY": "G", "HIS": "H", "ILE": "I", "LEU": "L", "LYS": "K", "MET": "M", "PHE": "F",
    "PRO": "P", "SER": "S", "THR": "T", "TRP": "W", "TYR": "Y", "VAL": "V",
    "SEC": "U", "PYL": "O", "ASX": "B", "GLX": "Z", "UNK": "X",
}
# The 20 standard amino acids' names (those ScanNet also keeps when written as HETATM).
STANDARD_THREE_LETTER = frozenset(k for k, v in THREE_TO_ONE.items() if v in STANDARD_AA)

# Modified residues mapped to their parent (ScanNet's list, plus the
# most frequent others in the PDB). Each maps to a key of THREE_TO_ONE.
MODIFIED_TO_PARENT = {
    "MSE": "MET", "SEP": "SER", "TPO": "THR", "PTR": "TYR", "TYS": "TYR",
    "HSD": "HIS", "HSE": "HIS", "HIP": "HIS", "HID": "HIS", "HIE": "HIS", "HSP": "HIS",
    "CSO": "CYS", "CSD": "CYS", "CME": "CYS", "CYX": "CYS", "OCS": "CYS", "CSS": "CYS",
    "MLY": "LYS", "M3L": "LYS", "KCX": "LYS", "LLP": "LYS", "ALY": "LYS",
    "HYP": "PRO", "PCA": "GLU", "CGU": "GLU", "ASH": "ASP", "GLH": "GLU", "LYN": "LYS",
    "FME": "MET", "NLE": "LEU", "MEN": "ASN", "SAC": "SER", "DAL": "ALA",
}


def one_letter(resname: str) -> str | None:
    """One-letter code of a residue name (modified residues map to their parent).

    Returns None for names that are not amino acids (ligands, waters, nucleotides).
    """
    resname = resname.strip().upper()
    resname = MODIFIED_TO_PARENT.get(resname, resname)
    return THREE_TO_ONE.get(resname)


def restype_index(letter: str) -> int:
    """Index in RESTYPES of a one-letter code; anything unknown is UNKNOWN_RESTYPE."""
    return RESTYPE_INDEX.get(letter.upper(), UNKNOWN_RESTYPE)


# --- atoms -----------------------------------------------------------------------------

BACKBONE_ATOMS = ("N", "CA", "C", "O")
# Layout slots: N, CA, C, O, CB, then the χ-defining side-chain atoms G, D, E, Z.
ATOM_NAMES = ("N", "CA", "C", "O", "CB", "G", "D", "E", "Z")
NUM_ATOM_SLOTS = len(ATOM_NAMES)  # 9
ATOM_SLOT = {name: i for i, name in enumerate(ATOM_NAMES)}

# Side-chain atoms filling slots G, D, E, Z, per residue (χ definitions of IUPAC-IUB 1970,
# as tabulated e.g. in AlphaFold's residue_constants.chi_angles_atoms).
CHI_ATOMS = {
    "ALA": (), "GLY": (),
    "ARG": ("CG", "CD", "NE", "CZ"),
    "ASN": ("CG", "OD1"), "ASP": ("CG", "OD1"),
    "CYS": ("SG",),
    "GLN": ("CG", "CD", "OE1"), "GLU": ("CG", "CD", "OE1"),
    "HIS": ("CG", "ND1"),
    "ILE": ("CG1", "CD1"),
    "LEU": ("CG", "CD1"),
    "LYS": ("CG", "CD", "CE", "NZ"),
    "MET": ("CG", "SD", "CE"),
    "PHE": ("CG", "CD1"), "TRP": ("CG", "CD1"), "TYR": ("CG", "CD1"),
    "PRO": ("CG", "CD"),
    "SER": ("OG",), "THR": ("OG1",),
    "VAL": ("CG1",),
}
# χk (k = 1..4) is the dihedral of these four layout slots.
CHI_SLOTS = ((0, 1, 4, 5), (1, 4, 5, 6), (4, 5, 6, 7), (5, 6, 7, 8))
NUM_CHI = 4

# --- ESM-2 vocabulary (fair-esm Alphabet "ESM-1b" ordering) ----------------------------

ESM_VOCAB = (
    "<cls>", "<pad>", "<eos>", "<unk>",
    "L", "A", "G", "V", "S", "E", "R", "T", "I", "D", "P", "K", "Q", "N",
    "F", "Y", "M", "H", "W", "C", "X", "B", "U", "Z", "O", ".", "-",
    "<null_1>", "<mask>",
)
ESM_CLS, ESM_PAD, ESM_EOS, ESM_UNK = 0, 1, 2, 3
ESM_MASK = ESM_VOCAB.index("<mask>")  # 32
ESM_TOKEN = {tok: i for i, tok in enumerate(ESM_VOCAB)}
ESM_MAX_TOKENS = 1024  # positions the released ESM-2 models were trained on, incl. BOS/EOS
ESM_MAX_RESIDUES = ESM_MAX_TOKENS - 2  # residues of one chain: <cls> and <eos> take two

_ESM_ID_OF_BYTE = np.full(256, ESM_TOKEN["X"], np.uint8)  # a letter outside the vocab: X
for _token, _id in ESM_TOKEN.items():
  if len(_token) == 1:
    _ESM_ID_OF_BYTE[ord(_token)] = _id


def esm_token_ids(sequence: str) -> np.ndarray:
  """uint8[len] ESM-2 token ids of a one-letter sequence (case-insensitive), without
  <cls>/<eos>. Every letter outside the ESM vocabulary reads as X: the one policy of the
  data pipeline (the tokenizer's inline `<mask>` and `<unk>` are for text input)."""
  return _ESM_ID_OF_BYTE[np.frombuffer(sequence.upper().encode("ascii", "replace"),
                                       np.uint8)]

# --- chemical elements (ligand atoms as graph nodes, LBA) ------------------------------

# Metal ions (catalytic Zn²⁺/Mg²⁺ in LBA pockets; ATOM3D's baselines type them apart) come
# after OTHER so that indices stored in records written before keep their meaning.
LIGAND_ELEMENTS = ("C", "N", "O", "S", "P", "F", "CL", "BR", "I", "B", "SE", "OTHER",
                   "ZN", "MG", "CA", "MN", "FE", "CO", "NI", "CU", "NA", "K")
ELEMENT_INDEX = {e: i for i, e in enumerate(LIGAND_ELEMENTS)}
