r"""Evaluate a trained run: `python -m bihier_jax.eval --workdir DIR [--config C]`.

The config defaults to the one the run was trained with (DIR/config.json); --config
and --config.x.y=... overrides change it. It runs on the devices it finds (train.fsdp
and the batch split fitted to them, one warning line when they change). Restores a
checkpoint of DIR (`--checkpoint best|latest|STEP`; default the best by the task's
validation metric, else the latest; an unreadable one gives way to the next readable
one), evaluates `--splits` (default config.data.eval_splits) and writes, per split,
DIR/eval/<split>.json and DIR/eval/<split>_predictions.npz (one row per scored item),
and DIR/eval/metrics.md (also printed). With --config.train.multi_host=True under a
multi-process launcher every process evaluates its share; the numbers equal one
process's. Details: docs/training.md ("Checkpoints", "Saved predictions").
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
