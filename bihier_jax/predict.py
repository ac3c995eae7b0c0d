r"""Run a trained model on structure files.

  python -m bihier_jax.predict --workdir DIR --structure FILE [--out P.npz]
  python -m bihier_jax.predict --workdir DIR --structures DIR_OR_GLOB [--out P.npz]

The config defaults to the run's own (DIR/config.json). Every input (PDB or mmCIF,
plain or compressed) is read and checked before JAX starts: with --structure an unusable
file ends the command in one line (exit status 2), with --structures it is skipped and
listed in <output>.manifest.jsonl. Proteins are batched as evaluation batches them and
one .npz holds every protein's embeddings and predictions (default
DIR/predictions/<name>.npz). Fields, residue policies and multi-host runs:
docs/predict.md.
"""

import json
import os
import sys

from absl import flags
from absl import logging

from bihier_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "The training run's directory.")
flags.DEFINE_string("structure", None, "One PDB / mmCIF file (gzip, bzip2, xz read).")
flags.DEFINE_string("structures", None, "A folder (every file under it) or a glob "
                    "('data/*.cif.gz') of structure files, predicted in batches.")
flags.DEFINE_string("out", "", "Output .npz (default DIR/predictions/<name>.npz).")
flags.DEFINE_string("checkpoint", "", "best | latest | step number (default: best if "
                    "any checkpoint has validation metrics, else latest).")
flags.DEFINE_bool("per_chain", False, "One protein per chain instead of one protein of "
                  "all chains of a file.")
flags.DEFINE_list("chains", None, "Author chain ids to keep (default: all protein "
                  "chains); a file without one of them cannot be used.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.mark_flags_as_required(["workdir"])


def _output_path() -> str:
  from bihier_jax.data import from_files  # pylint: disable=g-import-not-at-top
  if FLAGS.out:
    return FLAGS.out
  return from_files.default_output(FLAGS.workdir,
                                         FLAGS.structure or FLAGS.structures)


def _read_inputs(config):
  """Parses every input (no JAX yet); exits 2 with one line when nothing can be used."""
  from bihier_jax.common import structure  # pylint: disable=g-import-not-at-top
  from bihier_jax.data import from_files  # pylint: disable=g-import-not-at-top
  if bool(FLAGS.structure) == bool(FLAGS.structures):
    raise cli.CommandLineError("give one of --structure FILE or --structures "
                               "DIR_OR_GLOB")
  kw = from_files.load_options(config, per_chain=FLAGS.per_chain,
                                     chains=FLAGS.chains)
  try:
    if FLAGS.structure:
      if not os.path.isfile(FLAGS.structure):
        raise structure.StructureError(
            f"{FLAGS.structure}: " + ("a folder: use --structures" if
                                      os.path.isdir(FLAGS.structure) else "file not found"))
      examples, line = from_files.load_file(FLAGS.structure, **kw)
      return from_files.Loaded(examples, [FLAGS.structure] * len(examples), [line])
    paths = from_files.expand(FLAGS.structures)
  except (structure.StructureError, from_files.InputError) as e:
    raise cli.CommandLineError(str(e)) from e
  loaded = from_files.load(paths, **kw)
  if not loaded.examples:
    reasons = "; ".join(m["reason"] for m in loaded.skipped[:3])
    raise cli.CommandLineError(f"{FLAGS.structures}: none of {len(paths)} file(s) can be "
                               f"used ({reasons}{'; ...' if len(paths) > 3 else ''})")
  return loaded


def _report_inputs(loaded, config, out: str) -> None:
  from bihier_jax.data import from_files  # pylint: disable=g-import-not-at-top
  chains = from_files.multi_chain_note(loaded, str(config.data.get("dir", "")),
                                             FLAGS.per_chain)
  for note in loaded.notes + ([chains] if chains else []):
    print(f"warning: {note}", file=sys.stderr, flush=True)
  policy = str(config.data.get("incomplete_backbone", "warn"))
  incomplete = [m for m in loaded.manifest if m.get("incomplete_backbone")]
  if incomplete and policy == "warn":
    residues = sum(m["incomplete_backbone"] for m in incomplete)
    where = incomplete[0]["source"] if len(incomplete) == 1 else (
        f"{len(incomplete)} files")
    print(f"warning: {where}: {residues} residue(s) without a complete backbone (N, C or "
          "O missing), predicted from degenerate frames; see protein_incomplete_backbone "
          "(--config.data.incomplete_backbone=skip leaves such proteins out)",
          file=sys.stderr, flush=True)
  if FLAGS.structures:
    manifest = os.path.splitext(out)[0] + ".manifest.jsonl"
    os.makedirs(os.path.dirname(os.path.abspath(manifest)), exist_ok=True)
    with open(manifest, "w") as f:
      for line in loaded.manifest:
        f.write(json.dumps(line) + "\n")
    if loaded.skipped:
      print(f"warning: {len(loaded.skipped)} of {len(loaded.manifest)} file(s) skipped "
            f"(reasons in {manifest})", file=sys.stderr, flush=True)


def main(argv):
  cli.start(argv)
  config = FLAGS.config
  loaded = _read_inputs(config)
  out = _output_path()
  from bihier_jax.training import inference  # pylint: disable=g-import-not-at-top
  from bihier_jax.training import runtime  # pylint: disable=g-import-not-at-top
  # Several processes (train.multi_host) share the batches; process 0 writes the files.
  runtime.start_backend(bool(config.train.multi_host))
  import jax  # pylint: disable=g-import-not-at-top
  first = jax.process_index() == 0
  if first:
    _report_inputs(loaded, config, out)
  done = inference.predict_structures(config, FLAGS.workdir, loaded, out=out,
                                      checkpoint=FLAGS.checkpoint,
                                      progress=FLAGS.progress)
  logging.info("%d protein(s) from %d file(s): %.2f proteins/s (restore and compile "
               "included)", done["proteins"], len(loaded.manifest) - len(loaded.skipped),
               done["proteins"] / max(done["seconds"], 1e-9))
  if first:
    print(out, flush=True)


if __name__ == "__main__":
  cli.run(main, config_help="The run's config file (.py); default: the config it was "
          "trained with, WORKDIR/config.json.", workdir_config=True, needs_data=False)
