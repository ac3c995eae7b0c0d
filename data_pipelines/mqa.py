"""ATOM3D PSR as model quality assessment (MQA): rank decoys of CASP targets by GDT_TS.

Raw layout (Zenodo record 4915648): `split-by-year/data/{train,val,test}/` ATOM3D LMDB
directories; each item is one decoy: `atoms` (DataFrame, one chain), `id` = the string
form of a tuple `(target, decoy)`, `scores` with `gdt_ts` (0–1, the label), `tm`,
`gdt_ha`, `rmsd`.

One example per decoy: all amino-acid residues, read like a structure file
(`atom_rows.structure_from_atoms`: the project's one residue-typing rule), label =
gdt_ts, group = target (per-target correlations), id = the item id string. Hydrogens,
hetero groups and residues without a CA are left out and counted per item (manifest
`dropped`). The id is parsed with `ast.literal_eval`, never `eval`. Targets must not
span splits (checked).
"""

from __future__ import annotations

import argparse
import ast

from data_pipelines import lba, tasks
from data_pipelines.reference import ReferenceCounts
from data_pipelines.tasks import Processed, SkipItem, WorkItem

MARKER = "split-by-year"
LABEL_KEY = "gdt_ts"


def parse_decoy_id(item_id: str) -> tuple[str, str]:
  """`"('T0759', 'server_TS1')"` -> ("T0759", "server_TS1"); ValueError otherwise."""
  try:
    value = ast.literal_eval(str(item_id))
  except (ValueError, SyntaxError) as e:
    raise ValueError(f"PSR id {item_id!r} is not a tuple literal") from e
  if not (isinstance(value, tuple) and len(value) == 2):
    raise ValueError(f"PSR id {item_id!r} is not a (target, decoy) pair")
  return str(value[0]), str(value[1])


def casp_round(target: str) -> str:
  """CASP round of a target id (T0xyz: CASP round from its number ranges), or "?".

  Ranges from the CASP target lists: CASP5 T0129–T0195, CASP6 T0196–T0282, CASP7
  T0283–T0386, CASP8 T0387–T0514, CASP9 T0515–T0643, CASP10 T0644–T0758, CASP11
  T0759–T0858, CASP12 T0859–T0948, CASP13 T0949–T1021.
  """
  bounds = ((129, 5), (196, 6), (283, 7), (387, 8), (515, 9), (644, 10), (759, 11),
            (859, 12), (949, 13), (1022, None))
  digits = "".join(ch for ch in target[1:5] if ch.isdigit())
  if not target.startswith("T") or not digits:
    return "?"
  number = int(digits)
  for (lo, r), (hi, _) in zip(bounds, bounds[1:]):
    if lo <= number < hi:
      return f"CASP{r}"
  return "?"


class MQATask:
  """Preprocessing task (data_pipelines.tasks protocol) for PSR split-by-year."""
  name = "mqa"
  description = "ATOM3D PSR split by year; graph_label = GDT_TS (0-1), group = CASP target."
  # Not from the ATOM3D paper: the sizes of a public copy of the released LMDBs.
  reference_counts = ReferenceCounts(
      source="the released PSR split-by-year LMDBs (Hugging Face copy, secondary)",
      unit="decoys", by="split", counts={"train": 25400, "val": 2800, "test": 16014})

  def add_arguments(self, parser: argparse.ArgumentParser) -> None:
    tasks.add_graph_arguments(parser)

  def list_items(self, raw_dir: str, args: argparse.Namespace | None = None
                 ) -> list[WorkItem]:
    extra = tasks.graph_arguments(args)
    dirs = lba.find_split_dirs(raw_dir, MARKER)
    return lba.list_lmdb_items(dirs, extra,
                               group_of=lambda i: parse_decoy_id(i)[0])

  def process(self, item: WorkItem):
    from bihier_jax.data import featurize
    cutoff, max_neighbors = item.payload[2:4]
    record = lba.read_lmdb_item(item)
    where = f"{item.source} ({record.get('id')})"
    try:
      target, _ = parse_decoy_id(record["id"])
      label = float(record["scores"][LABEL_KEY])
    except (KeyError, TypeError, ValueError) as e:
      raise SkipItem(f"{where}: bad id or scores ({e})", kind="bad id or scores") from e
    if "atoms" not in record:
      raise SkipItem(f"{where}: missing atoms", kind="missing atoms")
    decoy = lba.structure_from_table(record["atoms"], where)
    dropped = lba.dropped_counts(decoy, "")
    dropped["hetero_atoms"] = sum(len(h.elements) for h in decoy.ligands)
    return Processed([featurize.example_from_chains(
        str(record["id"]), decoy.chains, cutoff=cutoff, max_neighbors=max_neighbors,
        graph_label=label, group=target)], dropped=dropped)


MQA = MQATask()
