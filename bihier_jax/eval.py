r"""Evaluate a trained run: `python -m bihier_jax.eval --config C --workdir DIR`.

Restores a checkpoint of DIR (`--checkpoint best|latest|STEP`; default the best by the
task's validation metric, else the latest), evaluates `--splits` (default
config.data.eval_splits) and writes, per split:

- DIR/eval/<split>.json: metric name -> number (NaN as null), plus `step` and
  `checkpoint` ('best', 'latest' or the step number asked for; the default is written
  as the one it resolved to);
- DIR/eval/<split>_predictions.npz: one row per scored item (labelled residue for node
  tasks, protein for graph tasks), enough to recompute every metric of the JSON offline
  (`training.pooling.recompute_metrics`) or to pool cross-validation folds
  (`python -m bihier_jax.pool_cv`). Fields, all compact (float32 / int32 / str):
  example_id [n], group [n], chain_row [n] and residue_index [n] (node tasks; -1 for
  graph tasks), prediction [n] (positive-class probability or value in label units) or
  [n, C] (class probabilities), label [n], weight [n]; scalars task_name, task_level,
  split, metrics [m], min_group_size, checkpoint_step. Unlabelled residues (label mask
  0) are neither scored nor stored. Full description: bihier_jax/training/pooling.py.

and DIR/eval/metrics.md (a Markdown table of all splits, also printed).
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from bihier_jax import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "The run's config file (.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "The training run's directory.")
flags.DEFINE_string("checkpoint", "", "best | latest | step number (default: best if "
                    "any checkpoint has validation metrics, else latest).")
flags.DEFINE_list("splits", None, "Splits to evaluate (default: config.data.eval_splits).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  cli.start(argv)
  from bihier_jax.training import checkpointing  # pylint: disable=g-import-not-at-top
  from bihier_jax.training import inference  # pylint: disable=g-import-not-at-top
  try:
    inference.evaluate_checkpoint(FLAGS.config, FLAGS.workdir, FLAGS.checkpoint,
                                  FLAGS.splits)
  except checkpointing.CheckpointError as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
