"""Parsed chains (and ligands) -> `ProteinExample`: torsion features and residue graph.

Residues of all chains are concatenated in the given chain order; each chain is one ESM
row whose sequence is the chain's parsed (resolved) residues, so `residue_index` is
0..n-1 within each chain. Backbone dihedrals and χ angles are computed per chain (never
across chains). The graph joins residues by Cα and ligand atoms (after the residues) by
their own positions.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from bihier_jax.common import geometry
from bihier_jax.common import residue_constants as rc
from bihier_jax.common import structure
from bihier_jax.data import graph
from bihier_jax.data.example import ProteinExample

StructureError = structure.StructureError

_CA = rc.ATOM_SLOT["CA"]

_STRUCTURE_SUFFIXES = (".pdb", ".ent", ".cif", ".mmcif", ".pdbx", ".pdb1")
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz")


# data.incomplete_backbone: residues lacking N, C or O (CA-only models, truncated
# residues). The model sees them with a degenerate frame: the missing N / C take the CA
# position (ProNet's frame angles 0), the backbone dihedrals that need them are 0, and
# ESM reads their residue type as usual.
INCOMPLETE_BACKBONE_POLICIES = ("warn", "skip", "allow")


def incomplete_backbone_residues(ex: ProteinExample) -> int:
  """Residues of an example lacking N, CA, C or O."""
  return int(structure.incomplete_backbone(ex.atom_mask).sum())


def check_incomplete_backbone_policy(policy: str) -> None:
  if policy not in INCOMPLETE_BACKBONE_POLICIES:
    raise ValueError(f"incomplete_backbone={policy!r} is not one of "
                     f"{' | '.join(INCOMPLETE_BACKBONE_POLICIES)}")


def apply_incomplete_backbone(examples: Sequence[ProteinExample], policy: str):
  """(examples kept, their incomplete-backbone residues, ids left out) under `policy`:
  warn and allow keep every example (the caller warns), skip leaves out those with any."""
  check_incomplete_backbone_policy(policy)
  counts = [incomplete_backbone_residues(ex) for ex in examples]
  if policy != "skip":
    return list(examples), sum(counts), []
  return ([ex for ex, c in zip(examples, counts) if not c], 0,
          [ex.id for ex, c in zip(examples, counts) if c])


def ligand_element_index(element: str) -> int:
  """Index in `residue_constants.LIGAND_ELEMENTS`; unlisted elements are OTHER."""
  return rc.ELEMENT_INDEX.get(element.upper(), rc.ELEMENT_INDEX["OTHER"])


def example_from_chains(
    id: str,  # pylint: disable=redefined-builtin
    chains: Sequence[structure.Chain], *,
    ligands: Sequence[structure.Ligand] = (),
    cutoff: float = graph.DEFAULT_GRAPH.cutoff,
    max_neighbors: int = graph.DEFAULT_GRAPH.max_neighbors,
    node_labels: np.ndarray | None = None, node_label_mask: np.ndarray | None = None,
    node_weights: np.ndarray | None = None, graph_label: float = 0.0,
    weight: float = 1.0, group: str = "") -> ProteinExample:
  """Builds one example from protein chains (and optional ligands).

  Args:
    id: example id.
    chains: [c] parsed chains; chain r becomes ESM row r.
    ligands: ligands whose heavy atoms become graph nodes after the residues.
    cutoff: graph radius in Å.
    max_neighbors: most incoming edges per node.
    node_labels: float[n] per-residue labels (n = total residues); 0 if None.
    node_label_mask: bool[n]; all True if labels are given, else all False.
    node_weights: float[n]; 1 if None.
    graph_label, weight, group: per-example label, weight and metric group.

  Returns:
    A `ProteinExample` (see bihier_jax/data/example.py for every field).
  """
  if not chains:
    raise ValueError(f"{id}: no chains")
  aatype = np.concatenate([c.aatype for c in chains]).astype(np.int32)
  n = aatype.shape[0]
  positions = np.concatenate([c.atom_positions for c in chains]).astype(np.float32)
  mask = np.concatenate([c.atom_mask for c in chains]).astype(bool)
  dihedrals = np.concatenate([
      geometry.backbone_dihedrals(c.atom_positions, c.atom_mask) for c in chains])
  torsions, chi_mask = zip(*[
      geometry.sidechain_torsions(c.atom_positions, c.atom_mask, c.aatype)
      for c in chains])
  chain_row = np.concatenate([np.full([c.num_residues], r, np.int32)
                              for r, c in enumerate(chains)])
  residue_index = np.concatenate([np.arange(c.num_residues, dtype=np.int32)
                                  for c in chains])

  if ligands:
    ligand_positions = np.concatenate(
        [np.asarray(l.positions, np.float32).reshape(-1, 3) for l in ligands])
    ligand_elements = np.array([ligand_element_index(e) for l in ligands
                                for e in l.elements], np.int32)
  else:
    ligand_positions = np.zeros([0, 3], np.float32)
    ligand_elements = np.zeros([0], np.int32)
  node_positions = np.concatenate([positions[:, _CA], ligand_positions])
  senders, receivers = graph.radius_graph(
      node_positions, cutoff=cutoff, max_neighbors=max_neighbors)

  if node_labels is None:
    labels = np.zeros([n], np.float32)
    label_mask = np.zeros([n], bool) if node_label_mask is None else node_label_mask
  else:
    labels = np.asarray(node_labels, np.float32)
    label_mask = np.ones([n], bool) if node_label_mask is None else node_label_mask
  label_mask = np.asarray(label_mask, bool)
  weights = (np.ones([n], np.float32) if node_weights is None
             else np.asarray(node_weights, np.float32))
  for field, arr in (("node_labels", labels), ("node_label_mask", label_mask),
                     ("node_weights", weights)):
    if arr.shape != (n,):
      raise ValueError(f"{id}: {field} has shape {arr.shape}, expected ({n},)")

  return ProteinExample(
      id=id,
      chain_ids=[c.chain_id for c in chains],
      sequences=[c.sequence for c in chains],
      aatype=aatype,
      atom_positions=positions,
      atom_mask=mask,
      chain_row=chain_row,
      residue_index=residue_index,
      residue_number=np.concatenate([c.residue_number for c in chains]).astype(np.int32),
      insertion_code=np.concatenate([np.asarray(c.insertion_code, str) for c in chains]),
      backbone_dihedrals=dihedrals.astype(np.float32),
      sidechain_torsions=np.concatenate(torsions).astype(np.float32),
      chi_mask=np.concatenate(chi_mask),
      senders=senders,
      receivers=receivers,
      node_labels=labels,
      node_label_mask=label_mask,
      node_weights=weights,
      graph_label=float(graph_label),
      weight=float(weight),
      group=group,
      ligand_elements=ligand_elements,
      ligand_positions=ligand_positions,
  )


def structure_stem(path: str | os.PathLike) -> str:
  """File name without directory, compression and structure suffix:
  "d/1abc.cif.gz" -> "1abc", "1abc.pdb.bz2" -> "1abc"."""
  name = os.path.basename(os.fspath(path))
  for suffix in _COMPRESSION_SUFFIXES:
    if name.lower().endswith(suffix):
      name = name[:-len(suffix)]
      break
  root, ext = os.path.splitext(name)
  return root if ext.lower() in _STRUCTURE_SUFFIXES else name


def chain_example_id(stem: str, chain_id: str) -> str:
  """Id of a one-chain example: "<stem>_<chain>"; a blank chain id reads "<stem>_blank"."""
  return f"{stem}_{chain_id.strip() or 'blank'}"


def examples_from_file(
    path: str | os.PathLike, *, model_index: int = 0,
    chain_ids: Sequence[str] | None = None, per_chain: bool = True,
    min_residues: int = 1, include_ligands: bool = False, example_id: str | None = None,
    **kw) -> list[ProteinExample]:
  """Parses a structure file into examples.

  Args:
    path: PDB or mmCIF file, optionally gzip / bzip2 / xz compressed (read by content).
    model_index: model to read (first by default).
    chain_ids: author chain ids to keep, in this order (all protein chains if None);
      a requested chain that is missing raises StructureError.
    per_chain: one example per chain, id "<stem>_<chain>" (`chain_example_id`); else one example of all
      chains, id "<stem>".
    min_residues: chains with fewer residues are left out (per_chain) or, for one
      example of all chains, the total must reach it.
    include_ligands: add ligand heavy atoms as graph nodes (per-chain examples take the
      ligands listed under their chain).
    example_id: id (or id prefix, per_chain) instead of the file stem.
    **kw: passed on to `example_from_chains` (cutoff, max_neighbors, labels, ...).

  Returns:
    A non-empty list of examples.

  Raises:
    StructureError: unreadable file, no protein, missing chains, or nothing long enough.
  """
  parsed = structure.parse_structure(path, model_index=model_index)
  source = parsed.source
  chains = parsed.chains
  if chain_ids is not None:
    by_id = {}
    for c in chains:
      by_id.setdefault(c.chain_id, c)
    missing = [cid for cid in chain_ids if cid not in by_id]
    if missing:
      raise StructureError(
          f"{source}: chain(s) {', '.join(missing)} not found (protein chains: "
          f"{', '.join(by_id) or 'none'})")
    chains = [by_id[cid] for cid in chain_ids]
  stem = example_id or structure_stem(path)
  if per_chain:
    kept = [c for c in chains if c.num_residues >= min_residues]
    if not kept:
      raise StructureError(f"{source}: no chain with at least {min_residues} residues")
    return [
        example_from_chains(
            chain_example_id(stem, c.chain_id), [c],
            ligands=[l for l in parsed.ligands if l.chain_id == c.chain_id]
            if include_ligands else (), **kw)
        for c in kept]
  total = sum(c.num_residues for c in chains)
  if total < min_residues:
    raise StructureError(f"{source}: {total} residues, fewer than {min_residues}")
  return [example_from_chains(stem, chains,
                              ligands=parsed.ligands if include_ligands else (), **kw)]

