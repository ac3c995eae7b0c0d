r"""Evaluate a trained run: `python -m bihier_jax.eval --config C --workdir DIR`.

Restores a checkpoint of DIR (`--checkpoint best|latest|STEP`; default the best by the
task's validation metric, else the latest), evaluates `--splits` (default
config.data.eval_splits) and writes DIR/eval/<split>.json (metric name -> number) and
DIR/eval/metrics.md (a Markdown table, also printed).
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "The run's config file (.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "The training run's directory.")
flags.DEFINE_string("checkpoint", "", "best | latest | step number (default: best if "
                    "any checkpoint has validation metrics, else latest).")
flags.DEFINE_list("splits", None, "Splits to evaluate (default: config.data.eval_splits).")
flags.mark_flags_as_required(["config", "workdir"])


def evaluate(config, workdir: str, checkpoint: str = "", splits=None
             ) -> dict[str, dict[str, float]]:
  """Metrics per split of a run's checkpoint; also written under workdir/eval/."""
  import jax  # pylint: disable=g-import-not-at-top
  from bihier_jax.training import parallel  # pylint: disable=g-import-not-at-top
  from bihier_jax.training import train_lib  # pylint: disable=g-import-not-at-top
  parallel.initialize_distributed(bool(config.train.multi_host))
  train_lib.ensure_demo_data(config)
  splits = list(splits or config.data.eval_splits)
  dataset_fn = train_lib.default_dataset_fn()
  mesh = parallel.make_mesh()
  sub_config = train_lib.per_device_config(config, jax.device_count())
  sample_batch, _ = next(iter(train_lib.eval_stream(config, dataset_fn, splits[0],
                                                    sub_config)))
  model, params, step = train_lib.restore_params(config, workdir, checkpoint,
                                                 sample_batch, mesh)
  eval_mesh = parallel.local_mesh()
  eval_fn = train_lib.jit_eval_step(model, config.task, eval_mesh)
  results = train_lib.evaluate_splits(config, dataset_fn, eval_fn, params, eval_mesh,
                                      splits)
  if jax.process_index() == 0:
    table = train_lib.write_eval_results(workdir, results, step=step,
                                         checkpoint=checkpoint or "auto")
    print(f"Checkpoint step {step}\n\n{table}", flush=True)
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from bihier_jax.training import checkpointing  # pylint: disable=g-import-not-at-top
  try:
    evaluate(FLAGS.config, FLAGS.workdir, FLAGS.checkpoint, FLAGS.splits)
  except checkpointing.CheckpointError as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
