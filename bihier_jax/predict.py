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
Default output: DIR/predictions/<file stem>.npz.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags
import numpy as np

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


def predict(config, workdir: str, structure_path: str, *, out: str = "",
            checkpoint: str = "", per_chain: bool = False, chains=None) -> str:
  """Writes the predictions .npz for one structure file; returns its path."""
  import jax  # pylint: disable=g-import-not-at-top
  from bihier_jax.data import featurize  # pylint: disable=g-import-not-at-top
  from bihier_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from bihier_jax.training import parallel  # pylint: disable=g-import-not-at-top
  from bihier_jax.training import train_lib  # pylint: disable=g-import-not-at-top
  from bihier_jax.common import residue_constants as rc  # pylint: disable=g-import-not-at-top

  examples = featurize.examples_from_file(
      structure_path, per_chain=per_chain, chain_ids=chains,
      cutoff=float(config.data.cutoff), max_neighbors=int(config.data.max_neighbors))
  too_long = [f"{ex.id} ({max(len(s) for s in ex.sequences)})" for ex in examples
              if max(len(s) for s in ex.sequences) > 1022]
  if too_long:
    raise ValueError(f"{structure_path}: chains longer than ESM-2's 1022 residues: "
                     f"{', '.join(too_long)}")
  # One program for the whole file, rounded so that similar files share it.
  budget = input_pipeline.budget_for(examples, node_multiple=64, edge_multiple=512,
                                     row_multiple=8)
  batch = input_pipeline.collate(examples, budget)
  mesh = parallel.make_mesh(jax.local_devices()[:1])
  model, params, step = train_lib.restore_params(config, workdir, checkpoint, batch,
                                                 mesh)
  eval_fn = train_lib.jit_eval_step(model, config.task, mesh)
  outputs = eval_fn(params, parallel.put_global(parallel.stack([batch]), mesh))
  outputs = {k: np.asarray(jax.device_get(v))[0] for k, v in outputs.items()}

  residue = (batch.node_mask & (batch.graph.nodes["node_kind"] == 0))
  num_proteins = len(examples)
  result = {
      "protein_ids": np.array([ex.id for ex in examples]),
      "residue_protein": batch.node_graph[residue].astype(np.int32),
      "chain_id": np.concatenate([np.asarray(ex.chain_ids)[ex.chain_row]
                                  for ex in examples]),
      "residue_number": np.concatenate([ex.residue_number for ex in examples]),
      "insertion_code": np.concatenate([ex.insertion_code for ex in examples]),
      "residue_type": np.array([rc.RESTYPES[a] for ex in examples for a in ex.aatype]),
      "node_embeddings": outputs["node_embeddings"][residue],
      "graph_embeddings": outputs["graph_embeddings"][:num_proteins],
      "checkpoint_step": np.int64(step),
  }
  if config.task.level == "node":
    result["residue_predictions"] = outputs["predictions"][residue]
  else:
    result["protein_predictions"] = outputs["predictions"][:num_proteins]
  if not out:
    stem = featurize.structure_stem(structure_path)
    out = os.path.join(workdir, "predictions", f"{stem}.npz")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  np.savez(out, **result)
  logging.info("predictions for %d protein(s), %d residues -> %s", num_proteins,
               int(residue.sum()), out)
  print(out, flush=True)
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from bihier_jax.training import checkpointing  # pylint: disable=g-import-not-at-top
  try:
    predict(FLAGS.config, FLAGS.workdir, FLAGS.structure, out=FLAGS.out,
            checkpoint=FLAGS.checkpoint, per_chain=FLAGS.per_chain, chains=FLAGS.chains)
  except checkpointing.CheckpointError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
