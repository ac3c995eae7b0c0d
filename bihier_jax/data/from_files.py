"""Structure files named on a command line -> examples, with one manifest line per file.

Used by `predict` (and `preprocess pdb_dir` for the folder listing) before JAX or
TensorFlow start: parsing and featurising need gemmi and numpy only, so a bad input is
reported at once.

  paths = from_files.expand("structures/")            # a file, folder or glob
  loaded = from_files.load(paths)  # the graph of data.graph.DEFAULT_GRAPH
  loaded.examples, loaded.example_file, loaded.manifest

Every file ends up in `manifest` as `ok` or `skipped` with the reason (the reader's
StructureError, a missing `chains` id, or residues without a complete backbone under
the `skip` policy). Chains of any length are kept: prediction reads a chain longer than
data.max_residues in overlapping ESM windows (`layout.inference_batches`).
"""

from __future__ import annotations

import dataclasses
import glob
import os
from collections.abc import Sequence

from bihier_jax.common import structure
from bihier_jax.data import featurize
from bihier_jax.data.example import ProteinExample
from bihier_jax.data.graph import DEFAULT_GRAPH


class InputError(ValueError):
  """Nothing usable was named (no such file, an empty folder, a glob matching none)."""


def all_files(folder: str) -> list[str]:
  """Every regular file under `folder`, recursively, sorted (folders in sorted order)."""
  found = []
  for root, dirs, files in os.walk(folder):
    dirs.sort()
    found.extend(os.path.join(root, f) for f in sorted(files)
                 if os.path.isfile(os.path.join(root, f)))
  return found


def expand(spec: str) -> list[str]:
  """The files that `spec` names: a file, every file under a folder, or a glob's files.

  Raises:
    InputError: nothing matches (the message says what was looked for).
  """
  if os.path.isdir(spec):
    files = all_files(spec)
    if not files:
      raise InputError(f"{spec}: folder holds no files")
    return files
  if os.path.isfile(spec):
    return [spec]
  if glob.has_magic(spec):
    files = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
    if not files:
      raise InputError(f"{spec}: no file matches")
    return files
  raise InputError(f"{spec}: no such file or folder")


def default_output(workdir: str, spec: str) -> str:
  """WORKDIR/predictions/<name>.npz: a file's stem, a folder's name, else "structures"
  (a glob)."""
  spec = spec.rstrip("/")
  if os.path.isfile(spec):
    name = featurize.structure_stem(spec)
  else:
    name = os.path.basename(spec) if os.path.isdir(spec) else "structures"
  return os.path.join(workdir, "predictions", f"{name}.npz")


@dataclasses.dataclass
class Loaded:
  """What `load` read.

  Attributes:
    examples: [P] the usable proteins, files in order.
    example_file: [P] the file each came from.
    manifest: one dict per file: source, status (ok | skipped), reason, proteins,
      residues, incomplete_backbone (residues lacking N, C or O, in kept proteins).
    notes: lines for the user (proteins renamed by `make_ids_unique`).
  """
  examples: list[ProteinExample]
  example_file: list[str]
  manifest: list[dict]
  notes: list[str] = dataclasses.field(default_factory=list)

  @property
  def skipped(self) -> list[dict]:
    return [m for m in self.manifest if m["status"] != "ok"]


def load_options(config, *, per_chain: bool = False,
                 chains: Sequence[str] | None = None) -> dict:
  """`load_file` / `load` keyword arguments from a run's config: the graph as its
  training data was built (data.cutoff, data.max_neighbors) and its
  data.incomplete_backbone (warn for configs older than the field)."""
  return dict(per_chain=per_chain, chains=chains,
              incomplete_backbone=str(config.data.get("incomplete_backbone", "warn")),
              cutoff=float(config.data.cutoff),
              max_neighbors=int(config.data.max_neighbors))


def load_file(path: str, *, per_chain: bool = False, chains: Sequence[str] | None = None,
              incomplete_backbone: str = "warn", cutoff: float = DEFAULT_GRAPH.cutoff,
              max_neighbors: int = DEFAULT_GRAPH.max_neighbors
              ) -> tuple[list[ProteinExample], dict]:
  """One file's examples and its manifest line (status `ok`).

  Raises:
    structure.StructureError: the file cannot be used; the message names it and why.
  """
  examples = featurize.examples_from_file(
      path, per_chain=per_chain, chain_ids=list(chains) if chains else None,
      cutoff=cutoff, max_neighbors=max_neighbors)
  kept, incomplete, dropped = featurize.apply_incomplete_backbone(
      examples, incomplete_backbone)
  if not kept:
    raise structure.StructureError(
        f"{path}: every protein has residues without a complete backbone (N, CA, C, "
        f"O) and data.incomplete_backbone=skip ({', '.join(dropped)})")
  line = {"source": path, "status": "ok", "reason": "", "proteins": len(kept),
          "residues": sum(ex.num_residues for ex in kept),
          "incomplete_backbone": incomplete}
  if dropped:
    line["left_out_incomplete_backbone"] = dropped
  return kept, line


def load(paths: Sequence[str], **kw) -> Loaded:
  """`load_file` of each path; a file that cannot be used is a `skipped` line.
  Proteins of files with the same stem get ids from their file names
  (`make_ids_unique`)."""
  loaded = Loaded([], [], [])
  for path in paths:
    try:
      examples, line = load_file(path, **kw)
    except structure.StructureError as e:
      loaded.manifest.append({"source": path, "status": "skipped", "reason": str(e),
                              "proteins": 0, "residues": 0, "incomplete_backbone": 0})
      continue
    loaded.examples.extend(examples)
    loaded.example_file.extend([path] * len(examples))
    loaded.manifest.append(line)
  loaded.notes.extend(make_ids_unique(loaded))
  return loaded


def _uncompressed_name(path: str) -> str:
  """'d/1abc.cif.gz' -> '1abc.cif' (the stem with its structure suffix)."""
  name = os.path.basename(path)
  stem = featurize.structure_stem(name)
  rest = name[len(stem):]
  for suffix in (".gz", ".bz2", ".xz"):
    if rest.lower().endswith(suffix):
      rest = rest[:-len(suffix)]
  return stem + rest


def make_ids_unique(loaded: Loaded) -> list[str]:
  """Renames the proteins of files that share a stem (1BD2.cif.gz and 1BD2.pdb.gz both
  give "1BD2"): their ids start with the file name instead ("1BD2.cif", "1BD2.pdb"),
  or with the path under the common folder when the names are equal too.

  Returns:
    One line per renamed group (for a note), empty when no id was shared.
  """
  stems: dict[str, set[str]] = {}
  for path in loaded.example_file:
    stems.setdefault(featurize.structure_stem(path), set()).add(path)
  clashes = {stem: sorted(paths) for stem, paths in stems.items() if len(paths) > 1}
  notes = []
  for stem, paths in clashes.items():
    names = [_uncompressed_name(p) for p in paths]
    if len(set(names)) < len(names):  # same name in several folders
      root = os.path.commonpath([os.path.abspath(p) for p in paths])
      names = [os.path.join(os.path.relpath(os.path.dirname(os.path.abspath(p)), root),
                            n).removeprefix("./") for p, n in zip(paths, names)]
    new_stem = dict(zip(paths, names))
    for example, path in zip(loaded.examples, loaded.example_file):
      if path in new_stem and example.id.startswith(stem):
        example.id = new_stem[path] + example.id[len(stem):]
    notes.append(f"{len(paths)} files share the name {stem}: their proteins are "
                 f"named {', '.join(names)}")
  return notes


def multi_chain_note(loaded: Loaded, data_dir: str, per_chain: bool) -> str | None:
  """A warning when proteins of several chains go to a model trained on single chains
  (the prepared records' metadata.json says max_chains 1 for every split), else None.
  Nothing is said when the records cannot be read here."""
  if per_chain:
    return None
  several = [ex for ex in loaded.examples if len(ex.chain_ids) > 1]
  if not several:
    return None
  from bihier_jax.common import storage  # pylint: disable=g-import-not-at-top
  if not data_dir:
    return None
  try:
    meta = storage.read_json(storage.join(storage.absolute(data_dir), "metadata.json"))
    most = max(int(s.get("max_chains", 0)) for s in meta["splits"].values())
  except Exception:  # pylint: disable=broad-except
    return None  # not readable from here (another machine, a bucket): nothing to say
  if most != 1:
    return None
  first = several[0]
  return (f"{len(several)} protein(s) have several chains (e.g. {first.id}: chains "
          f"{', '.join(first.chain_ids)}), each predicted as ONE protein, but the model "
          "was trained on single chains: pass --per_chain (one protein per chain) or "
          "--chains ID")
