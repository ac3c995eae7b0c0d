r"""Train a model: `python -m bihier_jax.train --config configs/demo.py --workdir DIR`.

Config fields are overridden on the command line, e.g.
`--config.train.num_steps=2000 --config.model.fusion.levels='(2,4)'`; a config variant
follows a colon (`--config configs/demo.py:tiny`). The config is checked before anything
starts: a mistake ends in one line naming the field (exit status 2, nothing written).
A run resumes from the latest readable checkpoint in DIR (docs/training.md,
"Checkpoints"); Ctrl-C or SIGTERM saves one after the current step and stops.
With --config.model.esm.checkpoint=PATH the ESM-2 preset is read from the checkpoint.
See `bihier_jax.training.train_lib.train_and_evaluate`.
"""

from absl import flags

from bihier_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  cli.start(argv)
  cli.check_devices(FLAGS.config)  # starts JAX; nothing read or written yet
  from bihier_jax.training import train_lib  # pylint: disable=g-import-not-at-top
  # The config is in DIR/config.json, not in the log.
  train_lib.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  cli.run(main, config_help="Training config file (.py), optionally with a variant "
          "after a colon (configs/demo.py:tiny).", esm_checkpoint=True)
