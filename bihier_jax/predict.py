r"""Run a trained model on a structure file.

  python -m bihier_jax.predict --config C --workdir DIR --structure FILE [--out P.npz]

Parses FILE (PDB or mmCIF, optionally gzipped), builds the residue graph as the
training data was built (config.data.cutoff Å, config.data.max_neighbors), restores
the run's checkpoint (`--checkpoint`, as in bihier_jax.eval) and saves an .npz with:

  protein_ids [P]                  one protein per example (all chains, or per chain
                                   with --per_chain)
  residue_protein [n]              index into protein_ids of each residue
  chain_id, residue_number, insertion_code, residue_type [n]   (author numbering)
  node_embeddings [n, D]           per-residue readout features
  graph_embeddings [P, D]          per-protein pooled features
  residue_predictions [n, ...]     node tasks: class probabilities [n, C] /
                                   positive probability [n] / value [n]
  protein_predictions [P, ...]     graph tasks, likewise per protein
Default output: DIR/predictions/<file stem>.npz. The work is done by
`bihier_jax.training.inference.predict_structure`.
"""

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from bihier_jax import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "The run's config file (.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "The training run's directory.")
flags.DEFINE_string("structure", None, "PDB / mmCIF file (.gz accepted).")
flags.DEFINE_string("out", "", "Output .npz (default DIR/predictions/<stem>.npz).")
flags.DEFINE_string("checkpoint", "", "best | latest | step number (default: best if "
                    "any checkpoint has validation metrics, else latest).")
flags.DEFINE_bool("per_chain", False, "One protein per chain instead of one protein of "
                  "all chains.")
flags.DEFINE_list("chains", None, "Author chain ids to keep (default: all protein "
                  "chains).")
flags.mark_flags_as_required(["config", "workdir", "structure"])


def main(argv):
  cli.start(argv)
  from bihier_jax.training import checkpointing  # pylint: disable=g-import-not-at-top
  from bihier_jax.training import inference  # pylint: disable=g-import-not-at-top
  try:
    inference.predict_structure(
        FLAGS.config, FLAGS.workdir, FLAGS.structure, out=FLAGS.out,
        checkpoint=FLAGS.checkpoint, per_chain=FLAGS.per_chain, chains=FLAGS.chains)
  except checkpointing.CheckpointError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
