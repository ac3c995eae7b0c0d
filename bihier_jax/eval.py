r"""Evaluate a trained run: `python -m bihier_jax.eval --workdir DIR [--config C]`.

The config defaults to the one the run was trained with (DIR/config.json); --config
and --config.x.y=... overrides change it (e.g. --config.data.dir on another machine).
It runs on the devices it finds: train.fsdp and the batch split are fitted to them
(`cli.fit_to_devices`, one warning line when they change; the metrics do not depend on
them), so an FSDP run trained on many devices evaluates on fewer.
Restores a checkpoint of DIR (`--checkpoint best|latest|STEP`; default the best by the
task's validation metric, else the latest; if that one cannot be read, the next best or
next newest readable one, with a warning naming both; train.on_corrupt_checkpoint=fail
stops instead), evaluates `--splits` (default config.data.eval_splits) and writes, per
split:

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

With --config.train.multi_host=True under a multi-process launcher (`python -m
launch.local`, SLURM, a TPU VM slice) every process evaluates its share of the batches,
the items are gathered in one order, and process 0 writes the files: the numbers equal
one process's.
"""

from absl import flags

from bihier_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "The training run's directory.")
flags.DEFINE_string("checkpoint", "", "best | latest | step number (default: best if "
                    "any checkpoint has validation metrics, else latest).")
flags.DEFINE_list("splits", None, "Splits to evaluate (default: config.data.eval_splits).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  cli.start(argv)
  from bihier_jax.training import inference  # pylint: disable=g-import-not-at-top
  config = FLAGS.config
  if not config.train.multi_host:
    # Starts the backend (multi-host: evaluate_checkpoint joins the job first) and fits
    # the run to these devices, e.g. an FSDP run trained on more of them.
    config = cli.fit_to_devices(config)
  inference.evaluate_checkpoint(config, FLAGS.workdir, FLAGS.checkpoint, FLAGS.splits)


if __name__ == "__main__":
  cli.run(main, config_help="The run's config file (.py); default: the config it was "
          "trained with, WORKDIR/config.json.", workdir_config=True)
