r"""Train a model: `python -m bihier_jax.train --config configs/demo.py --workdir DIR`.

Config fields are overridden on the command line, e.g.
`--config.train.num_steps=2000 --config.model.fusion.levels='(2,4)'`; a config variant
follows a colon (`--config configs/demo.py:tiny`). A run resumes from the latest
checkpoint in DIR. See `bihier_jax.training.train_lib.train_and_evaluate`.
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from bihier_jax import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file (.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  cli.start(argv)
  from bihier_jax.training import train_lib  # pylint: disable=g-import-not-at-top
  logging.info("config:\n%s", FLAGS.config)
  train_lib.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
